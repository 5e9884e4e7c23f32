//! Forwarding latency through the SFU: one publisher (H.264-sized video at 1 Mbit/s and
//! Opus-sized audio), N subscribers, all real WebRTC clients on loopback, for a while;
//! then the server's own `weir_forward_latency_seconds` histogram (arrival of a packet
//! to its copy leaving for a subscriber) is read from /metrics.
//!
//! Run: `cargo bench --bench forwarding` (env: BENCH_SECONDS=60, BENCH_SUBSCRIBERS=4)
//!
//! `BENCH_SILENT_BACKEND=1`: callbacks go to a backend that accepts connections and
//! never answers, while a member joins and leaves another room ten times a second (four
//! room events each): the callbacks' queue stays full and every request times out, the
//! case issue 19 asks to show does not touch forwarding.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::peer::{h264, opus, RtcPeer};
use common::{Client, TestServer};
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use webrtc::media_stream::track_local::TrackLocal;
use weir_signaling::{ClientMessage, ServerMessage, Target};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds = env("BENCH_SECONDS", 60);
    let subscribers = env("BENCH_SUBSCRIBERS", 4) as usize;
    let silent = std::env::var("BENCH_SILENT_BACKEND").is_ok_and(|v| v == "1");
    let silent_port = if silent {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        Some(port)
    } else {
        None
    };
    let t = TestServer::start_with(|c| {
        if let Some(port) = silent_port {
            c.callbacks.url = format!("http://127.0.0.1:{port}/cb");
            c.callbacks.key = "k".into();
            c.callbacks.timeout_ms = 2000;
            c.callbacks.max_queued = 1000;
        }
    })
    .await;

    let (mut signal, _) = Client::join(&t.ws_url(), t.join("pub", 1, 0xff)).await;
    signal.publish(true, true).await;
    let mut publisher = RtcPeer::new().await;
    let video = publisher
        .add_send_track(RtpCodecKind::Video, h264(), 0x1111)
        .await;
    let audio = publisher
        .add_send_track(RtpCodecKind::Audio, opus(), 0x2222)
        .await;
    let offer = publisher.offer().await;
    signal
        .send(&ClientMessage::Offer {
            target: Target::Publisher,
            sdp: offer,
        })
        .await;
    let answer = signal
        .expect(|m| match m {
            ServerMessage::Answer { sdp, .. } => Some(sdp.clone()),
            _ => None,
        })
        .await;
    publisher.accept_answer(answer).await;
    publisher.connected().await;

    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (vpt, apt) = (video.payload_type().await, audio.payload_type().await);
            let start = Instant::now();
            let mut n: u64 = 0;
            // 100 video packets of 1200 B (≈1 Mbit/s incl. headers) and 50 audio packets of 160 B per second
            while !stop.load(Ordering::Relaxed) {
                let due = start + Duration::from_millis(10 * n);
                tokio::time::sleep_until(due.into()).await;
                let mut p = rtc::rtp::Packet::default();
                p.header.version = 2;
                p.header.ssrc = 0x1111;
                p.header.payload_type = vpt;
                p.header.sequence_number = n as u16;
                p.header.timestamp = (n * 900) as u32;
                // An IDR every second: subscribers' video starts at one.
                let nal = if n % 100 == 0 { 0x65 } else { 0x41 };
                p.payload = vec![nal; 1200].into();
                let _ = video.track.write_rtp(p).await;
                if n % 2 == 0 {
                    let mut a = rtc::rtp::Packet::default();
                    a.header.version = 2;
                    a.header.ssrc = 0x2222;
                    a.header.payload_type = apt;
                    a.header.sequence_number = (n / 2) as u16;
                    a.header.timestamp = (n / 2 * 960) as u32;
                    a.payload = vec![0xfc; 160].into();
                    let _ = audio.track.write_rtp(a).await;
                }
                n += 1;
            }
        })
    };

    let mut watchers = Vec::new();
    for i in 0..subscribers {
        let (mut signal, _) = Client::join(&t.ws_url(), t.join(&format!("sub{i}"), 1, 0xff)).await;
        let offer = signal
            .expect(|m| match m {
                ServerMessage::Offer {
                    target: Target::Subscriber,
                    sdp,
                } => Some(sdp.clone()),
                _ => None,
            })
            .await;
        let mut peer = RtcPeer::new().await;
        let answer = peer.answer(offer).await;
        signal
            .send(&ClientMessage::Answer {
                target: Target::Subscriber,
                sdp: answer,
            })
            .await;
        peer.connected().await;
        watchers.push((signal, peer));
    }
    let churn = silent.then(|| {
        let url = t.ws_url();
        let joins: Vec<_> = (0..10_000)
            .map(|i| t.join(&format!("churn{i}"), 2, 0xff))
            .collect();
        let stop = stop.clone();
        tokio::spawn(async move {
            for j in joins {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let (mut c, _) = Client::join(&url, j).await;
                c.send(&ClientMessage::Leave).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });
    eprintln!(
        "1 publisher, {subscribers} subscribers; forwarding for {seconds} s{}…",
        if silent {
            ", callbacks to a silent backend, a join and leave every 100 ms"
        } else {
            ""
        }
    );
    let cpu_before = cpu_seconds();
    let until = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < until {
        // A silent signaling session is closed after 30 s: keep them alive.
        tokio::time::sleep(Duration::from_secs(5).min(until - Instant::now())).await;
        signal.send(&ClientMessage::Ping { ts: 0 }).await;
        for (s, _) in watchers.iter_mut() {
            s.send(&ClientMessage::Ping { ts: 0 }).await;
        }
    }
    let cpu = cpu_seconds() - cpu_before;
    stop.store(true, Ordering::Relaxed);
    let _ = sender.await;
    if let Some(c) = churn {
        let _ = c.await;
    }

    let metrics = t.metrics().await;
    let buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("weir_forward_latency_seconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, rest) = l.split_once("\"}")?;
            Some((
                le.parse().unwrap_or(f64::INFINITY),
                rest.trim().parse().ok()?,
            ))
        })
        .collect();
    let count = buckets.last().map(|b| b.1).unwrap_or(0.0);
    let received: usize = watchers
        .iter()
        .map(|(_, p)| {
            p.inbox
                .lock()
                .unwrap()
                .values()
                .map(Vec::len)
                .sum::<usize>()
        })
        .sum();
    if silent {
        println!(
            "callbacks: {} queued, {} failed attempts, {} dropped (queue full)",
            common::metric(&metrics, "weir_callbacks_queued"),
            metrics
                .lines()
                .filter(|l| l.starts_with("weir_callbacks_total") && l.contains("failed_attempt"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>(),
            metrics
                .lines()
                .filter(|l| l.starts_with("weir_callbacks_total") && l.contains("dropped_full"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>(),
        );
    }
    println!("forwarded packets      {count}");
    println!("received by clients    {received}");
    for q in [0.5, 0.9, 0.99, 0.999] {
        println!(
            "p{:<5} forward latency {:>8.1} µs",
            q * 100.0,
            quantile(&buckets, q) * 1e6
        );
    }
    println!(
        "process CPU (server + {} clients) {:.1} % of one core",
        subscribers + 1,
        cpu / seconds as f64 * 100.0
    );
    println!(
        "\n{}",
        metrics
            .lines()
            .filter(|l| l.starts_with("weir_forward_latency"))
            .collect::<Vec<_>>()
            .join("\n")
    );
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
