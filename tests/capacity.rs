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
