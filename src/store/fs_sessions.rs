//! The data-directory [`UploadSessionStore`]: the zero-setup default, which lets an upload resume
//! after a restart of the process.
//!
//! Layout: one JSON file per session, `<dir>/<digest>.json`, where `<digest>` is the hex SHA-256
//! of the owner and the request id (length-prefixed, see [`session_digest`]); caller input never
//! reaches a file name. Files are written to `<digest>.json.tmp-<random>`, synced and renamed over
//! the old one, so a crash leaves the old state or the new one, never half of either.
//!
//! Each session's expiry, completion, committed size and owner are kept in an in-memory index,
//! built by reading every file once at [`FsUploadSessionStore::open`]; the per-owner count of
//! unfinished sessions (`max_open`) and [`UploadSessionStore::expired`] come from it, so no call
//! reads more files than the sessions it returns. Leases live only in memory: no writer survives
//! a restart, so after one every unfinished session is free to continue at once. Like the Redis
//! store, `update` and `renew` are fenced by the holder (the store reads no clock): a writer keeps
//! its lease until it releases it or another takes it over after the lease's end.
//!
//! An expired, unfinished session is handed to the janitor under its [`retired_request_id`]:
//! [`UploadSessionStore::expired`] moves each due session there before listing it, and `open`
//! moves one it finds in the way. So the janitor's `remove` never reaches an upload that reuses
//! the request id, a late writer of the expired session gets `LeaseLost`, and staged bytes are
//! never forgotten.
//!
//! Every call runs under one lock, so each check-and-set is atomic within the process (the
//! directory belongs to one process, like the filesystem blob store). Complete sessions past
//! their `expire_time` are deleted by [`UploadSessionStore::expired`] (the janitor only removes
//! unfinished ones), so finished uploads do not pile up.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
};

use async_trait::async_trait;
use tokio::{io::AsyncWriteExt, sync::Mutex};

use super::{
    messages::StoreError,
    upload_sessions::{
        Lease, Opened, SessionError, SessionResult, StagedWrite, UploadSession, UploadSessionStore,
    },
};
use crate::{
    ids::{FileId, UserId},
    messaging::model::UnixMillis,
};

/// The directory under `storage.data_dir` that holds the session files.
pub const SESSIONS_DIR: &str = "sessions";

const SESSION_SUFFIX: &str = ".json";
const TEMP_INFIX: &str = ".json.tmp-";

/// The hex SHA-256 naming a session: the owner's length, `:`, the owner, then the request id, so
/// no two `(owner, request_id)` pairs share a digest whatever characters they contain.
pub fn session_digest(owner: &UserId, request_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let owner = owner.as_str();
    let mut hasher = Sha256::new();
    hasher.update(owner.len().to_string().as_bytes());
    hasher.update(b":");
    hasher.update(owner.as_bytes());
    hasher.update(request_id.as_bytes());
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The name an expired, unfinished session keeps when [`UploadSessionStore::open`] replaces it:
/// listed by [`UploadSessionStore::expired`] under this `request_id`, so the janitor discards its
/// staged bytes and removes it by this name, never touching its successor. Request ids never
/// contain control characters, so no caller can name it.
pub fn retired_request_id(request_id: &str, file_id: &FileId) -> String {
    format!("{request_id}\u{0}replaced:{file_id}")
}

/// Whether `request_id` is a [`retired_request_id`].
pub fn is_retired(request_id: &str) -> bool {
    request_id.contains('\u{0}')
}

/// The [`UploadSessionStore`] of the zero-setup default; see the module docs.
pub struct FsUploadSessionStore {
    dir: PathBuf,
    index: Mutex<Index>,
}

impl std::fmt::Debug for FsUploadSessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsUploadSessionStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// What the store knows of one session without reading its file.
#[derive(Debug)]
struct Entry {
    owner: UserId,
    expire_time: UnixMillis,
    committed_size: u64,
    complete: bool,
    /// `(holder, until)`; in memory only.
    lease: Option<(String, UnixMillis)>,
}

impl Entry {
    fn of(session: &UploadSession) -> Self {
        Self {
            owner: session.owner.clone(),
            expire_time: session.expire_time,
            committed_size: session.committed_size,
            complete: session.complete,
            lease: None,
        }
    }

    fn is_live(&self, now: UnixMillis) -> bool {
        self.expire_time > now
    }

    /// Whether a writer other than `holder` holds the lease at `now`.
    fn held_by_another(&self, holder: &str, now: UnixMillis) -> bool {
        matches!(&self.lease, Some((current, until)) if current != holder && *until > now)
    }

    /// Whether `holder` (never the empty name) holds the lease; expiry aside: a takeover is what
    /// ends a lease for its old holder.
    fn held_by(&self, holder: &str) -> bool {
        !holder.is_empty() && matches!(&self.lease, Some((current, _)) if current == holder)
    }
}

#[derive(Debug, Default)]
struct Index {
    sessions: HashMap<String, Entry>,
    /// Each owner's unfinished sessions (digests), live or expired.
    unfinished: HashMap<UserId, HashSet<String>>,
}

impl Index {
    fn insert(&mut self, digest: String, entry: Entry) {
        self.forget(&digest);
        if !entry.complete {
            self.unfinished
                .entry(entry.owner.clone())
                .or_default()
                .insert(digest.clone());
        }
        self.sessions.insert(digest, entry);
    }

    fn forget(&mut self, digest: &str) -> Option<Entry> {
        let entry = self.sessions.remove(digest)?;
        if let Some(open) = self.unfinished.get_mut(&entry.owner) {
            open.remove(digest);
            if open.is_empty() {
                self.unfinished.remove(&entry.owner);
            }
        }
        Some(entry)
    }

    /// `owner`'s unfinished sessions still live at `now`.
    fn open_count(&self, owner: &UserId, now: UnixMillis) -> usize {
        self.unfinished.get(owner).map_or(0, |digests| {
            digests
                .iter()
                .filter(|digest| {
                    self.sessions
                        .get(*digest)
                        .is_some_and(|entry| entry.is_live(now))
                })
                .count()
        })
    }
}

impl FsUploadSessionStore {
    /// Opens (creating it if missing) the directory holding the session files, normally
    /// `storage.data_dir` joined with [`SESSIONS_DIR`], and reads every session into the index.
    /// Leftover temporary files of an interrupted write are deleted; a file that cannot be read
    /// back is logged and skipped.
    pub async fn open(dir: &Path) -> std::io::Result<Self> {
        tokio::fs::create_dir_all(dir).await?;
        let mut index = Index::default();
        let mut entries = tokio::fs::read_dir(dir).await?;
        while let Some(dir_entry) = entries.next_entry().await? {
            let name = dir_entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            if name.contains(TEMP_INFIX) {
                if let Err(error) = tokio::fs::remove_file(dir_entry.path()).await {
                    tracing::warn!(%error, file = name, "could not delete a leftover session temp file");
                }
                continue;
            }
            let Some(digest) = name.strip_suffix(SESSION_SUFFIX) else {
                continue;
            };
            match read_session(&dir_entry.path()).await {
                Ok(session) if session_digest(&session.owner, &session.request_id) == digest => {
                    index.insert(digest.to_owned(), Entry::of(&session));
                }
                Ok(_) => {
                    tracing::warn!(
                        file = name,
                        "skipping an upload session stored under another session's name"
                    );
                }
                Err(error) => {
                    tracing::warn!(%error, file = name, "skipping an unreadable upload session");
                }
            }
        }
        tracing::info!(dir = %dir.display(), sessions = index.sessions.len(), "upload sessions loaded");
        Ok(Self {
            dir: dir.to_owned(),
            index: Mutex::new(index),
        })
    }

    fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(format!("{digest}{SESSION_SUFFIX}"))
    }

    async fn read(&self, digest: &str) -> Result<UploadSession, StoreError> {
        read_session(&self.path(digest))
            .await
            .map_err(|error| StoreError::Corrupt(format!("upload session {digest}: {error}")))
    }

    /// Replaces the session's file atomically (temp file, fsync, rename, fsync of the directory).
    async fn write(&self, digest: &str, session: &UploadSession) -> Result<(), StoreError> {
        let json = serde_json::to_vec(session)
            .map_err(|error| StoreError::Corrupt(format!("upload session: {error}")))?;
        let temp = self.dir.join(format!(
            "{digest}{TEMP_INFIX}{}",
            uuid::Uuid::now_v7().simple()
        ));
        let written = async {
            let mut file = tokio::fs::File::create(&temp).await?;
            file.write_all(&json).await?;
            file.sync_all().await?;
            drop(file);
            tokio::fs::rename(&temp, self.path(digest)).await?;
            sync_dir(&self.dir).await
        }
        .await;
        if let Err(error) = written {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(unavailable(error));
        }
        Ok(())
    }

    /// Moves the session `digest` names to its [`retired_request_id`] and returns it so.
    async fn retire(&self, index: &mut Index, digest: &str) -> Result<UploadSession, StoreError> {
        let mut retired = self.read(digest).await?;
        retired.request_id = retired_request_id(&retired.request_id, &retired.file_id);
        let retired_digest = session_digest(&retired.owner, &retired.request_id);
        self.write(&retired_digest, &retired).await?;
        index.insert(retired_digest, Entry::of(&retired));
        self.delete(digest).await?;
        index.forget(digest);
        Ok(retired)
    }

    async fn delete(&self, digest: &str) -> Result<(), StoreError> {
        match tokio::fs::remove_file(self.path(digest)).await {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(unavailable(error)),
        }
    }
}

#[async_trait]
impl UploadSessionStore for FsUploadSessionStore {
    async fn open(
        &self,
        new: &UploadSession,
        lease: Lease<'_>,
        now: UnixMillis,
        max_open: u32,
    ) -> SessionResult<Opened> {
        let digest = session_digest(&new.owner, &new.request_id);
        let mut index = self.index.lock().await;
        if let Some(entry) = index.sessions.get_mut(&digest)
            && entry.is_live(now)
        {
            if !entry.complete {
                if entry.held_by_another(lease.holder, now) {
                    return Err(SessionError::Busy);
                }
                entry.lease = Some((lease.holder.to_owned(), lease.until));
            }
            let existing = self.read(&digest).await?;
            return Ok(Opened::Existing(existing));
        }
        // An expired session under the same name is replaced (it is absent to callers); it
        // counts as neither open nor live.
        if !new.complete && index.open_count(&new.owner, now) >= max_open as usize {
            return Err(SessionError::TooMany { limit: max_open });
        }
        if index
            .sessions
            .get(&digest)
            .is_some_and(|entry| !entry.complete)
        {
            // Unfinished, its staged bytes still wait for the janitor: keep it for `expired`.
            self.retire(&mut index, &digest).await?;
        }
        self.write(&digest, new).await?;
        let mut entry = Entry::of(new);
        if !new.complete {
            entry.lease = Some((lease.holder.to_owned(), lease.until));
        }
        index.insert(digest, entry);
        Ok(Opened::Created)
    }

    async fn acquire(
        &self,
        owner: &UserId,
        request_id: &str,
        lease: Lease<'_>,
        now: UnixMillis,
    ) -> SessionResult<Option<UploadSession>> {
        let digest = session_digest(owner, request_id);
        let mut index = self.index.lock().await;
        let Some(entry) = index.sessions.get_mut(&digest) else {
            return Ok(None);
        };
        if !entry.is_live(now) {
            return Ok(None);
        }
        if !entry.complete {
            if entry.held_by_another(lease.holder, now) {
                return Err(SessionError::Busy);
            }
            entry.lease = Some((lease.holder.to_owned(), lease.until));
        }
        Ok(Some(self.read(&digest).await?))
    }

    async fn get(
        &self,
        owner: &UserId,
        request_id: &str,
        now: UnixMillis,
    ) -> Result<Option<UploadSession>, StoreError> {
        let digest = session_digest(owner, request_id);
        let index = self.index.lock().await;
        match index.sessions.get(&digest) {
            Some(entry) if entry.is_live(now) => Ok(Some(self.read(&digest).await?)),
            _ => Ok(None),
        }
    }

    async fn update(&self, session: &UploadSession, lease: Lease<'_>) -> SessionResult<()> {
        let digest = session_digest(&session.owner, &session.request_id);
        let mut index = self.index.lock().await;
        let Some(entry) = index.sessions.get(&digest) else {
            return Err(SessionError::LeaseLost);
        };
        if !entry.held_by(lease.holder) || session.committed_size < entry.committed_size {
            return Err(SessionError::LeaseLost);
        }
        self.write(&digest, session).await?;
        let mut updated = Entry::of(session);
        if !session.complete {
            updated.lease = Some((lease.holder.to_owned(), lease.until));
        }
        index.insert(digest, updated);
        Ok(())
    }

    async fn renew(&self, owner: &UserId, request_id: &str, lease: Lease<'_>) -> SessionResult<()> {
        let digest = session_digest(owner, request_id);
        let mut index = self.index.lock().await;
        match index.sessions.get_mut(&digest) {
            Some(entry) if entry.held_by(lease.holder) => {
                entry.lease = Some((lease.holder.to_owned(), lease.until));
                Ok(())
            }
            _ => Err(SessionError::LeaseLost),
        }
    }

    async fn release(
        &self,
        owner: &UserId,
        request_id: &str,
        holder: &str,
    ) -> Result<(), StoreError> {
        let digest = session_digest(owner, request_id);
        let mut index = self.index.lock().await;
        if let Some(entry) = index.sessions.get_mut(&digest)
            && entry.held_by(holder)
        {
            entry.lease = None;
        }
        Ok(())
    }

    async fn remove(&self, owner: &UserId, request_id: &str) -> Result<(), StoreError> {
        let digest = session_digest(owner, request_id);
        let mut index = self.index.lock().await;
        self.delete(&digest).await?;
        index.forget(&digest);
        Ok(())
    }

    async fn expired(
        &self,
        now: UnixMillis,
        limit: usize,
    ) -> Result<Vec<UploadSession>, StoreError> {
        let mut index = self.index.lock().await;
        let finished: Vec<String> = index
            .sessions
            .iter()
            .filter(|(_, entry)| entry.complete && !entry.is_live(now))
            .map(|(digest, _)| digest.clone())
            .collect();
        for digest in finished {
            self.delete(&digest).await?;
            index.forget(&digest);
        }
        let mut due: Vec<(UnixMillis, String)> = index
            .sessions
            .iter()
            .filter(|(_, entry)| !entry.complete && !entry.is_live(now))
            .map(|(digest, entry)| (entry.expire_time, digest.clone()))
            .collect();
        due.sort_unstable();
        let mut sessions = Vec::with_capacity(due.len().min(limit));
        for (_, digest) in due.into_iter().take(limit) {
            let session = self.read(&digest).await?;
            // Listed under its retired name only: whatever reuses the request id now is another
            // session, which the janitor's remove cannot reach.
            let session = if is_retired(&session.request_id) {
                session
            } else {
                self.retire(&mut index, &digest).await?
            };
            sessions.push(session);
        }
        Ok(sessions)
    }

    async fn unfinished_writes(&self, limit: usize) -> Result<Vec<StagedWrite>, StoreError> {
        let digests: Vec<String> = {
            let index = self.index.lock().await;
            index
                .sessions
                .iter()
                .filter(|(_, entry)| !entry.complete)
                .map(|(digest, _)| digest.clone())
                .take(limit)
                .collect()
        };
        let mut writes = Vec::with_capacity(digests.len());
        for digest in digests {
            // Removed since the index was read: nothing staged to protect.
            let Ok(session) = self.read(&digest).await else {
                continue;
            };
            writes.push(StagedWrite {
                blob_key: session.blob_key,
                upload_id: session.staged.upload_id,
            });
        }
        Ok(writes)
    }
}

async fn read_session(
    path: &Path,
) -> Result<UploadSession, Box<dyn std::error::Error + Send + Sync>> {
    let bytes = tokio::fs::read(path).await?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// Makes a rename in `dir` durable.
async fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = dir.to_owned();
    tokio::task::spawn_blocking(move || std::fs::File::open(dir)?.sync_all())
        .await
        .map_err(std::io::Error::other)?
}

fn unavailable(error: std::io::Error) -> StoreError {
    StoreError::Unavailable(Box::new(error))
}
