//! Decoded pixels, the box pre-shrink that keeps them small, and EXIF orientation.

use super::ThumbnailError;

/// Channel layout of 8-bit pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Layout {
    Gray,
    GrayAlpha,
    Rgb,
    Rgba,
}

impl Layout {
    pub(super) fn channels(self) -> usize {
        match self {
            Layout::Gray => 1,
            Layout::GrayAlpha => 2,
            Layout::Rgb => 3,
            Layout::Rgba => 4,
        }
    }

    pub(super) fn has_alpha(self) -> bool {
        matches!(self, Layout::GrayAlpha | Layout::Rgba)
    }
}

/// 8-bit pixels, rows packed without padding.
#[derive(Debug)]
pub(super) struct Raster {
    pub width: u32,
    pub height: u32,
    pub layout: Layout,
    pub pixels: Vec<u8>,
    /// Some pixel is not fully opaque (always false without an alpha channel).
    pub transparent: bool,
}

impl Raster {
    /// Drops an alpha channel that holds nothing but 255, so the image can become a JPEG.
    pub(super) fn without_opaque_alpha(self) -> Raster {
        if !self.layout.has_alpha() || self.transparent {
            return self;
        }
        let (layout, channels) = match self.layout {
            Layout::GrayAlpha => (Layout::Gray, 1),
            _ => (Layout::Rgb, 3),
        };
        let pixels = self
            .pixels
            .chunks_exact(channels + 1)
            .flat_map(|pixel| pixel[..channels].iter().copied())
            .collect();
        Raster {
            layout,
            pixels,
            ..self
        }
    }
}

/// Allocates a zeroed buffer, failing instead of aborting when memory is short.
pub(super) fn zeroed(len: usize) -> Result<Vec<u8>, ThumbnailError> {
    let mut buffer = Vec::new();
    buffer
        .try_reserve_exact(len)
        .map_err(|_| ThumbnailError::Internal("out of memory for the decoded image".into()))?;
    buffer.resize(len, 0);
    Ok(buffer)
}

/// The displayed size of a `width` x `height` image shrunk to fit `max_edge` (never enlarged).
pub(super) fn fit(width: u32, height: u32, max_edge: u32) -> (u32, u32) {
    let long = width.max(height);
    if long <= max_edge {
        return (width, height);
    }
    let scale = |side: u32| {
        let scaled = (f64::from(side) * f64::from(max_edge) / f64::from(long)).round();
        (scaled as u32).clamp(1, max_edge)
    };
    if width >= height {
        (max_edge, scale(height))
    } else {
        (scale(width), max_edge)
    }
}

/// Largest box-filter factor above which the shrunk image would fall below twice the target
/// (the final Lanczos3 pass then has enough pixels to work with), capped so that the 32-bit
/// sums of alpha-weighted samples (factor x 255 x 255 per column) cannot overflow.
pub(super) fn box_factor(width: u32, height: u32, target: (u32, u32)) -> u32 {
    let by_width = width / (2 * target.0).max(1);
    let by_height = height / (2 * target.1).max(1);
    by_width.min(by_height).clamp(1, 128)
}

/// Shrinks rows by an integer factor as they arrive (an average over factor x factor cells,
/// alpha-weighted so transparent pixels lend no colour), so a large image never has to be held
/// at full size. Factor 1 just collects the rows.
///
/// Each row is added column by column into one row of sums (a loop the compiler vectorises);
/// only once per band of `factor` rows are the sums folded horizontally into output pixels.
pub(super) struct BoxReducer {
    source_width: usize,
    layout: Layout,
    factor: usize,
    out_width: usize,
    /// Per source column and channel, the band's sum (colour premultiplied by alpha).
    sums: Vec<u32>,
    rows_in_band: usize,
    out: Vec<u8>,
    min_alpha: u8,
}

impl BoxReducer {
    pub(super) fn new(
        source_width: u32,
        source_height: u32,
        layout: Layout,
        factor: u32,
    ) -> Result<Self, ThumbnailError> {
        let factor = factor.max(1) as usize;
        let source_width = source_width as usize;
        let out_width = source_width.div_ceil(factor);
        let out_height = (source_height as usize).div_ceil(factor);
        let channels = layout.channels();
        let mut out = Vec::new();
        out.try_reserve_exact(out_width * out_height * channels)
            .map_err(|_| ThumbnailError::Internal("out of memory for the decoded image".into()))?;
        Ok(Self {
            source_width,
            layout,
            factor,
            out_width,
            sums: if factor > 1 {
                vec![0; source_width * channels]
            } else {
                Vec::new()
            },
            rows_in_band: 0,
            out,
            min_alpha: u8::MAX,
        })
    }

    /// Adds the next row (`source_width` pixels of the layout).
    pub(super) fn push_row(&mut self, row: &[u8]) {
        let channels = self.layout.channels();
        let row = &row[..self.source_width * channels];
        if self.layout.has_alpha() {
            self.min_alpha = row
                .iter()
                .skip(channels - 1)
                .step_by(channels)
                .fold(self.min_alpha, |low, &alpha| low.min(alpha));
        }
        if self.factor == 1 {
            self.out.extend_from_slice(row);
            return;
        }
        match self.layout {
            Layout::Gray | Layout::Rgb => {
                for (sum, &value) in self.sums.iter_mut().zip(row) {
                    *sum += u32::from(value);
                }
            }
            Layout::GrayAlpha => add_weighted::<2>(&mut self.sums, row),
            Layout::Rgba => add_weighted::<4>(&mut self.sums, row),
        }
        self.rows_in_band += 1;
        if self.rows_in_band == self.factor {
            self.emit_band();
        }
    }

    fn emit_band(&mut self) {
        match self.layout {
            Layout::Gray => self.emit::<1, false>(),
            Layout::GrayAlpha => self.emit::<2, true>(),
            Layout::Rgb => self.emit::<3, false>(),
            Layout::Rgba => self.emit::<4, true>(),
        }
        self.sums.fill(0);
        self.rows_in_band = 0;
    }

    /// Folds the band's column sums into output pixels: `C` channels, the last one alpha if
    /// `ALPHA`.
    fn emit<const C: usize, const ALPHA: bool>(&mut self) {
        let round = |value: f32| (value + 0.5) as u8;
        let full_cell = 1.0 / (self.factor * self.rows_in_band) as f32;
        for (cell, columns) in self.sums.chunks(self.factor * C).enumerate() {
            let mut totals = [0u32; C];
            for column in columns.chunks_exact(C) {
                for channel in 0..C {
                    totals[channel] += column[channel];
                }
            }
            let inverse_count = if columns.len() == self.factor * C {
                full_cell
            } else {
                1.0 / (columns.len() / C * self.rows_in_band) as f32
            };
            let mut pixel = [0u8; C];
            if ALPHA {
                let alpha_sum = totals[C - 1];
                // A fully transparent cell has no colour: 0.
                let inverse_alpha = if alpha_sum == 0 {
                    0.0
                } else {
                    1.0 / alpha_sum as f32
                };
                for channel in 0..C - 1 {
                    pixel[channel] = round(totals[channel] as f32 * inverse_alpha);
                }
                pixel[C - 1] = round(alpha_sum as f32 * inverse_count);
            } else {
                for channel in 0..C {
                    pixel[channel] = round(totals[channel] as f32 * inverse_count);
                }
            }
            debug_assert!(cell < self.out_width);
            self.out.extend_from_slice(&pixel);
        }
    }

    pub(super) fn finish(mut self) -> Raster {
        if self.rows_in_band > 0 {
            self.emit_band();
        }
        let channels = self.layout.channels();
        let height = self.out.len() / (self.out_width * channels).max(1);
        Raster {
            width: self.out_width as u32,
            height: height as u32,
            layout: self.layout,
            pixels: self.out,
            transparent: self.layout.has_alpha() && self.min_alpha < u8::MAX,
        }
    }
}

/// Adds colour premultiplied by alpha, and alpha itself, per column.
fn add_weighted<const C: usize>(sums: &mut [u32], row: &[u8]) {
    for (sum, pixel) in sums.chunks_exact_mut(C).zip(row.chunks_exact(C)) {
        let alpha = u32::from(pixel[C - 1]);
        for channel in 0..C - 1 {
            sum[channel] += u32::from(pixel[channel]) * alpha;
        }
        sum[C - 1] += alpha;
    }
}

/// Shrinks a fully decoded raster with [`BoxReducer`] when it is much larger than the target.
pub(super) fn pre_shrink(raster: Raster, target: (u32, u32)) -> Result<Raster, ThumbnailError> {
    let factor = box_factor(raster.width, raster.height, target);
    if factor == 1 {
        return Ok(raster);
    }
    let mut reducer = BoxReducer::new(raster.width, raster.height, raster.layout, factor)?;
    let stride = raster.width as usize * raster.layout.channels();
    for row in raster.pixels.chunks_exact(stride) {
        reducer.push_row(row);
    }
    let mut shrunk = reducer.finish();
    shrunk.transparent = raster.transparent;
    Ok(shrunk)
}

/// EXIF orientation (tag 0x0112): how the stored pixels must be turned to be displayed upright.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Orientation {
    /// 1: stored upright.
    #[default]
    Normal,
    /// 2: mirrored left-right.
    FlipHorizontal,
    /// 3: upside down.
    Rotate180,
    /// 4: mirrored top-bottom.
    FlipVertical,
    /// 5: mirrored along the top-left to bottom-right diagonal.
    Transpose,
    /// 6: must be turned 90 degrees clockwise.
    Rotate90,
    /// 7: mirrored along the top-right to bottom-left diagonal.
    Transverse,
    /// 8: must be turned 90 degrees counter-clockwise.
    Rotate270,
}

impl Orientation {
    /// The orientation of an EXIF tag value; anything outside 1-8 counts as upright.
    pub fn from_exif(value: u32) -> Self {
        match value {
            2 => Self::FlipHorizontal,
            3 => Self::Rotate180,
            4 => Self::FlipVertical,
            5 => Self::Transpose,
            6 => Self::Rotate90,
            7 => Self::Transverse,
            8 => Self::Rotate270,
            _ => Self::Normal,
        }
    }

    /// Width and height swap when displayed.
    pub fn swaps_axes(self) -> bool {
        matches!(
            self,
            Self::Transpose | Self::Rotate90 | Self::Transverse | Self::Rotate270
        )
    }

    /// `(width, height)` as displayed, from the stored ones (or back: the swap is symmetric).
    pub fn displayed(self, width: u32, height: u32) -> (u32, u32) {
        if self.swaps_axes() {
            (height, width)
        } else {
            (width, height)
        }
    }

    /// Turns stored pixels upright.
    pub(super) fn apply(self, raster: Raster) -> Raster {
        if self == Self::Normal {
            return raster;
        }
        let (width, height) = (raster.width as usize, raster.height as usize);
        let channels = raster.layout.channels();
        let (out_width, out_height) = if self.swaps_axes() {
            (height, width)
        } else {
            (width, height)
        };
        let mut pixels = Vec::with_capacity(raster.pixels.len());
        for y in 0..out_height {
            for x in 0..out_width {
                // Where displayed (x, y) comes from in the stored image.
                let (sx, sy) = match self {
                    Self::Normal => (x, y),
                    Self::FlipHorizontal => (width - 1 - x, y),
                    Self::Rotate180 => (width - 1 - x, height - 1 - y),
                    Self::FlipVertical => (x, height - 1 - y),
                    Self::Transpose => (y, x),
                    Self::Rotate90 => (y, height - 1 - x),
                    Self::Transverse => (width - 1 - y, height - 1 - x),
                    Self::Rotate270 => (width - 1 - y, x),
                };
                let start = (sy * width + sx) * channels;
                pixels.extend_from_slice(&raster.pixels[start..start + channels]);
            }
        }
        Raster {
            width: out_width as u32,
            height: out_height as u32,
            pixels,
            ..raster
        }
    }
}

/// The orientation recorded in EXIF data (a TIFF structure, optionally behind `Exif\0\0`).
pub(super) fn exif_orientation(exif: &[u8]) -> Orientation {
    let tiff = exif.strip_prefix(b"Exif\0\0").unwrap_or(exif);
    let Ok(fields) = exif::Reader::new().read_raw(tiff.to_vec()) else {
        return Orientation::Normal;
    };
    fields
        .get_field(exif::Tag::Orientation, exif::In::PRIMARY)
        .and_then(|field| field.value.get_uint(0))
        .map_or(Orientation::Normal, Orientation::from_exif)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_keeps_the_aspect_ratio_and_never_enlarges() {
        assert_eq!(fit(4000, 3000, 320), (320, 240));
        assert_eq!(fit(3000, 4000, 320), (240, 320));
        assert_eq!(fit(6000, 4000, 320), (320, 213));
        assert_eq!(fit(100, 50, 320), (100, 50));
        assert_eq!(fit(40_000, 10, 320), (320, 1));
    }

    #[test]
    fn box_reducer_averages_and_weights_by_alpha() {
        // 3x2 RGBA: one opaque red pixel next to transparent black ones.
        let rows: [&[u8]; 2] = [
            &[255, 0, 0, 255, 0, 0, 0, 0, 9, 9, 9, 255],
            &[0, 0, 0, 0, 0, 0, 0, 0, 9, 9, 9, 255],
        ];
        let mut reducer = BoxReducer::new(3, 2, Layout::Rgba, 2).unwrap();
        for row in rows {
            reducer.push_row(row);
        }
        let raster = reducer.finish();
        assert_eq!((raster.width, raster.height), (2, 1));
        // Pure red (no dark fringe) at a quarter opacity; the partial cell averages 2 pixels.
        assert_eq!(&raster.pixels[..4], &[255, 0, 0, 64]);
        assert_eq!(&raster.pixels[4..], &[9, 9, 9, 255]);
        assert!(raster.transparent);
    }

    #[test]
    fn orientation_turns_pixels_upright() {
        // Stored 2x1: [A, B]; orientation 6 (turn 90 clockwise) displays 1x2: A above B... after
        // turning clockwise, the left pixel ends up on top.
        let raster = |pixels: Vec<u8>, width, height| Raster {
            width,
            height,
            layout: Layout::Gray,
            pixels,
            transparent: false,
        };
        let turned = Orientation::Rotate90.apply(raster(vec![1, 2], 2, 1));
        assert_eq!(
            (turned.width, turned.height, turned.pixels),
            (1, 2, vec![1, 2])
        );
        let turned = Orientation::Rotate270.apply(raster(vec![1, 2], 2, 1));
        assert_eq!(turned.pixels, vec![2, 1]);
        let turned = Orientation::FlipHorizontal.apply(raster(vec![1, 2], 2, 1));
        assert_eq!(turned.pixels, vec![2, 1]);
    }
}
