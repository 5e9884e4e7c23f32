//! Weir's configuration: one typed struct with embedded defaults, loaded once.
//!
//! Sources, later ones winning: the embedded defaults, a TOML file (`--config` or
//! `WEIR_CONFIG`), then environment variables `WEIR_<KEY>` for every key of the
//! `[server]` table (values are read as TOML, falling back to plain strings, so
//! `WEIR_HTTP_ADDR=0.0.0.0:9000` and `WEIR_MAX_ROOMS=50` both work).
//!
//! With no file at all, [`Config::development`] makes a development app with fresh
//! keys of every kind and writes it next to the server so tokens can be issued for it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    /// Apps known by `sdk_app_id` (`[[app]]` tables).
    #[serde(default, rename = "app")]
    pub apps: Vec<AppConfig>,
    /// More `[[app]]` tables, each file holding only those (e.g. a Kubernetes Secret
    /// mounted beside a ConfigMap); relative to the configuration file's directory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub app_files: Vec<String>,
    /// The mini program room service (`/weapp/...`).
    #[serde(default)]
    pub room_service: RoomServiceConfig,
    /// Recording streams to files.
    #[serde(default)]
    pub record: RecordConfig,
    /// Callbacks (webhooks) to the customer's backend.
    #[serde(default)]
    pub callbacks: CallbacksConfig,
    /// Several nodes behind Redis (`[cluster]`); without `redis_url`, one node.
    #[serde(default)]
    pub cluster: ClusterConfig,
}

/// Several Weir nodes sharing rooms through Redis (see `cluster`). Every key can be
/// set from the environment as `WEIR_CLUSTER_<KEY>` (Kubernetes passes the pod's
/// name and addresses that way).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// `redis://[:password@]host:port[/db]`, or `rediss://…` for TLS (rustls; the
    /// server's certificate is checked against `redis_ca_file`, else the system's
    /// roots). Empty: one node, no cluster.
    pub redis_url: String,
    /// A PEM file of the CA that signed the Redis server's certificate (`rediss://`
    /// to a private CA). Empty: the system's roots.
    pub redis_ca_file: String,
    /// This node's id, unique in the cluster (empty: the host name and the HTTP port).
    pub node_id: String,
    /// A region name; a new room is placed in the region of the node that saw its
    /// first join when a node there takes rooms.
    pub region: String,
    /// Where other nodes reach this node's HTTP listener to relay signaling
    /// (`http://10.0.0.5:8080`, or `https://weir-3.internal:8443` when it is TLS);
    /// empty: `http://{first announce_ip or public_host}:{port}`.
    pub advertise_http: String,
    /// Where other nodes reach this node's WebRTC UDP port (`10.0.0.5:50000`), to
    /// relay its rooms' streams (rooms that span nodes): a private address, say,
    /// where clients get the public one. Empty: the first announced address.
    pub advertise_udp: String,
    /// A PEM file of the CA that signed the other nodes' HTTPS certificates (their
    /// `advertise_http` is `https://…` under a private CA). Empty: the public roots.
    pub node_ca_file: String,
    /// Seconds between heartbeats (the node's record, its rooms' mappings).
    pub heartbeat_ms: u64,
    /// A node whose record is older than this is dead.
    pub node_ttl_ms: u64,
    /// Nodes whose own CPU use, as a share of their cores, is at or over this take
    /// no new rooms (nor do nodes whose media plane is overloaded).
    pub max_cpu: f64,
    /// On SIGTERM, how long the node keeps serving its rooms (taking no new ones)
    /// before it tells their members to move (`left` `serverShutdown`, which the SDK
    /// answers by joining again, through any node) and exits. Kubernetes'
    /// `terminationGracePeriodSeconds` must be longer.
    pub drain_s: u64,
    /// Rooms that span nodes: once a room has this many members on its node, further
    /// members join it on another node (the least loaded), which receives each of the
    /// room's streams once from this one and serves them there. 0: the room's
    /// `max_members_per_room` (a full room spills instead of refusing).
    pub spill_members: usize,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            redis_url: String::new(),
            redis_ca_file: String::new(),
            node_id: String::new(),
            region: String::new(),
            advertise_http: String::new(),
            advertise_udp: String::new(),
            node_ca_file: String::new(),
            heartbeat_ms: 1000,
            node_ttl_ms: 5000,
            max_cpu: 0.9,
            drain_s: 0,
            spill_members: 0,
        }
    }
}

/// Which streams are recorded, and how. A stream is recorded when `all` is set, or
/// its app is in `apps`, its room in `rooms` (`"<sdk_app_id>/<room>"`), or its name
/// in `streams`. Nothing is recorded by default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordConfig {
    pub all: bool,
    pub apps: Vec<u64>,
    pub rooms: Vec<String>,
    pub streams: Vec<String>,
    /// Where files go: `<dir>/<sdk_app_id>/<stream>/<stream>-<start unix ms>.<format>`.
    pub dir: String,
    /// `flv` (Tencent's default) or `mp4` (fragmented: `ftyp`, `moov`, then a
    /// `moof`+`mdat` about every second). The REST start call may choose per stream.
    pub format: crate::record::Format,
    /// A new file at the first keyframe after this long (Tencent's default: 30 min).
    pub fragment_s: u64,
    /// Files holding less media than this are deleted, not kept.
    pub min_ms: u32,
    /// Media a recording may fall behind (a slow disk) before it skips to the next
    /// keyframe (counted in `weir_player_dropped_tags_total`).
    pub max_lag_ms: u32,
    /// Prefix of the `video_url` told to the backend
    /// (`<prefix>/<sdk_app_id>/<stream>/<file>`): where the operator serves `dir`.
    /// Empty: the file's path.
    pub url_prefix: String,
    /// The user whose userSig opens the recording REST calls (`/v1/record/...`), as
    /// Tencent's server APIs take the app administrator's.
    pub admin_user: String,
    /// An S3-compatible bucket each file is uploaded to when it closes (empty: none):
    /// `<s3_prefix><sdk_app_id>/<stream>/<file>`. `s3_endpoint` for anything but AWS
    /// (MinIO, Ceph, COS, OSS: `https://…`, or `http://…` on a private network).
    pub s3_bucket: String,
    pub s3_endpoint: String,
    pub s3_region: String,
    pub s3_access_key: String,
    pub s3_secret_key: String,
    pub s3_prefix: String,
    /// `video_url` of uploaded files: `<s3_public_url>/<key>`; empty: `s3://bucket/key`.
    pub s3_public_url: String,
    /// An upload is retried (with backoff) this long before it is given up (counted).
    pub upload_retry_s: u64,
    /// Keep the local file once uploaded.
    pub keep_local: bool,
}

impl Default for RecordConfig {
    fn default() -> Self {
        Self {
            all: false,
            apps: Vec::new(),
            rooms: Vec::new(),
            streams: Vec::new(),
            dir: "recordings".into(),
            format: crate::record::Format::Flv,
            fragment_s: 1800,
            min_ms: 1000,
            max_lag_ms: 10_000,
            url_prefix: String::new(),
            admin_user: "administrator".into(),
            s3_bucket: String::new(),
            s3_endpoint: String::new(),
            s3_region: String::new(),
            s3_access_key: String::new(),
            s3_secret_key: String::new(),
            s3_prefix: String::new(),
            s3_public_url: String::new(),
            upload_retry_s: 3600,
            keep_local: true,
        }
    }
}

impl RecordConfig {
    /// Is this stream recorded.
    pub fn applies(&self, stream: &str, sdk_app_id: u64, room: &str) -> bool {
        self.all
            || self.apps.contains(&sdk_app_id)
            || self.streams.iter().any(|s| s == stream)
            || self
                .rooms
                .iter()
                .any(|r| r.split_once('/') == Some((&sdk_app_id.to_string(), room)))
    }
}

/// Where events go: `url` for every app, or an app's own (`[[callbacks.app]]`).
/// Each event is POSTed as JSON, signed with the URL's key, retried with backoff
/// until a 2xx answer or `give_up_after_s`; at most `max_queued` wait per URL.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbacksConfig {
    pub url: String,
    pub key: String,
    #[serde(rename = "app")]
    pub apps: Vec<AppCallbacks>,
    /// One attempt's limit.
    pub timeout_ms: u64,
    pub max_queued: usize,
    /// Retry delays double from 0.5 s up to this.
    pub backoff_max_ms: u64,
    pub give_up_after_s: u64,
    /// Asked before an RTMP push (`on_publish`) or an RTMP/HTTP-FLV play (`on_play`)
    /// is let in; empty: not asked. Answers within `hook_timeout_ms`, or
    /// `hook_allow_on_timeout` decides.
    pub on_publish_url: String,
    pub on_play_url: String,
    pub hook_timeout_ms: u64,
    pub hook_allow_on_timeout: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppCallbacks {
    pub sdk_app_id: u64,
    pub url: String,
    #[serde(default)]
    pub key: String,
}

impl Default for CallbacksConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            key: String::new(),
            apps: Vec::new(),
            timeout_ms: 5000,
            max_queued: 10_000,
            backoff_max_ms: 10_000,
            give_up_after_s: 24 * 3600,
            on_publish_url: String::new(),
            on_play_url: String::new(),
            hook_timeout_ms: 2000,
            hook_allow_on_timeout: false,
        }
    }
}

impl CallbacksConfig {
    /// The URL and key for an app's events, if any.
    pub fn target(&self, sdk_app_id: u64) -> Option<(&str, &str)> {
        match self.apps.iter().find(|a| a.sdk_app_id == sdk_app_id) {
            Some(a) => Some((a.url.as_str(), a.key.as_str())),
            None => (!self.url.is_empty()).then_some((self.url.as_str(), self.key.as_str())),
        }
    }
}

/// The backend the mini program room components call (`/weapp/webrtc_room/`,
/// `/weapp/multi_room/`, `/weapp/double_room/`, `/weapp/live_room/`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomServiceConfig {
    pub enabled: bool,
    /// The app of `/weapp/webrtc_room/` (its calls name none); 0: the first `[[app]]`.
    pub sdk_app_id: u64,
    /// `webrtc_room/get_login_info` gives a userSig to anyone who asks (as Tencent's
    /// demo backend did): only for a node behind the app's own login. Development
    /// mode turns it on.
    pub issue_user_sigs: bool,
    /// `v1` (as the original backends), `v2` or `jwt`: the userSigs and
    /// privateMapKeys handed out.
    pub sig_kind: String,
    /// A pusher (a webrtc_room member) with no heartbeat this long is removed from
    /// its room, signaling included.
    pub heartbeat_timeout_s: u64,
    /// A room with nobody in it goes after this long.
    pub idle_room_s: u64,
    /// Pushers of one room (members of a webrtc_room); double rooms hold 2.
    pub max_members: usize,
    pub max_audiences: usize,
    /// Bytes of roomInfo, userName, userAvatar, userInfo and each custom field.
    pub max_field_bytes: usize,
    /// Push and play URLs handed out stay valid this long.
    pub url_validity_s: u64,
    /// userSigs and privateMapKeys handed out stay valid this long.
    pub sig_validity_s: u64,
}

impl Default for RoomServiceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            sdk_app_id: 0,
            issue_user_sigs: false,
            sig_kind: "v1".into(),
            heartbeat_timeout_s: 20,
            idle_room_s: 30,
            max_members: 4,
            max_audiences: 30,
            max_field_bytes: 1024,
            url_validity_s: 7 * 24 * 3600,
            sig_validity_s: 3600,
        }
    }
}

/// Where the server listens and how it behaves.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// HTTP: websocket signaling, metrics, health, demo page.
    pub http_addr: String,
    /// PEM certificate chain and private key: when both are set, `http_addr` serves
    /// HTTPS and WSS only (reloaded on SIGHUP or when the files change).
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// Prometheus `/metrics` (with `/healthz`, `/readyz`) on its own listener: its
    /// labels name rooms and users, so it is loopback by default. Empty: no listener.
    pub metrics_addr: String,
    /// When set, `/metrics` is also served on `http_addr` to requests that carry
    /// `Authorization: Bearer <metrics_token>`.
    pub metrics_token: String,
    /// Development mode: `/dev/credentials` hands out tokens to anyone who asks, and
    /// the log says so loudly. Only `weir serve` without a configuration file turns it
    /// on: no file or environment variable can (a file that was only meant to hold
    /// keys must not switch it on wherever it is reused), so it is never serialized,
    /// and a file's `dev_mode = true` is refused.
    #[serde(skip_serializing)]
    pub dev_mode: bool,
    /// `pretty` for people, `json` for log pipelines.
    pub log_format: String,
    /// WebRTC media for every peer arrives on this one UDP port.
    pub udp_addr: String,
    /// ICE over TCP (RFC 6544 passive), for networks that block UDP.
    pub tcp_addr: String,
    /// The addresses put into ICE candidates: what clients can reach. Behind NAT this
    /// must be the public address. Empty: every non-loopback interface address, or
    /// 127.0.0.1 when there is none. Getting this wrong is the first support problem
    /// of every SFU, so the startup log prints what is announced.
    pub announce_ips: Vec<String>,
    /// Host name or address used in play URLs (defaults to the first announced IP).
    pub public_host: String,
    /// ICE servers handed to every client (the join answer's `iceServers`, WHIP and
    /// WHEP `Link` headers): STUN URLs as they are, and TURN URLs (`turn:`/`turns:`)
    /// with short-lived credentials made from `turn_secret` (the TURN REST API
    /// scheme; coturn's `use-auth-secret` with the same `static-auth-secret`).
    pub stun_urls: Vec<String>,
    pub turn_urls: Vec<String>,
    pub turn_secret: String,
    /// How long a TURN credential handed out stays valid.
    pub turn_credential_ttl_s: u64,
    /// RTMP ingest (mini program pushers, OBS, ffmpeg) and play; empty disables it.
    /// Its port is the one named in play URLs.
    pub rtmp_addr: String,
    /// RTMPS (RTMP in TLS) ingest and play, with `tls_cert_file`/`tls_key_file`; empty
    /// (the default) disables it. Usually port 443 or 1936.
    pub rtmps_addr: String,
    /// Opus bitrate (bit/s) of AAC audio bridged to WebRTC.
    pub opus_bitrate: u32,
    /// AAC bitrate (bit/s) of Opus audio from WebRTC publishers for RTMP/FLV players.
    pub aac_bitrate: u32,
    /// RTMP media arriving this much later than it should (a backlog after a stall, or
    /// an encoder flushing its buffer) is skipped to the next keyframe.
    pub rtmp_max_lag_ms: u64,
    /// An RTMP or HTTP-FLV player that falls this far behind (media time queued) skips
    /// to the next keyframe instead of letting its latency grow.
    pub play_max_latency_ms: u32,
    /// Unsent bytes the kernel may hold per HTTP/RTMP connection (TCP_NOTSENT_LOWAT,
    /// Linux). Media a player cannot take yet must wait in Weir's queue, where latency
    /// control sees it, not in a send buffer the kernel grows to megabytes (seconds of
    /// video). Data in flight is not limited, so throughput on long paths is not
    /// either. 0 leaves the kernel's default.
    pub tcp_unsent_limit_bytes: u32,
    /// Receive and send buffer asked for the WebRTC UDP socket (the kernel caps it at
    /// net.core.rmem_max / wmem_max; the effective size is logged). A keyframe for
    /// hundreds of subscribers is a burst the default ~200 KiB cannot hold.
    pub udp_buffer_bytes: u32,
    /// The media plane's busy share (percent of a second spent working, not waiting)
    /// carrying media, above which the node counts as overloaded: new joins are
    /// refused (503) until it drops, instead of every member's media degrading.
    /// Setting connections up (offers, ICE, DTLS handshakes) is not counted, so a join
    /// storm is not refused for its own handshakes. 0 never refuses.
    pub overload_busy_percent: u8,
    /// Media workers, each a task owning the connections of the rooms placed on it
    /// (by a hash of the room); 0: one per core.
    pub media_workers: usize,
    /// A room with more members than this spreads its receiving connections over
    /// the media workers (its publishers stay on the room's worker, which mirrors
    /// their streams to the others); smaller rooms keep everything on one worker.
    pub spread_room_members: usize,
    pub max_rooms: usize,
    /// Members of one room (a class is hundreds).
    pub max_members_per_room: usize,
    /// Streams published at once in one room, and on the node: each is forwarded to
    /// everyone in its room, so publishers multiply a node's load.
    pub max_publishers_per_room: usize,
    pub max_publishers: usize,
    /// Streams one member receives at once, and subscriptions (stream × receiver) on
    /// the node: each is a forwarded copy of every packet, the node's real load.
    pub max_subscriptions_per_member: usize,
    pub max_subscriptions: usize,
    /// Open TCP connections per listener (HTTP, RTMP, ICE-TCP), in total and from one
    /// client (an IPv4 address or an IPv6 /64); more are closed at accept.
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Reverse proxies in front of Weir (addresses or networks: an ingress, a load
    /// balancer, the TLS proxy of RTMP): not held to the per-IP connection limit, and
    /// on HTTP the client is the nearest untrusted address of their `X-Forwarded-For`.
    pub trusted_proxies: Vec<String>,
    /// A client whose credentials failed this many checks within
    /// `failed_join_window_s` is refused before the next check until the window ends
    /// (each check costs an ECDSA verify). 0: no limit.
    pub max_failed_joins_per_ip: u32,
    pub failed_join_window_s: u64,
    /// Per-subscriber bandwidth estimation (transport-wide CC, REMB as a fallback),
    /// pausing videos a subscriber's link cannot carry, and per-room targets for
    /// publishers. Off: everything is forwarded to everyone, as a plain SFU.
    pub congestion_control: bool,
    /// How rooms weigh their subscribers unless their creator chose (`weakest`: the
    /// publisher sends what the worst link can carry; `majority`: what a strict
    /// majority can carry, the others fall back to audio).
    pub congestion_policy: weir_signaling::CongestionPolicy,
    /// Video bitrate bounds (bit/s) of publishers that do not send their own
    /// (`minBitrate`/`maxBitrate` in `publish`), and of RTMP pushers.
    pub publisher_min_bitrate: u32,
    pub publisher_max_bitrate: u32,
    /// The audio packet length (ms) asked of WebRTC publishers in the answer to their
    /// offer (`a=ptime`); Chrome's Opus encoder follows it. 10 ms packets took 12–26 ms
    /// off the audio a viewer hears from a Chrome publisher, and 30–40 ms off its video,
    /// which Chrome holds back to play in step with the audio (BENCHMARKS.md, "Glass to
    /// glass with sound"), for twice the audio packets (50 more a second per stream and
    /// receiver, about 25 kbit/s of headers). 20 is Chrome's own choice; 0 asks nothing.
    pub publisher_audio_ptime_ms: u32,
    /// Seconds a signaling session may stay silent before it is closed (clients ping).
    pub signaling_idle_timeout_s: u64,
    /// Messages a signaling session may send per second (bursts of twice this); more
    /// are refused with `limitExceeded` and not acted on.
    pub signaling_messages_per_s: u32,
    /// Room text messages a member may send per second (bursts of twice this): each
    /// is copied to everyone in the room, so one member's flood is everyone's load.
    pub text_messages_per_s: u32,
    /// Seconds given to sessions to drain on SIGTERM.
    pub shutdown_grace_s: u64,
    /// A peer that sends no authenticated packet (ICE check, SRTP, SRTCP) this long is
    /// "disconnected" (logged; its media goes on)…
    pub ice_disconnected_timeout_ms: u64,
    /// …and this much longer, "failed": its member is removed and the room told. A
    /// connection that has not connected this long (both together) after its
    /// negotiation fails too.
    pub ice_failed_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            http_addr: "0.0.0.0:8080".into(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            metrics_addr: "127.0.0.1:9100".into(),
            metrics_token: String::new(),
            dev_mode: false,
            log_format: "pretty".into(),
            udp_addr: "0.0.0.0:7882".into(),
            tcp_addr: "0.0.0.0:7881".into(),
            announce_ips: Vec::new(),
            public_host: String::new(),
            stun_urls: Vec::new(),
            turn_urls: Vec::new(),
            turn_secret: String::new(),
            turn_credential_ttl_s: 86_400,
            rtmp_addr: "0.0.0.0:1935".into(),
            rtmps_addr: String::new(),
            opus_bitrate: 64_000,
            aac_bitrate: 128_000,
            rtmp_max_lag_ms: 400,
            play_max_latency_ms: 500,
            tcp_unsent_limit_bytes: 16 * 1024,
            udp_buffer_bytes: 4 * 1024 * 1024,
            overload_busy_percent: 90,
            media_workers: 0,
            spread_room_members: 16,
            max_rooms: 1000,
            max_members_per_room: 500,
            max_publishers_per_room: 50,
            max_publishers: 1000,
            max_subscriptions_per_member: 100,
            max_subscriptions: 20_000,
            max_connections: 10_000,
            max_connections_per_ip: 256,
            trusted_proxies: Vec::new(),
            max_failed_joins_per_ip: 20,
            failed_join_window_s: 60,
            congestion_control: true,
            congestion_policy: weir_signaling::CongestionPolicy::Weakest,
            publisher_min_bitrate: 100_000,
            publisher_max_bitrate: 2_500_000,
            publisher_audio_ptime_ms: 10,
            signaling_idle_timeout_s: 30,
            signaling_messages_per_s: 50,
            text_messages_per_s: 5,
            shutdown_grace_s: 5,
            ice_disconnected_timeout_ms: 5_000,
            ice_failed_timeout_ms: 10_000,
        }
    }
}

/// One app: what verifies and issues its credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppConfig {
    pub sdk_app_id: u64,
    /// v2 (HMAC-SHA256) SDKSecretKey.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key: Option<String>,
    /// v1 (ECDSA) public key, PEM `BEGIN PUBLIC KEY`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key_pem: Option<String>,
    /// v1 private key for issuing, PKCS#8 or SEC1 PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_pem: Option<String>,
    /// JWT verifying keys, PEM: P-256 (ES256), RSA (RS256 unless `alg` says RS384,
    /// RS512, PS256, PS384, PS512) or Ed25519 (EdDSA).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt_keys: Vec<JwtKeyConfig>,
    /// JWT verifying keys as a JWKS document (`{"keys": [...]}`, as identity providers
    /// publish them), each with its `kid`: EC P-256, RSA or Ed25519; no `oct` keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// ES256 JWT signing keys (the first one issues).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt_private_keys: Vec<JwtPrivateKeyConfig>,
    /// Hotlink-protection key for push URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_push_key: Option<String>,
    /// Hotlink-protection key for play URLs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_play_key: Option<String>,
    /// How long a play URL stays valid after its `txTime`.
    #[serde(default)]
    pub play_url_validity_s: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKeyConfig {
    pub kid: String,
    pub public_key_pem: String,
    /// The algorithm of an RSA key (RS256 by default); EC and Ed25519 keys have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtPrivateKeyConfig {
    pub kid: String,
    pub private_key_pem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid configuration: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The SDKAppID of the generated development app.
pub const DEV_SDK_APP_ID: u64 = 1_400_000_000;

impl Config {
    /// Parses a TOML document.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::from_toml(&text, path)?;
        for file in std::mem::take(&mut config.app_files) {
            let file = path.parent().unwrap_or(Path::new(".")).join(&file);
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct AppsFile {
                #[serde(default, rename = "app")]
                apps: Vec<AppConfig>,
            }
            let text = std::fs::read_to_string(&file).map_err(|source| ConfigError::Read {
                path: file.clone(),
                source,
            })?;
            let more: AppsFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: file.clone(),
                message: e.to_string(),
            })?;
            config.apps.extend(more.apps);
        }
        if config.server.dev_mode {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: "dev_mode cannot be set in a file: development mode is `weir serve` \
                          without --config (it hands out tokens to anyone); delete the line"
                    .into(),
            });
        }
        Ok(config)
    }

    /// Defaults plus one development app with freshly generated keys, on loopback
    /// only (as LiveKit's `--dev`): the node hands out tokens to anyone who can reach
    /// it. `bind` puts every listener on another address instead.
    pub fn development(bind: Option<&str>) -> Self {
        let host = bind.unwrap_or("127.0.0.1");
        let at = |port: u16| match host.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
            _ => format!("{host}:{port}"),
        };
        let loopback = host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
        Self {
            server: ServerConfig {
                dev_mode: true,
                http_addr: at(8080),
                udp_addr: at(7882),
                tcp_addr: at(7881),
                rtmp_addr: at(1935),
                // A loopback listener is reached at loopback.
                announce_ips: if loopback {
                    vec![host.to_owned()]
                } else {
                    Vec::new()
                },
                ..ServerConfig::default()
            },
            apps: vec![crate::auth::AppKeys::generate_config(DEV_SDK_APP_ID)],
            app_files: Vec::new(),
            room_service: RoomServiceConfig::default(),
            record: RecordConfig::default(),
            callbacks: CallbacksConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("configuration always serializes")
    }

    pub fn write(&self, path: &Path) -> Result<(), ConfigError> {
        std::fs::write(path, self.to_toml()).map_err(|source| ConfigError::Write {
            path: path.to_owned(),
            source,
        })
    }

    /// Applies `WEIR_<KEY>` overrides to the `[server]` table.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        let vars: Vec<(String, String)> = vars.into_iter().collect();
        // `WEIR_CLUSTER_*` first: the `[server]` table has no key starting `cluster_`.
        self.cluster = overridden(&self.cluster, "WEIR_CLUSTER_", &vars)?;
        self.server = overridden(&self.server, "WEIR_", &vars)?;
        Ok(())
    }
}

/// `table` with each of its keys that `vars` names as `{prefix}{KEY}` replaced (the
/// value read as TOML, else as a string).
fn overridden<T: Clone + Serialize + serde::de::DeserializeOwned>(
    table: &T,
    prefix: &str,
    vars: &[(String, String)],
) -> Result<T, ConfigError> {
    let mut t = toml::Table::try_from(table).expect("config tables serialize");
    let keys: Vec<String> = t.keys().cloned().collect();
    let mut changed = false;
    for (var, value) in vars {
        let Some(key) = var.strip_prefix(prefix) else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        if !keys.contains(&key) {
            continue;
        }
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        t.insert(key, parsed);
        changed = true;
    }
    if !changed {
        return Ok(table.clone());
    }
    toml::Value::Table(t)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Env {
            var: format!("{prefix}*"),
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn development_config_round_trips_through_toml_without_development_mode() {
        let dev = Config::development(None);
        assert!(dev.server.dev_mode);
        let text = dev.to_toml();
        assert!(!text.contains("dev_mode"), "{text}");
        let again = Config::from_toml(&text, Path::new("x")).unwrap();
        assert_eq!(again.apps, dev.apps);
        assert!(
            !again.server.dev_mode,
            "the keys file does not switch it on"
        );
        crate::auth::Keyring::from_configs(&again.apps).unwrap();
    }

    /// Before, `weir-dev.toml` said `dev_mode = true`, so a server started with it
    /// (anywhere it was copied) handed out 0xff tokens at /dev/credentials.
    #[test]
    fn no_file_or_variable_switches_development_mode_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weir.toml");
        std::fs::write(&path, "[server]\ndev_mode = true\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("dev_mode") && err.contains("weir.toml"),
            "{err}"
        );
        let mut c = Config {
            server: ServerConfig::default(),
            apps: Vec::new(),
            app_files: Vec::new(),
            room_service: RoomServiceConfig::default(),
            record: RecordConfig::default(),
            callbacks: CallbacksConfig::default(),
            cluster: ClusterConfig::default(),
        };
        c.apply_env([("WEIR_DEV_MODE".to_string(), "true".to_string())])
            .unwrap();
        assert!(!c.server.dev_mode);
    }

    #[test]
    fn development_mode_listens_on_loopback_unless_told() {
        let dev = Config::development(None);
        for addr in [
            &dev.server.http_addr,
            &dev.server.udp_addr,
            &dev.server.tcp_addr,
            &dev.server.rtmp_addr,
        ] {
            assert!(addr.starts_with("127.0.0.1:"), "{addr}");
        }
        assert_eq!(dev.server.announce_ips, vec!["127.0.0.1".to_string()]);
        let open = Config::development(Some("0.0.0.0"));
        assert_eq!(open.server.http_addr, "0.0.0.0:8080");
        assert!(open.server.announce_ips.is_empty());
    }

    #[test]
    fn env_overrides_server_keys_only() {
        let mut c = Config::development(None);
        c.apply_env([
            ("WEIR_HTTP_ADDR".to_string(), "127.0.0.1:9999".to_string()),
            ("WEIR_CONGESTION_CONTROL".to_string(), "false".to_string()),
            ("WEIR_UNRELATED".to_string(), "x".to_string()),
            ("HOME".to_string(), "/root".to_string()),
        ])
        .unwrap();
        assert_eq!(c.server.http_addr, "127.0.0.1:9999");
        assert!(!c.server.congestion_control);
        let err = c
            .apply_env([(
                "WEIR_CONGESTION_CONTROL".to_string(),
                "\"maybe\"".to_string(),
            )])
            .unwrap_err();
        assert!(err.to_string().contains("WEIR_"), "{err}");
    }

    #[test]
    fn apps_may_come_from_their_own_files() {
        let dir = tempfile::tempdir().unwrap();
        let app = crate::auth::AppKeys::generate_config(1_400_000_001);
        let mut one = toml::Table::new();
        one.insert(
            "app".into(),
            toml::Value::Array(vec![toml::Value::try_from(&app).unwrap()]),
        );
        std::fs::write(dir.path().join("apps.toml"), toml::to_string(&one).unwrap()).unwrap();
        let main = dir.path().join("weir.toml");
        std::fs::write(&main, "app_files = [\"apps.toml\"]\n[server]\n").unwrap();
        let c = Config::load(&main).unwrap();
        assert_eq!(c.apps, vec![app]);
        std::fs::write(dir.path().join("apps.toml"), "[server]\n").unwrap();
        let err = Config::load(&main).unwrap_err().to_string();
        assert!(err.contains("apps.toml"), "{err}");
    }

    #[test]
    fn env_overrides_cluster_keys_with_their_own_prefix() {
        let mut c = Config::development(None);
        c.apply_env([
            (
                "WEIR_CLUSTER_REDIS_URL".to_string(),
                "redis://10.0.0.2:6379".to_string(),
            ),
            ("WEIR_CLUSTER_NODE_ID".to_string(), "weir-0".to_string()),
            ("WEIR_CLUSTER_HEARTBEAT_MS".to_string(), "500".to_string()),
        ])
        .unwrap();
        assert_eq!(c.cluster.redis_url, "redis://10.0.0.2:6379");
        assert_eq!(c.cluster.node_id, "weir-0");
        assert_eq!(c.cluster.heartbeat_ms, 500);
        assert_eq!(c.cluster.node_ttl_ms, 5000);
    }

    #[test]
    fn unknown_keys_are_refused_with_the_path() {
        let err =
            Config::from_toml("[server]\nhttp_adr = \"x\"", Path::new("weir.toml")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("weir.toml") && text.contains("http_adr"),
            "{text}"
        );
    }
}
