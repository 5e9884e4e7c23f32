//! One `rtc` peer connection and what Weir tracks about it: the tracks it receives
//! (publisher side) and the tracks it sends (subscriber side, one per forwarded
//! publisher track, each with its own SSRC).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use rtc::interceptor::{Attribute, Interceptor, Packet, Registry, Slot, StreamInfo, TaggedPacket};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::interceptor_registry::{
    configure_nack, configure_simulcast_extension_headers, configure_twcc_receiver_only,
};
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::event::{RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{
    CandidateConfig, CandidateHostConfig, RTCIceCandidate, RTCIceCandidateInit,
};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::{
    RTCRtpReceiverId, RTCRtpSenderId, RTCRtpTransceiverDirection, RTCRtpTransceiverInit,
};
use rtc::sansio::Protocol;
use rtc::shared::error::Error as RtcError;
use rtc::shared::marshal::MarshalSize;
use tracing::debug;
use weir_signaling::{IceCandidate, Kind, Target};

use crate::metrics::Metrics;
use crate::room::SessionId;

use super::forward::{
    carries_sps, codec_compatible, idr_after_its_parameter_sets, keyframe_dimensions, kind_label,
    starts_keyframe, Rewriter,
};
use crate::congestion::{Allocator, SharedEstimator};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey(pub SessionId, pub Target);

/// A track a publisher sends us.
struct Uptrack {
    kind: Kind,
    receiver_id: RTCRtpReceiverId,
    ssrc: u32,
    codec: Option<RTCRtpCodec>,
    /// Simulcast: each layer's SSRC and rid, as their first packets opened them.
    layers: Vec<(u32, String)>,
    /// Simulcast: each layer's picture size, from its latest keyframe.
    sizes: HashMap<u32, (u32, u32)>,
    /// H.264: the sequence number of each SSRC's latest packet with an SPS.
    params_at: HashMap<u32, u16>,
}

/// A track we send a subscriber: one publisher track, rewritten.
struct Downtrack {
    sender_id: RTCRtpSenderId,
    track_id: String,
    rewriter: Rewriter,
    payload_type: Option<u8>,
    /// What the publisher sends.
    codec: RTCRtpCodec,
    mime: String,
    fmtp: String,
    /// No compatible codec was negotiated (logged once).
    refused: bool,
    /// Video withheld for lack of bandwidth (the allocator's decision).
    pub paused: bool,
    /// Resumed: forward from the next keyframe.
    await_keyframe: bool,
    /// Its first packet since it can carry media was seen (and, if not a keyframe, the
    /// publisher asked for one at once: see [`Peer::keyframe_now`]).
    started: bool,
    /// The subscriber has answered an offer with this downtrack's m-section: until
    /// then nothing is sent on it (the subscriber would drop it, and its payload type
    /// is not known yet).
    negotiated: bool,
    /// It is in the offer the subscriber is answering now.
    offered: bool,
    /// The simulcast layer wanted (0 = lowest; `None`: the top one), and the
    /// publisher SSRC being forwarded now.
    layer: Option<usize>,
    forwarding: Option<u32>,
}

/// Notes that a downtrack of `stream_id` waits for a keyframe (allocating only the
/// first time: this runs for every packet dropped while waiting).
fn want_keyframe(wanted: &mut HashSet<String>, stream_id: &str) {
    if !wanted.contains(stream_id) {
        wanted.insert(stream_id.to_owned());
    }
}

/// What one pass over a peer's outputs found.
#[derive(Default)]
pub struct Drained {
    pub failed: bool,
    /// A publisher track's codec became known (subscribers can now get it).
    pub track_ready: bool,
    /// Media from a publisher, when it arrived, and `Some(false)` where it looks
    /// like a keyframe's start but is not one (an IDR after its parameter sets).
    pub media: Vec<(Kind, rtc::rtp::Packet, Instant, Option<bool>)>,
    /// Keyframe requests from a subscriber, by (stream id, kind).
    pub keyframe_requests: Vec<(String, Kind)>,
    /// Sender reports of this publisher's tracks, by kind.
    pub sender_reports: Vec<(Kind, SenderReport)>,
    /// Kinds of publisher tracks that started flowing, and that ended.
    pub published: Vec<Kind>,
    pub unpublished: Vec<Kind>,
    /// The subscriber's own estimate (REMB), bit/s.
    pub remb: Option<f64>,
}

/// What the subscriber's receiver reports say about our packets to it.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReceiverStats {
    /// Fraction lost in the latest report (of any of its downtracks), 0..=1.
    pub loss: f64,
    /// Round-trip time from the latest report answering one of our sender reports.
    pub rtt: Option<std::time::Duration>,
    pub reports: u64,
}

/// Congestion state of a subscriber connection.
pub struct Congestion {
    pub estimator: SharedEstimator,
    pub allocator: Allocator,
    /// The subscriber's REMB, and when it came (the fallback without TWCC).
    pub remb: Option<(f64, Instant)>,
    pub receiver: ReceiverStats,
    /// Media bytes sent to it since the last tick.
    pub sent_bytes: u64,
    /// What it was last told (state, paused and lowered streams), and when.
    pub told: Option<(
        weir_signaling::CongestionLevel,
        Vec<String>,
        Vec<String>,
        Instant,
    )>,
    /// Our sender reports: their compact NTP time and when each left, for RTT.
    sr_sent: VecDeque<(u32, Instant)>,
}

/// A downtrack's key, `(stream id, kind)`, looked up from a borrowed stream id: the
/// forwarding path asks for a downtrack per copy, and building a `String` key for each
/// was two allocations per forwarded copy.
trait TrackKey {
    fn parts(&self) -> (&str, Kind);
}

impl TrackKey for (String, Kind) {
    fn parts(&self) -> (&str, Kind) {
        (&self.0, self.1)
    }
}

impl TrackKey for (&str, Kind) {
    fn parts(&self) -> (&str, Kind) {
        (self.0, self.1)
    }
}

impl<'a> std::borrow::Borrow<dyn TrackKey + 'a> for (String, Kind) {
    fn borrow(&self) -> &(dyn TrackKey + 'a) {
        self
    }
}

// Hashes as `(String, Kind)` does (a `str`, then the kind), so either finds the other.
impl std::hash::Hash for dyn TrackKey + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.parts().hash(state);
    }
}

impl PartialEq for dyn TrackKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn TrackKey + '_ {}

pub struct Peer {
    pub key: PeerKey,
    pub pc: RTCPeerConnection,
    /// Every ICE ufrag this connection has announced (a restart adds one): the
    /// demultiplexer finds the connection by any of them.
    pub ufrags: Vec<String>,
    pub addrs: Vec<(rtc::shared::TransportProtocol, SocketAddr)>,
    uptracks: HashMap<String, Uptrack>,
    downtracks: super::FastMap<(String, Kind), Downtrack>,
    /// DTLS is up: packets written now reach the peer (earlier ones would be dropped).
    connected: bool,
    /// A local offer is waiting for its answer.
    negotiating: bool,
    /// Something changed while negotiating: offer again after the answer.
    pending: bool,
    /// Subscriber connections: the estimate and the allocation (congestion control on).
    pub congestion: Option<Congestion>,
    /// Streams whose video this subscriber waits to start at a keyframe (a resume, a
    /// layer switch): the media task keeps asking their publishers, throttled.
    pub keyframe_wanted: HashSet<String>,
    /// A new downtrack saw its first packet, not a keyframe: the media task asks the
    /// publisher now, unthrottled, and clears this. Asking when the subscriber
    /// subscribes is too early: the keyframe would arrive before its connection can
    /// carry it, and the throttle would then hold the next request back.
    pub keyframe_now: bool,
    /// Which downtracks' NACKs go unanswered (paused ones), shared with the chain.
    paused_ssrcs: super::nack_guard::PausedSsrcs,
    /// The estimate the chain's retransmissions are bounded by (subscribers).
    pub rtx_budget: super::nack_guard::RetransmissionBudget,
    /// Whether the peer is still there, judged on every authenticated packet.
    pub liveness: Liveness,
    /// Subscriber transceivers whose stream left, by kind: the next stream of that
    /// kind reuses one (its m-section) instead of adding another.
    free: Vec<(Kind, RTCRtpSenderId)>,
    /// The client offered this connection (WHEP): nothing is offered to it.
    pub answer_mode: bool,
    /// The deadline this connection has in the media plane's timer heap, if any.
    pub timer: Option<Instant>,
    /// Subscriber connections: their send side, through which a forwarded copy goes
    /// straight to SRTP instead of through the interceptor chain.
    send: Option<super::send_side::SendHandle>,
}

/// One subscriber's downtrack of one stream, with what sending on it touches
/// ([`Peer::forward_to`]).
pub struct Forwarding<'a> {
    key: PeerKey,
    stream_id: &'a str,
    kind: Kind,
    d: &'a mut Downtrack,
    pc: &'a mut RTCPeerConnection,
    send: Option<&'a super::send_side::SendHandle>,
    keyframe_wanted: &'a mut HashSet<String>,
    keyframe_now: &'a mut bool,
    congestion: Option<&'a mut Congestion>,
}

impl Forwarding<'_> {
    /// Negotiated and nothing sent on it yet: a new subscriber's downtrack.
    pub fn fresh(&self) -> bool {
        self.d.negotiated && self.d.rewriter.packets == 0
    }

    /// The next datagram written on the connection, without a sweep.
    pub fn poll_write_ready(&mut self) -> Option<rtc::shared::TaggedBytesMut> {
        self.pc.poll_write_ready()
    }

    /// Sends a publisher's packet on this downtrack. True if it went out.
    pub fn send(
        &mut self,
        packet: &rtc::rtp::Packet,
        keyframe: Option<bool>,
        layers: &[u32],
        now: Instant,
    ) -> bool {
        let (stream_id, kind) = (self.stream_id, self.kind);
        let d = &mut *self.d;
        if d.paused {
            return false;
        }
        if !d.negotiated {
            if d.await_keyframe {
                want_keyframe(self.keyframe_wanted, stream_id);
            }
            return false;
        }
        if d.await_keyframe && !d.started {
            d.started = true;
            if keyframe.or_else(|| starts_keyframe(&d.mime, &packet.payload)) != Some(true) {
                *self.keyframe_now = true;
            }
        }
        if kind == Kind::Video && !layers.is_empty() {
            // Simulcast: forward one layer; change layers only at a keyframe of the
            // one wanted, so the subscriber's decoder never sees a layer start mid-GOP.
            let want = layers[d.layer.unwrap_or(usize::MAX).min(layers.len() - 1)];
            let ssrc = packet.header.ssrc;
            if d.forwarding.is_some_and(|f| !layers.contains(&f)) {
                d.forwarding = None; // that layer stopped
            }
            if d.forwarding != Some(want) {
                want_keyframe(self.keyframe_wanted, stream_id);
            }
            if Some(ssrc) != d.forwarding {
                if ssrc != want {
                    return false;
                }
                let key = keyframe.or_else(|| starts_keyframe(&d.mime, &packet.payload));
                if key == Some(false) {
                    return false;
                }
                if d.forwarding.is_some() || layers.len() > 1 {
                    tracing::info!(
                        key = ?self.key,
                        stream_id,
                        from = ?d.forwarding,
                        to = ssrc,
                        layer = d.layer,
                        ?layers,
                        "simulcast layer forwarded from its keyframe"
                    );
                }
                d.forwarding = Some(ssrc);
                d.await_keyframe = false;
                self.keyframe_wanted.remove(stream_id);
            }
        }
        if d.await_keyframe {
            let key = keyframe.or_else(|| starts_keyframe(&d.mime, &packet.payload));
            if key == Some(false) {
                want_keyframe(self.keyframe_wanted, stream_id);
                return false;
            }
            d.await_keyframe = false;
            self.keyframe_wanted.remove(stream_id);
        }
        let Some(mut sender) = self.pc.rtp_sender(d.sender_id) else {
            return false;
        };
        if d.payload_type.is_none() && !d.refused {
            let codecs = &sender.get_parameters().rtp_parameters.codecs;
            d.payload_type = codecs
                .iter()
                .find(|c| {
                    c.rtp_codec.sdp_fmtp_line == d.codec.sdp_fmtp_line
                        && codec_compatible(&d.codec, &c.rtp_codec)
                })
                .or_else(|| {
                    codecs
                        .iter()
                        .find(|c| codec_compatible(&d.codec, &c.rtp_codec))
                })
                .map(|c| c.payload_type);
        }
        let Some(pt) = d.payload_type else {
            if !d.refused {
                // Never forward into a black screen: say why instead.
                d.refused = true;
                tracing::warn!(
                    key = ?self.key,
                    stream_id,
                    codec = %d.mime,
                    fmtp = %d.fmtp,
                    "subscriber negotiated no compatible codec for this stream; not forwarding it"
                );
            }
            return false;
        };
        let Some(mut out) = d.rewriter.rewrite(packet, pt) else {
            return false; // late, behind a probe's padding
        };
        let bytes = out.payload.len() as u64 + 12;
        // A subscriber's copy is already what `RTCRtpSender::write_rtp` checks for (its
        // sender's SSRC, a negotiated payload type, no extension but the TWCC number
        // the send side adds): it is prepared by the send side here and goes straight
        // to SRTP, past the chain's queues and `rtc`'s per-packet statistics, which
        // Weir does not read. (`vendor/rtc/WEIR-PATCH.md`.)
        let res = match self.send {
            Some(send) => {
                send.prepare(&mut out, now);
                self.pc.write_rtp_protected(now, &out)
            }
            None => sender.write_rtp(now, out),
        };
        if let Err(e) = &res {
            tracing::trace!(key = ?self.key, error = %e, ?kind, "forwarded packet not written");
        }
        let ok = res.is_ok();
        if ok {
            if let Some(c) = self.congestion.as_deref_mut() {
                c.sent_bytes += bytes;
            }
        }
        ok
    }
}

pub(super) fn to_kind(k: RtpCodecKind) -> Option<Kind> {
    match k {
        RtpCodecKind::Audio => Some(Kind::Audio),
        RtpCodecKind::Video => Some(Kind::Video),
        _ => None,
    }
}

fn from_kind(k: Kind) -> RtpCodecKind {
    match k {
        Kind::Audio => RtpCodecKind::Audio,
        Kind::Video => RtpCodecKind::Video,
    }
}

/// The codecs Weir accepts from publishers and offers subscribers: what it can forward
/// and start at a keyframe. Opus only for audio (G.722 and G.711 would be accepted
/// and then reach no one); VP8 and H.264 (Constrained Baseline, Baseline and High,
/// packetization modes 1 and 0), each with RTX, for video.
pub(super) fn register_codecs(engine: &mut MediaEngine) -> Result<(), RtcError> {
    use rtc::peer_connection::configuration::media_engine::{
        MIME_TYPE_H264, MIME_TYPE_OPUS, MIME_TYPE_RTX, MIME_TYPE_VP8,
    };
    use rtc::rtp_transceiver::rtp_sender::{RTCPFeedback, RTCRtpCodecParameters};
    let codec = |mime: &str, clock_rate, channels, fmtp: &str, feedback, payload_type| {
        RTCRtpCodecParameters {
            rtp_codec: RTCRtpCodec {
                mime_type: mime.to_owned(),
                clock_rate,
                channels,
                sdp_fmtp_line: fmtp.to_owned(),
                rtcp_feedback: feedback,
            },
            payload_type,
        }
    };
    engine.register_codec(
        codec(
            MIME_TYPE_OPUS,
            48_000,
            2,
            "minptime=10;useinbandfec=1",
            vec![],
            111,
        ),
        RtpCodecKind::Audio,
    )?;
    let feedback: Vec<RTCPFeedback> = [
        ("goog-remb", ""),
        ("ccm", "fir"),
        ("nack", ""),
        ("nack", "pli"),
    ]
    .iter()
    .map(|(typ, parameter)| RTCPFeedback {
        typ: (*typ).to_owned(),
        parameter: (*parameter).to_owned(),
    })
    .collect();
    let h264 = |mode: u8, profile: &str| {
        format!("level-asymmetry-allowed=1;packetization-mode={mode};profile-level-id={profile}")
    };
    let video = [
        (MIME_TYPE_VP8, String::new(), 96, 97),
        (MIME_TYPE_H264, h264(1, "42001f"), 102, 103),
        (MIME_TYPE_H264, h264(0, "42001f"), 127, 104),
        (MIME_TYPE_H264, h264(1, "42e01f"), 125, 105),
        (MIME_TYPE_H264, h264(0, "42e01f"), 108, 109),
        (MIME_TYPE_H264, h264(1, "640032"), 123, 124),
    ];
    for (mime, fmtp, pt, rtx) in video {
        engine.register_codec(
            codec(mime, 90_000, 0, &fmtp, feedback.clone(), pt),
            RtpCodecKind::Video,
        )?;
        engine.register_codec(
            codec(MIME_TYPE_RTX, 90_000, 0, &format!("apt={pt}"), vec![], rtx),
            RtpCodecKind::Video,
        )?;
    }
    Ok(())
}

/// Our SDP as a client of any stack needs it, from the one rtc generated: our
/// candidates and `end-of-candidates` in every m-section, not only the first of the
/// BUNDLE group (legal, but stacks that look at another section find none and never
/// start ICE), without the RTCP-component copies (RTCP is muxed), and
/// `a=msid-semantic` in every description (rtc leaves it out of a first offer, and
/// stacks that need it then ignore `a=msid`). If it does not parse, it is sent as it is.
pub fn complete_sdp(sdp: &str) -> String {
    use rtc::sdp::description::common::Attribute;
    use rtc::sdp::description::session::SessionDescription;
    let Ok(mut d) = SessionDescription::unmarshal(&mut std::io::Cursor::new(sdp.as_bytes())) else {
        return sdp.to_owned();
    };
    if !d.attributes.iter().any(|a| a.key == "msid-semantic") {
        d.attributes.push(Attribute {
            key: "msid-semantic".into(),
            value: Some("WMS *".into()),
        });
    }
    // A candidate's component is its second field: `candidate:<foundation> <component> …`.
    let rtp_component =
        |a: &Attribute| a.value.as_deref().and_then(|v| v.split_whitespace().nth(1)) == Some("1");
    let mut candidates: Vec<String> = Vec::new();
    for a in d
        .media_descriptions
        .iter()
        .flat_map(|m| m.attributes.iter())
    {
        if let (true, Some(v)) = (a.key == "candidate" && rtp_component(a), &a.value) {
            if !candidates.contains(v) {
                candidates.push(v.clone());
            }
        }
    }
    if candidates.is_empty() {
        return d.marshal();
    }
    for m in &mut d.media_descriptions {
        if m.media_name.port.value == 0 {
            continue; // rejected or stopped: no transport
        }
        m.attributes
            .retain(|a| a.key != "candidate" && a.key != "end-of-candidates");
        m.attributes.extend(candidates.iter().map(|c| Attribute {
            key: "candidate".into(),
            value: Some(c.clone()),
        }));
        m.attributes.push(Attribute {
            key: "end-of-candidates".into(),
            value: None,
        });
    }
    d.marshal()
}

/// `sdp` with `a=ptime:<ms>` in each audio m-section that carries media: how long
/// an audio packet should be (RFC 8866 §6.4). Chrome's Opus encoder reads it from the
/// remote description and sends packets of that length (20 ms without it).
pub fn with_audio_ptime(sdp: &str, ms: u32) -> String {
    use rtc::sdp::description::common::Attribute;
    use rtc::sdp::description::session::SessionDescription;
    let Ok(mut d) = SessionDescription::unmarshal(&mut std::io::Cursor::new(sdp.as_bytes())) else {
        return sdp.to_owned();
    };
    for m in &mut d.media_descriptions {
        if m.media_name.media != "audio" || m.media_name.port.value == 0 {
            continue;
        }
        m.attributes.retain(|a| a.key != "ptime");
        m.attributes.push(Attribute {
            key: "ptime".into(),
            value: Some(ms.to_string()),
        });
    }
    d.marshal()
}

/// The kinds an SDP offer *sends* (m-sections that are sendrecv or sendonly and not
/// rejected): what a publisher asks to publish. Read with rtc-sdp, the parser rtc
/// applies the offer with; an offer it cannot parse sends nothing.
pub fn offered_send_kinds(sdp: &str) -> Vec<Kind> {
    use rtc::sdp::description::session::SessionDescription;
    let Ok(d) = SessionDescription::unmarshal(&mut std::io::Cursor::new(sdp.as_bytes())) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for m in &d.media_descriptions {
        let kind = match m.media_name.media.as_str() {
            "audio" => Kind::Audio,
            "video" => Kind::Video,
            _ => continue,
        };
        let sends = m.media_name.port.value != 0
            && !m
                .attributes
                .iter()
                .any(|a| a.key == "recvonly" || a.key == "inactive");
        if sends && !out.contains(&kind) {
            out.push(kind);
        }
    }
    out
}

/// What a connection that receives media carries: a NACK generator, a TWCC receiver
/// and receiver reports.
pub(super) fn with_receiving_interceptors(registry: Registry) -> Registry {
    registry
        .with(
            Slot::NackGenerator,
            rtc::interceptor::NackGeneratorBuilder::new().build(),
        )
        .with(
            Slot::TwccReceiver,
            rtc::interceptor::TwccReceiverBuilder::new().build(),
        )
        .with(
            Slot::ReceiverReport,
            rtc::interceptor::ReceiverReportBuilder::new().build(),
        )
}

/// The codec a receiver's packets of payload type `pt` carry, as negotiated.
pub(super) fn negotiated_codec(
    pc: &mut RTCPeerConnection,
    receiver: RTCRtpReceiverId,
    pt: u8,
) -> Option<RTCRtpCodec> {
    pc.rtp_receiver(receiver).and_then(|mut r| {
        r.get_parameters()
            .rtp_parameters
            .codecs
            .iter()
            .find(|c| c.payload_type == pt)
            .map(|c| c.rtp_codec.clone())
    })
}

/// Gives `pc` a UDP host candidate at `addr`.
pub(super) fn add_udp_host_candidate(
    pc: &mut RTCPeerConnection,
    addr: SocketAddr,
) -> Result<(), RtcError> {
    let candidate = CandidateHostConfig {
        base_config: CandidateConfig {
            network: "udp".to_owned(),
            address: addr.ip().to_string(),
            port: addr.port(),
            component: 1,
            ..Default::default()
        },
        ..Default::default()
    }
    .new_candidate_host()?;
    pc.add_local_candidate(RTCIceCandidate::from(&candidate).to_json()?)
}

/// Watches inbound RTCP: counts NACKs (the chain's responder answers them from its
/// packet cache) and hands keyframe requests (PLI, FIR) to the application; without
/// that mark, inbound RTCP never leaves the chain.
pub struct RtcpTap {
    reads: VecDeque<TaggedPacket>,
    writes: VecDeque<TaggedPacket>,
    counters: Option<(prometheus::IntCounter, prometheus::IntCounter)>,
    /// Stamped with every RTCP packet read (it decrypted: SRTCP authenticated it).
    heard: Option<Heard>,
    /// Also deliver sender reports (the server translates publishers' SRs; clients
    /// may want to look at the ones they receive).
    sender_reports: bool,
}

impl RtcpTap {
    /// A tap that delivers keyframe requests and, if asked, sender reports.
    pub fn new(sender_reports: bool) -> Self {
        Self {
            reads: VecDeque::new(),
            writes: VecDeque::new(),
            counters: None,
            heard: None,
            sender_reports,
        }
    }

    /// Counts NACKs, stamps liveness, and marks what the application must see.
    pub(super) fn inspect(&self, msg: &mut TaggedPacket) {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            if let Some(h) = &self.heard {
                h.at(msg.now);
            }
            if let Some((nacks, nacked_packets)) = &self.counters {
                for nack in packets
                    .iter()
                    .filter_map(|p| p.as_any().downcast_ref::<TransportLayerNack>())
                {
                    nacks.inc();
                    let lost: u32 = nack
                        .nacks
                        .iter()
                        .map(|p| 1 + p.lost_packets.count_ones())
                        .sum();
                    nacked_packets.inc_by(u64::from(lost));
                }
            }
            let wanted = packets.iter().any(|p| {
                p.as_any().downcast_ref::<PictureLossIndication>().is_some()
                    || p.as_any().downcast_ref::<FullIntraRequest>().is_some()
                    || (self.sender_reports && p.as_any().downcast_ref::<SenderReport>().is_some())
                    || p.as_any()
                        .downcast_ref::<ReceiverEstimatedMaximumBitrate>()
                        .is_some()
                    || p.as_any().downcast_ref::<ReceiverReport>().is_some()
            });
            if wanted {
                msg.message.add(Attribute::DeliverToApplication);
            }
        }
    }
}

/// When a connection last heard from its peer, shared by the connection and its
/// chain's tap: milliseconds after an epoch, so the tap can stamp it without a lock.
#[derive(Clone)]
pub struct Heard {
    epoch: Instant,
    ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Heard {
    fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            ms: Default::default(),
        }
    }

    fn at(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.ms.fetch_max(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.epoch
            + std::time::Duration::from_millis(self.ms.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// Whether a peer is still there (RFC 7675: any authenticated packet from it shows it
/// is: an ICE check that passed its integrity check, SRTP or SRTCP that decrypted).
/// STUN checks alone are not enough: stacks send them every 4-6 s (aioice) to 2.5 s
/// (libwebrtc) while media flows; judging by them, a connection looked dead between
/// two checks and its media was cut.
#[derive(Clone)]
pub struct Liveness {
    heard: Heard,
    /// When checks could start (our side of the negotiation is applied).
    checking_since: Option<Instant>,
    connected_once: bool,
    /// Silence, or connecting, longer than this: the peer is gone.
    limit: std::time::Duration,
}

impl Liveness {
    pub fn new(now: Instant, limit: std::time::Duration) -> Self {
        Self {
            heard: Heard::new(now),
            checking_since: None,
            connected_once: false,
            limit,
        }
    }

    pub fn heard(&self, now: Instant) {
        self.heard.at(now);
    }

    pub fn checking(&mut self, now: Instant) {
        self.checking_since.get_or_insert(now);
    }

    pub fn connected(&mut self) {
        self.connected_once = true;
    }

    /// Why the peer counts as gone at `now`, if it does: what the log says, and the
    /// label `weir_peer_connections_lost_total` counts it under.
    pub fn gone(&self, now: Instant) -> Option<(&'static str, &'static str)> {
        if self.connected_once {
            (now.saturating_duration_since(self.heard.last()) > self.limit)
                .then_some(("nothing authenticated heard from the peer", "went_silent"))
        } else {
            self.checking_since
                .filter(|since| now.saturating_duration_since(*since) > self.limit)
                .map(|_| ("ICE and DTLS did not connect", "never_connected"))
        }
    }
}

/// The slot the tap takes in an interceptor registry.
pub const RTCP_TAP_SLOT: usize = 14_000;

impl Protocol<TaggedPacket, TaggedPacket, ()> for RtcpTap {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = RtcError;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), RtcError> {
        self.inspect(&mut msg);
        self.reads.push_back(msg);
        Ok(())
    }
    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.reads.pop_front()
    }
    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), RtcError> {
        self.writes.push_back(msg);
        Ok(())
    }
    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.writes.pop_front()
    }
    fn handle_timeout(&mut self, _now: Instant) -> Result<(), RtcError> {
        Ok(())
    }
    fn poll_timeout(&mut self) -> Option<Instant> {
        None
    }
}

impl Interceptor for RtcpTap {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

impl Peer {
    pub fn new(
        key: PeerKey,
        config: &super::MediaConfig,
        metrics: &Metrics,
    ) -> Result<Self, RtcError> {
        let announce = &config.announce;
        // No fixed ICE credentials: rtc draws them, and draws new ones on an ICE
        // restart (RFC 8445 wants both sides' to change; a client that sees ours
        // unchanged does not restart). The ufrags are read back from each local
        // description for the demultiplexer.
        // rtc judges ICE liveness on STUN checks alone; it reports "disconnected"
        // after `ice_disconnected` without one (logged, nothing else), and never
        // "failed" (zero): `Liveness` decides that, on any authenticated packet.
        let settings = SettingEngineBuilder::new()
            .with_lite(true)
            .with_ice_timeouts(
                Some(config.ice_disconnected),
                Some(std::time::Duration::ZERO),
                None,
            )
            .build();
        let liveness = Liveness::new(Instant::now(), config.ice_disconnected + config.ice_failed);
        let mut media_engine = MediaEngine::default();
        register_codecs(&mut media_engine)?;
        let tap = RtcpTap {
            counters: Some((
                metrics.nacks.with_label_values(&["received"]),
                metrics.nacks.with_label_values(&["packets_requested"]),
            )),
            heard: Some(liveness.heard.clone()),
            ..RtcpTap::new(true)
        };
        let paused_ssrcs = super::nack_guard::PausedSsrcs::default();
        let rtx_budget = super::nack_guard::RetransmissionBudget::default();
        // What both directions advertise in their SDP: NACK and PLI feedback, the
        // simulcast and transport-wide CC extensions (the interceptors those helpers
        // would add are chosen below, so theirs are dropped).
        let _ = configure_nack(Registry::new(), &mut media_engine);
        configure_simulcast_extension_headers(&mut media_engine)?;
        let _ = configure_twcc_receiver_only(Registry::new(), &mut media_engine)?;
        // Each connection carries the interceptors of its own direction only: every
        // packet is moved through every interceptor of the chain (a copy in and out of
        // each one's queue). No SR generator on either: a subscriber's SRs must come
        // from the publisher's clock (Chrome lip-syncs from them), and we write those
        // ourselves; two SR sources would contradict each other.
        // What estimates a subscriber's downlink: its transport-wide CC feedback on
        // every packet we number. No pacer: a pacing queue per subscriber would hold
        // media back; the allocator lowers what is sent instead.
        let congestion =
            (key.1 == Target::Subscriber && config.congestion_control).then(|| Congestion {
                estimator: SharedEstimator::new(5_000_000.0, 50_000.0, 20_000_000.0),
                allocator: Allocator::new(),
                remb: None,
                receiver: ReceiverStats::default(),
                sent_bytes: 0,
                told: None,
                sr_sent: VecDeque::new(),
            });
        // A publisher connection only receives: the tap and the receiving interceptors.
        // A subscriber connection only sends: its whole send side (packet cache and
        // guarded NACK answers, TWCC numbering, the send history the estimator reads,
        // the tap) is one interceptor, so a forwarded copy passes one queue, not six.
        let (registry, send) = match key.1 {
            Target::Publisher | Target::Screen => (
                with_receiving_interceptors(Registry::new().with(Slot::from(RTCP_TAP_SLOT), tap)),
                None,
            ),
            Target::Subscriber => {
                let side = super::send_side::SendSide::new(
                    super::nack_guard::NackGuard::new(
                        Some(metrics.nacks.with_label_values(&["packets_suppressed"])),
                        paused_ssrcs.clone(),
                        rtx_budget.clone(),
                    ),
                    tap,
                    congestion.as_ref().map(|c| c.estimator.clone()),
                );
                let send = side.handle();
                (
                    Registry::new().with(Slot::from(super::send_side::SEND_SIDE_SLOT), side),
                    Some(send),
                )
            }
        };
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_setting_engine(settings)
            .with_media_engine(media_engine)
            .with_interceptor_registry(registry)
            .build(Instant::now())?;
        for addr in announce {
            add_udp_host_candidate(&mut pc, *addr)?;
        }
        if let Some(tcp_port) = config.tcp_port {
            for addr in announce {
                let candidate = CandidateHostConfig {
                    base_config: CandidateConfig {
                        network: "tcp".to_owned(),
                        address: addr.ip().to_string(),
                        port: tcp_port,
                        component: 1,
                        ..Default::default()
                    },
                    tcp_type: rtc::ice::tcp_type::TcpType::Passive,
                }
                .new_candidate_host()?;
                pc.add_local_candidate(RTCIceCandidate::from(&candidate).to_json()?)?;
            }
        }
        // No more candidates will come: an ICE-lite server has exactly these.
        pc.add_local_candidate(RTCIceCandidateInit::default())?;
        Ok(Self {
            key,
            pc,
            ufrags: Vec::new(),
            addrs: Vec::new(),
            uptracks: HashMap::new(),
            downtracks: super::FastMap::default(),
            connected: false,
            negotiating: false,
            pending: false,
            congestion,
            paused_ssrcs,
            rtx_budget,
            keyframe_wanted: HashSet::new(),
            keyframe_now: false,
            liveness,
            free: Vec::new(),
            answer_mode: false,
            timer: None,
            send,
        })
    }

    /// Restarts ICE on our side (a subscriber connection whose client lost its path):
    /// the next offer carries new credentials.
    pub fn restart_ice(&mut self) {
        self.pc.restart_ice();
        self.pending = true;
    }

    /// Notes the ufrag of our current local description; true if it is a new one.
    pub fn learn_ufrag(&mut self) -> bool {
        let Some(sdp) = self.pc.local_description().map(|d| d.sdp) else {
            return false;
        };
        let Some(ufrag) = sdp
            .lines()
            .find_map(|l| l.trim().strip_prefix("a=ice-ufrag:"))
            .map(str::to_owned)
        else {
            return false;
        };
        if self.ufrags.contains(&ufrag) {
            return false;
        }
        self.ufrags.push(ufrag);
        true
    }

    /// Applies a publisher's offer and returns our answer, asking for audio packets of
    /// `audio_ptime_ms` when given.
    pub fn answer(&mut self, sdp: String, audio_ptime_ms: Option<u32>) -> Result<String, RtcError> {
        let now = Instant::now();
        self.pc
            .set_remote_description(now, RTCSessionDescription::offer(sdp)?)?;
        let answer = self.pc.create_answer(None)?;
        self.pc.set_local_description(now, answer)?;
        self.liveness.checking(now);
        self.pc
            .local_description()
            .map(|d| complete_sdp(&d.sdp))
            .map(|s| match audio_ptime_ms {
                Some(ms) => with_audio_ptime(&s, ms),
                None => s,
            })
            .ok_or(RtcError::ErrPeerConnLocalDescriptionNil)
    }

    pub fn accept_answer(&mut self, sdp: String) -> Result<(), RtcError> {
        self.pc
            .set_remote_description(Instant::now(), RTCSessionDescription::answer(sdp)?)?;
        self.liveness.checking(Instant::now());
        self.negotiating = false;
        for d in self.downtracks.values_mut() {
            d.payload_type = None; // re-read what was negotiated
            d.refused = false;
            d.negotiated |= d.offered;
        }
        Ok(())
    }

    pub fn add_remote_candidate(&mut self, c: IceCandidate) {
        let init = RTCIceCandidateInit {
            candidate: c.candidate,
            sdp_mid: c.sdp_mid,
            sdp_mline_index: c.sdp_m_line_index,
            username_fragment: c.username_fragment,
            ..Default::default()
        };
        if let Err(e) = self.pc.add_remote_candidate(init) {
            debug!(key = ?self.key, error = %e, "remote candidate refused");
        }
    }

    /// This publisher's simulcast video layers: SSRC and rid.
    pub fn video_layer_rids(&self) -> Vec<(u32, String)> {
        self.uptracks
            .values()
            .filter(|t| t.kind == Kind::Video)
            .flat_map(|t| t.layers.iter().cloned())
            .collect()
    }

    /// The publisher SSRC a subscriber's video downtrack of `stream_id` forwards now.
    pub fn forwarding(&self, stream_id: &str) -> Option<u32> {
        self.downtracks
            .get(&(stream_id.to_owned(), Kind::Video))
            .filter(|d| !d.paused)
            .and_then(|d| d.forwarding)
    }

    /// The SSRCs of this publisher's simulcast video layers (empty without simulcast).
    pub fn video_layers(&self) -> Vec<u32> {
        self.uptracks
            .values()
            .filter(|t| t.kind == Kind::Video)
            .flat_map(|t| t.layers.iter().map(|(s, _)| *s))
            .collect()
    }

    /// The picture size of this publisher's simulcast layer `ssrc`, once a keyframe
    /// of it showed one.
    pub fn layer_size(&self, ssrc: u32) -> Option<(u32, u32)> {
        self.uptracks
            .values()
            .find_map(|t| t.sizes.get(&ssrc).copied())
    }

    /// The codec of this publisher's track of `kind`, once media has shown it.
    pub fn track_codec(&self, kind: Kind) -> Option<RTCRtpCodec> {
        self.uptracks
            .values()
            .find(|t| t.kind == kind)
            .and_then(|t| t.codec.clone())
    }

    /// Everything the connection produced since the last call, except datagrams.
    pub fn drain(&mut self) -> Drained {
        let mut out = Drained::default();
        while let Some(event) = self.pc.poll_event() {
            tracing::trace!(key = ?self.key, ?event, "peer event");
            match event {
                RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => {
                    debug!(key = ?self.key, %state, "connection state");
                    // "Disconnected" (no STUN check for a while) changes nothing: media
                    // goes on while `Liveness` hears the peer.
                    match state {
                        RTCPeerConnectionState::Connected => {
                            self.connected = true;
                            self.liveness.connected();
                        }
                        // Closed here means the remote ended DTLS; we close ours only after removing it.
                        RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                            self.connected = false;
                            out.failed = true;
                        }
                        _ => {}
                    }
                }
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                    let kind = self
                        .pc
                        .rtp_receiver(init.receiver_id)
                        .and_then(|r| to_kind(r.track().kind()));
                    // OnOpen can fire again for a track already open (another SSRC of
                    // it, e.g. RTX); the first one stays the track's identity.
                    if let Some(kind) = kind {
                        let up = self
                            .uptracks
                            .entry(init.track_id.clone())
                            .or_insert(Uptrack {
                                kind,
                                receiver_id: init.receiver_id,
                                ssrc: init.ssrc,
                                codec: None,
                                layers: Vec::new(),
                                sizes: HashMap::new(),
                                params_at: HashMap::new(),
                            });
                        // A simulcast publisher's layers each open with their rid.
                        if let Some(rid) = init.rid.as_ref().filter(|r| !r.is_empty()) {
                            if !up.layers.iter().any(|(s, _)| *s == init.ssrc) {
                                debug!(key = ?self.key, rid = %rid, ssrc = init.ssrc, "simulcast layer");
                                up.layers.push((init.ssrc, rid.to_string()));
                            }
                        }
                    }
                }
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnClose(track_id)) => {
                    if let Some(up) = self.uptracks.remove(&track_id) {
                        if up.codec.is_some() {
                            out.unpublished.push(up.kind);
                        }
                    }
                }
                _ => {}
            }
        }
        while let Some(TaggedRTCMessage { now, message }) = self.pc.poll_read() {
            match message {
                RTCMessage::RtpPacket(track_id, packet) => {
                    self.liveness.heard(now);
                    let Some(up) = self.uptracks.get_mut(&track_id) else {
                        continue;
                    };
                    if up.codec.is_none() {
                        let pt = packet.header.payload_type;
                        up.codec = negotiated_codec(&mut self.pc, up.receiver_id, pt);
                        if up.codec.is_some() {
                            out.track_ready = true;
                            out.published.push(up.kind);
                        }
                    }
                    if let (false, Some(c)) = (up.layers.is_empty(), &up.codec) {
                        if let Some(size) = keyframe_dimensions(&c.mime_type, &packet.payload) {
                            let ssrc = packet.header.ssrc;
                            if up.sizes.insert(ssrc, size) != Some(size) {
                                tracing::info!(
                                    key = ?self.key,
                                    ssrc,
                                    width = size.0,
                                    height = size.1,
                                    "simulcast layer size"
                                );
                            }
                        }
                    }
                    // Where a keyframe may not be started (None: the downtrack tells).
                    let mut keyframe = None;
                    if up
                        .codec
                        .as_ref()
                        .is_some_and(|c| c.mime_type.eq_ignore_ascii_case("video/H264"))
                    {
                        let (ssrc, seq) = (packet.header.ssrc, packet.header.sequence_number);
                        if carries_sps(&packet.payload) {
                            up.params_at.insert(ssrc, seq);
                        } else if idr_after_its_parameter_sets(
                            up.params_at.get(&ssrc).copied(),
                            seq,
                            &packet.payload,
                        ) {
                            keyframe = Some(false);
                        }
                    }
                    // `now` is when the datagram carrying it was handed to the connection.
                    out.media.push((up.kind, packet, now, keyframe));
                }
                RTCMessage::RtcpPacket(track_id, packets) => {
                    // Only PLI/FIR and SRs are marked for delivery. Keyframe requests
                    // name one of our downtracks; SRs one of a publisher's tracks.
                    if let Some(up) = self.uptracks.get(&track_id) {
                        for sr in packets
                            .iter()
                            .filter_map(|p| p.as_any().downcast_ref::<SenderReport>())
                        {
                            out.sender_reports.push((up.kind, sr.clone()));
                        }
                    } else if let Some(((stream_id, kind), _)) =
                        self.downtracks.iter().find(|(_, d)| d.track_id == track_id)
                    {
                        for p in packets.iter() {
                            let any = p.as_any();
                            if let Some(remb) =
                                any.downcast_ref::<ReceiverEstimatedMaximumBitrate>()
                            {
                                out.remb = Some(f64::from(remb.bitrate));
                            }
                            if let (Some(rr), Some(c)) = (
                                any.downcast_ref::<ReceiverReport>(),
                                self.congestion.as_mut(),
                            ) {
                                for r in &rr.reports {
                                    c.receiver.reports += 1;
                                    c.receiver.loss = f64::from(r.fraction_lost) / 256.0;
                                    if r.last_sender_report != 0 {
                                        if let Some((_, sent)) = c
                                            .sr_sent
                                            .iter()
                                            .find(|(lsr, _)| *lsr == r.last_sender_report)
                                        {
                                            let delay = std::time::Duration::from_secs_f64(
                                                f64::from(r.delay) / 65536.0,
                                            );
                                            c.receiver.rtt = now
                                                .saturating_duration_since(*sent)
                                                .checked_sub(delay);
                                        }
                                    }
                                }
                            }
                        }
                        let asks = packets.iter().any(|p| {
                            p.as_any().downcast_ref::<PictureLossIndication>().is_some()
                                || p.as_any().downcast_ref::<FullIntraRequest>().is_some()
                        });
                        if asks {
                            out.keyframe_requests.push((stream_id.clone(), *kind));
                        }
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Asks the publisher for a keyframe on its video tracks. True if one was sent.
    pub fn send_pli(&mut self, now: Instant) -> bool {
        // Every layer of a simulcast track: the subscriber that asked may be on any.
        let targets: Vec<(RTCRtpReceiverId, u32)> = self
            .uptracks
            .values()
            .filter(|t| t.kind == Kind::Video)
            .flat_map(|t| {
                let mut v = vec![(t.receiver_id, t.ssrc)];
                v.extend(
                    t.layers
                        .iter()
                        .filter(|(s, _)| *s != t.ssrc)
                        .map(|(s, _)| (t.receiver_id, *s)),
                );
                v
            })
            .collect();
        let mut sent = false;
        for (receiver_id, ssrc) in targets {
            if let Some(mut r) = self.pc.rtp_receiver(receiver_id) {
                let pli = PictureLossIndication {
                    sender_ssrc: 0,
                    media_ssrc: ssrc,
                };
                sent |= r.write_rtcp(now, vec![Box::new(pli)]).is_ok();
            }
        }
        sent
    }

    /// Answer mode (a WHEP player): the client offered (its m-sections receive), and
    /// the answer puts `wanted` on them. Nothing is renegotiated afterwards (such a
    /// client has no channel for offers): [`Self::apply_downtracks`] only removes.
    pub fn answer_subscriber(
        &mut self,
        sdp: String,
        wanted: &HashSet<(String, Kind)>,
        codecs: &HashMap<(String, Kind), RTCRtpCodec>,
        metrics: &Metrics,
    ) -> Result<String, String> {
        // The transceivers the offer makes, in m-section order.
        let sections: Vec<Option<Kind>> = sdp
            .lines()
            .filter_map(|l| l.strip_prefix("m="))
            .map(|m| {
                if m.starts_with("audio ") {
                    Some(Kind::Audio)
                } else if m.starts_with("video ") {
                    Some(Kind::Video)
                } else {
                    None
                }
            })
            .collect();
        let now = Instant::now();
        let offer = RTCSessionDescription::offer(sdp).map_err(|e| e.to_string())?;
        self.pc
            .set_remote_description(now, offer)
            .map_err(|e| format!("cannot apply the offer: {e}"))?;
        self.free = sections
            .iter()
            .enumerate()
            .filter_map(|(i, k)| k.map(|k| (k, RTCRtpSenderId::from(i))))
            .collect();
        self.answer_mode = true;
        self.apply_downtracks(wanted, codecs, metrics);
        self.free.clear();
        let answer = self.pc.create_answer(None).map_err(|e| e.to_string())?;
        self.pc
            .set_local_description(now, answer)
            .map_err(|e| e.to_string())?;
        self.liveness.checking(now);
        for d in self.downtracks.values_mut() {
            d.offered = true;
            d.negotiated = true;
        }
        self.pc
            .local_description()
            .map(|d| complete_sdp(&d.sdp))
            .ok_or_else(|| "no local description after setting it".into())
    }

    /// Adds and removes downtracks to match `wanted`; returns an offer if the
    /// connection must be renegotiated now (never in answer mode, where only removals
    /// are made: nothing can be offered to such a client).
    pub fn sync_downtracks(
        &mut self,
        wanted: &HashSet<(String, Kind)>,
        codecs: &HashMap<(String, Kind), RTCRtpCodec>,
        metrics: &Metrics,
    ) -> Result<Option<String>, String> {
        if self.answer_mode {
            let kept: HashSet<(String, Kind)> = self
                .downtracks
                .keys()
                .filter(|k| wanted.contains(*k))
                .cloned()
                .collect();
            self.apply_downtracks(&kept, codecs, metrics);
            return Ok(None);
        }
        let changed = self.apply_downtracks(wanted, codecs, metrics);
        if !(changed || self.pending) {
            return Ok(None);
        }
        if self.negotiating {
            self.pending = true;
            return Ok(None);
        }
        self.pending = false;
        for d in self.downtracks.values_mut() {
            d.offered = true;
        }
        let offer = self.pc.create_offer(None).map_err(|e| e.to_string())?;
        self.pc
            .set_local_description(Instant::now(), offer)
            .map_err(|e| e.to_string())?;
        self.negotiating = true;
        self.pc
            .local_description()
            .map(|d| Some(complete_sdp(&d.sdp)))
            .ok_or_else(|| "no local description after setting it".into())
    }

    /// Adds and removes downtracks to match `wanted`; true if any changed.
    fn apply_downtracks(
        &mut self,
        wanted: &HashSet<(String, Kind)>,
        codecs: &HashMap<(String, Kind), RTCRtpCodec>,
        metrics: &Metrics,
    ) -> bool {
        let mut changed = false;
        let stale: Vec<(String, Kind)> = self
            .downtracks
            .keys()
            .filter(|k| !wanted.contains(*k))
            .cloned()
            .collect();
        for k in stale {
            if let Some(d) = self.downtracks.remove(&k) {
                if self.pc.remove_track(d.sender_id).is_ok() {
                    self.free.push((k.1, d.sender_id));
                }
                self.paused_ssrcs.forget(d.rewriter.ssrc());
                self.keyframe_wanted.remove(&k.0);
                metrics
                    .subscribed_tracks
                    .with_label_values(&[kind_label(k.1)])
                    .dec();
                changed = true;
            }
        }
        for k in wanted {
            if self.downtracks.contains_key(k) {
                continue;
            }
            let codec = codecs[k].clone();
            let ssrc: u32 = rand::random();
            let track_id = format!("{}-{}", k.0, kind_label(k.1));
            let track = MediaStreamTrack::new(
                k.0.clone(),
                track_id.clone(),
                track_id.clone(),
                from_kind(k.1),
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        ssrc: Some(ssrc),
                        ..Default::default()
                    },
                    codec: codec.clone(),
                    ..Default::default()
                }],
            );
            // A transceiver of this kind freed by a stream that left is reused (its
            // m-section, with its mid, now carries this stream), else a new one is
            // added: `sendonly`, as nothing comes back on it.
            let reuse = self.free.iter().position(|(kind, _)| *kind == k.1);
            let added = match reuse {
                Some(_) => self.pc.add_track(track),
                None => self
                    .pc
                    .add_transceiver_from_track(
                        track,
                        Some(RTCRtpTransceiverInit {
                            direction: RTCRtpTransceiverDirection::Sendonly,
                            streams: vec![],
                            send_encodings: vec![],
                        }),
                    )
                    .map(RTCRtpSenderId::from),
            };
            let sender_id = match added {
                Ok(id) => id,
                Err(e) => {
                    // The subscriber never negotiated this codec: it cannot have this
                    // stream, but it keeps the others.
                    tracing::warn!(
                        key = ?self.key,
                        stream_id = %k.0,
                        codec = %codec.mime_type,
                        fmtp = %codec.sdp_fmtp_line,
                        error = %e,
                        "subscriber cannot receive this stream's codec; not forwarding it"
                    );
                    continue;
                }
            };
            if let Some(i) = self.free.iter().position(|(_, id)| *id == sender_id) {
                self.free.remove(i);
            }
            // Every codec we forward stays offered on every m-section (rtc would narrow
            // it to this stream's codec): the subscriber's answer then holds all it can
            // decode, so a later stream in another codec (an RTMP pusher's H.264 after
            // a VP8 browser) can reuse this m-section. The payload type sent is the
            // stream's own (`payload_type` below).
            // (In answer mode the offer's codecs are the ones to keep.)
            if let Some(mut t) = (!self.answer_mode)
                .then(|| self.pc.rtp_transceiver(sender_id.into()))
                .flatten()
            {
                if let Err(e) = t.set_codec_preferences(vec![]) {
                    debug!(key = ?self.key, error = %e, "codec preferences not reset");
                }
            }
            self.downtracks.insert(
                k.clone(),
                Downtrack {
                    sender_id,
                    track_id,
                    rewriter: Rewriter::new(ssrc),
                    payload_type: None,
                    mime: codec.mime_type.clone(),
                    fmtp: codec.sdp_fmtp_line.clone(),
                    codec: codec.clone(),
                    refused: false,
                    paused: false,
                    // A new subscriber's video starts at a keyframe (the publisher is
                    // asked for one as soon as the downtrack can carry it): frames
                    // before it would not decode.
                    await_keyframe: k.1 == Kind::Video,
                    started: false,
                    negotiated: false,
                    offered: false,
                    layer: None,
                    forwarding: None,
                },
            );
            metrics
                .subscribed_tracks
                .with_label_values(&[kind_label(k.1)])
                .inc();
            changed = true;
        }
        changed
    }

    /// DTLS is up: media can flow (before, datagrams are the handshake).
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// The downtrack of `stream_id`'s `kind` on this subscriber, resolved once for a
    /// batch of packets (the lookup hashes the stream id). None before DTLS is up or
    /// if there is no such downtrack.
    pub fn forward_to<'a>(&'a mut self, stream_id: &'a str, kind: Kind) -> Option<Forwarding<'a>> {
        if !self.connected {
            return None;
        }
        let d = self
            .downtracks
            .get_mut(&(stream_id, kind) as &dyn TrackKey)?;
        Some(Forwarding {
            key: self.key,
            stream_id,
            kind,
            d,
            pc: &mut self.pc,
            send: self.send.as_ref(),
            keyframe_wanted: &mut self.keyframe_wanted,
            keyframe_now: &mut self.keyframe_now,
            congestion: self.congestion.as_mut(),
        })
    }

    /// Whether forwarded copies go straight to SRTP (a subscriber connection) and so
    /// leave nothing queued in the connection but their datagrams.
    pub fn forwards_past_chain(&self) -> bool {
        self.send.is_some()
    }

    /// Pauses or resumes a video downtrack. A resumed one forwards from the next
    /// keyframe. True if the downtrack exists.
    pub fn set_paused(&mut self, stream_id: &str, paused: bool) -> bool {
        let Some(d) = self
            .downtracks
            .get_mut(&(stream_id.to_owned(), Kind::Video))
        else {
            return false;
        };
        if paused && !d.paused {
            d.rewriter.interrupt();
            d.forwarding = None;
        }
        self.paused_ssrcs
            .set(d.rewriter.ssrc(), paused, d.rewriter.last_sequence());
        if !paused && d.paused {
            d.await_keyframe = true;
        }
        d.paused = paused;
        true
    }

    /// Chooses the simulcast layer (0 = lowest) a video downtrack forwards, from the
    /// next keyframe of that layer. True if it changes what is forwarded.
    /// The simulcast layer (index into the layers being sent) a video downtrack is told
    /// to forward; `None`: the best there is.
    pub fn layer(&self, stream_id: &str) -> Option<usize> {
        self.downtracks
            .get(&(stream_id.to_owned(), Kind::Video))
            .and_then(|d| d.layer)
    }

    pub fn set_layer(&mut self, stream_id: &str, layer: usize) -> bool {
        let Some(d) = self
            .downtracks
            .get_mut(&(stream_id.to_owned(), Kind::Video))
        else {
            return false;
        };
        let changed = d.layer != Some(layer);
        d.layer = Some(layer);
        changed
    }

    /// The streams this subscriber receives, by kind.
    pub fn downtrack_streams(&self) -> Vec<(String, Kind)> {
        self.downtracks
            .iter()
            .filter(|(_, d)| !d.refused)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Sends `bytes` of padding-only packets on a video downtrack (a bandwidth
    /// probe). Returns the bytes sent.
    pub fn send_padding(&mut self, bytes: usize, now: Instant) -> usize {
        if !self.connected {
            return 0;
        }
        // A paused video's downtrack first (nothing else goes on it), else a playing
        // one between two of its frames (a lowered video probing for its next layer).
        let mut candidates: Vec<((String, Kind), bool)> = self
            .downtracks
            .iter()
            .filter(|((_, k), d)| *k == Kind::Video && d.payload_type.is_some() && !d.refused)
            .map(|(key, d)| (key.clone(), d.paused))
            .collect();
        candidates.sort_by_key(|(_, paused)| !paused);
        const PACKET: usize = 1000;
        let mut sent = 0;
        for (key, _) in candidates {
            let Some(d) = self.downtracks.get_mut(&key) else {
                continue;
            };
            let Some(pt) = d.payload_type else {
                continue;
            };
            while sent < bytes {
                let Some(p) = d.rewriter.padding(pt, PACKET) else {
                    break;
                };
                let size = p.marshal_size();
                // Straight to the connection: `RTCRtpSender::write_rtp` accepts only
                // negotiated extension ids, and RFC 8285 padding has none. The chain
                // (TWCC numbering, the send history) and SRTP still see it.
                let msg = TaggedRTCMessage {
                    now,
                    message: RTCMessage::RtpPacket(d.track_id.clone(), p),
                };
                if let Err(e) = self.pc.handle_write(msg) {
                    debug!(key = ?self.key, error = %e, "padding not sent");
                    return sent;
                }
                sent += size;
            }
            if sent >= bytes {
                break;
            }
        }
        sent
    }

    /// Tells the publisher the most it should send (REMB on its video tracks).
    pub fn send_remb(&mut self, bitrate: f64, now: Instant) -> bool {
        let targets: Vec<(RTCRtpReceiverId, u32)> = self
            .uptracks
            .values()
            .filter(|t| t.kind == Kind::Video)
            .map(|t| (t.receiver_id, t.ssrc))
            .collect();
        let mut sent = false;
        for (receiver_id, ssrc) in targets {
            if let Some(mut r) = self.pc.rtp_receiver(receiver_id) {
                let remb = ReceiverEstimatedMaximumBitrate {
                    sender_ssrc: 0,
                    bitrate: bitrate as f32,
                    ssrcs: vec![ssrc],
                };
                sent |= r.write_rtcp(now, vec![Box::new(remb)]).is_ok();
            }
        }
        sent
    }

    /// Relays a publisher's sender report on the matching downtrack, translated into
    /// its SSRC and timestamp space, with its own counts. True if one was written.
    pub fn send_sender_report(
        &mut self,
        stream_id: &str,
        kind: Kind,
        sr: &SenderReport,
        now: Instant,
    ) -> bool {
        if !self.connected {
            return false;
        }
        let Some(d) = self.downtracks.get(&(stream_id, kind) as &dyn TrackKey) else {
            return false;
        };
        let Some(rtp_time) = d.rewriter.translate_timestamp(sr.ssrc, sr.rtp_time) else {
            return false; // nothing forwarded from that source yet
        };
        let report = SenderReport {
            ssrc: d.rewriter.ssrc(),
            ntp_time: sr.ntp_time,
            rtp_time,
            packet_count: d.rewriter.packets,
            octet_count: d.rewriter.octets,
            ..Default::default()
        };
        let sender_id = d.sender_id;
        let compact = (sr.ntp_time >> 16) as u32;
        let ok = self
            .pc
            .rtp_sender(sender_id)
            .is_some_and(|mut s| s.write_rtcp(now, vec![Box::new(report)]).is_ok());
        if let (true, Some(c)) = (ok, self.congestion.as_mut()) {
            c.sr_sent.push_back((compact, now));
            while c.sr_sent.len() > 32 {
                c.sr_sent.pop_front();
            }
        }
        ok
    }

    /// Decrements the gauges this peer contributes to, before it is dropped.
    pub fn untrack_metrics(&mut self, metrics: &Metrics) {
        for (_, kind) in self.downtracks.keys() {
            metrics
                .subscribed_tracks
                .with_label_values(&[kind_label(*kind)])
                .dec();
        }
        self.downtracks.clear();
        for up in self.uptracks.values().filter(|u| u.codec.is_some()) {
            metrics
                .published_tracks
                .with_label_values(&[kind_label(up.kind)])
                .dec();
        }
        self.uptracks.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_downtrack_is_found_by_a_borrowed_stream_id() {
        let mut m: HashMap<(String, Kind), u8> = HashMap::new();
        m.insert(("1400000000_7_alice_main".to_owned(), Kind::Video), 1);
        m.insert(("1400000000_7_alice_main".to_owned(), Kind::Audio), 2);
        m.insert(("1400000000_7_bob_main".to_owned(), Kind::Video), 3);
        let find = |id: &str, kind| m.get(&(id, kind) as &dyn TrackKey).copied();
        assert_eq!(find("1400000000_7_alice_main", Kind::Video), Some(1));
        assert_eq!(find("1400000000_7_alice_main", Kind::Audio), Some(2));
        assert_eq!(find("1400000000_7_bob_main", Kind::Video), Some(3));
        assert_eq!(find("1400000000_7_bob_main", Kind::Audio), None);
        assert_eq!(find("1400000000_7_alice", Kind::Video), None);
    }

    /// What a publisher is answered: only codecs Weir forwards (Opus; VP8 and H.264),
    /// and SDP any stack reads: candidates with end-of-candidates in every m-section,
    /// RTCP-component copies left out, msid-semantic present.
    #[test]
    fn a_publisher_is_answered_with_forwardable_codecs_and_complete_sdp() {
        let config = super::super::MediaConfig {
            announce: vec!["192.0.2.7:7882".parse().unwrap()],
            tcp_port: Some(7881),
            ice_disconnected: std::time::Duration::from_secs(5),
            ice_failed: std::time::Duration::from_secs(10),
            congestion_control: false,
            publisher_bitrate: (100_000.0, 1_000_000.0),
            overload_busy_percent: 90,
            publisher_audio_ptime_ms: 10,
        };
        let metrics = Metrics::new();
        let mut peer = Peer::new(
            PeerKey(crate::room::SessionId(1), Target::Publisher),
            &config,
            &metrics,
        )
        .unwrap();
        let offer = "v=0\r\n\
o=- 1 1 IN IP4 0.0.0.0\r\n\
s=-\r\n\
t=0 0\r\n\
a=group:BUNDLE 0 1\r\n\
a=fingerprint:sha-256 11:4E:67:77:31:74:5D:76:D7:D6:DA:78:14:1B:9E:22:86:B4:E7:3B:82:57:61:50:1A:8F:86:DF:B3:8C:1A:07\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111 9 0 8\r\n\
c=IN IP4 0.0.0.0\r\n\
a=setup:actpass\r\n\
a=mid:0\r\n\
a=ice-ufrag:abcd\r\n\
a=ice-pwd:abcdefghijklmnopqrstuvwx\r\n\
a=rtcp-mux\r\n\
a=rtpmap:111 opus/48000/2\r\n\
a=rtpmap:9 G722/8000\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:8 PCMA/8000\r\n\
a=sendonly\r\n\
a=msid:s a\r\n\
a=ssrc:1 cname:x\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 98 96\r\n\
c=IN IP4 0.0.0.0\r\n\
a=setup:actpass\r\n\
a=mid:1\r\n\
a=ice-ufrag:abcd\r\n\
a=ice-pwd:abcdefghijklmnopqrstuvwx\r\n\
a=rtcp-mux\r\n\
a=rtpmap:98 VP9/90000\r\n\
a=rtpmap:96 VP8/90000\r\n\
a=sendonly\r\n\
a=msid:s v\r\n\
a=ssrc:2 cname:x\r\n";
        let answer = peer.answer(offer.into(), None).unwrap();
        let sections: Vec<&str> = answer.split("\r\nm=").skip(1).collect();
        assert_eq!(sections.len(), 2, "{answer}");
        let (audio, video) = (sections[0], sections[1]);
        assert!(audio.contains("opus/48000"), "{answer}");
        for other in ["G722", "PCMU", "PCMA"] {
            assert!(!audio.contains(other), "{other} accepted: {answer}");
        }
        assert!(
            video.contains("VP8/90000") && !video.contains("VP9"),
            "{answer}"
        );
        for section in [audio, video] {
            assert!(section.contains("a=candidate:"), "{answer}");
            assert!(section.contains("192.0.2.7 7882 typ host"), "{answer}");
            assert!(section.contains("tcptype passive"), "{answer}");
            assert!(section.contains("a=end-of-candidates"), "{answer}");
            assert!(
                !section.contains(" 2 udp ") && !section.contains(" 2 tcp "),
                "RTCP-component candidates: {answer}"
            );
        }
        assert!(answer.contains("a=msid-semantic:WMS *"), "{answer}");
        assert!(!answer.contains("a=ptime"), "none asked: {answer}");
    }

    #[test]
    fn the_audio_packet_length_is_asked_in_each_audio_section_that_carries_media() {
        let sdp = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=rtpmap:111 opus/48000/2\r\na=ptime:20\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=rtpmap:96 VP8/90000\r\n\
m=audio 0 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:2\r\na=rtpmap:111 opus/48000/2\r\n";
        let out = with_audio_ptime(sdp, 10);
        let sections: Vec<&str> = out.split("\r\nm=").skip(1).collect();
        assert_eq!(sections.len(), 3, "{out}");
        assert!(sections[0].contains("a=ptime:10"), "{out}");
        assert!(
            !sections[0].contains("a=ptime:20"),
            "the offer's own replaced: {out}"
        );
        assert!(!sections[1].contains("a=ptime"), "video: {out}");
        assert!(!sections[2].contains("a=ptime"), "rejected: {out}");
        // Nothing else changed.
        assert_eq!(
            out.replace("a=ptime:10\r\n", ""),
            sdp.replace("a=ptime:20\r\n", "")
        );
    }

    #[test]
    fn a_peer_is_gone_only_after_the_limit_without_any_authenticated_packet() {
        let t0 = Instant::now();
        let s = std::time::Duration::from_secs;
        let mut l = Liveness::new(t0, s(15));
        assert_eq!(
            l.gone(t0 + s(60)),
            None,
            "not negotiated yet: nothing to judge"
        );
        l.checking(t0 + s(1));
        assert_eq!(l.gone(t0 + s(15)), None);
        assert!(l.gone(t0 + s(17)).is_some(), "never connected");
        l.connected();
        l.heard(t0 + s(16));
        assert_eq!(l.gone(t0 + s(30)), None);
        l.heard(t0 + s(29)); // media, RTCP or a check: any of them
        assert_eq!(l.gone(t0 + s(44)), None);
        assert!(l.gone(t0 + s(45)).is_some());
    }

    #[test]
    fn offered_kinds_follow_directions_and_rejections() {
        let head = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n";
        let sdp = format!("{head}m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=sendonly\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=recvonly\r\nm=video 0 UDP/TLS/RTP/SAVPF 97\r\na=sendonly\r\n");
        assert_eq!(offered_send_kinds(&sdp), vec![Kind::Audio]);
        let both = format!("{head}m=audio 9 X 111\r\na=sendrecv\r\nm=video 9 X 96\r\n");
        assert_eq!(offered_send_kinds(&both), vec![Kind::Audio, Kind::Video]);
        assert!(offered_send_kinds("garbage").is_empty());
        assert!(
            offered_send_kinds("m=audio 9 X 111\r\n").is_empty(),
            "not an SDP"
        );
    }
}
