//! Upload sessions: what a resumable upload (an UploadFile with a `request_id`) needs so that any
//! replica, or this one after a restart, can carry it on, and so that a retry after completion
//! finds the result instead of storing the file twice.
//!
//! A session is scoped to its owner (the uploading caller) and named by the caller's
//! `request_id`. It records where the bytes are staged (the blob store's [`StagedParts`]), how
//! many bytes are durable there (`committed_size`, which never decreases) and the upload's own
//! state at that point (an opaque checkpoint the file relay encodes). At most one stream writes a
//! session at a time: it holds the session's writer *lease*, renewed while it works and released
//! when it stops; a writer that vanished loses it when the lease runs out. Every update is fenced
//! by the lease, so a writer that lost it cannot overwrite its successor's progress.
//!
//! Sessions end at `expire_time` (`uploads.session_ttl` after creation): [`UploadSessionStore::expired`]
//! lists unfinished ones past it, so a janitor can discard their staged bytes and
//! [`UploadSessionStore::remove`] them.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{blobs::StagedParts, messages::StoreError};
use crate::{
    ids::{ConversationId, FileId, MessageId, UserId},
    messaging::model::UnixMillis,
};

/// The upload as first declared; a later UploadFile with the same `request_id` must declare the
/// same (else `REQUEST_ID_REUSED`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeclaredUpload {
    pub conversation_id: ConversationId,
    pub file_name: String,
    pub content_type: String,
    pub size_bytes: u64,
    /// Lowercase hex, when declared.
    pub sha256: Option<String>,
    /// Trimmed.
    pub caption: String,
}

/// One resumable upload's state; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadSession {
    pub owner: UserId,
    /// The caller's `request_id`, as sent.
    pub request_id: String,
    pub declared: DeclaredUpload,
    /// Chosen when the session is created: a retry stores and announces the same file.
    pub file_id: FileId,
    pub message_id: MessageId,
    pub blob_key: String,
    /// The part size the staged bytes are cut into (fixed for the session's life, whatever
    /// the configuration of the replica that continues it).
    pub part_size: u64,
    pub staged: StagedParts,
    /// Bytes durable in `staged`; never decreases.
    pub committed_size: u64,
    /// The upload's state after `committed_size` bytes (hash and content checks), encoded by
    /// the file relay; `None` at 0 and once complete.
    pub checkpoint: Option<String>,
    pub create_time: UnixMillis,
    pub expire_time: UnixMillis,
    /// The file was stored and announced (under `file_id` and `message_id`).
    pub complete: bool,
}

/// A writer's claim on a session: who holds it and until when (Unix ms).
#[derive(Debug, Clone, Copy)]
pub struct Lease<'a> {
    pub holder: &'a str,
    pub until: UnixMillis,
}

/// Where an unfinished session's bytes are staged: the orphan janitor must leave these alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedWrite {
    pub blob_key: String,
    /// The blob store's name for the staged bytes (`StagedParts::upload_id`); `None` until the
    /// first part is durable (the store may already hold an upload under `blob_key` then).
    pub upload_id: Option<String>,
}

/// What [`UploadSessionStore::open`] found.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // Returned once per upload, never stored.
pub enum Opened {
    /// No live session had this request id: the given one was stored, its lease taken.
    Created,
    /// A live session already had it. Unless it is complete, its lease is now the caller's.
    Existing(UploadSession),
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Another writer holds the session's lease.
    #[error("another stream is writing this upload")]
    Busy,
    /// The owner already has `limit` unfinished sessions.
    #[error("too many unfinished upload sessions (at most {limit})")]
    TooMany { limit: u32 },
    /// The caller's lease ended (another writer may have taken over) or the session is gone.
    #[error("the upload session's lease was lost")]
    LeaseLost,
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub type SessionResult<T> = Result<T, SessionError>;

#[async_trait]
pub trait UploadSessionStore: Send + Sync + 'static {
    /// Stores `new` and takes its lease, unless a live session (`expire_time` after `now`) of
    /// the same owner and request id exists: then that one is returned, with its lease taken
    /// if it is unfinished (`Busy` when another writer holds it). `TooMany` when creating would
    /// give the owner more than `max_open` unfinished sessions.
    async fn open(
        &self,
        new: &UploadSession,
        lease: Lease<'_>,
        now: UnixMillis,
        max_open: u32,
    ) -> SessionResult<Opened>;

    /// The live session, with its lease taken if it is unfinished (`Busy` when another writer
    /// holds it); `None` when there is none.
    async fn acquire(
        &self,
        owner: &UserId,
        request_id: &str,
        lease: Lease<'_>,
        now: UnixMillis,
    ) -> SessionResult<Option<UploadSession>>;

    /// The live session, if any (no lease taken).
    async fn get(
        &self,
        owner: &UserId,
        request_id: &str,
        now: UnixMillis,
    ) -> Result<Option<UploadSession>, StoreError>;

    /// Replaces the session's state, if `lease` is still the session's (else `LeaseLost`), and
    /// extends the lease to `lease.until`. A `committed_size` below the stored one is an error
    /// of the caller's (`LeaseLost` too: only a stale writer goes back). Storing a complete
    /// session ends its lease and stops counting it as unfinished.
    async fn update(&self, session: &UploadSession, lease: Lease<'_>) -> SessionResult<()>;

    /// Extends the lease to `lease.until` if it is still the holder's (else `LeaseLost`).
    async fn renew(&self, owner: &UserId, request_id: &str, lease: Lease<'_>) -> SessionResult<()>;

    /// Ends `holder`'s lease (nothing if another holds it), so another writer may continue at
    /// once.
    async fn release(
        &self,
        owner: &UserId,
        request_id: &str,
        holder: &str,
    ) -> Result<(), StoreError>;

    /// Forgets the session (a refused upload, or an expired one whose bytes were discarded).
    async fn remove(&self, owner: &UserId, request_id: &str) -> Result<(), StoreError>;

    /// Up to `limit` unfinished sessions whose `expire_time` is at or before `now`.
    async fn expired(
        &self,
        now: UnixMillis,
        limit: usize,
    ) -> Result<Vec<UploadSession>, StoreError>;

    /// Where up to `limit` unfinished sessions (live or expired, not yet discarded) stage their
    /// bytes. The orphan janitor skips these: their staged bytes belong to the session janitor.
    /// A caller that gets `limit` entries cannot know it saw them all.
    async fn unfinished_writes(&self, limit: usize) -> Result<Vec<StagedWrite>, StoreError>;
}
