//! An RTMP push relayed to the node serving its room (cluster mode).
//!
//! The node ffmpeg or a mini program's pusher reached verified the push's room
//! credentials and asked Redis where the room is. It then publishes the same name
//! (with the same credentials, which the room's node checks again) to that node as an
//! RTMP client (`rtmp::client`), answers the pusher with that node's verdict, and
//! carries every message across unchanged: an edge in front of its origin.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::info;

use super::AppState;
use crate::cluster::NodeRecord;
use crate::rtmp::amf0;
use crate::rtmp::client::{ClientEvent, ClientPublish};
use crate::rtmp::session::msg_type;
use crate::rtmp::{Event, ServerSession};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the room's node may take to accept or refuse the publish.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(5);
/// A pusher silent this long is gone (as for a local push).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// One RTMP connection relayed to another node: where, and what it asked for.
#[derive(Clone, Copy)]
pub struct Relay<'a> {
    pub state: &'a Arc<AppState>,
    /// The node serving the room or stream.
    pub node: &'a NodeRecord,
    pub app: &'a str,
    /// The publish or play name with its query (the credentials), as the client sent it.
    pub name: &'a str,
    pub peer: SocketAddr,
    /// Our handshake time field.
    pub epoch: u32,
}

/// Counts a relayed RTMP connection while it lives.
fn counted(state: &AppState) -> super::relay::Counted {
    super::relay::Counted::new(state.metrics.cluster_relays.with_label_values(&["rtmp"]))
}

type Upstream = (
    ClientPublish,
    tokio::net::tcp::OwnedReadHalf,
    tokio::net::tcp::OwnedWriteHalf,
    Vec<u8>,
);

/// Connects to the relay's node as an RTMP client publishing (or, with `play`,
/// playing) its name, and waits for that node's verdict (Err: why not, for the client).
async fn open(r: &Relay<'_>, play: bool) -> Result<Upstream, String> {
    let (state, node) = (r.state, r.node);
    let tc_url = format!("{}/{}", node.addresses.rtmp, r.app);
    let mut client = if play {
        ClientPublish::play(r.app, &tc_url, r.name, r.epoch)
    } else {
        ClientPublish::new(r.app, &tc_url, r.name, r.epoch)
    };
    let addr = node.addresses.rtmp.trim_start_matches("rtmp://").to_owned();
    let up =
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addr)).await {
            Ok(Ok(s)) => s,
            _ => {
                if let Some(c) = &state.cluster {
                    c.suspect(node);
                }
                return Err("the node serving it cannot be reached now; try again".into());
            }
        };
    let _ = up.set_nodelay(true);
    let (mut up_r, mut up_w) = up.into_split();
    let mut up_buf = vec![0u8; 16 * 1024];
    let verdict = tokio::time::timeout(VERDICT_TIMEOUT, async {
        loop {
            let out = client.take_output();
            if !out.is_empty() && up_w.write_all(&out).await.is_err() {
                return Err("the node serving it closed the connection".to_owned());
            }
            match client.poll_event() {
                Some(ClientEvent::Published) => return Ok(()),
                Some(ClientEvent::Refused { code, description }) => {
                    return Err(format!("{description} ({code})"))
                }
                Some(ClientEvent::Media { .. }) => continue,
                None => {}
            }
            match up_r.read(&mut up_buf).await {
                Ok(0) | Err(_) => {
                    return Err("the node serving it closed the connection".to_owned())
                }
                Ok(n) => client
                    .handle_input(&up_buf[..n])
                    .map_err(|e| e.to_string())?,
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("the node serving it did not answer in time".to_owned()));
    verdict.map(|()| (client, up_r, up_w, up_buf))
}

/// Relays the play the player at `peer` just asked for to `node`, where the stream
/// is live (the player's credentials are checked there). Returns when either ends.
pub async fn play(
    r: &Relay<'_>,
    socket: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send),
    rtmp: &mut ServerSession,
) {
    let Relay {
        state,
        node,
        name,
        peer,
        ..
    } = *r;
    let _count = counted(state);
    let (mut client, mut up_r, mut up_w, mut up_buf) = match open(r, true).await {
        Ok(o) => o,
        Err(why) => {
            rtmp.reject("NetStream.Play.Failed", &why);
            let _ = socket.write_all(&rtmp.take_output()).await;
            return ended("refused by the stream's node", peer, node);
        }
    };
    let stream = name.split('?').next().unwrap_or(name).to_owned();
    rtmp.accept_play(&stream);
    info!(%peer, node = %node.id, %stream, "RTMP play relayed to the stream's node");
    state
        .metrics
        .play_requests
        .with_label_values(&["rtmp", "relayed"])
        .inc();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        while let Some(e) = client.poll_event() {
            match e {
                ClientEvent::Media {
                    type_id,
                    timestamp,
                    data,
                } => rtmp.send_media(type_id, timestamp, data),
                ClientEvent::Refused { .. } => {
                    return ended("stopped by the stream's node", peer, node)
                }
                ClientEvent::Published => {}
            }
        }
        let out = rtmp.take_output();
        if !out.is_empty() && socket.write_all(&out).await.is_err() {
            return ended("player gone", peer, node);
        }
        let out = client.take_output();
        if !out.is_empty() && up_w.write_all(&out).await.is_err() {
            return ended("the stream's node went away", peer, node);
        }
        tokio::select! {
            r = socket.read(&mut buf) => match r {
                Ok(n) if n > 0 => {
                    if rtmp.handle_input(&buf[..n]).is_err() {
                        return ended("player misbehaved", peer, node);
                    }
                    while rtmp.poll_event().is_some() {}
                }
                _ => return ended("player gone", peer, node),
            },
            r = up_r.read(&mut up_buf) => match r {
                Ok(n) if n > 0 => {
                    if client.handle_input(&up_buf[..n]).is_err() {
                        return ended("the stream's node misbehaved", peer, node);
                    }
                }
                _ => return ended("the stream's node went away (the stream ended)", peer, node),
            },
        }
    }
}

/// What ended a relayed push or play, for the log.
fn ended(why: &str, peer: SocketAddr, node: &NodeRecord) {
    info!(%peer, node = %node.id, why, "relayed RTMP connection ended");
}

/// Relays the publish the pusher at `peer` just asked for (`rtmp` holds its session,
/// past `publish`) to `node`. Returns when either side ends.
pub async fn push(
    r: &Relay<'_>,
    socket: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send),
    rtmp: &mut ServerSession,
) {
    let Relay {
        state,
        node,
        name,
        peer,
        ..
    } = *r;
    let _count = counted(state);
    let buf = vec![0u8; 64 * 1024];
    let (client, up_r, up_w, up_buf) = match open(r, false).await {
        Ok(o) => o,
        Err(why) => {
            rtmp.reject("NetStream.Publish.Rejected", &why);
            let _ = socket.write_all(&rtmp.take_output()).await;
            return ended("refused by the room's node", peer, node);
        }
    };
    let stream = name.split('?').next().unwrap_or(name).to_owned();
    rtmp.accept_publish(&stream);
    if socket.write_all(&rtmp.take_output()).await.is_err() {
        return ended("pusher gone", peer, node);
    }
    info!(%peer, node = %node.id, %stream, "RTMP push relayed to the room's node");
    state
        .metrics
        .rtmp_requests
        .with_label_values(&["publish", "relayed"])
        .inc();
    forward(socket, rtmp, (client, up_r, up_w, up_buf), buf, peer, node).await
}

/// A room-service push accepted here (pending, in no room) that an `add_pusher` on
/// `node` bound to a room there: published to `node` with its own URL, its kept
/// sequence headers and metadata first, then carried on. The pusher notices nothing.
pub async fn push_moved(
    r: &Relay<'_>,
    socket: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send),
    rtmp: &mut ServerSession,
    headers: Vec<crate::live::Tag>,
) {
    let Relay {
        state, node, peer, ..
    } = *r;
    let _count = counted(state);
    let (mut client, up_r, up_w, up_buf) = match open(r, false).await {
        Ok(o) => o,
        Err(why) => {
            // The pusher reconnects (the components retry) and lands anew.
            info!(%peer, node = %node.id, %why, "a room-service push could not move to its room's node; closed");
            return;
        }
    };
    for t in headers {
        let type_id = match t.kind {
            crate::live::TagKind::Video => msg_type::VIDEO,
            crate::live::TagKind::Audio => msg_type::AUDIO,
            crate::live::TagKind::Script => msg_type::DATA_AMF0,
        };
        client.send(type_id, t.timestamp, t.data);
    }
    info!(%peer, node = %node.id, "room-service push moved to the node of the room add_pusher bound it to");
    state
        .metrics
        .rtmp_requests
        .with_label_values(&["publish", "moved"])
        .inc();
    forward(
        socket,
        rtmp,
        (client, up_r, up_w, up_buf),
        vec![0u8; 64 * 1024],
        peer,
        node,
    )
    .await
}

/// Carries a pusher's messages to the far node until either side ends.
async fn forward(
    socket: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send),
    rtmp: &mut ServerSession,
    (mut client, mut up_r, mut up_w, mut up_buf): Upstream,
    mut buf: Vec<u8>,
    peer: SocketAddr,
    node: &NodeRecord,
) {
    loop {
        // Whatever the pusher sent with its publish is already in `rtmp`.
        while let Some(event) = rtmp.poll_event() {
            match event {
                Event::Video { timestamp, data } => client.send(msg_type::VIDEO, timestamp, data),
                Event::Audio { timestamp, data } => client.send(msg_type::AUDIO, timestamp, data),
                Event::Data { values } => client.send(
                    msg_type::DATA_AMF0,
                    0,
                    bytes::Bytes::from(amf0::encode_all(&values)),
                ),
                Event::Unpublish => return ended("unpublished", peer, node),
                Event::Connect { .. } | Event::Publish { .. } | Event::Play { .. } => {}
            }
        }
        let out = client.take_output();
        if !out.is_empty() && up_w.write_all(&out).await.is_err() {
            return ended("the room's node went away", peer, node);
        }
        let out = rtmp.take_output();
        if !out.is_empty() && socket.write_all(&out).await.is_err() {
            return ended("pusher gone", peer, node);
        }
        tokio::select! {
            r = tokio::time::timeout(IDLE_TIMEOUT, socket.read(&mut buf)) => match r {
                Ok(Ok(n)) if n > 0 => {
                    if rtmp.handle_input(&buf[..n]).is_err() {
                        return ended("pusher misbehaved", peer, node);
                    }
                }
                Ok(_) => return ended("pusher gone", peer, node),
                Err(_) => return ended("pusher silent", peer, node),
            },
            r = up_r.read(&mut up_buf) => match r {
                Ok(n) if n > 0 => {
                    if client.handle_input(&up_buf[..n]).is_err() {
                        return ended("the room's node misbehaved", peer, node);
                    }
                    while let Some(e) = client.poll_event() {
                        if let ClientEvent::Refused { .. } = e {
                            return ended("stopped by the room's node", peer, node);
                        }
                    }
                }
                _ => return ended("the room's node went away", peer, node),
            },
        }
    }
}
