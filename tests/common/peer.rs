//! A WebRTC client built on the async `webrtc` crate (the same webrtc-rs release as the
//! server's core), speaking Weir's signaling: publishes H.264 + Opus from RTP packets
//! the test makes, and records every packet it receives, per track.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rtc::interceptor::Registry;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCIceGatheringState,
    RTCPeerConnectionState,
};

pub const H264_FMTP: &str =
    "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f";

pub fn h264() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: "video/H264".into(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: H264_FMTP.into(),
        rtcp_feedback: vec![],
    }
}

pub fn opus() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: "audio/opus".into(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".into(),
        rtcp_feedback: vec![],
    }
}

/// A received packet, as the test checks it.
#[derive(Debug, Clone)]
pub struct Received {
    pub ssrc: u32,
    pub seq: u16,
    pub ts: u32,
    pub pt: u8,
    pub payload: Vec<u8>,
    pub marker: bool,
    /// When the client's track handed it over.
    pub at: std::time::Instant,
}

/// Packets received per remote track id (`<streamId>-audio` / `<streamId>-video`).
pub type Inbox = Arc<Mutex<HashMap<String, Vec<Received>>>>;

/// Sender reports received per remote track id.
pub type Reports = Arc<Mutex<HashMap<String, Vec<rtc::rtcp::sender_report::SenderReport>>>>;

struct Handler {
    gathered: tokio::sync::watch::Sender<bool>,
    state: tokio::sync::watch::Sender<RTCPeerConnectionState>,
    inbox: Inbox,
    reports: Reports,
    tracks: Arc<Mutex<Vec<Arc<dyn TrackRemote>>>>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.send(true);
        }
    }
    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.state.send(state);
    }
    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        self.tracks.lock().unwrap().push(track.clone());
        let inbox = self.inbox.clone();
        let reports = self.reports.clone();
        tokio::spawn(async move {
            let id = track.track_id().await;
            while let Some(event) = track.poll().await {
                if let TrackRemoteEvent::OnRtcpPacket(pkts) = &event {
                    let mut r = reports.lock().unwrap();
                    for sr in pkts.iter().filter_map(|p| {
                        p.as_any()
                            .downcast_ref::<rtc::rtcp::sender_report::SenderReport>()
                    }) {
                        r.entry(id.clone()).or_default().push(sr.clone());
                    }
                }
                if let TrackRemoteEvent::OnRtpPacket(p) = event {
                    inbox
                        .lock()
                        .unwrap()
                        .entry(id.clone())
                        .or_default()
                        .push(Received {
                            ssrc: p.header.ssrc,
                            seq: p.header.sequence_number,
                            ts: p.header.timestamp,
                            pt: p.header.payload_type,
                            payload: p.payload.to_vec(),
                            marker: p.header.marker,
                            at: std::time::Instant::now(),
                        });
                }
            }
        });
    }
}

/// A sending track and what negotiation decided for it.
pub struct SendTrack {
    pub track: Arc<TrackLocalStaticRTP>,
    sender: Arc<dyn webrtc::rtp_transceiver::RtpSender>,
    codec: RTCRtpCodec,
}

impl SendTrack {
    /// The payload type negotiated for this track's codec (known once negotiated).
    pub async fn payload_type(&self) -> u8 {
        let params = self.sender.get_parameters().await.unwrap();
        params
            .rtp_parameters
            .codecs
            .iter()
            .find(|c| {
                c.rtp_codec
                    .mime_type
                    .eq_ignore_ascii_case(&self.codec.mime_type)
                    && c.rtp_codec.sdp_fmtp_line == self.codec.sdp_fmtp_line
            })
            .or_else(|| {
                params.rtp_parameters.codecs.iter().find(|c| {
                    c.rtp_codec
                        .mime_type
                        .eq_ignore_ascii_case(&self.codec.mime_type)
                })
            })
            .map(|c| c.payload_type)
            .expect("the codec was negotiated")
    }
}

pub struct RtcPeer {
    pub pc: Arc<dyn PeerConnection>,
    pub inbox: Inbox,
    pub reports: Reports,
    /// Remote tracks, to send RTCP (PLI) about them.
    pub tracks: Arc<Mutex<Vec<Arc<dyn TrackRemote>>>>,
    gathered: tokio::sync::watch::Receiver<bool>,
    pub state: tokio::sync::watch::Receiver<RTCPeerConnectionState>,
}

impl RtcPeer {
    pub async fn new() -> Self {
        Self::build(false, None).await
    }

    /// A client whose only candidates are active ICE-TCP ones (UDP "blocked").
    pub async fn new_tcp_only() -> Self {
        Self::build(true, None).await
    }

    /// A client that sends its ICE consent checks only every `interval`.
    pub async fn with_keepalive(interval: std::time::Duration) -> Self {
        Self::build(false, Some(interval)).await
    }

    async fn build(tcp_only: bool, keepalive: Option<std::time::Duration>) -> Self {
        let mut media_engine = MediaEngine::default();
        media_engine.register_default_codecs().unwrap();
        // The server's own RTCP tap, so publishers see the keyframe requests relayed to them.
        let registry = Registry::new().with(
            rtc::interceptor::Slot::from(weir::media::RTCP_TAP_SLOT),
            weir::media::RtcpTap::new(true),
        );
        let registry = register_default_interceptors(registry, &mut media_engine).unwrap();
        let (gathered_tx, gathered) = tokio::sync::watch::channel(false);
        let (state_tx, state) = tokio::sync::watch::channel(RTCPeerConnectionState::New);
        let inbox: Inbox = Arc::default();
        let tracks: Arc<Mutex<Vec<Arc<dyn TrackRemote>>>> = Arc::default();
        let reports: Reports = Arc::default();
        let handler = Arc::new(Handler {
            gathered: gathered_tx,
            state: state_tx,
            inbox: inbox.clone(),
            reports: reports.clone(),
            tracks: tracks.clone(),
        });
        let builder = PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(media_engine)
            .with_interceptor_registry(registry)
            .with_handler(handler);
        let pc = if tcp_only {
            let settings =
                rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder::new()
                    .with_network_types(vec![rtc::ice::network_type::NetworkType::Tcp4])
                    .build();
            builder
                .with_setting_engine(settings)
                .with_tcp_addrs(vec!["127.0.0.1:0".to_owned()])
                .with_udp_addrs(Vec::<String>::new())
                .build()
                .await
                .unwrap()
        } else {
            let builder = match keepalive {
                Some(k) => builder.with_setting_engine(
                    rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder::new(
                    )
                    // Its own checks answered every `k`: not disconnected before 3 k.
                    .with_ice_timeouts(Some(k * 3), Some(k * 6), Some(k))
                    .build(),
                ),
                None => builder,
            };
            builder
                .with_udp_addrs(vec!["127.0.0.1:0".to_owned()])
                .build()
                .await
                .unwrap()
        };
        Self {
            pc: Arc::new(pc),
            inbox,
            reports,
            tracks,
            gathered,
            state,
        }
    }

    /// Adds a sending track with a fixed SSRC.
    pub async fn add_send_track(
        &self,
        kind: RtpCodecKind,
        codec: RTCRtpCodec,
        ssrc: u32,
    ) -> SendTrack {
        let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            "test-stream".into(),
            format!("test-{kind}"),
            format!("test-{kind}"),
            kind,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec: codec.clone(),
                ..Default::default()
            }],
        )));
        let sender = self
            .pc
            .add_track(track.clone() as Arc<dyn TrackLocal>)
            .await
            .unwrap();
        SendTrack {
            track,
            sender,
            codec,
        }
    }

    async fn local_sdp_when_gathered(&mut self) -> String {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.gathered.wait_for(|g| *g)).await;
        self.pc.local_description().await.unwrap().sdp
    }

    pub async fn offer(&mut self) -> String {
        let offer = self.pc.create_offer(None).await.unwrap();
        self.pc.set_local_description(offer).await.unwrap();
        self.local_sdp_when_gathered().await
    }

    /// An offer that restarts ICE (new credentials), as after a network change.
    pub async fn offer_ice_restart(&mut self) -> String {
        let options = rtc::peer_connection::configuration::RTCOfferOptions { ice_restart: true };
        let offer = self.pc.create_offer(Some(options)).await.unwrap();
        self.pc.set_local_description(offer).await.unwrap();
        self.local_sdp_when_gathered().await
    }

    pub async fn answer(&mut self, offer: String) -> String {
        self.try_answer(offer).await.unwrap()
    }

    /// An answer, or why there is none (a connection already closed, at a test's end).
    pub async fn try_answer(&mut self, offer: String) -> Result<String, String> {
        let offer = RTCSessionDescription::offer(offer).map_err(|e| e.to_string())?;
        self.pc
            .set_remote_description(offer)
            .await
            .map_err(|e| e.to_string())?;
        let answer = self
            .pc
            .create_answer(None)
            .await
            .map_err(|e| e.to_string())?;
        self.pc
            .set_local_description(answer)
            .await
            .map_err(|e| e.to_string())?;
        Ok(self.local_sdp_when_gathered().await)
    }

    pub async fn accept_answer(&self, answer: String) {
        self.pc
            .set_remote_description(RTCSessionDescription::answer(answer.clone()).unwrap())
            .await
            .unwrap();
        self.trickle_sdp_candidates(&answer).await;
    }

    /// The async `webrtc` crate dials a passive ICE-TCP candidate only when it arrives
    /// through `add_ice_candidate`, not from the SDP (browsers take both), so the
    /// server's candidates are handed over again that way.
    async fn trickle_sdp_candidates(&self, sdp: &str) {
        for line in sdp.lines().filter(|l| l.contains(" tcp ")) {
            if let Some(c) = line.trim().strip_prefix("a=") {
                let init = rtc::peer_connection::transport::RTCIceCandidateInit {
                    candidate: c.to_owned(),
                    sdp_mline_index: Some(0),
                    ..Default::default()
                };
                let _ = self.pc.add_ice_candidate(init).await;
            }
        }
    }

    pub async fn connected(&mut self) {
        tokio::time::timeout(
            Duration::from_secs(10),
            self.state
                .wait_for(|s| *s == RTCPeerConnectionState::Connected),
        )
        .await
        .expect("connected within 10 s")
        .unwrap();
    }

    /// Sends a PLI for the received video track of `stream` (as a decoder that lost
    /// its picture does). False if no video of it has been received yet.
    pub async fn request_keyframe(&self, stream: &str) -> bool {
        let id = format!("{stream}-video");
        let Some(media_ssrc) = self
            .inbox
            .lock()
            .unwrap()
            .get(&id)
            .and_then(|v| v.first().map(|r| r.ssrc))
        else {
            return false;
        };
        let tracks = self.tracks.lock().unwrap().clone();
        for t in tracks {
            if t.kind().await == RtpCodecKind::Video && t.ssrcs().await.contains(&media_ssrc) {
                let pli =
                    rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication {
                        sender_ssrc: 0,
                        media_ssrc,
                    };
                return t.write_rtcp(vec![Box::new(pli)]).await.is_ok();
            }
        }
        false
    }
}
