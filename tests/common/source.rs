//! A live source for the glass-to-glass benches, and an RTMP pusher for it.
//!
//! "Glass" is the moment a raw frame or a block of PCM is handed to its encoder: the
//! source makes every raw video frame (640×360, 30 fps, its index drawn as 16 blocks
//! along the top) and every 10 ms of PCM (48 kHz stereo: silence, with a 1 kHz beep of
//! 60 ms at the start of every second, written in the same instant as frame 30·k) and
//! notes the wall-clock time of each write. Two ffmpeg processes encode them, as a
//! phone's two encoders do — x264 ultrafast/zerolatency (1 s GOP, no B-frames, 1 Mbit/s)
//! and AAC-LC — each into FLV on its stdout. The pusher sends each tag the moment its
//! encoder emits it, so neither kind waits for the other (one ffmpeg muxing both would
//! hold every video frame until audio of a later timestamp exists: ~70 ms, see
//! BENCHMARKS.md's bridge section). For a WebRTC publisher the audio goes instead to
//! libopus in-process, as a browser's or a native app's does: 20 ms packets, each
//! encoded when the second of its two 10 ms blocks is handed over.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use weir::rtmp::amf0::{self, Amf0};
use weir::rtmp::chunk::{self, ChunkDecoder, Limits, Message};

pub const W: usize = 640;
pub const H: usize = 360;
pub const FPS: u64 = 30;
pub const BITS: usize = 16;
pub const BLOCK: usize = 32;
pub const RATE: u32 = 48_000;
/// PCM written per write: 10 ms.
pub const CHUNK: usize = 480;
pub const BEEP_MS: usize = 60;

pub fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

/// A yuv420p frame: moving texture below, the frame index in blocks along the top.
pub fn frame(n: usize) -> Vec<u8> {
    let mut f = vec![128u8; W * H * 3 / 2];
    for y in BLOCK..H {
        for x in 0..W {
            f[y * W + x] = ((x + 3 * n) ^ (y + n)) as u8 & 0xf0 | 0x10;
        }
    }
    for b in 0..BITS {
        let v = if (n >> b) & 1 == 1 { 235 } else { 16 };
        for y in 0..BLOCK {
            for x in b * BLOCK..(b + 1) * BLOCK {
                f[y * W + x] = v;
            }
        }
    }
    f
}

/// Reads the index back from a decoded luma plane (W×H, 8 bits).
pub fn read_index(gray: &[u8]) -> usize {
    let mut n = 0;
    for b in 0..BITS {
        let mut sum = 0u32;
        for y in 8..24 {
            for x in b * BLOCK + 8..b * BLOCK + 24 {
                sum += u32::from(gray[y * W + x]);
            }
        }
        if sum / 256 > 128 {
            n |= 1 << b;
        }
    }
    n
}

/// Stereo s16le PCM for samples `from..from + CHUNK`: the beep at every second.
pub fn pcm(from: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(CHUNK * 4);
    for s in from..from + CHUNK as u64 {
        let in_second = s % u64::from(RATE);
        let v = if in_second < (RATE as u64 * BEEP_MS as u64 / 1000) {
            let phase = in_second as f64 * 2.0 * std::f64::consts::PI * 1000.0 / f64::from(RATE);
            (phase.sin() * 16_000.0) as i16
        } else {
            0
        };
        out.extend_from_slice(&v.to_le_bytes());
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// When each frame and each beep was handed to its encoder (wall clock, ms).
#[derive(Default, Debug, Clone)]
pub struct Stamps {
    pub frames: Vec<f64>,
    pub beeps: Vec<f64>,
}

impl Stamps {
    /// Glass-to-glass of a frame seen at `at` (wall ms), if the index is one we wrote
    /// and the span is plausible (a misread index gives an absurd one).
    pub fn frame_latency(&self, n: usize, at: f64) -> Option<f64> {
        let sent = *self.frames.get(n)?;
        let d = at - sent;
        (-5.0..3000.0).contains(&d).then_some(d)
    }

    /// The beep heard at `at`: (its index, glass-to-glass), if one was written in the
    /// second before.
    pub fn beep_latency(&self, at: f64) -> Option<(usize, f64)> {
        let k = self.beeps.iter().rposition(|&b| b <= at)?;
        let d = at - self.beeps[k];
        (d < 1000.0).then_some((k, d))
    }
}

/// One FLV tag as an encoder emitted it.
#[derive(Debug, Clone)]
pub struct Tag {
    pub type_id: u8,
    pub timestamp: u32,
    pub data: Bytes,
}

/// The audio encoder of a [`Source`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audio {
    Off,
    /// ffmpeg's AAC-LC, as FLV tags among the video's (an RTMP pusher).
    Aac,
    /// libopus, 20 ms stereo packets on [`Source::opus`] (a WebRTC publisher).
    Opus,
}

/// One Opus packet: its first sample's index (its RTP timestamp at 48 kHz) and payload.
#[derive(Debug, Clone)]
pub struct OpusPacket {
    pub sample: u64,
    pub data: Bytes,
}

pub struct Source {
    pub stamps: Arc<Mutex<Stamps>>,
    /// The encoders' FLV tags: video, and audio with [`Audio::Aac`].
    pub tags: mpsc::UnboundedReceiver<Tag>,
    /// The Opus packets with [`Audio::Opus`], each sent the moment it is encoded.
    pub opus: mpsc::UnboundedReceiver<OpusPacket>,
    children: Vec<Child>,
}

impl Drop for Source {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn read_flv(mut out: impl Read + Send + 'static, tx: mpsc::UnboundedSender<Tag>) {
    std::thread::spawn(move || {
        let mut header = [0u8; 13];
        if out.read_exact(&mut header).is_err() {
            return;
        }
        loop {
            let mut h = [0u8; 11];
            if out.read_exact(&mut h).is_err() {
                return;
            }
            let size = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
            let ts = u32::from_be_bytes([h[7], h[4], h[5], h[6]]);
            let mut data = vec![0u8; size + 4];
            if out.read_exact(&mut data).is_err() {
                return;
            }
            data.truncate(size);
            if (h[0] == 8 || h[0] == 9)
                && tx
                    .send(Tag {
                        type_id: h[0],
                        timestamp: ts,
                        data: data.into(),
                    })
                    .is_err()
            {
                return;
            }
        }
    });
}

impl Source {
    /// Starts the writers and encoders for `seconds`, audio encoded as `audio` says.
    pub fn start(seconds: u64, audio: Audio) -> Self {
        let size = format!("{W}x{H}");
        let mut video = Command::new("ffmpeg")
            .args(["-hide_banner", "-v", "error"])
            .args(["-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", &size])
            .args(["-framerate", "30", "-i", "pipe:0"])
            .args([
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
                "-tune",
                "zerolatency",
            ])
            .args([
                "-bf", "0", "-g", "30", "-b:v", "1M", "-maxrate", "1M", "-bufsize", "1M",
            ])
            .args(["-flush_packets", "1", "-f", "flv", "pipe:1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("ffmpeg runs (scripts/install-deps.sh test installs it)");
        let (tx, tags) = mpsc::unbounded_channel();
        read_flv(video.stdout.take().unwrap(), tx.clone());
        let mut video_in = video.stdin.take().unwrap();
        let mut children = vec![video];
        let mut audio_in = None;
        if audio == Audio::Aac {
            let mut a = Command::new("ffmpeg")
                .args(["-hide_banner", "-v", "error"])
                .args(["-f", "s16le", "-ar", "48000", "-ac", "2", "-i", "pipe:0"])
                .args(["-c:a", "aac", "-b:a", "128k"])
                .args(["-flush_packets", "1", "-f", "flv", "pipe:1"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("ffmpeg runs");
            read_flv(a.stdout.take().unwrap(), tx);
            audio_in = a.stdin.take();
            children.push(a);
        }
        let stamps: Arc<Mutex<Stamps>> = Arc::default();
        let start = Instant::now() + Duration::from_millis(100);
        let frames = (seconds * FPS) as usize;
        {
            let stamps = stamps.clone();
            std::thread::spawn(move || {
                for n in 0..frames {
                    let due = start + Duration::from_micros(n as u64 * 1_000_000 / FPS);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let f = frame(n);
                    stamps.lock().unwrap().frames.push(wall_ms());
                    if video_in.write_all(&f).is_err() {
                        break;
                    }
                }
            });
        }
        let (opus_tx, opus) = mpsc::unbounded_channel();
        if audio != Audio::Off {
            let stamps = stamps.clone();
            std::thread::spawn(move || {
                let mut enc = (audio == Audio::Opus).then(|| {
                    opus::Encoder::new(RATE, opus::Channels::Stereo, opus::Application::Audio)
                        .unwrap()
                });
                let mut block: Vec<i16> = Vec::with_capacity(CHUNK * 4);
                let mut out = vec![0u8; 1500];
                let chunks = seconds * 100;
                for m in 0..chunks {
                    let due = start + Duration::from_millis(m * 10);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let data = pcm(m * CHUNK as u64);
                    if m % 100 == 0 {
                        stamps.lock().unwrap().beeps.push(wall_ms());
                    }
                    let sent = match (&mut audio_in, &mut enc) {
                        (Some(ffmpeg), _) => ffmpeg.write_all(&data).is_ok(),
                        (None, Some(enc)) => {
                            block.extend(
                                data.chunks_exact(2)
                                    .map(|b| i16::from_le_bytes([b[0], b[1]])),
                            );
                            if block.len() < CHUNK * 4 {
                                continue;
                            }
                            let n = enc.encode(&block, &mut out).unwrap();
                            block.clear();
                            let packet = OpusPacket {
                                sample: (m - 1) * CHUNK as u64,
                                data: Bytes::copy_from_slice(&out[..n]),
                            };
                            opus_tx.send(packet).is_ok()
                        }
                        (None, None) => unreachable!("an audio encoder"),
                    };
                    if !sent {
                        break;
                    }
                }
            });
        }
        Self {
            stamps,
            tags,
            opus,
            children,
        }
    }
}

/// A minimal RTMP publisher: handshake, connect, createStream, publish, then FLV tags
/// as chunked messages, Nagle off, each tag written the moment it is given.
pub struct RtmpPusher {
    write: tokio::net::tcp::OwnedWriteHalf,
    /// Reads (and drops) what the server sends, for the life of the connection.
    reader: Option<tokio::task::JoinHandle<()>>,
    stream_id: u32,
    buf: Vec<u8>,
}

const CHUNK_SIZE: usize = 4096;

async fn read_message(
    read: &mut tokio::net::tcp::OwnedReadHalf,
    decoder: &mut ChunkDecoder,
    input: &mut BytesMut,
) -> Message {
    loop {
        if let Some(m) = decoder.decode(input).expect("server's chunks decode") {
            if m.type_id == 1 {
                let size = u32::from_be_bytes(m.payload[..4].try_into().unwrap());
                decoder.set_chunk_size(size).unwrap();
                continue;
            }
            return m;
        }
        let mut b = [0u8; 8192];
        let n = read.read(&mut b).await.expect("rtmp read");
        assert!(
            n > 0,
            "server closed the RTMP connection during publish setup"
        );
        input.extend_from_slice(&b[..n]);
    }
}

/// Waits for the command reply or status named `what`; panics with the server's
/// description on an error status.
async fn wait_for(
    read: &mut tokio::net::tcp::OwnedReadHalf,
    decoder: &mut ChunkDecoder,
    input: &mut BytesMut,
    what: &str,
) -> Vec<Amf0> {
    loop {
        let m = read_message(read, decoder, input).await;
        if m.type_id != 20 {
            continue;
        }
        let values = amf0::decode_all(&m.payload).unwrap();
        let name = values.first().and_then(Amf0::as_str).unwrap_or("");
        if name == "_error" {
            panic!("RTMP refused: {values:?}");
        }
        if name == "onStatus" {
            let code = values
                .get(3)
                .and_then(|o| o.get("code"))
                .and_then(Amf0::as_str)
                .unwrap_or("");
            if code.contains("Error") || code.contains("Failed") || code.contains("BadName") {
                panic!("RTMP refused: {values:?}");
            }
            if code == what {
                return values;
            }
        }
        if name == what {
            return values;
        }
    }
}

impl RtmpPusher {
    /// `name` is the publish name with its query (credentials).
    pub async fn publish(addr: std::net::SocketAddr, app: &str, name: &str) -> Self {
        let tcp = TcpStream::connect(addr).await.expect("rtmp connect");
        tcp.set_nodelay(true).unwrap();
        let (mut read, mut write) = tcp.into_split();
        let mut c1 = vec![0u8; 1537];
        c1[0] = 3;
        for (i, b) in c1[9..].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        write.write_all(&c1).await.unwrap();
        let mut s = vec![0u8; 1 + 1536 * 2];
        read.read_exact(&mut s).await.expect("S0 S1 S2");
        write.write_all(&s[1..1537]).await.unwrap(); // C2 echoes S1
        let mut p = Self {
            write,
            reader: None,
            stream_id: 0,
            buf: Vec::new(),
        };
        p.send_raw(2, 1, 0, 0, (CHUNK_SIZE as u32).to_be_bytes().to_vec())
            .await;
        let tc_url = format!("rtmp://{addr}/{app}");
        p.command(
            0,
            &[
                amf0::string("connect"),
                Amf0::Number(1.0),
                amf0::object(&[
                    ("app", amf0::string(app)),
                    ("type", amf0::string("nonprivate")),
                    ("tcUrl", amf0::string(&tc_url)),
                ]),
            ],
        )
        .await;
        let mut decoder = ChunkDecoder::new(Limits::default());
        let mut input = BytesMut::new();
        wait_for(&mut read, &mut decoder, &mut input, "_result").await;
        p.command(
            0,
            &[amf0::string("createStream"), Amf0::Number(2.0), Amf0::Null],
        )
        .await;
        let reply = wait_for(&mut read, &mut decoder, &mut input, "_result").await;
        p.stream_id = reply.get(3).and_then(Amf0::as_number).unwrap_or(1.0) as u32;
        let sid = p.stream_id;
        p.command(
            sid,
            &[
                amf0::string("publish"),
                Amf0::Number(3.0),
                Amf0::Null,
                amf0::string(name),
                amf0::string("live"),
            ],
        )
        .await;
        wait_for(
            &mut read,
            &mut decoder,
            &mut input,
            "NetStream.Publish.Start",
        )
        .await;
        // Keep reading (acknowledgements, pings) so the server never blocks on us.
        p.reader = Some(tokio::spawn(async move {
            let mut b = [0u8; 4096];
            while matches!(read.read(&mut b).await, Ok(n) if n > 0) {}
        }));
        p
    }

    /// A network failure in the middle of a message: writes the first half of `tag`'s
    /// chunks, then resets the connection (RST, as a phone's dying uplink or a NAT
    /// timeout looks to the server), without a close or an unpublish.
    pub async fn reset_in_the_middle_of(mut self, tag: &Tag) {
        let csid = if tag.type_id == 8 { 4 } else { 6 };
        self.buf.clear();
        chunk::encode(
            &Message {
                csid,
                timestamp: tag.timestamp,
                type_id: tag.type_id,
                stream_id: self.stream_id,
                payload: tag.data.clone(),
            },
            CHUNK_SIZE,
            &mut self.buf,
        );
        let half = self.buf.len() / 2;
        self.write
            .write_all(&self.buf[..half])
            .await
            .expect("rtmp write");
        socket2::SockRef::from(self.write.as_ref())
            .set_linger(Some(Duration::ZERO))
            .expect("SO_LINGER 0");
        if let Some(r) = self.reader.take() {
            r.abort();
            let _ = r.await;
        }
        // The last handle: closing with a zero linger sends RST, not FIN.
        self.write.forget();
    }

    async fn command(&mut self, stream_id: u32, values: &[Amf0]) {
        self.send_raw(3, 20, 0, stream_id, amf0::encode_all(values))
            .await;
    }

    async fn send_raw(
        &mut self,
        csid: u32,
        type_id: u8,
        ts: u32,
        stream_id: u32,
        payload: Vec<u8>,
    ) {
        self.buf.clear();
        chunk::encode(
            &Message {
                csid,
                timestamp: ts,
                type_id,
                stream_id,
                payload: payload.into(),
            },
            if type_id == 1 { 128 } else { CHUNK_SIZE },
            &mut self.buf,
        );
        self.write.write_all(&self.buf).await.expect("rtmp write");
    }

    pub async fn send(&mut self, tag: &Tag) {
        let csid = if tag.type_id == 8 { 4 } else { 6 };
        self.buf.clear();
        chunk::encode(
            &Message {
                csid,
                timestamp: tag.timestamp,
                type_id: tag.type_id,
                stream_id: self.stream_id,
                payload: tag.data.clone(),
            },
            CHUNK_SIZE,
            &mut self.buf,
        );
        self.write.write_all(&self.buf).await.expect("rtmp write");
    }
}

/// ffmpeg pushing H.264 (x264 zerolatency, 1 s GOP, no B-frames) and AAC from its
/// test sources to an RTMP `url` for `seconds`, in real time.
pub fn ffmpeg_push(url: &str, seconds: u32) -> tokio::process::Child {
    tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-v", "error", "-re"])
        .args(["-f", "lavfi", "-i", "testsrc=size=320x240:rate=30"])
        .args(["-f", "lavfi", "-i", "sine=frequency=1000:sample_rate=44100"])
        .args(["-t", &seconds.to_string()])
        .args([
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-preset",
            "ultrafast",
        ])
        .args(["-tune", "zerolatency", "-bf", "0", "-g", "30"])
        .args(["-c:a", "aac", "-ar", "44100", "-ac", "2"])
        .args(["-f", "flv", url])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("ffmpeg runs (scripts/install-deps.sh test installs it)")
}
