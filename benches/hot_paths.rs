//! The per-packet and per-frame hot paths, one unit of work each:
//!
//! - **a forwarded copy**: what the SFU does for every subscriber of every packet —
//!   rewrite into the downtrack's numbering (`Rewriter::rewrite`), marshal, SRTP
//!   protect (AES-CM/HMAC-SHA1-80 and AES-GCM, the two profiles browsers negotiate);
//! - **WebRTC → FLV** (`RtpToFlv`): H.264 depacketized into FLV video tags and Opus
//!   transcoded to AAC audio tags, per second of a real 320x240 x264 stream with Opus;
//! - **the two audio transcoders**, per frame: AAC → Opus (RTMP pusher to browsers)
//!   and Opus → AAC (browser publisher to RTMP/FLV players).
//!
//! H.264 packetization has its own bench (`h264_rtp`). Figures in BENCHMARKS.md.
//!
//! `cargo bench --bench hot_paths`

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rtc::rtp::Packet;
use rtc::shared::marshal::Marshal;
use rtc::srtp::protection_profile::ProtectionProfile;
use weir::bridge::to_flv::{Output, RtpToFlv};
use weir::codec::aac::AudioConfig;
use weir::codec::aac_opus::AacToOpus;
use weir::codec::opus_aac::OpusToAac;
use weir::media::forward::Rewriter;
use weir_signaling::Kind;

/// 20 ms Opus frames of a 1 kHz tone, 48 kHz stereo, as a browser sends them.
fn opus_frames(seconds: usize) -> Vec<Bytes> {
    let mut enc =
        opus::Encoder::new(48_000, opus::Channels::Stereo, opus::Application::Audio).unwrap();
    let mut buf = vec![0u8; 1500];
    (0..seconds * 50)
        .map(|k| {
            let pcm: Vec<f32> = (0..960)
                .flat_map(|i| {
                    let n = ((k * 960 + i) % 48_000) as f32;
                    let v = (n * 2.0 * std::f32::consts::PI * 1000.0 / 48_000.0).sin() * 0.3;
                    [v, v]
                })
                .collect();
            let len = enc.encode_float(&pcm, &mut buf).unwrap();
            Bytes::copy_from_slice(&buf[..len])
        })
        .collect()
}

fn packet(seq: u16, ts: u32, marker: bool, payload: Bytes) -> Packet {
    let mut p = Packet::default();
    p.header.version = 2;
    p.header.payload_type = 96;
    p.header.ssrc = 0x1234_5678;
    p.header.sequence_number = seq;
    p.header.timestamp = ts;
    p.header.marker = marker;
    p.payload = payload;
    p
}

fn forward_copy(c: &mut Criterion) {
    let payload = Bytes::from(vec![0x5a; 1100]);
    let provider = rtc::crypto::default_provider().expect("ring is rtc's default provider");
    let mut g = c.benchmark_group("forward_copy");
    g.throughput(Throughput::Elements(1));
    let mut seq = 0u16;
    let mut rw = Rewriter::new(0xabcd);
    g.bench_function("rewrite", |b| {
        b.iter(|| {
            seq = seq.wrapping_add(1);
            rw.rewrite(
                &packet(seq, u32::from(seq) * 90, false, payload.clone()),
                102,
            )
        })
    });
    g.bench_function("rewrite_marshal", |b| {
        b.iter(|| {
            seq = seq.wrapping_add(1);
            let p = rw
                .rewrite(
                    &packet(seq, u32::from(seq) * 90, false, payload.clone()),
                    102,
                )
                .unwrap();
            p.marshal().unwrap()
        })
    });
    for (name, profile) in [
        (
            "rewrite_marshal_srtp_aes_cm_sha1_80",
            ProtectionProfile::Aes128CmHmacSha1_80,
        ),
        (
            "rewrite_marshal_srtp_aes_gcm",
            ProtectionProfile::AeadAes128Gcm,
        ),
    ] {
        let mut ctx = rtc::srtp::context::Context::new(
            &vec![7u8; profile.key_len()],
            &vec![9u8; profile.salt_len()],
            profile,
            None,
            None,
            provider.crypto(),
        )
        .unwrap();
        g.bench_function(name, |b| {
            b.iter(|| {
                seq = seq.wrapping_add(1);
                let p = rw
                    .rewrite(
                        &packet(seq, u32::from(seq) * 90, false, payload.clone()),
                        102,
                    )
                    .unwrap();
                ctx.encrypt_rtp(&p.marshal().unwrap()).unwrap()
            })
        });
    }
    g.finish();
}

fn rtp_to_flv(c: &mut Criterion) {
    const SECONDS: u32 = 2;
    let aus = common::publisher::h264_access_units(SECONDS);
    let opus = opus_frames(SECONDS as usize);
    // Both tracks in arrival order: video at 30 fps, audio every 20 ms.
    let mut input: Vec<(Duration, Kind, Packet)> = Vec::new();
    let mut vseq = 0u16;
    for (i, au) in aus.iter().enumerate() {
        let mut payloads = Vec::new();
        weir::codec::h264::packetize(au, 1100, &mut payloads);
        let n = payloads.len();
        for (j, p) in payloads.into_iter().enumerate() {
            let at = Duration::from_micros(i as u64 * 33_333);
            input.push((
                at,
                Kind::Video,
                packet(vseq, i as u32 * 3000, j + 1 == n, p),
            ));
            vseq = vseq.wrapping_add(1);
        }
    }
    for (i, frame) in opus.iter().enumerate() {
        let mut p = packet(i as u16, i as u32 * 960, false, frame.clone());
        p.header.payload_type = 111;
        input.push((Duration::from_millis(i as u64 * 20), Kind::Audio, p));
    }
    input.sort_by_key(|(at, ..)| *at);
    let mut g = c.benchmark_group("rtp_to_flv");
    g.throughput(Throughput::Elements(u64::from(SECONDS)));
    g.sample_size(20);
    // Per second of media: one converter made per iteration (its AAC encoder's set-up
    // included, spread over the seconds).
    g.bench_function("h264_and_opus_per_second", |b| {
        b.iter(|| {
            let t0 = Instant::now();
            let mut conv = RtpToFlv::new(t0, 64_000);
            let mut tags = 0usize;
            for (at, kind, p) in &input {
                conv.handle_rtp(*kind, p.clone(), t0 + *at);
                while let Some(out) = conv.poll_output() {
                    tags += usize::from(matches!(out, Output::Tag(_)));
                }
            }
            assert!(tags > 100, "{tags} tags");
            tags
        })
    });
    g.finish();
}

fn transcoders(c: &mut Criterion) {
    let opus = opus_frames(2);
    // AAC frames of the same tone, from the Opus → AAC transcoder itself.
    let mut to_aac = OpusToAac::new(64_000).unwrap();
    let aac: Vec<Bytes> = opus
        .iter()
        .flat_map(|f| to_aac.push(Some(f)).unwrap())
        .map(|f| f.data)
        .collect();
    let asc = to_aac.asc().to_vec();
    let mut g = c.benchmark_group("audio_transcode");
    g.throughput(Throughput::Elements(1));
    let mut t = OpusToAac::new(64_000).unwrap();
    let mut i = 0;
    g.bench_function("opus_to_aac_per_20ms_frame", |b| {
        b.iter(|| {
            i += 1;
            t.push(Some(&opus[i % opus.len()])).unwrap()
        })
    });
    let mut t = AacToOpus::new(AudioConfig::parse(&asc).unwrap(), &asc, 64_000).unwrap();
    g.bench_function("aac_to_opus_per_1024_sample_frame", |b| {
        b.iter(|| {
            i += 1;
            t.push(&aac[i % aac.len()]).unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, forward_copy, rtp_to_flv, transcoders);
criterion_main!(benches);
