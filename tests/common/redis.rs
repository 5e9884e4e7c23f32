//! A real `redis-server` (Debian's package) on a free loopback port, for the cluster
//! tests: started, killed and started again on the same port as an operator would.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Redis {
    pub port: u16,
    child: Option<tokio::process::Child>,
    dir: tempfile::TempDir,
    /// With TLS: its port (the plain one stays, on loopback, for the test's own reads).
    tls_port: Option<u16>,
}

impl Redis {
    pub async fn start() -> Self {
        let mut r = Self {
            port: super::node::free_port(),
            child: None,
            dir: tempfile::tempdir().unwrap(),
            tls_port: None,
        };
        r.restart().await;
        r
    }

    /// A server that also speaks TLS on a port of its own, with a certificate for
    /// `localhost` (self-signed: [`Self::ca_file`] is its own CA).
    pub async fn start_tls() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(dir.path().join("cert.pem"), key.cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.signing_key.serialize_pem()).unwrap();
        let mut r = Self {
            port: super::node::free_port(),
            child: None,
            dir,
            tls_port: Some(super::node::free_port()),
        };
        r.restart().await;
        r
    }

    /// `rediss://localhost:PORT` (with [`Self::start_tls`]).
    pub fn tls_url(&self) -> String {
        format!(
            "rediss://localhost:{}",
            self.tls_port.expect("a TLS server")
        )
    }

    /// The PEM file that signed the TLS port's certificate.
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.path().join("cert.pem")
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
            .args(self.tls_port.iter().flat_map(|p| {
                let file = |f: &str| self.dir.path().join(f).display().to_string();
                [
                    "--tls-port".to_string(),
                    p.to_string(),
                    "--tls-cert-file".into(),
                    file("cert.pem"),
                    "--tls-key-file".into(),
                    file("key.pem"),
                    "--tls-ca-cert-file".into(),
                    file("cert.pem"),
                    "--tls-auth-clients".into(),
                    "no".into(),
                ]
            }))
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
