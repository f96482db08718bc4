//! The server as a whole: health over gRPC and HTTP, reflection, metrics, authentication at the
//! edge, the not-yet-built RPCs, and graceful shutdown.

use std::time::Duration;

use crate::support::{TestServer, as_user, reason};
use futures::StreamExt;
use prost::Message;
use svc_messaging::grpc::pb::{self, file_relay_service_client::FileRelayServiceClient};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

const SERVICES: [&str; 3] = [
    "",
    "messaging.v1.MessagingService",
    "messaging.v1.FileRelayService",
];

async fn check(
    health: &mut HealthClient<tonic::transport::Channel>,
    service: &str,
) -> ServingStatus {
    let response = health
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .expect("health check")
        .into_inner();
    ServingStatus::try_from(response.status).unwrap()
}

#[tokio::test]
async fn health_check_reports_every_service_without_credentials() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in SERVICES {
        assert_eq!(
            check(&mut health, service).await,
            ServingStatus::Serving,
            "{service:?}"
        );
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "nope.v1.Nothing".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
}

/// Next status on a Watch stream, failing the test after a few seconds.
async fn next_status(
    stream: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) -> ServingStatus {
    let response = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("a health update within 5s")
        .expect("stream open")
        .expect("no error");
    ServingStatus::try_from(response.status).unwrap()
}

#[tokio::test]
async fn health_follows_a_dependency_down_and_back_up() {
    let server = TestServer::start().await;
    let blob_root = server.data_dir.path().join("blobs");
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "messaging.v1.FileRelayService".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);

    // Break the blob store: its root becomes a plain file, so nothing can be written under it.
    std::fs::remove_dir_all(&blob_root).unwrap();
    std::fs::write(&blob_root, b"not a directory").unwrap();
    assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing);
    let readyz = reqwest::get(server.http_url("/readyz")).await.unwrap();
    assert_eq!(readyz.status(), 503);
    let http_health =
        reqwest::get(server.http_url("/v1/health?service=messaging.v1.MessagingService"))
            .await
            .unwrap();
    assert_eq!(http_health.status(), 503);
    assert_eq!(
        http_health.json::<serde_json::Value>().await.unwrap(),
        serde_json::json!({"status": "NOT_SERVING"})
    );
    // Liveness is about the process, not its dependencies.
    assert_eq!(
        reqwest::get(server.http_url("/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );

    // Repair it: the service recovers without a restart.
    std::fs::remove_file(&blob_root).unwrap();
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);
    assert_eq!(check(&mut health, "").await, ServingStatus::Serving);
    assert_eq!(
        reqwest::get(server.http_url("/readyz"))
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn http_probes_answer_like_grpc_gateway() {
    let server = TestServer::start().await;
    let healthz = reqwest::get(server.http_url("/healthz")).await.unwrap();
    assert_eq!(healthz.status(), 200);
    let readyz = reqwest::get(server.http_url("/readyz")).await.unwrap();
    assert_eq!(readyz.status(), 200);
    for service in SERVICES {
        let response = reqwest::get(server.http_url(&format!("/v1/health?service={service}")))
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{service:?}");
        assert_eq!(
            response.json::<serde_json::Value>().await.unwrap(),
            serde_json::json!({"status": "SERVING"})
        );
    }
    let plain = reqwest::get(server.http_url("/v1/health")).await.unwrap();
    assert_eq!(plain.status(), 200);
    let unknown = reqwest::get(server.http_url("/v1/health?service=nope.v1.Nothing"))
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        unknown.json::<serde_json::Value>().await.unwrap()["code"],
        5
    );
}

#[tokio::test]
async fn metrics_count_rpcs_by_method_and_code() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    check(&mut health, "").await;
    check(&mut health, "").await;
    let mut files = FileRelayServiceClient::new(channel);
    let status = files
        .get_file(as_user("alice", pb::GetFileRequest::default()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    let response = reqwest::get(server.http_url("/metrics")).await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(
        text.contains(r#"grpc_server_handled_total{grpc_service="grpc.health.v1.Health",grpc_method="Check",grpc_code="OK"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"grpc_service="messaging.v1.FileRelayService",grpc_method="GetFile",grpc_code="INVALID_ARGUMENT"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("grpc_server_handling_seconds_bucket"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE grpc_server_in_flight gauge"),
        "{text}"
    );
}

/// Number of sample lines (series) in a Prometheus text exposition.
fn series_count(text: &str) -> usize {
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .count()
}

#[tokio::test]
async fn made_up_paths_share_one_unknown_series() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    check(&mut health, "").await;
    let mut grpc = tonic::client::Grpc::new(channel);
    // Warm-up: the first unknown calls create the shared `unknown` series (one per status code).
    let call_made_up = |index: usize| {
        let path = if index.is_multiple_of(2) {
            format!("/attacker.Service{index}/Method{index}")
        } else {
            // A served service with a made-up method, and no credentials either way.
            format!("/messaging.v1.MessagingService/Nope{index}")
        };
        http::uri::PathAndQuery::try_from(path).unwrap()
    };
    for (index, code) in [(0, Code::Unimplemented), (1, Code::Unauthenticated)] {
        grpc.ready().await.unwrap();
        let status = grpc
            .unary::<(), (), _>(
                tonic::Request::new(()),
                call_made_up(index),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), code);
    }
    let metrics = || async {
        reqwest::get(server.http_url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let before = metrics().await;

    for index in 2..300 {
        grpc.ready().await.unwrap();
        let status = grpc
            .unary::<(), (), _>(
                tonic::Request::new(()),
                call_made_up(index),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(status.code(), Code::Unimplemented | Code::Unauthenticated),
            "{status:?}"
        );
    }

    let after = metrics().await;
    assert_eq!(
        series_count(&after),
        series_count(&before),
        "made-up paths must not create series:\n{after}"
    );
    assert!(!after.contains("attacker"), "{after}");
    assert!(!after.contains("Nope"), "{after}");
    let unknown_calls: u64 = after
        .lines()
        .filter(|line| {
            line.starts_with(
                r#"grpc_server_handled_total{grpc_service="unknown",grpc_method="unknown","#,
            )
        })
        .map(|line| line.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(unknown_calls, 300, "{after}");
    // Served methods keep their own labels.
    assert!(
        after.contains(r#"grpc_server_handled_total{grpc_service="grpc.health.v1.Health",grpc_method="Check",grpc_code="OK"} 1"#),
        "{after}"
    );
}

#[tokio::test]
async fn metrics_show_open_streams_in_flight() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    next_status(&mut watch).await;
    let text = reqwest::get(server.http_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(
            r#"grpc_server_in_flight{grpc_service="grpc.health.v1.Health",grpc_method="Watch"} 1"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn public_rpcs_require_credentials() {
    let server = TestServer::start().await;
    let mut files = FileRelayServiceClient::new(server.channel().await);
    let status = files
        .get_upload_policy(pb::GetUploadPolicyRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reason(&status), "CREDENTIALS_MISSING");
}

#[tokio::test]
async fn a_user_id_sent_twice_is_refused() {
    let server = TestServer::start().await;
    let mut files = FileRelayServiceClient::new(server.channel().await);
    // Both orders: neither the first nor the last copy may win.
    for (first, second) in [
        ("alice", "mallory"),
        ("mallory", "alice"),
        ("alice", "alice"),
    ] {
        let mut request = as_user(first, pb::GetUploadPolicyRequest {});
        request
            .metadata_mut()
            .append("x-user-id", second.parse().unwrap());
        let status = files.get_upload_policy(request).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{first}, {second}");
        assert_eq!(reason(&status), "CREDENTIALS_MALFORMED");
    }
    // One copy still works.
    files
        .get_upload_policy(as_user("alice", pb::GetUploadPolicyRequest {}))
        .await
        .expect("a single x-user-id is accepted");
}

#[tokio::test]
async fn upload_policy_reports_the_configured_types_and_limits() {
    let server = TestServer::start_with(|settings| {
        settings.uploads.image_types = vec!["image/png".to_owned(), "image/jpeg".to_owned()];
        settings.uploads.image_max_size = bytesize::ByteSize::mib(5);
    })
    .await;
    let mut files = FileRelayServiceClient::new(server.channel().await);
    let policy = files
        .get_upload_policy(as_user("alice", pb::GetUploadPolicyRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(policy.file_types.len(), 9 + 2);
    let pdf = policy
        .file_types
        .iter()
        .find(|rule| rule.mime_type == "application/pdf")
        .unwrap();
    assert_eq!(pdf.max_size_bytes, 50 * 1024 * 1024);
    assert_eq!(pdf.category(), pb::FileCategory::Document);
    assert_eq!(pdf.extensions, ["pdf"]);
    let jpeg = policy
        .file_types
        .iter()
        .find(|rule| rule.mime_type == "image/jpeg")
        .unwrap();
    assert_eq!(jpeg.max_size_bytes, 5 * 1024 * 1024);
    assert_eq!(jpeg.extensions, ["jpg", "jpeg"]);
    assert!(
        policy
            .file_types
            .iter()
            .all(|rule| rule.mime_type != "image/gif")
    );
    assert_eq!(policy.retention.unwrap().seconds, 7 * 24 * 3600);
    assert_eq!(policy.max_chunk_bytes, 1024 * 1024);
}

mod reflection {
    use super::*;
    use tonic_reflection::pb::{v1, v1alpha};

    const EXPECTED: [&str; 5] = [
        "messaging.v1.MessagingService",
        "messaging.v1.FileRelayService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];

    #[tokio::test]
    async fn v1alpha_lists_services_and_serves_commented_descriptors() {
        use v1alpha::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let server = TestServer::start().await;
        let mut client = ServerReflectionClient::new(server.channel().await);
        let requests = [
            MessageRequest::ListServices(String::new()),
            MessageRequest::FileContainingSymbol("messaging.v1.MessagingService".to_owned()),
            MessageRequest::FileContainingSymbol("grpc.health.v1.Health".to_owned()),
        ]
        .map(|message| v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(message),
        });
        let mut responses = client
            .server_reflection_info(futures::stream::iter(requests))
            .await
            .unwrap()
            .into_inner();

        let Some(MessageResponse::ListServicesResponse(list)) =
            responses.next().await.unwrap().unwrap().message_response
        else {
            panic!("expected a service list");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        for expected in EXPECTED {
            assert!(
                names.contains(&expected),
                "{expected} missing from {names:?}"
            );
        }

        let Some(MessageResponse::FileDescriptorResponse(files)) =
            responses.next().await.unwrap().unwrap().message_response
        else {
            panic!("expected file descriptors");
        };
        let messaging_file = files
            .file_descriptor_proto
            .iter()
            .map(|bytes| prost_types::FileDescriptorProto::decode(bytes.as_slice()).unwrap())
            .find(|file| file.name() == "messaging/v1/messaging.proto")
            .expect("messaging.proto served");
        let service = &messaging_file.service[0];
        assert_eq!(service.name(), "MessagingService");
        assert_eq!(service.method.len(), 10);
        let commented = messaging_file
            .source_code_info
            .as_ref()
            .expect("source info kept for describe")
            .location
            .iter()
            .filter(|location| !location.leading_comments().trim().is_empty())
            .count();
        assert!(commented > 20, "only {commented} commented elements");

        let Some(MessageResponse::FileDescriptorResponse(health_files)) =
            responses.next().await.unwrap().unwrap().message_response
        else {
            panic!("expected the health descriptors");
        };
        assert!(!health_files.file_descriptor_proto.is_empty());
    }

    #[tokio::test]
    async fn v1_lists_services() {
        use v1::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let server = TestServer::start().await;
        let mut client = ServerReflectionClient::new(server.channel().await);
        let request = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = client
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            responses.next().await.unwrap().unwrap().message_response
        else {
            panic!("expected a service list");
        };
        let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
        for expected in EXPECTED {
            assert!(
                names.contains(&expected),
                "{expected} missing from {names:?}"
            );
        }
    }

    #[tokio::test]
    async fn grpcurl_lists_and_describes_the_contract() {
        let grpcurl = crate::support::required_tool("SVC_TEST_GRPCURL");
        let server = TestServer::start().await;
        let addr = server.grpc_addr.to_string();
        let run = |args: &[&str]| {
            let args: Vec<String> = args.iter().map(|arg| (*arg).to_owned()).collect();
            let output = tokio::process::Command::new(&grpcurl)
                .arg("-plaintext")
                .args(&args)
                .output();
            async move {
                let output = output.await.expect("run grpcurl");
                assert!(
                    output.status.success(),
                    "grpcurl {args:?}: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
                String::from_utf8(output.stdout).unwrap()
            }
        };
        let listed = run(&[&addr, "list"]).await;
        for expected in EXPECTED {
            assert!(
                listed.contains(expected),
                "{expected} missing from {listed}"
            );
        }
        let described = run(&[&addr, "describe", "messaging.v1.MessagingService"]).await;
        assert!(described.contains("rpc SendMessage"), "{described}");
        assert!(described.contains("//"), "comments missing: {described}");
        let message = run(&[&addr, "describe", "messaging.v1.Message"]).await;
        assert!(message.contains("client_message_id"), "{message}");
        let health = run(&[
            "-d",
            r#"{"service":""}"#,
            &addr,
            "grpc.health.v1.Health/Check",
        ])
        .await;
        assert!(health.contains("SERVING"), "{health}");
        let policy = run(&[
            "-H",
            "x-user-id: alice",
            &addr,
            "messaging.v1.FileRelayService/GetUploadPolicy",
        ])
        .await;
        assert!(policy.contains("application/pdf"), "{policy}");
    }

    /// A malformed field, as grpcurl prints it: the ErrorInfo and BadRequest details decoded
    /// through reflection, not "google.rpc.ErrorInfo is not recognized".
    #[tokio::test]
    async fn grpcurl_prints_error_details_decoded() {
        let grpcurl = crate::support::required_tool("SVC_TEST_GRPCURL");
        let server = TestServer::start().await;
        let addr = server.grpc_addr.to_string();
        let request = r#"{"conversation_id":"","client_message_id":"m-1","text":"hi"}"#;
        let output = tokio::process::Command::new(&grpcurl)
            .args(["-plaintext", "-format-error", "-H", "x-user-id: alice"])
            .args([
                "-d",
                request,
                &addr,
                "messaging.v1.MessagingService/SendMessage",
            ])
            .output()
            .await
            .expect("run grpcurl");
        let printed = String::from_utf8_lossy(&output.stderr);
        // grpcurl exits 64 + the status code.
        assert_eq!(output.status.code(), Some(64 + 3), "{printed}");
        let status: serde_json::Value =
            serde_json::from_str(&printed).unwrap_or_else(|error| panic!("{error}: {printed}"));
        assert_eq!(status["code"], 3, "{status}");
        let details = status["details"].as_array().expect("details");
        let detail = |kind: &str| {
            details
                .iter()
                .find(|detail| detail["@type"] == format!("type.googleapis.com/google.rpc.{kind}"))
                .unwrap_or_else(|| panic!("no {kind} in {status}"))
        };
        assert_eq!(detail("ErrorInfo")["reason"], "INVALID_FIELD", "{status}");
        assert_eq!(detail("ErrorInfo")["domain"], "messaging.v1", "{status}");
        let violation = &detail("BadRequest")["fieldViolations"][0];
        assert_eq!(violation["field"], "conversation_id", "{status}");
        assert_eq!(
            violation["description"], "conversation_id is required",
            "{status}"
        );

        // The other details the service sends are described too, and none of it is a service.
        for kind in ["RetryInfo", "QuotaFailure", "ErrorInfo", "BadRequest"] {
            let output = tokio::process::Command::new(&grpcurl)
                .args([
                    "-plaintext",
                    &addr,
                    "describe",
                    &format!("google.rpc.{kind}"),
                ])
                .output()
                .await
                .expect("run grpcurl");
            let described = String::from_utf8_lossy(&output.stdout);
            assert!(
                described.contains(&format!("message {kind} {{")),
                "{kind}: {described}{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let listed = tokio::process::Command::new(&grpcurl)
            .args(["-plaintext", &addr, "list"])
            .output()
            .await
            .expect("run grpcurl");
        let listed = String::from_utf8_lossy(&listed.stdout);
        assert!(!listed.contains("google.rpc"), "{listed}");
    }

    /// `buf curl` names the details' types; it decodes error details only from types compiled
    /// into it, never through reflection, so their values stay base64 (decoded here).
    #[tokio::test]
    async fn buf_curl_names_the_error_details() {
        use base64::Engine;
        let buf = crate::support::required_tool("SVC_TEST_BUF");
        let server = TestServer::start().await;
        let url = format!(
            "http://{}/messaging.v1.MessagingService/SendMessage",
            server.grpc_addr
        );
        let output = tokio::process::Command::new(&buf)
            .args(["curl", "--protocol", "grpc", "--http2-prior-knowledge"])
            .args(["-H", "x-user-id: alice"])
            .args([
                "-d",
                r#"{"conversation_id":"","client_message_id":"m-1","text":"hi"}"#,
            ])
            .arg(&url)
            .output()
            .await
            .expect("run buf curl");
        let printed = String::from_utf8_lossy(&output.stderr);
        let status: serde_json::Value =
            serde_json::from_str(&printed).unwrap_or_else(|error| panic!("{error}: {printed}"));
        assert_eq!(status["code"], "invalid_argument", "{status}");
        let details = status["details"].as_array().expect("details");
        let value = |kind: &str| {
            let detail = details
                .iter()
                .find(|detail| detail["type"] == format!("google.rpc.{kind}"))
                .unwrap_or_else(|| panic!("no {kind} in {status}"));
            base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(
                    detail["value"]
                        .as_str()
                        .expect("a value")
                        .trim_end_matches('='),
                )
                .expect("base64")
        };
        let info = tonic_types::pb::ErrorInfo::decode(value("ErrorInfo").as_slice()).unwrap();
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("INVALID_FIELD", "messaging.v1")
        );
        let bad_request =
            tonic_types::pb::BadRequest::decode(value("BadRequest").as_slice()).unwrap();
        assert_eq!(bad_request.field_violations[0].field, "conversation_id");
    }
}

#[tokio::test]
async fn graceful_shutdown_drains_then_cancels_open_streams() {
    let mut server = TestServer::start_with(|settings| {
        settings.server.shutdown_grace = Duration::from_millis(1500);
    })
    .await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    let mut watch = health
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);

    let started = std::time::Instant::now();
    let run = server.begin_shutdown();
    // The open stream sees the server turn NOT_SERVING first ...
    assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing);
    // ... no new connections are accepted ...
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tokio::net::TcpStream::connect(server.grpc_addr)
            .await
            .is_err(),
        "new connections must be refused while draining"
    );
    // ... and the stream still open after the grace period is ended, then the server stops.
    let end = tokio::time::timeout(Duration::from_secs(6), watch.next())
        .await
        .expect("the stream ends after the grace period");
    match end {
        Some(Err(status)) => {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert_eq!(status.message(), "server is shutting down");
        }
        other => panic!("expected UNAVAILABLE after the grace period, got {other:?}"),
    }
    let outcome = tokio::time::timeout(Duration::from_secs(6), run)
        .await
        .expect("the server stops")
        .unwrap();
    assert!(outcome.is_ok(), "{outcome:?}");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1400),
        "stopped before the grace: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(6), "took {elapsed:?}");
}

// ---------------------------------------------------------------------------------------------
// Transport limits: connections, the time to send the preface, streams per connection, header
// and message sizes.

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits until the server closes `socket` (a read returns end-of-file or an error), at most
/// `limit`; true when it did.
async fn closed_by_server(socket: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // The server's SETTINGS frame and the like: keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

async fn metric(server: &TestServer, name: &str) -> f64 {
    let text = reqwest::get(server.http_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in {text}"))
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_at_once() {
    let server = TestServer::start_with(|settings| {
        settings.server.max_connections = 2;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut socket = tokio::net::TcpStream::connect(server.grpc_addr)
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut socket, PREFACE)
            .await
            .unwrap();
        held.push(socket);
    }
    // Let the server accept both before the third arrives.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = tokio::net::TcpStream::connect(server.grpc_addr)
        .await
        .unwrap();
    assert!(
        closed_by_server(&mut third, Duration::from_secs(2)).await,
        "a connection over server.max_connections must be closed"
    );
    assert!(metric(&server, "grpc_server_connections_refused_total").await >= 1.0);
    assert_eq!(metric(&server, "grpc_server_connections").await, 2.0);
    // A gRPC client over the limit fails fast with RESOURCE_EXHAUSTED (it may back off or try
    // another replica)...
    let status = tokio::time::timeout(Duration::from_secs(5), async {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr))
                .unwrap()
                .connect_lazy();
        HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
    })
    .await
    .expect("the refusal is immediate")
    .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // ...and is served again once a slot is free.
    held.pop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut health = HealthClient::new(server.channel().await);
    assert_eq!(check(&mut health, "").await, ServingStatus::Serving);
}

#[tokio::test]
async fn a_connection_that_does_not_send_the_preface_in_time_is_closed() {
    let server = TestServer::start_with(|settings| {
        settings.server.handshake_timeout = Duration::from_millis(300);
    })
    .await;
    // Silent.
    let mut silent = tokio::net::TcpStream::connect(server.grpc_addr)
        .await
        .unwrap();
    // Trickling: one byte of the preface every 100 ms never completes it in 300 ms.
    let mut trickle = tokio::net::TcpStream::connect(server.grpc_addr)
        .await
        .unwrap();
    let trickler = tokio::spawn(async move {
        for byte in PREFACE {
            if tokio::io::AsyncWriteExt::write_all(&mut trickle, &[*byte])
                .await
                .is_err()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        closed_by_server(&mut trickle, Duration::from_secs(1)).await
    });
    let started = std::time::Instant::now();
    assert!(closed_by_server(&mut silent, Duration::from_secs(3)).await);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    assert!(
        trickler.await.unwrap(),
        "a trickling handshake must be cut off"
    );
    assert!(metric(&server, "grpc_server_handshake_timeouts_total").await >= 2.0);
    // A real client is not affected, also after the timeout has passed on its connection.
    let mut health = HealthClient::new(server.channel().await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(check(&mut health, "").await, ServingStatus::Serving);
    assert_eq!(metric(&server, "grpc_server_connections").await, 1.0);
}

#[tokio::test]
async fn streams_per_connection_are_capped() {
    let server = TestServer::start_with(|settings| {
        settings.server.max_concurrent_streams = 2;
    })
    .await;
    let mut health = HealthClient::new(server.channel().await);
    let mut first = health
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    let second = health
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    next_status(&mut first).await;
    // The third call on the same connection waits for a free stream...
    let mut third = health.clone();
    let waiting = tokio::spawn(async move { third.check(HealthCheckRequest::default()).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a third stream must not open while two are open"
    );
    // ...and proceeds as soon as one ends.
    drop(second);
    let response = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the third call proceeds once a stream is free")
        .unwrap()
        .unwrap();
    assert_eq!(response.into_inner().status, ServingStatus::Serving as i32);
}

#[tokio::test]
async fn oversized_metadata_and_messages_are_refused() {
    let server = TestServer::start_with(|settings| {
        settings.server.max_header_list_size = bytesize::ByteSize::kib(8);
    })
    .await;
    let channel = server.channel().await;
    let mut files = FileRelayServiceClient::new(channel.clone());
    let mut request = as_user("alice", pb::GetUploadPolicyRequest {});
    request
        .metadata_mut()
        .insert("x-padding", "p".repeat(16 * 1024).parse().unwrap());
    let status = files.get_upload_policy(request).await.unwrap_err();
    assert_ne!(status.code(), Code::Ok);
    // The connection and the server go on serving normal requests.
    let mut files = FileRelayServiceClient::new(server.channel().await);
    files
        .get_upload_policy(as_user("alice", pb::GetUploadPolicyRequest {}))
        .await
        .expect("a normal request is served");

    // A request message over server.max_request_bytes (256 KiB by default).
    let mut messaging =
        pb::messaging_service_client::MessagingServiceClient::new(server.channel().await);
    let status = messaging
        .send_message(as_user(
            "alice",
            pb::SendMessageRequest {
                conversation_id: uuid::Uuid::now_v7().to_string(),
                client_message_id: "big".to_owned(),
                content: Some(pb::send_message_request::Content::Text(
                    "x".repeat(300 * 1024),
                )),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
}

/// A client that makes the server reset stream after stream ("MadeYouReset": here a zero
/// window increment, a stream error the server answers with RST_STREAM) is sent a GOAWAY after
/// the limit instead of costing the server work forever.
#[tokio::test]
async fn a_client_that_makes_the_server_reset_streams_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start().await;
    let mut socket = tokio::net::TcpStream::connect(server.grpc_addr)
        .await
        .unwrap();
    socket.set_nodelay(true).unwrap();
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend_from_slice(&[kind, flags]);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    };
    // HPACK, literals without indexing: POST, http, :path, content-type: application/grpc.
    let path = b"/grpc.health.v1.Health/Watch";
    let mut headers = vec![0x83, 0x86, 0x04, path.len() as u8];
    headers.extend_from_slice(path);
    headers.extend_from_slice(&[0x0f, 0x10, 16]);
    headers.extend_from_slice(b"application/grpc");
    // A connection-specific header makes the request malformed: the server resets the stream.
    headers.extend_from_slice(&[0x00, 10]);
    headers.extend_from_slice(b"connection");
    headers.extend_from_slice(&[5]);
    headers.extend_from_slice(b"close");
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(0x4, 0, 0, &[]));
    socket.write_all(&hello).await.unwrap();

    // Read everything the server sends, looking for a GOAWAY (type 7).
    let (mut reader, mut writer) = socket.into_split();
    let goaway = tokio::spawn(async move {
        let mut buffer = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        loop {
            let mut offset = 0;
            while buffer.len() >= offset + 9 {
                let length =
                    u32::from_be_bytes([0, buffer[offset], buffer[offset + 1], buffer[offset + 2]])
                        as usize;
                if buffer[offset + 3] == 0x7 && buffer.len() >= offset + 17 {
                    let code = &buffer[offset + 13..offset + 17];
                    return Some(u32::from_be_bytes([code[0], code[1], code[2], code[3]]));
                }

                offset += 9 + length;
            }
            match reader.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(read) => buffer.extend_from_slice(&chunk[..read]),
            }
        }
    });
    let mut sent = 0u32;
    for index in 0..2000u32 {
        let stream = 2 * index + 1;
        let frames = frame(0x1, 0x4 | 0x1, stream, &headers);
        if writer.write_all(&frames).await.is_err() {
            break;
        }
        sent += 1;
        if goaway.is_finished() {
            break;
        }
    }
    // Without the limit the server resets all 2000 streams and never sends a GOAWAY.
    let goaway_code = tokio::time::timeout(Duration::from_secs(10), goaway)
        .await
        .ok()
        .and_then(Result::unwrap);
    assert_eq!(
        goaway_code,
        Some(0xb),
        "a GOAWAY ENHANCE_YOUR_CALM after the reset limit ({sent} streams sent)"
    );
    // Everyone else is still served.
    let mut health = HealthClient::new(server.channel().await);
    assert_eq!(check(&mut health, "").await, ServingStatus::Serving);
}
