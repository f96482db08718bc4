//! Thumbnails made while the upload arrives, so that the last byte leaves only the last rows,
//! the resize and the encode to do.
//!
//! An [`ImageFeed`] sees every chunk of an image upload. Once the bytes so far hold the header,
//! it plans the decode as [`Thumbnailer::plan`] does, reserves the plan's memory from the budget
//! (plus [`INPUT_BYTES`] for the input it holds, and within `thumbnails.max_streaming_bytes` for
//! all streamed decodes together), and hands the bytes that follow to a decoder in batches of
//! [`STEP_BYTES`]: libjpeg with a suspending data source, the `png` reader over the bytes that
//! arrived. The decoder runs one step per batch (or per run of batches queued meanwhile) on the
//! blocking pool, admitted and given a worker as any decode, so at most `thumbnails.workers`
//! threads decode at once, streamed or not. Steps at least [`STEP_BYTES`] apart keep the work
//! per byte received bounded however the upload is chunked (each step rescans what the last
//! one left unconsumed, at most [`jpeg::MAX_UNCONSUMED`]). Between steps a decoder is plain
//! memory: no thread waits for the network.
//!
//! The streamed decode is an optimisation, never a verdict. It gives up, frees its memory and
//! leaves the image to the decode of the whole body after the last byte (which gives the
//! verdict, so a streamed upload is accepted or refused exactly as a buffered one) when the
//! image cannot stream (GIF, WEBP, interlaced PNG, a header longer than [`MAX_HEADER_BYTES`]),
//! when no memory is free at the header or the streamed decodes' cap is reached, when the
//! upload brings less than a step within `thumbnails.stream_idle_timeout`, when a step finds
//! the queue full or no worker within `thumbnails.queue_timeout`, and when a step fails. Once
//! a JPEG's end marker or a PNG's IEND has been decoded, what follows (a motion photo's video)
//! is stored but not decoded.
//!
//! Dropping the feed (the upload failed, was refused or cancelled, or its stream went idle)
//! cancels the decoder at once if it waits for a worker, else at its next check, and frees its
//! memory once its step has ended.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot},
    task::JoinHandle,
};

use super::{
    CancelOnDrop, Deadline, DecodePlan, Decoding, Header, STOP_WAIT, Thumbnail, ThumbnailError,
    ThumbnailPool, Thumbnailer, jpeg, png, raster::Raster,
};
use crate::{budget::MemoryReservation, files::policy::FileKind};

/// The header (everything before a JPEG's first scan or a PNG's image data) must be within
/// this many bytes for the decode to start before the last byte; EXIF and colour profiles
/// rarely pass 100 KiB.
pub const MAX_HEADER_BYTES: usize = 1 << 20;

/// A streamed decode steps once this many bytes arrived since its last step (or at the end).
pub const STEP_BYTES: usize = 64 * 1024;

/// Batches waiting for the decoder or being decoded, in bytes; the upload waits when this much
/// is queued. Batches are copies of at most [`STEP_BYTES`], whatever the chunk sizes.
const QUEUED_BYTES: usize = 1 << 20;

/// Input a streamed decode may hold besides its plan's peak and the head it started from,
/// whatever the chunk sizes: the batch being filled ([`STEP_BYTES`]), the batches queued or being
/// decoded ([`QUEUED_BYTES`]), during a step the JPEG scan filter's input joined behind what it
/// held back (at most [`QUEUED_BYTES`] + [`jpeg::MAX_HELD_BYTES`]), and libjpeg's buffer: what the
/// last step left unconsumed ([`jpeg::MAX_UNCONSUMED`]) and this step's input after the filter.
/// Every buffer is given back once consumed.
pub const INPUT_BYTES: u64 =
    (STEP_BYTES + 3 * QUEUED_BYTES + 2 * jpeg::MAX_HELD_BYTES + jpeg::MAX_UNCONSUMED) as u64;

/// Below this many bytes received, the header is looked for every [`PLAN_STEP`] bytes.
const EVERY_CHUNK_BELOW: usize = 64 * 1024;
/// Below [`EVERY_CHUNK_BELOW`], the header is parsed again once this many more bytes arrived
/// (at most 128 parses of a small body, whatever its chunking; small enough that a few-KiB image
/// still streams).
const PLAN_STEP: usize = 512;

/// `thumbnails.max_streaming_bytes` is counted in units of this many bytes.
pub(super) const STREAMING_UNIT: u64 = 1024;

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
    /// The bytes since the last batch sent, fewer than [`STEP_BYTES`].
    pending: Vec<u8>,
    input: mpsc::UnboundedSender<Input>,
    queue: Arc<Semaphore>,
    driver: JoinHandle<Outcome>,
    /// The decode's peak as the buffered path counts it (from the header, which the whole body
    /// has too): for the buffered path's memory check on the whole body.
    peak_bytes: u64,
    /// Stops the decode at its next check when the feed is dropped.
    _cancel: CancelOnDrop,
    /// Dropped with the feed: wakes a driver waiting for a worker.
    _alive: oneshot::Sender<()>,
}

enum Input {
    Bytes(Bytes, OwnedSemaphorePermit),
    End,
}

/// How a streamed decode ended.
enum Outcome {
    Made(Thumbnail),
    /// Decode the whole body after the last byte instead (already counted as a fallback).
    Fallback,
    /// The upload's answer (timeout, shutdown, or no worker for the last step).
    Failed(ThumbnailError),
}

/// A decoder between two steps.
enum StreamDecoder {
    Jpeg(Box<jpeg::StreamingJpeg>),
    Png(Box<png::StreamingPng>),
}

impl StreamDecoder {
    /// The decoder for `plan`, if its format and variant can be decoded as they arrive.
    fn new(thumbnailer: &Thumbnailer, plan: &DecodePlan, header: &Header<'_>) -> Option<Self> {
        match (plan.decoding, header) {
            (Decoding::Jpeg { numerator }, Header::Jpeg(header)) => {
                Some(Self::Jpeg(Box::new(jpeg::StreamingJpeg::new(
                    header,
                    numerator,
                    thumbnailer.max_jpeg_scans,
                    plan.peak_bytes,
                ))))
            }
            (Decoding::Png { factor }, Header::Png(header)) => {
                png::StreamingPng::new(header, factor, plan.peak_bytes)
                    .map(|decoder| Self::Png(Box::new(decoder)))
            }
            _ => None,
        }
    }

    fn push(&mut self, pieces: &[Bytes], deadline: &Deadline) -> Result<(), ThumbnailError> {
        match self {
            Self::Jpeg(decoder) => decoder.push(pieces, deadline),
            Self::Png(decoder) => decoder.push(pieces, deadline),
        }
    }

    /// Decoded to the end of the image: later bytes are not needed.
    fn is_complete(&self) -> bool {
        match self {
            Self::Jpeg(decoder) => decoder.is_complete(),
            Self::Png(decoder) => decoder.is_complete(),
        }
    }

    fn handed_bytes(&self) -> u64 {
        match self {
            Self::Jpeg(decoder) => decoder.handed_bytes(),
            Self::Png(decoder) => decoder.handed_bytes(),
        }
    }

    fn finish(self, deadline: &Deadline) -> Result<Raster, ThumbnailError> {
        match self {
            Self::Jpeg(decoder) => (*decoder).finish(deadline),
            Self::Png(decoder) => (*decoder).finish(deadline),
        }
    }
}

/// A streamed decode's memory reservation and its share of the streamed decodes' cap, counted
/// by the pool while they are held.
struct StreamHeld {
    reservation: MemoryReservation,
    _share: OwnedSemaphorePermit,
    pool: Arc<ThumbnailPool>,
}

impl StreamHeld {
    fn new(
        reservation: MemoryReservation,
        share: OwnedSemaphorePermit,
        pool: Arc<ThumbnailPool>,
    ) -> Self {
        pool.activity.reserve(reservation.bytes());
        pool.activity.metrics.streaming_decoders.inc();
        Self {
            reservation,
            _share: share,
            pool,
        }
    }
}

impl Drop for StreamHeld {
    fn drop(&mut self) {
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

    fn fell_back(&self) {
        self.activity.metrics.stream_fallbacks.inc();
    }
}

impl ImageFeed {
    /// Takes the next chunk; `received` is the body so far, this chunk included. Waits while
    /// the decoder is behind by more than [`QUEUED_BYTES`]; never fails: a decode that cannot
    /// (or no longer) stream is done after the last byte instead.
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
                self.state = match self.start(received) {
                    Ok(Some(streaming)) => State::Streaming(streaming),
                    Ok(None) => return,
                    Err(Unstreamable) => {
                        self.pool.fell_back();
                        State::Buffered
                    }
                };
            }
            State::Streaming(streaming) => streaming.push(chunk).await,
            State::Buffered => {}
        }
    }

    /// The last byte has arrived and `whole` is the body: the thumbnail, as
    /// [`ThumbnailPool::make`] would make it from `whole`.
    pub async fn finish(self, whole: Bytes) -> Result<Option<Thumbnail>, ThumbnailError> {
        let Self { pool, kind, state } = self;
        let State::Streaming(mut streaming) = state else {
            return pool.make(kind, whole).await;
        };
        // The buffered path's memory check on the whole body first: a streamed decode needs
        // less memory (it never holds the body twice), but must not accept what `make` refuses.
        // (The rest of `make`'s checks are the header's, passed when the stream started, and
        // the scans', which the stream counts itself.)
        let needed_bytes = streaming.peak_bytes + whole.len() as u64;
        let budget_bytes = pool.budget.main_bytes();
        if needed_bytes > budget_bytes {
            streaming.stop().await;
            return Err(ThumbnailError::TooLargeToDecode {
                needed_bytes,
                budget_bytes,
            });
        }
        streaming.flush().await;
        let Streaming {
            input,
            mut driver,
            _cancel: cancel,
            _alive: alive,
            ..
        } = streaming;
        let _ = input.send(Input::End);
        // A step in flight may still wait for a worker and decode, and the last one after it
        // too; all steps together decode for at most one `thumbnails.timeout`.
        let limit = 2 * pool.queue_timeout + pool.timeout + STOP_WAIT;
        let outcome = match tokio::time::timeout(limit, &mut driver).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(error)) => Outcome::Failed(ThumbnailError::Internal(format!(
                "the thumbnail driver failed: {error}"
            ))),
            Err(_) => {
                Streaming::stopped(cancel, alive, driver).await;
                return Err(ThumbnailError::TimedOut);
            }
        };
        drop(alive);
        match outcome {
            Outcome::Made(thumbnail) => Ok(Some(thumbnail)),
            Outcome::Failed(error) => Err(error),
            // The buffered decode gives the verdict (and the error) on what did not stream.
            Outcome::Fallback => pool.make(kind, whole).await,
        }
    }

    /// Plans from the bytes so far and starts the decoder: `Ok(None)` while the header is
    /// incomplete.
    fn start(&self, received: &[u8]) -> Result<Option<Streaming>, Unstreamable> {
        let pool = &self.pool;
        let (plan, header) = match pool.thumbnailer.plan_with_header(self.kind, received) {
            Ok(Some(planned)) => planned,
            // A header cut short reads as undecodable: look again with more bytes.
            Err(ThumbnailError::Undecodable(_)) if received.len() < MAX_HEADER_BYTES => {
                return Ok(None);
            }
            Ok(None) | Err(_) => return Err(Unstreamable),
        };
        let decoder = StreamDecoder::new(&pool.thumbnailer, &plan, &header).ok_or(Unstreamable)?;
        // The head is held as it arrived, and (as the first step's input) at most twice more:
        // behind the scan filter's held bytes and in libjpeg's buffer.
        let peak_bytes = plan.peak_bytes;
        let needed = peak_bytes + INPUT_BYTES + 3 * received.len() as u64;
        if needed > pool.budget.main_bytes() || pool.closed.load(Ordering::Relaxed) {
            return Err(Unstreamable);
        }
        // Never waits: without room under the cap or memory free right now, the image is simply
        // decoded after its last byte, so a full budget does not hold image uploads at their
        // header, and streamed decodes never hold more than the cap of the budget.
        let units = u32::try_from(needed.div_ceil(STREAMING_UNIT)).map_err(|_| Unstreamable)?;
        let share = pool
            .streaming_memory
            .clone()
            .try_acquire_many_owned(units)
            .map_err(|_| Unstreamable)?;
        let reservation = pool.budget.try_reserve(needed).ok_or(Unstreamable)?;
        let held = StreamHeld::new(reservation, share, pool.clone());
        let (input, inputs) = mpsc::unbounded_channel();
        let queue = Arc::new(Semaphore::new(QUEUED_BYTES));
        let cancel = CancelOnDrop(Deadline::cancellable(pool.closed.clone()));
        let (alive, gone) = oneshot::channel();
        let driver = tokio::spawn(drive(
            Driver {
                plan,
                held,
                cancel: cancel.0.clone(),
                gone,
            },
            decoder,
            Bytes::copy_from_slice(received),
            inputs,
        ));
        Ok(Some(Streaming {
            pending: Vec::new(),
            input,
            queue,
            driver,
            peak_bytes,
            _cancel: cancel,
            _alive: alive,
        }))
    }
}

impl Streaming {
    /// Stops the decoder and waits (at most [`STOP_WAIT`]) until it has: its worker and memory
    /// are free again when the upload gets its answer.
    async fn stop(self) {
        let Self {
            driver,
            _cancel: cancel,
            _alive: alive,
            ..
        } = self;
        Self::stopped(cancel, alive, driver).await;
    }

    async fn stopped(
        cancel: CancelOnDrop,
        alive: oneshot::Sender<()>,
        driver: JoinHandle<Outcome>,
    ) {
        // Both: the decode stops at its next check, a driver waiting for a worker at once.
        cancel.0.cancel();
        drop(alive);
        let _ = tokio::time::timeout(STOP_WAIT, driver).await;
    }

    /// Copies `chunk` into batches of [`STEP_BYTES`] and queues each full one: the queue holds
    /// at most [`QUEUED_BYTES`] whatever the chunk sizes, and no transport buffer is kept alive
    /// by it. Nothing once the driver has ended: it made the thumbnail from the image's end
    /// (the rest is not needed), or gave up (the image is decoded whole).
    async fn push(&mut self, chunk: &Bytes) {
        if self.input.is_closed() {
            return;
        }
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            let room = STEP_BYTES - self.pending.len();
            let (now, later) = rest.split_at(room.min(rest.len()));
            if self.pending.capacity() == 0 {
                self.pending.reserve_exact(STEP_BYTES);
            }
            self.pending.extend_from_slice(now);
            rest = later;
            if self.pending.len() == STEP_BYTES && !self.send_pending().await {
                return;
            }
        }
    }

    /// Queues what is pending, however little: the upload has ended.
    async fn flush(&mut self) {
        if !self.pending.is_empty() && !self.input.is_closed() {
            self.send_pending().await;
        }
    }

    async fn send_pending(&mut self) -> bool {
        let batch = Bytes::from(std::mem::take(&mut self.pending));
        let Ok(permit) = self
            .queue
            .clone()
            .acquire_many_owned(batch.len() as u32)
            .await
        else {
            return false;
        };
        self.input.send(Input::Bytes(batch, permit)).is_ok()
    }
}

impl Thumbnailer {
    /// The streamed decode on the calling thread, `bytes` arriving in pieces of `piece` bytes:
    /// planned from the first pieces that hold the header, then decoded piece by piece (one step
    /// per piece, so it suspends everywhere), without the pool and without falling back to a
    /// whole decode (for fuzzing and tests). Kinds and variants that do not stream are decoded
    /// whole.
    pub fn make_in_pieces(
        &self,
        kind: FileKind,
        bytes: &[u8],
        piece: usize,
    ) -> Result<Option<Thumbnail>, ThumbnailError> {
        let piece = piece.max(1);
        let mut received = 0;
        let (plan, header) = loop {
            received = (received + piece).min(bytes.len());
            match self.plan_with_header(kind, &bytes[..received]) {
                Ok(Some(planned)) => break planned,
                Ok(None) => return Ok(None),
                Err(ThumbnailError::Undecodable(_)) if received < bytes.len() => {}
                Err(error) => return Err(error),
            }
        };
        let Some(mut decoder) = StreamDecoder::new(self, &plan, &header) else {
            return self.render(&plan, bytes).map(Some);
        };
        let deadline = Deadline::none();
        decoder.push(&[Bytes::copy_from_slice(&bytes[..received])], &deadline)?;
        for chunk in bytes[received..].chunks(piece) {
            decoder.push(&[Bytes::copy_from_slice(chunk)], &deadline)?;
        }
        let decoded = decoder.finish(&deadline)?;
        self.thumbnail(&plan, decoded).map(Some)
    }
}

/// The decode cannot (or can no longer) follow the upload.
struct Unstreamable;

/// What a driver holds for its whole life.
struct Driver {
    plan: DecodePlan,
    held: StreamHeld,
    /// The feed's cancellation and the pool's closing, checked by every step.
    cancel: Deadline,
    /// Resolves when the feed is dropped.
    gone: oneshot::Receiver<()>,
}

/// What one step got: the decoder back (more to come) or the thumbnail (the end).
enum Stepped {
    More(StreamDecoder),
    Done(Thumbnail),
}

/// Runs the decoder one step per batch (or run of queued batches), each step admitted to the
/// pool and on the blocking pool with a worker slot; all steps together get one
/// `thumbnails.timeout` of decoding, as a buffered decode does (a caller pacing its bytes cannot
/// buy more CPU). After the end, the last step makes the thumbnail. Ends early, freeing the
/// memory, when the feed is dropped, the upload idles, no worker comes, or a step fails.
async fn drive(
    mut driver: Driver,
    decoder: StreamDecoder,
    head: Bytes,
    mut inputs: mpsc::UnboundedReceiver<Input>,
) -> Outcome {
    let pool = driver.held.pool.clone();
    let mut decoder = Some(decoder);
    // Time the steps have spent so far, against the one timeout they share.
    let mut spent = Duration::ZERO;
    let mut batch = vec![head];
    let mut permits = Vec::new();
    let mut ended = false;
    loop {
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
            // Less than a step within the idle timeout: give the memory back, decode at the end.
            match tokio::time::timeout(pool.stream_idle_timeout, inputs.recv()).await {
                Ok(Some(Input::Bytes(bytes, permit))) => {
                    batch.push(bytes);
                    permits.push(permit);
                }
                Ok(Some(Input::End)) => ended = true,
                // The feed was dropped: the upload is over without its last byte.
                Ok(None) => return Outcome::Failed(ThumbnailError::TimedOut),
                Err(_idle) => return fall_back(&pool),
            }
            continue;
        }
        let (worker, admitted) = match worker(&pool, &mut driver.gone).await {
            Some(Ok(slot)) => slot,
            // Mid-upload, a busy pool only costs the head start: the decode of the whole body
            // after the last byte is admitted (or refused) on its own.
            Some(Err(ThumbnailError::WorkersBusy)) if !ended => return fall_back(&pool),
            Some(Err(error)) => return Outcome::Failed(error),
            None => return Outcome::Failed(ThumbnailError::TimedOut),
        };
        let remaining = pool.timeout.saturating_sub(spent);
        if remaining.is_zero() {
            return Outcome::Failed(ThumbnailError::TimedOut);
        }
        let step_started = Instant::now();
        let deadline = driver.cancel.until(step_started.checked_add(remaining));
        let Some(mut stepping) = decoder.take() else {
            return Outcome::Failed(ThumbnailError::Internal(
                "the streamed decoder was lost".into(),
            ));
        };
        let chunks = std::mem::take(&mut batch);
        let fed: u64 = chunks.iter().map(|chunk| chunk.len() as u64).sum();
        let thumbnailer = pool.thumbnailer.clone();
        let plan = driver.plan.clone();
        let step = tokio::task::spawn_blocking(move || {
            let _worker = worker;
            let _admitted = admitted;
            deadline.check()?;
            let before = stepping.handed_bytes();
            stepping.push(&chunks, &deadline)?;
            drop(chunks);
            let handed = stepping.handed_bytes() - before;
            // Once the image is decoded to its end, what follows cannot change the thumbnail:
            // it is made now, and the decoder's memory freed before the upload ends.
            if !ended && !stepping.is_complete() {
                return Ok((Stepped::More(stepping), handed));
            }
            let decoded = stepping.finish(&deadline)?;
            deadline.check()?;
            thumbnailer
                .thumbnail(&plan, decoded)
                .map(|thumbnail| (Stepped::Done(thumbnail), handed))
        });
        let stepped = match step.await {
            Ok(stepped) => stepped,
            Err(error) => {
                return Outcome::Failed(ThumbnailError::Internal(format!(
                    "a decode step failed: {error}"
                )));
            }
        };
        spent += step_started.elapsed();
        permits.clear();
        match stepped {
            Ok((stepped, handed)) => {
                pool.activity.stepped(Some((fed, handed)));
                match stepped {
                    Stepped::More(stepped) => decoder = Some(stepped),
                    // Before the upload's end, too: the rest of it (a motion photo's video) is
                    // stored but neither queued nor decoded.
                    Stepped::Done(thumbnail) => return Outcome::Made(thumbnail),
                }
            }
            Err(error) => {
                pool.activity.stepped(None);
                return match error {
                    // Waiting again would not help: the server is closing, or the decode took
                    // its whole time.
                    ThumbnailError::ShuttingDown | ThumbnailError::TimedOut => {
                        Outcome::Failed(error)
                    }
                    // The buffered decode gives the verdict on what did not stream.
                    _ => fall_back(&pool),
                };
            }
        }
    }
}

/// The step's place, as for any decode ([`ThumbnailPool::slot`]). `None` when the feed was
/// dropped meanwhile (its memory then goes back at once, not after the queue timeout).
async fn worker(
    pool: &Arc<ThumbnailPool>,
    gone: &mut oneshot::Receiver<()>,
) -> Option<Result<(OwnedSemaphorePermit, OwnedSemaphorePermit), ThumbnailError>> {
    tokio::select! {
        biased;
        _ = gone => None,
        slot = pool.slot() => Some(slot),
    }
}

/// Gives up streaming (the driver's memory goes with it): the image is decoded whole after its
/// last byte.
fn fall_back(pool: &ThumbnailPool) -> Outcome {
    pool.fell_back();
    Outcome::Fallback
}
