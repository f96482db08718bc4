//! Storage behind traits named in domain terms, each with an in-process backend for the
//! zero-setup default and a shared backend (Redis, S3) for real deployments.
//!
//! - [`messages`]: the [`messages::MessageStore`] trait (conversations, events, live feed).
//! - [`memory`]: the in-process message store.
//! - [`redis`]: the Redis message store, shared by replicas.
//! - [`blobs`]: the [`blobs::BlobStore`] trait (streamed writes, reads, download URLs).
//! - [`fs`]: the filesystem blob store under `storage.data_dir`.

pub mod blobs;
pub mod fs;
pub mod memory;
pub mod messages;
pub mod redis;
