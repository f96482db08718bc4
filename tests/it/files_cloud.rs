//! The file relay on its production backends, the real Redis and S3 server (Garage) that
//! scripts/test starts: files at the size limits round-trip byte for byte, the stored object
//! carries its type, disposition and sha256, replicas share files, an S3 outage is UNAVAILABLE
//! (and health says so), the bucket lifecycle rule is installed at start-up, and the upload
//! memory budget bounds concurrent uploads. Every refusal leaves no object, no open multipart
//! upload, no file record and no message behind.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use crate::support::cloud::*;
use crate::support::{
    TestServer, as_user, create_conversation, reason, required_tool, sha256_hex, test_s3_settings,
    unique_prefix,
};
use bytes::Bytes;
use svc_messaging::{
    app::{App, StartupError},
    config::{S3Settings, Settings},
    grpc::pb::{self, upload_file_request::Payload},
    store::s3::S3BlobStore,
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_util::sync::CancellationToken;
use tonic::{Code, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

// ---------------------------------------------------------------------------------------------
// 1. Files at the size limits round-trip byte for byte, and the object carries its attributes.

/// Checks the stored object: its size, type, download disposition and sha256 metadata.
async fn assert_object(
    s3: &S3BlobStore,
    file: &pb::FileInfo,
    conversation_id: &str,
    disposition: &str,
) {
    let key = format!("files/{conversation_id}/{}", file.file_id);
    let head = s3
        .client()
        .head_object()
        .bucket(s3.bucket())
        .key(&key)
        .send()
        .await
        .unwrap_or_else(|error| panic!("HeadObject {key}: {error:?}"));
    assert_eq!(head.content_length(), Some(file.size_bytes), "{key}");
    assert_eq!(
        head.content_type(),
        Some(file.content_type.as_str()),
        "{key}"
    );
    assert_eq!(head.content_disposition(), Some(disposition), "{key}");
    assert_eq!(
        head.metadata().and_then(|metadata| metadata.get("sha256")),
        Some(&file.sha256),
        "{key}: {:?}",
        head.metadata()
    );
}

#[tokio::test]
async fn files_at_the_size_limits_round_trip_byte_for_byte_with_their_attributes() {
    let key_prefix = unique_prefix("cloud-limits");
    let server = TestServer::start_with(|settings| use_cloud(settings, &key_prefix)).await;
    let channel = server.channel().await;
    let mut files = Files::new(channel.clone());
    let mut messaging = Messaging::new(channel);
    let conversation_id = create_conversation(&mut messaging, "alice", &["bob"]).await;
    let s3 = s3_store(&test_s3_settings());

    let document = Bytes::from(pdf(49_900_000));
    let image = Bytes::from(png(1800, 1833));
    assert!(
        (9_800_000..10_000_000).contains(&image.len()),
        "{}",
        image.len()
    );
    let small_text = Bytes::from(
        noise(3 * MIB, 3)
            .iter()
            .map(|b| b'a' + b % 26)
            .collect::<Vec<u8>>(),
    );
    let small_pdf = Bytes::from(pdf(2 * MIB + 5));
    // (body, name, type, declared sha256, disposition): multipart and single-request objects,
    // with the sha256 declared by the client or only computed by the server.
    let cases = [
        (
            &document,
            "Q3 report — final.pdf",
            "application/pdf",
            true,
            "attachment; filename*=UTF-8''Q3%20report%20%E2%80%94%20final.pdf",
        ),
        (
            &image,
            "photo.png",
            "image/png",
            false,
            "attachment; filename*=UTF-8''photo.png",
        ),
        (
            &small_text,
            "notes.txt",
            "text/plain",
            false,
            "attachment; filename*=UTF-8''notes.txt",
        ),
        (
            &small_pdf,
            "small.pdf",
            "application/pdf",
            true,
            "attachment; filename*=UTF-8''small.pdf",
        ),
    ];
    let mut uploaded = Vec::new();
    for (body, name, content_type, declare, disposition) in cases {
        let started = Instant::now();
        let response = upload(
            &mut files,
            "alice",
            metadata(&conversation_id, name, content_type, body, declare),
            body,
        )
        .await
        .unwrap_or_else(|status| panic!("{name}: {status:?}"));
        let file = response.file.unwrap();
        eprintln!(
            "{name}: {} bytes uploaded in {:?}",
            body.len(),
            started.elapsed()
        );
        assert_eq!(file.size_bytes, body.len() as i64, "{name}");
        assert_eq!(file.sha256, sha256_hex(body), "{name}");
        assert_eq!(file.content_type, content_type, "{name}");
        if content_type == "image/png" {
            assert_eq!((file.width, file.height), (1800, 1833));
            assert_eq!(response.message.unwrap().r#type(), pb::MessageType::Image);
        } else {
            assert_eq!(response.message.unwrap().r#type(), pb::MessageType::File);
        }
        assert_object(&s3, &file, &conversation_id, disposition).await;

        // (a) The presigned URL, with plain HTTP and no credentials.
        let url = download_url(&mut files, "bob", &file.file_id).await;
        let fetched = reqwest::get(&url).await.unwrap();
        assert_eq!(fetched.status(), 200, "{name}");
        assert_eq!(fetched.headers()["content-type"], content_type, "{name}");
        assert_eq!(
            fetched.headers()["content-disposition"],
            disposition,
            "{name}"
        );
        assert_eq!(
            sha256_hex(&fetched.bytes().await.unwrap()),
            file.sha256,
            "{name}: presigned URL"
        );
        // (b) DownloadFile.
        let streamed = download(&mut files, "bob", &file.file_id).await;
        assert_eq!(streamed.len(), body.len(), "{name}");
        assert_eq!(sha256_hex(&streamed), file.sha256, "{name}: DownloadFile");
        uploaded.push(file.file_id);
    }
    // Exactly these objects, records and messages; no multipart upload left open.
    assert_nothing_left(
        "after the uploads",
        &mut messaging,
        &key_prefix,
        &conversation_id,
        &uploaded,
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. Replicas share files.

#[tokio::test]
async fn a_file_uploaded_through_one_replica_is_served_by_another() {
    let key_prefix = unique_prefix("cloud-replicas");
    let a = TestServer::start_with(|settings| use_cloud(settings, &key_prefix)).await;
    let b = TestServer::start_with(|settings| use_cloud(settings, &key_prefix)).await;
    let channel_a = a.channel().await;
    let channel_b = b.channel().await;
    let mut messaging_a = Messaging::new(channel_a.clone());
    let mut files_a = Files::new(channel_a);
    let mut files_b = Files::new(channel_b.clone());
    let conversation_id = create_conversation(&mut messaging_a, "alice", &["bob"]).await;

    // Multipart (three 8 MiB parts at the default part size).
    let body = Bytes::from(pdf(17 * MIB + 3));
    let uploaded = upload(
        &mut files_a,
        "alice",
        metadata(
            &conversation_id,
            "shared.pdf",
            "application/pdf",
            &body,
            false,
        ),
        &body,
    )
    .await
    .unwrap()
    .file
    .unwrap();

    let got = files_b
        .get_file(as_user(
            "bob",
            pb::GetFileRequest {
                file_id: uploaded.file_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .file
        .unwrap();
    assert_eq!(got, uploaded);

    let url = download_url(&mut files_b, "bob", &uploaded.file_id).await;
    let fetched = reqwest::get(&url).await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(sha256_hex(&fetched.bytes().await.unwrap()), uploaded.sha256);

    let streamed = download(&mut files_b, "bob", &uploaded.file_id).await;
    assert_eq!(sha256_hex(&streamed), sha256_hex(&body));

    // B also sees the message A posted, and outsiders get nothing from B either.
    let mut messaging_b = Messaging::new(channel_b);
    let posted = history(&mut messaging_b, "bob", &conversation_id).await;
    assert_eq!(
        posted[0].file.as_ref().map(|file| file.file_id.as_str()),
        Some(uploaded.file_id.as_str())
    );
    let status = files_b
        .get_file(as_user(
            "mallory",
            pb::GetFileRequest {
                file_id: uploaded.file_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
}

// ---------------------------------------------------------------------------------------------
// 3. An S3 outage is UNAVAILABLE, never INTERNAL, and health reports it.

/// The service running in the test process without waiting for readiness (which an unreachable
/// S3 server never grants).
struct UnreadyServer {
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    _data_dir: tempfile::TempDir,
    _shutdown: oneshot::Sender<()>,
    _task: JoinHandle<Result<(), StartupError>>,
}

impl UnreadyServer {
    async fn start(customize: impl FnOnce(&mut Settings)) -> Self {
        let data_dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::default();
        settings.server.grpc_addr = "127.0.0.1:0".parse().unwrap();
        settings.server.http_addr = "127.0.0.1:0".parse().unwrap();
        settings.server.health_check_interval = Duration::from_millis(100);
        settings.server.health_check_timeout = Duration::from_millis(500);
        settings.server.shutdown_grace = Duration::from_secs(1);
        settings.storage.data_dir = data_dir.path().join("blobs");
        customize(&mut settings);
        settings.validate().expect("test settings are valid");
        let app = App::bind(settings).await.expect("bind");
        let (grpc_addr, http_addr) = (app.grpc_addr(), app.http_addr());
        let (shutdown, shutdown_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until(async move {
            let _ = shutdown_rx.await;
        }));
        Self {
            grpc_addr,
            http_addr,
            _data_dir: data_dir,
            _shutdown: shutdown,
            _task: task,
        }
    }

    async fn channel(&self) -> Channel {
        let endpoint = Channel::from_shared(format!("http://{}", self.grpc_addr)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match endpoint.connect().await {
                Ok(channel) => return channel,
                Err(error) if Instant::now() > deadline => panic!("connect: {error}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

/// Uploads that must fail because S3 cannot be reached: a small one (PutObject at the end) and
/// one past a part (CreateMultipartUpload); both UNAVAILABLE / BACKEND_UNAVAILABLE.
async fn assert_uploads_unavailable(files: &mut Files, conversation_id: &str) {
    let small = Bytes::from(pdf(100_000));
    let large = Bytes::from(pdf(12 * MIB));
    for (name, body) in [("small.pdf", &small), ("large.pdf", &large)] {
        let started = Instant::now();
        let status = upload(
            files,
            "alice",
            metadata(conversation_id, name, "application/pdf", body, false),
            body,
        )
        .await
        .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{name}: {status:?}");
        assert_eq!(reason(&status), "BACKEND_UNAVAILABLE", "{name}: {status:?}");
        assert!(
            !status.message().contains("127.0.0.1"),
            "internal detail leaked: {status:?}"
        );
        eprintln!("{name}: refused after {:?}", started.elapsed());
    }
}

#[tokio::test]
async fn an_unreachable_s3_server_is_unavailable_not_internal() {
    let key_prefix = unique_prefix("cloud-s3-down");
    let server = UnreadyServer::start(|settings| {
        use_cloud(settings, &key_prefix);
        settings.s3.endpoint = Some(format!("http://127.0.0.1:{}", free_port()));
    })
    .await;
    let channel = server.channel().await;
    let mut files = Files::new(channel.clone());
    let mut messaging = Messaging::new(channel.clone());
    // Redis answers, so conversations work; S3 does not.
    let conversation_id = create_conversation(&mut messaging, "alice", &["bob"]).await;

    // Health: the s3 dependency check fails, so nothing is SERVING and /readyz says 503.
    for service in ["", "messaging.v1.FileRelayService"] {
        assert_eq!(health(&channel, service).await, ServingStatus::NotServing);
    }
    let readyz = reqwest::get(format!("http://{}/readyz", server.http_addr))
        .await
        .unwrap();
    assert_eq!(readyz.status(), 503);
    let gateway = reqwest::get(format!(
        "http://{}/v1/health?service=messaging.v1.FileRelayService",
        server.http_addr
    ))
    .await
    .unwrap();
    assert_eq!(gateway.status(), 503);

    assert_uploads_unavailable(&mut files, &conversation_id).await;
    assert_nothing_left(
        "uploads to an unreachable S3",
        &mut messaging,
        &key_prefix,
        &conversation_id,
        &[],
    )
    .await;
}

/// A TCP relay to the S3 server that the test can cut (every connection closed, the port
/// refusing) and restore on the same port.
struct S3Relay {
    port: u16,
    target: SocketAddr,
    stop: CancellationToken,
    accept: Option<JoinHandle<()>>,
}

impl S3Relay {
    async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut relay = Self {
            port,
            target,
            stop: CancellationToken::new(),
            accept: None,
        };
        relay.serve(listener);
        relay
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn serve(&mut self, listener: TcpListener) {
        let stop = CancellationToken::new();
        self.stop = stop.clone();
        let target = self.target;
        self.accept = Some(tokio::spawn(async move {
            loop {
                let mut inbound = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        () = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        }));
    }

    /// Closes every relayed connection and the listener: connections are refused from now on.
    async fn cut(&mut self) {
        self.stop.cancel();
        if let Some(accept) = self.accept.take() {
            accept.await.unwrap();
        }
    }

    /// Listens on the same port again.
    async fn restore(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(listener) => break listener,
                Err(error) if Instant::now() > deadline => panic!("rebind: {error}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        self.serve(listener);
    }
}

#[tokio::test]
async fn an_s3_outage_turns_health_not_serving_and_uploads_unavailable_until_it_ends() {
    let key_prefix = unique_prefix("cloud-s3-outage");
    let garage: SocketAddr = required_tool("SVC_TEST_S3_ENDPOINT")
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let mut relay = S3Relay::start(garage).await;
    let endpoint = relay.endpoint();
    let server = TestServer::start_with(|settings| {
        use_cloud(settings, &key_prefix);
        settings.s3.endpoint = Some(endpoint);
        settings.server.health_check_timeout = Duration::from_millis(500);
    })
    .await;
    let channel = server.channel().await;
    let mut files = Files::new(channel.clone());
    let mut messaging = Messaging::new(channel.clone());
    let conversation_id = create_conversation(&mut messaging, "alice", &["bob"]).await;
    let before = Bytes::from(pdf(9 * MIB));
    let kept = upload(
        &mut files,
        "alice",
        metadata(
            &conversation_id,
            "before.pdf",
            "application/pdf",
            &before,
            false,
        ),
        &before,
    )
    .await
    .unwrap()
    .file
    .unwrap()
    .file_id;
    // Health is sampled every 100 ms with a 500 ms timeout: on a loaded machine one slow sample
    // may read NOT_SERVING for a moment, so wait for a serving one.
    eventually(Duration::from_secs(10), "health is SERVING", async || {
        health(&channel, "").await == ServingStatus::Serving
    })
    .await;

    relay.cut().await;
    eventually(
        Duration::from_secs(10),
        "health is NOT_SERVING",
        async || {
            health(&channel, "messaging.v1.FileRelayService").await == ServingStatus::NotServing
        },
    )
    .await;
    assert_eq!(
        reqwest::get(server.http_url("/readyz"))
            .await
            .unwrap()
            .status(),
        503
    );
    assert_uploads_unavailable(&mut files, &conversation_id).await;
    // Reading a stored file needs S3 too: UNAVAILABLE as well.
    let status = files
        .download_file(as_user(
            "bob",
            pb::DownloadFileRequest {
                file_id: kept.clone(),
                offset: 0,
            },
        ))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    relay.restore().await;
    eventually(
        Duration::from_secs(10),
        "health is SERVING again",
        async || health(&channel, "").await == ServingStatus::Serving,
    )
    .await;
    assert_nothing_left(
        "uploads during the outage",
        &mut messaging,
        &key_prefix,
        &conversation_id,
        std::slice::from_ref(&kept),
    )
    .await;
    let after = Bytes::from(pdf(100_000));
    upload(
        &mut files,
        "alice",
        metadata(
            &conversation_id,
            "after.pdf",
            "application/pdf",
            &after,
            true,
        ),
        &after,
    )
    .await
    .expect("uploads work again once S3 is back");
    assert_eq!(
        sha256_hex(&download(&mut files, "bob", &kept).await),
        sha256_hex(&before)
    );
}

// ---------------------------------------------------------------------------------------------
// 4. The lifecycle rule is installed at start-up when asked for.

#[tokio::test]
async fn manage_lifecycle_installs_the_rule_at_start_up() {
    let bucket = unique_prefix("cloud-lifecycle");
    garage(&["bucket", "create", &bucket]);
    let key = std::env::var("SVC_TEST_GARAGE_KEY_NAME").unwrap_or_else(|_| "test".to_owned());
    garage(&[
        "bucket", "allow", "--read", "--write", "--owner", &bucket, "--key", &key,
    ]);
    let settings = S3Settings {
        bucket: Some(bucket.clone()),
        ..test_s3_settings()
    };
    let s3 = s3_store(&settings);
    // A fresh bucket has no lifecycle configuration.
    assert!(
        s3.client()
            .get_bucket_lifecycle_configuration()
            .bucket(&bucket)
            .send()
            .await
            .is_err(),
        "a fresh bucket has no rules"
    );

    let key_prefix = unique_prefix("cloud-lifecycle");
    let _server = TestServer::start_with(|server_settings| {
        use_cloud(server_settings, &key_prefix);
        server_settings.s3.bucket = Some(bucket.clone());
        server_settings.s3.manage_lifecycle = true;
        server_settings.uploads.retention = Duration::from_secs(3 * 24 * 3600);
    })
    .await;

    let lifecycle = s3
        .client()
        .get_bucket_lifecycle_configuration()
        .bucket(&bucket)
        .send()
        .await
        .expect("the rules are installed before the server is ready");
    assert_lifecycle_rules(lifecycle.rules(), 3);
}

// ---------------------------------------------------------------------------------------------
// 5. The memory budget bounds concurrent uploads.

/// A server whose uploads share a budget of 24 MiB (21 MiB for whole buffers: two 8 MiB part
/// buffers, 3 MiB for first bytes), waiting at most `wait` for room.
async fn budget_server(key_prefix: &str, wait: Duration) -> TestServer {
    TestServer::start_with(|settings| {
        use_cloud(settings, key_prefix);
        settings.uploads.part_size = bytesize::ByteSize::mib(8);
        settings.uploads.parts_in_flight = 2;
        settings.uploads.memory_budget = bytesize::ByteSize::mib(24);
        settings.uploads.memory_wait_timeout = wait;
    })
    .await
}

/// Starts `count` concurrent uploads of `body` and returns their results.
async fn concurrent_uploads(
    channel: &Channel,
    conversation_id: &str,
    body: &Bytes,
    count: usize,
) -> Vec<Result<pb::FileInfo, tonic::Status>> {
    let uploads = (0..count).map(|index| {
        let mut files = Files::new(channel.clone());
        let meta = metadata(
            conversation_id,
            &format!("burst-{index}.pdf"),
            "application/pdf",
            body,
            index % 2 == 0,
        );
        let body = body.clone();
        tokio::spawn(async move {
            upload(&mut files, "alice", meta, &body)
                .await
                .map(|response| response.file.unwrap())
        })
    });
    futures::future::join_all(uploads)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test]
async fn uploads_beyond_the_memory_budget_wait_their_turn_or_fail_busy_leaving_nothing() {
    let body = Bytes::from(pdf(20_000_000));
    let sha = sha256_hex(&body);

    // A patient server: every upload waits for memory and succeeds.
    let key_prefix = unique_prefix("cloud-budget-wait");
    let server = budget_server(&key_prefix, Duration::from_secs(60)).await;
    let channel = server.channel().await;
    let mut messaging = Messaging::new(channel.clone());
    let conversation_id = create_conversation(&mut messaging, "alice", &[]).await;
    let results = concurrent_uploads(&channel, &conversation_id, &body, 4).await;
    let mut stored = Vec::new();
    for result in results {
        let file = result.expect("with a long wait every upload gets its turn");
        assert_eq!(file.sha256, sha);
        stored.push(file.file_id);
    }
    assert_nothing_left(
        "patient uploads",
        &mut messaging,
        &key_prefix,
        &conversation_id,
        &stored,
    )
    .await;
    let s3 = s3_store(&test_s3_settings());
    let mut files = Files::new(channel.clone());
    for file_id in &stored {
        let file = files
            .get_file(as_user(
                "alice",
                pb::GetFileRequest {
                    file_id: file_id.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .file
            .unwrap();
        assert_object(
            &s3,
            &file,
            &conversation_id,
            &format!("attachment; filename*=UTF-8''{}", file.file_name),
        )
        .await;
    }
    drop(server);

    // An impatient server.
    let key_prefix = unique_prefix("cloud-budget-busy");
    let server = budget_server(&key_prefix, Duration::from_millis(300)).await;
    let channel = server.channel().await;
    let mut messaging = Messaging::new(channel.clone());
    let mut files = Files::new(channel.clone());
    let conversation_id = create_conversation(&mut messaging, "alice", &[]).await;

    // Two slow clients each hold a whole part buffer (they sent more than their first MiB):
    // 16 of the 21 MiB for whole buffers. One more upload cannot get its part buffer within the
    // wait and is refused, leaving nothing. (A client that sent only its first MiB holds only
    // that: see `stalled_uploads_neither_block_others_nor_outlive_the_idle_timeout`.)
    let small = Bytes::from(pdf(3 * MIB));
    let mut slow = Vec::new();
    for index in 0..2 {
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        let mut pending = messages(
            metadata(
                &conversation_id,
                &format!("slow-{index}.pdf"),
                "application/pdf",
                &small,
                false,
            ),
            &small,
            MIB,
        )
        .into_iter();
        // The metadata and two chunks now, the rest later.
        for _ in 0..3 {
            sender.send(pending.next().unwrap()).await.unwrap();
        }
        let mut client = files.clone();
        let call = tokio::spawn(async move {
            client
                .upload_file(as_user(
                    "alice",
                    tokio_stream::wrappers::ReceiverStream::new(receiver),
                ))
                .await
                .map(|response| response.into_inner().file.unwrap())
        });
        slow.push((sender, pending, call));
    }
    // Time for the two to reach the server and reserve their part buffers.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let status = upload(
        &mut files,
        "alice",
        metadata(
            &conversation_id,
            "refused.pdf",
            "application/pdf",
            &small,
            true,
        ),
        &small,
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "UPLOAD_MEMORY_BUSY", "{status:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_nothing_left(
        "an upload refused for memory",
        &mut messaging,
        &key_prefix,
        &conversation_id,
        &[],
    )
    .await;
    // The slow ones finish once their clients send the rest.
    let mut stored = Vec::new();
    for (sender, pending, call) in slow {
        for message in pending {
            sender.send(message).await.unwrap();
        }
        drop(sender);
        let file = call.await.unwrap().expect("the slow uploads complete");
        assert_eq!(file.sha256, sha256_hex(&small));
        stored.push(file.file_id);
    }

    // A burst: each upload either gets memory within the wait or is refused as busy, and the
    // refused ones leave nothing.
    let results = concurrent_uploads(&channel, &conversation_id, &body, 5).await;
    let mut busy = 0;
    for result in results {
        match result {
            Ok(file) => {
                assert_eq!(file.sha256, sha);
                stored.push(file.file_id);
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(reason(&status), "UPLOAD_MEMORY_BUSY", "{status:?}");
                busy += 1;
            }
        }
    }
    eprintln!("burst: {} stored, {busy} refused as busy", 5 - busy);
    // Aborts of refused multipart uploads may still be on their way: give them a moment.
    eventually(
        Duration::from_secs(10),
        "no multipart upload is open",
        async || {
            let s3 = s3_store(&test_s3_settings());
            s3.open_multipart_uploads(&format!("files/{conversation_id}/"))
                .await
                .unwrap()
                .is_empty()
        },
    )
    .await;
    assert_nothing_left(
        "a burst of uploads",
        &mut messaging,
        &key_prefix,
        &conversation_id,
        &stored,
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// 6. Stalled uploads hold only what they sent, and not for long.

/// An upload whose client sends the metadata and `first` chunks, then waits: the sender (to
/// send the rest, or drop to end the stream) and the call. Dropping the sender ends the stream.
async fn stalled_upload(
    files: &Files,
    user: &str,
    metadata: pb::UploadMetadata,
    first: &[Bytes],
) -> (
    tokio::sync::mpsc::Sender<pb::UploadFileRequest>,
    JoinHandle<Result<pb::FileInfo, tonic::Status>>,
) {
    let (sender, receiver) = tokio::sync::mpsc::channel(64);
    sender
        .send(pb::UploadFileRequest {
            payload: Some(Payload::Metadata(metadata)),
        })
        .await
        .unwrap();
    for chunk in first {
        sender
            .send(pb::UploadFileRequest {
                payload: Some(Payload::Chunk(chunk.clone())),
            })
            .await
            .unwrap();
    }
    let mut client = files.clone();
    let user = user.to_owned();
    let call = tokio::spawn(async move {
        client
            .upload_file(as_user(
                &user,
                tokio_stream::wrappers::ReceiverStream::new(receiver),
            ))
            .await
            .map(|response| response.into_inner().file.unwrap())
    });
    (sender, call)
}

/// `body` in 1 MiB slices, the first `count` of them.
fn first_mebibytes(body: &Bytes, count: usize) -> Vec<Bytes> {
    (0..count)
        .map(|index| body.slice(index * MIB..((index + 1) * MIB).min(body.len())))
        .collect()
}

/// Item 4 of issue 9: 40 streams that sent metadata and one byte each reserved a whole part
/// buffer and never ended, so every other upload failed with UPLOAD_MEMORY_BUSY. Now a stalled
/// stream holds only the bytes it sent, a caller has at most `uploads.max_concurrent_per_caller`
/// uploads open (RESOURCE_EXHAUSTED + QuotaFailure), and a stream silent for
/// `uploads.idle_timeout` ends with DEADLINE_EXCEEDED / UPLOAD_IDLE_TIMEOUT, its multipart
/// upload aborted and nothing left.
#[tokio::test]
async fn stalled_uploads_neither_block_others_nor_outlive_the_idle_timeout() {
    let key_prefix = unique_prefix("cloud-idle");
    let idle = Duration::from_secs(5);
    let server = TestServer::start_with(|settings| {
        use_cloud(settings, &key_prefix);
        settings.uploads.part_size = bytesize::ByteSize::mib(8);
        settings.uploads.parts_in_flight = 2;
        settings.uploads.memory_budget = bytesize::ByteSize::mib(24);
        settings.uploads.memory_wait_timeout = Duration::from_secs(1);
        settings.uploads.idle_timeout = idle;
        settings.uploads.max_concurrent_per_caller = 2;
    })
    .await;
    let channel = server.channel().await;
    let mut files = Files::new(channel.clone());
    let mut messaging = Messaging::new(channel);
    let conversation_id =
        create_conversation(&mut messaging, "alice", &["bob", "carol", "dave", "erin"]).await;
    let big = Bytes::from(pdf(20_000_000));
    let big_metadata =
        |name: &str| metadata(&conversation_id, name, "application/pdf", &big, false);

    // Four callers stall after one byte (before: 4 x 8 MiB reserved, more than the budget);
    // bob's second upload stalls after 9 MiB, with a multipart upload open.
    let mut stalled = Vec::new();
    for user in ["bob", "carol", "dave", "erin"] {
        stalled.push(
            stalled_upload(
                &files,
                user,
                big_metadata(&format!("{user}-stalled.pdf")),
                &[big.slice(0..1)],
            )
            .await,
        );
    }
    stalled.push(
        stalled_upload(
            &files,
            "bob",
            big_metadata("bob-stalled-multipart.pdf"),
            &first_mebibytes(&big, 9),
        )
        .await,
    );
    let stalled_since = Instant::now();
    let s3 = s3_store(&test_s3_settings());
    let files_prefix = format!("files/{conversation_id}/");
    eventually(
        Duration::from_secs(10),
        "the stalled multipart upload is open",
        async || {
            s3.open_multipart_uploads(&files_prefix)
                .await
                .unwrap()
                .len()
                == 1
        },
    )
    .await;

    // Another caller's upload goes through at once, while all of them are still open.
    let small = Bytes::from(pdf(2 * MIB));
    let stored = upload(
        &mut files,
        "alice",
        metadata(
            &conversation_id,
            "alice.pdf",
            "application/pdf",
            &small,
            true,
        ),
        &small,
    )
    .await
    .expect("stalled uploads do not block another caller")
    .file
    .unwrap();
    assert!(
        stalled.iter().all(|(_, call)| !call.is_finished()),
        "the stalled uploads were still open"
    );

    // bob has his two uploads open: a third is refused at once, naming the quota.
    let status = upload(
        &mut files,
        "bob",
        metadata(
            &conversation_id,
            "third.pdf",
            "application/pdf",
            &small,
            false,
        ),
        &small,
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "TOO_MANY_UPLOADS", "{status:?}");
    {
        use tonic_types::StatusExt;
        let quota = status.get_details_quota_failure().expect("QuotaFailure");
        assert_eq!(quota.violations[0].subject, "user:bob");
        assert!(
            quota.violations[0]
                .description
                .contains("uploads.max_concurrent_per_caller"),
            "{quota:?}"
        );
    }

    // Each stalled stream ends after the idle timeout, though its client is still there.
    let mut senders = Vec::new();
    for (sender, call) in stalled {
        let status = call.await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert_eq!(reason(&status), "UPLOAD_IDLE_TIMEOUT", "{status:?}");
        senders.push(sender);
    }
    assert!(stalled_since.elapsed() >= idle);
    eventually(
        Duration::from_secs(10),
        "the idle multipart upload is aborted",
        async || {
            s3.open_multipart_uploads(&files_prefix)
                .await
                .unwrap()
                .is_empty()
        },
    )
    .await;
    assert_nothing_left(
        "idle uploads",
        &mut messaging,
        &key_prefix,
        &conversation_id,
        std::slice::from_ref(&stored.file_id),
    )
    .await;
    drop(senders);

    // bob's slots were given back.
    upload(
        &mut files,
        "bob",
        metadata(
            &conversation_id,
            "again.pdf",
            "application/pdf",
            &small,
            false,
        ),
        &small,
    )
    .await
    .expect("bob may upload again");
}

/// The body of an image upload, kept in memory for its thumbnail, counts against
/// `uploads.memory_budget` (before, only part buffers did: a 9 MiB image held one 12 MiB part
/// reservation, and another upload's 12 MiB part still fit beside it).
#[tokio::test]
async fn buffered_image_bodies_count_against_the_memory_budget() {
    let key_prefix = unique_prefix("cloud-image-budget");
    let server = TestServer::start_with(|settings| {
        use_cloud(settings, &key_prefix);
        // 21 MiB for whole buffers (and 3 MiB for first bytes).
        settings.uploads.part_size = bytesize::ByteSize::mib(12);
        settings.uploads.parts_in_flight = 1;
        settings.uploads.memory_budget = bytesize::ByteSize::mib(24);
        settings.uploads.memory_wait_timeout = Duration::from_secs(1);
    })
    .await;
    let channel = server.channel().await;
    let mut files = Files::new(channel.clone());
    let mut messaging = Messaging::new(channel);
    let conversation_id = create_conversation(&mut messaging, "alice", &["dave"]).await;

    // 9 MiB of a 9.3 MiB image: past its first MiB, its whole body is held.
    let image = Bytes::from(png(1800, 1800));
    let sent = 9;
    let (sender, image_call) = stalled_upload(
        &files,
        "alice",
        metadata(&conversation_id, "photo.png", "image/png", &image, true),
        &first_mebibytes(&image, sent),
    )
    .await;
    // Time for the chunks to reach the server.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A document's 12 MiB part buffer does not fit in the 11.7 MiB left: refused after the
    // wait, leaving nothing.
    let document = Bytes::from(pdf(5 * MIB));
    let document_metadata = metadata(
        &conversation_id,
        "report.pdf",
        "application/pdf",
        &document,
        true,
    );
    let started = Instant::now();
    let status = upload(&mut files, "dave", document_metadata.clone(), &document)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "UPLOAD_MEMORY_BUSY", "{status:?}");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(!image_call.is_finished());

    // The image completes (its thumbnail made within the budget), and then the document fits.
    for chunk in first_mebibytes(&image, image.len().div_ceil(MIB))
        .into_iter()
        .skip(sent)
    {
        sender
            .send(pb::UploadFileRequest {
                payload: Some(Payload::Chunk(chunk)),
            })
            .await
            .unwrap();
    }
    drop(sender);
    let photo = image_call
        .await
        .unwrap()
        .expect("the image upload completes");
    assert_eq!((photo.width, photo.height), (1800, 1800));
    let report = upload(&mut files, "dave", document_metadata, &document)
        .await
        .expect("the document fits once the image is done")
        .file
        .unwrap();
    assert_nothing_left(
        "image budget",
        &mut messaging,
        &key_prefix,
        &conversation_id,
        &[photo.file_id, report.file_id],
    )
    .await;
}

/// A stream that trickles (every message well inside the idle timeout) still ends at
/// `uploads.max_duration` with DEADLINE_EXCEEDED / UPLOAD_TOO_LONG, its multipart upload aborted;
/// time the server spends on its own (here nothing) is not counted as the client's idleness.
#[tokio::test]
async fn a_trickling_upload_ends_at_the_maximum_duration() {
    let key_prefix = unique_prefix("cloud-trickle");
    let server = TestServer::start_with(|settings| {
        use_cloud(settings, &key_prefix);
        settings.uploads.idle_timeout = Duration::from_secs(2);
        settings.uploads.max_duration = Duration::from_secs(3);
    })
    .await;
    let channel = server.channel().await;
    let files = Files::new(channel.clone());
    let mut messaging = Messaging::new(channel);
    let conversation_id = create_conversation(&mut messaging, "alice", &["bob"]).await;
    let big = Bytes::from(pdf(20 * MIB));
    // 9 MiB at once (a multipart upload opens), then 1 KiB every 500 ms.
    let (sender, call) = stalled_upload(
        &files,
        "alice",
        metadata(&conversation_id, "slow.pdf", "application/pdf", &big, false),
        &first_mebibytes(&big, 9),
    )
    .await;
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        let mut offset = 9 * MIB;
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let chunk = pb::UploadFileRequest {
                payload: Some(Payload::Chunk(big.slice(offset..offset + 1024))),
            };
            if sender.send(chunk).await.is_err() {
                return;
            }
            offset += 1024;
        }
    });
    let status = call.await.unwrap().unwrap_err();
    let took = started.elapsed();
    trickle.abort();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(reason(&status), "UPLOAD_TOO_LONG", "{status:?}");
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(8),
        "{took:?}"
    );
    eventually(Duration::from_secs(10), "nothing is left", async || {
        bucket_leftovers(&conversation_id).await.is_empty()
    })
    .await;
}
