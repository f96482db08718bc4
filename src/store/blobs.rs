//! The blob store: file bodies and thumbnails, written as a stream while an upload arrives and
//! read back as a stream or through a time-limited download URL.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::error::{BoxError, Error, ErrorKind, Reason};

pub type BlobResult<T> = Result<T, BlobError>;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob not found")]
    NotFound,
    /// The backend cannot be reached or refused the request for a reason a retry may fix.
    #[error("blob store unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// A request the backend will never accept (bad credentials, a missing bucket): a retry
    /// cannot help, an operator must.
    #[error("blob store misconfigured: {0}")]
    Misconfigured(#[source] BoxError),
    /// The process-wide upload memory budget stayed full for the whole wait: too many uploads
    /// at once. Retrying later may help (`RESOURCE_EXHAUSTED`).
    #[error("blob store busy: {0}")]
    Busy(#[source] crate::budget::BudgetExhausted),
}

/// When an upload refused for want of memory may try again: buffers free as uploads progress.
const MEMORY_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Maps blob store failures; outages stay retryable.
impl From<BlobError> for Error {
    fn from(error: BlobError) -> Self {
        match error {
            BlobError::NotFound => {
                Error::not_found(Reason::FileNotFound, "file not found").with_field("file_id")
            }
            BlobError::Unavailable(source) => Error::new(
                ErrorKind::Unavailable,
                Reason::BackendUnavailable,
                "the file store is unavailable; retry shortly",
            )
            .with_source(source),
            // Operators must fix this; clients cannot.
            BlobError::Misconfigured(source) => Error::internal(source),
            // Too many uploads at once: this one may succeed a little later.
            BlobError::Busy(exhausted) => Error::new(
                ErrorKind::ResourceExhausted,
                Reason::UploadMemoryBusy,
                "the server is handling too many uploads; retry shortly",
            )
            .with_retry_delay(MEMORY_RETRY_DELAY)
            .with_source(exhausted),
        }
    }
}

/// How an object is served back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobAttributes {
    pub content_type: String,
    /// A `Content-Disposition` header value.
    pub content_disposition: String,
    /// Extra metadata stored with the object (e.g. its sha256).
    pub metadata: Vec<(String, String)>,
    /// The object's length, when known before the write: a store may then send parts as their
    /// bytes arrive instead of buffering each one. The caller guarantees it (the upload checks
    /// the bytes received against the declared size); a store streaming parts refuses a write
    /// that disagrees, others need not check.
    pub size: Option<u64>,
}

impl BlobAttributes {
    /// Adds `metadata` to the object's metadata, a key already present taking the new value.
    /// Returns whether anything changed.
    pub fn merge_metadata(&mut self, metadata: Vec<(String, String)>) -> bool {
        let mut changed = false;
        for (key, value) in metadata {
            match self
                .metadata
                .iter_mut()
                .find(|(existing, _)| *existing == key)
            {
                Some((_, existing)) if *existing == value => {}
                Some((_, existing)) => {
                    *existing = value;
                    changed = true;
                }
                None => {
                    self.metadata.push((key, value));
                    changed = true;
                }
            }
        }
        changed
    }
}

/// What is known about a stored object. Only the conformance suite asks (feature `testsuite`).
#[cfg(any(test, feature = "testsuite"))]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    pub size: u64,
    pub content_type: String,
}

/// An unfinished write a store holds (an S3 multipart upload, a staging file), as the orphan
/// janitor lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnfinishedWrite {
    /// The object it would become, when the store knows (S3 does; a staging file does not).
    pub key: Option<String>,
    /// The store's name for it; for a resumable write, the `StagedParts::upload_id` its session
    /// holds.
    pub upload_id: String,
}

/// One page of keys, in key order.
#[derive(Debug, Default)]
pub struct ObjectPage {
    /// The page's keys of objects last written before the listing's cut-off.
    pub keys: Vec<String>,
    /// Where the next page starts (its `start_after`); `None` once the listing is done.
    pub next: Option<String>,
}

/// One object being written. Bytes leave as they are written; nothing is visible under the
/// key until [`BlobUpload::commit`], and [`BlobUpload::abort`] (or dropping the upload) removes
/// whatever was written.
#[async_trait]
pub trait BlobUpload: Send {
    /// Appends bytes. May wait while earlier parts are still in flight: that wait is the
    /// back-pressure that reaches the client through gRPC flow control.
    async fn write(&mut self, bytes: Bytes) -> BlobResult<()>;
    /// Makes the object visible under its key, with `metadata` known only once every byte was
    /// written (e.g. the computed sha256) added to the metadata given at the start (a key given
    /// in both takes the value given here). A failed commit leaves nothing under the key.
    async fn commit(self: Box<Self>, metadata: Vec<(String, String)>) -> BlobResult<()>;
    /// Discards everything written.
    async fn abort(self: Box<Self>) -> BlobResult<()>;
}

/// A resumable write's durable progress, as its blob store describes it. Kept in the upload
/// session, so that any replica (or this one after a restart) can continue the write.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StagedParts {
    /// The store's name for the unfinished object (an S3 multipart upload id, a staging file);
    /// `None` until a first part is durable.
    pub upload_id: Option<String>,
    /// One entry per durable part, in order, each a whole part (S3: the part's ETag).
    pub parts: Vec<String>,
}

/// A write that outlives its writer: its bytes become durable part by part (each `part_size`
/// bytes, the last one at the commit), and the [`StagedParts`] that describe them let a later
/// [`BlobStore::resume_upload`] continue after the last durable part. Dropping it (or
/// [`ResumableUpload::pause`]) keeps the durable parts; only [`BlobStore::discard_staged`]
/// removes them.
#[async_trait]
pub trait ResumableUpload: Send {
    /// Appends bytes after the durable ones and those written since. May wait for parts in
    /// flight (back-pressure, as [`BlobUpload::write`]).
    async fn write(&mut self, bytes: Bytes) -> BlobResult<()>;
    /// The staged state, if more parts became durable since it was last taken.
    fn take_durable(&mut self) -> Option<StagedParts>;
    /// Waits until a part in flight finishes (never, when none is); cancel-safe, so it can be
    /// raced against the next chunk's arrival.
    async fn wait_durable(&mut self) -> BlobResult<()>;
    /// Waits for the parts in flight and returns what is durable; bytes buffered beyond it
    /// are dropped (the client sends them again).
    async fn pause(self: Box<Self>) -> BlobResult<StagedParts>;
    /// As [`BlobUpload::commit`]. A failure before the object is visible keeps the durable
    /// parts; after (its metadata could not be completed) the object is removed again.
    async fn commit(self: Box<Self>, metadata: Vec<(String, String)>) -> BlobResult<()>;
    /// Discards everything staged, durable or not, recorded anywhere or not (a refused upload).
    async fn abort(self: Box<Self>) -> BlobResult<()>;
}

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Starts a streamed write of `key`.
    async fn start_upload(
        &self,
        key: &str,
        attributes: BlobAttributes,
    ) -> BlobResult<Box<dyn BlobUpload>>;

    /// Continues (or, from `StagedParts::default()`, begins) a resumable write of `key` in parts
    /// of `part_size` bytes, after the durable parts `staged` names.
    async fn resume_upload(
        &self,
        key: &str,
        attributes: BlobAttributes,
        part_size: u64,
        staged: StagedParts,
    ) -> BlobResult<Box<dyn ResumableUpload>>;

    /// Removes the durable parts of a resumable write that will not be completed; parts
    /// already gone are fine.
    async fn discard_staged(&self, key: &str, staged: &StagedParts) -> BlobResult<()>;

    /// Writes a small object in one request (thumbnails).
    async fn put(&self, key: &str, attributes: BlobAttributes, bytes: Bytes) -> BlobResult<()>;

    /// The object's size and type, or `NotFound`.
    #[cfg(any(test, feature = "testsuite"))]
    async fn info(&self, key: &str) -> BlobResult<BlobInfo>;

    /// Streams the object from `offset`.
    async fn read(
        &self,
        key: &str,
        offset: u64,
    ) -> BlobResult<BoxStream<'static, BlobResult<Bytes>>>;

    /// Removes the object; removing a missing one succeeds.
    async fn delete(&self, key: &str) -> BlobResult<()>;

    /// A URL that lets anyone holding it GET the object for `valid_for`, served with the
    /// object's stored type and disposition.
    async fn download_url(&self, key: &str, valid_for: Duration) -> BlobResult<String>;

    /// Keys under `prefix` (for tests and cleanup checks).
    async fn list(&self, prefix: &str) -> BlobResult<Vec<String>>;
    /// Whether an object is stored under `key`.
    async fn exists(&self, key: &str) -> BlobResult<bool>;
    /// Up to about `limit` keys under `prefix` after `start_after` (one listing request on S3),
    /// keeping those of objects last written before `before`.
    async fn objects_before(
        &self,
        prefix: &str,
        before: SystemTime,
        start_after: Option<&str>,
        limit: usize,
    ) -> BlobResult<ObjectPage>;
    /// Up to `limit` unfinished writes under `prefixes` begun (S3) or last written (staging
    /// files) before `before`.
    async fn unfinished_writes(
        &self,
        prefixes: &[&str],
        before: SystemTime,
        limit: usize,
    ) -> BlobResult<Vec<UnfinishedWrite>>;
    /// Discards an unfinished write and its bytes; one already gone is fine.
    async fn abort_unfinished(&self, write: &UnfinishedWrite) -> BlobResult<()>;
}
