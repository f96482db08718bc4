//! Authentication at the gRPC edge in `jwt` mode: every public RPC needs a valid bearer token;
//! health and reflection need none.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::{TestServer, reason};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use secrecy::SecretString;
use serde_json::json;
use svc_messaging::{
    config::AuthMode,
    grpc::pb::{self, file_relay_service_client::FileRelayServiceClient},
};
use tonic::{Code, Request};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

pub(crate) const SECRET: &str = "integration-test-secret-0123456789abcdef";
const ISSUER: &str = "https://id.example.test";
const AUDIENCE: &str = "svc-messaging";

pub(crate) async fn jwt_server() -> TestServer {
    TestServer::start_with(|settings| {
        settings.auth.mode = AuthMode::Jwt;
        settings.auth.jwt_secret = Some(SecretString::from(SECRET));
        settings.auth.issuer = Some(ISSUER.to_owned());
        settings.auth.audience = Some(AUDIENCE.to_owned());
        settings.auth.leeway = Duration::ZERO;
    })
    .await
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub(crate) fn token(claims: serde_json::Value, secret: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub(crate) fn claims(sub: &str, exp: u64) -> serde_json::Value {
    json!({"sub": sub, "exp": exp, "iss": ISSUER, "aud": AUDIENCE})
}

fn with_authorization(value: Option<&str>) -> Request<pb::GetUploadPolicyRequest> {
    let mut request = Request::new(pb::GetUploadPolicyRequest {});
    if let Some(value) = value {
        request
            .metadata_mut()
            .insert("authorization", value.parse().unwrap());
    }
    request
}

#[tokio::test]
async fn bad_credentials_are_unauthenticated_with_a_reason() {
    let server = jwt_server().await;
    let mut files = FileRelayServiceClient::new(server.channel().await);
    let expired = format!("Bearer {}", token(claims("alice", now() - 60), SECRET));
    let forged = format!(
        "Bearer {}",
        token(
            claims("alice", now() + 60),
            "someone-elses-secret-0123456789abcdef"
        )
    );
    let mut tampered = token(claims("alice", now() + 60), SECRET);
    // Swap the payload for one naming another user, keeping the original signature.
    let parts: Vec<&str> = tampered.split('.').collect();
    let other = token(claims("mallory", now() + 60), SECRET);
    let other_payload = other.split('.').nth(1).unwrap();
    tampered = format!("Bearer {}.{}.{}", parts[0], other_payload, parts[2]);
    let cases = [
        (None, "CREDENTIALS_MISSING"),
        (Some("Basic YWxpY2U6cGFzcw=="), "CREDENTIALS_MALFORMED"),
        (Some("Bearer"), "CREDENTIALS_MALFORMED"),
        (Some("Bearer not-a-jwt"), "CREDENTIALS_MALFORMED"),
        (Some(expired.as_str()), "TOKEN_EXPIRED"),
        (Some(forged.as_str()), "TOKEN_INVALID"),
        (Some(tampered.as_str()), "TOKEN_INVALID"),
    ];
    for (authorization, expected) in cases {
        let status = files
            .get_upload_policy(with_authorization(authorization))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{authorization:?}");
        assert_eq!(reason(&status), expected, "{authorization:?}");
        if let Some((_, credential)) = authorization.and_then(|value| value.split_once(' ')) {
            assert!(
                !status.message().contains(credential),
                "the credential must not be echoed: {}",
                status.message()
            );
        }
    }
}

#[tokio::test]
async fn the_trusted_header_is_ignored_in_jwt_mode() {
    let server = jwt_server().await;
    let mut files = FileRelayServiceClient::new(server.channel().await);
    let mut request = Request::new(pb::GetUploadPolicyRequest {});
    request
        .metadata_mut()
        .insert("x-user-id", "alice".parse().unwrap());
    let status = files.get_upload_policy(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn a_token_sent_twice_is_refused() {
    let server = jwt_server().await;
    let mut files = FileRelayServiceClient::new(server.channel().await);
    let alice = format!("Bearer {}", token(claims("alice", now() + 300), SECRET));
    let mallory = format!("Bearer {}", token(claims("mallory", now() + 300), SECRET));
    for second in [&mallory, &alice] {
        let mut request = with_authorization(Some(&alice));
        request
            .metadata_mut()
            .append("authorization", second.parse().unwrap());
        let status = files.get_upload_policy(request).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert_eq!(reason(&status), "CREDENTIALS_MALFORMED");
        assert!(status.message().contains("more than once"), "{status:?}");
    }
}

#[tokio::test]
async fn a_valid_token_is_accepted() {
    let server = jwt_server().await;
    let mut files = FileRelayServiceClient::new(server.channel().await);
    let bearer = format!("Bearer {}", token(claims("alice", now() + 300), SECRET));
    let policy = files
        .get_upload_policy(with_authorization(Some(&bearer)))
        .await
        .expect("a valid token passes")
        .into_inner();
    assert!(!policy.file_types.is_empty());
}

#[tokio::test]
async fn health_and_reflection_need_no_credentials() {
    let server = jwt_server().await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    health
        .check(HealthCheckRequest::default())
        .await
        .expect("health needs no token");

    use tonic_reflection::pb::v1alpha::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .expect("reflection needs no token")
        .into_inner();
    assert!(responses.message().await.unwrap().is_some());
}

#[tokio::test]
async fn es256_tokens_verify_against_the_configured_public_key() {
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
    let server = TestServer::start_with(|settings| {
        settings.auth.mode = AuthMode::Jwt;
        settings.auth.jwt_algorithm = svc_messaging::config::JwtAlgorithm::ES256;
        settings.auth.jwt_public_key_file = Some(format!("{data}/es256-public.pem").into());
        settings.auth.leeway = Duration::ZERO;
    })
    .await;
    let private = std::fs::read(format!("{data}/es256-private.pem")).unwrap();
    let key = EncodingKey::from_ec_pem(&private).unwrap();
    let signed = encode(
        &Header::new(Algorithm::ES256),
        &json!({"sub": "carol", "exp": now() + 60}),
        &key,
    )
    .unwrap();
    let mut files = FileRelayServiceClient::new(server.channel().await);
    files
        .get_upload_policy(with_authorization(Some(&format!("Bearer {signed}"))))
        .await
        .expect("an ES256 token signed by the matching key is accepted");
    // An HS256 token is refused even with a "secret" equal to the public key: no algorithm
    // confusion.
    let public = std::fs::read(format!("{data}/es256-public.pem")).unwrap();
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "carol", "exp": now() + 60}),
        &EncodingKey::from_secret(&public),
    )
    .unwrap();
    let status = files
        .get_upload_policy(with_authorization(Some(&format!("Bearer {confused}"))))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reason(&status), "TOKEN_INVALID");
}
