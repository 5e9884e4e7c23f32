//! The wrapper every Tencent token shares: `B64X(zlib(JSON))`.
//!
//! B64X is standard base64 with `+` → `*`, `/` → `-`, `=` → `_`. It is *not*
//! RFC 4648 base64url, whose `-` means `+`. Issuers always pad; we accept either.
//! The inflated document is capped at 16 KiB (real ones are under 1 KiB): a
//! 2 KiB zlib bomb must cost us nothing.

use std::io::Read;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use flate2::read::ZlibDecoder;
use serde_json::{Map, Value};

use super::AuthError;

/// Longest token text accepted before any decoding work.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Largest inflated JSON document accepted.
pub const MAX_INFLATED: usize = 16 * 1024;

/// Standard-alphabet base64 that accepts padded and unpadded input. Non-canonical
/// trailing bits are refused, so every character of a token carries meaning and one
/// changed character can never decode to the same bytes.
pub(crate) const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decodes B64X text (with or without `_` padding; a percent-encoded copy is accepted too).
pub fn b64x_decode(text: &str) -> Result<Vec<u8>, AuthError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(AuthError::Empty);
    }
    if text.len() > MAX_TOKEN_LEN {
        return Err(AuthError::TooLong {
            len: text.len(),
            limit: MAX_TOKEN_LEN,
        });
    }
    let unescaped;
    let text = if text.contains('%') {
        unescaped = url::form_urlencoded::parse(format!("t={text}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        unescaped.as_str()
    } else {
        text
    };
    // Padding may only end the text: a `_` anywhere else would let two different
    // texts decode to the same bytes.
    let body = text.trim_end_matches(['_', '=']);
    if text.len() - body.len() > 2 {
        return Err(AuthError::Base64("more than two padding characters".into()));
    }
    let standard: String = body
        .chars()
        .map(|c| match c {
            '*' => '+',
            '-' => '/',
            '_' => '=',
            other => other,
        })
        .collect();
    STANDARD_LENIENT
        .decode(standard.as_bytes())
        .map_err(|e| AuthError::Base64(e.to_string()))
}

/// Encodes bytes as padded B64X, as every Tencent issuer does.
pub fn b64x_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(bytes)
        .chars()
        .map(|c| match c {
            '+' => '*',
            '/' => '-',
            '=' => '_',
            other => other,
        })
        .collect()
}

/// Unwraps a token into its JSON object.
pub fn open(token: &str) -> Result<Map<String, Value>, AuthError> {
    let compressed = b64x_decode(token)?;
    let mut json = Vec::with_capacity(1024);
    let mut inflater = ZlibDecoder::new(compressed.as_slice());
    (&mut inflater)
        .take(MAX_INFLATED as u64 + 1)
        .read_to_end(&mut json)
        .map_err(|e| AuthError::Zlib(e.to_string()))?;
    if json.len() > MAX_INFLATED {
        return Err(AuthError::Inflated {
            limit: MAX_INFLATED,
        });
    }
    if inflater.total_in() != compressed.len() as u64 {
        return Err(AuthError::Zlib(format!(
            "{} bytes follow the end of the zlib stream",
            compressed.len() as u64 - inflater.total_in()
        )));
    }
    match serde_json::from_slice::<Value>(&json) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(AuthError::Json(format!(
            "expected an object, found {}",
            json_kind(&other)
        ))),
        Err(e) => Err(AuthError::Json(e.to_string())),
    }
}

/// Wraps a JSON object into a token (zlib default level, like Python/Node/PHP/Java issuers).
pub fn seal(doc: &Map<String, Value>) -> String {
    use flate2::write::ZlibEncoder;
    use std::io::Write;
    let json = serde_json::to_vec(doc).expect("a JSON map always serializes");
    let mut enc = ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&json).expect("writing to a Vec cannot fail");
    b64x_encode(&enc.finish().expect("finishing a Vec cannot fail"))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A field read as text. v1 issuers write strings; a number is taken as its decimal text,
/// as Tencent's C++ verifier does when it rebuilds the signed content.
pub fn text_field(doc: &Map<String, Value>, field: &'static str) -> Result<String, AuthError> {
    match doc.get(field) {
        None => Err(AuthError::MissingField { field }),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) if n.is_u64() => Ok(n.to_string()),
        Some(other) => Err(AuthError::BadField {
            field,
            reason: format!("expected a string, found {}", json_kind(other)),
        }),
    }
}

/// A field read as an unsigned integer: a JSON number (v2) or a decimal string (v1).
pub fn uint_field(doc: &Map<String, Value>, field: &'static str) -> Result<u64, AuthError> {
    match doc.get(field) {
        None => Err(AuthError::MissingField { field }),
        Some(Value::Number(n)) => n.as_u64().ok_or_else(|| AuthError::BadField {
            field,
            reason: format!("expected an unsigned integer, found {n}"),
        }),
        Some(Value::String(s)) => parse_decimal(s).ok_or_else(|| AuthError::BadField {
            field,
            reason: format!("expected an unsigned decimal integer, found {s:?}"),
        }),
        Some(other) => Err(AuthError::BadField {
            field,
            reason: format!("expected a number, found {}", json_kind(other)),
        }),
    }
}

/// Strict decimal: digits only, no sign, no spaces (so the signed text is unambiguous).
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn b64x_matches_the_cpp_reference() {
        // tls-sig-api test/unit_test.cpp, TEST(base64url, 2)
        assert_eq!(b64x_encode(b"1"), "MQ__");
        assert_eq!(b64x_decode("MQ__").unwrap(), b"1");
        assert_eq!(b64x_decode("MQ").unwrap(), b"1");
        // `+` and `/` become `*` and `-`
        assert_eq!(b64x_encode(&[0xfb, 0xff]), "*-8_");
        assert_eq!(b64x_decode("*-8").unwrap(), vec![0xfb, 0xff]);
    }

    #[test]
    fn rfc4648_base64url_is_not_b64x() {
        // In base64url `-` is 62 (`+`); in B64X it is 63 (`/`).
        assert_eq!(b64x_decode("-w").unwrap(), vec![0xff]);
    }

    #[test]
    fn zlib_bomb_is_refused_cheaply() {
        use flate2::write::ZlibEncoder;
        use std::io::Write;
        let mut enc = ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(b"{\"a\":\"").unwrap();
        enc.write_all(&vec![b'x'; 4 * 1024 * 1024]).unwrap();
        let bomb = b64x_encode(&enc.finish().unwrap());
        assert!(bomb.len() < MAX_TOKEN_LEN, "bomb is {} bytes", bomb.len());
        assert_eq!(
            open(&bomb).unwrap_err(),
            AuthError::Inflated {
                limit: MAX_INFLATED
            }
        );
    }

    #[test]
    fn garbage_gets_typed_errors() {
        assert_eq!(open("").unwrap_err(), AuthError::Empty);
        assert!(matches!(open("!!!").unwrap_err(), AuthError::Base64(_)));
        assert!(matches!(open("eJyrVg").unwrap_err(), AuthError::Zlib(_)));
        let array = seal_raw(b"[1,2]");
        assert!(matches!(open(&array).unwrap_err(), AuthError::Json(_)));
        let long = "A".repeat(MAX_TOKEN_LEN + 1);
        assert!(matches!(
            open(&long).unwrap_err(),
            AuthError::TooLong { .. }
        ));
    }

    fn seal_raw(bytes: &[u8]) -> String {
        use flate2::write::ZlibEncoder;
        use std::io::Write;
        let mut enc = ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(bytes).unwrap();
        b64x_encode(&enc.finish().unwrap())
    }
}
