//! Resumable uploads (issue 11) on the real Redis and Garage, with two replicas: an upload cut
//! on one replica completes on another; a replica SIGKILLed mid-upload, and the filesystem
//! default restarted mid-upload, are resumed; a retry after completion returns the same file;
//! one writer at a time; offsets past the durable bytes, unknown request ids and reused ones
//! are refused; an expired session is discarded with its multipart upload; an invalid file found
//! only at the end of a resumed upload leaves nothing behind.

use std::time::Duration;

use bytes::Bytes;
use svc_messaging::grpc::pb::{self, upload_file_request::Payload};
use tokio::{sync::mpsc, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, transport::Channel};

use crate::support::cloud::*;
use crate::support::{
    ServiceProcess, TestServer, as_user, create_conversation, reason, required_tool, sha256_hex,
    unique_prefix,
};

/// `uploads.resume_part_size`, the default.
const PART: usize = 5 * MIB;

fn resumable_metadata(
    conversation_id: &str,
    name: &str,
    content_type: &str,
    body: &[u8],
    request_id: &str,
) -> pb::UploadMetadata {
    pb::UploadMetadata {
        request_id: request_id.to_owned(),
        ..metadata(conversation_id, name, content_type, body, false)
    }
}

fn resume_message(request_id: &str, write_offset: usize) -> pb::UploadFileRequest {
    pb::UploadFileRequest {
        payload: Some(Payload::Resume(pb::UploadResume {
            request_id: request_id.to_owned(),
            write_offset: write_offset as i64,
        })),
    }
}

/// `body[from..]` in 1 MiB chunks.
fn chunks_from(body: &Bytes, from: usize) -> Vec<pb::UploadFileRequest> {
    (from..body.len())
        .step_by(MIB)
        .map(|start| pb::UploadFileRequest {
            payload: Some(Payload::Chunk(
                body.slice(start..(start + MIB).min(body.len())),
            )),
        })
        .collect()
}

async fn status(
    files: &mut Files,
    user: &str,
    request_id: &str,
) -> Result<pb::GetUploadStatusResponse, tonic::Status> {
    files
        .get_upload_status(as_user(
            user,
            pb::GetUploadStatusRequest {
                request_id: request_id.to_owned(),
            },
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// An UploadFile the test feeds message by message, and can cut (dropping the call resets the
/// stream, as a lost connection would).
struct OpenUpload {
    sender: mpsc::Sender<pb::UploadFileRequest>,
    call: JoinHandle<Result<pb::UploadFileResponse, tonic::Status>>,
}

impl OpenUpload {
    fn start(channel: Channel, user: &str) -> Self {
        let (sender, receiver) = mpsc::channel(4);
        let mut files = Files::new(channel);
        let request = as_user(user, ReceiverStream::new(receiver));
        let call = tokio::spawn(async move {
            files
                .upload_file(request)
                .await
                .map(tonic::Response::into_inner)
        });
        Self { sender, call }
    }

    async fn send(&self, messages: impl IntoIterator<Item = pb::UploadFileRequest>) {
        for message in messages {
            // The call may already have ended (refused); its result says why.
            if self.sender.send(message).await.is_err() {
                return;
            }
        }
    }

    async fn finish(self) -> Result<pb::UploadFileResponse, tonic::Status> {
        drop(self.sender);
        self.call.await.unwrap()
    }

    fn cut(self) {
        self.call.abort();
    }
}

/// UploadFile with `messages`, retried while another writer still holds the upload, for at
/// most `limit`.
async fn upload_when_free(
    files: &mut Files,
    user: &str,
    messages: Vec<pb::UploadFileRequest>,
    limit: Duration,
) -> Result<pb::UploadFileResponse, tonic::Status> {
    let started = std::time::Instant::now();
    loop {
        match upload_messages(files, user, messages.clone()).await {
            Err(status) if reason(&status) == "UPLOAD_IN_PROGRESS" => {
                assert!(
                    started.elapsed() < limit,
                    "the upload was still held after {limit:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            answer => return answer,
        }
    }
}

/// Waits until the upload has at least `at_least` bytes durable; returns its status.
async fn committed_at_least(
    files: &mut Files,
    user: &str,
    request_id: &str,
    at_least: usize,
) -> pb::GetUploadStatusResponse {
    let mut last = None;
    eventually(Duration::from_secs(20), "parts are durable", async || {
        let current = status(files, user, request_id).await.unwrap();
        let reached = current.committed_size as usize >= at_least;
        last = Some(current);
        reached
    })
    .await;
    last.unwrap()
}

/// Waits until the committed size stops changing (the cut writer recorded its last parts).
async fn settled(files: &mut Files, user: &str, request_id: &str) -> pb::GetUploadStatusResponse {
    let mut previous = status(files, user, request_id).await.unwrap();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let current = status(files, user, request_id).await.unwrap();
        assert!(
            current.committed_size >= previous.committed_size,
            "committed_size went back from {} to {}",
            previous.committed_size,
            current.committed_size
        );
        if current.committed_size == previous.committed_size {
            return current;
        }
        previous = current;
    }
}

/// Asserts the file is stored whole and was announced exactly once.
async fn assert_stored_once(
    files: &mut Files,
    messaging: &mut Messaging,
    conversation_id: &str,
    file: &pb::FileInfo,
    body: &[u8],
) {
    assert_eq!(file.sha256, sha256_hex(body));
    assert_eq!(file.size_bytes as usize, body.len());
    assert_eq!(download(files, "bob", &file.file_id).await, body);
    let announcements: Vec<String> = history(messaging, "alice", conversation_id)
        .await
        .into_iter()
        .filter_map(|message| message.file.map(|file| file.file_id))
        .collect();
    assert_eq!(announcements, vec![file.file_id.clone()]);
    let open: Vec<String> = bucket_leftovers(conversation_id)
        .await
        .into_iter()
        .filter(|left| left.starts_with("open multipart"))
        .collect();
    assert!(open.is_empty(), "open multipart uploads remain: {open:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_on_one_replica_completes_on_another_and_a_retry_finds_it() {
    let key_prefix = unique_prefix("resume-replicas");
    let a = TestServer::start_with(|settings| use_cloud(settings, &key_prefix)).await;
    let b = TestServer::start_with(|settings| use_cloud(settings, &key_prefix)).await;
    let mut messaging = Messaging::new(a.channel().await);
    let mut files_a = Files::new(a.channel().await);
    let mut files_b = Files::new(b.channel().await);
    let conversation_id = create_conversation(&mut messaging, "alice", &["bob"]).await;
    let body = Bytes::from(pdf(30 * MIB + 123));
    let request_id = "0b6a1c52-resume-replicas";
    let meta = resumable_metadata(
        &conversation_id,
        "report.pdf",
        "application/pdf",
        &body,
        request_id,
    );

    // About 20 MB to replica A, then the connection is lost.
    let first = OpenUpload::start(a.channel().await, "alice");
    first
        .send([pb::UploadFileRequest {
            payload: Some(Payload::Metadata(meta.clone())),
        }])
        .await;
    first.send(chunks_from(&body.slice(..20 * MIB), 0)).await;
    committed_at_least(&mut files_b, "alice", request_id, PART).await;
    first.cut();

    // Replica B knows how far it got: whole parts only, never more than was sent.
    let known = settled(&mut files_b, "alice", request_id).await;
    let committed = known.committed_size as usize;
    assert!((PART..=20 * MIB).contains(&committed), "{committed}");
    assert_eq!(committed % PART, 0);
    assert_eq!(known.size_bytes as usize, body.len());
    assert!(!known.complete && known.file.is_none());
    assert!(known.expire_time.is_some());
    // Scoped to its caller.
    let other = status(&mut files_b, "bob", request_id).await.unwrap_err();
    assert_eq!(other.code(), Code::NotFound);
    assert_eq!(reason(&other), "UPLOAD_NOT_FOUND");

    // Resumed on B from committed_size, as soon as A noticed the cut and let go (far sooner
    // than the 30 s idle timeout after which a vanished writer loses the upload).
    let mut resumed = vec![resume_message(request_id, committed)];
    resumed.extend(chunks_from(&body, committed));
    let done = upload_when_free(&mut files_b, "alice", resumed, Duration::from_secs(5))
        .await
        .unwrap();
    let file = done.file.unwrap();
    assert_stored_once(&mut files_b, &mut messaging, &conversation_id, &file, &body).await;
    let finished = status(&mut files_a, "alice", request_id).await.unwrap();
    assert!(finished.complete);
    assert_eq!(finished.committed_size as usize, body.len());
    assert_eq!(finished.file.as_ref(), Some(&file));

    // A retry after completion (the response was lost) returns the same file and message, on
    // either replica, and stores nothing more.
    let message_id = done.message.unwrap().message_id;
    for files in [&mut files_a, &mut files_b] {
        let again = upload(files, "alice", meta.clone(), &body).await.unwrap();
        assert_eq!(again.file.as_ref(), Some(&file));
        assert_eq!(again.message.unwrap().message_id, message_id);
    }
    let by_resume = upload_messages(&mut files_a, "alice", vec![resume_message(request_id, 0)])
        .await
        .unwrap();
    assert_eq!(by_resume.file.as_ref(), Some(&file));
    assert_stored_once(&mut files_a, &mut messaging, &conversation_id, &file, &body).await;

    // The same request id for different metadata is refused.
    let mut changed = meta.clone();
    changed.caption = "another caption".to_owned();
    let reused = upload(&mut files_a, "alice", changed, &body)
        .await
        .unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists);
    assert_eq!(reason(&reused), "REQUEST_ID_REUSED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_is_refused_while_the_first_keeps_going() {
    let key_prefix = unique_prefix("resume-writers");
    let a = TestServer::start_with(|settings| use_cloud(settings, &key_prefix)).await;
    let b = TestServer::start_with(|settings| use_cloud(settings, &key_prefix)).await;
    let mut messaging = Messaging::new(a.channel().await);
    let mut files_b = Files::new(b.channel().await);
    let conversation_id = create_conversation(&mut messaging, "alice", &["bob"]).await;
    let body = Bytes::from(pdf(10 * MIB));
    let request_id = "writers-1";
    let meta = resumable_metadata(
        &conversation_id,
        "w.pdf",
        "application/pdf",
        &body,
        request_id,
    );

    let first = OpenUpload::start(a.channel().await, "alice");
    first
        .send([pb::UploadFileRequest {
            payload: Some(Payload::Metadata(meta.clone())),
        }])
        .await;
    first.send(chunks_from(&body.slice(..3 * MIB), 0)).await;
    // The session exists once the first writer began (its status is readable).
    eventually(Duration::from_secs(10), "the session exists", async || {
        status(&mut files_b, "alice", request_id).await.is_ok()
    })
    .await;

    for second in [
        vec![pb::UploadFileRequest {
            payload: Some(Payload::Metadata(meta.clone())),
        }],
        vec![resume_message(request_id, 0)],
    ] {
        let refused = upload_messages(&mut files_b, "alice", second)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
        assert_eq!(reason(&refused), "UPLOAD_IN_PROGRESS");
    }

    // The first carries on undisturbed.
    first.send(chunks_from(&body, 3 * MIB)).await;
    let file = first.finish().await.unwrap().file.unwrap();
    assert_stored_once(&mut files_b, &mut messaging, &conversation_id, &file, &body).await;
}

#[tokio::test]
async fn offsets_past_the_durable_bytes_and_unknown_request_ids_are_refused() {
    let key_prefix = unique_prefix("resume-refusals");
    let server = TestServer::start_with(|settings| use_cloud(settings, &key_prefix)).await;
    let channel = server.channel().await;
    let mut messaging = Messaging::new(channel.clone());
    let mut files = Files::new(channel.clone());
    let conversation_id = create_conversation(&mut messaging, "alice", &["bob"]).await;
    let body = Bytes::from(pdf(12 * MIB));
    let request_id = "refusals-1";

    let unknown = upload_messages(&mut files, "alice", vec![resume_message("never-sent", 0)])
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(reason(&unknown), "UPLOAD_NOT_FOUND");
    let unknown = status(&mut files, "alice", "never-sent").await.unwrap_err();
    assert_eq!(reason(&unknown), "UPLOAD_NOT_FOUND");
    let bad = status(&mut files, "alice", &"x".repeat(65))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    // 9 MiB sent, then the stream ends early: one part is durable, and the upload says so.
    let meta = resumable_metadata(
        &conversation_id,
        "r.pdf",
        "application/pdf",
        &body,
        request_id,
    );
    let mut partial = vec![pb::UploadFileRequest {
        payload: Some(Payload::Metadata(meta.clone())),
    }];
    partial.extend(chunks_from(&body.slice(..9 * MIB), 0));
    let short = upload_messages(&mut files, "alice", partial)
        .await
        .unwrap_err();
    assert_eq!(short.code(), Code::FailedPrecondition, "{short:?}");
    assert_eq!(reason(&short), "SIZE_MISMATCH");
    let known = status(&mut files, "alice", request_id).await.unwrap();
    assert_eq!(known.committed_size as usize, PART);

    let ahead = upload_messages(
        &mut files,
        "alice",
        vec![resume_message(request_id, PART + 1)],
    )
    .await
    .unwrap_err();
    assert_eq!(ahead.code(), Code::OutOfRange);
    assert_eq!(reason(&ahead), "WRITE_OFFSET_AHEAD");
    let empty_resume = upload_messages(&mut files, "alice", vec![resume_message(request_id, 0)])
        .await
        .unwrap_err();
    // A resume with no content at all ends short too, and keeps what is durable.
    assert_eq!(reason(&empty_resume), "SIZE_MISMATCH");
    assert_eq!(
        status(&mut files, "alice", request_id)
            .await
            .unwrap()
            .committed_size as usize,
        PART
    );

    // Resuming below the committed size resends bytes the server skips.
    let mut rest = vec![resume_message(request_id, PART - MIB)];
    rest.extend(chunks_from(&body, PART - MIB));
    let file = upload_messages(&mut files, "alice", rest)
        .await
        .unwrap()
        .file
        .unwrap();
    assert_stored_once(&mut files, &mut messaging, &conversation_id, &file, &body).await;

    // A resumable image gets its thumbnail like any other.
    let png = Bytes::from(png(640, 480));
    let image = upload(
        &mut files,
        "alice",
        resumable_metadata(&conversation_id, "p.png", "image/png", &png, "image-1"),
        &png,
    )
    .await
    .unwrap()
    .file
    .unwrap();
    assert!(image.has_thumbnail);
    assert_eq!((image.width, image.height), (640, 480));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_found_only_at_the_end_of_a_resumed_upload_leaves_nothing() {
    let key_prefix = unique_prefix("resume-invalid");
    let server = TestServer::start_with(|settings| use_cloud(settings, &key_prefix)).await;
    let channel = server.channel().await;
    let mut messaging = Messaging::new(channel.clone());
    let mut files = Files::new(channel.clone());
    let conversation_id = create_conversation(&mut messaging, "alice", &["bob"]).await;
    // A PDF that does not end with %%EOF: only its last bytes show it.
    let mut bytes = pdf(18 * MIB);
    let len = bytes.len();
    bytes[len - 7..].copy_from_slice(b"garbage");
    let body = Bytes::from(bytes);
    let request_id = "invalid-1";
    let meta = resumable_metadata(
        &conversation_id,
        "bad.pdf",
        "application/pdf",
        &body,
        request_id,
    );
    let mut partial = vec![pb::UploadFileRequest {
        payload: Some(Payload::Metadata(meta)),
    }];
    partial.extend(chunks_from(&body.slice(..17 * MIB), 0));
    upload_messages(&mut files, "alice", partial)
        .await
        .unwrap_err();
    let committed = status(&mut files, "alice", request_id)
        .await
        .unwrap()
        .committed_size as usize;
    assert_eq!(committed, 17 * MIB / PART * PART);
    assert!(!bucket_leftovers(&conversation_id).await.is_empty());

    let mut rest = vec![resume_message(request_id, committed)];
    rest.extend(chunks_from(&body, committed));
    let refused = upload_messages(&mut files, "alice", rest)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(reason(&refused), "MALFORMED_DOCUMENT");
    assert_nothing_left(
        "invalid at the end",
        &mut messaging,
        &key_prefix,
        &conversation_id,
        &[],
    )
    .await;
    let gone = status(&mut files, "alice", request_id).await.unwrap_err();
    assert_eq!(reason(&gone), "UPLOAD_NOT_FOUND");
    assert!(
        redis_keys(&format!("{key_prefix}:*upload*")).is_empty(),
        "session keys remain"
    );

    // In one stream, refused while its first part is still on its way (no session recorded
    // it yet): that multipart upload goes too.
    let mut bytes = pdf(9 * MIB);
    let len = bytes.len();
    bytes[len - 7..].copy_from_slice(b"garbage");
    let body = Bytes::from(bytes);
    let meta = resumable_metadata(
        &conversation_id,
        "bad2.pdf",
        "application/pdf",
        &body,
        "invalid-2",
    );
    let refused = upload(&mut files, "alice", meta, &body).await.unwrap_err();
    assert_eq!(reason(&refused), "MALFORMED_DOCUMENT");
    assert_nothing_left(
        "invalid in one stream",
        &mut messaging,
        &key_prefix,
        &conversation_id,
        &[],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_is_discarded_with_its_multipart_upload() {
    let key_prefix = unique_prefix("resume-expiry");
    let server = TestServer::start_with(|settings| {
        use_cloud(settings, &key_prefix);
        settings.uploads.session_ttl = Duration::from_secs(3);
    })
    .await;
    let channel = server.channel().await;
    let mut messaging = Messaging::new(channel.clone());
    let mut files = Files::new(channel.clone());
    let conversation_id = create_conversation(&mut messaging, "alice", &["bob"]).await;
    let body = Bytes::from(pdf(12 * MIB));
    let request_id = "expiry-1";
    let meta = resumable_metadata(
        &conversation_id,
        "e.pdf",
        "application/pdf",
        &body,
        request_id,
    );
    let mut partial = vec![pb::UploadFileRequest {
        payload: Some(Payload::Metadata(meta)),
    }];
    partial.extend(chunks_from(&body.slice(..9 * MIB), 0));
    upload_messages(&mut files, "alice", partial)
        .await
        .unwrap_err();
    assert_eq!(
        status(&mut files, "alice", request_id)
            .await
            .unwrap()
            .committed_size as usize,
        PART
    );
    let open = bucket_leftovers(&conversation_id).await;
    assert!(
        open.iter().any(|left| left.starts_with("open multipart")),
        "{open:?}"
    );
    assert!(!redis_keys(&format!("{key_prefix}:*upload*")).is_empty());

    eventually(
        Duration::from_secs(15),
        "the expired session is discarded",
        async || {
            bucket_leftovers(&conversation_id).await.is_empty()
                && redis_keys(&format!("{key_prefix}:*upload*")).is_empty()
        },
    )
    .await;
    let gone = status(&mut files, "alice", request_id).await.unwrap_err();
    assert_eq!(reason(&gone), "UPLOAD_NOT_FOUND");
    let resumed = upload_messages(&mut files, "alice", vec![resume_message(request_id, 0)])
        .await
        .unwrap_err();
    assert_eq!(reason(&resumed), "UPLOAD_NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_uploads_per_caller_are_limited_in_the_zero_setup_default() {
    use tonic_types::StatusExt;
    // Memory messages and the filesystem store: sessions live in the data directory.
    let server = TestServer::start_with(|settings| {
        settings.uploads.max_sessions_per_caller = 1;
    })
    .await;
    let channel = server.channel().await;
    let mut messaging = Messaging::new(channel.clone());
    let mut files = Files::new(channel.clone());
    let conversation_id = create_conversation(&mut messaging, "alice", &["bob"]).await;
    let body = Bytes::from(pdf(10 * MIB));
    let first = resumable_metadata(&conversation_id, "1.pdf", "application/pdf", &body, "one");
    let second = resumable_metadata(&conversation_id, "2.pdf", "application/pdf", &body, "two");

    let mut partial = vec![pb::UploadFileRequest {
        payload: Some(Payload::Metadata(first)),
    }];
    partial.extend(chunks_from(&body.slice(..9 * MIB), 0));
    let paused = upload_messages(&mut files, "alice", partial)
        .await
        .unwrap_err();
    assert_eq!(reason(&paused), "SIZE_MISMATCH");
    assert_eq!(
        status(&mut files, "alice", "one")
            .await
            .unwrap()
            .committed_size as usize,
        PART
    );

    let refused = upload(&mut files, "alice", second.clone(), &body)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert_eq!(reason(&refused), "TOO_MANY_UPLOAD_SESSIONS");
    let quota = refused.get_details_quota_failure().expect("QuotaFailure");
    assert_eq!(quota.violations[0].subject, "user:alice");
    // Another caller is not affected.
    let bobs = resumable_metadata(&conversation_id, "b.pdf", "application/pdf", &body, "two");
    upload(&mut files, "bob", bobs, &body).await.unwrap();

    // Finishing the first frees the slot.
    let mut rest = vec![resume_message("one", PART)];
    rest.extend(chunks_from(&body, PART));
    let file = upload_messages(&mut files, "alice", rest)
        .await
        .unwrap()
        .file
        .unwrap();
    assert_eq!(file.sha256, sha256_hex(&body));
    let file = upload(&mut files, "alice", second, &body)
        .await
        .unwrap()
        .file
        .unwrap();
    assert_eq!(download(&mut files, "bob", &file.file_id).await, body);
    let staged = std::fs::read_dir(server.data_dir.path().join("blobs/staged"))
        .unwrap()
        .count();
    assert_eq!(staged, 0, "staged files remain");
}

/// The environment of a service process on the test Redis (under `key_prefix`) and, unless
/// `blobs` is "fs", the test bucket; writers lose their lease 2 s after they vanish.
pub(crate) fn process_env(
    key_prefix: &str,
    blobs: &str,
    data_dir: &std::path::Path,
) -> Vec<(String, String)> {
    let mut env = vec![
        ("SVC_MESSAGING__STORAGE__MESSAGES", "redis".to_owned()),
        (
            "SVC_MESSAGING__REDIS__URL",
            required_tool("SVC_TEST_REDIS_URL"),
        ),
        ("SVC_MESSAGING__REDIS__KEY_PREFIX", key_prefix.to_owned()),
        ("SVC_MESSAGING__STORAGE__BLOBS", blobs.to_owned()),
        (
            "SVC_MESSAGING__STORAGE__DATA_DIR",
            data_dir.display().to_string(),
        ),
        ("SVC_MESSAGING__UPLOADS__IDLE_TIMEOUT", "2s".to_owned()),
    ];
    if blobs == "s3" {
        env.extend([
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
            (
                "SVC_MESSAGING__S3__ACCESS_KEY_ID",
                required_tool("SVC_TEST_S3_ACCESS_KEY_ID"),
            ),
            (
                "SVC_MESSAGING__S3__SECRET_ACCESS_KEY",
                required_tool("SVC_TEST_S3_SECRET_ACCESS_KEY"),
            ),
            ("SVC_MESSAGING__S3__FORCE_PATH_STYLE", "true".to_owned()),
        ]);
    }
    env.into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
}

fn spawn(env: &[(String, String)]) -> ServiceProcess {
    let env: Vec<(&str, &str)> = env
        .iter()
        .map(|(key, value)| (key.as_str(), value.as_str()))
        .collect();
    ServiceProcess::spawn(&env)
}

async fn process_channel(process: &ServiceProcess) -> Channel {
    Channel::from_shared(format!("http://{}", process.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Sends ~20 MB of a 30 MB upload to a service process, waits for a durable part, SIGKILLs it,
/// starts it again and resumes from offset 0 (the durable bytes are skipped): the file is stored
/// whole, announced once, and nothing unfinished remains.
async fn killed_and_resumed(blobs: &str, test: &str) {
    let key_prefix = unique_prefix(test);
    let data_dir = tempfile::tempdir().unwrap();
    let env = process_env(&key_prefix, blobs, data_dir.path());
    let mut process = spawn(&env);
    let channel = process_channel(&process).await;
    let mut messaging = Messaging::new(channel.clone());
    let mut files = Files::new(channel.clone());
    let conversation_id = create_conversation(&mut messaging, "alice", &["bob"]).await;
    let body = Bytes::from(pdf(30 * MIB + 5));
    let request_id = format!("{test}-1");
    let meta = resumable_metadata(
        &conversation_id,
        "k.pdf",
        "application/pdf",
        &body,
        &request_id,
    );

    let upload = OpenUpload::start(channel.clone(), "alice");
    upload
        .send([pb::UploadFileRequest {
            payload: Some(Payload::Metadata(meta.clone())),
        }])
        .await;
    upload.send(chunks_from(&body.slice(..20 * MIB), 0)).await;
    let before = committed_at_least(&mut files, "alice", &request_id, PART).await;
    process.signal("KILL");
    process.wait_exit(Duration::from_secs(10)).expect("killed");
    upload.cut();

    let restarted = spawn(&env);
    let channel = process_channel(&restarted).await;
    let mut messaging = Messaging::new(channel.clone());
    let mut files = Files::new(channel);
    let after = status(&mut files, "alice", &request_id).await.unwrap();
    assert!(
        after.committed_size >= before.committed_size,
        "committed_size went back from {} to {} across the restart",
        before.committed_size,
        after.committed_size
    );
    // The killed writer's lease runs out within the idle timeout (2 s here): until then a new
    // writer is told the upload is in progress, never anything else.
    let mut resend = vec![pb::UploadFileRequest {
        payload: Some(Payload::Metadata(meta)),
    }];
    resend.extend(chunks_from(&body, 0));
    let done = upload_when_free(&mut files, "alice", resend, Duration::from_secs(10))
        .await
        .unwrap_or_else(|status| panic!("resuming failed: {status:?}\n{}", restarted.output()));
    let file = done.file.unwrap();
    assert_eq!(file.sha256, sha256_hex(&body));
    assert_eq!(download(&mut files, "bob", &file.file_id).await, body);
    let announcements: Vec<String> = history(&mut messaging, "alice", &conversation_id)
        .await
        .into_iter()
        .filter_map(|message| message.file.map(|file| file.file_id))
        .collect();
    assert_eq!(announcements, vec![file.file_id.clone()]);
    if blobs == "s3" {
        let open: Vec<String> = bucket_leftovers(&conversation_id)
            .await
            .into_iter()
            .filter(|left| left.starts_with("open multipart"))
            .collect();
        assert!(open.is_empty(), "{open:?}");
    } else {
        let staged = std::fs::read_dir(data_dir.path().join("staged"))
            .unwrap()
            .count();
        assert_eq!(staged, 0, "staged files remain");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_upload_is_resumed_after_its_restart() {
    killed_and_resumed("s3", "resume-kill-s3").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filesystem_store_resumes_after_a_restart() {
    killed_and_resumed("fs", "resume-kill-fs").await;
}

#[tokio::test]
async fn the_upload_policy_reports_the_resume_part_size_session_lifetime_and_stream_limits() {
    let server = TestServer::start().await;
    let mut files = Files::new(server.channel().await);
    let policy = files
        .get_upload_policy(as_user("alice", pb::GetUploadPolicyRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(policy.resume_part_bytes as usize, PART);
    assert_eq!(policy.upload_session_ttl.unwrap().seconds, 24 * 3600);
    assert_eq!(policy.min_chunk_bytes, 1024);
    assert_eq!(policy.idle_timeout.unwrap().seconds, 30);
    assert_eq!(policy.max_upload_duration.unwrap().seconds, 3600);
}
