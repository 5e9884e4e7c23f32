//! The client side of an RTMP publish or play, sans I/O: what a node uses to relay a
//! push it received to the node serving the push's room, or a play to the node where
//! the stream is live (cluster mode). It speaks what Weir's own
//! [`super::ServerSession`] expects (the plain handshake, `connect`, `createStream`,
//! `publish` or `play`) and then carries messages unchanged.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::amf0::{self, object, string, Amf0};
use super::chunk::{self, ChunkDecoder, Limits, Message};
use super::session::{self, msg_type, RtmpError, HANDSHAKE_SIZE, OUT_CHUNK_SIZE};

/// What the far side said.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// `NetStream.Publish.Start` (or `NetStream.Play.Start` for a play): media may flow.
    Published,
    /// The far side refused (`_error` or an `onStatus` error): its code and words.
    Refused { code: String, description: String },
    /// A play's message: audio, video or data, its FLV tag body unchanged.
    Media {
        type_id: u8,
        timestamp: u32,
        data: Bytes,
    },
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// C0 + C1 sent, waiting for S0 + S1 + S2.
    Handshake,
    /// `connect` sent.
    Connecting,
    /// `createStream` sent.
    Creating,
    /// `publish` sent.
    Publishing,
    Published,
    Done,
}

pub struct ClientPublish {
    /// Plays instead of publishing.
    play: bool,
    state: State,
    input: BytesMut,
    decoder: ChunkDecoder,
    out: Vec<u8>,
    events: VecDeque<ClientEvent>,
    app: String,
    tc_url: String,
    name: String,
    stream_id: u32,
    /// The far side's acknowledgement window, and what we received toward it.
    peer_window: u32,
    received: u64,
    acked: u64,
}

const CONNECT_TXN: f64 = 1.0;
const CREATE_TXN: f64 = 2.0;
const PUBLISH_TXN: f64 = 3.0;

impl ClientPublish {
    /// Starts a publish of `name` (with its query, as the pusher sent it) on `app`.
    pub fn new(app: &str, tc_url: &str, name: &str, epoch: u32) -> Self {
        let mut out = Vec::with_capacity(1 + HANDSHAKE_SIZE);
        out.push(3);
        let mut c1 = vec![0u8; HANDSHAKE_SIZE];
        c1[..4].copy_from_slice(&epoch.to_be_bytes());
        let mut x: u32 = epoch ^ 0x85eb_ca6b;
        for b in c1[8..].iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        out.extend_from_slice(&c1);
        Self {
            play: false,
            state: State::Handshake,
            input: BytesMut::with_capacity(4096),
            decoder: ChunkDecoder::new(Limits::default()),
            out,
            events: VecDeque::new(),
            app: app.to_owned(),
            tc_url: tc_url.to_owned(),
            name: name.to_owned(),
            stream_id: 0,
            peer_window: 0,
            received: 0,
            acked: 0,
        }
    }

    /// Starts a play of `name` (with its query) on `app`: its media comes as
    /// [`ClientEvent::Media`] once it is [`ClientEvent::Published`] (playing).
    pub fn play(app: &str, tc_url: &str, name: &str, epoch: u32) -> Self {
        let mut c = Self::new(app, tc_url, name, epoch);
        c.play = true;
        c
    }

    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Bytes from the far side. An error means the connection must be closed.
    pub fn handle_input(&mut self, data: &[u8]) -> Result<(), RtmpError> {
        self.input.extend_from_slice(data);
        self.received += data.len() as u64;
        if self.state == State::Handshake {
            if self.input.len() < 1 + 2 * HANDSHAKE_SIZE {
                return Ok(());
            }
            let version = self.input[0];
            if version != 3 {
                return Err(RtmpError::Version(version));
            }
            let s = self.input.split_to(1 + 2 * HANDSHAKE_SIZE);
            // C2 echoes S1.
            self.out.extend_from_slice(&s[1..1 + HANDSHAKE_SIZE]);
            self.control(
                msg_type::SET_CHUNK_SIZE,
                (OUT_CHUNK_SIZE as u32).to_be_bytes().to_vec(),
            );
            self.command(
                0,
                &[
                    string("connect"),
                    Amf0::Number(CONNECT_TXN),
                    object(&[
                        ("app", string(&self.app.clone())),
                        ("type", string("nonprivate")),
                        ("flashVer", string("FMLE/3.0 (compatible; weir relay)")),
                        ("tcUrl", string(&self.tc_url.clone())),
                    ]),
                ],
            );
            self.state = State::Connecting;
        }
        while let Some(msg) = self.decoder.decode(&mut self.input)? {
            self.message(msg)?;
        }
        if self.peer_window > 0 && self.received - self.acked >= u64::from(self.peer_window) {
            self.acked = self.received;
            let seq = (self.received & 0xffff_ffff) as u32;
            self.control(msg_type::ACK, seq.to_be_bytes().to_vec());
        }
        Ok(())
    }

    fn message(&mut self, msg: Message) -> Result<(), RtmpError> {
        let p = &msg.payload;
        let be32 = |p: &[u8]| -> Result<u32, RtmpError> {
            p.get(..4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| RtmpError::Protocol("control message shorter than 4 bytes".into()))
        };
        match msg.type_id {
            msg_type::SET_CHUNK_SIZE => {
                self.decoder.set_chunk_size(be32(p)? & 0x7fff_ffff)?;
            }
            msg_type::WINDOW_ACK_SIZE => self.peer_window = be32(p)?,
            msg_type::USER_CONTROL if p.len() >= 6 && p[..2] == [0, 6] => {
                // PingRequest → PingResponse with its timestamp.
                let mut pong = vec![0, 7];
                pong.extend_from_slice(&p[2..6]);
                self.control(msg_type::USER_CONTROL, pong);
            }
            msg_type::COMMAND_AMF0 => {
                let values = amf0::decode_all(p).map_err(|source| RtmpError::Amf {
                    what: "a reply",
                    source,
                })?;
                self.reply(&values);
            }
            msg_type::AUDIO | msg_type::VIDEO | msg_type::DATA_AMF0
                if self.play && self.state == State::Published =>
            {
                self.events.push_back(ClientEvent::Media {
                    type_id: msg.type_id,
                    timestamp: msg.timestamp,
                    data: msg.payload,
                });
            }
            _ => {}
        }
        Ok(())
    }

    fn reply(&mut self, values: &[Amf0]) {
        let name = values.first().and_then(Amf0::as_str).unwrap_or("");
        let txn = values.get(1).and_then(Amf0::as_number).unwrap_or(0.0);
        let info = values.get(3);
        let field = |k: &str| {
            info.and_then(|i| i.get(k))
                .and_then(Amf0::as_str)
                .unwrap_or("")
                .to_owned()
        };
        match (name, &self.state) {
            ("_result", State::Connecting) if txn == CONNECT_TXN => {
                self.command(
                    0,
                    &[string("createStream"), Amf0::Number(CREATE_TXN), Amf0::Null],
                );
                self.state = State::Creating;
            }
            ("_result", State::Creating) if txn == CREATE_TXN => {
                self.stream_id = values.get(3).and_then(Amf0::as_number).unwrap_or(1.0) as u32;
                let name = self.name.clone();
                let mut args = vec![
                    string(if self.play { "play" } else { "publish" }),
                    Amf0::Number(PUBLISH_TXN),
                    Amf0::Null,
                    string(&name),
                ];
                if !self.play {
                    args.push(string("live"));
                }
                self.command(self.stream_id, &args);
                self.state = State::Publishing;
            }
            ("onStatus", State::Publishing) => {
                let info = values.get(3);
                let get = |k: &str| {
                    info.and_then(|i| i.get(k))
                        .and_then(Amf0::as_str)
                        .unwrap_or("")
                        .to_owned()
                };
                let started = if self.play {
                    "NetStream.Play.Start"
                } else {
                    "NetStream.Publish.Start"
                };
                if get("code") == started {
                    self.state = State::Published;
                    self.events.push_back(ClientEvent::Published);
                } else if get("level") == "error" {
                    self.refused(get("code"), get("description"));
                }
            }
            ("onStatus", State::Published) if field("level") == "error" => {
                self.refused(field("code"), field("description"));
            }
            ("_error", _) => self.refused(field("code"), field("description")),
            _ => {}
        }
    }

    fn refused(&mut self, code: String, description: String) {
        if self.state != State::Done {
            self.state = State::Done;
            self.events
                .push_back(ClientEvent::Refused { code, description });
        }
    }

    /// One of the pusher's messages (an FLV tag body or a data message), unchanged.
    pub fn send(&mut self, type_id: u8, timestamp: u32, data: Bytes) {
        let csid = match type_id {
            msg_type::AUDIO => 4,
            msg_type::VIDEO => 6,
            _ => 5,
        };
        chunk::encode(
            &Message {
                csid,
                timestamp,
                type_id,
                stream_id: self.stream_id,
                payload: data,
            },
            OUT_CHUNK_SIZE,
            &mut self.out,
        );
    }

    fn control(&mut self, type_id: u8, payload: Vec<u8>) {
        session::encode_control(&mut self.out, type_id, payload);
    }

    /// Commands go on chunk stream 3 (the connection's) or 5 (the stream's), as the
    /// server's replies do.
    fn command(&mut self, stream_id: u32, values: &[Amf0]) {
        session::encode_command(&mut self.out, stream_id, values);
    }
}

#[cfg(test)]
mod tests {
    use super::super::session::{Event, ServerSession};
    use super::*;

    /// Weir's client and Weir's server, wired to each other: the publish goes through
    /// and media arrives unchanged.
    fn pump(c: &mut ClientPublish, s: &mut ServerSession) -> Vec<Event> {
        let mut events = Vec::new();
        for _ in 0..10 {
            let to_server = c.take_output();
            if !to_server.is_empty() {
                s.handle_input(&to_server).unwrap();
            }
            while let Some(e) = s.poll_event() {
                match &e {
                    Event::Connect { .. } => s.accept_connect(),
                    Event::Publish { name } => s.accept_publish(&name.clone()),
                    _ => {}
                }
                events.push(e);
            }
            let to_client = s.take_output();
            if !to_client.is_empty() {
                c.handle_input(&to_client).unwrap();
            }
        }
        events
    }

    #[test]
    fn a_relayed_publish_reaches_weir_s_server_with_its_media() {
        let mut c = ClientPublish::new("live", "rtmp://b:1935/live", "s1?usersig=x", 7);
        let mut s = ServerSession::new(1);
        let events = pump(&mut c, &mut s);
        assert_eq!(
            events[..2],
            [
                Event::Connect {
                    app: "live".into(),
                    tc_url: "rtmp://b:1935/live".into()
                },
                Event::Publish {
                    name: "s1?usersig=x".into()
                }
            ]
        );
        assert_eq!(c.poll_event(), Some(ClientEvent::Published));
        let frame = Bytes::from(vec![0x17u8; 10_000]);
        c.send(msg_type::VIDEO, 40, frame.clone());
        c.send(msg_type::AUDIO, 41, Bytes::from_static(&[0xaf, 1, 2]));
        let events = pump(&mut c, &mut s);
        assert_eq!(
            events,
            [
                Event::Video {
                    timestamp: 40,
                    data: frame
                },
                Event::Audio {
                    timestamp: 41,
                    data: Bytes::from_static(&[0xaf, 1, 2])
                }
            ]
        );
    }

    #[test]
    fn a_relayed_play_receives_what_the_server_sends() {
        let mut c = ClientPublish::play("live", "rtmp://b/live", "s1?txSecret=x", 7);
        let mut s = ServerSession::new(1);
        for _ in 0..10 {
            let o = c.take_output();
            if !o.is_empty() {
                s.handle_input(&o).unwrap();
            }
            while let Some(e) = s.poll_event() {
                match e {
                    Event::Connect { .. } => s.accept_connect(),
                    Event::Play { name } => {
                        assert_eq!(name, "s1?txSecret=x");
                        s.accept_play("s1");
                    }
                    _ => {}
                }
            }
            let o = s.take_output();
            if !o.is_empty() {
                c.handle_input(&o).unwrap();
            }
        }
        assert_eq!(c.poll_event(), Some(ClientEvent::Published));
        // (accept_play's |RtmpSampleAccess data message comes through too.)
        while c.poll_event().is_some() {}
        s.send_media(msg_type::VIDEO, 80, Bytes::from(vec![0x27u8; 9000]));
        c.handle_input(&s.take_output()).unwrap();
        assert_eq!(
            c.poll_event(),
            Some(ClientEvent::Media {
                type_id: msg_type::VIDEO,
                timestamp: 80,
                data: Bytes::from(vec![0x27u8; 9000])
            })
        );
    }

    #[test]
    fn a_refusal_is_reported_with_its_code_and_words() {
        let mut c = ClientPublish::new("live", "rtmp://b/live", "s1", 7);
        let mut s = ServerSession::new(1);
        for _ in 0..10 {
            let o = c.take_output();
            if !o.is_empty() {
                s.handle_input(&o).unwrap();
            }
            while let Some(e) = s.poll_event() {
                match e {
                    Event::Connect { .. } => s.accept_connect(),
                    Event::Publish { .. } => {
                        s.reject("NetStream.Publish.Unauthorized", "usersig is missing")
                    }
                    _ => {}
                }
            }
            let o = s.take_output();
            if !o.is_empty() {
                c.handle_input(&o).unwrap();
            }
        }
        assert_eq!(
            c.poll_event(),
            Some(ClientEvent::Refused {
                code: "NetStream.Publish.Unauthorized".into(),
                description: "usersig is missing".into()
            })
        );
    }

    #[test]
    fn garbage_from_the_far_side_is_an_error_not_a_panic() {
        let mut c = ClientPublish::new("live", "rtmp://b/live", "s1", 7);
        let _ = c.take_output();
        assert!(c.handle_input(&[6u8; 4000]).is_err());
        let mut c = ClientPublish::new("live", "rtmp://b/live", "s1", 7);
        let mut junk = vec![3u8];
        junk.extend(std::iter::repeat_n(0xffu8, 2 * HANDSHAKE_SIZE + 500));
        // Whatever it makes of it, it returns.
        let _ = c.handle_input(&junk);
    }
}
