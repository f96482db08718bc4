//! Helpers for tests on the production backends (the real Redis and Garage that scripts/test
//! starts): looking into the bucket and Redis, building bodies, and calling the file relay.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::StreamExt;
use svc_messaging::{
    budget::MemoryBudget,
    config::{BlobBackend, S3Settings, Settings},
    grpc::pb::{
        self, file_relay_service_client::FileRelayServiceClient,
        messaging_service_client::MessagingServiceClient, upload_file_request::Payload,
    },
    store::{blobs::BlobStore, s3::S3BlobStore},
};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::{as_user, required_tool, sha256_hex, test_s3_settings, use_test_redis};

pub type Files = FileRelayServiceClient<Channel>;
pub type Messaging = MessagingServiceClient<Channel>;

pub const MIB: usize = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Configuration and inspection of the real servers.

/// Redis under `key_prefix` and the test bucket, like production.
pub fn use_cloud(settings: &mut Settings, key_prefix: &str) {
    use_test_redis(settings, key_prefix);
    settings.storage.blobs = BlobBackend::S3;
    settings.s3 = test_s3_settings();
}

/// A store of the test's own on `settings` (for looking at the bucket directly).
pub fn s3_store(settings: &S3Settings) -> S3BlobStore {
    let budget = MemoryBudget::new(64 << 20, Duration::from_secs(5));
    S3BlobStore::new(settings, 8 << 20, 1, budget).expect("valid S3 settings")
}

/// Objects and open multipart uploads a conversation's files left in the test bucket.
pub async fn bucket_leftovers(conversation_id: &str) -> Vec<String> {
    let s3 = s3_store(&test_s3_settings());
    let mut left = Vec::new();
    for area in ["files", "thumbs"] {
        let prefix = format!("{area}/{conversation_id}/");
        left.extend(s3.list(&prefix).await.unwrap());
        left.extend(
            s3.open_multipart_uploads(&prefix)
                .await
                .unwrap()
                .into_iter()
                .map(|key| format!("open multipart upload {key}")),
        );
    }
    left
}

/// The keys on the test Redis that match `pattern` (`SCAN ... MATCH pattern`).
pub fn redis_keys(pattern: &str) -> BTreeSet<String> {
    let output = std::process::Command::new(required_tool("SVC_TEST_REDIS_CLI"))
        .env("REDISCLI_AUTH", required_tool("SVC_TEST_REDIS_PASSWORD"))
        .args(["-h", &required_tool("SVC_TEST_REDIS_HOST")])
        .args(["-p", &required_tool("SVC_TEST_REDIS_PORT")])
        .args(["--scan", "--pattern", pattern])
        .output()
        .expect("run redis-cli");
    assert!(output.status.success(), "redis-cli: {output:?}");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The pattern of the file records kept in Redis under `key_prefix` (`P:{f:FILE}:file`).
pub fn file_record_pattern(key_prefix: &str) -> String {
    format!("{key_prefix}:{{f:*}}:file")
}

/// The file records kept in Redis under `key_prefix`, as sorted file ids.
pub fn file_records(key_prefix: &str) -> Vec<String> {
    redis_keys(&file_record_pattern(key_prefix))
        .iter()
        .filter_map(|key| {
            key.strip_prefix(&format!("{key_prefix}:{{f:"))?
                .strip_suffix("}:file")
                .map(str::to_owned)
        })
        .collect()
}

/// Asserts the bucket lifecycle the service installs: objects under `files/` and `thumbs/`
/// expire after `expiry_days`, and multipart uploads left open are aborted after a day.
pub fn assert_lifecycle_rules(rules: &[aws_sdk_s3::types::LifecycleRule], expiry_days: i32) {
    assert_eq!(rules.len(), 3, "{rules:?}");
    for prefix in ["files/", "thumbs/"] {
        let rule = rules
            .iter()
            .find(|rule| rule.filter().and_then(|filter| filter.prefix()) == Some(prefix))
            .unwrap_or_else(|| panic!("no rule for {prefix}: {rules:?}"));
        assert_eq!(rule.status().as_str(), "Enabled");
        assert_eq!(
            rule.expiration().and_then(|expiry| expiry.days()),
            Some(expiry_days)
        );
    }
    let abort = rules
        .iter()
        .find_map(|rule| rule.abort_incomplete_multipart_upload())
        .unwrap_or_else(|| panic!("no rule aborting stale multipart uploads: {rules:?}"));
    assert_eq!(abort.days_after_initiation(), Some(1));
}

/// Runs `$SVC_TEST_GARAGE <args>` (bucket administration).
pub fn garage(args: &[&str]) {
    let command = required_tool("SVC_TEST_GARAGE");
    let mut words = command.split_whitespace();
    let status = std::process::Command::new(words.next().unwrap())
        .args(words)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run garage");
    assert!(status.success(), "garage {args:?} failed");
}

/// The port of nothing: bound, read, released.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------------
// Bodies.

/// Deterministic bytes that do not repeat (xorshift64*).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        bytes.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// A PDF of exactly `len` bytes: header, binary filler, `%%EOF`.
pub fn pdf(len: usize) -> Vec<u8> {
    let head = b"%PDF-1.7\n";
    let tail = b"\n%%EOF\n";
    let mut bytes = head.to_vec();
    bytes.extend(noise(len - head.len() - tail.len(), 7));
    bytes.extend_from_slice(tail);
    bytes
}

pub fn crc32(bytes: &[u8]) -> u32 {
    static TABLE: std::sync::LazyLock<[u32; 256]> = std::sync::LazyLock::new(|| {
        let mut table = [0u32; 256];
        for (index, entry) in table.iter_mut().enumerate() {
            let mut crc = index as u32;
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    0xEDB8_8320 ^ (crc >> 1)
                } else {
                    crc >> 1
                };
            }
            *entry = crc;
        }
        table
    });
    !bytes.iter().fold(!0u32, |crc, byte| {
        TABLE[((crc ^ u32::from(*byte)) & 0xFF) as usize] ^ (crc >> 8)
    })
}

pub fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in bytes.chunks(5552) {
        for byte in chunk {
            a += u32::from(*byte);
            b += a;
        }
        a %= 65_521;
        b %= 65_521;
    }
    (b << 16) | a
}

/// A valid (decodable) `width` x `height` 8-bit RGB PNG of noise: its zlib stream holds stored
/// (uncompressed) deflate blocks, so its size is about `3 x width x height`.
pub fn png(width: u32, height: u32) -> Vec<u8> {
    fn chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        png.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        let start = png.len();
        png.extend_from_slice(kind);
        png.extend_from_slice(data);
        let crc = crc32(&png[start..]);
        png.extend_from_slice(&crc.to_be_bytes());
    }
    let row = 3 * width as usize;
    let pixels = noise(row * height as usize, 11);
    let mut raw = Vec::with_capacity((row + 1) * height as usize);
    for line in pixels.chunks(row) {
        raw.push(0); // filter: none
        raw.extend_from_slice(line);
    }
    let mut zlib = vec![0x78, 0x01];
    let blocks = raw.chunks(65_535).count();
    for (index, block) in raw.chunks(65_535).enumerate() {
        zlib.push(u8::from(index + 1 == blocks)); // BFINAL, BTYPE = 00 (stored)
        let len = u16::try_from(block.len()).unwrap();
        zlib.extend_from_slice(&len.to_le_bytes());
        zlib.extend_from_slice(&(!len).to_le_bytes());
        zlib.extend_from_slice(block);
    }
    zlib.extend_from_slice(&adler32(&raw).to_be_bytes());
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut header = Vec::new();
    header.extend_from_slice(&width.to_be_bytes());
    header.extend_from_slice(&height.to_be_bytes());
    header.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
    chunk(&mut png, b"IHDR", &header);
    chunk(&mut png, b"IDAT", &zlib);
    chunk(&mut png, b"IEND", &[]);
    png
}

// ---------------------------------------------------------------------------------------------
// Calls.

/// The metadata of an upload declaring `size` bytes and no checksum.
pub fn metadata_of_size(
    conversation_id: &str,
    name: &str,
    content_type: &str,
    size: usize,
) -> pb::UploadMetadata {
    pb::UploadMetadata {
        conversation_id: conversation_id.to_owned(),
        file_name: name.to_owned(),
        content_type: content_type.to_owned(),
        size_bytes: size as i64,
        sha256: String::new(),
        caption: String::new(),
        request_id: String::new(),
    }
}

/// The metadata of an upload of `body`, with its sha256 if `declare_sha256`.
pub fn metadata(
    conversation_id: &str,
    name: &str,
    content_type: &str,
    body: &[u8],
    declare_sha256: bool,
) -> pb::UploadMetadata {
    let mut metadata = metadata_of_size(conversation_id, name, content_type, body.len());
    if declare_sha256 {
        metadata.sha256 = sha256_hex(body);
    }
    metadata
}

/// The metadata message, then `body` in `chunk`-byte chunks (slices of one buffer, no copies).
pub fn messages(
    metadata: pb::UploadMetadata,
    body: &Bytes,
    chunk: usize,
) -> Vec<pb::UploadFileRequest> {
    let mut messages = vec![pb::UploadFileRequest {
        payload: Some(Payload::Metadata(metadata)),
    }];
    let mut offset = 0;
    while offset < body.len() {
        let end = (offset + chunk).min(body.len());
        messages.push(pb::UploadFileRequest {
            payload: Some(Payload::Chunk(body.slice(offset..end))),
        });
        offset = end;
    }
    messages
}

/// UploadFile with `metadata`, then `body` in 1 MiB chunks.
pub async fn upload(
    files: &mut Files,
    user: &str,
    metadata: pb::UploadMetadata,
    body: &Bytes,
) -> Result<pb::UploadFileResponse, tonic::Status> {
    upload_messages(files, user, messages(metadata, body, MIB)).await
}

/// UploadFile with exactly `messages`, well-formed or not.
pub async fn upload_messages(
    files: &mut Files,
    user: &str,
    messages: Vec<pb::UploadFileRequest>,
) -> Result<pb::UploadFileResponse, tonic::Status> {
    files
        .upload_file(as_user(user, futures::stream::iter(messages)))
        .await
        .map(tonic::Response::into_inner)
}

pub use super::history;

/// DownloadFile from offset 0, whole.
pub async fn download(files: &mut Files, user: &str, file_id: &str) -> Vec<u8> {
    download_from(files, user, file_id, 0).await
}

/// DownloadFile from `offset` to the end, checking every chunk is at most 1 MiB.
pub async fn download_from(files: &mut Files, user: &str, file_id: &str, offset: usize) -> Vec<u8> {
    let mut chunks = files
        .download_file(as_user(
            user,
            pb::DownloadFileRequest {
                file_id: file_id.to_owned(),
                offset: offset as i64,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let mut downloaded = Vec::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.unwrap().chunk;
        assert!(chunk.len() <= MIB, "a chunk of {} bytes", chunk.len());
        downloaded.extend_from_slice(&chunk);
    }
    downloaded
}

pub async fn download_url(files: &mut Files, user: &str, file_id: &str) -> String {
    files
        .get_download_url(as_user(
            user,
            pb::GetDownloadUrlRequest {
                file_id: file_id.to_owned(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .url
}

/// Asserts the conversation holds no object, no open multipart upload, no message, and that
/// Redis holds no file record under `key_prefix` other than `kept`.
pub async fn assert_nothing_left(
    what: &str,
    messaging: &mut Messaging,
    key_prefix: &str,
    conversation_id: &str,
    kept: &[String],
) {
    let left = bucket_leftovers(conversation_id).await;
    // A kept image may also have its thumbnail.
    let kept_keys: Vec<String> = kept
        .iter()
        .flat_map(|file_id| {
            [
                format!("files/{conversation_id}/{file_id}"),
                format!("thumbs/{conversation_id}/{file_id}"),
            ]
        })
        .collect();
    let unexpected: Vec<&String> = left.iter().filter(|key| !kept_keys.contains(key)).collect();
    assert!(
        unexpected.is_empty(),
        "{what}: left in the bucket: {unexpected:?}"
    );
    let mut kept_sorted = kept.to_vec();
    kept_sorted.sort();
    assert_eq!(
        file_records(key_prefix),
        kept_sorted,
        "{what}: file records"
    );
    let posted: Vec<String> = history(messaging, "alice", conversation_id)
        .await
        .into_iter()
        .filter_map(|message| message.file.map(|file| file.file_id))
        .collect();
    let mut posted_sorted = posted;
    posted_sorted.sort();
    assert_eq!(posted_sorted, kept_sorted, "{what}: file messages posted");
}

/// Polls `check` until it holds, for up to `limit`.
pub async fn eventually(limit: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn health(channel: &Channel, service: &str) -> ServingStatus {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .status()
}
