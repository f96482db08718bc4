//! Thumbnails of uploaded images: JPEG, PNG, GIF (first frame) and WEBP in, a JPEG (opaque) or
//! PNG (real transparency) out that fits `thumbnails.max_edge`, upright per EXIF orientation,
//! without any metadata (the encoders write no EXIF, ICC, text or time chunks).
//!
//! Decoding does only what the thumbnail needs:
//! - JPEG: libjpeg-turbo (the `mozjpeg` crate) decodes at 1/8, 1/4, 1/2 or 1/1 scale inside the
//!   IDCT, the smallest that still covers the thumbnail (zune-jpeg has no reduced decode). A
//!   progressive file decoded at 1/8 first loses the AC scans of its full-resolution components,
//!   which cannot change an output pixel at that scale (a byte-identical result, 3-5x faster).
//! - PNG: decoded row by row (`png`) and box-shrunk as the rows arrive, to no less than twice
//!   the thumbnail, so the full-size image is never held (interlaced files excepted).
//! - GIF and WEBP: their decoders produce whole frames; the frame is box-shrunk the same way.
//!
//! A final Lanczos3 pass (`fast_image_resize`, SIMD chosen at run time, alpha premultiplied so
//! transparent pixels lend no colour to the edges) brings the image to size, then it is turned
//! upright and encoded (`jpeg-encoder` 4:2:0, or `png`). CMYK and YCCK JPEGs are converted to
//! RGB without a colour profile; 16-bit and palette PNGs are expanded to 8-bit.
//!
//! HEIC/HEIF get no thumbnail ([`ThumbnailPool::make`] returns `None`): the only well-kept
//! decoder is the C library libheif (plus libde265), which would add system libraries to every
//! build and image, and a large C attack surface; HEIF uploads are stored as they are.
//!
//! An upload's JPEG or PNG is decoded while its bytes arrive ([`ImageFeed`], `feed.rs`): the
//! same decoders, fed a step per [`STEP_BYTES`] received on the same pool (each step admitted and
//! given a worker like any decode), so that after the last byte only the last rows, the resize
//! and the encode remain; whatever cannot stream, or stops streaming, is decoded as below.
//!
//! [`ThumbnailPool`] runs the work off the async runtime on at most `thumbnails.workers`
//! blocking threads, admits at most [`QUEUE_PER_WORKER`] waiting jobs per worker, each waiting
//! at most `thumbnails.queue_timeout`, refuses a decode whose peak memory (computed from the
//! header and the scale it decodes at, see [`DecodePlan::peak_bytes`]) exceeds the whole
//! uploads' [`MemoryBudget`] and reserves it from the budget otherwise, and gives up after
//! `thumbnails.timeout`.
//!
//! The work itself is bounded too, so that a timeout really frees the worker and the memory:
//! every decoder checks the deadline (and the caller's cancellation, and the pool's shutdown)
//! between rows; libjpeg from its progress monitor, which also stops a JPEG at its
//! `thumbnails.max_jpeg_scans`-th scan (files with more are refused from their markers before
//! they take a worker). [`Thumbnailer`] is the synchronous core, for callers that manage their
//! own threads (and the benchmark).
//!
//! libjpeg reports fatal errors (and the progress monitor its stops) by unwinding through its C
//! frames ("C-unwind"), caught in `jpeg/libjpeg.rs`: the crate must not be built with
//! `panic = "abort"`.

mod feed;
mod gif;
mod jpeg;
mod output;
mod png;
mod raster;
mod webp;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use feed::{INPUT_BYTES, ImageFeed, MAX_HEADER_BYTES, STEP_BYTES};
pub use raster::Orientation;

use crate::{
    budget::{MemoryBudget, MemoryReservation},
    config::ThumbnailSettings,
    error::{Error, ErrorKind, Reason},
    files::policy::FileKind,
};

/// Jobs that may wait for a worker, per worker, before new ones are refused as busy.
pub const QUEUE_PER_WORKER: usize = 8;

/// After its deadline, how long a decode gets to notice and stop before the caller is answered
/// anyway (libjpeg, PNG and GIF check between rows; a WEBP frame cannot be interrupted).
const STOP_WAIT: Duration = Duration::from_secs(1);

/// A JPEG is decoded at the smallest IDCT scale that is at least this many times the thumbnail
/// on each axis. libjpeg-turbo keeps 4:2:0 chroma at full reduced resolution even at 1/8 (it
/// scales the chroma IDCT up instead of upsampling), so 1x is enough, as in libvips.
const JPEG_OVERSAMPLE: u32 = 1;

/// An encoded thumbnail and the size of the image it was made from.
#[derive(Debug, Clone)]
pub struct Thumbnail {
    pub bytes: Bytes,
    /// `image/jpeg` or `image/png`.
    pub content_type: &'static str,
    pub width: u32,
    pub height: u32,
    /// The source image's size as displayed, i.e. after EXIF orientation.
    pub source_width: u32,
    pub source_height: u32,
}

/// Why no thumbnail was made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ThumbnailError {
    /// The header looked fine but the image is not decodable (truncated, corrupt, unsupported
    /// variant). The upload should be refused: `INVALID_ARGUMENT`, `IMAGE_UNDECODABLE`.
    #[error("the image cannot be decoded: {0}")]
    Undecodable(String),
    /// More pixels than allowed; found from the header, before any decode.
    #[error("the image is {width}x{height} pixels, more than the {max_pixels} allowed")]
    TooLarge {
        width: u32,
        height: u32,
        max_pixels: u64,
    },
    /// A JPEG with more scans than `thumbnails.max_jpeg_scans` (a progressive file has about
    /// ten): refused from its markers, or stopped by libjpeg's progress monitor.
    #[error("the JPEG has more than {max_scans} scans")]
    TooManyScans { max_scans: u32 },
    /// The decode's peak memory plus the uploaded bytes it reads exceed the whole budget
    /// (`uploads.memory_budget`): it could never run, so it is refused at once, not after
    /// waiting.
    #[error(
        "decoding the image needs {needed_bytes} bytes of memory, more than the {budget_bytes} \
         the server has for all uploads"
    )]
    TooLargeToDecode {
        needed_bytes: u64,
        budget_bytes: u64,
    },
    /// The memory budget stayed exhausted for its wait timeout; a retry later may succeed.
    #[error("too many images are being decoded; retry shortly")]
    Busy,
    /// The queue was full, or no worker came free within `thumbnails.queue_timeout`; a retry
    /// later may succeed.
    #[error("every thumbnail worker is busy; retry shortly")]
    WorkersBusy,
    /// The decode took longer than `thumbnails.timeout` (or its caller went away).
    #[error("decoding the image took too long")]
    TimedOut,
    /// The pool was closed by the server's shutdown.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A bug or resource failure on our side, not the image's fault.
    #[error("thumbnail failed: {0}")]
    Internal(String),
}

/// How soon a thumbnail refused for lack of workers or memory is worth retrying.
const THUMBNAIL_RETRY_DELAY: Duration = Duration::from_secs(1);

/// What a caller is told when no thumbnail could be made; busy servers ask for a retry.
impl From<ThumbnailError> for Error {
    fn from(error: ThumbnailError) -> Self {
        match error {
            ThumbnailError::Undecodable(detail) => Error::invalid(
                Reason::ImageUndecodable,
                format!("the image cannot be decoded: {detail}"),
            ),
            too_large @ ThumbnailError::TooLarge { .. } => {
                Error::invalid(Reason::ImageTooLarge, too_large.to_string())
            }
            ThumbnailError::TooManyScans { max_scans } => Error::invalid(
                Reason::ImageTooComplex,
                format!("a JPEG may have at most {max_scans} scans; this one has more"),
            )
            .with_metadata("max_jpeg_scans", max_scans.to_string()),
            // Fits no budget this server will ever have free: retrying cannot help.
            ThumbnailError::TooLargeToDecode {
                needed_bytes,
                budget_bytes,
            } => Error::invalid(
                Reason::ImageTooLargeToDecode,
                format!(
                    "decoding the image needs {needed_bytes} bytes of memory, more than the \
                     {budget_bytes} this server has for all uploads together"
                ),
            )
            .with_metadata("decode_bytes", needed_bytes.to_string())
            .with_metadata("memory_budget_bytes", budget_bytes.to_string()),
            // Too many images at once: the same upload may succeed shortly.
            ThumbnailError::Busy => Error::new(
                ErrorKind::ResourceExhausted,
                Reason::UploadMemoryBusy,
                "the server is decoding too many images; retry shortly",
            )
            .with_retry_delay(THUMBNAIL_RETRY_DELAY),
            ThumbnailError::WorkersBusy => Error::new(
                ErrorKind::ResourceExhausted,
                Reason::ThumbnailWorkersBusy,
                "every image decoder is busy; retry shortly",
            )
            .with_retry_delay(THUMBNAIL_RETRY_DELAY),
            ThumbnailError::TimedOut => Error::new(
                ErrorKind::Unavailable,
                Reason::ImageDecodeTimeout,
                "making the image's thumbnail took too long; retry shortly",
            ),
            ThumbnailError::ShuttingDown => Error::new(
                ErrorKind::Unavailable,
                Reason::BackendUnavailable,
                "the server is shutting down; retry",
            ),
            ThumbnailError::Internal(detail) => Error::internal(detail),
        }
    }
}

/// How one image will be decoded, read from its header alone.
#[derive(Debug, Clone)]
pub struct DecodePlan {
    orientation: Orientation,
    /// Source size as stored.
    stored: (u32, u32),
    /// Thumbnail size before turning upright.
    target: (u32, u32),
    decoding: Decoding,
    peak_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
enum Decoding {
    /// IDCT scale numerator over 8.
    Jpeg {
        numerator: u8,
    },
    /// Box pre-shrink factor applied while rows arrive.
    Png {
        factor: u32,
    },
    Gif,
    Webp,
}

impl DecodePlan {
    /// The source's size as displayed (after EXIF orientation).
    pub fn source_size(&self) -> (u32, u32) {
        self.orientation.displayed(self.stored.0, self.stored.1)
    }

    /// The thumbnail's size.
    pub fn thumbnail_size(&self) -> (u32, u32) {
        self.orientation.displayed(self.target.0, self.target.1)
    }

    pub fn orientation(&self) -> Orientation {
        self.orientation
    }

    /// Upper bound of the bytes the decode, resize and encode hold at once (the uploaded bytes
    /// themselves not included); this is what is reserved from the memory budget.
    pub fn peak_bytes(&self) -> u64 {
        self.peak_bytes
    }

    /// The size the decoder produces before the final resize (the reduced scale).
    pub fn decoded_size(&self) -> (u32, u32) {
        match self.decoding {
            Decoding::Jpeg { numerator } => {
                let scale = |side: u32| (u64::from(side) * u64::from(numerator)).div_ceil(8) as u32;
                (scale(self.stored.0), scale(self.stored.1))
            }
            Decoding::Png { factor } => (
                self.stored.0.div_ceil(factor),
                self.stored.1.div_ceil(factor),
            ),
            Decoding::Gif | Decoding::Webp => self.stored,
        }
    }
}

/// What an image's header says, per format.
enum Header<'a> {
    Jpeg(jpeg::JpegHeader<'a>),
    Png(png::PngHeader<'a>),
    /// The logical screen size.
    Gif((u32, u32)),
    Webp(webp::WebpHeader),
}

/// Stops a decode between rows once its time is up, its caller has gone, or the pool closed.
#[derive(Debug, Clone)]
struct Deadline {
    at: Option<Instant>,
    cancelled: Arc<AtomicBool>,
    /// The pool's: set once, at shutdown, for every decode.
    closed: Arc<AtomicBool>,
}

impl Deadline {
    fn none() -> Self {
        Self {
            at: None,
            cancelled: Arc::new(AtomicBool::new(false)),
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    fn after(timeout: Duration, closed: Arc<AtomicBool>) -> Self {
        Self {
            at: Instant::now().checked_add(timeout),
            closed,
            ..Self::none()
        }
    }

    /// No time limit (yet), stopped by [`Self::cancel`] or the pool's closing.
    fn cancellable(closed: Arc<AtomicBool>) -> Self {
        Self {
            closed,
            ..Self::none()
        }
    }

    /// The same cancellation and closing, with a time limit at `at`.
    fn until(&self, at: Option<Instant>) -> Self {
        Self { at, ..self.clone() }
    }

    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    fn check(&self) -> Result<(), ThumbnailError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(ThumbnailError::ShuttingDown);
        }
        let expired = self.at.is_some_and(|at| Instant::now() >= at);
        if expired || self.cancelled.load(Ordering::Relaxed) {
            Err(ThumbnailError::TimedOut)
        } else {
            Ok(())
        }
    }
}

/// Cancels the decode when the waiting caller goes away (or gives up).
struct CancelOnDrop(Deadline);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// The synchronous core: one image in, one thumbnail out, on the calling thread.
#[derive(Debug, Clone)]
pub struct Thumbnailer {
    max_edge: u32,
    jpeg_quality: u8,
    max_pixels: u64,
    max_jpeg_scans: u32,
}

impl Thumbnailer {
    /// `max_pixels` is `uploads.max_image_pixels`: larger images are refused from the header.
    pub fn new(settings: &ThumbnailSettings, max_pixels: u64) -> Self {
        Self {
            max_edge: settings.max_edge.max(1),
            jpeg_quality: settings.jpeg_quality.clamp(1, 100),
            max_pixels,
            max_jpeg_scans: settings.max_jpeg_scans.max(1),
        }
    }

    /// Reads the header only (and a JPEG's markers, to count its scans): sizes, orientation,
    /// the reduced scale and the peak memory. `None` for kinds that get no thumbnail
    /// (HEIC/HEIF, documents).
    pub fn plan(&self, kind: FileKind, bytes: &[u8]) -> Result<Option<DecodePlan>, ThumbnailError> {
        Ok(self.plan_with_header(kind, bytes)?.map(|(plan, _)| plan))
    }

    /// [`Self::plan`], with the header it was read from (for a decoder that needs it too).
    fn plan_with_header<'a>(
        &self,
        kind: FileKind,
        bytes: &'a [u8],
    ) -> Result<Option<(DecodePlan, Header<'a>)>, ThumbnailError> {
        let header = match kind {
            FileKind::Jpeg => Header::Jpeg(jpeg::read_header(bytes)?),
            FileKind::Png => Header::Png(png::read_header(bytes)?),
            FileKind::Gif => Header::Gif(gif::read_header(bytes)?),
            FileKind::Webp => Header::Webp(webp::read_header(bytes)?),
            _ => return Ok(None),
        };
        let (stored, exif, channels, alpha) = match &header {
            Header::Jpeg(jpeg) => (
                (jpeg.width, jpeg.height),
                jpeg.exif,
                jpeg.sampling.len().min(3),
                false,
            ),
            Header::Png(png) => (
                (png.width, png.height),
                png.exif,
                png.layout.channels(),
                png.layout.has_alpha(),
            ),
            Header::Gif(size) => (*size, None, 4, true),
            Header::Webp(webp) => ((webp.width, webp.height), webp.exif.as_deref(), 4, true),
        };
        if u64::from(stored.0) * u64::from(stored.1) > self.max_pixels {
            return Err(ThumbnailError::TooLarge {
                width: stored.0,
                height: stored.1,
                max_pixels: self.max_pixels,
            });
        }
        if matches!(header, Header::Jpeg(_))
            && jpeg::has_more_scans_than(bytes, self.max_jpeg_scans)
        {
            return Err(ThumbnailError::TooManyScans {
                max_scans: self.max_jpeg_scans,
            });
        }
        let orientation = exif.map(raster::exif_orientation).unwrap_or_default();
        let (displayed_width, displayed_height) = orientation.displayed(stored.0, stored.1);
        let thumbnail = raster::fit(displayed_width, displayed_height, self.max_edge);
        let target = orientation.displayed(thumbnail.0, thumbnail.1);
        let (decoding, decode_bytes) = match &header {
            Header::Jpeg(jpeg) => {
                let numerator = jpeg::scale_numerator(jpeg, target, JPEG_OVERSAMPLE);
                let bytes = jpeg::decode_bytes(jpeg, numerator, bytes.len() as u64);
                (Decoding::Jpeg { numerator }, bytes)
            }
            Header::Png(png) => {
                let factor = raster::box_factor(stored.0, stored.1, target);
                (Decoding::Png { factor }, png::decode_bytes(png, factor))
            }
            Header::Gif(_) => (Decoding::Gif, gif::decode_bytes(stored.0, stored.1)),
            Header::Webp(webp) => (Decoding::Webp, webp::decode_bytes(webp)),
        };
        let mut plan = DecodePlan {
            orientation,
            stored,
            target,
            decoding,
            peak_bytes: 0,
        };
        plan.peak_bytes = decode_bytes + resize_bytes(&plan, channels as u64, alpha);
        Ok(Some((plan, header)))
    }

    /// Decodes, resizes and encodes as `plan` says.
    pub fn render(&self, plan: &DecodePlan, bytes: &[u8]) -> Result<Thumbnail, ThumbnailError> {
        self.render_until(plan, bytes, &Deadline::none())
    }

    /// [`Self::plan`] and [`Self::render`] in one.
    pub fn make(&self, kind: FileKind, bytes: &[u8]) -> Result<Option<Thumbnail>, ThumbnailError> {
        match self.plan(kind, bytes)? {
            Some(plan) => self.render(&plan, bytes).map(Some),
            None => Ok(None),
        }
    }

    fn render_until(
        &self,
        plan: &DecodePlan,
        bytes: &[u8],
        deadline: &Deadline,
    ) -> Result<Thumbnail, ThumbnailError> {
        let decoded = match plan.decoding {
            Decoding::Jpeg { numerator } => {
                let header = jpeg::read_header(bytes)?;
                let limits = jpeg::Limits {
                    max_scans: self.max_jpeg_scans,
                    max_memory: plan.peak_bytes,
                    deadline,
                };
                jpeg::decode(bytes, &header, numerator, &limits)?
            }
            Decoding::Png { factor } => {
                let header = png::read_header(bytes)?;
                png::decode(bytes, &header, factor, plan.peak_bytes, deadline)?
            }
            Decoding::Gif => {
                let frame = gif::decode(bytes, plan.stored.0, plan.stored.1, deadline)?;
                raster::pre_shrink(frame, plan.target)?
            }
            // image-webp decodes a frame in one call, with no point to stop at: its work is
            // bounded by the pixel limit alone.
            Decoding::Webp => {
                deadline.check()?;
                raster::pre_shrink(webp::decode(bytes)?, plan.target)?
            }
        };
        deadline.check()?;
        self.thumbnail(plan, decoded)
    }

    /// Resizes, turns upright and encodes what the decoder produced.
    fn thumbnail(
        &self,
        plan: &DecodePlan,
        decoded: raster::Raster,
    ) -> Result<Thumbnail, ThumbnailError> {
        let encoded = output::finish(decoded, plan.target, plan.orientation, self.jpeg_quality)?;
        let (source_width, source_height) = plan.source_size();
        Ok(Thumbnail {
            bytes: Bytes::from(encoded.bytes),
            content_type: encoded.content_type,
            width: encoded.width,
            height: encoded.height,
            source_width,
            source_height,
        })
    }
}

/// The final resize's buffers: a premultiplied (or alpha-stripped) copy of the decoded image
/// when it has alpha, the intermediate pass, the result, its upright copy, and the encoder's
/// output and compressor state.
fn resize_bytes(plan: &DecodePlan, channels: u64, alpha: bool) -> u64 {
    let (source_width, source_height) = plan.decoded_size();
    let (source_width, source_height) = (u64::from(source_width), u64::from(source_height));
    let (width, height) = (u64::from(plan.target.0), u64::from(plan.target.1));
    let copy = if alpha {
        source_width * source_height * channels
    } else {
        0
    };
    let intermediate = (width * source_height).max(source_width * height) * channels;
    copy + intermediate + 3 * width * height * channels + 512 * 1024
}

/// Runs thumbnails off the async runtime: bounded workers, a bounded queue with a bounded wait,
/// memory reserved from the shared budget before each decode, and a time limit.
pub struct ThumbnailPool {
    thumbnailer: Arc<Thumbnailer>,
    budget: Arc<MemoryBudget>,
    /// Jobs admitted: running or waiting for a worker (streamed steps too).
    admitted: Arc<Semaphore>,
    admitted_limit: usize,
    workers: Arc<Semaphore>,
    timeout: Duration,
    queue_timeout: Duration,
    /// Set by [`ThumbnailPool::close`]; every decode checks it.
    closed: Arc<AtomicBool>,
    /// Memory all streamed decodes may hold together, in KiB (`thumbnails.max_streaming_bytes`).
    streaming_memory: Arc<Semaphore>,
    /// A streamed decode that gets no step's worth of bytes for this long is dropped.
    stream_idle_timeout: Duration,
    activity: Arc<Activity>,
}

/// What the pool's decodes hold and have done; what the metrics already count is read from
/// them.
#[derive(Debug, Default)]
struct Activity {
    decoding: AtomicUsize,
    /// Steps of streamed decodes run (each on a worker), failed ones included.
    stream_steps: AtomicU64,
    /// Bytes the streamed decoders were handed over all steps, those left unconsumed by one step
    /// counted again at the next: the work the decoders did for the bytes received.
    handed_bytes: AtomicU64,
    metrics: ThumbnailMetrics,
}

impl Activity {
    fn reserve(&self, bytes: u64) {
        self.metrics
            .reserved_bytes
            .inc_by(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    fn release(&self, bytes: u64) {
        self.metrics
            .reserved_bytes
            .dec_by(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// A streamed step ran; it succeeded with `fed` new bytes after handing the decoder
    /// `handed` (the new ones and what earlier steps left unconsumed).
    fn stepped(&self, succeeded: Option<(u64, u64)>) {
        self.stream_steps.fetch_add(1, Ordering::Relaxed);
        if let Some((fed, handed)) = succeeded {
            self.metrics.streamed_bytes.inc_by(fed);
            self.handed_bytes.fetch_add(handed, Ordering::Relaxed);
        }
    }
}

/// The pool's Prometheus series (registered in [`crate::metrics::Metrics`]).
#[derive(Debug, Clone, Default)]
pub struct ThumbnailMetrics {
    /// `thumbnail_streaming_decoders`: decoders following an upload in progress.
    pub streaming_decoders: Gauge,
    /// `thumbnail_streamed_bytes`: bytes those decoders consumed as they arrived (in steps that
    /// succeeded).
    pub streamed_bytes: Counter,
    /// `thumbnail_stream_fallbacks`: images decoded after their last byte instead (format,
    /// long header, no memory at the header, the streamed decodes' memory cap, an upload idle
    /// between steps, no worker for a step, or the streamed decode failed).
    pub stream_fallbacks: Counter,
    /// `thumbnail_reserved_bytes`: memory budget held by decodes, streamed or not.
    pub reserved_bytes: Gauge,
}

/// A running decode's worker slot and memory, given back when the decode has really ended.
struct Held {
    _worker: OwnedSemaphorePermit,
    reservation: MemoryReservation,
    activity: Arc<Activity>,
}

impl Held {
    fn new(
        worker: OwnedSemaphorePermit,
        reservation: MemoryReservation,
        activity: Arc<Activity>,
    ) -> Self {
        activity.decoding.fetch_add(1, Ordering::Relaxed);
        activity.reserve(reservation.bytes());
        Self {
            _worker: worker,
            reservation,
            activity,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.activity.decoding.fetch_sub(1, Ordering::Relaxed);
        self.activity.release(self.reservation.bytes());
    }
}

impl ThumbnailPool {
    pub fn new(settings: &ThumbnailSettings, max_pixels: u64, budget: Arc<MemoryBudget>) -> Self {
        let workers = match settings.workers {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            workers => workers,
        };
        // At most half the budget's main pool, whatever the setting: streamed decodes take their
        // memory without waiting, so a cap at or above a small budget would let them starve the
        // uploads' own buffers.
        let streaming_bytes = settings
            .max_streaming_bytes
            .as_u64()
            .min(budget.main_bytes() / 2);
        let streaming_units =
            (streaming_bytes / feed::STREAMING_UNIT).min(Semaphore::MAX_PERMITS as u64) as usize;
        Self {
            thumbnailer: Arc::new(Thumbnailer::new(settings, max_pixels)),
            budget,
            admitted: Arc::new(Semaphore::new(workers * (1 + QUEUE_PER_WORKER))),
            admitted_limit: workers * (1 + QUEUE_PER_WORKER),
            workers: Arc::new(Semaphore::new(workers)),
            timeout: settings.timeout,
            queue_timeout: settings.queue_timeout,
            closed: Arc::new(AtomicBool::new(false)),
            streaming_memory: Arc::new(Semaphore::new(streaming_units)),
            stream_idle_timeout: settings.stream_idle_timeout,
            activity: Arc::default(),
        }
    }

    /// Reports to these series (the app's registry) instead of unregistered ones.
    pub fn with_metrics(mut self, metrics: ThumbnailMetrics) -> Self {
        self.activity = Arc::new(Activity {
            metrics,
            ..Activity::default()
        });
        self
    }

    /// Decoders following uploads in progress (see [`ImageFeed`]), each holding its memory.
    pub fn streaming(&self) -> usize {
        usize::try_from(self.activity.metrics.streaming_decoders.get()).unwrap_or(0)
    }

    /// Bytes the streamed decoders have consumed so far, in all, in steps that succeeded.
    pub fn streamed_bytes(&self) -> u64 {
        self.activity.metrics.streamed_bytes.get()
    }

    /// Images that were to be decoded while they arrived and were decoded whole instead.
    pub fn stream_fallbacks(&self) -> u64 {
        self.activity.metrics.stream_fallbacks.get()
    }

    /// Steps of streamed decodes run so far, failed ones included.
    pub fn stream_steps(&self) -> u64 {
        self.activity.stream_steps.load(Ordering::Relaxed)
    }

    /// Bytes handed to the streamed decoders so far, counted once per step that was handed
    /// them (the decoders' work for what they received, see [`STEP_BYTES`]).
    pub fn handed_bytes(&self) -> u64 {
        self.activity.handed_bytes.load(Ordering::Relaxed)
    }

    /// Decodes admitted (running, or waiting for a worker), streamed steps included.
    pub fn admitted(&self) -> usize {
        self.admitted_limit - self.admitted.available_permits()
    }

    /// Stops every running decode at its next check and refuses new ones: at shutdown, so no
    /// blocking thread outlives the grace period.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.workers.close();
    }

    pub fn thumbnailer(&self) -> &Thumbnailer {
        &self.thumbnailer
    }

    /// Decodes running now (each holding a worker and its memory reservation).
    pub fn decoding(&self) -> usize {
        self.activity.decoding.load(Ordering::Relaxed)
    }

    /// Bytes of the memory budget the running decodes (streamed ones included) hold.
    pub fn reserved_bytes(&self) -> u64 {
        u64::try_from(self.activity.metrics.reserved_bytes.get()).unwrap_or(0)
    }

    /// A place for one decode, streamed step or whole body: admitted to the queue at once or
    /// `WorkersBusy`, then a worker within `thumbnails.queue_timeout` or `WorkersBusy`. Returns
    /// (worker, admission).
    pub(super) async fn slot(
        &self,
    ) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit), ThumbnailError> {
        let admitted = self
            .admitted
            .clone()
            .try_acquire_owned()
            .map_err(|_| ThumbnailError::WorkersBusy)?;
        match tokio::time::timeout(self.queue_timeout, self.workers.clone().acquire_owned()).await {
            Ok(Ok(worker)) => Ok((worker, admitted)),
            Ok(Err(_closed)) => Err(ThumbnailError::ShuttingDown),
            Err(_) => Err(ThumbnailError::WorkersBusy),
        }
    }

    /// The plan for a thumbnail of `bytes`, or why it is refused before any decoding: what
    /// both a buffered and a streamed decode must pass, so both give the same verdict.
    pub(super) fn decodable(
        &self,
        kind: FileKind,
        bytes: &[u8],
    ) -> Result<Option<DecodePlan>, ThumbnailError> {
        let Some(plan) = self.thumbnailer.plan(kind, bytes)? else {
            return Ok(None);
        };
        // The uploaded body stays reserved by its upload while the decode runs; both come from
        // the budget's main pool (the first-bytes pool only ever holds partial buffers).
        let needed_bytes = plan.peak_bytes + bytes.len() as u64;
        let budget_bytes = self.budget.main_bytes();
        if needed_bytes > budget_bytes {
            return Err(ThumbnailError::TooLargeToDecode {
                needed_bytes,
                budget_bytes,
            });
        }
        Ok(Some(plan))
    }

    /// Makes the thumbnail of an image of `kind`; `None` when the kind gets none (HEIC/HEIF).
    ///
    /// Refused at once with [`ThumbnailError::TooLarge`], [`ThumbnailError::TooManyScans`] or
    /// [`ThumbnailError::Undecodable`] when the header says so, with
    /// [`ThumbnailError::TooLargeToDecode`] when its memory could never fit the budget, with
    /// [`ThumbnailError::WorkersBusy`] when the queue is full or no worker comes free within
    /// `thumbnails.queue_timeout`, and with [`ThumbnailError::Busy`] when the memory budget
    /// stays exhausted for its wait timeout. A decode stops at its next row once
    /// `thumbnails.timeout` passes or this future is dropped; the timeout is answered once it
    /// has stopped (or after [`STOP_WAIT`]), so its worker and memory are free again by then.
    pub async fn make(
        &self,
        kind: FileKind,
        bytes: Bytes,
    ) -> Result<Option<Thumbnail>, ThumbnailError> {
        let Some(plan) = self.decodable(kind, &bytes)? else {
            return Ok(None);
        };
        if self.closed.load(Ordering::Relaxed) {
            return Err(ThumbnailError::ShuttingDown);
        }
        let (worker, _admitted) = self.slot().await?;
        let reservation = self
            .budget
            .reserve(plan.peak_bytes)
            .await
            .map_err(|_| ThumbnailError::Busy)?;
        let deadline = Deadline::after(self.timeout, self.closed.clone());
        let cancel = CancelOnDrop(deadline.clone());
        let held = Held::new(worker, reservation, self.activity.clone());
        let thumbnailer = self.thumbnailer.clone();
        let mut job = tokio::task::spawn_blocking(move || {
            let result = thumbnailer.render_until(&plan, &bytes, &deadline);
            drop(held);
            result
        });
        match tokio::time::timeout(self.timeout, &mut job).await {
            Ok(Ok(result)) => result.map(Some),
            Ok(Err(error)) => Err(ThumbnailError::Internal(format!(
                "the thumbnail worker failed: {error}"
            ))),
            Err(_) => {
                cancel.0.cancel();
                let _ = tokio::time::timeout(STOP_WAIT, job).await;
                Err(ThumbnailError::TimedOut)
            }
        }
    }
}
