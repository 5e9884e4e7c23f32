//! HTTP routes: websocket signaling, metrics, health and readiness.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State, WebSocketUpgrade};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::{Bytes, BytesMut};
use tokio::sync::watch;

use super::AppState;

/// What hyper may buffer per connection, written or read (hyper's minimum is 8 KiB).
/// The default (~400 KiB, or 16 chunks) would hold seconds of a slow HTTP-FLV
/// player's stream where its queue's latency control cannot see it; request heads
/// larger than this are refused.
const HTTP_BUFFER_BYTES: usize = 16 * 1024;
/// A client must send a whole request head within this (slow-loris connections, and
/// idle keep-alive ones, are closed).
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The public listener: signaling, HTTP-FLV, the SDK and demo page, health; and
/// `/metrics` only when a bearer token is configured (its labels name rooms and users).
pub fn public_routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ws", get(websocket))
        .route("/metrics", get(guarded_metrics))
        .route("/healthz", get(health))
        .route("/readyz", get(ready))
        .route("/live/{file}", get(http_flv))
        .route(
            "/weapp/{kind}/{action}",
            axum::routing::any(super::weapp::call),
        )
        .route(
            "/whip",
            axum::routing::post(super::whip::publish)
                .options(super::whip::options)
                .layer(axum::extract::DefaultBodyLimit::max(
                    super::whip::MAX_OFFER_BYTES,
                )),
        )
        .route(
            "/whep/{stream}",
            axum::routing::post(super::whip::play)
                .options(super::whip::options)
                .layer(axum::extract::DefaultBodyLimit::max(
                    super::whip::MAX_OFFER_BYTES,
                )),
        )
        .route(
            "/whep/resource/{id}",
            axum::routing::delete(super::whip::delete)
                .patch(super::whip::patch)
                .options(super::whip::options)
                .layer(axum::extract::DefaultBodyLimit::max(
                    super::whip::MAX_OFFER_BYTES,
                )),
        )
        .route(
            "/whip/resource/{id}",
            axum::routing::delete(super::whip::delete)
                .patch(super::whip::patch)
                .options(super::whip::options)
                .layer(axum::extract::DefaultBodyLimit::max(
                    super::whip::MAX_OFFER_BYTES,
                )),
        )
        .route(
            "/v1/record/start",
            axum::routing::post(super::record_api::start),
        )
        .route(
            "/v1/record/stop",
            axum::routing::post(super::record_api::stop),
        )
        .route("/v1/record/files", get(super::record_api::list))
        .route(
            "/v1/record/files/{stream}/{file}",
            get(super::record_api::file),
        )
        .merge(super::web::routes())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            behind_proxies,
        ))
        .with_state(state)
}

/// Through a trusted reverse proxy, the client is the one its `X-Forwarded-For`
/// names: every handler's [`PeerAddr`] (per-client limits, failed-credential
/// throttling, logs) is that client's.
async fn behind_proxies(
    State(state): State<Arc<AppState>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(PeerAddr(peer)) = req.extensions().get::<PeerAddr>().copied() {
        if state.proxies.contains(peer.ip()) {
            let hops: Vec<&str> = req
                .headers()
                .get_all("x-forwarded-for")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            let client = state.proxies.client(peer.ip(), &hops);
            req.extensions_mut()
                .insert(PeerAddr(std::net::SocketAddr::new(client, 0)));
        }
    }
    next.run(req).await
}

/// The operator's listener (`metrics_addr`, loopback by default): metrics and health.
pub fn ops_routes(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(health))
        .route("/readyz", get(ready))
        .route("/cluster", get(cluster))
        .with_state(state)
}

/// The client's address, for per-client limits (an extension on every request).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// Serves `app` on `listener` (over TLS when `tls` is given) until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limit: Arc<crate::limits::Connections>,
    tls: Option<Arc<super::tls::Tls>>,
    mut stop: watch::Receiver<bool>,
) {
    // Connections are told to finish when this sender is dropped; the serve loop
    // returns once every one has (the server bounds that wait with its grace).
    let (closing_tx, closing_rx) = watch::channel(());
    let (done_tx, done_rx) = watch::channel(());
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    loop {
        let (socket, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors, say: keep serving the connections there are.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stopped => break,
        };
        let permit = match limit.admit(peer.ip()) {
            Ok(p) => p,
            Err(why) => {
                tracing::debug!(%peer, why, "HTTP connection over the limit; closed");
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(
            app.clone().layer(axum::Extension(PeerAddr(peer))),
        );
        let closing = closing_rx.clone();
        let done = done_rx.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(socket, service, peer, closing).await,
                Some(tls) => {
                    let handshake = tls.acceptor().accept(socket);
                    match tokio::time::timeout(super::tls::HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(stream)) => serve_connection(stream, service, peer, closing).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(done);
            drop(permit);
        });
    }
    drop(listener);
    drop(closing_tx);
    drop(done_rx);
    done_tx.closed().await;
}

/// One HTTP/1 connection (plain or TLS), bounded as the constants above say, until it
/// ends or the server closes.
async fn serve_connection<I>(
    io: I,
    service: hyper_util::service::TowerToHyperService<Router>,
    peer: std::net::SocketAddr,
    mut closing: watch::Receiver<()>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .max_buf_size(HTTP_BUFFER_BYTES)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
        }
        _ = closing.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

async fn websocket(
    ws: WebSocketUpgrade,
    State(state): State<Arc<AppState>>,
    axum::Extension(PeerAddr(peer)): axum::Extension<PeerAddr>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Some(why) = state.unavailable() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response();
    }
    // Sent by another node that chose this one to carry a spilling room's member.
    let edge_hop = headers.contains_key(super::relay::EDGE_HEADER);
    ws.max_message_size(weir_signaling::MAX_MESSAGE_BYTES)
        .max_frame_size(weir_signaling::MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| super::ws::session(socket, state, peer.ip(), edge_hop))
}

/// Keeps the players gauge true however the response ends.
struct PlayingGauge(prometheus::IntGauge);

impl Drop for PlayingGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// HTTP-FLV: `/live/STREAM.flv?…` streams the FLV header then tags as they come,
/// chunked, with CORS for web players. Authorized like RTMP play.
async fn http_flv(
    Path(file): Path<String>,
    RawQuery(query): RawQuery,
    State(state): State<Arc<AppState>>,
    axum::Extension(PeerAddr(peer)): axum::Extension<PeerAddr>,
) -> Response {
    let count = |outcome: &str| {
        state
            .metrics
            .play_requests
            .with_label_values(&["http-flv", outcome])
            .inc()
    };
    let Some(stream) = file.strip_suffix(".flv") else {
        count("not_found");
        return (StatusCode::NOT_FOUND, "play URLs end in .flv\n").into_response();
    };
    let query_text = query.clone();
    let params: Vec<(String, String)> =
        url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    let authorized = match super::rtmp::authorize_play(&state, peer.ip(), stream, &params) {
        Ok(source) => super::rtmp::ask_play(&state, peer.ip(), stream, "http-flv", source).await,
        Err(r) => Err(r),
    };
    let source = match authorized {
        Ok(s) => s,
        Err(r) if r.outcome == "not_found" && state.cluster.is_some() => {
            // Live on another node of the cluster: the player goes there.
            let cluster = state.cluster.as_ref().expect("checked");
            match cluster.stream_node(stream).await {
                Some(node) => {
                    count("redirected");
                    let pq = match &query_text {
                        Some(q) => format!("/live/{file}?{q}"),
                        None => format!("/live/{file}"),
                    };
                    return cluster.redirect(&node, &pq, "http-flv");
                }
                None => {
                    count(r.outcome);
                    return (StatusCode::NOT_FOUND, format!("{}\n", r.message)).into_response();
                }
            }
        }
        Err(r) => {
            count(r.outcome);
            tracing::info!(%stream, reason = %r.message, "HTTP-FLV play refused");
            let status = if r.outcome == "not_found" {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::FORBIDDEN
            };
            return (status, format!("{}\n", r.message)).into_response();
        }
    };
    count("ok");
    tracing::info!(%stream, "HTTP-FLV player playing");
    let player = source.subscribe();
    let gauge = state.metrics.players.with_label_values(&["http-flv"]);
    gauge.inc();
    let guard = PlayingGauge(gauge);
    let body = futures_util::stream::unfold(
        (player, guard, false),
        |(player, guard, started)| async move {
            if !started {
                let header: Result<Bytes, std::io::Error> = Ok(crate::live::flv::header());
                return Some((header, (player, guard, true)));
            }
            match player.next().await {
                crate::live::Next::Closed => None,
                crate::live::Next::Tags(tags) => {
                    let mut out = BytesMut::new();
                    for t in &tags {
                        out.extend_from_slice(&crate::live::flv::tag(t));
                    }
                    Some((Ok(out.freeze()), (player, guard, true)))
                }
            }
        },
    );
    (
        [
            ("content-type", "video/x-flv"),
            ("access-control-allow-origin", "*"),
            ("cache-control", "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// `/metrics` on the public listener: with `Authorization: Bearer <metrics_token>`
/// when a token is configured, otherwise not there.
async fn guarded_metrics(
    State(state): State<Arc<AppState>>,
    headers: axum::http::HeaderMap,
) -> Response {
    let Some(token) = state.metrics_token.as_deref() else {
        return (
            StatusCode::NOT_FOUND,
            "metrics are served on the metrics address (metrics_addr), or here with metrics_token\n",
        )
            .into_response();
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    use subtle::ConstantTimeEq;
    if given.len() != token.len() || !bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Bearer")],
            "a bearer token is needed\n",
        )
            .into_response();
    }
    metrics(State(state)).await.into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    // Tasks alive on the runtime: a leak of sessions or connections shows here first.
    state.metrics.tasks.set(
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks() as i64,
    );
    (
        [("content-type", "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// Liveness: every supervised part of the node is alive (a draining node is alive).
async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.supervisor.failure() {
        Some(f) => (StatusCode::SERVICE_UNAVAILABLE, format!("failing: {f}\n")).into_response(),
        None => "ok\n".into_response(),
    }
}

/// The cluster as this node sees it (404 when it runs alone).
async fn cluster(State(state): State<Arc<AppState>>) -> Response {
    let Some(c) = &state.cluster else {
        return (
            StatusCode::NOT_FOUND,
            "this node runs alone (no [cluster] redis_url)\n",
        )
            .into_response();
    };
    axum::Json(serde_json::json!({
        "node": c.id,
        "redisUp": c.redis_up(),
        "draining": c.is_draining(),
        "nodes": c.nodes(),
        "localRooms": c.local_rooms(),
    }))
    .into_response()
}

/// Readiness: alive and taking new work.
async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if let Some(f) = state.supervisor.failure() {
        (StatusCode::SERVICE_UNAVAILABLE, format!("failing: {f}\n")).into_response()
    } else if state.shutting_down.load(Ordering::Relaxed)
        || state.cluster.as_ref().is_some_and(|c| c.is_draining())
    {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        "ready\n".into_response()
    }
}
