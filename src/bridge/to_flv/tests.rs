use super::*;
use rtc::rtp::header::Header;

const SPS: &[u8] = &[0x67, 0x42, 0xc0, 0x1e, 0xd9, 0x00, 0xa0, 0x47, 0xfe, 0xc8];
const PPS: &[u8] = &[0x68, 0xce, 0x3c, 0x80];

fn pkt(seq: u16, ts: u32, marker: bool, payload: Vec<u8>) -> Packet {
    Packet {
        header: Header {
            version: 2,
            sequence_number: seq,
            timestamp: ts,
            marker,
            ..Default::default()
        },
        payload: Bytes::from(payload),
    }
}

/// A keyframe as Chrome sends it: STAP-A(SPS, PPS), then an IDR in two FU-As.
fn keyframe(seq: u16, ts: u32) -> Vec<Packet> {
    let mut stap = vec![0x78];
    for n in [SPS, PPS] {
        stap.extend_from_slice(&(n.len() as u16).to_be_bytes());
        stap.extend_from_slice(n);
    }
    vec![
        pkt(seq, ts, false, stap),
        pkt(seq.wrapping_add(1), ts, false, vec![0x7c, 0x85, 1, 2, 3]),
        pkt(seq.wrapping_add(2), ts, true, vec![0x7c, 0x45, 4, 5]),
    ]
}

fn delta(seq: u16, ts: u32) -> Packet {
    pkt(seq, ts, true, vec![0x41, 0x9a, 7, 7])
}

fn tags(c: &mut RtpToFlv) -> (Vec<Tag>, usize) {
    let mut tags = Vec::new();
    let mut plis = 0;
    while let Some(o) = c.poll_output() {
        match o {
            Output::Tag(t) => tags.push(t),
            Output::KeyframeRequest => plis += 1,
            Output::Refused(r) => panic!("{r}"),
            Output::Recovered(_) | Output::LipSync(_) => {}
        }
    }
    (tags, plis)
}

#[test]
fn frames_assemble_with_a_sequence_header_first() {
    let t0 = Instant::now();
    let mut c = RtpToFlv::new(t0, 128_000);
    for p in keyframe(100, 9000) {
        c.handle_rtp(Kind::Video, p, t0);
    }
    c.handle_rtp(
        Kind::Video,
        delta(103, 12000),
        t0 + Duration::from_millis(33),
    );
    let (tags, plis) = tags(&mut c);
    assert_eq!(
        plis, 1,
        "a keyframe is asked for when the conversion starts"
    );
    assert_eq!(tags.len(), 3);
    assert!(tags[0].is_sequence_header());
    assert!(tags[1].is_video_keyframe());
    // The IDR reassembled from its FU-As, length-prefixed.
    assert_eq!(&tags[1].data[5..], &[0, 0, 0, 6, 0x65, 1, 2, 3, 4, 5]);
    assert_eq!(&tags[2].data[5..], &[0, 0, 0, 4, 0x41, 0x9a, 7, 7]);
    // 3000 ticks of 90 kHz later: 33 ms.
    assert_eq!(tags[2].timestamp - tags[1].timestamp, 33);
}

#[test]
fn reordered_packets_are_put_back_in_order() {
    let t0 = Instant::now();
    let mut c = RtpToFlv::new(t0, 128_000);
    let mut k = keyframe(65534, 0); // wraps around 65535
    k.swap(1, 2);
    for p in k {
        c.handle_rtp(Kind::Video, p, t0);
    }
    let (tags, _) = tags(&mut c);
    assert_eq!(tags.len(), 2);
    assert_eq!(&tags[1].data[5..], &[0, 0, 0, 6, 0x65, 1, 2, 3, 4, 5]);
}

#[test]
fn loss_waits_then_skips_to_the_next_idr_and_asks_for_it() {
    let t0 = Instant::now();
    let mut c = RtpToFlv::new(t0, 128_000);
    for p in keyframe(1, 0) {
        c.handle_rtp(Kind::Video, p, t0);
    }
    tags(&mut c);
    // A second later, packet 4 is lost; 5 and 6 arrive.
    let t1 = t0 + Duration::from_secs(1);
    c.handle_rtp(Kind::Video, delta(5, 6000), t1);
    c.handle_rtp(Kind::Video, delta(6, 9000), t1);
    assert!(tags(&mut c).0.is_empty(), "waiting for a retransmission");
    let deadline = c.poll_timeout().expect("a gap is pending");
    c.handle_timeout(deadline);
    let (out, plis) = tags(&mut c);
    assert!(
        out.is_empty(),
        "delta frames after a loss are not decodable"
    );
    assert_eq!(plis, 1, "a keyframe is asked for at once");
    for p in keyframe(7, 12000) {
        c.handle_rtp(Kind::Video, p, deadline);
    }
    let (out, _) = tags(&mut c);
    assert_eq!(out.len(), 1, "the same parameter sets are not sent again");
    assert!(out[0].is_video_keyframe());
    assert!(c.stats.frames_dropped_loss >= 2);
}

#[test]
fn sender_reports_put_both_tracks_on_the_publishers_clock() {
    let t0 = Instant::now();
    let mut c = RtpToFlv::new(t0, 128_000);
    let ntp = |secs: f64| ((secs * 4_294_967_296.0) as u64) + (3_900_000_000u64 << 32);
    c.handle_sender_report(
        Kind::Video,
        &SenderReport {
            ntp_time: ntp(10.0),
            rtp_time: 90_000,
            ..Default::default()
        },
    );
    c.handle_sender_report(
        Kind::Audio,
        &SenderReport {
            ntp_time: ntp(10.0),
            rtp_time: 480_000,
            ..Default::default()
        },
    );
    // Video at NTP 10.5 s; audio at NTP 10.5 s: the same FLV time, whatever arrival says.
    let v = c.ms(Kind::Video, 90_000 + 45_000, t0);
    let a = c.ms(
        Kind::Audio,
        480_000 + 24_000,
        t0 + Duration::from_millis(80),
    );
    assert!((v - a).abs() < 1.0, "{v} vs {a}");
}

/// Audio that starts before any sender report (anchored at its arrival) and video
/// whose first keyframe comes 0.9 s later with a report: both on one timeline. Before,
/// the first report-mapped packet was put at the start (1000 ms) whatever its arrival,
/// so that video ran 0.9 s behind its audio, and a player that joined before the
/// keyframe (a mini program opening a browser publisher's accelerateURL at once) had
/// every video frame cut by its latency control.
#[test]
fn a_track_mapped_by_sender_report_joins_a_track_anchored_by_arrival() {
    let t0 = Instant::now();
    let mut c = RtpToFlv::new(t0, 128_000);
    let a0 = c.ms(Kind::Audio, 480_000, t0);
    let ntp = |secs: f64| ((secs * 4_294_967_296.0) as u64) + (3_900_000_000u64 << 32);
    c.handle_sender_report(
        Kind::Video,
        &SenderReport {
            ntp_time: ntp(20.0),
            rtp_time: 90_000,
            ..Default::default()
        },
    );
    let late = t0 + Duration::from_millis(900);
    let v = c.ms(Kind::Video, 90_000, late);
    let a = c.ms(Kind::Audio, 480_000 + 43_200, late);
    assert!((a - a0 - 900.0).abs() < 1.0, "{a0} {a}");
    assert!(
        (v - a).abs() < 1.0,
        "video {v} ms, audio {a} ms at the same moment"
    );
}

/// Audio lost for longer than concealment covers: the sounds after the gap keep
/// their own time (their RTP time on the anchored clock), they do not jump ahead by
/// everything decoded before the gap.
#[cfg(feature = "fdk-aac")]
#[test]
fn audio_after_a_long_loss_keeps_its_time() {
    let t0 = Instant::now();
    let mut c = RtpToFlv::new(t0, 128_000);
    let mut enc =
        opus::Encoder::new(48_000, opus::Channels::Stereo, opus::Application::Audio).unwrap();
    let mut buf = vec![0u8; 1500];
    let silence = vec![0f32; 960 * 2];
    let mut last_before = 0;
    let mut first_after = None;
    for p in 0..200u32 {
        let n = enc.encode_float(&silence, &mut buf).unwrap();
        // Packets 100..130 (600 ms) are lost.
        if (100..130).contains(&p) {
            continue;
        }
        let at = t0 + Duration::from_millis(u64::from(p) * 20);
        c.handle_rtp(
            Kind::Audio,
            pkt(p as u16, p * 960, false, buf[..n].to_vec()),
            at,
        );
        let (tags, _) = tags(&mut c);
        let frames: Vec<u32> = tags
            .iter()
            .filter(|t| !t.is_sequence_header())
            .map(|t| t.timestamp)
            .collect();
        if p < 100 {
            last_before = frames.last().copied().unwrap_or(last_before);
        } else if first_after.is_none() {
            first_after = frames.first().copied();
        }
    }
    // The first sound after the gap is about 600 ms after the last one before it
    // (give or take a frame and the encoder's delay), not seconds later.
    let first = first_after.expect("audio after the gap");
    let step = first - last_before;
    assert!((560..=700).contains(&step), "{last_before} -> {first}");
}

/// Both tracks anchored by arrival before any report, the audio's first packet
/// delayed 30 ms more on its way than the video's (or captured 30 ms earlier): once
/// both reports are in, the publisher's clock decides, and the early track is moved
/// later, once.
#[test]
fn tracks_anchored_by_arrival_are_put_in_sync_by_the_reports() {
    let t0 = Instant::now();
    let mut c = RtpToFlv::new(t0, 128_000);
    let ntp = |secs: f64| ((secs * 4_294_967_296.0) as u64) + (3_900_000_000u64 << 32);
    // Captured together at NTP 10 s (video RTP 90,000, audio RTP 480,000); audio
    // arrives 30 ms after the video.
    let v0 = c.ms(Kind::Video, 90_000, t0);
    let a0 = c.ms(Kind::Audio, 480_000, t0 + Duration::from_millis(30));
    assert!((a0 - v0 - 30.0).abs() < 1.0);
    for (kind, rtp) in [(Kind::Video, 90_000), (Kind::Audio, 480_000)] {
        c.handle_sender_report(
            kind,
            &SenderReport {
                ntp_time: ntp(10.0),
                rtp_time: rtp,
                ..Default::default()
            },
        );
    }
    // Video was early by 30 ms: moved later; audio stays where it was.
    let v = c.ms(Kind::Video, 90_000 + 9_000, t0);
    let a = c.ms(Kind::Audio, 480_000 + 4_800, t0);
    assert!((v - a).abs() < 1.0, "video {v} audio {a}");
    assert!(
        (a - a0 - 100.0).abs() < 1.0,
        "audio kept its timeline: {a0} {a}"
    );
    let said: Vec<f64> = std::iter::from_fn(|| c.poll_output())
        .filter_map(|o| match o {
            Output::LipSync(late) => Some(late),
            _ => None,
        })
        .collect();
    assert_eq!(said.len(), 1);
    assert!((said[0] + 30.0).abs() < 1.0, "{said:?}");
    // Later reports, whatever their jitter, change nothing.
    c.handle_sender_report(
        Kind::Audio,
        &SenderReport {
            ntp_time: ntp(10.5),
            rtp_time: 480_000 + 24_000 + 480,
            ..Default::default()
        },
    );
    let a2 = c.ms(Kind::Audio, 480_000 + 4_800, t0);
    assert!((a2 - a).abs() < 0.001);
}
