//! HTTPS and WSS on the public listener (rustls).
//!
//! With `tls_cert_file` and `tls_key_file` set, `http_addr` speaks TLS only: the
//! signaling websocket is `wss://`, HTTP-FLV is `https://`, and the tokens in their
//! query strings and frames are not on the wire in the clear. The files (PEM: the
//! certificate chain, and a PKCS#8, PKCS#1 or SEC1 key) are read at start-up (a bad
//! pair stops the server with the file named) and again on SIGHUP or when either
//! file's modification time changes (checked every [`WATCH_INTERVAL`]): new
//! connections get the new certificate, existing ones keep theirs, and a pair that
//! fails to load is logged and the old one kept. A TLS handshake must finish within
//! [`HANDSHAKE_TIMEOUT`].
//!
//! With `rtmps_addr` set too, that listener serves RTMPS (RTMP in TLS, the same
//! certificate, the same reloads) beside the plain RTMP port.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{info, warn};

/// How often the files' modification times are looked at.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);
/// A client must finish its TLS handshake within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The certificate in force, replaced on reload.
pub struct Tls {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<(Arc<rustls::ServerConfig>, Option<SystemTime>)>,
}

impl Tls {
    /// Loads the pair; an error names the file.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Arc<Self>> {
        let config = server_config(cert_file, key_file)?;
        Ok(Arc::new(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: RwLock::new((config, changed_at(cert_file, key_file))),
        }))
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self.current.read().expect("tls lock").0.clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    /// The acceptor for a new RTMPS connection: the same certificate, no ALPN (RTMP
    /// clients offer none, and one offering something else is not refused for it).
    pub fn rtmps_acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let mut config = (*self.current.read().expect("tls lock").0).clone();
        config.alpn_protocols.clear();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    /// Reads the files again; on failure the old pair stays.
    pub fn reload(&self, why: &str) {
        let stamp = changed_at(&self.cert_file, &self.key_file);
        match server_config(&self.cert_file, &self.key_file) {
            Ok(config) => {
                *self.current.write().expect("tls lock") = (config, stamp);
                info!(cert = %self.cert_file.display(), why, "TLS certificate reloaded");
            }
            Err(e) => {
                // Remember the stamp anyway: a half-written file is retried when it
                // changes again, not every interval.
                self.current.write().expect("tls lock").1 = stamp;
                warn!(error = %format!("{e:#}"), why, "TLS certificate not reloaded; the old one stays");
            }
        }
    }

    /// Reloads on SIGHUP and when the files change, until the process ends.
    pub async fn watch(self: Arc<Self>) {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<()>();
            tokio::select! {
                () = hangup => self.reload("SIGHUP"),
                _ = tick.tick() => {
                    let stamp = changed_at(&self.cert_file, &self.key_file);
                    let known = self.current.read().expect("tls lock").1;
                    if stamp != known {
                        self.reload("the files changed");
                    }
                }
            }
        }
    }
}

/// The later of the two files' modification times.
fn changed_at(cert: &Path, key: &Path) -> Option<SystemTime> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    m(cert).max(m(key))
}

fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .with_context(|| format!("reading the TLS certificate {}", cert_file.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing the TLS certificate {}", cert_file.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no certificate", cert_file.display());
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .with_context(|| format!("reading the TLS key {}", key_file.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .with_context(|| {
        format!(
            "the TLS key {} does not fit the certificate {}",
            key_file.display(),
            cert_file.display()
        )
    })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
