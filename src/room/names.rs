//! Who may push a stream name (sans-I/O).
//!
//! Stream names are one namespace per node: RTMP and HTTP-FLV play them by name, and
//! the media plane keys publishers by them. So a name belongs to one app, room and
//! user, and only they may push it:
//!
//! - a name of the bound shape `{sdkappid}_{roomid}_{userid}[_main]` (what Tencent's
//!   components and Weir's own stream ids use) belongs to the member it names, always;
//! - any other name belongs to the member who first pushed it, while it is pushed and
//!   for [`HOLD_MS`] after, so a pusher that reconnects finds its name free for it and
//!   taken for everyone else. Claims are bounded in number ([`MAX_CLAIMS`]).

use std::collections::HashMap;

use crate::auth::RoomId;

/// How long a free-form name stays its last pusher's after the push ends.
pub const HOLD_MS: u64 = 3_600_000;
/// Free-form names held at once; past this, new names are refused until old
/// claims lapse.
pub const MAX_CLAIMS: usize = 10_000;

/// The member a stream name belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub sdk_app_id: u64,
    pub room: RoomId,
    pub user_id: String,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "app {}, room {}, user {:?}",
            self.sdk_app_id, self.room, self.user_id
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("stream name {name:?} belongs to {owner}")]
    Owned { name: String, owner: Owner },
    #[error("{0} stream names are held on this node; try again later")]
    Full(usize),
}

/// `{sdkappid}_{roomid}_{userid}[_main]`: the app, numeric room and user a name is
/// bound to by its shape. A user id may itself end in `_main`, so both readings are
/// returned when they differ (the second with the suffix kept).
pub fn bound_stream(name: &str) -> Option<(u64, u32, String)> {
    bound_readings(name).map(|(app, room, user, _)| (app, room, user.to_owned()))
}

fn bound_readings(name: &str) -> Option<(u64, u32, &str, Option<&str>)> {
    let (app, rest) = name.split_once('_')?;
    let (room, user) = rest.split_once('_')?;
    let (app, room) = (app.parse().ok()?, room.parse().ok()?);
    match user.strip_suffix("_main") {
        Some(short) if !short.is_empty() => Some((app, room, short, Some(user))),
        _ if user.is_empty() => None,
        _ => Some((app, room, user, None)),
    }
}

#[derive(Debug)]
struct Claim {
    owner: Owner,
    /// None while pushed; otherwise when the last push ended.
    released_ms: Option<u64>,
}

/// The free-form names held, and by whom.
#[derive(Debug, Default)]
pub struct NameClaims {
    claims: HashMap<String, Claim>,
}

impl NameClaims {
    /// `owner` starts pushing `name` at `now_ms`: allowed, and the name is held for it,
    /// or refused with the name's owner.
    pub fn claim(&mut self, name: &str, owner: &Owner, now_ms: u64) -> Result<(), NameError> {
        if let Some((sdk_app_id, room, short, long)) = bound_readings(name) {
            let mine = sdk_app_id == owner.sdk_app_id
                && owner.room == RoomId::Num(room)
                && (owner.user_id == short || Some(owner.user_id.as_str()) == long);
            return if mine {
                Ok(())
            } else {
                Err(NameError::Owned {
                    name: name.to_owned(),
                    owner: Owner {
                        sdk_app_id,
                        room: RoomId::Num(room),
                        user_id: short.to_owned(),
                    },
                })
            };
        }
        let lapsed = |c: &Claim| c.released_ms.is_some_and(|r| now_ms >= r + HOLD_MS);
        if let Some(c) = self.claims.get_mut(name) {
            if c.owner == *owner || lapsed(c) {
                c.owner = owner.clone();
                c.released_ms = None;
                return Ok(());
            }
            return Err(NameError::Owned {
                name: name.to_owned(),
                owner: c.owner.clone(),
            });
        }
        if self.claims.len() >= MAX_CLAIMS {
            self.claims.retain(|_, c| !lapsed(c));
            if self.claims.len() >= MAX_CLAIMS {
                return Err(NameError::Full(MAX_CLAIMS));
            }
        }
        self.claims.insert(
            name.to_owned(),
            Claim {
                owner: owner.clone(),
                released_ms: None,
            },
        );
        Ok(())
    }

    /// The push of `name` ended at `now_ms`: its owner keeps it for [`HOLD_MS`].
    pub fn release(&mut self, name: &str, now_ms: u64) {
        if let Some(c) = self.claims.get_mut(name) {
            c.released_ms = Some(now_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(app: u64, room: u32, user: &str) -> Owner {
        Owner {
            sdk_app_id: app,
            room: RoomId::Num(room),
            user_id: user.into(),
        }
    }

    #[test]
    fn a_bound_name_belongs_to_the_member_it_names() {
        let mut n = NameClaims::default();
        let bob = who(1400000000, 1234, "bob");
        assert_eq!(n.claim("1400000000_1234_bob_main", &bob, 0), Ok(()));
        assert_eq!(n.claim("1400000000_1234_bob", &bob, 0), Ok(()));
        // Another room's member, another user of the room, another app: refused.
        for squatter in [
            who(1400000000, 999, "mallory"),
            who(1400000000, 1234, "mallory"),
            who(1400000001, 1234, "bob"),
            Owner {
                room: RoomId::Str("1234".into()),
                ..bob.clone()
            },
        ] {
            match n.claim("1400000000_1234_bob_main", &squatter, 0) {
                Err(NameError::Owned { owner, .. }) => assert_eq!(owner, bob),
                other => panic!("{squatter}: {other:?}"),
            }
        }
        // A user id that ends in _main may push its own name either way.
        let m = who(1400000000, 1234, "bob_main");
        assert_eq!(n.claim("1400000000_1234_bob_main_main", &m, 0), Ok(()));
        assert_eq!(n.claim("1400000000_1234_bob_main", &m, 0), Ok(()));
    }

    #[test]
    fn a_free_name_is_its_first_pushers_while_pushed_and_for_an_hour_after() {
        let mut n = NameClaims::default();
        let (alice, mallory) = (who(1, 1, "alice"), who(2, 9, "mallory"));
        assert_eq!(n.claim("cam1", &alice, 0), Ok(()));
        assert!(n.claim("cam1", &mallory, 10).is_err());
        n.release("cam1", 1_000);
        assert!(n.claim("cam1", &mallory, 1_000 + HOLD_MS - 1).is_err());
        // Alice reconnects within the hold: still hers.
        assert_eq!(n.claim("cam1", &alice, 5_000), Ok(()));
        n.release("cam1", 6_000);
        assert_eq!(n.claim("cam1", &mallory, 6_000 + HOLD_MS), Ok(()));
        assert!(n.claim("cam1", &alice, 6_000 + HOLD_MS).is_err());
    }

    #[test]
    fn claims_are_bounded_and_lapsed_ones_make_room() {
        let mut n = NameClaims::default();
        let a = who(1, 1, "a");
        for i in 0..MAX_CLAIMS {
            n.claim(&format!("s{i}"), &a, 0).unwrap();
        }
        assert_eq!(n.claim("one-more", &a, 0), Err(NameError::Full(MAX_CLAIMS)));
        n.release("s7", 0);
        assert_eq!(n.claim("one-more", &a, HOLD_MS), Ok(()));
        assert_eq!(n.claims.len(), MAX_CLAIMS);
    }
}
