//! RTMP → WebRTC, once per source, sans I/O: FLV video and audio tags in, RTP packets
//! and RTCP sender reports out, ready to be forwarded to every subscriber.
//!
//! - Video: H.264 passes through. Access units (AVCC) become RFC 6184 packets (single
//!   NAL or FU-A) under a safe payload size; SPS and PPS go in a STAP-A before every
//!   IDR; the marker bit ends each frame; the RTP timestamp is the PTS (DTS +
//!   composition time) at 90 kHz. Profiles browsers cannot decode are refused.
//!   Non-reference B-frames are dropped (counted); reference B-frames are forwarded
//!   (counted, and warned about: browsers may stutter on them).
//! - Audio: AAC-LC → Opus, one packet of 5 ms frames per AAC frame, so a packet's first
//!   sample always leaves at the same age ([`crate::codec::aac_opus`]); the RTP timestamp
//!   is a 48 kHz sample count anchored to the source clock, re-anchored only when the
//!   source drifts from it by more than `drift_reanchor_ms`.
//! - One clock: both kinds map source milliseconds to the same NTP timeline, and a
//!   sender report goes out with the first packet of each kind and every second.
//! - Latency hygiene: media that arrives late relative to the best arrival seen (a
//!   backlog after a stall), or faster than real time (an encoder flushing its buffer on
//!   connect), is skipped up to the next keyframe instead of forwarded stale.

pub mod to_flv;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtp::header::Header;
use rtc::rtp::Packet;
use rtc::rtp_transceiver::rtp_sender::{RTCPFeedback, RTCRtpCodec};
use weir_signaling::Kind;

use crate::codec::aac::AudioConfig;
use crate::codec::aac_opus::{AacToOpus, OPUS_RATE};
use crate::codec::h264::{self, nal, AvcConfig, SliceKind};
use crate::rtmp::flv::{self, AudioTag, VideoTag};

#[derive(Debug, Clone)]
pub struct BridgeConfig {
    pub opus_bitrate: i32,
    /// RTP payload bytes at most (leaves room for SRTP, extensions and TURN).
    pub max_payload: usize,
    /// Media later than this behind the best arrival, or ahead of real time by this
    /// much, is skipped to the next keyframe.
    pub max_lag_ms: i64,
    pub drift_reanchor_ms: i64,
    pub drop_non_reference_b: bool,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            opus_bitrate: 64_000,
            max_payload: 1160,
            max_lag_ms: 400,
            drift_reanchor_ms: 500,
            drop_non_reference_b: true,
        }
    }
}

/// What the bridge produces.
#[derive(Debug)]
pub enum Output {
    /// A track's codec is known: subscribers can be offered it.
    Track {
        kind: Kind,
        codec: RTCRtpCodec,
    },
    /// The codec changed incompatibly (e.g. a new profile): renegotiate.
    Rtp {
        kind: Kind,
        packet: Packet,
        /// The first packet of a keyframe (a subscriber may start here).
        keyframe: bool,
        /// When the RTMP message that produced it arrived.
        arrived: Instant,
    },
    SenderReport {
        kind: Kind,
        report: SenderReport,
    },
    /// Something the pusher sends that cannot be bridged; said once per cause.
    Refused {
        kind: Kind,
        reason: String,
    },
}

/// Counters the shell exports as metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub video_frames: u64,
    pub audio_frames: u64,
    pub b_frames_dropped: u64,
    pub b_frames_forwarded: u64,
    pub frames_skipped_lag: u64,
    pub audio_reanchors: u64,
    pub audio_decode_errors: u64,
    pub parameter_set_changes: u64,
}

struct Video {
    config: AvcConfig,
    ssrc: u32,
    seq: u16,
    rtp_base: u32,
    announced: Option<RTCRtpCodec>,
    last_sr: Option<Instant>,
    last_ts: u32,
    refused: bool,
}

struct Audio {
    transcoder: AacToOpus,
    ssrc: u32,
    seq: u16,
    rtp_base: u32,
    /// Source ms (unwrapped, relative to the clock origin) of output sample 0.
    anchor_ms: i64,
    /// AAC frames decoded since the anchor (source-rate samples = frames × 1024).
    frames_since_anchor: u64,
    last_sr: Option<Instant>,
    last_ts: u32,
}

/// Maps source milliseconds to one timeline for both kinds.
struct Clock {
    /// The first source timestamp (unwrapped).
    origin_ms: i64,
    started: Instant,
    /// NTP time of `origin_ms`, in NTP 32.32 fixed point.
    ntp_origin: u64,
    /// Last raw 32-bit timestamp and the unwrapped value, for wrap handling.
    last_raw: u32,
    last_unwrapped: i64,
    /// (arrival − media) in ms: the best (smallest) seen, and the one at the last resume.
    best_delay: f64,
    anchor_delay: f64,
    last_check: Instant,
}

/// Drift allowed between the pusher's clock and ours before lag is misjudged (0.2 %).
const CLOCK_CREEP: f64 = 0.002;

impl Clock {
    fn unwrap(&mut self, raw: u32) -> i64 {
        let delta = raw.wrapping_sub(self.last_raw) as i32;
        self.last_raw = raw;
        self.last_unwrapped += i64::from(delta);
        self.last_unwrapped
    }

    fn ntp(&self, media_ms: f64) -> u64 {
        let offset = (media_ms / 1000.0 * 4_294_967_296.0) as i64;
        (self.ntp_origin as i64).wrapping_add(offset) as u64
    }
}

/// NTP 32.32 time of a Unix time in microseconds.
pub fn ntp_from_unix_micros(us: u64) -> u64 {
    let secs = us / 1_000_000 + 2_208_988_800;
    let frac = ((us % 1_000_000) << 32) / 1_000_000;
    (secs << 32) | frac
}

pub struct Bridge {
    cfg: BridgeConfig,
    video: Option<Video>,
    audio: Option<Audio>,
    clock: Option<Clock>,
    /// Skipping until the next keyframe (lag or burst).
    skipping: bool,
    refused_audio: bool,
    warned_reference_b: bool,
    out: VecDeque<Output>,
    pub stats: Stats,
    ntp_at_creation: u64,
    created: Instant,
}

const VIDEO_RATE: i64 = 90;
const SR_INTERVAL: Duration = Duration::from_secs(1);

impl Bridge {
    /// `ntp_now` is the NTP time at `now` (the caller reads the wall clock).
    pub fn new(cfg: BridgeConfig, now: Instant, ntp_now: u64) -> Self {
        Self {
            cfg,
            video: None,
            audio: None,
            clock: None,
            skipping: false,
            refused_audio: false,
            warned_reference_b: false,
            out: VecDeque::new(),
            stats: Stats::default(),
            ntp_at_creation: ntp_now,
            created: now,
        }
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Source milliseconds relative to the origin; starts the clock on first use.
    fn media_ms(&mut self, raw: u32, now: Instant) -> i64 {
        if self.clock.is_none() {
            let since = now.saturating_duration_since(self.created).as_secs_f64();
            let ntp_origin = self
                .ntp_at_creation
                .wrapping_add((since * 4_294_967_296.0) as u64);
            self.clock = Some(Clock {
                origin_ms: i64::from(raw),
                started: now,
                ntp_origin,
                last_raw: raw,
                last_unwrapped: i64::from(raw),
                best_delay: 0.0,
                anchor_delay: 0.0,
                last_check: now,
            });
        }
        let c = self.clock.as_mut().expect("set above");
        c.unwrap(raw) - c.origin_ms
    }

    /// Updates the lag estimate with a message at `media_ms`. Returns (late, burst):
    /// late behind the best arrival seen (a backlog), or arriving ahead of real time
    /// since the last resume (an encoder flushing its buffer).
    fn lagging(&mut self, media_ms: i64, now: Instant) -> (bool, bool) {
        let max_lag = self.cfg.max_lag_ms as f64;
        let c = self.clock.as_mut().expect("clock started");
        let wall_ms = now.saturating_duration_since(c.started).as_secs_f64() * 1000.0;
        let delay = wall_ms - media_ms as f64;
        let elapsed = now.saturating_duration_since(c.last_check).as_secs_f64() * 1000.0;
        c.last_check = now;
        c.best_delay = (c.best_delay + elapsed * CLOCK_CREEP).min(delay);
        c.anchor_delay = (c.anchor_delay - elapsed * CLOCK_CREEP).max(delay);
        let late = delay - c.best_delay > max_lag;
        let burst = c.anchor_delay - delay > max_lag;
        (late, burst)
    }

    fn resume_at(&mut self, media_ms: i64, now: Instant) {
        let c = self.clock.as_mut().expect("clock started");
        let wall_ms = now.saturating_duration_since(c.started).as_secs_f64() * 1000.0;
        c.anchor_delay = wall_ms - media_ms as f64;
        self.skipping = false;
    }

    pub fn handle_video(&mut self, timestamp: u32, data: &Bytes, now: Instant) {
        let tag = match flv::parse_video(data) {
            Ok(t) => t,
            Err(e) => return self.refuse(Kind::Video, format!("malformed video tag: {e}")),
        };
        match tag {
            VideoTag::AvcSequenceHeader(record) => self.sequence_header(&record),
            VideoTag::AvcNalus {
                keyframe,
                composition_time,
                data,
            } => self.access_unit(timestamp, keyframe, composition_time, &data, now),
            VideoTag::AvcEndOfSequence => {}
            VideoTag::Unsupported(what) => {
                self.refuse(Kind::Video, format!("{what} cannot be bridged to WebRTC"))
            }
        }
    }

    fn refuse(&mut self, kind: Kind, reason: String) {
        let already = match kind {
            Kind::Video => self.video.as_ref().is_some_and(|v| v.refused),
            Kind::Audio => self.refused_audio,
        };
        match kind {
            Kind::Video => {
                if let Some(v) = self.video.as_mut() {
                    v.refused = true;
                }
            }
            Kind::Audio => self.refused_audio = true,
        }
        if !already {
            self.out.push_back(Output::Refused { kind, reason });
        }
    }

    fn sequence_header(&mut self, record: &Bytes) {
        let config = match AvcConfig::parse(record) {
            Ok(c) => c,
            Err(e) => return self.refuse(Kind::Video, e.to_string()),
        };
        let profile = config.profile();
        if !profile.browser_decodable() {
            let reason = format!(
                "H.264 {} (profile_idc {}) cannot be decoded by browsers; push Baseline, Main \
                 or High 4:2:0 8-bit (with ffmpeg: -pix_fmt yuv420p -profile:v baseline)",
                profile.name(),
                profile.profile_idc
            );
            self.video = Some(Video {
                config,
                ssrc: rand::random(),
                seq: rand::random(),
                rtp_base: rand::random(),
                announced: None,
                last_sr: None,
                last_ts: 0,
                refused: false,
            });
            return self.refuse(Kind::Video, reason);
        }
        let codec = RTCRtpCodec {
            mime_type: "video/H264".into(),
            clock_rate: 90_000,
            channels: 0,
            sdp_fmtp_line: format!(
                "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id={}",
                profile.sdp_profile_level_id()
            ),
            rtcp_feedback: ["goog-remb:", "ccm:fir", "nack:", "nack:pli"]
                .iter()
                .map(|f| {
                    let (typ, parameter) = f.split_once(':').expect("literal");
                    RTCPFeedback {
                        typ: typ.into(),
                        parameter: parameter.into(),
                    }
                })
                .collect(),
        };
        match self.video.as_mut() {
            Some(v) => {
                if v.config != config {
                    self.stats.parameter_set_changes += 1;
                }
                v.config = config;
                v.refused = false;
                if v.announced.as_ref() != Some(&codec) {
                    v.announced = Some(codec.clone());
                    self.out.push_back(Output::Track {
                        kind: Kind::Video,
                        codec,
                    });
                }
            }
            None => {
                self.video = Some(Video {
                    config,
                    ssrc: rand::random(),
                    seq: rand::random(),
                    rtp_base: rand::random(),
                    announced: Some(codec.clone()),
                    last_sr: None,
                    last_ts: 0,
                    refused: false,
                });
                self.out.push_back(Output::Track {
                    kind: Kind::Video,
                    codec,
                });
            }
        }
    }

    fn access_unit(
        &mut self,
        timestamp: u32,
        keyframe: bool,
        composition_time: i32,
        data: &Bytes,
        now: Instant,
    ) {
        let Some(v) = self.video.as_ref() else {
            return; // no sequence header yet: nothing decodable
        };
        if v.refused {
            return;
        }
        let nalus = match h264::split_nalus(data, v.config.length_size) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "malformed access unit dropped");
                return;
            }
        };
        let media_ms = self.media_ms(timestamp, now);
        let idr = keyframe || nalus.iter().any(|n| h264::nal_type(n) == nal::IDR);
        let (late, burst) = self.lagging(media_ms, now);
        if (late || burst) && !self.skipping {
            self.skipping = true;
        }
        if self.skipping {
            // Resume at a keyframe that is not itself late: the newest one of a burst.
            if idr && !late {
                self.resume_at(media_ms, now);
            } else {
                self.stats.frames_skipped_lag += 1;
                return;
            }
        }
        // B-frames: drop the ones nothing references.
        let first_slice = nalus
            .iter()
            .find(|n| matches!(h264::nal_type(n), nal::SLICE | nal::IDR));
        if let Some(slice) = first_slice {
            if h264::slice_kind(slice) == Ok(SliceKind::B) {
                if h264::nal_ref_idc(slice) == 0 && self.cfg.drop_non_reference_b {
                    self.stats.b_frames_dropped += 1;
                    return;
                }
                self.stats.b_frames_forwarded += 1;
                if !self.warned_reference_b {
                    self.warned_reference_b = true;
                    tracing::warn!(
                        "the pusher sends reference B-frames; they are forwarded, but browsers \
                         may stutter: configure the encoder without B-frames (-bf 0)"
                    );
                }
            }
        }
        let v = self.video.as_mut().expect("checked above");
        // In-band parameter sets replace the cached ones; SEI, AUD and filler are dropped
        // (SEI floods upset some decoders; the rest carries nothing for RTP).
        let mut coded = Vec::with_capacity(nalus.len());
        for n in nalus {
            match h264::nal_type(&n) {
                nal::SPS => {
                    if v.config.sps.first() != Some(&n) {
                        v.config.sps = vec![n];
                        self.stats.parameter_set_changes += 1;
                    }
                }
                nal::PPS => {
                    if v.config.pps.first() != Some(&n) {
                        v.config.pps = vec![n];
                        self.stats.parameter_set_changes += 1;
                    }
                }
                nal::SEI | nal::AUD | nal::FILLER | nal::END_SEQ | nal::END_STREAM => {}
                _ => coded.push(n),
            }
        }
        if coded.is_empty() {
            return;
        }
        let mut payloads = Vec::with_capacity(4);
        if idr {
            let sets: Vec<Bytes> = v
                .config
                .sps
                .iter()
                .chain(v.config.pps.iter())
                .cloned()
                .collect();
            match h264::stap_a(&sets, self.cfg.max_payload) {
                Some(stap) => payloads.push(stap),
                None => h264::packetize(&sets, self.cfg.max_payload, &mut payloads),
            }
        }
        h264::packetize(&coded, self.cfg.max_payload, &mut payloads);
        let pts_ms = media_ms + i64::from(composition_time);
        let ts = v.rtp_base.wrapping_add((pts_ms * VIDEO_RATE) as u32);
        let n = payloads.len();
        for (i, payload) in payloads.into_iter().enumerate() {
            let packet = Packet {
                header: Header {
                    version: 2,
                    marker: i + 1 == n,
                    payload_type: 0, // each subscriber's own
                    sequence_number: v.seq,
                    timestamp: ts,
                    ssrc: v.ssrc,
                    ..Default::default()
                },
                payload,
            };
            v.seq = v.seq.wrapping_add(1);
            self.out.push_back(Output::Rtp {
                kind: Kind::Video,
                packet,
                keyframe: idr && i == 0,
                arrived: now,
            });
        }
        v.last_ts = ts;
        self.stats.video_frames += 1;
        let due = v
            .last_sr
            .is_none_or(|t| now.duration_since(t) >= SR_INTERVAL);
        if due {
            v.last_sr = Some(now);
            let ssrc = v.ssrc;
            let ntp = self.clock.as_ref().expect("started").ntp(pts_ms as f64);
            self.out.push_back(Output::SenderReport {
                kind: Kind::Video,
                report: SenderReport {
                    ssrc,
                    ntp_time: ntp,
                    rtp_time: ts,
                    ..Default::default()
                },
            });
        }
    }

    pub fn handle_audio(&mut self, timestamp: u32, data: &Bytes, now: Instant) {
        let tag = match flv::parse_audio(data) {
            Ok(t) => t,
            Err(e) => return self.refuse(Kind::Audio, format!("malformed audio tag: {e}")),
        };
        match tag {
            AudioTag::AacSequenceHeader(asc) => self.audio_config(&asc),
            AudioTag::AacRaw(frame) => self.aac_frame(timestamp, &frame, now),
            AudioTag::Unsupported(what) => self.refuse(
                Kind::Audio,
                format!("{what} cannot be bridged to WebRTC; push AAC-LC"),
            ),
        }
    }

    fn audio_config(&mut self, asc: &Bytes) {
        let config = match AudioConfig::parse(asc) {
            Ok(c) => c,
            Err(e) => return self.refuse(Kind::Audio, e.to_string()),
        };
        if self
            .audio
            .as_ref()
            .is_some_and(|a| a.transcoder.config == config)
        {
            return; // a repeated sequence header
        }
        let transcoder = match AacToOpus::new(config, asc, self.cfg.opus_bitrate) {
            Ok(t) => t,
            Err(e) => return self.refuse(Kind::Audio, e.to_string()),
        };
        let first = self.audio.is_none();
        let (ssrc, seq, rtp_base) = match &self.audio {
            Some(a) => (a.ssrc, a.seq, a.rtp_base),
            None => (rand::random(), rand::random(), rand::random()),
        };
        self.refused_audio = false;
        self.audio = Some(Audio {
            transcoder,
            ssrc,
            seq,
            rtp_base,
            anchor_ms: i64::MIN,
            frames_since_anchor: 0,
            last_sr: None,
            last_ts: 0,
        });
        if first {
            self.out.push_back(Output::Track {
                kind: Kind::Audio,
                codec: RTCRtpCodec {
                    mime_type: "audio/opus".into(),
                    clock_rate: OPUS_RATE,
                    channels: 2,
                    sdp_fmtp_line: "minptime=10;useinbandfec=1".into(),
                    rtcp_feedback: Vec::new(),
                },
            });
        }
    }

    fn aac_frame(&mut self, timestamp: u32, frame: &Bytes, now: Instant) {
        if self.audio.is_none() || self.refused_audio {
            return;
        }
        let media_ms = self.media_ms(timestamp, now);
        let (late, burst) = self.lagging(media_ms, now);
        let has_video = self.video.as_ref().is_some_and(|v| !v.refused);
        if (late || burst) && !self.skipping {
            self.skipping = true;
        }
        if self.skipping {
            if !has_video && !late {
                self.resume_at(media_ms, now);
            } else {
                self.stats.frames_skipped_lag += 1;
                if let Some(a) = self.audio.as_mut() {
                    a.anchor_ms = i64::MIN; // re-anchor when audio resumes
                }
                return;
            }
        }
        let drift_limit = self.cfg.drift_reanchor_ms;
        let a = self.audio.as_mut().expect("checked above");
        let rate = i64::from(a.transcoder.config.sample_rate);
        let expected_ms = a
            .anchor_ms
            .saturating_add((a.frames_since_anchor as i64 * 1024 * 1000) / rate.max(1));
        if a.anchor_ms == i64::MIN || (media_ms - expected_ms).abs() > drift_limit {
            if a.anchor_ms != i64::MIN {
                self.stats.audio_reanchors += 1;
                tracing::info!(
                    drift_ms = media_ms - expected_ms,
                    "audio re-anchored to the source clock"
                );
            }
            a.anchor_ms = media_ms;
            a.frames_since_anchor = 0;
            a.transcoder.restart_at(0);
        }
        a.frames_since_anchor += 1;
        let frames = match a.transcoder.push(frame) {
            Ok(f) => f,
            Err(e) => {
                self.stats.audio_decode_errors += 1;
                tracing::debug!(error = %e, "AAC frame not transcoded");
                return;
            }
        };
        self.stats.audio_frames += 1;
        for f in frames {
            let ts = a
                .rtp_base
                .wrapping_add((a.anchor_ms * 48) as u32)
                .wrapping_add(f.sample as u32);
            let packet = Packet {
                header: Header {
                    version: 2,
                    payload_type: 0,
                    sequence_number: a.seq,
                    timestamp: ts,
                    ssrc: a.ssrc,
                    ..Default::default()
                },
                payload: f.data,
            };
            a.seq = a.seq.wrapping_add(1);
            a.last_ts = ts;
            self.out.push_back(Output::Rtp {
                kind: Kind::Audio,
                packet,
                keyframe: false,
                arrived: now,
            });
            let due = a
                .last_sr
                .is_none_or(|t| now.duration_since(t) >= SR_INTERVAL);
            if due {
                a.last_sr = Some(now);
                let media = a.anchor_ms as f64 + f.sample as f64 / 48.0;
                let ntp = self.clock.as_ref().expect("started").ntp(media);
                self.out.push_back(Output::SenderReport {
                    kind: Kind::Audio,
                    report: SenderReport {
                        ssrc: a.ssrc,
                        ntp_time: ntp,
                        rtp_time: ts,
                        ..Default::default()
                    },
                });
            }
        }
    }
}

#[cfg(test)]
mod tests;
