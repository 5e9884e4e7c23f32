//! The async shell: sockets, tasks and signals around the sans-I/O cores.
//!
//! `start` wires the parts and returns a handle (tests run whole servers in-process on
//! port 0); `main` is the binary's entry: start, wait for SIGTERM/Ctrl-C, drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::auth::Keyring;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::room::{Limits, Rooms, UrlBase};

pub mod cluster;
pub mod control;
mod hooks;
mod http;
pub mod logging;
mod record;
mod record_api;
mod relay;
pub mod rtmp;
mod rtmp_relay;
mod span;
mod supervise;
pub mod tls;
mod upload;
mod weapp;
mod web;
pub mod whip;
mod ws;

use control::{Control, ControlCommand};
pub use supervise::Supervisor;

/// What every connection handler shares.
pub struct AppState {
    pub keyring: Arc<Keyring>,
    pub control: mpsc::Sender<ControlCommand>,
    pub metrics: Arc<Metrics>,
    pub next_session: Arc<AtomicU64>,
    pub shutting_down: AtomicBool,
    pub idle_timeout_s: u64,
    /// Outgoing messages a session may have queued ([`control::session_queue`]).
    pub session_queue: usize,
    /// The bearer token that opens `/metrics` on the public listener, if any.
    pub metrics_token: Option<String>,
    /// Per-session signaling rates (all messages, room text messages), per second.
    pub message_rate: u32,
    pub text_rate: u32,
    pub dev_mode: bool,
    /// Every playable stream (RTMP and HTTP-FLV players).
    pub hub: Arc<crate::live::Hub>,
    /// How push and play URLs are spelled on this node.
    pub urls: UrlBase,
    /// The node's health: whether every part that serves it is alive.
    pub supervisor: Supervisor,
    /// Client IPs whose credentials keep failing (see `limits`).
    pub failed_joins: std::sync::Mutex<crate::limits::FailedJoins>,
    /// When the server started: the clock of `failed_joins`.
    pub epoch: std::time::Instant,
    /// Signaling sessions still running, so a shutdown waits for each to write its
    /// `left` and close frame before the runtime (and every task with it) ends.
    pub live_sessions: watch::Sender<usize>,
    /// Reverse proxies whose `X-Forwarded-For` names the client.
    pub proxies: crate::limits::TrustedProxies,
    /// WHIP publishers' resources.
    pub whip: whip::Resources,
    /// Recording (started by config rules or the REST calls).
    pub recording: Arc<record::Recording>,
    /// The backend's `on_publish`/`on_play` hooks, if configured.
    pub admission: Option<Arc<hooks::Admission>>,
    /// The ICE servers clients are told of.
    pub ice: IceConfig,
    /// This node's cluster membership, with `[cluster] redis_url`.
    pub cluster: Option<Arc<cluster::Cluster>>,
}

/// The ICE servers every client is told of: STUN as configured, TURN with
/// credentials made per user and time (`auth::turn`).
#[derive(Debug, Clone, Default)]
pub struct IceConfig {
    pub stun_urls: Vec<String>,
    pub turn_urls: Vec<String>,
    pub turn_secret: String,
    pub ttl_s: u64,
}

impl IceConfig {
    pub fn from_config(c: &crate::config::ServerConfig) -> Result<Self> {
        if !c.turn_urls.is_empty() && c.turn_secret.is_empty() {
            anyhow::bail!("turn_urls need turn_secret (the TURN server's static-auth-secret)");
        }
        Ok(Self {
            stun_urls: c.stun_urls.clone(),
            turn_urls: c.turn_urls.clone(),
            turn_secret: c.turn_secret.clone(),
            ttl_s: c.turn_credential_ttl_s,
        })
    }

    /// The servers for `user_id`, with TURN credentials valid from `now` (Unix s).
    pub fn for_user(&self, user_id: &str, now: u64) -> Vec<weir_signaling::IceServer> {
        let mut out = Vec::new();
        if !self.stun_urls.is_empty() {
            out.push(weir_signaling::IceServer {
                urls: self.stun_urls.clone(),
                username: None,
                credential: None,
            });
        }
        if !self.turn_urls.is_empty() {
            let (username, credential) =
                crate::auth::turn::credentials(&self.turn_secret, user_id, now + self.ttl_s);
            out.push(weir_signaling::IceServer {
                urls: self.turn_urls.clone(),
                username: Some(username),
                credential: Some(credential),
            });
        }
        out
    }
}

/// Counts a signaling session as live while it exists.
pub struct LiveSession(watch::Sender<usize>);

impl LiveSession {
    pub fn new(state: &AppState) -> Self {
        state.live_sessions.send_modify(|n| *n += 1);
        Self(state.live_sessions.clone())
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl AppState {
    /// Whether `ip` may have credentials checked now (Err: a refusal to send).
    pub fn may_verify(&self, ip: std::net::IpAddr) -> Result<(), String> {
        let now = self.epoch.elapsed().as_millis() as u64;
        let verdict = self
            .failed_joins
            .lock()
            .expect("failed joins lock")
            .check(ip, now);
        verdict.map_err(|wait_s| {
            self.metrics.joins_throttled.inc();
            format!("too many failed credential checks from this address; try again in {wait_s} s")
        })
    }

    /// `ip`'s credentials failed to verify.
    pub fn verify_failed(&self, ip: std::net::IpAddr) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.failed_joins
            .lock()
            .expect("failed joins lock")
            .failed(ip, now);
    }

    /// Why this node takes no new joins, publishes or plays, if it takes none.
    pub fn unavailable(&self) -> Option<String> {
        if let Some(f) = self.supervisor.failure() {
            return Some(format!("the node is failing ({f})"));
        }
        self.shutting_down
            .load(Ordering::Relaxed)
            .then(|| "the server is shutting down".to_owned())
    }
}

/// A running server.
pub struct Server {
    pub http_addr: SocketAddr,
    /// The one UDP port of WebRTC media.
    pub udp_addr: SocketAddr,
    /// RTMP ingest, when enabled.
    pub rtmp_addr: Option<SocketAddr>,
    /// RTMPS ingest, when enabled.
    pub rtmps_addr: Option<SocketAddr>,
    /// The metrics listener, when enabled.
    pub metrics_addr: Option<SocketAddr>,
    pub state: Arc<AppState>,
    stop: watch::Sender<bool>,
    http: tokio::task::JoinHandle<()>,
    control: tokio::task::JoinHandle<()>,
    grace: Duration,
    /// In a cluster: how long a SIGTERM waits for this node's rooms to end.
    drain: Duration,
    #[cfg(feature = "fault-injection")]
    media_tx: mpsc::Sender<control::MediaInput>,
}

impl Server {
    /// Resolves when a part of the node has died (see `supervise`): the node cannot
    /// serve and should be restarted.
    pub async fn failed(&self) -> String {
        self.state.supervisor.failed().await
    }

    /// Test-only: makes the media task panic, as a bug reached by a peer's input would.
    #[cfg(feature = "fault-injection")]
    pub async fn inject_media_panic(&self) {
        let _ = self.media_tx.send(control::MediaInput::InjectPanic).await;
    }

    /// Test-only: the media task blocks for `d`, as a node past its capacity works.
    #[cfg(feature = "fault-injection")]
    pub async fn inject_media_stall(&self, d: Duration) {
        let _ = self
            .media_tx
            .send(control::MediaInput::InjectStall(d))
            .await;
    }

    /// Graceful shutdown: stop admitting, tell every session, drain, stop. In a
    /// cluster, first drain: out of room placement at once, and wait (up to
    /// `[cluster] drain_s`) until this node's rooms and relayed sessions have ended.
    pub async fn shutdown(self) {
        if let Some(cluster) = &self.state.cluster {
            cluster.drain();
            let deadline = tokio::time::Instant::now() + self.drain;
            let metrics = &self.state.metrics;
            let busy = || {
                metrics.rooms.get() > 0
                    || metrics
                        .cluster_relays
                        .with_label_values(&["signaling"])
                        .get()
                        > 0
                    || metrics.cluster_relays.with_label_values(&["rtmp"]).get() > 0
            };
            while busy() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            info!(
                rooms = metrics.rooms.get(),
                "drained (or the drain period ended); telling the rest to move"
            );
        }
        self.state.supervisor.stopping();
        self.state.shutting_down.store(true, Ordering::Relaxed);
        let _ = self.state.control.send(ControlCommand::Shutdown).await;
        let _ = tokio::time::timeout(self.grace, self.control).await;
        // Every session has its `left` queued now; let each write it and close.
        let mut live = self.state.live_sessions.subscribe();
        let drained = tokio::time::timeout(self.grace, live.wait_for(|n| *n == 0))
            .await
            .is_ok();
        if !drained {
            warn!(
                sessions = *live.borrow(),
                "sessions still open after the grace period; closing them unannounced"
            );
        }
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(self.grace, self.http).await;
        info!("stopped");
    }
}

/// The host named in play URLs.
fn public_host(config: &Config) -> String {
    if !config.server.public_host.is_empty() {
        return config.server.public_host.clone();
    }
    config
        .server
        .announce_ips
        .first()
        .cloned()
        .unwrap_or_else(|| "127.0.0.1".into())
}

/// A listening socket whose accepted connections inherit a limit on unsent bytes.
/// Asks for `bytes` of receive and send buffer on the media socket and logs what the
/// kernel granted (it caps the request at net.core.rmem_max / wmem_max).
fn size_udp_buffers(socket: &tokio::net::UdpSocket, bytes: u32) {
    if bytes == 0 {
        return;
    }
    let s = socket2::SockRef::from(socket);
    let _ = s.set_recv_buffer_size(bytes as usize);
    let _ = s.set_send_buffer_size(bytes as usize);
    // Linux reports twice what it grants (the other half is its bookkeeping).
    let granted = (
        s.recv_buffer_size().unwrap_or(0) / 2,
        s.send_buffer_size().unwrap_or(0) / 2,
    );
    if granted.0 < bytes as usize || granted.1 < bytes as usize {
        warn!(
            asked = bytes,
            receive = granted.0,
            send = granted.1,
            "the kernel granted the WebRTC UDP socket smaller buffers than udp_buffer_bytes: \
             raise net.core.rmem_max and net.core.wmem_max (sysctl) for bursts to fit"
        );
    } else {
        info!(
            receive = granted.0,
            send = granted.1,
            "WebRTC UDP socket buffers"
        );
    }
}

async fn bind_tcp(addr: &str, unsent_limit: u32) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        #[cfg(target_os = "linux")]
        if unsent_limit > 0 {
            socket2::SockRef::from(&socket).set_tcp_notsent_lowat(unsent_limit)?;
        }
        match socket.bind(a).and_then(|()| socket.listen(1024)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr}: no address"),
        )
    }))
}

/// The mini program room service of this node, as configured (None when off).
fn room_service(
    config: &Config,
    keyring: &Arc<Keyring>,
    urls: &UrlBase,
) -> Result<Option<crate::weapp::RoomService>> {
    let c = &config.room_service;
    if !c.enabled {
        return Ok(None);
    }
    let sdk_app_id = match c.sdk_app_id {
        0 => config.apps.first().map_or(0, |a| a.sdk_app_id),
        n => n,
    };
    let sig_kind = match c.sig_kind.as_str() {
        "v1" => crate::auth::TokenKind::V1,
        "v2" => crate::auth::TokenKind::V2,
        "jwt" => crate::auth::TokenKind::Jwt,
        other => anyhow::bail!("room_service.sig_kind is v1, v2 or jwt, not {other:?}"),
    };
    let issue_user_sigs = c.issue_user_sigs || config.server.dev_mode;
    info!(
        sdk_app_id,
        issue_user_sigs,
        "mini program room service at /weapp/ (webrtc_room, multi_room, double_room, live_room, utils)"
    );
    Ok(Some(crate::weapp::RoomService::new(
        crate::weapp::Settings {
            sdk_app_id,
            issue_user_sigs,
            sig_kind,
            heartbeat_timeout_ms: c.heartbeat_timeout_s * 1000,
            idle_room_ms: c.idle_room_s * 1000,
            max_members: c.max_members,
            max_audiences: c.max_audiences,
            max_rooms: config.server.max_rooms,
            max_field_bytes: c.max_field_bytes,
            url_validity_s: c.url_validity_s,
            sig_validity_s: c.sig_validity_s,
            ..Default::default()
        },
        crate::weapp::Issuer {
            keyring: keyring.clone(),
            rtmp_base: urls.rtmp.clone(),
            flv_base: urls.flv.clone(),
        },
    )))
}

pub async fn start(config: Config, keyring: Keyring) -> Result<Server> {
    let metrics = Arc::new(Metrics::new());
    let supervisor = Supervisor::new(metrics.clone());
    let limit_metrics = metrics.clone();
    let proxies = crate::limits::TrustedProxies::parse(&config.server.trusted_proxies)
        .map_err(|e| anyhow::anyhow!(e))?;
    let connections = |listener: &'static str| {
        crate::limits::Connections::new(
            listener,
            config.server.max_connections,
            config.server.max_connections_per_ip,
            proxies.clone(),
            limit_metrics.clone(),
        )
    };
    let send_buffer = config.server.tcp_unsent_limit_bytes;
    let listener = bind_tcp(&config.server.http_addr, send_buffer)
        .await
        .with_context(|| format!("binding HTTP on {}", config.server.http_addr))?;
    let http_addr = listener.local_addr()?;
    let metrics_listener = if config.server.metrics_addr.is_empty() {
        None
    } else {
        Some(
            bind_tcp(&config.server.metrics_addr, 0)
                .await
                .with_context(|| format!("binding metrics on {}", config.server.metrics_addr))?,
        )
    };
    let tls = match (&config.server.tls_cert_file, &config.server.tls_key_file) {
        (c, k) if c.is_empty() && k.is_empty() => None,
        (c, k) if c.is_empty() || k.is_empty() => {
            anyhow::bail!("TLS needs both tls_cert_file and tls_key_file")
        }
        (c, k) => {
            let tls = tls::Tls::load(std::path::Path::new(c), std::path::Path::new(k))?;
            tokio::spawn(tls.clone().watch());
            info!(cert = %c, "HTTPS and WSS on the HTTP listener (reloaded on SIGHUP or change)");
            Some(tls)
        }
    };
    let host = public_host(&config);
    let rtmp_listener = if config.server.rtmp_addr.is_empty() {
        None
    } else {
        Some(
            bind_tcp(&config.server.rtmp_addr, send_buffer)
                .await
                .with_context(|| format!("binding RTMP on {}", config.server.rtmp_addr))?,
        )
    };
    let rtmp_addr = rtmp_listener.as_ref().map(|l| l.local_addr()).transpose()?;
    let rtmps_listener = match (&config.server.rtmps_addr, &tls) {
        (a, _) if a.is_empty() => None,
        (a, None) => anyhow::bail!("rtmps_addr {a} needs tls_cert_file and tls_key_file"),
        (a, Some(tls)) => Some((
            bind_tcp(a, send_buffer)
                .await
                .with_context(|| format!("binding RTMPS on {a}"))?,
            tls.clone(),
        )),
    };
    let rtmps_addr = rtmps_listener
        .as_ref()
        .map(|(l, _)| l.local_addr())
        .transpose()?;
    let urls = UrlBase {
        rtmp: format!(
            "rtmp://{host}:{}/live",
            rtmp_addr.map_or(1935, |a| a.port())
        ),
        flv: format!(
            "{}://{host}:{}/live",
            if tls.is_some() { "https" } else { "http" },
            http_addr.port()
        ),
        webrtc: format!("webrtc://{host}:{}/live", http_addr.port()),
    };
    let rooms = Rooms::new(
        Limits {
            max_rooms: config.server.max_rooms,
            max_members_per_room: config.server.max_members_per_room,
            max_publishers_per_room: config.server.max_publishers_per_room,
            max_publishers: config.server.max_publishers,
            max_subscriptions_per_member: config.server.max_subscriptions_per_member,
            max_subscriptions: config.server.max_subscriptions,
            congestion_policy: config.server.congestion_policy,
        },
        urls.clone(),
    );
    let (control_tx, control_rx) = mpsc::channel(4096);
    let workers = match config.server.media_workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut udp = Vec::new();
    for s in crate::media::plane::bind_udp_group(&config.server.udp_addr, workers)
        .with_context(|| format!("binding WebRTC UDP on {}", config.server.udp_addr))?
    {
        let s = tokio::net::UdpSocket::from_std(s)?;
        size_udp_buffers(&s, config.server.udp_buffer_bytes);
        udp.push(s);
    }
    let udp_addr = udp[0].local_addr()?;
    let udp_port = udp_addr.port();
    let announce = crate::media::announce_addresses(&config.server.announce_ips, udp_port)
        .map_err(anyhow::Error::msg)?;
    info!(
        udp = %udp_addr,
        workers,
        announced = ?announce,
        "WebRTC media: one UDP port for all peers; clients must reach the announced addresses \
         (set announce_ips / WEIR_ANNOUNCE_IPS to the public IP behind NAT)"
    );
    let tcp = if config.server.tcp_addr.is_empty() {
        None
    } else {
        let l = tokio::net::TcpListener::bind(&config.server.tcp_addr)
            .await
            .with_context(|| format!("binding ICE-TCP on {}", config.server.tcp_addr))?;
        info!(tcp = %l.local_addr()?, "ICE over TCP (passive candidates) for networks that block UDP");
        Some(l)
    };
    let tcp_port = tcp
        .as_ref()
        .map(|l| l.local_addr())
        .transpose()?
        .map(|a| a.port());
    let wiring = crate::media::plane::wire(workers);
    let media_config = crate::media::MediaConfig {
        announce,
        tcp_port,
        ice_disconnected: Duration::from_millis(config.server.ice_disconnected_timeout_ms),
        ice_failed: Duration::from_millis(config.server.ice_failed_timeout_ms),
        congestion_control: config.server.congestion_control,
        publisher_bitrate: (
            f64::from(config.server.publisher_min_bitrate),
            f64::from(config.server.publisher_max_bitrate),
        ),
        overload_busy_percent: config.server.overload_busy_percent,
        publisher_audio_ptime_ms: config.server.publisher_audio_ptime_ms,
    };
    let plane = wiring.plane.clone();
    let overload = wiring.any_overloaded.clone();
    let overload_for_cluster = overload.clone();
    metrics.media_workers.set(workers as i64);
    // The first worker accepts ICE-TCP and tells the others of each connection.
    let tcp_bound = tcp.as_ref().map(|l| l.local_addr()).transpose()?;
    let mut tcp = tcp.map(|l| (l, connections("ice_tcp")));
    for (w, socket) in wiring.workers.into_iter().zip(udp) {
        let media = crate::media::Media::new(
            media_config.clone(),
            socket,
            tcp.take(),
            tcp_bound,
            control_tx.clone(),
            metrics.clone(),
            w.crew,
        )?;
        supervisor.spawn("media", media.run(w.inputs, w.bridges, w.between));
    }
    #[cfg(feature = "fault-injection")]
    let fault_tx = plane.input(0).clone();

    let hub = {
        let metrics = metrics.clone();
        let forget = metrics.clone();
        Arc::new(crate::live::Hub::new(
            config.server.play_max_latency_ms,
            Arc::new(move |stream: &str, n: u64| {
                metrics
                    .player_dropped_tags
                    .with_label_values(&[stream])
                    .inc_by(n)
            }),
            // A stream's series go with it (label sets stay bounded).
            Arc::new(move |stream: &str| {
                let _ = forget.player_dropped_tags.remove_label_values(&[stream]);
            }),
        ))
    };
    // Callbacks to the backend and recording both watch the hub's streams.
    let callbacks =
        hooks::Callbacks::start(&config.callbacks, metrics.clone()).map(|(cb, task)| {
            supervisor.spawn("callbacks", task);
            cb
        });
    let uploader = upload::Uploader::from_config(&config.record)
        .map_err(|e| anyhow::anyhow!("[record] s3 settings: {e}"))?;
    let recording = record::Recording::new(
        config.record.clone(),
        uploader,
        callbacks.clone(),
        metrics.clone(),
        host.clone(),
    );
    hub.observe(recording.observer());
    let keyring = Arc::new(keyring);
    let room_service = room_service(&config, &keyring, &urls)?;
    let ice = IceConfig::from_config(&config.server)?;
    let cluster = cluster::Cluster::new(
        &config.cluster,
        crate::cluster::Addresses {
            http: if config.cluster.advertise_http.is_empty() {
                format!(
                    "{}://{}:{}",
                    if tls.is_some() { "https" } else { "http" },
                    advertised_host(&config, &host),
                    http_addr.port()
                )
            } else {
                config
                    .cluster
                    .advertise_http
                    .trim_end_matches('/')
                    .to_owned()
            },
            rtmp: rtmp_addr.map_or(String::new(), |a| {
                format!("rtmp://{}:{}", advertised_host(&config, &host), a.port())
            }),
            udp: if config.cluster.advertise_udp.is_empty() {
                format!("{}:{}", advertised_host(&config, &host), udp_port)
            } else {
                config.cluster.advertise_udp.clone()
            },
            tcp: tcp_port.map_or(String::new(), |p| {
                format!("{}:{p}", advertised_host(&config, &host))
            }),
        },
        config.server.max_rooms,
        if config.cluster.spill_members == 0 {
            config.server.max_members_per_room
        } else {
            config.cluster.spill_members
        },
        overload_for_cluster,
        metrics.clone(),
        hub.clone(),
    )?;
    let next_session = Arc::new(AtomicU64::new(1));
    let span = cluster.as_ref().map(|c| span::SpanContext {
        node_id: c.id.clone(),
        keyring: keyring.clone(),
        tls: c.tls.clone(),
        media: plane.clone(),
        control: control_tx.clone(),
        next_session: next_session.clone(),
        metrics: metrics.clone(),
    });
    let control = supervisor.spawn(
        "control",
        Control::new(
            rooms,
            Some(plane.clone()),
            metrics.clone(),
            Some(control::LivePlayback {
                hub: hub.clone(),
                aac_bitrate: config.server.aac_bitrate,
            }),
        )
        .with_room_service_opt(room_service)
        .with_ice_servers(ice.clone())
        .with_callbacks(callbacks.clone())
        .with_overload_flag(overload)
        .with_spread_members(config.server.spread_room_members)
        .with_span(span)
        .run(control_rx),
    );
    let admission = hooks::Admission::from_config(&config.callbacks, metrics.clone());
    if let Some(c) = &cluster {
        // Know the cluster (and be known) before serving: one heartbeat, bounded.
        let _ = tokio::time::timeout(Duration::from_secs(2), c.beat(&control_tx, 0, 0.0)).await;
        supervisor.spawn("cluster", c.clone().run(control_tx.clone()));
    }
    let state = Arc::new(AppState {
        keyring,
        control: control_tx,
        metrics,
        next_session,
        shutting_down: AtomicBool::new(false),
        idle_timeout_s: config.server.signaling_idle_timeout_s,
        session_queue: control::session_queue(config.server.max_members_per_room),
        metrics_token: Some(config.server.metrics_token.clone()).filter(|t| !t.is_empty()),
        message_rate: config.server.signaling_messages_per_s,
        text_rate: config.server.text_messages_per_s,
        dev_mode: config.server.dev_mode,
        hub,
        urls: urls.clone(),
        supervisor: supervisor.clone(),
        failed_joins: std::sync::Mutex::new(crate::limits::FailedJoins::new(
            config.server.max_failed_joins_per_ip,
            config.server.failed_join_window_s * 1000,
        )),
        epoch: std::time::Instant::now(),
        live_sessions: watch::channel(0).0,
        proxies: proxies.clone(),
        whip: whip::Resources::default(),
        recording,
        admission,
        ice: ice.clone(),
        cluster,
    });

    let (stop, stop_rx) = watch::channel(false);
    if rtmp_listener.is_some() || rtmps_listener.is_some() {
        let shared = Arc::new(rtmp::RtmpShared {
            pushers: rtmp::Pushers::default(),
            media: plane.clone(),
            bridge_config: crate::bridge::BridgeConfig {
                opus_bitrate: config.server.opus_bitrate.min(510_000) as i32,
                max_lag_ms: config.server.rtmp_max_lag_ms as i64,
                ..Default::default()
            },
            epoch: std::time::Instant::now(),
        });
        // RTMP and RTMPS count against one connection limit.
        let limit = connections("rtmp");
        if let Some(l) = rtmp_listener {
            info!(addr = %l.local_addr()?, "RTMP listening (push with room credentials or a txSecret URL)");
            supervisor.spawn(
                "rtmp",
                rtmp::serve(
                    l,
                    None,
                    state.clone(),
                    shared.clone(),
                    limit.clone(),
                    stop_rx.clone(),
                ),
            );
        }
        if let Some((l, tls)) = rtmps_listener {
            info!(addr = %l.local_addr()?, "RTMPS listening (RTMP in TLS, the HTTPS certificate)");
            supervisor.spawn(
                "rtmps",
                rtmp::serve(l, Some(tls), state.clone(), shared, limit, stop_rx.clone()),
            );
        }
    }
    let metrics_addr = match metrics_listener {
        Some(l) => {
            let addr = l.local_addr()?;
            let app = http::ops_routes(state.clone());
            let limit = connections("metrics");
            supervisor.spawn("metrics", http::serve(l, app, limit, None, stop_rx.clone()));
            info!(%addr, "metrics listening (/metrics, /healthz, /readyz)");
            Some(addr)
        }
        None => None,
    };
    let app = http::public_routes(state.clone());
    let http = supervisor.spawn(
        "http",
        http::serve(listener, app, connections("http"), tls, stop_rx),
    );
    info!(
        addr = %http_addr,
        metrics = if state.metrics_token.is_some() { "with the bearer token" } else { "no" },
        "HTTP listening (signaling at /ws, HTTP-FLV at /live, /healthz, /readyz; /metrics?)"
    );
    Ok(Server {
        http_addr,
        udp_addr,
        rtmp_addr,
        rtmps_addr,
        metrics_addr,
        state,
        stop,
        http,
        control,
        grace: Duration::from_secs(config.server.shutdown_grace_s),
        drain: Duration::from_secs(config.cluster.drain_s),
        #[cfg(feature = "fault-injection")]
        media_tx: fault_tx,
    })
}

/// The host other nodes reach this one at: the first announced IP, else the public
/// host.
fn advertised_host(config: &Config, public: &str) -> String {
    config
        .server
        .announce_ips
        .first()
        .cloned()
        .unwrap_or_else(|| public.to_owned())
}

/// Loads the configuration (or, without one, makes a development one listening on
/// `bind`, loopback by default) and runs until SIGTERM/Ctrl-C.
pub fn main(config_path: Option<PathBuf>, bind: Option<String>) -> Result<()> {
    if config_path.is_some() && bind.is_some() {
        anyhow::bail!(
            "--bind is for development mode (no --config); set the addresses in the file"
        );
    }
    let mut config = match &config_path {
        Some(path) => Config::load(path)?,
        None => Config::development(bind.as_deref()),
    };
    config.apply_env(std::env::vars())?;
    logging::init(&config.server.log_format);
    let keyring = Keyring::from_configs(&config.apps).context("loading app keys")?;
    if config_path.is_none() {
        announce_development(&config)?;
    }
    if keyring.apps().next().is_none() {
        warn!("no [[app]] is configured: nobody can join");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let server = start(config, keyring).await?;
            #[cfg(feature = "fault-injection")]
            inject_faults_from_env(&server);
            tokio::select! {
                () = shutdown_signal() => {
                    server.shutdown().await;
                    Ok(())
                }
                // A dead part leaves a node that cannot serve: exit, so the service
                // manager (systemd, Kubernetes) starts a healthy one.
                why = server.failed() => Err(anyhow::anyhow!("{why}; exiting so the node is restarted")),
            }
        })
}

/// Test-only: `WEIR_FAULT_MEDIA_PANIC_AFTER_MS` makes the media task panic that long
/// after start, so a test can watch the binary itself exit (`tests/drain.rs`).
#[cfg(feature = "fault-injection")]
fn inject_faults_from_env(server: &Server) {
    let Some(ms) = std::env::var("WEIR_FAULT_MEDIA_PANIC_AFTER_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    warn!(ms, "fault injection: the media task will panic");
    let media = server.media_tx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let _ = media.send(control::MediaInput::InjectPanic).await;
    });
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    info!("shutdown requested: no new joins, telling clients, draining");
}

/// Writes the generated development app next to the server and prints, loudly, what
/// development mode means and commands that work as printed. The keys stay in the
/// keys file (mode 600), not in the log.
fn announce_development(config: &Config) -> Result<()> {
    let path = std::env::current_dir()
        .unwrap_or_else(|_| std::env::temp_dir())
        .join(crate::cli::DEV_CONFIG_FILE);
    crate::cli::write_private(&path, &config.to_toml())?;
    let app = &config.apps[0];
    let http = &config.server.http_addr;
    eprintln!(
        "\n  ================================================================\n  \
         DEVELOPMENT MODE: anyone who reaches http://{http}/ gets tokens\n  \
         at /dev/credentials. Never expose this node: run production with\n  \
         `weir serve --config FILE`. Listening on {http} (--bind to change).\n  \
         ================================================================\n"
    );
    warn!(%http, "DEVELOPMENT MODE: /dev/credentials hands out tokens to anyone who reaches this node");
    info!(
        sdk_app_id = app.sdk_app_id,
        keys_file = %path.display(),
        "development app generated (its v1, v2, JWT and live keys are in the keys file, mode 600)"
    );
    // The binary that is running, so the commands work as printed (after
    // scripts/serve.sh there is no `weir` on the PATH).
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "weir".into());
    info!(
        "issue a userSig:        {exe} token usersig --config {} --sdkappid {} --userid alice",
        path.display(),
        app.sdk_app_id
    );
    info!(
        "issue a privateMapKey:  {exe} token privatemapkey --config {} --sdkappid {} --userid alice --roomid 1234",
        path.display(),
        app.sdk_app_id
    );
    Ok(())
}
