//! Every stream plays over RTMP and HTTP-FLV: ffmpeg pushes, ffmpeg players (RTMP with
//! room credentials, HTTP-FLV with a txSecret play URL) record what they get, and
//! ffprobe/ffmpeg check it decodes, at the right rate, with audio and video together.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{TestServer, APP};
use weir::auth::{Privileges, RoomId, TokenKind};

const ROOM: u32 = 777;

async fn server() -> TestServer {
    TestServer::start_with(|c| c.server.rtmp_addr = "127.0.0.1:0".into()).await
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn credentials(t: &TestServer, user: &str, privileges: u32) -> String {
    let now = weir::auth::unix_now();
    let sig = t
        .app
        .issue_user_sig(TokenKind::V2, user, now, 3600)
        .unwrap();
    let pmk = t
        .app
        .issue_private_map_key(
            TokenKind::V2,
            user,
            &RoomId::Num(ROOM),
            Privileges(privileges),
            now,
            3600,
        )
        .unwrap();
    format!(
        "sdkappid={APP}&userid={user}&roomid={ROOM}&usersig={}&privatemapkey={}",
        enc(&sig),
        enc(&pmk)
    )
}

fn pusher(url: &str, seconds: u32) -> tokio::process::Child {
    tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc=size=320x240:rate=30"])
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
        .args(["-c:a", "aac", "-ar", "44100", "-ac", "2"])
        .args(["-f", "flv", url])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("ffmpeg runs (scripts/install-deps.sh test installs it)")
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

fn decode_errors(file: &Path) -> String {
    let out = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(file)
        .args(["-f", "null", "-"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stderr).to_string()
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
    let mut ffmpeg = pusher(&push, 6);
    tokio::time::sleep(Duration::from_millis(700)).await;

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
    let mut ffmpeg = pusher(&push, 4);
    tokio::time::sleep(Duration::from_millis(700)).await;

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
