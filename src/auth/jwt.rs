//! ES256 JWTs, for deployments that want a standard token instead of Tencent's.
//!
//! The JOSE framing is small enough to own: it lets the verifier take a fixed clock
//! and return the same typed errors as the Tencent path, and it keeps one copy of
//! p256 (the curve arithmetic is the `p256` crate's, not ours). Only `ES256` is
//! accepted, with a `kid` that names one of the app's keys; `alg: none` and HMAC
//! algorithms are refused before anything else is looked at.
//!
//! Claims: `sub` (userID), `sdkappid` (number), `iat`, `exp` (expired at and after
//! `exp`), optional `nbf`; a privateMapKey adds `roomid` (number) or `strroomid`
//! (string) and `priv` (the privilege bitmap).

use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use ecdsa::signature::{Signer, Verifier};
use serde::{Deserialize, Serialize};

use super::{AuthError, Privileges, RoomId};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtClaims {
    pub sub: String,
    pub sdkappid: u64,
    pub iat: u64,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roomid: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strroomid: Option<String>,
    #[serde(default, rename = "priv", skip_serializing_if = "Option::is_none")]
    pub privileges: Option<u32>,
}

impl JwtClaims {
    pub fn is_private_map_key(&self) -> bool {
        self.privileges.is_some() || self.roomid.is_some() || self.strroomid.is_some()
    }

    /// The room a privateMapKey JWT is for.
    pub fn room(&self) -> Result<RoomId, AuthError> {
        match (self.roomid, &self.strroomid) {
            (Some(n), None) => u32::try_from(n)
                .ok()
                .filter(|&n| n != 0)
                .map(RoomId::Num)
                .ok_or_else(|| AuthError::BadField {
                    field: "roomid",
                    reason: format!("{n} is not a room number in 1..=4294967295"),
                }),
            (None, Some(s)) if !s.is_empty() => Ok(RoomId::Str(s.clone())),
            (None, Some(_)) => Err(AuthError::BadField {
                field: "strroomid",
                reason: "empty".into(),
            }),
            (Some(_), Some(_)) => Err(AuthError::BadField {
                field: "roomid",
                reason: "both roomid and strroomid are set".into(),
            }),
            (None, None) => Err(AuthError::MissingField { field: "roomid" }),
        }
    }

    pub fn privileges(&self) -> Result<Privileges, AuthError> {
        self.privileges
            .map(Privileges)
            .ok_or(AuthError::MissingField { field: "priv" })
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

fn b64url(part: &str, what: &str) -> Result<Vec<u8>, AuthError> {
    URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .or_else(|_| URL_SAFE.decode(part))
        .map_err(|e| AuthError::JwtMalformed(format!("{what} is not base64url: {e}")))
}

/// A JWT is recognised by its shape: three parts separated by two dots.
pub fn looks_like_jwt(token: &str) -> bool {
    token.bytes().filter(|&b| b == b'.').count() == 2
}

/// The `kid` of a JWT's header, read without verifying anything.
pub fn peek_kid(token: &str) -> Result<String, AuthError> {
    let header = token
        .split('.')
        .next()
        .ok_or_else(|| AuthError::JwtMalformed("no header".into()))?;
    let header: Header = serde_json::from_slice(&b64url(header, "header")?)
        .map_err(|e| AuthError::JwtMalformed(format!("header: {e}")))?;
    if header.alg != "ES256" {
        return Err(AuthError::JwtAlgorithm { got: header.alg });
    }
    header
        .kid
        .ok_or_else(|| AuthError::JwtMalformed("header has no `kid`".into()))
}

/// Checks the signature with `key` and returns the claims; expiry and identity
/// checks are the caller's (they differ between userSig and privateMapKey).
pub fn verify_signature(
    token: &str,
    key: &p256::ecdsa::VerifyingKey,
    sdk_app_id: u64,
) -> Result<JwtClaims, AuthError> {
    if token.len() > super::envelope::MAX_TOKEN_LEN {
        return Err(AuthError::TooLong {
            len: token.len(),
            limit: super::envelope::MAX_TOKEN_LEN,
        });
    }
    peek_kid(token)?;
    let mut parts = token.split('.');
    let (header, payload, sig) = match (parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s)) => (h, p, s),
        _ => {
            return Err(AuthError::JwtMalformed(
                "expected header.payload.signature".into(),
            ))
        }
    };
    let sig = b64url(sig, "signature")?;
    let sig = p256::ecdsa::Signature::from_slice(&sig).map_err(|_| {
        AuthError::JwtMalformed(format!(
            "ES256 signature must be 64 bytes (r || s), found {}",
            sig.len()
        ))
    })?;
    let sig = sig.normalize_s().unwrap_or(sig);
    let signed = &token[..header.len() + 1 + payload.len()];
    if key.verify(signed.as_bytes(), &sig).is_err() {
        return Err(AuthError::BadSignature {
            key: "JWT key",
            sdk_app_id,
        });
    }
    serde_json::from_slice(&b64url(payload, "payload")?)
        .map_err(|e| AuthError::JwtMalformed(format!("claims: {e}")))
}

/// Signs claims as an ES256 JWT with a `kid` header.
pub fn sign(claims: &JwtClaims, kid: &str, key: &p256::ecdsa::SigningKey) -> String {
    let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": kid});
    let mut token = URL_SAFE_NO_PAD.encode(header.to_string());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialize")));
    let sig: p256::ecdsa::Signature = key.sign(token.as_bytes());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(sig.to_bytes()));
    token
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alg_none_and_hmac_are_refused() {
        for alg in ["none", "HS256", "RS256"] {
            let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","kid":"k"}}"#));
            let token = format!("{header}.e30.");
            let key = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
            assert_eq!(
                verify_signature(&token, key.verifying_key(), 1).unwrap_err(),
                AuthError::JwtAlgorithm { got: alg.into() }
            );
        }
    }

    #[test]
    fn signature_covers_header_and_payload() {
        let key = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        let claims = JwtClaims {
            sub: "alice".into(),
            sdkappid: 1,
            iat: 10,
            exp: 20,
            nbf: None,
            roomid: None,
            strroomid: None,
            privileges: None,
        };
        let token = sign(&claims, "k1", &key);
        assert_eq!(
            verify_signature(&token, key.verifying_key(), 1).unwrap(),
            claims
        );
        let forged = JwtClaims {
            sub: "mallory".into(),
            ..claims
        };
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[1] = &forged_payload;
        assert!(matches!(
            verify_signature(&parts.join("."), key.verifying_key(), 1),
            Err(AuthError::BadSignature { .. })
        ));
    }
}
