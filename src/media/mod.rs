//! The media plane: every WebRTC peer connection on one UDP port, and forwarding.
//!
//! `Media` is one media worker (see `plane` for how a node's workers share the port and
//! the rooms): it owns its socket and its `rtc` peer connections (webrtc-rs's sans-I/O
//! core).
//! Datagrams are demultiplexed to peer connections by the ICE username of the first
//! STUN request (rtc draws our ufrag per connection, anew on an ICE restart, and each is
//! learnt from the local descriptions), then by 5-tuple. Each client
//! has up to two connections: *publisher* (the client offers, we receive) and
//! *subscriber* (we offer, we send), so offers never collide.
//!
//! Forwarding rewrites, per subscriber track: SSRC (its own), payload type (as the
//! subscriber negotiated), sequence numbers and timestamps (continuous, from a random
//! base), and drops header extensions the subscriber leg did not negotiate.

mod congestion;
mod demux;
pub mod forward;
mod load;
mod mirror;
mod nack_guard;
mod peer;
pub mod plane;
mod send_side;
mod tcp;
mod udp_out;
pub mod upstream;

pub use demux::stun_username;
pub use forward::{codec_compatible, keyframe_dimensions, kind_label, starts_keyframe};
pub use nack_guard::{NackGuard, PausedSsrcs, RetransmissionBudget};
pub use peer::{offered_send_kinds, RtcpTap, RTCP_TAP_SLOT};
pub use plane::{MediaPlane, Wiring};
pub use send_side::SendSide;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use weir_signaling::{ClientMessage, ErrorCode, Kind, ServerMessage, Target};

use crate::metrics::Metrics;
use crate::room::{MediaCommand, SessionId};
use crate::server::control::{ControlCommand, MediaInput};

use peer::{Peer, PeerKey};

/// A map the forwarding path looks up once per copy: keys are ours (session ids,
/// stream ids a member may hold), hashed with a fast randomly seeded hasher.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Where peers reach us.
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// Addresses put into our ICE candidates, with the UDP port.
    pub announce: Vec<SocketAddr>,
    /// The ICE-TCP port announced with the same addresses (passive candidates).
    pub tcp_port: Option<u16>,
    /// Silence (no authenticated packet) before "disconnected", and after that before
    /// "failed".
    pub ice_disconnected: Duration,
    pub ice_failed: Duration,
    /// Per-subscriber estimation and allocation, per-room publisher targets.
    pub congestion_control: bool,
    /// Publishers' video bitrate bounds (bit/s) when they give none.
    pub publisher_bitrate: (f64, f64),
    /// Busy percent over which the plane counts as overloaded (0: never).
    pub overload_busy_percent: u8,
    /// Audio packet length asked of WebRTC publishers (`a=ptime`), 0: not asked.
    pub publisher_audio_ptime_ms: u32,
}

/// What a publisher may send, from the room's `AllowPublish`.
#[derive(Debug, Clone)]
struct Allowed {
    stream_id: String,
    kinds: Vec<Kind>,
}

/// How long a client's subscriber offer (WHEP) waits, from when a stream's first
/// kind is ready, for the others it publishes: a publisher's audio and video start a
/// moment apart, and a WHEP viewer cannot be offered a kind later (no renegotiation),
/// so an answer made in between would leave it without sound for good.
const CLIENT_OFFER_WAIT: Duration = Duration::from_secs(1);

/// Everything the media task owns.
pub struct Media {
    config: MediaConfig,
    socket: Arc<UdpSocket>,
    /// The socket's sending half for forwarded copies (GSO runs), with the copies of
    /// one subscriber waiting to go.
    udp: udp_out::UdpOut,
    /// Packets of bridges, relays and mirrors queued during a batch, by track
    /// (`source_rtp`); empty outside one.
    sources: Vec<(SessionId, Kind, Vec<Inbound>)>,
    local_addr: SocketAddr,
    tcp: Option<(TcpListener, Arc<crate::limits::Connections>)>,
    tcp_local_addr: Option<SocketAddr>,
    tcp_writers: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    peers: FastMap<PeerKey, Peer>,
    by_ufrag: HashMap<String, PeerKey>,
    /// A transport address (UDP or TCP) → the connection it belongs to.
    by_addr: HashMap<(TransportProtocol, SocketAddr), PeerKey>,
    allowed: HashMap<SessionId, Allowed>,
    /// Subscriber offers from clients (WHEP), answered once their subscriptions exist.
    client_offers: HashMap<SessionId, String>,
    /// When each stream's first kind was ready: a client's offer that finds some of
    /// the stream's kinds ready and others not waits for the rest until
    /// `CLIENT_OFFER_WAIT` after it.
    ready_since: HashMap<String, Instant>,
    /// stream id → its publisher.
    publishers: HashMap<String, SessionId>,
    /// stream id → subscribers and the kinds each receives.
    subscriptions: HashMap<String, HashMap<SessionId, Vec<Kind>>>,
    control: mpsc::Sender<ControlCommand>,
    /// What the control task must hear (SDP, errors, a connection gone) but whose
    /// queue was full: sent in order as it drains, never dropped below the bound.
    to_control: std::collections::VecDeque<ControlCommand>,
    metrics: Arc<Metrics>,
    /// Last PLI sent to each publisher track, to throttle keyframe requests.
    last_pli: HashMap<(String, Kind), Instant>,
    /// Publishers that are bridges rather than peer connections.
    bridged: HashMap<SessionId, Bridged>,
    /// Streams being converted to FLV, and each stream's latest sender reports.
    taps: HashMap<String, mpsc::Sender<TapEvent>>,
    last_srs: HashMap<(String, Kind), rtc::rtcp::sender_report::SenderReport>,
    /// What each publisher track sends (bytes since the last tick, and the rate).
    rates: HashMap<(String, Kind), congestion::RateMeter>,
    /// Each stream's room policy, bounds and room label, for the room's decisions.
    stream_rooms: HashMap<String, congestion::StreamPolicy>,
    next_tick: Instant,
    last_tick: Instant,
    next_room_tick: Instant,
    /// Each simulcast layer's rate by (stream, SSRC), and each simulcast stream's
    /// active layers' SSRCs, lowest first (see `congestion::sort_layers`; refreshed
    /// every tick; a stream is simulcast when it has an entry there).
    layer_rates: HashMap<(String, u32), congestion::RateMeter>,
    stream_layers: HashMap<String, Vec<u32>>,
    /// Each simulcast layer's highest rate seen (its rank survives being switched off),
    /// and what each simulcast publisher was last told it needs to send.
    layer_peaks: HashMap<(String, u32), f64>,
    /// Streams whose layer set is a placeholder (no rates known yet: every layer, in
    /// SSRC order).
    placeholder_layers: std::collections::HashSet<String>,
    /// Since when each simulcast layer sends (over 10 kbit/s).
    layer_sending_since: HashMap<(String, u32), Instant>,
    dynacast: HashMap<String, congestion::Dynacast>,
    /// Connections given input since the last pump (a datagram, a forwarded packet, a
    /// timer, a report): only these are drained and written, so a datagram costs the
    /// connections it reaches, not all of them.
    dirty: HashSet<PeerKey, foldhash::fast::RandomState>,
    /// Every connection is drained on the next pump (after a control input, and on
    /// each congestion tick, which also judges liveness).
    sweep: bool,
    /// Connection timers, earliest first; an entry is live while it equals its peer's
    /// `timer` (a peer is pushed again only when its deadline moves earlier).
    timers: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, PeerKey)>>,
    load: load::Load,
    /// The UDP socket's own address (its kernel drop counter is found by its port).
    bound: SocketAddr,
    /// The other workers of the node, and what this one shares with them.
    crew: plane::Crew,
    /// 5-tuples whose datagrams reach this worker's socket but whose connection
    /// another worker owns (learnt from the ufrag of their STUN requests).
    foreign: HashMap<(TransportProtocol, SocketAddr), usize>,
    /// Datagrams for other workers, handed over once per wake-up.
    handoffs: Vec<Vec<(TransportProtocol, SocketAddr, BytesMut)>>,
    /// The demultiplexer sizes and active simulcast layers last added to the node's
    /// gauges (each worker adds its own change).
    demux_reported: (i64, i64),
    simulcast_reported: i64,
    /// Each stream's home: the worker its room's publishers live on (see `mirror`).
    stream_home: HashMap<String, usize>,
    /// Home side: the other workers mirroring each stream, what their subscribers
    /// last asked for, and what is queued for them in this pump.
    remote_wants: HashMap<String, HashSet<usize>>,
    remote_demand: HashMap<(String, usize), mirror::Demand>,
    mirror_out: Vec<Vec<mirror::Mirrored>>,
    /// Mirror side: each mirrored simulcast stream's layers in its home's order.
    layer_order: HashMap<String, Vec<u32>>,
    /// What must reach another worker but found its queue full, in order.
    to_mates: Vec<std::collections::VecDeque<plane::Between>>,
}

/// 5-tuples of other workers' connections remembered; past it the table starts again
/// (entries are learnt again from the next STUN request, a consent check within
/// seconds).
const MAX_FOREIGN: usize = 65_536;

/// Transport addresses remembered per connection (candidate pairs, a changed
/// network), and ufrags (the current one and the ones before the last ICE restarts).
const MAX_ADDRS: usize = 8;
const MAX_UFRAGS: usize = 3;

/// Datagrams read after one that woke the loop, before the connections are pumped.
const UDP_BATCH: usize = 63;

/// The longest a forwarded copy waits in a subscriber's outbox after it was written
/// (and its send time recorded for the congestion controller) before it is sent.
const SEND_HOLD_MAX: Duration = Duration::from_micros(250);

/// The most packets of a source's track forwarded as one group (a keyframe of a
/// bridged stream is 40-odd; GSO takes 64 datagrams in a call at most).
const SOURCE_GROUP_MAX: usize = 64;

/// What woke the media loop.
enum Wake<'a> {
    Control(Option<mpsc::Permit<'a, ControlCommand>>),
    Input(MediaInput),
    Bridge(BridgeInput),
    Udp(std::io::Result<(usize, SocketAddr)>),
    Tcp(tcp::TcpEvent),
    Between(plane::Between),
    Timer,
}

/// Commands for the control task that may wait for its queue (see `send_control`).
const CONTROL_BACKLOG: usize = 65_536;

/// Keyframe requests to one publisher track are sent at most this often.
const PLI_INTERVAL: Duration = Duration::from_millis(500);

/// A new subscriber of a bridged (RTMP) stream gets the current GOP replayed if its
/// keyframe is at most this old; otherwise it starts at the next keyframe. Measured in
/// headless Chrome (`cargo bench --bench browser`): Chrome decodes the replayed frames
/// and presents from live on (no frame presented more than 37 ms late in the first
/// 3 s), so a whole GOP is worth replaying. At 400 ms, a joiner waited for the next
/// keyframe more than half the time: first frame p50 399 ms / max 690 ms vs 143 / 156.
/// The replay is a burst (≈ 190 kB for 1.5 s at 1 Mbit/s), so it stays bounded.
const GOP_REPLAY_MAX_AGE: Duration = Duration::from_millis(1500);
/// Packets kept for that replay; a longer GOP is not replayed.
const GOP_MAX_PACKETS: usize = 1024;

/// What a bridge (an RTMP pusher converted to RTP) gives the media plane.
#[derive(Debug)]
pub enum BridgeInput {
    /// A track's codec is known: subscribers can be offered it.
    Track {
        session: SessionId,
        kind: Kind,
        codec: rtc::rtp_transceiver::rtp_sender::RTCRtpCodec,
    },
    Rtp {
        session: SessionId,
        kind: Kind,
        packet: rtc::rtp::Packet,
        keyframe: bool,
        arrived: Instant,
    },
    SenderReport {
        session: SessionId,
        kind: Kind,
        report: rtc::rtcp::sender_report::SenderReport,
    },
    /// The pusher is gone.
    Gone { session: SessionId },
    /// The source is a room's stream relayed from the node serving the room (rooms
    /// that span nodes): what it needs from there is asked on `asks`.
    Relayed {
        session: SessionId,
        asks: mpsc::Sender<UpstreamAsk>,
    },
}

/// What the media plane asks of the relay a relayed source comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamAsk {
    /// A local subscriber needs a keyframe.
    Keyframe(SessionId),
    /// Whether any local subscriber receives the source now: a relay carries only
    /// the streams some member here receives.
    Wanted(SessionId, bool),
}

/// What a converter to FLV gets from a WebRTC publisher's stream.
#[derive(Debug)]
pub enum TapEvent {
    Rtp {
        kind: Kind,
        packet: rtc::rtp::Packet,
        arrived: Instant,
    },
    SenderReport {
        kind: Kind,
        report: rtc::rtcp::sender_report::SenderReport,
    },
}

/// A bridged source as the media plane sees it.
#[derive(Default)]
struct Bridged {
    codecs: HashMap<Kind, rtc::rtp_transceiver::rtp_sender::RTCRtpCodec>,
    /// Video packets since the last keyframe, and when that keyframe came.
    gop: Vec<rtc::rtp::Packet>,
    gop_at: Option<Instant>,
    /// Relayed from another node: where its asks go, and whether it was last said
    /// to be wanted (to the relay, or to the home of a mirror).
    upstream: Option<mpsc::Sender<UpstreamAsk>>,
    wanted: bool,
    /// A mirror of a stream published on another worker of this node (its home).
    mirror_of: Option<usize>,
}

impl Media {
    pub fn new(
        config: MediaConfig,
        socket: UdpSocket,
        tcp: Option<(TcpListener, Arc<crate::limits::Connections>)>,
        tcp_bound: Option<SocketAddr>,
        control: mpsc::Sender<ControlCommand>,
        metrics: Arc<Metrics>,
        crew: plane::Crew,
    ) -> std::io::Result<Self> {
        // The address datagrams are handed to the connections with must be one of
        // their local candidates, or rtc drops every check: the socket's own address
        // when it is announced, else (bound to 0.0.0.0, or behind 1:1 NAT) the first
        // announced address on the socket's port.
        let bound = socket.local_addr()?;
        let local_addr = candidate_addr(bound, &config.announce);
        let load = load::Load::new(config.overload_busy_percent, Instant::now());
        // Every worker's ICE-TCP connections share the first worker's listener.
        let tcp_local_addr = tcp_bound.map(|a| candidate_addr(a, &config.announce));
        let udp = udp_out::UdpOut::new(
            &socket,
            metrics.udp_send_calls.clone(),
            metrics.udp_send_drops.clone(),
        )?;
        debug!(
            worker = crew.index,
            gso_segments = udp.max_segments(),
            "UDP sends: datagrams per system call at most"
        );
        Ok(Self {
            config,
            socket: Arc::new(socket),
            udp,
            sources: Vec::new(),
            local_addr,
            tcp,
            tcp_local_addr,
            tcp_writers: HashMap::new(),
            peers: FastMap::default(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            allowed: HashMap::new(),
            client_offers: HashMap::new(),
            ready_since: HashMap::new(),
            publishers: HashMap::new(),
            subscriptions: HashMap::new(),
            control,
            to_control: Default::default(),
            metrics,
            last_pli: HashMap::new(),
            bridged: HashMap::new(),
            taps: HashMap::new(),
            last_srs: HashMap::new(),
            rates: HashMap::new(),
            stream_rooms: HashMap::new(),
            next_tick: Instant::now(),
            last_tick: Instant::now(),
            next_room_tick: Instant::now() + congestion::ROOM_INTERVAL,
            layer_rates: HashMap::new(),
            stream_layers: HashMap::new(),
            layer_peaks: HashMap::new(),
            layer_sending_since: HashMap::new(),
            placeholder_layers: Default::default(),
            dynacast: HashMap::new(),
            dirty: HashSet::default(),
            sweep: false,
            timers: Default::default(),
            load,
            bound,
            handoffs: (0..crew.size()).map(|_| Vec::new()).collect(),
            mirror_out: (0..crew.size()).map(|_| Vec::new()).collect(),
            to_mates: (0..crew.size()).map(|_| Default::default()).collect(),
            layer_order: HashMap::new(),
            stream_home: HashMap::new(),
            remote_wants: HashMap::new(),
            remote_demand: HashMap::new(),
            simulcast_reported: 0,
            crew,
            foreign: HashMap::new(),
            demux_reported: (0, 0),
        })
    }

    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<MediaInput>,
        mut bridge_rx: mpsc::Receiver<BridgeInput>,
        mut between_rx: mpsc::Receiver<plane::Between>,
    ) {
        let socket = self.socket.clone();
        let control = self.control.clone();
        let mut buf = vec![0u8; 2048];
        let (tcp_tx, mut tcp_rx) = mpsc::channel(4096);
        let acceptor = self
            .tcp
            .take()
            .map(|(l, limit)| tokio::spawn(tcp::accept(l, limit, tcp_tx)));
        loop {
            let now = Instant::now();
            let deadline = self
                .timers
                .peek()
                .map(|std::cmp::Reverse((t, _))| *t)
                .unwrap_or(now + Duration::from_secs(1))
                .min(self.next_tick);
            let sleep = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline.max(now)));
            let wake = tokio::select! {
                permit = control.reserve(), if !self.to_control.is_empty() => Wake::Control(permit.ok()),
                input = rx.recv() => match input {
                    Some(input) => Wake::Input(input),
                    None => break,
                },
                Some(input) = bridge_rx.recv() => Wake::Bridge(input),
                res = socket.recv_from(&mut buf) => Wake::Udp(res),
                Some(event) = tcp_rx.recv() => Wake::Tcp(event),
                Some(msg) = between_rx.recv() => Wake::Between(msg),
                _ = sleep => Wake::Timer,
            };
            let woke = Instant::now();
            match wake {
                Wake::Control(permit) => {
                    if let (Some(permit), Some(cmd)) = (permit, self.to_control.pop_front()) {
                        permit.send(cmd);
                    }
                    self.flush_control();
                }
                Wake::Input(input) => {
                    // Offers, answers and the room's commands: work a member costs when
                    // it joins or changes what it sends, not for carrying its media.
                    let setup = matches!(input, MediaInput::Signal { .. } | MediaInput::Command(_));
                    self.input(input);
                    if setup {
                        self.load.setup(woke.elapsed());
                    }
                    self.sweep = true;
                }
                Wake::Bridge(input) => {
                    self.bridge_input(input);
                    // Take whatever else is queued before writing: one pump per burst.
                    while let Ok(more) = bridge_rx.try_recv() {
                        self.bridge_input(more);
                    }
                    self.flush_sources();
                }
                Wake::Udp(res) => {
                    match res {
                        Ok((n, from)) => {
                            let data = BytesMut::from(&buf[..n]);
                            self.datagram(data, from, TransportProtocol::UDP, false)
                        }
                        Err(e) => debug!(error = %e, "UDP receive error"),
                    }
                    // Take what else has arrived before pumping: one pump per burst.
                    for _ in 0..UDP_BATCH {
                        match socket.try_recv_from(&mut buf) {
                            Ok((n, from)) => {
                                let data = BytesMut::from(&buf[..n]);
                                self.datagram(data, from, TransportProtocol::UDP, false)
                            }
                            Err(_) => break,
                        }
                    }
                    self.flush_handoffs();
                }
                Wake::Tcp(event) => match event {
                    tcp::TcpEvent::Opened { from, writer } => {
                        let me = self.crew.index;
                        for w in (0..self.crew.size()).filter(|w| *w != me) {
                            let msg = plane::Between::TcpOpened {
                                from,
                                writer: writer.clone(),
                            };
                            self.send_reliably(w, msg);
                        }
                        self.tcp_writers.insert(from, writer);
                    }
                    tcp::TcpEvent::Frame { from, data } => {
                        self.datagram(
                            BytesMut::from(&data[..]),
                            from,
                            TransportProtocol::TCP,
                            false,
                        );
                        self.flush_handoffs();
                    }
                    tcp::TcpEvent::Closed { from } => {
                        let me = self.crew.index;
                        for w in (0..self.crew.size()).filter(|w| *w != me) {
                            self.send_reliably(w, plane::Between::TcpClosed { from });
                        }
                        self.tcp_closed(from);
                    }
                },
                Wake::Between(msg) => {
                    self.between(msg);
                    while let Ok(more) = between_rx.try_recv() {
                        self.between(more);
                    }
                }
                Wake::Timer => self.timeout(woke),
            }
            self.pump().await;
            let now = Instant::now();
            self.load.worked(woke, now);
            if self.load.due(now) {
                self.judge_load(now);
            }
        }
        if let Some(a) = acceptor {
            a.abort();
        }
        debug!("media task stopped");
    }

    /// Publishes the last second's load, and refuses or takes joins again when the
    /// node becomes or stops being overloaded (any of its workers). The kernel's drop
    /// counter covers the port's sockets together: the first worker reads it.
    fn judge_load(&mut self, now: Instant) {
        let drops = (self.crew.index == 0)
            .then(|| load::udp_socket_drops(self.bound.port(), self.bound.is_ipv6()))
            .flatten();
        let j = self.load.judge(now, drops);
        let (busiest, any) = self
            .crew
            .judged(j.busy_percent.round().clamp(0.0, 100.0) as u8, j.changed);
        self.metrics.media_busy_percent.set(i64::from(busiest));
        let worker = self.crew.index.to_string();
        self.metrics
            .media_worker_busy_percent
            .with_label_values(&[&worker])
            .set(j.busy_percent.round() as i64);
        self.metrics
            .media_worker_setup_percent
            .with_label_values(&[&worker])
            .set(j.setup_percent.round() as i64);
        self.metrics.udp_receive_drops.inc_by(j.drops);
        self.metrics.media_overloaded.set(i64::from(any));
        if let Some(overloaded) = j.changed {
            if overloaded {
                warn!(
                    worker = self.crew.index,
                    busy_percent = j.busy_percent.round(),
                    setup_percent = j.setup_percent.round(),
                    dropped = j.drops,
                    peers = self.peers.len(),
                    "media plane overloaded: new joins are refused until it recovers"
                );
            } else {
                info!(
                    worker = self.crew.index,
                    busy_percent = j.busy_percent.round(),
                    "media plane recovered: joins are taken again"
                );
            }
        }
    }

    /// What another worker hands over or tells.
    fn between(&mut self, msg: plane::Between) {
        match msg {
            plane::Between::Datagrams(batch) => {
                for (protocol, from, data) in batch {
                    self.datagram(data, from, protocol, true);
                }
            }
            plane::Between::TcpOpened { from, writer } => {
                self.tcp_writers.insert(from, writer);
            }
            plane::Between::TcpClosed { from } => self.tcp_closed(from),
            plane::Between::Forget(addrs) => {
                for a in addrs {
                    self.foreign.remove(&a);
                }
            }
            plane::Between::Command(cmd) => {
                self.command(*cmd);
                self.sweep = true;
            }
            plane::Between::Media(batch) => self.mirrored_batch(batch),
            plane::Between::Layers {
                stream_id,
                ssrcs,
                order,
                placeholder,
            } => self.mirror_layers(stream_id, ssrcs, order, placeholder),
            plane::Between::Want {
                stream_id,
                worker,
                wanted,
            } => {
                self.mirror_wanted(stream_id, worker, wanted, Instant::now());
                self.sweep = true;
            }
            plane::Between::Keyframe {
                stream_id,
                now_please,
            } => self.request_keyframe(&stream_id, Instant::now(), now_please),
            plane::Between::Demand {
                stream_id,
                worker,
                demand,
            } => {
                if self
                    .remote_wants
                    .get(&stream_id)
                    .is_some_and(|w| w.contains(&worker))
                {
                    self.remote_demand.insert((stream_id, worker), demand);
                }
            }
        }
    }

    fn tcp_closed(&mut self, from: SocketAddr) {
        self.tcp_writers.remove(&from);
        self.by_addr.remove(&(TransportProtocol::TCP, from));
        self.foreign.remove(&(TransportProtocol::TCP, from));
    }

    /// Sends `msg` to worker `w` after whatever waits for its queue: never dropped
    /// below `CONTROL_BACKLOG` waiting (for what must arrive: a stream's start and end,
    /// an ICE-TCP connection's writer).
    fn send_reliably(&mut self, w: usize, msg: plane::Between) {
        let backlog = &mut self.to_mates[w];
        if backlog.is_empty() {
            if let Some(msg) = self.crew.send_or_return(w, msg) {
                backlog.push_back(msg);
            }
        } else if backlog.len() < CONTROL_BACKLOG {
            backlog.push_back(msg);
        } else {
            warn!(
                worker = w,
                "media worker backlog full; a stream's start or end (or an ICE-TCP connection's) was dropped"
            );
            self.metrics.control_backlog_drops.inc();
        }
    }

    /// Sends what waits for the other workers' queues, in order, as they drain.
    fn flush_reliably(&mut self) {
        for w in 0..self.to_mates.len() {
            while let Some(msg) = self.to_mates[w].pop_front() {
                if let Some(msg) = self.crew.send_or_return(w, msg) {
                    self.to_mates[w].push_front(msg);
                    break;
                }
            }
        }
    }

    /// Sends the datagrams that reached this worker for other workers' connections.
    fn flush_handoffs(&mut self) {
        for w in 0..self.handoffs.len() {
            if self.handoffs[w].is_empty() {
                continue;
            }
            let batch = std::mem::take(&mut self.handoffs[w]);
            let n = batch.len() as u64;
            self.metrics.handoffs.inc_by(n);
            if !self.crew.send(w, plane::Between::Datagrams(batch)) {
                self.metrics.handoff_drops.inc_by(n);
            }
        }
    }

    fn timeout(&mut self, now: Instant) {
        if now >= self.next_tick {
            self.congestion_tick(now);
            self.sweep = true;
        }
        while let Some(std::cmp::Reverse((at, key))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(p) = self.peers.get_mut(&key) else {
                continue; // closed since
            };
            if p.timer != Some(at) {
                continue; // superseded by an earlier entry
            }
            p.timer = None;
            if p.pc.poll_timeout().is_some_and(|t| t <= now) {
                if let Err(e) = p.pc.handle_timeout(now) {
                    debug!(?key, error = %e, "peer timeout handling failed");
                }
            }
            // Drained, written and rescheduled by the pump.
            self.dirty.insert(key);
        }
    }

    /// One datagram (or ICE-TCP frame) from `from`; `handed` when another worker's
    /// socket received it for a connection of this one (never handed on again). Its
    /// one copy, made where it was read, is what the connection (or the worker it
    /// is handed to) takes.
    fn datagram(
        &mut self,
        data: BytesMut,
        from: SocketAddr,
        protocol: TransportProtocol,
        handed: bool,
    ) {
        let key = match self.by_addr.get(&(protocol, from)) {
            Some(k) => *k,
            None => {
                if !handed {
                    if let Some(&w) = self.foreign.get(&(protocol, from)) {
                        self.handoffs[w].push((protocol, from, data));
                        return;
                    }
                }
                // A new 5-tuple must introduce itself with a STUN request naming our ufrag.
                let Some(ufrag) =
                    stun_username(&data).and_then(|u| u.split(':').next().map(str::to_owned))
                else {
                    return;
                };
                let Some(&key) = self.by_ufrag.get(&ufrag) else {
                    // Another worker's connection: that worker gets this 5-tuple's
                    // datagrams from now on (its integrity is checked there).
                    if let Some(w) = (!handed)
                        .then(|| self.crew.owner_of_ufrag(&ufrag))
                        .flatten()
                    {
                        if self.foreign.len() >= MAX_FOREIGN {
                            self.foreign.clear();
                        }
                        self.foreign.insert((protocol, from), w);
                        self.handoffs[w].push((protocol, from, data));
                        return;
                    }
                    debug!(%from, ufrag, "STUN for an unknown ufrag; dropped");
                    return;
                };
                self.by_addr.insert((protocol, from), key);
                if let Some(p) = self.peers.get_mut(&key) {
                    p.addrs.push((protocol, from));
                    // The request's integrity is checked by the connection after this:
                    // whoever knows the ufrag can send from many ports, so a connection
                    // keeps its latest few addresses, not all of them.
                    while p.addrs.len() > MAX_ADDRS {
                        let old = p.addrs.remove(0);
                        self.by_addr.remove(&old);
                    }
                }
                key
            }
        };
        let Some(p) = self.peers.get_mut(&key) else {
            self.by_addr.remove(&(protocol, from));
            return;
        };
        let first = data.first().copied();
        if first.is_some_and(|b| (128..192).contains(&b)) {
            tracing::trace!(
                ?key,
                len = data.len(),
                pt = data.get(1).map(|b| b & 0x7f),
                "RTP/RTCP datagram"
            );
        }
        let msg = TaggedBytesMut {
            now: Instant::now(),
            transport: TransportContext {
                local_addr: match protocol {
                    TransportProtocol::TCP => self.tcp_local_addr.unwrap_or(self.local_addr),
                    _ => self.local_addr,
                },
                peer_addr: from,
                ecn: None,
                transport_protocol: protocol,
            },
            message: data,
        };
        self.dirty.insert(key);
        // Before DTLS is up, a datagram is the handshake (ICE checks, DTLS flights):
        // work the connection costs once, counted apart by the load judge.
        let setup = (!p.is_connected()).then_some(msg.now);
        match p.pc.handle_read(msg) {
            // A STUN check the connection took passed its integrity check.
            Ok(()) if first.is_some_and(|b| b < 2) => p.liveness.heard(Instant::now()),
            Ok(()) => {}
            Err(e) => debug!(?key, error = %e, "peer rejected a datagram"),
        }
        if let Some(t) = setup {
            self.load.setup(t.elapsed());
        }
    }

    fn tell(&mut self, session: SessionId, msg: ServerMessage) {
        self.send_control(ControlCommand::MediaSignal { session, msg });
    }

    /// Hands `cmd` to the control task, after what is already waiting for it. A full
    /// queue (everyone leaving at once, a control task busy) delays it; only past
    /// `CONTROL_BACKLOG` waiting commands is one dropped, and that is logged.
    fn send_control(&mut self, cmd: ControlCommand) {
        if self.to_control.len() >= CONTROL_BACKLOG {
            warn!(
                ?cmd,
                "control backlog full; a message to the control task was dropped"
            );
            self.metrics.control_backlog_drops.inc();
            return;
        }
        self.to_control.push_back(cmd);
        self.flush_control();
    }

    fn flush_control(&mut self) {
        while let Some(cmd) = self.to_control.pop_front() {
            match self.control.try_send(cmd) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(cmd)) => {
                    self.to_control.push_front(cmd);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.to_control.clear();
                    break;
                }
            }
        }
    }

    fn input(&mut self, input: MediaInput) {
        match input {
            MediaInput::Command(cmd) => {
                // A stream starts and ends at its home first, which then tells the
                // other workers: anything they ask of it comes after it knows.
                let home = match &cmd {
                    MediaCommand::AllowPublish { room, .. } => {
                        Some(plane::worker_for(room, self.crew.size()))
                    }
                    MediaCommand::EndStream { stream_id } => {
                        self.stream_home.get(stream_id).copied()
                    }
                    _ => None,
                };
                let tell =
                    (self.crew.size() > 1 && home == Some(self.crew.index)).then(|| cmd.clone());
                self.command(cmd);
                if let Some(cmd) = tell {
                    let me = self.crew.index;
                    for w in (0..self.crew.size()).filter(|w| *w != me) {
                        self.send_reliably(w, plane::Between::Command(Box::new(cmd.clone())));
                    }
                }
            }
            MediaInput::Signal { session, msg } => {
                if let Err(e) = self.signal(session, msg) {
                    self.tell(session, ServerMessage::error(ErrorCode::Negotiation, e));
                }
            }
            MediaInput::Tap { stream_id, tx } => match tx {
                Some(tx) => {
                    // The converter starts on the publisher's clock if it is known.
                    for kind in [Kind::Video, Kind::Audio] {
                        if let Some(sr) = self.last_srs.get(&(stream_id.clone(), kind)) {
                            let _ = tx.try_send(TapEvent::SenderReport {
                                kind,
                                report: sr.clone(),
                            });
                        }
                    }
                    self.taps.insert(stream_id, tx);
                }
                None => {
                    self.taps.remove(&stream_id);
                }
            },
            MediaInput::RequestKeyframe { stream_id } => {
                self.request_keyframe(&stream_id, Instant::now(), true);
            }
            #[cfg(feature = "fault-injection")]
            MediaInput::InjectPanic => panic!("injected fault"),
            #[cfg(feature = "fault-injection")]
            MediaInput::InjectStall(d) => std::thread::sleep(d),
        }
    }

    fn command(&mut self, cmd: MediaCommand) {
        match cmd {
            MediaCommand::AllowPublish {
                session,
                stream_id,
                kinds,
                room,
                source,
                screen,
                policy,
                min_bitrate,
                max_bitrate,
            } => {
                let (default_min, default_max) = self.config.publisher_bitrate;
                let room_label = format!("{}:{}", room.sdk_app_id, room.name());
                self.metrics.init_room(&room_label);
                self.stream_rooms.insert(
                    stream_id.clone(),
                    congestion::StreamPolicy {
                        room: room_label,
                        policy,
                        min: min_bitrate.map_or(default_min, f64::from),
                        max: max_bitrate.map_or(default_max, f64::from),
                        // No RTCP path to the publisher: an RTMP push, or a
                        // stream relayed from another node.
                        rtmp: source != "webrtc",
                        screen,
                        told: None,
                    },
                );
                self.stream_home.insert(
                    stream_id.clone(),
                    plane::worker_for(&room, self.crew.size()),
                );
                self.publishers.insert(stream_id.clone(), session);
                self.allowed.insert(session, Allowed { stream_id, kinds });
            }
            MediaCommand::Subscribe {
                subscriber,
                stream_id,
                kinds,
            } => {
                self.subscriptions
                    .entry(stream_id.clone())
                    .or_default()
                    .insert(subscriber, kinds);
                // Its keyframe is asked for when its downtrack can carry one (the
                // first packet it sees connected: `Peer::keyframe_now`).
                self.sync_subscriber(subscriber);
            }
            MediaCommand::Unsubscribe {
                subscriber,
                stream_id,
            } => {
                if let Some(s) = self.subscriptions.get_mut(&stream_id) {
                    s.remove(&subscriber);
                }
                self.sync_subscriber(subscriber);
            }
            MediaCommand::EndStream { stream_id } => {
                self.taps.remove(&stream_id);
                self.ready_since.remove(&stream_id);
                self.rates.remove(&(stream_id.clone(), Kind::Video));
                self.rates.remove(&(stream_id.clone(), Kind::Audio));
                self.stream_layers.remove(&stream_id);
                self.layer_rates.retain(|(s, _), _| *s != stream_id);
                self.layer_peaks.retain(|(s, _), _| *s != stream_id);
                self.layer_sending_since.retain(|(s, _), _| *s != stream_id);
                self.dynacast.remove(&stream_id);
                self.stream_home.remove(&stream_id);
                self.remote_wants.remove(&stream_id);
                self.remote_demand.retain(|(s, _), _| *s != stream_id);
                self.placeholder_layers.remove(&stream_id);
                self.layer_order.remove(&stream_id);
                if let Some(sp) = self.stream_rooms.remove(&stream_id) {
                    if !self.stream_rooms.values().any(|o| o.room == sp.room) {
                        self.metrics.forget_room(&sp.room);
                    }
                }
                for kind in [Kind::Video, Kind::Audio] {
                    self.last_srs.remove(&(stream_id.clone(), kind));
                    self.last_pli.remove(&(stream_id.clone(), kind));
                }
                let subscribers: Vec<SessionId> = self
                    .subscriptions
                    .remove(&stream_id)
                    .map(|s| s.into_keys().collect())
                    .unwrap_or_default();
                if let Some(publisher) = self.publishers.remove(&stream_id) {
                    self.allowed.remove(&publisher);
                    self.close_peer(PeerKey(publisher, Target::Publisher));
                    self.drop_bridged(publisher);
                }
                for s in subscribers {
                    self.sync_subscriber(s);
                }
            }
            MediaCommand::CloseSession { session } => {
                for subs in self.subscriptions.values_mut() {
                    subs.remove(&session);
                }
                self.allowed.remove(&session);
                self.client_offers.remove(&session);
                self.close_peer(PeerKey(session, Target::Publisher));
                self.close_peer(PeerKey(session, Target::Subscriber));
                self.drop_bridged(session);
            }
        }
        self.ask_upstream_demand();
        self.ask_mirror_demand();
    }

    /// Tells each relayed source's relay whether a subscriber here receives it now
    /// (when that changed): the relay subscribes to it, or unsubscribes, at the
    /// room's node. A full queue is tried again at the next command.
    fn ask_upstream_demand(&mut self) {
        for (session, b) in self.bridged.iter_mut() {
            let Some(up) = &b.upstream else { continue };
            let wanted = self.allowed.get(session).is_some_and(|a| {
                self.subscriptions
                    .get(&a.stream_id)
                    .is_some_and(|s| !s.is_empty())
                    || self.remote_wants.contains_key(&a.stream_id)
            });
            if wanted != b.wanted && up.try_send(UpstreamAsk::Wanted(*session, wanted)).is_ok() {
                b.wanted = wanted;
            }
        }
    }

    fn close_peer(&mut self, key: PeerKey) {
        if let Some(mut p) = self.peers.remove(&key) {
            for u in &p.ufrags {
                self.by_ufrag.remove(u);
                self.crew.unregister_ufrag(u);
            }
            for a in &p.addrs {
                self.by_addr.remove(a);
            }
            if self.crew.size() > 1 && !p.addrs.is_empty() {
                let addrs = p.addrs.clone();
                self.crew
                    .tell_others(|| plane::Between::Forget(addrs.clone()));
            }
            p.untrack_metrics(&self.metrics);
            self.metrics.peer_connections.dec();
            let _ = p.pc.close();
            debug!(?key, "peer connection closed");
        }
    }

    /// Lets the demultiplexer find `key` by the ufrag of its latest local description
    /// (new after an ICE restart; the last few stay, for checks still in flight, the
    /// older ones go so restarts do not grow the index).
    fn index_ufrag(&mut self, key: PeerKey) {
        if let Some(p) = self.peers.get_mut(&key) {
            if p.learn_ufrag() {
                if let Some(u) = p.ufrags.last() {
                    self.by_ufrag.insert(u.clone(), key);
                    self.crew.register_ufrag(u);
                }
                while p.ufrags.len() > MAX_UFRAGS {
                    let old = p.ufrags.remove(0);
                    self.by_ufrag.remove(&old);
                    self.crew.unregister_ufrag(&old);
                }
            }
        }
    }

    fn new_peer(&mut self, key: PeerKey) -> Result<&mut Peer, String> {
        if !self.peers.contains_key(&key) {
            let p = Peer::new(key, &self.config, &self.metrics).map_err(|e| e.to_string())?;
            self.metrics.peer_connections.inc();
            self.peers.insert(key, p);
        }
        Ok(self.peers.get_mut(&key).expect("just inserted"))
    }

    fn signal(&mut self, session: SessionId, msg: ClientMessage) -> Result<(), String> {
        match msg {
            ClientMessage::Offer {
                target: Target::Publisher,
                sdp,
            } => {
                let allowed = self
                    .allowed
                    .get(&session)
                    .cloned()
                    .ok_or("send `publish` (and have it accepted) before offering")?;
                for kind in peer::offered_send_kinds(&sdp) {
                    if !allowed.kinds.contains(&kind) {
                        return Err(format!(
                            "the offer sends {kind:?}, which `publish` did not declare (or the privateMapKey does not allow)"
                        ));
                    }
                }
                let key = PeerKey(session, Target::Publisher);
                self.new_peer(key)?;
                self.answer_offer(key, sdp)
            }
            ClientMessage::Offer {
                target: Target::Subscriber,
                sdp,
            } => {
                // A client that offers its own receiving connection (a WHEP player):
                // answered as soon as it subscribes to something. Such a connection
                // takes the client's offers again later (an ICE restart over WHEP's
                // PATCH: the same sections, new credentials); one the server offers
                // does not.
                let key = PeerKey(session, Target::Subscriber);
                if let Some(p) = self.peers.get(&key) {
                    if !p.answer_mode {
                        return Err(
                            "this session's subscriber connection exists; its offers come from the server"
                                .into(),
                        );
                    }
                    // A re-offer is an ICE restart (WHEP's PATCH).
                    self.answer_offer(key, sdp)?;
                    self.path_restarted(key, Instant::now());
                    return Ok(());
                }
                self.client_offers.insert(session, sdp);
                self.sync_subscriber(session);
                Ok(())
            }
            ClientMessage::Answer {
                target: Target::Subscriber,
                sdp,
            } => {
                let key = PeerKey(session, Target::Subscriber);
                let p = self
                    .peers
                    .get_mut(&key)
                    .ok_or("no subscriber offer is pending")?;
                p.accept_answer(sdp)
                    .map_err(|e| format!("cannot apply the answer: {e}"))?;
                // Changes that arrived during the negotiation are offered now.
                self.sync_subscriber(session);
                Ok(())
            }
            ClientMessage::RestartIce => {
                // New ICE credentials on our side too; the offer that follows carries them.
                let p = self
                    .peers
                    .get_mut(&PeerKey(session, Target::Subscriber))
                    .ok_or("no subscriber connection to restart")?;
                p.restart_ice();
                info!(
                    session = session.0,
                    "ICE restart of the subscriber connection"
                );
                self.path_restarted(PeerKey(session, Target::Subscriber), Instant::now());
                self.sync_subscriber(session);
                Ok(())
            }
            ClientMessage::Candidate { target, candidate } => {
                if let (Some(c), Some(p)) =
                    (candidate, self.peers.get_mut(&PeerKey(session, target)))
                {
                    p.add_remote_candidate(c);
                }
                Ok(())
            }
            other => Err(format!(
                "`{}` with that target is not accepted",
                other.type_name()
            )),
        }
    }

    /// Answers a client's offer on an existing connection `key` and sends the answer.
    fn answer_offer(&mut self, key: PeerKey, sdp: String) -> Result<(), String> {
        let p = self.peers.get_mut(&key).ok_or("no such connection")?;
        // Only what a publisher sends follows the ptime it is asked for.
        let ptime = (key.1 == Target::Publisher && self.config.publisher_audio_ptime_ms > 0)
            .then_some(self.config.publisher_audio_ptime_ms);
        let answer = p
            .answer(sdp, ptime)
            .map_err(|e| format!("cannot answer the offer: {e}"))?;
        self.index_ufrag(key);
        self.tell(
            key.0,
            ServerMessage::Answer {
                target: key.1,
                sdp: answer,
            },
        );
        Ok(())
    }

    /// Brings a subscriber's connection in line with its subscriptions: adds tracks for
    /// new publisher tracks, removes ended ones, and offers when something changed.
    fn sync_subscriber(&mut self, subscriber: SessionId) {
        let mut wanted: HashSet<(String, Kind)> = HashSet::new();
        let mut codecs = HashMap::new();
        // Streams with some of the kinds asked for ready and others not yet.
        let mut partial = Vec::new();
        for (stream_id, subs) in &self.subscriptions {
            let Some(kinds) = subs.get(&subscriber) else {
                continue;
            };
            let Some(publisher) = self.publishers.get(stream_id) else {
                continue;
            };
            let bridged = self.bridged.get(publisher);
            let pub_peer = self.peers.get(&PeerKey(*publisher, Target::Publisher));
            if bridged.is_none() && pub_peer.is_none() {
                continue;
            }
            let mut ready = 0;
            for kind in kinds {
                let codec = match bridged {
                    Some(b) => b.codecs.get(kind).cloned(),
                    None => pub_peer.and_then(|p| p.track_codec(*kind)),
                };
                if let Some(codec) = codec {
                    ready += 1;
                    wanted.insert((stream_id.clone(), *kind));
                    codecs.insert((stream_id.clone(), *kind), codec);
                }
            }
            if ready > 0 && ready < kinds.len() {
                partial.push(stream_id.clone());
            }
        }
        let key = PeerKey(subscriber, Target::Subscriber);
        if wanted.is_empty() && !self.peers.contains_key(&key) {
            return;
        }
        let now = Instant::now();
        let waiting = partial.into_iter().any(|stream_id| {
            let since = *self.ready_since.entry(stream_id).or_insert(now);
            now.saturating_duration_since(since) < CLIENT_OFFER_WAIT
        });
        if waiting && self.client_offers.contains_key(&subscriber) {
            // Answered when the rest arrives (the publisher's track opens) or the
            // wait is over (the congestion tick looks again).
            return;
        }
        let metrics = self.metrics.clone();
        if let Some(offer) = self.client_offers.remove(&subscriber) {
            let answer = match self.new_peer(key) {
                Ok(p) => p.answer_subscriber(offer, &wanted, &codecs, &metrics),
                Err(e) => Err(e),
            };
            self.index_ufrag(key);
            match answer {
                Ok(sdp) => self.tell(
                    subscriber,
                    ServerMessage::Answer {
                        target: Target::Subscriber,
                        sdp,
                    },
                ),
                Err(e) => {
                    warn!(session = subscriber.0, error = %e, "a client's subscriber offer failed");
                    self.close_peer(key);
                    self.tell(subscriber, ServerMessage::error(ErrorCode::Negotiation, e));
                }
            }
            return;
        }
        let offer = match self.new_peer(key) {
            Ok(p) => p.sync_downtracks(&wanted, &codecs, &metrics),
            Err(e) => Err(e),
        };
        self.index_ufrag(key);
        match offer {
            Ok(Some(sdp)) => self.tell(
                subscriber,
                ServerMessage::Offer {
                    target: Target::Subscriber,
                    sdp,
                },
            ),
            Ok(None) => {}
            Err(e) => warn!(session = subscriber.0, error = %e, "subscriber renegotiation failed"),
        }
    }

    /// Sends a PLI to the publisher of `stream_id`'s video, throttled unless `now_please`.
    fn request_keyframe(&mut self, stream_id: &str, now: Instant, now_please: bool) {
        let Some(publisher) = self.publishers.get(stream_id).copied() else {
            return;
        };
        let throttle_key = (stream_id.to_owned(), Kind::Video);
        if !now_please {
            if let Some(last) = self.last_pli.get(&throttle_key) {
                if now.duration_since(*last) < PLI_INTERVAL {
                    return;
                }
            }
        }
        if let Some(home) = self.bridged.get(&publisher).and_then(|b| b.mirror_of) {
            // Mirrored: asked of the home worker, which throttles and asks the publisher.
            let ask = plane::Between::Keyframe {
                stream_id: stream_id.to_owned(),
                now_please,
            };
            if self.crew.send(home, ask) {
                self.last_pli.insert(throttle_key, now);
            }
            return;
        }
        if let Some(up) = self
            .bridged
            .get(&publisher)
            .and_then(|b| b.upstream.as_ref())
        {
            // Relayed from the room's node: asked there, which asks the publisher.
            if up.try_send(UpstreamAsk::Keyframe(publisher)).is_ok() {
                self.last_pli.insert(throttle_key, now);
                self.metrics.plis.with_label_values(&["to_origin"]).inc();
            }
            return;
        }
        let key = PeerKey(publisher, Target::Publisher);
        if let Some(p) = self.peers.get_mut(&key) {
            self.dirty.insert(key);
            if p.send_pli(now) {
                self.last_pli.insert(throttle_key, now);
                self.metrics.plis.with_label_values(&["to_publisher"]).inc();
            }
        }
    }

    /// Drains the connections given input since the last pump (all of them after a
    /// control input or a tick): datagrams out, events, and media to forward.
    async fn pump(&mut self) {
        self.flush_sources(); // already empty: every batch that queues flushes
        let now = Instant::now();
        let mut forwards = Vec::new();
        let mut keyframe_requests: Vec<String> = Vec::new();
        let mut sender_reports = Vec::new();
        let mut failed = Vec::new();
        let mut opened = Vec::new();
        let keys: Vec<PeerKey> = if std::mem::take(&mut self.sweep) {
            self.peers.keys().copied().collect()
        } else {
            self.dirty.iter().copied().collect()
        };
        for key in &keys {
            let Some(p) = self.peers.get_mut(key) else {
                continue;
            };
            let drained = p.drain();
            let gone = p.liveness.gone(now);
            if let Some((why, label)) = gone {
                info!(session = key.0 .0, ?key, why, "peer gone");
                self.metrics.peers_lost.with_label_values(&[label]).inc();
            } else if drained.failed {
                info!(
                    session = key.0 .0,
                    ?key,
                    "peer connection failed or closed by the peer"
                );
                self.metrics.peers_lost.with_label_values(&["failed"]).inc();
            }
            for kind in &drained.published {
                self.metrics
                    .published_tracks
                    .with_label_values(&[forward::kind_label(*kind)])
                    .inc();
            }
            for kind in &drained.unpublished {
                self.metrics
                    .published_tracks
                    .with_label_values(&[forward::kind_label(*kind)])
                    .dec();
            }
            if drained.failed || gone.is_some() {
                failed.push(*key);
            }
            if drained.track_ready {
                opened.push(key.0);
            }
            for (kind, packet, arrived, keyframe) in drained.media {
                let inbound = Inbound {
                    packet,
                    keyframe,
                    arrived,
                };
                match forwards.iter_mut().find(
                    |(p, k, _): &&mut (SessionId, Kind, Vec<Inbound>)| (*p, *k) == (key.0, kind),
                ) {
                    Some((_, _, group)) => group.push(inbound),
                    None => forwards.push((key.0, kind, vec![inbound])),
                }
            }
            for (stream_id, _kind) in drained.keyframe_requests {
                keyframe_requests.push(stream_id);
            }
            for (kind, sr) in drained.sender_reports {
                sender_reports.push((key.0, kind, sr));
            }
            if let (Some(bps), Some(c)) = (drained.remb, p.congestion.as_mut()) {
                c.remb = Some((bps, now));
            }
        }
        for session in opened {
            info!(session = session.0, "publisher track open");
            self.mirror_tracks(session);
            // Subscribers waiting for this publisher's codec can now get their tracks.
            self.sync_subscribers_of(session);
            let stream = self.allowed.get(&session).map(|a| a.stream_id.clone());
            if let Some(stream_id) = stream {
                self.request_keyframe(&stream_id, now, true);
            }
        }
        // Each publisher's packets of one kind go out together, in the order they
        // came: every subscriber is written all of them at once, and a run of equal
        // datagrams (a frame's fragments) leaves in one system call. Audio first: a
        // packet or two per publisher, it never waits behind a burst of video.
        forwards.sort_by_key(|(_, kind, _)| *kind != Kind::Audio);
        for (publisher, kind, group) in forwards {
            // Residence: datagram handed to the connection → its last copy sent.
            if let Some(sent) = self.forward_gated(publisher, kind, &group) {
                for inbound in &group {
                    self.metrics.forward_latency.observe(
                        sent.saturating_duration_since(inbound.arrived)
                            .as_secs_f64(),
                    );
                }
            }
        }
        for (publisher, kind, sr) in sender_reports {
            self.relay_sender_report(publisher, kind, &sr, now);
        }
        for stream_id in keyframe_requests {
            self.metrics
                .plis
                .with_label_values(&["from_subscriber"])
                .inc();
            self.request_keyframe(&stream_id, now, false);
        }
        for key in failed {
            info!(
                session = key.0 .0,
                ?key,
                "peer connection failed; the member is removed"
            );
            self.send_control(ControlCommand::MediaGone { session: key.0 });
            self.close_peer(key);
        }
        // What was drained, and whatever forwarding, reports and requests reached.
        self.dirty.extend(keys);
        for key in self.dirty.drain() {
            let Some(p) = self.peers.get_mut(&key) else {
                continue;
            };
            transmit(&self.socket, &self.tcp_writers, p);
            if let Some(t) = p.pc.poll_timeout() {
                if p.timer.is_none_or(|s| t < s) {
                    p.timer = Some(t);
                    self.timers.push(std::cmp::Reverse((t, key)));
                }
            }
        }
        self.flush_mirrors();
        self.flush_reliably();
    }

    /// Gives every subscriber of the publisher's stream the publisher's clock mapping.
    fn relay_sender_report(
        &mut self,
        publisher: SessionId,
        kind: Kind,
        sr: &rtc::rtcp::sender_report::SenderReport,
        now: Instant,
    ) {
        let Some(stream_id) = self.allowed.get(&publisher).map(|a| a.stream_id.clone()) else {
            return;
        };
        if self
            .bridged
            .get(&publisher)
            .is_none_or(|b| b.mirror_of.is_none())
        {
            self.queue_for_mirrors(&stream_id, || mirror::Mirrored::SenderReport {
                publisher,
                kind,
                report: sr.clone(),
            });
        }
        if !self.bridged.contains_key(&publisher) {
            self.last_srs.insert((stream_id.clone(), kind), sr.clone());
            if let Some(tx) = self.taps.get(&stream_id) {
                let _ = tx.try_send(TapEvent::SenderReport {
                    kind,
                    report: sr.clone(),
                });
            }
        }
        let Some(subs) = self.subscriptions.get(&stream_id) else {
            return;
        };
        let targets: Vec<SessionId> = subs.keys().copied().collect();
        for s in targets {
            let key = PeerKey(s, Target::Subscriber);
            if let Some(p) = self.peers.get_mut(&key) {
                self.dirty.insert(key);
                if p.send_sender_report(&stream_id, kind, sr, now) {
                    self.metrics.sender_reports.inc();
                }
            }
        }
    }

    fn bridge_input(&mut self, input: BridgeInput) {
        if !matches!(input, BridgeInput::Rtp { .. }) {
            self.flush_sources();
        }
        // A track or a pusher gone changes subscriptions: every connection is looked at.
        if matches!(input, BridgeInput::Track { .. } | BridgeInput::Gone { .. }) {
            self.sweep = true;
        }
        match input {
            BridgeInput::Track {
                session,
                kind,
                codec,
            } => {
                let b = self.bridged.entry(session).or_default();
                if b.codecs.insert(kind, codec).is_none() {
                    self.metrics
                        .published_tracks
                        .with_label_values(&[forward::kind_label(kind)])
                        .inc();
                }
                self.sync_subscribers_of(session);
                self.mirror_tracks(session);
            }
            BridgeInput::Rtp {
                session,
                kind,
                packet,
                keyframe,
                arrived,
            } => {
                let gated = (kind == Kind::Video).then_some(keyframe);
                self.source_rtp(session, kind, packet, gated, arrived);
            }
            BridgeInput::SenderReport {
                session,
                kind,
                report,
            } => self.relay_sender_report(session, kind, &report, Instant::now()),
            BridgeInput::Gone { session } => self.drop_bridged(session),
            BridgeInput::Relayed { session, asks } => {
                let b = self.bridged.entry(session).or_default();
                b.upstream = Some(asks);
                b.wanted = false;
                self.ask_upstream_demand();
            }
        }
    }

    /// Offers a source's tracks to the local subscribers of its stream.
    fn sync_subscribers_of(&mut self, source: SessionId) {
        let stream = self.allowed.get(&source).map(|a| a.stream_id.clone());
        if let Some(stream_id) = stream {
            // A client's offer waits for the stream's other kinds from the moment its
            // first one is ready, not from when the offer came.
            self.ready_since
                .entry(stream_id.clone())
                .or_insert_with(Instant::now);
            let subs: Vec<SessionId> = self
                .subscriptions
                .get(&stream_id)
                .map(|s| s.keys().copied().collect())
                .unwrap_or_default();
            for s in subs {
                self.sync_subscriber(s);
            }
        }
    }

    /// One packet of a source that is not a local connection (a bridge, a relay, a
    /// mirror), queued with the packets before it of the same track (a frame's) to be
    /// forwarded together when the batch it came in ends (`flush_sources`). A
    /// keyframe's first packet starts a group of its own.
    fn source_rtp(
        &mut self,
        session: SessionId,
        kind: Kind,
        packet: rtc::rtp::Packet,
        keyframe: Option<bool>,
        arrived: Instant,
    ) {
        let inbound = Inbound {
            packet,
            keyframe,
            arrived,
        };
        match self.sources.last_mut() {
            Some((s, k, group))
                if (*s, *k) == (session, kind)
                    && keyframe != Some(true)
                    && group.len() < SOURCE_GROUP_MAX =>
            {
                group.push(inbound)
            }
            _ => self.sources.push((session, kind, vec![inbound])),
        }
    }

    /// Forwards what `source_rtp` queued, in order. Called at the end of every batch
    /// that may queue (bridge inputs, a mirror batch) and before anything in it that
    /// is not a packet, so nothing else ever sees a packet waiting.
    fn flush_sources(&mut self) {
        for (session, kind, group) in std::mem::take(&mut self.sources) {
            self.forward_source(session, kind, group);
        }
    }

    /// A source's packets of one track: its video GOP kept for new subscribers when
    /// its keyframes are known (`keyframe` Some; only the first of a group can start
    /// one), and forwarded.
    fn forward_source(&mut self, session: SessionId, kind: Kind, group: Vec<Inbound>) {
        if let Some(first) = group.first().filter(|i| i.keyframe == Some(true)) {
            if let Some(b) = self.bridged.get_mut(&session) {
                b.gop.clear();
                b.gop_at = Some(first.arrived);
            }
        }
        // Bridged: RTMP message read from the socket → its last RTP copy sent (a
        // mirror's: the home's arrival → its last copy sent here).
        if let Some(sent) = self.forward_gated(session, kind, &group) {
            let bridged_source = self
                .allowed
                .get(&session)
                .and_then(|a| self.stream_rooms.get(&a.stream_id))
                .is_none_or(|sp| sp.rtmp);
            for inbound in &group {
                let residence = sent
                    .saturating_duration_since(inbound.arrived)
                    .as_secs_f64();
                if bridged_source {
                    self.metrics
                        .bridge_latency
                        .with_label_values(&[forward::kind_label(kind)])
                        .observe(residence);
                } else {
                    self.metrics.forward_latency.observe(residence);
                }
            }
        }
        let Some(b) = self
            .bridged
            .get_mut(&session)
            .filter(|b| b.gop_at.is_some())
        else {
            return;
        };
        for inbound in group.into_iter().filter(|i| i.keyframe.is_some()) {
            if b.gop.len() < GOP_MAX_PACKETS {
                b.gop.push(inbound.packet);
            } else {
                b.gop_at = None; // too long to replay
                b.gop.clear();
                break;
            }
        }
    }

    fn drop_bridged(&mut self, session: SessionId) {
        if let Some(b) = self.bridged.remove(&session) {
            if b.mirror_of.is_some() {
                // Its tracks are counted where they are published.
                self.metrics.media_mirrors.dec();
                return;
            }
            for kind in b.codecs.keys() {
                self.metrics
                    .published_tracks
                    .with_label_values(&[forward::kind_label(*kind)])
                    .dec();
            }
        }
    }

    /// Forwards packets of one publisher's track, in order, to every subscriber of
    /// its stream: each subscriber is written all of them, then sent what they made
    /// (`udp_out`: equal datagrams to one address in one system call). With
    /// `keyframe` known (bridged video), a subscriber that has had nothing yet starts
    /// at a keyframe: the current GOP replayed if fresh, else the next one. A WebRTC
    /// publisher's packets come with `None` (each downtrack looks), or `Some(false)`
    /// for an IDR whose parameter sets went before it.
    fn forward_gated(
        &mut self,
        publisher: SessionId,
        kind: Kind,
        packets: &[Inbound],
    ) -> Option<Instant> {
        let stream_id = self.allowed.get(&publisher).map(|a| a.stream_id.clone())?;
        let label = forward::kind_label(kind);
        // A connection's packets (no bridged entry) are also copied to its stream's
        // converter to FLV, if any; a mirror's are counted where they were received.
        let (connection, mirror) = match self.bridged.get(&publisher) {
            None => (true, false),
            Some(b) => (false, b.mirror_of.is_some()),
        };
        let layered = kind == Kind::Video && self.stream_layers.contains_key(&stream_id);
        for Inbound {
            packet,
            keyframe,
            arrived,
        } in packets
        {
            let (keyframe, arrived) = (*keyframe, *arrived);
            if !mirror {
                // Counted once, where it is received.
                self.metrics
                    .rtp_packets
                    .with_label_values(&["in", label])
                    .inc();
                self.metrics
                    .rtp_bytes
                    .with_label_values(&["in", label])
                    .inc_by(packet.payload.len() as u64);
                self.queue_for_mirrors(&stream_id, || mirror::Mirrored::Rtp {
                    publisher,
                    kind,
                    packet: packet.clone(),
                    keyframe,
                    arrived,
                });
            }
            self.rates
                .entry((stream_id.clone(), kind))
                .or_default()
                .add(packet.payload.len() + 12);
            if layered {
                self.layer_rates
                    .entry((stream_id.clone(), packet.header.ssrc))
                    .or_default()
                    .add(packet.payload.len() + 12);
            }
            if connection {
                if let Some(tx) = self.taps.get(&stream_id) {
                    let tap = TapEvent::Rtp {
                        kind,
                        packet: packet.clone(),
                        arrived,
                    };
                    if tx.try_send(tap).is_err() {
                        self.metrics.tap_drops.inc();
                    }
                }
            }
        }
        let subs = self.subscriptions.get(&stream_id)?;
        let targets: Vec<SessionId> = subs
            .iter()
            .filter(|(_, kinds)| kinds.contains(&kind))
            .map(|(s, _)| *s)
            .collect();
        let now = Instant::now();
        // A bridged source's GOP, while fresh enough to start a new subscriber with.
        let gop = self
            .bridged
            .get(&publisher)
            .filter(|b| {
                b.gop_at
                    .is_some_and(|t| now.duration_since(t) <= GOP_REPLAY_MAX_AGE)
            })
            .map(|b| &b.gop);
        let no_layers = Vec::new();
        let layers = match kind {
            Kind::Video => self.stream_layers.get(&stream_id).unwrap_or(&no_layers),
            Kind::Audio => &no_layers,
        };
        let (mut copies, mut bytes) = (0u64, 0u64);
        let mut keyframe_now = false;
        for s in targets {
            let key = PeerKey(s, Target::Subscriber);
            let Some(p) = self.peers.get_mut(&key) else {
                continue;
            };
            // A copy written past the chain leaves nothing behind in the connection
            // (its datagram is taken below), so it needs no sweep at the pump's end.
            if !p.forwards_past_chain() {
                self.dirty.insert(key);
            }
            // The downtrack is looked up once for the batch, not per packet.
            if let Some(mut f) = p.forward_to(&stream_id, kind) {
                for Inbound {
                    packet, keyframe, ..
                } in packets
                {
                    if *keyframe == Some(false) && f.fresh() {
                        let Some(gop) = gop else {
                            continue; // wait for the next keyframe
                        };
                        // Each replayed packet is stamped and sent like a live copy
                        // below: a GOP is up to a second of video, and stamped all at
                        // the pump's start and sent in one run at its end, its last
                        // packets read as queued on the new subscriber's path.
                        let mut replayed = false;
                        for (i, old) in gop.iter().enumerate() {
                            let at = Instant::now();
                            replayed |= f.send(old, Some(i == 0), &[], at);
                            take_written(
                                &mut f,
                                at,
                                &mut self.udp,
                                &self.socket,
                                &self.tcp_writers,
                            );
                        }
                        if replayed {
                            self.metrics.gop_replays.inc();
                        }
                    }
                    // Stamped when written, so the send time the congestion controller
                    // records is when it leaves (a subscriber's group goes out right
                    // after), not the start of a pump that may write thousands of
                    // copies before it.
                    let at = Instant::now();
                    if f.send(packet, *keyframe, layers, at) {
                        copies += 1;
                        bytes += packet.payload.len() as u64;
                    }
                    take_written(&mut f, at, &mut self.udp, &self.socket, &self.tcp_writers);
                }
            }
            keyframe_now |= std::mem::take(&mut p.keyframe_now);
            self.udp.flush(&self.socket, &self.tcp_writers);
        }
        if keyframe_now {
            // A new subscriber needs a picture now, not at the next periodic keyframe.
            self.request_keyframe(&stream_id, Instant::now(), true);
        }
        if copies > 0 {
            self.metrics
                .rtp_packets
                .with_label_values(&["out", label])
                .inc_by(copies);
            self.metrics
                .rtp_bytes
                .with_label_values(&["out", label])
                .inc_by(bytes);
            return Some(Instant::now());
        }
        None
    }
}

/// A packet a publisher (or a bridge, relay or mirror) sent, on its way to the
/// subscribers: whether it is a keyframe's first, if known, and when it arrived.
struct Inbound {
    packet: rtc::rtp::Packet,
    keyframe: Option<bool>,
    arrived: Instant,
}

/// Queues what `f` just wrote at `at`, without sweeping its connection for more (the
/// pump's end does that once per connection, `dirty`). A copy leaves at most
/// [`SEND_HOLD_MAX`] after the send time the congestion controller recorded for it: a
/// long group (a keyframe, a GOP replay, a slow build) goes in several runs rather
/// than making its first packets look delayed.
fn take_written(
    f: &mut peer::Forwarding<'_>,
    at: Instant,
    udp: &mut udp_out::UdpOut,
    socket: &UdpSocket,
    tcp_writers: &HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
) {
    while let Some(out) = f.poll_write_ready() {
        udp.queue(out, at);
    }
    if udp
        .held_since()
        .is_some_and(|t| at.saturating_duration_since(t) >= SEND_HOLD_MAX)
    {
        udp.flush(socket, tcp_writers);
    }
}

/// Hands everything `p` has to send to the socket it goes out on (UDP, or the ICE-TCP
/// connection's writer). A full buffer or queue drops the datagram, as the network
/// would.
fn transmit(
    socket: &UdpSocket,
    tcp_writers: &HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    p: &mut Peer,
) {
    while let Some(out) = p.pc.poll_write() {
        send_out(socket, tcp_writers, out);
    }
}

/// One datagram to the socket it goes out on.
fn send_out(
    socket: &UdpSocket,
    tcp_writers: &HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    out: TaggedBytesMut,
) {
    if out.transport.transport_protocol == TransportProtocol::TCP {
        if let Some(w) = tcp_writers.get(&out.transport.peer_addr) {
            let _ = w.try_send(tcp::frame(&out.message));
        }
    } else {
        let _ = socket.try_send_to(&out.message, out.transport.peer_addr);
    }
}

/// The addresses to announce: the configured ones, or every non-loopback interface
/// address found by asking the kernel for a route, falling back to loopback.
/// The local candidate a socket bound to `bound` stands for: itself if announced,
/// else the first announced address with its port.
fn candidate_addr(bound: SocketAddr, announce: &[SocketAddr]) -> SocketAddr {
    if announce.iter().any(|a| a.ip() == bound.ip()) {
        return bound;
    }
    announce
        .first()
        .map_or(bound, |a| SocketAddr::new(a.ip(), bound.port()))
}

pub fn announce_addresses(configured: &[String], port: u16) -> Result<Vec<SocketAddr>, String> {
    let mut out = Vec::new();
    for ip in configured {
        let ip: IpAddr = ip
            .parse()
            .map_err(|e| format!("announce_ips: {ip:?} is not an IP address: {e}"))?;
        out.push(SocketAddr::new(ip, port));
    }
    if out.is_empty() {
        // The source address the kernel would use for an outside destination; no packet is sent.
        let probe = std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| s.connect("192.0.2.1:9").map(|_| s))
            .and_then(|s| s.local_addr());
        match probe {
            Ok(a) if !a.ip().is_unspecified() => out.push(SocketAddr::new(a.ip(), port)),
            _ => out.push(SocketAddr::new(IpAddr::from([127, 0, 0, 1]), port)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::plane::{wire, Between, WorkerWiring};
    use super::*;
    use crate::auth::RoomId;
    use crate::room::RoomKey;

    const UDP: TransportProtocol = TransportProtocol::UDP;

    async fn worker(crew: plane::Crew) -> (Media, mpsc::Receiver<ControlCommand>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let announce = vec![socket.local_addr().unwrap()];
        let (control, control_rx) = mpsc::channel(64);
        let config = MediaConfig {
            announce,
            tcp_port: None,
            ice_disconnected: Duration::from_secs(5),
            ice_failed: Duration::from_secs(10),
            congestion_control: true,
            publisher_bitrate: (100_000.0, 1_500_000.0),
            overload_busy_percent: 90,
            publisher_audio_ptime_ms: 10,
        };
        let metrics = Arc::new(Metrics::new());
        let m = Media::new(config, socket, None, None, control, metrics, crew).unwrap();
        (m, control_rx)
    }

    fn two() -> (WorkerWiring, WorkerWiring) {
        let mut w = wire(2).workers;
        let one = w.pop().unwrap();
        (w.pop().unwrap(), one)
    }

    fn handed(w: &mut WorkerWiring) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        while let Ok(msg) = w.between.try_recv() {
            match msg {
                Between::Datagrams(batch) => out.extend(batch.into_iter().map(|(_, a, _)| a)),
                other => panic!("{other:?}"),
            }
        }
        out
    }

    /// A 5-tuple introduces itself with a STUN request naming another worker's ufrag:
    /// that datagram and the 5-tuple's next ones go to that worker, in one batch per
    /// wake-up; what is handed over is never handed on; a closed connection's
    /// 5-tuples are forgotten.
    #[tokio::test]
    async fn a_datagram_for_another_worker_s_connection_is_handed_over() {
        let (zero, mut one) = two();
        let (mut a, _control) = worker(zero.crew).await;
        one.crew.register_ufrag("theirs");
        let client: SocketAddr = "192.0.2.10:5000".parse().unwrap();
        let stranger: SocketAddr = "192.0.2.11:5000".parse().unwrap();
        let rtp = [0x80u8, 0x60, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1];
        a.datagram(
            demux::binding_request("theirs:cli").as_slice().into(),
            client,
            UDP,
            false,
        );
        a.datagram(rtp[..].into(), client, UDP, false);
        // Not STUN, from a 5-tuple nobody knows: dropped.
        a.datagram(rtp[..].into(), stranger, UDP, false);
        // STUN for a ufrag nobody drew: dropped.
        a.datagram(
            demux::binding_request("nobody:cli").as_slice().into(),
            stranger,
            UDP,
            false,
        );
        a.flush_handoffs();
        assert_eq!(handed(&mut one), vec![client, client]);
        assert_eq!(a.metrics.handoffs.get(), 2);
        // Handed to this worker by mistake: dropped, not handed back.
        a.datagram(
            demux::binding_request("theirs:cli").as_slice().into(),
            stranger,
            UDP,
            true,
        );
        a.flush_handoffs();
        assert!(handed(&mut one).is_empty());
        a.between(Between::Forget(vec![(UDP, client)]));
        a.datagram(rtp[..].into(), client, UDP, false);
        a.flush_handoffs();
        assert!(handed(&mut one).is_empty(), "forgotten with its connection");
    }

    fn room_at(home: usize) -> RoomKey {
        (0..)
            .map(|i| RoomKey {
                sdk_app_id: 1,
                room: RoomId::Num(i),
            })
            .find(|r| plane::worker_for(r, 2) == home)
            .unwrap()
    }

    /// A stream starts at its home, which tells the other worker; a subscriber there
    /// makes a mirror that asks the home for the stream, and its leaving tells the
    /// home and drops the mirror; the stream's end reaches the other worker through
    /// the home too.
    #[tokio::test]
    async fn a_subscriber_on_another_worker_asks_the_home_for_the_stream() {
        let (mut zero, mut one) = two();
        let (mut home, _c0) = worker(zero.crew).await;
        let (mut other, _c1) = worker(one.crew).await;
        let room = room_at(0);
        let (publisher, subscriber) = (SessionId(1), SessionId(2));
        let allow = MediaCommand::AllowPublish {
            session: publisher,
            stream_id: "s".into(),
            kinds: vec![Kind::Video, Kind::Audio],
            room,
            source: "webrtc",
            screen: false,
            policy: Default::default(),
            min_bitrate: None,
            max_bitrate: None,
        };
        home.input(MediaInput::Command(allow.clone()));
        let told = one
            .between
            .try_recv()
            .expect("the home tells the other worker");
        assert!(
            matches!(&told, Between::Command(c) if **c == allow),
            "{told:?}"
        );
        other.between(told);
        other.input(MediaInput::Command(MediaCommand::Subscribe {
            subscriber,
            stream_id: "s".into(),
            kinds: vec![Kind::Video, Kind::Audio],
        }));
        assert_eq!(other.metrics.media_mirrors.get(), 1);
        let want = zero.between.try_recv().expect("the mirror asks the home");
        assert!(
            matches!(&want, Between::Want { stream_id, worker: 1, wanted: true } if stream_id == "s"),
            "{want:?}"
        );
        home.between(want);
        assert!(home.remote_wants["s"].contains(&1));
        other.input(MediaInput::Command(MediaCommand::Unsubscribe {
            subscriber,
            stream_id: "s".into(),
        }));
        let unwant = zero.between.try_recv().expect("the mirror lets go");
        assert!(
            matches!(&unwant, Between::Want { wanted: false, .. }),
            "{unwant:?}"
        );
        assert_eq!(other.metrics.media_mirrors.get(), 0);
        home.between(unwant);
        assert!(!home.remote_wants.contains_key("s"));
        home.input(MediaInput::Command(MediaCommand::EndStream {
            stream_id: "s".into(),
        }));
        let end = one
            .between
            .try_recv()
            .expect("the end reaches the other worker");
        assert!(
            matches!(&end, Between::Command(c) if matches!(**c, MediaCommand::EndStream { .. }))
        );
        other.between(end);
        assert!(other.stream_home.is_empty() && other.publishers.is_empty());
    }
}
