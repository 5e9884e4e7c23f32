//! Recording and stream callbacks, the shell of [`crate::record`]: watches the live hub
//! (every RTMP push and every WebRTC publication is a stream there). For each stream
//! that `[record]` selects, a task plays it like a player would (so a WebRTC stream is
//! converted to FLV once, shared with RTMP/FLV players, AAC audio included) and writes
//! the segmenter's files, handing every batch of tags to the kernel as it comes: a
//! crash or SIGKILL loses at most what was still queued. Each closed file and each
//! stream's start and end become callbacks (`server::hooks`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::hooks::{unix_ms, Callbacks};
use crate::config::RecordConfig;
use crate::live::{HubEvent, Next, ObserveFn, Source, StreamPlace};
use crate::metrics::Metrics;
use crate::record::{file_stem, Action, Finished, Format, SegmentConfig, Segmenter};

/// Rooms the REST call may ask to record at once, per node.
const MAX_RECORDED_ROOMS: usize = 10_000;

/// One recording's open file and what its callbacks name.
struct Writing {
    dir: PathBuf,
    stem: String,
    format: Format,
    file: Option<(tokio::fs::File, PathBuf)>,
    /// The open file could not be created or written: the rest of it is dropped.
    failed: bool,
    task_id: String,
    stream: String,
    place: StreamPlace,
}

pub struct Recording {
    pub config: RecordConfig,
    /// Where closed files go besides the local directory, if anywhere.
    pub uploader: Option<super::upload::Uploader>,
    callbacks: Option<Callbacks>,
    metrics: Arc<Metrics>,
    /// Named in callbacks (`node`, the `app` domain).
    node: String,
    /// Streams being recorded: a recording's id and what stops it.
    active: Mutex<HashMap<String, (u64, oneshot::Sender<()>)>>,
    /// Rooms the backend asked to record (`POST /v1/record/start {"room_id"}`): every
    /// stream published in them, now and until stopped, in this format (or the
    /// configured one). Kept in memory: a restarted node forgets them.
    rooms: Mutex<HashMap<(u64, String), Option<Format>>>,
    next_id: AtomicU64,
}

/// A recorded file, as the query call lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileInfo {
    pub stream_id: String,
    pub file: String,
    pub file_size: u64,
    /// Unix ms: when it started (from its name) and when it was last written.
    pub start_ms: u64,
    pub end_ms: u64,
}

impl Recording {
    pub fn new(
        config: RecordConfig,
        uploader: Option<super::upload::Uploader>,
        callbacks: Option<Callbacks>,
        metrics: Arc<Metrics>,
        node: String,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            uploader,
            callbacks,
            metrics,
            node,
            active: Mutex::new(HashMap::new()),
            rooms: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// Starts recording a live stream (in `format`, or the configured one); false if it
    /// is being recorded already.
    pub fn start(
        self: &Arc<Self>,
        source: &Arc<Source>,
        place: &StreamPlace,
        format: Option<Format>,
    ) -> bool {
        let mut active = self.active.lock().expect("recordings lock");
        if active.contains_key(&source.name) {
            return false;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (stop, stopped) = oneshot::channel();
        active.insert(source.name.clone(), (id, stop));
        drop(active);
        let format = format.unwrap_or(self.config.format);
        tokio::spawn(
            self.clone()
                .record(id, source.clone(), place.clone(), format, stopped),
        );
        true
    }

    /// Stops recording a stream (its file is closed as at the stream's end); false if
    /// it was not being recorded.
    pub fn stop(&self, stream: &str) -> bool {
        let removed = self.active.lock().expect("recordings lock").remove(stream);
        match removed {
            Some((_, stop)) => {
                let _ = stop.send(());
                true
            }
            None => false,
        }
    }

    /// Where an app's stream's files are.
    pub fn stream_dir(&self, sdk_app_id: u64, stream: &str) -> PathBuf {
        Path::new(&self.config.dir)
            .join(sdk_app_id.to_string())
            .join(file_stem(stream))
    }

    /// An app's recorded files (of one stream, or all), overlapping `[from_ms, to_ms]`,
    /// oldest first, at most `limit`.
    pub fn list(
        &self,
        sdk_app_id: u64,
        stream: Option<&str>,
        from_ms: u64,
        to_ms: u64,
        limit: usize,
    ) -> Vec<FileInfo> {
        let app_dir = Path::new(&self.config.dir).join(sdk_app_id.to_string());
        let dirs: Vec<PathBuf> = match stream {
            Some(s) => vec![app_dir.join(file_stem(s))],
            None => std::fs::read_dir(&app_dir)
                .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                .unwrap_or_default(),
        };
        let mut out = Vec::new();
        for dir in dirs {
            let Some(stem) = dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(start_ms) = start_ms_of(&name) else {
                    continue;
                };
                let Ok(meta) = e.metadata() else { continue };
                let end_ms = meta
                    .modified()
                    .ok()
                    .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(start_ms, |d| d.as_millis() as u64);
                if end_ms < from_ms || start_ms > to_ms {
                    continue;
                }
                out.push(FileInfo {
                    stream_id: stem.clone(),
                    file: name,
                    file_size: meta.len(),
                    start_ms,
                    end_ms,
                });
            }
        }
        out.sort_by(|a, b| (a.start_ms, &a.file).cmp(&(b.start_ms, &b.file)));
        out.truncate(limit);
        out
    }

    /// What the hub calls on every stream opened and closed.
    pub fn observer(self: &Arc<Self>) -> ObserveFn {
        let me = self.clone();
        Arc::new(move |event| match event {
            HubEvent::Opened { source, place } => me.opened(source, place),
            HubEvent::Closed { name, place } => me.stream_event(0, name, place),
        })
    }

    fn opened(self: &Arc<Self>, source: &Arc<Source>, place: &StreamPlace) {
        self.stream_event(1, &source.name, place);
        let room = place.room.name();
        let asked = self
            .rooms
            .lock()
            .expect("recorded rooms lock")
            .get(&(place.sdk_app_id, room.clone()))
            .copied();
        if let Some(format) = asked {
            self.start(source, place, format);
        } else if self.config.applies(&source.name, place.sdk_app_id, &room) {
            self.start(source, place, None);
        }
    }

    /// Records every stream of a room from now on (those live now, of `live`, at
    /// once); false if it was asked already or too many rooms are.
    pub fn start_room(
        self: &Arc<Self>,
        sdk_app_id: u64,
        room: &str,
        format: Option<Format>,
        live: &[(Arc<Source>, StreamPlace)],
    ) -> Result<(), &'static str> {
        {
            let mut rooms = self.rooms.lock().expect("recorded rooms lock");
            if rooms.contains_key(&(sdk_app_id, room.to_owned())) {
                return Err("this room is being recorded already");
            }
            if rooms.len() >= MAX_RECORDED_ROOMS {
                return Err("too many rooms are being recorded");
            }
            rooms.insert((sdk_app_id, room.to_owned()), format);
        }
        for (source, place) in in_room(live, sdk_app_id, room) {
            self.start(source, place, format);
        }
        Ok(())
    }

    /// Stops recording a room (and its streams' files, as at their end); false if it
    /// was not asked to be recorded.
    pub fn stop_room(
        &self,
        sdk_app_id: u64,
        room: &str,
        live: &[(Arc<Source>, StreamPlace)],
    ) -> bool {
        let removed = self
            .rooms
            .lock()
            .expect("recorded rooms lock")
            .remove(&(sdk_app_id, room.to_owned()))
            .is_some();
        if removed {
            for (source, _) in in_room(live, sdk_app_id, room) {
                self.stop(&source.name);
            }
        }
        removed
    }

    /// Tencent CSS push callbacks: `event_type` 1 (push began), 0 (push ended).
    fn stream_event(&self, event_type: u32, stream: &str, place: &StreamPlace) {
        let Some(cb) = &self.callbacks else { return };
        let now = unix_ms();
        let mut body = self.common(stream, place);
        body.insert("event_type".into(), event_type.into());
        body.insert("event_time".into(), (now / 1000).into());
        body.insert("event_time_ms".into(), now.into());
        body.insert("sequence".into(), format!("{stream}-{now}").into());
        body.insert("errcode".into(), 0.into());
        body.insert("errmsg".into(), "".into());
        let kind = if event_type == 1 {
            "stream_begin"
        } else {
            "stream_end"
        };
        cb.send(place.sdk_app_id, kind, body);
    }

    fn common(&self, stream: &str, place: &StreamPlace) -> Map<String, Value> {
        let v = json!({
            "appid": place.sdk_app_id,
            "app": self.node,
            "appname": "live",
            "stream_id": stream,
            "channel_id": stream,
            "room_id": place.room.name(),
            "node": self.node,
            "stream_param": "",
        });
        match v {
            Value::Object(m) => m,
            _ => unreachable!("an object literal"),
        }
    }

    async fn record(
        self: Arc<Self>,
        id: u64,
        source: Arc<Source>,
        place: StreamPlace,
        format: Format,
        mut stopped: oneshot::Receiver<()>,
    ) {
        let stream = source.name.clone();
        let player = source.subscribe_with(self.config.max_lag_ms);
        drop(source);
        let stem = file_stem(&stream);
        let dir = self.stream_dir(place.sdk_app_id, &stream);
        let task_id = format!("{stem}-{}", unix_ms());
        info!(%stream, dir = %dir.display(), "recording");
        self.metrics.recordings.inc();
        let mut seg = Segmenter::new(SegmentConfig {
            fragment_ms: (self.config.fragment_s.saturating_mul(1000)).min(u64::from(u32::MAX / 4))
                as u32,
            min_ms: self.config.min_ms,
            format,
            ..Default::default()
        });
        let mut w = Writing {
            dir,
            stem,
            format,
            file: None,
            failed: false,
            task_id,
            stream: stream.clone(),
            place,
        };
        let mut actions = Vec::new();
        let mut received = 0u64;
        loop {
            let next = tokio::select! {
                next = player.next() => next,
                _ = &mut stopped => break,
            };
            let tags = match next {
                Next::Tags(t) => t,
                Next::Closed => break,
            };
            let now = unix_ms();
            received += tags.len() as u64;
            for t in &tags {
                seg.push(t, now, &mut actions);
            }
            self.apply(&mut actions, &mut w).await;
        }
        seg.finish(&mut actions);
        self.apply(&mut actions, &mut w).await;
        self.metrics.recordings.dec();
        {
            let mut active = self.active.lock().expect("recordings lock");
            if active.get(&stream).is_some_and(|(i, _)| *i == id) {
                active.remove(&stream);
            }
        }
        info!(%stream, tags = received, skipped = seg.skipped, "recording ended");
    }

    async fn apply(self: &Arc<Self>, actions: &mut Vec<Action>, w: &mut Writing) {
        let Writing {
            dir,
            stem,
            format,
            file,
            failed,
            task_id,
            stream,
            place,
        } = w;
        let (dir, stem, task_id, stream, place) = (
            dir.as_path(),
            stem.as_str(),
            task_id.as_str(),
            stream.as_str(),
            &*place,
        );
        for action in actions.drain(..) {
            match action {
                Action::Open { start_unix_ms, .. } => {
                    let ext = format.extension();
                    let path = dir.join(format!("{stem}-{start_unix_ms}.{ext}"));
                    *failed = false;
                    let opened = async {
                        tokio::fs::create_dir_all(dir).await?;
                        tokio::fs::File::create(&path).await
                    }
                    .await;
                    match opened {
                        Ok(f) => *file = Some((f, path)),
                        Err(e) => {
                            warn!(%stream, path = %path.display(), error = %e, "cannot create a recording file");
                            *failed = true;
                            *file = None;
                        }
                    }
                }
                Action::Write(bytes) => {
                    if let Some((f, path)) = file.as_mut() {
                        if let Err(e) = f.write_all(&bytes).await {
                            warn!(%stream, path = %path.display(), error = %e, "recording write failed; this file ends here");
                            *failed = true;
                            *file = None;
                        } else {
                            self.metrics.record_bytes.inc_by(bytes.len() as u64);
                        }
                    }
                }
                Action::Close(done) => {
                    if let Some((mut f, path)) = file.take() {
                        let _ = f.flush().await;
                        let _ = f.sync_all().await;
                        self.metrics.record_files.with_label_values(&["kept"]).inc();
                        info!(%stream, path = %path.display(), duration_ms = done.duration_ms, bytes = done.bytes, "recording file closed");
                        if self.uploader.is_some() {
                            // The backend hears of the file once it is in the bucket.
                            let me = self.clone();
                            let (task_id, stream, place) =
                                (task_id.to_owned(), stream.to_owned(), place.clone());
                            tokio::spawn(async move {
                                me.upload(done, path, &task_id, &stream, &place).await
                            });
                        } else {
                            let url = self.local_url(&path, stream, place);
                            self.file_event(&done, &path, &url, task_id, stream, place);
                        }
                    } else if *failed {
                        self.metrics
                            .record_files
                            .with_label_values(&["failed"])
                            .inc();
                    }
                }
                Action::Discard { .. } => {
                    if let Some((_, path)) = file.take() {
                        let _ = tokio::fs::remove_file(&path).await;
                        self.metrics
                            .record_files
                            .with_label_values(&["discarded"])
                            .inc();
                    }
                }
            }
        }
        // What was written is the kernel's now: a crash of this process loses nothing
        // of it (a machine crash may; files are synced when closed).
        if let Some((f, _)) = file.as_mut() {
            let _ = f.flush().await;
        }
    }

    /// Uploads a closed file, then tells the backend where it is.
    async fn upload(
        self: Arc<Self>,
        done: Finished,
        path: PathBuf,
        task_id: &str,
        stream: &str,
        place: &StreamPlace,
    ) {
        let Some(up) = &self.uploader else { return };
        let name = file_name(&path);
        let key = up.key(place.sdk_app_id, &file_stem(stream), &name);
        let uploads = &self.metrics.record_uploads;
        let retried = uploads.with_label_values(&["retried"]);
        match up.upload(&path, &key, || retried.inc()).await {
            Ok(_) => {
                uploads.with_label_values(&["ok"]).inc();
                if !self.config.keep_local {
                    let _ = tokio::fs::remove_file(&path).await;
                }
                self.file_event(&done, &path, &up.url(&key), task_id, stream, place);
            }
            Err(e) => {
                uploads.with_label_values(&["failed"]).inc();
                warn!(%stream, path = %path.display(), error = %e, "recording upload given up; the file stays local");
                let url = self.local_url(&path, stream, place);
                self.file_event(&done, &path, &url, task_id, stream, place);
            }
        }
    }

    /// Where a local file is told to be: under `url_prefix`, or its path.
    fn local_url(&self, path: &Path, stream: &str, place: &StreamPlace) -> String {
        if self.config.url_prefix.is_empty() {
            path.display().to_string()
        } else {
            format!(
                "{}/{}/{}/{}",
                self.config.url_prefix.trim_end_matches('/'),
                place.sdk_app_id,
                file_stem(stream),
                file_name(path)
            )
        }
    }

    /// Tencent's recording callback, `event_type` 100.
    fn file_event(
        &self,
        done: &Finished,
        path: &Path,
        video_url: &str,
        task_id: &str,
        stream: &str,
        place: &StreamPlace,
    ) {
        let Some(cb) = &self.callbacks else { return };
        let name = file_name(path);
        let (file_id, ext) = name.rsplit_once('.').unwrap_or((&name, ""));
        let (file_id, ext) = (file_id.to_owned(), ext.to_owned());
        let duration_s = done.duration_ms.div_ceil(1000);
        let mut body = self.common(stream, place);
        body.insert("event_type".into(), 100.into());
        body.insert("file_id".into(), file_id.clone().into());
        body.insert("record_file_id".into(), file_id.into());
        body.insert("file_format".into(), ext.into());
        body.insert("task_id".into(), task_id.into());
        body.insert("start_time".into(), (done.start_unix_ms / 1000).into());
        body.insert("end_time".into(), (done.end_unix_ms / 1000).into());
        body.insert(
            "start_time_usec".into(),
            (done.start_unix_ms % 1000 * 1000).into(),
        );
        body.insert(
            "end_time_usec".into(),
            (done.end_unix_ms % 1000 * 1000).into(),
        );
        body.insert("duration".into(), duration_s.into());
        body.insert("duration_ms".into(), done.duration_ms.into());
        body.insert("file_size".into(), done.bytes.into());
        body.insert("video_url".into(), video_url.into());
        body.insert("media_start_time".into(), 0.into());
        let bps = done.bytes * 8000 / u64::from(done.duration_ms.max(1));
        body.insert("record_bps".into(), bps.into());
        body.insert("callback_ext".into(), "{}".into());
        cb.send(place.sdk_app_id, "record", body);
    }
}

/// The streams of `live` published in an app's room.
fn in_room<'a>(
    live: &'a [(Arc<Source>, StreamPlace)],
    sdk_app_id: u64,
    room: &'a str,
) -> impl Iterator<Item = &'a (Arc<Source>, StreamPlace)> {
    live.iter()
        .filter(move |(_, p)| p.sdk_app_id == sdk_app_id && p.room.name() == room)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// When a recording file started, from its name (`<stream>-<start unix ms>.flv` or
/// `.mp4`); `None` for a name this node does not make.
pub fn start_ms_of(name: &str) -> Option<u64> {
    name.strip_suffix(".flv")
        .or_else(|| name.strip_suffix(".mp4"))
        .and_then(|n| n.rsplit_once('-'))
        .and_then(|(_, ms)| ms.parse::<u64>().ok())
}
