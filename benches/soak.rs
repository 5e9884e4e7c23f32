//! Soak: what a node keeps after being used for a long time.
//!
//! Runs the `weir` binary (release, its own process, so that what is measured is the
//! server's alone) and drives it from this process over loopback:
//!
//! 1. **Join/leave cycles** (`BENCH_CYCLES`, 10,000): ten at a time, a member connects,
//!    joins one of 50 rooms, declares a stream (every other one), subscribes to what is
//!    there, and leaves; every 20th cycle leaves by dropping its socket instead.
//!    Then `BENCH_MEDIA_CYCLES` (500), five at a time, with real media: join, publish
//!    over WebRTC (ICE, DTLS, SRTP), send for half a second, leave (every 4th drops its
//!    socket and connection instead, and is found out by liveness).
//! 2. **A 10-person room** for `BENCH_SOAK_MINUTES` (60): ten `webrtc`-crate members,
//!    each publishing H.264 (320×240, 30 fps, a looped clip) and Opus (a tone) and
//!    receiving the nine others (90 forwarded streams).
//!
//! Every sample reads the server process's resident memory, open file descriptors and
//! threads from /proc, and from its `/metrics`: tasks alive on its runtime
//! (`weir_tasks`), the number of metric series, participants, rooms and subscriptions.
//! It prints the trace (phase 2: also the media the members received in the window)
//! and writes `benches/artifacts/soak-cycles.csv`, `soak-media-cycles.csv` and
//! `soak-room.csv`.
//!
//! `cargo bench --bench soak` (`BENCH_CYCLES=1000 BENCH_MEDIA_CYCLES=50
//! BENCH_SOAK_MINUTES=2` for a short run).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::peer::RtcPeer;
use common::publisher::{offer_to_publish, send_h264_and_opus, Offered, Pace};
use common::Client;
use weir_signaling::{ClientMessage, ServerMessage, Target};

#[path = "support/proc_node.rs"]
mod proc_node;

use proc_node::{write_csv, ProcNode as Node};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn start_node(dir: &std::path::Path) -> Node {
    // The cycles come from one address faster than any real client would.
    Node::start(dir, None, |c| c.server.signaling_messages_per_s = 0).await
}

impl Node {
    /// Every `weir_` series (name and labels) in /metrics.
    async fn series(&self) -> std::collections::BTreeSet<String> {
        common::http_get(self.metrics, "/metrics")
            .await
            .lines()
            .filter(|l| l.starts_with("weir_"))
            .filter_map(|l| l.rsplit_once(' ').map(|(k, _)| k.to_owned()))
            .collect()
    }

    /// (RSS MiB, fds, threads, tasks, series, participants, rooms, subscriptions)
    async fn sample(&self) -> [f64; 8] {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        let field = |name: &str| -> f64 {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                .unwrap_or(f64::NAN)
        };
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or(0) as f64;
        let m = common::http_get(self.metrics, "/metrics").await;
        let series = m
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty() && !l.starts_with("HTTP"))
            .filter(|l| l.starts_with("weir_"))
            .count() as f64;
        let value = |name: &str| common::metric(&m, name);
        [
            field("VmRSS:") / 1024.0,
            fds,
            field("Threads:"),
            value("weir_tasks"),
            series,
            value("weir_participants"),
            value("weir_rooms"),
            value("weir_subscriptions"),
        ]
    }
}

const COLUMNS: &str = "rss_mib,fds,threads,tasks,series,participants,rooms,subscriptions";

fn row(s: &[f64; 8]) -> String {
    format!(
        "{:8.1} {:5.0} {:7.0} {:6.0} {:6.0} {:6.0} {:5.0} {:6.0}",
        s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]
    )
}

/// One join/leave cycle: join, maybe declare a stream, leave (or drop the socket).
async fn cycle(node: Arc<Node>, n: u64) {
    let room = 1000 + (n % 50) as u32;
    let (mut c, joined) = Client::join(&node.ws, node.join(&format!("u{n}"), room, true)).await;
    assert!(
        matches!(joined, ServerMessage::Joined { .. }),
        "cycle {n}: {joined:?}"
    );
    if n % 2 == 0 {
        c.send(&ClientMessage::Publish {
            audio: true,
            video: true,
            min_bitrate: None,
            max_bitrate: None,
            screen: false,
        })
        .await;
        c.expect(|m| matches!(m, ServerMessage::Published { .. }).then_some(()))
            .await;
    }
    if n % 20 == 19 {
        drop(c); // the socket just goes
        return;
    }
    c.send(&ClientMessage::Leave).await;
    let _ = c
        .try_recv_matching(Duration::from_secs(5), |m| {
            matches!(m, ServerMessage::Left { .. }).then_some(())
        })
        .await;
}

/// Joins `room` as `user`, publishes over WebRTC (ICE, DTLS, SRTP) and starts sending
/// H.264 and Opus until `stop`.
async fn join_and_send(
    node: &Node,
    user: &str,
    room: u32,
    auto_subscribe: bool,
    aus: Arc<Vec<Vec<bytes::Bytes>>>,
    stop: Arc<AtomicBool>,
) -> (Client, RtcPeer, tokio::task::JoinHandle<()>) {
    let (mut signal, joined) = Client::join(&node.ws, node.join(user, room, auto_subscribe)).await;
    assert!(
        matches!(joined, ServerMessage::Joined { .. }),
        "{user}: {joined:?}"
    );
    let Offered {
        mut peer,
        video,
        audio,
        answer,
        ..
    } = offer_to_publish(&mut signal).await;
    peer.accept_answer(answer).await;
    peer.connected().await;
    let pts = (video.payload_type().await, audio.payload_type().await);
    let sender = tokio::spawn(send_h264_and_opus(
        aus,
        video.track.clone(),
        audio.track.clone(),
        pts,
        Pace::Until(stop),
    ));
    (signal, peer, sender)
}

/// One cycle with real media: join, publish over WebRTC, send for half a second, and
/// leave (every 4th drops its socket and its connection instead).
async fn media_cycle(node: Arc<Node>, n: u64, aus: Arc<Vec<Vec<bytes::Bytes>>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let room = 2000 + (n % 5) as u32;
    let (mut signal, publisher, sender) =
        join_and_send(&node, &format!("p{n}"), room, false, aus, stop.clone()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = sender.await;
    if n % 4 != 3 {
        signal.send(&ClientMessage::Leave).await;
        let _ = signal
            .try_recv_matching(Duration::from_secs(5), |m| {
                matches!(m, ServerMessage::Left { .. }).then_some(())
            })
            .await;
    }
    let _ = publisher.pc.close().await;
}

/// A member of the soak room: publishes a looped H.264 clip and Opus, receives the
/// others, counts what it receives (and forgets it: an hour would fill memory).
async fn member(
    node: Arc<Node>,
    user: String,
    room: u32,
    aus: Arc<Vec<Vec<bytes::Bytes>>>,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
) {
    let (mut signal, _publisher, sending) =
        join_and_send(&node, &user, room, true, aus, stop.clone()).await;
    let mut subscriber: Option<RtcPeer> = None;
    let mut last_ping = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if last_ping.elapsed() > Duration::from_secs(5) {
            signal.send(&ClientMessage::Ping { ts: 1 }).await;
            last_ping = Instant::now();
            if let Some(s) = &subscriber {
                let mut inbox = s.inbox.lock().unwrap();
                let n: usize = inbox.values().map(Vec::len).sum();
                received.fetch_add(n as u64, Ordering::Relaxed);
                inbox.clear();
            }
        }
        let Some(msg) = signal.try_recv(Duration::from_millis(100)).await else {
            continue;
        };
        if let ServerMessage::Offer {
            target: Target::Subscriber,
            sdp,
        } = msg
        {
            if subscriber.is_none() {
                subscriber = Some(RtcPeer::new().await);
            }
            let answer = subscriber.as_mut().unwrap().answer(sdp).await;
            signal
                .send(&ClientMessage::Answer {
                    target: Target::Subscriber,
                    sdp: answer,
                })
                .await;
        }
    }
    let _ = sending.await;
    signal.send(&ClientMessage::Leave).await;
}

fn csv(s: &[f64; 8]) -> String {
    s.iter()
        .map(|v| format!("{v:.1}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let cycles = env_u64("BENCH_CYCLES", 10_000);
    let minutes = env_u64("BENCH_SOAK_MINUTES", 60);
    let dir = tempfile::tempdir().unwrap();
    let node = Arc::new(start_node(dir.path()).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = node.sample().await;
    println!(
        "soak: weir pid {}, {cycles} join/leave cycles, then a 10-person room for {minutes} min",
        node.pid
    );
    println!("  cycles     s {COLUMNS}");
    println!("  {:6} {:5.0} {}", 0, 0.0, row(&base));

    // 1. Join/leave cycles, ten at a time.
    let t0 = Instant::now();
    let mut rows = vec![format!("0,0.0,{}", csv(&base))];
    let step = (cycles / 20).max(1);
    let mut done = 0;
    while done < cycles {
        let batch = step.min(cycles - done);
        let mut n = done;
        while n < done + batch {
            let group: Vec<_> = (n..(n + 10).min(done + batch))
                .map(|k| tokio::spawn(cycle(node.clone(), k)))
                .collect();
            for g in group {
                g.await.expect("a cycle failed");
            }
            n += 10;
        }
        done += batch;
        // Let the server notice the dropped sockets.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let s = node.sample().await;
        let secs = t0.elapsed().as_secs_f64();
        println!("  {done:6} {secs:5.0} {}", row(&s));
        rows.push(format!("{done},{secs:.1},{}", csv(&s)));
    }
    write_csv(
        "soak-cycles.csv",
        &format!("cycles,seconds,{COLUMNS}"),
        &rows,
    );

    // 1b. Cycles with real media, five at a time.
    let aus = Arc::new(common::publisher::h264_access_units(10));
    let media_cycles = env_u64("BENCH_MEDIA_CYCLES", 500);
    let t0 = Instant::now();
    let mut rows = vec![format!("0,0.0,{}", csv(&node.sample().await))];
    println!("  media cycles (WebRTC publish, 0.5 s of media, leave or drop)");
    let step = (media_cycles / 10).max(1);
    let mut done = 0;
    while done < media_cycles {
        let batch = step.min(media_cycles - done);
        let mut n = done;
        while n < done + batch {
            let group: Vec<_> = (n..(n + 5).min(done + batch))
                .map(|k| tokio::spawn(media_cycle(node.clone(), k, aus.clone())))
                .collect();
            for g in group {
                g.await.expect("a media cycle failed");
            }
            n += 5;
        }
        done += batch;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let s = node.sample().await;
        let secs = t0.elapsed().as_secs_f64();
        println!("  {done:6} {secs:5.0} {}", row(&s));
        rows.push(format!("{done},{secs:.1},{}", csv(&s)));
    }
    // Dropped connections end at the liveness limit; then everything is released.
    tokio::time::sleep(Duration::from_secs(40)).await;
    let s = node.sample().await;
    println!("  40 s later: {}", row(&s));
    rows.push(format!(
        "settled,{:.1},{}",
        t0.elapsed().as_secs_f64(),
        csv(&s)
    ));
    write_csv(
        "soak-media-cycles.csv",
        &format!("cycles,seconds,{COLUMNS}"),
        &rows,
    );

    // 2. A 10-person room (none with BENCH_SOAK_MINUTES=0).
    if minutes == 0 {
        return;
    }
    let before_room = node.series().await;
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let members: Vec<_> = (0..10)
        .map(|i| {
            tokio::spawn(member(
                node.clone(),
                format!("m{i}"),
                77,
                aus.clone(),
                stop.clone(),
                received.clone(),
            ))
        })
        .collect();
    let t1 = Instant::now();
    let every = Duration::from_secs(env_u64("BENCH_SOAK_SAMPLE_S", 60));
    let mut rows = Vec::new();
    println!("  minute {COLUMNS},received pkt/s");
    let mut last = (Instant::now(), 0u64);
    while t1.elapsed() < Duration::from_secs(minutes * 60) {
        tokio::time::sleep(every).await;
        let s = node.sample().await;
        let got = received.load(Ordering::Relaxed);
        let rate = (got - last.1) as f64 / last.0.elapsed().as_secs_f64();
        last = (Instant::now(), got);
        let min = t1.elapsed().as_secs_f64() / 60.0;
        println!("  {min:6.1} {} {rate:8.0}", row(&s));
        rows.push(format!("{min:.2},{},{rate:.0}", csv(&s)));
    }
    stop.store(true, Ordering::Relaxed);
    for m in members {
        let _ = m.await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = node.sample().await;
    println!("  after everyone left: {}", row(&end));
    // What the room left in /metrics: label sets of fixed size are fine (a direction, a
    // kind); anything naming the room, a user or a stream is a leak.
    let left: Vec<String> = node
        .series()
        .await
        .difference(&before_room)
        .cloned()
        .collect();
    println!("  series first seen in the room that remain after it: {left:?}");
    rows.push(format!("end,{},0", csv(&end)));
    write_csv(
        "soak-room.csv",
        &format!("minute,{COLUMNS},received_pkt_per_s"),
        &rows,
    );
    // The server process is killed as `node` goes (kill_on_drop).
    drop(node);
}
