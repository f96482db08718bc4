//! The integration tests, in one binary (each test binary links aws-sdk, fred and libjpeg again:
//! one link step instead of one per area). One module per area; `support` spawns the real
//! service and reaches the real Redis and S3 server that `scripts/test` starts.

mod auth;
mod balancing;
mod blob_store;
mod chaos;
mod cli;
mod client;
mod cluster_failover;
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
mod rotation;
mod s3_access;
mod sdk;
mod server;
mod support;
mod svcmsg;
mod thumbnails;
mod tls;
mod upload_sessions;
