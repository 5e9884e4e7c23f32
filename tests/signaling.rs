//! Signaling through the real websocket with real credentials: joins, room events,
//! refusals that leave the room undisturbed, misbehaving peers, reconnects, shutdown.

mod common;

use std::time::Duration;

use common::{Client, TestServer};
use weir_signaling::{close, ClientMessage, ErrorCode, Kind, LeaveReason, ServerMessage, Target};

fn text(t: &str) -> ClientMessage {
    ClientMessage::TextMessage { text: t.into() }
}

#[tokio::test]
async fn members_streams_and_text_flow_through_a_room() {
    let t = TestServer::start().await;
    let (mut alice, joined) = Client::join(&t.ws_url(), t.join("alice", 1234, 0xff)).await;
    assert!(
        matches!(joined, ServerMessage::Joined { ref members, ref room, privileges: 0xff, .. } if members.is_empty() && room == "1234"),
        "{joined:?}"
    );
    let (mut bob, joined) = Client::join(&t.ws_url(), t.join("bob", 1234, 0xff)).await;
    let ServerMessage::Joined { members, .. } = joined else {
        panic!("{joined:?}")
    };
    assert_eq!(members[0].user_id, "alice");
    assert!(
        matches!(alice.recv().await, ServerMessage::MemberJoined { user_id } if user_id == "bob")
    );

    alice
        .send(&ClientMessage::Publish {
            audio: true,
            video: true,
            min_bitrate: None,
            max_bitrate: None,
            screen: false,
        })
        .await;
    let ServerMessage::Published { stream } = alice.recv().await else {
        panic!()
    };
    assert_eq!(stream.stream_id, "1400000000_1234_alice_main");
    let added = bob
        .expect(|m| match m {
            ServerMessage::StreamAdded { stream } => Some(stream.clone()),
            _ => None,
        })
        .await;
    assert_eq!(added, stream);
    let rtmp_port = t.server.rtmp_addr.unwrap().port();
    assert_eq!(
        added.urls.rtmp,
        format!("rtmp://127.0.0.1:{rtmp_port}/live/1400000000_1234_alice_main")
    );
    assert!(added
        .urls
        .flv
        .ends_with("/live/1400000000_1234_alice_main.flv"));

    bob.send(&text("hello alice")).await;
    let got = alice
        .expect(|m| match m {
            ServerMessage::TextMessage { user_id, text, .. } => {
                Some((user_id.clone(), text.clone()))
            }
            _ => None,
        })
        .await;
    assert_eq!(got, ("bob".into(), "hello alice".into()));

    alice
        .send(&ClientMessage::Mute {
            kind: Kind::Audio,
            muted: true,
        })
        .await;
    bob.expect(|m| {
        matches!(
            m,
            ServerMessage::StreamMuted {
                muted: true,
                kind: Kind::Audio,
                ..
            }
        )
        .then_some(())
    })
    .await;

    alice.send(&ClientMessage::Ping { ts: 77 }).await;
    alice
        .expect(|m| matches!(m, ServerMessage::Pong { ts: 77 }).then_some(()))
        .await;

    alice.send(&ClientMessage::Leave).await;
    alice
        .expect(|m| {
            matches!(
                m,
                ServerMessage::Left {
                    reason: LeaveReason::Left
                }
            )
            .then_some(())
        })
        .await;
    bob.expect(|m| matches!(m, ServerMessage::StreamRemoved { stream_id, .. } if stream_id == "1400000000_1234_alice_main").then_some(())).await;
    bob.expect(|m| matches!(m, ServerMessage::MemberLeft { user_id, reason: LeaveReason::Left } if user_id == "alice").then_some(())).await;
}

fn error_of(m: &ServerMessage) -> (ErrorCode, String, Option<u32>) {
    match m {
        ServerMessage::Error {
            code,
            message,
            tencent_code,
            ..
        } => (*code, message.clone(), *tencent_code),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn refusals_name_the_reason_and_leave_the_room_undisturbed() {
    let t = TestServer::start().await;
    let (mut alice, _) = Client::join(&t.ws_url(), t.join("alice", 1, 0xff)).await;
    let (mut bob, _) = Client::join(&t.ws_url(), t.join("bob", 1, 0xff)).await;
    alice
        .expect(|m| matches!(m, ServerMessage::MemberJoined { .. }).then_some(()))
        .await;

    // a userSig that does not verify
    let mut bad = t.join("mallory", 1, 0xff);
    bad.user_sig = bad.user_sig.replacen('A', "B", 1);
    let (mut m1, answer) = Client::join(&t.ws_url(), bad).await;
    let (code, message, tencent) = error_of(&answer);
    assert_eq!(code, ErrorCode::InvalidUserSig);
    assert!(tencent.is_some(), "{message}");

    // a privateMapKey for another room
    let mut other_room = t.join("carol", 1, 0xff);
    other_room.private_map_key = t.join("carol", 2, 0xff).private_map_key;
    let (mut m2, answer) = Client::join(&t.ws_url(), other_room).await;
    let (code, message, _) = error_of(&answer);
    assert_eq!(code, ErrorCode::InvalidPrivateMapKey);
    assert!(message.contains("room mismatch"), "{message}");

    // entering without 0x10, then publishing video
    let (mut dave, joined) =
        Client::join(&t.ws_url(), t.join("dave", 1, 0x02 | 0x04 | 0x08 | 0x20)).await;
    assert!(matches!(joined, ServerMessage::Joined { .. }));
    dave.send(&ClientMessage::Publish {
        audio: true,
        video: true,
        min_bitrate: None,
        max_bitrate: None,
        screen: false,
    })
    .await;
    let (code, message, _) = error_of(&dave.recv().await);
    assert_eq!(code, ErrorCode::MissingPrivilege);
    assert!(message.contains("send video (0x10)"), "{message}");
    // dave's session still works: audio alone is allowed
    dave.send(&ClientMessage::Publish {
        audio: true,
        video: false,
        min_bitrate: None,
        max_bitrate: None,
        screen: false,
    })
    .await;
    assert!(matches!(dave.recv().await, ServerMessage::Published { .. }));

    // the refused sessions are not members; the room carries on
    bob.send(&text("still here")).await;
    alice
        .expect(|m| {
            matches!(m, ServerMessage::TextMessage { text, .. } if text == "still here")
                .then_some(())
        })
        .await;
    for c in [&mut m1, &mut m2] {
        c.send(&text("let me in")).await;
        let (code, _, _) = error_of(&c.recv().await);
        assert_eq!(code, ErrorCode::NotJoined);
    }
    let metrics = t.metrics().await;
    assert!(
        metrics.contains("weir_joins_total{outcome=\"invalid_user_sig\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weir_joins_total{outcome=\"invalid_private_map_key\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weir_joins_total{outcome=\"ok\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("weir_participants 3"), "{metrics}");
}

#[tokio::test]
async fn a_misbehaving_peer_is_disconnected_and_nobody_else_notices() {
    let t = TestServer::start().await;
    let (mut alice, _) = Client::join(&t.ws_url(), t.join("alice", 5, 0xff)).await;
    let (mut mallory, _) = Client::join(&t.ws_url(), t.join("mallory", 5, 0xff)).await;
    alice
        .expect(|m| matches!(m, ServerMessage::MemberJoined { .. }).then_some(()))
        .await;
    for _ in 0..20 {
        mallory.send_raw("{\"type\":\"explode\"}").await;
    }
    let mut errors = 0;
    while let Some(m) = mallory.try_recv(Duration::from_secs(5)).await {
        assert_eq!(error_of(&m).0, ErrorCode::BadRequest);
        errors += 1;
    }
    assert!(
        errors <= 9,
        "disconnected after a bounded number of bad messages, got {errors} errors"
    );
    assert_eq!(
        mallory.close_code(Duration::from_secs(1)).await,
        Some(Some((
            close::INVALID_DATA,
            "too many invalid messages".into()
        )))
    );
    alice.expect(|m| matches!(m, ServerMessage::MemberLeft { user_id, reason: LeaveReason::Disconnected } if user_id == "mallory").then_some(())).await;
    alice.send(&ClientMessage::Ping { ts: 1 }).await;
    alice
        .expect(|m| matches!(m, ServerMessage::Pong { ts: 1 }).then_some(()))
        .await;
}

#[tokio::test]
async fn rejoining_with_the_same_user_replaces_the_old_session() {
    let t = TestServer::start().await;
    let (mut first, _) = Client::join(&t.ws_url(), t.join("alice", 9, 0xff)).await;
    let (mut bob, _) = Client::join(&t.ws_url(), t.join("bob", 9, 0xff)).await;
    let (_second, joined) = Client::join(&t.ws_url(), t.join("alice", 9, 0xff)).await;
    assert!(matches!(joined, ServerMessage::Joined { ref members, .. } if members.len() == 1));
    first
        .expect(|m| {
            matches!(
                m,
                ServerMessage::Left {
                    reason: LeaveReason::Replaced
                }
            )
            .then_some(())
        })
        .await;
    assert_eq!(
        first
            .close_code(Duration::from_secs(5))
            .await
            .flatten()
            .map(|c| c.0),
        Some(close::REPLACED),
        "the old socket is closed, saying why"
    );
    bob.expect(|m| {
        matches!(
            m,
            ServerMessage::MemberLeft {
                reason: LeaveReason::Replaced,
                ..
            }
        )
        .then_some(())
    })
    .await;
    bob.expect(|m| {
        matches!(m, ServerMessage::MemberJoined { user_id } if user_id == "alice").then_some(())
    })
    .await;
}

#[tokio::test]
async fn shutdown_tells_clients_and_refuses_new_ones() {
    let t = TestServer::start().await;
    let (mut alice, _) = Client::join(&t.ws_url(), t.join("alice", 3, 0xff)).await;
    let url = t.ws_url();
    let addr = t.server.http_addr;
    let stopping = tokio::spawn(t.server.shutdown());
    alice
        .expect(|m| {
            matches!(
                m,
                ServerMessage::Left {
                    reason: LeaveReason::ServerShutdown
                }
            )
            .then_some(())
        })
        .await;
    assert_eq!(
        alice
            .close_code(Duration::from_secs(5))
            .await
            .flatten()
            .map(|c| c.0),
        Some(close::GOING_AWAY)
    );
    stopping.await.unwrap();
    assert!(tokio_tungstenite::connect_async(&url).await.is_err());
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// HTTP connections are bounded too: a request head larger than the server buffers is
/// refused, and a client that never finishes its head is closed (hyper's header
/// timeout, 10 s) while other clients are served.
#[tokio::test]
async fn oversized_or_unfinished_http_requests_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = TestServer::start().await;
    let addr = t.server.http_addr;
    // A 64 KiB header: refused (431) or closed, never buffered whole.
    let mut big = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "GET /healthz HTTP/1.1\r\nHost: weir\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let _ = big.write_all(head.as_bytes()).await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), big.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 431"),
        "{reply}"
    );
    // Half a request head, then silence: the server hangs up.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: we")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(40), slow.read(&mut buf))
        .await
        .expect("the server closes a connection that never finishes its request head");
    assert!(
        matches!(n, Ok(0) | Err(_)) || String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 408")
    );
    // Meanwhile and after, normal requests are served.
    let ok = common::http_get(addr, "/healthz").await;
    assert!(
        ok.starts_with("HTTP/1.1 200") || ok.starts_with("HTTP/1.0 200"),
        "{ok}"
    );
}

/// One member flooding the room with text cannot disconnect the others. Before, room
/// text had no rate limit, and a recipient whose queue filled with the flood was the
/// one closed ("cannot keep up"), not the sender.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_flooding_text_is_limited_and_disconnects_nobody() {
    let t = TestServer::start().await;
    let (mut alice, _) = Client::join(&t.ws_url(), t.join("alice", 9, 0xff)).await;
    let (mut bob, _) = Client::join(&t.ws_url(), t.join("bob", 9, 0xff)).await;
    let (mut carol, _) = Client::join(&t.ws_url(), t.join("carol", 9, 0xff)).await;
    // Bob reads nothing while alice sends 8 MB of text: 2,000 messages of 4,000 bytes.
    let big = "x".repeat(4000);
    let started = std::time::Instant::now();
    for _ in 0..2000 {
        alice.send(&text(&big)).await;
    }
    let flood_s = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    carol.send(&text("after the flood")).await;
    let mut from_alice = 0;
    loop {
        match bob.recv().await {
            ServerMessage::TextMessage { user_id, .. } if user_id == "alice" => from_alice += 1,
            ServerMessage::TextMessage { text, .. } if text == "after the flood" => break,
            ServerMessage::Left { reason } => panic!("bob was closed: {reason:?}"),
            _ => {}
        }
    }
    // 5 a second, bursts of 10 (the defaults), over the time alice's frames could be
    // read (her session reads on while it can write her refusals).
    let window_s = started.elapsed().as_secs_f64();
    let allowed = 10.0 + 5.0 * (window_s + 1.0);
    assert!(
        (1..=allowed as usize).contains(&from_alice),
        "bob got {from_alice} of alice's messages in {window_s:.1} s (sent in {flood_s:.1} s)"
    );
    let (code, request) = alice
        .expect(|m| match m {
            ServerMessage::Error { code, request, .. } => Some((*code, request.clone())),
            _ => None,
        })
        .await;
    assert_eq!(code, ErrorCode::LimitExceeded);
    assert_eq!(request.as_deref(), Some("textMessage"));
    let metrics = t.metrics().await;
    let limited = common::metric(
        &metrics,
        "weir_signaling_rate_limited_total{type=\"textMessage\"}",
    );
    assert!(limited >= 1.0, "{limited} refused");
    assert_eq!(common::metric(&metrics, "weir_slow_sessions_closed"), 0.0);
}

/// `/metrics` names rooms and users in its labels: it is served on its own listener
/// (loopback by default), and on the public one only with a bearer token. Before, it
/// was on the public listener for anyone.
#[tokio::test]
async fn metrics_are_not_public() {
    async fn get(addr: std::net::SocketAddr, auth: Option<&str>) -> String {
        let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
        common::http_get_with(addr, "/metrics", &auth).await
    }
    let t = TestServer::start().await;
    let public = t.server.http_addr;
    assert!(get(public, None).await.starts_with("HTTP/1.0 404"));
    let private = get(t.server.metrics_addr.unwrap(), None).await;
    assert!(private.starts_with("HTTP/1.0 200") && private.contains("weir_rooms"));

    let t = TestServer::start_with(|c| c.server.metrics_token = "s3cret-token".into()).await;
    let public = t.server.http_addr;
    assert!(get(public, None).await.starts_with("HTTP/1.0 401"));
    assert!(get(public, Some("Bearer wrong-token"))
        .await
        .starts_with("HTTP/1.0 401"));
    let open = get(public, Some("Bearer s3cret-token")).await;
    assert!(
        open.starts_with("HTTP/1.0 200") && open.contains("weir_rooms"),
        "{open}"
    );
}

/// Connections are limited per client and in total at accept, before a byte is read.
/// Before, HTTP, RTMP and ICE-TCP took any number from one address.
#[tokio::test]
async fn connections_from_one_client_are_limited_at_accept() {
    use tokio::io::AsyncReadExt;
    let t = TestServer::start_with(|c| c.server.max_connections_per_ip = 4).await;
    for addr in [t.server.http_addr, t.server.rtmp_addr.unwrap()] {
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        let mut fifth = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), fifth.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "{addr}: the fifth connection is closed at once: {read:?}"
        );
        drop(held);
    }
    // The places are given back: a client can connect again.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_c, joined) = Client::join(&t.ws_url(), t.join("alice", 1, 0xff)).await;
    assert!(matches!(joined, ServerMessage::Joined { .. }), "{joined:?}");
    let metrics = t.metrics().await;
    for listener in ["http", "rtmp"] {
        assert_eq!(
            common::metric(
                &metrics,
                &format!(
                    "weir_connections_refused_total{{listener=\"{listener}\",reason=\"per_ip\"}}"
                )
            ),
            1.0
        );
    }
}

/// Each credential check costs an ECDSA verify: a client whose checks keep failing is
/// refused before the next one until its window ends. Before, failed joins were free
/// to repeat.
#[tokio::test]
async fn a_client_whose_credentials_keep_failing_is_refused_before_checking() {
    let t = TestServer::start_with(|c| c.server.max_failed_joins_per_ip = 3).await;
    for _ in 0..3 {
        let mut bad = t.join("mallory", 1, 0xff);
        bad.user_sig = bad.user_sig.replacen('A', "B", 1);
        let (_c, answer) = Client::join(&t.ws_url(), bad).await;
        assert_eq!(error_of(&answer).0, ErrorCode::InvalidUserSig);
    }
    // Even good credentials wait now: they are not looked at.
    let (_c, answer) = Client::join(&t.ws_url(), t.join("alice", 1, 0xff)).await;
    let (code, message, _) = error_of(&answer);
    assert_eq!(code, ErrorCode::LimitExceeded);
    assert!(message.contains("try again in"), "{message}");
    let metrics = t.metrics().await;
    assert_eq!(common::metric(&metrics, "weir_joins_throttled_total"), 1.0);
    assert_eq!(
        common::metric(&metrics, "weir_joins_total{outcome=\"throttled\"}"),
        1.0
    );
}

/// Every close the server makes carries a code (RFC 6455 §7.4) and a reason, after an
/// `error` or `left` message where there is one: a client can tell "you left" from
/// "your frame was too big" from "you were silent" without guessing.
#[tokio::test]
async fn every_server_side_close_says_why_with_a_code() {
    let t = TestServer::start_with(|c| c.server.signaling_idle_timeout_s = 2).await;
    let url = t.ws_url();

    let (mut left, _) = Client::join(&url, t.join("left", 6, 0xff)).await;
    left.send(&ClientMessage::Leave).await;
    left.expect(|m| {
        matches!(
            m,
            ServerMessage::Left {
                reason: LeaveReason::Left
            }
        )
        .then_some(())
    })
    .await;
    assert_eq!(
        left.close_code(Duration::from_secs(5)).await,
        Some(Some((close::NORMAL, "left".into())))
    );

    // An SDP as large as a member receiving many streams sends (~1.3 KB per m-section:
    // 100 streams are ~260 KB) is read, not refused for its size: this one does not
    // apply, and says so.
    let (mut big, _) = Client::join(&url, t.join("big", 6, 0xff)).await;
    big.send(&ClientMessage::Answer {
        target: Target::Subscriber,
        sdp: format!("v=0\r\n{}", "a=x\r\n".repeat(300 * 1024 / 5)),
    })
    .await;
    let error = big
        .expect(|m| match m {
            ServerMessage::Error { code, message, .. } => Some((*code, message.clone())),
            _ => None,
        })
        .await;
    assert_ne!(error.0, ErrorCode::BadRequest, "{error:?}");
    // A frame over 512 KiB: an error first, then 1009.
    big.send_raw(&format!(
        "{{\"type\":\"textMessage\",\"text\":\"{}\"}}",
        "x".repeat(600 * 1024)
    ))
    .await;
    let error = big
        .expect(|m| match m {
            ServerMessage::Error { code, message, .. } => Some((*code, message.clone())),
            _ => None,
        })
        .await;
    assert_eq!(error.0, ErrorCode::BadRequest, "{error:?}");
    assert!(error.1.contains("524288"), "{error:?}");
    assert_eq!(
        big.close_code(Duration::from_secs(5))
            .await
            .flatten()
            .map(|c| c.0),
        Some(close::TOO_BIG)
    );

    // Binary frames, repeatedly: 1003.
    let (mut binary, _) = Client::join(&url, t.join("binary", 6, 0xff)).await;
    for _ in 0..10 {
        binary.send_binary(vec![0u8; 16]).await;
    }
    assert_eq!(
        binary
            .close_code(Duration::from_secs(5))
            .await
            .flatten()
            .map(|c| c.0),
        Some(close::UNSUPPORTED_DATA)
    );

    // Silence past the idle timeout: `left` (timeout), then 4002.
    let (mut quiet, _) = Client::join(&url, t.join("quiet", 6, 0xff)).await;
    quiet
        .try_recv_matching(Duration::from_secs(5), |m| {
            matches!(
                m,
                ServerMessage::Left {
                    reason: LeaveReason::Timeout
                }
            )
            .then_some(())
        })
        .await
        .expect("left with reason timeout before the close");
    assert_eq!(
        quiet
            .close_code(Duration::from_secs(5))
            .await
            .flatten()
            .map(|c| c.0),
        Some(close::IDLE)
    );
}

/// Room and node limits: each refusal is a 429 naming the limit, to the request it
/// refused (an automatic subscription included), and counted by limit in /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_with_429_and_are_counted() {
    let t = TestServer::start_with(|c| {
        c.server.max_members_per_room = 3;
        c.server.max_publishers_per_room = 2;
        c.server.max_subscriptions_per_member = 1;
    })
    .await;
    let quiet = |user: &str| {
        let mut j = t.join(user, 91, 0xff);
        j.auto_subscribe = false;
        j
    };
    let (mut a, _) = Client::join(&t.ws_url(), quiet("a")).await;
    a.publish(true, true).await;
    let (mut b, _) = Client::join(&t.ws_url(), quiet("b")).await;
    b.publish(true, true).await;
    // c subscribes to everything: one place, so one stream and a 429 for the other.
    let (mut c, joined) = Client::join(&t.ws_url(), t.join("c", 91, 0xff)).await;
    assert!(matches!(joined, ServerMessage::Joined { .. }), "{joined:?}");
    let (code, request, message) = c
        .expect(|m| match m {
            ServerMessage::Error {
                code,
                request,
                message,
                ..
            } => Some((*code, request.clone(), message.clone())),
            _ => None,
        })
        .await;
    assert_eq!(code, ErrorCode::LimitExceeded);
    assert_eq!(request.as_deref(), Some("subscribe"));
    assert!(message.contains("1 streams"), "{message}");
    // A third publisher, and a fourth member: refused.
    c.send(&ClientMessage::Publish {
        audio: true,
        video: false,
        min_bitrate: None,
        max_bitrate: None,
        screen: false,
    })
    .await;
    let code = c
        .expect(|m| match m {
            ServerMessage::Error { code, request, .. } if request.as_deref() == Some("publish") => {
                Some(*code)
            }
            _ => None,
        })
        .await;
    assert_eq!(code, ErrorCode::LimitExceeded);
    let (_d, refused) = Client::join(&t.ws_url(), quiet("d")).await;
    assert!(
        matches!(
            refused,
            ServerMessage::Error {
                code: ErrorCode::LimitExceeded,
                ..
            }
        ),
        "{refused:?}"
    );
    let m = t.metrics().await;
    for limit in [
        "subscriptions_per_member",
        "publishers_per_room",
        "members_per_room",
    ] {
        assert_eq!(
            common::metric(
                &m,
                &format!("weir_limit_refusals_total{{limit=\"{limit}\"}}")
            ),
            1.0,
            "{limit}"
        );
    }
    assert_eq!(common::metric(&m, "weir_subscriptions"), 1.0);
    drop((a, b));
}

/// A deployment whose identity provider signs with its own Ed25519 key and publishes it
/// as a JWKS set: a member joins with the JWT userSig and privateMapKey it issued, and
/// a token naming the same kid with another algorithm is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joins_with_jwts_of_an_identity_providers_jwks_key() {
    use base64::Engine;
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    use weir::auth::jwt::JwtClaims;
    let idp = ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]);
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(idp.verifying_key().as_bytes());
    let jwks = format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"idp-1","x":"{x}"}}]}}"#);
    let t = TestServer::start_with(|c| c.apps[0].jwks = Some(jwks)).await;
    let der = idp.to_pkcs8_der().unwrap();
    let key = jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes());
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    header.kid = Some("idp-1".into());
    let now = weir::auth::unix_now();
    let claims = |privileges: Option<u32>| JwtClaims {
        sub: "ivy".into(),
        sdkappid: common::APP,
        iat: now,
        exp: now + 600,
        nbf: None,
        roomid: privileges.map(|_| 92),
        strroomid: None,
        privileges,
    };
    let sig = jsonwebtoken::encode(&header, &claims(None), &key).unwrap();
    let pmk = jsonwebtoken::encode(&header, &claims(Some(0x2b)), &key).unwrap();
    let mut join = t.join("ivy", 92, 0);
    join.user_sig = sig.clone();
    join.private_map_key = pmk;
    let (_c, joined) = Client::join(&t.ws_url(), join.clone()).await;
    match joined {
        ServerMessage::Joined { privileges, .. } => assert_eq!(privileges, 0x2b),
        other => panic!("{other:?}"),
    }
    // The same kid, with the header saying HS256 (the JWKS key's bytes as an HMAC
    // secret would be the classic confusion): refused.
    let mut forged = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    forged.kid = Some("idp-1".into());
    join.user_sig = jsonwebtoken::encode(
        &forged,
        &claims(None),
        &jsonwebtoken::EncodingKey::from_secret(idp.verifying_key().as_bytes()).unwrap(),
    )
    .unwrap();
    let (_c, refused) = Client::join(&t.ws_url(), join).await;
    assert!(
        matches!(&refused, ServerMessage::Error { code: ErrorCode::InvalidUserSig, message, .. } if message.contains("HS256")),
        "{refused:?}"
    );
}

/// Behind a trusted reverse proxy (an ingress on 127.0.0.1 here) the client is the one
/// its `X-Forwarded-For` names: one client whose credentials keep failing is throttled,
/// and the other clients behind the same proxy are not (before, everyone behind a
/// proxy was one IP: one bad client locked out the whole ingress). Without the proxy
/// trusted, the header is not believed.
#[tokio::test]
async fn clients_behind_a_trusted_proxy_are_told_apart_by_x_forwarded_for() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
    async fn join_via(url: &str, client: &str, join: weir_signaling::Join) -> ServerMessage {
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("x-forwarded-for", client.parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        ws.send(Message::text(
            serde_json::to_string(&ClientMessage::Join(join)).unwrap(),
        ))
        .await
        .unwrap();
        loop {
            if let Some(Ok(Message::Text(t))) = ws.next().await {
                return ServerMessage::parse(&t).unwrap();
            }
        }
    }
    for trusted in [true, false] {
        let t = TestServer::start_with(|c| {
            c.server.max_failed_joins_per_ip = 3;
            if trusted {
                c.server.trusted_proxies = vec!["127.0.0.1".into()];
            }
        })
        .await;
        for _ in 0..3 {
            let mut bad = t.join("mallory", 1, 0xff);
            bad.user_sig = bad.user_sig.replacen('A', "B", 1);
            let answer = join_via(&t.ws_url(), "203.0.113.9", bad).await;
            assert_eq!(error_of(&answer).0, ErrorCode::InvalidUserSig);
        }
        let other = join_via(&t.ws_url(), "203.0.113.10", t.join("alice", 1, 0xff)).await;
        let again = join_via(&t.ws_url(), "203.0.113.9", t.join("mallory", 1, 0xff)).await;
        if trusted {
            assert!(matches!(other, ServerMessage::Joined { .. }), "{other:?}");
            assert_eq!(error_of(&again).0, ErrorCode::LimitExceeded);
        } else {
            // One address for all: the header is a client's word, not believed.
            assert_eq!(error_of(&other).0, ErrorCode::LimitExceeded);
            assert_eq!(error_of(&again).0, ErrorCode::LimitExceeded);
        }
    }
}
