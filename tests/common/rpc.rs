//! JSON commands over a websocket, answered by id, with events on the side: what
//! Chromium's DevTools protocol and Firefox's WebDriver BiDi both are.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

pub struct Rpc {
    out: mpsc::UnboundedSender<String>,
    pending: Pending,
    next_id: AtomicU64,
}

impl Rpc {
    /// Connects; every message without an id is handed to `on_event`.
    pub async fn connect(url: &str, on_event: impl Fn(&Value) + Send + 'static) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .unwrap_or_else(|e| panic!("websocket {url}: {e}"));
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            while let Some(text) = out_rx.recv().await {
                if sink.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
            }
        });
        let pending: Pending = Default::default();
        let p = pending.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Text(text) = msg else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                match v.get("id").and_then(Value::as_u64) {
                    Some(id) => {
                        if let Some(tx) = p.lock().unwrap().remove(&id) {
                            let _ = tx.send(v);
                        }
                    }
                    None => on_event(&v),
                }
            }
        });
        Self {
            out,
            pending,
            next_id: AtomicU64::new(1),
        }
    }

    /// Sends `msg` (an object; its `id` is set here) and returns the whole answer.
    pub async fn call(&self, mut msg: Value) -> Value {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        msg["id"] = id.into();
        let method = msg["method"].as_str().unwrap_or("").to_owned();
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        self.out
            .send(msg.to_string())
            .expect("the browser's connection");
        tokio::time::timeout(Duration::from_secs(60), rx)
            .await
            .unwrap_or_else(|_| panic!("{method}: no answer in 60 s"))
            .expect("the browser's connection")
    }
}
