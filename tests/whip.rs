//! WHIP ingest (RFC 9725) with a client shaped like OBS: one POST of an offer with no
//! candidates (it never trickles), OBS's SDP quirks (`a=group:LS`, the codec name
//! `OPUS` in capitals), a bearer token; the publisher is a room member that Chrome
//! (through the SDK) and a `webrtc`-crate subscriber decode and an ffmpeg RTMP player
//! plays; DELETE removes it for everyone. Bad requests get their status codes.

mod common;

use std::time::{Duration, Instant};

use common::peer::{h264, opus, RtcPeer};
use common::publisher::{h264_access_units, send_h264_and_opus, Pace};
use common::watcher::Watcher;
use common::TestServer;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use weir::auth::{Privileges, RoomId, TokenKind};
use weir_signaling::ServerMessage;

const ROOM: u32 = 91;

use common::{http_request as http, response_header as header};

/// An offer as OBS sends it: no candidates at all, `a=group:LS`, `OPUS`.
fn obs_shaped(offer: &str) -> String {
    let mut out = String::new();
    for line in offer.lines() {
        if line.starts_with("a=candidate") || line.starts_with("a=end-of-candidates") {
            continue;
        }
        let line = line.replace("opus/48000", "OPUS/48000");
        out.push_str(&line);
        out.push_str("\r\n");
        if line.starts_with("a=group:BUNDLE") {
            out.push_str("a=group:LS 0 1\r\n");
        }
    }
    out
}

/// Video frames ffprobe decodes from a file.
fn video_frames(file: &std::path::Path) -> u64 {
    let out = std::process::Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-select_streams", "v:0"])
        .args(["-show_entries", "stream=nb_read_frames", "-of", "csv=p=0"])
        .arg(file)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn pmk_jwt(t: &TestServer, user: &str, privileges: u32) -> String {
    t.app
        .issue_private_map_key(
            TokenKind::Jwt,
            user,
            &RoomId::Num(ROOM),
            Privileges(privileges),
            weir::auth::unix_now(),
            3600,
        )
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_obs_shaped_whip_publisher_is_a_member_everyone_receives_until_delete() {
    let t = TestServer::start_with(|c| c.server.rtmp_addr = "127.0.0.1:0".into()).await;
    let addr = t.server.http_addr;
    let bob = Watcher::join(&t, "bob", ROOM, None).await;
    // Chrome in the room, through the SDK (started first: its start is slow on 2 cores).
    let browser = common::browser::Browser::launch().await;
    let chrome = browser.open(&format!("http://{addr}/")).await;
    let options = serde_json::to_string(&t.join("chrome", ROOM, 0xff)).unwrap();
    chrome
        .eval(&common::browser::sdk_join_js(
            &options,
            "window.gone = []; room.on('streamRemoved', (s) => window.gone.push(s.streamId));",
        ))
        .await;

    let mut peer = RtcPeer::new().await;
    let video = peer
        .add_send_track(RtpCodecKind::Video, h264(), 0x5151)
        .await;
    let audio = peer
        .add_send_track(RtpCodecKind::Audio, opus(), 0x5252)
        .await;
    let offer = obs_shaped(&peer.offer().await);
    assert!(!offer.contains("a=candidate"));
    let token = format!("Bearer {}", pmk_jwt(&t, "obs", 0xff));
    let (status, headers, answer) = http(
        addr,
        "POST",
        "/whip",
        &[
            ("Content-Type", "application/sdp"),
            ("Authorization", &token),
        ],
        &offer,
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(header(&headers, "content-type"), Some("application/sdp"));
    let location = header(&headers, "location").expect("Location").to_owned();
    assert!(location.starts_with("/whip/resource/"), "{location}");
    assert!(header(&headers, "etag").is_some());
    assert!(
        answer.starts_with("v=0") && answer.contains("a=candidate"),
        "{answer}"
    );

    peer.accept_answer(answer).await;
    peer.connected().await;
    let (vpt, apt) = (video.payload_type().await, audio.payload_type().await);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = tokio::spawn(send_h264_and_opus(
        std::sync::Arc::new(h264_access_units(2)),
        video.track.clone(),
        audio.track.clone(),
        (vpt, apt),
        Pace::Until(stop.clone()),
    ));

    // A member of the room: bob is told, subscribes and decodes it.
    let stream = format!("{}_{ROOM}_obs_main", common::APP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while bob.received(&stream, "video").await.len() < 200 {
        assert!(Instant::now() < deadline, "bob receives the WHIP stream");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Chrome decodes it.
    let stats = format!(
        r#"(async () => {{ const s = (await window.room.getStats()).get('{stream}');
            return s ? {{ frames: s.video.framesDecoded || 0, width: s.video.width || 0 }} : null; }})()"#
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = chrome.eval(&stats).await;
        if got["frames"].as_u64().unwrap_or(0) > 30 {
            assert_eq!(got["width"], 320, "{got}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Chrome decodes the WHIP stream: {got}\n{}",
            browser.console_dump()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ffmpeg plays it over RTMP.
    let rtmp = t.server.rtmp_addr.unwrap();
    let key = t.config.apps[0].live_play_key.clone().unwrap();
    let url = weir::auth::live_url::sign_url(
        &format!("rtmp://{rtmp}/live/{stream}"),
        &key,
        weir::auth::unix_now() + 600,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("whip.flv");
    let played = tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error", "-i", &url, "-t", "2"])
        .args(["-c", "copy", "-f", "flv", "-y"])
        .arg(&out)
        .kill_on_drop(true)
        .status();
    let played = tokio::time::timeout(Duration::from_secs(20), played)
        .await
        .expect("the RTMP player ends")
        .unwrap();
    assert!(played.success(), "ffmpeg plays the WHIP stream over RTMP");
    let frames = video_frames(&out);
    assert!(
        frames >= 25,
        "{frames} video frames played over RTMP in 2 s"
    );
    let video_in = bob.received(&stream, "video").await;
    let decoded =
        common::media::decode_h264(&common::media::h264_annex_b(&video_in), dir.path()).await;
    assert!(
        decoded.frames >= 30 && decoded.width == 320,
        "bob decodes it: {decoded:?}"
    );
    assert!(
        !bob.received(&stream, "audio").await.is_empty(),
        "audio too"
    );

    // DELETE: gone for everyone.
    let deleted = Instant::now();
    let (status, _, body) = http(addr, "DELETE", &location, &[], "").await;
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let gone = bob.events.lock().unwrap().iter().any(|(at, m)| {
            *at > deleted
                && matches!(m, ServerMessage::StreamRemoved { stream_id, .. } if *stream_id == stream)
        });
        if gone {
            break;
        }
        assert!(Instant::now() < deadline, "bob is told the stream is gone");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Chrome is told too (its socket may deliver it a moment after bob's).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let gone = chrome.eval("window.gone").await;
        if gone
            .as_array()
            .is_some_and(|g| g.iter().any(|s| s.as_str() == Some(stream.as_str())))
        {
            break;
        }
        assert!(Instant::now() < deadline, "Chrome is told too: {gone}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, ..) = http(addr, "DELETE", &location, &[], "").await;
    assert_eq!(status, 404, "a resource is deleted once");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sender.await;
    let m = t.metrics().await;
    assert_eq!(
        common::metric(&m, "weir_whip_requests_total{outcome=\"ok\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        common::metric(&m, "weir_whip_requests_total{outcome=\"deleted\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_whip_requests_get_their_status_codes() {
    let t = TestServer::start().await;
    let addr = t.server.http_addr;
    let mut peer = RtcPeer::new().await;
    peer.add_send_track(RtpCodecKind::Video, h264(), 0x5151)
        .await;
    let offer = peer.offer().await;
    let good = format!("Bearer {}", pmk_jwt(&t, "obs", 0xff));
    let sdp = ("Content-Type", "application/sdp");
    // No credentials; a forged token; the wrong content type.
    let (status, headers, _) = http(addr, "POST", "/whip", &[sdp], &offer).await;
    assert_eq!(status, 401);
    assert_eq!(header(&headers, "www-authenticate"), Some("Bearer"));
    // One signature character changed (not the last: its low bits are padding).
    let mut forged = pmk_jwt(&t, "obs", 0xff).into_bytes();
    let i = forged.len() - 10;
    forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let forged = format!("Bearer {forged}");
    let (status, _, body) = http(
        addr,
        "POST",
        "/whip",
        &[sdp, ("Authorization", &forged)],
        &offer,
    )
    .await;
    assert_eq!(status, 401, "{body}");
    let (status, ..) = http(
        addr,
        "POST",
        "/whip",
        &[("Content-Type", "text/plain"), ("Authorization", &good)],
        &offer,
    )
    .await;
    assert_eq!(status, 415);
    // A receive-only member may not publish.
    let viewer = format!(
        "Bearer {}",
        pmk_jwt(&t, "viewer", 0x01 | 0x02 | 0x08 | 0x20)
    );
    let (status, _, body) = http(
        addr,
        "POST",
        "/whip",
        &[sdp, ("Authorization", &viewer)],
        &offer,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    // An offer that sends nothing; an oversized body.
    let recvonly = offer
        .replace("a=sendrecv", "a=recvonly")
        .replace("a=sendonly", "a=recvonly");
    let (status, ..) = http(
        addr,
        "POST",
        "/whip",
        &[sdp, ("Authorization", &good)],
        &recvonly,
    )
    .await;
    assert_eq!(status, 422);
    // Credentials in the query string, as on an RTMP push URL, are taken too (the
    // offer is then what is refused).
    let now = weir::auth::unix_now();
    let sig = t
        .app
        .issue_user_sig(TokenKind::V2, "obs", now, 3600)
        .unwrap();
    let pmk = t
        .app
        .issue_private_map_key(
            TokenKind::V2,
            "obs",
            &RoomId::Num(ROOM),
            Privileges(0xff),
            now,
            3600,
        )
        .unwrap();
    let enc = |s: &str| -> String { url::form_urlencoded::byte_serialize(s.as_bytes()).collect() };
    let path = format!(
        "/whip?sdkappid={}&userid=obs&roomid={ROOM}&usersig={}&privatemapkey={}",
        common::APP,
        enc(&sig),
        enc(&pmk)
    );
    let (status, _, body) = http(addr, "POST", &path, &[sdp], &recvonly).await;
    assert_eq!(status, 422, "{body}");
    let huge = "a".repeat(weir::server::whip::MAX_OFFER_BYTES + 1);
    let (status, ..) = http(
        addr,
        "POST",
        "/whip",
        &[sdp, ("Authorization", &good)],
        &huge,
    )
    .await;
    assert_eq!(status, 413);
    // PATCH on a live resource: trickled candidates (204), an ICE restart (422), a
    // stale ETag (412), the wrong type (415), an unknown resource (404).
    let (status, headers, body) = http(
        addr,
        "POST",
        "/whip",
        &[sdp, ("Authorization", &good)],
        &offer,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let location = header(&headers, "location").unwrap().to_owned();
    let etag = header(&headers, "etag").unwrap().to_owned();
    let ufrag = offer
        .lines()
        .find_map(|l| l.strip_prefix("a=ice-ufrag:"))
        .unwrap()
        .trim()
        .to_owned();
    let frag = ("Content-Type", "application/trickle-ice-sdpfrag");
    let trickle = format!(
        "a=ice-ufrag:{ufrag}\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\n\
         a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host\r\na=end-of-candidates\r\n"
    );
    let (status, headers, body) = http(
        addr,
        "PATCH",
        &location,
        &[frag, ("If-Match", &etag)],
        &trickle,
    )
    .await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(header(&headers, "etag"), Some(etag.as_str()));
    // A new ufrag is an ICE restart, which needs the new password too
    // (tests/ice_restart.rs restarts a WHIP publisher this way).
    let restart = trickle.replace(&ufrag, "aNewUfrag");
    let (status, _, body) = http(addr, "PATCH", &location, &[frag], &restart).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("ice-pwd"), "{body}");
    let (status, ..) = http(
        addr,
        "PATCH",
        &location,
        &[frag, ("If-Match", "\"stale\"")],
        &trickle,
    )
    .await;
    assert_eq!(status, 412);
    let (status, ..) = http(addr, "PATCH", &location, &[sdp], &trickle).await;
    assert_eq!(status, 415);
    let (status, ..) = http(addr, "DELETE", &location, &[], "").await;
    assert_eq!(status, 200);
    let (status, ..) = http(addr, "PATCH", &location, &[frag], &trickle).await;
    assert_eq!(status, 404);
    // Unknown resources; CORS preflight.
    let (status, ..) = http(addr, "DELETE", "/whip/resource/nope", &[], "").await;
    assert_eq!(status, 404);
    let (status, headers, _) = http(addr, "OPTIONS", "/whip", &[], "").await;
    assert_eq!(status, 204);
    assert_eq!(header(&headers, "access-control-allow-origin"), Some("*"));
    assert!(header(&headers, "access-control-allow-headers")
        .is_some_and(|h| h.contains("Authorization")));
    let m = t.metrics().await;
    assert!(
        common::metric(&m, "weir_whip_requests_total{outcome=\"unauthorized\"}") >= 2.0,
        "{m}"
    );
}

/// WHEP: headless Chromium with a plain page (an `RTCPeerConnection` and `fetch`, no
/// Weir SDK) plays an RTMP pusher's stream: one POST of a receive-only offer, the
/// answer, decoded video and audio; DELETE ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_whep_page_in_chrome_plays_an_rtmp_push() {
    let t = TestServer::start_with(|c| c.server.rtmp_addr = "127.0.0.1:0".into()).await;
    let addr = t.server.http_addr;
    let browser = common::browser::Browser::launch().await;
    let page = browser.open(&format!("http://{addr}/")).await;
    let stream = format!("{}_{ROOM}_pusher_main", common::APP);
    let now = weir::auth::unix_now();
    let enc = |s: &str| -> String { url::form_urlencoded::byte_serialize(s.as_bytes()).collect() };
    let sig = t
        .app
        .issue_user_sig(TokenKind::V2, "pusher", now, 3600)
        .unwrap();
    let pmk = t
        .app
        .issue_private_map_key(
            TokenKind::V2,
            "pusher",
            &RoomId::Num(ROOM),
            Privileges(0xff),
            now,
            3600,
        )
        .unwrap();
    let rtmp = t.server.rtmp_addr.unwrap();
    let mut ffmpeg = common::source::ffmpeg_push(
        &format!(
            "rtmp://{rtmp}/live/{stream}?sdkappid={}&userid=pusher&roomid={ROOM}&usersig={}&privatemapkey={}",
            common::APP,
            enc(&sig),
            enc(&pmk)
        ),
        20,
    );
    // The stream is in the room once the pusher has published.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !t
        .metrics()
        .await
        .contains("weir_rtmp_connections{role=\"publish\"} 1")
    {
        assert!(Instant::now() < deadline, "the RTMP push is published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let token = pmk_jwt(&t, "whep-viewer", 0x01 | 0x02 | 0x08 | 0x20);
    let started = page
        .eval(&format!(
            r#"(async () => {{
                const pc = new RTCPeerConnection();
                window.pc = pc;
                pc.addTransceiver('video', {{ direction: 'recvonly' }});
                pc.addTransceiver('audio', {{ direction: 'recvonly' }});
                pc.ontrack = (e) => {{
                    if (e.track.kind !== 'video') return;
                    const v = document.createElement('video');
                    v.autoplay = true; v.muted = true; v.srcObject = e.streams[0] || new MediaStream([e.track]);
                    document.body.append(v);
                    v.play().catch(() => {{}});
                }};
                await pc.setLocalDescription(await pc.createOffer());
                const r = await fetch('/whep/{stream}', {{
                    method: 'POST',
                    headers: {{ 'Content-Type': 'application/sdp', 'Authorization': 'Bearer {token}' }},
                    body: pc.localDescription.sdp,
                }});
                const answer = await r.text();
                window.location_ = r.headers.get('Location');
                if (r.status !== 201) return {{ status: r.status, answer }};
                await pc.setRemoteDescription({{ type: 'answer', sdp: answer }});
                return {{ status: r.status, location: window.location_ }};
            }})()"#
        ))
        .await;
    assert_eq!(started["status"], 201, "{started}");
    let location = started["location"].as_str().expect("Location").to_owned();
    assert!(location.starts_with("/whep/resource/"), "{location}");
    let stats = r#"(async () => {
        const out = { frames: 0, width: 0, audio: 0, state: window.pc.connectionState };
        (await window.pc.getStats()).forEach((s) => {
            if (s.type === 'inbound-rtp' && s.kind === 'video') { out.frames = s.framesDecoded || 0; out.width = s.frameWidth || 0; }
            if (s.type === 'inbound-rtp' && s.kind === 'audio') { out.audio = s.packetsReceived || 0; }
        });
        return out;
    })()"#;
    let deadline = Instant::now() + Duration::from_secs(20);
    let got = loop {
        let got = page.eval(stats).await;
        if got["frames"].as_u64().unwrap_or(0) > 30 && got["audio"].as_u64().unwrap_or(0) > 50 {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "the WHEP page decodes video and receives audio: {got}\n{}",
            browser.console_dump()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(got["width"], 320, "{got}");

    // An ICE restart over PATCH, as a WHEP page does it (RFC 9725 §4.4.1): new local
    // credentials in a fragment; the server's new ones and its candidates come back,
    // and the page's checks with them reconnect (with the old ones they would fail).
    let restarted = page
        .eval(
            r#"(async () => {
                const pc = window.pc;
                const before = pc.remoteDescription.sdp;
                pc.restartIce();
                await pc.setLocalDescription(await pc.createOffer({ iceRestart: true }));
                await new Promise((r) => {
                    if (pc.iceGatheringState === 'complete') return r();
                    pc.addEventListener('icegatheringstatechange', () => pc.iceGatheringState === 'complete' && r());
                    setTimeout(r, 2000);
                });
                const local = pc.localDescription.sdp.split('\r\n');
                const frag = [
                    local.find((l) => l.startsWith('a=ice-ufrag:')),
                    local.find((l) => l.startsWith('a=ice-pwd:')),
                    ...local.filter((l) => l.startsWith('m=') || l.startsWith('a=mid:') || l.startsWith('a=candidate:')),
                ].join('\r\n') + '\r\n';
                const r = await fetch(window.location_, {
                    method: 'PATCH',
                    headers: { 'Content-Type': 'application/trickle-ice-sdpfrag', 'If-Match': '*' },
                    body: frag,
                });
                const body = await r.text();
                if (r.status !== 200) return { status: r.status, body };
                const get = (k) => body.split('\r\n').find((l) => l.startsWith(k));
                const sections = body.split(/\r\n(?=m=)/).slice(1);
                let i = -1;
                const answer = before.split('\r\n').flatMap((l) => {
                    if (l.startsWith('m=')) i += 1;
                    if (l.startsWith('a=ice-ufrag:')) return [get('a=ice-ufrag:')];
                    // The section's new candidates after its credentials (the
                    // remote description Chrome keeps has no end-of-candidates).
                    if (l.startsWith('a=ice-pwd:')) {
                        const c = (sections[i] || '').split('\r\n').filter((x) => x.startsWith('a=candidate:'));
                        return [get('a=ice-pwd:'), ...c];
                    }
                    if (l.startsWith('a=candidate:') || l === 'a=end-of-candidates') return [];
                    return [l];
                }).join('\r\n');
                await pc.setRemoteDescription({ type: 'answer', sdp: answer });
                window.debugRestart = { frag, body, answer, before };
                return { status: r.status, ufrag: get('a=ice-ufrag:'), etag: r.headers.get('ETag'),
                          before: before.split('\r\n').find((l) => l.startsWith('a=ice-ufrag:')) };
            })()"#,
        )
        .await;
    assert_eq!(restarted["status"], 200, "{restarted}");
    assert_ne!(restarted["ufrag"], restarted["before"], "{restarted}");
    let frames_then = page.eval(stats).await["frames"].as_u64().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = page.eval(stats).await;
        if now["frames"].as_u64().unwrap_or(0) > frames_then + 30 && now["state"] == "connected" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "video goes on after the ICE restart: {now}\n{}\n{}",
            page.eval("JSON.stringify(window.debugRestart)").await,
            browser.console_dump()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, ..) = http(addr, "DELETE", &location, &[], "").await;
    assert_eq!(status, 200);
    let m = t.metrics().await;
    assert_eq!(
        common::metric(&m, "weir_whep_requests_total{outcome=\"ok\"}"),
        1.0,
        "{m}"
    );
    assert_eq!(
        common::metric(&m, "weir_whip_requests_total{outcome=\"ice_restart\"}"),
        1.0,
        "{m}"
    );
    ffmpeg.kill().await.unwrap();
}

/// A WHEP viewer cannot be offered a kind later (it never renegotiates), so an answer
/// made when the stream's video was ready but its audio not yet left it without sound
/// for good: a viewer polling for a stream that has just started lands in that window
/// (a publisher's audio and video start a moment apart). Its offer now waits, up to a
/// second from the stream's first kind, for the others the stream publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whep_viewer_arriving_between_a_streams_video_and_audio_gets_both() {
    let t = TestServer::start().await;
    let addr = t.server.http_addr;
    let mut peer = RtcPeer::new().await;
    let video = peer
        .add_send_track(RtpCodecKind::Video, h264(), 0x6161)
        .await;
    let audio = peer
        .add_send_track(RtpCodecKind::Audio, opus(), 0x6262)
        .await;
    let offer = obs_shaped(&peer.offer().await);
    let token = format!("Bearer {}", pmk_jwt(&t, "late-audio", 0xff));
    let sdp = ("Content-Type", "application/sdp");
    let (status, _, answer) = http(
        addr,
        "POST",
        "/whip",
        &[sdp, ("Authorization", &token)],
        &offer,
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    peer.accept_answer(answer).await;
    peer.connected().await;

    // Video first: an IDR, then a frame every 33 ms.
    let write = |track: std::sync::Arc<
        webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP,
    >,
                 ssrc: u32,
                 pt: u8,
                 n: u16,
                 payload: Vec<u8>| async move {
        use webrtc::media_stream::track_local::TrackLocal;
        let mut p = rtc::rtp::Packet::default();
        p.header.version = 2;
        p.header.ssrc = ssrc;
        p.header.payload_type = pt;
        p.header.sequence_number = n;
        p.header.timestamp = u32::from(n) * 3000;
        p.header.marker = true;
        p.payload = payload.into();
        let _ = track.write_rtp(p).await;
    };
    let (vpt, apt) = (video.payload_type().await, audio.payload_type().await);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let audio_from = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let (stop, audio_from) = (stop.clone(), audio_from.clone());
        let (vt, at) = (video.track.clone(), audio.track.clone());
        tokio::spawn(async move {
            let mut n = 0u16;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let nal = if n % 30 == 0 { 0x65 } else { 0x41 };
                write(vt.clone(), 0x6161, vpt, n, vec![nal, 1, 2, 3]).await;
                if audio_from.load(std::sync::atomic::Ordering::Relaxed) {
                    write(at.clone(), 0x6262, apt, n, vec![0xfc, 0xff, 0xfe]).await;
                }
                n = n.wrapping_add(1);
                tokio::time::sleep(Duration::from_millis(33)).await;
            }
        })
    };
    common::wait_for_metric(
        &t,
        "weir_published_tracks{kind=\"video\"}",
        1.0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        common::metric(&t.metrics().await, "weir_published_tracks{kind=\"audio\"}"),
        0.0,
        "the audio has not started yet"
    );

    // The viewer's offer arrives now; the audio starts 300 ms later.
    let mut viewer = RtcPeer::new().await;
    viewer
        .add_send_track(RtpCodecKind::Video, h264(), 0x7171)
        .await;
    viewer
        .add_send_track(RtpCodecKind::Audio, opus(), 0x7272)
        .await;
    let recvonly = viewer
        .offer()
        .await
        .replace("a=sendrecv", "a=recvonly")
        .replace("a=sendonly", "a=recvonly");
    let viewer_token = format!(
        "Bearer {}",
        pmk_jwt(&t, "whep-viewer", 0x01 | 0x02 | 0x08 | 0x20)
    );
    let path = format!("/whep/{}_{ROOM}_late-audio_main", common::APP);
    let asked = Instant::now();
    let whep = tokio::spawn(async move {
        http(
            addr,
            "POST",
            &path,
            &[sdp, ("Authorization", &viewer_token)],
            &recvonly,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    audio_from.store(true, std::sync::atomic::Ordering::Relaxed);
    let (status, _, answer) = whep.await.unwrap();
    let waited = asked.elapsed();
    assert_eq!(status, 201, "{answer}");
    let audio_section = answer
        .split("\r\nm=")
        .find(|s| s.starts_with("audio "))
        .unwrap_or_else(|| panic!("no audio section: {answer}"));
    let port = audio_section.split_whitespace().nth(1);
    assert_ne!(port, Some("0"), "audio refused: {answer}");
    assert!(
        audio_section.contains("a=sendonly"),
        "Weir sends the viewer audio: {audio_section}"
    );
    assert!(
        waited < Duration::from_secs(2),
        "answered once the audio came, not after a long wait: {waited:?}"
    );
    common::wait_for_metric(
        &t,
        "weir_subscribed_tracks{kind=\"audio\"}",
        1.0,
        Duration::from_secs(5),
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.await.unwrap();
}
