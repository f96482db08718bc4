//! svc-messaging: chat conversations over gRPC — messages, live subscriptions and file relay.
//!
//! Data flows one way: [`grpc`] adapters -> domain ([`messaging`], [`files`]) -> [`store`].
//!
//! - [`app`]: builds everything from [`config::Settings`], serves gRPC and HTTP, shuts down.
//! - [`config`]: layered, validated settings; secrets redacted.
//! - [`call_layer`]: the tower plumbing the drain and metrics layers share.
//! - [`budget`]: the process-wide memory budget of upload buffers.
//! - [`auth`]: who is calling (JWT or a trusted gateway header).
//! - [`drain`]: ends calls still open after the shutdown grace with `UNAVAILABLE`.
//! - [`deadline`]: ends calls whose `grpc-timeout` ran out with `DEADLINE_EXCEEDED`.
//! - [`error`]: the error vocabulary (kind + machine-readable reason).
//! - [`grpc`]: generated types, the status mapping and the thin service adapters.
//! - [`health`]: dependency checks feeding gRPC health and the HTTP probes.
//! - [`http`]: `/healthz`, `/readyz`, `/v1/health`, `/metrics`.
//! - [`metrics`]: Prometheus registry and the gRPC metrics layer.
//! - [`messaging`]: conversations, messages, subscriptions (domain).
//! - [`ids`]: identifiers parsed at the boundary.
//! - [`files`]: upload policy, content sniffing and the upload / download rules.
//! - [`quota`]: per-caller slots of long-lived calls (uploads, live subscriptions).
//! - [`startup`]: the start-up check `check-config` and the app share.
//! - [`store`]: storage traits and backends.
//! - [`telemetry`]: the `tracing` subscriber.
//! - [`thumbnails`]: image thumbnails on a bounded worker pool within the memory budget.
//! - [`tls`]: TLS of the gRPC port (optional client certificates), reloaded from its files.
//! - [`transport`]: connection limits of the gRPC port (count, time to send the preface, age).

pub mod app;
pub mod auth;
pub mod budget;
pub mod call_layer;
pub mod config;
pub mod deadline;
pub mod drain;
pub mod error;
pub mod files;
pub mod grpc;
pub mod health;
pub mod http;
pub mod ids;
pub mod messaging;
pub mod metrics;
pub mod quota;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod thumbnails;
pub mod tls;
pub mod transport;
