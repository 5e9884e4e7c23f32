//! A real `redis-server` (Debian's package) on a free loopback port, for the cluster
//! tests: started, killed and started again on the same port as an operator would.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Redis {
    pub port: u16,
    child: Option<tokio::process::Child>,
    dir: tempfile::TempDir,
}

impl Redis {
    pub async fn start() -> Self {
        let mut r = Self {
            port: super::node::free_port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
        };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: what it held in memory is gone).
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Starts it (again) on its port, empty, and waits until it answers PING.
    pub async fn restart(&mut self) {
        self.kill().await;
        let child = tokio::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server (scripts/install-deps.sh test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.command("PING").await.as_deref() == Some("+PONG") {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One inline command; the first line of the answer.
    pub async fn command(&self, cmd: &str) -> Option<String> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .ok()?;
        s.write_all(format!("{cmd}\r\n").as_bytes()).await.ok()?;
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        Some(text.lines().next().unwrap_or("").to_owned())
    }

    /// `GET key` (None: no such key).
    pub async fn get(&self, key: &str) -> Option<String> {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .ok()?;
        s.write_all(format!("GET {key}\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = vec![0u8; 65536];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let mut lines = text.lines();
        match lines.next()? {
            "$-1" => None,
            _ => lines.next().map(str::to_owned),
        }
    }
}
