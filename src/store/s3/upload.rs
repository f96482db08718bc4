//! One streamed write to S3: bytes are buffered into parts of `part_size`; an object that fits in
//! one part is sent with a single PutObject on commit, a larger one becomes a multipart upload
//! whose parts leave while the next one fills, at most `parts_in_flight` at a time.
//!
//! When the object's size is known from the start and it needs more than one part, every part's
//! length is known too: its UploadPart request starts once the part holds more than its first
//! bytes (1 MiB; a stream that stalls earlier holds no request open) and its body is fed as bytes
//! arrive (see [`super::part_body`]): S3 hardly waits for a part to fill, and no byte is copied.
//! The chunks stay referenced until S3 has the part, so a failed streamed attempt is sent again
//! from them.
//!
//! Metadata known only at the commit (the sha256 of the bytes) goes into the PutObject; a multipart
//! upload was created before it was known, so once completed the object gets it through a
//! server-side copy onto itself (`x-amz-metadata-directive: REPLACE`; no bytes travel), and is
//! deleted again if that fails.
//!
//! Memory: a part buffer's reservation from the process-wide [`MemoryBudget`] follows the bytes
//! written into it (its first bytes unit by unit, then the whole part; never ahead of the bytes)
//! and is kept until that part is uploaded, so one upload holds at most
//! `(parts_in_flight + 1) x part_size`, a stalled one little more than what it was sent, and all
//! uploads together stay within the budget.

use std::{collections::HashMap, future::Future, sync::Arc};

use async_trait::async_trait;
use aws_sdk_s3::{
    Client,
    operation::upload_part::builders::UploadPartFluentBuilder,
    primitives::{ByteStream, SdkBody},
    types::{CompletedMultipartUpload, CompletedPart, MetadataDirective},
};
use bytes::{Bytes, BytesMut};
use tokio::{
    sync::{mpsc, oneshot},
    task::{JoinError, JoinHandle, JoinSet},
};

use super::{
    errors::{Scope, has_code, map_sdk_error},
    part_body::{KeptChunks, PartFeed},
};
use crate::{
    budget::{FIRST_BYTES_LIMIT, MemoryBudget, MemoryReservation},
    store::blobs::{
        BlobAttributes, BlobError, BlobResult, BlobUpload, ResumableUpload, StagedParts,
    },
};

/// S3 refuses part numbers above this.
const MAX_PARTS: i32 = 10_000;

/// Where objects go: the client and the bucket, shared by the store and its uploads.
#[derive(Debug)]
pub(super) struct Bucket {
    pub(super) client: Client,
    pub(super) name: String,
}

impl Bucket {
    /// Writes a whole object in one request.
    pub(super) async fn put_object(
        &self,
        key: &str,
        attributes: &BlobAttributes,
        bytes: Bytes,
    ) -> BlobResult<()> {
        self.client
            .put_object()
            .bucket(&self.name)
            .key(key)
            .content_type(&attributes.content_type)
            .content_disposition(&attributes.content_disposition)
            .set_metadata(metadata(attributes))
            .content_length(i64::try_from(bytes.len()).unwrap_or(i64::MAX))
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|error| map_sdk_error("PutObject", Scope::Object, error))?;
        Ok(())
    }

    /// Replaces the headers and metadata of an existing object with `attributes`: a server-side
    /// copy of the object onto itself (S3 copies objects of up to 5 GiB this way).
    pub(super) async fn replace_attributes(
        &self,
        key: &str,
        attributes: &BlobAttributes,
    ) -> BlobResult<()> {
        self.client
            .copy_object()
            .bucket(&self.name)
            .key(key)
            .copy_source(copy_source(&self.name, key))
            .metadata_directive(MetadataDirective::Replace)
            .content_type(&attributes.content_type)
            .content_disposition(&attributes.content_disposition)
            .set_metadata(metadata(attributes))
            .send()
            .await
            // A 404 here is the object removed under us: this write is lost, a new one may work.
            .map_err(|error| map_sdk_error("CopyObject", Scope::Upload, error))?;
        Ok(())
    }

    /// Removes an object; one that is already gone is fine.
    pub(super) async fn delete_object(&self, key: &str) -> BlobResult<()> {
        match self
            .client
            .delete_object()
            .bucket(&self.name)
            .key(key)
            .send()
            .await
            .map_err(|error| map_sdk_error("DeleteObject", Scope::Object, error))
        {
            Ok(_) | Err(BlobError::NotFound) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Discards a multipart upload and its parts; one that is already gone is fine.
    pub(super) async fn abort_multipart(&self, key: &str, upload_id: &str) -> BlobResult<()> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.name)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(error) if has_code(&error, "NoSuchUpload") => Ok(()),
            Err(error) => Err(map_sdk_error("AbortMultipartUpload", Scope::Upload, error)),
        }
    }
}

fn metadata(attributes: &BlobAttributes) -> Option<HashMap<String, String>> {
    (!attributes.metadata.is_empty()).then(|| attributes.metadata.iter().cloned().collect())
}

/// `x-amz-copy-source`: the bucket and the URL-encoded key.
fn copy_source(bucket: &str, key: &str) -> String {
    const KEY: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'/')
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    format!(
        "{bucket}/{}",
        percent_encoding::utf8_percent_encode(key, KEY)
    )
}

/// The part being filled, with the memory reserved for it.
struct PartBuffer {
    bytes: BytesMut,
    reservation: MemoryReservation,
}

/// A part of an object of known size: its bytes go to its request as they arrive.
struct StreamingPart {
    length: usize,
    filled: usize,
    /// The part's chunks so far (references, not copies), with the memory reserved for them:
    /// kept until S3 has the part, to send it again if the streamed attempt fails.
    kept: Vec<Bytes>,
    reservation: MemoryReservation,
    /// Its UploadPart request, once started.
    request: Option<PartRequest>,
}

/// The writer's end of a part's request.
struct PartRequest {
    /// The streamed attempt's body; `None` once that attempt failed.
    feed: Option<mpsc::UnboundedSender<Bytes>>,
    /// Gives the kept chunks and their reservation to the request once the part is complete.
    handover: oneshot::Sender<(Vec<Bytes>, MemoryReservation)>,
}

impl PartRequest {
    fn feed(&mut self, chunk: Bytes) {
        if let Some(feed) = &self.feed
            && feed.send(chunk).is_err()
        {
            // The streamed attempt failed already; the part goes again from what is kept.
            self.feed = None;
        }
    }
}

enum Multipart {
    /// Everything written so far fits in one part: no request sent yet.
    NotStarted,
    /// CreateMultipartUpload is on its way. Its task is kept (not just awaited) so that an upload
    /// dropped during the wait can still abort what the server creates.
    Creating(JoinHandle<BlobResult<String>>),
    Open(OpenMultipart),
}

struct OpenMultipart {
    upload_id: String,
    next_part_number: i32,
    /// Part uploads in flight; each owns its bytes and their memory reservation.
    in_flight: JoinSet<BlobResult<CompletedPart>>,
    completed: Vec<CompletedPart>,
}

impl OpenMultipart {
    /// Records the part uploads that already finished, so a failed one surfaces at the next
    /// write rather than at the commit.
    fn collect_finished(&mut self) -> BlobResult<()> {
        while let Some(joined) = self.in_flight.try_join_next() {
            self.completed.push(joined.map_err(task_failed)??);
        }
        Ok(())
    }

    /// Waits for one part upload to finish and records it.
    async fn join_one(&mut self) -> BlobResult<()> {
        if let Some(joined) = self.in_flight.join_next().await {
            self.completed.push(joined.map_err(task_failed)??);
        }
        Ok(())
    }
}

/// How an upload buffers its parts: their size, how many may be uploading at once, and the
/// budget their memory is reserved from.
#[derive(Clone)]
pub(super) struct PartBuffering {
    pub(super) part_size: usize,
    pub(super) parts_in_flight: usize,
    pub(super) budget: Arc<MemoryBudget>,
}

pub(super) struct S3Upload {
    bucket: Arc<Bucket>,
    key: String,
    attributes: BlobAttributes,
    parts: PartBuffering,
    part: Option<PartBuffer>,
    /// The part being streamed (objects of a known size above one part), and where the next
    /// one starts in the object.
    streaming: Option<StreamingPart>,
    next_part_start: u64,
    multipart: Multipart,
    /// Set while a call is running and left set when it fails (or is cancelled half-way), so a
    /// later write or commit cannot produce an object with a hole in it.
    poisoned: bool,
    /// The multipart upload was completed: the object is visible under the key, so undoing the
    /// write now means deleting it.
    completed: bool,
    /// Committed or aborted: nothing left for `Drop` to clean up.
    finished: bool,
    /// A resumable write: its durable parts outlive it (dropping it or a failed commit does
    /// not abort the multipart upload), and `reported_parts` of them were taken as durable.
    resumable: bool,
    reported_parts: usize,
}

impl S3Upload {
    pub(super) fn new(
        bucket: Arc<Bucket>,
        key: String,
        attributes: BlobAttributes,
        parts: PartBuffering,
    ) -> Self {
        Self {
            bucket,
            key,
            attributes,
            parts,
            part: None,
            streaming: None,
            next_part_start: 0,
            multipart: Multipart::NotStarted,
            poisoned: false,
            completed: false,
            finished: false,
            resumable: false,
            reported_parts: 0,
        }
    }

    /// A resumable write continuing after the durable parts `staged` names.
    pub(super) fn resumed(
        bucket: Arc<Bucket>,
        key: String,
        attributes: BlobAttributes,
        parts: PartBuffering,
        staged: StagedParts,
    ) -> Self {
        let mut upload = Self::new(bucket, key, attributes, parts);
        upload.resumable = true;
        upload.reported_parts = staged.parts.len();
        upload.next_part_start = staged.parts.len() as u64 * upload.parts.part_size as u64;
        if let Some(upload_id) = staged.upload_id {
            let completed: Vec<CompletedPart> = staged
                .parts
                .into_iter()
                .zip(1..)
                .map(|(e_tag, number)| {
                    CompletedPart::builder()
                        .e_tag(e_tag)
                        .part_number(number)
                        .build()
                })
                .collect();
            upload.multipart = Multipart::Open(OpenMultipart {
                upload_id,
                next_part_number: i32::try_from(completed.len()).unwrap_or(MAX_PARTS) + 1,
                in_flight: JoinSet::new(),
                completed,
            });
        }
        upload
    }

    /// The durable parts: the completed ones without a gap from part 1.
    fn staged(&self) -> StagedParts {
        let Multipart::Open(multipart) = &self.multipart else {
            return StagedParts::default();
        };
        let mut by_number: Vec<&CompletedPart> = multipart.completed.iter().collect();
        by_number.sort_unstable_by_key(|part| part.part_number);
        let parts = by_number
            .into_iter()
            .zip(1..)
            .take_while(|(part, number)| part.part_number == Some(*number))
            .map(|(part, _)| part.e_tag.clone().unwrap_or_default())
            .collect();
        StagedParts {
            upload_id: Some(multipart.upload_id.clone()),
            parts,
        }
    }

    /// Every part of a streamed object has its bytes (they may still be on their way).
    fn streamed_whole_object(&self) -> bool {
        matches!(self.multipart, Multipart::Open(_))
            && self.streaming.is_none()
            && Some(self.next_part_start) == self.attributes.size
    }

    fn check_usable(&self) -> BlobResult<()> {
        if self.poisoned {
            return Err(BlobError::Unavailable(
                "an earlier write of this upload failed; abort it and start again".into(),
            ));
        }
        Ok(())
    }

    /// Whether parts stream: the object's size is known and it takes more than one part (a
    /// smaller one is sent whole with its final metadata at the commit).
    fn streams(&self) -> bool {
        self.attributes
            .size
            .is_some_and(|size| size > self.parts.part_size as u64)
    }

    async fn write_bytes(&mut self, mut bytes: Bytes) -> BlobResult<()> {
        if self.streams() {
            while !bytes.is_empty() {
                self.stream_bytes(&mut bytes).await?;
            }
            return Ok(());
        }
        while !bytes.is_empty() {
            // A full part is sent only once more bytes arrive: an object of exactly one part
            // stays a single PutObject.
            if self
                .part
                .as_ref()
                .is_some_and(|part| part.bytes.len() == self.parts.part_size)
            {
                self.send_part().await?;
            }
            let part = self.part.get_or_insert_with(|| PartBuffer {
                bytes: BytesMut::new(),
                reservation: self.parts.budget.empty(),
            });
            let take = (self.parts.part_size - part.bytes.len()).min(bytes.len());
            let filled = part.bytes.len() + take;
            // Memory is reserved for the bytes that arrived, not for the part they may become:
            // a stalled stream holds what it sent.
            self.parts
                .budget
                .grow(
                    &mut part.reservation,
                    filled as u64,
                    self.parts.part_size as u64,
                )
                .await
                .map_err(BlobError::Busy)?;
            if part.bytes.capacity() < filled {
                // Doubling, capped at the part size: copies stay linear and the buffer never
                // holds much more than what it was sent.
                let capacity = (2 * part.bytes.capacity()).clamp(filled, self.parts.part_size);
                let mut grown = BytesMut::with_capacity(capacity);
                grown.extend_from_slice(&part.bytes);
                part.bytes = grown;
            }
            part.bytes.extend_from_slice(&bytes.split_to(take));
        }
        Ok(())
    }

    /// Adds the front of `bytes` to the streaming part (beginning one if none is), up to the
    /// part's end. The part's request starts once the part outgrew its first bytes (so a stream
    /// that stalls early holds no S3 request open, only what it sent) or is complete; from then
    /// on every chunk goes straight to it. A complete part hands its kept chunks to its request.
    async fn stream_bytes(&mut self, bytes: &mut Bytes) -> BlobResult<()> {
        let size = self.attributes.size.unwrap_or_default();
        let part_size = self.parts.part_size as u64;
        let part = match &mut self.streaming {
            Some(part) => part,
            None => {
                let length = size.saturating_sub(self.next_part_start).min(part_size);
                if length == 0 {
                    return Err(BlobError::Misconfigured(
                        format!("more bytes were written than the object's declared {size}").into(),
                    ));
                }
                self.next_part_start += length;
                self.streaming.insert(StreamingPart {
                    length: usize::try_from(length).unwrap_or(usize::MAX),
                    filled: 0,
                    kept: Vec::new(),
                    reservation: self.parts.budget.empty(),
                    request: None,
                })
            }
        };
        let take = (part.length - part.filled).min(bytes.len());
        // Memory follows the bytes that arrived, as for a buffered part.
        self.parts
            .budget
            .grow(
                &mut part.reservation,
                (part.filled + take) as u64,
                part.length as u64,
            )
            .await
            .map_err(BlobError::Busy)?;
        let chunk = bytes.split_to(take);
        part.filled += take;
        part.kept.push(chunk.clone());
        let complete = part.filled == part.length;
        if part.request.is_none() && (complete || part.filled as u64 > FIRST_BYTES_LIMIT) {
            let request = self.start_part_request().await?;
            let Some(part) = self.streaming.as_mut() else {
                unreachable!("the streaming part stays while its request starts");
            };
            let request = part.request.insert(request);
            for chunk in &part.kept {
                request.feed(chunk.clone());
            }
        } else if let Some(request) = &mut part.request {
            request.feed(chunk);
        }
        if complete
            && let Some(part) = self.streaming.take()
            && let Some(request) = part.request
        {
            // Refused only when the request finished already: the bytes can go now.
            let _ = request.handover.send((part.kept, part.reservation));
        }
        Ok(())
    }

    /// Starts the next part's request, with a body the writer feeds.
    async fn start_part_request(&mut self) -> BlobResult<PartRequest> {
        let length = self.streaming.as_ref().map_or(0, |part| part.length as u64);
        let target = self.next_part(length).await?;
        let (feed, body) = PartFeed::new(length);
        let (handover, kept) = oneshot::channel();
        self.open_parts()
            .in_flight
            .spawn(upload_streamed_part(target, body, kept));
        Ok(PartRequest {
            feed: Some(feed),
            handover,
        })
    }

    /// Sends the buffered part (a full one, or the last).
    async fn send_part(&mut self) -> BlobResult<()> {
        let Some(length) = self.part.as_ref().map(|part| part.bytes.len() as u64) else {
            return Ok(());
        };
        let target = self.next_part(length).await?;
        let Some(part) = self.part.take() else {
            unreachable!("the part stays while its slot is claimed");
        };
        let (bytes, reservation) = (part.bytes.freeze(), part.reservation);
        self.open_parts().in_flight.spawn(async move {
            let sent = target.send(ByteStream::from(bytes)).await;
            // The bytes (kept by the SDK for retries) are gone now; so is their reservation.
            drop(reservation);
            sent
        });
        Ok(())
    }

    /// Numbers the next part, of `length` bytes, once a slot among the parts in flight is free:
    /// that wait is the back-pressure on the writer.
    async fn next_part(&mut self, length: u64) -> BlobResult<PartTarget> {
        self.open_multipart().await?;
        let Multipart::Open(multipart) = &mut self.multipart else {
            unreachable!("open_multipart leaves the upload open");
        };
        multipart.collect_finished()?;
        while multipart.in_flight.len() >= self.parts.parts_in_flight {
            multipart.join_one().await?;
        }
        let number = multipart.next_part_number;
        check_part_number(number, self.parts.part_size)?;
        multipart.next_part_number += 1;
        Ok(PartTarget {
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            upload_id: multipart.upload_id.clone(),
            number,
            length,
        })
    }

    /// The open multipart upload (after [`Self::next_part`]).
    fn open_parts(&mut self) -> &mut OpenMultipart {
        let Multipart::Open(multipart) = &mut self.multipart else {
            unreachable!("a part was numbered, so the multipart upload is open");
        };
        multipart
    }

    /// Creates the multipart upload (with the object's headers and metadata) unless it exists.
    async fn open_multipart(&mut self) -> BlobResult<()> {
        if matches!(self.multipart, Multipart::NotStarted) {
            let request = self
                .bucket
                .client
                .create_multipart_upload()
                .bucket(&self.bucket.name)
                .key(&self.key)
                .content_type(&self.attributes.content_type)
                .content_disposition(&self.attributes.content_disposition)
                .set_metadata(metadata(&self.attributes));
            self.multipart = Multipart::Creating(tokio::spawn(async move {
                let output = request.send().await.map_err(|error| {
                    map_sdk_error("CreateMultipartUpload", Scope::Object, error)
                })?;
                output.upload_id.ok_or_else(|| {
                    BlobError::Unavailable("CreateMultipartUpload answered no upload id".into())
                })
            }));
        }
        if let Multipart::Creating(creating) = &mut self.multipart {
            let created = creating.await.map_err(task_failed).and_then(|id| id);
            // A failed create left nothing to abort (or nothing we can name).
            let upload_id = created.inspect_err(|_| self.multipart = Multipart::NotStarted)?;
            self.multipart = Multipart::Open(OpenMultipart {
                upload_id,
                next_part_number: 1,
                in_flight: JoinSet::new(),
                completed: Vec::new(),
            });
        }
        Ok(())
    }

    async fn commit_parts(&mut self, final_metadata: Vec<(String, String)>) -> BlobResult<()> {
        if self.streams() && !self.streamed_whole_object() {
            return Err(BlobError::Misconfigured(
                "the write ended before the object's declared size".into(),
            ));
        }
        let mut attributes = self.attributes.clone();
        let metadata_changed = attributes.merge_metadata(final_metadata);
        if matches!(self.multipart, Multipart::NotStarted) {
            let bytes = self
                .part
                .as_mut()
                .map(|part| std::mem::take(&mut part.bytes).freeze())
                .unwrap_or_default();
            let result = self.bucket.put_object(&self.key, &attributes, bytes).await;
            self.part = None;
            return result;
        }
        if self
            .part
            .as_ref()
            .is_some_and(|part| !part.bytes.is_empty())
        {
            self.send_part().await?;
        }
        self.open_multipart().await?;
        let Multipart::Open(multipart) = &mut self.multipart else {
            unreachable!("open_multipart leaves the upload open");
        };
        while !multipart.in_flight.is_empty() {
            multipart.join_one().await?;
        }
        let expected = usize::try_from(multipart.next_part_number - 1).unwrap_or(0);
        if multipart.completed.len() != expected {
            return Err(BlobError::Unavailable(
                format!(
                    "{} of {expected} parts were uploaded",
                    multipart.completed.len()
                )
                .into(),
            ));
        }
        let mut parts = std::mem::take(&mut multipart.completed);
        parts.sort_unstable_by_key(|part| part.part_number);
        self.bucket
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket.name)
            .key(&self.key)
            .upload_id(&multipart.upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|error| map_sdk_error("CompleteMultipartUpload", Scope::Upload, error))?;
        self.completed = true;
        if metadata_changed {
            self.bucket
                .replace_attributes(&self.key, &attributes)
                .await?;
        }
        Ok(())
    }

    /// Takes what must be undone on the server: the parts in flight are cancelled, then the
    /// multipart upload (once created) is aborted. The returned future owns everything, so it
    /// can run on a task of its own and finish even if whoever started it goes away.
    fn take_cleanup(&mut self) -> Option<impl Future<Output = BlobResult<()>> + Send + 'static> {
        self.part = None;
        self.streaming = None;
        let multipart = std::mem::replace(&mut self.multipart, Multipart::NotStarted);
        let bucket = self.bucket.clone();
        let key = self.key.clone();
        let upload_id = match multipart {
            // Completed, but its metadata could not be finished: the object must go.
            _ if self.completed => UploadId::Completed,
            Multipart::NotStarted => return None,
            Multipart::Creating(creating) => UploadId::Pending(creating),
            Multipart::Open(mut open) => {
                open.in_flight.abort_all();
                UploadId::Known(open.upload_id, open.in_flight)
            }
        };
        Some(async move {
            let upload_id = match upload_id {
                UploadId::Completed => return bucket.delete_object(&key).await,
                UploadId::Known(id, mut in_flight) => {
                    // Cancelled parts must be off the wire before the abort, or one could land
                    // after it and be kept.
                    while in_flight.join_next().await.is_some() {}
                    id
                }
                UploadId::Pending(creating) => match creating.await {
                    Ok(Ok(id)) => id,
                    // Never created (or the answer is lost): nothing we can name to abort.
                    Ok(Err(_)) | Err(_) => return Ok(()),
                },
            };
            bucket.abort_multipart(&key, &upload_id).await
        })
    }
}

/// What undoing an upload has to remove.
enum UploadId {
    /// The multipart upload CreateMultipartUpload is about to answer with.
    Pending(JoinHandle<BlobResult<String>>),
    /// An open multipart upload, with its part uploads still to be cancelled.
    Known(String, JoinSet<BlobResult<CompletedPart>>),
    /// No multipart upload any more: the completed object itself.
    Completed,
}

#[async_trait]
impl BlobUpload for S3Upload {
    async fn write(&mut self, bytes: Bytes) -> BlobResult<()> {
        self.check_usable()?;
        self.poisoned = true;
        self.write_bytes(bytes).await?;
        self.poisoned = false;
        Ok(())
    }

    async fn commit(mut self: Box<Self>, metadata: Vec<(String, String)>) -> BlobResult<()> {
        self.check_usable()?;
        self.poisoned = true;
        let result = self.commit_parts(metadata).await;
        // A resumable write keeps its durable parts for the next attempt, unless the object
        // was already completed (then its unfinished metadata makes it go).
        let undo = !self.resumable || self.completed;
        if result.is_err()
            && undo
            && let Some(cleanup) = self.take_cleanup()
        {
            // The caller cannot abort a failed commit: undo it here.
            match tokio::spawn(cleanup).await.map_err(task_failed) {
                Ok(Ok(())) => {}
                Ok(Err(error)) | Err(error) => tracing::warn!(
                    key = %self.key,
                    %error,
                    "could not undo a failed commit; the bucket lifecycle rule will"
                ),
            }
        }
        self.finished = true;
        result
    }

    async fn abort(mut self: Box<Self>) -> BlobResult<()> {
        let cleanup = self.take_cleanup();
        self.finished = true;
        match cleanup {
            // On a task of its own: the abort completes even if this call is cancelled.
            Some(cleanup) => tokio::spawn(cleanup).await.map_err(task_failed)?,
            None => Ok(()),
        }
    }
}

impl Drop for S3Upload {
    fn drop(&mut self) {
        // A resumable write's parts stay for the next writer (its parts in flight are cancelled
        // as their JoinSet drops; one that lands anyway is simply sent again).
        if self.finished || (self.resumable && !self.completed) {
            return;
        }
        // Dropped without commit or abort (a cancelled RPC): nothing half-written may remain.
        let Some(cleanup) = self.take_cleanup() else {
            return;
        };
        let key = self.key.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(error) = cleanup.await {
                        tracing::warn!(
                            %key,
                            %error,
                            "could not undo a dropped upload; the bucket lifecycle rule will"
                        );
                    }
                });
            }
            Err(_) => tracing::warn!(
                %key,
                "upload dropped outside a runtime; its multipart upload is left to the bucket lifecycle rule"
            ),
        }
    }
}

#[async_trait]
impl ResumableUpload for S3Upload {
    async fn write(&mut self, bytes: Bytes) -> BlobResult<()> {
        BlobUpload::write(self, bytes).await
    }

    fn take_durable(&mut self) -> Option<StagedParts> {
        if let Multipart::Open(multipart) = &mut self.multipart
            && multipart.collect_finished().is_err()
        {
            // The failed part surfaces at the next write.
            self.poisoned = true;
        }
        let staged = self.staged();
        (staged.parts.len() > self.reported_parts).then(|| {
            self.reported_parts = staged.parts.len();
            staged
        })
    }

    async fn wait_durable(&mut self) -> BlobResult<()> {
        match &mut self.multipart {
            Multipart::Open(multipart) if !multipart.in_flight.is_empty() => multipart
                .join_one()
                .await
                .inspect_err(|_| self.poisoned = true),
            _ => std::future::pending().await,
        }
    }

    async fn pause(mut self: Box<Self>) -> BlobResult<StagedParts> {
        // A part that is full only waited for more bytes to be sent: it can be durable too.
        if !self.poisoned
            && self
                .part
                .as_ref()
                .is_some_and(|part| part.bytes.len() == self.parts.part_size)
            && self.send_part().await.is_err()
        {
            self.part = None;
        }
        // A part streamed only in part can never complete: its request fails.
        self.streaming = None;
        if let Multipart::Open(multipart) = &mut self.multipart {
            while !multipart.in_flight.is_empty() {
                // A failed part is simply not durable: it is sent again on resume.
                let _ = multipart.join_one().await;
            }
        }
        self.part = None;
        let staged = self.staged();
        if staged.parts.is_empty() {
            // Created, but nothing durable yet: no session can name it, so it goes now.
            self.resumable = false;
            return BlobUpload::abort(self)
                .await
                .map(|()| StagedParts::default());
        }
        Ok(staged)
    }

    async fn commit(self: Box<Self>, metadata: Vec<(String, String)>) -> BlobResult<()> {
        BlobUpload::commit(self, metadata).await
    }

    async fn abort(self: Box<Self>) -> BlobResult<()> {
        BlobUpload::abort(self).await
    }
}

fn check_part_number(number: i32, part_size: usize) -> BlobResult<()> {
    if number > MAX_PARTS {
        return Err(BlobError::Misconfigured(
            format!(
                "the object needs more than {MAX_PARTS} parts of {part_size} bytes; raise uploads.part_size"
            )
            .into(),
        ));
    }
    Ok(())
}

/// Where one part goes.
struct PartTarget {
    bucket: Arc<Bucket>,
    key: String,
    upload_id: String,
    number: i32,
    length: u64,
}

impl PartTarget {
    fn request(&self) -> UploadPartFluentBuilder {
        self.bucket
            .client
            .upload_part()
            .bucket(&self.bucket.name)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .part_number(self.number)
            .content_length(i64::try_from(self.length).unwrap_or(i64::MAX))
    }

    /// Sends the part with `body` (the SDK retrying as it may).
    async fn send(&self, body: ByteStream) -> BlobResult<CompletedPart> {
        let output = self
            .request()
            .body(body)
            .send()
            .await
            .map_err(|error| map_sdk_error("UploadPart", Scope::Upload, error))?;
        Ok(self.completed(output.e_tag))
    }

    fn completed(&self, e_tag: Option<String>) -> CompletedPart {
        CompletedPart::builder()
            .set_e_tag(e_tag)
            .part_number(self.number)
            .build()
    }
}

/// One streamed part: the request whose body the writer feeds; if that attempt fails, the part
/// is sent again (with the SDK's retries) from the chunks the writer hands over once the part is
/// complete. A part the writer abandons fails with the streamed attempt's error.
async fn upload_streamed_part(
    target: PartTarget,
    body: PartFeed,
    kept: oneshot::Receiver<(Vec<Bytes>, MemoryReservation)>,
) -> BlobResult<CompletedPart> {
    let error = match target
        .request()
        .body(ByteStream::from_body_1_x(body))
        .send()
        .await
    {
        Ok(output) => return Ok(target.completed(output.e_tag)),
        Err(error) => error,
    };
    let Ok((chunks, reservation)) = kept.await else {
        return Err(map_sdk_error("UploadPart", Scope::Upload, error));
    };
    tracing::debug!(
        part = target.number,
        error = %aws_sdk_s3::error::DisplayErrorContext(&error),
        "a streamed part failed; sending it again from its kept bytes"
    );
    let chunks = KeptChunks::new(chunks);
    let sent = target
        .send(ByteStream::new(SdkBody::retryable(move || {
            SdkBody::from_body_1_x(chunks.clone())
        })))
        .await;
    drop(reservation);
    sent
}

fn task_failed(error: JoinError) -> BlobError {
    BlobError::Unavailable(format!("an S3 request task ended early: {error}").into())
}
