//! Checking what a subscriber received with real decoders: H.264 reassembled from RTP
//! (RFC 6184) and decoded by ffmpeg; Opus decoded by libopus and looked at for a tone.

use std::path::Path;
use std::process::Stdio;

use super::peer::Received;

/// Reassembles H.264 RTP payloads (single NAL, STAP-A, FU-A) into an Annex-B stream,
/// in sequence-number order.
pub fn h264_annex_b(packets: &[Received]) -> Vec<u8> {
    let mut sorted: Vec<&Received> = packets.iter().collect();
    if let Some(first) = packets.first() {
        let base = first.seq;
        sorted.sort_by_key(|r| r.seq.wrapping_sub(base));
    }
    let mut out = Vec::new();
    let start = [0u8, 0, 0, 1];
    for r in sorted {
        let p = &r.payload;
        if p.is_empty() {
            continue;
        }
        match p[0] & 0x1f {
            1..=23 => {
                out.extend_from_slice(&start);
                out.extend_from_slice(p);
            }
            24 => {
                let mut i = 1;
                while i + 2 <= p.len() {
                    let len = u16::from_be_bytes([p[i], p[i + 1]]) as usize;
                    i += 2;
                    if i + len > p.len() {
                        break;
                    }
                    out.extend_from_slice(&start);
                    out.extend_from_slice(&p[i..i + len]);
                    i += len;
                }
            }
            28 if p.len() > 2 => {
                if p[1] & 0x80 != 0 {
                    out.extend_from_slice(&start);
                    out.push((p[0] & 0xe0) | (p[1] & 0x1f));
                }
                out.extend_from_slice(&p[2..]);
            }
            _ => {}
        }
    }
    out
}

/// What ffmpeg made of an H.264 elementary stream: frames decoded, size, and anything
/// it complained about.
#[derive(Debug)]
pub struct Decoded {
    pub frames: u64,
    pub width: u32,
    pub height: u32,
    pub errors: String,
}

pub async fn decode_h264(annex_b: &[u8], dir: &Path) -> Decoded {
    let path = dir.join("received.h264");
    std::fs::write(&path, annex_b).unwrap();
    let probe = tokio::process::Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args(["-show_entries", "stream=nb_read_frames,width,height"])
        .args(["-of", "csv=p=0"])
        .arg(&path)
        .output()
        .await
        .expect("ffprobe runs (scripts/install-deps.sh test installs it)");
    let text = String::from_utf8_lossy(&probe.stdout).to_string();
    let fields: Vec<&str> = text.trim().split(',').collect();
    let decode = tokio::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&path)
        .args(["-f", "null", "-"])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("ffmpeg runs");
    Decoded {
        width: fields.first().and_then(|v| v.parse().ok()).unwrap_or(0),
        height: fields.get(1).and_then(|v| v.parse().ok()).unwrap_or(0),
        frames: fields.get(2).and_then(|v| v.parse().ok()).unwrap_or(0),
        errors: String::from_utf8_lossy(&probe.stderr).to_string()
            + &String::from_utf8_lossy(&decode.stderr),
    }
}

/// Decodes Opus packets (in order) to interleaved 48 kHz PCM with `channels`.
pub fn decode_opus(packets: &[Received], channels: usize) -> Vec<f32> {
    let ch = if channels == 1 {
        opus::Channels::Mono
    } else {
        opus::Channels::Stereo
    };
    let mut dec = opus::Decoder::new(48_000, ch).unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0f32; 5760 * channels];
    for p in packets {
        let n = dec
            .decode_float(&p.payload, &mut buf, false)
            .expect("the Opus packet decodes");
        out.extend_from_slice(&buf[..n * channels]);
    }
    out
}

/// Power of `freq` in mono `samples` (Goertzel), normalized by length.
pub fn tone_power(samples: &[f32], rate: f32, freq: f32) -> f32 {
    let w = 2.0 * std::f32::consts::PI * freq / rate;
    let coeff = 2.0 * w.cos();
    let (mut s1, mut s2) = (0f32, 0f32);
    for &x in samples {
        let s = x + coeff * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    (s1 * s1 + s2 * s2 - coeff * s1 * s2) / (samples.len() as f32).powi(2)
}

/// ffmpeg's complaints decoding the FLV recording `file` (empty when it decodes
/// cleanly). The FLV's millisecond time base is kept (`-enc_time_base -1`): with the
/// default (1/frame rate), two frames a little under a frame interval apart (Chrome
/// capturing on a busy machine) fold onto one tick and the null muxer reports
/// "non monotonically increasing dts", though the FLV's timestamps are strictly
/// increasing; equal or backward FLV timestamps still show.
pub fn flv_decode_errors(file: &Path) -> String {
    let out = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(file)
        .args(["-enc_time_base", "-1", "-f", "null", "-"])
        .stdin(Stdio::null())
        .output()
        .expect("ffmpeg runs");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Each decoded video frame of a recorded file: its presentation time (s) and the
/// frame index drawn in it (`common::source::read_index`; the picture is scaled to the
/// source's size first, so a lowered resolution reads the same).
pub fn recorded_frames(file: &Path) -> Vec<(f64, usize)> {
    use super::source::{read_index, H, W};
    let probe = std::process::Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-show_entries"])
        .args(["frame=pts_time", "-of", "csv=p=0"])
        .arg(file)
        .output()
        .expect("ffprobe runs");
    let times: Vec<f64> = String::from_utf8_lossy(&probe.stdout)
        .lines()
        .filter_map(|l| l.trim().trim_end_matches(',').parse().ok())
        .collect();
    let out = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(file)
        .args(["-map", "0:v:0", "-fps_mode", "passthrough"])
        .args(["-vf", &format!("scale={W}:{H}"), "-pix_fmt", "gray"])
        .args(["-f", "rawvideo", "-"])
        .stdin(Stdio::null())
        .output()
        .expect("ffmpeg runs");
    let frames: Vec<usize> = out.stdout.chunks_exact(W * H).map(read_index).collect();
    assert_eq!(
        times.len(),
        frames.len(),
        "ffprobe and ffmpeg decode as many frames"
    );
    times.into_iter().zip(frames).collect()
}

/// A recorded file's first audio stream decoded to 48 kHz mono: when its first sample
/// plays (s) and the samples.
pub fn recorded_audio(file: &Path) -> (f64, Vec<i16>) {
    let probe = std::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-select_streams",
            "a:0",
            "-read_intervals",
            "%+#1",
        ])
        .args(["-show_entries", "frame=pts_time", "-of", "csv=p=0"])
        .arg(file)
        .output()
        .expect("ffprobe runs");
    let start: f64 = String::from_utf8_lossy(&probe.stdout)
        .lines()
        .find_map(|l| l.trim().trim_end_matches(',').parse().ok())
        .expect("an audio frame");
    let out = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(file)
        .args([
            "-map", "0:a:0", "-ac", "1", "-ar", "48000", "-f", "s16le", "-",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("ffmpeg runs");
    let samples = out
        .stdout
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
        .collect();
    (start, samples)
}

/// Where each beep begins (s from the first sample, 48 kHz): a sample well above the
/// noise after at least 300 ms of quiet.
pub fn beep_onsets(samples: &[i16]) -> Vec<f64> {
    let mut onsets = Vec::new();
    let mut quiet = 0usize;
    for (i, &s) in samples.iter().enumerate() {
        if s.unsigned_abs() > 3000 {
            if quiet >= 48_000 * 3 / 10 {
                onsets.push(i as f64 / 48_000.0);
            }
            quiet = 0;
        } else if s.unsigned_abs() < 1000 {
            quiet += 1;
        }
    }
    onsets
}

/// For each beep of a recording of the generated source (a beep with frame 30·k),
/// how much later it is heard than that frame is shown (ms; negative: earlier).
/// The frame of a beep is the nearest multiple of 30 in time, so offsets beyond
/// ±500 ms would alias; a dropped frame 30·k is placed from its neighbours.
pub fn av_offsets_ms(file: &Path) -> Vec<f64> {
    let frames = recorded_frames(file);
    let (start, samples) = recorded_audio(file);
    assert!(frames.len() > 30, "{} frames", frames.len());
    beep_onsets(&samples)
        .into_iter()
        .map(|at| {
            let heard = start + at;
            // The frame nearest in time, then the multiple of 30 nearest it.
            let (t, n) = *frames
                .iter()
                .min_by(|a, b| (a.0 - heard).abs().total_cmp(&(b.0 - heard).abs()))
                .expect("frames");
            let k30 = ((n as f64 / 30.0).round() * 30.0) as i64;
            // Where frame 30·k is (or would be) shown: from the frame decoded
            // closest to it by index.
            let (tk, nk) = *frames
                .iter()
                .min_by_key(|(_, i)| (*i as i64 - k30).abs())
                .unwrap_or(&(t, n));
            let shown = tk - (nk as f64 - k30 as f64) / 30.0;
            (heard - shown) * 1000.0
        })
        .collect()
}
