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

/// What ended a relayed push, for the log.
fn ended(why: &str, state: &AppState, peer: SocketAddr, node: &NodeRecord) {
    info!(%peer, node = %node.id, why, "relayed RTMP push ended");
    let _ = state;
}

/// Relays the publish the pusher at `peer` just asked for (`rtmp` holds its session,
/// past `publish`) to `node`. Returns when either side ends.
#[allow(clippy::too_many_arguments)]
pub async fn push(
    state: &Arc<AppState>,
    socket: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send),
    rtmp: &mut ServerSession,
    node: &NodeRecord,
    app: &str,
    name: &str,
    peer: SocketAddr,
    epoch: u32,
) {
    let gauge = state.metrics.cluster_relays.with_label_values(&["rtmp"]);
    gauge.inc();
    struct Dec(prometheus::IntGauge);
    impl Drop for Dec {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    let _count = Dec(gauge);
    let refuse = |rtmp: &mut ServerSession, why: &str| {
        rtmp.reject("NetStream.Publish.Rejected", why);
    };
    let addr = node.addresses.rtmp.trim_start_matches("rtmp://").to_owned();
    let up =
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&addr)).await {
            Ok(Ok(s)) => s,
            _ => {
                if let Some(c) = &state.cluster {
                    c.suspect(node);
                }
                refuse(rtmp, "the room's node cannot be reached now; push again");
                let _ = socket.write_all(&rtmp.take_output()).await;
                return ended("unreachable", state, peer, node);
            }
        };
    let _ = up.set_nodelay(true);
    let (mut up_r, mut up_w) = up.into_split();
    let tc_url = format!("{}/{app}", node.addresses.rtmp);
    let mut client = ClientPublish::new(app, &tc_url, name, epoch);
    let mut buf = vec![0u8; 64 * 1024];
    let mut up_buf = vec![0u8; 16 * 1024];

    // The room's node decides.
    let verdict = tokio::time::timeout(VERDICT_TIMEOUT, async {
        loop {
            let out = client.take_output();
            if !out.is_empty() && up_w.write_all(&out).await.is_err() {
                return Err("the room's node closed the connection".to_owned());
            }
            if let Some(e) = client.poll_event() {
                return match e {
                    ClientEvent::Published => Ok(()),
                    ClientEvent::Refused { code, description } => {
                        Err(format!("{description} ({code})"))
                    }
                };
            }
            match up_r.read(&mut up_buf).await {
                Ok(0) | Err(_) => return Err("the room's node closed the connection".to_owned()),
                Ok(n) => client
                    .handle_input(&up_buf[..n])
                    .map_err(|e| e.to_string())?,
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("the room's node did not answer in time".to_owned()));
    if let Err(why) = verdict {
        refuse(rtmp, &why);
        let _ = socket.write_all(&rtmp.take_output()).await;
        return ended("refused by the room's node", state, peer, node);
    }
    let stream = name.split('?').next().unwrap_or(name).to_owned();
    rtmp.accept_publish(&stream);
    if socket.write_all(&rtmp.take_output()).await.is_err() {
        return ended("pusher gone", state, peer, node);
    }
    info!(%peer, node = %node.id, %stream, "RTMP push relayed to the room's node");
    state
        .metrics
        .rtmp_requests
        .with_label_values(&["publish", "relayed"])
        .inc();
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
                Event::Unpublish => return ended("unpublished", state, peer, node),
                Event::Connect { .. } | Event::Publish { .. } | Event::Play { .. } => {}
            }
        }
        let out = client.take_output();
        if !out.is_empty() && up_w.write_all(&out).await.is_err() {
            return ended("the room's node went away", state, peer, node);
        }
        let out = rtmp.take_output();
        if !out.is_empty() && socket.write_all(&out).await.is_err() {
            return ended("pusher gone", state, peer, node);
        }
        tokio::select! {
            r = tokio::time::timeout(IDLE_TIMEOUT, socket.read(&mut buf)) => match r {
                Ok(Ok(n)) if n > 0 => {
                    if rtmp.handle_input(&buf[..n]).is_err() {
                        return ended("pusher misbehaved", state, peer, node);
                    }
                }
                Ok(_) => return ended("pusher gone", state, peer, node),
                Err(_) => return ended("pusher silent", state, peer, node),
            },
            r = up_r.read(&mut up_buf) => match r {
                Ok(n) if n > 0 => {
                    if client.handle_input(&up_buf[..n]).is_err() {
                        return ended("the room's node misbehaved", state, peer, node);
                    }
                    if let Some(ClientEvent::Refused { .. }) = client.poll_event() {
                        return ended("stopped by the room's node", state, peer, node);
                    }
                }
                _ => return ended("the room's node went away", state, peer, node),
            },
        }
    }
}
