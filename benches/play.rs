//! First picture for RTMP and HTTP-FLV players: time from starting a real ffmpeg
//! player to its first decoded video frame, for an RTMP-pushed source (ffmpeg, x264
//! zerolatency, 1 s GOP) and for a WebRTC-published one (a `webrtc`-crate client that
//! answers keyframe requests, as browsers do), joining at random points of the GOP.
//!
//! The player is `ffmpeg -probesize 4096 -analyzeduration 0 -i URL -an -frames:v 1
//! -f null -` (not `-fflags nobuffer`: that discards the packets read while probing, the
//! cached keyframe among them, and waits for the next one); its own start-up (measured
//! on a local source, no network) is reported next to the figures.
//!
//! Run: `cargo bench --bench play` (env: BENCH_ROUNDS=10)

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::peer::RtcPeer;
use common::{Client, TestServer, APP};
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use weir::auth::{Privileges, RoomId, TokenKind};
use weir_signaling::ClientMessage;

const ROOM: u32 = 99;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn credentials(t: &TestServer, user: &str, privileges: u32) -> String {
    let now = weir::auth::unix_now();
    let sig = t
        .app
        .issue_user_sig(TokenKind::V2, user, now, 3600)
        .unwrap();
    let pmk = t
        .app
        .issue_private_map_key(
            TokenKind::V2,
            user,
            &RoomId::Num(ROOM),
            Privileges(privileges),
            now,
            3600,
        )
        .unwrap();
    format!("sdkappid={APP}&userid={user}&roomid={ROOM}&usersig={sig}&privatemapkey={pmk}")
}

/// Access units of an ffmpeg-made H.264 stream; `every_frame_idr` forces IDRs while
/// keeping the same parameter sets (same keyint), for answering keyframe requests.
fn access_units(frames: u32, every_frame_idr: bool) -> Vec<Vec<Bytes>> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.h264");
    let mut c = std::process::Command::new("ffmpeg");
    c.args([
        "-v",
        "error",
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=640x360:rate=30",
    ])
    .args([
        "-frames:v",
        &frames.to_string(),
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
    ])
    .args([
        "-preset",
        "ultrafast",
        "-tune",
        "zerolatency",
        "-bf",
        "0",
        "-g",
        "30",
    ]);
    if every_frame_idr {
        c.args(["-force_key_frames", "expr:1"]);
    }
    assert!(c
        .args(["-f", "h264"])
        .arg(&path)
        .status()
        .unwrap()
        .success());
    let data = std::fs::read(&path).unwrap();
    let mut nals = Vec::new();
    let (mut i, mut start) = (0, None);
    while i + 3 <= data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            if let Some(s) = start {
                let mut end = i;
                while end > s && data[end - 1] == 0 {
                    end -= 1;
                }
                nals.push(Bytes::copy_from_slice(&data[s..end]));
            }
            i += 3;
            start = Some(i);
        } else {
            i += 1;
        }
    }
    if let Some(s) = start {
        nals.push(Bytes::copy_from_slice(&data[s..]));
    }
    let mut aus: Vec<Vec<Bytes>> = Vec::new();
    let mut pending = Vec::new();
    for n in nals {
        let t = n[0] & 0x1f;
        if (t == 1 || t == 5) && n[1] & 0x80 != 0 {
            pending.push(n);
            aus.push(std::mem::take(&mut pending));
        } else if t == 1 || t == 5 {
            aus.last_mut().unwrap().push(n);
        } else {
            pending.push(n);
        }
    }
    aus
}

/// Starts a WebRTC publisher that loops the clip and answers a PLI with an IDR.
async fn webrtc_publisher(t: &TestServer, stop: Arc<AtomicBool>) -> (Client, String, RtcPeer) {
    let normal = access_units(300, false);
    let idrs = access_units(300, true);
    let (mut signal, _) = Client::join(&t.ws_url(), t.join("webcam", ROOM, 0xff)).await;
    let common::publisher::Offered {
        stream,
        mut peer,
        video,
        audio,
        answer,
    } = common::publisher::offer_to_publish(&mut signal).await;
    let stream = stream.stream_id;
    peer.accept_answer(answer).await;
    peer.connected().await;
    let (vpt, apt) = (video.payload_type().await, audio.payload_type().await);
    let pli = Arc::new(AtomicBool::new(false));
    {
        let (track, pli) = (video.track.clone(), pli.clone());
        tokio::spawn(async move {
            while let Some(TrackLocalEvent::OnRtcpPacket(pkts)) = track.poll().await {
                if pkts.iter().any(|p| {
                    p.as_any()
                        .downcast_ref::<rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication>()
                        .is_some()
                }) {
                    pli.store(true, Ordering::Relaxed);
                }
            }
        });
    }
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut enc =
            opus::Encoder::new(48_000, opus::Channels::Stereo, opus::Application::Audio).unwrap();
        let mut buf = vec![0u8; 1500];
        let (mut vseq, mut aseq, mut frame, mut apkt) = (0u16, 0u16, 0usize, 0u32);
        while !stop.load(Ordering::Relaxed) {
            let vdue = start + Duration::from_micros(frame as u64 * 33_333);
            let adue = start + Duration::from_millis(u64::from(apkt) * 20);
            if adue <= vdue {
                tokio::time::sleep_until(adue).await;
                let pcm: Vec<f32> = (0..960u32)
                    .flat_map(|i| {
                        let n = (apkt * 960 + i) as f32;
                        let v = (n * 2.0 * std::f32::consts::PI * 440.0 / 48_000.0).sin() * 0.3;
                        [v, v]
                    })
                    .collect();
                let len = enc.encode_float(&pcm, &mut buf).unwrap();
                let mut p = rtc::rtp::Packet::default();
                p.header.version = 2;
                p.header.payload_type = apt;
                p.header.ssrc = 0x5252;
                p.header.sequence_number = aseq;
                p.header.timestamp = apkt * 960;
                p.payload = Bytes::copy_from_slice(&buf[..len]);
                let _ = audio.track.write_rtp(p).await;
                aseq = aseq.wrapping_add(1);
                apkt += 1;
            } else {
                tokio::time::sleep_until(vdue).await;
                let i = frame % normal.len();
                // A keyframe request is answered with this frame as an IDR.
                let au = if pli.swap(false, Ordering::Relaxed) {
                    &idrs[i]
                } else {
                    &normal[i]
                };
                let mut payloads = Vec::new();
                weir::codec::h264::packetize(au, 1100, &mut payloads);
                let n = payloads.len();
                for (k, payload) in payloads.into_iter().enumerate() {
                    let mut p = rtc::rtp::Packet::default();
                    p.header.version = 2;
                    p.header.payload_type = vpt;
                    p.header.ssrc = 0x5151;
                    p.header.sequence_number = vseq;
                    p.header.timestamp = frame as u32 * 3000;
                    p.header.marker = k + 1 == n;
                    p.payload = payload;
                    let _ = video.track.write_rtp(p).await;
                    vseq = vseq.wrapping_add(1);
                }
                frame += 1;
            }
        }
    });
    (signal, stream, peer)
}

/// Seconds from spawning ffmpeg on `url` to it exiting after one decoded frame.
async fn first_frame(url: &str) -> Option<f64> {
    let start = Instant::now();
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new("ffmpeg")
            .args([
                "-v",
                if std::env::var("BENCH_PLAYER_DEBUG").is_ok() {
                    "debug"
                } else {
                    "error"
                },
            ])
            .args(["-probesize", "4096"])
            .args(["-analyzeduration", "0", "-i", url])
            // Video only: with `-frames:v 1` ffmpeg stops reading at the first picture
            // and fails if no audio frame was decoded by then ("Cannot determine format
            // of input stream 0:1 after EOF"), as when a WebRTC stream's fresh keyframe
            // comes before its first AAC frame.
            .args(["-an", "-frames:v", "1", "-f", "null", "-"])
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .ok()?
    .ok()?;
    if !out.status.success() {
        eprintln!(
            "player failed after {:?} on {}: {}",
            start.elapsed(),
            url.split('?').next().unwrap_or(""),
            {
                let e = String::from_utf8_lossy(&out.stderr);
                let lines: Vec<&str> = e.lines().collect();
                lines[lines.len().saturating_sub(60)..].join("\n")
            }
        );
    }
    out.status.success().then(|| start.elapsed().as_secs_f64())
}

fn summary(name: &str, mut v: Vec<f64>) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        println!("{name:<40} no successful run");
        return;
    }
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize] * 1000.0;
    println!(
        "{name:<40} n {:>2}  p50 {:>5.0} ms  p90 {:>5.0} ms  max {:>5.0} ms",
        v.len(),
        q(0.5),
        q(0.9),
        q(1.0)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds = env("BENCH_ROUNDS", 10);
    let t = TestServer::start_with(|c| c.server.rtmp_addr = "127.0.0.1:0".into()).await;
    let rtmp = t.server.rtmp_addr.unwrap();
    let http = t.server.http_addr;
    let stop = Arc::new(AtomicBool::new(false));

    // Keep signaling sessions alive while the bench runs.
    let mut pusher = tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc=size=640x360:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
        .args([
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-preset",
            "ultrafast",
        ])
        .args(["-tune", "zerolatency", "-bf", "0", "-g", "30", "-b:v", "1M"])
        .args(["-c:a", "aac", "-f", "flv"])
        .arg(format!(
            "rtmp://{rtmp}/live/pushed?{}",
            credentials(&t, "pusher", 0xff)
        ))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("ffmpeg runs (scripts/install-deps.sh test installs it)");
    let (mut signal, web_stream, _peer) = webrtc_publisher(&t, stop.clone()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // ffmpeg's own start-up to a first frame, with no network at all.
    let mut baseline = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let ok = tokio::process::Command::new("ffmpeg")
            .args([
                "-v",
                "error",
                "-f",
                "lavfi",
                "-i",
                "testsrc=size=640x360:rate=30",
            ])
            .args(["-frames:v", "1", "-f", "null", "-"])
            .status()
            .await
            .unwrap()
            .success();
        if ok {
            baseline.push(start.elapsed().as_secs_f64());
        }
    }
    let watcher = credentials(&t, "watcher", 0x02 | 0x08 | 0x20);
    let key = t.config.apps[0].live_play_key.clone().unwrap();
    let signed = |stream: &str| {
        weir::auth::live_url::sign_url(
            &format!("http://{http}/live/{stream}.flv"),
            &key,
            weir::auth::unix_now() + 600,
        )
        .unwrap()
    };
    let cases = [
        (
            "RTMP push → RTMP player",
            format!("rtmp://{rtmp}/live/pushed?{watcher}"),
        ),
        ("RTMP push → HTTP-FLV player", signed("pushed")),
        (
            "WebRTC publisher → RTMP player",
            format!("rtmp://{rtmp}/live/{web_stream}?{watcher}"),
        ),
        ("WebRTC publisher → HTTP-FLV player", signed(&web_stream)),
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..rounds {
        for (i, (_, url)) in cases.iter().enumerate() {
            // Join at a random point of the 1 s GOP (and after the last player left,
            // so a WebRTC source's conversion starts afresh each time).
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            tokio::time::sleep(Duration::from_millis(300 + seed % 1000)).await;
            if let Some(s) = first_frame(url).await {
                results[i].push(s);
            }
        }
        signal.send(&ClientMessage::Ping { ts: 0 }).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = pusher.kill().await;
    summary("ffmpeg alone (local source, no network)", baseline);
    for ((name, _), r) in cases.iter().zip(results) {
        summary(name, r);
    }
    let metrics = t.metrics().await;
    println!(
        "\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("weir_play_requests") || l.starts_with("weir_flv_frames"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
