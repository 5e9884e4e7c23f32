//! RTMP → WebRTC with real clients: ffmpeg pushes H.264 + AAC over RTMP into a room, a
//! `webrtc`-crate client subscribes there, and what it receives is decoded by real
//! decoders (ffmpeg for H.264, libopus for Opus). Refused push URLs get ffmpeg's error.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::media::{decode_h264, decode_opus, h264_annex_b, tone_power};
use common::peer::RtcPeer;
use common::{Client, TestServer, APP};
use weir_signaling::{ClientMessage, ServerMessage, Target};

const ROOM: u32 = 4321;

async fn server() -> TestServer {
    TestServer::start_with(|c| c.server.rtmp_addr = "127.0.0.1:0".into()).await
}

/// A push URL with room credentials for `user` in `room`.
fn push_url(t: &TestServer, stream: &str, user: &str, room: u32, privileges: u32) -> String {
    format!(
        "rtmp://{}/live/{stream}?{}",
        t.server.rtmp_addr.unwrap(),
        common::rtmp_query(&t.app, user, room, privileges)
    )
}

struct Push {
    seconds: u32,
    audio_rate: u32,
    channels: u32,
    /// Extra x264 options (`-bf 2` and a preset that allows B-frames, say).
    video: Vec<&'static str>,
}

impl Push {
    fn low_latency(seconds: u32, audio_rate: u32, channels: u32) -> Self {
        Self {
            seconds,
            audio_rate,
            channels,
            video: vec!["-preset", "ultrafast", "-tune", "zerolatency", "-bf", "0"],
        }
    }

    fn command(&self, url: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ffmpeg");
        c.args(["-hide_banner", "-v", "error", "-re"])
            .args(["-f", "lavfi", "-i", "testsrc=size=320x240:rate=30"])
            .args([
                "-f",
                "lavfi",
                "-i",
                &format!("sine=frequency=1000:sample_rate={}", self.audio_rate),
            ])
            .args(["-t", &self.seconds.to_string()])
            .args(["-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "30"])
            .args(&self.video)
            .args(["-c:a", "aac", "-ar", &self.audio_rate.to_string()])
            .args(["-ac", &self.channels.to_string()])
            .args(["-f", "flv", url])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }
}

/// A viewer in the room: joins over the websocket, answers subscriber offers.
struct Viewer {
    signal: Client,
    peer: Option<RtcPeer>,
}

impl Viewer {
    async fn join(t: &TestServer, user: &str) -> Self {
        let (signal, joined) = Client::join(&t.ws_url(), t.join(user, ROOM, 0xff)).await;
        assert!(matches!(joined, ServerMessage::Joined { .. }), "{joined:?}");
        Self { signal, peer: None }
    }

    /// Answers offers until `until` passes.
    async fn negotiate_for(&mut self, until: Duration) {
        let end = tokio::time::Instant::now() + until;
        while tokio::time::Instant::now() < end {
            let offer = self
                .signal
                .try_recv_matching(Duration::from_millis(200), |m| match m {
                    ServerMessage::Offer {
                        target: Target::Subscriber,
                        sdp,
                    } => Some(sdp.clone()),
                    _ => None,
                })
                .await;
            if let Some(offer) = offer {
                if self.peer.is_none() {
                    self.peer = Some(RtcPeer::new().await);
                }
                let answer = self.peer.as_mut().unwrap().answer(offer).await;
                self.signal
                    .send(&ClientMessage::Answer {
                        target: Target::Subscriber,
                        sdp: answer,
                    })
                    .await;
            }
        }
    }
}

/// Pushes with ffmpeg and checks the viewer gets decodable video and the tone.
async fn push_and_check(audio_rate: u32, channels: u32) {
    let t = server().await;
    let mut viewer = Viewer::join(&t, "viewer").await;
    let stream = format!("cam_{audio_rate}_{channels}");
    let url = push_url(&t, &stream, "pusher", ROOM, 0xff);
    let mut ffmpeg = Push::low_latency(5, audio_rate, channels)
        .command(&url)
        .spawn()
        .expect("ffmpeg runs (scripts/install-deps.sh test installs it)");
    // The room announces the pusher as a member with an RTMP stream.
    let added = viewer
        .signal
        .expect(|m| match m {
            ServerMessage::StreamAdded { stream } => Some(stream.clone()),
            _ => None,
        })
        .await;
    assert_eq!(added.stream_id, stream);
    assert_eq!(added.user_id, "pusher");
    assert_eq!(added.source, "rtmp");
    viewer.negotiate_for(Duration::from_secs(4)).await;
    let status = tokio::time::timeout(Duration::from_secs(15), ffmpeg.wait())
        .await
        .expect("ffmpeg ends")
        .unwrap();
    assert!(status.success(), "ffmpeg push failed");
    // The pusher leaving is announced.
    viewer
        .signal
        .expect(|m| match m {
            ServerMessage::StreamRemoved { stream_id, .. } if *stream_id == stream => Some(()),
            _ => None,
        })
        .await;

    let peer = viewer
        .peer
        .as_ref()
        .expect("the viewer was offered the stream");
    let inbox = peer.inbox.lock().unwrap().clone();
    let video = inbox
        .get(&format!("{stream}-video"))
        .cloned()
        .unwrap_or_default();
    let audio = inbox
        .get(&format!("{stream}-audio"))
        .cloned()
        .unwrap_or_default();
    assert!(video.len() > 50, "video packets: {}", video.len());
    assert!(audio.len() > 50, "audio packets: {}", audio.len());

    // Video: the first thing received is a keyframe with its parameter sets, and the
    // whole stream decodes without a complaint.
    assert_eq!(
        video[0].payload[0] & 0x1f,
        24,
        "starts with SPS+PPS (STAP-A)"
    );
    let dir = tempfile::tempdir().unwrap();
    let decoded = decode_h264(&h264_annex_b(&video), dir.path()).await;
    eprintln!(
        "decoded {decoded:?}, video {} audio {} packets",
        video.len(),
        audio.len()
    );
    assert!(
        decoded.errors.trim().is_empty(),
        "decoder: {}",
        decoded.errors
    );
    assert_eq!((decoded.width, decoded.height), (320, 240));
    assert!(decoded.frames >= 45, "decoded frames: {}", decoded.frames);

    // Audio: continuous Opus (one packet per AAC frame: four or five 5 ms frames,
    // 20 or 25 ms) carrying the 1 kHz tone.
    for w in audio.windows(2) {
        assert_eq!(
            w[1].seq,
            w[0].seq.wrapping_add(1),
            "audio sequence continuous"
        );
        let samples = opus::packet::get_nb_samples(&w[0].payload, 48_000).unwrap() as u32;
        assert!(samples == 960 || samples == 1200, "{samples} samples");
        assert_eq!(
            w[1].ts.wrapping_sub(w[0].ts),
            samples,
            "each packet follows the last"
        );
    }
    let pcm = decode_opus(&audio, 2);
    let left: Vec<f32> = pcm.chunks(2).map(|c| c[0]).skip(4800).collect();
    let tone = tone_power(&left, 48_000.0, 1000.0);
    let off = tone_power(&left, 48_000.0, 1500.0) + tone_power(&left, 48_000.0, 600.0);
    eprintln!("tone power 1 kHz {tone}, off-tone {off}");
    assert!(tone > 1e-3, "1 kHz power {tone}");
    assert!(tone > 100.0 * off, "1 kHz {tone} vs elsewhere {off}");

    // Lip-sync: sender reports reached the viewer for both tracks.
    let reports = peer.reports.lock().unwrap().clone();
    for kind in ["video", "audio"] {
        assert!(
            reports
                .get(&format!("{stream}-{kind}"))
                .is_some_and(|r| !r.is_empty()),
            "no sender report for {kind}"
        );
    }
    let metrics = t.metrics().await;
    for needle in [
        "weir_bridge_latency_seconds_count{kind=\"video\"}",
        "weir_bridge_latency_seconds_count{kind=\"audio\"}",
        "weir_bridge_frames_total{kind=\"video\",outcome=\"forwarded\"}",
        "weir_rtmp_requests_total{outcome=\"ok\",request=\"publish\"} 1",
    ] {
        assert!(metrics.contains(needle), "metrics lack {needle}");
    }
    // A frame's packets left in runs (UDP GSO: several datagrams per system call),
    // and arrived as the intact packets decoded above.
    let copies = common::metric(&metrics, "weir_rtp_packets_total{direction=\"out\"");
    let calls = common::metric(&metrics, "weir_udp_send_calls_total");
    eprintln!("{copies} copies forwarded in {calls} system calls");
    assert!(
        calls >= 1.0 && calls < copies,
        "{calls} calls for {copies} copies"
    );
    assert_eq!(common::metric(&metrics, "weir_udp_send_drops_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_pusher_44k_stereo_reaches_a_webrtc_subscriber() {
    push_and_check(44_100, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_pusher_48k_mono_reaches_a_webrtc_subscriber() {
    push_and_check(48_000, 1).await;
}

/// ffmpeg's exit status and what it printed, for a push expected to be refused.
async fn refused_push(url: &str) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(15),
        Push::low_latency(2, 44_100, 1).command(url).output(),
    )
    .await
    .expect("ffmpeg ends")
    .unwrap();
    assert!(!out.status.success(), "the push should have been refused");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_urls_without_valid_credentials_are_refused() {
    let t = server().await;
    let mut viewer = Viewer::join(&t, "viewer").await;
    let addr = t.server.rtmp_addr.unwrap();

    // A tampered userSig.
    let good = push_url(&t, "cam1", "pusher", ROOM, 0xff);
    let bad_sig = good.replacen("usersig=", "usersig=x", 1);
    let err = refused_push(&bad_sig).await;
    assert!(err.contains("userSig"), "{err}");

    // A privateMapKey for another room.
    let other_room = push_url(&t, "cam1", "pusher", ROOM + 1, 0xff)
        .replace(&format!("roomid={}", ROOM + 1), &format!("roomid={ROOM}"));
    let err = refused_push(&other_room).await;
    assert!(err.contains("privateMapKey"), "{err}");

    // No send privilege: enter and receive only.
    let no_send = push_url(&t, "cam1", "pusher", ROOM, 0x01 | 0x02 | 0x08 | 0x20);
    let err = refused_push(&no_send).await;
    assert!(err.contains("neither sending audio"), "{err}");

    // An expired txSecret URL, and one with a wrong signature.
    let key = t.config.apps[0].live_push_key.clone().unwrap();
    let stream = format!("{APP}_{ROOM}_pusher");
    let base = format!("rtmp://{addr}/live/{stream}");
    let past = weir::auth::unix_now() - 60;
    let expired = weir::auth::live_url::sign_url(&base, &key, past).unwrap();
    let err = refused_push(&expired).await;
    assert!(err.contains("expired"), "{err}");
    let future = weir::auth::unix_now() + 600;
    let forged = weir::auth::live_url::sign_url(&base, "not-the-key", future).unwrap();
    let err = refused_push(&forged).await;
    assert!(err.contains("txSecret"), "{err}");

    // No credentials at all.
    let err = refused_push(&format!("rtmp://{addr}/live/cam1")).await;
    assert!(err.contains("no credentials"), "{err}");

    // Nobody joined the room, and the viewer heard of no one.
    assert!(viewer
        .signal
        .try_recv_matching(Duration::from_millis(300), |m| match m {
            ServerMessage::MemberJoined { user_id } => Some(user_id.clone()),
            _ => None,
        })
        .await
        .is_none());
    let metrics = t.metrics().await;
    assert!(
        metrics
            .contains("weir_rtmp_requests_total{outcome=\"unauthorized\",request=\"publish\"} 6"),
        "{metrics}"
    );

    // A valid txSecret URL for a bound stream name is accepted.
    let signed = weir::auth::live_url::sign_url(&base, &key, future).unwrap();
    let mut ffmpeg = Push::low_latency(2, 44_100, 1)
        .command(&signed)
        .spawn()
        .unwrap();
    let joined = viewer
        .signal
        .expect(|m| match m {
            ServerMessage::StreamAdded { stream } => Some(stream.clone()),
            _ => None,
        })
        .await;
    assert_eq!(joined.stream_id, stream);
    assert_eq!(joined.user_id, "pusher");
    let status = ffmpeg.wait().await.unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b_frames_non_reference_dropped_and_counted() {
    let t = server().await;
    let mut viewer = Viewer::join(&t, "viewer").await;
    let url = push_url(&t, "bcam", "pusher", ROOM, 0xff);
    let push = Push {
        seconds: 4,
        audio_rate: 44_100,
        channels: 1,
        video: vec!["-preset", "veryfast", "-bf", "2"],
    };
    let mut ffmpeg = push.command(&url).spawn().unwrap();
    viewer.negotiate_for(Duration::from_secs(3)).await;
    assert!(ffmpeg.wait().await.unwrap().success());
    let metrics = t.metrics().await;
    let dropped = metrics
        .lines()
        .find(|l| {
            l.starts_with("weir_bridge_frames_total{kind=\"video\",outcome=\"b_frame_dropped\"}")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(dropped > 0, "no B-frame counted as dropped:\n{metrics}");
    // What was forwarded still decodes.
    let inbox = viewer.peer.as_ref().unwrap().inbox.lock().unwrap().clone();
    let video = inbox.get("bcam-video").cloned().unwrap_or_default();
    let dir = tempfile::tempdir().unwrap();
    let decoded = decode_h264(&h264_annex_b(&video), dir.path()).await;
    assert!(decoded.frames > 10, "{decoded:?}");
}

fn signal_process(child: &tokio::process::Child, signal: &str) {
    let pid = child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pusher_per_stream_name_and_a_dropped_one_is_taken_over() {
    let t = server().await;
    let mut viewer = Viewer::join(&t, "viewer").await;
    let url = push_url(&t, "shared", "pusher", ROOM, 0xff);
    let mut first = Push::low_latency(30, 44_100, 1)
        .command(&url)
        .spawn()
        .unwrap();
    let added = |m: &ServerMessage| match m {
        ServerMessage::StreamAdded { stream } => Some(stream.stream_id.clone()),
        _ => None,
    };
    assert_eq!(viewer.signal.expect(added).await, "shared");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // A second push of the same name by its owner, while the first is sending: refused.
    let err = refused_push(&url).await;
    assert!(err.contains("already being pushed"), "{err}");
    // The name is the first pusher's: another member (here or in another room) cannot
    // take it, while it is pushed or after.
    for (user, room) in [("intruder", ROOM), ("pusher", ROOM + 1)] {
        let other = push_url(&t, "shared", user, room, 0xff);
        let err = refused_push(&other).await;
        assert!(err.contains("belongs to"), "{user} in {room}: {err}");
    }

    // The first pusher's network goes silent without closing (SIGSTOP): after a
    // couple of seconds a reconnect takes the name over.
    signal_process(&first, "-STOP");
    tokio::time::sleep(weir::server::rtmp::STALE_PUSHER + Duration::from_millis(500)).await;
    let mut again = Push::low_latency(3, 44_100, 1)
        .command(&url)
        .spawn()
        .unwrap();
    viewer
        .signal
        .expect(|m| match m {
            ServerMessage::StreamRemoved { stream_id, .. } if stream_id == "shared" => Some(()),
            _ => None,
        })
        .await;
    assert_eq!(viewer.signal.expect(added).await, "shared");
    assert!(
        again.wait().await.unwrap().success(),
        "the reconnect pushes to the end"
    );
    signal_process(&first, "-KILL");
    let _ = first.wait().await;
}

/// A stream name of the bound shape belongs to the member it names. Before, any member
/// of any room could push `{app}_{room}_bob_main` with its own valid credentials: Bob's
/// own push was then refused, and signed play URLs for his name showed the squatter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_name_is_pushed_only_by_the_member_it_names() {
    let t = server().await;
    let mut viewer = Viewer::join(&t, "viewer").await;
    let bobs = format!("{APP}_{ROOM}_bob_main");
    for (user, room) in [("mallory", 999), ("mallory", ROOM), ("viewer", ROOM)] {
        let err = refused_push(&push_url(&t, &bobs, user, room, 0xff)).await;
        assert!(
            err.contains("belongs to") && err.contains("\"bob\""),
            "{user} in {room}: {err}"
        );
    }
    let mut bob = Push::low_latency(3, 44_100, 1)
        .command(&push_url(&t, &bobs, "bob", ROOM, 0xff))
        .spawn()
        .unwrap();
    let added = viewer
        .signal
        .expect(|m| match m {
            ServerMessage::StreamAdded { stream } => Some(stream.stream_id.clone()),
            _ => None,
        })
        .await;
    assert_eq!(added, bobs);
    assert!(bob.wait().await.unwrap().success(), "bob pushes to the end");
    let metrics = t.metrics().await;
    assert_eq!(
        common::metric(
            &metrics,
            "weir_rtmp_requests_total{outcome=\"name_owned\",request=\"publish\"}"
        ),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_profile_is_refused_and_audio_still_flows() {
    let t = server().await;
    let mut viewer = Viewer::join(&t, "viewer").await;
    let url = push_url(&t, "hi444", "pusher", ROOM, 0xff);
    let mut push = Push::low_latency(3, 48_000, 1);
    // Without -pix_fmt yuv420p, an RGB source becomes High 4:4:4 Predictive.
    push.video = vec![
        "-preset",
        "ultrafast",
        "-tune",
        "zerolatency",
        "-pix_fmt",
        "yuv444p",
    ];
    let mut ffmpeg = push.command(&url).spawn().unwrap();
    viewer.negotiate_for(Duration::from_secs(3)).await;
    assert!(ffmpeg.wait().await.unwrap().success());
    let metrics = t.metrics().await;
    assert!(
        metrics.contains("weir_bridge_refused_total{kind=\"video\"} 1"),
        "{metrics}"
    );
    let inbox = viewer
        .peer
        .as_ref()
        .expect("audio offered")
        .inbox
        .lock()
        .unwrap()
        .clone();
    assert!(
        !inbox.contains_key("hi444-video"),
        "no video track is forwarded"
    );
    assert!(inbox.get("hi444-audio").is_some_and(|a| a.len() > 50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn main_and_high_profiles_are_negotiated_and_decoded() {
    let t = server().await;
    for (i, profile) in ["main", "high"].into_iter().enumerate() {
        let mut viewer = Viewer::join(&t, &format!("viewer{i}")).await;
        let stream = format!("cam_{profile}");
        let url = push_url(&t, &stream, &format!("pusher{i}"), ROOM, 0xff);
        let mut push = Push::low_latency(3, 44_100, 1);
        push.video.extend(["-profile:v", profile]);
        let mut ffmpeg = push.command(&url).spawn().unwrap();
        viewer.negotiate_for(Duration::from_secs(3)).await;
        assert!(ffmpeg.wait().await.unwrap().success());
        let inbox = viewer
            .peer
            .as_ref()
            .expect("offered")
            .inbox
            .lock()
            .unwrap()
            .clone();
        let video = inbox
            .get(&format!("{stream}-video"))
            .cloned()
            .unwrap_or_default();
        let dir = tempfile::tempdir().unwrap();
        let decoded = decode_h264(&h264_annex_b(&video), dir.path()).await;
        assert!(decoded.frames > 30, "{profile}: {decoded:?}");
        assert!(
            decoded.errors.trim().is_empty(),
            "{profile}: {}",
            decoded.errors
        );
    }
}

/// Fault: an RTMP pusher's connection is reset in the middle of a video message,
/// mid-GOP (its uplink died: RST, no unpublish), and it reconnects 300 ms later, as a
/// phone does: sequence headers, then from its next keyframe. The viewer sees the stream
/// go and come back, and once back its video is as fresh as a new stream's: nothing of
/// the outage is replayed and no lag stays. Latency here is from the moment a raw frame
/// went into the pusher's encoder to its arrival at the viewer (`Source`'s stamps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pusher_reset_mid_gop_comes_back_without_lasting_lag() {
    use common::source::{wall_ms, Audio, RtmpPusher, Source, Tag};
    use std::time::Instant;
    let t = server().await;
    let mut viewer = Viewer::join(&t, "viewer").await;
    let url = push_url(&t, "cam", "pusher", ROOM, 0xff);
    let name = url.split_once("/live/").unwrap().1.to_owned();
    let addr = t.server.rtmp_addr.unwrap();
    let (i0, w0) = (Instant::now(), wall_ms());
    let mut source = Source::start(12, Audio::Aac);
    let stamps = source.stamps.clone();
    let push = tokio::spawn(async move {
        let is_header = |t: &Tag| {
            t.data.len() >= 2
                && t.data[1] == 0
                && ((t.type_id == 9 && t.data[0] & 0x0f == 7)
                    || (t.type_id == 8 && t.data[0] >> 4 == 10))
        };
        let is_key =
            |t: &Tag| t.type_id == 9 && t.data.len() >= 2 && t.data[0] >> 4 == 1 && t.data[1] == 1;
        let mut headers: Vec<Tag> = Vec::new();
        let mut pusher = Some(RtmpPusher::publish(addr, "live", &name).await);
        let started = Instant::now();
        let mut since_key = 0usize;
        let mut reset_at = None;
        let mut resumed = None;
        let mut waiting_for_key = false;
        while let Some(tag) = source.tags.recv().await {
            if is_header(&tag) {
                headers.retain(|h| h.type_id != tag.type_id);
                headers.push(tag.clone());
                pusher.as_mut().unwrap().send(&tag).await;
                continue;
            }
            if tag.type_id == 9 {
                since_key = if is_key(&tag) { 0 } else { since_key + 1 };
            }
            if reset_at.is_none()
                && tag.type_id == 9
                && since_key == 12
                && started.elapsed() > Duration::from_secs(3)
            {
                pusher.take().unwrap().reset_in_the_middle_of(&tag).await;
                reset_at = Some(Instant::now());
                // The uplink is down for 300 ms: what the encoder made meanwhile is lost.
                tokio::time::sleep(Duration::from_millis(300)).await;
                while source.tags.try_recv().is_ok() {}
                let mut p = RtmpPusher::publish(addr, "live", &name).await;
                for h in &headers {
                    p.send(h).await;
                }
                pusher = Some(p);
                waiting_for_key = true;
                continue;
            }
            if waiting_for_key {
                if !is_key(&tag) {
                    continue;
                }
                waiting_for_key = false;
                // The frame's index, from its FLV time (30 fps from 0).
                resumed = Some((f64::from(tag.timestamp) * 30.0 / 1000.0).round() as usize);
            }
            pusher.as_mut().unwrap().send(&tag).await;
        }
        (
            reset_at.expect("the push was reset"),
            resumed.expect("the push resumed at a keyframe"),
        )
    });
    viewer.negotiate_for(Duration::from_secs(13)).await;
    let (reset_at, resumed) = push.await.unwrap();

    // The room saw the stream go, and come back.
    let added = |m: &ServerMessage| match m {
        ServerMessage::StreamAdded { stream } if stream.stream_id == "cam" => Some(()),
        _ => None,
    };
    viewer.signal.expect(added).await;
    viewer
        .signal
        .expect(|m| match m {
            ServerMessage::StreamRemoved { stream_id, .. } if stream_id == "cam" => Some(()),
            _ => None,
        })
        .await;
    viewer.signal.expect(added).await;

    // Frames (by RTP timestamp, complete at their last packet) after the outage.
    let packets = viewer
        .peer
        .as_ref()
        .expect("subscribed")
        .inbox
        .lock()
        .unwrap()["cam-video"]
        .clone();
    let after = reset_at + Duration::from_millis(100);
    let mut frames: std::collections::BTreeMap<u32, Instant> = Default::default();
    for p in packets.iter().filter(|p| p.at > after) {
        let e = frames.entry(p.ts).or_insert(p.at);
        *e = (*e).max(p.at);
    }
    let mut frames: Vec<(u32, Instant)> = frames.into_iter().collect();
    frames.sort_by_key(|(_, at)| *at);
    assert!(
        frames.len() > 150,
        "video comes back after the reset: {} frames",
        frames.len()
    );
    let first_ts = frames.iter().map(|(ts, _)| *ts).min().unwrap();
    let sent = stamps.lock().unwrap().frames.clone();
    let wall = |at: Instant| w0 + at.duration_since(i0).as_secs_f64() * 1000.0;
    let lat: Vec<(f64, f64)> = frames
        .iter()
        .filter_map(|(ts, at)| {
            let n = resumed + (ts.wrapping_sub(first_ts) as f64 / 3000.0).round() as usize;
            Some((wall(*at), wall(*at) - sent.get(n)?))
        })
        .collect();
    let back = lat.first().unwrap().0;
    let median = |from: f64, to: f64| {
        let mut v: Vec<f64> = lat
            .iter()
            .filter(|(at, _)| (from..to).contains(at))
            .map(|(_, l)| *l)
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let end = lat.last().unwrap().0;
    let first_second = median(back, back + 1000.0);
    let last_3s = median(end - 3000.0, end + 1.0);
    let max_last_3s = lat
        .iter()
        .filter(|(at, _)| *at > end - 3000.0)
        .map(|(_, l)| *l)
        .fold(0.0, f64::max);
    eprintln!(
        "back {:.0} ms after the reset, at frame {resumed}; latency median {first_second:.0} ms \
         in its first second, {last_3s:.0} ms (max {max_last_3s:.0}) in the last 3 s, {} frames",
        back - wall(reset_at),
        lat.len()
    );
    assert!(
        last_3s < 150.0 && max_last_3s < 400.0,
        "no lasting lag: {last_3s:.0} ms median, {max_last_3s:.0} ms max in the last 3 s"
    );
    assert!(
        last_3s < first_second + 50.0,
        "no climb after the reconnect: {first_second:.0} → {last_3s:.0} ms"
    );
    assert!(
        back - wall(reset_at) < 2500.0,
        "the stream is back within 2.5 s of the reset"
    );
}
