//! The file relay: uploads validated while their bytes arrive and streamed to the blob store,
//! the FILE/IMAGE message that announces them, downloads, deletion and expiry.
//!
//! An upload is refused at the first byte that proves it wrong, and any failure (or the client
//! going away, which drops the upload) removes what was written: nothing half-stored remains.
//!
//! No caller can hold the service's resources for long: a caller has at most
//! `uploads.max_concurrent_per_caller` uploads open, a stream that sends nothing for
//! `uploads.idle_timeout` is ended (and its memory and multipart upload released), an upload may
//! not be cut into more than `size / uploads.min_chunk_bytes + 16` chunks, and every byte it has
//! buffered (part buffers, an image's body kept for its thumbnail) counts against
//! `uploads.memory_budget` as it arrives.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt, stream::BoxStream};
use sha2::{Digest, Sha256};

use super::{
    policy::{FileCategory, FileTypeRule, UploadPolicy},
    sniff::ContentSniffer,
};
use crate::{
    auth::Caller,
    budget::{MemoryBudget, MemoryReservation},
    error::{Error, ErrorKind, Reason, Result},
    ids::{ConversationId, FileId, MessageId},
    messaging::{
        model::{FileAttachment, Message, UnixMillis, now_millis},
        service::ConversationService,
    },
    quota::{CallerSlot, PerCallerSlots},
    store::{
        blobs::{BlobAttributes, BlobError, BlobStore, BlobUpload},
        file_records::{FileRecord, FileRecordStore},
        upload_sessions::UploadSessionStore,
    },
    thumbnails::{ImageFeed, Thumbnail, ThumbnailPool},
};

/// Longest file name, in characters.
pub const MAX_FILE_NAME_CHARS: usize = 255;

/// The blob metadata entry holding the file's SHA-256 (lowercase hex); S3 serves it as
/// `x-amz-meta-sha256`.
pub const SHA256_METADATA: &str = "sha256";

/// One message of an UploadFile stream.
#[derive(Debug)]
pub enum UploadPart {
    Metadata(UploadRequest),
    /// Continues a resumable upload (in place of the metadata).
    Resume(UploadResume),
    Chunk(Bytes),
}

/// How a resumable upload's stream began (see [`super::resume`]).
pub enum Start {
    /// With its metadata: a new upload, or the same one again (content from offset 0).
    Declared(UploadRequest),
    /// With a resume: an existing upload, content from `write_offset`.
    Resume(UploadResume),
}

/// Where a resumed upload's content continues.
#[derive(Debug, Clone)]
pub struct UploadResume {
    pub request_id: String,
    pub write_offset: i64,
}

/// The upload's declared metadata, as the client sent it.
#[derive(Debug, Clone)]
pub struct UploadRequest {
    pub conversation_id: ConversationId,
    pub file_name: String,
    pub content_type: String,
    pub size_bytes: i64,
    /// Lowercase or uppercase hex; empty when not given.
    pub sha256: String,
    pub caption: String,
    /// Empty for a one-shot upload; otherwise names a resumable one (see [`super::resume`]).
    pub request_id: String,
}

/// Where to download a file from.
#[derive(Debug, Clone)]
pub struct DownloadUrls {
    pub url: String,
    pub thumbnail_url: Option<String>,
    pub expire_time: UnixMillis,
}

/// An accepted upload's plan, before any byte was read.
pub(super) struct UploadPlan {
    pub(super) conversation_id: ConversationId,
    pub(super) file_id: FileId,
    pub(super) rule: FileTypeRule,
    pub(super) file_name: String,
    pub(super) content_type: String,
    pub(super) declared_size: u64,
    pub(super) expected_sha256: Option<String>,
    pub(super) caption: String,
}

impl UploadPlan {
    /// How the stored object is served: its verified type, a download disposition, and the
    /// declared sha256 (if any) from the start.
    pub(super) fn attributes(&self) -> BlobAttributes {
        BlobAttributes {
            content_type: self.content_type.clone(),
            content_disposition: attachment_disposition(&self.file_name),
            metadata: self
                .expected_sha256
                .iter()
                .map(|sha| (SHA256_METADATA.to_owned(), sha.clone()))
                .collect(),
            size: Some(self.declared_size),
        }
    }
}

/// The file relay domain; see the module docs.
pub struct FileService {
    pub(super) conversations: Arc<ConversationService>,
    pub(super) blobs: Arc<dyn BlobStore>,
    pub(super) file_records: Arc<dyn FileRecordStore>,
    pub(super) sessions: Arc<dyn UploadSessionStore>,
    pub(super) policy: Arc<UploadPolicy>,
    pub(super) thumbnails: Arc<ThumbnailPool>,
    url_ttl: Duration,
    /// The budget image bodies kept for their thumbnail are reserved from.
    pub(super) budget: Arc<MemoryBudget>,
    slots: PerCallerSlots,
}

impl FileService {
    #[allow(clippy::too_many_arguments)] // Its parts, each named; built once, in app.rs.
    pub fn new(
        conversations: Arc<ConversationService>,
        blobs: Arc<dyn BlobStore>,
        file_records: Arc<dyn FileRecordStore>,
        sessions: Arc<dyn UploadSessionStore>,
        policy: Arc<UploadPolicy>,
        thumbnails: Arc<ThumbnailPool>,
        url_ttl: Duration,
        budget: Arc<MemoryBudget>,
    ) -> Self {
        let slots = PerCallerSlots::new(policy.max_concurrent_per_caller);
        Self {
            conversations,
            blobs,
            file_records,
            sessions,
            policy,
            thumbnails,
            url_ttl,
            budget,
            slots,
        }
    }

    pub fn policy(&self) -> &UploadPolicy {
        &self.policy
    }

    /// Receives one upload: metadata first, then the chunks. Returns the stored file and the
    /// message that announced it.
    ///
    /// A resumable upload runs on a task of its own: if the client goes away (which drops this
    /// call), the task still sees the stream end, and records the parts that became durable
    /// before it lets go of the session.
    pub async fn upload<S>(
        self: &Arc<Self>,
        caller: &Caller,
        parts: S,
    ) -> Result<(FileRecord, Message)>
    where
        S: Stream<Item = Result<UploadPart>> + Unpin + Send + 'static,
    {
        // Held until the upload ends, whichever way.
        let slot = self.take_slot(caller)?;
        let mut parts = TimedParts::new(parts, &self.policy);
        let start = match first_part(&mut parts).await? {
            UploadPart::Metadata(request) if request.request_id.is_empty() => {
                return self.upload_once(caller, request, parts).await;
            }
            UploadPart::Metadata(request) => Start::Declared(request),
            UploadPart::Resume(resume) => Start::Resume(resume),
            UploadPart::Chunk(_) => unreachable!("first_part returns metadata or resume"),
        };
        let service = self.clone();
        let caller = caller.clone();
        tokio::spawn(async move {
            let _slot = slot;
            service.upload_resumable(&caller, start, parts).await
        })
        .await
        .map_err(|error| Error::internal(format!("a resumable upload's task failed: {error}")))?
    }

    /// A one-shot upload (no request id), all or nothing.
    async fn upload_once<S>(
        &self,
        caller: &Caller,
        request: UploadRequest,
        mut parts: S,
    ) -> Result<(FileRecord, Message)>
    where
        S: Stream<Item = Result<UploadPart>> + Unpin + Send,
    {
        let plan = self.plan(caller, request).await?;
        let mut written = Written::default();
        let stored = self.store(caller, &plan, &mut parts, &mut written).await;
        if stored.is_err() {
            self.remove(written).await;
        }
        stored
    }

    /// The steps of an accepted upload; each notes in `written` what it stored, so that
    /// [`FileService::remove`] can take it all away if a later step fails.
    async fn store<S>(
        &self,
        caller: &Caller,
        plan: &UploadPlan,
        parts: &mut S,
        written: &mut Written,
    ) -> Result<(FileRecord, Message)>
    where
        S: Stream<Item = Result<UploadPart>> + Unpin + Send,
    {
        let (body, thumbnail_key) = self.receive_body(plan, parts, written).await?;
        self.record_and_announce(
            caller,
            plan,
            MessageId::generate(),
            body,
            thumbnail_key,
            written,
        )
        .await
    }

    /// Receives the chunks into the blob store. Documents stream to it as they arrive. Images
    /// (at most the image size limit) are kept in memory instead, for their thumbnail, which is
    /// decoded as they arrive and made before anything is stored: an undecodable image stores
    /// nothing, and its bytes are held only once. An image's thumbnail is stored before it
    /// (its key returned with the body).
    async fn receive_body<S>(
        &self,
        plan: &UploadPlan,
        parts: &mut S,
        written: &mut Written,
    ) -> Result<(ReceivedBody, Option<String>)>
    where
        S: Stream<Item = Result<UploadPart>> + Unpin + Send,
    {
        let key = blob_key("files", plan.conversation_id, &plan.file_id);
        // A declared sha256 travels from the start (a multipart upload then needs no rewrite of
        // its metadata at the end); the computed one is given at the commit either way.
        let mut attributes = plan.attributes();
        let mut sink = if plan.rule.kind.category() == FileCategory::Image {
            Sink::Kept(KeptBody::new(
                &self.budget,
                plan.declared_size,
                self.thumbnails.feed(plan.rule.kind),
            ))
        } else {
            Sink::Streamed(self.blobs.start_upload(&key, attributes.clone()).await?)
        };
        let (sha256, dimensions) = match receive(plan, &self.policy, parts, &mut sink).await {
            Ok(received) => received,
            Err(error) => {
                if let Sink::Streamed(upload) = sink {
                    written.unfinished = Some(upload);
                }
                return Err(error);
            }
        };
        let sha256_metadata = vec![(SHA256_METADATA.to_owned(), sha256.clone())];
        let (thumbnail, thumbnail_key) = match sink {
            Sink::Streamed(upload) => {
                upload.commit(sha256_metadata).await?;
                written.blobs.push(key.clone());
                (None, None)
            }
            Sink::Kept(body) => {
                // The body stays reserved until it is stored.
                let KeptBody {
                    bytes,
                    reservation,
                    feed,
                    ..
                } = body;
                let bytes = bytes.freeze();
                let thumbnail = feed.finish(bytes.clone()).await?;
                attributes.merge_metadata(sha256_metadata);
                let thumbnail_key = self
                    .store_body_and_thumbnail(plan, &key, attributes, bytes, &thumbnail, written)
                    .await?;
                drop(reservation);
                (thumbnail, thumbnail_key)
            }
        };
        let body = ReceivedBody {
            key,
            sha256,
            // FileInfo reports an image as displayed, after its EXIF orientation.
            dimensions: thumbnail.as_ref().map_or(dimensions, |thumbnail| {
                (thumbnail.source_width, thumbnail.source_height)
            }),
        };
        Ok((body, thumbnail_key))
    }

    /// Stores an image's thumbnail, then the image. The thumbnail is ready at the last byte
    /// (decoded while the image arrived) and small: written first, it is stored within a few
    /// ms, not after the image (or, written beside it, behind the image's sync on the same disk).
    async fn store_body_and_thumbnail(
        &self,
        plan: &UploadPlan,
        key: &str,
        attributes: BlobAttributes,
        bytes: Bytes,
        thumbnail: &Option<Thumbnail>,
        written: &mut Written,
    ) -> Result<Option<String>> {
        let thumbnail_key = match thumbnail {
            Some(thumbnail) => Some(
                self.store_thumbnail(plan, thumbnail.clone(), written)
                    .await?,
            ),
            None => None,
        };
        self.blobs.put(key, attributes, bytes).await?;
        written.blobs.push(key.to_owned());
        Ok(thumbnail_key)
    }

    /// Stores an image's thumbnail next to it; returns its key.
    pub(super) async fn store_thumbnail(
        &self,
        plan: &UploadPlan,
        thumbnail: Thumbnail,
        written: &mut Written,
    ) -> Result<String> {
        let key = blob_key("thumbs", plan.conversation_id, &plan.file_id);
        let extension = if thumbnail.content_type == "image/png" {
            "png"
        } else {
            "jpg"
        };
        let attributes = BlobAttributes {
            content_type: thumbnail.content_type.to_owned(),
            content_disposition: attachment_disposition(&format!("thumbnail.{extension}")),
            metadata: Vec::new(),
            size: Some(thumbnail.bytes.len() as u64),
        };
        self.blobs.put(&key, attributes, thumbnail.bytes).await?;
        written.blobs.push(key.clone());
        Ok(key)
    }

    /// Records the stored file and posts the FILE/IMAGE message that announces it (as
    /// `message_id`: posting it again returns the first).
    pub(super) async fn record_and_announce(
        &self,
        caller: &Caller,
        plan: &UploadPlan,
        message_id: MessageId,
        body: ReceivedBody,
        thumbnail_key: Option<String>,
        written: &mut Written,
    ) -> Result<(FileRecord, Message)> {
        let now = now_millis();
        let retention = i64::try_from(self.policy.retention.as_millis()).unwrap_or(i64::MAX);
        let record = FileRecord {
            conversation_id: plan.conversation_id,
            file: FileAttachment {
                file_id: plan.file_id.clone(),
                uploader: caller.user_id.clone(),
                file_name: plan.file_name.clone(),
                content_type: plan.rule.kind.mime_type().to_owned(),
                size_bytes: plan.declared_size,
                sha256: body.sha256,
                category: plan.rule.kind.category(),
                width: body.dimensions.0,
                height: body.dimensions.1,
                has_thumbnail: thumbnail_key.is_some(),
                create_time: now,
                expire_time: now.saturating_add(retention),
            },
            blob_key: body.key,
            thumbnail_key,
            message_id: Some(message_id),
        };
        self.file_records.put(&record).await?;
        written.record = Some(record.file.file_id.clone());
        let message = self
            .conversations
            .post_file(
                caller,
                plan.conversation_id,
                message_id,
                record.attachment(),
                plan.caption.clone(),
            )
            .await?;
        Ok((record, message))
    }

    /// The one clean-up path of a failed upload: aborts its unfinished multipart upload and
    /// removes the blobs and the record it stored.
    pub(super) async fn remove(&self, written: Written) {
        if let Some(upload) = written.unfinished
            && let Err(error) = upload.abort().await
        {
            tracing::warn!(%error, "aborting a refused upload failed");
        }
        for key in &written.blobs {
            if let Err(error) = self.blobs.delete(key).await {
                tracing::warn!(%error, key, "could not remove the bytes of a failed upload");
            }
        }
        if let Some(file_id) = written.record {
            let _ = self.file_records.delete(&file_id).await;
        }
    }

    /// The file, if it is live and the caller participates in its conversation.
    pub async fn get_file(&self, caller: &Caller, file_id: &FileId) -> Result<FileRecord> {
        let record = self
            .file_records
            .get(file_id)
            .await?
            // The store forgets expired files on its own; this also covers the moments before.
            .filter(|record| record.file.expire_time > now_millis())
            .ok_or_else(file_not_found)?;
        self.conversations
            .conversation_of_participant(caller, record.conversation_id)
            .await?;
        Ok(record)
    }

    /// Time-limited URLs for the file (and its thumbnail), never valid past its expiry.
    pub async fn download_urls(&self, caller: &Caller, file_id: &FileId) -> Result<DownloadUrls> {
        let record = self.get_file(caller, file_id).await?;
        let now = now_millis();
        let remaining =
            Duration::from_millis(u64::try_from(record.file.expire_time - now).unwrap_or(0));
        let valid_for = self.url_ttl.min(remaining);
        if valid_for < Duration::from_secs(1) {
            return Err(file_not_found());
        }
        let url = self.blobs.download_url(&record.blob_key, valid_for).await?;
        let thumbnail_url = match &record.thumbnail_key {
            Some(key) => Some(self.blobs.download_url(key, valid_for).await?),
            None => None,
        };
        Ok(DownloadUrls {
            url,
            thumbnail_url,
            expire_time: now + i64::try_from(valid_for.as_millis()).unwrap_or(i64::MAX),
        })
    }

    /// The file's bytes from `offset`, in chunks of at most the policy's chunk size.
    pub async fn download(
        &self,
        caller: &Caller,
        file_id: &FileId,
        offset: i64,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        let record = self.get_file(caller, file_id).await?;
        let offset = u64::try_from(offset)
            .ok()
            .filter(|offset| *offset <= record.file.size_bytes)
            .ok_or_else(|| {
                Error::invalid_field(
                    "offset",
                    format!(
                        "offset must be between 0 and the file size {}",
                        record.file.size_bytes
                    ),
                )
            })?;
        let stream = self.blobs.read(&record.blob_key, offset).await?;
        let max_chunk = usize::try_from(self.policy.max_chunk_bytes).unwrap_or(usize::MAX);
        let chunks = stream.flat_map(move |piece| {
            let pieces: Vec<Result<Bytes>> = match piece {
                Ok(mut bytes) => {
                    let mut out = Vec::new();
                    while bytes.len() > max_chunk {
                        out.push(Ok(bytes.split_to(max_chunk)));
                    }
                    if !bytes.is_empty() {
                        out.push(Ok(bytes));
                    }
                    out
                }
                Err(error) => vec![Err(error.into())],
            };
            futures::stream::iter(pieces)
        });
        Ok(chunks.boxed())
    }

    /// Deletes the file (its uploader only): every message carrying it (the upload's own and
    /// every re-post) becomes a tombstone and no new one can carry it, then the bytes and the
    /// record go. Safe to retry after a failure.
    pub async fn delete(&self, caller: &Caller, file_id: &FileId) -> Result<()> {
        let record = self.get_file(caller, file_id).await?;
        if record.file.uploader != caller.user_id {
            return Err(Error::permission_denied(
                Reason::NotFileUploader,
                "only the uploader may delete a file",
            ));
        }
        self.conversations
            .delete_file_messages(
                caller,
                record.conversation_id,
                &record.file.file_id,
                record.file.expire_time,
            )
            .await?;
        // Redis data written before files were indexed lacks the upload's own message in the
        // index; it is still found by its id (already a tombstone otherwise: no new event).
        // Needed until such files have expired (`uploads.retention` after the upgrade).
        if let Some(message_id) = record.message_id {
            match self
                .conversations
                .delete_message(caller, record.conversation_id, message_id)
                .await
            {
                Ok(_) => {}
                // Already trimmed from history: nothing left to tombstone.
                Err(error) if error.reason == Reason::MessageNotFound => {}
                Err(error) => return Err(error),
            }
        }
        for key in std::iter::once(&record.blob_key).chain(record.thumbnail_key.iter()) {
            self.blobs.delete(key).await?;
        }
        self.file_records.delete(file_id).await?;
        Ok(())
    }

    /// One of the caller's upload slots, or `RESOURCE_EXHAUSTED` when all are taken.
    fn take_slot(&self, caller: &Caller) -> Result<CallerSlot> {
        self.slots.try_take(&caller.user_id).ok_or_else(|| {
            let limit = self.slots.per_caller();
            Error::new(
                ErrorKind::ResourceExhausted,
                Reason::TooManyUploads,
                format!("at most {limit} uploads per caller may be open at once; finish one first"),
            )
            .with_metadata("max_concurrent_uploads", limit.to_string())
            .with_quota_violation(
                format!("user:{}", truncated(caller.user_id.as_str(), 64)),
                format!("uploads.max_concurrent_per_caller: {limit} open uploads"),
            )
        })
    }

    /// Checks the metadata before any byte is read.
    pub(super) async fn plan(&self, caller: &Caller, request: UploadRequest) -> Result<UploadPlan> {
        let conversation_id = request.conversation_id;
        self.conversations
            .conversation_of_participant(caller, conversation_id)
            .await?;
        let rule = self
            .policy
            .rule_for(&request.content_type)
            .cloned()
            .ok_or_else(|| self.unsupported_type(&request.content_type))?;
        let file_name = validate_file_name(&request.file_name)?;
        if let Some((_, extension)) = file_name.rsplit_once('.') {
            let extension = extension.to_ascii_lowercase();
            if !rule.kind.extensions().contains(&extension.as_str()) {
                return Err(Error::invalid(
                    Reason::UnsupportedType,
                    format!(
                        "a {} file must be named .{}",
                        rule.kind.mime_type(),
                        rule.kind.extensions().join(" or .")
                    ),
                )
                .with_field("file_name"));
            }
        }
        let declared_size = u64::try_from(request.size_bytes)
            .ok()
            .filter(|size| *size > 0)
            .ok_or_else(|| {
                Error::invalid_field("size_bytes", "size_bytes must be greater than zero")
            })?;
        if declared_size > rule.max_size_bytes {
            let category = match rule.kind.category() {
                FileCategory::Document => "documents",
                FileCategory::Image => "images",
            };
            return Err(Error::invalid(
                Reason::FileTooLarge,
                format!(
                    "{category} may be at most {} bytes; this one is {declared_size}",
                    rule.max_size_bytes
                ),
            )
            .with_field("size_bytes")
            .with_metadata("max_size_bytes", rule.max_size_bytes.to_string()));
        }
        let expected_sha256 = match request.sha256.trim() {
            "" => None,
            sha if sha.len() == 64 && sha.chars().all(|c| c.is_ascii_hexdigit()) => {
                Some(sha.to_ascii_lowercase())
            }
            _ => {
                return Err(Error::invalid_field(
                    "sha256",
                    "sha256 must be 64 hexadecimal characters",
                ));
            }
        };
        let caption = request.caption.trim().to_owned();
        if caption.chars().count() > crate::messaging::model::MAX_TEXT_CHARS {
            return Err(Error::invalid_field(
                "caption",
                "caption must be at most 4000 characters",
            ));
        }
        Ok(UploadPlan {
            conversation_id,
            file_id: FileId::generate(),
            content_type: rule.kind.mime_type().to_owned(),
            rule,
            file_name,
            declared_size,
            expected_sha256,
            caption,
        })
    }

    fn unsupported_type(&self, content_type: &str) -> Error {
        let supported: Vec<&str> = self
            .policy
            .file_types
            .iter()
            .map(|rule| rule.kind.mime_type())
            .collect();
        Error::invalid(
            Reason::UnsupportedType,
            format!(
                "{content_type:?} is not accepted; supported types: {}",
                supported.join(", ")
            ),
        )
        .with_field("content_type")
        .with_metadata("supported_types", supported.join(","))
    }
}

/// What an upload has stored so far.
#[derive(Default)]
pub(super) struct Written {
    /// A multipart upload begun and neither committed nor aborted.
    unfinished: Option<Box<dyn BlobUpload>>,
    pub(super) blobs: Vec<String>,
    /// The file id of the stored record.
    record: Option<FileId>,
}

/// The body as stored, with what was learnt from it on the way.
pub(super) struct ReceivedBody {
    pub(super) key: String,
    pub(super) sha256: String,
    pub(super) dimensions: (u32, u32),
}

/// Where an upload's bytes go while they arrive.
enum Sink {
    /// Written through to the blob store.
    Streamed(Box<dyn BlobUpload>),
    /// Kept in memory (an image, for its thumbnail), stored whole at the end.
    Kept(KeptBody),
}

/// An image's body, kept for its thumbnail: its memory is reserved from the budget as its
/// bytes arrive, and its buffer grows by doubling up to the declared size. Each chunk also
/// goes to the thumbnail's decoder, which follows the upload.
struct KeptBody {
    bytes: BytesMut,
    reservation: MemoryReservation,
    budget: Arc<MemoryBudget>,
    declared_size: usize,
    feed: ImageFeed,
}

impl KeptBody {
    fn new(budget: &Arc<MemoryBudget>, declared_size: u64, feed: ImageFeed) -> Self {
        Self {
            bytes: BytesMut::new(),
            reservation: budget.empty(),
            budget: budget.clone(),
            declared_size: usize::try_from(declared_size).unwrap_or(usize::MAX),
            feed,
        }
    }

    async fn extend(&mut self, chunk: &Bytes) -> Result<()> {
        let filled = self.bytes.len() + chunk.len();
        self.budget
            .grow(
                &mut self.reservation,
                filled as u64,
                self.declared_size as u64,
            )
            .await
            .map_err(BlobError::Busy)?;
        if self.bytes.capacity() < filled {
            let capacity =
                (2 * self.bytes.capacity()).clamp(filled, self.declared_size.max(filled));
            let mut grown = BytesMut::with_capacity(capacity);
            grown.extend_from_slice(&self.bytes);
            self.bytes = grown;
        }
        self.bytes.extend_from_slice(chunk);
        self.feed.push(chunk, &self.bytes).await;
        Ok(())
    }
}

/// An upload stream with its time limits: a message must come within `uploads.idle_timeout` of
/// the previous one (else `UPLOAD_IDLE_TIMEOUT`), and the stream may last `uploads.max_duration`
/// in all (else `UPLOAD_TOO_LONG`), however steadily it trickles. Either error ends it.
pub(super) struct TimedParts<S> {
    parts: S,
    idle_timeout: Duration,
    max_duration: Duration,
    ends_at: tokio::time::Instant,
    /// Fires at the next message's deadline (the idle timeout, capped at the end).
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// The server is waiting for the next message: the idle timeout counts from when it began
    /// to (time the server spends on a chunk, waiting for memory or S3, is not the client's).
    waiting: bool,
    ended: bool,
}

impl<S> TimedParts<S> {
    pub(super) fn new(parts: S, policy: &UploadPolicy) -> Self {
        let now = tokio::time::Instant::now();
        let ends_at = now + policy.max_duration;
        Self {
            parts,
            idle_timeout: policy.idle_timeout,
            max_duration: policy.max_duration,
            ends_at,
            deadline: Box::pin(tokio::time::sleep_until(ends_at)),
            waiting: false,
            ended: false,
        }
    }

    fn expired(&self) -> Error {
        if tokio::time::Instant::now() >= self.ends_at {
            return Error::new(
                ErrorKind::DeadlineExceeded,
                Reason::UploadTooLong,
                format!(
                    "one upload stream may last at most {} s (uploads.max_duration); a resumable upload continues in a new stream",
                    self.max_duration.as_secs()
                ),
            )
            .with_metadata("max_duration_ms", self.max_duration.as_millis().to_string());
        }
        Error::new(
            ErrorKind::DeadlineExceeded,
            Reason::UploadIdleTimeout,
            format!(
                "the upload sent nothing for {} ms (uploads.idle_timeout); it was discarded",
                self.idle_timeout.as_millis()
            ),
        )
        .with_metadata("idle_timeout_ms", self.idle_timeout.as_millis().to_string())
    }
}

impl<S> Stream for TimedParts<S>
where
    S: Stream<Item = Result<UploadPart>> + Unpin,
{
    type Item = Result<UploadPart>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if self.ended {
            return Poll::Ready(None);
        }
        // Checked first: a client whose next message is always ready (the server is the slow
        // side) must not outlast `max_duration` either.
        if tokio::time::Instant::now() >= self.ends_at {
            self.ended = true;
            return Poll::Ready(Some(Err(self.expired())));
        }
        if !self.waiting {
            self.waiting = true;
            let next = (tokio::time::Instant::now() + self.idle_timeout).min(self.ends_at);
            self.deadline.as_mut().reset(next);
        }
        if let Poll::Ready(part) = self.parts.poll_next_unpin(cx) {
            self.waiting = false;
            return Poll::Ready(part);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.ended = true;
            return Poll::Ready(Some(Err(self.expired())));
        }
        Poll::Pending
    }
}

/// The upload's first message, which must be its metadata or a resume.
async fn first_part<S>(parts: &mut S) -> Result<UploadPart>
where
    S: Stream<Item = Result<UploadPart>> + Unpin + Send,
{
    match parts.next().await {
        Some(Ok(part @ (UploadPart::Metadata(_) | UploadPart::Resume(_)))) => Ok(part),
        Some(Err(error)) => Err(error),
        Some(Ok(UploadPart::Chunk(_))) | None => Err(Error::invalid(
            Reason::MetadataFirst,
            "the first message of an upload must carry its metadata (or resume)",
        )
        .with_field("metadata")),
    }
}

/// Reads the chunks, checking each before it is stored; returns the sha256 and dimensions.
async fn receive<S>(
    plan: &UploadPlan,
    policy: &UploadPolicy,
    parts: &mut S,
    sink: &mut Sink,
) -> Result<(String, (u32, u32))>
where
    S: Stream<Item = Result<UploadPart>> + Unpin + Send,
{
    let mut sniffer = ContentSniffer::new(plan.rule.kind, policy.max_image_pixels);
    let mut hasher = Sha256::new();
    let mut received: u64 = 0;
    let max_chunks = policy.max_chunks(plan.declared_size);
    let mut chunks: u64 = 0;
    while let Some(part) = parts.next().await {
        let chunk = match part? {
            UploadPart::Chunk(chunk) => chunk,
            UploadPart::Metadata(_) | UploadPart::Resume(_) => return Err(metadata_again()),
        };
        check_chunk(policy, plan.declared_size, &chunk, &mut chunks, max_chunks)?;
        // Nothing to check, hash or store.
        if chunk.is_empty() {
            continue;
        }
        received += chunk.len() as u64;
        if received > plan.declared_size {
            return Err(size_mismatch(format!(
                "more bytes arrived than the declared size_bytes {}",
                plan.declared_size
            )));
        }
        sniffer.feed(&chunk)?;
        hasher.update(&chunk);
        match sink {
            Sink::Streamed(upload) => upload.write(chunk).await?,
            Sink::Kept(body) => body.extend(&chunk).await?,
        }
    }
    if received != plan.declared_size {
        return Err(size_mismatch(format!(
            "the upload ended after {received} of the declared {} bytes",
            plan.declared_size
        )));
    }
    let sha256 = hex(&hasher.finalize());
    let dimensions = closing_checks(plan, sniffer, &sha256)?;
    Ok((sha256, dimensions))
}

/// The checks that need every byte: the content's structure and the declared sha256. Returns
/// the dimensions the header gave.
pub(super) fn closing_checks(
    plan: &UploadPlan,
    sniffer: ContentSniffer,
    sha256: &str,
) -> Result<(u32, u32)> {
    let report = sniffer.finish()?;
    if let Some(expected) = &plan.expected_sha256
        && expected != sha256
    {
        return Err(Error::invalid(
            Reason::ChecksumMismatch,
            "the SHA-256 of the received bytes differs from the declared sha256",
        )
        .with_field("sha256"));
    }
    Ok((report.width, report.height))
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

pub(super) fn metadata_again() -> Error {
    Error::invalid(
        Reason::MetadataFirst,
        "metadata (or resume) may only be sent once, as the first message",
    )
    .with_field("metadata")
}

/// Checks one more chunk of a stream against the chunk size and count limits.
pub(super) fn check_chunk(
    policy: &UploadPolicy,
    declared_size: u64,
    chunk: &[u8],
    chunks: &mut u64,
    max_chunks: u64,
) -> Result<()> {
    if chunk.len() as u64 > policy.max_chunk_bytes {
        return Err(Error::invalid_field(
            "chunk",
            format!("a chunk may be at most {} bytes", policy.max_chunk_bytes),
        ));
    }
    *chunks += 1;
    if *chunks > max_chunks {
        return Err(Error::invalid(
            Reason::TooManyChunks,
            format!(
                "an upload of {declared_size} bytes may be sent in at most {max_chunks} chunks; send larger chunks"
            ),
        )
        .with_field("chunk")
        .with_metadata("max_chunks", max_chunks.to_string())
        .with_metadata("min_chunk_bytes", policy.min_chunk_bytes.to_string()));
    }
    Ok(())
}

fn validate_file_name(raw: &str) -> Result<String> {
    let chars = raw.chars().count();
    if chars == 0 || chars > MAX_FILE_NAME_CHARS {
        return Err(Error::invalid_field(
            "file_name",
            format!("file_name must be 1 to {MAX_FILE_NAME_CHARS} characters"),
        ));
    }
    if raw.contains(['/', '\\']) || raw.chars().any(char::is_control) || raw == "." || raw == ".." {
        return Err(Error::invalid_field(
            "file_name",
            "file_name must not contain path separators or control characters",
        ));
    }
    Ok(raw.to_owned())
}

/// `attachment; filename*=UTF-8''<percent-encoded>` (RFC 6266 / 5987), so browsers download
/// rather than render, whatever the name's characters.
pub fn attachment_disposition(file_name: &str) -> String {
    const ATTR_CHAR: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'!')
        .remove(b'#')
        .remove(b'$')
        .remove(b'&')
        .remove(b'+')
        .remove(b'-')
        .remove(b'.')
        .remove(b'^')
        .remove(b'_')
        .remove(b'`')
        .remove(b'|')
        .remove(b'~');
    format!(
        "attachment; filename*=UTF-8''{}",
        percent_encoding::utf8_percent_encode(file_name, ATTR_CHAR)
    )
}

pub fn blob_key(area: &str, conversation_id: ConversationId, file_id: &FileId) -> String {
    format!("{area}/{conversation_id}/{file_id}")
}

/// At most `max_chars` characters of `text`, for quoting caller input.
pub(super) fn truncated(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

pub(super) fn size_mismatch(message: String) -> Error {
    Error::invalid(Reason::SizeMismatch, message).with_field("size_bytes")
}

fn file_not_found() -> Error {
    Error::not_found(Reason::FileNotFound, "file not found").with_field("file_id")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that always has its next chunk ready (the server is the slow side) still ends
    /// at `uploads.max_duration`.
    #[tokio::test]
    async fn a_stream_that_is_always_ready_still_ends_at_its_max_duration() {
        let settings = crate::config::UploadSettings {
            max_duration: Duration::from_millis(200),
            ..Default::default()
        };
        let policy = UploadPolicy::from_settings(&settings);
        let always_ready =
            futures::stream::repeat_with(|| Ok(UploadPart::Chunk(Bytes::from_static(b"x"))));
        let mut parts = TimedParts::new(always_ready, &policy);
        assert!(matches!(parts.next().await, Some(Ok(UploadPart::Chunk(_)))));
        tokio::time::sleep(Duration::from_millis(250)).await;
        let error = parts.next().await.expect("an error").unwrap_err();
        assert_eq!(error.reason, Reason::UploadTooLong, "{error:?}");
        assert!(parts.next().await.is_none());
    }

    #[test]
    fn dispositions_are_rfc_5987_encoded() {
        assert_eq!(
            attachment_disposition("report 2024.pdf"),
            "attachment; filename*=UTF-8''report%202024.pdf"
        );
        assert_eq!(
            attachment_disposition("naïve\"; x=y.txt"),
            "attachment; filename*=UTF-8''na%C3%AFve%22%3B%20x%3Dy.txt"
        );
    }

    #[test]
    fn file_names_are_checked() {
        assert!(validate_file_name("notes.txt").is_ok());
        assert!(validate_file_name("").is_err());
        assert!(validate_file_name("../etc/passwd").is_err());
        assert!(validate_file_name("a\\b.txt").is_err());
        assert!(validate_file_name("bell\u{7}.txt").is_err());
        assert!(validate_file_name(&"x".repeat(256)).is_err());
    }
}
