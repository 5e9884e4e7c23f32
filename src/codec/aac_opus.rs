//! AAC-LC → Opus for browsers: decode (symphonia), resample to 48 kHz, a sample FIFO,
//! and libopus in 20 ms frames, then one 10 ms frame when 10 ms more are held.
//! Timestamps are the caller's business: it gets the output sample index of every
//! frame (48 kHz, counted from the first sample in).
//!
//! Why the 10 ms frames: AAC arrives in 1024-sample (21.3 ms) blocks. Cut into 20 ms
//! frames only, a frame waits up to 20 ms for its last samples, and how long it waits
//! ramps through a 21.3 ms sawtooth (+1.3 ms per frame, reset every 15 blocks). A
//! receiver's jitter buffer reads that sawtooth as 21 ms of network jitter: Chrome's
//! NetEq, whose delay histogram has 20 ms buckets, then holds 40 ms instead of 20 (and
//! lip sync holds the video back to match). With a 10 ms frame whenever 10 ms more
//! are there, nothing waits more than 10 ms and the spread is half a bucket.

use std::panic::AssertUnwindSafe;

use bytes::Bytes;
use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{CodecParameters, Decoder, DecoderOptions, CODEC_TYPE_AAC};
use symphonia::core::formats::Packet;

use super::aac::AudioConfig;
use super::resample::Resampler;

pub const OPUS_RATE: u32 = 48_000;
/// 20 ms at 48 kHz.
pub const OPUS_FRAME: usize = 960;
/// 10 ms at 48 kHz: what is left after the 20 ms frames, if at least this much.
pub const OPUS_SHORT_FRAME: usize = 480;
/// An AAC-LC frame's samples per channel.
pub const AAC_FRAME: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    #[error("AAC decoder: {0}")]
    Decode(String),
    #[error("Opus encoder: {0}")]
    Encode(String),
    #[error("cannot resample {0} Hz to 48 kHz")]
    Rate(u32),
}

/// One encoded Opus frame.
#[derive(Debug, Clone)]
pub struct OpusFrame {
    pub data: Bytes,
    /// Index of its first sample in the 48 kHz output.
    pub sample: u64,
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
    resampled: Vec<f32>,
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
        let mut encoder = opus::Encoder::new(OPUS_RATE, opus_channels, opus::Application::Audio)
            .map_err(|e| TranscodeError::Encode(e.to_string()))?;
        encoder
            .set_bitrate(opus::Bitrate::Bits(bitrate))
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
            resampled: Vec::with_capacity(AAC_FRAME * 2 * channels),
            out: vec![0u8; 1500],
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

    /// Samples held in the FIFO (always under 10 ms between calls).
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
        let mut frames = Vec::new();
        let mut consumed = 0;
        loop {
            let held = (self.fifo.len() - consumed) / self.channels;
            let size = if held >= OPUS_FRAME {
                OPUS_FRAME
            } else if held >= OPUS_SHORT_FRAME {
                OPUS_SHORT_FRAME
            } else {
                break;
            };
            let frame_len = size * self.channels;
            let n = self
                .encoder
                .encode_float(&self.fifo[consumed..consumed + frame_len], &mut self.out)
                .map_err(|e| TranscodeError::Encode(e.to_string()))?;
            frames.push(OpusFrame {
                data: Bytes::copy_from_slice(&self.out[..n]),
                sample: self.fifo_start,
            });
            consumed += frame_len;
            self.fifo_start += size as u64;
        }
        self.fifo.drain(..consumed);
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

    #[test]
    fn no_opus_frame_waits_more_than_10_ms_for_its_samples() {
        let (asc, frames) = aac_tone(2);
        let config = AudioConfig::parse(&asc).unwrap();
        let mut t = AacToOpus::new(config, &asc, 64_000).unwrap();
        let mut decoder = opus::Decoder::new(48_000, opus::Channels::Stereo).unwrap();
        let mut next = 0u64;
        let mut durations = std::collections::BTreeMap::new();
        for f in &frames {
            for o in t.push(f).unwrap() {
                // Contiguous: each frame starts where the last ended.
                assert_eq!(o.sample, next);
                let n = opus::packet::get_nb_samples(&o.data, 48_000).unwrap();
                let mut pcm = vec![0f32; 5760 * 2];
                assert_eq!(decoder.decode_float(&o.data, &mut pcm, false).unwrap(), n);
                *durations.entry(n).or_insert(0) += 1;
                next += n as u64;
            }
            // What is held back after each AAC block is under 10 ms: no frame waits
            // for more than that, so the arrival spread stays under one NetEq bucket.
            assert!(
                t.held_samples() < OPUS_SHORT_FRAME,
                "{} held",
                t.held_samples()
            );
        }
        assert!(
            next >= (frames.len() as u64 - 1) * 1024,
            "{next} samples out"
        );
        assert_eq!(
            durations.keys().copied().collect::<Vec<_>>(),
            vec![480, 960],
            "{durations:?}"
        );
    }
}
