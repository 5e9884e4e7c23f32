use super::*;

fn video(ts: u32, key: bool) -> Tag {
    Tag {
        kind: TagKind::Video,
        timestamp: ts,
        data: Bytes::from(vec![if key { 0x17 } else { 0x27 }, 1, 0, 0, 0, 0xaa]),
    }
}

fn audio(ts: u32) -> Tag {
    Tag {
        kind: TagKind::Audio,
        timestamp: ts,
        data: Bytes::from_static(&[0xaf, 1, 0x21]),
    }
}

fn headers() -> Vec<Tag> {
    vec![
        Tag {
            kind: TagKind::Video,
            timestamp: 0,
            data: Bytes::from_static(&[0x17, 0, 0, 0, 0, 1]),
        },
        Tag {
            kind: TagKind::Audio,
            timestamp: 0,
            data: Bytes::from_static(&[0xaf, 0, 0x12, 0x10]),
        },
    ]
}

fn hub() -> Hub {
    Hub::new(500, Arc::new(|_, _| {}), Arc::new(|_| {}))
}

fn place() -> StreamPlace {
    StreamPlace {
        sdk_app_id: 1,
        room: crate::auth::RoomId::Num(1),
    }
}

/// What the writer's `next()` takes, without waiting (nothing when empty).
fn take(q: &Player) -> Vec<Tag> {
    match q.try_next() {
        Some(Next::Tags(t)) => t,
        _ => Vec::new(),
    }
}

/// A video tag of `bytes` bytes.
fn big_video(ts: u32, key: bool, bytes: usize) -> Tag {
    let mut data = vec![0u8; bytes];
    data[0] = if key { 0x17 } else { 0x27 };
    data[1] = 1;
    Tag {
        kind: TagKind::Video,
        timestamp: ts,
        data: Bytes::from(data),
    }
}

#[test]
fn a_new_player_starts_with_headers_then_the_gop() {
    let h = hub();
    let s = h.open("cam", place());
    for t in headers() {
        s.push(t);
    }
    s.push(video(0, true));
    s.push(audio(10));
    s.push(video(33, false));
    let q = s.subscribe();
    let tags = take(&q);
    assert!(tags[0].is_sequence_header() && tags[0].kind == TagKind::Video);
    assert!(tags[1].is_sequence_header() && tags[1].kind == TagKind::Audio);
    assert!(tags[2].is_video_keyframe());
    assert_eq!(tags.len(), 5);
    s.push(video(66, false));
    assert_eq!(take(&q).len(), 1);
}

#[test]
fn without_a_gop_a_player_waits_for_a_keyframe() {
    let h = hub();
    let s = h.open("cam", place());
    for t in headers() {
        s.push(t);
    }
    let q = s.subscribe();
    take(&q);
    s.push(video(33, false));
    s.push(audio(40));
    s.push(video(66, true));
    let tags = take(&q);
    assert_eq!(
        tags.len(),
        2,
        "the delta frame is skipped, audio and the keyframe pass"
    );
    assert!(tags[1].is_video_keyframe());
}

#[test]
fn a_slow_player_skips_to_the_next_keyframe() {
    let h = hub();
    let s = h.open("cam", place());
    s.push(video(0, true));
    let q = s.subscribe();
    // Nobody drains the queue: after 500 ms of backlog it is emptied.
    for i in 1..40u32 {
        s.push(video(i * 33, i % 30 == 0));
    }
    let tags = take(&q);
    assert!(tags.len() < 20, "{}", tags.len());
    assert!(q.dropped() > 0);
    assert!(tags[0].is_video_keyframe(), "it resumes at a keyframe");
}

#[test]
fn closing_a_stream_ends_its_players() {
    let h = hub();
    let s = h.open("cam", place());
    let q = s.subscribe();
    h.close("cam", &s);
    assert!(h.get("cam").is_none());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert!(matches!(rt.block_on(q.next()), Next::Closed));
}

#[test]
fn a_player_starting_with_an_old_gop_is_not_cut_and_keeps_its_headers() {
    let h = hub();
    let s = h.open("cam", place());
    for t in headers() {
        s.push(t);
    }
    // A GOP 900 ms old when the player arrives.
    s.push(video(0, true));
    for i in 1..28u32 {
        s.push(video(i * 33, false));
    }
    let q = s.subscribe();
    // Live tags arrive before the writer drains the cache: nothing is dropped.
    s.push(video(950, false));
    s.push(audio(960));
    let tags = take(&q);
    assert_eq!(q.dropped(), 0);
    assert!(tags[0].is_sequence_header());
    assert_eq!(tags.len(), 2 + 28 + 2);
    // Once drained, a backlog past 500 ms is cut, headers first again.
    for i in 0..20u32 {
        s.push(video(1000 + i * 33, false));
    }
    s.push(video(1700, false));
    let tags = take(&q);
    assert!(q.dropped() > 0);
    assert!(
        tags.iter().take(2).all(|t| t.is_sequence_header()),
        "{:?}",
        tags.len()
    );
    assert!(
        // The cut came with the tag 528 ms past the oldest queued one.
        tags.iter().take(2).all(|t| t.timestamp == 1000 + 16 * 33),
        "headers carry the time the player resumes from"
    );
}

#[test]
fn the_writer_takes_bounded_batches_and_the_backlog_stays_visible() {
    let h = hub();
    let s = h.open("cam", place());
    for t in headers() {
        s.push(t);
    }
    // A GOP of 30 frames of 5 kB, 1 s old when the player arrives.
    s.push(big_video(0, true, 20_000));
    for i in 1..30u32 {
        s.push(big_video(i * 33, false, 5_000));
    }
    let q = s.subscribe();
    // The writer takes the cache a batch at a time; live tags arriving meanwhile do
    // not cut it while any of it is still queued.
    let mut taken = Vec::new();
    for i in 0..6u32 {
        let batch = take(&q);
        let bytes: usize = batch.iter().map(|t| t.data.len()).sum();
        assert!(
            batch.len() == 1 || bytes <= BATCH_MAX_BYTES,
            "{} tags, {bytes} bytes",
            batch.len()
        );
        taken.extend(batch);
        s.push(big_video(1000 + i * 33, false, 5_000));
    }
    assert_eq!(q.dropped(), 0);
    assert!(taken[0].is_sequence_header() && taken[2].is_video_keyframe());
    // The slow writer falls behind: what it has not taken is measured and cut.
    for i in 6..40u32 {
        s.push(big_video(1000 + i * 33, i == 30, 5_000));
    }
    assert!(q.dropped() > 0);
    let resumed = take(&q);
    assert!(resumed[0].is_sequence_header());
    assert!(resumed.iter().any(|t| t.is_video_keyframe()));
}

/// Drains everything a player has queued.
fn take_all(q: &Player) -> Vec<Tag> {
    let mut all = Vec::new();
    loop {
        let t = take(q);
        if t.is_empty() {
            return all;
        }
        all.extend(t);
    }
}

fn bytes_of(tags: &[Tag]) -> usize {
    tags.iter().map(|t| t.data.len()).sum()
}

/// A pusher whose timestamps stand still defeats the media-time bound: before, a
/// player's queue then held up to 4,096 tags of up to 4 MiB each.
#[test]
fn a_player_queue_is_bounded_in_bytes_when_timestamps_stand_still() {
    let h = hub();
    let s = h.open("cam", place());
    let q = s.subscribe();
    s.push(big_video(0, true, 1 << 20));
    for _ in 0..40 {
        s.push(big_video(0, false, 1 << 20));
    }
    let queued = take_all(&q);
    assert!(
        bytes_of(&queued) <= QUEUE_MAX_BYTES,
        "{}",
        bytes_of(&queued)
    );
    assert!(q.dropped() > 0);
}

#[test]
fn the_gop_cache_is_bounded_in_bytes() {
    let h = hub();
    let s = h.open("cam", place());
    s.push(big_video(0, true, 1 << 20));
    for i in 1..40 {
        s.push(big_video(i, false, 1 << 20));
    }
    let q = s.subscribe();
    let replay = take_all(&q);
    assert!(bytes_of(&replay) <= GOP_MAX_BYTES, "{}", bytes_of(&replay));
    // The replay was given up: the player starts at the next keyframe.
    s.push(big_video(41, true, 100));
    assert!(take_all(&q)[0].is_video_keyframe());
}
