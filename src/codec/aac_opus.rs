//! AAC-LC → Opus for browsers: decode (symphonia), resample to 48 kHz, a sample FIFO,
//! libopus in 5 ms frames, and after each AAC frame one Opus packet holding every whole
//! 5 ms frame then held (several frames in one packet, RFC 6716 §3.2.5, joined by
//! libopus's repacketizer). Timestamps are the caller's business: it gets the output
//! sample index of every packet (48 kHz, counted from the first sample in).
//!
//! Why one packet per AAC frame: a receiver's jitter buffer (Chrome's NetEq) measures
//! each packet's arrival against its RTP timestamp, i.e. against its *first* sample,
//! and sizes its target delay from how much that varies (a histogram of 20 ms buckets,
//! 95th percentile). AAC arrives in 1024-sample (21.3 ms) blocks, so every Opus packet
//! leaves when the block holding its last sample arrives. Cut into fixed 20 ms packets
//! (or 20 ms plus a 10 ms one), the age of a packet's first sample at departure ramps
//! through a ~21 ms sawtooth: NetEq reads it as 21 ms of network jitter and holds 40 ms
//! instead of 20 (and lip sync then holds the video back to match). Sending, after each
//! block, everything whole in a single packet makes that age the block's length plus
//! what was left over before it: 21.3 ms plus under one frame, a spread under 5 ms.
//! 5 ms frames (CELT) keep the leftover, and so the spread, small; packets are 20 or
//! 25 ms long. The encoder runs in restricted-low-delay mode (CELT only, 2.5 ms look-ahead).

use std::panic::AssertUnwindSafe;

use bytes::Bytes;
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{CodecParameters, Decoder, DecoderOptions, CODEC_TYPE_AAC};
use symphonia::core::formats::Packet;

use super::aac::AudioConfig;
use super::resample::Resampler;

pub const OPUS_RATE: u32 = 48_000;
/// 5 ms at 48 kHz: the size of every encoded Opus frame.
pub const OPUS_FRAME: usize = 240;
/// Most frames in one packet: 120 ms, RFC 6716's limit for a packet.
const MAX_FRAMES_PER_PACKET: usize = 24;
/// Most payload bytes in one packet, so that an RTP packet stays under a path's MTU
/// at any configured bitrate (a packet that would exceed it is split in two).
const MAX_PACKET_BYTES: usize = 1000;
/// An AAC-LC frame's samples per channel.
pub const AAC_FRAME: usize = 1024;
/// The Opus encoder's complexity: the highest that skips libopus's signal analysis
/// (run at 7 and up: speech/music and bandwidth detection, worth little to CELT-only
/// 5 ms frames). Measured on this transcoder, 64 kbit/s stereo: 135 → 93 µs per AAC
/// frame (`cargo bench --bench hot_paths -- aac_to_opus`), a third of the transcode's
/// CPU; a music-like test signal (six tones, a chirp, noise) decoded back at 16.25 dB
/// waveform SNR against 16.19 at the default 10. libwebrtc encodes at 5 on phones.
const COMPLEXITY: i32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    #[error("AAC decoder: {0}")]
    Decode(String),
    #[error("Opus encoder: {0}")]
    Encode(String),
    #[error("cannot resample {0} Hz to 48 kHz")]
    Rate(u32),
}

/// One Opus packet (one or more 5 ms frames).
#[derive(Debug, Clone)]
pub struct OpusFrame {
    pub data: Bytes,
    /// Index of its first sample in the 48 kHz output.
    pub sample: u64,
    /// Its duration in 48 kHz samples.
    pub samples: u32,
}

pub struct AacToOpus {
    pub config: AudioConfig,
    asc: Vec<u8>,
    decoder: symphonia::default::codecs::AacDecoder,
    resampler: Option<Resampler>,
    channels: usize,
    /// Interleaved 48 kHz samples waiting for a whole Opus frame.
    fifo: Vec<f32>,
    /// Output sample index of `fifo[0]`.
    fifo_start: u64,
    encoder: opus::Encoder,
    repacketizer: opus::Repacketizer,
    resampled: Vec<f32>,
    /// The frames encoded from one AAC frame, before they are joined into packets.
    encoded: Vec<Vec<u8>>,
    out: Vec<u8>,
    /// AAC frames that failed to decode (each is replaced by nothing).
    pub decode_errors: u64,
}

impl AacToOpus {
    pub fn new(config: AudioConfig, asc: &[u8], bitrate: i32) -> Result<Self, TranscodeError> {
        let decoder = Self::decoder(config, asc)?;
        let channels = usize::from(config.channels);
        let resampler = if config.sample_rate == OPUS_RATE {
            None
        } else {
            Some(
                Resampler::new(config.sample_rate, OPUS_RATE, channels)
                    .ok_or(TranscodeError::Rate(config.sample_rate))?,
            )
        };
        let opus_channels = if channels == 1 {
            opus::Channels::Mono
        } else {
            opus::Channels::Stereo
        };
        // 5 ms frames are CELT only, so the "audio" application's extra 4 ms of delay
        // (kept to switch to SILK smoothly) buys nothing: restricted low delay drops
        // it, 2.5 ms of look-ahead instead of 6.5.
        let mut encoder = opus::Encoder::new(OPUS_RATE, opus_channels, opus::Application::LowDelay)
            .map_err(|e| TranscodeError::Encode(e.to_string()))?;
        encoder
            .set_bitrate(opus::Bitrate::Bits(bitrate))
            .map_err(|e| TranscodeError::Encode(e.to_string()))?;
        encoder
            .set_complexity(COMPLEXITY)
            .map_err(|e| TranscodeError::Encode(e.to_string()))?;
        Ok(Self {
            config,
            asc: asc.to_vec(),
            decoder,
            resampler,
            channels,
            fifo: Vec::with_capacity(OPUS_FRAME * 4 * channels),
            fifo_start: 0,
            encoder,
            repacketizer: opus::Repacketizer::new()
                .map_err(|e| TranscodeError::Encode(e.to_string()))?,
            resampled: Vec::with_capacity(AAC_FRAME * 2 * channels),
            encoded: Vec::new(),
            out: vec![0u8; 4000],
            decode_errors: 0,
        })
    }

    fn decoder(
        config: AudioConfig,
        asc: &[u8],
    ) -> Result<symphonia::default::codecs::AacDecoder, TranscodeError> {
        let mut params = CodecParameters::new();
        params
            .for_codec(CODEC_TYPE_AAC)
            .with_sample_rate(config.sample_rate)
            .with_extra_data(asc.to_vec().into_boxed_slice());
        symphonia::default::codecs::AacDecoder::try_new(&params, &DecoderOptions::default())
            .map_err(|e| TranscodeError::Decode(e.to_string()))
    }

    /// Samples held in the FIFO (always under one 5 ms frame between calls).
    pub fn held_samples(&self) -> usize {
        self.fifo.len() / self.channels
    }

    /// Drops buffered samples and restarts the output count at `sample` (re-anchoring).
    pub fn restart_at(&mut self, sample: u64) {
        self.fifo.clear();
        self.fifo_start = sample;
    }

    /// Decodes one raw AAC frame; returns the Opus frames it completed.
    pub fn push(&mut self, aac: &[u8]) -> Result<Vec<OpusFrame>, TranscodeError> {
        let packet = Packet::new_from_slice(0, 0, AAC_FRAME as u64, aac);
        // A decoder bug on hostile input must not take the server down.
        let decoded =
            std::panic::catch_unwind(AssertUnwindSafe(|| match self.decoder.decode(&packet) {
                Ok(buf) => {
                    let mut sb = SampleBuffer::<f32>::new(buf.capacity() as u64, *buf.spec());
                    sb.copy_interleaved_ref(buf);
                    Ok(sb.samples().to_vec())
                }
                Err(e) => Err(e.to_string()),
            }));
        let pcm = match decoded {
            Ok(Ok(pcm)) => pcm,
            Ok(Err(e)) => {
                self.decode_errors += 1;
                return Err(TranscodeError::Decode(e));
            }
            Err(_) => {
                // symphonia-codec-aac 0.5 indexes out of bounds on some malformed
                // frames (found by fuzzing): contain it and start from a fresh decoder.
                self.decode_errors += 1;
                self.decoder = Self::decoder(self.config, &self.asc)?;
                return Err(TranscodeError::Decode(
                    "malformed AAC frame (the decoder panicked; it was restarted)".into(),
                ));
            }
        };
        match &mut self.resampler {
            Some(r) => {
                self.resampled.clear();
                r.process(&pcm, &mut self.resampled);
                self.fifo.extend_from_slice(&self.resampled);
            }
            None => self.fifo.extend_from_slice(&pcm),
        }
        // Encode every whole frame held...
        let mut consumed = 0;
        let mut n_frames = 0;
        while (self.fifo.len() - consumed) / self.channels >= OPUS_FRAME {
            let frame_len = OPUS_FRAME * self.channels;
            let n = self
                .encoder
                .encode_float(&self.fifo[consumed..consumed + frame_len], &mut self.out)
                .map_err(|e| TranscodeError::Encode(e.to_string()))?;
            if self.encoded.len() <= n_frames {
                self.encoded.push(Vec::with_capacity(n.max(64)));
            }
            let slot = &mut self.encoded[n_frames];
            slot.clear();
            slot.extend_from_slice(&self.out[..n]);
            n_frames += 1;
            consumed += frame_len;
        }
        self.fifo.drain(..consumed);
        // ...and join them into as few packets as the format allows: normally one.
        let mut frames = Vec::new();
        let mut first = 0;
        while first < n_frames {
            let mut end = first;
            let mut bytes = 0;
            let mut state = self.repacketizer.begin();
            while end < n_frames
                && end - first < MAX_FRAMES_PER_PACKET
                && (end == first || bytes + self.encoded[end].len() <= MAX_PACKET_BYTES)
            {
                // Frames of another mode or bandwidth (the TOC differs) cannot share
                // a packet: the next packet starts with them.
                if state.cat(&self.encoded[end]).is_err() {
                    break;
                }
                bytes += self.encoded[end].len();
                end += 1;
            }
            if end == first {
                // Not even one frame was accepted: the encoder's output is unusable.
                return Err(TranscodeError::Encode(
                    "frame refused by the repacketizer".into(),
                ));
            }
            let n = state
                .out(&mut self.out)
                .map_err(|e| TranscodeError::Encode(e.to_string()))?;
            let samples = ((end - first) * OPUS_FRAME) as u32;
            frames.push(OpusFrame {
                data: Bytes::copy_from_slice(&self.out[..n]),
                sample: self.fifo_start,
                samples,
            });
            self.fifo_start += u64::from(samples);
            first = end;
        }
        Ok(frames)
    }
}

#[cfg(all(test, feature = "fdk-aac"))]
mod tests {
    use super::*;
    use crate::codec::opus_aac::OpusToAac;

    /// Real AAC-LC frames (48 kHz stereo, a 1 kHz tone), from the FDK encoder.
    fn aac_tone(seconds: usize) -> (Vec<u8>, Vec<Bytes>) {
        let mut enc =
            opus::Encoder::new(48_000, opus::Channels::Stereo, opus::Application::Audio).unwrap();
        let mut to_aac = OpusToAac::new(128_000).unwrap();
        let mut buf = vec![0u8; 1500];
        let mut aac = Vec::new();
        for p in 0..seconds * 50 {
            let pcm: Vec<f32> = (0..960)
                .flat_map(|i| {
                    let t = (p * 960 + i) as f32 / 48_000.0;
                    let v = (t * 2.0 * std::f32::consts::PI * 1000.0).sin() * 0.3;
                    [v, v]
                })
                .collect();
            let n = enc.encode_float(&pcm, &mut buf).unwrap();
            aac.extend(
                to_aac
                    .push(Some(&buf[..n]))
                    .unwrap()
                    .into_iter()
                    .map(|f| f.data),
            );
        }
        (to_aac.asc().to_vec(), aac)
    }

    /// The cause of issue 13's jitter-buffer depth, pinned down: a receiver sizes its
    /// buffer from how much the age of a packet's first sample at departure varies.
    /// With one packet per AAC frame that age is the AAC frame plus under one 5 ms
    /// frame left over; with fixed 20 ms packets it ramped through ~21 ms.
    #[test]
    fn every_packet_leaves_with_its_first_sample_the_same_age() {
        let (asc, frames) = aac_tone(3);
        let config = AudioConfig::parse(&asc).unwrap();
        let mut t = AacToOpus::new(config, &asc, 64_000).unwrap();
        let mut decoder = opus::Decoder::new(48_000, opus::Channels::Stereo).unwrap();
        let mut next = 0u64;
        let mut durations = std::collections::BTreeMap::new();
        let mut ages = Vec::new();
        let mut packets_per_block = std::collections::BTreeMap::new();
        for f in &frames {
            let out = t.push(f).unwrap();
            *packets_per_block.entry(out.len()).or_insert(0) += 1;
            // Everything decoded so far: the packets' samples and what is held.
            let departed_at = next
                + out.iter().map(|o| u64::from(o.samples)).sum::<u64>()
                + t.held_samples() as u64;
            for o in out {
                // Contiguous: each packet starts where the last ended.
                assert_eq!(o.sample, next);
                let n = opus::packet::get_nb_samples(&o.data, 48_000).unwrap();
                assert_eq!(n as u32, o.samples);
                let mut pcm = vec![0f32; 5760 * 2];
                assert_eq!(decoder.decode_float(&o.data, &mut pcm, false).unwrap(), n);
                *durations.entry(n).or_insert(0) += 1;
                ages.push(departed_at - o.sample);
                next += n as u64;
            }
            assert!(t.held_samples() < OPUS_FRAME, "{} held", t.held_samples());
        }
        assert!(
            next >= (frames.len() as u64 - 1) * 1024,
            "{next} samples out"
        );
        // The first sample's age at departure: 1024 samples plus under one frame.
        let (lo, hi) = (ages.iter().min().unwrap(), ages.iter().max().unwrap());
        assert!(
            *lo >= 1024 && *hi < 1024 + OPUS_FRAME as u64,
            "ages {lo}..{hi}"
        );
        // One packet per AAC frame, 20 or 25 ms long.
        assert_eq!(
            packets_per_block.keys().copied().collect::<Vec<_>>(),
            vec![1],
            "{packets_per_block:?}"
        );
        assert_eq!(
            durations.keys().copied().collect::<Vec<_>>(),
            vec![960, 1200],
            "{durations:?}"
        );
    }
}
