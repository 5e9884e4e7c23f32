//! The `weir` binary as its own process, for benchmarks that measure the server alone:
//! its CPU and memory from /proc, its counters from `/metrics`, optionally pinned to
//! chosen cores with `taskset`.
// Shared by several benchmarks; each uses part of it.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use weir::auth::{AppKeys, Keyring};
use weir::config::Config;
use weir_signaling::Join;

use crate::common;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct ProcNode {
    _child: tokio::process::Child,
    pub pid: u32,
    pub ws: String,
    pub metrics: std::net::SocketAddr,
    pub rtmp: std::net::SocketAddr,
    pub http: std::net::SocketAddr,
    pub app: AppKeys,
    /// The app's key for signed (txSecret) play URLs.
    pub play_key: Option<String>,
}

impl ProcNode {
    /// Starts `weir serve` on loopback ports with a fresh app, `tweak` applied to its
    /// configuration; on the cores `cpus` (a `taskset` list such as "0" or "0-1") when
    /// given.
    pub async fn start(
        dir: &std::path::Path,
        cpus: Option<&str>,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        Self::start_app(dir, cpus, AppKeys::generate_config(common::APP), tweak).await
    }

    /// [`Self::start`] serving `app_config` (the nodes of a cluster share their apps).
    pub async fn start_app(
        dir: &std::path::Path,
        cpus: Option<&str>,
        app_config: weir::config::AppConfig,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let app = AppKeys::from_config(&app_config).unwrap();
        let play_key = app_config.live_play_key.clone();
        let mut config = Config::development(None);
        config.server.dev_mode = false;
        config.apps = vec![app_config];
        let http = free_port();
        let metrics = free_port();
        let rtmp = free_port();
        config.server.http_addr = format!("127.0.0.1:{http}");
        config.server.udp_addr = format!("127.0.0.1:{}", free_port());
        config.server.tcp_addr = format!("127.0.0.1:{}", free_port());
        config.server.rtmp_addr = format!("127.0.0.1:{rtmp}");
        config.server.metrics_addr = format!("127.0.0.1:{metrics}");
        config.server.announce_ips = vec!["127.0.0.1".into()];
        tweak(&mut config);
        Keyring::from_configs(&config.apps).expect("the generated app loads");
        let path = dir.join("weir.toml");
        config.write(&path).unwrap();
        // An older build refuses keys it does not know: BENCH_WEIR_DROP_KEYS names them.
        if let Ok(keys) = std::env::var("BENCH_WEIR_DROP_KEYS") {
            let text = std::fs::read_to_string(&path).unwrap();
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| !keys.split(',').any(|k| l.starts_with(&format!("{k} ="))))
                .collect();
            std::fs::write(&path, kept.join("\n")).unwrap();
        }
        // BENCH_WEIR_BIN runs another build (an older commit's, for a before/after).
        let bin = std::env::var("BENCH_WEIR_BIN").unwrap_or(env!("CARGO_BIN_EXE_weir").into());
        let mut command = match cpus {
            Some(cpus) => {
                let mut c = tokio::process::Command::new("taskset");
                c.args(["-c", cpus, &bin]);
                c
            }
            None => tokio::process::Command::new(&bin),
        };
        let child = command
            .args(["serve", "--config"])
            .arg(&path)
            .env(
                "RUST_LOG",
                // rtc warns once per DTLS client and per check racing its answer.
                std::env::var("WEIR_LOG").unwrap_or("warn,rtc=error,rtc_dtls=error".into()),
            )
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        // taskset execs weir in place: the pid is the server's.
        let pid = child.id().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", http))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the server did not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            _child: child,
            pid,
            ws: format!("ws://127.0.0.1:{http}/ws"),
            metrics: format!("127.0.0.1:{metrics}").parse().unwrap(),
            rtmp: format!("127.0.0.1:{rtmp}").parse().unwrap(),
            http: format!("127.0.0.1:{http}").parse().unwrap(),
            app,
            play_key,
        }
    }

    /// A join with valid v2 credentials and every privilege for `user` in `room`.
    pub fn join(&self, user: &str, room: u32, auto_subscribe: bool) -> Join {
        common::join_with(&self.app, user, room, 0xff, auto_subscribe)
    }

    pub async fn metrics(&self) -> String {
        common::http_get(self.metrics, "/metrics").await
    }
}

/// CPU seconds (user + system) a process has used, from /proc/<pid>/stat.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the name.
    (ticks(11) + ticks(12)) / clock_ticks()
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Resident memory of a process, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Writes `rows` under `header` to `benches/artifacts/<name>`.
pub fn write_csv(name: &str, header: &str, rows: &[String]) {
    use std::io::Write;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let mut f = std::fs::File::create(dir.join(name)).unwrap();
    writeln!(f, "{header}").unwrap();
    for r in rows {
        writeln!(f, "{r}").unwrap();
    }
    println!("wrote benches/artifacts/{name}");
}
