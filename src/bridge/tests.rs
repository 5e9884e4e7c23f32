use super::*;

const SPS: &[u8] = &[0x67, 0x42, 0xc0, 0x1e, 0xd9, 0x00, 0xa0, 0x47, 0xfe, 0xc8];
const PPS: &[u8] = &[0x68, 0xce, 0x3c, 0x80];

fn seq_header(sps: &[u8]) -> Bytes {
    let mut t = vec![0x17, 0, 0, 0, 0, 1, sps[1], sps[2], sps[3], 0xff, 0xe1];
    t.extend_from_slice(&(sps.len() as u16).to_be_bytes());
    t.extend_from_slice(sps);
    t.push(1);
    t.extend_from_slice(&(PPS.len() as u16).to_be_bytes());
    t.extend_from_slice(PPS);
    Bytes::from(t)
}

fn au(keyframe: bool, ct: i32, nalus: &[Vec<u8>]) -> Bytes {
    let mut t = crate::rtmp::flv::video_header(keyframe, 1, ct).to_vec();
    for n in nalus {
        t.extend_from_slice(&(n.len() as u32).to_be_bytes());
        t.extend_from_slice(n);
    }
    Bytes::from(t)
}

fn idr(len: usize) -> Vec<u8> {
    let mut v = vec![0x65, 0b1000_1000];
    v.resize(len, 0xab);
    v
}

fn p_slice() -> Vec<u8> {
    // nal_ref_idc 2, type 1; first_mb 0, slice_type 5 (P) = "00110" → 0b1001_1000
    vec![0x41, 0b1001_1000, 0x11, 0x22]
}

fn b_slice(reference: bool) -> Vec<u8> {
    vec![if reference { 0x21 } else { 0x01 }, 0b1001_1100, 0x33]
}

fn drain(b: &mut Bridge) -> Vec<Output> {
    std::iter::from_fn(|| b.poll_output()).collect()
}

fn rtp(outputs: &[Output]) -> Vec<(&Packet, bool)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Rtp {
                packet, keyframe, ..
            } => Some((packet, *keyframe)),
            _ => None,
        })
        .collect()
}

#[test]
fn video_is_packetized_with_parameter_sets_and_pts() {
    let t0 = Instant::now();
    let mut b = Bridge::new(BridgeConfig::default(), t0, 0);
    b.handle_video(0, &seq_header(SPS), t0);
    let out = drain(&mut b);
    match &out[..] {
        [Output::Track {
            kind: Kind::Video,
            codec,
        }] => {
            assert!(
                codec.sdp_fmtp_line.contains("profile-level-id=42e01e"),
                "{}",
                codec.sdp_fmtp_line
            );
            assert!(codec.sdp_fmtp_line.contains("packetization-mode=1"));
        }
        other => panic!("{other:?}"),
    }
    // A 3000-byte IDR with an SEI and an AUD that must be dropped.
    b.handle_video(
        1000,
        &au(true, 0, &[vec![0x09, 0xf0], vec![0x06, 5, 1, 0], idr(3000)]),
        t0,
    );
    let out = drain(&mut b);
    let pkts = rtp(&out);
    assert_eq!(pkts.len(), 4, "STAP-A + three FU-A");
    assert_eq!(pkts[0].0.payload[0] & 0x1f, nal::STAP_A);
    assert!(pkts[0].1, "the STAP-A starts the keyframe");
    assert!(pkts.iter().all(|(p, _)| p.payload.len() <= 1160));
    assert!(pkts[..3].iter().all(|(p, _)| !p.header.marker));
    assert!(pkts[3].0.header.marker);
    let seqs: Vec<u16> = pkts.iter().map(|(p, _)| p.header.sequence_number).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0].wrapping_add(1)));
    assert!(out.iter().any(|o| matches!(
        o,
        Output::SenderReport {
            kind: Kind::Video,
            ..
        }
    )));
    let ts0 = pkts[0].0.header.timestamp;
    // The next frame, 33 ms later with a 66 ms composition time: RTP ts follows the PTS.
    b.handle_video(
        1033,
        &au(false, 66, &[p_slice()]),
        t0 + Duration::from_millis(33),
    );
    let out = drain(&mut b);
    let pkts = rtp(&out);
    assert_eq!(pkts.len(), 1);
    assert_eq!(pkts[0].0.header.timestamp.wrapping_sub(ts0), 99 * 90);
    assert!(pkts[0].0.header.marker && !pkts[0].1);
}

#[test]
fn undecodable_profile_is_refused_not_forwarded() {
    let t0 = Instant::now();
    let mut b = Bridge::new(BridgeConfig::default(), t0, 0);
    let mut sps = SPS.to_vec();
    sps[1] = 244;
    sps[2] = 0;
    b.handle_video(0, &seq_header(&sps), t0);
    let out = drain(&mut b);
    match &out[..] {
        [Output::Refused {
            kind: Kind::Video,
            reason,
        }] => {
            assert!(reason.contains("High 4:4:4"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    b.handle_video(0, &au(true, 0, &[idr(100)]), t0);
    assert!(drain(&mut b).is_empty());
}

#[test]
fn non_reference_b_frames_are_dropped_and_counted() {
    let t0 = Instant::now();
    let mut b = Bridge::new(BridgeConfig::default(), t0, 0);
    b.handle_video(0, &seq_header(SPS), t0);
    b.handle_video(0, &au(true, 66, &[idr(100)]), t0);
    b.handle_video(33, &au(false, 0, &[b_slice(false)]), t0);
    b.handle_video(66, &au(false, 0, &[b_slice(true)]), t0);
    let out = drain(&mut b);
    assert_eq!(rtp(&out).len(), 3, "STAP-A + IDR + the reference B");
    assert_eq!(b.stats.b_frames_dropped, 1);
    assert_eq!(b.stats.b_frames_forwarded, 1);
}

#[test]
fn a_backlog_burst_skips_to_the_next_keyframe() {
    let t0 = Instant::now();
    let mut b = Bridge::new(BridgeConfig::default(), t0, 0);
    b.handle_video(0, &seq_header(SPS), t0);
    // Two seconds of 30 fps video with a keyframe each second, all arriving at once.
    for i in 0..60u32 {
        let key = i % 30 == 0;
        let n = if key { idr(50) } else { p_slice() };
        b.handle_video(
            i * 33,
            &au(key, 0, &[n]),
            t0 + Duration::from_millis(u64::from(i)),
        );
    }
    let forwarded = b.stats.video_frames;
    assert!(b.stats.frames_skipped_lag > 0);
    assert!(forwarded < 60, "{forwarded}");
    // Frames in real time after that flow again.
    let before = b.stats.video_frames;
    let base = t0 + Duration::from_millis(60);
    for i in 60..120u32 {
        let key = i % 30 == 0;
        let n = if key { idr(50) } else { p_slice() };
        let at = base + Duration::from_millis(u64::from((i - 60) * 33));
        b.handle_video(i * 33, &au(key, 0, &[n]), at);
    }
    assert!(
        b.stats.video_frames - before >= 55,
        "{}",
        b.stats.video_frames - before
    );
}

#[test]
fn garbage_never_panics() {
    let t0 = Instant::now();
    let mut b = Bridge::new(BridgeConfig::default(), t0, 0);
    let mut seed = 0x1234_5678u32;
    for i in 0..2000u32 {
        let len = (seed % 64) as usize;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            })
            .collect();
        let data = Bytes::from(data);
        if i % 2 == 0 {
            b.handle_video(i, &data, t0);
        } else {
            b.handle_audio(i, &data, t0);
        }
        while b.poll_output().is_some() {}
    }
}
