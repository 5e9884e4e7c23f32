//! The WebRTC→FLV converter on arbitrary RTP: sequence numbers, timestamps, markers,
//! STAP-A/FU-A payloads, sender reports, and the loss timer.
#![no_main]

use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use rtc::rtp::header::Header;
use rtc::rtp::Packet;
use weir::bridge::to_flv::RtpToFlv;
use weir_signaling::Kind;

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut c = RtpToFlv::new(t0, 64_000);
    // Records: [flags u8][seq u16][ts u32][len u8][payload].
    let mut rest = data;
    let mut n = 0u64;
    while rest.len() >= 8 {
        let flags = rest[0];
        let seq = u16::from_be_bytes([rest[1], rest[2]]);
        let ts = u32::from_be_bytes([rest[3], rest[4], rest[5], rest[6]]);
        let len = usize::from(rest[7]).min(rest.len() - 8);
        let payload = Bytes::copy_from_slice(&rest[8..8 + len]);
        rest = &rest[8 + len..];
        n += 1;
        let now = t0 + Duration::from_millis(n * 7);
        let kind = if flags & 1 == 0 {
            Kind::Video
        } else {
            Kind::Audio
        };
        if flags & 4 != 0 {
            c.handle_sender_report(
                kind,
                &rtc::rtcp::sender_report::SenderReport {
                    ntp_time: u64::from(ts) << 20,
                    rtp_time: ts,
                    ..Default::default()
                },
            );
        }
        let packet = Packet {
            header: Header {
                version: 2,
                marker: flags & 2 != 0,
                sequence_number: seq,
                timestamp: ts,
                ..Default::default()
            },
            payload,
        };
        c.handle_rtp(kind, packet, now);
        if let Some(t) = c.poll_timeout() {
            if flags & 8 != 0 {
                c.handle_timeout(t);
            }
        }
        while c.poll_output().is_some() {}
    }
});
