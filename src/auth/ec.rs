//! ECDSA-SHA256 keys on the two curves Tencent v1 credentials use.
//!
//! Console-issued v1 keys were secp256k1, but P-256 keys occur in real deployments
//! (and ES256 JWTs are P-256). The curve is taken from the key's own OID, never from a
//! preceding `EC PARAMETERS` block, which some published samples get wrong.
//! Signatures are DER; high-S signatures are valid (no Tencent issuer normalizes S),
//! so S is normalized before verifying (k256 would otherwise refuse them).

use ecdsa::signature::{Signer, Verifier};
use pkcs8::der::Decode;
use spki::ObjectIdentifier;

use super::AuthError;

const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const OID_K256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.10");
const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Curve {
    P256,
    Secp256k1,
}

impl Curve {
    fn from_oid(oid: ObjectIdentifier) -> Result<Self, AuthError> {
        match oid {
            OID_P256 => Ok(Curve::P256),
            OID_K256 => Ok(Curve::Secp256k1),
            other => Err(AuthError::BadKey(format!(
                "curve {other} is not supported (P-256 1.2.840.10045.3.1.7 or secp256k1 1.3.132.0.10)"
            ))),
        }
    }
}

/// A verifying key (SubjectPublicKeyInfo PEM, `BEGIN PUBLIC KEY`).
#[derive(Debug, Clone)]
pub enum PublicKey {
    P256(p256::ecdsa::VerifyingKey),
    K256(k256::ecdsa::VerifyingKey),
}

/// A signing key (PKCS#8 `BEGIN PRIVATE KEY` or SEC1 `BEGIN EC PRIVATE KEY`).
#[derive(Clone)]
pub enum PrivateKey {
    P256(p256::ecdsa::SigningKey),
    K256(k256::ecdsa::SigningKey),
}

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PrivateKey({:?}, ..)", self.curve())
    }
}

/// The PEM blocks of a text, as (label, DER).
fn pem_blocks(text: &str) -> Result<Vec<(String, Vec<u8>)>, AuthError> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + 11..];
        let label_end = after
            .find("-----")
            .ok_or_else(|| AuthError::BadKey("unterminated PEM header".into()))?;
        let label = &after[..label_end];
        let body_start = &after[label_end + 5..];
        let end_marker = format!("-----END {label}-----");
        let body_end = body_start
            .find(&end_marker)
            .ok_or_else(|| AuthError::BadKey(format!("no `{end_marker}` line")))?;
        let b64: String = body_start[..body_end]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let der = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64)
            .map_err(|e| AuthError::BadKey(format!("PEM block {label}: {e}")))?;
        out.push((label.to_owned(), der));
        rest = &body_start[body_end + end_marker.len()..];
    }
    if out.is_empty() {
        return Err(AuthError::BadKey("no PEM block found".into()));
    }
    Ok(out)
}

impl PublicKey {
    pub fn from_pem(pem: &str) -> Result<Self, AuthError> {
        let blocks = pem_blocks(pem)?;
        let (_, der) = blocks
            .iter()
            .find(|(label, _)| label == "PUBLIC KEY")
            .ok_or_else(|| AuthError::BadKey("expected a `BEGIN PUBLIC KEY` block".into()))?;
        let spki = spki::SubjectPublicKeyInfoRef::from_der(der)
            .map_err(|e| AuthError::BadKey(format!("public key: {e}")))?;
        if spki.algorithm.oid != OID_EC_PUBLIC_KEY {
            return Err(AuthError::BadKey(format!(
                "public key algorithm {} is not EC",
                spki.algorithm.oid
            )));
        }
        let curve_oid = spki
            .algorithm
            .parameters_oid()
            .map_err(|e| AuthError::BadKey(format!("public key has no named curve: {e}")))?;
        let point = spki.subject_public_key.raw_bytes();
        let bad = |e: ecdsa::Error| AuthError::BadKey(format!("public key point: {e}"));
        Ok(match Curve::from_oid(curve_oid)? {
            Curve::P256 => {
                PublicKey::P256(p256::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(bad)?)
            }
            Curve::Secp256k1 => {
                PublicKey::K256(k256::ecdsa::VerifyingKey::from_sec1_bytes(point).map_err(bad)?)
            }
        })
    }

    pub fn curve(&self) -> Curve {
        match self {
            PublicKey::P256(_) => Curve::P256,
            PublicKey::K256(_) => Curve::Secp256k1,
        }
    }

    /// Verifies a DER ECDSA-SHA256 signature over `msg`, accepting high S.
    pub fn verify_der(&self, msg: &[u8], der: &[u8]) -> bool {
        match self {
            PublicKey::P256(key) => p256::ecdsa::Signature::from_der(der)
                .map(|s| s.normalize_s().unwrap_or(s))
                .is_ok_and(|s| key.verify(msg, &s).is_ok()),
            PublicKey::K256(key) => k256::ecdsa::Signature::from_der(der)
                .map(|s| s.normalize_s().unwrap_or(s))
                .is_ok_and(|s| key.verify(msg, &s).is_ok()),
        }
    }

    pub fn to_pem(&self) -> String {
        use spki::EncodePublicKey;
        let pem = match self {
            PublicKey::P256(k) => k.to_public_key_pem(pkcs8::LineEnding::LF),
            PublicKey::K256(k) => k.to_public_key_pem(pkcs8::LineEnding::LF),
        };
        pem.expect("encoding a valid public key cannot fail")
    }
}

impl PrivateKey {
    pub fn generate(curve: Curve) -> Self {
        let mut rng = rand::rngs::OsRng;
        match curve {
            Curve::P256 => PrivateKey::P256(p256::ecdsa::SigningKey::random(&mut rng)),
            Curve::Secp256k1 => PrivateKey::K256(k256::ecdsa::SigningKey::random(&mut rng)),
        }
    }

    pub fn from_pem(pem: &str) -> Result<Self, AuthError> {
        let blocks = pem_blocks(pem)?;
        let params_oid = blocks
            .iter()
            .find(|(label, _)| label == "EC PARAMETERS")
            .and_then(|(_, der)| ObjectIdentifier::from_der(der).ok());
        for (label, der) in &blocks {
            match label.as_str() {
                "PRIVATE KEY" => {
                    let info = pkcs8::PrivateKeyInfo::from_der(der)
                        .map_err(|e| AuthError::BadKey(format!("PKCS#8 private key: {e}")))?;
                    let curve_oid = info.algorithm.parameters_oid().map_err(|e| {
                        AuthError::BadKey(format!("PKCS#8 key has no named curve: {e}"))
                    })?;
                    return Self::from_sec1_der(info.private_key, Some(curve_oid));
                }
                "EC PRIVATE KEY" => return Self::from_sec1_der(der, params_oid),
                _ => {}
            }
        }
        Err(AuthError::BadKey(
            "expected a `BEGIN PRIVATE KEY` or `BEGIN EC PRIVATE KEY` block".into(),
        ))
    }

    /// A SEC1 `ECPrivateKey`; its own curve OID wins over one given from outside.
    fn from_sec1_der(der: &[u8], outer: Option<ObjectIdentifier>) -> Result<Self, AuthError> {
        let key = sec1::EcPrivateKey::from_der(der)
            .map_err(|e| AuthError::BadKey(format!("EC private key: {e}")))?;
        let own = key.parameters.and_then(|p| p.named_curve());
        let oid = own
            .or(outer)
            .ok_or_else(|| AuthError::BadKey("EC private key names no curve".into()))?;
        let bad = |e: ecdsa::Error| AuthError::BadKey(format!("EC private key scalar: {e}"));
        Ok(match Curve::from_oid(oid)? {
            Curve::P256 => {
                PrivateKey::P256(p256::ecdsa::SigningKey::from_slice(key.private_key).map_err(bad)?)
            }
            Curve::Secp256k1 => {
                PrivateKey::K256(k256::ecdsa::SigningKey::from_slice(key.private_key).map_err(bad)?)
            }
        })
    }

    pub fn curve(&self) -> Curve {
        match self {
            PrivateKey::P256(_) => Curve::P256,
            PrivateKey::K256(_) => Curve::Secp256k1,
        }
    }

    pub fn public_key(&self) -> PublicKey {
        match self {
            PrivateKey::P256(k) => PublicKey::P256(*k.verifying_key()),
            PrivateKey::K256(k) => PublicKey::K256(*k.verifying_key()),
        }
    }

    /// ECDSA-SHA256 signature over `msg`, DER-encoded (what v1 `TLS.sig` holds).
    pub fn sign_der(&self, msg: &[u8]) -> Vec<u8> {
        match self {
            PrivateKey::P256(k) => {
                let s: p256::ecdsa::Signature = k.sign(msg);
                s.to_der().as_bytes().to_vec()
            }
            PrivateKey::K256(k) => {
                let s: k256::ecdsa::Signature = k.sign(msg);
                s.to_der().as_bytes().to_vec()
            }
        }
    }

    /// PKCS#8 PEM (`BEGIN PRIVATE KEY`), the form every issuer library reads.
    pub fn to_pem(&self) -> String {
        use pkcs8::EncodePrivateKey;
        let pem = match self {
            PrivateKey::P256(k) => k.to_pkcs8_pem(pkcs8::LineEnding::LF),
            PrivateKey::K256(k) => k.to_pkcs8_pem(pkcs8::LineEnding::LF),
        };
        pem.expect("encoding a valid private key cannot fail")
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_D_PRIVATE: &str = "-----BEGIN EC PARAMETERS-----
BgUrgQQACg==
-----END EC PARAMETERS-----
-----BEGIN EC PRIVATE KEY-----
MHQCAQEEIEJDBDY4KVdj3dPBacADreB772ok45A57YWrUUvc5fMQoAcGBSuBBAAK
oUQDQgAEaPVFHhWqRDnKnVlyU5JIzXOUyOJd/pPUwhLUovf+PYBm7otRBptnvJ4E
oJ4qeSJNG0v4XdiqM3mtChkhUEFT3Q==
-----END EC PRIVATE KEY-----
";
    const V1_D_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----
MFYwEAYHKoZIzj0CAQYFK4EEAAoDQgAEaPVFHhWqRDnKnVlyU5JIzXOUyOJd/pPU
whLUovf+PYBm7otRBptnvJ4EoJ4qeSJNG0v4XdiqM3mtChkhUEFT3Q==
-----END PUBLIC KEY-----
";

    #[test]
    fn sec1_key_with_params_block_matches_its_public_key() {
        let private = PrivateKey::from_pem(V1_D_PRIVATE).unwrap();
        assert_eq!(private.curve(), Curve::Secp256k1);
        let public = PublicKey::from_pem(V1_D_PUBLIC).unwrap();
        assert_eq!(private.public_key().to_pem(), public.to_pem());
    }

    #[test]
    fn generated_keys_round_trip_through_pem_on_both_curves() {
        for curve in [Curve::P256, Curve::Secp256k1] {
            let key = PrivateKey::generate(curve);
            let again = PrivateKey::from_pem(&key.to_pem()).unwrap();
            let public = PublicKey::from_pem(&again.public_key().to_pem()).unwrap();
            assert_eq!(public.curve(), curve);
            let sig = key.sign_der(b"hello");
            assert!(public.verify_der(b"hello", &sig));
            assert!(!public.verify_der(b"hellO", &sig));
        }
    }

    #[test]
    fn garbage_keys_are_errors() {
        assert!(PublicKey::from_pem("nonsense").is_err());
        assert!(
            PublicKey::from_pem("-----BEGIN PUBLIC KEY-----\n!!\n-----END PUBLIC KEY-----")
                .is_err()
        );
        assert!(PrivateKey::from_pem(V1_D_PUBLIC).is_err());
        assert!(PublicKey::from_pem("-----BEGIN PUBLIC KEY-----\nAAAA\n").is_err());
    }
}
