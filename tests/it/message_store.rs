//! One conformance suite for every `MessageStore`: the in-process store and the Redis store (on
//! the real Redis that scripts/test starts) must behave identically.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use crate::support::messages::{GENEROUS, create, rejection, send, text_message, user};
use svc_messaging::{
    files::policy::FileCategory,
    ids::{ConversationId, FileId, MessageId, UserId},
    messaging::model::{
        ClientId, EventKind, FileAttachment, Message, MessageContent, MessageKind, MessageRecord,
    },
    store::{
        memory::MemoryMessageStore,
        messages::{
            AppendOutcome, ChangeOutcome, ConversationCap, CreateOutcome, CreateRequest,
            DeleteOutcome, LiveSignal, MessageStore, NewConversation, NewMessage, ReadOutcome,
            Rejection, Retention, StoreError,
        },
    },
};

pub async fn create_is_idempotent_by_id(backend: Backend) {
    let store = backend.store(GENEROUS).await;
    let id = ConversationId::generate();
    let new = NewConversation {
        id,
        title: "Launch".to_owned(),
        participants: vec![user("alice"), user("bob")],
        created_by: user("alice"),
        fingerprint: "first".to_owned(),
        request: None,
    };
    let CreateOutcome::Created(created) = store.create_conversation(new.clone()).await.unwrap()
    else {
        panic!("first create must create");
    };
    assert_eq!(created.last_sequence, 0);
    assert_eq!(created.participants, [user("alice"), user("bob")]);
    let again = NewConversation {
        fingerprint: "second".to_owned(),
        title: "Other".to_owned(),
        ..new
    };
    match store.create_conversation(again).await.unwrap() {
        CreateOutcome::Existing {
            conversation,
            fingerprint,
        } => {
            assert_eq!(conversation.title, "Launch");
            assert_eq!(fingerprint, "first");
        }
        other => panic!("expected Existing, got {other:?}"),
    }
    let loaded = store.conversation(id).await.unwrap().unwrap();
    assert_eq!(loaded.created_by, user("alice"));
    assert!(
        store
            .conversation(ConversationId::generate())
            .await
            .unwrap()
            .is_none()
    );
}

/// A creator's `request_id` finds the conversation it created for exactly the window; other
/// creators' equal `request_id`s are theirs; after the window it creates a new conversation.
pub async fn request_ids_are_remembered_for_the_window(backend: Backend) {
    let store = backend.store(GENEROUS).await;
    const WINDOW: Duration = Duration::from_millis(1500);
    let new = |creator: &str, request_id: &str| NewConversation {
        id: ConversationId::generate(),
        title: "Launch".to_owned(),
        participants: vec![user(creator), user("bob")],
        created_by: user(creator),
        fingerprint: "fp".to_owned(),
        request: Some(CreateRequest {
            request_id: ClientId::from_field("request_id", request_id).unwrap(),
            window: WINDOW,
        }),
    };
    let request_id = format!("r-{}", MessageId::generate());
    let first = new("alice", &request_id);
    let CreateOutcome::Created(created) = store.create_conversation(first.clone()).await.unwrap()
    else {
        panic!("the first create creates");
    };
    assert_eq!(created.id, first.id);
    let retry = new("alice", &request_id);
    match store.create_conversation(retry.clone()).await.unwrap() {
        CreateOutcome::Existing {
            conversation,
            fingerprint,
        } => {
            assert_eq!(conversation.id, created.id);
            assert_eq!(fingerprint, "fp");
        }
        other => panic!("a retry within the window finds the original, got {other:?}"),
    }
    assert!(store.conversation(retry.id).await.unwrap().is_none());
    let CreateOutcome::Created(carols) = store
        .create_conversation(new("carol", &request_id))
        .await
        .unwrap()
    else {
        panic!("another creator's request_id is theirs");
    };
    assert_ne!(carols.id, created.id);

    tokio::time::sleep(WINDOW + Duration::from_millis(200)).await;
    let late = new("alice", &request_id);
    let CreateOutcome::Created(fresh) = store.create_conversation(late.clone()).await.unwrap()
    else {
        panic!("after the window the request_id creates a new conversation");
    };
    assert_eq!(fresh.id, late.id);
    assert_ne!(fresh.id, created.id);
    // ... and is remembered again, for a new window.
    match store
        .create_conversation(new("alice", &request_id))
        .await
        .unwrap()
    {
        CreateOutcome::Existing { conversation, .. } => assert_eq!(conversation.id, fresh.id),
        other => panic!("expected the new conversation, got {other:?}"),
    }
}

pub async fn concurrent_sends_get_gap_free_sequences(backend: Backend) {
    let store = backend.store(GENEROUS).await;
    let senders: Vec<String> = (0..20).map(|n| format!("user{n}")).collect();
    let others: Vec<&str> = senders[1..].iter().map(String::as_str).collect();
    let id = create(&*store, &senders[0], &others).await;
    let mut tasks = Vec::new();
    for sender in senders {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut sequences = Vec::new();
            for n in 0..5 {
                sequences.push(
                    send(&*store, id, &sender, &format!("{sender} #{n}"))
                        .await
                        .1,
                );
            }
            sequences
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(all, (1..=100).collect::<Vec<u64>>(), "gap-free and unique");
    assert_eq!(
        store.conversation(id).await.unwrap().unwrap().last_sequence,
        100
    );
    let page = store.events_after(id, 0, 1000).await.unwrap();
    let sequences: Vec<u64> = page.events.iter().map(|event| event.sequence).collect();
    assert_eq!(sequences, (1..=100).collect::<Vec<u64>>());
}

pub async fn retries_with_the_same_client_id_are_recognised(backend: Backend) {
    let store = backend.store(GENEROUS).await;
    let id = create(&*store, "alice", &["bob"]).await;
    let first = text_message(id, "alice", "m-1", "hello");
    let AppendOutcome::Appended(original) = store.append_message(first.clone()).await.unwrap()
    else {
        panic!("first send appends");
    };
    // A retry carries a fresh message id (the client cannot know the first one).
    let mut retry = text_message(id, "alice", "m-1", "something else");
    retry.fingerprint = "different".to_owned();
    match store.append_message(retry).await.unwrap() {
        AppendOutcome::Duplicate {
            message,
            fingerprint,
        } => {
            assert_eq!(message, original);
            assert_eq!(fingerprint, first.fingerprint);
        }
        other => panic!("expected Duplicate, got {other:?}"),
    }
    // The same client id from another sender is a different message.
    let from_bob = text_message(id, "bob", "m-1", "hello");
    assert!(matches!(
        store.append_message(from_bob).await.unwrap(),
        AppendOutcome::Appended(_)
    ));
    assert_eq!(
        store.conversation(id).await.unwrap().unwrap().last_sequence,
        2
    );
}

/// A client message id is remembered for its window and no longer: a retry within it is a
/// duplicate (also of a deleted message, which answers with the tombstone); after it, the same id
/// makes a new message.
pub async fn client_ids_are_remembered_for_their_window(backend: Backend) {
    let store = backend.store(GENEROUS).await;
    let id = create(&*store, "alice", &["bob"]).await;
    let with_window = |client_id: &str, secs: u64| NewMessage {
        idempotency_window_secs: secs,
        ..text_message(id, "alice", client_id, "hello")
    };
    let AppendOutcome::Appended(first) = store.append_message(with_window("w-1", 1)).await.unwrap()
    else {
        panic!("first send appends");
    };
    let AppendOutcome::Appended(kept) = store
        .append_message(with_window("w-2", 3600))
        .await
        .unwrap()
    else {
        panic!("first send appends");
    };
    match store.append_message(with_window("w-1", 1)).await.unwrap() {
        AppendOutcome::Duplicate { message, .. } => assert_eq!(message, first),
        other => panic!("expected Duplicate within the window, got {other:?}"),
    }
    store
        .delete_message(id, kept.record.id, &user("alice"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    match store.append_message(with_window("w-1", 1)).await.unwrap() {
        AppendOutcome::Appended(again) => assert!(again.sequence > first.sequence),
        other => panic!("expected a new message after the window, got {other:?}"),
    }
    match store
        .append_message(with_window("w-2", 3600))
        .await
        .unwrap()
    {
        AppendOutcome::Duplicate { message, .. } => {
            assert_eq!(message.sequence, kept.sequence);
            assert!(message.record.is_deleted());
        }
        other => panic!("expected Duplicate of the deleted message, got {other:?}"),
    }
    // The Redis store remembers ids in window-long time buckets (here 2 s, aligned to the
    // clock, which Redis shares with this test): a retry just after a bucket boundary must still
    // find a send made just before it.
    let wait_for = |lo: u64, hi: u64| async move {
        loop {
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64
                % 2000;
            if (lo..hi).contains(&ms) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    wait_for(1650, 1800).await;
    let AppendOutcome::Appended(before) =
        store.append_message(with_window("w-3", 2)).await.unwrap()
    else {
        panic!("first send appends");
    };
    wait_for(100, 300).await;
    match store.append_message(with_window("w-3", 2)).await.unwrap() {
        AppendOutcome::Duplicate { message, .. } => assert_eq!(message, before),
        other => panic!("expected Duplicate across a bucket boundary, got {other:?}"),
    }
}

pub async fn concurrent_retries_append_once(backend: Backend) {
    let store = backend.store(GENEROUS).await;
    let id = create(&*store, "alice", &[]).await;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .append_message(text_message(id, "alice", "same", "hello"))
                .await
                .unwrap()
        }));
    }
    let mut appended = 0;
    let mut ids = BTreeSet::new();
    for task in tasks {
        match task.await.unwrap() {
            AppendOutcome::Appended(message) => {
                appended += 1;
                ids.insert(message.record.id);
            }
            AppendOutcome::Duplicate { message, .. } => {
                ids.insert(message.record.id);
            }
        }
    }
    assert_eq!(appended, 1);
    assert_eq!(ids.len(), 1, "every retry sees the one message");
    assert_eq!(
        store.conversation(id).await.unwrap().unwrap().last_sequence,
        1
    );
}

pub async fn only_participants_write(backend: Backend) {
    let store = backend.store(GENEROUS).await;
    let id = create(&*store, "alice", &["bob"]).await;
    let missing = ConversationId::generate();
    assert_eq!(
        rejection(
            store
                .append_message(text_message(id, "mallory", "x", "hi"))
                .await
        ),
        Rejection::NotParticipant
    );
    assert_eq!(
        rejection(
            store
                .append_message(text_message(missing, "alice", "x", "hi"))
                .await
        ),
        Rejection::ConversationNotFound
    );
    assert_eq!(
        rejection(
            store
                .add_participants(id, &user("mallory"), &[user("eve")])
                .await
        ),
        Rejection::NotParticipant
    );
    assert_eq!(
        rejection(store.mark_read(id, &user("mallory"), 0).await),
        Rejection::NotParticipant
    );
    assert_eq!(
        rejection(
            store
                .remove_participant(missing, &user("alice"), &user("bob"))
                .await
        ),
        Rejection::ConversationNotFound
    );
}

pub async fn a_user_is_in_at_most_the_capped_number_of_conversations(backend: Backend) {
    let store = backend.capped_store(GENEROUS, ConversationCap(3)).await;
    let first = create(&*store, "alice", &["carol"]).await;
    let second = create(&*store, "bob", &["carol"]).await;
    create(&*store, "carol", &[]).await;
    let fourth = NewConversation {
        id: ConversationId::generate(),
        title: "one too many".to_owned(),
        participants: vec![user("dave"), user("carol")],
        created_by: user("dave"),
        fingerprint: "fp".to_owned(),
        request: None,
    };
    assert_eq!(
        rejection(store.create_conversation(fourth.clone()).await),
        Rejection::TooManyConversations
    );
    // Refused whole: nothing was created, and nothing counts against dave: he still has room
    // for three of his own.
    assert!(store.conversation(fourth.id).await.unwrap().is_none());
    assert!(
        store
            .conversations_of(&user("dave"), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    for _ in 0..3 {
        create(&*store, "dave", &[]).await;
    }

    let erins = create(&*store, "erin", &[]).await;
    assert_eq!(
        rejection(
            store
                .add_participants(erins, &user("erin"), &[user("frank"), user("carol")])
                .await
        ),
        Rejection::TooManyConversations
    );
    let unchanged = store.conversation(erins).await.unwrap().unwrap();
    assert_eq!(unchanged.participants, [user("erin")]);
    assert_eq!(unchanged.last_sequence, 0, "no event for a refused change");
    // Who is full is no business of a non-participant.
    assert_eq!(
        rejection(
            store
                .add_participants(erins, &user("mallory"), &[user("carol")])
                .await
        ),
        Rejection::NotParticipant
    );
    // A conversation carol is already in costs nothing: re-adding and a creation retry pass.
    assert!(matches!(
        store
            .add_participants(first, &user("alice"), &[user("carol")])
            .await
            .unwrap(),
        ChangeOutcome::Unchanged(_)
    ));
    let retry = NewConversation {
        id: second,
        title: "test".to_owned(),
        participants: vec![user("bob"), user("carol")],
        created_by: user("bob"),
        fingerprint: "fp".to_owned(),
        request: None,
    };
    assert!(matches!(
        store.create_conversation(retry.clone()).await.unwrap(),
        CreateOutcome::Existing { .. }
    ));
    // Leaving one makes room for another.
    store
        .remove_participant(second, &user("carol"), &user("carol"))
        .await
        .unwrap();
    assert!(matches!(
        store
            .add_participants(erins, &user("erin"), &[user("carol")])
            .await
            .unwrap(),
        ChangeOutcome::Changed(..)
    ));
    assert_eq!(
        store
            .conversations_of(&user("carol"), None, 10)
            .await
            .unwrap()
            .len(),
        3
    );
    // A full conversation is reported as such before a full user (both stores alike).
    let crowd = ConversationId::generate();
    let mut participants = vec![user("host")];
    participants.extend(
        (1..svc_messaging::messaging::model::MAX_PARTICIPANTS).map(|n| user(&format!("guest{n}"))),
    );
    store
        .create_conversation(NewConversation {
            id: crowd,
            title: "crowd".to_owned(),
            participants,
            created_by: user("host"),
            fingerprint: "fp".to_owned(),
            request: None,
        })
        .await
        .unwrap();
    assert_eq!(
        rejection(
            store
                .add_participants(crowd, &user("host"), &[user("carol")])
                .await
        ),
        Rejection::TooManyParticipants
    );
    // A retry of `second` naming someone else answers Existing and reserves nothing for them:
    // zed still has room for three of his own.
    assert!(matches!(
        store
            .create_conversation(NewConversation {
                participants: vec![user("bob"), user("zed")],
                ..retry.clone()
            })
            .await
            .unwrap(),
        CreateOutcome::Existing { .. }
    ));
    for _ in 0..3 {
        create(&*store, "zed", &[]).await;
    }
    // carol is full again, and left `second`: retrying its creation still answers as before.
    assert!(matches!(
        store.create_conversation(retry).await.unwrap(),
        CreateOutcome::Existing { .. }
    ));
}

pub async fn the_conversation_cap_holds_under_concurrent_requests(backend: Backend) {
    let store = backend.capped_store(GENEROUS, ConversationCap(3)).await;
    let tasks: Vec<_> = (0..30)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .create_conversation(NewConversation {
                        id: ConversationId::generate(),
                        title: format!("n{n}"),
                        participants: vec![user(&format!("creator{n}")), user("victim")],
                        created_by: user(&format!("creator{n}")),
                        fingerprint: "fp".to_owned(),
                        request: None,
                    })
                    .await
            })
        })
        .collect();
    let mut created = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(CreateOutcome::Created(_)) => created += 1,
            Err(StoreError::Rejected(Rejection::TooManyConversations)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        created, 3,
        "exactly the cap's worth of creations name the victim"
    );
    assert_eq!(
        store
            .conversations_of(&user("victim"), None, 100)
            .await
            .unwrap()
            .len(),
        3
    );
}

pub async fn participants_change_with_events(backend: Backend) {
    let store = backend.store(GENEROUS).await;
    let id = create(&*store, "alice", &["bob"]).await;
    // Anyone participating may add; existing participants are skipped.
    let ChangeOutcome::Changed(conversation, event) = store
        .add_participants(
            id,
            &user("bob"),
            &[user("carol"), user("alice"), user("carol")],
        )
        .await
        .unwrap()
    else {
        panic!("adding carol changes the conversation");
    };
    assert_eq!(
        conversation.participants,
        [user("alice"), user("bob"), user("carol")]
    );
    assert_eq!(event.sequence, 1);
    assert_eq!(
        event.kind,
        EventKind::ParticipantsChanged {
            added: vec![user("carol")],
            removed: vec![],
            changed_by: user("bob"),
            participants: vec![user("alice"), user("bob"), user("carol")],
        }
    );
    assert!(matches!(
        store
            .add_participants(id, &user("alice"), &[user("bob")])
            .await
            .unwrap(),
        ChangeOutcome::Unchanged(_)
    ));
    // Only the creator removes others; anyone may leave.
    assert_eq!(
        rejection(
            store
                .remove_participant(id, &user("bob"), &user("carol"))
                .await
        ),
        Rejection::NotCreator
    );
    assert_eq!(
        rejection(
            store
                .remove_participant(id, &user("alice"), &user("zed"))
                .await
        ),
        Rejection::ParticipantNotFound
    );
    let ChangeOutcome::Changed(conversation, event) = store
        .remove_participant(id, &user("bob"), &user("bob"))
        .await
        .unwrap()
    else {
        panic!("leaving changes the conversation");
    };
    assert_eq!(conversation.participants, [user("alice"), user("carol")]);
    assert_eq!(event.sequence, 2);
    let ChangeOutcome::Changed(conversation, _) = store
        .remove_participant(id, &user("alice"), &user("carol"))
        .await
        .unwrap()
    else {
        panic!("the creator removes carol");
    };
    assert_eq!(conversation.participants, [user("alice")]);
    assert_eq!(conversation.last_sequence, 3);
    // Removed users can no longer write.
    assert_eq!(
        rejection(
            store
                .append_message(text_message(id, "bob", "late", "hi"))
                .await
        ),
        Rejection::NotParticipant
    );
}

/// A message from `sender` carrying file `file_id` (as an upload or a re-post appends it).
fn file_message(id: ConversationId, sender: &str, file_id: &FileId) -> NewMessage {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    NewMessage {
        conversation_id: id,
        record: MessageRecord {
            id: MessageId::generate(),
            sender: user(sender),
            kind: MessageKind::File,
            client_message_id: ClientId::from_field(
                "client_message_id",
                &format!("c-{}", MessageId::generate()),
            )
            .unwrap(),
            content: Some(MessageContent {
                text: String::new(),
                file: Some(FileAttachment {
                    file_id: file_id.clone(),
                    uploader: user("alice"),
                    file_name: "plans.pdf".to_owned(),
                    content_type: "application/pdf".to_owned(),
                    // Beyond 2^53: Lua must not re-encode it.
                    size_bytes: 9_007_199_254_740_993,
                    sha256: "ab".repeat(32),
                    category: FileCategory::Document,
                    width: 0,
                    height: 0,
                    has_thumbnail: false,
                    create_time: now,
                    expire_time: now + 3_600_000,
                }),
            }),
        },
        fingerprint: format!("file:{file_id}"),
        idempotency_window_secs: 3600,
    }
}

async fn append(store: &dyn MessageStore, new: NewMessage) -> Message {
    match store.append_message(new).await.unwrap() {
        AppendOutcome::Appended(message) => message,
        other => panic!("expected an append, got {other:?}"),
    }
}

/// Issue 9 item 6: deleting a file tombstones every message carrying it (the upload's own and
/// every re-post, whoever sent it) with a MessageDeleted event each, leaves other messages
/// alone, and refuses later messages carrying it.
pub async fn deleting_a_file_tombstones_every_copy(backend: Backend) {
    let store = backend.store(GENEROUS).await;
    let id = create(&*store, "alice", &["bob", "carol"]).await;
    let file_id = FileId::generate();
    let other_file = FileId::generate();
    let expire = file_message(id, "alice", &file_id)
        .record
        .content
        .unwrap()
        .file
        .unwrap()
        .expire_time;
    let upload = append(&*store, file_message(id, "alice", &file_id)).await;
    let text = send(&*store, id, "bob", "unrelated").await;
    let bobs = append(&*store, file_message(id, "bob", &file_id)).await;
    let carols = append(&*store, file_message(id, "carol", &file_id)).await;
    let kept = append(&*store, file_message(id, "alice", &other_file)).await;
    // Carol already deleted her re-post: it gets no second MessageDeleted.
    store
        .delete_message(id, carols.record.id, &user("carol"))
        .await
        .unwrap();
    let before = store.conversation(id).await.unwrap().unwrap().last_sequence;

    assert_eq!(
        rejection(
            store
                .delete_file_messages(id, &file_id, &user("mallory"), expire)
                .await
        ),
        Rejection::NotParticipant
    );
    assert_eq!(
        rejection(
            store
                .delete_file_messages(ConversationId::generate(), &file_id, &user("alice"), expire)
                .await
        ),
        Rejection::ConversationNotFound
    );
    let events = store
        .delete_file_messages(id, &file_id, &user("alice"), expire)
        .await
        .unwrap();
    let deleted: Vec<(MessageId, UserId)> = events
        .iter()
        .map(|event| match &event.kind {
            EventKind::MessageDeleted {
                message_id,
                deleted_by,
            } => (*message_id, deleted_by.clone()),
            other => panic!("expected MessageDeleted, got {other:?}"),
        })
        .collect();
    assert_eq!(
        deleted,
        [
            (upload.record.id, user("alice")),
            (bobs.record.id, user("alice"))
        ]
    );
    assert_eq!(
        events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [before + 1, before + 2]
    );

    let history = store.messages_before(id, None, 100).await.unwrap();
    for message in &history {
        let carried = [upload.record.id, bobs.record.id, carols.record.id];
        assert_eq!(
            message.record.is_deleted(),
            carried.contains(&message.record.id),
            "{message:?}"
        );
    }
    assert_eq!(
        store.message(id, kept.record.id).await.unwrap().unwrap(),
        kept
    );
    assert!(
        store
            .message(id, text.0)
            .await
            .unwrap()
            .is_some_and(|m| !m.record.is_deleted())
    );
    // Replayed history carries the tombstones too.
    let page = store.events_after(id, 0, 100).await.unwrap();
    for event in &page.events {
        if let EventKind::MessageCreated(record) = &event.kind {
            assert_ne!(record.file_id(), Some(&file_id), "{event:?}");
        }
    }
    // Unread counts no longer count the copies: carol sees bob's text and alice's other file.
    assert_eq!(
        store
            .read_state(id, &user("carol"))
            .await
            .unwrap()
            .unread_count,
        2
    );

    // No message may carry the file any more, from anyone, and nothing is recorded.
    for sender in ["alice", "bob"] {
        assert_eq!(
            rejection(
                store
                    .append_message(file_message(id, sender, &file_id))
                    .await
            ),
            Rejection::FileDeleted
        );
    }
    append(&*store, file_message(id, "bob", &other_file)).await;
    // Deleting again changes nothing.
    assert!(
        store
            .delete_file_messages(id, &file_id, &user("alice"), expire)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.conversation(id).await.unwrap().unwrap().last_sequence,
        before + 3
    );
}

pub async fn deleting_leaves_a_tombstone_everywhere(backend: Backend) {
    let store = backend.store(GENEROUS).await;
    let id = create(&*store, "alice", &["bob"]).await;
    let (message_id, sequence) = send(&*store, id, "alice", "secret plans").await;
    assert_eq!(
        rejection(store.delete_message(id, message_id, &user("bob")).await),
        Rejection::NotSender
    );
    assert_eq!(
        rejection(
            store
                .delete_message(id, MessageId::generate(), &user("alice"))
                .await
        ),
        Rejection::MessageNotFound
    );
    let DeleteOutcome::Deleted(tombstone, event) = store
        .delete_message(id, message_id, &user("alice"))
        .await
        .unwrap()
    else {
        panic!("first delete deletes");
    };
    assert!(tombstone.record.is_deleted());
    assert_eq!(tombstone.sequence, sequence);
    assert_eq!(event.sequence, sequence + 1);
    assert_eq!(
        event.kind,
        EventKind::MessageDeleted {
            message_id,
            deleted_by: user("alice"),
        }
    );
    assert!(matches!(
        store
            .delete_message(id, message_id, &user("alice"))
            .await
            .unwrap(),
        DeleteOutcome::AlreadyDeleted(_)
    ));
    assert_eq!(
        store.conversation(id).await.unwrap().unwrap().last_sequence,
        2
    );
    // History and replay both show the tombstone, never the text.
    let history = store.messages_before(id, None, 10).await.unwrap();
    assert_eq!(history.len(), 1);
    assert!(history[0].record.is_deleted());
    let replay = store.events_after(id, 0, 10).await.unwrap();
    let created = replay.events[0].created_message().unwrap();
    assert!(created.record.is_deleted());
    assert_eq!(created.record.id, message_id);
    let stored = store.message(id, message_id).await.unwrap().unwrap();
    assert!(stored.record.is_deleted());
}

pub async fn read_positions_and_unread_counts(backend: Backend) {
    let store = backend.store(GENEROUS).await;
    let id = create(&*store, "alice", &["bob"]).await;
    send(&*store, id, "alice", "one").await;
    let (two, _) = send(&*store, id, "bob", "two").await;
    let (_, three_sequence) = send(&*store, id, "bob", "three").await;
    let state = store.read_state(id, &user("alice")).await.unwrap();
    assert_eq!(state.read_sequence, 0);
    assert_eq!(
        state.unread_count, 2,
        "bob's two messages; alice's own do not count"
    );
    assert_eq!(state.last_message.unwrap().sequence, three_sequence);
    assert_eq!(
        store
            .read_state(id, &user("bob"))
            .await
            .unwrap()
            .unread_count,
        1
    );

    let ReadOutcome::Advanced(receipt) = store.mark_read(id, &user("alice"), 2).await.unwrap()
    else {
        panic!("moving forward records a receipt");
    };
    assert_eq!(receipt.sequence, 4);
    assert_eq!(
        receipt.kind,
        EventKind::ReadReceipt {
            user_id: user("alice"),
            read_sequence: 2,
        }
    );
    assert_eq!(
        store
            .read_state(id, &user("alice"))
            .await
            .unwrap()
            .unread_count,
        1
    );
    assert_eq!(
        store.mark_read(id, &user("alice"), 1).await.unwrap(),
        ReadOutcome::Unchanged { read_sequence: 2 }
    );
    assert_eq!(
        rejection(store.mark_read(id, &user("alice"), 99).await),
        Rejection::SequenceAhead
    );
    // Deleted messages are not unread.
    store.delete_message(id, two, &user("bob")).await.unwrap();
    store.mark_read(id, &user("alice"), 1).await.unwrap();
    let state = store.read_state(id, &user("alice")).await.unwrap();
    assert_eq!(state.read_sequence, 2);
    assert_eq!(state.unread_count, 1);
}

pub async fn history_pages_newest_first(backend: Backend) {
    let store = backend.store(GENEROUS).await;
    let id = create(&*store, "alice", &[]).await;
    for n in 1..=7 {
        send(&*store, id, "alice", &format!("m{n}")).await;
    }
    store.mark_read(id, &user("alice"), 3).await.unwrap();
    let first = store.messages_before(id, None, 3).await.unwrap();
    assert_eq!(
        first.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        [7, 6, 5]
    );
    assert_eq!(first[0].record.content.as_ref().unwrap().text, "m7");
    let second = store.messages_before(id, Some(5), 3).await.unwrap();
    assert_eq!(
        second.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        [4, 3, 2]
    );
    let last = store.messages_before(id, Some(2), 3).await.unwrap();
    assert_eq!(last.iter().map(|m| m.sequence).collect::<Vec<_>>(), [1]);
    assert!(
        store
            .messages_before(ConversationId::generate(), None, 3)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn conversations_are_listed_by_activity(backend: Backend) {
    let store = backend.store(GENEROUS).await;
    let me = format!("lister-{}", MessageId::generate());
    let a = create(&*store, &me, &["x"]).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let b = create(&*store, &me, &["x"]).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let c = create(&*store, "x", &[&me]).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    send(&*store, a, "x", "bump").await;
    let all = store.conversations_of(&user(&me), None, 10).await.unwrap();
    let order: Vec<ConversationId> = all.iter().map(|entry| entry.conversation.id).collect();
    assert_eq!(order, [a, c, b]);
    // Paging by cursor.
    let first = store.conversations_of(&user(&me), None, 2).await.unwrap();
    let cursor = svc_messaging::store::messages::ActivityCursor {
        activity: first[1].activity,
        conversation_id: first[1].conversation.id,
    };
    let rest = store
        .conversations_of(&user(&me), Some(&cursor), 2)
        .await
        .unwrap();
    assert_eq!(
        rest.iter().map(|e| e.conversation.id).collect::<Vec<_>>(),
        [b]
    );
    // Leaving removes it from the list.
    store
        .remove_participant(c, &user(&me), &user(&me))
        .await
        .unwrap();
    let after = store.conversations_of(&user(&me), None, 10).await.unwrap();
    assert_eq!(
        after.iter().map(|e| e.conversation.id).collect::<Vec<_>>(),
        [a, b]
    );
}

/// Issue 14: the list stays ordered by activity in a 500-participant conversation, where a send
/// no longer writes anything per participant; a late joiner's entry starts when they joined.
pub async fn large_conversations_are_listed_by_activity(backend: Backend) {
    let store = backend.store(GENEROUS).await;
    let others: Vec<String> = (1..500).map(|i| format!("big-{i}")).collect();
    let refs: Vec<&str> = others.iter().map(String::as_str).collect();
    let big = create(&*store, "big-0", &refs).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let small = create(&*store, "big-250", &["big-499"]).await;
    let order = |user: &'static str| {
        let store = store.clone();
        async move {
            store
                .conversations_of(&crate::support::messages::user(user), None, 10)
                .await
                .unwrap()
                .iter()
                .map(|entry| (entry.conversation.id, entry.activity))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(order("big-250").await.first().unwrap().0, small);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (_, _) = send(&*store, big, "big-7", "to everyone").await;
    let sent_at = store
        .messages_before(big, None, 1)
        .await
        .unwrap()
        .first()
        .unwrap()
        .create_time;
    for user in ["big-0", "big-250", "big-499"] {
        let listed = order(user).await;
        assert_eq!(listed[0], (big, sent_at), "{user}");
    }
    assert_eq!(order("big-1").await, [(big, sent_at)]);
    tokio::time::sleep(Duration::from_millis(5)).await;
    send(&*store, small, "big-499", "just us").await;
    assert_eq!(
        order("big-250")
            .await
            .iter()
            .map(|(id, _)| *id)
            .collect::<Vec<_>>(),
        [small, big]
    );
    assert_eq!(order("big-1").await, [(big, sent_at)]);
    // Someone added later lists it from when they joined, until the next message.
    tokio::time::sleep(Duration::from_millis(5)).await;
    store
        .remove_participant(big, &user("big-0"), &user("big-3"))
        .await
        .unwrap();
    let ChangeOutcome::Changed(_, added) = store
        .add_participants(big, &user("big-0"), &[user("late")])
        .await
        .unwrap()
    else {
        panic!("expected Changed");
    };
    assert_eq!(order("late").await, [(big, added.create_time)]);
    assert!(order("big-3").await.is_empty());
    assert_eq!(
        order("big-1").await,
        [(big, sent_at)],
        "an addition is not activity for the others"
    );
}

pub async fn retention_trims_by_count(backend: Backend) {
    let store = backend
        .store(Retention {
            max_events: 5,
            ..GENEROUS
        })
        .await;
    // The store under test was built with max_events = 5.
    let id = create(&*store, "alice", &["bob"]).await;
    for n in 1..=8 {
        send(&*store, id, "bob", &format!("m{n}")).await;
    }
    let page = store.events_after(id, 0, 100).await.unwrap();
    assert_eq!(page.trimmed_through, 3);
    assert_eq!(
        page.events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [4, 5, 6, 7, 8]
    );
    let history = store.messages_before(id, None, 100).await.unwrap();
    assert_eq!(history.len(), 5, "trimmed messages leave history too");
    assert_eq!(
        store
            .read_state(id, &user("alice"))
            .await
            .unwrap()
            .unread_count,
        5
    );
    assert_eq!(
        store.conversation(id).await.unwrap().unwrap().last_sequence,
        8
    );
}

pub async fn retention_trims_by_age(backend: Backend) {
    let store = backend
        .store(Retention {
            max_age: Duration::from_secs(1),
            ..GENEROUS
        })
        .await;
    // The store under test was built with max_age = 1s.
    let id = create(&*store, "alice", &[]).await;
    send(&*store, id, "alice", "old").await;
    send(&*store, id, "alice", "old too").await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    send(&*store, id, "alice", "new").await;
    let page = store.events_after(id, 0, 100).await.unwrap();
    assert_eq!(page.trimmed_through, 2);
    assert_eq!(
        page.events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [3]
    );
}

/// Trimming by age keeps working after a first trim, whichever write comes next (the Redis store
/// remembers the oldest kept event's time between writes).
pub async fn retention_trims_by_age_again_and_again(backend: Backend) {
    let store = backend
        .store(Retention {
            max_age: Duration::from_secs(1),
            ..GENEROUS
        })
        .await;
    let id = create(&*store, "alice", &["bob"]).await;
    send(&*store, id, "alice", "one").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    send(&*store, id, "bob", "two").await;
    let page = store.events_after(id, 0, 100).await.unwrap();
    assert_eq!(page.trimmed_through, 1);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // A read receipt is a write too: it trims "two".
    store.mark_read(id, &user("alice"), 2).await.unwrap();
    let page = store.events_after(id, 0, 100).await.unwrap();
    assert_eq!(page.trimmed_through, 2);
    assert_eq!(
        page.events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [3]
    );
    assert!(
        store
            .messages_before(id, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    send(&*store, id, "bob", "three").await;
    let page = store.events_after(id, 0, 100).await.unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [3, 4]
    );
    assert_eq!(
        store
            .read_state(id, &user("alice"))
            .await
            .unwrap()
            .unread_count,
        1
    );
}

/// Every page of the event log, whatever its size and start, is the gap-free run of events in
/// order, messages and other events interleaved as they were committed (the Redis store keeps
/// MessageCreated apart from the other events and merges them when reading).
pub async fn event_pages_interleave_every_kind_in_order(backend: Backend) {
    let store = backend.store(GENEROUS).await;
    let id = create(&*store, "alice", &["bob"]).await;
    send(&*store, id, "alice", "one").await; // 1
    store.mark_read(id, &user("bob"), 1).await.unwrap(); // 2
    let (two, _) = send(&*store, id, "bob", "two").await; // 3
    send(&*store, id, "bob", "three").await; // 4
    store
        .add_participants(id, &user("alice"), &[user("carol")])
        .await
        .unwrap(); // 5
    store.delete_message(id, two, &user("bob")).await.unwrap(); // 6
    send(&*store, id, "carol", "four").await; // 7
    store.mark_read(id, &user("alice"), 7).await.unwrap(); // 8
    let kind = |event: &svc_messaging::messaging::model::Event| match &event.kind {
        EventKind::MessageCreated(message) if message.is_deleted() => "deleted-created",
        EventKind::MessageCreated(_) => "created",
        EventKind::ReadReceipt { .. } => "read",
        EventKind::ParticipantsChanged { .. } => "participants",
        EventKind::MessageDeleted { .. } => "deleted",
    };
    let all = store.events_after(id, 0, 100).await.unwrap().events;
    assert_eq!(
        all.iter()
            .map(|e| (e.sequence, kind(e)))
            .collect::<Vec<_>>(),
        [
            (1, "created"),
            (2, "read"),
            (3, "deleted-created"),
            (4, "created"),
            (5, "participants"),
            (6, "deleted"),
            (7, "created"),
            (8, "read"),
        ]
    );
    for size in 1..=4 {
        for start in 0..8u64 {
            let page = store.events_after(id, start, size).await.unwrap().events;
            let expected: Vec<u64> = (start + 1..=(start + size as u64).min(8)).collect();
            assert_eq!(
                page.iter().map(|e| e.sequence).collect::<Vec<_>>(),
                expected,
                "after {start}, limit {size}"
            );
            assert_eq!(page, all[start as usize..start as usize + expected.len()]);
        }
    }
    assert!(
        store
            .events_after(id, 8, 10)
            .await
            .unwrap()
            .events
            .is_empty()
    );
    assert!(
        store
            .events_after(id, 0, 0)
            .await
            .unwrap()
            .events
            .is_empty()
    );
}

pub async fn the_live_feed_carries_commits_in_order(backend: Backend) {
    let store = backend.store(GENEROUS).await;
    let mut feed = store.live_events();
    let id = create(&*store, "alice", &["bob"]).await;
    let _watch = store.watch(id).await.unwrap();
    send(&*store, id, "alice", "one").await;
    store.mark_read(id, &user("bob"), 1).await.unwrap();
    send(&*store, id, "bob", "two").await;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let signal = tokio::time::timeout(Duration::from_secs(15), feed.recv())
            .await
            .expect("live event within 15s")
            .expect("feed open");
        match signal {
            // An event the feed delivers again after a resync read it back is not new.
            LiveSignal::Event(event)
                if event.conversation_id == id
                    && seen.last().is_none_or(|last| event.sequence > *last) =>
            {
                seen.push(event.sequence);
            }
            // The feed lost its connection (a loaded machine): as its protocol says, whatever
            // was published meanwhile is read back from the store, in order.
            LiveSignal::Resync => {
                let after = seen.last().copied().unwrap_or(0);
                let page = store.events_after(id, after, 10).await.unwrap();
                seen.extend(page.events.iter().map(|event| event.sequence));
            }
            _ => {}
        }
    }
    assert_eq!(seen, [1, 2, 3]);
}

/// The message stores the suite runs on.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Memory,
    Redis,
    /// A three-master Redis Cluster: every conversation's keys share one hash slot, so its
    /// scripts run on one node, while conversations spread over all three.
    RedisCluster,
}

impl Backend {
    async fn store(self, retention: Retention) -> Arc<dyn MessageStore> {
        self.capped_store(retention, ConversationCap::DEFAULT).await
    }

    async fn capped_store(
        self,
        retention: Retention,
        cap: ConversationCap,
    ) -> Arc<dyn MessageStore> {
        use svc_messaging::{config::RedisSettings, store::redis::RedisMessageStore};
        let (url, prefix) = match self {
            Self::Memory => {
                return Arc::new(MemoryMessageStore::new(retention).with_conversation_cap(cap));
            }
            Self::Redis => ("SVC_TEST_REDIS_URL", "conformance"),
            Self::RedisCluster => ("SVC_TEST_REDIS_CLUSTER_URL", "cluster"),
        };
        let settings = RedisSettings {
            url: Some(secrecy::SecretString::from(crate::support::required_tool(
                url,
            ))),
            password: None,
            key_prefix: crate::support::unique_prefix(prefix),
            ..Default::default()
        };
        Arc::new(
            RedisMessageStore::connect(&settings, retention)
                .await
                .unwrap_or_else(|error| panic!("connect to {self:?} ({url}): {error}"))
                .with_conversation_cap(cap),
        )
    }
}

crate::support::suite! {
    backends:
        memory = super::Backend::Memory,
        redis = super::Backend::Redis,
        redis_cluster = super::Backend::RedisCluster;
    runtime: (flavor = "multi_thread", worker_threads = 2);
    tests: [
        create_is_idempotent_by_id,
        request_ids_are_remembered_for_the_window,
        concurrent_sends_get_gap_free_sequences,
        retries_with_the_same_client_id_are_recognised,
        client_ids_are_remembered_for_their_window,
        concurrent_retries_append_once,
        only_participants_write,
        a_user_is_in_at_most_the_capped_number_of_conversations,
        the_conversation_cap_holds_under_concurrent_requests,
        participants_change_with_events,
        deleting_leaves_a_tombstone_everywhere,
        deleting_a_file_tombstones_every_copy,
        read_positions_and_unread_counts,
        history_pages_newest_first,
        conversations_are_listed_by_activity,
        large_conversations_are_listed_by_activity,
        retention_trims_by_count,
        retention_trims_by_age,
        retention_trims_by_age_again_and_again,
        event_pages_interleave_every_kind_in_order,
        the_live_feed_carries_commits_in_order,
    ]
}
