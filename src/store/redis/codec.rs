//! The stored text forms and their parsing.
//!
//! - event member / pub/sub payload tail: `<seq>:<create_time_ms>:<json EventKind>`
//! - stored message: `<seq>:<create_time_ms>:<json MessageRecord>`
//! - pub/sub payload: `<conversation_id>:<event member>`
//! - conversation snapshot (script reply): `fingerprint, title, created_by, create_time,
//!   last_seq, participants...`

use serde::de::DeserializeOwned;

use crate::{
    ids::{ConversationId, UserId},
    messaging::model::{Conversation, Event, Message, MessageRecord},
    store::messages::StoreError,
};

fn corrupt(what: &str, why: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {why}"))
}

/// Splits `<seq>:<create_time_ms>:<json>` and decodes the JSON.
fn split_entry<T: DeserializeOwned>(what: &str, entry: &str) -> Result<(u64, i64, T), StoreError> {
    let mut parts = entry.splitn(3, ':');
    let (Some(sequence), Some(time), Some(json)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(corrupt(what, "expected <seq>:<time>:<json>"));
    };
    let sequence = sequence
        .parse()
        .map_err(|error| corrupt(what, format_args!("sequence: {error}")))?;
    let time = time
        .parse()
        .map_err(|error| corrupt(what, format_args!("time: {error}")))?;
    let value =
        serde_json::from_str(json).map_err(|error| corrupt(what, format_args!("json: {error}")))?;
    Ok((sequence, time, value))
}

/// An event from its member in the events ZSET.
pub(super) fn event(conversation_id: ConversationId, member: &str) -> Result<Event, StoreError> {
    let (sequence, create_time, kind) = split_entry("event", member)?;
    Ok(Event {
        conversation_id,
        sequence,
        create_time,
        kind,
    })
}

/// A message from its entry in the msg HASH.
pub(super) fn message(
    conversation_id: ConversationId,
    stored: &str,
) -> Result<Message, StoreError> {
    let (sequence, create_time, record) = split_entry::<MessageRecord>("message", stored)?;
    Ok(Message {
        conversation_id,
        sequence,
        create_time,
        record,
    })
}

/// An event from a pub/sub payload `<conversation_id>:<event member>`.
pub(super) fn published_event(payload: &str) -> Result<Event, StoreError> {
    let (id, member) = payload
        .split_once(':')
        .ok_or_else(|| corrupt("published event", "missing conversation id"))?;
    let id = ConversationId::parse(id).map_err(|error| corrupt("published event", error))?;
    event(id, member)
}

fn user(what: &str, raw: &str) -> Result<UserId, StoreError> {
    UserId::parse(raw).map_err(|error| corrupt(what, error))
}

/// A conversation and its creation fingerprint from a snapshot (see the module docs).
pub(super) fn conversation(
    id: ConversationId,
    fields: &[String],
) -> Result<(Conversation, String), StoreError> {
    let [
        fingerprint,
        title,
        created_by,
        create_time,
        last_sequence,
        participants @ ..,
    ] = fields
    else {
        return Err(corrupt("conversation", "snapshot too short"));
    };
    let conversation = Conversation {
        id,
        title: title.clone(),
        participants: participants
            .iter()
            .map(|raw| user("participant", raw))
            .collect::<Result<_, _>>()?,
        created_by: user("created_by", created_by)?,
        create_time: create_time
            .parse()
            .map_err(|error| corrupt("create_time", error))?,
        last_sequence: last_sequence
            .parse()
            .map_err(|error| corrupt("last_seq", error))?,
    };
    Ok((conversation, fingerprint.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messaging::model::EventKind;

    #[test]
    fn events_round_trip_through_the_stored_form() {
        let id = ConversationId::parse("0190a4d6-0000-7000-8000-000000000001").unwrap();
        let kind = EventKind::ReadReceipt {
            user_id: UserId::parse("bob:x").unwrap(),
            read_sequence: 7,
        };
        let member = format!("12:1700000000123:{}", serde_json::to_string(&kind).unwrap());
        let parsed = event(id, &member).unwrap();
        assert_eq!(parsed.sequence, 12);
        assert_eq!(parsed.create_time, 1_700_000_000_123);
        assert_eq!(parsed.kind, kind);
        let published = published_event(&format!("{id}:{member}")).unwrap();
        assert_eq!(published, parsed);
    }

    #[test]
    fn lua_built_json_is_accepted() {
        // What the scripts write: cjson escapes '/' and encodes arrays of strings.
        let id = ConversationId::parse("0190a4d6-0000-7000-8000-000000000001").unwrap();
        let member = r#"3:5:{"ParticipantsChanged":{"added":["a\/b"],"removed":[],"changed_by":"alice","participants":["alice","a\/b"]}}"#;
        let parsed = event(id, member).unwrap();
        let EventKind::ParticipantsChanged { added, .. } = parsed.kind else {
            panic!("wrong kind");
        };
        assert_eq!(added, vec![UserId::parse("a/b").unwrap()]);
    }

    #[test]
    fn malformed_entries_are_corrupt() {
        let id = ConversationId::parse("0190a4d6-0000-7000-8000-000000000001").unwrap();
        for bad in ["", "1:2", "x:2:{}", "1:2:{not json"] {
            assert!(
                matches!(event(id, bad), Err(StoreError::Corrupt(_))),
                "{bad}"
            );
        }
        assert!(conversation(id, &["fp".to_owned()]).is_err());
    }
}
