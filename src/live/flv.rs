//! The FLV file format as HTTP-FLV sends it: a header, then tags each followed by
//! the previous tag's size.

use bytes::{BufMut, Bytes, BytesMut};

use super::Tag;

/// The FLV header (audio and video flags set) and PreviousTagSize0.
pub fn header() -> Bytes {
    Bytes::from_static(&[b'F', b'L', b'V', 1, 0x05, 0, 0, 0, 9, 0, 0, 0, 0])
}

/// One tag: 11-byte header, body, and its PreviousTagSize.
pub fn tag(t: &Tag) -> Bytes {
    let len = t.data.len();
    let mut b = BytesMut::with_capacity(11 + len + 4);
    b.put_u8(t.kind as u8);
    b.put_uint(len as u64, 3);
    b.put_uint(u64::from(t.timestamp & 0x00ff_ffff), 3);
    b.put_u8((t.timestamp >> 24) as u8);
    b.put_uint(0, 3);
    b.extend_from_slice(&t.data);
    b.put_u32((11 + len) as u32);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::TagKind;

    #[test]
    fn tag_layout() {
        let t = Tag {
            kind: TagKind::Video,
            timestamp: 0x0123_4567,
            data: Bytes::from_static(&[0x17, 1, 0, 0, 0]),
        };
        let b = tag(&t);
        assert_eq!(&b[..11], &[9, 0, 0, 5, 0x23, 0x45, 0x67, 0x01, 0, 0, 0]);
        assert_eq!(&b[16..], &[0, 0, 0, 16]);
        assert_eq!(header().len(), 13);
    }
}
