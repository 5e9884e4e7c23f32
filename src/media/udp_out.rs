//! Datagrams out, several to one address in one system call where the kernel can.
//!
//! A subscriber is sent a video frame as several RTP packets of one size (the
//! packetizer's fragments) and a smaller last one. On loopback, and on a NIC, the
//! kernel's cost of a datagram is mostly per `sendto` (routing, the socket's buffer
//! accounting, the queueing discipline, the device): sending a run of equal datagrams as
//! one UDP GSO buffer (`UDP_SEGMENT`, Linux ≥ 4.18) pays it once and the kernel, or the
//! NIC, cuts the buffer into the same datagrams on the wire. `quinn-udp` does the
//! `sendmsg` with its control message, finds how many segments the kernel takes, and
//! falls back to one datagram per call where the device refuses GSO.
//!
//! [`runs`] is the pure part: which consecutive datagrams may leave together.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Instant;

use rtc::shared::{TaggedBytesMut, TransportProtocol};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::tcp;

/// The most bytes one GSO buffer carries (the kernel's limit is a 64 KiB IP packet).
const MAX_RUN_BYTES: usize = 60_000;

/// Consecutive datagrams that may be sent as one buffer: same destination, over UDP,
/// each the size of the first except the last, which may be smaller (what GSO cuts a
/// buffer into), at most `max_segments` of them and [`MAX_RUN_BYTES`] together.
/// A datagram that cannot join a run is a run of one. Linear in the input.
pub fn runs<'a>(
    outs: &'a [TaggedBytesMut],
    max_segments: usize,
) -> impl Iterator<Item = Range<usize>> + 'a {
    let max_segments = max_segments.max(1);
    let mut start = 0;
    std::iter::from_fn(move || {
        let first = outs.get(start)?;
        let size = first.message.len();
        let mut end = start + 1;
        let mut bytes = size;
        let joins = first.transport.transport_protocol == TransportProtocol::UDP && size > 0;
        while joins && end < outs.len() && end - start < max_segments {
            let next = &outs[end];
            let len = next.message.len();
            if next.transport.transport_protocol != TransportProtocol::UDP
                || next.transport.peer_addr != first.transport.peer_addr
                || len > size
                || len == 0
                || bytes + len > MAX_RUN_BYTES
            {
                break;
            }
            bytes += len;
            end += 1;
            if len < size {
                break; // a shorter one ends the run
            }
        }
        let run = start..end;
        start = end;
        Some(run)
    })
}

/// The sending half of a worker's UDP socket.
pub struct UdpOut {
    state: quinn_udp::UdpSocketState,
    /// A run's datagrams laid end to end.
    buf: Vec<u8>,
    /// Datagrams queued for one address (a subscriber's copies), and when the oldest
    /// of them was written.
    waiting: Vec<TaggedBytesMut>,
    held_since: Option<Instant>,
    /// System calls made and datagrams refused by `flush`.
    calls: prometheus::IntCounter,
    drops: prometheus::IntCounter,
}

impl UdpOut {
    /// Sets the socket up for GSO sends. `quinn-udp` also turns on UDP GRO, which
    /// would hand Weir's receive path (one datagram per `recv_from`, no control
    /// messages read) several peer datagrams glued together: it is turned off again.
    /// Its other options stay: `IP_PMTUDISC_PROBE` (DF on every datagram, as Linux's
    /// default for UDP already set, but never fragmented locally after an ICMP
    /// "fragmentation needed": WebRTC's datagrams stay under 1,300 bytes), and
    /// `IP_PKTINFO`/`SO_TIMESTAMPNS`, which only matter to reads that ask for them.
    pub fn new(
        socket: &UdpSocket,
        calls: prometheus::IntCounter,
        drops: prometheus::IntCounter,
    ) -> io::Result<Self> {
        let state = quinn_udp::UdpSocketState::new(socket.into())?;
        set_udp_gro(socket, false)?;
        Ok(Self {
            state,
            buf: Vec::with_capacity(MAX_RUN_BYTES),
            waiting: Vec::new(),
            held_since: None,
            calls,
            drops,
        })
    }

    /// Queues a datagram written at `written_at` for the next `flush`.
    pub fn queue(&mut self, out: TaggedBytesMut, written_at: Instant) {
        self.held_since.get_or_insert(written_at);
        self.waiting.push(out);
    }

    /// When the oldest queued datagram was written, if any is queued.
    pub fn held_since(&self) -> Option<Instant> {
        self.held_since
    }

    /// Sends what is queued, in runs, and counts the calls and the drops.
    pub fn flush(
        &mut self,
        socket: &UdpSocket,
        tcp_writers: &std::collections::HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    ) {
        if self.waiting.is_empty() {
            return;
        }
        let mut waiting = std::mem::take(&mut self.waiting);
        let (calls, dropped) = self.send(socket, tcp_writers, &mut waiting);
        self.waiting = waiting; // emptied, its allocation kept
        self.held_since = None;
        self.calls.inc_by(calls as u64);
        if dropped > 0 {
            self.drops.inc_by(dropped as u64);
        }
    }

    /// How many datagrams the kernel takes in one GSO send (1: no GSO).
    pub fn max_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Sends `outs` in order (UDP in runs, ICE-TCP through the connection's writer)
    /// and empties it. Returns how many system calls that took and how many
    /// datagrams were dropped (a full socket buffer or writer queue drops, as the
    /// network would).
    pub fn send(
        &mut self,
        socket: &UdpSocket,
        tcp_writers: &std::collections::HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
        outs: &mut Vec<TaggedBytesMut>,
    ) -> (usize, usize) {
        let (mut calls, mut dropped) = (0, 0);
        for run in runs(outs, self.state.max_gso_segments()) {
            let first = &outs[run.start];
            let to = first.transport.peer_addr;
            if first.transport.transport_protocol == TransportProtocol::TCP {
                if let Some(w) = tcp_writers.get(&to) {
                    if w.try_send(tcp::frame(&first.message)).is_err() {
                        dropped += 1;
                    }
                } else {
                    dropped += 1;
                }
                continue;
            }
            calls += 1;
            let sent = if run.len() == 1 {
                socket.try_send_to(&first.message, to).map(|_| ())
            } else {
                self.buf.clear();
                for o in &outs[run.clone()] {
                    self.buf.extend_from_slice(&o.message);
                }
                let transmit = quinn_udp::Transmit {
                    destination: to,
                    ecn: None,
                    contents: &self.buf,
                    segment_size: Some(first.message.len()),
                    src_ip: None,
                };
                let state = &self.state;
                socket.try_io(Interest::WRITABLE, || {
                    state.try_send(socket.into(), &transmit)
                })
            };
            if sent.is_err() {
                dropped += run.len();
            }
        }
        outs.clear();
        (calls, dropped)
    }
}

/// `UDP_GRO` on or off for the socket.
fn set_udp_gro(socket: &UdpSocket, on: bool) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let value: libc::c_int = on.into();
        // SAFETY: a valid socket descriptor, and a pointer to a c_int with its size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_GRO,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            // A kernel without UDP GRO never glues datagrams either.
            if e.raw_os_error() != Some(libc::ENOPROTOOPT) {
                return Err(e);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (socket, on);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use rtc::shared::TransportContext;
    use std::time::Duration;

    fn udp_out(socket: &UdpSocket) -> UdpOut {
        let counter = || prometheus::IntCounter::new("c", "c").unwrap();
        UdpOut::new(socket, counter(), counter()).unwrap()
    }

    fn out(to: SocketAddr, len: usize, fill: u8) -> TaggedBytesMut {
        TaggedBytesMut {
            now: Instant::now(),
            transport: TransportContext {
                peer_addr: to,
                transport_protocol: TransportProtocol::UDP,
                ..Default::default()
            },
            message: BytesMut::from(&vec![fill; len][..]),
        }
    }

    fn ranges(outs: &[TaggedBytesMut], max: usize) -> Vec<Range<usize>> {
        runs(outs, max).collect()
    }

    #[test]
    fn equal_datagrams_to_one_address_run_together_and_a_shorter_one_ends_the_run() {
        let a: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        let outs = vec![
            out(a, 100, 0), // a small first packet (an SEI) is a run of its own
            out(a, 1100, 1),
            out(a, 1100, 2),
            out(a, 1100, 3),
            out(a, 700, 4), // the frame's last fragment ends the run
            out(a, 1100, 5),
            out(b, 1100, 6), // another address
            out(b, 1200, 7), // larger than the run's size
        ];
        assert_eq!(ranges(&outs, 64), vec![0..1, 1..5, 5..6, 6..7, 7..8]);
        // The kernel's segment limit, and no GSO at all.
        assert_eq!(ranges(&outs, 2), vec![0..1, 1..3, 3..5, 5..6, 6..7, 7..8]);
        assert_eq!(ranges(&outs, 1).len(), outs.len());
        assert!(ranges(&[], 64).is_empty());
    }

    #[test]
    fn a_run_stays_under_the_size_of_one_ip_packet_and_tcp_never_joins() {
        let a: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let outs: Vec<_> = (0..64).map(|i| out(a, 1200, i as u8)).collect();
        let rs = ranges(&outs, 64);
        assert!(rs.iter().all(|r| r.len() * 1200 <= MAX_RUN_BYTES), "{rs:?}");
        assert_eq!(rs.iter().map(|r| r.len()).sum::<usize>(), 64);
        let mut tcp: Vec<_> = (0..3).map(|i| out(a, 1200, i)).collect();
        for o in &mut tcp {
            o.transport.transport_protocol = TransportProtocol::TCP;
        }
        assert_eq!(ranges(&tcp, 64), vec![0..1, 1..2, 2..3]);
    }

    async fn recv_all(rx: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65_536];
        while got.len() < n {
            let len = tokio::time::timeout(Duration::from_secs(2), rx.recv(&mut buf))
                .await
                .expect("datagram")
                .unwrap();
            got.push(buf[..len].to_vec());
        }
        got
    }

    #[tokio::test]
    async fn a_run_arrives_as_the_datagrams_it_was_made_of_in_order() {
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = rx.local_addr().unwrap();
        let mut udp = udp_out(&tx);
        tx.writable().await.unwrap(); // tokio sends only once it has seen readiness
        let sizes = [100, 1100, 1100, 1100, 700, 1100, 1100];
        let mut outs: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| out(to, n, i as u8))
            .collect();
        let (calls, dropped) = udp.send(&tx, &Default::default(), &mut outs);
        assert!(outs.is_empty());
        assert_eq!(dropped, 0);
        if udp.max_segments() > 1 {
            assert_eq!(calls, 3, "100 | 1100×3 + 700 | 1100×2");
        } else {
            assert_eq!(calls, sizes.len());
        }
        let got = recv_all(&rx, sizes.len()).await;
        for (i, (d, &n)) in got.iter().zip(&sizes).enumerate() {
            assert_eq!(d.len(), n, "datagram {i}");
            assert!(d.iter().all(|&b| b == i as u8), "datagram {i}'s bytes");
        }
    }

    #[tokio::test]
    async fn the_socket_still_reads_a_gso_sender_one_datagram_at_a_time() {
        // Weir's own socket, set up for GSO sends, must not turn GRO on for its
        // reads: a peer's (here another Weir's) run would arrive glued together.
        let weir = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let _udp = udp_out(&weir);
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut peer_out = udp_out(&peer);
        peer.writable().await.unwrap();
        let to = weir.local_addr().unwrap();
        let mut outs: Vec<_> = (0..4).map(|i| out(to, 1000, i)).collect();
        assert_eq!(peer_out.send(&peer, &Default::default(), &mut outs).1, 0);
        let got = recv_all(&weir, 4).await;
        assert!(
            got.iter().all(|d| d.len() == 1000),
            "{:?}",
            got.iter().map(Vec::len).collect::<Vec<_>>()
        );
    }
}
