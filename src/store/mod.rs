//! Storage behind traits named in domain terms, each with an in-process backend for the
//! zero-setup default and a shared backend (Redis, S3) for real deployments.
//!
//! - [`messages`]: the [`messages::MessageStore`] trait (conversations, events, live feed).
//! - [`file_records`]: the [`file_records::FileRecordStore`] trait (file metadata until expiry).
//! - [`memory`]: the in-process message and file-record stores.
//! - [`redis`]: the Redis message store, shared by replicas.
//! - [`blobs`]: the [`blobs::BlobStore`] trait (streamed writes, reads, download URLs).
//! - [`fs`]: the filesystem blob store ([`fs::FsBlobStore`]) under `storage.data_dir`.
//! - [`upload_sessions`]: the [`upload_sessions::UploadSessionStore`] trait (resumable uploads).
//! - [`fs_sessions`]: the data-directory upload session store
//!   ([`fs_sessions::FsUploadSessionStore`]); the Redis store implements the trait too
//!   ([`redis::upload_sessions`]).
//! - [`s3`]: the S3 blob store (AWS or an S3-compatible server), shared by replicas.

pub mod blobs;
pub mod file_records;
pub mod fs;
pub mod fs_sessions;
pub mod memory;
pub mod messages;
pub mod redis;
pub mod s3;
pub mod upload_sessions;
