//! A publisher's network changes mid-session (its old path goes dead, its packets
//! come from a new address): it restarts ICE with a new offer instead of rejoining, and
//! its media reaches the room again without anyone seeing it leave.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::peer::{h264, opus, RtcPeer, SendTrack};
use common::relay::{via_relay, Relay};
use common::watcher::Watcher;
use common::{Client, TestServer};
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::peer_connection::RTCPeerConnectionState;
use weir_signaling::{ClientMessage, ServerMessage, Target};

const ROOM: u32 = 909;
const VIDEO_SSRC: u32 = 0x1000_0009;
const AUDIO_SSRC: u32 = 0x2000_0009;

/// Sends 30 video frames a second (an IDR every 30, so a subscriber can always start)
/// and, if given, an audio packet with each, until `stop`.
fn send_media(
    video: SendTrack,
    audio: Option<SendTrack>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let vpt = video.payload_type().await;
        let apt = match &audio {
            Some(a) => Some(a.payload_type().await),
            None => None,
        };
        let mut n: u32 = 0;
        while !stop.load(Ordering::Relaxed) {
            let mut v = rtc::rtp::Packet::default();
            v.header.version = 2;
            v.header.payload_type = vpt;
            v.header.ssrc = VIDEO_SSRC;
            v.header.sequence_number = n as u16;
            v.header.timestamp = n.wrapping_mul(3000);
            v.header.marker = true;
            let nal = if n % 30 == 0 { 0x65 } else { 0x41 };
            v.payload = vec![nal; 600].into();
            let _ = video.track.write_rtp(v).await;
            if let (Some(audio), Some(apt)) = (&audio, apt) {
                let mut a = rtc::rtp::Packet::default();
                a.header.version = 2;
                a.header.payload_type = apt;
                a.header.ssrc = AUDIO_SSRC;
                a.header.sequence_number = n as u16;
                a.header.timestamp = n.wrapping_mul(1600);
                a.payload = vec![0xfc; 80].into();
                let _ = audio.track.write_rtp(a).await;
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(33)).await;
        }
    })
}

async fn publisher_answer(signal: &mut Client, sdp: String) -> String {
    signal
        .send(&ClientMessage::Offer {
            target: Target::Publisher,
            sdp,
        })
        .await;
    signal
        .expect(|m| match m {
            ServerMessage::Answer {
                target: Target::Publisher,
                sdp,
            } => Some(sdp.clone()),
            ServerMessage::Error { message, .. } => panic!("offer refused: {message}"),
            _ => None,
        })
        .await
}

/// Video packets (not padding) bob received after `after`.
async fn video_since(bob: &Watcher, after: Instant) -> usize {
    bob.packets("video")
        .await
        .iter()
        .filter(|(at, _, len)| *at > after && *len > 0)
        .count()
}

/// Waits until bob has 30 video packets from after `after`, at most `limit`.
async fn video_reaches(bob: &Watcher, after: Instant, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    while video_since(bob, after).await < 30 {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the client's connection sees the dead path.
async fn notices_dead_path(state: &mut tokio::sync::watch::Receiver<RTCPeerConnectionState>) {
    tokio::time::timeout(
        Duration::from_secs(15),
        state.wait_for(|s| {
            matches!(
                s,
                RTCPeerConnectionState::Disconnected | RTCPeerConnectionState::Failed
            )
        }),
    )
    .await
    .expect("the client notices the dead path")
    .unwrap();
}

async fn reconnects(state: &mut tokio::sync::watch::Receiver<RTCPeerConnectionState>) {
    tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| *s == RTCPeerConnectionState::Connected),
    )
    .await
    .expect("the client reconnects over the new path")
    .unwrap();
}

/// Nobody saw the publisher leave: its session, its stream and bob's subscription
/// stayed.
fn nobody_saw_it_leave(bob: &Watcher) {
    let events = bob.events.lock().unwrap().clone();
    assert!(
        !events.iter().any(|(_, m)| matches!(
            m,
            ServerMessage::MemberLeft { .. } | ServerMessage::StreamRemoved { .. }
        )),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_restarts_ice_after_a_network_change_and_nobody_sees_it_leave() {
    let t = TestServer::start().await;
    let port = t.udp_addr().port();
    let bob = Watcher::join(&t, "bob", ROOM, None).await;
    let first_path = Relay::start(t.udp_addr(), Box::new(|_| false)).await;

    let (mut signal, _) = Client::join(&t.ws_url(), t.join("alice", ROOM, 0xff)).await;
    signal.publish(true, true).await;
    let mut alice = RtcPeer::new().await;
    let video = alice
        .add_send_track(RtpCodecKind::Video, h264(), VIDEO_SSRC)
        .await;
    let audio = alice
        .add_send_track(RtpCodecKind::Audio, opus(), AUDIO_SSRC)
        .await;
    let offer = alice.offer().await;
    let answer = publisher_answer(&mut signal, offer).await;
    alice
        .accept_answer(via_relay(&answer, port, first_path.addr))
        .await;
    alice.connected().await;

    let stop = Arc::new(AtomicBool::new(false));
    let sender = send_media(video, Some(audio), stop.clone());
    let start = Instant::now() - Duration::from_secs(60);
    video_reaches(
        &bob,
        start,
        Duration::from_secs(15),
        "bob never got alice's video",
    )
    .await;

    // The network changes: the old path goes dead.
    first_path.cut.store(true, Ordering::Relaxed);
    let cut_at = Instant::now();
    let mut state = alice.state.clone();
    notices_dead_path(&mut state).await;
    let noticed = cut_at.elapsed();

    // ICE restart over the new path: a new offer, the answer's candidate through it.
    let second_path = Relay::start(t.udp_addr(), Box::new(|_| false)).await;
    let restart_at = Instant::now();
    let offer = alice.offer_ice_restart().await;
    let answer = publisher_answer(&mut signal, offer).await;
    alice
        .accept_answer(via_relay(&answer, port, second_path.addr))
        .await;
    reconnects(&mut state).await;
    let reconnected = restart_at.elapsed();
    let again = "alice's video never reached bob again";
    video_reaches(&bob, restart_at, Duration::from_secs(10), again).await;
    let media_back = restart_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    sender.await.unwrap();
    eprintln!(
        "dead path noticed after {noticed:?}; ICE restart connected in {reconnected:?}, \
         video at bob again {media_back:?} after the restart"
    );

    nobody_saw_it_leave(&bob);
    let m = t.metrics().await;
    assert!(m.contains("weir_participants 2"), "{m}");
}

/// Answers subscriber offers on `signal` with `peer` through `relay` until `done`.
async fn answer_offers(
    signal: &mut Client,
    peer: &mut RtcPeer,
    relay: std::net::SocketAddr,
    port: u16,
    wait: Duration,
) -> bool {
    let offer = signal
        .try_recv_matching(wait, |m| match m {
            ServerMessage::Offer {
                target: Target::Subscriber,
                sdp,
            } => Some(sdp.clone()),
            _ => None,
        })
        .await;
    let Some(offer) = offer else { return false };
    let answer = peer.answer(via_relay(&offer, port, relay)).await;
    signal
        .send(&ClientMessage::Answer {
            target: Target::Subscriber,
            sdp: answer,
        })
        .await;
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_asks_for_an_ice_restart_after_a_network_change() {
    let t = TestServer::start().await;
    let port = t.udp_addr().port();
    // The publisher: a bridged RTMP-free webrtc client is not needed; any member's
    // stream will do, so alice publishes through the direct path.
    let (mut alice_signal, _) = Client::join(&t.ws_url(), t.join("alice", ROOM, 0xff)).await;
    alice_signal.publish(true, true).await;
    let mut alice = RtcPeer::new().await;
    let video = alice
        .add_send_track(RtpCodecKind::Video, h264(), VIDEO_SSRC)
        .await;
    let offer = alice.offer().await;
    let answer = publisher_answer(&mut alice_signal, offer).await;
    alice.accept_answer(answer).await;
    alice.connected().await;
    let stop = Arc::new(AtomicBool::new(false));
    let sender = send_media(video, None, stop.clone());

    // bob receives through a path that will die.
    let first_path = Relay::start(t.udp_addr(), Box::new(|_| false)).await;
    let (mut signal, _) = Client::join(&t.ws_url(), t.join("bob", ROOM, 0xff)).await;
    let mut bob = RtcPeer::new().await;
    let video_id = |inbox: &common::peer::Inbox| {
        inbox
            .lock()
            .unwrap()
            .iter()
            .filter(|(id, _)| id.ends_with("video"))
            .map(|(_, v)| v.len())
            .sum::<usize>()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while video_id(&bob.inbox) < 30 {
        assert!(Instant::now() < deadline, "bob never got video");
        answer_offers(
            &mut signal,
            &mut bob,
            first_path.addr,
            port,
            Duration::from_millis(100),
        )
        .await;
    }
    first_path.cut.store(true, Ordering::Relaxed);
    let mut state = bob.state.clone();
    tokio::time::timeout(
        Duration::from_secs(15),
        state.wait_for(|s| {
            matches!(
                s,
                RTCPeerConnectionState::Disconnected | RTCPeerConnectionState::Failed
            )
        }),
    )
    .await
    .expect("bob notices the dead path")
    .unwrap();
    let before = video_id(&bob.inbox);

    // bob asks; the server restarts its side and offers again; bob answers over the new path.
    let second_path = Relay::start(t.udp_addr(), Box::new(|_| false)).await;
    let restart_at = Instant::now();
    signal.send(&ClientMessage::RestartIce).await;
    assert!(
        answer_offers(
            &mut signal,
            &mut bob,
            second_path.addr,
            port,
            Duration::from_secs(5)
        )
        .await,
        "the server offers again after restartIce"
    );
    tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| *s == RTCPeerConnectionState::Connected),
    )
    .await
    .expect("bob reconnects over the new path")
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while video_id(&bob.inbox) < before + 30 {
        assert!(Instant::now() < deadline, "video never reached bob again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "subscriber ICE restart: video again {:?} after restartIce",
        restart_at.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    sender.await.unwrap();
    let m = t.metrics().await;
    assert!(m.contains("weir_participants 2"), "{m}");
}

/// The ICE part of an SDP as an RFC 8840 fragment: credentials, and per media section
/// its `m=` line, `a=mid` and candidates (what a WHIP client PATCHes to restart ICE).
fn ice_fragment(sdp: &str) -> String {
    let mut head = String::new();
    let mut sections = String::new();
    for line in sdp.lines() {
        if (line.starts_with("a=ice-ufrag:") || line.starts_with("a=ice-pwd:"))
            && !head.contains(&line[..11])
        {
            head.push_str(line);
            head.push_str("\r\n");
        } else if line.starts_with("m=")
            || line.starts_with("a=mid:")
            || line.starts_with("a=candidate:")
        {
            sections.push_str(line);
            sections.push_str("\r\n");
        }
    }
    head + &sections
}

/// `sdp` with the credentials and candidates of `fragment` (a server's answer to an
/// ICE restart over PATCH, made whole again for the client's connection).
fn with_fragment(sdp: &str, fragment: &str) -> String {
    let value = |key: &str| {
        fragment
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} in {fragment}"))
            .to_owned()
    };
    let (ufrag, pwd) = (value("a=ice-ufrag:"), value("a=ice-pwd:"));
    // The fragment's candidates, per section in order.
    let mut per_section: Vec<Vec<String>> = Vec::new();
    for l in fragment.lines() {
        if l.starts_with("m=") {
            per_section.push(Vec::new());
        } else if l.starts_with("a=candidate:") {
            per_section
                .last_mut()
                .expect("a section")
                .push(l.to_owned());
        }
    }
    let mut out = String::new();
    let mut section = None::<usize>;
    for l in sdp.lines() {
        if l.starts_with("m=") {
            section = Some(section.map_or(0, |s| s + 1));
        }
        if l.starts_with("a=candidate:") {
            continue;
        }
        if l.starts_with("a=ice-ufrag:") {
            out.push_str(&format!("a=ice-ufrag:{ufrag}\r\n"));
        } else if l.starts_with("a=ice-pwd:") {
            out.push_str(&format!("a=ice-pwd:{pwd}\r\n"));
        } else if l == "a=end-of-candidates" {
            for c in section
                .and_then(|s| per_section.get(s))
                .into_iter()
                .flatten()
            {
                out.push_str(c);
                out.push_str("\r\n");
            }
            out.push_str("a=end-of-candidates\r\n");
        } else {
            out.push_str(l);
            out.push_str("\r\n");
        }
    }
    out
}

/// A WHIP publisher's network changes: it restarts ICE over PATCH (RFC 9725 §4.4.1, a
/// fragment with new credentials), gets the server's new credentials and candidates
/// back with a new ETag, and its media reaches the room again; nobody sees it leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whip_publisher_restarts_ice_over_patch() {
    let t = TestServer::start().await;
    let addr = t.server.http_addr;
    let port = t.udp_addr().port();
    let bob = Watcher::join(&t, "bob", ROOM, None).await;
    let first_path = Relay::start(t.udp_addr(), Box::new(|_| false)).await;

    let mut alice = RtcPeer::new().await;
    let video = alice
        .add_send_track(RtpCodecKind::Video, h264(), VIDEO_SSRC)
        .await;
    let offer = alice.offer().await;
    let token = t
        .app
        .issue_private_map_key(
            weir::auth::TokenKind::Jwt,
            "alice",
            &weir::auth::RoomId::Num(ROOM),
            weir::auth::Privileges(0xff),
            weir::auth::unix_now(),
            3600,
        )
        .unwrap();
    let bearer = format!("Bearer {token}");
    let (status, headers, answer) = common::http_request(
        addr,
        "POST",
        "/whip",
        &[
            ("Content-Type", "application/sdp"),
            ("Authorization", &bearer),
        ],
        &offer,
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let location = common::response_header(&headers, "location")
        .unwrap()
        .to_owned();
    let etag = common::response_header(&headers, "etag")
        .unwrap()
        .to_owned();
    alice
        .accept_answer(via_relay(&answer, port, first_path.addr))
        .await;
    alice.connected().await;
    let stop = Arc::new(AtomicBool::new(false));
    let sender = send_media(video, None, stop.clone());
    let start = Instant::now() - Duration::from_secs(60);
    video_reaches(
        &bob,
        start,
        Duration::from_secs(15),
        "bob never got the WHIP video",
    )
    .await;

    first_path.cut.store(true, Ordering::Relaxed);
    let mut state = alice.state.clone();
    notices_dead_path(&mut state).await;

    let second_path = Relay::start(t.udp_addr(), Box::new(|_| false)).await;
    let restart_at = Instant::now();
    let restart_offer = alice.offer_ice_restart().await;
    let fragment = ice_fragment(&restart_offer);
    let (status, headers, body) = common::http_request(
        addr,
        "PATCH",
        &location,
        &[
            ("Content-Type", "application/trickle-ice-sdpfrag"),
            ("If-Match", &etag),
        ],
        &fragment,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        common::response_header(&headers, "content-type"),
        Some("application/trickle-ice-sdpfrag")
    );
    let new_etag = common::response_header(&headers, "etag")
        .unwrap()
        .to_owned();
    assert_ne!(new_etag, etag, "a new ICE session, a new ETag");
    let old_ufrag = answer
        .lines()
        .find(|l| l.starts_with("a=ice-ufrag:"))
        .unwrap();
    assert!(
        body.contains("a=ice-ufrag:") && body.contains("a=ice-pwd:") && !body.contains(old_ufrag),
        "the server's new credentials: {body}"
    );
    assert!(body.contains("a=candidate:"), "{body}");
    alice
        .accept_answer(via_relay(
            &with_fragment(&answer, &body),
            port,
            second_path.addr,
        ))
        .await;
    reconnects(&mut state).await;
    let again = "the WHIP video never reached bob again";
    video_reaches(&bob, restart_at, Duration::from_secs(10), again).await;
    eprintln!(
        "WHIP ICE restart over PATCH: video at bob again {:?} after it",
        restart_at.elapsed()
    );
    // The old ETag is stale now; the new one is taken.
    let (status, ..) = common::http_request(
        addr,
        "PATCH",
        &location,
        &[
            ("Content-Type", "application/trickle-ice-sdpfrag"),
            ("If-Match", &etag),
        ],
        "a=end-of-candidates\r\n",
    )
    .await;
    assert_eq!(status, 412);
    stop.store(true, Ordering::Relaxed);
    sender.await.unwrap();
    nobody_saw_it_leave(&bob);
    let m = t.metrics().await;
    assert_eq!(
        common::metric(&m, "weir_whip_requests_total{outcome=\"ice_restart\"}"),
        1.0,
        "{m}"
    );
}
