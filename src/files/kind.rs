//! The file kinds the service knows: MIME types, extensions and categories. Config names them
//! and the upload pipeline recognises them, so this module depends on neither.

/// Documents and images have separate size limits; images also get dimensions and thumbnails.
/// Stored in file records and messages as `"Document"` / `"Image"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum FileCategory {
    Document,
    Image,
}

/// Every file kind the service knows how to recognise from its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    Pdf,
    Doc,
    Docx,
    Xls,
    Xlsx,
    Ppt,
    Pptx,
    Txt,
    Csv,
    Jpeg,
    Png,
    Gif,
    Webp,
    Heic,
    Heif,
}

/// A MIME type the service does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown file type {0:?}")]
pub struct FileKindError(pub String);

impl FileKind {
    pub const ALL: [FileKind; 15] = [
        FileKind::Pdf,
        FileKind::Doc,
        FileKind::Docx,
        FileKind::Xls,
        FileKind::Xlsx,
        FileKind::Ppt,
        FileKind::Pptx,
        FileKind::Txt,
        FileKind::Csv,
        FileKind::Jpeg,
        FileKind::Png,
        FileKind::Gif,
        FileKind::Webp,
        FileKind::Heic,
        FileKind::Heif,
    ];

    pub fn mime_type(self) -> &'static str {
        match self {
            FileKind::Pdf => "application/pdf",
            FileKind::Doc => "application/msword",
            FileKind::Docx => {
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
            }
            FileKind::Xls => "application/vnd.ms-excel",
            FileKind::Xlsx => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
            FileKind::Ppt => "application/vnd.ms-powerpoint",
            FileKind::Pptx => {
                "application/vnd.openxmlformats-officedocument.presentationml.presentation"
            }
            FileKind::Txt => "text/plain",
            FileKind::Csv => "text/csv",
            FileKind::Jpeg => "image/jpeg",
            FileKind::Png => "image/png",
            FileKind::Gif => "image/gif",
            FileKind::Webp => "image/webp",
            FileKind::Heic => "image/heic",
            FileKind::Heif => "image/heif",
        }
    }

    pub fn extensions(self) -> &'static [&'static str] {
        match self {
            FileKind::Pdf => &["pdf"],
            FileKind::Doc => &["doc"],
            FileKind::Docx => &["docx"],
            FileKind::Xls => &["xls"],
            FileKind::Xlsx => &["xlsx"],
            FileKind::Ppt => &["ppt"],
            FileKind::Pptx => &["pptx"],
            FileKind::Txt => &["txt"],
            FileKind::Csv => &["csv"],
            FileKind::Jpeg => &["jpg", "jpeg"],
            FileKind::Png => &["png"],
            FileKind::Gif => &["gif"],
            FileKind::Webp => &["webp"],
            FileKind::Heic => &["heic"],
            FileKind::Heif => &["heif"],
        }
    }

    pub fn category(self) -> FileCategory {
        match self {
            FileKind::Jpeg
            | FileKind::Png
            | FileKind::Gif
            | FileKind::Webp
            | FileKind::Heic
            | FileKind::Heif => FileCategory::Image,
            _ => FileCategory::Document,
        }
    }

    /// Parses a declared `Content-Type`, ignoring parameters such as `; charset=utf-8` and case.
    pub fn from_mime_type(content_type: &str) -> Result<Self, FileKindError> {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        // `image/jpg` is common in the wild even though it was never registered.
        let essence = if essence == "image/jpg" {
            "image/jpeg".to_owned()
        } else {
            essence
        };
        FileKind::ALL
            .into_iter()
            .find(|kind| kind.mime_type() == essence)
            .ok_or_else(|| FileKindError(content_type.to_owned()))
    }
}
