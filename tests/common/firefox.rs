//! Headless Firefox driven over WebDriver BiDi (the remote protocol Firefox speaks
//! natively; it has no DevTools protocol any more): fake camera and microphone, one
//! tab per participant, JavaScript evaluated in the page.
//!
//! Debian's `firefox-esr` (scripts/install-deps.sh test installs it). Without network
//! access it cannot fetch the OpenH264 plugin, so it sends and decodes VP8 (and VP9,
//! AV1), not H.264: a second browser engine whose codecs differ from Chrome's.
#![allow(dead_code)]

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::browser::Js;
use super::rpc::Rpc;

pub struct Firefox {
    child: tokio::process::Child,
    _profile: tempfile::TempDir,
    rpc: Rpc,
    /// Console lines and JavaScript errors, printed when a test fails.
    pub console: Arc<Mutex<Vec<String>>>,
}

pub struct FirefoxPage<'a> {
    browser: &'a Firefox,
    context: String,
}

/// Preferences: fake devices without a permission prompt, autoplay, host candidates
/// by address (not mDNS names), and nothing that reaches out to the network (this
/// machine has none). Firefox gathers no loopback candidates: its server must
/// announce a real interface's address.
const PREFS: &str = r#"
user_pref("media.navigator.streams.fake", true);
user_pref("media.navigator.permission.disabled", true);
user_pref("media.autoplay.default", 0);
user_pref("media.autoplay.blocking_policy", 0);
user_pref("media.gmp-manager.updateEnabled", false);
user_pref("media.peerconnection.ice.obfuscate_host_addresses", false);
user_pref("remote.prefs.recommended", true);
user_pref("browser.shell.checkDefaultBrowser", false);
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("app.update.enabled", false);
user_pref("network.captive-portal-service.enabled", false);
user_pref("dom.min_background_timeout_value", 4);
"#;

impl Firefox {
    pub async fn launch() -> Self {
        let binary = ["/usr/bin/firefox-esr", "/usr/bin/firefox"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("no Firefox: scripts/install-deps.sh test installs Debian's firefox-esr");
        let profile = tempfile::tempdir().unwrap();
        std::fs::write(profile.path().join("user.js"), PREFS).unwrap();
        let mut child = tokio::process::Command::new(binary)
            .args(["--headless", "--no-remote", "--remote-debugging-port", "0"])
            .arg("--profile")
            .arg(profile.path())
            .arg("about:blank")
            .env("MOZ_CRASHREPORTER_DISABLE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("firefox starts");
        // Firefox prints the BiDi address it listens on to stderr.
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("WebDriver BiDi listening on ") {
                    return Some(url.trim().to_owned());
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .expect("firefox opened its WebDriver BiDi port within 60 s");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let console: Arc<Mutex<Vec<String>>> = Default::default();
        let c = console.clone();
        let rpc = Rpc::connect(&format!("{url}/session"), move |v| {
            if v["method"] == "log.entryAdded" {
                let e = &v["params"];
                c.lock().unwrap().push(format!(
                    "[firefox] {}.{}: {}",
                    e["type"].as_str().unwrap_or(""),
                    e["level"].as_str().unwrap_or(""),
                    e["text"].as_str().unwrap_or("")
                ));
            }
        })
        .await;
        let ff = Self {
            child,
            _profile: profile,
            rpc,
            console,
        };
        ff.call("session.new", json!({"capabilities": {}})).await;
        ff.call("session.subscribe", json!({"events": ["log.entryAdded"]}))
            .await;
        ff
    }

    async fn call(&self, method: &str, params: Value) -> Value {
        let v = self
            .rpc
            .call(json!({"method": method, "params": params}))
            .await;
        if v["type"] == "error" {
            panic!("BiDi {method}: {v}");
        }
        v["result"].clone()
    }

    /// A new tab at `url`, loaded.
    pub async fn open(&self, url: &str) -> FirefoxPage<'_> {
        let created = self
            .call("browsingContext.create", json!({"type": "tab"}))
            .await;
        let context = created["context"].as_str().unwrap().to_owned();
        self.call(
            "browsingContext.navigate",
            json!({"context": context, "url": url, "wait": "complete"}),
        )
        .await;
        FirefoxPage {
            browser: self,
            context,
        }
    }
}

impl Drop for Firefox {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[async_trait::async_trait]
impl Js for FirefoxPage<'_> {
    /// Evaluates `expression` (awaiting a promise); its value comes back as JSON
    /// (stringified in the page), and a JavaScript exception fails the test.
    async fn eval(&self, expression: &str) -> Value {
        let wrapped = format!(
            "(async () => {{ const v = await ({expression}); \
             return v === undefined ? 'null' : JSON.stringify(v); }})()"
        );
        let r = self
            .browser
            .call(
                "script.evaluate",
                json!({"expression": wrapped, "target": {"context": self.context},
                       "awaitPromise": true}),
            )
            .await;
        if r["type"] == "exception" {
            panic!(
                "JavaScript failed in Firefox: {}\nconsole:\n{}",
                r["exceptionDetails"]["text"],
                self.console_dump()
            );
        }
        serde_json::from_str(r["result"]["value"].as_str().unwrap_or("null")).unwrap_or(Value::Null)
    }

    fn console_dump(&self) -> String {
        self.browser.console.lock().unwrap().join("\n")
    }
}
