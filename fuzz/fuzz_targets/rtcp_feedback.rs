//! What a subscriber sends us and the congestion path parses: arbitrary RTCP through a
//! subscriber connection's send side (TWCC feedback into its send history and the
//! estimator, NACKs through the retransmission guard — with paused streams, fences and
//! a rate budget — answered from its cache), and arbitrary RTP payloads through the
//! keyframe detector (H.264 single/STAP-A/FU-A, VP8).
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rtc::interceptor::{
    Interceptor, Packet, RTCPFeedback, RTPHeaderExtension, StreamInfo, TaggedPacket,
};
use rtc::sansio::Protocol;
use weir::congestion::estimate::SharedEstimator;
use weir::media::{
    starts_keyframe, NackGuard, PausedSsrcs, RetransmissionBudget, RtcpTap, SendSide,
};

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
    let estimator = (mode & 4 != 0).then(|| SharedEstimator::new(1e6, 5e4, 2e7));
    let mut side = SendSide::new(
        NackGuard::new(None, paused.clone(), budget),
        RtcpTap::new(true),
        estimator,
    );
    // Two streams the subscriber could name, one with RTX, both with NACK and TWCC.
    for (ssrc, rtx) in [(0u32, None), (1, Some((2u32, 97u8)))] {
        side.bind_local_stream(&StreamInfo {
            ssrc,
            ssrc_rtx: rtx.map(|r| r.0),
            payload_type_rtx: rtx.map(|r| r.1),
            rtp_header_extensions: vec![RTPHeaderExtension {
                uri: "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
                    .to_owned(),
                id: 3,
            }],
            rtcp_feedback: vec![RTCPFeedback {
                typ: "nack".to_owned(),
                parameter: String::new(),
            }],
            ..Default::default()
        });
    }
    let t0 = Instant::now();
    for (i, chunk) in rest.chunks(64).enumerate() {
        let now = t0 + Duration::from_millis(i as u64 * 40);
        if mode & 1 != 0 {
            paused.set(
                u32::from(chunk.first().copied().unwrap_or(0)),
                i % 2 == 0,
                Some(i as u16),
            );
        }
        // Something sent on each stream, so NACKs and feedback find packets.
        for ssrc in [0u32, 1] {
            let mut p = rtc::rtp::Packet::default();
            p.header.version = 2;
            p.header.ssrc = ssrc;
            p.header.sequence_number = i as u16;
            p.payload = bytes::Bytes::copy_from_slice(chunk);
            let _ = side.handle_write(TaggedPacket {
                now,
                transport: Default::default(),
                message: Packet::Rtp(p).into(),
            });
        }
        let mut buf = chunk;
        let Ok(packets) = rtc::rtcp::packet::unmarshal(&mut buf) else {
            continue;
        };
        let _ = side.handle_read(TaggedPacket {
            now,
            transport: Default::default(),
            message: Packet::Rtcp(packets).into(),
        });
        while side.poll_read().is_some() {}
        while side.poll_write().is_some() {}
        let _ = side.handle_timeout(now);
    }
});
