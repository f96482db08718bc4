//! Storage behind traits named in domain terms, each with an in-process backend for the
//! zero-setup default and a shared backend (Redis, S3) for real deployments.
//!
//! - [`fs`]: the filesystem blob store under `storage.data_dir`.

pub mod fs;
