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
struct Monitor<'a> {
    public: ffi::jpeg_progress_mgr,
    max_scans: c_int,
    deadline: &'a Deadline,
}

/// One libjpeg decompressor with its error and progress handlers, boxed so the pointers libjpeg
/// keeps to them stay valid.
struct Session<'a> {
    cinfo: ffi::jpeg_decompress_struct,
    error: ffi::jpeg_error_mgr,
    monitor: Monitor<'a>,
}

impl<'a> Session<'a> {
    fn new(limits: &Limits<'a>) -> Box<Self> {
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
                max_scans: c_int::try_from(limits.max_scans).unwrap_or(c_int::MAX),
                deadline: limits.deadline,
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

impl Drop for Session<'_> {
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
    let mut session = Session::new(limits);
    let cinfo = &mut session.cinfo;
    // SAFETY: `bytes` outlives the session (dropped at the end of this function); libjpeg's
    // memory source only reads it.
    unsafe {
        ffi::jpeg_mem_src(cinfo, bytes.as_ptr(), bytes.len() as c_ulong);
        // require_image: a file of tables only is an error (unwinds), not a return value.
        ffi::jpeg_read_header(cinfo, 1);
    }
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
        (*cinfo.common.mem).max_memory_to_use =
            c_long::try_from(limits.max_memory).unwrap_or(c_long::MAX);
        // A progressive file's scans are all absorbed here, under the progress monitor.
        ffi::jpeg_start_decompress(cinfo);
    }
    let width = cinfo.output_width as usize;
    let height = cinfo.output_height as usize;
    let stride = width * cinfo.output_components as usize;
    let mut pixels = super::super::raster::zeroed(stride * height)?;
    let mut rows: Vec<*mut u8> = pixels
        .chunks_exact_mut(stride.max(1))
        .map(<[u8]>::as_mut_ptr)
        .collect();
    while (cinfo.output_scanline as usize) < height {
        let next = cinfo.output_scanline as usize;
        let band = &mut rows[next..(next + 16).min(height)];
        // SAFETY: each pointer addresses a row of `stride` bytes of `pixels`, which libjpeg
        // fills with `output_components` bytes for each of `output_width` pixels.
        let read = unsafe { ffi::jpeg_read_scanlines(cinfo, band.as_mut_ptr(), band.len() as u32) };
        if read == 0 {
            return Err(ThumbnailError::Undecodable(
                "JPEG: libjpeg produced no rows".into(),
            ));
        }
    }
    // SAFETY: all rows were read; this checks the rest of the file up to its end marker.
    unsafe { ffi::jpeg_finish_decompress(cinfo) };
    Ok(Decoded {
        width,
        height,
        pixels,
    })
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
            &*(cinfo.progress as *const Monitor<'_>),
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
