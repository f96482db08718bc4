//! libjpeg-turbo driven through its C API (`mozjpeg-sys`) instead of the `mozjpeg` wrapper, which
//! hides the two hooks a hostile file calls for:
//!
//! - the progress monitor, which libjpeg calls once per row of MCUs of every scan while it
//!   absorbs a progressive file's scans, and once per call while it produces rows. It stops the
//!   decode past `thumbnails.max_jpeg_scans` scans (as `djpeg -maxscans` and TurboJPEG's scan
//!   limit do) and at the deadline or cancellation, so a file of a million tiny scans cannot hold
//!   a worker for minutes;
//! - the warnings: libjpeg goes on after most of them with made-up data. A progression sequence
//!   no encoder writes, or a file that ends early, stops the decode (as `djpeg -strict` would);
//!   the damage real cameras leave behind (stray bytes before a marker, one bad Huffman code)
//!   does not.
//!
//! Fatal errors unwind out of the C code ("C-unwind"; the library is compiled with exceptions
//! enabled) and are caught here; every libjpeg allocation belongs to the [`Session`], freed when
//! it is dropped, also after an unwind.

use std::{
    mem,
    os::raw::{c_int, c_long, c_ulong},
    panic::{AssertUnwindSafe, catch_unwind, resume_unwind},
};

use mozjpeg_sys as ffi;

use super::super::{Deadline, ThumbnailError};

/// What bounds one decode.
pub(in crate::thumbnails) struct Limits<'a> {
    /// Scans a file may have; the decode stops at the first one beyond.
    pub max_scans: u32,
    /// Bytes libjpeg may allocate for its whole-image buffers (a progressive file's coefficients).
    pub max_memory: u64,
    pub deadline: &'a Deadline,
}

/// Rows of 8-bit pixels as libjpeg produced them.
pub(in crate::thumbnails) struct Decoded {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// Decodes at `numerator / 8` into `components` bytes per pixel: 1 gray, 3 RGB, 4 CMYK.
pub(in crate::thumbnails) fn decode(
    bytes: &[u8],
    numerator: u8,
    components: usize,
    limits: &Limits<'_>,
) -> Result<Decoded, ThumbnailError> {
    match catch_unwind(AssertUnwindSafe(|| {
        decode_unguarded(bytes, numerator, components, limits)
    })) {
        Ok(result) => result,
        Err(payload) => match payload.downcast::<ThumbnailError>() {
            Ok(stop) => Err(*stop),
            Err(other) => resume_unwind(other),
        },
    }
}

/// Warnings after which libjpeg would go on with invented data, but which no encoder causes:
/// a scan repeating or skipping coefficient bits, a sequential file with progressive scan
/// parameters, and (since the whole file is in memory) an end before the end-of-image marker.
const FATAL_WARNINGS: [ffi::J_MESSAGE_CODE; 3] = [
    ffi::JWRN_BOGUS_PROGRESSION,
    ffi::JWRN_NOT_SEQUENTIAL,
    ffi::JWRN_JPEG_EOF,
];

/// The progress hook's state. `public` comes first: libjpeg's `cinfo.progress` points at it,
/// which is also a pointer to the whole struct.
#[repr(C)]
struct Monitor {
    public: ffi::jpeg_progress_mgr,
    max_scans: c_int,
    deadline: Deadline,
}

/// One libjpeg decompressor with its error and progress handlers, boxed so the pointers libjpeg
/// keeps to them stay valid.
struct Session {
    cinfo: ffi::jpeg_decompress_struct,
    error: ffi::jpeg_error_mgr,
    monitor: Monitor,
}

impl Session {
    fn new(max_scans: u32, deadline: Deadline) -> Box<Self> {
        let mut session = Box::new(Session {
            // SAFETY: both are plain C structs for which all-zero is the state libjpeg's own
            // initialisers start from (null pointers, no callbacks, enum values 0).
            cinfo: unsafe { mem::zeroed() },
            error: unsafe { mem::zeroed() },
            monitor: Monitor {
                public: ffi::jpeg_progress_mgr {
                    progress_monitor: Some(on_progress),
                    pass_counter: 0,
                    pass_limit: 0,
                    completed_passes: 0,
                    total_passes: 0,
                },
                max_scans: c_int::try_from(max_scans).unwrap_or(c_int::MAX),
                deadline,
            },
        });
        // SAFETY: the error manager is set before creation (libjpeg reports failures through
        // it), and the progress monitor after (creation clears every other field). Both live
        // in the same box as `cinfo`, which outlives every libjpeg call on it.
        unsafe {
            ffi::jpeg_std_error(&mut session.error);
            session.error.error_exit = Some(on_error);
            session.error.emit_message = Some(on_message);
            session.cinfo.common.err = &mut session.error;
            ffi::jpeg_create_decompress(&mut session.cinfo);
            session.cinfo.common.progress = &mut session.monitor.public;
        }
        session
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // SAFETY: frees everything libjpeg allocated; valid in any state, even a zeroed struct
        // whose creation failed (no memory manager yet).
        unsafe { ffi::jpeg_destroy_decompress(&mut self.cinfo) };
    }
}

fn decode_unguarded(
    bytes: &[u8],
    numerator: u8,
    components: usize,
    limits: &Limits<'_>,
) -> Result<Decoded, ThumbnailError> {
    let mut session = Session::new(limits.max_scans, limits.deadline.clone());
    let cinfo = &mut session.cinfo;
    // SAFETY: `bytes` outlives the session (dropped at the end of this function); libjpeg's
    // memory source only reads it.
    unsafe {
        ffi::jpeg_mem_src(cinfo, bytes.as_ptr(), bytes.len() as c_ulong);
        // require_image: a file of tables only is an error (unwinds), not a return value.
        ffi::jpeg_read_header(cinfo, 1);
    }
    configure(cinfo, numerator, components, limits.max_memory);
    // SAFETY: configured after the header, as libjpeg requires. A progressive file's scans are
    // all absorbed here, under the progress monitor.
    unsafe { ffi::jpeg_start_decompress(cinfo) };
    let (pixels, mut rows) = output_rows(cinfo)?;
    // The memory source never suspends: no rows means a file libjpeg cannot go on with.
    if !read_rows(cinfo, &mut rows) {
        return Err(no_rows());
    }
    let height = cinfo.output_height as usize;
    // SAFETY: all rows were read; this checks the rest of the file up to its end marker.
    unsafe { ffi::jpeg_finish_decompress(cinfo) };
    Ok(Decoded {
        width: cinfo.output_width as usize,
        height,
        pixels,
    })
}

/// The decode's parameters, set between the header and the start of the decompression.
fn configure(
    cinfo: &mut ffi::jpeg_decompress_struct,
    numerator: u8,
    components: usize,
    max_memory: u64,
) {
    cinfo.scale_num = u32::from(numerator);
    cinfo.scale_denom = 8;
    // Smoothing guesses missing low AC coefficients from neighbouring blocks; here they are
    // either all present or (after pruning) unused by the 1x1 IDCT.
    cinfo.do_block_smoothing = 0;
    cinfo.out_color_space = match components {
        1 => ffi::J_COLOR_SPACE::JCS_GRAYSCALE,
        4 => ffi::J_COLOR_SPACE::JCS_CMYK,
        _ => ffi::J_COLOR_SPACE::JCS_RGB,
    };
    // SAFETY: `mem` was set up by jpeg_create_decompress. With no backing store, whole-image
    // buffers beyond this limit fail the decode instead of growing past what was reserved.
    unsafe {
        (*cinfo.common.mem).max_memory_to_use = c_long::try_from(max_memory).unwrap_or(c_long::MAX);
    }
}

/// Reads rows into `rows` (pointers into the output image) until the last one: `false` when
/// libjpeg produced none, i.e. a suspending source ran out of bytes.
fn read_rows(cinfo: &mut ffi::jpeg_decompress_struct, rows: &mut [*mut u8]) -> bool {
    let height = cinfo.output_height as usize;
    while (cinfo.output_scanline as usize) < height {
        let next = cinfo.output_scanline as usize;
        let band = &mut rows[next..(next + 16).min(height)];
        // SAFETY: each pointer addresses a row of `stride` bytes of the output image, which
        // libjpeg fills with `output_components` bytes for each of `output_width` pixels.
        let read = unsafe { ffi::jpeg_read_scanlines(cinfo, band.as_mut_ptr(), band.len() as u32) };
        if read == 0 {
            return false;
        }
    }
    true
}

fn no_rows() -> ThumbnailError {
    ThumbnailError::Undecodable("JPEG: libjpeg produced no rows".into())
}

/// The output image (known once the decompression started) and a pointer to each of its rows.
fn output_rows(
    cinfo: &ffi::jpeg_decompress_struct,
) -> Result<(Vec<u8>, Vec<*mut u8>), ThumbnailError> {
    let width = cinfo.output_width as usize;
    let height = cinfo.output_height as usize;
    let stride = width * cinfo.output_components as usize;
    let mut pixels = super::super::raster::zeroed(stride * height)?;
    let rows: Vec<*mut u8> = pixels
        .chunks_exact_mut(stride.max(1))
        .map(<[u8]>::as_mut_ptr)
        .collect();
    Ok((pixels, rows))
}

/// Bytes libjpeg may leave unconsumed between two steps of a streamed decode. It commits its
/// input per marker segment (at most 64 KiB) and per MCU (at most a few tens of KiB), so only a
/// hostile file comes near this; the streamed decode stops there rather than buffer without end
/// (and the file is decoded whole after its last byte, which gives the verdict). Each step
/// hands libjpeg these bytes again besides the new ones, so with steps at least
/// [`STEP_BYTES`](crate::thumbnails::STEP_BYTES) apart libjpeg reads each byte received at most
/// `1 + MAX_UNCONSUMED / STEP_BYTES` times.
pub(in crate::thumbnails) const MAX_UNCONSUMED: usize = 256 * 1024;

/// Capacity the source's buffer keeps between steps; beyond, it is given back once consumed.
const KEPT_CAPACITY: usize = 64 * 1024;

/// A decode fed while the file arrives. libjpeg reads through a suspending data source: when
/// the bytes run out it answers "not yet", libjpeg backs up to the last unit it completed (a
/// marker segment, an MCU) and returns, so no thread waits for the network. Each
/// [`StreamingDecode::push_with`] appends what arrived and decodes as far as it reaches.
pub(in crate::thumbnails) struct StreamingDecode {
    // Declared (and so dropped) before the source libjpeg reads from.
    session: Box<Session>,
    source: Box<Source>,
    phase: Phase,
    numerator: u8,
    components: usize,
    max_memory: u64,
    pixels: Vec<u8>,
    /// Pointers into `pixels`, one per row, for `jpeg_read_scanlines`.
    rows: Vec<*mut u8>,
    /// Once libjpeg failed its state is undefined: every later call answers this.
    failed: Option<ThumbnailError>,
    /// Bytes handed to libjpeg over all steps, those it left unconsumed counted again.
    handed: u64,
}

// SAFETY: the raw pointers point into heap memory this value owns (the session, the source's
// buffer, `pixels`); libjpeg keeps no thread-local state, and `&mut self` methods run one at a
// time, on whichever thread.
unsafe impl Send for StreamingDecode {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Header,
    Start,
    Rows,
    Finish,
    Done,
}

/// The suspending data source. `public` comes first: `cinfo.src` points at it.
#[repr(C)]
struct Source {
    public: ffi::jpeg_source_mgr,
    /// What arrived and libjpeg has not consumed; between steps exactly those bytes (consumed
    /// ones are dropped after each step).
    buffer: Vec<u8>,
    /// Bytes libjpeg asked to skip beyond what had arrived: dropped as they come.
    skip: usize,
    /// Every byte has arrived: running out now means the file is truncated.
    ended: bool,
}

impl Source {
    /// Drops the bytes libjpeg consumed, gives back spare capacity, and points libjpeg at the
    /// rest.
    fn compact(&mut self) {
        let consumed = self.buffer.len() - self.public.bytes_in_buffer;
        self.buffer.drain(..consumed);
        if self.buffer.capacity() > KEPT_CAPACITY.max(2 * self.buffer.len()) {
            self.buffer.shrink_to(KEPT_CAPACITY.max(self.buffer.len()));
        }
        self.public.next_input_byte = self.buffer.as_ptr();
        self.public.bytes_in_buffer = self.buffer.len();
    }
}

impl StreamingDecode {
    /// A decode at `numerator / 8` into `components` bytes per pixel, as [`decode`]; the
    /// deadline is given per step ([`Self::set_deadline`]).
    pub(in crate::thumbnails) fn new(
        numerator: u8,
        components: usize,
        max_scans: u32,
        max_memory: u64,
    ) -> Self {
        let session = Session::new(max_scans, Deadline::none());
        let mut decode = Self {
            session,
            source: Box::new(Source {
                public: ffi::jpeg_source_mgr {
                    next_input_byte: std::ptr::null(),
                    bytes_in_buffer: 0,
                    init_source: Some(source_noop),
                    fill_input_buffer: Some(source_fill),
                    skip_input_data: Some(source_skip),
                    resync_to_restart: Some(ffi::jpeg_resync_to_restart),
                    term_source: Some(source_noop),
                },
                buffer: Vec::new(),
                skip: 0,
                ended: false,
            }),
            phase: Phase::Header,
            numerator,
            components,
            max_memory,
            pixels: Vec::new(),
            rows: Vec::new(),
            failed: None,
            handed: 0,
        };
        // The source lives in its own box, dropped after the session that points at it.
        decode.session.cinfo.src = &mut decode.source.public;
        decode
    }

    /// Appends the next bytes of the file (what `write` adds to the buffer) and decodes as far
    /// as they reach. Past the end marker nothing is kept: a motion photo's video after it is
    /// neither written nor read.
    pub(in crate::thumbnails) fn push_with(
        &mut self,
        write: impl FnOnce(&mut Vec<u8>) -> Result<(), ThumbnailError>,
    ) -> Result<(), ThumbnailError> {
        if let Some(failed) = &self.failed {
            return Err(failed.clone());
        }
        if self.phase == Phase::Done {
            return Ok(());
        }
        let source = &mut *self.source;
        let before = source.buffer.len();
        if let Err(error) = write(&mut source.buffer) {
            self.failed = Some(error.clone());
            return Err(error);
        }
        // A skip pending means libjpeg consumed everything before: it applies to the new bytes.
        let skipped = source.skip.min(source.buffer.len() - before);
        source.buffer.drain(before..before + skipped);
        source.skip -= skipped;
        source.public.next_input_byte = source.buffer.as_ptr();
        source.public.bytes_in_buffer = source.buffer.len();
        self.handed += source.buffer.len() as u64;
        self.run()?;
        if self.phase == Phase::Done {
            self.source.buffer = Vec::new();
            self.source.public.bytes_in_buffer = 0;
        }
        self.source.compact();
        if self.source.buffer.len() > MAX_UNCONSUMED {
            let error = ThumbnailError::Undecodable(format!(
                "JPEG: more than {MAX_UNCONSUMED} bytes without a complete unit"
            ));
            self.failed = Some(error.clone());
            self.source.buffer = Vec::new();
            self.source.compact();
            return Err(error);
        }
        Ok(())
    }

    /// Sets the deadline (and cancellation) the progress monitor checks from now on.
    pub(in crate::thumbnails) fn set_deadline(&mut self, deadline: Deadline) {
        self.session.monitor.deadline = deadline;
    }

    /// The image is decoded up to its end marker: later bytes are not needed.
    pub(in crate::thumbnails) fn is_complete(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Bytes handed to libjpeg so far (see [`MAX_UNCONSUMED`]).
    pub(in crate::thumbnails) fn handed_bytes(&self) -> u64 {
        self.handed
    }

    /// The capacity of the buffer of what arrived and libjpeg has not consumed.
    #[cfg(test)]
    pub(in crate::thumbnails) fn buffer_capacity(&self) -> usize {
        self.source.buffer.capacity()
    }

    /// Every byte has been pushed: decodes the rest and returns the image.
    pub(in crate::thumbnails) fn finish(mut self) -> Result<Decoded, ThumbnailError> {
        if let Some(failed) = self.failed.take() {
            return Err(failed);
        }
        self.source.ended = true;
        self.run()?;
        if self.phase != Phase::Done {
            return Err(no_rows());
        }
        Ok(Decoded {
            width: self.session.cinfo.output_width as usize,
            height: self.session.cinfo.output_height as usize,
            pixels: mem::take(&mut self.pixels),
        })
    }

    fn run(&mut self) -> Result<(), ThumbnailError> {
        let result = match catch_unwind(AssertUnwindSafe(|| self.run_unguarded())) {
            Ok(result) => result,
            Err(payload) => match payload.downcast::<ThumbnailError>() {
                Ok(stop) => Err(*stop),
                Err(other) => resume_unwind(other),
            },
        };
        if let Err(error) = &result {
            self.failed = Some(error.clone());
        }
        result
    }

    /// Advances through the phases until libjpeg suspends for more bytes or the image is done.
    fn run_unguarded(&mut self) -> Result<(), ThumbnailError> {
        let cinfo = &mut self.session.cinfo;
        loop {
            match self.phase {
                Phase::Header => {
                    // SAFETY: the source points into `self.source.buffer`, valid until the
                    // next `push_with`. 0 is JPEG_SUSPENDED; a file of tables only unwinds.
                    if unsafe { ffi::jpeg_read_header(cinfo, 1) } == 0 {
                        return Ok(());
                    }
                    configure(cinfo, self.numerator, self.components, self.max_memory);
                    self.phase = Phase::Start;
                }
                Phase::Start => {
                    // SAFETY: as above; a progressive file's scans are absorbed here, over as
                    // many calls as it takes them to arrive.
                    if unsafe { ffi::jpeg_start_decompress(cinfo) } == 0 {
                        return Ok(());
                    }
                    (self.pixels, self.rows) = output_rows(cinfo)?;
                    self.phase = Phase::Rows;
                }
                Phase::Rows => {
                    if !read_rows(cinfo, &mut self.rows) {
                        return Ok(());
                    }
                    self.phase = Phase::Finish;
                }
                Phase::Finish => {
                    // SAFETY: every row was read; reads up to the end marker.
                    if unsafe { ffi::jpeg_finish_decompress(cinfo) } == 0 {
                        return Ok(());
                    }
                    self.phase = Phase::Done;
                }
                Phase::Done => return Ok(()),
            }
        }
    }
}

unsafe extern "C-unwind" fn source_noop(_cinfo: &mut ffi::jpeg_decompress_struct) {}

/// libjpeg ran out of bytes: suspend until more arrive, or, once all have, the file is
/// truncated (`jpeg_mem_src` would warn and invent an end marker; that warning is fatal here).
unsafe extern "C-unwind" fn source_fill(cinfo: &mut ffi::jpeg_decompress_struct) -> ffi::boolean {
    // SAFETY: `src` points at the `public` field first in a `Source` (StreamingDecode::new).
    let source = unsafe { &*(cinfo.src as *const Source) };
    if source.ended {
        resume_unwind(Box::new(ThumbnailError::Undecodable(
            "JPEG: Premature end of JPEG file".into(),
        )));
    }
    0
}

/// Skips a marker segment libjpeg does not need (APPn, COM), also past what has arrived.
unsafe extern "C-unwind" fn source_skip(cinfo: &mut ffi::jpeg_decompress_struct, bytes: c_long) {
    // SAFETY: as in `source_fill`; the pointer arithmetic stays within the buffer.
    unsafe {
        let source = &mut *(cinfo.src as *mut Source);
        let wanted = usize::try_from(bytes).unwrap_or(0);
        let now = wanted.min(source.public.bytes_in_buffer);
        source.public.next_input_byte = source.public.next_input_byte.add(now);
        source.public.bytes_in_buffer -= now;
        source.skip += wanted - now;
    }
}

/// libjpeg's `error_exit`: never returns to the C code; the decode unwinds to [`decode`].
unsafe extern "C-unwind" fn on_error(cinfo: &mut ffi::jpeg_common_struct) {
    let message = message(cinfo);
    resume_unwind(Box::new(ThumbnailError::Undecodable(format!(
        "JPEG: {message}"
    ))));
}

/// libjpeg's `emit_message`: traces are dropped, fatal warnings become errors.
unsafe extern "C-unwind" fn on_message(cinfo: &mut ffi::jpeg_common_struct, level: c_int) {
    // SAFETY: libjpeg calls this with the error manager installed in `Session::new`.
    let code = unsafe { (*cinfo.err).msg_code };
    if level < 0 && FATAL_WARNINGS.contains(&code) {
        // SAFETY: as libjpeg's own error path would, with the warning's code still set.
        unsafe { on_error(cinfo) };
    }
}

/// libjpeg's progress hook: stops the decode past the scan limit or at the deadline.
unsafe extern "C-unwind" fn on_progress(cinfo: &mut ffi::jpeg_common_struct) {
    // SAFETY: only installed on decompressors, whose struct starts with the common fields,
    // with `progress` pointing at the `public` field first in a `Monitor`.
    let (scan, monitor) = unsafe {
        let decompress: *const ffi::jpeg_decompress_struct =
            (cinfo as *const ffi::jpeg_common_struct).cast();
        (
            (*decompress).input_scan_number,
            &*(cinfo.progress as *const Monitor),
        )
    };
    if scan > monitor.max_scans {
        resume_unwind(Box::new(ThumbnailError::TooManyScans {
            max_scans: monitor.max_scans as u32,
        }));
    }
    if let Err(stop) = monitor.deadline.check() {
        resume_unwind(Box::new(stop));
    }
}

/// The text of the message libjpeg is reporting, e.g. "Premature end of JPEG file".
fn message(cinfo: &mut ffi::jpeg_common_struct) -> String {
    // SAFETY: `err` is the manager from `Session::new`, whose `format_message` is libjpeg's own.
    // It writes at most JMSG_LENGTH_MAX (80) bytes, NUL included; the binding declares the
    // buffer `&[u8; 80]` although C writes to it, hence the cast to a mutable pointer.
    unsafe {
        let Some(format) = (*cinfo.err).format_message else {
            return format!("libjpeg error {}", (*cinfo.err).msg_code);
        };
        let format: unsafe extern "C-unwind" fn(&mut ffi::jpeg_common_struct, *mut [u8; 80]) =
            mem::transmute(format);
        let mut buffer = [0u8; 80];
        format(cinfo, &mut buffer);
        let text = buffer.split(|&byte| byte == 0).next().unwrap_or_default();
        String::from_utf8_lossy(text).into_owned()
    }
}
