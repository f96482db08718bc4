//! The orphan janitor: what a replica that died mid-upload (or mid-delete) leaves behind, found
//! and removed by the service itself rather than only by the bucket's day-granular lifecycle.
//!
//! Three kinds of orphan, each only once older than `uploads.orphan_age`:
//! - **unfinished writes** (S3 multipart uploads under `files/` and `thumbs/`, staging files of
//!   the filesystem store) that no unfinished upload session names: a resumable upload's staged
//!   parts live as long as its session (`uploads.session_ttl`) and are the session janitor's;
//! - **objects without a record** (the record was never written, or the file expired or was
//!   deleted and its object stayed): listed page by page, a bounded number of pages per round,
//!   the position carried to the next round;
//! - **records without an object**: every record is checked once, `orphan_age` after it was
//!   written (the store lists records not checked yet).
//!
//! A check runs only where the deployment lets it see both sides whole ([`SweepScope`]): with
//! Redis records and per-replica filesystem blobs, a record whose file is on another replica's
//! disk is not an orphan. Every replica runs it; each step is idempotent. The threshold must exceed the longest
//! one-shot upload (its multipart upload is not in any session) and the time between an object's
//! commit and its record's write (milliseconds).

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio_util::sync::CancellationToken;

use super::service::FileService;
use crate::messaging::model::now_millis;
use crate::{
    ids::FileId,
    store::{blobs::BlobError, messages::StoreError},
};

/// Where blobs live; the janitor looks nowhere else in the bucket.
const AREAS: [&str; 2] = ["files/", "thumbs/"];
/// Unfinished writes aborted per round at most.
const WRITES_PER_ROUND: usize = 1000;
/// Unfinished sessions read per round; with more, staged bytes are left alone this round (a
/// session not seen could own any of them).
const SESSIONS_PER_ROUND: usize = 10_000;
/// Keys per listing request, and listing requests per area per round.
const OBJECT_PAGE: usize = 1000;
const OBJECT_PAGES_PER_ROUND: usize = 10;
/// Records checked per page, and pages per round: with the default interval (10 min) a
/// replica checks up to 20,000 new records per round, more than any upload rate we expect.
const RECORD_PAGE: usize = 1000;
const RECORD_PAGES_PER_ROUND: usize = 20;

/// Which of the checks can be trusted in this deployment: the blobs and the records must be
/// seen whole. Objects can be judged by their record when the records are shared (Redis) or the
/// objects are this process's own (files); records by their object when the objects are shared
/// (S3) or the records are this process's own (memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepScope {
    pub objects_without_records: bool,
    pub records_without_objects: bool,
}

/// What one round removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    pub aborted_writes: usize,
    pub removed_objects: usize,
    pub removed_records: usize,
}

/// Where the object listing of each area resumes in the next round.
#[derive(Debug, Default)]
pub struct SweepCursor {
    after: [Option<String>; 2],
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Blobs(#[from] BlobError),
}

impl FileService {
    /// One round of the orphan janitor (see the module docs), with the checks `scope` allows.
    pub async fn sweep_orphans(
        &self,
        age: Duration,
        scope: SweepScope,
        cursor: &mut SweepCursor,
    ) -> Result<SweepReport, SweepError> {
        let cutoff = SystemTime::now()
            .checked_sub(age)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let sessions = self.sessions.unfinished_writes(SESSIONS_PER_ROUND).await?;
        let mut report = SweepReport::default();
        let live_keys: HashSet<String> = sessions.iter().map(|w| w.blob_key.clone()).collect();
        if sessions.len() < SESSIONS_PER_ROUND {
            let live_uploads: HashSet<&str> = sessions
                .iter()
                .filter_map(|write| write.upload_id.as_deref())
                .collect();
            report.aborted_writes = self
                .abort_unfinished_writes(cutoff, &live_keys, &live_uploads)
                .await?;
        } else {
            tracing::warn!(
                sessions = sessions.len(),
                "too many unfinished upload sessions to tell orphaned uploads from theirs; skipped"
            );
        }
        if scope.objects_without_records {
            report.removed_objects = self
                .remove_objects_without_records(cutoff, &live_keys, cursor)
                .await?;
        }
        if scope.records_without_objects {
            report.removed_records = self.remove_records_without_objects(age).await?;
        }
        Ok(report)
    }

    async fn abort_unfinished_writes(
        &self,
        cutoff: SystemTime,
        live_keys: &HashSet<String>,
        live_uploads: &HashSet<&str>,
    ) -> Result<usize, SweepError> {
        let stale = self
            .blobs
            .unfinished_writes(&AREAS, cutoff, WRITES_PER_ROUND)
            .await?;
        let mut aborted = 0;
        for write in stale {
            // A session without a durable part yet has no upload id, only its key.
            let owned = live_uploads.contains(write.upload_id.as_str())
                || write
                    .key
                    .as_ref()
                    .is_some_and(|key| live_keys.contains(key));
            if owned {
                continue;
            }
            self.blobs.abort_unfinished(&write).await?;
            tracing::info!(key = ?write.key, "aborted an orphaned unfinished upload");
            aborted += 1;
        }
        Ok(aborted)
    }

    async fn remove_objects_without_records(
        &self,
        cutoff: SystemTime,
        live_keys: &HashSet<String>,
        cursor: &mut SweepCursor,
    ) -> Result<usize, SweepError> {
        let mut removed = 0;
        for (area, after) in AREAS.iter().zip(cursor.after.iter_mut()) {
            for _ in 0..OBJECT_PAGES_PER_ROUND {
                let page = self
                    .blobs
                    .objects_before(area, cutoff, after.as_deref(), OBJECT_PAGE)
                    .await?;
                for key in page.keys {
                    if live_keys.contains(&key) || self.has_record(&key).await? {
                        continue;
                    }
                    self.blobs.delete(&key).await?;
                    tracing::info!(key, "removed an object without a file record");
                    removed += 1;
                }
                *after = page.next;
                if after.is_none() {
                    break;
                }
            }
        }
        Ok(removed)
    }

    /// Whether `key` (`AREA/CONVERSATION/FILE`) belongs to a live file record. A key of another
    /// shape is not the service's: it counts as recorded, so it is never removed.
    async fn has_record(&self, key: &str) -> Result<bool, StoreError> {
        let mut segments = key.split('/');
        let file_id = match (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) {
            (Some(_), Some(_), Some(file), None) => FileId::parse(file).ok(),
            _ => None,
        };
        let Some(file_id) = file_id else {
            return Ok(true);
        };
        Ok(self
            .file_records
            .get(&file_id)
            .await?
            .is_some_and(|record| {
                record.blob_key == key || record.thumbnail_key.as_deref() == Some(key)
            }))
    }

    async fn remove_records_without_objects(&self, age: Duration) -> Result<usize, SweepError> {
        let age_ms = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        let before = now_millis().saturating_sub(age_ms);
        let mut removed = 0;
        for _ in 0..RECORD_PAGES_PER_ROUND {
            let unchecked = self.file_records.unchecked(before, RECORD_PAGE).await?;
            for file_id in &unchecked {
                // Gone already (expired, deleted, or its write never happened): nothing to check.
                let Some(record) = self.file_records.get(file_id).await? else {
                    continue;
                };
                if !self.blobs.exists(&record.blob_key).await? {
                    self.file_records.delete(file_id).await?;
                    tracing::info!(%file_id, "removed a file record without an object");
                    removed += 1;
                }
            }
            self.file_records.mark_checked(&unchecked).await?;
            if unchecked.len() < RECORD_PAGE {
                break;
            }
        }
        Ok(removed)
    }
}

/// Runs [`FileService::sweep_orphans`] at start-up and every `interval` until `stop`.
pub async fn run(
    files: Arc<FileService>,
    age: Duration,
    interval: Duration,
    scope: SweepScope,
    stop: CancellationToken,
) {
    let mut cursor = SweepCursor::default();
    loop {
        match files.sweep_orphans(age, scope, &mut cursor).await {
            Ok(report) if report == SweepReport::default() => {}
            Ok(report) => tracing::info!(
                aborted_writes = report.aborted_writes,
                removed_objects = report.removed_objects,
                removed_records = report.removed_records,
                "removed orphans of interrupted uploads"
            ),
            Err(error) => tracing::warn!(%error, "orphan sweep failed; retrying next round"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}
