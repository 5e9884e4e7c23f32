//! A node past its capacity refuses new load instead of degrading everyone (issue 16).

mod common;

use std::time::Duration;

use common::{Client, TestServer};
use weir_signaling::{ErrorCode, ServerMessage};

use common::wait_for_metric;

/// The media plane kept busy (it blocks, as one working past its capacity does) is
/// judged overloaded within a couple of seconds: joins are refused with 503 and the
/// reason, counted, and taken again once it has recovered. Members already in keep
/// their session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_media_plane_refuses_joins_until_it_recovers() {
    let t = TestServer::start().await;
    let (mut alice, joined) = Client::join(&t.ws_url(), t.join("alice", 7, 0xff)).await;
    assert!(matches!(joined, ServerMessage::Joined { .. }), "{joined:?}");
    wait_for_metric(&t, "weir_media_overloaded", 0.0, Duration::from_secs(5)).await;

    // Paced, so at most one stall waits in the media task's queue when they stop.
    let stalls = async {
        loop {
            t.server
                .inject_media_stall(Duration::from_millis(200))
                .await;
            tokio::time::sleep(Duration::from_millis(195)).await;
        }
    };
    let while_busy = async {
        wait_for_metric(&t, "weir_media_overloaded", 1.0, Duration::from_secs(10)).await;
        let m = t.metrics().await;
        let busy = common::metric(&m, "weir_media_busy_percent");
        assert!(busy >= 90.0, "busy {busy} %");
        let (_bob, refused) = Client::join(&t.ws_url(), t.join("bob", 7, 0xff)).await;
        match refused {
            ServerMessage::Error { code, message, .. } => {
                assert_eq!(code, ErrorCode::Unavailable, "{message}");
                assert!(message.contains("overloaded"), "{message}");
            }
            other => panic!("a join into an overloaded node: {other:?}"),
        }
        let m = t.metrics().await;
        assert_eq!(
            common::metric(&m, "weir_limit_refusals_total{limit=\"overload\"}"),
            1.0
        );
    };
    tokio::select! {
        _ = stalls => unreachable!("the stalls go on until the checks end"),
        _ = while_busy => {}
    }
    wait_for_metric(&t, "weir_media_overloaded", 0.0, Duration::from_secs(10)).await;
    let (_carol, joined) = Client::join(&t.ws_url(), t.join("carol", 7, 0xff)).await;
    assert!(matches!(joined, ServerMessage::Joined { .. }), "{joined:?}");
    // Alice was never disturbed: her session still answers.
    alice
        .send(&weir_signaling::ClientMessage::Ping { ts: 5 })
        .await;
    alice
        .expect(|m| matches!(m, ServerMessage::Pong { ts: 5 }).then_some(()))
        .await;
}

/// A join storm is not refused for its own handshakes. Members join one after another
/// every 40 ms, each answering the offer of the stream already published and setting
/// its connection up (ICE, DTLS) while the next ones join: the node is busy past
/// the threshold with that setup work, but carries almost no media (the publisher
/// sends no more). Judged on all work, the node was overloaded from the first busy
/// second and refused the rest of the storm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_storm_is_not_refused_for_its_handshakes() {
    const ROOM: u32 = 11;
    const THRESHOLD: u8 = 10;
    const MEMBERS: usize = 30;
    let t = TestServer::start_with(|c| {
        c.server.overload_busy_percent = THRESHOLD;
        c.server.media_workers = 1;
    })
    .await;
    // A second of media makes the stream's tracks known (subscribers are offered
    // them); then it sends nothing more.
    let (_signal, _stream, sender, _relay, _publisher) =
        common::publisher::webrtc_publisher(&t, "alice", ROOM, 1, None).await;
    sender.await.unwrap();
    wait_for_metric(&t, "weir_media_overloaded", 0.0, Duration::from_secs(5)).await;

    // What the node publishes each second while the storm lasts.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readings = {
        let (metrics_url, stop) = (
            t.server.metrics_addr.expect("a metrics listener"),
            stop.clone(),
        );
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let m = common::http_get(metrics_url, "/metrics").await;
                seen.push((
                    common::metric(&m, "weir_media_busy_percent"),
                    common::metric(&m, "weir_media_overloaded"),
                    common::metric(&m, "weir_media_worker_setup_percent"),
                ));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seen
        })
    };
    let storm = (0..MEMBERS).map(|i| {
        let (url, join, port) = (
            t.ws_url(),
            t.join(&format!("m{i}"), ROOM, 0xff),
            t.udp_addr().port(),
        );
        async move {
            tokio::time::sleep(Duration::from_millis(40 * i as u64)).await;
            // Asserts the join is taken.
            common::watcher::Watcher::join_url(&url, join, None, port).await
        }
    });
    let members = futures_util::future::join_all(storm).await;
    for (i, m) in members.iter().enumerate() {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(p) = m.peer.lock().await.as_mut() {
                p.connected().await;
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "member {i} got no offer"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // One more second, so the last handshakes' window is published.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = readings.await.unwrap();
    let busiest = seen.iter().map(|r| r.0).fold(0.0, f64::max);
    eprintln!(
        "busy share (setup) each reading: {:?}",
        seen.iter().map(|r| (r.0, r.2)).collect::<Vec<_>>()
    );
    assert!(
        busiest >= f64::from(THRESHOLD),
        "the storm's handshakes kept the node only {busiest} % busy: this run shows nothing"
    );
    assert!(
        seen.iter().all(|r| r.1 == 0.0),
        "judged overloaded: {seen:?}"
    );
    let m = t.metrics().await;
    assert!(
        !m.contains("limit=\"overload\""),
        "a join refused as overload"
    );
    assert_eq!(
        common::metric(&m, "weir_joins_total{outcome=\"ok\"}"),
        (MEMBERS + 1) as f64
    );
}
