//! Several `weir` processes behind a real `redis-server`: rooms placed and found
//! through Redis, sessions relayed to the node serving their room, a node killed or
//! drained, Redis restarted under the cluster.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::node::{free_port, Node};
use common::publisher::{offer_to_publish, send_h264_and_opus, Offered, Pace};
use common::redis::Redis;
use common::watcher::Watcher;
use common::{join_with, metric, Client, APP};
use weir::auth::AppKeys;
use weir::config::AppConfig;
use weir_signaling::{LeaveReason, ServerMessage};

/// A cluster node named `id` on `redis`, serving `app`.
async fn cluster_node(
    redis: &Redis,
    app: &AppConfig,
    id: &'static str,
    tweak: impl Fn(&mut weir::config::Config),
) -> Node {
    let url = redis.url();
    let mut node = Node::start_app(app.clone(), &[("RUST_LOG", "weir=info")], |c| {
        c.cluster.redis_url = url.clone();
        c.cluster.node_id = id.into();
        // The nodes relay each other's clients: they trust each other's
        // X-Forwarded-For (here everyone is on loopback).
        c.server.trusted_proxies = vec!["127.0.0.1".into()];
        tweak(c);
    })
    .await;
    node.echo_stderr(id);
    node
}

async fn three_nodes(redis: &Redis) -> (AppConfig, Node, Node, Node) {
    three_nodes_with(redis, |_| {}).await
}

/// Three nodes, B configured by `tweak_b`.
async fn three_nodes_with(
    redis: &Redis,
    tweak_b: impl Fn(&mut weir::config::Config),
) -> (AppConfig, Node, Node, Node) {
    three_nodes_tweaked(redis, |_| {}, tweak_b).await
}

/// Three nodes, each configured by `all`, then B by `tweak_b`.
async fn three_nodes_tweaked(
    redis: &Redis,
    all: impl Fn(&mut weir::config::Config),
    tweak_b: impl Fn(&mut weir::config::Config),
) -> (AppConfig, Node, Node, Node) {
    let app = AppKeys::generate_config(APP);
    let a = cluster_node(redis, &app, "node-a", &all).await;
    let b = cluster_node(redis, &app, "node-b", |c| {
        all(c);
        tweak_b(c)
    })
    .await;
    let c = cluster_node(redis, &app, "node-c", &all).await;
    // Each knows the other two within a heartbeat or two.
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in [&a, &b, &c] {
        loop {
            let v = n.cluster().await;
            if v["nodes"].as_array().map_or(0, |n| n.len()) == 3 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the nodes did not see each other: {v}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    (app, a, b, c)
}

/// A publisher of H.264 + Opus joined through `url`, sending until the flag is set.
struct Publisher {
    signal: Client,
    stream: String,
    stop: Arc<AtomicBool>,
    _peer: common::peer::RtcPeer,
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

async fn publish_through(url: &str, app: &AppKeys, user: &str, room: u32) -> Publisher {
    let (mut signal, joined) = Client::join(url, join_with(app, user, room, 0xff, true)).await;
    assert!(matches!(joined, ServerMessage::Joined { .. }), "{joined:?}");
    let Offered {
        stream,
        mut peer,
        video,
        audio,
        answer,
    } = offer_to_publish(&mut signal).await;
    peer.accept_answer(answer).await;
    peer.connected().await;
    let stop = Arc::new(AtomicBool::new(false));
    let pts = (video.payload_type().await, audio.payload_type().await);
    tokio::spawn(send_h264_and_opus(
        Arc::new(common::publisher::h264_access_units(4)),
        video.track.clone(),
        audio.track.clone(),
        pts,
        Pace::Until(stop.clone()),
    ));
    Publisher {
        signal,
        stream: stream.stream_id,
        stop,
        _peer: peer,
    }
}

/// Waits until `w` has received `n` packets of `kind` of `stream`.
async fn until_received(w: &Watcher, stream: &str, kind: &str, n: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = w.received(stream, kind).await.len();
        if got >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{got} {kind} packets of {stream} within {within:?}, wanted {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Video frames ffprobe decodes from the first `seconds` of a play URL (its errors
/// printed).
async fn probe_frames(url: &str, seconds: u32) -> u64 {
    let out = tokio::process::Command::new("ffprobe")
        .args(["-v", "error", "-read_intervals", &format!("%+{seconds}")])
        .args(["-count_frames", "-select_streams", "v:0"])
        .args([
            "-show_entries",
            "stream=nb_read_frames",
            "-of",
            "csv=p=0",
            url,
        ])
        .output()
        .await
        .unwrap();
    eprintln!("ffprobe {url}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn joined_members(m: &ServerMessage) -> Vec<String> {
    match m {
        ServerMessage::Joined { members, .. } => {
            members.iter().map(|m| m.user_id.clone()).collect()
        }
        other => panic!("not joined: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_through_any_node_lands_where_its_room_is_and_media_flows() {
    let redis = Redis::start().await;
    let (app_config, a, b, c) = three_nodes(&redis).await;
    let app = AppKeys::from_config(&app_config).unwrap();
    // The room's first member comes through B: the room is placed there (an equally
    // loaded cluster keeps a room where its first member already is).
    let publisher = publish_through(&b.ws_url(), &app, "presenter", 777).await;
    assert_eq!(
        redis.get("weir:room:1400000000/777").await.as_deref(),
        Some("node-b")
    );
    // Viewers come through A and C: their sessions are relayed to B, their media goes
    // to B's UDP port (its candidates are in B's offers).
    let via_a = Watcher::join_url(
        &a.ws_url(),
        join_with(&app, "viewer-a", 777, 0xff, true),
        None,
        0,
    )
    .await;
    let via_c = Watcher::join_url(
        &c.ws_url(),
        join_with(&app, "viewer-c", 777, 0xff, true),
        None,
        0,
    )
    .await;
    for w in [&via_a, &via_c] {
        until_received(w, &publisher.stream, "video", 60, Duration::from_secs(15)).await;
        until_received(w, &publisher.stream, "audio", 50, Duration::from_secs(5)).await;
    }
    // One room, on B, with its three members; A and C relay one session each.
    let (ma, mb, mc) = (a.metrics().await, b.metrics().await, c.metrics().await);
    assert_eq!(metric(&mb, "weir_rooms"), 1.0);
    assert_eq!(metric(&mb, "weir_participants"), 3.0);
    for m in [&ma, &mc] {
        assert_eq!(metric(m, "weir_rooms"), 0.0);
        assert_eq!(metric(m, "weir_joins_total{outcome=\"relayed\""), 1.0);
        assert_eq!(metric(m, "weir_cluster_relays{kind=\"signaling\""), 1.0);
        assert_eq!(metric(m, "weir_cluster_routes_total{route=\"remote\""), 1.0);
    }
    // B routed all three joins (its own and the two relayed) to itself.
    assert_eq!(
        metric(&mb, "weir_cluster_routes_total{route=\"local\""),
        3.0
    );
    // A later member sees the others (room events cross the relay both ways).
    let (_late, joined) = Client::join(&c.ws_url(), join_with(&app, "late", 777, 0xff, true)).await;
    let mut members = joined_members(&joined);
    members.sort();
    assert_eq!(members, ["presenter", "viewer-a", "viewer-c"]);
    // Every node's view lists the three, with B's room counted.
    let view = a.cluster().await;
    let nodes = view["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{view}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let view = c.cluster().await;
        let b_rooms = view["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == "node-b")
            .map(|n| n["load"]["rooms"].as_u64().unwrap_or(0));
        if b_rooms == Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B's record never counted its room: {view}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The operator's view: `weir cluster status` reads Redis.
    let out = cluster_status(&redis).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for id in ["node-a", "node-b", "node-c"] {
        assert!(text.contains(id), "{id} listed: {text}");
    }
    assert!(text.contains("rooms on node-b: 1400000000/777"), "{text}");
    drop(publisher);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_end_of_its_drain_a_node_moves_its_members_and_they_rejoin_elsewhere() {
    let redis = Redis::start().await;
    let app_config = AppKeys::generate_config(APP);
    let app = AppKeys::from_config(&app_config).unwrap();
    let a = cluster_node(&redis, &app_config, "node-a", |_| {}).await;
    let b = cluster_node(&redis, &app_config, "node-b", |c| c.cluster.drain_s = 2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (mut member, joined) =
        Client::join(&b.ws_url(), join_with(&app, "m", 50, 0xff, true)).await;
    joined_members(&joined);
    let (mut relayed, joined) =
        Client::join(&a.ws_url(), join_with(&app, "r", 50, 0xff, true)).await;
    assert_eq!(joined_members(&joined), ["m"]);
    b.signal("TERM");
    // The room outlives the TERM by drain_s, then every member is told to move.
    let t0 = Instant::now();
    for c in [&mut member, &mut relayed] {
        let left = c
            .expect(|m| match m {
                ServerMessage::Left { reason } => Some(*reason),
                _ => None,
            })
            .await;
        assert_eq!(left, weir_signaling::LeaveReason::ServerShutdown);
    }
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "left only after the drain: {waited:?}"
    );
    // They join again through the entry node (A): the room is placed on A.
    let (_m, joined) = Client::join(&a.ws_url(), join_with(&app, "m", 50, 0xff, true)).await;
    joined_members(&joined);
    let (_r, joined) = Client::join(&a.ws_url(), join_with(&app, "r", 50, 0xff, true)).await;
    assert_eq!(joined_members(&joined), ["m"]);
    assert_eq!(
        redis.get("weir:room:1400000000/50").await.as_deref(),
        Some("node-a")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rtmp_push_aimed_at_another_node_is_served_by_the_room_s_node() {
    // Chrome first: its start is slow on 2 cores.
    let browser = common::browser::Browser::launch().await;
    let redis = Redis::start().await;
    let (app_config, a, b, _c) = three_nodes(&redis).await;
    let app = AppKeys::from_config(&app_config).unwrap();
    // The room lives on B (its first member, a viewer, came through B).
    let viewer = Watcher::join_url(
        &b.ws_url(),
        join_with(&app, "viewer", 30, 0xff, true),
        None,
        0,
    )
    .await;
    assert_eq!(
        redis.get("weir:room:1400000000/30").await.as_deref(),
        Some("node-b")
    );
    // A browser in the room through the SDK, from A's page (its session relayed to B).
    let chrome = browser.open(&format!("http://127.0.0.1:{}/", a.http)).await;
    let options = serde_json::to_string(&join_with(&app, "chrome", 30, 0xff, true)).unwrap();
    chrome
        .eval(&common::browser::sdk_join_js(&options, ""))
        .await;
    // ffmpeg pushes to A, with the room's credentials.
    let url = format!(
        "rtmp://127.0.0.1:{}/live/pusher_cam?{}",
        a.rtmp,
        common::rtmp_query(&app, "pusher", 30, 0xff)
    );
    let mut ffmpeg = common::source::ffmpeg_push(&url, 8);
    // The viewer on B receives the pushed video and audio (bridged on B).
    until_received(&viewer, "pusher_cam", "video", 60, Duration::from_secs(15)).await;
    until_received(&viewer, "pusher_cam", "audio", 50, Duration::from_secs(5)).await;
    // So does Chrome: it decodes the pushed video and plays its audio.
    let stats = r#"(async () => { const s = (await window.room.getStats()).get('pusher_cam');
        return s ? { frames: s.video.framesDecoded || 0, audio: s.audio.packetsReceived || 0 } : null; })()"#;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = chrome.eval(stats).await;
        if got["frames"].as_u64().unwrap_or(0) > 30 && got["audio"].as_u64().unwrap_or(0) > 50 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Chrome decodes the push through the cluster: {got}\n{}",
            browser.console_dump()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let (ma, mb) = (a.metrics().await, b.metrics().await);
    assert_eq!(metric(&ma, "weir_cluster_relays{kind=\"rtmp\""), 1.0);
    assert_eq!(
        metric(
            &ma,
            "weir_rtmp_requests_total{outcome=\"relayed\",request=\"publish\""
        ),
        1.0
    );
    assert_eq!(metric(&ma, "weir_rooms"), 0.0);
    assert_eq!(
        metric(
            &mb,
            "weir_rtmp_requests_total{outcome=\"ok\",request=\"publish\""
        ),
        1.0
    );
    assert_eq!(metric(&mb, "weir_participants"), 3.0);
    // An RTMP player aimed at A plays the stream from B (relayed: players do not
    // follow redirects).
    let play = format!(
        "rtmp://127.0.0.1:{}/live/pusher_cam?{}",
        a.rtmp,
        common::rtmp_query(&app, "rtmp-viewer", 30, 0xff)
    );
    let frames = probe_frames(&play, 2).await;
    assert!(frames > 10, "frames played through A: {frames}");
    let ma = a.metrics().await;
    assert_eq!(
        metric(
            &ma,
            "weir_play_requests_total{outcome=\"relayed\",protocol=\"rtmp\""
        ),
        1.0
    );
    // A push the room's node refuses is refused to the pusher with its reason: this
    // one has no send privileges (B decides; A only relays).
    let refused = format!(
        "rtmp://127.0.0.1:{}/live/pusher2_cam?{}",
        a.rtmp,
        common::rtmp_query(&app, "pusher2", 30, 0x01)
    );
    let out = tokio::process::Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=160x120:rate=10",
        ])
        .args(["-t", "2", "-c:v", "libx264", "-f", "flv", &refused])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let _ = ffmpeg.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_and_http_flv_reach_the_node_serving_the_room() {
    use common::peer::{h264, opus, RtcPeer};
    use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
    let redis = Redis::start().await;
    let (app_config, a, b, _c) = three_nodes(&redis).await;
    let app = AppKeys::from_config(&app_config).unwrap();
    let viewer = Watcher::join_url(
        &b.ws_url(),
        join_with(&app, "viewer", 40, 0xff, true),
        None,
        0,
    )
    .await;
    // A WHIP publisher (a webrtc-crate client offering without candidates, as OBS
    // does) posts to A: A forwards the offer to B and hands back B's answer, with an
    // absolute Location on B for its DELETE.
    let mut peer = RtcPeer::new().await;
    let video = peer
        .add_send_track(RtpCodecKind::Video, h264(), 0x5151)
        .await;
    let audio = peer
        .add_send_track(RtpCodecKind::Audio, opus(), 0x5252)
        .await;
    let offer: String = peer
        .offer()
        .await
        .lines()
        .filter(|l| !l.starts_with("a=candidate") && !l.starts_with("a=end-of-candidates"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    let token = app
        .issue_private_map_key(
            weir::auth::TokenKind::Jwt,
            "obs",
            &weir::auth::RoomId::Num(40),
            weir::auth::Privileges(0xff),
            weir::auth::unix_now(),
            3600,
        )
        .unwrap();
    let a_http: std::net::SocketAddr = format!("127.0.0.1:{}", a.http).parse().unwrap();
    let (status, headers, answer) = common::http_request(
        a_http,
        "POST",
        "/whip",
        &[
            ("Content-Type", "application/sdp"),
            ("Authorization", &format!("Bearer {token}")),
        ],
        &offer,
    )
    .await;
    assert_eq!(status, 201, "{answer}");
    let location = common::response_header(&headers, "location")
        .unwrap()
        .to_owned();
    let b_base = format!("http://127.0.0.1:{}", b.http);
    assert!(
        location.starts_with(&format!("{b_base}/whip/resource/")),
        "{location}"
    );
    peer.accept_answer(answer).await;
    peer.connected().await;
    let stop = Arc::new(AtomicBool::new(false));
    let pts = (video.payload_type().await, audio.payload_type().await);
    tokio::spawn(send_h264_and_opus(
        Arc::new(common::publisher::h264_access_units(4)),
        video.track.clone(),
        audio.track.clone(),
        pts,
        Pace::Until(stop.clone()),
    ));
    let stream = format!("{APP}_40_obs_main");
    until_received(&viewer, &stream, "video", 60, Duration::from_secs(15)).await;
    // An HTTP-FLV player asks A for the stream B has: it is redirected there and plays.
    let query = common::rtmp_query(&app, "flv-viewer", 40, 0xff);
    let flv = format!("http://127.0.0.1:{}/live/{stream}.flv?{query}", a.http);
    let frames = probe_frames(&flv, 3).await;
    assert!(frames > 10, "frames through the redirect: {frames}");
    let ma = a.metrics().await;
    assert_eq!(
        metric(&ma, "weir_whip_requests_total{outcome=\"forwarded\""),
        1.0
    );
    assert_eq!(
        metric(
            &ma,
            "weir_play_requests_total{outcome=\"redirected\",protocol=\"http-flv\""
        ),
        1.0
    );
    // DELETE at the Location ends the publication on B.
    let path = location.trim_start_matches(&b_base).to_owned();
    let b_http: std::net::SocketAddr = format!("127.0.0.1:{}", b.http).parse().unwrap();
    let (status, _, _) = common::http_request(b_http, "DELETE", &path, &[], "").await;
    assert_eq!(status, 200);
    stop.store(true, Ordering::Relaxed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_clients_are_back_on_a_live_node_within_10_s() {
    let redis = Redis::start().await;
    let (app_config, a, b, c) = three_nodes(&redis).await;
    let app = AppKeys::from_config(&app_config).unwrap();
    // Room 1 on B (presenter through B, a viewer through A); room 2 on C, untouched.
    let p1 = publish_through(&b.ws_url(), &app, "p1", 1).await;
    let mut relayed = {
        let (cl, joined) = Client::join(&a.ws_url(), join_with(&app, "v1", 1, 0xff, false)).await;
        joined_members(&joined);
        cl
    };
    let p2 = publish_through(&c.ws_url(), &app, "p2", 2).await;
    let w2 = Watcher::join_url(&c.ws_url(), join_with(&app, "v2", 2, 0xff, true), None, 0).await;
    until_received(&w2, &p2.stream, "video", 30, Duration::from_secs(15)).await;
    let mut p1 = p1;

    let killed = Instant::now();
    eprintln!("killing B at {:?}", std::time::SystemTime::now());
    b.signal("KILL");
    // Both of room 1's sessions end: the direct one at once, the relayed one with 1001.
    assert!(p1.signal.closed_within(Duration::from_secs(3)).await);
    let close = relayed.close_code(Duration::from_secs(3)).await;
    assert!(
        matches!(close, Some(Some((1001, _)))),
        "the relayed session ends with 1001 (join again): {close:?}"
    );
    let noticed = killed.elapsed();
    // As the SDK does on a close: join again, through the entry node (A here).
    let p1 = publish_through(&a.ws_url(), &app, "p1", 1).await;
    let v1 = Watcher::join_url(&a.ws_url(), join_with(&app, "v1", 1, 0xff, true), None, 0).await;
    until_received(&v1, &p1.stream, "video", 1, Duration::from_secs(10)).await;
    let back = killed.elapsed();
    eprintln!("node B killed: sessions closed after {noticed:?}, media back on a live node after {back:?}");
    assert!(back < Duration::from_secs(10), "back after {back:?}");
    let owner = redis.get("weir:room:1400000000/1").await;
    assert!(
        matches!(owner.as_deref(), Some("node-a") | Some("node-c")),
        "room 1 placed again on a live node: {owner:?}"
    );
    // Room 2 did not notice: its video kept coming through the kill (no gap over 1 s).
    let before = w2.received(&p2.stream, "video").await.len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let packets = w2.received(&p2.stream, "video").await;
    assert!(packets.len() > before, "room 2's video goes on");
    let gap = packets
        .windows(2)
        .filter(|w| w[0].at >= killed - Duration::from_secs(1))
        .map(|w| w[1].at - w[0].at)
        .max()
        .unwrap();
    assert!(
        gap < Duration::from_secs(1),
        "room 2's video paused {gap:?}"
    );
    let mc = c.metrics().await;
    assert!(metric(&mc, "weir_rooms") >= 1.0);
    // B is out of everyone's view once its record expires.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = a.cluster().await;
        if v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["id"] != "node-b")
        {
            break;
        }
        assert!(Instant::now() < deadline, "B still listed: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_takes_no_new_rooms_keeps_its_own_and_exits_when_they_end() {
    let redis = Redis::start().await;
    let app_config = AppKeys::generate_config(APP);
    let app = AppKeys::from_config(&app_config).unwrap();
    let a = cluster_node(&redis, &app_config, "node-a", |_| {}).await;
    let mut b = cluster_node(&redis, &app_config, "node-b", |c| c.cluster.drain_s = 60).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let p = publish_through(&b.ws_url(), &app, "host", 10).await;
    assert_eq!(
        redis.get("weir:room:1400000000/10").await.as_deref(),
        Some("node-b")
    );
    b.signal("TERM");
    // Out of placement at once: a new room's first join through B goes to A.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let v = a.cluster().await;
        let draining = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == "node-b" && n["draining"] == true);
        if draining {
            break;
        }
        assert!(Instant::now() < deadline, "B never said it drains: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut new, joined) = Client::join(&b.ws_url(), join_with(&app, "x", 11, 0xff, true)).await;
    joined_members(&joined);
    assert_eq!(
        redis.get("weir:room:1400000000/11").await.as_deref(),
        Some("node-a"),
        "a new room never lands on a draining node"
    );
    // B's own room goes on: a new member (through A) joins it there and gets media.
    let w = Watcher::join_url(
        &a.ws_url(),
        join_with(&app, "late", 10, 0xff, true),
        None,
        0,
    )
    .await;
    until_received(&w, &p.stream, "video", 30, Duration::from_secs(15)).await;
    assert!(b.child.try_wait().unwrap().is_none(), "B still serves");
    let body = common::http_get(b.metrics_addr(), "/readyz").await;
    assert!(
        body.contains(" 503 "),
        "B is not ready for new work: {body}"
    );
    // When its room ends (everyone leaves), B exits cleanly, long before drain_s.
    // (B relays `x`'s session to A: that one is B's to keep until it ends, too.)
    w.send(weir_signaling::ClientMessage::Leave);
    new.send(&weir_signaling::ClientMessage::Leave).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(w);
    drop(p);
    let ended = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(10), b.child.wait())
        .await
        .expect("B exits once its rooms have ended")
        .unwrap();
    assert!(status.success(), "a clean exit: {status:?}");
    eprintln!("B exited {:?} after its last room ended", ended.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_under_a_running_cluster_loses_no_room() {
    let mut redis = Redis::start().await;
    let (app_config, a, b, _c) = three_nodes(&redis).await;
    let app = AppKeys::from_config(&app_config).unwrap();
    let p = publish_through(&b.ws_url(), &app, "host", 20).await;
    let w = Watcher::join_url(&a.ws_url(), join_with(&app, "v", 20, 0xff, true), None, 0).await;
    until_received(&w, &p.stream, "video", 30, Duration::from_secs(15)).await;

    redis.restart().await; // empty
    let restarted = Instant::now();
    assert_eq!(redis.get("weir:room:1400000000/20").await, None);
    // The nodes write it all again: their records, and B's room.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let room = redis.get("weir:room:1400000000/20").await;
        let nodes = redis.command("SCARD weir:nodes").await;
        if room.as_deref() == Some("node-b") && nodes.as_deref() == Some(":3") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not rebuilt: room {room:?}, nodes {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "cluster state rebuilt {:?} after Redis came back empty",
        restarted.elapsed()
    );
    // At once (before A's next heartbeat has read B's record again), a join through
    // A finds the room on B: a live node's room is never taken from it.
    // Media never stopped, and a join through A still finds the room on B.
    let before = w.received(&p.stream, "video").await.len();
    let (_late, joined) = Client::join(&a.ws_url(), join_with(&app, "late", 20, 0xff, true)).await;
    let members = joined_members(&joined);
    assert!(members.contains(&"host".to_string()), "{members:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(w.received(&p.stream, "video").await.len() > before);
}

/// A room-service call (as the components make them) to one node's HTTP listener.
async fn weapp(node: &Node, path_and_query: &str, body: serde_json::Value) -> serde_json::Value {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", node.http).parse().unwrap();
    let (status, _, text) = common::http_request(
        addr,
        "POST",
        path_and_query,
        &[("Content-Type", "application/json")],
        &body.to_string(),
    )
    .await;
    assert_eq!(status, 200, "{path_and_query}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path_and_query}: {e}: {text}"))
}

/// `<rtc-room>`'s sequence with every call on a different node, as a load balancer
/// spreads them: login on A, push URL from A and the push to A, the room made on B,
/// the pusher added on C. The token works everywhere, room calls reach the room's
/// node, and the push moves from A to the room's node when add_pusher binds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mini_program_s_calls_and_push_may_reach_any_node() {
    let redis = Redis::start().await;
    let (app_config, a, b, c) = three_nodes(&redis).await;
    let app = AppKeys::from_config(&app_config).unwrap();
    let sig = app
        .issue_user_sig(
            weir::auth::TokenKind::V1,
            "alice",
            weir::auth::unix_now(),
            3600,
        )
        .unwrap();
    let enc = |s: &str| -> String { url::form_urlencoded::byte_serialize(s.as_bytes()).collect() };
    let login = weapp(
        &a,
        &format!(
            "/weapp/multi_room/login?accountType=0&sdkAppID={APP}&userSig={}&userID=alice",
            enc(&sig)
        ),
        serde_json::json!({}),
    )
    .await;
    assert_eq!(login["code"], 0, "{login}");
    let token = login["token"].as_str().unwrap().to_owned();
    let call = |action: &str| format!("/weapp/multi_room/{action}?userID=alice&token={token}");
    let url = weapp(
        &a,
        &call("get_push_url"),
        serde_json::json!({"userID": "alice"}),
    )
    .await;
    assert_eq!(url["code"], 0, "{url}");
    let push_url = url["pushURL"].as_str().unwrap().to_owned();
    assert!(
        push_url.contains(&format!(":{}/live/", a.rtmp)),
        "{push_url}"
    );
    let mut ffmpeg = common::source::ffmpeg_push(&push_url, 20);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The room is made on B, with A's token.
    let made = weapp(
        &b,
        &call("create_room"),
        serde_json::json!({"userID": "alice", "roomInfo": "claims desk"}),
    )
    .await;
    assert_eq!(made["code"], 0, "{made}");
    let room_id = made["roomID"].as_str().unwrap().to_owned();
    let room: u32 = room_id.parse().unwrap();
    assert_eq!(
        redis
            .get(&format!("weir:room:{APP}/{room_id}"))
            .await
            .as_deref(),
        Some("node-b"),
        "the room is mapped to B as soon as it is made"
    );
    // A browser-side member through C (relayed to B).
    let carol = Watcher::join_url(
        &c.ws_url(),
        join_with(&app, "carol", room, 0xff, true),
        None,
        0,
    )
    .await;
    // The pusher is added through C: forwarded to B, which binds alice's push; A moves
    // the push to B.
    let added = weapp(
        &c,
        &call("add_pusher"),
        serde_json::json!({"roomID": room_id, "roomInfo": "claims desk", "userID": "alice",
            "userName": "Alice", "userAvatar": "https://x/a.png", "pushURL": push_url}),
    )
    .await;
    assert_eq!(added["code"], 0, "{added}");
    let stream = format!("{APP}_alice");
    until_received(&carol, &stream, "video", 60, Duration::from_secs(20)).await;
    until_received(&carol, &stream, "audio", 50, Duration::from_secs(5)).await;
    // Any node lists it.
    let pushers = weapp(
        &a,
        &call("get_pushers"),
        serde_json::json!({"roomID": room_id}),
    )
    .await;
    assert_eq!(pushers["code"], 0, "{pushers}");
    let listed = pushers["pushers"].as_array().cloned().unwrap_or_default();
    assert!(listed.iter().any(|p| p["userID"] == "alice"), "{pushers}");
    let (ma, mc) = (a.metrics().await, c.metrics().await);
    assert_eq!(
        metric(
            &ma,
            "weir_rtmp_requests_total{outcome=\"moved\",request=\"publish\""
        ),
        1.0
    );
    assert!(
        metric(
            &mc,
            "weir_room_service_calls_total{kind=\"multi_room\",outcome=\"forwarded\""
        ) >= 1.0
    );
    // B renews the binding while the push is live (each heartbeat), so a pusher that
    // reconnects through another node later in a long call is still moved to B.
    let pttl = || async {
        let r = redis
            .command(&format!("PTTL weir:bind:{stream}"))
            .await
            .unwrap();
        r.trim_start_matches(':').parse::<i64>().unwrap()
    };
    let before = pttl().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = pttl().await;
    assert!(
        before > 0 && after > before - 1000,
        "binding not renewed: {before} -> {after} ms"
    );
    let _ = ffmpeg.kill().await;
}

/// Redis reached over TLS (`rediss://`, the server's certificate checked against
/// `redis_ca_file`): the nodes register, see each other and place a room; the
/// same URL without the CA (the system's roots do not know this one) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reach_redis_over_tls() {
    let redis = Redis::start_tls().await;
    let app = AppKeys::generate_config(APP);
    let (url, ca) = (redis.tls_url(), redis.ca_file().display().to_string());
    let tls = |c: &mut weir::config::Config| {
        c.cluster.redis_url = url.clone();
        c.cluster.redis_ca_file = ca.clone();
    };
    // A logs JSON, B text: each line names its node.
    let url_a = url.clone();
    let ca_a = ca.clone();
    let mut a = Node::start_app(app.clone(), &[("RUST_LOG", "weir=info")], |c| {
        c.cluster.redis_url = url_a.clone();
        c.cluster.redis_ca_file = ca_a.clone();
        c.cluster.node_id = "node-a".into();
        c.server.log_format = "json".into();
    })
    .await;
    a.echo_stderr("node-a");
    let mut b = Node::start_app(app.clone(), &[("RUST_LOG", "weir=info")], |c| {
        tls(c);
        c.cluster.node_id = "node-b".into();
    })
    .await;
    b.echo_stderr("node-b");
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in [&a, &b] {
        loop {
            let v = n.cluster().await;
            if v["nodes"].as_array().map_or(0, |n| n.len()) == 2 {
                break;
            }
            assert!(Instant::now() < deadline, "no TLS cluster: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(metric(&n.metrics().await, "weir_cluster_redis_up"), 1.0);
    }
    // A join through A: its room is placed and mapped, through TLS.
    let keys = AppKeys::from_config(&app).unwrap();
    let (_alice, _) = Client::join(&a.ws_url(), join_with(&keys, "alice", 31, 0xff, true)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.get(&format!("weir:room:{APP}/31")).await.is_none() {
        assert!(Instant::now() < deadline, "the room was not mapped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every line after the node knew its id names it.
    for (log, json) in [(&a.log, true), (&b.log, false)] {
        let lines = log.lock().unwrap().clone();
        let from = lines
            .iter()
            .position(|l| l.contains("cluster member"))
            .expect("the node said it joined the cluster");
        assert!(lines.len() > from + 1, "{lines:#?}");
        for l in &lines[from + 1..] {
            if json {
                let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
                assert_eq!(v["node"], "node-a", "{l}");
            } else {
                assert!(l.starts_with("node=node-b "), "{l}");
            }
        }
    }
    // Without the CA, the certificate is not trusted: the node serves alone.
    let lone = cluster_node(&redis, &app, "node-c", |c| {
        c.cluster.redis_url = redis.tls_url();
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(metric(&lone.metrics().await, "weir_cluster_redis_up"), 0.0);
}

/// `get_room_list` asked of any node lists the rooms of every node: the node asked
/// merges the others' lists (by room id) and pages the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_list_asked_of_any_node_lists_every_node_s_rooms() {
    let redis = Redis::start().await;
    let (app_config, a, b, _c) = three_nodes(&redis).await;
    let app = AppKeys::from_config(&app_config).unwrap();
    let enc = |s: &str| -> String { url::form_urlencoded::byte_serialize(s.as_bytes()).collect() };
    let mut rooms = Vec::new();
    let mut members = Vec::new();
    let mut calls = Vec::new();
    for (node, user, info) in [(&a, "alice", "desk a"), (&b, "bob", "desk b")] {
        let sig = app
            .issue_user_sig(
                weir::auth::TokenKind::V1,
                user,
                weir::auth::unix_now(),
                3600,
            )
            .unwrap();
        let login = weapp(
            node,
            &format!(
                "/weapp/multi_room/login?accountType=0&sdkAppID={APP}&userSig={}&userID={user}",
                enc(&sig)
            ),
            serde_json::json!({}),
        )
        .await;
        assert_eq!(login["code"], 0, "{login}");
        let token = login["token"].as_str().unwrap().to_owned();
        let call =
            move |action: &str| format!("/weapp/multi_room/{action}?userID={user}&token={token}");
        // Made through the node: the room is that node's.
        let made = weapp(
            node,
            &call("create_room"),
            serde_json::json!({"userID": user, "roomInfo": info}),
        )
        .await;
        assert_eq!(made["code"], 0, "{made}");
        let room_id = made["roomID"].as_str().unwrap().to_owned();
        // A room is listed while someone is in it.
        let (member, _) = Client::join(
            &node.ws_url(),
            join_with(
                &app,
                &format!("{user}-tab"),
                room_id.parse().unwrap(),
                0xff,
                true,
            ),
        )
        .await;
        members.push(member);
        rooms.push(room_id);
        calls.push(call);
    }
    assert_eq!(
        redis
            .get(&format!("weir:room:{APP}/{}", rooms[0]))
            .await
            .as_deref(),
        Some("node-a")
    );
    assert_eq!(
        redis
            .get(&format!("weir:room:{APP}/{}", rooms[1]))
            .await
            .as_deref(),
        Some("node-b")
    );
    let mut sorted = rooms.clone();
    sorted.sort();
    let ids = |list: &serde_json::Value| -> Vec<String> {
        assert_eq!(list["code"], 0, "{list}");
        list["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["roomID"].as_str().unwrap().to_owned())
            .collect()
    };
    // Asked of either node, by either user: both rooms.
    for (node, call) in [(&a, &calls[1]), (&b, &calls[0])] {
        let list = weapp(
            node,
            &call("get_room_list"),
            serde_json::json!({"index": 0, "cnt": 20}),
        )
        .await;
        assert_eq!(ids(&list), sorted, "{list}");
    }
    // Paged across nodes: the second room alone.
    let page = weapp(
        &a,
        &calls[0]("get_room_list"),
        serde_json::json!({"index": 1, "cnt": 1}),
    )
    .await;
    assert_eq!(ids(&page), vec![sorted[1].clone()], "{page}");
}

/// A node whose HTTP listener is TLS advertises `https://…`: a session joined through
/// another node is relayed to it over `wss://`, the certificate checked against
/// `node_ca_file`; a node without that CA cannot reach it (counted), and its client
/// is told the room is unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_to_a_tls_node_go_over_wss() {
    let redis = Redis::start().await;
    let app = AppKeys::generate_config(APP);
    let certs = tempfile::tempdir().unwrap();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_file, key_file) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert_file, key.cert.pem()).unwrap();
    std::fs::write(&key_file, key.signing_key.serialize_pem()).unwrap();
    // A: HTTPS only, advertised by name.
    let a = cluster_node(&redis, &app, "node-a", |c| {
        let port = c.server.http_addr.rsplit(':').next().unwrap().to_owned();
        c.server.tls_cert_file = cert_file.display().to_string();
        c.server.tls_key_file = key_file.display().to_string();
        c.cluster.advertise_http = format!("https://localhost:{port}");
    })
    .await;
    // B takes no rooms itself (as a full node): every room it is asked for goes to A.
    let ca = cert_file.display().to_string();
    let b = cluster_node(&redis, &app, "node-b", |c| {
        c.server.max_rooms = 0;
        c.cluster.node_ca_file = ca.clone();
    })
    .await;
    // C, the same without the CA.
    let c = cluster_node(&redis, &app, "node-c", |c| c.server.max_rooms = 0).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in [&b, &c] {
        while n.cluster().await["nodes"].as_array().map_or(0, |v| v.len()) < 3 {
            assert!(
                Instant::now() < deadline,
                "the nodes did not see each other"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let keys = AppKeys::from_config(&app).unwrap();
    let (mut alice, joined) =
        Client::join(&b.ws_url(), join_with(&keys, "alice", 60, 0xff, true)).await;
    assert!(matches!(joined, ServerMessage::Joined { .. }), "{joined:?}");
    assert_eq!(
        redis.get(&format!("weir:room:{APP}/60")).await.as_deref(),
        Some("node-a")
    );
    let published = alice.publish(true, true).await;
    assert!(published.stream_id.contains("alice"));
    assert_eq!(metric(&a.metrics().await, "weir_participants"), 1.0);
    assert_eq!(
        metric(&b.metrics().await, "weir_joins_total{outcome=\"relayed\"}"),
        1.0
    );
    // C does not trust A's certificate: the join is refused, and says why.
    let mut carol = Client::connect(&c.ws_url()).await;
    carol
        .send(&weir_signaling::ClientMessage::Join(join_with(
            &keys, "carol", 60, 0xff, true,
        )))
        .await;
    let refused = carol
        .expect(|m| match m {
            ServerMessage::Error { code, message, .. } => Some((*code, message.clone())),
            _ => None,
        })
        .await;
    assert_eq!(
        refused.0,
        weir_signaling::ErrorCode::Unavailable,
        "{refused:?}"
    );
    // A is unreachable from C (counted); C takes no rooms, so there is nowhere else.
    assert!(
        metric(
            &c.metrics().await,
            "weir_cluster_routes_total{route=\"unreachable\"}"
        ) >= 1.0
    );
}

/// A receive-only member `user` of `room`, joined through `node`.
/// What `weir cluster status` prints for the cluster in `redis` (the operator's view).
async fn cluster_status(redis: &Redis) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["cluster", "status", "--redis", &redis.url()])
        .output()
        .await
        .unwrap()
}

async fn watch_through(node: &Node, app: &AppKeys, user: &str, room: u32) -> Watcher {
    Watcher::join_url(
        &node.ws_url(),
        join_with(app, user, room, 0xff, true),
        None,
        0,
    )
    .await
}

/// Waits until `node`'s view of the cluster says `node_id`'s record lists `room` in
/// its `field` (`spilling`, `carrying`).
async fn until_listed(node: &Node, node_id: &str, field: &str, room: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = node.cluster().await;
        let listed = v["nodes"].as_array().into_iter().flatten().any(|n| {
            n["id"] == node_id
                && n[field]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|r| r == room))
        });
        if listed {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{node_id} never listed {room} in {field}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_room_spreads_onto_another_node_which_relays_it_with_nack_and_pli() {
    // Chrome first: its start is slow on 2 cores.
    let browser = common::browser::Browser::launch().await;
    let redis = Redis::start().await;
    // Node B takes 2 members a room; the others reach its media port through a link
    // that loses one RTP packet in 25 of what B sends them.
    let b_udp = free_port();
    let mut n = 0u64;
    let link = common::relay::Relay::start(
        format!("127.0.0.1:{b_udp}").parse().unwrap(),
        Box::new(move |d| {
            common::relay::rtp_payload_type(d).is_some() && {
                n += 1;
                n % 25 == 0
            }
        }),
    )
    .await;
    let link_addr = link.addr.to_string();
    let (app_config, a, b, c) = three_nodes_with(&redis, |cfg| {
        cfg.server.udp_addr = format!("127.0.0.1:{b_udp}");
        cfg.cluster.advertise_udp = link_addr.clone();
        cfg.cluster.spill_members = 2;
    })
    .await;
    let app = AppKeys::from_config(&app_config).unwrap();
    let room = "1400000000/778";
    let publisher = publish_through(&b.ws_url(), &app, "presenter", 778).await;
    let on_b = watch_through(&b, &app, "viewer-b", 778).await;
    until_received(
        &on_b,
        &publisher.stream,
        "video",
        30,
        Duration::from_secs(15),
    )
    .await;
    // Two members: B says the room spills.
    until_listed(&c, "node-b", "spilling", room).await;
    // A third member through C joins there: C relays the room from B.
    let on_c = watch_through(&c, &app, "viewer-c", 778).await;
    until_received(
        &on_c,
        &publisher.stream,
        "video",
        60,
        Duration::from_secs(15),
    )
    .await;
    until_received(
        &on_c,
        &publisher.stream,
        "audio",
        50,
        Duration::from_secs(5),
    )
    .await;
    let (mb, mc) = (b.metrics().await, c.metrics().await);
    // B: the presenter, viewer-b and C's hidden relay; C: viewer-c and the presenter's
    // stand-in, one edge relay.
    assert_eq!(metric(&mb, "weir_participants"), 3.0);
    assert_eq!(metric(&mc, "weir_participants"), 2.0);
    assert_eq!(metric(&mc, "weir_cluster_relays{kind=\"edge\""), 1.0);
    assert_eq!(metric(&mc, "weir_cluster_routes_total{route=\"edge\""), 1.0);
    // Nobody on B hears of the relay.
    let told: Vec<String> = on_b
        .events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(_, m)| match m {
            ServerMessage::MemberJoined { user_id } => Some(user_id.clone()),
            _ => None,
        })
        .collect();
    assert!(
        told.iter().all(|u| !u.starts_with("weir-relay")),
        "{told:?}"
    );
    // A fourth member, through A, goes to the node that carries the room already.
    until_listed(&a, "node-c", "carrying", room).await;
    // The operator sees it: `weir cluster status`.
    let out = cluster_status(&redis).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("spilling from node-b: {room}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("carried by node-c: {room}")),
        "{text}"
    );
    let plis = |m: &str, d: &str| metric(m, &format!("weir_plis_total{{direction=\"{d}\""));
    // Counts before the fourth member (a series not there yet has counted nothing).
    let before = |m: &str, d: &str| {
        if m.contains(&format!("weir_plis_total{{direction=\"{d}\"")) {
            plis(m, d)
        } else {
            0.0
        }
    };
    let (mb, mc) = (b.metrics().await, c.metrics().await);
    let (to_origin, from_subscribers) = (before(&mc, "to_origin"), before(&mb, "from_subscriber"));
    let via_a = watch_through(&a, &app, "viewer-a", 778).await;
    until_received(
        &via_a,
        &publisher.stream,
        "video",
        60,
        Duration::from_secs(15),
    )
    .await;
    let (ma, mb, mc) = (a.metrics().await, b.metrics().await, c.metrics().await);
    assert_eq!(metric(&ma, "weir_joins_total{outcome=\"relayed\""), 1.0);
    assert_eq!(
        metric(&ma, "weir_cluster_routes_total{route=\"edge_elsewhere\""),
        1.0
    );
    assert_eq!(metric(&mc, "weir_cluster_routes_total{route=\"edge\""), 2.0);
    assert_eq!(metric(&mc, "weir_participants"), 3.0);
    assert_eq!(metric(&mb, "weir_participants"), 3.0, "one relay per node");
    // PLI across the relay: the new member's keyframe request goes up from C to B, and
    // B asks the publisher. (Joining, it needed none: C replays the relayed stream's
    // current GOP to a newcomer.) Asked again until one passes C's per-stream
    // throttle.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mc = loop {
        assert!(via_a.request_keyframe(&publisher.stream).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mc = c.metrics().await;
        if before(&mc, "to_origin") > to_origin {
            break mc;
        }
        assert!(Instant::now() < deadline, "C sent no PLI to B");
    };
    assert!(plis(&mc, "from_subscriber") >= 1.0);
    let mb = b.metrics().await;
    assert!(
        plis(&mb, "from_subscriber") > from_subscribers,
        "B got no PLI from C"
    );
    assert!(plis(&mb, "to_publisher") >= 1.0);
    // NACK across the relay: the link lost packets, C asked B again for them, and
    // what C's member received has no hole.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lost = link.dropped.load(Ordering::Relaxed);
    let mb = b.metrics().await;
    eprintln!("the link lost {lost} packets");
    let nacked = metric(&mb, "weir_nacks_total{event=\"packets_requested\"");
    eprintln!("B was asked for {nacked} again");
    assert!(lost >= 20, "the link lost only {lost}");
    assert!(
        nacked >= lost as f64 * 0.5,
        "B was asked for {nacked} of {lost} lost"
    );
    let mut seqs: Vec<u16> = on_c
        .received(&publisher.stream, "video")
        .await
        .iter()
        .map(|r| r.seq)
        .collect();
    let received = seqs.len();
    seqs.sort_unstable();
    seqs.dedup();
    // Sequence numbers here are C's (one rewriter per downtrack): contiguous from the
    // first. The last half second may still be on its way back.
    let span = seqs.last().unwrap().wrapping_sub(seqs[0]) as usize + 1;
    let coverage = seqs.len() as f64 / span as f64;
    eprintln!(
        "viewer-c: {received} video packets, {} distinct of {span}",
        seqs.len()
    );
    assert!(
        coverage > 0.995,
        "viewer-c got {coverage:.4} of its video packets"
    );
    // A relay carries what members there receive: with no one on C receiving the
    // stream, C unsubscribes at B; when one does again, it subscribes again.
    let b = &b;
    let subscriptions_on_b = |want: f64| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let m = b.metrics().await;
            if metric(&m, "weir_subscriptions") == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "B's subscriptions stayed at {}",
                metric(&m, "weir_subscriptions")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    subscriptions_on_b(2.0).await;
    let unsubscribe = || weir_signaling::ClientMessage::Unsubscribe {
        stream_ids: vec![publisher.stream.clone()],
    };
    on_c.send(unsubscribe());
    via_a.send(unsubscribe());
    subscriptions_on_b(1.0).await;
    let before = on_c.received(&publisher.stream, "video").await.len();
    on_c.send(weir_signaling::ClientMessage::Subscribe {
        stream_ids: vec![publisher.stream.clone()],
    });
    subscriptions_on_b(2.0).await;
    until_received(
        &on_c,
        &publisher.stream,
        "video",
        before + 60,
        Duration::from_secs(15),
    )
    .await;
    // Chrome, through the SDK on C's page, is a member there too, and decodes the
    // relayed video.
    let chrome = browser.open(&format!("http://127.0.0.1:{}/", c.http)).await;
    let options = serde_json::to_string(&join_with(&app, "chrome", 778, 0xff, true)).unwrap();
    chrome
        .eval(&common::browser::sdk_join_js(&options, ""))
        .await;
    let stats = format!(
        r#"(async () => {{ const s = (await window.room.getStats()).get('{}');
        return {{ frames: s ? s.video.framesDecoded || 0 : 0 }}; }})()"#,
        publisher.stream
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = chrome.eval(&stats).await;
        if got["frames"].as_u64().unwrap_or(0) > 30 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Chrome on C decodes the relayed stream: {got}\n{}",
            browser.console_dump()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    chrome.eval("window.room.leave()").await;
    // The members through C leave: C's relay ends, and B's hidden member goes.
    on_c.send(weir_signaling::ClientMessage::Leave);
    via_a.send(weir_signaling::ClientMessage::Leave);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (mb, mc) = (b.metrics().await, c.metrics().await);
        if metric(&mc, "weir_cluster_relays{kind=\"edge\"") == 0.0
            && metric(&mb, "weir_participants") == 2.0
            && metric(&mc, "weir_participants") == 0.0
        {
            break;
        }
        assert!(Instant::now() < deadline, "C's relay did not end:\n{mc}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(publisher);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_a_spilled_room_move_when_its_node_dies() {
    let redis = Redis::start().await;
    // The backend hears every node's room events.
    let events: Arc<std::sync::Mutex<Vec<serde_json::Value>>> = Arc::default();
    let port = free_port();
    let router = axum::Router::new().route(
        "/cb",
        axum::routing::post({
            let events = events.clone();
            move |body: String| async move {
                events
                    .lock()
                    .unwrap()
                    .push(serde_json::from_str(&body).unwrap());
                "{\"code\":0}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let (app_config, _a, b, c) = three_nodes_tweaked(
        &redis,
        |cfg| {
            cfg.callbacks.url = format!("http://127.0.0.1:{port}/cb");
            cfg.callbacks.key = "k".into();
        },
        |cfg| cfg.cluster.spill_members = 1,
    )
    .await;
    // (event type, user) of the room events the backend got so far.
    let room_events = || -> Vec<(u64, String)> {
        events
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["EventGroupId"] == 1 && v["EventInfo"]["RoomId"] == 779)
            .map(|v| {
                (
                    v["EventType"].as_u64().unwrap(),
                    v["EventInfo"]["UserId"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    };
    let app = AppKeys::from_config(&app_config).unwrap();
    let publisher = publish_through(&b.ws_url(), &app, "presenter", 779).await;
    until_listed(&c, "node-b", "spilling", "1400000000/779").await;
    let on_c = watch_through(&c, &app, "viewer-c", 779).await;
    until_received(
        &on_c,
        &publisher.stream,
        "video",
        30,
        Duration::from_secs(15),
    )
    .await;
    // The backend heard of the room once (from B), of the presenter once, and of the
    // member on C: nothing of C's copy of the room, its stand-in or B's hidden relay.
    let deadline = Instant::now() + Duration::from_secs(10);
    while room_events().len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        room_events(),
        vec![
            (101, String::new()),
            (103, "presenter".into()),
            (103, "viewer-c".into())
        ]
    );
    // An edge member may only receive: its privileges say so, and a publish is refused.
    on_c.send(weir_signaling::ClientMessage::Publish {
        audio: true,
        video: true,
        min_bitrate: None,
        max_bitrate: None,
        screen: false,
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while !on_c
        .events
        .lock()
        .unwrap()
        .iter()
        .any(|(_, m)| matches!(m, ServerMessage::Error { request: Some(r), .. } if r == "publish"))
    {
        assert!(
            Instant::now() < deadline,
            "the edge member's publish was not refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let killed = Instant::now();
    eprintln!("killing B at {:?}", std::time::SystemTime::now());
    b.signal("KILL");
    // The relay is lost: C tells its members to move (the SDK joins again).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = on_c.events.lock().unwrap().clone();
        if events.iter().any(|(_, m)| {
            matches!(
                m,
                ServerMessage::Left {
                    reason: LeaveReason::ServerShutdown
                }
            )
        }) {
            for (at, m) in &events {
                if *at > killed {
                    eprintln!(
                        "+{:?}: {}",
                        *at - killed,
                        m.to_json().chars().take(80).collect::<String>()
                    );
                }
            }
            eprintln!(
                "C's member told to move {:?} after B was killed",
                killed.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "C's member was not told: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mc = c.metrics().await;
    assert_eq!(metric(&mc, "weir_cluster_relays{kind=\"edge\""), 0.0);
    assert_eq!(metric(&mc, "weir_participants"), 0.0);
    // C's member left there (told to move: reason 5); C made and dismissed no room.
    let deadline = Instant::now() + Duration::from_secs(10);
    while room_events().len() < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(room_events()[3..], [(104, "viewer-c".into())]);
    let reason = events
        .lock()
        .unwrap()
        .iter()
        .find(|v| v["EventType"] == 104)
        .map(|v| v["EventInfo"]["Reason"].clone());
    assert_eq!(reason, Some(serde_json::json!(5)));
    drop(publisher);
}
