//! The RTMP chunk stream: messages split into chunks of the negotiated size,
//! interleaved by chunk stream id, with compressed headers.
//!
//! The decoder is incremental (feed bytes as they come, take whole messages out), never
//! panics, and bounds what a peer can make it hold: message size, chunk streams in
//! flight, and the total of partial messages. Each chunk stream keeps its own partial
//! message, so chunks of several streams may interleave (RTMP allows it; encoders put
//! audio between the chunks of a large video message).
//!
//! Why not `rml_rtmp`, the crate made for this (measured 2026-12-05 with rml_rtmp 0.8.0):
//! its `ChunkDeserializer` keeps one partial-message buffer for every chunk stream, so a
//! chunk of another stream arriving mid-message underflows its remaining-length
//! arithmetic and it **panics** (`capacity overflow`, release build) on that valid input
//! (the `interleaved_chunk_streams_…` test below is the same byte sequence); it has no
//! message-size bound either (a 12-byte header makes it reserve the announced 16 MiB).
//! A remote panic before login is what this module must never have. This decoder is
//! linear in its input (one copy of each payload byte), bounded, and fuzzed
//! (`fuzz/fuzz_targets/rtmp_session.rs`, CI).

use std::collections::HashMap;

use bytes::{Buf, Bytes, BytesMut};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk stream {csid} continues a message it never started (fmt {fmt})")]
    NoPreviousHeader { csid: u32, fmt: u8 },
    #[error("message of {len} bytes is over the {max}-byte limit")]
    MessageTooLarge { len: u32, max: u32 },
    #[error("more than {0} chunk streams in flight")]
    TooManyStreams(usize),
    #[error("{held} bytes of partial messages held; the limit is {max}")]
    TooMuchBuffered { held: usize, max: usize },
    #[error("chunk size {0} is out of range (1..=16777215)")]
    BadChunkSize(u32),
}

/// A whole RTMP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub csid: u32,
    /// Milliseconds, 32-bit with wrap (RTMP timestamps wrap after ~49.7 days).
    pub timestamp: u32,
    pub type_id: u8,
    pub stream_id: u32,
    pub payload: Bytes,
}

/// The last header seen on a chunk stream (what compressed headers refer to).
#[derive(Debug, Default, Clone, Copy)]
struct Header {
    timestamp: u32,
    delta: u32,
    length: u32,
    type_id: u8,
    stream_id: u32,
    /// The last header carried an extended timestamp (fmt 3 chunks then carry it too).
    extended: bool,
    has_header: bool,
}

#[derive(Debug, Default)]
struct StreamState {
    header: Header,
    /// The message being assembled: appended to in place, so a message costs its
    /// length in copies, however many chunks it comes in.
    partial: Option<BytesMut>,
}

/// Limits on what one peer may make the decoder hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_message: u32,
    pub max_streams: usize,
    pub max_buffered: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // A 4K keyframe at 20 Mbit/s fits; anything bigger is not a live camera.
            max_message: 4 << 20,
            max_streams: 64,
            max_buffered: 8 << 20,
        }
    }
}

pub struct ChunkDecoder {
    chunk_size: u32,
    streams: HashMap<u32, StreamState>,
    limits: Limits,
    buffered: usize,
}

impl ChunkDecoder {
    pub fn new(limits: Limits) -> Self {
        Self {
            chunk_size: 128,
            streams: HashMap::new(),
            limits,
            buffered: 0,
        }
    }

    /// The peer's Set Chunk Size.
    pub fn set_chunk_size(&mut self, size: u32) -> Result<(), ChunkError> {
        if size == 0 || size > 0xFF_FFFF {
            return Err(ChunkError::BadChunkSize(size));
        }
        self.chunk_size = size;
        Ok(())
    }

    /// The peer's Abort Message: drop the partial message of a chunk stream.
    pub fn abort(&mut self, csid: u32) {
        if let Some(s) = self.streams.get_mut(&csid) {
            if let Some(p) = s.partial.take() {
                self.buffered -= p.len();
            }
        }
    }

    /// Consumes whole chunks from `input` until a message completes (returned) or the
    /// input ends in the middle of a chunk (left in `input`, `Ok(None)`).
    pub fn decode(&mut self, input: &mut BytesMut) -> Result<Option<Message>, ChunkError> {
        loop {
            let Some((header_len, csid, fmt)) = basic_header(input) else {
                return Ok(None);
            };
            let mh_len = [11usize, 7, 3, 0][fmt as usize];
            if input.len() < header_len + mh_len {
                return Ok(None);
            }
            if !self.streams.contains_key(&csid) && self.streams.len() >= self.limits.max_streams {
                return Err(ChunkError::TooManyStreams(self.limits.max_streams));
            }
            // Only the small header is copied: the partial message stays where it is
            // until this chunk is known to be whole.
            let (prev, have) = self
                .streams
                .get(&csid)
                .map_or((Header::default(), None), |s| {
                    (s.header, s.partial.as_ref().map(|p| p.len()))
                });
            if fmt != 0 && !prev.has_header {
                return Err(ChunkError::NoPreviousHeader { csid, fmt });
            }
            let mh = &input[header_len..header_len + mh_len];
            let ts_field = if fmt < 3 {
                u32::from_be_bytes([0, mh[0], mh[1], mh[2]])
            } else {
                0
            };
            let extended = if fmt < 3 {
                ts_field == 0xFF_FFFF
            } else {
                prev.extended
            };
            let ext_len = if extended { 4 } else { 0 };
            if input.len() < header_len + mh_len + ext_len {
                return Ok(None);
            }
            let ext_ts = if extended {
                let e = &input[header_len + mh_len..header_len + mh_len + 4];
                u32::from_be_bytes([e[0], e[1], e[2], e[3]])
            } else {
                0
            };
            let ts_value = if extended { ext_ts } else { ts_field };
            let mut h = prev;
            let continuing = have.is_some();
            match fmt {
                0 => {
                    h.timestamp = ts_value;
                    h.delta = 0;
                    h.length = u32::from_be_bytes([0, mh[3], mh[4], mh[5]]);
                    h.type_id = mh[6];
                    h.stream_id = u32::from_le_bytes([mh[7], mh[8], mh[9], mh[10]]);
                }
                1 => {
                    h.delta = ts_value;
                    h.length = u32::from_be_bytes([0, mh[3], mh[4], mh[5]]);
                    h.type_id = mh[6];
                }
                2 => h.delta = ts_value,
                _ => {}
            }
            h.extended = extended;
            h.has_header = true;
            // A new header mid-message abandons the old partial (accounted for only
            // when this chunk is taken: until then nothing is consumed).
            let abandon = fmt < 3 && continuing;
            let abandoned = if abandon { have.unwrap_or(0) } else { 0 };
            let new_message = fmt < 3 || !continuing;
            if fmt != 0 && new_message {
                // A new message with a delta (or repeated) header: the timestamp advances.
                h.timestamp = h.timestamp.wrapping_add(h.delta);
            }
            if h.length > self.limits.max_message {
                return Err(ChunkError::MessageTooLarge {
                    len: h.length,
                    max: self.limits.max_message,
                });
            }
            let have = if abandon { 0 } else { have.unwrap_or(0) } as u32;
            // A shorter header on a continuation can say less than was already read.
            let want = h.length.saturating_sub(have).min(self.chunk_size) as usize;
            let total = header_len + mh_len + ext_len + want;
            if input.len() < total {
                return Ok(None);
            }
            let held = self.buffered - abandoned + want;
            if held > self.limits.max_buffered {
                return Err(ChunkError::TooMuchBuffered {
                    held,
                    max: self.limits.max_buffered,
                });
            }
            input.advance(header_len + mh_len + ext_len);
            let body = input.split_to(want);
            self.buffered = held;
            let st = self.streams.entry(csid).or_default();
            st.header = h;
            if abandon {
                st.partial = None;
            }
            let partial = st.partial.get_or_insert_with(BytesMut::new);
            partial.extend_from_slice(&body);
            if partial.len() as u32 >= h.length {
                let payload = st.partial.take().unwrap_or_default().freeze();
                self.buffered -= payload.len();
                return Ok(Some(Message {
                    csid,
                    timestamp: h.timestamp,
                    type_id: h.type_id,
                    stream_id: h.stream_id,
                    payload,
                }));
            }
        }
    }
}

/// (header length, chunk stream id, fmt) if the basic header is complete.
fn basic_header(input: &[u8]) -> Option<(usize, u32, u8)> {
    let b0 = *input.first()?;
    let fmt = b0 >> 6;
    match b0 & 0x3f {
        0 => Some((2, 64 + u32::from(*input.get(1)?), fmt)),
        1 => {
            let (b1, b2) = (*input.get(1)?, *input.get(2)?);
            Some((3, 64 + u32::from(b1) + 256 * u32::from(b2), fmt))
        }
        id => Some((1, u32::from(id), fmt)),
    }
}

/// Writes one message as chunks of `chunk_size`: a full (fmt 0) header, then fmt 3
/// continuations. Simple and always correct; header compression saves a few bytes.
pub fn encode(msg: &Message, chunk_size: usize, out: &mut Vec<u8>) {
    let put_basic = |out: &mut Vec<u8>, fmt: u8| {
        let csid = msg.csid;
        if csid < 64 {
            out.push((fmt << 6) | csid as u8);
        } else if csid < 320 {
            out.push(fmt << 6);
            out.push((csid - 64) as u8);
        } else {
            out.push((fmt << 6) | 1);
            let v = csid - 64;
            out.push((v & 0xff) as u8);
            out.push((v >> 8) as u8);
        }
    };
    let extended = msg.timestamp >= 0xFF_FFFF;
    put_basic(out, 0);
    let ts = if extended { 0xFF_FFFF } else { msg.timestamp };
    out.extend_from_slice(&ts.to_be_bytes()[1..]);
    out.extend_from_slice(&(msg.payload.len() as u32).to_be_bytes()[1..]);
    out.push(msg.type_id);
    out.extend_from_slice(&msg.stream_id.to_le_bytes());
    if extended {
        out.extend_from_slice(&msg.timestamp.to_be_bytes());
    }
    let mut rest = &msg.payload[..];
    let first = rest.len().min(chunk_size);
    out.extend_from_slice(&rest[..first]);
    rest = &rest[first..];
    while !rest.is_empty() {
        put_basic(out, 3);
        if extended {
            out.extend_from_slice(&msg.timestamp.to_be_bytes());
        }
        let n = rest.len().min(chunk_size);
        out.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(csid: u32, ts: u32, len: usize) -> Message {
        Message {
            csid,
            timestamp: ts,
            type_id: 9,
            stream_id: 1,
            payload: Bytes::from((0..len).map(|i| i as u8).collect::<Vec<_>>()),
        }
    }

    /// A 300-byte video message in 128-byte chunks with a 20-byte audio message (another
    /// chunk stream) between its first and second chunks: both come out intact. (rml_rtmp
    /// 0.8 panics on exactly these bytes; see the module's documentation.)
    #[test]
    fn interleaved_chunk_streams_each_keep_their_partial_message() {
        let video = msg(6, 0, 300);
        let audio = Message {
            csid: 4,
            timestamp: 0,
            type_id: 8,
            stream_id: 1,
            payload: Bytes::from(vec![0xaf; 20]),
        };
        let (mut v, mut a) = (Vec::new(), Vec::new());
        encode(&video, 128, &mut v);
        encode(&audio, 128, &mut a);
        // v: a 12-byte header and 128 bytes, then two 1-byte headers with 128 and 44.
        let mut wire = v[..12 + 128].to_vec();
        wire.extend_from_slice(&a);
        wire.extend_from_slice(&v[12 + 128..]);
        let mut dec = ChunkDecoder::new(Limits::default());
        let mut input = BytesMut::from(&wire[..]);
        let first = dec.decode(&mut input).unwrap().expect("the audio message");
        let second = dec.decode(&mut input).unwrap().expect("the video message");
        assert_eq!((first.csid, first.payload.clone()), (4, audio.payload));
        assert_eq!((second.csid, second.payload.clone()), (6, video.payload));
        assert!(dec.decode(&mut input).unwrap().is_none());
    }

    #[test]
    fn round_trip_in_any_split() {
        let msgs = [
            msg(6, 0, 300),
            msg(4, 40, 5),
            msg(400, 0x0100_0000, 1000),
            msg(70, 7, 0),
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            encode(m, 128, &mut wire);
        }
        for step in [1, 3, 7, 128, 5000] {
            let mut dec = ChunkDecoder::new(Limits::default());
            let mut input = BytesMut::new();
            let mut got = Vec::new();
            for piece in wire.chunks(step) {
                input.extend_from_slice(piece);
                while let Some(m) = dec.decode(&mut input).unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, msgs, "split {step}");
            assert!(input.is_empty());
        }
    }

    #[test]
    fn compressed_headers_accumulate_deltas() {
        // fmt 0 at ts 1000, then fmt 2 (delta 33) and two fmt 3 (same delta) messages of 2 bytes.
        let mut wire = vec![
            0x06, 0x00, 0x03, 0xe8, 0x00, 0x00, 0x02, 0x09, 1, 0, 0, 0, 0xaa, 0xbb,
        ];
        wire.extend_from_slice(&[0x86, 0x00, 0x00, 0x21, 0xcc, 0xdd]);
        wire.extend_from_slice(&[0xc6, 0xee, 0xff]);
        wire.extend_from_slice(&[0xc6, 0x11, 0x22]);
        let mut dec = ChunkDecoder::new(Limits::default());
        let mut input = BytesMut::from(&wire[..]);
        let mut ts = Vec::new();
        while let Some(m) = dec.decode(&mut input).unwrap() {
            ts.push(m.timestamp);
        }
        assert_eq!(ts, vec![1000, 1033, 1066, 1099]);
    }

    #[test]
    fn an_abandoned_partial_split_across_reads_is_accounted_once() {
        let mut dec = ChunkDecoder::new(Limits::default());
        // A 200-byte message started on chunk stream 4 (128 bytes arrive)…
        let mut input = BytesMut::from(&[0x04u8, 0, 0, 0, 0, 0, 200, 0x09, 1, 0, 0, 0][..]);
        input.extend_from_slice(&[0u8; 128]);
        assert_eq!(dec.decode(&mut input).unwrap(), None);
        // …then a new fmt 1 header on it whose body arrives in pieces.
        let mut wire = vec![0x44u8, 0, 0, 1, 0, 0, 10, 0x09];
        wire.extend_from_slice(&[7u8; 10]);
        let mut got = None;
        for b in wire {
            input.extend_from_slice(&[b]);
            if let Some(m) = dec.decode(&mut input).unwrap() {
                got = Some(m);
            }
        }
        assert_eq!(got.unwrap().payload.len(), 10);
        assert_eq!(dec.buffered, 0);
    }

    /// One 4 MiB message in 128-byte chunks (what a stranger may send before any
    /// login) costs its length in copies: the old decoder cloned the partial message
    /// for every chunk, 68 GB of copying for this input.
    #[test]
    fn a_large_message_in_small_chunks_decodes_in_linear_time() {
        let big = msg(6, 0, 4 << 20);
        let mut wire = Vec::new();
        encode(&big, 128, &mut wire);
        let mut dec = ChunkDecoder::new(Limits::default());
        let started = std::time::Instant::now();
        let mut input = BytesMut::new();
        let mut got = None;
        for piece in wire.chunks(4096) {
            input.extend_from_slice(piece);
            while let Some(m) = dec.decode(&mut input).unwrap() {
                got = Some(m);
            }
        }
        let took = started.elapsed();
        assert_eq!(got.unwrap().payload, big.payload);
        assert_eq!(dec.buffered, 0);
        // Linear decoding takes milliseconds even unoptimised; quadratic took minutes.
        assert!(took < std::time::Duration::from_secs(2), "took {took:?}");
    }

    #[test]
    fn hostile_input_is_refused() {
        let mut dec = ChunkDecoder::new(Limits::default());
        // fmt 3 with no previous header.
        let mut input = BytesMut::from(&[0xc5u8, 1, 2][..]);
        assert!(matches!(
            dec.decode(&mut input),
            Err(ChunkError::NoPreviousHeader { .. })
        ));
        // A 16 MB message.
        let mut input =
            BytesMut::from(&[0x06u8, 0, 0, 0, 0xff, 0xff, 0xff, 0x09, 1, 0, 0, 0, 0][..]);
        let mut dec = ChunkDecoder::new(Limits::default());
        assert!(matches!(
            dec.decode(&mut input),
            Err(ChunkError::MessageTooLarge { .. })
        ));
        // Many chunk streams each holding a partial message.
        let limits = Limits {
            max_streams: 4,
            ..Limits::default()
        };
        let mut dec = ChunkDecoder::new(limits);
        let mut input = BytesMut::new();
        for csid in 3..10u8 {
            input.extend_from_slice(&[csid, 0, 0, 0, 0, 1, 0, 0x09, 1, 0, 0, 0]);
            input.extend_from_slice(&[0u8; 128]);
        }
        let mut result = Ok(None);
        for _ in 0..10 {
            result = dec.decode(&mut input);
            if result.is_err() {
                break;
            }
        }
        assert!(matches!(result, Err(ChunkError::TooManyStreams(4))));
        assert!(dec.set_chunk_size(0).is_err());
    }
}
