//! The `weir` binary: `serve`, `token`, `keygen`. Errors end here as `anyhow`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use weir::auth::ec::Curve;
use weir::cli::{self, TokenCommand};

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "Self-hosted WebRTC SFU and RTMP/WebRTC gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of a variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the server. Without a configuration file, a development app with fresh
    /// keys is generated and its credentials printed.
    Serve {
        #[arg(long, env = "WEIR_CONFIG")]
        config: Option<PathBuf>,
        /// Development mode only: the address every listener binds (default 127.0.0.1;
        /// 0.0.0.0 lets other machines in, and get tokens).
        #[arg(long)]
        bind: Option<String>,
    },
    /// Issue and verify userSigs, privateMapKeys and signed live URLs.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The cluster as Redis knows it: nodes, their load, rooms.
    Cluster {
        #[command(subcommand)]
        what: ClusterCommand,
    },
    /// Make an ECDSA key pair (P-256 for ES256 JWTs and v1 tokens; secp256k1 for legacy v1).
    Keygen {
        #[arg(long, value_enum, default_value = "p256")]
        curve: CurveArg,
        /// Write PREFIX.key (private, mode 600) and PREFIX.pub instead of printing.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Every live node (id, region, addresses, load, draining) and the rooms each serves.
    Status {
        /// The Redis URL; default: `[cluster] redis_url` of the configuration.
        #[arg(long, env = "WEIR_CLUSTER_REDIS_URL")]
        redis: Option<String>,
        #[arg(long, env = "WEIR_CONFIG")]
        config: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CurveArg {
    P256,
    Secp256k1,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config, bind } => weir::server::main(config, bind).map(|()| true),
        Command::Token(cmd) => cli::run_token(cmd),
        Command::Cluster {
            what:
                ClusterCommand::Status {
                    redis,
                    config,
                    json,
                },
        } => weir::server::cluster::status(redis, config, json).map(|()| true),
        Command::Keygen { curve, out } => {
            let curve = match curve {
                CurveArg::P256 => Curve::P256,
                CurveArg::Secp256k1 => Curve::Secp256k1,
            };
            cli::run_keygen(curve, out.as_deref()).map(|()| true)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
