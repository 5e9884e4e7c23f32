//! RTMP → WebRTC latency and CPU: a real ffmpeg pusher (x264 zerolatency, 640x360,
//! 30 fps, 1 Mbit/s, 1 s GOP, AAC 44.1 kHz stereo) into a room, a `webrtc`-crate
//! subscriber on loopback.
//!
//! End to end: the bench makes every raw frame itself, draws its index into the
//! picture (16 black/white blocks), and writes it to ffmpeg's stdin at 30 fps, noting
//! when. The subscriber notes when each frame's last RTP packet arrives; afterwards the
//! received stream is decoded and the index read back from the picture, so every
//! arrival is matched to its write. That span holds x264's encode, ffmpeg's muxing,
//! TCP, Weir, SRTP and the client: an upper bound on Weir's share. Weir's own share
//! (RTMP message read → RTP handed to the kernel) is `weir_bridge_latency_seconds`
//! from /metrics.
//!
//! Run: `cargo bench --bench bridge` (env: BENCH_SECONDS=30)

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::media::h264_annex_b;
use common::peer::RtcPeer;
use common::source::{frame, read_index, FPS, H, W};
use common::{Client, TestServer, APP};
use weir::auth::{Privileges, RoomId, TokenKind};
use weir_signaling::{ClientMessage, ServerMessage, Target};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds = env("BENCH_SECONDS", 30);
    let t = TestServer::start_with(|c| c.server.rtmp_addr = "127.0.0.1:0".into()).await;
    let (mut signal, _) = Client::join(&t.ws_url(), t.join("viewer", 7, 0xff)).await;

    let now = weir::auth::unix_now();
    let sig = t
        .app
        .issue_user_sig(TokenKind::V2, "pusher", now, 3600)
        .unwrap();
    let pmk = t
        .app
        .issue_private_map_key(
            TokenKind::V2,
            "pusher",
            &RoomId::Num(7),
            Privileges::ALL,
            now,
            3600,
        )
        .unwrap();
    let url = format!(
        "rtmp://{}/live/bench?sdkappid={APP}&userid=pusher&roomid=7&usersig={sig}&privatemapkey={pmk}",
        t.server.rtmp_addr.unwrap()
    );
    let with_audio = env("BENCH_AUDIO", 1) == 1;
    let size = format!("{W}x{H}");
    let mut args: Vec<&str> = vec!["-hide_banner", "-v", "error"];
    args.extend(["-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", &size]);
    args.extend(["-framerate", "30", "-i", "pipe:0"]);
    // Audio comes from the same writer, through a FIFO, on the same schedule as the
    // video: both inputs start their clocks together, as a camera's capture would.
    let fifo_dir = tempfile::tempdir().unwrap();
    let fifo = fifo_dir.path().join("audio.pcm");
    let fifo_str = fifo.to_str().unwrap().to_owned();
    if with_audio {
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success(), "mkfifo");
        args.extend(["-f", "s16le", "-ar", "44100", "-ac", "2", "-i", &fifo_str]);
    }
    args.extend([
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-tune",
        "zerolatency",
    ]);
    args.extend([
        "-bf", "0", "-g", "30", "-b:v", "1M", "-maxrate", "1M", "-bufsize", "1M",
    ]);
    if with_audio {
        args.extend(["-c:a", "aac", "-ar", "44100", "-ac", "2"]);
    }
    args.extend(["-muxdelay", "0", "-muxpreload", "0", "-f", "flv", &url]);
    let mut ffmpeg = std::process::Command::new("ffmpeg")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("ffmpeg runs (scripts/install-deps.sh test installs it)");
    let mut stdin = ffmpeg.stdin.take().unwrap();
    let frames = (seconds * FPS) as usize;
    let written: Arc<Mutex<Vec<Instant>>> = Arc::default();
    // Two writers on one schedule (each blocks on its own pipe while ffmpeg starts up).
    let start = Instant::now();
    let writer = {
        let written = written.clone();
        std::thread::spawn(move || {
            for n in 0..frames {
                let due = start + Duration::from_micros(n as u64 * 1_000_000 / FPS);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let f = frame(n);
                written.lock().unwrap().push(Instant::now());
                if stdin.write_all(&f).is_err() {
                    break;
                }
            }
        })
    };
    let audio_writer = with_audio.then(|| {
        std::thread::spawn(move || {
            // Opening a FIFO for writing waits for ffmpeg to open it for reading.
            let mut pcm = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
            let mut sample = 0u64;
            for n in 0..frames {
                let due = start + Duration::from_micros(n as u64 * 1_000_000 / FPS);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                // 1/30 s of a 1 kHz tone, stereo s16le.
                let until = (n as u64 + 1) * 44_100 / FPS;
                let mut chunk = Vec::with_capacity(((until - sample) * 4) as usize);
                while sample < until {
                    let phase = sample as f64 * 2.0 * std::f64::consts::PI * 1000.0 / 44_100.0;
                    let v = (phase.sin() * 8000.0) as i16;
                    chunk.extend_from_slice(&v.to_le_bytes());
                    chunk.extend_from_slice(&v.to_le_bytes());
                    sample += 1;
                }
                if pcm.write_all(&chunk).is_err() {
                    break;
                }
            }
        })
    });

    // Answer the subscriber offers as they come.
    let mut peer: Option<RtcPeer> = None;
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let mut last_ping = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        // A silent signaling session is closed after 30 s: keep it alive.
        if last_ping.elapsed() > Duration::from_secs(5) {
            signal.send(&ClientMessage::Ping { ts: 0 }).await;
            last_ping = Instant::now();
        }
        let offer = signal
            .try_recv_matching(Duration::from_millis(200), |m| match m {
                ServerMessage::Offer {
                    target: Target::Subscriber,
                    sdp,
                } => Some(sdp.clone()),
                _ => None,
            })
            .await;
        if let Some(offer) = offer {
            if peer.is_none() {
                peer = Some(RtcPeer::new().await);
            }
            let answer = peer.as_mut().unwrap().answer(offer).await;
            signal
                .send(&ClientMessage::Answer {
                    target: Target::Subscriber,
                    sdp: answer,
                })
                .await;
        }
    }
    let cpu = cpu_seconds() - cpu_before;
    let wall = started.elapsed().as_secs_f64();
    writer.join().unwrap();
    if let Some(a) = audio_writer {
        a.join().unwrap();
    }
    let _ = ffmpeg.wait();

    let peer = peer.expect("the viewer was offered the stream");
    let inbox = peer.inbox.lock().unwrap().clone();
    let video = inbox.get("bench-video").cloned().unwrap_or_default();
    let audio_packets = inbox.get("bench-audio").map_or(0, Vec::len);
    // Frames in arrival order: (RTP timestamp, when its last packet arrived).
    let mut arrivals: Vec<(u32, Instant)> = Vec::new();
    for p in &video {
        match arrivals.last_mut() {
            Some((ts, at)) if *ts == p.ts => *at = (*at).max(p.at),
            _ => arrivals.push((p.ts, p.at)),
        }
    }
    // Decode what arrived and read each picture's index.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.h264");
    std::fs::write(&path, h264_annex_b(&video)).unwrap();
    let out = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&path)
        .args(["-f", "rawvideo", "-pix_fmt", "gray", "-"])
        .output()
        .unwrap();
    let pictures: Vec<usize> = out.stdout.chunks_exact(W * H).map(read_index).collect();
    let written = written.lock().unwrap().clone();
    let mut latencies: Vec<f64> = Vec::new();
    let mut startup: Vec<f64> = Vec::new();
    let mut mismatched = 0;
    if let (Some(&(ts0, _)), Some(&n0)) = (arrivals.first(), pictures.first()) {
        for (k, &(ts, at)) in arrivals.iter().enumerate() {
            let Some(&n) = pictures.get(k) else { break };
            // The picture's index must agree with its RTP timestamp (±1 ms rounding).
            let by_ts = (ts.wrapping_sub(ts0) as f64 / 3000.0).round() as i64 + n0 as i64;
            if by_ts != n as i64 || n >= written.len() {
                mismatched += 1;
                continue;
            }
            let ms = at.saturating_duration_since(written[n]).as_secs_f64() * 1000.0;
            // The first second after the subscriber's first frame holds the GOP replay
            // (frames written before it connected): reported apart from steady state.
            if at.duration_since(arrivals[0].1) < Duration::from_secs(1) {
                startup.push(ms);
            } else {
                latencies.push(ms);
            }
        }
    }
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |q: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        latencies[((latencies.len() - 1) as f64 * q).round() as usize]
    };
    let metrics = t.metrics().await;
    println!(
        "frames written {}, received {}, decoded {}, matched {} ({} mismatched)",
        written.len(),
        arrivals.len(),
        pictures.len(),
        latencies.len(),
        mismatched
    );
    println!("audio packets received {audio_packets}");
    startup.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "first second at the subscriber (GOP replay, then live): {} frames, \
         max {:.1} ms, min {:.1} ms",
        startup.len(),
        startup.last().copied().unwrap_or(f64::NAN),
        startup.first().copied().unwrap_or(f64::NAN)
    );
    println!(
        "end to end, steady state (raw frame into ffmpeg → last RTP packet at the \
         subscriber): p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct(0.5),
        pct(0.95),
        pct(0.99),
        pct(1.0)
    );
    for kind in ["video", "audio"] {
        let buckets = buckets(&metrics, kind);
        println!(
            "Weir's share, {kind} (RTMP message read → RTP handed to the kernel): \
             n {}, p50 {:.3} ms, p99 {:.3} ms",
            buckets.last().map_or(0.0, |b| b.1),
            quantile(&buckets, 0.5) * 1e3,
            quantile(&buckets, 0.99) * 1e3
        );
    }
    println!(
        "process CPU (server + 1 client; ffmpeg not included): {:.1} % of one core",
        cpu / wall * 100.0
    );
    println!(
        "\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("weir_bridge"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

fn buckets(metrics: &str, kind: &str) -> Vec<(f64, f64)> {
    let prefix = format!("weir_bridge_latency_seconds_bucket{{kind=\"{kind}\",le=\"");
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|l| {
            let (le, rest) = l.split_once("\"}")?;
            Some((
                le.parse().unwrap_or(f64::INFINITY),
                rest.trim().parse().ok()?,
            ))
        })
        .collect()
}

/// Linear interpolation inside the bucket where the quantile falls.
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    let target = total * q;
    let mut prev = (0.0, 0.0);
    for &(le, c) in buckets {
        if c >= target {
            if le.is_infinite() {
                return prev.0;
            }
            let frac = if c > prev.1 {
                (target - prev.1) / (c - prev.1)
            } else {
                1.0
            };
            return prev.0 + (le - prev.0) * frac;
        }
        prev = (le, c);
    }
    prev.0
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}
