//! Weir's signaling protocol: the JSON messages exchanged over the websocket between
//! clients (browsers, mini program adapters, test clients) and the server.
//!
//! Every message is one JSON object in one websocket text frame, with a `type` field.
//! `PROTOCOL.md` beside this crate is the normative description; these types are its
//! Rust form, shared by the server and Rust clients so that the two cannot drift.
//!
//! The protocol is versioned by [`PROTOCOL_VERSION`], sent in `join`; a server refuses
//! versions it does not speak with [`ErrorCode::UnsupportedProtocol`].

use serde::{Deserialize, Serialize};

/// The protocol version this crate describes.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest text frame a peer may send; larger frames close the connection. An SDP
/// answer takes ~1.3 KB per m-section (two per stream), so a member receiving 100
/// streams (`max_subscriptions_per_member`) sends ~260 KB: 64 KiB, the limit before,
/// closed the signaling of every member of a 25-stream meeting answering with a
/// full codec list (found by `cargo bench --bench load`).
pub const MAX_MESSAGE_BYTES: usize = 512 * 1024;

/// Longest room text message, in bytes.
pub const MAX_TEXT_BYTES: usize = 4 * 1024;

/// The close codes the server ends a websocket with (RFC 6455 §7.4; 4000-4999 are
/// the application's own). Each close also carries a reason text for people.
pub mod close {
    /// The member sent `leave`.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down (after `left` with reason `serverShutdown`).
    pub const GOING_AWAY: u16 = 1001;
    /// Binary frames, repeatedly.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// Unparsable messages, repeatedly.
    pub const INVALID_DATA: u16 = 1007;
    /// A frame larger than [`MAX_MESSAGE_BYTES`](super::MAX_MESSAGE_BYTES).
    pub const TOO_BIG: u16 = 1009;
    /// The server failed (its control plane is gone).
    pub const INTERNAL_ERROR: u16 = 1011;
    /// A new session with the same userID took over (after `left`, reason `replaced`).
    pub const REPLACED: u16 = 4001;
    /// Nothing arrived for the idle timeout (after `left`, reason `timeout`).
    pub const IDLE: u16 = 4002;
    /// The member's media connection failed (after `left`, reason `timeout`).
    pub const MEDIA_TIMEOUT: u16 = 4003;
    /// The session did not read its room events fast enough; they would have been lost.
    pub const TOO_SLOW: u16 = 4004;
    /// The room service removed the member (after `left`, reason `removed`).
    pub const REMOVED: u16 = 4005;
}

/// Which of a client's peer connections a message is about.
///
/// A client publishes on its *publisher* connection (the client offers) and receives on
/// its *subscriber* connection (the server offers), so neither side ever has to resolve
/// an offer collision. A member that shares its screen publishes it on a third, the
/// *screen* connection, which the client offers too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Publisher,
    Subscriber,
    Screen,
}

/// A trickled ICE candidate, as `RTCIceCandidateInit` in browsers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct IceCandidate {
    pub candidate: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdp_mid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdp_m_line_index: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_fragment: Option<String>,
}

/// An ICE server for `RTCPeerConnection`'s configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Media kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Audio,
    Video,
}

/// Where a stream can be played.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PlayUrls {
    pub rtmp: String,
    pub flv: String,
    pub webrtc: String,
}

/// A published stream: one publisher's audio and/or video.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamInfo {
    /// The stream's name, unique on the server; the play URLs end with it.
    pub stream_id: String,
    #[serde(rename = "userID")]
    pub user_id: String,
    /// `webrtc` for a browser or SDK publisher, `rtmp` for an RTMP pusher.
    pub source: String,
    pub audio: bool,
    pub video: bool,
    /// A screen share (TRTC's sub-stream, `…_aux`), rather than the member's camera
    /// and microphone (`…_main`).
    #[serde(default)]
    pub screen: bool,
    #[serde(default)]
    pub audio_muted: bool,
    #[serde(default)]
    pub video_muted: bool,
    pub urls: PlayUrls,
}

/// A room member as others see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberInfo {
    #[serde(rename = "userID")]
    pub user_id: String,
    #[serde(default)]
    pub streams: Vec<StreamInfo>,
}

/// Numeric codes of [`ServerMessage::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "u16", try_from = "u16")]
pub enum ErrorCode {
    /// The message is not valid JSON or not a known message.
    BadRequest,
    /// `join` asked for a protocol version the server does not speak.
    UnsupportedProtocol,
    /// The message needs a joined session (or `join` was sent twice).
    NotJoined,
    /// The userSig did not verify.
    InvalidUserSig,
    /// The privateMapKey did not verify (other room, expired, …).
    InvalidPrivateMapKey,
    /// The privateMapKey lacks a privilege for this action.
    MissingPrivilege,
    /// A named stream or member does not exist.
    NotFound,
    /// The SDP could not be applied.
    Negotiation,
    /// A limit was hit (rooms per node, members per room, message size or rate).
    LimitExceeded,
    /// The server is shutting down or not ready.
    Unavailable,
    /// Something failed on the server.
    Internal,
    /// A name is already in use (a stream name pushed by someone else).
    Conflict,
}

impl From<ErrorCode> for u16 {
    fn from(c: ErrorCode) -> u16 {
        use ErrorCode::*;
        match c {
            BadRequest => 400,
            UnsupportedProtocol => 426,
            NotJoined => 409,
            InvalidUserSig => 401,
            InvalidPrivateMapKey => 402,
            MissingPrivilege => 403,
            NotFound => 404,
            Negotiation => 488,
            LimitExceeded => 429,
            Unavailable => 503,
            Internal => 500,
            Conflict => 423,
        }
    }
}

impl TryFrom<u16> for ErrorCode {
    type Error = String;
    fn try_from(v: u16) -> Result<Self, String> {
        use ErrorCode::*;
        Ok(match v {
            400 => BadRequest,
            426 => UnsupportedProtocol,
            409 => NotJoined,
            401 => InvalidUserSig,
            402 => InvalidPrivateMapKey,
            403 => MissingPrivilege,
            404 => NotFound,
            488 => Negotiation,
            429 => LimitExceeded,
            503 => Unavailable,
            500 => Internal,
            423 => Conflict,
            other => return Err(format!("unknown error code {other}")),
        })
    }
}

/// The room a client asks for: a u32 `roomID` or a string `strRoomID`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Join {
    pub protocol: u32,
    #[serde(rename = "sdkAppID")]
    pub sdk_app_id: u64,
    #[serde(rename = "userID")]
    pub user_id: String,
    pub user_sig: String,
    #[serde(rename = "roomID", default, skip_serializing_if = "Option::is_none")]
    pub room_id: Option<u32>,
    #[serde(rename = "strRoomID", default, skip_serializing_if = "Option::is_none")]
    pub str_room_id: Option<String>,
    pub private_map_key: String,
    /// Receive every stream of the room without asking (default true).
    #[serde(default = "yes")]
    pub auto_subscribe: bool,
    /// How the room weighs its subscribers when it tells publishers what to send;
    /// taken when this join creates the room (the node's default otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub congestion_policy: Option<CongestionPolicy>,
}

/// How a room turns its subscribers' capacities into one target per publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CongestionPolicy {
    /// Serve the weakest subscriber (1v1 calls, small meetings).
    #[default]
    Weakest,
    /// What a strict majority can take; weaker subscribers fall back (classes, large rooms).
    Majority,
}

impl CongestionPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Weakest => "weakest",
            Self::Majority => "majority",
        }
    }
}

/// A subscriber's congestion state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CongestionLevel {
    Normal,
    /// Queuing, loss or a falling estimate; nothing withheld yet.
    Warning,
    /// At least one video is paused, or sent on a lower layer, because the link
    /// cannot carry it.
    Congested,
}

impl CongestionLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Warning => "warning",
            Self::Congested => "congested",
        }
    }
}

fn yes() -> bool {
    true
}

/// Messages a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ClientMessage {
    Join(Join),
    /// Declare what will be published; the server checks privileges and answers
    /// `published` (then the client offers on its publisher connection).
    #[serde(rename_all = "camelCase")]
    Publish {
        audio: bool,
        video: bool,
        /// The publisher's video bitrate bounds (bit/s), as the mini program pusher's
        /// `min-bitrate`/`max-bitrate`: the room never asks for less or more.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        min_bitrate: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_bitrate: Option<u32>,
        /// A screen share, published on the `screen` connection beside the camera
        /// (video only; privilege 0x40).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        screen: bool,
    },
    /// Ends the camera stream, or with `screen` the screen share.
    Unpublish {
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        screen: bool,
    },
    #[serde(rename_all = "camelCase")]
    Offer {
        target: Target,
        sdp: String,
    },
    #[serde(rename_all = "camelCase")]
    Answer {
        target: Target,
        sdp: String,
    },
    /// A trickled candidate; `candidate: null` ends the candidates of that connection.
    #[serde(rename_all = "camelCase")]
    Candidate {
        target: Target,
        candidate: Option<IceCandidate>,
    },
    #[serde(rename_all = "camelCase")]
    Subscribe {
        stream_ids: Vec<String>,
    },
    #[serde(rename_all = "camelCase")]
    Unsubscribe {
        stream_ids: Vec<String>,
    },
    #[serde(rename_all = "camelCase")]
    Mute {
        kind: Kind,
        muted: bool,
    },
    #[serde(rename_all = "camelCase")]
    TextMessage {
        text: String,
    },
    /// The live room's stage (what the room components did over IM C2C messages):
    /// an audience member asks the presenter (`request`); the presenter answers the
    /// member named by `userID` (`accept`, `reject`) or takes it off the stage (`kick`).
    #[serde(rename_all = "camelCase")]
    LinkMic {
        action: LinkMicAction,
        #[serde(rename = "userID", default, skip_serializing_if = "Option::is_none")]
        user_id: Option<String>,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// The client's network changed (ICE failed or disconnected): the server restarts
    /// ICE on its subscriber connection and offers again with fresh credentials. (The
    /// publisher connection restarts with a new `offer` made with `iceRestart`.)
    RestartIce,
    Leave,
    #[serde(rename_all = "camelCase")]
    Ping {
        ts: u64,
    },
}

/// Why a member left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LeaveReason {
    /// The member sent `leave`.
    Left,
    /// The websocket closed.
    Disconnected,
    /// The media connection failed or stopped answering.
    Timeout,
    /// A new session with the same userID took over.
    Replaced,
    /// The server is shutting down.
    ServerShutdown,
    /// Removed from the room by the room service: a mini program pusher whose
    /// heartbeats stopped, one removed by the room's owner, or a destroyed room.
    Removed,
}

/// What a `linkMic` message does (the live room's stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LinkMicAction {
    /// An audience member asks to join the presenter on the stage.
    Request,
    /// The presenter lets the member on: it may now register its push (`add_pusher`).
    Accept,
    Reject,
    /// The presenter takes the member off the stage: its push leaves the room.
    Kick,
}

impl LinkMicAction {
    /// As it is spelled on the wire.
    pub fn name(self) -> &'static str {
        match self {
            LinkMicAction::Request => "request",
            LinkMicAction::Accept => "accept",
            LinkMicAction::Reject => "reject",
            LinkMicAction::Kick => "kick",
        }
    }
}

/// Messages the server sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ServerMessage {
    #[serde(rename_all = "camelCase")]
    Joined {
        protocol: u32,
        #[serde(rename = "userID")]
        user_id: String,
        /// The room as the server names it (`roomID` digits or `strRoomID`).
        room: String,
        /// The privilege bitmap granted by the privateMapKey.
        privileges: u32,
        members: Vec<MemberInfo>,
        ice_servers: Vec<IceServer>,
    },
    #[serde(rename_all = "camelCase")]
    MemberJoined {
        #[serde(rename = "userID")]
        user_id: String,
    },
    #[serde(rename_all = "camelCase")]
    MemberLeft {
        #[serde(rename = "userID")]
        user_id: String,
        reason: LeaveReason,
    },
    /// The caller's own stream was accepted.
    #[serde(rename_all = "camelCase")]
    Published { stream: StreamInfo },
    #[serde(rename_all = "camelCase")]
    StreamAdded { stream: StreamInfo },
    #[serde(rename_all = "camelCase")]
    StreamRemoved {
        stream_id: String,
        #[serde(rename = "userID")]
        user_id: String,
    },
    #[serde(rename_all = "camelCase")]
    StreamMuted {
        stream_id: String,
        kind: Kind,
        muted: bool,
    },
    #[serde(rename_all = "camelCase")]
    Offer { target: Target, sdp: String },
    #[serde(rename_all = "camelCase")]
    Answer { target: Target, sdp: String },
    #[serde(rename_all = "camelCase")]
    Candidate {
        target: Target,
        candidate: Option<IceCandidate>,
    },
    #[serde(rename_all = "camelCase")]
    TextMessage {
        #[serde(rename = "userID")]
        user_id: String,
        text: String,
        ts: u64,
    },
    /// The live room's stage: to the presenter, a member's `request`; to the member,
    /// the presenter's `accept`, `reject` or `kick`. `userID` is who sent it.
    #[serde(rename_all = "camelCase")]
    LinkMic {
        action: LinkMicAction,
        #[serde(rename = "userID")]
        user_id: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    #[serde(rename_all = "camelCase")]
    Pong { ts: u64 },
    /// To a subscriber, about its own downlink: sent when its state or its paused
    /// streams change, and every few seconds while it is not normal.
    #[serde(rename_all = "camelCase")]
    Congestion {
        state: CongestionLevel,
        /// The server's estimate of what this client's link can carry (bit/s); 0 when unknown.
        estimate: u64,
        /// Streams whose video is paused for this client (their audio continues).
        paused: Vec<String>,
        /// Simulcast streams this client gets on a lower layer than their best.
        #[serde(default)]
        lowered: Vec<String>,
    },
    /// To a simulcast publisher: the layers (by rid) some subscriber needs, or may
    /// need next; the others can be switched off (`encodings[i].active = false`).
    #[serde(rename_all = "camelCase")]
    PublishLayers {
        stream_id: String,
        active: Vec<String>,
    },
    /// To every member of the room: the rate the room asks a publisher to send its
    /// video at (WebRTC publishers also get it as REMB; RTMP pushers' backends can act
    /// on it, as on the pusher's NET_BUSY).
    #[serde(rename_all = "camelCase")]
    PublishTarget {
        stream_id: String,
        #[serde(rename = "userID")]
        user_id: String,
        bitrate: u64,
        policy: CongestionPolicy,
    },
    /// The server ends the session (after `leave`, or for the given reason).
    #[serde(rename_all = "camelCase")]
    Left { reason: LeaveReason },
    #[serde(rename_all = "camelCase")]
    Error {
        code: ErrorCode,
        message: String,
        /// The `type` of the client message that caused it, when there was one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request: Option<String>,
        /// Tencent's numeric code for a credential failure, when it has one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tencent_code: Option<u32>,
    },
}

impl ClientMessage {
    /// The wire name of this message's `type`.
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientMessage::Join(_) => "join",
            ClientMessage::Publish { .. } => "publish",
            ClientMessage::Unpublish { .. } => "unpublish",
            ClientMessage::Offer { .. } => "offer",
            ClientMessage::Answer { .. } => "answer",
            ClientMessage::Candidate { .. } => "candidate",
            ClientMessage::Subscribe { .. } => "subscribe",
            ClientMessage::Unsubscribe { .. } => "unsubscribe",
            ClientMessage::Mute { .. } => "mute",
            ClientMessage::TextMessage { .. } => "textMessage",
            ClientMessage::LinkMic { .. } => "linkMic",
            ClientMessage::RestartIce => "restartIce",
            ClientMessage::Leave => "leave",
            ClientMessage::Ping { .. } => "ping",
        }
    }

    /// Parses one frame, refusing oversized ones before parsing.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_MESSAGE_BYTES {
            return Err(format!(
                "message is {} bytes, more than {MAX_MESSAGE_BYTES}",
                text.len()
            ));
        }
        serde_json::from_str(text).map_err(|e| e.to_string())
    }
}

impl ServerMessage {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerMessage::Error {
            code,
            message: message.into(),
            request: None,
            tencent_code: None,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server messages always serialize")
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_uses_the_mini_program_field_names() {
        let text = r#"{"type":"join","protocol":1,"sdkAppID":1400000000,"userID":"alice",
            "userSig":"s","roomID":1234,"privateMapKey":"k"}"#;
        let ClientMessage::Join(j) = ClientMessage::parse(text).unwrap() else {
            panic!("not a join")
        };
        assert_eq!(j.room_id, Some(1234));
        assert!(j.auto_subscribe);
        let back = serde_json::to_value(ClientMessage::Join(j)).unwrap();
        assert_eq!(back["sdkAppID"], 1400000000);
        assert_eq!(back["userID"], "alice");
    }

    #[test]
    fn screen_share_is_a_flag_of_publish_and_unpublish_and_a_target() {
        let m =
            ClientMessage::parse(r#"{"type":"publish","audio":false,"video":true,"screen":true}"#)
                .unwrap();
        assert!(matches!(m, ClientMessage::Publish { screen: true, .. }));
        // Older clients' messages mean the camera, and are written as before.
        let m = ClientMessage::parse(r#"{"type":"unpublish"}"#).unwrap();
        assert_eq!(m, ClientMessage::Unpublish { screen: false });
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"type":"unpublish"}"#
        );
        let m = ClientMessage::parse(r#"{"type":"offer","target":"screen","sdp":"v=0"}"#).unwrap();
        assert!(matches!(
            m,
            ClientMessage::Offer {
                target: Target::Screen,
                ..
            }
        ));
    }

    #[test]
    fn streams_and_members_spell_user_id_as_documented() {
        let stream = StreamInfo {
            stream_id: "1_2_bob_main".into(),
            user_id: "bob".into(),
            source: "webrtc".into(),
            audio: true,
            video: true,
            screen: false,
            audio_muted: false,
            video_muted: false,
            urls: PlayUrls {
                rtmp: "r".into(),
                flv: "f".into(),
                webrtc: "w".into(),
            },
        };
        let member = MemberInfo {
            user_id: "bob".into(),
            streams: vec![stream.clone()],
        };
        let text = serde_json::to_string(&member).unwrap();
        assert!(
            text.starts_with(
                r#"{"userID":"bob","streams":[{"streamId":"1_2_bob_main","userID":"bob""#
            ),
            "{text}"
        );
        assert!(!text.contains("userId"), "{text}");
    }

    #[test]
    fn messages_round_trip() {
        let msgs = vec![
            ClientMessage::Candidate {
                target: Target::Publisher,
                candidate: Some(IceCandidate {
                    candidate: "candidate:1 1 udp 1 127.0.0.1 5000 typ host".into(),
                    sdp_mid: Some("0".into()),
                    sdp_m_line_index: Some(0),
                    username_fragment: None,
                }),
            },
            ClientMessage::Candidate {
                target: Target::Subscriber,
                candidate: None,
            },
            ClientMessage::Mute {
                kind: Kind::Video,
                muted: true,
            },
            ClientMessage::Leave,
            ClientMessage::Subscribe {
                stream_ids: vec!["a".into()],
            },
        ];
        for m in msgs {
            let text = serde_json::to_string(&m).unwrap();
            assert_eq!(ClientMessage::parse(&text).unwrap(), m, "{text}");
        }
        let e = ServerMessage::Error {
            code: ErrorCode::MissingPrivilege,
            message: "x".into(),
            request: Some("publish".into()),
            tencent_code: None,
        };
        let text = e.to_json();
        assert!(text.contains("\"code\":403"), "{text}");
        assert_eq!(ServerMessage::parse(&text).unwrap(), e);
    }

    #[test]
    fn garbage_and_oversize_are_errors() {
        assert!(ClientMessage::parse("").is_err());
        assert!(ClientMessage::parse("{\"type\":\"fly\"}").is_err());
        assert!(ClientMessage::parse("[1]").is_err());
        let big = format!(
            "{{\"type\":\"textMessage\",\"text\":\"{}\"}}",
            "x".repeat(MAX_MESSAGE_BYTES)
        );
        assert!(ClientMessage::parse(&big)
            .unwrap_err()
            .contains("more than"));
    }
}
