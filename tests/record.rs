//! Recording and callbacks: ffmpeg pushes over RTMP and a WebRTC member publishes;
//! Weir records each stream into FLV files cut at keyframes, ffmpeg decodes every file,
//! and a test HTTP receiver gets Tencent-shaped callbacks (stream begin and end, one
//! `event_type` 100 per file) with a valid `sign`, also after being down for 30 s. A
//! SIGKILLed node leaves a partial file that decodes up to the kill.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::media::flv_decode_errors;
use common::node::{free_port, Node};
use common::{rtmp_query, TestServer, APP};
use serde_json::Value;

const ROOM: u32 = 4242;
const KEY: &str = "callback-key";

/// What a callback receiver got: (X-Weir-Signature header, body).
type Got = Arc<Mutex<Vec<(String, Value)>>>;

/// A callback receiver on `port`, answering 200 (as Tencent's backends do, `{"code":0}`).
async fn receiver_on(port: u16, got: Got) {
    let app = axum::Router::new()
        .route(
            "/cb",
            post(
                |State(got): State<Got>, headers: HeaderMap, body: String| async move {
                    let sig = headers
                        .get("x-weir-signature")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    let v: Value = serde_json::from_str(&body).expect("callback body is JSON");
                    assert_eq!(
                        sig,
                        weir::hooks::body_signature(KEY, body.as_bytes()),
                        "body signature"
                    );
                    // TRTC's headers: the same HMAC in base64, and the app.
                    use base64::Engine;
                    let trtc = headers
                        .get("sign")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    let mac = base64::engine::general_purpose::STANDARD
                        .decode(trtc)
                        .unwrap();
                    assert_eq!(format!("sha256={}", hex::encode(mac)), sig, "Sign header");
                    assert_eq!(headers.get("sdkappid").unwrap(), &APP.to_string());
                    got.lock().unwrap().push((sig, v));
                    (StatusCode::OK, "{\"code\":0}")
                },
            ),
        )
        .with_state(got);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
}

fn events(got: &Got, event_type: u64) -> Vec<Value> {
    got.lock()
        .unwrap()
        .iter()
        .filter(|(_, v)| v["event_type"] == event_type)
        .map(|(_, v)| v.clone())
        .collect()
}

async fn wait_for_events(got: &Got, event_type: u64, n: usize, within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        let e = events(got, event_type);
        if e.len() >= n || Instant::now() > deadline {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The recording files of a stream, oldest first.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    all.sort();
    all
}

/// Per stream kind: (packets, first pts, last pts, first packet's flags).
fn probe(file: &Path) -> std::collections::BTreeMap<String, (usize, f64, f64, String)> {
    let out = std::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "packet=codec_type,pts_time,flags",
        ])
        .args(["-of", "csv=p=0"])
        .arg(file)
        .output()
        .unwrap();
    let mut by: std::collections::BTreeMap<String, (usize, f64, f64, String)> = Default::default();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split(',').collect();
        let (Some(kind), Some(Ok(pts))) = (f.first(), f.get(1).map(|p| p.parse::<f64>())) else {
            continue;
        };
        let flags = f.get(2).unwrap_or(&"").to_string();
        let e = by
            .entry(kind.to_string())
            .or_insert((0, f64::MAX, f64::MIN, flags));
        e.0 += 1;
        e.1 = e.1.min(pts);
        e.2 = e.2.max(pts);
    }
    by
}

/// Waits for the recording's first file to be closed and kept; returns it, the only
/// file of `stream_dir`.
async fn the_kept_file(t: &TestServer, stream_dir: &Path, within: Duration) -> PathBuf {
    let deadline = Instant::now() + within;
    // The series appears when the first file is closed.
    while !t
        .metrics()
        .await
        .contains("weir_record_files_total{outcome=\"kept\"} 1")
    {
        assert!(Instant::now() < deadline, "the recording was not closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let files = files(stream_dir);
    assert_eq!(files.len(), 1, "{files:?}");
    files.into_iter().next().expect("one file")
}

fn md5_hex(s: &str) -> String {
    let out = std::process::Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(s.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_70_s_push_with_30_s_fragments_is_three_files_and_three_callbacks() {
    let got: Got = Arc::default();
    let port = free_port();
    receiver_on(port, got.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let record_dir = dir.path().to_owned();
    let t = TestServer::start_with(|c| {
        c.record.all = true;
        c.record.dir = record_dir.display().to_string();
        c.record.fragment_s = 30;
        c.callbacks.url = format!("http://127.0.0.1:{port}/cb");
        c.callbacks.key = KEY.into();
    })
    .await;
    let rtmp = t.server.rtmp_addr.unwrap();
    let push_url = format!(
        "rtmp://{rtmp}/live/hearing?{}",
        rtmp_query(&t.app, "clerk", ROOM, 0xff)
    );
    let pushed = 70;
    let mut ffmpeg = common::source::ffmpeg_push(&push_url, pushed);
    let status = tokio::time::timeout(Duration::from_secs(100), ffmpeg.wait())
        .await
        .expect("the push ends")
        .unwrap();
    assert!(status.success(), "ffmpeg push");

    let records = wait_for_events(&got, 100, 3, Duration::from_secs(15)).await;
    let stream_dir = dir.path().join(APP.to_string()).join("hearing");
    let files = files(&stream_dir);
    assert_eq!(files.len(), 3, "files: {files:?}");
    let mut total = 0.0;
    for f in &files {
        let errors = flv_decode_errors(f);
        assert!(errors.trim().is_empty(), "decoding {f:?}: {errors}");
        let p = probe(f);
        let (vn, v0, v1, vflags) = p.get("video").expect("video").clone();
        let (_, a0, a1, _) = p.get("audio").expect("audio").clone();
        // From its first frame: a keyframe at 0, audio from 0 too.
        assert!(v0.abs() < 0.001, "{f:?} video starts at {v0}");
        assert!(
            vflags.starts_with('K'),
            "{f:?} starts with a keyframe: {vflags}"
        );
        assert!(a0.abs() < 0.05, "{f:?} audio starts at {a0}");
        assert!((a1 - v1).abs() < 0.1, "{f:?} ends: audio {a1} video {v1}");
        let fps = (vn - 1) as f64 / v1;
        assert!((fps - 30.0).abs() < 1.5, "{f:?}: {fps:.2} fps");
        total += v1 + 1.0 / 30.0;
    }
    // The files hold the whole push (the first keyframe is the push's first frame;
    // the AAC encoder's tail is not flushed by a live pusher).
    assert!(
        (total - f64::from(pushed)).abs() < 0.5,
        "recorded {total:.2} s of {pushed}"
    );

    // One `event_type` 100 per file, Tencent's fields, a sign that checks.
    assert_eq!(records.len(), 3, "{records:#?}");
    let now = weir::auth::unix_now();
    for (r, f) in records.iter().zip(&files) {
        let name = f.file_name().unwrap().to_str().unwrap();
        assert_eq!(r["stream_id"], "hearing");
        assert_eq!(r["appid"], APP);
        assert_eq!(r["room_id"], ROOM.to_string());
        assert_eq!(r["file_format"], "flv");
        assert_eq!(r["file_id"], name.trim_end_matches(".flv"));
        assert_eq!(r["file_size"], std::fs::metadata(f).unwrap().len());
        assert_eq!(r["video_url"], f.display().to_string());
        let t_ = r["t"].as_u64().unwrap();
        assert!(t_ > now, "t is the signature's expiry");
        assert_eq!(
            r["sign"],
            md5_hex(&format!("{KEY}{t_}")),
            "sign = MD5(key + t)"
        );
        let (start, end, duration) = (
            r["start_time"].as_u64().unwrap(),
            r["end_time"].as_u64().unwrap(),
            r["duration"].as_u64().unwrap(),
        );
        assert!(end >= start && end - start + 1 >= duration.saturating_sub(1));
    }
    let durations: Vec<u64> = records
        .iter()
        .map(|r| r["duration"].as_u64().unwrap())
        .collect();
    assert!(durations[0] == 30 || durations[0] == 31, "{durations:?}");
    assert_eq!(events(&got, 1).len(), 1, "push began");
    let ended = wait_for_events(&got, 0, 1, Duration::from_secs(5)).await;
    assert_eq!(ended.len(), 1, "push ended");

    let m = t.metrics().await;
    assert_eq!(
        common::metric(&m, "weir_record_files_total{outcome=\"kept\"}"),
        3.0
    );
    assert_eq!(common::metric(&m, "weir_recordings"), 0.0);
    assert!(
        common::metric(
            &m,
            "weir_callbacks_total{event=\"record\",outcome=\"delivered\"}"
        ) >= 3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_for_30_s_gets_every_callback_when_back() {
    let got: Got = Arc::default();
    // Nothing listens on the port for the first 30 s.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let record_dir = dir.path().to_owned();
    let t = TestServer::start_with(|c| {
        c.record.streams = vec!["court".into()];
        c.record.dir = record_dir.display().to_string();
        c.record.fragment_s = 3;
        c.callbacks.url = format!("http://127.0.0.1:{port}/cb");
        c.callbacks.key = KEY.into();
    })
    .await;
    let down_from = Instant::now();
    let rtmp = t.server.rtmp_addr.unwrap();
    // Two streams: "court" is recorded, "other" is not (only its begin/end are told).
    let mut court = common::source::ffmpeg_push(
        &format!(
            "rtmp://{rtmp}/live/court?{}",
            rtmp_query(&t.app, "judge", ROOM, 0xff)
        ),
        8,
    );
    let mut other = common::source::ffmpeg_push(
        &format!(
            "rtmp://{rtmp}/live/other?{}",
            rtmp_query(&t.app, "witness", ROOM, 0xff)
        ),
        4,
    );
    assert!(court.wait().await.unwrap().success());
    assert!(other.wait().await.unwrap().success());
    let files = files(&dir.path().join(APP.to_string()).join("court"));
    assert!(files.len() >= 2, "{files:?}");
    assert!(
        !dir.path().join(APP.to_string()).join("other").exists(),
        "only the selected stream is recorded"
    );
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(down_from.elapsed())).await;
    let m = t.metrics().await;
    // The first event (the room's creation) is retried while the rest wait behind it.
    let failed = common::metric(
        &m,
        "weir_callbacks_total{event=\"room_created\",outcome=\"failed_attempt\"}",
    );
    assert!(failed >= 3.0, "retried while down: {failed}");
    assert!(common::metric(&m, "weir_callbacks_queued") >= 1.0);

    receiver_on(port, got.clone()).await;
    let back = Instant::now();
    // begin + end for both streams, one per file; and the room's events: created,
    // two members in and out, dismissed.
    let want = 4 + files.len() + 6;
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.lock().unwrap().len() < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all: Vec<Value> = got.lock().unwrap().iter().map(|(_, v)| v.clone()).collect();
    eprintln!(
        "all {} callbacks delivered {:?} after the receiver came back",
        all.len(),
        back.elapsed()
    );
    assert_eq!(all.len(), want, "{all:#?}");
    assert_eq!(events(&got, 1).len(), 2);
    assert_eq!(events(&got, 0).len(), 2);
    assert_eq!(events(&got, 100).len(), files.len());
    let room_events: Vec<u64> = all.iter().filter_map(|v| v["EventType"].as_u64()).collect();
    assert_eq!(room_events.len(), 6, "{room_events:?}");
    assert_eq!(room_events.first(), Some(&101));
    assert_eq!(room_events.last(), Some(&102));
    // In the order they happened: each stream's begin before its end and files.
    let court_events: Vec<u64> = all
        .iter()
        .filter(|v| v["stream_id"] == "court")
        .map(|v| v["event_type"].as_u64().unwrap())
        .collect();
    assert_eq!(court_events.first(), Some(&1), "{court_events:?}");
    let m = t.metrics().await;
    assert_eq!(common::metric(&m, "weir_callbacks_queued"), 0.0);
}

/// A `webrtc`-crate publisher whose sound and picture are exactly in sync (frame `n`
/// drawn with its index, a beep with each frame 30·k, both tracks' RTP times from one
/// clock): the FLV recording keeps them in sync, beep by beep, through the Opus to AAC
/// conversion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webrtc_publication_is_recorded_with_aac_audio_in_sync() {
    use common::publisher::{beeps, h264_indexed, offer_to_publish, send_h264_and_opus_with};
    let dir = tempfile::tempdir().unwrap();
    let record_dir = dir.path().to_owned();
    let t = TestServer::start_with(|c| {
        c.record.rooms = vec![format!("{APP}/{ROOM}")];
        c.record.dir = record_dir.display().to_string();
    })
    .await;
    let seconds = 8;
    let aus = std::sync::Arc::new(h264_indexed(seconds));
    let (mut signal, _) = common::Client::join(&t.ws_url(), t.join("agent", ROOM, 0xff)).await;
    let common::publisher::Offered {
        stream,
        peer: mut publisher,
        video,
        audio,
        answer,
    } = offer_to_publish(&mut signal).await;
    publisher.accept_answer(answer).await;
    publisher.connected().await;
    let pts = (video.payload_type().await, audio.payload_type().await);
    send_h264_and_opus_with(
        aus,
        video.track.clone(),
        audio.track.clone(),
        pts,
        common::publisher::Pace::Once,
        beeps,
    )
    .await;
    signal
        .send(&weir_signaling::ClientMessage::Unpublish { screen: false })
        .await;
    let stream_dir = dir
        .path()
        .join(APP.to_string())
        .join(weir::record::file_stem(&stream.stream_id));
    let f = &the_kept_file(&t, &stream_dir, Duration::from_secs(10)).await;
    let errors = flv_decode_errors(f);
    assert!(errors.trim().is_empty(), "decoding {f:?}: {errors}");
    let p = probe(f);
    let (_, v0, v1, vflags) = p.get("video").expect("video").clone();
    let (an, a0, a1, _) = p.get("audio").expect("AAC audio").clone();
    assert!(vflags.starts_with('K'));
    // The publisher's first keyframe is its first frame; conversion starts with the
    // recording, so the file holds the whole publication less the time to join.
    assert!(v1 - v0 > f64::from(seconds) - 2.0, "video {v0}..{v1}");
    let aps = an as f64 / (a1 - a0);
    assert!((aps - 46.875).abs() < 2.0, "{aps:.2} AAC frames/s");
    // Each beep heard with the frame drawn with it. What is left is the Opus
    // encoder's look-ahead (6.5 ms) and the millisecond timestamps.
    let offsets = common::media::av_offsets_ms(f);
    println!("A/V offsets of the recording (audio later +), ms: {offsets:.1?}");
    assert!(
        offsets.len() >= seconds as usize - 2,
        "beeps heard: {offsets:?}"
    );
    for o in &offsets {
        assert!(o.abs() < 15.0, "out of sync by {o:.1} ms: {offsets:.1?}");
    }
}

/// A Chrome publisher recorded as fragmented MP4: the file decodes from its first
/// frame, and each beep of the generated microphone is heard where the frame drawn
/// with it is shown, within 50 ms (the sender reports' NTP mapping of both tracks,
/// through the Opus to AAC conversion).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chrome_publication_is_recorded_in_mp4_with_sound_and_picture_in_sync() {
    let dir = tempfile::tempdir().unwrap();
    let record_dir = dir.path().to_owned();
    let t = TestServer::start_with(|c| {
        c.record.rooms = vec![format!("{APP}/{ROOM}")];
        c.record.dir = record_dir.display().to_string();
        c.record.format = weir::record::Format::Mp4;
    })
    .await;
    let browser = common::browser::Browser::launch().await;
    let page = browser
        .open(&format!("http://{}/", t.server.http_addr))
        .await;
    page.eval(common::browser::GENERATED_PUBLISHER_JS).await;
    let options = serde_json::to_string(&t.join("officer", ROOM, 0xff)).unwrap();
    page.eval(&format!("window.glassPublish({options}, 30, true)"))
        .await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let handed = page
        .eval("window.pubBeeps.map((b, k) => b - window.pubFrames[30 * k])")
        .await;
    println!("page: beep k handed after frame 30k by (ms): {handed}");
    page.eval("window.glassRoom.leave().then(() => true)").await;
    let stream = format!("{APP}_{ROOM}_officer_main");
    let stream_dir = dir.path().join(APP.to_string()).join(&stream);
    let f = &the_kept_file(&t, &stream_dir, Duration::from_secs(15)).await;
    assert_eq!(f.extension().and_then(|e| e.to_str()), Some("mp4"));
    let errors = flv_decode_errors(f);
    assert!(errors.trim().is_empty(), "decoding {f:?}: {errors}");
    let p = probe(f);
    let (_, v0, v1, vflags) = p.get("video").expect("video").clone();
    assert!(p.contains_key("audio"), "AAC audio: {p:?}");
    assert!(vflags.starts_with('K'), "starts at a keyframe");
    assert!(v1 - v0 > 8.0, "video {v0}..{v1}");
    let offsets = common::media::av_offsets_ms(f);
    println!("A/V offsets of the recording (audio later +), ms: {offsets:.1?}");
    assert!(offsets.len() >= 8, "beeps heard: {offsets:?}");
    for o in &offsets {
        assert!(o.abs() < 50.0, "out of sync by {o:.1} ms: {offsets:.1?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_recording_leaves_a_file_that_decodes_up_to_the_kill() {
    sigkill_mid_recording(weir::record::Format::Flv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_recording_leaves_an_mp4_file_that_decodes_up_to_the_kill() {
    sigkill_mid_recording(weir::record::Format::Mp4).await;
}

async fn sigkill_mid_recording(format: weir::record::Format) {
    let dir = tempfile::tempdir().unwrap();
    let record_dir = dir.path().to_owned();
    let node = Node::start_with(&[], |c| {
        c.record.all = true;
        c.record.dir = record_dir.display().to_string();
        c.record.format = format;
    })
    .await;
    let mut child = node.child;
    let mut log = child.stderr.take().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut sink = Vec::new();
        let _ = log.read_to_end(&mut sink).await;
    });
    let push_url = format!(
        "rtmp://127.0.0.1:{}/live/claim?{}",
        node.rtmp,
        rtmp_query(&node.app, "adjuster", ROOM, 0xff)
    );
    let mut ffmpeg = common::source::ffmpeg_push(&push_url, 30);
    // Wait for the file, then give it 8 s.
    let stream_dir = dir.path().join(APP.to_string()).join("claim");
    let deadline = Instant::now() + Duration::from_secs(15);
    while files(&stream_dir).is_empty() {
        assert!(Instant::now() < deadline, "no recording file appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let opened = Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    child.start_kill().unwrap(); // SIGKILL
    let killed_after = opened.elapsed().as_secs_f64();
    child.wait().await.unwrap();
    let _ = ffmpeg.kill().await;

    let files = files(&stream_dir);
    assert_eq!(files.len(), 1);
    let f = &files[0];
    assert_eq!(
        f.extension().and_then(|e| e.to_str()),
        Some(format.extension())
    );
    // The last tag (or fragment) may be cut short by the kill; everything before it
    // decodes.
    let errors = flv_decode_errors(f);
    let bad: Vec<&str> = errors
        .lines()
        .filter(|l| {
            !l.contains("Packet mismatch") && !l.contains("truncat") && !l.contains("Invalid data")
        })
        .collect();
    assert!(bad.is_empty(), "decoding {f:?}: {errors}");
    let p = probe(f);
    let (_, v0, v1, vflags) = p.get("video").expect("video").clone();
    assert!(vflags.starts_with('K') && v0.abs() < 0.001);
    let lost = killed_after - v1;
    eprintln!("killed {killed_after:.2} s into the file; it plays to {v1:.2} s (lost {lost:.2} s)");
    assert!(lost < 5.0, "the file ends {lost:.2} s before the kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_starts_stops_lists_and_fetches_recordings() {
    let dir = tempfile::tempdir().unwrap();
    let record_dir = dir.path().to_owned();
    // No rule records anything: only the REST calls do.
    let t = TestServer::start_with(|c| c.record.dir = record_dir.display().to_string()).await;
    let http = t.server.http_addr;
    let rtmp = t.server.rtmp_addr.unwrap();
    let mut ffmpeg = common::source::ffmpeg_push(
        &format!(
            "rtmp://{rtmp}/live/lesson?{}",
            rtmp_query(&t.app, "teacher", ROOM, 0xff)
        ),
        7,
    );
    let creds = |user: &str| {
        let sig = t
            .app
            .issue_user_sig(weir::auth::TokenKind::V2, user, weir::auth::unix_now(), 600)
            .unwrap();
        let sig: String = url::form_urlencoded::byte_serialize(sig.as_bytes()).collect();
        format!("sdkappid={APP}&identifier={user}&usersig={sig}")
    };
    let admin = creds("administrator");
    let client = reqwest::Client::new();
    let call = |path: &str, q: &str, stream: &str| {
        client
            .post(format!("http://{http}/v1/record/{path}?{q}"))
            .json(&serde_json::json!({"stream_id": stream, "file_format": "mp4"}))
            .send()
    };
    // Not live yet: nothing to record.
    assert_eq!(call("start", &admin, "lesson").await.unwrap().status(), 404);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = call("start", &admin, "lesson").await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "start: {}", r.status());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(call("start", &admin, "lesson").await.unwrap().status(), 409);
    let avi = client
        .post(format!("http://{http}/v1/record/start?{admin}"))
        .json(&serde_json::json!({"stream_id": "lesson", "file_format": "avi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(avi.status(), 400);
    // Another user of the app, a bad signature, no credentials.
    assert_eq!(
        call("start", &creds("student"), "lesson")
            .await
            .unwrap()
            .status(),
        403
    );
    let forged = admin.replace("usersig=", "usersig=x");
    assert_eq!(call("stop", &forged, "lesson").await.unwrap().status(), 401);
    assert_eq!(call("stop", "", "lesson").await.unwrap().status(), 401);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(call("stop", &admin, "lesson").await.unwrap().status(), 200);
    assert_eq!(call("stop", &admin, "lesson").await.unwrap().status(), 404);
    assert!(ffmpeg.wait().await.unwrap().success());

    let list: Value = client
        .get(format!(
            "http://{http}/v1/record/files?{admin}&stream_id=lesson"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let files = list["files"].as_array().unwrap();
    assert_eq!(files.len(), 1, "{list}");
    let url = files[0]["url"].as_str().unwrap();
    let size = files[0]["file_size"].as_u64().unwrap();
    // A time range after it lists nothing.
    let later = weir::auth::unix_now() * 1000 + 60_000;
    let none: Value = client
        .get(format!(
            "http://{http}/v1/record/files?{admin}&from={later}"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(none["files"].as_array().unwrap().len(), 0, "{none}");

    // The whole file, then a range of it.
    let whole = client
        .get(format!("http://{http}{url}?{admin}"))
        .send()
        .await
        .unwrap();
    assert_eq!(whole.status(), 200);
    let body = whole.bytes().await.unwrap();
    assert_eq!(body.len() as u64, size);
    assert!(url.ends_with(".mp4"), "{url}");
    let local = dir.path().join("fetched.mp4");
    std::fs::write(&local, &body).unwrap();
    let errors = flv_decode_errors(&local);
    assert!(errors.trim().is_empty(), "{errors}");
    let p = probe(&local);
    let (_, v0, v1, vflags) = p.get("video").expect("video").clone();
    // Started mid-stream at the cached GOP's keyframe, stopped ~4 s later.
    assert!(vflags.starts_with('K') && v0.abs() < 0.001);
    assert!(v1 > 3.0 && v1 < 6.5, "recorded {v1:.2} s");
    let part = client
        .get(format!("http://{http}{url}?{admin}"))
        .header("range", "bytes=4-7")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(&part.bytes().await.unwrap()[..], b"ftyp");
    // Without the administrator's signature, or outside the app's files: nothing.
    let r = client
        .get(format!("http://{http}{url}?{}", creds("student")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = client
        .get(format!(
            "http://{http}/v1/record/files/lesson/..%2F..%2Fweir.toml?{admin}"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_and_members_are_told_as_trtc_room_events() {
    let got: Got = Arc::default();
    let port = free_port();
    receiver_on(port, got.clone()).await;
    let t = TestServer::start_with(|c| {
        c.callbacks.url = format!("http://127.0.0.1:{port}/cb");
        c.callbacks.key = KEY.into();
    })
    .await;
    let url = t.ws_url();
    let (mut a, _) = common::Client::join(&url, t.join("ann", 77, 0xff)).await;
    let (b, _) = common::Client::join(&url, t.join("ben", 77, 0xff)).await;
    a.send(&weir_signaling::ClientMessage::Leave).await;
    // Ann's leave is through before Ben's socket closes without a word.
    a.expect(|m| matches!(m, weir_signaling::ServerMessage::Left { .. }).then_some(()))
        .await;
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(10);
    let trtc = |got: &Got| -> Vec<(u64, String, u64)> {
        got.lock()
            .unwrap()
            .iter()
            .filter(|(_, v)| v["EventGroupId"] == 1)
            .map(|(_, v)| {
                let info = &v["EventInfo"];
                assert_eq!(info["RoomId"], 77);
                (
                    v["EventType"].as_u64().unwrap(),
                    info["UserId"].as_str().unwrap_or("").to_owned(),
                    info["Reason"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    while trtc(&got).len() < 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        trtc(&got),
        vec![
            (101, String::new(), 0),
            (103, "ann".into(), 0),
            (103, "ben".into(), 0),
            (104, "ann".into(), 1),
            (104, "ben".into(), 2),
            (102, String::new(), 0),
        ]
    );
}

/// moto's S3 server (`scripts/install-deps.sh test` makes its virtualenv), on `port`.
fn s3_server(port: u16) -> tokio::process::Child {
    let python =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/s3-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/install-deps.sh test (it makes moto's virtualenv)",
        python.display()
    );
    tokio::process::Command::new(python)
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_upload_to_an_s3_server_that_comes_up_late_and_are_listed() {
    let got: Got = Arc::default();
    let cb_port = free_port();
    receiver_on(cb_port, got.clone()).await;
    let s3_port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let record_dir = dir.path().to_owned();
    let t = TestServer::start_with(|c| {
        c.record.all = true;
        c.record.dir = record_dir.display().to_string();
        c.record.fragment_s = 3;
        c.record.s3_bucket = "hearings".into();
        c.record.s3_endpoint = format!("http://127.0.0.1:{s3_port}");
        c.record.s3_access_key = "test".into();
        c.record.s3_secret_key = "test".into();
        c.record.s3_prefix = "weir/".into();
        c.record.keep_local = false;
        c.callbacks.url = format!("http://127.0.0.1:{cb_port}/cb");
        c.callbacks.key = KEY.into();
    })
    .await;
    let http = t.server.http_addr;
    let rtmp = t.server.rtmp_addr.unwrap();
    let mut ffmpeg = common::source::ffmpeg_push(
        &format!(
            "rtmp://{rtmp}/live/survey?{}",
            rtmp_query(&t.app, "adjuster", ROOM, 0xff)
        ),
        7,
    );
    assert!(ffmpeg.wait().await.unwrap().success());
    // The bucket's server was down for the whole push: nothing is lost, the uploads
    // are retried until it is there. It stays down until an attempt has failed (the
    // series exists, at 0, from the first attempt on: its value is what counts).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = t.metrics().await;
        let series = "weir_record_uploads_total{outcome=\"retried\"}";
        if m.contains(series) && common::metric(&m, series) >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "no upload attempt failed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(events(&got, 100).is_empty(), "told before the upload");
    let _moto = s3_server(s3_port);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let made = client
            .put(format!("http://127.0.0.1:{s3_port}/hearings"))
            .send()
            .await;
        if made.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(Instant::now() < deadline, "moto did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let records = wait_for_events(&got, 100, 2, Duration::from_secs(40)).await;
    assert!(records.len() >= 2, "{records:#?}");
    let m = t.metrics().await;
    assert!(common::metric(&m, "weir_record_uploads_total{outcome=\"ok\"}") >= 2.0);
    assert!(common::metric(&m, "weir_record_uploads_total{outcome=\"retried\"}") >= 1.0);
    // Uploaded, and not kept locally.
    assert!(files(&dir.path().join(APP.to_string()).join("survey")).is_empty());

    let admin = {
        let sig = t
            .app
            .issue_user_sig(
                weir::auth::TokenKind::V2,
                "administrator",
                weir::auth::unix_now(),
                600,
            )
            .unwrap();
        let sig: String = url::form_urlencoded::byte_serialize(sig.as_bytes()).collect();
        format!("sdkappid={APP}&identifier=administrator&usersig={sig}")
    };
    let list: Value = client
        .get(format!(
            "http://{http}/v1/record/files?{admin}&stream_id=survey"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = list["files"].as_array().unwrap();
    assert_eq!(listed.len(), records.len(), "{list}");
    for l in listed {
        // Uploads run two at a time: callbacks come in the order they finish.
        let name = l["file"].as_str().unwrap();
        let r = records
            .iter()
            .find(|r| r["file_id"] == name.trim_end_matches(".flv"))
            .expect("a callback for every listed file");
        assert_eq!(l["storage"], "s3");
        assert_eq!(l["file_size"], r["file_size"]);
        let key = format!("weir/{APP}/survey/{}", l["file"].as_str().unwrap());
        assert_eq!(l["url"], format!("s3://hearings/{key}"));
        assert_eq!(r["video_url"], l["url"]);
        // What is in the bucket is the file: fetch it and decode it.
        let body = client
            .get(format!("http://127.0.0.1:{s3_port}/hearings/{key}"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(body.len() as u64, r["file_size"].as_u64().unwrap());
        let local = dir.path().join("from-bucket.flv");
        std::fs::write(&local, &body).unwrap();
        let errors = flv_decode_errors(&local);
        assert!(errors.trim().is_empty(), "{errors}");
        let p = probe(&local);
        assert!(p.get("video").expect("video").3.starts_with('K'));
    }
}

/// A backend's `on_publish`/`on_play` hooks: refuses pushes of "banned", and the first
/// play it is asked about; records what it was asked.
async fn admission_backend(port: u16, asked: Got) {
    let plays = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = axum::Router::new()
        .route(
            "/hook",
            post(
                move |State(asked): State<Got>, headers: HeaderMap, body: String| {
                    let plays = plays.clone();
                    async move {
                        let v: Value = serde_json::from_str(&body).unwrap();
                        let sig = headers
                            .get("x-weir-signature")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        let signed = sig == weir::hooks::body_signature(KEY, body.as_bytes());
                        asked.lock().unwrap().push((sig, v.clone()));
                        if !signed {
                            return (StatusCode::UNAUTHORIZED, "bad signature".to_owned());
                        }
                        let refuse = match v["action"].as_str() {
                            Some("on_publish") => {
                                v["stream"] == "banned" || v["user_id"] == "banned"
                            }
                            Some("on_play") => {
                                plays.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0
                            }
                            _ => true,
                        };
                        if refuse {
                            (StatusCode::FORBIDDEN, "not this one".to_owned())
                        } else {
                            (StatusCode::OK, "0".to_owned())
                        }
                    }
                },
            ),
        )
        .with_state(asked);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
}

/// A server whose `on_publish` and `on_play` ask [`admission_backend`]; what it was
/// asked.
async fn hooked_server() -> (TestServer, Got) {
    let asked: Got = Arc::default();
    let port = free_port();
    admission_backend(port, asked.clone()).await;
    let t = TestServer::start_with(|c| {
        c.callbacks.key = KEY.into();
        c.callbacks.on_publish_url = format!("http://127.0.0.1:{port}/hook");
        c.callbacks.on_play_url = format!("http://127.0.0.1:{port}/hook");
    })
    .await;
    (t, asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_may_refuse_a_push_or_a_play_and_a_silent_one_refuses_by_default() {
    let (t, asked) = hooked_server().await;
    let rtmp = t.server.rtmp_addr.unwrap();
    let http = t.server.http_addr;
    let push = |name: &str, secs| {
        common::source::ffmpeg_push(
            &format!(
                "rtmp://{rtmp}/live/{name}?{}",
                rtmp_query(&t.app, name, ROOM, 0xff)
            ),
            secs,
        )
    };
    // Refused: ffmpeg fails at once.
    let status = tokio::time::timeout(Duration::from_secs(10), push("banned", 5).wait())
        .await
        .expect("a refused push ends")
        .unwrap();
    assert!(!status.success(), "a refused push fails");
    let mut open = push("open", 6);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t
        .metrics()
        .await
        .contains("weir_rtmp_requests_total{outcome=\"ok\",request=\"publish\"} 1")
    {
        assert!(
            Instant::now() < deadline,
            "the allowed push was not published"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let key = t.config.apps[0].live_play_key.clone().unwrap();
    let url = weir::auth::live_url::sign_url(
        &format!("http://{http}/live/open.flv"),
        &key,
        weir::auth::unix_now() + 600,
    )
    .unwrap();
    let client = reqwest::Client::new();
    // The backend refuses the first play and allows the next.
    let first = client.get(&url).send().await.unwrap();
    assert_eq!(first.status(), 403);
    assert!(first.text().await.unwrap().contains("not this one"));
    let mut second = client.get(&url).send().await.unwrap();
    assert_eq!(second.status(), 200);
    let chunk = second.chunk().await.unwrap().unwrap();
    assert_eq!(&chunk[..3], b"FLV");
    drop(second);
    assert!(open.wait().await.unwrap().success());

    let asked: Vec<Value> = asked
        .lock()
        .unwrap()
        .iter()
        .map(|(_, v)| v.clone())
        .collect();
    let publishes: Vec<&Value> = asked
        .iter()
        .filter(|v| v["action"] == "on_publish")
        .collect();
    assert_eq!(publishes.len(), 2, "{asked:#?}");
    assert_eq!(publishes[1]["stream"], "open");
    assert_eq!(publishes[1]["protocol"], "rtmp");
    assert_eq!(publishes[1]["sdk_app_id"], APP);
    assert_eq!(publishes[1]["room_id"], ROOM.to_string());
    assert_eq!(publishes[1]["user_id"], "open");
    let plays: Vec<&Value> = asked.iter().filter(|v| v["action"] == "on_play").collect();
    assert_eq!(plays.len(), 2);
    assert_eq!(plays[0]["protocol"], "http-flv");
    let m = t.metrics().await;
    assert_eq!(
        common::metric(
            &m,
            "weir_admission_hooks_total{action=\"on_publish\",outcome=\"refused\"}"
        ),
        1.0
    );
    assert_eq!(
        common::metric(
            &m,
            "weir_admission_hooks_total{action=\"on_play\",outcome=\"allowed\"}"
        ),
        1.0
    );

    // A backend that accepts the connection and never answers: refused after the
    // timeout (the default), and the refusal counted.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let t2 = TestServer::start_with(|c| {
        c.callbacks.key = KEY.into();
        c.callbacks.on_publish_url = format!("http://127.0.0.1:{silent_port}/hook");
        c.callbacks.hook_timeout_ms = 500;
    })
    .await;
    let rtmp2 = t2.server.rtmp_addr.unwrap();
    let started = Instant::now();
    let status = common::source::ffmpeg_push(
        &format!(
            "rtmp://{rtmp2}/live/quiet?{}",
            rtmp_query(&t2.app, "quiet", ROOM, 0xff)
        ),
        5,
    )
    .wait()
    .await
    .unwrap();
    assert!(!status.success());
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "refused after the timeout, not the push"
    );
    let m = t2.metrics().await;
    assert_eq!(
        common::metric(
            &m,
            "weir_admission_hooks_total{action=\"on_publish\",outcome=\"timeout_refused\"}"
        ),
        1.0
    );
}

/// The same hooks for the WebRTC doors: a member's `publish` over signaling, a WHIP
/// publication and a WHEP play are each asked of the backend first, with the room and
/// user, and a refusal reaches the client (signaling error 403 naming the request,
/// HTTP 403) with the backend's reason; nothing is published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_is_asked_before_webrtc_whip_and_whep_publications_and_plays() {
    use weir_signaling::{ClientMessage, ErrorCode, ServerMessage};
    let (t, asked) = hooked_server().await;
    // Signaling: the backend refuses "banned", lets "alice" in.
    let (mut banned, _) = common::Client::join(&t.ws_url(), t.join("banned", ROOM, 0xff)).await;
    banned
        .send(&ClientMessage::Publish {
            audio: true,
            video: true,
            min_bitrate: None,
            max_bitrate: None,
            screen: false,
        })
        .await;
    let (code, message, request) = banned
        .expect(|m| match m {
            ServerMessage::Error {
                code,
                message,
                request,
                ..
            } => Some((*code, message.clone(), request.clone())),
            _ => None,
        })
        .await;
    assert_eq!(code, ErrorCode::MissingPrivilege);
    assert!(message.contains("not this one"), "{message}");
    assert_eq!(request.as_deref(), Some("publish"));
    let (mut alice, _) = common::Client::join(&t.ws_url(), t.join("alice", ROOM, 0xff)).await;
    let published = alice.publish(true, true).await;
    assert_eq!(published.stream_id, format!("{APP}_{ROOM}_alice_main"));

    // WHIP and WHEP, with a JWT privateMapKey as the bearer.
    let bearer = |user: &str| {
        let jwt = t
            .app
            .issue_private_map_key(
                weir::auth::TokenKind::Jwt,
                user,
                &weir::auth::RoomId::Num(ROOM),
                weir::auth::Privileges(0xff),
                weir::auth::unix_now(),
                600,
            )
            .unwrap();
        format!("Bearer {jwt}")
    };
    let mut peer = common::peer::RtcPeer::new().await;
    peer.add_send_track(
        rtc::rtp_transceiver::rtp_sender::RtpCodecKind::Video,
        common::peer::h264(),
        0x5151,
    )
    .await;
    let offer = peer.offer().await;
    let sdp = ("Content-Type", "application/sdp");
    let addr = t.server.http_addr;
    let auth = bearer("banned");
    let (status, _, body) = common::http_request(
        addr,
        "POST",
        "/whip",
        &[sdp, ("Authorization", &auth)],
        &offer,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("not this one"), "{body}");
    // The backend refuses the first play it is asked about.
    let auth = bearer("viewer");
    let (status, _, body) = common::http_request(
        addr,
        "POST",
        &format!("/whep/{}", published.stream_id),
        &[sdp, ("Authorization", &auth)],
        &offer,
    )
    .await;
    assert_eq!(status, 403, "{body}");

    let asked: Vec<Value> = asked
        .lock()
        .unwrap()
        .iter()
        .map(|(_, v)| v.clone())
        .collect();
    let of = |protocol: &str| -> Vec<&Value> {
        asked.iter().filter(|v| v["protocol"] == protocol).collect()
    };
    let webrtc = of("webrtc");
    assert_eq!(webrtc.len(), 2, "{asked:#?}");
    assert_eq!(webrtc[0]["action"], "on_publish");
    assert_eq!(webrtc[0]["user_id"], "banned");
    assert_eq!(webrtc[1]["stream"], published.stream_id);
    assert_eq!(webrtc[1]["room_id"], ROOM.to_string());
    assert_eq!(webrtc[1]["sdk_app_id"], APP);
    let whip = of("whip");
    assert_eq!(whip.len(), 1, "{asked:#?}");
    assert_eq!(whip[0]["stream"], format!("{APP}_{ROOM}_banned_main"));
    let whep = of("whep");
    assert_eq!(whep.len(), 1, "{asked:#?}");
    assert_eq!(whep[0]["action"], "on_play");
    assert_eq!(whep[0]["stream"], published.stream_id);
    assert_eq!(whep[0]["user_id"], "viewer");
    let m = t.metrics().await;
    assert_eq!(
        common::metric(
            &m,
            "weir_admission_hooks_total{action=\"on_publish\",outcome=\"refused\"}"
        ),
        2.0
    );
    assert_eq!(
        common::metric(&m, "weir_whip_requests_total{outcome=\"hook_refused\"}"),
        1.0
    );
    assert_eq!(
        common::metric(&m, "weir_whep_requests_total{outcome=\"hook_refused\"}"),
        1.0
    );
}

/// The backend asks for a room to be recorded before anyone publishes in it: every
/// stream published there is recorded (in the format asked) until the room is
/// stopped; after that, a new push is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_records_a_room_from_now_on_until_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let record_dir = dir.path().to_owned();
    let t = TestServer::start_with(|c| c.record.dir = record_dir.display().to_string()).await;
    let (http, rtmp) = (t.server.http_addr, t.server.rtmp_addr.unwrap());
    let sig = t
        .app
        .issue_user_sig(
            weir::auth::TokenKind::V2,
            "administrator",
            weir::auth::unix_now(),
            600,
        )
        .unwrap();
    let sig: String = url::form_urlencoded::byte_serialize(sig.as_bytes()).collect();
    let admin = format!("sdkappid={APP}&identifier=administrator&usersig={sig}");
    let client = reqwest::Client::new();
    let call = |path: &str, body: Value| {
        client
            .post(format!("http://{http}/v1/record/{path}?{admin}"))
            .json(&body)
            .send()
    };
    let room = serde_json::json!({"room_id": ROOM.to_string(), "file_format": "mp4"});
    assert_eq!(call("start", room.clone()).await.unwrap().status(), 200);
    assert_eq!(call("start", room.clone()).await.unwrap().status(), 409);
    assert_eq!(
        call("start", serde_json::json!({})).await.unwrap().status(),
        400
    );
    let push = |name: &str| {
        common::source::ffmpeg_push(
            &format!(
                "rtmp://{rtmp}/live/{name}?{}",
                rtmp_query(&t.app, name, ROOM, 0xff)
            ),
            4,
        )
    };
    assert!(push("first").wait().await.unwrap().success());
    let first_dir = dir.path().join(APP.to_string()).join("first");
    let f = the_kept_file(&t, &first_dir, Duration::from_secs(10)).await;
    assert_eq!(f.extension().and_then(|e| e.to_str()), Some("mp4"));
    let errors = flv_decode_errors(&f);
    assert!(errors.trim().is_empty(), "decoding {f:?}: {errors}");

    assert_eq!(call("stop", room.clone()).await.unwrap().status(), 200);
    assert_eq!(call("stop", room).await.unwrap().status(), 404);
    assert!(push("second").wait().await.unwrap().success());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(files(&dir.path().join(APP.to_string()).join("second")).is_empty());
}
