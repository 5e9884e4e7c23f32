//! WebRTC-published streams for RTMP and HTTP-FLV players: converted once per stream
//! ([`crate::bridge::to_flv`]), from when the first player arrives until the last one
//! leaves. The media plane taps the publisher's RTP and sender reports for the
//! converter; every arriving player asks the publisher for a keyframe at once.

use std::sync::{Arc, Weak};
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Demand, Hub, Source, StreamPlace};
use crate::bridge::to_flv::{Output, RtpToFlv};
use crate::media::TapEvent;
use crate::metrics::Metrics;
use crate::server::control::MediaInput;

/// Tap events a converter may have queued before the media plane drops them.
pub const TAP_QUEUE: usize = 2048;

/// Registers a WebRTC stream in the hub; conversion runs only while someone plays it.
pub fn register(
    hub: &Hub,
    stream_id: &str,
    place: StreamPlace,
    media: mpsc::Sender<MediaInput>,
    aac_bitrate: u32,
    metrics: Arc<Metrics>,
) -> Arc<Source> {
    let stream = stream_id.to_owned();
    let demand = move |source: &Arc<Source>| -> super::DemandFn {
        let weak = Arc::downgrade(source);
        Box::new(move |d| match d {
            Demand::Joined { players: 1 } => {
                info!(stream = %stream, "first player: converting the WebRTC stream to FLV");
                tokio::spawn(convert(
                    stream.clone(),
                    weak.clone(),
                    media.clone(),
                    aac_bitrate,
                    metrics.clone(),
                ));
            }
            Demand::Joined { .. } => {
                // A new player starts at the GOP cache; a fresh keyframe shortens the wait.
                let _ = media.try_send(MediaInput::RequestKeyframe {
                    stream_id: stream.clone(),
                });
            }
            Demand::Left { players: 0 } => {
                info!(stream = %stream, "last player left: conversion stops");
                let _ = media.try_send(MediaInput::Tap {
                    stream_id: stream.clone(),
                    tx: None,
                });
            }
            Demand::Left { .. } => {}
        })
    };
    hub.open_with(stream_id, place, Some(Box::new(demand)))
}

async fn convert(
    stream_id: String,
    source: Weak<Source>,
    media: mpsc::Sender<MediaInput>,
    aac_bitrate: u32,
    metrics: Arc<Metrics>,
) {
    let mut counted = crate::bridge::to_flv::Stats::default();
    let (tx, mut rx) = mpsc::channel(TAP_QUEUE);
    if media
        .send(MediaInput::Tap {
            stream_id: stream_id.clone(),
            tx: Some(tx),
        })
        .await
        .is_err()
    {
        return;
    }
    let _ = media
        .send(MediaInput::RequestKeyframe {
            stream_id: stream_id.clone(),
        })
        .await;
    let mut conv = RtpToFlv::new(Instant::now(), aac_bitrate);
    loop {
        let deadline = conv.poll_timeout();
        let event = tokio::select! {
            ev = rx.recv() => match ev {
                Some(ev) => Some(ev),
                None => break, // the tap was removed
            },
            _ = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            } => None,
        };
        match event {
            Some(TapEvent::Rtp {
                kind,
                packet,
                arrived,
            }) => conv.handle_rtp(kind, packet, arrived),
            Some(TapEvent::SenderReport { kind, report }) => {
                conv.handle_sender_report(kind, &report)
            }
            None => conv.handle_timeout(Instant::now()),
        }
        let Some(source) = source.upgrade() else {
            break;
        };
        while let Some(out) = conv.poll_output() {
            match out {
                Output::Tag(tag) => source.push(tag),
                Output::KeyframeRequest => {
                    let _ = media.try_send(MediaInput::RequestKeyframe {
                        stream_id: stream_id.clone(),
                    });
                }
                Output::Refused(reason) => {
                    warn!(stream = %stream_id, %reason, "WebRTC stream partly not converted to FLV")
                }
                Output::LipSync(late_ms) => {
                    info!(stream = %stream_id, video_late_ms = format!("{late_ms:.1}"), "FLV audio and video aligned on the publisher's clock (its sender reports)")
                }
                Output::Recovered(after) => {
                    debug!(stream = %stream_id, ?after, "FLV video back after a loss");
                    metrics.flv_loss_recovery.observe(after.as_secs_f64());
                }
            }
        }
        let s = conv.stats;
        let f = &metrics.flv_frames;
        f.with_label_values(&["video", "converted"])
            .inc_by(s.video_frames - counted.video_frames);
        f.with_label_values(&["video", "dropped_loss"])
            .inc_by(s.frames_dropped_loss - counted.frames_dropped_loss);
        f.with_label_values(&["video", "before_first_keyframe"])
            .inc_by(s.frames_before_keyframe - counted.frames_before_keyframe);
        f.with_label_values(&["audio", "converted"])
            .inc_by(s.audio_frames - counted.audio_frames);
        f.with_label_values(&["audio", "concealed"])
            .inc_by(s.audio_concealed - counted.audio_concealed);
        counted = s;
    }
    debug!(stream = %stream_id, stats = ?conv.stats, "FLV conversion ended");
}
