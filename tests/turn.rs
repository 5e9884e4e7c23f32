//! TURN for networks where nothing but a relay gets through: a real coturn (Debian's
//! `turnserver`, `use-auth-secret`) and Weir configured with its URL and shared
//! secret; two Chrome tabs forced to relay-only (`iceTransportPolicy: "relay"`)
//! publish and see each other, every one of their connections on a relay candidate
//! pair, with the short-lived credentials the join answer handed out.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::browser::{Browser, Js};
use common::TestServer;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

const ROOM: u32 = 3478;
const SECRET: &str = "a-shared-turn-secret";

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// coturn on loopback with TURN REST API credentials; returns once it listens.
async fn coturn(port: u16) -> tokio::process::Child {
    let mut child = tokio::process::Command::new("turnserver")
        .args(["-n", "--no-cli", "--no-tls", "--no-dtls", "--simple-log"])
        .args([
            "--log-file=stdout",
            "--listening-ip=127.0.0.1",
            "--relay-ip=127.0.0.1",
        ])
        .arg(format!("--listening-port={port}"))
        .args(["--min-port=49160", "--max-port=49400"])
        .args([
            "--use-auth-secret",
            &format!("--static-auth-secret={SECRET}"),
        ])
        .args(["--realm=weir.test", "--allow-loopback-peers"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("coturn's turnserver runs (scripts/install-deps.sh test installs it)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(l)) = lines.next_line().await {
            if l.contains("Total General servers") {
                break;
            }
        }
    })
    .await
    .expect("coturn starts");
    // Keep reading its log, so that the pipe never fills.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

async fn join_relay_only(page: &impl Js, options: &str) -> Value {
    page.eval(&format!(
        r#"(async () => {{
            const {{ WeirRoom }} = await import('/sdk/weir.js');
            const room = new WeirRoom({{ ...{options}, iceTransportPolicy: 'relay' }});
            window.room = room;
            room.on('remoteStream', ({{ stream }}) => {{
                const v = document.createElement('video');
                v.autoplay = true; v.muted = true; v.srcObject = stream;
                document.body.append(v);
                v.play().catch(() => {{}});
            }});
            await room.join();
            await room.publish({{ audio: true, video: true }});
            return {{ stream: room.ownStream.streamId, iceServers: room.iceServers }};
        }})()"#
    ))
    .await
}

/// The candidate type of each connection's selected pair's local side.
async fn local_candidate_types(page: &impl Js) -> Value {
    page.eval(
        r#"(async () => {
            const out = [];
            for (const pc of [window.room.publisher, window.room.subscriber]) {
                if (!pc) { out.push(null); continue; }
                const st = await pc.getStats();
                let pair = null;
                st.forEach((s) => {
                    if (s.type === 'transport' && s.selectedCandidatePairId) pair = st.get(s.selectedCandidatePairId);
                });
                const local = pair && st.get(pair.localCandidateId);
                out.push(local ? local.candidateType : null);
            }
            return out;
        })()"#,
    )
    .await
}

async fn frames_of(page: &impl Js, stream: &str) -> u64 {
    page.eval(&format!(
        "(async () => {{ const s = (await window.room.getStats()).get('{stream}'); \
         return s ? (s.video.framesDecoded || 0) : 0; }})()"
    ))
    .await
    .as_u64()
    .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_only_chrome_clients_exchange_media_through_turn() {
    let port = free_udp_port();
    let _turn = coturn(port).await;
    let turn_url = format!("turn:127.0.0.1:{port}?transport=udp");
    let url = turn_url.clone();
    let t = TestServer::start_with(move |c| {
        c.server.turn_urls = vec![url];
        c.server.turn_secret = SECRET.into();
    })
    .await;
    let browser = Browser::launch().await;
    let page_url = format!("http://{}/", t.server.http_addr);
    let (a, b) = (browser.open(&page_url).await, browser.open(&page_url).await);
    let opts = |u: &str| serde_json::to_string(&t.join(u, ROOM, 0xff)).unwrap();
    let ja = join_relay_only(&a, &opts("alice")).await;
    let jb = join_relay_only(&b, &opts("bob")).await;
    // The join answer named the TURN server with a TURN REST API credential.
    let servers = &ja["iceServers"];
    let turn = servers
        .as_array()
        .and_then(|s| s.iter().find(|s| s["urls"][0] == turn_url.as_str()))
        .unwrap_or_else(|| panic!("no TURN server in the join answer: {ja}"));
    let username = turn["username"].as_str().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, "alice");
    assert!(expiry.parse::<u64>().unwrap() > weir::auth::unix_now() + 3600);
    let (sa, sb) = (
        ja["stream"].as_str().unwrap().to_owned(),
        jb["stream"].as_str().unwrap().to_owned(),
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (fa, fb) = (frames_of(&a, &sb).await, frames_of(&b, &sa).await);
        if fa > 30 && fb > 30 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "through TURN: alice decoded {fa} frames of bob, bob {fb} of alice\n{}",
            browser.console_dump()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A WHIP publisher is told of the TURN server too, in `Link` headers (RFC 9725 §4.6).
    let mut peer = common::peer::RtcPeer::new().await;
    peer.add_send_track(
        rtc::rtp_transceiver::rtp_sender::RtpCodecKind::Video,
        common::peer::h264(),
        0x5151,
    )
    .await;
    let offer = peer.offer().await;
    let token = t
        .app
        .issue_private_map_key(
            weir::auth::TokenKind::Jwt,
            "obs",
            &weir::auth::RoomId::Num(ROOM),
            weir::auth::Privileges(0xff),
            weir::auth::unix_now(),
            600,
        )
        .unwrap();
    let raw = whip_post(t.server.http_addr, &token, &offer).await;
    let link = raw
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("link:"))
        .unwrap_or_else(|| panic!("no Link header: {raw}"));
    assert!(
        link.contains(&format!("<{turn_url}>"))
            && link.contains("rel=\"ice-server\"")
            && link.contains(":obs\"")
            && link.contains("credential-type=\"password\""),
        "{link}"
    );
    for (name, page) in [("alice", &a), ("bob", &b)] {
        let types = local_candidate_types(page).await;
        assert_eq!(
            types,
            serde_json::json!(["relay", "relay"]),
            "{name}'s publisher and subscriber connections"
        );
    }
}

/// A WHIP POST; the raw response head.
async fn whip_post(addr: std::net::SocketAddr, token: &str, offer: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST /whip HTTP/1.1\r\nHost: weir\r\nConnection: close\r\nContent-Type: application/sdp\r\n\
         Authorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n{offer}",
        offer.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    assert!(text.starts_with("HTTP/1.1 201"), "{text}");
    text.split("\r\n\r\n").next().unwrap_or_default().to_owned()
}
