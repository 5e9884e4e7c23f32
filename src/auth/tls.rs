//! Tencent "TLS sig" tokens: v1 (ECDSA-SHA256) and v2 (HMAC-SHA256), plain (a userSig)
//! or with a userbuf (a privateMapKey).
//!
//! Both sign a text rebuilt from the JSON values, never the JSON bytes, so field order
//! and spacing do not matter. The text is byte-exact:
//!
//! * v1: `TLS.appid_at_3rd` (only if present), `TLS.account_type`, `TLS.identifier`,
//!   `TLS.sdk_appid`, `TLS.time`, `TLS.expire_after`, one `name:value\n` line each;
//!   with a userbuf all seven lines are always written (appid_at_3rd required).
//! * v2: `TLS.identifier`, `TLS.sdkappid`, `TLS.time`, `TLS.expire`
//!   [, `TLS.userbuf`], numbers in plain decimal.
//!
//! Expiry: v1 is expired iff `time + expire_after < now`; v2 iff `now > time + expire`.
//! Both make the token valid through the second `time + expire` inclusive.

use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

use super::ec::{PrivateKey, PublicKey};
use super::envelope::{self, text_field, uint_field, STANDARD_LENIENT};
use super::AuthError;

/// What the issuers write into `TLS.version` (unsigned, informational).
const V1_ISSUER_VERSION: &str = "201803230000";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    V1,
    V2,
}

/// A token whose signature has been checked against the app key, and the fields it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsClaims {
    pub version: TlsVersion,
    pub identifier: String,
    pub sdk_app_id: u64,
    pub issued_at: u64,
    /// Last valid second.
    pub expires_at: u64,
    pub userbuf: Option<Vec<u8>>,
}

/// The fields of an opened token, before any check.
struct Fields {
    version: TlsVersion,
    identifier: String,
    sdk_app_id: u64,
    time: u64,
    expire: u64,
    /// `TLS.userbuf` as written (its text is signed) and decoded.
    userbuf: Option<(String, Vec<u8>)>,
    sig_text: String,
}

fn read_fields(doc: &Map<String, Value>) -> Result<Fields, AuthError> {
    let version = match doc.get("TLS.ver") {
        Some(Value::String(v)) if v == "2.0" => TlsVersion::V2,
        _ => TlsVersion::V1,
    };
    let identifier = text_field(doc, "TLS.identifier")?;
    let (sdk_app_id, expire) = match version {
        TlsVersion::V1 => (
            uint_field(doc, "TLS.sdk_appid")?,
            uint_field(doc, "TLS.expire_after")?,
        ),
        TlsVersion::V2 => (
            uint_field(doc, "TLS.sdkappid")?,
            // Go's issuer omits a zero `TLS.expire` (omitempty).
            match doc.get("TLS.expire") {
                None => 0,
                Some(_) => uint_field(doc, "TLS.expire")?,
            },
        ),
    };
    let time = uint_field(doc, "TLS.time")?;
    let userbuf = match doc.get("TLS.userbuf") {
        None => None,
        Some(_) => {
            let text = text_field(doc, "TLS.userbuf")?;
            let bytes = STANDARD_LENIENT
                .decode(text.as_bytes())
                .map_err(|e| AuthError::Userbuf(format!("TLS.userbuf is not base64: {e}")))?;
            Some((text, bytes))
        }
    };
    let sig_text = text_field(doc, "TLS.sig")?;
    Ok(Fields {
        version,
        identifier,
        sdk_app_id,
        time,
        expire,
        userbuf,
        sig_text,
    })
}

fn v1_content(doc: &Map<String, Value>, with_userbuf: bool) -> Result<String, AuthError> {
    let mut content = String::with_capacity(256);
    let mut line = |name: &'static str, value: String| {
        content.push_str(name);
        content.push(':');
        content.push_str(&value);
        content.push('\n');
    };
    if with_userbuf || doc.contains_key("TLS.appid_at_3rd") {
        line("TLS.appid_at_3rd", text_field(doc, "TLS.appid_at_3rd")?);
    }
    line("TLS.account_type", text_field(doc, "TLS.account_type")?);
    line("TLS.identifier", text_field(doc, "TLS.identifier")?);
    line("TLS.sdk_appid", text_field(doc, "TLS.sdk_appid")?);
    line("TLS.time", text_field(doc, "TLS.time")?);
    line("TLS.expire_after", text_field(doc, "TLS.expire_after")?);
    if with_userbuf {
        line("TLS.userbuf", text_field(doc, "TLS.userbuf")?);
    }
    Ok(content)
}

fn v2_content(
    identifier: &str,
    sdk_app_id: u64,
    time: u64,
    expire: u64,
    userbuf_b64: Option<&str>,
) -> String {
    let mut content = format!(
        "TLS.identifier:{identifier}\nTLS.sdkappid:{sdk_app_id}\nTLS.time:{time}\nTLS.expire:{expire}\n"
    );
    if let Some(b) = userbuf_b64 {
        content.push_str("TLS.userbuf:");
        content.push_str(b);
        content.push('\n');
    }
    content
}

fn hmac_sha256(secret: &str, content: &str) -> Hmac<Sha256> {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length");
    mac.update(content.as_bytes());
    mac
}

/// The keys a Tencent token may be checked with.
pub struct TlsKeys<'a> {
    pub sdk_app_id: u64,
    pub public_key: Option<&'a PublicKey>,
    pub secret_key: Option<&'a str>,
}

/// Opens and checks a Tencent token, in the order Tencent's C++ verifier checks:
/// fields, userID (13), SDKAppID (14), expiry (9), signature (8).
pub fn verify(
    token: &str,
    keys: &TlsKeys<'_>,
    expected_user: &str,
    now: u64,
) -> Result<TlsClaims, AuthError> {
    let doc = envelope::open(token)?;
    let f = read_fields(&doc)?;
    let what = if f.userbuf.is_some() {
        "privateMapKey"
    } else {
        "userSig"
    };
    if f.identifier != expected_user {
        return Err(AuthError::UserMismatch {
            what,
            expected: expected_user.to_owned(),
            got: f.identifier,
        });
    }
    if f.sdk_app_id != keys.sdk_app_id {
        return Err(AuthError::AppMismatch {
            what,
            expected: keys.sdk_app_id,
            got: f.sdk_app_id,
        });
    }
    let expires_at = f.time.saturating_add(f.expire);
    if now > expires_at {
        return Err(AuthError::Expired {
            what,
            expired_at: expires_at,
            now,
        });
    }
    let sig_clean: String = f.sig_text.split_ascii_whitespace().collect();
    let sig = STANDARD_LENIENT
        .decode(sig_clean.as_bytes())
        .map_err(|e| AuthError::SigBase64(e.to_string()))?;
    match f.version {
        TlsVersion::V1 => {
            let key = keys.public_key.ok_or(AuthError::NoKey {
                sdk_app_id: keys.sdk_app_id,
                what: "public_key_pem (v1 ECDSA)",
                purpose: "verifying a v1 token",
            })?;
            let content = v1_content(&doc, f.userbuf.is_some())?;
            if !key.verify_der(content.as_bytes(), &sig) {
                return Err(AuthError::BadSignature {
                    key: "v1 public key",
                    sdk_app_id: keys.sdk_app_id,
                });
            }
        }
        TlsVersion::V2 => {
            let secret = keys.secret_key.ok_or(AuthError::NoKey {
                sdk_app_id: keys.sdk_app_id,
                what: "secret_key (v2 HMAC)",
                purpose: "verifying a v2 token",
            })?;
            let content = v2_content(
                &f.identifier,
                f.sdk_app_id,
                f.time,
                f.expire,
                f.userbuf.as_ref().map(|(text, _)| text.as_str()),
            );
            // `verify_slice` compares in constant time.
            if hmac_sha256(secret, &content).verify_slice(&sig).is_err() {
                return Err(AuthError::BadSignature {
                    key: "v2 secret key",
                    sdk_app_id: keys.sdk_app_id,
                });
            }
        }
    }
    Ok(TlsClaims {
        version: f.version,
        identifier: f.identifier,
        sdk_app_id: f.sdk_app_id,
        issued_at: f.time,
        expires_at,
        userbuf: f.userbuf.map(|(_, bytes)| bytes),
    })
}

/// Issues a v1 token as Tencent's libraries do (account_type and appid_at_3rd "0").
pub fn issue_v1(
    key: &PrivateKey,
    sdk_app_id: u64,
    identifier: &str,
    now: u64,
    expire: u64,
    userbuf: Option<&[u8]>,
) -> String {
    let mut doc = Map::new();
    let s = |v: String| Value::String(v);
    doc.insert("TLS.account_type".into(), s("0".into()));
    doc.insert("TLS.identifier".into(), s(identifier.into()));
    doc.insert("TLS.appid_at_3rd".into(), s("0".into()));
    doc.insert("TLS.sdk_appid".into(), s(sdk_app_id.to_string()));
    doc.insert("TLS.expire_after".into(), s(expire.to_string()));
    doc.insert("TLS.version".into(), s(V1_ISSUER_VERSION.into()));
    doc.insert("TLS.time".into(), s(now.to_string()));
    if let Some(buf) = userbuf {
        let b64 = base64::engine::general_purpose::STANDARD.encode(buf);
        doc.insert("TLS.userbuf".into(), s(b64));
    }
    let content = v1_content(&doc, userbuf.is_some()).expect("all fields were just written");
    let sig = key.sign_der(content.as_bytes());
    doc.insert(
        "TLS.sig".into(),
        s(base64::engine::general_purpose::STANDARD.encode(sig)),
    );
    envelope::seal(&doc)
}

/// Issues a v2 token exactly as tls-sig-api-v2 does.
pub fn issue_v2(
    secret: &str,
    sdk_app_id: u64,
    identifier: &str,
    now: u64,
    expire: u64,
    userbuf: Option<&[u8]>,
) -> String {
    let userbuf_b64 = userbuf.map(|b| base64::engine::general_purpose::STANDARD.encode(b));
    let content = v2_content(identifier, sdk_app_id, now, expire, userbuf_b64.as_deref());
    let sig = hmac_sha256(secret, &content).finalize().into_bytes();
    let mut doc = Map::new();
    doc.insert("TLS.ver".into(), "2.0".into());
    doc.insert("TLS.identifier".into(), identifier.into());
    doc.insert("TLS.sdkappid".into(), sdk_app_id.into());
    doc.insert("TLS.expire".into(), expire.into());
    doc.insert("TLS.time".into(), now.into());
    if let Some(b) = userbuf_b64 {
        doc.insert("TLS.userbuf".into(), b.into());
    }
    doc.insert(
        "TLS.sig".into(),
        base64::engine::general_purpose::STANDARD.encode(sig).into(),
    );
    envelope::seal(&doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_content_is_byte_exact() {
        let doc: Map<String, Value> = serde_json::from_str(
            r#"{"TLS.account_type":"0","TLS.identifier":"abc","TLS.appid_at_3rd":"0",
                "TLS.sdk_appid":"1400001052","TLS.expire_after":"999999999","TLS.time":"1521991192"}"#,
        )
        .unwrap();
        assert_eq!(
            v1_content(&doc, false).unwrap(),
            "TLS.appid_at_3rd:0\nTLS.account_type:0\nTLS.identifier:abc\nTLS.sdk_appid:1400001052\nTLS.time:1521991192\nTLS.expire_after:999999999\n"
        );
    }

    #[test]
    fn v2_sig_matches_official_output() {
        // V2-A content and TLS.sig from the official Node/Python libraries at a frozen clock.
        let content = v2_content("xiaojun", 1_400_000_000, 1_700_000_000, 15_552_000, None);
        let mac = hmac_sha256(
            "5bd2850fff3ecb11d7c805251c51ee463a25727bddc2385f3fa8bfee1bb93b5e",
            &content,
        );
        assert_eq!(
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()),
            "LvA7d/Iw7gSsnskvVzBDPOCCDbuNCw4GHwTC0bip+B4="
        );
    }
}
