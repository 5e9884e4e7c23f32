//! The binary under SIGTERM, as systemd or Kubernetes stops it: with 50 members in
//! rooms, every one is told (`left` with reason `serverShutdown`, then close 1001),
//! new joins are refused while it drains, and it exits 0 within its grace period.

mod common;

use std::time::{Duration, Instant};

use common::node::Node;
use common::{Client, APP};
use weir_signaling::{close, ClientMessage, Join, LeaveReason, ServerMessage, PROTOCOL_VERSION};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_fifty_members_tells_each_and_exits_cleanly() {
    let Node {
        mut child,
        http,
        app,
        _dir,
        ..
    } = Node::start(&[]).await;
    // Its log, read so that the pipe never fills.
    let mut log = child.stderr.take().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut sink = Vec::new();
        let _ = log.read_to_end(&mut sink).await;
    });
    let url = format!("ws://127.0.0.1:{http}/ws");

    let join = |user: String, room: u32| {
        let now = weir::auth::unix_now();
        let kind = weir::auth::TokenKind::V2;
        Join {
            protocol: PROTOCOL_VERSION,
            sdk_app_id: APP,
            user_sig: app.issue_user_sig(kind, &user, now, 3600).unwrap(),
            private_map_key: app
                .issue_private_map_key(
                    kind,
                    &user,
                    &weir::auth::RoomId::Num(room),
                    weir::auth::Privileges(0xff),
                    now,
                    3600,
                )
                .unwrap(),
            user_id: user,
            room_id: Some(room),
            str_room_id: None,
            auto_subscribe: true,
            congestion_policy: None,
        }
    };
    let mut members = Vec::new();
    for i in 0..50u32 {
        let (c, joined) = Client::join(&url, join(format!("member{i}"), 100 + i % 10)).await;
        assert!(matches!(joined, ServerMessage::Joined { .. }), "{joined:?}");
        members.push(c);
    }

    let pid = child.id().unwrap();
    let sent = Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());

    let mut told = 0;
    for (i, m) in members.iter_mut().enumerate() {
        let left = m
            .try_recv_matching(Duration::from_secs(5), |msg| match msg {
                ServerMessage::Left { reason } => Some(*reason),
                _ => None,
            })
            .await;
        assert_eq!(left, Some(LeaveReason::ServerShutdown), "member{i}");
        assert_eq!(
            m.close_code(Duration::from_secs(5))
                .await
                .flatten()
                .map(|c| c.0),
            Some(close::GOING_AWAY),
            "member{i}"
        );
        told += 1;
    }
    // Draining: nobody new gets in (refused, or the listener is already closed).
    if let Ok((mut late, _)) = tokio_tungstenite::connect_async(&url).await {
        use futures_util::{SinkExt, StreamExt};
        let msg = serde_json::to_string(&ClientMessage::Join(join("late".into(), 100))).unwrap();
        let _ = late
            .send(tokio_tungstenite::tungstenite::Message::Text(msg.into()))
            .await;
        if let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) =
            tokio::time::timeout(Duration::from_secs(5), late.next()).await
        {
            let answer = ServerMessage::parse(&t).unwrap();
            assert!(
                matches!(
                    answer,
                    ServerMessage::Error {
                        code: weir_signaling::ErrorCode::Unavailable,
                        ..
                    }
                ),
                "a join while draining: {answer:?}"
            );
        }
    }
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("the binary exits within its grace period")
        .unwrap();
    let took = sent.elapsed();
    assert!(status.success(), "exit status {status}");
    assert_eq!(told, 50);
    assert!(took < Duration::from_secs(8), "stopping took {took:?}");
}

/// A part of the node dies (the media task panics, by a test-only trigger): the binary
/// itself exits non-zero with the reason, so systemd or Kubernetes starts a healthy
/// node, instead of living on as a zombie that admits people and forwards nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_part_makes_the_binary_exit_non_zero() {
    let Node {
        mut child, http, ..
    } = Node::start(&[("WEIR_FAULT_MEDIA_PANIC_AFTER_MS", "1500")]).await;
    let health = common::http_get(([127, 0, 0, 1], http).into(), "/healthz").await;
    assert!(health.starts_with("HTTP/1.0 200"), "{health}");
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("the binary exits once its media task is dead")
        .unwrap();
    let mut stderr = String::new();
    use tokio::io::AsyncReadExt;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    // An exit, not a signal: `weir` ends every error with code 2.
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("media task panicked")
            && stderr.contains("exiting so the node is restarted"),
        "{stderr}"
    );
}
