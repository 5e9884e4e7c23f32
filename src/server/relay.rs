//! A signaling session relayed to the node serving its room (cluster mode).
//!
//! The node a client reached verified its `join`, asked Redis where the room is, and
//! opened a websocket to that node's `/ws` (saying who the client is in
//! `X-Forwarded-For`; the nodes must be each other's `trusted_proxies`). From then on
//! it copies frames both ways, unchanged: the client speaks to the room's node, and
//! its media goes straight to that node's announced addresses. When the room's node
//! goes away the client is closed with 1001, and the SDK joins again (through any
//! node), which places the room on a live one.

use axum::extract::ws::{Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};
use tracing::debug;

use super::AppState;
use crate::cluster::NodeRecord;

pub type Upstream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long reaching the room's node may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Says that the node relaying this session chose the receiving node to carry it as
/// a member of a room that spills from its own node: serve it there, never relay it
/// on (so two nodes with different views cannot pass a join back and forth). A client
/// that sends it itself gains nothing: it is honoured only while the room spills.
pub const EDGE_HEADER: &str = "x-weir-edge";

/// A websocket to `node`'s signaling endpoint on behalf of the client at `ip`.
pub async fn connect(
    node: &NodeRecord,
    ip: std::net::IpAddr,
    tls: &std::sync::Arc<rustls::ClientConfig>,
) -> Result<Upstream, String> {
    connect_as(node, ip, tls, false).await
}

/// [`connect`], saying with `edge` that `node` is to carry the session for a
/// spilling room ([`EDGE_HEADER`]).
pub async fn connect_as(
    node: &NodeRecord,
    ip: std::net::IpAddr,
    tls: &std::sync::Arc<rustls::ClientConfig>,
    edge: bool,
) -> Result<Upstream, String> {
    let base = &node.addresses.http;
    let url = if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}/ws")
    } else if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}/ws")
    } else {
        return Err(format!("node address {base:?} is not http:// or https://"));
    };
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| e.to_string())?;
    request.headers_mut().insert(
        "x-forwarded-for",
        ip.to_string().parse().map_err(|_| "client address")?,
    );
    if edge {
        request.headers_mut().insert(
            EDGE_HEADER,
            tungstenite::http::HeaderValue::from_static("1"),
        );
    }
    let config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(weir_signaling::MAX_MESSAGE_BYTES))
        .max_frame_size(Some(weir_signaling::MAX_MESSAGE_BYTES));
    let connecting = tokio_tungstenite::connect_async_tls_with_config(
        request,
        Some(config),
        true,
        Some(tokio_tungstenite::Connector::Rustls(tls.clone())),
    );
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok((up, _))) => Ok(up),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

/// Sends the client's `join` upstream and copies frames both ways until one side
/// ends; returns the close to send the client (None: the client closed).
pub async fn pipe(
    state: &AppState,
    client_tx: &mut SplitSink<WebSocket, Message>,
    client_rx: &mut SplitStream<WebSocket>,
    up: Upstream,
    join: String,
) -> Option<(u16, String)> {
    let _count = Counted::new(
        state
            .metrics
            .cluster_relays
            .with_label_values(&["signaling"]),
    );
    let (mut up_tx, mut up_rx) = up.split();
    let gone = || {
        Some((
            weir_signaling::close::GOING_AWAY,
            "the room's node went away; join again".to_owned(),
        ))
    };
    if up_tx
        .send(tungstenite::Message::Text(join.into()))
        .await
        .is_err()
    {
        return gone();
    }
    loop {
        tokio::select! {
            from_client = client_rx.next() => match from_client {
                Some(Ok(Message::Text(t))) => {
                    if up_tx.send(tungstenite::Message::Text(t.as_str().into())).await.is_err() {
                        return gone();
                    }
                }
                Some(Ok(Message::Binary(b))) => {
                    // The room's node answers these as it would a direct client.
                    if up_tx.send(tungstenite::Message::Binary(b)).await.is_err() {
                        return gone();
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(frame))) => {
                    let frame = frame.map(|f| tungstenite::protocol::CloseFrame {
                        code: f.code.into(),
                        reason: f.reason.as_str().into(),
                    });
                    let _ = up_tx.send(tungstenite::Message::Close(frame)).await;
                    return None;
                }
                None | Some(Err(_)) => {
                    let _ = up_tx.close().await;
                    return None;
                }
            },
            from_up = up_rx.next() => match from_up {
                Some(Ok(tungstenite::Message::Text(t))) => {
                    if client_tx.send(Message::Text(t.as_str().into())).await.is_err() {
                        let _ = up_tx.close().await;
                        return None;
                    }
                }
                Some(Ok(tungstenite::Message::Close(frame))) => {
                    return Some(match frame {
                        Some(f) => (f.code.into(), f.reason.as_str().to_owned()),
                        None => (weir_signaling::close::NORMAL, String::new()),
                    });
                }
                Some(Ok(_)) => {}
                None | Some(Err(_)) => {
                    debug!("the room's node closed a relayed session without a close frame");
                    return gone();
                }
            },
        }
    }
}

/// A relay counted in a gauge while it lives (signaling here, RTMP in `rtmp_relay`).
pub struct Counted(prometheus::IntGauge);

impl Counted {
    pub fn new(gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}
