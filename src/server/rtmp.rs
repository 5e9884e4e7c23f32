//! The RTMP socket shell: accepts connections, drives [`ServerSession`], authorizes
//! pushers, makes each one a room member, and runs its [`Bridge`] (one per source),
//! handing the RTP it makes to the media plane.
//!
//! Who may push: a URL carrying room credentials
//! (`?sdkappid=&userid=&roomid=|strroomid=&usersig=&privatemapkey=`, enter and send
//! privileges needed), or a hotlink-protected URL (`?txSecret=&txTime=`, the app's push
//! key) for a stream name bound to a room by its shape, `{sdkappid}_{roomid}_{userid}`
//! with an optional `_main`. Anything else is refused before any media is accepted.
//!
//! One pusher per stream name: a second is refused while the first is sending; a
//! pusher silent for [`STALE_PUSHER`] (a dropped connection not yet noticed) is
//! replaced by the newcomer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tracing::{debug, info, warn};
use weir_signaling::{Kind, LeaveReason, ServerMessage};

use super::control::{ControlCommand, SessionEvent};
use super::AppState;
use crate::auth::{Identity, Privileges, RoomId, RoomTicket, TokenKind};
use crate::bridge::{self, Bridge, BridgeConfig};
use crate::live::{Tag, TagKind};
use crate::media::BridgeInput;
use crate::room::names::{bound_stream, NameClaims, Owner};
use crate::room::SessionId;
use crate::rtmp::amf0::{self, Amf0};
use crate::rtmp::{Event, ServerSession};
use bytes::Bytes;

/// A pusher that has sent nothing for this long may be replaced by a new one.
pub const STALE_PUSHER: Duration = Duration::from_secs(2);
/// Handshake through publish must be done within this.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection silent this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Stream names: URL-path safe, bounded.
const MAX_NAME: usize = 128;

/// Live pushers by stream name.
#[derive(Default)]
pub struct Pushers {
    inner: Mutex<HashMap<String, PusherEntry>>,
    /// Who each stream name belongs to (see `room::names`).
    claims: Mutex<NameClaims>,
}

struct PusherEntry {
    id: u64,
    last_data_ms: Arc<AtomicU64>,
    kill: Arc<Notify>,
}

pub struct RtmpShared {
    pub pushers: Pushers,
    /// The media workers: a pusher's packets go to its room's.
    pub media: crate::media::MediaPlane,
    pub bridge_config: BridgeConfig,
    pub epoch: Instant,
}

/// ACKs what was just read at once instead of up to 40 ms later. Clients with Nagle's
/// algorithm on (ffmpeg's, by default) send an RTMP command in several small segments
/// and hold each one back until the previous is acknowledged; with the delayed ACKs of
/// an interactive connection, every command round trip cost ~42 ms (three of them,
/// 130 ms, before a player's first frame). Linux resets the flag as it goes, so it is
/// set after every read.
fn quick_ack(socket: &impl RtmpSocket) {
    #[cfg(target_os = "linux")]
    let _ = socket2::SockRef::from(socket.tcp()).set_tcp_quickack(true);
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}

/// What an RTMP connection runs over: TCP, or TLS over TCP (RTMPS).
pub trait RtmpSocket: AsyncRead + AsyncWrite + Unpin + Send {
    /// The TCP connection underneath.
    fn tcp(&self) -> &TcpStream;
}

impl RtmpSocket for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl RtmpSocket for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// Sends a refusal and closes so that the client reads it. Closing a socket with
/// unread input makes the kernel send a reset, and a client still sending (ffmpeg
/// sends more after `play`) then loses the refusal, printing "Broken pipe" instead of
/// the reason. So: send, end our side, and discard what the client still sends, for a
/// bounded time and amount, until it closes too.
async fn close_after(socket: &mut impl RtmpSocket, refusal: &[u8]) {
    let _ = socket.write_all(refusal).await;
    let _ = socket.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut left: usize = 64 * 1024;
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while left > 0 {
        match tokio::time::timeout_at(until, socket.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => break,
        }
    }
}

/// Serves RTMP on `listener`, or RTMPS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<super::tls::Tls>>,
    state: Arc<AppState>,
    shared: Arc<RtmpShared>,
    limit: Arc<crate::limits::Connections>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let permit = match limit.admit(peer.ip()) {
                        Ok(p) => p,
                        Err(why) => {
                            debug!(%peer, why, "RTMP connection over the limit; closed");
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let state = state.clone();
                    let shared = shared.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let mut conn = Connection::new(state.clone(), shared, peer);
                        match tls {
                            None => {
                                state.metrics.rtmp_connections.with_label_values(&["handshake"]).inc();
                                conn.run(stream).await;
                            }
                            Some(tls) => {
                                let handshake = tls.rtmps_acceptor().accept(stream);
                                match tokio::time::timeout(super::tls::HANDSHAKE_TIMEOUT, handshake).await {
                                    Ok(Ok(s)) => {
                                        state.metrics.rtmp_connections.with_label_values(&["handshake"]).inc();
                                        conn.run(s).await;
                                    }
                                    // Nothing was counted or claimed: nothing to clean.
                                    Ok(Err(e)) => return debug!(%peer, error = %e, "RTMPS handshake failed"),
                                    Err(_) => return debug!(%peer, "RTMPS handshake timed out"),
                                }
                            }
                        }
                        conn.cleanup().await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    warn!(error = %e, "RTMP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
}

/// Why a publish or play was refused: the onStatus code and the description the client prints.
pub(super) struct Refusal {
    pub code: &'static str,
    pub outcome: &'static str,
    pub message: String,
}

impl Refusal {
    fn auth(message: impl Into<String>) -> Self {
        Self {
            code: "NetStream.Publish.Unauthorized",
            outcome: "unauthorized",
            message: message.into(),
        }
    }
}

/// What an authorized push URL grants.
struct PushGrant {
    sdk_app_id: u64,
    /// None: a room-service push URL, whose room an `add_pusher` names later.
    ticket: Option<RoomTicket>,
    stream: String,
    kinds: Vec<Kind>,
}

/// Query parameters from the publish name (`stream?a=b`) and the tcUrl/app.
pub(super) fn split_name_and_query(
    name: &str,
    tc_url: &str,
    app: &str,
) -> (String, Vec<(String, String)>) {
    let (stream, q) = name.split_once('?').unwrap_or((name, ""));
    let mut params: Vec<(String, String)> = url::form_urlencoded::parse(q.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    for extra in [tc_url, app] {
        if let Some((_, q)) = extra.split_once('?') {
            params.extend(
                url::form_urlencoded::parse(q.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned())),
            );
        }
    }
    // ffmpeg may append an extension it thinks the path has.
    let stream = stream.strip_suffix(".flv").unwrap_or(stream);
    (stream.to_owned(), params)
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn valid_stream_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Verifies `sdkappid`, `userid`, `roomid`|`strroomid`, `usersig`, `privatemapkey`.
/// A client (`ip`) whose checks keep failing is refused before the next one.
fn room_credentials(
    state: &AppState,
    ip: std::net::IpAddr,
    params: &[(String, String)],
    now: u64,
) -> Result<(u64, RoomTicket), Refusal> {
    state.may_verify(ip).map_err(|m| Refusal {
        code: "NetStream.Publish.Rejected",
        outcome: "throttled",
        message: m,
    })?;
    let checked = check_room_credentials(state, params, now);
    if checked.is_err() {
        state.verify_failed(ip);
    }
    checked
}

/// Room credentials in URL parameters (as on a push URL), checked now; the caller
/// applies the failed-check throttle (WHIP's query form).
pub(super) fn room_credentials_checked(
    state: &AppState,
    params: &[(String, String)],
) -> Result<(u64, RoomTicket), Refusal> {
    check_room_credentials(state, params, crate::auth::unix_now())
}

fn check_room_credentials(
    state: &AppState,
    params: &[(String, String)],
    now: u64,
) -> Result<(u64, RoomTicket), Refusal> {
    let user_sig = param(params, "usersig").ok_or_else(|| Refusal::auth("usersig is missing"))?;
    let sdk_app_id: u64 = param(params, "sdkappid")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Refusal::auth("sdkappid is missing or not a number"))?;
    let user_id = param(params, "userid")
        .filter(|u| !u.is_empty())
        .ok_or_else(|| Refusal::auth("userid is missing"))?;
    let room = match (param(params, "roomid"), param(params, "strroomid")) {
        (Some(n), None) => RoomId::Num(
            n.parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| Refusal::auth("roomid must be 1..=4294967295"))?,
        ),
        (None, Some(s)) if !s.is_empty() && s.len() <= 64 => RoomId::Str(s.to_owned()),
        _ => return Err(Refusal::auth("give exactly one of roomid or strroomid")),
    };
    let pmk =
        param(params, "privatemapkey").ok_or_else(|| Refusal::auth("privatemapkey is missing"))?;
    let app = state
        .keyring
        .app(sdk_app_id)
        .map_err(|e| Refusal::auth(e.to_string()))?;
    app.verify_user_sig(user_sig, user_id, now)
        .map_err(|e| Refusal::auth(format!("userSig: {e}")))?;
    let ticket = app
        .verify_private_map_key(pmk, user_id, &room, now)
        .map_err(|e| Refusal::auth(format!("privateMapKey: {e}")))?;
    Ok((sdk_app_id, ticket))
}

/// Who may play `stream`: room credentials with a receive privilege for the stream's
/// room, or a txSecret URL signed with the app's play key.
/// The backend's `on_play` hook, if configured, after Weir's own check.
pub(super) async fn ask_play(
    state: &AppState,
    ip: std::net::IpAddr,
    stream: &str,
    protocol: &str,
    source: Arc<crate::live::Source>,
) -> Result<Arc<crate::live::Source>, Refusal> {
    let place = state.hub.get(stream).map(|(_, place)| place);
    let asking = super::hooks::Asking {
        ip,
        stream,
        protocol,
        sdk_app_id: place.as_ref().map(|p| p.sdk_app_id),
        room_id: place.as_ref().map(|p| p.room.name()),
        user_id: None,
    };
    match super::hooks::Admission::may(&state.admission, super::hooks::Ask::Play, asking).await {
        Ok(()) => Ok(source),
        Err(why) => Err(Refusal {
            code: "NetStream.Play.Failed",
            outcome: "hook_refused",
            message: why,
        }),
    }
}

pub(super) fn authorize_play(
    state: &AppState,
    ip: std::net::IpAddr,
    stream: &str,
    params: &[(String, String)],
) -> Result<Arc<crate::live::Source>, Refusal> {
    let not_found = || Refusal {
        code: "NetStream.Play.StreamNotFound",
        outcome: "not_found",
        message: format!("stream {stream:?} is not live here"),
    };
    if !valid_stream_name(stream) {
        return Err(not_found());
    }
    let now = crate::auth::unix_now();
    let play_refusal = |m: String| Refusal {
        code: "NetStream.Play.Failed",
        outcome: "unauthorized",
        message: m,
    };
    if param(params, "usersig").is_some() {
        let (sdk_app_id, ticket) =
            room_credentials(state, ip, params, now).map_err(|r| play_refusal(r.message))?;
        if !ticket.privileges.contains(Privileges::RECV_AUDIO)
            && !ticket.privileges.contains(Privileges::RECV_VIDEO)
        {
            return Err(play_refusal(
                "the privateMapKey allows neither receiving audio (0x08) nor video (0x20)".into(),
            ));
        }
        let (source, place) = state.hub.get(stream).ok_or_else(not_found)?;
        if place.sdk_app_id != sdk_app_id || place.room != ticket.room {
            return Err(not_found());
        }
        return Ok(source);
    }
    if let (Some(secret), Some(time)) = (param(params, "txSecret"), param(params, "txTime")) {
        let (source, place) = state.hub.get(stream).ok_or_else(not_found)?;
        let app = state
            .keyring
            .app(place.sdk_app_id)
            .map_err(|e| play_refusal(e.to_string()))?;
        let key = app
            .live_key(crate::auth::live_url::LiveUrlKind::Play)
            .map_err(|e| play_refusal(e.to_string()))?;
        crate::auth::live_url::verify(
            crate::auth::live_url::LiveUrlKind::Play,
            key,
            app.play_url_validity_s,
            stream,
            secret,
            time,
            now,
        )
        .map_err(|e| play_refusal(e.to_string()))?;
        return Ok(source);
    }
    Err(play_refusal(
        "the play URL carries no credentials: add ?sdkappid=&userid=&roomid=&usersig=&privatemapkey= \
         or a txSecret/txTime signature"
            .into(),
    ))
}

fn authorize_push(
    state: &AppState,
    ip: std::net::IpAddr,
    app_name: &str,
    tc_url: &str,
    publish_name: &str,
) -> Result<PushGrant, Refusal> {
    let (stream, params) = split_name_and_query(publish_name, tc_url, app_name);
    if !valid_stream_name(&stream) {
        return Err(Refusal {
            code: "NetStream.Publish.BadName",
            outcome: "bad_name",
            message: format!(
                "stream name {stream:?} must be 1 to {MAX_NAME} characters of A-Z a-z 0-9 _ - ."
            ),
        });
    }
    let now = crate::auth::unix_now();
    if param(&params, "usersig").is_some() {
        let (sdk_app_id, ticket) = room_credentials(state, ip, &params, now)?;
        // A room-service stream name (`{sdkappid}_{userID}`) is its user's alone.
        if crate::weapp::push_stream_app(&stream).is_some()
            && stream != crate::weapp::push_stream_name(sdk_app_id, &ticket.identity.user_id)
        {
            return Err(Refusal {
                code: "NetStream.Publish.BadName",
                outcome: "name_owned",
                message: format!(
                    "stream name {stream:?} is a room-service name of another user: push {:?}",
                    crate::weapp::push_stream_name(sdk_app_id, &ticket.identity.user_id)
                ),
            });
        }
        ticket
            .require(Privileges::ENTER_ROOM)
            .map_err(|e| Refusal::auth(e.to_string()))?;
        let kinds: Vec<Kind> = [
            (Privileges::SEND_AUDIO, Kind::Audio),
            (Privileges::SEND_VIDEO, Kind::Video),
        ]
        .into_iter()
        .filter(|(p, _)| ticket.privileges.contains(*p))
        .map(|(_, k)| k)
        .collect();
        if kinds.is_empty() {
            return Err(Refusal::auth(
                "the privateMapKey allows neither sending audio (0x04) nor video (0x10)",
            ));
        }
        return Ok(PushGrant {
            sdk_app_id,
            ticket: Some(ticket),
            stream,
            kinds,
        });
    }
    if let (Some(secret), Some(time)) = (param(&params, "txSecret"), param(&params, "txTime")) {
        // A URL the room service handed out (`{sdkappid}_{userID}`): signed, so the
        // stream is that user's; its room is the one `add_pusher` binds it to.
        if let Some(sdk_app_id) = crate::weapp::push_stream_app(&stream) {
            let app = state
                .keyring
                .app(sdk_app_id)
                .map_err(|e| Refusal::auth(e.to_string()))?;
            let key = app
                .live_key(crate::auth::live_url::LiveUrlKind::Push)
                .map_err(|e| Refusal::auth(e.to_string()))?;
            crate::auth::live_url::verify(
                crate::auth::live_url::LiveUrlKind::Push,
                key,
                0,
                &stream,
                secret,
                time,
                now,
            )
            .map_err(|e| Refusal::auth(e.to_string()))?;
            return Ok(PushGrant {
                sdk_app_id,
                ticket: None,
                stream,
                kinds: vec![Kind::Audio, Kind::Video],
            });
        }
        let (sdk_app_id, room, user_id) = bound_stream(&stream).ok_or_else(|| {
            Refusal::auth(format!(
                "a txSecret push URL must name a stream bound to a room: \
                 {{sdkappid}}_{{roomid}}_{{userid}}[_main], not {stream:?}"
            ))
        })?;
        let app = state
            .keyring
            .app(sdk_app_id)
            .map_err(|e| Refusal::auth(e.to_string()))?;
        let key = app
            .live_key(crate::auth::live_url::LiveUrlKind::Push)
            .map_err(|e| Refusal::auth(e.to_string()))?;
        let valid_until = crate::auth::live_url::verify(
            crate::auth::live_url::LiveUrlKind::Push,
            key,
            0,
            &stream,
            secret,
            time,
            now,
        )
        .map_err(|e| Refusal::auth(e.to_string()))?;
        let privileges = Privileges::CREATE_ROOM
            | Privileges::ENTER_ROOM
            | Privileges::SEND_AUDIO
            | Privileges::SEND_VIDEO;
        let ticket = RoomTicket {
            identity: Identity {
                kind: TokenKind::LiveUrl,
                sdk_app_id,
                user_id,
                issued_at: now,
                expires_at: valid_until,
            },
            room: RoomId::Num(room),
            privileges,
            privilege_names: privileges.names(),
            room_expires_at: valid_until,
        };
        return Ok(PushGrant {
            sdk_app_id,
            ticket: Some(ticket),
            stream,
            kinds: vec![Kind::Audio, Kind::Video],
        });
    }
    Err(Refusal::auth(
        "the push URL carries no credentials: add ?sdkappid=&userid=&roomid=&usersig=&privatemapkey= \
         or a txSecret/txTime signature",
    ))
}

struct Connection {
    state: Arc<AppState>,
    shared: Arc<RtmpShared>,
    peer: SocketAddr,
    id: u64,
    role: &'static str,
    session: Option<SessionId>,
    stream: Option<String>,
    last_data_ms: Arc<AtomicU64>,
    kill: Arc<Notify>,
    bridge: Option<Bridge>,
    stats: bridge::Stats,
    leave: LeaveReason,
    /// This pusher's stream for RTMP and HTTP-FLV players.
    live: Option<Arc<crate::live::Source>>,
    /// A room-service push not yet in a room: its app, whether the control task was
    /// told (with the kinds), and the sequence headers and metadata seen so far (a
    /// bridge and players made at binding start from them).
    pending: Option<Pending>,
    /// The room a pending push joined (from its `joined`).
    bound_room: Option<RoomId>,
    /// Where the bridge's packets go: the media worker of the pusher's room.
    bridge_tx: Option<mpsc::Sender<BridgeInput>>,
}

struct Pending {
    sdk_app_id: u64,
    announced: bool,
    headers: Vec<Tag>,
}

/// An FLV sequence header (AVC decoder configuration, AAC AudioSpecificConfig).
fn is_sequence_header(kind: TagKind, data: &[u8]) -> bool {
    match kind {
        TagKind::Video => data.len() >= 2 && data[0] & 0x0f == 7 && data[1] == 0,
        TagKind::Audio => data.len() >= 2 && data[0] >> 4 == 10 && data[1] == 0,
        TagKind::Script => false,
    }
}

impl Connection {
    fn new(state: Arc<AppState>, shared: Arc<RtmpShared>, peer: SocketAddr) -> Self {
        let id = state.next_session.fetch_add(1, Ordering::Relaxed);
        Self {
            state,
            shared,
            peer,
            id,
            role: "handshake",
            session: None,
            stream: None,
            last_data_ms: Arc::new(AtomicU64::new(0)),
            kill: Arc::new(Notify::new()),
            bridge: None,
            stats: bridge::Stats::default(),
            leave: LeaveReason::Left,
            live: None,
            pending: None,
            bound_room: None,
            bridge_tx: None,
        }
    }

    fn set_role(&mut self, role: &'static str) {
        let m = &self.state.metrics.rtmp_connections;
        m.with_label_values(&[self.role]).dec();
        m.with_label_values(&[role]).inc();
        self.role = role;
    }

    fn now_ms(&self) -> u64 {
        self.shared.epoch.elapsed().as_millis() as u64
    }

    async fn run(&mut self, mut socket: impl RtmpSocket) {
        let mut rtmp = ServerSession::new(self.now_ms() as u32);
        let mut buf = vec![0u8; 64 * 1024];
        let mut app = String::new();
        let mut tc_url = String::new();
        let mut events_rx: Option<mpsc::Receiver<SessionEvent>> = None;
        let setup_deadline = Instant::now() + SETUP_TIMEOUT;
        let kill = self.kill.clone();
        // A room-service push waiting here for its room may be bound to a room on
        // another node (cluster): checked each second, and moved there.
        let mut bind_check = tokio::time::interval(Duration::from_secs(1));
        let mut publish_name = String::new();
        loop {
            let deadline = if self.session.is_none() {
                setup_deadline
            } else {
                Instant::now() + IDLE_TIMEOUT
            };
            let read = tokio::select! {
                r = tokio::time::timeout_at(deadline.into(), socket.read(&mut buf)) => r,
                Some(ev) = async {
                    match events_rx.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    match ev {
                        SessionEvent::Close(reason) => {
                            info!(peer = %self.peer, ?reason, "RTMP pusher closed by the room");
                            self.leave = reason;
                            return;
                        }
                        SessionEvent::Send(ServerMessage::Joined { room, .. }) if self.pending.is_some() => {
                            self.bound_room = crate::weapp::room_id_of(&room);
                        }
                        SessionEvent::Send(ServerMessage::Published { .. }) if self.pending.is_some() => {
                            self.start_bound();
                        }
                        SessionEvent::Send(ServerMessage::Error { message, .. }) if self.pending.is_some() => {
                            info!(peer = %self.peer, stream = ?self.stream, %message, "room-service push refused by its room; closed");
                            return;
                        }
                        SessionEvent::Send(_) => {}
                    }
                    continue;
                }
                _ = kill.notified() => {
                    info!(peer = %self.peer, stream = ?self.stream, "RTMP pusher replaced by a new connection for its stream");
                    self.leave = LeaveReason::Replaced;
                    return;
                }
                _ = bind_check.tick(), if self.pending.is_some() && self.state.cluster.is_some() => {
                    let cluster = self.state.cluster.clone().expect("checked");
                    let Some(stream) = self.stream.clone() else { continue };
                    if let Some(node) = cluster.push_bound_elsewhere(&stream).await {
                        let headers = self.pending.as_ref().map(|p| p.headers.clone()).unwrap_or_default();
                        let relay = self.relay(&node, &app, &publish_name);
                        super::rtmp_relay::push_moved(&relay, &mut socket, &mut rtmp, headers).await;
                        return;
                    }
                    continue;
                }
            };
            let n = match read {
                Err(_) => {
                    info!(peer = %self.peer, stream = ?self.stream, "RTMP connection silent too long; closed");
                    self.leave = LeaveReason::Timeout;
                    return;
                }
                Ok(Ok(0)) => return,
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    // A pusher's or player's connection reset is why its stream stopped:
                    // worth a line; a stranger's failed handshake is not.
                    if self.session.is_some() {
                        info!(peer = %self.peer, stream = ?self.stream, error = %e, "RTMP connection failed");
                    } else {
                        debug!(peer = %self.peer, error = %e, "RTMP read failed");
                    }
                    return;
                }
            };
            quick_ack(&socket);
            if let Err(e) = rtmp.handle_input(&buf[..n]) {
                warn!(peer = %self.peer, error = %e, "RTMP peer misbehaved; disconnected");
                return;
            }
            let arrived = Instant::now();
            while let Some(event) = rtmp.poll_event() {
                match event {
                    Event::Connect { app: a, tc_url: t } => {
                        debug!(peer = %self.peer, app = %a, tc_url = %t, "RTMP connect");
                        app = a;
                        tc_url = t;
                        rtmp.accept_connect();
                    }
                    Event::Publish { name } => {
                        if self.session.is_some() {
                            warn!(peer = %self.peer, "second publish on one connection; disconnected");
                            return;
                        }
                        publish_name = name.clone();
                        if let Some(node) = self.remote_room(&app, &tc_url, &name).await {
                            let relay = self.relay(&node, &app, &name);
                            super::rtmp_relay::push(&relay, &mut socket, &mut rtmp).await;
                            return;
                        }
                        match self.publish(&app, &tc_url, &name).await {
                            Ok((stream, rx)) => {
                                rtmp.accept_publish(&stream);
                                events_rx = Some(rx);
                            }
                            Err(r) => {
                                self.state
                                    .metrics
                                    .rtmp_requests
                                    .with_label_values(&["publish", r.outcome])
                                    .inc();
                                info!(peer = %self.peer, name = %name.split('?').next().unwrap_or(""), reason = %r.message, "RTMP publish refused");
                                rtmp.reject(r.code, &r.message);
                                close_after(&mut socket, &rtmp.take_output()).await;
                                return;
                            }
                        }
                    }
                    Event::Play { name } => {
                        let (stream, params) = split_name_and_query(&name, &tc_url, &app);
                        let authorized =
                            authorize_play(&self.state, self.peer.ip(), &stream, &params);
                        // Live on another node of the cluster: play it from there.
                        if let (Err(r), Some(cluster)) = (&authorized, self.state.cluster.clone()) {
                            if r.outcome == "not_found" {
                                if let Some(node) = cluster.stream_node(&stream).await {
                                    let relay = self.relay(&node, &app, &name);
                                    super::rtmp_relay::play(&relay, &mut socket, &mut rtmp).await;
                                    return;
                                }
                            }
                        }
                        let authorized = match authorized {
                            Ok(source) => {
                                ask_play(&self.state, self.peer.ip(), &stream, "rtmp", source).await
                            }
                            Err(r) => Err(r),
                        };
                        match authorized {
                            Ok(source) => {
                                self.state
                                    .metrics
                                    .play_requests
                                    .with_label_values(&["rtmp", "ok"])
                                    .inc();
                                info!(peer = %self.peer, %stream, "RTMP player playing");
                                rtmp.accept_play(&stream);
                                self.set_role("play");
                                let player = source.subscribe();
                                let gauge = self.state.metrics.players.with_label_values(&["rtmp"]);
                                gauge.inc();
                                self.play(&mut socket, &mut rtmp, player).await;
                                gauge.dec();
                                info!(peer = %self.peer, %stream, "RTMP player gone");
                            }
                            Err(r) => {
                                self.state
                                    .metrics
                                    .play_requests
                                    .with_label_values(&["rtmp", r.outcome])
                                    .inc();
                                info!(peer = %self.peer, %stream, reason = %r.message, "RTMP play refused");
                                rtmp.reject(r.code, &r.message);
                                close_after(&mut socket, &rtmp.take_output()).await;
                            }
                        }
                        return;
                    }
                    Event::Video { timestamp, data } => {
                        self.last_data_ms.store(self.now_ms(), Ordering::Relaxed);
                        self.note_pending(TagKind::Video, timestamp, &data, None)
                            .await;
                        if let Some(b) = self.bridge.as_mut() {
                            b.handle_video(timestamp, &data, arrived);
                        }
                        if let Some(live) = &self.live {
                            live.push(Tag {
                                kind: TagKind::Video,
                                timestamp,
                                data,
                            });
                        }
                    }
                    Event::Audio { timestamp, data } => {
                        self.last_data_ms.store(self.now_ms(), Ordering::Relaxed);
                        self.note_pending(TagKind::Audio, timestamp, &data, None)
                            .await;
                        if let Some(b) = self.bridge.as_mut() {
                            b.handle_audio(timestamp, &data, arrived);
                        }
                        if let Some(live) = &self.live {
                            live.push(Tag {
                                kind: TagKind::Audio,
                                timestamp,
                                data,
                            });
                        }
                    }
                    Event::Data { values } => {
                        debug!(peer = %self.peer, metadata = %values.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(" "), "RTMP data message");
                        // `@setDataFrame onMetaData {…}` is stored as `onMetaData {…}`.
                        let values = match values.first().and_then(Amf0::as_str) {
                            Some("@setDataFrame") => values[1..].to_vec(),
                            _ => values,
                        };
                        if values.first().and_then(Amf0::as_str) == Some("onMetaData") {
                            let meta = Bytes::from(amf0::encode_all(&values));
                            let kinds = values.get(1).map(|m| {
                                (
                                    m.get("audiocodecid").is_some(),
                                    m.get("videocodecid").is_some(),
                                )
                            });
                            self.note_pending(TagKind::Script, 0, &meta, kinds).await;
                        }
                        if let (Some(live), Some("onMetaData")) =
                            (&self.live, values.first().and_then(Amf0::as_str))
                        {
                            live.push(Tag {
                                kind: TagKind::Script,
                                timestamp: 0,
                                data: Bytes::from(amf0::encode_all(&values)),
                            });
                        }
                    }
                    Event::Unpublish => {
                        info!(peer = %self.peer, stream = ?self.stream, "RTMP pusher unpublished");
                        return;
                    }
                }
            }
            self.drain_bridge();
            if rtmp.has_output() && socket.write_all(&rtmp.take_output()).await.is_err() {
                return;
            }
        }
    }

    /// This connection, relayed to `node` from now on.
    fn relay<'a>(
        &'a mut self,
        node: &'a crate::cluster::NodeRecord,
        app: &'a str,
        name: &'a str,
    ) -> super::rtmp_relay::Relay<'a> {
        self.set_role("relay");
        super::rtmp_relay::Relay {
            epoch: self.now_ms() as u32,
            state: &self.state,
            node,
            app,
            name,
            peer: self.peer,
        }
    }

    /// In a cluster: the node serving the room a push's room credentials name, when
    /// that is another node (None: serve it here, or let `publish` refuse it).
    async fn remote_room(
        &mut self,
        app: &str,
        tc_url: &str,
        name: &str,
    ) -> Option<Box<crate::cluster::NodeRecord>> {
        let cluster = self.state.cluster.as_ref()?;
        let (_, params) = split_name_and_query(name, tc_url, app);
        param(&params, "usersig")?;
        // Nothing reaches Redis before the credentials verify; a failure is left to
        // `publish`, which counts it.
        self.state.may_verify(self.peer.ip()).ok()?;
        let (sdk_app_id, ticket) =
            check_room_credentials(&self.state, &params, crate::auth::unix_now()).ok()?;
        let key = crate::room::RoomKey {
            sdk_app_id,
            room: ticket.room,
        };
        match cluster.route(&key).await {
            Ok(crate::cluster::Route::Remote(node)) => Some(node),
            _ => None,
        }
    }

    /// Authorizes, takes the stream name, joins the room and publishes.
    async fn publish(
        &mut self,
        app: &str,
        tc_url: &str,
        name: &str,
    ) -> Result<(String, mpsc::Receiver<SessionEvent>), Refusal> {
        if let Some(why) = self.state.unavailable() {
            return Err(Refusal {
                code: "NetStream.Publish.Rejected",
                outcome: "unavailable",
                message: why,
            });
        }
        let grant = authorize_push(&self.state, self.peer.ip(), app, tc_url, name)?;
        let asking = super::hooks::Asking {
            ip: self.peer.ip(),
            stream: &grant.stream,
            protocol: "rtmp",
            sdk_app_id: Some(grant.sdk_app_id),
            room_id: grant.ticket.as_ref().map(|t| t.room.name()),
            user_id: grant.ticket.as_ref().map(|t| t.identity.user_id.as_str()),
        };
        let asked =
            super::hooks::Admission::may(&self.state.admission, super::hooks::Ask::Publish, asking)
                .await;
        if let Err(why) = asked {
            return Err(Refusal {
                code: "NetStream.Publish.Rejected",
                outcome: "hook_refused",
                message: why,
            });
        }
        let Some(ticket) = grant.ticket else {
            return self.publish_pending(grant.sdk_app_id, grant.stream).await;
        };
        let owner = Owner {
            sdk_app_id: grant.sdk_app_id,
            room: ticket.room.clone(),
            user_id: ticket.identity.user_id.clone(),
        };
        let claimed = self
            .shared
            .pushers
            .claims
            .lock()
            .expect("claims lock")
            .claim(&grant.stream, &owner, self.now_ms());
        if let Err(e) = claimed {
            return Err(Refusal {
                code: "NetStream.Publish.BadName",
                outcome: "name_owned",
                message: format!("{e}: push it with that member's credentials, or another name"),
            });
        }
        self.take_name(&grant.stream).await?;
        self.stream = Some(grant.stream.clone());
        let session = SessionId(self.id);
        let (tx, mut rx) = mpsc::channel(self.state.session_queue);
        let control = &self.state.control;
        let _ = control.send(ControlCommand::Open { session, tx }).await;
        self.session = Some(session);
        self.bridge_tx = Some(self.shared.media.bridge_for(&crate::room::RoomKey {
            sdk_app_id: grant.sdk_app_id,
            room: ticket.room.clone(),
        }));
        let user = ticket.identity.user_id.clone();
        let room = ticket.room.to_string();
        let place = crate::live::StreamPlace {
            sdk_app_id: grant.sdk_app_id,
            room: ticket.room.clone(),
        };
        let _ = control
            .send(ControlCommand::Join {
                session,
                sdk_app_id: grant.sdk_app_id,
                ticket: Box::new(ticket),
                auto_subscribe: false,
                congestion_policy: None,
                push: true,
                edge_of: None,
            })
            .await;
        let _ = control
            .send(ControlCommand::PublishAs {
                session,
                stream_id: grant.stream.clone(),
                source: "rtmp",
                audio: grant.kinds.contains(&Kind::Audio),
                video: grant.kinds.contains(&Kind::Video),
            })
            .await;
        // The room answers joined, then published, or an error.
        let answer = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(ev) = rx.recv().await {
                match ev {
                    SessionEvent::Send(ServerMessage::Published { .. }) => return Ok(()),
                    SessionEvent::Send(ServerMessage::Error { code, message, .. }) => {
                        return Err((u16::from(code), message))
                    }
                    SessionEvent::Close(reason) => {
                        return Err((503, format!("closed by the room: {reason:?}")))
                    }
                    SessionEvent::Send(_) => {}
                }
            }
            Err((503, "the control plane is gone".into()))
        })
        .await
        .unwrap_or_else(|_| Err((503, "the room did not answer in time".into())));
        if let Err((code, message)) = answer {
            return Err(Refusal {
                code: if code == 423 {
                    "NetStream.Publish.BadName"
                } else {
                    "NetStream.Publish.Rejected"
                },
                outcome: match code {
                    403 => "missing_privilege",
                    423 => "name_taken",
                    429 => "limit",
                    _ => "rejected",
                },
                message,
            });
        }
        self.state
            .metrics
            .rtmp_requests
            .with_label_values(&["publish", "ok"])
            .inc();
        self.set_role("publish");
        info!(peer = %self.peer, session = session.0, stream = %grant.stream, %user, %room, "RTMP pusher publishing");
        let ntp_now = bridge::ntp_from_unix_micros(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0),
        );
        self.live = Some(self.state.hub.open(&grant.stream, place));
        self.bridge = Some(Bridge::new(
            self.shared.bridge_config.clone(),
            Instant::now(),
            ntp_now,
        ));
        Ok((grant.stream, rx))
    }

    /// A room-service push: accepted now, in no room until an `add_pusher` binds it
    /// (the components push first and register the push URL after it started).
    async fn publish_pending(
        &mut self,
        sdk_app_id: u64,
        stream: String,
    ) -> Result<(String, mpsc::Receiver<SessionEvent>), Refusal> {
        self.take_name(&stream).await?;
        self.stream = Some(stream.clone());
        let session = SessionId(self.id);
        let (tx, rx) = mpsc::channel(self.state.session_queue);
        let _ = self
            .state
            .control
            .send(ControlCommand::Open { session, tx })
            .await;
        self.session = Some(session);
        self.pending = Some(Pending {
            sdk_app_id,
            announced: false,
            headers: Vec::new(),
        });
        self.set_role("publish");
        self.state
            .metrics
            .rtmp_requests
            .with_label_values(&["publish", "ok"])
            .inc();
        info!(peer = %self.peer, session = session.0, %stream, "RTMP room-service push accepted; it joins the room add_pusher names");
        Ok((stream, rx))
    }

    /// While a room-service push waits for its room: keeps its sequence headers and
    /// metadata, and tells the control task about it once what it carries is known
    /// (from the metadata, or the first media tag: then audio and video).
    async fn note_pending(
        &mut self,
        kind: TagKind,
        timestamp: u32,
        data: &Bytes,
        kinds: Option<(bool, bool)>,
    ) {
        let (Some(p), Some(session), Some(stream)) =
            (self.pending.as_mut(), self.session, self.stream.clone())
        else {
            return;
        };
        if self.bridge.is_some() {
            return;
        }
        if kind == TagKind::Script || is_sequence_header(kind, data) {
            p.headers.retain(|t| {
                t.kind != kind || (kind != TagKind::Script && !is_sequence_header(kind, &t.data))
            });
            if p.headers.len() < 8 {
                p.headers.push(Tag {
                    kind,
                    timestamp,
                    data: data.clone(),
                });
            }
        }
        if p.announced {
            return;
        }
        let (audio, video) = match kinds {
            Some((a, v)) if a || v => (a, v),
            _ => (true, true),
        };
        p.announced = true;
        let sdk_app_id = p.sdk_app_id;
        let _ = self
            .state
            .control
            .send(ControlCommand::PushPending {
                session,
                stream,
                sdk_app_id,
                audio,
                video,
            })
            .await;
    }

    /// A pending push was published in its room: players and the bridge start, from
    /// the sequence headers kept.
    fn start_bound(&mut self) {
        let (Some(p), Some(stream), Some(room)) = (
            self.pending.take(),
            self.stream.clone(),
            self.bound_room.clone(),
        ) else {
            return;
        };
        info!(peer = %self.peer, %stream, room = %room, "RTMP room-service push publishing in its room");
        self.bridge_tx = Some(self.shared.media.bridge_for(&crate::room::RoomKey {
            sdk_app_id: p.sdk_app_id,
            room: room.clone(),
        }));
        let ntp_now = bridge::ntp_from_unix_micros(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as u64)
                .unwrap_or(0),
        );
        let live = self.state.hub.open(
            &stream,
            crate::live::StreamPlace {
                sdk_app_id: p.sdk_app_id,
                room,
            },
        );
        let mut b = Bridge::new(self.shared.bridge_config.clone(), Instant::now(), ntp_now);
        let now = Instant::now();
        for t in p.headers {
            match t.kind {
                TagKind::Video => b.handle_video(t.timestamp, &t.data, now),
                TagKind::Audio => b.handle_audio(t.timestamp, &t.data, now),
                TagKind::Script => {}
            }
            live.push(t);
        }
        self.live = Some(live);
        self.bridge = Some(b);
        self.drain_bridge();
    }

    /// Sends a stream's tags to an RTMP player until either side ends.
    async fn play(
        &mut self,
        socket: &mut impl RtmpSocket,
        rtmp: &mut ServerSession,
        player: crate::live::Player,
    ) {
        let mut buf = vec![0u8; 4096];
        loop {
            if rtmp.has_output() && socket.write_all(&rtmp.take_output()).await.is_err() {
                return;
            }
            tokio::select! {
                r = socket.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        quick_ack(socket);
                        if let Err(e) = rtmp.handle_input(&buf[..n]) {
                            warn!(peer = %self.peer, error = %e, "RTMP player misbehaved; disconnected");
                            return;
                        }
                        while let Some(ev) = rtmp.poll_event() {
                            if matches!(ev, Event::Unpublish) {
                                return;
                            }
                        }
                    }
                },
                next = player.next() => match next {
                    crate::live::Next::Closed => return,
                    crate::live::Next::Tags(tags) => {
                        for t in tags {
                            rtmp.send_media(t.kind as u8, t.timestamp, t.data);
                        }
                    }
                },
            }
        }
    }

    /// Registers this connection as the stream name's pusher, replacing a stale one.
    async fn take_name(&mut self, stream: &str) -> Result<(), Refusal> {
        for _ in 0..40 {
            {
                let mut map = self.shared.pushers.inner.lock().expect("pushers lock");
                match map.get(stream) {
                    None => {
                        self.last_data_ms.store(self.now_ms(), Ordering::Relaxed);
                        map.insert(
                            stream.to_owned(),
                            PusherEntry {
                                id: self.id,
                                last_data_ms: self.last_data_ms.clone(),
                                kill: self.kill.clone(),
                            },
                        );
                        return Ok(());
                    }
                    Some(old) => {
                        let silent = self
                            .now_ms()
                            .saturating_sub(old.last_data_ms.load(Ordering::Relaxed));
                        if silent < STALE_PUSHER.as_millis() as u64 {
                            return Err(Refusal {
                                code: "NetStream.Publish.BadName",
                                outcome: "name_taken",
                                message: format!("stream {stream:?} is already being pushed"),
                            });
                        }
                        // The old pusher is gone but not yet noticed: end it and wait.
                        old.kill.notify_one();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(Refusal {
            code: "NetStream.Publish.BadName",
            outcome: "name_taken",
            message: format!("stream {stream:?} is still held by a previous pusher"),
        })
    }

    /// Hands the bridge's output to the media plane and its counters to metrics.
    fn drain_bridge(&mut self) {
        let (Some(b), Some(session)) = (self.bridge.as_mut(), self.session) else {
            return;
        };
        let metrics = &self.state.metrics;
        while let Some(out) = b.poll_output() {
            let input = match out {
                bridge::Output::Track { kind, codec } => {
                    info!(session = session.0, ?kind, codec = %codec.mime_type, fmtp = %codec.sdp_fmtp_line, "bridged track ready");
                    BridgeInput::Track {
                        session,
                        kind,
                        codec,
                    }
                }
                bridge::Output::Rtp {
                    kind,
                    packet,
                    keyframe,
                    arrived,
                } => BridgeInput::Rtp {
                    session,
                    kind,
                    packet,
                    keyframe,
                    arrived,
                },
                bridge::Output::SenderReport { kind, report } => BridgeInput::SenderReport {
                    session,
                    kind,
                    report,
                },
                bridge::Output::Refused { kind, reason } => {
                    warn!(session = session.0, stream = ?self.stream, ?kind, %reason, "RTMP media not bridged");
                    metrics
                        .bridge_refused
                        .with_label_values(&[crate::media::kind_label(kind)])
                        .inc();
                    continue;
                }
            };
            // Media never waits: a full queue drops (the receiver recovers at a keyframe).
            if self
                .bridge_tx
                .as_ref()
                .is_none_or(|tx| tx.try_send(input).is_err())
            {
                metrics.bridge_queue_drops.inc();
            }
        }
        let s = b.stats;
        let d = |new: u64, old: u64| new.saturating_sub(old);
        let frames = &metrics.bridge_frames;
        frames
            .with_label_values(&["video", "forwarded"])
            .inc_by(d(s.video_frames, self.stats.video_frames));
        frames
            .with_label_values(&["audio", "forwarded"])
            .inc_by(d(s.audio_frames, self.stats.audio_frames));
        frames
            .with_label_values(&["video", "b_frame_dropped"])
            .inc_by(d(s.b_frames_dropped, self.stats.b_frames_dropped));
        frames
            .with_label_values(&["video", "b_frame_reference_forwarded"])
            .inc_by(d(s.b_frames_forwarded, self.stats.b_frames_forwarded));
        frames
            .with_label_values(&["any", "skipped_lag"])
            .inc_by(d(s.frames_skipped_lag, self.stats.frames_skipped_lag));
        frames
            .with_label_values(&["audio", "decode_error"])
            .inc_by(d(s.audio_decode_errors, self.stats.audio_decode_errors));
        metrics
            .bridge_audio_reanchors
            .inc_by(d(s.audio_reanchors, self.stats.audio_reanchors));
        self.stats = s;
    }

    async fn cleanup(&mut self) {
        if let (Some(live), Some(stream)) = (self.live.take(), &self.stream) {
            self.state.hub.close(stream, &live);
        }
        self.state
            .metrics
            .rtmp_connections
            .with_label_values(&[self.role])
            .dec();
        if let Some(stream) = &self.stream {
            let mut map = self.shared.pushers.inner.lock().expect("pushers lock");
            if map.get(stream).is_some_and(|e| e.id == self.id) {
                map.remove(stream);
                let now = self.now_ms();
                let mut claims = self.shared.pushers.claims.lock().expect("claims lock");
                claims.release(stream, now);
            }
        }
        if let Some(session) = self.session {
            if let Some(tx) = &self.bridge_tx {
                let _ = tx.send(BridgeInput::Gone { session }).await;
            }
            let _ = self
                .state
                .control
                .send(ControlCommand::Closed {
                    session,
                    reason: self.leave,
                })
                .await;
            info!(peer = %self.peer, session = session.0, stream = ?self.stream, "RTMP pusher gone");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_queries() {
        let (s, q) =
            split_name_and_query("cam1?usersig=a%2Ab&roomid=7", "rtmp://h/live?x=1", "live");
        assert_eq!(s, "cam1");
        assert_eq!(param(&q, "UserSig"), Some("a*b"));
        assert_eq!(param(&q, "x"), Some("1"));
        assert!(valid_stream_name("1400000000_1234_alice_main"));
        assert!(!valid_stream_name("a/b"));
        assert!(!valid_stream_name(""));
        assert_eq!(
            bound_stream("1400000000_1234_user_a_main"),
            Some((1_400_000_000, 1234, "user_a".into()))
        );
        assert_eq!(bound_stream("1400000000_x_alice"), None);
        assert_eq!(bound_stream("test"), None);
    }
}
