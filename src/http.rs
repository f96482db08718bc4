//! The HTTP port, for Kubernetes and Prometheus: liveness, readiness, a grpc-gateway-style
//! mapping of `grpc.health.v1.Health/Check`, and metrics.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Deserialize;
use serde_json::json;

use crate::{health::HealthBoard, metrics::Metrics};

#[derive(Clone)]
struct HttpState {
    health: HealthBoard,
    metrics: Arc<Metrics>,
}

pub fn router(health: HealthBoard, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(liveness))
        .route("/readyz", get(readiness))
        .route("/v1/health", get(health_check))
        .route("/metrics", get(prometheus))
        .with_state(HttpState { health, metrics })
}

/// Liveness: the process answers. It stays 200 while shutting down, so Kubernetes does not kill a
/// pod that is draining.
async fn liveness() -> &'static str {
    "ok\n"
}

/// Readiness: every configured dependency answered the last check.
async fn readiness(State(state): State<HttpState>) -> Response {
    if state.health.is_serving() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

#[derive(Deserialize)]
struct HealthQuery {
    #[serde(default)]
    service: String,
}

/// `GET /v1/health?service=NAME`: the JSON form of `HealthCheckResponse`, 200 when SERVING and
/// 503 otherwise; an unknown service is 404 with a `google.rpc.Status`-shaped body, as
/// grpc-gateway would answer.
async fn health_check(
    State(state): State<HttpState>,
    Query(query): Query<HealthQuery>,
) -> Response {
    match state.health.status_of(&query.service) {
        Some(true) => (StatusCode::OK, Json(json!({"status": "SERVING"}))).into_response(),
        Some(false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "NOT_SERVING"})),
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"code": 5, "message": "unknown service", "details": []})),
        )
            .into_response(),
    }
}

async fn prometheus(State(state): State<HttpState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}
