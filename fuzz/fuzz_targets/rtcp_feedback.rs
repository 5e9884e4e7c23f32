//! What a subscriber sends us and the congestion path parses: arbitrary RTCP (NACKs
//! through the retransmission guard, with paused streams, fences and a rate budget), and arbitrary
//! RTP payloads through the keyframe detector (H.264 single/STAP-A/FU-A, VP8).
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rtc::interceptor::{Packet, TaggedPacket};
use rtc::sansio::Protocol;
use weir::media::{starts_keyframe, NackGuard, PausedSsrcs, RetransmissionBudget};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    for mime in ["video/H264", "video/VP8", "video/AV1"] {
        let _ = starts_keyframe(mime, rest);
    }
    let paused = PausedSsrcs::default();
    let budget = RetransmissionBudget::default();
    // The retransmission budget from an estimate or none, as the media task sets it.
    if mode & 2 != 0 {
        budget.set_estimate(Some(f64::from(mode) * 10_000.0));
    }
    let mut guard = NackGuard::new(None, paused.clone(), budget);
    let t0 = Instant::now();
    for (i, chunk) in rest.chunks(64).enumerate() {
        if mode & 1 != 0 {
            paused.set(
                u32::from(chunk.first().copied().unwrap_or(0)),
                i % 2 == 0,
                Some(i as u16),
            );
        }
        let mut buf = chunk;
        let Ok(packets) = rtc::rtcp::packet::unmarshal(&mut buf) else {
            continue;
        };
        let msg = TaggedPacket {
            now: t0 + Duration::from_millis(i as u64 * 40),
            transport: Default::default(),
            message: Packet::Rtcp(packets).into(),
        };
        let _ = guard.handle_read(msg);
        while guard.poll_read().is_some() {}
    }
});
