//! The filesystem blob store: file bodies and thumbnails under `storage.data_dir`, for the
//! zero-setup default (one replica, no S3).
//!
//! Layout: `objects/<key>` holds the bytes and `objects/<key>.attrs.json` how to serve them;
//! uploads are written to `incoming/<random>` and renamed into place on commit, so a reader
//! never sees half an object and an aborted upload leaves nothing under `objects/`. Resumable
//! writes go to `staged/<upload id>`, synced to disk at every part boundary (their checkpoints),
//! and survive a restart of the process. Download
//! URLs point at this service's HTTP port and carry an expiry and an HMAC-SHA256 signature.

use std::{
    path::{Component, Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, stream::BoxStream};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::blobs::{
    BlobAttributes, BlobError, BlobResult, BlobStore, BlobUpload, ObjectPage, ResumableUpload,
    StagedParts, UnfinishedWrite,
};
use crate::{error::BoxError, health::DependencyCheck};

const OBJECTS: &str = "objects";
const INCOMING: &str = "incoming";
/// Resumable writes, named by their upload id; they survive a restart.
const STAGED: &str = "staged";
const ATTRIBUTES_SUFFIX: &str = ".attrs.json";
/// Read size when streaming an object back.
const READ_CHUNK: usize = 256 * 1024;

/// The path a signed download URL is served under on the HTTP port.
pub const DOWNLOAD_PATH: &str = "/v1/blobs/";

#[derive(Clone)]
pub struct FsBlobStore {
    root: PathBuf,
    signer: Arc<UrlSigner>,
}

/// Signs and verifies download URLs of the filesystem store.
pub struct UrlSigner {
    key: Vec<u8>,
    base_url: String,
}

impl UrlSigner {
    /// `base_url` is where the HTTP port is reachable, e.g. `http://127.0.0.1:8080`.
    pub fn new(key: Vec<u8>, base_url: &str) -> Self {
        Self {
            key,
            base_url: base_url.trim_end_matches('/').to_owned(),
        }
    }

    fn signature(&self, key: &str, expires: u64) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(key.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        hex(&mac.finalize().into_bytes())
    }

    /// `expires` is in Unix milliseconds, so a URL never outlives its file by a rounding.
    pub fn url(&self, key: &str, valid_for: Duration) -> String {
        let expires = unix_millis() + u64::try_from(valid_for.as_millis()).unwrap_or(u64::MAX);
        format!(
            "{}{DOWNLOAD_PATH}{key}?expires={expires}&signature={}",
            self.base_url,
            self.signature(key, expires)
        )
    }

    /// Whether `signature` is this store's, for `key`, and not yet expired.
    pub fn verify(&self, key: &str, expires: u64, signature: &str) -> bool {
        if expires <= unix_millis() {
            return false;
        }
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(key.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        match decode_hex(signature) {
            // Constant-time comparison: no timing oracle on the signature.
            Some(bytes) => mac.verify_slice(&bytes).is_ok(),
            None => false,
        }
    }
}

impl FsBlobStore {
    /// Opens (creating if needed) the store rooted at `root`.
    pub async fn open(root: &Path, signer: UrlSigner) -> std::io::Result<Self> {
        tokio::fs::create_dir_all(root.join(OBJECTS)).await?;
        tokio::fs::create_dir_all(root.join(INCOMING)).await?;
        tokio::fs::create_dir_all(root.join(STAGED)).await?;
        Ok(Self {
            root: root.to_path_buf(),
            signer: Arc::new(signer),
        })
    }

    pub fn signer(&self) -> &UrlSigner {
        &self.signer
    }

    /// The object's path, refusing keys that would leave the store.
    fn object_path(&self, key: &str) -> BlobResult<PathBuf> {
        let relative = Path::new(key);
        let safe = !key.is_empty()
            && !key.ends_with(ATTRIBUTES_SUFFIX)
            && relative
                .components()
                .all(|component| matches!(component, Component::Normal(_)));
        if !safe {
            return Err(BlobError::NotFound);
        }
        Ok(self.root.join(OBJECTS).join(relative))
    }

    /// Where a resumable write is staged; the id is one this store made (hex), anything else is
    /// refused rather than joined into a path.
    fn staged_path(&self, upload_id: &str) -> BlobResult<PathBuf> {
        if upload_id.is_empty() || !upload_id.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return Err(BlobError::NotFound);
        }
        Ok(self.root.join(STAGED).join(upload_id))
    }

    fn attributes_path(object: &Path) -> PathBuf {
        let mut name = object.as_os_str().to_owned();
        name.push(ATTRIBUTES_SUFFIX);
        PathBuf::from(name)
    }

    /// Deletes objects under `prefixes` written longer than `age` ago, and unfinished uploads
    /// a crash left behind: the filesystem's stand-in for a bucket lifecycle rule.
    pub async fn remove_expired(&self, prefixes: &[&str], age: Duration) -> BlobResult<usize> {
        let cutoff = SystemTime::now() - age;
        let mut removed = 0;
        for prefix in prefixes {
            for key in self.list(prefix).await? {
                let path = self.object_path(&key)?;
                let written = tokio::fs::metadata(&path)
                    .await
                    .and_then(|metadata| metadata.modified());
                if matches!(written, Ok(time) if time < cutoff) {
                    self.delete(&key).await?;
                    removed += 1;
                }
            }
        }
        let stale_upload = SystemTime::now() - Duration::from_secs(24 * 3600);
        // Staged writes live as long as their session, which never outlives a file.
        for (area, stale) in [(INCOMING, stale_upload), (STAGED, cutoff)] {
            let mut unfinished = tokio::fs::read_dir(self.root.join(area))
                .await
                .map_err(io_error)?;
            while let Some(entry) = unfinished.next_entry().await.map_err(io_error)? {
                let modified = entry
                    .metadata()
                    .await
                    .and_then(|metadata| metadata.modified());
                if matches!(modified, Ok(time) if time < stale) {
                    let _ = tokio::fs::remove_file(entry.path()).await;
                }
            }
        }
        Ok(removed)
    }

    /// What a signed download serves: the attributes, the size and the bytes, from one open
    /// file (so the size and the bytes always belong together).
    pub async fn open_download(
        &self,
        key: &str,
    ) -> BlobResult<(BlobAttributes, u64, BoxStream<'static, BlobResult<Bytes>>)> {
        let attributes = self.attributes(key).await?;
        let file = tokio::fs::File::open(self.object_path(key)?)
            .await
            .map_err(io_error)?;
        let size = file.metadata().await.map_err(io_error)?.len();
        let stream = tokio_util::io::ReaderStream::with_capacity(file, READ_CHUNK)
            .map(|chunk| chunk.map_err(io_error));
        Ok((attributes, size, stream.boxed()))
    }

    /// The stored attributes of `key` (for serving downloads).
    pub async fn attributes(&self, key: &str) -> BlobResult<BlobAttributes> {
        let path = Self::attributes_path(&self.object_path(key)?);
        let text = tokio::fs::read_to_string(&path).await.map_err(io_error)?;
        let stored: StoredAttributes =
            serde_json::from_str(&text).map_err(|error| BlobError::Unavailable(error.into()))?;
        Ok(stored.into())
    }

    async fn write_attributes(object: &Path, attributes: &BlobAttributes) -> BlobResult<()> {
        let json = serde_json::to_vec(&StoredAttributes::from(attributes.clone()))
            .map_err(|error| BlobError::Unavailable(error.into()))?;
        tokio::fs::write(Self::attributes_path(object), json)
            .await
            .map_err(io_error)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAttributes {
    content_type: String,
    content_disposition: String,
    metadata: Vec<(String, String)>,
}

impl From<BlobAttributes> for StoredAttributes {
    fn from(attributes: BlobAttributes) -> Self {
        Self {
            content_type: attributes.content_type,
            content_disposition: attributes.content_disposition,
            metadata: attributes.metadata,
        }
    }
}

impl From<StoredAttributes> for BlobAttributes {
    fn from(stored: StoredAttributes) -> Self {
        Self {
            content_type: stored.content_type,
            content_disposition: stored.content_disposition,
            metadata: stored.metadata,
            // A property of a write, not of the stored object.
            size: None,
        }
    }
}

struct FsUpload {
    incoming: PathBuf,
    object: PathBuf,
    attributes: BlobAttributes,
    file: Option<tokio::fs::File>,
    finished: bool,
}

#[async_trait]
impl BlobUpload for FsUpload {
    async fn write(&mut self, bytes: Bytes) -> BlobResult<()> {
        let file = self.file.as_mut().expect("written before commit or abort");
        file.write_all(&bytes).await.map_err(io_error)
    }

    async fn commit(mut self: Box<Self>, metadata: Vec<(String, String)>) -> BlobResult<()> {
        self.attributes.merge_metadata(metadata);
        let file = self.file.take().expect("committed once");
        // Drop removes the incoming file if this fails.
        publish(file, &self.incoming, &self.object, &self.attributes).await?;
        self.finished = true;
        Ok(())
    }

    async fn abort(mut self: Box<Self>) -> BlobResult<()> {
        self.file.take();
        self.finished = true;
        match tokio::fs::remove_file(&self.incoming).await {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io_error(error)),
        }
    }
}

impl Drop for FsUpload {
    fn drop(&mut self) {
        // Dropped mid-write (a cancelled RPC): remove the partial file.
        if !self.finished {
            let _ = std::fs::remove_file(&self.incoming);
        }
    }
}

/// Makes a written file the object: synced, its attributes written, then renamed into place
/// (so a reader never sees half an object, and no attributes stay without their object).
async fn publish(
    mut file: tokio::fs::File,
    written: &Path,
    object: &Path,
    attributes: &BlobAttributes,
) -> BlobResult<()> {
    file.flush().await.map_err(io_error)?;
    file.sync_all().await.map_err(io_error)?;
    drop(file);
    if let Some(parent) = object.parent() {
        tokio::fs::create_dir_all(parent).await.map_err(io_error)?;
    }
    FsBlobStore::write_attributes(object, attributes).await?;
    if let Err(error) = tokio::fs::rename(written, object).await {
        let _ = tokio::fs::remove_file(FsBlobStore::attributes_path(object)).await;
        return Err(io_error(error));
    }
    Ok(())
}

/// A resumable write to `staged/<upload id>`: synced at every part boundary, which makes the
/// part durable; renamed into place on commit.
struct FsStagedUpload {
    path: PathBuf,
    object: PathBuf,
    attributes: BlobAttributes,
    upload_id: String,
    part_size: u64,
    file: Option<tokio::fs::File>,
    /// Bytes in the file.
    written: u64,
    durable_parts: usize,
    reported_parts: usize,
    finished: bool,
}

impl FsStagedUpload {
    fn staged(&self) -> StagedParts {
        if self.durable_parts == 0 {
            return StagedParts::default();
        }
        StagedParts {
            upload_id: Some(self.upload_id.clone()),
            parts: vec![String::new(); self.durable_parts],
        }
    }
}

#[async_trait]
impl ResumableUpload for FsStagedUpload {
    async fn write(&mut self, bytes: Bytes) -> BlobResult<()> {
        let file = self.file.as_mut().expect("written before commit");
        file.write_all(&bytes).await.map_err(io_error)?;
        self.written += bytes.len() as u64;
        let whole_parts = usize::try_from(self.written / self.part_size).unwrap_or(usize::MAX);
        if whole_parts > self.durable_parts {
            file.flush().await.map_err(io_error)?;
            file.sync_data().await.map_err(io_error)?;
            self.durable_parts = whole_parts;
        }
        Ok(())
    }

    fn take_durable(&mut self) -> Option<StagedParts> {
        (self.durable_parts > self.reported_parts).then(|| {
            self.reported_parts = self.durable_parts;
            self.staged()
        })
    }

    async fn wait_durable(&mut self) -> BlobResult<()> {
        // Parts become durable inside `write`; nothing is ever in flight.
        std::future::pending().await
    }

    async fn pause(mut self: Box<Self>) -> BlobResult<StagedParts> {
        self.file.take();
        self.reported_parts = self.durable_parts;
        Ok(self.staged())
    }

    async fn commit(mut self: Box<Self>, metadata: Vec<(String, String)>) -> BlobResult<()> {
        self.attributes.merge_metadata(metadata);
        let file = self.file.take().expect("committed once");
        // A failure keeps the staged file: its durable parts can still be resumed.
        publish(file, &self.path, &self.object, &self.attributes).await?;
        self.finished = true;
        Ok(())
    }

    async fn abort(mut self: Box<Self>) -> BlobResult<()> {
        self.file.take();
        self.finished = true;
        match tokio::fs::remove_file(&self.path).await {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io_error(error)),
        }
    }
}

impl Drop for FsStagedUpload {
    fn drop(&mut self) {
        // A write of which no part was ever reported durable is known to no session: nothing
        // can resume it.
        if !self.finished && self.reported_parts == 0 {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[async_trait]
impl BlobStore for FsBlobStore {
    async fn start_upload(
        &self,
        key: &str,
        attributes: BlobAttributes,
    ) -> BlobResult<Box<dyn BlobUpload>> {
        let object = self.object_path(key)?;
        let incoming = self
            .root
            .join(INCOMING)
            .join(uuid::Uuid::now_v7().simple().to_string());
        let file = tokio::fs::File::create(&incoming).await.map_err(io_error)?;
        Ok(Box::new(FsUpload {
            incoming,
            object,
            attributes,
            file: Some(file),
            finished: false,
        }))
    }

    async fn resume_upload(
        &self,
        key: &str,
        attributes: BlobAttributes,
        part_size: u64,
        staged: StagedParts,
    ) -> BlobResult<Box<dyn ResumableUpload>> {
        let object = self.object_path(key)?;
        let durable_parts = staged.parts.len();
        let (upload_id, file) = match staged.upload_id {
            Some(upload_id) => {
                let path = self.staged_path(&upload_id)?;
                let mut file = tokio::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .await
                    .map_err(io_error)?;
                let durable = durable_parts as u64 * part_size;
                if file.metadata().await.map_err(io_error)?.len() < durable {
                    return Err(BlobError::NotFound);
                }
                // Bytes past the last durable part are sent again.
                file.set_len(durable).await.map_err(io_error)?;
                file.seek(std::io::SeekFrom::End(0))
                    .await
                    .map_err(io_error)?;
                (upload_id, file)
            }
            None => {
                let upload_id = uuid::Uuid::now_v7().simple().to_string();
                let file = tokio::fs::File::create(self.staged_path(&upload_id)?)
                    .await
                    .map_err(io_error)?;
                (upload_id, file)
            }
        };
        Ok(Box::new(FsStagedUpload {
            path: self.staged_path(&upload_id)?,
            object,
            attributes,
            upload_id,
            part_size: part_size.max(1),
            file: Some(file),
            written: durable_parts as u64 * part_size,
            durable_parts,
            reported_parts: durable_parts,
            finished: false,
        }))
    }

    async fn discard_staged(&self, _key: &str, staged: &StagedParts) -> BlobResult<()> {
        let Some(upload_id) = &staged.upload_id else {
            return Ok(());
        };
        match tokio::fs::remove_file(self.staged_path(upload_id)?).await {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io_error(error)),
        }
    }

    async fn put(&self, key: &str, attributes: BlobAttributes, bytes: Bytes) -> BlobResult<()> {
        let mut upload = self.start_upload(key, attributes).await?;
        upload.write(bytes).await?;
        upload.commit(Vec::new()).await
    }

    #[cfg(any(test, feature = "testsuite"))]
    async fn info(&self, key: &str) -> BlobResult<super::blobs::BlobInfo> {
        let path = self.object_path(key)?;
        let metadata = tokio::fs::metadata(&path).await.map_err(io_error)?;
        let attributes = self.attributes(key).await?;
        Ok(super::blobs::BlobInfo {
            size: metadata.len(),
            content_type: attributes.content_type,
        })
    }

    async fn read(
        &self,
        key: &str,
        offset: u64,
    ) -> BlobResult<BoxStream<'static, BlobResult<Bytes>>> {
        let path = self.object_path(key)?;
        let mut file = tokio::fs::File::open(&path).await.map_err(io_error)?;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(io_error)?;
        let stream = tokio_util::io::ReaderStream::with_capacity(file, READ_CHUNK)
            .map(|chunk| chunk.map_err(io_error));
        Ok(stream.boxed())
    }

    async fn delete(&self, key: &str) -> BlobResult<()> {
        let object = self.object_path(key)?;
        for path in [Self::attributes_path(&object), object] {
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(io_error(error)),
            }
        }
        Ok(())
    }

    async fn download_url(&self, key: &str, valid_for: Duration) -> BlobResult<String> {
        self.object_path(key)?;
        Ok(self.signer.url(key, valid_for))
    }

    async fn list(&self, prefix: &str) -> BlobResult<Vec<String>> {
        let objects = self.root.join(OBJECTS);
        let mut keys = Vec::new();
        let mut pending = vec![objects.clone()];
        while let Some(dir) = pending.pop() {
            let mut entries = match tokio::fs::read_dir(&dir).await {
                Ok(entries) => entries,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(io_error(error)),
            };
            while let Some(entry) = entries.next_entry().await.map_err(io_error)? {
                let path = entry.path();
                if entry.file_type().await.map_err(io_error)?.is_dir() {
                    pending.push(path);
                    continue;
                }
                let Ok(relative) = path.strip_prefix(&objects) else {
                    continue;
                };
                let key = relative.to_string_lossy().replace('\\', "/");
                if !key.ends_with(ATTRIBUTES_SUFFIX) && key.starts_with(prefix) {
                    keys.push(key);
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    async fn exists(&self, key: &str) -> BlobResult<bool> {
        let path = match self.object_path(key) {
            Ok(path) => path,
            Err(BlobError::NotFound) => return Ok(false),
            Err(error) => return Err(error),
        };
        match tokio::fs::metadata(&path).await {
            Ok(metadata) => Ok(metadata.is_file()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(io_error(error)),
        }
    }

    async fn objects_before(
        &self,
        prefix: &str,
        before: SystemTime,
        start_after: Option<&str>,
        limit: usize,
    ) -> BlobResult<ObjectPage> {
        let all = self.list(prefix).await?;
        let mut page: Vec<String> = all
            .into_iter()
            .filter(|key| start_after.is_none_or(|after| key.as_str() > after))
            .take(limit.max(1) + 1)
            .collect();
        let next = if page.len() > limit.max(1) {
            page.pop();
            page.last().cloned()
        } else {
            None
        };
        let mut keys = Vec::with_capacity(page.len());
        for key in page {
            let written = tokio::fs::metadata(self.object_path(&key)?)
                .await
                .and_then(|metadata| metadata.modified());
            if matches!(written, Ok(time) if time < before) {
                keys.push(key);
            }
        }
        Ok(ObjectPage { keys, next })
    }

    async fn unfinished_writes(
        &self,
        _prefixes: &[&str],
        before: SystemTime,
        limit: usize,
    ) -> BlobResult<Vec<UnfinishedWrite>> {
        // Staging files are named by their upload id, not their key: every one is listed, by
        // the time it was last written (a resumable write's file grows as parts arrive).
        let mut stale = Vec::new();
        for area in [INCOMING, STAGED] {
            let mut entries = tokio::fs::read_dir(self.root.join(area))
                .await
                .map_err(io_error)?;
            while let Some(entry) = entries.next_entry().await.map_err(io_error)? {
                let modified = entry
                    .metadata()
                    .await
                    .and_then(|metadata| metadata.modified());
                if !matches!(modified, Ok(time) if time < before) {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                stale.push(UnfinishedWrite {
                    key: None,
                    // A one-shot write's file is named in its area, so that it never matches a
                    // resumable write's upload id.
                    upload_id: if area == STAGED {
                        name
                    } else {
                        format!("{INCOMING}/{name}")
                    },
                });
                if stale.len() >= limit {
                    return Ok(stale);
                }
            }
        }
        Ok(stale)
    }

    async fn abort_unfinished(&self, write: &UnfinishedWrite) -> BlobResult<()> {
        let path = match write.upload_id.strip_prefix(&format!("{INCOMING}/")) {
            Some(name) if !name.is_empty() && name.bytes().all(|byte| byte.is_ascii_hexdigit()) => {
                self.root.join(INCOMING).join(name)
            }
            Some(_) => return Ok(()),
            None => self.staged_path(&write.upload_id)?,
        };
        match tokio::fs::remove_file(path).await {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(io_error(error)),
        }
    }
}

#[async_trait]
impl DependencyCheck for FsBlobStore {
    fn name(&self) -> &'static str {
        "blob-store"
    }

    /// The store is up when its directories are writable (recreated if they went missing).
    async fn check(&self) -> Result<(), BoxError> {
        tokio::fs::create_dir_all(self.root.join(OBJECTS)).await?;
        tokio::fs::create_dir_all(self.root.join(INCOMING)).await?;
        let probe = self.root.join(INCOMING).join(".health-probe");
        tokio::fs::write(&probe, b"ok").await?;
        tokio::fs::remove_file(&probe).await?;
        Ok(())
    }
}

fn io_error(error: std::io::Error) -> BlobError {
    if error.kind() == std::io::ErrorKind::NotFound {
        BlobError::NotFound
    } else {
        BlobError::Unavailable(error.into())
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|index| u8::from_str_radix(text.get(index..index + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_urls_verify_only_untampered_and_unexpired() {
        let signer = UrlSigner::new(b"k".repeat(32), "http://127.0.0.1:8080/");
        let url = signer.url("files/c/f", Duration::from_secs(60));
        let query = url.split_once('?').unwrap().1;
        let params: std::collections::HashMap<_, _> = query
            .split('&')
            .map(|pair| pair.split_once('=').unwrap())
            .collect();
        let expires: u64 = params["expires"].parse().unwrap();
        let signature = params["signature"];
        assert!(url.starts_with("http://127.0.0.1:8080/v1/blobs/files/c/f?"));
        assert!(signer.verify("files/c/f", expires, signature));
        assert!(!signer.verify("files/c/other", expires, signature));
        assert!(!signer.verify("files/c/f", expires + 1, signature));
        assert!(!signer.verify("files/c/f", expires, "00"));
        let other = UrlSigner::new(b"x".repeat(32), "http://127.0.0.1:8080");
        assert!(!other.verify("files/c/f", expires, signature));
        let expired = signer.signature("files/c/f", 1);
        assert!(!signer.verify("files/c/f", 1, &expired));
    }
}
