//! Simulcast: headless Chromium publishes three layers through the SDK; of two
//! `webrtc`-crate subscribers, one on a clean link gets the best layer and one behind
//! a capped link is lowered to a layer it can carry, keeps its video, and decodes it.
//! Alone in its test binary, one test at a time: Chromium's three encoders need the
//! machine's two cores. Also: layers nobody needs are switched off at the publisher.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::browser::Browser;
use common::media::h264_annex_b;
use common::relay::ShapedRelay;
use common::watcher::Watcher;
use common::TestServer;
use weir_signaling::CongestionPolicy;

const ROOM: u32 = 4242;

/// One Chromium with three encoders at a time: two would compete for the two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The size of every frame `w` decoded from its whole video stream up to `to`, in
/// order (a window cut mid-GOP would lack the parameter sets Chrome sends with keyframes).
async fn frame_sizes(w: &Watcher, to: Instant, dir: &std::path::Path) -> Vec<(u32, u32)> {
    let packets: Vec<common::peer::Received> = {
        let guard = w.peer.lock().await;
        let p = guard.as_ref().expect("subscribed");
        let inbox = p.inbox.lock().unwrap();
        let mut v: Vec<_> = inbox
            .iter()
            .filter(|(id, _)| id.ends_with("video"))
            .flat_map(|(_, v)| v.iter().cloned())
            .filter(|r| r.at < to && !r.payload.is_empty())
            .collect();
        v.sort_by_key(|r| r.at);
        v
    };
    let path = dir.join("stream.h264");
    std::fs::write(&path, h264_annex_b(&packets)).unwrap();
    let out = tokio::process::Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-show_entries"])
        .args(["frame=width,height", "-of", "csv=p=0"])
        .arg(&path)
        .output()
        .await
        .expect("ffprobe runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split(',');
            Some((
                f.next()?.trim().parse().ok()?,
                f.next()?.trim().parse().ok()?,
            ))
        })
        .collect()
}

/// What `w` received of `kind` from `from` to `to`: bit/s (payloads plus RTP and
/// SRTP headers, ~40 bytes with UDP/IP) and frames (distinct RTP timestamps).
async fn received(w: &Watcher, kind: &str, from: Instant, to: Instant) -> (f64, usize) {
    let guard = w.peer.lock().await;
    let p = guard.as_ref().expect("subscribed");
    let inbox = p.inbox.lock().unwrap();
    let mut bytes = 0usize;
    let mut frames = std::collections::HashSet::new();
    for r in inbox
        .iter()
        .filter(|(id, _)| id.ends_with(kind))
        .flat_map(|(_, v)| v.iter())
        .filter(|r| r.at >= from && r.at < to)
    {
        bytes += r.payload.len() + 40;
        if !r.payload.is_empty() {
            frames.insert((r.ssrc, r.ts));
        }
    }
    let secs = to.duration_since(from).as_secs_f64();
    (bytes as f64 * 8.0 / secs, frames.len())
}

/// Joins the page as "chrome" and publishes 960×540 with simulcast through the SDK
/// (`extra`: more publish options); the stream id.
async fn publish_simulcast(
    page: &common::browser::Page<'_>,
    t: &TestServer,
    extra: &str,
) -> String {
    let options = serde_json::to_string(&t.join("chrome", ROOM, 0xff)).unwrap();
    let stream = page
        .eval(&format!(
            r#"(async () => {{
                const {{ WeirRoom }} = await import('/sdk/weir.js');
                const room = new WeirRoom({options});
                window.room = room;
                await room.join();
                await room.publish({{ audio: true, video: true, simulcast: true,
                                      width: 960, height: 540, {extra} }});
                return room.ownStream.streamId;
            }})()"#
        ))
        .await;
    stream.as_str().expect("published").to_owned()
}

/// The simulcast layers the server sees sent (`weir_simulcast_layers`).
async fn simulcast_layers(t: &TestServer) -> usize {
    t.metrics()
        .await
        .lines()
        .find(|l| l.starts_with("weir_simulcast_layers "))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0) as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_subscriber_gets_a_lower_simulcast_layer_and_keeps_its_video() {
    let _serial = SERIAL.lock().await;
    let t =
        TestServer::start_with(|c| c.server.congestion_policy = CongestionPolicy::Majority).await;
    let relay = ShapedRelay::start(
        t.udp_addr(),
        0,
        Duration::from_millis(200),
        Duration::from_millis(10),
        0.0,
        3,
    )
    .await;
    // Two on clean links, one capped: the majority is clean, so the publisher is not
    // asked to lower what it sends, and only the capped subscriber falls back.
    let clean = Watcher::join(&t, "clean", ROOM, None).await;
    let _clean2 = Watcher::join(&t, "clean2", ROOM, None).await;
    let capped = Watcher::join(&t, "capped", ROOM, Some(relay.addr)).await;
    let browser = Browser::launch().await;
    let page = browser
        .open(&format!("http://{}/", t.server.http_addr))
        .await;
    let stream = publish_simulcast(&page, &t, "").await;
    // Chrome ramps its layers up as its own estimate grows.
    let mut layers = 0;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        layers = simulcast_layers(&t).await;
        if layers >= 2 && !clean.packets("video").await.is_empty() {
            break;
        }
    }
    assert!(
        layers >= 2,
        "Chrome sends {layers} simulcast layers:\n{}",
        browser.console_dump()
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    let dir = tempfile::tempdir().unwrap();
    let before = frame_sizes(&clean, Instant::now(), dir.path()).await;
    assert!(
        before.len() > 30,
        "the clean subscriber decodes video ({} frames)",
        before.len()
    );
    let w_top = before.last().unwrap().0;

    // The capped link carries the lowest layer (and audio), not the best one.
    const CAP: f64 = 350_000.0;
    relay.rate_bps.store(CAP as u64, Ordering::Relaxed);
    let capped_at = Instant::now();
    let mut lowered_at = None;
    while capped_at.elapsed() < Duration::from_secs(12) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        lowered_at = capped
            .events
            .lock()
            .unwrap()
            .iter()
            .find_map(|(at, m)| match m {
                weir_signaling::ServerMessage::Congestion { lowered, .. }
                    if *at > capped_at && lowered.contains(&stream) =>
                {
                    Some(*at)
                }
                _ => None,
            });
        if lowered_at.is_some_and(|at| at.elapsed() > Duration::from_secs(5)) {
            break;
        }
    }
    let lowered_at = lowered_at.unwrap_or_else(|| {
        panic!(
            "the capped subscriber was never lowered: {:?}",
            capped.congestion()
        )
    });
    let end = Instant::now();
    let low = frame_sizes(&capped, end, dir.path()).await;
    let high = frame_sizes(&clean, end, dir.path()).await;
    let (w_low, h_low) = *low.last().expect("the capped subscriber decodes video");
    let w_clean = high.last().expect("the clean subscriber decodes video").0;
    let runs = |v: &[(u32, u32)]| {
        let mut out: Vec<(u32, usize)> = Vec::new();
        for (w, _) in v {
            match out.last_mut() {
                Some((lw, n)) if lw == w => *n += 1,
                _ => out.push((*w, 1)),
            }
        }
        out
    };
    // The last 3 s: what each subscriber got, and what the clean one's layer takes.
    let window = end - Duration::from_secs(3);
    let (capped_video_bps, capped_frames) = received(&capped, "video", window, end).await;
    let (capped_audio_bps, _) = received(&capped, "audio", window, end).await;
    let (clean_video_bps, clean_frames) = received(&clean, "video", window, end).await;
    eprintln!("sizes: capped {:?}; clean {:?}", runs(&low), runs(&high));
    eprintln!(
        "{layers} layers; clean subscriber {w_top} px wide before, {w_clean} px at the end \
         ({:.0} kbit/s, {clean_frames} frames in the last 3 s); capped subscriber lowered \
         {:?} after the cap, at the end {w_low}x{h_low} ({:.0} kbit/s video + {:.0} audio, \
         {capped_frames} frames in the last 3 s)",
        clean_video_bps / 1000.0,
        lowered_at.duration_since(capped_at),
        capped_video_bps / 1000.0,
        capped_audio_bps / 1000.0,
    );
    // It keeps its video, within what its link carries.
    assert!(
        capped_frames > 10,
        "the capped subscriber keeps its video ({capped_frames} frames in the last 3 s)"
    );
    assert!(
        capped_video_bps + capped_audio_bps < CAP,
        "within the cap: {capped_video_bps:.0} + {capped_audio_bps:.0} bit/s"
    );
    // On a lower layer than the clean subscriber, unless the clean one's layer fits
    // under the cap as well (a CPU-starved Chrome encodes even its top layer small).
    assert!(
        w_low > 0 && (w_low < w_clean || clean_video_bps + capped_audio_bps < CAP * 0.9),
        "a lower layer: {w_low} px < {w_clean} px, whose {clean_video_bps:.0} bit/s \
         do not fit the cap"
    );
    // Never paused: a lower layer fitted.
    assert!(
        capped.congestion().iter().all(|(_, _, _, p)| p.is_empty()),
        "{:?}",
        capped.congestion()
    );
    let m = t.metrics().await;
    assert!(
        m.contains("weir_congestion_layer_switches_total{direction=\"layer\""),
        "{m}"
    );
}

/// The rids of the Chrome publisher's video encodings that are switched on.
async fn active_encodings(page: &common::browser::Page<'_>) -> Vec<String> {
    let v = page
        .eval(
            "(() => { const s = window.room.publisher.getSenders().find((s) => s.track && s.track.kind === 'video'); \
             return s.getParameters().encodings.filter((e) => e.active).map((e) => e.rid); })()",
        )
        .await;
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_nobody_needs_are_switched_off_at_the_publisher_and_back_on() {
    let _serial = SERIAL.lock().await;
    // The room spread over two media workers: the watcher's connection is on the one
    // that is not the room's (the first receiver goes to the worker with the fewest, a
    // tie away from the room's), so what the publisher is told to send comes from the
    // layer it is forwarded there, reported to the room's worker.
    let t = TestServer::start_with(|c| {
        c.server.media_workers = 2;
        c.server.spread_room_members = 0;
    })
    .await;
    let relay = ShapedRelay::start(
        t.udp_addr(),
        0,
        Duration::from_millis(200),
        Duration::from_millis(10),
        0.0,
        5,
    )
    .await;
    let only = Watcher::join(&t, "only", ROOM, Some(relay.addr)).await;
    let browser = Browser::launch().await;
    let page = browser
        .open(&format!("http://{}/", t.server.http_addr))
        .await;
    publish_simulcast(&page, &t, "minBitrate: 1000000").await;
    // Wait for the top layer to be up and forwarded.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if simulcast_layers(&t).await >= 3 && !only.packets("video").await.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "Chrome never sent 3 layers");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let m = t.metrics().await;
    assert_eq!(
        common::metric(&m, "weir_media_mirrors"),
        1.0,
        "the watcher is on the other worker: {m}"
    );
    assert_eq!(active_encodings(&page).await.len(), 3);

    // The only subscriber can carry the lowest layer at most (or nothing but audio):
    // the top one is not needed. 100 kbit/s: with Opus's ~35 kbit/s, a middle layer
    // fits only under ~56 kbit/s. At 300 kbit/s Chrome's middle layer (~190 kbit/s
    // here) fitted, and then the top layer was rightly kept on as the next one up; at
    // 150 kbit/s a CPU-starved Chrome's middle layer could still fit. The publisher's
    // `minBitrate` keeps the room from asking Chrome for less (it would shrink every
    // layer until the middle one fits).
    relay.rate_bps.store(100_000, Ordering::Relaxed);
    let capped = Instant::now();
    let mut off = None;
    while capped.elapsed() < Duration::from_secs(25) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if active_encodings(&page).await.len() < 3 {
            off = Some(capped.elapsed());
            break;
        }
    }
    let off = off.unwrap_or_else(|| {
        panic!(
            "the top layer stayed on: {:?}; {:?}",
            only.congestion(),
            browser.console_dump()
        )
    });
    let still = active_encodings(&page).await;
    assert_eq!(
        still.len(),
        2,
        "the lowest layer and the next one stay: {still:?}"
    );

    // The link recovers: the subscriber climbs, and the top layer comes back.
    relay.rate_bps.store(0, Ordering::Relaxed);
    let lifted = Instant::now();
    let mut on = None;
    while lifted.elapsed() < Duration::from_secs(25) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if active_encodings(&page).await.len() == 3 {
            on = Some(lifted.elapsed());
            break;
        }
    }
    let on = on.unwrap_or_else(|| panic!("the top layer never came back: {:?}", only.congestion()));
    eprintln!("top layer switched off {off:?} after the cap, back on {on:?} after the lift");
}
