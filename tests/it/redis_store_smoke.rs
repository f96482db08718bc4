//! Smoke tests of the Redis message store against a real Redis (`SVC_TEST_REDIS_URL`, which
//! `scripts/test` exports). Each test uses its own key prefix, so they run in parallel.

use std::{sync::Arc, time::Duration};

use crate::support::{
    PrivateRedis,
    messages::{GENEROUS, create, rejection, send, text_message, user},
    required_tool, unique_prefix,
};
use secrecy::SecretString;
use svc_messaging::{
    config::RedisSettings,
    health::DependencyCheck,
    ids::{ConversationId, FileId, MessageId, UserId},
    messaging::model::{ClientId, EventKind, MessageContent, MessageKind, MessageRecord},
    store::{
        messages::{
            ActivityCursor, AppendOutcome, ChangeOutcome, CreateOutcome, DeleteOutcome, LiveSignal,
            MessageStore, NewConversation, NewMessage, ReadOutcome, Rejection, Retention,
            StoreError,
        },
        redis::RedisMessageStore,
    },
};

fn settings(prefix: &str) -> RedisSettings {
    RedisSettings {
        url: Some(SecretString::from(redis_url())),
        password: None,
        key_prefix: prefix.to_owned(),
        ..Default::default()
    }
}

fn redis_url() -> String {
    required_tool("SVC_TEST_REDIS_URL")
}

async fn store(test: &str, retention: Retention) -> RedisMessageStore {
    store_and_prefix(test, retention).await.0
}

/// A store under a fresh prefix, and that prefix (for tests that read its keys raw).
async fn store_and_prefix(test: &str, retention: Retention) -> (RedisMessageStore, String) {
    let prefix = unique_prefix(test);
    let store = RedisMessageStore::connect(&settings(&prefix), retention)
        .await
        .expect("connect to the test redis");
    (store, prefix)
}

#[tokio::test]
async fn create_then_existing() {
    let store = store("create", GENEROUS).await;
    let id = ConversationId::generate();
    let new = NewConversation {
        id,
        title: "Launch / \"plans\" = ok".to_owned(),
        participants: vec![user("alice"), user("bob"), user("carol:x")],
        created_by: user("alice"),
        fingerprint: "first".to_owned(),
        request: None,
    };
    let CreateOutcome::Created(created) = store.create_conversation(new.clone()).await.unwrap()
    else {
        panic!("first create must create");
    };
    assert_eq!(created.last_sequence, 0);
    assert_eq!(created.title, new.title);
    assert_eq!(created.participants, new.participants);
    assert!(created.create_time > 1_600_000_000_000);
    let again = NewConversation {
        title: "Other".to_owned(),
        fingerprint: "second".to_owned(),
        ..new
    };
    match store.create_conversation(again).await.unwrap() {
        CreateOutcome::Existing {
            conversation,
            fingerprint,
        } => {
            assert_eq!(conversation, created);
            assert_eq!(fingerprint, "first");
        }
        other => panic!("expected Existing, got {other:?}"),
    }
    assert_eq!(store.conversation(id).await.unwrap(), Some(created));
    assert_eq!(
        store
            .conversation(ConversationId::generate())
            .await
            .unwrap(),
        None
    );
    store.check().await.expect("health check");
}

#[tokio::test]
async fn concurrent_appends_get_gap_free_sequences() {
    let store: Arc<dyn MessageStore> = Arc::new(store("concurrent", GENEROUS).await);
    let id = create(store.as_ref(), "alice", &["bob"]).await;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let sender = if i % 2 == 0 { "alice" } else { "bob" };
                send(store.as_ref(), id, sender, &format!("message {i}"))
                    .await
                    .1
            })
        })
        .collect();
    let mut sequences = Vec::new();
    for task in tasks {
        sequences.push(task.await.unwrap());
    }
    sequences.sort_unstable();
    assert_eq!(sequences, (1..=20).collect::<Vec<u64>>());
    let page = store.events_after(id, 0, 100).await.unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<u64>>()
    );
    assert_eq!(page.trimmed_through, 0);
    assert_eq!(
        store.conversation(id).await.unwrap().unwrap().last_sequence,
        20
    );
    let newest = store.messages_before(id, None, 5).await.unwrap();
    assert_eq!(
        newest.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        [20, 19, 18, 17, 16]
    );
    let older = store.messages_before(id, Some(16), 3).await.unwrap();
    assert_eq!(
        older.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        [15, 14, 13]
    );
}

#[tokio::test]
async fn duplicate_client_message_ids_are_reported() {
    let store = store("duplicate", GENEROUS).await;
    let id = create(&store, "alice", &["bob"]).await;
    let first = text_message(id, "alice", "c-1", "hello");
    let AppendOutcome::Appended(appended) = store.append_message(first.clone()).await.unwrap()
    else {
        panic!("first append must append");
    };
    let retry = NewMessage {
        record: MessageRecord {
            id: MessageId::generate(),
            ..first.record.clone()
        },
        fingerprint: "fp:other".to_owned(),
        ..first.clone()
    };
    match store.append_message(retry).await.unwrap() {
        AppendOutcome::Duplicate {
            message,
            fingerprint,
        } => {
            assert_eq!(fingerprint, "fp:hello");
            assert_eq!(message, appended);
        }
        other => panic!("expected Duplicate, got {other:?}"),
    }
    // The same client id from another sender is a different message.
    let bob = text_message(id, "bob", "c-1", "hi");
    assert!(matches!(
        store.append_message(bob).await.unwrap(),
        AppendOutcome::Appended(_)
    ));
    assert_eq!(
        rejection(
            store
                .append_message(text_message(id, "mallory", "c-2", "x"))
                .await
        ),
        Rejection::NotParticipant
    );
    assert_eq!(
        rejection(
            store
                .append_message(text_message(
                    ConversationId::generate(),
                    "alice",
                    "c-3",
                    "x"
                ))
                .await
        ),
        Rejection::ConversationNotFound
    );
}

#[tokio::test]
async fn deletes_leave_tombstones() {
    let store = store("delete", GENEROUS).await;
    let id = create(&store, "alice", &["bob"]).await;
    let (message_id, sequence) = send(&store, id, "alice", "secret").await;
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
    assert_eq!(
        rejection(store.delete_message(id, message_id, &user("mallory")).await),
        Rejection::NotParticipant
    );
    let DeleteOutcome::Deleted(tombstone, event) = store
        .delete_message(id, message_id, &user("alice"))
        .await
        .unwrap()
    else {
        panic!("expected Deleted");
    };
    assert!(tombstone.record.is_deleted());
    assert_eq!(tombstone.sequence, sequence);
    assert_eq!(event.sequence, sequence + 1);
    assert_eq!(
        event.kind,
        EventKind::MessageDeleted {
            message_id,
            deleted_by: user("alice")
        }
    );
    let history = store.messages_before(id, None, 10).await.unwrap();
    assert_eq!(history, vec![tombstone.clone()]);
    let page = store.events_after(id, 0, 10).await.unwrap();
    assert_eq!(page.events.len(), 2);
    assert_eq!(page.events[0].created_message(), Some(tombstone.clone()));
    assert_eq!(page.events[1], event);
    match store
        .delete_message(id, message_id, &user("alice"))
        .await
        .unwrap()
    {
        DeleteOutcome::AlreadyDeleted(message) => assert_eq!(message, tombstone),
        other => panic!("expected AlreadyDeleted, got {other:?}"),
    }
    assert_eq!(
        store.message(id, message_id).await.unwrap(),
        Some(tombstone)
    );
}

#[tokio::test]
async fn read_positions_and_unread_counts() {
    let store = store("read", GENEROUS).await;
    let id = create(&store, "alice", &["bob"]).await;
    send(&store, id, "alice", "one").await;
    let (deleted, _) = send(&store, id, "alice", "two").await;
    send(&store, id, "bob", "mine").await;
    let (_, last) = send(&store, id, "alice", "three").await;
    store
        .delete_message(id, deleted, &user("alice"))
        .await
        .unwrap();
    let state = store.read_state(id, &user("bob")).await.unwrap();
    assert_eq!(state.read_sequence, 0);
    // alice's "one" and "three": the deleted one and bob's own do not count.
    assert_eq!(state.unread_count, 2);
    assert_eq!(state.last_message.unwrap().sequence, last);

    let ReadOutcome::Advanced(receipt) = store.mark_read(id, &user("bob"), 2).await.unwrap() else {
        panic!("expected Advanced");
    };
    assert_eq!(
        receipt.kind,
        EventKind::ReadReceipt {
            user_id: user("bob"),
            read_sequence: 2
        }
    );
    assert_eq!(
        store.mark_read(id, &user("bob"), 1).await.unwrap(),
        ReadOutcome::Unchanged { read_sequence: 2 }
    );
    assert_eq!(
        rejection(store.mark_read(id, &user("bob"), 1000).await),
        Rejection::SequenceAhead
    );
    assert_eq!(
        rejection(store.mark_read(id, &user("mallory"), 1).await),
        Rejection::NotParticipant
    );
    let state = store.read_state(id, &user("bob")).await.unwrap();
    assert_eq!(state.read_sequence, 2);
    assert_eq!(state.unread_count, 1);
    let unknown = store
        .read_state(ConversationId::generate(), &user("bob"))
        .await
        .unwrap();
    assert_eq!(unknown.read_sequence, 0);
    assert_eq!(unknown.unread_count, 0);
    assert!(unknown.last_message.is_none());
}

#[tokio::test]
async fn retention_trims_events_and_history() {
    let store = store(
        "retention",
        Retention {
            max_events: 5,
            max_age: Duration::from_secs(3600),
        },
    )
    .await;
    let id = create(&store, "alice", &["bob"]).await;
    let mut sent = Vec::new();
    for i in 0..8 {
        sent.push(send(&store, id, "alice", &format!("m{i}")).await);
    }
    let page = store.events_after(id, 0, 100).await.unwrap();
    assert_eq!(page.trimmed_through, 3);
    assert_eq!(
        page.events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [4, 5, 6, 7, 8]
    );
    let history = store.messages_before(id, None, 100).await.unwrap();
    assert_eq!(
        history.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        [8, 7, 6, 5, 4]
    );
    assert_eq!(store.message(id, sent[0].0).await.unwrap(), None);
    assert_eq!(
        store
            .read_state(id, &user("bob"))
            .await
            .unwrap()
            .unread_count,
        5
    );
}

#[tokio::test]
async fn retention_trims_by_age() {
    let store = store(
        "age",
        Retention {
            max_events: 100,
            max_age: Duration::from_millis(300),
        },
    )
    .await;
    let id = create(&store, "alice", &["bob"]).await;
    send(&store, id, "alice", "old").await;
    send(&store, id, "alice", "old too").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    send(&store, id, "bob", "new").await;
    let page = store.events_after(id, 0, 100).await.unwrap();
    assert_eq!(page.trimmed_through, 2);
    assert_eq!(page.events.len(), 1);
    assert_eq!(store.messages_before(id, None, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn participants_and_conversation_lists() {
    let store = store("participants", GENEROUS).await;
    let first = create(&store, "alice", &["bob"]).await;
    let second = create(&store, "alice", &[]).await;
    assert_eq!(
        rejection(
            store
                .add_participants(first, &user("mallory"), &[user("x")])
                .await
        ),
        Rejection::NotParticipant
    );
    let ChangeOutcome::Changed(conversation, event) = store
        .add_participants(
            second,
            &user("alice"),
            &[user("bob"), user("carol"), user("bob")],
        )
        .await
        .unwrap()
    else {
        panic!("expected Changed");
    };
    assert_eq!(
        conversation.participants,
        [user("alice"), user("bob"), user("carol")]
    );
    assert_eq!(conversation.last_sequence, 1);
    assert_eq!(
        event.kind,
        EventKind::ParticipantsChanged {
            added: vec![user("bob"), user("carol")],
            removed: vec![],
            changed_by: user("alice"),
            participants: conversation.participants.clone(),
        }
    );
    assert!(matches!(
        store
            .add_participants(second, &user("bob"), &[user("carol")])
            .await
            .unwrap(),
        ChangeOutcome::Unchanged(_)
    ));
    let too_many: Vec<UserId> = (0..1000).map(|i| user(&format!("u{i}"))).collect();
    assert_eq!(
        rejection(
            store
                .add_participants(second, &user("alice"), &too_many)
                .await
        ),
        Rejection::TooManyParticipants
    );
    assert_eq!(
        rejection(
            store
                .remove_participant(second, &user("bob"), &user("carol"))
                .await
        ),
        Rejection::NotCreator
    );
    assert_eq!(
        rejection(
            store
                .remove_participant(second, &user("alice"), &user("zed"))
                .await
        ),
        Rejection::ParticipantNotFound
    );

    // Newest activity first: `first` gets a message after `second` changed.
    send(&store, first, "bob", "hi").await;
    let bobs = store
        .conversations_of(&user("bob"), None, 10)
        .await
        .unwrap();
    assert_eq!(
        bobs.iter().map(|e| e.conversation.id).collect::<Vec<_>>(),
        [first, second]
    );
    let page = store.conversations_of(&user("bob"), None, 1).await.unwrap();
    assert_eq!(page.len(), 1);
    let cursor = ActivityCursor {
        activity: page[0].activity,
        conversation_id: page[0].conversation.id,
    };
    let rest = store
        .conversations_of(&user("bob"), Some(&cursor), 10)
        .await
        .unwrap();
    assert_eq!(
        rest.iter().map(|e| e.conversation.id).collect::<Vec<_>>(),
        [second]
    );

    let ChangeOutcome::Changed(conversation, event) = store
        .remove_participant(second, &user("bob"), &user("bob"))
        .await
        .unwrap()
    else {
        panic!("expected Changed");
    };
    assert_eq!(conversation.participants, [user("alice"), user("carol")]);
    assert_eq!(
        event.kind,
        EventKind::ParticipantsChanged {
            added: vec![],
            removed: vec![user("bob")],
            changed_by: user("bob"),
            participants: conversation.participants.clone(),
        }
    );
    let bobs = store
        .conversations_of(&user("bob"), None, 10)
        .await
        .unwrap();
    assert_eq!(
        bobs.iter().map(|e| e.conversation.id).collect::<Vec<_>>(),
        [first]
    );
}

/// A plain fred client on the test Redis (following a cluster like the store does).
async fn raw_client() -> fred::prelude::Client {
    use fred::prelude::{Builder, ClientLike, Config, ServerConfig};

    let mut config = Config::from_url(&redis_url()).unwrap();
    let client = Builder::from_config(config.clone()).build().unwrap();
    client.init().await.unwrap();
    let info: String = client
        .info(Some(fred::types::InfoKind::Cluster))
        .await
        .unwrap();
    if !info.contains("cluster_enabled:1") {
        return client;
    }
    client.quit().await.unwrap();
    if let ServerConfig::Centralized { server } = &config.server {
        config.server = ServerConfig::Clustered {
            hosts: vec![server.clone()],
            policy: Default::default(),
        };
    }
    config.database = None;
    let client = Builder::from_config(config).build().unwrap();
    client.init().await.unwrap();
    client
}

/// Index entries of conversations the user is not in (a reservation whose change never came,
/// a leave whose index update failed) count against the cap: a listing drops those older than
/// a minute, and keeps younger ones (a reservation may be about to commit).
#[tokio::test]
async fn listings_drop_long_stale_index_entries() {
    use fred::prelude::{ClientLike, SortedSetsInterface};

    let (store, prefix) = store_and_prefix("stale", GENEROUS).await;
    let mine = create(&store, "alice", &[]).await;
    let theirs = create(&store, "bob", &[]).await;
    let gone = ConversationId::generate();
    let young = ConversationId::generate();
    let raw = raw_client().await;
    let index = format!("{prefix}:{{u:alice}}:convs");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64;
    for (score, id) in [
        (now - 120_000.0, theirs),
        (now - 120_000.0, gone),
        (now - 1_000.0, young),
    ] {
        let _: i64 = raw
            .zadd(&index, None, None, false, false, (score, id.to_string()))
            .await
            .unwrap();
    }
    let listed = store
        .conversations_of(&user("alice"), None, 10)
        .await
        .unwrap();
    assert_eq!(
        listed.iter().map(|e| e.conversation.id).collect::<Vec<_>>(),
        [mine]
    );
    let mut left: Vec<String> = raw
        .zrange(&index, 0, -1, None, false, None, false)
        .await
        .unwrap();
    left.sort();
    let mut expected = vec![mine.to_string(), young.to_string()];
    expected.sort();
    assert_eq!(left, expected, "stale entries dropped, the young one kept");
    raw.quit().await.unwrap();
}

/// A create whose reservations fail for one participant (here: that user's index is not a
/// sorted set) takes back the places it reserved for the others: nothing counts against them.
#[tokio::test]
async fn a_failed_reservation_takes_the_others_back() {
    use fred::prelude::{ClientLike, KeysInterface, SortedSetsInterface};
    let (store, prefix) = store_and_prefix("reserve-fail", GENEROUS).await;
    let raw = raw_client().await;
    let () = raw
        .set(
            format!("{prefix}:{{u:broken}}:convs"),
            "not a zset",
            None,
            None,
            false,
        )
        .await
        .unwrap();
    let id = ConversationId::generate();
    let created = store
        .create_conversation(NewConversation {
            id,
            title: "t".to_owned(),
            participants: vec![user("alice"), user("broken")],
            created_by: user("alice"),
            fingerprint: "fp".to_owned(),
            request: None,
        })
        .await;
    assert!(created.is_err(), "{created:?}");
    let score: Option<f64> = raw
        .zscore(format!("{prefix}:{{u:alice}}:convs"), id.to_string())
        .await
        .unwrap();
    assert_eq!(score, None, "alice's reservation was taken back");
    assert!(store.conversation(id).await.unwrap().is_none());
    raw.quit().await.unwrap();
}

#[tokio::test]
async fn conversation_lists_break_activity_ties_by_id() {
    use fred::prelude::{ClientLike, SortedSetsInterface};

    let (store, prefix) = store_and_prefix("ties", GENEROUS).await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(create(&store, "alice", &[]).await);
    }
    // Force ties: five conversations share one activity, one is newer.
    let raw = raw_client().await;
    let index = format!("{prefix}:{{u:alice}}:convs");
    for (i, id) in ids.iter().enumerate() {
        let activity = if i == 3 { 2000.0 } else { 1000.0 };
        let _: i64 = raw
            .zadd(&index, None, None, false, false, (activity, id.to_string()))
            .await
            .unwrap();
    }
    let mut expected: Vec<(i64, ConversationId)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (if i == 3 { 2000 } else { 1000 }, *id))
        .collect();
    expected.sort_unstable_by(|a, b| b.cmp(a));

    let all = store
        .conversations_of(&user("alice"), None, 10)
        .await
        .unwrap();
    let listed: Vec<_> = all
        .iter()
        .map(|e| (e.activity, e.conversation.id))
        .collect();
    assert_eq!(listed, expected, "newest first, then id descending");

    let mut paged = Vec::new();
    let mut cursor: Option<ActivityCursor> = None;
    loop {
        let page = store
            .conversations_of(&user("alice"), cursor.as_ref(), 2)
            .await
            .unwrap();
        let Some(last) = page.last() else { break };
        cursor = Some(ActivityCursor {
            activity: last.activity,
            conversation_id: last.conversation.id,
        });
        paged.extend(page.iter().map(|e| (e.activity, e.conversation.id)));
    }
    assert_eq!(paged, expected);
    raw.quit().await.unwrap();
}

#[tokio::test]
async fn live_events_come_from_every_instance_in_order() {
    let prefix = unique_prefix("live");
    let reader = RedisMessageStore::connect(&settings(&prefix), GENEROUS)
        .await
        .unwrap();
    let writer = RedisMessageStore::connect(&settings(&prefix), GENEROUS)
        .await
        .unwrap();
    let mut live = reader.live_events();
    let id = create(&writer, "alice", &["bob"]).await;
    let _watch = reader.watch(id).await.unwrap();
    for i in 0..10 {
        send(&writer, id, "alice", &format!("m{i}")).await;
    }
    writer.mark_read(id, &user("bob"), 10).await.unwrap();
    let mut sequences = Vec::new();
    while sequences.len() < 11 {
        let signal = tokio::time::timeout(Duration::from_secs(5), live.recv())
            .await
            .expect("live event within 5 s")
            .unwrap();
        match signal {
            LiveSignal::Event(event) => {
                assert_eq!(event.conversation_id, id);
                sequences.push(event.sequence);
            }
            LiveSignal::Resync => panic!("unexpected resync"),
        }
    }
    assert_eq!(sequences, (1..=11).collect::<Vec<u64>>());
    // Other prefixes' events do not leak in.
    let other = store("live-other", GENEROUS).await;
    let other_id = create(&other, "alice", &[]).await;
    send(&other, other_id, "alice", "elsewhere").await;
    send(&writer, id, "alice", "last").await;
    let Ok(Ok(LiveSignal::Event(event))) =
        tokio::time::timeout(Duration::from_secs(5), live.recv()).await
    else {
        panic!("expected the next event");
    };
    assert_eq!((event.conversation_id, event.sequence), (id, 12));
}

/// The URL's password, decoded, and the URL without it.
fn split_password() -> (String, String) {
    let mut url = url::Url::parse(&redis_url()).expect("SVC_TEST_REDIS_URL is a URL");
    let encoded = url.password().unwrap_or_default().to_owned();
    let password = percent_encoding::percent_decode_str(&encoded)
        .decode_utf8()
        .unwrap()
        .into_owned();
    url.set_password(None).unwrap();
    (password, url.to_string())
}

#[tokio::test]
async fn raw_password_setting_works_with_a_url_without_password() {
    let (password, bare_url) = split_password();
    let settings = RedisSettings {
        url: Some(SecretString::from(bare_url.clone())),
        password: Some(SecretString::from(password)),
        key_prefix: unique_prefix("raw-password"),
        ..Default::default()
    };
    let store = RedisMessageStore::connect(&settings, GENEROUS)
        .await
        .unwrap();
    store.check().await.unwrap();
    let id = create(&store, "alice", &[]).await;
    assert!(store.conversation(id).await.unwrap().is_some());

    let wrong = RedisSettings {
        url: Some(SecretString::from(bare_url)),
        password: Some(SecretString::from("not-the-password".to_owned())),
        key_prefix: unique_prefix("wrong-password"),
        ..Default::default()
    };
    match RedisMessageStore::connect(&wrong, GENEROUS).await {
        Err(StoreError::Unavailable(error)) => {
            assert!(!error.to_string().contains("not-the-password"), "{error}");
        }
        other => panic!("expected Unavailable, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn percent_encoded_url_works() {
    // scripts/test's URL carries a password with '/' and '=', percent-encoded.
    let store = store("encoded", GENEROUS).await;
    store.check().await.unwrap();
    assert_eq!(store.name(), "redis");
}

#[tokio::test]
async fn unreachable_redis_is_unavailable() {
    let settings = RedisSettings {
        url: Some(SecretString::from("redis://127.0.0.1:1/0".to_owned())),
        password: None,
        key_prefix: "unreachable".to_owned(),
        ..Default::default()
    };
    let result = RedisMessageStore::connect(&settings, GENEROUS).await;
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{:?}",
        result.map(|_| ())
    );
}

/// Subscribers of a conversation's live channel (`PUBSUB NUMSUB`).
async fn subscribers(raw: &fred::prelude::Client, prefix: &str, id: ConversationId) -> i64 {
    use fred::prelude::PubsubInterface;
    let channel = format!("{prefix}:{{c:{id}}}:live");
    let counts: Vec<(String, i64)> = raw.pubsub_numsub(channel).await.unwrap();
    counts[0].1
}

/// Waits up to 5 s for a conversation's live channel to have no subscriber (releases are
/// handled by a task of the store's, after the watch is dropped).
async fn until_unsubscribed(
    raw: &fred::prelude::Client,
    prefix: &str,
    id: ConversationId,
    what: &str,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while subscribers(raw, prefix, id).await != 0 {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Issue 14 (scale): each conversation has its own channel, and a replica subscribes only to
/// those it watches, counted: events of other conversations never reach its feed, and the last
/// release unsubscribes.
#[tokio::test]
async fn a_replica_receives_only_the_conversations_it_watches() {
    use fred::prelude::ClientLike;
    let prefix = unique_prefix("watch");
    let reader = RedisMessageStore::connect(&settings(&prefix), GENEROUS)
        .await
        .unwrap();
    let writer = RedisMessageStore::connect(&settings(&prefix), GENEROUS)
        .await
        .unwrap();
    let raw = raw_client().await;
    let watched = create(&writer, "alice", &[]).await;
    let unwatched = create(&writer, "alice", &[]).await;
    let mut live = reader.live_events();
    let first = reader.watch(watched).await.unwrap();
    let second = reader.watch(watched).await.unwrap();
    assert_eq!(
        subscribers(&raw, &prefix, watched).await,
        1,
        "one subscription for two watches"
    );
    assert_eq!(subscribers(&raw, &prefix, unwatched).await, 0);
    send(&writer, unwatched, "alice", "not for this replica").await;
    send(&writer, watched, "alice", "for this replica").await;
    let Ok(Ok(LiveSignal::Event(event))) =
        tokio::time::timeout(Duration::from_secs(5), live.recv()).await
    else {
        panic!("expected the watched conversation's event");
    };
    assert_eq!((event.conversation_id, event.sequence), (watched, 1));

    // Releases are handled in order: once a later one took effect, the earlier one did too.
    let marker = create(&writer, "alice", &[]).await;
    let marker_watch = reader.watch(marker).await.unwrap();
    drop(first);
    drop(marker_watch);
    until_unsubscribed(&raw, &prefix, marker, "the marker's release").await;
    assert_eq!(
        subscribers(&raw, &prefix, watched).await,
        1,
        "still watched once"
    );
    drop(second);
    until_unsubscribed(&raw, &prefix, watched, "the last release unsubscribes").await;
    raw.quit().await.unwrap();
}

/// fred answers a SUBSCRIBE once it is queued; a watch must return only once Redis has acted
/// on it (a stream reads the store right after: an event committed in between would be missed
/// until the next one). And a watch abandoned mid-subscribe leaves no subscription behind.
#[tokio::test]
async fn a_watch_holds_once_redis_confirmed_it_and_an_abandoned_one_is_undone() {
    use fred::prelude::ClientLike;
    let redis = PrivateRedis::start_volatile();
    let settings = RedisSettings {
        url: Some(SecretString::from(redis.url())),
        password: None,
        key_prefix: unique_prefix("confirm"),
        ..Default::default()
    };
    let store = RedisMessageStore::connect(&settings, GENEROUS)
        .await
        .unwrap();
    let raw =
        fred::prelude::Builder::from_config(fred::prelude::Config::from_url(&redis.url()).unwrap())
            .build()
            .unwrap();
    raw.init().await.unwrap();
    let pause = |ms: u64| {
        let raw = raw.clone();
        async move {
            let _: String = raw
                .custom(
                    fred::types::CustomCommand::new_static("CLIENT", None, false),
                    vec!["PAUSE".to_owned(), ms.to_string(), "ALL".to_owned()],
                )
                .await
                .unwrap();
        }
    };
    let id = create(&store, "alice", &[]).await;
    // Timed from before the pause: Redis cannot answer the watch's round trip before the
    // pause ends, however late this task runs (a loaded machine only adds to the wait).
    let started = std::time::Instant::now();
    pause(600).await;
    let watch = store.watch(id).await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(550),
        "watch returned after {:?}, while Redis was paused",
        started.elapsed()
    );
    let prefix = settings.key_prefix.as_str();
    assert_eq!(subscribers(&raw, prefix, id).await, 1);
    drop(watch);

    // Wait for that release to take effect, then abandon a watch in the middle of its round
    // trip: its SUBSCRIBE still reaches Redis, and must be undone.
    until_unsubscribed(&raw, prefix, id, "the first release").await;
    let other = create(&store, "alice", &[]).await;
    // Long enough that the watch below cannot finish in its 20 ms even if this task is late.
    pause(1500).await;
    let abandoned = tokio::time::timeout(Duration::from_millis(20), store.watch(other)).await;
    assert!(
        abandoned.is_err(),
        "the watch cannot finish while Redis is paused"
    );
    // A later watch's round trip on the same connection comes after the abandoned SUBSCRIBE:
    // once it returned, Redis has run that. Then the abandoned one's release must undo it.
    let third = create(&store, "alice", &[]).await;
    let _third = store.watch(third).await.unwrap();
    until_unsubscribed(
        &raw,
        prefix,
        other,
        "the abandoned watch's subscription stays",
    )
    .await;
    raw.quit().await.unwrap();
}

#[tokio::test]
async fn a_redis_restart_resyncs_the_live_feed() {
    let mut redis = PrivateRedis::start_volatile();
    let settings = RedisSettings {
        url: Some(SecretString::from(redis.url())),
        password: None,
        key_prefix: unique_prefix("restart"),
        ..Default::default()
    };
    let store = RedisMessageStore::connect(&settings, GENEROUS)
        .await
        .unwrap();
    let mut live = store.live_events();
    let id = create(&store, "alice", &[]).await;
    let _watch = store.watch(id).await.unwrap();
    send(&store, id, "alice", "before").await;
    let first = tokio::time::timeout(Duration::from_secs(5), live.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(first, LiveSignal::Event(_)));

    redis.stop();
    let down = store
        .append_message(text_message(id, "alice", "c-down", "while down"))
        .await;
    assert!(
        matches!(down, Err(StoreError::Unavailable(_) | StoreError::Timeout)),
        "{down:?}"
    );
    assert!(store.check().await.is_err());
    redis.restart();

    let signal = tokio::time::timeout(Duration::from_secs(20), live.recv())
        .await
        .expect("a resync after reconnecting")
        .unwrap();
    assert!(matches!(signal, LiveSignal::Resync), "{signal:?}");
    // The restarted server is empty (no persistence): the same conversation is created again,
    // and the watch made before the restart still holds (the feed subscribed again).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let created = store
            .create_conversation(NewConversation {
                id,
                title: "after".to_owned(),
                participants: vec![user("alice")],
                created_by: user("alice"),
                fingerprint: "fp".to_owned(),
                request: None,
            })
            .await;
        match created {
            Ok(_) => break,
            Err(error) => {
                assert!(std::time::Instant::now() < deadline, "{error}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    send(&store, id, "alice", "after").await;
    loop {
        let signal = tokio::time::timeout(Duration::from_secs(5), live.recv())
            .await
            .expect("the event after the restart")
            .unwrap();
        if let LiveSignal::Event(event) = signal {
            assert_eq!((event.conversation_id, event.sequence), (id, 1));
            break;
        }
    }
    store.check().await.unwrap();
}

#[tokio::test]
async fn extreme_limits_and_windows_are_accepted() {
    let store = Arc::new(store("extremes", GENEROUS).await);
    let id = create(store.as_ref(), "alice", &["bob"]).await;
    // More than one HMGET chunk of history.
    let tasks: Vec<_> = (0..600)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { send(store.as_ref(), id, "alice", &format!("m{i}")).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let history = store.messages_before(id, None, usize::MAX).await.unwrap();
    assert_eq!(history.len(), 600);
    assert!(history.windows(2).all(|w| w[0].sequence > w[1].sequence));
    let page = store.events_after(id, 0, usize::MAX).await.unwrap();
    assert_eq!(page.events.len(), 600);
    assert!(
        store
            .events_after(id, u64::MAX, 10)
            .await
            .unwrap()
            .events
            .is_empty()
    );
    assert!(
        store
            .messages_before(id, Some(0), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .messages_before(id, Some(1), 0)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .conversations_of(&user("bob"), None, usize::MAX)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        rejection(store.mark_read(id, &user("bob"), u64::MAX).await),
        Rejection::SequenceAhead
    );

    let forever = NewMessage {
        idempotency_window_secs: u64::MAX,
        ..text_message(id, "bob", "forever", "kept")
    };
    assert!(matches!(
        store.append_message(forever.clone()).await.unwrap(),
        AppendOutcome::Appended(_)
    ));
    assert!(matches!(
        store.append_message(forever).await.unwrap(),
        AppendOutcome::Duplicate { .. }
    ));
    // A zero window remembers nothing.
    let fleeting = NewMessage {
        idempotency_window_secs: 0,
        ..text_message(id, "bob", "fleeting", "once")
    };
    for _ in 0..2 {
        let again = NewMessage {
            record: MessageRecord {
                id: MessageId::generate(),
                ..fleeting.record.clone()
            },
            ..fleeting.clone()
        };
        assert!(matches!(
            store.append_message(again).await.unwrap(),
            AppendOutcome::Appended(_)
        ));
    }
}

/// Needs a TLS Redis: `SVC_TEST_REDIS_TLS_URL=rediss://default:<pw>@127.0.0.1:<tls port>/0` and
/// `SSL_CERT_FILE` naming the CA that signed its certificate (for an IP, with an IP SAN).
#[tokio::test]
#[ignore = "needs SVC_TEST_REDIS_TLS_URL and SSL_CERT_FILE (a TLS-enabled redis-server)"]
async fn rediss_urls_connect_with_tls() {
    let url = std::env::var("SVC_TEST_REDIS_TLS_URL").expect("SVC_TEST_REDIS_TLS_URL");
    let settings = RedisSettings {
        url: Some(SecretString::from(url)),
        password: None,
        key_prefix: unique_prefix("tls"),
        ..Default::default()
    };
    let store = RedisMessageStore::connect(&settings, GENEROUS)
        .await
        .unwrap();
    store.check().await.unwrap();
    let mut live = store.live_events();
    let id = create(&store, "alice", &[]).await;
    let _watch = store.watch(id).await.unwrap();
    send(&store, id, "alice", "over tls").await;
    let signal = tokio::time::timeout(Duration::from_secs(5), live.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(signal, LiveSignal::Event(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_reaches_the_live_feed_without_resync() {
    let prefix = unique_prefix("burst");
    let reader = RedisMessageStore::connect(&settings(&prefix), GENEROUS)
        .await
        .unwrap();
    let writer = Arc::new(
        RedisMessageStore::connect(&settings(&prefix), GENEROUS)
            .await
            .unwrap(),
    );
    let mut live = reader.live_events();
    let id = create(writer.as_ref(), "alice", &["bob"]).await;
    let _watch = reader.watch(id).await.unwrap();
    let tasks: Vec<_> = (0..1000)
        .map(|i| {
            let writer = writer.clone();
            tokio::spawn(async move { send(writer.as_ref(), id, "alice", &format!("m{i}")).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    for expected in 1..=1000 {
        let signal = tokio::time::timeout(Duration::from_secs(5), live.recv())
            .await
            .expect("live event within 5 s")
            .unwrap();
        let LiveSignal::Event(event) = signal else {
            panic!("unexpected {signal:?} at {expected}");
        };
        assert_eq!(event.sequence, expected);
    }
}

#[tokio::test]
async fn unusual_user_ids_survive_lua_built_json() {
    let store = store("unicode", GENEROUS).await;
    let odd = ["zoë/ü", "a\"quote", "back\\slash", "{brace}:colon", "日本"];
    let id = create(&store, "alice", &[]).await;
    let users: Vec<UserId> = odd.iter().map(|name| user(name)).collect();
    let ChangeOutcome::Changed(conversation, event) = store
        .add_participants(id, &user("alice"), &users)
        .await
        .unwrap()
    else {
        panic!("expected Changed");
    };
    let mut everyone = vec![user("alice")];
    everyone.extend(users.iter().cloned());
    assert_eq!(conversation.participants, everyone);
    assert_eq!(
        event.kind,
        EventKind::ParticipantsChanged {
            added: users.clone(),
            removed: vec![],
            changed_by: user("alice"),
            participants: everyone.clone(),
        }
    );
    for name in odd {
        let (message_id, sequence) = send(&store, id, name, "hi").await;
        store.mark_read(id, &user(name), sequence).await.unwrap();
        assert!(matches!(
            store
                .delete_message(id, message_id, &user(name))
                .await
                .unwrap(),
            DeleteOutcome::Deleted(..)
        ));
        let listed = store.conversations_of(&user(name), None, 10).await.unwrap();
        assert_eq!(listed.len(), 1, "{name}");
    }
    let ChangeOutcome::Changed(_, event) = store
        .remove_participant(id, &user("alice"), &user("zoë/ü"))
        .await
        .unwrap()
    else {
        panic!("expected Changed");
    };
    let EventKind::ParticipantsChanged { removed, .. } = event.kind else {
        panic!("wrong kind");
    };
    assert_eq!(removed, [user("zoë/ü")]);
    // Everything replays.
    let page = store.events_after(id, 0, 100).await.unwrap();
    assert_eq!(page.events.len(), 1 + odd.len() * 3 + 1);
}

#[tokio::test]
async fn a_flushed_script_cache_is_reloaded() {
    use fred::prelude::{ClientLike, LuaInterface};

    let store = store("noscript", GENEROUS).await;
    let id = create(&store, "alice", &[]).await;
    let raw = raw_client().await;
    raw.script_flush_cluster(false).await.unwrap();
    send(&store, id, "alice", "after a flush").await;
    assert_eq!(store.messages_before(id, None, 10).await.unwrap().len(), 1);
    raw.quit().await.unwrap();
}

/// Every key under `prefix` on the (single-node) test Redis.
async fn keys_under(
    raw: &fred::prelude::Client,
    prefix: &str,
) -> std::collections::BTreeSet<String> {
    use fred::{
        prelude::ClientLike,
        types::{ClusterHash, CustomCommand},
    };
    let command = CustomCommand::new_static("KEYS", ClusterHash::FirstKey, false);
    let keys: Vec<String> = raw
        .custom(command, vec![format!("{prefix}:*")])
        .await
        .unwrap();
    keys.into_iter().collect()
}

/// Issue 9 item 5: a `request_id` is remembered in one key that expires with the window, and a
/// replay adds no key.
#[tokio::test]
async fn request_ids_expire_with_the_window_and_replays_add_no_keys() {
    use fred::prelude::{ClientLike, KeysInterface};
    use svc_messaging::store::messages::CreateRequest;

    const WINDOW: Duration = Duration::from_secs(24 * 3600);
    let (store, prefix) = store_and_prefix("request-window", GENEROUS).await;
    let new = || NewConversation {
        id: ConversationId::generate(),
        title: "Launch".to_owned(),
        participants: vec![user("alice"), user("bob")],
        created_by: user("alice"),
        fingerprint: "fp".to_owned(),
        request: Some(CreateRequest {
            request_id: ClientId::from_field("request_id", "r-1").unwrap(),
            window: WINDOW,
        }),
    };
    let CreateOutcome::Created(created) = store.create_conversation(new()).await.unwrap() else {
        panic!("the first create creates");
    };
    let raw = raw_client().await;
    let keys = keys_under(&raw, &prefix).await;
    let requests: Vec<&String> = keys
        .iter()
        .filter(|key| key.starts_with(&format!("{prefix}:{{u:alice}}:req:")))
        .collect();
    assert_eq!(requests.len(), 1, "{keys:?}");
    // The key is in alice's slot and does not spell the request id.
    assert!(!requests[0].contains("r-1"));
    let ttl: i64 = raw.pttl(requests[0].as_str()).await.unwrap();
    let window_ms = WINDOW.as_millis() as i64;
    assert!(
        (window_ms - 5_000..=window_ms).contains(&ttl),
        "PTTL {ttl} ms, window {window_ms} ms"
    );
    match store.create_conversation(new()).await.unwrap() {
        CreateOutcome::Existing { conversation, .. } => assert_eq!(conversation.id, created.id),
        other => panic!("expected the original, got {other:?}"),
    }
    assert_eq!(keys_under(&raw, &prefix).await, keys);
    raw.quit().await.unwrap();
}

/// Issue 9 item 6 on Redis: a file's index of carrying messages expires with the file, and
/// refused requests (an outsider deleting, a re-post of a deleted file) write no key.
#[tokio::test]
async fn file_indexes_expire_with_the_file_and_refusals_write_nothing() {
    use fred::prelude::{ClientLike, HashesInterface, KeysInterface};
    use svc_messaging::{files::policy::FileCategory, messaging::model::FileAttachment};

    let (store, prefix) = store_and_prefix("file-index", GENEROUS).await;
    let id = create(&store, "alice", &["bob"]).await;
    let file_id = FileId::generate();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let expire_time = now + 3_600_000;
    let carrying = |sender: &str, client_id: &str| NewMessage {
        record: MessageRecord {
            kind: MessageKind::File,
            content: Some(MessageContent {
                text: String::new(),
                file: Some(FileAttachment {
                    file_id: file_id.clone(),
                    uploader: user("alice"),
                    file_name: "a.txt".to_owned(),
                    content_type: "text/plain".to_owned(),
                    size_bytes: 3,
                    sha256: "00".repeat(32),
                    category: FileCategory::Document,
                    width: 0,
                    height: 0,
                    has_thumbnail: false,
                    create_time: now,
                    expire_time,
                }),
            }),
            ..text_message(id, sender, client_id, "unused").record
        },
        ..text_message(id, sender, client_id, "unused")
    };
    assert!(matches!(
        store.append_message(carrying("alice", "up")).await.unwrap(),
        AppendOutcome::Appended(_)
    ));
    let raw = raw_client().await;
    let index = format!("{prefix}:{{c:{id}}}:file:{file_id}");
    let ttl: i64 = raw.pttl(&index).await.unwrap();
    assert!((3_595_000..=3_600_000).contains(&ttl), "PTTL {ttl}");

    let keys = keys_under(&raw, &prefix).await;
    assert_eq!(
        rejection(
            store
                .delete_file_messages(id, &file_id, &user("mallory"), expire_time)
                .await
        ),
        Rejection::NotParticipant
    );
    assert_eq!(keys_under(&raw, &prefix).await, keys);

    assert_eq!(
        store
            .delete_file_messages(id, &file_id, &user("alice"), expire_time)
            .await
            .unwrap()
            .len(),
        1
    );
    let fields: Vec<String> = raw.hkeys(&index).await.unwrap();
    assert_eq!(fields, ["gone"]);
    let ttl: i64 = raw.pttl(&index).await.unwrap();
    assert!((3_595_000..=3_600_000).contains(&ttl), "PTTL {ttl}");

    let keys = keys_under(&raw, &prefix).await;
    let last_sequence = store.conversation(id).await.unwrap().unwrap().last_sequence;
    assert_eq!(
        rejection(store.append_message(carrying("bob", "repost")).await),
        Rejection::FileDeleted
    );
    assert_eq!(keys_under(&raw, &prefix).await, keys);
    assert_eq!(
        store.conversation(id).await.unwrap().unwrap().last_sequence,
        last_sequence
    );
    raw.quit().await.unwrap();
}

/// Every refused write leaves Redis exactly as it was: no key created, none changed in number.
#[tokio::test]
async fn refused_writes_leave_no_keys() {
    use fred::prelude::ClientLike;

    let (store, prefix) = store_and_prefix("refusals", GENEROUS).await;
    let id = create(&store, "alice", &["bob"]).await;
    let (message_id, _) = send(&store, id, "alice", "hello").await;
    let raw = raw_client().await;
    let keys = keys_under(&raw, &prefix).await;
    let missing = ConversationId::generate();
    let refusals = [
        (
            rejection(
                store
                    .append_message(text_message(id, "mallory", "m", "hi"))
                    .await,
            ),
            Rejection::NotParticipant,
        ),
        (
            rejection(
                store
                    .append_message(text_message(missing, "alice", "m", "hi"))
                    .await,
            ),
            Rejection::ConversationNotFound,
        ),
        (
            rejection(store.delete_message(id, message_id, &user("bob")).await),
            Rejection::NotSender,
        ),
        (
            rejection(store.mark_read(id, &user("bob"), 99).await),
            Rejection::SequenceAhead,
        ),
        (
            rejection(store.mark_read(id, &user("mallory"), 1).await),
            Rejection::NotParticipant,
        ),
        (
            rejection(
                store
                    .add_participants(id, &user("mallory"), &[user("eve")])
                    .await,
            ),
            Rejection::NotParticipant,
        ),
        (
            rejection(
                store
                    .remove_participant(id, &user("bob"), &user("alice"))
                    .await,
            ),
            Rejection::NotCreator,
        ),
        (
            rejection(
                store
                    .delete_file_messages(
                        missing,
                        &FileId::parse("f").unwrap(),
                        &user("alice"),
                        i64::MAX,
                    )
                    .await,
            ),
            Rejection::ConversationNotFound,
        ),
    ];
    for (got, expected) in refusals {
        assert_eq!(got, expected);
    }
    assert_eq!(keys_under(&raw, &prefix).await, keys);
    assert_eq!(
        store.conversation(id).await.unwrap().unwrap().last_sequence,
        1
    );
    raw.quit().await.unwrap();
}

/// The command names (`MONITOR` lines) that mention `prefix`, split at the `GET <prefix>:mark`
/// markers: one list per segment between markers.
async fn monitored_segments(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    prefix: &str,
    segments: usize,
) -> Vec<Vec<String>> {
    let marker = format!("\"GET\" \"{prefix}:mark\"");
    let mut out = vec![Vec::new()];
    while out.len() <= segments {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("MONITOR line within 30s")
            .unwrap()
            .expect("MONITOR still running");
        if line.contains(&marker) {
            out.push(Vec::new());
            continue;
        }
        if !line.contains(prefix) {
            continue;
        }
        // `<time> [<db> <client>|lua] "COMMAND" "arg" ...`
        let command = line
            .split_once("] \"")
            .and_then(|(_, rest)| rest.split('"').next())
            .unwrap_or_else(|| panic!("unexpected MONITOR line: {line}"));
        out.last_mut().unwrap().push(command.to_uppercase());
    }
    out.truncate(segments);
    out
}

/// Issue 14: a send makes the same Redis commands in a conversation of 2 as in one of 500 (before, it updated every participant's conversation index and read the
/// member list back). Seen through a real `MONITOR`.
#[tokio::test]
async fn a_send_makes_the_same_commands_at_2_and_500_participants() {
    use fred::prelude::{ClientLike, KeysInterface};
    use tokio::io::AsyncBufReadExt;

    let (store, prefix) = store_and_prefix("sendcost", GENEROUS).await;
    let others: Vec<String> = (1..500).map(|i| format!("member-{i}")).collect();
    let refs: Vec<&str> = others.iter().map(String::as_str).collect();
    let small = create(&store, "alice", &["bob"]).await;
    let big = create(&store, "alice", &refs).await;
    // The first send of a sender adds them to `senders`; measure the second.
    send(&store, small, "alice", "first").await;
    send(&store, big, "alice", "first").await;

    let mut monitor = tokio::process::Command::new(required_tool("SVC_TEST_REDIS_CLI"))
        .env("REDISCLI_AUTH", required_tool("SVC_TEST_REDIS_PASSWORD"))
        .args(["-h", &required_tool("SVC_TEST_REDIS_HOST")])
        .args(["-p", &required_tool("SVC_TEST_REDIS_PORT")])
        .arg("MONITOR")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run redis-cli MONITOR");
    let mut lines = tokio::io::BufReader::new(monitor.stdout.take().unwrap()).lines();
    let first = lines.next_line().await.unwrap().unwrap_or_default();
    assert_eq!(first.trim(), "OK", "MONITOR answered {first:?}");

    let raw = raw_client().await;
    let mark = format!("{prefix}:mark");
    let _: Option<String> = raw.get(&mark).await.unwrap();
    send(&store, small, "alice", "second").await;
    let _: Option<String> = raw.get(&mark).await.unwrap();
    send(&store, big, "alice", "second").await;
    let _: Option<String> = raw.get(&mark).await.unwrap();
    let segments = monitored_segments(&mut lines, &prefix, 3).await;
    let (at_2, at_500) = (&segments[1], &segments[2]);
    assert!(at_2.contains(&"EVALSHA".to_owned()), "{at_2:?}");
    assert_eq!(
        at_2, at_500,
        "a send at 500 participants made other commands than one at 2"
    );
    assert!(
        at_2.len() < 25,
        "{} commands for one send: {at_2:?}",
        at_2.len()
    );
    raw.quit().await.unwrap();
    drop(monitor);
}
