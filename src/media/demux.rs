//! Which peer connection a datagram from a new address belongs to.
//!
//! All peers share one UDP port, so the first packet from a new 5-tuple must be a STUN
//! Binding request whose USERNAME is `<our ufrag>:<their ufrag>` (RFC 8445 §7.2.2).
//! Our ufrag is unique per peer connection, so it names the connection. Everything is
//! bounds-checked; a malformed packet yields `None` and is dropped.

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const BINDING_REQUEST: u16 = 0x0001;
const ATTR_USERNAME: u16 = 0x0006;
/// RFC 8489 limits USERNAME to 513 bytes.
const MAX_USERNAME: usize = 513;

/// The USERNAME of a STUN Binding request, if `packet` is one.
pub fn stun_username(packet: &[u8]) -> Option<&str> {
    if packet.len() < 20 || packet[0] & 0xc0 != 0 || packet[4..8] != MAGIC_COOKIE {
        return None;
    }
    if u16::from_be_bytes([packet[0], packet[1]]) != BINDING_REQUEST {
        return None;
    }
    let body_len = u16::from_be_bytes([packet[2], packet[3]]) as usize;
    let body = packet.get(20..20 + body_len)?;
    let mut rest = body;
    while rest.len() >= 4 {
        let typ = u16::from_be_bytes([rest[0], rest[1]]);
        let len = u16::from_be_bytes([rest[2], rest[3]]) as usize;
        let value = rest.get(4..4 + len)?;
        if typ == ATTR_USERNAME {
            if len > MAX_USERNAME {
                return None;
            }
            return std::str::from_utf8(value).ok();
        }
        let padded = (len + 3) & !3;
        rest = rest.get(4 + padded..)?;
    }
    None
}

/// A STUN binding request naming `username` (tests of the demultiplexer).
#[cfg(test)]
pub(super) fn binding_request(username: &str) -> Vec<u8> {
    tests::binding(&[(ATTR_USERNAME, username.as_bytes())])
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn binding(attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (t, v) in attrs {
            body.extend_from_slice(&t.to_be_bytes());
            body.extend_from_slice(&(v.len() as u16).to_be_bytes());
            body.extend_from_slice(v);
            while body.len() % 4 != 0 {
                body.push(0);
            }
        }
        let mut p = vec![0x00, 0x01];
        p.extend_from_slice(&(body.len() as u16).to_be_bytes());
        p.extend_from_slice(&MAGIC_COOKIE);
        p.extend_from_slice(&[7; 12]);
        p.extend_from_slice(&body);
        p
    }

    #[test]
    fn finds_username_after_other_attributes() {
        let p = binding(&[(0x8022, b"soft"), (ATTR_USERNAME, b"srv1:cli")]);
        assert_eq!(stun_username(&p), Some("srv1:cli"));
    }

    #[test]
    fn rejects_what_is_not_a_binding_request() {
        assert_eq!(stun_username(&[]), None);
        let mut p = binding(&[(ATTR_USERNAME, b"a:b")]);
        p[1] = 0x01;
        p[0] = 0x01; // a success response
        assert_eq!(stun_username(&p), None);
        let mut rtp = binding(&[(ATTR_USERNAME, b"a:b")]);
        rtp[0] = 0x80;
        assert_eq!(stun_username(&rtp), None);
    }

    #[test]
    fn truncations_never_panic() {
        let p = binding(&[(0x8022, b"soft"), (ATTR_USERNAME, b"srv1:cli")]);
        for cut in 0..p.len() {
            let _ = stun_username(&p[..cut]);
        }
        let mut lying = p.clone();
        lying[3] = 0xff; // body length past the end
        assert_eq!(stun_username(&lying), None);
    }
}
