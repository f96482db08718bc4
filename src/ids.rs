//! Identifiers, parsed once at the boundary so the domain only ever sees well-formed ones.

use std::fmt;

use crate::error::Error;

/// Longest user id accepted (the identity provider's `sub`).
pub const MAX_USER_ID_CHARS: usize = 128;

/// A user, as named by the identity provider's `sub` claim or the trusted gateway.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct UserId(String);

impl UserId {
    /// Accepts 1..=128 printable characters without whitespace.
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        let chars = raw.chars().count();
        if chars == 0 || chars > MAX_USER_ID_CHARS {
            return Err(InvalidId("user id must be 1 to 128 characters"));
        }
        if raw.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(InvalidId(
                "user id must not contain whitespace or control characters",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// Parses a request field, naming the field in the error.
    pub fn from_field(field: &'static str, raw: &str) -> Result<Self, Error> {
        Self::parse(raw).map_err(|InvalidId(why)| Error::invalid_field(field, why))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an id was refused; the text is safe to return to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidId(pub &'static str);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_checked() {
        assert!(UserId::parse("alice").is_ok());
        assert!(UserId::parse("auth0|5f7c8ec7c33c6c004bbafe82").is_ok());
        assert!(UserId::parse("").is_err());
        assert!(UserId::parse("a b").is_err());
        assert!(UserId::parse("bad\u{7}").is_err());
        assert!(UserId::parse(&"x".repeat(129)).is_err());
        assert!(UserId::parse(&"x".repeat(128)).is_ok());
    }
}
