//! Live playback over RTMP and HTTP-FLV: every stream of every room as FLV tags, with
//! its sequence headers and a small GOP cache, fanned out to players through bounded
//! per-player queues measured in media time.
//!
//! A source (an RTMP pusher's tags as they are, or a WebRTC publisher's RTP converted
//! once) pushes tags into its [`Source`]; each player holds a [`PlayerQueue`]. A player
//! that falls more than `max_latency_ms` behind has its queue emptied and resumes at
//! the next keyframe (counted), so its latency never grows without bound.

pub mod flv;
pub mod webrtc;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::Notify;

/// FLV tag types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagKind {
    Audio = 8,
    Video = 9,
    Script = 18,
}

/// One FLV tag body with its timestamp.
#[derive(Debug, Clone)]
pub struct Tag {
    pub kind: TagKind,
    /// Milliseconds on the source's clock.
    pub timestamp: u32,
    pub data: Bytes,
}

impl Tag {
    pub fn is_video_keyframe(&self) -> bool {
        self.kind == TagKind::Video && self.data.first().is_some_and(|b| b >> 4 == 1)
    }

    /// An AVC or AAC sequence header.
    pub fn is_sequence_header(&self) -> bool {
        match self.kind {
            TagKind::Video => self.data.get(1) == Some(&0) && self.data.first() == Some(&0x17),
            TagKind::Audio => {
                self.data.first().is_some_and(|b| b >> 4 == 10) && self.data.get(1) == Some(&0)
            }
            TagKind::Script => false,
        }
    }
}

/// Tags kept for a new player: from the last keyframe, at most this many and this
/// many bytes (a 2 s GOP at 20 Mbit/s is 5 MB).
const GOP_MAX_TAGS: usize = 2500;
const GOP_MAX_BYTES: usize = 16 << 20;
/// Tags a player's queue may hold whatever their timestamps say, in number and in
/// bytes (a pusher whose timestamps stand still must not make a queue hold more).
const QUEUE_MAX_TAGS: usize = 4096;
const QUEUE_MAX_BYTES: usize = 16 << 20;
/// What a player's writer takes from its queue at a time (at least one tag): the
/// backlog stays in the queue, where latency control sees it, not in the writer.
pub const BATCH_MAX_BYTES: usize = 16 * 1024;

#[derive(Default)]
struct QueueState {
    tags: VecDeque<Tag>,
    /// The bytes of `tags`.
    bytes: usize,
    /// Metadata and sequence headers, put back in front after the queue is emptied so
    /// a player never gets frames it cannot decode.
    headers: Vec<Tag>,
    /// Extra media time allowed while the GOP cache a new player starts with is
    /// still queued (it is old on purpose); gone once the writer has taken it.
    allowance_ms: u32,
    /// How many of the tags at the front are that GOP cache (and its headers).
    cached_left: usize,
    /// Video is skipped until a keyframe (after an overflow, or at the start).
    waiting_keyframe: bool,
    closed: bool,
    /// Tags dropped by latency control.
    dropped: u64,
}

/// One player's queue.
pub struct PlayerQueue {
    state: Mutex<QueueState>,
    notify: Notify,
    max_latency_ms: u32,
}

/// A player's end of its queue; dropping it removes the player.
pub struct Player {
    queue: Arc<PlayerQueue>,
    source: std::sync::Weak<Source>,
}

impl std::ops::Deref for Player {
    type Target = PlayerQueue;
    fn deref(&self) -> &PlayerQueue {
        &self.queue
    }
}

impl Drop for Player {
    fn drop(&mut self) {
        self.queue.close();
        if let Some(s) = self.source.upgrade() {
            s.player_left();
        }
    }
}

/// Players coming and going, for sources converted on demand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Demand {
    Joined { players: usize },
    Left { players: usize },
}

pub type DemandFn = Box<dyn Fn(Demand) + Send + Sync>;
/// Makes a source's [`DemandFn`] once the source exists.
pub type MakeDemandFn = Box<dyn FnOnce(&Arc<Source>) -> DemandFn>;

/// What a player's writer gets next.
pub enum Next {
    Tags(Vec<Tag>),
    /// The source ended (or the player was closed).
    Closed,
}

impl PlayerQueue {
    fn new(max_latency_ms: u32) -> Self {
        Self {
            state: Mutex::new(QueueState::default()),
            notify: Notify::new(),
            max_latency_ms,
        }
    }

    /// Queues a tag; returns how many tags latency control dropped doing so.
    fn push(&self, tag: Tag) -> u64 {
        let mut s = self.state.lock().expect("queue lock");
        if s.closed {
            return 0;
        }
        let mut dropped = 0;
        if tag.kind == TagKind::Video && s.waiting_keyframe {
            if !tag.is_video_keyframe() {
                s.dropped += 1;
                return 1;
            }
            s.waiting_keyframe = false;
        }
        let behind = s
            .tags
            .front()
            .map(|f| tag.timestamp.wrapping_sub(f.timestamp) as i32)
            .unwrap_or(0);
        let limit = self.max_latency_ms.saturating_add(s.allowance_ms) as i32;
        if behind > limit
            || s.tags.len() >= QUEUE_MAX_TAGS
            || s.bytes + tag.data.len() > QUEUE_MAX_BYTES
        {
            // The player cannot keep up: forget the backlog, resume at a keyframe.
            dropped = s
                .tags
                .iter()
                .filter(|t| t.kind != TagKind::Script && !t.is_sequence_header())
                .count() as u64;
            s.tags.clear();
            s.bytes = 0;
            s.allowance_ms = 0;
            s.cached_left = 0;
            // Sequence headers again (not metadata: a later script tag looks like a
            // data track to players), at the time the player resumes from.
            let resume = tag.timestamp;
            let headers: Vec<Tag> = s
                .headers
                .iter()
                .filter(|h| h.kind != TagKind::Script)
                .map(|h| Tag {
                    timestamp: resume,
                    ..h.clone()
                })
                .collect();
            s.bytes += headers.iter().map(|t| t.data.len()).sum::<usize>();
            s.tags.extend(headers);
            if tag.kind == TagKind::Video && !tag.is_video_keyframe() {
                s.waiting_keyframe = true;
                dropped += 1;
                s.dropped += dropped;
                return dropped;
            }
            s.waiting_keyframe = tag.kind != TagKind::Video;
        }
        s.dropped += dropped;
        s.bytes += tag.data.len();
        s.tags.push_back(tag);
        drop(s);
        self.notify.notify_one();
        dropped
    }

    fn close(&self) {
        self.state.lock().expect("queue lock").closed = true;
        self.notify.notify_one();
    }

    /// The oldest queued tags, up to [`BATCH_MAX_BYTES`] (at least one), waiting for
    /// something if empty.
    pub async fn next(&self) -> Next {
        loop {
            let notified = self.notify.notified();
            if let Some(next) = self.try_next() {
                return next;
            }
            notified.await;
        }
    }

    /// [`Self::next`] without waiting: `None` while the queue is empty and open.
    fn try_next(&self) -> Option<Next> {
        let mut s = self.state.lock().expect("queue lock");
        if s.tags.is_empty() {
            return s.closed.then_some(Next::Closed);
        }
        let mut bytes = 0;
        let n = s
            .tags
            .iter()
            .take_while(|t| {
                let first = bytes == 0;
                bytes += t.data.len() + 15;
                first || bytes <= BATCH_MAX_BYTES
            })
            .count();
        s.cached_left = s.cached_left.saturating_sub(n);
        if s.cached_left == 0 {
            s.allowance_ms = 0;
        }
        let taken: Vec<Tag> = s.tags.drain(..n).collect();
        s.bytes -= taken.iter().map(|t| t.data.len()).sum::<usize>();
        Some(Next::Tags(taken))
    }

    pub fn dropped(&self) -> u64 {
        self.state.lock().expect("queue lock").dropped
    }
}

#[derive(Default)]
struct SourceState {
    metadata: Option<Tag>,
    video_header: Option<Tag>,
    audio_header: Option<Tag>,
    /// From the last video keyframe on (bounded); empty when there is none.
    gop: Vec<Tag>,
    /// The bytes of `gop`.
    gop_bytes: usize,
    players: Vec<Arc<PlayerQueue>>,
    ended: bool,
    last_ts: u32,
}

/// One stream's FLV side.
pub struct Source {
    pub name: String,
    state: Mutex<SourceState>,
    max_latency_ms: u32,
    /// Tags dropped by latency control across this source's players.
    pub on_drop: Box<dyn Fn(u64) + Send + Sync>,
    demand: Mutex<Option<DemandFn>>,
}

impl Source {
    /// Feeds a tag to the headers, the GOP cache and every player.
    pub fn push(&self, tag: Tag) {
        let players = {
            let mut s = self.state.lock().expect("source lock");
            if tag.kind != TagKind::Script {
                s.last_ts = tag.timestamp;
            }
            if tag.kind == TagKind::Script {
                s.metadata = Some(tag.clone());
            } else if tag.is_sequence_header() {
                match tag.kind {
                    TagKind::Video => s.video_header = Some(tag.clone()),
                    _ => s.audio_header = Some(tag.clone()),
                }
                for p in &s.players {
                    let mut q = p.state.lock().expect("queue lock");
                    q.headers
                        .retain(|h| h.kind != tag.kind || !h.is_sequence_header());
                    q.headers.push(tag.clone());
                }
            } else if tag.is_video_keyframe() {
                s.gop.clear();
                s.gop_bytes = tag.data.len();
                s.gop.push(tag.clone());
            } else if !s.gop.is_empty() {
                if s.gop.len() < GOP_MAX_TAGS && s.gop_bytes + tag.data.len() <= GOP_MAX_BYTES {
                    s.gop_bytes += tag.data.len();
                    s.gop.push(tag.clone());
                } else {
                    // A GOP this long is not worth replaying.
                    s.gop.clear();
                    s.gop_bytes = 0;
                }
            }
            s.players
                .retain(|p| !p.state.lock().expect("queue lock").closed);
            s.players.clone()
        };
        let mut dropped = 0;
        for p in players {
            dropped += p.push(tag.clone());
        }
        if dropped > 0 {
            (self.on_drop)(dropped);
        }
    }

    /// A new player: it gets the metadata and sequence headers, then the GOP cache
    /// (so its first video tag after the header is a keyframe), then live tags. The
    /// player leaves when the handle is dropped.
    pub fn subscribe(self: &Arc<Self>) -> Player {
        self.subscribe_with(self.max_latency_ms)
    }

    /// [`Self::subscribe`] with its own latency bound (a recorder tolerates more
    /// backlog than a viewer: a slow disk, not a person waiting).
    pub fn subscribe_with(self: &Arc<Self>, max_latency_ms: u32) -> Player {
        let queue = self.subscribe_queue(max_latency_ms);
        let players = self.players();
        self.tell(Demand::Joined { players });
        Player {
            queue,
            source: Arc::downgrade(self),
        }
    }

    /// Calls `f` whenever a player joins or leaves (for conversion on demand).
    pub fn set_demand(&self, f: DemandFn) {
        *self.demand.lock().expect("demand lock") = Some(f);
    }

    fn tell(&self, d: Demand) {
        if let Some(f) = self.demand.lock().expect("demand lock").as_ref() {
            f(d);
        }
    }

    fn player_left(&self) {
        let players = self.players();
        self.tell(Demand::Left { players });
    }

    fn subscribe_queue(&self, max_latency_ms: u32) -> Arc<PlayerQueue> {
        let q = Arc::new(PlayerQueue::new(max_latency_ms));
        let mut s = self.state.lock().expect("source lock");
        {
            let mut qs = q.state.lock().expect("queue lock");
            // Headers carry the timestamp the player starts at, so its clock does not
            // jump from zero to the stream's time.
            let start = s.gop.first().map_or(s.last_ts, |t| t.timestamp);
            let at_start = |t: &Tag| Tag {
                timestamp: start,
                ..t.clone()
            };
            // onMetaData stays at 0: players (ffmpeg) take a later script tag for a
            // data track.
            qs.headers.extend(s.metadata.iter().cloned());
            qs.headers.extend(s.video_header.iter().map(at_start));
            qs.headers.extend(s.audio_header.iter().map(at_start));
            let headers = qs.headers.clone();
            qs.bytes += headers.iter().map(|t| t.data.len()).sum::<usize>();
            qs.tags.extend(headers);
            if s.gop.is_empty() {
                qs.waiting_keyframe = true;
            } else {
                qs.bytes += s.gop_bytes;
                qs.tags.extend(s.gop.iter().cloned());
                qs.allowance_ms = s.last_ts.wrapping_sub(start);
                qs.cached_left = qs.tags.len();
            }
            qs.closed = s.ended;
        }
        s.players.push(q.clone());
        q
    }

    pub fn players(&self) -> usize {
        let mut s = self.state.lock().expect("source lock");
        s.players
            .retain(|p| !p.state.lock().expect("queue lock").closed);
        s.players.len()
    }

    /// Has a video sequence header (a player can start).
    pub fn has_video_header(&self) -> bool {
        self.state
            .lock()
            .expect("source lock")
            .video_header
            .is_some()
    }

    fn end(&self) {
        let players = {
            let mut s = self.state.lock().expect("source lock");
            s.ended = true;
            std::mem::take(&mut s.players)
        };
        tracing::info!(stream = %self.name, players = players.len(), "stream ended for its players");
        for p in players {
            p.close();
        }
    }
}

/// Where a stream lives, for authorizing play.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPlace {
    pub sdk_app_id: u64,
    pub room: crate::auth::RoomId,
}

/// A stream coming or going, for whoever watches the hub (recording, callbacks).
pub enum HubEvent<'a> {
    Opened {
        source: &'a Arc<Source>,
        place: &'a StreamPlace,
    },
    Closed {
        name: &'a str,
        place: &'a StreamPlace,
    },
}

/// Told every [`HubEvent`]; must not block (it runs on the caller's task).
pub type ObserveFn = Arc<dyn Fn(HubEvent<'_>) + Send + Sync>;

/// Every stream that can be played, by name.
pub struct Hub {
    sources: Mutex<HashMap<String, (Arc<Source>, StreamPlace)>>,
    observers: Mutex<Vec<ObserveFn>>,
    max_latency_ms: u32,
    /// Called with (stream, tags dropped) when latency control drops tags.
    on_drop: DropFn,
    /// Called with a stream's name when it ends (its metric series go).
    on_close: CloseFn,
}

/// Told a stream's name when it ends.
pub type CloseFn = Arc<dyn Fn(&str) + Send + Sync>;

/// Told (stream, tags dropped) when latency control drops tags.
pub type DropFn = Arc<dyn Fn(&str, u64) + Send + Sync>;

impl Hub {
    pub fn new(max_latency_ms: u32, on_drop: DropFn, on_close: CloseFn) -> Self {
        Self {
            sources: Mutex::new(HashMap::new()),
            observers: Mutex::new(Vec::new()),
            max_latency_ms,
            on_drop,
            on_close,
        }
    }

    /// Registers a stream (replacing an ended one of the same name).
    pub fn open(&self, name: &str, place: StreamPlace) -> Arc<Source> {
        self.open_with(name, place, None)
    }

    /// [`Self::open`] for a source converted on demand: `demand` is in place before
    /// anyone (a recorder the observers start) can subscribe.
    pub fn open_with(
        &self,
        name: &str,
        place: StreamPlace,
        demand: Option<MakeDemandFn>,
    ) -> Arc<Source> {
        let on_drop = self.on_drop.clone();
        let stream = name.to_owned();
        let source = Arc::new(Source {
            name: name.to_owned(),
            state: Mutex::new(SourceState::default()),
            max_latency_ms: self.max_latency_ms,
            on_drop: Box::new(move |n| on_drop(&stream, n)),
            demand: Mutex::new(None),
        });
        if let Some(make) = demand {
            source.set_demand(make(&source));
        }
        let old = self
            .sources
            .lock()
            .expect("hub lock")
            .insert(name.to_owned(), (source.clone(), place.clone()));
        if let Some((old, old_place)) = old {
            old.end();
            self.tell(HubEvent::Closed {
                name,
                place: &old_place,
            });
        }
        self.tell(HubEvent::Opened {
            source: &source,
            place: &place,
        });
        source
    }

    /// Calls `f` for every stream opened and closed from now on.
    pub fn observe(&self, f: ObserveFn) {
        self.observers.lock().expect("observers lock").push(f);
    }

    fn tell(&self, event: HubEvent<'_>) {
        let observers = self.observers.lock().expect("observers lock").clone();
        for f in observers {
            f(match &event {
                HubEvent::Opened { source, place } => HubEvent::Opened { source, place },
                HubEvent::Closed { name, place } => HubEvent::Closed { name, place },
            });
        }
    }

    /// Ends a stream: its players are closed.
    pub fn close(&self, name: &str, source: &Arc<Source>) {
        let mut map = self.sources.lock().expect("hub lock");
        let current = map.get(name).is_some_and(|(s, _)| Arc::ptr_eq(s, source));
        let removed = if current { map.remove(name) } else { None };
        drop(map);
        source.end();
        if let Some((_, place)) = removed {
            (self.on_close)(name);
            self.tell(HubEvent::Closed {
                name,
                place: &place,
            });
        }
    }

    pub fn get(&self, name: &str) -> Option<(Arc<Source>, StreamPlace)> {
        self.sources.lock().expect("hub lock").get(name).cloned()
    }

    /// Every stream's name (a cluster node writes them to Redis).
    pub fn names(&self) -> Vec<String> {
        self.sources
            .lock()
            .expect("hub lock")
            .keys()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests;
