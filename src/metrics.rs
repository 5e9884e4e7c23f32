//! Prometheus metrics: one registry per server, passed around (no globals), rendered
//! at `/metrics` in the text format.
//!
//! Names follow `weir_<what>_<unit>`; every event a user may ask about ("why did my
//! join fail?", "why is this stream black?") has a counter or gauge here.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The `direction` label of `weir_congestion_layer_switches_total`.
const SWITCH_DIRECTIONS: [&str; 3] = ["pause", "resume", "layer"];

/// The reasons `weir_peer_connections_lost_total` counts.
pub const PEER_LOSSES: [&str; 3] = ["never_connected", "went_silent", "failed"];

pub struct Metrics {
    registry: Registry,
    pub rooms: IntGauge,
    pub participants: IntGauge,
    /// Join attempts by outcome (`ok`, `invalid_user_sig`, `invalid_private_map_key`,
    /// `missing_privilege`, `limit`, `bad_request`).
    pub joins: IntCounterVec,
    /// Signaling messages received, by `type` (`invalid` for unparsable frames).
    pub signaling_messages: IntCounterVec,
    /// Refusals sent to clients, by error code.
    pub signaling_errors: IntCounterVec,
    /// Mini program room-service calls, by room `kind` and `outcome` (`ok`, `auth`,
    /// `bad_request`, `full`, `refused`).
    pub room_service_calls: IntCounterVec,
    /// Room-service pushers and webrtc_room members removed because their
    /// heartbeats stopped.
    pub room_service_expired: prometheus::IntCounter,
    /// Requests refused because a node or room limit was reached, by `limit` (`rooms`,
    /// `members_per_room`, `publishers_per_room`, `publishers`,
    /// `subscriptions_per_member`, `subscriptions`, `text_bytes`).
    pub limit_refusals: IntCounterVec,
    /// Subscriptions (stream × receiver) on the node.
    pub subscriptions: IntGauge,
    /// Tasks alive on the server's runtime, read at each scrape.
    pub tasks: IntGauge,
    /// Share of the last second the media plane spent working (percent), whether it
    /// counts as overloaded (1: joins refused), and datagrams the kernel dropped on its
    /// UDP socket because Weir did not read them in time.
    pub media_busy_percent: IntGauge,
    pub media_overloaded: IntGauge,
    pub udp_receive_drops: prometheus::IntCounter,
    /// This node in a cluster: 1, labelled with its id and region.
    pub node_info: IntGaugeVec,
    /// Whether the last heartbeat reached Redis, and the live nodes it read.
    pub cluster_redis_up: IntGauge,
    pub cluster_nodes: IntGauge,
    pub cluster_heartbeat_failures: prometheus::IntCounter,
    /// Where joins, pushes and plays of rooms went: `local`, `remote` (relayed to the
    /// room's node), `refused` (no node takes rooms), `redis_down` (served here).
    pub cluster_routes: IntCounterVec,
    /// Rooms another node serves as well (placed twice while Redis was unreachable).
    pub cluster_room_conflicts: prometheus::IntCounter,
    /// Signaling sessions and RTMP connections relayed to another node now, by `kind`.
    pub cluster_relays: IntGaugeVec,
    /// Live-room stage messages (linkMic) the room service let through, by `action`.
    pub link_mic: IntCounterVec,
    /// Sessions closed because they could not keep up with their outgoing messages.
    pub slow_sessions: IntGauge,
    /// Signaling messages refused by a session's rate limit, by `type`.
    pub rate_limited: IntCounterVec,
    /// Room text messages not delivered to a recipient whose queue was nearly full.
    pub text_dropped: prometheus::IntCounter,
    pub peer_connections: IntGauge,
    /// Peer connections the media plane removed, by why: `never_connected` (ICE and
    /// DTLS did not complete in time), `went_silent` (nothing authenticated heard),
    /// `failed` (the connection failed or the peer closed DTLS).
    pub peers_lost: IntCounterVec,
    pub published_tracks: IntGaugeVec,
    pub subscribed_tracks: IntGaugeVec,
    pub rtp_packets: IntCounterVec,
    pub rtp_bytes: IntCounterVec,
    pub nacks: IntCounterVec,
    pub plis: IntCounterVec,
    /// Publisher sender reports relayed (translated) to subscribers.
    pub sender_reports: prometheus::IntCounter,
    /// Arrival of a publisher's packet to its send to a subscriber.
    pub forward_latency: Histogram,
    /// System calls that sent forwarded copies (several equal datagrams to one address
    /// go in one with UDP GSO), and copies the socket refused (its buffer full).
    pub udp_send_calls: prometheus::IntCounter,
    pub udp_send_drops: prometheus::IntCounter,
    /// RTMP message read → its RTP handed to the kernel, by kind.
    pub bridge_latency: HistogramVec,
    /// Bridged frames by kind and what happened to them.
    pub bridge_frames: IntCounterVec,
    /// Media an RTMP pusher sends that cannot be bridged, by kind.
    pub bridge_refused: IntCounterVec,
    pub bridge_audio_reanchors: prometheus::IntCounter,
    /// New subscribers of bridged streams started from the cached GOP.
    pub gop_replays: prometheus::IntCounter,
    /// RTMP connections by role, and publish/play attempts by outcome.
    pub rtmp_connections: IntGaugeVec,
    pub rtmp_requests: IntCounterVec,
    /// WHIP publish requests by outcome (and resources deleted).
    pub whip_requests: IntCounterVec,
    /// WHEP play requests by outcome.
    pub whep_requests: IntCounterVec,
    /// Streams being recorded now; files closed by `outcome` (`kept`, `discarded`
    /// for under the minimum, `failed` for a write error); bytes written.
    pub recordings: IntGauge,
    pub record_files: IntCounterVec,
    pub record_bytes: prometheus::IntCounter,
    /// Uploads of recording files by `outcome` (`ok`, `retried`: attempts that failed
    /// and were tried again, `failed`: given up).
    pub record_uploads: IntCounterVec,
    /// Callbacks to the customer's backend by `event` and `outcome` (`delivered`,
    /// `failed_attempt`, `dropped_full`, `expired`), and events queued now.
    pub callbacks: IntCounterVec,
    pub callbacks_queued: IntGauge,
    /// `on_publish`/`on_play` answers by `action` and `outcome` (`allowed`, `refused`,
    /// `timeout_allowed`, `timeout_refused`).
    pub admission_hooks: IntCounterVec,
    /// Bridged packets dropped because the media plane's queue was full.
    pub bridge_queue_drops: prometheus::IntCounter,
    /// RTMP and HTTP-FLV players by protocol, play requests by outcome, and FLV tags
    /// dropped by latency control (a slow player skipped to the next keyframe), by stream.
    pub players: IntGaugeVec,
    pub play_requests: IntCounterVec,
    pub player_dropped_tags: IntCounterVec,
    /// RTP packets a converter to FLV could not take (its queue was full).
    pub tap_drops: prometheus::IntCounter,
    /// WebRTC→FLV conversion: frames by kind and outcome, and how long video takes to
    /// come back after a loss (gap given up → next keyframe out).
    pub flv_frames: IntCounterVec,
    pub flv_loss_recovery: Histogram,
    /// Congestion control: subscribers' estimates, paused videos and pause/resume
    /// switches by room, state changes by room and state, probes, publisher targets.
    pub bwe_estimate: Histogram,
    pub subscriber_rtt: Histogram,
    pub congestion_paused: IntGaugeVec,
    pub congestion_switches: IntCounterVec,
    pub congestion_states: IntCounterVec,
    pub bwe_probes: IntCounterVec,
    pub padding_bytes: prometheus::IntCounter,
    pub publisher_target: HistogramVec,
    pub remb_sent: prometheus::IntCounter,
    /// Active simulcast layers received, over all streams.
    pub simulcast_layers: IntGauge,
    /// Open TCP connections by listener, and connections refused at accept by
    /// listener and reason (`total`, `per_ip`).
    pub connections: IntGaugeVec,
    pub connections_refused: IntCounterVec,
    /// Joins refused before their credentials were checked: their IP failed too often.
    pub joins_throttled: prometheus::IntCounter,
    /// Messages from the media plane to the control task dropped because its backlog
    /// was full (should stay 0: it holds 65,536).
    pub control_backlog_drops: prometheus::IntCounter,
    /// Entries of the media plane's demultiplexer, by index (`addr`, `ufrag`).
    pub demux_entries: IntGaugeVec,
    /// Media workers, each one's busy share, and datagrams that reached one worker's
    /// socket for a connection of another: handed over, or dropped on a full queue.
    pub media_workers: IntGauge,
    pub media_worker_busy_percent: IntGaugeVec,
    /// Of which setting connections up (offers, answers, ICE and DTLS handshakes):
    /// not counted as overload.
    pub media_worker_setup_percent: IntGaugeVec,
    pub handoffs: prometheus::IntCounter,
    pub handoff_drops: prometheus::IntCounter,
    /// Packets of a stream for another worker's subscribers (a room spread over the
    /// workers) dropped because that worker's queue was full.
    pub mirror_drops: prometheus::IntCounter,
    /// Streams mirrored on a worker other than their room's (summed over workers).
    pub media_mirrors: IntGauge,
    /// Supervised tasks (media, control, accept loops) that died, by part.
    pub task_failures: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let forward_latency = Histogram::with_opts(
            HistogramOpts::new(
                "weir_forward_latency_seconds",
                "Time from a publisher's RTP packet arriving to its last copy leaving for a subscriber (once per forwarded packet)",
            )
            .buckets(vec![
                0.000_01, 0.000_02, 0.000_03, 0.000_05, 0.000_07, 0.000_1, 0.000_15, 0.000_2,
                0.000_3, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(forward_latency.clone()))
            .expect("unique metric");
        let counter = |name: &str, help: &str| {
            let c = prometheus::IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let bridge_latency = HistogramVec::new(
            HistogramOpts::new(
                "weir_bridge_latency_seconds",
                "RTMP message read from the socket to its RTP packets' last copy handed to the kernel, \
                 including AAC decode, resampling and Opus encode (not the wait for a whole \
                 20 ms Opus frame)",
            )
            .buckets(vec![
                0.000_05, 0.000_1, 0.000_2, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05,
                0.1, 0.25,
            ]),
            &["kind"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(bridge_latency.clone()))
            .expect("unique metric");
        let flv_loss_recovery = Histogram::with_opts(
            HistogramOpts::new(
                "weir_flv_loss_recovery_seconds",
                "WebRTC→FLV video after a loss: from giving up on the gap to the next keyframe",
            )
            .buckets(vec![
                0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(flv_loss_recovery.clone()))
            .expect("unique metric");
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let rates = vec![
            50e3, 100e3, 200e3, 300e3, 500e3, 750e3, 1e6, 1.5e6, 2e6, 3e6, 5e6, 10e6,
        ];
        let publisher_target = HistogramVec::new(
            HistogramOpts::new(
                "weir_publisher_target_bps",
                "What rooms ask publishers to send (bit/s), by room policy",
            )
            .buckets(rates.clone()),
            &["policy"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(publisher_target.clone()))
            .expect("unique metric");
        Self {
            bwe_estimate: histogram(
                "weir_bwe_estimate_bps",
                "Subscribers' downlink estimates (bit/s), sampled every second",
                rates,
            ),
            subscriber_rtt: histogram(
                "weir_subscriber_rtt_seconds",
                "Round-trip time to subscribers, from their receiver reports",
                vec![0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0],
            ),
            congestion_paused: gauge_vec(
                "weir_congestion_paused_videos",
                "Videos paused for subscribers whose links cannot carry them, by room",
                &["room"],
            ),
            congestion_switches: counter_vec(
                "weir_congestion_layer_switches_total",
                "Video allocation changes for subscribers (pause, resume), by room",
                &["room", "direction"],
            ),
            congestion_states: counter_vec(
                "weir_congestion_state_changes_total",
                "Subscribers entering a congestion state (normal, warning, congested), by room",
                &["room", "state"],
            ),
            bwe_probes: counter_vec(
                "weir_bwe_probes_total",
                "Padding probes for headroom while a video is paused, by outcome",
                &["outcome"],
            ),
            padding_bytes: counter(
                "weir_bwe_padding_bytes_total",
                "Bytes of padding sent by probes",
            ),
            publisher_target,
            remb_sent: counter(
                "weir_remb_sent_total",
                "REMB messages sent to publishers with their room's target",
            ),
            simulcast_layers: gauge(
                "weir_simulcast_layers",
                "Active simulcast layers received from publishers, over all streams",
            ),
            flv_loss_recovery,
            flv_frames: counter_vec(
                "weir_flv_frames_total",
                "WebRTC→FLV conversion: frames by kind and outcome (converted, dropped_loss, before_first_keyframe, concealed)",
                &["kind", "outcome"],
            ),
            udp_send_calls: counter(
                "weir_udp_send_calls_total",
                "System calls that sent forwarded RTP copies (a run of equal datagrams to one address is one call with UDP GSO)",
            ),
            udp_send_drops: counter(
                "weir_udp_send_drops_total",
                "Forwarded RTP copies the UDP socket or an ICE-TCP writer refused (buffer or queue full)",
            ),
            tap_drops: counter(
                "weir_flv_conversion_queue_drops_total",
                "RTP packets dropped on the way to a WebRTC→FLV conversion (its queue was full)",
            ),
            players: gauge_vec(
                "weir_players",
                "RTMP and HTTP-FLV players, by protocol",
                &["protocol"],
            ),
            play_requests: counter_vec(
                "weir_play_requests_total",
                "RTMP and HTTP-FLV play requests, by protocol and outcome",
                &["protocol", "outcome"],
            ),
            player_dropped_tags: counter_vec(
                "weir_player_dropped_tags_total",
                "FLV tags dropped because a player fell behind (it resumes at the next keyframe), by stream",
                &["stream"],
            ),
            bridge_latency,
            bridge_frames: counter_vec(
                "weir_bridge_frames_total",
                "RTMP frames bridged to WebRTC, by kind and outcome (forwarded, \
                 b_frame_dropped, b_frame_reference_forwarded, skipped_lag)",
                &["kind", "outcome"],
            ),
            bridge_refused: counter_vec(
                "weir_bridge_refused_total",
                "RTMP media that cannot be bridged (codec, profile, malformed), by kind",
                &["kind"],
            ),
            bridge_audio_reanchors: counter(
                "weir_bridge_audio_reanchors_total",
                "Times bridged audio timestamps were re-anchored to a drifting source clock",
            ),
            gop_replays: counter(
                "weir_bridge_gop_replays_total",
                "New subscribers of RTMP streams started from the cached GOP",
            ),
            rtmp_connections: gauge_vec(
                "weir_rtmp_connections",
                "Open RTMP connections by role (handshake, publish, play)",
                &["role"],
            ),
            rtmp_requests: counter_vec(
                "weir_rtmp_requests_total",
                "RTMP publish and play requests by outcome",
                &["request", "outcome"],
            ),
            whip_requests: counter_vec(
                "weir_whip_requests_total",
                "WHIP publish requests by outcome (ok, unauthorized, refused, bad_request, unavailable) and resources deleted",
                &["outcome"],
            ),
            whep_requests: counter_vec(
                "weir_whep_requests_total",
                "WHEP play requests by outcome (ok, unauthorized, refused, bad_request, unavailable)",
                &["outcome"],
            ),
            recordings: gauge(
                "weir_recordings",
                "Streams being recorded now",
            ),
            record_files: counter_vec(
                "weir_record_files_total",
                "Recording files closed by outcome (kept, discarded: under the minimum length, failed: a write error)",
                &["outcome"],
            ),
            record_bytes: counter(
                "weir_record_bytes_total",
                "Bytes written to recording files",
            ),
            record_uploads: counter_vec(
                "weir_record_uploads_total",
                "Recording file uploads to the bucket by outcome (ok, retried, failed)",
                &["outcome"],
            ),
            callbacks: counter_vec(
                "weir_callbacks_total",
                "Callbacks to the backend by event and outcome (delivered, failed_attempt, dropped_full, expired)",
                &["event", "outcome"],
            ),
            admission_hooks: counter_vec(
                "weir_admission_hooks_total",
                "on_publish/on_play hook answers by action and outcome (allowed, refused, timeout_allowed, timeout_refused)",
                &["action", "outcome"],
            ),
            callbacks_queued: gauge(
                "weir_callbacks_queued",
                "Callback events waiting for delivery",
            ),
            bridge_queue_drops: counter(
                "weir_bridge_queue_drops_total",
                "Bridged packets dropped because the media plane's queue was full",
            ),
            connections: gauge_vec(
                "weir_connections",
                "Open TCP connections by listener (http, rtmp, ice_tcp)",
                &["listener"],
            ),
            connections_refused: counter_vec(
                "weir_connections_refused_total",
                "TCP connections closed at accept, by listener and the limit hit (total, per_ip)",
                &["listener", "reason"],
            ),
            joins_throttled: counter(
                "weir_joins_throttled_total",
                "Joins refused without checking their credentials: their client IP failed \
                 too many checks recently",
            ),
            control_backlog_drops: counter(
                "weir_control_backlog_drops_total",
                "Messages from the media plane to the control task (SDP, errors, peers gone) \
                 dropped because the backlog waiting for its queue was full",
            ),
            demux_entries: gauge_vec(
                "weir_demux_entries",
                "Entries of the media plane's demultiplexer, by index (addr: transport \
                 addresses, ufrag: ICE usernames)",
                &["index"],
            ),
            media_workers: gauge(
                "weir_media_workers",
                "Media workers (one per core by default; a room's connections live on one)",
            ),
            media_worker_busy_percent: gauge_vec(
                "weir_media_worker_busy_percent",
                "Share of the last second each media worker spent working, not waiting",
                &["worker"],
            ),
            media_worker_setup_percent: gauge_vec(
                "weir_media_worker_setup_percent",
                "Of that share, the part spent setting connections up (offers, answers, ICE \
                 and DTLS handshakes), which does not count toward overload",
                &["worker"],
            ),
            handoffs: counter(
                "weir_media_handoffs_total",
                "Datagrams that reached one media worker's socket for a connection another \
                 worker owns, handed over to it",
            ),
            handoff_drops: counter(
                "weir_media_handoff_drops_total",
                "Datagrams for another media worker's connection dropped because its queue \
                 was full",
            ),
            mirror_drops: counter(
                "weir_media_mirror_drops_total",
                "Packets of a stream for another media worker's subscribers (a room spread \
                 over the workers) dropped because that worker's queue was full",
            ),
            media_mirrors: gauge(
                "weir_media_mirrors",
                "Streams a media worker receives from their room's worker for its own \
                 subscribers (a room spread over the workers), summed over workers",
            ),
            task_failures: counter_vec(
                "weir_task_failures_total",
                "Supervised tasks that panicked or stopped while the node was serving, by part \
                 (the node then fails its health checks)",
                &["part"],
            ),
            rooms: gauge("weir_rooms", "Rooms on this node"),
            participants: gauge("weir_participants", "Participants on this node"),
            joins: counter_vec("weir_joins_total", "Join attempts by outcome", &["outcome"]),
            signaling_messages: counter_vec(
                "weir_signaling_messages_total",
                "Signaling messages received, by type",
                &["type"],
            ),
            room_service_calls: counter_vec(
                "weir_room_service_calls_total",
                "Mini program room-service calls, by room kind and outcome",
                &["kind", "outcome"],
            ),
            room_service_expired: counter(
                "weir_room_service_expired_total",
                "Room-service pushers removed because their heartbeats stopped",
            ),
            limit_refusals: counter_vec(
                "weir_limit_refusals_total",
                "Requests refused because a node or room limit was reached, by limit",
                &["limit"],
            ),
            subscriptions: gauge(
                "weir_subscriptions",
                "Subscriptions (stream x receiver) on this node",
            ),
            tasks: gauge(
                "weir_tasks",
                "Tasks alive on the server's async runtime (read at each scrape)",
            ),
            media_busy_percent: gauge(
                "weir_media_busy_percent",
                "Share of the last second the busiest media worker spent working, not waiting",
            ),
            media_overloaded: gauge(
                "weir_media_overloaded",
                "1 while the media plane cannot keep up (busy over overload_busy_percent, \
                 or the kernel dropping its datagrams): joins are refused",
            ),
            node_info: gauge_vec(
                "weir_node_info",
                "This node of a cluster (1), by its id and region",
                &["node_id", "region"],
            ),
            cluster_redis_up: gauge(
                "weir_cluster_redis_up",
                "1 when this node's last heartbeat reached Redis",
            ),
            cluster_nodes: gauge(
                "weir_cluster_nodes",
                "Live nodes of the cluster, as this node last read them",
            ),
            cluster_heartbeat_failures: counter(
                "weir_cluster_heartbeat_failures_total",
                "Heartbeats that did not reach Redis",
            ),
            cluster_routes: counter_vec(
                "weir_cluster_routes_total",
                "Where room joins, pushes and plays went: local, remote (relayed to the room's node), refused (no node takes rooms), redis_down (served here); and members of rooms that spill from their node: edge (served here, the room relayed from its node), edge_elsewhere (sent to the node that carries it)",
                &["route"],
            ),
            cluster_room_conflicts: counter(
                "weir_cluster_room_conflicts_total",
                "Heartbeats that found a room of this node mapped to another node",
            ),
            cluster_relays: gauge_vec(
                "weir_cluster_relays",
                "Connections relayed to the node serving their room now, by kind (signaling, rtmp), \
                 and rooms this node carries for another node's room (edge)",
                &["kind"],
            ),
            udp_receive_drops: counter(
                "weir_udp_receive_drops_total",
                "Datagrams the kernel dropped on the WebRTC UDP socket: its buffer was full \
                 because the media plane did not read in time",
            ),
            link_mic: counter_vec(
                "weir_link_mic_total",
                "Live-room stage messages (linkMic) passed on, by action",
                &["action"],
            ),
            signaling_errors: counter_vec(
                "weir_signaling_errors_total",
                "Errors sent to clients, by code",
                &["code"],
            ),
            rate_limited: counter_vec(
                "weir_signaling_rate_limited_total",
                "Signaling messages refused because their session sent too many, by type",
                &["type"],
            ),
            text_dropped: counter(
                "weir_text_messages_dropped_total",
                "Room text messages not delivered to a member whose outgoing queue was \
                 nearly full (the member stays; its room events still go out)",
            ),
            slow_sessions: gauge(
                "weir_slow_sessions_closed",
                "Signaling sessions closed because their outgoing queue was full",
            ),
            peer_connections: gauge(
                "weir_peer_connections",
                "WebRTC peer connections (publisher and subscriber) on this node",
            ),
            peers_lost: counter_vec(
                "weir_peer_connections_lost_total",
                "Peer connections removed by the media plane, by why (never_connected: ICE and \
                 DTLS did not complete in time; went_silent: nothing authenticated heard; \
                 failed: the connection failed or the peer closed DTLS)",
                &["why"],
            ),
            published_tracks: gauge_vec(
                "weir_published_tracks",
                "Tracks being published, by kind",
                &["kind"],
            ),
            subscribed_tracks: gauge_vec(
                "weir_subscribed_tracks",
                "Tracks being forwarded to subscribers, by kind",
                &["kind"],
            ),
            rtp_packets: counter_vec(
                "weir_rtp_packets_total",
                "RTP packets, by direction (in/out) and kind",
                &["direction", "kind"],
            ),
            rtp_bytes: counter_vec(
                "weir_rtp_bytes_total",
                "RTP payload bytes, by direction (in/out) and kind",
                &["direction", "kind"],
            ),
            nacks: counter_vec(
                "weir_nacks_total",
                "NACKs from subscribers (received), the packets they asked for (packets_requested), and requests not honoured because that packet was resent too often or too recently (packets_suppressed)",
                &["event"],
            ),
            plis: counter_vec(
                "weir_plis_total",
                "Keyframe requests: received from subscribers (from_subscriber), sent to publishers \
                 (to_publisher), sent to the node a relayed stream comes from (to_origin)",
                &["direction"],
            ),
            sender_reports: {
                let c = prometheus::IntCounter::new(
                    "weir_sender_reports_relayed_total",
                    "Publisher RTCP sender reports translated and sent to subscribers (lip-sync)",
                )
                .expect("valid metric");
                registry.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            forward_latency,
            registry,
        }
        .init_fixed()
    }

    /// Fixed label sets exist from the start, at zero.
    fn init_fixed(self) -> Self {
        for kind in ["audio", "video"] {
            let _ = self.published_tracks.with_label_values(&[kind]);
            let _ = self.subscribed_tracks.with_label_values(&[kind]);
        }
        for why in PEER_LOSSES {
            let _ = self.peers_lost.with_label_values(&[why]);
        }
        self
    }

    /// A room publishes: its congestion series exist from now on, at zero, so "no
    /// switches" reads as 0 rather than as a missing series.
    pub fn init_room(&self, room: &str) {
        let _ = self.congestion_paused.with_label_values(&[room]);
        for d in SWITCH_DIRECTIONS {
            let _ = self.congestion_switches.with_label_values(&[room, d]);
        }
    }

    /// A room is gone: its labelled series go too (label sets stay bounded).
    pub fn forget_room(&self, room: &str) {
        let _ = self.congestion_paused.remove_label_values(&[room]);
        for d in SWITCH_DIRECTIONS {
            let _ = self.congestion_switches.remove_label_values(&[room, d]);
        }
        for s in ["normal", "warning", "congested"] {
            let _ = self.congestion_states.remove_label_values(&[room, s]);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
