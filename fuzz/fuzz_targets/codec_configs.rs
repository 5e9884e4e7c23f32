//! H.264 configuration records, NAL splitting, slice headers and SPS picture
//! sizes, VP8/H.264 keyframe detection on RTP payloads, and AAC
//! AudioSpecificConfigs on arbitrary bytes.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use weir::codec::{aac::AudioConfig, h264};

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(c) = h264::AvcConfig::parse(&bytes) {
        let p = c.profile();
        let _ = (p.name(), p.browser_decodable(), p.sdp_profile_level_id());
    }
    for size in [1, 2, 4] {
        if let Ok(nalus) = h264::split_nalus(&bytes, size) {
            for n in &nalus {
                let _ = h264::slice_kind(n);
            }
            let mut out = Vec::new();
            h264::packetize(&nalus, 1160, &mut out);
            assert!(out.iter().all(|p| p.len() <= 1160));
        }
    }
    let _ = AudioConfig::parse(data);
    if let Ok((w, h)) = h264::sps_dimensions(data) {
        assert!(w > 0 && h > 0 && w <= 16384 && h <= 32768);
    }
    for mime in ["video/H264", "video/VP8"] {
        let _ = weir::media::keyframe_dimensions(mime, data);
        let _ = weir::media::starts_keyframe(mime, data);
    }
});
