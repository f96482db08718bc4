//! Which files may be uploaded: the accepted file kinds and the per-category limits from config.

use std::time::Duration;

use crate::config::UploadSettings;

pub use super::kind::{FileCategory, FileKind, FileKindError};

/// Chunks an upload may send beyond its size / `min_chunk_bytes`.
pub const CHUNK_ALLOWANCE: u64 = 16;

/// One accepted file kind with its size limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileTypeRule {
    pub kind: FileKind,
    pub max_size_bytes: u64,
}

/// What uploads accept, as `GetUploadPolicy` reports it and the upload pipeline enforces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadPolicy {
    pub file_types: Vec<FileTypeRule>,
    pub retention: Duration,
    pub max_chunk_bytes: u64,
    pub max_image_pixels: u64,
    /// The average chunk size an upload may not go below; see [`UploadPolicy::max_chunks`].
    pub min_chunk_bytes: u64,
    /// How long an upload stream may send nothing before it is ended.
    pub idle_timeout: Duration,
    /// Uploads one caller may have open at once.
    pub max_concurrent_per_caller: usize,
    /// The longest one upload stream may last.
    pub max_duration: Duration,
    /// How long a resumable upload's session lives (at most `retention`).
    pub session_ttl: Duration,
    /// Unfinished resumable uploads one caller may have.
    pub max_sessions_per_caller: u32,
    /// The part size resumable uploads become durable in.
    pub resume_part_bytes: u64,
}

impl UploadPolicy {
    /// Builds the policy from validated settings (unknown MIME types were rejected there).
    pub fn from_settings(settings: &UploadSettings) -> Self {
        let mut file_types = Vec::new();
        for (types, max_size) in [
            (&settings.document_types, settings.document_max_size),
            (&settings.image_types, settings.image_max_size),
        ] {
            for mime in types {
                if let Ok(kind) = FileKind::from_mime_type(mime)
                    && !file_types
                        .iter()
                        .any(|rule: &FileTypeRule| rule.kind == kind)
                {
                    file_types.push(FileTypeRule {
                        kind,
                        max_size_bytes: max_size.as_u64(),
                    });
                }
            }
        }
        Self {
            file_types,
            retention: settings.retention,
            max_chunk_bytes: settings.max_chunk_bytes.as_u64(),
            max_image_pixels: settings.max_image_pixels,
            min_chunk_bytes: settings.min_chunk_bytes.as_u64().max(1),
            idle_timeout: settings.idle_timeout,
            max_concurrent_per_caller: settings.max_concurrent_per_caller as usize,
            max_duration: settings.max_duration,
            session_ttl: settings.session_ttl.min(settings.retention),
            max_sessions_per_caller: settings.max_sessions_per_caller,
            resume_part_bytes: settings.resume_part_size.as_u64(),
        }
    }

    /// Most chunk messages (empty ones included) an upload of `size` bytes may be sent in:
    /// chunks must average at least `min_chunk_bytes`, with room for a few small ones (the
    /// last, or a client's odd read) so that no ordinary client ever comes near it.
    pub fn max_chunks(&self, size: u64) -> u64 {
        size / self.min_chunk_bytes + CHUNK_ALLOWANCE
    }

    /// The rule for a declared content type, if that type is accepted.
    pub fn rule_for(&self, content_type: &str) -> Option<&FileTypeRule> {
        let kind = FileKind::from_mime_type(content_type).ok()?;
        self.file_types.iter().find(|rule| rule.kind == kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_has_the_documented_types_and_limits() {
        let policy = UploadPolicy::from_settings(&UploadSettings::default());
        assert_eq!(policy.file_types.len(), 15);
        let pdf = policy.rule_for("application/pdf").expect("pdf accepted");
        assert_eq!(pdf.max_size_bytes, 50 * 1024 * 1024);
        let jpeg = policy
            .rule_for("IMAGE/JPG; foo=bar")
            .expect("jpeg accepted");
        assert_eq!(jpeg.kind, FileKind::Jpeg);
        assert_eq!(jpeg.max_size_bytes, 10 * 1024 * 1024);
        assert!(policy.rule_for("image/tiff").is_none());
        assert_eq!(policy.retention, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(policy.max_chunk_bytes, 1024 * 1024);
    }

    #[test]
    fn disabled_types_are_not_accepted() {
        let settings = UploadSettings {
            image_types: vec!["image/png".to_owned()],
            ..UploadSettings::default()
        };
        let policy = UploadPolicy::from_settings(&settings);
        assert!(policy.rule_for("image/png").is_some());
        assert!(policy.rule_for("image/jpeg").is_none());
    }
}
