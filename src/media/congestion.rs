//! The media task's congestion tick: drives each subscriber's estimator and
//! allocator (`crate::congestion`, sans I/O) and applies what they decide — pausing
//! and resuming downtracks, padding probes, REMB to publishers, events to clients.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use weir_signaling::{CongestionLevel, CongestionPolicy, Kind, ServerMessage, Target};

use crate::congestion::{publisher_target, Change, CongestionState, Priority, Signals, VideoTrack};
use crate::room::SessionId;
use crate::server::control::ControlCommand;

use super::Media;

/// How often allocations are revisited (and padding is sent, in bursts of this much).
pub const TICK: Duration = Duration::from_millis(50);
/// How often rooms decide their publishers' targets.
pub const ROOM_INTERVAL: Duration = Duration::from_secs(1);
/// A client that is not in the normal state hears its state again this often.
const TELL_EVERY: Duration = Duration::from_secs(2);
/// A subscriber's REMB counts as its estimate for this long.
const REMB_VALID: Duration = Duration::from_secs(3);
/// Publishers are told again when their target moves by more than this fraction.
const TARGET_CHANGE: f64 = 0.1;

/// A publisher track's rate: bytes counted as they arrive, rolled into a smoothed
/// bit/s figure each tick.
///
/// A new track's first tick is not its rate: it is mostly its first keyframe (or the
/// publisher's startup probe), and taken as the rate it read 925 kbit/s for a screen
/// share that sent 100, then decayed over seconds; the allocator paused the camera
/// beside it on an idle link (CI, `tests/browser.rs`). Until [`RATE_SETTLES`] has been
/// seen, the rate is what arrived over that span (a short start is not a burst).
#[derive(Debug, Default)]
pub struct RateMeter {
    bytes: u64,
    bps: f64,
    /// The bytes and seconds seen while settling (it has settled once the seconds
    /// reach [`RATE_SETTLES`]).
    start: (u64, f64),
}

/// How long a new track is measured over before its rate is smoothed tick by tick.
const RATE_SETTLES: f64 = 0.5;

impl RateMeter {
    pub fn add(&mut self, bytes: usize) {
        self.bytes += bytes as u64;
    }

    fn roll(&mut self, seconds: f64) {
        let now = self.bytes as f64 * 8.0 / seconds;
        let (bytes, span) = &mut self.start;
        if *span >= RATE_SETTLES {
            // ~0.5 s of smoothing at 50 ms ticks: a keyframe is not a new rate.
            self.bps += 0.1 * (now - self.bps);
        } else {
            *bytes += self.bytes;
            *span += seconds;
            self.bps = *bytes as f64 * 8.0 / span.max(RATE_SETTLES);
        }
        self.bytes = 0;
    }

    pub fn bps(&self) -> f64 {
        self.bps
    }
}

/// Layers a simulcast publisher is sending as far as it was told (every layer it
/// opened and was not told to stop), and since when fewer would do.
#[derive(Debug, Default)]
pub struct Dynacast {
    told: Vec<String>,
    /// Every layer seen, so one that opens later counts as on (and can be told off).
    seen: Vec<String>,
    fewer_since: Option<Instant>,
}

impl Dynacast {
    /// The layers to tell the publisher to send, when that changes: every layer up
    /// to `highest` (the highest index of `order`, lowest first, that a subscriber is
    /// forwarded) and the next one. Layers are switched on at once, off only after
    /// being unused for `LAYER_OFF_AFTER`.
    pub fn decide(
        &mut self,
        now: Instant,
        stream_id: &str,
        order: &[String],
        highest: usize,
    ) -> Option<Vec<String>> {
        let needed: Vec<String> = order
            .iter()
            .take((highest + 2).min(order.len()))
            .cloned()
            .collect();
        // A publisher starts every layer on, and its layers open one by one (under
        // load, the top one seconds after the others): each is on from when it is
        // first seen. Taking the set at the first look missed a late top layer,
        // which then was never told off (a CI failure).
        for rid in order {
            if !self.seen.contains(rid) {
                self.seen.push(rid.clone());
                self.told.push(rid.clone());
            }
        }
        let fewer = self.told.iter().any(|r| !needed.contains(r));
        let more = needed.iter().any(|r| !self.told.contains(r));
        if fewer && !more {
            let since = *self.fewer_since.get_or_insert_with(|| {
                tracing::info!(
                    stream = %stream_id,
                    needed = ?needed,
                    highest_forwarded = highest,
                    after = ?LAYER_OFF_AFTER,
                    "simulcast layers unused: switched off unless needed again"
                );
                now
            });
            if now.saturating_duration_since(since) < LAYER_OFF_AFTER {
                return None;
            }
        } else if !more {
            if self.fewer_since.take().is_some() {
                tracing::info!(stream = %stream_id, highest_forwarded = highest, "simulcast layers needed again");
            }
            return None;
        }
        self.told = needed.clone();
        self.fewer_since = None;
        tracing::info!(
            stream = %stream_id,
            active = ?needed,
            ?order,
            highest_forwarded = highest,
            "simulcast layers needed"
        );
        Some(needed)
    }
}

/// A simulcast layer that starts sending is offered to subscribers after this long
/// (its smoothed rate has settled by then), unless no other layer is.
const LAYER_WARM_UP: Duration = Duration::from_millis(1500);

/// Switching a layer off waits this long (switching one on does not): a subscriber
/// that is lowered for a moment should find its layer still there.
const LAYER_OFF_AFTER: Duration = Duration::from_secs(5);

/// What the room decides about one stream with, and what it last said.
#[derive(Debug, Clone)]
pub struct StreamPolicy {
    /// `sdkappid:room`, the metrics' room label.
    pub room: String,
    pub policy: CongestionPolicy,
    pub min: f64,
    pub max: f64,
    /// An RTMP pusher: no RTCP reaches it, the room is told instead.
    pub rtmp: bool,
    /// A screen share (served before cameras).
    pub screen: bool,
    pub told: Option<f64>,
}

/// Orders a simulcast stream's layers lowest first, the same way wherever a layer
/// index means something (the allocator's choice, the downtrack's SSRC, dynacast's
/// ranks): by picture size once every layer has shown one at a keyframe, else by the
/// highest rate each was seen at. Not by the current rate: a CPU-starved encoder's
/// middle layer can send less than its lowest for a while, and then layer 0 named the
/// middle one, and dynacast kept the top one on as "next" for a subscriber at the
/// bottom (a CI failure). Sizes and peaks do not cross like that.
pub(super) fn sort_layers<T>(
    layers: &mut [T],
    ssrc: impl Fn(&T) -> u32,
    size: impl Fn(u32) -> Option<(u32, u32)>,
    peak: impl Fn(u32) -> f64,
) {
    let sized = layers.iter().all(|t| size(ssrc(t)).is_some());
    let pixels = |t: &T| match size(ssrc(t)) {
        Some((w, h)) if sized => u64::from(w) * u64::from(h),
        _ => 0,
    };
    layers.sort_by(|a, b| {
        pixels(a)
            .cmp(&pixels(b))
            .then_with(|| peak(ssrc(a)).total_cmp(&peak(ssrc(b))))
    });
}

impl Media {
    /// `sort_layers` for one stream: sizes from its publisher's keyframes, peaks
    /// from what was measured here; a mirrored stream in its home's order.
    pub(super) fn sort_stream_layers<T>(
        &self,
        stream_id: &str,
        layers: &mut [T],
        ssrc: impl Fn(&T) -> u32,
    ) {
        if let Some(order) = self.layer_order.get(stream_id) {
            let rank = |s: u32| order.iter().position(|x| *x == s).unwrap_or(usize::MAX);
            layers.sort_by_key(|t| rank(ssrc(t)));
            return;
        }
        let publisher = self
            .publishers
            .get(stream_id)
            .and_then(|p| self.peers.get(&super::peer::PeerKey(*p, Target::Publisher)));
        sort_layers(
            layers,
            ssrc,
            |s| publisher.and_then(|p| p.layer_size(s)),
            |s| {
                self.layer_peaks
                    .get(&(stream_id.to_owned(), s))
                    .copied()
                    .unwrap_or(0.0)
            },
        );
    }

    pub(super) fn congestion_tick(&mut self, now: Instant) {
        let seconds = now
            .saturating_duration_since(self.last_tick)
            .as_secs_f64()
            .max(0.005);
        self.last_tick = now;
        self.next_tick = now + TICK;
        // Clients' offers waiting for the rest of a stream's kinds: answered once the
        // wait is over, with what there is.
        let waiting: Vec<_> = self.client_offers.keys().copied().collect();
        for subscriber in waiting {
            self.sync_subscriber(subscriber);
        }
        // The node's gauges are the sum over its workers: each adds its own change.
        let demux = &self.metrics.demux_entries;
        let sizes = (self.by_addr.len() as i64, self.by_ufrag.len() as i64);
        demux
            .with_label_values(&["addr"])
            .add(sizes.0 - self.demux_reported.0);
        demux
            .with_label_values(&["ufrag"])
            .add(sizes.1 - self.demux_reported.1);
        self.demux_reported = sizes;
        for r in self.rates.values_mut() {
            r.roll(seconds);
        }
        for r in self.layer_rates.values_mut() {
            r.roll(seconds);
        }
        self.refresh_layers(now);
        self.send_layers_to_mirrors();
        // Subscribers waiting for a keyframe (a resume, a layer switch) keep asking;
        // request_keyframe throttles it per stream.
        let waiting: std::collections::HashSet<String> = self
            .peers
            .values()
            .flat_map(|p| p.keyframe_wanted.iter().cloned())
            .collect();
        for stream_id in waiting {
            self.request_keyframe(&stream_id, now, false);
        }
        if !self.config.congestion_control {
            return;
        }
        let room_tick = now >= self.next_room_tick;
        if room_tick {
            self.next_room_tick = now + ROOM_INTERVAL;
        }
        let mut capacities: HashMap<String, Vec<f64>> = HashMap::new();
        let mut changes = Vec::new();
        let mut tells = Vec::new();
        for (key, p) in self.peers.iter_mut() {
            if key.1 != Target::Subscriber {
                continue;
            }
            let streams = p.downtrack_streams();
            let room = streams
                .iter()
                .find_map(|(s, _)| self.stream_rooms.get(s).map(|r| r.room.clone()))
                .unwrap_or_default();
            let rtx_budget = p.rtx_budget.clone();
            let Some(c) = p.congestion.as_mut() else {
                continue;
            };
            let snap = c.estimator.snapshot(now);
            let remb = c
                .remb
                .filter(|(_, at)| now.saturating_duration_since(*at) < REMB_VALID)
                .map(|(bps, _)| bps);
            let media_bps = c.sent_bytes as f64 * 8.0 / seconds;
            c.sent_bytes = 0;
            let twcc = snap.estimate.is_some();
            let signals = Signals {
                estimate: snap.estimate.or(remb),
                acknowledged: if twcc { snap.acknowledged } else { media_bps },
                loss: if twcc { snap.loss } else { c.receiver.loss },
                queuing_delay_ms: snap.queuing_delay_ms,
                backing_off: snap.backing_off,
                media_bps,
            };
            rtx_budget.set_estimate(signals.estimate);
            let rate =
                |s: &str, k: Kind| self.rates.get(&(s.to_owned(), k)).map_or(0.0, |r| r.bps());
            let layer_rates = &self.layer_rates;
            let stream_layers = &self.stream_layers;
            let stream_rooms = &self.stream_rooms;
            let videos: Vec<VideoTrack> = streams
                .iter()
                .filter(|(_, k)| *k == Kind::Video)
                .map(|(s, _)| VideoTrack {
                    stream_id: s.clone(),
                    layers: match stream_layers.get(s).filter(|l| l.len() > 1) {
                        Some(ssrcs) => ssrcs
                            .iter()
                            .map(|x| layer_rates.get(&(s.clone(), *x)).map_or(0.0, |r| r.bps()))
                            .collect(),
                        None => vec![rate(s, Kind::Video)],
                    },
                    // A screen share is read before faces: served first on a short link.
                    priority: if stream_rooms.get(s).is_some_and(|p| p.screen) {
                        Priority::Screen
                    } else {
                        Priority::Camera
                    },
                })
                .collect();
            let audio_bps: f64 = streams
                .iter()
                .filter(|(_, k)| *k == Kind::Audio)
                .map(|(s, _)| rate(s, Kind::Audio))
                .sum();
            let before = c.allocator.state();
            tracing::trace!(
                session = key.0 .0,
                ?signals,
                audio_bps,
                videos = ?videos.iter().map(|v| (&v.stream_id, &v.layers)).collect::<Vec<_>>(),
                "allocation tick"
            );
            let alloc = c.allocator.tick(now, signals, audio_bps, &videos);
            if let Some(bps) = alloc.verified {
                c.estimator.verified(bps, now);
            }
            if let Some(outcome) = alloc.probe {
                let label = match outcome {
                    crate::congestion::allocate::ProbeOutcome::Succeeded => "succeeded",
                    crate::congestion::allocate::ProbeOutcome::Failed => "failed",
                };
                self.metrics.bwe_probes.with_label_values(&[label]).inc();
                tracing::info!(
                    session = key.0 .0,
                    outcome = label,
                    acknowledged = signals.acknowledged as u64,
                    queuing_ms = signals.queuing_delay_ms,
                    loss = signals.loss,
                    "bandwidth probe"
                );
            }
            let state = c.allocator.state();
            if state != before {
                self.metrics
                    .congestion_states
                    .with_label_values(&[&room, state.as_str()])
                    .inc();
                tracing::info!(
                    session = key.0 .0,
                    from = before.as_str(),
                    to = state.as_str(),
                    estimate = signals.estimate.unwrap_or(0.0) as u64,
                    loss = signals.loss,
                    queuing_ms = signals.queuing_delay_ms,
                    "subscriber congestion state"
                );
            }
            if room_tick {
                if let Some(e) = signals.estimate {
                    self.metrics.bwe_estimate.observe(e);
                }
                if let Some(rtt) = c.receiver.rtt.take() {
                    self.metrics.subscriber_rtt.observe(rtt.as_secs_f64());
                }
                // A subscriber with no sign of a limit (normal state) does not limit
                // the publisher: its estimate is bounded by what it was sent, and
                // passing that upstream would hold every publisher near its current
                // rate (measured: a simulcast publisher never brought up its layers).
                let limited = state != CongestionState::Normal;
                for (stream, cap) in &alloc.capacity {
                    let cap = if limited { *cap } else { f64::MAX };
                    capacities.entry(stream.clone()).or_default().push(cap);
                }
            }
            let paused: Vec<String> = c.allocator.paused().iter().cloned().collect();
            let lowered = c.allocator.lowered();
            let lvl = state;
            let due = match &c.told {
                None => lvl != CongestionLevel::Normal,
                Some((l, p, lw, at)) => {
                    *l != lvl
                        || *p != paused
                        || *lw != lowered
                        || (lvl != CongestionLevel::Normal
                            && now.saturating_duration_since(*at) >= TELL_EVERY)
                }
            };
            if due {
                c.told = Some((lvl, paused.clone(), lowered.clone(), now));
                tells.push((
                    key.0,
                    ServerMessage::Congestion {
                        state: lvl,
                        estimate: signals.estimate.unwrap_or(0.0) as u64,
                        paused,
                        lowered,
                    },
                ));
            }
            let padding = (alloc.padding_bps * seconds / 8.0) as usize;
            // The downtrack follows the allocator's layer even where no change named it
            // (a resume while the publisher sent one layer; the set growing again), or
            // it would forward a stale index, the top layer, say, on a capped link.
            let layers: Vec<(String, usize, bool)> = videos
                .iter()
                .filter_map(|v| {
                    let l = c.allocator.layer(&v.stream_id)?;
                    Some((v.stream_id.clone(), l, v.layers.len() > 1))
                })
                .collect();
            for change in alloc.changes {
                changes.push((*key, room.clone(), change));
            }
            for (stream, layer, simulcast) in layers {
                if p.layer(&stream) == Some(layer) {
                    continue;
                }
                if simulcast {
                    let change = Change::Layer(stream, layer);
                    if !changes.iter().any(|(k, _, c)| k == key && *c == change) {
                        changes.push((*key, room.clone(), change));
                    }
                } else {
                    p.set_layer(&stream, layer);
                }
            }
            if padding > 0 {
                let sent = p.send_padding(padding, now);
                self.metrics.padding_bytes.inc_by(sent as u64);
            }
        }
        self.apply_changes(changes, now);
        for (session, msg) in tells {
            self.tell(session, msg);
        }
        if room_tick {
            self.report_mirror_demand(now, &mut capacities);
            self.room_decisions(now, capacities);
            self.dynacast_decisions(now);
        }
    }

    /// A subscriber connection's path was replaced (an ICE restart): its estimate and
    /// allocation start again, and the videos paused on the old path play again
    /// (measured: the outage's 92 % loss, counted against the new path, paused the
    /// video 1.2 s after a restart, and under load it stayed paused for over 10 s).
    pub(super) fn path_restarted(&mut self, key: super::PeerKey, now: Instant) {
        let Some(c) = self.peers.get_mut(&key).and_then(|p| p.congestion.as_mut()) else {
            return;
        };
        c.estimator.reset();
        c.told = None;
        let changes = c
            .allocator
            .path_restarted()
            .into_iter()
            .map(|stream| {
                let room = self
                    .stream_rooms
                    .get(&stream)
                    .map(|r| r.room.clone())
                    .unwrap_or_default();
                (key, room, Change::Resumed(stream))
            })
            .collect();
        self.apply_changes(changes, now);
    }

    /// Carries out the allocators' decisions on the subscribers' downtracks.
    fn apply_changes(&mut self, changes: Vec<(super::PeerKey, String, Change)>, now: Instant) {
        for (key, room, change) in changes {
            let Some(p) = self.peers.get_mut(&key) else {
                continue;
            };
            match change {
                Change::Paused(stream) => {
                    if p.set_paused(&stream, true) {
                        tracing::info!(
                            session = key.0 .0,
                            stream,
                            "video paused: the subscriber's link cannot carry it"
                        );
                        self.metrics
                            .congestion_paused
                            .with_label_values(&[&room])
                            .inc();
                        self.metrics
                            .congestion_switches
                            .with_label_values(&[&room, "pause"])
                            .inc();
                    }
                }
                Change::Layer(stream, layer) => {
                    if p.set_layer(&stream, layer) {
                        tracing::info!(session = key.0 .0, stream, layer, "simulcast layer");
                        self.metrics
                            .congestion_switches
                            .with_label_values(&[&room, "layer"])
                            .inc();
                        self.request_keyframe(&stream, now, false);
                    }
                }
                Change::Resumed(stream) => {
                    if p.set_paused(&stream, false) {
                        tracing::info!(session = key.0 .0, stream, "video resumed");
                        self.metrics
                            .congestion_paused
                            .with_label_values(&[&room])
                            .dec();
                        self.metrics
                            .congestion_switches
                            .with_label_values(&[&room, "resume"])
                            .inc();
                        self.request_keyframe(&stream, now, true);
                    }
                }
            }
        }
    }

    /// Tells each simulcast WebRTC publisher which layers are needed: every layer up
    /// to the highest one a subscriber is on, and the next one (so it can be raised);
    /// layers ranked by the highest rate each was seen at. Nothing is switched off
    /// while nobody subscribes (the next subscriber may want the best).
    fn dynacast_decisions(&mut self, now: Instant) {
        let streams: Vec<(String, SessionId)> = self
            .stream_layers
            .keys()
            .filter_map(|s| self.publishers.get(s).map(|p| (s.clone(), *p)))
            .collect();
        for (stream_id, publisher) in streams {
            let Some(p) = self
                .peers
                .get(&super::peer::PeerKey(publisher, Target::Publisher))
            else {
                continue;
            };
            let mut layers = p.video_layer_rids();
            if layers.len() < 2 {
                continue;
            }
            self.sort_stream_layers(&stream_id, &mut layers, |l| l.0);
            let subscribers: Vec<SessionId> = self
                .subscriptions
                .get(&stream_id)
                .map(|s| {
                    s.iter()
                        .filter(|(_, k)| k.contains(&Kind::Video))
                        .map(|(s, _)| *s)
                        .collect()
                })
                .unwrap_or_default();
            let remote = self.remote_demand_of(&stream_id, now);
            if subscribers.is_empty() && remote.is_empty() {
                continue;
            }
            let mut highest = 0;
            for d in remote {
                if d.best {
                    highest = layers.len() - 1;
                }
                for ssrc in &d.ssrcs {
                    let rank = layers.iter().position(|(x, _)| x == ssrc).unwrap_or(0);
                    highest = highest.max(rank);
                }
            }
            for s in subscribers {
                let Some(sp) = self.peers.get(&super::peer::PeerKey(s, Target::Subscriber)) else {
                    continue;
                };
                let rank = match sp.forwarding(&stream_id) {
                    Some(ssrc) => layers.iter().position(|(x, _)| *x == ssrc).unwrap_or(0),
                    // Not started yet (or no congestion control): it will want the best.
                    None if sp.congestion.is_none() => layers.len() - 1,
                    None => 0,
                };
                highest = highest.max(rank);
            }
            let order: Vec<String> = layers.iter().map(|(_, rid)| rid.clone()).collect();
            let d = self.dynacast.entry(stream_id.clone()).or_default();
            if let Some(needed) = d.decide(now, &stream_id, &order, highest) {
                self.tell(
                    publisher,
                    ServerMessage::PublishLayers {
                        stream_id: stream_id.clone(),
                        active: needed,
                    },
                );
            }
        }
    }

    /// A layer index names a layer of the set the publisher sends now; when that set
    /// changes, each subscriber's index is moved so it names the same layer (or the
    /// next lower one, if its layer stopped). Kept by position, a middle layer that
    /// stopped made index 1 name the top layer: a capped subscriber was "kept" on it.
    /// Not from the placeholder set used before any rates are known.
    pub(super) fn relabel_layers(&mut self, stream_id: &str, old: &[u32], new: &[u32]) {
        let mut union = new.to_vec();
        union.extend(old.iter().filter(|s| !new.contains(s)));
        self.sort_stream_layers(stream_id, &mut union, |s| *s);
        let rank = |s: u32| union.iter().position(|x| *x == s).unwrap_or(0);
        for (key, p) in self.peers.iter_mut() {
            if key.1 != Target::Subscriber {
                continue;
            }
            let Some(l) = p.layer(stream_id) else {
                continue;
            };
            let was = old[l.min(old.len() - 1)];
            let to = match new.iter().position(|s| *s == was) {
                Some(i) => i,
                None => new
                    .iter()
                    .filter(|s| rank(**s) < rank(was))
                    .count()
                    .saturating_sub(1),
            };
            if to != l {
                tracing::info!(
                    session = key.0 .0,
                    stream = %stream_id,
                    from = l,
                    to,
                    ssrc = was,
                    ?new,
                    "simulcast layers changed: index moved with its layer"
                );
                p.set_layer(stream_id, to);
                if let Some(c) = p.congestion.as_mut() {
                    c.allocator.relabel(stream_id, to);
                }
            }
        }
    }

    /// Which streams are simulcast, and each one's active layers, lowest first. A
    /// layer sending under 10 kbit/s (the publisher switched it off, or it has not
    /// started) is not offered, nor one that started within `LAYER_WARM_UP` while
    /// others were; until rates are known, layers are in SSRC order.
    fn refresh_layers(&mut self, now: Instant) {
        let mut placeholder = std::collections::HashSet::new();
        let mut changed: Vec<(String, Vec<u32>, Vec<u32>)> = Vec::new();
        for (stream_id, publisher) in &self.publishers {
            let Some(p) = self
                .peers
                .get(&super::peer::PeerKey(*publisher, Target::Publisher))
            else {
                continue;
            };
            let ssrcs = p.video_layers();
            if ssrcs.len() < 2 {
                continue;
            }
            for s in &ssrcs {
                let r = self
                    .layer_rates
                    .get(&(stream_id.clone(), *s))
                    .map_or(0.0, |r| r.bps());
                let peak = self.layer_peaks.entry((stream_id.clone(), *s)).or_default();
                *peak = peak.max(r);
            }
            let rate = |s: &u32| {
                self.layer_rates
                    .get(&(stream_id.clone(), *s))
                    .map_or(0.0, |r| r.bps())
            };
            for s in &ssrcs {
                let key = (stream_id.clone(), *s);
                if rate(s) > 10_000.0 {
                    self.layer_sending_since.entry(key).or_insert(now);
                } else {
                    self.layer_sending_since.remove(&key);
                }
            }
            let sending: Vec<u32> = ssrcs
                .iter()
                .copied()
                .filter(|s| rate(s) > 10_000.0)
                .collect();
            // A layer that (re)starts while others play is offered once its rate is
            // known: its smoothed rate climbs from zero, and a subscriber was raised
            // to a top layer within 0.1 s of its return, on a rate far below what it
            // sends. One offered already stays offered.
            let before = self.stream_layers.get(stream_id);
            let warm: Vec<u32> = sending
                .iter()
                .copied()
                .filter(|s| {
                    before.is_some_and(|b| b.contains(s))
                        || self
                            .layer_sending_since
                            .get(&(stream_id.clone(), *s))
                            .is_some_and(|t| now.saturating_duration_since(*t) >= LAYER_WARM_UP)
                })
                .collect();
            let mut active = if warm.is_empty() { sending } else { warm };
            if active.is_empty() {
                active = ssrcs;
                active.sort_unstable();
                placeholder.insert(stream_id.clone());
            } else {
                self.sort_stream_layers(stream_id, &mut active, |s| *s);
                if let Some(old) = before.filter(|b| {
                    **b != active && !b.is_empty() && !self.placeholder_layers.contains(stream_id)
                }) {
                    changed.push((stream_id.clone(), old.clone(), active.clone()));
                }
            }
            self.stream_layers.insert(stream_id.clone(), active);
        }
        // A mirrored stream's placeholder is its home's to say.
        placeholder.extend(
            self.placeholder_layers
                .iter()
                .filter(|s| self.home_elsewhere(s).is_some())
                .cloned(),
        );
        self.placeholder_layers = placeholder;
        for (stream_id, old, new) in changed {
            self.relabel_layers(&stream_id, &old, &new);
        }
        let active: usize = self
            .stream_layers
            .iter()
            .filter(|(s, _)| self.publishers.contains_key(*s) && self.home_elsewhere(s).is_none())
            .map(|(s, l)| {
                l.iter()
                    .filter(|x| {
                        self.layer_rates
                            .get(&((*s).clone(), **x))
                            .is_some_and(|r| r.bps() > 10_000.0)
                    })
                    .count()
            })
            .sum();
        // The node's gauge is the sum over its workers: each adds its own change.
        self.metrics
            .simulcast_layers
            .add(active as i64 - self.simulcast_reported);
        self.simulcast_reported = active as i64;
    }

    /// Each stream's room combines its subscribers' capacities into one target for
    /// the publisher: REMB for WebRTC publishers; the room is told for everyone.
    fn room_decisions(&mut self, now: Instant, mut capacities: HashMap<String, Vec<f64>>) {
        // Subscribers on other workers count as much as local ones.
        let remote: Vec<(String, Vec<f64>)> = self
            .remote_wants
            .keys()
            .map(|s| {
                let caps = self
                    .remote_demand_of(s, now)
                    .iter()
                    .flat_map(|d| d.caps.iter().copied())
                    .collect();
                (s.clone(), caps)
            })
            .collect();
        for (stream_id, caps) in remote {
            if !caps.is_empty() {
                capacities.entry(stream_id).or_default().extend(caps);
            }
        }
        for (stream_id, caps) in capacities {
            let Some(sp) = self.stream_rooms.get_mut(&stream_id) else {
                continue;
            };
            let Some(target) = publisher_target(sp.policy, &caps, sp.min, sp.max) else {
                continue;
            };
            self.metrics
                .publisher_target
                .with_label_values(&[sp.policy.as_str()])
                .observe(target);
            let changed = sp
                .told
                .is_none_or(|t| (target - t).abs() > t * TARGET_CHANGE);
            let rtmp = sp.rtmp;
            if changed {
                sp.told = Some(target);
                let _ = self.control.try_send(ControlCommand::PublishTarget {
                    stream_id: stream_id.clone(),
                    bitrate: target as u64,
                });
            }
            if rtmp {
                continue;
            }
            let Some(publisher) = self.publishers.get(&stream_id).copied() else {
                continue;
            };
            if let Some(p) = self
                .peers
                .get_mut(&super::peer::PeerKey(publisher, Target::Publisher))
            {
                if p.send_remb(target, now) {
                    self.metrics.remb_sent.inc();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rids(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| (*s).to_owned()).collect()
    }

    /// A new track's first keyframe is not its rate; a settled track's keyframe moves
    /// its rate a little; a lasting change moves it within a second.
    #[test]
    fn a_track_s_rate_is_not_its_first_keyframe() {
        let mut m = RateMeter::default();
        // `ticks` 50 ms ticks of `bytes` each; the rate after them.
        let mut feed = |bytes: usize, ticks: usize| {
            for _ in 0..ticks {
                m.add(bytes);
                m.roll(0.05);
            }
            m.bps()
        };
        // A 6 kB keyframe, then 300-byte frames at 30 fps: 72 kbit/s after it.
        let r = feed(6_000, 1);
        assert!(r < 150_000.0, "{r}");
        let r = feed(450, 19);
        assert!((70_000.0..160_000.0).contains(&r), "{r}");
        let r = feed(450, 40);
        assert!((70_000.0..80_000.0).contains(&r), "{r}");
        // Another keyframe: a bump, not a new rate.
        let r = feed(6_000, 1);
        assert!(r < 200_000.0, "{r}");
        // A lasting rise to 720 kbit/s shows within a second.
        let r = feed(4_500, 20);
        assert!(r > 600_000.0, "{r}");
    }

    #[test]
    fn dynacast_switches_unused_layers_off_after_a_while_and_on_at_once() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let order = rids(&["q", "h", "f"]);
        let mut d = Dynacast::default();
        // Forwarded the lowest: q and h are needed, f only after 5 s of that.
        assert_eq!(d.decide(at(0), "s", &order, 0), None);
        assert_eq!(d.decide(at(4), "s", &order, 0), None);
        assert_eq!(d.decide(at(5), "s", &order, 0), Some(rids(&["q", "h"])));
        assert_eq!(d.decide(at(6), "s", &order, 0), None);
        // A subscriber climbs to h: f comes back at once.
        assert_eq!(
            d.decide(at(7), "s", &order, 1),
            Some(rids(&["q", "h", "f"]))
        );
    }

    #[test]
    fn dynacast_a_moment_of_need_restarts_the_wait() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let order = rids(&["q", "h", "f"]);
        let mut d = Dynacast::default();
        assert_eq!(d.decide(at(0), "s", &order, 0), None);
        assert_eq!(d.decide(at(3), "s", &order, 1), None);
        assert_eq!(d.decide(at(4), "s", &order, 0), None);
        assert_eq!(d.decide(at(8), "s", &order, 0), None);
        assert_eq!(d.decide(at(9), "s", &order, 0), Some(rids(&["q", "h"])));
    }

    #[test]
    fn dynacast_a_layer_that_opens_late_is_on_and_can_be_switched_off() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut d = Dynacast::default();
        // Only q and h have opened: both needed, nothing to say.
        assert_eq!(d.decide(at(0), "s", &rids(&["q", "h"]), 0), None);
        assert_eq!(d.decide(at(6), "s", &rids(&["q", "h"]), 0), None);
        // f opens: the publisher sends it, nobody needs it.
        let all = rids(&["q", "h", "f"]);
        assert_eq!(d.decide(at(7), "s", &all, 0), None);
        assert_eq!(d.decide(at(12), "s", &all, 0), Some(rids(&["q", "h"])));
    }
}
