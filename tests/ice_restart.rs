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
    let media_at = |after: Instant| {
        let bob = &bob;
        async move {
            bob.packets("video")
                .await
                .iter()
                .filter(|(at, _, len)| *at > after && *len > 0)
                .count()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while media_at(Instant::now() - Duration::from_secs(60)).await < 30 {
        assert!(Instant::now() < deadline, "bob never got alice's video");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The network changes: the old path goes dead.
    first_path.cut.store(true, Ordering::Relaxed);
    let cut_at = Instant::now();
    let mut state = alice.state.clone();
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
    .expect("alice notices the dead path")
    .unwrap();
    let noticed = cut_at.elapsed();

    // ICE restart over the new path: a new offer, the answer's candidate through it.
    let second_path = Relay::start(t.udp_addr(), Box::new(|_| false)).await;
    let restart_at = Instant::now();
    let offer = alice.offer_ice_restart().await;
    let answer = publisher_answer(&mut signal, offer).await;
    alice
        .accept_answer(via_relay(&answer, port, second_path.addr))
        .await;
    tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| *s == RTCPeerConnectionState::Connected),
    )
    .await
    .expect("alice reconnects over the new path")
    .unwrap();
    let reconnected = restart_at.elapsed();
    let deadline = Instant::now() + Duration::from_secs(10);
    while media_at(restart_at).await < 30 {
        assert!(
            Instant::now() < deadline,
            "alice's video never reached bob again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let media_back = restart_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    sender.await.unwrap();
    eprintln!(
        "dead path noticed after {noticed:?}; ICE restart connected in {reconnected:?}, \
         video at bob again {media_back:?} after the restart"
    );

    // Nobody saw alice leave: the session, her stream and bob's subscription stayed.
    let events = bob.events.lock().unwrap().clone();
    assert!(
        !events.iter().any(|(_, m)| matches!(
            m,
            ServerMessage::MemberLeft { .. } | ServerMessage::StreamRemoved { .. }
        )),
        "{events:?}"
    );
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
