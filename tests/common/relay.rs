//! A UDP relay between a WebRTC client and the server that can drop packets on the way
//! down, so loss is real for the client's NACK machinery, with no root and no tc.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;

/// Decides, per datagram going to the client, whether it is lost.
pub type DropFn = Box<dyn FnMut(&[u8]) -> bool + Send>;

pub struct Relay {
    /// Where the client should send (put this in place of the server's candidate).
    pub addr: SocketAddr,
    pub dropped: Arc<AtomicU64>,
    /// Set to cut the link in both directions (a peer that went silent).
    pub cut: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Relay {
    pub async fn start(server: SocketAddr, drop_down: DropFn) -> Self {
        Self::start_with(server, drop_down, Box::new(|_| false)).await
    }

    /// Drops on both ways: `drop_up` decides for datagrams from the client.
    pub async fn start_with(
        server: SocketAddr,
        mut drop_down: DropFn,
        mut drop_up: DropFn,
    ) -> Self {
        let client_side = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let server_side = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = client_side.local_addr().unwrap();
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let dropped = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let up = {
            let (c, s, client, cut, dropped) = (
                client_side.clone(),
                server_side.clone(),
                client.clone(),
                cut.clone(),
                dropped.clone(),
            );
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                while let Ok((n, from)) = c.recv_from(&mut buf).await {
                    if cut.load(Ordering::Relaxed) {
                        continue;
                    }
                    if drop_up(&buf[..n]) {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    *client.lock().unwrap() = Some(from);
                    let _ = s.send_to(&buf[..n], server).await;
                }
            })
        };
        let down = {
            let (c, s, client, dropped, cut) = (
                client_side,
                server_side,
                client,
                dropped.clone(),
                cut.clone(),
            );
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                while let Ok((n, _)) = s.recv_from(&mut buf).await {
                    if cut.load(Ordering::Relaxed) || drop_down(&buf[..n]) {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let to = *client.lock().unwrap();
                    if let Some(to) = to {
                        let _ = c.send_to(&buf[..n], to).await;
                    }
                }
            })
        };
        Self {
            addr,
            dropped,
            cut,
            tasks: vec![up, down],
        }
    }
}

/// RTP (not RTCP) packet's payload type, from the clear SRTP header.
pub fn rtp_payload_type(d: &[u8]) -> Option<u8> {
    if d.len() < 12 || !(128..192).contains(&d[0]) {
        return None;
    }
    let pt = d[1] & 0x7f;
    (!(72..=79).contains(&pt)).then_some(pt)
}

/// Points every host candidate of `sdp` at the relay instead of `server_port`.
pub fn via_relay(sdp: &str, server_port: u16, relay: SocketAddr) -> String {
    sdp.replace(
        &format!(" 127.0.0.1 {server_port} typ host"),
        &format!(" 127.0.0.1 {} typ host", relay.port()),
    )
}

/// The payload types of the video media codecs (not RTX) in an SDP.
pub fn video_media_payload_types(sdp: &str) -> Vec<u8> {
    let mut in_video = false;
    let mut out = Vec::new();
    for line in sdp.lines() {
        if line.starts_with("m=") {
            in_video = line.starts_with("m=video");
        } else if in_video {
            if let Some(rest) = line.strip_prefix("a=rtpmap:") {
                let mut parts = rest.split_whitespace();
                let pt = parts.next().and_then(|p| p.parse().ok());
                let name = parts.next().unwrap_or("");
                if let Some(pt) = pt {
                    if !name.to_ascii_lowercase().starts_with("rtx/") {
                        out.push(pt);
                    }
                }
            }
        }
    }
    out
}

/// A bottleneck between a client and the server, on the way down (server → client):
/// a rate limit with a FIFO queue of bounded delay (tail drop past it, as a router's
/// buffer), a fixed extra delay and random loss. The rate can be changed while it runs
/// (`rate_bps`, 0 = unlimited), so a test can cap a link and lift the cap. Upstream
/// datagrams pass unchanged. No root, no tc: everything is on loopback.
pub struct ShapedRelay {
    pub addr: SocketAddr,
    pub rate_bps: Arc<AtomicU64>,
    /// Per 250 ms bucket since start: (bytes offered, bytes delivered, datagrams dropped).
    pub buckets: Arc<Mutex<Vec<(u64, u64, u64)>>>,
    pub started: std::time::Instant,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for ShapedRelay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub const BUCKET: std::time::Duration = std::time::Duration::from_millis(250);

impl ShapedRelay {
    /// `queue`: the most a datagram may wait for the link; `loss`: 0..1; `seed` makes
    /// the loss pattern repeatable.
    pub async fn start(
        server: SocketAddr,
        rate_bps: u64,
        queue: std::time::Duration,
        delay: std::time::Duration,
        loss: f64,
        seed: u64,
    ) -> Self {
        let client_side = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let server_side = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = client_side.local_addr().unwrap();
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let rate = Arc::new(AtomicU64::new(rate_bps));
        let buckets: Arc<Mutex<Vec<(u64, u64, u64)>>> = Arc::default();
        let started = std::time::Instant::now();
        let up = {
            let (c, s, client) = (client_side.clone(), server_side.clone(), client.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                while let Ok((n, from)) = c.recv_from(&mut buf).await {
                    *client.lock().unwrap() = Some(from);
                    let _ = s.send_to(&buf[..n], server).await;
                }
            })
        };
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        let down = {
            let (s, rate, buckets) = (server_side, rate.clone(), buckets.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                let mut link_free = tokio::time::Instant::now();
                let mut rng = seed | 1;
                while let Ok((n, _)) = s.recv_from(&mut buf).await {
                    let now = tokio::time::Instant::now();
                    let bucket = (started.elapsed().as_millis() / BUCKET.as_millis()) as usize;
                    let account = |i: usize, v: u64| {
                        let mut b = buckets.lock().unwrap();
                        if b.len() <= bucket {
                            b.resize(bucket + 1, (0, 0, 0));
                        }
                        match i {
                            0 => b[bucket].0 += v,
                            1 => b[bucket].1 += v,
                            _ => b[bucket].2 += v,
                        }
                    };
                    account(0, n as u64);
                    if std::env::var("WEIR_RELAY_DEBUG").is_ok() && n > 12 && buf[0] >> 6 == 2 {
                        let pt = buf[1] & 0x7f;
                        let ssrc = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
                        let seq = u16::from_be_bytes([buf[2], buf[3]]);
                        eprintln!(
                            "RELAY {:.3} pt={pt} ssrc={ssrc} seq={seq} len={n}",
                            started.elapsed().as_secs_f64()
                        );
                    }
                    // xorshift64: repeatable loss.
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    if (rng % 1_000_000) as f64 / 1_000_000.0 < loss {
                        account(2, 1);
                        continue;
                    }
                    let r = rate.load(Ordering::Relaxed);
                    let departs = if r == 0 {
                        now
                    } else {
                        let start = link_free.max(now);
                        if start.duration_since(now) > queue {
                            account(2, 1);
                            continue; // the buffer is full
                        }
                        link_free =
                            start + std::time::Duration::from_secs_f64(n as f64 * 8.0 / r as f64);
                        link_free
                    };
                    account(1, n as u64);
                    let _ = tx.send((departs + delay, buf[..n].to_vec()));
                }
            })
        };
        let deliver = {
            let (c, client) = (client_side, client);
            tokio::spawn(async move {
                while let Some((at, data)) = rx.recv().await {
                    tokio::time::sleep_until(at).await;
                    let to = *client.lock().unwrap();
                    if let Some(to) = to {
                        let _ = c.send_to(&data, to).await;
                    }
                }
            })
        };
        Self {
            addr,
            rate_bps: rate,
            buckets,
            started,
            tasks: vec![up, down, deliver],
        }
    }
}
