//! `weir token` and `weir keygen`: issue and check every credential Weir accepts,
//! from a shell, with a fixed clock when asked (`--now`).
//!
//! Keys come from a configuration file's `[[app]]` (`--config`, `WEIR_CONFIG`, or
//! `weir-dev.toml` if the development server wrote one here), and flags add to or
//! override them, so both "my backend's keys" and "the dev server's keys" work.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};

use crate::auth::ec::{Curve, PrivateKey};
use crate::auth::live_url::{self, LiveUrl, LiveUrlKind};
use crate::auth::{unix_now, AppKeys, Privileges, RoomId, TokenKind};
use crate::config::{AppConfig, Config, JwtKeyConfig, JwtPrivateKeyConfig};

/// Where the development server writes its generated app.
pub const DEV_CONFIG_FILE: &str = "weir-dev.toml";

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Issue a userSig (identity).
    Usersig {
        #[command(flatten)]
        who: Who,
        #[command(flatten)]
        issue: IssueArgs,
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// Issue a privateMapKey (a room ticket with privilege bits).
    Privatemapkey {
        #[command(flatten)]
        who: Who,
        #[command(flatten)]
        room: RoomArgs,
        /// Privilege bitmap, decimal or 0x hex: 0x01 create, 0x02 enter, 0x04 send audio,
        /// 0x08 receive audio, 0x10 send video, 0x20 receive video, 0x40/0x80 sub-stream.
        #[arg(long, default_value = "255", value_parser = parse_privileges)]
        privileges: Privileges,
        #[command(flatten)]
        issue: IssueArgs,
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// Verify a userSig, or a privateMapKey when a room is given; prints the claims as JSON.
    Verify {
        /// The token text.
        token: String,
        #[command(flatten)]
        who: Who,
        #[command(flatten)]
        room: RoomArgs,
        /// Also require these privilege bits (privateMapKey only).
        #[arg(long, value_parser = parse_privileges)]
        require: Option<Privileges>,
        /// Check at this Unix time instead of now.
        #[arg(long)]
        now: Option<u64>,
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// Add txSecret/txTime to a push or play URL.
    SignUrl {
        url: String,
        #[arg(long, value_enum)]
        kind: UrlKind,
        /// SDKAppID whose live keys sign the URL.
        #[arg(long)]
        sdkappid: u64,
        /// Expiry as Unix seconds (becomes txTime).
        #[arg(long, conflicts_with = "valid_for")]
        expire_at: Option<u64>,
        /// Expiry as seconds from now.
        #[arg(long, default_value = "86400")]
        valid_for: u64,
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// Check a push or play URL's txSecret/txTime; prints the stream and expiry as JSON.
    CheckUrl {
        url: String,
        #[arg(long, value_enum)]
        kind: UrlKind,
        #[arg(long)]
        sdkappid: u64,
        #[arg(long)]
        now: Option<u64>,
        #[command(flatten)]
        keys: KeyArgs,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum UrlKind {
    Push,
    Play,
}

impl From<UrlKind> for LiveUrlKind {
    fn from(k: UrlKind) -> Self {
        match k {
            UrlKind::Push => LiveUrlKind::Push,
            UrlKind::Play => LiveUrlKind::Play,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KindArg {
    V1,
    V2,
    Jwt,
}

#[derive(Debug, Args)]
pub struct Who {
    #[arg(long)]
    pub sdkappid: u64,
    #[arg(long)]
    pub userid: String,
}

#[derive(Debug, Args)]
pub struct RoomArgs {
    /// Numeric room (1..=4294967295).
    #[arg(long, conflicts_with = "strroomid")]
    pub roomid: Option<u32>,
    /// String room.
    #[arg(long)]
    pub strroomid: Option<String>,
}

impl RoomArgs {
    fn room(&self) -> Option<RoomId> {
        match (self.roomid, &self.strroomid) {
            (Some(n), _) => Some(RoomId::Num(n)),
            (None, Some(s)) => Some(RoomId::Str(s.clone())),
            (None, None) => None,
        }
    }
}

#[derive(Debug, Args)]
pub struct IssueArgs {
    /// Token family.
    #[arg(long, value_enum, default_value = "v2")]
    pub kind: KindArg,
    /// Validity in seconds (Tencent's libraries default to 180 days).
    #[arg(long, default_value = "15552000")]
    pub expire: u64,
    /// Issue as of this Unix time instead of now.
    #[arg(long)]
    pub now: Option<u64>,
}

#[derive(Debug, Args, Default)]
pub struct KeyArgs {
    /// Configuration file whose `[[app]]` supplies the keys.
    #[arg(long, env = "WEIR_CONFIG")]
    pub config: Option<PathBuf>,
    /// v2 SDKSecretKey.
    #[arg(long)]
    pub secret_key: Option<String>,
    /// v1 public key PEM file.
    #[arg(long)]
    pub public_key: Option<PathBuf>,
    /// v1 private key PEM file (PKCS#8 or SEC1).
    #[arg(long)]
    pub private_key: Option<PathBuf>,
    /// JWT verifying key, `KID=PEM_FILE` (repeatable).
    #[arg(long, value_parser = parse_kid_file)]
    pub jwt_key: Vec<(String, PathBuf)>,
    /// JWT signing key, `KID=PEM_FILE`.
    #[arg(long, value_parser = parse_kid_file)]
    pub jwt_private_key: Vec<(String, PathBuf)>,
    /// Hotlink-protection push key.
    #[arg(long)]
    pub push_key: Option<String>,
    /// Hotlink-protection play key.
    #[arg(long)]
    pub play_key: Option<String>,
    /// Extra validity of play URLs, seconds.
    #[arg(long)]
    pub play_validity: Option<u64>,
}

fn parse_privileges(s: &str) -> Result<Privileges, String> {
    let s = s.trim();
    let value = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    value
        .map(Privileges)
        .map_err(|e| format!("{s:?} is not a bitmap (decimal or 0x hex): {e}"))
}

fn parse_kid_file(s: &str) -> Result<(String, PathBuf), String> {
    s.split_once('=')
        .map(|(k, f)| (k.to_owned(), PathBuf::from(f)))
        .ok_or_else(|| format!("{s:?} is not KID=FILE"))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

impl KeyArgs {
    /// The app's keys: the config file's entry for `sdk_app_id`, then the flags.
    fn app(&self, sdk_app_id: u64) -> Result<AppKeys> {
        let config_path = self.config.clone().or_else(|| {
            let dev = PathBuf::from(DEV_CONFIG_FILE);
            dev.exists().then_some(dev)
        });
        let mut app = match &config_path {
            Some(path) => Config::load(path)?
                .apps
                .into_iter()
                .find(|a| a.sdk_app_id == sdk_app_id)
                .unwrap_or(AppConfig {
                    sdk_app_id,
                    ..Default::default()
                }),
            None => AppConfig {
                sdk_app_id,
                ..Default::default()
            },
        };
        if let Some(s) = &self.secret_key {
            app.secret_key = Some(s.clone());
        }
        if let Some(p) = &self.public_key {
            app.public_key_pem = Some(read(p)?);
        }
        if let Some(p) = &self.private_key {
            app.private_key_pem = Some(read(p)?);
            if self.public_key.is_none() {
                app.public_key_pem = None; // derived from the private key
            }
        }
        for (kid, p) in &self.jwt_key {
            app.jwt_keys.retain(|k| &k.kid != kid);
            app.jwt_keys.push(JwtKeyConfig {
                kid: kid.clone(),
                public_key_pem: read(p)?,
                alg: None,
            });
        }
        if !self.jwt_private_key.is_empty() {
            app.jwt_private_keys.clear();
            for (kid, p) in &self.jwt_private_key {
                app.jwt_private_keys.push(JwtPrivateKeyConfig {
                    kid: kid.clone(),
                    private_key_pem: read(p)?,
                });
            }
        }
        if let Some(k) = &self.push_key {
            app.live_push_key = Some(k.clone());
        }
        if let Some(k) = &self.play_key {
            app.live_play_key = Some(k.clone());
        }
        if let Some(v) = self.play_validity {
            app.play_url_validity_s = v;
        }
        Ok(AppKeys::from_config(&app)?)
    }
}

fn kind(k: KindArg) -> TokenKind {
    match k {
        KindArg::V1 => TokenKind::V1,
        KindArg::V2 => TokenKind::V2,
        KindArg::Jwt => TokenKind::Jwt,
    }
}

/// Runs a `weir token` command; `Ok(false)` means "the token or URL is invalid"
/// (already reported on stderr), which the binary turns into exit code 1.
pub fn run_token(cmd: TokenCommand) -> Result<bool> {
    match cmd {
        TokenCommand::Usersig { who, issue, keys } => {
            let app = keys.app(who.sdkappid)?;
            let now = issue.now.unwrap_or_else(unix_now);
            println!(
                "{}",
                app.issue_user_sig(kind(issue.kind), &who.userid, now, issue.expire)?
            );
            Ok(true)
        }
        TokenCommand::Privatemapkey {
            who,
            room,
            privileges,
            issue,
            keys,
        } => {
            let app = keys.app(who.sdkappid)?;
            let Some(room) = room.room() else {
                bail!("a privateMapKey needs --roomid or --strroomid");
            };
            let now = issue.now.unwrap_or_else(unix_now);
            let token = app.issue_private_map_key(
                kind(issue.kind),
                &who.userid,
                &room,
                privileges,
                now,
                issue.expire,
            )?;
            println!("{token}");
            Ok(true)
        }
        TokenCommand::Verify {
            token,
            who,
            room,
            require,
            now,
            keys,
        } => {
            let app = keys.app(who.sdkappid)?;
            let now = now.unwrap_or_else(unix_now);
            let result = match room.room() {
                Some(room) => app
                    .verify_private_map_key(&token, &who.userid, &room, now)
                    .and_then(|t| {
                        require.map_or(Ok(()), |r| t.require(r))?;
                        Ok(serde_json::to_value(&t).expect("claims serialize"))
                    }),
                None => app
                    .verify_user_sig(&token, &who.userid, now)
                    .map(|id| serde_json::to_value(&id).expect("claims serialize")),
            };
            match result {
                Ok(claims) => {
                    println!("{}", serde_json::to_string_pretty(&claims)?);
                    Ok(true)
                }
                Err(e) => {
                    report_invalid(&e);
                    if matches!(e, crate::auth::AuthError::UnexpectedUserbuf) {
                        eprintln!("hint: pass --roomid or --strroomid to verify a privateMapKey");
                    }
                    Ok(false)
                }
            }
        }
        TokenCommand::SignUrl {
            url,
            kind,
            sdkappid,
            expire_at,
            valid_for,
            keys,
        } => {
            let app = keys.app(sdkappid)?;
            let expire_at = expire_at.unwrap_or_else(|| unix_now() + valid_for);
            println!(
                "{}",
                live_url::sign_url(&url, app.live_key(kind.into())?, expire_at)?
            );
            Ok(true)
        }
        TokenCommand::CheckUrl {
            url,
            kind,
            sdkappid,
            now,
            keys,
        } => {
            let app = keys.app(sdkappid)?;
            let now = now.unwrap_or_else(unix_now);
            let checked = LiveUrl::parse(&url).and_then(|u| {
                let until = app.verify_live_url(kind.into(), &u, now)?;
                Ok(serde_json::json!({"app": u.app, "stream": u.stream, "valid_until": until}))
            });
            match checked {
                Ok(v) => {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                    Ok(true)
                }
                Err(e) => {
                    report_invalid(&e);
                    Ok(false)
                }
            }
        }
    }
}

fn report_invalid(e: &crate::auth::AuthError) {
    match e.tencent_code() {
        Some(code) => eprintln!("invalid: {e} (Tencent error code {code})"),
        None => eprintln!("invalid: {e}"),
    }
}

/// `weir keygen`: a fresh key pair, private as PKCS#8 PEM, public as SPKI PEM.
pub fn run_keygen(curve: Curve, out: Option<&Path>) -> Result<()> {
    let key = PrivateKey::generate(curve);
    let private = key.to_pem();
    let public = key.public_key().to_pem();
    match out {
        None => print!("{private}{public}"),
        Some(prefix) => {
            let key_path = prefix.with_extension("key");
            let pub_path = prefix.with_extension("pub");
            write_private(&key_path, &private)?;
            std::fs::write(&pub_path, &public)
                .with_context(|| format!("writing {}", pub_path.display()))?;
            println!("{}\n{}", key_path.display(), pub_path.display());
        }
    }
    Ok(())
}

/// Writes a secret readable by its owner only.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}
