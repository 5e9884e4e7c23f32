//! The `weir` binary as its own process (what systemd or Kubernetes runs), for tests
//! that signal or kill it.

use std::time::{Duration, Instant};

use weir::auth::{AppKeys, Keyring};
use weir::config::Config;

use super::APP;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `weir` binary on free loopback ports with a generated app, listening. The child
/// is killed when dropped.
pub struct Node {
    pub child: tokio::process::Child,
    /// Its log lines (stdout), as they come; they are echoed too.
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub http: u16,
    pub rtmp: u16,
    pub app: AppKeys,
    pub config: Config,
    pub _dir: tempfile::TempDir,
}

impl Node {
    /// `env`: more environment for it.
    pub async fn start(env: &[(&str, &str)]) -> Self {
        Self::start_with(env, |_| {}).await
    }

    /// `tweak` changes the configuration file before the node starts.
    pub async fn start_with(env: &[(&str, &str)], tweak: impl Fn(&mut Config)) -> Self {
        Self::start_app(AppKeys::generate_config(APP), env, tweak).await
    }

    /// A node serving `app_config` (several nodes of one cluster share their apps).
    pub async fn start_app(
        app_config: weir::config::AppConfig,
        env: &[(&str, &str)],
        tweak: impl Fn(&mut Config),
    ) -> Self {
        // Ports are picked free and bound by the child a moment later: another
        // process may take one between (a node that cannot bind exits). Such a start
        // is tried again on other ports; any other failure is reported with the
        // node's own words.
        for attempt in 1..=3 {
            match Self::try_start(app_config.clone(), env, &tweak).await {
                Ok(node) => return node,
                Err(why) if attempt < 3 && why.contains("binding") => {
                    eprintln!("a node could not bind its ports; again on others: {why}")
                }
                Err(why) => panic!("the server did not listen: {why}"),
            }
        }
        unreachable!()
    }

    async fn try_start(
        app_config: weir::config::AppConfig,
        env: &[(&str, &str)],
        tweak: &impl Fn(&mut Config),
    ) -> Result<Self, String> {
        let app = AppKeys::from_config(&app_config).unwrap();
        let mut config = Config::development(None);
        config.server.dev_mode = false;
        config.apps = vec![app_config];
        let http = free_port();
        let rtmp = free_port();
        config.server.http_addr = format!("127.0.0.1:{http}");
        config.server.udp_addr = format!("127.0.0.1:{}", free_port());
        config.server.tcp_addr = format!("127.0.0.1:{}", free_port());
        config.server.rtmp_addr = format!("127.0.0.1:{rtmp}");
        config.server.metrics_addr = format!("127.0.0.1:{}", free_port());
        config.server.announce_ips = vec!["127.0.0.1".into()];
        config.server.shutdown_grace_s = 5;
        tweak(&mut config);
        Keyring::from_configs(&config.apps).expect("the generated app loads");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weir.toml");
        config.write(&path).unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut child = child;
        let log: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
        if let Some(out) = child.stdout.take() {
            use tokio::io::AsyncBufReadExt;
            let kept = log.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(out).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    println!("{l}");
                    kept.lock().unwrap().push(l);
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", http))
            .await
            .is_err()
        {
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= deadline {
                let _ = child.start_kill();
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ =
                        tokio::time::timeout(Duration::from_secs(2), e.read_to_string(&mut err))
                            .await;
                }
                return Err(format!(
                    "{} ({}); its log: {err}",
                    if exited.is_some() {
                        "it exited"
                    } else {
                        "not within 20 s"
                    },
                    exited.map_or_else(String::new, |s| s.to_string()),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self {
            child,
            log,
            http,
            rtmp,
            app,
            config,
            _dir: dir,
        })
    }
}

impl Node {
    /// Copies the node's log lines to the test's output, prefixed with `name` (and
    /// keeps its pipe from filling).
    pub fn echo_stderr(&mut self, name: &'static str) {
        use tokio::io::AsyncBufReadExt;
        if let Some(err) = self.child.stderr.take() {
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(err).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    eprintln!("[{name}] {l}");
                }
            });
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.http)
    }

    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.config.server.metrics_addr.parse().unwrap()
    }

    pub async fn metrics(&self) -> String {
        super::http_get(self.metrics_addr(), "/metrics").await
    }

    /// The node's `/cluster` view.
    pub async fn cluster(&self) -> serde_json::Value {
        let text = super::http_get(self.metrics_addr(), "/cluster").await;
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
    }

    /// Sends a signal (`libc` names: "TERM", "KILL").
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("running").to_string();
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {pid}");
    }
}
