//! Shared helpers for integration tests: an in-process server with a fresh app, and a
//! signaling client speaking the real websocket protocol.
#![allow(dead_code)]

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use weir::auth::{AppKeys, Privileges, RoomId, TokenKind};
use weir::config::{AppConfig, Config};
use weir_signaling::{ClientMessage, Join, ServerMessage, PROTOCOL_VERSION};

pub mod aiortc;
pub mod browser;
pub mod firefox;
pub mod media;
pub mod node;
pub mod peer;
pub mod plot;
pub mod publisher;
pub mod redis;
pub mod relay;
pub mod rpc;
pub mod source;
pub mod watcher;

pub const APP: u64 = 1_400_000_000;

pub struct TestServer {
    pub server: weir::server::Server,
    pub app: AppKeys,
    pub config: Config,
}

/// Waits until `selector`'s sample is `value` (the series must exist), at most
/// `within`.
#[allow(dead_code)]
pub async fn wait_for_metric(
    t: &TestServer,
    selector: &str,
    value: f64,
    within: std::time::Duration,
) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let m = t.metrics().await;
        if m.lines().any(|l| l.starts_with(selector)) && metric(&m, selector) == value {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{selector} did not become {value} within {within:?}: {m}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_app(AppKeys::generate_config(APP), tweak).await
    }

    /// A server of `app_config` (several servers of one cluster share their apps).
    pub async fn start_app(app_config: AppConfig, tweak: impl FnOnce(&mut Config)) -> Self {
        // A failing test shows the server's side of it (the test writer's output is
        // kept for failures only); RUST_LOG=weir=debug shows more.
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("weir=info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
        let mut config = Config::development(None);
        config.apps = vec![app_config.clone()];
        config.server.http_addr = "127.0.0.1:0".into();
        config.server.udp_addr = "127.0.0.1:0".into();
        config.server.tcp_addr = "127.0.0.1:0".into();
        config.server.rtmp_addr = "127.0.0.1:0".into();
        config.server.metrics_addr = "127.0.0.1:0".into();
        config.server.announce_ips = vec!["127.0.0.1".into()];
        config.server.shutdown_grace_s = 2;
        tweak(&mut config);
        let keyring = weir::auth::Keyring::from_configs(&config.apps).unwrap();
        let server = weir::server::start(config.clone(), keyring).await.unwrap();
        Self {
            server,
            app: AppKeys::from_config(&app_config).unwrap(),
            config,
        }
    }

    /// The server's WebRTC UDP address.
    pub fn udp_addr(&self) -> std::net::SocketAddr {
        self.server.udp_addr
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.server.http_addr)
    }

    /// A join message with valid v2 credentials for `user` in numeric `room`.
    pub fn join(&self, user: &str, room: u32, privileges: u32) -> Join {
        join_with(&self.app, user, room, privileges, true)
    }

    /// `/metrics`, from the metrics listener.
    pub async fn metrics(&self) -> String {
        http_get(
            self.server.metrics_addr.expect("a metrics listener"),
            "/metrics",
        )
        .await
    }
}

/// A join message with valid v2 credentials of `app` (an hour) for `user` in numeric
/// `room` with `privileges`.
pub fn join_with(
    app: &AppKeys,
    user: &str,
    room: u32,
    privileges: u32,
    auto_subscribe: bool,
) -> Join {
    let now = weir::auth::unix_now();
    Join {
        protocol: PROTOCOL_VERSION,
        sdk_app_id: APP,
        user_id: user.into(),
        user_sig: app.issue_user_sig(TokenKind::V2, user, now, 3600).unwrap(),
        room_id: Some(room),
        str_room_id: None,
        private_map_key: app
            .issue_private_map_key(
                TokenKind::V2,
                user,
                &RoomId::Num(room),
                Privileges(privileges),
                now,
                3600,
            )
            .unwrap(),
        auto_subscribe,
        congestion_policy: None,
    }
}

/// The value of a series in a `/metrics` text, summed over every series it selects:
/// `selector` is a name, a name with its labels, or a name with a prefix of its labels
/// (`name{a="x"`). A series that is absent fails the test: a renamed or never-created
/// metric must not read as zero.
pub fn metric(text: &str, selector: &str) -> f64 {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(selector)?;
            let next = rest.chars().next()?;
            // `weir_x` must not select `weir_x_total`.
            if ![' ', '{', ',', '}'].contains(&next) {
                return None;
            }
            l.rsplit(' ').next()?.parse::<f64>().ok()
        })
        .collect();
    assert!(
        !values.is_empty(),
        "no series {selector} in /metrics:\n{text}"
    );
    values.iter().sum()
}

/// A minimal HTTP/1.0 GET, enough for /metrics and /healthz.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    http_get_with(addr, path, "").await
}

/// [`http_get`] with extra header lines (each ending in `\r\n`).
pub async fn http_get_with(addr: std::net::SocketAddr, path: &str, headers: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n{headers}\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// One HTTP/1.1 request; (status, headers lower-cased, body).
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Vec<(String, String)>, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: weir\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    tokio::io::AsyncWriteExt::write_all(&mut s, req.as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut raw),
    )
    .await
    .expect("an answer")
    .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

pub fn response_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Messages `expect` skipped; later reads see them first, so nothing is lost.
    stash: std::collections::VecDeque<ServerMessage>,
    /// The close a read met (`Some(None)`: the socket ended without a close frame).
    closed: Option<Option<(u16, String)>>,
}

impl Client {
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Self {
            ws,
            stash: Default::default(),
            closed: None,
        }
    }

    pub async fn send(&mut self, msg: &ClientMessage) {
        self.ws
            .send(Message::Text(serde_json::to_string(msg).unwrap().into()))
            .await
            .unwrap();
    }

    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::Binary(bytes.into())).await.unwrap();
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.ws.send(Message::Text(text.into())).await.unwrap();
    }

    /// The next server message, within 10 s.
    pub async fn recv(&mut self) -> ServerMessage {
        self.try_recv(Duration::from_secs(10))
            .await
            .expect("a server message within 10 s")
    }

    /// The next server message, or None if the socket closed or nothing came in time.
    pub async fn try_recv(&mut self, wait: Duration) -> Option<ServerMessage> {
        if let Some(m) = self.stash.pop_front() {
            return Some(m);
        }
        self.read(wait).await
    }

    /// True when the server closes the socket within `wait` (stashed and further
    /// messages are discarded); false if it stays open.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        self.close_code(wait).await.is_some()
    }

    /// The close code and reason the server closes the socket with within `wait`
    /// (`Some(None)`: closed with no close frame; `None`: still open). Messages before
    /// the close are discarded.
    pub async fn close_code(&mut self, wait: Duration) -> Option<Option<(u16, String)>> {
        self.stash.clear();
        if let Some(c) = self.closed.clone() {
            return Some(c);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await {
                Err(_) => return None,
                Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(None)))) => {
                    return Some(None)
                }
                Ok(Some(Ok(Message::Close(Some(f))))) => {
                    return Some(Some((f.code.into(), f.reason.to_string())))
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    async fn read(&mut self, wait: Duration) -> Option<ServerMessage> {
        loop {
            match tokio::time::timeout(wait, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => return Some(ServerMessage::parse(&t).unwrap()),
                Ok(Some(Ok(Message::Close(f)))) => {
                    self.closed = Some(f.map(|f| (f.code.into(), f.reason.to_string())));
                    return None;
                }
                Ok(None) | Ok(Some(Err(_))) => {
                    self.closed.get_or_insert(None);
                    return None;
                }
                Err(_) => return None,
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The first message (stashed or new) that matches; the others stay stashed.
    pub async fn expect<T>(&mut self, pick: impl FnMut(&ServerMessage) -> Option<T>) -> T {
        self.try_recv_matching(Duration::from_secs(10), pick)
            .await
            .expect("the expected message within 10 s")
    }

    /// The first message (stashed or new) that matches, or None when `wait` passes
    /// first; the others stay stashed for later reads.
    pub async fn try_recv_matching<T>(
        &mut self,
        wait: Duration,
        mut pick: impl FnMut(&ServerMessage) -> Option<T>,
    ) -> Option<T> {
        if let Some(i) = self.stash.iter().position(|m| pick(m).is_some()) {
            let m = self.stash.remove(i).unwrap();
            return pick(&m);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let msg = self.read(left).await?;
            match pick(&msg) {
                Some(v) => return Some(v),
                None => self.stash.push_back(msg),
            }
        }
    }

    /// Publishes (no bitrate bounds) and waits for the server's `published`: the stream.
    pub async fn publish(&mut self, audio: bool, video: bool) -> weir_signaling::StreamInfo {
        self.send(&ClientMessage::Publish {
            audio,
            video,
            min_bitrate: None,
            max_bitrate: None,
            screen: false,
        })
        .await;
        self.expect(|m| match m {
            ServerMessage::Published { stream } => Some(stream.clone()),
            _ => None,
        })
        .await
    }

    pub async fn join(url: &str, join: Join) -> (Self, ServerMessage) {
        let mut c = Self::connect(url).await;
        c.send(&ClientMessage::Join(join)).await;
        let answer = c.recv().await;
        (c, answer)
    }
}

/// The query string of an RTMP push or play URL with room credentials (v2 userSig and
/// privateMapKey, an hour's validity).
pub fn rtmp_query(app: &AppKeys, user: &str, room: u32, privileges: u32) -> String {
    let now = weir::auth::unix_now();
    let sig = app.issue_user_sig(TokenKind::V2, user, now, 3600).unwrap();
    let pmk = app
        .issue_private_map_key(
            TokenKind::V2,
            user,
            &RoomId::Num(room),
            Privileges(privileges),
            now,
            3600,
        )
        .unwrap();
    let enc = |s: &str| -> String { url::form_urlencoded::byte_serialize(s.as_bytes()).collect() };
    format!(
        "sdkappid={APP}&userid={user}&roomid={room}&usersig={}&privatemapkey={}",
        enc(&sig),
        enc(&pmk)
    )
}
