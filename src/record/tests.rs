use super::*;
use crate::live::{Tag, TagKind};

fn video(ts: u32, key: bool) -> Tag {
    Tag {
        kind: TagKind::Video,
        timestamp: ts,
        data: Bytes::from(vec![if key { 0x17 } else { 0x27 }, 1, 0, 0, 0, 0xAA]),
    }
}

fn audio(ts: u32) -> Tag {
    Tag {
        kind: TagKind::Audio,
        timestamp: ts,
        data: Bytes::from_static(&[0xAF, 1, 0x21, 0x10]),
    }
}

fn headers() -> Vec<Tag> {
    vec![
        Tag {
            kind: TagKind::Script,
            timestamp: 0,
            data: Bytes::from_static(b"\x02\x00\x0aonMetaData"),
        },
        Tag {
            kind: TagKind::Video,
            timestamp: 0,
            data: Bytes::from_static(&[0x17, 0, 0, 0, 0, 1, 0x42]),
        },
        Tag {
            kind: TagKind::Audio,
            timestamp: 0,
            data: Bytes::from_static(&[0xAF, 0, 0x11, 0x90]),
        },
    ]
}

/// Parses FLV bytes back into (kind, timestamp, first body byte) triples.
fn parse(file: &[u8]) -> Vec<(u8, u32, u8)> {
    assert_eq!(&file[..3], b"FLV");
    let mut at = 13;
    let mut tags = Vec::new();
    while at < file.len() {
        let kind = file[at];
        let len = u32::from_be_bytes([0, file[at + 1], file[at + 2], file[at + 3]]) as usize;
        let ts = u32::from_be_bytes([file[at + 7], file[at + 4], file[at + 5], file[at + 6]]);
        tags.push((kind, ts, file[at + 11]));
        let prev = u32::from_be_bytes(file[at + 11 + len..at + 15 + len].try_into().unwrap());
        assert_eq!(prev as usize, 11 + len);
        at += 15 + len;
    }
    tags
}

/// Runs tags through a segmenter; returns each kept file's bytes and its record.
fn run(cfg: SegmentConfig, tags: &[Tag]) -> (Vec<(Vec<u8>, Finished)>, Vec<u32>) {
    let mut s = Segmenter::new(cfg);
    let mut out = Vec::new();
    for (i, t) in tags.iter().enumerate() {
        s.push(t, 1_000_000 + i as u64, &mut out);
    }
    s.finish(&mut out);
    let mut files = Vec::new();
    let mut discarded = Vec::new();
    let mut cur: Option<Vec<u8>> = None;
    for a in out {
        match a {
            Action::Open { .. } => {
                assert!(cur.is_none(), "open while a file is open");
                cur = Some(Vec::new());
            }
            Action::Write(b) => cur.as_mut().expect("write to an open file").extend(&b),
            Action::Close(f) => {
                let bytes = cur.take().unwrap();
                assert_eq!(bytes.len() as u64, f.bytes);
                files.push((bytes, f));
            }
            Action::Discard { index } => {
                cur = None;
                discarded.push(index);
            }
        }
    }
    assert!(cur.is_none());
    (files, discarded)
}

/// 30 fps video with a keyframe every second, and audio every 21 ms, from `from` ms.
fn stream(from: u32, ms: u32) -> Vec<Tag> {
    let mut tags = Vec::new();
    let (mut v, mut a) = (0u32, 0u32);
    loop {
        let vt = v * 1000 / 30;
        let at = a * 21;
        if vt >= ms && at >= ms {
            break;
        }
        if vt <= at {
            tags.push(video(from + vt, v % 30 == 0));
            v += 1;
        } else {
            tags.push(audio(from + at));
            a += 1;
        }
    }
    tags
}

#[test]
fn files_start_with_headers_and_a_keyframe_at_zero() {
    let mut tags = headers();
    // Starts mid-GOP: the frames before the first keyframe are skipped.
    tags.extend(stream(5_000, 3_000).into_iter().skip(20));
    let cfg = SegmentConfig::default();
    let (files, discarded) = run(cfg, &tags);
    assert!(discarded.is_empty());
    assert_eq!(files.len(), 1);
    let parsed = parse(&files[0].0);
    assert_eq!(parsed[0].0, 18, "metadata first");
    assert_eq!((parsed[1].0, parsed[1].2), (9, 0x17), "AVC sequence header");
    assert_eq!((parsed[2].0, parsed[2].2), (8, 0xAF), "AAC sequence header");
    assert_eq!(
        (parsed[3].0, parsed[3].1, parsed[3].2),
        (9, 0, 0x17),
        "keyframe at 0"
    );
    // Timestamps never go backwards by more than the interleaving, never wrap.
    assert!(parsed.iter().all(|t| t.1 < 3_000));
    assert!(files[0].1.duration_ms >= 1_900, "{:?}", files[0].1);
}

#[test]
fn a_new_file_at_the_first_keyframe_after_the_fragment_length() {
    let mut tags = headers();
    tags.extend(stream(0, 7_500));
    let cfg = SegmentConfig {
        fragment_ms: 3_000,
        ..Default::default()
    };
    let (files, _) = run(cfg, &tags);
    let durations: Vec<u32> = files.iter().map(|f| f.1.duration_ms).collect();
    assert_eq!(files.len(), 3, "{durations:?}");
    for (bytes, f) in &files {
        let parsed = parse(bytes);
        assert_eq!(parsed[0].0, 18);
        let first_video = parsed.iter().skip(3).find(|t| t.0 == 9).unwrap();
        assert_eq!(first_video.2, 0x17, "file {} starts at a keyframe", f.index);
    }
    // 3 s, 3 s and the rest; together the whole stream (less a frame per file).
    assert!(
        durations[0] >= 2_950 && durations[0] < 3_050,
        "{durations:?}"
    );
    let total: u32 = durations.iter().sum();
    assert!(total > 7_350 && total <= 7_500, "{durations:?}");
    assert_eq!(
        files.iter().map(|f| f.1.index).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
}

#[test]
fn a_file_under_the_minimum_is_discarded() {
    let mut tags = headers();
    tags.extend(stream(0, 600));
    let (files, discarded) = run(SegmentConfig::default(), &tags);
    assert!(files.is_empty());
    assert_eq!(discarded, vec![0]);
}

#[test]
fn a_stream_without_video_is_recorded_as_audio_after_a_wait() {
    let mut tags = headers();
    tags.remove(1); // no AVC header
    tags.extend((0..400).map(|n| audio(n * 21)));
    let (files, _) = run(SegmentConfig::default(), &tags);
    assert_eq!(files.len(), 1);
    let parsed = parse(&files[0].0);
    assert!(parsed.iter().all(|t| t.0 != 9));
    // The first 2 s waited for video.
    assert!(files[0].1.duration_ms > 6_000 && files[0].1.duration_ms < 6_400);
}

#[test]
fn audio_older_than_the_starting_keyframe_is_interleaving_not_a_reset() {
    // As a WebRTC publisher's converted stream: each kind monotonic on its own, the
    // two interleaved by arrival, audio up to tens of ms behind the video.
    let mut tags = headers();
    for n in 0..150u32 {
        tags.push(video(10_000 + n * 33, n % 30 == 0));
        tags.push(audio(10_000 + n * 33 - 40));
    }
    let (files, discarded) = run(SegmentConfig::default(), &tags);
    assert!(discarded.is_empty(), "{discarded:?}");
    assert_eq!(files.len(), 1);
    let parsed = parse(&files[0].0);
    assert!(parsed.iter().all(|t| t.1 < 5_000), "clamped, not wrapped");
    assert!(files[0].1.duration_ms > 4_800);
}

#[test]
fn a_source_clock_reset_starts_a_new_file() {
    let mut tags = headers();
    tags.extend(stream(100_000, 3_000));
    tags.extend(stream(0, 3_000));
    let (files, _) = run(SegmentConfig::default(), &tags);
    assert_eq!(files.len(), 2);
}

#[test]
fn file_names_from_stream_names_are_safe() {
    assert_eq!(
        file_stem("1400000000_room_user_main"),
        "1400000000_room_user_main"
    );
    assert_eq!(file_stem("../etc/passwd"), "_.._etc_passwd");
    assert_eq!(file_stem(""), "_");
    assert_eq!(file_stem("a/b\0c"), "a_b_c");
    assert_eq!(file_stem(&"x".repeat(500)).len(), 128);
}
