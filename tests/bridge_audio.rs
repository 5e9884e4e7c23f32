//! The bridge's audio clock with real AAC (made by ffmpeg): Opus RTP timestamps come
//! from the sample count, jitter in the FLV timestamps does not move them, and a real
//! jump in the source clock re-anchors them once.

use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use weir::bridge::{Bridge, BridgeConfig, Output};
use weir_signaling::Kind;

/// Raw AAC frames and the AudioSpecificConfig of an ADTS file ffmpeg writes.
fn aac_frames(rate: u32, channels: u32, seconds: u32) -> (Vec<u8>, Vec<Vec<u8>>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tone.aac");
    let ok = Command::new("ffmpeg")
        .args(["-v", "error", "-f", "lavfi", "-i"])
        .arg(format!("sine=frequency=1000:sample_rate={rate}"))
        .args([
            "-t",
            &seconds.to_string(),
            "-c:a",
            "aac",
            "-ac",
            &channels.to_string(),
        ])
        .args(["-f", "adts"])
        .arg(&path)
        .status()
        .expect("ffmpeg runs (scripts/install-deps.sh test installs it)")
        .success();
    assert!(ok);
    let data = std::fs::read(&path).unwrap();
    let mut frames = Vec::new();
    let mut asc = Vec::new();
    let mut i = 0;
    while i + 7 <= data.len() {
        assert_eq!(data[i], 0xff, "ADTS sync");
        let protection_absent = data[i + 1] & 1 == 1;
        let profile = (data[i + 2] >> 6) + 1;
        let freq_index = (data[i + 2] >> 2) & 0x0f;
        let ch = ((data[i + 2] & 1) << 2) | (data[i + 3] >> 6);
        let len = (((data[i + 3] & 3) as usize) << 11)
            | ((data[i + 4] as usize) << 3)
            | (data[i + 5] as usize >> 5);
        let header = if protection_absent { 7 } else { 9 };
        if asc.is_empty() {
            let v: u16 =
                (u16::from(profile) << 11) | (u16::from(freq_index) << 7) | (u16::from(ch) << 3);
            asc = v.to_be_bytes().to_vec();
        }
        frames.push(data[i + header..i + len].to_vec());
        i += len;
    }
    (asc, frames)
}

fn tag(packet_type: u8, body: &[u8]) -> Bytes {
    let mut t = vec![0xaf, packet_type];
    t.extend_from_slice(body);
    Bytes::from(t)
}

/// Feeds the frames with the given FLV timestamps; returns the Opus RTP timestamps and
/// each packet's duration in samples.
fn run(
    asc: &[u8],
    frames: &[Vec<u8>],
    flv_ms: impl Fn(usize) -> u32,
) -> (Vec<u32>, Vec<u32>, Bridge) {
    let t0 = Instant::now();
    let mut b = Bridge::new(BridgeConfig::default(), t0, 0);
    b.handle_audio(0, &tag(0, asc), t0);
    let mut ts = Vec::new();
    let mut durations = Vec::new();
    for (n, f) in frames.iter().enumerate() {
        let ms = flv_ms(n);
        // Arrival in real time, so nothing counts as a burst or a backlog.
        let at = t0 + Duration::from_millis(u64::from(ms));
        b.handle_audio(ms, &tag(1, f), at);
        while let Some(o) = b.poll_output() {
            if let Output::Rtp {
                kind: Kind::Audio,
                packet,
                ..
            } = o
            {
                ts.push(packet.header.timestamp);
                durations
                    .push(opus::packet::get_nb_samples(&packet.payload, 48_000).unwrap() as u32);
            }
        }
    }
    (ts, durations, b)
}

#[test]
fn opus_timestamps_count_samples_and_ignore_jitter() {
    let (asc, frames) = aac_frames(44_100, 2, 3);
    assert!(frames.len() > 100);
    // FLV timestamps rounded to ms plus ±15 ms of jitter.
    let (ts, durations, b) = run(&asc, &frames, |n| {
        let ideal = (n as f64 * 1024.0 * 1000.0 / 44_100.0) as u32;
        let jitter = [0i32, 15, -15, 7][n % 4];
        (ideal as i32 + 20 + jitter).max(0) as u32
    });
    assert_eq!(b.stats.audio_reanchors, 0);
    assert_eq!(b.stats.audio_decode_errors, 0);
    assert!(ts.len() > 100);
    // One packet per AAC frame, four or five 5 ms frames (20 or 25 ms); each starts
    // exactly where the last ended.
    assert!(
        durations.iter().all(|d| *d == 960 || *d == 1200),
        "{durations:?}"
    );
    for (i, w) in ts.windows(2).enumerate() {
        assert_eq!(w[1].wrapping_sub(w[0]), durations[i], "packet {i}");
    }
}

#[test]
fn a_jump_in_the_source_clock_reanchors_once() {
    let (asc, frames) = aac_frames(48_000, 1, 3);
    let frame_ms = 1024.0 * 1000.0 / 48_000.0;
    let jump_at = 60;
    let (ts, durations, b) = run(&asc, &frames, |n| {
        let ms = (n as f64 * frame_ms) as u32;
        if n >= jump_at {
            ms + 2000
        } else {
            ms
        }
    });
    assert_eq!(b.stats.audio_reanchors, 1);
    // One step in the timestamps, of about the jump plus what the restart discarded.
    let steps: Vec<u32> = ts
        .windows(2)
        .enumerate()
        .filter(|(i, w)| w[1].wrapping_sub(w[0]) != durations[*i])
        .map(|(_, w)| w[1].wrapping_sub(w[0]))
        .collect();
    assert_eq!(steps.len(), 1, "{steps:?}");
    let jump_ms = f64::from(steps[0]) / 48.0;
    assert!((2000.0..2060.0).contains(&jump_ms), "{jump_ms}");
}
