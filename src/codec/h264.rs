//! H.264 pieces the bridge needs: the AVC decoder configuration record (SPS/PPS from
//! the FLV sequence header), length-prefixed NAL units, the slice type (to find
//! B-frames), browser decodability by profile, and RTP packetization (RFC 6184:
//! single NAL unit, STAP-A, FU-A).

use bytes::{BufMut, Bytes, BytesMut};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum H264Error {
    #[error("AVC configuration record: {0}")]
    Record(&'static str),
    #[error("NAL unit length {len} at byte {at} runs past the {total}-byte access unit")]
    NalOverrun { len: usize, at: usize, total: usize },
    #[error("slice header: {0}")]
    Slice(&'static str),
    #[error("sequence parameter set: {0}")]
    Sps(&'static str),
}

pub mod nal {
    pub const SLICE: u8 = 1;
    pub const IDR: u8 = 5;
    pub const SEI: u8 = 6;
    pub const SPS: u8 = 7;
    pub const PPS: u8 = 8;
    pub const AUD: u8 = 9;
    pub const END_SEQ: u8 = 10;
    pub const END_STREAM: u8 = 11;
    pub const FILLER: u8 = 12;
    pub const STAP_A: u8 = 24;
    pub const FU_A: u8 = 28;
}

pub fn nal_type(nal: &[u8]) -> u8 {
    nal.first().map_or(0, |b| b & 0x1f)
}

/// The parsed AVCDecoderConfigurationRecord.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AvcConfig {
    /// Bytes per NAL length prefix in the access units (1, 2 or 4).
    pub length_size: usize,
    pub sps: Vec<Bytes>,
    pub pps: Vec<Bytes>,
}

/// No real stream has more parameter sets than this.
const MAX_PARAMETER_SETS: usize = 32;

impl AvcConfig {
    pub fn parse(record: &Bytes) -> Result<Self, H264Error> {
        let r = &record[..];
        if r.len() < 6 {
            return Err(H264Error::Record("shorter than 6 bytes"));
        }
        if r[0] != 1 {
            return Err(H264Error::Record("configurationVersion is not 1"));
        }
        let length_size = usize::from(r[4] & 0x03) + 1;
        if length_size == 3 {
            return Err(H264Error::Record("NAL length size 3 is not allowed"));
        }
        let mut pos = 5;
        let take_sets = |count: usize, pos: &mut usize| -> Result<Vec<Bytes>, H264Error> {
            if count > MAX_PARAMETER_SETS {
                return Err(H264Error::Record("too many parameter sets"));
            }
            let mut sets = Vec::with_capacity(count);
            for _ in 0..count {
                let len = r
                    .get(*pos..*pos + 2)
                    .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
                    .ok_or(H264Error::Record("truncated parameter set length"))?;
                *pos += 2;
                if len == 0 || *pos + len > r.len() {
                    return Err(H264Error::Record("parameter set runs past the record"));
                }
                sets.push(record.slice(*pos..*pos + len));
                *pos += len;
            }
            Ok(sets)
        };
        let n_sps = usize::from(r[5] & 0x1f);
        pos += 1;
        let sps = take_sets(n_sps, &mut pos)?;
        let n_pps = usize::from(
            *r.get(pos)
                .ok_or(H264Error::Record("truncated before the PPS count"))?,
        );
        pos += 1;
        let pps = take_sets(n_pps, &mut pos)?;
        if sps.is_empty() || pps.is_empty() {
            return Err(H264Error::Record("no SPS or no PPS"));
        }
        if sps.iter().any(|s| nal_type(s) != nal::SPS)
            || pps.iter().any(|p| nal_type(p) != nal::PPS)
        {
            return Err(H264Error::Record("a parameter set has the wrong NAL type"));
        }
        if sps[0].len() < 4 {
            return Err(H264Error::Record("SPS shorter than 4 bytes"));
        }
        Ok(Self {
            length_size,
            sps,
            pps,
        })
    }

    /// profile_idc, constraint flags, level_idc from the first SPS.
    pub fn profile(&self) -> Profile {
        Profile::from_sps(&self.sps[0]).expect("checked in parse")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    pub profile_idc: u8,
    pub constraints: u8,
    pub level_idc: u8,
}

impl Profile {
    pub fn from_sps(sps: &[u8]) -> Option<Self> {
        Some(Self {
            profile_idc: *sps.get(1)?,
            constraints: *sps.get(2)?,
            level_idc: *sps.get(3)?,
        })
    }

    pub fn name(&self) -> &'static str {
        match self.profile_idc {
            66 if self.constraints & 0x40 != 0 => "Constrained Baseline",
            66 => "Baseline",
            77 => "Main",
            88 => "Extended",
            100 => "High",
            110 => "High 10",
            122 => "High 4:2:2",
            244 => "High 4:4:4 Predictive",
            44 => "CAVLC 4:4:4 Intra",
            _ => "unknown",
        }
    }

    /// Profiles every WebRTC browser decodes. High 10, 4:2:2 and 4:4:4 are not among
    /// them: forwarding those gives a black screen.
    pub fn browser_decodable(&self) -> bool {
        matches!(self.profile_idc, 66 | 77 | 100)
    }

    /// The SDP `profile-level-id` in its canonical form for the profile (what browsers
    /// offer: 42e0xx, 4200xx, 4d00xx, 6400xx), with the stream's level.
    pub fn sdp_profile_level_id(&self) -> String {
        let (idc, iop) = match self.profile_idc {
            66 if self.constraints & 0x40 != 0 => (0x42, 0xe0),
            66 => (0x42, 0x00),
            77 => (0x4d, 0x00),
            100 => (0x64, 0x00),
            other => (other, self.constraints),
        };
        format!("{idc:02x}{iop:02x}{:02x}", self.level_idc)
    }
}

/// Splits a length-prefixed access unit into NAL units.
pub fn split_nalus(au: &Bytes, length_size: usize) -> Result<Vec<Bytes>, H264Error> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < au.len() {
        if pos + length_size > au.len() {
            return Err(H264Error::NalOverrun {
                len: length_size,
                at: pos,
                total: au.len(),
            });
        }
        let mut len = 0usize;
        for b in &au[pos..pos + length_size] {
            len = (len << 8) | usize::from(*b);
        }
        pos += length_size;
        if len > au.len() - pos {
            return Err(H264Error::NalOverrun {
                len,
                at: pos,
                total: au.len(),
            });
        }
        if len > 0 {
            out.push(au.slice(pos..pos + len));
        }
        pos += len;
    }
    Ok(out)
}

/// Exp-Golomb reader over a NAL payload with emulation-prevention bytes removed.
struct Bits {
    data: Vec<u8>,
    pos: usize,
}

impl Bits {
    fn new(rbsp_prefix: &[u8]) -> Self {
        let mut data = Vec::with_capacity(rbsp_prefix.len());
        let mut zeros = 0;
        for &b in rbsp_prefix {
            if zeros >= 2 && b == 3 {
                zeros = 0;
                continue;
            }
            zeros = if b == 0 { zeros + 1 } else { 0 };
            data.push(b);
        }
        Self { data, pos: 0 }
    }
    fn bit(&mut self) -> Option<u32> {
        let byte = *self.data.get(self.pos / 8)?;
        let b = (byte >> (7 - self.pos % 8)) & 1;
        self.pos += 1;
        Some(u32::from(b))
    }
    fn ue(&mut self) -> Option<u32> {
        let mut zeros = 0;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return None;
            }
        }
        let mut v = 0u32;
        for _ in 0..zeros {
            v = (v << 1) | self.bit()?;
        }
        Some((1u32 << zeros) - 1 + v)
    }
}

/// The picture size a sequence parameter set (a whole type-7 NAL, header byte
/// first) declares, in pixels, after cropping (ITU-T H.264 7.3.2.1.1), read with the
/// `h264-reader` crate. (Until 2026-12 Weir parsed the SPS itself; h264-reader 0.9 gave
/// the same sizes on every test SPS and took 2,000,000 mutated ones in 1 s with no
/// panic, so the well-kept crate does it now. The `codec_configs` fuzz target covers it.)
pub fn sps_dimensions(sps: &[u8]) -> Result<(u32, u32), H264Error> {
    use h264_reader::nal::sps::SeqParameterSet;
    use h264_reader::rbsp::BitReader;
    const E: fn(&'static str) -> H264Error = H264Error::Sps;
    if nal_type(sps) != nal::SPS || sps.len() < 4 {
        return Err(E("not a sequence parameter set"));
    }
    // An SPS is a few dozen bytes; more is not one (and bounds the copy).
    if sps.len() > 512 {
        return Err(E("longer than 512 bytes"));
    }
    let rbsp = h264_reader::rbsp::decode_nal(sps).map_err(|_| E("not a NAL unit"))?;
    let parsed =
        SeqParameterSet::from_bits(BitReader::new(&rbsp[..])).map_err(|_| E("does not parse"))?;
    let (w, h) = parsed
        .pixel_dimensions()
        .map_err(|_| E("cropped to nothing or too large"))?;
    // Level 6.2 allows 139 264 macroblocks a frame; past 16384 a side is not a picture.
    if w == 0 || h == 0 || w > 16384 || h > 16384 {
        return Err(E("picture larger than 16384 pixels a side, or empty"));
    }
    Ok((w, h))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceKind {
    P,
    B,
    I,
    Sp,
    Si,
}

/// The slice type of a coded slice NAL (types 1 and 5).
pub fn slice_kind(nal: &[u8]) -> Result<SliceKind, H264Error> {
    if !matches!(nal_type(nal), nal::SLICE | nal::IDR) {
        return Err(H264Error::Slice("not a coded slice"));
    }
    let mut bits = Bits::new(&nal[1..nal.len().min(24)]);
    let _first_mb = bits.ue().ok_or(H264Error::Slice("truncated"))?;
    let t = bits.ue().ok_or(H264Error::Slice("truncated"))?;
    Ok(match t % 5 {
        0 => SliceKind::P,
        1 => SliceKind::B,
        2 => SliceKind::I,
        3 => SliceKind::Sp,
        _ => SliceKind::Si,
    })
}

/// nal_ref_idc: zero means nothing references this picture (it may be dropped).
pub fn nal_ref_idc(nal: &[u8]) -> u8 {
    nal.first().map_or(0, |b| (b >> 5) & 0x03)
}

/// RFC 6184 packetization of one access unit into RTP payloads, in order; the last
/// payload carries the frame's end (the caller sets the marker bit on it).
///
/// Why not webrtc-rs's `H264Payloader` (measured 2026-12-05, `cargo bench --bench
/// h264_rtp`, BENCHMARKS.md): it takes an Annex B stream, so the bridge would first copy
/// each access unit out of FLV's length-prefixed form, and it then scans for start
/// codes; on a real x264 stream it took 39 µs per 60 frames (49 µs with that copy)
/// where this takes 2.1 µs, handing out slices of the access unit (FU-A fragments
/// carry their 2-byte header). Fuzzed in `codec_configs`.
pub fn packetize(nalus: &[Bytes], max_payload: usize, out: &mut Vec<Bytes>) {
    for nal in nalus {
        if nal.len() <= max_payload {
            out.push(nal.clone());
            continue;
        }
        let header = nal[0];
        let indicator = (header & 0xe0) | nal::FU_A;
        let kind = header & 0x1f;
        let body = &nal[1..];
        let chunk = max_payload - 2;
        let n = body.len().div_ceil(chunk);
        for (i, piece) in body.chunks(chunk).enumerate() {
            let mut p = BytesMut::with_capacity(piece.len() + 2);
            p.put_u8(indicator);
            let mut fu = kind;
            if i == 0 {
                fu |= 0x80;
            }
            if i + 1 == n {
                fu |= 0x40;
            }
            p.put_u8(fu);
            p.extend_from_slice(piece);
            out.push(p.freeze());
        }
    }
}

/// One STAP-A with the given NAL units, if it fits.
pub fn stap_a(nalus: &[Bytes], max_payload: usize) -> Option<Bytes> {
    let size = 1 + nalus.iter().map(|n| 2 + n.len()).sum::<usize>();
    if size > max_payload || nalus.is_empty() {
        return None;
    }
    let nri = nalus.iter().map(|n| n[0] & 0x60).max().unwrap_or(0);
    let mut p = BytesMut::with_capacity(size);
    p.put_u8(nri | nal::STAP_A);
    for n in nalus {
        p.put_u16(n.len() as u16);
        p.extend_from_slice(n);
    }
    Some(p.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Constrained Baseline 3.0 SPS and a PPS as x264 writes them.
    const SPS: &[u8] = &[0x67, 0x42, 0xc0, 0x1e, 0xd9, 0x00, 0xa0, 0x47, 0xfe, 0xc8];
    const PPS: &[u8] = &[0x68, 0xce, 0x3c, 0x80];

    /// Sequence parameter sets x264 wrote (`ffmpeg -f lavfi -i testsrc=size=WxH -c:v
    /// libx264 -profile:v P -pix_fmt F -f h264`), with the size they were made at.
    #[test]
    fn sps_dimensions_of_real_encoders() {
        let cases: &[(&[u8], (u32, u32))] = &[
            (
                // High, 640x360: 23 macroblock rows, cropped by 8.
                &[
                    0x67, 0x64, 0x00, 0x16, 0xac, 0xd9, 0x40, 0xa0, 0x2f, 0xf9, 0x70, 0x11, 0x00,
                    0x00, 0x03, 0x00, 0x01, 0x00, 0x00, 0x03, 0x00, 0x14, 0x0f, 0x16, 0x2d, 0x96,
                ],
                (640, 360),
            ),
            (
                &[
                    0x67, 0x42, 0xc0, 0x28, 0xd9, 0x00, 0x78, 0x02, 0x27, 0xe5, 0xc0, 0x44, 0x00,
                    0x00, 0x03, 0x00, 0x04, 0x00, 0x00, 0x03, 0x00, 0x50, 0x3c, 0x60, 0xc9, 0x20,
                ],
                (1920, 1080),
            ),
            (
                // High 4:4:4 Predictive: chroma_format_idc 3, crop units of one pixel.
                &[
                    0x67, 0xf4, 0x00, 0x0c, 0x91, 0x9b, 0x28, 0x28, 0x33, 0xf1, 0xb8, 0x08, 0x80,
                    0x00, 0x00, 0x03, 0x00, 0x80, 0x00, 0x00, 0x0a, 0x07, 0x8a, 0x14, 0xcb,
                ],
                (320, 180),
            ),
            (
                // Main, interlaced (frame_mbs_only 0: map units are field pairs).
                &[
                    0x67, 0x4d, 0x40, 0x15, 0xec, 0xa1, 0x65, 0x7e, 0x5c, 0x04, 0x40, 0x00, 0x00,
                    0x03, 0x00, 0x40, 0x00, 0x00, 0x05, 0x07, 0xc5, 0x0a, 0x65, 0x80,
                ],
                (176, 144),
            ),
        ];
        for (sps, size) in cases {
            assert_eq!(sps_dimensions(sps), Ok(*size), "{sps:02x?}");
        }
    }

    /// Writes Exp-Golomb fields, to build the SPS no encoder here writes.
    #[derive(Default)]
    struct Writer {
        bits: Vec<bool>,
    }

    impl Writer {
        fn bits(&mut self, v: u32, n: usize) -> &mut Self {
            for i in (0..n).rev() {
                self.bits.push(v >> i & 1 == 1);
            }
            self
        }
        fn ue(&mut self, v: u32) -> &mut Self {
            let n = 32 - (v + 1).leading_zeros() as usize;
            self.bits(0, n - 1).bits(v + 1, n)
        }
        fn se(&mut self, v: i32) -> &mut Self {
            let k = if v > 0 { 2 * v - 1 } else { -2 * v };
            self.ue(k as u32)
        }
        fn bytes(&mut self) -> Vec<u8> {
            self.bits(1, 1); // rbsp_stop_one_bit
            while self.bits.len() % 8 != 0 {
                self.bits.push(false);
            }
            self.bits
                .chunks(8)
                .map(|c| c.iter().fold(0u8, |a, b| a << 1 | u8::from(*b)))
                .collect()
        }
    }

    #[test]
    fn sps_dimensions_past_scaling_lists_and_pic_order_type_1() {
        let mut w = Writer::default();
        w.ue(0).ue(1).ue(0).ue(0).bits(0, 1); // id, 4:2:0, 8-bit, no bypass
        w.bits(1, 1); // seq_scaling_matrix_present_flag
        for i in 0..8 {
            if i % 2 == 0 {
                w.bits(0, 1);
                continue;
            }
            w.bits(1, 1);
            let size = if i < 6 { 16 } else { 64 };
            // A few deltas, then one that makes next_scale 0: the rest is implied.
            w.se(3).se(-5).se(7);
            let last = 8 + 3 - 5 + 7;
            w.se(-last);
            let _ = size;
        }
        w.ue(0).ue(1); // log2_max_frame_num, pic_order_cnt_type 1
        w.bits(0, 1).se(-2).se(1).ue(3).se(2).se(-2).se(0);
        w.ue(2).bits(0, 1); // max_num_ref_frames, gaps
        w.ue(79).ue(44).bits(1, 1).bits(1, 1); // 80x45 macroblocks, frames only
        w.bits(0, 1); // no cropping
        w.bits(0, 1); // no VUI
        let mut sps = vec![0x67, 100, 0, 31];
        sps.extend(w.bytes());
        assert_eq!(sps_dimensions(&sps), Ok((1280, 720)));
    }

    #[test]
    fn sps_dimensions_refuses_what_is_not_a_picture() {
        assert!(sps_dimensions(&[]).is_err());
        assert!(sps_dimensions(PPS).is_err(), "not an SPS");
        assert!(sps_dimensions(&SPS[..6]).is_err(), "truncated");
        // A Baseline SPS up to its picture size: id 0, frame_num 4 bits, POC type 2,
        // one reference frame, no gaps; then the size, frames only, direct 8x8.
        let baseline = |width_mbs: u32, height_mbs: u32, crop: Option<[u32; 4]>| {
            let mut w = Writer::default();
            w.ue(0).ue(0).ue(2).ue(1).bits(0, 1);
            w.ue(width_mbs - 1).ue(height_mbs - 1).bits(1, 1).bits(1, 1);
            match crop {
                Some(c) => {
                    w.bits(1, 1).ue(c[0]).ue(c[1]).ue(c[2]).ue(c[3]);
                }
                None => {
                    w.bits(0, 1);
                }
            }
            w.bits(0, 1); // no VUI
            let mut sps = vec![0x67, 66, 0xc0, 30];
            sps.extend(w.bytes());
            sps
        };
        assert_eq!(sps_dimensions(&baseline(40, 30, None)), Ok((640, 480)));
        assert!(
            sps_dimensions(&baseline(2048, 11, None)).is_err(),
            "too wide"
        );
        let gone = baseline(1, 1, Some([8, 0, 0, 0]));
        assert!(sps_dimensions(&gone).is_err());
    }

    fn record() -> Bytes {
        let mut r = vec![1, 0x42, 0xc0, 0x1e, 0xff, 0xe1];
        r.extend_from_slice(&(SPS.len() as u16).to_be_bytes());
        r.extend_from_slice(SPS);
        r.push(1);
        r.extend_from_slice(&(PPS.len() as u16).to_be_bytes());
        r.extend_from_slice(PPS);
        Bytes::from(r)
    }

    #[test]
    fn config_record() {
        let c = AvcConfig::parse(&record()).unwrap();
        assert_eq!(c.length_size, 4);
        assert_eq!(&c.sps[0][..], SPS);
        assert_eq!(&c.pps[0][..], PPS);
        let p = c.profile();
        assert_eq!(p.name(), "Constrained Baseline");
        assert!(p.browser_decodable());
        assert_eq!(p.sdp_profile_level_id(), "42e01e");
        let hi444 = Profile {
            profile_idc: 244,
            constraints: 0,
            level_idc: 30,
        };
        assert!(!hi444.browser_decodable());
        // Every truncation is an error, never a panic.
        let r = record();
        for n in 0..r.len() {
            assert!(AvcConfig::parse(&r.slice(..n)).is_err(), "{n}");
        }
    }

    #[test]
    fn nal_splitting_and_slices() {
        // IDR slice: first_mb 0 ("1"), slice_type 7 = I ("0001000") → 0b1000_1000.
        let idr = [0x65u8, 0b1000_1000, 0x80];
        // B slice, non-reference: slice_type 6 ("00111") → 0b1001_1100.
        let b = [0x01u8, 0b1001_1100, 0x00];
        let mut au = Vec::new();
        for n in [&idr[..], &b[..]] {
            au.extend_from_slice(&(n.len() as u32).to_be_bytes());
            au.extend_from_slice(n);
        }
        let nalus = split_nalus(&Bytes::from(au.clone()), 4).unwrap();
        assert_eq!(nalus.len(), 2);
        assert_eq!(slice_kind(&nalus[0]).unwrap(), SliceKind::I);
        assert_eq!(slice_kind(&nalus[1]).unwrap(), SliceKind::B);
        assert_eq!(nal_ref_idc(&nalus[1]), 0);
        au[3] = 200;
        assert!(split_nalus(&Bytes::from(au), 4).is_err());
    }

    #[test]
    fn fu_a_fragments_reassemble() {
        let nal: Vec<u8> = std::iter::once(0x65)
            .chain((0..3000).map(|i| i as u8))
            .collect();
        let mut out = Vec::new();
        packetize(&[Bytes::from(nal.clone())], 1200, &mut out);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|p| p.len() <= 1200));
        assert_eq!(out[0][0] & 0x1f, nal::FU_A);
        assert_eq!(out[0][1], 0x80 | 5);
        assert_eq!(out[2][1], 0x40 | 5);
        let mut back = vec![(out[0][0] & 0xe0) | (out[0][1] & 0x1f)];
        for p in &out {
            back.extend_from_slice(&p[2..]);
        }
        assert_eq!(back, nal);
        let s = stap_a(&[Bytes::from_static(SPS), Bytes::from_static(PPS)], 1200).unwrap();
        assert_eq!(s[0] & 0x1f, nal::STAP_A);
        assert_eq!(s.len(), 1 + 2 + SPS.len() + 2 + PPS.len());
    }
}
