//! The S3 blob store: file bodies and thumbnails in one bucket of AWS S3 or an S3-compatible
//! server (Garage, MinIO, Ceph), shared by every replica.
//!
//! - Writes stream through [`upload`]: one PutObject for an object that fits in one part, a
//!   multipart upload with bounded parts in flight for a larger one; nothing is visible under the
//!   key before the commit, and an aborted or dropped upload aborts its multipart upload.
//! - Download URLs are SigV4 presigned GETs: the server checks them, this service is not involved
//!   in the download, and the object's stored type and disposition come back as headers.
//! - [`S3BlobStore::install_lifecycle`] makes the bucket expire files and thumbnails after the
//!   retention and drop incomplete multipart uploads (e.g. of a crashed replica) after a day.
//! - [`errors`] is the one mapping from SDK failures to [`BlobError`].
//! - [`credentials`]: static keys, or the AWS default chain (`s3.credentials`).
//!
//! Download URLs are presigned for `s3.public_endpoint` when it is set (SigV4 signs the `Host`
//! header, so a URL signed for the in-cluster name fails when opened through an ingress's), by a
//! second client that differs only in its endpoint and never sends a request.

mod credentials;
mod errors;
mod part_body;
mod upload;

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use aws_sdk_s3::{
    Client,
    config::{
        BehaviorVersion, IdentityCache, Region, RequestChecksumCalculation,
        SharedCredentialsProvider, SharedHttpClient,
    },
    presigning::PresigningConfig,
    types::{
        AbortIncompleteMultipartUpload, BucketLifecycleConfiguration, ExpirationStatus,
        LifecycleExpiration, LifecycleRule, LifecycleRuleFilter,
    },
};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use bytes::Bytes;
use futures::{StreamExt, stream::BoxStream};

use self::{
    errors::{Scope, has_code, map_sdk_error, status},
    upload::{Bucket, PartBuffering, S3Upload},
};
use super::blobs::{
    BlobAttributes, BlobError, BlobResult, BlobStore, BlobUpload, ObjectPage, ResumableUpload,
    StagedParts, UnfinishedWrite,
};
use crate::{
    budget::MemoryBudget,
    config::{S3RequestChecksums, S3Settings},
    error::BoxError,
    health::DependencyCheck,
};

/// S3's smallest part (all but the last) and largest part.
const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;

/// Key prefixes the lifecycle rule expires: file bodies and their thumbnails.
pub const EXPIRING_PREFIXES: [&str; 2] = ["files/", "thumbs/"];
/// Incomplete multipart uploads older than this many days are aborted by the bucket.
const ABORT_INCOMPLETE_AFTER_DAYS: i32 = 1;
const SECONDS_PER_DAY: u64 = 24 * 3600;

/// What [`S3BlobStore::install_lifecycle`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleOutcome {
    Installed,
    /// The server does not implement bucket lifecycle (`501 NotImplemented`): objects are not
    /// expired by the bucket and stale multipart uploads stay until removed by other means.
    Unsupported,
}

pub struct S3BlobStore {
    bucket: Arc<Bucket>,
    parts: PartBuffering,
    /// Presigns download URLs: the bucket's client, or one for `s3.public_endpoint`.
    presigner: Client,
}

impl fmt::Debug for S3BlobStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3BlobStore")
            .field("bucket", &self.bucket.name)
            .field("part_size", &self.parts.part_size)
            .field("parts_in_flight", &self.parts.parts_in_flight)
            .finish_non_exhaustive()
    }
}

impl S3BlobStore {
    /// A store on `settings.bucket` with the static keys of `settings`, writing parts of
    /// `part_size` bytes (5 MiB..=5 GiB, S3's limits) with at most `parts_in_flight` of them
    /// uploading at once per upload, their buffers reserved from `budget`. Sends no request.
    /// For `s3.credentials = "chain"` use [`S3BlobStore::connect`].
    pub fn new(
        settings: &S3Settings,
        part_size: u64,
        parts_in_flight: usize,
        budget: Arc<MemoryBudget>,
    ) -> Result<Self, BlobError> {
        let Some(keys) = credentials::static_keys(settings)? else {
            return Err(BlobError::Misconfigured(
                "s3.credentials = \"chain\" resolves credentials at start-up: S3BlobStore::connect builds this store".into(),
            ));
        };
        let provider = SharedCredentialsProvider::new(keys);
        Self::from_settings(
            settings,
            provider,
            https_client(),
            part_size,
            parts_in_flight,
            budget,
        )
    }

    /// Like [`S3BlobStore::new`], for either kind of `s3.credentials`: with the AWS default
    /// chain it asks the chain once, and fails when no source in it has credentials.
    pub async fn connect(
        settings: &S3Settings,
        part_size: u64,
        parts_in_flight: usize,
        budget: Arc<MemoryBudget>,
    ) -> Result<Self, BlobError> {
        let http_client = https_client();
        let provider = match credentials::static_keys(settings)? {
            Some(keys) => SharedCredentialsProvider::new(keys),
            None => credentials::default_chain(&settings.region, http_client.clone()).await?,
        };
        Self::from_settings(
            settings,
            provider,
            http_client,
            part_size,
            parts_in_flight,
            budget,
        )
    }

    fn from_settings(
        settings: &S3Settings,
        credentials: SharedCredentialsProvider,
        http_client: SharedHttpClient,
        part_size: u64,
        parts_in_flight: usize,
        budget: Arc<MemoryBudget>,
    ) -> Result<Self, BlobError> {
        let bucket = settings
            .bucket
            .clone()
            .filter(|bucket| !bucket.is_empty())
            .ok_or_else(|| BlobError::Misconfigured("s3.bucket is required".into()))?;
        let mut config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .credentials_provider(credentials)
            // Explicitly one cache in the config that the presigning client below is built from:
            // temporary credentials are fetched once for both clients (the test counts fetches).
            .identity_cache(IdentityCache::lazy().build())
            .force_path_style(settings.force_path_style)
            .request_checksum_calculation(match settings.request_checksums {
                S3RequestChecksums::WhenSupported => RequestChecksumCalculation::WhenSupported,
                S3RequestChecksums::WhenRequired => RequestChecksumCalculation::WhenRequired,
            })
            .http_client(http_client);
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint);
        }
        let config = config.build();
        let presigner = settings.public_endpoint.as_ref().map(|public| {
            // Same credentials, region and addressing: only the host the signature is for differs.
            Client::from_conf(
                config
                    .to_builder()
                    .endpoint_url(public.trim_end_matches('/'))
                    .build(),
            )
        });
        let mut store = Self::with_client(
            Client::from_conf(config),
            bucket,
            part_size,
            parts_in_flight,
            budget,
        )?;
        if let Some(presigner) = presigner {
            store.presigner = presigner;
        }
        Ok(store)
    }

    /// Like [`S3BlobStore::new`] with a client configured elsewhere (tests, other credentials).
    pub fn with_client(
        client: Client,
        bucket: String,
        part_size: u64,
        parts_in_flight: usize,
        budget: Arc<MemoryBudget>,
    ) -> Result<Self, BlobError> {
        if !(MIN_PART_SIZE..=MAX_PART_SIZE).contains(&part_size) {
            return Err(BlobError::Misconfigured(
                format!("part size {part_size} is outside S3's limits of 5 MiB..=5 GiB").into(),
            ));
        }
        if parts_in_flight == 0 {
            return Err(BlobError::Misconfigured(
                "at least one part must be allowed in flight".into(),
            ));
        }
        Ok(Self {
            presigner: client.clone(),
            bucket: Arc::new(Bucket {
                client,
                name: bucket,
            }),
            parts: PartBuffering {
                part_size: usize::try_from(part_size).map_err(|_| {
                    BlobError::Misconfigured("part size does not fit in memory".into())
                })?,
                parts_in_flight,
                budget,
            },
        })
    }

    /// The S3 client (for checks the blob store trait has no words for).
    pub fn client(&self) -> &Client {
        &self.bucket.client
    }

    pub fn bucket(&self) -> &str {
        &self.bucket.name
    }

    /// Replaces the bucket's lifecycle configuration (the bucket is the service's own) with
    /// rules that expire [`EXPIRING_PREFIXES`] after `retention` rounded up to whole days (at
    /// least one) and abort incomplete multipart uploads a day after they started.
    pub async fn install_lifecycle(&self, retention: Duration) -> BlobResult<LifecycleOutcome> {
        let days = expiry_days(retention);
        let build = |error: aws_sdk_s3::error::BuildError| BlobError::Misconfigured(error.into());
        let mut rules = Vec::new();
        for prefix in EXPIRING_PREFIXES {
            rules.push(
                LifecycleRule::builder()
                    .id(format!(
                        "svc-messaging-expire-{}",
                        prefix.trim_end_matches('/')
                    ))
                    .filter(LifecycleRuleFilter::builder().prefix(prefix).build())
                    .status(ExpirationStatus::Enabled)
                    .expiration(LifecycleExpiration::builder().days(days).build())
                    .build()
                    .map_err(build)?,
            );
        }
        rules.push(
            LifecycleRule::builder()
                .id("svc-messaging-abort-incomplete-uploads")
                .filter(LifecycleRuleFilter::builder().prefix("").build())
                .status(ExpirationStatus::Enabled)
                .abort_incomplete_multipart_upload(
                    AbortIncompleteMultipartUpload::builder()
                        .days_after_initiation(ABORT_INCOMPLETE_AFTER_DAYS)
                        .build(),
                )
                .build()
                .map_err(build)?,
        );
        let configuration = BucketLifecycleConfiguration::builder()
            .set_rules(Some(rules))
            .build()
            .map_err(build)?;
        match self
            .bucket
            .client
            .put_bucket_lifecycle_configuration()
            .bucket(&self.bucket.name)
            .lifecycle_configuration(configuration)
            .send()
            .await
        {
            Ok(_) => Ok(LifecycleOutcome::Installed),
            Err(error) if status(&error) == Some(501) || has_code(&error, "NotImplemented") => {
                Ok(LifecycleOutcome::Unsupported)
            }
            Err(error) => Err(map_sdk_error(
                "PutBucketLifecycleConfiguration",
                Scope::Bucket,
                error,
            )),
        }
    }

    /// Keys of the multipart uploads under `prefix` that were started and neither completed nor
    /// aborted (none should outlive its upload). Only the tests ask (feature `testsuite`).
    #[cfg(any(test, feature = "testsuite"))]
    pub async fn open_multipart_uploads(&self, prefix: &str) -> BlobResult<Vec<String>> {
        let mut keys = Vec::new();
        let mut key_marker: Option<String> = None;
        let mut upload_id_marker: Option<String> = None;
        loop {
            let page = self
                .bucket
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket.name)
                .prefix(prefix)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(upload_id_marker.take())
                .send()
                .await
                .map_err(|error| map_sdk_error("ListMultipartUploads", Scope::Bucket, error))?;
            keys.extend(
                page.uploads()
                    .iter()
                    .filter_map(|upload| upload.key().map(str::to_owned)),
            );
            if page.is_truncated() != Some(true) {
                return Ok(keys);
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            upload_id_marker = page.next_upload_id_marker().map(str::to_owned);
            if key_marker.is_none() && upload_id_marker.is_none() {
                return Ok(keys);
            }
        }
    }
}

/// rustls with ring: HTTPS to AWS, plain HTTP to a local endpoint, no aws-lc build. The S3
/// clients and the credential chain's requests (STS, container and instance metadata) share it.
fn https_client() -> SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(Provider::Rustls(CryptoMode::Ring))
        .build_https()
}

/// Lifecycle rules count in whole days: `retention` rounded up, at least one, so no file expires
/// before its retention (it may live up to a day longer).
fn expiry_days(retention: Duration) -> i32 {
    i32::try_from(retention.as_secs().div_ceil(SECONDS_PER_DAY).max(1)).unwrap_or(i32::MAX)
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn start_upload(
        &self,
        key: &str,
        attributes: BlobAttributes,
    ) -> BlobResult<Box<dyn BlobUpload>> {
        Ok(Box::new(S3Upload::new(
            self.bucket.clone(),
            key.to_owned(),
            attributes,
            self.parts.clone(),
        )))
    }

    async fn resume_upload(
        &self,
        key: &str,
        attributes: BlobAttributes,
        part_size: u64,
        staged: StagedParts,
    ) -> BlobResult<Box<dyn ResumableUpload>> {
        let parts = PartBuffering {
            part_size: usize::try_from(part_size).unwrap_or(usize::MAX),
            ..self.parts.clone()
        };
        Ok(Box::new(S3Upload::resumed(
            self.bucket.clone(),
            key.to_owned(),
            attributes,
            parts,
            staged,
        )))
    }

    async fn discard_staged(&self, key: &str, staged: &StagedParts) -> BlobResult<()> {
        match &staged.upload_id {
            Some(upload_id) => self.bucket.abort_multipart(key, upload_id).await,
            None => Ok(()),
        }
    }

    async fn put(&self, key: &str, attributes: BlobAttributes, bytes: Bytes) -> BlobResult<()> {
        self.bucket.put_object(key, &attributes, bytes).await
    }

    #[cfg(any(test, feature = "testsuite"))]
    async fn info(&self, key: &str) -> BlobResult<super::blobs::BlobInfo> {
        let head = self
            .bucket
            .client
            .head_object()
            .bucket(&self.bucket.name)
            .key(key)
            .send()
            .await
            .map_err(|error| map_sdk_error("HeadObject", Scope::Object, error))?;
        Ok(super::blobs::BlobInfo {
            size: head
                .content_length()
                .and_then(|length| u64::try_from(length).ok())
                .unwrap_or(0),
            content_type: head
                .content_type()
                .unwrap_or("application/octet-stream")
                .to_owned(),
        })
    }

    async fn read(
        &self,
        key: &str,
        offset: u64,
    ) -> BlobResult<BoxStream<'static, BlobResult<Bytes>>> {
        let range = (offset > 0).then(|| format!("bytes={offset}-"));
        let object = match self
            .bucket
            .client
            .get_object()
            .bucket(&self.bucket.name)
            .key(key)
            .set_range(range)
            .send()
            .await
        {
            Ok(object) => object,
            // The object exists and `offset` is at (or past) its end: nothing left to read.
            Err(error) if status(&error) == Some(416) || has_code(&error, "InvalidRange") => {
                return Ok(futures::stream::empty().boxed());
            }
            Err(error) => return Err(map_sdk_error("GetObject", Scope::Object, error)),
        };
        let body = futures::stream::try_unfold(object.body, |mut body| async move {
            match body.try_next().await {
                Ok(Some(chunk)) => Ok(Some((chunk, body))),
                Ok(None) => Ok(None),
                // The connection broke mid-body: the reader may resume from where it got to.
                Err(error) => Err(BlobError::Unavailable(
                    format!("GetObject body: {error}").into(),
                )),
            }
        });
        Ok(body.boxed())
    }

    async fn delete(&self, key: &str) -> BlobResult<()> {
        self.bucket.delete_object(key).await
    }

    async fn download_url(&self, key: &str, valid_for: Duration) -> BlobResult<String> {
        let presigning = PresigningConfig::expires_in(valid_for).map_err(|error| {
            BlobError::Misconfigured(format!("download URL lifetime: {error}").into())
        })?;
        let request = self
            .presigner
            .get_object()
            .bucket(&self.bucket.name)
            .key(key)
            .presigned(presigning)
            .await
            .map_err(|error| map_sdk_error("GetObject (presign)", Scope::Object, error))?;
        Ok(request.uri().to_owned())
    }

    async fn list(&self, prefix: &str) -> BlobResult<Vec<String>> {
        let mut pages = self
            .bucket
            .client
            .list_objects_v2()
            .bucket(&self.bucket.name)
            .prefix(prefix)
            .into_paginator()
            .send();
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            let page =
                page.map_err(|error| map_sdk_error("ListObjectsV2", Scope::Bucket, error))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|object| object.key().map(str::to_owned)),
            );
        }
        keys.sort();
        Ok(keys)
    }

    async fn exists(&self, key: &str) -> BlobResult<bool> {
        match self
            .bucket
            .client
            .head_object()
            .bucket(&self.bucket.name)
            .key(key)
            .send()
            .await
            .map_err(|error| map_sdk_error("HeadObject", Scope::Object, error))
        {
            Ok(_) => Ok(true),
            Err(BlobError::NotFound) => Ok(false),
            Err(error) => Err(error),
        }
    }

    async fn objects_before(
        &self,
        prefix: &str,
        before: SystemTime,
        start_after: Option<&str>,
        limit: usize,
    ) -> BlobResult<ObjectPage> {
        let page = self
            .bucket
            .client
            .list_objects_v2()
            .bucket(&self.bucket.name)
            .prefix(prefix)
            .set_start_after(start_after.map(str::to_owned))
            .max_keys(i32::try_from(limit.clamp(1, 1000)).unwrap_or(1000))
            .send()
            .await
            .map_err(|error| map_sdk_error("ListObjectsV2", Scope::Bucket, error))?;
        let next = match page.is_truncated() {
            Some(true) => page
                .contents()
                .last()
                .and_then(|object| object.key().map(str::to_owned)),
            _ => None,
        };
        let keys = page
            .contents()
            .iter()
            .filter(|object| {
                object
                    .last_modified()
                    .and_then(|time| SystemTime::try_from(*time).ok())
                    .is_some_and(|written| written < before)
            })
            .filter_map(|object| object.key().map(str::to_owned))
            .collect();
        Ok(ObjectPage { keys, next })
    }

    async fn unfinished_writes(
        &self,
        prefixes: &[&str],
        before: SystemTime,
        limit: usize,
    ) -> BlobResult<Vec<UnfinishedWrite>> {
        // Bounded listing: a bucket full of fresh uploads must not keep one round going.
        const MAX_PAGES: usize = 10;
        let mut stale = Vec::new();
        for prefix in prefixes {
            let mut key_marker: Option<String> = None;
            let mut upload_id_marker: Option<String> = None;
            for _ in 0..MAX_PAGES {
                let page = self
                    .bucket
                    .client
                    .list_multipart_uploads()
                    .bucket(&self.bucket.name)
                    .prefix(*prefix)
                    .set_key_marker(key_marker.take())
                    .set_upload_id_marker(upload_id_marker.take())
                    .send()
                    .await
                    .map_err(|error| map_sdk_error("ListMultipartUploads", Scope::Bucket, error))?;
                for upload in page.uploads() {
                    let begun = upload
                        .initiated()
                        .and_then(|time| SystemTime::try_from(*time).ok());
                    if let (Some(key), Some(upload_id), Some(begun)) =
                        (upload.key(), upload.upload_id(), begun)
                        && begun < before
                    {
                        stale.push(UnfinishedWrite {
                            key: Some(key.to_owned()),
                            upload_id: upload_id.to_owned(),
                        });
                        if stale.len() >= limit {
                            return Ok(stale);
                        }
                    }
                }
                key_marker = page.next_key_marker().map(str::to_owned);
                upload_id_marker = page.next_upload_id_marker().map(str::to_owned);
                if page.is_truncated() != Some(true)
                    || (key_marker.is_none() && upload_id_marker.is_none())
                {
                    break;
                }
            }
        }
        Ok(stale)
    }

    async fn abort_unfinished(&self, write: &UnfinishedWrite) -> BlobResult<()> {
        let Some(key) = &write.key else {
            return Ok(());
        };
        self.bucket.abort_multipart(key, &write.upload_id).await
    }
}

#[async_trait]
impl DependencyCheck for S3BlobStore {
    fn name(&self) -> &'static str {
        "s3"
    }

    /// The bucket answers HeadBucket with these credentials.
    async fn check(&self) -> Result<(), BoxError> {
        self.bucket
            .client
            .head_bucket()
            .bucket(&self.bucket.name)
            .send()
            .await
            .map_err(|error| map_sdk_error("HeadBucket", Scope::Bucket, error))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_rounds_up_to_whole_days() {
        let hours = |hours: u64| Duration::from_secs(hours * 3600);
        assert_eq!(expiry_days(Duration::from_secs(1)), 1);
        assert_eq!(expiry_days(hours(24)), 1);
        assert_eq!(expiry_days(hours(24) + Duration::from_secs(1)), 2);
        assert_eq!(expiry_days(hours(7 * 24)), 7);
        assert_eq!(expiry_days(Duration::MAX), i32::MAX);
    }
}
