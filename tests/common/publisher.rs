//! A `webrtc`-crate publisher of real H.264 (from ffmpeg) and Opus (libopus): what a
//! browser publisher sends, for tests that need one.

use std::time::Duration;

use super::TestServer;

/// Access units of an H.264 elementary stream ffmpeg makes (Annex B), in order.
pub fn h264_access_units(seconds: u32) -> Vec<Vec<bytes::Bytes>> {
    h264_clip("testsrc=size=320x240:rate=30", seconds, &["-g", "30"])
}

/// Access units of `seconds` of the lavfi `source` encoded by x264 (ultrafast,
/// zerolatency, no B-frames) with `extra` encoder options (GOP, bitrate), in order.
pub fn h264_clip(source: &str, seconds: u32, extra: &[&str]) -> Vec<Vec<bytes::Bytes>> {
    let input = ["-f", "lavfi", "-i", source, "-t", &seconds.to_string()].map(Into::into);
    x264(&input, extra)
}

/// `seconds` of the generated source's frames (`common::source::frame`, each with its
/// index drawn in, 640×360 at 30 fps) encoded by x264 (ultrafast, zerolatency, a
/// keyframe each second), as access units: frame `n` is access unit `n`.
pub fn h264_indexed(seconds: u32) -> Vec<Vec<bytes::Bytes>> {
    use super::source::{frame, FPS, H, W};
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("v.yuv");
    let frames: Vec<u8> = (0..(u64::from(seconds) * FPS) as usize)
        .flat_map(frame)
        .collect();
    std::fs::write(&raw, frames).unwrap();
    let size = format!("{W}x{H}");
    let rate = FPS.to_string();
    let input: Vec<std::ffi::OsString> = ["-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", &size]
        .into_iter()
        .chain(["-r", &rate, "-i"])
        .map(Into::into)
        .chain([raw.into_os_string()])
        .collect();
    x264(&input, &["-g", &rate])
}

/// ffmpeg's x264 (ultrafast, zerolatency, no B-frames, yuv420p, `extra`) on `input`
/// (ffmpeg's input arguments), as access units.
fn x264(input: &[std::ffi::OsString], extra: &[&str]) -> Vec<Vec<bytes::Bytes>> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.h264");
    let ok = std::process::Command::new("ffmpeg")
        .args(["-v", "error"])
        .args(input)
        .args(["-c:v", "libx264", "-pix_fmt", "yuv420p"])
        .args(["-preset", "ultrafast", "-tune", "zerolatency", "-bf", "0"])
        .args(extra)
        .args(["-f", "h264"])
        .arg(&path)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    access_units(&std::fs::read(&path).unwrap())
}

/// An Annex B elementary stream split into access units.
fn access_units(data: &[u8]) -> Vec<Vec<bytes::Bytes>> {
    // Split at start codes.
    let mut nals = Vec::new();
    let mut i = 0;
    let mut start = None;
    while i + 3 <= data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            if let Some(s) = start {
                let mut end = i;
                while end > s && data[end - 1] == 0 {
                    end -= 1;
                }
                nals.push(bytes::Bytes::copy_from_slice(&data[s..end]));
            }
            i += 3;
            start = Some(i);
        } else {
            i += 1;
        }
    }
    if let Some(s) = start {
        nals.push(bytes::Bytes::copy_from_slice(&data[s..]));
    }
    // A slice with first_mb_in_slice == 0 starts a picture; parameter sets and SEI
    // go with the picture that follows them.
    let mut aus: Vec<Vec<bytes::Bytes>> = Vec::new();
    let mut pending: Vec<bytes::Bytes> = Vec::new();
    for n in nals {
        let t = n[0] & 0x1f;
        let is_slice = t == 1 || t == 5;
        if is_slice && n[1] & 0x80 != 0 {
            pending.push(n);
            aus.push(std::mem::take(&mut pending));
        } else if is_slice {
            aus.last_mut().expect("a picture started").push(n);
        } else {
            pending.push(n);
        }
    }
    aus
}

/// The Opus payload type an SDP names.
pub fn audio_pt_in(sdp: &str) -> u8 {
    sdp.lines()
        .find_map(|l| {
            let rest = l.strip_prefix("a=rtpmap:")?;
            let (pt, name) = rest.split_once(' ')?;
            name.to_ascii_lowercase()
                .starts_with("opus/")
                .then(|| pt.parse().ok())?
        })
        .unwrap_or(111)
}

/// A `webrtc`-crate client publishing real H.264 (from ffmpeg) and Opus (libopus) on a
/// real-time schedule; optionally through a relay losing about one RTP packet in
/// `lose_one_in` on the way to the server, and every retransmission. Returns its signaling client, stream id,
/// sending task, and the relay and peer (kept alive by the caller).
pub async fn webrtc_publisher(
    t: &TestServer,
    user: &str,
    room: u32,
    seconds: u32,
    lose_one_in: Option<u64>,
) -> (
    super::Client,
    String,
    tokio::task::JoinHandle<()>,
    Option<super::relay::Relay>,
    super::peer::RtcPeer,
) {
    let aus = h264_access_units(seconds);

    // The publisher: a webrtc-crate client sending real H.264 and Opus.
    let (mut signal, _) = super::Client::join(&t.ws_url(), t.join(user, room, 0xff)).await;
    let Offered {
        stream,
        peer: mut publisher,
        video,
        audio,
        answer,
    } = offer_to_publish(&mut signal).await;
    // Through a relay that loses packets on the way up, when asked; TCP candidates go
    // so the relay is the only way.
    // Retransmissions (RTX) are lost too, so every loss needs a new keyframe.
    let mut media_pts = super::relay::video_media_payload_types(&answer);
    media_pts.push(audio_pt_in(&answer));
    let relay = match lose_one_in {
        Some(n) => {
            let mut count = 0u64;
            let relay = super::relay::Relay::start_with(
                t.udp_addr(),
                Box::new(|_| false),
                Box::new(move |d| {
                    let Some(pt) = super::relay::rtp_payload_type(d) else {
                        return false;
                    };
                    if !media_pts.contains(&pt) {
                        return true; // RTX
                    }
                    count += 1;
                    // A fixed pseudo-random pattern: about one packet in `n`.
                    (count.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) % n == 0
                }),
            )
            .await;
            Some(relay)
        }
        None => None,
    };
    let answer = match &relay {
        Some(r) => super::relay::via_relay(&answer, t.udp_addr().port(), r.addr)
            .lines()
            .filter(|l| !l.contains(" tcp "))
            .map(|l| format!("{l}\r\n"))
            .collect(),
        None => answer,
    };
    publisher.accept_answer(answer).await;
    publisher.connected().await;
    let (vpt, apt) = (video.payload_type().await, audio.payload_type().await);
    let sender = tokio::spawn(send_h264_and_opus(
        std::sync::Arc::new(aus),
        video.track.clone(),
        audio.track.clone(),
        (vpt, apt),
        Pace::Once,
    ));

    (signal, stream.stream_id, sender, relay, publisher)
}

/// A publish under way: the stream, the publisher connection with its two tracks, and
/// the server's answer to its offer (not yet applied).
pub struct Offered {
    pub stream: weir_signaling::StreamInfo,
    pub peer: super::peer::RtcPeer,
    pub video: super::peer::SendTrack,
    pub audio: super::peer::SendTrack,
    pub answer: String,
}

/// On a joined session: `publish` audio and video, then offer an H.264 and an Opus track
/// from a new `webrtc`-crate connection and wait for the answer.
pub async fn offer_to_publish(signal: &mut super::Client) -> Offered {
    use super::peer::{h264, opus, RtcPeer};
    use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
    use weir_signaling::{ClientMessage, ServerMessage, Target};
    let stream = signal.publish(true, true).await;
    let mut peer = RtcPeer::new().await;
    let video = peer
        .add_send_track(RtpCodecKind::Video, h264(), 0x5151)
        .await;
    let audio = peer
        .add_send_track(RtpCodecKind::Audio, opus(), 0x5252)
        .await;
    let offer = peer.offer().await;
    signal
        .send(&ClientMessage::Offer {
            target: Target::Publisher,
            sdp: offer,
        })
        .await;
    let answer = signal
        .expect(|m| match m {
            ServerMessage::Answer { sdp, .. } => Some(sdp.clone()),
            _ => None,
        })
        .await;
    Offered {
        stream,
        peer,
        video,
        audio,
        answer,
    }
}

/// How long [`send_h264_and_opus`] sends.
pub enum Pace {
    /// The access units once, then stop.
    Once,
    /// The access units again and again (timestamps running on) until the flag is set.
    Until(std::sync::Arc<std::sync::atomic::AtomicBool>),
}

/// Sends `aus` as H.264 at 30 fps and a 1 kHz Opus tone in 20 ms packets, interleaved
/// on one real-time schedule, on already negotiated tracks with payload types `(video,
/// audio)`.
pub async fn send_h264_and_opus(
    aus: std::sync::Arc<Vec<Vec<bytes::Bytes>>>,
    video: std::sync::Arc<webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP>,
    audio: std::sync::Arc<webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP>,
    pts: (u8, u8),
    pace: Pace,
) {
    let tone = |packet: u32| -> Vec<f32> {
        (0..960u32)
            .flat_map(|i| {
                let n = (packet.wrapping_mul(960).wrapping_add(i) % 48_000) as f32;
                let v = (n * 2.0 * std::f32::consts::PI * 1000.0 / 48_000.0).sin() * 0.3;
                [v, v]
            })
            .collect()
    };
    send_h264_and_opus_with(aus, video, audio, pts, pace, tone).await
}

/// Stereo PCM for 20 ms Opus packet `packet` of the generated source: a beep at every
/// second (`common::source::pcm`), so beep `k` starts with frame 30·k.
pub fn beeps(packet: u32) -> Vec<f32> {
    let from = u64::from(packet) * 960;
    let mut pcm = super::source::pcm(from);
    pcm.extend(super::source::pcm(from + 480));
    pcm.chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32_768.0)
        .collect()
}

/// [`send_h264_and_opus`] with the audio of `pcm` (960 stereo samples per packet).
/// Both tracks' RTP times start at 0 at the same instant, and packets leave on that
/// schedule, so the sender reports map both to one clock.
pub async fn send_h264_and_opus_with(
    aus: std::sync::Arc<Vec<Vec<bytes::Bytes>>>,
    video: std::sync::Arc<webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP>,
    audio: std::sync::Arc<webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP>,
    (vpt, apt): (u8, u8),
    pace: Pace,
    pcm: impl Fn(u32) -> Vec<f32>,
) {
    use webrtc::media_stream::track_local::TrackLocal;
    let start = tokio::time::Instant::now();
    let mut enc =
        opus::Encoder::new(48_000, opus::Channels::Stereo, opus::Application::Audio).unwrap();
    let mut buf = vec![0u8; 1500];
    let (mut vseq, mut aseq) = (0u16, 0u16);
    let mut frame = 0usize;
    let mut apkt = 0u32;
    loop {
        match &pace {
            Pace::Once if frame >= aus.len() => return,
            Pace::Until(stop) if stop.load(std::sync::atomic::Ordering::Relaxed) => return,
            _ => {}
        }
        // Interleave on one schedule: video every 33.3 ms, audio every 20 ms.
        let vdue = start + Duration::from_micros(frame as u64 * 33_333);
        let adue = start + Duration::from_millis(u64::from(apkt) * 20);
        if adue <= vdue {
            tokio::time::sleep_until(adue).await;
            let len = enc.encode_float(&pcm(apkt), &mut buf).unwrap();
            let payload = bytes::Bytes::copy_from_slice(&buf[..len]);
            let p = rtp_packet(apt, 0x5252, aseq, apkt.wrapping_mul(960), false, payload);
            let _ = audio.write_rtp(p).await;
            aseq = aseq.wrapping_add(1);
            apkt += 1;
        } else {
            tokio::time::sleep_until(vdue).await;
            let ts = (frame as u32).wrapping_mul(3000);
            write_access_unit(
                &video,
                (vpt, 0x5151),
                &mut vseq,
                ts,
                &aus[frame % aus.len()],
            )
            .await;
            frame += 1;
        }
    }
}

/// One RTP packet (version 2, no header extensions).
pub fn rtp_packet(
    pt: u8,
    ssrc: u32,
    seq: u16,
    ts: u32,
    marker: bool,
    payload: bytes::Bytes,
) -> rtc::rtp::Packet {
    let mut p = rtc::rtp::Packet::default();
    p.header.version = 2;
    p.header.payload_type = pt;
    p.header.ssrc = ssrc;
    p.header.sequence_number = seq;
    p.header.timestamp = ts;
    p.header.marker = marker;
    p.payload = payload;
    p
}

/// Writes one H.264 access unit (`nalus`) on `track` as RTP (RFC 6184, payloads of at
/// most 1,100 bytes, the marker on the last) with `(payload type, SSRC)`, numbering
/// from `seq`, which it advances.
pub async fn write_access_unit(
    track: &webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP,
    (pt, ssrc): (u8, u32),
    seq: &mut u16,
    ts: u32,
    nalus: &[bytes::Bytes],
) {
    use webrtc::media_stream::track_local::TrackLocal;
    let mut payloads = Vec::new();
    weir::codec::h264::packetize(nalus, 1100, &mut payloads);
    let n = payloads.len();
    for (i, payload) in payloads.into_iter().enumerate() {
        let _ = track
            .write_rtp(rtp_packet(pt, ssrc, *seq, ts, i + 1 == n, payload))
            .await;
        *seq = seq.wrapping_add(1);
    }
}
