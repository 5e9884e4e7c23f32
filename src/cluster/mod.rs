//! Several Weir nodes behind Redis, sans-I/O: what a node says about itself, which
//! node a new room goes to, and where a join for a room goes.
//!
//! Redis holds (prefix `weir:`, all written by the nodes themselves, so a restarted
//! Redis is filled again within one heartbeat):
//!
//! - `nodes`: the set of node ids ever seen; `node:{id}`: that node's [`NodeRecord`]
//!   as JSON, written every heartbeat with a TTL. A node whose record expired is dead
//!   (and is removed from `nodes` by whoever notices).
//! - `room:{sdkappid}/{room}`: the id of the node serving the room, set when the room
//!   is placed and refreshed every heartbeat by that node while the room lives.
//! - `stream:{name}`: the node where a playable stream is live, refreshed likewise.
//! - `login:{token}`: a room-service login, so a mini program's calls may reach any
//!   node; `bind:{stream}`: the node whose room took a room-service push name
//!   (`add_pusher`), so the node the push reached moves it there.
//! - `lock:room:{sdkappid}/{room}`: held (with a random token, a few seconds) by the
//!   node placing the room, so two first joins on two nodes choose one node.
//!
//! The shell (`server::cluster`) does the I/O; this module decides.

use serde::{Deserialize, Serialize};

/// Redis keys, in one place.
pub mod keys {
    pub const NODES: &str = "weir:nodes";

    pub fn node(id: &str) -> String {
        format!("weir:node:{id}")
    }

    pub fn room(room: &str) -> String {
        format!("weir:room:{room}")
    }

    pub fn lock(room: &str) -> String {
        format!("weir:lock:room:{room}")
    }

    /// A playable stream's node (RTMP/HTTP-FLV and WHEP plays name streams).
    pub fn stream(name: &str) -> String {
        format!("weir:stream:{name}")
    }

    /// A room-service login (its token), so every node accepts it.
    pub fn login(token: &str) -> String {
        format!("weir:login:{token}")
    }

    /// The node whose room an `add_pusher` bound a room-service push name to: the
    /// node where that push arrived moves it there.
    pub fn bind(stream: &str) -> String {
        format!("weir:bind:{stream}")
    }
}

/// A node's addresses, as other nodes and clients reach them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Addresses {
    /// Signaling, HTTP-FLV, WHIP/WHEP: `http://host:port` (or https).
    pub http: String,
    /// RTMP ingest and play: `rtmp://host:port`, empty without RTMP.
    #[serde(default)]
    pub rtmp: String,
    /// WebRTC media: `host:port` of the UDP port.
    #[serde(default)]
    pub udp: String,
    /// ICE over TCP: `host:port`, empty without it.
    #[serde(default)]
    pub tcp: String,
}

/// How much a node carries now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// This process's CPU time over the last heartbeat, as a share of the machine's
    /// cores (0..1): what placement judges by. (The load average is the whole
    /// machine's, noisy and, in a container, the host's.)
    #[serde(default)]
    pub cpu: f64,
    /// The 1-minute load average over the number of CPUs (LiveKit's `sysload`), shown
    /// to operators.
    pub sysload: f64,
    /// The media loop's busy share, percent.
    pub media_busy_percent: f64,
    /// The media plane refuses joins (see `media::load`).
    pub overloaded: bool,
    pub rooms: u64,
    pub participants: u64,
    pub tracks: u64,
    /// Media sent, bits a second (over the last heartbeat).
    pub egress_bps: u64,
    /// Sessions and RTMP connections this node relays to other nodes' rooms.
    #[serde(default)]
    pub relays: u64,
}

/// What a node says about itself, every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    #[serde(default)]
    pub region: String,
    pub addresses: Addresses,
    /// Rooms this node takes at most (its `max_rooms`).
    pub max_rooms: u64,
    pub load: Load,
    /// Draining (SIGTERM): keeps its rooms, takes no new ones.
    #[serde(default)]
    pub draining: bool,
    /// Rooms of this node that take no more members here (as many as `spill_members`):
    /// their further members are served on other nodes, which relay the room's
    /// streams from this one. At most [`MAX_SPILLING`] names.
    #[serde(default)]
    pub spilling: Vec<String>,
    /// Rooms of other nodes this node carries (their relayed audience here), at most
    /// [`MAX_SPILLING`]: a spilling room's next member goes to one of them first.
    #[serde(default)]
    pub carrying: Vec<String>,
    /// Unix milliseconds of this record.
    pub updated_ms: u64,
    /// Unix milliseconds the node started.
    pub started_ms: u64,
}

/// Rooms a node lists as spilling in its record (the rest spill too: see
/// [`NodeRecord::spills`]).
pub const MAX_SPILLING: usize = 256;

impl NodeRecord {
    /// Whether a new member of `room`, served by this node, goes to another node
    /// instead: the room is at its size here, or this node's media plane is
    /// overloaded. A node with more spilling rooms than it can list spills them all.
    pub fn spills(&self, room: &str) -> bool {
        self.load.overloaded
            || self.spilling.len() >= MAX_SPILLING
            || self.spilling.iter().any(|r| r == room)
    }

    /// Whether a record written at `updated_ms` still counts at `now_ms` (its Redis
    /// TTL bounds it too; this guards against a record read just before it expired).
    pub fn is_fresh(&self, now_ms: u64, ttl_ms: u64) -> bool {
        now_ms.saturating_sub(self.updated_ms) <= ttl_ms
    }

    /// Whether a new room may be placed here.
    pub fn takes_rooms(&self, max_cpu: f64) -> bool {
        !self.draining
            && !self.load.overloaded
            && self.load.cpu < max_cpu
            && self.load.rooms < self.max_rooms
    }

    /// Lower is less loaded: the larger of CPU share and room share.
    fn weight(&self) -> f64 {
        let rooms = if self.max_rooms == 0 {
            1.0
        } else {
            self.load.rooms as f64 / self.max_rooms as f64
        };
        self.load
            .cpu
            .max(self.load.media_busy_percent / 100.0)
            .max(rooms)
    }
}

/// The node a new room goes to: among fresh nodes that take rooms, those in `region`
/// first (when given and any is there), the least loaded (in steps of a tenth, so
/// noise in the load average does not decide), then the deciding node `self_id` (its
/// first member is connected to it already: no relay), then fewer participants, then
/// the id.
pub fn choose<'a>(
    nodes: &'a [NodeRecord],
    self_id: &str,
    region: &str,
    now_ms: u64,
    ttl_ms: u64,
    max_cpu: f64,
) -> Option<&'a NodeRecord> {
    best(
        in_region_pool(nodes.iter(), region, now_ms, ttl_ms, max_cpu),
        self_id,
    )
}

/// The least loaded of `pool`, in steps of a tenth (this node first on a tie: a
/// room's first member is connected to it already), then fewer participants, then id.
fn best<'a>(pool: Vec<&'a NodeRecord>, self_id: &str) -> Option<&'a NodeRecord> {
    pool.into_iter().min_by(|a, b| {
        let step = |n: &NodeRecord| (n.weight() * 10.0).floor() as i64;
        step(a)
            .cmp(&step(b))
            .then((a.id != self_id).cmp(&(b.id != self_id)))
            .then(a.load.participants.cmp(&b.load.participants))
            .then(a.id.cmp(&b.id))
    })
}

/// The live nodes that take rooms, only those of `region` when one there does.
fn in_region_pool<'a>(
    nodes: impl Iterator<Item = &'a NodeRecord> + Clone,
    region: &str,
    now_ms: u64,
    ttl_ms: u64,
    max_cpu: f64,
) -> Vec<&'a NodeRecord> {
    let eligible = nodes.filter(|n| n.is_fresh(now_ms, ttl_ms) && n.takes_rooms(max_cpu));
    let in_region = !region.is_empty() && eligible.clone().any(|n| n.region == region);
    eligible
        .filter(|n| !in_region || n.region == region)
        .collect()
}

/// The node that carries a spilling room's next member: among the live nodes that take
/// rooms, other than the room's own (`origin`), in `region` when one there does, one
/// that carries the room already (its relay is paid for), else the least loaded, this
/// one on a tie.
#[allow(clippy::too_many_arguments)]
pub fn choose_edge<'a>(
    nodes: &'a [NodeRecord],
    origin: &str,
    room: &str,
    self_id: &str,
    region: &str,
    now_ms: u64,
    ttl_ms: u64,
    max_cpu: f64,
) -> Option<&'a NodeRecord> {
    let pool = in_region_pool(
        nodes.iter().filter(|n| n.id != origin),
        region,
        now_ms,
        ttl_ms,
        max_cpu,
    );
    let carrying: Vec<&NodeRecord> = pool
        .iter()
        .copied()
        .filter(|n| n.carrying.iter().any(|r| r == room))
        .collect();
    best(carrying, self_id).or_else(|| best(pool, self_id))
}

/// Where a join (or push, or play) for a room goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// Served here.
    Local,
    /// Served by another live node.
    Remote(Box<NodeRecord>),
}

/// What the shell must do for a room, given what Redis says.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The room has a live node: go there.
    Go(Route),
    /// No live node serves it: place it (under the room's lock).
    Place,
}

/// Where a room is, from its mapping in Redis (`owner`), the live nodes, and whether
/// this node (`self_id`) has the room now. A room this node has stays here (after a
/// Redis restart the mapping may be missing until the next heartbeat rewrites it).
pub fn locate(
    owner: Option<&str>,
    nodes: &[NodeRecord],
    self_id: &str,
    has_room_here: bool,
    now_ms: u64,
    ttl_ms: u64,
) -> Decision {
    match owner {
        Some(id) if id == self_id => Decision::Go(Route::Local),
        Some(id) => match nodes
            .iter()
            .find(|n| n.id == id && n.is_fresh(now_ms, ttl_ms))
        {
            Some(n) if !has_room_here => Decision::Go(Route::Remote(Box::new(n.clone()))),
            // Both have it (a split after a partition): keep serving what is here.
            Some(_) => Decision::Go(Route::Local),
            // Its node is dead: the room is placed again.
            None if has_room_here => Decision::Go(Route::Local),
            None => Decision::Place,
        },
        None if has_room_here => Decision::Go(Route::Local),
        None => Decision::Place,
    }
}

/// CPU seconds used by a process, from its `/proc/<pid>/stat` text (user + system,
/// in the kernel's 100 Hz ticks).
pub fn cpu_seconds(stat: &str) -> Option<f64> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// The one-minute load average over the number of CPUs, from `/proc/loadavg`'s text.
pub fn sysload(loadavg: &str, cpus: usize) -> Option<f64> {
    let one: f64 = loadavg.split_whitespace().next()?.parse().ok()?;
    Some(one / cpus.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, region: &str, sysload: f64, rooms: u64) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            region: region.into(),
            max_rooms: 100,
            load: Load {
                cpu: sysload,
                rooms,
                ..Default::default()
            },
            updated_ms: 10_000,
            ..Default::default()
        }
    }

    #[test]
    fn the_least_loaded_fresh_node_that_takes_rooms_is_chosen() {
        let mut nodes = vec![
            node("a", "", 0.5, 10),
            node("b", "", 0.2, 10),
            node("c", "", 0.1, 10),
        ];
        nodes[2].draining = true;
        assert_eq!(choose(&nodes, "", "", 11_000, 5_000, 0.9).unwrap().id, "b");
        // b's record is stale: a.
        nodes[1].updated_ms = 1_000;
        assert_eq!(choose(&nodes, "", "", 11_000, 5_000, 0.9).unwrap().id, "a");
        // a is over the CPU limit: nobody.
        nodes[0].load.cpu = 0.95;
        assert!(choose(&nodes, "", "", 11_000, 5_000, 0.9).is_none());
    }

    #[test]
    fn full_or_overloaded_nodes_take_no_rooms_and_ties_are_broken_by_id() {
        let mut nodes = vec![node("b", "", 0.1, 100), node("a", "", 0.1, 10)];
        assert_eq!(choose(&nodes, "", "", 10_000, 5_000, 0.9).unwrap().id, "a");
        nodes[1].load.overloaded = true;
        assert!(choose(&nodes, "", "", 10_000, 5_000, 0.9).is_none());
        let same = vec![node("y", "", 0.0, 0), node("x", "", 0.0, 0)];
        assert_eq!(choose(&same, "", "", 10_000, 5_000, 0.9).unwrap().id, "x");
        // The deciding node wins a tie (no relay for the room's first member), and
        // load within the same tenth is a tie.
        assert_eq!(choose(&same, "y", "", 10_000, 5_000, 0.9).unwrap().id, "y");
        let close = vec![node("x", "", 0.13, 0), node("y", "", 0.17, 0)];
        assert_eq!(choose(&close, "y", "", 10_000, 5_000, 0.9).unwrap().id, "y");
        let apart = vec![node("x", "", 0.13, 0), node("y", "", 0.27, 0)];
        assert_eq!(choose(&apart, "y", "", 10_000, 5_000, 0.9).unwrap().id, "x");
    }

    #[test]
    fn a_spilling_room_goes_to_the_least_loaded_other_node() {
        let mut nodes = vec![
            node("a", "", 0.5, 10),
            node("b", "", 0.0, 0),
            node("c", "", 0.2, 10),
        ];
        nodes[1].spilling = vec!["1400000000/7".into()];
        assert!(nodes[1].spills("1400000000/7"));
        assert!(!nodes[1].spills("1400000000/8"));
        let edge = |nodes: &[NodeRecord]| {
            choose_edge(nodes, "b", "1400000000/7", "a", "", 11_000, 5_000, 0.9)
                .map(|n| n.id.clone())
        };
        assert_eq!(edge(&nodes).unwrap(), "c");
        // A node that carries the room already is chosen before a less loaded one.
        nodes[0].load.cpu = 0.0;
        assert_eq!(edge(&nodes).unwrap(), "a");
        nodes[2].carrying = vec!["1400000000/7".into()];
        assert_eq!(edge(&nodes).unwrap(), "c");
        nodes[2].draining = true;
        assert_eq!(edge(&nodes).unwrap(), "a");
        nodes[0].load.overloaded = true;
        assert!(edge(&nodes).is_none());
        nodes[1].spilling = (0..MAX_SPILLING).map(|i| i.to_string()).collect();
        assert!(nodes[1].spills("anything"));
    }

    #[test]
    fn a_spilling_room_s_member_stays_in_its_region_before_joining_a_carrying_node() {
        let mut nodes = vec![
            node("o", "eu", 0.0, 1),
            node("e1", "eu", 0.1, 0),
            node("e2", "ap", 0.2, 0),
            node("e3", "ap", 0.25, 0),
        ];
        nodes[1].carrying = vec!["r".into()];
        let edge = |nodes: &[NodeRecord], region| {
            choose_edge(nodes, "o", "r", "e2", region, 11_000, 5_000, 0.9).map(|n| n.id.clone())
        };
        // Asked in ap: an ap node, though e1 carries the room; e2 (asked) on the tie.
        assert_eq!(edge(&nodes, "ap").unwrap(), "e2");
        nodes[3].carrying = vec!["r".into()];
        assert_eq!(edge(&nodes, "ap").unwrap(), "e3");
        // No node of the region takes rooms: any carrying node.
        assert_eq!(edge(&nodes, "us").unwrap(), "e1");
    }

    #[test]
    fn a_region_is_preferred_when_it_has_a_node() {
        let nodes = vec![node("a", "eu", 0.1, 0), node("b", "ap", 0.6, 0)];
        assert_eq!(
            choose(&nodes, "", "ap", 10_000, 5_000, 0.9).unwrap().id,
            "b"
        );
        assert_eq!(
            choose(&nodes, "", "us", 10_000, 5_000, 0.9).unwrap().id,
            "a"
        );
    }

    #[test]
    fn a_room_goes_to_its_live_node_and_is_placed_again_when_that_node_is_dead() {
        let nodes = vec![node("a", "", 0.1, 0), node("b", "", 0.1, 0)];
        let at = |owner, here| locate(owner, &nodes, "a", here, 11_000, 5_000);
        assert_eq!(at(Some("a"), false), Decision::Go(Route::Local));
        assert_eq!(
            at(Some("b"), false),
            Decision::Go(Route::Remote(Box::new(nodes[1].clone())))
        );
        assert_eq!(at(Some("dead"), false), Decision::Place);
        assert_eq!(at(None, false), Decision::Place);
        // What this node has, it keeps serving (Redis lost the mapping, or a split).
        assert_eq!(at(None, true), Decision::Go(Route::Local));
        assert_eq!(at(Some("dead"), true), Decision::Go(Route::Local));
        assert_eq!(at(Some("b"), true), Decision::Go(Route::Local));
        // A stale record is a dead node.
        assert_eq!(
            locate(Some("b"), &nodes, "a", false, 16_000, 5_000),
            Decision::Place
        );
    }

    #[test]
    fn cpu_seconds_are_read_after_the_command_name() {
        let stat = "4242 (weir (x) y) S 1 2 3 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 100";
        assert_eq!(cpu_seconds(stat), Some(3.0));
        assert_eq!(cpu_seconds("4242 (weir) S 1"), None);
        assert_eq!(cpu_seconds(""), None);
    }

    #[test]
    fn sysload_is_the_one_minute_average_per_cpu() {
        assert_eq!(sysload("1.50 0.80 0.40 2/300 12345\n", 2), Some(0.75));
        assert_eq!(sysload("", 2), None);
        assert_eq!(sysload("x", 2), None);
    }

    #[test]
    fn records_round_trip_through_json() {
        let n = node("a", "eu", 0.25, 3);
        let text = serde_json::to_string(&n).unwrap();
        assert_eq!(serde_json::from_str::<NodeRecord>(&text).unwrap(), n);
    }
}
