//! Capacity: a load generator that is not the bottleneck (issue 16).
//!
//! Runs the `weir` binary (release, its own process) pinned to `BENCH_WEIR_CPUS`
//! (default "0") with `taskset`, and pins itself to `BENCH_LOAD_CPUS` (default "1").
//! Media is pre-encoded (an x264 clip and Opus packets made once, looped): nothing is
//! encoded while the load runs.
//!
//! - **Publishers** are `webrtc`-crate clients (a handful at most); each video frame
//!   carries an SEI NAL unit (user data unregistered, ASCII hex) with the wall-clock
//!   microsecond it was handed to the connection, so the stream stays valid H.264.
//! - **Subscribers** are many `rtc` (webrtc-rs's sans-I/O core) peer connections in
//!   this one process, one UDP socket each, driven by as many receive threads as
//!   `BENCH_LOAD_CPUS` has cores: each waits on its share of the sockets with `epoll`
//!   (mio), reads every datagram waiting on a ready socket, runs the connections'
//!   timers every 5 ms, and sleeps 0.5 ms between rounds so that each round finds
//!   many sockets ready (no task, timer or wake-up per packet; a packet is read, and
//!   its latency measured, up to 0.5 ms late); a small task per subscriber
//!   carries its signaling. Each datagram reaches its connection with the kernel's
//!   arrival stamp (`SO_TIMESTAMPNS`), so the transport-wide CC feedback reports when
//!   it arrived at the socket, not when this process got round to it. They join
//!   through the real signaling
//!   with real credentials, answer Weir's offers, and run the full receive path (ICE,
//!   DTLS, SRTP, NACK, receiver reports, transport-wide CC feedback). They do not
//!   decode: they count packets per SSRC (loss after retransmission, order, duplicates)
//!   and read each frame's SEI stamp: a frame's latency is from its send to the arrival
//!   of its last packet (when it could be decoded).
//!
//! Scenarios (`BENCH_SCENARIO`):
//! - `fanout` (default): 1 publisher (H.264 at `BENCH_VIDEO_KBPS`, 1500, 30 fps, 1 s
//!   GOP, + Opus) → N subscribers, N stepping through `BENCH_SUBS` ("50,100,200,400").
//! - `audio`: `BENCH_PUBLISHERS` (10) audio-only publishers → N subscribers (LiveKit's
//!   second scenario).
//! - `rtmp`: one RTMP pusher (ffmpeg sending a pre-made FLV file with `-c copy`; Weir
//!   converts its AAC to Opus) → N WebRTC subscribers and `BENCH_PLAYERS` HTTP-FLV
//!   players (bytes counted). No latency: the file carries no send-time stamps.
//! - `meeting`: `BENCH_PUBLISHERS` (10) members, each publishing H.264 360p at
//!   `BENCH_VIDEO_KBPS` (500) + Opus and receiving every stream.
//! - `relay`: `fanout` in a room that spans nodes: a `redis-server`, the room's node
//!   (the publisher joins there; the room spills at once) and `BENCH_EDGES` (3) other
//!   nodes, each in a region of its own; the N subscribers join through the edges in
//!   turn, and each edge relays the stream from the room's node once. All the nodes
//!   share Weir's cores; CPU is summed and printed per node. Compare with `fanout` at
//!   the same N (one node): the relay's added latency, and its CPU.
//!
//! For each N: subscribers join in a burst (the join storm: time until every one
//! receives video, failures), 3 s settle, then `BENCH_SECONDS` (20) measured, with a
//! per-second trace: packets received per second, loss, subscribers that got no video
//! in that second, latency p50/p99/max, Weir's CPU and the generator's, Weir's own
//! forwarding residence p99 (from its `weir_forward_latency_seconds`). A summary row
//! per N is printed and appended to `benches/artifacts/load-<scenario>.csv`.
//!
//! `BENCH_LEAN=1` makes the subscribers cheap, so that Weir and not the generator is
//! the limit: they still join, run ICE and DTLS on the `rtc` core and answer its
//! consent checks, but count every RTP packet from its clear header (SSRC, sequence
//! number, payload type) without decrypting it, and hand the `rtc` core only every
//! 8th video frame (by RTP timestamp), whose SEI stamp gives the latency sample. They
//! send no feedback (no receiver reports, NACKs or TWCC: their connections have no
//! interceptors), so it implies `BENCH_CC=0` and loss is not repaired.
//!
//! `BENCH_CC=0` turns Weir's congestion control off. `WEIR_LOG=weir=info` shows the
//! server's log.
//!
//! `cargo bench --bench load` (`BENCH_SUBS=100 BENCH_SECONDS=10` for a short run).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/proc_node.rs"]
mod proc_node;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use rtc::interceptor::Registry;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::event::RTCPeerConnectionEvent;
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{CandidateConfig, CandidateHostConfig, RTCIceCandidate};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};

use common::publisher::offer_to_publish;
use common::Client;
use proc_node::{cpu_seconds, rss_mib, write_csv, ProcNode};
use weir_signaling::{ClientMessage, ServerMessage, Target};

/// Marks the SEI payload that carries the send time (no zero byte, so no emulation
/// prevention is ever needed).
const STAMP_UUID: [u8; 16] = *b"weir-load-stamp!";

fn env_str(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// An SEI NAL unit (user data unregistered) stamped with `us`.
fn stamp_sei(us: u64) -> Bytes {
    let hex = format!("{us:016x}");
    let mut nal = vec![0x06, 0x05, (16 + hex.len()) as u8];
    nal.extend_from_slice(&STAMP_UUID);
    nal.extend_from_slice(hex.as_bytes());
    nal.push(0x80);
    Bytes::from(nal)
}

/// The send time in an SEI NAL unit made by [`stamp_sei`].
fn read_stamp(payload: &[u8]) -> Option<u64> {
    if payload.first()? & 0x1f != 6 || payload.len() < 3 + 16 + 16 {
        return None;
    }
    if payload[3..19] != STAMP_UUID {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&payload[19..35]).ok()?, 16).ok()
}

// ---------------------------------------------------------------------------------
// What the subscribers count.

/// Counters every subscriber adds to; the sampler reads and resets the window.
#[derive(Default)]
struct Totals {
    packets: AtomicU64,
    /// Sequence numbers skipped (a gap opened) and gaps later filled (a retransmission
    /// or reordering); missing = skipped − filled.
    skipped: AtomicU64,
    filled: AtomicU64,
    duplicates: AtomicU64,
    expected: AtomicU64,
    connected: AtomicUsize,
    with_video: AtomicUsize,
    failed: AtomicUsize,
    /// Latency samples (ms) of the current window.
    latency: Mutex<Vec<f32>>,
}

/// One subscriber's own counters.
#[derive(Default)]
struct SubCounters {
    /// Video packets (any packet in the audio scenario).
    video: AtomicU64,
    got_video_at: Mutex<Option<Instant>>,
}

/// Loss and order of one SSRC: the highest extended sequence number and which of the
/// last 1,024 arrived.
struct SeqTrack {
    highest: i64,
    seen: [u64; 16],
}

enum Arrival {
    InOrder,
    /// `n` sequence numbers skipped before this one.
    Gap(u64),
    /// Fills a gap (a retransmission or a reordered packet).
    Late,
    Duplicate,
    TooOld,
}

impl SeqTrack {
    fn new(seq: u16) -> Self {
        let mut t = Self {
            highest: i64::from(seq),
            seen: [0; 16],
        };
        t.mark(i64::from(seq));
        t
    }

    fn bit(ext: i64) -> (usize, u64) {
        let i = ext.rem_euclid(1024) as usize;
        (i / 64, 1u64 << (i % 64))
    }

    fn mark(&mut self, ext: i64) {
        let (w, b) = Self::bit(ext);
        self.seen[w] |= b;
    }

    fn on(&mut self, seq: u16) -> Arrival {
        // Extend to the sequence number nearest the highest.
        let base = self.highest - (self.highest.rem_euclid(65536));
        let mut ext = base + i64::from(seq);
        if ext - self.highest > 32768 {
            ext -= 65536;
        } else if self.highest - ext > 32768 {
            ext += 65536;
        }
        if ext > self.highest {
            // Forget the bits that now wrap around into the window.
            for e in (self.highest + 1).max(ext - 1023)..=ext {
                let (w, b) = Self::bit(e);
                self.seen[w] &= !b;
            }
            let skipped = (ext - self.highest - 1) as u64;
            self.highest = ext;
            self.mark(ext);
            if skipped == 0 {
                Arrival::InOrder
            } else {
                Arrival::Gap(skipped)
            }
        } else if self.highest - ext >= 1024 {
            Arrival::TooOld
        } else {
            let (w, b) = Self::bit(ext);
            if self.seen[w] & b != 0 {
                Arrival::Duplicate
            } else {
                self.seen[w] |= b;
                Arrival::Late
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// A subscriber on the sans-I/O core.

fn new_subscriber_pc(lean: bool) -> RTCPeerConnection {
    let mut engine = MediaEngine::default();
    engine.register_default_codecs().unwrap();
    let registry = if lean {
        // It sees one video frame in eight: a NACK generator would ask for the rest.
        Registry::new()
    } else {
        register_default_interceptors(Registry::new(), &mut engine).unwrap()
    };
    RTCPeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(engine)
        .with_interceptor_registry(registry)
        .build(Instant::now())
        .unwrap()
}

fn answer(pc: &mut RTCPeerConnection, local: SocketAddr, sdp: String, first: bool) -> String {
    pc.set_remote_description(Instant::now(), RTCSessionDescription::offer(sdp).unwrap())
        .unwrap();
    if first {
        let candidate = CandidateHostConfig {
            base_config: CandidateConfig {
                network: "udp".to_owned(),
                address: local.ip().to_string(),
                port: local.port(),
                component: 1,
                ..Default::default()
            },
            ..Default::default()
        }
        .new_candidate_host()
        .unwrap();
        pc.add_local_candidate(RTCIceCandidate::from(&candidate).to_json().unwrap())
            .unwrap();
    }
    let answer = pc.create_answer(None).unwrap();
    pc.set_local_description(Instant::now(), answer).unwrap();
    pc.local_description().unwrap().sdp
}

struct Subscriber {
    pc: Option<RTCPeerConnection>,
    socket: mio::net::UdpSocket,
    local: SocketAddr,
    totals: Arc<Totals>,
    own: Arc<SubCounters>,
    tracks: HashMap<u32, SeqTrack>,
    video_tracks: std::collections::HashSet<String>,
    connected: bool,
    /// The send time of the video frame being received, per SSRC.
    stamps: HashMap<u32, u64>,
    /// No video is sent (the audio scenario): audio counts as "receiving".
    audio_only: bool,
    /// `BENCH_LEAN`: count from the clear header, decrypt a sample of frames.
    lean: bool,
    /// The offers' video payload types (not RTX), to tell video from the header.
    video_pts: std::collections::HashSet<u8>,
    /// When the connection next wants `handle_timeout`.
    deadline: Instant,
}

/// In lean mode, the video frames (by RTP timestamp at 30 fps) handed to `rtc` for
/// their latency: one in this many.
const LEAN_SAMPLE: u32 = 8;

impl Subscriber {
    /// One datagram in; true if the `rtc` core saw it (its timers may have moved).
    fn datagram(&mut self, data: &[u8], from: SocketAddr, now: Instant) -> bool {
        if self.lean && self.connected && data.len() >= 12 && (128..192).contains(&data[0]) {
            let pt = data[1] & 0x7f;
            if !(72..=79).contains(&pt) {
                // RTP (not RTCP): its header is in the clear.
                let seq = u16::from_be_bytes([data[2], data[3]]);
                let ts = u32::from_be_bytes([data[4], data[5], data[6], data[7]]);
                let ssrc = u32::from_be_bytes([data[8], data[9], data[10], data[11]]);
                let video = self.video_pts.contains(&pt);
                self.count(ssrc, seq, video);
                if !(video && (ts / 3000) % LEAN_SAMPLE == 0) {
                    return false;
                }
            }
        }
        let Some(pc) = self.pc.as_mut() else {
            return false;
        };
        let _ = pc.handle_read(TaggedBytesMut {
            now,
            transport: TransportContext {
                local_addr: self.local,
                peer_addr: from,
                ecn: None,
                transport_protocol: TransportProtocol::UDP,
            },
            message: BytesMut::from(data),
        });
        true
    }

    /// Everything the connection has for us after an input.
    fn drain(&mut self) {
        let Some(pc) = self.pc.as_mut() else { return };
        while let Some(out) = pc.poll_write() {
            let _ = self.socket.send_to(&out.message, out.transport.peer_addr);
        }
        while let Some(event) = pc.poll_event() {
            match event {
                RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => match state {
                    RTCPeerConnectionState::Connected if !self.connected => {
                        self.connected = true;
                        self.totals.connected.fetch_add(1, Ordering::Relaxed);
                    }
                    RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                        if self.connected {
                            self.totals.connected.fetch_sub(1, Ordering::Relaxed);
                            self.connected = false;
                        }
                        self.totals.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                },
                RTCPeerConnectionEvent::OnTrack(
                    rtc::peer_connection::event::RTCTrackEvent::OnOpen(init),
                ) => {
                    let video = pc.rtp_receiver(init.receiver_id).is_some_and(|r| {
                        r.track().kind() == rtc::rtp_transceiver::rtp_sender::RtpCodecKind::Video
                    });
                    if video {
                        self.video_tracks.insert(init.track_id.clone());
                    }
                }
                _ => {}
            }
        }
        let now_us = wall_us();
        let mut read = Vec::new();
        while let Some(TaggedRTCMessage { message, .. }) = pc.poll_read() {
            if let RTCMessage::RtpPacket(track_id, packet) = message {
                read.push((track_id, packet));
            }
        }
        for (track_id, packet) in read {
            let video = self.video_tracks.contains(&track_id);
            if !self.lean {
                // (Lean: counted from the header as it arrived.)
                self.count(packet.header.ssrc, packet.header.sequence_number, video);
            }
            let t = &self.totals;
            if video {
                // A frame's latency: from its stamp (sent with its first packet) to its
                // last packet (the marker), when it could be decoded.
                if let Some(sent) = read_stamp(&packet.payload) {
                    self.stamps.insert(packet.header.ssrc, sent);
                }
                if packet.header.marker {
                    if let Some(sent) = self.stamps.remove(&packet.header.ssrc) {
                        let ms = now_us.saturating_sub(sent) as f32 / 1000.0;
                        t.latency.lock().unwrap().push(ms);
                    }
                }
            }
        }
    }

    /// One RTP packet received: loss, order, and whether video is arriving.
    fn count(&mut self, ssrc: u32, seq: u16, video: bool) {
        let t = &self.totals;
        t.packets.fetch_add(1, Ordering::Relaxed);
        match self.tracks.get_mut(&ssrc) {
            None => {
                self.tracks.insert(ssrc, SeqTrack::new(seq));
                t.expected.fetch_add(1, Ordering::Relaxed);
            }
            Some(track) => match track.on(seq) {
                Arrival::InOrder => {
                    t.expected.fetch_add(1, Ordering::Relaxed);
                }
                Arrival::Gap(n) => {
                    t.expected.fetch_add(n + 1, Ordering::Relaxed);
                    t.skipped.fetch_add(n, Ordering::Relaxed);
                }
                Arrival::Late => {
                    t.filled.fetch_add(1, Ordering::Relaxed);
                }
                Arrival::Duplicate | Arrival::TooOld => {
                    t.duplicates.fetch_add(1, Ordering::Relaxed);
                }
            },
        }
        if (video || self.audio_only) && self.own.video.fetch_add(1, Ordering::Relaxed) == 0 {
            *self.own.got_video_at.lock().unwrap() = Some(Instant::now());
            t.with_video.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Runs the connection's timers if due, and notes when it next wants them.
    fn on_timer(&mut self, now: Instant) {
        let Some(pc) = self.pc.as_mut() else {
            self.deadline = now + Duration::from_secs(1);
            return;
        };
        if pc.poll_timeout().is_some_and(|t| t <= now) {
            let _ = pc.handle_timeout(now);
        }
        self.deadline = pc.poll_timeout().unwrap_or(now + Duration::from_secs(1));
        self.drain();
    }
}

// ---------------------------------------------------------------------------------
// The receive threads: every subscriber's socket on a few `epoll` loops.

/// What a subscriber's signaling task asks of the thread that owns its connection.
enum Command {
    Add(usize, Box<Subscriber>),
    /// Answer this offer; the answer's SDP comes back.
    Offer(usize, String, tokio::sync::oneshot::Sender<String>),
    Remove(usize),
}

/// The subscribers' connections and sockets, spread over one thread per generator
/// core. Each thread waits on its sockets with `epoll` (mio), reads every datagram
/// waiting on a ready socket, and runs the connections' timers every few
/// milliseconds: no task, timer registration or wake-up per packet.
struct Receivers {
    threads: Vec<ReceiveThread>,
}

/// What a signaling task needs of one receive thread: its epoll set (to register a
/// socket), its command queue and the waker that makes it look.
struct ReceiveThread {
    registry: mio::Registry,
    commands: std::sync::mpsc::Sender<Command>,
    waker: mio::Waker,
}

const WAKER: mio::Token = mio::Token(usize::MAX);
/// How often each thread looks for connection timers that are due.
const TIMER_TICK: Duration = Duration::from_millis(5);
/// After a round of reading, a thread sleeps this long so that the next round finds
/// many sockets ready: waking for every datagram (a context switch each, ~10 µs on
/// this VM) cost more than reading it. It delays a packet's reading, hence the
/// latency measured, by at most this.
const BATCH_WAIT: Duration = Duration::from_micros(500);

impl Receivers {
    fn start(n: usize) -> Arc<Self> {
        let threads = (0..n.max(1))
            .map(|i| {
                let poll = mio::Poll::new().unwrap();
                let (commands, rx) = std::sync::mpsc::channel();
                let thread = ReceiveThread {
                    registry: poll.registry().try_clone().unwrap(),
                    commands,
                    waker: mio::Waker::new(poll.registry(), WAKER).unwrap(),
                };
                std::thread::Builder::new()
                    .name(format!("receive-{i}"))
                    .spawn(move || receive_loop(poll, rx))
                    .unwrap();
                thread
            })
            .collect();
        Arc::new(Self { threads })
    }

    /// The thread that owns subscriber `id`.
    fn of(&self, id: usize) -> &ReceiveThread {
        &self.threads[id % self.threads.len()]
    }

    fn send(&self, id: usize, command: Command) {
        let thread = self.of(id);
        let _ = thread.commands.send(command);
        let _ = thread.waker.wake();
    }

    /// Registers `sub`'s socket with the thread that will own it, then hands it over.
    fn add(&self, id: usize, mut sub: Subscriber) {
        self.of(id)
            .registry
            .register(&mut sub.socket, mio::Token(id), mio::Interest::READABLE)
            .unwrap();
        self.send(id, Command::Add(id, Box::new(sub)));
    }
}

/// Asks the kernel to stamp each datagram with its arrival (`SO_TIMESTAMPNS`).
fn stamp_arrivals(socket: &mio::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket, an int option of the right size.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "SO_TIMESTAMPNS: {}", std::io::Error::last_os_error());
}

/// One datagram (IPv4), its sender, and the kernel's arrival stamp if it gave one.
fn recv_stamped(
    socket: &mio::net::UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, Option<SystemTime>)> {
    use std::os::fd::AsRawFd;
    // SAFETY: every pointer handed to recvmsg points into a live local of the size
    // given; the control messages are walked with the libc macros within
    // `msg_controllen`, and a timestamp is read unaligned.
    unsafe {
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut control = [0u64; 8];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = (&mut addr as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        let n = libc::recvmsg(socket.as_raw_fd(), &mut msg, 0);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let from = SocketAddr::from((
            std::net::Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
            u16::from_be(addr.sin_port),
        ));
        let mut stamp = None;
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                stamp = Some(UNIX_EPOCH + Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        Ok((n as usize, from, stamp))
    }
}

fn receive_loop(mut poll: mio::Poll, commands: std::sync::mpsc::Receiver<Command>) {
    let mut subs: HashMap<usize, Subscriber> = HashMap::new();
    let mut events = mio::Events::with_capacity(1024);
    let mut buf = vec![0u8; 2048];
    let mut next_tick = Instant::now();
    loop {
        let wait = next_tick.saturating_duration_since(Instant::now());
        if let Err(e) = poll.poll(&mut events, Some(wait)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                panic!("epoll: {e}");
            }
        }
        let now = Instant::now();
        let wall = SystemTime::now();
        let woke = !events.is_empty();
        for event in events.iter() {
            let Some(sub) = subs.get_mut(&event.token().0) else {
                continue;
            };
            // Edge-triggered: read until the socket is empty (an error such as a
            // port-unreachable report is passed over; a few in a row end the round).
            let mut seen = false;
            let mut errors = 0;
            loop {
                match recv_stamped(&sub.socket, &mut buf) {
                    Ok((n, from, stamp)) => {
                        // When the kernel queued it, not when this loop got to it: the
                        // subscribers' transport-wide feedback is then a receiver's on
                        // its own machine, not this generator's reading lag at the
                        // peaks (a keyframe's thousands of copies), which Weir's
                        // congestion control would read as the links' queues. (The
                        // frame latency is still taken when the frame is read.) A
                        // datagram that arrived after this round began (a round can
                        // last tens of milliseconds at a keyframe) is stamped after
                        // `now`, not at it: stamped at the round's start, it read as
                        // having crossed faster than the path allows, lowered the
                        // delay's minimum, and every other packet then read as queued
                        // by the round's length (~60 ms at 300 subscribers).
                        let at = match stamp.map(|t| wall.duration_since(t)) {
                            Some(Ok(ago)) => now.checked_sub(ago).unwrap_or(now),
                            Some(Err(later)) => now + later.duration(),
                            None => now,
                        };
                        seen |= sub.datagram(&buf[..n], from, at)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) if errors < 8 => errors += 1,
                    Err(_) => break,
                }
            }
            if seen {
                sub.drain();
                if let Some(t) = sub.pc.as_mut().and_then(|pc| pc.poll_timeout()) {
                    sub.deadline = sub.deadline.min(t);
                }
            }
        }
        loop {
            match commands.try_recv() {
                Ok(Command::Add(id, sub)) => {
                    subs.insert(id, *sub);
                }
                Ok(Command::Offer(id, sdp, reply)) => {
                    let Some(sub) = subs.get_mut(&id) else {
                        continue;
                    };
                    let first = sub.pc.is_none();
                    sub.video_pts
                        .extend(common::relay::video_media_payload_types(&sdp));
                    let lean = sub.lean;
                    let pc = sub.pc.get_or_insert_with(|| new_subscriber_pc(lean));
                    let _ = reply.send(answer(pc, sub.local, sdp, first));
                    sub.on_timer(Instant::now());
                }
                Ok(Command::Remove(id)) => {
                    if let Some(mut sub) = subs.remove(&id) {
                        let _ = poll.registry().deregister(&mut sub.socket);
                        if sub.connected {
                            sub.totals.connected.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
                Err(std::sync::mpsc::TryRecvError::Empty) => break,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
            }
        }
        if now >= next_tick {
            for sub in subs.values_mut() {
                if sub.deadline <= now {
                    sub.on_timer(now);
                }
            }
            next_tick = now + TIMER_TICK;
        }
        if woke {
            std::thread::sleep(BATCH_WAIT);
        }
    }
}

/// Joins as `user`, answers every subscriber offer, and receives (on `receivers`)
/// until `stop`.
#[allow(clippy::too_many_arguments)]
async fn subscribe(
    id: usize,
    receivers: Arc<Receivers>,
    ws: String,
    join: weir_signaling::Join,
    totals: Arc<Totals>,
    own: Arc<SubCounters>,
    stop: Arc<AtomicBool>,
    audio_only: bool,
    lean: bool,
) {
    let Ok((mut signal, joined)) =
        tokio::time::timeout(Duration::from_secs(20), Client::join(&ws, join)).await
    else {
        totals.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    if !matches!(joined, ServerMessage::Joined { .. }) {
        eprintln!("join refused: {joined:?}");
        totals.failed.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let socket = mio::net::UdpSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    stamp_arrivals(&socket);
    let local = socket.local_addr().unwrap();
    receivers.add(
        id,
        Subscriber {
            pc: None,
            socket,
            local,
            totals: totals.clone(),
            own,
            tracks: HashMap::new(),
            video_tracks: Default::default(),
            connected: false,
            stamps: HashMap::new(),
            audio_only,
            lean,
            video_pts: Default::default(),
            deadline: Instant::now() + Duration::from_secs(1),
        },
    );
    let mut ping = tokio::time::interval(Duration::from_secs(10));
    let mut check = tokio::time::interval(Duration::from_millis(200));
    let mut closed = false;
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            m = signal.try_recv(Duration::from_secs(3600)) => match m {
                Some(ServerMessage::Offer { target: Target::Subscriber, sdp }) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    receivers.send(id, Command::Offer(id, sdp, tx));
                    let Ok(sdp) = rx.await else { break };
                    signal
                        .send(&ClientMessage::Answer { target: Target::Subscriber, sdp })
                        .await;
                }
                Some(_) => {}
                None => {
                    let why = signal.close_code(Duration::ZERO).await;
                    eprintln!("a subscriber's signaling ended: {why:?}");
                    totals.failed.fetch_add(1, Ordering::Relaxed);
                    closed = true;
                    break;
                }
            },
            _ = ping.tick() => signal.send(&ClientMessage::Ping { ts: 1 }).await,
            _ = check.tick() => {}
        }
    }
    receivers.send(id, Command::Remove(id));
    if !closed {
        signal.send(&ClientMessage::Leave).await;
    }
}

// ---------------------------------------------------------------------------------
// Publishers.

/// Publishes a looped clip: `aus` at 30 fps (each frame stamped) and `opus` packets
/// every 20 ms, until `stop`. With `aus` empty, audio only.
async fn publish(
    node: Arc<ProcNode>,
    user: String,
    room: u32,
    aus: Arc<Vec<Vec<Bytes>>>,
    opus: Arc<Vec<Bytes>>,
    stop: Arc<AtomicBool>,
) {
    use webrtc::media_stream::track_local::TrackLocal;
    let (mut signal, joined) = Client::join(&node.ws, node.join(&user, room, false)).await;
    assert!(matches!(joined, ServerMessage::Joined { .. }), "{joined:?}");
    let offered = offer_to_publish(&mut signal).await;
    let mut peer = offered.peer;
    peer.accept_answer(offered.answer).await;
    peer.connected().await;
    let (vpt, apt) = (
        offered.video.payload_type().await,
        offered.audio.payload_type().await,
    );
    let (video, audio) = (offered.video.track, offered.audio.track);
    let start = tokio::time::Instant::now();
    let (mut vseq, mut aseq) = (0u16, 0u16);
    let (mut frame, mut apkt) = (0usize, 0u32);
    let mut last_ping = Instant::now();
    let mut payloads = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if last_ping.elapsed() > Duration::from_secs(10) {
            signal.send(&ClientMessage::Ping { ts: 1 }).await;
            last_ping = Instant::now();
        }
        // Read what the server says as it comes (room events; nothing needs an answer):
        // a client that does not read is closed as too slow once its queue is full.
        while signal.try_recv(Duration::ZERO).await.is_some() {}
        let vdue = if aus.is_empty() {
            start + Duration::from_secs(3600 * 24)
        } else {
            start + Duration::from_micros(frame as u64 * 33_333)
        };
        let adue = start + Duration::from_millis(u64::from(apkt) * 20);
        if adue <= vdue {
            tokio::time::sleep_until(adue).await;
            let mut p = rtc::rtp::Packet::default();
            p.header.version = 2;
            p.header.payload_type = apt;
            p.header.ssrc = 0x5252;
            p.header.sequence_number = aseq;
            p.header.timestamp = apkt.wrapping_mul(960);
            p.payload = opus[apkt as usize % opus.len()].clone();
            let _ = audio.write_rtp(p).await;
            aseq = aseq.wrapping_add(1);
            apkt += 1;
        } else {
            tokio::time::sleep_until(vdue).await;
            let au = &aus[frame % aus.len()];
            // The stamp goes after the parameter sets, just before the first slice.
            let at = au
                .iter()
                .position(|n| matches!(n[0] & 0x1f, 1 | 5))
                .unwrap_or(0);
            let mut nals = au.clone();
            nals.insert(at, stamp_sei(wall_us()));
            payloads.clear();
            weir::codec::h264::packetize(&nals, 1100, &mut payloads);
            let n = payloads.len();
            for (i, payload) in payloads.drain(..).enumerate() {
                let mut p = rtc::rtp::Packet::default();
                p.header.version = 2;
                p.header.payload_type = vpt;
                p.header.ssrc = 0x5151;
                p.header.sequence_number = vseq;
                p.header.timestamp = (frame as u32).wrapping_mul(3000);
                p.header.marker = i + 1 == n;
                p.payload = payload;
                let _ = video.write_rtp(p).await;
                vseq = vseq.wrapping_add(1);
            }
            frame += 1;
        }
    }
    signal.send(&ClientMessage::Leave).await;
    let _ = peer.pc.close().await;
}

/// 1 s of a 1 kHz tone as 20 ms Opus packets (64 kbit/s), encoded once.
fn opus_packets() -> Vec<Bytes> {
    let mut enc =
        opus::Encoder::new(48_000, opus::Channels::Stereo, opus::Application::Audio).unwrap();
    enc.set_bitrate(opus::Bitrate::Bits(64_000)).unwrap();
    let mut buf = vec![0u8; 1500];
    (0..50u32)
        .map(|k| {
            let pcm: Vec<f32> = (0..960u32)
                .flat_map(|i| {
                    let n = (k * 960 + i) as f32;
                    let v = (n * 2.0 * std::f32::consts::PI * 1000.0 / 48_000.0).sin() * 0.3;
                    [v, v]
                })
                .collect();
            let len = enc.encode_float(&pcm, &mut buf).unwrap();
            Bytes::copy_from_slice(&buf[..len])
        })
        .collect()
}

/// A 10 s x264 clip of `size` at `kbps` (30 fps, 1 s GOP), split into access units.
fn clip(size: &str, kbps: u64) -> Vec<Vec<Bytes>> {
    let aus = common::publisher::h264_clip(
        &format!("testsrc2=size={size}:rate=30"),
        10,
        &[
            "-g",
            "30",
            "-b:v",
            &format!("{kbps}k"),
            "-maxrate",
            &format!("{kbps}k"),
            "-bufsize",
            &format!("{}k", kbps / 2),
        ],
    );
    let bytes: usize = aus.iter().flatten().map(|n| n.len()).sum();
    println!(
        "clip: {size}, {} frames, {:.0} kbit/s",
        aus.len(),
        bytes as f64 * 8.0 / (aus.len() as f64 / 30.0) / 1000.0
    );
    aus
}

/// A 10 s FLV file (x264 720p at `kbps`, 1 s GOP, AAC 48 kHz stereo), made once.
fn flv_clip(dir: &std::path::Path, kbps: u64) -> std::path::PathBuf {
    let path = dir.join("clip.flv");
    let ok = std::process::Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=1280x720:rate=30",
        ])
        .args(["-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=48000"])
        .args(["-t", "10", "-c:v", "libx264", "-pix_fmt", "yuv420p"])
        .args([
            "-preset",
            "ultrafast",
            "-tune",
            "zerolatency",
            "-bf",
            "0",
            "-g",
            "30",
        ])
        .args(["-b:v", &format!("{kbps}k"), "-maxrate", &format!("{kbps}k")])
        .args(["-bufsize", &format!("{}k", kbps / 2)])
        .args(["-c:a", "aac", "-ar", "48000", "-ac", "2", "-f", "flv"])
        .arg(&path)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "ffmpeg made the FLV clip");
    path
}

/// An HTTP-FLV player: reads `url` until `stop`, counting the bytes.
async fn play_flv(url: String, bytes: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest.split_once('/').expect("a path");
    let Ok(mut stream) = tokio::net::TcpStream::connect(host).await else {
        return;
    };
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => {
                bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => {}
        }
    }
}

// ---------------------------------------------------------------------------------
// Measuring.

fn percentile(sorted: &[f32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[i])
}

/// A histogram's cumulative buckets in a /metrics text; `prefix` is the bucket series
/// up to its `le` label's value (`weir_forward_latency_seconds_bucket{le="`).
fn histogram(metrics: &str, prefix: &str) -> Vec<(f64, f64)> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|l| {
            let (le, rest) = l.split_once('"')?;
            let v = rest.rsplit_once(' ')?.1.parse().ok()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, v))
        })
        .collect()
}

/// The `p` quantile (ms, the bucket's upper bound) of what was added between two
/// histogram readings.
fn histogram_quantile(before: &[(f64, f64)], after: &[(f64, f64)], p: f64) -> f64 {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, v)| {
            let b = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, v)| *v);
            (*le, v - b)
        })
        .collect();
    let total = delta.last().map_or(0.0, |(_, v)| *v);
    if total <= 0.0 {
        return f64::NAN;
    }
    delta
        .iter()
        .find(|(_, v)| *v >= total * p)
        .map_or(f64::NAN, |(le, _)| le * 1000.0)
}

fn metric_sum(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

struct Window {
    at: Instant,
    /// Each media worker's busy percent (of each node, in order).
    workers: Vec<f64>,
    weir_cpu: f64,
    /// Each node's, in the order given.
    node_cpu: Vec<f64>,
    load_cpu: f64,
    packets: u64,
    expected: u64,
    missing: i64,
    /// Weir's residence: a WebRTC packet in → its last copy out; an RTMP video
    /// message in → its last RTP copy out.
    hist: Vec<(f64, f64)>,
    bridge: Vec<(f64, f64)>,
    out_packets: f64,
    paused: f64,
}

/// Bucket counts of two readings of one histogram, added (several nodes).
fn add_buckets(a: &mut Vec<(f64, f64)>, b: Vec<(f64, f64)>) {
    if a.is_empty() {
        *a = b;
    } else {
        for (x, y) in a.iter_mut().zip(b) {
            x.1 += y.1;
        }
    }
}

impl Window {
    /// The nodes' counters added (one node, or a cluster's).
    async fn read(nodes: &[Arc<ProcNode>], totals: &Totals) -> Self {
        let mut w = Self {
            at: Instant::now(),
            weir_cpu: 0.0,
            node_cpu: Vec::new(),
            load_cpu: cpu_seconds(std::process::id()),
            packets: totals.packets.load(Ordering::Relaxed),
            expected: totals.expected.load(Ordering::Relaxed),
            missing: totals.skipped.load(Ordering::Relaxed) as i64
                - totals.filled.load(Ordering::Relaxed) as i64,
            hist: Vec::new(),
            bridge: Vec::new(),
            out_packets: 0.0,
            paused: 0.0,
            workers: Vec::new(),
        };
        for node in nodes {
            let m = node.metrics().await;
            let cpu = cpu_seconds(node.pid);
            w.weir_cpu += cpu;
            w.node_cpu.push(cpu);
            add_buckets(
                &mut w.hist,
                histogram(&m, "weir_forward_latency_seconds_bucket{le=\""),
            );
            add_buckets(
                &mut w.bridge,
                histogram(
                    &m,
                    "weir_bridge_latency_seconds_bucket{kind=\"video\",le=\"",
                ),
            );
            w.out_packets += metric_sum(&m, "weir_rtp_packets_total{direction=\"out\"");
            w.paused += metric_sum(&m, "weir_congestion_paused_videos");
            // Each media worker's busy share over the last second.
            w.workers.extend(
                m.lines()
                    .filter(|l| l.starts_with("weir_media_worker_busy_percent{"))
                    .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok()),
            );
        }
        w
    }
}

/// What one measured stretch showed.
struct Measured {
    rx_pps: f64,
    out_pps: f64,
    loss_pct: f64,
    lat_p50: f64,
    lat_p99: f64,
    lat_max: f64,
    /// Weir's residence p50 / p99 / p99.9 over the stretch (ms, bucket bounds), for
    /// WebRTC packets and for bridged RTMP video.
    fwd: [f64; 3],
    bridge: [f64; 3],
    weir_cpu_pct: f64,
    node_cpu_pct: Vec<f64>,
    load_cpu_pct: f64,
    us_per_packet: f64,
    starved_seconds: usize,
    paused_max: f64,
    /// Each media worker's mean busy percent over the stretch.
    workers_busy: Vec<f64>,
}

/// One step: the join storm that reached N subscribers, then the measurement.
struct Step {
    subscribers: usize,
    receiving: usize,
    join_ms: f64,
    failures: usize,
    rss_mib: f64,
    m: Measured,
}

async fn measure(
    node: &[Arc<ProcNode>],
    totals: &Totals,
    subs: &[Arc<SubCounters>],
    seconds: u64,
    trace: &mut Vec<String>,
) -> Measured {
    totals.latency.lock().unwrap().clear();
    let first = Window::read(node, totals).await;
    let mut prev = Window::read(node, totals).await;
    let mut all_latency: Vec<f32> = Vec::new();
    let mut prev_video: Vec<u64> = subs
        .iter()
        .map(|s| s.video.load(Ordering::Relaxed))
        .collect();
    let mut starved_total = 0usize;
    let mut paused_max: f64 = 0.0;
    println!(
        "    {:>4} {:>9} {:>9} {:>7} {:>8} {:>7} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6}",
        "s",
        "rx pkt/s",
        "out pkt/s",
        "loss %",
        "no video",
        "p50 ms",
        "p99 ms",
        "max ms",
        "fwd p99",
        "weir%",
        "gen%",
        "paused"
    );
    let mut busy_sum: Vec<f64> = Vec::new();
    for s in 1..=seconds {
        tokio::time::sleep_until(tokio::time::Instant::from_std(
            first.at + Duration::from_secs(s),
        ))
        .await;
        let now = Window::read(node, totals).await;
        let dt = now.at.duration_since(prev.at).as_secs_f64();
        let mut lat = std::mem::take(&mut *totals.latency.lock().unwrap());
        lat.sort_by(f32::total_cmp);
        let video: Vec<u64> = subs
            .iter()
            .map(|s| s.video.load(Ordering::Relaxed))
            .collect();
        // Subscribers receiving video before this second that got none in it (a
        // subscriber refused at the door is not counted).
        let starved = video
            .iter()
            .zip(&prev_video)
            .filter(|(a, b)| **b > 0 && a == b)
            .count();
        starved_total += starved;
        prev_video = video;
        let expected = (now.expected - prev.expected) as f64;
        let missing = (now.missing - prev.missing) as f64;
        paused_max = paused_max.max(now.paused);
        trace.push(format!(
            "{},{},{:.0},{:.0},{:.3},{},{:.2},{:.2},{:.2},{:.3},{:.1},{:.1},{}",
            subs.len(),
            s,
            (now.packets - prev.packets) as f64 / dt,
            (now.out_packets - prev.out_packets) / dt,
            if expected > 0.0 {
                100.0 * missing / expected
            } else {
                0.0
            },
            starved,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            lat.last().copied().map_or(f64::NAN, f64::from),
            histogram_quantile(&prev.hist, &now.hist, 0.99),
            100.0 * (now.weir_cpu - prev.weir_cpu) / dt,
            100.0 * (now.load_cpu - prev.load_cpu) / dt,
            now.paused,
        ));
        busy_sum.resize(now.workers.len().max(busy_sum.len()), 0.0);
        for (sum, b) in busy_sum.iter_mut().zip(&now.workers) {
            *sum += b;
        }
        println!(
            "    {:>4} {:>9.0} {:>9.0} {:>7.2} {:>8} {:>7.1} {:>7.1} {:>7.1} {:>7.2} {:>6.1} {:>6.1} {:>6.0}  workers busy {}",
            s,
            (now.packets - prev.packets) as f64 / dt,
            (now.out_packets - prev.out_packets) / dt,
            if expected > 0.0 { 100.0 * missing / expected } else { 0.0 },
            starved,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            lat.last().copied().map_or(f64::NAN, f64::from),
            histogram_quantile(&prev.hist, &now.hist, 0.99),
            100.0 * (now.weir_cpu - prev.weir_cpu) / dt,
            100.0 * (now.load_cpu - prev.load_cpu) / dt,
            now.paused,
            now.workers
                .iter()
                .map(|b| format!("{b:.0}"))
                .collect::<Vec<_>>()
                .join("/"),
        );
        all_latency.extend_from_slice(&lat);
        prev = now;
    }
    let dt = prev.at.duration_since(first.at).as_secs_f64();
    all_latency.sort_by(f32::total_cmp);
    let expected = (prev.expected - first.expected) as f64;
    let missing = (prev.missing - first.missing) as f64;
    let out = prev.out_packets - first.out_packets;
    let weir_cpu = prev.weir_cpu - first.weir_cpu;
    Measured {
        rx_pps: (prev.packets - first.packets) as f64 / dt,
        out_pps: out / dt,
        loss_pct: if expected > 0.0 {
            100.0 * missing / expected
        } else {
            0.0
        },
        lat_p50: percentile(&all_latency, 0.5),
        lat_p99: percentile(&all_latency, 0.99),
        lat_max: all_latency.last().copied().map_or(f64::NAN, f64::from),
        fwd: [0.5, 0.99, 0.999].map(|q| histogram_quantile(&first.hist, &prev.hist, q)),
        bridge: [0.5, 0.99, 0.999].map(|q| histogram_quantile(&first.bridge, &prev.bridge, q)),
        weir_cpu_pct: 100.0 * weir_cpu / dt,
        node_cpu_pct: prev
            .node_cpu
            .iter()
            .zip(&first.node_cpu)
            .map(|(b, a)| 100.0 * (b - a) / dt)
            .collect(),
        load_cpu_pct: 100.0 * (prev.load_cpu - first.load_cpu) / dt,
        us_per_packet: if out > 0.0 {
            weir_cpu * 1e6 / out
        } else {
            f64::NAN
        },
        starved_seconds: starved_total,
        paused_max,
        workers_busy: busy_sum.iter().map(|b| b / seconds as f64).collect(),
    }
}

fn main() {
    // Pin this process before any thread starts: every thread inherits it.
    let load_cpus = env_str("BENCH_LOAD_CPUS", "1");
    let pinned = std::process::Command::new("taskset")
        .args(["-a", "-cp", &load_cpus, &std::process::id().to_string()])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(pinned, "taskset could not pin the generator to {load_cpus}");
    let threads = cpu_count(&load_cpus);
    // The generator's own stacks log errors only (rtc warns once per DTLS client), and
    // not the publisher's RTCP it does not read (its track's queue is full).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            "error,webrtc::peer_connection::driver=off",
        ))
        .try_init();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(threads));
}

/// How many cores a `taskset` list names ("1", "0-3", "1,3").
fn cpu_count(list: &str) -> usize {
    list.split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => {
                b.trim().parse::<usize>().unwrap() - a.trim().parse::<usize>().unwrap() + 1
            }
            None => 1,
        })
        .sum()
}

async fn run(threads: usize) {
    let scenario = env_str("BENCH_SCENARIO", "fanout");
    let steps: Vec<usize> = env_str("BENCH_SUBS", "50,100,200,400")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let seconds = env_u64("BENCH_SECONDS", 20);
    let kbps = env_u64("BENCH_VIDEO_KBPS", 1500);
    let weir_cpus = env_str("BENCH_WEIR_CPUS", "0");
    let lean = env_u64("BENCH_LEAN", 0) == 1;
    // Lean subscribers send no feedback: Weir's congestion control would see none.
    let cc = env_u64("BENCH_CC", 1) == 1 && !lean;
    let max_n = steps.iter().copied().max().unwrap_or(0);
    let dir = tempfile::tempdir().unwrap();
    let tune = move |c: &mut weir::config::Config| {
        // Every client comes from 127.0.0.1, faster than any real one would.
        c.server.signaling_messages_per_s = 0;
        c.server.max_connections_per_ip = 100_000;
        c.server.max_connections = 100_000;
        c.server.max_members_per_room = c.server.max_members_per_room.max(max_n + 20);
        c.server.max_subscriptions = 1_000_000;
        c.server.congestion_control = cc;
    };
    // The relay scenario: a cluster (Redis, the room's node, `BENCH_EDGES` edges, all
    // on Weir's cores); the room spills at once, every subscriber joins through an
    // edge (round robin), each edge in a region of its own so it serves its joins.
    let edges_n = if scenario == "relay" {
        env_u64("BENCH_EDGES", 3) as usize
    } else {
        0
    };
    let redis = if edges_n > 0 {
        Some(common::redis::Redis::start().await)
    } else {
        None
    };
    let app_config = weir::auth::AppKeys::generate_config(common::APP);
    let mut nodes: Vec<Arc<ProcNode>> = Vec::new();
    for i in 0..=edges_n {
        let node_dir = dir.path().join(format!("node{i}"));
        std::fs::create_dir_all(&node_dir).unwrap();
        let redis_url = redis.as_ref().map(|r| r.url());
        nodes.push(Arc::new(
            ProcNode::start_app(&node_dir, Some(&weir_cpus), app_config.clone(), |c| {
                tune(c);
                if let Some(url) = redis_url {
                    c.cluster.redis_url = url;
                    c.cluster.node_id = if i == 0 {
                        "origin".into()
                    } else {
                        format!("edge-{i}")
                    };
                    c.cluster.region = format!("r{i}");
                    c.server.trusted_proxies = vec!["127.0.0.1".into()];
                    if i == 0 {
                        c.cluster.spill_members = 1;
                    }
                }
            })
            .await,
        ));
    }
    let node = nodes[0].clone();
    // Where subscribers join, and whose counters are measured.
    let entries: Vec<Arc<ProcNode>> = if edges_n > 0 {
        nodes[1..].to_vec()
    } else {
        vec![node.clone()]
    };
    let measured = nodes.clone();
    let room = 1;
    let stop = Arc::new(AtomicBool::new(false));
    let opus = Arc::new(opus_packets());
    let mut publishers = Vec::new();
    let publishers_n = env_u64("BENCH_PUBLISHERS", 10) as usize;
    let players = env_u64("BENCH_PLAYERS", 0) as usize;
    let mut rtmp_pusher = None;
    let what = match scenario.as_str() {
        "audio" => {
            for i in 0..publishers_n {
                publishers.push(tokio::spawn(publish(
                    node.clone(),
                    format!("p{i}"),
                    room,
                    Arc::new(Vec::new()),
                    opus.clone(),
                    stop.clone(),
                )));
            }
            format!("{publishers_n} audio publishers (Opus 64 kbit/s)")
        }
        "meeting" => {
            let kbps = env_u64("BENCH_VIDEO_KBPS", 500);
            let aus = Arc::new(clip("640x360", kbps));
            for i in 0..publishers_n {
                publishers.push(tokio::spawn(publish(
                    node.clone(),
                    format!("m{i}"),
                    room,
                    aus.clone(),
                    opus.clone(),
                    stop.clone(),
                )));
            }
            format!(
                "{publishers_n} members each publishing H.264 360p {kbps} kbit/s + Opus and \
                 receiving every stream (a publishing and a receiving session per member, \
                 so each receives its own stream too)"
            )
        }
        "rtmp" => {
            let flv = flv_clip(dir.path(), kbps);
            let url = format!(
                "rtmp://{}/live/cam?{}",
                node.rtmp,
                common::rtmp_query(&node.app, "pusher", room, 0xff)
            );
            // Copied, not encoded: ffmpeg only paces and sends the file, again and again.
            let pusher = tokio::process::Command::new("ffmpeg")
                .args(["-hide_banner", "-v", "error", "-re", "-stream_loop", "-1"])
                .arg("-i")
                .arg(&flv)
                .args(["-c", "copy", "-f", "flv", &url])
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("ffmpeg runs");
            rtmp_pusher = Some(pusher);
            format!(
                "1 RTMP pusher (ffmpeg copying a 720p {kbps} kbit/s H.264 + AAC 48 kHz FLV: \
                 Weir converts AAC to Opus), {players} HTTP-FLV players"
            )
        }
        _ => {
            let aus = Arc::new(clip("1280x720", kbps));
            publishers.push(tokio::spawn(publish(
                node.clone(),
                "p0".into(),
                room,
                aus,
                opus.clone(),
                stop.clone(),
            )));
            format!("1 publisher (H.264 720p {kbps} kbit/s 30 fps, 1 s GOP + Opus 64 kbit/s)")
        }
    };
    let steps = if scenario == "meeting" {
        vec![publishers_n]
    } else {
        steps
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A publisher that could not join (refused as overload, say) leaves every
    // subscriber without media: stop here rather than measure an empty room.
    for p in &mut publishers {
        if p.is_finished() {
            let ended = p.await;
            panic!("a publisher ended before any subscriber joined: {ended:?}");
        }
    }
    if edges_n > 0 {
        // Every edge sees the room spill from its node before anyone joins there.
        let deadline = Instant::now() + Duration::from_secs(20);
        for e in &entries {
            loop {
                let view = common::http_get(e.metrics, "/cluster").await;
                if view.contains("\"spilling\":[\"1400000000/1\"]") {
                    break;
                }
                assert!(Instant::now() < deadline, "the room does not spill: {view}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let what = if edges_n > 0 {
        format!(
            "{what}, on the room's node; subscribers join through {edges_n} other nodes (round robin), each of which relays the stream from it"
        )
    } else {
        what
    };
    println!(
        "scenario {scenario}: {what}; Weir on cpu {weir_cpus}, generator on {} ({threads} threads); congestion control {}",
        env_str("BENCH_LOAD_CPUS", "1"),
        if cc { "on" } else { "off" }
    );
    let flv_bytes = Arc::new(AtomicU64::new(0));
    let mut player_tasks = Vec::new();
    if players > 0 {
        let key = node
            .play_key
            .clone()
            .expect("the generated app has a play key");
        let url = weir::auth::live_url::sign_url(
            &format!("http://{}/live/cam.flv", node.http),
            &key,
            weir::auth::unix_now() + 3600,
        )
        .unwrap();
        for _ in 0..players {
            player_tasks.push(tokio::spawn(play_flv(
                url.clone(),
                flv_bytes.clone(),
                stop.clone(),
            )));
        }
    }
    let totals = Arc::new(Totals::default());
    let receivers = Receivers::start(threads);
    let mut subs: Vec<Arc<SubCounters>> = Vec::new();
    let mut tasks = Vec::new();
    let mut summaries = Vec::new();
    let mut trace = Vec::new();
    for &n in &steps {
        // The join storm: everyone missing joins at once.
        let started = Instant::now();
        let failed_before = totals.failed.load(Ordering::Relaxed);
        let newcomers: Vec<Arc<SubCounters>> = (subs.len()..n)
            .map(|i| {
                let own = Arc::new(SubCounters::default());
                let entry = &entries[i % entries.len()];
                tasks.push(tokio::spawn(subscribe(
                    i,
                    receivers.clone(),
                    entry.ws.clone(),
                    entry.join(&format!("s{i}"), room, true),
                    totals.clone(),
                    own.clone(),
                    stop.clone(),
                    scenario == "audio",
                    lean,
                )));
                own
            })
            .collect();
        let deadline = started + Duration::from_secs(30);
        while Instant::now() < deadline
            && newcomers
                .iter()
                .any(|s| s.got_video_at.lock().unwrap().is_none())
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let join_ms = newcomers
            .iter()
            .filter_map(|s| *s.got_video_at.lock().unwrap())
            .map(|t| t.duration_since(started).as_secs_f64() * 1000.0)
            .fold(0.0, f64::max);
        let got = newcomers
            .iter()
            .filter(|s| s.got_video_at.lock().unwrap().is_some())
            .count();
        subs.extend(newcomers.iter().cloned());
        println!(
            "  N = {n}: {} joined at once, {got} receiving video after {join_ms:.0} ms ({} failures)",
            newcomers.len(),
            totals.failed.load(Ordering::Relaxed) - failed_before
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        let flv_before = flv_bytes.load(Ordering::Relaxed);
        let m = measure(&measured, &totals, &subs, seconds, &mut trace).await;
        println!(
            "  Weir's residence p50 / p99 / p99.9 (bucket bounds): WebRTC {:?} ms, RTMP video {:?} ms",
            m.fwd, m.bridge
        );
        if players > 0 {
            let mbps = (flv_bytes.load(Ordering::Relaxed) - flv_before) as f64 * 8.0
                / seconds as f64
                / 1e6;
            println!(
                "  {players} HTTP-FLV players received {mbps:.1} Mbit/s in all ({:.2} each)",
                mbps / players as f64
            );
        }
        let s = Step {
            subscribers: n,
            receiving: totals.with_video.load(Ordering::Relaxed),
            join_ms,
            failures: totals.failed.load(Ordering::Relaxed) - failed_before,
            rss_mib: measured.iter().map(|n| rss_mib(n.pid)).sum(),
            m,
        };
        let m = &s.m;
        println!(
            "  N = {n}: {:.0} pkt/s received, {:.0} sent by Weir, loss {:.3} %, latency p50 {:.1} / p99 {:.1} / max {:.1} ms, Weir forwarding p99 {:.2} ms, Weir CPU {:.0} % ({:.2} µs per packet sent), generator CPU {:.0} %, Weir RSS {:.0} MiB, {} subscriber-seconds without video, up to {} videos paused",
            m.rx_pps, m.out_pps, m.loss_pct, m.lat_p50, m.lat_p99, m.lat_max, m.fwd[1], m.weir_cpu_pct, m.us_per_packet, m.load_cpu_pct, s.rss_mib, m.starved_seconds, m.paused_max
        );
        let busy: Vec<String> = m.workers_busy.iter().map(|b| format!("{b:.0}")).collect();
        println!("  media workers busy (mean %): {}", busy.join(" / "));
        if edges_n > 0 {
            let per: Vec<String> = s.m.node_cpu_pct.iter().map(|c| format!("{c:.1}")).collect();
            println!(
                "  CPU % per node (the room's node first, then the edges): {}",
                per.join(" / ")
            );
        }
        summaries.push(s);
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    for p in publishers.into_iter().chain(player_tasks) {
        let _ = tokio::time::timeout(Duration::from_secs(5), p).await;
    }
    drop(rtmp_pusher);
    println!();
    println!("| subscribers | receiving | join storm: all receiving | rx packets/s | Weir packets/s out | loss % | latency p50 / p99 / max ms | Weir residence p50 / p99 / p99.9 ms | Weir CPU % | µs per packet | generator CPU % | Weir RSS MiB | subscriber-s without video |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut csv = Vec::new();
    for s in &summaries {
        let m = &s.m;
        println!(
            "| {} | {} | {:.0} ms ({} failed) | {:.0} | {:.0} | {:.3} | {:.1} / {:.1} / {:.1} | {} / {} / {} | {:.0} | {:.2} | {:.0} | {:.0} | {} |",
            s.subscribers, s.receiving, s.join_ms, s.failures, m.rx_pps, m.out_pps, m.loss_pct, m.lat_p50, m.lat_p99, m.lat_max, m.fwd[0], m.fwd[1], m.fwd[2], m.weir_cpu_pct, m.us_per_packet, m.load_cpu_pct, s.rss_mib, m.starved_seconds
        );
        csv.push(format!(
            "{},{},{:.0},{},{:.0},{:.0},{:.4},{:.2},{:.2},{:.2},{:.3},{:.1},{:.3},{:.1},{:.1},{},{}",
            s.subscribers, s.receiving, s.join_ms, s.failures, m.rx_pps, m.out_pps, m.loss_pct, m.lat_p50, m.lat_p99, m.lat_max, m.fwd[1], m.weir_cpu_pct, m.us_per_packet, m.load_cpu_pct, s.rss_mib, m.starved_seconds, m.paused_max
        ));
    }
    write_csv(
        &format!("load-{scenario}.csv"),
        "subscribers,receiving,join_ms,failures,rx_pps,out_pps,loss_pct,lat_p50_ms,lat_p99_ms,lat_max_ms,fwd_p99_ms,weir_cpu_pct,us_per_packet,load_cpu_pct,weir_rss_mib,starved_subscriber_seconds,paused_max",
        &csv,
    );
    write_csv(
        &format!("load-{scenario}-trace.csv"),
        "subscribers,second,rx_pps,out_pps,loss_pct,without_video,lat_p50_ms,lat_p99_ms,lat_max_ms,fwd_p99_ms,weir_cpu_pct,load_cpu_pct,paused",
        &trace,
    );
}
