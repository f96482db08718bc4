//! WEBP (lossy, lossless, extended; the first frame of an animation) through `image-webp`,
//! which decodes whole images only.

use std::io::Cursor;

use super::{
    ThumbnailError,
    raster::{Layout, Raster},
};

/// Size, alpha and EXIF from the container, without decoding pixels.
pub(super) struct WebpHeader {
    pub width: u32,
    pub height: u32,
    pub alpha: bool,
    pub exif: Option<Vec<u8>>,
}

fn undecodable(error: image_webp::DecodingError) -> ThumbnailError {
    ThumbnailError::Undecodable(format!("WEBP: {error}"))
}

pub(super) fn read_header(bytes: &[u8]) -> Result<WebpHeader, ThumbnailError> {
    let mut decoder = image_webp::WebPDecoder::new(Cursor::new(bytes)).map_err(undecodable)?;
    let (width, height) = decoder.dimensions();
    Ok(WebpHeader {
        width,
        height,
        alpha: decoder.has_alpha(),
        exif: decoder.exif_metadata().ok().flatten(),
    })
}

/// The RGB(A) output plus the decoder's own planes (YUV for lossy, ARGB words for lossless).
pub(super) fn decode_bytes(header: &WebpHeader) -> u64 {
    let pixels = u64::from(header.width) * u64::from(header.height);
    pixels * if header.alpha { 4 } else { 3 } + pixels * 4 + 64 * 1024
}

pub(super) fn decode(bytes: &[u8]) -> Result<Raster, ThumbnailError> {
    let mut decoder = image_webp::WebPDecoder::new(Cursor::new(bytes)).map_err(undecodable)?;
    let (width, height) = decoder.dimensions();
    let size = decoder
        .output_buffer_size()
        .ok_or_else(|| ThumbnailError::Undecodable("WEBP: image too large".into()))?;
    let mut pixels = super::raster::zeroed(size)?;
    decoder.read_image(&mut pixels).map_err(undecodable)?;
    let (layout, transparent) = if decoder.has_alpha() {
        let transparent = pixels.chunks_exact(4).any(|pixel| pixel[3] < u8::MAX);
        (Layout::Rgba, transparent)
    } else {
        (Layout::Rgb, false)
    };
    Ok(Raster {
        width,
        height,
        layout,
        pixels,
        transparent,
    })
}
