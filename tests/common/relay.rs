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
