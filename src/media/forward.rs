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
    /// (sequence offset, timestamp offset), fixed by the first packet of a source.
    offsets: Option<(u16, u32)>,
    seq_base: u16,
    ts_base: u32,
    /// The publisher SSRC the offsets belong to.
    source: Option<u32>,
    last_out: Option<(u16, u32)>,
    /// Sent counts, for this downtrack's sender reports.
    pub packets: u32,
    pub octets: u32,
}

impl Rewriter {
    pub fn new(ssrc: u32) -> Self {
        Self {
            ssrc,
            offsets: None,
            seq_base: rand::random(),
            ts_base: rand::random(),
            source: None,
            last_out: None,
            packets: 0,
            octets: 0,
        }
    }

    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// A publisher RTP timestamp in this downtrack's timestamp space (for sender
    /// reports), once the first packet fixed the offset.
    pub fn translate_timestamp(&self, source_ssrc: u32, ts: u32) -> Option<u32> {
        match (self.source, self.offsets) {
            (Some(src), Some((_, ts_off))) if src == source_ssrc => Some(ts.wrapping_add(ts_off)),
            _ => None,
        }
    }

    pub fn rewrite(&mut self, packet: &Packet, payload_type: u8) -> Packet {
        if self.source != Some(packet.header.ssrc) {
            // A new source (the publisher restarted its stream): continue our numbering
            // right after what the subscriber last saw, one frame later.
            if let Some((seq, ts)) = self.last_out {
                self.seq_base = seq.wrapping_add(1);
                self.ts_base = ts.wrapping_add(3000);
            }
            self.source = Some(packet.header.ssrc);
            self.offsets = None;
        }
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
        self.last_out = Some((out.header.sequence_number, out.header.timestamp));
        self.packets = self.packets.wrapping_add(1);
        self.octets = self.octets.wrapping_add(out.payload.len() as u32);
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
        assert_eq!(r.translate_timestamp(1, 20), Some(c.header.timestamp));
        assert_eq!(r.translate_timestamp(2, 20), None);
    }

    #[test]
    fn a_new_source_continues_the_numbering() {
        let mut r = Rewriter::new(42);
        let a = r.rewrite(&pkt(100, 5000), 96);
        let mut other = pkt(7, 123);
        other.header.ssrc = 9;
        let b = r.rewrite(&other, 96);
        assert_eq!(
            b.header.sequence_number,
            a.header.sequence_number.wrapping_add(1)
        );
        assert_eq!(b.header.timestamp, a.header.timestamp.wrapping_add(3000));
        assert_eq!((r.packets, r.octets), (2, 6));
    }
}
