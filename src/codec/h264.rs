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
