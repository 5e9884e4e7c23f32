//! Glass to glass, RTMP pusher → Chrome, measured in the browser; and the time from
//! joining to the first remote frame.
//!
//! The bench makes every raw frame itself (640×360, 30 fps), draws its index into the
//! picture (16 black/white blocks along the top), notes the wall-clock time it writes
//! the frame into ffmpeg's stdin (x264 ultrafast zerolatency, 1 s GOP, no B-frames, 1
//! Mbit/s, RTMP to Weir), and headless Chromium (Debian's, fake devices, the SDK from
//! `/sdk/weir.js`) reads the index back from each frame it presents
//! (`requestVideoFrameCallback` → canvas), with the frame's `receiveTime` (its last
//! packet's arrival, so no encoded transform is needed) and the callback's time (the
//! frame handed to the compositor). Same machine, same wall clock.
//!
//! First frame: a fresh `WeirRoom` joins, and the time from `join()` to the first
//! presented remote frame is taken, at random points of the GOP, BENCH_ROUNDS times.
//!
//! Run: `cargo bench --bench browser` (env: BENCH_SECONDS=20, BENCH_ROUNDS=20)

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::browser::Browser;
use common::source::{frame, wall_ms, FPS, H, W};
use common::{TestServer, APP};
use weir::auth::{Privileges, RoomId, TokenKind};

const ROOM: u32 = 7;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// The page side: joins, renders the stream, and for every presented frame reads its
/// index from the picture and notes receive and present times (wall clock, ms).
const PAGE_JS: &str = r#"
window.benchJoin = async (options, streamId) => {
  const { WeirRoom } = await import('/sdk/weir.js');
  const room = new WeirRoom(options);
  const t0 = performance.now();
  const first = new Promise((resolve) => {
    room.on('remoteStream', ({ streamId: id, stream }) => {
      if (id !== streamId) return;
      const v = document.createElement('video');
      v.autoplay = true; v.muted = true; v.srcObject = stream;
      document.body.append(v);
      v.play().catch(() => {});
      v.requestVideoFrameCallback(() => resolve({ video: v, ms: performance.now() - t0 }));
    });
  });
  await room.join();
  const got = await first;
  return { room, video: got.video, ms: got.ms };
};

window.benchFirstFrames = async (options, streamId, rounds) => {
  const out = [];
  for (let i = 0; i < rounds; i++) {
    await new Promise((r) => setTimeout(r, 300 + Math.random() * 1000));
    const { room, video, ms } = await window.benchJoin(options, streamId);
    out.push(ms);
    video.remove();
    await room.leave();
  }
  return out;
};

window.benchLatency = async (options, streamId, seconds) => {
  const { room, video } = await window.benchJoin(options, streamId);
  const canvas = document.createElement('canvas');
  canvas.width = 640; canvas.height = 32;
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  const seen = [];
  const origin = performance.timeOrigin;
  const onFrame = (now, meta) => {
    if (meta.width === 640) {
      ctx.drawImage(video, 0, 0, 640, 32, 0, 0, 640, 32);
      const px = ctx.getImageData(0, 0, 640, 32).data;
      let n = 0;
      for (let b = 0; b < 16; b++) {
        let sum = 0;
        for (let y = 10; y < 22; y += 4)
          for (let x = b * 32 + 10; x < b * 32 + 22; x += 4) sum += px[(y * 640 + x) * 4];
        if (sum / 9 > 128) n |= 1 << b;
      }
      seen.push({ n, receive: meta.receiveTime !== undefined ? origin + meta.receiveTime : null,
                  present: origin + now, expected: origin + meta.expectedDisplayTime });
    }
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
  await new Promise((r) => setTimeout(r, seconds * 1000));
  await room.leave();
  return seen;
};
"#;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds = env("BENCH_SECONDS", 20);
    let rounds = env("BENCH_ROUNDS", 20);
    // BENCH_CONGESTION=0 measures the same path without congestion control.
    let t = TestServer::start_with(|c| {
        if std::env::var("BENCH_CONGESTION").as_deref() == Ok("0") {
            c.server.congestion_control = false;
        }
    })
    .await;
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
            &RoomId::Num(ROOM),
            Privileges::ALL,
            now,
            3600,
        )
        .unwrap();
    let stream = format!("{APP}_{ROOM}_pusher_main");
    let url = format!(
        "rtmp://{}/live/{stream}?sdkappid={APP}&userid=pusher&roomid={ROOM}&usersig={sig}&privatemapkey={pmk}",
        t.server.rtmp_addr.unwrap()
    );
    let size = format!("{W}x{H}");
    let total = seconds + rounds * 2 + 15;
    let mut ffmpeg = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error"])
        .args(["-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", &size])
        .args(["-framerate", "30", "-i", "pipe:0"])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-tune",
            "zerolatency",
        ])
        .args([
            "-bf", "0", "-g", "30", "-b:v", "1M", "-maxrate", "1M", "-bufsize", "1M",
        ])
        .args(["-f", "flv", &url])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("ffmpeg runs (scripts/install-deps.sh test installs it)");
    let mut stdin = ffmpeg.stdin.take().unwrap();
    let frames = (total * FPS) as usize;
    let written: Arc<Mutex<Vec<f64>>> = Arc::default();
    let writer = {
        let written = written.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            for n in 0..frames {
                let due = start + Duration::from_micros(n as u64 * 1_000_000 / FPS);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let f = frame(n);
                written.lock().unwrap().push(wall_ms());
                if stdin.write_all(&f).is_err() {
                    break;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;

    let browser = Browser::launch().await;
    let page = browser
        .open(&format!("http://{}/", t.server.http_addr))
        .await;
    page.eval(PAGE_JS).await;
    let options = serde_json::to_string(&t.join("viewer", ROOM, 0xff)).unwrap();
    let stream_js = serde_json::to_string(&stream).unwrap();

    let mut first: Vec<f64> = page
        .eval(&format!(
            "window.benchFirstFrames({options}, {stream_js}, {rounds})"
        ))
        .await
        .as_array()
        .expect("first-frame rounds")
        .iter()
        .filter_map(|v| v.as_f64())
        .collect();
    first.sort_by(|a, b| a.partial_cmp(b).unwrap());

    let seen = page
        .eval(&format!(
            "window.benchLatency({options}, {stream_js}, {seconds})"
        ))
        .await;
    let _ = ffmpeg.kill();
    let _ = ffmpeg.wait();
    let _ = writer.join();
    let written = written.lock().unwrap().clone();
    let mut at_receive = Vec::new();
    let mut at_present = Vec::new();
    let mut startup = Vec::new();
    let mut unmatched = 0;
    let seen = seen.as_array().cloned().unwrap_or_default();
    let first_present = seen
        .first()
        .and_then(|s| s["present"].as_f64())
        .unwrap_or(0.0);
    for s in &seen {
        let n = s["n"].as_u64().unwrap_or(u64::MAX) as usize;
        let Some(&sent) = written.get(n) else {
            unmatched += 1;
            continue;
        };
        let present = s["present"].as_f64().unwrap();
        // A misread index would give an absurd span: count it, do not use it.
        if !(0.0..2000.0).contains(&(present - sent)) {
            unmatched += 1;
            continue;
        }
        // The first 3 s (a late joiner starting from the GOP cache) are apart.
        if present - first_present < 3000.0 {
            startup.push(present - sent);
            continue;
        }
        at_present.push(present - sent);
        if let Some(r) = s["receive"].as_f64() {
            at_receive.push(r - sent);
        }
    }
    at_receive.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let startup_max = startup.iter().copied().fold(f64::NAN, f64::max);
    let startup_last = startup.last().copied().unwrap_or(f64::NAN);
    at_present.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "first remote frame after join(), {} rounds: p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms, min {:.0} ms",
        first.len(),
        pct(&first, 0.5),
        pct(&first, 0.9),
        pct(&first, 1.0),
        pct(&first, 0.0)
    );
    println!(
        "frames presented in {seconds} s: {} ({} unmatched); steady state after the first 3 s:",
        seen.len(),
        unmatched
    );
    println!(
        "first 3 s after joining: {} frames, max {startup_max:.1} ms, last {startup_last:.1} ms",
        startup.len()
    );
    for (name, v) in [
        (
            "raw frame into ffmpeg → frame received by Chrome",
            &at_receive,
        ),
        (
            "raw frame into ffmpeg → frame presented by Chrome",
            &at_present,
        ),
    ] {
        println!(
            "{name}: n {}, p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            v.len(),
            pct(v, 0.5),
            pct(v, 0.95),
            pct(v, 0.99),
            pct(v, 1.0)
        );
    }
}
