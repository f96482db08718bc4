//! The messaging domain's data: conversations, messages and the events that change them.
//!
//! Every change to a conversation is an [`Event`] with the next gap-free `sequence`, assigned by
//! the store atomically with the change itself. These types are also what the stores persist (as
//! JSON), so their serde form is a storage format: change it only compatibly.

use serde::{Deserialize, Serialize};

use crate::{
    error::Error,
    files::policy::FileCategory,
    ids::{ConversationId, FileId, MessageId, UserId},
};

/// Longest `client_message_id` / `request_id`.
pub const MAX_CLIENT_ID_CHARS: usize = 64;
/// Longest message text, in Unicode scalar values after trimming.
pub const MAX_TEXT_CHARS: usize = 4000;
/// Longest conversation title.
pub const MAX_TITLE_CHARS: usize = 200;
/// Most participants one conversation may have.
pub const MAX_PARTICIPANTS: usize = 1000;

/// A client-chosen idempotency key: `client_message_id` or `request_id`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientId(String);

impl ClientId {
    /// 1..=64 characters, none of them control characters.
    pub fn from_field(field: &'static str, raw: &str) -> Result<Self, Error> {
        let chars = raw.chars().count();
        if chars == 0 {
            return Err(Error::invalid_field(field, format!("{field} is required")));
        }
        if chars > MAX_CLIENT_ID_CHARS {
            return Err(Error::invalid_field(
                field,
                format!("{field} must be at most {MAX_CLIENT_ID_CHARS} characters"),
            ));
        }
        if raw.chars().any(char::is_control) {
            return Err(Error::invalid_field(
                field,
                format!("{field} must not contain control characters"),
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Milliseconds since the Unix epoch, as the store's clock saw them.
pub type UnixMillis = i64;

/// This machine's clock, in Unix milliseconds.
pub fn now_millis() -> UnixMillis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    pub id: ConversationId,
    pub title: String,
    /// In the order they joined.
    pub participants: Vec<UserId>,
    pub created_by: UserId,
    pub create_time: UnixMillis,
    /// Sequence of the newest event; 0 before the first.
    pub last_sequence: u64,
}

impl Conversation {
    pub fn has_participant(&self, user: &UserId) -> bool {
        self.participants.contains(user)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageKind {
    Text,
    File,
    Image,
}

impl MessageKind {
    /// The kind of message that carries a file of `category`.
    pub fn for_file(category: FileCategory) -> Self {
        match category {
            FileCategory::Image => Self::Image,
            FileCategory::Document => Self::File,
        }
    }
}

/// A file carried by a FILE or IMAGE message, as it was when posted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileAttachment {
    pub file_id: FileId,
    pub uploader: UserId,
    pub file_name: String,
    pub content_type: String,
    pub size_bytes: u64,
    /// Lowercase hex.
    pub sha256: String,
    pub category: FileCategory,
    /// Displayed dimensions of an image (after EXIF orientation); 0 when unknown.
    pub width: u32,
    pub height: u32,
    /// Absent from file records stored before it was part of them.
    #[serde(default)]
    pub has_thumbnail: bool,
    pub create_time: UnixMillis,
    pub expire_time: UnixMillis,
}

/// What a message says. A deleted message keeps none of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageContent {
    /// The text, or a file's caption.
    pub text: String,
    pub file: Option<FileAttachment>,
}

/// The parts of a message fixed before the store assigns its sequence and time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageRecord {
    pub id: MessageId,
    pub sender: UserId,
    pub kind: MessageKind,
    pub client_message_id: ClientId,
    /// `None` once deleted.
    pub content: Option<MessageContent>,
}

impl MessageRecord {
    pub fn is_deleted(&self) -> bool {
        self.content.is_none()
    }

    /// The id of the file the message carries, unless it carries none (or was deleted).
    pub fn file_id(&self) -> Option<&FileId> {
        self.content
            .as_ref()
            .and_then(|content| content.file.as_ref())
            .map(|file| &file.file_id)
    }

    /// The same message with its content removed.
    pub fn tombstone(&self) -> Self {
        Self {
            content: None,
            ..self.clone()
        }
    }
}

/// A message as clients see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub conversation_id: ConversationId,
    pub sequence: u64,
    pub create_time: UnixMillis,
    pub record: MessageRecord,
}

/// What happened in a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// Replayed as a tombstone once the message is deleted.
    MessageCreated(MessageRecord),
    MessageDeleted {
        message_id: MessageId,
        deleted_by: UserId,
    },
    ParticipantsChanged {
        added: Vec<UserId>,
        removed: Vec<UserId>,
        changed_by: UserId,
        /// Everyone after the change, in join order.
        participants: Vec<UserId>,
    },
    ReadReceipt {
        user_id: UserId,
        read_sequence: u64,
    },
}

/// One change to a conversation, in its gap-free order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub conversation_id: ConversationId,
    pub sequence: u64,
    pub create_time: UnixMillis,
    pub kind: EventKind,
}

impl Event {
    /// The message this event created, with its sequence and time.
    pub fn created_message(&self) -> Option<Message> {
        match &self.kind {
            EventKind::MessageCreated(record) => Some(Message {
                conversation_id: self.conversation_id,
                sequence: self.sequence,
                create_time: self.create_time,
                record: record.clone(),
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_checked() {
        assert!(ClientId::from_field("client_message_id", "m-1").is_ok());
        assert!(ClientId::from_field("client_message_id", "").is_err());
        assert!(ClientId::from_field("client_message_id", &"é".repeat(64)).is_ok());
        assert!(ClientId::from_field("client_message_id", &"x".repeat(65)).is_err());
        assert!(ClientId::from_field("client_message_id", "a\nb").is_err());
    }

    #[test]
    fn event_kinds_have_a_stable_json_form() {
        // The Redis store's Lua scripts write ParticipantsChanged and ReadReceipt themselves.
        let kind = EventKind::ReadReceipt {
            user_id: UserId::parse("bob").unwrap(),
            read_sequence: 7,
        };
        assert_eq!(
            serde_json::to_string(&kind).unwrap(),
            r#"{"ReadReceipt":{"user_id":"bob","read_sequence":7}}"#
        );
    }
}
