//! Bounds how often a subscriber can make us retransmit a packet.
//!
//! webrtc-rs's NACK responder answers every request from its send buffer, however
//! often the same packet is asked for. A receiver whose NACK generator never learns
//! that a retransmission arrived (measured: a webrtc-rs client with RTX asked for the
//! same three packets ~29 times a second for ten seconds, ~240 kbit/s of repeats) then
//! fills its own bottleneck and loses the audio sharing it. The subscriber
//! connection's send side (`send_side`) runs every inbound RTCP packet through this
//! guard before it answers NACKs from its packet cache; the guard removes, from each NACK, packets
//! already retransmitted [`MAX_RETRANSMISSIONS`] times or less than [`MIN_INTERVAL`]
//! ago; a NACK left with nothing is dropped. Memory is bounded by [`MAX_TRACKED`]
//! requests; what a resend costs is the size of the packet the send side cached.
//!
//! Requests for a **paused** downtrack are not answered at all: the allocator stopped
//! it because the link is full, the packets asked for belong to frames that will never
//! be shown (the resume starts from a fresh keyframe), and resending them would take
//! the bandwidth the audio needs. The media task says which SSRCs are paused through a
//! shared [`PausedSsrcs`] handle (the guard itself lives inside the connection's chain).
//! The pause also sets a fence: packets sent before it are not resent after the video
//! resumes either (measured: without it, the 74 packets the bottleneck had dropped just
//! before the pause went out again, in one burst, the moment the video resumed).
//!
//! Retransmissions are bounded in rate too: at most [`RTX_SHARE`] of the
//! subscriber's bandwidth estimate (a token bucket [`RTX_WINDOW`] deep), which the
//! media task shares through a [`RetransmissionBudget`] handle. Measured without it:
//! when a link was capped at 700 kbit/s, Weir sent 3 Mbit/s of retransmissions for
//! half a second (every lost packet asked for, its copies lost again), which took the
//! estimate far below what the link carried and paused a video that fitted.
//! A packet's retransmissions are counted for as long as the receiver keeps asking
//! for it: a webrtc-rs receiver never learns that an RTX copy arrived and asks again
//! and again, and forgetting the count after two seconds granted three more copies
//! of each (a second burst of 2 Mbit/s, on the same 700 kbit/s link).
//!
//! Padding is never resent either: the guard notes the padding-only packets (probes)
//! it sees leave, and drops requests for them. Measured: a webrtc-rs receiver does not
//! count padding as received and, once the video resumed, asked for all of it again
//! (~125 kB in a quarter of a second, twice).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rtc::rtcp::transport_feedbacks::transport_layer_nack::{
    nack_pairs_from_sequence_numbers, TransportLayerNack,
};

pub const MAX_RETRANSMISSIONS: u8 = 3;
/// Less than a round trip on most paths is a duplicate request, not a new loss.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Requests remembered (a second of 1000-packet/s video, with room to spare).
pub const MAX_TRACKED: usize = 4096;
/// A packet not asked for in this long is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(2);

/// A connection's paused downtracks (by SSRC), and for each downtrack ever paused the
/// last sequence number sent before that pause. Shared with its guard.
/// Per SSRC: paused now, and the fence (last sequence number sent before a pause).
type PauseStates = HashMap<u32, (bool, Option<u16>)>;

#[derive(Clone, Default)]
pub struct PausedSsrcs(Arc<Mutex<PauseStates>>);

impl PausedSsrcs {
    /// Pauses (with the last sequence number sent, the fence) or resumes a downtrack.
    pub fn set(&self, ssrc: u32, paused: bool, last_sent: Option<u16>) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let e = s.entry(ssrc).or_insert((false, None));
        e.0 = paused;
        if paused {
            e.1 = last_sent.or(e.1);
        }
    }

    pub fn forget(&self, ssrc: u32) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ssrc);
    }

    fn state(&self, ssrc: u32) -> (bool, Option<u16>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ssrc)
            .copied()
            .unwrap_or((false, None))
    }
}

/// Padding packets remembered, per connection.
const MAX_PADDING: usize = 4096;

/// The share of the subscriber's estimate retransmissions may take, and the depth of
/// the token bucket (a burst of this long at that rate).
pub const RTX_SHARE: f64 = 0.5;
pub const RTX_WINDOW: Duration = Duration::from_millis(500);
/// What a retransmission is charged when the packet's size is not known.
const RTX_DEFAULT_BYTES: u64 = 1_200;

/// The subscriber's bandwidth estimate (bit/s; 0: none, retransmissions unbounded in
/// rate), written by the media task on each congestion tick, read by its guard.
#[derive(Clone, Default)]
pub struct RetransmissionBudget(Arc<std::sync::atomic::AtomicU64>);

impl RetransmissionBudget {
    pub fn set_estimate(&self, bps: Option<f64>) {
        self.0.store(
            bps.map_or(0, |b| b.max(0.0) as u64),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    fn estimate(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct NackGuard {
    paused: PausedSsrcs,
    budget: RetransmissionBudget,
    /// Bytes that may be retransmitted now, and when they were last refilled.
    tokens: f64,
    refilled: Option<Instant>,
    padding: HashSet<(u32, u16)>,
    padding_order: VecDeque<(u32, u16)>,
    /// Per packet: retransmissions granted, the last grant, the last request.
    asked: HashMap<(u32, u16), (u8, Instant, Instant)>,
    order: VecDeque<((u32, u16), Instant)>,
    suppressed: Option<prometheus::IntCounter>,
}

impl NackGuard {
    pub fn new(
        suppressed: Option<prometheus::IntCounter>,
        paused: PausedSsrcs,
        budget: RetransmissionBudget,
    ) -> Self {
        Self {
            suppressed,
            paused,
            budget,
            ..Self::default()
        }
    }

    fn suppress(&self, n: usize) {
        if let Some(c) = &self.suppressed {
            c.inc_by(n as u64);
        }
    }

    /// Takes a retransmission of `bytes` from the bucket, if the estimate allows it.
    fn afford(&mut self, bytes: u64, now: Instant) -> bool {
        let bps = self.budget.estimate();
        if bps == 0 {
            return true;
        }
        let rate = bps as f64 / 8.0 * RTX_SHARE;
        let depth = rate * RTX_WINDOW.as_secs_f64();
        let elapsed = self
            .refilled
            .map_or(RTX_WINDOW, |t| now.saturating_duration_since(t));
        self.tokens = (self.tokens + rate * elapsed.as_secs_f64()).min(depth);
        self.refilled = Some(now);
        if self.tokens < bytes as f64 {
            return false;
        }
        self.tokens -= bytes as f64;
        true
    }

    /// The sequence numbers of `seqs` that may be retransmitted now.
    /// `size`: what the packet with a sequence number of this SSRC takes to resend, if
    /// it is known.
    fn allow(
        &mut self,
        ssrc: u32,
        seqs: Vec<u16>,
        now: Instant,
        size: &dyn Fn(u16) -> Option<usize>,
    ) -> Vec<u16> {
        let (paused, fence) = self.paused.state(ssrc);
        if paused {
            self.suppress(seqs.len());
            return Vec::new();
        }
        while let Some((key, at)) = self.order.front().copied() {
            if now.saturating_duration_since(at) < FORGET_AFTER && self.order.len() < MAX_TRACKED {
                break;
            }
            self.order.pop_front();
            // Forgotten once not asked for since this entry (its last request).
            if self
                .asked
                .get(&key)
                .is_some_and(|(_, _, asked)| *asked <= at)
            {
                self.asked.remove(&key);
            }
        }
        let mut out = Vec::new();
        for seq in seqs {
            let before_fence = fence.is_some_and(|f| seq.wrapping_sub(f) as i16 <= 0);
            if before_fence || self.padding.contains(&(ssrc, seq)) {
                self.suppress(1);
                continue;
            }
            let key = (ssrc, seq);
            let (count, last, _) = *self.asked.entry(key).or_insert((0, now, now));
            // Asked again: remembered for another FORGET_AFTER from now.
            self.asked.get_mut(&key).expect("just inserted").2 = now;
            self.order.push_back((key, now));
            let bytes = size(seq).map_or(RTX_DEFAULT_BYTES, |b| b as u64);
            if count >= MAX_RETRANSMISSIONS
                || (count > 0 && now.saturating_duration_since(last) < MIN_INTERVAL)
                || !self.afford(bytes, now)
            {
                self.suppress(1);
                continue;
            }
            let e = self.asked.get_mut(&key).expect("just inserted");
            e.0 = count + 1;
            e.1 = now;
            out.push(seq);
        }
        out
    }
}

impl NackGuard {
    /// Takes out of `packets` what may not be retransmitted now (NACKs for paused
    /// downtracks, padding, packets resent often or lately enough, over the budget).
    /// False if they held only NACKs and nothing is left worth passing on.
    /// `size`: what resending a packet (SSRC, sequence number) takes, if known.
    pub fn filter(
        &mut self,
        packets: &mut Vec<Box<dyn rtc::rtcp::Packet>>,
        now: Instant,
        size: &dyn Fn(u32, u16) -> Option<usize>,
    ) -> bool {
        if !packets
            .iter()
            .any(|p| p.as_any().downcast_ref::<TransportLayerNack>().is_some())
        {
            return true;
        }
        let mut changed = false;
        let mut kept: Vec<Box<dyn rtc::rtcp::Packet>> = Vec::with_capacity(packets.len());
        for p in packets.drain(..) {
            let Some(nack) = p.as_any().downcast_ref::<TransportLayerNack>() else {
                kept.push(p);
                continue;
            };
            let seqs: Vec<u16> = nack.nacks.iter().flat_map(|n| n.packet_list()).collect();
            let ssrc = nack.media_ssrc;
            let allowed = self.allow(ssrc, seqs.clone(), now, &|seq| size(ssrc, seq));
            if allowed.len() == seqs.len() {
                kept.push(p);
                continue;
            }
            changed = true;
            if !allowed.is_empty() {
                kept.push(Box::new(TransportLayerNack {
                    sender_ssrc: nack.sender_ssrc,
                    media_ssrc: nack.media_ssrc,
                    nacks: nack_pairs_from_sequence_numbers(&allowed),
                }));
            }
        }
        *packets = kept;
        !(changed && packets.is_empty())
    }

    /// Notes a padding-only packet leaving (never resent).
    pub fn padding_sent(&mut self, ssrc: u32, sequence_number: u16) {
        let key = (ssrc, sequence_number);
        if self.padding.insert(key) {
            self.padding_order.push_back(key);
            if self.padding_order.len() > MAX_PADDING {
                if let Some(old) = self.padding_order.pop_front() {
                    self.padding.remove(&old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_packet_is_retransmitted_a_bounded_number_of_times_and_not_in_bursts() {
        let mut g = NackGuard::new(
            None,
            PausedSsrcs::default(),
            RetransmissionBudget::default(),
        );
        let t0 = Instant::now();
        // Asked for every 30 ms for a second: three retransmissions, 100 ms apart at least.
        let mut granted = Vec::new();
        for i in 0..34u64 {
            let now = t0 + Duration::from_millis(i * 30);
            if !g.allow(1, vec![7], now, &|_| None).is_empty() {
                granted.push(i * 30);
            }
        }
        assert_eq!(granted.len(), MAX_RETRANSMISSIONS as usize, "{granted:?}");
        assert!(
            granted.windows(2).all(|w| w[1] - w[0] >= 100),
            "{granted:?}"
        );
        // Another packet, and the same number on another stream, are not affected.
        assert_eq!(g.allow(1, vec![8], t0, &|_| None), vec![8]);
        assert_eq!(g.allow(2, vec![7], t0, &|_| None), vec![7]);
    }

    #[test]
    fn padding_is_never_resent() {
        let mut g = NackGuard::new(
            None,
            PausedSsrcs::default(),
            RetransmissionBudget::default(),
        );
        let t0 = Instant::now();
        g.padding_sent(5, 10);
        assert_eq!(g.allow(5, vec![9, 10, 11], t0, &|_| None), vec![9, 11]);
    }

    #[test]
    fn a_paused_downtrack_gets_no_retransmissions() {
        let paused = PausedSsrcs::default();
        let mut g = NackGuard::new(None, paused.clone(), RetransmissionBudget::default());
        let t0 = Instant::now();
        paused.set(5, true, Some(2));
        assert!(g.allow(5, vec![1, 2, 3], t0, &|_| None).is_empty());
        assert_eq!(g.allow(6, vec![1], t0, &|_| None), vec![1]);
        paused.set(5, false, None);
        // After the resume, what was sent before the pause stays unanswered.
        assert_eq!(g.allow(5, vec![1, 2, 3, 4], t0, &|_| None), vec![3, 4]);
    }

    #[test]
    fn retransmissions_take_at_most_a_share_of_the_estimate() {
        let budget = RetransmissionBudget::default();
        let mut g = NackGuard::new(None, PausedSsrcs::default(), budget.clone());
        let t0 = Instant::now();
        // No estimate: as many as asked for.
        assert_eq!(g.allow(1, (0..100).collect(), t0, &|_| None).len(), 100);
        // 800 kbit/s: 50 kB/s for retransmissions, 25 kB at once; 1 200 B a packet.
        budget.set_estimate(Some(800_000.0));
        let burst = g.allow(2, (0..100).collect(), t0, &|_| None).len();
        assert_eq!(burst, 20, "{burst}");
        // A second later, the bucket is full again (25 kB: its depth), no more.
        let later = g
            .allow(
                2,
                (100..200).collect(),
                t0 + Duration::from_secs(1),
                &|_| None,
            )
            .len();
        assert_eq!(later, 20, "{later}");
        let mut granted = 0;
        for i in 0..100u64 {
            let now = t0 + Duration::from_secs(2) + Duration::from_millis(i * 10);
            granted += g.allow(3, vec![i as u16], now, &|_| None).len();
        }
        // One second at 50 kB/s plus the bucket: about 62 packets.
        assert!((55..=65).contains(&granted), "{granted}");
    }

    #[test]
    fn a_packet_asked_for_without_end_is_not_granted_again_later() {
        let mut g = NackGuard::new(
            None,
            PausedSsrcs::default(),
            RetransmissionBudget::default(),
        );
        let t0 = Instant::now();
        let mut granted = 0;
        // A receiver that never learns the copies arrived: asked for 30 times a second
        // for ten seconds.
        for i in 0..300u64 {
            granted += g
                .allow(1, vec![7], t0 + Duration::from_millis(i * 33), &|_| None)
                .len();
        }
        assert_eq!(granted, MAX_RETRANSMISSIONS as usize);
        // Forgotten once nobody asks for it any more.
        let later = t0 + Duration::from_secs(10) + FORGET_AFTER * 2;
        g.allow(2, vec![1], later, &|_| None);
        assert!(!g.asked.contains_key(&(1, 7)));
    }

    #[test]
    fn memory_stays_bounded() {
        let mut g = NackGuard::new(
            None,
            PausedSsrcs::default(),
            RetransmissionBudget::default(),
        );
        let t0 = Instant::now();
        for i in 0..20_000u32 {
            g.allow(
                i,
                vec![1, 2, 3],
                t0 + Duration::from_micros(u64::from(i)),
                &|_| None,
            );
        }
        assert!(g.asked.len() <= MAX_TRACKED + 3, "{}", g.asked.len());
        assert!(g.order.len() <= MAX_TRACKED + 3);
    }
}
