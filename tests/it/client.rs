//! The Rust client library (`svcmsg-client`, issue 12) against the real service: the shipped
//! service config parses and the client follows its retries and timeouts; an upload resumes
//! through GetUploadStatus after its server is SIGKILLed and restarted; a download resumes with
//! `offset`; a subscription delivers every event exactly once, in order, across a restart; the
//! service's ErrorInfo reason reaches the caller.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
    time::Duration,
};

use futures::StreamExt;
use svcmsg_client::{
    Client, Code, Identity, ReconnectPolicy, ServiceConfig, SubscribeOptions, UploadOptions, pb,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::resumable::process_env;
use crate::support::cloud::{MIB, eventually, free_port, pdf};
use crate::support::{ServiceProcess, TestServer, sha256_hex, unique_prefix};

const SHIPPED_CONFIG: &str = include_str!("../../proto/service_config.json");

fn client(addr: impl std::fmt::Display, user: &str) -> Client {
    Client::builder(format!("http://{addr}"))
        .identity(Identity::UserId(user.to_owned()))
        // Quick reconnects, and enough of them to outlast a restart of the service.
        .reconnect(ReconnectPolicy {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            max_attempts_without_progress: Some(60),
        })
        .build()
        .unwrap()
}

#[test]
fn the_shipped_service_config_parses_and_retries_only_what_is_safe_to_repeat() {
    let config = ServiceConfig::from_json(SHIPPED_CONFIG).expect("proto/service_config.json");
    assert_eq!(
        config,
        ServiceConfig::shipped(),
        "the client embeds the file"
    );
    let messaging = "messaging.v1.MessagingService";
    let files = "messaging.v1.FileRelayService";
    // Reads, and writes the service makes idempotent (SendMessage's required
    // client_message_id, MarkRead's monotonic position, DeleteMessage of a tombstone, adding
    // present participants), retry UNAVAILABLE with exponential backoff within 10 s.
    for (service, method) in [
        (messaging, "GetConversation"),
        (messaging, "ListConversations"),
        (messaging, "ListMessages"),
        (messaging, "SendMessage"),
        (messaging, "MarkRead"),
        (messaging, "DeleteMessage"),
        (messaging, "AddParticipants"),
        (files, "GetFile"),
        (files, "GetDownloadUrl"),
        (files, "GetUploadStatus"),
        (files, "GetUploadPolicy"),
    ] {
        let policy = config.policy(service, method);
        let retry = policy
            .retry
            .unwrap_or_else(|| panic!("{method} is retried"));
        assert!(retry.retries(Code::Unavailable), "{method}");
        assert_eq!(retry.retryable_codes, vec![Code::Unavailable], "{method}");
        assert_eq!(retry.max_attempts, 5, "{method}");
        assert_eq!(retry.backoff_ceiling(1), Duration::from_millis(200));
        assert_eq!(retry.backoff_ceiling(2), Duration::from_millis(400));
        assert_eq!(retry.backoff_ceiling(9), Duration::from_secs(5));
        assert_eq!(policy.timeout, Some(Duration::from_secs(10)), "{method}");
    }
    // A retry of these could repeat an effect (a second conversation when request_id is
    // unset) or turn a success into an error (NOT_FOUND for the second removal).
    for (service, method) in [
        (messaging, "CreateConversation"),
        (messaging, "RemoveParticipant"),
        (files, "DeleteFile"),
    ] {
        let policy = config.policy(service, method);
        assert!(policy.retry.is_none(), "{method} must not be retried");
        assert_eq!(policy.timeout, Some(Duration::from_secs(10)), "{method}");
    }
    // Streams run as long as they need; only a read's stream is retried before it started.
    for (service, method) in [(messaging, "SubscribeMessages"), (files, "DownloadFile")] {
        let policy = config.policy(service, method);
        assert!(policy.retry.is_some(), "{method}");
        assert_eq!(policy.timeout, None, "{method}");
    }
    let upload = config.policy(files, "UploadFile");
    assert!(upload.retry.is_none() && upload.timeout.is_none());

    // Malformed configs are refused, not half-applied.
    for bad in [
        r#"{"methodConfig":[{"name":[{"service":"s"}],"timeout":"ten"}]}"#,
        r#"{"methodConfig":[{"name":[{"service":"s"}],"retryPolicy":{"maxAttempts":1,"initialBackoff":"1s","maxBackoff":"1s","backoffMultiplier":2,"retryableStatusCodes":["UNAVAILABLE"]}}]}"#,
        r#"{"methodConfig":[{"name":[{"service":"s"}],"retryPolicy":{"maxAttempts":3,"initialBackoff":"1s","maxBackoff":"1s","backoffMultiplier":2,"retryableStatusCodes":["NOPE"]}}]}"#,
    ] {
        assert!(ServiceConfig::from_json(bad).is_err(), "{bad}");
    }
}

/// A config like the shipped one, with quick retries of at most `attempts` attempts.
fn quick_config(attempts: u32, list_timeout: &str) -> ServiceConfig {
    ServiceConfig::from_json(&format!(
        r#"{{"methodConfig": [
            {{"name": [{{"service": "messaging.v1.MessagingService", "method": "ListConversations"}}],
              "timeout": "{list_timeout}",
              "retryPolicy": {{"maxAttempts": {attempts}, "initialBackoff": "0.01s",
                "maxBackoff": "0.02s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"]}}}},
            {{"name": [{{"service": "messaging.v1.MessagingService", "method": "CreateConversation"}}],
              "timeout": "10s"}}
        ]}}"#
    ))
    .unwrap()
}

#[tokio::test]
async fn the_client_retries_and_times_out_as_the_service_config_says() {
    // Nothing listens here: every attempt fails with UNAVAILABLE.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let build = |config: ServiceConfig| {
        Client::builder(format!("http://{nowhere}"))
            .identity(Identity::UserId("alice".into()))
            .service_config(config)
            .build()
            .unwrap()
    };
    for attempts in [2, 4] {
        let client = build(quick_config(attempts, "10s"));
        let error = client.conversations().await.unwrap_err();
        assert_eq!(error.code(), Some(Code::Unavailable));
        assert_eq!(
            error.status().unwrap().attempts,
            attempts,
            "ListConversations"
        );
        // Not retried: a repeat could create a second conversation.
        let error = client.create_conversation("t", &[]).await.unwrap_err();
        assert_eq!(error.code(), Some(Code::Unavailable));
        assert_eq!(error.status().unwrap().attempts, 1, "CreateConversation");
    }
    // The shipped config: five attempts of a read.
    let client = Client::builder(format!("http://{nowhere}"))
        .identity(Identity::UserId("alice".into()))
        .build()
        .unwrap();
    let error = client.upload_policy().await.unwrap_err();
    assert_eq!(error.status().unwrap().attempts, 5);
    assert!(error.is_unavailable());

    // The config's timeout bounds a call the service never answers (it accepts the
    // connection and reads nothing), and a per-call deadline shorter than the config's wins.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let build = |config: ServiceConfig| {
        Client::builder(format!("http://{silent_addr}"))
            .identity(Identity::UserId("alice".into()))
            .service_config(config)
            .build()
            .unwrap()
    };
    let started = std::time::Instant::now();
    let error = build(quick_config(2, "0.3s"))
        .conversations()
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(Code::DeadlineExceeded), "{error}");
    let waited = started.elapsed();
    assert!(
        (Duration::from_millis(300)..Duration::from_secs(5)).contains(&waited),
        "{waited:?}"
    );
    let started = std::time::Instant::now();
    let error = build(quick_config(2, "10s"))
        .with_timeout(Duration::from_millis(300))
        .conversations()
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(Code::DeadlineExceeded), "{error}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // The same configs on the real service: answered well within them.
    let server = TestServer::start().await;
    let client = Client::builder(format!("http://{}", server.grpc_addr))
        .identity(Identity::UserId("alice".into()))
        .service_config(quick_config(2, "10s"))
        .build()
        .unwrap();
    client.conversations().await.expect("within 10 s");
    drop(silent);
}

#[tokio::test]
async fn refusals_carry_the_error_info_reason() {
    let server = TestServer::start().await;
    let alice = client(server.grpc_addr, "alice");
    let mallory = client(server.grpc_addr, "mallory");
    let conversation = alice.create_conversation("t", &["bob"]).await.unwrap();
    let error = mallory
        .send_text(&conversation.conversation_id, "hi")
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(Code::PermissionDenied));
    assert_eq!(error.reason(), Some("NOT_A_PARTICIPANT"));
    assert!(!error.is_unavailable());
    let error = alice
        .send_text(&conversation.conversation_id, "   ")
        .await
        .unwrap_err();
    assert_eq!(error.reason(), Some("INVALID_FIELD"));
    let violations = &error.status().unwrap().field_violations;
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_eq!(violations[0].0, "text");
    let anonymous = Client::builder(format!("http://{}", server.grpc_addr))
        .build()
        .unwrap();
    let error = anonymous.conversations().await.unwrap_err();
    assert_eq!(error.code(), Some(Code::Unauthenticated));
    assert_eq!(error.reason(), Some("CREDENTIALS_MISSING"));
}

/// A service process on Redis and the test bucket, on a port of its own that survives restarts
/// (so a client's address stays valid).
pub(crate) struct RestartableService {
    env: Vec<(String, String)>,
    process: Option<ServiceProcess>,
    port: u16,
    _data_dir: tempfile::TempDir,
}

impl RestartableService {
    pub(crate) fn start(test: &str) -> Self {
        let data_dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut env = process_env(&unique_prefix(test), "s3", data_dir.path());
        env.push((
            "SVC_MESSAGING__SERVER__GRPC_ADDR".to_owned(),
            format!("127.0.0.1:{port}"),
        ));
        let mut service = Self {
            env,
            process: None,
            port,
            _data_dir: data_dir,
        };
        service.restart();
        service
    }

    pub(crate) fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub(crate) fn kill(&mut self) {
        let mut process = self.process.take().expect("running");
        process.signal("KILL");
        process.wait_exit(Duration::from_secs(10)).expect("killed");
    }

    pub(crate) fn restart(&mut self) {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        self.process = Some(ServiceProcess::spawn(&env));
    }
}

/// Holds readers and writers at a byte position until opened.
#[derive(Clone, Default)]
struct Gate(Arc<Mutex<(bool, Option<Waker>)>>);

impl Gate {
    fn open(&self) {
        let mut state = self.0.lock().unwrap();
        state.0 = true;
        if let Some(waker) = state.1.take() {
            waker.wake();
        }
    }

    fn poll_open(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.0.lock().unwrap();
        if state.0 {
            return Poll::Ready(());
        }
        state.1 = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A reader (that cannot seek) of `body` that stops at `gate_at` until the gate opens.
struct GatedReader {
    body: Arc<Vec<u8>>,
    position: usize,
    gate_at: usize,
    gate: Gate,
}

impl AsyncRead for GatedReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.position >= self.gate_at && self.gate.poll_open(cx).is_pending() {
            return Poll::Pending;
        }
        let end = if self.position < self.gate_at {
            self.gate_at
        } else {
            self.body.len()
        };
        let take = buf.remaining().min(end - self.position);
        let start = self.position;
        buf.put_slice(&self.body[start..start + take]);
        self.position += take;
        Poll::Ready(Ok(()))
    }
}

/// A writer into memory that stops at `gate_at` bytes until the gate opens.
struct GatedWriter {
    written: Vec<u8>,
    gate_at: usize,
    gate: Gate,
}

impl AsyncWrite for GatedWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.written.len() >= self.gate_at && self.gate.poll_open(cx).is_pending() {
            return Poll::Pending;
        }
        self.written.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

async fn file_messages(client: &Client, conversation_id: &str) -> Vec<String> {
    client
        .recent_messages(conversation_id, 100)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|message| message.file.map(|file| file.file_id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_resumes_after_its_server_is_killed_and_a_download_resumes_with_offset() {
    let mut service = RestartableService::start("client-kill-transfer");
    let alice = client(service.addr(), "alice");
    let conversation = alice.create_conversation("t", &["bob"]).await.unwrap();
    let conversation_id = conversation.conversation_id.clone();
    let body = Arc::new(pdf(30 * MIB + 7));

    // The upload stops reading at 20 MiB; the service makes a part durable meanwhile.
    let gate = Gate::default();
    let reader = GatedReader {
        body: body.clone(),
        position: 0,
        gate_at: 20 * MIB,
        gate: gate.clone(),
    };
    let request_id = format!("client-kill-{}", uuid::Uuid::now_v7());
    let options = UploadOptions::new(&conversation_id, "big.pdf").request_id(&request_id);
    let uploading = {
        let alice = alice.clone();
        tokio::spawn(async move { alice.upload(reader, body.len() as u64, options).await })
    };
    eventually(Duration::from_secs(30), "a part is durable", async || {
        alice
            .upload_status(&request_id)
            .await
            .is_ok_and(|status| status.committed_size >= 8 * MIB as i64)
    })
    .await;

    service.kill();
    service.restart();
    gate.open();
    let outcome = tokio::time::timeout(Duration::from_secs(60), uploading)
        .await
        .expect("the upload finishes")
        .unwrap()
        .expect("the upload resumed and completed");
    let body = pdf(30 * MIB + 7);
    assert!(outcome.resumptions >= 1, "{outcome:?}");
    assert_eq!(outcome.file.sha256, sha256_hex(&body));
    assert_eq!(outcome.file.size_bytes as usize, body.len());
    assert_eq!(outcome.request_id, request_id);
    let file_id = outcome.file.file_id.clone();
    assert_eq!(
        file_messages(&alice, &conversation_id).await,
        vec![file_id.clone()],
        "announced exactly once"
    );

    // A download that stops writing at 10 MiB while its server is killed and restarted
    // continues from the offset it reached.
    let bob = client(service.addr(), "bob");
    let gate = Gate::default();
    let mut writer = GatedWriter {
        written: Vec::new(),
        gate_at: 10 * MIB,
        gate: gate.clone(),
    };
    let (reached_tx, reached_rx) = tokio::sync::oneshot::channel();
    let reached = Mutex::new(Some(reached_tx));
    let progress: svcmsg_client::DownloadProgress = Arc::new(move |received, _| {
        if received >= 10 * MIB as u64
            && let Some(tx) = reached.lock().unwrap().take()
        {
            let _ = tx.send(());
        }
    });
    let downloading = {
        let bob = bob.clone();
        let file_id = file_id.clone();
        tokio::spawn(async move {
            let outcome = bob.download(&file_id, &mut writer, Some(progress)).await;
            (outcome, writer.written)
        })
    };
    reached_rx.await.expect("10 MiB arrived");
    service.kill();
    service.restart();
    gate.open();
    let (outcome, written) = tokio::time::timeout(Duration::from_secs(60), downloading)
        .await
        .expect("the download finishes")
        .unwrap();
    let outcome = outcome.expect("the download resumed and completed");
    assert!(outcome.resumptions >= 1, "{outcome:?}");
    assert_eq!(written.len(), body.len());
    assert!(written == body, "the downloaded bytes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_delivers_every_event_once_in_order_across_a_restart() {
    let mut service = RestartableService::start("client-kill-subscribe");
    let alice = client(service.addr(), "alice");
    let conversation = alice.create_conversation("t", &["bob"]).await.unwrap();
    let conversation_id = conversation.conversation_id.clone();
    let bob = client(service.addr(), "bob");
    let mut events = bob.subscribe(
        &conversation_id,
        SubscribeOptions {
            after_sequence: conversation.last_sequence,
            ..Default::default()
        },
    );
    let mut sent = Vec::new();
    for index in 0..5 {
        sent.push(
            alice
                .send_text(&conversation_id, &format!("before {index}"))
                .await
                .unwrap(),
        );
    }
    let mut received: Vec<pb::ConversationEvent> = Vec::new();
    while received.len() < 5 {
        received.push(events.next().await.unwrap().unwrap());
    }

    service.kill();
    service.restart();
    // Sent while the subscriber may still be reconnecting: it gets them by replay.
    for index in 0..5 {
        sent.push(
            alice
                .send_text(&conversation_id, &format!("after {index}"))
                .await
                .unwrap(),
        );
    }
    while received.len() < 10 {
        let event = tokio::time::timeout(Duration::from_secs(30), events.next())
            .await
            .expect("events after the restart")
            .unwrap()
            .unwrap();
        received.push(event);
    }
    let sequences: Vec<u64> = received.iter().map(|event| event.sequence).collect();
    let expected: Vec<u64> = sent.iter().map(|message| message.sequence).collect();
    assert_eq!(sequences, expected, "every event once, in order");
    let texts: Vec<String> = received
        .iter()
        .map(|event| match &event.event {
            Some(pb::conversation_event::Event::MessageCreated(created)) => {
                created.message.as_ref().unwrap().text.clone()
            }
            other => panic!("unexpected event {other:?}"),
        })
        .collect();
    let sent_texts: Vec<String> = sent.iter().map(|message| message.text.clone()).collect();
    assert_eq!(texts, sent_texts);
    // Nothing more (no duplicate from the replay) arrives.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), events.next())
            .await
            .is_err()
    );
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let output = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(output.status.success(), "openssl {args:?}: {output:?}");
}

/// A private CA and a certificate it signed for `localhost` / 127.0.0.1: (CA PEM, leaf chain,
/// leaf key).
fn private_ca(
    dir: &std::path::Path,
) -> (
    Vec<u8>,
    Vec<rustls_pki_types::CertificateDer<'static>>,
    rustls_pki_types::PrivateKeyDer<'static>,
) {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem"],
            &["-subj", "/CN=svcmsg test CA", "-days", "1"],
        ]
        .concat(),
    );
    openssl(
        dir,
        &[
            &["req"][..],
            &ec,
            &["-keyout", "leaf.key", "-out", "leaf.csr"],
            &["-subj", "/CN=localhost"],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "leaf.pem",
            "-days",
            "1",
            "-extfile",
            "leaf.ext",
        ],
    );
    let chain = CertificateDer::pem_file_iter(dir.join("leaf.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("leaf.key")).unwrap();
    (std::fs::read(dir.join("ca.pem")).unwrap(), chain, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_speaks_tls_to_a_front_with_a_private_ca() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio_rustls::rustls;

    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, chain, key) = private_ca(dir.path());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    // A TLS-terminating front (as a gateway would be) before the service's plaintext port.
    let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_port = front.local_addr().unwrap().port();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let backend = server.grpc_addr;
    let counted = handshakes.clone();
    let front_task = tokio::spawn(async move {
        loop {
            let (tcp, _) = front.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let counted = counted.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counted.fetch_add(1, Ordering::SeqCst);
                let mut plain = tokio::net::TcpStream::connect(backend).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });

    let address = format!("https://localhost:{front_port}");
    let trusted = Client::builder(&address)
        .identity(Identity::UserId("alice".into()))
        .ca_certificate(ca_pem)
        .build()
        .unwrap();
    let conversation = trusted.create_conversation("over tls", &[]).await.unwrap();
    let listed = trusted.conversations().await.unwrap();
    assert_eq!(listed[0].conversation_id, conversation.conversation_id);
    assert!(handshakes.load(Ordering::SeqCst) >= 1);

    // The system's roots alone do not know the private CA: nothing is sent.
    let before = handshakes.load(Ordering::SeqCst);
    let untrusting = Client::builder(&address)
        .identity(Identity::UserId("alice".into()))
        .build()
        .unwrap();
    let error = untrusting.conversations().await.unwrap_err();
    assert_eq!(error.code(), Some(Code::Unavailable), "{error}");
    assert_eq!(handshakes.load(Ordering::SeqCst), before);
    front_task.abort();
}

#[tokio::test]
async fn a_bearer_token_identifies_the_caller() {
    use crate::auth::{SECRET, claims, jwt_server, now, token};
    let server = jwt_server().await;
    let as_bearer = |token: String| {
        Client::builder(format!("http://{}", server.grpc_addr))
            .identity(Identity::Bearer(token))
            .build()
            .unwrap()
    };
    let alice = as_bearer(token(claims("alice", now() + 300), SECRET));
    let conversation = alice.create_conversation("jwt", &[]).await.unwrap();
    assert_eq!(conversation.created_by, "alice");
    let expired = as_bearer(token(claims("alice", now() - 10), SECRET));
    let error = expired.conversations().await.unwrap_err();
    assert_eq!(error.code(), Some(Code::Unauthenticated));
    assert_eq!(error.reason(), Some("TOKEN_EXPIRED"));
    // Not retried: only UNAVAILABLE is.
    assert_eq!(error.status().unwrap().attempts, 1);
    // The trusted header means nothing in jwt mode.
    let error = client(server.grpc_addr, "alice")
        .conversations()
        .await
        .unwrap_err();
    assert_eq!(error.reason(), Some("CREDENTIALS_MISSING"));
}
