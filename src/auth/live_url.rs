//! Hotlink-protected live URLs (Tencent CSS "txSecret"):
//! `txSecret = lowercase_hex(MD5(key + streamName + txTime))`.
//!
//! `txTime` is the URL's expiry in hexadecimal and is hashed **exactly as written**
//! (`5C271099` and `5c271099` give different secrets). `streamName` is the last path
//! segment without the app and without the extension. Push and play URLs use separate
//! keys; a play URL stays valid for the app's configured extra validity past `txTime`.

use md5::{Digest, Md5};
use subtle::ConstantTimeEq;

use super::AuthError;

/// Extensions a play URL may carry after the stream name.
const EXTENSIONS: [&str; 5] = ["flv", "m3u8", "ts", "mp4", "sdp"];

/// Which key signs the URL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveUrlKind {
    Push,
    Play,
}

impl LiveUrlKind {
    fn key_name(self) -> &'static str {
        match self {
            LiveUrlKind::Push => "push",
            LiveUrlKind::Play => "play",
        }
    }
}

/// `lowercase_hex(MD5(key + stream + tx_time))`.
pub fn tx_secret(key: &str, stream: &str, tx_time: &str) -> String {
    let mut md5 = Md5::new();
    md5.update(key.as_bytes());
    md5.update(stream.as_bytes());
    md5.update(tx_time.as_bytes());
    hex::encode(md5.finalize())
}

/// A live URL split into what the signature and the routing need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveUrl {
    /// The application path segment, `live` by default.
    pub app: String,
    /// The stream name, without extension.
    pub stream: String,
    /// The extension the URL had (`flv` for HTTP-FLV), if any.
    pub extension: Option<String>,
    /// Decoded query parameters in order.
    pub query: Vec<(String, String)>,
}

impl LiveUrl {
    /// Parses `scheme://host[:port]/app/stream[.ext][?query]`.
    pub fn parse(url: &str) -> Result<Self, AuthError> {
        let parsed =
            url::Url::parse(url).map_err(|e| AuthError::BadUrl(format!("{url:?}: {e}")))?;
        let query = parsed
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let (app, stream, extension) = split_path(parsed.path())?;
        Ok(Self {
            app,
            stream,
            extension,
            query,
        })
    }

    /// A query parameter; names compare ignoring ASCII case (`txSecret`, `txsecret`).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Splits `/app/stream.ext` into its parts.
pub fn split_path(path: &str) -> Result<(String, String, Option<String>), AuthError> {
    let mut segments = path.trim_start_matches('/').split('/');
    let (app, last) = match (segments.next(), segments.next(), segments.next()) {
        (Some(app), Some(last), None) if !app.is_empty() && !last.is_empty() => (app, last),
        _ => {
            return Err(AuthError::BadUrl(format!(
                "path {path:?} is not /<app>/<stream>"
            )))
        }
    };
    let (stream, extension) = match last.rsplit_once('.') {
        Some((name, ext)) if EXTENSIONS.contains(&ext) && !name.is_empty() => {
            (name, Some(ext.to_owned()))
        }
        _ => (last, None),
    };
    Ok((app.to_owned(), stream.to_owned(), extension))
}

/// Checks `txSecret`/`txTime` for `stream` and returns the last valid second.
///
/// Push URLs are valid while `now <= txTime`; play URLs while
/// `now <= txTime + play_validity_s`.
pub fn verify(
    kind: LiveUrlKind,
    key: &str,
    play_validity_s: u64,
    stream: &str,
    tx_secret_given: &str,
    tx_time: &str,
    now: u64,
) -> Result<u64, AuthError> {
    if tx_time.is_empty() || tx_time.len() > 16 || !tx_time.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AuthError::BadTxTime(tx_time.to_owned()));
    }
    let expiry =
        u64::from_str_radix(tx_time, 16).map_err(|_| AuthError::BadTxTime(tx_time.into()))?;
    let expected = tx_secret(key, stream, tx_time);
    // txSecret is lowercase hex in every sample; compare case-insensitively, in constant time.
    let given = tx_secret_given.to_ascii_lowercase();
    if given.len() != expected.len() || !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        return Err(AuthError::TxSecretMismatch {
            key: kind.key_name(),
            stream: stream.to_owned(),
        });
    }
    let valid_until = match kind {
        LiveUrlKind::Push => expiry,
        LiveUrlKind::Play => expiry.saturating_add(play_validity_s),
    };
    if now > valid_until {
        return Err(AuthError::Expired {
            what: match kind {
                LiveUrlKind::Push => "push URL",
                LiveUrlKind::Play => "play URL",
            },
            expired_at: valid_until,
            now,
        });
    }
    Ok(valid_until)
}

/// Checks a whole URL: the stream name comes from its path.
pub fn verify_url(
    kind: LiveUrlKind,
    url: &LiveUrl,
    key: &str,
    play_validity_s: u64,
    now: u64,
) -> Result<u64, AuthError> {
    let secret = url
        .param("txSecret")
        .ok_or(AuthError::MissingParam("txSecret"))?;
    let time = url
        .param("txTime")
        .ok_or(AuthError::MissingParam("txTime"))?;
    verify(kind, key, play_validity_s, &url.stream, secret, time, now)
}

/// Appends `txSecret` and `txTime` (8-digit uppercase hex, as Tencent's samples write
/// it) to a URL, replacing any there.
pub fn sign_url(url: &str, key: &str, expires_at: u64) -> Result<String, AuthError> {
    let live = LiveUrl::parse(url)?;
    let mut parsed = url::Url::parse(url).map_err(|e| AuthError::BadUrl(e.to_string()))?;
    let tx_time = format!("{expires_at:08X}");
    let secret = tx_secret(key, &live.stream, &tx_time);
    let kept: Vec<(String, String)> = live
        .query
        .into_iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("txSecret") && !k.eq_ignore_ascii_case("txTime"))
        .collect();
    {
        let mut q = parsed.query_pairs_mut();
        q.clear();
        for (k, v) in &kept {
            q.append_pair(k, v);
        }
        q.append_pair("txSecret", &secret);
        q.append_pair("txTime", &tx_time);
    }
    Ok(parsed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_examples() {
        // intl.cloud.tencent.com/document/product/267/31560
        assert_eq!(
            tx_secret("e12c46f2612d5106e2034781ab261ca3", "test", "5C271099"),
            "f85a2ab363fe4deaffef9754d79da6fe"
        );
        // CSS FAQ hotlink protection example, and its transcoded stream
        assert_eq!(
            tx_secret("somestring", "test", "5c2acacc"),
            "b77e812107e1d8b8f247885a46e1bd34"
        );
        assert_eq!(
            tx_secret("somestring", "test_900", "5c2acacc"),
            "4beae959b16c77da6a65c7edda1dfefe"
        );
    }

    #[test]
    fn official_urls_verify_at_their_time() {
        let push = LiveUrl::parse("rtmp://livepush.tcloud.com/live/test?txSecret=f85a2ab363fe4deaffef9754d79da6fe&txTime=5C271099").unwrap();
        assert_eq!((push.app.as_str(), push.stream.as_str()), ("live", "test"));
        let key = "e12c46f2612d5106e2034781ab261ca3";
        assert_eq!(
            verify_url(LiveUrlKind::Push, &push, key, 0, 1_546_064_025),
            Ok(1_546_064_025)
        );
        assert!(matches!(
            verify_url(LiveUrlKind::Push, &push, key, 0, 1_546_064_026),
            Err(AuthError::Expired { .. })
        ));
        let play = LiveUrl::parse(
            "http://domain/live/test.flv?txTime=5c2acacc&txSecret=b77e812107e1d8b8f247885a46e1bd34",
        )
        .unwrap();
        assert_eq!(play.extension.as_deref(), Some("flv"));
        let t = 0x5c2acacc;
        // Play URLs get the extra validity.
        assert_eq!(
            verify_url(LiveUrlKind::Play, &play, "somestring", 600, t + 600),
            Ok(t + 600)
        );
        assert!(verify_url(LiveUrlKind::Play, &play, "somestring", 600, t + 601).is_err());
    }

    #[test]
    fn case_of_tx_time_matters_and_wrong_key_fails() {
        let url = LiveUrl::parse(
            "rtmp://h/live/test?txSecret=b77e812107e1d8b8f247885a46e1bd34&txTime=5C2ACACC",
        )
        .unwrap();
        assert!(matches!(
            verify_url(LiveUrlKind::Play, &url, "somestring", 0, 0),
            Err(AuthError::TxSecretMismatch { .. })
        ));
        let bad_time = LiveUrl::parse("rtmp://h/live/test?txSecret=00&txTime=zz").unwrap();
        assert!(matches!(
            verify_url(LiveUrlKind::Push, &bad_time, "k", 0, 0),
            Err(AuthError::BadTxTime(_))
        ));
        let none = LiveUrl::parse("rtmp://h/live/test").unwrap();
        assert_eq!(
            verify_url(LiveUrlKind::Push, &none, "k", 0, 0),
            Err(AuthError::MissingParam("txSecret"))
        );
    }

    #[test]
    fn sign_then_verify() {
        let signed = sign_url(
            "rtmp://127.0.0.1:1935/live/room1_alice?foo=1",
            "pushkey",
            0x7000_0000,
        )
        .unwrap();
        assert!(signed.contains("txTime=70000000"), "{signed}");
        let url = LiveUrl::parse(&signed).unwrap();
        assert_eq!(url.param("foo"), Some("1"));
        assert!(verify_url(LiveUrlKind::Push, &url, "pushkey", 0, 0x6fff_ffff).is_ok());
        assert!(verify_url(LiveUrlKind::Push, &url, "playkey", 0, 0x6fff_ffff).is_err());
    }

    #[test]
    fn paths_must_be_app_and_stream() {
        assert!(split_path("/live").is_err());
        assert!(split_path("/a/b/c").is_err());
        assert_eq!(
            split_path("/live/s.x.flv").unwrap(),
            ("live".into(), "s.x".into(), Some("flv".into()))
        );
    }
}
