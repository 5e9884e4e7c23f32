//! The server side of one RTMP connection, sans I/O: bytes in, events and bytes out.
//!
//! It does the handshake (the plain one: our S1 carries a zero version, so clients
//! skip digest validation, which is what ffmpeg, OBS and librtmp-based pushers do),
//! reassembles chunked messages, answers the protocol-control messages, and turns the
//! NetConnection/NetStream commands real encoders send into events for the shell to
//! decide on (connect, publish, play). Commands that need no answer (`releaseStream`,
//! `FCPublish`, `_checkbw`, ...) are answered harmlessly or ignored.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::amf0::{self, object, string, Amf0};
use super::chunk::{self, ChunkDecoder, Limits, Message};

pub const HANDSHAKE_SIZE: usize = 1536;

/// Message type ids.
pub mod msg_type {
    pub const SET_CHUNK_SIZE: u8 = 1;
    pub const ABORT: u8 = 2;
    pub const ACK: u8 = 3;
    pub const USER_CONTROL: u8 = 4;
    pub const WINDOW_ACK_SIZE: u8 = 5;
    pub const SET_PEER_BANDWIDTH: u8 = 6;
    pub const AUDIO: u8 = 8;
    pub const VIDEO: u8 = 9;
    pub const DATA_AMF3: u8 = 15;
    pub const COMMAND_AMF3: u8 = 17;
    pub const DATA_AMF0: u8 = 18;
    pub const COMMAND_AMF0: u8 = 20;
}

/// The chunk size we send with; big enough that a video frame is a few chunks.
pub const OUT_CHUNK_SIZE: usize = 4096;
const WINDOW_ACK: u32 = 2_500_000;
/// The one message stream we hand out per connection.
pub const STREAM_ID: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RtmpError {
    #[error("RTMP version {0} is not supported (only 3; 6 is RTMPE)")]
    Version(u8),
    #[error(transparent)]
    Chunk(#[from] chunk::ChunkError),
    #[error("bad {what} command: {reason}")]
    BadCommand { what: String, reason: String },
    #[error("AMF0 in {what}: {source}")]
    Amf {
        what: &'static str,
        source: amf0::AmfError,
    },
    #[error("{0}")]
    Protocol(String),
}

/// What the connection asks of the application.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// `connect`: answered by [`ServerSession::accept_connect`] or refused by closing.
    Connect { app: String, tc_url: String },
    /// `publish` on our stream: answer with `accept_publish` or `reject`.
    Publish { name: String },
    /// `play` on our stream: answer with `accept_play` or `reject`.
    Play { name: String },
    /// FLV video tag body.
    Video { timestamp: u32, data: Bytes },
    /// FLV audio tag body.
    Audio { timestamp: u32, data: Bytes },
    /// `@setDataFrame`/`onMetaData` and other data messages.
    Data { values: Vec<Amf0> },
    /// `FCUnpublish`, `deleteStream` or `closeStream`: the client is done.
    Unpublish,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Waiting for C0 + C1.
    Handshake0,
    /// S0-S2 sent, waiting for C2.
    Handshake2,
    Chunks,
}

pub struct ServerSession {
    state: State,
    input: BytesMut,
    decoder: ChunkDecoder,
    out: Vec<u8>,
    events: VecDeque<Event>,
    /// Acknowledgement window the peer set, and bytes counted toward it.
    peer_window: u32,
    received: u64,
    acked: u64,
    /// Transaction id of the pending publish/play (for the reply).
    pending_txn: f64,
    connect_txn: f64,
    epoch: u32,
}

impl ServerSession {
    /// `epoch` is our handshake time field (milliseconds since anything).
    pub fn new(epoch: u32) -> Self {
        Self {
            state: State::Handshake0,
            input: BytesMut::with_capacity(4096),
            decoder: ChunkDecoder::new(Limits::default()),
            out: Vec::with_capacity(4096),
            events: VecDeque::new(),
            peer_window: 0,
            received: 0,
            acked: 0,
            pending_txn: 0.0,
            connect_txn: 1.0,
            epoch,
        }
    }

    /// Bytes to write to the peer, in order.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Bytes from the peer. An error means the connection must be closed.
    pub fn handle_input(&mut self, data: &[u8]) -> Result<(), RtmpError> {
        self.input.extend_from_slice(data);
        self.received += data.len() as u64;
        loop {
            match self.state {
                State::Handshake0 => {
                    if self.input.len() < 1 + HANDSHAKE_SIZE {
                        return Ok(());
                    }
                    let version = self.input[0];
                    if version != 3 {
                        return Err(RtmpError::Version(version));
                    }
                    let c1 = self.input.split_to(1 + HANDSHAKE_SIZE);
                    self.out.push(3);
                    // S1: time, zero version (no digest scheme), random-ish filler.
                    let mut s1 = vec![0u8; HANDSHAKE_SIZE];
                    s1[..4].copy_from_slice(&self.epoch.to_be_bytes());
                    let mut x: u32 = self.epoch ^ 0x9e37_79b9;
                    for b in s1[8..].iter_mut() {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        *b = x as u8;
                    }
                    self.out.extend_from_slice(&s1);
                    // S2 echoes C1.
                    self.out.extend_from_slice(&c1[1..]);
                    self.state = State::Handshake2;
                }
                State::Handshake2 => {
                    if self.input.len() < HANDSHAKE_SIZE {
                        return Ok(());
                    }
                    let _c2 = self.input.split_to(HANDSHAKE_SIZE);
                    self.state = State::Chunks;
                }
                State::Chunks => {
                    while let Some(msg) = self.decoder.decode(&mut self.input)? {
                        self.message(msg)?;
                    }
                    self.maybe_ack();
                    return Ok(());
                }
            }
        }
    }

    fn maybe_ack(&mut self) {
        if self.peer_window > 0 && self.received - self.acked >= u64::from(self.peer_window) {
            self.acked = self.received;
            let seq = (self.received & 0xffff_ffff) as u32;
            self.control(msg_type::ACK, seq.to_be_bytes().to_vec());
        }
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
                let size = be32(p)? & 0x7fff_ffff;
                self.decoder.set_chunk_size(size)?;
            }
            msg_type::ABORT => self.decoder.abort(be32(p)?),
            msg_type::ACK | msg_type::SET_PEER_BANDWIDTH | msg_type::USER_CONTROL => {}
            msg_type::WINDOW_ACK_SIZE => self.peer_window = be32(p)?,
            msg_type::AUDIO => self.events.push_back(Event::Audio {
                timestamp: msg.timestamp,
                data: msg.payload,
            }),
            msg_type::VIDEO => self.events.push_back(Event::Video {
                timestamp: msg.timestamp,
                data: msg.payload,
            }),
            msg_type::DATA_AMF0 | msg_type::DATA_AMF3 => {
                let body = if msg.type_id == msg_type::DATA_AMF3 && !p.is_empty() {
                    &p[1..]
                } else {
                    &p[..]
                };
                let values = amf0::decode_all(body).map_err(|source| RtmpError::Amf {
                    what: "data message",
                    source,
                })?;
                self.events.push_back(Event::Data { values });
            }
            msg_type::COMMAND_AMF0 | msg_type::COMMAND_AMF3 => {
                let body = if msg.type_id == msg_type::COMMAND_AMF3 && !p.is_empty() {
                    &p[1..]
                } else {
                    &p[..]
                };
                let values = amf0::decode_all(body).map_err(|source| RtmpError::Amf {
                    what: "command",
                    source,
                })?;
                self.command(msg.stream_id, values)?;
            }
            _ => {} // Aggregate (22) and shared objects: not used by live encoders.
        }
        Ok(())
    }

    fn command(&mut self, _stream_id: u32, values: Vec<Amf0>) -> Result<(), RtmpError> {
        let mut it = values.into_iter();
        let name = match it.next() {
            Some(Amf0::String(s)) => s,
            other => {
                return Err(RtmpError::BadCommand {
                    what: "?".into(),
                    reason: format!("the command name is {other:?}, not a string"),
                })
            }
        };
        let txn = it.next().and_then(|v| v.as_number()).unwrap_or(0.0);
        let args: Vec<Amf0> = it.collect();
        let bad = |reason: &str| RtmpError::BadCommand {
            what: name.clone(),
            reason: reason.into(),
        };
        match name.as_str() {
            "connect" => {
                let obj = args.first().ok_or_else(|| bad("no command object"))?;
                let app = obj
                    .get("app")
                    .and_then(Amf0::as_str)
                    .unwrap_or("")
                    .to_owned();
                let tc_url = obj
                    .get("tcUrl")
                    .and_then(Amf0::as_str)
                    .unwrap_or("")
                    .to_owned();
                self.connect_txn = txn;
                self.events.push_back(Event::Connect { app, tc_url });
            }
            "createStream" => {
                self.command_reply(
                    0,
                    vec![
                        string("_result"),
                        Amf0::Number(txn),
                        Amf0::Null,
                        Amf0::Number(f64::from(STREAM_ID)),
                    ],
                );
            }
            "releaseStream" | "FCPublish" | "FCSubscribe" | "getStreamLength" => {
                self.command_reply(
                    0,
                    vec![
                        string("_result"),
                        Amf0::Number(txn),
                        Amf0::Null,
                        Amf0::Undefined,
                    ],
                );
            }
            "publish" | "play" => {
                let stream_name = args
                    .get(1)
                    .and_then(Amf0::as_str)
                    .ok_or_else(|| bad("no stream name"))?
                    .to_owned();
                self.pending_txn = txn;
                self.events.push_back(if name == "publish" {
                    Event::Publish { name: stream_name }
                } else {
                    Event::Play { name: stream_name }
                });
            }
            "FCUnpublish" | "deleteStream" | "closeStream" => {
                self.events.push_back(Event::Unpublish);
            }
            // _checkbw, getStreamLength, ping-likes: nothing the client waits for.
            _ => {}
        }
        Ok(())
    }

    fn control(&mut self, type_id: u8, payload: Vec<u8>) {
        encode_control(&mut self.out, type_id, payload);
    }

    fn command_reply(&mut self, stream_id: u32, values: Vec<Amf0>) {
        encode_command(&mut self.out, stream_id, &values);
    }

    fn user_control(&mut self, event: u16, stream_id: u32) {
        let mut p = event.to_be_bytes().to_vec();
        p.extend_from_slice(&stream_id.to_be_bytes());
        self.control(msg_type::USER_CONTROL, p);
    }

    fn on_status(&mut self, level: &str, code: &str, description: &str) {
        self.command_reply(
            STREAM_ID,
            vec![
                string("onStatus"),
                Amf0::Number(0.0),
                Amf0::Null,
                object(&[
                    ("level", string(level)),
                    ("code", string(code)),
                    ("description", string(description)),
                ]),
            ],
        );
    }

    pub fn accept_connect(&mut self) {
        self.control(msg_type::WINDOW_ACK_SIZE, WINDOW_ACK.to_be_bytes().to_vec());
        let mut bw = WINDOW_ACK.to_be_bytes().to_vec();
        bw.push(2); // dynamic
        self.control(msg_type::SET_PEER_BANDWIDTH, bw);
        self.control(
            msg_type::SET_CHUNK_SIZE,
            (OUT_CHUNK_SIZE as u32).to_be_bytes().to_vec(),
        );
        let txn = self.connect_txn;
        self.command_reply(
            0,
            vec![
                string("_result"),
                Amf0::Number(txn),
                object(&[
                    ("fmsVer", string("FMS/3,5,7,7009")),
                    ("capabilities", Amf0::Number(31.0)),
                    ("mode", Amf0::Number(1.0)),
                ]),
                object(&[
                    ("level", string("status")),
                    ("code", string("NetConnection.Connect.Success")),
                    ("description", string("Connection succeeded.")),
                    ("objectEncoding", Amf0::Number(0.0)),
                ]),
            ],
        );
    }

    pub fn accept_publish(&mut self, name: &str) {
        self.user_control(0, STREAM_ID); // StreamBegin
        self.on_status(
            "status",
            "NetStream.Publish.Start",
            &format!("{name} is now published."),
        );
    }

    pub fn accept_play(&mut self, name: &str) {
        self.user_control(0, STREAM_ID); // StreamBegin
        self.on_status(
            "status",
            "NetStream.Play.Reset",
            &format!("Playing and resetting {name}."),
        );
        self.on_status(
            "status",
            "NetStream.Play.Start",
            &format!("Started playing {name}."),
        );
        chunk::encode(
            &Message {
                csid: 5,
                timestamp: 0,
                type_id: msg_type::DATA_AMF0,
                stream_id: STREAM_ID,
                payload: Bytes::from(amf0::encode_all(&[
                    string("|RtmpSampleAccess"),
                    Amf0::Boolean(true),
                    Amf0::Boolean(true),
                ])),
            },
            OUT_CHUNK_SIZE,
            &mut self.out,
        );
    }

    /// Refuses a publish or play with an `onStatus` error (ffmpeg prints the
    /// description); the shell closes the connection after flushing it.
    pub fn reject(&mut self, code: &str, description: &str) {
        let _ = self.pending_txn;
        self.on_status("error", code, description);
    }

    /// Sends an FLV tag body to a player on our stream.
    pub fn send_media(&mut self, type_id: u8, timestamp: u32, data: Bytes) {
        chunk::encode(
            &Message {
                csid: if type_id == msg_type::AUDIO { 4 } else { 6 },
                timestamp,
                type_id,
                stream_id: STREAM_ID,
                payload: data,
            },
            OUT_CHUNK_SIZE,
            &mut self.out,
        );
    }
}

/// A protocol-control message (chunk stream 2, message stream 0), appended to `out`.
pub(super) fn encode_control(out: &mut Vec<u8>, type_id: u8, payload: Vec<u8>) {
    chunk::encode(
        &Message {
            csid: 2,
            timestamp: 0,
            type_id,
            stream_id: 0,
            payload: Bytes::from(payload),
        },
        OUT_CHUNK_SIZE,
        out,
    );
}

/// An AMF0 command on `stream_id` (chunk stream 3 for the connection's, 5 for a
/// stream's), appended to `out`.
pub(super) fn encode_command(out: &mut Vec<u8>, stream_id: u32, values: &[Amf0]) {
    chunk::encode(
        &Message {
            csid: if stream_id == 0 { 3 } else { 5 },
            timestamp: 0,
            type_id: msg_type::COMMAND_AMF0,
            stream_id,
            payload: Bytes::from(amf0::encode_all(values)),
        },
        OUT_CHUNK_SIZE,
        out,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays the client side of a publish far enough to see the events.
    #[test]
    fn publish_sequence() {
        let mut s = ServerSession::new(1);
        let mut c0c1 = vec![3u8];
        c0c1.extend_from_slice(&[7u8; HANDSHAKE_SIZE]);
        s.handle_input(&c0c1).unwrap();
        let out = s.take_output();
        assert_eq!(out.len(), 1 + 2 * HANDSHAKE_SIZE);
        assert_eq!(out[0], 3);
        assert_eq!(&out[1 + HANDSHAKE_SIZE..], &[7u8; HANDSHAKE_SIZE][..]);
        s.handle_input(&[0u8; HANDSHAKE_SIZE]).unwrap();

        let mut wire = Vec::new();
        let cmd = |values: &[Amf0], stream_id: u32, wire: &mut Vec<u8>| {
            chunk::encode(
                &Message {
                    csid: 3,
                    timestamp: 0,
                    type_id: msg_type::COMMAND_AMF0,
                    stream_id,
                    payload: Bytes::from(amf0::encode_all(values)),
                },
                128,
                wire,
            )
        };
        cmd(
            &[
                string("connect"),
                Amf0::Number(1.0),
                object(&[("app", string("live")), ("tcUrl", string("rtmp://h/live"))]),
            ],
            0,
            &mut wire,
        );
        cmd(
            &[
                string("releaseStream"),
                Amf0::Number(2.0),
                Amf0::Null,
                string("s"),
            ],
            0,
            &mut wire,
        );
        cmd(
            &[string("createStream"), Amf0::Number(4.0), Amf0::Null],
            0,
            &mut wire,
        );
        cmd(
            &[
                string("publish"),
                Amf0::Number(5.0),
                Amf0::Null,
                string("s?k=v"),
                string("live"),
            ],
            1,
            &mut wire,
        );
        chunk::encode(
            &Message {
                csid: 6,
                timestamp: 40,
                type_id: msg_type::VIDEO,
                stream_id: 1,
                payload: Bytes::from_static(&[0x17, 0, 0, 0, 0]),
            },
            128,
            &mut wire,
        );
        s.handle_input(&wire).unwrap();
        assert_eq!(
            s.poll_event(),
            Some(Event::Connect {
                app: "live".into(),
                tc_url: "rtmp://h/live".into()
            })
        );
        assert_eq!(
            s.poll_event(),
            Some(Event::Publish {
                name: "s?k=v".into()
            })
        );
        assert!(matches!(
            s.poll_event(),
            Some(Event::Video { timestamp: 40, .. })
        ));
        s.accept_connect();
        s.accept_publish("s");
        assert!(s.has_output());
    }

    #[test]
    fn wrong_version_is_refused() {
        let mut s = ServerSession::new(1);
        let mut c0c1 = vec![6u8];
        c0c1.extend_from_slice(&[0u8; HANDSHAKE_SIZE]);
        assert!(matches!(s.handle_input(&c0c1), Err(RtmpError::Version(6))));
    }
}
