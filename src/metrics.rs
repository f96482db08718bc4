//! Prometheus metrics: per-method RPC counts by status code, latency, and RPCs (streams
//! especially) in flight. A tower layer observes every gRPC call from the outside, so the
//! handlers stay free of bookkeeping and a status sent in trailers is counted correctly.
//!
//! The layer runs before routing and authentication, so the request path is caller input: only
//! paths of methods the server serves ([`ServedMethods`]) become labels, every other path shares
//! one `unknown` series. The number of series is therefore fixed by the contract, not by callers.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use crate::{
    call_layer::{CallLayer, CallWrapper},
    thumbnails::ThumbnailMetrics,
    tls::TlsMetrics,
    transport::ConnectionMetrics,
};
use futures::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use prost::Message;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_service: String,
    grpc_method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_service: String,
    grpc_method: String,
    grpc_code: &'static str,
}

/// Label value of every path that is not a served method.
pub const UNKNOWN_LABEL: &str = "unknown";

/// The gRPC methods this server serves, keyed by request path (`/package.Service/Method`).
#[derive(Clone, Debug, Default)]
pub struct ServedMethods {
    by_path: Arc<HashMap<String, MethodLabels>>,
}

impl ServedMethods {
    /// Every method of every service in the encoded `FileDescriptorSet`s.
    pub fn from_descriptor_sets(sets: &[&[u8]]) -> Result<Self, prost::DecodeError> {
        let mut by_path = HashMap::new();
        for encoded in sets {
            let set = prost_types::FileDescriptorSet::decode(*encoded)?;
            for file in &set.file {
                let package = file.package();
                for service in &file.service {
                    let service_name = if package.is_empty() {
                        service.name().to_owned()
                    } else {
                        format!("{package}.{}", service.name())
                    };
                    for method in &service.method {
                        by_path.insert(
                            format!("/{service_name}/{}", method.name()),
                            MethodLabels {
                                grpc_service: service_name.clone(),
                                grpc_method: method.name().to_owned(),
                            },
                        );
                    }
                }
            }
        }
        Ok(Self {
            by_path: Arc::new(by_path),
        })
    }

    /// The labels of `path`: its own for a served method, the shared `unknown` ones otherwise.
    fn labels(&self, path: &str) -> MethodLabels {
        self.by_path
            .get(path)
            .cloned()
            .unwrap_or_else(|| MethodLabels {
                grpc_service: UNKNOWN_LABEL.to_owned(),
                grpc_method: UNKNOWN_LABEL.to_owned(),
            })
    }
}

type HistogramFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

/// The registry and the gRPC server metrics in it.
pub struct Metrics {
    registry: Registry,
    /// Connections of the gRPC port, counted by [`crate::transport::LimitedIncoming`].
    pub connections: ConnectionMetrics,
    /// Certificate reloads of the gRPC port's TLS, counted by [`crate::tls::ServerTls`].
    pub tls: TlsMetrics,
    /// Streamed decodes and the memory decodes hold, counted by the thumbnail pool.
    pub thumbnails: ThumbnailMetrics,
    handled: Family<HandledLabels, Counter>,
    handling_seconds: HistogramFamily,
    in_flight: Family<MethodLabels, Gauge>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let handled = Family::<HandledLabels, Counter>::default();
        let handling_seconds: HistogramFamily = Family::new_with_constructor(|| {
            // 0.5 ms .. ~16 s: unary calls sit at the low end, uploads and streams at the top.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.0005, 2.0, 16,
            ))
        });
        let in_flight = Family::<MethodLabels, Gauge>::default();
        registry.register(
            "grpc_server_handled",
            "RPCs completed, by method and gRPC status code",
            handled.clone(),
        );
        registry.register(
            "grpc_server_handling_seconds",
            "Time from request to final status, by method",
            handling_seconds.clone(),
        );
        registry.register(
            "grpc_server_in_flight",
            "RPCs (including open streams) currently in progress, by method",
            in_flight.clone(),
        );
        let connections = ConnectionMetrics::default();
        registry.register(
            "grpc_server_connections",
            "gRPC connections open now",
            connections.open.clone(),
        );
        registry.register(
            "grpc_server_connections_refused",
            "gRPC connections closed at once because server.max_connections were open",
            connections.refused.clone(),
        );
        registry.register(
            "grpc_server_handshake_timeouts",
            "gRPC connections closed for not sending the HTTP/2 preface within server.handshake_timeout",
            connections.handshake_timeouts.clone(),
        );
        registry.register(
            "grpc_server_tls_handshake_failures",
            "gRPC connections closed because their TLS handshake failed (plaintext clients, untrusted client certificates)",
            connections.tls_handshake_failures.clone(),
        );
        let tls = TlsMetrics::default();
        registry.register(
            "tls_certificate_reloads",
            "Changed TLS files of the gRPC port that now serve new connections",
            tls.reloads.clone(),
        );
        registry.register(
            "tls_certificate_reload_failures",
            "Changed TLS files of the gRPC port that could not be used (the previous certificate stays)",
            tls.reload_failures.clone(),
        );
        registry.register(
            "grpc_server_connections_aged_out_forced",
            "gRPC connections cut because they were still open after server.max_connection_age, its grace and a flush",
            connections.aged_out_forced.clone(),
        );
        let thumbnails = ThumbnailMetrics::default();
        registry.register(
            "thumbnail_streaming_decoders",
            "Thumbnail decoders following an image upload in progress (each holds its memory)",
            thumbnails.streaming_decoders.clone(),
        );
        registry.register(
            "thumbnail_streamed_bytes",
            "Image bytes the thumbnail decoders consumed while the upload arrived",
            thumbnails.streamed_bytes.clone(),
        );
        registry.register(
            "thumbnail_stream_fallbacks",
            "Images decoded from the whole body after the last byte instead of while arriving",
            thumbnails.stream_fallbacks.clone(),
        );
        registry.register(
            "thumbnail_reserved_bytes",
            "Upload memory budget held by thumbnail decodes",
            thumbnails.reserved_bytes.clone(),
        );
        Arc::new(Self {
            registry,
            connections,
            tls,
            thumbnails,
            handled,
            handling_seconds,
            in_flight,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Observes every gRPC call passing through the server.
pub type GrpcMetricsLayer = CallLayer<Metered>;

impl GrpcMetricsLayer {
    pub fn new(metrics: Arc<Metrics>, served: ServedMethods) -> Self {
        CallLayer::with(Metered { metrics, served })
    }
}

/// The [`CallWrapper`] of the metrics layer.
#[derive(Clone)]
pub struct Metered {
    metrics: Arc<Metrics>,
    served: ServedMethods,
}

impl CallWrapper for Metered {
    type Call = Observation;
    type Body<B> = ObservedBody<B>;

    fn start<ReqBody>(&self, request: &http::Request<ReqBody>) -> Observation {
        let labels = self.served.labels(request.uri().path());
        Observation::start(self.metrics.clone(), labels)
    }

    fn finish<ResBody, E, F>(
        observation: Observation,
        response: F,
    ) -> BoxFuture<'static, Result<http::Response<ObservedBody<ResBody>>, E>>
    where
        F: Future<Output = Result<http::Response<ResBody>, E>> + Send + 'static,
    {
        Box::pin(async move {
            let response = response.await?;
            let (parts, body) = response.into_parts();
            let mut observation = Some(observation);
            // A trailers-only response (an immediate error) carries its status in the headers.
            if let Some(code) = parts.headers.get("grpc-status")
                && let Some(observation) = observation.take()
            {
                observation.finish(code.as_bytes());
            }
            Ok(http::Response::from_parts(
                parts,
                ObservedBody {
                    inner: body,
                    observation,
                },
            ))
        })
    }
}

/// One call being measured; dropping it unfinished counts the call as CANCELLED.
pub struct Observation {
    metrics: Arc<Metrics>,
    labels: MethodLabels,
    started: Instant,
    finished: bool,
}

impl Observation {
    fn start(metrics: Arc<Metrics>, labels: MethodLabels) -> Self {
        metrics.in_flight.get_or_create(&labels).inc();
        Self {
            metrics,
            labels,
            started: Instant::now(),
            finished: false,
        }
    }

    fn finish(mut self, grpc_status: &[u8]) {
        self.record(code_name(grpc_status));
    }

    fn record(&mut self, code: &'static str) {
        if self.finished {
            return;
        }
        self.finished = true;
        let metrics = &self.metrics;
        metrics.in_flight.get_or_create(&self.labels).dec();
        metrics
            .handling_seconds
            .get_or_create(&self.labels)
            .observe(self.started.elapsed().as_secs_f64());
        metrics
            .handled
            .get_or_create(&HandledLabels {
                grpc_service: self.labels.grpc_service.clone(),
                grpc_method: self.labels.grpc_method.clone(),
                grpc_code: code,
            })
            .inc();
    }
}

impl Drop for Observation {
    fn drop(&mut self) {
        self.record("CANCELLED");
    }
}

pin_project_lite::pin_project! {
    /// A response body that reports the call's status once its trailers pass by.
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        observation: Option<Observation>,
    }
}

impl<B: Body> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(observation) = this.observation.take()
                {
                    let code = trailers
                        .get("grpc-status")
                        .map_or(b"2".as_slice(), |v| v.as_bytes());
                    observation.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut observation) = this.observation.take() {
                    observation.record("UNKNOWN");
                }
            }
            Poll::Ready(None) => {
                if let Some(observation) = this.observation.take() {
                    observation.finish(b"0");
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn code_name(grpc_status: &[u8]) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    std::str::from_utf8(grpc_status)
        .ok()
        .and_then(|text| text.trim().parse::<usize>().ok())
        .and_then(|code| NAMES.get(code).copied())
        .unwrap_or("UNKNOWN")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_are_named() {
        assert_eq!(code_name(b"0"), "OK");
        assert_eq!(code_name(b"12"), "UNIMPLEMENTED");
        assert_eq!(code_name(b"16"), "UNAUTHENTICATED");
        assert_eq!(code_name(b"99"), "UNKNOWN");
    }

    fn labels(service: &str, method: &str) -> MethodLabels {
        MethodLabels {
            grpc_service: service.to_owned(),
            grpc_method: method.to_owned(),
        }
    }

    #[test]
    fn only_served_methods_get_their_own_labels() {
        let served =
            ServedMethods::from_descriptor_sets(&[tonic_health::pb::FILE_DESCRIPTOR_SET]).unwrap();
        assert_eq!(
            served.labels("/grpc.health.v1.Health/Check"),
            labels("grpc.health.v1.Health", "Check")
        );
        for path in [
            "/grpc.health.v1.Health/Nope",
            "/made.up/Path",
            "/grpc.health.v1.Health/Check/extra",
            "",
        ] {
            assert_eq!(
                served.labels(path),
                labels(UNKNOWN_LABEL, UNKNOWN_LABEL),
                "{path}"
            );
        }
    }

    #[test]
    fn an_unfinished_call_counts_as_cancelled() {
        let metrics = Metrics::new();
        drop(Observation::start(
            metrics.clone(),
            labels("pkg.Svc", "Method"),
        ));
        Observation::start(metrics.clone(), labels("pkg.Svc", "Method")).finish(b"5");
        let text = metrics.encode();
        assert!(text.contains(
            r#"grpc_server_handled_total{grpc_service="pkg.Svc",grpc_method="Method",grpc_code="CANCELLED"} 1"#
        ), "{text}");
        assert!(text.contains(r#"grpc_code="NOT_FOUND"} 1"#), "{text}");
        assert!(
            text.contains(
                r#"grpc_server_in_flight{grpc_service="pkg.Svc",grpc_method="Method"} 0"#
            ),
            "{text}"
        );
    }
}
