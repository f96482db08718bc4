//! What the tests and the benchmarks share (benches/common includes this file): the servers that
//! `scripts/test` and `scripts/bench` start and export as `SVC_TEST_*` variables, the trusted
//! caller header, and waiting for a service to be ready.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use svc_messaging::config::S3Settings;
use tonic::Request;

/// A variable `scripts/test` (or `scripts/bench`) exports: a tool's path or a server's address.
pub fn required_tool(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: run through scripts/test (or scripts/bench), which installs the \
             tools and starts the servers"
        )
    })
}

/// The test bucket on the S3 server that scripts/test (or scripts/bench) starts.
pub fn test_s3_settings() -> S3Settings {
    S3Settings {
        endpoint: Some(required_tool("SVC_TEST_S3_ENDPOINT")),
        region: required_tool("SVC_TEST_S3_REGION"),
        bucket: Some(required_tool("SVC_TEST_S3_BUCKET")),
        access_key_id: Some(required_tool("SVC_TEST_S3_ACCESS_KEY_ID")),
        secret_access_key: Some(secrecy::SecretString::from(required_tool(
            "SVC_TEST_S3_SECRET_ACCESS_KEY",
        ))),
        force_path_style: true,
        manage_lifecycle: false,
        ..Default::default()
    }
}

/// A request authenticated through the trusted `x-user-id` header (the default auth mode).
pub fn as_user<T>(user: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("x-user-id", user.parse().expect("ascii user id"));
    request
}

/// Polls `/readyz` until it answers 200 (every dependency reachable).
pub async fn wait_ready(http_addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let url = format!("http://{http_addr}/readyz");
    while Instant::now() < deadline {
        if let Ok(response) = reqwest::get(&url).await
            && response.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the service at {http_addr} did not become ready");
}
