//! Hostile and clumsy input against the production backends (the real Redis and Garage that
//! scripts/test starts). Every refusal must carry a precise status and reason, must leave no
//! object, no open multipart upload, no file record, no message and no new Redis key behind, and
//! other callers must be answered at normal speed meanwhile.
//!
//! The defects of issue 9 are proven where their parts live; this suite adds the inputs no
//! single part owns. Where the others are (modules of this test binary):
//! - metric series from made-up paths, duplicated credentials, transport limits: `server`;
//! - many-scan JPEGs, decode deadlines, busy workers, over-budget decodes, SIGTERM during a
//!   decode: `thumbnails`;
//! - empty-chunk floods, stalled and idle uploads, per-caller upload caps, image bodies in the
//!   budget: `files`, `files_cloud`;
//! - replayed creates, DeleteFile and re-posts, subscription caps: `messaging`;
//! - secrets byte for byte: `cli`.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::support::{TestServer, as_user, cloud, create_conversation, reason, unique_prefix};
use bytes::Bytes;
use svc_messaging::grpc::pb::{
    self, file_relay_service_client::FileRelayServiceClient,
    messaging_service_client::MessagingServiceClient, upload_file_request::Payload,
};
use tonic::{Code, transport::Channel};

type Files = FileRelayServiceClient<Channel>;
type Messaging = MessagingServiceClient<Channel>;

/// Every Redis key under `key_prefix`.
fn redis_keys(key_prefix: &str) -> BTreeSet<String> {
    cloud::redis_keys(&format!("{key_prefix}:*"))
}

/// A caller that is not under attack: GetUploadPolicy in a loop, keeping the slowest answer.
struct Bystander {
    stop: Arc<AtomicBool>,
    slowest_micros: Arc<AtomicU64>,
    calls: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Bystander {
    fn start(files: Files) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let slowest_micros = Arc::new(AtomicU64::new(0));
        let calls = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (stop, slowest_micros, calls) =
                (stop.clone(), slowest_micros.clone(), calls.clone());
            let mut files = files;
            async move {
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    files
                        .get_upload_policy(as_user("bystander", pb::GetUploadPolicyRequest {}))
                        .await
                        .expect("the bystander is served");
                    let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                    slowest_micros.fetch_max(micros, Ordering::Relaxed);
                    calls.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        Self {
            stop,
            slowest_micros,
            calls,
            task,
        }
    }

    /// Stops and returns (calls made, slowest answer).
    async fn finish(self) -> (u64, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        (
            self.calls.load(Ordering::Relaxed),
            Duration::from_micros(self.slowest_micros.load(Ordering::Relaxed)),
        )
    }
}

/// What one hostile upload sends.
enum Sent {
    /// Metadata declaring `size` bytes, then these chunks.
    Chunks { size: i64, chunks: Vec<Bytes> },
    /// Exactly these messages.
    Messages(Vec<pb::UploadFileRequest>),
}

struct Case {
    what: &'static str,
    name: &'static str,
    content_type: &'static str,
    sent: Sent,
    code: Code,
    reason: &'static str,
}

fn body(
    what: &'static str,
    name: &'static str,
    content_type: &'static str,
    bytes: Vec<u8>,
) -> (&'static str, &'static str, &'static str, Vec<u8>) {
    (what, name, content_type, bytes)
}

/// A case that sends `bytes` whole, in 64 KiB chunks, declaring their true size.
fn whole(
    (what, name, content_type, bytes): (&'static str, &'static str, &'static str, Vec<u8>),
    code: Code,
    reason: &'static str,
) -> Case {
    let size = bytes.len() as i64;
    let bytes = Bytes::from(bytes);
    let chunks = (0..bytes.len())
        .step_by(64 * 1024)
        .map(|start| bytes.slice(start..(start + 64 * 1024).min(bytes.len())))
        .collect();
    Case {
        what,
        name,
        content_type,
        sent: Sent::Chunks { size, chunks },
        code,
        reason,
    }
}

fn upload_metadata(conversation_id: &str, case: &Case, size: i64) -> pb::UploadFileRequest {
    pb::UploadFileRequest {
        payload: Some(Payload::Metadata(pb::UploadMetadata {
            conversation_id: conversation_id.to_owned(),
            file_name: case.name.to_owned(),
            content_type: case.content_type.to_owned(),
            size_bytes: size,
            ..Default::default()
        })),
    }
}

fn chunk(bytes: impl Into<Bytes>) -> pb::UploadFileRequest {
    pb::UploadFileRequest {
        payload: Some(Payload::Chunk(bytes.into())),
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies.

/// A ZIP (stored entries) with these names and contents; `declared_sizes` overrides the
/// uncompressed size written for each entry in the central directory (a zip bomb's lie).
fn zip(entries: &[(&str, &[u8])], declared_sizes: Option<u64>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let offset = out.len() as u32;
        let crc = cloud::crc32(data);
        let size = data.len() as u32;
        let uncompressed =
            declared_sizes.map_or(size, |declared| declared.min(u64::from(u32::MAX)) as u32);
        // Local file header.
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        out.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&uncompressed.to_le_bytes());
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        // Central directory entry.
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&[20, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        central.extend_from_slice(&crc.to_le_bytes());
        central.extend_from_slice(&size.to_le_bytes());
        central.extend_from_slice(&uncompressed.to_le_bytes());
        central.extend_from_slice(&(name.len() as u16).to_le_bytes());
        central.extend_from_slice(&[0; 12]);
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let central_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&central_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

fn docx(declared_sizes: Option<u64>) -> Vec<u8> {
    zip(
        &[
            ("[Content_Types].xml", b"<Types/>".as_slice()),
            ("word/document.xml", b"<w:document/>".as_slice()),
        ],
        declared_sizes,
    )
}

/// A tiny valid baseline JPEG (from the test images).
fn jpeg() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/images/gray.jpg"
    ))
    .unwrap()
}

/// A PNG whose header claims `width` x `height` (and nothing else follows worth decoding).
fn png_header(width: u32, height: u32) -> Vec<u8> {
    let mut png = cloud::png(1, 1);
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    // Fix the IHDR CRC so only the size is hostile.
    let crc = cloud::crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

fn gif_header(width: u16, height: u16) -> Vec<u8> {
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&width.to_le_bytes());
    gif.extend_from_slice(&height.to_le_bytes());
    gif.extend_from_slice(&[0, 0, 0]);
    // An image descriptor of the same size, then the trailer.
    gif.push(0x2C);
    gif.extend_from_slice(&[0, 0, 0, 0]);
    gif.extend_from_slice(&width.to_le_bytes());
    gif.extend_from_slice(&height.to_le_bytes());
    gif.extend_from_slice(&[0, 2, 2, 0x4C, 0x01, 0, 0x3B]);
    gif
}

/// A WEBP (VP8X) whose canvas is `width` x `height`.
fn webp_header(width: u32, height: u32) -> Vec<u8> {
    let mut vp8x = vec![0u8; 10];
    vp8x[4..7].copy_from_slice(&(width - 1).to_le_bytes()[..3]);
    vp8x[7..10].copy_from_slice(&(height - 1).to_le_bytes()[..3]);
    let mut webp = b"RIFF".to_vec();
    webp.extend_from_slice(&(4 + 8 + 10u32).to_le_bytes());
    webp.extend_from_slice(b"WEBPVP8X");
    webp.extend_from_slice(&10u32.to_le_bytes());
    webp.extend_from_slice(&vp8x);
    webp
}

/// The small JPEG with its frame header claiming `width` x `height`.
fn jpeg_header(width: u16, height: u16) -> Vec<u8> {
    let mut bytes = jpeg();
    let sof = bytes
        .windows(2)
        .position(|pair| pair[0] == 0xFF && matches!(pair[1], 0xC0 | 0xC2))
        .expect("a frame header");
    bytes[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    bytes
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn hostile_uploads_are_refused_precisely_and_leave_nothing() {
    let key_prefix = unique_prefix("hostile-uploads");
    let server = TestServer::start_with(|settings| cloud::use_cloud(settings, &key_prefix)).await;
    let channel = server.channel().await;
    let mut messaging = Messaging::new(channel.clone());
    let files = Files::new(channel.clone());
    let conversation_id = create_conversation(&mut messaging, "alice", &["bob"]).await;
    let bystander = Bystander::start(Files::new(server.channel().await));
    let keys_before = redis_keys(&key_prefix);

    let pdf = cloud::pdf(4096);
    let mut truncated_pdf = pdf.clone();
    truncated_pdf.truncate(3000);
    let mut pdf_with_zip = pdf.clone();
    pdf_with_zip.extend(docx(None));
    pdf_with_zip.extend(cloud::noise(2048, 3));
    let mut truncated_png = cloud::png(64, 64);
    truncated_png.truncate(truncated_png.len() / 2);
    let mut truncated_docx = docx(None);
    truncated_docx.truncate(truncated_docx.len() - 30);
    let split_euro = "prix: 5 \u{20ac}".as_bytes().to_vec();
    let mut bad_continuation = split_euro.clone();
    let last = bad_continuation.len() - 1;
    bad_continuation[last] = b'A';

    let mut cases = vec![
        whole(
            body("truncated PDF", "a.pdf", "application/pdf", truncated_pdf),
            Code::InvalidArgument,
            "MALFORMED_DOCUMENT",
        ),
        whole(
            body(
                "PDF followed by a ZIP",
                "a.pdf",
                "application/pdf",
                pdf_with_zip.clone(),
            ),
            Code::InvalidArgument,
            "MALFORMED_DOCUMENT",
        ),
        whole(
            body(
                "PDF+ZIP polyglot declared DOCX",
                "a.docx",
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                pdf_with_zip,
            ),
            Code::InvalidArgument,
            "CONTENT_TYPE_MISMATCH",
        ),
        whole(
            body(
                "truncated DOCX",
                "a.docx",
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                truncated_docx,
            ),
            Code::InvalidArgument,
            "MALFORMED_DOCUMENT",
        ),
        whole(
            body(
                "zip bomb DOCX",
                "bomb.docx",
                "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                docx(Some(4 << 30)),
            ),
            Code::InvalidArgument,
            "MALFORMED_DOCUMENT",
        ),
        whole(
            body("truncated PNG", "a.png", "image/png", truncated_png),
            Code::InvalidArgument,
            "IMAGE_UNDECODABLE",
        ),
        whole(
            body(
                "PNG pixel bomb",
                "a.png",
                "image/png",
                png_header(100_000, 100_000),
            ),
            Code::InvalidArgument,
            "IMAGE_TOO_LARGE",
        ),
        whole(
            body(
                "GIF pixel bomb",
                "a.gif",
                "image/gif",
                gif_header(65_535, 65_535),
            ),
            Code::InvalidArgument,
            "IMAGE_TOO_LARGE",
        ),
        whole(
            body(
                "WEBP pixel bomb",
                "a.webp",
                "image/webp",
                webp_header(16_384, 16_384),
            ),
            Code::InvalidArgument,
            "IMAGE_TOO_LARGE",
        ),
        whole(
            body(
                "JPEG pixel bomb",
                "a.jpg",
                "image/jpeg",
                jpeg_header(65_535, 65_535),
            ),
            Code::InvalidArgument,
            "IMAGE_TOO_LARGE",
        ),
        whole(
            body("PNG declared JPEG", "a.jpg", "image/jpeg", cloud::png(8, 8)),
            Code::InvalidArgument,
            "CONTENT_TYPE_MISMATCH",
        ),
        whole(
            body(
                "NUL in TXT",
                "a.txt",
                "text/plain",
                b"hello\0world".to_vec(),
            ),
            Code::InvalidArgument,
            "CONTENT_TYPE_MISMATCH",
        ),
        whole(
            body("NUL in CSV", "a.csv", "text/csv", b"a,b\n1,\0\n".to_vec()),
            Code::InvalidArgument,
            "CONTENT_TYPE_MISMATCH",
        ),
        whole(
            body(
                "TXT ending inside a character",
                "a.txt",
                "text/plain",
                split_euro[..split_euro.len() - 1].to_vec(),
            ),
            Code::InvalidArgument,
            "CONTENT_TYPE_MISMATCH",
        ),
    ];
    // Bad UTF-8 exactly at a chunk boundary: the euro sign's lead bytes end one chunk and a
    // byte that cannot continue it starts the next.
    let cut = bad_continuation.len() - 1;
    cases.push(Case {
        what: "bad UTF-8 across a chunk boundary",
        name: "a.txt",
        content_type: "text/plain",
        sent: Sent::Chunks {
            size: bad_continuation.len() as i64,
            chunks: vec![
                Bytes::copy_from_slice(&bad_continuation[..cut]),
                Bytes::copy_from_slice(&bad_continuation[cut..]),
            ],
        },
        code: Code::InvalidArgument,
        reason: "CONTENT_TYPE_MISMATCH",
    });
    cases.push(Case {
        what: "size_bytes larger than what is sent",
        name: "a.txt",
        content_type: "text/plain",
        sent: Sent::Chunks {
            size: 1000,
            chunks: vec![Bytes::from_static(b"only a few bytes")],
        },
        code: Code::InvalidArgument,
        reason: "SIZE_MISMATCH",
    });
    cases.push(Case {
        what: "size_bytes smaller than what is sent",
        name: "a.txt",
        content_type: "text/plain",
        sent: Sent::Chunks {
            size: 4,
            chunks: vec![Bytes::from_static(b"many more bytes than four")],
        },
        code: Code::InvalidArgument,
        reason: "SIZE_MISMATCH",
    });
    cases.push(Case {
        what: "a chunk after the declared size was complete",
        name: "a.txt",
        content_type: "text/plain",
        sent: Sent::Chunks {
            size: 5,
            chunks: vec![Bytes::from_static(b"hello"), Bytes::from_static(b"!")],
        },
        code: Code::InvalidArgument,
        reason: "SIZE_MISMATCH",
    });
    let twice = Case {
        what: "metadata sent twice",
        name: "a.txt",
        content_type: "text/plain",
        sent: Sent::Messages(Vec::new()),
        code: Code::InvalidArgument,
        reason: "METADATA_FIRST",
    };
    let twice_messages = vec![
        upload_metadata(&conversation_id, &twice, 5),
        chunk(&b"he"[..]),
        upload_metadata(&conversation_id, &twice, 5),
        chunk(&b"llo"[..]),
    ];
    cases.push(Case {
        sent: Sent::Messages(twice_messages),
        ..twice
    });
    cases.push(Case {
        what: "a chunk before the metadata",
        name: "a.txt",
        content_type: "text/plain",
        sent: Sent::Messages(vec![chunk(&b"hello"[..])]),
        code: Code::InvalidArgument,
        reason: "METADATA_FIRST",
    });

    for case in &cases {
        let messages = match &case.sent {
            Sent::Chunks { size, chunks } => {
                std::iter::once(upload_metadata(&conversation_id, case, *size))
                    .chain(chunks.iter().cloned().map(chunk))
                    .collect()
            }
            Sent::Messages(messages) => messages.clone(),
        };
        let mut client = files.clone();
        let status = client
            .upload_file(as_user("alice", futures::stream::iter(messages)))
            .await
            .expect_err(case.what);
        assert_eq!(status.code(), case.code, "{}: {status:?}", case.what);
        assert_eq!(reason(&status), case.reason, "{}: {status:?}", case.what);
        cloud::assert_nothing_left(
            case.what,
            &mut messaging,
            &key_prefix,
            &conversation_id,
            &[],
        )
        .await;
        assert_eq!(
            redis_keys(&key_prefix),
            keys_before,
            "{}: Redis keys",
            case.what
        );
    }

    let (calls, slowest) = bystander.finish().await;
    assert!(calls > 0);
    assert!(
        slowest < Duration::from_secs(1),
        "another caller waited {slowest:?} while the hostile uploads ran"
    );
}

/// A JPEG with a ZIP appended is a valid JPEG: it is stored as `image/jpeg` (never anything
/// else), served with that type and as an attachment, and its thumbnail comes from the JPEG.
/// (Refusing data after the end-of-image marker would refuse real cameras' files: several
/// append a video or a depth map there.)
#[tokio::test]
async fn a_jpeg_with_a_trailing_zip_is_stored_as_the_jpeg_it_is() {
    let key_prefix = unique_prefix("hostile-polyglot");
    let server = TestServer::start_with(|settings| cloud::use_cloud(settings, &key_prefix)).await;
    let channel = server.channel().await;
    let mut messaging = Messaging::new(channel.clone());
    let mut files = Files::new(channel.clone());
    let conversation_id = create_conversation(&mut messaging, "alice", &["bob"]).await;
    let mut polyglot = jpeg();
    polyglot.extend(docx(None));
    let polyglot = Bytes::from(polyglot);
    let file = cloud::upload(
        &mut files,
        "alice",
        cloud::metadata(&conversation_id, "photo.jpg", "image/jpeg", &polyglot, true),
        &polyglot,
    )
    .await
    .expect("a JPEG with trailing data is a JPEG")
    .file
    .unwrap();
    assert_eq!(file.content_type, "image/jpeg");
    assert!(file.has_thumbnail);
    let url = cloud::download_url(&mut files, "bob", &file.file_id).await;
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.headers()["content-type"], "image/jpeg");
    assert!(
        response.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment"),
    );
}

/// Oversized text fields are refused with the field named, and the error message does not
/// echo them back (at most a short prefix of what the caller sent).
#[tokio::test]
async fn oversized_fields_are_refused_without_echoing_them() {
    let key_prefix = unique_prefix("hostile-fields");
    let server = TestServer::start_with(|settings| cloud::use_cloud(settings, &key_prefix)).await;
    let channel = server.channel().await;
    let mut messaging = Messaging::new(channel.clone());
    let mut files = Files::new(channel.clone());
    let conversation_id = create_conversation(&mut messaging, "alice", &["bob"]).await;
    let keys_before = redis_keys(&key_prefix);
    let long = "x".repeat(10_000);
    let check = |what: &str, result: Result<(), tonic::Status>| {
        let status = result.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert_eq!(reason(&status), "INVALID_FIELD", "{what}: {status:?}");
        assert!(
            status.message().len() < 300,
            "{what}: the message echoes the input: {} bytes",
            status.message().len()
        );
    };
    check(
        "10,000-character title",
        messaging
            .create_conversation(as_user(
                "alice",
                pb::CreateConversationRequest {
                    title: long.clone(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop),
    );
    check(
        "10,000-character text",
        messaging
            .send_message(as_user(
                "alice",
                pb::SendMessageRequest {
                    conversation_id: conversation_id.clone(),
                    client_message_id: "m-1".to_owned(),
                    content: Some(pb::send_message_request::Content::Text(long.clone())),
                },
            ))
            .await
            .map(drop),
    );
    check(
        "10,000-character client_message_id",
        messaging
            .send_message(as_user(
                "alice",
                pb::SendMessageRequest {
                    conversation_id: conversation_id.clone(),
                    client_message_id: long.clone(),
                    content: Some(pb::send_message_request::Content::Text("hi".to_owned())),
                },
            ))
            .await
            .map(drop),
    );
    check(
        "10,000-character participant id",
        messaging
            .add_participants(as_user(
                "alice",
                pb::AddParticipantsRequest {
                    conversation_id: conversation_id.clone(),
                    user_ids: vec![long.clone()],
                },
            ))
            .await
            .map(drop),
    );
    check(
        "10,000-character file name",
        files
            .upload_file(as_user(
                "alice",
                futures::stream::iter(vec![
                    pb::UploadFileRequest {
                        payload: Some(Payload::Metadata(pb::UploadMetadata {
                            conversation_id: conversation_id.clone(),
                            file_name: format!("{long}.txt"),
                            content_type: "text/plain".to_owned(),
                            size_bytes: 2,
                            ..Default::default()
                        })),
                    },
                    chunk(&b"hi"[..]),
                ]),
            ))
            .await
            .map(drop),
    );
    check(
        "10,000-character caption",
        files
            .upload_file(as_user(
                "alice",
                futures::stream::iter(vec![
                    pb::UploadFileRequest {
                        payload: Some(Payload::Metadata(pb::UploadMetadata {
                            conversation_id: conversation_id.clone(),
                            file_name: "a.txt".to_owned(),
                            content_type: "text/plain".to_owned(),
                            size_bytes: 2,
                            caption: long.clone(),
                            ..Default::default()
                        })),
                    },
                    chunk(&b"hi"[..]),
                ]),
            ))
            .await
            .map(drop),
    );
    assert_eq!(
        redis_keys(&key_prefix),
        keys_before,
        "no key from refused requests"
    );
    cloud::assert_nothing_left(
        "oversized fields",
        &mut messaging,
        &key_prefix,
        &conversation_id,
        &[],
    )
    .await;
}

/// Page tokens are caller input: garbage, tampered ones and tokens of another conversation are
/// INVALID_ARGUMENT on `page_token`; a real one still pages.
#[tokio::test]
async fn garbage_and_tampered_page_tokens_are_refused() {
    let key_prefix = unique_prefix("hostile-tokens");
    let server = TestServer::start_with(|settings| cloud::use_cloud(settings, &key_prefix)).await;
    let mut messaging = Messaging::new(server.channel().await);
    let conversation_id = create_conversation(&mut messaging, "alice", &["bob"]).await;
    let other_id = create_conversation(&mut messaging, "alice", &[]).await;
    for index in 0..3 {
        messaging
            .send_message(as_user(
                "alice",
                pb::SendMessageRequest {
                    conversation_id: conversation_id.clone(),
                    client_message_id: format!("m-{index}"),
                    content: Some(pb::send_message_request::Content::Text(format!(
                        "hi {index}"
                    ))),
                },
            ))
            .await
            .unwrap();
    }
    let list = |conversation_id: &str, page_token: &str| pb::ListMessagesRequest {
        conversation_id: conversation_id.to_owned(),
        page_size: 1,
        page_token: page_token.to_owned(),
    };
    let first = messaging
        .list_messages(as_user("alice", list(&conversation_id, "")))
        .await
        .unwrap()
        .into_inner();
    let token = first.next_page_token;
    assert!(!token.is_empty());
    let mut tampered = token.clone().into_bytes();
    let middle = tampered.len() / 2;
    tampered[middle] = if tampered[middle] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let garbage = [
        "garbage!".to_owned(),
        "\u{0}\u{1}".to_owned(),
        "x".repeat(10_000),
        tampered,
        // base64 of text in the token's shape but a sequence that is no number.
        "bTF8eHx5".to_owned(),
    ];
    for page_token in &garbage {
        let status = messaging
            .list_messages(as_user("alice", list(&conversation_id, page_token)))
            .await
            .expect_err(page_token);
        assert_eq!(status.code(), Code::InvalidArgument, "{page_token:.40}");
        assert_eq!(reason(&status), "INVALID_FIELD", "{page_token:.40}");
        assert!(status.message().len() < 300, "{}", status.message());
        let status = messaging
            .list_conversations(as_user(
                "alice",
                pb::ListConversationsRequest {
                    page_size: 1,
                    page_token: page_token.clone(),
                },
            ))
            .await
            .expect_err(page_token);
        assert_eq!(status.code(), Code::InvalidArgument, "{page_token:.40}");
    }
    // A token is bound to its conversation.
    let status = messaging
        .list_messages(as_user("alice", list(&other_id, &token)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    // The real one pages on.
    let second = messaging
        .list_messages(as_user("alice", list(&conversation_id, &token)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.messages.len(), 1);
    assert_ne!(second.messages[0].message_id, first.messages[0].message_id);
}
