//! The one error type of the credential layer.
//!
//! Every refusal says what was wrong in words a backend developer can act on
//! (which field, what was expected and what was found, when it expired), and,
//! where Tencent's reference verifier (`tls-sig-api`, `tls_signature.h`) has a
//! numeric code for the same failure, carries that code so that logs and
//! signaling errors can be compared with what Tencent's SDKs report.

use super::privilege::Privileges;
use super::time::Utc;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token is empty")]
    Empty,
    #[error("token is {len} bytes long, more than the {limit} accepted")]
    TooLong { len: usize, limit: usize },
    #[error("token is not valid B64X (Tencent's base64 with `*`, `-`, `_`): {0}")]
    Base64(String),
    #[error("token does not inflate as zlib: {0}")]
    Zlib(String),
    #[error("token inflates to more than {limit} bytes; refused (zlib bomb?)")]
    Inflated { limit: usize },
    #[error("token is not a JSON object: {0}")]
    Json(String),
    #[error("field `{field}` is missing")]
    MissingField { field: &'static str },
    #[error("field `{field}` is malformed: {reason}")]
    BadField { field: &'static str, reason: String },
    #[error("`TLS.sig` is not valid base64: {0}")]
    SigBase64(String),
    #[error("signature does not verify with the {key} of app {sdk_app_id} (wrong key, or the token was altered)")]
    BadSignature { key: &'static str, sdk_app_id: u64 },
    #[error("{what} expired at {} , now is {}", Utc(*expired_at), Utc(*now))]
    Expired {
        what: &'static str,
        expired_at: u64,
        now: u64,
    },
    #[error("{what} is not valid before {}, now is {}", Utc(*not_before), Utc(*now))]
    NotYetValid {
        what: &'static str,
        not_before: u64,
        now: u64,
    },
    #[error("userID mismatch: expected {expected:?}, the {what} is for {got:?}")]
    UserMismatch {
        what: &'static str,
        expected: String,
        got: String,
    },
    #[error("SDKAppID mismatch: expected {expected}, the {what} is for {got}")]
    AppMismatch {
        what: &'static str,
        expected: u64,
        got: u64,
    },
    #[error("room mismatch: expected room {expected}, the privateMapKey is for room {got}")]
    RoomMismatch { expected: String, got: String },
    #[error("userbuf (room ticket) is malformed: {0}")]
    Userbuf(String),
    #[error("this is a privateMapKey (it carries a room ticket), not a userSig")]
    UnexpectedUserbuf,
    #[error("this is a userSig, not a privateMapKey (it carries no room ticket)")]
    MissingUserbuf,
    #[error("unknown SDKAppID {0}: no such app is configured")]
    UnknownApp(u64),
    #[error("app {sdk_app_id} has no {what} configured, so {purpose} is impossible")]
    NoKey {
        sdk_app_id: u64,
        what: &'static str,
        purpose: &'static str,
    },
    #[error("JWT is malformed: {0}")]
    JwtMalformed(String),
    #[error("JWT algorithm {got} is not accepted (ES256, RS*/PS* and EdDSA are, each by its own key; never none or HMAC)")]
    JwtAlgorithm { got: String },
    #[error("JWT key id {kid:?} is not among the keys of app {sdk_app_id}")]
    JwtUnknownKid { kid: String, sdk_app_id: u64 },
    #[error("missing privilege {missing} (the privateMapKey grants {have})")]
    MissingPrivilege {
        missing: Privileges,
        have: Privileges,
    },
    #[error("URL has no `{0}` query parameter")]
    MissingParam(&'static str),
    #[error("URL is malformed: {0}")]
    BadUrl(String),
    #[error("txTime {0:?} is not a hexadecimal Unix time")]
    BadTxTime(String),
    #[error("txSecret does not match: the URL was not signed with this app's {key} key for stream {stream:?}")]
    TxSecretMismatch { key: &'static str, stream: String },
    #[error("key is unusable: {0}")]
    BadKey(String),
    #[error("signing failed: {0}")]
    Signing(String),
}

impl AuthError {
    /// The error code Tencent's C++ reference verifier uses for the same failure,
    /// where it has one (`tls_signature.h`).
    pub fn tencent_code(&self) -> Option<u32> {
        use AuthError::*;
        Some(match self {
            Empty => 1,
            Base64(_) | TooLong { .. } => 2,
            Zlib(_) | Inflated { .. } => 3,
            Json(_) => 4,
            SigBase64(_) => 6,
            MissingField { .. } => 7,
            BadSignature { .. } => 8,
            Expired { .. } => 9,
            BadField { .. } => 10,
            UserMismatch { .. } => 13,
            AppMismatch { .. } => 14,
            Userbuf(_) | UnexpectedUserbuf | MissingUserbuf | RoomMismatch { .. } => 15,
            Signing(_) => 17,
            _ => return None,
        })
    }
}
