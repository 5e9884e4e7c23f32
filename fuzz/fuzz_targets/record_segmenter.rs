//! The recording segmenter on arbitrary FLV tags (what a pusher sends): kinds, header
//! and keyframe flags, timestamps jumping anywhere; FLV or MP4 files (the first byte
//! chooses), so the MP4 muxer takes whatever sequence headers and samples come. Checks the invariants the file
//! writer relies on: opens and closes pair up, writes only into an open file, the
//! bytes counted are the bytes written, and the output is linear in the input.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use weir::live::{Tag, TagKind};
use weir::record::{Action, Format, SegmentConfig, Segmenter};

fuzz_target!(|data: &[u8]| {
    let Some((&first, data)) = data.split_first() else {
        return;
    };
    let format = if first & 1 == 0 {
        Format::Flv
    } else {
        Format::Mp4
    };
    let mut s = Segmenter::new(SegmentConfig {
        fragment_ms: 2_000,
        min_ms: 500,
        audio_only_after_ms: 300,
        format,
    });
    let mut out = Vec::new();
    let mut open: Option<u64> = None;
    let mut input_bytes = 0usize;
    // Records: [kind u8][ts u32][len u8][body].
    let mut rest = data;
    let mut now = 0u64;
    let check = |out: &mut Vec<Action>, open: &mut Option<u64>| {
        for a in out.drain(..) {
            match a {
                Action::Open { .. } => {
                    assert!(open.is_none(), "open while open");
                    *open = Some(0);
                }
                Action::Write(b) => *open.as_mut().expect("write while closed") += b.len() as u64,
                Action::Close(f) => {
                    assert_eq!(open.take(), Some(f.bytes), "bytes counted");
                }
                Action::Discard { .. } => {
                    assert!(open.take().is_some(), "discard while closed");
                }
            }
        }
    };
    let mut written = 0usize;
    while rest.len() >= 6 {
        let kind = match rest[0] % 3 {
            0 => TagKind::Audio,
            1 => TagKind::Video,
            _ => TagKind::Script,
        };
        let ts = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
        let len = usize::from(rest[5]).min(rest.len() - 6);
        let body = Bytes::copy_from_slice(&rest[6..6 + len]);
        rest = &rest[6 + len..];
        input_bytes += len;
        now += 10;
        s.push(
            &Tag {
                kind,
                timestamp: ts,
                data: body,
            },
            now,
            &mut out,
        );
        written += out
            .iter()
            .map(|a| if let Action::Write(b) = a { b.len() } else { 0 })
            .sum::<usize>();
        check(&mut out, &mut open);
    }
    s.finish(&mut out);
    check(&mut out, &mut open);
    assert!(open.is_none(), "finish closes");
    // Each tag is written once, plus the headers (3 at most, or ftyp and moov) per file
    // opened and a fragment's boxes (MP4).
    assert!(written <= 20 * input_bytes + 1_000 * (data.len() / 6 + 1));
});
