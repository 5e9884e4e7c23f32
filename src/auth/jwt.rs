//! JWTs, for deployments that want a standard token instead of Tencent's: framed,
//! decoded and verified by the `jsonwebtoken` crate (RustCrypto backend), with the
//! algorithms deployments' identity providers use: **ES256** (P-256), **RS256/384/512**
//! and **PS256/384/512** (RSA), and **EdDSA** (Ed25519). Keys come from PEM files or a
//! JWKS key set, each under a `kid`, and each key verifies only its own algorithm (a
//! token that names another one is refused: no RSA-key-as-HMAC-secret confusion);
//! `alg: none` and HMAC algorithms are refused before anything else is looked at.
//! Weir issues ES256 only.
//!
//! (Until 2026-12 the ES256 framing was Weir's own, about 150 lines; the crate brings
//! the RSA and EdDSA keys and JWKS sets deployments already have. The `rsa` crate's
//! RUSTSEC-2023-0071 timing issue concerns decryption and signing with a private RSA
//! key; Weir only verifies with public ones.)
//!
//! Expiry and identity are checked by the caller with its own clock (`exp` and `nbf`
//! are not the crate's business here), so tests can fix the time.
//!
//! Claims: `sub` (userID), `sdkappid` (number), `iat`, `exp` (expired at and after
//! `exp`), optional `nbf`; a privateMapKey adds `roomid` (number) or `strroomid`
//! (string) and `priv` (the privilege bitmap).

use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
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

/// A verifying key and the one algorithm it verifies.
#[derive(Clone)]
pub struct JwtKey {
    pub alg: Algorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtKey({:?})", self.alg)
    }
}

fn bad_key(what: &str, e: impl std::fmt::Display) -> AuthError {
    AuthError::BadKey(format!("{what}: {e}"))
}

/// The algorithms a key of each kind may verify, by name (`alg` in the configuration or
/// the JWK).
fn rsa_alg(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        _ => return None,
    })
}

impl JwtKey {
    pub fn es256(key: &p256::ecdsa::VerifyingKey) -> Self {
        Self {
            alg: Algorithm::ES256,
            key: DecodingKey::from_ec_der(key.to_encoded_point(false).as_bytes()),
        }
    }

    /// A `BEGIN PUBLIC KEY` (or `BEGIN RSA PUBLIC KEY`) PEM: P-256 (ES256), RSA (`alg`,
    /// RS256 by default) or Ed25519 (EdDSA).
    pub fn from_pem(pem: &str, alg: Option<&str>) -> Result<Self, AuthError> {
        if let Ok(ec) = super::ec::PublicKey::from_pem(pem) {
            return match (ec, alg) {
                (super::ec::PublicKey::P256(k), None | Some("ES256")) => Ok(Self::es256(&k)),
                (super::ec::PublicKey::P256(_), Some(a)) => {
                    Err(bad_key("a P-256 key", format!("verifies ES256, not {a}")))
                }
                (super::ec::PublicKey::K256(_), _) => Err(AuthError::BadKey(
                    "ES256 needs a P-256 key, this one is secp256k1".into(),
                )),
            };
        }
        if let Ok(key) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
            let name = alg.unwrap_or("RS256");
            let alg = rsa_alg(name)
                .ok_or_else(|| bad_key("an RSA key", format!("cannot verify {name}")))?;
            return Ok(Self { alg, key });
        }
        if let Ok(key) = DecodingKey::from_ed_pem(pem.as_bytes()) {
            return match alg {
                None | Some("EdDSA") => Ok(Self {
                    alg: Algorithm::EdDSA,
                    key,
                }),
                Some(a) => Err(bad_key(
                    "an Ed25519 key",
                    format!("verifies EdDSA, not {a}"),
                )),
            };
        }
        Err(AuthError::BadKey(
            "not a P-256, RSA or Ed25519 public key in PEM".into(),
        ))
    }

    /// The keys of a JWKS document (`{"keys": [...]}`) by `kid`. Every key needs a
    /// `kid`; symmetric (`oct`) keys and curves other than P-256 and Ed25519 are refused.
    pub fn from_jwks(json: &str) -> Result<Vec<(String, Self)>, AuthError> {
        let set: JwkSet = serde_json::from_str(json).map_err(|e| bad_key("JWKS", e))?;
        let mut out = Vec::new();
        for jwk in &set.keys {
            let kid = jwk
                .common
                .key_id
                .clone()
                .ok_or_else(|| AuthError::BadKey("JWKS: a key has no `kid`".into()))?;
            let named = jwk.common.key_algorithm;
            let alg = match (&jwk.algorithm, named) {
                (AlgorithmParameters::EllipticCurve(p), None | Some(KeyAlgorithm::ES256))
                    if p.curve == EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                (AlgorithmParameters::OctetKeyPair(p), None | Some(KeyAlgorithm::EdDSA))
                    if p.curve == EllipticCurve::Ed25519 =>
                {
                    Algorithm::EdDSA
                }
                (AlgorithmParameters::RSA(_), None) => Algorithm::RS256,
                (AlgorithmParameters::RSA(_), Some(a)) => {
                    rsa_alg(&format!("{a:?}")).ok_or_else(|| {
                        bad_key(
                            &format!("JWKS key {kid:?}"),
                            format!("{a:?} is not an RSA signature algorithm"),
                        )
                    })?
                }
                _ => return Err(bad_key(
                    &format!("JWKS key {kid:?}"),
                    "only P-256 (ES256), RSA (RS*/PS*) and Ed25519 (EdDSA) keys verify Weir tokens",
                )),
            };
            let key =
                DecodingKey::from_jwk(jwk).map_err(|e| bad_key(&format!("JWKS key {kid:?}"), e))?;
            out.push((kid, Self { alg, key }));
        }
        Ok(out)
    }
}

/// A JWT is recognised by its shape: three parts separated by two dots.
pub fn looks_like_jwt(token: &str) -> bool {
    token.bytes().filter(|&b| b == b'.').count() == 2
}

/// The header's `alg` as written, for refusals the crate cannot name (`none`).
fn written_alg(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    let bytes = URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .or_else(|_| URL_SAFE.decode(header))
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("alg")?.as_str().map(str::to_owned)
}

fn check_len(token: &str) -> Result<(), AuthError> {
    if token.len() > super::envelope::MAX_TOKEN_LEN {
        return Err(AuthError::TooLong {
            len: token.len(),
            limit: super::envelope::MAX_TOKEN_LEN,
        });
    }
    Ok(())
}

/// A JWT's header, read without verifying anything; over-long tokens, `alg: none` and
/// HMAC algorithms are refused here, before any key is looked up.
fn header(token: &str) -> Result<jsonwebtoken::Header, AuthError> {
    check_len(token)?;
    let header = jsonwebtoken::decode_header(token).map_err(|e| match written_alg(token) {
        Some(alg)
            if matches!(
                e.kind(),
                jsonwebtoken::errors::ErrorKind::InvalidAlgorithmName
                    | jsonwebtoken::errors::ErrorKind::Json(_)
            ) =>
        {
            AuthError::JwtAlgorithm { got: alg }
        }
        _ => AuthError::JwtMalformed(format!("header: {e}")),
    })?;
    if matches!(
        header.alg,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
    ) {
        return Err(AuthError::JwtAlgorithm {
            got: format!("{:?}", header.alg),
        });
    }
    Ok(header)
}

/// The `kid` of a JWT's header (see [`header`] for what is refused first).
pub fn peek_kid(token: &str) -> Result<String, AuthError> {
    header(token)?
        .kid
        .ok_or_else(|| AuthError::JwtMalformed("header has no `kid`".into()))
}

/// A JWT's claims, read **without verifying anything**: only to learn which app and
/// user a bearer token names, so that the right key can then verify it (WHIP's
/// `Authorization: Bearer`). Refused like [`header`] first.
pub fn peek_claims(token: &str) -> Result<JwtClaims, AuthError> {
    header(token)?;
    jsonwebtoken::dangerous::insecure_decode_claims::<JwtClaims>(token)
        .map_err(|e| AuthError::JwtMalformed(format!("claims: {e}")))
}

/// Checks the signature with `key` (whose algorithm the header must name) and returns
/// the claims; expiry and identity checks are the caller's (they differ between userSig
/// and privateMapKey).
pub fn verify_signature(
    token: &str,
    key: &JwtKey,
    sdk_app_id: u64,
) -> Result<JwtClaims, AuthError> {
    let header = header(token)?;
    if header.kid.is_none() {
        return Err(AuthError::JwtMalformed("header has no `kid`".into()));
    }
    if header.alg != key.alg {
        return Err(AuthError::JwtAlgorithm {
            got: format!("{:?} (this kid verifies {:?})", header.alg, key.alg),
        });
    }
    let mut v = Validation::new(key.alg);
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    use jsonwebtoken::errors::ErrorKind as K;
    jsonwebtoken::decode::<JwtClaims>(token, &key.key, &v)
        .map(|d| d.claims)
        .map_err(|e| match e.kind() {
            K::InvalidSignature => AuthError::BadSignature {
                key: "JWT key",
                sdk_app_id,
            },
            K::InvalidAlgorithm => AuthError::JwtAlgorithm {
                got: format!("{:?}", header.alg),
            },
            _ => AuthError::JwtMalformed(e.to_string()),
        })
}

/// Signs claims as an ES256 JWT with a `kid` header.
pub fn sign(claims: &JwtClaims, kid: &str, key: &p256::ecdsa::SigningKey) -> String {
    use p256::pkcs8::EncodePrivateKey;
    let der = key.to_pkcs8_der().expect("a P-256 key encodes as PKCS#8");
    let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(der.as_bytes()))
        .expect("ES256 signing with a valid key cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> JwtClaims {
        JwtClaims {
            sub: "alice".into(),
            sdkappid: 1,
            iat: 10,
            exp: 20,
            nbf: None,
            roomid: None,
            strroomid: None,
            privileges: None,
        }
    }

    #[test]
    fn alg_none_hmac_and_another_keys_algorithm_are_refused() {
        let key = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        let verify = JwtKey::es256(key.verifying_key());
        for alg in ["none", "HS256", "RS256", "EdDSA"] {
            let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","kid":"k"}}"#));
            let token = format!("{header}.e30.");
            assert!(
                matches!(
                    verify_signature(&token, &verify, 1).unwrap_err(),
                    AuthError::JwtAlgorithm { got } if got.starts_with(alg)
                ),
                "{alg}"
            );
        }
    }

    #[test]
    fn signature_covers_header_and_payload() {
        let key = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        let verify = JwtKey::es256(key.verifying_key());
        let token = sign(&claims(), "k1", &key);
        assert_eq!(peek_kid(&token).unwrap(), "k1");
        assert_eq!(verify_signature(&token, &verify, 1).unwrap(), claims());
        let forged = JwtClaims {
            sub: "mallory".into(),
            ..claims()
        };
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[1] = &forged_payload;
        assert!(matches!(
            verify_signature(&parts.join("."), &verify, 1),
            Err(AuthError::BadSignature { .. })
        ));
        // Another key of the same kind does not verify it.
        let other = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        assert!(matches!(
            verify_signature(&token, &JwtKey::es256(other.verifying_key()), 1),
            Err(AuthError::BadSignature { .. })
        ));
    }

    /// A deployment's own identity provider signs with Ed25519 (EdDSA): its PEM and its
    /// JWKS both verify; an `oct` (HMAC) JWK is refused when the set is loaded.
    #[test]
    fn ed25519_keys_from_pem_and_jwks_verify_and_symmetric_jwks_are_refused() {
        use ed25519_dalek::pkcs8::{EncodePrivateKey, EncodePublicKey};
        let signing = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let pem = signing
            .verifying_key()
            .to_public_key_pem(Default::default())
            .unwrap();
        let der = signing.to_pkcs8_der().unwrap();
        let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
        header.kid = Some("idp-1".into());
        let token = jsonwebtoken::encode(
            &header,
            &claims(),
            &EncodingKey::from_ed_der(der.as_bytes()),
        )
        .unwrap();
        let from_pem = JwtKey::from_pem(&pem, None).unwrap();
        assert_eq!(from_pem.alg, Algorithm::EdDSA);
        assert_eq!(verify_signature(&token, &from_pem, 1).unwrap(), claims());
        let x = URL_SAFE_NO_PAD.encode(signing.verifying_key().as_bytes());
        let jwks =
            format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"idp-1","x":"{x}"}}]}}"#);
        let keys = JwtKey::from_jwks(&jwks).unwrap();
        assert_eq!(keys[0].0, "idp-1");
        assert_eq!(verify_signature(&token, &keys[0].1, 1).unwrap(), claims());
        // The same token against an ES256 key: refused by algorithm, not tried.
        let ec = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        assert!(matches!(
            verify_signature(&token, &JwtKey::es256(ec.verifying_key()), 1),
            Err(AuthError::JwtAlgorithm { .. })
        ));
        let oct = r#"{"keys":[{"kty":"oct","kid":"h","k":"c2VjcmV0"}]}"#;
        assert!(matches!(JwtKey::from_jwks(oct), Err(AuthError::BadKey(_))));
        let no_kid = format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{x}"}}]}}"#);
        assert!(matches!(
            JwtKey::from_jwks(&no_kid),
            Err(AuthError::BadKey(_))
        ));
    }

    const TEST_RSA_KEY: &str = "\
-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCTbuLTxMCXSJCS
DhadBq/CpKbQuF/2JOdRpMog5OQpfYKovaEzU5h16lwlhwFOLR3G7SMpz/LKa6Ri
MirpyaI4+fj31/dLMk7Y9GA/484c8g8jG3ckO+5enwxeelPfUvNVnXNTgKKBi9kL
Uf4jrRdIWD+oYR1266CWZnVKqE/kvk2ul2VDZUgdBt1dSjtty/X8k1GDZHGU5CeI
lJBxZGTwLAhYoblvOxk67qFOv4DPy2GAiO0tvMwpyONuNJfy81UCHStAGQWWagww
qXJm8hsoF4t5MQxZp137BLHH7I8OzhghTjpeRFy2fhp+qyfq11moF2RhWes+miQQ
PQDBAkRnAgMBAAECggEAAb95zvrxMZn5pNGn8PqoUM108NqOwLNVTsF+Z/9uuRM0
3l1JMPuXviYmK4e7OzsLtFURaqh9f2rhSwy/N4BdfQFxszaLRwf0qVvUXE2OHwe7
qDXmJrbTL6oBEomuvuIT4nr4aBAJXTHUQ+8X7UJbGU96ibuFBujqQX47e8QdFmAq
m8h8o20Fv8ZbKuwVwrXCfQtw3f3UyxywHd1goSzlsOkQXlETPo/2g3rO5QU9vXxa
arFqSt14n2pc6H8W7Ecmp1aYJbOSHSWLp67/zM/5jm1QnaIt/fzukgh0rNOcurgx
IIkGgPgOSCu/cIPnfQMDn0GYgOFAHFC0BJjB944EiQKBgQDPYtl/+uEfrABchBS8
pK1LjMKxGJH+b9MKMevKnhkQoie2iky+pFnzcU8uTEo9EUvL1e+qoTa/qtHDREt6
PHd3DJD06928p2xTe4wHxns4d1Y1G/S1GhP+NzZHxxtn01p0dQxOvW1yDUXS+6K2
gvnAx9qsE3/2BOHPQdb0YyoTywKBgQC1/kjLSKDDsJQyA0xVVvNwg5tH+emVbbi9
nAPfq+nZeZaDbk8xmrVNggV2XFv5X5RfniJTQnhhNSsTXFIUXdTY2xuzwrKdXx+4
9iKHWlxn/o2YmuoYl+Y3lK7hgjR4gKq2NpXsSgEBpj6q7QKC5TqhBg4DmLkDiS8p
N5MAErrWVQKBgCnCwQOJdH3ZN/VpT3exPYhCHw5kYTm4MOoTpWSWs3tq+85BSTT2
iXqBLa2oBScI7ZdtTCay8gBkmHrWrNA/jtr1N9dqC6uqlyC0dz01laiIN17Yc01o
o/AEFDUd/gHJSKS80S6l7H0T+SSEMX7JHxvX4svV3WWgFAyVOIDb2yRDAoGAekCu
tZ+8HrhnVJFSnaEjNtmxXdBLUM274+MB1yasmCJNMUzQdgnu8Hn/IVs5jXLfQLwB
Ytyr8OC+ZusFWBkP+fx1x3NqeLyFmsH8v9+7Y0Bj7bdiudKQG5YNQ/8rMCd+hZh1
bZzowCrkvf0oSrWhhLmEgHX/Epj8zTs/zDTIvWECgYEAgoVJhXQiVeBqG3GDXcqy
3J97vLOfAcl9j0cv+GkyH6PSjy9AU4VbFtpM/D5Yu1e3hFG2s/7xRvLiEIIBF+b7
wvjnhmirVu1E+L9RtFNyMNn7ukBL9D9m1MgR2Yh1HsRPm7n9KV6eaPb/iMWN2aDn
7IFYB8Q+JF37QI8w7zKT4j4=
-----END PRIVATE KEY-----
";

    /// RSA (RS256), as most identity providers sign: the PEM of an RSA public key.
    #[test]
    fn rsa_keys_verify_rs256() {
        use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
        // A fixed 2048-bit test key (made with `openssl genpkey`; generating one in a
        // debug build takes seconds).
        let private = rsa::RsaPrivateKey::from_pkcs8_pem(TEST_RSA_KEY).unwrap();
        let pem = private
            .to_public_key()
            .to_public_key_pem(Default::default())
            .unwrap();
        let mut header = jsonwebtoken::Header::new(Algorithm::RS256);
        header.kid = Some("rsa-1".into());
        let token = jsonwebtoken::encode(
            &header,
            &claims(),
            &EncodingKey::from_rsa_pem(TEST_RSA_KEY.as_bytes()).unwrap(),
        )
        .unwrap();
        let key = JwtKey::from_pem(&pem, None).unwrap();
        assert_eq!(key.alg, Algorithm::RS256);
        assert_eq!(verify_signature(&token, &key, 1).unwrap(), claims());
        assert!(matches!(
            JwtKey::from_pem(&pem, Some("ES256")),
            Err(AuthError::BadKey(_))
        ));
    }
}
