//! Glass to glass with sound, for minutes: video at render, audio at playout, and the
//! offset between them, per path, as a per-second trace.
//!
//! Sources ("glass" is when a raw frame or PCM block is handed to its encoder):
//! - `rtmp`: `common::source` — raw frames with their index drawn in, PCM with a beep at
//!   every second (written with frame 30·k), two ffmpeg encoders (x264 zerolatency, AAC),
//!   each tag pushed over RTMP the moment its encoder emits it.
//! - `chrome`: headless Chromium publishes through the SDK from
//!   `MediaStreamTrackGenerator`s: the page draws each frame's index and writes it, and
//!   writes 10 ms of PCM at a time with the same beeps, noting the wall clock of each.
//! - `webrtc`: a `webrtc`-crate client (`common::peer`) publishes the `rtmp` source's
//!   live x264 frames and the same PCM through libopus (20 ms packets, each encoded when
//!   its second 10 ms block is handed over, as Chrome's encoder does), each packet
//!   written the moment it is encoded.
//!
//! Sinks:
//! - `chrome`: headless Chromium subscribes through the SDK; `requestVideoFrameCallback`
//!   reads each presented frame's index; a `MediaStreamTrackProcessor` on the received
//!   audio track gets the samples as WebRTC's playout delivers them (NetEq, 10 ms at a
//!   time) and finds each beep's onset (its chunk's delivery + its place in it; the
//!   output device's buffer is not counted, as the compositor's is not). Every second
//!   the subscriber's `getStats()` gives both jitter buffers (delay and target).
//! - `rtmp`, `flv`: an ffmpeg player (`-flags low_delay`, small probe) decodes the
//!   stream to raw luma and PCM on pipes; a frame is "shown" when its last byte is read,
//!   a beep "heard" when the samples of its onset are read.
//!
//! Run: `BENCH_PATH=rtmp-chrome BENCH_SECONDS=180 cargo bench --bench glass`
//! (paths: SOURCE-SINK of rtmp, chrome, webrtc and chrome, flv, rtmp;
//! BENCH_AUDIO=0 for video only; BENCH_AUDIO_PTIME_MS=20 asks WebRTC publishers for
//! 20 ms audio packets instead of the default 10; BENCH_SHOW_URL=1 prints the FLV player's URL, to try
//! other players against the same stream). Writes `benches/artifacts/glass-PATH.{csv,svg}`.
//! BENCH_CLUSTER=1 (rtmp sources): two nodes behind a `redis-server`; the room lives on
//! the one the sink uses, the pusher reaches the other, which relays its push there
//! (what a push landing on the wrong node of a cluster costs); written as
//! `glass-PATH-relayed`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::io::Read;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::browser::Browser;
use common::plot::{trace_svg, Line};
use common::source::{self, wall_ms, Audio, RtmpPusher, Source, Stamps, Tag, H, W};
use common::{TestServer, APP};
use serde_json::Value;
use weir::auth::{Privileges, RoomId, TokenKind};

const ROOM: u32 = 7;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if s.is_empty() {
        return f64::NAN;
    }
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// The receiving page: subscribes, then for `seconds` notes every presented frame's
/// index, every beep's playout time and the jitter buffers each second.
const RECV_JS: &str = r#"

window.glassRecv = async (options, streamId, seconds, withAudio) => {
  const { WeirRoom } = await import('/sdk/weir.js');
  const origin = performance.timeOrigin;
  const out = { frames: [], beeps: [], stats: [], firstFrame: null };
  const room = new WeirRoom(options);
  const got = new Promise((resolve) => room.on('remoteStream', ({ streamId: id, stream }) => {
    if (id === streamId) resolve(stream);
  }));
  const t0 = performance.now();
  await room.join();
  const stream = await got;
  const v = document.createElement('video');
  v.autoplay = true; v.muted = true; v.srcObject = stream;
  document.body.append(v);
  v.play().catch(() => {});
  const canvas = document.createElement('canvas');
  canvas.width = 640; canvas.height = 32;
  const c2d = canvas.getContext('2d', { willReadFrequently: true });
  const onFrame = (now, meta) => {
    if (out.firstFrame === null) out.firstFrame = now - t0;
    if (meta.width === 640) {
      c2d.drawImage(v, 0, 0, 640, 32, 0, 0, 640, 32);
      const px = c2d.getImageData(0, 0, 640, 32).data;
      let n = 0;
      for (let b = 0; b < 16; b++) {
        let sum = 0;
        for (let y = 10; y < 22; y += 4)
          for (let x = b * 32 + 10; x < b * 32 + 22; x += 4) sum += px[(y * 640 + x) * 4];
        if (sum / 9 > 128) n |= 1 << b;
      }
      out.frames.push([n, origin + now]);
    }
    v.requestVideoFrameCallback(onFrame);
  };
  v.requestVideoFrameCallback(onFrame);
  if (withAudio) {
    for (let i = 0; i < 100 && stream.getAudioTracks().length === 0; i++)
      await new Promise((r) => setTimeout(r, 20));
    // Chrome renders a remote track's audio only for a media element.
    const a = document.createElement('audio');
    a.autoplay = true; a.srcObject = stream;
    document.body.append(a);
    a.play().catch(() => {});
    // The samples as WebRTC's playout hands them on (NetEq → mixer → the track's
    // sinks, 10 ms at a time): a beep's onset is "heard" when its chunk is delivered,
    // plus its place in the chunk. The output device's own buffer is not counted (as
    // the compositor's is not for video).
    const proc = new MediaStreamTrackProcessor({ track: stream.getAudioTracks()[0] });
    const reader = proc.readable.getReader();
    (async () => {
      let quiet = 0;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const now = origin + performance.now();
        const n = value.numberOfFrames, rate = value.sampleRate;
        const buf = new Float32Array(n);
        value.copyTo(buf, { planeIndex: 0, format: 'f32-planar' });
        value.close();
        for (let i = 0; i < n; i++) {
          if (Math.abs(buf[i]) > 0.08) {
            if (quiet > rate / 5) out.beeps.push(now + i * 1000 / rate);
            quiet = 0;
          } else quiet++;
        }
      }
    })();
  }
  const end = performance.now() + seconds * 1000;
  while (performance.now() < end) {
    await new Promise((r) => setTimeout(r, 1000));
    const report = await room.subscriber.getStats();
    const s = { t: origin + performance.now() };
    report.forEach((r) => {
      if (r.type !== 'inbound-rtp') return;
      s[r.kind] = {
        delay: r.jitterBufferDelay, target: r.jitterBufferTargetDelay,
        minimum: r.jitterBufferMinimumDelay, emitted: r.jitterBufferEmittedCount,
        concealed: r.concealedSamples, samples: r.totalSamplesReceived,
        accelerate: r.removedSamplesForAcceleration, decelerate: r.insertedSamplesForDeceleration,
        frames: r.framesDecoded, received: r.packetsReceived, lost: r.packetsLost,
      };
    });
    out.stats.push(s);
  }
  await room.leave();
  return out;
};
"#;

struct Received {
    /// (index, wall ms when shown)
    frames: Vec<(usize, f64)>,
    /// wall ms of each beep onset heard
    beeps: Vec<f64>,
    /// per second: (wall ms, audio jb delay ms, audio target ms, video jb delay, video target)
    buffers: Vec<(f64, f64, f64, f64, f64)>,
    first_frame_ms: Option<f64>,
    notes: Vec<String>,
}

fn per_emitted(cur: &Value, prev: &Value, field: &str) -> f64 {
    let d = cur[field].as_f64().unwrap_or(0.0) - prev[field].as_f64().unwrap_or(0.0);
    let e = cur["emitted"].as_f64().unwrap_or(0.0) - prev["emitted"].as_f64().unwrap_or(0.0);
    if e > 0.0 {
        d / e * 1000.0
    } else {
        f64::NAN
    }
}

fn parse_chrome(v: &Value) -> Received {
    let frames = v["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f[0].as_u64().unwrap() as usize, f[1].as_f64().unwrap()))
        .collect();
    let beeps = v["beeps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    let stats = v["stats"].as_array().cloned().unwrap_or_default();
    let mut buffers = Vec::new();
    for w in stats.windows(2) {
        let (p, c) = (&w[0], &w[1]);
        buffers.push((
            c["t"].as_f64().unwrap(),
            per_emitted(&c["audio"], &p["audio"], "delay"),
            per_emitted(&c["audio"], &p["audio"], "target"),
            per_emitted(&c["video"], &p["video"], "delay"),
            per_emitted(&c["video"], &p["video"], "target"),
        ));
    }
    let mut notes = Vec::new();
    if let Some(last) = stats.last() {
        notes.push(format!(
            "last stats: audio {} video {}",
            last["audio"], last["video"]
        ));
    }
    Received {
        frames,
        beeps,
        buffers,
        first_frame_ms: v["firstFrame"].as_f64(),
        notes,
    }
}

/// An ffmpeg player decoding `url` to raw luma and mono PCM, for `seconds`.
fn play_flv(url: &str, seconds: u64, with_audio: bool) -> Received {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("audio.pcm");
    let mut args: Vec<String> = [
        "-hide_banner",
        "-v",
        "error",
        "-probesize",
        "32768",
        "-analyzeduration",
        "0",
        "-flags",
        "low_delay",
        "-i",
        url,
        "-map",
        "0:v",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "gray",
        "pipe:1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if with_audio {
        assert!(std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success());
        args.extend(
            [
                "-map",
                "0:a",
                "-f",
                "s16le",
                "-ac",
                "1",
                "-ar",
                "48000",
                "-y",
                fifo.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string()),
        );
    }
    if std::env::var("BENCH_SHOW_URL").is_ok() {
        eprintln!("player url: {url}");
    }
    let started = wall_ms();
    let mut child = std::process::Command::new("ffmpeg")
        .args(&args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("ffmpeg player");
    let mut out = child.stdout.take().unwrap();
    let beeps: Arc<Mutex<Vec<f64>>> = Arc::default();
    let audio = with_audio.then(|| {
        let beeps = beeps.clone();
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let Ok(mut pcm) = std::fs::File::open(&fifo) else {
                return;
            };
            let mut buf = vec![0u8; 8192];
            let mut quiet = 0usize;
            while let Ok(n) = pcm.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let now = wall_ms();
                for (i, s) in buf[..n - n % 2].chunks(2).enumerate() {
                    let v = i16::from_le_bytes([s[0], s[1]]).unsigned_abs();
                    if v > 2600 {
                        if quiet > 9600 {
                            beeps.lock().unwrap().push(now + i as f64 / 48.0);
                        }
                        quiet = 0;
                    } else {
                        quiet += 1;
                    }
                }
            }
        })
    });
    let mut frames = Vec::new();
    let mut first = None;
    let mut gray = vec![0u8; W * H];
    // Stopped by the wall clock (a stream that stalls must not hang the bench).
    let deadline = started + seconds as f64 * 1000.0 + 2000.0;
    let killer = {
        let pid = child.id();
        std::thread::spawn(move || {
            let wait = (deadline - wall_ms()).max(0.0);
            std::thread::sleep(Duration::from_millis(wait as u64));
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        })
    };
    while out.read_exact(&mut gray).is_ok() {
        let now = wall_ms();
        first.get_or_insert(now - started);
        frames.push((source::read_index(&gray), now));
    }
    let _ = child.kill();
    let _ = killer.join();
    let status = child.wait();
    // If ffmpeg never opened the FIFO (no audio stream found), the reader still waits
    // in open(): a non-blocking writer lets it go.
    if with_audio {
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(0o4000) // O_NONBLOCK
            .open(&fifo);
    }
    if frames.is_empty() {
        panic!("the player showed no frame ({status:?})");
    }
    if let Some(a) = audio {
        let _ = a.join();
    }
    let beeps = beeps.lock().unwrap().clone();
    Received {
        frames,
        beeps,
        buffers: Vec::new(),
        first_frame_ms: first,
        notes: vec![
            "first frame counts from the player's start (ffmpeg's own start-up included)".into(),
        ],
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::var("BENCH_REPLOT").is_ok() {
        return replot();
    }
    let path = std::env::var("BENCH_PATH").unwrap_or_else(|_| "rtmp-chrome".into());
    let seconds = env("BENCH_SECONDS", 60);
    let with_audio = env("BENCH_AUDIO", 1) == 1;
    let (from, to) = path.split_once('-').expect("BENCH_PATH is SOURCE-SINK");
    let tweak = |c: &mut weir::config::Config| {
        if std::env::var("BENCH_CONGESTION").as_deref() == Ok("0") {
            c.server.congestion_control = false;
        }
        // The audio packet length asked of WebRTC publishers (20: Chrome's own).
        if let Some(ms) = std::env::var("BENCH_AUDIO_PTIME_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            c.server.publisher_audio_ptime_ms = ms;
        }
    };
    let app_config = weir::auth::AppKeys::generate_config(APP);
    // BENCH_CLUSTER=1: the sink's node is the room's ("origin"); the pusher reaches
    // another ("edge"), which relays the push.
    let cluster = std::env::var("BENCH_CLUSTER").as_deref() == Ok("1");
    let redis = if cluster {
        Some(common::redis::Redis::start().await)
    } else {
        None
    };
    let in_cluster = |id: &'static str| {
        let url = redis.as_ref().map(|r| r.url());
        move |c: &mut weir::config::Config| {
            tweak(c);
            if let Some(url) = url {
                c.cluster.redis_url = url;
                c.cluster.node_id = id.into();
                c.server.trusted_proxies = vec!["127.0.0.1".into()];
            }
        }
    };
    let t = TestServer::start_app(app_config.clone(), in_cluster("origin")).await;
    let edge = if cluster {
        Some(TestServer::start_app(app_config, in_cluster("edge")).await)
    } else {
        None
    };
    // The room is placed on the origin by a first member there.
    let _holder = if cluster {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let join = common::join_with(&t.app, "holder", ROOM, 0xff, false);
        Some(common::Client::join(&t.ws_url(), join).await)
    } else {
        None
    };
    let label = if cluster {
        assert_eq!(from, "rtmp", "BENCH_CLUSTER relays an RTMP push");
        format!("{path}-relayed")
    } else {
        path.clone()
    };
    let browser = if from == "chrome" || to == "chrome" {
        Some(Browser::launch().await)
    } else {
        None
    };
    let origin = format!("http://{}/", t.server.http_addr);

    // The source.
    // Where the stamps are read at the end: the RTMP source, or the publishing page.
    let mut source = None;
    let mut publisher = None;
    let stream;
    let pub_page;
    match from {
        "rtmp" => {
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
            stream = format!("{APP}_{ROOM}_pusher_main");
            let name = format!(
                "{stream}?sdkappid={APP}&userid=pusher&roomid={ROOM}&usersig={sig}&privatemapkey={pmk}"
            );
            let audio = if with_audio { Audio::Aac } else { Audio::Off };
            let mut src = Source::start(seconds + 20, audio);
            let ingest = edge.as_ref().unwrap_or(&t).server.rtmp_addr.unwrap();
            let mut pusher = RtmpPusher::publish(ingest, "live", &name).await;
            let mut tags =
                std::mem::replace(&mut src.tags, tokio::sync::mpsc::unbounded_channel().1);
            tokio::spawn(async move {
                // BENCH_TRACE_TAGS=1: how regularly each kind leaves its encoder
                // (arrival − timestamp, spread per second).
                let trace = std::env::var("BENCH_TRACE_TAGS").is_ok();
                let mut spread: [Vec<f64>; 2] = Default::default();
                let t0 = std::time::Instant::now();
                let mut last_print = 0;
                while let Some(tag) = tags.recv().await {
                    if trace {
                        let at = t0.elapsed().as_secs_f64() * 1000.0;
                        spread[usize::from(tag.type_id == 9)].push(at - f64::from(tag.timestamp));
                        let s = (at / 1000.0) as u64;
                        if s != last_print && s % 5 == 0 {
                            last_print = s;
                            for (k, v) in spread.iter_mut().enumerate() {
                                let min = v.iter().copied().fold(f64::MAX, f64::min);
                                let d: Vec<f64> = v.iter().map(|x| x - min).collect();
                                println!("tags {} at {s} s: n {} spread p50 {:.1} p95 {:.1} max {:.1} ms", ["audio", "video"][k], d.len(), pct(&d, 0.5), pct(&d, 0.95), pct(&d, 1.0));
                                v.clear();
                            }
                        }
                    }
                    pusher.send(&tag).await;
                }
            });
            source = Some(src);
            pub_page = None;
        }
        "webrtc" => {
            let audio = if with_audio { Audio::Opus } else { Audio::Off };
            let mut src = Source::start(seconds + 20, audio);
            let (mut signal, _) =
                common::Client::join(&t.ws_url(), t.join("publisher", ROOM, 0xff)).await;
            let offered = common::publisher::offer_to_publish(&mut signal).await;
            let mut peer = offered.peer;
            peer.accept_answer(offered.answer).await;
            peer.connected().await;
            let pts = (
                offered.video.payload_type().await,
                offered.audio.payload_type().await,
            );
            let tags = std::mem::replace(&mut src.tags, tokio::sync::mpsc::unbounded_channel().1);
            let opus = std::mem::replace(&mut src.opus, tokio::sync::mpsc::unbounded_channel().1);
            tokio::spawn(send_webrtc(
                tags,
                opus,
                offered.video.track.clone(),
                offered.audio.track.clone(),
                pts,
            ));
            stream = offered.stream.stream_id;
            // The session lives while it pings (PROTOCOL.md: every 5–10 s).
            let keep = tokio::spawn(async move {
                loop {
                    signal
                        .send(&weir_signaling::ClientMessage::Ping { ts: 1 })
                        .await;
                    let next = tokio::time::Instant::now() + Duration::from_secs(5);
                    // Whatever the server says meanwhile is read and let go.
                    while let Some(left) = next.checked_duration_since(tokio::time::Instant::now())
                    {
                        if signal.try_recv(left).await.is_none() {
                            tokio::time::sleep_until(next).await;
                        }
                    }
                }
            });
            // Kept for the run.
            publisher = Some((keep, peer));
            source = Some(src);
            pub_page = None;
        }
        "chrome" => {
            let b = browser.as_ref().unwrap();
            let page = b.open(&origin).await;
            page.eval(common::browser::GENERATED_PUBLISHER_JS).await;
            let options = serde_json::to_string(&t.join("publisher", ROOM, 0xff)).unwrap();
            page.eval(&format!(
                "window.glassPublish({options}, {}, {with_audio})",
                seconds + 20
            ))
            .await;
            stream = format!("{APP}_{ROOM}_publisher_main");
            pub_page = Some(page);
        }
        other => panic!("unknown source {other}"),
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The sink.
    let received = match to {
        "chrome" => {
            let b = browser.as_ref().unwrap();
            let page = b.open(&origin).await;
            page.eval(RECV_JS).await;
            let options = serde_json::to_string(&t.join("viewer", ROOM, 0xff)).unwrap();
            let stream_js = serde_json::to_string(&stream).unwrap();
            // The run outlasts one DevTools call: start it, then collect its result.
            page.eval(&format!(
                "window.glassRecv({options}, {stream_js}, {seconds}, {with_audio})\
                 .then((r) => {{ window.glassResult = r; }}), true"
            ))
            .await;
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            assert!(
                page.wait_for("window.glassResult !== undefined", Duration::from_secs(60))
                    .await,
                "the receiving page finished its run"
            );
            let v = page.eval("window.glassResult").await;
            parse_chrome(&v)
        }
        "rtmp" | "flv" => {
            let base = if to == "rtmp" {
                format!("rtmp://{}/live/{stream}", t.server.rtmp_addr.unwrap())
            } else {
                format!("http://{}/live/{stream}.flv", t.server.http_addr)
            };
            let key = t.config.apps[0].live_play_key.clone().unwrap();
            let url =
                weir::auth::live_url::sign_url(&base, &key, weir::auth::unix_now() + 3600).unwrap();
            tokio::task::spawn_blocking(move || play_flv(&url, seconds, with_audio))
                .await
                .unwrap()
        }
        other => panic!("unknown sink {other}"),
    };

    let stamps: Stamps = match (&source, &pub_page) {
        (Some(src), _) => src.stamps.lock().unwrap().clone(),
        (_, Some(page)) => {
            let f = page.eval("window.pubFrames").await;
            let b = page.eval("window.pubBeeps").await;
            Stamps {
                frames: f
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap_or(f64::NAN))
                    .collect(),
                beeps: b
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(Value::as_f64)
                    .collect(),
            }
        }
        _ => unreachable!(),
    };
    if let Some(edge) = &edge {
        let m = edge.metrics().await;
        println!(
            "relayed by the edge: {} push(es)",
            common::metric(
                &m,
                "weir_rtmp_requests_total{outcome=\"relayed\",request=\"publish\""
            )
        );
    }
    report(&label, seconds, with_audio, &stamps, &received);
    if let Some((keep, _peer)) = publisher {
        keep.abort();
    }
}

/// The `webrtc` source's sender: each x264 frame (an FLV tag) as H.264 RTP (RFC 6184,
/// parameter sets before each keyframe) at 90 kHz from its capture time, each Opus
/// packet at 48 kHz from its first sample, both from the source's one start, each
/// written the moment it arrives.
async fn send_webrtc(
    mut tags: tokio::sync::mpsc::UnboundedReceiver<Tag>,
    mut opus: tokio::sync::mpsc::UnboundedReceiver<source::OpusPacket>,
    video: Arc<webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP>,
    audio: Arc<webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP>,
    (vpt, apt): (u8, u8),
) {
    use common::publisher::{rtp_packet, write_access_unit};
    use webrtc::media_stream::track_local::TrackLocal;
    use weir::codec::h264::{self, AvcConfig};
    use weir::rtmp::flv::{parse_video, VideoTag};
    let (mut vseq, mut aseq) = (0u16, 0u16);
    let mut config: Option<AvcConfig> = None;
    let mut audio_open = true;
    loop {
        tokio::select! {
            tag = tags.recv() => {
                let Some(tag) = tag else { return };
                if tag.type_id != 9 {
                    continue;
                }
                match parse_video(&tag.data).expect("x264's tags parse") {
                    VideoTag::AvcSequenceHeader(record) => {
                        config = Some(AvcConfig::parse(&record).expect("x264's record parses"));
                    }
                    VideoTag::AvcNalus { keyframe, data, .. } => {
                        let Some(c) = &config else { continue };
                        let mut nalus = Vec::new();
                        if keyframe {
                            nalus.extend(c.sps.iter().chain(&c.pps).cloned());
                        }
                        nalus.extend(h264::split_nalus(&data, c.length_size).expect("x264's frame splits"));
                        let ts = tag.timestamp.wrapping_mul(90);
                        write_access_unit(&video, (vpt, 0x5151), &mut vseq, ts, &nalus).await;
                    }
                    _ => {}
                }
            }
            packet = opus.recv(), if audio_open => {
                let Some(packet) = packet else { audio_open = false; continue };
                let p = rtp_packet(apt, 0x5252, aseq, packet.sample as u32, false, packet.data);
                let _ = audio.write_rtp(p).await;
                aseq = aseq.wrapping_add(1);
            }
        }
    }
}

fn report(path: &str, seconds: u64, with_audio: bool, stamps: &Stamps, r: &Received) {
    let start = r.frames.first().map_or(0.0, |f| f.1);
    let mut video: Vec<(f64, f64, usize)> = Vec::new(); // (t since start, latency, index)
    let mut unmatched = 0;
    for &(n, at) in &r.frames {
        match stamps.frame_latency(n, at) {
            Some(d) => video.push(((at - start) / 1000.0, d, n)),
            None => unmatched += 1,
        }
    }
    // Audio: each beep heard, its latency; the A/V offset against the frame written
    // with it (or the nearest one shown).
    let mut audio: Vec<(f64, f64, f64)> = Vec::new(); // (t, latency, av offset)
    for &at in &r.beeps {
        let Some((k, d)) = stamps.beep_latency(at) else {
            continue;
        };
        let want = k * 30;
        let near = video
            .iter()
            .min_by_key(|v| (v.2 as i64 - want as i64).abs())
            .filter(|v| (v.2 as i64 - want as i64).abs() < 15);
        let offset = near.map_or(f64::NAN, |v| d - v.1);
        audio.push(((at - start) / 1000.0, d, offset));
    }
    let secs = video.last().map_or(0, |v| v.0 as usize + 1);
    let mut csv = String::from(
        "t_s,video_p50_ms,video_max_ms,audio_ms,av_offset_ms,audio_jb_ms,audio_target_ms,video_jb_ms,video_target_ms\n",
    );
    let mut per_second = Vec::new();
    println!("path {path}, {seconds} s, audio {with_audio}; per second:");
    println!("  t  video p50  max   audio  A/V   | jitter buffer: audio (target)  video (target)");
    for s in 0..secs {
        let v: Vec<f64> = video
            .iter()
            .filter(|x| x.0 as usize == s)
            .map(|x| x.1)
            .collect();
        let a = audio.iter().find(|x| x.0 as usize == s);
        let b = r
            .buffers
            .iter()
            .find(|b| ((b.0 - start) / 1000.0) as usize == s);
        let (p50, max) = (pct(&v, 0.5), pct(&v, 1.0));
        let (al, off) = a.map_or((f64::NAN, f64::NAN), |a| (a.1, a.2));
        let (ab, at, vb, vt) = b.map_or((f64::NAN, f64::NAN, f64::NAN, f64::NAN), |b| {
            (b.1, b.2, b.3, b.4)
        });
        per_second.push((s as f64, p50, al, off, ab, vb));
        writeln!(
            csv,
            "{s},{p50:.1},{max:.1},{al:.1},{off:.1},{ab:.1},{at:.1},{vb:.1},{vt:.1}"
        )
        .unwrap();
        println!(
            "{s:4} {p50:7.1} {max:6.1} {al:7.1} {off:6.1}   | {ab:6.1} ({at:5.1})  {vb:6.1} ({vt:5.1})"
        );
    }
    let lat: Vec<f64> = video.iter().map(|v| v.1).collect();
    let steady: Vec<f64> = video.iter().filter(|v| v.0 >= 3.0).map(|v| v.1).collect();
    let minute = |from: f64, to: f64| {
        let v: Vec<f64> = video
            .iter()
            .filter(|x| x.0 >= from && x.0 < to)
            .map(|x| x.1)
            .collect();
        pct(&v, 0.5)
    };
    let end = video.last().map_or(0.0, |v| v.0);
    let al: Vec<f64> = audio.iter().map(|a| a.1).collect();
    let off: Vec<f64> = audio.iter().map(|a| a.2).filter(|x| !x.is_nan()).collect();
    println!("summary ({path}, {seconds} s, audio {with_audio}):");
    println!(
        "  first frame {:.0} ms; frames shown {} ({} unmatched of {} written)",
        r.first_frame_ms.unwrap_or(f64::NAN),
        video.len(),
        unmatched,
        stamps.frames.len()
    );
    println!(
        "  video, whole run: p50 {:.1} p95 {:.1} p99 {:.1} max {:.1} ms; after 3 s: p50 {:.1} p95 {:.1} p99 {:.1}",
        pct(&lat, 0.5),
        pct(&lat, 0.95),
        pct(&lat, 0.99),
        pct(&lat, 1.0),
        pct(&steady, 0.5),
        pct(&steady, 0.95),
        pct(&steady, 0.99)
    );
    println!(
        "  video median, first minute {:.1} ms, last minute {:.1} ms",
        minute(0.0, 60.0),
        minute((end - 60.0).max(0.0), end + 1.0)
    );
    if with_audio {
        println!(
            "  audio: beeps heard {} of {}; p50 {:.1} p95 {:.1} max {:.1} ms; A/V offset (audio later +) p50 {:.1} p5 {:.1} p95 {:.1} ms",
            audio.len(),
            stamps.beeps.len(),
            pct(&al, 0.5),
            pct(&al, 0.95),
            pct(&al, 1.0),
            pct(&off, 0.5),
            pct(&off, 0.05),
            pct(&off, 0.95)
        );
    }
    for n in &r.notes {
        println!("  {n}");
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let name = if with_audio {
        format!("glass-{path}")
    } else {
        format!("glass-{path}-video-only")
    };
    std::fs::write(dir.join(format!("{name}.csv")), &csv).unwrap();
    let title = format!(
        "glass to glass, {path}, {seconds} s, {}",
        if with_audio {
            "with audio"
        } else {
            "video only"
        }
    );
    std::fs::write(dir.join(format!("{name}.svg")), plot(&title, &per_second)).unwrap();
}

/// (t, video p50, audio, A/V offset, audio jitter buffer, video jitter buffer) per second.
type Second = (f64, f64, f64, f64, f64, f64);

fn plot(title: &str, per_second: &[Second]) -> String {
    let line = |label, color, col: usize| Line {
        label,
        color,
        points: per_second
            .iter()
            .map(|p| (p.0, [p.0, p.1, p.2, p.3, p.4, p.5][col]))
            .filter(|p| p.1.is_finite())
            .collect(),
    };
    let lines: Vec<Line> = [
        line("video (median/s)", "#1f77b4", 1),
        line("audio heard", "#d62728", 2),
        line("A/V offset", "#2ca02c", 3),
        line("audio jitter buffer", "#ff7f0e", 4),
        line("video jitter buffer", "#9467bd", 5),
    ]
    .into_iter()
    .filter(|l| !l.points.is_empty())
    .collect();
    trace_svg(title, "ms", &lines, None)
}

/// `BENCH_REPLOT=1`: redraws every `benches/artifacts/glass-*.svg` from its CSV.
fn replot() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/artifacts");
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let p = e.path();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        if !name.starts_with("glass-") || p.extension().is_none_or(|x| x != "csv") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let rows: Vec<Second> = text
            .lines()
            .skip(1)
            .map(|l| {
                let v: Vec<f64> = l
                    .split(',')
                    .map(|x| x.parse().unwrap_or(f64::NAN))
                    .collect();
                (v[0], v[1], v[3], v[4], v[5], v[7])
            })
            .collect();
        let secs = rows.len();
        let title = format!(
            "glass to glass, {}, {secs} s",
            name.trim_start_matches("glass-")
        );
        std::fs::write(dir.join(format!("{name}.svg")), plot(&title, &rows)).unwrap();
    }
}
