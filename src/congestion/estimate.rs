//! The bandwidth estimate of one subscriber connection.
//!
//! The subscriber connection's send side (`media::send_side`) numbers and records
//! every packet that leaves and resolves the subscriber's transport-wide CC feedback
//! into [`PacketReport`]s, as webrtc-rs's congestion-control interceptor does. It
//! drives a [`BandwidthEstimator`], which is this type. We wrap the library's GCC (delay
//! trendline + AIMD, loss controller) and add what an SFU's allocator needs and GCC
//! does not say:
//!
//! - the **acknowledged rate** (what actually arrived over the last second), because
//!   this GCC port climbs without bound on a quiet path (there is no "1.5 × what was
//!   received" ceiling as in libwebrtc), so its raw target says nothing above what was
//!   sent. The estimate we act on is `min(gcc, 1.5 × shown + 100 kbit/s)`, or a
//!   rate a padding probe has just verified, where *shown* is the highest
//!   acknowledged rate of the last [`SHOWN_FOR`] (see there why not the current one);
//! - the **queuing delay** (one-way delay above its minimum over the last 10 s), the
//!   earliest sign that a probe has found the ceiling, before anything is lost;
//! - the **loss** fraction per window.
//!
//! Why shared (`Arc<Mutex<…>>`): the interceptor owns its estimator inside the
//! connection's chain and the application cannot reach it there; the media task keeps
//! a clone of the handle. Both are used only from the media task, so the lock is never
//! contended; a std mutex, because nothing awaits while it is held.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rtc::interceptor::{BandwidthEstimator, Gcc, PacketReport};

/// The window over which arrived bytes and losses are summed.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// The window of the one-way delay minimum (the path's base delay).
const BASE_DELAY_WINDOW: Duration = Duration::from_secs(10);
/// Feedback batches kept (bounded whatever the feedback rate).
const MAX_BATCHES: usize = 256;
/// Headroom over what was acknowledged that the estimate may claim without a probe.
const ACKED_HEADROOM: f64 = 1.5;
const ACKED_SLACK_BPS: f64 = 100_000.0;
/// The ceiling above is taken over the highest acknowledged rate of this long, not the
/// last second's: a video's rate follows its keyframes, and a second-long window that
/// has just let the last keyframe go, before the next one is acknowledged, reads the
/// stream's own quiet stretch as the path's limit. Measured on an RTMP push (1 s GOP)
/// to Chrome over loopback: every other keyframe the ceiling fell to 337 kbit/s (1.5 ×
/// 158 kbit/s and the slack) while the keyframe itself was being sent, the allocator
/// saw a deficit, and the subscriber was told `warning` for 50 ms every 2 s at no loss
/// and 0.3 ms of queuing (and its capacity was passed upstream as a limit). This long
/// covers the keyframe intervals pushers use (1–4 s, and more); a path that stops
/// carrying it shows loss or queuing first, which backs the estimate off from the
/// current rate.
const SHOWN_FOR: Duration = Duration::from_secs(10);
/// An acknowledged rate counts towards `SHOWN_FOR`'s once its window spans this much
/// (right after the first feedback a few batches over a few ms say little).
const SHOWN_MIN_SPAN: f64 = 0.5;
/// Entries of the running maximum, bounded whatever the snapshot rate (one a 50 ms tick
/// fills at most 200; past the bound the oldest, which would expire first, goes).
const MAX_SHOWN: usize = 256;
/// Queuing this deep, or this much loss, means the path is over capacity now: the
/// estimate drops to what is arriving, less a margin, whatever GCC still says (its
/// delay detector needs a trend over several groups, and this port backs off from a
/// rate it computes itself; a standing queue of this size is evidence enough).
const OVERUSE_QUEUING_MS: f64 = 60.0;
const OVERUSE_LOSS: f64 = 0.1;
const OVERUSE_BACKOFF: f64 = 0.85;
/// A probe's verified rate stands in for the acknowledged rate this long, while the
/// media it lets through ramps up the acknowledged window.
const VERIFIED_FOR: Duration = Duration::from_secs(3);

/// One feedback batch, summarised.
#[derive(Debug, Clone, Copy)]
struct Batch {
    at: Instant,
    arrived_bytes: usize,
    packets: usize,
    lost: usize,
}

struct State {
    gcc: Gcc,
    initial: f64,
    min: f64,
    max: f64,
    batches: VecDeque<Batch>,
    /// One-way delay samples' minimum per 500 ms bucket, over the base window.
    delay_minima: VecDeque<(Instant, f64)>,
    /// The latest batch's largest one-way delay (ms, receiver clock minus ours: only
    /// differences mean anything).
    last_delay_ms: Option<f64>,
    /// An epoch for departures, so they and arrivals can be subtracted.
    epoch: Option<Instant>,
    verified: Option<(f64, Instant)>,
    last_feedback: Option<Instant>,
    /// The estimate dropped (GCC backed off) at these instants: a warning sign.
    last_backoff: Option<Instant>,
    last_target: f64,
    /// The running maximum of the acknowledged rate over `SHOWN_FOR`: (when, bit/s),
    /// decreasing from front to back, so the front is the maximum.
    shown: VecDeque<(Instant, f64)>,
    /// An acknowledged rate has been measured over `SHOWN_MIN_SPAN` since the start
    /// (or the last reset). Until then there is no estimate: the ceiling would be
    /// 1.5 × nothing + 100 kbit/s, and every new subscriber was told `warning` at its
    /// first feedback (measured: for 50 ms, on loopback, at no loss).
    measured: bool,
    /// After a reset: packets that left before the path came back (the first one
    /// reported arrived) were lost to the outage and are no evidence; `Some(None)`
    /// until that first arrival is seen.
    path_since: Option<Option<Instant>>,
}

impl State {
    /// Records `acknowledged` (measured over `span` seconds) and returns the highest
    /// acknowledged rate of the last [`SHOWN_FOR`], this one included.
    fn show(&mut self, now: Instant, acknowledged: f64, span: f64) -> f64 {
        if span >= SHOWN_MIN_SPAN {
            while self.shown.back().is_some_and(|(_, v)| *v <= acknowledged) {
                self.shown.pop_back();
            }
            if self.shown.len() == MAX_SHOWN {
                self.shown.pop_front();
            }
            self.shown.push_back((now, acknowledged));
            self.measured = true;
        }
        while self
            .shown
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > SHOWN_FOR)
        {
            self.shown.pop_front();
        }
        self.shown
            .front()
            .map_or(acknowledged, |(_, v)| v.max(acknowledged))
    }

    fn new(initial: f64, min: f64, max: f64) -> Self {
        Self {
            gcc: Gcc::new(initial, min, max),
            initial,
            min,
            max,
            batches: VecDeque::new(),
            delay_minima: VecDeque::new(),
            last_delay_ms: None,
            epoch: None,
            verified: None,
            last_feedback: None,
            last_backoff: None,
            last_target: initial,
            shown: VecDeque::new(),
            measured: false,
            path_since: None,
        }
    }
}

/// What the allocator reads, at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// The estimate to allocate against (bit/s); `None` until an acknowledged rate has
    /// been measured (feedback over half a second), and while feedback is stale.
    pub estimate: Option<f64>,
    /// GCC's own target (bit/s).
    pub gcc: f64,
    /// What arrived at the subscriber over the last second (bit/s).
    pub acknowledged: f64,
    /// Lost fraction over the last second, 0..=1.
    pub loss: f64,
    /// One-way delay above the path's recent minimum (ms).
    pub queuing_delay_ms: f64,
    /// GCC backed off within the last 2 s.
    pub backing_off: bool,
    /// Feedback batches seen in the window (a probe's verdict needs some).
    pub batches: usize,
}

/// Feedback batches whose coverage is remembered (a few seconds of feedback).
const COVERAGE_KEPT: usize = 128;

/// The transport-wide sequence numbers the subscriber's *received* feedback spoke of:
/// `(base, count)` of each TWCC feedback, recorded by the connection's send side
/// before it resolves that feedback against its history.
///
/// Why: the feedback history (webrtc-rs's, and the send side's, which keeps its
/// semantics) reports every packet no feedback mentioned as
/// lost once a later one is acknowledged, so a lost *feedback* packet reads as the loss
/// of every packet it covered. On a path losing 5 % both ways that doubled the loss GCC
/// saw, past its 10 % threshold, and a subscriber's video was paused on a link with
/// room to spare (`tests/sfu_media.rs`, the 5 % loss fault test). A loss counts only
/// when received feedback said so.
#[derive(Clone, Default)]
pub struct FeedbackCoverage(Arc<Mutex<VecDeque<(u16, u16)>>>);

impl FeedbackCoverage {
    /// A received feedback covered `count` sequence numbers from `base`.
    pub fn record(&self, base: u16, count: u16) {
        let mut c = self.0.lock().unwrap_or_else(|e| e.into_inner());
        c.push_back((base, count));
        while c.len() > COVERAGE_KEPT {
            c.pop_front();
        }
    }

    /// `reports` less the losses no received feedback reported (lost feedback packets,
    /// not lost media packets); all of them while none has been recorded (no tap).
    fn real<'a>(&self, reports: &'a [PacketReport]) -> std::borrow::Cow<'a, [PacketReport]> {
        let c = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let phantom = |r: &PacketReport| {
            !r.arrived
                && r.is_twcc
                && !c.is_empty()
                && !c
                    .iter()
                    .any(|&(base, count)| r.twcc_sequence_number.wrapping_sub(base) < count)
        };
        if reports.iter().any(phantom) {
            reports.iter().filter(|r| !phantom(r)).cloned().collect()
        } else {
            std::borrow::Cow::Borrowed(reports)
        }
    }
}

/// The estimator handle: give one clone to the connection's congestion-control
/// interceptor, keep one to read.
#[derive(Clone)]
pub struct SharedEstimator(Arc<Mutex<State>>, FeedbackCoverage);

impl SharedEstimator {
    /// Starts optimistic at `initial` (GCC only ever backs off from evidence; the
    /// acknowledged-rate ceiling keeps the estimate honest above what was sent).
    pub fn new(initial: f64, min: f64, max: f64) -> Self {
        Self(
            Arc::new(Mutex::new(State::new(initial, min, max))),
            FeedbackCoverage::default(),
        )
    }

    /// The connection's path was replaced (an ICE restart): everything learnt about
    /// the old one (its losses during the outage above all) is forgotten, and the
    /// estimate starts again as on a new connection.
    pub fn reset(&self) {
        let mut s = self.lock();
        *s = State::new(s.initial, s.min, s.max);
        s.path_since = Some(None);
    }

    /// What the connection's send side records feedback coverage into.
    pub fn coverage(&self) -> FeedbackCoverage {
        self.1.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding it would be a bug in this file; the state is still usable.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A probe delivered `bps` without queuing or loss: restart GCC from there if that
    /// is above its target, and let the estimate claim it for a while.
    ///
    /// A probe's rate is a floor, never a ceiling: a probe towards a small goal (a
    /// layer that has just started and measures a few kbit/s) succeeds at what little
    /// it asked for, and restarting GCC from there dropped a clean subscriber's
    /// estimate from its start to 83 kbit/s, whence GCC climbs slowly: its video was
    /// paused on an idle link (CI, `tests/simulcast.rs`).
    pub fn verified(&self, bps: f64, now: Instant) {
        let mut s = self.lock();
        let bps = bps.clamp(s.min, s.max);
        if bps > s.gcc.target_bitrate() {
            s.gcc = Gcc::new(bps, s.min, s.max);
            s.last_target = bps;
        }
        let kept = s
            .verified
            .filter(|(v, at)| *v > bps && now.saturating_duration_since(*at) < VERIFIED_FOR);
        s.verified = Some(kept.unwrap_or((bps, now)));
    }

    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let mut s = self.lock();
        let window: Vec<&Batch> = s
            .batches
            .iter()
            .filter(|b| now.saturating_duration_since(b.at) <= RATE_WINDOW)
            .collect();
        // Bytes reported after the window's first batch, over the time since it.
        let span = window
            .first()
            .map(|b| now.saturating_duration_since(b.at).as_secs_f64())
            .unwrap_or(0.0);
        let arrived: usize = window.iter().skip(1).map(|b| b.arrived_bytes).sum();
        let packets: usize = window.iter().map(|b| b.packets).sum();
        let lost: usize = window.iter().map(|b| b.lost).sum();
        let acknowledged = if span > 0.05 {
            arrived as f64 * 8.0 / span
        } else {
            0.0
        };
        let loss = if packets == 0 {
            0.0
        } else {
            lost as f64 / packets as f64
        };
        let base = s
            .delay_minima
            .iter()
            .map(|(_, d)| *d)
            .fold(f64::INFINITY, f64::min);
        let queuing_delay_ms = match s.last_delay_ms {
            Some(d) if base.is_finite() => (d - base).max(0.0),
            _ => 0.0,
        };
        let fresh = s
            .last_feedback
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(2));
        let batches = window.len();
        let shown = s.show(now, acknowledged, span);
        let gcc = s.gcc.target_bitrate();
        let ceiling = match s.verified {
            Some((v, at)) if now.saturating_duration_since(at) < VERIFIED_FOR => {
                v.max(shown * ACKED_HEADROOM + ACKED_SLACK_BPS)
            }
            _ => shown * ACKED_HEADROOM + ACKED_SLACK_BPS,
        };
        let overused = queuing_delay_ms > OVERUSE_QUEUING_MS || loss > OVERUSE_LOSS;
        let ceiling = if overused {
            ceiling.min(acknowledged * OVERUSE_BACKOFF)
        } else {
            ceiling
        };
        Snapshot {
            estimate: (fresh && s.measured).then(|| gcc.min(ceiling).max(s.min)),
            gcc,
            acknowledged,
            loss,
            queuing_delay_ms,
            backing_off: overused
                || s.last_backoff
                    .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(2)),
            batches,
        }
    }
}

impl BandwidthEstimator for SharedEstimator {
    fn on_reports(&mut self, now: Instant, reports: &[PacketReport]) {
        // A "loss" no received feedback reported is a lost feedback packet, not a lost
        // media packet: it is left out (see `FeedbackCoverage`).
        let reports = self.1.real(reports);
        let mut s = self.lock();
        // After a reset, only what left once the new path worked counts.
        let reports: std::borrow::Cow<'_, [PacketReport]> = match s.path_since {
            None => reports,
            Some(since) => {
                let since =
                    since.or_else(|| reports.iter().find(|r| r.arrived).map(|r| r.departure));
                s.path_since = Some(since);
                match since {
                    Some(t) => reports
                        .iter()
                        .filter(|r| r.departure >= t)
                        .cloned()
                        .collect(),
                    None => std::borrow::Cow::Owned(Vec::new()),
                }
            }
        };
        let reports = &reports[..];
        if reports.is_empty() {
            return;
        }
        s.gcc.on_reports(now, reports);
        let target = s.gcc.target_bitrate();
        if target < s.last_target * 0.95 {
            s.last_backoff = Some(now);
        }
        s.last_target = target;
        s.last_feedback = Some(now);

        let epoch = *s.epoch.get_or_insert(reports[0].departure);
        let mut arrived_bytes = 0;
        let mut lost = 0;
        let mut delays = Vec::new();
        for r in reports {
            match r.arrival {
                Some(arrival) if r.arrived => {
                    arrived_bytes += r.size;
                    let departure = r.departure.saturating_duration_since(epoch);
                    delays.push((arrival.as_secs_f64() - departure.as_secs_f64()) * 1000.0);
                }
                _ => lost += 1,
            }
        }
        s.batches.push_back(Batch {
            at: now,
            arrived_bytes,
            packets: reports.len(),
            lost,
        });
        while s.batches.len() > MAX_BATCHES
            || s.batches
                .front()
                .is_some_and(|b| now.saturating_duration_since(b.at) > RATE_WINDOW * 2)
        {
            s.batches.pop_front();
        }
        if !delays.is_empty() {
            // The batch's worst delay: a queue shows at its tail first.
            let max = delays.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let min = delays.iter().copied().fold(f64::INFINITY, f64::min);
            s.last_delay_ms = Some(max);
            match s.delay_minima.back_mut() {
                Some((at, m))
                    if now.saturating_duration_since(*at) < Duration::from_millis(500) =>
                {
                    *m = m.min(min);
                }
                _ => s.delay_minima.push_back((now, min)),
            }
            while s
                .delay_minima
                .front()
                .is_some_and(|(at, _)| now.saturating_duration_since(*at) > BASE_DELAY_WINDOW)
                || s.delay_minima.len() > MAX_BATCHES
            {
                s.delay_minima.pop_front();
            }
        }
    }

    fn target_bitrate(&self) -> f64 {
        self.lock().gcc.target_bitrate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::rtcp::transport_feedbacks::cc_feedback_report::Ecn;

    /// Feeds `seconds` of 100 packets/s of `size` bytes, each delayed `delay(i)` ms on
    /// the way, every `lose_every`th lost; feedback every 100 ms.
    fn feed(
        est: &mut SharedEstimator,
        epoch: Instant,
        from_s: f64,
        seconds: f64,
        size: usize,
        delay: impl Fn(u64) -> f64,
        lose_every: u64,
    ) -> Instant {
        let start = (from_s * 100.0) as u64;
        let end = ((from_s + seconds) * 100.0) as u64;
        let mut batch = Vec::new();
        let mut now = epoch;
        for i in start..end {
            let departure = epoch + Duration::from_millis(i * 10);
            let lost = lose_every > 0 && i % lose_every == 0;
            let arrival_ms = i as f64 * 10.0 + 20.0 + delay(i);
            batch.push(packet_report(
                i,
                departure,
                size,
                (!lost).then(|| Duration::from_secs_f64(arrival_ms / 1000.0)),
            ));
            if batch.len() == 10 {
                now = departure + Duration::from_millis(30);
                est.on_reports(now, &batch);
                batch.clear();
            }
        }
        now
    }

    #[test]
    fn the_estimate_is_held_near_what_was_acknowledged() {
        let mut est = SharedEstimator::new(5_000_000.0, 50_000.0, 20_000_000.0);
        let epoch = Instant::now();
        assert_eq!(
            est.snapshot(epoch).estimate,
            None,
            "no feedback, no estimate"
        );
        // 100 packets/s of 1250 bytes: 1 Mbit/s, clean.
        let now = feed(&mut est, epoch, 0.0, 3.0, 1250, |_| 0.0, 0);
        let s = est.snapshot(now);
        assert!((s.acknowledged - 1_000_000.0).abs() < 150_000.0, "{s:?}");
        let e = s.estimate.unwrap();
        assert!(e > 1_400_000.0 && e < 1_700_000.0, "{s:?}");
        assert!(s.loss < 0.01 && s.queuing_delay_ms < 1.0, "{s:?}");
    }

    /// The first feedback is no measurement: no estimate until half a second of it (the
    /// ceiling would be 100 kbit/s, and every new subscriber was told `warning`).
    #[test]
    fn no_estimate_before_a_rate_is_measured() {
        let mut est = SharedEstimator::new(5_000_000.0, 50_000.0, 20_000_000.0);
        let epoch = Instant::now();
        let now = feed(&mut est, epoch, 0.0, 0.3, 1250, |_| 0.0, 0);
        assert_eq!(est.snapshot(now).estimate, None, "{:?}", est.snapshot(now));
        let now = feed(&mut est, epoch, 0.3, 0.7, 1250, |_| 0.0, 0);
        let e = est.snapshot(now).estimate.expect("measured by now");
        assert!(e > 1_400_000.0, "{e}");
    }

    /// A video whose rate follows its keyframes (one every 2 s, as pushers send)
    /// over a clean path: the estimate's ceiling stays over what the path has shown,
    /// never the stream's quiet stretch between two keyframes. On the old ceiling (the
    /// last second's acknowledged rate) it fell to 1.5 × the P-frames' rate + 100 kbit/s
    /// whenever the window held no keyframe, and the allocator read the next keyframe
    /// as a deficit (measured on an RTMP push with a 1 s GOP to Chrome, where feedback
    /// timing lets the window miss every other keyframe: `warning` every 2 s).
    #[test]
    fn the_ceiling_does_not_fall_between_keyframes() {
        let mut est = SharedEstimator::new(5_000_000.0, 50_000.0, 20_000_000.0);
        let epoch = Instant::now();
        // (departure ms, bytes): a 30-packet keyframe (36 kB) each 2 s, and two
        // 800-byte packets every 33 ms: 144 + 378 kbit/s.
        let mut sent: Vec<(u64, usize)> = Vec::new();
        for gop in 0..8u64 {
            for p in 0..30 {
                sent.push((gop * 2000 + p, 1200));
            }
            for f in 1..60 {
                sent.push((gop * 2000 + f * 33, 800));
                sent.push((gop * 2000 + f * 33 + 1, 800));
            }
        }
        sent.sort();
        let mut next = 0;
        let mut lowest = f64::INFINITY;
        let mut highest: f64 = 0.0;
        // Feedback every 50 ms for what left before it, each packet 20 ms on the way;
        // the allocator reads a snapshot after each.
        for tick in 1..(16 * 20) {
            let at_ms = tick * 50;
            let mut batch = Vec::new();
            while next < sent.len() && sent[next].0 + 20 <= at_ms {
                let (left, size) = sent[next];
                batch.push(packet_report(
                    next as u64,
                    epoch + Duration::from_millis(left),
                    size,
                    Some(Duration::from_millis(left + 20)),
                ));
                next += 1;
            }
            let now = epoch + Duration::from_millis(at_ms);
            if !batch.is_empty() {
                est.on_reports(now, &batch);
            }
            let s = est.snapshot(now);
            if at_ms >= 3_000 {
                let e = s.estimate.expect("feedback keeps coming");
                lowest = lowest.min(e);
                highest = highest.max(e);
                assert!(s.loss == 0.0 && !s.backing_off, "a clean path: {s:?}");
            }
        }
        // A second holding a keyframe carries ~660 kbit/s: the ceiling stays at 1.5 ×
        // that + 100 kbit/s (1.09 Mbit/s). On the old ceiling it swung between that
        // and 676 kbit/s (about 1.5 × a second of P-frames + 100).
        assert!(
            lowest > 950_000.0,
            "lowest {lowest:.0}, highest {highest:.0}"
        );
        assert!(
            highest < 1_300_000.0,
            "lowest {lowest:.0}, highest {highest:.0}"
        );
    }

    /// Packet `i` of a 100-packet/s stream: left at `i` × 10 ms, arrived 20 ms later.
    fn report(epoch: Instant, i: u16, size: usize, arrived: bool) -> PacketReport {
        packet_report(
            u64::from(i),
            epoch + Duration::from_millis(u64::from(i) * 10),
            size,
            arrived.then(|| Duration::from_millis(u64::from(i) * 10 + 20)),
        )
    }

    /// The report of packet `id` (its RTP and transport-wide sequence numbers too),
    /// `size` bytes that left at `departure` and arrived at `arrival` (receiver's
    /// clock), or was lost (`None`).
    fn packet_report(
        id: u64,
        departure: Instant,
        size: usize,
        arrival: Option<Duration>,
    ) -> PacketReport {
        PacketReport {
            ssrc: 1,
            id,
            rtp_sequence_number: id as u16,
            is_twcc: true,
            twcc_sequence_number: id as u16,
            size,
            arrived: arrival.is_some(),
            departure,
            arrival,
            ecn: Ecn::default(),
        }
    }

    /// After an ICE restart the estimate starts again, and the packets that left
    /// during the outage (reported lost once the new path works) are no evidence.
    #[test]
    fn after_a_reset_the_outage_is_not_counted() {
        let mut est = SharedEstimator::new(5_000_000.0, 50_000.0, 20_000_000.0);
        let epoch = Instant::now();
        feed(&mut est, epoch, 0.0, 2.0, 1250, |_| 0.0, 0);
        est.reset();
        assert_eq!(est.snapshot(epoch).estimate, None, "nothing known again");
        // The first feedback on the new path: 60 packets sent into the dead path
        // (lost), then 40 that arrived; then a clean second.
        let reports: Vec<PacketReport> = (200..300u16)
            .map(|i| report(epoch, i, 1250, i >= 260))
            .collect();
        est.on_reports(epoch + Duration::from_millis(3_030), &reports);
        let now = feed(&mut est, epoch, 3.0, 1.0, 1250, |_| 0.0, 0);
        let s = est.snapshot(now);
        assert!(s.loss < 0.01, "the outage's losses are forgotten: {s:?}");
        assert!(s.estimate.unwrap() > 1_000_000.0, "{s:?}");
        // Without the reset, the same feedback is 60 % loss.
        let mut plain = SharedEstimator::new(5_000_000.0, 50_000.0, 20_000_000.0);
        plain.on_reports(epoch + Duration::from_millis(3_030), &reports);
        assert!(plain.snapshot(epoch + Duration::from_millis(3_030)).loss > 0.5);
    }

    /// A packet counts as lost only when received feedback said so: the packets of a
    /// feedback that never arrived (webrtc-rs reports them as lost once a later one
    /// arrives) are left out, and the losses feedback did report still count.
    #[test]
    fn packets_of_a_lost_feedback_are_not_losses() {
        let mut est = SharedEstimator::new(1_000_000.0, 50_000.0, 20_000_000.0);
        let epoch = Instant::now();
        let cov = est.coverage();
        // Feedback covered 0..50 and 60..100; the one for 50..60 was lost.
        cov.record(0, 50);
        cov.record(60, 40);
        let reports: Vec<PacketReport> = (0..100u16)
            .map(|i| report(epoch, i, 1000, !(50..60).contains(&i) && i != 70 && i != 71))
            .collect();
        est.on_reports(epoch + Duration::from_millis(500), &reports[..50]);
        est.on_reports(epoch + Duration::from_millis(1000), &reports[50..]);
        let s = est.snapshot(epoch + Duration::from_millis(1000));
        // 2 of the 90 packets feedback spoke of.
        assert!((s.loss - 2.0 / 90.0).abs() < 0.001, "{s:?}");
        // Without any coverage recorded (no tap), every report stands, as before.
        let mut bare = SharedEstimator::new(1_000_000.0, 50_000.0, 20_000_000.0);
        bare.on_reports(epoch + Duration::from_millis(500), &reports[..50]);
        bare.on_reports(epoch + Duration::from_millis(1000), &reports[50..]);
        let s = bare.snapshot(epoch + Duration::from_millis(1000));
        assert!((s.loss - 0.12).abs() < 0.001, "{s:?}");
    }

    #[test]
    fn growing_delay_and_loss_bring_it_down() {
        let mut est = SharedEstimator::new(5_000_000.0, 50_000.0, 20_000_000.0);
        let epoch = Instant::now();
        feed(&mut est, epoch, 0.0, 2.0, 1250, |_| 0.0, 0);
        // A queue building at 3 ms per packet, and every 5th packet lost.
        let now = feed(
            &mut est,
            epoch,
            2.0,
            2.0,
            1250,
            |i| (i - 200) as f64 * 3.0,
            5,
        );
        let s = est.snapshot(now);
        assert!(s.queuing_delay_ms > 100.0, "{s:?}");
        assert!((s.loss - 0.2).abs() < 0.05, "{s:?}");
        assert!(s.backing_off, "{s:?}");
        // What arrives (800 kbit/s) less a margin.
        assert!(s.estimate.unwrap() < 700_000.0, "{s:?}");
    }

    #[test]
    fn a_verified_rate_is_claimed_for_a_while_then_falls_back() {
        let mut est = SharedEstimator::new(5_000_000.0, 50_000.0, 20_000_000.0);
        let epoch = Instant::now();
        // Audio only: 100 packets/s of 60 bytes, 48 kbit/s.
        let now = feed(&mut est, epoch, 0.0, 2.0, 60, |_| 0.0, 0);
        assert!(est.snapshot(now).estimate.unwrap() < 200_000.0);
        est.verified(1_200_000.0, now);
        assert!(est.snapshot(now).estimate.unwrap() >= 1_199_000.0);
        let later = feed(&mut est, epoch, 2.0, 4.0, 60, |_| 0.0, 0);
        assert!(est.snapshot(later).estimate.unwrap() < 200_000.0);
    }

    #[test]
    fn stale_feedback_gives_no_estimate() {
        let mut est = SharedEstimator::new(1_000_000.0, 50_000.0, 20_000_000.0);
        let epoch = Instant::now();
        let now = feed(&mut est, epoch, 0.0, 1.0, 1000, |_| 0.0, 0);
        assert!(est.snapshot(now).estimate.is_some());
        assert!(est
            .snapshot(now + Duration::from_secs(3))
            .estimate
            .is_none());
    }

    #[test]
    fn a_probe_verifying_less_than_the_estimate_does_not_lower_it() {
        let mut est = SharedEstimator::new(1_000_000.0, 50_000.0, 20_000_000.0);
        let epoch = Instant::now();
        let now = feed(&mut est, epoch, 0.0, 3.0, 1250, |_| 0.0, 0);
        let before = est.snapshot(now);
        est.verified(83_000.0, now);
        let after = est.snapshot(now);
        assert!(after.gcc >= before.gcc, "{before:?} -> {after:?}");
        assert_eq!(after.estimate, before.estimate);
        // A probe above the target still lifts it.
        est.verified(5_000_000.0, now);
        assert!(est.snapshot(now).gcc >= 5_000_000.0);
    }
}
