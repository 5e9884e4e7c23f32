//! Participants come and go: every resource they held is released, and a peer that
//! stops answering ICE is removed and announced like one that left.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::peer::{h264, opus, RtcPeer};
use common::relay::{via_relay, Relay};
use common::{Client, TestServer};
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use webrtc::media_stream::track_local::TrackLocal;
use weir_signaling::{ClientMessage, LeaveReason, ServerMessage, Target};

/// Publishes video through `relay` (if any) and returns the peer and its video track.
async fn publish(
    t: &TestServer,
    signal: &mut Client,
    relay: Option<&Relay>,
) -> (RtcPeer, common::peer::SendTrack) {
    publish_from(t, signal, relay, RtcPeer::new().await).await
}

async fn publish_from(
    t: &TestServer,
    signal: &mut Client,
    relay: Option<&Relay>,
    mut peer: RtcPeer,
) -> (RtcPeer, common::peer::SendTrack) {
    signal.publish(true, true).await;
    let video = peer
        .add_send_track(RtpCodecKind::Video, h264(), 0x1234)
        .await;
    let _audio = peer
        .add_send_track(RtpCodecKind::Audio, opus(), 0x5678)
        .await;
    let offer = peer.offer().await;
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
    let answer = match relay {
        Some(r) => via_relay(&answer, t.udp_addr().port(), r.addr),
        None => answer,
    };
    peer.accept_answer(answer).await;
    peer.connected().await;
    (peer, video)
}

async fn send_some(video: &common::peer::SendTrack, from: u16, count: u16) {
    let pt = video.payload_type().await;
    for n in from..from + count {
        let mut p = rtc::rtp::Packet::default();
        p.header.version = 2;
        p.header.ssrc = 0x1234;
        p.header.payload_type = pt;
        p.header.sequence_number = n;
        p.header.timestamp = n as u32 * 3000;
        // An IDR every 20 packets: a subscriber's video starts at one.
        let nal = if n % 20 == 0 { 0x65 } else { 0x41 };
        p.payload = vec![nal, 1, 2, 3].into();
        let _ = video.track.write_rtp(p).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The next subscriber offer the server sends on `signal`.
async fn subscriber_offer(signal: &mut Client) -> String {
    signal
        .expect(|m| match m {
            ServerMessage::Offer {
                target: Target::Subscriber,
                sdp,
            } => Some(sdp.clone()),
            _ => None,
        })
        .await
}

/// A DTLS record (RFC 7983: first byte 20..=63).
fn is_dtls(d: &[u8]) -> bool {
    d.first().is_some_and(|b| (20..=63).contains(b))
}

async fn subscribe(signal: &mut Client) -> RtcPeer {
    subscribe_with(signal, RtcPeer::new().await).await
}

async fn subscribe_with(signal: &mut Client, mut peer: RtcPeer) -> RtcPeer {
    let offer = subscriber_offer(signal).await;
    let answer = peer.answer(offer).await;
    signal
        .send(&ClientMessage::Answer {
            target: Target::Subscriber,
            sdp: answer,
        })
        .await;
    peer.connected().await;
    peer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_joins_and_leaves_release_everything() {
    let t = TestServer::start().await;
    for round in 0..8u16 {
        let (mut a, _) = Client::join(&t.ws_url(), t.join("alice", 10 + round as u32, 0xff)).await;
        let (alice_pc, video) = publish(&t, &mut a, None).await;
        send_some(&video, 0, 10).await;
        let (mut b, _) = Client::join(&t.ws_url(), t.join("bob", 10 + round as u32, 0xff)).await;
        let bob_pc = subscribe(&mut b).await;
        send_some(&video, 10, 20).await;
        let metrics = t.metrics().await;
        assert_eq!(
            common::metric(&metrics, "weir_peer_connections"),
            2.0,
            "round {round}: {metrics}"
        );
        assert_eq!(
            common::metric(&metrics, "weir_subscribed_tracks{kind=\"video\"}"),
            1.0
        );
        // alice leaves properly; bob just drops his socket
        a.send(&ClientMessage::Leave).await;
        a.expect(|m| matches!(m, ServerMessage::Left { .. }).then_some(()))
            .await;
        drop(b);
        let _ = alice_pc.pc.close().await;
        let _ = bob_pc.pc.close().await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = t.metrics().await;
        let all_zero = [
            "weir_rooms",
            "weir_participants",
            "weir_peer_connections",
            "weir_published_tracks{kind=\"video\"}",
            "weir_subscribed_tracks{kind=\"video\"}",
            "weir_subscribed_tracks{kind=\"audio\"}",
        ]
        .iter()
        .all(|m| common::metric(&metrics, m) == 0.0);
        if all_zero {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "resources not released:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_stops_answering_ice_is_removed() {
    let t = TestServer::start_with(|c| {
        c.server.ice_disconnected_timeout_ms = 1_000;
        c.server.ice_failed_timeout_ms = 1_000;
    })
    .await;
    let (mut a, _) = Client::join(&t.ws_url(), t.join("alice", 1, 0xff)).await;
    let relay = Relay::start(t.udp_addr(), Box::new(|_| false)).await;
    let (_alice_pc, video) = publish(&t, &mut a, Some(&relay)).await;
    send_some(&video, 0, 10).await;
    let (mut b, _) = Client::join(&t.ws_url(), t.join("bob", 1, 0xff)).await;
    let _bob_pc = subscribe(&mut b).await;

    // alice's network goes dark: no ICE, no media, but her websocket stays up
    relay.cut.store(true, Ordering::Relaxed);
    let reason = b
        .try_recv_matching(Duration::from_secs(15), |m| match m {
            ServerMessage::MemberLeft { user_id, reason } if user_id == "alice" => Some(*reason),
            _ => None,
        })
        .await
        .expect("bob is told alice is gone within 15 s");
    assert_eq!(reason, LeaveReason::Timeout);
    b.expect(|m| {
        matches!(m, ServerMessage::StreamRemoved { user_id, .. } if user_id == "alice")
            .then_some(())
    })
    .await;
    a.expect(|m| {
        matches!(
            m,
            ServerMessage::Left {
                reason: LeaveReason::Timeout
            }
        )
        .then_some(())
    })
    .await;
    assert_eq!(
        a.close_code(Duration::from_secs(5))
            .await
            .flatten()
            .map(|c| c.0),
        Some(weir_signaling::close::MEDIA_TIMEOUT)
    );
    // Why, for whoever asks why alice's picture went black.
    let metrics = t.metrics().await;
    let lost = |why: &str| {
        common::metric(
            &metrics,
            &format!("weir_peer_connections_lost_total{{why=\"{why}\"}}"),
        )
    };
    assert_eq!(lost("went_silent"), 1.0, "{metrics}");
    assert_eq!(lost("never_connected"), 0.0);
    assert_eq!(lost("failed"), 0.0);
}

/// A subscriber whose DTLS handshake never completes (every handshake datagram lost)
/// is removed once the limit passes, told why, and counted as `never_connected`: a
/// member with a black screen is visible in the metrics, not only in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_whose_handshake_never_completes_is_removed_and_counted() {
    let t = TestServer::start_with(|c| {
        c.server.ice_disconnected_timeout_ms = 1_000;
        c.server.ice_failed_timeout_ms = 1_000;
    })
    .await;
    let room = 43;
    let (mut a, _) = Client::join(&t.ws_url(), t.join("alice", room, 0xff)).await;
    let (_alice_pc, video) = publish(&t, &mut a, None).await;
    send_some(&video, 0, 10).await;
    let (mut b, _) = Client::join(&t.ws_url(), t.join("bob", room, 0xff)).await;
    let offer = subscriber_offer(&mut b).await;
    let relay = Relay::start_with(t.udp_addr(), Box::new(is_dtls), Box::new(is_dtls)).await;
    let mut bob = RtcPeer::new().await;
    let answer = bob
        .answer(via_relay(&offer, t.udp_addr().port(), relay.addr))
        .await;
    b.send(&ClientMessage::Answer {
        target: Target::Subscriber,
        sdp: answer,
    })
    .await;
    let reason = b
        .try_recv_matching(Duration::from_secs(15), |m| match m {
            ServerMessage::Left { reason } => Some(*reason),
            _ => None,
        })
        .await
        .expect("bob is removed within 15 s");
    assert_eq!(reason, LeaveReason::Timeout);
    assert!(relay.dropped.load(Ordering::Relaxed) > 0);
    let metrics = t.metrics().await;
    assert_eq!(
        common::metric(
            &metrics,
            "weir_peer_connections_lost_total{why=\"never_connected\"}"
        ),
        1.0,
        "{metrics}"
    );
}

/// A task whose death matters is supervised: when the media task dies (here by a
/// test-only trigger; before, by a peer's H.264 fmtp), the node says so in `/healthz`
/// and `/readyz`, refuses new joins with the reason, counts it, and `Server::failed`
/// resolves (the binary then exits non-zero to be restarted). Before, the task's handle
/// was dropped: signaling kept admitting people into a node that forwarded nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_media_task_fails_the_health_checks_and_refuses_joins() {
    let t = TestServer::start().await;
    let addr = t.server.http_addr;
    assert!(common::http_get(addr, "/healthz")
        .await
        .starts_with("HTTP/1.0 200"));
    let (mut a, joined) = Client::join(&t.ws_url(), t.join("alice", 7, 0xff)).await;
    assert!(matches!(joined, ServerMessage::Joined { .. }), "{joined:?}");

    t.server.inject_media_panic().await;
    let why = tokio::time::timeout(Duration::from_secs(5), t.server.failed())
        .await
        .expect("the failure is noticed");
    assert!(why.contains("media task panicked"), "{why}");
    for path in ["/healthz", "/readyz"] {
        let r = common::http_get(addr, path).await;
        assert!(r.starts_with("HTTP/1.0 503"), "{path}: {r}");
        assert!(r.contains("media task panicked"), "{path}: {r}");
    }
    // A new signaling session is refused at the upgrade, with the reason.
    match tokio_tungstenite::connect_async(t.ws_url()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 503);
            let body = String::from_utf8_lossy(r.body().as_deref().unwrap_or_default());
            assert!(body.contains("media task panicked"), "{body}");
        }
        other => panic!("a websocket into a failing node: {other:?}"),
    }
    let metrics = t.metrics().await;
    assert_eq!(
        common::metric(&metrics, "weir_task_failures_total{part=\"media\"}"),
        1.0
    );
    // The member already in keeps its socket: leaving still works.
    a.send(&ClientMessage::Leave).await;
}

/// STUN requests naming a connection's ufrag from new addresses are indexed before
/// the connection checks their integrity: whoever knows the ufrag could grow the
/// index without bound, one entry per source port. A connection now keeps its latest
/// few addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_stun_from_many_ports_does_not_grow_the_index() {
    let t = TestServer::start().await;
    let (mut a, _) = Client::join(&t.ws_url(), t.join("alice", 31, 0xff)).await;
    let (peer, _video) = publish(&t, &mut a, None).await;
    let answer = peer.pc.remote_description().await.expect("the answer").sdp;
    let ufrag = answer
        .lines()
        .find_map(|l| l.trim().strip_prefix("a=ice-ufrag:"))
        .expect("the answer has a ufrag")
        .to_owned();

    // A Binding request with USERNAME "ufrag:x" and a wrong MESSAGE-INTEGRITY.
    let username = format!("{ufrag}:x");
    let mut attrs = Vec::new();
    attrs.extend_from_slice(&0x0006u16.to_be_bytes());
    attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
    attrs.extend_from_slice(username.as_bytes());
    while attrs.len() % 4 != 0 {
        attrs.push(0);
    }
    attrs.extend_from_slice(&0x0008u16.to_be_bytes());
    attrs.extend_from_slice(&20u16.to_be_bytes());
    attrs.extend_from_slice(&[0xab; 20]);
    let mut request = vec![0x00, 0x01];
    request.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    request.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    request.extend_from_slice(&[7; 12]);
    request.extend_from_slice(&attrs);
    for _ in 0..200 {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.send_to(&request, t.udp_addr()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let metrics = t.metrics().await;
    let addrs = common::metric(&metrics, "weir_demux_entries{index=\"addr\"}");
    assert!(addrs <= 8.0, "{addrs} addresses indexed for one connection");
    assert_eq!(
        *peer.state.borrow(),
        webrtc::peer_connection::RTCPeerConnectionState::Connected,
        "the real client is undisturbed"
    );
}

/// RFC 7675: any authenticated packet shows the peer is alive, not only STUN checks.
/// Clients send their consent checks every 4-6 s (aioice), and here every 2.5 s while
/// the server calls a connection "disconnected" after 1 s without one: media must flow
/// on between checks on both connections (before, it stopped 1 s after every check,
/// until the next one), and nobody is removed while packets flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_flows_between_sparse_consent_checks() {
    let t = TestServer::start_with(|c| {
        c.server.ice_disconnected_timeout_ms = 1_000;
        c.server.ice_failed_timeout_ms = 2_000;
    })
    .await;
    let keepalive = Duration::from_millis(2_500);
    let (mut a, _) = Client::join(&t.ws_url(), t.join("alice", 2, 0xff)).await;
    let (_alice_pc, video) =
        publish_from(&t, &mut a, None, RtcPeer::with_keepalive(keepalive).await).await;
    send_some(&video, 0, 10).await;
    let (mut b, _) = Client::join(&t.ws_url(), t.join("bob", 2, 0xff)).await;
    let bob_pc = subscribe_with(&mut b, RtcPeer::with_keepalive(keepalive).await).await;
    // 10 s of video at 100 packets a second.
    let start = std::time::Instant::now();
    let mut n = 10u16;
    while start.elapsed() < Duration::from_secs(10) {
        send_some(&video, n, 20).await;
        n += 20;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let inbox = bob_pc.inbox.lock().unwrap().clone();
    let got = inbox
        .values()
        .find(|v| {
            v.iter()
                .any(|p| p.ssrc != 0 && p.payload.first() == Some(&0x41))
        })
        .cloned()
        .unwrap_or_default();
    let later: Vec<_> = got
        .iter()
        .filter(|p| p.at >= start + Duration::from_secs(1))
        .collect();
    let longest = later
        .windows(2)
        .map(|w| w[1].at - w[0].at)
        .max()
        .unwrap_or(Duration::MAX);
    assert!(
        longest < Duration::from_millis(400),
        "a {longest:?} gap in bob's video ({} packets after the first second of {n} sent)",
        later.len()
    );
    assert!(
        later.len() as f64 > 0.9 * f64::from(n - 110),
        "{} of {} packets",
        later.len(),
        n - 110
    );
    for c in [&mut a, &mut b] {
        assert!(
            c.try_recv_matching(Duration::from_millis(10), |m| {
                matches!(
                    m,
                    ServerMessage::MemberLeft { .. } | ServerMessage::Left { .. }
                )
                .then_some(())
            })
            .await
            .is_none(),
            "nobody was removed"
        );
    }
}

/// A node bound to every interface (`0.0.0.0`, the production default) connects its
/// clients: datagrams reach their connections as addressed to the announced
/// candidate. Before, they were handed over as addressed to `0.0.0.0:port`, which is
/// no local candidate, so rtc dropped every ICE check and nobody ever connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_bound_to_every_interface_connects_its_clients() {
    let t = TestServer::start_with(|c| {
        c.server.udp_addr = "0.0.0.0:0".into();
        c.server.tcp_addr = "0.0.0.0:0".into();
    })
    .await;
    let (mut a, _) = Client::join(&t.ws_url(), t.join("alice", 3, 0xff)).await;
    let (_alice_pc, video) = publish(&t, &mut a, None).await;
    send_some(&video, 0, 20).await;
    let (mut b, _) = Client::join(&t.ws_url(), t.join("bob", 3, 0xff)).await;
    let bob_pc = subscribe(&mut b).await;
    send_some(&video, 20, 60).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got: usize = bob_pc.inbox.lock().unwrap().values().map(Vec::len).sum();
    assert!(got >= 20, "bob got {got} packets");
}

/// Issue 16's leave burst: when many members leave at once, the events the room still
/// addresses to ones whose sockets are already closed (their `Closed` not processed
/// yet) were taken for a full queue: those members were closed as "cannot keep up",
/// counted slow, and the room told `timeout` instead of why they left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_leaving_together_are_told_as_they_left_and_none_is_called_slow() {
    let t = TestServer::start().await;
    let room = 41;
    let (mut host, _) = Client::join(&t.ws_url(), t.join("host", room, 0xff)).await;
    let (_host_pc, video) = publish(&t, &mut host, None).await;
    send_some(&video, 0, 10).await;
    // Twice (the race is a matter of timing: one round shows it five times in six).
    for round in 0..2 {
        // Forty members, each told of the stream (an offer each), then all gone at once:
        // their websockets drop without a word, as when a class's browsers are closed.
        let mut members = Vec::new();
        for i in 0..40 {
            let (c, joined) =
                Client::join(&t.ws_url(), t.join(&format!("m{round}-{i}"), room, 0xff)).await;
            assert!(matches!(joined, ServerMessage::Joined { .. }), "{joined:?}");
            members.push(c);
        }
        for c in &mut members {
            subscriber_offer(c).await;
        }
        drop(members);
        let mut gone = std::collections::HashMap::new();
        while gone.len() < 40 {
            let (who, reason) = host
                .try_recv_matching(Duration::from_secs(10), |m| match m {
                    ServerMessage::MemberLeft { user_id, reason } => {
                        Some((user_id.clone(), *reason))
                    }
                    _ => None,
                })
                .await
                .unwrap_or_else(|| panic!("only {} of 40 leaves told: {gone:?}", gone.len()));
            gone.insert(who, reason);
        }
        assert!(
            gone.values().all(|r| *r == LeaveReason::Disconnected),
            "{gone:?}"
        );
    }
    let metrics = t.metrics().await;
    assert_eq!(common::metric(&metrics, "weir_slow_sessions_closed"), 0.0);
    assert_eq!(common::metric(&metrics, "weir_participants"), 1.0);
}

/// Issue 16's stuck handshake at a join peak: subscribers that joined while the node's
/// socket dropped datagrams never got media (Weir logged `remote_srtp_context is not
/// set yet` for the rest of the run). Here subscribers join together, each through a
/// path that loses a different part of the DTLS handshake, one way or both, and two
/// publishers (where Weir has the other DTLS role) likewise: each must end with media.
/// It found the cause: rtc-dtls cleared a handshake's retransmission timer whenever a
/// handshake datagram arrived that was not the peer's next flight, so once the peer
/// repeated its previous flight before Weir's timer fired, a lost flight of Weir's was
/// never sent again (four runs in six failed so; vendor/rtc-dtls/WEIR-PATCH.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_and_publishers_whose_handshake_loses_packets_still_connect() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    let t = TestServer::start().await;
    let room = 42;
    let (mut a, _) = Client::join(&t.ws_url(), t.join("alice", room, 0xff)).await;
    let (_alice_pc, video) = publish(&t, &mut a, None).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u16;
            while !stop.load(Ordering::Relaxed) {
                send_some(&video, n, 20).await;
                n = n.wrapping_add(20);
            }
        })
    };

    /// Which DTLS datagrams (1-based, per direction) a path loses.
    type Pattern = fn(u32) -> bool;
    let lossy_path = |down: Pattern, up: Pattern| {
        let (mut seen_down, mut seen_up) = (0u32, 0u32);
        Relay::start_with(
            t.udp_addr(),
            Box::new(move |d: &[u8]| {
                is_dtls(d) && {
                    seen_down += 1;
                    down(seen_down)
                }
            }),
            Box::new(move |d: &[u8]| {
                is_dtls(d) && {
                    seen_up += 1;
                    up(seen_up)
                }
            }),
        )
    };

    // Publishers: Weir answers their offers, and is the DTLS server.
    let publishers: [(&str, Pattern, Pattern); 2] = [
        (
            "a publisher losing Weir's first flights",
            |n| n <= 2,
            |_| false,
        ),
        (
            "a publisher losing every other flight",
            |n| n % 2 == 1 && n < 8,
            |n| n == 2,
        ),
    ];
    let mut published = Vec::new();
    for (i, (what, down, up)) in publishers.into_iter().enumerate() {
        let relay = lossy_path(down, up).await;
        let (mut signal, _) = Client::join(&t.ws_url(), t.join(&format!("p{i}"), room, 0xff)).await;
        let (peer, track) = publish(&t, &mut signal, Some(&relay)).await;
        send_some(&track, 0, 20).await;
        assert!(
            relay.dropped.load(Ordering::Relaxed) > 0,
            "{what}: lost nothing"
        );
        published.push((signal, peer, track, relay));
    }
    common::wait_for_metric(
        &t,
        "weir_published_tracks{kind=\"video\"}",
        3.0,
        Duration::from_secs(10),
    )
    .await;

    // Subscribers, joining together: Weir offers, and is the DTLS client.
    // (Weir's datagrams: 1 ClientHello, 2 the same with the cookie, 3 its last flight,
    // Certificate to Finished; the client's: 1 HelloVerifyRequest, 2 ServerHello to
    // ServerHelloDone, 3 ChangeCipherSpec and Finished.)
    let patterns: [(&str, Pattern, Pattern); 6] = [
        ("first flights", |n| n == 1, |n| n == 1),
        ("Weir's last flight", |n| n == 3, |_| false),
        ("Weir's last flight, twice", |n| n == 3 || n == 4, |_| false),
        ("later flights", |n| (2..=3).contains(&n), |n| n == 2),
        (
            "Weir's every flight once more",
            |n| n % 2 == 1 && n < 8,
            |_| false,
        ),
        (
            "the client's every flight once more",
            |_| false,
            |n| n % 2 == 1 && n < 8,
        ),
    ];
    let mut joining = Vec::new();
    for (i, (what, down, up)) in patterns.into_iter().enumerate() {
        let (mut signal, _) = Client::join(&t.ws_url(), t.join(&format!("s{i}"), room, 0xff)).await;
        let offer = subscriber_offer(&mut signal).await;
        let relay = lossy_path(down, up).await;
        let offer = via_relay(&offer, t.udp_addr().port(), relay.addr);
        joining.push(tokio::spawn(async move {
            let mut peer = RtcPeer::new().await;
            let answer = peer.answer(offer).await;
            signal
                .send(&ClientMessage::Answer {
                    target: Target::Subscriber,
                    sdp: answer,
                })
                .await;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            let got_video = loop {
                let n = peer
                    .inbox
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(id, _)| id.ends_with("-video"))
                    .map(|(_, p)| p.len())
                    .sum::<usize>();
                if n >= 20 || tokio::time::Instant::now() > deadline {
                    break n;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let dropped = relay.dropped.load(Ordering::Relaxed);
            (what, got_video, dropped, signal, peer)
        }));
    }
    let mut outcomes = Vec::new();
    for j in joining {
        let (what, got_video, dropped, signal, peer) = j.await.unwrap();
        outcomes.push((what, got_video, dropped));
        drop((signal, peer));
    }
    for (what, got_video, dropped) in &outcomes {
        assert!(*dropped > 0, "{what}: the path lost nothing: {outcomes:?}");
        assert!(
            *got_video >= 20,
            "{what}: too few video packets within 30 s: {outcomes:?} (video packets, DTLS datagrams lost)"
        );
    }
    stop.store(true, Ordering::Relaxed);
    sender.await.unwrap();
    let metrics = t.metrics().await;
    for why in weir::metrics::PEER_LOSSES {
        let lost = common::metric(
            &metrics,
            &format!("weir_peer_connections_lost_total{{why=\"{why}\"}}"),
        );
        assert_eq!(lost, 0.0, "{why}");
    }
}
