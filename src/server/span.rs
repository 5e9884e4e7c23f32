//! Rooms that span nodes: the shell of an edge's relay of one room.
//!
//! When a room's node takes no more members (`spill_members`, or its media plane is
//! overloaded), the room's further members join on another node, the *edge*. For each
//! room it carries, the edge runs one of these tasks: it joins the room on its node as
//! a hidden member (user `weir-relay.{edge id}`, a privateMapKey it mints with the
//! app's key carrying Weir's relay bit 0x100: listed to no one, counted in no limit),
//! receives each stream of the room that some member here receives (subscribing and
//! unsubscribing there as the media plane says, `UpstreamAsk::Wanted`) once, on one
//! WebRTC connection
//! ([`crate::media::upstream::Upstream`]: NACK, receiver reports and transport-wide
//! feedback toward the room's node, which sees one subscriber per edge), and hands
//! the packets to the edge's media plane as bridged sources, each under a stand-in
//! member of the edge's copy of the room (the control task keeps those; see
//! `control.rs`, `ControlCommand::Span`). Local subscribers' keyframe requests come
//! back here and go up as PLIs; their NACKs are answered from the edge's own cache.
//!
//! The task ends when the control task lets go of it (the room's last local member
//! left) or when the room's node is lost (its websocket or connection failed): then
//! the edge's members are told to move (`left` `serverShutdown`: the SDK joins again,
//! through any node, and lands wherever the room is now).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info, warn};
use weir_signaling::{ClientMessage, Join, Kind, ServerMessage, StreamInfo, Target};

use super::control::ControlCommand;
use crate::auth::{Keyring, Privileges, RoomId, TokenKind};
use crate::cluster::NodeRecord;
use crate::media::upstream::{Upstream, UpstreamEvent};
use crate::media::{BridgeInput, UpstreamAsk};
use crate::metrics::Metrics;
use crate::room::{RoomKey, SessionId};

/// What an edge needs to relay rooms: given to the control task, which starts a
/// relay per room it carries.
#[derive(Clone)]
pub struct SpanContext {
    pub node_id: String,
    pub keyring: Arc<Keyring>,
    pub tls: Arc<rustls::ClientConfig>,
    /// The media workers: a relayed room's streams go to the room's.
    pub media: crate::media::MediaPlane,
    pub control: mpsc::Sender<ControlCommand>,
    pub next_session: Arc<AtomicU64>,
    pub metrics: Arc<Metrics>,
}

/// What a relay tells the control task about its room.
#[derive(Debug)]
pub enum SpanEvent {
    /// A stream of the room, published there by `user`: `session` stands in for that
    /// user here (one per user: camera and screen are its two streams).
    StreamAdded {
        session: SessionId,
        stream: StreamInfo,
    },
    StreamRemoved {
        session: SessionId,
        screen: bool,
    },
    StreamMuted {
        session: SessionId,
        kind: Kind,
        muted: bool,
    },
    /// The room's node cannot be reached, refused the relay, or the room ended there.
    Lost {
        why: String,
    },
}

/// How long the relay's credentials last (it renews by joining again only when lost).
const CREDENTIAL_S: u64 = 7 * 24 * 3600;

/// The relay's user in the room's node: hidden there, and never a client's.
pub fn relay_user(node_id: &str) -> String {
    format!("weir-relay.{node_id}")
}

/// Relays `room` from `origin` until `stop` is dropped or the origin is lost.
pub async fn run(
    ctx: SpanContext,
    room: RoomKey,
    number: u64,
    origin: NodeRecord,
    mut stop: mpsc::Receiver<()>,
) {
    let _count =
        super::relay::Counted::new(ctx.metrics.cluster_relays.with_label_values(&["edge"]));
    let bridge = ctx.media.bridge_for(&room);
    let mut relay = Relay {
        ctx: ctx.clone(),
        bridge: bridge.clone(),
        room: room.clone(),
        number,
        users: HashMap::new(),
        streams: HashMap::new(),
    };
    let why = relay.serve(&origin, &mut stop).await;
    for (_, identity) in relay.streams.values() {
        let _ = bridge.send(BridgeInput::Gone { session: *identity }).await;
    }
    if let Some(why) = why {
        warn!(room = %room.name(), origin = %origin.id, %why, "relay of the room from its node lost: its members here are told to move");
        let _ = ctx
            .control
            .send(ControlCommand::Span {
                room,
                relay: number,
                event: SpanEvent::Lost { why },
            })
            .await;
    } else {
        info!(room = %room.name(), origin = %origin.id, "relay of the room ended: no member here");
    }
}

struct Relay {
    ctx: SpanContext,
    /// The media worker of the room.
    bridge: mpsc::Sender<BridgeInput>,
    room: RoomKey,
    /// Which relay of the room this is (the control task's number).
    number: u64,
    /// The stand-in session of each publishing user of the room.
    users: HashMap<String, SessionId>,
    /// Each relayed stream: its user and the media identity its packets go under
    /// (the stand-in's session, or its screen identity).
    streams: HashMap<String, (String, SessionId)>,
}

impl Relay {
    /// Serves until stopped (`None`) or lost (why).
    async fn serve(
        &mut self,
        origin: &NodeRecord,
        stop: &mut mpsc::Receiver<()>,
    ) -> Option<String> {
        let (user, join) = match self.join_message() {
            Ok(j) => j,
            Err(e) => return Some(format!("no credentials for the relay: {e}")),
        };
        let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
        let up = match super::relay::connect(origin, ip, &self.ctx.tls).await {
            Ok(up) => up,
            Err(e) => {
                return Some(format!(
                    "the room's node {} cannot be reached: {e}",
                    origin.id
                ))
            }
        };
        let (mut ws_tx, mut ws_rx) = up.split();
        if ws_tx
            .send(Message::Text(join.to_string().into()))
            .await
            .is_err()
        {
            return Some("the room's node closed the relay".into());
        }
        let (socket, target) = match bind_toward(origin).await {
            Ok(s) => s,
            Err(e) => return Some(format!("no UDP socket toward the room's node: {e}")),
        };
        let local = match socket.local_addr() {
            Ok(a) => a,
            Err(e) => return Some(e.to_string()),
        };
        let mut pc: Option<Upstream> = None;
        let (asks_tx, mut asks) = mpsc::channel::<UpstreamAsk>(64);
        let mut joined = false;
        let mut buf = vec![0u8; 2048];
        let mut ping = tokio::time::interval(Duration::from_secs(10));
        let mut deadline = Instant::now() + Duration::from_secs(1);
        let joining_by = Instant::now() + Duration::from_secs(10);
        loop {
            let wake = tokio::time::Instant::from_std(
                deadline.min(Instant::now() + Duration::from_millis(200)),
            );
            tokio::select! {
                _ = stop.recv() => {
                    let _ = ws_tx.send(Message::Text(json(&ClientMessage::Leave).into())).await;
                    let _ = ws_tx.close().await;
                    return None;
                }
                r = socket.recv_from(&mut buf) => {
                    let now = Instant::now();
                    if let (Ok((n, from)), Some(pc)) = (r, pc.as_mut()) {
                        pc.datagram(&buf[..n], from, now);
                        for _ in 0..63 {
                            match socket.try_recv_from(&mut buf) {
                                Ok((n, from)) => pc.datagram(&buf[..n], from, now),
                                Err(_) => break,
                            }
                        }
                    }
                }
                frame = ws_rx.next() => {
                    let text = match frame {
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(c))) => {
                            return Some(format!("the room's node closed the relay: {}", c.map_or(String::new(), |c| c.reason.to_string())));
                        }
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Some(format!("the relay's websocket broke: {e}")),
                        None => return Some("the relay's websocket ended".into()),
                    };
                    let Ok(msg) = serde_json::from_str::<ServerMessage>(&text) else {
                        continue;
                    };
                    match msg {
                        ServerMessage::Joined { members, .. } => {
                            joined = true;
                            info!(room = %self.room.name(), origin = %origin.id, %user, "relaying the room from its node");
                            for m in members {
                                for s in m.streams {
                                    self.added(s, &asks_tx).await;
                                }
                            }
                        }
                        ServerMessage::StreamAdded { stream } => self.added(stream, &asks_tx).await,
                        ServerMessage::StreamRemoved { stream_id, .. } => self.removed(&stream_id).await,
                        ServerMessage::StreamMuted { stream_id, kind, muted } => {
                            if let Some((user, _)) = self.streams.get(&stream_id) {
                                if let Some(session) = self.users.get(user) {
                                    self.event(SpanEvent::StreamMuted { session: *session, kind, muted }).await;
                                }
                            }
                        }
                        ServerMessage::Offer { target: Target::Subscriber, sdp } => {
                            let now = Instant::now();
                            if pc.is_none() {
                                match Upstream::new(local, now) {
                                    Ok(p) => pc = Some(p),
                                    Err(e) => return Some(format!("the relay's connection: {e}")),
                                }
                            }
                            // Media goes where the nodes reach each other, whatever
                            // the room's node announces to clients.
                            let sdp = pin_candidates(&sdp, target);
                            let answer = match pc.as_mut().map(|p| p.answer(sdp, now)) {
                                Some(Ok(a)) => a,
                                Some(Err(e)) => return Some(format!("the room's node's offer: {e}")),
                                None => continue,
                            };
                            let msg = ClientMessage::Answer { target: Target::Subscriber, sdp: answer };
                            if ws_tx.send(Message::Text(json(&msg).into())).await.is_err() {
                                return Some("the room's node closed the relay".into());
                            }
                        }
                        ServerMessage::Left { reason } => {
                            return Some(format!("the room's node ended the relay ({reason:?})"));
                        }
                        ServerMessage::Error { message, request, .. } if !joined || request.as_deref() == Some("join") => {
                            return Some(format!("the room's node refused the relay: {message}"));
                        }
                        ServerMessage::Error { message, request, .. } => {
                            debug!(room = %self.room.name(), ?request, %message, "the room's node refused a relay request");
                        }
                        _ => {}
                    }
                }
                Some(ask) = asks.recv() => {
                    let (UpstreamAsk::Keyframe(session) | UpstreamAsk::Wanted(session, _)) = ask;
                    let Some(stream) = self.streams.iter().find(|(_, (_, s))| *s == session).map(|(id, _)| id.clone()) else {
                        continue;
                    };
                    let msg = match ask {
                        UpstreamAsk::Keyframe(_) => {
                            if let Some(pc) = pc.as_mut() {
                                pc.request_keyframe(&stream, Instant::now());
                            }
                            None
                        }
                        UpstreamAsk::Wanted(_, true) => Some(ClientMessage::Subscribe { stream_ids: vec![stream] }),
                        UpstreamAsk::Wanted(_, false) => Some(ClientMessage::Unsubscribe { stream_ids: vec![stream] }),
                    };
                    if let Some(msg) = msg {
                        if ws_tx.send(Message::Text(json(&msg).into())).await.is_err() {
                            return Some("the room's node closed the relay".into());
                        }
                    }
                }
                _ = ping.tick() => {
                    let msg = ClientMessage::Ping { ts: 1 };
                    if ws_tx.send(Message::Text(json(&msg).into())).await.is_err() {
                        return Some("the room's node closed the relay".into());
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
            if !joined && Instant::now() > joining_by {
                return Some("the room's node did not answer the relay's join".into());
            }
            let Some(p) = pc.as_mut() else { continue };
            p.handle_timeout(Instant::now());
            while let Some((data, to)) = p.poll_transmit() {
                let _ = socket.try_send_to(&data, to);
            }
            while let Some(event) = p.poll_event() {
                if let Some(why) = self.media(event).await {
                    return Some(why);
                }
            }
            deadline = p
                .poll_timeout()
                .unwrap_or(Instant::now() + Duration::from_secs(1));
        }
    }

    /// The relay's `join`, with credentials minted from the app's key.
    fn join_message(&self) -> Result<(String, String), crate::auth::AuthError> {
        let app = self.ctx.keyring.app(self.room.sdk_app_id)?;
        let user = relay_user(&self.ctx.node_id);
        let now = crate::auth::unix_now();
        let privileges = Privileges::ENTER_ROOM
            | Privileges::RECV_AUDIO
            | Privileges::RECV_VIDEO
            | Privileges::RECV_SUB_VIDEO
            | Privileges::RELAY;
        let (user_sig, private_map_key) = [TokenKind::V2, TokenKind::V1, TokenKind::Jwt]
            .into_iter()
            .find_map(|kind| {
                let sig = app.issue_user_sig(kind, &user, now, CREDENTIAL_S).ok()?;
                let key = app
                    .issue_private_map_key(
                        kind,
                        &user,
                        &self.room.room,
                        privileges,
                        now,
                        CREDENTIAL_S,
                    )
                    .ok()?;
                Some((sig, key))
            })
            .ok_or(crate::auth::AuthError::NoKey {
                sdk_app_id: self.room.sdk_app_id,
                what: "secret_key, private_key_pem or a JWT private key",
                purpose: "relaying a room between nodes",
            })?;
        let (room_id, str_room_id) = match &self.room.room {
            RoomId::Num(n) => (Some(*n), None),
            RoomId::Str(s) => (None, Some(s.clone())),
        };
        let join = ClientMessage::Join(Join {
            protocol: weir_signaling::PROTOCOL_VERSION,
            sdk_app_id: self.room.sdk_app_id,
            user_id: user.clone(),
            user_sig,
            room_id,
            str_room_id,
            private_map_key,
            // Subscribed stream by stream, as members here receive them.
            auto_subscribe: false,
            congestion_policy: None,
        });
        Ok((user, json(&join)))
    }

    async fn event(&self, event: SpanEvent) {
        let _ = self
            .ctx
            .control
            .send(ControlCommand::Span {
                room: self.room.clone(),
                relay: self.number,
                event,
            })
            .await;
    }

    async fn added(&mut self, stream: StreamInfo, asks: &mpsc::Sender<UpstreamAsk>) {
        if self.streams.contains_key(&stream.stream_id) {
            return;
        }
        let next = &self.ctx.next_session;
        let session = *self
            .users
            .entry(stream.user_id.clone())
            .or_insert_with(|| SessionId(next.fetch_add(1, Ordering::Relaxed)));
        let identity = if stream.screen {
            session.screen()
        } else {
            session
        };
        self.streams
            .insert(stream.stream_id.clone(), (stream.user_id.clone(), identity));
        let _ = self
            .bridge
            .send(BridgeInput::Relayed {
                session: identity,
                asks: asks.clone(),
            })
            .await;
        debug!(room = %self.room.name(), stream = %stream.stream_id, session = session.0, "relayed stream");
        self.event(SpanEvent::StreamAdded { session, stream }).await;
    }

    async fn removed(&mut self, stream_id: &str) {
        let Some((user, identity)) = self.streams.remove(stream_id) else {
            return;
        };
        let _ = self
            .bridge
            .send(BridgeInput::Gone { session: identity })
            .await;
        let Some(session) = self.users.get(&user).copied() else {
            return;
        };
        if !self.streams.values().any(|(u, _)| *u == user) {
            self.users.remove(&user);
        }
        self.event(SpanEvent::StreamRemoved {
            session,
            screen: identity != session,
        })
        .await;
    }

    /// Media from the room's node into this node's media plane.
    async fn media(&mut self, event: UpstreamEvent) -> Option<String> {
        let identity = |stream_id: &str| self.streams.get(stream_id).map(|(_, s)| *s);
        let input = match event {
            UpstreamEvent::Track {
                stream_id,
                kind,
                codec,
            } => BridgeInput::Track {
                session: identity(&stream_id)?,
                kind,
                codec,
            },
            UpstreamEvent::Rtp {
                stream_id,
                kind,
                packet,
                keyframe,
                arrived,
            } => BridgeInput::Rtp {
                session: identity(&stream_id)?,
                kind,
                packet,
                keyframe,
                arrived,
            },
            UpstreamEvent::SenderReport {
                stream_id,
                kind,
                report,
            } => BridgeInput::SenderReport {
                session: identity(&stream_id)?,
                kind,
                report,
            },
            UpstreamEvent::Connected => {
                info!(room = %self.room.name(), "relay connection to the room's node up");
                return None;
            }
            UpstreamEvent::Failed => return Some("the relay's WebRTC connection failed".into()),
        };
        // The media plane's bridge queue is bounded: a relay that cannot hand its
        // packets on waits (as an RTMP bridge does) rather than grow.
        let _ = self.bridge.send(input).await;
        None
    }
}

/// The offer with its candidates replaced by one host candidate at `target` (the
/// room's node's `addresses.udp`), in every m-section that had any.
fn pin_candidates(sdp: &str, target: SocketAddr) -> String {
    let mine = format!(
        "a=candidate:1 1 udp 2130706431 {} {} typ host",
        target.ip(),
        target.port()
    );
    let mut out = String::with_capacity(sdp.len());
    let mut placed = false;
    for line in sdp.split_inclusive('\n') {
        let bare = line.trim_end_matches(['\r', '\n']);
        if bare.starts_with("m=") {
            placed = false;
        }
        if bare.starts_with("a=candidate:") {
            if !placed {
                out.push_str(&mine);
                out.push_str("\r\n");
                placed = true;
            }
            continue;
        }
        out.push_str(line);
    }
    out
}

/// A UDP socket on the address this host reaches `origin`'s media port from, and
/// that port.
async fn bind_toward(origin: &NodeRecord) -> std::io::Result<(UdpSocket, SocketAddr)> {
    let target: SocketAddr = tokio::net::lookup_host(&origin.addresses.udp)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::other("the room's node has no media address"))?;
    let probe = std::net::UdpSocket::bind(if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    probe.connect(target)?;
    let ip = probe.local_addr()?.ip();
    Ok((UdpSocket::bind(SocketAddr::new(ip, 0)).await?, target))
}

fn json(msg: &ClientMessage) -> String {
    serde_json::to_string(msg).expect("client messages always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offer_is_pinned_to_the_address_nodes_reach_each_other_at() {
        let sdp = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n\
                   m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n\
                   a=candidate:1 1 udp 2130706431 203.0.113.7 50000 typ host\r\n\
                   a=candidate:2 1 tcp 1 203.0.113.7 50001 typ host tcptype passive\r\n\
                   a=end-of-candidates\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\n\
                   a=candidate:1 1 udp 2130706431 203.0.113.7 50000 typ host\r\n";
        let pinned = pin_candidates(sdp, "10.0.0.5:4000".parse().unwrap());
        let candidates: Vec<&str> = pinned
            .lines()
            .filter(|l| l.starts_with("a=candidate"))
            .collect();
        assert_eq!(
            candidates,
            vec!["a=candidate:1 1 udp 2130706431 10.0.0.5 4000 typ host"; 2]
        );
        assert!(
            pinned.contains("a=end-of-candidates\r\nm=video"),
            "{pinned}"
        );
        assert!(!pinned.contains("203.0.113.7"));
    }
}
