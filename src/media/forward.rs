//! Per-subscriber rewriting of forwarded RTP.
//!
//! Each downtrack has its own SSRC, and sequence numbers and timestamps that start at a
//! random base and stay continuous, whatever the publisher's numbering. Header
//! extensions are dropped: their ids were negotiated on the publisher's leg, not on the
//! subscriber's, and a wrong id is worse than none.

use rtc::rtp::Packet;
use weir_signaling::Kind;

pub fn kind_label(kind: Kind) -> &'static str {
    match kind {
        Kind::Audio => "audio",
        Kind::Video => "video",
    }
}

/// Maps a publisher's numbering onto one subscriber's.
pub struct Rewriter {
    ssrc: u32,
    /// (sequence offset, timestamp offset), fixed by the first packet.
    offsets: Option<(u16, u32)>,
    seq_base: u16,
    ts_base: u32,
}

impl Rewriter {
    pub fn new(ssrc: u32) -> Self {
        Self {
            ssrc,
            offsets: None,
            seq_base: rand::random(),
            ts_base: rand::random(),
        }
    }

    pub fn rewrite(&mut self, packet: &Packet, payload_type: u8) -> Packet {
        let (seq_off, ts_off) = *self.offsets.get_or_insert((
            self.seq_base.wrapping_sub(packet.header.sequence_number),
            self.ts_base.wrapping_sub(packet.header.timestamp),
        ));
        let mut out = packet.clone();
        out.header.ssrc = self.ssrc;
        out.header.payload_type = payload_type;
        out.header.sequence_number = packet.header.sequence_number.wrapping_add(seq_off);
        out.header.timestamp = packet.header.timestamp.wrapping_add(ts_off);
        out.header.extension = false;
        out.header.extension_profile = 0;
        out.header.extensions.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(seq: u16, ts: u32) -> Packet {
        let mut p = Packet::default();
        p.header.sequence_number = seq;
        p.header.timestamp = ts;
        p.header.ssrc = 1;
        p.header.payload_type = 96;
        p.payload = bytes::Bytes::from_static(b"abc");
        p
    }

    #[test]
    fn numbering_is_shifted_consistently_across_wraparound() {
        let mut r = Rewriter::new(42);
        let a = r.rewrite(&pkt(65_534, u32::MAX - 10), 102);
        let b = r.rewrite(&pkt(65_535, u32::MAX), 102);
        let c = r.rewrite(&pkt(1, 20), 102); // 0 was lost
        assert_eq!(a.header.ssrc, 42);
        assert_eq!(a.header.payload_type, 102);
        assert_eq!(
            b.header.sequence_number,
            a.header.sequence_number.wrapping_add(1)
        );
        assert_eq!(
            c.header.sequence_number,
            a.header.sequence_number.wrapping_add(3)
        );
        assert_eq!(c.header.timestamp, a.header.timestamp.wrapping_add(31));
        assert_eq!(c.payload, pkt(0, 0).payload);
    }
}
