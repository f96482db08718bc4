//! One conformance suite for every `BlobStore`: the filesystem store here, the S3 store against
//! the real S3-compatible server that scripts/test starts.

mod common;

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

pub async fn streamed_writes_read_back_identically(store: Arc<dyn BlobStore>, prefix: &str) {
    let key = format!("{prefix}/files/conv/file-1");
    let body = pattern(3 * 1024 * 1024 + 17);
    let mut upload = store.start_upload(&key, attributes()).await.unwrap();
    for chunk in body.chunks(1024 * 1024 / 3) {
        upload.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    // Not visible before the commit.
    assert!(matches!(store.info(&key).await, Err(BlobError::NotFound)));
    upload.commit().await.unwrap();
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

pub async fn aborted_and_dropped_uploads_leave_nothing(store: Arc<dyn BlobStore>, prefix: &str) {
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

pub async fn small_objects_are_put_in_one_go(store: Arc<dyn BlobStore>, prefix: &str) {
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

macro_rules! blob_suite {
    ($make:expr) => {
        #[tokio::test]
        async fn streamed_writes_read_back_identically() {
            let (store, prefix) = $make().await;
            super::streamed_writes_read_back_identically(store, &prefix).await;
        }
        #[tokio::test]
        async fn aborted_and_dropped_uploads_leave_nothing() {
            let (store, prefix) = $make().await;
            super::aborted_and_dropped_uploads_leave_nothing(store, &prefix).await;
        }
        #[tokio::test]
        async fn small_objects_are_put_in_one_go() {
            let (store, prefix) = $make().await;
            super::small_objects_are_put_in_one_go(store, &prefix).await;
        }
    };
}

mod fs {
    use super::*;

    /// One directory (under target/) for the whole test binary; each test uses its own prefix.
    static ROOT: std::sync::LazyLock<tempfile::TempDir> =
        std::sync::LazyLock::new(|| tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap());

    async fn make() -> (Arc<dyn BlobStore>, String) {
        let store = FsBlobStore::open(
            ROOT.path(),
            UrlSigner::new(vec![7; 32], "http://127.0.0.1:1"),
        )
        .await
        .unwrap();
        (Arc::new(store), common::unique_prefix("blob"))
    }

    blob_suite!(make);
}
