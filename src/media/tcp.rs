//! ICE over TCP (RFC 6544, passive candidates) with RFC 4571 framing, for networks
//! that block UDP. Each accepted connection gets a reader task (frames in, to the media
//! task) and a writer task (frames out, from a bounded queue); the media task treats a
//! frame like a datagram from that connection's address.

use std::net::SocketAddr;

use rtc::shared::tcp_framing::{frame_packet, TcpFrameDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::debug;

/// Frames queued for one TCP peer before further ones are dropped (as UDP would).
const WRITE_QUEUE: usize = 512;
/// At most this many bytes may wait in a connection's decoder (one maximal frame).
const MAX_BUFFERED: usize = 2 + 65_535;
/// A connection that carries no frame for this long is closed: a live one carries
/// consent checks every few seconds, and ICE gives up on it well before.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug)]
pub enum TcpEvent {
    Opened {
        from: SocketAddr,
        writer: mpsc::Sender<Vec<u8>>,
    },
    Frame {
        from: SocketAddr,
        data: Vec<u8>,
    },
    Closed {
        from: SocketAddr,
    },
}

/// Accepts connections (within `limit`, in total and per client) until the media
/// task goes away.
pub async fn accept(
    listener: TcpListener,
    limit: std::sync::Arc<crate::limits::Connections>,
    events: mpsc::Sender<TcpEvent>,
) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, say: back off instead of spinning on the error.
                debug!(error = %e, "ICE-TCP accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match limit.admit(from.ip()) {
            Ok(p) => p,
            Err(why) => {
                debug!(%from, why, "ICE-TCP connection over the limit; closed");
                continue;
            }
        };
        debug!(%from, "ICE-TCP connection");
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
        if events
            .send(TcpEvent::Opened { from, writer: tx })
            .await
            .is_err()
        {
            return;
        }
        tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                if wr.write_all(&frame).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        let events = events.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut decoder = TcpFrameDecoder::new();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match tokio::time::timeout(IDLE_TIMEOUT, rd.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Err(_) => {
                        debug!(%from, "ICE-TCP connection idle; closed");
                        break;
                    }
                    Ok(Ok(n)) => n,
                };
                decoder.extend_from_slice(&buf[..n]);
                while let Some(data) = decoder.next_packet() {
                    if events.send(TcpEvent::Frame { from, data }).await.is_err() {
                        return;
                    }
                }
                if decoder.buffered_len() > MAX_BUFFERED {
                    break; // cannot happen with valid framing
                }
            }
            let _ = events.send(TcpEvent::Closed { from }).await;
        });
    }
}

/// RFC 4571 framing of one packet.
pub fn frame(packet: &[u8]) -> Vec<u8> {
    frame_packet(packet)
}
