//! What the CONNECT frame's `auth token` field carries: nothing, a user name
//! and password, or a token. docs/protocol.md, "Credentials".
//!
//! ```text
//! (empty)                                   no credentials
//! 0x01 | u16 LE n | user (n bytes) | password (rest)
//! 0x02 | token (rest)
//! ```

use crate::frame::ProtocolError;

const USER_PASSWORD: u8 = 0x01;
const TOKEN: u8 = 0x02;

/// Credentials a client presents in CONNECT.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Credentials<'a> {
    None,
    UserPassword { user: &'a str, password: &'a [u8] },
    Token(&'a [u8]),
}

impl std::fmt::Debug for Credentials<'_> {
    /// Never prints a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::UserPassword { user, .. } => write!(f, "UserPassword({user:?})"),
            Credentials::Token(_) => f.write_str("Token"),
        }
    }
}

impl<'a> Credentials<'a> {
    /// Reads the CONNECT `auth token` field.
    pub fn decode(field: &'a [u8]) -> Result<Self, ProtocolError> {
        let Some((&tag, rest)) = field.split_first() else {
            return Ok(Credentials::None);
        };
        match tag {
            USER_PASSWORD => {
                if rest.len() < 2 {
                    return Err(ProtocolError::Truncated("credentials user name"));
                }
                let n = u16::from_le_bytes([rest[0], rest[1]]) as usize;
                let rest = &rest[2..];
                if rest.len() < n {
                    return Err(ProtocolError::Truncated("credentials user name"));
                }
                let user = std::str::from_utf8(&rest[..n])
                    .map_err(|_| ProtocolError::BadUtf8("credentials user name"))?;
                Ok(Credentials::UserPassword {
                    user,
                    password: &rest[n..],
                })
            }
            TOKEN => Ok(Credentials::Token(rest)),
            t => Err(ProtocolError::UnknownCredentials(t)),
        }
    }

    /// Writes the CONNECT `auth token` field.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Credentials::None => Vec::new(),
            Credentials::UserPassword { user, password } => {
                let mut v = Vec::with_capacity(3 + user.len() + password.len());
                v.push(USER_PASSWORD);
                v.extend_from_slice(&(user.len().min(u16::MAX as usize) as u16).to_le_bytes());
                v.extend_from_slice(&user.as_bytes()[..user.len().min(u16::MAX as usize)]);
                v.extend_from_slice(password);
                v
            }
            Credentials::Token(t) => {
                let mut v = Vec::with_capacity(1 + t.len());
                v.push(TOKEN);
                v.extend_from_slice(t);
                v
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_round_trip_and_bad_fields_are_errors() {
        for c in [
            Credentials::None,
            Credentials::UserPassword {
                user: "orders",
                password: b"s3cret:with@odd/chars",
            },
            Credentials::UserPassword {
                user: "",
                password: b"",
            },
            Credentials::Token(b"tok"),
        ] {
            assert_eq!(Credentials::decode(&c.encode()).unwrap(), c);
        }
        assert!(Credentials::decode(&[1, 5, 0, b'a']).is_err());
        assert!(Credentials::decode(&[1]).is_err());
        assert!(Credentials::decode(&[9, 1, 2]).is_err());
        assert!(Credentials::decode(&[1, 1, 0, 0xff]).is_err());
        let shown = format!(
            "{:?}",
            Credentials::UserPassword {
                user: "u",
                password: b"hunter2"
            }
        );
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
