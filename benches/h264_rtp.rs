//! H.264 RTP packetization (RFC 6184), Weir's own against webrtc-rs's `H264Payloader`,
//! on the access units of a real x264 stream (320x240, 1 s GOP; ffmpeg makes it).
//!
//! The bridge has each access unit as NAL units already (FLV carries length-prefixed
//! NALs); `H264Payloader` takes an Annex B byte stream, so using it costs the copy to
//! Annex B plus its start-code scan, which the third case measures.
//!
//! `cargo bench --bench h264_rtp`

#[path = "../tests/common/mod.rs"]
mod common;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rtc::rtp::codec::h264::H264Payloader;
use rtc::rtp::packetizer::Payloader;

const MTU: usize = 1100;

fn annex_b(au: &[Bytes]) -> Bytes {
    let mut b = BytesMut::new();
    for nal in au {
        b.extend_from_slice(&[0, 0, 0, 1]);
        b.extend_from_slice(nal);
    }
    b.freeze()
}

fn packetization(c: &mut Criterion) {
    let aus = common::publisher::h264_access_units(2);
    let bytes: usize = aus.iter().flatten().map(Bytes::len).sum();
    let annex: Vec<Bytes> = aus.iter().map(|au| annex_b(au)).collect();
    // The same stream, both ways: how many payloads each makes.
    let ours: usize = aus
        .iter()
        .map(|au| {
            let mut out = Vec::new();
            weir::codec::h264::packetize(au, MTU, &mut out);
            out.len()
        })
        .sum();
    let mut p = H264Payloader::default();
    let theirs: usize = annex
        .iter()
        .map(|au| p.payload(MTU, au).unwrap().len())
        .sum();
    println!(
        "{} access units, {bytes} bytes: {ours} payloads (Weir), {theirs} (H264Payloader, SPS+PPS as STAP-A)",
        aus.len()
    );

    let mut g = c.benchmark_group("h264_packetize");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("weir_nal_units", |b| {
        let mut out = Vec::with_capacity(64);
        b.iter(|| {
            for au in &aus {
                out.clear();
                weir::codec::h264::packetize(au, MTU, &mut out);
            }
        })
    });
    g.bench_function("webrtc_rs_annex_b", |b| {
        let mut p = H264Payloader::default();
        b.iter(|| {
            for au in &annex {
                let _ = p.payload(MTU, au).unwrap();
            }
        })
    });
    g.bench_function("webrtc_rs_with_conversion", |b| {
        let mut p = H264Payloader::default();
        b.iter(|| {
            for au in &aus {
                let _ = p.payload(MTU, &annex_b(au)).unwrap();
            }
        })
    });
    g.finish();
}

criterion_group!(benches, packetization);
criterion_main!(benches);
