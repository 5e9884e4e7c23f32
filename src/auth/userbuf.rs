//! The room ticket inside a privateMapKey (`TLS.userbuf`), a big-endian binary record.
//!
//! ```text
//! u8  cVer            0 = numeric room, 1 = string room
//! u16 wAccountLen     N
//! N   account         userID bytes
//! u32 dwSdkAppid
//! u32 dwAuthID        numeric room id (0 for a string room)
//! u32 dwExpTime       absolute expiry, Unix seconds
//! u32 dwPrivilegeMap
//! u32 dwAccountType   0 in current issuers
//! u16 wRoomStrLen     M   (cVer 1 only)
//! M   roomStr             (cVer 1 only)
//! ```
//! Overruns, unknown versions and trailing bytes are refused: a ticket is
//! either exactly this record or nothing.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{AuthError, Privileges};

/// A room as the mini program components name it: a u32 `roomID` or a `strRoomID`.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RoomId {
    Num(u32),
    Str(String),
}

impl RoomId {
    /// The room as clients name it: digits for a `roomID`, the string as it is for a
    /// `strRoomID` (`Display` quotes strings, for logs).
    pub fn name(&self) -> String {
        match self {
            RoomId::Num(n) => n.to_string(),
            RoomId::Str(s) => s.clone(),
        }
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoomId::Num(n) => write!(f, "{n}"),
            RoomId::Str(s) => write!(f, "{s:?}"),
        }
    }
}

impl fmt::Debug for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A decoded userbuf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserBuf {
    pub account: Vec<u8>,
    pub sdk_app_id: u32,
    pub room: RoomId,
    /// `dwExpTime` as written (normally absolute; see [`UserBuf::expires_at`]).
    pub exp_time: u32,
    pub privileges: Privileges,
    pub account_type: u32,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], AuthError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| {
            AuthError::Userbuf(format!(
                "{what} needs {n} bytes at offset {}, only {} remain",
                self.pos,
                self.buf.len() - self.pos
            ))
        })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    fn u8(&mut self, what: &str) -> Result<u8, AuthError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, AuthError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32, AuthError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

impl UserBuf {
    pub fn parse(buf: &[u8]) -> Result<Self, AuthError> {
        let mut r = Reader { buf, pos: 0 };
        let version = r.u8("cVer")?;
        if version > 1 {
            return Err(AuthError::Userbuf(format!(
                "cVer is {version}, expected 0 (numeric room) or 1 (string room)"
            )));
        }
        let account_len = r.u16("wAccountLen")? as usize;
        let account = r.take(account_len, "account")?.to_vec();
        let sdk_app_id = r.u32("dwSdkAppid")?;
        let auth_id = r.u32("dwAuthID")?;
        let exp_time = r.u32("dwExpTime")?;
        let privileges = Privileges(r.u32("dwPrivilegeMap")?);
        let account_type = r.u32("dwAccountType")?;
        let room = if version == 1 {
            let len = r.u16("wRoomStrLen")? as usize;
            let bytes = r.take(len, "roomStr")?;
            let s = std::str::from_utf8(bytes)
                .map_err(|_| AuthError::Userbuf("roomStr is not UTF-8".into()))?;
            if s.is_empty() {
                return Err(AuthError::Userbuf("cVer 1 with an empty roomStr".into()));
            }
            RoomId::Str(s.to_owned())
        } else {
            RoomId::Num(auth_id)
        };
        if r.pos != buf.len() {
            return Err(AuthError::Userbuf(format!(
                "{} trailing bytes after the record",
                buf.len() - r.pos
            )));
        }
        Ok(Self {
            account,
            sdk_app_id,
            room,
            exp_time,
            privileges,
            account_type,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.account.len());
        let (version, auth_id) = match &self.room {
            RoomId::Num(n) => (0u8, *n),
            RoomId::Str(_) => (1u8, 0),
        };
        out.push(version);
        out.extend_from_slice(&(self.account.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.account);
        out.extend_from_slice(&self.sdk_app_id.to_be_bytes());
        out.extend_from_slice(&auth_id.to_be_bytes());
        out.extend_from_slice(&self.exp_time.to_be_bytes());
        out.extend_from_slice(&self.privileges.0.to_be_bytes());
        out.extend_from_slice(&self.account_type.to_be_bytes());
        if let RoomId::Str(s) = &self.room {
            out.extend_from_slice(&(s.len() as u16).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        out
    }

    /// The absolute expiry of the ticket. Java issuers before March 2020 wrote the
    /// *relative* validity into `dwExpTime` (tls-sig-api-v2-java 7ca86fc); a value
    /// smaller than the token's issue time can only be that, so it is read relative
    /// to the issue time rather than as a date in 1970.
    pub fn expires_at(&self, issued_at: u64) -> u64 {
        let exp = u64::from(self.exp_time);
        if exp < issued_at {
            issued_at.saturating_add(exp)
        } else {
            exp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_v2_vectors() {
        // V2-B: numeric room 10000, 255
        let b = hex::decode(
            "0000077869616f6a756e53724e00000027106641 3f00000000ff00000000".replace(' ', ""),
        )
        .unwrap();
        let u = UserBuf::parse(&b).unwrap();
        assert_eq!(u.account, b"xiaojun");
        assert_eq!(u.sdk_app_id, 1_400_000_000);
        assert_eq!(u.room, RoomId::Num(10000));
        assert_eq!(u.exp_time, 1_715_552_000);
        assert_eq!(u.privileges, Privileges::ALL);
        assert_eq!(u.to_bytes(), b);
        // V2-C: string room "1000000040"
        let c = hex::decode("01 0007 7869616f6a756e 53724e00 00000000 66413f00 000000ff 00000000 000a 31303030303030303430".replace(' ', "")).unwrap();
        let u = UserBuf::parse(&c).unwrap();
        assert_eq!(u.room, RoomId::Str("1000000040".into()));
        assert_eq!(u.to_bytes(), c);
    }

    #[test]
    fn refuses_overruns_trailing_bytes_and_unknown_versions() {
        let good = UserBuf {
            account: b"abc".to_vec(),
            sdk_app_id: 1,
            room: RoomId::Str("r".into()),
            exp_time: 5,
            privileges: Privileges::ALL,
            account_type: 0,
        }
        .to_bytes();
        for cut in 0..good.len() {
            assert!(
                matches!(UserBuf::parse(&good[..cut]), Err(AuthError::Userbuf(_))),
                "truncated at {cut} must fail"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert!(UserBuf::parse(&long)
            .unwrap_err()
            .to_string()
            .contains("trailing"));
        let mut v2 = good.clone();
        v2[0] = 2;
        assert!(UserBuf::parse(&v2)
            .unwrap_err()
            .to_string()
            .contains("cVer is 2"));
        // an account length pointing past the end
        let mut over = good;
        over[1] = 0xff;
        assert!(UserBuf::parse(&over)
            .unwrap_err()
            .to_string()
            .contains("account needs"));
    }

    #[test]
    fn relative_expiry_from_old_java_issuers() {
        let u = UserBuf {
            account: vec![],
            sdk_app_id: 1,
            room: RoomId::Num(1),
            exp_time: 300,
            privileges: Privileges::ALL,
            account_type: 0,
        };
        assert_eq!(u.expires_at(1_700_000_000), 1_700_000_300);
        let abs = UserBuf {
            exp_time: 1_700_000_300,
            ..u
        };
        assert_eq!(abs.expires_at(1_700_000_000), 1_700_000_300);
    }
}
