//! A Rust client of svc-messaging: conversations, messages, live subscriptions and file
//! transfers, with what every caller would otherwise write again.
//!
//! - [`Client`] connects over TLS (`https://`, rustls with the system's roots and optionally a
//!   private CA) or plaintext (`http://`), as a JWT bearer or behind a trusted gateway
//!   ([`Identity`]), with per-call deadlines ([`Client::with_timeout`]).
//! - Unary calls follow the shipped gRPC service config ([`ServiceConfig`],
//!   `proto/service_config.json`): timeouts, and retries of `UNAVAILABLE` for reads and
//!   idempotent writes.
//! - [`Client::upload_path`] / [`Client::upload_seekable`] / [`Client::upload`] chunk, hash
//!   (SHA-256, declared), use a request id and continue an interrupted upload through
//!   `GetUploadStatus`, also across service restarts.
//! - [`Client::download`] / [`Client::download_to_path`] continue a broken stream from the
//!   offset reached and check the SHA-256.
//! - [`Client::subscribe`] resubscribes after the last sequence it delivered: its consumer sees
//!   every event exactly once, in order.
//! - Errors ([`Error`]) carry the service's `ErrorInfo` reason, `RetryInfo` delay and quota or
//!   field violations ([`ServiceError`]).
//!
//! ```no_run
//! use futures::StreamExt;
//! use svcmsg_client::{Client, Identity, SubscribeOptions, UploadOptions};
//!
//! # async fn example() -> Result<(), svcmsg_client::Error> {
//! let client = Client::builder("http://127.0.0.1:50051")
//!     .identity(Identity::UserId("alice".into()))
//!     .build()?;
//! let conversation = client.create_conversation("design review", &["bob"]).await?;
//! let id = &conversation.conversation_id;
//!
//! // Every event of the conversation, once and in order, even across service restarts.
//! let mut events = client.subscribe(id, SubscribeOptions::default());
//!
//! // Hashed, chunked, resumed after interruptions.
//! let uploaded = client.upload_path("mockup.png", UploadOptions::new(id, "")).await?;
//! let announced = uploaded.message.map(|message| message.sequence);
//! while let Some(event) = events.next().await {
//!     let event = event?;
//!     println!("event #{}", event.sequence);
//!     if Some(event.sequence) == announced {
//!         break;
//!     }
//! }
//!
//! // Refusals carry the service's ErrorInfo reason.
//! match client.send_text(id, "   ").await {
//!     Err(error) if error.reason() == Some("INVALID_FIELD") => {}
//!     other => panic!("{other:?}"),
//! }
//! # Ok(()) }
//! ```

mod client;
mod download;
mod error;
mod service_config;
mod subscribe;
mod upload;

pub use client::{Client, ClientBuilder, Identity, ReconnectPolicy};
pub use download::{DownloadOutcome, DownloadProgress};
pub use error::{ERROR_DOMAIN, Error, ServiceError, code_name};
pub use service_config::{
    DEFAULT_SERVICE_CONFIG_JSON, MethodPolicy, RetryPolicy, ServiceConfig, ServiceConfigError,
};
pub use subscribe::{ReconnectReport, SubscribeOptions, Subscription};
pub use tonic::Code;
pub use upload::{UploadOptions, UploadOutcome};

/// The generated types of the contract (`proto/messaging/v1`), for the calls this crate does
/// not wrap.
#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("messaging.v1");
}
