//! The shell of [`crate::hooks`]: one task owns an outbox per callback URL and sends
//! each outbox's head with reqwest (one request in flight per URL, each bounded by
//! `timeout_ms`). Events reach it through a bounded channel that never blocks the
//! sender: a full channel drops the event (counted), so neither a dead backend nor a
//! slow one can hold up media, signaling or recording.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::config::CallbacksConfig;
use crate::hooks::{Outbox, OutboxConfig, OutboxStats, Request};
use crate::metrics::Metrics;

/// Events in the channel to the callbacks task.
const CHANNEL: usize = 4096;

struct Event {
    sdk_app_id: u64,
    kind: &'static str,
    body: Map<String, Value>,
}

/// Where events are handed in; cheap to clone.
#[derive(Clone)]
pub struct Callbacks {
    tx: mpsc::Sender<Event>,
    metrics: Arc<Metrics>,
    config: Arc<CallbacksConfig>,
}

impl Callbacks {
    /// The callbacks task, if any URL is configured (None: events go nowhere).
    pub fn start(
        config: &CallbacksConfig,
        metrics: Arc<Metrics>,
    ) -> Option<(Self, impl std::future::Future<Output = ()> + Send + 'static)> {
        if config.url.is_empty() && config.apps.is_empty() {
            return None;
        }
        let (tx, rx) = mpsc::channel(CHANNEL);
        let config = Arc::new(config.clone());
        let task = run(rx, config.clone(), metrics.clone());
        Some((
            Self {
                tx,
                metrics,
                config,
            },
            task,
        ))
    }

    /// Does this app have a callback URL.
    pub fn wants(&self, sdk_app_id: u64) -> bool {
        self.config.target(sdk_app_id).is_some()
    }

    /// Hands an event over; never waits.
    pub fn send(&self, sdk_app_id: u64, kind: &'static str, body: Map<String, Value>) {
        if !self.wants(sdk_app_id) {
            return;
        }
        let event = Event {
            sdk_app_id,
            kind,
            body,
        };
        if self.tx.try_send(event).is_err() {
            self.metrics
                .callbacks
                .with_label_values(&[kind, "dropped_full"])
                .inc();
        }
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Target {
    outbox: Outbox,
    /// Stats already counted in metrics.
    counted: OutboxStats,
    /// The kind of the request in flight, for its outcome's label.
    in_flight: Option<&'static str>,
}

async fn run(mut rx: mpsc::Receiver<Event>, config: Arc<CallbacksConfig>, metrics: Arc<Metrics>) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_millis(config.timeout_ms.max(1)))
        .connect_timeout(Duration::from_millis(config.timeout_ms.max(1)))
        .pool_max_idle_per_host(2)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            // Without a client nothing can be delivered; say so and keep draining.
            warn!(error = %e, "callbacks: no HTTP client, events will be dropped");
            while rx.recv().await.is_some() {}
            return;
        }
    };
    let outbox_config = OutboxConfig {
        max_events: config.max_queued.max(1),
        backoff_max: Duration::from_millis(config.backoff_max_ms.max(500)),
        give_up_after: Duration::from_secs(config.give_up_after_s.max(1)),
        ..Default::default()
    };
    let mut targets: HashMap<String, Target> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::channel::<(String, bool)>(64);
    loop {
        let wake = targets
            .values()
            .filter_map(|t| t.outbox.poll_timeout())
            .min();
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                let Some((url, key)) = config.target(ev.sdk_app_id) else { continue };
                let target = targets.entry(url.to_owned()).or_insert_with(|| Target {
                    outbox: Outbox::new(outbox_config, key),
                    counted: OutboxStats::default(),
                    in_flight: None,
                });
                target.outbox.push(ev.kind, ev.sdk_app_id, ev.body, Instant::now());
            }
            done = done_rx.recv() => {
                let Some((url, ok)) = done else { break };
                if let Some(t) = targets.get_mut(&url) {
                    t.outbox.on_result(ok, Instant::now());
                }
            }
            _ = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        let now = Instant::now();
        let unix_s = unix_ms() / 1000;
        for (url, t) in targets.iter_mut() {
            // Count what happened since the last turn, under the event kind in
            // flight (outcomes of the head) or "any" for queue-wide drops.
            let s = t.outbox.stats;
            let kind = t.in_flight.unwrap_or("any");
            let c = &metrics.callbacks;
            c.with_label_values(&[kind, "delivered"])
                .inc_by(s.delivered - t.counted.delivered);
            c.with_label_values(&[kind, "failed_attempt"])
                .inc_by(s.failed_attempts - t.counted.failed_attempts);
            c.with_label_values(&["any", "dropped_full"])
                .inc_by(s.dropped_full - t.counted.dropped_full);
            c.with_label_values(&["any", "expired"])
                .inc_by(s.expired - t.counted.expired);
            t.counted = s;
            if let Some(req) = t.outbox.poll_send(now, unix_s) {
                t.in_flight = Some(req.kind);
                tokio::spawn(deliver(client.clone(), url.clone(), req, done_tx.clone()));
            }
        }
        metrics
            .callbacks_queued
            .set(targets.values().map(|t| t.outbox.len() as i64).sum());
    }
}

async fn deliver(
    client: reqwest::Client,
    url: String,
    req: Request,
    done: mpsc::Sender<(String, bool)>,
) {
    let result = client
        .post(&url)
        .header("content-type", "application/json")
        .header("x-weir-signature", &req.signature)
        // TRTC's header names: base64 HMAC-SHA256 of the body, and the app.
        .header("sign", &req.trtc_sign)
        .header("sdkappid", req.sdk_app_id.to_string())
        .header("x-weir-event", req.kind)
        .body(req.body)
        .send()
        .await;
    let ok = match result {
        Ok(r) if r.status().is_success() => true,
        Ok(r) => {
            debug!(%url, status = %r.status(), event = req.kind, "callback refused; retrying");
            false
        }
        Err(e) => {
            debug!(%url, error = %e, event = req.kind, "callback not delivered; retrying");
            false
        }
    };
    let _ = done.send((url, ok)).await;
}

/// TRTC's room event callback (EventGroupId 1): 101 room created, 102 dismissed, 103 a
/// member entered, 104 exited (`Reason` 1 left, 2 timed out or disconnected, 3
/// removed, 4 replaced by a new session of the same user, 5 server shutdown).
pub fn room_event(cb: &Callbacks, event: &crate::room::RoomEvent, now_ms: u64) {
    use crate::room::RoomEvent;
    use weir_signaling::LeaveReason;
    let (room, event_type, user, reason) = match event {
        RoomEvent::Created { room } => (room, 101, None, None),
        RoomEvent::Dismissed { room } => (room, 102, None, None),
        RoomEvent::Entered { room, user_id } => (room, 103, Some(user_id), None),
        RoomEvent::Exited {
            room,
            user_id,
            reason,
        } => {
            let r = match reason {
                LeaveReason::Left => 1,
                LeaveReason::Disconnected | LeaveReason::Timeout => 2,
                LeaveReason::Removed => 3,
                LeaveReason::Replaced => 4,
                LeaveReason::ServerShutdown => 5,
            };
            (room, 104, Some(user_id), Some(r))
        }
    };
    let room_id: Value = match &room.room {
        crate::auth::RoomId::Num(n) => (*n).into(),
        crate::auth::RoomId::Str(s) => s.clone().into(),
    };
    let mut info = Map::new();
    info.insert("RoomId".into(), room_id);
    info.insert("EventTs".into(), (now_ms / 1000).into());
    info.insert("EventMsTs".into(), now_ms.into());
    if let Some(u) = user {
        info.insert("UserId".into(), u.clone().into());
    }
    if let Some(r) = reason {
        info.insert("Reason".into(), r.into());
    }
    let mut body = Map::new();
    body.insert("EventGroupId".into(), 1.into());
    body.insert("EventType".into(), event_type.into());
    body.insert("CallbackTs".into(), now_ms.into());
    body.insert("EventInfo".into(), Value::Object(info));
    let kind = match event_type {
        101 => "room_created",
        102 => "room_dismissed",
        103 => "member_entered",
        _ => "member_exited",
    };
    cb.send(room.sdk_app_id, kind, body);
}

/// `on_publish` and `on_play`: the backend is asked before a push or a play is let
/// in (SRS's hooks): the request is POSTed as JSON (`action`, `ip`, `app`, `stream`,
/// `protocol`, `sdk_app_id`, `room_id`, `user_id`) with `X-Weir-Signature`, after
/// Weir's own credential check. A 2xx answer whose body is `0` or `{"code":0}` lets it
/// in; any other answer refuses it (the body is the reason). No answer within
/// `hook_timeout_ms` (or an unreachable backend) does what `hook_allow_on_timeout` says.
pub struct Admission {
    client: reqwest::Client,
    on_publish: String,
    on_play: String,
    key: String,
    allow_on_timeout: bool,
    metrics: Arc<Metrics>,
}

/// What is asked of the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    Publish,
    Play,
}

/// Who asks to push or play what, through which door.
pub struct Asking<'a> {
    pub ip: std::net::IpAddr,
    pub stream: &'a str,
    /// `rtmp`, `flv`, `webrtc` (signaling), `whip`, `whep`.
    pub protocol: &'a str,
    pub sdk_app_id: Option<u64>,
    pub room_id: Option<String>,
    pub user_id: Option<&'a str>,
}

impl Asking<'_> {
    fn fields(&self) -> Map<String, Value> {
        let mut fields = Map::new();
        fields.insert("ip".into(), self.ip.to_string().into());
        fields.insert("stream".into(), self.stream.into());
        fields.insert("protocol".into(), self.protocol.into());
        if let Some(app) = self.sdk_app_id {
            fields.insert("sdk_app_id".into(), app.into());
        }
        if let Some(room) = &self.room_id {
            fields.insert("room_id".into(), room.clone().into());
        }
        if let Some(user) = self.user_id {
            fields.insert("user_id".into(), user.into());
        }
        fields
    }
}

impl Admission {
    /// Asks the backend about `asking`, if a hook is set for `ask` (no hook: let in).
    pub async fn may(this: &Option<Arc<Self>>, ask: Ask, asking: Asking<'_>) -> Result<(), String> {
        match this {
            Some(hooks) => hooks.ask(ask, asking.fields()).await,
            None => Ok(()),
        }
    }

    /// [`Self::may`] for a stream of a room (signaling, WHIP, WHEP).
    pub async fn for_room(
        this: &Option<Arc<Self>>,
        ip: std::net::IpAddr,
        ask: Ask,
        stream: &str,
        protocol: &str,
        key: &crate::room::RoomKey,
        user: Option<&str>,
    ) -> Result<(), String> {
        let asking = Asking {
            ip,
            stream,
            protocol,
            sdk_app_id: Some(key.sdk_app_id),
            room_id: Some(key.name()),
            user_id: user,
        };
        Self::may(this, ask, asking).await
    }

    pub fn from_config(config: &CallbacksConfig, metrics: Arc<Metrics>) -> Option<Arc<Self>> {
        if config.on_publish_url.is_empty() && config.on_play_url.is_empty() {
            return None;
        }
        let timeout = Duration::from_millis(config.hook_timeout_ms.max(1));
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .ok()?;
        Some(Arc::new(Self {
            client,
            on_publish: config.on_publish_url.clone(),
            on_play: config.on_play_url.clone(),
            key: config.key.clone(),
            allow_on_timeout: config.hook_allow_on_timeout,
            metrics,
        }))
    }

    /// Asks the backend; Err is the refusal's reason.
    async fn ask(&self, ask: Ask, mut fields: Map<String, Value>) -> Result<(), String> {
        let (url, action) = match ask {
            Ask::Publish => (&self.on_publish, "on_publish"),
            Ask::Play => (&self.on_play, "on_play"),
        };
        if url.is_empty() {
            return Ok(());
        }
        fields.insert("action".into(), action.into());
        fields.insert("app".into(), "live".into());
        let body = serde_json::to_vec(&fields).expect("a JSON map serializes");
        let signature = crate::hooks::body_signature(&self.key, &body);
        let count = |outcome: &str| {
            self.metrics
                .admission_hooks
                .with_label_values(&[action, outcome])
                .inc()
        };
        let answer = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("x-weir-signature", signature)
            .body(body)
            .send()
            .await;
        let answer = match answer {
            Ok(mut r) => {
                let status = r.status();
                // The answer's body is read up to 4 KiB: a verdict and a reason, not a
                // document (a backend's mistake must not cost the node memory).
                let mut body = Vec::new();
                while body.len() < 4096 {
                    match r.chunk().await {
                        Ok(Some(c)) => body.extend_from_slice(&c[..c.len().min(4096 - body.len())]),
                        _ => break,
                    }
                }
                let text = String::from_utf8_lossy(&body);
                Some((status, text.chars().take(200).collect::<String>()))
            }
            Err(e) => {
                debug!(%url, error = %e, action, "admission hook did not answer");
                None
            }
        };
        match answer {
            Some((status, text)) => {
                let t = text.trim();
                let zero = t == "0"
                    || serde_json::from_str::<Value>(t)
                        .is_ok_and(|v| v.get("code").and_then(Value::as_i64) == Some(0));
                if status.is_success() && zero {
                    count("allowed");
                    Ok(())
                } else {
                    count("refused");
                    Err(format!("refused by the backend ({status}): {t}"))
                }
            }
            None if self.allow_on_timeout => {
                count("timeout_allowed");
                Ok(())
            }
            None => {
                count("timeout_refused");
                Err("the backend's admission hook did not answer".into())
            }
        }
    }
}
