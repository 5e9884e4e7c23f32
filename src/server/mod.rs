//! The async shell: sockets, tasks and signals around the sans-I/O cores.

use std::path::PathBuf;

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::auth::Keyring;
use crate::config::Config;

mod http;

/// Loads the configuration (or makes a development one) and runs until SIGTERM/Ctrl-C.
pub fn main(config_path: Option<PathBuf>) -> Result<()> {
    let mut config = match &config_path {
        Some(path) => Config::load(path)?,
        None => Config::development(),
    };
    config.apply_env(std::env::vars())?;
    init_logging(&config.server.log_format);
    let keyring = Keyring::from_configs(&config.apps).context("loading app keys")?;
    if config_path.is_none() {
        announce_development(&config)?;
    }
    if keyring.apps().next().is_none() {
        warn!("no [[app]] is configured: nobody can join");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(http::serve(config, keyring))
}

fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Writes the generated development app next to the server and prints how to use it.
fn announce_development(config: &Config) -> Result<()> {
    let path = std::env::current_dir()
        .unwrap_or_else(|_| std::env::temp_dir())
        .join(crate::cli::DEV_CONFIG_FILE);
    crate::cli::write_private(&path, &config.to_toml())?;
    let app = &config.apps[0];
    warn!("DEVELOPMENT MODE: no configuration file was given, so a development app was generated");
    info!(
        sdk_app_id = app.sdk_app_id,
        secret_key = app.secret_key.as_deref().unwrap_or(""),
        keys_file = %path.display(),
        "development app (v1, v2 and JWT keys, live push/play keys are in the keys file)"
    );
    info!(
        "issue a userSig:        weir token usersig --config {} --sdkappid {} --userid alice",
        path.display(),
        app.sdk_app_id
    );
    info!(
        "issue a privateMapKey:  weir token privatemapkey --config {} --sdkappid {} --userid alice --roomid 1234",
        path.display(),
        app.sdk_app_id
    );
    Ok(())
}
