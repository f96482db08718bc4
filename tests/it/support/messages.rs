//! Helpers for tests that drive a `MessageStore` directly (the conformance suite and the Redis
//! store's own tests): users, conversations, messages and the answers to expect.

use std::time::Duration;

use svc_messaging::{
    ids::{ConversationId, MessageId, UserId},
    messaging::model::{ClientId, MessageContent, MessageKind, MessageRecord},
    store::messages::{
        AppendOutcome, CreateOutcome, MessageStore, NewConversation, NewMessage, Rejection,
        Retention, StoreError,
    },
};

/// A retention no test reaches.
pub const GENEROUS: Retention = Retention {
    max_events: 100_000,
    max_age: Duration::from_secs(30 * 24 * 3600),
};

pub fn user(name: &str) -> UserId {
    UserId::parse(name).unwrap()
}

/// Creates a conversation of `creator` and `others` and returns its id.
pub async fn create(store: &dyn MessageStore, creator: &str, others: &[&str]) -> ConversationId {
    let id = ConversationId::generate();
    let mut participants = vec![user(creator)];
    participants.extend(others.iter().map(|name| user(name)));
    let outcome = store
        .create_conversation(NewConversation {
            id,
            title: "test".to_owned(),
            participants,
            created_by: user(creator),
            fingerprint: "fp".to_owned(),
            request: None,
        })
        .await
        .unwrap();
    assert!(matches!(outcome, CreateOutcome::Created(_)), "{outcome:?}");
    id
}

/// A text message whose fingerprint is its text.
pub fn text_message(id: ConversationId, sender: &str, client_id: &str, text: &str) -> NewMessage {
    NewMessage {
        conversation_id: id,
        record: MessageRecord {
            id: MessageId::generate(),
            sender: user(sender),
            kind: MessageKind::Text,
            client_message_id: ClientId::from_field("client_message_id", client_id).unwrap(),
            content: Some(MessageContent {
                text: text.to_owned(),
                file: None,
            }),
        },
        fingerprint: format!("fp:{text}"),
        idempotency_window_secs: 3600,
    }
}

/// Appends a text message under a fresh client id; returns its id and sequence.
pub async fn send(
    store: &dyn MessageStore,
    id: ConversationId,
    sender: &str,
    text: &str,
) -> (MessageId, u64) {
    let new = text_message(id, sender, &format!("c-{}", MessageId::generate()), text);
    match store.append_message(new).await.unwrap() {
        AppendOutcome::Appended(message) => (message.record.id, message.sequence),
        other => panic!("expected an append, got {other:?}"),
    }
}

/// The rejection in `result`, or a panic saying what came instead.
pub fn rejection<T: std::fmt::Debug>(result: Result<T, StoreError>) -> Rejection {
    match result {
        Err(StoreError::Rejected(rejection)) => rejection,
        other => panic!("expected a rejection, got {other:?}"),
    }
}
