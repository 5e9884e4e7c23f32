//! A second, independent WebRTC stack: members on aiortc (Python), written from
//! `signaling/PROTOCOL.md` alone, publish and receive H.264, VP8 and Opus through
//! Weir, switch codecs in one room, keep their media for a minute under aioice's
//! stock RFC 7675 consent timing, and leave.

mod common;

use std::time::Duration;

use common::aiortc::{compact, Member, Plan};
use common::TestServer;
use serde_json::Value;

const ALL: u32 = 0xff;

/// The counts a summary holds for `stream_id`'s stream.
fn stream<'a>(summary: &'a Value, stream_id: &str) -> &'a Value {
    let s = &summary["streams"][stream_id];
    assert!(
        s.is_object(),
        "no media of {stream_id} at all: {}",
        compact(summary)
    );
    s
}

fn stream_id(user: &str, room: u32) -> String {
    format!("{}_{room}_{user}_main", common::APP)
}

/// A clean run: no errors, left the room, and the socket closed normally.
fn assert_clean(summary: &Value) {
    assert_eq!(
        summary["errors"],
        Value::Array(vec![]),
        "{}",
        compact(summary)
    );
    assert_eq!(summary["left"], "left", "{}", compact(summary));
    assert_eq!(summary["close"]["code"], 1000, "{}", compact(summary));
}

/// Frames of a picture `size` with mid-grey luma near `luma`, and a tone.
fn assert_received(summary: &Value, stream_id: &str, size: (u32, u32), luma: u8, seconds: f64) {
    let s = stream(summary, stream_id);
    let video = s["video"].as_u64().unwrap();
    // 30 fps sent; a receiver that gets most of them for most of the time.
    assert!(
        video as f64 >= 20.0 * seconds,
        "{stream_id}: {video} frames in {seconds} s: {s}"
    );
    assert!(
        s["sizes"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!([size.0, size.1])),
        "{stream_id}: not the {size:?} picture: {s}"
    );
    assert!(
        s["lumas"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| (l.as_i64().unwrap() - i64::from(luma)).abs() <= 8),
        "{stream_id}: not its luma {luma}: {s}"
    );
    let audio = s["audio"].as_u64().unwrap();
    assert!(
        audio as f64 >= 40.0 * seconds,
        "{stream_id}: {audio} audio frames: {s}"
    );
    assert!(
        s["audio_level"].as_f64().unwrap() > 1000.0,
        "{stream_id}: the tone is not heard: {s}"
    );
}

/// Every whole ten seconds of video after the first frame's second got most of its
/// 300 frames: no blackout hides in the total.
fn assert_steady(summary: &Value, stream_id: &str) -> Vec<u64> {
    let s = stream(summary, stream_id);
    let per_second: std::collections::BTreeMap<u64, u64> = s["seconds"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.parse().unwrap(), v.as_u64().unwrap()))
        .collect();
    let (Some(&first), Some(&last)) = (per_second.keys().next(), per_second.keys().last()) else {
        panic!("{stream_id}: no video: {s}");
    };
    let windows: Vec<u64> = (first + 1..last)
        .step_by(10)
        .take_while(|w| w + 10 <= last)
        .map(|w| {
            (w..w + 10)
                .map(|k| per_second.get(&k).copied().unwrap_or(0))
                .sum()
        })
        .collect();
    assert!(
        windows.iter().all(|&n| n >= 270),
        "{stream_id}: frames per 10 s: {windows:?}"
    );
    windows
}

/// A minute, both ways, with aioice's stock consent checks (every 4-6 s): before ICE
/// liveness counted media, each connection went "disconnected" 5 s after a check
/// and lost its media until the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiortc_members_exchange_h264_vp8_and_opus_for_a_minute() {
    let t = TestServer::start().await;
    let room = 7001;
    let seconds = 62.0;
    let a = Member::start(
        &t.ws_url(),
        t.join("a", room, ALL),
        Plan {
            publish: "h264",
            seconds,
            size: (320, 240),
            luma: 60,
        },
    );
    let b = Member::start(
        &t.ws_url(),
        t.join("b", room, ALL),
        Plan {
            publish: "vp8",
            seconds,
            size: (352, 288),
            luma: 180,
        },
    );
    // A member who joins the call late, for ten seconds: the time from its `joined`
    // to its first decoded frame of each stream.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let late = Member::start(
        &t.ws_url(),
        t.join("late", room, ALL),
        Plan {
            seconds: 10.0,
            ..Plan::default()
        },
    );
    let (a, b, late) = tokio::join!(
        a.summary(Duration::from_secs(90)),
        b.summary(Duration::from_secs(90)),
        late.summary(Duration::from_secs(40))
    );
    assert_clean(&late);
    for (user, size, luma) in [("a", (320, 240), 60), ("b", (352, 288), 180)] {
        assert_received(&late, &stream_id(user, room), size, luma, 7.0);
        let s = stream(&late, &stream_id(user, room));
        let join_to_frame =
            s["first_video_ms"].as_f64().unwrap() - late["joined_ms"].as_f64().unwrap();
        eprintln!("late joiner: first frame of {user}'s stream {join_to_frame:.0} ms after joined");
        assert!(
            join_to_frame < 3000.0,
            "{join_to_frame} ms to the first frame"
        );
    }
    assert_clean(&a);
    assert_clean(&b);
    // Media flows for all but the first seconds (joining, ICE, the first keyframe).
    assert_received(&a, &stream_id("b", room), (352, 288), 180, seconds - 4.0);
    assert_received(&b, &stream_id("a", room), (320, 240), 60, seconds - 4.0);
    let vp8 = assert_steady(&a, &stream_id("b", room));
    let h264 = assert_steady(&b, &stream_id("a", room));
    eprintln!(
        "a got VP8 per 10 s {vp8:?}, first frame {} ms after start; b got H.264 per 10 s {h264:?}, first frame {} ms",
        stream(&a, &stream_id("b", room))["first_video_ms"],
        stream(&b, &stream_id("a", room))["first_video_ms"]
    );
}

/// A subscriber gets a later stream in another codec: the H.264 publisher leaves, a
/// VP8 one arrives (and the other way round). Before, the server re-offered the old
/// H.264-only m-section, failed to add VP8 ("unsupported codec type by this
/// transceiver") and the subscriber got audio only, forever.
async fn codec_switch(room: u32, first: &'static str, second: &'static str) {
    let t = TestServer::start().await;
    let watcher = Member::start(
        &t.ws_url(),
        t.join("watcher", room, ALL),
        Plan {
            seconds: 20.0,
            ..Plan::default()
        },
    );
    let one = Member::start(
        &t.ws_url(),
        t.join("one", room, ALL),
        Plan {
            publish: first,
            seconds: 6.0,
            size: (320, 240),
            luma: 60,
        },
    );
    let one = one.summary(Duration::from_secs(30)).await;
    assert_clean(&one);
    let two = Member::start(
        &t.ws_url(),
        t.join("two", room, ALL),
        Plan {
            publish: second,
            seconds: 8.0,
            size: (352, 288),
            luma: 180,
        },
    );
    let (two, watcher) = tokio::join!(
        two.summary(Duration::from_secs(30)),
        watcher.summary(Duration::from_secs(40))
    );
    assert_clean(&two);
    assert_clean(&watcher);
    assert_received(&watcher, &stream_id("one", room), (320, 240), 60, 3.0);
    assert_received(&watcher, &stream_id("two", room), (352, 288), 180, 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_gets_a_vp8_stream_after_an_h264_one() {
    codec_switch(7002, "h264", "vp8").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_gets_an_h264_stream_after_a_vp8_one() {
    codec_switch(7003, "vp8", "h264").await;
}
