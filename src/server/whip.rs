//! WHIP ingest (RFC 9725): a publisher with no SDK (OBS, GStreamer, a browser page)
//! POSTs its SDP offer and gets the answer. The HTTP shell over the same control
//! plane as a websocket session: a WHIP publisher is a room member like any other
//! (browsers subscribe to it, RTMP/FLV players play it, limits and congestion control
//! apply); its "socket" is the resource the `Location` header names, and `DELETE` on
//! it is its `leave`.
//!
//! - `POST /whip`, `Content-Type: application/sdp`, the offer in the body (≤
//!   [`MAX_OFFER_BYTES`]). Credentials: `Authorization: Bearer <privateMapKey JWT>`
//!   (a JWT privateMapKey names its app, user, room and privileges, and is signed by
//!   the app's key), or the query string an RTMP push URL carries
//!   (`?sdkappid=&userid=&roomid=|strroomid=&usersig=&privatemapkey=`). Answered
//!   `201 Created` with the answer, `Location: /whip/resource/<id>`, an `ETag`, and
//!   CORS headers exposing them. The answer carries every server candidate with
//!   end-of-candidates, so a client that never trickles (OBS) connects, and one whose
//!   offer has no candidates is reached through its own connectivity checks.
//! - `DELETE /whip/resource/<id>`: the member leaves; `200`.
//! - `PATCH`: `405` (no trickle or ICE restart over WHIP yet: RFC 9725 §4.3.1 lets
//!   a server refuse them; clients then send complete offers).
//! - `OPTIONS`: CORS preflight for browser clients.
//!
//! Errors: `401` (missing or invalid credentials; the failed-check throttle applies),
//! `403` (no send privilege), `415` (not `application/sdp`), `400`/`422` (an offer
//! that publishes nothing or does not apply), `429` (a limit), `503` (draining).
//! The stream is the member's `{sdkappid}_{room}_{user}_main`; a member leaves when
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
use weir_signaling::{ClientMessage, ErrorCode, LeaveReason, ServerMessage, Target};

use super::control::{ControlCommand, SessionEvent, SESSION_QUEUE};
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

/// The WHIP resources alive on this node: id → its session.
#[derive(Default)]
pub struct Resources(Mutex<HashMap<String, SessionId>>);

impl Resources {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionId>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
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

/// `POST /whip`: join, publish what the offer sends, answer it.
pub async fn publish(
    State(state): State<Arc<AppState>>,
    axum::Extension(PeerAddr(peer)): axum::Extension<PeerAddr>,
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
    if let Some(why) = state.unavailable() {
        count("unavailable");
        return refuse(StatusCode::SERVICE_UNAVAILABLE, why);
    }
    if !is_sdp(&headers) {
        count("bad_request");
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a WHIP offer is Content-Type: application/sdp",
        );
    }
    let (sdk_app_id, ticket) = match credentials(&state, peer.ip(), &headers, query.as_deref()) {
        Ok(c) => c,
        Err(r) => {
            count("unauthorized");
            return *r;
        }
    };
    let Ok(offer) = std::str::from_utf8(&body) else {
        count("bad_request");
        return refuse(StatusCode::BAD_REQUEST, "the offer is not UTF-8");
    };
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
    let session = SessionId(state.next_session.fetch_add(1, Ordering::Relaxed));
    let (tx, mut rx) = mpsc::channel(SESSION_QUEUE);
    let control = &state.control;
    let closed = |reason| ControlCommand::Closed { session, reason };
    let steps = async {
        join(&state, &mut rx, session, tx, sdk_app_id, ticket).await?;
        let publish = ClientMessage::Publish {
            audio: kinds.contains(&weir_signaling::Kind::Audio),
            video: kinds.contains(&weir_signaling::Kind::Video),
            min_bitrate: None,
            max_bitrate: None,
        };
        let _ = control
            .send(ControlCommand::Message {
                session,
                msg: publish,
            })
            .await;
        let stream = next_answer(&mut rx, |m| match m {
            ServerMessage::Published { stream } => Some(stream.stream_id.clone()),
            _ => None,
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
        let answer = next_answer(&mut rx, |m| match m {
            ServerMessage::Answer {
                target: Target::Publisher,
                sdp,
            } => Some(sdp.clone()),
            _ => None,
        })
        .await?;
        Ok::<_, (ErrorCode, String)>((stream, answer))
    };
    let (stream, answer) = match steps.await {
        Ok(ok) => ok,
        Err((code, why)) => {
            let _ = control.send(closed(LeaveReason::Left)).await;
            count("refused");
            info!(%user, %room, ?code, %why, "WHIP publish refused");
            return refuse(status_of(code), why);
        }
    };
    match created(&state, session, &user, rx, "whip", answer).await {
        Ok(r) => {
            count("ok");
            info!(%user, %room, %stream, "WHIP publisher joined");
            r
        }
        Err(r) => {
            count("refused");
            r
        }
    }
}

fn is_sdp(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with("application/sdp"))
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
        })
        .await;
    next_answer(rx, |m| {
        matches!(m, ServerMessage::Joined { .. }).then_some(())
    })
    .await
}

/// Registers the session as a resource under `/{prefix}/resource/<id>`, lets its
/// events drain until the room closes it, and makes the `201 Created`.
async fn created(
    state: &Arc<AppState>,
    session: SessionId,
    user_id: &str,
    mut rx: mpsc::Receiver<SessionEvent>,
    prefix: &str,
    answer: String,
) -> Result<Response, Response> {
    let id = hex::encode(rand::random::<[u8; 16]>());
    let full = {
        let mut r = state.whip.lock();
        let full = r.len() >= MAX_RESOURCES;
        if !full {
            r.insert(id.clone(), session);
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
    // The member's events go nowhere (such a client has no channel for them); the
    // session ends when the room closes it (DELETE, media gone, shutdown).
    let keep = state.clone();
    let resource = id.clone();
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            if matches!(ev, SessionEvent::Close(_)) {
                break;
            }
        }
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
    if let Ok(v) = HeaderValue::from_str(&format!("\"{id}\"")) {
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
    if let Some(why) = state.unavailable() {
        count("unavailable");
        return refuse(StatusCode::SERVICE_UNAVAILABLE, why);
    }
    if !is_sdp(&headers) {
        count("bad_request");
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a WHEP offer is Content-Type: application/sdp",
        );
    }
    let (sdk_app_id, ticket) = match credentials(&state, peer.ip(), &headers, query.as_deref()) {
        Ok(c) => c,
        Err(r) => {
            count("unauthorized");
            return *r;
        }
    };
    let Ok(offer) = std::str::from_utf8(&body) else {
        count("bad_request");
        return refuse(StatusCode::BAD_REQUEST, "the offer is not UTF-8");
    };
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
    let session = SessionId(state.next_session.fetch_add(1, Ordering::Relaxed));
    let (tx, mut rx) = mpsc::channel(SESSION_QUEUE);
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
        next_answer(&mut rx, |m| match m {
            ServerMessage::Answer {
                target: Target::Subscriber,
                sdp,
            } => Some(sdp.clone()),
            _ => None,
        })
        .await
    };
    let answer = match steps.await {
        Ok(a) => a,
        Err((code, why)) => {
            let _ = control
                .send(ControlCommand::Closed {
                    session,
                    reason: LeaveReason::Left,
                })
                .await;
            count("refused");
            info!(%user, %stream, ?code, %why, "WHEP play refused");
            return refuse(status_of(code), why);
        }
    };
    match created(&state, session, &user, rx, "whep", answer).await {
        Ok(r) => {
            count("ok");
            info!(%user, %stream, "WHEP player joined");
            r
        }
        Err(r) => {
            count("refused");
            r
        }
    }
}

/// `DELETE /whip/resource/<id>`: the publisher leaves.
pub async fn delete(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let Some(session) = state.whip.lock().remove(&id) else {
        return refuse(StatusCode::NOT_FOUND, "no such WHIP resource");
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

/// `PATCH /whip/resource/<id>`: trickle and ICE restarts are not taken over WHIP.
pub async fn patch(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if !state.whip.lock().contains_key(&id) {
        return refuse(StatusCode::NOT_FOUND, "no such WHIP resource");
    }
    let mut r = refuse(
        StatusCode::METHOD_NOT_ALLOWED,
        "no trickle ICE or ICE restart over WHIP: offer with every candidate",
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("DELETE, OPTIONS"));
    r
}
