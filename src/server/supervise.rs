//! Supervision of the tasks whose death matters.
//!
//! The media task, the control task and the accept loops each serve the whole node:
//! if one of them panics or returns while the node is not stopping, nothing else
//! would notice (their handles were dropped), signaling would keep admitting people
//! into a node that forwards nothing, and `/healthz` would say ok. So each runs under
//! `spawn`, which catches its end, logs it, counts it in `weir_task_failures_total`
//! and records the first failure. From then on `/healthz` and `/readyz` answer 503
//! with the reason, joins, publishes and plays are refused, and `Server::failed`
//! resolves: the binary then exits non-zero, so systemd or Kubernetes restarts it.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures_util::FutureExt;
use tokio::sync::watch;
use tracing::error;

use crate::metrics::Metrics;

/// The node's health: the first failure of a supervised task, if any.
#[derive(Clone)]
pub struct Supervisor {
    failure: watch::Sender<Option<String>>,
    stopping: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl Supervisor {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            failure: watch::channel(None).0,
            stopping: Arc::new(AtomicBool::new(false)),
            metrics,
        }
    }

    /// Runs `task` as the part `part` of the node; its end is a failure unless the
    /// node is stopping.
    pub fn spawn<F>(&self, part: &'static str, task: F) -> tokio::task::JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let me = self.clone();
        tokio::spawn(async move {
            let why = match AssertUnwindSafe(task).catch_unwind().await {
                Ok(()) if me.stopping.load(Ordering::Relaxed) => return,
                Ok(()) => "stopped".to_owned(),
                Err(panic) => format!("panicked: {}", panic_message(&*panic)),
            };
            me.fail(part, &why);
        })
    }

    /// Records that `part` can no longer serve.
    pub fn fail(&self, part: &str, why: &str) {
        error!(
            part,
            why, "a part of the node died: it cannot serve; health checks now fail"
        );
        self.metrics.task_failures.with_label_values(&[part]).inc();
        let reason = format!("the {part} task {why}");
        self.failure.send_if_modified(|f| {
            if f.is_none() {
                *f = Some(reason);
                true
            } else {
                false
            }
        });
    }

    /// The node is stopping: supervised tasks may end from now on.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// The first failure, if there was one.
    pub fn failure(&self) -> Option<String> {
        self.failure.borrow().clone()
    }

    /// Resolves with the first failure.
    pub async fn failed(&self) -> String {
        let mut rx = self.failure.subscribe();
        loop {
            if let Some(f) = rx.borrow_and_update().clone() {
                return f;
            }
            if rx.changed().await.is_err() {
                // Never: `self` holds the sender.
                std::future::pending::<()>().await;
            }
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_task_is_a_failure_and_a_stop_while_stopping_is_not() {
        let s = Supervisor::new(Arc::new(Metrics::new()));
        s.spawn("quiet", async {}).await.unwrap();
        assert_eq!(s.failure().as_deref(), Some("the quiet task stopped"));

        let s = Supervisor::new(Arc::new(Metrics::new()));
        s.stopping();
        s.spawn("quiet", async {}).await.unwrap();
        assert_eq!(s.failure(), None);
        s.spawn("media", async { panic!("boom {}", 7) })
            .await
            .unwrap();
        s.spawn("control", async { panic!("later") }).await.unwrap();
        assert_eq!(s.failed().await, "the media task panicked: boom 7");
        assert!(s
            .metrics
            .render()
            .contains("weir_task_failures_total{part=\"media\"} 1"));
    }
}
