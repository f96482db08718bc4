//! How callers and the service itself reach S3 in a real deployment, against the real Garage
//! that scripts/test starts:
//!
//! - download URLs are presigned for `s3.public_endpoint` (the host callers can reach), and a URL
//!   signed for one host name is refused when opened through another, which is why the option
//!   exists;
//! - with `s3.credentials = "chain"` the service finds its keys the AWS way: from
//!   `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, from a web identity token exchanged at STS (EKS
//!   IRSA; STS is a stand-in here), from a container credentials endpoint (as on ECS and EKS Pod
//!   Identity); when no source has any, start-up fails naming the sources, and when one fails
//!   for now the service runs not ready, its health check naming the credential error.

use std::{
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use svc_messaging::{grpc::pb, store::blobs::BlobStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::cloud::*;
use crate::support::{
    ServiceProcess, TestServer, create_conversation, required_tool, test_s3_settings, unique_prefix,
};

/// The test server's S3 endpoint with its host name swapped: `127.0.0.1` <-> `localhost`. Both
/// reach the same Garage, as an in-cluster name and an ingress name reach the same server.
fn other_host_name(endpoint: &str) -> String {
    let mut url = url::Url::parse(endpoint).unwrap();
    let other = match url.host_str() {
        Some("127.0.0.1") => "localhost",
        Some("localhost") => "127.0.0.1",
        host => panic!("the test S3 endpoint's host is {host:?}, expected 127.0.0.1 or localhost"),
    };
    url.set_host(Some(other)).unwrap();
    url.as_str().trim_end_matches('/').to_owned()
}

fn with_host(url: &str, host: &str) -> String {
    let mut url = url::Url::parse(url).unwrap();
    url.set_host(Some(host)).unwrap();
    url.to_string()
}

/// Uploads `body` as a PDF into a new conversation and returns the file.
async fn upload_pdf(channel: tonic::transport::Channel, body: &Bytes) -> (String, pb::FileInfo) {
    let mut messaging = Messaging::new(channel.clone());
    let mut files = Files::new(channel);
    let conversation_id = create_conversation(&mut messaging, "alice", &["bob"]).await;
    let uploaded = upload(
        &mut files,
        "alice",
        metadata(
            &conversation_id,
            "report.pdf",
            "application/pdf",
            body,
            true,
        ),
        body,
    )
    .await
    .expect("upload")
    .file
    .expect("file info");
    (conversation_id, uploaded)
}

#[tokio::test]
async fn download_urls_are_signed_for_the_public_endpoint_and_only_work_there() {
    let internal = required_tool("SVC_TEST_S3_ENDPOINT");
    let public = other_host_name(&internal);
    let public_host = url::Url::parse(&public)
        .unwrap()
        .host_str()
        .unwrap()
        .to_owned();
    let internal_host = url::Url::parse(&internal)
        .unwrap()
        .host_str()
        .unwrap()
        .to_owned();
    let key_prefix = unique_prefix("public-endpoint");
    let server = TestServer::start_with(|settings| {
        use_cloud(settings, &key_prefix);
        settings.s3.public_endpoint = Some(public.clone());
    })
    .await;
    let body = Bytes::from(pdf(300_000));
    let (conversation_id, file) = upload_pdf(server.channel().await, &body).await;

    let mut files = Files::new(server.channel().await);
    let url = download_url(&mut files, "bob", &file.file_id).await;
    let parsed = url::Url::parse(&url).unwrap();
    assert_eq!(parsed.host_str(), Some(public_host.as_str()), "{url}");
    assert_eq!(
        parsed.port_or_known_default(),
        url::Url::parse(&public).unwrap().port_or_known_default()
    );
    let fetched = reqwest::get(&url).await.unwrap();
    assert_eq!(fetched.status(), 200, "{url}");
    assert_eq!(fetched.bytes().await.unwrap(), body, "the bytes uploaded");

    // The same URL opened through the service's own host name: the signature covers the Host
    // header, so the server refuses it.
    let through_internal = with_host(&url, &internal_host);
    let refused = reqwest::get(&through_internal).await.unwrap();
    assert_eq!(refused.status(), 403, "{through_internal}");
    // What the service presigned before `s3.public_endpoint` existed: a URL for its own
    // endpoint, which a caller can only reach through another name (an ingress), where it fails.
    let key = format!("files/{conversation_id}/{}", file.file_id);
    let internal_url = s3_store(&test_s3_settings())
        .download_url(&key, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        url::Url::parse(&internal_url).unwrap().host_str(),
        Some(internal_host.as_str())
    );
    assert_eq!(reqwest::get(&internal_url).await.unwrap().status(), 200);
    let rerouted = with_host(&internal_url, &public_host);
    let refused = reqwest::get(&rerouted).await.unwrap();
    assert_eq!(refused.status(), 403, "{rerouted}");
    // AWS answers SignatureDoesNotMatch, Garage AccessDenied "Invalid signature".
    let answer = refused.text().await.unwrap();
    assert!(
        answer.contains("SignatureDoesNotMatch") || answer.contains("Invalid signature"),
        "{answer}"
    );
}

// ---------------------------------------------------------------------------------------------
// The AWS default credential chain, with the service as a real process (the chain reads the
// process environment).

/// The environment of a service on the test Redis and bucket with `s3.credentials = "chain"` and
/// no static keys; `HOME` is an empty directory, so no shared profile is found, and instance
/// metadata is switched off so that a CI runner on EC2 does not lend its own role.
fn chain_env(key_prefix: &str, home: &std::path::Path) -> Vec<(String, String)> {
    [
        ("SVC_MESSAGING__STORAGE__MESSAGES", "redis".to_owned()),
        (
            "SVC_MESSAGING__REDIS__URL",
            required_tool("SVC_TEST_REDIS_URL"),
        ),
        ("SVC_MESSAGING__REDIS__KEY_PREFIX", key_prefix.to_owned()),
        ("SVC_MESSAGING__STORAGE__BLOBS", "s3".to_owned()),
        (
            "SVC_MESSAGING__S3__ENDPOINT",
            required_tool("SVC_TEST_S3_ENDPOINT"),
        ),
        (
            "SVC_MESSAGING__S3__REGION",
            required_tool("SVC_TEST_S3_REGION"),
        ),
        (
            "SVC_MESSAGING__S3__BUCKET",
            required_tool("SVC_TEST_S3_BUCKET"),
        ),
        ("SVC_MESSAGING__S3__FORCE_PATH_STYLE", "true".to_owned()),
        ("SVC_MESSAGING__S3__CREDENTIALS", "chain".to_owned()),
        (
            "SVC_MESSAGING__SERVER__HEALTH_CHECK_INTERVAL",
            "100ms".to_owned(),
        ),
        ("SVC_MESSAGING__LOG__LEVEL", "debug".to_owned()),
        ("HOME", home.display().to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), value))
    .collect()
}

/// Starts the binary off the test's runtime thread: its start-up asks the credentials endpoint,
/// which this runtime serves, while `ServiceProcess::spawn` blocks until the service is serving.
async fn spawn(env: &[(String, String)]) -> ServiceProcess {
    let env = env.to_vec();
    tokio::task::spawn_blocking(move || {
        let pairs: Vec<(&str, &str)> = env
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        ServiceProcess::spawn(&pairs)
    })
    .await
    .unwrap()
}

async fn channel_to(service: &ServiceProcess) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{}", service.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Uploads through the service, reads the file back through the service (GetObject with its
/// credentials) and through a presigned URL (signed with them), byte for byte.
async fn assert_round_trip(service: &ServiceProcess) {
    let channel = channel_to(service).await;
    let body = Bytes::from(pdf(200_000));
    let (_, file) = upload_pdf(channel.clone(), &body).await;
    let mut files = Files::new(channel);
    assert_eq!(download(&mut files, "bob", &file.file_id).await, body);
    let url = download_url(&mut files, "bob", &file.file_id).await;
    let fetched = reqwest::get(&url).await.unwrap();
    assert_eq!(fetched.status(), 200, "{url}");
    assert_eq!(fetched.bytes().await.unwrap(), body);
}

async fn stop(mut service: ServiceProcess) -> String {
    service.signal("TERM");
    tokio::task::spawn_blocking(move || {
        service.wait_exit(Duration::from_secs(10));
        service.output()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn chain_credentials_from_environment_variables_reach_s3() {
    let home = tempfile::tempdir().unwrap();
    let secret = required_tool("SVC_TEST_S3_SECRET_ACCESS_KEY");
    let mut env = chain_env(&unique_prefix("chain-env"), home.path());
    env.push((
        "AWS_ACCESS_KEY_ID".to_owned(),
        required_tool("SVC_TEST_S3_ACCESS_KEY_ID"),
    ));
    env.push(("AWS_SECRET_ACCESS_KEY".to_owned(), secret.clone()));
    let service = spawn(&env).await;
    assert_round_trip(&service).await;
    let output = stop(service).await;
    assert!(
        output.contains("s3 credentials from the AWS default chain"),
        "{output}"
    );
    assert!(
        !output.contains(&secret),
        "the secret key leaked:\n{output}"
    );
}

/// A credentials server: a container credentials endpoint (what ECS and EKS Pod Identity run
/// next to the pod) or an STS stand-in. Answers every request with `status` and `body` of
/// `content_type`, and records each request's line, Authorization header and body.
struct CredentialsEndpoint {
    url: String,
    requests: Arc<Mutex<Vec<CredentialsRequest>>>,
}

/// What the credentials server was asked.
#[derive(Debug, Clone)]
struct CredentialsRequest {
    line: String,
    authorization: Option<String>,
    body: String,
}

impl CredentialsEndpoint {
    async fn start(status: u16, body: String) -> Self {
        Self::start_with(status, "application/json", body).await
    }

    async fn start_with(status: u16, content_type: &'static str, body: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://{}/v2/credentials/test",
            listener.local_addr().unwrap()
        );
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let request = read_request(&mut socket).await;
                seen.lock().unwrap().push(request);
                let response = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            }
        });
        Self { url, requests }
    }

    /// The server's root (`http://127.0.0.1:PORT`), e.g. for an STS endpoint override.
    fn root(&self) -> String {
        let url = url::Url::parse(&self.url).unwrap();
        format!("http://{}", url.authority())
    }
}

/// One HTTP/1.1 request: its head, then `content-length` bytes of body.
async fn read_request(socket: &mut tokio::net::TcpStream) -> CredentialsRequest {
    let mut bytes = Vec::new();
    let mut buffer = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = bytes.windows(4).position(|window| window == b"\r\n\r\n") {
            break at + 4;
        }
        match socket.read(&mut buffer).await {
            Ok(0) | Err(_) => break bytes.len(),
            Ok(read) => bytes.extend_from_slice(&buffer[..read]),
        }
    };
    let head = String::from_utf8_lossy(&bytes[..head_end]).into_owned();
    let header = |wanted: &str| {
        head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case(wanted)
                .then(|| value.trim().to_owned())
        })
    };
    let length: usize = header("content-length").map_or(0, |value| value.parse().unwrap());
    while bytes.len() < head_end + length {
        match socket.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => bytes.extend_from_slice(&buffer[..read]),
        }
    }
    CredentialsRequest {
        line: head.lines().next().unwrap_or_default().to_owned(),
        authorization: header("authorization"),
        body: String::from_utf8_lossy(&bytes[head_end..]).into_owned(),
    }
}

#[tokio::test]
async fn chain_credentials_from_a_container_credentials_endpoint_reach_s3() {
    const SESSION_TOKEN: &str = "session-token-from-the-container-endpoint";
    const AUTHORIZATION: &str = "pod-identity-authorization-token";
    let secret = required_tool("SVC_TEST_S3_SECRET_ACCESS_KEY");
    let expiration =
        humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600));
    let credentials = serde_json::json!({
        "AccessKeyId": required_tool("SVC_TEST_S3_ACCESS_KEY_ID"),
        "SecretAccessKey": secret,
        "Token": SESSION_TOKEN,
        "Expiration": expiration.to_string(),
    })
    .to_string();
    let endpoint = CredentialsEndpoint::start(200, credentials).await;
    let home = tempfile::tempdir().unwrap();
    let mut env = chain_env(&unique_prefix("chain-ecs"), home.path());
    env.push((
        "AWS_CONTAINER_CREDENTIALS_FULL_URI".to_owned(),
        endpoint.url.clone(),
    ));
    env.push((
        "AWS_CONTAINER_AUTHORIZATION_TOKEN".to_owned(),
        AUTHORIZATION.to_owned(),
    ));
    let service = spawn(&env).await;
    assert_round_trip(&service).await;
    let output = stop(service).await;

    // Asked once at start-up and once to fill the S3 clients' cache (shared by the presigning
    // client), not once per request: the credentials are valid for an hour.
    let requests = endpoint.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2, "{requests:?}");
    for request in &requests {
        assert!(
            request.line.starts_with("GET /v2/credentials/test "),
            "{request:?}"
        );
        assert_eq!(
            request.authorization.as_deref(),
            Some(AUTHORIZATION),
            "{request:?}"
        );
    }
    assert!(
        output.contains("s3 credentials from the AWS default chain"),
        "{output}"
    );
    for leaked in [secret.as_str(), SESSION_TOKEN, AUTHORIZATION] {
        assert!(!output.contains(leaked), "{leaked} leaked:\n{output}");
    }
}

/// IRSA's path: a web identity token file and a role ARN (what EKS's webhook sets), exchanged at
/// STS (here a stand-in at `AWS_ENDPOINT_URL_STS`) for temporary credentials of the role.
#[tokio::test]
async fn chain_credentials_from_a_web_identity_token_reach_s3() {
    const WEB_IDENTITY_TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.projected-service-account-token.sig";
    const SESSION_TOKEN: &str = "session-token-from-sts";
    const ROLE: &str = "arn:aws:iam::111122223333:role/svc-messaging-test";
    let secret = required_tool("SVC_TEST_S3_SECRET_ACCESS_KEY");
    let expiration =
        humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600));
    let answer = format!(
        r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <Credentials>
      <AccessKeyId>{}</AccessKeyId>
      <SecretAccessKey>{secret}</SecretAccessKey>
      <SessionToken>{SESSION_TOKEN}</SessionToken>
      <Expiration>{expiration}</Expiration>
    </Credentials>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::111122223333:assumed-role/svc-messaging-test/pod</Arn>
      <AssumedRoleId>AROAEXAMPLE:pod</AssumedRoleId>
    </AssumedRoleUser>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"#,
        required_tool("SVC_TEST_S3_ACCESS_KEY_ID")
    );
    let sts = CredentialsEndpoint::start_with(200, "text/xml", answer).await;
    let home = tempfile::tempdir().unwrap();
    let token_file = home.path().join("token");
    std::fs::write(&token_file, WEB_IDENTITY_TOKEN).unwrap();
    let mut env = chain_env(&unique_prefix("chain-irsa"), home.path());
    env.extend([
        ("AWS_ROLE_ARN".to_owned(), ROLE.to_owned()),
        (
            "AWS_WEB_IDENTITY_TOKEN_FILE".to_owned(),
            token_file.display().to_string(),
        ),
        ("AWS_ENDPOINT_URL_STS".to_owned(), sts.root()),
    ]);
    let service = spawn(&env).await;
    assert_round_trip(&service).await;
    let output = stop(service).await;

    let requests = sts.requests.lock().unwrap().clone();
    assert!(!requests.is_empty(), "STS was never asked");
    for request in &requests {
        let form: Vec<(String, String)> = url::form_urlencoded::parse(request.body.as_bytes())
            .into_owned()
            .collect();
        let field = |name: &str| {
            form.iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.as_str())
        };
        assert!(request.line.starts_with("POST / "), "{request:?}");
        assert_eq!(
            field("Action"),
            Some("AssumeRoleWithWebIdentity"),
            "{request:?}"
        );
        assert_eq!(field("RoleArn"), Some(ROLE), "{request:?}");
        assert_eq!(
            field("WebIdentityToken"),
            Some(WEB_IDENTITY_TOKEN),
            "{request:?}"
        );
    }
    assert!(
        output.contains("s3 credentials from the AWS default chain"),
        "{output}"
    );
    for leaked in [secret.as_str(), SESSION_TOKEN, WEB_IDENTITY_TOKEN] {
        assert!(!output.contains(leaked), "{leaked} leaked:\n{output}");
    }
}

/// The binary with `env` only; waits for it to exit (at most 20 s).
fn run_to_exit(env: &[(String, String)]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_svc-messaging"))
        .env_clear()
        .env("SVC_MESSAGING__SERVER__GRPC_ADDR", "127.0.0.1:0")
        .env("SVC_MESSAGING__SERVER__HTTP_ADDR", "127.0.0.1:0")
        .envs(env.iter().map(|(key, value)| (key, value)))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run svc-messaging");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "still running after 20 s: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn chain_credentials_with_no_source_fail_start_up_naming_the_sources() {
    let home = tempfile::tempdir().unwrap();
    let env = chain_env(&unique_prefix("chain-none"), home.path());
    let (code, stderr) = run_to_exit(&env);
    assert_eq!(code, Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("svc-messaging: s3: ")
            && last.contains("s3.credentials = \"chain\" found no credentials"),
        "{stderr}"
    );
    for source in [
        "AWS_ACCESS_KEY_ID",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "instance metadata",
    ] {
        assert!(last.contains(source), "{source} is not named: {last}");
    }
}

#[tokio::test]
async fn chain_credentials_that_cannot_be_fetched_keep_the_service_not_ready_saying_why() {
    // The endpoint is configured and answers, but with an error: credentials exist in principle
    // (a restart of the agent may bring them), so the service starts and reports not ready.
    let endpoint = CredentialsEndpoint::start(
        500,
        r#"{"code":"InternalError","message":"agent restarting"}"#.to_owned(),
    )
    .await;
    let home = tempfile::tempdir().unwrap();
    let mut env = chain_env(&unique_prefix("chain-broken"), home.path());
    env.push((
        "AWS_CONTAINER_CREDENTIALS_FULL_URI".to_owned(),
        endpoint.url.clone(),
    ));
    // Room for the SDK's retries of the 500s, so the check reports their error, not its own
    // time limit, on a loaded machine.
    env.push((
        "SVC_MESSAGING__SERVER__HEALTH_CHECK_TIMEOUT".to_owned(),
        "10s".to_owned(),
    ));
    let service = spawn(&env).await;
    let channel = channel_to(&service).await;
    eventually(
        Duration::from_secs(10),
        "the service reports S3 down",
        async || {
            health(&channel, "").await
                == tonic_health::pb::health_check_response::ServingStatus::NotServing
        },
    )
    .await;
    let output = stop(service).await;
    assert!(
        output.contains("s3 credentials from the AWS default chain are not available yet"),
        "{output}"
    );
    let down = output
        .lines()
        .find(|line| line.contains("dependency is down"))
        .unwrap_or_else(|| panic!("no health report:\n{output}"));
    assert!(
        down.contains("loading credentials") && down.contains("500"),
        "{down}"
    );
}
