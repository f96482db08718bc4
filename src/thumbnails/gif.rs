//! GIF: the first frame, decoded row by row and composed onto the logical screen (transparent
//! where it does not cover).

use std::io::Cursor;

use super::{
    Deadline, ThumbnailError,
    raster::{Layout, Raster},
};

/// The logical screen size from the header.
pub(super) fn read_header(bytes: &[u8]) -> Result<(u32, u32), ThumbnailError> {
    match bytes.get(6..10) {
        Some(size) if bytes.starts_with(b"GIF8") => {
            let width = u32::from(u16::from_le_bytes([size[0], size[1]]));
            let height = u32::from(u16::from_le_bytes([size[2], size[3]]));
            if width == 0 || height == 0 {
                return Err(ThumbnailError::Undecodable(
                    "GIF header: zero width or height".into(),
                ));
            }
            Ok((width, height))
        }
        _ => Err(ThumbnailError::Undecodable("GIF header: truncated".into())),
    }
}

/// The canvas and one RGBA frame no larger than it (larger ones are refused by the limit).
pub(super) fn decode_bytes(width: u32, height: u32) -> u64 {
    2 * u64::from(width) * u64::from(height) * 4 + 64 * 1024
}

/// Decodes the first frame row by row, checking `deadline` between bands of rows.
pub(super) fn decode(
    bytes: &[u8],
    width: u32,
    height: u32,
    deadline: &Deadline,
) -> Result<Raster, ThumbnailError> {
    let undecodable =
        |error: gif::DecodingError| ThumbnailError::Undecodable(format!("GIF: {error}"));
    let canvas_bytes = u64::from(width) * u64::from(height) * 4;
    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::RGBA);
    if let Some(limit) = std::num::NonZeroU64::new(canvas_bytes) {
        options.set_memory_limit(gif::MemoryLimit::Bytes(limit));
    }
    let mut decoder = options.read_info(Cursor::new(bytes)).map_err(undecodable)?;
    let Some(frame) = decoder.next_frame_info().map_err(undecodable)? else {
        return Err(ThumbnailError::Undecodable("GIF: no frame".into()));
    };
    let (left, top) = (usize::from(frame.left), usize::from(frame.top));
    let (frame_width, frame_height) = (usize::from(frame.width), usize::from(frame.height));
    let interlaced = frame.interlaced;
    if (frame_width * frame_height * 4) as u64 > canvas_bytes {
        return Err(ThumbnailError::Undecodable(
            "GIF: the first frame is larger than the screen".into(),
        ));
    }
    let line = frame_width * 4;
    let mut frame_pixels = super::raster::zeroed(line * frame_height)?;
    // An interlaced frame stores every 8th row from 0, every 8th from 4, every 4th from 2,
    // then every 2nd from 1.
    let order: Box<dyn Iterator<Item = usize>> = if interlaced {
        Box::new(
            (0..frame_height)
                .step_by(8)
                .chain((4..frame_height).step_by(8))
                .chain((2..frame_height).step_by(4))
                .chain((1..frame_height).step_by(2)),
        )
    } else {
        Box::new(0..frame_height)
    };
    for (index, row) in order.enumerate() {
        if index % 64 == 0 {
            deadline.check()?;
        }
        let target = &mut frame_pixels[row * line..(row + 1) * line];
        if line > 0 && !decoder.fill_buffer(target).map_err(undecodable)? {
            return Err(ThumbnailError::Undecodable("GIF: image truncated".into()));
        }
    }
    let (width_px, height_px) = (width as usize, height as usize);
    let pixels = if (left, top, frame_width, frame_height) == (0, 0, width_px, height_px) {
        frame_pixels
    } else {
        let mut canvas = super::raster::zeroed(width_px * height_px * 4)?;
        for (row, source) in frame_pixels.chunks_exact(line.max(1)).enumerate() {
            let y = top + row;
            if y >= height_px || left >= width_px {
                break;
            }
            let columns = frame_width.min(width_px - left);
            let start = (y * width_px + left) * 4;
            canvas[start..start + columns * 4].copy_from_slice(&source[..columns * 4]);
        }
        canvas
    };
    let transparent = pixels.chunks_exact(4).any(|pixel| pixel[3] < u8::MAX);
    Ok(Raster {
        width,
        height,
        layout: Layout::Rgba,
        pixels,
        transparent,
    })
}
