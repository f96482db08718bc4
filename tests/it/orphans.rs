//! The orphan janitor (issue 15) on the real Redis and Garage: a multipart upload left open by a
//! replica SIGKILLed mid-upload is aborted once older than `uploads.orphan_age`, while the one a
//! live resumable upload session stages into is kept (and the upload then completes); an object
//! whose record was never written and a record whose object is gone are removed; a healthy file
//! is left alone. Each test has a bucket of its own: a janitor with a 1 s threshold would take
//! the other tests' uploads in progress for orphans.

use std::time::Duration;

use bytes::Bytes;
use svc_messaging::{
    config::S3Settings,
    grpc::pb::{self, upload_file_request::Payload},
    store::blobs::{BlobAttributes, BlobStore},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, transport::Channel};

use crate::support::cloud::*;
use crate::support::{
    ServiceProcess, TestServer, as_user, create_conversation, reason, required_tool, sha256_hex,
    test_s3_settings, unique_prefix,
};

const PART: usize = 8 * MIB;

/// A bucket of the test's own, writable with the test key.
fn own_bucket(test: &str) -> S3Settings {
    let bucket = unique_prefix(test);
    garage(&["bucket", "create", &bucket]);
    let key = std::env::var("SVC_TEST_GARAGE_KEY_NAME").unwrap_or_else(|_| "test".to_owned());
    garage(&[
        "bucket", "allow", "--read", "--write", "--owner", &bucket, "--key", &key,
    ]);
    S3Settings {
        bucket: Some(bucket),
        ..test_s3_settings()
    }
}

/// A janitor with a 1 s threshold, running every 200 ms.
async fn janitor_server(key_prefix: &str, s3: &S3Settings) -> TestServer {
    TestServer::start_with(|settings| {
        use_cloud(settings, key_prefix);
        settings.s3 = s3.clone();
        settings.uploads.idle_timeout = Duration::from_secs(2);
        settings.uploads.orphan_age = Duration::from_secs(1);
        settings.uploads.orphan_sweep_interval = Duration::from_millis(200);
    })
    .await
}

/// Keys of the multipart uploads open under `prefix`.
async fn open_uploads(s3: &S3Settings, prefix: &str) -> Vec<String> {
    s3_store(s3).open_multipart_uploads(prefix).await.unwrap()
}

fn process_env(key_prefix: &str, s3: &S3Settings) -> Vec<(&'static str, String)> {
    vec![
        ("SVC_MESSAGING__STORAGE__MESSAGES", "redis".to_owned()),
        (
            "SVC_MESSAGING__REDIS__URL",
            required_tool("SVC_TEST_REDIS_URL"),
        ),
        ("SVC_MESSAGING__REDIS__KEY_PREFIX", key_prefix.to_owned()),
        ("SVC_MESSAGING__STORAGE__BLOBS", "s3".to_owned()),
        ("SVC_MESSAGING__UPLOADS__IDLE_TIMEOUT", "2s".to_owned()),
        (
            "SVC_MESSAGING__S3__ENDPOINT",
            required_tool("SVC_TEST_S3_ENDPOINT"),
        ),
        (
            "SVC_MESSAGING__S3__REGION",
            required_tool("SVC_TEST_S3_REGION"),
        ),
        ("SVC_MESSAGING__S3__BUCKET", s3.bucket.clone().unwrap()),
        (
            "SVC_MESSAGING__S3__ACCESS_KEY_ID",
            required_tool("SVC_TEST_S3_ACCESS_KEY_ID"),
        ),
        (
            "SVC_MESSAGING__S3__SECRET_ACCESS_KEY",
            required_tool("SVC_TEST_S3_SECRET_ACCESS_KEY"),
        ),
        ("SVC_MESSAGING__S3__FORCE_PATH_STYLE", "true".to_owned()),
    ]
}

/// An UploadFile fed message by message; its sender is dropped with the process it talks to.
fn open_upload(channel: Channel, user: &str) -> mpsc::Sender<pb::UploadFileRequest> {
    let (sender, receiver) = mpsc::channel(4);
    let mut files = Files::new(channel);
    let request = as_user(user, ReceiverStream::new(receiver));
    tokio::spawn(async move { files.upload_file(request).await });
    sender
}

fn chunks(body: &Bytes) -> Vec<pb::UploadFileRequest> {
    (0..body.len())
        .step_by(MIB)
        .map(|start| pb::UploadFileRequest {
            payload: Some(Payload::Chunk(
                body.slice(start..(start + MIB).min(body.len())),
            )),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replicas_multipart_upload_is_aborted_and_a_live_sessions_is_kept() {
    let s3 = own_bucket("orphan-mpu");
    let key_prefix = unique_prefix("orphan-mpu");
    let env = process_env(&key_prefix, &s3);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut replica = ServiceProcess::spawn(&env);
    let channel = Channel::from_shared(format!("http://{}", replica.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut messaging = Messaging::new(channel.clone());
    let mut files = Files::new(channel.clone());
    let one_shot_conversation = create_conversation(&mut messaging, "alice", &["bob"]).await;
    let resumable_conversation = create_conversation(&mut messaging, "alice", &["bob"]).await;
    let body = Bytes::from(pdf(20 * MIB + 3));

    // A one-shot upload: its multipart upload opens with the first 8 MiB part.
    let one_shot = open_upload(channel.clone(), "alice");
    let mut first = vec![pb::UploadFileRequest {
        payload: Some(Payload::Metadata(metadata(
            &one_shot_conversation,
            "o.pdf",
            "application/pdf",
            &body,
            false,
        ))),
    }];
    first.extend(chunks(&body.slice(..12 * MIB)));
    for message in first {
        one_shot.send(message).await.unwrap();
    }
    // A resumable one, with a part durable in its session.
    let request_id = "orphan-mpu-resumable";
    let declared = pb::UploadMetadata {
        request_id: request_id.to_owned(),
        ..metadata(
            &resumable_conversation,
            "r.pdf",
            "application/pdf",
            &body,
            false,
        )
    };
    let resumable = open_upload(channel.clone(), "alice");
    resumable
        .send(pb::UploadFileRequest {
            payload: Some(Payload::Metadata(declared.clone())),
        })
        .await
        .unwrap();
    for message in chunks(&body.slice(..12 * MIB)) {
        resumable.send(message).await.unwrap();
    }
    eventually(
        Duration::from_secs(20),
        "a resumable part is durable",
        async || {
            let status = files
                .get_upload_status(as_user(
                    "alice",
                    pb::GetUploadStatusRequest {
                        request_id: request_id.to_owned(),
                    },
                ))
                .await
                .unwrap()
                .into_inner();
            status.committed_size as usize >= PART
        },
    )
    .await;
    let one_shot_prefix = format!("files/{one_shot_conversation}/");
    eventually(
        Duration::from_secs(20),
        "the one-shot upload is open",
        async || !open_uploads(&s3, &one_shot_prefix).await.is_empty(),
    )
    .await;
    replica.signal("KILL");
    replica.wait_exit(Duration::from_secs(10)).expect("killed");
    drop((one_shot, resumable));
    let resumable_prefix = format!("files/{resumable_conversation}/");
    assert_eq!(open_uploads(&s3, &resumable_prefix).await.len(), 1);

    // Another replica's janitor aborts the orphan, not the session's staged parts.
    let janitor = janitor_server(&key_prefix, &s3).await;
    eventually(
        Duration::from_secs(20),
        "the killed replica's multipart upload is aborted",
        async || open_uploads(&s3, &one_shot_prefix).await.is_empty(),
    )
    .await;
    assert_eq!(
        open_uploads(&s3, &resumable_prefix).await.len(),
        1,
        "the live session's multipart upload was aborted"
    );

    // The session carries on from its durable parts on the janitor's replica.
    let mut files = Files::new(janitor.channel().await);
    let mut resend = vec![pb::UploadFileRequest {
        payload: Some(Payload::Metadata(declared)),
    }];
    resend.extend(chunks(&body));
    let started = std::time::Instant::now();
    let done = loop {
        match upload_messages(&mut files, "alice", resend.clone()).await {
            Err(status) if reason(&status) == "UPLOAD_IN_PROGRESS" => {
                assert!(started.elapsed() < Duration::from_secs(10), "still held");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answer => break answer.expect("the resumable upload completes"),
        }
    };
    let file = done.file.unwrap();
    assert_eq!(file.sha256, sha256_hex(&body));
    assert_eq!(download(&mut files, "bob", &file.file_id).await, body);
    assert!(open_uploads(&s3, "files/").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_without_records_and_records_without_objects_are_removed() {
    let s3 = own_bucket("orphan-objects");
    let key_prefix = unique_prefix("orphan-objects");
    let store = s3_store(&s3);

    // Files stored by a replica whose janitor waits an hour (the default).
    let (healthy, lost_object, conversation_id) = {
        let server = TestServer::start_with(|settings| {
            use_cloud(settings, &key_prefix);
            settings.s3 = s3.clone();
        })
        .await;
        let channel = server.channel().await;
        let mut messaging = Messaging::new(channel.clone());
        let mut files = Files::new(channel);
        let conversation_id = create_conversation(&mut messaging, "alice", &["bob"]).await;
        let mut stored = Vec::new();
        for name in ["kept.pdf", "lost.pdf"] {
            let body = Bytes::from(pdf(64 * 1024));
            let meta = metadata(&conversation_id, name, "application/pdf", &body, false);
            let done = upload(&mut files, "alice", meta, &body).await.unwrap();
            stored.push(done.file.unwrap().file_id);
        }
        (stored[0].clone(), stored[1].clone(), conversation_id)
    };
    // The object of one file vanishes; an object is written whose record never was.
    store
        .delete(&format!("files/{conversation_id}/{lost_object}"))
        .await
        .unwrap();
    let stray = format!("files/{conversation_id}/{}", uuid::Uuid::now_v7());
    store
        .put(
            &stray,
            BlobAttributes {
                content_type: "application/pdf".to_owned(),
                content_disposition: "attachment".to_owned(),
                metadata: Vec::new(),
                size: None,
            },
            Bytes::from(pdf(1024)),
        )
        .await
        .unwrap();
    assert!(file_records(&key_prefix).contains(&lost_object));

    let janitor = janitor_server(&key_prefix, &s3).await;
    eventually(
        Duration::from_secs(20),
        "the stray object is removed",
        async || !store.exists(&stray).await.unwrap(),
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "the record without an object is removed",
        async || !file_records(&key_prefix).contains(&lost_object),
    )
    .await;
    let mut files = Files::new(janitor.channel().await);
    let gone = files
        .get_file(as_user(
            "alice",
            pb::GetFileRequest {
                file_id: lost_object.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    // The healthy file keeps its record and its object.
    assert!(file_records(&key_prefix).contains(&healthy));
    assert_eq!(download(&mut files, "bob", &healthy).await.len(), 64 * 1024);
}

/// Makes a file look written an hour ago.
fn age_file(path: &std::path::Path) {
    let file = std::fs::File::options().write(true).open(path).unwrap();
    file.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
}

/// The filesystem store (the zero-setup default): a stray object, a stray incoming file (a
/// one-shot upload whose process died) are removed; a live resumable session's staging file,
/// as old as they are, is kept, and a healthy file too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filesystem_store_is_swept_too_but_a_live_sessions_staging_file_is_kept() {
    let server = TestServer::start_with(|settings| {
        settings.uploads.idle_timeout = Duration::from_secs(2);
        settings.uploads.orphan_age = Duration::from_secs(1);
        settings.uploads.orphan_sweep_interval = Duration::from_millis(200);
    })
    .await;
    let root = server.data_dir.path().join("blobs");
    let channel = server.channel().await;
    let mut messaging = Messaging::new(channel.clone());
    let mut files = Files::new(channel.clone());
    let conversation_id = create_conversation(&mut messaging, "alice", &["bob"]).await;

    let small = Bytes::from(pdf(64 * 1024));
    let meta = metadata(
        &conversation_id,
        "kept.pdf",
        "application/pdf",
        &small,
        false,
    );
    let healthy = upload(&mut files, "alice", meta, &small)
        .await
        .unwrap()
        .file
        .unwrap()
        .file_id;

    // A resumable upload with a durable part, then cut.
    let body = Bytes::from(pdf(12 * MIB));
    let request_id = "orphan-fs-resumable";
    let declared = pb::UploadMetadata {
        request_id: request_id.to_owned(),
        ..metadata(&conversation_id, "r.pdf", "application/pdf", &body, false)
    };
    let resumable = open_upload(channel.clone(), "alice");
    resumable
        .send(pb::UploadFileRequest {
            payload: Some(Payload::Metadata(declared)),
        })
        .await
        .unwrap();
    for message in chunks(&body.slice(..10 * MIB)) {
        resumable.send(message).await.unwrap();
    }
    eventually(Duration::from_secs(20), "a part is durable", async || {
        let status = files
            .get_upload_status(as_user(
                "alice",
                pb::GetUploadStatusRequest {
                    request_id: request_id.to_owned(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        status.committed_size as usize >= PART
    })
    .await;
    drop(resumable);
    let staged: Vec<_> = std::fs::read_dir(root.join("staged"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert_eq!(staged.len(), 1, "{staged:?}");

    // Strays, all as old as the staging file is made to look.
    let stray_object = root
        .join("objects/files")
        .join(&conversation_id)
        .join(uuid::Uuid::now_v7().to_string());
    std::fs::write(&stray_object, b"%PDF-1.4 stray").unwrap();
    let stray_incoming = root
        .join("incoming")
        .join(uuid::Uuid::now_v7().simple().to_string());
    std::fs::write(&stray_incoming, b"half an upload").unwrap();
    for path in [&stray_object, &stray_incoming, &staged[0]] {
        age_file(path);
    }
    eventually(
        Duration::from_secs(20),
        "the strays are removed",
        async || !stray_object.exists() && !stray_incoming.exists(),
    )
    .await;
    assert!(
        staged[0].exists(),
        "the live session's staging file was removed"
    );
    assert_eq!(download(&mut files, "bob", &healthy).await, small);
}
