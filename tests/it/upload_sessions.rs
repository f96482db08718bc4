//! One conformance suite for every `UploadSessionStore`: the data-directory store and the Redis
//! store (on the real Redis and the three-master Redis Cluster that scripts/test starts) must
//! keep the contract of the trait's docs identically.
//!
//! Clock values are the callers' (the store never reads a clock), so the tests move time by
//! passing later `now`s instead of sleeping. They start from the real time, because Redis
//! expires session keys by its own clock, `SESSION_GRACE_MS` after `expire_time`.

use std::{collections::BTreeSet, path::PathBuf, sync::Arc};

use crate::support::messages::{GENEROUS, user};
use svc_messaging::{
    config::RedisSettings,
    ids::{ConversationId, FileId, MessageId},
    store::{
        blobs::StagedParts,
        fs_sessions::FsUploadSessionStore,
        redis::{RedisMessageStore, upload_sessions::SESSION_GRACE_MS},
        upload_sessions::{
            DeclaredUpload, Lease, Opened, SessionError, UploadSession, UploadSessionStore,
        },
    },
};

const MINUTE: i64 = 60_000;
/// Generous enough that no test reaches it.
const MAX_OPEN: u32 = 100;

fn real_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// A fresh, unfinished session of `owner` created at `t`, expiring `ttl` ms later.
fn session(owner: &str, request_id: &str, t: i64, ttl: i64) -> UploadSession {
    UploadSession {
        owner: user(owner),
        request_id: request_id.to_owned(),
        declared: DeclaredUpload {
            conversation_id: ConversationId::generate(),
            file_name: "report.pdf".to_owned(),
            content_type: "application/pdf".to_owned(),
            size_bytes: 30 << 20,
            sha256: None,
            caption: String::new(),
        },
        file_id: FileId::generate(),
        message_id: MessageId::generate(),
        blob_key: format!("files/{}", FileId::generate()),
        part_size: 8 << 20,
        staged: StagedParts::default(),
        committed_size: 0,
        checkpoint: None,
        create_time: t,
        expire_time: t + ttl,
        complete: false,
    }
}

fn lease(holder: &str, until: i64) -> Lease<'_> {
    Lease { holder, until }
}

/// `session` after `parts` more durable parts.
fn progressed(session: &UploadSession, parts: usize) -> UploadSession {
    let mut next = session.clone();
    for _ in 0..parts {
        next.staged.upload_id = Some("mpu-1".to_owned());
        next.staged
            .parts
            .push(format!("etag-{}", next.staged.parts.len()));
        next.committed_size += next.part_size;
    }
    next.checkpoint = Some(format!("sha-state-after-{}", next.committed_size));
    next
}

fn completed(session: &UploadSession) -> UploadSession {
    UploadSession {
        complete: true,
        checkpoint: None,
        ..session.clone()
    }
}

fn created(opened: Opened) {
    assert!(
        matches!(opened, Opened::Created),
        "expected Created, got {opened:?}"
    );
}

fn existing(opened: Opened) -> UploadSession {
    match opened {
        Opened::Existing(session) => session,
        Opened::Created => panic!("expected Existing, got Created"),
    }
}

/// The request ids the sessions were created under (`expired` lists them under retired names).
fn request_ids(sessions: &[UploadSession]) -> Vec<&str> {
    sessions
        .iter()
        .map(|session| session.request_id.split('\u{0}').next().unwrap())
        .collect()
}

pub async fn open_creates_then_returns_the_live_session(backend: Backend) {
    let subject = backend.subject().await;
    let store = &subject.store;
    let t = real_now();
    let first = session("alice", "r-1", t, 10 * MINUTE);
    created(
        store
            .open(&first, lease("a", t + MINUTE), t, MAX_OPEN)
            .await
            .unwrap(),
    );
    assert_eq!(
        store.get(&user("alice"), "r-1", t).await.unwrap(),
        Some(first.clone())
    );

    // A retry declares a new session; the stored one comes back (and the same holder keeps it).
    let retry = session("alice", "r-1", t + 1, 10 * MINUTE);
    let found = existing(
        store
            .open(&retry, lease("a", t + MINUTE), t + 1, MAX_OPEN)
            .await
            .unwrap(),
    );
    assert_eq!(found, first);

    // The request id is the owner's: another owner's equal id is another session.
    let bobs = session("bob", "r-1", t, 10 * MINUTE);
    created(
        store
            .open(&bobs, lease("b", t + MINUTE), t, MAX_OPEN)
            .await
            .unwrap(),
    );
    assert_eq!(
        store.get(&user("bob"), "r-1", t).await.unwrap(),
        Some(bobs.clone())
    );
    assert_eq!(
        store.get(&user("alice"), "r-1", t).await.unwrap(),
        Some(first.clone())
    );
    assert_eq!(store.get(&user("alice"), "r-2", t).await.unwrap(), None);
    assert_eq!(
        store
            .acquire(&user("alice"), "r-2", lease("a", t + MINUTE), t)
            .await
            .unwrap(),
        None
    );
}

pub async fn a_live_lease_refuses_other_writers(backend: Backend) {
    let subject = backend.subject().await;
    let store = &subject.store;
    let t = real_now();
    let s = session("alice", "r-1", t, 10 * MINUTE);
    created(
        store
            .open(&s, lease("a", t + 10_000), t, MAX_OPEN)
            .await
            .unwrap(),
    );

    let retry = session("alice", "r-1", t + 5_000, 10 * MINUTE);
    assert!(matches!(
        store
            .open(&retry, lease("b", t + 15_000), t + 5_000, MAX_OPEN)
            .await,
        Err(SessionError::Busy)
    ));
    assert!(matches!(
        store
            .acquire(&user("alice"), "r-1", lease("b", t + 20_000), t + 9_999)
            .await,
        Err(SessionError::Busy)
    ));
    // Never the holder: no update, no renewal.
    assert!(matches!(
        store
            .update(&progressed(&s, 1), lease("b", t + 20_000))
            .await,
        Err(SessionError::LeaseLost)
    ));
    assert!(matches!(
        store
            .renew(&user("alice"), "r-1", lease("b", t + 20_000))
            .await,
        Err(SessionError::LeaseLost)
    ));
    // The holder itself may acquire again, renew and write.
    assert_eq!(
        store
            .acquire(&user("alice"), "r-1", lease("a", t + 12_000), t + 9_000)
            .await
            .unwrap(),
        Some(s.clone())
    );
    store
        .renew(&user("alice"), "r-1", lease("a", t + 30_000))
        .await
        .unwrap();
    // The renewal moved the lease: b is still refused after the first lease would have ended.
    assert!(matches!(
        store
            .acquire(&user("alice"), "r-1", lease("b", t + 40_000), t + 29_999)
            .await,
        Err(SessionError::Busy)
    ));
    let next = progressed(&s, 1);
    store.update(&next, lease("a", t + 30_000)).await.unwrap();
    assert_eq!(
        store.get(&user("alice"), "r-1", t).await.unwrap(),
        Some(next)
    );
}

pub async fn a_lease_that_ran_out_can_be_taken_over(backend: Backend) {
    let subject = backend.subject().await;
    let store = &subject.store;
    let t = real_now();
    let s = session("alice", "r-1", t, 10 * MINUTE);
    created(
        store
            .open(&s, lease("a", t + 1_000), t, MAX_OPEN)
            .await
            .unwrap(),
    );
    let a_progress = progressed(&s, 1);
    store
        .update(&a_progress, lease("a", t + 1_000))
        .await
        .unwrap();

    // At the lease's end it is over.
    let taken = store
        .acquire(&user("alice"), "r-1", lease("b", t + 5_000), t + 1_000)
        .await
        .unwrap();
    assert_eq!(taken, Some(a_progress.clone()));

    // The old holder is fenced off, whatever it sends.
    assert!(matches!(
        store
            .update(&progressed(&a_progress, 1), lease("a", t + 6_000))
            .await,
        Err(SessionError::LeaseLost)
    ));
    assert!(matches!(
        store
            .renew(&user("alice"), "r-1", lease("a", t + 6_000))
            .await,
        Err(SessionError::LeaseLost)
    ));
    store.release(&user("alice"), "r-1", "a").await.unwrap();
    assert!(matches!(
        store
            .acquire(&user("alice"), "r-1", lease("c", t + 6_000), t + 1_500)
            .await,
        Err(SessionError::Busy)
    ));
    let b_progress = progressed(&a_progress, 2);
    store
        .update(&b_progress, lease("b", t + 5_000))
        .await
        .unwrap();
    assert_eq!(
        store.get(&user("alice"), "r-1", t + 1_500).await.unwrap(),
        Some(b_progress)
    );
}

pub async fn committed_size_never_goes_back(backend: Backend) {
    let subject = backend.subject().await;
    let store = &subject.store;
    let t = real_now();
    let s = session("alice", "r-1", t, 10 * MINUTE);
    created(
        store
            .open(&s, lease("a", t + MINUTE), t, MAX_OPEN)
            .await
            .unwrap(),
    );
    let two = progressed(&s, 2);
    store.update(&two, lease("a", t + MINUTE)).await.unwrap();
    assert_eq!(
        store.get(&user("alice"), "r-1", t).await.unwrap(),
        Some(two.clone())
    );

    let one = progressed(&s, 1);
    assert!(matches!(
        store.update(&one, lease("a", t + MINUTE)).await,
        Err(SessionError::LeaseLost)
    ));
    assert_eq!(
        store.get(&user("alice"), "r-1", t).await.unwrap(),
        Some(two.clone())
    );

    // The same size again is no step back (e.g. a renewed checkpoint).
    let same = UploadSession {
        checkpoint: Some("rewritten".to_owned()),
        ..two.clone()
    };
    store.update(&same, lease("a", t + MINUTE)).await.unwrap();
    assert_eq!(
        store.get(&user("alice"), "r-1", t).await.unwrap(),
        Some(same)
    );
}

pub async fn complete_ends_the_lease_and_frees_its_slot(backend: Backend) {
    let subject = backend.subject().await;
    let store = &subject.store;
    let t = real_now();
    let first = session("alice", "r-1", t, 10 * MINUTE);
    created(
        store
            .open(&first, lease("a", t + MINUTE), t, 1)
            .await
            .unwrap(),
    );
    let second = session("alice", "r-2", t, 10 * MINUTE);
    assert!(matches!(
        store.open(&second, lease("c", t + MINUTE), t, 1).await,
        Err(SessionError::TooMany { limit: 1 })
    ));

    let done = completed(&progressed(&first, 4));
    store.update(&done, lease("a", t + MINUTE)).await.unwrap();
    // The lease ended with it: its writer can neither renew nor write, nobody is busy.
    assert!(matches!(
        store
            .renew(&user("alice"), "r-1", lease("a", t + MINUTE))
            .await,
        Err(SessionError::LeaseLost)
    ));
    assert!(matches!(
        store.update(&done, lease("a", t + MINUTE)).await,
        Err(SessionError::LeaseLost)
    ));
    assert_eq!(
        store
            .acquire(&user("alice"), "r-1", lease("b", t + MINUTE), t + 1)
            .await
            .unwrap(),
        Some(done.clone())
    );
    // A complete session takes no lease: acquiring it did not make it b's.
    assert!(matches!(
        store.update(&done, lease("b", t + MINUTE)).await,
        Err(SessionError::LeaseLost)
    ));
    // A retry finds the result.
    let retry = session("alice", "r-1", t + 2, 10 * MINUTE);
    assert_eq!(
        existing(
            store
                .open(&retry, lease("d", t + MINUTE), t + 2, 1)
                .await
                .unwrap()
        ),
        done
    );
    // And it no longer counts as unfinished.
    created(
        store
            .open(&second, lease("c", t + MINUTE), t + 3, 1)
            .await
            .unwrap(),
    );
}

pub async fn too_many_unfinished_sessions_are_refused(backend: Backend) {
    let subject = backend.subject().await;
    let store = &subject.store;
    let t = real_now();
    let short = session("alice", "r-1", t, MINUTE);
    created(
        store
            .open(&short, lease("a", t + 1_000), t, 2)
            .await
            .unwrap(),
    );
    let long = session("alice", "r-2", t, 10 * MINUTE);
    created(
        store
            .open(&long, lease("a", t + 1_000), t, 2)
            .await
            .unwrap(),
    );
    let third = session("alice", "r-3", t, 10 * MINUTE);
    assert!(matches!(
        store.open(&third, lease("a", t + 1_000), t, 2).await,
        Err(SessionError::TooMany { limit: 2 })
    ));
    assert_eq!(store.get(&user("alice"), "r-3", t).await.unwrap(), None);
    // The limit is per owner, and an existing session still opens at the limit.
    created(
        store
            .open(
                &session("bob", "r-3", t, MINUTE),
                lease("b", t + 1_000),
                t,
                2,
            )
            .await
            .unwrap(),
    );
    assert_eq!(
        existing(
            store
                .open(&long, lease("a2", t + 2_000), t + 1_000, 2)
                .await
                .unwrap()
        ),
        long
    );
    // A session past its expiry counts no more.
    created(
        store
            .open(&third, lease("a", t + MINUTE + 1_000), t + MINUTE, 2)
            .await
            .unwrap(),
    );
    // Removing one frees its slot too.
    let fourth = session("alice", "r-4", t + MINUTE, 10 * MINUTE);
    assert!(matches!(
        store
            .open(&fourth, lease("a", t + 2 * MINUTE), t + MINUTE, 2)
            .await,
        Err(SessionError::TooMany { limit: 2 })
    ));
    store.remove(&user("alice"), "r-2").await.unwrap();
    created(
        store
            .open(&fourth, lease("a", t + 2 * MINUTE), t + MINUTE, 2)
            .await
            .unwrap(),
    );
}

pub async fn release_lets_another_writer_continue_at_once(backend: Backend) {
    let subject = backend.subject().await;
    let store = &subject.store;
    let t = real_now();
    let s = session("alice", "r-1", t, 10 * MINUTE);
    created(
        store
            .open(&s, lease("a", t + 5 * MINUTE), t, MAX_OPEN)
            .await
            .unwrap(),
    );
    assert!(matches!(
        store
            .acquire(&user("alice"), "r-1", lease("b", t + MINUTE), t + 1)
            .await,
        Err(SessionError::Busy)
    ));
    // Only the holder's release counts.
    store.release(&user("alice"), "r-1", "c").await.unwrap();
    store.release(&user("alice"), "r-1", "").await.unwrap();
    assert!(matches!(
        store
            .acquire(&user("alice"), "r-1", lease("b", t + MINUTE), t + 2)
            .await,
        Err(SessionError::Busy)
    ));
    store.release(&user("alice"), "r-1", "a").await.unwrap();
    assert_eq!(
        store
            .acquire(&user("alice"), "r-1", lease("b", t + MINUTE), t + 3)
            .await
            .unwrap(),
        Some(s.clone())
    );
    assert!(matches!(
        store
            .update(&progressed(&s, 1), lease("a", t + 5 * MINUTE))
            .await,
        Err(SessionError::LeaseLost)
    ));
    // Released by its holder, a session is free even for a writer that comes through `open`.
    store.release(&user("alice"), "r-1", "b").await.unwrap();
    let retry = session("alice", "r-1", t + 4, 10 * MINUTE);
    assert_eq!(
        existing(
            store
                .open(&retry, lease("c", t + MINUTE), t + 4, MAX_OPEN)
                .await
                .unwrap()
        ),
        s
    );
}

pub async fn sessions_past_their_expiry_are_absent(backend: Backend) {
    let subject = backend.subject().await;
    let store = &subject.store;
    let t = real_now();
    let s = session("alice", "r-1", t, 1_000);
    created(
        store
            .open(&s, lease("a", t + 5_000), t, MAX_OPEN)
            .await
            .unwrap(),
    );
    assert_eq!(
        store.get(&user("alice"), "r-1", t + 999).await.unwrap(),
        Some(s.clone())
    );
    assert_eq!(
        store.get(&user("alice"), "r-1", t + 1_000).await.unwrap(),
        None
    );
    // Absent even for its own holder, whose lease has not ended.
    assert_eq!(
        store
            .acquire(&user("alice"), "r-1", lease("a", t + 5_000), t + 1_000)
            .await
            .unwrap(),
        None
    );
    // Opening it again creates a new session (with a new lease, whoever held the old one).
    let again = session("alice", "r-1", t + 1_000, 10 * MINUTE);
    created(
        store
            .open(&again, lease("b", t + 5_000), t + 1_000, MAX_OPEN)
            .await
            .unwrap(),
    );
    assert_eq!(
        store.get(&user("alice"), "r-1", t + 1_000).await.unwrap(),
        Some(again)
    );

    // A complete session is absent after its expiry too.
    let done = session("alice", "r-2", t, 1_000);
    created(
        store
            .open(&done, lease("a", t + 5_000), t, MAX_OPEN)
            .await
            .unwrap(),
    );
    store
        .update(&completed(&done), lease("a", t + 5_000))
        .await
        .unwrap();
    assert!(
        store
            .get(&user("alice"), "r-2", t + 999)
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        store.get(&user("alice"), "r-2", t + 1_000).await.unwrap(),
        None
    );
    let retry = session("alice", "r-2", t + 1_000, 10 * MINUTE);
    created(
        store
            .open(&retry, lease("c", t + 5_000), t + 1_000, MAX_OPEN)
            .await
            .unwrap(),
    );
}

/// `open` replaces an expired session, but an unfinished one keeps waiting for the janitor
/// (under a name of its own), so its staged bytes are still discarded; removing it by that name
/// leaves its successor alone.
pub async fn an_expired_session_in_the_way_stays_due(backend: Backend) {
    let subject = backend.subject().await;
    let store = &subject.store;
    let t = real_now();
    let first = session("alice", "r-1", t, 1_000);
    created(store.open(&first, lease("a", t + 500), t, 1).await.unwrap());
    let old = progressed(&first, 2);
    store.update(&old, lease("a", t + 500)).await.unwrap();

    // Past its expiry, a new upload under the same request id (at a limit of one).
    let new = session("alice", "r-1", t + 1_000, 10 * MINUTE);
    created(
        store
            .open(&new, lease("b", t + MINUTE), t + 1_000, 1)
            .await
            .unwrap(),
    );
    assert_eq!(
        store.get(&user("alice"), "r-1", t + 1_000).await.unwrap(),
        Some(new.clone())
    );

    let due = store.expired(t + 1_000, 10).await.unwrap();
    assert_eq!(due.len(), 1, "{due:?}");
    let retired = &due[0];
    assert_ne!(retired.request_id, "r-1");
    assert!(
        retired.request_id.starts_with("r-1\u{0}"),
        "{:?}",
        retired.request_id
    );
    assert_eq!(
        UploadSession {
            request_id: "r-1".to_owned(),
            ..retired.clone()
        },
        old
    );
    // Invisible to the caller, not counted, and the new session's lease is untouched.
    assert_eq!(
        store
            .get(&user("alice"), &retired.request_id, t + 1_000)
            .await
            .unwrap(),
        None
    );
    store
        .remove(&user("alice"), &retired.request_id)
        .await
        .unwrap();
    assert!(store.expired(t + 1_000, 10).await.unwrap().is_empty());
    assert_eq!(
        store.get(&user("alice"), "r-1", t + 1_000).await.unwrap(),
        Some(new.clone())
    );
    store
        .update(&progressed(&new, 1), lease("b", t + MINUTE))
        .await
        .unwrap();

    // A complete session in the way has nothing left to discard: it is simply replaced.
    store
        .update(&completed(&progressed(&new, 1)), lease("b", t + MINUTE))
        .await
        .unwrap();
    let later = session("alice", "r-1", new.expire_time, 10 * MINUTE);
    created(
        store
            .open(&later, lease("c", t + MINUTE), new.expire_time, 1)
            .await
            .unwrap(),
    );
    assert!(store.expired(new.expire_time, 10).await.unwrap().is_empty());
}

/// Sessions in various states; returns `t`.
async fn mixed_sessions(store: &dyn UploadSessionStore) -> i64 {
    let t = real_now();
    for (owner, request_id, ttl) in [
        ("alice", "due-1", 100),
        ("bob", "due-2", 200),
        ("alice", "due-3", 300),
        ("alice", "live", 10 * MINUTE),
        ("bob", "done", 100),
    ] {
        let s = session(owner, request_id, t, ttl);
        created(
            store
                .open(&s, lease("w", t + MINUTE), t, MAX_OPEN)
                .await
                .unwrap(),
        );
        store
            .update(&progressed(&s, 1), lease("w", t + MINUTE))
            .await
            .unwrap();
    }
    let stored = store.get(&user("bob"), "done", t).await.unwrap().unwrap();
    store
        .update(&completed(&stored), lease("w", t + MINUTE))
        .await
        .unwrap();
    t
}

pub async fn expired_lists_exactly_the_unfinished_expired_sessions(backend: Backend) {
    let subject = backend.subject().await;
    let store = &subject.store;
    let t = mixed_sessions(store.as_ref()).await;
    // A retry of the complete upload finds it (and must not make it due later on).
    let retry = session("bob", "done", t + 50, 100);
    let done = existing(
        store
            .open(&retry, lease("r", t + MINUTE), t + 50, MAX_OPEN)
            .await
            .unwrap(),
    );
    assert!(done.complete);
    // Nor a writer that lost the lease writing after the completion.
    let stale = UploadSession {
        complete: false,
        ..progressed(&done, 1)
    };
    assert!(matches!(
        store.update(&stale, lease("w-old", t + MINUTE)).await,
        Err(SessionError::LeaseLost)
    ));

    assert!(store.expired(t + 99, 10).await.unwrap().is_empty());
    let due = store.expired(t + 250, 10).await.unwrap();
    assert_eq!(request_ids(&due), ["due-1", "due-2"]);
    assert!(
        due.iter()
            .all(|session| session.committed_size == session.part_size)
    );
    // Listed, they are the janitor's: their writer is fenced off, and an upload reusing a
    // request id is another session, which the janitor's remove does not touch.
    let original = UploadSession {
        request_id: "due-1".to_owned(),
        ..due[0].clone()
    };
    assert!(matches!(
        store
            .update(&progressed(&original, 1), lease("w", t + MINUTE))
            .await,
        Err(SessionError::LeaseLost)
    ));
    let reused = session("bob", "due-2", t + 250, 10 * MINUTE);
    created(
        store
            .open(&reused, lease("n", t + MINUTE), t + 250, MAX_OPEN)
            .await
            .unwrap(),
    );
    store
        .remove(&due[1].owner, &due[1].request_id)
        .await
        .unwrap();
    assert_eq!(
        store.get(&user("bob"), "due-2", t + 250).await.unwrap(),
        Some(reused)
    );
    // Earliest first, at most `limit`; listing again lists the same.
    assert_eq!(
        request_ids(&store.expired(t + 250, 1).await.unwrap()),
        ["due-1"]
    );
    // At exactly expire_time a session is due.
    let due = store.expired(t + 300, 10).await.unwrap();
    assert_eq!(request_ids(&due), ["due-1", "due-3"]);
    store
        .remove(&due[0].owner, &due[0].request_id)
        .await
        .unwrap();
    assert_eq!(
        request_ids(&store.expired(t + 300, 10).await.unwrap()),
        ["due-3"]
    );
    // Much later: every unfinished one, never the complete one.
    assert_eq!(
        request_ids(&store.expired(t + 20 * MINUTE, 10).await.unwrap()),
        ["due-3", "live", "due-2"]
    );
    assert!(store.expired(t + 20 * MINUTE, 0).await.unwrap().is_empty());
}

/// Reopening the store over the same state (the fs directory, the Redis prefix) is what a
/// restart of the process sees.
pub async fn sessions_survive_a_restart(backend: Backend) {
    let subject = backend.subject().await;
    let t = mixed_sessions(subject.store.as_ref()).await;
    let before = subject
        .store
        .get(&user("alice"), "live", t)
        .await
        .unwrap()
        .unwrap();
    let restarted = subject.reopen().await;
    let store = &restarted.store;

    assert_eq!(
        store.get(&user("alice"), "live", t).await.unwrap(),
        Some(before.clone())
    );
    // The complete one still answers a retry.
    let done = store.get(&user("bob"), "done", t).await.unwrap().unwrap();
    assert!(done.complete && done.committed_size == done.part_size);
    // The unfinished sessions still count: alice has "live" (and two that expire at t+100
    // and t+300).
    let more = session("alice", "more", t, 10 * MINUTE);
    assert!(matches!(
        store.open(&more, lease("x", t + MINUTE), t, 3).await,
        Err(SessionError::TooMany { limit: 3 })
    ));
    assert_eq!(
        request_ids(&store.expired(t + 250, 10).await.unwrap()),
        ["due-1", "due-2"]
    );
    assert!(matches!(
        store.open(&more, lease("x", t + MINUTE), t + 300, 1).await,
        Err(SessionError::TooMany { limit: 1 })
    ));
    created(
        store
            .open(&more, lease("x", t + MINUTE), t + 300, 2)
            .await
            .unwrap(),
    );
    // Once the old writer's lease ran out, another continues where it stopped.
    let taken = store
        .acquire(
            &user("alice"),
            "live",
            lease("y", t + 2 * MINUTE),
            t + MINUTE,
        )
        .await
        .unwrap();
    assert_eq!(taken, Some(before.clone()));
    store
        .update(&progressed(&before, 1), lease("y", t + 2 * MINUTE))
        .await
        .unwrap();
}

pub async fn remove_forgets_the_session(backend: Backend) {
    let subject = backend.subject().await;
    let store = &subject.store;
    let t = real_now();
    let s = session("alice", "r-1", t, 1_000);
    created(store.open(&s, lease("a", t + MINUTE), t, 1).await.unwrap());
    store
        .update(&progressed(&s, 1), lease("a", t + MINUTE))
        .await
        .unwrap();
    store.remove(&user("alice"), "r-1").await.unwrap();

    assert_eq!(store.get(&user("alice"), "r-1", t).await.unwrap(), None);
    assert_eq!(
        store
            .acquire(&user("alice"), "r-1", lease("a", t + MINUTE), t)
            .await
            .unwrap(),
        None
    );
    assert!(matches!(
        store
            .update(&progressed(&s, 2), lease("a", t + MINUTE))
            .await,
        Err(SessionError::LeaseLost)
    ));
    assert!(matches!(
        store
            .renew(&user("alice"), "r-1", lease("a", t + MINUTE))
            .await,
        Err(SessionError::LeaseLost)
    ));
    store.release(&user("alice"), "r-1", "a").await.unwrap();
    assert!(store.expired(t + MINUTE, 10).await.unwrap().is_empty());
    // Removing what is not there is no error.
    store.remove(&user("alice"), "r-1").await.unwrap();
    store.remove(&user("nobody"), "r-9").await.unwrap();
    // Its slot is free and its name can be used again.
    created(store.open(&s, lease("b", t + MINUTE), t, 1).await.unwrap());
    assert_eq!(store.get(&user("alice"), "r-1", t).await.unwrap(), Some(s));
}

pub async fn concurrent_opens_admit_one_writer(backend: Backend) {
    let subject = backend.subject().await;
    let t = real_now();
    let attempts = (0..16).map(|i| {
        let store = subject.store.clone();
        tokio::spawn(async move {
            let holder = format!("w{i}");
            let s = session("alice", "r-1", t, 10 * MINUTE);
            store
                .open(&s, lease(&holder, t + MINUTE), t, MAX_OPEN)
                .await
        })
    });
    let mut created_count = 0;
    let mut busy = 0;
    for attempt in futures::future::join_all(attempts).await {
        match attempt.unwrap() {
            Ok(Opened::Created) => created_count += 1,
            Err(SessionError::Busy) => busy += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((created_count, busy), (1, 15));
}

pub async fn concurrent_creations_respect_max_open(backend: Backend) {
    let subject = backend.subject().await;
    let t = real_now();
    let attempts = (0..12).map(|i| {
        let store = subject.store.clone();
        tokio::spawn(async move {
            let s = session("alice", &format!("r-{i}"), t, MINUTE);
            store.open(&s, lease("w", t + MINUTE), t, 4).await
        })
    });
    let mut created_count = 0;
    let mut refused = 0;
    for attempt in futures::future::join_all(attempts).await {
        match attempt.unwrap() {
            Ok(Opened::Created) => created_count += 1,
            Err(SessionError::TooMany { limit: 4 }) => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((created_count, refused), (4, 8));
    assert_eq!(
        subject.store.expired(t + MINUTE, 100).await.unwrap().len(),
        4
    );
}

/// Redis only: a session key disappears `SESSION_GRACE_MS` after its `expire_time`, follows a
/// moved expiry, and goes with `remove`.
pub async fn redis_session_keys_expire_and_go_with_remove(backend: Backend) {
    let subject = backend.subject().await;
    let redis = subject.redis.as_ref().expect("a redis backend");
    let store = &subject.store;
    let t = real_now();
    let s = session("alice", "r-1", t, 10 * MINUTE);
    created(
        store
            .open(&s, lease("a", t + MINUTE), t, MAX_OPEN)
            .await
            .unwrap(),
    );
    let gone_at = s.expire_time + SESSION_GRACE_MS;
    assert_eq!(
        redis
            .upload_key_expiries(&user("alice"), "r-1")
            .await
            .unwrap(),
        (Some(gone_at), Some(gone_at))
    );
    // The owner's index lives as long as its latest session.
    let shorter = session("alice", "r-2", t, MINUTE);
    created(
        store
            .open(&shorter, lease("a", t + MINUTE), t, MAX_OPEN)
            .await
            .unwrap(),
    );
    assert_eq!(
        redis
            .upload_key_expiries(&user("alice"), "r-2")
            .await
            .unwrap(),
        (Some(shorter.expire_time + SESSION_GRACE_MS), Some(gone_at))
    );
    let moved = UploadSession {
        expire_time: s.expire_time + MINUTE,
        ..progressed(&s, 1)
    };
    store.update(&moved, lease("a", t + MINUTE)).await.unwrap();
    let moved_gone_at = moved.expire_time + SESSION_GRACE_MS;
    assert_eq!(
        redis
            .upload_key_expiries(&user("alice"), "r-1")
            .await
            .unwrap(),
        (Some(moved_gone_at), Some(moved_gone_at))
    );
    // The janitor's index follows the moved expiry.
    assert_eq!(
        request_ids(&store.expired(s.expire_time, 10).await.unwrap()),
        ["r-2"]
    );
    let due = store.expired(moved.expire_time, 10).await.unwrap();
    assert_eq!(request_ids(&due), ["r-2", "r-1"]);
    // Listed under their retired names, they keep their expiry in Redis, until removed.
    for session in &due {
        let (key_expiry, _) = redis
            .upload_key_expiries(&session.owner, &session.request_id)
            .await
            .unwrap();
        assert_eq!(key_expiry, Some(session.expire_time + SESSION_GRACE_MS));
        store
            .remove(&session.owner, &session.request_id)
            .await
            .unwrap();
    }
    assert!(
        store
            .expired(moved.expire_time, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // A live session removed leaves nothing either: no session key, no owner's index.
    let live = session("alice", "r-3", t, 10 * MINUTE);
    created(
        store
            .open(&live, lease("a", t + MINUTE), t, MAX_OPEN)
            .await
            .unwrap(),
    );
    store.remove(&user("alice"), "r-3").await.unwrap();
    for request_id in ["r-1", "r-2", "r-3"] {
        assert_eq!(
            redis
                .upload_key_expiries(&user("alice"), request_id)
                .await
                .unwrap(),
            (None, None)
        );
    }
    for session in &due {
        assert_eq!(
            redis
                .upload_key_expiries(&session.owner, &session.request_id)
                .await
                .unwrap()
                .0,
            None
        );
    }
    assert_eq!(redis.upload_expiry_index_len().await.unwrap(), 0);
}

/// Redis only: refused opens (too many, busy) write nothing, not even to the expiry index, so
/// a caller cannot grow it by asking.
pub async fn redis_refused_opens_leave_no_trace(backend: Backend) {
    let subject = backend.subject().await;
    let redis = subject.redis.as_ref().expect("a redis backend");
    let store = &subject.store;
    let t = real_now();
    let s = session("alice", "r-0", t, 10 * MINUTE);
    created(store.open(&s, lease("a", t + MINUTE), t, 1).await.unwrap());
    assert_eq!(redis.upload_expiry_index_len().await.unwrap(), 1);
    for i in 1..=20 {
        let refused = session("alice", &format!("r-{i}"), t, 10 * MINUTE);
        assert!(matches!(
            store.open(&refused, lease("a", t + MINUTE), t, 1).await,
            Err(SessionError::TooMany { limit: 1 })
        ));
        assert!(matches!(
            store
                .open(&s, lease(&format!("b{i}"), t + MINUTE), t, 1)
                .await,
            Err(SessionError::Busy)
        ));
    }
    assert_eq!(redis.upload_expiry_index_len().await.unwrap(), 1);
    assert_eq!(
        redis
            .upload_key_expiries(&user("alice"), "r-7")
            .await
            .unwrap(),
        (None, Some(s.expire_time + SESSION_GRACE_MS))
    );
}

/// The data directory only: files are named by digest, never by caller input, and no
/// temporary file is left behind.
pub async fn fs_file_names_never_carry_caller_input(backend: Backend) {
    let subject = backend.subject().await;
    let dir = subject.dir.clone().expect("a data-directory backend");
    let t = real_now();
    let s = session("../alice", "../../etc/passwd", t, MINUTE);
    created(
        subject
            .store
            .open(&s, lease("a", t + MINUTE), t, MAX_OPEN)
            .await
            .unwrap(),
    );
    subject
        .store
        .update(&progressed(&s, 1), lease("a", t + MINUTE))
        .await
        .unwrap();
    let names: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    let name = names.first().unwrap();
    let digest = name.strip_suffix(".json").expect("a .json file");
    assert!(
        digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
        "{name}"
    );
    // A stray temp file of an interrupted write is cleaned at the next open.
    std::fs::write(dir.join(format!("{digest}.json.tmp-0123")), b"{").unwrap();
    let restarted = subject.reopen().await;
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    assert_eq!(
        restarted
            .store
            .get(&user("../alice"), "../../etc/passwd", t)
            .await
            .unwrap(),
        Some(progressed(&s, 1))
    );
}

/// The upload session stores the suite runs on.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    /// `FsUploadSessionStore` in a fresh directory.
    Fs,
    Redis,
    /// A three-master Redis Cluster: a user's sessions share one slot, users spread over all
    /// three, and the expiry index has a slot of its own.
    RedisCluster,
}

/// A store under test, with what reopening it needs.
pub struct Subject {
    backend: Backend,
    store: Arc<dyn UploadSessionStore>,
    redis: Option<Arc<RedisMessageStore>>,
    /// The session directory (Fs).
    dir: Option<PathBuf>,
    temp: Option<Arc<tempfile::TempDir>>,
    key_prefix: String,
}

impl Backend {
    async fn subject(self) -> Subject {
        match self {
            Self::Fs => {
                let temp = Arc::new(tempfile::tempdir().unwrap());
                let dir = temp.path().join("sessions");
                Subject::fs(self, dir, temp).await
            }
            Self::Redis => Subject::redis(self, crate::support::unique_prefix("uploads")).await,
            Self::RedisCluster => {
                Subject::redis(self, crate::support::unique_prefix("uploads-cluster")).await
            }
        }
    }
}

impl Subject {
    async fn fs(backend: Backend, dir: PathBuf, temp: Arc<tempfile::TempDir>) -> Self {
        let store = FsUploadSessionStore::open(&dir)
            .await
            .expect("open the session dir");
        Self {
            backend,
            store: Arc::new(store),
            redis: None,
            dir: Some(dir),
            temp: Some(temp),
            key_prefix: String::new(),
        }
    }

    async fn redis(backend: Backend, key_prefix: String) -> Self {
        let url = match backend {
            Backend::Redis => "SVC_TEST_REDIS_URL",
            _ => "SVC_TEST_REDIS_CLUSTER_URL",
        };
        let settings = RedisSettings {
            url: Some(secrecy::SecretString::from(crate::support::required_tool(
                url,
            ))),
            password: None,
            key_prefix: key_prefix.clone(),
            ..Default::default()
        };
        let store = Arc::new(
            RedisMessageStore::connect(&settings, GENEROUS)
                .await
                .unwrap_or_else(|error| panic!("connect to {backend:?} ({url}): {error}")),
        );
        Self {
            backend,
            store: store.clone(),
            redis: Some(store),
            dir: None,
            temp: None,
            key_prefix,
        }
    }

    /// A new store over the same state, as after a restart; this one is dropped.
    async fn reopen(self) -> Self {
        let Self {
            backend,
            dir,
            temp,
            key_prefix,
            ..
        } = self;
        match backend {
            Backend::Fs => Self::fs(backend, dir.unwrap(), temp.unwrap()).await,
            _ => Self::redis(backend, key_prefix).await,
        }
    }
}

crate::support::suite! {
    backends:
        fs = super::Backend::Fs,
        redis = super::Backend::Redis,
        redis_cluster = super::Backend::RedisCluster;
    runtime: (flavor = "multi_thread", worker_threads = 2);
    tests: [
        open_creates_then_returns_the_live_session,
        a_live_lease_refuses_other_writers,
        a_lease_that_ran_out_can_be_taken_over,
        committed_size_never_goes_back,
        complete_ends_the_lease_and_frees_its_slot,
        too_many_unfinished_sessions_are_refused,
        release_lets_another_writer_continue_at_once,
        sessions_past_their_expiry_are_absent,
        an_expired_session_in_the_way_stays_due,
        expired_lists_exactly_the_unfinished_expired_sessions,
        sessions_survive_a_restart,
        remove_forgets_the_session,
        concurrent_opens_admit_one_writer,
        concurrent_creations_respect_max_open,
    ]
}

mod redis_only {
    use super::*;

    crate::support::suite! {
        backends:
            redis = super::super::Backend::Redis,
            redis_cluster = super::super::Backend::RedisCluster;
        runtime: (flavor = "multi_thread", worker_threads = 2);
        tests: [
            redis_session_keys_expire_and_go_with_remove,
            redis_refused_opens_leave_no_trace,
        ]
    }
}

mod fs_only {
    use super::*;

    crate::support::suite! {
        backends: fs = super::super::Backend::Fs;
        tests: [fs_file_names_never_carry_caller_input]
    }
}
