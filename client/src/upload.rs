//! Resumable uploads: chunking, SHA-256, a request id, and continuing through `GetUploadStatus`
//! after the stream breaks or the service restarts.

use std::{collections::VecDeque, path::Path, pin::Pin, sync::Arc};

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncSeek, AsyncSeekExt},
    sync::mpsc,
};
use tonic::Code;

use crate::{
    Client,
    error::Error,
    pb::{self, upload_file_request::Payload},
};

/// Largest chunk the client sends (the service's `max_chunk_bytes` may be smaller).
const CHUNK_BYTES: usize = 1 << 20;

/// What to upload the content as.
#[derive(Clone, Default)]
pub struct UploadOptions {
    /// The conversation to post the file to.
    pub conversation_id: String,
    /// The name shown to users; [`Client::upload_path`] defaults it to the file's name.
    pub file_name: String,
    /// The MIME type; `None` picks the type whose extensions (in the upload policy) list the
    /// file name's.
    pub content_type: Option<String>,
    /// The caption posted with the file.
    pub caption: String,
    /// The upload's idempotency key; `None` makes a fresh UUID. Passing the id of an
    /// interrupted upload continues it from the bytes the service already has.
    pub request_id: Option<String>,
    /// Progress reports: `(bytes sent, total)`. After an interruption the position goes back
    /// to what the service had durably.
    pub progress: Option<Arc<dyn Fn(u64, u64) + Send + Sync>>,
}

impl UploadOptions {
    /// An upload to `conversation_id` named `file_name`.
    pub fn new(conversation_id: impl Into<String>, file_name: impl Into<String>) -> Self {
        UploadOptions {
            conversation_id: conversation_id.into(),
            file_name: file_name.into(),
            ..Default::default()
        }
    }

    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.content_type = Some(content_type.into());
        self
    }

    pub fn caption(mut self, caption: impl Into<String>) -> Self {
        self.caption = caption.into();
        self
    }

    pub fn request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = Some(request_id.into());
        self
    }

    pub fn on_progress(mut self, report: impl Fn(u64, u64) + Send + Sync + 'static) -> Self {
        self.progress = Some(Arc::new(report));
        self
    }
}

impl std::fmt::Debug for UploadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UploadOptions")
            .field("conversation_id", &self.conversation_id)
            .field("file_name", &self.file_name)
            .field("content_type", &self.content_type)
            .field("caption", &self.caption)
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

/// A finished upload.
#[derive(Debug, Clone)]
pub struct UploadOutcome {
    /// The stored file.
    pub file: pb::FileInfo,
    /// The message that announced it; `None` when the upload had already completed before
    /// this call (it then found the file through `GetUploadStatus`).
    pub message: Option<pb::Message>,
    /// The upload's request id.
    pub request_id: String,
    /// How many times the stream was continued after breaking.
    pub resumptions: u32,
}

trait SeekableRead: AsyncRead + AsyncSeek + Send {}
impl<T: AsyncRead + AsyncSeek + Send> SeekableRead for T {}

/// Where the content comes from, and how an interrupted upload gets its bytes again.
enum Source {
    /// Any position can be read again.
    Seekable {
        reader: Pin<Box<dyn SeekableRead>>,
        position: u64,
    },
    /// Read once: the last `window_limit` bytes are kept to resend after an interruption.
    Stream {
        reader: Pin<Box<dyn AsyncRead + Send>>,
        read: u64,
        window: VecDeque<Bytes>,
        window_start: u64,
        window_limit: usize,
        hasher: Sha256,
    },
}

impl Source {
    /// Up to `max` bytes at `offset` (empty at the end).
    async fn read_at(&mut self, offset: u64, max: usize) -> Result<Bytes, Error> {
        match self {
            Source::Seekable { reader, position } => {
                if *position != offset {
                    reader
                        .seek(std::io::SeekFrom::Start(offset))
                        .await
                        .map_err(|e| Error::io("cannot seek the upload's source", e))?;
                    *position = offset;
                }
                let chunk = read_up_to(reader.as_mut(), max).await?;
                *position += chunk.len() as u64;
                Ok(chunk)
            }
            Source::Stream {
                reader,
                read,
                window,
                window_start,
                window_limit,
                hasher,
            } => {
                if offset < *read {
                    return replay(window, *window_start, offset, max);
                }
                let chunk = read_up_to(reader.as_mut(), max).await?;
                hasher.update(&chunk);
                *read += chunk.len() as u64;
                window.push_back(chunk.clone());
                let mut kept: usize = window.iter().map(Bytes::len).sum();
                while kept > *window_limit {
                    let dropped = window.pop_front().expect("kept bytes are in the window");
                    kept -= dropped.len();
                    *window_start += dropped.len() as u64;
                }
                Ok(chunk)
            }
        }
    }
}

/// Bytes at `offset` from the kept window.
fn replay(
    window: &VecDeque<Bytes>,
    window_start: u64,
    offset: u64,
    max: usize,
) -> Result<Bytes, Error> {
    if offset < window_start {
        return Err(Error::NotResumable {
            offset,
            kept_from: window_start,
        });
    }
    let mut start = window_start;
    for chunk in window {
        let end = start + chunk.len() as u64;
        if offset < end {
            let from = (offset - start) as usize;
            return Ok(chunk.slice(from..chunk.len().min(from + max)));
        }
        start = end;
    }
    Ok(Bytes::new())
}

async fn read_up_to(
    mut reader: Pin<&mut (impl AsyncRead + ?Sized)>,
    max: usize,
) -> Result<Bytes, Error> {
    let mut buffer = BytesMut::with_capacity(max);
    while buffer.len() < max {
        let before = buffer.len();
        let mut limited = (&mut reader).take((max - before) as u64);
        let read = limited
            .read_buf(&mut buffer)
            .await
            .map_err(|e| Error::io("cannot read the upload's source", e))?;
        if read == 0 {
            break;
        }
    }
    Ok(buffer.freeze())
}

/// Where the next UploadFile starts.
enum Start {
    /// Metadata, then the content from 0.
    Fresh,
    /// `resume`, then the content from this offset.
    At(u64),
    /// Ask `GetUploadStatus` first.
    Unknown,
}

impl Client {
    /// Uploads the file at `path` and posts it to the conversation. The file is hashed first
    /// (the SHA-256 is declared, so the service checks it) and sent in chunks under a request
    /// id; if the stream breaks or the service restarts, the upload continues from the bytes
    /// the service has durably (`GetUploadStatus`), with backoff. An empty
    /// `options.file_name` means the path's file name.
    ///
    /// ```no_run
    /// # async fn example(client: svcmsg_client::Client) -> Result<(), svcmsg_client::Error> {
    /// use svcmsg_client::UploadOptions;
    ///
    /// let options = UploadOptions::new("CONVERSATION_ID", "")
    ///     .caption("the report")
    ///     .on_progress(|sent, total| eprintln!("{sent}/{total}"));
    /// let outcome = client.upload_path("report.pdf", options).await?;
    /// println!("file {} ({})", outcome.file.file_id, outcome.file.sha256);
    /// # Ok(()) }
    /// ```
    pub async fn upload_path(
        &self,
        path: impl AsRef<Path>,
        mut options: UploadOptions,
    ) -> Result<UploadOutcome, Error> {
        let path = path.as_ref();
        let opened = |e| Error::io(format!("cannot open {}", path.display()), e);
        if options.file_name.is_empty() {
            options.file_name = path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .ok_or_else(|| Error::InvalidInput(format!("{} names no file", path.display())))?;
        }
        let file = tokio::fs::File::open(path).await.map_err(opened)?;
        let size = file.metadata().await.map_err(opened)?.len();
        self.upload_seekable(tokio::io::BufReader::new(file), size, options)
            .await
    }

    /// Uploads `size` bytes from a seekable reader (a file, a `Cursor`): hashed first, then
    /// sent; continued after interruptions from any offset the service asks for.
    pub async fn upload_seekable(
        &self,
        reader: impl AsyncRead + AsyncSeek + Send + 'static,
        size: u64,
        options: UploadOptions,
    ) -> Result<UploadOutcome, Error> {
        let mut pinned: Pin<Box<dyn SeekableRead>> = Box::pin(reader);
        let start = pinned
            .stream_position()
            .await
            .map_err(|e| Error::io("cannot seek the upload's source", e))?;
        let mut hasher = Sha256::new();
        let mut hashed = 0u64;
        while hashed < size {
            let want = (size - hashed).min(CHUNK_BYTES as u64) as usize;
            let chunk = read_up_to(pinned.as_mut(), want).await?;
            if chunk.is_empty() {
                return Err(Error::InvalidInput(format!(
                    "the source ended after {hashed} of the {size} bytes announced"
                )));
            }
            hasher.update(&chunk);
            hashed += chunk.len() as u64;
        }
        pinned
            .seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| Error::io("cannot seek the upload's source", e))?;
        let sha256 = hex(&hasher.finalize());
        let source = Source::Seekable {
            reader: pinned,
            position: start,
        };
        self.upload_source(source, size, Some(sha256), options)
            .await
    }

    /// Uploads `size` bytes from a reader that cannot seek (a pipe, a socket). The SHA-256 is
    /// computed while sending and compared with the stored file's. After an interruption the
    /// upload continues only if the bytes the service is missing are still among the last ones
    /// kept in memory (two resume parts, 16 MiB by default); otherwise
    /// [`Error::NotResumable`].
    pub async fn upload(
        &self,
        reader: impl AsyncRead + Send + 'static,
        size: u64,
        options: UploadOptions,
    ) -> Result<UploadOutcome, Error> {
        let policy = self.upload_policy().await?;
        let window_limit = usize::try_from(policy.resume_part_bytes.max(0))
            .unwrap_or(usize::MAX)
            .saturating_mul(2)
            .max(CHUNK_BYTES);
        let source = Source::Stream {
            reader: Box::pin(reader),
            read: 0,
            window: VecDeque::new(),
            window_start: 0,
            window_limit,
            hasher: Sha256::new(),
        };
        self.upload_source(source, size, None, options).await
    }

    async fn upload_source(
        &self,
        mut source: Source,
        size: u64,
        sha256: Option<String>,
        options: UploadOptions,
    ) -> Result<UploadOutcome, Error> {
        let policy = self.upload_policy().await?;
        let content_type = match &options.content_type {
            Some(content_type) => content_type.clone(),
            None => content_type_for(&policy, &options.file_name)?,
        };
        let chunk_bytes = usize::try_from(policy.max_chunk_bytes)
            .unwrap_or(CHUNK_BYTES)
            .clamp(1, CHUNK_BYTES);
        let caller_chose_id = options.request_id.is_some();
        let request_id = options
            .request_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let metadata = pb::UploadMetadata {
            conversation_id: options.conversation_id.clone(),
            file_name: options.file_name.clone(),
            content_type,
            size_bytes: i64::try_from(size)
                .map_err(|_| Error::InvalidInput("the file is too large".into()))?,
            sha256: sha256.clone().unwrap_or_default(),
            caption: options.caption.clone(),
            request_id: request_id.clone(),
        };
        let report = |position: u64| {
            if let Some(progress) = &options.progress {
                progress(position, size);
            }
        };
        // An id the caller chose may name an upload already under way: continue it.
        let mut start = if caller_chose_id {
            Start::Unknown
        } else {
            Start::Fresh
        };
        let reconnect = self.reconnect_policy().clone();
        let mut resumptions = 0;
        let mut failures = 0;
        let mut best_committed = 0u64;
        loop {
            let offset = match start {
                Start::Fresh => 0,
                Start::At(offset) => offset,
                Start::Unknown => match self.upload_status(&request_id).await {
                    Ok(status) if status.complete => {
                        let file = status.file.unwrap_or_default();
                        verify_stored(&file, sha256.as_deref(), &source)?;
                        report(size);
                        return Ok(UploadOutcome {
                            file,
                            message: None,
                            request_id,
                            resumptions,
                        });
                    }
                    Ok(status) => {
                        if status.size_bytes != metadata.size_bytes {
                            return Err(Error::InvalidInput(format!(
                                "upload {request_id} is of {} bytes, this content of {size}",
                                status.size_bytes
                            )));
                        }
                        let committed = status.committed_size.max(0) as u64;
                        if committed > best_committed {
                            best_committed = committed;
                            failures = 0;
                        }
                        start = Start::At(committed);
                        continue;
                    }
                    Err(error) if error.reason() == Some("UPLOAD_NOT_FOUND") => {
                        start = Start::Fresh;
                        continue;
                    }
                    Err(error) if continues_upload(&error) => {
                        failures += 1;
                        if reconnect.gives_up_after(failures) {
                            return Err(error);
                        }
                        tokio::time::sleep(pause_for(&error, &reconnect, failures)).await;
                        continue;
                    }
                    Err(error) => return Err(error),
                },
            };
            report(offset);
            let first = match start {
                Start::Fresh => Payload::Metadata(metadata.clone()),
                _ => Payload::Resume(pb::UploadResume {
                    request_id: request_id.clone(),
                    write_offset: offset as i64,
                }),
            };
            match self
                .upload_once(first, &mut source, offset, size, chunk_bytes, &report)
                .await
            {
                Ok(response) => {
                    let file = response.file.unwrap_or_default();
                    verify_stored(&file, sha256.as_deref(), &source)?;
                    report(size);
                    return Ok(UploadOutcome {
                        file,
                        message: response.message,
                        request_id,
                        resumptions,
                    });
                }
                Err(error) if continues_upload(&error) => {
                    failures += 1;
                    if reconnect.gives_up_after(failures) {
                        return Err(error);
                    }
                    resumptions += 1;
                    tokio::time::sleep(pause_for(&error, &reconnect, failures)).await;
                    start = Start::Unknown;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// One UploadFile call: `first`, then the content from `offset`.
    async fn upload_once(
        &self,
        first: Payload,
        source: &mut Source,
        offset: u64,
        size: u64,
        chunk_bytes: usize,
        report: &(impl Fn(u64) + Sync),
    ) -> Result<pb::UploadFileResponse, Error> {
        let (sender, receiver) = mpsc::channel::<pb::UploadFileRequest>(4);
        sender
            .send(pb::UploadFileRequest {
                payload: Some(first),
            })
            .await
            .expect("the receiver is held below");
        let request = self.request(ReceiverStream(receiver))?;
        let mut files = self.files.clone();
        let call = async move { files.upload_file(request).await };
        let produce = async move {
            let mut position = offset;
            while position < size {
                let want = (size - position).min(chunk_bytes as u64) as usize;
                let chunk = source.read_at(position, want).await?;
                if chunk.is_empty() {
                    return Err(Error::InvalidInput(format!(
                        "the source ended after {position} of the {size} bytes announced"
                    )));
                }
                position += chunk.len() as u64;
                let message = pb::UploadFileRequest {
                    payload: Some(Payload::Chunk(chunk)),
                };
                // The call ended early (refused, or the connection broke): its answer says why.
                if sender.send(message).await.is_err() {
                    return Ok(());
                }
                report(position);
            }
            Ok(())
        };
        tokio::pin!(call, produce);
        let mut produced = false;
        loop {
            tokio::select! {
                answer = &mut call => {
                    return answer
                        .map(tonic::Response::into_inner)
                        .map_err(Error::from);
                }
                done = &mut produce, if !produced => {
                    // A local read failure ends the call (dropping it cancels the stream; the
                    // service keeps what it has for a later resume).
                    done?;
                    produced = true;
                }
            }
        }
    }
}

/// Whether an upload error is one a later attempt can get past.
fn continues_upload(error: &Error) -> bool {
    let Some(status) = error.status() else {
        return false;
    };
    status.is_transport_failure()
        // The previous stream's writer still holds the upload until the service notices it
        // is gone.
        || status.reason.as_deref() == Some("UPLOAD_IN_PROGRESS")
        || status.reason.as_deref() == Some("UPLOAD_MEMORY_BUSY")
        || status.reason.as_deref() == Some("UPLOAD_IDLE_TIMEOUT")
        || (status.code == Code::DeadlineExceeded && status.reason.is_none())
}

fn pause_for(
    error: &Error,
    reconnect: &crate::ReconnectPolicy,
    failures: u32,
) -> std::time::Duration {
    let backoff = reconnect.backoff(failures);
    match error.status().and_then(|status| status.retry_delay) {
        Some(asked) => asked.max(backoff),
        None => backoff,
    }
}

/// Checks the stored file against the hash of what was read.
fn verify_stored(
    file: &pb::FileInfo,
    declared: Option<&str>,
    source: &Source,
) -> Result<(), Error> {
    let expected = match (declared, source) {
        (Some(declared), _) => declared.to_owned(),
        (None, Source::Stream { hasher, .. }) => hex(&hasher.clone().finalize()),
        (None, Source::Seekable { .. }) => return Ok(()),
    };
    if !file.sha256.eq_ignore_ascii_case(&expected) {
        return Err(Error::ChecksumMismatch {
            expected,
            actual: file.sha256.clone(),
        });
    }
    Ok(())
}

/// The MIME type the policy lists `file_name`'s extension under.
fn content_type_for(
    policy: &pb::GetUploadPolicyResponse,
    file_name: &str,
) -> Result<String, Error> {
    let extension = Path::new(file_name)
        .extension()
        .map(|extension| extension.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    policy
        .file_types
        .iter()
        .find(|kind| kind.extensions.contains(&extension))
        .map(|kind| kind.mime_type.clone())
        .ok_or_else(|| {
            Error::InvalidInput(format!(
                "no allowed file type has the extension {extension:?} (see the upload policy); \
                 give the content type"
            ))
        })
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// An mpsc receiver as a `Stream` (the request stream of UploadFile).
struct ReceiverStream<T>(mpsc::Receiver<T>);

impl<T> futures::Stream for ReceiverStream<T> {
    type Item = T;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}
