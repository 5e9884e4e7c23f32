//! Rooms that span media workers: a room's publishers live on its *home* worker (the
//! worker its key hashes to), where every per-stream decision is made (layers,
//! dynacast, the room's target for the publisher, keyframe throttling, the GOP of a
//! bridged stream, taps to FLV). The receiving connections of a large room are spread
//! over all workers; a worker with subscribers of a stream published elsewhere keeps
//! a *mirror* of it, a source like a bridged one, fed by the home:
//!
//! - mirror → home: `Want` (a subscriber here receives it, or none does any more),
//!   `Keyframe` (one of them needs a picture), `Demand` each room tick (the layers its
//!   subscribers are on and their capacities, for dynacast and the room's target);
//! - home → mirror: `Media` batches, one per pump (the codecs, every RTP packet as it
//!   was received, sender reports), and the stream's active simulcast `Layers` each
//!   congestion tick.
//!
//! Each subscriber's downtrack, congestion estimate and allocation stay on the worker
//! that owns its connection, with the stream's rates measured there from the same
//! packets. Queues are bounded; a full one drops media (counted), as a socket would.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tracing::debug;
use weir_signaling::{Kind, Target};

use super::plane::Between;
use super::{Bridged, Media, PeerKey};
use crate::room::SessionId;

/// What a home sends a mirror.
#[derive(Debug)]
pub enum Mirrored {
    Track {
        publisher: SessionId,
        kind: Kind,
        codec: rtc::rtp_transceiver::rtp_sender::RTCRtpCodec,
    },
    Rtp {
        publisher: SessionId,
        kind: Kind,
        packet: rtc::rtp::Packet,
        /// As the home forwards it: known for bridged video, else None.
        keyframe: Option<bool>,
        arrived: Instant,
    },
    SenderReport {
        publisher: SessionId,
        kind: Kind,
        report: rtc::rtcp::sender_report::SenderReport,
    },
}

/// What a mirror's subscribers of one stream need, as last reported to its home.
#[derive(Debug, Clone)]
pub struct Demand {
    /// Some subscriber will want the best layer (no congestion control, or not
    /// started).
    pub best: bool,
    /// The simulcast layers (SSRCs) its subscribers are forwarded.
    pub ssrcs: Vec<u32>,
    /// Their capacities for the stream (the room's target for the publisher).
    pub caps: Vec<f64>,
    pub at: Instant,
}

/// A mirror's demand older than this is not counted (its worker stopped reporting).
const DEMAND_VALID: Duration = Duration::from_secs(3);

impl Media {
    /// The worker `stream_id` is published on, when it is another.
    pub(super) fn home_elsewhere(&self, stream_id: &str) -> Option<usize> {
        self.stream_home
            .get(stream_id)
            .copied()
            .filter(|h| *h != self.crew.index)
    }

    /// Mirror side: every stream a local subscriber receives but another worker
    /// publishes gets a mirror, and each home hears whether it is wanted here (when
    /// that changed; a full queue is tried again at the next command or tick).
    pub(super) fn ask_mirror_demand(&mut self) {
        let needed: Vec<(SessionId, usize)> = self
            .subscriptions
            .iter()
            .filter(|(_, subs)| !subs.is_empty())
            .filter_map(|(s, _)| Some((*self.publishers.get(s)?, self.home_elsewhere(s)?)))
            .collect();
        for (publisher, home) in needed {
            if !self.bridged.contains_key(&publisher) {
                debug!(
                    worker = self.crew.index,
                    home,
                    session = publisher.0,
                    "mirroring a stream of another worker's room"
                );
                self.metrics.media_mirrors.inc();
                self.bridged.insert(
                    publisher,
                    Bridged {
                        mirror_of: Some(home),
                        ..Default::default()
                    },
                );
            }
        }
        let mut unwanted = Vec::new();
        for (session, b) in self.bridged.iter_mut() {
            let Some(home) = b.mirror_of else { continue };
            let Some(stream_id) = self.allowed.get(session).map(|a| &a.stream_id) else {
                continue;
            };
            let wanted = self
                .subscriptions
                .get(stream_id)
                .is_some_and(|s| !s.is_empty());
            if wanted != b.wanted
                && self.crew.send(
                    home,
                    Between::Want {
                        stream_id: stream_id.clone(),
                        worker: self.crew.index,
                        wanted,
                    },
                )
            {
                b.wanted = wanted;
            }
            if !wanted && !b.wanted {
                unwanted.push(*session);
            }
        }
        // A mirror nobody here receives goes (its home has been told).
        for session in unwanted {
            self.drop_bridged(session);
        }
    }

    /// Home side: worker `worker` has subscribers of `stream_id` now (or none).
    pub(super) fn mirror_wanted(
        &mut self,
        stream_id: String,
        worker: usize,
        wanted: bool,
        now: Instant,
    ) {
        if !wanted {
            if let Some(w) = self.remote_wants.get_mut(&stream_id) {
                w.remove(&worker);
                if w.is_empty() {
                    self.remote_wants.remove(&stream_id);
                }
            }
            self.remote_demand.remove(&(stream_id, worker));
            self.ask_upstream_demand();
            return;
        }
        let Some(publisher) = self.publishers.get(&stream_id).copied() else {
            return; // ended meanwhile: the mirror hears EndStream too
        };
        self.remote_wants
            .entry(stream_id.clone())
            .or_default()
            .insert(worker);
        // What the mirror needs to offer the stream, and a picture for its subscribers.
        for (kind, codec) in self.publisher_codecs(publisher) {
            self.mirror_out[worker].push(Mirrored::Track {
                publisher,
                kind,
                codec,
            });
        }
        for kind in [Kind::Video, Kind::Audio] {
            if let Some(sr) = self.last_srs.get(&(stream_id.clone(), kind)) {
                self.mirror_out[worker].push(Mirrored::SenderReport {
                    publisher,
                    kind,
                    report: sr.clone(),
                });
            }
        }
        self.send_layers(&stream_id, [worker]);
        self.request_keyframe(&stream_id, now, true);
        self.ask_upstream_demand();
    }

    /// The codecs a local publisher (a connection or a bridge) sends.
    fn publisher_codecs(
        &self,
        publisher: SessionId,
    ) -> Vec<(Kind, rtc::rtp_transceiver::rtp_sender::RTCRtpCodec)> {
        if let Some(b) = self.bridged.get(&publisher) {
            return b.codecs.iter().map(|(k, c)| (*k, c.clone())).collect();
        }
        let Some(p) = self.peers.get(&PeerKey(publisher, Target::Publisher)) else {
            return Vec::new();
        };
        [Kind::Video, Kind::Audio]
            .into_iter()
            .filter_map(|k| Some((k, p.track_codec(k)?)))
            .collect()
    }

    /// Home side: queues `m` for every worker that mirrors `stream_id`.
    pub(super) fn queue_for_mirrors(&mut self, stream_id: &str, m: impl Fn() -> Mirrored) {
        if let Some(ws) = self.remote_wants.get(stream_id) {
            for w in ws {
                self.mirror_out[*w].push(m());
            }
        }
    }

    /// Home side: a local publisher's track opened, or a bridge's codec is known.
    pub(super) fn mirror_tracks(&mut self, publisher: SessionId) {
        let Some(stream_id) = self.allowed.get(&publisher).map(|a| a.stream_id.clone()) else {
            return;
        };
        if !self.remote_wants.contains_key(&stream_id) {
            return;
        }
        for (kind, codec) in self.publisher_codecs(publisher) {
            self.queue_for_mirrors(&stream_id, || Mirrored::Track {
                publisher,
                kind,
                codec: codec.clone(),
            });
        }
    }

    /// Home side: the stream's active simulcast layers, for its mirrors on `workers`,
    /// and every layer its publisher has, in the order layer indices mean (a layer
    /// that stops is found below or above the others there as here). Ranked once.
    fn send_layers(&self, stream_id: &str, workers: impl IntoIterator<Item = usize>) {
        let Some(ssrcs) = self.stream_layers.get(stream_id) else {
            return;
        };
        let mut order: Vec<u32> = self
            .publishers
            .get(stream_id)
            .and_then(|p| self.peers.get(&PeerKey(*p, Target::Publisher)))
            .map(|p| p.video_layers())
            .unwrap_or_default();
        self.sort_stream_layers(stream_id, &mut order, |s| *s);
        let placeholder = self.placeholder_layers.contains(stream_id);
        for w in workers {
            let _ = self.crew.send(
                w,
                Between::Layers {
                    stream_id: stream_id.to_owned(),
                    ssrcs: ssrcs.clone(),
                    order: order.clone(),
                    placeholder,
                },
            );
        }
    }

    /// Home side, each congestion tick: every mirror gets the layers as they are now.
    pub(super) fn send_layers_to_mirrors(&self) {
        for (stream_id, ws) in &self.remote_wants {
            self.send_layers(stream_id, ws.iter().copied());
        }
    }

    /// Sends what was queued for mirrors during this pump, one batch per worker.
    pub(super) fn flush_mirrors(&mut self) {
        for w in 0..self.mirror_out.len() {
            if self.mirror_out[w].is_empty() {
                continue;
            }
            let batch = std::mem::take(&mut self.mirror_out[w]);
            let n = batch.len() as u64;
            if !self.crew.send(w, Between::Media(batch)) {
                self.metrics.mirror_drops.inc_by(n);
            }
        }
    }

    /// Mirror side: a batch from the home. A source's tracks are offered once the
    /// batch's codecs are all in (a client's offer is answered at the first chance:
    /// with the video alone, its audio section would have been refused).
    pub(super) fn mirrored_batch(&mut self, batch: Vec<Mirrored>) {
        let mut changed = Vec::new();
        for m in batch {
            if let Some(source) = self.mirrored(m) {
                if !changed.contains(&source) {
                    changed.push(source);
                }
            }
        }
        self.flush_sources();
        for source in changed {
            self.sync_subscribers_of(source);
        }
    }

    /// One thing the home sent; the source whose tracks changed.
    fn mirrored(&mut self, m: Mirrored) -> Option<SessionId> {
        if !matches!(m, Mirrored::Rtp { .. }) {
            self.flush_sources();
        }
        match m {
            Mirrored::Track {
                publisher,
                kind,
                codec,
            } => {
                let b = self
                    .bridged
                    .get_mut(&publisher)
                    .filter(|b| b.mirror_of.is_some())?;
                if b.codecs.get(&kind) == Some(&codec) {
                    return None;
                }
                b.codecs.insert(kind, codec);
                Some(publisher)
            }
            Mirrored::Rtp {
                publisher,
                kind,
                packet,
                keyframe,
                arrived,
            } => {
                if self
                    .bridged
                    .get(&publisher)
                    .is_some_and(|b| b.mirror_of.is_some())
                {
                    self.source_rtp(publisher, kind, packet, keyframe, arrived);
                }
                None
            }
            Mirrored::SenderReport {
                publisher,
                kind,
                report,
            } => {
                self.relay_sender_report(publisher, kind, &report, Instant::now());
                None
            }
        }
    }

    /// Mirror side: the home's active layers of a simulcast stream.
    pub(super) fn mirror_layers(
        &mut self,
        stream_id: String,
        ssrcs: Vec<u32>,
        order: Vec<u32>,
        placeholder: bool,
    ) {
        if self.home_elsewhere(&stream_id).is_none() {
            return;
        }
        self.layer_order.insert(stream_id.clone(), order);
        let was_placeholder = if placeholder {
            !self.placeholder_layers.insert(stream_id.clone())
        } else {
            self.placeholder_layers.remove(&stream_id)
        };
        let old = self.stream_layers.insert(stream_id.clone(), ssrcs.clone());
        if let Some(old) = old.filter(|o| *o != ssrcs && !o.is_empty() && !was_placeholder) {
            self.relabel_layers(&stream_id, &old, &ssrcs);
        }
    }

    /// Mirror side, each room tick: the layers and capacities of this worker's
    /// subscribers of each mirrored stream go to its home (taken out of
    /// `capacities`: the home decides for its publisher).
    pub(super) fn report_mirror_demand(
        &mut self,
        now: Instant,
        capacities: &mut HashMap<String, Vec<f64>>,
    ) {
        let mirrored: Vec<(String, usize)> = self
            .bridged
            .iter()
            .filter(|(_, b)| b.wanted)
            .filter_map(|(s, b)| Some((self.allowed.get(s)?.stream_id.clone(), b.mirror_of?)))
            .collect();
        for (stream_id, home) in mirrored {
            let caps = capacities.remove(&stream_id).unwrap_or_default();
            let mut best = false;
            let mut ssrcs = Vec::new();
            for (s, kinds) in self.subscriptions.get(&stream_id).into_iter().flatten() {
                if !kinds.contains(&Kind::Video) {
                    continue;
                }
                let Some(p) = self.peers.get(&PeerKey(*s, Target::Subscriber)) else {
                    continue;
                };
                match p.forwarding(&stream_id) {
                    Some(ssrc) => ssrcs.push(ssrc),
                    None if p.congestion.is_none() => best = true,
                    None => {}
                }
            }
            let _ = self.crew.send(
                home,
                Between::Demand {
                    stream_id,
                    worker: self.crew.index,
                    demand: Demand {
                        best,
                        ssrcs,
                        caps,
                        at: now,
                    },
                },
            );
        }
    }

    /// Home side: the mirrors' recent demand for `stream_id`.
    pub(super) fn remote_demand_of(&self, stream_id: &str, now: Instant) -> Vec<&Demand> {
        self.remote_wants
            .get(stream_id)
            .into_iter()
            .flatten()
            .filter_map(|w| self.remote_demand.get(&(stream_id.to_owned(), *w)))
            .filter(|d| now.saturating_duration_since(d.at) < DEMAND_VALID)
            .collect()
    }
}
