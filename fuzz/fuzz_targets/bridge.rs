//! The RTMP→WebRTC bridge on arbitrary FLV tag bodies: AVC configuration records,
//! access units (NAL lengths, slice headers), AudioSpecificConfigs and AAC frames
//! (symphonia's decoder included), with arbitrary timestamps.
//!
//! symphonia-codec-aac 0.5 can panic on malformed frames; the bridge contains that with
//! `catch_unwind`. libFuzzer's panic hook would abort even on a caught panic, so the
//! hook here lets panics raised inside symphonia through to that `catch_unwind` and
//! aborts on every other one: any panic in Weir's own code is still a crash.
#![no_main]

use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use weir::bridge::{Bridge, BridgeConfig};

fn contain_symphonia_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_symphonia = info
                .location()
                .is_some_and(|l| l.file().contains("symphonia"));
            if !in_symphonia {
                default(info);
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    contain_symphonia_panics();
    let t0 = Instant::now();
    let mut b = Bridge::new(BridgeConfig::default(), t0, 0);
    // Records: [kind u8][timestamp u32][len u16][body].
    let mut rest = data;
    let mut n = 0u64;
    while rest.len() >= 7 {
        let kind = rest[0];
        let ts = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
        let len = usize::from(u16::from_be_bytes([rest[5], rest[6]])).min(rest.len() - 7);
        let body = Bytes::copy_from_slice(&rest[7..7 + len]);
        rest = &rest[7 + len..];
        n += 1;
        let now = t0 + Duration::from_millis(n * 10);
        if kind & 1 == 0 {
            b.handle_video(ts, &body, now);
        } else {
            b.handle_audio(ts, &body, now);
        }
        while b.poll_output().is_some() {}
    }
});
