//! A client whose network blocks UDP publishes over ICE-TCP (the server's passive TCP
//! candidate, RFC 4571 framing); a UDP subscriber receives its media.

mod common;

use std::time::Duration;

use common::peer::{h264, RtcPeer};
use common::{Client, TestServer};
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use webrtc::media_stream::track_local::TrackLocal;
use weir_signaling::{ClientMessage, ServerMessage, Target};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_only_publisher_reaches_a_udp_subscriber() {
    let t = TestServer::start().await;
    let (mut a, _) = Client::join(&t.ws_url(), t.join("alice", 1, 0xff)).await;
    a.send(&ClientMessage::Publish {
        audio: false,
        video: true,
        min_bitrate: None,
        max_bitrate: None,
        screen: false,
    })
    .await;
    let stream_id = a
        .expect(|m| match m {
            ServerMessage::Published { stream } => Some(stream.stream_id.clone()),
            _ => None,
        })
        .await;
    let mut alice = RtcPeer::new_tcp_only().await;
    let video = alice
        .add_send_track(RtpCodecKind::Video, h264(), 0x77)
        .await;
    let offer = alice.offer().await;
    assert!(
        !offer.contains(" udp "),
        "the client offers no UDP candidate:\n{offer}"
    );
    a.send(&ClientMessage::Offer {
        target: Target::Publisher,
        sdp: offer,
    })
    .await;
    let answer = a
        .expect(|m| match m {
            ServerMessage::Answer { sdp, .. } => Some(sdp.clone()),
            _ => None,
        })
        .await;
    assert!(
        answer.contains("tcptype passive"),
        "the server announces ICE-TCP:\n{answer}"
    );
    alice.accept_answer(answer).await;
    alice.connected().await;

    // alice streams (bob's offer waits for her track's codec, learnt from her packets)
    let pt = video.payload_type().await;
    let sender = tokio::spawn(async move {
        for n in 0..1000u16 {
            let mut p = rtc::rtp::Packet::default();
            p.header.version = 2;
            p.header.ssrc = 0x77;
            p.header.payload_type = pt;
            p.header.sequence_number = n;
            p.header.timestamp = n as u32 * 3000;
            // An IDR every 20 packets: a subscriber's video starts at one.
            let nal = if n % 20 == 0 { 0x65 } else { 0x41 };
            p.payload = vec![nal, (n >> 8) as u8, n as u8].into();
            if video.track.write_rtp(p).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });

    let (mut b, _) = Client::join(&t.ws_url(), t.join("bob", 1, 0xff)).await;
    let offer = b
        .expect(|m| match m {
            ServerMessage::Offer {
                target: Target::Subscriber,
                sdp,
            } => Some(sdp.clone()),
            _ => None,
        })
        .await;
    let mut bob = RtcPeer::new().await;
    let answer = bob.answer(offer).await;
    b.send(&ClientMessage::Answer {
        target: Target::Subscriber,
        sdp: answer,
    })
    .await;
    bob.connected().await;

    let track_id = format!("{stream_id}-video");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while bob.inbox.lock().unwrap().get(&track_id).map_or(0, Vec::len) < 50
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sender.abort();
    let got = bob.inbox.lock().unwrap().get(&track_id).map_or(0, Vec::len);
    assert!(
        got >= 50,
        "bob received {got} of alice's TCP-carried packets"
    );
}
