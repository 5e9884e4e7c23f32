//! Short strings a peer controls: the STUN USERNAME of a datagram (read before any
//! integrity check), H.264 fmtp lines of an offer (a non-ASCII profile-level-id once
//! panicked the media task), what an offer sends (rtc-sdp), a WHIP/WHEP trickle
//! fragment and an ICE restart's rewriting of an offer, and stream names an RTMP
//! pusher asks for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rtc::rtp_transceiver::rtp_sender::RTCRtpCodec;
use weir::auth::RoomId;
use weir::room::names::{bound_stream, NameClaims, Owner};

fuzz_target!(|data: &[u8]| {
    let _ = weir::media::stun_username(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (a, b) = text.split_at(
        text.char_indices()
            .nth(text.chars().count() / 2)
            .map_or(0, |(i, _)| i),
    );
    let codec = |fmtp: &str| RTCRtpCodec {
        mime_type: "video/H264".into(),
        clock_rate: 90000,
        channels: 0,
        sdp_fmtp_line: fmtp.into(),
        rtcp_feedback: vec![],
    };
    let _ = weir::media::codec_compatible(&codec(a), &codec(b));
    let _ = weir::media::codec_compatible(&codec(text), &codec("profile-level-id=42e01f"));
    let _ = weir::media::offered_send_kinds(text);
    let _ = weir::server::whip::trickle_fragment(text);
    let _ = weir::server::whip::with_ice_credentials(a, "abcd", b);
    let _ = weir::server::whip::ice_fragment(text);
    let _ = bound_stream(text);
    let mut claims = NameClaims::default();
    let owner = |user: &str| Owner {
        sdk_app_id: 1,
        room: RoomId::Num(1),
        user_id: user.into(),
    };
    if claims.claim(text, &owner(a), 0).is_ok() {
        claims.release(text, 1);
        let _ = claims.claim(text, &owner(b), 2);
    }
});
