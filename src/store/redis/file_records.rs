//! File metadata in Redis: one JSON record per file under `P:{f:FILE}:file`, with a TTL that
//! ends at the file's expiry, so Redis forgets expired files by itself.

use async_trait::async_trait;
use fred::{
    prelude::{KeysInterface, SortedSetsInterface},
    types::{Expiration, SetOptions},
};

use super::RedisMessageStore;
use crate::{
    ids::FileId,
    messaging::model::{UnixMillis, now_millis},
    store::{
        file_records::{FileRecord, FileRecordStore},
        messages::{StoreError, StoreResult},
    },
};

#[async_trait]
impl FileRecordStore for RedisMessageStore {
    async fn put(&self, record: &FileRecord) -> StoreResult<()> {
        let json = serde_json::to_string(record)
            .map_err(|error| StoreError::Corrupt(format!("file record: {error}")))?;
        // Listed before the record is written (another slot, so not atomically): an entry
        // without a record is dropped by the janitor, a record never goes unlisted.
        let _: i64 = self
            .client
            .zadd(
                self.keys.unchecked_files(),
                Some(SetOptions::NX),
                None,
                false,
                false,
                (record.file.create_time as f64, record.file.file_id.as_str()),
            )
            .await?;
        // PXAT: the record and the file expire at the same instant on every replica.
        let _: Option<String> = self
            .client
            .set(
                self.keys.file(&record.file.file_id),
                json,
                Some(Expiration::PXAT(record.file.expire_time)),
                None::<SetOptions>,
                false,
            )
            .await?;
        Ok(())
    }

    async fn get(&self, file_id: &FileId) -> StoreResult<Option<FileRecord>> {
        let json: Option<String> = self.client.get(self.keys.file(file_id)).await?;
        let Some(json) = json else {
            return Ok(None);
        };
        let record: FileRecord = serde_json::from_str(&json)
            .map_err(|error| StoreError::Corrupt(format!("file record {file_id}: {error}")))?;
        Ok(Some(record).filter(|record| record.file.expire_time > now_millis()))
    }

    async fn delete(&self, file_id: &FileId) -> StoreResult<()> {
        let _: i64 = self.client.del(self.keys.file(file_id)).await?;
        Ok(())
    }

    async fn unchecked(&self, before: UnixMillis, limit: usize) -> StoreResult<Vec<FileId>> {
        let members: Vec<String> = self
            .client
            .zrangebyscore(
                self.keys.unchecked_files(),
                "-inf".to_owned(),
                before,
                false,
                Some((0, i64::try_from(limit).unwrap_or(i64::MAX))),
            )
            .await?;
        let mut file_ids = Vec::with_capacity(members.len());
        for member in members {
            match FileId::parse(&member) {
                Ok(file_id) => file_ids.push(file_id),
                // Not one of ours: drop it rather than list it forever.
                Err(_) => {
                    let _: i64 = self
                        .client
                        .zrem(self.keys.unchecked_files(), member.as_str())
                        .await?;
                }
            }
        }
        Ok(file_ids)
    }

    async fn mark_checked(&self, file_ids: &[FileId]) -> StoreResult<()> {
        if file_ids.is_empty() {
            return Ok(());
        }
        let members: Vec<&str> = file_ids.iter().map(FileId::as_str).collect();
        let _: i64 = self
            .client
            .zrem(self.keys.unchecked_files(), members)
            .await?;
        Ok(())
    }
}
