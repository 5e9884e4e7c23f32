//! HTTP: health, readiness and metrics (signaling joins in the SFU work).

use anyhow::{Context, Result};
use axum::routing::get;
use axum::Router;
use tracing::info;

use crate::auth::Keyring;
use crate::config::Config;

pub async fn serve(config: Config, _keyring: Keyring) -> Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(|| async { "ready\n" }));
    let listener = tokio::net::TcpListener::bind(&config.server.http_addr)
        .await
        .with_context(|| format!("binding HTTP on {}", config.server.http_addr))?;
    info!(addr = %listener.local_addr()?, "HTTP listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    info!("shutdown requested");
}
