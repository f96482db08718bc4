//! Thumbnails made while the upload arrives, so that the last byte leaves only the last rows,
//! the resize and the encode to do.
//!
//! An [`ImageFeed`] sees every chunk of an image upload. Once the bytes so far hold the header,
//! it plans the decode as [`Thumbnailer::plan`] does, reserves the plan's memory from the budget
//! (plus [`INPUT_BYTES`] for the input it holds), and hands each later chunk to a decoder that
//! runs one step per batch of chunks on the blocking pool: libjpeg with a suspending data
//! source, the `png` reader over the bytes that arrived. Between steps a decoder is plain
//! memory, no thread waits for the network, so a stalled upload holds its reservation (until
//! its idle timeout drops it) but no thread; a step takes one of the pool's `workers` slots
//! like any decode, so at most `thumbnails.workers` threads decode at once, streamed or not.
//!
//! Whatever the streamed decode cannot take (GIF, WEBP, interlaced PNG, a header longer than
//! [`MAX_HEADER_BYTES`], no memory free at the header) and whatever it fails on is decoded from
//! the whole body after the last byte, as before: the buffered decode gives the verdict on a
//! broken file, so a streamed upload is accepted or refused exactly as a buffered one.
//!
//! Dropping the feed (the upload failed, was refused or cancelled, or its stream went idle)
//! cancels the decoder at its next check and frees its memory once its step has ended.

use std::sync::{Arc, atomic::Ordering};

use bytes::Bytes;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    task::JoinHandle,
};

use super::{
    CancelOnDrop, Deadline, DecodePlan, Decoding, STOP_WAIT, Thumbnail, ThumbnailError,
    ThumbnailPool, Thumbnailer, jpeg, png, raster::Raster,
};
use crate::{budget::MemoryReservation, files::policy::FileKind};

/// The header (everything before a JPEG's first scan or a PNG's image data) must be within
/// this many bytes for the decode to start before the last byte; EXIF and colour profiles
/// rarely pass 100 KiB.
pub const MAX_HEADER_BYTES: usize = 1 << 20;

/// Input a streamed decode may hold besides its plan's peak: the chunks queued for it (at most
/// [`QUEUED_BYTES`], or one larger chunk) and what libjpeg has not consumed yet (at most
/// [`jpeg::MAX_UNCONSUMED`]).
pub const INPUT_BYTES: u64 = 2 * QUEUED_BYTES as u64 + (1 << 20);

/// Below this many bytes received, the header is looked for every [`PLAN_STEP`] bytes.
const EVERY_CHUNK_BELOW: usize = 64 * 1024;
/// Below [`EVERY_CHUNK_BELOW`], the header is parsed again once this many more bytes arrived
/// (at most 128 parses of a small body, whatever its chunking; small enough that a few-KiB image
/// still streams).
const PLAN_STEP: usize = 512;

/// Chunks waiting for the decoder, in bytes; the upload waits when this much is queued.
const QUEUED_BYTES: usize = 1 << 20;

/// Permits of the queue, one per KiB.
const QUEUE_UNIT: usize = 1024;

/// Follows an image upload's chunks; see the module docs.
pub struct ImageFeed {
    pool: Arc<ThumbnailPool>,
    kind: FileKind,
    state: State,
}

enum State {
    /// No header yet: the next look at `next_attempt` bytes.
    Planning {
        next_attempt: usize,
    },
    Streaming(Streaming),
    /// Decoded from the whole body after the last byte.
    Buffered,
}

struct Streaming {
    input: mpsc::UnboundedSender<Input>,
    queue: Arc<Semaphore>,
    driver: JoinHandle<Result<Thumbnail, ThumbnailError>>,
    /// Stops the decode at its next check when the feed is dropped.
    _cancel: CancelOnDrop,
}

enum Input {
    Bytes(Bytes, OwnedSemaphorePermit),
    End,
}

/// A decoder between two steps.
enum StreamDecoder {
    Jpeg(Box<jpeg::StreamingJpeg>),
    Png(Box<png::StreamingPng>),
}

impl StreamDecoder {
    fn push(&mut self, bytes: Bytes, deadline: &Deadline) -> Result<(), ThumbnailError> {
        match self {
            Self::Jpeg(decoder) => {
                decoder.set_deadline(deadline.clone());
                decoder.push(&bytes)
            }
            Self::Png(decoder) => decoder.push(bytes, deadline),
        }
    }

    fn finish(self, deadline: &Deadline) -> Result<Raster, ThumbnailError> {
        match self {
            Self::Jpeg(mut decoder) => {
                decoder.set_deadline(deadline.clone());
                (*decoder).finish()
            }
            Self::Png(decoder) => (*decoder).finish(deadline),
        }
    }
}

/// A streamed decode's memory reservation, counted by the pool while it is held.
struct StreamHeld {
    reservation: MemoryReservation,
    pool: Arc<ThumbnailPool>,
}

impl StreamHeld {
    fn new(reservation: MemoryReservation, pool: Arc<ThumbnailPool>) -> Self {
        pool.activity.streaming.fetch_add(1, Ordering::Relaxed);
        pool.activity.reserve(reservation.bytes());
        pool.activity.metrics.streaming_decoders.inc();
        Self { reservation, pool }
    }
}

impl Drop for StreamHeld {
    fn drop(&mut self) {
        self.pool.activity.streaming.fetch_sub(1, Ordering::Relaxed);
        self.pool.activity.release(self.reservation.bytes());
        self.pool.activity.metrics.streaming_decoders.dec();
    }
}

impl ThumbnailPool {
    /// A feed for an upload of `kind`: give it every chunk ([`ImageFeed::push`]), then the
    /// whole body ([`ImageFeed::finish`]) for the thumbnail.
    pub fn feed(self: &Arc<Self>, kind: FileKind) -> ImageFeed {
        let state = match kind {
            FileKind::Jpeg | FileKind::Png => State::Planning { next_attempt: 0 },
            _ => State::Buffered,
        };
        ImageFeed {
            pool: self.clone(),
            kind,
            state,
        }
    }
}

impl ImageFeed {
    /// Takes the next chunk; `received` is the body so far, this chunk included. Waits while
    /// the decoder is behind by more than [`QUEUED_BYTES`], and for memory once the header is
    /// known; never fails: a decode that cannot stream is done after the last byte instead.
    pub async fn push(&mut self, chunk: &Bytes, received: &[u8]) {
        match &mut self.state {
            State::Planning { next_attempt } => {
                if received.len() < *next_attempt {
                    return;
                }
                // Every PLAN_STEP bytes while the body is small (however small its chunks), then at
                // doubling sizes, so that a long header is parsed a bounded number of times.
                *next_attempt = if received.len() < EVERY_CHUNK_BELOW {
                    received.len() + PLAN_STEP
                } else {
                    received.len().saturating_mul(2)
                };
                self.state = match self.start(received).await {
                    Ok(Some(streaming)) => State::Streaming(streaming),
                    Ok(None) => return,
                    Err(Unstreamable) => {
                        self.pool.activity.metrics.stream_fallbacks.inc();
                        State::Buffered
                    }
                };
            }
            State::Streaming(streaming) => {
                let permits =
                    (chunk.len().div_ceil(QUEUE_UNIT)).clamp(1, QUEUED_BYTES / QUEUE_UNIT);
                let Ok(permit) = streaming
                    .queue
                    .clone()
                    .acquire_many_owned(permits as u32)
                    .await
                else {
                    return;
                };
                // A driver that stopped early has failed; `finish` falls back then.
                let _ = streaming.input.send(Input::Bytes(chunk.clone(), permit));
            }
            State::Buffered => {}
        }
    }

    /// The last byte has arrived and `whole` is the body: the thumbnail, as
    /// [`ThumbnailPool::make`] would make it from `whole`.
    pub async fn finish(self, whole: Bytes) -> Result<Option<Thumbnail>, ThumbnailError> {
        let Self { pool, kind, state } = self;
        let State::Streaming(streaming) = state else {
            return pool.make(kind, whole).await;
        };
        let Streaming {
            input,
            mut driver,
            _cancel: cancel,
            ..
        } = streaming;
        let _ = input.send(Input::End);
        // The last step may wait for a worker, then decode for its time.
        let limit = pool.queue_timeout + pool.timeout + STOP_WAIT;
        let outcome = match tokio::time::timeout(limit, &mut driver).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(error)) => Err(ThumbnailError::Internal(format!(
                "the thumbnail driver failed: {error}"
            ))),
            Err(_) => {
                cancel.0.cancel();
                let _ = tokio::time::timeout(STOP_WAIT, driver).await;
                Err(ThumbnailError::TimedOut)
            }
        };
        match outcome {
            Ok(thumbnail) => Ok(Some(thumbnail)),
            // Waiting again would not help: the server is busy or closing, or the decode took
            // its whole time.
            Err(
                error @ (ThumbnailError::ShuttingDown
                | ThumbnailError::TimedOut
                | ThumbnailError::WorkersBusy),
            ) => Err(error),
            // The buffered decode gives the verdict (and the error) on what did not stream.
            Err(_) => {
                pool.activity.metrics.stream_fallbacks.inc();
                pool.make(kind, whole).await
            }
        }
    }

    /// Plans from the bytes so far and starts the decoder: `Ok(None)` while the header is
    /// incomplete.
    async fn start(&self, received: &[u8]) -> Result<Option<Streaming>, Unstreamable> {
        let pool = &self.pool;
        let plan = match pool.thumbnailer.plan(self.kind, received) {
            Ok(Some(plan)) => plan,
            // A header cut short reads as undecodable: look again with more bytes.
            Err(ThumbnailError::Undecodable(_)) if received.len() < MAX_HEADER_BYTES => {
                return Ok(None);
            }
            Ok(None) | Err(_) => return Err(Unstreamable),
        };
        let decoder = stream_decoder(&pool.thumbnailer, &plan, received).ok_or(Unstreamable)?;
        let needed = plan.peak_bytes + INPUT_BYTES + received.len() as u64;
        if needed > pool.budget.main_bytes() || pool.closed.load(Ordering::Relaxed) {
            return Err(Unstreamable);
        }
        // Never waits: without memory free right now the image is simply decoded after its last
        // byte, so a full budget does not hold every image upload at its header.
        let reservation = pool.budget.try_reserve(needed).ok_or(Unstreamable)?;
        let held = StreamHeld::new(reservation, pool.clone());
        let (input, inputs) = mpsc::unbounded_channel();
        let queue = Arc::new(Semaphore::new(QUEUED_BYTES / QUEUE_UNIT));
        let cancel = CancelOnDrop(Deadline::after(pool.timeout, pool.closed.clone()));
        let driver = tokio::spawn(drive(
            decoder,
            plan,
            Bytes::copy_from_slice(received),
            inputs,
            held,
            cancel.0.clone(),
        ));
        Ok(Some(Streaming {
            input,
            queue,
            driver,
            _cancel: cancel,
        }))
    }
}

/// The decoder for `plan`, if its format and variant can be decoded as they arrive.
fn stream_decoder(
    thumbnailer: &Thumbnailer,
    plan: &DecodePlan,
    received: &[u8],
) -> Option<StreamDecoder> {
    match plan.decoding {
        Decoding::Jpeg { numerator } => {
            let header = jpeg::read_header(received).ok()?;
            let deadline = Deadline::none();
            let limits = jpeg::Limits {
                max_scans: thumbnailer.max_jpeg_scans,
                max_memory: plan.peak_bytes,
                deadline: &deadline,
            };
            Some(StreamDecoder::Jpeg(Box::new(jpeg::StreamingJpeg::new(
                &header, numerator, &limits,
            ))))
        }
        Decoding::Png { factor } => {
            let header = png::read_header(received).ok()?;
            png::StreamingPng::new(&header, factor, plan.peak_bytes)
                .map(|decoder| StreamDecoder::Png(Box::new(decoder)))
        }
        Decoding::Gif | Decoding::Webp => None,
    }
}

impl Thumbnailer {
    /// The streamed decode on the calling thread, `bytes` arriving in pieces of `piece` bytes:
    /// planned from the first pieces that hold the header, then decoded piece by piece, without
    /// the pool and without falling back to a whole decode (for fuzzing and tests). Kinds and
    /// variants that do not stream are decoded whole.
    pub fn make_in_pieces(
        &self,
        kind: FileKind,
        bytes: &[u8],
        piece: usize,
    ) -> Result<Option<Thumbnail>, ThumbnailError> {
        let piece = piece.max(1);
        let mut received = 0;
        let plan = loop {
            received = (received + piece).min(bytes.len());
            match self.plan(kind, &bytes[..received]) {
                Ok(Some(plan)) => break plan,
                Ok(None) => return Ok(None),
                Err(ThumbnailError::Undecodable(_)) if received < bytes.len() => {}
                Err(error) => return Err(error),
            }
        };
        let Some(mut decoder) = stream_decoder(self, &plan, &bytes[..received]) else {
            return self.render(&plan, bytes).map(Some);
        };
        let deadline = Deadline::none();
        decoder.push(Bytes::copy_from_slice(&bytes[..received]), &deadline)?;
        for chunk in bytes[received..].chunks(piece) {
            decoder.push(Bytes::copy_from_slice(chunk), &deadline)?;
        }
        let decoded = decoder.finish(&deadline)?;
        self.thumbnail(&plan, decoded).map(Some)
    }
}

/// The decode cannot (or can no longer) follow the upload.
struct Unstreamable;

/// Runs the decoder one step per batch of arrived chunks, each step on the blocking pool with a
/// worker slot; all steps together get one `thumbnails.timeout` of decoding, as a buffered
/// decode does (a caller pacing its bytes cannot buy more CPU). After the end, the last step
/// makes the thumbnail. Ends early when the feed is dropped or a step fails.
async fn drive(
    decoder: StreamDecoder,
    plan: DecodePlan,
    head: Bytes,
    mut inputs: mpsc::UnboundedReceiver<Input>,
    held: StreamHeld,
    cancel: Deadline,
) -> Result<Thumbnail, ThumbnailError> {
    let pool = held.pool.clone();
    let mut decoder = Some(decoder);
    // Time the steps have spent so far, against the one timeout they share.
    let mut spent = std::time::Duration::ZERO;
    let mut batch = vec![head];
    let mut permits = Vec::new();
    loop {
        let mut ended = false;
        while let Ok(input) = inputs.try_recv() {
            match input {
                Input::Bytes(bytes, permit) => {
                    batch.push(bytes);
                    permits.push(permit);
                }
                Input::End => ended = true,
            }
        }
        if batch.is_empty() && !ended {
            match inputs.recv().await {
                Some(Input::Bytes(bytes, permit)) => {
                    batch.push(bytes);
                    permits.push(permit);
                    continue;
                }
                Some(Input::End) => ended = true,
                // The feed was dropped: the upload is over without its last byte.
                None => return Err(ThumbnailError::TimedOut),
            }
        }
        // As long as any decode waits for a worker, then refused as busy.
        let worker =
            match tokio::time::timeout(pool.queue_timeout, pool.workers.clone().acquire_owned())
                .await
            {
                Ok(Ok(worker)) => worker,
                Ok(Err(_closed)) => return Err(ThumbnailError::ShuttingDown),
                Err(_) => return Err(ThumbnailError::WorkersBusy),
            };
        let remaining = pool.timeout.saturating_sub(spent);
        if remaining.is_zero() {
            return Err(ThumbnailError::TimedOut);
        }
        let step_started = std::time::Instant::now();
        let deadline = Deadline {
            at: step_started.checked_add(remaining),
            ..cancel.clone()
        };
        deadline.check()?;
        let mut stepping = decoder
            .take()
            .ok_or_else(|| ThumbnailError::Internal("the streamed decoder was lost".into()))?;
        let chunks = std::mem::take(&mut batch);
        let fed: u64 = chunks.iter().map(|chunk| chunk.len() as u64).sum();
        let thumbnailer = pool.thumbnailer.clone();
        let plan = plan.clone();
        let step = tokio::task::spawn_blocking(move || {
            let _worker = worker;
            for chunk in chunks {
                stepping.push(chunk, &deadline)?;
            }
            if !ended {
                return Ok(Stepped::More(stepping));
            }
            let decoded = stepping.finish(&deadline)?;
            deadline.check()?;
            thumbnailer.thumbnail(&plan, decoded).map(Stepped::Done)
        });
        let stepped = step
            .await
            .map_err(|error| ThumbnailError::Internal(format!("a decode step failed: {error}")))?;
        spent += step_started.elapsed();
        permits.clear();
        pool.activity.streamed(fed);
        match stepped? {
            Stepped::More(stepped) => decoder = Some(stepped),
            Stepped::Done(thumbnail) => {
                drop(held);
                return Ok(thumbnail);
            }
        }
    }
}

enum Stepped {
    More(StreamDecoder),
    Done(Thumbnail),
}
