//! JPEG: the header read by hand (frame size, components, progressive, EXIF, Adobe marker), the
//! scans counted by walking the markers, the pixels decoded by libjpeg-turbo (see [`libjpeg`]
//! for how a decode is bounded) at a reduced scale inside the IDCT, so a 12 MP photo for a
//! 320 px thumbnail is decoded straight to 500 x 375.

mod libjpeg;

pub(super) use libjpeg::{Limits, MAX_UNCONSUMED};

use bytes::Bytes;

use super::{
    Deadline, ThumbnailError,
    raster::{Layout, Raster},
};

/// What the markers before the first scan say.
#[derive(Debug, Clone)]
pub(super) struct JpegHeader<'a> {
    pub width: u32,
    pub height: u32,
    /// Horizontal and vertical sampling factor of each component.
    pub sampling: Vec<(u8, u8)>,
    /// Component identifiers, in the order of `sampling`.
    pub component_ids: Vec<u8>,
    pub progressive: bool,
    /// Present on Adobe-written files, whose CMYK is stored inverted.
    pub adobe: bool,
    pub exif: Option<&'a [u8]>,
}

/// Walks the marker segments up to the first scan.
pub(super) fn read_header(bytes: &[u8]) -> Result<JpegHeader<'_>, ThumbnailError> {
    let undecodable = |what: &str| ThumbnailError::Undecodable(format!("JPEG header: {what}"));
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return Err(undecodable("no start-of-image marker"));
    }
    let mut position = 2;
    let mut exif = None;
    let mut adobe = false;
    // Width, height, sampling, component ids and progressive, from the SOF segment.
    let mut frame = None;
    loop {
        let Some((at, marker)) = find_marker(bytes, position) else {
            return Err(undecodable("truncated before the first scan"));
        };
        position = at + 2;
        if matches!(marker, 0x01 | 0xD0..=0xD7) {
            continue;
        }
        if marker == 0xD9 {
            return Err(undecodable("no scan"));
        }
        let Some(length) = bytes
            .get(position..position + 2)
            .map(|length| usize::from(u16::from_be_bytes([length[0], length[1]])))
        else {
            return Err(undecodable("truncated segment"));
        };
        let Some(segment) = bytes.get(position + 2..position + length.max(2)) else {
            return Err(undecodable("truncated segment"));
        };
        match marker {
            0xDA => break,
            0xE1 if exif.is_none() && segment.starts_with(b"Exif\0\0") => {
                exif = Some(&segment[6..]);
            }
            0xEE if segment.starts_with(b"Adobe") => adobe = true,
            // SOF0-SOF15, except DHT (C4), JPG (C8) and DAC (CC).
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                if segment.len() < 6 {
                    return Err(undecodable("short frame header"));
                }
                let height = u32::from(u16::from_be_bytes([segment[1], segment[2]]));
                let width = u32::from(u16::from_be_bytes([segment[3], segment[4]]));
                let count = usize::from(segment[5]);
                let Some(components) = segment.get(6..6 + 3 * count) else {
                    return Err(undecodable("short frame header"));
                };
                let sampling: Vec<(u8, u8)> = components
                    .chunks_exact(3)
                    .map(|component| (component[1] >> 4, component[1] & 0x0F))
                    .collect();
                let component_ids: Vec<u8> = components.chunks_exact(3).map(|c| c[0]).collect();
                let progressive = matches!(marker, 0xC2 | 0xC6 | 0xCA | 0xCE);
                frame = Some((width, height, sampling, component_ids, progressive));
            }
            _ => {}
        }
        position += length;
    }
    let Some((width, height, sampling, component_ids, progressive)) = frame else {
        return Err(undecodable("no frame header"));
    };
    if width == 0 || height == 0 {
        return Err(undecodable("zero width or height"));
    }
    if !matches!(sampling.len(), 1 | 3 | 4)
        || sampling
            .iter()
            .any(|&(h, v)| !(1..=4).contains(&h) || !(1..=4).contains(&v))
    {
        return Err(undecodable("unsupported components"));
    }
    Ok(JpegHeader {
        width,
        height,
        sampling,
        component_ids,
        progressive,
        adobe,
        exif,
    })
}

/// For a progressive file decoded at 1/8: the file without the AC scans of its full-resolution
/// components, or `None` when there is nothing to leave out.
///
/// At 1/8 libjpeg reduces every block of a full-resolution component (all of them in 4:4:4, the
/// luma in 4:2:0) to its DC coefficient alone, so their AC scans, most of a progressive file,
/// cannot change a single output pixel; subsampled components get a larger IDCT and keep all
/// their scans. The scans are skipped by looking for the next marker, without entropy decoding.
/// (A baseline file interleaves all coefficients in one scan, so there is nothing to skip.)
pub(super) fn without_unused_scans(
    bytes: &[u8],
    header: &JpegHeader<'_>,
) -> Result<Option<Vec<u8>>, ThumbnailError> {
    let truncated = || ThumbnailError::Undecodable("JPEG: the file ends inside a scan".into());
    let max_h = header.sampling.iter().map(|s| s.0).max().unwrap_or(1);
    let max_v = header.sampling.iter().map(|s| s.1).max().unwrap_or(1);
    let dc_only: Vec<u8> = header
        .component_ids
        .iter()
        .zip(&header.sampling)
        .filter(|(_, sampling)| **sampling == (max_h, max_v))
        .map(|(id, _)| *id)
        .collect();
    let mut kept = Vec::with_capacity(bytes.len() / 2);
    kept.extend_from_slice(&bytes[..2]);
    let mut dropped = false;
    let mut position = 2;
    loop {
        let (at, marker) = find_marker(bytes, position).ok_or_else(truncated)?;
        position = at;
        if marker == 0xD9 {
            kept.extend_from_slice(&[0xFF, 0xD9]);
            break;
        }
        if matches!(marker, 0x01 | 0xD0..=0xD7) {
            position += 2;
            continue;
        }
        let length = bytes
            .get(position + 2..position + 4)
            .map(|length| usize::from(u16::from_be_bytes([length[0], length[1]])))
            .ok_or_else(truncated)?;
        let segment_end = position + 2 + length;
        let segment = bytes.get(position..segment_end).ok_or_else(truncated)?;
        if marker != 0xDA {
            kept.extend_from_slice(segment);
            position = segment_end;
            continue;
        }
        // SOS: count, (component id, tables) x count, Ss, Se, Ah/Al.
        let count = usize::from(*segment.get(4).ok_or_else(truncated)?);
        let spectral_start = *segment.get(5 + 2 * count).ok_or_else(truncated)?;
        let unused = spectral_start > 0 && count == 1 && dc_only.contains(&segment[5]);
        let scan_end = next_marker(bytes, segment_end).ok_or_else(truncated)?;
        if unused {
            dropped = true;
        } else {
            kept.extend_from_slice(&bytes[position..scan_end]);
        }
        position = scan_end;
    }
    Ok(dropped.then_some(kept))
}

/// Whether the file has more than `max` scans, counted by walking its markers and skipping the
/// entropy-coded data without decoding it (stops at scan `max + 1`). libjpeg's progress monitor
/// enforces the same limit during the decode; this refuses such a file before it takes a worker.
pub(super) fn has_more_scans_than(bytes: &[u8], max: u32) -> bool {
    let mut scans = 0;
    let mut position = 2;
    while let Some((at, marker)) = find_marker(bytes, position) {
        position = at + 2;
        match marker {
            0xD9 => break,
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let Some(length) = bytes
            .get(position..position + 2)
            .map(|length| usize::from(u16::from_be_bytes([length[0], length[1]])))
        else {
            break;
        };
        position += length;
        if marker == 0xDA {
            scans += 1;
            if scans > max {
                return true;
            }
            match next_marker(bytes, position) {
                Some(end) => position = end,
                None => break,
            }
        }
    }
    false
}

/// The next marker at or after `position`, skipping 0xFF fill bytes and any stray bytes
/// before it (libjpeg only warns about those): its offset and code.
fn find_marker(bytes: &[u8], position: usize) -> Option<(usize, u8)> {
    let mut at = position + memchr::memchr(0xFF, bytes.get(position..)?)?;
    loop {
        match *bytes.get(at + 1)? {
            0xFF => at += 1,
            0x00 => at += 2 + memchr::memchr(0xFF, bytes.get(at + 2..)?)?,
            marker => return Some((at, marker)),
        }
    }
}

/// Where the entropy-coded data starting at `from` ends: the next 0xFF that is neither a
/// stuffed zero nor a restart marker.
fn next_marker(bytes: &[u8], mut from: usize) -> Option<usize> {
    loop {
        let at = from + memchr::memchr(0xFF, bytes.get(from..)?)?;
        match bytes.get(at + 1) {
            Some(0x00 | 0xD0..=0xD7 | 0xFF) => from = at + 1,
            Some(_) => return Some(at),
            None => return None,
        }
    }
}

/// The smallest IDCT scale (numerator over 8) whose output still covers `target` on both axes
/// times `oversample`. Only 1/8, 2/8, 4/8 and 8/8: libjpeg-turbo has SIMD code for those; the
/// other sizes run its plain C IDCTs, slower and no sharper.
pub(super) fn scale_numerator(header: &JpegHeader<'_>, target: (u32, u32), oversample: u32) -> u8 {
    let wanted = (target.0 * oversample, target.1 * oversample);
    [1, 2, 4, 8]
        .into_iter()
        .find(|&numerator| {
            let (width, height) = scaled_size(header, numerator);
            width >= wanted.0.min(header.width) && height >= wanted.1.min(header.height)
        })
        .unwrap_or(8)
}

/// libjpeg's output size at `numerator / 8`.
pub(super) fn scaled_size(header: &JpegHeader<'_>, numerator: u8) -> (u32, u32) {
    let scale = |side: u32| (u64::from(side) * u64::from(numerator)).div_ceil(8) as u32;
    (scale(header.width), scale(header.height))
}

/// Bytes the decode holds at its peak: the output buffer (plus its RGB copy for CMYK), the whole
/// coefficient buffer of a progressive file (libjpeg must keep every scan), and the few rows of
/// sample buffers a sequential decode works in.
pub(super) fn decode_bytes(header: &JpegHeader<'_>, numerator: u8, input_len: u64) -> u64 {
    let (width, height) = scaled_size(header, numerator);
    let pixels = u64::from(width) * u64::from(height);
    let components = header.sampling.len() as u64;
    let output = pixels * if components == 4 { 4 + 3 } else { components };
    let max_h = header
        .sampling
        .iter()
        .map(|s| u64::from(s.0))
        .max()
        .unwrap_or(1);
    let max_v = header
        .sampling
        .iter()
        .map(|s| u64::from(s.1))
        .max()
        .unwrap_or(1);
    let mcu_columns = u64::from(header.width).div_ceil(8 * max_h);
    let mcu_rows = u64::from(header.height).div_ceil(8 * max_v);
    // A progressive file decoded at 1/8 is first copied without its unused scans.
    let pruned_copy = if header.progressive && numerator == 1 {
        input_len
    } else {
        0
    };
    let coefficients = if header.progressive {
        header
            .sampling
            .iter()
            .map(|&(h, v)| mcu_columns * u64::from(h) * mcu_rows * u64::from(v) * 64 * 2)
            .sum()
    } else {
        0
    };
    // Sample rows of one MCU row per component, at the reduced scale, twice (context rows).
    let rows = u64::from(width) * 16 * max_v * components * 2;
    output + pruned_copy + coefficients + rows + 256 * 1024
}

/// Decodes at `numerator / 8` into RGB or gray (CMYK is converted).
pub(super) fn decode(
    bytes: &[u8],
    header: &JpegHeader<'_>,
    numerator: u8,
    limits: &Limits<'_>,
) -> Result<Raster, ThumbnailError> {
    let pruned = if header.progressive && numerator == 1 {
        without_unused_scans(bytes, header)?
    } else {
        None
    };
    let components = header.sampling.len();
    let decoded = libjpeg::decode(
        pruned.as_deref().unwrap_or(bytes),
        numerator,
        components,
        limits,
    )?;
    Ok(to_raster(decoded, components, header.adobe))
}

fn to_raster(decoded: libjpeg::Decoded, components: usize, adobe: bool) -> Raster {
    let (layout, pixels) = match components {
        1 => (Layout::Gray, decoded.pixels),
        4 => (Layout::Rgb, cmyk_to_rgb(&decoded.pixels, adobe)),
        _ => (Layout::Rgb, decoded.pixels),
    };
    Raster {
        width: decoded.width as u32,
        height: decoded.height as u32,
        layout,
        pixels,
        transparent: false,
    }
}

/// A JPEG decoded while it arrives (see [`libjpeg::StreamingDecode`]). A progressive file
/// decoded at 1/8 loses its unused scans on the way in, as in [`without_unused_scans`].
pub(super) struct StreamingJpeg {
    decode: libjpeg::StreamingDecode,
    filter: Option<ScanFilter>,
    components: usize,
    adobe: bool,
}

impl StreamingJpeg {
    pub(super) fn new(
        header: &JpegHeader<'_>,
        numerator: u8,
        max_scans: u32,
        max_memory: u64,
    ) -> Self {
        let components = header.sampling.len();
        let filter =
            (header.progressive && numerator == 1).then(|| ScanFilter::new(header, max_scans));
        Self {
            decode: libjpeg::StreamingDecode::new(numerator, components, max_scans, max_memory),
            filter,
            components,
            adobe: header.adobe,
        }
    }

    /// Gives the next pieces of the file, decoding as far as they reach in one libjpeg run.
    pub(super) fn push(
        &mut self,
        pieces: &[Bytes],
        deadline: &Deadline,
    ) -> Result<(), ThumbnailError> {
        self.decode.set_deadline(deadline.clone());
        match &mut self.filter {
            Some(filter) => self.decode.push_with(|buffer| filter.pass(pieces, buffer)),
            None => self.decode.push_with(|buffer| {
                buffer.reserve_exact(pieces.iter().map(Bytes::len).sum());
                for piece in pieces {
                    buffer.extend_from_slice(piece);
                }
                Ok(())
            }),
        }
    }

    /// Decoded up to the end marker: what follows (a motion photo's video) is not needed.
    pub(super) fn is_complete(&self) -> bool {
        self.decode.is_complete() || self.filter.as_ref().is_some_and(|filter| filter.ended)
    }

    pub(super) fn handed_bytes(&self) -> u64 {
        self.decode.handed_bytes()
    }

    pub(super) fn finish(mut self, deadline: &Deadline) -> Result<Raster, ThumbnailError> {
        self.decode.set_deadline(deadline.clone());
        if let Some(filter) = self.filter.take() {
            // Bytes held back for a marker that never completed: libjpeg judges them.
            let held = filter.held;
            self.decode.push_with(|buffer| {
                buffer.extend_from_slice(&held);
                Ok(())
            })?;
        }
        let decoded = self.decode.finish()?;
        Ok(to_raster(decoded, self.components, self.adobe))
    }
}

/// Most bytes the [`ScanFilter`] holds back between pieces: an SOS segment not complete yet.
pub(super) const MAX_HELD_BYTES: usize = 2 + 0xFFFF;

/// [`without_unused_scans`] on a file that arrives in pieces: segments are passed on, the
/// entropy-coded data of an unused scan is dropped as it streams by (found by looking for the
/// next marker, without decoding it), and every scan is counted against the limit, dropped or
/// not, as [`has_more_scans_than`] counts them in a whole file, up to the end marker; what
/// follows it (a motion photo's video) is neither looked at nor passed on.
struct ScanFilter {
    /// Components whose AC scans are unused at 1/8 (the full-resolution ones).
    dc_only: Vec<u8>,
    max_scans: u32,
    scans: u32,
    state: FilterState,
    /// Bytes that cannot be judged yet: a marker cut by the end of a piece, an SOS segment not
    /// complete, a 0xFF at the end of entropy-coded data (at most [`MAX_HELD_BYTES`]).
    held: Vec<u8>,
    /// The end marker has been passed on.
    ended: bool,
}

#[derive(Clone, Copy)]
enum FilterState {
    /// Between segments.
    Markers,
    /// Passing on the rest of a segment.
    Segment { left: usize },
    /// Inside a scan's entropy-coded data, passed on or dropped.
    Entropy { kept: bool },
}

impl ScanFilter {
    fn new(header: &JpegHeader<'_>, max_scans: u32) -> Self {
        let max_h = header.sampling.iter().map(|s| s.0).max().unwrap_or(1);
        let max_v = header.sampling.iter().map(|s| s.1).max().unwrap_or(1);
        let dc_only = header
            .component_ids
            .iter()
            .zip(&header.sampling)
            .filter(|(_, sampling)| **sampling == (max_h, max_v))
            .map(|(id, _)| *id)
            .collect();
        Self {
            dc_only,
            max_scans,
            scans: 0,
            state: FilterState::Markers,
            held: Vec::new(),
            ended: false,
        }
    }

    /// Appends to `out` what of `pieces` (after what was held) the decoder needs.
    fn pass(&mut self, pieces: &[Bytes], out: &mut Vec<u8>) -> Result<(), ThumbnailError> {
        // Sized once for the most this step can pass on: grown piece by piece, a Vec doubles
        // its capacity and would hold up to twice what `INPUT_BYTES` reserves for it.
        out.reserve_exact(self.held.len() + pieces.iter().map(Bytes::len).sum::<usize>());
        for (index, piece) in pieces.iter().enumerate() {
            if self.ended {
                break;
            }
            if !self.held.is_empty() {
                // The held bytes and the rest of the step in one buffer: held bytes are copied
                // once per step, not once per piece.
                let rest = &pieces[index..];
                let mut joined = Vec::with_capacity(
                    self.held.len() + rest.iter().map(Bytes::len).sum::<usize>(),
                );
                joined.append(&mut std::mem::take(&mut self.held));
                for piece in rest {
                    joined.extend_from_slice(piece);
                }
                return self.scan(&joined, out);
            }
            self.scan(piece, out)?;
        }
        Ok(())
    }

    /// [`Self::pass`] over one contiguous run of bytes, nothing held before them.
    fn scan(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), ThumbnailError> {
        let mut at = 0;
        while at < bytes.len() && !self.ended {
            match self.state {
                FilterState::Segment { left } => {
                    let count = left.min(bytes.len() - at);
                    out.extend_from_slice(&bytes[at..at + count]);
                    at += count;
                    self.state = match left - count {
                        0 => FilterState::Markers,
                        left => FilterState::Segment { left },
                    };
                }
                FilterState::Entropy { kept } => {
                    let Some(found) = memchr::memchr(0xFF, &bytes[at..]) else {
                        if kept {
                            out.extend_from_slice(&bytes[at..]);
                        }
                        at = bytes.len();
                        break;
                    };
                    let marker = at + found;
                    let Some(&code) = bytes.get(marker + 1) else {
                        if kept {
                            out.extend_from_slice(&bytes[at..marker]);
                        }
                        at = marker;
                        break;
                    };
                    // Stuffed zeros, restart markers and fill bytes stay inside the scan.
                    let end = if matches!(code, 0x00 | 0xD0..=0xD7 | 0xFF) {
                        marker + 1
                    } else {
                        self.state = FilterState::Markers;
                        marker
                    };
                    if kept {
                        out.extend_from_slice(&bytes[at..end]);
                    }
                    at = end;
                }
                FilterState::Markers => {
                    if bytes[at] != 0xFF {
                        // Stray bytes: libjpeg skips them with a warning, as it would have.
                        out.push(bytes[at]);
                        at += 1;
                        continue;
                    }
                    let Some(&code) = bytes.get(at + 1) else {
                        break;
                    };
                    if matches!(code, 0xFF | 0x00) {
                        out.push(0xFF);
                        at += 1;
                        continue;
                    }
                    if matches!(code, 0x01 | 0xD0..=0xD9) {
                        out.extend_from_slice(&bytes[at..at + 2]);
                        at += 2;
                        self.ended = code == 0xD9;
                        continue;
                    }
                    let Some(length) = bytes.get(at + 2..at + 4) else {
                        break;
                    };
                    let length = usize::from(u16::from_be_bytes([length[0], length[1]]));
                    if code != 0xDA {
                        self.state = FilterState::Segment { left: 2 + length };
                        continue;
                    }
                    let Some(segment) = bytes.get(at..at + 2 + length) else {
                        break;
                    };
                    self.scans += 1;
                    if self.scans > self.max_scans {
                        return Err(ThumbnailError::TooManyScans {
                            max_scans: self.max_scans,
                        });
                    }
                    // SOS: count, (component id, tables) x count, Ss, Se, Ah/Al.
                    let count = usize::from(*segment.get(4).unwrap_or(&0));
                    let spectral_start = segment.get(5 + 2 * count).copied().unwrap_or(0);
                    let unused = spectral_start > 0
                        && count == 1
                        && segment.get(5).is_some_and(|id| self.dc_only.contains(id));
                    if !unused {
                        out.extend_from_slice(segment);
                    }
                    at += segment.len();
                    self.state = FilterState::Entropy { kept: !unused };
                }
            }
        }
        if !self.ended {
            self.held = bytes[at..].to_vec();
        }
        Ok(())
    }
}

/// Naive CMYK to RGB (no ICC profile). Adobe applications store CMYK (and YCCK, which libjpeg
/// turns into CMYK) inverted, so 255 means no ink there.
fn cmyk_to_rgb(cmyk: &[u8], inverted: bool) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for pixel in cmyk.chunks_exact(4) {
        let ink = |value: u8| if inverted { value } else { 255 - value };
        let black = u32::from(ink(pixel[3]));
        for &value in &pixel[..3] {
            rgb.push(((u32::from(ink(value)) * black + 127) / 255) as u8);
        }
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::thumbnails::Deadline;

    /// A progressive photo-like image: gradients plus fine detail in every channel.
    fn progressive(width: u16, height: u16, sampling: jpeg_encoder::SamplingFactor) -> Vec<u8> {
        let mut pixels = Vec::with_capacity(usize::from(width) * usize::from(height) * 3);
        for y in 0..u32::from(height) {
            for x in 0..u32::from(width) {
                let detail = ((x * 7 + y * 13) % 23) as u8;
                pixels.extend_from_slice(&[
                    (x / 11) as u8 ^ detail,
                    (y / 7) as u8,
                    ((x + y) / 13) as u8 ^ (detail << 2),
                ]);
            }
        }
        let mut bytes = Vec::new();
        let mut encoder = jpeg_encoder::Encoder::new(&mut bytes, 90);
        encoder.set_progressive(true);
        encoder.set_sampling_factor(sampling);
        encoder
            .encode(&pixels, width, height, jpeg_encoder::ColorType::Rgb)
            .unwrap();
        bytes
    }

    #[test]
    fn leaving_out_unused_scans_changes_no_pixel_at_one_eighth() {
        for sampling in [
            jpeg_encoder::SamplingFactor::F_2_2,
            jpeg_encoder::SamplingFactor::F_1_1,
        ] {
            let bytes = progressive(1024, 768, sampling);
            let header = read_header(&bytes).unwrap();
            assert!(header.progressive);
            let pruned = without_unused_scans(&bytes, &header)
                .unwrap()
                .expect("luma AC scans are left out");
            assert!(pruned.len() < bytes.len(), "{sampling:?}");
            let deadline = Deadline::none();
            let limits = Limits {
                max_scans: 100,
                max_memory: 1 << 30,
                deadline: &deadline,
            };
            let whole = libjpeg::decode(&bytes, 1, 3, &limits).unwrap();
            let reduced = libjpeg::decode(&pruned, 1, 3, &limits).unwrap();
            assert_eq!((whole.width, whole.height), (128, 96));
            assert!(
                whole.pixels == reduced.pixels,
                "{sampling:?}: pixels differ"
            );
        }
    }

    #[test]
    fn the_streamed_scan_filter_keeps_what_the_whole_file_filter_keeps() {
        for sampling in [
            jpeg_encoder::SamplingFactor::F_2_2,
            jpeg_encoder::SamplingFactor::F_1_1,
        ] {
            let bytes = progressive(512, 384, sampling);
            let header = read_header(&bytes).unwrap();
            let whole = without_unused_scans(&bytes, &header).unwrap().unwrap();
            for piece in [1, 2, 3, 7, 100, 4096] {
                let mut filter = ScanFilter::new(&header, 1000);
                let mut kept = Vec::new();
                for chunk in bytes.chunks(piece) {
                    filter
                        .pass(&[Bytes::copy_from_slice(chunk)], &mut kept)
                        .unwrap();
                }
                kept.extend_from_slice(&filter.held);
                assert!(kept == whole, "{sampling:?} in pieces of {piece}");
                // Several pieces per step, as the feed hands them over.
                let mut filter = ScanFilter::new(&header, 1000);
                let mut batched = Vec::new();
                let pieces: Vec<Bytes> = bytes.chunks(piece).map(Bytes::copy_from_slice).collect();
                for step in pieces.chunks(5) {
                    filter.pass(step, &mut batched).unwrap();
                }
                batched.extend_from_slice(&filter.held);
                assert!(
                    batched == whole,
                    "{sampling:?} in steps of 5 pieces of {piece}"
                );
            }
            let scans = scan_offsets(&bytes).len() as u32;
            let mut filter = ScanFilter::new(&header, scans - 1);
            assert!(matches!(
                filter.pass(&[Bytes::from(bytes.clone())], &mut Vec::new()),
                Err(ThumbnailError::TooManyScans { .. })
            ));
        }
    }

    /// A motion photo's tail: what follows the end marker, here full of scan headers.
    fn trailer_of_scans(count: usize) -> Vec<u8> {
        let mut trailer = b"\0\0\0\x18ftypmp42".to_vec();
        for _ in 0..count {
            trailer.extend_from_slice(&[0xFF, 0xDA, 0, 8, 1, 1, 0, 1, 0x3F, 0x10, 0x55]);
        }
        trailer
    }

    #[test]
    fn the_scan_filter_stops_at_the_end_marker() {
        let bytes = progressive(512, 384, jpeg_encoder::SamplingFactor::F_2_2);
        let header = read_header(&bytes).unwrap();
        let whole = without_unused_scans(&bytes, &header).unwrap().unwrap();
        let scans = scan_offsets(&bytes).len() as u32;
        let mut photo = bytes.clone();
        photo.extend_from_slice(&trailer_of_scans(3 * scans as usize));
        for piece in [1, 100, 4096, photo.len()] {
            // The trailer's scan headers would be more than the limit if they were counted.
            let mut filter = ScanFilter::new(&header, scans);
            let mut kept = Vec::new();
            let pieces: Vec<Bytes> = photo.chunks(piece).map(Bytes::copy_from_slice).collect();
            for step in pieces.chunks(3) {
                filter.pass(step, &mut kept).unwrap();
            }
            assert!(filter.ended, "in pieces of {piece}");
            assert!(filter.held.is_empty(), "in pieces of {piece}");
            assert!(
                kept == whole,
                "in pieces of {piece}: bytes after the end passed on"
            );
        }
    }

    #[test]
    fn a_filter_step_allocates_what_it_passes_on_not_twice() {
        // Grown piece by piece a Vec doubles its capacity; `INPUT_BYTES` counts each step's
        // input once.
        let bytes = progressive(1024, 768, jpeg_encoder::SamplingFactor::F_2_2);
        let header = read_header(&bytes).unwrap();
        let scans = scan_offsets(&bytes).len() as u32;
        let mut filter = ScanFilter::new(&header, scans);
        let mut out = Vec::new();
        let pieces: Vec<Bytes> = bytes.chunks(4099).map(Bytes::copy_from_slice).collect();
        for step in pieces.chunks(16) {
            let (before, had) = (out.len(), out.capacity());
            let most = filter.held.len() + step.iter().map(Bytes::len).sum::<usize>();
            filter.pass(step, &mut out).unwrap();
            assert!(
                out.capacity() <= had.max(before + most),
                "capacity {} for {} bytes",
                out.capacity(),
                before + most
            );
        }
    }

    #[test]
    fn libjpeg_gives_its_input_back_once_consumed_and_keeps_nothing_after_the_end() {
        let bytes = progressive(1024, 768, jpeg_encoder::SamplingFactor::F_2_2);
        let deadline = Deadline::none();
        // At 1/4: no scan filter, libjpeg sees every byte.
        let mut decode = libjpeg::StreamingDecode::new(2, 3, 100, 1 << 30);
        decode.set_deadline(deadline.clone());
        let (head, tail) = bytes.split_at(bytes.len() - 2);
        decode
            .push_with(|buffer| {
                buffer.extend_from_slice(head);
                Ok(())
            })
            .unwrap();
        assert!(head.len() > 2 * 64 * 1024, "{} bytes", head.len());
        assert!(!decode.is_complete());
        assert!(
            decode.buffer_capacity() <= 64 * 1024,
            "{} bytes kept after the step",
            decode.buffer_capacity()
        );
        // The end marker and, in the same piece, a tail longer than libjpeg may leave
        // unconsumed: it is not needed, so it is dropped, not refused.
        let mut end = tail.to_vec();
        end.extend(std::iter::repeat_n(0x5A, 2 * MAX_UNCONSUMED));
        decode
            .push_with(|buffer| {
                buffer.extend_from_slice(&end);
                Ok(())
            })
            .unwrap();
        assert!(decode.is_complete());
        assert_eq!(decode.buffer_capacity(), 0);
        let decoded = decode.finish().unwrap();
        let whole = libjpeg::decode(&bytes, 2, 3, &limits(&deadline, 100)).unwrap();
        assert!(decoded.pixels == whole.pixels);
    }

    fn limits(deadline: &Deadline, max_scans: u32) -> Limits<'_> {
        Limits {
            max_scans,
            max_memory: 1 << 30,
            deadline,
        }
    }

    /// Where the file's scans start: the offsets of its SOS markers.
    fn scan_offsets(bytes: &[u8]) -> Vec<usize> {
        let header = read_header(bytes).unwrap();
        assert!(header.progressive);
        (0..bytes.len() - 1)
            .filter(|&at| bytes[at] == 0xFF && bytes[at + 1] == 0xDA)
            .collect()
    }

    #[test]
    fn scans_are_counted_from_the_markers() {
        let bytes = progressive(64, 48, jpeg_encoder::SamplingFactor::F_2_2);
        let scans = scan_offsets(&bytes).len() as u32;
        assert!(scans > 3, "{scans} scans");
        assert!(has_more_scans_than(&bytes, scans - 1));
        assert!(!has_more_scans_than(&bytes, scans));
    }

    #[test]
    fn the_progress_monitor_stops_at_the_scan_limit() {
        let bytes = progressive(64, 48, jpeg_encoder::SamplingFactor::F_2_2);
        let deadline = Deadline::none();
        match libjpeg::decode(&bytes, 8, 3, &limits(&deadline, 3)) {
            Err(ThumbnailError::TooManyScans { max_scans: 3 }) => {}
            other => panic!("{:?}", other.map(|decoded| decoded.width)),
        }
        let scans = scan_offsets(&bytes).len() as u32;
        let decoded = libjpeg::decode(&bytes, 8, 3, &limits(&deadline, scans)).unwrap();
        assert_eq!((decoded.width, decoded.height), (64, 48));
    }

    #[test]
    fn the_progress_monitor_stops_a_cancelled_decode_before_any_row() {
        let bytes = progressive(256, 192, jpeg_encoder::SamplingFactor::F_2_2);
        let deadline = Deadline::none();
        deadline.cancel();
        match libjpeg::decode(&bytes, 8, 3, &limits(&deadline, 100)) {
            Err(ThumbnailError::TimedOut) => {}
            other => panic!("{:?}", other.map(|decoded| decoded.width)),
        }
    }

    #[test]
    fn a_refinement_of_bits_never_sent_is_a_bogus_progression_and_undecodable() {
        let bytes = progressive(64, 48, jpeg_encoder::SamplingFactor::F_2_2);
        let last_scan = *scan_offsets(&bytes).last().unwrap();
        let end = bytes.len() - 2;
        let mut repeated = bytes[..end].to_vec();
        let mut again = bytes[last_scan..end].to_vec();
        // SOS: marker, length, count, (id, tables) x count, Ss, Se, then Ah/Al: claim to
        // refine bit 1 of coefficients already known to full precision (Al = 0).
        let count = usize::from(again[4]);
        again[5 + 2 * count + 2] = 0x10;
        repeated.extend_from_slice(&again);
        repeated.extend_from_slice(&[0xFF, 0xD9]);
        let deadline = Deadline::none();
        match libjpeg::decode(&repeated, 8, 3, &limits(&deadline, 100)) {
            Err(ThumbnailError::Undecodable(message)) => {
                assert!(message.contains("progression"), "{message}");
            }
            other => panic!("{:?}", other.map(|decoded| decoded.width)),
        }
    }

    #[test]
    fn a_truncated_file_is_undecodable() {
        let bytes = progressive(64, 48, jpeg_encoder::SamplingFactor::F_2_2);
        let deadline = Deadline::none();
        let cut = &bytes[..bytes.len() * 2 / 3];
        match libjpeg::decode(cut, 8, 3, &limits(&deadline, 100)) {
            Err(ThumbnailError::Undecodable(message)) => {
                assert!(message.contains("Premature end"), "{message}");
            }
            other => panic!("{:?}", other.map(|decoded| decoded.width)),
        }
    }

    #[test]
    fn stray_bytes_between_segments_are_skipped() {
        let mut bytes = progressive(64, 48, jpeg_encoder::SamplingFactor::F_2_2);
        // After SOI, before the first segment.
        bytes.splice(2..2, [0x00, 0x12, 0xFF, 0xFF]);
        let header = read_header(&bytes).unwrap();
        assert_eq!((header.width, header.height), (64, 48));
    }
}
