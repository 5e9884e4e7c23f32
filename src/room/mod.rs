//! Rooms: who is where, what they publish, who receives what, and who may.
//!
//! A sans-I/O state machine. Callers hand it commands from sessions whose credentials
//! were already verified (a [`RoomTicket`] per session) and drain its [`Output`]:
//! messages for sessions, sessions to close, and [`MediaCommand`]s for the media plane.
//! No socket, task or clock lives here, so every rule is a plain unit test.
//!
//! Rules (issue 3, from the privateMapKey bits): entering needs 0x02, creating a room
//! that does not exist needs 0x01, publishing audio/video needs 0x04/0x10, receiving
//! audio/video needs 0x08/0x20. A refused action is an error for that request only.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use weir_signaling::{
    CongestionPolicy, ErrorCode, Kind, LeaveReason, MemberInfo, PlayUrls, ServerMessage, StreamInfo,
};

use crate::auth::{AuthError, Privileges, RoomId, RoomTicket};

pub mod names;

/// One websocket (or RTMP) session, unique for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl SessionId {
    /// Marks the identity a session's screen share publishes under: the media plane
    /// sees the screen connection as a publisher of its own (a separate connection,
    /// stream and congestion priority), and the control plane routes its signaling
    /// to and from the owning session.
    const SCREEN: u64 = 1 << 62;

    /// The identity of this session's screen-share connection.
    pub fn screen(self) -> SessionId {
        SessionId(self.0 | Self::SCREEN)
    }

    /// The session whose screen share this is, when it is one.
    pub fn screen_owner(self) -> Option<SessionId> {
        (self.0 & Self::SCREEN != 0).then_some(SessionId(self.0 & !Self::SCREEN))
    }
}

/// A room is scoped to its app: room 1234 of two apps are two rooms.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoomKey {
    pub sdk_app_id: u64,
    pub room: RoomId,
}

impl RoomKey {
    /// The room as clients name it: digits for a `roomID`, the string for a `strRoomID`.
    pub fn name(&self) -> String {
        self.room.name()
    }
}

/// What a refused command tells its session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    #[error("{0}")]
    Privilege(AuthError),
    #[error("not in a room: send `join` first")]
    NotJoined,
    #[error("already in a room: one session joins one room")]
    AlreadyJoined,
    #[error("stream {0:?} does not exist in this room")]
    NoSuchStream(String),
    #[error("nothing to publish: ask for audio, video or both")]
    EmptyPublish,
    #[error("already publishing: unpublish first")]
    AlreadyPublishing,
    #[error("not publishing")]
    NotPublishing,
    #[error("a screen share carries video only (its sound goes with the camera's stream)")]
    ScreenVideoOnly,
    #[error("a screen share is published from a signaling session, not a push")]
    ScreenFromPush,
    #[error("this node is overloaded: try again later or another node")]
    Overloaded,
    #[error("this node has {0} rooms, its limit")]
    TooManyRooms(usize),
    #[error("room {room} has {limit} members, its limit")]
    RoomFull { room: String, limit: usize },
    #[error("room {room} has {limit} publishers, its limit")]
    TooManyPublishersInRoom { room: String, limit: usize },
    #[error("this node carries {0} published streams, its limit")]
    TooManyPublishers(usize),
    #[error("text message is {len} bytes, more than {limit}")]
    TextTooLong { len: usize, limit: usize },
    #[error("stream name {0:?} is already live on this node")]
    StreamNameTaken(String),
    #[error("this member receives {0} streams, its limit")]
    TooManySubscriptionsForMember(usize),
    #[error("this node forwards {0} subscriptions, its limit")]
    TooManySubscriptions(usize),
}

impl RoomError {
    pub fn code(&self) -> ErrorCode {
        match self {
            RoomError::Privilege(_) => ErrorCode::MissingPrivilege,
            RoomError::NotJoined | RoomError::AlreadyJoined => ErrorCode::NotJoined,
            RoomError::NoSuchStream(_) => ErrorCode::NotFound,
            RoomError::StreamNameTaken(_) => ErrorCode::Conflict,
            RoomError::Overloaded => ErrorCode::Unavailable,
            RoomError::EmptyPublish
            | RoomError::AlreadyPublishing
            | RoomError::NotPublishing
            | RoomError::ScreenVideoOnly
            | RoomError::ScreenFromPush => ErrorCode::BadRequest,
            RoomError::TooManyRooms(_)
            | RoomError::RoomFull { .. }
            | RoomError::TooManyPublishersInRoom { .. }
            | RoomError::TooManyPublishers(_)
            | RoomError::TooManySubscriptionsForMember(_)
            | RoomError::TooManySubscriptions(_)
            | RoomError::TextTooLong { .. } => ErrorCode::LimitExceeded,
        }
    }

    /// The limit a refusal hit, for `weir_limit_refusals_total{limit}` (None: not a limit).
    pub fn limit(&self) -> Option<&'static str> {
        Some(match self {
            RoomError::TooManyRooms(_) => "rooms",
            RoomError::RoomFull { .. } => "members_per_room",
            RoomError::TooManyPublishersInRoom { .. } => "publishers_per_room",
            RoomError::TooManyPublishers(_) => "publishers",
            RoomError::TooManySubscriptionsForMember(_) => "subscriptions_per_member",
            RoomError::TooManySubscriptions(_) => "subscriptions",
            RoomError::TextTooLong { .. } => "text_bytes",
            RoomError::Overloaded => "overload",
            _ => return None,
        })
    }
}

/// Instructions for the media plane. The room decides; the media plane moves packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediaCommand {
    /// Forward `stream`'s tracks of these kinds to `subscriber`.
    Subscribe {
        subscriber: SessionId,
        stream_id: String,
        kinds: Vec<Kind>,
    },
    /// Stop forwarding `stream` to `subscriber`.
    Unsubscribe {
        subscriber: SessionId,
        stream_id: String,
    },
    /// `session` may now send these kinds on its publisher connection as `stream_id`.
    AllowPublish {
        session: SessionId,
        stream_id: String,
        kinds: Vec<Kind>,
        /// The stream's room, and `webrtc` or `rtmp`.
        room: RoomKey,
        source: &'static str,
        /// A screen share: served before cameras when a link is short.
        screen: bool,
        /// How the room weighs its subscribers, and the publisher's video bitrate
        /// bounds (bit/s), for the congestion decisions about this stream.
        policy: CongestionPolicy,
        min_bitrate: Option<u32>,
        max_bitrate: Option<u32>,
    },
    /// The stream ended: tear down its tracks and every subscription to it.
    EndStream { stream_id: String },
    /// The session is gone: close its peer connections.
    CloseSession { session: SessionId },
}

/// What the room core asks the shell to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Send(SessionId, ServerMessage),
    /// Something the session did not ask for explicitly was refused (a subscription
    /// its `autoSubscribe` would have made, over a limit): tell it, and count it.
    Refused(SessionId, RoomError, &'static str),
    /// Tell the session why and close it (replaced, shutdown).
    Close(SessionId, LeaveReason),
    Media(MediaCommand),
    /// For the backend's callbacks: rooms made and gone, members in and out.
    Event(RoomEvent),
}

/// A room's life as the backend hears of it (TRTC's room events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoomEvent {
    Created {
        room: RoomKey,
    },
    Dismissed {
        room: RoomKey,
    },
    Entered {
        room: RoomKey,
        user_id: String,
    },
    Exited {
        room: RoomKey,
        user_id: String,
        reason: LeaveReason,
    },
}

/// Node-wide bounds.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_rooms: usize,
    pub max_members_per_room: usize,
    /// Streams published at once in one room, and on the node.
    pub max_publishers_per_room: usize,
    pub max_publishers: usize,
    /// Streams one member receives, and subscriptions on the node.
    pub max_subscriptions_per_member: usize,
    pub max_subscriptions: usize,
    /// The congestion policy of rooms whose creator did not choose one.
    pub congestion_policy: CongestionPolicy,
}

/// One room as operators see it.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomSummary {
    #[serde(rename = "sdkAppID")]
    pub sdk_app_id: u64,
    pub room: String,
    /// `roomID` (digits) rather than `strRoomID`.
    pub numeric: bool,
    pub members: Vec<String>,
    pub streams: Vec<String>,
    /// A room this node carries for the cluster node that serves it (its audience
    /// here, the streams relayed from there): that node's id. Set by the control task.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edge_of: Option<String>,
}

/// How play URLs are spelled for this node.
#[derive(Debug, Clone)]
pub struct UrlBase {
    /// e.g. `rtmp://203.0.113.7:1935/live`
    pub rtmp: String,
    /// e.g. `http://203.0.113.7:8080/live`
    pub flv: String,
    /// e.g. `webrtc://203.0.113.7:8080/live`
    pub webrtc: String,
}

impl UrlBase {
    fn urls(&self, stream_id: &str) -> PlayUrls {
        PlayUrls {
            rtmp: format!("{}/{stream_id}", self.rtmp),
            flv: format!("{}/{stream_id}.flv", self.flv),
            webrtc: format!("{}/{stream_id}", self.webrtc),
        }
    }
}

#[derive(Debug, Clone)]
struct Stream {
    id: String,
    /// The session that published it (a member's signaling session or its push).
    publisher: SessionId,
    source: &'static str,
    /// A screen share (the member's second stream), not its camera.
    screen: bool,
    audio: bool,
    video: bool,
    audio_muted: bool,
    video_muted: bool,
}

/// A member is one user in one room. It may have two sessions at once: a signaling
/// session (events, text, WebRTC) and an RTMP push that carries its stream (a mini
/// program pushes with `<live-pusher>` and hears the room on `wx.connectSocket`). Each
/// kind replaces only its own kind (a reconnect); room messages go to `session`.
#[derive(Debug)]
struct Member {
    /// Who hears the room: the signaling session, or the push when it is alone.
    session: SessionId,
    /// The member's RTMP push, when there is one (then `session` is either the push
    /// itself or a signaling session beside it).
    push: Option<SessionId>,
    /// What the push's credentials allow (it publishes with them).
    push_privileges: Privileges,
    privileges: Privileges,
    auto_subscribe: bool,
    /// The camera and microphone (or the push), and the screen share.
    stream: Option<Stream>,
    screen: Option<Stream>,
    /// Streams this member receives.
    subscriptions: HashSet<String>,
    /// Another node of the cluster relaying the room to its own members (privilege
    /// 0x100): it hears the room but is never listed, announced or counted as a member.
    hidden: bool,
}

impl Member {
    fn streams(&self) -> impl Iterator<Item = &Stream> {
        self.stream.iter().chain(self.screen.iter())
    }
}

#[derive(Debug, Default)]
struct Room {
    /// By userID; ordered so member lists are stable.
    members: BTreeMap<String, Member>,
    /// Chosen by the join that created the room, else the node's default.
    policy: Option<CongestionPolicy>,
}

#[derive(Debug, Clone)]
struct SessionEntry {
    room: RoomKey,
    user_id: String,
}

/// All rooms of this node.
pub struct Rooms {
    limits: Limits,
    urls: UrlBase,
    rooms: HashMap<RoomKey, Room>,
    sessions: HashMap<SessionId, SessionEntry>,
    /// Every live stream by id: stream ids are unique on the node (they are URL paths).
    streams: HashMap<String, (RoomKey, String)>,
    /// Subscriptions on the node (the sum of every member's `subscriptions`).
    subscription_count: usize,
    out: VecDeque<Output>,
}

/// What receiving a kind of a stream takes: a screen share's video is the sub-stream.
fn receive_privileges(kind: Kind, screen: bool) -> Privileges {
    match kind {
        Kind::Audio => Privileges::RECV_AUDIO,
        Kind::Video if screen => Privileges::RECV_SUB_VIDEO,
        Kind::Video => Privileges::RECV_VIDEO,
    }
}

/// A stream name safe in URL paths: TRTC's `{sdkappid}_{room}_{userid}_main` shape,
/// with anything but `[A-Za-z0-9_.-]` replaced by `-`.
pub fn stream_id_for(room: &RoomKey, user_id: &str) -> String {
    stream_name(room, user_id, "main")
}

/// A member's screen share: TRTC's sub-stream name, `…_aux`.
pub fn screen_stream_id_for(room: &RoomKey, user_id: &str) -> String {
    stream_name(room, user_id, "aux")
}

fn stream_name(room: &RoomKey, user_id: &str, suffix: &str) -> String {
    let raw = format!("{}_{}_{}_{suffix}", room.sdk_app_id, room.name(), user_id);
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

impl Rooms {
    pub fn new(limits: Limits, urls: UrlBase) -> Self {
        Self {
            limits,
            urls,
            rooms: HashMap::new(),
            sessions: HashMap::new(),
            streams: HashMap::new(),
            subscription_count: 0,
            out: VecDeque::new(),
        }
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Every room of this node, for operators and the development page.
    pub fn summaries(&self) -> Vec<RoomSummary> {
        let mut out: Vec<RoomSummary> = self
            .rooms
            .iter()
            .map(|(k, r)| RoomSummary {
                sdk_app_id: k.sdk_app_id,
                room: k.name(),
                numeric: matches!(k.room, RoomId::Num(_)),
                members: r
                    .members
                    .iter()
                    .filter(|(_, m)| !m.hidden)
                    .map(|(u, _)| u.clone())
                    .collect(),
                edge_of: None,
                streams: r
                    .members
                    .values()
                    .flat_map(|m| m.streams().map(|s| s.id.clone()))
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| (a.sdk_app_id, &a.room).cmp(&(b.sdk_app_id, &b.room)));
        out
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    pub fn is_joined(&self, session: SessionId) -> bool {
        self.sessions.contains_key(&session)
    }

    pub fn participant_count(&self) -> usize {
        self.sessions.len()
    }

    fn send(&mut self, to: SessionId, msg: ServerMessage) {
        self.out.push_back(Output::Send(to, msg));
    }

    fn info(&self, user_id: &str, s: &Stream) -> StreamInfo {
        StreamInfo {
            stream_id: s.id.clone(),
            user_id: user_id.to_owned(),
            source: s.source.to_owned(),
            audio: s.audio,
            video: s.video,
            screen: s.screen,
            audio_muted: s.audio_muted,
            video_muted: s.video_muted,
            urls: self.urls.urls(&s.id),
        }
    }

    /// Admits a verified signaling session to the ticket's room.
    pub fn join(
        &mut self,
        session: SessionId,
        sdk_app_id: u64,
        ticket: &RoomTicket,
        auto_subscribe: bool,
    ) -> Result<(), RoomError> {
        self.join_as(session, sdk_app_id, ticket, auto_subscribe, false)
    }

    /// Admits an RTMP push (authorized for the ticket's user) to the room: beside the
    /// user's signaling session when it is there, as a member of its own otherwise.
    pub fn join_push(
        &mut self,
        session: SessionId,
        sdk_app_id: u64,
        ticket: &RoomTicket,
    ) -> Result<(), RoomError> {
        self.join_as(session, sdk_app_id, ticket, false, true)
    }

    fn join_as(
        &mut self,
        session: SessionId,
        sdk_app_id: u64,
        ticket: &RoomTicket,
        auto_subscribe: bool,
        is_push: bool,
    ) -> Result<(), RoomError> {
        if self.sessions.contains_key(&session) {
            return Err(RoomError::AlreadyJoined);
        }
        ticket
            .require(Privileges::ENTER_ROOM)
            .map_err(RoomError::Privilege)?;
        let key = RoomKey {
            sdk_app_id,
            room: ticket.room.clone(),
        };
        let user_id = ticket.identity.user_id.clone();
        let exists = self.rooms.contains_key(&key);
        if !exists {
            ticket
                .require(Privileges::CREATE_ROOM)
                .map_err(RoomError::Privilege)?;
            if self.rooms.len() >= self.limits.max_rooms {
                return Err(RoomError::TooManyRooms(self.limits.max_rooms));
            }
        }
        // The same kind of session of the same user again replaces the old one (a
        // reconnect); a push and a signaling session of one user live side by side.
        let replaced = self
            .rooms
            .get(&key)
            .and_then(|r| r.members.get(&user_id))
            .and_then(|m| {
                if is_push {
                    m.push
                } else if m.push == Some(m.session) {
                    None
                } else {
                    Some(m.session)
                }
            });
        if let Some(old) = replaced {
            self.remove(old, LeaveReason::Replaced, false);
            self.out
                .push_back(Output::Close(old, LeaveReason::Replaced));
        }
        let present = self
            .rooms
            .get(&key)
            .is_some_and(|r| r.members.contains_key(&user_id));
        let hidden = !is_push && ticket.privileges.contains(Privileges::RELAY);
        if !present && !hidden {
            if let Some(room) = self.rooms.get(&key) {
                if room.members.values().filter(|m| !m.hidden).count()
                    >= self.limits.max_members_per_room
                {
                    return Err(RoomError::RoomFull {
                        room: key.name(),
                        limit: self.limits.max_members_per_room,
                    });
                }
            }
        }
        if !exists {
            self.out
                .push_back(Output::Event(RoomEvent::Created { room: key.clone() }));
        }
        let room = self.rooms.entry(key.clone()).or_default();
        let others: Vec<(String, SessionId, Vec<Stream>)> = room
            .members
            .iter()
            .filter(|(u, m)| **u != user_id && !m.hidden)
            .map(|(u, m)| (u.clone(), m.session, m.streams().cloned().collect()))
            .collect();
        match room.members.get_mut(&user_id) {
            // Beside the member's other session: the room already knows the member.
            Some(m) if is_push => {
                m.push = Some(session);
                m.push_privileges = ticket.privileges;
            }
            Some(m) => {
                m.session = session;
                m.privileges = ticket.privileges;
                m.auto_subscribe = auto_subscribe;
            }
            None => {
                if !hidden {
                    self.out.push_back(Output::Event(RoomEvent::Entered {
                        room: key.clone(),
                        user_id: user_id.clone(),
                    }));
                }
                room.members.insert(
                    user_id.clone(),
                    Member {
                        session,
                        push: is_push.then_some(session),
                        push_privileges: if is_push {
                            ticket.privileges
                        } else {
                            Privileges(0)
                        },
                        privileges: ticket.privileges,
                        auto_subscribe,
                        stream: None,
                        screen: None,
                        subscriptions: HashSet::new(),
                        hidden,
                    },
                );
                for (_, other, _) in others.iter().filter(|_| !hidden) {
                    self.out.push_back(Output::Send(
                        *other,
                        ServerMessage::MemberJoined {
                            user_id: user_id.clone(),
                        },
                    ));
                }
            }
        }
        self.sessions.insert(
            session,
            SessionEntry {
                room: key.clone(),
                user_id: user_id.clone(),
            },
        );
        let members = others
            .iter()
            .map(|(u, _, s)| MemberInfo {
                user_id: u.clone(),
                streams: s.iter().map(|s| self.info(u, s)).collect(),
            })
            .collect();
        self.send(
            session,
            ServerMessage::Joined {
                protocol: weir_signaling::PROTOCOL_VERSION,
                user_id: user_id.clone(),
                room: key.name(),
                privileges: ticket.privileges.0,
                members,
                ice_servers: Vec::new(),
            },
        );
        if auto_subscribe && !is_push {
            for (publisher, _, streams) in others {
                for s in streams {
                    self.auto_subscribe(session, &key, &user_id, &publisher, &s);
                }
            }
        }
        Ok(())
    }

    /// Starts forwarding `stream` (published by `publisher`) to `subscriber`, limited to
    /// the kinds the subscriber may receive. Quietly does nothing when it may receive
    /// none; refuses past the member's or the node's subscription limit.
    fn subscribe_one(
        &mut self,
        subscriber: SessionId,
        key: &RoomKey,
        subscriber_user: &str,
        publisher: &str,
        stream: &Stream,
    ) -> Result<(), RoomError> {
        let (per_member, on_node) = (
            self.limits.max_subscriptions_per_member,
            self.limits.max_subscriptions,
        );
        let total = self.subscription_count;
        let Some(member) = self
            .rooms
            .get_mut(key)
            .and_then(|r| r.members.get_mut(subscriber_user))
        else {
            return Ok(());
        };
        if publisher == subscriber_user || member.subscriptions.contains(&stream.id) {
            return Ok(());
        }
        let kinds: Vec<Kind> = [(stream.audio, Kind::Audio), (stream.video, Kind::Video)]
            .into_iter()
            .filter(|&(has, kind)| {
                has && member
                    .privileges
                    .contains(receive_privileges(kind, stream.screen))
            })
            .map(|(_, kind)| kind)
            .collect();
        if kinds.is_empty() {
            return Ok(());
        }
        if member.subscriptions.len() >= per_member {
            return Err(RoomError::TooManySubscriptionsForMember(per_member));
        }
        if total >= on_node {
            return Err(RoomError::TooManySubscriptions(on_node));
        }
        member.subscriptions.insert(stream.id.clone());
        self.subscription_count += 1;
        self.out.push_back(Output::Media(MediaCommand::Subscribe {
            subscriber,
            stream_id: stream.id.clone(),
            kinds,
        }));
        Ok(())
    }

    /// An automatic subscription (`autoSubscribe`): a refusal is told, not returned.
    fn auto_subscribe(
        &mut self,
        subscriber: SessionId,
        key: &RoomKey,
        subscriber_user: &str,
        publisher: &str,
        stream: &Stream,
    ) {
        if let Err(e) = self.subscribe_one(subscriber, key, subscriber_user, publisher, stream) {
            self.out
                .push_back(Output::Refused(subscriber, e, "subscribe"));
        }
    }

    /// Subscriptions dropped (unsubscribed, their stream ended, their member gone).
    fn released(&mut self, n: usize) {
        self.subscription_count = self.subscription_count.saturating_sub(n);
    }

    /// Subscriptions on the node.
    pub fn subscription_count(&self) -> usize {
        self.subscription_count
    }

    fn entry(&self, session: SessionId) -> Result<SessionEntry, RoomError> {
        self.sessions
            .get(&session)
            .cloned()
            .ok_or(RoomError::NotJoined)
    }

    fn member_mut(&mut self, e: &SessionEntry) -> &mut Member {
        self.rooms
            .get_mut(&e.room)
            .and_then(|r| r.members.get_mut(&e.user_id))
            .expect("a registered session has a member")
    }

    /// Declares the session's stream; the media plane then accepts those kinds.
    pub fn publish(
        &mut self,
        session: SessionId,
        audio: bool,
        video: bool,
    ) -> Result<StreamInfo, RoomError> {
        self.publish_as(session, None, "webrtc", audio, video)
    }

    /// A WebRTC publish with the publisher's video bitrate bounds (bit/s).
    pub fn publish_bounded(
        &mut self,
        session: SessionId,
        audio: bool,
        video: bool,
        bounds: (Option<u32>, Option<u32>),
    ) -> Result<StreamInfo, RoomError> {
        self.publish_full(session, None, "webrtc", (audio, video, false), bounds)
    }

    /// A stream of the room relayed from the node serving it (rooms that span nodes),
    /// published here by its stand-in member: `name` is the stream's id there (a
    /// screen share's is derived from the user, as there), `source` `relay`.
    pub fn publish_relayed(
        &mut self,
        session: SessionId,
        name: &str,
        (audio, video, screen): (bool, bool, bool),
    ) -> Result<StreamInfo, RoomError> {
        let name = (!screen).then(|| name.to_owned());
        self.publish_full(session, name, "relay", (audio, video, screen), (None, None))
    }

    /// Whether the node has the room.
    pub fn has_room(&self, key: &RoomKey) -> bool {
        self.rooms.contains_key(key)
    }

    /// Declares the session's screen share (video only, privilege 0x40): a second
    /// stream beside its camera, sent on its own connection (`SessionId::screen`).
    pub fn publish_screen(
        &mut self,
        session: SessionId,
        bounds: (Option<u32>, Option<u32>),
    ) -> Result<StreamInfo, RoomError> {
        self.publish_full(session, None, "webrtc", (false, true, true), bounds)
    }

    /// The room was just created by this session's join: it takes `policy`.
    pub fn configure_new_room(&mut self, session: SessionId, policy: CongestionPolicy) {
        let Some(e) = self.sessions.get(&session) else {
            return;
        };
        if let Some(room) = self.rooms.get_mut(&e.room) {
            if room.members.len() == 1 && room.policy.is_none() {
                room.policy = Some(policy);
            }
        }
    }

    /// Tells everyone in a stream's room what the room asks its publisher to send.
    pub fn publish_target(&mut self, stream_id: &str, bitrate: u64) {
        let Some((key, user_id)) = self.streams.get(stream_id).cloned() else {
            return;
        };
        let Some(room) = self.rooms.get(&key) else {
            return;
        };
        let policy = room.policy.unwrap_or(self.limits.congestion_policy);
        let everyone: Vec<SessionId> = room.members.values().map(|m| m.session).collect();
        for s in everyone {
            self.send(
                s,
                ServerMessage::PublishTarget {
                    stream_id: stream_id.to_owned(),
                    user_id: user_id.clone(),
                    bitrate,
                    policy,
                },
            );
        }
    }

    /// Publishes under a given stream name (an RTMP pusher names its stream in its
    /// URL), or the room's default name when `None`. Names are unique on the node.
    pub fn publish_as(
        &mut self,
        session: SessionId,
        name: Option<String>,
        source: &'static str,
        audio: bool,
        video: bool,
    ) -> Result<StreamInfo, RoomError> {
        self.publish_full(session, name, source, (audio, video, false), (None, None))
    }

    fn publish_full(
        &mut self,
        session: SessionId,
        name: Option<String>,
        source: &'static str,
        (audio, video, screen): (bool, bool, bool),
        (min_bitrate, max_bitrate): (Option<u32>, Option<u32>),
    ) -> Result<StreamInfo, RoomError> {
        let e = self.entry(session)?;
        if !audio && !video {
            return Err(RoomError::EmptyPublish);
        }
        let key = e.room.clone();
        let member = self.member_mut(&e);
        let is_push = member.push == Some(session);
        if screen && is_push {
            return Err(RoomError::ScreenFromPush);
        }
        if screen && (audio || !video) {
            return Err(RoomError::ScreenVideoOnly);
        }
        let slot = if screen {
            &member.screen
        } else {
            &member.stream
        };
        if slot.is_some() {
            return Err(RoomError::AlreadyPublishing);
        }
        let mut needed = Privileges(0);
        if audio {
            needed = needed | Privileges::SEND_AUDIO;
        }
        if video {
            needed = needed
                | if screen {
                    Privileges::SEND_SUB_VIDEO
                } else {
                    Privileges::SEND_VIDEO
                };
        }
        let allowed = if is_push {
            member.push_privileges
        } else {
            member.privileges
        };
        allowed.require(needed).map_err(RoomError::Privilege)?;
        let id = name.unwrap_or_else(|| {
            if screen {
                screen_stream_id_for(&key, &e.user_id)
            } else {
                stream_id_for(&key, &e.user_id)
            }
        });
        if self.streams.contains_key(&id) {
            return Err(RoomError::StreamNameTaken(id));
        }
        if self.streams.len() >= self.limits.max_publishers {
            return Err(RoomError::TooManyPublishers(self.limits.max_publishers));
        }
        let publishing: usize = self.rooms[&key]
            .members
            .values()
            .map(|m| m.streams().count())
            .sum();
        if publishing >= self.limits.max_publishers_per_room {
            return Err(RoomError::TooManyPublishersInRoom {
                room: key.name(),
                limit: self.limits.max_publishers_per_room,
            });
        }
        let member = self.member_mut(&e);
        let publisher = if screen { session.screen() } else { session };
        let stream = Stream {
            id,
            publisher,
            source,
            screen,
            audio,
            video,
            audio_muted: false,
            video_muted: false,
        };
        if screen {
            member.screen = Some(stream.clone());
        } else {
            member.stream = Some(stream.clone());
        }
        self.streams
            .insert(stream.id.clone(), (key.clone(), e.user_id.clone()));
        let info = self.info(&e.user_id, &stream);
        let kinds = [(audio, Kind::Audio), (video, Kind::Video)]
            .into_iter()
            .filter(|(on, _)| *on)
            .map(|(_, k)| k)
            .collect();
        self.out
            .push_back(Output::Media(MediaCommand::AllowPublish {
                session: publisher,
                stream_id: stream.id.clone(),
                kinds,
                room: key.clone(),
                source,
                screen,
                policy: self
                    .rooms
                    .get(&key)
                    .and_then(|r| r.policy)
                    .unwrap_or(self.limits.congestion_policy),
                min_bitrate,
                max_bitrate,
            }));
        self.send(
            session,
            ServerMessage::Published {
                stream: info.clone(),
            },
        );
        let others: Vec<(String, SessionId, bool)> = self.rooms[&key]
            .members
            .iter()
            .filter(|(u, _)| **u != e.user_id)
            .map(|(u, m)| (u.clone(), m.session, m.auto_subscribe))
            .collect();
        for (user, other, auto) in others {
            self.send(
                other,
                ServerMessage::StreamAdded {
                    stream: info.clone(),
                },
            );
            if auto {
                self.auto_subscribe(other, &key, &user, &e.user_id, &stream);
            }
        }
        Ok(info)
    }

    /// Ends the session's camera stream, or its screen share.
    pub fn unpublish(&mut self, session: SessionId, screen: bool) -> Result<(), RoomError> {
        let e = self.entry(session)?;
        let member = self.member_mut(&e);
        let slot = if screen {
            &mut member.screen
        } else {
            &mut member.stream
        };
        let publisher = if screen { session.screen() } else { session };
        if slot.as_ref().map(|s| s.publisher) != Some(publisher) {
            return Err(RoomError::NotPublishing);
        }
        let stream = slot.take().ok_or(RoomError::NotPublishing)?;
        self.end_stream(&e.room, &e.user_id, &stream.id);
        Ok(())
    }

    /// The screen-share connection of `owner` is gone: its stream ends, and the owner
    /// hears it as the others do (`streamRemoved`), so it can share again.
    pub fn screen_lost(&mut self, owner: SessionId) {
        let Some(e) = self.sessions.get(&owner).cloned() else {
            return;
        };
        let Some(stream) = self.member_mut(&e).screen.take() else {
            return;
        };
        self.end_stream(&e.room, &e.user_id, &stream.id);
        self.send(
            owner,
            ServerMessage::StreamRemoved {
                stream_id: stream.id,
                user_id: e.user_id,
            },
        );
    }

    fn end_stream(&mut self, key: &RoomKey, user_id: &str, stream_id: &str) {
        self.streams.remove(stream_id);
        self.out.push_back(Output::Media(MediaCommand::EndStream {
            stream_id: stream_id.to_owned(),
        }));
        let mut dropped = 0;
        let others: Vec<SessionId> = match self.rooms.get_mut(key) {
            Some(room) => room
                .members
                .iter_mut()
                .filter(|(u, _)| u.as_str() != user_id)
                .map(|(_, m)| {
                    dropped += usize::from(m.subscriptions.remove(stream_id));
                    m.session
                })
                .collect(),
            None => Vec::new(),
        };
        self.released(dropped);
        for other in others {
            self.send(
                other,
                ServerMessage::StreamRemoved {
                    stream_id: stream_id.to_owned(),
                    user_id: user_id.to_owned(),
                },
            );
        }
    }

    pub fn subscribe(
        &mut self,
        session: SessionId,
        stream_ids: &[String],
    ) -> Result<(), RoomError> {
        let e = self.entry(session)?;
        for id in stream_ids {
            let publisher = match self.streams.get(id) {
                Some((room, user)) if *room == e.room => user.clone(),
                _ => return Err(RoomError::NoSuchStream(id.clone())),
            };
            let stream = self.rooms[&e.room].members[&publisher]
                .streams()
                .find(|s| s.id == *id)
                .cloned()
                .expect("a registered stream has a publisher");
            let member = self.member_mut(&e);
            let wants: Vec<Kind> = [(stream.audio, Kind::Audio), (stream.video, Kind::Video)]
                .into_iter()
                .filter(|(on, _)| *on)
                .map(|(_, k)| k)
                .collect();
            // Asking explicitly for a kind one may not receive is an error, naming the bit.
            for kind in wants {
                member
                    .privileges
                    .require(receive_privileges(kind, stream.screen))
                    .map_err(RoomError::Privilege)?;
            }
            self.subscribe_one(session, &e.room, &e.user_id, &publisher, &stream)?;
        }
        Ok(())
    }

    pub fn unsubscribe(
        &mut self,
        session: SessionId,
        stream_ids: &[String],
    ) -> Result<(), RoomError> {
        let e = self.entry(session)?;
        for id in stream_ids {
            if self.member_mut(&e).subscriptions.remove(id) {
                self.released(1);
                self.out.push_back(Output::Media(MediaCommand::Unsubscribe {
                    subscriber: session,
                    stream_id: id.clone(),
                }));
            }
        }
        Ok(())
    }

    pub fn mute(&mut self, session: SessionId, kind: Kind, muted: bool) -> Result<(), RoomError> {
        let e = self.entry(session)?;
        let member = self.member_mut(&e);
        let stream = member.stream.as_mut().ok_or(RoomError::NotPublishing)?;
        match kind {
            Kind::Audio => stream.audio_muted = muted,
            Kind::Video => stream.video_muted = muted,
        }
        let id = stream.id.clone();
        let everyone: Vec<SessionId> = self.rooms[&e.room]
            .members
            .values()
            .map(|m| m.session)
            .collect();
        for s in everyone {
            self.send(
                s,
                ServerMessage::StreamMuted {
                    stream_id: id.clone(),
                    kind,
                    muted,
                },
            );
        }
        Ok(())
    }

    /// A room text message (what the room components call sendTextMsg), to everyone else.
    pub fn text(&mut self, session: SessionId, text: &str, now_ms: u64) -> Result<(), RoomError> {
        let e = self.entry(session)?;
        if text.len() > weir_signaling::MAX_TEXT_BYTES {
            return Err(RoomError::TextTooLong {
                len: text.len(),
                limit: weir_signaling::MAX_TEXT_BYTES,
            });
        }
        let others: Vec<SessionId> = self.rooms[&e.room]
            .members
            .iter()
            .filter(|(u, _)| **u != e.user_id)
            .map(|(_, m)| m.session)
            .collect();
        for s in others {
            self.send(
                s,
                ServerMessage::TextMessage {
                    user_id: e.user_id.clone(),
                    text: text.to_owned(),
                    ts: now_ms,
                },
            );
        }
        Ok(())
    }

    /// The session left (or its socket closed, or it timed out). Idempotent.
    pub fn leave(&mut self, session: SessionId, reason: LeaveReason) {
        self.remove(session, reason, true);
    }

    fn remove(&mut self, session: SessionId, reason: LeaveReason, tell_self: bool) {
        let Some(e) = self.sessions.get(&session).cloned() else {
            return;
        };
        // One of a member's two sessions: the member stays, with the other.
        let other = self
            .rooms
            .get(&e.room)
            .and_then(|r| r.members.get(&e.user_id))
            .and_then(|m| {
                if m.session != session {
                    Some(m.session)
                } else {
                    m.push.filter(|p| *p != session)
                }
            });
        if let Some(other) = other {
            self.sessions.remove(&session);
            let m = self.member_mut(&e);
            let mut ended: Vec<String> = Vec::new();
            if m.stream.as_ref().is_some_and(|s| s.publisher == session) {
                ended.extend(m.stream.take().map(|s| s.id));
            }
            if m.screen
                .as_ref()
                .is_some_and(|s| s.publisher == session.screen())
            {
                ended.extend(m.screen.take().map(|s| s.id));
            }
            if m.push == Some(session) {
                m.push = None;
            } else {
                // The signaling session went: its subscriptions go with its peer
                // connections, and the push hears the room again.
                m.session = other;
                let dropped = std::mem::take(&mut m.subscriptions).len();
                self.subscription_count = self.subscription_count.saturating_sub(dropped);
                let m = self.member_mut(&e);
                m.auto_subscribe = false;
                m.privileges = m.push_privileges;
            }
            for id in ended {
                self.end_stream(&e.room, &e.user_id, &id);
            }
            self.out
                .push_back(Output::Media(MediaCommand::CloseSession { session }));
            if tell_self && reason == LeaveReason::Left {
                self.send(session, ServerMessage::Left { reason });
            }
            return;
        }
        self.sessions.remove(&session);
        let member = self
            .rooms
            .get_mut(&e.room)
            .and_then(|r| r.members.remove(&e.user_id));
        let hidden = member.as_ref().is_some_and(|m| m.hidden);
        if member.is_some() && !hidden {
            self.out.push_back(Output::Event(RoomEvent::Exited {
                room: e.room.clone(),
                user_id: e.user_id.clone(),
                reason,
            }));
        }
        self.released(member.as_ref().map_or(0, |m| m.subscriptions.len()));
        if let Some(m) = member {
            for stream in m.stream.into_iter().chain(m.screen) {
                self.end_stream(&e.room, &e.user_id, &stream.id);
            }
        }
        self.out
            .push_back(Output::Media(MediaCommand::CloseSession { session }));
        if tell_self && reason == LeaveReason::Left {
            self.send(session, ServerMessage::Left { reason });
        }
        let remaining: Vec<SessionId> = self.rooms[&e.room]
            .members
            .values()
            .map(|m| m.session)
            .collect();
        for s in remaining.iter().filter(|_| !hidden) {
            self.send(
                *s,
                ServerMessage::MemberLeft {
                    user_id: e.user_id.clone(),
                    reason,
                },
            );
        }
        if remaining.is_empty() {
            self.rooms.remove(&e.room);
            self.out
                .push_back(Output::Event(RoomEvent::Dismissed { room: e.room }));
        }
    }

    /// The room and user of a session.
    pub fn place_of(&self, session: SessionId) -> Option<(RoomKey, String)> {
        self.sessions
            .get(&session)
            .map(|e| (e.room.clone(), e.user_id.clone()))
    }

    /// The session that hears the room for a member (its signaling session, or its
    /// push when that is alone).
    pub fn session_of(&self, key: &RoomKey, user_id: &str) -> Option<SessionId> {
        self.rooms
            .get(key)
            .and_then(|r| r.members.get(user_id))
            .map(|m| m.session)
    }

    /// The members of a room and the stream each publishes (the room service reads
    /// them to list browsers and mini programs alike).
    pub fn members_of(&self, key: &RoomKey) -> Vec<(String, Option<String>)> {
        self.rooms
            .get(key)
            .map(|r| {
                r.members
                    .iter()
                    .filter(|(_, m)| !m.hidden)
                    .map(|(u, m)| (u.clone(), m.stream.as_ref().map(|s| s.id.clone())))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Removes a member (the room service's decision): the room is told, and the
    /// member's sessions told why and closed. Returns whether there was one.
    pub fn kick(&mut self, key: &RoomKey, user_id: &str, reason: LeaveReason) -> bool {
        let Some((session, push)) = self
            .rooms
            .get(key)
            .and_then(|r| r.members.get(user_id))
            .map(|m| (m.session, m.push))
        else {
            return false;
        };
        if let Some(p) = push.filter(|p| *p != session) {
            self.remove(p, reason, false);
            self.out.push_back(Output::Close(p, reason));
        }
        self.remove(session, reason, false);
        self.out.push_back(Output::Close(session, reason));
        true
    }

    /// Takes a member's RTMP push off the room (the presenter or the member ended it),
    /// leaving its signaling session in the room: others see its stream go. A member
    /// with no signaling session beside its push leaves. Returns whether it had a push.
    pub fn end_push(&mut self, key: &RoomKey, user_id: &str, reason: LeaveReason) -> bool {
        let Some(push) = self
            .rooms
            .get(key)
            .and_then(|r| r.members.get(user_id))
            .and_then(|m| m.push)
        else {
            return false;
        };
        self.remove(push, reason, false);
        self.out.push_back(Output::Close(push, reason));
        true
    }

    /// Ends every session (graceful shutdown).
    pub fn close_all(&mut self, reason: LeaveReason) {
        let all: Vec<SessionId> = self.sessions.keys().copied().collect();
        for s in all {
            self.remove(s, reason, false);
            self.out.push_back(Output::Close(s, reason));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
