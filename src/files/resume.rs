//! Resumable uploads: an UploadFile whose metadata carries a `request_id`.
//!
//! Such an upload has a session ([`crate::store::upload_sessions`]) that any replica sees. Its
//! bytes are staged in the blob store in parts of `uploads.part_size` ([`ResumableUpload`]);
//! each part that becomes durable is a checkpoint: the session records it with the SHA-256 and
//! content-check state reached at its end ([`ReceiveCheckpoint`]). An interrupted upload
//! continues from the last checkpoint, on any replica, after a restart too: the client resends
//! from `committed_size` (or from 0; what is already durable is skipped), and the checks run on
//! exactly as if the stream had never broken, so validation is that of a one-shot upload.
//!
//! One stream writes a session at a time: it holds the session's lease, renewed every third of
//! `uploads.idle_timeout` while it works and released when it stops; a replica that dies loses
//! it within the idle timeout. Every session update is fenced by the lease.
//!
//! How an attempt ends:
//! - complete: the object is committed, the file recorded and announced (under the ids chosen
//!   when the session began, so a repeat finds the same), the session marked complete;
//! - the content proved invalid (wrong type, bad structure, size or checksum mismatch, an
//!   undecodable image): the staged bytes and the session are removed, like a one-shot
//!   upload's;
//! - anything else (the stream broke or went idle, a backend failed, memory was busy): the
//!   parts durable so far are recorded and the lease released; nothing stays in memory.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{
    digest::{ResumableSha256, Sha256Checkpoint},
    policy::FileCategory,
    service::{
        FileService, ReceivedBody, SHA256_METADATA, Start, UploadPart, UploadPlan, UploadRequest,
        UploadResume, Written, blob_key, check_chunk, closing_checks, hex, metadata_again,
        size_mismatch, truncated,
    },
    sniff::{ContentSniffer, SnifferCheckpoint},
};
use crate::{
    auth::Caller,
    budget::MemoryReservation,
    error::{Error, ErrorKind, Reason, Result},
    ids::{MessageId, UserId},
    messaging::model::{ClientId, Message, UnixMillis, now_millis},
    store::{
        blobs::{BlobError, ResumableUpload, StagedParts},
        file_records::FileRecord,
        messages::StoreError,
        upload_sessions::{
            DeclaredUpload, Lease, Opened, SessionError, UploadSession, UploadSessionStore,
        },
    },
};

/// The upload's state after a whole number of parts: what a session's checkpoint holds.
#[derive(Serialize, Deserialize)]
struct ReceiveCheckpoint {
    sha256: Sha256Checkpoint,
    sniffer: SnifferCheckpoint,
}

impl ReceiveCheckpoint {
    fn encode(&self) -> String {
        serde_json::to_string(self).expect("a checkpoint always serializes")
    }

    fn decode(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|error| {
            Error::internal(format!(
                "an upload session's checkpoint is unreadable: {error}"
            ))
        })
    }
}

/// What a GetUploadStatus reports.
#[derive(Debug, Clone)]
pub struct UploadStatus {
    pub committed_size: u64,
    pub size_bytes: u64,
    pub complete: bool,
    pub file: Option<FileRecord>,
    pub expire_time: UnixMillis,
}

impl FileService {
    /// Receives (or continues, or finds the result of) a resumable upload; see the module docs.
    pub(super) async fn upload_resumable<S>(
        &self,
        caller: &Caller,
        start: Start,
        mut parts: S,
    ) -> Result<(FileRecord, Message)>
    where
        S: Stream<Item = Result<UploadPart>> + Unpin + Send,
    {
        let holder = uuid::Uuid::now_v7().simple().to_string();
        let lease_length = self.policy.idle_timeout;
        let lease = Lease {
            holder: &holder,
            until: now_millis() + millis(lease_length),
        };
        let (session, write_offset) = match start {
            Start::Declared(request) => (self.open_session(caller, request, lease).await?, 0),
            Start::Resume(resume) => self.resume_session(caller, &resume, lease).await?,
        };
        if session.complete {
            return self.completed(caller, &session).await;
        }
        let held = HeldLease::start(self.sessions.clone(), &session, holder, lease_length);
        let result = self
            .continue_upload(caller, session, write_offset, &mut parts, &held)
            .await;
        held.release().await;
        result
    }

    /// Creates the session of a newly declared upload, or finds the one the request id names
    /// (which must declare the same).
    async fn open_session(
        &self,
        caller: &Caller,
        request: UploadRequest,
        lease: Lease<'_>,
    ) -> Result<UploadSession> {
        let request_id = ClientId::from_field("request_id", &request.request_id)?;
        let plan = self.plan(caller, request).await?;
        let declared = declared_upload(&plan);
        let now = now_millis();
        let new = UploadSession {
            owner: caller.user_id.clone(),
            request_id: request_id.as_str().to_owned(),
            declared: declared.clone(),
            blob_key: blob_key("files", plan.conversation_id, &plan.file_id),
            file_id: plan.file_id,
            message_id: MessageId::generate(),
            part_size: self.policy.resume_part_bytes,
            staged: StagedParts::default(),
            committed_size: 0,
            checkpoint: None,
            create_time: now,
            expire_time: now + millis(self.policy.session_ttl),
            complete: false,
        };
        let opened = self
            .sessions
            .open(&new, lease, now, self.policy.max_sessions_per_caller)
            .await
            .map_err(|error| self.session_error(caller, error))?;
        match opened {
            Opened::Created => Ok(new),
            Opened::Existing(existing) if existing.declared == declared => Ok(existing),
            Opened::Existing(existing) => {
                if !existing.complete {
                    self.release_quietly(&existing, lease.holder).await;
                }
                Err(Error::new(
                    ErrorKind::AlreadyExists,
                    Reason::RequestIdReused,
                    "this request_id already names an upload with different metadata",
                )
                .with_field("request_id"))
            }
        }
    }

    /// The session a resume names, with the caller still a participant and the offset within
    /// what is durable.
    async fn resume_session(
        &self,
        caller: &Caller,
        resume: &UploadResume,
        lease: Lease<'_>,
    ) -> Result<(UploadSession, u64)> {
        let request_id = ClientId::from_field("request_id", &resume.request_id)?;
        let write_offset = u64::try_from(resume.write_offset).map_err(|_| {
            Error::invalid_field("write_offset", "write_offset must not be negative")
        })?;
        let session = self
            .sessions
            .acquire(&caller.user_id, request_id.as_str(), lease, now_millis())
            .await
            .map_err(|error| self.session_error(caller, error))?
            .ok_or_else(upload_not_found)?;
        let checked = async {
            self.conversations
                .conversation_of_participant(caller, session.declared.conversation_id)
                .await?;
            if !session.complete && write_offset > session.committed_size {
                return Err(Error::new(
                    ErrorKind::OutOfRange,
                    Reason::WriteOffsetAhead,
                    format!(
                        "write_offset {write_offset} is past the {} bytes the server has; resume from committed_size",
                        session.committed_size
                    ),
                )
                .with_field("write_offset")
                .with_metadata("committed_size", session.committed_size.to_string()));
            }
            Ok(())
        };
        if let Err(error) = checked.await {
            if !session.complete {
                self.release_quietly(&session, lease.holder).await;
            }
            return Err(error);
        }
        Ok((session, write_offset))
    }

    /// The file and message of a completed upload, for a repeat of it.
    async fn completed(
        &self,
        caller: &Caller,
        session: &UploadSession,
    ) -> Result<(FileRecord, Message)> {
        let record = self.get_file(caller, &session.file_id).await?;
        let message = self
            .conversations
            .message_of_participant(caller, record.conversation_id, session.message_id)
            .await?;
        Ok((record, message))
    }

    /// Receives the rest of the content and completes the upload, or records how far it got.
    async fn continue_upload<S>(
        &self,
        caller: &Caller,
        mut session: UploadSession,
        write_offset: u64,
        parts: &mut S,
        held: &HeldLease,
    ) -> Result<(FileRecord, Message)>
    where
        S: Stream<Item = Result<UploadPart>> + Unpin + Send,
    {
        let plan = self.plan_of(&session)?;
        let mut receiver = Receiver::new(self, &session, &plan)?;
        let mut upload = self
            .blobs
            .resume_upload(
                &session.blob_key,
                plan.attributes(),
                session.part_size,
                session.staged.clone(),
            )
            .await?;
        let received = receiver
            .receive(
                self,
                &mut session,
                write_offset,
                parts,
                upload.as_mut(),
                held,
            )
            .await;
        match received {
            Ok(sha256) => {
                let finished = self
                    .finish(caller, &plan, &mut session, receiver, upload, sha256, held)
                    .await;
                if let Err(error) = &finished
                    && error.kind != ErrorKind::Aborted
                {
                    // Past the commit nothing can be resumed: the upload is undone whole.
                    self.discard(&session).await;
                }
                finished
            }
            Err(error) if proves_content_invalid(&error) => {
                // Through the upload: it also knows parts no session recorded yet.
                if let Err(abort_error) = upload.abort().await {
                    tracing::warn!(error = %abort_error, "aborting a refused upload failed");
                }
                self.discard(&session).await;
                Err(error)
            }
            Err(error) => {
                // The caller learns why the stream ended; failing to keep its progress is the
                // operator's to see (the upload then resumes from the last recorded part).
                let recorded = match upload.pause().await {
                    Ok(staged) => receiver.record(self, &mut session, staged, held).await,
                    Err(pause_error) => Err(pause_error.into()),
                };
                if let Err(record_error) = recorded {
                    tracing::warn!(error = %record_error, "could not record a paused upload's parts");
                }
                Err(error)
            }
        }
    }

    /// Completes a fully received upload: its closing checks, the object, the thumbnail, the
    /// record and the message, then the session.
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        caller: &Caller,
        plan: &UploadPlan,
        session: &mut UploadSession,
        receiver: Receiver,
        upload: Box<dyn ResumableUpload>,
        sha256: String,
        held: &HeldLease,
    ) -> Result<(FileRecord, Message)> {
        let Receiver { sniffer, .. } = receiver;
        let dimensions = match closing_checks(plan, sniffer, &sha256) {
            Ok(dimensions) => dimensions,
            Err(error) => {
                if let Err(abort_error) = upload.abort().await {
                    tracing::warn!(error = %abort_error, "aborting a refused upload failed");
                }
                return Err(error);
            }
        };
        upload
            .commit(vec![(SHA256_METADATA.to_owned(), sha256.clone())])
            .await?;
        let mut written = Written::default();
        written.blobs.push(session.blob_key.clone());
        let announced = self
            .announce_committed(caller, plan, session, sha256, dimensions, &mut written)
            .await;
        let (record, message) = match announced {
            Ok(done) => done,
            Err(error) => {
                self.remove(written).await;
                return Err(error);
            }
        };
        session.complete = true;
        session.committed_size = plan.declared_size;
        session.checkpoint = None;
        if let Err(error) = self.sessions.update(session, held.lease()).await {
            // Stored and announced: a repeat would not find the result, but nothing is lost.
            tracing::warn!(%error, "could not mark a resumable upload complete");
        }
        Ok((record, message))
    }

    /// The steps after the object is committed: an image's thumbnail, the record and the
    /// message. Each notes in `written` what it stored.
    async fn announce_committed(
        &self,
        caller: &Caller,
        plan: &UploadPlan,
        session: &UploadSession,
        sha256: String,
        dimensions: (u32, u32),
        written: &mut Written,
    ) -> Result<(FileRecord, Message)> {
        let mut body = ReceivedBody {
            key: session.blob_key.clone(),
            sha256,
            dimensions,
        };
        let mut thumbnail_key = None;
        if plan.rule.kind.category() == FileCategory::Image {
            // Reserved until the thumbnail is made (the bytes live that long).
            let (bytes, _reservation) = self
                .read_back(&session.blob_key, plan.declared_size)
                .await?;
            if let Some(thumbnail) = self.thumbnails.make(plan.rule.kind, bytes).await? {
                // FileInfo reports an image as displayed, after its EXIF orientation.
                body.dimensions = (thumbnail.source_width, thumbnail.source_height);
                thumbnail_key = Some(self.store_thumbnail(plan, thumbnail, written).await?);
            }
        }
        self.record_and_announce(
            caller,
            plan,
            session.message_id,
            body,
            thumbnail_key,
            written,
        )
        .await
    }

    /// An image's bytes, read back from the committed object for its thumbnail (a resumed
    /// upload never had them all in memory), with their memory reserved from the upload budget
    /// before they are allocated; the reservation is held as long as the bytes are.
    async fn read_back(&self, key: &str, size: u64) -> Result<(Bytes, MemoryReservation)> {
        let reservation = self.budget.reserve(size).await.map_err(BlobError::Busy)?;
        let capacity = usize::try_from(size).unwrap_or(usize::MAX);
        let mut bytes = BytesMut::with_capacity(capacity);
        let mut stream = self.blobs.read(key, 0).await?;
        while let Some(piece) = stream.next().await {
            let piece = piece?;
            if bytes.len() + piece.len() > capacity {
                return Err(Error::internal(
                    "a stored upload is larger than the size it was checked against",
                ));
            }
            bytes.extend_from_slice(&piece);
        }
        Ok((bytes.freeze(), reservation))
    }

    /// Removes a refused upload's staged bytes and its session.
    async fn discard(&self, session: &UploadSession) {
        if let Err(error) = self
            .blobs
            .discard_staged(&session.blob_key, &session.staged)
            .await
        {
            tracing::warn!(%error, "could not discard a refused upload's staged bytes");
        }
        if let Err(error) = self
            .sessions
            .remove(&session.owner, &session.request_id)
            .await
        {
            tracing::warn!(%error, "could not remove a refused upload's session");
        }
    }

    async fn release_quietly(&self, session: &UploadSession, holder: &str) {
        if let Err(error) = self
            .sessions
            .release(&session.owner, &session.request_id, holder)
            .await
        {
            tracing::warn!(%error, "could not release an upload session's lease");
        }
    }

    /// The plan of a session's upload, checked against today's policy.
    fn plan_of(&self, session: &UploadSession) -> Result<UploadPlan> {
        let declared = &session.declared;
        let rule = self
            .policy
            .rule_for(&declared.content_type)
            .cloned()
            .filter(|rule| declared.size_bytes <= rule.max_size_bytes)
            .ok_or_else(|| {
                Error::invalid(
                    Reason::UnsupportedType,
                    "the upload's type or size is no longer accepted",
                )
                .with_field("content_type")
            })?;
        Ok(UploadPlan {
            conversation_id: declared.conversation_id,
            file_id: session.file_id.clone(),
            content_type: rule.kind.mime_type().to_owned(),
            rule,
            file_name: declared.file_name.clone(),
            declared_size: declared.size_bytes,
            expected_sha256: declared.sha256.clone(),
            caption: declared.caption.clone(),
        })
    }

    fn session_error(&self, caller: &Caller, error: SessionError) -> Error {
        match error {
            SessionError::Busy | SessionError::LeaseLost => upload_in_progress(),
            SessionError::TooMany { limit } => Error::new(
                ErrorKind::ResourceExhausted,
                Reason::TooManyUploadSessions,
                format!(
                    "at most {limit} resumable uploads per caller may be unfinished; complete one or let it expire"
                ),
            )
            .with_metadata("max_upload_sessions", limit.to_string())
            .with_quota_violation(
                format!("user:{}", truncated(caller.user_id.as_str(), 64)),
                format!("uploads.max_sessions_per_caller: {limit} unfinished uploads"),
            ),
            SessionError::Store(error) => error.into(),
        }
    }

    /// How far the caller's resumable upload `request_id` got.
    pub async fn upload_status(&self, caller: &Caller, request_id: &str) -> Result<UploadStatus> {
        let request_id = ClientId::from_field("request_id", request_id)?;
        let session = self
            .sessions
            .get(&caller.user_id, request_id.as_str(), now_millis())
            .await?
            .ok_or_else(upload_not_found)?;
        self.conversations
            .conversation_of_participant(caller, session.declared.conversation_id)
            .await?;
        let file = if session.complete {
            Some(self.get_file(caller, &session.file_id).await?)
        } else {
            None
        };
        Ok(UploadStatus {
            committed_size: session.committed_size,
            size_bytes: session.declared.size_bytes,
            complete: session.complete,
            file,
            expire_time: session.expire_time,
        })
    }

    /// Discards up to `limit` expired unfinished uploads (their staged bytes and sessions);
    /// returns how many.
    pub async fn expire_sessions(&self, limit: usize) -> Result<usize, StoreError> {
        let expired = self.sessions.expired(now_millis(), limit).await?;
        let count = expired.len();
        for session in expired {
            self.discard(&session).await;
        }
        Ok(count)
    }
}

/// The receiving state of one attempt: the checks and hash carried on from the session's
/// checkpoint, and the checkpoints of parts not yet durable.
struct Receiver {
    sniffer: ContentSniffer,
    hasher: ResumableSha256,
    part_size: u64,
    declared_size: u64,
    /// Checkpoints at part boundaries not yet recorded, by the number of parts they follow.
    pending: VecDeque<(usize, String)>,
}

impl Receiver {
    fn new(service: &FileService, session: &UploadSession, plan: &UploadPlan) -> Result<Self> {
        let kind = plan.rule.kind;
        let max_pixels = service.policy.max_image_pixels;
        let (sniffer, hasher) = match &session.checkpoint {
            Some(text) => {
                let checkpoint = ReceiveCheckpoint::decode(text)?;
                (
                    ContentSniffer::resume(kind, max_pixels, checkpoint.sniffer),
                    ResumableSha256::resume(&checkpoint.sha256),
                )
            }
            None => (
                ContentSniffer::new(kind, max_pixels),
                ResumableSha256::new(),
            ),
        };
        if hasher.len() != session.committed_size {
            return Err(Error::internal(format!(
                "an upload session's checkpoint covers {} bytes, not its committed {}",
                hasher.len(),
                session.committed_size
            )));
        }
        Ok(Self {
            sniffer,
            hasher,
            part_size: session.part_size.max(1),
            declared_size: plan.declared_size,
            pending: VecDeque::new(),
        })
    }

    /// Reads the stream to its end, feeding what is not durable yet to the checks, the hash
    /// and the upload (cut at part boundaries, where checkpoints are taken) and recording the
    /// parts that become durable. Returns the SHA-256 of the whole content.
    async fn receive<S>(
        &mut self,
        service: &FileService,
        session: &mut UploadSession,
        write_offset: u64,
        parts: &mut S,
        upload: &mut dyn ResumableUpload,
        held: &HeldLease,
    ) -> Result<String>
    where
        S: Stream<Item = Result<UploadPart>> + Unpin + Send,
    {
        let policy = &service.policy;
        let max_chunks = policy.max_chunks(self.declared_size);
        let mut chunks = 0;
        // The client's offset of the next byte it sends, and the bytes fed so far.
        let mut position = write_offset;
        let mut fed = session.committed_size;
        loop {
            let part = tokio::select! {
                part = parts.next() => part,
                finished = upload.wait_durable() => {
                    finished?;
                    self.record_durable(service, session, upload, held).await?;
                    continue;
                }
                () = held.lost.cancelled() => return Err(upload_in_progress()),
            };
            let Some(part) = part else { break };
            let mut chunk = match part? {
                UploadPart::Chunk(chunk) => chunk,
                UploadPart::Metadata(_) | UploadPart::Resume(_) => return Err(metadata_again()),
            };
            check_chunk(policy, self.declared_size, &chunk, &mut chunks, max_chunks)?;
            let end = position + chunk.len() as u64;
            if end <= fed {
                // Already durable: skipped, not stored twice.
                position = end;
                continue;
            }
            chunk.advance(usize::try_from(fed - position).unwrap_or(usize::MAX));
            if fed + chunk.len() as u64 > self.declared_size {
                return Err(size_mismatch(format!(
                    "more bytes arrived than the declared size_bytes {}",
                    self.declared_size
                )));
            }
            while !chunk.is_empty() {
                let boundary = (fed / self.part_size + 1) * self.part_size;
                let take = usize::try_from(boundary - fed)
                    .unwrap_or(usize::MAX)
                    .min(chunk.len());
                let piece = chunk.split_to(take);
                self.sniffer.feed(&piece)?;
                self.hasher.update(&piece);
                upload.write(piece).await?;
                fed += take as u64;
                if fed.is_multiple_of(self.part_size) {
                    self.take_checkpoint(fed)?;
                }
            }
            position = fed;
            self.record_durable(service, session, upload, held).await?;
        }
        if fed != self.declared_size {
            return Err(Error::new(
                ErrorKind::FailedPrecondition,
                Reason::SizeMismatch,
                format!(
                    "the stream ended after {fed} of the declared {} bytes; the upload can be resumed",
                    self.declared_size
                ),
            )
            .with_field("size_bytes"));
        }
        Ok(hex(&self.hasher.clone().finalize()))
    }

    fn take_checkpoint(&mut self, fed: u64) -> Result<()> {
        let sha256 = self.hasher.checkpoint().ok_or_else(|| {
            Error::internal("a part boundary that is not a SHA-256 block boundary")
        })?;
        let checkpoint = ReceiveCheckpoint {
            sha256,
            sniffer: self.sniffer.checkpoint(),
        };
        let parts = usize::try_from(fed / self.part_size).unwrap_or(usize::MAX);
        self.pending.push_back((parts, checkpoint.encode()));
        Ok(())
    }

    async fn record_durable(
        &mut self,
        service: &FileService,
        session: &mut UploadSession,
        upload: &mut dyn ResumableUpload,
        held: &HeldLease,
    ) -> Result<()> {
        match upload.take_durable() {
            Some(staged) => self.record(service, session, staged, held).await,
            None => Ok(()),
        }
    }

    /// Records in the session that `staged` is durable, with the checkpoint at its end.
    async fn record(
        &mut self,
        service: &FileService,
        session: &mut UploadSession,
        staged: StagedParts,
        held: &HeldLease,
    ) -> Result<()> {
        let parts = staged.parts.len();
        if parts <= session.staged.parts.len() {
            return Ok(());
        }
        while self.pending.front().is_some_and(|(at, _)| *at < parts) {
            self.pending.pop_front();
        }
        let Some((_, checkpoint)) = self.pending.pop_front().filter(|(at, _)| *at == parts) else {
            return Err(Error::internal(format!(
                "no checkpoint was taken after part {parts}"
            )));
        };
        session.staged = staged;
        session.committed_size = parts as u64 * self.part_size;
        session.checkpoint = Some(checkpoint);
        service
            .sessions
            .update(session, held.lease())
            .await
            .map_err(|error| match error {
                SessionError::Store(error) => error.into(),
                _ => upload_in_progress(),
            })
    }
}

/// A writer's lease on a session, renewed in the background every third of its length until
/// released (or dropped); `lost` fires when a renewal finds it taken.
struct HeldLease {
    sessions: Arc<dyn UploadSessionStore>,
    owner: UserId,
    request_id: String,
    holder: String,
    length: Duration,
    lost: CancellationToken,
    renewer: tokio::task::JoinHandle<()>,
    released: bool,
}

impl HeldLease {
    fn start(
        sessions: Arc<dyn UploadSessionStore>,
        session: &UploadSession,
        holder: String,
        length: Duration,
    ) -> Self {
        let lost = CancellationToken::new();
        let renewer = {
            let sessions = sessions.clone();
            let owner = session.owner.clone();
            let request_id = session.request_id.clone();
            let holder = holder.clone();
            let lost = lost.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(length / 3).await;
                    let lease = Lease {
                        holder: &holder,
                        until: now_millis() + millis(length),
                    };
                    match sessions.renew(&owner, &request_id, lease).await {
                        Ok(()) => {}
                        Err(SessionError::Store(error)) => {
                            tracing::warn!(%error, "could not renew an upload session's lease");
                        }
                        Err(_) => {
                            lost.cancel();
                            return;
                        }
                    }
                }
            })
        };
        Self {
            sessions,
            owner: session.owner.clone(),
            request_id: session.request_id.clone(),
            holder,
            length,
            lost,
            renewer,
            released: false,
        }
    }

    fn lease(&self) -> Lease<'_> {
        Lease {
            holder: &self.holder,
            until: now_millis() + millis(self.length),
        }
    }

    async fn release(mut self) {
        self.renewer.abort();
        self.released = true;
        if let Err(error) = self
            .sessions
            .release(&self.owner, &self.request_id, &self.holder)
            .await
        {
            tracing::warn!(%error, "could not release an upload session's lease");
        }
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        self.renewer.abort();
        if self.released {
            return;
        }
        // Dropped with its call (the client went away): let the next writer in at once.
        let sessions = self.sessions.clone();
        let (owner, request_id, holder) = (
            self.owner.clone(),
            self.request_id.clone(),
            self.holder.clone(),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = sessions.release(&owner, &request_id, &holder).await;
            });
        }
    }
}

/// Errors that prove the content itself wrong: resuming cannot fix them.
fn proves_content_invalid(error: &Error) -> bool {
    error.kind == ErrorKind::InvalidArgument
        && matches!(
            error.reason,
            Reason::ContentTypeMismatch
                | Reason::ImageTooLarge
                | Reason::ImageUndecodable
                | Reason::ImageTooComplex
                | Reason::ImageTooLargeToDecode
                | Reason::SizeMismatch
                | Reason::ChecksumMismatch
                | Reason::MalformedDocument
        )
}

fn declared_upload(plan: &UploadPlan) -> DeclaredUpload {
    DeclaredUpload {
        conversation_id: plan.conversation_id,
        file_name: plan.file_name.clone(),
        content_type: plan.content_type.clone(),
        size_bytes: plan.declared_size,
        sha256: plan.expected_sha256.clone(),
        caption: plan.caption.clone(),
    }
}

fn upload_not_found() -> Error {
    Error::not_found(
        Reason::UploadNotFound,
        "no upload of yours has this request_id (it may have expired)",
    )
    .with_field("request_id")
}

fn upload_in_progress() -> Error {
    Error::new(
        ErrorKind::Aborted,
        Reason::UploadInProgress,
        "another stream is writing this upload; retry when it has stopped",
    )
    .with_field("request_id")
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
