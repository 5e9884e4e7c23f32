//! WebRTC → FLV, once per published stream, sans I/O: RTP and sender reports in, FLV
//! tags (and keyframe requests) out.
//!
//! - Video: a reorder buffer over extended sequence numbers; frames are assembled from
//!   single NAL units, STAP-A and FU-A; SPS/PPS are taken however they come (in a
//!   STAP-A, as separate packets, repeated) and an AVC sequence header is emitted before
//!   the first keyframe and whenever they change; multi-slice pictures stay one frame
//!   (one RTP timestamp). On loss, it waits [`LOSS_WAIT`] for a retransmission, then
//!   drops to the next IDR and asks for a keyframe at once (throttled).
//! - Audio: Opus decoded (short gaps concealed), AAC-LC encoded; AAC timestamps from
//!   the output sample count.
//! - One clock: with sender reports for the tracks, RTP times map to the publisher's
//!   NTP clock (lip-sync as the publisher captured it); without, each track is anchored
//!   at its first packet's arrival, and once both tracks have a report, the one that
//!   is early on the publisher's clock is moved later, once, by what arrival got wrong
//!   (a publisher's first reports come a second or more after its first packets).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtp::Packet;
use weir_signaling::Kind;

use crate::codec::h264::nal;
use crate::codec::opus_aac::{AacFrame, OpusToAac};
use crate::live::{Tag, TagKind};

/// How long a gap may stay open waiting for a retransmission.
pub const LOSS_WAIT: Duration = Duration::from_millis(120);
/// Keyframe requests at most this often.
const PLI_INTERVAL: Duration = Duration::from_millis(300);
/// Packets the reorder buffer holds at most.
const MAX_BUFFERED: usize = 1024;
/// A frame's NAL units at most (bounds a frame without a marker bit).
const MAX_FRAME_BYTES: usize = 4 << 20;
/// FLV timestamps start here, so a track that begins slightly earlier stays positive.
const START_MS: f64 = 1000.0;
/// Audio gaps up to this many packets are concealed; longer ones re-anchor.
const MAX_CONCEALED: u16 = 10;

#[derive(Debug)]
pub enum Output {
    Tag(Tag),
    /// Ask the publisher for a keyframe.
    KeyframeRequest,
    /// Something that cannot be converted; said once.
    Refused(String),
    /// Video is back after a loss: how long from giving up on the gap to the keyframe.
    Recovered(Duration),
    /// Audio and video were put in sync on the publisher's clock: how much later video
    /// had been than it should (ms; negative: earlier), and so how far the early
    /// track was moved.
    LipSync(f64),
}

/// A correction of the two tracks' offset larger than this is a bogus report, not lip
/// sync: left alone.
const MAX_LIP_SYNC_MS: f64 = 2_000.0;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub video_frames: u64,
    pub frames_dropped_loss: u64,
    /// Frames before the first keyframe (the conversion starts mid-GOP).
    pub frames_before_keyframe: u64,
    pub audio_frames: u64,
    pub audio_concealed: u64,
}

/// Maps one track's RTP times to FLV milliseconds. The mapping is fixed at the
/// track's first packet (from a sender report when there is one, else from arrival)
/// and then follows the RTP clock alone: later reports jitter by tens of ms, and
/// re-mapping with each would make timestamps jump, even backwards.
#[derive(Default)]
struct TrackClock {
    clock_rate: f64,
    sr: Option<(u64, u32)>,
    /// (extended RTP time, its ms) of the first packet.
    anchor: Option<(i64, f64)>,
    /// Last RTP time seen and its extended value (wrap-safe over any duration).
    last: Option<(u32, i64)>,
}

impl TrackClock {
    /// The publisher's NTP ms of the anchor packet, once it and a report are known.
    fn anchor_ntp_ms(&self) -> Option<f64> {
        let (ntp, sr_rtp) = self.sr?;
        let (ext, _) = self.anchor?;
        let ticks = (ext as u32).wrapping_sub(sr_rtp) as i32;
        Some(ntp_ms(ntp) + f64::from(ticks) * 1000.0 / self.clock_rate)
    }

    fn extend(&mut self, rtp: u32) -> i64 {
        let ext = match self.last {
            None => i64::from(rtp),
            Some((last, last_ext)) => last_ext + i64::from(rtp.wrapping_sub(last) as i32),
        };
        if self.last.is_none_or(|(_, l)| ext > l) {
            self.last = Some((rtp, ext));
        }
        ext
    }
}

fn ntp_ms(ntp: u64) -> f64 {
    (ntp >> 32) as f64 * 1000.0 + (ntp & 0xffff_ffff) as f64 * 1000.0 / 4_294_967_296.0
}

struct Video {
    clock: TrackClock,
    buffer: BTreeMap<u64, Packet>,
    next: Option<u64>,
    last_seq: Option<u64>,
    gap_since: Option<Instant>,
    /// The frame being assembled: its RTP timestamp and NAL units.
    frame_ts: Option<u32>,
    frame: Vec<Bytes>,
    frame_bytes: usize,
    fu: Option<BytesMut>,
    need_idr: bool,
    /// When video was last given up on after a loss (cleared at the next keyframe).
    lost_at: Option<Instant>,
    sps: Option<Bytes>,
    pps: Option<Bytes>,
    header_sent: Option<(Bytes, Bytes)>,
}

struct Audio {
    clock: TrackClock,
    transcoder: Option<OpusToAac>,
    last_seq: Option<u16>,
    /// FLV ms of the transcoder's input sample 0.
    anchor_ms: Option<f64>,
    header_sent: bool,
}

pub struct RtpToFlv {
    video: Video,
    audio: Audio,
    /// Last FLV timestamp written per kind: output never goes backwards.
    last_video_ms: Option<u32>,
    last_audio_ms: Option<u32>,
    /// NTP ms of FLV time zero (sender-report mode), or the start instant.
    ntp_origin: Option<f64>,
    /// The tracks' offset was checked against the publisher's reports.
    lip_synced: bool,
    started: Instant,
    last_pli: Option<Instant>,
    out: VecDeque<Output>,
    refused_audio: bool,
    aac_bitrate: u32,
    pub stats: Stats,
}

impl RtpToFlv {
    pub fn new(now: Instant, aac_bitrate: u32) -> Self {
        Self {
            video: Video {
                clock: TrackClock {
                    clock_rate: 90_000.0,
                    ..Default::default()
                },
                buffer: BTreeMap::new(),
                next: None,
                last_seq: None,
                gap_since: None,
                frame_ts: None,
                frame: Vec::new(),
                frame_bytes: 0,
                fu: None,
                need_idr: true,
                lost_at: None,
                sps: None,
                pps: None,
                header_sent: None,
            },
            audio: Audio {
                clock: TrackClock {
                    clock_rate: 48_000.0,
                    ..Default::default()
                },
                transcoder: None,
                last_seq: None,
                anchor_ms: None,
                header_sent: false,
            },
            last_video_ms: None,
            last_audio_ms: None,
            ntp_origin: None,
            lip_synced: false,
            started: now,
            last_pli: None,
            out: VecDeque::new(),
            refused_audio: false,
            aac_bitrate,
            stats: Stats::default(),
        }
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Self::handle_timeout`] wants to run (a gap is waiting).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.video.gap_since.map(|t| t + LOSS_WAIT)
    }

    fn request_keyframe(&mut self, now: Instant) {
        if self
            .last_pli
            .is_none_or(|t| now.duration_since(t) >= PLI_INTERVAL)
        {
            self.last_pli = Some(now);
            self.out.push_back(Output::KeyframeRequest);
        }
    }

    pub fn handle_sender_report(&mut self, kind: Kind, sr: &SenderReport) {
        let clock = match kind {
            Kind::Video => &mut self.video.clock,
            Kind::Audio => &mut self.audio.clock,
        };
        clock.sr = Some((sr.ntp_time, sr.rtp_time));
        self.lip_sync();
    }

    /// Once both tracks are anchored and both have a report: the offset between their
    /// anchors becomes the publisher's, by moving the early one later (never back:
    /// timestamps already written stay increasing). Once per stream; later reports
    /// jitter and are not followed.
    fn lip_sync(&mut self) {
        if self.lip_synced {
            return;
        }
        let (Some(v_ntp), Some(a_ntp)) = (
            self.video.clock.anchor_ntp_ms(),
            self.audio.clock.anchor_ntp_ms(),
        ) else {
            return;
        };
        self.lip_synced = true;
        let (Some((_, v_ms)), Some((_, a_ms))) = (self.video.clock.anchor, self.audio.clock.anchor)
        else {
            return;
        };
        // How much later video is on the FLV timeline than on the publisher's clock.
        let late = (v_ms - a_ms) - (v_ntp - a_ntp);
        if late.abs() > MAX_LIP_SYNC_MS {
            return;
        }
        if late > 0.0 {
            if let Some(a) = self.audio.clock.anchor.as_mut() {
                a.1 += late;
            }
            if let Some(m) = self.audio.anchor_ms.as_mut() {
                *m += late;
            }
        } else if let Some(v) = self.video.clock.anchor.as_mut() {
            v.1 -= late;
        }
        self.out.push_back(Output::LipSync(late));
    }

    /// FLV ms of an RTP time on a track.
    fn ms(&mut self, kind: Kind, rtp: u32, arrived: Instant) -> f64 {
        let started = self.started;
        let clock = match kind {
            Kind::Video => &mut self.video.clock,
            Kind::Audio => &mut self.audio.clock,
        };
        let ext = clock.extend(rtp);
        if clock.anchor.is_none() {
            let ms = match clock.sr {
                // On the publisher's clock: both tracks share its NTP timeline.
                Some((ntp, sr_rtp)) => {
                    let at = ntp_ms(ntp)
                        + f64::from(rtp.wrapping_sub(sr_rtp) as i32) * 1000.0 / clock.clock_rate;
                    // The timeline's origin is set by the first track mapped this
                    // way, at that packet's arrival: a track already anchored by
                    // arrival (no report yet) stays on the same timeline. (Before,
                    // that packet was put at START_MS: video whose first keyframe
                    // came 0.9 s after the audio started was 0.9 s behind it, and
                    // every player's latency control cut it.)
                    let arrival = START_MS
                        + arrived.saturating_duration_since(started).as_secs_f64() * 1000.0;
                    at - *self.ntp_origin.get_or_insert(at - arrival)
                }
                // Without a sender report: the first packet's arrival.
                None => {
                    START_MS + arrived.saturating_duration_since(started).as_secs_f64() * 1000.0
                }
            };
            clock.anchor = Some((ext, ms));
        }
        let (anchor_ext, anchor_ms) = clock.anchor.expect("set above");
        anchor_ms + (ext - anchor_ext) as f64 * 1000.0 / clock.clock_rate
    }

    pub fn handle_rtp(&mut self, kind: Kind, packet: Packet, arrived: Instant) {
        match kind {
            Kind::Video => self.video_packet(packet, arrived),
            Kind::Audio => self.audio_packet(packet, arrived),
        }
    }

    fn video_packet(&mut self, packet: Packet, now: Instant) {
        let v = &mut self.video;
        let seq = packet.header.sequence_number;
        let ext = match v.last_seq {
            None => u64::from(seq) + (1 << 32),
            Some(last) => {
                let delta = seq.wrapping_sub(last as u16) as i16;
                (last as i64 + i64::from(delta)) as u64
            }
        };
        if v.last_seq.is_none_or(|l| ext > l) {
            v.last_seq = Some(ext);
        }
        if v.next.is_none() {
            v.next = Some(ext);
            self.request_keyframe(now);
        }
        let v = &mut self.video;
        if ext < v.next.expect("set") {
            return; // late or duplicate
        }
        v.buffer.insert(ext, packet);
        if v.buffer.len() > MAX_BUFFERED {
            self.skip_gap(now);
        }
        self.drain_video(now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.video.gap_since.is_some_and(|t| now >= t + LOSS_WAIT) {
            self.skip_gap(now);
            self.drain_video(now);
        }
    }

    /// Gives up on a gap: the partial frame goes, video resumes at the next IDR.
    fn skip_gap(&mut self, now: Instant) {
        let v = &mut self.video;
        if let Some((&first, _)) = v.buffer.iter().next() {
            v.next = Some(first);
        }
        v.gap_since = None;
        if !v.frame.is_empty() || v.fu.is_some() {
            self.stats.frames_dropped_loss += 1;
        }
        v.frame.clear();
        v.frame_bytes = 0;
        v.fu = None;
        v.frame_ts = None;
        v.need_idr = true;
        v.lost_at.get_or_insert(now);
        self.request_keyframe(now);
    }

    fn drain_video(&mut self, now: Instant) {
        loop {
            let next = self.video.next.expect("set");
            let Some(p) = self.video.buffer.remove(&next) else {
                if !self.video.buffer.is_empty() {
                    self.video.gap_since.get_or_insert(now);
                } else {
                    self.video.gap_since = None;
                }
                return;
            };
            self.video.gap_since = None;
            self.video.next = Some(next + 1);
            if self
                .video
                .frame_ts
                .is_some_and(|ts| ts != p.header.timestamp)
            {
                // A new timestamp without the last frame's marker: close that frame.
                self.finish_frame(now);
            }
            self.video.frame_ts = Some(p.header.timestamp);
            self.depacketize(&p.payload);
            if p.header.marker || self.video.frame_bytes > MAX_FRAME_BYTES {
                self.finish_frame(now);
            }
        }
    }

    fn push_nal(&mut self, nal: Bytes) {
        let v = &mut self.video;
        if nal.is_empty() {
            return;
        }
        match nal[0] & 0x1f {
            nal::SPS => v.sps = Some(nal),
            nal::PPS => v.pps = Some(nal),
            nal::AUD | nal::FILLER => {}
            _ => {
                v.frame_bytes += nal.len();
                v.frame.push(nal);
            }
        }
    }

    fn depacketize(&mut self, payload: &Bytes) {
        let Some(&b0) = payload.first() else { return };
        match b0 & 0x1f {
            1..=23 => self.push_nal(payload.clone()),
            nal::STAP_A => {
                let mut i = 1;
                while i + 2 <= payload.len() {
                    let len = usize::from(u16::from_be_bytes([payload[i], payload[i + 1]]));
                    i += 2;
                    if len == 0 || i + len > payload.len() {
                        break;
                    }
                    self.push_nal(payload.slice(i..i + len));
                    i += len;
                }
            }
            nal::FU_A if payload.len() > 2 => {
                let fu = payload[1];
                if fu & 0x80 != 0 {
                    let mut b = BytesMut::with_capacity(payload.len() * 4);
                    b.put_u8((b0 & 0xe0) | (fu & 0x1f));
                    b.extend_from_slice(&payload[2..]);
                    self.video.fu = Some(b);
                } else if let Some(b) = self.video.fu.as_mut() {
                    if b.len() + payload.len() <= MAX_FRAME_BYTES {
                        b.extend_from_slice(&payload[2..]);
                    }
                }
                if fu & 0x40 != 0 {
                    if let Some(b) = self.video.fu.take() {
                        self.push_nal(b.freeze());
                    }
                }
            }
            _ => {} // STAP-B, MTAP, FU-B: not used by WebRTC senders
        }
    }

    fn finish_frame(&mut self, now: Instant) {
        let Some(ts) = self.video.frame_ts.take() else {
            return;
        };
        self.video.fu = None;
        let nalus = std::mem::take(&mut self.video.frame);
        self.video.frame_bytes = 0;
        if nalus.is_empty() {
            return;
        }
        let idr = nalus.iter().any(|n| n[0] & 0x1f == nal::IDR);
        if self.video.need_idr && !idr {
            if self.video.lost_at.is_some() {
                self.stats.frames_dropped_loss += 1;
            } else {
                self.stats.frames_before_keyframe += 1;
            }
            self.request_keyframe(now);
            return;
        }
        if idr {
            let (Some(sps), Some(pps)) = (self.video.sps.clone(), self.video.pps.clone()) else {
                // An IDR without parameter sets is undecodable: ask again.
                self.request_keyframe(now);
                return;
            };
            self.video.need_idr = false;
            if let Some(lost) = self.video.lost_at.take() {
                self.out
                    .push_back(Output::Recovered(now.saturating_duration_since(lost)));
            }
            if self.video.header_sent.as_ref() != Some(&(sps.clone(), pps.clone())) {
                let ms = self.ms(Kind::Video, ts, now);
                self.out.push_back(Output::Tag(Tag {
                    kind: TagKind::Video,
                    timestamp: ms.max(0.0) as u32,
                    data: avc_sequence_header(&sps, &pps),
                }));
                self.video.header_sent = Some((sps, pps));
            }
        }
        let ms = self.ms(Kind::Video, ts, now);
        let size: usize = nalus.iter().map(|n| 4 + n.len()).sum();
        let mut body = BytesMut::with_capacity(5 + size);
        body.extend_from_slice(&crate::rtmp::flv::video_header(idr, 1, 0));
        for n in &nalus {
            body.put_u32(n.len() as u32);
            body.extend_from_slice(n);
        }
        self.stats.video_frames += 1;
        let timestamp = monotonic(&mut self.last_video_ms, ms);
        self.out.push_back(Output::Tag(Tag {
            kind: TagKind::Video,
            timestamp,
            data: body.freeze(),
        }));
    }

    fn audio_packet(&mut self, packet: Packet, arrived: Instant) {
        if self.refused_audio {
            return;
        }
        if self.audio.transcoder.is_none() {
            match OpusToAac::new(self.aac_bitrate) {
                Ok(t) => self.audio.transcoder = Some(t),
                Err(e) => {
                    self.refused_audio = true;
                    self.out.push_back(Output::Refused(e.to_string()));
                    return;
                }
            }
        }
        let seq = packet.header.sequence_number;
        let gap = self.audio.last_seq.map(|l| seq.wrapping_sub(l));
        match gap {
            Some(0) => return,               // duplicate
            Some(g) if g > 0x8000 => return, // late
            _ => {}
        }
        self.audio.last_seq = Some(seq);
        let missing = gap.map_or(0, |g| g - 1);
        if self.audio.anchor_ms.is_none() || missing > MAX_CONCEALED {
            // (Re-)anchor the sample count at this packet's time: the transcoder's
            // positions run on from its first sample, so sample 0 is put where this
            // packet's first sample belongs less what was decoded before it.
            let ms = self.ms(Kind::Audio, packet.header.timestamp, arrived);
            let before = self
                .audio
                .transcoder
                .as_ref()
                .map_or(0, OpusToAac::samples_in);
            self.audio.anchor_ms = Some(ms - before as f64 * 1000.0 / 48_000.0);
        }
        let mut frames: Vec<AacFrame> = Vec::new();
        let t = self.audio.transcoder.as_mut().expect("set above");
        if self.audio.anchor_ms.is_some() && missing > 0 && missing <= MAX_CONCEALED {
            for _ in 0..missing {
                if let Ok(f) = t.push(None) {
                    frames.extend(f);
                }
                self.stats.audio_concealed += 1;
            }
        }
        match t.push(Some(&packet.payload)) {
            Ok(f) => frames.extend(f),
            Err(e) => {
                tracing::debug!(error = %e, "Opus packet not transcoded");
                return;
            }
        }
        if !self.audio.header_sent {
            let asc = t.asc().to_vec();
            let mut data = vec![0xaf, 0];
            data.extend_from_slice(&asc);
            let ms = self.audio.anchor_ms.unwrap_or(START_MS);
            self.out.push_back(Output::Tag(Tag {
                kind: TagKind::Audio,
                timestamp: ms.max(0.0) as u32,
                data: Bytes::from(data),
            }));
            self.audio.header_sent = true;
        }
        let anchor = self.audio.anchor_ms.unwrap_or(START_MS);
        for f in frames {
            let ms = anchor + f.sample as f64 * 1000.0 / 48_000.0;
            let mut data = BytesMut::with_capacity(2 + f.data.len());
            data.put_u8(0xaf);
            data.put_u8(1);
            data.extend_from_slice(&f.data);
            self.stats.audio_frames += 1;
            let timestamp = monotonic(&mut self.last_audio_ms, ms);
            self.out.push_back(Output::Tag(Tag {
                kind: TagKind::Audio,
                timestamp,
                data: data.freeze(),
            }));
        }
    }
}

/// `ms` as an FLV timestamp strictly after the previous one of its kind.
fn monotonic(last: &mut Option<u32>, ms: f64) -> u32 {
    let mut t = ms.max(0.0) as u32;
    if let Some(l) = *last {
        if t <= l {
            t = l + 1;
        }
    }
    *last = Some(t);
    t
}

/// The FLV AVC sequence header (an AVCDecoderConfigurationRecord) for one SPS/PPS.
pub fn avc_sequence_header(sps: &[u8], pps: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(16 + sps.len() + pps.len());
    b.extend_from_slice(&crate::rtmp::flv::video_header(true, 0, 0));
    b.put_u8(1);
    b.put_u8(*sps.get(1).unwrap_or(&66));
    b.put_u8(*sps.get(2).unwrap_or(&0));
    b.put_u8(*sps.get(3).unwrap_or(&30));
    b.put_u8(0xff); // 4-byte NAL lengths
    b.put_u8(0xe1);
    b.put_u16(sps.len() as u16);
    b.extend_from_slice(sps);
    b.put_u8(1);
    b.put_u16(pps.len() as u16);
    b.extend_from_slice(pps);
    b.freeze()
}

#[cfg(test)]
mod tests;
