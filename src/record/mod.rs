//! Recording a stream into FLV or fragmented MP4 files, sans I/O: FLV tags and the
//! wall clock in, file actions out (open, append, close or discard). The shell (`server::record`) does the
//! writing, so what is in a file at any moment is every byte this returned so far: a
//! crash loses only what the kernel had not been handed.
//!
//! The rules (Tencent's and SRS's recordings): each file starts with the FLV header,
//! the metadata and the sequence headers (in MP4: `ftyp` and `moov`, see [`mp4`]), then
//! a video keyframe (or, for a stream without video, the first audio frame), with
//! timestamps from 0; a file is closed at
//! the first keyframe after `fragment_ms` of media, or when the stream ends (a push
//! interrupted and resumed is a new stream, so a new file); a file holding under
//! `min_ms` of media is discarded. Nothing is transcoded: the tags are the stream's
//! own (an RTMP pusher's, or a WebRTC publisher's converted once for every player).

use bytes::Bytes;

use crate::live::{flv, Tag, TagKind};

pub mod mp4;

use mp4::Mp4Writer;

/// The container files are written in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Flv,
    Mp4,
}

impl Format {
    /// The files' extension, also the callbacks' `file_format`.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Flv => "flv",
            Format::Mp4 => "mp4",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "flv" => Some(Format::Flv),
            "mp4" => Some(Format::Mp4),
            _ => None,
        }
    }
}

/// A timestamp this far before a file's start is a reset of the source's clock.
const RESET_MS: i32 = 5_000;

#[derive(Debug, Clone, Copy)]
pub struct SegmentConfig {
    /// A new file at the first keyframe after this much media.
    pub fragment_ms: u32,
    /// Files holding less media than this are discarded when closed.
    pub min_ms: u32,
    /// A stream that has shown no video after this much audio is recorded as audio only.
    pub audio_only_after_ms: u32,
    pub format: Format,
}

impl Default for SegmentConfig {
    fn default() -> Self {
        Self {
            fragment_ms: 30 * 60 * 1000,
            min_ms: 1000,
            audio_only_after_ms: 2000,
            format: Format::Flv,
        }
    }
}

/// A file closed and kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// The file's sequence number within this recording (0, 1, …).
    pub index: u32,
    /// Wall clock (Unix ms) when its first and last tags arrived.
    pub start_unix_ms: u64,
    pub end_unix_ms: u64,
    /// Media time it holds: its last tag's timestamp (the first is 0).
    pub duration_ms: u32,
    pub bytes: u64,
}

/// What the shell does, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Create file number `index` (started at `start_unix_ms`).
    Open { index: u32, start_unix_ms: u64 },
    /// Append to the open file.
    Write(Bytes),
    /// The open file is complete and kept.
    Close(Finished),
    /// The open file holds too little: delete it.
    Discard { index: u32 },
}

struct Open {
    index: u32,
    /// The stream timestamp that is 0 in this file.
    base_ts: u32,
    start_unix_ms: u64,
    last_unix_ms: u64,
    /// Media time of the newest tag, relative to `base_ts`.
    last_ms: u32,
    bytes: u64,
    /// The MP4 file's muxer (FLV tags are written as they are).
    mp4: Option<Mp4Writer>,
}

pub struct Segmenter {
    cfg: SegmentConfig,
    metadata: Option<Tag>,
    video_header: Option<Tag>,
    audio_header: Option<Tag>,
    seen_video: bool,
    first_audio_ts: Option<u32>,
    open: Option<Open>,
    next_index: u32,
    /// Tags dropped while waiting for a starting point.
    pub skipped: u64,
}

impl Segmenter {
    pub fn new(cfg: SegmentConfig) -> Self {
        Self {
            cfg,
            metadata: None,
            video_header: None,
            audio_header: None,
            seen_video: false,
            first_audio_ts: None,
            open: None,
            next_index: 0,
            skipped: 0,
        }
    }

    /// One tag of the stream, arriving at `now_unix_ms`.
    pub fn push(&mut self, tag: &Tag, now_unix_ms: u64, out: &mut Vec<Action>) {
        if tag.kind == TagKind::Script {
            // Metadata opens the next file; a file already open keeps its own.
            self.metadata = Some(tag.clone());
            return;
        }
        if tag.is_sequence_header() {
            let slot = match tag.kind {
                TagKind::Video => &mut self.video_header,
                _ => &mut self.audio_header,
            };
            let changed = slot.as_ref().is_none_or(|h| h.data != tag.data);
            *slot = Some(tag.clone());
            if changed {
                if let Some(open) = self.open.as_mut() {
                    let base = open.base_ts;
                    // New parameters mid-file (a resolution change): players handle an
                    // in-band header, so it goes in the file too (in MP4, new parameter
                    // sets before the next keyframe; what MP4 cannot carry starts a
                    // new file at the next keyframe).
                    match &mut open.mp4 {
                        Some(m) => {
                            if m.header_changed(tag).is_err() {
                                self.close(out);
                            }
                        }
                        None => {
                            let t = self.rebased(tag, base);
                            self.write(&t, now_unix_ms, out);
                        }
                    }
                }
            }
            return;
        }
        if tag.kind == TagKind::Video {
            self.seen_video = true;
        }
        let keyframe = tag.is_video_keyframe();
        if let Some(open) = &self.open {
            let elapsed = tag.timestamp.wrapping_sub(open.base_ts) as i32;
            // Audio a little older than the keyframe a file starts at is interleaving
            // (clamped to 0 when written); a step far back is the source's clock
            // reset: start over.
            let reset = elapsed < -RESET_MS;
            let due = elapsed >= self.cfg.fragment_ms as i32
                && (keyframe || (!self.seen_video && tag.kind == TagKind::Audio));
            if due || reset {
                self.close(out);
            }
        }
        if self.open.is_none() && !self.start(tag, keyframe, now_unix_ms, out) {
            self.skipped += 1;
            return;
        }
        let base = self.open.as_ref().expect("opened above").base_ts;
        let t = self.rebased(tag, base);
        self.write(&t, now_unix_ms, out);
    }

    /// The stream ended (or recording was stopped).
    pub fn finish(&mut self, out: &mut Vec<Action>) {
        self.close(out);
    }

    /// Opens a file if this tag can start one.
    fn start(
        &mut self,
        tag: &Tag,
        keyframe: bool,
        now_unix_ms: u64,
        out: &mut Vec<Action>,
    ) -> bool {
        let can = if keyframe {
            self.video_header.is_some()
        } else if tag.kind == TagKind::Audio && self.audio_header.is_some() && !self.seen_video {
            let first = *self.first_audio_ts.get_or_insert(tag.timestamp);
            tag.timestamp.wrapping_sub(first) >= self.cfg.audio_only_after_ms
        } else {
            false
        };
        if !can {
            return false;
        }
        let (head, mp4) = match self.cfg.format {
            Format::Flv => {
                let mut head = vec![flv::header()];
                let zero = |t: &Tag| Tag {
                    timestamp: 0,
                    ..t.clone()
                };
                let headers = [&self.metadata, &self.video_header, &self.audio_header];
                head.extend(headers.into_iter().flatten().map(|t| flv::tag(&zero(t))));
                (head, None)
            }
            Format::Mp4 => {
                // The video track only from a keyframe (an audio-only start has none).
                let video = if keyframe {
                    self.video_header.as_ref()
                } else {
                    None
                };
                match Mp4Writer::open(video, self.audio_header.as_ref()) {
                    Ok((m, head)) => (vec![head], Some(m)),
                    Err(_) => return false,
                }
            }
        };
        let index = self.next_index;
        self.next_index += 1;
        out.push(Action::Open {
            index,
            start_unix_ms: now_unix_ms,
        });
        self.open = Some(Open {
            index,
            base_ts: tag.timestamp,
            start_unix_ms: now_unix_ms,
            last_unix_ms: now_unix_ms,
            last_ms: 0,
            bytes: 0,
            mp4,
        });
        for b in head {
            self.append(b, now_unix_ms, None, out);
        }
        true
    }

    fn rebased(&self, tag: &Tag, base: u32) -> Tag {
        Tag {
            timestamp: tag.timestamp.wrapping_sub(base),
            ..tag.clone()
        }
    }

    fn write(&mut self, t: &Tag, now_unix_ms: u64, out: &mut Vec<Action>) {
        // Media a little older than the file's start (audio interleaved before the
        // keyframe) is left out: clamped to 0 it would be played before the audio
        // that belongs at 0, and every later sound would be late by as much (a
        // converted WebRTC stream runs its audio tens of ms ahead of its video).
        // A sequence header is clamped.
        let ts = if t.timestamp > u32::MAX / 2 {
            if !t.is_sequence_header() {
                self.skipped += 1;
                return;
            }
            0
        } else {
            t.timestamp
        };
        let t = Tag {
            timestamp: ts,
            ..t.clone()
        };
        let open = self.open.as_mut().expect("a file is open");
        match &mut open.mp4 {
            Some(m) => {
                let mut fragments = Vec::new();
                m.sample(&t, &mut fragments);
                open.last_ms = open.last_ms.max(ts);
                open.last_unix_ms = now_unix_ms;
                for b in fragments {
                    self.append(b, now_unix_ms, None, out);
                }
            }
            None => self.append(flv::tag(&t), now_unix_ms, Some(ts), out),
        }
    }

    fn append(&mut self, b: Bytes, now_unix_ms: u64, ts: Option<u32>, out: &mut Vec<Action>) {
        let open = self.open.as_mut().expect("a file is open");
        open.bytes += b.len() as u64;
        open.last_unix_ms = now_unix_ms;
        if let Some(ts) = ts {
            open.last_ms = open.last_ms.max(ts);
        }
        out.push(Action::Write(b));
    }

    fn close(&mut self, out: &mut Vec<Action>) {
        let mut rest = Vec::new();
        if let Some(m) = self.open.as_mut().and_then(|o| o.mp4.as_mut()) {
            m.finish(&mut rest);
        }
        for b in rest {
            let last = self.open.as_ref().map_or(0, |o| o.last_unix_ms);
            self.append(b, last, None, out);
        }
        let Some(open) = self.open.take() else {
            return;
        };
        if open.last_ms < self.cfg.min_ms {
            out.push(Action::Discard { index: open.index });
            return;
        }
        out.push(Action::Close(Finished {
            index: open.index,
            start_unix_ms: open.start_unix_ms,
            end_unix_ms: open.last_unix_ms,
            duration_ms: open.last_ms,
            bytes: open.bytes,
        }));
    }
}

/// A stream name as a file name: letters, digits, `-`, `_` and `.` kept, anything
/// else `_`, never empty, never starting with a dot, at most 128 bytes.
pub fn file_stem(stream: &str) -> String {
    let mut s: String = stream
        .chars()
        .take(128)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        s.insert(0, '_');
    }
    s
}

#[cfg(test)]
mod tests;
