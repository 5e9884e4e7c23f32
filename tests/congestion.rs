//! Congestion feedback with real WebRTC clients (`webrtc` crate) through Weir: one
//! publisher (≈1 Mbit/s of video, 50 audio packets/s), three subscribers, one of them
//! behind a shaped link (rate cap with a bounded queue, delay, loss) on loopback.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::peer::{h264, opus, RtcPeer, SendTrack};
use common::relay::{via_relay, ShapedRelay};
use common::{Client, TestServer};
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use webrtc::media_stream::track_local::TrackLocal;
use weir_signaling::{ClientMessage, CongestionLevel, CongestionPolicy, ServerMessage, Target};

const ROOM: u32 = 777;
const CAP: u64 = 300_000;

/// Video: 30 frames/s of 4 packets of 1040 bytes (≈1 Mbit/s), a keyframe (IDR NAL)
/// every second; audio: 50 packets/s of 120 bytes.
fn send_media(
    video: SendTrack,
    audio: SendTrack,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (vpt, apt) = (video.payload_type().await, audio.payload_type().await);
        let (mut vseq, mut aseq) = (0u16, 0u16);
        let start = tokio::time::Instant::now();
        let mut tick: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            // 10 ms ticks: a frame every 3rd-4th tick (30 fps), audio every 2nd.
            if tick * 30 / 100 != (tick + 1) * 30 / 100 {
                let frame = tick * 30 / 100;
                for i in 0..4u8 {
                    let mut p = rtc::rtp::Packet::default();
                    p.header.version = 2;
                    p.header.payload_type = vpt;
                    p.header.ssrc = 0x1000_0001;
                    p.header.sequence_number = vseq;
                    p.header.timestamp = (frame * 3000) as u32;
                    p.header.marker = i == 3;
                    let nal = if i == 0 && frame % 30 == 0 {
                        0x65
                    } else {
                        0x41
                    };
                    let mut payload = vec![nal; 1040];
                    payload[1] = i;
                    p.payload = payload.into();
                    vseq = vseq.wrapping_add(1);
                    let _ = video.track.write_rtp(p).await;
                }
            }
            if tick % 2 == 0 {
                let mut p = rtc::rtp::Packet::default();
                p.header.version = 2;
                p.header.payload_type = apt;
                p.header.ssrc = 0x2000_0001;
                p.header.sequence_number = aseq;
                p.header.timestamp = (tick / 2 * 960) as u32;
                p.payload = vec![0xfc; 120].into();
                aseq = aseq.wrapping_add(1);
                let _ = audio.track.write_rtp(p).await;
            }
            tick += 1;
            tokio::time::sleep_until(start + Duration::from_millis(tick * 10)).await;
        }
    })
}

/// REMB bitrates the publisher's video track has received, with when.
fn collect_rembs(track: &SendTrack) -> Arc<Mutex<Vec<(Instant, f32)>>> {
    let out: Arc<Mutex<Vec<(Instant, f32)>>> = Arc::default();
    let (t, o) = (track.track.clone(), out.clone());
    tokio::spawn(async move {
        while let Some(event) = t.poll().await {
            if let webrtc::media_stream::track_local::TrackLocalEvent::OnRtcpPacket(pkts) = event {
                for p in pkts.iter() {
                    if let Some(r) = p.as_any().downcast_ref::<rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate>() {
                        o.lock().unwrap().push((Instant::now(), r.bitrate));
                    }
                }
            }
        }
    });
    out
}

type Events = Arc<Mutex<Vec<(Instant, ServerMessage)>>>;

/// A receive-only member: answers every subscriber offer (through `relay` if given)
/// and records the signaling messages it gets.
struct Watcher {
    peer: Arc<tokio::sync::Mutex<Option<RtcPeer>>>,
    events: Events,
    _task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    async fn join(t: &TestServer, user: &str, relay: Option<std::net::SocketAddr>) -> Self {
        let (mut signal, joined) = Client::join(&t.ws_url(), t.join(user, ROOM, 0xff)).await;
        assert!(matches!(joined, ServerMessage::Joined { .. }), "{joined:?}");
        let events: Events = Arc::default();
        let peer: Arc<tokio::sync::Mutex<Option<RtcPeer>>> = Arc::default();
        let server_port = t.udp_addr().port();
        let (e, pr) = (events.clone(), peer.clone());
        let task = tokio::spawn(async move {
            let mut last_ping = Instant::now();
            loop {
                if last_ping.elapsed() > Duration::from_secs(5) {
                    signal.send(&ClientMessage::Ping { ts: 1 }).await;
                    last_ping = Instant::now();
                }
                let Some(msg) = signal.try_recv(Duration::from_millis(100)).await else {
                    continue;
                };
                if let ServerMessage::Offer {
                    target: Target::Subscriber,
                    sdp,
                } = &msg
                {
                    let mut guard = pr.lock().await;
                    if guard.is_none() {
                        *guard = Some(RtcPeer::new().await);
                    }
                    let sdp = match relay {
                        Some(r) => via_relay(sdp, server_port, r),
                        None => sdp.clone(),
                    };
                    let answer = guard.as_mut().unwrap().answer(sdp).await;
                    drop(guard);
                    signal
                        .send(&ClientMessage::Answer {
                            target: Target::Subscriber,
                            sdp: answer,
                        })
                        .await;
                }
                e.lock().unwrap().push((Instant::now(), msg));
            }
        });
        Self {
            peer,
            events,
            _task: task,
        }
    }

    /// (arrival, seq, payload length) of every packet of the track of this kind.
    async fn packets(&self, kind: &str) -> Vec<(Instant, u16, usize)> {
        let guard = self.peer.lock().await;
        let Some(p) = guard.as_ref() else {
            return Vec::new();
        };
        let inbox = p.inbox.lock().unwrap();
        inbox
            .iter()
            .filter(|(id, _)| id.ends_with(kind))
            .flat_map(|(_, v)| v.iter().map(|r| (r.at, r.seq, r.payload.len())))
            .collect()
    }

    fn congestion(&self) -> Vec<(Instant, CongestionLevel, u64, Vec<String>)> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(at, m)| match m {
                ServerMessage::Congestion {
                    state,
                    estimate,
                    paused,
                } => Some((*at, *state, *estimate, paused.clone())),
                _ => None,
            })
            .collect()
    }
}

struct Run {
    t: TestServer,
    relay: ShapedRelay,
    subs: Vec<Watcher>,
    rembs: Arc<Mutex<Vec<(Instant, f32)>>>,
    stream_id: String,
    stop: Arc<AtomicBool>,
    publisher: Client,
    _pc: RtcPeer,
}

async fn start(policy: CongestionPolicy, loss: f64) -> Run {
    let t = TestServer::start_with(|c| {
        c.server.congestion_control = true;
        c.server.congestion_policy = policy;
    })
    .await;
    let relay = ShapedRelay::start(
        t.udp_addr(),
        0,
        Duration::from_millis(200),
        Duration::from_millis(10),
        loss,
        7,
    )
    .await;
    let mut subs = Vec::new();
    for (i, user) in ["s1", "s2", "s3"].iter().enumerate() {
        subs.push(Watcher::join(&t, user, (i == 2).then_some(relay.addr)).await);
    }
    let (mut publisher, joined) = Client::join(&t.ws_url(), t.join("alice", ROOM, 0xff)).await;
    assert!(matches!(joined, ServerMessage::Joined { .. }));
    publisher
        .send(&ClientMessage::Publish {
            audio: true,
            video: true,
            min_bitrate: Some(100_000),
            max_bitrate: Some(1_500_000),
        })
        .await;
    let stream_id = publisher
        .expect(|m| match m {
            ServerMessage::Published { stream } => Some(stream.stream_id.clone()),
            _ => None,
        })
        .await;
    let mut pc = RtcPeer::new().await;
    let video = pc
        .add_send_track(RtpCodecKind::Video, h264(), 0x1000_0001)
        .await;
    let audio = pc
        .add_send_track(RtpCodecKind::Audio, opus(), 0x2000_0001)
        .await;
    let offer = pc.offer().await;
    publisher
        .send(&ClientMessage::Offer {
            target: Target::Publisher,
            sdp: offer,
        })
        .await;
    let answer = publisher
        .expect(|m| match m {
            ServerMessage::Answer {
                target: Target::Publisher,
                sdp,
            } => Some(sdp.clone()),
            _ => None,
        })
        .await;
    pc.accept_answer(answer).await;
    pc.connected().await;
    let rembs = collect_rembs(&video);
    let stop = Arc::new(AtomicBool::new(false));
    send_media(video, audio, stop.clone());
    Run {
        t,
        relay,
        subs,
        rembs,
        stream_id,
        stop,
        publisher,
        _pc: pc,
    }
}

fn metric(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_weakest_policy_the_publisher_is_asked_for_less_than_the_cap() {
    let mut run = start(CongestionPolicy::Weakest, 0.0).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let capped = Instant::now();
    run.relay.rate_bps.store(CAP, Ordering::Relaxed);
    let deadline = capped + Duration::from_secs(10);
    let mut under = None;
    while Instant::now() < deadline && under.is_none() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        under = run
            .rembs
            .lock()
            .unwrap()
            .iter()
            .find(|(at, b)| *at > capped && (*b as u64) < CAP)
            .map(|(at, b)| (at.duration_since(capped), *b));
    }
    run.stop.store(true, Ordering::Relaxed);
    let (after, bitrate) =
        under.unwrap_or_else(|| panic!("no REMB under the cap: {:?}", run.rembs.lock().unwrap()));
    eprintln!("REMB {bitrate} bit/s reached the publisher {after:?} after the cap");
    assert!(bitrate >= 100_000.0, "within the publisher's min-bitrate");
    // The room hears the target too (what an RTMP pusher's backend would act on).
    let target = run
        .publisher
        .try_recv_matching(Duration::from_secs(3), |m| match m {
            ServerMessage::PublishTarget {
                stream_id,
                bitrate,
                policy,
                ..
            } if *bitrate < CAP => Some((stream_id.clone(), *policy)),
            _ => None,
        })
        .await;
    assert_eq!(
        target,
        Some((run.stream_id.clone(), CongestionPolicy::Weakest))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_percent_random_loss_without_a_cap_does_not_flap() {
    let run = start(CongestionPolicy::Majority, 0.02).await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    run.stop.store(true, Ordering::Relaxed);
    let metrics = run.t.metrics().await;
    let switches = metric(&metrics, "weir_congestion_layer_switches_total");
    let dropped: u64 = run.relay.buckets.lock().unwrap().iter().map(|b| b.2).sum();
    eprintln!("2 % loss: {dropped} datagrams lost, {switches} layer switches");
    assert!(dropped > 50, "the relay lost {dropped}");
    assert_eq!(switches, 0.0, "no flapping: {:?}", run.subs[2].congestion());
    let video = run.subs[2].packets("video").await;
    assert!(video.len() > 1000, "{} video packets", video.len());
}
