//! Page sizes and the opaque page tokens of ListMessages and ListConversations.
//!
//! A token is a cursor (the position after the last item returned), not an offset, so pages stay
//! stable while new messages arrive. It is base64url text with a version tag, so its form can
//! change without breaking clients that hold an old one.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use crate::ids::ConversationId;
use crate::{
    error::{Error, Result},
    store::messages::ActivityCursor,
};

pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 200;

/// A validated page size: 0 means the default, larger than the maximum is clamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSize(usize);

impl PageSize {
    pub fn parse(raw: i32) -> Result<Self> {
        match usize::try_from(raw) {
            Err(_) => Err(Error::invalid_field(
                "page_size",
                "page_size must not be negative",
            )),
            Ok(0) => Ok(Self(DEFAULT_PAGE_SIZE)),
            Ok(size) => Ok(Self(size.min(MAX_PAGE_SIZE))),
        }
    }

    pub fn get(self) -> usize {
        self.0
    }
}

const MESSAGES_TAG: &str = "m1";
const CONVERSATIONS_TAG: &str = "c1";

pub fn encode_messages_token(conversation: ConversationId, before_sequence: u64) -> String {
    URL_SAFE_NO_PAD.encode(format!("{MESSAGES_TAG}|{conversation}|{before_sequence}"))
}

/// The sequence the next page starts below, or `None` for the first page.
pub fn decode_messages_token(token: &str, conversation: ConversationId) -> Result<Option<u64>> {
    if token.is_empty() {
        return Ok(None);
    }
    let text = decode(token)?;
    let fields: Vec<&str> = text.split('|').collect();
    match fields.as_slice() {
        [MESSAGES_TAG, id, before] if *id == conversation.to_string() => {
            before.parse().map(Some).map_err(|_| bad_token())
        }
        _ => Err(bad_token()),
    }
}

pub fn encode_conversations_token(cursor: &ActivityCursor) -> String {
    URL_SAFE_NO_PAD.encode(format!(
        "{CONVERSATIONS_TAG}|{}|{}",
        cursor.activity, cursor.conversation_id
    ))
}

pub fn decode_conversations_token(token: &str) -> Result<Option<ActivityCursor>> {
    if token.is_empty() {
        return Ok(None);
    }
    let text = decode(token)?;
    let fields: Vec<&str> = text.split('|').collect();
    match fields.as_slice() {
        [CONVERSATIONS_TAG, activity, id] => Ok(Some(ActivityCursor {
            activity: activity.parse().map_err(|_| bad_token())?,
            conversation_id: ConversationId::parse(id).map_err(|_| bad_token())?,
        })),
        _ => Err(bad_token()),
    }
}

fn decode(token: &str) -> Result<String> {
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad_token())?;
    String::from_utf8(bytes).map_err(|_| bad_token())
}

fn bad_token() -> Error {
    Error::invalid_field(
        "page_token",
        "page_token is not a token this service returned for this request",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_default_clamp_and_refuse_negatives() {
        assert_eq!(PageSize::parse(0).unwrap().get(), 50);
        assert_eq!(PageSize::parse(7).unwrap().get(), 7);
        assert_eq!(PageSize::parse(5000).unwrap().get(), 200);
        assert!(PageSize::parse(-1).is_err());
    }

    #[test]
    fn tokens_round_trip_and_bind_to_their_conversation() {
        let id = ConversationId::generate();
        let token = encode_messages_token(id, 42);
        assert_eq!(decode_messages_token(&token, id).unwrap(), Some(42));
        assert!(decode_messages_token(&token, ConversationId::generate()).is_err());
        assert!(decode_messages_token("garbage!", id).is_err());
        let cursor = ActivityCursor {
            activity: 1_700_000_000_000,
            conversation_id: id,
        };
        let token = encode_conversations_token(&cursor);
        assert_eq!(decode_conversations_token(&token).unwrap(), Some(cursor));
        assert!(decode_conversations_token(&encode_messages_token(id, 1)).is_err());
    }
}
