//! Chrome as a client: headless Chromium with fake camera and microphone, driven over
//! the DevTools protocol, using the SDK the server serves (`/sdk/weir.js`) and the demo
//! page at `/`. Real media end to end: Chrome's encoders and decoders, ffmpeg pushers
//! and players.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::browser::{Browser, Js};
use common::firefox::Firefox;
use common::TestServer;
use serde_json::Value;

const ROOM: u32 = 4321;

async fn server() -> TestServer {
    TestServer::start().await
}

/// SDK options (credentials) for `user` in [`ROOM`].
fn options(t: &TestServer, user: &str) -> String {
    serde_json::to_string(&t.join(user, ROOM, 0xff)).unwrap()
}

fn page_url(t: &TestServer) -> String {
    format!("http://{}/", t.server.http_addr)
}

/// Joins with the SDK in `page`; publishes if `publish`. Returns the own stream id.
async fn sdk_join(page: &impl Js, options: &str, publish: bool) -> Value {
    let publish = publish.then_some("{ audio: true, video: true }");
    sdk_join_with(page, options, publish).await
}

/// Joins with the SDK in `page`; publishes with `publish` (the SDK's publish options,
/// as JavaScript) if given. Returns the own stream id.
async fn sdk_join_with(page: &impl Js, options: &str, publish: Option<&str>) -> Value {
    let publish = publish.unwrap_or("null");
    page.eval(&format!(
        r#"(async () => {{
            const {{ WeirRoom }} = await import('/sdk/weir.js');
            const room = new WeirRoom({options});
            window.room = room;
            window.maxAudioLevel = {{}};
            // Chrome decodes (and measures) remote audio that is played out.
            room.on('remoteStream', ({{ stream }}) => {{
                const v = document.createElement('video');
                v.autoplay = true;
                v.srcObject = stream;
                document.body.append(v);
                v.play().catch(() => {{}});
            }});
            await room.join();
            const publish = {publish};
            if (publish) await room.publish(publish);
            return room.ownStream ? room.ownStream.streamId : null;
        }})()"#
    ))
    .await
}

/// What `page` receives of `stream_id`: frames decoded, the video size, the largest
/// audio level seen so far, total audio energy.
async fn received(page: &impl Js, stream_id: &str) -> Value {
    page.eval(&format!(
        r#"(async () => {{
            const all = await window.room.getStats();
            const s = all.get({id});
            if (!s) return null;
            const prev = window.maxAudioLevel[{id}] || 0;
            const level = Math.max(prev, s.audio.audioLevel || 0);
            window.maxAudioLevel[{id}] = level;
            return {{ frames: s.video.framesDecoded || 0, width: s.video.width || 0,
                     height: s.video.height || 0, audioLevel: level,
                     energy: s.audio.totalAudioEnergy || 0,
                     videoCodec: s.video.codec || null, audioCodec: s.audio.codec || null,
                     audioPackets: s.audio.packetsReceived || 0 }};
        }})()"#,
        id = serde_json::to_string(stream_id).unwrap()
    ))
    .await
}

/// Polls until `page` has decoded video and heard audio of `stream_id`.
async fn sees_and_hears(page: &impl Js, stream_id: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..100 {
        last = received(page, stream_id).await;
        let frames = last["frames"].as_u64().unwrap_or(0);
        let level = last["audioLevel"].as_f64().unwrap_or(0.0);
        if frames > 10 && level > 0.0 {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let state = page
        .eval(
            "JSON.stringify({streams: [...window.room.streams.keys()], \
             sdp: window.room.subscriber && window.room.subscriber.remoteDescription \
             && window.room.subscriber.remoteDescription.sdp, \
             conn: window.room.subscriber && window.room.subscriber.connectionState})",
        )
        .await;
    panic!(
        "no video and audio of {stream_id} after 20 s: {last}\nstate: {}\nconsole:\n{}",
        state.as_str().unwrap_or(""),
        page.console_dump()
    );
}

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_chrome_tabs_see_and_hear_each_other() {
    let t = server().await;
    let browser = Browser::launch().await;
    let alice = browser.open(&page_url(&t)).await;
    let bob = browser.open(&page_url(&t)).await;
    let a_stream = sdk_join(&alice, &options(&t, "alice"), true).await;
    let b_stream = sdk_join(&bob, &options(&t, "bob"), true).await;
    let a_stream = a_stream.as_str().expect("alice publishes").to_owned();
    let b_stream = b_stream.as_str().expect("bob publishes").to_owned();

    let at_bob = sees_and_hears(&bob, &a_stream).await;
    let at_alice = sees_and_hears(&alice, &b_stream).await;
    eprintln!("bob receives alice: {at_bob}\nalice receives bob: {at_alice}");
    for r in [&at_bob, &at_alice] {
        // The SDK prefers H.264 so that RTMP players need no transcoding.
        assert_eq!(r["videoCodec"], "video/H264", "{r}");
        assert_eq!(r["audioCodec"], "audio/opus", "{r}");
        assert!(r["width"].as_u64().unwrap() >= 320, "{r}");
    }
    // Chrome sends the 10 ms audio packets Weir's answer asks for (`a=ptime:10`,
    // `publisher_audio_ptime_ms`): a hundred a second, not its own fifty.
    let packets = |r: &Value| r["audioPackets"].as_f64().unwrap_or(0.0);
    let before = received(&bob, &a_stream).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = received(&bob, &a_stream).await;
    let per_second = (packets(&after) - packets(&before)) / 2.0;
    assert!(
        (85.0..=115.0).contains(&per_second),
        "{per_second} audio packets a second from alice"
    );

    // Text messages reach the other tab.
    bob.eval(r#"window.texts = []; window.room.on('textMessage', (m) => window.texts.push(m));"#)
        .await;
    alice
        .eval(r#"window.room.sendTextMsg('hello from alice')"#)
        .await;
    assert!(
        bob.wait_for(
            "window.texts.some((m) => m.userID === 'alice' && m.text === 'hello from alice')",
            Duration::from_secs(5)
        )
        .await
    );

    // Alice leaves: bob is told and drops her stream.
    bob.eval(r#"window.gone = []; window.room.on('streamRemoved', (s) => window.gone.push(s.streamId));"#)
        .await;
    alice.eval("window.room.leave()").await;
    assert!(
        bob.wait_for(
            &format!(
                "window.gone.includes({})",
                serde_json::to_string(&a_stream).unwrap()
            ),
            Duration::from_secs(5)
        )
        .await
    );
}

/// A second browser engine: Firefox (over WebDriver BiDi; here without OpenH264, so
/// VP8 is its only common video codec with Chrome) and Chrome in one room see and
/// hear each other through the SDK. Chrome publishes VP8 for it (`videoCodec`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firefox_and_chrome_see_and_hear_each_other() {
    // Firefox pairs no candidate with a loopback one (its ICE leaves 127.0.0.1 out,
    // whatever the preferences say), so this server listens on every interface and
    // announces the host's own address, as a real deployment does.
    let t = TestServer::start_with(|c| {
        c.server.udp_addr = "0.0.0.0:0".into();
        c.server.tcp_addr = "0.0.0.0:0".into();
        c.server.announce_ips = Vec::new();
    })
    .await;
    let (chrome, firefox) = tokio::join!(Browser::launch(), Firefox::launch());
    let c = chrome.open(&page_url(&t)).await;
    let f = firefox.open(&page_url(&t)).await;
    let c_stream = sdk_join_with(
        &c,
        &options(&t, "chrome"),
        Some("{ audio: true, video: true, videoCodec: 'vp8' }"),
    )
    .await;
    let f_stream = sdk_join(&f, &options(&t, "firefox"), true).await;
    let c_stream = c_stream.as_str().expect("chrome publishes").to_owned();
    let f_stream = f_stream.as_str().expect("firefox publishes").to_owned();

    let at_firefox = sees_and_hears(&f, &c_stream).await;
    let at_chrome = sees_and_hears(&c, &f_stream).await;
    eprintln!("firefox receives chrome: {at_firefox}\nchrome receives firefox: {at_chrome}");
    for r in [&at_firefox, &at_chrome] {
        assert_eq!(r["videoCodec"], "video/VP8", "{r}");
        assert_eq!(r["audioCodec"], "audio/opus", "{r}");
        assert!(r["width"].as_u64().unwrap() >= 320, "{r}");
    }

    // Firefox leaves: Chrome is told.
    c.eval(r#"window.gone = []; window.room.on('streamRemoved', (s) => window.gone.push(s.streamId));"#)
        .await;
    f.eval("window.room.leave()").await;
    assert!(
        c.wait_for(
            &format!(
                "window.gone.includes({})",
                serde_json::to_string(&f_stream).unwrap()
            ),
            Duration::from_secs(5)
        )
        .await
    );
}

fn rtmp_pusher(url: &str, seconds: u32) -> tokio::process::Child {
    tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc=size=640x360:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
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

fn query(t: &TestServer, user: &str, privileges: u32) -> String {
    let j = t.join(user, ROOM, privileges);
    let enc = |s: &str| -> String { url::form_urlencoded::byte_serialize(s.as_bytes()).collect() };
    format!(
        "sdkappid={}&userid={user}&roomid={ROOM}&usersig={}&privatemapkey={}",
        j.sdk_app_id,
        enc(&j.user_sig),
        enc(&j.private_map_key)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chrome_receives_an_rtmp_pusher() {
    let t = server().await;
    let rtmp = t.server.rtmp_addr.unwrap();
    let stream = format!("{}_{ROOM}_pusher_main", common::APP);
    // The browser first: on a loaded 2-core machine its start took 18 s in CI, and a
    // push started before it had ended by the time the viewer joined.
    let browser = Browser::launch().await;
    let viewer = browser.open(&page_url(&t)).await;
    let mut ffmpeg = rtmp_pusher(
        &format!("rtmp://{rtmp}/live/{stream}?{}", query(&t, "pusher", 0xff)),
        30,
    );
    sdk_join(&viewer, &options(&t, "viewer"), false).await;
    let got = sees_and_hears(&viewer, &stream).await;
    eprintln!("Chrome receives the RTMP pusher: {got}");
    assert_eq!(got["videoCodec"], "video/H264");
    assert_eq!(got["audioCodec"], "audio/opus", "AAC arrives as Opus");
    assert_eq!(got["width"], 640);
    assert_eq!(got["height"], 360);
    let source = viewer
        .eval(&format!("window.room.streams.get('{stream}').info.source"))
        .await;
    assert_eq!(source, "rtmp");
    // A clean path (loopback) is never told `warning`: not at the subscriber's first
    // feedback (the estimate's ceiling was 100 kbit/s before any rate was measured),
    // nor at keyframes (the ceiling followed the stream's own rate between two of
    // them, and a keyframe read as a deficit: measured, `warning` every 2 s).
    // Eight of the pusher's keyframes (1 s GOP), with congestion control running on
    // Chrome's feedback all along (the estimate histogram counts its estimates).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let metrics = t.metrics().await;
    assert!(common::metric(&metrics, "weir_bwe_estimate_bps_count") > 0.0);
    let warned: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("weir_congestion_state_changes_total{"))
        .filter(|l| !l.contains("state=\"normal\""))
        .collect();
    assert!(warned.is_empty(), "a clean path told otherwise: {warned:?}");
    ffmpeg.kill().await.unwrap();
}

/// Records `url` for `seconds` (stream copy) and returns (video packets, audio
/// packets, decode errors).
async fn record(url: &str, seconds: u32, out: &Path) -> (usize, usize, String) {
    let status = tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error", "-i", url])
        .args(["-t", &seconds.to_string(), "-c", "copy", "-f", "flv", "-y"])
        .arg(out)
        .stdin(Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(status.success(), "ffmpeg plays {url}");
    let probe = std::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "packet=codec_type",
            "-of",
            "csv=p=0",
        ])
        .arg(out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&probe.stdout).to_string();
    let video = text.lines().filter(|l| l.starts_with("video")).count();
    let audio = text.lines().filter(|l| l.starts_with("audio")).count();
    (video, audio, common::media::flv_decode_errors(out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_plays_a_chrome_publisher_over_rtmp_and_http_flv() {
    let t = server().await;
    let browser = Browser::launch().await;
    let chrome = browser.open(&page_url(&t)).await;
    let stream = sdk_join(&chrome, &options(&t, "chrome"), true).await;
    let stream = stream.as_str().expect("publishes").to_owned();
    // Chrome is sending before the players arrive.
    assert!(
        chrome
            .wait_for(
                "window.room.publisher && window.room.publisher.connectionState === 'connected'",
                Duration::from_secs(10)
            )
            .await,
        "Chrome's publisher connection: {}",
        browser.console_dump()
    );
    let dir = tempfile::tempdir().unwrap();
    let rtmp = format!(
        "rtmp://{}/live/{stream}?{}",
        t.server.rtmp_addr.unwrap(),
        query(&t, "player", 0x02 | 0x08 | 0x20)
    );
    let flv = format!(
        "http://{}/live/{stream}.flv?{}",
        t.server.http_addr,
        query(&t, "player2", 0x02 | 0x08 | 0x20)
    );
    let (rtmp_out, flv_out) = (dir.path().join("rtmp.flv"), dir.path().join("http.flv"));
    let (a, b) = tokio::join!(record(&rtmp, 4, &rtmp_out), record(&flv, 4, &flv_out));
    for ((video, audio, errors), name) in [(a, "RTMP"), (b, "HTTP-FLV")] {
        eprintln!("{name}: {video} video packets, {audio} audio packets");
        assert!(errors.trim().is_empty(), "{name} decodes cleanly: {errors}");
        // Four seconds of Chrome's camera (fake device: 30 fps, but Chrome may adapt)
        // and of AAC at 48 kHz (47 frames/s).
        assert!(video >= 40, "{name}: {video} video frames");
        assert!(audio >= 120, "{name}: {audio} AAC frames");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_shows_remote_video() {
    let t = server().await;
    let browser = Browser::launch().await;
    let base = page_url(&t);
    let alice = browser
        .open(&format!("{base}?room={ROOM}&user=alice&autojoin"))
        .await;
    assert!(
        alice
            .wait_for(
                "window.weirDemo.room && window.weirDemo.room.ownStream",
                Duration::from_secs(15)
            )
            .await,
        "alice joins and publishes: {}",
        browser.console_dump()
    );
    let bob = browser
        .open(&format!("{base}?room={ROOM}&user=bob&autojoin"))
        .await;
    // A remote tile whose video plays, with statistics filled in.
    let playing = "[...document.querySelectorAll('.tile:not(.local) video')]\
                   .some((v) => v.videoWidth > 0 && v.currentTime > 0.5)";
    for (name, page) in [("alice", &alice), ("bob", &bob)] {
        assert!(
            page.wait_for(playing, Duration::from_secs(20)).await,
            "{name} shows remote video: {}",
            browser.console_dump()
        );
    }
    assert!(
        alice
            .wait_for(
                "[...document.querySelectorAll('.tile:not(.local) .stats')]\
                 .some((s) => s.textContent.includes('fps'))",
                Duration::from_secs(5)
            )
            .await
    );
    // The page lists the room and gives a mini program push URL and play URLs.
    assert!(
        alice
            .wait_for(
                "document.getElementById('push-url').textContent.startsWith('rtmp://')",
                Duration::from_secs(5)
            )
            .await
    );
    let play = alice
        .eval("document.getElementById('play-urls').textContent")
        .await;
    assert!(play.as_str().unwrap().contains(".flv?sdkappid="), "{play}");
    let first_frame = bob.eval("window.weirDemo.firstFrameMs").await;
    eprintln!("bob: first remote frame {first_frame} ms after clicking join");
    assert!(first_frame.as_f64().is_some(), "the page measured it");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let shot = artifacts().join("demo-page.png");
    alice.screenshot(&shot).await;
    eprintln!("screenshot: {}", shot.display());
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_credentials_exist_only_in_development_mode() {
    let t = TestServer::start_with(|c| c.server.dev_mode = false).await;
    let http = t.server.http_addr;
    for path in ["/dev/credentials?userID=a&roomID=1", "/dev/rooms"] {
        let answer = common::http_get(http, path).await;
        assert!(answer.starts_with("HTTP/1.0 404"), "{path}: {answer}");
    }
    // The page and the SDK are there in any mode.
    for path in ["/", "/sdk/weir.js", "/app.js", "/style.css"] {
        let answer = common::http_get(http, path).await;
        assert!(answer.starts_with("HTTP/1.0 200"), "{path}: {answer}");
    }
    let dev = server().await;
    let answer = common::http_get(
        dev.server.http_addr,
        "/dev/credentials?userID=alice&roomID=99",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    // What it hands out verifies like any other credentials.
    let now = weir::auth::unix_now();
    dev.app
        .verify_user_sig(body["userSig"].as_str().unwrap(), "alice", now)
        .expect("the userSig verifies");
    assert!(body["pushUrl"]
        .as_str()
        .unwrap()
        .contains(&format!("/live/{}_99_alice_main?", common::APP)));
}

/// A viewer's network changes: its path to the server dies and its packets come from a
/// new address. The SDK restarts ICE within the session (`restartIce`), video goes on,
/// and it never rejoins. The page's view of the server's candidates is pointed at a
/// relay the test controls (Chrome's network cannot be cut otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_restarts_ice_after_a_network_change() {
    use common::relay::Relay;
    use std::sync::atomic::Ordering;
    let t = server().await;
    let rtmp = t.server.rtmp_addr.unwrap();
    let stream = format!("{}_{ROOM}_pusher_main", common::APP);
    let port = t.udp_addr().port();
    let first = Relay::start(t.udp_addr(), Box::new(|_| false)).await;
    // The browser first, so a slow start does not eat into the push.
    let browser = Browser::launch().await;
    let viewer = browser.open(&page_url(&t)).await;
    let mut ffmpeg = rtmp_pusher(
        &format!("rtmp://{rtmp}/live/{stream}?{}", query(&t, "pusher", 0xff)),
        30,
    );
    // Every remote description the page applies has the server's UDP candidate
    // rewritten to window.relayPort (and TCP candidates dropped).
    viewer
        .eval(&format!(
            r#"(() => {{
                window.relayPort = {relay};
                window.restarts = [];
                const apply = RTCPeerConnection.prototype.setRemoteDescription;
                RTCPeerConnection.prototype.setRemoteDescription = function (d) {{
                    const sdp = d.sdp
                        .replaceAll(' 127.0.0.1 {port} typ host', ' 127.0.0.1 ' + window.relayPort + ' typ host')
                        .split('\r\n').filter((l) => !l.includes(' tcp ')).join('\r\n');
                    return apply.call(this, {{ type: d.type, sdp }});
                }};
                return true;
            }})()"#,
            relay = first.addr.port()
        ))
        .await;
    sdk_join(&viewer, &options(&t, "viewer"), false).await;
    viewer
        .eval("window.room.on('reconnected', (d) => window.restarts.push(d)); true")
        .await;
    let got = sees_and_hears(&viewer, &stream).await;
    let frames_before = got["frames"].as_u64().unwrap_or(0);
    assert!(frames_before > 0, "{got}");

    // The network changes.
    let second = Relay::start(t.udp_addr(), Box::new(|_| false)).await;
    viewer
        .eval(&format!("window.relayPort = {}; true", second.addr.port()))
        .await;
    first.cut.store(true, Ordering::Relaxed);
    let cut = std::time::Instant::now();
    assert!(
        viewer
            .wait_for(
                "window.restarts.some((r) => r.iceRestart && r.target === 'subscriber')",
                Duration::from_secs(20)
            )
            .await,
        "the SDK restarted ICE: {}",
        browser.console_dump()
    );
    let restarted = cut.elapsed();
    let mut resumed = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let now = received(&viewer, &stream).await;
        if now["frames"].as_u64().unwrap_or(0) > frames_before + 30 {
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(resumed, "video goes on after the restart");
    let state = viewer.eval("window.room.state").await;
    assert_eq!(state, "joined", "no rejoin");
    let events = viewer.eval("JSON.stringify(window.restarts)").await;
    assert!(
        !events.as_str().unwrap_or("").contains("{}"),
        "never rejoined: {events}"
    );
    eprintln!("ICE restart in Chrome: reconnected {restarted:?} after the path died");
    ffmpeg.kill().await.unwrap();
}

/// Screen share: alice publishes her camera and shares her screen as the demo page
/// does (`publishScreen()`: `getDisplayMedia`, which headless Chromium answers with a
/// fake screen 800 wide); bob, in another tab, decodes it at that size beside her
/// camera (640×360). She stops, and shares again a canvas she paints magenta with a
/// moving bar (`publishScreen({stream})`): bob receives it as a stream with
/// `screen: true` and shows her colour, while her camera plays on. When she stops
/// sharing, the screen goes and the camera stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_screen_reaches_another_tab_beside_the_camera() {
    let t = server().await;
    let browser = Browser::launch().await;
    let alice = browser.open(&page_url(&t)).await;
    let bob = browser.open(&page_url(&t)).await;
    let camera = sdk_join(&alice, &options(&t, "alice"), true).await;
    let camera = camera.as_str().expect("alice publishes").to_owned();
    sdk_join(&bob, &options(&t, "bob"), false).await;
    bob.eval(
        r#"window.added = []; window.gone = [];
           window.room.on('streamAdded', (s) => window.added.push(s));
           window.room.on('streamRemoved', (s) => window.gone.push(s.streamId));"#,
    )
    .await;
    // The screen, as the demo page shares it.
    let first = alice
        .eval("window.room.publishScreen().then((info) => info.streamId)")
        .await;
    let first = first.as_str().expect("shared").to_owned();
    let mut last = Value::Null;
    for _ in 0..100 {
        last = received(&bob, &first).await;
        if last["frames"].as_u64().unwrap_or(0) > 10 && last["width"].as_u64() == Some(800) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("bob receives alice's getDisplayMedia screen: {last}");
    assert_eq!(last["width"], 800, "the fake screen's width: {last}");
    alice.eval("window.room.unpublishScreen()").await;
    assert!(
        bob.wait_for(
            &format!(
                "window.gone.includes({})",
                serde_json::to_string(&first).unwrap()
            ),
            Duration::from_secs(5)
        )
        .await
    );
    bob.eval("window.gone = []").await;
    // Shared again: a canvas of a known colour.
    let shared = alice
        .eval(
            r#"(async () => {
                const c = document.createElement('canvas');
                c.width = 1280; c.height = 720;
                document.body.append(c);
                const g = c.getContext('2d');
                let x = 0;
                window.painter = setInterval(() => {
                    g.fillStyle = '#ff00ff'; g.fillRect(0, 0, 1280, 720);
                    g.fillStyle = '#ffffff'; g.fillRect(x, 600, 80, 120);
                    x = (x + 16) % 1200;
                }, 66);
                const info = await window.room.publishScreen({ stream: c.captureStream(15) });
                return JSON.stringify(info);
            })()"#,
        )
        .await;
    let shared: Value = serde_json::from_str(shared.as_str().expect("shared")).unwrap();
    let screen = shared["streamId"].as_str().unwrap().to_owned();
    assert_eq!(shared["screen"], true, "{shared}");
    assert!(screen.ends_with("_alice_aux"), "{screen}");
    assert_eq!(shared["audio"], false);

    // Bob hears of it as a screen share, and decodes it beside the camera.
    assert!(
        bob.wait_for(
            "window.added.some((s) => s.screen && s.userID === 'alice')",
            Duration::from_secs(10)
        )
        .await
    );
    let at_bob = sees_and_hears(&bob, &camera).await;
    let mut last = Value::Null;
    for _ in 0..100 {
        last = received(&bob, &screen).await;
        if last["frames"].as_u64().unwrap_or(0) > 20 && last["width"].as_u64() == Some(1280) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("bob receives alice's camera: {at_bob}\nand her screen: {last}");
    assert!(last["frames"].as_u64().unwrap_or(0) > 20, "{last}");
    assert_eq!(last["width"], 1280, "the screen at its own size: {last}");
    assert_eq!(last["height"], 720, "{last}");
    assert!(
        at_bob["width"].as_u64().unwrap() < 1280,
        "the camera is not the screen"
    );
    // What bob shows is alice's screen: the colour she painted, away from the bar.
    let pixel = bob
        .eval(&format!(
            r#"(() => {{
                // The latest element for that stream (the first sharing's is ended).
                const v = [...document.querySelectorAll('video')].reverse()
                    .find((v) => v.srcObject && v.srcObject.id === {id} && v.videoWidth);
                if (!v || !v.videoWidth) return null;
                const c = document.createElement('canvas');
                c.width = v.videoWidth; c.height = v.videoHeight;
                const g = c.getContext('2d');
                g.drawImage(v, 0, 0);
                return Array.from(g.getImageData(640, 200, 1, 1).data);
            }})()"#,
            id = serde_json::to_string(&screen).unwrap()
        ))
        .await;
    let rgb: Vec<i64> = pixel
        .as_array()
        .unwrap_or_else(|| panic!("no video element shows the screen: {pixel}"))
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert!(
        rgb[0] > 200 && rgb[1] < 60 && rgb[2] > 200,
        "magenta expected: {rgb:?}"
    );

    // Alice stops sharing: the screen goes for bob, the camera plays on.
    let before = received(&bob, &camera).await["frames"]
        .as_u64()
        .unwrap_or(0);
    alice.eval("window.room.unpublishScreen()").await;
    assert!(
        bob.wait_for(
            &format!(
                "window.gone.includes({})",
                serde_json::to_string(&screen).unwrap()
            ),
            Duration::from_secs(5)
        )
        .await
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = received(&bob, &camera).await["frames"]
        .as_u64()
        .unwrap_or(0);
    if after <= before + 20 {
        // What bob's connection received, for whoever reads the failure.
        let stats = bob
            .eval(
                "(async () => { const o = []; \
                 (await window.room.subscriber.getStats()).forEach((x) => { \
                 if (x.type === 'inbound-rtp') o.push(x); }); return JSON.stringify(o); })()",
            )
            .await;
        panic!("the camera goes on: {before} → {after}\nbob's inbound RTP: {stats}");
    }
    let gone = bob.eval("JSON.stringify(window.gone)").await;
    assert!(
        !gone.as_str().unwrap_or("").contains(&camera),
        "only the screen went: {gone}"
    );
    let alice_state = alice
        .eval("JSON.stringify([window.room.sharing, window.room.screen, !!window.room.publisher])")
        .await;
    assert_eq!(
        alice_state, "[null,null,true]",
        "alice shares no more, her camera stays"
    );
}
