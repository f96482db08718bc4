//! One conformance suite for every `BlobStore`: the filesystem store here, the S3 store against
//! the real S3-compatible server that scripts/test starts.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use svc_messaging::store::{
    blobs::{BlobAttributes, BlobError, BlobStore},
    fs::{FsBlobStore, UrlSigner},
};

fn attributes() -> BlobAttributes {
    BlobAttributes {
        content_type: "text/plain".to_owned(),
        content_disposition: "attachment; filename*=UTF-8''notes.txt".to_owned(),
        metadata: vec![("sha256".to_owned(), "abc".to_owned())],
        size: None,
    }
}

async fn read_all(store: &dyn BlobStore, key: &str, offset: u64) -> Vec<u8> {
    let chunks: Vec<Bytes> = store
        .read(key, offset)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    chunks.concat()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|index| (index * 31 % 251) as u8).collect()
}

pub async fn streamed_writes_read_back_identically(backend: Backend) {
    let (store, prefix) = backend.store().await;
    let key = format!("{prefix}/files/conv/file-1");
    let body = pattern(3 * 1024 * 1024 + 17);
    let mut upload = store.start_upload(&key, attributes()).await.unwrap();
    for chunk in body.chunks(1024 * 1024 / 3) {
        upload.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    // Not visible before the commit.
    assert!(matches!(store.info(&key).await, Err(BlobError::NotFound)));
    upload.commit(Vec::new()).await.unwrap();
    let info = store.info(&key).await.unwrap();
    assert_eq!(info.size, body.len() as u64);
    assert_eq!(info.content_type, "text/plain");
    assert_eq!(read_all(&*store, &key, 0).await, body);
    assert_eq!(read_all(&*store, &key, 1_000_000).await, body[1_000_000..]);
    assert_eq!(
        store.list(&format!("{prefix}/files/")).await.unwrap(),
        std::slice::from_ref(&key)
    );
    store.delete(&key).await.unwrap();
    assert!(matches!(store.info(&key).await, Err(BlobError::NotFound)));
    store.delete(&key).await.expect("deleting twice is fine");
}

pub async fn aborted_and_dropped_uploads_leave_nothing(backend: Backend) {
    let (store, prefix) = backend.store().await;
    let key = format!("{prefix}/files/conv/aborted");
    let mut upload = store.start_upload(&key, attributes()).await.unwrap();
    upload.write(Bytes::from(pattern(100_000))).await.unwrap();
    upload.abort().await.unwrap();
    let dropped = format!("{prefix}/files/conv/dropped");
    let mut upload = store.start_upload(&dropped, attributes()).await.unwrap();
    upload.write(Bytes::from(pattern(100_000))).await.unwrap();
    drop(upload);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(store.list(&format!("{prefix}/")).await.unwrap().is_empty());
    assert!(matches!(store.info(&key).await, Err(BlobError::NotFound)));
}

pub async fn small_objects_are_put_in_one_go(backend: Backend) {
    let (store, prefix) = backend.store().await;
    let key = format!("{prefix}/thumbs/conv/file-1");
    store
        .put(&key, attributes(), Bytes::from_static(b"tiny"))
        .await
        .unwrap();
    assert_eq!(read_all(&*store, &key, 0).await, b"tiny");
    assert!(matches!(
        store.read(&format!("{prefix}/missing"), 0).await,
        Err(BlobError::NotFound)
    ));
}

/// The blob stores the suite runs on.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Fs,
    S3,
}

impl Backend {
    /// The store and a key prefix of the test's own.
    async fn store(self) -> (Arc<dyn BlobStore>, String) {
        match self {
            Self::Fs => fs_only::make().await,
            Self::S3 => s3_only::make().await,
        }
    }
}

crate::support::suite! {
    backends: fs = super::Backend::Fs, s3 = super::Backend::S3;
    tests: [
        streamed_writes_read_back_identically,
        aborted_and_dropped_uploads_leave_nothing,
        small_objects_are_put_in_one_go,
    ]
}

/// The filesystem store's own tests.
mod fs_only {
    use super::*;

    /// One directory (under target/) for the whole test binary; each test uses its own prefix.
    static ROOT: std::sync::LazyLock<tempfile::TempDir> =
        std::sync::LazyLock::new(|| tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap());

    pub(super) async fn make() -> (Arc<dyn BlobStore>, String) {
        let store = FsBlobStore::open(
            ROOT.path(),
            UrlSigner::new(vec![7; 32], "http://127.0.0.1:1"),
        )
        .await
        .unwrap();
        (Arc::new(store), crate::support::unique_prefix("blob"))
    }

    #[tokio::test]
    async fn metadata_given_at_the_commit_joins_the_attributes() {
        let store = FsBlobStore::open(
            ROOT.path(),
            UrlSigner::new(vec![7; 32], "http://127.0.0.1:1"),
        )
        .await
        .unwrap();
        let key = format!(
            "{}/files/conv/file",
            crate::support::unique_prefix("blob-meta")
        );
        let mut upload = store.start_upload(&key, attributes()).await.unwrap();
        upload.write(Bytes::from_static(b"hello")).await.unwrap();
        upload
            .commit(vec![
                ("sha256".to_owned(), "def".to_owned()),
                ("extra".to_owned(), "1".to_owned()),
            ])
            .await
            .unwrap();
        let stored = store.attributes(&key).await.unwrap();
        assert_eq!(
            stored.metadata,
            [
                ("sha256".to_owned(), "def".to_owned()),
                ("extra".to_owned(), "1".to_owned())
            ]
        );
        assert_eq!(stored.content_type, attributes().content_type);
        assert_eq!(stored.content_disposition, attributes().content_disposition);
    }
}

/// The S3 store against the real S3-compatible server (Garage) that scripts/test starts; every
/// test writes under a key prefix (or into a bucket) of its own.
mod s3_only {
    use std::time::{Duration, Instant};

    use secrecy::SecretString;
    use sha2::{Digest, Sha256};
    use svc_messaging::{
        budget::MemoryBudget,
        config::S3Settings,
        health::DependencyCheck,
        store::{
            blobs::BlobUpload,
            s3::{LifecycleOutcome, S3BlobStore},
        },
    };

    use super::*;
    use crate::support::cloud::garage;

    /// S3's smallest part: a 3 MiB upload is one PutObject, 12 MiB three parts.
    const PART: u64 = 5 * 1024 * 1024;
    const MIB: usize = 1024 * 1024;

    fn settings() -> S3Settings {
        crate::support::test_s3_settings()
    }

    fn store_with(settings: &S3Settings, budget: Arc<MemoryBudget>) -> S3BlobStore {
        S3BlobStore::new(settings, PART, 2, budget).expect("valid S3 settings")
    }

    fn store() -> S3BlobStore {
        store_with(
            &settings(),
            MemoryBudget::new(64 * MIB as u64, Duration::from_secs(30)),
        )
    }

    pub(super) async fn make() -> (Arc<dyn BlobStore>, String) {
        (Arc::new(store()), crate::support::unique_prefix("s3"))
    }

    fn sha256(bytes: &[u8]) -> Vec<u8> {
        Sha256::digest(bytes).to_vec()
    }

    /// Writes `body` in 1 MiB chunks.
    async fn write_all(upload: &mut Box<dyn BlobUpload>, body: &[u8]) {
        for chunk in body.chunks(MIB) {
            upload.write(Bytes::copy_from_slice(chunk)).await.unwrap();
        }
    }

    /// A fresh bucket of the test's own, writable with the test key.
    fn create_bucket(test: &str) -> String {
        let bucket = crate::support::unique_prefix(test);
        garage(&["bucket", "create", &bucket]);
        let key = std::env::var("SVC_TEST_GARAGE_KEY_NAME").unwrap_or_else(|_| "test".to_owned());
        garage(&[
            "bucket", "allow", "--read", "--write", "--owner", &bucket, "--key", &key,
        ]);
        bucket
    }

    #[tokio::test]
    async fn large_uploads_go_multipart_and_read_back_identically() {
        let store = store();
        let prefix = crate::support::unique_prefix("s3-multipart");
        let key = format!("{prefix}/files/conv/big");
        let body = pattern(12 * MIB + 123);
        let mut upload = store.start_upload(&key, attributes()).await.unwrap();
        write_all(&mut upload, &body[..6 * MIB]).await;
        // Past one part: a multipart upload is open, and nothing is visible yet.
        assert_eq!(
            store.open_multipart_uploads(&prefix).await.unwrap(),
            std::slice::from_ref(&key)
        );
        assert!(matches!(store.info(&key).await, Err(BlobError::NotFound)));
        write_all(&mut upload, &body[6 * MIB..]).await;
        upload.commit(Vec::new()).await.unwrap();

        assert!(
            store
                .open_multipart_uploads(&prefix)
                .await
                .unwrap()
                .is_empty()
        );
        let info = store.info(&key).await.unwrap();
        assert_eq!(info.size, body.len() as u64);
        assert_eq!(info.content_type, "text/plain");
        assert_eq!(sha256(&read_all(&store, &key, 0).await), sha256(&body));
        let offset = 7 * MIB + 5;
        assert_eq!(
            sha256(&read_all(&store, &key, offset as u64).await),
            sha256(&body[offset..])
        );
        assert!(read_all(&store, &key, body.len() as u64).await.is_empty());
        // Headers and metadata given at the start travel with the multipart upload.
        let head = store
            .client()
            .head_object()
            .bucket(store.bucket())
            .key(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(
            head.content_disposition(),
            Some(attributes().content_disposition.as_str())
        );
        assert_eq!(
            head.metadata().and_then(|metadata| metadata.get("sha256")),
            Some(&"abc".to_owned())
        );
        // A three-part object's ETag says how many parts it has.
        assert!(
            head.e_tag().unwrap().ends_with("-3\""),
            "{:?}",
            head.e_tag()
        );
        store.delete(&key).await.unwrap();
    }

    /// Metadata known only at the end (the sha256) reaches single-request and multipart objects
    /// alike, without losing the headers given at the start.
    #[tokio::test]
    async fn metadata_given_at_the_commit_is_stored_with_the_object() {
        let store = store();
        let prefix = crate::support::unique_prefix("s3-commit-meta");
        for (name, len) in [("single", MIB), ("multipart", 11 * MIB)] {
            let key = format!("{prefix}/files/conv/{name}");
            let body = pattern(len);
            let mut upload = store.start_upload(&key, attributes()).await.unwrap();
            write_all(&mut upload, &body).await;
            upload
                .commit(vec![
                    ("sha256".to_owned(), "def".to_owned()),
                    ("extra".to_owned(), "1".to_owned()),
                ])
                .await
                .unwrap();
            let head = store
                .client()
                .head_object()
                .bucket(store.bucket())
                .key(&key)
                .send()
                .await
                .unwrap();
            let metadata = head.metadata().cloned().unwrap_or_default();
            assert_eq!(
                metadata.get("sha256").map(String::as_str),
                Some("def"),
                "{name}"
            );
            assert_eq!(
                metadata.get("extra").map(String::as_str),
                Some("1"),
                "{name}"
            );
            assert_eq!(head.content_type(), Some("text/plain"), "{name}");
            assert_eq!(
                head.content_disposition(),
                Some(attributes().content_disposition.as_str()),
                "{name}"
            );
            assert_eq!(head.content_length(), Some(len as i64), "{name}");
            assert_eq!(
                sha256(&read_all(&store, &key, 0).await),
                sha256(&body),
                "{name}"
            );
        }
        assert!(
            store
                .open_multipart_uploads(&prefix)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.list(&format!("{prefix}/")).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn aborted_and_dropped_multipart_uploads_leave_nothing() {
        let store = store();
        let prefix = crate::support::unique_prefix("s3-abort");
        let body = pattern(11 * MIB);

        let aborted = format!("{prefix}/files/conv/aborted");
        let mut upload = store.start_upload(&aborted, attributes()).await.unwrap();
        write_all(&mut upload, &body).await;
        assert_eq!(
            store.open_multipart_uploads(&prefix).await.unwrap().len(),
            1
        );
        upload.abort().await.unwrap();
        assert!(
            store
                .open_multipart_uploads(&prefix)
                .await
                .unwrap()
                .is_empty()
        );

        let dropped = format!("{prefix}/files/conv/dropped");
        let mut upload = store.start_upload(&dropped, attributes()).await.unwrap();
        write_all(&mut upload, &body).await;
        assert_eq!(
            store.open_multipart_uploads(&prefix).await.unwrap().len(),
            1
        );
        drop(upload);

        // Cancelled mid-write, most likely while the multipart upload is being created: the
        // upload it creates must still be aborted.
        let cancelled = format!("{prefix}/files/conv/cancelled");
        let mut upload = store.start_upload(&cancelled, attributes()).await.unwrap();
        let write = upload.write(Bytes::from(pattern(6 * MIB)));
        let _ = tokio::time::timeout(Duration::from_millis(1), write).await;
        drop(upload);

        // The aborts run on tasks of their own: give them a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !store
            .open_multipart_uploads(&prefix)
            .await
            .unwrap()
            .is_empty()
        {
            assert!(
                Instant::now() < deadline,
                "the dropped upload was not aborted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(store.list(&format!("{prefix}/")).await.unwrap().is_empty());
        assert!(matches!(
            store.info(&dropped).await,
            Err(BlobError::NotFound)
        ));
    }

    fn sized(len: usize) -> BlobAttributes {
        BlobAttributes {
            size: Some(len as u64),
            ..attributes()
        }
    }

    /// An object whose size is given up front streams its parts: the multipart upload and the
    /// first part's request start once the part outgrew its first bytes (1 MiB), long before
    /// the 5 MiB part is complete (a buffered write opens it only past a whole part).
    #[tokio::test]
    async fn objects_of_known_size_stream_their_parts_as_bytes_arrive() {
        let store = store();
        let prefix = crate::support::unique_prefix("s3-streamed");
        let key = format!("{prefix}/files/conv/big");
        let body = pattern(12 * MIB + 123);
        let mut upload = store.start_upload(&key, sized(body.len())).await.unwrap();
        write_all(&mut upload, &body[..2 * MIB]).await;
        assert_eq!(
            store.open_multipart_uploads(&prefix).await.unwrap(),
            std::slice::from_ref(&key),
            "2 MiB into a 5 MiB part, its request is on its way"
        );
        write_all(&mut upload, &body[2 * MIB..]).await;
        upload
            .commit(vec![("sha256".to_owned(), "def".to_owned())])
            .await
            .unwrap();
        assert!(
            store
                .open_multipart_uploads(&prefix)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(sha256(&read_all(&store, &key, 0).await), sha256(&body));
        let head = store
            .client()
            .head_object()
            .bucket(store.bucket())
            .key(&key)
            .send()
            .await
            .unwrap();
        assert!(
            head.e_tag().unwrap().ends_with("-3\""),
            "{:?}",
            head.e_tag()
        );
        assert_eq!(
            head.metadata().and_then(|metadata| metadata.get("sha256")),
            Some(&"def".to_owned())
        );

        // Fewer bytes than declared: the commit fails and leaves nothing; more are refused.
        let short = format!("{prefix}/files/conv/short");
        let mut upload = store.start_upload(&short, sized(7 * MIB)).await.unwrap();
        write_all(&mut upload, &body[..6 * MIB]).await;
        assert!(upload.commit(Vec::new()).await.is_err());
        let long = format!("{prefix}/files/conv/long");
        let mut upload = store.start_upload(&long, sized(6 * MIB)).await.unwrap();
        write_all(&mut upload, &body[..6 * MIB]).await;
        assert!(upload.write(Bytes::from_static(b"x")).await.is_err());
        upload.abort().await.unwrap();
        // The failed commit and the abort both clean up before they answer.
        assert!(
            store
                .open_multipart_uploads(&prefix)
                .await
                .unwrap()
                .is_empty(),
            "a refused write stayed open"
        );
        assert_eq!(
            store.list(&format!("{prefix}/")).await.unwrap(),
            std::slice::from_ref(&key)
        );
        store.delete(&key).await.unwrap();
    }

    /// What the proxy saw: UploadPart requests, those announcing a checksum trailer, cuts.
    #[derive(Default)]
    struct ProxyLog {
        parts: std::sync::atomic::AtomicUsize,
        trailers: std::sync::atomic::AtomicUsize,
        cuts: std::sync::atomic::AtomicUsize,
    }

    /// A loopback proxy in front of Garage that logs UploadPart requests and, with `cut_after`,
    /// cuts the first connection carrying part 2 once that many bytes of it went through.
    async fn part_proxy(cut_after: Option<usize>) -> (String, Arc<ProxyLog>) {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let upstream = settings()
            .endpoint
            .unwrap()
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(ProxyLog::default());
        let shared = log.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let upstream = upstream.clone();
                let log = shared.clone();
                tokio::spawn(async move {
                    let server = tokio::net::TcpStream::connect(&upstream).await.unwrap();
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let answers = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    });
                    let mut buffer = vec![0; 64 * 1024];
                    // Bytes of a part-2 request seen on this connection, once one started.
                    let mut part_two: Option<usize> = None;
                    let contains = |haystack: &[u8], needle: &[u8]| {
                        haystack
                            .windows(needle.len())
                            .any(|window| window == needle)
                    };
                    while let Ok(read) = client_read.read(&mut buffer).await {
                        if read == 0 {
                            break;
                        }
                        let seen = &buffer[..read];
                        if seen.starts_with(b"PUT ") && contains(seen, b"partNumber=") {
                            log.parts.fetch_add(1, Ordering::SeqCst);
                            if contains(&seen.to_ascii_lowercase(), b"x-amz-trailer") {
                                log.trailers.fetch_add(1, Ordering::SeqCst);
                            }
                            if cut_after.is_some()
                                && part_two.is_none()
                                && log.cuts.load(Ordering::SeqCst) == 0
                                && contains(seen, b"partNumber=2&")
                            {
                                part_two = Some(0);
                            }
                        }
                        if let (Some(count), Some(after)) = (&mut part_two, cut_after) {
                            *count += read;
                            if *count >= after && log.cuts.fetch_add(1, Ordering::SeqCst) == 0 {
                                // Cut: both directions go away mid-request.
                                answers.abort();
                                return;
                            }
                        }
                        if server_write.write_all(seen).await.is_err() {
                            break;
                        }
                    }
                    let _ = answers.await;
                });
            }
        });
        (address, log)
    }

    /// A streamed part whose connection breaks half-way is sent again from the chunks kept for
    /// it: the upload succeeds with the same bytes, without the writer sending anything twice.
    #[tokio::test]
    async fn a_streamed_part_that_fails_is_sent_again_from_its_kept_bytes() {
        let (endpoint, log) = part_proxy(Some(2 * MIB)).await;
        let mut settings = settings();
        settings.endpoint = Some(endpoint);
        let store = store_with(
            &settings,
            MemoryBudget::new(64 * MIB as u64, Duration::from_secs(30)),
        );
        let prefix = crate::support::unique_prefix("s3-part-retry");
        let key = format!("{prefix}/files/conv/big");
        let body = pattern(12 * MIB + 5);
        let mut upload = store.start_upload(&key, sized(body.len())).await.unwrap();
        write_all(&mut upload, &body).await;
        upload.commit(Vec::new()).await.unwrap();
        let cuts = log.cuts.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(cuts, 1, "the proxy cut part 2 once");
        assert_eq!(sha256(&read_all(&store, &key, 0).await), sha256(&body));
        store.delete(&key).await.unwrap();
    }

    /// Streamed parts carry no checksum by default (`s3.request_checksums = "when-required"`);
    /// with `"when-supported"` they carry a CRC32 trailer (`aws-chunked`); both store the same
    /// bytes.
    #[tokio::test]
    async fn streamed_parts_carry_a_checksum_trailer_unless_configured_off() {
        use std::sync::atomic::Ordering;
        use svc_messaging::config::S3RequestChecksums;

        for (checksums, trailers) in [
            (S3RequestChecksums::WhenSupported, true),
            (S3RequestChecksums::WhenRequired, false),
        ] {
            let (endpoint, log) = part_proxy(None).await;
            let mut settings = settings();
            settings.endpoint = Some(endpoint);
            settings.request_checksums = checksums;
            let store = store_with(
                &settings,
                MemoryBudget::new(64 * MIB as u64, Duration::from_secs(30)),
            );
            let key = format!(
                "{}/files/conv/big",
                crate::support::unique_prefix("s3-trailer")
            );
            let body = pattern(11 * MIB);
            let mut upload = store.start_upload(&key, sized(body.len())).await.unwrap();
            write_all(&mut upload, &body).await;
            upload.commit(Vec::new()).await.unwrap();
            assert_eq!(sha256(&read_all(&store, &key, 0).await), sha256(&body));
            assert_eq!(log.parts.load(Ordering::SeqCst), 3, "{checksums:?}");
            let expected = if trailers { 3 } else { 0 };
            assert_eq!(
                log.trailers.load(Ordering::SeqCst),
                expected,
                "{checksums:?}"
            );
            store.delete(&key).await.unwrap();
        }
    }

    #[tokio::test]
    async fn presigned_urls_serve_the_object_until_they_expire() {
        let store = store();
        let key = format!(
            "{}/files/conv/notes.txt",
            crate::support::unique_prefix("s3-url")
        );
        store
            .put(&key, attributes(), Bytes::from_static(b"hello, world"))
            .await
            .unwrap();

        let url = store
            .download_url(&key, Duration::from_secs(60))
            .await
            .unwrap();
        let response = reqwest::get(&url).await.unwrap();
        assert_eq!(response.status(), 200);
        let headers = response.headers().clone();
        assert_eq!(
            headers["content-disposition"],
            attributes().content_disposition.as_str()
        );
        assert_eq!(headers["content-type"], "text/plain");
        assert_eq!(response.bytes().await.unwrap(), "hello, world");

        // One character of the signature changed: refused.
        let signature_at = url.find("X-Amz-Signature=").expect("a SigV4 URL") + 16;
        let mut tampered = url.clone().into_bytes();
        tampered[signature_at] = if tampered[signature_at] == b'0' {
            b'1'
        } else {
            b'0'
        };
        let tampered = String::from_utf8(tampered).unwrap();
        assert_eq!(reqwest::get(&tampered).await.unwrap().status(), 403);

        // Expired: Garage answers 400, AWS 403.
        let short = store
            .download_url(&key, Duration::from_secs(1))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let status = reqwest::get(&short).await.unwrap().status();
        assert!(status == 400 || status == 403, "expired URL got {status}");
        store.delete(&key).await.unwrap();
    }

    #[tokio::test]
    async fn lifecycle_rules_expire_files_and_stale_multipart_uploads() {
        let bucket = create_bucket("s3-lifecycle");
        let settings = S3Settings {
            bucket: Some(bucket.clone()),
            ..settings()
        };
        let store = store_with(
            &settings,
            MemoryBudget::new(64 * MIB as u64, Duration::from_secs(30)),
        );
        // 36 h rounds up to two days.
        let outcome = store
            .install_lifecycle(Duration::from_secs(36 * 3600))
            .await
            .unwrap();
        assert_eq!(outcome, LifecycleOutcome::Installed);
        // Installing again (every start-up does) replaces the rules with the same ones.
        assert_eq!(
            store
                .install_lifecycle(Duration::from_secs(36 * 3600))
                .await
                .unwrap(),
            LifecycleOutcome::Installed
        );

        let lifecycle = store
            .client()
            .get_bucket_lifecycle_configuration()
            .bucket(&bucket)
            .send()
            .await
            .unwrap();
        crate::support::cloud::assert_lifecycle_rules(lifecycle.rules(), 2);
    }

    #[tokio::test]
    async fn a_full_memory_budget_makes_uploads_fail_busy() {
        // Room for one part buffer, not two; a short wait.
        let budget = MemoryBudget::new(PART * 3 / 2, Duration::from_millis(300));
        let store = store_with(&settings(), budget.clone());
        let prefix = crate::support::unique_prefix("s3-budget");
        let mut first = store
            .start_upload(&format!("{prefix}/files/conv/first"), attributes())
            .await
            .unwrap();
        // Memory is reserved as bytes arrive: one byte holds one KiB unit, not a part.
        first.write(Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(budget.available_bytes(), PART * 3 / 2 - 1024);
        first
            .write(Bytes::from(pattern(PART as usize - 1)))
            .await
            .unwrap();
        assert!(
            budget.available_bytes() <= PART / 2,
            "the first holds a part"
        );

        let mut second = store
            .start_upload(&format!("{prefix}/files/conv/second"), attributes())
            .await
            .unwrap();
        let started = Instant::now();
        let refused = second.write(Bytes::from(pattern(3 * MIB))).await;
        assert!(matches!(refused, Err(BlobError::Busy(_))), "{refused:?}");
        assert!(started.elapsed() >= Duration::from_millis(300));
        // A refused upload stays refused; aborting it is fine.
        assert!(second.write(Bytes::from_static(b"x")).await.is_err());
        second.abort().await.unwrap();

        first.commit(Vec::new()).await.unwrap();
        assert_eq!(budget.available_bytes(), PART * 3 / 2, "all released");
        let mut third = store
            .start_upload(&format!("{prefix}/files/conv/third"), attributes())
            .await
            .unwrap();
        third.write(Bytes::from(pattern(MIB))).await.unwrap();
        third.commit(Vec::new()).await.unwrap();
        assert_eq!(
            store.list(&format!("{prefix}/")).await.unwrap(),
            [
                format!("{prefix}/files/conv/first"),
                format!("{prefix}/files/conv/third")
            ]
        );
    }

    #[tokio::test]
    async fn uploads_wait_for_memory_held_by_others() {
        let budget = MemoryBudget::new(PART * 3 / 2, Duration::from_secs(20));
        let store = Arc::new(store_with(&settings(), budget.clone()));
        let prefix = crate::support::unique_prefix("s3-budget-wait");
        let mut first = store
            .start_upload(&format!("{prefix}/files/conv/first"), attributes())
            .await
            .unwrap();
        first
            .write(Bytes::from(pattern(PART as usize)))
            .await
            .unwrap();

        // The second waits for the first's part buffer...
        let second_key = format!("{prefix}/files/conv/second");
        let body = pattern(12 * MIB);
        let second = tokio::spawn({
            let store = store.clone();
            let key = second_key.clone();
            let body = body.clone();
            async move {
                let mut upload = store.start_upload(&key, attributes()).await.unwrap();
                // ...and then, with room for one part buffer only, uploads its parts one by
                // one: each next buffer waits for the previous part to be sent.
                write_all(&mut upload, &body).await;
                upload.commit(Vec::new()).await.unwrap();
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!second.is_finished(), "the second must wait for memory");
        first.commit(Vec::new()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(30), second)
            .await
            .expect("the second proceeds once the first is done")
            .unwrap();
        assert_eq!(
            sha256(&read_all(&*store, &second_key, 0).await),
            sha256(&body)
        );
        assert_eq!(budget.available_bytes(), PART * 3 / 2, "all released");
    }

    #[tokio::test]
    async fn failures_say_whether_a_retry_can_help() {
        let store = store();
        store.check().await.expect("the test bucket answers");
        assert_eq!(store.name(), "s3");

        let wrong_secret = S3Settings {
            secret_access_key: Some(SecretString::from("0".repeat(64))),
            ..settings()
        };
        let budget = MemoryBudget::new(64 * MIB as u64, Duration::from_secs(1));
        let wrong_secret = store_with(&wrong_secret, budget.clone());
        assert!(wrong_secret.check().await.is_err());
        let key = format!("{}/files/x", crate::support::unique_prefix("s3-errors"));
        let error = wrong_secret.info(&key).await.unwrap_err();
        assert!(matches!(error, BlobError::Misconfigured(_)), "{error:?}");
        let error = wrong_secret
            .put(&key, attributes(), Bytes::from_static(b"x"))
            .await
            .unwrap_err();
        assert!(matches!(error, BlobError::Misconfigured(_)), "{error:?}");
        assert!(
            !error.to_string().contains(&"0".repeat(64)),
            "no secret in {error}"
        );

        let missing_bucket = S3Settings {
            bucket: Some(crate::support::unique_prefix("no-such-bucket")),
            ..settings()
        };
        let missing_bucket = store_with(&missing_bucket, budget.clone());
        let error = missing_bucket.list("").await.unwrap_err();
        assert!(matches!(error, BlobError::Misconfigured(_)), "{error:?}");
        assert!(missing_bucket.check().await.is_err());

        // Nothing listens there: unreachable, which a retry may fix.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let unreachable = S3Settings {
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            ..settings()
        };
        let error = store_with(&unreachable, budget)
            .info(&key)
            .await
            .unwrap_err();
        assert!(matches!(error, BlobError::Unavailable(_)), "{error:?}");

        let no_keys = S3Settings {
            access_key_id: None,
            secret_access_key: None,
            ..settings()
        };
        let error = S3BlobStore::new(
            &no_keys,
            PART,
            2,
            MemoryBudget::new(PART * 3, Duration::from_secs(1)),
        )
        .unwrap_err();
        assert!(matches!(error, BlobError::Misconfigured(_)), "{error:?}");
        assert!(error.to_string().contains("s3.access_key_id"), "{error}");
    }
}
