//! Thumbnails decoded while the upload arrives: for every corpus JPEG and PNG, the time from
//! the service receiving the last byte to the thumbnail stored, against sharp's time for the
//! same file (one thread, in memory), in the same run.
//!
//! The service runs in this process: the real `FileService` (validation, hashing, the kept
//! body, the thumbnail pool and its streamed decoders, the blob store), the memory message
//! store and the local-disk blob store (`FsBlobStore` in a temp dir; S3 would add its own PUT
//! latency, the same before and after this work). The upload stream is throttled: chunks of
//! `THUMBNAIL_STREAM_CHUNK_KIB` (default 64) at `THUMBNAIL_STREAM_MIBS` MiB/s (default 32).
//! "Last byte" is the moment the service takes the last chunk from the stream; "stored" is the
//! moment the blob store's `put` of the thumbnail returns (a wrapper around the store notes it).
//! Runs alternate upload / sharp per file, `THUMBNAIL_STREAM_RUNS` times (default 7) after one
//! warm-up, everything pinned to one core (`THUMBNAIL_BENCH_CPU`, default 1) like
//! `benches/thumbnail.rs`; medians are reported. "buffered" is our whole decode of the file
//! from memory (what the last byte used to wait for). Needs `scripts/bench-thumbnails
//! --prepare` (sharp and the corpus).

#[path = "sharp/mod.rs"]
mod sharp;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, stream::BoxStream};
use svc_messaging::{
    auth::Caller,
    budget::MemoryBudget,
    config::Settings,
    error::Result as ServiceResult,
    files::{
        policy::{FileKind, UploadPolicy},
        service::{FileService, UploadPart, UploadRequest},
    },
    ids::UserId,
    messaging::service::ConversationService,
    store::{
        blobs::{
            BlobAttributes, BlobResult, BlobStore, BlobUpload, ObjectPage, ResumableUpload,
            StagedParts, UnfinishedWrite,
        },
        fs::{FsBlobStore, UrlSigner},
        fs_sessions::FsUploadSessionStore,
        memory::{MemoryFileRecordStore, MemoryMessageStore},
        messages::Retention,
    },
    thumbnails::{ThumbnailPool, Thumbnailer},
};

const PINNED_ENV: &str = "THUMBNAIL_BENCH_PINNED";

/// The file store, noting when each thumbnail's `put` began (the thumbnail was ready) and
/// returned (it was stored).
struct NotingStore {
    inner: FsBlobStore,
    thumbnail_ready: Mutex<Option<Instant>>,
    thumbnail_stored: Mutex<Option<Instant>>,
}

#[async_trait]
impl BlobStore for NotingStore {
    async fn start_upload(
        &self,
        key: &str,
        attributes: BlobAttributes,
    ) -> BlobResult<Box<dyn BlobUpload>> {
        self.inner.start_upload(key, attributes).await
    }

    async fn resume_upload(
        &self,
        key: &str,
        attributes: BlobAttributes,
        part_size: u64,
        staged: StagedParts,
    ) -> BlobResult<Box<dyn ResumableUpload>> {
        self.inner
            .resume_upload(key, attributes, part_size, staged)
            .await
    }

    async fn discard_staged(&self, key: &str, staged: &StagedParts) -> BlobResult<()> {
        self.inner.discard_staged(key, staged).await
    }

    async fn put(&self, key: &str, attributes: BlobAttributes, bytes: Bytes) -> BlobResult<()> {
        if key.starts_with("thumbs/") {
            *self.thumbnail_ready.lock().unwrap() = Some(Instant::now());
        }
        let stored = self.inner.put(key, attributes, bytes).await;
        if key.starts_with("thumbs/") {
            *self.thumbnail_stored.lock().unwrap() = Some(Instant::now());
        }
        stored
    }

    #[cfg(feature = "testsuite")]
    async fn info(&self, key: &str) -> BlobResult<svc_messaging::store::blobs::BlobInfo> {
        self.inner.info(key).await
    }

    async fn read(
        &self,
        key: &str,
        offset: u64,
    ) -> BlobResult<BoxStream<'static, BlobResult<Bytes>>> {
        self.inner.read(key, offset).await
    }

    async fn delete(&self, key: &str) -> BlobResult<()> {
        self.inner.delete(key).await
    }

    async fn download_url(&self, key: &str, valid_for: Duration) -> BlobResult<String> {
        self.inner.download_url(key, valid_for).await
    }

    async fn list(&self, prefix: &str) -> BlobResult<Vec<String>> {
        self.inner.list(prefix).await
    }

    async fn exists(&self, key: &str) -> BlobResult<bool> {
        self.inner.exists(key).await
    }

    async fn objects_before(
        &self,
        prefix: &str,
        before: SystemTime,
        start_after: Option<&str>,
        limit: usize,
    ) -> BlobResult<ObjectPage> {
        self.inner
            .objects_before(prefix, before, start_after, limit)
            .await
    }

    async fn unfinished_writes(
        &self,
        prefixes: &[&str],
        before: SystemTime,
        limit: usize,
    ) -> BlobResult<Vec<UnfinishedWrite>> {
        self.inner.unfinished_writes(prefixes, before, limit).await
    }

    async fn abort_unfinished(&self, write: &UnfinishedWrite) -> BlobResult<()> {
        self.inner.abort_unfinished(write).await
    }
}

struct Service {
    files: Arc<FileService>,
    store: Arc<NotingStore>,
    pool: Arc<ThumbnailPool>,
    caller: Caller,
    conversation_id: svc_messaging::ids::ConversationId,
    _dir: tempfile::TempDir,
}

impl Service {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut settings = Settings::default();
        // The 12 MP RGB PNG is 17 MB.
        settings.uploads.image_max_size = bytesize::ByteSize::mib(32);
        let retention = Retention {
            max_events: settings.messaging.history_max_events,
            max_age: settings.messaging.history_max_age,
        };
        let messages = Arc::new(MemoryMessageStore::new(retention));
        let records = Arc::new(MemoryFileRecordStore::new());
        let sessions = Arc::new(
            FsUploadSessionStore::open(&dir.path().join("sessions"))
                .await
                .expect("sessions dir"),
        );
        let budget = MemoryBudget::new(
            settings.uploads.memory_budget.as_u64(),
            settings.uploads.memory_wait_timeout,
        );
        let store = Arc::new(NotingStore {
            inner: FsBlobStore::open(
                &dir.path().join("blobs"),
                UrlSigner::new(vec![7; 32], "http://127.0.0.1:1/"),
            )
            .await
            .expect("blob dir"),
            thumbnail_ready: Mutex::new(None),
            thumbnail_stored: Mutex::new(None),
        });
        let conversations = Arc::new(ConversationService::new(
            messages,
            records.clone(),
            settings.messaging.clone(),
        ));
        let pool = Arc::new(ThumbnailPool::new(
            &settings.thumbnails,
            settings.uploads.max_image_pixels,
            budget.clone(),
        ));
        let files = Arc::new(FileService::new(
            conversations.clone(),
            store.clone(),
            records,
            sessions,
            Arc::new(UploadPolicy::from_settings(&settings.uploads)),
            pool.clone(),
            settings.downloads.url_ttl,
            budget,
        ));
        let caller = Caller {
            user_id: UserId::parse("alice").expect("user id"),
        };
        let view = conversations
            .create_conversation(&caller, "bench", Vec::new(), None)
            .await
            .expect("conversation");
        Self {
            files,
            store,
            pool,
            caller,
            conversation_id: view.conversation.id,
            _dir: dir,
        }
    }

    /// Uploads `body` over a throttled stream; returns last byte -> thumbnail ready and
    /// -> thumbnail stored, in ms.
    async fn upload(&self, name: &str, kind: FileKind, body: &Bytes, pace: &Pace) -> (f64, f64) {
        *self.store.thumbnail_stored.lock().unwrap() = None;
        let last_byte = Arc::new(Mutex::new(None));
        let request = UploadRequest {
            conversation_id: self.conversation_id,
            file_name: name.to_owned(),
            content_type: kind.mime_type().to_owned(),
            size_bytes: body.len() as i64,
            sha256: String::new(),
            caption: String::new(),
            request_id: String::new(),
        };
        let chunks: Vec<Bytes> = (0..body.len())
            .step_by(pace.chunk)
            .map(|at| body.slice(at..(at + pace.chunk).min(body.len())))
            .collect();
        let count = chunks.len();
        let interval = pace.interval;
        let noted = last_byte.clone();
        let started = tokio::time::Instant::now();
        let parts =
            futures::stream::iter(chunks.into_iter().enumerate()).then(move |(index, chunk)| {
                let noted = noted.clone();
                async move {
                    tokio::time::sleep_until(started + interval * index as u32).await;
                    if index + 1 == count {
                        *noted.lock().unwrap() = Some(Instant::now());
                    }
                    ServiceResult::Ok(UploadPart::Chunk(chunk))
                }
            });
        let parts = futures::stream::iter([Ok(UploadPart::Metadata(request))]).chain(parts);
        let (record, _) = self
            .files
            .upload(&self.caller, Box::pin(parts))
            .await
            .expect("upload");
        assert!(record.file.has_thumbnail, "{name}: a thumbnail");
        let last_byte = last_byte.lock().unwrap().expect("last byte");
        let ready = self.store.thumbnail_ready.lock().unwrap().expect("ready");
        let stored = self.store.thumbnail_stored.lock().unwrap().expect("stored");
        let ms = |at: Instant| at.saturating_duration_since(last_byte).as_secs_f64() * 1000.0;
        (ms(ready), ms(stored))
    }
}

struct Pace {
    chunk: usize,
    interval: Duration,
}

fn main() {
    // `cargo test --benches` runs this binary without `--bench`: not as a test.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("thumbnail_stream: benchmark skipped (run scripts/bench-thumbnails)");
        return;
    }
    pin_to_one_core();
    let home = PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()));
    let cache = home.join(".cache/svc-messaging");
    let corpus = std::env::var_os("THUMBNAIL_CORPUS")
        .map_or_else(|| cache.join("thumbnail-corpus"), PathBuf::from);
    let sharp_dir = std::env::var_os("SHARP_BENCH_DIR")
        .map_or_else(|| cache.join("sharp-bench"), PathBuf::from);
    let knob = |name: &str, default: f64| {
        std::env::var(name)
            .ok()
            .and_then(|value| value.parse().ok())
            .unwrap_or(default)
    };
    let runs = knob("THUMBNAIL_STREAM_RUNS", 7.0) as usize;
    // Only the corpus files whose name contains this.
    let only = std::env::var("THUMBNAIL_STREAM_ONLY").unwrap_or_default();
    let chunk = (knob("THUMBNAIL_STREAM_CHUNK_KIB", 64.0) * 1024.0) as usize;
    let mibs = knob("THUMBNAIL_STREAM_MIBS", 32.0);
    let pace = Pace {
        chunk,
        interval: Duration::from_secs_f64(chunk as f64 / (mibs * 1024.0 * 1024.0)),
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        corpus.join("jpeg-24mp-420.jpg").exists() && sharp_dir.join("node_modules/sharp").exists(),
        "run scripts/bench-thumbnails --prepare first"
    );
    let mut files: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .expect("corpus folder")
        .map(|entry| entry.expect("corpus entry").path())
        .filter(|path| matches!(extension(path), "jpg" | "png"))
        .filter(|path| path.to_string_lossy().contains(&only))
        .collect();
    files.sort();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let service = runtime.block_on(Service::start());
    let settings = Settings::default().thumbnails;
    let thumbnailer = Thumbnailer::new(&settings, 40_000_000);
    let mut sharp = sharp::Sharp::start(&root.join("benches/sharp-baseline.mjs"), &sharp_dir);
    eprintln!(
        "thumbnail_stream: {} KiB chunks at {mibs} MiB/s, {runs} runs per file; {}",
        chunk / 1024,
        sharp.versions
    );
    let mut rows = Vec::new();
    for path in &files {
        let kind = if extension(path) == "jpg" {
            FileKind::Jpeg
        } else {
            FileKind::Png
        };
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let body = Bytes::from(std::fs::read(path).expect("read corpus file"));
        let plan = thumbnailer.plan(kind, &body).expect("plan").expect("image");
        // sharp writes the same format as ours (PNG for real transparency).
        let format = match thumbnailer
            .render(&plan, &body)
            .expect("thumbnail")
            .content_type
        {
            "image/png" => "png",
            _ => "jpeg",
        };
        // Warm-up, and streamed for real: the decoder consumed every byte as it arrived.
        let streamed_before = service.pool.streamed_bytes();
        runtime.block_on(service.upload(&name, kind, &body, &pace));
        assert_eq!(
            service.pool.streamed_bytes() - streamed_before,
            body.len() as u64,
            "{name}: decoded while arriving"
        );
        let _ = sharp.run(path, &settings, format, None);
        let (mut ready, mut ours, mut theirs, mut buffered) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let (to_ready, to_stored) = runtime.block_on(service.upload(&name, kind, &body, &pace));
            ready.push(to_ready);
            ours.push(to_stored);
            theirs.push(sharp.run(path, &settings, format, None).ms);
            let started = Instant::now();
            let thumbnail = thumbnailer.render(&plan, &body).expect("thumbnail");
            buffered.push(started.elapsed().as_secs_f64() * 1000.0);
            drop(thumbnail);
        }
        let row = Row {
            name: path.file_stem().unwrap().to_string_lossy().into_owned(),
            bytes: body.len(),
            upload_ms: body.len() as f64 / (mibs * 1024.0 * 1024.0) * 1000.0,
            ready: median(&mut ready),
            after_last_byte: median(&mut ours),
            sharp: median(&mut theirs),
            buffered: median(&mut buffered),
            worst: ours.iter().copied().fold(0.0, f64::max),
        };
        eprintln!(
            "{:<32} after last byte {:6.2} ms  sharp {:6.2} ms  ratio {:.3}",
            row.name,
            row.after_last_byte,
            row.sharp,
            row.after_last_byte / row.sharp
        );
        rows.push(row);
    }
    let report = report(&rows, runs, chunk, mibs);
    println!("{report}");
    let out = root.join("target/thumbnail-stream-bench.md");
    if std::fs::write(&out, &report).is_ok() {
        eprintln!("written to {}", out.display());
    }
}

struct Row {
    name: String,
    bytes: usize,
    upload_ms: f64,
    ready: f64,
    after_last_byte: f64,
    sharp: f64,
    buffered: f64,
    worst: f64,
}

fn report(rows: &[Row], runs: usize, chunk: usize, mibs: f64) -> String {
    let mut out = format!(
        "{} KiB chunks at {mibs} MiB/s; medians of {runs} uploads per file, alternated with \
         sharp; load average {}\n\n",
        chunk / 1024,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    out.push_str(
        "| file | MiB | upload ms | last byte -> thumbnail ready ms | -> stored ms (worst) | sharp ms | stored / sharp | goal <= 0.2 | ready / sharp | buffered decode ms (before) | buffered / sharp |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let ratio = row.after_last_byte / row.sharp;
        out.push_str(&format!(
            "| {} | {:.1} | {:.0} | {:.2} | {:.2} ({:.2}) | {:.2} | **{:.3}** | {} | {:.3} | {:.2} | {:.2} |\n",
            row.name,
            row.bytes as f64 / 1048576.0,
            row.upload_ms,
            row.ready,
            row.after_last_byte,
            row.worst,
            row.sharp,
            ratio,
            if ratio <= 0.2 { "met" } else { "missed" },
            row.ready / row.sharp,
            row.buffered,
            row.buffered / row.sharp,
        ));
    }
    let mut ratios: Vec<f64> = rows
        .iter()
        .map(|row| row.after_last_byte / row.sharp)
        .collect();
    let worst = ratios.iter().copied().fold(0.0, f64::max);
    out.push_str(&format!(
        "\nMedian ratio {:.3}, worst {:.3} ({} of {} files within 0.2).\n",
        median(&mut ratios),
        worst,
        rows.iter()
            .filter(|row| row.after_last_byte / row.sharp <= 0.2)
            .count(),
        rows.len()
    ));
    out
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[middle - 1] + values[middle]) / 2.0
    } else {
        values[middle]
    }
}

fn extension(path: &Path) -> &str {
    path.extension().and_then(|e| e.to_str()).unwrap_or("")
}

/// Re-runs this benchmark under `taskset` so the service and the sharp child share one core.
fn pin_to_one_core() {
    if std::env::var_os(PINNED_ENV).is_some() {
        return;
    }
    let cpu = std::env::var("THUMBNAIL_BENCH_CPU").unwrap_or_else(|_| "1".into());
    let exe = std::env::current_exe().expect("current exe");
    match Command::new("taskset")
        .args(["-c", &cpu])
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(PINNED_ENV, &cpu)
        .status()
    {
        Ok(status) => std::process::exit(status.code().unwrap_or(1)),
        Err(error) => eprintln!("taskset unavailable ({error}); running unpinned"),
    }
}
