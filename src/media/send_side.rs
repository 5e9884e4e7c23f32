//! A subscriber connection's whole send side, as one interceptor.
//!
//! A subscriber connection only sends media. What its `rtc` chain must do to each packet
//! that leaves is: keep it for retransmission, number it for transport-wide congestion
//! control, and record its size and departure for the estimator; to each RTCP packet
//! that arrives: apply TWCC feedback to those records, answer NACKs (within the
//! [`NackGuard`]'s bounds), count them, and hand keyframe requests and reports to the
//! application. That used to be six interceptors (webrtc-rs's NACK responder, TWCC
//! sender and congestion-control interceptor, and Weir's guard, coverage and RTCP taps),
//! and the chain moves every packet into and out of each one's queue by value, with
//! three hash-map inserts per packet for the send history, one lookup per interceptor
//! for the stream, and a map per stream for the packet cache: a third of the forwarding
//! cost in `perf` at 150 subscribers (BENCHMARKS.md, "Where the time goes now").
//!
//! Here the same steps run in one pass over one packet, in the order the chain ran
//! them, with state a forwarded copy can reach in a few array indexes:
//! - the send history is a queue in departure order indexed by transport-wide sequence
//!   number (consecutive, since this interceptor draws them), with webrtc-rs's
//!   `History` semantics: a batch of reports runs from the oldest unreported packet to
//!   the newest acknowledged one, packets never acknowledged within
//!   [`PRUNE_HORIZON`] are written off;
//! - the packet cache is a ring per stream ([`CACHE`] packets, as the responder kept);
//! - streams are found by SSRC in a short vector (a subscriber has a few per publisher
//!   it watches).
//!
//! Forwarded copies do not pass the chain at all: the forwarding path prepares each
//! one through a [`SendHandle`] on the same state and hands it to `rtc`'s SRTP
//! directly (`RTCPeerConnection::write_rtp_protected`, `vendor/rtc/WEIR-PATCH.md`);
//! RTCP, retransmissions and timers still go through the interceptor.
//!
//! Behaviour is the chain's, step for step (which packets are numbered, when the
//! estimator hears what, what an RTX resend carries), with two deliberate differences:
//! a packet of a stream without the TWCC extension is not put in the history (no
//! TWCC feedback can name it, so webrtc-rs's history reported it lost at the next
//! batch; we offer it on audio and video, but a client may answer without it), and a
//! resent packet on the media SSRC carries only its new TWCC number, not the
//! original's other header extensions (as an RTX resend never did). `tests/congestion.rs`, `sfu_media` and `simulcast`
//! exercise it end to end, the unit tests below piece by piece.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rtc::interceptor::{
    convert_twcc, Acknowledgement, Attribute, AttributedPacket, BandwidthEstimator, Interceptor,
    Packet, PacketReport, StreamInfo, TaggedPacket,
};
use rtc::rtcp::transport_feedbacks::cc_feedback_report::Ecn;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::sansio::Protocol;
use rtc::shared::error::Error as RtcError;
use rtc::shared::marshal::MarshalSize;

use super::nack_guard::NackGuard;
use super::peer::RtcpTap;
use crate::congestion::estimate::SharedEstimator;

/// The transport-wide CC header extension (draft-holmer-rmcat-transport-wide-cc-extensions-01).
const TRANSPORT_CC_URI: &str =
    "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01";

/// Packets kept per stream for retransmission (a power of two; webrtc-rs's responder
/// kept as many).
pub const CACHE: usize = 1024;

/// How long a packet no feedback acknowledged is kept before it is written off
/// (webrtc-rs's `DEFAULT_PRUNE_HORIZON`).
pub const PRUNE_HORIZON: Duration = Duration::from_secs(2);

/// Sent packets awaiting feedback, at most: two seconds of 16,000 packets/s. Half the
/// sequence space, so an index is never ambiguous.
const MAX_OUTSTANDING: usize = 16_384;

/// Where the send side goes in the chain (any slot: it is the subscriber chain's only
/// interceptor).
pub const SEND_SIDE_SLOT: usize = 1_000;

struct Stream {
    ssrc: u32,
    /// The transport-wide CC extension's id (0: not negotiated, not numbered).
    twcc: u8,
    /// RFC 4588: retransmissions go out on this SSRC and payload type.
    rtx: Option<(u32, u8)>,
    rtx_sequence: u16,
    /// Sent packets, by sequence number modulo [`CACHE`] (NACK negotiated only).
    cache: Option<Box<[Option<rtc::rtp::Packet>]>>,
    /// The highest sequence number cached (newest, modulo 2^16).
    highest: Option<u16>,
}

impl Stream {
    /// Keeps a packet for resending: its header without extensions (a resent copy
    /// is numbered anew; on RTX it never carried them) and its payload (shared).
    fn cache(&mut self, packet: &rtc::rtp::Packet) {
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        let h = &packet.header;
        let seq = h.sequence_number;
        if self.highest.is_none_or(|h| seq.wrapping_sub(h) < 0x8000) {
            self.highest = Some(seq);
        }
        cache[usize::from(seq) % CACHE] = Some(rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                version: h.version,
                padding: h.padding,
                marker: h.marker,
                payload_type: h.payload_type,
                sequence_number: seq,
                timestamp: h.timestamp,
                ssrc: h.ssrc,
                csrc: h.csrc.clone(),
                ..Default::default()
            },
            payload: packet.payload.clone(),
        });
    }

    fn cached(&self, seq: u16) -> Option<&rtc::rtp::Packet> {
        let highest = self.highest?;
        if usize::from(highest.wrapping_sub(seq)) >= CACHE {
            return None; // too old, or not sent yet
        }
        self.cache.as_ref()?[usize::from(seq) % CACHE]
            .as_ref()
            .filter(|p| p.header.sequence_number == seq)
    }

    /// The copy that resends packet `seq`, if it is cached: on the RTX stream (RFC 4588:
    /// its own sequence number, the original's first in the payload) or as it was.
    fn resend(&mut self, seq: u16) -> Option<rtc::rtp::Packet> {
        let original = self.cached(seq)?;
        let Some((ssrc, payload_type)) = self.rtx else {
            return Some(original.clone());
        };
        let mut payload = Vec::with_capacity(2 + original.payload.len());
        payload.extend_from_slice(&seq.to_be_bytes());
        payload.extend_from_slice(&original.payload);
        let header = rtc::rtp::header::Header {
            version: 2,
            ssrc,
            payload_type,
            sequence_number: self.rtx_sequence,
            timestamp: original.header.timestamp,
            marker: original.header.marker,
            ..Default::default()
        };
        self.rtx_sequence = self.rtx_sequence.wrapping_add(1);
        Some(rtc::rtp::Packet {
            header,
            payload: payload.into(),
        })
    }
}

/// One packet sent with a transport-wide sequence number, until feedback reports it.
struct Sent {
    ssrc: u32,
    sequence: u16,
    size: usize,
    departure: Instant,
    /// What the last feedback naming it said: arrived, when, ECN.
    ack: Option<(bool, Option<Duration>, Ecn)>,
}

/// The send history, in departure order: the packet with transport-wide number
/// `first + i` is `sent[i]`, with id `first_id + i`.
#[derive(Default)]
struct History {
    sent: VecDeque<Sent>,
    first: u16,
    first_id: u64,
    /// The newest packet feedback said arrived, by id.
    highest_arrived: Option<u64>,
}

impl History {
    fn add(&mut self, twcc: u16, sent: Sent) {
        if self.sent.is_empty() {
            self.first = twcc;
        }
        self.sent.push_back(sent);
        if self.sent.len() > MAX_OUTSTANDING {
            self.pop();
        }
    }

    fn pop(&mut self) -> Option<Sent> {
        let s = self.sent.pop_front()?;
        self.first = self.first.wrapping_add(1);
        self.first_id += 1;
        Some(s)
    }

    fn acknowledge(&mut self, a: &Acknowledgement) {
        let i = usize::from(a.sequence_number.wrapping_sub(self.first));
        let Some(s) = self.sent.get_mut(i) else {
            return; // reported already, written off, or never sent
        };
        s.ack = Some((a.arrived, a.arrival, a.ecn));
        if a.arrived {
            let id = self.first_id + i as u64;
            self.highest_arrived = Some(self.highest_arrived.map_or(id, |h| h.max(id)));
        }
    }

    /// Everything up to the newest packet acknowledged as arrived, oldest first (what
    /// no feedback named reads as lost, as in webrtc-rs's history).
    fn take_reports(&mut self) -> Vec<PacketReport> {
        let Some(highest) = self.highest_arrived else {
            return Vec::new();
        };
        let mut reports = Vec::new();
        while self.first_id <= highest {
            let (id, twcc) = (self.first_id, self.first);
            let Some(s) = self.pop() else { break };
            let (arrived, arrival, ecn) = s.ack.unwrap_or((false, None, Ecn::NotEct));
            reports.push(PacketReport {
                ssrc: s.ssrc,
                id,
                rtp_sequence_number: s.sequence,
                is_twcc: true,
                twcc_sequence_number: twcc,
                size: s.size,
                arrived,
                departure: s.departure,
                arrival,
                ecn,
            });
        }
        reports
    }

    /// Writes off the oldest packets not acknowledged since `cutoff`.
    fn prune(&mut self, cutoff: Instant) {
        while self
            .sent
            .front()
            .is_some_and(|s| s.departure < cutoff && !s.ack.is_some_and(|a| a.0))
        {
            self.pop();
        }
    }
}

/// The send side's state. The interceptor in the connection's chain ([`SendSide`])
/// and the forwarding path ([`SendHandle`]) share it: RTCP, retransmissions and
/// timers go through the chain; a forwarded copy is prepared here by the forwarding
/// path itself and handed to `rtc`'s SRTP past the chain
/// (`RTCPeerConnection::write_rtp_protected`), so it is never moved through the
/// chain's queues.
struct SendState {
    streams: Vec<Stream>,
    guard: NackGuard,
    tap: RtcpTap,
    /// Congestion control on: the estimator fed from the history, and the next
    /// transport-wide sequence number.
    estimator: Option<SharedEstimator>,
    next_twcc: u16,
    history: History,
}

impl SendState {
    fn stream(&mut self, ssrc: u32) -> Option<&mut Stream> {
        self.streams.iter_mut().find(|s| s.ssrc == ssrc)
    }

    /// Numbers and records one packet leaving (cached first if `cache`).
    fn prepare(&mut self, p: &mut rtc::rtp::Packet, now: Instant, cache: bool) {
        let congestion = self.estimator.is_some();
        let twcc = match self.stream(p.header.ssrc) {
            Some(s) => {
                if cache {
                    s.cache(p);
                }
                (congestion && s.twcc != 0).then_some(s.twcc)
            }
            None => None,
        };
        if p.header.padding && p.payload.is_empty() {
            self.guard
                .padding_sent(p.header.ssrc, p.header.sequence_number);
        }
        if let Some(id) = twcc {
            let n = self.next_twcc;
            self.next_twcc = n.wrapping_add(1);
            let _ = p
                .header
                .set_extension(id, bytes::Bytes::copy_from_slice(&n.to_be_bytes()));
            self.history.add(
                n,
                Sent {
                    ssrc: p.header.ssrc,
                    sequence: p.header.sequence_number,
                    size: p.marshal_size(),
                    departure: now,
                    ack: None,
                },
            );
        }
    }

    /// Applies TWCC feedback to the history and gives the estimator what it settled.
    fn feedback(&mut self, now: Instant, packets: &[Box<dyn rtc::rtcp::Packet>]) {
        let Some(estimator) = self.estimator.as_mut() else {
            return;
        };
        let mut reported = false;
        for cc in packets
            .iter()
            .filter_map(|p| p.as_any().downcast_ref::<TransportLayerCc>())
        {
            // Which numbers this feedback spoke of: a loss counts only when a received
            // feedback said so (`FeedbackCoverage`).
            estimator
                .coverage()
                .record(cc.base_sequence_number, cc.packet_status_count);
            for a in convert_twcc(cc) {
                self.history.acknowledge(&a);
            }
            reported = true;
        }
        if reported {
            let reports = self.history.take_reports();
            estimator.on_reports(now, &reports);
        }
    }

    /// The resends the (guarded) NACKs ask for, from the cache, each prepared to leave.
    fn answer_nacks(
        &mut self,
        now: Instant,
        packets: &[Box<dyn rtc::rtcp::Packet>],
    ) -> Vec<rtc::rtp::Packet> {
        let mut out = Vec::new();
        for nack in packets
            .iter()
            .filter_map(|p| p.as_any().downcast_ref::<TransportLayerNack>())
        {
            let Some(stream) = self.stream(nack.media_ssrc) else {
                continue;
            };
            let first = out.len();
            out.extend(
                nack.nacks
                    .iter()
                    .flat_map(|n| n.packet_list())
                    .filter_map(|seq| stream.resend(seq)),
            );
            for packet in &mut out[first..] {
                self.prepare(packet, now, false);
            }
        }
        out
    }
}

/// The forwarding path's hold on a subscriber connection's send side: prepares a
/// forwarded copy (cache, transport-wide number, send history) without the chain.
#[derive(Clone)]
pub struct SendHandle(Arc<Mutex<SendState>>);

impl SendHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, SendState> {
        // Nothing in the state is left half-done by a panic that matters more than
        // forwarding on: take it as it is.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Caches, numbers and records `packet` as leaving at `now`.
    pub fn prepare(&self, packet: &mut rtc::rtp::Packet, now: Instant) {
        self.lock().prepare(packet, now, true);
    }
}

/// See the module's documentation.
pub struct SendSide {
    state: SendHandle,
    reads: VecDeque<TaggedPacket>,
    writes: VecDeque<TaggedPacket>,
}

impl SendSide {
    pub fn new(guard: NackGuard, tap: RtcpTap, estimator: Option<SharedEstimator>) -> Self {
        Self {
            state: SendHandle(Arc::new(Mutex::new(SendState {
                streams: Vec::new(),
                guard,
                tap,
                estimator,
                next_twcc: 0,
                history: History::default(),
            }))),
            reads: VecDeque::new(),
            writes: VecDeque::new(),
        }
    }

    /// The handle the forwarding path prepares its copies with.
    pub fn handle(&self) -> SendHandle {
        self.state.clone()
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for SendSide {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = RtcError;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), RtcError> {
        let now = msg.now;
        if let Packet::Rtcp(packets) = &mut msg.message.packet {
            let mut guard = self.state.lock();
            let state = &mut *guard;
            state.feedback(now, packets);
            let streams = &state.streams;
            let size = |ssrc: u32, seq: u16| {
                let s = streams.iter().find(|s| s.ssrc == ssrc)?;
                Some(s.cached(seq)?.marshal_size())
            };
            if !state.guard.filter(packets, now, &size) {
                return Ok(()); // only NACKs, none worth answering
            }
            let packets = std::mem::take(packets);
            let resends = state.answer_nacks(now, &packets);
            self.writes
                .extend(resends.into_iter().map(|p| TaggedPacket {
                    now,
                    transport: Default::default(),
                    message: AttributedPacket::new(Packet::Rtp(p)).with(Attribute::Retransmission),
                }));
            msg.message.packet = Packet::Rtcp(packets);
            state.tap.inspect(&mut msg);
        }
        self.reads.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.reads.pop_front()
    }

    fn handle_write(&mut self, mut msg: TaggedPacket) -> Result<(), RtcError> {
        if let Packet::Rtp(p) = &mut msg.message.packet {
            self.state.lock().prepare(p, msg.now, true);
        }
        self.writes.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.writes.pop_front()
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), RtcError> {
        let mut state = self.state.lock();
        state
            .history
            .prune(now.checked_sub(PRUNE_HORIZON).unwrap_or(now));
        if let Some(e) = state.estimator.as_mut() {
            e.handle_timeout(now);
        }
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        self.state
            .lock()
            .estimator
            .as_ref()
            .and_then(|e| e.poll_timeout())
    }
}

impl Interceptor for SendSide {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        let mut state = self.state.lock();
        let twcc = info
            .rtp_header_extensions
            .iter()
            .find(|e| e.uri == TRANSPORT_CC_URI)
            .map_or(0, |e| u8::try_from(e.id).unwrap_or(0));
        let nack = info
            .rtcp_feedback
            .iter()
            .any(|fb| fb.typ == "nack" && fb.parameter.is_empty());
        let stream = Stream {
            ssrc: info.ssrc,
            twcc,
            rtx: info.ssrc_rtx.zip(info.payload_type_rtx),
            rtx_sequence: 0,
            cache: nack.then(|| vec![None; CACHE].into_boxed_slice()),
            highest: None,
        };
        state.streams.retain(|s| s.ssrc != info.ssrc);
        state.streams.push(stream);
    }

    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.state.lock().streams.retain(|s| s.ssrc != info.ssrc);
    }

    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::interceptor::{RTCPFeedback, RTPHeaderExtension};

    fn info(ssrc: u32, rtx: Option<(u32, u8)>) -> StreamInfo {
        StreamInfo {
            ssrc,
            ssrc_rtx: rtx.map(|r| r.0),
            payload_type_rtx: rtx.map(|r| r.1),
            rtp_header_extensions: vec![RTPHeaderExtension {
                uri: TRANSPORT_CC_URI.to_owned(),
                id: 5,
            }],
            rtcp_feedback: vec![RTCPFeedback {
                typ: "nack".to_owned(),
                parameter: String::new(),
            }],
            ..Default::default()
        }
    }

    fn side() -> SendSide {
        SendSide::new(
            NackGuard::new(None, Default::default(), Default::default()),
            RtcpTap::new(false),
            Some(SharedEstimator::new(1e6, 5e4, 2e7)),
        )
    }

    /// Without congestion control, with the guard's shared state given, and with
    /// packets `seqs` sent on SSRC 10 (NACK and TWCC negotiated, no RTX).
    fn guarded(
        paused: super::super::nack_guard::PausedSsrcs,
        budget: super::super::nack_guard::RetransmissionBudget,
        seqs: std::ops::Range<u16>,
    ) -> SendSide {
        let mut s = SendSide::new(
            NackGuard::new(None, paused, budget),
            RtcpTap::new(false),
            None,
        );
        s.bind_local_stream(&info(10, None));
        for seq in seqs {
            s.handle_write(rtp(10, seq)).unwrap();
        }
        written(&mut s);
        s
    }

    fn rtp(ssrc: u32, seq: u16) -> TaggedPacket {
        let mut p = rtc::rtp::Packet::default();
        p.header.version = 2;
        p.header.ssrc = ssrc;
        p.header.sequence_number = seq;
        p.header.timestamp = u32::from(seq) * 3000;
        p.payload = bytes::Bytes::from(vec![seq as u8; 100]);
        TaggedPacket {
            now: Instant::now(),
            transport: Default::default(),
            message: Packet::Rtp(p).into(),
        }
    }

    fn nack(media_ssrc: u32, seqs: &[u16]) -> TaggedPacket {
        TaggedPacket {
            now: Instant::now(),
            transport: Default::default(),
            message: Packet::Rtcp(vec![Box::new(TransportLayerNack {
                sender_ssrc: 1,
                media_ssrc,
                nacks: rtc::rtcp::transport_feedbacks::transport_layer_nack::nack_pairs_from_sequence_numbers(seqs),
            })])
            .into(),
        }
    }

    fn written(s: &mut SendSide) -> Vec<rtc::rtp::Packet> {
        std::iter::from_fn(|| s.poll_write())
            .filter_map(|m| match m.message.packet {
                Packet::Rtp(p) => Some(p),
                _ => None,
            })
            .collect()
    }

    fn twcc(p: &rtc::rtp::Packet) -> Option<u16> {
        p.header
            .get_extension(5)
            .map(|e| u16::from_be_bytes([e[0], e[1]]))
    }

    #[test]
    fn every_packet_leaving_a_stream_with_the_extension_is_numbered_in_turn() {
        let mut s = side();
        s.bind_local_stream(&info(10, None));
        s.bind_local_stream(&info(20, None));
        for (ssrc, seq) in [(10, 1), (20, 7), (10, 2), (99, 1)] {
            s.handle_write(rtp(ssrc, seq)).unwrap();
        }
        let out = written(&mut s);
        let numbers: Vec<_> = out.iter().map(twcc).collect();
        // SSRC 99 is no stream of ours: passed on as it is.
        assert_eq!(numbers, [Some(0), Some(1), Some(2), None]);
        assert_eq!(s.state.lock().history.sent.len(), 3);
        // Without congestion control nothing is numbered or recorded.
        let mut off = SendSide::new(
            NackGuard::new(None, Default::default(), Default::default()),
            RtcpTap::new(false),
            None,
        );
        off.bind_local_stream(&info(10, None));
        off.handle_write(rtp(10, 1)).unwrap();
        assert_eq!(twcc(&written(&mut off)[0]), None);
        assert!(off.state.lock().history.sent.is_empty());
    }

    /// Forwarded copies are prepared through the handle, past the chain; the chain's
    /// own writes and resends draw from the same numbering and the same cache.
    #[test]
    fn copies_prepared_past_the_chain_share_its_numbers_history_and_cache() {
        let mut s = side();
        s.bind_local_stream(&info(10, None));
        let handle = s.handle();
        let mut numbers = Vec::new();
        for seq in 100..104 {
            let Packet::Rtp(mut p) = rtp(10, seq).message.packet else {
                unreachable!()
            };
            handle.prepare(&mut p, Instant::now());
            numbers.push(twcc(&p));
        }
        s.handle_write(rtp(10, 104)).unwrap();
        numbers.extend(written(&mut s).iter().map(twcc));
        assert_eq!(numbers, [Some(0), Some(1), Some(2), Some(3), Some(4)]);
        assert_eq!(s.state.lock().history.sent.len(), 5);
        // A NACK for a copy that never passed the chain is answered from the cache.
        s.handle_read(nack(10, &[101])).unwrap();
        let resent = written(&mut s);
        assert_eq!(
            resent
                .iter()
                .map(|p| (p.header.sequence_number, twcc(p)))
                .collect::<Vec<_>>(),
            [(101, Some(5))]
        );
        assert_eq!(resent[0].payload, bytes::Bytes::from(vec![101u8; 100]));
    }

    #[test]
    fn a_nack_is_answered_from_the_cache_and_the_copy_is_numbered_anew() {
        let mut s = side();
        s.bind_local_stream(&info(10, None));
        for seq in 100..110 {
            s.handle_write(rtp(10, seq)).unwrap();
        }
        written(&mut s);
        s.handle_read(nack(10, &[103, 107, 200])).unwrap();
        let resent = written(&mut s);
        assert_eq!(
            resent
                .iter()
                .map(|p| (p.header.sequence_number, twcc(p)))
                .collect::<Vec<_>>(),
            [(103, Some(10)), (107, Some(11))],
            "200 was never sent"
        );
        assert_eq!(resent[0].payload[..], [103u8; 100]);
        // The NACK itself goes on to the application side (counted by the tap).
        assert!(s.poll_read().is_some());
    }

    #[test]
    fn with_rtx_a_resent_packet_goes_out_on_the_rtx_stream_with_its_original_number() {
        let mut s = side();
        s.bind_local_stream(&info(10, Some((11, 97))));
        for seq in 0..5 {
            s.handle_write(rtp(10, seq)).unwrap();
        }
        written(&mut s);
        s.handle_read(nack(10, &[2, 4])).unwrap();
        let resent = written(&mut s);
        assert_eq!(resent.len(), 2);
        for (i, (p, osn)) in resent.iter().zip([2u16, 4]).enumerate() {
            assert_eq!(p.header.ssrc, 11);
            assert_eq!(p.header.payload_type, 97);
            assert_eq!(p.header.sequence_number, i as u16);
            assert_eq!(p.payload[..2], osn.to_be_bytes());
            assert_eq!(p.payload.len(), 102);
            assert_eq!(twcc(p), None, "the RTX stream is not one we number");
        }
    }

    #[test]
    fn the_cache_keeps_the_last_packets_only() {
        let mut s = side();
        s.bind_local_stream(&info(10, None));
        // Across the sequence number's wrap.
        for i in 0..(CACHE as u32 + 100) {
            s.handle_write(rtp(10, (65_000 + i) as u16)).unwrap();
        }
        written(&mut s);
        let newest = (65_000 + CACHE as u32 + 99) as u16;
        let oldest_kept = newest.wrapping_sub(CACHE as u16 - 1);
        s.handle_read(nack(
            10,
            &[oldest_kept.wrapping_sub(1), oldest_kept, newest],
        ))
        .unwrap();
        let resent: Vec<u16> = written(&mut s)
            .iter()
            .map(|p| p.header.sequence_number)
            .collect();
        assert_eq!(resent, [oldest_kept, newest]);
    }

    #[test]
    fn nacks_for_a_paused_downtrack_are_not_answered_nor_passed_on() {
        let paused = super::super::nack_guard::PausedSsrcs::default();
        let mut s = guarded(paused.clone(), Default::default(), 0..5);
        paused.set(10, true, Some(4));
        s.handle_read(nack(10, &[1, 2])).unwrap();
        assert!(written(&mut s).is_empty());
        assert!(
            s.poll_read().is_none(),
            "a NACK left with nothing is dropped"
        );
    }

    #[test]
    fn the_retransmission_budget_charges_each_resend_its_cached_size() {
        let budget = super::super::nack_guard::RetransmissionBudget::default();
        let mut s = guarded(Default::default(), budget.clone(), 0..300);
        // 800 kbit/s: a 25 kB bucket. Packets of 112 bytes: 223 of them, where the
        // 1,200 bytes charged for a packet of unknown size would allow 20.
        budget.set_estimate(Some(800_000.0));
        s.handle_read(nack(10, &(0..300).collect::<Vec<_>>()))
            .unwrap();
        assert_eq!(written(&mut s).len(), 25_000 / 112);
    }

    /// The history reports exactly what webrtc-rs's `History` (which the chain's
    /// congestion-control interceptor used) reports, over sends, losses, reordered and
    /// repeated feedback, and write-offs.
    #[test]
    fn the_history_reports_what_webrtc_rs_history_reports() {
        let t0 = Instant::now();
        let mut ours = History::default();
        let mut theirs = rtc::interceptor::History::new();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut sent: u16 = 60_000; // wraps during the run
        let mut reported = 0;
        for step in 0..4_000u64 {
            let now = t0 + Duration::from_millis(step * 5);
            for _ in 0..(next() % 4) {
                let (ssrc, seq, size) = (7, sent.wrapping_add(3), 200 + (next() % 1000) as usize);
                ours.add(
                    sent,
                    Sent {
                        ssrc,
                        sequence: seq,
                        size,
                        departure: now,
                        ack: None,
                    },
                );
                theirs.add_outgoing(ssrc, seq, true, sent, size, now);
                sent = sent.wrapping_add(1);
            }
            if next() % 8 == 0 {
                // Feedback on a window of recent numbers: some lost, some late, some twice.
                let base = sent.wrapping_sub((next() % 40) as u16);
                let acks: Vec<Acknowledgement> = (0..(next() % 30) as u16)
                    .map(|i| {
                        let n = base.wrapping_add(i);
                        if next() % 10 == 0 {
                            Acknowledgement::lost(n)
                        } else {
                            Acknowledgement::received(
                                n,
                                Some(Duration::from_millis(step * 5 + i as u64)),
                                Ecn::NotEct,
                            )
                        }
                    })
                    .collect();
                for a in &acks {
                    ours.acknowledge(a);
                    theirs.on_twcc_feedback(now, *a);
                }
                let (a, b) = (ours.take_reports(), theirs.take_reports());
                reported += a.len();
                assert_eq!(a, b, "step {step}");
            }
            if step % 20 == 0 {
                let cutoff = now.checked_sub(Duration::from_millis(300)).unwrap_or(t0);
                ours.prune(cutoff);
                theirs.prune_before(cutoff);
                assert_eq!(ours.sent.len(), theirs.len(), "step {step}");
            }
        }
        assert!(reported > 1_000, "{reported}");
    }
}
