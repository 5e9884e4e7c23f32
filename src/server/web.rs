//! The browser side: the demo page at `/`, the SDK at `/sdk/weir.js`, and — only in
//! development mode — `/dev/credentials` and `/dev/rooms`, which hand out tokens of the
//! generated development app to whoever asks. Outside development mode those routes do
//! not exist (404), so a production node never issues credentials over HTTP.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::control::ControlCommand;
use super::AppState;
use crate::auth::{Privileges, RoomId, TokenKind};

const INDEX: &str = include_str!("../../signaling/demo/index.html");
const APP_JS: &str = include_str!("../../signaling/demo/app.js");
const STYLE: &str = include_str!("../../signaling/demo/style.css");
const SDK: &str = include_str!("../../signaling/weir.js");
const SDK_TYPES: &str = include_str!("../../signaling/weir.d.ts");

/// Lifetime of development credentials.
const DEV_TOKEN_S: u64 = 24 * 3600;

pub fn routes() -> Router<Arc<AppState>> {
    let file = |body: &'static str, kind: &'static str| {
        get(move || async move {
            (
                [("content-type", kind), ("cache-control", "no-cache")],
                body,
            )
        })
    };
    Router::new()
        .route("/", file(INDEX, "text/html; charset=utf-8"))
        .route("/app.js", file(APP_JS, "text/javascript; charset=utf-8"))
        .route("/style.css", file(STYLE, "text/css; charset=utf-8"))
        .route("/sdk/weir.js", file(SDK, "text/javascript; charset=utf-8"))
        .route(
            "/sdk/weir.d.ts",
            file(SDK_TYPES, "text/plain; charset=utf-8"),
        )
        .route("/dev/credentials", get(dev_credentials))
        .route("/dev/rooms", get(dev_rooms))
}

#[derive(Deserialize)]
struct CredentialsQuery {
    #[serde(rename = "userID")]
    user_id: String,
    #[serde(rename = "roomID")]
    room: String,
}

fn not_here() -> Response {
    (StatusCode::NOT_FOUND, "only in development mode\n").into_response()
}

fn bad(message: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, format!("{}\n", message.into())).into_response()
}

/// Credentials of the development app for `userID` in `roomID` (digits → `roomID`,
/// anything else → `strRoomID`), with every privilege, plus the RTMP push URL a mini
/// program `<live-pusher>` of that user would use and the query that authorizes plays.
async fn dev_credentials(
    State(state): State<Arc<AppState>>,
    Query(q): Query<CredentialsQuery>,
) -> Response {
    if !state.dev_mode {
        return not_here();
    }
    let Some(app) = state.keyring.apps().next() else {
        return not_here();
    };
    let user = q.user_id.trim();
    if user.is_empty() || user.len() > 32 || !user.chars().all(|c| c.is_ascii_graphic()) {
        return bad("userID: 1-32 printable ASCII characters");
    }
    let room_text = q.room.trim();
    let room = match room_text.parse::<u32>() {
        Ok(n) if n > 0 => RoomId::Num(n),
        _ if !room_text.is_empty() && room_text.len() <= 64 => RoomId::Str(room_text.to_owned()),
        _ => return bad("roomID: a number 1..4294967295 or 1-64 bytes"),
    };
    let now = crate::auth::unix_now();
    let kind = if app.secret_key.is_some() {
        TokenKind::V2
    } else {
        TokenKind::V1
    };
    let issued = app
        .issue_user_sig(kind, user, now, DEV_TOKEN_S)
        .and_then(|sig| {
            app.issue_private_map_key(kind, user, &room, Privileges(0xff), now, DEV_TOKEN_S)
                .map(|pmk| (sig, pmk))
        });
    let (user_sig, private_map_key) = match issued {
        Ok(t) => t,
        Err(e) => return bad(e.to_string()),
    };
    let enc = |s: &str| -> String { url::form_urlencoded::byte_serialize(s.as_bytes()).collect() };
    let room_param = match &room {
        RoomId::Num(n) => format!("roomid={n}"),
        RoomId::Str(s) => format!("strroomid={}", enc(s)),
    };
    let query = format!(
        "sdkappid={}&userid={}&{room_param}&usersig={}&privatemapkey={}",
        app.sdk_app_id,
        enc(user),
        enc(&user_sig),
        enc(&private_map_key)
    );
    let key = crate::room::RoomKey {
        sdk_app_id: app.sdk_app_id,
        room: room.clone(),
    };
    let stream = crate::room::stream_id_for(&key, user);
    let mut body = serde_json::json!({
        "sdkAppID": app.sdk_app_id,
        "userID": user,
        "userSig": user_sig,
        "privateMapKey": private_map_key,
        "pushUrl": format!("{}/{stream}?{query}", state.urls.rtmp),
        "playQuery": query,
        "expiresAt": now + DEV_TOKEN_S,
    });
    match room {
        RoomId::Num(n) => body["roomID"] = n.into(),
        RoomId::Str(s) => body["strRoomID"] = s.into(),
    }
    Json(body).into_response()
}

/// The node's rooms, with members and streams (development mode only).
async fn dev_rooms(State(state): State<Arc<AppState>>) -> Response {
    if !state.dev_mode {
        return not_here();
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    if state
        .control
        .send(ControlCommand::ListRooms { reply: tx })
        .await
        .is_err()
    {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    match rx.await {
        Ok(rooms) => Json(rooms).into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response(),
    }
}
