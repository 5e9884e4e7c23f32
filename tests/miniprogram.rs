//! The mini program room service (`/weapp/...`, credentials.md §5): the call sequences
//! `<rtc-room>`, `<live-room>` (both generations) and `<webrtc-room>` make, replayed
//! over HTTP against a real server, with a real RTMP push (ffmpeg) of the push URL the
//! service hands out, a `webrtc`-crate member of the same room receiving it, and a
//! WebRTC publisher listed in `get_pushers` whose `accelerateURL` ffmpeg plays.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::watcher::Watcher;
use common::{TestServer, APP};
use serde_json::{json, Value};
use weir::auth::TokenKind;
use weir_signaling::{ClientMessage, LeaveReason, LinkMicAction, ServerMessage};

/// POSTs JSON (or raw bytes) and returns (HTTP status, the JSON answer).
async fn post_raw(t: &TestServer, path_and_query: &str, body: &[u8]) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(t.server.http_addr)
        .await
        .unwrap();
    let head = format!(
        "POST {path_and_query} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let _ = s.write_all(body).await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let json = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("{path_and_query}: not JSON ({e}): {text}"));
    (status, json)
}

async fn post(t: &TestServer, path_and_query: &str, body: Value) -> Value {
    let (status, v) = post_raw(t, path_and_query, body.to_string().as_bytes()).await;
    assert_eq!(status, 200, "{path_and_query}: {v}");
    v
}

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A RoomService session, as `rtcroom.js`/`liveroom.js` build their requests:
/// `prefix + action + ?userID=&token=` with a JSON body.
struct Member {
    prefix: &'static str,
    user: String,
    token: String,
}

impl Member {
    async fn login(t: &TestServer, prefix: &'static str, user: &str) -> Self {
        let sig = t
            .app
            .issue_user_sig(TokenKind::V1, user, weir::auth::unix_now(), 3600)
            .unwrap();
        let r = post(
            t,
            &format!(
                "/weapp/{prefix}/login?accountType=0&sdkAppID={APP}&userSig={}&userID={user}",
                enc(&sig)
            ),
            json!({}),
        )
        .await;
        assert_eq!(r["code"], 0, "login: {r}");
        assert_eq!(r["userID"], user);
        let token = r["token"].as_str().expect("a token").to_owned();
        Self {
            prefix,
            user: user.into(),
            token,
        }
    }

    async fn call(&self, t: &TestServer, action: &str, body: Value) -> Value {
        post(
            t,
            &format!(
                "/weapp/{}/{action}?userID={}&token={}",
                self.prefix, self.user, self.token
            ),
            body,
        )
        .await
    }
}

/// Waits for an event the watcher saw.
async fn saw<T>(
    w: &Watcher,
    wait: Duration,
    mut pick: impl FnMut(&ServerMessage) -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if let Some(v) = w.events.lock().unwrap().iter().find_map(|(_, m)| pick(m)) {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

async fn video_packets_within(w: &Watcher, stream: &str, wait: Duration) -> usize {
    let deadline = Instant::now() + wait;
    loop {
        let n = w.received(stream, "video").await.len();
        if n > 30 || Instant::now() > deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The member decodes the pushed video (ffmpeg's 320x240 test picture).
async fn decodes_the_push(w: &Watcher, stream: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut packets = w.received(stream, "video").await;
    packets.retain(|r| !r.payload.is_empty());
    let d = common::media::decode_h264(&common::media::h264_annex_b(&packets), dir.path()).await;
    assert!(
        d.frames >= 20 && (d.width, d.height) == (320, 240),
        "the member decodes the pushed video: {d:?}"
    );
}

/// `<rtc-room>` (rtcroom.js): login → get_push_url → push → create_room → add_pusher →
/// heartbeats and get_pushers → delete_pusher; with a browser-side member in the same
/// room that receives the push, and a WebRTC publisher the mini program can play.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtc_room_sequence_with_a_real_push_a_webrtc_member_and_a_played_browser_publisher() {
    let t = TestServer::start().await;
    let alice = Member::login(&t, "multi_room", "alice").await;
    let url = alice
        .call(&t, "get_push_url", json!({"userID": "alice"}))
        .await;
    assert_eq!(url["code"], 0, "{url}");
    let push_url = url["pushURL"].as_str().unwrap().to_owned();
    assert!(
        push_url.starts_with(&format!(
            "rtmp://127.0.0.1:{}/live/{APP}_alice?",
            t.server.rtmp_addr.unwrap().port()
        )),
        "{push_url}"
    );
    assert!(
        push_url.contains("txSecret=") && push_url.contains("txTime="),
        "{push_url}"
    );
    // The component pushes first, and registers the room after the push started.
    let mut ffmpeg = common::source::ffmpeg_push(&push_url, 20);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let made = alice
        .call(
            &t,
            "create_room",
            json!({"userID": "alice", "roomInfo": "video customer service"}),
        )
        .await;
    assert_eq!(made["code"], 0, "{made}");
    let room_id = made["roomID"].as_str().unwrap().to_owned();
    let room: u32 = room_id
        .parse()
        .expect("a numeric roomID, which browsers join with");
    // A browser-side member of the same room (a webrtc-crate client on signaling).
    let carol = Watcher::join(&t, "carol", room, None).await;
    let added = alice
        .call(&t, "add_pusher", json!({"roomID": room_id, "roomInfo": "video customer service", "userID": "alice", "userName": "Alice", "userAvatar": "https://x/a.png", "pushURL": push_url}))
        .await;
    assert_eq!(added["code"], 0, "{added}");
    let stream = format!("{APP}_alice");
    let announced = saw(&carol, Duration::from_secs(20), |m| match m {
        ServerMessage::StreamAdded { stream: s } if s.user_id == "alice" => Some(s.clone()),
        _ => None,
    })
    .await
    .expect("the mini program's push appears in the signaling room");
    assert_eq!(announced.stream_id, stream);
    assert_eq!(announced.source, "rtmp");
    let n = video_packets_within(&carol, &stream, Duration::from_secs(15)).await;
    assert!(
        n > 30,
        "the member receives the pushed video over WebRTC: {n} packets"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    decodes_the_push(&carol, &stream).await;

    // A WebRTC publisher (a browser) in the room: listed by get_pushers, with an
    // accelerateURL that an RTMP player (here ffmpeg, for <live-player>) plays.
    let (_bob_signal, bob_stream, _sender, _relay, _peer) =
        common::publisher::webrtc_publisher(&t, "bob", room, 25, None).await;
    let hb = alice
        .call(
            &t,
            "pusher_heartbeat",
            json!({"roomID": room_id, "userID": "alice"}),
        )
        .await;
    assert_eq!(hb["code"], 0, "{hb}");
    let listed = alice
        .call(&t, "get_pushers", json!({"roomID": room_id}))
        .await;
    assert_eq!(listed["code"], 0, "{listed}");
    assert_eq!(listed["roomID"], room_id.as_str());
    assert_eq!(listed["roomInfo"], "video customer service");
    assert_eq!(listed["roomCreator"], "alice");
    assert!(listed["mixedPlayURL"].is_string());
    let pushers = listed["pushers"].as_array().unwrap();
    let me = pushers
        .iter()
        .find(|p| p["userID"] == "alice")
        .expect("alice listed");
    assert_eq!(me["userName"], "Alice");
    assert_eq!(me["userAvatar"], "https://x/a.png");
    assert!(me["accelerateURL"].as_str().unwrap().contains(&stream));
    let bob = pushers
        .iter()
        .find(|p| p["userID"] == "bob")
        .expect("the browser publisher is listed");
    let acc = bob["accelerateURL"].as_str().unwrap().to_owned();
    assert!(
        acc.starts_with("rtmp://") && acc.contains(&bob_stream) && acc.contains("txSecret="),
        "{acc}"
    );
    // At once, as a <live-player> opening it when the publisher appears (before its
    // first keyframe reached the server).
    let dir = tempfile::tempdir().unwrap();
    let md5 = dir.path().join("frames.md5");
    let mut player = tokio::process::Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-v",
            "info",
            "-i",
            &acc,
            "-an",
            "-frames:v",
            "60",
            "-f",
            "framemd5",
            "-y",
        ])
        .arg(&md5)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(15), player.wait()).await;
    let _ = player.kill().await;
    let log = {
        use tokio::io::AsyncReadExt;
        let mut e = String::new();
        let _ = player.stderr.take().unwrap().read_to_string(&mut e).await;
        e
    };
    let frames = std::fs::read_to_string(&md5)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("0,"))
        .count();
    assert!(
        frames >= 30,
        "ffmpeg decodes the browser publisher's accelerateURL: {frames} video frames\n{log}"
    );

    // The room list shows the room; delete_pusher takes alice out for everyone.
    let list = alice
        .call(&t, "get_room_list", json!({"index": 0, "cnt": 20}))
        .await;
    assert!(
        list["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["roomID"] == room_id.as_str()),
        "{list}"
    );
    let del = alice
        .call(
            &t,
            "delete_pusher",
            json!({"roomID": room_id, "userID": "alice"}),
        )
        .await;
    assert_eq!(del["code"], 0, "{del}");
    let left = saw(&carol, Duration::from_secs(5), |m| match m {
        ServerMessage::MemberLeft { user_id, reason } if user_id == "alice" => Some(*reason),
        _ => None,
    })
    .await;
    assert_eq!(left, Some(LeaveReason::Removed));
    let after = alice
        .call(&t, "get_pushers", json!({"roomID": room_id}))
        .await;
    assert!(
        !after["pushers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["userID"] == "alice"),
        "{after}"
    );
    let _ = ffmpeg.kill().await;
}

/// A pusher whose heartbeats stop is removed from the room for everyone: the
/// signaling members see it leave and its stream go, and get_pushers stops listing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pusher_without_heartbeats_is_removed_for_everyone() {
    let t = TestServer::start_with(|c| c.room_service.heartbeat_timeout_s = 3).await;
    // The newer LiveRoom names (§5.4).
    let alice = Member::login(&t, "live_room", "alice").await;
    let url = alice
        .call(&t, "get_anchor_url", json!({"userID": "alice"}))
        .await;
    assert!(
        url["timestamp"].is_number(),
        "LiveRoom answers carry a timestamp: {url}"
    );
    let push_url = url["pushURL"].as_str().unwrap().to_owned();
    let mut ffmpeg = common::source::ffmpeg_push(&push_url, 30);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let made = alice
        .call(
            &t,
            "create_room",
            json!({"userID": "alice", "roomID": "4321", "roomInfo": "class"}),
        )
        .await;
    assert_eq!(made["code"], 0, "{made}");
    let watcher = Watcher::join(&t, "student", 4321, None).await;
    let added = alice.call(&t, "add_anchor", json!({"roomID": "4321", "userID": "alice", "userName": "A", "userAvatar": "", "pushURL": push_url})).await;
    assert_eq!(added["code"], 0, "{added}");
    let stream = format!("{APP}_alice");
    // Heartbeats (every second here) until the push is seen in the room, then none.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    while Instant::now() < deadline && n <= 30 {
        let hb = alice
            .call(
                &t,
                "anchor_heartbeat",
                json!({"roomID": "4321", "userID": "alice", "roomStatusCode": 0}),
            )
            .await;
        assert_eq!(hb["code"], 0, "{hb}");
        n = video_packets_within(&watcher, &stream, Duration::from_secs(1)).await;
    }
    assert!(n > 30, "the pushed video reaches the room: {n} packets");
    let anchors = alice
        .call(&t, "get_anchors", json!({"roomID": "4321"}))
        .await;
    assert_eq!(anchors["pushers"].as_array().unwrap().len(), 1, "{anchors}");
    // No heartbeat: gone after 3 s (checked every second), for everyone.
    let t0 = Instant::now();
    let left = saw(&watcher, Duration::from_secs(8), |m| match m {
        ServerMessage::MemberLeft { user_id, reason } if user_id == "alice" => Some(*reason),
        _ => None,
    })
    .await;
    assert_eq!(
        left,
        Some(LeaveReason::Removed),
        "the silent pusher left the signaling room"
    );
    assert!(saw(&watcher, Duration::from_secs(1), |m| {
        matches!(m, ServerMessage::StreamRemoved { stream_id, .. } if *stream_id == stream)
            .then_some(())
    })
    .await
    .is_some());
    eprintln!(
        "removed {:.1} s after its last heartbeat",
        t0.elapsed().as_secs_f64() + 0.0
    );
    let anchors = alice
        .call(&t, "get_anchors", json!({"roomID": "4321"}))
        .await;
    assert!(
        anchors["pushers"]
            .as_array()
            .is_none_or(|p| p.iter().all(|p| p["userID"] != "alice")),
        "{anchors}"
    );
    let m = t.metrics().await;
    assert_eq!(common::metric(&m, "weir_room_service_expired_total"), 1.0);
    let _ = ffmpeg.kill().await;
}

/// Every documented error code, with the bad input that earns it; and nothing bad
/// earns a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_documented_codes() {
    let t = TestServer::start().await;
    // webrtc_room (§5.1): get_login_info → create_room → enter_room ×3 → full.
    let info = post(
        &t,
        "/weapp/webrtc_room/get_login_info",
        json!({"userID": "host_1"}),
    )
    .await;
    assert_eq!(info["code"], 0, "{info}");
    assert_eq!(info["sdkAppID"], APP);
    let sig = info["userSig"].as_str().unwrap();
    t.app
        .verify_user_sig(sig, "host_1", weir::auth::unix_now())
        .expect("a userSig Weir accepts");
    let random = post(&t, "/weapp/webrtc_room/get_login_info", json!({})).await;
    assert!(
        random["userID"].as_str().unwrap().starts_with("user_"),
        "{random}"
    );
    let made = post(
        &t,
        "/weapp/webrtc_room/create_room",
        json!({"userID": "host_1", "nickName": "H", "roomInfo": "hearing", "roomType": "trtc"}),
    )
    .await;
    assert_eq!(made["code"], 0, "{made}");
    let room = made["roomID"].as_str().unwrap().to_owned();
    let pmk = made["privateMapKey"].as_str().unwrap();
    let ticket = t
        .app
        .verify_private_map_key(
            pmk,
            "host_1",
            &weir::auth::RoomId::Num(room.parse().unwrap()),
            weir::auth::unix_now(),
        )
        .expect("a privateMapKey Weir accepts for that room");
    assert_eq!(ticket.privileges.0, 255);
    for u in ["guest_1", "guest_2", "guest_3"] {
        let r = post(
            &t,
            "/weapp/webrtc_room/enter_room",
            json!({"userID": u, "roomID": room.parse::<u64>().unwrap()}),
        )
        .await;
        assert_eq!(r["code"], 0, "{u}: {r}");
    }
    let full = post(
        &t,
        "/weapp/webrtc_room/enter_room",
        json!({"userID": "guest_4", "roomID": room}),
    )
    .await;
    assert_eq!(full["code"], 5001, "{full}");
    let members = post(
        &t,
        "/weapp/webrtc_room/get_room_members",
        json!({"roomID": room}),
    )
    .await;
    assert_eq!(members["members"].as_array().unwrap().len(), 4, "{members}");
    let rooms = post(
        &t,
        "/weapp/webrtc_room/get_room_list",
        json!({"index": 0, "count": 10}),
    )
    .await;
    assert!(
        rooms["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["roomID"] == room.as_str() && r["roomInfo"] == "hearing"),
        "{rooms}"
    );
    assert_eq!(
        post(
            &t,
            "/weapp/webrtc_room/heartbeat",
            json!({"userID": "guest_1", "roomID": room})
        )
        .await["code"],
        0
    );
    assert_eq!(
        post(
            &t,
            "/weapp/webrtc_room/quit_room",
            json!({"userID": "guest_1", "roomID": room})
        )
        .await["code"],
        0
    );
    for (body, want) in [
        (json!({"userID": "9starts_with_digit", "roomInfo": ""}), 7),
        (json!({"userID": "abc", "roomInfo": ""}), 7),
        (json!({"roomInfo": "x"}), 2),
        (
            json!({"userID": "host_2", "roomInfo": "x".repeat(1025)}),
            11,
        ),
        (json!({"userID": ["host_2"], "roomInfo": ""}), 2),
    ] {
        let r = post(&t, "/weapp/webrtc_room/create_room", body.clone()).await;
        assert_eq!(r["code"], want, "{body}: {r}");
        assert!(r["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let r = post(
        &t,
        "/weapp/webrtc_room/enter_room",
        json!({"userID": "guest_9", "roomID": "99"}),
    )
    .await;
    assert_eq!(r["code"], 3, "{r}");
    // Not JSON, not an object, too big: codes, not 500s.
    let (s, r) = post_raw(&t, "/weapp/webrtc_room/create_room", b"{not json").await;
    assert_eq!((s, r["code"].as_i64()), (200, Some(2)), "{r}");
    let (s, r) = post_raw(&t, "/weapp/webrtc_room/create_room", b"[1,2]").await;
    assert_eq!((s, r["code"].as_i64()), (200, Some(2)), "{r}");
    let big = vec![b' '; 64 * 1024];
    let (s, r) = post_raw(&t, "/weapp/webrtc_room/create_room", &big).await;
    assert_eq!((s, r["code"].as_i64()), (413, Some(2)), "{r}");

    // RoomService (§5.3): a bad userSig, a missing or forged token, another user's token.
    let forged = t
        .app
        .issue_user_sig(TokenKind::V1, "mallory", weir::auth::unix_now(), 3600)
        .unwrap();
    let r = post(
        &t,
        &format!(
            "/weapp/double_room/login?sdkAppID={APP}&userID=alice&userSig={}",
            enc(&forged)
        ),
        json!({}),
    )
    .await;
    assert_eq!(r["code"], 7, "a userSig of another user: {r}");
    let r = post(
        &t,
        "/weapp/double_room/login?sdkAppID=1&userID=alice&userSig=x",
        json!({}),
    )
    .await;
    assert_eq!(r["code"], 7, "{r}");
    let r = post(
        &t,
        &format!("/weapp/double_room/login?sdkAppID={APP}"),
        json!({}),
    )
    .await;
    assert_eq!(r["code"], 2, "{r}");
    let alice = Member::login(&t, "double_room", "alice").await;
    let bob = Member::login(&t, "double_room", "bob").await;
    let r = post(
        &t,
        "/weapp/double_room/get_room_list?userID=alice",
        json!({}),
    )
    .await;
    assert_eq!(r["code"], 2, "no token: {r}");
    let r = post(
        &t,
        "/weapp/double_room/get_room_list?userID=alice&token=0123",
        json!({}),
    )
    .await;
    assert_eq!(r["code"], 7, "{r}");
    let r = post(
        &t,
        &format!(
            "/weapp/double_room/get_room_list?userID=alice&token={}",
            bob.token
        ),
        json!({}),
    )
    .await;
    assert_eq!(r["code"], 7, "bob's token for alice: {r}");
    assert_eq!(
        alice
            .call(&t, "get_pushers", json!({"roomID": "5555"}))
            .await["code"],
        1
    );
    assert_eq!(alice.call(&t, "get_pushers", json!({})).await["code"], 2);
    let made = alice
        .call(
            &t,
            "create_room",
            json!({"userID": "alice", "roomInfo": "two", "roomID": "5555"}),
        )
        .await;
    assert_eq!(made["code"], 0, "{made}");
    assert_eq!(
        alice
            .call(
                &t,
                "create_room",
                json!({"userID": "alice", "roomInfo": "two", "roomID": "5555"})
            )
            .await["code"],
        11
    );
    assert_eq!(
        alice
            .call(
                &t,
                "create_room",
                json!({"userID": "alice", "roomInfo": "x".repeat(1025)})
            )
            .await["code"],
        11
    );
    assert_eq!(
        bob.call(
            &t,
            "destroy_room",
            json!({"userID": "bob", "roomID": "5555"})
        )
        .await["code"],
        3,
        "not the owner"
    );
    assert_eq!(
        bob.call(
            &t,
            "pusher_heartbeat",
            json!({"roomID": "5555", "userID": "bob"})
        )
        .await["code"],
        5,
        "not a member"
    );
    assert_eq!(
        bob.call(
            &t,
            "delete_pusher",
            json!({"roomID": "5555", "userID": "bob"})
        )
        .await["code"],
        5
    );
    let bobs_url = bob.call(&t, "get_push_url", json!({"userID": "bob"})).await["pushURL"].clone();
    let r = alice.call(&t, "add_pusher", json!({"roomID": "5555", "userID": "alice", "userName": "A", "userAvatar": "", "pushURL": bobs_url})).await;
    assert_eq!(r["code"], 7, "bob's push URL is not alice's: {r}");
    let alices_url = alice
        .call(&t, "get_push_url", json!({"userID": "alice"}))
        .await["pushURL"]
        .clone();
    assert_eq!(alice.call(&t, "add_pusher", json!({"roomID": "5555", "userID": "alice", "userName": "A", "userAvatar": "", "pushURL": alices_url})).await["code"], 0);
    assert_eq!(bob.call(&t, "add_pusher", json!({"roomID": "5555", "userID": "bob", "userName": "B", "userAvatar": "", "pushURL": bobs_url})).await["code"], 0);
    let carols = Member::login(&t, "double_room", "carol").await;
    let carol_url = carols.call(&t, "get_push_url", json!({})).await["pushURL"].clone();
    assert_eq!(carols.call(&t, "add_pusher", json!({"roomID": "5555", "userID": "carol", "userName": "C", "userAvatar": "", "pushURL": carol_url})).await["code"], 5001, "a double room holds two");
    assert_eq!(
        alice
            .call(
                &t,
                "merge_stream",
                json!({"userID": "alice", "roomID": "5555", "mergeParams": {}})
            )
            .await["code"],
        10,
        "live only"
    );
    assert_eq!(
        alice
            .call(
                &t,
                "destroy_room",
                json!({"userID": "alice", "roomID": "5555"})
            )
            .await["code"],
        0
    );
    assert_eq!(alice.call(&t, "logout", json!({})).await["code"], 0);
    assert_eq!(
        alice.call(&t, "get_room_list", json!({})).await["code"],
        7,
        "logged out"
    );

    // Live rooms: audiences, custom fields, merge_stream not supported.
    let host = Member::login(&t, "live_room", "host").await;
    let fan = Member::login(&t, "live_room", "fan").await;
    assert_eq!(
        host.call(
            &t,
            "create_room",
            json!({"userID": "host", "roomInfo": "show", "roomID": "show_1"})
        )
        .await["code"],
        0
    );
    let r = fan
        .call(
            &t,
            "add_audience",
            json!({"roomID": "show_1", "userID": "fan", "userInfo": "{\"userName\":\"F\"}"}),
        )
        .await;
    assert_eq!(r["code"], 0, "{r}");
    assert!(
        r["privateMapKey"].is_string(),
        "the audience can watch over signaling: {r}"
    );
    let a = host
        .call(&t, "get_audiences", json!({"roomID": "show_1"}))
        .await;
    assert_eq!(
        a["audiences"],
        json!([{"userID": "fan", "userInfo": "{\"userName\":\"F\"}"}])
    );
    let c = host
        .call(
            &t,
            "set_custom_field",
            json!({"roomID": "show_1", "fieldName": "likes", "operation": "inc"}),
        )
        .await;
    assert_eq!(c["code"], 0, "{c}");
    assert_eq!(
        fan.call(
            &t,
            "set_custom_field",
            json!({"roomID": "show_1", "fieldName": "likes", "operation": "inc"})
        )
        .await["code"],
        3,
        "the owner's fields"
    );
    let c = host
        .call(&t, "get_custom_info", json!({"roomID": "show_1"}))
        .await;
    assert_eq!(c["customInfo"], "{\"likes\":1}", "{c}");
    assert_eq!(
        host.call(
            &t,
            "set_custom_field",
            json!({"roomID": "show_1", "fieldName": "x", "operation": "mul"})
        )
        .await["code"],
        2
    );
    let m = host
        .call(
            &t,
            "merge_stream",
            json!({"userID": "host", "roomID": "show_1", "mergeParams": {}}),
        )
        .await;
    assert_eq!(m["code"], 10, "{m}");
    assert!(m["message"].as_str().unwrap().contains("not supported"));
    assert_eq!(
        fan.call(
            &t,
            "delete_audience",
            json!({"roomID": "show_1", "userID": "fan"})
        )
        .await["code"],
        0
    );
    let (s, r) = post_raw(&t, "/weapp/no_such_room/login", b"{}").await;
    assert_eq!((s, r["code"].as_i64()), (404, Some(10)));
    assert!(
        common::metric(
            &t.metrics().await,
            "weir_room_service_calls_total{kind=\"double_room\",outcome=\"auth\"}"
        ) >= 3.0
    );
}

/// `signaling/miniprogram/weir-mp.js` under Node: its own tests (`test.js`, a `wx`
/// stand-in over fetch and a real websocket) against this server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mini_program_client_module_passes_its_node_tests() {
    let t = TestServer::start().await;
    let now = weir::auth::unix_now();
    let sig = |u: &str| t.app.issue_user_sig(TokenKind::V1, u, now, 3600).unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    // Node 22 has a WebSocket; Node 20 behind a flag; older ones use the `ws` package
    // that scripts/install-deps.sh puts in target/node.
    let flag = std::process::Command::new("node")
        .args([
            "--experimental-websocket",
            "-e",
            "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
        ])
        .status()
        .is_ok_and(|s| s.success());
    let mut cmd = tokio::process::Command::new("node");
    if flag {
        cmd.arg("--experimental-websocket");
    }
    let out = cmd
        .arg(format!("{root}/signaling/miniprogram/test.js"))
        .env("NODE_PATH", format!("{root}/target/node/node_modules"))
        .env("WEIR_HTTP", format!("http://{}", t.server.http_addr))
        .env("WEIR_WS", t.ws_url())
        .env("WEIR_APP", APP.to_string())
        .env("WEIR_SIG_ALICE", sig("mp_alice"))
        .env("WEIR_SIG_BOB", sig("mp_bob"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("the Node tests end within 60 s")
        .expect("node runs (scripts/install-deps.sh test installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "weir-mp.js tests failed");
    assert!(stdout.contains("1..9"), "every Node test ran");
}

/// `<live-room>`'s stage: an audience member (a mini program: room service over HTTP,
/// the signaling socket, an RTMP push) asks the presenter (a browser-side member) to
/// join; before the presenter accepts, `add_pusher` is refused; accepted, its real
/// RTMP push reaches the presenter over WebRTC; the presenter takes it off the stage:
/// the stream goes for everyone, the push is closed, and the member's socket stays in
/// the room (one member with two sessions, not one replacing the other).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_room_stage_request_accept_push_and_kick() {
    let t = TestServer::start().await;
    let pat = Member::login(&t, "live_room", "pat").await;
    let made = pat
        .call(
            &t,
            "create_room",
            json!({"userID": "pat", "roomInfo": "a class"}),
        )
        .await;
    assert_eq!(made["code"], 0, "{made}");
    let room_id = made["roomID"].as_str().unwrap().to_owned();
    let room: u32 = room_id.parse().unwrap();
    // The presenter's browser: a webrtc-crate member that receives what is published.
    let presenter = Watcher::join(&t, "pat", room, None).await;
    // The audience member: room service, then the socket with its audience key.
    let carol = Member::login(&t, "live_room", "carol").await;
    let seat = carol
        .call(
            &t,
            "add_audience",
            json!({"roomID": room_id, "userID": "carol", "userInfo": "{}"}),
        )
        .await;
    assert_eq!(seat["code"], 0, "{seat}");
    let mut join = t.join("carol", room, 0);
    join.private_map_key = seat["privateMapKey"].as_str().unwrap().to_owned();
    join.auto_subscribe = false;
    let (mut carol_socket, joined) = common::Client::join(&t.ws_url(), join).await;
    assert!(matches!(joined, ServerMessage::Joined { .. }), "{joined:?}");
    let push_url = carol
        .call(&t, "get_push_url", json!({"userID": "carol"}))
        .await["pushURL"]
        .as_str()
        .unwrap()
        .to_owned();
    let add = json!({"roomID": room_id, "userID": "carol", "userName": "Carol", "userAvatar": "", "pushURL": push_url});
    let early = carol.call(&t, "add_pusher", add.clone()).await;
    assert_eq!(
        early["code"], 7,
        "not on the stage before the presenter accepts: {early}"
    );

    // The request reaches the presenter; the presenter accepts.
    carol_socket
        .send(&ClientMessage::LinkMic {
            action: LinkMicAction::Request,
            user_id: None,
            reason: "a question".into(),
        })
        .await;
    let asked = saw(&presenter, Duration::from_secs(5), |m| match m {
        ServerMessage::LinkMic {
            action: LinkMicAction::Request,
            user_id,
            reason,
        } => Some((user_id.clone(), reason.clone())),
        _ => None,
    })
    .await;
    assert_eq!(asked, Some(("carol".into(), "a question".into())));
    presenter.send(ClientMessage::LinkMic {
        action: LinkMicAction::Accept,
        user_id: Some("carol".into()),
        reason: String::new(),
    });
    let answer = carol_socket
        .expect(|m| match m {
            ServerMessage::LinkMic {
                action, user_id, ..
            } => Some((*action, user_id.clone())),
            _ => None,
        })
        .await;
    assert_eq!(answer, (LinkMicAction::Accept, "pat".into()));

    // On the stage: the push, then add_pusher, as the component does.
    let mut ffmpeg = common::source::ffmpeg_push(&push_url, 40);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let added = carol.call(&t, "add_pusher", add).await;
    assert_eq!(added["code"], 0, "{added}");
    let stream = format!("{APP}_carol");
    let n = video_packets_within(&presenter, &stream, Duration::from_secs(20)).await;
    assert!(
        n > 30,
        "the new pusher's RTMP stream reaches the presenter: {n} packets"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    decodes_the_push(&presenter, &stream).await;
    let listed = pat
        .call(&t, "get_pushers", json!({"roomID": room_id}))
        .await;
    assert!(
        listed["pushers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["userID"] == "carol"),
        "{listed}"
    );
    // Carol's socket is still hers: the push joined beside it.
    carol_socket
        .send(&ClientMessage::TextMessage {
            text: "thanks".into(),
        })
        .await;
    assert!(saw(&presenter, Duration::from_secs(5), |m| {
        matches!(m, ServerMessage::TextMessage { user_id, .. } if user_id == "carol").then_some(())
    })
    .await
    .is_some());

    // Only the presenter kicks; the presenter takes carol off the stage.
    carol_socket
        .send(&ClientMessage::LinkMic {
            action: LinkMicAction::Kick,
            user_id: Some("pat".into()),
            reason: String::new(),
        })
        .await;
    let refused = carol_socket
        .expect(|m| match m {
            ServerMessage::Error { code, request, .. } if request.as_deref() == Some("linkMic") => {
                Some(u16::from(*code))
            }
            _ => None,
        })
        .await;
    assert_eq!(refused, 403);
    presenter.send(ClientMessage::LinkMic {
        action: LinkMicAction::Kick,
        user_id: Some("carol".into()),
        reason: String::new(),
    });
    let kicked = carol_socket
        .expect(|m| match m {
            ServerMessage::LinkMic { action, .. } => Some(*action),
            _ => None,
        })
        .await;
    assert_eq!(kicked, LinkMicAction::Kick);
    assert!(
        saw(&presenter, Duration::from_secs(5), |m| {
            matches!(m, ServerMessage::StreamRemoved { stream_id, .. } if *stream_id == stream)
                .then_some(())
        })
        .await
        .is_some(),
        "the stream is gone for everyone"
    );
    let ended = tokio::time::timeout(Duration::from_secs(10), ffmpeg.wait()).await;
    assert!(ended.is_ok(), "the push is closed by the server");
    let listed = pat
        .call(&t, "get_pushers", json!({"roomID": room_id}))
        .await;
    assert!(
        !listed["pushers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["userID"] == "carol"),
        "{listed}"
    );
    // Carol is still in the room (off the stage, in the audience): nobody saw her leave,
    // and her socket still speaks.
    assert!(saw(&presenter, Duration::from_millis(500), |m| {
        matches!(m, ServerMessage::MemberLeft { user_id, .. } if user_id == "carol").then_some(())
    })
    .await
    .is_none());
    carol_socket
        .send(&ClientMessage::TextMessage {
            text: "back in the audience".into(),
        })
        .await;
    assert!(saw(&presenter, Duration::from_secs(5), |m| {
        matches!(m, ServerMessage::TextMessage { text, .. } if text == "back in the audience")
            .then_some(())
    })
    .await
    .is_some());
    let m = t.metrics().await;
    assert_eq!(
        common::metric(&m, "weir_link_mic_total{action=\"kick\"}"),
        1.0
    );
}

/// `pureaudio`: a mini program pushing audio only (`<live-pusher enable-camera=false>`)
/// is an audio-only stream for browsers, and its audio reaches them as Opus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audio_only_push_reaches_browsers_as_audio_only() {
    let t = TestServer::start().await;
    let alice = Member::login(&t, "multi_room", "alice").await;
    let push_url = alice
        .call(&t, "get_push_url", json!({"userID": "alice"}))
        .await["pushURL"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut ffmpeg = tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error", "-re"])
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
        .args(["-t", "20", "-vn", "-c:a", "aac", "-ar", "48000", "-ac", "1"])
        .args(["-f", "flv", &push_url])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let made = alice
        .call(
            &t,
            "create_room",
            json!({"userID": "alice", "roomInfo": "voice"}),
        )
        .await;
    let room_id = made["roomID"].as_str().unwrap().to_owned();
    let watcher = Watcher::join(&t, "bob", room_id.parse().unwrap(), None).await;
    let added = alice
        .call(&t, "add_pusher", json!({"roomID": room_id, "userID": "alice", "userName": "A", "userAvatar": "", "pushURL": push_url}))
        .await;
    assert_eq!(added["code"], 0, "{added}");
    let info = saw(&watcher, Duration::from_secs(10), |m| match m {
        ServerMessage::StreamAdded { stream } if stream.user_id == "alice" => Some(stream.clone()),
        _ => None,
    })
    .await
    .expect("the audio-only push is announced");
    assert!(info.audio && !info.video, "audio only: {info:?}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut audio = 0;
    while Instant::now() < deadline && audio < 100 {
        audio = watcher.packets("audio").await.len();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(audio >= 100, "Opus packets reach the browser side: {audio}");
    assert!(watcher.packets("video").await.is_empty());
    // The 440 Hz tone is heard (after the first 0.1 s).
    let mut packets = watcher.received(&format!("{APP}_alice"), "audio").await;
    packets.retain(|r| !r.payload.is_empty());
    let channels = 2;
    let pcm = common::media::decode_opus(&packets, channels);
    let left: Vec<f32> = pcm.chunks(channels).map(|c| c[0]).skip(4800).collect();
    let tone = common::media::tone_power(&left, 48_000.0, 440.0);
    let off = common::media::tone_power(&left, 48_000.0, 1000.0);
    assert!(
        tone > 1e-3 && tone > 100.0 * off,
        "the pushed tone is heard: 440 Hz power {tone}, 1 kHz {off}"
    );
    let _ = ffmpeg.kill().await;
}
