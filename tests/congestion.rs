//! Congestion feedback with real WebRTC clients (`webrtc` crate) through Weir: one
//! publisher (≈1 Mbit/s of video, 50 audio packets/s), three subscribers, one of them
//! behind a shaped link (rate cap with a bounded queue, delay, loss) on loopback.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::peer::{h264, opus, RtcPeer, SendTrack};
use common::relay::ShapedRelay;
use common::watcher::Watcher;
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
        subs.push(Watcher::join(&t, user, ROOM, (i == 2).then_some(relay.addr)).await);
    }
    let (mut publisher, joined) = Client::join(&t.ws_url(), t.join("alice", ROOM, 0xff)).await;
    assert!(matches!(joined, ServerMessage::Joined { .. }));
    publisher
        .send(&ClientMessage::Publish {
            audio: true,
            video: true,
            min_bitrate: Some(100_000),
            max_bitrate: Some(1_500_000),
            screen: false,
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

/// Media (non-padding) video packets received in `[from, to)`.
fn video_in(p: &[(Instant, u16, usize)], from: Instant, to: Instant) -> usize {
    p.iter()
        .filter(|(at, _, len)| *len > 0 && *at >= from && *at < to)
        .count()
}

/// Missing audio sequence numbers among packets received in `[from, to)`: the
/// numbers are unwrapped in arrival order (they wrap at 65 536, every 22 min at
/// 50 packets/s, so within a test run more often than one might think).
fn audio_gaps(p: &[(Instant, u16, usize)], from: Instant, to: Instant) -> usize {
    let mut in_window: Vec<&(Instant, u16, usize)> = p
        .iter()
        .filter(|(at, _, _)| *at >= from && *at < to)
        .collect();
    in_window.sort_by_key(|(at, ..)| *at);
    let mut last: Option<(u16, i64)> = None;
    let mut seqs: Vec<i64> = in_window
        .iter()
        .map(|(_, s, _)| {
            let ext = match last {
                None => i64::from(*s),
                Some((l, e)) => e + i64::from(s.wrapping_sub(l) as i16),
            };
            last = Some((*s, ext));
            ext
        })
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    match (seqs.first(), seqs.last()) {
        (Some(a), Some(b)) => (b - a + 1) as usize - seqs.len(),
        _ => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_subscriber_falls_back_to_audio_and_recovers_while_the_others_are_unaffected() {
    let run = start(CongestionPolicy::Majority, 0.0).await;
    // Warm up uncapped until every subscriber receives video.
    let warm = Instant::now();
    loop {
        let mut ok = true;
        for s in &run.subs {
            ok &= video_in(
                &s.packets("video").await,
                warm,
                Instant::now() + Duration::from_secs(1),
            ) > 100;
        }
        if ok {
            break;
        }
        assert!(
            warm.elapsed() < Duration::from_secs(20),
            "subscribers never got video"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let capped = Instant::now();
    run.relay.rate_bps.store(CAP, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let lifted = Instant::now();
    run.relay.rate_bps.store(0, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(12)).await;
    let end = Instant::now();
    run.stop.store(true, Ordering::Relaxed);

    let weak = &run.subs[2];
    let events = weak.congestion();
    common::plot::congestion_run(
        "majority policy: s3 capped at 300 kbit/s for 10 s, then uncapped",
        &run.relay,
        &events,
        capped,
        lifted,
    );
    let below = events
        .iter()
        .find(|(at, _, e, _)| *at > capped && *e > 0 && *e < CAP)
        .map(|(at, ..)| *at)
        .unwrap_or_else(|| panic!("s3's estimate never went below the cap: {events:?}"));
    let paused_at = events
        .iter()
        .find(|(at, l, _, p)| {
            *at > capped && *l == CongestionLevel::Congested && p.contains(&run.stream_id)
        })
        .map(|(at, ..)| *at)
        .unwrap_or_else(|| panic!("s3's video was never paused: {events:?}"));
    let resumed_at = events
        .iter()
        .find(|(at, _, _, p)| *at > lifted && p.is_empty())
        .map(|(at, ..)| *at)
        .unwrap_or_else(|| panic!("s3's video never resumed: {events:?}"));
    let video = weak.packets("video").await;
    let audio = weak.packets("audio").await;
    eprintln!(
        "cap -> estimate below it {:?}, -> paused {:?}; lift -> resumed {:?}",
        below.duration_since(capped),
        paused_at.duration_since(capped),
        resumed_at.duration_since(lifted)
    );
    assert!(
        below.duration_since(capped) < Duration::from_secs(5),
        "settled after {:?}",
        below.duration_since(capped)
    );
    // Paused: no video while capped (once the queue has drained), audio without loss.
    let settled = paused_at + Duration::from_millis(500);
    // Paused means no new video. Retransmissions of the packets the bottleneck lost
    // just before the pause may still arrive (NACKed, at most 3 times each), but
    // nothing past that tail: at 120 packets/s, new video would be ~1000 packets.
    let last_before = video
        .iter()
        .filter(|(at, _, len)| *len > 0 && *at < settled)
        .max_by_key(|(at, ..)| *at)
        .map(|(_, s, _)| *s)
        .expect("video before the pause");
    let beyond: Vec<u16> = video
        .iter()
        .filter(|(at, _, len)| *len > 0 && *at >= settled && *at < lifted)
        .map(|(_, s, _)| *s)
        .filter(|s| s.wrapping_sub(last_before) as i16 > 64)
        .collect();
    let during = video_in(&video, settled, lifted);
    eprintln!(
        "s3 video while paused: {during} packets (retransmissions), {} beyond the pre-pause tail",
        beyond.len()
    );
    assert!(beyond.is_empty(), "video withheld while paused: {beyond:?}");
    let gaps = audio_gaps(&audio, settled, lifted);
    let heard = audio
        .iter()
        .filter(|(at, ..)| *at >= settled && *at < lifted)
        .count();
    eprintln!("s3 audio while paused: {heard} packets, {gaps} missing");
    assert!(
        heard as f64 > lifted.duration_since(settled).as_secs_f64() * 45.0,
        "{heard} audio packets"
    );
    assert_eq!(gaps, 0, "audio continues without loss");
    // Back on its best (only) layer within 10 s of the lift, and video flowing.
    assert!(resumed_at.duration_since(lifted) < Duration::from_secs(10));
    assert!(
        video_in(&video, resumed_at + Duration::from_secs(1), end) > 200,
        "video flows again"
    );
    // The two others: never paused, video all along.
    for s in &run.subs[..2] {
        assert!(
            s.congestion().iter().all(|(_, _, _, p)| p.is_empty()),
            "{:?}",
            s.congestion()
        );
        let v = video_in(&s.packets("video").await, capped, lifted);
        assert!(
            v as f64 > 10.0 * 120.0 * 0.95,
            "{v} video packets while s3 was capped"
        );
    }
    let metrics = run.t.metrics().await;
    assert!(
        common::metric(
            &metrics,
            "weir_congestion_layer_switches_total{direction=\"pause\""
        ) >= 1.0,
        "{metrics}"
    );
    assert!(
        common::metric(
            &metrics,
            "weir_congestion_layer_switches_total{direction=\"resume\""
        ) >= 1.0
    );
    assert!(common::metric(&metrics, "weir_bwe_estimate_bps_count") > 0.0);
    assert!(
        common::metric(&metrics, "weir_bwe_padding_bytes_total") > 0.0,
        "probes sent padding"
    );
    // Majority: the publisher is asked for what s1 and s2 can take, not s3's cap.
    let rembs = run.rembs.lock().unwrap().clone();
    assert!(
        rembs
            .iter()
            .filter(|(at, _)| *at > settled && *at < lifted)
            .all(|(_, b)| *b as u64 > CAP),
        "{rembs:?}"
    );
    drop(run.publisher);
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
    let switches = common::metric(&metrics, "weir_congestion_layer_switches_total");
    let dropped: u64 = run.relay.buckets.lock().unwrap().iter().map(|b| b.2).sum();
    eprintln!("2 % loss: {dropped} datagrams lost, {switches:.0} layer switches");
    assert!(dropped > 20, "the relay lost {dropped}");
    assert_eq!(switches, 0.0, "no flapping: {:?}", run.subs[2].congestion());
    let video = run.subs[2].packets("video").await;
    assert!(video.len() > 1000, "{} video packets", video.len());
}

/// Video only: `fps` frames/s of `packets` packets of 1040 bytes, a keyframe every
/// second (a screen share's encoder, in the rate it keeps for text).
fn send_video(
    video: SendTrack,
    ssrc: u32,
    fps: u64,
    packets: u8,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let pt = video.payload_type().await;
        let mut seq = 0u16;
        let start = tokio::time::Instant::now();
        let mut frame: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            for i in 0..packets {
                let mut p = rtc::rtp::Packet::default();
                p.header.version = 2;
                p.header.payload_type = pt;
                p.header.ssrc = ssrc;
                p.header.sequence_number = seq;
                p.header.timestamp = (frame * 90_000 / fps) as u32;
                p.header.marker = i + 1 == packets;
                let nal = if i == 0 && frame % fps == 0 {
                    0x65
                } else {
                    0x41
                };
                let mut payload = vec![nal; 1040];
                payload[1] = i;
                p.payload = payload.into();
                seq = seq.wrapping_add(1);
                let _ = video.track.write_rtp(p).await;
            }
            frame += 1;
            tokio::time::sleep_until(start + Duration::from_millis(frame * 1000 / fps)).await;
        }
    })
}

/// A screen share is served before cameras: under a cap that carries the screen
/// (≈ 375 kbit/s) but not both, the capped subscriber keeps the screen and loses the
/// camera's video (≈ 1 Mbit/s), and gets it back when the cap is lifted. The sharer is
/// `zoe` so that her stream's id sorts after alice's camera: without the screen's
/// priority, the allocator's tie-break by id would keep the camera instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_capped_link_the_camera_is_paused_before_the_screen_share() {
    const SCREEN_CAP: u64 = 700_000;
    let run = start(CongestionPolicy::Majority, 0.0).await;
    let (mut zoe, joined) = Client::join(&run.t.ws_url(), run.t.join("zoe", ROOM, 0xff)).await;
    assert!(matches!(joined, ServerMessage::Joined { .. }));
    zoe.send(&ClientMessage::Publish {
        audio: false,
        video: true,
        min_bitrate: None,
        max_bitrate: None,
        screen: true,
    })
    .await;
    let screen_id = zoe
        .expect(|m| match m {
            ServerMessage::Published { stream } if stream.screen => Some(stream.stream_id.clone()),
            _ => None,
        })
        .await;
    assert!(screen_id.ends_with("_zoe_aux"), "{screen_id}");
    assert!(
        screen_id > run.stream_id,
        "{screen_id} sorts after {}",
        run.stream_id
    );
    let mut pc = RtcPeer::new().await;
    let video = pc
        .add_send_track(RtpCodecKind::Video, h264(), 0x3000_0001)
        .await;
    let offer = pc.offer().await;
    zoe.send(&ClientMessage::Offer {
        target: Target::Screen,
        sdp: offer,
    })
    .await;
    let answer = zoe
        .expect(|m| match m {
            ServerMessage::Answer {
                target: Target::Screen,
                sdp,
            } => Some(sdp.clone()),
            _ => None,
        })
        .await;
    pc.accept_answer(answer).await;
    pc.connected().await;
    send_video(video, 0x3000_0001, 15, 3, run.stop.clone());

    // Both flow to everyone before the cap.
    let weak = &run.subs[2];
    let warm = Instant::now();
    loop {
        let cam = weak.received(&run.stream_id, "video").await.len();
        let scr = weak.received(&screen_id, "video").await.len();
        if cam > 300 && scr > 100 {
            break;
        }
        assert!(
            warm.elapsed() < Duration::from_secs(20),
            "s3 got {cam} camera and {scr} screen packets"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let capped = Instant::now();
    run.relay.rate_bps.store(SCREEN_CAP, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(12)).await;
    let lifted = Instant::now();
    run.relay.rate_bps.store(0, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(12)).await;
    let end = Instant::now();
    run.stop.store(true, Ordering::Relaxed);

    let events = weak.congestion();
    for (at, l, e, p) in &events {
        let t = at.saturating_duration_since(capped).as_secs_f64();
        eprintln!("{t:>6.1} s after the cap: {l:?}, estimate {e}, paused {p:?}");
    }
    {
        let camera = weak.received(&run.stream_id, "video").await;
        let screen = weak.received(&screen_id, "video").await;
        let mut line = String::new();
        for sec in -2i64..24 {
            let from = if sec < 0 {
                capped - Duration::from_secs(sec.unsigned_abs())
            } else {
                capped + Duration::from_secs(sec as u64)
            };
            let to = from + Duration::from_secs(1);
            let c = camera.iter().filter(|r| r.at >= from && r.at < to).count();
            let s = screen.iter().filter(|r| r.at >= from && r.at < to).count();
            line += &format!("{sec}:{c}/{s} ");
        }
        eprintln!("per second camera/screen: {line}");
    }
    let paused_at = events
        .iter()
        .find(|(at, _, _, p)| *at > capped && p.contains(&run.stream_id))
        .map(|(at, ..)| *at)
        .unwrap_or_else(|| panic!("the camera was never paused for s3: {events:?}"));
    let screen_paused: Vec<_> = events
        .iter()
        .filter(|(_, _, _, p)| p.contains(&screen_id))
        .collect();
    assert!(
        screen_paused.is_empty(),
        "the screen share was paused: {screen_paused:?}"
    );
    let settled = paused_at + Duration::from_millis(500);
    let in_window = |v: &[common::peer::Received], from: Instant, to: Instant| {
        v.iter()
            .filter(|r| !r.payload.is_empty() && r.at >= from && r.at < to)
            .count()
    };
    let camera = weak.received(&run.stream_id, "video").await;
    let screen = weak.received(&screen_id, "video").await;
    let secs = lifted.duration_since(settled).as_secs_f64();
    let (cam_n, scr_n) = (
        in_window(&camera, settled, lifted),
        in_window(&screen, settled, lifted),
    );
    eprintln!(
        "capped at {SCREEN_CAP} bit/s: camera paused {:?} after the cap; over the next {secs:.1} s s3 got {cam_n} camera packets (retransmissions) and {scr_n} screen packets ({:.0}/s of 45/s sent)",
        paused_at.duration_since(capped),
        scr_n as f64 / secs
    );
    assert!(
        scr_n as f64 > secs * 45.0 * 0.9,
        "the screen kept flowing: {scr_n} packets in {secs:.1} s"
    );
    // No new camera video while paused (a tail of retransmissions at most).
    assert!(
        (cam_n as f64) < secs * 120.0 * 0.1,
        "{cam_n} camera packets while paused"
    );
    let resumed = events
        .iter()
        .find(|(at, _, _, p)| *at > lifted && p.is_empty())
        .map(|(at, ..)| *at)
        .unwrap_or_else(|| panic!("the camera never resumed: {events:?}"));
    assert!(
        in_window(&camera, resumed + Duration::from_secs(1), end) > 200,
        "the camera flows again"
    );
    // The uncapped subscribers got both all along.
    for s in &run.subs[..2] {
        let cam = in_window(&s.received(&run.stream_id, "video").await, capped, lifted);
        let scr = in_window(&s.received(&screen_id, "video").await, capped, lifted);
        let secs = lifted.duration_since(capped).as_secs_f64();
        assert!(cam as f64 > secs * 120.0 * 0.95, "{cam} camera packets");
        assert!(scr as f64 > secs * 45.0 * 0.95, "{scr} screen packets");
    }
    drop(zoe);
}
