//! Short-lived TURN credentials, the "TURN REST API" scheme every TURN server speaks
//! (coturn's `use-auth-secret` / `static-auth-secret`, draft-uberti-behave-turn-rest):
//! the username is `<expiry unix time>:<userID>` and the password is
//! `base64(HMAC-SHA1(shared secret, username))`. The TURN server needs only the
//! secret; a credential expires by itself.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// The `(username, credential)` for `user_id` valid until `expires_at` (Unix seconds).
pub fn credentials(secret: &str, user_id: &str, expires_at: u64) -> (String, String) {
    let username = format!("{expires_at}:{user_id}");
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(username.as_bytes());
    let credential = STANDARD.encode(mac.finalize().into_bytes());
    (username, credential)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_turn_rest_api_scheme() {
        // Computed independently: printf '1700000000:alice' | openssl dgst -sha1 -hmac
        // 'north' -binary | base64
        let (u, c) = credentials("north", "alice", 1_700_000_000);
        assert_eq!(u, "1700000000:alice");
        assert_eq!(c, "Cd/49soE35ICqcJF/bCTn8Z4OyE=");
    }
}
