//! The HTTP shell of the mini program room service (`crate::weapp`): parses a call
//! (path, query, a bounded JSON body), verifies a login's userSig here (an ECDSA or
//! HMAC verify, off the control task), and hands the rest to the control task, which
//! owns the rooms.
//!
//! Every answer is JSON `{code, message, ...}` with HTTP 200, as the original
//! backends answer (the components read `code`); bad input is a code, never a 500.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde_json::{json, Map, Value};

use super::control::ControlCommand;
use super::http::PeerAddr;
use super::AppState;
use crate::weapp::{code, Call, Kind};

/// Request bodies: roomInfo and the other fields are 1 KiB each.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

fn reply(status: StatusCode, m: Map<String, Value>) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json; charset=utf-8"),
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        Value::Object(m).to_string(),
    )
        .into_response()
}

fn error(status: StatusCode, c: i64, message: impl Into<String>) -> Response {
    let mut m = Map::new();
    m.insert("code".into(), json!(c));
    m.insert("message".into(), json!(message.into()));
    reply(status, m)
}

fn query_pairs(q: Option<&str>) -> Vec<(String, String)> {
    q.map(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .into_owned()
            .take(32)
            .collect()
    })
    .unwrap_or_default()
}

fn get<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `/weapp/{kind}/{action}`, GET or POST.
pub async fn call(
    State(state): State<Arc<AppState>>,
    Extension(PeerAddr(peer)): Extension<PeerAddr>,
    Path((prefix, action)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Response {
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                code::MISSING_PARAM,
                format!("请求失败: the body is over {MAX_BODY_BYTES} bytes"),
            )
        }
    };
    let body = match parse_body(&body) {
        Ok(v) => v,
        Err(why) => return error(StatusCode::OK, code::MISSING_PARAM, why),
    };
    let pairs = query_pairs(query.as_deref());
    let (kind, action, utils) = match prefix.as_str() {
        // The utilities are the webrtc_room's credential calls under other names.
        "utils" => (Kind::WebRtc, action, true),
        p => match Kind::from_prefix(p) {
            Some(k) => (k, action, false),
            None => {
                return error(
                    StatusCode::NOT_FOUND,
                    code::NOT_SUPPORTED,
                    "no such room service",
                )
            }
        },
    };
    if let Some(why) = state.unavailable() {
        return error(StatusCode::SERVICE_UNAVAILABLE, -1, why);
    }
    if kind != Kind::WebRtc && action == "login" {
        return login(&state, peer.ip(), kind, &pairs, &body).await;
    }
    let mut body = body;
    // utils/get_login_info takes its userID in the query.
    if utils {
        if let (Some(u), Some(obj)) = (get(&pairs, "userID"), body.as_object_mut()) {
            obj.entry("userID").or_insert_with(|| json!(u));
        }
    }
    // In a cluster: the app of a login shared through Redis, or the forwarded answer.
    let mut shared_app = None;
    if let Some(cluster) = state.cluster.clone() {
        match in_cluster(
            &state,
            &cluster,
            peer.ip(),
            (&prefix, kind.name()),
            &action,
            query.as_deref(),
            &pairs,
            &body,
        )
        .await
        {
            Ok(app) => shared_app = app,
            Err(r) => return r,
        }
    }
    // A room list in a cluster is every node's: this node's first `index + count`
    // rooms and each other live node's, merged by room id, then paged.
    let spread = match (&state.cluster, headers.get(LOCAL_LIST)) {
        (Some(_), None) if action == "get_room_list" => Some(spread_paging(&mut body, kind)),
        _ => None,
    };
    let c = Call {
        kind,
        action: action.clone(),
        user_id: get(&pairs, "userID").map(str::to_owned),
        token: get(&pairs, "token").map(str::to_owned),
        body: body.clone(),
    };
    let call_body = c.body.clone();
    let mut m = match ask(
        &state,
        ControlCommand::RoomService {
            call: Box::new(c),
            reply: tokio::sync::oneshot::channel().0,
        },
    )
    .await
    {
        Ok(m) => m,
        Err(r) => return r,
    };
    if let (Some(cluster), Some(page)) = (&state.cluster, spread) {
        if m.get("code").and_then(Value::as_i64) == Some(0) {
            let path = format!("/weapp/{prefix}/{action}");
            let mut rooms: Vec<Value> = m
                .get("rooms")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            rooms.extend(
                other_nodes_rooms(cluster, peer.ip(), &path, query.as_deref(), &body).await,
            );
            m.insert("rooms".into(), Value::Array(paged(rooms, page)));
        }
    }
    if utils && action == "get_login_info" {
        if let Some(t) = m.get("accountType").cloned() {
            m.insert("accType".into(), t);
        }
    }
    state
        .metrics
        .room_service_calls
        .with_label_values(&[kind.name(), outcome(&m)])
        .inc();
    if let (Some(cluster), Some(0), Some(app)) = (
        &state.cluster,
        m.get("code").and_then(Value::as_i64),
        shared_app,
    ) {
        after_in_cluster(cluster, app, &action, &call_body, &m).await;
    }
    reply(StatusCode::OK, m)
}

/// Marks a room-list call one node makes of another: answer with your own rooms only.
const LOCAL_LIST: &str = "x-weir-local-room-list";

/// Rewrites a room list's paging to "the first `index + count`" (what each node must
/// give for the merged page to be right) and returns the asked `(index, count)`.
fn spread_paging(body: &mut Value, kind: Kind) -> (usize, usize) {
    let count_name = if kind == Kind::WebRtc { "count" } else { "cnt" };
    let num = |v: Option<&Value>, default: usize| match v {
        Some(Value::Number(n)) => n.as_u64().map_or(default, |n| n as usize),
        Some(Value::String(s)) => s.parse().unwrap_or(default),
        _ => default,
    };
    let index = num(body.get("index"), 0);
    let count = num(body.get(count_name), 20).min(100);
    if let Some(obj) = body.as_object_mut() {
        obj.insert("index".into(), json!(0));
        obj.insert(count_name.into(), json!((index + count).min(100)));
    }
    (index, count)
}

/// The merged rooms, one per room id, in room id order, paged.
fn paged(mut rooms: Vec<Value>, (index, count): (usize, usize)) -> Vec<Value> {
    let id = |r: &Value| match r.get("roomID") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => String::new(),
    };
    rooms.sort_by_key(id);
    rooms.dedup_by(|a, b| id(a) == id(b));
    rooms.into_iter().skip(index).take(count).collect()
}

/// Each other live node's answer to the same room list (its own rooms only); a node
/// that does not answer within 2 s is left out (and suspected).
async fn other_nodes_rooms(
    cluster: &super::cluster::Cluster,
    ip: std::net::IpAddr,
    path: &str,
    query: Option<&str>,
    body: &Value,
) -> Vec<Value> {
    let asks = cluster
        .nodes()
        .into_iter()
        .filter(|n| n.id != cluster.id)
        .map(|node| async move {
            let answer = post_to(cluster, &node, path, query, ip, body, 2)
                .header(LOCAL_LIST, "1")
                .send()
                .await;
            let answer = match answer {
                Ok(a) => a.json::<Value>().await.ok(),
                Err(_) => {
                    cluster.suspect(&node);
                    None
                }
            };
            answer
                .filter(|a| a.get("code").and_then(Value::as_i64) == Some(0))
                .and_then(|a| a.get("rooms").and_then(Value::as_array).cloned())
                .unwrap_or_default()
        });
    futures_util::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// A room-service call made again on another node, for the client at `ip`.
fn post_to(
    cluster: &super::cluster::Cluster,
    node: &crate::cluster::NodeRecord,
    path: &str,
    query: Option<&str>,
    ip: std::net::IpAddr,
    body: &Value,
    timeout_s: u64,
) -> reqwest::RequestBuilder {
    let query = query.map(|q| format!("?{q}")).unwrap_or_default();
    cluster
        .http
        .post(format!("{}{path}{query}", node.addresses.http))
        .timeout(std::time::Duration::from_secs(timeout_s))
        .header("x-forwarded-for", ip.to_string())
        .header("content-type", "application/json")
        .body(body.to_string())
}

/// How long a room-service login shared through Redis lives unused (as the room
/// service's own idle limit).
const SHARED_LOGIN_TTL_MS: u64 = 2 * 3600 * 1000;

/// In a cluster, before a call is served here: a login made on any node is taken in
/// (its token then works here), and a call naming a room another node serves is
/// forwarded there (Err: its answer). Ok: serve it here (with the login's app).
#[allow(clippy::too_many_arguments)]
async fn in_cluster(
    state: &AppState,
    cluster: &super::cluster::Cluster,
    ip: std::net::IpAddr,
    (prefix, kind): (&str, &str),
    action: &str,
    query: Option<&str>,
    pairs: &[(String, String)],
    body: &Value,
) -> Result<Option<u64>, Response> {
    let Some(token) = get(pairs, "token") else {
        return Ok(None);
    };
    let Some(login) = cluster.shared_login(token, SHARED_LOGIN_TTL_MS).await else {
        return Ok(None);
    };
    if get(pairs, "userID") != Some(login.user_id.as_str()) {
        return Ok(None); // the room service refuses it as it would any mismatch
    }
    let Some(random) = hex::decode(token)
        .ok()
        .and_then(|r| <[u8; 16]>::try_from(r).ok())
    else {
        return Ok(None);
    };
    let (tx, _rx) = tokio::sync::oneshot::channel();
    let _ = state
        .control
        .send(ControlCommand::RoomServiceLogin {
            sdk_app_id: login.sdk_app_id,
            user_id: login.user_id.clone(),
            expires_at: login.expires_at,
            random,
            reply: tx,
        })
        .await;
    let app = Some(login.sdk_app_id);
    let Some(room) = body
        .get("roomID")
        .and_then(|v| match v {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .and_then(|r| crate::weapp::room_id_of(&r))
    else {
        return Ok(app);
    };
    let key = crate::room::RoomKey {
        sdk_app_id: login.sdk_app_id,
        room,
    };
    let node = match cluster.route(&key).await {
        Ok(crate::cluster::Route::Remote(node)) => node,
        _ => return Ok(app),
    };
    let path = format!("/weapp/{prefix}/{action}");
    let answer = post_to(cluster, &node, &path, query, ip, body, 10)
        .send()
        .await;
    let answer = match answer {
        Ok(a) => a,
        Err(e) => {
            cluster.suspect(&node);
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                -1,
                format!(
                    "the room's node {} cannot be reached now ({e}); try again",
                    node.id
                ),
            ));
        }
    };
    tracing::debug!(node = %node.id, action, "room-service call forwarded to the room's node");
    state
        .metrics
        .room_service_calls
        .with_label_values(&[kind, "forwarded"])
        .inc();
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let text = answer.bytes().await.unwrap_or_default();
    Err((
        status,
        [(
            axum::http::header::CONTENT_TYPE,
            "application/json; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// In a cluster, after a call served here succeeded: a room it made is mapped to this
/// node at once; a push it bound (`add_pusher`) is to come here from wherever it is.
async fn after_in_cluster(
    cluster: &super::cluster::Cluster,
    app: u64,
    action: &str,
    body: &Value,
    answer: &Map<String, Value>,
) {
    match action {
        "create_room" => {
            let room = answer.get("roomID").and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            });
            if let Some(room) = room.and_then(|r| crate::weapp::room_id_of(&r)) {
                cluster
                    .claim_room(&crate::room::RoomKey {
                        sdk_app_id: app,
                        room,
                    })
                    .await;
            }
        }
        "add_pusher" | "add_anchor" => {
            let url = body.get("pushURL").and_then(Value::as_str).unwrap_or("");
            let path = url.split('?').next().unwrap_or("");
            if let Some(stream) = path.rsplit('/').next().filter(|s| !s.is_empty()) {
                if crate::weapp::push_stream_app(stream).is_some() {
                    cluster.bind_push_here(stream).await;
                }
            }
        }
        _ => {}
    }
}

fn outcome(m: &Map<String, Value>) -> &'static str {
    match m.get("code").and_then(Value::as_i64) {
        Some(0) => "ok",
        Some(code::AUTH) => "auth",
        Some(code::MISSING_PARAM) => "bad_request",
        Some(code::FULL) => "full",
        _ => "refused",
    }
}

fn parse_body(b: &Bytes) -> Result<Value, String> {
    if b.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    match serde_json::from_slice::<Value>(b) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("请求失败: the body must be a JSON object".into()),
        Err(e) => Err(format!("请求失败: the body is not JSON ({e})")),
    }
}

/// Sends a room-service command to the control task and waits for its answer.
async fn ask(state: &AppState, cmd: ControlCommand) -> Result<Map<String, Value>, Response> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let cmd = match cmd {
        ControlCommand::RoomService { call, .. } => ControlCommand::RoomService { call, reply: tx },
        other => other,
    };
    if state.control.send(cmd).await.is_err() {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            -1,
            "the control plane is gone",
        ));
    }
    match tokio::time::timeout(std::time::Duration::from_secs(5), rx).await {
        Ok(Ok(m)) => Ok(m),
        _ => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            -1,
            "the room service did not answer",
        )),
    }
}

/// `login?sdkAppID=&userID=&userSig=` (§5.3): the userSig is checked with Weir's own
/// credential code; the answer's token authenticates the user's later calls.
async fn login(
    state: &AppState,
    ip: std::net::IpAddr,
    kind: Kind,
    pairs: &[(String, String)],
    body: &Value,
) -> Response {
    let param = |name: &str| -> Option<String> {
        get(pairs, name)
            .map(str::to_owned)
            .or_else(|| body.get(name).and_then(Value::as_str).map(str::to_owned))
            .filter(|s| !s.is_empty())
    };
    let (Some(app), Some(user), Some(sig)) = (param("sdkAppID"), param("userID"), param("userSig"))
    else {
        return error(
            StatusCode::OK,
            code::MISSING_PARAM,
            "请求失败，缺少参数: sdkAppID, userID, userSig",
        );
    };
    if let Err(why) = state.may_verify(ip) {
        return error(StatusCode::OK, code::AUTH, why);
    }
    let now = crate::auth::unix_now();
    let verified = app
        .parse::<u64>()
        .map_err(|_| "sdkAppID is not a number".to_owned())
        .and_then(|app| {
            state
                .keyring
                .app(app)
                .and_then(|k| k.verify_user_sig(&sig, &user, now))
                .map_err(|e| e.to_string())
        });
    let identity = match verified {
        Ok(id) => id,
        Err(why) => {
            state.verify_failed(ip);
            state
                .metrics
                .room_service_calls
                .with_label_values(&[kind.name(), "auth"])
                .inc();
            return error(
                StatusCode::OK,
                code::AUTH,
                format!("请求失败，鉴权失败: {why}"),
            );
        }
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let cmd = ControlCommand::RoomServiceLogin {
        sdk_app_id: identity.sdk_app_id,
        user_id: identity.user_id.clone(),
        expires_at: identity.expires_at,
        random: rand::random(),
        reply: tx,
    };
    if state.control.send(cmd).await.is_err() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            -1,
            "the control plane is gone",
        );
    }
    let token = match tokio::time::timeout(std::time::Duration::from_secs(5), rx).await {
        Ok(Ok(Some(t))) => t,
        Ok(Ok(None)) => {
            return error(
                StatusCode::OK,
                code::NOT_SUPPORTED,
                "the room service is off",
            )
        }
        _ => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                -1,
                "the room service did not answer",
            )
        }
    };
    state
        .metrics
        .room_service_calls
        .with_label_values(&[kind.name(), "ok"])
        .inc();
    if let Some(cluster) = &state.cluster {
        let shared = super::cluster::SharedLogin {
            sdk_app_id: identity.sdk_app_id,
            user_id: identity.user_id.clone(),
            expires_at: identity.expires_at,
        };
        cluster
            .share_login(&token, &shared, SHARED_LOGIN_TTL_MS)
            .await;
    }
    let mut m = Map::new();
    m.insert("code".into(), json!(0));
    m.insert("message".into(), json!("请求成功"));
    m.insert("userID".into(), json!(identity.user_id));
    m.insert("token".into(), json!(token));
    if kind == Kind::Live {
        m.insert(
            "timestamp".into(),
            json!(std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0)),
        );
    }
    reply(StatusCode::OK, m)
}
