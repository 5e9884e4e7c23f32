//! The mini program room service: the backend `<webrtc-room>`, `<rtc-room>` and
//! `<live-room>` call before they push and play (../shared/spec/credentials.md §5).
//!
//! A sans-I/O state machine owned by the control task, beside [`crate::room::Rooms`]:
//! a request (already parsed from HTTP, with its login's signature already verified by
//! the shell) and a clock go in; a JSON answer and [`Effect`]s on the signaling rooms
//! come out. A room here *is* a signaling room (the same [`RoomKey`]): what this module
//! keeps is only what the components ask for that signaling has no notion of (room
//! info, creator, pushers' names and avatars, heartbeats, audiences, custom fields),
//! and what it lists is read from the signaling room too ([`RoomView`]), so browsers and
//! mini programs see each other.
//!
//! Decisions where §5 is silent are written next to the code that makes them, and in
//! `signaling/MINIPROGRAM.md`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::auth::{Keyring, Privileges, RoomId, TokenKind};
use crate::room::RoomKey;

#[cfg(test)]
mod tests;

/// The room families of §5, each under its own path prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `/weapp/webrtc_room/` (§5.1): members with userSig + privateMapKey.
    WebRtc,
    /// `/weapp/multi_room/`, `/weapp/double_room/`, `/weapp/live_room/` (§5.3, §5.4).
    Multi,
    Double,
    Live,
}

impl Kind {
    pub fn from_prefix(p: &str) -> Option<Kind> {
        Some(match p {
            "webrtc_room" => Kind::WebRtc,
            "multi_room" => Kind::Multi,
            "double_room" => Kind::Double,
            "live_room" => Kind::Live,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::WebRtc => "webrtc_room",
            Kind::Multi => "multi_room",
            Kind::Double => "double_room",
            Kind::Live => "live_room",
        }
    }
}

/// The result codes of §5 (Tencent's demo backends).
pub mod code {
    pub const OK: i64 = 0;
    /// get_pushers of a room that does not exist (RoomService).
    pub const NO_ROOM: i64 = 1;
    pub const MISSING_PARAM: i64 = 2;
    /// webrtc_room: the room does not exist; RoomService: not the room's owner (and a
    /// room that does not exist for the custom-info calls).
    pub const ROOM_OR_OWNER: i64 = 3;
    pub const NOT_MEMBER: i64 = 5;
    pub const AUTH: i64 = 7;
    /// Not in §5: an operation this server does not implement (merge_stream).
    pub const NOT_SUPPORTED: i64 = 10;
    /// The room exists already, or a field is over its limit.
    pub const EXISTS_OR_TOO_LONG: i64 = 11;
    pub const FULL: i64 = 5001;
}

/// Bounds and timeouts (`[room_service]` in the configuration).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The app of `/weapp/webrtc_room/` (whose calls name none).
    pub sdk_app_id: u64,
    /// `webrtc_room/get_login_info` hands a userSig to anyone who asks, as Tencent's
    /// demo backend does: only where the node sits behind the app's own login.
    pub issue_user_sigs: bool,
    /// The kind of userSig and privateMapKey issued (v1, as the original, by default).
    pub sig_kind: TokenKind,
    pub heartbeat_timeout_ms: u64,
    /// A room nobody is in (no pusher, no signaling member) goes after this long.
    pub idle_room_ms: u64,
    /// Pushers (members, for webrtc_room) of one room; double rooms hold 2.
    pub max_members: usize,
    pub max_audiences: usize,
    pub max_rooms: usize,
    /// roomInfo, userName, userAvatar, userInfo, custom fields: bytes each.
    pub max_field_bytes: usize,
    /// Custom fields of one room.
    pub max_custom_fields: usize,
    /// Logged-in users (tokens) at once; the least recently used goes first.
    pub max_sessions: usize,
    /// A token unused this long is forgotten.
    pub token_idle_ms: u64,
    /// Validity of the push and play URLs handed out.
    pub url_validity_s: u64,
    /// Validity of the userSigs and privateMapKeys handed out.
    pub sig_validity_s: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            sdk_app_id: 0,
            issue_user_sigs: false,
            sig_kind: TokenKind::V1,
            heartbeat_timeout_ms: 20_000,
            idle_room_ms: 30_000,
            max_members: 4,
            max_audiences: 30,
            max_rooms: 1000,
            max_field_bytes: 1024,
            max_custom_fields: 32,
            max_sessions: 10_000,
            token_idle_ms: 2 * 3600 * 1000,
            url_validity_s: 7 * 24 * 3600,
            sig_validity_s: 3600,
        }
    }
}

/// How this node spells push and play URLs, and the keys that sign them.
#[derive(Clone)]
pub struct Issuer {
    pub keyring: Arc<Keyring>,
    /// `rtmp://host:1935/live`
    pub rtmp_base: String,
    /// `http://host:8080/live`
    pub flv_base: String,
}

/// One member of a signaling room, as this module needs to see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewMember {
    pub user_id: String,
    /// The stream it publishes, if any.
    pub stream: Option<String>,
}

/// What the room service reads of the signaling rooms.
pub trait RoomView {
    fn members(&self, room: &RoomKey) -> Vec<ViewMember>;
}

/// What the signaling rooms must do after a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// `stream` (an RTMP push of a URL this service handed out) joins `room` as
    /// `user_id` and publishes, now if it is being pushed, or when it starts.
    Bind {
        stream: String,
        room: RoomKey,
        user_id: String,
    },
    /// The user leaves the signaling room (heartbeat expired, removed by the room's
    /// owner, the room destroyed, or the user's own delete/quit): everyone is told.
    Remove { room: RoomKey, user_id: String },
    /// The user's RTMP push leaves the room (its own `delete_pusher`, or the presenter
    /// took it off the stage): others see its stream go; a signaling session of the
    /// same user stays (a mini program keeps hearing the room). A member with no push
    /// leaves, as for [`Effect::Remove`], if `else_remove` (`delete_pusher`: a browser
    /// publisher taken off by the owner), and stays otherwise (a linkMic kick).
    EndPush {
        room: RoomKey,
        user_id: String,
        else_remove: bool,
    },
}

/// A linkMic request, or an acceptance not yet used by `add_pusher`, lasts this long.
pub const STAGE_TTL_MS: u64 = 60_000;

/// A refused `linkMic`: a signaling error code and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageRefusal {
    pub code: weir_signaling::ErrorCode,
    pub message: String,
}

fn stage_refusal(code: weir_signaling::ErrorCode, message: impl Into<String>) -> StageRefusal {
    StageRefusal {
        code,
        message: message.into(),
    }
}

/// The stream name of a user's room-service push URL: `{sdkappid}_{userID}` (the
/// shape of Tencent's `{bizid}_{userID}` live codes) when the userID starts with a
/// letter and is made of `[A-Za-z0-9_]` (64 at most), so it can never read as the
/// room-bound `{sdkappid}_{roomid}_{userid}` shape; otherwise `{sdkappid}_h-` and a
/// digest of the userID, which no plain userID can spell (`-`).
pub fn push_stream_name(sdk_app_id: u64, user_id: &str) -> String {
    let plain = user_id.len() <= 64
        && user_id.starts_with(|c: char| c.is_ascii_alphabetic())
        && user_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if plain {
        format!("{sdk_app_id}_{user_id}")
    } else {
        use sha2::Digest;
        let d = sha2::Sha256::digest(user_id.as_bytes());
        format!("{sdk_app_id}_h-{}", hex::encode(&d[..12]))
    }
}

/// The app a room-service stream name belongs to, if it has that shape (and not the
/// room-bound one).
pub fn push_stream_app(name: &str) -> Option<u64> {
    if crate::room::names::bound_stream(name).is_some() {
        return None;
    }
    let (app, rest) = name.split_once('_')?;
    if rest.is_empty() || !rest.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    app.parse().ok()
}

/// The webrtc_room userID rule (§5.1).
fn webrtc_user_ok(u: &str) -> bool {
    let b = u.as_bytes();
    (4..=24).contains(&b.len())
        && b[0].is_ascii_alphabetic()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// A request, as the HTTP shell hands it over.
#[derive(Debug, Clone)]
pub struct Call {
    pub kind: Kind,
    pub action: String,
    /// `?userID=` and `?token=` of the URL (RoomService authenticates every call by them).
    pub user_id: Option<String>,
    pub token: Option<String>,
    /// The JSON body (an empty object when there was none).
    pub body: Value,
}

#[derive(Debug, Clone)]
struct Login {
    sdk_app_id: u64,
    user_id: String,
    /// Unix seconds: when the userSig it was made from runs out.
    expires_at: u64,
    last_used_ms: u64,
}

#[derive(Debug, Clone)]
struct Pusher {
    user_name: String,
    user_avatar: String,
    /// The stream it pushes (RoomService), or None (webrtc_room members join signaling
    /// with their own credentials).
    stream: Option<String>,
    last_heartbeat_ms: u64,
}

#[derive(Debug)]
struct ServiceRoom {
    kind: Kind,
    info: String,
    creator: String,
    pushers: BTreeMap<String, Pusher>,
    audiences: BTreeMap<String, String>,
    /// The live room's stage (linkMic): who asked the presenter, and who it let on
    /// (each with when; both expire after [`STAGE_TTL_MS`], an acceptance also when
    /// its user registers its push).
    requests: BTreeMap<String, u64>,
    accepted: BTreeMap<String, u64>,
    custom: Map<String, Value>,
    /// When the room was last seen with nobody in it.
    empty_since_ms: Option<u64>,
}

/// The room service of one node.
pub struct RoomService {
    settings: Settings,
    issuer: Issuer,
    logins: HashMap<String, Login>,
    rooms: HashMap<RoomKey, ServiceRoom>,
    effects: Vec<Effect>,
}

/// An answer: `{code, message, ...fields}` (the Java backends' shape: fields at the top
/// level, not wrapped in `data`).
fn answer(code: i64, message: impl Into<String>) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("code".into(), json!(code));
    m.insert("message".into(), json!(message.into()));
    m
}

fn ok() -> Map<String, Value> {
    answer(code::OK, "请求成功")
}

type Reply = Result<Map<String, Value>, Map<String, Value>>;

fn fail(code: i64, message: impl Into<String>) -> Map<String, Value> {
    answer(code, message)
}

/// A string field; numbers are taken as their decimal text (`roomID` is a Number in
/// `<webrtc-room>`); anything else is a missing parameter.
fn field(body: &Value, name: &str) -> Result<Option<String>, Map<String, Value>> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(Value::Bool(b)) => Ok(Some(b.to_string())),
        Some(_) => Err(fail(
            code::MISSING_PARAM,
            format!("请求失败，参数错误: {name} must be a string"),
        )),
    }
}

/// The body's `userID` must be the logged-in user's (code 7 otherwise).
fn is_caller(user: &str, caller: &str) -> Result<(), Map<String, Value>> {
    if user == caller {
        Ok(())
    } else {
        Err(fail(
            code::AUTH,
            "请求失败，鉴权失败: userID is not the logged-in user",
        ))
    }
}

fn required(body: &Value, name: &str) -> Result<String, Map<String, Value>> {
    match field(body, name)? {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(fail(
            code::MISSING_PARAM,
            format!("请求失败，缺少参数: {name}"),
        )),
    }
}

/// A room id as the components send it: digits in 1..=4294967295 are a numeric
/// `roomID` (what browsers join with `roomID`); anything else a `strRoomID`.
pub fn room_id_of(s: &str) -> Option<RoomId> {
    if s.is_empty() || s.len() > 64 {
        return None;
    }
    if s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0') {
        if let Ok(n) = s.parse::<u32>() {
            return Some(RoomId::Num(n));
        }
    }
    if s.chars().any(|c| c.is_control()) {
        return None;
    }
    Some(RoomId::Str(s.to_owned()))
}

fn room_name(key: &RoomKey) -> String {
    key.name()
}

impl RoomService {
    pub fn new(settings: Settings, issuer: Issuer) -> Self {
        Self {
            settings,
            issuer,
            logins: HashMap::new(),
            rooms: HashMap::new(),
            effects: Vec::new(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Effects of the calls and ticks so far, in order.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// A `linkMic` message from `from`, a signaling member of `key`: the user to tell
    /// (the presenter, for a request; the member named, for an answer or a kick), or
    /// why not. A kick also ends the member's push ([`Effect::EndPush`]).
    ///
    /// The stage is a live room's (`/weapp/live_room/`): its presenter is the room's
    /// creator. A request lasts [`STAGE_TTL_MS`]; so does an acceptance until the
    /// member registers its push, which `add_pusher` refuses (code 7) to anyone the
    /// presenter has not accepted.
    pub fn link_mic(
        &mut self,
        key: &RoomKey,
        from: &str,
        action: weir_signaling::LinkMicAction,
        user: Option<&str>,
        now_ms: u64,
    ) -> Result<String, StageRefusal> {
        use weir_signaling::{ErrorCode, LinkMicAction};
        let max = self.settings.max_audiences;
        let Some(r) = self.rooms.get_mut(key).filter(|r| r.kind == Kind::Live) else {
            return Err(stage_refusal(
                ErrorCode::NotFound,
                "linkMic needs a live room of the room service (/weapp/live_room/): this room has no presenter",
            ));
        };
        if action == LinkMicAction::Request {
            if from == r.creator {
                return Err(stage_refusal(
                    ErrorCode::BadRequest,
                    "the presenter is on the stage already",
                ));
            }
            if r.pushers.contains_key(from) {
                return Err(stage_refusal(ErrorCode::BadRequest, "already on the stage"));
            }
            if !r.requests.contains_key(from) && r.requests.len() >= max {
                return Err(stage_refusal(
                    ErrorCode::LimitExceeded,
                    format!("the presenter has {max} requests waiting"),
                ));
            }
            r.requests.insert(from.to_owned(), now_ms);
            return Ok(r.creator.clone());
        }
        if from != r.creator {
            return Err(stage_refusal(
                ErrorCode::MissingPrivilege,
                "only the room's presenter (its creator) answers linkMic requests and kicks",
            ));
        }
        let Some(user) = user.filter(|u| !u.is_empty()) else {
            return Err(stage_refusal(
                ErrorCode::BadRequest,
                "linkMic accept, reject and kick name the member (userID)",
            ));
        };
        match action {
            LinkMicAction::Accept | LinkMicAction::Reject => {
                if r.requests.remove(user).is_none() {
                    return Err(stage_refusal(
                        ErrorCode::NotFound,
                        format!("no linkMic request from {user:?} is waiting"),
                    ));
                }
                if action == LinkMicAction::Accept {
                    r.accepted.insert(user.to_owned(), now_ms);
                }
            }
            LinkMicAction::Kick => {
                let accepted = r.accepted.remove(user).is_some();
                if r.pushers.remove(user).is_none() && !accepted {
                    return Err(stage_refusal(
                        ErrorCode::NotFound,
                        format!("{user:?} is not on the stage"),
                    ));
                }
                self.effects.push(Effect::EndPush {
                    room: key.clone(),
                    user_id: user.to_owned(),
                    else_remove: false,
                });
            }
            LinkMicAction::Request => unreachable!("handled above"),
        }
        Ok(user.to_owned())
    }

    pub fn room_count(&self) -> usize {
        self.rooms.len()
    }

    /// The room and user an RTMP push of `stream` is bound to (by an `add_pusher`).
    pub fn binding(&self, stream: &str) -> Option<(RoomKey, String)> {
        self.rooms.iter().find_map(|(k, r)| {
            r.pushers.iter().find_map(|(u, p)| {
                (p.stream.as_deref() == Some(stream)).then(|| (k.clone(), u.clone()))
            })
        })
    }

    /// A login whose userSig the shell verified: returns the token.
    pub fn login(
        &mut self,
        sdk_app_id: u64,
        user_id: &str,
        sig_expires_at: u64,
        random: [u8; 16],
        now_ms: u64,
    ) -> String {
        self.expire_logins(now_ms);
        if self.logins.len() >= self.settings.max_sessions {
            if let Some(oldest) = self
                .logins
                .iter()
                .min_by_key(|(_, l)| l.last_used_ms)
                .map(|(t, _)| t.clone())
            {
                self.logins.remove(&oldest);
            }
        }
        let token = hex::encode(random);
        self.logins.insert(
            token.clone(),
            Login {
                sdk_app_id,
                user_id: user_id.to_owned(),
                expires_at: sig_expires_at,
                last_used_ms: now_ms,
            },
        );
        token
    }

    fn expire_logins(&mut self, now_ms: u64) {
        let idle = self.settings.token_idle_ms;
        self.logins.retain(|_, l| {
            now_ms.saturating_sub(l.last_used_ms) < idle && l.expires_at >= now_ms / 1000
        });
    }

    /// The app and user of an authenticated RoomService call (code 7 otherwise).
    fn authenticate(
        &mut self,
        call: &Call,
        now_ms: u64,
    ) -> Result<(u64, String), Map<String, Value>> {
        let (Some(user), Some(token)) = (call.user_id.as_deref(), call.token.as_deref()) else {
            return Err(fail(
                code::MISSING_PARAM,
                "请求失败，缺少参数: userID, token",
            ));
        };
        let denied = || fail(code::AUTH, "请求失败，鉴权失败");
        let Some(login) = self.logins.get_mut(token) else {
            return Err(denied());
        };
        if login.user_id != user
            || now_ms.saturating_sub(login.last_used_ms) >= self.settings.token_idle_ms
            || login.expires_at < now_ms / 1000
        {
            return Err(denied());
        }
        login.last_used_ms = now_ms;
        Ok((login.sdk_app_id, login.user_id.clone()))
    }

    fn key(&self, app: u64, room: &str) -> Result<RoomKey, Map<String, Value>> {
        let room = room_id_of(room)
            .ok_or_else(|| fail(code::MISSING_PARAM, "请求失败，参数错误: roomID"))?;
        Ok(RoomKey {
            sdk_app_id: app,
            room,
        })
    }

    fn max_members(&self, kind: Kind) -> usize {
        match kind {
            Kind::Double => 2,
            _ => self.settings.max_members,
        }
    }

    fn too_long(&self, what: &str, s: &str) -> Result<(), Map<String, Value>> {
        if s.len() > self.settings.max_field_bytes {
            return Err(fail(
                code::EXISTS_OR_TOO_LONG,
                format!(
                    "{what} 字符串长度不能超过{}字节 ({} bytes)",
                    self.settings.max_field_bytes,
                    s.len()
                ),
            ));
        }
        Ok(())
    }

    /// A room id nobody uses, in the decimal space browsers join with `roomID`.
    fn fresh_room(
        &self,
        app: u64,
        view: &dyn RoomView,
        mut random: impl FnMut() -> u32,
    ) -> RoomKey {
        loop {
            let n = 100_000 + random() % (u32::MAX - 100_000);
            let key = RoomKey {
                sdk_app_id: app,
                room: RoomId::Num(n),
            };
            if !self.rooms.contains_key(&key) && view.members(&key).is_empty() {
                return key;
            }
        }
    }

    /// Handles one call. `random` draws room numbers.
    pub fn handle(
        &mut self,
        call: &Call,
        view: &dyn RoomView,
        now_ms: u64,
        random: impl FnMut() -> u32,
    ) -> Map<String, Value> {
        let r = match call.kind {
            Kind::WebRtc => self.webrtc(call, view, now_ms, random),
            _ => self.room_service(call, view, now_ms, random),
        };
        let mut m = match r {
            Ok(m) | Err(m) => m,
        };
        // The newer LiveRoom protocol (§5.4) reads a server timestamp in every answer.
        if call.kind == Kind::Live {
            m.insert("timestamp".into(), json!(now_ms));
        }
        m
    }

    fn webrtc(
        &mut self,
        call: &Call,
        view: &dyn RoomView,
        now_ms: u64,
        random: impl FnMut() -> u32,
    ) -> Reply {
        let body = &call.body;
        let app = self.settings.sdk_app_id;
        // §5.1 authenticates nothing: its calls hand userSigs and privilege-255
        // privateMapKeys to anyone who names a userID. So it is served only where the
        // operator says the node is behind the app's own login (or in development).
        if !self.settings.issue_user_sigs {
            return Err(fail(
                code::AUTH,
                "this server does not serve webrtc_room, which hands out credentials to anyone \
                 (room_service.issue_user_sigs is off): get credentials from your own backend",
            ));
        }
        match call.action.as_str() {
            "get_login_info" => {
                let user = match field(body, "userID")?.filter(|s| !s.is_empty()) {
                    Some(u) => u,
                    None => {
                        let mut r = random;
                        format!("user_{:08x}_{:04x}", r(), r() & 0xffff)
                    }
                };
                if !webrtc_user_ok(&user) {
                    return Err(fail(
                        code::AUTH,
                        "userID 须为字母开头、由字母数字和下划线组成的 4 到 24 个字符",
                    ));
                }
                let keys = self
                    .issuer
                    .keyring
                    .app(app)
                    .map_err(|e| fail(code::AUTH, e.to_string()))?;
                let sig = keys
                    .issue_user_sig(
                        self.settings.sig_kind,
                        &user,
                        now_ms / 1000,
                        self.settings.sig_validity_s,
                    )
                    .map_err(|e| fail(code::AUTH, e.to_string()))?;
                let mut m = ok();
                m.insert("sdkAppID".into(), json!(app));
                m.insert("accountType".into(), json!("0"));
                m.insert("userID".into(), json!(user));
                m.insert("userSig".into(), json!(sig));
                Ok(m)
            }
            "create_room" => {
                let user = required(body, "userID")?;
                self.webrtc_user(&user)?;
                let info = field(body, "roomInfo")?.unwrap_or_default();
                self.too_long("roomInfo", &info)?;
                let nick = field(body, "nickName")?.unwrap_or_default();
                self.too_long("nickName", &nick)?;
                if self.rooms.len() >= self.settings.max_rooms {
                    return Err(fail(code::FULL, "房间数已达上限"));
                }
                let key = self.fresh_room(app, view, random);
                let pmk = self.private_map_key(&key, &user, Privileges(255), now_ms)?;
                self.rooms.insert(
                    key.clone(),
                    ServiceRoom {
                        kind: Kind::WebRtc,
                        info: info.clone(),
                        creator: user.clone(),
                        pushers: BTreeMap::from([(
                            user.clone(),
                            Pusher {
                                user_name: nick,
                                user_avatar: String::new(),
                                stream: None,
                                last_heartbeat_ms: now_ms,
                            },
                        )]),
                        audiences: BTreeMap::new(),
                        requests: BTreeMap::new(),
                        accepted: BTreeMap::new(),
                        custom: Map::new(),
                        empty_since_ms: None,
                    },
                );
                let mut m = ok();
                m.insert("userID".into(), json!(user));
                m.insert("roomID".into(), json!(room_name(&key)));
                m.insert("roomInfo".into(), json!(info));
                m.insert("privateMapKey".into(), json!(pmk));
                Ok(m)
            }
            "enter_room" => {
                let user = required(body, "userID")?;
                self.webrtc_user(&user)?;
                let room = required(body, "roomID")?;
                let nick = field(body, "nickName")?.unwrap_or_default();
                self.too_long("nickName", &nick)?;
                let key = self.key(app, &room)?;
                let members = self.member_ids(&key, view);
                let Some(r) = self.rooms.get(&key).filter(|r| r.kind == Kind::WebRtc) else {
                    return Err(fail(code::ROOM_OR_OWNER, "房间不存在"));
                };
                let _ = r;
                if !members.contains(&user) && members.len() >= self.settings.max_members {
                    return Err(fail(code::FULL, "房间人数已满"));
                }
                let pmk = self.private_map_key(&key, &user, Privileges(255), now_ms)?;
                let r = self.rooms.get_mut(&key).expect("checked");
                r.empty_since_ms = None;
                r.pushers.insert(
                    user.clone(),
                    Pusher {
                        user_name: nick,
                        user_avatar: String::new(),
                        stream: None,
                        last_heartbeat_ms: now_ms,
                    },
                );
                let mut m = ok();
                m.insert("userID".into(), json!(user));
                m.insert("roomID".into(), json!(room_name(&key)));
                m.insert("privateMapKey".into(), json!(pmk));
                Ok(m)
            }
            "quit_room" | "heartbeat" => {
                let user = required(body, "userID")?;
                let room = required(body, "roomID")?;
                let key = self.key(app, &room)?;
                let quit = call.action == "quit_room";
                let Some(r) = self.rooms.get_mut(&key).filter(|r| r.kind == Kind::WebRtc) else {
                    return Err(fail(code::ROOM_OR_OWNER, "房间不存在"));
                };
                if quit {
                    if r.pushers.remove(&user).is_some() {
                        self.effects.push(Effect::Remove {
                            room: key.clone(),
                            user_id: user,
                        });
                    }
                } else {
                    match r.pushers.get_mut(&user) {
                        Some(p) => p.last_heartbeat_ms = now_ms,
                        None => return Err(fail(code::ROOM_OR_OWNER, "不是房间成员")),
                    }
                }
                Ok(ok())
            }
            "get_room_list" => {
                let (index, count) = self.paging(body, "count")?;
                let rooms: Vec<Value> = self
                    .listed(Kind::WebRtc, view)
                    .into_iter()
                    .skip(index)
                    .take(count)
                    .map(|(k, r)| {
                        json!({"roomID": room_name(k), "roomInfo": r.info, "roomCreator": r.creator})
                    })
                    .collect();
                let mut m = ok();
                m.insert("rooms".into(), Value::Array(rooms));
                Ok(m)
            }
            "get_room_members" => {
                let room = required(body, "roomID")?;
                let key = self.key(app, &room)?;
                let Some(r) = self.rooms.get(&key).filter(|r| r.kind == Kind::WebRtc) else {
                    return Err(fail(code::ROOM_OR_OWNER, "房间不存在"));
                };
                let mut members: Vec<Value> = r
                    .pushers
                    .iter()
                    .map(|(u, p)| json!({"userID": u, "nickName": p.user_name}))
                    .collect();
                for m in view.members(&key) {
                    if !r.pushers.contains_key(&m.user_id) {
                        members.push(json!({"userID": m.user_id, "nickName": m.user_id}));
                    }
                }
                let mut m = ok();
                m.insert("members".into(), Value::Array(members));
                Ok(m)
            }
            other => Err(fail(code::NOT_SUPPORTED, format!("unknown call {other:?}"))),
        }
    }

    fn webrtc_user(&self, user: &str) -> Result<(), Map<String, Value>> {
        if webrtc_user_ok(user) {
            Ok(())
        } else {
            Err(fail(
                code::AUTH,
                "userID 须为字母开头、由字母数字和下划线组成的 4 到 24 个字符",
            ))
        }
    }

    fn private_map_key(
        &self,
        key: &RoomKey,
        user: &str,
        privileges: Privileges,
        now_ms: u64,
    ) -> Result<String, Map<String, Value>> {
        let keys = self
            .issuer
            .keyring
            .app(key.sdk_app_id)
            .map_err(|e| fail(code::ROOM_OR_OWNER, e.to_string()))?;
        keys.issue_private_map_key(
            self.settings.sig_kind,
            user,
            &key.room,
            privileges,
            now_ms / 1000,
            self.settings.sig_validity_s,
        )
        .map_err(|e| {
            fail(
                code::ROOM_OR_OWNER,
                format!("privilege key generation failed: {e}"),
            )
        })
    }

    fn paging(&self, body: &Value, count_name: &str) -> Result<(usize, usize), Map<String, Value>> {
        let num = |name: &str, default: usize| -> Result<usize, Map<String, Value>> {
            match field(body, name)? {
                None => Ok(default),
                Some(s) => s
                    .parse::<usize>()
                    .map_err(|_| fail(code::MISSING_PARAM, format!("请求失败，参数错误: {name}"))),
            }
        };
        let index = num("index", 0)?;
        let count = num(count_name, 20)?.min(100);
        Ok((index, count))
    }

    /// Everyone in a room: its registered pushers and its signaling members.
    fn member_ids(&self, key: &RoomKey, view: &dyn RoomView) -> Vec<String> {
        let mut ids: Vec<String> = self
            .rooms
            .get(key)
            .map(|r| r.pushers.keys().cloned().collect())
            .unwrap_or_default();
        for m in view.members(key) {
            if !ids.contains(&m.user_id) {
                ids.push(m.user_id);
            }
        }
        ids
    }

    /// Rooms of a kind that someone is in, in a stable order.
    fn listed(&self, kind: Kind, view: &dyn RoomView) -> Vec<(&RoomKey, &ServiceRoom)> {
        let mut v: Vec<(&RoomKey, &ServiceRoom)> = self
            .rooms
            .iter()
            .filter(|(k, r)| {
                r.kind == kind && (!r.pushers.is_empty() || !view.members(k).is_empty())
            })
            .collect();
        v.sort_by_key(|(k, _)| room_name(k));
        v
    }

    fn play_url(&self, app: u64, stream: &str, now_ms: u64) -> String {
        let expires = now_ms / 1000 + self.settings.url_validity_s;
        let base = format!("{}/{stream}", self.issuer.rtmp_base);
        match self.issuer.keyring.app(app).and_then(|k| {
            k.live_key(crate::auth::live_url::LiveUrlKind::Play)
                .map(str::to_owned)
        }) {
            Ok(key) => crate::auth::live_url::sign_url(&base, &key, expires).unwrap_or(base),
            Err(_) => base,
        }
    }

    /// The `Room` object of §5.3: the room's pushers, then its signaling publishers.
    fn room_json(
        &self,
        key: &RoomKey,
        r: &ServiceRoom,
        view: &dyn RoomView,
        now_ms: u64,
    ) -> Map<String, Value> {
        let signaling = view.members(key);
        let mut pushers = Vec::new();
        for (u, p) in &r.pushers {
            // A pusher's stream: the RTMP push it registered, or what it publishes
            // over signaling (a webrtc_room member, a browser).
            let stream = p.stream.clone().or_else(|| {
                signaling
                    .iter()
                    .find(|m| &m.user_id == u)
                    .and_then(|m| m.stream.clone())
            });
            pushers.push(json!({
                "userID": u,
                "userName": p.user_name,
                "userAvatar": p.user_avatar,
                "accelerateURL": stream.map(|s| self.play_url(key.sdk_app_id, &s, now_ms)).unwrap_or_default(),
            }));
        }
        // Browsers (and any signaling publisher this service did not register).
        let registered: Vec<&str> = r
            .pushers
            .values()
            .filter_map(|p| p.stream.as_deref())
            .collect();
        for m in signaling {
            let Some(stream) = m.stream else { continue };
            if r.pushers.contains_key(&m.user_id) || registered.contains(&stream.as_str()) {
                continue;
            }
            pushers.push(json!({
                "userID": m.user_id,
                "userName": m.user_id,
                "userAvatar": "",
                "accelerateURL": self.play_url(key.sdk_app_id, &stream, now_ms),
            }));
        }
        let mut m = Map::new();
        m.insert("roomID".into(), json!(room_name(key)));
        m.insert("roomInfo".into(), json!(r.info));
        m.insert("roomCreator".into(), json!(r.creator));
        // No mixing yet: the creator's own stream stands in for the mixed one.
        let mixed = r
            .pushers
            .get(&r.creator)
            .and_then(|p| p.stream.as_ref())
            .map(|s| format!("{}/{s}.flv", self.issuer.flv_base))
            .unwrap_or_default();
        m.insert("mixedPlayURL".into(), json!(mixed));
        m.insert(
            "custom".into(),
            json!(Value::Object(r.custom.clone()).to_string()),
        );
        m.insert("pushers".into(), Value::Array(pushers));
        if r.kind == Kind::Live {
            m.insert("audienceCount".into(), json!(r.audiences.len()));
            m.insert("roomStatusCode".into(), json!(0));
        }
        m
    }

    fn room_service(
        &mut self,
        call: &Call,
        view: &dyn RoomView,
        now_ms: u64,
        random: impl FnMut() -> u32,
    ) -> Reply {
        let (app, caller) = self.authenticate(call, now_ms)?;
        let body = &call.body;
        let kind = call.kind;
        // §5.4's LiveRoom names are aliases of §5.3's.
        let action = match call.action.as_str() {
            "get_anchor_url" => "get_push_url",
            "get_anchors" => "get_pushers",
            "add_anchor" => "add_pusher",
            "delete_anchor" => "delete_pusher",
            "anchor_heartbeat" => "pusher_heartbeat",
            a => a,
        };
        let live_only = matches!(
            action,
            "add_audience"
                | "delete_audience"
                | "get_audiences"
                | "get_custom_info"
                | "set_custom_field"
                | "merge_stream"
        );
        if live_only && kind != Kind::Live {
            return Err(fail(
                code::NOT_SUPPORTED,
                format!("{action} is for live rooms only"),
            ));
        }
        match action {
            "logout" => {
                if let Some(t) = &call.token {
                    self.logins.remove(t);
                }
                Ok(ok())
            }
            "get_push_url" => {
                let stream = push_stream_name(app, &caller);
                let expires = now_ms / 1000 + self.settings.url_validity_s;
                let key = self
                    .issuer
                    .keyring
                    .app(app)
                    .and_then(|k| {
                        k.live_key(crate::auth::live_url::LiveUrlKind::Push)
                            .map(str::to_owned)
                    })
                    .map_err(|e| fail(code::AUTH, e.to_string()))?;
                let url = crate::auth::live_url::sign_url(
                    &format!("{}/{stream}", self.issuer.rtmp_base),
                    &key,
                    expires,
                )
                .map_err(|e| fail(code::AUTH, e.to_string()))?;
                let mut m = ok();
                m.insert("pushURL".into(), json!(url));
                m.insert(
                    "accelerateURL".into(),
                    json!(self.play_url(app, &stream, now_ms)),
                );
                Ok(m)
            }
            "get_room_list" => {
                let (index, count) = self.paging(body, "cnt")?;
                let rooms: Vec<Value> = self
                    .listed(kind, view)
                    .into_iter()
                    .skip(index)
                    .take(count)
                    .map(|(k, r)| Value::Object(self.room_json(k, r, view, now_ms)))
                    .collect();
                let mut m = ok();
                m.insert("rooms".into(), Value::Array(rooms));
                Ok(m)
            }
            "get_pushers" => {
                let room = required(body, "roomID")?;
                let key = self.key(app, &room)?;
                let Some(r) = self.rooms.get(&key).filter(|r| r.kind == kind) else {
                    return Err(fail(code::NO_ROOM, "请求失败，房间不存在"));
                };
                let mut m = ok();
                m.extend(self.room_json(&key, r, view, now_ms));
                Ok(m)
            }
            "create_room" => {
                let user = required(body, "userID")?;
                is_caller(&user, &caller)?;
                let info = field(body, "roomInfo")?
                    .ok_or_else(|| fail(code::MISSING_PARAM, "请求失败，缺少参数: roomInfo"))?;
                self.too_long("roomInfo", &info)?;
                let key = match field(body, "roomID")?.filter(|s| !s.is_empty()) {
                    Some(id) => {
                        let key = self.key(app, &id)?;
                        if self.rooms.contains_key(&key) || !view.members(&key).is_empty() {
                            return Err(fail(code::EXISTS_OR_TOO_LONG, "房间已经存在"));
                        }
                        key
                    }
                    None => self.fresh_room(app, view, random),
                };
                if self.rooms.len() >= self.settings.max_rooms {
                    return Err(fail(code::FULL, "房间数已达上限"));
                }
                self.rooms.insert(
                    key.clone(),
                    ServiceRoom {
                        kind,
                        info,
                        creator: caller.clone(),
                        pushers: BTreeMap::new(),
                        audiences: BTreeMap::new(),
                        requests: BTreeMap::new(),
                        accepted: BTreeMap::new(),
                        custom: Map::new(),
                        empty_since_ms: Some(now_ms),
                    },
                );
                let pmk = self
                    .private_map_key(&key, &caller, Privileges(255), now_ms)
                    .ok();
                let mut m = ok();
                m.insert("roomID".into(), json!(room_name(&key)));
                if let Some(pmk) = pmk {
                    m.insert("privateMapKey".into(), json!(pmk));
                }
                Ok(m)
            }
            "destroy_room" => {
                let room = required(body, "roomID")?;
                let key = self.key(app, &room)?;
                let Some(r) = self.rooms.get(&key).filter(|r| r.kind == kind) else {
                    return Err(fail(code::ROOM_OR_OWNER, "不是房间主人，无法销毁房间"));
                };
                if r.creator != caller {
                    return Err(fail(code::ROOM_OR_OWNER, "不是房间主人，无法销毁房间"));
                }
                self.rooms.remove(&key);
                // Everyone leaves, browsers too: the room is gone.
                for m in self.member_ids_after_removal(&key, view) {
                    self.effects.push(Effect::Remove {
                        room: key.clone(),
                        user_id: m,
                    });
                }
                Ok(ok())
            }
            "add_pusher" => {
                let room = required(body, "roomID")?;
                let user = required(body, "userID")?;
                let push_url = required(body, "pushURL")?;
                let name = field(body, "userName")?.unwrap_or_default();
                let avatar = field(body, "userAvatar")?.unwrap_or_default();
                self.too_long("userName", &name)?;
                self.too_long("userAvatar", &avatar)?;
                is_caller(&user, &caller)?;
                let stream = self.check_push_url(app, &caller, &push_url, now_ms)?;
                let key = self.key(app, &room)?;
                let members = self.member_ids(&key, view);
                let max = self.max_members(kind);
                let room_info = field(body, "roomInfo")?.unwrap_or_default();
                self.too_long("roomInfo", &room_info)?;
                match self.rooms.get(&key) {
                    Some(r) if r.kind != kind => {
                        return Err(fail(
                            code::EXISTS_OR_TOO_LONG,
                            "房间已经存在 (another kind of room)",
                        ))
                    }
                    Some(r) => {
                        // A live room's stage is its owner's: others are let on by it
                        // (linkMic accept), not by asking the server.
                        if r.kind == Kind::Live
                            && r.creator != caller
                            && !r.pushers.contains_key(&caller)
                            && !r.accepted.contains_key(&caller)
                        {
                            return Err(fail(
                                code::AUTH,
                                "请求失败，鉴权失败: the presenter has not let this user on the stage (linkMic)",
                            ));
                        }
                        if !r.pushers.contains_key(&caller)
                            && members.len() >= max
                            && !members.contains(&caller)
                        {
                            return Err(fail(code::FULL, "超出房间人数上限"));
                        }
                    }
                    None => {
                        // As the originals: a pusher entering a room nobody created
                        // creates it, and owns it.
                        if !view.members(&key).is_empty()
                            && members.len() >= max
                            && !members.contains(&caller)
                        {
                            return Err(fail(code::FULL, "超出房间人数上限"));
                        }
                        if self.rooms.len() >= self.settings.max_rooms {
                            return Err(fail(code::FULL, "房间数已达上限"));
                        }
                        self.rooms.insert(
                            key.clone(),
                            ServiceRoom {
                                kind,
                                info: room_info,
                                creator: caller.clone(),
                                pushers: BTreeMap::new(),
                                audiences: BTreeMap::new(),
                                requests: BTreeMap::new(),
                                accepted: BTreeMap::new(),
                                custom: Map::new(),
                                empty_since_ms: None,
                            },
                        );
                    }
                }
                // One room at a time: a stream registered elsewhere moves here.
                let elsewhere: Vec<RoomKey> = self
                    .rooms
                    .iter()
                    .filter(|(k, r)| **k != key && r.pushers.contains_key(&caller))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in elsewhere {
                    if let Some(r) = self.rooms.get_mut(&k) {
                        r.pushers.remove(&caller);
                    }
                    self.effects.push(Effect::Remove {
                        room: k,
                        user_id: caller.clone(),
                    });
                }
                let r = self.rooms.get_mut(&key).expect("present");
                r.empty_since_ms = None;
                r.accepted.remove(&caller);
                r.requests.remove(&caller);
                r.pushers.insert(
                    caller.clone(),
                    Pusher {
                        user_name: name,
                        user_avatar: avatar,
                        stream: Some(stream.clone()),
                        last_heartbeat_ms: now_ms,
                    },
                );
                self.effects.push(Effect::Bind {
                    stream,
                    room: key.clone(),
                    user_id: caller,
                });
                let mut m = ok();
                m.insert("roomID".into(), json!(room_name(&key)));
                if let Ok(pmk) = self.private_map_key(&key, &user, Privileges(255), now_ms) {
                    m.insert("privateMapKey".into(), json!(pmk));
                }
                Ok(m)
            }
            "delete_pusher" => {
                let room = required(body, "roomID")?;
                let user = required(body, "userID")?;
                let key = self.key(app, &room)?;
                let Some(r) = self.rooms.get_mut(&key).filter(|r| r.kind == kind) else {
                    return Err(fail(code::NOT_MEMBER, "退出房间失败，不是房间成员"));
                };
                // A pusher removes itself; the room's owner may remove anyone (a
                // presenter ending someone's turn on a live room's stage).
                if user != caller && r.creator != caller {
                    return Err(fail(
                        code::AUTH,
                        "请求失败，鉴权失败: only the room's owner removes others",
                    ));
                }
                r.accepted.remove(&user);
                if r.pushers.remove(&user).is_none()
                    && !view.members(&key).iter().any(|m| m.user_id == user)
                {
                    return Err(fail(code::NOT_MEMBER, "退出房间失败，不是房间成员"));
                }
                self.effects.push(Effect::EndPush {
                    room: key.clone(),
                    user_id: user,
                    else_remove: true,
                });
                Ok(ok())
            }
            "pusher_heartbeat" => {
                let room = required(body, "roomID")?;
                let key = self.key(app, &room)?;
                let Some(r) = self.rooms.get_mut(&key).filter(|r| r.kind == kind) else {
                    return Err(fail(code::NOT_MEMBER, "请求失败，不是房间成员"));
                };
                match r.pushers.get_mut(&caller) {
                    Some(p) => p.last_heartbeat_ms = now_ms,
                    None => return Err(fail(code::NOT_MEMBER, "请求失败，不是房间成员")),
                }
                let mut m = ok();
                // The newer LiveRoom merges the pusher list from its heartbeat answer.
                if call.action == "anchor_heartbeat" {
                    let r = &self.rooms[&key];
                    m.extend(self.room_json(&key, r, view, now_ms));
                }
                Ok(m)
            }
            "add_audience" => {
                let room = required(body, "roomID")?;
                let user = required(body, "userID")?;
                let info = field(body, "userInfo")?
                    .ok_or_else(|| fail(code::MISSING_PARAM, "请求失败，缺少参数: userInfo"))?;
                self.too_long("userInfo", &info)?;
                is_caller(&user, &caller)?;
                let key = self.key(app, &room)?;
                let max = self.settings.max_audiences;
                let Some(r) = self.rooms.get_mut(&key).filter(|r| r.kind == kind) else {
                    return Err(fail(code::ROOM_OR_OWNER, "请求失败，房间不存在"));
                };
                if !r.audiences.contains_key(&user) && r.audiences.len() >= max {
                    return Err(fail(code::FULL, "观众列表满了"));
                }
                r.audiences.insert(user.clone(), info);
                let mut m = ok();
                // The audience watches over signaling too (receive-only).
                let recv = Privileges(
                    Privileges::ENTER_ROOM.0 | Privileges::RECV_AUDIO.0 | Privileges::RECV_VIDEO.0,
                );
                if let Ok(pmk) = self.private_map_key(&key, &user, recv, now_ms) {
                    m.insert("privateMapKey".into(), json!(pmk));
                }
                Ok(m)
            }
            "delete_audience" => {
                let room = required(body, "roomID")?;
                let user = field(body, "userID")?.unwrap_or_else(|| caller.clone());
                let key = self.key(app, &room)?;
                if let Some(r) = self.rooms.get_mut(&key).filter(|r| r.kind == kind) {
                    if user != caller && r.creator != caller {
                        return Err(fail(
                            code::AUTH,
                            "请求失败，鉴权失败: only the room's owner removes others",
                        ));
                    }
                    r.audiences.remove(&user);
                }
                Ok(ok())
            }
            "get_audiences" => {
                let room = required(body, "roomID")?;
                let key = self.key(app, &room)?;
                let audiences: Vec<Value> = self
                    .rooms
                    .get(&key)
                    .filter(|r| r.kind == kind)
                    .map(|r| {
                        r.audiences
                            .iter()
                            .map(|(u, i)| json!({"userID": u, "userInfo": i}))
                            .collect()
                    })
                    .unwrap_or_default();
                let mut m = ok();
                m.insert("audiences".into(), Value::Array(audiences));
                Ok(m)
            }
            "get_custom_info" => {
                let room = required(body, "roomID")?;
                let key = self.key(app, &room)?;
                let Some(r) = self.rooms.get(&key).filter(|r| r.kind == kind) else {
                    return Err(fail(code::ROOM_OR_OWNER, "请求失败，房间不存在"));
                };
                let mut m = ok();
                m.insert(
                    "customInfo".into(),
                    json!(Value::Object(r.custom.clone()).to_string()),
                );
                m.insert("custom".into(), Value::Object(r.custom.clone()));
                Ok(m)
            }
            "set_custom_field" => {
                let room = required(body, "roomID")?;
                let name = required(body, "fieldName")?;
                let op = required(body, "operation")?;
                self.too_long("fieldName", &name)?;
                let key = self.key(app, &room)?;
                let max_fields = self.settings.max_custom_fields;
                let max_bytes = self.settings.max_field_bytes;
                let value = body.get("value").cloned();
                let Some(r) = self.rooms.get_mut(&key).filter(|r| r.kind == kind) else {
                    return Err(fail(code::ROOM_OR_OWNER, "请求失败，房间不存在"));
                };
                if r.creator != caller {
                    return Err(fail(code::ROOM_OR_OWNER, "不是房间主人"));
                }
                let current = r.custom.get(&name).and_then(Value::as_i64).unwrap_or(0);
                let new = match op.as_str() {
                    "inc" => json!(current + 1),
                    "dec" => json!(current - 1),
                    "set" => match value {
                        Some(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_))) => v,
                        _ => return Err(fail(code::MISSING_PARAM, "请求失败，缺少参数: value")),
                    },
                    _ => {
                        return Err(fail(
                            code::MISSING_PARAM,
                            "请求失败，参数错误: operation is set, inc or dec",
                        ))
                    }
                };
                if new.to_string().len() > max_bytes {
                    return Err(fail(code::EXISTS_OR_TOO_LONG, "value 超过长度限制"));
                }
                if !r.custom.contains_key(&name) && r.custom.len() >= max_fields {
                    return Err(fail(code::FULL, "自定义字段已达上限"));
                }
                r.custom.insert(name, new);
                let mut m = ok();
                m.insert(
                    "customInfo".into(),
                    json!(Value::Object(r.custom.clone()).to_string()),
                );
                m.insert("custom".into(), Value::Object(r.custom.clone()));
                Ok(m)
            }
            "merge_stream" => {
                let mut m = fail(
                    code::NOT_SUPPORTED,
                    "stream mixing is not supported by this server",
                );
                m.insert(
                    "result".into(),
                    json!({"code": code::NOT_SUPPORTED, "message": "stream mixing is not supported", "timestamp": now_ms}),
                );
                m.insert("merge_code".into(), json!(code::NOT_SUPPORTED));
                m.insert("merge_msg".into(), json!("stream mixing is not supported"));
                Err(m)
            }
            other => Err(fail(code::NOT_SUPPORTED, format!("unknown call {other:?}"))),
        }
    }

    fn member_ids_after_removal(&self, key: &RoomKey, view: &dyn RoomView) -> Vec<String> {
        view.members(key).into_iter().map(|m| m.user_id).collect()
    }

    /// A push URL this service handed to `user`: signed with the app's push key, for
    /// the user's own stream name. Returns the stream name.
    fn check_push_url(
        &self,
        app: u64,
        user: &str,
        url: &str,
        now_ms: u64,
    ) -> Result<String, Map<String, Value>> {
        let bad = |why: String| fail(code::AUTH, format!("请求失败，鉴权失败: pushURL {why}"));
        let live = crate::auth::live_url::LiveUrl::parse(url).map_err(|e| bad(e.to_string()))?;
        let expected = push_stream_name(app, user);
        if live.stream != expected {
            return Err(bad(format!("is not this user's stream ({expected})")));
        }
        let keys = self
            .issuer
            .keyring
            .app(app)
            .map_err(|e| bad(e.to_string()))?;
        keys.verify_live_url(
            crate::auth::live_url::LiveUrlKind::Push,
            &live,
            now_ms / 1000,
        )
        .map_err(|e| bad(e.to_string()))?;
        Ok(expected)
    }

    /// Heartbeat expiry and idle rooms; call every second or so. Returns how many
    /// pushers (members) expired.
    pub fn tick(&mut self, view: &dyn RoomView, now_ms: u64) -> usize {
        let mut expired_count = 0;
        let timeout = self.settings.heartbeat_timeout_ms;
        let idle = self.settings.idle_room_ms;
        let mut gone_rooms = Vec::new();
        for (key, r) in self.rooms.iter_mut() {
            r.requests
                .retain(|_, at| now_ms.saturating_sub(*at) <= STAGE_TTL_MS);
            r.accepted
                .retain(|_, at| now_ms.saturating_sub(*at) <= STAGE_TTL_MS);
            let expired: Vec<String> = r
                .pushers
                .iter()
                .filter(|(_, p)| now_ms.saturating_sub(p.last_heartbeat_ms) > timeout)
                .map(|(u, _)| u.clone())
                .collect();
            for u in expired {
                expired_count += 1;
                r.pushers.remove(&u);
                tracing::info!(room = %key.room, user = %u, kind = r.kind.name(), "room service: heartbeat expired; pusher removed");
                self.effects.push(Effect::Remove {
                    room: key.clone(),
                    user_id: u,
                });
            }
            let empty = r.pushers.is_empty() && view.members(key).is_empty();
            match (empty, r.empty_since_ms) {
                (false, _) => r.empty_since_ms = None,
                (true, None) => r.empty_since_ms = Some(now_ms),
                (true, Some(t)) if now_ms.saturating_sub(t) >= idle => gone_rooms.push(key.clone()),
                _ => {}
            }
        }
        for k in gone_rooms {
            tracing::info!(room = %k.room, "room service: room empty; removed");
            self.rooms.remove(&k);
        }
        self.expire_logins(now_ms);
        expired_count
    }
}
