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
    assert!(parsed.iter().all(|t| t.1 < 5_000), "not wrapped");
    // The audio older than the first keyframe is left out, not put at 0: it would
    // make every later sound late by as much. After the headers, the keyframe is
    // first at 0, then the audio at its own time.
    let media: Vec<_> = parsed.iter().skip(3).collect();
    assert_eq!((media[0].0, media[0].1), (9, 0));
    assert!(
        media.iter().filter(|t| t.0 == 8).all(|t| t.1 > 0),
        "no audio at 0: {media:?}"
    );
    // Two of the 150 sounds are older than the keyframe (by 40 and 7 ms).
    assert_eq!(media.iter().filter(|t| t.0 == 8).count(), 148);
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

mod mp4_files {
    use super::*;
    use ::mp4_atom::{Any, DecodeMaybe, Moof};

    const SPS: &[u8] = &[0x67, 0x42, 0xc0, 0x1e, 0xd9, 0x00, 0xa0, 0x47, 0xfe, 0xc8];
    const PPS: &[u8] = &[0x68, 0xce, 0x3c, 0x80];

    fn mp4_headers(sps: &[u8]) -> Vec<Tag> {
        vec![
            Tag {
                kind: TagKind::Video,
                timestamp: 0,
                data: crate::bridge::to_flv::avc_sequence_header(sps, PPS),
            },
            Tag {
                kind: TagKind::Audio,
                timestamp: 0,
                // AAC-LC, 48 kHz, mono.
                data: Bytes::from_static(&[0xAF, 0, 0x11, 0x88]),
            },
        ]
    }

    fn cfg() -> SegmentConfig {
        SegmentConfig {
            format: Format::Mp4,
            ..Default::default()
        }
    }

    /// The top-level boxes of a file: the moov, and each fragment with its mdat's size.
    fn boxes(file: &[u8]) -> (mp4_atom::Moov, Vec<(Moof, usize, usize)>) {
        let mut buf = file;
        let mut moov = None;
        let mut frags = Vec::new();
        let mut at = 0;
        while !buf.is_empty() {
            let before = buf.len();
            match Any::decode_maybe(&mut buf).unwrap().expect("a whole box") {
                Any::Ftyp(_) => {}
                Any::Moov(m) => moov = Some(m),
                Any::Moof(m) => frags.push((m, at, 0)),
                Any::Mdat(m) => frags.last_mut().expect("a moof before").2 = m.data.len(),
                other => panic!("unexpected {:?}", other.kind()),
            }
            at += before - buf.len();
        }
        (moov.expect("a moov"), frags)
    }

    #[test]
    fn fragments_of_about_a_second_start_at_keyframes_with_exact_offsets() {
        let mut tags = mp4_headers(SPS);
        tags.extend(stream(5_000, 4_000));
        let (files, _) = run(cfg(), &tags);
        assert_eq!(files.len(), 1);
        let (file, done) = &files[0];
        let (moov, frags) = boxes(file);
        assert_eq!(moov.trak.len(), 2);
        assert_eq!(moov.trak[1].mdia.mdhd.timescale, 48_000);
        // A keyframe each second: one fragment per second.
        assert_eq!(frags.len(), 4, "{:?}", frags.len());
        let mut video_samples = 0;
        let mut audio_samples = 0;
        for (i, (moof, moof_at, mdat_len)) in frags.iter().enumerate() {
            assert_eq!(moof.mfhd.sequence_number, i as u32 + 1);
            let mut end = 0usize;
            for traf in &moof.traf {
                let trun = &traf.trun[0];
                let start = moof_at + trun.data_offset.unwrap() as usize;
                let size: u32 = trun.entries.iter().map(|e| e.size.unwrap()).sum();
                end = end.max(start + size as usize);
                let dts = traf.tfdt.as_ref().unwrap().base_media_decode_time;
                if traf.tfhd.track_id == 1 {
                    // Video: starts with a keyframe at each whole second, 90 kHz.
                    assert_eq!(trun.entries[0].flags, Some(0x0200_0000));
                    assert_eq!(dts, i as u64 * 90_000);
                    // The payload is the tag's, after its 5-byte AVC header.
                    assert_eq!(file[start], 0xAA);
                    video_samples += trun.entries.len();
                    let total: u64 = trun
                        .entries
                        .iter()
                        .map(|e| u64::from(e.duration.unwrap()))
                        .sum();
                    assert!((total as i64 - 90_000).abs() < 100, "{total}");
                } else {
                    assert_eq!(file[start], 0x21);
                    audio_samples += trun.entries.len();
                }
            }
            // Samples end where the mdat ends.
            let moof_len = {
                let mut b = Vec::new();
                mp4_atom::Encode::encode(moof, &mut b).unwrap();
                b.len()
            };
            assert_eq!(end, moof_at + moof_len + 8 + mdat_len);
        }
        assert_eq!(video_samples, 120);
        assert_eq!(
            audio_samples,
            stream(0, 4_000)
                .iter()
                .filter(|t| t.kind == TagKind::Audio)
                .count()
        );
        assert!(done.duration_ms >= 3_966, "{done:?}");
    }

    #[test]
    fn new_parameter_sets_go_in_band_and_another_audio_config_starts_a_new_file() {
        let mut tags = mp4_headers(SPS);
        tags.extend(stream(0, 2_000));
        // Another resolution: new SPS, then its keyframe.
        let mut sps2 = SPS.to_vec();
        sps2[6] = 0x50;
        tags.push(mp4_headers(&sps2)[0].clone());
        tags.extend(stream(2_000, 2_000));
        let (files, _) = run(cfg(), &tags);
        assert_eq!(files.len(), 1, "a resolution change keeps the file");
        let (file, _) = &files[0];
        let (_, frags) = boxes(file);
        // The fragment at 2 s begins with the new SPS and PPS, length-prefixed.
        let (moof, at, _) = &frags[2];
        let traf = moof.traf.iter().find(|t| t.tfhd.track_id == 1).unwrap();
        let start = at + traf.trun[0].data_offset.unwrap() as usize;
        assert_eq!(&file[start..start + 4], &(sps2.len() as u32).to_be_bytes());
        assert_eq!(&file[start + 4..start + 4 + sps2.len()], &sps2[..]);
        let pps_at = start + 4 + sps2.len();
        assert_eq!(&file[pps_at + 4..pps_at + 4 + PPS.len()], PPS);
        assert_eq!(file[pps_at + 4 + PPS.len()], 0xAA);
        assert_eq!(
            traf.trun[0].entries[0].size.unwrap() as usize,
            4 + sps2.len() + 4 + PPS.len() + 1
        );

        // A new audio configuration cannot be carried: a new file at the next keyframe.
        let mut tags = mp4_headers(SPS);
        tags.extend(stream(0, 2_000));
        tags.push(Tag {
            kind: TagKind::Audio,
            timestamp: 2_000,
            data: Bytes::from_static(&[0xAF, 0, 0x12, 0x10]),
        });
        tags.extend(stream(2_000, 2_000));
        let (files, _) = run(cfg(), &tags);
        assert_eq!(files.len(), 2);
        let (moov, _) = boxes(&files[1].0);
        assert_eq!(moov.trak[1].mdia.mdhd.timescale, 44_100);
    }

    #[test]
    fn audio_only_streams_and_broken_headers() {
        let mut tags = vec![mp4_headers(SPS)[1].clone()];
        tags.extend(
            stream(0, 5_000)
                .into_iter()
                .filter(|t| t.kind == TagKind::Audio),
        );
        let (files, _) = run(cfg(), &tags);
        assert_eq!(files.len(), 1);
        let (moov, frags) = boxes(&files[0].0);
        assert_eq!(moov.trak.len(), 1);
        assert_eq!(
            moov.trak[0].mdia.hdlr.handler,
            mp4_atom::FourCC::new(b"soun")
        );
        // About a second per fragment.
        assert!((2..=4).contains(&frags.len()), "{}", frags.len());

        // An audio header that is not an AudioSpecificConfig: the picture alone.
        let mut tags = mp4_headers(SPS);
        tags[1].data = Bytes::from_static(&[0xAF, 0, 0xFF]);
        tags.extend(stream(0, 3_000));
        let (files, _) = run(cfg(), &tags);
        assert_eq!(files.len(), 1);
        let (moov, _) = boxes(&files[0].0);
        assert_eq!(moov.trak.len(), 1);
        assert_eq!(
            moov.trak[0].mdia.hdlr.handler,
            mp4_atom::FourCC::new(b"vide")
        );

        // A video header that is not a record: nothing is written, nothing panics.
        let mut tags = headers();
        tags.extend(stream(0, 3_000));
        let (files, _) = run(cfg(), &tags);
        assert!(files.is_empty());
    }
}
