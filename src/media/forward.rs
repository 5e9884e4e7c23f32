//! Per-subscriber rewriting of forwarded RTP.
//!
//! Each downtrack has its own SSRC, and sequence numbers and timestamps that start at a
//! random base and stay continuous, whatever the publisher's numbering. Header
//! extensions are dropped: their ids were negotiated on the publisher's leg, not on the
//! subscriber's, and a wrong id is worse than none.

use rtc::rtp::Packet;
use rtc::rtp_transceiver::rtp_sender::RTCRtpCodec;
use weir_signaling::Kind;

pub fn kind_label(kind: Kind) -> &'static str {
    match kind {
        Kind::Audio => "audio",
        Kind::Video => "video",
    }
}

/// Whether a subscriber that negotiated `offered` can decode what a publisher sends as
/// `sent`: same codec, and for H.264 the same packetization mode and the same profile
/// (levels may differ: decoders accept lower levels, and `level-asymmetry-allowed` is
/// what browsers offer). A wrong H.264 profile decodes as a black picture, so it is
/// refused, not forwarded.
pub fn codec_compatible(sent: &RTCRtpCodec, offered: &RTCRtpCodec) -> bool {
    if !sent.mime_type.eq_ignore_ascii_case(&offered.mime_type) {
        return false;
    }
    if !sent.mime_type.eq_ignore_ascii_case("video/H264") {
        return true;
    }
    let (a, b) = (
        H264Fmtp::parse(&sent.sdp_fmtp_line),
        H264Fmtp::parse(&offered.sdp_fmtp_line),
    );
    a.packetization_mode == b.packetization_mode && a.profile() == b.profile()
}

/// The parts of an H.264 fmtp line that decide compatibility.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct H264Fmtp {
    packetization_mode: u8,
    /// profile_idc and profile_iop (the first two bytes of profile-level-id).
    profile_idc: u8,
    profile_iop: u8,
}

/// H.264 profiles as RFC 6184 / libwebrtc distinguish them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum H264Profile {
    ConstrainedBaseline,
    Baseline,
    Main,
    ConstrainedHigh,
    High,
    Other(u8, u8),
}

impl H264Fmtp {
    fn parse(fmtp: &str) -> Self {
        let mut out = Self {
            packetization_mode: 0,
            // RFC 6184: an absent profile-level-id means 42000A (Baseline, level 1).
            profile_idc: 0x42,
            profile_iop: 0x00,
        };
        for part in fmtp.split(';') {
            let Some((k, v)) = part.trim().split_once('=') else {
                continue;
            };
            match k.trim().to_ascii_lowercase().as_str() {
                "packetization-mode" => out.packetization_mode = v.trim().parse().unwrap_or(0),
                "profile-level-id" => {
                    // Decoded as bytes: the peer's text need not be ASCII, and a
                    // slice by byte position would split a character.
                    let mut id = [0u8; 3];
                    if hex::decode_to_slice(v.trim(), &mut id).is_ok() {
                        out.profile_idc = id[0];
                        out.profile_iop = id[1];
                    }
                }
                _ => {}
            }
        }
        out
    }

    fn profile(&self) -> H264Profile {
        let constraint_set1 = self.profile_iop & 0x40 != 0;
        let constraint_set3 = self.profile_iop & 0x10 != 0;
        match self.profile_idc {
            // Baseline with constraint_set1 (or Main/Extended with it) is Constrained Baseline.
            0x42 | 0x4d | 0x58 if constraint_set1 => H264Profile::ConstrainedBaseline,
            0x42 => H264Profile::Baseline,
            0x4d => H264Profile::Main,
            0x64 if constraint_set3 && self.profile_iop & 0x0c == 0x0c => {
                H264Profile::ConstrainedHigh
            }
            0x64 => H264Profile::High,
            idc => H264Profile::Other(idc, self.profile_iop),
        }
    }
}

/// Whether an RTP payload starts a keyframe: `Some` for H.264 (an IDR or SPS at the
/// start of a NAL, single, STAP-A or FU-A) and VP8 (the first partition of a key
/// frame); `None` for codecs Weir cannot tell (their decoders wait for one anyway).
/// Malformed payloads are not keyframes.
pub fn starts_keyframe(mime: &str, payload: &[u8]) -> Option<bool> {
    if mime.eq_ignore_ascii_case("video/H264") {
        let Some(&first) = payload.first() else {
            return Some(false);
        };
        let key = |t: u8| t == 5 || t == 7;
        return Some(match first & 0x1f {
            24 => stap_a_nals(payload).any(|nal| key(nal[0] & 0x1f)),
            28 => payload
                .get(1)
                .is_some_and(|h| h & 0x80 != 0 && key(h & 0x1f)),
            t => key(t),
        });
    }
    if mime.eq_ignore_ascii_case("video/VP8") {
        return Some(
            vp8_frame_start(payload)
                .and_then(|i| payload.get(i))
                .is_some_and(|h| h & 0x01 == 0),
        );
    }
    None
}

/// Where the VP8 frame starts in an RTP payload that carries the start of partition
/// 0 (RFC 7741 4.2: S set, PID 0), past the payload descriptor; `None` otherwise.
fn vp8_frame_start(payload: &[u8]) -> Option<usize> {
    let b0 = *payload.first()?;
    if b0 & 0x10 == 0 || b0 & 0x07 != 0 {
        return None;
    }
    let mut i = 1;
    if b0 & 0x80 != 0 {
        let x = *payload.get(1)?;
        i = 2;
        if x & 0x80 != 0 {
            i += if payload.get(i)? & 0x80 != 0 { 2 } else { 1 };
        }
        if x & 0x40 != 0 {
            i += 1;
        }
        if x & 0x30 != 0 {
            i += 1;
        }
    }
    (i < payload.len()).then_some(i)
}

/// Whether an H.264 RTP payload carries a sequence parameter set (alone or in a
/// STAP-A): where a keyframe really starts, since an IDR needs the SPS and PPS sent
/// before it.
pub fn carries_sps(payload: &[u8]) -> bool {
    match payload.first().map(|b| b & 0x1f) {
        Some(7) => true,
        Some(24) => stap_a_nals(payload).any(|nal| nal[0] & 0x1f == 7),
        _ => false,
    }
}

/// An H.264 packet at `seq` that starts an IDR right after the parameter sets sent
/// at `params_seq` (within 3 packets) is not a place to start forwarding: whoever
/// starts there misses the SPS and PPS, and a decoder keeps the last picture size it
/// knew (measured: a subscriber moved from the 960 px layer to the 480 px one at such
/// an IDR decoded "960 px" frames until the end).
pub fn idr_after_its_parameter_sets(params_seq: Option<u16>, seq: u16, payload: &[u8]) -> bool {
    params_seq.is_some_and(|p| (1..=3).contains(&seq.wrapping_sub(p)))
        && !carries_sps(payload)
        && starts_keyframe("video/H264", payload) == Some(true)
}

/// The NAL units of an H.264 STAP-A payload (RFC 6184 5.7.1), up to the first that
/// is empty or runs past the end.
fn stap_a_nals(payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = payload.get(1..).unwrap_or_default();
    std::iter::from_fn(move || {
        let size = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
        let nal = rest.get(2..2 + size).filter(|n| !n.is_empty())?;
        rest = &rest[2 + size..];
        Some(nal)
    })
}

/// The picture size a keyframe declares, from the RTP payload that starts it: the
/// SPS of an H.264 keyframe (a single NAL or in a STAP-A), the key frame header of
/// VP8 (RFC 6386 9.1). `None` for anything else, malformed payloads included.
pub fn keyframe_dimensions(mime: &str, payload: &[u8]) -> Option<(u32, u32)> {
    if mime.eq_ignore_ascii_case("video/H264") {
        let first = *payload.first()?;
        return match first & 0x1f {
            7 => crate::codec::h264::sps_dimensions(payload).ok(),
            24 => stap_a_nals(payload)
                .find(|nal| nal[0] & 0x1f == 7)
                .and_then(|sps| crate::codec::h264::sps_dimensions(sps).ok()),
            _ => None,
        };
    }
    if mime.eq_ignore_ascii_case("video/VP8") {
        let f = payload.get(vp8_frame_start(payload)?..)?;
        // Frame tag (3 bytes, P bit clear for a key frame), start code, sizes.
        if f.len() < 10 || f[0] & 0x01 != 0 || f[3..6] != [0x9d, 0x01, 0x2a] {
            return None;
        }
        let width = u32::from(u16::from_le_bytes([f[6], f[7]]) & 0x3fff);
        let height = u32::from(u16::from_le_bytes([f[8], f[9]]) & 0x3fff);
        return (width > 0 && height > 0).then_some((width, height));
    }
    None
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
    /// The newest publisher sequence number forwarded from `source`, and whether it
    /// ended a frame (the marker bit): where padding may go mid-stream.
    newest_in: Option<(u16, bool)>,
    /// Padding went out after this publisher packet: older ones arriving late would
    /// take the padding's numbers, so they are dropped.
    padded_after: Option<u16>,
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
            newest_in: None,
            padded_after: None,
            packets: 0,
            octets: 0,
        }
    }

    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// The sequence number of the last packet sent, if any.
    pub fn last_sequence(&self) -> Option<u16> {
        self.last_out.map(|(seq, _)| seq)
    }

    /// A publisher RTP timestamp in this downtrack's timestamp space (for sender
    /// reports), once the first packet fixed the offset.
    pub fn translate_timestamp(&self, source_ssrc: u32, ts: u32) -> Option<u32> {
        match (self.source, self.offsets) {
            (Some(src), Some((_, ts_off))) if src == source_ssrc => Some(ts.wrapping_add(ts_off)),
            _ => None,
        }
    }

    /// The publisher's packets stop reaching this downtrack for a while (paused):
    /// the next one continues our numbering without a gap, as after a restart, so the
    /// subscriber does not ask for everything it was not sent.
    pub fn interrupt(&mut self) {
        self.source = None;
    }

    /// A padding-only packet (RFC 3550 §5.1: the P bit, no payload) after the last one
    /// sent, carrying `stuffing` bytes of RFC 8285 header-extension padding: Weir's
    /// bandwidth probes. Receivers count it for congestion feedback and drop it. On an
    /// interrupted (paused) downtrack the numbering continues after it when media
    /// comes back; on a playing one, padding goes only between frames and the media
    /// after it is numbered past it (`None` mid-frame: a lowered video probes for its
    /// next layer without splitting a frame).
    pub fn padding(&mut self, payload_type: u8, stuffing: usize) -> Option<Packet> {
        let (seq, ts) = self.last_out?;
        if self.source.is_some() {
            let (newest, frame_end) = self.newest_in?;
            let (seq_off, _) = self.offsets.as_mut()?;
            if !frame_end {
                return None;
            }
            *seq_off = seq_off.wrapping_add(1);
            self.padded_after = Some(newest);
        }
        let mut out = Packet::default();
        out.header.version = 2;
        out.header.padding = true;
        out.header.ssrc = self.ssrc;
        out.header.payload_type = payload_type;
        out.header.sequence_number = seq.wrapping_add(1);
        out.header.timestamp = ts;
        // One-byte-form elements with id 0: RFC 8285 §4.2 padding (libwebrtc skips
        // them byte by byte); the TWCC sequence number is added after them.
        out.header.extension = true;
        out.header.extension_profile = rtc::rtp::header::EXTENSION_PROFILE_ONE_BYTE;
        let elements = stuffing.div_ceil(17).clamp(1, 64);
        out.header.extensions = (0..elements)
            .map(|_| rtc::rtp::header::Extension {
                id: 0,
                payload: bytes::Bytes::from_static(&[0u8; 16]),
            })
            .collect();
        self.last_out = Some((out.header.sequence_number, ts));
        Some(out)
    }

    /// The packet in this downtrack's numbering; `None` for one that arrived after
    /// padding was sent past it (see `padding`).
    pub fn rewrite(&mut self, packet: &Packet, payload_type: u8) -> Option<Packet> {
        let seq = packet.header.sequence_number;
        let newer = |a: u16, b: u16| (a.wrapping_sub(b) as i16) > 0;
        if self.source == Some(packet.header.ssrc)
            && self.padded_after.is_some_and(|p| !newer(seq, p))
        {
            return None;
        }
        if self.source != Some(packet.header.ssrc) {
            // A new source (the publisher restarted its stream): continue our numbering
            // right after what the subscriber last saw, one frame later.
            if let Some((seq, ts)) = self.last_out {
                self.seq_base = seq.wrapping_add(1);
                self.ts_base = ts.wrapping_add(3000);
            }
            self.source = Some(packet.header.ssrc);
            self.offsets = None;
            self.newest_in = None;
            self.padded_after = None;
        }
        if self.newest_in.is_none_or(|(n, _)| newer(seq, n)) {
            self.newest_in = Some((seq, packet.header.marker));
        }
        let (seq_off, ts_off) = *self.offsets.get_or_insert((
            self.seq_base.wrapping_sub(packet.header.sequence_number),
            self.ts_base.wrapping_sub(packet.header.timestamp),
        ));
        // The publisher's extensions are not copied (not even cloned to be cleared),
        // nor their parsed padding: left behind, it makes the header's computed size
        // disagree with what it marshals once the send side adds the TWCC number, and
        // rtc's SRTP layer then drops the packet ("marshal_to output size 23, but
        // expect 27").
        let h = &packet.header;
        let out = Packet {
            header: rtc::rtp::header::Header {
                version: h.version,
                padding: h.padding,
                marker: h.marker,
                payload_type,
                sequence_number: h.sequence_number.wrapping_add(seq_off),
                timestamp: h.timestamp.wrapping_add(ts_off),
                ssrc: self.ssrc,
                csrc: h.csrc.clone(),
                ..Default::default()
            },
            payload: packet.payload.clone(),
        };
        self.last_out = Some((out.header.sequence_number, out.header.timestamp));
        self.packets = self.packets.wrapping_add(1);
        self.octets = self.octets.wrapping_add(out.payload.len() as u32);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewritten_packet_marshals_to_its_size_after_an_extension_is_added() {
        use rtc::shared::marshal::{Marshal, MarshalSize, Unmarshal};
        // A browser's packet: one-byte extensions with padding after them.
        let mut p = pkt(7, 9);
        p.header
            .set_extension(1, bytes::Bytes::from_static(&[1]))
            .unwrap();
        p.header
            .set_extension(3, bytes::Bytes::from_static(&[1, 2, 3]))
            .unwrap();
        let parsed = Packet::unmarshal(&mut p.marshal().unwrap()).unwrap();
        assert!(parsed.header.extensions_padding > 0);
        let mut out = Rewriter::new(1).rewrite(&parsed, 96).unwrap();
        // What the TWCC sender does on the way out.
        out.header
            .set_extension(4, bytes::Bytes::from_static(&[0, 1]))
            .unwrap();
        assert_eq!(out.marshal().unwrap().len(), out.marshal_size());
    }

    /// A peer's fmtp is any text: `€abc` is six bytes, and slicing it by byte position
    /// panicked the media task (and with it every room of the node).
    #[test]
    fn any_h264_fmtp_text_is_parsed_without_panicking() {
        let codec = |fmtp: &str| RTCRtpCodec {
            mime_type: "video/H264".into(),
            clock_rate: 90000,
            channels: 0,
            sdp_fmtp_line: fmtp.into(),
            rtcp_feedback: vec![],
        };
        let good = codec("packetization-mode=1;profile-level-id=42e01f");
        for bad in [
            "profile-level-id=€abc",
            "profile-level-id=4€e01",
            "profile-level-id=é42e0",
            "packetization-mode=1;profile-level-id=42e01f€",
            "profile-level-id=zzzzzz",
            "profile-level-id=;;=;packetization-mode==",
        ] {
            // Unreadable means the default (Baseline), not a match with the good one.
            let _ = codec_compatible(&codec(bad), &good);
            let _ = codec_compatible(&good, &codec(bad));
        }
        assert!(codec_compatible(
            &good,
            &codec("profile-level-id=42E01F;packetization-mode=1")
        ));
        assert!(!codec_compatible(
            &good,
            &codec("packetization-mode=1;profile-level-id=€abc")
        ));
    }

    #[test]
    fn keyframes_are_recognized_in_h264_and_vp8_payloads() {
        let h = "video/H264";
        assert_eq!(starts_keyframe(h, &[0x65, 1, 2]), Some(true)); // IDR
        assert_eq!(starts_keyframe(h, &[0x41, 1, 2]), Some(false)); // non-IDR slice
                                                                    // STAP-A with SPS and PPS.
        assert_eq!(
            starts_keyframe(h, &[0x78, 0, 2, 0x67, 1, 0, 1, 0x68]),
            Some(true)
        );
        assert_eq!(starts_keyframe(h, &[0x78, 0, 9, 0x67]), Some(false)); // truncated
        assert_eq!(starts_keyframe(h, &[0x7c, 0x85, 1]), Some(true)); // FU-A start of IDR
        assert_eq!(starts_keyframe(h, &[0x7c, 0x05, 1]), Some(false)); // FU-A middle
        assert_eq!(starts_keyframe(h, &[]), Some(false));
        let v = "video/VP8";
        assert_eq!(starts_keyframe(v, &[0x10, 0x00]), Some(true));
        assert_eq!(starts_keyframe(v, &[0x10, 0x01]), Some(false));
        // X, I with a 15-bit picture id, then the VP8 header.
        assert_eq!(
            starts_keyframe(v, &[0x90, 0x80, 0x81, 0x02, 0x00]),
            Some(true)
        );
        assert_eq!(starts_keyframe(v, &[0x00, 0x00]), Some(false)); // not a partition start
        assert_eq!(starts_keyframe("video/AV1", &[1, 2]), None);
    }

    #[test]
    fn an_idr_right_after_its_parameter_sets_is_not_a_start() {
        let stap = [0x78, 0, 2, 0x67, 1, 0, 1, 0x68];
        let idr_start = [0x7c, 0x85, 1];
        assert!(carries_sps(&stap));
        assert!(carries_sps(&[0x67, 1]));
        assert!(!carries_sps(&idr_start));
        assert!(!carries_sps(&[]));
        assert!(idr_after_its_parameter_sets(Some(100), 101, &idr_start));
        assert!(
            idr_after_its_parameter_sets(Some(65_535), 1, &idr_start),
            "wraps"
        );
        assert!(
            !idr_after_its_parameter_sets(Some(100), 140, &idr_start),
            "its own start"
        );
        assert!(
            !idr_after_its_parameter_sets(None, 101, &idr_start),
            "none were sent"
        );
        assert!(!idr_after_its_parameter_sets(Some(100), 101, &stap));
        assert!(
            !idr_after_its_parameter_sets(Some(100), 101, &[0x7c, 0x05, 1]),
            "not a start"
        );
    }

    #[test]
    fn keyframes_tell_their_picture_size() {
        let v = "video/VP8";
        // Descriptor, key frame tag, start code, 640 (scale bits set) x 480.
        let key = [
            0x10, 0x50, 0x42, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0xc2, 0xe0, 0x01, 0x00,
        ];
        assert_eq!(keyframe_dimensions(v, &key), Some((640, 480)));
        let mut inter = key;
        inter[1] |= 1;
        assert_eq!(keyframe_dimensions(v, &inter), None, "an inter frame");
        assert_eq!(keyframe_dimensions(v, &key[..9]), None, "truncated");
        let mut no_start = key;
        no_start[5] = 0;
        assert_eq!(keyframe_dimensions(v, &no_start), None, "no start code");
        let h = "video/H264";
        // High, 640x360, as x264 writes it.
        let sps = [
            0x67, 0x64, 0x00, 0x16, 0xac, 0xd9, 0x40, 0xa0, 0x2f, 0xf9, 0x70, 0x11, 0x00, 0x00,
            0x03, 0x00, 0x01, 0x00, 0x00, 0x03, 0x00, 0x14, 0x0f, 0x16, 0x2d, 0x96,
        ];
        assert_eq!(keyframe_dimensions(h, &sps), Some((640, 360)));
        let mut stap = vec![0x78, 0, 2, 0x09, 0xf0, 0, sps.len() as u8];
        stap.extend_from_slice(&sps);
        stap.extend_from_slice(&[0, 4, 0x68, 0xce, 0x3c, 0x80]);
        assert_eq!(keyframe_dimensions(h, &stap), Some((640, 360)));
        assert_eq!(keyframe_dimensions(h, &stap[..20]), None, "truncated");
        assert_eq!(
            keyframe_dimensions(h, &[0x65, 1, 2]),
            None,
            "an IDR without SPS"
        );
        assert_eq!(keyframe_dimensions("video/AV1", &sps), None);
    }

    #[test]
    fn an_interrupted_downtrack_continues_without_a_gap_and_pads_after_its_last_packet() {
        let mut r = Rewriter::new(7);
        let a = r.rewrite(&pkt(100, 1000), 96).unwrap();
        r.interrupt();
        let pad = r.padding(96, 1000).unwrap();
        assert_follows(&pad, &a);
        assert!(pad.header.padding && pad.payload.is_empty());
        use rtc::shared::marshal::{Marshal, Unmarshal};
        let wire = pad.marshal().unwrap();
        assert!(wire.len() > 1000, "{} bytes", wire.len());
        let back = Packet::unmarshal(&mut wire.clone()).unwrap();
        assert!(back.payload.is_empty(), "padding only");
        // Publisher packets 101..150 were never sent: the next one follows the padding.
        let b = r.rewrite(&pkt(150, 90_000), 96).unwrap();
        assert_follows(&b, &pad);
    }

    #[test]
    fn a_playing_downtrack_pads_only_between_frames_and_numbers_on_past_it() {
        let mut r = Rewriter::new(7);
        let a = r.rewrite(&pkt(100, 1000), 96).unwrap();
        assert!(
            r.padding(96, 1000).is_none(),
            "not in the middle of a frame"
        );
        let mut end = pkt(101, 1000);
        end.header.marker = true;
        let b = r.rewrite(&end, 96).unwrap();
        assert_follows(&b, &a);
        let p1 = r.padding(96, 1000).unwrap();
        let p2 = r.padding(96, 1000).unwrap();
        assert_follows(&p1, &b);
        assert_follows(&p2, &p1);
        assert_eq!(
            p2.header.timestamp, b.header.timestamp,
            "the last frame's time"
        );
        // The next frame follows the padding, with its own timestamp offset kept.
        let c = r.rewrite(&pkt(102, 4000), 96).unwrap();
        assert_follows(&c, &p2);
        assert_eq!(c.header.timestamp.wrapping_sub(b.header.timestamp), 3000);
        // A packet from before the padding, arriving late, would take its number.
        assert!(r.rewrite(&pkt(99, 1000), 96).is_none());
        assert!(r.rewrite(&pkt(101, 1000), 96).is_none());
        let d = r.rewrite(&pkt(103, 4000), 96).unwrap();
        assert_follows(&d, &c);
    }

    /// `b` is numbered right after `a`.
    fn assert_follows(b: &Packet, a: &Packet) {
        assert_eq!(
            b.header.sequence_number,
            a.header.sequence_number.wrapping_add(1)
        );
    }

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
        let a = r.rewrite(&pkt(65_534, u32::MAX - 10), 102).unwrap();
        let b = r.rewrite(&pkt(65_535, u32::MAX), 102).unwrap();
        let c = r.rewrite(&pkt(1, 20), 102).unwrap(); // 0 was lost
        assert_eq!(a.header.ssrc, 42);
        assert_eq!(a.header.payload_type, 102);
        assert_follows(&b, &a);
        assert_eq!(
            c.header.sequence_number,
            a.header.sequence_number.wrapping_add(3)
        );
        assert_eq!(c.header.timestamp, a.header.timestamp.wrapping_add(31));
        assert_eq!(c.payload, pkt(0, 0).payload);
        assert_eq!(r.translate_timestamp(1, 20), Some(c.header.timestamp));
        assert_eq!(r.translate_timestamp(2, 20), None);
    }

    fn codec(mime: &str, fmtp: &str) -> RTCRtpCodec {
        RTCRtpCodec {
            mime_type: mime.into(),
            clock_rate: 90_000,
            channels: 0,
            sdp_fmtp_line: fmtp.into(),
            rtcp_feedback: vec![],
        }
    }

    #[test]
    fn h264_profiles_must_match_levels_need_not() {
        let cb31 = codec(
            "video/H264",
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
        );
        let cb40 = codec("video/H264", "profile-level-id=42e028;packetization-mode=1");
        let cb_via_main = codec("video/H264", "packetization-mode=1;profile-level-id=4de01f");
        let baseline = codec("video/H264", "packetization-mode=1;profile-level-id=42001f");
        let cb_pm0 = codec("video/H264", "packetization-mode=0;profile-level-id=42e01f");
        let high = codec("video/H264", "packetization-mode=1;profile-level-id=640032");
        let high444 = codec("video/H264", "packetization-mode=1;profile-level-id=f4001e");
        assert!(codec_compatible(&cb31, &cb40));
        assert!(codec_compatible(&cb31, &cb_via_main));
        assert!(!codec_compatible(&cb31, &baseline));
        assert!(!codec_compatible(&cb31, &cb_pm0));
        assert!(!codec_compatible(&high, &cb31));
        assert!(!codec_compatible(&high444, &high));
        assert!(codec_compatible(&high, &high));
        assert!(!codec_compatible(&cb31, &codec("video/VP8", "")));
        assert!(codec_compatible(
            &codec("video/VP8", ""),
            &codec("video/vp8", "x")
        ));
        // garbage fmtp never panics, and reads as the RFC default
        assert!(codec_compatible(
            &codec("video/H264", "profile-level-id=zz;;="),
            &codec("video/H264", "")
        ));
    }

    #[test]
    fn a_new_source_continues_the_numbering() {
        let mut r = Rewriter::new(42);
        let a = r.rewrite(&pkt(100, 5000), 96).unwrap();
        let mut other = pkt(7, 123);
        other.header.ssrc = 9;
        let b = r.rewrite(&other, 96).unwrap();
        assert_follows(&b, &a);
        assert_eq!(b.header.timestamp, a.header.timestamp.wrapping_add(3000));
        assert_eq!((r.packets, r.octets), (2, 6));
    }
}
