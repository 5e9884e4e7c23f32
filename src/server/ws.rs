//! One websocket signaling session: parse frames, verify credentials, forward verified
//! commands to the control task, and write what it sends back.
//!
//! A misbehaving peer (oversized frames, binary frames, a stream of unparsable
//! messages, silence past the idle timeout) is disconnected; nothing it sends reaches
//! the room unless it parsed and, for `join`, verified.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tracing::{debug, info};
use weir_signaling::{
    close, ClientMessage, ErrorCode, Join, LeaveReason, ServerMessage, MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
};

use super::control::{ControlCommand, SessionEvent};
use super::AppState;
use crate::auth::{AuthError, RoomId, RoomTicket};
use crate::room::SessionId;

/// Unparsable messages tolerated before the peer is disconnected.
const MAX_BAD_MESSAGES: u32 = 8;

type Limiter = governor::DefaultDirectRateLimiter;

/// A limit of `per_s` a second with bursts of twice that (0: none).
fn limiter(per_s: u32) -> Option<Limiter> {
    let rate = std::num::NonZeroU32::new(per_s)?;
    let burst = rate.saturating_mul(std::num::NonZeroU32::new(2)?);
    Some(governor::RateLimiter::direct(
        governor::Quota::per_second(rate).allow_burst(burst),
    ))
}

/// Whether `msg` is within the session's rates (all messages, and text messages).
fn within_rate(messages: &Option<Limiter>, texts: &Option<Limiter>, msg: &ClientMessage) -> bool {
    let ok = |l: &Option<Limiter>| l.as_ref().is_none_or(|l| l.check().is_ok());
    ok(messages)
        && (!matches!(
            msg,
            ClientMessage::TextMessage { .. } | ClientMessage::LinkMic { .. }
        ) || ok(texts))
}

pub async fn session(
    socket: WebSocket,
    state: Arc<AppState>,
    ip: std::net::IpAddr,
    edge_hop: bool,
) {
    let _live = super::LiveSession::new(&state);
    let id = SessionId(state.next_session.fetch_add(1, Ordering::Relaxed));
    let (tx, mut rx) = mpsc::channel(state.session_queue);
    if state
        .control
        .send(ControlCommand::Open { session: id, tx })
        .await
        .is_err()
    {
        return;
    }
    let (mut sink, mut stream) = socket.split();
    let idle = Duration::from_secs(state.idle_timeout_s);
    let mut bad = 0u32;
    let (messages, texts) = (limiter(state.message_rate), limiter(state.text_rate));
    // A join for a room another node serves: the session becomes a relay to it.
    let mut relay: Option<(Upstream, String)> = None;
    // The room and user of the last join handed to the control task.
    let mut joined: Option<(crate::room::RoomKey, String)> = None;
    // Why the session ends, and the close frame that says so (None: the peer closed
    // or the socket broke, so there is no one to tell).
    let (reason, close) = loop {
        tokio::select! {
            frame = tokio::time::timeout(idle, stream.next()) => {
                let text = match frame {
                    Err(_) => {
                        let left = ServerMessage::Left { reason: LeaveReason::Timeout };
                        let _ = sink.send(Message::Text(left.to_json().into())).await;
                        break (LeaveReason::Timeout, Some((close::IDLE, "nothing received for the idle timeout; send ping every 5-10 s")));
                    }
                    Ok(Some(Err(ref e))) if too_big(e) => {
                        let e = ServerMessage::error(ErrorCode::BadRequest, format!("a frame larger than {MAX_MESSAGE_BYTES} bytes; the session is closed"));
                        let _ = sink.send(Message::Text(e.to_json().into())).await;
                        break (LeaveReason::Disconnected, Some((close::TOO_BIG, "frame too big")));
                    }
                    Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => break (LeaveReason::Disconnected, None),
                    Ok(Some(Ok(Message::Text(t)))) => t,
                    Ok(Some(Ok(Message::Binary(_)))) => {
                        bad += 1;
                        let e = ServerMessage::error(ErrorCode::BadRequest, "binary frames are not part of the protocol; send JSON text");
                        if sink.send(Message::Text(e.to_json().into())).await.is_err() {
                            break (LeaveReason::Disconnected, None);
                        }
                        if bad > MAX_BAD_MESSAGES {
                            break (LeaveReason::Disconnected, Some((close::UNSUPPORTED_DATA, "binary frames are not part of the protocol")));
                        }
                        continue;
                    }
                    Ok(Some(Ok(_))) => continue, // ping/pong frames
                };
                match ClientMessage::parse(&text) {
                    Err(e) => {
                        bad += 1;
                        state.metrics.signaling_messages.with_label_values(&["invalid"]).inc();
                        let e = ServerMessage::error(ErrorCode::BadRequest, format!("not a valid message: {e}"));
                        if sink.send(Message::Text(e.to_json().into())).await.is_err() {
                            break (LeaveReason::Disconnected, None);
                        }
                        if bad > MAX_BAD_MESSAGES {
                            info!(session = id.0, "disconnecting a peer that keeps sending invalid messages");
                            break (LeaveReason::Disconnected, Some((close::INVALID_DATA, "too many invalid messages")));
                        }
                    }
                    Ok(msg) => {
                        state.metrics.signaling_messages.with_label_values(&[msg.type_name()]).inc();
                        let reply = if !within_rate(&messages, &texts, &msg) {
                            state.metrics.rate_limited.with_label_values(&[msg.type_name()]).inc();
                            Some(ServerMessage::Error {
                                code: ErrorCode::LimitExceeded,
                                message: format!(
                                    "too many messages: at most {} a second, {} of them text messages; this one was not acted on",
                                    state.message_rate, state.text_rate
                                ),
                                request: Some(msg.type_name().into()),
                                tencent_code: None,
                            })
                        } else { match msg {
                            ClientMessage::Ping { ts } => Some(ServerMessage::Pong { ts }),
                            ClientMessage::Join(join) => match join_command(&state, id, ip, join, edge_hop).await {
                                JoinOutcome::Reply(m) => Some(m),
                                JoinOutcome::Done(key, user) => {
                                    joined = Some((key, user));
                                    None
                                }
                                JoinOutcome::Relay(up) => {
                                    relay = Some((*up, text.to_string()));
                                    break (LeaveReason::Disconnected, None);
                                }
                            },
                            other => {
                                // The backend is asked before a publication is let in
                                // (the session waits for its answer, at most
                                // `hook_timeout_ms`).
                                let refused = match other {
                                    ClientMessage::Publish { screen, .. } if state.admission.is_some() => {
                                        ask_publish(&state, ip, joined.as_ref(), screen).await
                                    }
                                    _ => None,
                                };
                                if refused.is_none() {
                                    let _ = state.control.send(ControlCommand::Message { session: id, msg: other }).await;
                                }
                                refused
                            }
                        }};
                        if let Some(reply) = reply {
                            if sink.send(Message::Text(reply.to_json().into())).await.is_err() {
                                break (LeaveReason::Disconnected, None);
                            }
                        }
                    }
                }
            }
            event = rx.recv() => match event {
                Some(SessionEvent::Send(msg)) => {
                    let last = matches!(msg, ServerMessage::Left { .. });
                    // Written, and flushed once nothing more is queued: a burst of room
                    // events (a class joining) leaves in a few writes, not one each.
                    let flush = last || rx.is_empty();
                    if sink.feed(Message::Text(msg.to_json().into())).await.is_err()
                        || (flush && sink.flush().await.is_err())
                    {
                        break (LeaveReason::Disconnected, None);
                    }
                    if last {
                        break (LeaveReason::Left, Some((close::NORMAL, "left")));
                    }
                }
                Some(SessionEvent::Close(reason)) => {
                    let _ = sink.send(Message::Text(ServerMessage::Left { reason }.to_json().into())).await;
                    break (reason, Some(closing(reason)));
                }
                // The control task dropped this session: its queue of room events
                // overflowed (or the control task itself is gone).
                None if state.control.is_closed() => break (LeaveReason::Disconnected, Some((close::INTERNAL_ERROR, "the server's control plane stopped"))),
                None => break (LeaveReason::Timeout, Some((close::TOO_SLOW, "room events were not read fast enough"))),
            },
        }
    };
    let close: Option<(u16, String)> = match relay {
        Some((up, join)) => super::relay::pipe(&state, &mut sink, &mut stream, up, join).await,
        None => close.map(|(c, w)| (c, w.to_owned())),
    };
    match close {
        Some((code, why)) => {
            let frame = axum::extract::ws::CloseFrame {
                code,
                reason: why.into(),
            };
            let _ = sink.send(Message::Close(Some(frame))).await;
        }
        None => {
            let _ = sink.close().await;
        }
    }
    debug!(session = id.0, ?reason, "signaling session ended");
    let _ = state
        .control
        .send(ControlCommand::Closed {
            session: id,
            reason,
        })
        .await;
}

/// The close code and reason for a session the server ends with `left`.
fn closing(reason: LeaveReason) -> (u16, &'static str) {
    match reason {
        LeaveReason::Left => (close::NORMAL, "left"),
        LeaveReason::Replaced => (close::REPLACED, "replaced by a new session of this user"),
        LeaveReason::ServerShutdown => (close::GOING_AWAY, "server shutting down"),
        LeaveReason::Timeout => (close::MEDIA_TIMEOUT, "the media connection failed"),
        LeaveReason::Disconnected => (close::NORMAL, "disconnected"),
        LeaveReason::Removed => (close::REMOVED, "removed from the room"),
    }
}

/// Whether a websocket error is a frame or message over the size limit.
fn too_big(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(tungstenite::Error::Capacity(_)) = s.downcast_ref::<tungstenite::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

fn credential_error(code: ErrorCode, e: &AuthError) -> ServerMessage {
    ServerMessage::Error {
        code,
        message: e.to_string(),
        request: Some("join".into()),
        tencent_code: e.tencent_code(),
    }
}

type Upstream = super::relay::Upstream;

/// What a `join` became.
enum JoinOutcome {
    /// Refused: the error to send.
    Reply(ServerMessage),
    /// Handed to the control task with its verified ticket: the room and user it names.
    Done(crate::room::RoomKey, String),
    /// Its room is served by another node, reached: relay the session there.
    Relay(Box<Upstream>),
}

/// Verifies a `join`; on success hands the control task the ticket (or, in a cluster,
/// connects to the node serving the room), otherwise returns the error to send.
async fn join_command(
    state: &AppState,
    id: SessionId,
    ip: std::net::IpAddr,
    join: Join,
    edge_hop: bool,
) -> JoinOutcome {
    let refuse = |outcome: &str, msg: ServerMessage| {
        state.metrics.joins.with_label_values(&[outcome]).inc();
        JoinOutcome::Reply(msg)
    };
    if let Some(why) = state.unavailable() {
        return refuse(
            "unavailable",
            ServerMessage::error(ErrorCode::Unavailable, why),
        );
    }
    if join.protocol != PROTOCOL_VERSION {
        return refuse(
            "bad_request",
            ServerMessage::error(
                ErrorCode::UnsupportedProtocol,
                format!(
                    "protocol {} is not spoken here; this server speaks {PROTOCOL_VERSION}",
                    join.protocol
                ),
            ),
        );
    }
    let room = match (join.room_id, join.str_room_id) {
        (Some(0), None) => None,
        (Some(n), None) => Some(RoomId::Num(n)),
        (None, Some(s)) if !s.is_empty() && s.len() <= 64 => Some(RoomId::Str(s)),
        _ => None,
    };
    let Some(room) = room else {
        return refuse(
            "bad_request",
            ServerMessage::error(
                ErrorCode::BadRequest,
                "give exactly one of roomID (1..=4294967295) or strRoomID (1 to 64 bytes)",
            ),
        );
    };
    if let Err(m) = state.may_verify(ip) {
        info!(session = id.0, %ip, "join refused before its credentials were checked: {m}");
        return refuse(
            "throttled",
            ServerMessage::Error {
                code: ErrorCode::LimitExceeded,
                message: m,
                request: Some("join".into()),
                tencent_code: None,
            },
        );
    }
    let now = crate::auth::unix_now();
    let app = match state.keyring.app(join.sdk_app_id) {
        Ok(app) => app,
        Err(e) => {
            state.verify_failed(ip);
            return refuse(
                "invalid_user_sig",
                credential_error(ErrorCode::InvalidUserSig, &e),
            );
        }
    };
    if let Err(e) = app.verify_user_sig(&join.user_sig, &join.user_id, now) {
        info!(session = id.0, user = %join.user_id, error = %e, "join refused: userSig");
        state.verify_failed(ip);
        return refuse(
            "invalid_user_sig",
            credential_error(ErrorCode::InvalidUserSig, &e),
        );
    }
    let ticket: RoomTicket = match app.verify_private_map_key(
        &join.private_map_key,
        &join.user_id,
        &room,
        now,
    ) {
        Ok(t) => t,
        Err(e) => {
            info!(session = id.0, user = %join.user_id, error = %e, "join refused: privateMapKey");
            state.verify_failed(ip);
            return refuse(
                "invalid_private_map_key",
                credential_error(ErrorCode::InvalidPrivateMapKey, &e),
            );
        }
    };
    // The node whose room this node carries the member of (rooms that span nodes).
    let mut edge_of: Option<Box<crate::cluster::NodeRecord>> = None;
    if let Some(cluster) = &state.cluster {
        let key = crate::room::RoomKey {
            sdk_app_id: join.sdk_app_id,
            room: ticket.room.clone(),
        };
        // A node that cannot be reached is suspected and the room placed again: at
        // most one retry.
        let mut tries = 0;
        loop {
            tries += 1;
            match cluster.route(&key).await {
                Ok(crate::cluster::Route::Local) => break,
                Ok(crate::cluster::Route::Remote(node)) => {
                    // The room's node takes no more members: the member joins on
                    // another node, which relays the room's streams from it.
                    let (target, as_edge) = match cluster.edge_for(&key, &node, edge_hop) {
                        Some(super::cluster::Edge::Here) => {
                            info!(session = id.0, user = %join.user_id, origin = %node.id, "the room's node is full: the member joins here, the room's streams relayed from there");
                            edge_of = Some(node);
                            break;
                        }
                        Some(super::cluster::Edge::There(edge)) => (edge, true),
                        None => (node, false),
                    };
                    let node = target;
                    match super::relay::connect_as(&node, ip, &cluster.tls, as_edge).await {
                        Ok(up) => {
                            info!(session = id.0, user = %join.user_id, node = %node.id, "join relayed to the room's node");
                            state.metrics.joins.with_label_values(&["relayed"]).inc();
                            return JoinOutcome::Relay(Box::new(up));
                        }
                        Err(e) if tries < 2 => {
                            debug!(node = %node.id, error = %e, "the room's node did not answer");
                            cluster.suspect(&node);
                        }
                        Err(e) => {
                            return refuse(
                                "unavailable",
                                ServerMessage::error(
                                    ErrorCode::Unavailable,
                                    format!(
                                        "the room's node {} cannot be reached now ({e}); try again",
                                        node.id
                                    ),
                                ),
                            )
                        }
                    }
                }
                Err(why) => {
                    return refuse(
                        "unavailable",
                        ServerMessage::error(ErrorCode::Unavailable, why),
                    )
                }
            }
        }
    }
    let joined = crate::room::RoomKey {
        sdk_app_id: join.sdk_app_id,
        room: ticket.room.clone(),
    };
    let _ = state
        .control
        .send(ControlCommand::Join {
            session: id,
            sdk_app_id: join.sdk_app_id,
            ticket: Box::new(ticket),
            auto_subscribe: join.auto_subscribe,
            congestion_policy: join.congestion_policy,
            push: false,
            edge_of,
        })
        .await;
    JoinOutcome::Done(joined, join.user_id)
}

/// The backend's `on_publish` hook, if configured, for a member's `publish`: the
/// refusal to send, if it says no.
async fn ask_publish(
    state: &AppState,
    ip: std::net::IpAddr,
    joined: Option<&(crate::room::RoomKey, String)>,
    screen: bool,
) -> Option<ServerMessage> {
    let (key, user) = joined?;
    let stream = if screen {
        crate::room::screen_stream_id_for(key, user)
    } else {
        crate::room::stream_id_for(key, user)
    };
    let why = super::hooks::Admission::for_room(
        &state.admission,
        ip,
        super::hooks::Ask::Publish,
        &stream,
        "webrtc",
        key,
        Some(user),
    )
    .await
    .err()?;
    info!(%stream, %why, "publish refused by the backend's on_publish hook");
    Some(ServerMessage::Error {
        code: ErrorCode::MissingPrivilege,
        message: why,
        request: Some("publish".into()),
        tencent_code: None,
    })
}
