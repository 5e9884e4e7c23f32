//! Callbacks to the customer's backend, sans I/O: one [`Outbox`] per URL, a bounded
//! FIFO that hands out one request at a time and retries it with backoff until the
//! backend answers 2xx or the event is too old. The shell (`server::hooks`) does the
//! HTTP; a dead backend costs a bounded queue and one request in flight, never media.
//!
//! Bodies are Tencent-shaped so existing backends can take them: the CSS events
//! (`event_type` 1 push began, 0 push ended, 100 recording file) carry `t` (when the
//! signature expires) and `sign` = MD5(key + t), stamped when each attempt is sent.
//! TRTC's room events (`EventGroupId` 1) are bodies of their own shape. Every request
//! carries `X-Weir-Signature: sha256=<hex HMAC-SHA256(key, body)>`, which unlike `sign`
//! covers the body, and TRTC's `Sign` (the same HMAC in base64) and `SdkAppId` headers.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use serde_json::{Map, Value};

#[derive(Debug, Clone, Copy)]
pub struct OutboxConfig {
    /// Events queued at most; when full, the oldest not in flight is dropped.
    pub max_events: usize,
    /// Bytes of queued bodies at most (same rule).
    pub max_bytes: usize,
    /// First retry delay, doubled after each failure up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// An event still undelivered this long after it happened is dropped.
    pub give_up_after: Duration,
    /// How long `t` (the signature's expiry) lies after the sending time.
    pub sign_validity_s: u64,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            max_events: 10_000,
            max_bytes: 16 << 20,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(10),
            give_up_after: Duration::from_secs(24 * 3600),
            sign_validity_s: 600,
        }
    }
}

/// What happened to events, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OutboxStats {
    pub delivered: u64,
    /// Attempts that failed (error, timeout or non-2xx).
    pub failed_attempts: u64,
    /// Dropped because the queue was full.
    pub dropped_full: u64,
    /// Dropped because they could not be delivered within `give_up_after`.
    pub expired: u64,
}

struct Pending {
    kind: &'static str,
    sdk_app_id: u64,
    body: Map<String, Value>,
    /// Serialized size, for the byte bound.
    size: usize,
    queued: Instant,
}

/// One request to send now.
#[derive(Debug, Clone)]
pub struct Request {
    pub kind: &'static str,
    pub sdk_app_id: u64,
    pub body: Bytes,
    /// `sha256=<hex>` of the body under the key.
    pub signature: String,
    /// TRTC's `Sign` header: base64 of the same HMAC.
    pub trtc_sign: String,
}

pub struct Outbox {
    cfg: OutboxConfig,
    key: String,
    queue: VecDeque<Pending>,
    bytes: usize,
    in_flight: bool,
    failures: u32,
    next_try: Option<Instant>,
    pub stats: OutboxStats,
}

impl Outbox {
    pub fn new(cfg: OutboxConfig, key: &str) -> Self {
        Self {
            cfg,
            key: key.to_owned(),
            queue: VecDeque::new(),
            bytes: 0,
            in_flight: false,
            failures: 0,
            next_try: None,
            stats: OutboxStats::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Queues an event (a JSON object without `t` and `sign`).
    pub fn push(
        &mut self,
        kind: &'static str,
        sdk_app_id: u64,
        body: Map<String, Value>,
        now: Instant,
    ) {
        let size = serde_json::to_vec(&body).map_or(0, |b| b.len());
        self.queue.push_back(Pending {
            kind,
            sdk_app_id,
            body,
            size,
            queued: now,
        });
        self.bytes += size;
        // The head may be in flight: drop the oldest after it.
        let keep_head = usize::from(self.in_flight);
        while (self.queue.len() > self.cfg.max_events || self.bytes > self.cfg.max_bytes)
            && self.queue.len() > keep_head + 1
        {
            let gone = self.queue.remove(keep_head).expect("checked length");
            self.bytes -= gone.size;
            self.stats.dropped_full += 1;
        }
    }

    /// When [`Self::poll_send`] next has something (None: nothing queued, or in flight).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.in_flight || self.queue.is_empty() {
            return None;
        }
        Some(self.next_try.unwrap_or_else(Instant::now))
    }

    /// The request to send now, if one is due; `unix_s` is the wall clock.
    pub fn poll_send(&mut self, now: Instant, unix_s: u64) -> Option<Request> {
        if self.in_flight {
            return None;
        }
        while let Some(head) = self.queue.front() {
            if now.duration_since(head.queued) < self.cfg.give_up_after {
                break;
            }
            let gone = self.queue.pop_front().expect("front exists");
            self.bytes -= gone.size;
            self.stats.expired += 1;
            self.failures = 0;
            self.next_try = None;
        }
        if self.next_try.is_some_and(|t| now < t) {
            return None;
        }
        let head = self.queue.front()?;
        let mut body = head.body.clone();
        if body.contains_key("event_type") {
            let t = unix_s + self.cfg.sign_validity_s;
            body.insert("t".into(), t.into());
            body.insert("sign".into(), tencent_sign(&self.key, t).into());
        }
        let body = Bytes::from(serde_json::to_vec(&body).expect("a JSON map serializes"));
        self.in_flight = true;
        let mac = hmac_sha256(&self.key, &body);
        Some(Request {
            kind: head.kind,
            sdk_app_id: head.sdk_app_id,
            signature: format!("sha256={}", hex::encode(mac)),
            trtc_sign: base64::engine::general_purpose::STANDARD.encode(mac),
            body,
        })
    }

    /// The outcome of the request in flight.
    pub fn on_result(&mut self, delivered: bool, now: Instant) {
        if !self.in_flight {
            return;
        }
        self.in_flight = false;
        if delivered {
            if let Some(gone) = self.queue.pop_front() {
                self.bytes -= gone.size;
            }
            self.stats.delivered += 1;
            self.failures = 0;
            self.next_try = None;
        } else {
            self.stats.failed_attempts += 1;
            let backoff = self
                .cfg
                .backoff_min
                .saturating_mul(1 << self.failures.min(16))
                .min(self.cfg.backoff_max);
            self.failures += 1;
            self.next_try = Some(now + backoff);
        }
    }
}

/// Tencent's callback signature: hex MD5 of the key followed by `t` in decimal.
pub fn tencent_sign(key: &str, t: u64) -> String {
    let mut h = Md5::new();
    h.update(key.as_bytes());
    h.update(t.to_string().as_bytes());
    hex::encode(h.finalize())
}

/// `sha256=<hex HMAC-SHA256(key, body)>`.
pub fn body_signature(key: &str, body: &[u8]) -> String {
    format!("sha256={}", hex::encode(hmac_sha256(key, body)))
}

fn hmac_sha256(key: &str, body: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests;
