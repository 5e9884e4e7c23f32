//! The cluster shell: this node's heartbeat into Redis, the cluster view it reads
//! back, and where a room's join goes (`crate::cluster` decides; this does the I/O).
//!
//! Redis is a cache of what the nodes know, never the only copy: every heartbeat
//! rewrites this node's record and the mapping of every room it serves, so a Redis
//! restarted empty is whole again within a heartbeat. When Redis cannot be reached,
//! a node serves what it has and places new rooms on itself (logged and counted):
//! availability first, a room split across nodes the accepted risk.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, info, warn};

use super::control::ControlCommand;
use crate::cluster::{self as core, keys, Addresses, Decision, Load, NodeRecord, Route};
use crate::config::ClusterConfig;
use crate::metrics::Metrics;
use crate::room::RoomKey;

/// How long a room's mapping lives without its node's heartbeat.
fn room_ttl_ms(config: &ClusterConfig) -> u64 {
    config.node_ttl_ms.saturating_mul(3)
}

/// The room's name in Redis keys: `{sdkappid}/{roomID}`, or `{sdkappid}/s:{strRoomID}`
/// (a numeric and a string room of the same text are two rooms).
pub fn room_name(key: &RoomKey) -> String {
    named(
        key.sdk_app_id,
        matches!(key.room, crate::auth::RoomId::Num(_)),
        &key.name(),
    )
}

/// [`room_name`] from the parts a room summary has.
fn named(sdk_app_id: u64, numeric: bool, room: &str) -> String {
    if numeric {
        format!("{sdk_app_id}/{room}")
    } else {
        format!("{sdk_app_id}/s:{room}")
    }
}

/// Sets a room's mapping to this node if it is unset or already this node's, with its
/// TTL; returns the owner afterwards.
const CLAIM: &str = r#"
local owner = redis.call('GET', KEYS[1])
if (not owner) or owner == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return owner
"#;

/// Deletes a lock only if it still holds our token.
const UNLOCK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Where the member of a spilling room joins.
#[derive(Debug)]
pub enum Edge {
    Here,
    There(Box<NodeRecord>),
}

pub struct Cluster {
    pub id: String,
    config: ClusterConfig,
    conn: ConnectionManager,
    addresses: Addresses,
    max_rooms: u64,
    /// A room of this node with this many members takes further members elsewhere.
    spill_members: usize,
    started_ms: u64,
    draining: AtomicBool,
    /// Rooms this node serves (from the control task each heartbeat, and rooms just
    /// placed here).
    local: RwLock<HashSet<String>>,
    /// Live nodes as last read.
    view: RwLock<Vec<NodeRecord>>,
    /// Nodes this one could not reach, with the time of the record it had then: left
    /// out of the view until they write a newer one.
    suspects: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    redis_up: AtomicBool,
    /// Wakes the heartbeat early (drain).
    poke: Notify,
    overload: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    /// The playable streams here, mapped in Redis each heartbeat.
    hub: Arc<crate::live::Hub>,
    /// Pushes an `add_pusher` bound here, with when each was last live here (or
    /// bound): their binding is renewed each heartbeat until one has been gone for
    /// [`BIND_TTL_MS`], so a pusher that reconnects through another node, however
    /// long the call, is still moved here.
    bound: std::sync::Mutex<HashMap<String, u64>>,
    /// Forwards WHIP/WHEP offers to other nodes.
    pub http: reqwest::Client,
    /// How this node checks the others' HTTPS certificates (relays over `wss://`).
    pub tls: Arc<rustls::ClientConfig>,
    claim: redis::Script,
    unlock: redis::Script,
}

impl Cluster {
    /// `None` without `redis_url`. Connects lazily: a node starts even while Redis is
    /// down, and serves alone until it comes.
    pub fn new(
        config: &ClusterConfig,
        addresses: Addresses,
        max_rooms: usize,
        spill_members: usize,
        overload: Arc<AtomicBool>,
        metrics: Arc<Metrics>,
        hub: Arc<crate::live::Hub>,
    ) -> anyhow::Result<Option<Arc<Self>>> {
        if config.redis_url.is_empty() {
            return Ok(None);
        }
        let client = client(&config.redis_url, &config.redis_ca_file)?;
        let tls = Arc::new(node_tls(&config.node_ca_file)?);
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, manager)
            .context("the Redis connection manager")?;
        let id = if config.node_id.is_empty() {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "weir".into());
            let port = addresses.http.rsplit(':').next().unwrap_or("0").to_owned();
            format!("{host}-{port}")
        } else {
            config.node_id.clone()
        };
        metrics
            .node_info
            .with_label_values(&[&id, &config.region])
            .set(1);
        super::logging::set_node(&id);
        info!(node = %id, redis = %redact(&config.redis_url), http = %addresses.http, "cluster member");
        Ok(Some(Arc::new(Self {
            id,
            config: config.clone(),
            conn,
            addresses,
            max_rooms: max_rooms as u64,
            spill_members: spill_members.max(1),
            started_ms: now_ms(),
            draining: AtomicBool::new(false),
            local: RwLock::new(HashSet::new()),
            view: RwLock::new(Vec::new()),
            suspects: std::sync::Mutex::new(std::collections::HashMap::new()),
            redis_up: AtomicBool::new(false),
            poke: Notify::new(),
            overload,
            metrics,
            hub,
            bound: std::sync::Mutex::new(HashMap::new()),
            http: reqwest::Client::builder()
                .use_preconfigured_tls((*tls).clone())
                .build()
                .context("the HTTP client between nodes")?,
            tls,
            claim: redis::Script::new(CLAIM),
            unlock: redis::Script::new(UNLOCK),
        })))
    }

    /// Stops taking new rooms (SIGTERM): at once in this node's record.
    pub fn drain(&self) {
        if !self.draining.swap(true, Ordering::Relaxed) {
            info!(node = %self.id, "draining: no new rooms land here; rooms here go on until they end");
            self.poke.notify_one();
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The nodes as last read (this one included once it has written its record),
    /// less those found unreachable since their record was written.
    pub fn nodes(&self) -> Vec<NodeRecord> {
        self.view
            .read()
            .expect("cluster view")
            .iter()
            .filter(|n| !self.is_suspect(n))
            .cloned()
            .collect()
    }

    /// `node` could not be reached: treat it as dead until it writes a newer record
    /// (a killed node's rooms are placed again at the next join, not when its record
    /// expires).
    pub fn suspect(&self, node: &NodeRecord) {
        warn!(node = %node.id, "the node cannot be reached: its rooms go elsewhere until it heartbeats again");
        // Until a record written after now: the one in Redis may be newer than the
        // one this node last read, and still the dead node's last.
        self.suspects
            .lock()
            .expect("suspects")
            .insert(node.id.clone(), now_ms().max(node.updated_ms));
        self.metrics
            .cluster_routes
            .with_label_values(&["unreachable"])
            .inc();
    }

    /// The rooms this node serves (as of its last heartbeat, and any placed since).
    pub fn local_rooms(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .local
            .read()
            .expect("local rooms")
            .iter()
            .cloned()
            .collect();
        v.sort();
        v
    }

    pub fn redis_up(&self) -> bool {
        self.redis_up.load(Ordering::Relaxed)
    }

    /// For a member of `room`, served by `origin`: whether it joins on another node
    /// (this one, or the one named) because the room spills there; `None`: it goes
    /// to `origin`. With `hop` (another node chose this one) it is here or nowhere.
    pub fn edge_for(&self, room: &RoomKey, origin: &NodeRecord, hop: bool) -> Option<Edge> {
        if !origin.spills(&room_name(room)) {
            return None;
        }
        let view = self.nodes();
        let here = view.iter().find(|n| n.id == self.id);
        if hop {
            let here =
                here.is_some_and(|n| n.takes_rooms(self.config.max_cpu) && !self.is_draining());
            if here {
                self.metrics
                    .cluster_routes
                    .with_label_values(&["edge"])
                    .inc();
            }
            return here.then_some(Edge::Here);
        }
        let chosen = core::choose_edge(
            &view,
            &origin.id,
            &room_name(room),
            &self.id,
            &self.config.region,
            now_ms(),
            self.config.node_ttl_ms,
            self.config.max_cpu,
        )?;
        let edge = if chosen.id == self.id {
            Edge::Here
        } else {
            Edge::There(Box::new(chosen.clone()))
        };
        self.metrics
            .cluster_routes
            .with_label_values(&[match edge {
                Edge::Here => "edge",
                Edge::There(_) => "edge_elsewhere",
            }])
            .inc();
        Some(edge)
    }

    /// Where a join, push or play for `room` goes. `Err`: no node takes the room.
    pub async fn route(&self, room: &RoomKey) -> Result<Route, String> {
        let name = room_name(room);
        let outcome = self.route_named(&name).await;
        let label = match &outcome {
            Ok(Route::Local) => "local",
            Ok(Route::Remote(_)) => "remote",
            Err(_) => "refused",
        };
        self.metrics
            .cluster_routes
            .with_label_values(&[label])
            .inc();
        outcome
    }

    async fn route_named(&self, name: &str) -> Result<Route, String> {
        if self.local.read().expect("local rooms").contains(name) {
            return Ok(Route::Local);
        }
        let mut conn = self.conn.clone();
        for attempt in 0..40 {
            let decision = match self.decide(&mut conn, name).await {
                Ok(d) => d,
                Err(e) => return Ok(self.alone(name, &e)),
            };
            let owner = match decision {
                (Decision::Go(route), _) => return Ok(route),
                (Decision::Place, owner) => owner,
            };
            // Place it, under the room's lock; whoever holds it decides, the others
            // read the outcome.
            let token = format!("{}:{}", self.id, rand::random::<u64>());
            let locked: Option<String> = match redis::cmd("SET")
                .arg(keys::lock(name))
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(5000)
                .query_async(&mut conn)
                .await
            {
                Ok(l) => l,
                Err(e) => return Ok(self.alone(name, &e)),
            };
            if locked.is_none() {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
            // Decide again with the lock held: another node may have placed it
            // between our read and our lock.
            let placed = match self.decide(&mut conn, name).await {
                Ok((Decision::Go(route), _)) => Ok(route),
                Ok((Decision::Place, _)) => self.place(&mut conn, name, owner.as_deref()).await,
                Err(e) => Ok(self.alone(name, &e)),
            };
            let _: Result<i64, _> = self
                .unlock
                .key(keys::lock(name))
                .arg(&token)
                .invoke_async(&mut conn)
                .await;
            return placed;
        }
        Err("the room is being placed by another node; try again".into())
    }

    /// Where the room is now: its mapping, and its node's record (from the view, or
    /// read from Redis when the view does not have it yet, e.g. just after a Redis
    /// restart: a room is never taken from a node that is alive).
    async fn decide(
        &self,
        conn: &mut ConnectionManager,
        name: &str,
    ) -> redis::RedisResult<(Decision, Option<String>)> {
        let owner: Option<String> = redis::cmd("GET")
            .arg(keys::room(name))
            .query_async(conn)
            .await?;
        let mut view = self.nodes();
        if let Some(o) = owner.as_deref() {
            if o != self.id
                && !view
                    .iter()
                    .any(|n| n.id == o && n.is_fresh(now_ms(), self.config.node_ttl_ms))
            {
                let text: Option<String> = redis::cmd("GET")
                    .arg(keys::node(o))
                    .query_async(conn)
                    .await?;
                if let Some(record) = text.and_then(|t| serde_json::from_str::<NodeRecord>(&t).ok())
                {
                    if !self.is_suspect(&record) {
                        view.retain(|n| n.id != o);
                        view.push(record);
                    }
                }
            }
        }
        let decision = core::locate(
            owner.as_deref(),
            &view,
            &self.id,
            false,
            now_ms(),
            self.config.node_ttl_ms,
        );
        Ok((decision, owner))
    }

    fn is_suspect(&self, n: &NodeRecord) -> bool {
        self.suspects
            .lock()
            .expect("suspects")
            .get(&n.id)
            .is_some_and(|at| n.updated_ms <= *at)
    }

    /// With the room's lock held: choose its node and write the mapping.
    async fn place(
        &self,
        conn: &mut ConnectionManager,
        name: &str,
        previous: Option<&str>,
    ) -> Result<Route, String> {
        let view = self.nodes();
        let chosen = core::choose(
            &view,
            &self.id,
            &self.config.region,
            now_ms(),
            self.config.node_ttl_ms,
            self.config.max_cpu,
        )
        .cloned()
        .ok_or_else(|| {
            "no node of the cluster takes new rooms now (all full, overloaded or draining)"
                .to_owned()
        })?;
        let set: Result<(), _> = redis::cmd("SET")
            .arg(keys::room(name))
            .arg(&chosen.id)
            .arg("PX")
            .arg(room_ttl_ms(&self.config))
            .query_async(conn)
            .await;
        if let Err(e) = set {
            return Ok(self.alone(name, &e));
        }
        info!(room = %name, node = %chosen.id, previous = ?previous, "room placed");
        if chosen.id == self.id {
            self.local
                .write()
                .expect("local rooms")
                .insert(name.to_owned());
            Ok(Route::Local)
        } else {
            Ok(Route::Remote(Box::new(chosen)))
        }
    }

    /// Redis cannot be asked: serve the room here.
    fn alone(&self, name: &str, e: &redis::RedisError) -> Route {
        warn!(room = %name, error = %e, "Redis unreachable: serving the room on this node");
        self.metrics
            .cluster_routes
            .with_label_values(&["redis_down"])
            .inc();
        Route::Local
    }

    /// Heartbeats until the process ends. The first one is awaited by `start` so
    /// the node knows the cluster before it serves.
    pub async fn run(self: Arc<Self>, control: mpsc::Sender<ControlCommand>) {
        let period = Duration::from_millis(self.config.heartbeat_ms.max(100));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let mut last = (
            out_bytes(&self.metrics),
            own_cpu_seconds(),
            std::time::Instant::now(),
        );
        loop {
            let (egress, cpu) = {
                let now = (
                    out_bytes(&self.metrics),
                    own_cpu_seconds(),
                    std::time::Instant::now(),
                );
                let dt = now.2.duration_since(last.2).as_secs_f64().max(0.001);
                let bps = (now.0.saturating_sub(last.0) as f64 * 8.0 / dt) as u64;
                let cpu = ((now.1 - last.1).max(0.0) / dt / cores).min(1.0);
                last = now;
                (bps, cpu)
            };
            self.beat(&control, egress, cpu).await;
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = self.poke.notified() => {}
            }
        }
    }

    /// One heartbeat: the rooms here from the control task, this node's record and
    /// the rooms' mappings into Redis, the cluster view back.
    pub async fn beat(&self, control: &mpsc::Sender<ControlCommand>, egress_bps: u64, cpu: f64) {
        let (tx, rx) = oneshot::channel();
        if control
            .send(ControlCommand::ListRooms { reply: tx })
            .await
            .is_err()
        {
            return;
        }
        let Ok(rooms) = rx.await else { return };
        // Rooms carried here for another node (their audience) are that node's.
        let names: HashSet<String> = rooms
            .iter()
            .filter(|r| r.edge_of.is_none())
            .map(|r| named(r.sdk_app_id, r.numeric, &r.room))
            .collect();
        let spilling: Vec<String> = rooms
            .iter()
            .filter(|r| r.edge_of.is_none() && r.members.len() >= self.spill_members)
            .map(|r| named(r.sdk_app_id, r.numeric, &r.room))
            .take(core::MAX_SPILLING)
            .collect();
        let carrying: Vec<String> = rooms
            .iter()
            .filter(|r| r.edge_of.is_some())
            .map(|r| named(r.sdk_app_id, r.numeric, &r.room))
            .take(core::MAX_SPILLING)
            .collect();
        let participants: usize = rooms.iter().map(|r| r.members.len()).sum();
        let tracks: usize = rooms.iter().map(|r| r.streams.len()).sum();
        {
            // Rooms just placed here but not yet joined stay until their mapping
            // (which says this node) is read instead.
            let mut local = self.local.write().expect("local rooms");
            *local = names.clone();
        }
        let record = NodeRecord {
            id: self.id.clone(),
            region: self.config.region.clone(),
            addresses: self.addresses.clone(),
            max_rooms: self.max_rooms,
            load: Load {
                cpu,
                sysload: std::fs::read_to_string("/proc/loadavg")
                    .ok()
                    .and_then(|t| {
                        core::sysload(
                            &t,
                            std::thread::available_parallelism().map_or(1, |n| n.get()),
                        )
                    })
                    .unwrap_or(0.0),
                media_busy_percent: self.metrics.media_busy_percent.get() as f64,
                overloaded: self.overload.load(Ordering::Relaxed),
                rooms: names.len() as u64,
                participants: participants as u64,
                tracks: tracks as u64,
                egress_bps,
                relays: ["signaling", "rtmp", "edge"]
                    .iter()
                    .map(|k| {
                        self.metrics
                            .cluster_relays
                            .with_label_values(&[k])
                            .get()
                            .max(0) as u64
                    })
                    .sum(),
            },
            draining: self.is_draining(),
            spilling,
            carrying,
            updated_ms: now_ms(),
            started_ms: self.started_ms,
        };
        match self.write(&record, &names).await {
            Ok(view) => {
                if !self.redis_up.swap(true, Ordering::Relaxed) {
                    info!(node = %self.id, nodes = view.len(), "Redis reached: in the cluster");
                }
                self.metrics.cluster_redis_up.set(1);
                self.metrics.cluster_nodes.set(view.len() as i64);
                *self.view.write().expect("cluster view") = view;
            }
            Err(e) => {
                if self.redis_up.swap(false, Ordering::Relaxed) {
                    warn!(node = %self.id, error = %e, "Redis unreachable: serving alone until it is back");
                } else {
                    debug!(error = %e, "heartbeat failed");
                }
                self.metrics.cluster_redis_up.set(0);
                self.metrics.cluster_heartbeat_failures.inc();
                // Only this node is known to be alive now.
                *self.view.write().expect("cluster view") = vec![record];
            }
        }
    }

    async fn write(
        &self,
        record: &NodeRecord,
        rooms: &HashSet<String>,
    ) -> redis::RedisResult<Vec<NodeRecord>> {
        let mut conn = self.conn.clone();
        let json = serde_json::to_string(record).expect("records serialize");
        redis::pipe()
            .cmd("SET")
            .arg(keys::node(&self.id))
            .arg(json)
            .arg("PX")
            .arg(self.config.node_ttl_ms)
            .ignore()
            .cmd("SADD")
            .arg(keys::NODES)
            .arg(&self.id)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        for room in rooms {
            let owner: String = self
                .claim
                .key(keys::room(room))
                .arg(&self.id)
                .arg(room_ttl_ms(&self.config))
                .invoke_async(&mut conn)
                .await?;
            if owner != self.id {
                // Another node serves it too (placed there while this node was
                // unreachable): each keeps its members; counted for the operator.
                warn!(room = %room, other = %owner, "room is served by another node as well");
                self.metrics.cluster_room_conflicts.inc();
            }
        }
        let streams = self.hub.names();
        let bound: Vec<String> = {
            let now = now_ms();
            let mut bound = self.bound.lock().expect("bound pushes");
            bound.retain(|stream, last| {
                if streams.contains(stream) {
                    *last = now;
                }
                now.saturating_sub(*last) < BIND_TTL_MS
            });
            bound.keys().cloned().collect()
        };
        if !streams.is_empty() || !bound.is_empty() {
            let mut pipe = redis::pipe();
            for name in &streams {
                pipe.cmd("SET")
                    .arg(keys::stream(name))
                    .arg(&self.id)
                    .arg("PX")
                    .arg(room_ttl_ms(&self.config))
                    .ignore();
            }
            for name in &bound {
                pipe.cmd("SET")
                    .arg(keys::bind(name))
                    .arg(&self.id)
                    .arg("PX")
                    .arg(BIND_TTL_MS)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        read_nodes(&mut conn).await
    }

    /// Shares a room-service login with every node (for `ttl_ms`).
    pub async fn share_login(&self, token: &str, login: &SharedLogin, ttl_ms: u64) {
        let mut conn = self.conn.clone();
        let _: redis::RedisResult<()> = redis::cmd("SET")
            .arg(keys::login(token))
            .arg(serde_json::to_string(login).expect("serializes"))
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut conn)
            .await;
    }

    /// A room-service login another node made (its idle time restarts).
    pub async fn shared_login(&self, token: &str, ttl_ms: u64) -> Option<SharedLogin> {
        let mut conn = self.conn.clone();
        let text: Option<String> = redis::cmd("GET")
            .arg(keys::login(token))
            .query_async(&mut conn)
            .await
            .ok()?;
        let login = serde_json::from_str(&text?).ok()?;
        let _: redis::RedisResult<i64> = redis::cmd("PEXPIRE")
            .arg(keys::login(token))
            .arg(ttl_ms)
            .query_async(&mut conn)
            .await;
        Some(login)
    }

    /// A room just made here (by the room service): mapped to this node now, not at
    /// the next heartbeat, so a join elsewhere in between finds it. Returns the node
    /// serving it (another, if it was already mapped there).
    pub async fn claim_room(&self, room: &RoomKey) -> Option<String> {
        let name = room_name(room);
        self.local
            .write()
            .expect("local rooms")
            .insert(name.clone());
        let mut conn = self.conn.clone();
        self.claim
            .key(keys::room(&name))
            .arg(&self.id)
            .arg(room_ttl_ms(&self.config))
            .invoke_async(&mut conn)
            .await
            .ok()
    }

    /// `add_pusher` here took room-service push `stream`: wherever the push is, it is
    /// to come here.
    pub async fn bind_push_here(&self, stream: &str) {
        self.bound
            .lock()
            .expect("bound pushes")
            .insert(stream.to_owned(), now_ms());
        let mut conn = self.conn.clone();
        let _: redis::RedisResult<()> = redis::cmd("SET")
            .arg(keys::bind(stream))
            .arg(&self.id)
            .arg("PX")
            .arg(BIND_TTL_MS)
            .query_async(&mut conn)
            .await;
    }

    /// The other live node an `add_pusher` bound push `stream` to, if any.
    pub async fn push_bound_elsewhere(&self, stream: &str) -> Option<Box<NodeRecord>> {
        self.other_live_node_at(&keys::bind(stream)).await
    }

    /// The live node other than this one whose id Redis holds at `key`.
    async fn other_live_node_at(&self, key: &str) -> Option<Box<NodeRecord>> {
        let mut conn = self.conn.clone();
        let owner: Option<String> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .ok()?;
        let owner = owner.filter(|o| *o != self.id)?;
        self.live_record(&mut conn, &owner).await
    }

    /// `id`'s record if it is alive (from the view, else read from Redis).
    async fn live_record(&self, conn: &mut ConnectionManager, id: &str) -> Option<Box<NodeRecord>> {
        if let Some(n) = self
            .nodes()
            .into_iter()
            .find(|n| n.id == id && n.is_fresh(now_ms(), self.config.node_ttl_ms))
        {
            return Some(Box::new(n));
        }
        let text: Option<String> = redis::cmd("GET")
            .arg(keys::node(id))
            .query_async(conn)
            .await
            .ok()?;
        let record: NodeRecord = serde_json::from_str(&text?).ok()?;
        (record.is_fresh(now_ms(), self.config.node_ttl_ms) && !self.is_suspect(&record))
            .then(|| Box::new(record))
    }

    /// The live node other than this one where stream `name` plays, if Redis knows
    /// one (None: here, nowhere, or Redis unreachable).
    pub async fn stream_node(&self, name: &str) -> Option<Box<NodeRecord>> {
        self.other_live_node_at(&keys::stream(name)).await
    }

    /// A `307 Temporary Redirect` (method and body kept) to `node`'s
    /// `path_and_query`, for HTTP clients (WHIP, WHEP, HTTP-FLV players) of a room
    /// or stream served there.
    pub fn redirect(
        &self,
        node: &NodeRecord,
        path_and_query: &str,
        kind: &str,
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
        self.metrics
            .cluster_routes
            .with_label_values(&["redirected"])
            .inc();
        info!(node = %node.id, kind, "HTTP request redirected to the node serving it");
        let location = format!("{}{path_and_query}", node.addresses.http);
        (
            axum::http::StatusCode::TEMPORARY_REDIRECT,
            [
                (axum::http::header::LOCATION, location),
                (
                    axum::http::header::ACCESS_CONTROL_ALLOW_ORIGIN,
                    "*".to_owned(),
                ),
                (
                    axum::http::header::ACCESS_CONTROL_EXPOSE_HEADERS,
                    "Location".to_owned(),
                ),
            ],
        )
            .into_response()
    }
}

/// Every live node's record; ids whose record expired are removed from the set.
pub async fn read_nodes(conn: &mut ConnectionManager) -> redis::RedisResult<Vec<NodeRecord>> {
    let ids: Vec<String> = redis::cmd("SMEMBERS")
        .arg(keys::NODES)
        .query_async(conn)
        .await?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let node_keys: Vec<String> = ids.iter().map(|i| keys::node(i)).collect();
    let texts: Vec<Option<String>> = redis::cmd("MGET").arg(&node_keys).query_async(conn).await?;
    let mut out = Vec::new();
    for (id, text) in ids.iter().zip(texts) {
        match text.and_then(|t| serde_json::from_str::<NodeRecord>(&t).ok()) {
            Some(r) => out.push(r),
            None => {
                info!(node = %id, "node record expired: the node is dead");
                let _: redis::RedisResult<i64> = redis::cmd("SREM")
                    .arg(keys::NODES)
                    .arg(id)
                    .query_async(conn)
                    .await;
            }
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// How long an `add_pusher` binding outlives the push it binds.
const BIND_TTL_MS: u64 = 60_000;

/// A Redis client for `url`: `rediss://` is TLS, checked against the CA in
/// `ca_file` (PEM) when one is named, else the system's roots.
pub fn client(url: &str, ca_file: &str) -> anyhow::Result<redis::Client> {
    if ca_file.is_empty() {
        return redis::Client::open(url).context("[cluster] redis_url is not a Redis URL");
    }
    if !url.starts_with("rediss://") {
        anyhow::bail!("[cluster] redis_ca_file is for TLS: redis_url must be rediss://…");
    }
    let root =
        std::fs::read(ca_file).with_context(|| format!("[cluster] redis_ca_file {ca_file}"))?;
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(root),
        },
    )
    .context("[cluster] redis_url with redis_ca_file")
}

/// The TLS client configuration for other nodes' `https://` listeners: the public
/// roots, and the CA in `ca_file` (PEM) when one is named.
fn node_tls(ca_file: &str) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if !ca_file.is_empty() {
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(ca_file)
            .with_context(|| format!("[cluster] node_ca_file {ca_file}"))?;
        for cert in certs {
            let cert = cert.with_context(|| format!("[cluster] node_ca_file {ca_file}"))?;
            roots
                .add(cert)
                .with_context(|| format!("[cluster] node_ca_file {ca_file}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A connection for one-off reads (`weir cluster status`).
pub async fn connect(url: &str, ca_file: &str) -> anyhow::Result<ConnectionManager> {
    Ok(ConnectionManager::new(client(url, ca_file)?).await?)
}

fn own_cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|t| core::cpu_seconds(&t))
        .unwrap_or(0.0)
}

fn out_bytes(metrics: &Metrics) -> u64 {
    ["audio", "video"]
        .iter()
        .map(|k| metrics.rtp_bytes.with_label_values(&["out", k]).get())
        .sum()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A Redis URL without its password, for logs.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// A room-service login as shared through Redis.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SharedLogin {
    pub sdk_app_id: u64,
    pub user_id: String,
    /// Unix seconds: when the userSig it was made from runs out.
    pub expires_at: u64,
}

/// What `/cluster` and `weir cluster status` show: each live node, and the rooms
/// mapped to each.
#[derive(Debug, serde::Serialize)]
pub struct View {
    pub nodes: Vec<NodeRecord>,
    /// Node id → its rooms (`{sdkappid}/{room}`), as mapped in Redis.
    pub rooms: std::collections::BTreeMap<String, Vec<String>>,
}

/// Reads the whole view from Redis (rooms by SCAN: an operator's command, not a hot
/// path; at most 100,000 rooms are listed).
pub async fn read_view(conn: &mut ConnectionManager) -> redis::RedisResult<View> {
    let nodes = read_nodes(conn).await?;
    let mut rooms: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut cursor: u64 = 0;
    let mut seen = 0usize;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("weir:room:*")
            .arg("COUNT")
            .arg(500)
            .query_async(conn)
            .await?;
        if !batch.is_empty() {
            let owners: Vec<Option<String>> =
                redis::cmd("MGET").arg(&batch).query_async(conn).await?;
            for (key, owner) in batch.iter().zip(owners) {
                if let Some(owner) = owner {
                    let room = key.trim_start_matches("weir:room:").to_owned();
                    rooms.entry(owner).or_default().push(room);
                    seen += 1;
                }
            }
        }
        cursor = next;
        if cursor == 0 || seen >= 100_000 {
            break;
        }
    }
    for list in rooms.values_mut() {
        list.sort();
    }
    Ok(View { nodes, rooms })
}

/// `weir cluster status`.
pub fn status(
    redis: Option<String>,
    config: Option<std::path::PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    let (url, ca_file) = match (redis, config) {
        (Some(u), _) => (u, String::new()),
        (None, Some(path)) => {
            let c = crate::config::Config::load(&path)?.cluster;
            (c.redis_url, c.redis_ca_file)
        }
        (None, None) => anyhow::bail!("give --redis URL or --config FILE with [cluster] redis_url"),
    };
    if url.is_empty() {
        anyhow::bail!("the configuration has no [cluster] redis_url: this node runs alone");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let view = rt.block_on(async {
        let mut conn = connect(&url, &ca_file).await?;
        anyhow::Ok(read_view(&mut conn).await?)
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    let now = now_ms();
    println!(
        "{:<20} {:<8} {:<28} {:>6} {:>6} {:>6} {:>7} {:>7} {:>10} {:>6}  state",
        "node", "region", "http", "rooms", "people", "tracks", "cpu", "media%", "egress", "relays"
    );
    for n in &view.nodes {
        println!(
            "{:<20} {:<8} {:<28} {:>6} {:>6} {:>6} {:>7.2} {:>7.0} {:>10} {:>6}  {}{}",
            n.id,
            n.region,
            n.addresses.http,
            n.load.rooms,
            n.load.participants,
            n.load.tracks,
            n.load.cpu,
            n.load.media_busy_percent,
            format!("{:.1}M", n.load.egress_bps as f64 / 1e6),
            n.load.relays,
            if n.draining { "draining" } else { "serving" },
            if n.load.overloaded {
                ", overloaded"
            } else {
                ""
            },
        );
        let _ = now;
    }
    for (node, rooms) in &view.rooms {
        println!("rooms on {node}: {}", rooms.join(" "));
    }
    // Rooms that span nodes: which spill from their node, and who carries them.
    for n in &view.nodes {
        if !n.spilling.is_empty() {
            println!("spilling from {}: {}", n.id, n.spilling.join(" "));
        }
        if !n.carrying.is_empty() {
            println!("carried by {}: {}", n.id, n.carrying.join(" "));
        }
    }
    Ok(())
}
