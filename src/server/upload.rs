//! Recording files to an S3-compatible bucket (AWS S3, MinIO, Ceph, COS or OSS through
//! their S3 APIs), with Apache Arrow's `object_store`: each closed file is streamed up
//! as a multipart upload in 8 MiB parts (two in flight, so memory stays bounded
//! whatever the file's size), retried with backoff for `upload_retry_s`, at most two
//! files at a time. The key is `<prefix><sdk_app_id>/<stream>/<file>`.
//!
//! `object_store` 0.12, not 0.14: 0.14's S3 client brings reqwest 0.13 and aws-lc-rs
//! (a second HTTP stack and a second crypto library beside rustls with ring).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, WriteMultipart};
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::config::RecordConfig;

const PART_BYTES: usize = 8 << 20;
const PARTS_IN_FLIGHT: usize = 2;
const FILES_AT_ONCE: usize = 2;

pub struct Uploader {
    store: Arc<dyn ObjectStore>,
    bucket: String,
    prefix: String,
    public_url: String,
    retry_for: Duration,
    slots: Semaphore,
}

/// An object in the bucket, as the listing call shows it.
#[derive(Debug, Clone)]
pub struct Object {
    pub key: String,
    pub size: u64,
    pub modified_ms: u64,
}

impl Uploader {
    /// The uploader `[record]` asks for, if any (an error: the settings are wrong).
    pub fn from_config(c: &RecordConfig) -> anyhow::Result<Option<Self>> {
        if c.s3_bucket.is_empty() {
            return Ok(None);
        }
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&c.s3_bucket)
            .with_region(if c.s3_region.is_empty() {
                "us-east-1"
            } else {
                &c.s3_region
            })
            .with_access_key_id(&c.s3_access_key)
            .with_secret_access_key(&c.s3_secret_key);
        if !c.s3_endpoint.is_empty() {
            b = b
                .with_endpoint(&c.s3_endpoint)
                .with_allow_http(c.s3_endpoint.starts_with("http://"));
        }
        // Weir retries a failed upload itself (backoff for `upload_retry_s`, each
        // failed attempt counted and logged, so an outage of the bucket shows while it
        // lasts). `object_store`'s own retries (10, for up to 3 minutes, by default)
        // hid an unreachable bucket inside one attempt; a couple of quick ones are
        // kept, for a request that fails once mid-upload.
        b = b.with_retry(object_store::RetryConfig {
            max_retries: 2,
            retry_timeout: Duration::from_secs(10),
            ..Default::default()
        });
        let store = b.build()?;
        Ok(Some(Self {
            store: Arc::new(store),
            bucket: c.s3_bucket.clone(),
            prefix: c.s3_prefix.clone(),
            public_url: c.s3_public_url.trim_end_matches('/').to_owned(),
            retry_for: Duration::from_secs(c.upload_retry_s),
            slots: Semaphore::new(FILES_AT_ONCE),
        }))
    }

    /// The key of a recording file.
    pub fn key(&self, sdk_app_id: u64, stem: &str, file: &str) -> String {
        format!("{}{sdk_app_id}/{stem}/{file}", self.prefix)
    }

    /// Where an uploaded file is told to be (`video_url`).
    pub fn url(&self, key: &str) -> String {
        if self.public_url.is_empty() {
            format!("s3://{}/{key}", self.bucket)
        } else {
            format!("{}/{key}", self.public_url)
        }
    }

    /// Uploads `local` as `key`, retrying until it is there or `upload_retry_s` passed.
    /// `retrying` is called as each failed attempt is about to be retried, so that an
    /// outage of the bucket shows while it lasts.
    pub async fn upload(
        &self,
        local: &Path,
        key: &str,
        retrying: impl Fn(),
    ) -> Result<u32, String> {
        let _slot = self.slots.acquire().await.map_err(|e| e.to_string())?;
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.upload_once(local, key).await {
                Ok(()) => {
                    info!(key, attempt, "recording uploaded");
                    return Ok(attempt);
                }
                Err(e) if started.elapsed() < self.retry_for => {
                    let wait = Duration::from_secs(1 << attempt.min(6));
                    warn!(key, attempt, error = %e, ?wait, "recording upload failed; retrying");
                    retrying();
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn upload_once(&self, local: &Path, key: &str) -> Result<(), String> {
        let mut file = tokio::fs::File::open(local)
            .await
            .map_err(|e| format!("{}: {e}", local.display()))?;
        let upload = self
            .store
            .put_multipart(&ObjectPath::from(key))
            .await
            .map_err(|e| e.to_string())?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match file.read(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    let _ = w.abort().await;
                    return Err(e.to_string());
                }
            };
            if n == 0 {
                break;
            }
            if let Err(e) = w.wait_for_capacity(PARTS_IN_FLIGHT).await {
                return Err(e.to_string());
            }
            w.write(&buf[..n]);
        }
        w.finish().await.map(|_| ()).map_err(|e| e.to_string())
    }

    /// The objects under an app's (or one of its streams') prefix, at most `limit`.
    pub async fn list(&self, sdk_app_id: u64, stem: Option<&str>, limit: usize) -> Vec<Object> {
        use futures_util::StreamExt;
        let prefix = match stem {
            Some(s) => format!("{}{sdk_app_id}/{s}/", self.prefix),
            None => format!("{}{sdk_app_id}/", self.prefix),
        };
        let prefix = ObjectPath::from(prefix.trim_end_matches('/'));
        let mut out = Vec::new();
        let mut items = self.store.list(Some(&prefix));
        while let Some(item) = items.next().await {
            match item {
                Ok(m) => out.push(Object {
                    key: m.location.to_string(),
                    size: m.size,
                    modified_ms: m.last_modified.timestamp_millis().max(0) as u64,
                }),
                Err(e) => {
                    warn!(error = %e, "listing the recording bucket failed");
                    break;
                }
            }
            if out.len() >= limit {
                break;
            }
        }
        out
    }
}
