//! An app's key material, parsed once from configuration, and the keyring of all apps.
//!
//! Keys are parsed when the configuration loads, so a bad PEM stops the server at
//! start-up with the app and field named, not at the first join.

use std::collections::HashMap;

use crate::config::AppConfig;

use super::ec::{Curve, PrivateKey, PublicKey};
use super::AuthError;

/// Verification and issuing material of one app (one `sdk_app_id`).
#[derive(Debug, Clone, Default)]
pub struct AppKeys {
    pub sdk_app_id: u64,
    /// v2 HMAC key: the ASCII bytes of this string, as the console shows it.
    pub secret_key: Option<String>,
    /// v1 ECDSA verifying key (P-256 or secp256k1).
    pub public_key: Option<PublicKey>,
    /// v1 ECDSA signing key, for issuing.
    pub private_key: Option<PrivateKey>,
    /// JWT verifying keys by `kid`, each with its one algorithm.
    pub jwt_keys: Vec<(String, super::jwt::JwtKey)>,
    /// ES256 signing keys by `kid`, for issuing.
    pub jwt_private_keys: Vec<(String, p256::ecdsa::SigningKey)>,
    pub live_push_key: Option<String>,
    pub live_play_key: Option<String>,
    /// Extra validity of play URLs past their `txTime`.
    pub play_url_validity_s: u64,
}

fn field_err(sdk_app_id: u64, field: &str, e: AuthError) -> AuthError {
    AuthError::BadKey(format!("app {sdk_app_id}, `{field}`: {e}"))
}

impl AppKeys {
    pub fn from_config(c: &AppConfig) -> Result<Self, AuthError> {
        let id = c.sdk_app_id;
        let private_key = c
            .private_key_pem
            .as_deref()
            .map(PrivateKey::from_pem)
            .transpose()
            .map_err(|e| field_err(id, "private_key_pem", e))?;
        let public_key = match c.public_key_pem.as_deref() {
            Some(pem) => {
                Some(PublicKey::from_pem(pem).map_err(|e| field_err(id, "public_key_pem", e))?)
            }
            None => private_key.as_ref().map(PrivateKey::public_key),
        };
        let mut jwt_private_keys = Vec::new();
        for k in &c.jwt_private_keys {
            let key = PrivateKey::from_pem(&k.private_key_pem)
                .map_err(|e| field_err(id, "jwt_private_keys", e))?;
            match key {
                PrivateKey::P256(s) => jwt_private_keys.push((k.kid.clone(), s)),
                PrivateKey::K256(_) => {
                    return Err(AuthError::BadKey(format!(
                        "app {id}, JWT key {:?}: ES256 needs a P-256 key, this one is secp256k1",
                        k.kid
                    )))
                }
            }
        }
        let mut jwt_keys = Vec::new();
        for k in &c.jwt_keys {
            let key = super::jwt::JwtKey::from_pem(&k.public_key_pem, k.alg.as_deref())
                .map_err(|e| field_err(id, &format!("jwt_keys {:?}", k.kid), e))?;
            jwt_keys.push((k.kid.clone(), key));
        }
        if let Some(jwks) = &c.jwks {
            for (kid, key) in
                super::jwt::JwtKey::from_jwks(jwks).map_err(|e| field_err(id, "jwks", e))?
            {
                if jwt_keys.iter().any(|(k, _)| *k == kid) {
                    return Err(AuthError::BadKey(format!(
                        "app {id}: JWT key id {kid:?} is both in jwt_keys and in jwks"
                    )));
                }
                jwt_keys.push((kid, key));
            }
        }
        // A signing key whose kid has no listed verifying key verifies with its own public half.
        for (kid, s) in &jwt_private_keys {
            if !jwt_keys.iter().any(|(k, _)| k == kid) {
                jwt_keys.push((kid.clone(), super::jwt::JwtKey::es256(s.verifying_key())));
            }
        }
        // An empty HMAC key signs tokens anyone can make (and is what a template
        // left unfilled holds): refused, as are the live URL keys below.
        for (field, key) in [
            ("secret_key", &c.secret_key),
            ("live_push_key", &c.live_push_key),
            ("live_play_key", &c.live_play_key),
        ] {
            if key.as_deref().is_some_and(|k| k.trim().is_empty()) {
                return Err(AuthError::BadKey(format!(
                    "app {id}: {field} is empty; set the key or remove the line"
                )));
            }
        }
        Ok(Self {
            sdk_app_id: id,
            secret_key: c.secret_key.clone(),
            public_key,
            private_key,
            jwt_keys,
            jwt_private_keys,
            live_push_key: c.live_push_key.clone(),
            live_play_key: c.live_play_key.clone(),
            play_url_validity_s: c.play_url_validity_s,
        })
    }

    /// A development app with fresh keys of every kind.
    pub fn generate_config(sdk_app_id: u64) -> AppConfig {
        use rand::RngCore;
        let mut rng = rand::rngs::OsRng;
        let mut hex_secret = |bytes: usize| {
            let mut b = vec![0u8; bytes];
            rng.fill_bytes(&mut b);
            hex::encode(b)
        };
        let v1 = PrivateKey::generate(Curve::P256);
        let jwt = PrivateKey::generate(Curve::P256);
        AppConfig {
            sdk_app_id,
            secret_key: Some(hex_secret(32)),
            public_key_pem: Some(v1.public_key().to_pem()),
            private_key_pem: Some(v1.to_pem()),
            jwt_keys: vec![crate::config::JwtKeyConfig {
                kid: "dev-1".into(),
                public_key_pem: jwt.public_key().to_pem(),
                alg: None,
            }],
            jwks: None,
            jwt_private_keys: vec![crate::config::JwtPrivateKeyConfig {
                kid: "dev-1".into(),
                private_key_pem: jwt.to_pem(),
            }],
            live_push_key: Some(hex_secret(16)),
            live_play_key: Some(hex_secret(16)),
            play_url_validity_s: 3600,
        }
    }

    pub fn jwt_key(&self, kid: &str) -> Result<&super::jwt::JwtKey, AuthError> {
        self.jwt_keys
            .iter()
            .find(|(k, _)| k == kid)
            .map(|(_, key)| key)
            .ok_or_else(|| AuthError::JwtUnknownKid {
                kid: kid.to_owned(),
                sdk_app_id: self.sdk_app_id,
            })
    }
}

/// Every configured app, by `sdk_app_id`.
#[derive(Debug, Clone, Default)]
pub struct Keyring {
    apps: HashMap<u64, AppKeys>,
}

impl Keyring {
    pub fn from_configs(apps: &[AppConfig]) -> Result<Self, AuthError> {
        let mut out = HashMap::new();
        for c in apps {
            if out.insert(c.sdk_app_id, AppKeys::from_config(c)?).is_some() {
                return Err(AuthError::BadKey(format!(
                    "app {} is configured twice",
                    c.sdk_app_id
                )));
            }
        }
        Ok(Self { apps: out })
    }

    pub fn app(&self, sdk_app_id: u64) -> Result<&AppKeys, AuthError> {
        self.apps
            .get(&sdk_app_id)
            .ok_or(AuthError::UnknownApp(sdk_app_id))
    }

    pub fn apps(&self) -> impl Iterator<Item = &AppKeys> {
        self.apps.values()
    }
}
