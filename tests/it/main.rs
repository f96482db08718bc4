//! The integration tests, in one binary (each test binary links aws-sdk, fred and libjpeg again:
//! one link step instead of one per area). One module per area; `support` spawns the real
//! service and reaches the real Redis and S3 server that `scripts/test` starts.

mod auth;
mod blob_store;
mod chaos;
mod cli;
mod deadlines;
mod files;
mod files_cloud;
mod hostile;
mod message_store;
mod messaging;
mod orphans;
mod redis_store_smoke;
mod replicas;
mod resumable;
mod s3_access;
mod server;
mod support;
mod thumbnails;
mod upload_sessions;
