//! TLS of the gRPC port: certificates generated per test (rcgen), real clients (tonic's TLS
//! channel and grpcurl), client certificates (mTLS), reloading the files while serving, and the
//! start-up errors that name the config key.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use svc_messaging::{
    config::{ClientCertPolicy, Settings, TlsSettings},
    startup,
};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{TestServer, required_tool};

/// The name the server certificates are issued for (besides 127.0.0.1).
const SERVER_NAME: &str = "localhost";

/// A certificate authority living for one test.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM.
struct Issued {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Self {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    fn issue(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Issued {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, &names[0]);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap().pem();
        Issued {
            cert,
            key: key.serialize_pem(),
        }
    }

    fn server(&self) -> Issued {
        self.issue(
            &[SERVER_NAME, "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    fn client(&self, name: &str) -> Issued {
        self.issue(&[name], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// The files `server.tls` names, in a directory of their own.
struct TlsFiles {
    dir: tempfile::TempDir,
}

impl TlsFiles {
    fn new(server: &Issued, client_ca: Option<&Ca>) -> Self {
        let files = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        files.replace(server, client_ca);
        files
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Replaces the files the way a mounted Secret changes: each one whole, by a rename.
    fn replace(&self, server: &Issued, client_ca: Option<&Ca>) {
        self.write("cert.pem", server.cert.as_bytes());
        self.write("key.pem", server.key.as_bytes());
        if let Some(ca) = client_ca {
            self.write("client-ca.pem", ca.pem.as_bytes());
        }
    }

    fn write(&self, name: &str, contents: &[u8]) {
        let staged = self.path(&format!(".{name}.new"));
        std::fs::write(&staged, contents).unwrap();
        std::fs::rename(&staged, self.path(name)).unwrap();
    }

    fn settings(&self, client_ca: bool) -> TlsSettings {
        TlsSettings {
            cert_file: Some(self.path("cert.pem")),
            key_file: Some(self.path("key.pem")),
            client_ca_file: client_ca.then(|| self.path("client-ca.pem")),
            reload_interval: Duration::from_millis(50),
            ..TlsSettings::default()
        }
    }
}

async fn start(tls: TlsSettings) -> TestServer {
    TestServer::start_with(|settings| settings.server.tls = tls).await
}

/// A new TLS connection to `server`, trusting `ca`, presenting `identity` if given.
async fn connect(
    server: &TestServer,
    ca: &Ca,
    identity: Option<&Issued>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name(SERVER_NAME);
    if let Some(issued) = identity {
        tls = tls.identity(Identity::from_pem(&issued.cert, &issued.key));
    }
    Endpoint::from_shared(format!("https://{}", server.grpc_addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
}

async fn health(channel: Channel) -> Result<ServingStatus, tonic::Status> {
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await?;
    Ok(response.into_inner().status())
}

/// Whether a call over a new TLS connection succeeds. Under TLS 1.3 the server checks a client
/// certificate after the client considers the handshake done, so a refusal shows either at
/// connect or at the first call.
async fn call_over_new_connection(
    server: &TestServer,
    ca: &Ca,
    identity: Option<&Issued>,
) -> Result<(), String> {
    let channel = connect(server, ca, identity)
        .await
        .map_err(|error| format!("connect: {error:?}"))?;
    match health(channel).await {
        Ok(ServingStatus::Serving) => Ok(()),
        Ok(other) => panic!("health answered {other:?}"),
        Err(status) => Err(format!("call: {status:?}")),
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

/// Polls `/metrics` until the counter `name` reaches `value` (the reload task has acted).
async fn wait_for_metric(server: &TestServer, name: &str, value: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = metric(server, name).await;
        if now >= value {
            assert_eq!(now, value, "{name}");
            return;
        }
        assert!(Instant::now() < deadline, "{name} stayed at {now}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn tls_calls_work_and_plaintext_clients_are_refused() {
    let ca = Ca::new("server ca");
    let files = TlsFiles::new(&ca.server(), None);
    let server = start(files.settings(false)).await;

    call_over_new_connection(&server, &ca, None)
        .await
        .expect("a TLS client that trusts the CA is served");

    let failures = metric(&server, "grpc_server_tls_handshake_failures_total").await;
    let plaintext = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_lazy();
    // tonic reports the closed connection as UNKNOWN "transport error"; the server's counter
    // says why.
    health(plaintext).await.expect_err("plaintext is refused");
    wait_for_metric(
        &server,
        "grpc_server_tls_handshake_failures_total",
        failures + 1.0,
    )
    .await;

    // A client that does not trust the issuing CA gives up on the handshake itself.
    let stranger = Ca::new("another ca");
    assert!(
        call_over_new_connection(&server, &stranger, None)
            .await
            .is_err()
    );

    // The probe port stays plaintext for the kubelet.
    let probe = reqwest::get(server.http_url("/readyz")).await.unwrap();
    assert_eq!(probe.status(), 200);
    let probe = reqwest::get(server.http_url("/healthz")).await.unwrap();
    assert_eq!(probe.status(), 200);
}

#[tokio::test]
async fn mtls_admits_only_clients_with_a_certificate_from_the_client_ca() {
    let server_ca = Ca::new("server ca");
    let client_ca = Ca::new("client ca");
    let files = TlsFiles::new(&server_ca.server(), Some(&client_ca));
    let server = start(files.settings(true)).await;

    let failures = metric(&server, "grpc_server_tls_handshake_failures_total").await;
    let anonymous = call_over_new_connection(&server, &server_ca, None).await;
    assert!(anonymous.is_err(), "no client certificate: {anonymous:?}");
    wait_for_metric(
        &server,
        "grpc_server_tls_handshake_failures_total",
        failures + 1.0,
    )
    .await;

    let foreign = Ca::new("foreign ca").client("svc-foreign");
    let refused = call_over_new_connection(&server, &server_ca, Some(&foreign)).await;
    assert!(
        refused.is_err(),
        "a certificate from another CA: {refused:?}"
    );
    wait_for_metric(
        &server,
        "grpc_server_tls_handshake_failures_total",
        failures + 2.0,
    )
    .await;

    let member = client_ca.client("svc-caller");
    call_over_new_connection(&server, &server_ca, Some(&member))
        .await
        .expect("a certificate from the client CA is admitted");
}

#[tokio::test]
async fn optional_client_certificates_admit_anonymous_clients_but_not_foreign_certificates() {
    let server_ca = Ca::new("server ca");
    let client_ca = Ca::new("client ca");
    let files = TlsFiles::new(&server_ca.server(), Some(&client_ca));
    let server = start(TlsSettings {
        client_cert: ClientCertPolicy::Optional,
        ..files.settings(true)
    })
    .await;

    call_over_new_connection(&server, &server_ca, None)
        .await
        .expect("no certificate is allowed");
    call_over_new_connection(&server, &server_ca, Some(&client_ca.client("svc-caller")))
        .await
        .expect("a certificate from the client CA is admitted");
    let foreign = Ca::new("foreign ca").client("svc-foreign");
    let refused = call_over_new_connection(&server, &server_ca, Some(&foreign)).await;
    assert!(
        refused.is_err(),
        "a presented certificate is verified: {refused:?}"
    );
}

#[tokio::test]
async fn replaced_files_serve_new_connections_without_a_restart_and_broken_ones_are_ignored() {
    let old_ca = Ca::new("old ca");
    let old_client = old_ca.client("svc-caller");
    let files = TlsFiles::new(&old_ca.server(), Some(&old_ca));
    let server = start(files.settings(true)).await;
    let existing = connect(&server, &old_ca, Some(&old_client)).await.unwrap();
    assert_eq!(
        health(existing.clone()).await.unwrap(),
        ServingStatus::Serving
    );

    // Rotation to a new CA: server certificate, key and client CA all change.
    let new_ca = Ca::new("new ca");
    let new_client = new_ca.client("svc-caller");
    files.replace(&new_ca.server(), Some(&new_ca));
    wait_for_metric(&server, "tls_certificate_reloads_total", 1.0).await;

    call_over_new_connection(&server, &new_ca, Some(&new_client))
        .await
        .expect("a new connection gets the new certificate and client CA");
    assert!(
        call_over_new_connection(&server, &old_ca, Some(&old_client))
            .await
            .is_err(),
        "the old certificate is no longer served to new connections"
    );
    assert!(
        call_over_new_connection(&server, &new_ca, Some(&old_client))
            .await
            .is_err(),
        "the old client CA is no longer trusted"
    );
    // The connection made before the rotation keeps its session (a reconnect could not verify
    // the new certificate against the old CA).
    assert_eq!(health(existing).await.unwrap(), ServingStatus::Serving);

    // A broken replacement (a truncated certificate) keeps the previous configuration.
    files.write("cert.pem", &new_ca.server().cert.as_bytes()[..100]);
    wait_for_metric(&server, "tls_certificate_reload_failures_total", 1.0).await;
    call_over_new_connection(&server, &new_ca, Some(&new_client))
        .await
        .expect("the previous certificate still serves");
    // So does a key that belongs to another certificate.
    let other = new_ca.server();
    files.write("cert.pem", new_ca.server().cert.as_bytes());
    files.write("key.pem", other.key.as_bytes());
    wait_for_metric(&server, "tls_certificate_reload_failures_total", 2.0).await;
    call_over_new_connection(&server, &new_ca, Some(&new_client))
        .await
        .expect("the previous certificate still serves");
    assert_eq!(metric(&server, "tls_certificate_reloads_total").await, 1.0);
}

#[tokio::test]
async fn grpcurl_calls_over_tls_with_a_client_certificate() {
    let grpcurl = required_tool("SVC_TEST_GRPCURL");
    let server_ca = Ca::new("server ca");
    let client_ca = Ca::new("client ca");
    let files = TlsFiles::new(&server_ca.server(), Some(&client_ca));
    let server = start(files.settings(true)).await;
    std::fs::write(files.path("ca.pem"), &server_ca.pem).unwrap();
    let client = client_ca.client("svc-caller");
    std::fs::write(files.path("client.pem"), &client.cert).unwrap();
    std::fs::write(files.path("client.key"), &client.key).unwrap();
    let addr = server.grpc_addr.to_string();
    let path = |name: &str| files.path(name).display().to_string();
    let run = |tls_args: Vec<String>| {
        let output = tokio::process::Command::new(&grpcurl)
            .args(tls_args)
            .args(["-max-time", "10", "-d", r#"{"service":""}"#])
            .args([addr.as_str(), "grpc.health.v1.Health/Check"])
            .output();
        async move { output.await.expect("run grpcurl") }
    };

    let served = run(vec![
        "-cacert".into(),
        path("ca.pem"),
        "-cert".into(),
        path("client.pem"),
        "-key".into(),
        path("client.key"),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&served.stdout);
    assert!(
        served.status.success() && stdout.contains("SERVING"),
        "{stdout} {}",
        String::from_utf8_lossy(&served.stderr)
    );
    // Reflection works over TLS too (grpcurl's `list`).
    let listed = tokio::process::Command::new(&grpcurl)
        .args(["-cacert", &path("ca.pem"), "-cert", &path("client.pem")])
        .args([
            "-key",
            &path("client.key"),
            "-max-time",
            "10",
            &addr,
            "list",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains("messaging.v1.MessagingService"),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );

    let without_certificate = run(vec!["-cacert".into(), path("ca.pem")]).await;
    assert!(!without_certificate.status.success());
    let plaintext = run(vec!["-plaintext".into()]).await;
    assert!(!plaintext.status.success());
}

#[tokio::test]
async fn the_handshake_timeout_and_the_connection_limit_cover_the_tls_handshake() {
    let ca = Ca::new("server ca");
    let files = TlsFiles::new(&ca.server(), None);
    let server = TestServer::start_with(|settings| {
        settings.server.tls = files.settings(false);
        settings.server.max_connections = 1;
        settings.server.handshake_timeout = Duration::from_millis(500);
    })
    .await;
    // A socket that never starts its TLS handshake holds the only slot...
    let mut silent = tokio::net::TcpStream::connect(server.grpc_addr)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // ...so a TLS client is refused at once, with the GOAWAY sent over TLS.
    let channel = Endpoint::from_shared(format!("https://{}", server.grpc_addr))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&ca.pem))
                .domain_name(SERVER_NAME),
        )
        .unwrap()
        .connect_lazy();
    let status = health(channel).await.expect_err("over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // The silent socket is closed once server.handshake_timeout has passed.
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut silent, &mut byte),
    )
    .await
    .expect("closed by the server");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(
        metric(&server, "grpc_server_handshake_timeouts_total").await,
        1.0
    );
    call_over_new_connection(&server, &ca, None)
        .await
        .expect("the slot is free again");
}

fn load(tls: TlsSettings) -> svc_messaging::config::ConfigError {
    let mut settings = Settings::default();
    settings.server.tls = tls;
    startup::check(&settings).err().expect("refused")
}

#[test]
fn start_up_errors_name_the_config_key() {
    let ca = Ca::new("server ca");
    let files = TlsFiles::new(&ca.server(), Some(&ca));
    let missing = |name: &str| Some(files.path(name));
    assert!(
        startup::check(&{
            let mut settings = Settings::default();
            settings.server.tls = files.settings(true);
            settings
        })
        .is_ok()
    );

    let error = load(TlsSettings {
        key_file: None,
        ..files.settings(false)
    });
    assert_eq!(error.key, "server.tls.key_file", "{error}");
    let error = load(TlsSettings {
        cert_file: None,
        client_ca_file: None,
        ..files.settings(false)
    });
    assert_eq!(error.key, "server.tls.cert_file", "{error}");
    let error = load(TlsSettings {
        cert_file: None,
        key_file: None,
        ..files.settings(true)
    });
    assert_eq!(error.key, "server.tls.client_ca_file", "{error}");

    let error = load(TlsSettings {
        cert_file: missing("absent.pem"),
        ..files.settings(false)
    });
    assert_eq!(error.key, "server.tls.cert_file", "{error}");
    assert!(error.message.contains("absent.pem"), "{error}");
    // Unreadable: a directory.
    let error = load(TlsSettings {
        key_file: Some(files.dir.path().to_owned()),
        ..files.settings(false)
    });
    assert_eq!(error.key, "server.tls.key_file", "{error}");

    files.write("garbage.pem", b"not pem at all");
    let error = load(TlsSettings {
        cert_file: missing("garbage.pem"),
        ..files.settings(false)
    });
    assert_eq!(error.key, "server.tls.cert_file", "{error}");
    let error = load(TlsSettings {
        key_file: missing("garbage.pem"),
        ..files.settings(false)
    });
    assert_eq!(error.key, "server.tls.key_file", "{error}");
    let error = load(TlsSettings {
        client_ca_file: missing("garbage.pem"),
        ..files.settings(true)
    });
    assert_eq!(error.key, "server.tls.client_ca_file", "{error}");
    // The key goes with the certificate: a key of another certificate is refused.
    files.write("other.key", ca.server().key.as_bytes());
    let error = load(TlsSettings {
        key_file: missing("other.key"),
        ..files.settings(false)
    });
    assert_eq!(error.key, "server.tls.key_file", "{error}");
    assert!(error.message.contains("does not match"), "{error}");
    let error = load(TlsSettings {
        reload_interval: Duration::ZERO,
        ..files.settings(false)
    });
    assert_eq!(error.key, "server.tls.reload_interval", "{error}");
}

#[test]
fn check_config_exits_2_naming_the_tls_key_at_fault() {
    let ca = Ca::new("server ca");
    let files = TlsFiles::new(&ca.server(), None);
    files.write("other.key", ca.server().key.as_bytes());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_svc-messaging"))
        .env_clear()
        .env(
            "SVC_MESSAGING__SERVER__TLS__CERT_FILE",
            files.path("cert.pem"),
        )
        .env(
            "SVC_MESSAGING__SERVER__TLS__KEY_FILE",
            files.path("other.key"),
        )
        .arg("check-config")
        .output()
        .expect("run svc-messaging check-config");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("server.tls.key_file: does not match the certificate"),
        "{stderr}"
    );
}
