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
            Output::Recovered(_) => {}
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
