//! The file metadata store: one record per uploaded file, kept until the file expires.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::messages::StoreResult;
use crate::{
    ids::{ConversationId, FileId, MessageId},
    messaging::model::{FileAttachment, UnixMillis},
};

/// An uploaded file, as recorded once its bytes are stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub conversation_id: ConversationId,
    /// What the file is, as messages carry it; its `has_thumbnail` follows `thumbnail_key`.
    /// Flattened, so a stored record is the JSON object it always was (plus `has_thumbnail`).
    #[serde(flatten)]
    pub file: FileAttachment,
    pub blob_key: String,
    pub thumbnail_key: Option<String>,
    /// The FILE/IMAGE message that announced it.
    pub message_id: Option<MessageId>,
}

impl FileRecord {
    /// The file as a message carries it.
    pub fn attachment(&self) -> FileAttachment {
        FileAttachment {
            // Records stored before `has_thumbnail` was part of them read it as false.
            has_thumbnail: self.thumbnail_key.is_some(),
            ..self.file.clone()
        }
    }
}

#[async_trait]
pub trait FileRecordStore: Send + Sync + 'static {
    /// Records (or replaces) a file; it disappears on its own at `expire_time`.
    async fn put(&self, record: &FileRecord) -> StoreResult<()>;

    /// The file, unless unknown, deleted or expired.
    async fn get(&self, file_id: &FileId) -> StoreResult<Option<FileRecord>>;

    async fn delete(&self, file_id: &FileId) -> StoreResult<()>;
    /// Up to `limit` files recorded at or before `before` (Unix ms, by their `create_time`) that
    /// the orphan janitor has not checked yet, oldest first. [`FileRecordStore::put`] lists a
    /// new record here.
    async fn unchecked(&self, before: UnixMillis, limit: usize) -> StoreResult<Vec<FileId>>;
    /// Takes files off the [`FileRecordStore::unchecked`] list.
    async fn mark_checked(&self, file_ids: &[FileId]) -> StoreResult<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record as stored before the record embedded the attachment: the same object, without
    /// `has_thumbnail`.
    const STORED_BEFORE: &str = r#"{"file_id":"f1","conversation_id":"0190b6d2-3c4e-7a55-8f00-2b3c4d5e6f70","uploader":"alice","file_name":"a.png","content_type":"image/png","size_bytes":12,"sha256":"ab","category":"Image","width":3,"height":4,"blob_key":"files/c/f1","thumbnail_key":"thumbs/c/f1","message_id":null,"create_time":1,"expire_time":2}"#;

    #[test]
    fn records_stored_before_read_back_with_their_thumbnail() {
        let record: FileRecord = serde_json::from_str(STORED_BEFORE).expect("old record reads");
        assert_eq!(record.file.file_name, "a.png");
        assert_eq!((record.file.width, record.file.height), (3, 4));
        assert!(record.attachment().has_thumbnail);
        let again: FileRecord =
            serde_json::from_str(&serde_json::to_string(&record).unwrap()).unwrap();
        assert_eq!(again, record);
    }
}
