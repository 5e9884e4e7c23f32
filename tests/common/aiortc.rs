//! Members on a second, independent WebRTC stack: aiortc (Python), driven through
//! `tests/interop/aiortc_client.py`, which was written from `signaling/PROTOCOL.md`.
//! `scripts/install-deps.sh test` puts aiortc, pinned, in a virtualenv at
//! `target/interop-venv` (`WEIR_INTEROP_PYTHON` names another interpreter).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use weir_signaling::{ClientMessage, Join};

pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("WEIR_INTEROP_PYTHON") {
        return p.into();
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/interop-venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/install-deps.sh test (it makes the aiortc virtualenv)",
        p.display()
    );
    p
}

/// What one aiortc member does.
pub struct Plan {
    /// `none`, `h264` or `vp8`.
    pub publish: &'static str,
    pub seconds: f64,
    pub size: (u32, u32),
    pub luma: u8,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            publish: "none",
            seconds: 10.0,
            size: (320, 240),
            luma: 60,
        }
    }
}

pub struct Member {
    child: Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<Value>,
    pub events: Vec<Value>,
    name: String,
}

impl Member {
    pub fn start(ws_url: &str, join: Join, plan: Plan) -> Self {
        let name = join.user_id.clone();
        let join = serde_json::to_string(&ClientMessage::Join(join)).unwrap();
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/interop/aiortc_client.py");
        let mut child = Command::new(python())
            .arg(script)
            .args(["--ws", ws_url, "--join", &join, "--publish", plan.publish])
            .args(["--seconds", &plan.seconds.to_string()])
            .args(["--width", &plan.size.0.to_string()])
            .args(["--height", &plan.size.1.to_string()])
            .args(["--luma", &plan.luma.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the aiortc client");
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        let stdout = child.stdout.take().unwrap();
        let who = name.clone();
        tokio::spawn(async move {
            let mut r = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = r.next_line().await {
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        let _ = tx.send(v);
                    }
                    Err(_) => eprintln!("[{who}] {line}"),
                }
            }
        });
        let stderr = child.stderr.take().unwrap();
        let who = name.clone();
        tokio::spawn(async move {
            let mut r = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = r.next_line().await {
                eprintln!("[{who} stderr] {line}");
            }
        });
        Self {
            child,
            lines,
            events: Vec::new(),
            name,
        }
    }

    /// Waits for an event named `name` (up to `limit`), keeping every event seen.
    pub async fn wait_event(&mut self, name: &str, limit: Duration) -> Option<Value> {
        if let Some(e) = self.events.iter().find(|e| e["event"] == name) {
            return Some(e.clone());
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let e = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .ok()??;
            self.events.push(e.clone());
            if e["event"] == name {
                return Some(e);
            }
        }
    }

    /// Waits for the process to end and returns its summary.
    pub async fn summary(mut self, limit: Duration) -> Value {
        let s = self.wait_event("summary", limit).await;
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        let s = s.unwrap_or_else(|| {
            panic!(
                "{}: no summary (exit {status:?}); events: {:#?}",
                self.name, self.events
            )
        });
        eprintln!("[{}] summary: {}", self.name, compact(&s));
        if let Ok(dir) = std::env::var("WEIR_INTEROP_DUMP") {
            let path = std::path::Path::new(&dir).join(format!("{}.json", self.name));
            let _ = std::fs::write(path, serde_json::to_string_pretty(&self.events).unwrap());
        }
        s
    }
}

/// The summary without the SDPs (they make a failing test's output unreadable).
pub fn compact(summary: &Value) -> String {
    let mut s = summary.clone();
    if let Some(o) = s.get_mut("offers") {
        *o = Value::from(o.as_array().map_or(0, Vec::len));
    }
    s.to_string()
}
