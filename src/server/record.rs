//! Recording and stream callbacks, the shell of [`crate::record`]: watches the live hub
//! (every RTMP push and every WebRTC publication is a stream there). For each stream
//! that `[record]` selects, a task plays it like a player would (so a WebRTC stream is
//! converted to FLV once, shared with RTMP/FLV players, AAC audio included) and writes
//! the segmenter's files, handing every batch of tags to the kernel as it comes: a
//! crash or SIGKILL loses at most what was still queued. Each closed file and each
//! stream's start and end become callbacks (`server::hooks`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use super::hooks::{unix_ms, Callbacks};
use crate::config::RecordConfig;
use crate::live::{HubEvent, Next, ObserveFn, Source, StreamPlace};
use crate::metrics::Metrics;
use crate::record::{file_stem, Action, Finished, SegmentConfig, Segmenter};

pub struct Recording {
    config: RecordConfig,
    callbacks: Option<Callbacks>,
    metrics: Arc<Metrics>,
    /// Named in callbacks (`node`, the `app` domain).
    node: String,
}

impl Recording {
    pub fn new(
        config: RecordConfig,
        callbacks: Option<Callbacks>,
        metrics: Arc<Metrics>,
        node: String,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            callbacks,
            metrics,
            node,
        })
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
        if self
            .config
            .applies(&source.name, place.sdk_app_id, &room_name(&place.room))
        {
            tokio::spawn(self.clone().record(source.clone(), place.clone()));
        }
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
            "room_id": room_name(&place.room),
            "node": self.node,
            "stream_param": "",
        });
        match v {
            Value::Object(m) => m,
            _ => unreachable!("an object literal"),
        }
    }

    async fn record(self: Arc<Self>, source: Arc<Source>, place: StreamPlace) {
        let stream = source.name.clone();
        let player = source.subscribe_with(self.config.max_lag_ms);
        drop(source);
        let stem = file_stem(&stream);
        let dir = Path::new(&self.config.dir).join(&stem);
        let task_id = format!("{stem}-{}", unix_ms());
        info!(%stream, dir = %dir.display(), "recording");
        self.metrics.recordings.inc();
        let mut seg = Segmenter::new(SegmentConfig {
            fragment_ms: (self.config.fragment_s.saturating_mul(1000)).min(u64::from(u32::MAX / 4))
                as u32,
            min_ms: self.config.min_ms,
            ..Default::default()
        });
        let mut file: Option<(tokio::fs::File, PathBuf)> = None;
        let mut failed = false;
        let mut actions = Vec::new();
        let mut received = 0u64;
        loop {
            let tags = match player.next().await {
                Next::Tags(t) => t,
                Next::Closed => break,
            };
            let now = unix_ms();
            received += tags.len() as u64;
            for t in &tags {
                seg.push(t, now, &mut actions);
            }
            self.apply(
                &mut actions,
                &dir,
                &stem,
                &mut file,
                &mut failed,
                &task_id,
                &stream,
                &place,
            )
            .await;
        }
        seg.finish(&mut actions);
        self.apply(
            &mut actions,
            &dir,
            &stem,
            &mut file,
            &mut failed,
            &task_id,
            &stream,
            &place,
        )
        .await;
        self.metrics.recordings.dec();
        info!(%stream, tags = received, skipped = seg.skipped, "recording ended");
    }

    #[allow(clippy::too_many_arguments)]
    async fn apply(
        &self,
        actions: &mut Vec<Action>,
        dir: &Path,
        stem: &str,
        file: &mut Option<(tokio::fs::File, PathBuf)>,
        failed: &mut bool,
        task_id: &str,
        stream: &str,
        place: &StreamPlace,
    ) {
        for action in actions.drain(..) {
            match action {
                Action::Open { start_unix_ms, .. } => {
                    let path = dir.join(format!("{stem}-{start_unix_ms}.flv"));
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
                        self.file_event(&done, &path, task_id, stream, place);
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

    /// Tencent's recording callback, `event_type` 100.
    fn file_event(
        &self,
        done: &Finished,
        path: &Path,
        task_id: &str,
        stream: &str,
        place: &StreamPlace,
    ) {
        let Some(cb) = &self.callbacks else { return };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file_id = name.trim_end_matches(".flv").to_owned();
        let video_url = if self.config.url_prefix.is_empty() {
            path.display().to_string()
        } else {
            format!(
                "{}/{}/{}",
                self.config.url_prefix.trim_end_matches('/'),
                file_stem(stream),
                name
            )
        };
        let duration_s = done.duration_ms.div_ceil(1000);
        let mut body = self.common(stream, place);
        body.insert("event_type".into(), 100.into());
        body.insert("file_id".into(), file_id.clone().into());
        body.insert("record_file_id".into(), file_id.into());
        body.insert("file_format".into(), "flv".into());
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

/// A room id as written in config and callbacks: the number, or the string as is.
fn room_name(room: &crate::auth::RoomId) -> String {
    match room {
        crate::auth::RoomId::Num(n) => n.to_string(),
        crate::auth::RoomId::Str(s) => s.clone(),
    }
}
