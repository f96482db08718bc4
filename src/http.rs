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

use crate::{
    health::HealthBoard,
    metrics::Metrics,
    store::{blobs::BlobError, fs::FsBlobStore},
};

#[derive(Clone)]
struct HttpState {
    health: HealthBoard,
    metrics: Arc<Metrics>,
    /// Set when files live on the local filesystem: its signed download URLs are served here.
    fs_blobs: Option<FsBlobStore>,
}

pub fn router(health: HealthBoard, metrics: Arc<Metrics>, fs_blobs: Option<FsBlobStore>) -> Router {
    Router::new()
        .route("/healthz", get(liveness))
        .route("/readyz", get(readiness))
        .route("/v1/health", get(health_check))
        .route("/metrics", get(prometheus))
        .route("/v1/blobs/{*key}", get(signed_download))
        .with_state(HttpState {
            health,
            metrics,
            fs_blobs,
        })
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

/// Serves a filesystem blob to the holder of a valid, unexpired signed URL. Like S3, a bad or
/// expired signature is 403 and says nothing about whether the object exists.
async fn signed_download(
    State(state): State<HttpState>,
    axum::extract::Path(key): axum::extract::Path<String>,
    Query(query): Query<std::collections::HashMap<String, String>>,
) -> Response {
    let forbidden = || (StatusCode::FORBIDDEN, "invalid or expired signature\n").into_response();
    let Some(store) = state.fs_blobs else {
        return forbidden();
    };
    let expires = query
        .get("expires")
        .and_then(|value| value.parse::<u64>().ok());
    let (Some(expires), Some(signature)) = (expires, query.get("signature")) else {
        return forbidden();
    };
    if !store.signer().verify(&key, expires, signature) {
        return forbidden();
    }
    let (attributes, size, body) = match store.open_download(&key).await {
        Ok(download) => download,
        Err(BlobError::NotFound) => return (StatusCode::NOT_FOUND, "not found\n").into_response(),
        Err(error) => {
            tracing::warn!(%error, "signed download failed");
            return (StatusCode::SERVICE_UNAVAILABLE, "unavailable\n").into_response();
        }
    };
    let headers = [
        (header::CONTENT_TYPE, attributes.content_type),
        (header::CONTENT_DISPOSITION, attributes.content_disposition),
        (header::CONTENT_LENGTH, size.to_string()),
        (header::CACHE_CONTROL, "private, no-store".to_owned()),
        // Caller-supplied bytes: a browser must neither guess another type (an "image" that is
        // really HTML) nor run anything in it, even when opened inline.
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; sandbox".to_owned(),
        ),
    ];
    (headers, axum::body::Body::from_stream(body)).into_response()
}
