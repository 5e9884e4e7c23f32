//! A receive-only member for congestion tests: joins, answers every subscriber offer
//! (through a relay if given), and records its signaling messages and packets.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weir_signaling::{ClientMessage, CongestionLevel, ServerMessage, Target};

use super::peer::RtcPeer;
use super::relay::via_relay;
use super::{Client, TestServer};

pub type Events = Arc<Mutex<Vec<(Instant, ServerMessage)>>>;

/// A receive-only member: answers every subscriber offer (through `relay` if given)
/// and records the signaling messages it gets.
pub struct Watcher {
    pub peer: Arc<tokio::sync::Mutex<Option<RtcPeer>>>,
    pub events: Events,
    outbox: tokio::sync::mpsc::UnboundedSender<ClientMessage>,
    _task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    pub async fn join(
        t: &TestServer,
        user: &str,
        room: u32,
        relay: Option<std::net::SocketAddr>,
    ) -> Self {
        Self::join_url(
            &t.ws_url(),
            t.join(user, room, 0xff),
            relay,
            t.udp_addr().port(),
        )
        .await
    }

    /// Joins with `join` at `url` (any node of a cluster); media through `relay` to
    /// the server's `server_port` when given.
    pub async fn join_url(
        url: &str,
        join: weir_signaling::Join,
        relay: Option<std::net::SocketAddr>,
        server_port: u16,
    ) -> Self {
        let (mut signal, joined) = Client::join(url, join).await;
        assert!(matches!(joined, ServerMessage::Joined { .. }), "{joined:?}");
        let events: Events = Arc::default();
        let peer: Arc<tokio::sync::Mutex<Option<RtcPeer>>> = Arc::default();
        let (e, pr) = (events.clone(), peer.clone());
        let (outbox, mut outgoing) = tokio::sync::mpsc::unbounded_channel::<ClientMessage>();
        let task = tokio::spawn(async move {
            let mut last_ping = Instant::now();
            loop {
                if last_ping.elapsed() > Duration::from_secs(5) {
                    signal.send(&ClientMessage::Ping { ts: 1 }).await;
                    last_ping = Instant::now();
                }
                while let Ok(m) = outgoing.try_recv() {
                    signal.send(&m).await;
                }
                let Some(msg) = signal.try_recv(Duration::from_millis(100)).await else {
                    continue;
                };
                if let ServerMessage::Offer {
                    target: Target::Subscriber,
                    sdp,
                } = &msg
                {
                    let mut guard = pr.lock().await;
                    if guard.is_none() {
                        *guard = Some(RtcPeer::new().await);
                    }
                    let sdp = match relay {
                        Some(r) => via_relay(sdp, server_port, r),
                        None => sdp.clone(),
                    };
                    let answer = match guard.as_mut().unwrap().try_answer(sdp).await {
                        Ok(a) => a,
                        Err(e) => {
                            // Its connection is closed: the watcher stops here, and a
                            // test still reading it sees no more media or events.
                            eprintln!("watcher: no answer to the server's offer: {e}");
                            break;
                        }
                    };
                    drop(guard);
                    signal
                        .send(&ClientMessage::Answer {
                            target: Target::Subscriber,
                            sdp: answer,
                        })
                        .await;
                }
                e.lock().unwrap().push((Instant::now(), msg));
            }
        });
        Self {
            peer,
            events,
            outbox,
            _task: task,
        }
    }

    /// Sends a message on the watcher's signaling session (within 100 ms).
    pub fn send(&self, msg: ClientMessage) {
        let _ = self.outbox.send(msg);
    }

    /// Sends a PLI for `stream`'s video; false before any of it was received.
    pub async fn request_keyframe(&self, stream: &str) -> bool {
        match self.peer.lock().await.as_ref() {
            Some(p) => p.request_keyframe(stream).await,
            None => false,
        }
    }

    /// Every packet of `stream`'s track of `kind` (`audio`, `video`), in arrival order.
    pub async fn received(&self, stream: &str, kind: &str) -> Vec<super::peer::Received> {
        let guard = self.peer.lock().await;
        let Some(p) = guard.as_ref() else {
            return Vec::new();
        };
        let inbox = p.inbox.lock().unwrap();
        let mut v: Vec<super::peer::Received> = inbox
            .iter()
            .filter(|(id, _)| id.starts_with(stream) && id.ends_with(kind))
            .flat_map(|(_, v)| v.iter().cloned())
            .collect();
        v.sort_by_key(|r| r.at);
        v
    }

    /// (arrival, seq, payload length) of every packet of the track of this kind.
    pub async fn packets(&self, kind: &str) -> Vec<(Instant, u16, usize)> {
        let guard = self.peer.lock().await;
        let Some(p) = guard.as_ref() else {
            return Vec::new();
        };
        let inbox = p.inbox.lock().unwrap();
        inbox
            .iter()
            .filter(|(id, _)| id.ends_with(kind))
            .flat_map(|(_, v)| v.iter().map(|r| (r.at, r.seq, r.payload.len())))
            .collect()
    }

    pub fn congestion(&self) -> Vec<(Instant, CongestionLevel, u64, Vec<String>)> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(at, m)| match m {
                ServerMessage::Congestion {
                    state,
                    estimate,
                    paused,
                    ..
                } => Some((*at, *state, *estimate, paused.clone())),
                _ => None,
            })
            .collect()
    }
}
