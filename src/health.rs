//! Serving status: one board that gRPC health (`grpc.health.v1.Health`) and the HTTP probes both
//! read, kept current by a monitor that checks every configured dependency on an interval.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::error::BoxError;

/// The services whose status is reported, besides the overall status `""`.
pub const SERVICE_NAMES: [&str; 2] = [
    "messaging.v1.MessagingService",
    "messaging.v1.FileRelayService",
];

/// Something the service cannot work without (a store, a blob bucket).
#[async_trait]
pub trait DependencyCheck: Send + Sync + 'static {
    /// A short, stable name for logs, e.g. `blob-store`.
    fn name(&self) -> &'static str;
    /// Succeeds when the dependency answers right now.
    async fn check(&self) -> Result<(), BoxError>;
}

/// The current serving status, shared by gRPC health and the HTTP probes.
#[derive(Clone)]
pub struct HealthBoard {
    reporter: HealthReporter,
    serving: Arc<watch::Sender<bool>>,
}

impl HealthBoard {
    /// Starts NOT_SERVING: readiness is earned by the first successful check.
    pub async fn new(reporter: HealthReporter) -> Self {
        let board = Self {
            reporter,
            serving: Arc::new(watch::Sender::new(true)),
        };
        board.set_serving(false).await;
        board
    }

    pub async fn set_serving(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
        for name in SERVICE_NAMES {
            self.reporter.set_service_status(name, status).await;
        }
        self.serving.send_replace(serving);
    }

    pub fn is_serving(&self) -> bool {
        *self.serving.borrow()
    }

    /// The status of `service` (`""` is the whole server), or `None` for an unknown name.
    pub fn status_of(&self, service: &str) -> Option<bool> {
        (service.is_empty() || SERVICE_NAMES.contains(&service)).then(|| self.is_serving())
    }
}

/// Re-checks every dependency each `interval` and publishes the result until `stop` fires.
pub async fn monitor(
    board: HealthBoard,
    checks: Vec<Arc<dyn DependencyCheck>>,
    interval: Duration,
    timeout: Duration,
    stop: CancellationToken,
) {
    let mut previously_failing: Vec<&'static str> = Vec::new();
    let mut first = true;
    loop {
        let mut failing = Vec::new();
        for check in &checks {
            let outcome = tokio::time::timeout(timeout, check.check()).await;
            let error = match outcome {
                Ok(Ok(())) => continue,
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("no answer within {}", humantime::format_duration(timeout)),
            };
            if !previously_failing.contains(&check.name()) {
                tracing::warn!(dependency = check.name(), %error, "dependency is down");
            }
            failing.push(check.name());
        }
        for name in &previously_failing {
            if !failing.contains(name) {
                tracing::info!(dependency = name, "dependency recovered");
            }
        }
        let serving = failing.is_empty();
        if first || board.is_serving() != serving {
            if stop.is_cancelled() {
                return;
            }
            board.set_serving(serving).await;
            tracing::info!(
                status = if serving { "SERVING" } else { "NOT_SERVING" },
                "health status"
            );
        }
        first = false;
        previously_failing = failing;
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}
