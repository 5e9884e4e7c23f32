//! Every stream plays over RTMP and HTTP-FLV: ffmpeg pushes, ffmpeg players (RTMP with
//! room credentials, HTTP-FLV with a txSecret play URL) record what they get, and
//! ffprobe/ffmpeg check it decodes, at the right rate, with audio and video together.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::media::flv_decode_errors as decode_errors;
use common::publisher::webrtc_publisher;
use common::TestServer;

const ROOM: u32 = 777;

async fn server() -> TestServer {
    TestServer::start_with(|c| c.server.rtmp_addr = "127.0.0.1:0".into()).await
}

fn credentials(t: &TestServer, user: &str, privileges: u32) -> String {
    common::rtmp_query(&t.app, user, ROOM, privileges)
}

/// Records a play URL to `out` (stream copy) until the stream ends.
fn player(url: &str, out: &Path) -> tokio::process::Child {
    tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error", "-i", url])
        .args(["-c", "copy", "-f", "flv", "-y"])
        .arg(out)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Per stream: (codec, packets, first pts, last pts).
fn packets(file: &Path) -> Vec<(String, usize, f64, f64)> {
    let out = std::process::Command::new("ffprobe")
        .args(["-v", "error", "-show_entries", "packet=codec_type,pts_time"])
        .args(["-of", "csv=p=0"])
        .arg(file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut by: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    for line in text.lines() {
        let mut f = line.split(',');
        if let (Some(kind), Some(pts)) = (f.next(), f.next()) {
            if let Ok(p) = pts.parse::<f64>() {
                by.entry(kind.to_owned()).or_default().push(p);
            }
        }
    }
    by.into_iter()
        .map(|(k, v)| {
            let first = v.iter().copied().fold(f64::MAX, f64::min);
            let last = v.iter().copied().fold(f64::MIN, f64::max);
            (k, v.len(), first, last)
        })
        .collect()
}

/// Checks a recording: decodes cleanly, ~30 fps video and AAC audio over about
/// `seconds`, the two within 50 ms of each other at both ends.
fn check_recording(file: &Path, seconds: f64) {
    let errors = decode_errors(file);
    assert!(errors.trim().is_empty(), "decoding {file:?}: {errors}");
    let streams = packets(file);
    let video = streams.iter().find(|s| s.0 == "video").expect("video");
    let audio = streams.iter().find(|s| s.0 == "audio").expect("audio");
    let video_span = video.3 - video.2;
    assert!(
        (video_span - seconds).abs() < 1.0,
        "video lasts {video_span:.2} s, expected about {seconds}"
    );
    let fps = (video.1 - 1) as f64 / video_span;
    assert!((fps - 30.0).abs() < 1.5, "{fps:.2} fps");
    // 1024-sample AAC frames at 44.1 kHz: 43 per second.
    let aps = audio.1 as f64 / (audio.3 - audio.2);
    assert!((aps - 43.07).abs() < 2.0, "{aps:.2} AAC frames per second");
    assert!(
        (audio.2 - video.2).abs() < 0.05,
        "starts: audio {} video {}",
        audio.2,
        video.2
    );
    assert!(
        (audio.3 - video.3).abs() < 0.1,
        "ends: audio {} video {}",
        audio.3,
        video.3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rtmp_push_plays_over_rtmp_and_http_flv_from_start_and_mid_stream() {
    let t = server().await;
    let rtmp = t.server.rtmp_addr.unwrap();
    let http = t.server.http_addr;
    let push = format!("rtmp://{rtmp}/live/show?{}", credentials(&t, "host", 0xff));
    let mut ffmpeg = common::source::ffmpeg_push(&push, 6);
    wait_for_publish(&t, &mut ffmpeg).await;

    let dir = tempfile::tempdir().unwrap();
    // An RTMP player with room credentials (receive privileges only).
    let rtmp_play = format!(
        "rtmp://{rtmp}/live/show?{}",
        credentials(&t, "watcher", 0x02 | 0x08 | 0x20)
    );
    let rtmp_out = dir.path().join("rtmp.flv");
    let mut p1 = player(&rtmp_play, &rtmp_out);
    // An HTTP-FLV player with a txSecret play URL, joining two seconds later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let key = t.config.apps[0].live_play_key.clone().unwrap();
    let flv_play = weir::auth::live_url::sign_url(
        &format!("http://{http}/live/show.flv"),
        &key,
        weir::auth::unix_now() + 600,
    )
    .unwrap();
    let flv_out = dir.path().join("http.flv");
    let mut p2 = player(&flv_play, &flv_out);

    assert!(ffmpeg.wait().await.unwrap().success(), "push");
    for (p, name) in [(&mut p1, "rtmp"), (&mut p2, "http-flv")] {
        let status = tokio::time::timeout(Duration::from_secs(10), p.wait())
            .await
            .unwrap_or_else(|_| panic!("{name} player ends with the stream"))
            .unwrap();
        assert!(status.success(), "{name} player");
    }
    // The RTMP player joined ~0.7 s in, the HTTP-FLV one ~2.7 s in (the GOP cache
    // gives each the current GOP at once).
    check_recording(&rtmp_out, 5.3);
    check_recording(&flv_out, 3.3);
    let metrics = t.metrics().await;
    for needle in [
        "weir_play_requests_total{outcome=\"ok\",protocol=\"rtmp\"} 1",
        "weir_play_requests_total{outcome=\"ok\",protocol=\"http-flv\"} 1",
    ] {
        assert!(metrics.contains(needle), "{needle}:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn play_urls_without_valid_credentials_are_refused() {
    let t = server().await;
    let rtmp = t.server.rtmp_addr.unwrap();
    let http = t.server.http_addr;
    let push = format!("rtmp://{rtmp}/live/show?{}", credentials(&t, "host", 0xff));
    let mut ffmpeg = common::source::ffmpeg_push(&push, 4);
    wait_for_publish(&t, &mut ffmpeg).await;

    // No receive privilege.
    let no_recv = format!(
        "rtmp://{rtmp}/live/show?{}",
        credentials(&t, "blind", 0x02 | 0x04 | 0x10)
    );
    let out = tokio::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i", &no_recv, "-t", "1", "-f", "null", "-"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("neither receiving"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // HTTP-FLV: no credentials, a forged signature, a stream that is not live.
    let get = |path: String| async move { common::http_get(http, &path).await };
    assert!(get("/live/show.flv".into())
        .await
        .starts_with("HTTP/1.0 403"));
    let forged = weir::auth::live_url::sign_url(
        &format!("http://{http}/live/show.flv"),
        "wrong-key",
        weir::auth::unix_now() + 600,
    )
    .unwrap();
    let path = forged.split_once(&http.to_string()).unwrap().1.to_owned();
    let answer = get(path).await;
    assert!(answer.starts_with("HTTP/1.0 403"), "{answer}");
    // Without credentials nothing says whether a stream exists; with them, it is a 404.
    assert!(get("/live/nothing.flv".into())
        .await
        .starts_with("HTTP/1.0 403"));
    let key = t.config.apps[0].live_play_key.clone().unwrap();
    let signed = weir::auth::live_url::sign_url(
        &format!("http://{http}/live/nothing.flv"),
        &key,
        weir::auth::unix_now() + 600,
    )
    .unwrap();
    let path = signed.split_once(&http.to_string()).unwrap().1.to_owned();
    assert!(get(path).await.starts_with("HTTP/1.0 404"));
    assert!(ffmpeg.wait().await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webrtc_publisher_plays_over_rtmp_and_http_flv() {
    use weir_signaling::ClientMessage;
    let t = server().await;
    let rtmp = t.server.rtmp_addr.unwrap();
    let http = t.server.http_addr;
    let seconds = 6;
    let (mut signal, stream_id, sender, _relay, _peer) =
        webrtc_publisher(&t, "alice", ROOM, seconds, None).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let dir = tempfile::tempdir().unwrap();
    let rtmp_play = format!(
        "rtmp://{rtmp}/live/{}?{}",
        stream_id,
        credentials(&t, "watcher", 0x02 | 0x08 | 0x20)
    );
    let rtmp_out = dir.path().join("rtmp.flv");
    let mut p1 = player(&rtmp_play, &rtmp_out);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let key = t.config.apps[0].live_play_key.clone().unwrap();
    let flv_play = weir::auth::live_url::sign_url(
        &format!("http://{http}/live/{}.flv", stream_id),
        &key,
        weir::auth::unix_now() + 600,
    )
    .unwrap();
    let flv_out = dir.path().join("http.flv");
    let mut p2 = player(&flv_play, &flv_out);

    sender.await.unwrap();
    // Unpublishing ends the stream for its players.
    signal
        .send(&ClientMessage::Unpublish { screen: false })
        .await;
    for (p, name) in [(&mut p1, "rtmp"), (&mut p2, "http-flv")] {
        let status = tokio::time::timeout(Duration::from_secs(10), p.wait())
            .await
            .unwrap_or_else(|_| panic!("{name} player ends with the stream"))
            .unwrap();
        assert!(status.success(), "{name} player");
    }
    for (file, from) in [(&rtmp_out, 1.0), (&flv_out, 2.5)] {
        let errors = decode_errors(file);
        assert!(errors.trim().is_empty(), "decoding {file:?}: {errors}");
        let streams = packets(file);
        let v = streams.iter().find(|s| s.0 == "video").expect("video");
        let a = streams
            .iter()
            .find(|s| s.0 == "audio")
            .expect("audio (AAC)");
        let span = v.3 - v.2;
        let expected = f64::from(seconds) - from;
        // This publisher plays a file, so it cannot answer the keyframe request a new
        // player triggers: a player starts at the GOP cache (up to 1 s earlier) or at
        // the file's next keyframe (up to 1 s later).
        assert!(
            span <= expected + 1.1 && span >= expected - 1.4,
            "{file:?}: video {span:.2} s, sent {expected:.2}"
        );
        let fps = (v.1 - 1) as f64 / span;
        assert!((fps - 30.0).abs() < 1.5, "{file:?}: {fps:.2} fps");
        let aps = a.1 as f64 / (a.3 - a.2);
        assert!(
            (aps - 46.875).abs() < 2.0,
            "{file:?}: {aps:.2} AAC frames/s"
        );
        // Audio may start before the first keyframe, never after the video.
        assert!(
            a.2 <= v.2 + 0.05,
            "{file:?}: starts audio {} video {}",
            a.2,
            v.2
        );
        // Both were sent until the same moment: on one clock they end together, but
        // for the audio a live AAC encoder never flushes (its delay plus the partial
        // frame in the FIFO: up to ~65 ms at 48 kHz).
        assert!(
            v.3 - a.3 > -0.05 && v.3 - a.3 < 0.1,
            "{file:?}: ends audio {} video {}",
            a.3,
            v.3
        );
    }
    let metrics = t.metrics().await;
    let plis = metrics
        .lines()
        .find(|l| l.starts_with("weir_plis_total{direction=\"to_publisher\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(
        plis >= 2,
        "each arriving player asks the publisher for a keyframe: {plis}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_percent_loss_upstream_recovers_at_keyframes() {
    use weir_signaling::ClientMessage;
    let t = server().await;
    let rtmp = t.server.rtmp_addr.unwrap();
    let seconds = 8;
    let (mut signal, stream_id, sender, relay, _peer) =
        webrtc_publisher(&t, "alice", ROOM, seconds, Some(50)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "rtmp://{rtmp}/live/{stream_id}?{}",
        credentials(&t, "watcher", 0x02 | 0x08 | 0x20)
    );
    let out = dir.path().join("lossy.flv");
    let mut p = player(&url, &out);
    sender.await.unwrap();
    signal
        .send(&ClientMessage::Unpublish { screen: false })
        .await;
    let status = tokio::time::timeout(Duration::from_secs(10), p.wait())
        .await
        .expect("the player ends with the stream")
        .unwrap();
    assert!(status.success());
    let lost = relay
        .as_ref()
        .unwrap()
        .dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(lost >= 20, "the relay lost {lost} packets");
    // Whatever was lost and not retransmitted in time, the output never carries a
    // broken picture: it resumes at keyframes and decodes cleanly.
    let errors = decode_errors(&out);
    assert!(errors.trim().is_empty(), "decoding: {errors}");
    let streams = packets(&out);
    let v = streams.iter().find(|s| s.0 == "video").expect("video");
    assert!(
        v.3 - v.2 > f64::from(seconds) - 2.5,
        "video {:.2} s",
        v.3 - v.2
    );
    let metrics = t.metrics().await;
    let converted = common::metric(
        &metrics,
        "weir_flv_frames_total{kind=\"video\",outcome=\"converted\"}",
    );
    let dropped = common::metric(
        &metrics,
        "weir_flv_frames_total{kind=\"video\",outcome=\"dropped_loss\"}",
    );
    let recoveries = common::metric(&metrics, "weir_flv_loss_recovery_seconds_count");
    let recovery_s = common::metric(&metrics, "weir_flv_loss_recovery_seconds_sum");
    eprintln!(
        "lost {lost} RTP packets upstream (and every retransmission); FLV video frames \
         converted {converted}, dropped {dropped}; {recoveries} recoveries, mean {:.0} ms",
        if recoveries > 0.0 {
            recovery_s / recoveries * 1000.0
        } else {
            0.0
        }
    );
    assert!(converted > 100.0, "{converted}");
    assert!(recoveries >= 1.0, "losses were recovered at keyframes");
    // This publisher plays a file and cannot answer the keyframe request, so each
    // recovery waits for the file's next keyframe: at most a GOP (1 s) plus the wait.
    assert!(
        recovery_s / recoveries < 1.2,
        "mean recovery {recovery_s}/{recoveries}"
    );
}

/// One FLV tag as a throttled reader saw it: when it arrived, its kind, timestamp and
/// whether it is a sequence header or a keyframe.
#[derive(Debug, Clone, Copy)]
struct SeenTag {
    at: f64,
    kind: u8,
    timestamp: u32,
    header: bool,
    keyframe: bool,
}

/// Plays an HTTP-FLV URL over a plain socket with a small receive buffer, reading at
/// most `bytes_per_s`, until the stream ends or `limit` passes.
async fn throttled_http_flv(
    http: std::net::SocketAddr,
    path: &str,
    bytes_per_s: usize,
    limit: Duration,
) -> Vec<SeenTag> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8 * 1024).unwrap();
    let mut s = socket.connect(http).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: weir\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let start = std::time::Instant::now();
    let tick = Duration::from_millis(20);
    let per_tick = bytes_per_s * tick.as_millis() as usize / 1000;
    let mut buf = Vec::new();
    let mut body_at = None;
    let mut pos = 0;
    let mut seen = Vec::new();
    let mut chunk = vec![0u8; per_tick];
    while start.elapsed() < limit {
        let n = match tokio::time::timeout(Duration::from_secs(3), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        if body_at.is_none() {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                assert!(buf.starts_with(b"HTTP/1.0 200") || buf.starts_with(b"HTTP/1.1 200"));
                body_at = Some(i + 4);
                pos = i + 4 + 13; // FLV header and the first PreviousTagSize
            }
        }
        if body_at.is_some() {
            // Every complete tag: 11-byte header, body, 4-byte PreviousTagSize.
            while buf.len() >= pos + 11 {
                let size =
                    u32::from_be_bytes([0, buf[pos + 1], buf[pos + 2], buf[pos + 3]]) as usize;
                if buf.len() < pos + 11 + size + 4 {
                    break;
                }
                let timestamp =
                    u32::from_be_bytes([buf[pos + 7], buf[pos + 4], buf[pos + 5], buf[pos + 6]]);
                let body = &buf[pos + 11..pos + 11 + size];
                let kind = buf[pos];
                let header = size >= 2
                    && ((kind == 9 && body[0] & 0x0f == 7) || (kind == 8 && body[0] >> 4 == 10))
                    && body[1] == 0;
                seen.push(SeenTag {
                    at: start.elapsed().as_secs_f64(),
                    kind,
                    timestamp,
                    header,
                    keyframe: kind == 9 && body[0] >> 4 == 1,
                });
                pos += 11 + size + 4;
            }
        }
        tokio::time::sleep(tick).await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_player_is_cut_back_to_keyframes_and_a_normal_one_is_not() {
    let t = server().await;
    let rtmp = t.server.rtmp_addr.unwrap();
    let http = t.server.http_addr;
    let push = format!("rtmp://{rtmp}/live/busy?{}", credentials(&t, "host", 0xff));
    // About 600 kbit/s of video and 128 kbit/s of audio: ~90 kB/s.
    let seconds = 12;
    let mut ffmpeg = tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc=size=640x360:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=44100"])
        .args(["-t", &seconds.to_string()])
        .args([
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-preset",
            "ultrafast",
        ])
        .args(["-tune", "zerolatency", "-bf", "0", "-g", "30"])
        .args(["-b:v", "600k", "-maxrate", "600k", "-bufsize", "300k"])
        .args(["-c:a", "aac", "-b:a", "128k", "-ar", "44100", "-ac", "2"])
        .args(["-f", "flv", &push])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Players come once the push is on (a fixed 700 ms was too short for ffmpeg's
    // start on a loaded CI machine: the slow player got a 404).
    wait_for_publish(&t, &mut ffmpeg).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let normal_url = format!(
        "rtmp://{rtmp}/live/busy?{}",
        credentials(&t, "watcher", 0x02 | 0x08 | 0x20)
    );
    let normal_out = dir.path().join("normal.flv");
    let mut normal = player(&normal_url, &normal_out);
    let key = t.config.apps[0].live_play_key.clone().unwrap();
    let slow_url = weir::auth::live_url::sign_url(
        &format!("http://{http}/live/busy.flv"),
        &key,
        weir::auth::unix_now() + 600,
    )
    .unwrap();
    let path = slow_url.split_once(&http.to_string()).unwrap().1.to_owned();
    // While the stream is live (it ends at 12 s), the drops are in /metrics.
    let metrics_addr = t.server.metrics_addr.unwrap();
    let live_metrics = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(9)).await;
        common::http_get(metrics_addr, "/metrics").await
    });
    // Reads at less than half the stream's rate.
    let seen = throttled_http_flv(http, &path, 40_000, Duration::from_secs(20)).await;
    assert!(ffmpeg.wait().await.unwrap().success(), "push");
    let status = tokio::time::timeout(Duration::from_secs(10), normal.wait())
        .await
        .expect("the normal player ends with the stream")
        .unwrap();
    assert!(status.success());

    // The normal player got everything, undisturbed.
    check_recording(&normal_out, f64::from(seconds) - 0.7);

    // The slow one: media time vs arrival time. Its lag is the arrival minus the
    // timestamp, against the smallest such difference (the start).
    let video: Vec<&SeenTag> = seen.iter().filter(|t| t.kind == 9).collect();
    assert!(video.len() > 10, "{} video tags", video.len());
    let base = seen
        .iter()
        .map(|t| t.at - f64::from(t.timestamp) / 1000.0)
        .fold(f64::MAX, f64::min);
    let lag = |t: &SeenTag| t.at - f64::from(t.timestamp) / 1000.0 - base;
    let max_lag = seen.iter().map(lag).fold(0.0, f64::max);
    eprintln!(
        "slow player: {} tags, {} video, max lag {max_lag:.2} s",
        seen.len(),
        video.len()
    );
    // After each jump forward the video resumes with headers and a keyframe.
    let mut jumps = 0;
    for w in video.windows(2) {
        if w[1].timestamp > w[0].timestamp + 200 {
            jumps += 1;
            assert!(
                w[1].header || w[1].keyframe,
                "after a skip from {} to {} the video resumes at a keyframe",
                w[0].timestamp,
                w[1].timestamp
            );
        }
    }
    assert!(jumps >= 2, "the slow player was cut back ({jumps} skips)");
    let metrics = live_metrics.await.unwrap();
    let dropped = common::metric(&metrics, "weir_player_dropped_tags_total{stream=\"busy\"}");
    assert!(dropped > 0.0, "drops are counted per stream");
    // The stream has ended: its series is gone (label sets stay bounded).
    let metrics = t.metrics().await;
    assert!(!metrics.contains("weir_player_dropped_tags_total{stream=\"busy\"}"));
    // Reading under half the stream, an unbounded queue would leave it > 5 s behind at
    // the end (13 s it was, before unsent bytes in the kernel were limited; 1.9-3.6 s
    // while the writer took the whole queue at a time and hyper buffered up to 400 KiB).
    // It stays within the queue limit (0.5 s, more at the start, with the GOP cache)
    // plus what lies outside the queue at this rate: a 16 KiB batch, 16 KiB in hyper,
    // 16 KiB unsent in the kernel and the receive window (~1.5 s at 40 kB/s).
    assert!(
        max_lag < 2.5,
        "the slow player's lag stayed bounded: {max_lag:.2} s"
    );
}

/// Waits (up to 15 s) until an RTMP pusher is publishing on the server. If it is not,
/// says whether the pusher (`ffmpeg`) is still running and where the server's RTMP
/// connections stand (handshake, publish, play, refused), so that a failure in CI says
/// which side stalled.
async fn wait_for_publish(t: &TestServer, ffmpeg: &mut tokio::process::Child) {
    for _ in 0..300 {
        let m = t.metrics().await;
        if m.lines()
            .any(|l| l.starts_with("weir_rtmp_connections{role=\"publish\"}") && !l.ends_with(" 0"))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pusher = match ffmpeg.try_wait() {
        Ok(None) => "still running".to_owned(),
        Ok(Some(status)) => format!("exited: {status}"),
        Err(e) => format!("unknown: {e}"),
    };
    let m = t.metrics().await;
    let rtmp: Vec<&str> = m
        .lines()
        .filter(|l| !l.starts_with('#') && (l.contains("rtmp") || l.contains("connections")))
        .collect();
    panic!(
        "no RTMP push was published within 15 s; the pusher (ffmpeg) is {pusher}; the \
         server's RTMP and connection series:\n{}",
        rtmp.join("\n")
    );
}

/// RTMPS: with a certificate, the RTMPS listener takes a push and serves a player over
/// TLS (ffmpeg both ways, the recording checked as over plain RTMP); plain RTMP on that
/// port gets nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtmps_pushes_and_plays_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();
    let t = TestServer::start_with(|c| {
        c.server.rtmp_addr = String::new();
        c.server.rtmps_addr = "127.0.0.1:0".into();
        c.server.tls_cert_file = cert_file.display().to_string();
        c.server.tls_key_file = key_file.display().to_string();
    })
    .await;
    assert!(t.server.rtmp_addr.is_none());
    let rtmps = t.server.rtmps_addr.expect("the RTMPS listener");

    // Plain RTMP to the TLS port: refused before anything is published.
    let plain = format!(
        "rtmp://{rtmps}/live/secure?{}",
        credentials(&t, "host", 0xff)
    );
    let mut wrong = common::source::ffmpeg_push(&plain, 2);
    let status = tokio::time::timeout(Duration::from_secs(20), wrong.wait())
        .await
        .expect("a plain push to the RTMPS port ends")
        .unwrap();
    assert!(!status.success(), "plain RTMP on the RTMPS port");

    let push = format!(
        "rtmps://{rtmps}/live/secure?{}",
        credentials(&t, "host", 0xff)
    );
    let mut ffmpeg = common::source::ffmpeg_push(&push, 5);
    wait_for_publish(&t, &mut ffmpeg).await;
    let play = format!(
        "rtmps://{rtmps}/live/secure?{}",
        credentials(&t, "watcher", 0x02 | 0x08 | 0x20)
    );
    let out = dir.path().join("rtmps.flv");
    let mut player = player(&play, &out);
    assert!(ffmpeg.wait().await.unwrap().success(), "push");
    let status = tokio::time::timeout(Duration::from_secs(10), player.wait())
        .await
        .expect("the RTMPS player ends with the stream")
        .unwrap();
    assert!(status.success(), "RTMPS player");
    check_recording(&out, 4.0);
    let m = t.metrics().await;
    assert!(
        m.contains("weir_play_requests_total{outcome=\"ok\",protocol=\"rtmp\"} 1"),
        "{m}"
    );
}
