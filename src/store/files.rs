//! The file metadata store: one record per uploaded file, kept until the file expires.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::messages::StoreResult;
use crate::{
    files::policy::FileCategory,
    ids::UserId,
    messaging::model::{ConversationId, FileAttachment, MessageId, UnixMillis},
};

/// An uploaded file, as recorded once its bytes are stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub file_id: String,
    pub conversation_id: ConversationId,
    pub uploader: UserId,
    pub file_name: String,
    pub content_type: String,
    pub size_bytes: u64,
    /// Lowercase hex.
    pub sha256: String,
    pub category: FileCategory,
    /// Displayed dimensions of an image (after EXIF orientation); 0 when unknown.
    pub width: u32,
    pub height: u32,
    pub blob_key: String,
    pub thumbnail_key: Option<String>,
    /// The FILE/IMAGE message that announced it.
    pub message_id: Option<MessageId>,
    pub create_time: UnixMillis,
    pub expire_time: UnixMillis,
}

impl FileRecord {
    /// The file as a message carries it.
    pub fn attachment(&self) -> FileAttachment {
        FileAttachment {
            file_id: self.file_id.clone(),
            uploader: self.uploader.clone(),
            file_name: self.file_name.clone(),
            content_type: self.content_type.clone(),
            size_bytes: self.size_bytes,
            sha256: self.sha256.clone(),
            category: self.category,
            width: self.width,
            height: self.height,
            has_thumbnail: self.thumbnail_key.is_some(),
            create_time: self.create_time,
            expire_time: self.expire_time,
        }
    }
}

#[async_trait]
pub trait FileStore: Send + Sync + 'static {
    /// Records (or replaces) a file; it disappears on its own at `expire_time`.
    async fn put(&self, record: &FileRecord) -> StoreResult<()>;

    /// The file, unless unknown, deleted or expired.
    async fn get(&self, file_id: &str) -> StoreResult<Option<FileRecord>>;

    async fn delete(&self, file_id: &str) -> StoreResult<()>;
}
