//! WHIP ingest (RFC 9725) and WHEP playback (draft-ietf-wish-whep): a publisher or
//! player with no SDK (OBS, GStreamer, a plain browser page) POSTs its SDP offer and
//! gets the answer. The HTTP shell over the same control plane as a websocket
//! session: such a client is a room member like any other (browsers subscribe to a
//! WHIP publisher, RTMP/FLV players play it; a WHEP player is a subscriber under
//! congestion control and simulcast); its "socket" is the resource the `Location`
//! header names, and `DELETE` on it is its `leave`.
//!
//! - `POST /whip`, `POST /whep/<stream>`: `Content-Type: application/sdp`, the offer
//!   in the body (≤ [`MAX_OFFER_BYTES`]). Credentials: `Authorization: Bearer
//!   <privateMapKey JWT>` (a JWT privateMapKey names its app, user, room and
//!   privileges, and is signed by the app's key), or the query string an RTMP push URL
//!   carries (`?sdkappid=&userid=&roomid=|strroomid=&usersig=&privatemapkey=`).
//!   Answered `201 Created` with the answer, `Location: /whip|whep/resource/<id>`, an
//!   `ETag`, `Link` headers naming the ICE servers (TURN with credentials), and CORS
//!   headers exposing them. The answer carries every server candidate with
//!   end-of-candidates, so a client that never trickles (OBS) connects, and one whose
//!   offer has no candidates is reached through its own connectivity checks.
//! - `DELETE …/resource/<id>`: the member leaves; `200`.
//! - `PATCH …/resource/<id>` with an RFC 8840 fragment
//!   (`application/trickle-ice-sdpfrag`, `If-Match` optional): its candidates reach
//!   the connection, `204`. A fragment with a new `ice-ufrag` and `ice-pwd` is an ICE
//!   restart (RFC 9725 §4.4.1): the connection restarts with the client's new
//!   credentials (its last offer, re-applied with them) and the answer is `200` with
//!   a fragment of the server's new `ice-ufrag`, `ice-pwd` and candidates, and a new
//!   `ETag`; a later `If-Match` must name it.
//! - `OPTIONS`: CORS preflight for browser clients.
//!
//! Errors: `401` (missing or invalid credentials; the failed-check throttle applies),
//! `403` (no send or receive privilege), `404` (no such stream or resource), `412`
//! (a stale `If-Match`), `413` (too large), `415` (the wrong content type),
//! `400`/`422` (an offer that does not apply), `429` (a limit), `503` (draining).
//! A WHIP stream is the member's `{sdkappid}_{room}_{user}_main`; a member leaves when
//! its media fails (ICE consent), as any other.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use tracing::info;
use weir_signaling::{ClientMessage, ErrorCode, IceCandidate, LeaveReason, ServerMessage, Target};

use super::control::{ControlCommand, SessionEvent};
use super::hooks::{Admission, Ask};
use super::http::PeerAddr;
use super::AppState;
use crate::auth::{RoomId, RoomTicket};
use crate::room::SessionId;

/// The largest offer taken (a browser's offer with simulcast is ~10 KiB).
pub const MAX_OFFER_BYTES: usize = 64 * 1024;
/// WHIP resources at once on a node (each is also a member, within the room limits).
pub const MAX_RESOURCES: usize = 10_000;
/// How long the room may take to answer each step.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The WHIP and WHEP resources alive on this node, by id.
#[derive(Default)]
pub struct Resources(Mutex<HashMap<String, Resource>>);

/// One resource: its member's session, which of its connections the resource is, the
/// client's ICE username fragment (a PATCH naming another is an ICE restart), the
/// offer last applied (an ICE restart re-applies it with new credentials), the ICE
/// session's ETag, and where a PATCH waits for the room's answer.
#[derive(Debug, Clone)]
pub struct Resource {
    session: SessionId,
    target: Target,
    ufrag: Option<String>,
    offer: String,
    etag: String,
    answers: Option<mpsc::Sender<AnswerWaiter>>,
}

/// A PATCH waiting for the answer to its ICE restart.
type AnswerWaiter = tokio::sync::oneshot::Sender<Result<String, (ErrorCode, String)>>;

impl Resource {
    fn new(session: SessionId, target: Target, offer: &str) -> Self {
        Self {
            session,
            target,
            ufrag: sdp_ufrag(offer),
            offer: offer.to_owned(),
            etag: String::new(),
            answers: None,
        }
    }
}

impl Resources {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Resource>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Candidates a trickle PATCH carries (RFC 8840 `application/trickle-ice-sdpfrag`).
#[derive(Debug, Default, PartialEq)]
pub struct Trickle {
    pub ufrag: Option<String>,
    /// Only in an ICE restart's fragment.
    pub pwd: Option<String>,
    pub candidates: Vec<IceCandidate>,
    pub end: bool,
}

/// The most candidates one PATCH may carry.
pub const MAX_TRICKLE_CANDIDATES: usize = 64;

/// Reads an SDP fragment: `a=ice-ufrag`, and per media section (`m=`, `a=mid:`) its
/// `a=candidate` and `a=end-of-candidates` lines; everything else is ignored. Linear
/// in its input; at most [`MAX_TRICKLE_CANDIDATES`] candidates.
pub fn trickle_fragment(body: &str) -> Result<Trickle, String> {
    let mut t = Trickle::default();
    let mut section: Option<u16> = None;
    let mut mid: Option<String> = None;
    for line in body.lines() {
        let line = line.trim_end();
        if line.starts_with("m=") {
            section = Some(section.map_or(0, |s| s.saturating_add(1)));
            mid = None;
        } else if let Some(v) = line.strip_prefix("a=mid:") {
            mid = Some(v.to_owned());
        } else if let Some(v) = line.strip_prefix("a=ice-ufrag:") {
            if t.ufrag.as_deref().is_some_and(|u| u != v) {
                return Err("two different ice-ufrag values in one fragment".into());
            }
            t.ufrag = Some(v.to_owned());
        } else if let Some(v) = line.strip_prefix("a=ice-pwd:") {
            if t.pwd.as_deref().is_some_and(|p| p != v) {
                return Err("two different ice-pwd values in one fragment".into());
            }
            t.pwd = Some(v.to_owned());
        } else if let Some(c) = line.strip_prefix("a=") {
            if c.starts_with("candidate:") {
                if t.candidates.len() >= MAX_TRICKLE_CANDIDATES {
                    return Err(format!("more than {MAX_TRICKLE_CANDIDATES} candidates"));
                }
                t.candidates.push(IceCandidate {
                    candidate: c.to_owned(),
                    sdp_mid: mid.clone(),
                    sdp_m_line_index: section,
                    username_fragment: None,
                });
            } else if c == "end-of-candidates" {
                t.end = true;
            }
        }
    }
    for c in &mut t.candidates {
        c.username_fragment = t.ufrag.clone();
    }
    Ok(t)
}

/// The `a=ice-ufrag` of an SDP (the first one).
fn sdp_ufrag(sdp: &str) -> Option<String> {
    sdp.lines()
        .find_map(|l| l.trim_end().strip_prefix("a=ice-ufrag:"))
        .map(str::to_owned)
}

/// A WHIP error: a status and a plain-text reason.
fn refuse(status: StatusCode, why: impl Into<String>) -> Response {
    let mut r = (status, format!("{}\n", why.into())).into_response();
    cors(r.headers_mut());
    r
}

fn cors(h: &mut HeaderMap) {
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Location, ETag, Link"),
    );
}

/// `OPTIONS`: what a browser's preflight asks.
pub async fn options() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    cors(h);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, DELETE, PATCH, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type, If-Match"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    h.insert("Accept-Post", HeaderValue::from_static("application/sdp"));
    r
}

/// Who is publishing: from the bearer privateMapKey JWT, or RTMP-style query credentials.
fn credentials(
    state: &AppState,
    ip: std::net::IpAddr,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<(u64, RoomTicket), Box<Response>> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let params: Vec<(String, String)> = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let unauthorized = |why: String| {
        let mut r = refuse(StatusCode::UNAUTHORIZED, why);
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        r
    };
    if bearer.is_none() && !params.iter().any(|(k, _)| k == "usersig") {
        return Err(Box::new(unauthorized(
            "no credentials: send Authorization: Bearer <privateMapKey JWT>, or \
             ?sdkappid=&userid=&roomid=&usersig=&privatemapkey="
                .into(),
        )));
    }
    state
        .may_verify(ip)
        .map_err(|why| Box::new(unauthorized(why)))?;
    let checked = match bearer {
        Some(token) => bearer_ticket(state, token),
        None => super::rtmp::room_credentials_checked(state, &params).map_err(|r| r.message),
    };
    checked.map_err(|why| {
        state.verify_failed(ip);
        Box::new(unauthorized(why))
    })
}

fn bearer_ticket(state: &AppState, token: &str) -> Result<(u64, RoomTicket), String> {
    if !crate::auth::jwt::looks_like_jwt(token) {
        return Err(
            "the bearer token must be a privateMapKey JWT (weir token privatemapkey --kind jwt)"
                .into(),
        );
    }
    let claims = crate::auth::jwt::peek_claims(token).map_err(|e| e.to_string())?;
    let room: RoomId = claims.room().map_err(|e| e.to_string())?;
    let app = state
        .keyring
        .app(claims.sdkappid)
        .map_err(|e| e.to_string())?;
    let ticket = app
        .verify_private_map_key(token, &claims.sub, &room, crate::auth::unix_now())
        .map_err(|e| format!("privateMapKey: {e}"))?;
    Ok((claims.sdkappid, ticket))
}

/// What the room answered, or why not.
async fn next_answer<T>(
    rx: &mut mpsc::Receiver<SessionEvent>,
    mut pick: impl FnMut(&ServerMessage) -> Option<T>,
) -> Result<T, (ErrorCode, String)> {
    let wait = async {
        while let Some(ev) = rx.recv().await {
            match ev {
                SessionEvent::Send(ServerMessage::Error { code, message, .. }) => {
                    return Err((code, message))
                }
                SessionEvent::Send(m) => {
                    if let Some(t) = pick(&m) {
                        return Ok(t);
                    }
                }
                SessionEvent::Close(reason) => {
                    return Err((ErrorCode::Unavailable, format!("closed: {reason:?}")))
                }
            }
        }
        Err((ErrorCode::Unavailable, "the room closed the session".into()))
    };
    tokio::time::timeout(STEP_TIMEOUT, wait)
        .await
        .unwrap_or_else(|_| Err((ErrorCode::Unavailable, "the room did not answer".into())))
}

fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::InvalidUserSig | ErrorCode::InvalidPrivateMapKey => StatusCode::UNAUTHORIZED,
        ErrorCode::MissingPrivilege => StatusCode::FORBIDDEN,
        ErrorCode::LimitExceeded => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Negotiation | ErrorCode::BadRequest => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// In a cluster, a WHIP or WHEP offer for a room another node serves is forwarded
/// there (the same request, `X-Forwarded-For` naming the client) and its answer
/// returned with an absolute `Location`, so the client's later `PATCH` and `DELETE`
/// go to that node. (A redirect would do, but a browser drops `Authorization` on a
/// redirect to another origin.)
async fn forwarded(
    state: &AppState,
    peer: std::net::IpAddr,
    sdk_app_id: u64,
    ticket: &RoomTicket,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Option<Response> {
    let cluster = state.cluster.as_ref()?;
    let key = crate::room::RoomKey {
        sdk_app_id,
        room: ticket.room.clone(),
    };
    let node = match cluster.route(&key).await {
        Ok(crate::cluster::Route::Local) => return None,
        Ok(crate::cluster::Route::Remote(node)) => node,
        Err(why) => return Some(refuse(StatusCode::SERVICE_UNAVAILABLE, why)),
    };
    let url = format!(
        "{}{}",
        node.addresses.http,
        uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut request = cluster
        .http
        .post(&url)
        .timeout(std::time::Duration::from_secs(10))
        .header("x-forwarded-for", peer.to_string())
        .body(body.clone());
    for name in [header::AUTHORIZATION, header::CONTENT_TYPE] {
        if let Some(v) = headers.get(&name).and_then(|v| v.to_str().ok()) {
            request = request.header(name.as_str(), v);
        }
    }
    let answer = match request.send().await {
        Ok(a) => a,
        Err(e) => {
            cluster.suspect(&node);
            return Some(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "the room's node {} cannot be reached now ({e}); try again",
                    node.id
                ),
            ));
        }
    };
    tracing::info!(node = %node.id, status = answer.status().as_u16(), "WHIP/WHEP offer forwarded to the room's node");
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut out = HeaderMap::new();
    for (name, value) in answer.headers() {
        let keep = [
            header::CONTENT_TYPE,
            header::ETAG,
            header::LINK,
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
        ];
        if let Some(k) = keep.iter().find(|k| k.as_str() == name.as_str()) {
            if let Ok(v) = HeaderValue::from_bytes(value.as_bytes()) {
                out.append(k.clone(), v);
            }
        } else if name.as_str() == "location" {
            let loc = value.to_str().unwrap_or("");
            let absolute = if loc.starts_with('/') {
                format!("{}{loc}", node.addresses.http)
            } else {
                loc.to_owned()
            };
            if let Ok(v) = HeaderValue::from_str(&absolute) {
                out.insert(header::LOCATION, v);
            }
        }
    }
    let body = answer.bytes().await.unwrap_or_default();
    let mut r = (status, body).into_response();
    r.headers_mut().extend(out);
    Some(r)
}

/// `POST /whip`: join, publish what the offer sends, answer it.
pub async fn publish(
    State(state): State<Arc<AppState>>,
    axum::Extension(PeerAddr(peer)): axum::Extension<PeerAddr>,
    uri: axum::http::Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let count = |outcome: &str| {
        state
            .metrics
            .whip_requests
            .with_label_values(&[outcome])
            .inc()
    };
    let (sdk_app_id, ticket, offer) =
        match admit(&state, peer.ip(), query.as_deref(), &headers, &body, "WHIP") {
            Ok(a) => a,
            Err((outcome, r)) => {
                count(outcome);
                return *r;
            }
        };
    if let Some(r) = forwarded(
        &state,
        peer.ip(),
        sdk_app_id,
        &ticket,
        &uri,
        &headers,
        &body,
    )
    .await
    {
        count("forwarded");
        return r;
    }
    let kinds = crate::media::offered_send_kinds(offer);
    if kinds.is_empty() {
        count("bad_request");
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the offer sends no audio or video (WHIP publishes: sendonly or sendrecv m-lines)",
        );
    }
    let user = ticket.identity.user_id.clone();
    let room = ticket.room.to_string();
    let key = crate::room::RoomKey {
        sdk_app_id,
        room: ticket.room.clone(),
    };
    let stream = crate::room::stream_id_for(&key, &user);
    if let Err(why) = Admission::for_room(
        &state.admission,
        peer.ip(),
        Ask::Publish,
        &stream,
        "whip",
        &key,
        Some(&user),
    )
    .await
    {
        count("hook_refused");
        return refuse(StatusCode::FORBIDDEN, &why);
    }
    let session = SessionId(state.next_session.fetch_add(1, Ordering::Relaxed));
    let (tx, mut rx) = mpsc::channel(state.session_queue);
    let control = &state.control;
    let steps = async {
        join(&state, &mut rx, session, tx, sdk_app_id, ticket).await?;
        let publish = ClientMessage::Publish {
            audio: kinds.contains(&weir_signaling::Kind::Audio),
            video: kinds.contains(&weir_signaling::Kind::Video),
            min_bitrate: None,
            max_bitrate: None,
            screen: false,
        };
        let _ = control
            .send(ControlCommand::Message {
                session,
                msg: publish,
            })
            .await;
        next_answer(&mut rx, |m| {
            matches!(m, ServerMessage::Published { .. }).then_some(())
        })
        .await?;
        let _ = control
            .send(ControlCommand::Message {
                session,
                msg: ClientMessage::Offer {
                    target: Target::Publisher,
                    sdp: offer.to_owned(),
                },
            })
            .await;
        answer_for(&mut rx, Target::Publisher).await
    }
    .await;
    let resource = Resource::new(session, Target::Publisher, offer);
    let (outcome, r) = conclude(&state, resource, &user, &room, rx, "whip", steps).await;
    count(outcome);
    r
}

/// The checks every WHIP and WHEP POST passes before anything joins: the node serves,
/// the body is an SDP offer, the credentials verify. `Err`: the outcome to count and
/// the answer.
fn admit<'a>(
    state: &AppState,
    ip: std::net::IpAddr,
    query: Option<&str>,
    headers: &HeaderMap,
    body: &'a [u8],
    what: &str,
) -> Result<(u64, RoomTicket, &'a str), (&'static str, Box<Response>)> {
    let no = |outcome, r| (outcome, Box::new(r));
    if let Some(why) = state.unavailable() {
        return Err(no(
            "unavailable",
            refuse(StatusCode::SERVICE_UNAVAILABLE, why),
        ));
    }
    let sdp = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with("application/sdp"));
    if !sdp {
        return Err(no(
            "bad_request",
            refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("a {what} offer is Content-Type: application/sdp"),
            ),
        ));
    }
    let (sdk_app_id, ticket) =
        credentials(state, ip, headers, query).map_err(|r| ("unauthorized", r))?;
    let offer = std::str::from_utf8(body).map_err(|_| {
        no(
            "bad_request",
            refuse(StatusCode::BAD_REQUEST, "the offer is not UTF-8"),
        )
    })?;
    Ok((sdk_app_id, ticket, offer))
}

/// The room's answer on `target`'s connection.
async fn answer_for(
    rx: &mut mpsc::Receiver<SessionEvent>,
    target: Target,
) -> Result<String, (ErrorCode, String)> {
    next_answer(rx, |m| match m {
        ServerMessage::Answer { target: t, sdp } if *t == target => Some(sdp.clone()),
        _ => None,
    })
    .await
}

/// After the room's steps: a refusal makes the member leave and says why; an answer
/// becomes a resource (`201 Created`). The outcome to count, and the response.
async fn conclude(
    state: &Arc<AppState>,
    resource: Resource,
    user: &str,
    place: &str,
    rx: mpsc::Receiver<SessionEvent>,
    prefix: &str,
    steps: Result<String, (ErrorCode, String)>,
) -> (&'static str, Response) {
    let session = resource.session;
    let answer = match steps {
        Ok(a) => a,
        Err((code, why)) => {
            let _ = state
                .control
                .send(ControlCommand::Closed {
                    session,
                    reason: LeaveReason::Left,
                })
                .await;
            info!(%user, %place, ?code, %why, kind = prefix, "WHIP/WHEP request refused");
            return ("refused", refuse(status_of(code), why));
        }
    };
    match created(state, resource, user, rx, prefix, answer).await {
        Ok(r) => {
            info!(%user, %place, kind = prefix, "WHIP/WHEP client joined");
            ("ok", r)
        }
        Err(r) => ("refused", r),
    }
}

/// Opens a session for `ticket` and joins its room (no automatic subscriptions).
async fn join(
    state: &AppState,
    rx: &mut mpsc::Receiver<SessionEvent>,
    session: SessionId,
    tx: mpsc::Sender<SessionEvent>,
    sdk_app_id: u64,
    ticket: RoomTicket,
) -> Result<(), (ErrorCode, String)> {
    let control = &state.control;
    control
        .send(ControlCommand::Open { session, tx })
        .await
        .map_err(|_| {
            (
                ErrorCode::Unavailable,
                "the control task is gone".to_owned(),
            )
        })?;
    let _ = control
        .send(ControlCommand::Join {
            session,
            sdk_app_id,
            ticket: Box::new(ticket),
            auto_subscribe: false,
            congestion_policy: None,
            push: false,
            edge_of: None,
        })
        .await;
    next_answer(rx, |m| {
        matches!(m, ServerMessage::Joined { .. }).then_some(())
    })
    .await
}

/// A resource's events until the room closes its session: the answer to an ICE
/// restart (or the room's error) goes to the PATCH waiting for it, the rest nowhere.
///
/// A PATCH queues its waiter before it sends the offer, so a waiter already queued is
/// taken before the next event: polled in turn, an answer and its waiter that became
/// ready together (a task scheduled late, on a busy node) could be taken answer first,
/// and that answer was dropped and the PATCH timed out (seen in CI: 503 "the room did
/// not answer").
async fn answer_waiters(
    mut rx: mpsc::Receiver<SessionEvent>,
    mut waiting: mpsc::Receiver<AnswerWaiter>,
    target: Target,
) {
    let mut waiter: Option<AnswerWaiter> = None;
    loop {
        tokio::select! {
            biased;
            Some(w) = waiting.recv() => waiter = Some(w),
            ev = rx.recv() => match ev {
                None | Some(SessionEvent::Close(_)) => break,
                Some(SessionEvent::Send(ServerMessage::Answer { target: t, sdp })) if t == target => {
                    if let Some(w) = waiter.take() {
                        let _ = w.send(Ok(sdp));
                    }
                }
                Some(SessionEvent::Send(ServerMessage::Error { code, message, .. })) => {
                    if let Some(w) = waiter.take() {
                        let _ = w.send(Err((code, message)));
                    }
                }
                Some(SessionEvent::Send(_)) => {}
            },
        }
    }
}

/// Registers the session as a resource under `/{prefix}/resource/<id>`, lets its
/// events drain until the room closes it, and makes the `201 Created`.
async fn created(
    state: &Arc<AppState>,
    resource: Resource,
    user_id: &str,
    rx: mpsc::Receiver<SessionEvent>,
    prefix: &str,
    answer: String,
) -> Result<Response, Response> {
    let mut resource = resource;
    let session = resource.session;
    let id = hex::encode(rand::random::<[u8; 16]>());
    let target = resource.target;
    let (answers, waiting) = mpsc::channel::<AnswerWaiter>(1);
    resource.answers = Some(answers);
    resource.etag = format!("\"{id}\"");
    let etag = resource.etag.clone();
    let full = {
        let mut r = state.whip.lock();
        let full = r.len() >= MAX_RESOURCES;
        if !full {
            r.insert(id.clone(), resource);
        }
        full
    };
    if full {
        let _ = state
            .control
            .send(ControlCommand::Closed {
                session,
                reason: LeaveReason::Left,
            })
            .await;
        return Err(refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "too many WHIP/WHEP sessions on this node",
        ));
    }
    // The member's events go nowhere (such a client has no channel for them), but the
    // answer to an ICE restart, which goes to the PATCH that asked; the session ends
    // when the room closes it (DELETE, media gone, shutdown).
    let keep = state.clone();
    let resource = id.clone();
    tokio::spawn(async move {
        answer_waiters(rx, waiting, target).await;
        keep.whip.lock().remove(&resource);
    });
    let mut r = (StatusCode::CREATED, answer).into_response();
    let h = r.headers_mut();
    cors(h);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/sdp"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("/{prefix}/resource/{id}")) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    // The ICE servers, as RFC 9725 §4.6 spells them.
    for server in state.ice.for_user(user_id, crate::auth::unix_now()) {
        for url in &server.urls {
            let mut link = format!("<{url}>; rel=\"ice-server\"");
            if let (Some(u), Some(c)) = (&server.username, &server.credential) {
                link.push_str(&format!(
                    "; username=\"{u}\"; credential=\"{c}\"; credential-type=\"password\""
                ));
            }
            if let Ok(v) = HeaderValue::from_str(&link) {
                h.append(header::LINK, v);
            }
        }
    }
    Ok(r)
}

/// `POST /whep/<stream>`: join, subscribe to `stream`, answer the player's offer.
pub async fn play(
    State(state): State<Arc<AppState>>,
    axum::Extension(PeerAddr(peer)): axum::Extension<PeerAddr>,
    Path(stream): Path<String>,
    uri: axum::http::Uri,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let count = |outcome: &str| {
        state
            .metrics
            .whep_requests
            .with_label_values(&[outcome])
            .inc()
    };
    let (sdk_app_id, ticket, offer) =
        match admit(&state, peer.ip(), query.as_deref(), &headers, &body, "WHEP") {
            Ok(a) => a,
            Err((outcome, r)) => {
                count(outcome);
                return *r;
            }
        };
    if let Some(r) = forwarded(
        &state,
        peer.ip(),
        sdk_app_id,
        &ticket,
        &uri,
        &headers,
        &body,
    )
    .await
    {
        count("forwarded");
        return r;
    }
    if !offer
        .lines()
        .any(|l| l.starts_with("m=audio ") || l.starts_with("m=video "))
    {
        count("bad_request");
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the offer has no audio or video section",
        );
    }
    let user = ticket.identity.user_id.clone();
    let key = crate::room::RoomKey {
        sdk_app_id,
        room: ticket.room.clone(),
    };
    if let Err(why) = Admission::for_room(
        &state.admission,
        peer.ip(),
        Ask::Play,
        &stream,
        "whep",
        &key,
        Some(&user),
    )
    .await
    {
        count("hook_refused");
        return refuse(StatusCode::FORBIDDEN, &why);
    }
    let session = SessionId(state.next_session.fetch_add(1, Ordering::Relaxed));
    let (tx, mut rx) = mpsc::channel(state.session_queue);
    let control = &state.control;
    let steps = async {
        join(&state, &mut rx, session, tx, sdk_app_id, ticket).await?;
        // The offer first, so that the subscription is answered on it, not offered.
        for msg in [
            ClientMessage::Offer {
                target: Target::Subscriber,
                sdp: offer.to_owned(),
            },
            ClientMessage::Subscribe {
                stream_ids: vec![stream.clone()],
            },
        ] {
            let _ = control.send(ControlCommand::Message { session, msg }).await;
        }
        answer_for(&mut rx, Target::Subscriber).await
    }
    .await;
    let resource = Resource::new(session, Target::Subscriber, offer);
    let (outcome, r) = conclude(&state, resource, &user, &stream, rx, "whep", steps).await;
    count(outcome);
    r
}

/// `DELETE /whip/resource/<id>`: the publisher leaves.
pub async fn delete(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let Some(Resource { session, .. }) = state.whip.lock().remove(&id) else {
        return refuse(StatusCode::NOT_FOUND, "no such WHIP or WHEP resource");
    };
    let _ = state
        .control
        .send(ControlCommand::Closed {
            session,
            reason: LeaveReason::Left,
        })
        .await;
    state
        .metrics
        .whip_requests
        .with_label_values(&["deleted"])
        .inc();
    let mut r = StatusCode::OK.into_response();
    cors(r.headers_mut());
    r
}

/// `PATCH /whip/resource/<id>` (and WHEP's): trickled candidates (RFC 8840 SDP
/// fragments) reach the connection; `204`. An ICE restart (a fragment with a new
/// ufrag) is refused with `422`: POST a new offer instead.
pub async fn patch(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(resource) = state.whip.lock().get(&id).cloned() else {
        return refuse(StatusCode::NOT_FOUND, "no such WHIP or WHEP resource");
    };
    let etag = resource.etag.clone();
    if let Some(m) = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()) {
        if m.trim() != "*" && m.trim() != etag {
            return refuse(StatusCode::PRECONDITION_FAILED, "the ETag does not match");
        }
    }
    let fragment = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim()
                .to_ascii_lowercase()
                .starts_with("application/trickle-ice-sdpfrag")
        });
    if !fragment {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a PATCH is Content-Type: application/trickle-ice-sdpfrag",
        );
    }
    let Ok(text) = std::str::from_utf8(&body) else {
        return refuse(StatusCode::BAD_REQUEST, "the fragment is not UTF-8");
    };
    let trickle = match trickle_fragment(text) {
        Ok(t) => t,
        Err(why) => return refuse(StatusCode::BAD_REQUEST, why),
    };
    if trickle.ufrag.is_some() && trickle.ufrag != resource.ufrag {
        return restart_ice(&state, &id, resource, trickle).await;
    }
    let session = resource.session;
    let mut messages: Vec<ClientMessage> = trickle
        .candidates
        .into_iter()
        .map(|c| ClientMessage::Candidate {
            target: resource.target,
            candidate: Some(c),
        })
        .collect();
    if trickle.end {
        messages.push(ClientMessage::Candidate {
            target: resource.target,
            candidate: None,
        });
    }
    for msg in messages {
        let _ = state
            .control
            .send(ControlCommand::Message { session, msg })
            .await;
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    cors(r.headers_mut());
    if let Ok(v) = HeaderValue::from_str(&etag) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

/// An ICE restart over PATCH: the client's last offer again, with its new
/// credentials, answered by the room; `200` with the server's new credentials and
/// candidates as a fragment, and a new ETag.
async fn restart_ice(
    state: &Arc<AppState>,
    id: &str,
    resource: Resource,
    trickle: Trickle,
) -> Response {
    let (Some(ufrag), Some(pwd)) = (trickle.ufrag.clone(), trickle.pwd.clone()) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "an ICE restart's fragment has a new a=ice-ufrag and a=ice-pwd",
        );
    };
    if !ice_chars(&ufrag, 4) || !ice_chars(&pwd, 22) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "ice-ufrag is 4-256 and ice-pwd 22-256 of A-Z a-z 0-9 + / (RFC 8839)",
        );
    }
    let Some(answers) = resource.answers.clone() else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "the resource is closing");
    };
    let offer = with_ice_credentials(&resource.offer, &ufrag, &pwd);
    let (tx, rx) = tokio::sync::oneshot::channel();
    if answers.try_send(tx).is_err() {
        return refuse(
            StatusCode::CONFLICT,
            "another ICE restart of this resource is under way",
        );
    }
    let session = resource.session;
    let mut messages = vec![ClientMessage::Offer {
        target: resource.target,
        sdp: offer.clone(),
    }];
    messages.extend(
        trickle
            .candidates
            .into_iter()
            .map(|c| ClientMessage::Candidate {
                target: resource.target,
                candidate: Some(c),
            }),
    );
    for msg in messages {
        let _ = state
            .control
            .send(ControlCommand::Message { session, msg })
            .await;
    }
    let answer = match tokio::time::timeout(STEP_TIMEOUT, rx).await {
        Ok(Ok(Ok(sdp))) => sdp,
        Ok(Ok(Err((code, why)))) => return refuse(status_of(code), why),
        _ => return refuse(StatusCode::SERVICE_UNAVAILABLE, "the room did not answer"),
    };
    let etag = format!("\"{id}.{}\"", hex::encode(rand::random::<[u8; 4]>()));
    if let Some(r) = state.whip.lock().get_mut(id) {
        r.ufrag = Some(ufrag);
        r.offer = offer;
        r.etag = etag.clone();
    }
    state
        .metrics
        .whip_requests
        .with_label_values(&["ice_restart"])
        .inc();
    info!(session = session.0, resource = id, "WHIP/WHEP ICE restart");
    let mut r = (StatusCode::OK, ice_fragment(&answer)).into_response();
    let h = r.headers_mut();
    cors(h);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/trickle-ice-sdpfrag"),
    );
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    r
}

/// RFC 8839's `ice-char`s, `min`..=256 of them.
fn ice_chars(v: &str, min: usize) -> bool {
    (min..=256).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

/// `sdp` with every `a=ice-ufrag`/`a=ice-pwd` replaced by these, and without the
/// candidates of the old ICE session (the new ones come trickled).
pub fn with_ice_credentials(sdp: &str, ufrag: &str, pwd: &str) -> String {
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.lines() {
        let line = line.trim_end();
        if line.starts_with("a=ice-ufrag:") {
            out.push_str(&format!("a=ice-ufrag:{ufrag}"));
        } else if line.starts_with("a=ice-pwd:") {
            out.push_str(&format!("a=ice-pwd:{pwd}"));
        } else if line.starts_with("a=candidate:") || line == "a=end-of-candidates" {
            continue;
        } else {
            out.push_str(line);
        }
        out.push_str("\r\n");
    }
    out
}

/// The ICE part of an answer as an RFC 8840 fragment: the credentials at session
/// level, and for each media section its `m=` line, `a=mid` and candidates.
pub fn ice_fragment(answer: &str) -> String {
    let mut head = String::new();
    let mut sections = String::new();
    let mut credentials = (None, None);
    for line in answer.lines() {
        let line = line.trim_end();
        if let Some(v) = line.strip_prefix("a=ice-ufrag:") {
            credentials.0.get_or_insert_with(|| v.to_owned());
        } else if let Some(v) = line.strip_prefix("a=ice-pwd:") {
            credentials.1.get_or_insert_with(|| v.to_owned());
        } else if line.starts_with("m=")
            || line.starts_with("a=mid:")
            || line.starts_with("a=candidate:")
            || line == "a=end-of-candidates"
        {
            sections.push_str(line);
            sections.push_str("\r\n");
        }
    }
    if let Some(u) = credentials.0 {
        head.push_str(&format!("a=ice-ufrag:{u}\r\n"));
    }
    if let Some(p) = credentials.1 {
        head.push_str(&format!("a=ice-pwd:{p}\r\n"));
    }
    head + &sections
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trickle_fragment_gives_its_candidates_with_their_section() {
        let t = trickle_fragment(
            "a=group:BUNDLE 0 1\r\na=ice-ufrag:EsAw\r\na=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1\r\n\
             m=audio 9 RTP/AVP 0\r\na=mid:0\r\n\
             a=candidate:1387637174 1 udp 2122260223 192.0.2.1 61764 typ host generation 0\r\n\
             a=end-of-candidates\r\nm=video 9 RTP/AVP 0\r\na=mid:1\r\n\
             a=candidate:3471623853 1 udp 2122194687 198.51.100.2 61765 typ host\r\n",
        )
        .unwrap();
        assert_eq!(t.ufrag.as_deref(), Some("EsAw"));
        assert!(t.end);
        assert_eq!(t.candidates.len(), 2);
        assert_eq!(t.candidates[0].sdp_mid.as_deref(), Some("0"));
        assert_eq!(t.candidates[0].sdp_m_line_index, Some(0));
        assert_eq!(t.candidates[1].sdp_mid.as_deref(), Some("1"));
        assert_eq!(t.candidates[1].sdp_m_line_index, Some(1));
        assert!(t.candidates[1]
            .candidate
            .starts_with("candidate:3471623853"));
        assert_eq!(t.candidates[1].username_fragment.as_deref(), Some("EsAw"));
    }

    /// The race CI met: the answer to an ICE restart and the PATCH's waiter both
    /// ready before the resource's task runs. Taken answer first (half the time
    /// before), the answer was dropped and the PATCH timed out.
    #[tokio::test]
    async fn an_answer_that_arrives_with_its_waiter_reaches_the_patch() {
        for _ in 0..64 {
            let (events, rx) = mpsc::channel(4);
            let (answers, waiting) = mpsc::channel::<AnswerWaiter>(1);
            let (waiter, got) = tokio::sync::oneshot::channel();
            answers.try_send(waiter).unwrap();
            events
                .try_send(SessionEvent::Send(ServerMessage::Answer {
                    target: Target::Publisher,
                    sdp: "v=0".into(),
                }))
                .unwrap();
            drop(events);
            answer_waiters(rx, waiting, Target::Publisher).await;
            assert_eq!(got.await.unwrap().unwrap(), "v=0");
        }
    }

    #[test]
    fn an_ice_restart_reapplies_the_offer_with_new_credentials() {
        let offer = "v=0\r\na=ice-ufrag:old1\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\n\
                     a=ice-ufrag:old1\r\na=ice-pwd:oldpasswordoldpassword\r\n\
                     a=candidate:1 1 udp 1 192.0.2.1 1 typ host\r\na=end-of-candidates\r\n";
        let again = with_ice_credentials(offer, "new1", "newpasswordnewpassword");
        assert!(
            !again.contains("old") && !again.contains("a=candidate"),
            "{again}"
        );
        assert_eq!(again.matches("a=ice-ufrag:new1\r\n").count(), 2);
        assert!(again.contains("a=ice-pwd:newpasswordnewpassword\r\n"));
        let t =
            trickle_fragment("a=ice-ufrag:new1\r\na=ice-pwd:newpasswordnewpassword\r\n").unwrap();
        assert_eq!(t.pwd.as_deref(), Some("newpasswordnewpassword"));
        assert!(trickle_fragment("a=ice-pwd:a\na=ice-pwd:b\n").is_err());
        // What goes back: the credentials once, each section's mid and candidates.
        let frag = ice_fragment(offer);
        assert_eq!(
            frag,
            "a=ice-ufrag:old1\r\na=ice-pwd:oldpasswordoldpassword\r\n\
             m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\n\
             a=candidate:1 1 udp 1 192.0.2.1 1 typ host\r\na=end-of-candidates\r\n"
        );
        assert!(ice_chars("abcd", 4) && !ice_chars("ab\rcd", 4) && !ice_chars("abc", 4));
    }

    #[test]
    fn a_fragment_is_bounded_and_consistent() {
        let many =
            "a=candidate:1 1 udp 1 192.0.2.1 1 typ host\n".repeat(MAX_TRICKLE_CANDIDATES + 1);
        assert!(trickle_fragment(&many).is_err());
        assert!(trickle_fragment("a=ice-ufrag:a\na=ice-ufrag:b\n").is_err());
        assert_eq!(trickle_fragment("").unwrap(), Trickle::default());
    }
}
