//! PNG: the chunks before the image data read by hand (size, colour type, interlacing,
//! transparency, eXIf), the pixels decoded row by row by the `png` crate (palette, low bit
//! depths and tRNS expanded, 16-bit reduced to 8) and box-shrunk as they arrive, so only the
//! reduced image is ever held. Interlaced files have to be decoded whole first.

use std::{
    collections::VecDeque,
    io::{BufRead, Cursor, ErrorKind, Read, Seek, SeekFrom},
    sync::{Arc, Mutex},
};

use bytes::Bytes;

use super::{
    Deadline, ThumbnailError,
    raster::{BoxReducer, Layout, Raster},
};

/// What the chunks before the first IDAT say.
#[derive(Debug, Clone)]
pub(super) struct PngHeader<'a> {
    pub width: u32,
    pub height: u32,
    pub bit_depth: u8,
    /// Layout after expansion to 8-bit samples.
    pub layout: Layout,
    pub interlaced: bool,
    pub exif: Option<&'a [u8]>,
}

const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

pub(super) fn read_header(bytes: &[u8]) -> Result<PngHeader<'_>, ThumbnailError> {
    let undecodable = |what: &str| ThumbnailError::Undecodable(format!("PNG header: {what}"));
    if !bytes.starts_with(SIGNATURE) {
        return Err(undecodable("no PNG signature"));
    }
    let mut position = SIGNATURE.len();
    let mut ihdr = None;
    let mut transparency = false;
    let mut exif = None;
    loop {
        let Some(head) = bytes.get(position..position + 8) else {
            return Err(undecodable("truncated before the image data"));
        };
        let length = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let kind = &head[4..8];
        // The image data itself is not header: a decode that follows the upload starts here.
        if matches!(kind, b"IDAT" | b"IEND") {
            if ihdr.is_none() {
                return Err(undecodable("IHDR is not the first chunk"));
            }
            break;
        }
        let Some(data) = bytes.get(position + 8..position + 8 + length) else {
            return Err(undecodable("truncated chunk"));
        };
        match kind {
            b"IHDR" if data.len() == 13 => ihdr = Some(data),
            b"tRNS" => transparency = true,
            b"eXIf" => exif = Some(data),
            _ => {}
        }
        if ihdr.is_none() {
            return Err(undecodable("IHDR is not the first chunk"));
        }
        position += 12 + length;
    }
    let Some(ihdr) = ihdr else {
        return Err(undecodable("no IHDR"));
    };
    let width = u32::from_be_bytes([ihdr[0], ihdr[1], ihdr[2], ihdr[3]]);
    let height = u32::from_be_bytes([ihdr[4], ihdr[5], ihdr[6], ihdr[7]]);
    let (bit_depth, color_type, interlace) = (ihdr[8], ihdr[9], ihdr[12]);
    if width == 0 || height == 0 {
        return Err(undecodable("zero width or height"));
    }
    let layout = match (color_type, transparency) {
        (0, false) => Layout::Gray,
        (0, true) | (4, _) => Layout::GrayAlpha,
        (2 | 3, false) => Layout::Rgb,
        (2 | 3, true) | (6, _) => Layout::Rgba,
        _ => return Err(undecodable("unknown colour type")),
    };
    Ok(PngHeader {
        width,
        height,
        bit_depth,
        layout,
        interlaced: interlace != 0,
        exif,
    })
}

/// Bytes the decode holds at its peak: two raw rows (the current one and the one it is
/// unfiltered against), the expanded row, the inflater's window and buffers, and either the
/// reduced image with its row of sums or, for an interlaced file, the whole expanded image.
pub(super) fn decode_bytes(header: &PngHeader<'_>, factor: u32) -> u64 {
    let width = u64::from(header.width);
    let height = u64::from(header.height);
    let channels = header.layout.channels() as u64;
    let raw_row = (width * channels * u64::from(header.bit_depth)).div_ceil(8) + 1;
    let factor = u64::from(factor.max(1));
    let reduced = width.div_ceil(factor) * height.div_ceil(factor) * channels;
    let sums = width.div_ceil(factor) * channels * 4;
    let whole = if header.interlaced {
        width * height * channels
    } else {
        0
    };
    2 * raw_row + width * channels + reduced + sums + whole + 128 * 1024
}

/// The `png` reader's settings, the same for a whole and a streamed decode.
fn decoder<R: BufRead + Seek>(input: R, limit: u64) -> png::Decoder<R> {
    let mut decoder = png::Decoder::new_with_limits(
        input,
        png::Limits {
            bytes: usize::try_from(limit).unwrap_or(usize::MAX),
        },
    );
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    // Text and colour profiles are dropped from thumbnails; skip decompressing them.
    decoder.set_ignore_text_chunk(true);
    decoder.set_ignore_iccp_chunk(true);
    decoder
}

fn output_layout<R: BufRead + Seek>(reader: &png::Reader<R>) -> Result<Layout, ThumbnailError> {
    match reader.output_color_type().0 {
        png::ColorType::Grayscale => Ok(Layout::Gray),
        png::ColorType::GrayscaleAlpha => Ok(Layout::GrayAlpha),
        png::ColorType::Rgb => Ok(Layout::Rgb),
        png::ColorType::Rgba => Ok(Layout::Rgba),
        png::ColorType::Indexed => Err(ThumbnailError::Undecodable(
            "PNG: palette not expanded".into(),
        )),
    }
}

fn undecodable(error: png::DecodingError) -> ThumbnailError {
    ThumbnailError::Undecodable(format!("PNG: {error}"))
}

/// Chunks of the file that arrived and the reader has not taken yet.
type Arrived = Arc<Mutex<VecDeque<Bytes>>>;

/// The reader's input: what has arrived so far. Running out is `UnexpectedEof` (an empty
/// `fill_buf`), after which the `png` reader resumes where it stopped once more has arrived.
struct ArrivedInput {
    arrived: Arrived,
    current: Bytes,
    position: usize,
}

impl Read for ArrivedInput {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let available = self.fill_buf()?;
        let count = available.len().min(buffer.len());
        buffer[..count].copy_from_slice(&available[..count]);
        self.consume(count);
        Ok(count)
    }
}

impl BufRead for ArrivedInput {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.position == self.current.len() {
            let next = self
                .arrived
                .lock()
                .map_or(None, |mut arrived| arrived.pop_front());
            if let Some(next) = next {
                self.current = next;
                self.position = 0;
            }
        }
        Ok(&self.current[self.position..])
    }

    fn consume(&mut self, count: usize) {
        self.position += count;
    }
}

/// Required by the reader's bounds, never called by it.
impl Seek for ArrivedInput {
    fn seek(&mut self, _: SeekFrom) -> std::io::Result<u64> {
        Err(std::io::Error::new(
            ErrorKind::Unsupported,
            "a streamed PNG cannot seek",
        ))
    }
}

/// A non-interlaced PNG decoded while it arrives: rows are unfiltered and box-shrunk as soon as
/// their compressed bytes are in, so at the last byte only the last rows remain.
pub(super) struct StreamingPng {
    arrived: Arrived,
    width: u32,
    height: u32,
    factor: u32,
    limit: u64,
    /// Created at the first push, which holds every byte up to the image data (the plan was
    /// read from them).
    reader: Option<png::Reader<ArrivedInput>>,
    reducer: Option<BoxReducer>,
    rows: u32,
    rows_done: bool,
    finished: bool,
    failed: Option<ThumbnailError>,
    handed: u64,
}

impl StreamingPng {
    /// `None` for an interlaced file, which cannot be reduced row by row (it is decoded whole
    /// once it has arrived).
    pub(super) fn new(header: &PngHeader<'_>, factor: u32, limit: u64) -> Option<Self> {
        if header.interlaced {
            return None;
        }
        Some(Self {
            arrived: Arrived::default(),
            width: header.width,
            height: header.height,
            factor,
            limit,
            reader: None,
            reducer: None,
            rows: 0,
            rows_done: false,
            finished: false,
            failed: None,
            handed: 0,
        })
    }

    /// Gives the next pieces of the file and decodes as far as they reach.
    pub(super) fn push(
        &mut self,
        pieces: &[Bytes],
        deadline: &Deadline,
    ) -> Result<(), ThumbnailError> {
        if let Some(failed) = &self.failed {
            return Err(failed.clone());
        }
        // Past IEND: nothing more is read, so nothing is kept.
        if self.finished {
            return Ok(());
        }
        if let Ok(mut arrived) = self.arrived.lock() {
            arrived.extend(pieces.iter().cloned());
        }
        self.handed += pieces.iter().map(|piece| piece.len() as u64).sum::<u64>();
        let result = self.run(false, deadline);
        if let Err(error) = &result {
            self.failed = Some(error.clone());
        }
        if self.finished || self.failed.is_some() {
            // What came after IEND (or after the failure) is not needed.
            if let Ok(mut arrived) = self.arrived.lock() {
                *arrived = VecDeque::new();
            }
        }
        result
    }

    /// IEND has been read: later bytes are not needed.
    pub(super) fn is_complete(&self) -> bool {
        self.finished
    }

    /// Bytes handed to the reader so far (each once: it resumes where it stopped).
    pub(super) fn handed_bytes(&self) -> u64 {
        self.handed
    }

    /// Every byte has been pushed: decodes the rest and returns the reduced image.
    pub(super) fn finish(mut self, deadline: &Deadline) -> Result<Raster, ThumbnailError> {
        if let Some(failed) = self.failed.take() {
            return Err(failed);
        }
        self.run(true, deadline)?;
        match self.reducer {
            Some(reducer) if self.finished => Ok(reducer.finish()),
            _ => Err(ThumbnailError::Undecodable("PNG: missing rows".into())),
        }
    }

    /// Decodes what arrived; running out of bytes ends the step, or the decode once `ended`.
    fn run(&mut self, ended: bool, deadline: &Deadline) -> Result<(), ThumbnailError> {
        let waiting = |error: &png::DecodingError| {
            !ended
                && matches!(error, png::DecodingError::IoError(io) if io.kind() == ErrorKind::UnexpectedEof)
        };
        if self.reader.is_none() {
            let input = ArrivedInput {
                arrived: self.arrived.clone(),
                current: Bytes::new(),
                position: 0,
            };
            let reader = decoder(input, self.limit)
                .read_info()
                .map_err(undecodable)?;
            let layout = output_layout(&reader)?;
            self.reducer = Some(BoxReducer::new(
                self.width,
                self.height,
                layout,
                self.factor,
            )?);
            self.reader = Some(reader);
        }
        let (Some(reader), Some(reducer)) = (&mut self.reader, &mut self.reducer) else {
            return Ok(());
        };
        while !self.rows_done {
            match reader.next_row() {
                Ok(Some(row)) => {
                    reducer.push_row(row.data());
                    self.rows += 1;
                    if self.rows.is_multiple_of(64) {
                        deadline.check()?;
                    }
                }
                Ok(None) => {
                    if self.rows != self.height {
                        return Err(ThumbnailError::Undecodable("PNG: missing rows".into()));
                    }
                    self.rows_done = true;
                }
                Err(error) if waiting(&error) => return Ok(()),
                Err(error) => return Err(undecodable(error)),
            }
        }
        if !self.finished {
            match reader.finish() {
                Ok(()) => self.finished = true,
                Err(error) if waiting(&error) => return Ok(()),
                Err(error) => return Err(undecodable(error)),
            }
        }
        Ok(())
    }
}

/// Decodes, shrinking by `factor` on the way.
pub(super) fn decode(
    bytes: &[u8],
    header: &PngHeader<'_>,
    factor: u32,
    limit: u64,
    deadline: &Deadline,
) -> Result<Raster, ThumbnailError> {
    let mut reader = decoder(Cursor::new(bytes), limit)
        .read_info()
        .map_err(undecodable)?;
    let layout = output_layout(&reader)?;
    let mut reducer = BoxReducer::new(header.width, header.height, layout, factor)?;
    if header.interlaced {
        let size = reader
            .output_buffer_size()
            .ok_or_else(|| ThumbnailError::Undecodable("PNG: image too large".into()))?;
        let mut whole = super::raster::zeroed(size)?;
        let stride = size / header.height as usize;
        let (color_type, bit_depth) = reader.output_color_type();
        let bits_per_pixel = color_type.samples() as u8 * bit_depth as u8;
        // Pass by pass, row by row (what `next_frame` does, with a deadline check between).
        let mut rows: u32 = 0;
        while let Some(row) = reader.next_interlaced_row().map_err(undecodable)? {
            if let png::InterlaceInfo::Adam7(pass) = row.interlace() {
                png::expand_interlaced_row(&mut whole, stride, row.data(), pass, bits_per_pixel);
            }
            rows += 1;
            if rows.is_multiple_of(64) {
                deadline.check()?;
            }
        }
        for row in whole.chunks_exact(stride) {
            reducer.push_row(row);
        }
    } else {
        let mut rows: u32 = 0;
        while let Some(row) = reader.next_row().map_err(undecodable)? {
            reducer.push_row(row.data());
            rows += 1;
            if rows.is_multiple_of(64) {
                deadline.check()?;
            }
        }
        if rows != header.height {
            return Err(ThumbnailError::Undecodable("PNG: missing rows".into()));
        }
    }
    reader.finish().map_err(undecodable)?;
    Ok(reducer.finish())
}
