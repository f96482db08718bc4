//! Identifiers, parsed once at the boundary so the domain only ever sees well-formed ones.

use std::fmt;

use uuid::Uuid;

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

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new, time-ordered id.
            pub fn generate() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            /// Parses the canonical text form, naming `field` in the error.
            pub fn from_field(field: &'static str, raw: &str) -> Result<Self, Error> {
                Self::parse(raw).map_err(|InvalidId(why)| Error::invalid_field(field, why))
            }

            pub fn parse(raw: &str) -> Result<Self, InvalidId> {
                if raw.is_empty() {
                    return Err(InvalidId(concat!($what, " is required")));
                }
                Uuid::try_parse(raw)
                    .map(Self)
                    .map_err(|_| InvalidId(concat!($what, " is not a valid id")))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }
    };
}

uuid_id!(
    /// A conversation.
    ConversationId,
    "conversation_id"
);
uuid_id!(
    /// A message.
    MessageId,
    "message_id"
);

/// An uploaded file. Generated as a time-ordered UUID, but taken as opaque text: records stored
/// by earlier versions may hold any non-empty id.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct FileId(String);

impl FileId {
    /// A new, time-ordered id.
    pub fn generate() -> Self {
        Self(Uuid::now_v7().to_string())
    }

    /// Accepts any non-empty text; an unknown id is simply not found.
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        if raw.is_empty() {
            return Err(InvalidId("file_id is required"));
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

impl fmt::Display for FileId {
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
