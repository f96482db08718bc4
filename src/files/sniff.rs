//! Checking an upload's bytes against its declared type while they arrive.
//!
//! [`ContentSniffer`] is fed every chunk in order. It decides the declared type's magic bytes
//! as soon as enough have arrived, reads image dimensions from the header (refusing oversized
//! images before any decode), validates text as UTF-8 across chunk boundaries, and keeps only a
//! bounded head and tail, so the structural checks that need the end of the file (a ZIP's
//! central directory, a PDF's `%%EOF`) run at [`ContentSniffer::finish`] without buffering the
//! file.
//!
//! Work is proportional to the bytes fed, however they are chunked: an empty chunk costs nothing,
//! the image header is parsed again only once it has doubled since the last attempt (so all
//! attempts together read at most twice the header), and the tail is a ring that drops old
//! bytes without moving the rest.

use std::{
    collections::VecDeque,
    io::{self, Read, Seek, SeekFrom},
};

use super::kind::FileKind;
use crate::error::{Error, Reason};

/// Longest image header kept while looking for the dimensions (a JPEG's frame header follows
/// its EXIF block, which may hold a large embedded preview).
const IMAGE_HEAD_LIMIT: usize = 512 * 1024;
/// Bytes kept from the end of an Office document for its ZIP central directory.
const TAIL_LIMIT: usize = 256 * 1024;
/// The shortest image header worth a parse attempt (every format's dimensions fit in it when
/// nothing precedes them).
const FIRST_PARSE_AT: usize = 32;
/// `Vec<u8>` as base64 text: checkpoints travel as JSON.
mod base64_bytes {
    use base64::{Engine, engine::general_purpose::STANDARD};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

/// Where `%%EOF` must appear in a PDF, counted from the end.
const PDF_EOF_WINDOW: usize = 1024;
/// Most entries an Office document may have.
const MAX_ZIP_ENTRIES: usize = 20_000;
/// Most an Office document's parts may expand to, in all.
const MAX_OOXML_EXPANDED: u64 = 4 << 30;
/// DEFLATE cannot expand data more than about 1032:1: an entry claiming more lies.
const MAX_DEFLATE_RATIO: u64 = 1100;

/// Why the bytes do not fit the declared type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniffError {
    #[error("the content is not {expected} (its first bytes do not match)")]
    ContentTypeMismatch { expected: &'static str },
    #[error("the image is {width}x{height} pixels, more than the {max_pixels} allowed")]
    ImageTooLarge {
        width: u32,
        height: u32,
        max_pixels: u64,
    },
    #[error("the image header cannot be read")]
    ImageUndecodable,
    #[error("the document is malformed: {0}")]
    MalformedDocument(&'static str),
}

/// Every sniffing failure is the upload's fault (`INVALID_ARGUMENT`).
impl From<SniffError> for Error {
    fn from(error: SniffError) -> Self {
        let reason = match &error {
            SniffError::ContentTypeMismatch { .. } => Reason::ContentTypeMismatch,
            SniffError::ImageTooLarge { .. } => Reason::ImageTooLarge,
            SniffError::ImageUndecodable => Reason::ImageUndecodable,
            SniffError::MalformedDocument(_) => Reason::MalformedDocument,
        };
        Error::invalid(reason, error.to_string())
    }
}

/// What the bytes turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SniffReport {
    /// Pixel dimensions as stored (before EXIF orientation), when the format has them.
    pub width: u32,
    pub height: u32,
}

/// A [`ContentSniffer`]'s state, for carrying on elsewhere (a resumed upload): everything it
/// keeps, which is bounded (the image header until the dimensions are known, the tail).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnifferCheckpoint {
    #[serde(with = "base64_bytes")]
    head: Vec<u8>,
    magic_checked: bool,
    dimensions: Option<(u32, u32)>,
    next_parse_at: usize,
    #[serde(with = "base64_bytes")]
    utf8_carry: Vec<u8>,
    #[serde(with = "base64_bytes")]
    tail: Vec<u8>,
    total: u64,
}

/// Checks one upload's bytes; see the module docs.
pub struct ContentSniffer {
    kind: FileKind,
    max_image_pixels: u64,
    head: Vec<u8>,
    /// No more bytes belong in `head` (its checks are done; a resumed sniffer may not have it).
    head_done: bool,
    magic_checked: bool,
    dimensions: Option<(u32, u32)>,
    /// The header length at which the next parse for the dimensions is tried.
    next_parse_at: usize,
    utf8_carry: Vec<u8>,
    /// The last `tail_limit` bytes fed (none for kinds without a closing check).
    tail: VecDeque<u8>,
    tail_limit: usize,
    total: u64,
    /// Bytes read by header parses and copied into the buffers: the sniffer's work, which must
    /// stay proportional to the bytes fed.
    examined: u64,
}

impl ContentSniffer {
    pub fn new(kind: FileKind, max_image_pixels: u64) -> Self {
        Self {
            kind,
            max_image_pixels,
            head: Vec::new(),
            head_done: false,
            magic_checked: false,
            dimensions: None,
            next_parse_at: FIRST_PARSE_AT,
            utf8_carry: Vec::new(),
            tail: VecDeque::new(),
            tail_limit: tail_limit(kind),
            total: 0,
            examined: 0,
        }
    }

    /// The state to [`ContentSniffer::resume`] from.
    pub fn checkpoint(&self) -> SnifferCheckpoint {
        // Once the dimensions are known (or the kind has none), only the magic bytes' verdict
        // of the head matters.
        let head_needed = !self.magic_checked || (self.is_image() && self.dimensions.is_none());
        SnifferCheckpoint {
            head: if head_needed {
                self.head.clone()
            } else {
                Vec::new()
            },
            magic_checked: self.magic_checked,
            dimensions: self.dimensions,
            next_parse_at: self.next_parse_at,
            utf8_carry: self.utf8_carry.clone(),
            tail: self.tail.iter().copied().collect(),
            total: self.total,
        }
    }

    /// Carries on from a checkpoint taken by a sniffer of the same kind and limit.
    pub fn resume(kind: FileKind, max_image_pixels: u64, checkpoint: SnifferCheckpoint) -> Self {
        let mut sniffer = Self::new(kind, max_image_pixels);
        let SnifferCheckpoint {
            head,
            magic_checked,
            dimensions,
            next_parse_at,
            utf8_carry,
            tail,
            total,
        } = checkpoint;
        let head_limit = if sniffer.is_image() {
            IMAGE_HEAD_LIMIT
        } else {
            64
        };
        sniffer.head = head;
        sniffer.head.truncate(head_limit);
        // A head dropped at the checkpoint is full as far as further bytes are concerned.
        if magic_checked && (dimensions.is_some() || !sniffer.is_image()) {
            sniffer.head = Vec::new();
            sniffer.head_done = true;
        }
        sniffer.magic_checked = magic_checked;
        sniffer.dimensions = dimensions;
        sniffer.next_parse_at = next_parse_at;
        sniffer.utf8_carry = utf8_carry;
        sniffer.utf8_carry.truncate(3);
        let keep = tail.len().min(sniffer.tail_limit);
        sniffer.tail = tail[tail.len() - keep..].iter().copied().collect();
        sniffer.total = total;
        sniffer
    }

    /// Bytes examined so far (parsed, validated or copied), for checking that the work stays
    /// proportional to the input.
    pub fn bytes_examined(&self) -> u64 {
        self.examined
    }

    /// Checks the next chunk; an error means the upload must stop now.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), SniffError> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.total += chunk.len() as u64;
        let head_limit = if self.is_image() {
            IMAGE_HEAD_LIMIT
        } else {
            64
        };
        if !self.head_done && self.head.len() < head_limit {
            let take = chunk.len().min(head_limit - self.head.len());
            self.head.extend_from_slice(&chunk[..take]);
            self.examined += take as u64;
        }
        if !self.magic_checked && self.head.len() >= magic_length(self.kind) {
            self.check_magic()?;
        }
        if self.magic_checked
            && self.is_image()
            && self.dimensions.is_none()
            && self.head.len() >= self.next_parse_at.min(IMAGE_HEAD_LIMIT)
        {
            self.read_dimensions(false)?;
            // Geometric: the next attempt waits until the header has doubled.
            self.next_parse_at = self.head.len().saturating_mul(2);
        }
        if is_text(self.kind) {
            self.examined += chunk.len() as u64;
            self.check_text(chunk)?;
        }
        self.keep_tail(chunk);
        Ok(())
    }

    /// Runs the checks that need the whole file, once every byte was fed.
    pub fn finish(mut self) -> Result<SniffReport, SniffError> {
        if !self.magic_checked {
            self.check_magic()?;
        }
        if is_text(self.kind) && !self.utf8_carry.is_empty() {
            return Err(SniffError::ContentTypeMismatch {
                expected: "UTF-8 text",
            });
        }
        if self.is_image() && self.dimensions.is_none() {
            self.read_dimensions(true)?;
        }
        self.tail.make_contiguous();
        match self.kind {
            FileKind::Pdf => {
                let tail = self.tail.as_slices().0;
                let window = &tail[tail.len().saturating_sub(PDF_EOF_WINDOW)..];
                if !contains(window, b"%%EOF") {
                    return Err(SniffError::MalformedDocument("a PDF must end with %%EOF"));
                }
            }
            FileKind::Docx | FileKind::Xlsx | FileKind::Pptx => self.check_ooxml()?,
            _ => {}
        }
        let (width, height) = self.dimensions.unwrap_or((0, 0));
        Ok(SniffReport { width, height })
    }

    fn is_image(&self) -> bool {
        self.kind.category() == super::policy::FileCategory::Image
    }

    fn check_magic(&mut self) -> Result<(), SniffError> {
        self.magic_checked = true;
        if magic_matches(self.kind, &self.head) {
            Ok(())
        } else {
            Err(SniffError::ContentTypeMismatch {
                expected: self.kind.mime_type(),
            })
        }
    }

    fn read_dimensions(&mut self, at_end: bool) -> Result<(), SniffError> {
        self.examined += self.head.len() as u64;
        // HEIC/HEIF keep their size deep in the `meta` box; accept them without one.
        if matches!(self.kind, FileKind::Heic | FileKind::Heif) && self.dimensions.is_none() {
            match imagesize::blob_size(&self.head) {
                Ok(size) => self.accept_dimensions(size.width, size.height)?,
                Err(_) if at_end || self.head.len() >= IMAGE_HEAD_LIMIT => {
                    self.dimensions = Some((0, 0));
                }
                Err(_) => {}
            }
            return Ok(());
        }
        match imagesize::blob_size(&self.head) {
            Ok(size) => self.accept_dimensions(size.width, size.height),
            // More header may still be on its way.
            Err(_) if !at_end && self.head.len() < IMAGE_HEAD_LIMIT => Ok(()),
            Err(_) => Err(SniffError::ImageUndecodable),
        }
    }

    fn accept_dimensions(&mut self, width: usize, height: usize) -> Result<(), SniffError> {
        let (Ok(width), Ok(height)) = (u32::try_from(width), u32::try_from(height)) else {
            return Err(SniffError::ImageUndecodable);
        };
        if width == 0 || height == 0 {
            return Err(SniffError::ImageUndecodable);
        }
        if u64::from(width) * u64::from(height) > self.max_image_pixels {
            return Err(SniffError::ImageTooLarge {
                width,
                height,
                max_pixels: self.max_image_pixels,
            });
        }
        self.dimensions = Some((width, height));
        Ok(())
    }

    fn check_text(&mut self, chunk: &[u8]) -> Result<(), SniffError> {
        let not_text = SniffError::ContentTypeMismatch {
            expected: "UTF-8 text",
        };
        if chunk.contains(&0) {
            return Err(not_text);
        }
        // Validate carry + chunk without copying the chunk: only the few bytes of a character
        // split across the boundary are joined.
        let mut rest = chunk;
        if !self.utf8_carry.is_empty() {
            let needed = utf8_width(self.utf8_carry[0]).ok_or(not_text.clone())?;
            let take = (needed - self.utf8_carry.len()).min(rest.len());
            self.utf8_carry.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.utf8_carry.len() < needed {
                return Ok(());
            }
            std::str::from_utf8(&self.utf8_carry).map_err(|_| not_text.clone())?;
            self.utf8_carry.clear();
        }
        match std::str::from_utf8(rest) {
            Ok(_) => Ok(()),
            // An incomplete character at the very end continues in the next chunk.
            Err(error) if error.error_len().is_none() => {
                self.utf8_carry
                    .extend_from_slice(&rest[error.valid_up_to()..]);
                Ok(())
            }
            Err(_) => Err(not_text),
        }
    }

    /// Keeps the last `tail_limit` bytes: only the newest part of the chunk is copied, and the
    /// ring drops the oldest bytes in place.
    fn keep_tail(&mut self, chunk: &[u8]) {
        if self.tail_limit == 0 {
            return;
        }
        let newest = &chunk[chunk.len().saturating_sub(self.tail_limit)..];
        let overflow = (self.tail.len() + newest.len()).saturating_sub(self.tail_limit);
        self.tail.drain(..overflow);
        self.tail.extend(newest);
        self.examined += newest.len() as u64;
    }

    /// An Office Open XML file is a ZIP whose central directory (read from the kept tail) lists
    /// `[Content_Types].xml` and the part folder of its type.
    fn check_ooxml(&self) -> Result<(), SniffError> {
        let tail_start = self.total - self.tail.len() as u64;
        let reader = TailReader {
            // Contiguous since `finish` arranged it.
            tail: self.tail.as_slices().0,
            tail_start,
            total: self.total,
            position: 0,
        };
        let archive = zip::ZipArchive::new(reader).map_err(|_| {
            SniffError::MalformedDocument(
                "not a readable ZIP archive (or its directory is too large)",
            )
        })?;
        if archive.len() > MAX_ZIP_ENTRIES {
            return Err(SniffError::MalformedDocument("too many entries"));
        }
        check_expansion(&archive.metadata())?;
        let part = match self.kind {
            FileKind::Docx => "word/",
            FileKind::Xlsx => "xl/",
            _ => "ppt/",
        };
        let mut content_types = false;
        let mut has_part = false;
        for name in archive.file_names() {
            let Ok(name) = name else {
                return Err(SniffError::MalformedDocument(
                    "an entry name is not readable",
                ));
            };
            content_types |= name == "[Content_Types].xml";
            has_part |= name.starts_with(part);
        }
        if content_types && has_part {
            Ok(())
        } else {
            Err(SniffError::ContentTypeMismatch {
                expected: self.kind.mime_type(),
            })
        }
    }
}

/// Refuses a zip bomb from its central directory alone (nothing is decompressed here, but the
/// recipients' Office will): an entry claiming to expand more than DEFLATE ever can, entries
/// whose data overlap (the trick behind non-recursive bombs), or parts expanding to more than
/// [`MAX_OOXML_EXPANDED`] in all.
fn check_expansion(directory: &zip::read::ZipArchiveMetadata) -> Result<(), SniffError> {
    let mut expanded: u64 = 0;
    let mut spans = Vec::with_capacity(directory.len());
    for index in 0..directory.len() {
        let entry = directory
            .entry(index)
            .map_err(|_| SniffError::MalformedDocument("an entry cannot be read"))?;
        let (packed, size) = (entry.compressed_size(), entry.size());
        if size
            > packed
                .saturating_mul(MAX_DEFLATE_RATIO)
                .saturating_add(1024)
        {
            return Err(SniffError::MalformedDocument(
                "an entry claims to expand more than DEFLATE can (a zip bomb)",
            ));
        }
        expanded = expanded.saturating_add(size);
        // A local header is at least 30 bytes, so this end is a lower bound of the real one.
        let start = entry.header_start();
        spans.push((start, start.saturating_add(30).saturating_add(packed)));
    }
    if expanded > MAX_OOXML_EXPANDED {
        return Err(SniffError::MalformedDocument(
            "its parts expand to more than 4 GiB (a zip bomb)",
        ));
    }
    spans.sort_unstable();
    if spans.windows(2).any(|pair| pair[1].0 < pair[0].1) {
        return Err(SniffError::MalformedDocument(
            "entries overlap (a zip bomb)",
        ));
    }
    Ok(())
}

/// Serves the kept tail at its real offsets; the rest of the file is not there to read.
struct TailReader<'a> {
    tail: &'a [u8],
    tail_start: u64,
    total: u64,
    position: u64,
}

impl Read for TailReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.position >= self.total {
            return Ok(0);
        }
        if self.position < self.tail_start {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "outside the kept tail",
            ));
        }
        let start = usize::try_from(self.position - self.tail_start).unwrap_or(usize::MAX);
        let available = &self.tail[start.min(self.tail.len())..];
        let count = available.len().min(buf.len());
        buf[..count].copy_from_slice(&available[..count]);
        self.position += count as u64;
        Ok(count)
    }
}

impl Seek for TailReader<'_> {
    fn seek(&mut self, position: SeekFrom) -> io::Result<u64> {
        let target = match position {
            SeekFrom::Start(offset) => i128::from(offset),
            SeekFrom::End(offset) => i128::from(self.total) + i128::from(offset),
            SeekFrom::Current(offset) => i128::from(self.position) + i128::from(offset),
        };
        self.position = u64::try_from(target)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "seek before start"))?;
        Ok(self.position)
    }
}

/// Bytes of the end of the file the closing checks of `kind` read.
fn tail_limit(kind: FileKind) -> usize {
    match kind {
        FileKind::Pdf => PDF_EOF_WINDOW,
        FileKind::Docx | FileKind::Xlsx | FileKind::Pptx => TAIL_LIMIT,
        _ => 0,
    }
}

fn is_text(kind: FileKind) -> bool {
    matches!(kind, FileKind::Txt | FileKind::Csv)
}

/// Bytes needed before the magic can be decided.
fn magic_length(kind: FileKind) -> usize {
    match kind {
        FileKind::Jpeg => 3,
        FileKind::Png | FileKind::Doc | FileKind::Xls | FileKind::Ppt => 8,
        FileKind::Gif => 6,
        FileKind::Webp | FileKind::Heic | FileKind::Heif => 12,
        FileKind::Pdf => 5,
        FileKind::Docx | FileKind::Xlsx | FileKind::Pptx => 4,
        FileKind::Txt | FileKind::Csv => 0,
    }
}

const OLE2: &[u8] = &[0xD0, 0xCF, 0x11, 0xE0, 0xA1, 0xB1, 0x1A, 0xE1];

fn magic_matches(kind: FileKind, head: &[u8]) -> bool {
    match kind {
        FileKind::Jpeg => head.starts_with(&[0xFF, 0xD8, 0xFF]),
        FileKind::Png => head.starts_with(b"\x89PNG\r\n\x1a\n"),
        FileKind::Gif => head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a"),
        FileKind::Webp => head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP",
        FileKind::Heic | FileKind::Heif => {
            head.len() >= 12
                && &head[4..8] == b"ftyp"
                && matches!(&head[8..12], b"heic" | b"heix" | b"mif1" | b"msf1")
        }
        FileKind::Pdf => head.starts_with(b"%PDF-"),
        FileKind::Doc | FileKind::Xls | FileKind::Ppt => head.starts_with(OLE2),
        FileKind::Docx | FileKind::Xlsx | FileKind::Pptx => head.starts_with(b"PK\x03\x04"),
        // Text has no magic; it is checked as UTF-8 throughout.
        FileKind::Txt | FileKind::Csv => true,
    }
}

/// Length of the UTF-8 sequence a lead byte starts, if it can start one.
fn utf8_width(lead: u8) -> Option<usize> {
    match lead {
        0xC2..=0xDF => Some(2),
        0xE0..=0xEF => Some(3),
        0xF0..=0xF4 => Some(4),
        _ => None,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sniff(kind: FileKind, bytes: &[u8], chunk: usize) -> Result<SniffReport, SniffError> {
        let mut sniffer = ContentSniffer::new(kind, 40_000_000);
        for piece in bytes.chunks(chunk.max(1)) {
            sniffer.feed(piece)?;
        }
        sniffer.finish()
    }

    fn png_header(width: u32, height: u32) -> Vec<u8> {
        let mut bytes = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec();
        bytes.extend_from_slice(&width.to_be_bytes());
        bytes.extend_from_slice(&height.to_be_bytes());
        bytes.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
        bytes
    }

    #[test]
    fn magic_bytes_must_match_the_declared_type() {
        assert!(sniff(FileKind::Pdf, b"%PDF-1.7\n...\n%%EOF\n", 3).is_ok());
        assert_eq!(
            sniff(FileKind::Pdf, b"GIF89a........", 64),
            Err(SniffError::ContentTypeMismatch {
                expected: "application/pdf"
            })
        );
        assert!(matches!(
            sniff(FileKind::Png, b"\xFF\xD8\xFF\xE0 jpeg pretending", 64),
            Err(SniffError::ContentTypeMismatch { .. })
        ));
        let mut ole = OLE2.to_vec();
        ole.extend_from_slice(&[0; 100]);
        assert!(sniff(FileKind::Doc, &ole, 5).is_ok());
        assert!(sniff(FileKind::Xls, b"PK\x03\x04notole", 5).is_err());
    }

    #[test]
    fn a_mismatch_is_found_within_the_first_chunk() {
        let mut sniffer = ContentSniffer::new(FileKind::Pdf, 1);
        assert!(sniffer.feed(b"MZ\x90\x00 an executable").is_err());
    }

    #[test]
    fn heic_brands_are_recognised() {
        let mut heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00".to_vec();
        heic.extend_from_slice(&[0; 64]);
        assert!(sniff(FileKind::Heic, &heic, 7).is_ok());
        let mut mp4 = b"\x00\x00\x00\x18ftypisom".to_vec();
        mp4.extend_from_slice(&[0; 64]);
        assert!(sniff(FileKind::Heic, &mp4, 64).is_err());
    }

    #[test]
    fn image_dimensions_come_from_the_header_and_are_limited() {
        let report = sniff(FileKind::Png, &png_header(640, 480), 5).unwrap();
        assert_eq!((report.width, report.height), (640, 480));
        let mut sniffer = ContentSniffer::new(FileKind::Png, 40_000_000);
        // A 50 000 x 50 000 PNG is refused from its first 33 bytes.
        assert_eq!(
            sniffer.feed(&png_header(50_000, 50_000)),
            Err(SniffError::ImageTooLarge {
                width: 50_000,
                height: 50_000,
                max_pixels: 40_000_000
            })
        );
    }

    #[test]
    fn text_must_be_utf8_without_nul_across_chunk_boundaries() {
        let text = "naïve café — ünïcödé 🎉 line\n".repeat(20);
        for chunk in 1..8 {
            assert!(
                sniff(FileKind::Txt, text.as_bytes(), chunk).is_ok(),
                "chunk {chunk}"
            );
        }
        assert!(sniff(FileKind::Csv, b"a,b\n1,\xFF\n", 3).is_err());
        assert!(sniff(FileKind::Csv, b"a,b\n1,\x002\n", 64).is_err());
        // Ends inside a character.
        assert!(
            sniff(
                FileKind::Txt,
                "caf\u{e9}".as_bytes().split_last().unwrap().1,
                2
            )
            .is_err()
        );
    }

    /// A baseline JPEG header whose frame (and so its size) follows `app_bytes` of APP1 segments,
    /// as a camera's EXIF block with an embedded preview would put it.
    fn jpeg_header(width: u16, height: u16, app_bytes: usize) -> Vec<u8> {
        let mut bytes = vec![0xFF, 0xD8];
        let mut left = app_bytes;
        while left > 0 {
            let body = left.min(60_000);
            bytes.extend_from_slice(&[0xFF, 0xE1]);
            bytes.extend_from_slice(&u16::try_from(body + 2).unwrap().to_be_bytes());
            bytes.extend(std::iter::repeat_n(0x5A, body));
            left -= body;
        }
        bytes.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 0x08]);
        bytes.extend_from_slice(&height.to_be_bytes());
        bytes.extend_from_slice(&width.to_be_bytes());
        bytes.extend_from_slice(&[3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
        bytes
    }

    #[test]
    fn work_stays_linear_in_the_bytes_fed_whatever_the_chunking() {
        // An image header of 400 KB, in 1-byte chunks with 20 empty ones after each: the old
        // sniffer parsed the whole buffered header again for every chunk (~10^11 bytes here).
        let jpeg = jpeg_header(800, 600, 400_000);
        let mut sniffer = ContentSniffer::new(FileKind::Jpeg, 40_000_000);
        for byte in jpeg.chunks(1) {
            sniffer.feed(byte).unwrap();
            for _ in 0..20 {
                sniffer.feed(&[]).unwrap();
            }
        }
        let examined = sniffer.bytes_examined();
        assert_eq!(
            sniffer.finish().unwrap(),
            SniffReport {
                width: 800,
                height: 600
            }
        );
        let len = jpeg.len() as u64;
        assert!(examined <= 4 * len, "{examined} bytes examined for {len}");

        // Fed byte by byte, an oversized image is still refused from its header, long before
        // its end (at most when the header read has doubled).
        let mut oversized = jpeg.clone();
        oversized.extend(std::iter::repeat_n(0x11, 2_000_000));
        let mut sniffer = ContentSniffer::new(FileKind::Jpeg, 1_000);
        let refused = oversized[..2 * jpeg.len()]
            .chunks(1)
            .try_for_each(|byte| sniffer.feed(byte));
        assert!(matches!(refused, Err(SniffError::ImageTooLarge { .. })));

        // An Office document's tail ring: 1-byte chunks cost a byte each, not the ring's size.
        let docx = zip_with(
            &[
                "word/media/big.bin",
                "[Content_Types].xml",
                "word/document.xml",
            ],
            600_000,
        );
        let mut sniffer = ContentSniffer::new(FileKind::Docx, 40_000_000);
        for byte in docx.chunks(1) {
            sniffer.feed(byte).unwrap();
        }
        let examined = sniffer.bytes_examined();
        assert!(sniffer.finish().is_ok());
        let len = docx.len() as u64;
        assert!(examined <= 2 * len, "{examined} bytes examined for {len}");

        // Empty chunks alone cost nothing.
        let mut sniffer = ContentSniffer::new(FileKind::Png, 40_000_000);
        for _ in 0..20_000 {
            sniffer.feed(&[]).unwrap();
        }
        assert_eq!(sniffer.bytes_examined(), 0);
    }

    #[test]
    fn a_pdf_must_end_with_eof() {
        let mut pdf = b"%PDF-1.4\n".to_vec();
        pdf.extend(std::iter::repeat_n(b'x', 300_000));
        assert!(matches!(
            sniff(FileKind::Pdf, &pdf, 4096),
            Err(SniffError::MalformedDocument(_))
        ));
        pdf.extend_from_slice(b"\n%%EOF\n");
        assert!(sniff(FileKind::Pdf, &pdf, 4096).is_ok());
    }

    fn zip_with(names: &[&str], padding: usize) -> Vec<u8> {
        use std::io::Write;
        let mut buffer = io::Cursor::new(Vec::new());
        {
            let mut writer = zip::ZipWriter::new(&mut buffer);
            let options = zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Stored);
            for (index, name) in names.iter().enumerate() {
                writer.start_file(*name, options).unwrap();
                let body = if index == 0 {
                    vec![b'p'; padding]
                } else {
                    b"<xml/>".to_vec()
                };
                writer.write_all(&body).unwrap();
            }
            writer.finish().unwrap();
        }
        buffer.into_inner()
    }

    #[test]
    fn office_documents_need_their_parts() {
        // A large body ahead of the directory: only the tail is kept, and that is enough.
        let docx = zip_with(
            &[
                "word/media/big.bin",
                "[Content_Types].xml",
                "word/document.xml",
            ],
            1_000_000,
        );
        assert!(sniff(FileKind::Docx, &docx, 65_536).is_ok());
        let xlsx_as_docx = zip_with(&["[Content_Types].xml", "xl/workbook.xml"], 10);
        assert!(matches!(
            sniff(FileKind::Docx, &xlsx_as_docx, 100),
            Err(SniffError::ContentTypeMismatch { .. })
        ));
        let plain_zip = zip_with(&["readme.txt"], 10);
        assert!(sniff(FileKind::Pptx, &plain_zip, 100).is_err());
        let mut truncated = docx.clone();
        truncated.truncate(docx.len() - 30);
        assert!(matches!(
            sniff(FileKind::Docx, &truncated, 65_536),
            Err(SniffError::MalformedDocument(_))
        ));
    }

    /// Offsets of the central directory entries of `zip`.
    fn central_entries(zip: &[u8]) -> Vec<usize> {
        zip.windows(4)
            .enumerate()
            .filter(|(_, window)| *window == [0x50, 0x4b, 0x01, 0x02])
            .map(|(offset, _)| offset)
            .collect()
    }

    #[test]
    fn zip_bombs_are_refused_from_the_directory() {
        let names = [
            "[Content_Types].xml",
            "word/document.xml",
            "word/media/a.bin",
        ];
        let docx = zip_with(&names, 100);
        assert!(sniff(FileKind::Docx, &docx, 64).is_ok());
        let entries = central_entries(&docx);
        assert_eq!(entries.len(), 3);

        // An entry claiming 4 GiB from 100 stored bytes.
        let mut lying = docx.clone();
        lying[entries[0] + 24..entries[0] + 28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            sniff(FileKind::Docx, &lying, 64),
            Err(SniffError::MalformedDocument(
                "an entry claims to expand more than DEFLATE can (a zip bomb)"
            ))
        );

        // Two entries sharing one body: the overlap behind non-recursive bombs.
        let mut overlapping = docx.clone();
        let first_offset = overlapping[entries[0] + 42..entries[0] + 46].to_vec();
        overlapping[entries[2] + 42..entries[2] + 46].copy_from_slice(&first_offset);
        assert_eq!(
            sniff(FileKind::Docx, &overlapping, 64),
            Err(SniffError::MalformedDocument(
                "entries overlap (a zip bomb)"
            ))
        );
    }

    /// Sniffs `bytes` with a checkpoint at `split`, serialized to JSON and resumed by a fresh
    /// sniffer (as a resumed upload does on another replica).
    fn sniff_resumed(
        kind: FileKind,
        bytes: &[u8],
        split: usize,
    ) -> Result<SniffReport, SniffError> {
        let mut first = ContentSniffer::new(kind, 40_000_000);
        for piece in bytes[..split].chunks(7) {
            first.feed(piece)?;
        }
        let json = serde_json::to_string(&first.checkpoint()).expect("checkpoint serializes");
        drop(first);
        let checkpoint: SnifferCheckpoint = serde_json::from_str(&json).expect("and reads back");
        let mut second = ContentSniffer::resume(kind, 40_000_000, checkpoint);
        for piece in bytes[split..].chunks(5) {
            second.feed(piece)?;
        }
        second.finish()
    }

    #[test]
    fn a_resumed_sniffer_decides_exactly_as_an_uninterrupted_one() {
        let text = "naïve café — 🎉\n".repeat(40).into_bytes();
        let mut bad_text = text.clone();
        bad_text[300] = 0xFF;
        let docx = zip_with(&["[Content_Types].xml", "word/document.xml"], 3000);
        let not_docx = zip_with(&["[Content_Types].xml", "xl/workbook.xml"], 3000);
        let mut png = png_header(640, 480);
        png.extend_from_slice(&[7; 500]);
        let mut huge_png = png_header(50_000, 50_000);
        huge_png.extend_from_slice(&[7; 100]);
        let pdf = b"%PDF-1.7\n0123456789abcdef\n%%EOF\n".to_vec();
        let cases: [(FileKind, &[u8]); 7] = [
            (FileKind::Txt, &text),
            (FileKind::Txt, &bad_text),
            (FileKind::Docx, &docx),
            (FileKind::Docx, &not_docx),
            (FileKind::Png, &png),
            (FileKind::Png, &huge_png),
            (FileKind::Pdf, &pdf),
        ];
        for (kind, bytes) in cases {
            let whole = sniff(kind, bytes, 64);
            for split in 0..=bytes.len() {
                assert_eq!(
                    sniff_resumed(kind, bytes, split),
                    whole,
                    "{kind:?} resumed at {split} of {}",
                    bytes.len()
                );
            }
        }
        assert!(sniff(FileKind::Txt, &text, 64).is_ok());
        assert!(sniff(FileKind::Txt, &bad_text, 64).is_err());
        assert!(sniff(FileKind::Docx, &docx, 64).is_ok());
        assert!(sniff(FileKind::Docx, &not_docx, 64).is_err());
    }
}
