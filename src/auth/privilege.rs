//! The privilege bitmap of a privateMapKey (`dwPrivilegeMap`).
//!
//! Bit values are Tencent's (TRTC docs, "Enabling advanced permission control"):
//! 0x01 create room, 0x02 enter, 0x04 send audio, 0x08 receive audio,
//! 0x10 send video, 0x20 receive video, 0x40 send sub-stream, 0x80 receive sub-stream.
//! 0x100 is Weir's own: a node relaying the room to its audience elsewhere in a cluster
//! (a hidden member, see `room`).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::AuthError;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Privileges(pub u32);

impl Privileges {
    pub const CREATE_ROOM: Self = Self(0x01);
    pub const ENTER_ROOM: Self = Self(0x02);
    pub const SEND_AUDIO: Self = Self(0x04);
    pub const RECV_AUDIO: Self = Self(0x08);
    pub const SEND_VIDEO: Self = Self(0x10);
    pub const RECV_VIDEO: Self = Self(0x20);
    pub const SEND_SUB_VIDEO: Self = Self(0x40);
    pub const RECV_SUB_VIDEO: Self = Self(0x80);
    /// Weir's own bit, not Tencent's: a cluster node that carries the room's streams
    /// to members on another node (rooms that span nodes). Such a member is hidden:
    /// never listed or announced. Only whoever holds the app's key can grant it.
    pub const RELAY: Self = Self(0x100);
    /// What Tencent's samples give an anchor (`0xff`).
    pub const ALL: Self = Self(0xff);

    const NAMES: [(u32, &'static str); 9] = [
        (0x01, "create room"),
        (0x02, "enter room"),
        (0x04, "send audio"),
        (0x08, "receive audio"),
        (0x10, "send video"),
        (0x20, "receive video"),
        (0x40, "send sub-stream video"),
        (0x80, "receive sub-stream video"),
        (0x100, "relay to another node"),
    ];

    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Succeeds when every bit of `needed` is granted; otherwise names the missing ones.
    pub fn require(self, needed: Self) -> Result<(), AuthError> {
        let missing = Self(needed.0 & !self.0);
        if missing.0 == 0 {
            Ok(())
        } else {
            Err(AuthError::MissingPrivilege {
                missing,
                have: self,
            })
        }
    }

    /// Names of the granted bits, e.g. `["enter room", "send video"]`.
    pub fn names(self) -> Vec<&'static str> {
        Self::NAMES
            .iter()
            .filter(|(bit, _)| self.0 & bit != 0)
            .map(|&(_, name)| name)
            .collect()
    }
}

impl std::ops::BitOr for Privileges {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl fmt::Display for Privileges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = self.names();
        if names.is_empty() {
            write!(f, "nothing (0x{:02x})", self.0)
        } else {
            write!(f, "{} (0x{:02x})", names.join(" + "), self.0)
        }
    }
}

impl fmt::Debug for Privileges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn require_names_what_is_missing() {
        let audience = Privileges(0xab);
        assert!(audience.require(Privileges::ENTER_ROOM).is_ok());
        let err = audience.require(Privileges::SEND_VIDEO | Privileges::SEND_AUDIO);
        let err = err.unwrap_err();
        assert_eq!(
            err,
            AuthError::MissingPrivilege {
                missing: Privileges(0x14),
                have: audience
            }
        );
        let text = err.to_string();
        assert!(text.contains("send audio + send video (0x14)"), "{text}");
    }
}
