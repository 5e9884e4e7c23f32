//! A node's media workers: one `Media` per core, each owning the peer connections of
//! the rooms placed on it, all on one UDP port.
//!
//! Placement is by room: a room's members, publishers and subscribers, are on the
//! worker its key hashes to, so forwarding never crosses workers and each worker keeps
//! every per-stream decision (layers, congestion, keyframes) to itself. Every worker
//! has its own socket on the same port (`SO_REUSEPORT`): the kernel spreads datagrams
//! over them by 5-tuple, so one from a connection another worker owns is handed over
//! (`Between::Datagrams`, batched per wake-up, bounded, never a lock per packet). A
//! new 5-tuple is found by the ufrag of its first STUN request: each worker registers
//! its connections' ufrags in one shared index, read only for such requests; the
//! 5-tuple is then remembered by the worker whose socket it reaches.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use bytes::BytesMut;
use rtc::shared::TransportProtocol;
use tokio::sync::mpsc;

use crate::room::RoomKey;
use crate::server::control::MediaInput;

use super::BridgeInput;

/// Datagrams, commands and bridge input queued for one worker.
pub const INPUT_QUEUE: usize = 4096;
/// Messages queued from the other workers (each a batch of datagrams, or a change).
pub const BETWEEN_QUEUE: usize = 4096;

/// The worker a room's connections live on, the same wherever it is asked (the control
/// task, an RTMP pusher, an edge's relay): no coordination and no race between them.
pub fn worker_for(room: &RoomKey, workers: usize) -> usize {
    if workers <= 1 {
        return 0;
    }
    // SipHash with fixed keys: stable for the life of the process.
    let mut h = std::hash::DefaultHasher::new();
    room.hash(&mut h);
    (h.finish() % workers as u64) as usize
}

/// How the rest of the node reaches the media workers.
#[derive(Clone)]
pub struct MediaPlane {
    inputs: Vec<mpsc::Sender<MediaInput>>,
    bridges: Vec<mpsc::Sender<BridgeInput>>,
}

impl MediaPlane {
    pub fn workers(&self) -> usize {
        self.inputs.len()
    }

    pub fn worker_for(&self, room: &RoomKey) -> usize {
        worker_for(room, self.inputs.len())
    }

    /// Commands and signaling for worker `w`.
    pub fn input(&self, w: usize) -> &mpsc::Sender<MediaInput> {
        &self.inputs[w.min(self.inputs.len() - 1)]
    }

    /// Where a bridge (an RTMP push, a relayed stream) of `room` sends its packets.
    pub fn bridge_for(&self, room: &RoomKey) -> mpsc::Sender<BridgeInput> {
        self.bridges[self.worker_for(room)].clone()
    }
}

/// What the workers tell each other.
#[derive(Debug)]
pub enum Between {
    /// Datagrams (or ICE-TCP frames) that reached another worker's socket, for the
    /// connection this worker owns.
    Datagrams(Vec<(TransportProtocol, SocketAddr, BytesMut)>),
    /// An ICE-TCP connection opened or closed (accepted by worker 0; any worker's
    /// connection may write to it).
    TcpOpened {
        from: SocketAddr,
        writer: mpsc::Sender<Vec<u8>>,
    },
    TcpClosed {
        from: SocketAddr,
    },
    /// A connection closed: the 5-tuples another worker may remember as its.
    Forget(Vec<(TransportProtocol, SocketAddr)>),
    /// Home → the others: a stream of its room starts (`AllowPublish`) or ends.
    Command(Box<crate::room::MediaCommand>),
    /// Home → mirror: a stream's codecs, packets and sender reports (see `mirror`).
    Media(Vec<super::mirror::Mirrored>),
    /// Home → mirror: a simulcast stream's active layers, lowest first.
    Layers {
        stream_id: String,
        ssrcs: Vec<u32>,
        /// Every layer of the publisher, lowest first.
        order: Vec<u32>,
        placeholder: bool,
    },
    /// Mirror → home: whether a subscriber on `worker` receives the stream.
    Want {
        stream_id: String,
        worker: usize,
        wanted: bool,
    },
    /// Mirror → home: a subscriber needs a keyframe.
    Keyframe {
        stream_id: String,
        now_please: bool,
    },
    /// Mirror → home: its subscribers' layers and capacities (each room tick).
    Demand {
        stream_id: String,
        worker: usize,
        demand: super::mirror::Demand,
    },
}

/// What one worker shares with the others.
pub struct Crew {
    pub index: usize,
    mates: Vec<mpsc::Sender<Between>>,
    /// ufrag → the worker whose connection drew it (None with one worker).
    ufrags: Option<Arc<RwLock<HashMap<String, usize>>>>,
    busy: Arc<Vec<AtomicU8>>,
    overloaded: Arc<Vec<AtomicBool>>,
    /// Set while any worker is overloaded (the control task refuses joins).
    pub any_overloaded: Arc<AtomicBool>,
}

impl Crew {
    pub fn size(&self) -> usize {
        self.mates.len()
    }

    /// Sends `msg` to worker `w`; false when its queue is full.
    pub fn send(&self, w: usize, msg: Between) -> bool {
        self.mates[w].try_send(msg).is_ok()
    }

    /// Sends `msg` to worker `w`, or gives it back when its queue is full.
    pub fn send_or_return(&self, w: usize, msg: Between) -> Option<Between> {
        match self.mates[w].try_send(msg) {
            Err(mpsc::error::TrySendError::Full(msg)) => Some(msg),
            _ => None,
        }
    }

    /// Tells every other worker (best effort: a full queue loses a hint that is only
    /// an optimisation or is learnt again).
    pub fn tell_others(&self, make: impl Fn() -> Between) {
        for (i, m) in self.mates.iter().enumerate() {
            if i != self.index {
                let _ = m.try_send(make());
            }
        }
    }

    /// The worker whose connection drew `ufrag`, if another's.
    pub fn owner_of_ufrag(&self, ufrag: &str) -> Option<usize> {
        let map = self.ufrags.as_ref()?.read().ok()?;
        map.get(ufrag).copied().filter(|w| *w != self.index)
    }

    pub fn register_ufrag(&self, ufrag: &str) {
        if let Some(Ok(mut m)) = self.ufrags.as_ref().map(|m| m.write()) {
            m.insert(ufrag.to_owned(), self.index);
        }
    }

    pub fn unregister_ufrag(&self, ufrag: &str) {
        if let Some(Ok(mut m)) = self.ufrags.as_ref().map(|m| m.write()) {
            if m.get(ufrag) == Some(&self.index) {
                m.remove(ufrag);
            }
        }
    }

    /// Records this worker's busy share and overload; returns the node's figures (the
    /// busiest worker's share, and whether any worker is overloaded).
    pub fn judged(&self, busy_percent: u8, overloaded: Option<bool>) -> (u8, bool) {
        self.busy[self.index].store(busy_percent, Ordering::Relaxed);
        if let Some(o) = overloaded {
            self.overloaded[self.index].store(o, Ordering::Relaxed);
        }
        let busiest = self
            .busy
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        let any = self.overloaded.iter().any(|o| o.load(Ordering::Relaxed));
        self.any_overloaded.store(any, Ordering::Relaxed);
        (busiest, any)
    }
}

fn crews(mates: Vec<mpsc::Sender<Between>>, any: Arc<AtomicBool>) -> Vec<Crew> {
    let n = mates.len();
    let ufrags = (n > 1).then(|| Arc::new(RwLock::new(HashMap::new())));
    let busy = Arc::new((0..n).map(|_| AtomicU8::new(0)).collect::<Vec<_>>());
    let overloaded = Arc::new((0..n).map(|_| AtomicBool::new(false)).collect::<Vec<_>>());
    (0..n)
        .map(|index| Crew {
            index,
            mates: mates.clone(),
            ufrags: ufrags.clone(),
            busy: busy.clone(),
            overloaded: overloaded.clone(),
            any_overloaded: any.clone(),
        })
        .collect()
}

/// The channels of `n` workers: the handle the node keeps, and for each worker what
/// it runs with (its crew, and the receiving ends of its inputs, bridges and mates).
pub struct Wiring {
    pub plane: MediaPlane,
    pub workers: Vec<WorkerWiring>,
    pub any_overloaded: Arc<AtomicBool>,
}

pub struct WorkerWiring {
    pub crew: Crew,
    pub inputs: mpsc::Receiver<MediaInput>,
    pub bridges: mpsc::Receiver<BridgeInput>,
    pub between: mpsc::Receiver<Between>,
}

pub fn wire(n: usize) -> Wiring {
    let n = n.max(1);
    let mut inputs = Vec::new();
    let mut bridges = Vec::new();
    let mut mates = Vec::new();
    let mut ends = Vec::new();
    for _ in 0..n {
        let (itx, irx) = mpsc::channel(INPUT_QUEUE);
        let (btx, brx) = mpsc::channel(INPUT_QUEUE);
        let (mtx, mrx) = mpsc::channel(BETWEEN_QUEUE);
        inputs.push(itx);
        bridges.push(btx);
        mates.push(mtx);
        ends.push((irx, brx, mrx));
    }
    let any = Arc::new(AtomicBool::new(false));
    let workers = crews(mates, any.clone())
        .into_iter()
        .zip(ends)
        .map(|(crew, (inputs, bridges, between))| WorkerWiring {
            crew,
            inputs,
            bridges,
            between,
        })
        .collect();
    Wiring {
        plane: MediaPlane { inputs, bridges },
        workers,
        any_overloaded: any,
    }
}

/// Binds `n` UDP sockets to one address with `SO_REUSEPORT` (the first one picks the
/// port when `addr` has port 0), so the kernel spreads the port's datagrams over them.
pub fn bind_udp_group(addr: &str, n: usize) -> std::io::Result<Vec<std::net::UdpSocket>> {
    use std::net::ToSocketAddrs;
    let first: SocketAddr = addr.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind")
    })?;
    let mut out: Vec<std::net::UdpSocket> = Vec::new();
    for i in 0..n.max(1) {
        let at = if i == 0 { first } else { out[0].local_addr()? };
        let s = socket2::Socket::new(
            socket2::Domain::for_address(at),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        // The first socket binds as a plain one would, so that an ephemeral port
        // (`:0`) is one nobody uses: the kernel's search for a free port counts a
        // port where only SO_REUSEPORT sockets of the same user are bound as free,
        // and would hand a second node (a parallel test server) the first's port.
        // It joins the group after binding; the next ones join it as they bind.
        #[cfg(unix)]
        if n > 1 && i > 0 {
            s.set_reuse_port(true)?;
        }
        s.set_nonblocking(true)?;
        s.bind(&at.into())?;
        #[cfg(unix)]
        if n > 1 && i == 0 {
            s.set_reuse_port(true)?;
        }
        out.push(s.into());
    }
    // With SO_REUSEPORT another process of the same user could have bound the port
    // already, and the kernel would share its datagrams with ours: refuse, as a
    // plain bind would.
    let bound = out[0].local_addr()?;
    if n > 1 && super::load::udp_sockets_at(bound).is_some_and(|c| c > n) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!(
                "UDP port {} is already in use by another process",
                bound.port()
            ),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::userbuf::RoomId;

    fn room(name: &str) -> RoomKey {
        RoomKey {
            sdk_app_id: 1400000001,
            room: RoomId::Str(name.into()),
        }
    }

    #[test]
    fn a_room_has_one_worker_and_rooms_spread_over_all() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            let r = room(&format!("room-{i}"));
            let w = worker_for(&r, 4);
            assert_eq!(w, worker_for(&r.clone(), 4));
            counts[w] += 1;
        }
        // Each worker gets its share, within a few percent.
        for c in counts {
            assert!((900..1100).contains(&c), "{counts:?}");
        }
        assert_eq!(worker_for(&room("x"), 1), 0);
    }

    #[test]
    fn the_node_is_overloaded_while_any_worker_is() {
        let w = wire(3);
        let [a, b, _c] = &w.workers[..] else {
            unreachable!()
        };
        assert_eq!(a.crew.judged(40, Some(false)), (40, false));
        assert_eq!(b.crew.judged(95, Some(true)), (95, true));
        assert!(w.any_overloaded.load(Ordering::Relaxed));
        assert_eq!(a.crew.judged(30, None), (95, true));
        assert_eq!(b.crew.judged(20, Some(false)), (30, false));
        assert!(!w.any_overloaded.load(Ordering::Relaxed));
    }

    #[test]
    fn a_ufrag_names_the_worker_that_drew_it_until_it_is_gone() {
        let w = wire(2);
        let (a, b) = (&w.workers[0].crew, &w.workers[1].crew);
        b.register_ufrag("abcd");
        assert_eq!(a.owner_of_ufrag("abcd"), Some(1));
        assert_eq!(b.owner_of_ufrag("abcd"), None, "its own: not another's");
        a.unregister_ufrag("abcd");
        assert_eq!(
            a.owner_of_ufrag("abcd"),
            Some(1),
            "only its drawer removes it"
        );
        b.unregister_ufrag("abcd");
        assert_eq!(a.owner_of_ufrag("abcd"), None);
    }

    #[tokio::test]
    async fn sockets_of_a_group_share_one_port_and_no_other_group_joins_it() {
        let socks = bind_udp_group("127.0.0.1:0", 3).unwrap();
        let at = socks[0].local_addr().unwrap();
        assert!(socks.iter().all(|s| s.local_addr().unwrap() == at));
        // A second node started on the same port by mistake fails, as a plain bind
        // would, instead of taking a share of the first one's datagrams.
        let e = bind_udp_group(&at.to_string(), 2).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");

        // The kernel spreads datagrams over every socket of the group, the first
        // one (which joined after binding) included.
        let mut reached = vec![false; socks.len()];
        for _ in 0..200 {
            let from = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            from.send_to(b"x", at).unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let mut buf = [0u8; 8];
        for (i, s) in socks.iter().enumerate() {
            while s.recv_from(&mut buf).is_ok() {
                reached[i] = true;
            }
        }
        assert!(reached.iter().all(|r| *r), "{reached:?}");
    }

    #[test]
    fn groups_on_ephemeral_ports_never_share_one() {
        // Many nodes on `:0` at once (test servers in parallel): each gets a port
        // of its own. The kernel would count a port held only by another group's
        // SO_REUSEPORT sockets as free, and the second node refuse to start.
        // (300 groups at once share a port by chance four times in five; three
        // rounds.)
        for _ in 0..3 {
            let groups: Vec<_> = (0..300)
                .map(|_| bind_udp_group("127.0.0.1:0", 2).expect("a port of its own"))
                .collect();
            let mut ports: Vec<u16> = groups
                .iter()
                .map(|g| g[0].local_addr().unwrap().port())
                .collect();
            ports.sort_unstable();
            ports.dedup();
            assert_eq!(ports.len(), groups.len());
        }
    }
}
