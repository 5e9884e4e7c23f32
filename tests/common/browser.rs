//! Headless Chromium driven over the DevTools protocol: fake camera and microphone,
//! one tab per participant, JavaScript evaluated in the page, screenshots.
//!
//! Debian's `chromium` (scripts/install-deps.sh test installs it). Started as the
//! machine's notes advise: no sandbox (root), no GPU, no background networking.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use super::rpc::Rpc;

pub struct Browser {
    child: tokio::process::Child,
    _profile: tempfile::TempDir,
    rpc: Rpc,
    /// Console lines and exceptions by session id, printed when a test fails.
    pub console: Arc<Mutex<Vec<String>>>,
}

pub struct Page<'a> {
    browser: &'a Browser,
    session: String,
}

fn chromium() -> PathBuf {
    for p in [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ] {
        if Path::new(p).exists() {
            return p.into();
        }
    }
    panic!("no Chromium: scripts/install-deps.sh test installs Debian's chromium");
}

impl Browser {
    pub async fn launch() -> Self {
        let profile = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new(chromium())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--disable-extensions",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                "--autoplay-policy=no-user-gesture-required",
                // Tabs in the background must not be throttled: each is a participant.
                "--disable-background-timer-throttling",
                "--disable-renderer-backgrounding",
                "--disable-backgrounding-occluded-windows",
                "--window-size=1280,800",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            // Extra flags for debugging a failing test, e.g. Chromium's WebRTC logs:
            // WEIR_CHROMIUM_FLAGS="--enable-logging=stderr --vmodule=srtp_session=3".
            .args(
                std::env::var("WEIR_CHROMIUM_FLAGS")
                    .ok()
                    .iter()
                    .flat_map(|f| f.split_whitespace().map(str::to_owned).collect::<Vec<_>>()),
            )
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if std::env::var("WEIR_CHROMIUM_FLAGS").is_ok() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true)
            .spawn()
            .expect("chromium starts");
        // Chromium writes its port and browser target path once it listens.
        let port_file = profile.path().join("DevToolsActivePort");
        let mut ws_url = None;
        for _ in 0..600 {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    ws_url = Some(format!("ws://127.0.0.1:{port}{path}"));
                    break;
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("chromium exited at start: {status}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ws_url = ws_url.expect("chromium opened its DevTools port within 60 s");
        let console: Arc<Mutex<Vec<String>>> = Default::default();
        let c = console.clone();
        let rpc = Rpc::connect(&ws_url, move |v| {
            let method = v["method"].as_str().unwrap_or("");
            let session = v["sessionId"].as_str().unwrap_or("").get(..6).unwrap_or("");
            match method {
                "Runtime.consoleAPICalled" => {
                    let args: Vec<String> = v["params"]["args"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|x| {
                                    x.get("value")
                                        .map(|v| v.to_string())
                                        .or_else(|| x["description"].as_str().map(String::from))
                                        .unwrap_or_default()
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    c.lock().unwrap().push(format!(
                        "[{session}] console.{}: {}",
                        v["params"]["type"].as_str().unwrap_or(""),
                        args.join(" ")
                    ));
                }
                "Runtime.exceptionThrown" => {
                    c.lock().unwrap().push(format!(
                        "[{session}] exception: {}",
                        v["params"]["exceptionDetails"]
                    ));
                }
                _ => {}
            }
        })
        .await;
        Self {
            child,
            _profile: profile,
            rpc,
            console,
        }
    }

    async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Value {
        let mut msg = json!({"method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = s.into();
        }
        let v = self.rpc.call(msg).await;
        if let Some(e) = v.get("error") {
            panic!("DevTools {method}: {e}");
        }
        v["result"].clone()
    }

    /// A new tab at `url`, its console collected.
    pub async fn open(&self, url: &str) -> Page<'_> {
        let target = self
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let target_id = target["targetId"].as_str().unwrap().to_owned();
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({"targetId": target_id, "flatten": true}),
            )
            .await;
        let session = attached["sessionId"].as_str().unwrap().to_owned();
        let page = Page {
            browser: self,
            session,
        };
        page.call("Runtime.enable", json!({})).await;
        page.call("Page.enable", json!({})).await;
        page.call("Page.navigate", json!({"url": url})).await;
        page.wait_for(
            "document.readyState === 'complete'",
            Duration::from_secs(20),
        )
        .await;
        page
    }

    pub fn console_dump(&self) -> String {
        self.console.lock().unwrap().join("\n")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A page of either browser, as the tests use it.
#[async_trait::async_trait]
pub trait Js: Sync {
    /// Evaluates `expression` (awaiting a promise) and returns its JSON value; a
    /// JavaScript exception fails the test with the page's console. It runs as a user
    /// gesture (as a click would): `getDisplayMedia` needs one.
    async fn eval(&self, expression: &str) -> Value;
    /// The browser's console so far, for a failing test's message.
    fn console_dump(&self) -> String;
}

#[async_trait::async_trait]
impl Js for Page<'_> {
    async fn eval(&self, expression: &str) -> Value {
        Page::eval(self, expression).await
    }
    fn console_dump(&self) -> String {
        self.browser.console_dump()
    }
}

impl Page<'_> {
    async fn call(&self, method: &str, params: Value) -> Value {
        self.browser.call(Some(&self.session), method, params).await
    }

    /// Evaluates `expression` (awaiting a promise) and returns its JSON value; a
    /// JavaScript exception fails the test with the page's console. It runs as a user
    /// gesture (as a click would): `getDisplayMedia` needs one.
    pub async fn eval(&self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true, "userGesture": true}),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!(
                "JavaScript failed: {}\n{}\nconsole:\n{}",
                e["exception"]["description"].as_str().unwrap_or(""),
                e,
                self.browser.console_dump()
            );
        }
        r["result"]["value"].clone()
    }

    /// Polls `condition` (a JavaScript expression) until it is true.
    pub async fn wait_for(&self, condition: &str, limit: Duration) -> bool {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            let r = self
                .call(
                    "Runtime.evaluate",
                    json!({"expression": format!("!!({condition})"), "awaitPromise": true,
                           "returnByValue": true}),
                )
                .await;
            if r["result"]["value"].as_bool() == Some(true) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    pub async fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let r = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }
}

/// A publishing page's script: `window.glassPublish(options, seconds, withAudio)` joins
/// through the SDK and publishes a generated camera and microphone
/// (`MediaStreamTrackGenerator`s): 640×360 at 30 fps with each frame's index in 16
/// blocks along the top (`common::source::read_index` reads it back), and 48 kHz PCM
/// with a 60 ms 1 kHz beep at every second, written with frame 30·k. The wall clock
/// of each frame and beep is in `window.pubFrames` and `window.pubBeeps`, the room in
/// `window.glassRoom`.
pub const GENERATED_PUBLISHER_JS: &str = r#"
window.glassPublish = async (options, seconds, withAudio) => {
  const { WeirRoom } = await import('/sdk/weir.js');
  const origin = performance.timeOrigin;
  window.pubFrames = []; window.pubBeeps = [];
  const vgen = new MediaStreamTrackGenerator({ kind: 'video' });
  const vw = vgen.writable.getWriter();
  const tracks = [vgen];
  let aw = null;
  if (withAudio) {
    const agen = new MediaStreamTrackGenerator({ kind: 'audio' });
    aw = agen.writable.getWriter();
    tracks.push(agen);
  }
  const stream = new MediaStream(tracks);
  const canvas = new OffscreenCanvas(640, 360);
  const c = canvas.getContext('2d');
  const draw = (n) => {
    c.fillStyle = '#808080'; c.fillRect(0, 32, 640, 328);
    c.fillStyle = '#404040';
    for (let i = 0; i < 8; i++) c.fillRect((n * 7 + i * 80) % 640, 60 + i * 35, 40, 30);
    for (let b = 0; b < 16; b++) {
      c.fillStyle = ((n >> b) & 1) ? '#ebebeb' : '#101010';
      c.fillRect(b * 32, 0, 32, 32);
    }
  };
  // Frames are written before publishing too, so the track has a size to negotiate.
  const t0 = performance.now() + 100;
  let n = 0;
  const vtick = () => {
    draw(n);
    const f = new VideoFrame(canvas, { timestamp: Math.round(performance.now() * 1000) });
    window.pubFrames[n] = origin + performance.now();
    vw.write(f);
    n++;
    if (performance.now() < t0 + seconds * 1000)
      setTimeout(vtick, Math.max(0, t0 + n * 1000 / 30 - performance.now()));
  };
  let m = 0;
  const atick = () => {
    while (t0 + m * 10 <= performance.now()) {
      const data = new Float32Array(480);
      if (m % 100 < 6) {
        for (let i = 0; i < 480; i++) {
          const s = (m % 100) * 480 + i;
          data[i] = 0.5 * Math.sin(2 * Math.PI * 1000 * s / 48000);
        }
      }
      if (m % 100 === 0) window.pubBeeps.push(origin + performance.now());
      aw.write(new AudioData({ format: 'f32-planar', sampleRate: 48000, numberOfFrames: 480,
                               numberOfChannels: 1, timestamp: Math.round(performance.now() * 1000), data }));
      m++;
    }
    if (performance.now() < t0 + seconds * 1000) setTimeout(atick, 2);
  };
  setTimeout(vtick, 100);
  if (aw) setTimeout(atick, 100);
  const room = new WeirRoom(options);
  window.glassRoom = room;
  await room.join();
  await room.publish({ stream });
  return room.userID || true;
};
"#;

/// A page script that joins a room through the SDK with `options` (a JSON join),
/// keeps it in `window.room`, runs `on_room` (more handlers), shows every remote
/// stream in a muted autoplaying `<video>`, and resolves once joined.
pub fn sdk_join_js(options: &str, on_room: &str) -> String {
    format!(
        r#"(async () => {{
            const {{ WeirRoom }} = await import('/sdk/weir.js');
            const room = new WeirRoom({options});
            window.room = room;
            {on_room}
            room.on('remoteStream', ({{ stream }}) => {{
                const v = document.createElement('video');
                v.autoplay = true; v.muted = true; v.srcObject = stream;
                document.body.append(v);
                v.play().catch(() => {{}});
            }});
            await room.join();
            return true;
        }})()"#
    )
}
