//! The edge's side of a room that spans nodes: one WebRTC connection to the room's
//! node, on which that node offers the room's streams to this one as to any
//! subscriber (its signaling comes over the hidden relay member's websocket, see
//! `server::span`). Sans-I/O, on webrtc-rs's `rtc` core: datagrams and a clock in,
//! datagrams and media out.
//!
//! It is a receiving connection like a publisher's here: a NACK generator (what the
//! link between the nodes loses is asked again from the room's node, whose NACK
//! responder answers from its cache), receiver reports and transport-wide CC feedback
//! (so the room's node estimates and allocates this node's link as it does any
//! subscriber's: one subscriber per edge, whatever its audience), and the sender
//! reports it receives handed on (local subscribers lip-sync from the publisher's
//! clock). Keyframe requests of local subscribers go up as PLIs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::BytesMut;
use rtc::interceptor::{Registry, Slot};
use rtc::peer_connection::configuration::interceptor_registry::{
    configure_nack, configure_simulcast_extension_headers, configure_twcc_receiver_only,
};
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::event::{RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtp_transceiver::rtp_sender::RTCRtpCodec;
use rtc::rtp_transceiver::RTCRtpReceiverId;
use rtc::sansio::Protocol;
use rtc::shared::error::Error as RtcError;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use weir_signaling::Kind;

use super::forward::{carries_sps, starts_keyframe};
use super::peer::{
    add_udp_host_candidate, negotiated_codec, register_codecs, to_kind,
    with_receiving_interceptors, RtcpTap, RTCP_TAP_SLOT,
};

/// What the connection gives the shell.
#[derive(Debug)]
pub enum UpstreamEvent {
    /// A stream's track can be forwarded: its codec is known (from its first packet).
    Track {
        stream_id: String,
        kind: Kind,
        codec: RTCRtpCodec,
    },
    Rtp {
        stream_id: String,
        kind: Kind,
        packet: rtc::rtp::Packet,
        /// Video that starts a keyframe (H.264: its parameter sets; VP8: a key frame).
        keyframe: bool,
        arrived: Instant,
    },
    SenderReport {
        stream_id: String,
        kind: Kind,
        report: SenderReport,
    },
    Connected,
    /// ICE or DTLS failed, or the connection closed.
    Failed,
}

struct Track {
    stream_id: String,
    kind: Kind,
    receiver: RTCRtpReceiverId,
    codec: Option<RTCRtpCodec>,
    /// The SSRC its packets come with (the room's node's downtrack).
    ssrc: Option<u32>,
}

pub struct Upstream {
    pc: RTCPeerConnection,
    local: SocketAddr,
    /// By rtc's track id, which is the room's node's: `{stream}-{audio|video}`.
    tracks: HashMap<String, Track>,
    events: std::collections::VecDeque<UpstreamEvent>,
    connected: bool,
}

/// The stream and kind a downtrack of another Weir node names (`{stream}-{kind}`).
fn parse_track_id(id: &str) -> Option<(String, Kind)> {
    let (stream, kind) = id.rsplit_once('-')?;
    let kind = match kind {
        "audio" => Kind::Audio,
        "video" => Kind::Video,
        _ => return None,
    };
    (!stream.is_empty()).then(|| (stream.to_owned(), kind))
}

impl Upstream {
    /// A connection that answers the room's node's offers from `local` (a host
    /// candidate: the room's node is ICE-lite and answers checks from wherever).
    pub fn new(local: SocketAddr, now: Instant) -> Result<Self, RtcError> {
        let mut engine = MediaEngine::default();
        register_codecs(&mut engine)?;
        let _ = configure_nack(Registry::new(), &mut engine);
        configure_simulcast_extension_headers(&mut engine)?;
        let _ = configure_twcc_receiver_only(Registry::new(), &mut engine)?;
        let registry = with_receiving_interceptors(
            Registry::new().with(Slot::from(RTCP_TAP_SLOT), RtcpTap::new(true)),
        );
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(engine)
            .with_interceptor_registry(registry)
            .build(now)?;
        add_udp_host_candidate(&mut pc, local)?;
        Ok(Self {
            pc,
            local,
            tracks: HashMap::new(),
            events: Default::default(),
            connected: false,
        })
    }

    /// Answers an offer of the room's node (the first, or a renegotiation when the
    /// room's streams change).
    pub fn answer(&mut self, sdp: String, now: Instant) -> Result<String, RtcError> {
        self.pc
            .set_remote_description(now, RTCSessionDescription::offer(sdp)?)?;
        let answer = self.pc.create_answer(None)?;
        self.pc.set_local_description(now, answer)?;
        self.drain(now);
        Ok(self
            .pc
            .local_description()
            .map(|d| d.sdp.clone())
            .unwrap_or_default())
    }

    pub fn datagram(&mut self, data: &[u8], from: SocketAddr, now: Instant) {
        let _ = self.pc.handle_read(TaggedBytesMut {
            now,
            transport: TransportContext {
                local_addr: self.local,
                peer_addr: from,
                ecn: None,
                transport_protocol: TransportProtocol::UDP,
            },
            message: BytesMut::from(data),
        });
        self.drain(now);
    }

    /// Datagrams to send, and where.
    pub fn poll_transmit(&mut self) -> Option<(BytesMut, SocketAddr)> {
        self.pc
            .poll_write()
            .map(|out| (out.message, out.transport.peer_addr))
    }

    pub fn poll_event(&mut self) -> Option<UpstreamEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&mut self) -> Option<Instant> {
        self.pc.poll_timeout()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.pc.poll_timeout().is_some_and(|t| t <= now) {
            let _ = self.pc.handle_timeout(now);
        }
        self.drain(now);
    }

    /// Asks the room's node for a keyframe of `stream_id` (a local subscriber needs
    /// one). True if the request went out.
    pub fn request_keyframe(&mut self, stream_id: &str, now: Instant) -> bool {
        let Some((receiver, ssrc)) = self
            .tracks
            .values()
            .find(|t| t.stream_id == stream_id && t.kind == Kind::Video)
            .and_then(|t| Some((t.receiver, t.ssrc?)))
        else {
            return false;
        };
        let Some(mut r) = self.pc.rtp_receiver(receiver) else {
            return false;
        };
        let pli = PictureLossIndication {
            sender_ssrc: 0,
            media_ssrc: ssrc,
        };
        let sent = r.write_rtcp(now, vec![Box::new(pli)]).is_ok();
        self.drain(now);
        sent
    }

    fn drain(&mut self, _now: Instant) {
        while let Some(event) = self.pc.poll_event() {
            match event {
                RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => match state {
                    RTCPeerConnectionState::Connected if !self.connected => {
                        self.connected = true;
                        self.events.push_back(UpstreamEvent::Connected);
                    }
                    RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                        self.events.push_back(UpstreamEvent::Failed);
                    }
                    _ => {}
                },
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                    let Some((stream_id, kind)) = parse_track_id(&init.track_id) else {
                        continue;
                    };
                    let same_kind = self
                        .pc
                        .rtp_receiver(init.receiver_id)
                        .and_then(|r| to_kind(r.track().kind()))
                        == Some(kind);
                    if same_kind {
                        self.tracks.entry(init.track_id.clone()).or_insert(Track {
                            stream_id,
                            kind,
                            receiver: init.receiver_id,
                            codec: None,
                            ssrc: None,
                        });
                    }
                }
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnClose(track_id)) => {
                    self.tracks.remove(&track_id);
                }
                _ => {}
            }
        }
        while let Some(TaggedRTCMessage { now, message }) = self.pc.poll_read() {
            match message {
                RTCMessage::RtpPacket(track_id, packet) => {
                    let Some(t) = self.tracks.get_mut(&track_id) else {
                        continue;
                    };
                    t.ssrc = Some(packet.header.ssrc);
                    if t.codec.is_none() {
                        let pt = packet.header.payload_type;
                        t.codec = negotiated_codec(&mut self.pc, t.receiver, pt);
                        let Some(codec) = t.codec.clone() else {
                            continue;
                        };
                        self.events.push_back(UpstreamEvent::Track {
                            stream_id: t.stream_id.clone(),
                            kind: t.kind,
                            codec,
                        });
                    }
                    let mime = t.codec.as_ref().map_or("", |c| c.mime_type.as_str());
                    let keyframe = t.kind == Kind::Video
                        && if mime.eq_ignore_ascii_case("video/H264") {
                            carries_sps(&packet.payload)
                        } else {
                            starts_keyframe(mime, &packet.payload) == Some(true)
                        };
                    self.events.push_back(UpstreamEvent::Rtp {
                        stream_id: t.stream_id.clone(),
                        kind: t.kind,
                        packet,
                        keyframe,
                        arrived: now,
                    });
                }
                RTCMessage::RtcpPacket(track_id, packets) => {
                    let Some(t) = self.tracks.get(&track_id) else {
                        continue;
                    };
                    for sr in packets
                        .iter()
                        .filter_map(|p| p.as_any().downcast_ref::<SenderReport>())
                    {
                        self.events.push_back(UpstreamEvent::SenderReport {
                            stream_id: t.stream_id.clone(),
                            kind: t.kind,
                            report: sr.clone(),
                        });
                    }
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_downtrack_id_names_its_stream_and_kind() {
        assert_eq!(
            parse_track_id("1400000000_7_alice_main-video"),
            Some(("1400000000_7_alice_main".into(), Kind::Video))
        );
        assert_eq!(
            parse_track_id("a-b-audio"),
            Some(("a-b".into(), Kind::Audio))
        );
        assert_eq!(parse_track_id("-audio"), None);
        assert_eq!(parse_track_id("x-data"), None);
        assert_eq!(parse_track_id("nodash"), None);
    }
}
