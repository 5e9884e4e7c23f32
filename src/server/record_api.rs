//! The recording REST calls, for the customer's backend: start and stop recording a
//! live stream, list recorded files by stream and time, and fetch a file (HTTP range
//! requests). Authenticated as Tencent's server APIs are: `sdkappid`, `identifier`
//! (the app's administrator, `[record] admin_user`) and its `usersig` in the query;
//! an app sees only its own streams and files. Failed checks count against the
//! client's address like failed joins.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use tower::ServiceExt;

use super::http::PeerAddr;
use super::AppState;
use crate::record::{file_stem, Format};

/// Files one listing returns at most.
const MAX_LISTED: usize = 1000;

#[derive(Deserialize)]
pub struct Creds {
    sdkappid: Option<u64>,
    identifier: Option<String>,
    usersig: Option<String>,
    stream_id: Option<String>,
    from: Option<u64>,
    to: Option<u64>,
}

/// A stream (`stream_id`) or a room (`room_id`: every stream published in it, now and
/// until stopped).
#[derive(Deserialize)]
pub struct StreamBody {
    stream_id: Option<String>,
    room_id: Option<String>,
    /// `flv` or `mp4` (start only); the configured format when absent.
    file_format: Option<String>,
}

fn answer(status: StatusCode, code: i32, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"code": code, "message": message.into()})),
    )
        .into_response()
}

/// A refused call: its status, code and message.
type Refusal = (StatusCode, i32, String);

/// The app whose administrator signed this request.
fn admin(state: &AppState, peer: std::net::SocketAddr, c: &Creds) -> Result<u64, Refusal> {
    let (Some(app), Some(user), Some(sig)) = (c.sdkappid, &c.identifier, &c.usersig) else {
        return Err((
            StatusCode::UNAUTHORIZED,
            401,
            "sdkappid, identifier and usersig are required".into(),
        ));
    };
    if let Err(why) = state.may_verify(peer.ip()) {
        return Err((StatusCode::TOO_MANY_REQUESTS, 429, why));
    }
    let verified = state
        .keyring
        .app(app)
        .and_then(|k| k.verify_user_sig(sig, user, crate::auth::unix_now()));
    if let Err(e) = verified {
        state.verify_failed(peer.ip());
        return Err((StatusCode::UNAUTHORIZED, 401, e.to_string()));
    }
    if *user != state.recording.config.admin_user {
        return Err((
            StatusCode::FORBIDDEN,
            403,
            "only the app's administrator may manage recordings".into(),
        ));
    }
    Ok(app)
}

pub async fn start(
    State(state): State<Arc<AppState>>,
    axum::Extension(PeerAddr(peer)): axum::Extension<PeerAddr>,
    Query(c): Query<Creds>,
    Json(body): Json<StreamBody>,
) -> Response {
    let app = match admin(&state, peer, &c) {
        Ok(a) => a,
        Err((status, code, why)) => return answer(status, code, why),
    };
    let format = match body.file_format.as_deref().map(Format::parse) {
        None => None,
        Some(Some(f)) => Some(f),
        Some(None) => return answer(StatusCode::BAD_REQUEST, 400, "file_format is flv or mp4"),
    };
    match body.target() {
        Some(Target::Stream(stream)) => match state.hub.get(stream) {
            Some((source, place)) if place.sdk_app_id == app => {
                if state.recording.start(&source, &place, format) {
                    answer(StatusCode::OK, 0, "recording")
                } else {
                    answer(StatusCode::CONFLICT, 409, "already being recorded")
                }
            }
            _ => answer(StatusCode::NOT_FOUND, 404, "no such live stream"),
        },
        Some(Target::Room(room)) => {
            let live = live_streams(&state);
            match state.recording.start_room(app, room, format, &live) {
                Ok(()) => answer(StatusCode::OK, 0, "recording the room"),
                Err(why) => answer(StatusCode::CONFLICT, 409, why),
            }
        }
        None => one_of(),
    }
}

/// What a start or stop call names.
enum Target<'a> {
    Stream(&'a str),
    Room(&'a str),
}

impl StreamBody {
    /// The stream or the room named (None: neither, or both).
    fn target(&self) -> Option<Target<'_>> {
        match (&self.stream_id, &self.room_id) {
            (Some(s), None) => Some(Target::Stream(s)),
            (None, Some(r)) => Some(Target::Room(r)),
            _ => None,
        }
    }
}

/// Every live stream of this node, with where it is.
fn live_streams(state: &AppState) -> Vec<(Arc<crate::live::Source>, crate::live::StreamPlace)> {
    state
        .hub
        .names()
        .iter()
        .filter_map(|n| state.hub.get(n))
        .collect()
}

fn one_of() -> Response {
    answer(
        StatusCode::BAD_REQUEST,
        400,
        "name a stream_id or a room_id (one of them)",
    )
}

pub async fn stop(
    State(state): State<Arc<AppState>>,
    axum::Extension(PeerAddr(peer)): axum::Extension<PeerAddr>,
    Query(c): Query<Creds>,
    Json(body): Json<StreamBody>,
) -> Response {
    let app = match admin(&state, peer, &c) {
        Ok(a) => a,
        Err((status, code, why)) => return answer(status, code, why),
    };
    match body.target() {
        Some(Target::Stream(stream)) => {
            let mine = state
                .hub
                .get(stream)
                .is_some_and(|(_, place)| place.sdk_app_id == app);
            if mine && state.recording.stop(stream) {
                answer(StatusCode::OK, 0, "stopped")
            } else {
                answer(
                    StatusCode::NOT_FOUND,
                    404,
                    "this stream is not being recorded",
                )
            }
        }
        Some(Target::Room(room)) => {
            if state.recording.stop_room(app, room, &live_streams(&state)) {
                answer(StatusCode::OK, 0, "stopped")
            } else {
                answer(
                    StatusCode::NOT_FOUND,
                    404,
                    "this room is not being recorded",
                )
            }
        }
        None => one_of(),
    }
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    axum::Extension(PeerAddr(peer)): axum::Extension<PeerAddr>,
    Query(c): Query<Creds>,
) -> Response {
    let app = match admin(&state, peer, &c) {
        Ok(a) => a,
        Err((status, code, why)) => return answer(status, code, why),
    };
    let recording = state.recording.clone();
    let (stream, from, to) = (
        c.stream_id.clone(),
        c.from.unwrap_or(0),
        c.to.unwrap_or(u64::MAX),
    );
    let files = tokio::task::spawn_blocking(move || {
        recording.list(app, stream.as_deref(), from, to, MAX_LISTED)
    })
    .await
    .unwrap_or_default();
    let mut listed: Vec<serde_json::Value> = files
        .iter()
        .map(|f| {
            let url = format!("/v1/record/files/{}/{}", f.stream_id, f.file);
            let mut v = serde_json::to_value(f).expect("serializes");
            v["url"] = url.into();
            v["storage"] = "local".into();
            v
        })
        .collect();
    // Uploaded files: those no longer (or never) kept locally are listed from the
    // bucket, with the URL the backend was told.
    if let Some(up) = &state.recording.uploader {
        let stem = c.stream_id.as_deref().map(file_stem);
        for o in up.list(app, stem.as_deref(), MAX_LISTED).await {
            let mut parts = o.key.rsplit('/');
            let (Some(name), Some(stream)) = (parts.next(), parts.next()) else {
                continue;
            };
            let start_ms = super::record::start_ms_of(name).unwrap_or(o.modified_ms);
            if o.modified_ms < from || start_ms > to {
                continue;
            }
            if files
                .iter()
                .any(|f| f.file == name && f.stream_id == stream)
            {
                if let Some(v) = listed.iter_mut().find(|v| v["file"] == name) {
                    v["uploaded_url"] = up.url(&o.key).into();
                }
                continue;
            }
            listed.push(json!({
                "stream_id": stream,
                "file": name,
                "file_size": o.size,
                "start_ms": start_ms,
                "end_ms": o.modified_ms,
                "url": up.url(&o.key),
                "storage": "s3",
            }));
        }
    }
    listed.truncate(MAX_LISTED);
    let files = listed;
    (StatusCode::OK, Json(json!({"code": 0, "files": files}))).into_response()
}

pub async fn file(
    State(state): State<Arc<AppState>>,
    axum::Extension(PeerAddr(peer)): axum::Extension<PeerAddr>,
    Path((stream, name)): Path<(String, String)>,
    Query(c): Query<Creds>,
    req: axum::extract::Request,
) -> Response {
    let app = match admin(&state, peer, &c) {
        Ok(a) => a,
        Err((status, code, why)) => return answer(status, code, why),
    };
    // Only names this node makes: no separators, no dot files, `.flv` or `.mp4`.
    let ours = super::record::start_ms_of(&name).is_some();
    if file_stem(&name) != name || !ours || file_stem(&stream) != stream {
        return answer(StatusCode::NOT_FOUND, 404, "no such file");
    }
    let path = state.recording.stream_dir(app, &stream).join(&name);
    match tower_http::services::ServeFile::new(path)
        .oneshot(req)
        .await
    {
        Ok(r) if r.status() == StatusCode::NOT_FOUND => {
            answer(StatusCode::NOT_FOUND, 404, "no such file")
        }
        Ok(r) => r.into_response(),
        Err(e) => match e {},
    }
}
