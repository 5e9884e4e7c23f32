//! The control task: the one owner of [`Rooms`], fed by signaling sessions.
//!
//! Sessions verify credentials themselves (in parallel, ECDSA costs ~0.3 ms) and send
//! the control task verified commands; it applies them to the room core and routes the
//! output: messages to sessions over bounded queues, commands to the media plane.
//! A session whose queue is full is closed rather than allowed to grow memory.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use weir_signaling::{ClientMessage, ErrorCode, Kind, LeaveReason, ServerMessage, Target};

use crate::auth::{Identity, Privileges, RoomId, RoomTicket, TokenKind};
use crate::metrics::Metrics;
use crate::room::{MediaCommand, Output, RoomError, RoomKey, Rooms, SessionId};
use crate::weapp::{self, Effect, RoomService, RoomView, ViewMember};

/// Outgoing messages a session may have queued before it counts as too slow, in a
/// node whose rooms hold up to `max_members_per_room`: a room's worth of membership
/// changes (everyone joining, or leaving and joining again) on top of 256 for the
/// rest. A class joining at once sends each member one `memberJoined` per classmate
/// within a second or two, while the node is busiest (the handshakes); with room for
/// 256 of them, a 480-member storm closed most sessions as too slow, each closing
/// sending the others more events, and nobody, the teacher included, stayed in.
/// The queue holds messages, not bytes: room events are small, and each waits
/// only while its session task catches up.
pub fn session_queue(max_members_per_room: usize) -> usize {
    256 + 2 * max_members_per_room
}

/// What the control task tells a session task.
#[derive(Debug)]
pub enum SessionEvent {
    Send(ServerMessage),
    /// Send `left` with this reason and close.
    Close(LeaveReason),
}

/// What the control task is asked to do.
#[derive(Debug)]
pub enum ControlCommand {
    Open {
        session: SessionId,
        tx: mpsc::Sender<SessionEvent>,
    },
    Join {
        session: SessionId,
        sdk_app_id: u64,
        ticket: Box<RoomTicket>,
        auto_subscribe: bool,
        /// The policy of the room if this join creates it.
        congestion_policy: Option<weir_signaling::CongestionPolicy>,
        /// An RTMP push: it joins beside its user's signaling session, if any.
        push: bool,
        /// The room spills from this node (rooms that span nodes): the member joins
        /// this node's copy of it, whose streams are relayed from there.
        edge_of: Option<Box<crate::cluster::NodeRecord>>,
    },
    /// From a relay of a room this node carries for another node (`relay`: which one,
    /// as a room carried again later has a relay of its own).
    Span {
        room: RoomKey,
        relay: u64,
        event: super::span::SpanEvent,
    },
    Message {
        session: SessionId,
        msg: ClientMessage,
    },
    /// A non-websocket publisher (an RTMP pusher) publishes under its own stream name;
    /// the answer (`published` or an error) goes to the session's queue.
    PublishAs {
        session: SessionId,
        stream_id: String,
        source: &'static str,
        audio: bool,
        video: bool,
    },
    Closed {
        session: SessionId,
        reason: LeaveReason,
    },
    /// From the media plane: something to tell a session (SDP, candidates, errors).
    MediaSignal {
        session: SessionId,
        msg: ServerMessage,
    },
    /// From the media plane: the session's media connection failed.
    MediaGone {
        session: SessionId,
    },
    /// From the media plane: the room's target for a stream's publisher changed;
    /// everyone in the room is told (RTMP pushers have no RTCP to hear it on).
    PublishTarget {
        stream_id: String,
        bitrate: u64,
    },
    /// A room-service call (`/weapp/...`); its JSON answer goes back on `reply`.
    RoomService {
        call: Box<weapp::Call>,
        reply: tokio::sync::oneshot::Sender<serde_json::Map<String, serde_json::Value>>,
    },
    /// A room-service login whose userSig the HTTP shell verified; the token goes back.
    RoomServiceLogin {
        sdk_app_id: u64,
        user_id: String,
        expires_at: u64,
        random: [u8; 16],
        reply: tokio::sync::oneshot::Sender<Option<String>>,
    },
    /// An RTMP push of a room-service URL (`{sdkappid}_{userID}`): it joins and
    /// publishes in the room an `add_pusher` binds it to, now or when that comes.
    PushPending {
        session: SessionId,
        stream: String,
        sdk_app_id: u64,
        audio: bool,
        video: bool,
    },
    /// Every room of the node (the development page's room list).
    ListRooms {
        reply: tokio::sync::oneshot::Sender<Vec<crate::room::RoomSummary>>,
    },
    Shutdown,
}

/// The media plane's side of the narrow interface.
#[derive(Debug)]
pub enum MediaInput {
    Command(MediaCommand),
    /// SDP or a candidate from a session.
    Signal {
        session: SessionId,
        msg: ClientMessage,
    },
    /// Copy a WebRTC stream's RTP and sender reports to a converter (None: stop).
    Tap {
        stream_id: String,
        tx: Option<mpsc::Sender<crate::media::TapEvent>>,
    },
    /// Ask a stream's publisher for a keyframe (an RTMP/FLV player needs one).
    RequestKeyframe {
        stream_id: String,
    },
    /// Test-only: the media task panics, as a bug reached by a peer's input would.
    #[cfg(feature = "fault-injection")]
    InjectPanic,
    /// Test-only: the media task works (blocks) this long, as a node past its capacity.
    #[cfg(feature = "fault-injection")]
    InjectStall(std::time::Duration),
}

pub struct Control {
    rooms: Rooms,
    sessions: HashMap<SessionId, mpsc::Sender<SessionEvent>>,
    media: Option<crate::media::MediaPlane>,
    /// The media worker of each session and stream the media plane knows (a room's
    /// worker, kept until it is closed or ended: a leave's commands come after the
    /// room has let the session go).
    media_sessions: HashMap<SessionId, usize>,
    media_receivers: HashMap<SessionId, usize>,
    receivers_per_worker: Vec<usize>,
    media_streams: HashMap<String, usize>,
    /// Rooms with more members than this spread their receiving connections over
    /// the media workers.
    spread_members: usize,
    metrics: Arc<Metrics>,
    /// Where WebRTC streams are offered to RTMP/FLV players, and the ones offered.
    live: Option<LivePlayback>,
    flv_sources: HashMap<String, Arc<crate::live::Source>>,
    /// The mini program room service, if on.
    weapp: Option<RoomService>,
    /// RTMP pushes of room-service URLs not yet bound to a room, by stream name.
    pending: HashMap<String, PendingPush>,
    /// The ICE servers stamped into every `joined` (TURN credentials depend on the
    /// user and the time, which the sans-I/O rooms do not know).
    ice: super::IceConfig,
    /// Room and member events for the backend, if callbacks are configured.
    callbacks: Option<super::hooks::Callbacks>,
    /// Set by the media plane while it cannot keep up: joins are refused.
    overloaded: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// What relaying rooms from other nodes takes (in a cluster).
    span: Option<super::span::SpanContext>,
    /// Rooms this node carries for the node serving them (their audience here).
    edges: HashMap<RoomKey, EdgeRoom>,
    /// Rooms carried here until now, with their stand-ins: their last events are
    /// being flushed.
    ended_edges: HashMap<RoomKey, HashSet<String>>,
    /// Rooms carried here that a member left since the last flush.
    edges_left: HashSet<RoomKey>,
    /// Relays started, which numbers them.
    relays_started: u64,
}

/// A room carried here for another node: its relay, and the members standing in
/// for the room's publishers there.
struct EdgeRoom {
    origin: String,
    /// Its relay's number: what an earlier relay of the room says is not heard.
    relay: u64,
    /// Dropped to end the relay.
    _stop: mpsc::Sender<()>,
    /// Stand-in sessions, by the user they stand in for, with their streams here.
    standins: HashMap<String, (SessionId, usize)>,
}

/// What a member of a room carried here may do: receive. Publishing needs the room's
/// node (the stream would have to go back to it), so the send bits are taken off; the
/// room exists there, so creating it here needs no bit of the member's.
fn edge_privileges(p: Privileges) -> Privileges {
    let send = Privileges::SEND_AUDIO.0 | Privileges::SEND_VIDEO.0 | Privileges::SEND_SUB_VIDEO.0;
    Privileges((p.0 & !send) | Privileges::CREATE_ROOM.0)
}

#[derive(Debug, Clone)]
struct PendingPush {
    session: SessionId,
    sdk_app_id: u64,
    audio: bool,
    video: bool,
}

/// What the room service reads of the signaling rooms.
struct View<'a>(&'a Rooms);

impl RoomView for View<'_> {
    fn members(&self, room: &RoomKey) -> Vec<ViewMember> {
        self.0
            .members_of(room)
            .into_iter()
            .map(|(user_id, stream)| ViewMember { user_id, stream })
            .collect()
    }
}

/// What the control task needs to offer WebRTC streams to RTMP/FLV players.
pub struct LivePlayback {
    pub hub: Arc<crate::live::Hub>,
    pub aac_bitrate: u32,
}

fn error_msg(e: &RoomError, request: &str) -> ServerMessage {
    refused(e.code(), e.to_string(), request)
}

fn refused(code: ErrorCode, message: String, request: &str) -> ServerMessage {
    ServerMessage::Error {
        code,
        message,
        request: Some(request.to_owned()),
        tencent_code: None,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Control {
    pub fn new(
        rooms: Rooms,
        media: Option<crate::media::MediaPlane>,
        metrics: Arc<Metrics>,
        live: Option<LivePlayback>,
    ) -> Self {
        Self {
            rooms,
            sessions: HashMap::new(),
            media,
            media_sessions: HashMap::new(),
            media_receivers: HashMap::new(),
            receivers_per_worker: Vec::new(),
            media_streams: HashMap::new(),
            spread_members: usize::MAX,
            metrics,
            live,
            flv_sources: HashMap::new(),
            weapp: None,
            pending: HashMap::new(),
            ice: super::IceConfig::default(),
            callbacks: None,
            overloaded: None,
            span: None,
            edges: HashMap::new(),
            ended_edges: HashMap::new(),
            edges_left: HashSet::new(),
            relays_started: 0,
        }
    }

    /// Rooms with more members than `n` spread their receiving connections over the
    /// media workers.
    pub fn with_spread_members(mut self, n: usize) -> Self {
        self.spread_members = n;
        self
    }

    /// Carries members of rooms that spill from other nodes (in a cluster).
    pub fn with_span(mut self, span: Option<super::span::SpanContext>) -> Self {
        self.span = span;
        self
    }

    /// Refuses joins while `flag` is set (the media plane's overload).
    pub fn with_overload_flag(mut self, flag: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.overloaded = Some(flag);
        self
    }

    /// Tells the backend of rooms and members (TRTC's room events).
    pub fn with_callbacks(mut self, callbacks: Option<super::hooks::Callbacks>) -> Self {
        self.callbacks = callbacks;
        self
    }

    /// Tells every joining client of these ICE servers.
    pub fn with_ice_servers(mut self, ice: super::IceConfig) -> Self {
        self.ice = ice;
        self
    }

    /// Serves the mini program room service too (when given one).
    pub fn with_room_service_opt(mut self, service: Option<RoomService>) -> Self {
        self.weapp = service;
        self
    }

    /// Applies what the room service decided to the signaling rooms.
    fn apply_effects(&mut self) {
        let Some(service) = self.weapp.as_mut() else {
            return;
        };
        for effect in service.take_effects() {
            match effect {
                Effect::Bind {
                    stream,
                    room,
                    user_id,
                } => {
                    if let Some(p) = self.pending.remove(&stream) {
                        self.join_pending(&stream, p, room, user_id);
                    }
                }
                Effect::Remove { room, user_id } => {
                    if self.rooms.kick(&room, &user_id, LeaveReason::Removed) {
                        info!(room = %room.room, user = %user_id, "removed from the room by the room service");
                    }
                }
                Effect::EndPush {
                    room,
                    user_id,
                    else_remove,
                } => {
                    if self.rooms.end_push(&room, &user_id, LeaveReason::Removed) {
                        info!(room = %room.room, user = %user_id, "push taken off the room by the room service");
                    } else if else_remove && self.rooms.kick(&room, &user_id, LeaveReason::Removed)
                    {
                        info!(room = %room.room, user = %user_id, "removed from the room by the room service");
                    }
                }
            }
        }
    }

    /// A room-service RTMP push joins its room and publishes, as the user it was
    /// handed to (`add_pusher` checked the URL is that user's).
    fn join_pending(&mut self, stream: &str, p: PendingPush, room: RoomKey, user_id: String) {
        if room.sdk_app_id != p.sdk_app_id {
            return;
        }
        let now = crate::auth::unix_now();
        let privileges = Privileges::CREATE_ROOM
            | Privileges::ENTER_ROOM
            | Privileges::SEND_AUDIO
            | Privileges::SEND_VIDEO;
        let ticket = RoomTicket {
            identity: Identity {
                kind: TokenKind::LiveUrl,
                sdk_app_id: room.sdk_app_id,
                user_id: user_id.clone(),
                issued_at: now,
                expires_at: u64::MAX,
            },
            room: room.room.clone(),
            privileges,
            privilege_names: privileges.names(),
            room_expires_at: u64::MAX,
        };
        match self.rooms.join_push(p.session, room.sdk_app_id, &ticket) {
            Ok(()) => {
                info!(session = p.session.0, %stream, user = %user_id, room = %room.room, "room-service push joined its room");
                if let Err(e) = self.rooms.publish_as(
                    p.session,
                    Some(stream.to_owned()),
                    "rtmp",
                    p.audio,
                    p.video,
                ) {
                    self.refuse(p.session, &e, "publish");
                }
            }
            Err(e) => {
                info!(session = p.session.0, %stream, error = %e, "room-service push could not join its room");
                self.refuse(p.session, &e, "join");
            }
        }
    }

    fn tick_room_service(&mut self) {
        if let Some(service) = self.weapp.as_mut() {
            let expired = service.tick(&View(&self.rooms), now_ms());
            self.metrics.room_service_expired.inc_by(expired as u64);
        }
        self.apply_effects();
    }

    /// A join the cluster routed here as a member of a room that spills from
    /// `edge_of`: the room is carried here (its relay started if it is not yet), and
    /// the member may receive only. A room this node serves itself is joined as usual.
    fn carry(
        &mut self,
        sdk_app_id: u64,
        ticket: &mut RoomTicket,
        edge_of: Option<Box<crate::cluster::NodeRecord>>,
    ) -> Result<(), RoomError> {
        let key = RoomKey {
            sdk_app_id,
            room: ticket.room.clone(),
        };
        if !self.edges.contains_key(&key) {
            let Some(origin) = edge_of else {
                return Ok(());
            };
            if self.rooms.has_room(&key) {
                return Ok(());
            }
            let Some(ctx) = self.span.clone() else {
                return Err(RoomError::Overloaded);
            };
            let (stop, stop_rx) = mpsc::channel(1);
            info!(room = %key.name(), origin = %origin.id, "carrying the room for its node: relaying its streams here");
            self.relays_started += 1;
            let relay = self.relays_started;
            self.edges.insert(
                key.clone(),
                EdgeRoom {
                    origin: origin.id.clone(),
                    relay,
                    _stop: stop,
                    standins: HashMap::new(),
                },
            );
            tokio::spawn(super::span::run(ctx, key, relay, *origin, stop_rx));
        }
        ticket.privileges = edge_privileges(ticket.privileges);
        Ok(())
    }

    /// What a room's relay reports: its streams stand in here as members' streams.
    fn span_event(&mut self, room: RoomKey, relay: u64, event: super::span::SpanEvent) {
        use super::span::SpanEvent;
        let Some(edge) = self.edges.get_mut(&room).filter(|e| e.relay == relay) else {
            return;
        };
        match event {
            SpanEvent::StreamAdded { session, stream } => {
                let standin = edge
                    .standins
                    .entry(stream.user_id.clone())
                    .or_insert((session, 0));
                if standin.1 == 0 {
                    let now = crate::auth::unix_now();
                    let ticket = RoomTicket {
                        identity: Identity {
                            kind: TokenKind::V2,
                            sdk_app_id: room.sdk_app_id,
                            user_id: stream.user_id.clone(),
                            issued_at: now,
                            expires_at: u64::MAX,
                        },
                        room: room.room.clone(),
                        privileges: Privileges::ENTER_ROOM
                            | Privileges::CREATE_ROOM
                            | Privileges::SEND_AUDIO
                            | Privileges::SEND_VIDEO
                            | Privileges::SEND_SUB_VIDEO,
                        privilege_names: Vec::new(),
                        room_expires_at: u64::MAX,
                    };
                    if let Err(e) = self.rooms.join(session, room.sdk_app_id, &ticket, false) {
                        warn!(room = %room.name(), user = %stream.user_id, error = %e, "a relayed stream's stand-in could not join");
                        edge.standins.remove(&stream.user_id);
                        return;
                    }
                }
                match self.rooms.publish_relayed(
                    session,
                    &stream.stream_id,
                    (stream.audio, stream.video, stream.screen),
                ) {
                    Ok(_) => {
                        standin.1 += 1;
                        if stream.audio_muted {
                            let _ = self.rooms.mute(session, Kind::Audio, true);
                        }
                        if stream.video_muted {
                            let _ = self.rooms.mute(session, Kind::Video, true);
                        }
                    }
                    Err(e) => {
                        warn!(room = %room.name(), stream = %stream.stream_id, error = %e, "a relayed stream could not be published here");
                        if standin.1 == 0 {
                            edge.standins.remove(&stream.user_id);
                            self.ended_edges
                                .entry(room.clone())
                                .or_default()
                                .insert(stream.user_id.clone());
                            self.rooms.leave(session, LeaveReason::Left);
                        }
                    }
                }
            }
            SpanEvent::StreamRemoved { session, screen } => {
                let _ = self.rooms.unpublish(session, screen);
                if let Some((user, s)) = edge.standins.iter_mut().find(|(_, s)| s.0 == session) {
                    s.1 = s.1.saturating_sub(1);
                    if s.1 == 0 {
                        let user = user.clone();
                        edge.standins.remove(&user);
                        self.ended_edges
                            .entry(room.clone())
                            .or_default()
                            .insert(user);
                        self.rooms.leave(session, LeaveReason::Left);
                    }
                }
            }
            SpanEvent::StreamMuted {
                session,
                kind,
                muted,
            } => {
                let _ = self.rooms.mute(session, kind, muted);
            }
            SpanEvent::Lost { why } => {
                let edge = self.edges.remove(&room).expect("looked up above");
                self.ended_edges
                    .insert(room.clone(), edge.standins.keys().cloned().collect());
                let standins: HashSet<SessionId> = edge.standins.values().map(|s| s.0).collect();
                for s in &standins {
                    self.rooms.leave(*s, LeaveReason::Left);
                }
                let members = self.rooms.members_of(&room);
                info!(room = %room.name(), origin = %edge.origin, members = members.len(), %why, "the room's node is lost: its members here move");
                for (user, _) in members {
                    self.rooms.kick(&room, &user, LeaveReason::ServerShutdown);
                }
            }
        }
    }

    /// After a member left a room carried here (however: left, closed, kicked, too
    /// slow): with no member of its own left, the room's relay ends and its stand-ins
    /// go.
    fn release_edge(&mut self, room: RoomKey) {
        let Some(edge) = self.edges.get(&room) else {
            return;
        };
        let standins: HashSet<&str> = edge.standins.keys().map(String::as_str).collect();
        let own = self
            .rooms
            .members_of(&room)
            .iter()
            .filter(|(u, _)| !standins.contains(u.as_str()))
            .count();
        if own > 0 {
            return;
        }
        let edge = self.edges.remove(&room).expect("looked up above");
        self.ended_edges
            .insert(room.clone(), edge.standins.keys().cloned().collect());
        for (session, _) in edge.standins.values() {
            self.rooms.leave(*session, LeaveReason::Left);
        }
        debug!(room = %room.name(), "no member here any more: the room's relay ends");
    }

    /// WebRTC streams become playable over RTMP/HTTP-FLV while they are published
    /// (RTMP pushers register their own, unconverted).
    fn offer_to_players(&mut self, cmd: &MediaCommand) {
        let (Some(live), Some(media)) = (&self.live, &self.media) else {
            return;
        };
        match cmd {
            MediaCommand::AllowPublish {
                stream_id,
                room,
                source: "webrtc",
                ..
            } => {
                let source = crate::live::webrtc::register(
                    &live.hub,
                    stream_id,
                    crate::live::StreamPlace {
                        sdk_app_id: room.sdk_app_id,
                        room: room.room.clone(),
                    },
                    media.input(media.worker_for(room)).clone(),
                    live.aac_bitrate,
                    self.metrics.clone(),
                );
                self.flv_sources.insert(stream_id.clone(), source);
            }
            MediaCommand::EndStream { stream_id } => {
                if let Some(source) = self.flv_sources.remove(stream_id) {
                    live.hub.close(stream_id, &source);
                }
            }
            _ => {}
        }
    }

    pub async fn run(mut self, mut rx: mpsc::Receiver<ControlCommand>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let cmd = tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => cmd,
                    None => break,
                },
                _ = tick.tick() => {
                    self.tick_room_service();
                    self.flush().await;
                    continue;
                }
            };
            let shutdown = matches!(cmd, ControlCommand::Shutdown);
            self.apply(cmd).await;
            self.apply_effects();
            self.flush().await;
            self.metrics.rooms.set(self.rooms.room_count() as i64);
            self.metrics
                .participants
                .set(self.rooms.participant_count() as i64);
            self.metrics
                .subscriptions
                .set(self.rooms.subscription_count() as i64);
            if shutdown {
                break;
            }
        }
        debug!("control task stopped");
    }

    /// Tells a session its request was refused; a limit's refusal is counted by limit.
    fn refuse(&mut self, session: SessionId, e: &RoomError, request: &str) {
        if let Some(limit) = e.limit() {
            self.metrics
                .limit_refusals
                .with_label_values(&[limit])
                .inc();
        }
        self.tell(session, error_msg(e, request));
    }

    fn tell(&mut self, session: SessionId, mut msg: ServerMessage) {
        // What the media plane says about a screen connection goes to its owner, about
        // its `screen` target.
        let session = match session.screen_owner() {
            Some(owner) => {
                match &mut msg {
                    ServerMessage::Answer { target, .. }
                    | ServerMessage::Offer { target, .. }
                    | ServerMessage::Candidate { target, .. } => *target = Target::Screen,
                    _ => {}
                }
                owner
            }
            None => session,
        };
        if let ServerMessage::Joined {
            user_id,
            ice_servers,
            ..
        } = &mut msg
        {
            *ice_servers = self.ice.for_user(user_id, now_ms() / 1000);
        }
        if let ServerMessage::Error { code, .. } = &msg {
            self.metrics
                .signaling_errors
                .with_label_values(&[&u16::from(*code).to_string()])
                .inc();
        }
        let Some(tx) = self.sessions.get(&session) else {
            return;
        };
        // Room text is what any member can make others receive: under pressure it is
        // dropped for this recipient rather than let fill the queue whose overflow
        // closes the session (one member must not be able to disconnect the others).
        if matches!(msg, ServerMessage::TextMessage { .. }) && tx.capacity() < tx.max_capacity() / 4
        {
            self.metrics.text_dropped.inc();
            debug!(
                session = session.0,
                "text message dropped: the session's queue is nearly full"
            );
            return;
        }
        match tx.try_send(SessionEvent::Send(msg)) {
            Ok(()) => {}
            // The session has ended (its socket closed) and its `Closed`, with the real
            // reason, is on its way: nothing to tell it, and no one to blame. (Before,
            // this read as "cannot keep up": when members left together, the offers and
            // events still addressed to the ones already gone closed them as slow, and
            // the room was told `timeout` instead of why they left.)
            Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!(
                    session = session.0,
                    "signaling session cannot keep up; closing it"
                );
                self.metrics.slow_sessions.inc();
                self.sessions.remove(&session);
                self.rooms.leave(session, LeaveReason::Timeout);
            }
        }
    }

    async fn send_to_media(&mut self, input: MediaInput) {
        let Some(media) = self.media.clone() else {
            return;
        };
        let to = self.media_worker(&media, &input);
        let sent = match to {
            Some(w) => media.input(w).send(input).await.is_ok(),
            // Closing a session: every worker that may know it (cheap, and a stale
            // placement cannot leave a connection behind).
            None => {
                let mut ok = true;
                for w in 0..media.workers() {
                    if let MediaInput::Command(cmd) = &input {
                        ok &= media
                            .input(w)
                            .send(MediaInput::Command(cmd.clone()))
                            .await
                            .is_ok();
                    }
                }
                ok
            }
        };
        if !sent {
            warn!("media plane is gone");
            self.media = None;
        }
    }

    /// The worker an input goes to (None: every worker). A room's publishing
    /// connections live on its home worker; its receiving connections too while it
    /// has at most `spread_members` members, after which each new receiver goes to the
    /// worker with the fewest, which mirrors the streams from the home. A stream's
    /// start and end go to its home, which tells the other workers (so they ask
    /// nothing of it before it knows it); a closing session goes to every worker.
    fn media_worker(
        &mut self,
        media: &crate::media::MediaPlane,
        input: &MediaInput,
    ) -> Option<usize> {
        match input {
            MediaInput::Command(MediaCommand::AllowPublish {
                session,
                stream_id,
                room,
                ..
            }) => {
                // To the room's worker, which tells the others.
                let w = media.worker_for(room);
                self.media_sessions.insert(*session, w);
                self.media_streams.insert(stream_id.clone(), w);
                Some(w)
            }
            MediaInput::Command(MediaCommand::Subscribe { subscriber, .. }) => {
                Some(self.receiving_worker(media, *subscriber))
            }
            MediaInput::Command(MediaCommand::Unsubscribe { subscriber, .. }) => {
                self.media_receivers.get(subscriber).copied()
            }
            MediaInput::Command(MediaCommand::EndStream { stream_id }) => {
                self.media_streams.remove(stream_id)
            }
            MediaInput::Command(MediaCommand::CloseSession { session }) => {
                self.media_sessions.remove(session);
                if let Some(w) = self.media_receivers.remove(session) {
                    if let Some(c) = self.receivers_per_worker.get_mut(w) {
                        *c = c.saturating_sub(1);
                    }
                }
                None
            }
            MediaInput::Signal { session, msg } => {
                let target = match msg {
                    ClientMessage::Offer { target, .. }
                    | ClientMessage::Answer { target, .. }
                    | ClientMessage::Candidate { target, .. } => *target,
                    _ => Target::Subscriber, // an ICE restart of the receiving connection
                };
                Some(match target {
                    Target::Publisher | Target::Screen => self.home_worker(media, *session),
                    Target::Subscriber => self.receiving_worker(media, *session),
                })
            }
            MediaInput::Tap { stream_id, .. } | MediaInput::RequestKeyframe { stream_id } => {
                Some(self.media_streams.get(stream_id).copied().unwrap_or(0))
            }
            #[cfg(feature = "fault-injection")]
            MediaInput::InjectPanic | MediaInput::InjectStall(_) => Some(0),
        }
    }

    /// The worker of the session's room (a screen share is in its owner's).
    fn home_worker(&mut self, media: &crate::media::MediaPlane, session: SessionId) -> usize {
        if let Some(w) = self.media_sessions.get(&session) {
            return *w;
        }
        let member = session.screen_owner().unwrap_or(session);
        let w = self
            .rooms
            .place_of(member)
            .map_or(0, |(room, _)| media.worker_for(&room));
        self.media_sessions.insert(session, w);
        w
    }

    /// The worker of the session's receiving connection, chosen at its first use.
    fn receiving_worker(&mut self, media: &crate::media::MediaPlane, session: SessionId) -> usize {
        if let Some(w) = self.media_receivers.get(&session) {
            return *w;
        }
        let w = match self.rooms.place_of(session) {
            Some((room, _)) if self.rooms.members_of(&room).len() > self.spread_members => {
                // The worker with the fewest receiving connections; on a tie not the
                // home, which also receives the room's media and feeds the mirrors.
                let home = media.worker_for(&room);
                let counts = &self.receivers_per_worker;
                (0..media.workers())
                    .min_by_key(|w| (counts.get(*w).copied().unwrap_or(0), *w == home, *w))
                    .unwrap_or(home)
            }
            Some((room, _)) => media.worker_for(&room),
            None => self.home_worker(media, session),
        };
        self.media_receivers.insert(session, w);
        if self.receivers_per_worker.len() < media.workers() {
            self.receivers_per_worker.resize(media.workers(), 0);
        }
        self.receivers_per_worker[w] += 1;
        w
    }

    async fn apply(&mut self, cmd: ControlCommand) {
        match cmd {
            ControlCommand::Open { session, tx } => {
                self.sessions.insert(session, tx);
            }
            ControlCommand::Join {
                session,
                sdk_app_id,
                mut ticket,
                auto_subscribe,
                congestion_policy,
                push,
                edge_of,
            } => match if self
                .overloaded
                .as_ref()
                .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
            {
                Err(RoomError::Overloaded)
            } else if let Err(e) = self.carry(sdk_app_id, &mut ticket, edge_of) {
                Err(e)
            } else if push {
                self.rooms.join_push(session, sdk_app_id, &ticket)
            } else {
                self.rooms
                    .join(session, sdk_app_id, &ticket, auto_subscribe)
            } {
                Ok(()) => {
                    if let Some(policy) = congestion_policy {
                        self.rooms.configure_new_room(session, policy);
                    }
                    self.metrics.joins.with_label_values(&["ok"]).inc();
                    info!(session = session.0, user = %ticket.identity.user_id, room = %ticket.room, "joined");
                }
                Err(e) => {
                    let outcome = match e {
                        RoomError::Privilege(_) => "missing_privilege",
                        RoomError::TooManyRooms(_) | RoomError::RoomFull { .. } => "limit",
                        RoomError::Overloaded => "overloaded",
                        _ => "bad_request",
                    };
                    self.metrics.joins.with_label_values(&[outcome]).inc();
                    info!(session = session.0, user = %ticket.identity.user_id, room = %ticket.room, error = %e, "join refused");
                    self.refuse(session, &e, "join");
                }
            },
            ControlCommand::Message { session, msg } => self.message(session, msg).await,
            ControlCommand::PublishAs {
                session,
                stream_id,
                source,
                audio,
                video,
            } => {
                if let Err(e) =
                    self.rooms
                        .publish_as(session, Some(stream_id), source, audio, video)
                {
                    self.refuse(session, &e, "publish");
                }
            }
            ControlCommand::RoomService { call, reply } => {
                let answer = match self.weapp.as_mut() {
                    Some(service) => {
                        service.handle(&call, &View(&self.rooms), now_ms(), rand::random::<u32>)
                    }
                    None => {
                        let mut m = serde_json::Map::new();
                        m.insert("code".into(), weapp::code::NOT_SUPPORTED.into());
                        m.insert("message".into(), "the room service is off".into());
                        m
                    }
                };
                let _ = reply.send(answer);
            }
            ControlCommand::RoomServiceLogin {
                sdk_app_id,
                user_id,
                expires_at,
                random,
                reply,
            } => {
                let token = self
                    .weapp
                    .as_mut()
                    .map(|s| s.login(sdk_app_id, &user_id, expires_at, random, now_ms()));
                let _ = reply.send(token);
            }
            ControlCommand::PushPending {
                session,
                stream,
                sdk_app_id,
                audio,
                video,
            } => {
                let p = PendingPush {
                    session,
                    sdk_app_id,
                    audio,
                    video,
                };
                match self.weapp.as_ref().and_then(|s| s.binding(&stream)) {
                    Some((room, user)) => self.join_pending(&stream, p, room, user),
                    None => {
                        debug!(session = session.0, %stream, "room-service push waits for add_pusher");
                        self.pending.insert(stream, p);
                    }
                }
            }
            ControlCommand::Closed { session, reason } => {
                self.pending.retain(|_, p| p.session != session);
                self.sessions.remove(&session);
                self.rooms.leave(session, reason);
            }
            ControlCommand::Span { room, relay, event } => self.span_event(room, relay, event),
            ControlCommand::MediaSignal { session, msg } => self.tell(session, msg),
            ControlCommand::MediaGone { session } if session.screen_owner().is_some() => {
                let owner = session.screen_owner().expect("a screen identity");
                info!(
                    session = owner.0,
                    "screen-share connection lost; the screen stream ends"
                );
                self.rooms.screen_lost(owner);
            }
            ControlCommand::MediaGone { session } => {
                self.rooms.leave(session, LeaveReason::Timeout);
                if let Some(tx) = self.sessions.remove(&session) {
                    let _ = tx.try_send(SessionEvent::Close(LeaveReason::Timeout));
                }
            }
            ControlCommand::PublishTarget { stream_id, bitrate } => {
                self.rooms.publish_target(&stream_id, bitrate);
            }
            ControlCommand::ListRooms { reply } => {
                let mut rooms = self.rooms.summaries();
                for r in &mut rooms {
                    let key = RoomKey {
                        sdk_app_id: r.sdk_app_id,
                        room: if r.numeric {
                            r.room
                                .parse()
                                .map(RoomId::Num)
                                .unwrap_or(RoomId::Str(r.room.clone()))
                        } else {
                            RoomId::Str(r.room.clone())
                        },
                    };
                    r.edge_of = self.edges.get(&key).map(|e| e.origin.clone());
                }
                let _ = reply.send(rooms);
            }
            ControlCommand::Shutdown => {
                info!(
                    sessions = self.sessions.len(),
                    "telling every session the server is shutting down"
                );
                self.rooms.close_all(LeaveReason::ServerShutdown);
            }
        }
    }

    async fn message(&mut self, session: SessionId, msg: ClientMessage) {
        let request = msg.type_name();
        let result = match msg {
            ClientMessage::Publish {
                audio,
                video,
                min_bitrate,
                max_bitrate,
                screen: false,
            } => self
                .rooms
                .publish_bounded(session, audio, video, (min_bitrate, max_bitrate))
                .map(|_| ()),
            ClientMessage::Publish {
                audio: false,
                video: true,
                min_bitrate,
                max_bitrate,
                screen: true,
            } => self
                .rooms
                .publish_screen(session, (min_bitrate, max_bitrate))
                .map(|info| {
                    // The media plane names the screen connection by its own identity.
                    info!(
                        session = session.0,
                        media_session = session.screen().0,
                        stream = %info.stream_id,
                        "screen share published"
                    );
                }),
            ClientMessage::Publish { screen: true, .. } => Err(RoomError::ScreenVideoOnly),
            ClientMessage::Unpublish { screen } => self.rooms.unpublish(session, screen),
            ClientMessage::Subscribe { stream_ids } => self.rooms.subscribe(session, &stream_ids),
            ClientMessage::Unsubscribe { stream_ids } => {
                self.rooms.unsubscribe(session, &stream_ids)
            }
            ClientMessage::Mute { kind, muted } => self.rooms.mute(session, kind, muted),
            ClientMessage::TextMessage { text } => self.rooms.text(session, &text, now_ms()),
            ClientMessage::LinkMic {
                action,
                user_id,
                reason,
            } => {
                self.link_mic(session, action, user_id, reason);
                Ok(())
            }
            ClientMessage::Leave => {
                self.rooms.leave(session, LeaveReason::Left);
                Ok(())
            }
            m @ (ClientMessage::Offer { .. }
            | ClientMessage::Answer { .. }
            | ClientMessage::Candidate { .. }
            | ClientMessage::RestartIce) => {
                // The screen connection is a publisher connection of the session's
                // screen identity (`SessionId::screen`); its answers come back through
                // `tell`, which names the target again.
                let (session, m) = match m {
                    ClientMessage::Offer {
                        target: Target::Screen,
                        sdp,
                    } => (
                        session.screen(),
                        ClientMessage::Offer {
                            target: Target::Publisher,
                            sdp,
                        },
                    ),
                    ClientMessage::Candidate {
                        target: Target::Screen,
                        candidate,
                    } => (
                        session.screen(),
                        ClientMessage::Candidate {
                            target: Target::Publisher,
                            candidate,
                        },
                    ),
                    m => (session, m),
                };
                if !self
                    .rooms
                    .is_joined(session.screen_owner().unwrap_or(session))
                {
                    Err(RoomError::NotJoined)
                } else if self.media.is_none() {
                    self.tell(
                        session,
                        ServerMessage::error(
                            ErrorCode::Unavailable,
                            "the media plane is not running",
                        ),
                    );
                    Ok(())
                } else {
                    self.send_to_media(MediaInput::Signal { session, msg: m })
                        .await;
                    Ok(())
                }
            }
            ClientMessage::Join(_) | ClientMessage::Ping { .. } => Ok(()),
        };
        if let Err(e) = result {
            self.refuse(session, &e, request);
        }
    }

    /// The live room's stage: the room service decides, the other member is told.
    fn link_mic(
        &mut self,
        session: SessionId,
        action: weir_signaling::LinkMicAction,
        user: Option<String>,
        reason: String,
    ) {
        let Some((room, from)) = self.rooms.place_of(session) else {
            self.tell(session, error_msg(&RoomError::NotJoined, "linkMic"));
            return;
        };
        let decided = match self.weapp.as_mut() {
            Some(service) => service.link_mic(&room, &from, action, user.as_deref(), now_ms()),
            None => Err(crate::weapp::StageRefusal {
                code: ErrorCode::Unavailable,
                message: "this node serves no room service".into(),
            }),
        };
        match decided {
            Ok(to) => {
                info!(room = %room.room, from = %from, to = %to, ?action, "linkMic");
                self.metrics
                    .link_mic
                    .with_label_values(&[action.name()])
                    .inc();
                let reason = reason
                    .chars()
                    .take(weir_signaling::MAX_TEXT_BYTES / 4)
                    .collect();
                match self.rooms.session_of(&room, &to) {
                    Some(target) => self.tell(
                        target,
                        ServerMessage::LinkMic {
                            action,
                            user_id: from,
                            reason,
                        },
                    ),
                    None if action == weir_signaling::LinkMicAction::Request => self.tell(
                        session,
                        refused(
                            ErrorCode::NotFound,
                            format!("the presenter {to:?} is not in the room"),
                            "linkMic",
                        ),
                    ),
                    None => {}
                }
                self.apply_effects();
            }
            Err(refusal) => self.tell(session, refused(refusal.code, refusal.message, "linkMic")),
        }
    }

    async fn flush(&mut self) {
        loop {
            self.flush_once().await;
            // Rooms carried here that a member left: released once the output that
            // told of it is out (their stand-ins' leaving is more output).
            let left: Vec<RoomKey> = std::mem::take(&mut self.edges_left).into_iter().collect();
            if left.is_empty() {
                break;
            }
            for room in left {
                self.release_edge(room);
            }
        }
        self.ended_edges.clear();
    }

    async fn flush_once(&mut self) {
        while let Some(out) = self.rooms.poll_output() {
            match out {
                Output::Send(session, msg) => self.tell(session, msg),
                Output::Refused(session, e, request) => self.refuse(session, &e, request),
                Output::Close(session, reason) => {
                    if let Some(tx) = self.sessions.remove(&session) {
                        let _ = tx.try_send(SessionEvent::Close(reason));
                    }
                }
                Output::Media(cmd) => {
                    self.offer_to_players(&cmd);
                    self.send_to_media(MediaInput::Command(cmd)).await
                }
                Output::Event(event) => {
                    if let crate::room::RoomEvent::Exited { room, .. } = &event {
                        if self.edges.contains_key(room) {
                            self.edges_left.insert(room.clone());
                        }
                    }
                    if let (Some(cb), false) = (&self.callbacks, self.carried_here(&event)) {
                        super::hooks::room_event(cb, &event, now_ms());
                    }
                }
            }
        }
    }

    /// Whether a room event is one the backend hears from the room's own node: a room
    /// carried here is made and dismissed there, and its stand-ins are members there.
    /// (The members who joined here enter and leave here.)
    fn carried_here(&self, event: &crate::room::RoomEvent) -> bool {
        use crate::room::RoomEvent;
        let (room, user) = match event {
            RoomEvent::Created { room } | RoomEvent::Dismissed { room } => (room, None),
            RoomEvent::Entered { room, user_id } | RoomEvent::Exited { room, user_id, .. } => {
                (room, Some(user_id))
            }
        };
        let standin = |u: &String| {
            self.edges
                .get(room)
                .is_some_and(|e| e.standins.contains_key(u))
                || self.ended_edges.get(room).is_some_and(|s| s.contains(u))
        };
        let carried = self.edges.contains_key(room) || self.ended_edges.contains_key(room);
        carried && user.is_none_or(standin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::tests::{ticket, APP};
    use crate::room::{Limits, UrlBase};

    /// Issue 16's join storm and leave burst: a room of the largest size joining at
    /// once, then leaving at once, before a member's session has written out a message
    /// (its task busy or not yet run). Each member is sent one `memberJoined` per
    /// member after it and one `memberLeft` per member leaving; with a queue of 256 the
    /// first ones overflowed and were closed as too slow (the load bench: a storm of
    /// 480 had 375 closed once, the publisher among them, and nobody received media;
    /// each run's end closed 225 of 480 as slow while the rest left).
    #[tokio::test]
    async fn a_room_joining_then_leaving_at_once_closes_no_member_whose_session_reads_later() {
        const MEMBERS: usize = 500;
        let limits = Limits {
            max_rooms: 10,
            max_members_per_room: MEMBERS,
            max_publishers_per_room: 50,
            max_publishers: 100,
            max_subscriptions_per_member: 100,
            max_subscriptions: 100_000,
            congestion_policy: Default::default(),
        };
        let urls = UrlBase {
            rtmp: "rtmp://h:1935/live".into(),
            flv: "http://h:8080/live".into(),
            webrtc: "webrtc://h:8080/live".into(),
        };
        let metrics = Arc::new(Metrics::new());
        let control = Control::new(Rooms::new(limits, urls), None, metrics.clone(), None);
        let (commands, rx) = mpsc::channel(64);
        let task = tokio::spawn(control.run(rx));
        let mut inboxes = Vec::new();
        for i in 0..MEMBERS {
            let session = SessionId(i as u64 + 1);
            let (tx, inbox) = mpsc::channel(session_queue(MEMBERS));
            commands
                .send(ControlCommand::Open { session, tx })
                .await
                .unwrap();
            commands
                .send(ControlCommand::Join {
                    session,
                    sdk_app_id: APP,
                    ticket: Box::new(ticket(&format!("m{i}"), 7, 0xff)),
                    auto_subscribe: true,
                    congestion_policy: None,
                    push: false,
                    edge_of: None,
                })
                .await
                .unwrap();
            inboxes.push(inbox);
        }
        // And the class ends: everyone but the first leaves at once (their sessions
        // gone, as when the clients close), the first still reading nothing.
        for (i, inbox) in inboxes.iter_mut().enumerate().skip(1) {
            inbox.close();
            commands
                .send(ControlCommand::Closed {
                    session: SessionId(i as u64 + 1),
                    reason: LeaveReason::Left,
                })
                .await
                .unwrap();
        }
        drop(commands);
        task.await.unwrap();
        assert_eq!(metrics.slow_sessions.get(), 0);
        for (i, inbox) in inboxes.iter_mut().enumerate() {
            let (mut joined, mut came, mut went) = (false, 0, 0);
            while let Ok(event) = inbox.try_recv() {
                match event {
                    SessionEvent::Send(ServerMessage::Joined { members, .. }) => {
                        assert_eq!(members.len(), i, "member {i}: the ones before it");
                        joined = true;
                    }
                    SessionEvent::Send(ServerMessage::MemberJoined { .. }) => came += 1,
                    SessionEvent::Send(ServerMessage::MemberLeft { .. }) => went += 1,
                    SessionEvent::Send(other) => panic!("member {i} was sent {other:?}"),
                    SessionEvent::Close(reason) => panic!("member {i} was closed: {reason:?}"),
                }
            }
            assert!(joined, "member {i}");
            // The others' sessions closed while the control task may still have been
            // telling them of later joins: only the first hears everything.
            if i == 0 {
                assert_eq!((came, went), (MEMBERS - 1, MEMBERS - 1));
            }
        }
    }
}
