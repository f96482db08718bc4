//! PNG: the chunks before the image data read by hand (size, colour type, interlacing,
//! transparency, eXIf), the pixels decoded row by row by the `png` crate (palette, low bit
//! depths and tRNS expanded, 16-bit reduced to 8) and box-shrunk as they arrive, so only the
//! reduced image is ever held. Interlaced files have to be decoded whole first.

use std::io::Cursor;

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
        let Some(data) = bytes.get(position + 8..position + 8 + length) else {
            return Err(undecodable("truncated chunk"));
        };
        match kind {
            b"IHDR" if data.len() == 13 => ihdr = Some(data),
            b"tRNS" => transparency = true,
            b"eXIf" => exif = Some(data),
            b"IDAT" | b"IEND" => break,
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

/// Decodes, shrinking by `factor` on the way.
pub(super) fn decode(
    bytes: &[u8],
    header: &PngHeader<'_>,
    factor: u32,
    limit: u64,
    deadline: &Deadline,
) -> Result<Raster, ThumbnailError> {
    let undecodable =
        |error: png::DecodingError| ThumbnailError::Undecodable(format!("PNG: {error}"));
    let mut decoder = png::Decoder::new_with_limits(
        Cursor::new(bytes),
        png::Limits {
            bytes: usize::try_from(limit).unwrap_or(usize::MAX),
        },
    );
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    // Text and colour profiles are dropped from thumbnails; skip decompressing them.
    decoder.set_ignore_text_chunk(true);
    decoder.set_ignore_iccp_chunk(true);
    let mut reader = decoder.read_info().map_err(undecodable)?;
    let layout = match reader.output_color_type().0 {
        png::ColorType::Grayscale => Layout::Gray,
        png::ColorType::GrayscaleAlpha => Layout::GrayAlpha,
        png::ColorType::Rgb => Layout::Rgb,
        png::ColorType::Rgba => Layout::Rgba,
        png::ColorType::Indexed => {
            return Err(ThumbnailError::Undecodable(
                "PNG: palette not expanded".into(),
            ));
        }
    };
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
