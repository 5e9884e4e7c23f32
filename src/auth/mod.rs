//! Credentials: who may enter which room and do what.
//!
//! Pure functions over token text, key material and a clock (`now`, Unix seconds);
//! no I/O. Three token families are accepted, so an existing mini program backend can
//! point at Weir without changing how it signs:
//!
//! * Tencent TLS sig **v1** (ECDSA-SHA256, P-256 or secp256k1) — see [`tls`];
//! * Tencent TLS sig **v2** (HMAC-SHA256) — see [`tls`];
//! * **JWTs** with a `kid` (ES256, RS*/PS*, EdDSA; PEM keys or a JWKS set) — see [`jwt`].
//!
//! A *userSig* proves identity (user, app). A *privateMapKey* is a userSig that also
//! carries a room ticket ([`userbuf`]): room, absolute expiry, [`Privileges`].
//! Hotlink-protected RTMP/FLV URLs (`txSecret`) are in [`live_url`].

pub mod ec;
pub mod envelope;
mod error;
pub mod jwt;
mod keys;
pub mod live_url;
mod privilege;
mod time;
pub mod tls;
pub mod turn;
pub mod userbuf;

use serde::Serialize;

pub use error::AuthError;
pub use keys::{AppKeys, Keyring};
pub use privilege::Privileges;
pub use time::{unix_now, Utc};
pub use userbuf::{RoomId, UserBuf};

/// Which family a token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    V1,
    V2,
    Jwt,
    /// A hotlink-protected (txSecret) push URL, for a stream name bound to a room.
    LiveUrl,
}

/// A verified userSig: who this is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub kind: TokenKind,
    pub sdk_app_id: u64,
    pub user_id: String,
    pub issued_at: u64,
    pub expires_at: u64,
}

/// A verified privateMapKey: a room and what may be done in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoomTicket {
    #[serde(flatten)]
    pub identity: Identity,
    pub room: RoomId,
    pub privileges: Privileges,
    pub privilege_names: Vec<&'static str>,
    /// When the ticket itself runs out (the userbuf's `dwExpTime`, or the JWT's `exp`).
    pub room_expires_at: u64,
}

impl RoomTicket {
    pub fn require(&self, needed: Privileges) -> Result<(), AuthError> {
        self.privileges.require(needed)
    }
}

/// What a token turned out to be, before identity checks against a room.
enum Verified {
    Identity(Identity),
    /// A Tencent token with a userbuf, still undecoded.
    Userbuf(Identity, Vec<u8>),
    /// A JWT with room claims.
    Ticket(Identity, TicketParts),
}

struct TicketParts {
    room: RoomId,
    privileges: Privileges,
    room_expires_at: u64,
}

impl AppKeys {
    /// Verifies a userSig for `user_id` in this app. A privateMapKey is refused here.
    pub fn verify_user_sig(
        &self,
        token: &str,
        user_id: &str,
        now: u64,
    ) -> Result<Identity, AuthError> {
        match self.verify_any(token, user_id, now)? {
            Verified::Identity(id) => Ok(id),
            Verified::Userbuf(..) | Verified::Ticket(..) => Err(AuthError::UnexpectedUserbuf),
        }
    }

    /// Verifies a privateMapKey for `user_id` entering `room` in this app.
    pub fn verify_private_map_key(
        &self,
        token: &str,
        user_id: &str,
        room: &RoomId,
        now: u64,
    ) -> Result<RoomTicket, AuthError> {
        let (identity, t) = match self.verify_any(token, user_id, now)? {
            Verified::Ticket(id, t) => (id, t),
            Verified::Userbuf(id, buf) => {
                let t = self.read_userbuf(&buf, &id)?;
                (id, t)
            }
            Verified::Identity(_) => return Err(AuthError::MissingUserbuf),
        };
        if &t.room != room {
            return Err(AuthError::RoomMismatch {
                expected: room.to_string(),
                got: t.room.to_string(),
            });
        }
        if now > t.room_expires_at {
            return Err(AuthError::Expired {
                what: "privateMapKey room ticket",
                expired_at: t.room_expires_at,
                now,
            });
        }
        Ok(RoomTicket {
            identity,
            room: t.room,
            privilege_names: t.privileges.names(),
            privileges: t.privileges,
            room_expires_at: t.room_expires_at,
        })
    }

    fn verify_any(&self, token: &str, user_id: &str, now: u64) -> Result<Verified, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Empty);
        }
        if jwt::looks_like_jwt(token) {
            return self.verify_jwt(token, user_id, now);
        }
        let claims = tls::verify(
            token,
            &tls::TlsKeys {
                sdk_app_id: self.sdk_app_id,
                public_key: self.public_key.as_ref(),
                secret_key: self.secret_key.as_deref(),
            },
            user_id,
            now,
        )?;
        let identity = Identity {
            kind: match claims.version {
                tls::TlsVersion::V1 => TokenKind::V1,
                tls::TlsVersion::V2 => TokenKind::V2,
            },
            sdk_app_id: claims.sdk_app_id,
            user_id: claims.identifier,
            issued_at: claims.issued_at,
            expires_at: claims.expires_at,
        };
        Ok(match claims.userbuf {
            None => Verified::Identity(identity),
            Some(buf) => Verified::Userbuf(identity, buf),
        })
    }

    /// Decodes a Tencent room ticket and checks that it belongs to the token around it.
    fn read_userbuf(&self, buf: &[u8], identity: &Identity) -> Result<TicketParts, AuthError> {
        let buf = UserBuf::parse(buf)?;
        if buf.account != identity.user_id.as_bytes() {
            return Err(AuthError::UserMismatch {
                what: "privateMapKey room ticket",
                expected: identity.user_id.clone(),
                got: String::from_utf8_lossy(&buf.account).into_owned(),
            });
        }
        if u64::from(buf.sdk_app_id) != self.sdk_app_id {
            return Err(AuthError::AppMismatch {
                what: "privateMapKey room ticket",
                expected: self.sdk_app_id,
                got: buf.sdk_app_id.into(),
            });
        }
        Ok(TicketParts {
            room_expires_at: buf.expires_at(identity.issued_at),
            room: buf.room,
            privileges: buf.privileges,
        })
    }

    fn verify_jwt(&self, token: &str, user_id: &str, now: u64) -> Result<Verified, AuthError> {
        let kid = jwt::peek_kid(token)?;
        let key = self.jwt_key(&kid)?;
        let c = jwt::verify_signature(token, key, self.sdk_app_id)?;
        let what = if c.is_private_map_key() {
            "privateMapKey"
        } else {
            "userSig"
        };
        if c.sub != user_id {
            return Err(AuthError::UserMismatch {
                what,
                expected: user_id.to_owned(),
                got: c.sub,
            });
        }
        if c.sdkappid != self.sdk_app_id {
            return Err(AuthError::AppMismatch {
                what,
                expected: self.sdk_app_id,
                got: c.sdkappid,
            });
        }
        // RFC 7519: the token must not be accepted on or after `exp`.
        if now >= c.exp {
            return Err(AuthError::Expired {
                what,
                expired_at: c.exp,
                now,
            });
        }
        if let Some(nbf) = c.nbf {
            if now < nbf {
                return Err(AuthError::NotYetValid {
                    what,
                    not_before: nbf,
                    now,
                });
            }
        }
        let identity = Identity {
            kind: TokenKind::Jwt,
            sdk_app_id: c.sdkappid,
            user_id: c.sub.clone(),
            issued_at: c.iat,
            expires_at: c.exp.saturating_sub(1),
        };
        if !c.is_private_map_key() {
            return Ok(Verified::Identity(identity));
        }
        let parts = TicketParts {
            room: c.room()?,
            privileges: c.privileges()?,
            room_expires_at: c.exp.saturating_sub(1),
        };
        Ok(Verified::Ticket(identity, parts))
    }

    /// Issues a userSig of the given kind.
    pub fn issue_user_sig(
        &self,
        kind: TokenKind,
        user_id: &str,
        now: u64,
        expire: u64,
    ) -> Result<String, AuthError> {
        self.issue(kind, user_id, now, expire, None)
    }

    /// Issues a privateMapKey: a token for `user_id` with a ticket for `room`.
    pub fn issue_private_map_key(
        &self,
        kind: TokenKind,
        user_id: &str,
        room: &RoomId,
        privileges: Privileges,
        now: u64,
        expire: u64,
    ) -> Result<String, AuthError> {
        if let RoomId::Num(0) = room {
            return Err(AuthError::BadField {
                field: "roomid",
                reason: "room numbers are 1..=4294967295".into(),
            });
        }
        let app = u32::try_from(self.sdk_app_id).map_err(|_| AuthError::BadField {
            field: "sdkappid",
            reason: format!("{} does not fit the userbuf's 32 bits", self.sdk_app_id),
        })?;
        let exp_time = u32::try_from(now.saturating_add(expire)).unwrap_or(u32::MAX);
        let buf = UserBuf {
            account: user_id.as_bytes().to_vec(),
            sdk_app_id: app,
            room: room.clone(),
            exp_time,
            privileges,
            account_type: 0,
        };
        self.issue(kind, user_id, now, expire, Some(buf))
    }

    fn issue(
        &self,
        kind: TokenKind,
        user_id: &str,
        now: u64,
        expire: u64,
        ticket: Option<UserBuf>,
    ) -> Result<String, AuthError> {
        match kind {
            TokenKind::LiveUrl => Err(AuthError::BadUrl(
                "live URLs are signed (`weir token sign-url`), not issued as tokens".into(),
            )),
            TokenKind::V1 => {
                let key = self.private_key.as_ref().ok_or(AuthError::NoKey {
                    sdk_app_id: self.sdk_app_id,
                    what: "private_key_pem (v1 ECDSA)",
                    purpose: "issuing a v1 token",
                })?;
                let buf = ticket.map(|t| t.to_bytes());
                Ok(tls::issue_v1(
                    key,
                    self.sdk_app_id,
                    user_id,
                    now,
                    expire,
                    buf.as_deref(),
                ))
            }
            TokenKind::V2 => {
                let secret = self.secret_key.as_deref().ok_or(AuthError::NoKey {
                    sdk_app_id: self.sdk_app_id,
                    what: "secret_key (v2 HMAC)",
                    purpose: "issuing a v2 token",
                })?;
                let buf = ticket.map(|t| t.to_bytes());
                Ok(tls::issue_v2(
                    secret,
                    self.sdk_app_id,
                    user_id,
                    now,
                    expire,
                    buf.as_deref(),
                ))
            }
            TokenKind::Jwt => {
                let (kid, key) = self.jwt_private_keys.first().ok_or(AuthError::NoKey {
                    sdk_app_id: self.sdk_app_id,
                    what: "jwt_private_keys",
                    purpose: "issuing a JWT",
                })?;
                let (roomid, strroomid, privileges) = match ticket {
                    None => (None, None, None),
                    Some(t) => match t.room {
                        RoomId::Num(n) => (Some(u64::from(n)), None, Some(t.privileges.0)),
                        RoomId::Str(s) => (None, Some(s), Some(t.privileges.0)),
                    },
                };
                let claims = jwt::JwtClaims {
                    sub: user_id.to_owned(),
                    sdkappid: self.sdk_app_id,
                    iat: now,
                    exp: now.saturating_add(expire),
                    nbf: None,
                    roomid,
                    strroomid,
                    privileges,
                };
                Ok(jwt::sign(&claims, kid, key))
            }
        }
    }

    /// The key for signing or checking push or play URLs.
    pub fn live_key(&self, kind: live_url::LiveUrlKind) -> Result<&str, AuthError> {
        let (key, what) = match kind {
            live_url::LiveUrlKind::Push => (&self.live_push_key, "live_push_key"),
            live_url::LiveUrlKind::Play => (&self.live_play_key, "live_play_key"),
        };
        key.as_deref().ok_or(AuthError::NoKey {
            sdk_app_id: self.sdk_app_id,
            what,
            purpose: "signing or checking live URLs",
        })
    }

    /// Checks a hotlink-protected URL against this app's push or play key.
    pub fn verify_live_url(
        &self,
        kind: live_url::LiveUrlKind,
        url: &live_url::LiveUrl,
        now: u64,
    ) -> Result<u64, AuthError> {
        live_url::verify_url(
            kind,
            url,
            self.live_key(kind)?,
            self.play_url_validity_s,
            now,
        )
    }
}

#[cfg(test)]
mod tests;
