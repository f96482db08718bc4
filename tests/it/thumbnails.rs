//! Thumbnails: sizes and EXIF orientation, no metadata, transparency, colour models, broken
//! images, the pixel limit, and the pool's workers, queue, memory budget and time limit; then
//! hostile JPEGs against the real service on Redis and S3 (Garage): a file of many scans, a
//! decode past its deadline, a full pool, a decode larger than the memory budget, and SIGTERM
//! while a decode runs.
//!
//! The images come from `scripts/make-test-images.py fixtures tests/data/images`; the hostile
//! JPEGs are written by `many_scan_jpeg`.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use svc_messaging::{
    budget::MemoryBudget,
    config::ThumbnailSettings,
    files::policy::FileKind,
    thumbnails::{
        ImageFeed, QUEUE_PER_WORKER, STEP_BYTES, Thumbnail, ThumbnailError, ThumbnailPool,
        Thumbnailer,
    },
};

const MAX_PIXELS: u64 = 40_000_000;
const MIB: u64 = 1 << 20;

fn image(name: &str) -> Vec<u8> {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests/data/images", name]
        .iter()
        .collect();
    std::fs::read(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

fn thumbnailer() -> Thumbnailer {
    Thumbnailer::new(&ThumbnailSettings::default(), MAX_PIXELS)
}

fn make(kind: FileKind, name: &str) -> Thumbnail {
    thumbnailer()
        .make(kind, &image(name))
        .unwrap_or_else(|error| panic!("{name}: {error}"))
        .unwrap_or_else(|| panic!("{name}: no thumbnail"))
}

/// Decoded thumbnail pixels: (width, height, channels, pixels); JPEGs come back as RGB.
fn pixels(thumbnail: &Thumbnail) -> (usize, usize, usize, Vec<u8>) {
    match thumbnail.content_type {
        "image/jpeg" => {
            let mut decoder = mozjpeg::Decompress::new_mem(&thumbnail.bytes)
                .unwrap()
                .rgb()
                .unwrap();
            let (width, height) = (decoder.width(), decoder.height());
            let pixels: Vec<u8> = decoder.read_scanlines().unwrap();
            decoder.finish().unwrap();
            (width, height, 3, pixels)
        }
        "image/png" => {
            let mut decoder = png::Decoder::new(std::io::Cursor::new(&thumbnail.bytes[..]));
            decoder.set_transformations(png::Transformations::EXPAND);
            let mut reader = decoder.read_info().unwrap();
            let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
            let frame = reader.next_frame(&mut pixels).unwrap();
            assert_eq!(frame.bit_depth, png::BitDepth::Eight);
            let channels = frame.color_type.samples();
            pixels.truncate(frame.buffer_size());
            (
                frame.width as usize,
                frame.height as usize,
                channels,
                pixels,
            )
        }
        other => panic!("unexpected content type {other}"),
    }
}

/// Mean of each channel over the whole thumbnail.
fn mean_colour(thumbnail: &Thumbnail) -> Vec<f64> {
    let (_, _, channels, pixels) = pixels(thumbnail);
    let count = (pixels.len() / channels) as f64;
    (0..channels)
        .map(|channel| {
            pixels
                .iter()
                .skip(channel)
                .step_by(channels)
                .map(|&value| f64::from(value))
                .sum::<f64>()
                / count
        })
        .collect()
}

fn assert_colour(name: &str, thumbnail: &Thumbnail, expected: &[f64], tolerance: f64) {
    let mean = mean_colour(thumbnail);
    for (channel, (got, want)) in mean.iter().zip(expected).enumerate() {
        assert!(
            (got - want).abs() <= tolerance,
            "{name}: channel {channel} is {got:.1}, expected {want} +/- {tolerance} (mean {mean:?})"
        );
    }
}

#[test]
fn every_exif_orientation_is_turned_upright() {
    for orientation in 1..=8 {
        let name = format!("orientation-{orientation}.jpg");
        let thumbnail = make(FileKind::Jpeg, &name);
        // Stored 240x400 for 5-8, but displayed 400x240 in every file.
        assert_eq!(
            (thumbnail.source_width, thumbnail.source_height),
            (400, 240),
            "{name}"
        );
        assert_eq!((thumbnail.width, thumbnail.height), (320, 192), "{name}");
        assert_eq!(thumbnail.content_type, "image/jpeg");
        let (width, _, _, pixels) = pixels(&thumbnail);
        let at = |x: usize, y: usize| {
            let start = (y * width + x) * 3;
            [pixels[start], pixels[start + 1], pixels[start + 2]]
        };
        let near = |got: [u8; 3], want: [u8; 3]| {
            got.iter()
                .zip(want)
                .all(|(&g, w)| (i16::from(g) - i16::from(w)).abs() < 40)
        };
        // Red top-left, green top-right, blue bottom-left, white bottom-right.
        assert!(near(at(80, 48), [255, 0, 0]), "{name}: {:?}", at(80, 48));
        assert!(near(at(240, 48), [0, 255, 0]), "{name}: {:?}", at(240, 48));
        assert!(near(at(80, 144), [0, 0, 255]), "{name}: {:?}", at(80, 144));
        assert!(
            near(at(240, 144), [255, 255, 255]),
            "{name}: {:?}",
            at(240, 144)
        );
    }
}

#[test]
fn plans_report_displayed_sizes_before_decoding() {
    let plan = thumbnailer()
        .plan(FileKind::Jpeg, &image("orientation-6.jpg"))
        .unwrap()
        .unwrap();
    assert_eq!(plan.source_size(), (400, 240));
    assert_eq!(plan.thumbnail_size(), (320, 192));
    assert!(plan.orientation().swaps_axes());
}

#[test]
fn small_images_are_never_enlarged() {
    let thumbnail = make(FileKind::Gif, "animated.gif");
    assert_eq!((thumbnail.width, thumbnail.height), (300, 200));
    assert_eq!(
        (thumbnail.source_width, thumbnail.source_height),
        (300, 200)
    );
}

/// The JPEG's segments before its first scan: every marker must be one the image needs.
fn jpeg_markers(bytes: &[u8]) -> Vec<u8> {
    let mut markers = Vec::new();
    let mut position = 2;
    while position + 4 <= bytes.len() {
        assert_eq!(bytes[position], 0xFF, "segment at {position}");
        let marker = bytes[position + 1];
        markers.push(marker);
        if marker == 0xDA {
            break;
        }
        let length = usize::from(u16::from_be_bytes([
            bytes[position + 2],
            bytes[position + 3],
        ]));
        position += 2 + length;
    }
    markers
}

#[test]
fn jpeg_thumbnails_carry_no_metadata() {
    let source = image("exif-gps.jpg");
    assert!(jpeg_markers(&source).contains(&0xE1), "the source has EXIF");
    let thumbnail = make(FileKind::Jpeg, "exif-gps.jpg");
    assert_eq!(thumbnail.content_type, "image/jpeg");
    assert_eq!((thumbnail.width, thumbnail.height), (320, 240));
    for marker in jpeg_markers(&thumbnail.bytes) {
        // JFIF (APP0), quantisation and Huffman tables, frame and scan headers only.
        assert!(
            matches!(marker, 0xE0 | 0xDB | 0xC4 | 0xC0 | 0xDA),
            "unexpected marker FF{marker:02X}"
        );
    }
    for needle in [&b"Exif"[..], b"TestCam", b"GPS"] {
        assert!(!contains(&thumbnail.bytes, needle));
    }
}

fn png_chunks(bytes: &[u8]) -> Vec<String> {
    let mut chunks = Vec::new();
    let mut position = 8;
    while position + 8 <= bytes.len() {
        let length = u32::from_be_bytes(bytes[position..position + 4].try_into().unwrap()) as usize;
        chunks.push(String::from_utf8_lossy(&bytes[position + 4..position + 8]).into_owned());
        position += 12 + length;
    }
    chunks
}

#[test]
fn png_thumbnails_carry_no_metadata() {
    let source = png_chunks(&image("metadata.png"));
    for chunk in ["tEXt", "iTXt", "eXIf"] {
        assert!(source.iter().any(|c| c == chunk), "the source has {chunk}");
    }
    let thumbnail = make(FileKind::Png, "metadata.png");
    assert_eq!(thumbnail.content_type, "image/png");
    let chunks = png_chunks(&thumbnail.bytes);
    assert!(
        chunks
            .iter()
            .all(|chunk| matches!(chunk.as_str(), "IHDR" | "IDAT" | "IEND")),
        "{chunks:?}"
    );
    assert!(!contains(&thumbnail.bytes, b"secret"));
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

#[test]
fn real_transparency_gives_png_and_opaque_alpha_gives_jpeg() {
    for (kind, name, content_type) in [
        (FileKind::Png, "rgba-disc.png", "image/png"),
        (FileKind::Png, "palette-trns.png", "image/png"),
        (FileKind::Png, "rgba16-half.png", "image/png"),
        (FileKind::Webp, "alpha.webp", "image/png"),
        (FileKind::Png, "rgba-opaque.png", "image/jpeg"),
        (FileKind::Png, "gray-alpha-opaque.png", "image/jpeg"),
        (FileKind::Webp, "lossy.webp", "image/jpeg"),
        (FileKind::Gif, "animated.gif", "image/jpeg"),
    ] {
        let thumbnail = make(kind, name);
        assert_eq!(thumbnail.content_type, content_type, "{name}");
    }
}

#[test]
fn transparent_edges_keep_their_colour() {
    // A red disc on transparent black: resized edge pixels must stay red (alpha premultiplied),
    // not turn dark.
    for (kind, name) in [
        (FileKind::Png, "rgba-disc.png"),
        (FileKind::Webp, "alpha.webp"),
    ] {
        let thumbnail = make(kind, name);
        let (width, height, channels, pixels) = pixels(&thumbnail);
        assert_eq!((width, height, channels), (320, 240, 4), "{name}");
        let mut partial = 0;
        for pixel in pixels.chunks_exact(4) {
            if pixel[3] > 16 {
                assert!(
                    pixel[0] > 230 && pixel[1] < 25 && pixel[2] < 25,
                    "{name}: fringe pixel {pixel:?}"
                );
                partial += usize::from(pixel[3] < 255);
            }
        }
        assert!(partial > 0, "{name}: the edge is antialiased");
        assert_eq!(pixels[3], 0, "{name}: the corner stays transparent");
    }
    let half = make(FileKind::Png, "rgba16-half.png");
    assert_colour("rgba16-half.png", &half, &[0.0, 255.0, 0.0, 128.0], 1.5);
}

#[test]
fn colour_models_decode_to_the_right_colours() {
    let cases: &[(FileKind, &str, &[f64], f64)] = &[
        (FileKind::Jpeg, "gray.jpg", &[90.0, 90.0, 90.0], 3.0),
        (FileKind::Jpeg, "cmyk.jpg", &[200.0, 60.0, 40.0], 8.0),
        (FileKind::Png, "gray.png", &[90.0, 90.0, 90.0], 3.0),
        (FileKind::Png, "gray16.png", &[116.7, 116.7, 116.7], 3.0),
        (FileKind::Png, "rgb16.png", &[204.0, 63.7, 25.5], 6.0),
        (FileKind::Png, "palette.png", &[30.0, 144.0, 255.0], 6.0),
        (FileKind::Png, "rgba-opaque.png", &[20.0, 120.0, 200.0], 6.0),
        (FileKind::Webp, "lossy.webp", &[40.0, 160.0, 90.0], 8.0),
        (FileKind::Gif, "animated.gif", &[250.0, 200.0, 0.0], 8.0),
        (FileKind::Webp, "animated.webp", &[250.0, 200.0, 0.0], 8.0),
    ];
    for &(kind, name, expected, tolerance) in cases {
        let thumbnail = make(kind, name);
        assert_colour(name, &thumbnail, expected, tolerance);
    }
}

#[test]
fn ycck_jpegs_decode_to_the_right_colours() {
    // Ink amounts of RGB (200, 60, 40): written as Adobe YCCK, which libjpeg turns into CMYK.
    let ink = [55u8, 195, 215, 0].repeat(64 * 48);
    let mut bytes = Vec::new();
    jpeg_encoder::Encoder::new(&mut bytes, 95)
        .encode(&ink, 64, 48, jpeg_encoder::ColorType::CmykAsYcck)
        .unwrap();
    let thumbnail = thumbnailer().make(FileKind::Jpeg, &bytes).unwrap().unwrap();
    assert_colour("ycck", &thumbnail, &[200.0, 60.0, 40.0], 8.0);
}

#[test]
fn broken_bodies_behind_good_headers_are_undecodable() {
    for (kind, name) in [
        (FileKind::Jpeg, "truncated.jpg"),
        (FileKind::Png, "corrupt.png"),
    ] {
        let bytes = image(name);
        let thumbnailer = thumbnailer();
        // The header alone is fine...
        assert!(thumbnailer.plan(kind, &bytes).unwrap().is_some(), "{name}");
        // ...the body is not.
        match thumbnailer.make(kind, &bytes) {
            Err(ThumbnailError::Undecodable(_)) => {}
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn huge_images_are_refused_from_the_header() {
    // The file is a bare 50 000 x 50 000 header: decoding would fail differently.
    match thumbnailer().plan(FileKind::Png, &image("huge-header.png")) {
        Err(ThumbnailError::TooLarge {
            width: 50_000,
            height: 50_000,
            max_pixels: MAX_PIXELS,
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn heif_gets_no_thumbnail() {
    let mut heic = vec![0, 0, 0, 24];
    heic.extend_from_slice(b"ftypheic\0\0\0\0mif1heic");
    for kind in [FileKind::Heic, FileKind::Heif] {
        assert!(thumbnailer().make(kind, &heic).unwrap().is_none());
    }
}

/// A flat-coloured RGB PNG of `size` x `size`: tiny to store, a real decode to make.
fn large_png(size: u32) -> Bytes {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, size, size);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header().unwrap();
    let row: Vec<u8> = (0..size).flat_map(|x| [(x % 251) as u8, 90, 200]).collect();
    let pixels = row.repeat(size as usize);
    writer.write_image_data(&pixels).unwrap();
    writer.finish().unwrap();
    Bytes::from(bytes)
}

/// A PNG that compresses poorly (about 3 bytes a pixel): many steps' worth of image data.
fn noisy_png(size: u32) -> Bytes {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, size, size);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_compression(png::Compression::Fast);
    let mut writer = encoder.write_header().unwrap();
    let mut state = 0x2545_F491_u32;
    let pixels: Vec<u8> = (0..size * size * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect();
    writer.write_image_data(&pixels).unwrap();
    writer.finish().unwrap();
    Bytes::from(bytes)
}

/// `workers` decoding for at most `timeout`, images waiting for a worker as long as it takes.
fn settings(workers: usize, timeout: Duration) -> ThumbnailSettings {
    ThumbnailSettings {
        workers,
        timeout,
        queue_timeout: Duration::from_secs(600),
        ..ThumbnailSettings::default()
    }
}

/// The most decodes and reserved bytes the pool ever held at once, polled until `stop`.
fn watch(pool: Arc<ThumbnailPool>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(usize, u64)> {
    tokio::spawn(async move {
        let (mut decoding, mut reserved) = (0, 0);
        while !stop.load(Ordering::Relaxed) {
            decoding = pool.decoding().max(decoding);
            reserved = pool.reserved_bytes().max(reserved);
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        (decoding, reserved)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_decodes_wait_for_the_memory_budget() {
    let bytes = large_png(1500);
    let peak = thumbnailer()
        .plan(FileKind::Png, &bytes)
        .unwrap()
        .unwrap()
        .peak_bytes();
    // Room for two decodes at once; eight workers, so memory is what limits them.
    let total = peak * 5 / 2;
    let budget = MemoryBudget::new(total, Duration::from_secs(60));
    let pool = Arc::new(ThumbnailPool::new(
        &settings(8, Duration::from_secs(60)),
        MAX_PIXELS,
        budget.clone(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch(pool.clone(), stop.clone());
    let jobs: Vec<_> = (0..8)
        .map(|_| {
            let (pool, bytes) = (pool.clone(), bytes.clone());
            tokio::spawn(async move { pool.make(FileKind::Png, bytes).await })
        })
        .collect();
    for job in jobs {
        let thumbnail = job.await.unwrap().unwrap().unwrap();
        assert_eq!((thumbnail.width, thumbnail.height), (320, 320));
    }
    stop.store(true, Ordering::Relaxed);
    let (decoding, reserved) = watcher.await.unwrap();
    // Never more than two at once (usually exactly two): the other six waited their turn.
    assert!((1..=2).contains(&decoding), "{decoding} decodes at once");
    assert!(
        reserved >= peak && reserved <= 2 * peak && reserved <= total,
        "{reserved}"
    );
    assert_eq!(pool.decoding(), 0);
    assert_eq!(budget.available_bytes(), total.next_multiple_of(1024));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decodes_that_cannot_get_memory_in_time_are_busy() {
    let bytes = large_png(1500);
    let peak = thumbnailer()
        .plan(FileKind::Png, &bytes)
        .unwrap()
        .unwrap()
        .peak_bytes();
    let total = peak * 5 / 2;
    let budget = MemoryBudget::new(total, Duration::from_millis(1));
    let pool = Arc::new(ThumbnailPool::new(
        &settings(8, Duration::from_secs(60)),
        MAX_PIXELS,
        budget.clone(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch(pool.clone(), stop.clone());
    let jobs: Vec<_> = (0..8)
        .map(|_| {
            let (pool, bytes) = (pool.clone(), bytes.clone());
            tokio::spawn(async move { pool.make(FileKind::Png, bytes).await })
        })
        .collect();
    let (mut made, mut busy) = (0, 0);
    for job in jobs {
        match job.await.unwrap() {
            Ok(Some(_)) => made += 1,
            Err(ThumbnailError::Busy) => busy += 1,
            other => panic!("{other:?}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (decoding, reserved) = watcher.await.unwrap();
    assert!(made >= 2 && busy >= 1, "made {made}, busy {busy}");
    assert!(
        decoding <= 2 && reserved <= total,
        "{decoding} decodes, {reserved} bytes"
    );
    assert_eq!(budget.available_bytes(), total.next_multiple_of(1024));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_new_images() {
    let bytes = large_png(1200);
    let budget = MemoryBudget::new(1 << 30, Duration::from_secs(60));
    let pool = Arc::new(ThumbnailPool::new(
        &settings(1, Duration::from_secs(60)),
        MAX_PIXELS,
        budget,
    ));
    let submitted = 2 * (1 + QUEUE_PER_WORKER);
    let results =
        futures::future::join_all((0..submitted).map(|_| pool.make(FileKind::Png, bytes.clone())))
            .await;
    let busy = results
        .iter()
        .filter(|result| matches!(result, Err(ThumbnailError::WorkersBusy)))
        .count();
    let made = results
        .iter()
        .filter(|result| matches!(result, Ok(Some(_))))
        .count();
    assert_eq!(made, 1 + QUEUE_PER_WORKER, "one running, the queue waiting");
    assert_eq!(busy, submitted - made);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_decodes_time_out_and_release_their_memory() {
    let bytes = large_png(2500);
    let budget = MemoryBudget::new(1 << 30, Duration::from_secs(60));
    let total = budget.available_bytes();
    let pool = ThumbnailPool::new(
        &settings(1, Duration::from_millis(2)),
        MAX_PIXELS,
        budget.clone(),
    );
    match pool.make(FileKind::Png, bytes).await {
        Err(ThumbnailError::TimedOut) => {}
        other => panic!("{other:?}"),
    }
    // The decode stops at its next row and only then gives its memory back.
    for _ in 0..500 {
        if budget.available_bytes() == total {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the timed-out decode kept its memory");
}

#[tokio::test]
async fn the_pool_reports_undecodable_images() {
    let pool = ThumbnailPool::new(
        &ThumbnailSettings::default(),
        MAX_PIXELS,
        MemoryBudget::new(1 << 28, Duration::from_secs(5)),
    );
    let truncated = Bytes::from(image("truncated.jpg"));
    assert!(matches!(
        pool.make(FileKind::Jpeg, truncated).await,
        Err(ThumbnailError::Undecodable(_))
    ));
    let made = pool
        .make(FileKind::Jpeg, Bytes::from(image("exif-gps.jpg")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((made.width, made.height), (320, 240));
}

// ---------------------------------------------------------------------------------------------
// Decoding while the bytes arrive (`ThumbnailPool::feed`).

/// A progressive photo-like JPEG (the stream decodes every scan; the buffered decode leaves
/// the unused ones out at 1/8: both must give the same thumbnail).
fn progressive_jpeg(width: u16, height: u16) -> Vec<u8> {
    let mut pixels = Vec::with_capacity(usize::from(width) * usize::from(height) * 3);
    for y in 0..u32::from(height) {
        for x in 0..u32::from(width) {
            let detail = ((x * 7 + y * 13) % 23) as u8;
            pixels.extend_from_slice(&[
                (x / 11) as u8 ^ detail,
                (y / 7) as u8,
                ((x + y) / 13) as u8,
            ]);
        }
    }
    let mut bytes = Vec::new();
    let mut encoder = jpeg_encoder::Encoder::new(&mut bytes, 90);
    encoder.set_progressive(true);
    encoder
        .encode(&pixels, width, height, jpeg_encoder::ColorType::Rgb)
        .unwrap();
    bytes
}

/// Feeds `body` to a new feed in `chunk`-byte chunks, as an upload does, and finishes it.
async fn feed_in_chunks(
    pool: &Arc<ThumbnailPool>,
    kind: FileKind,
    body: &[u8],
    chunk: usize,
) -> Result<Option<Thumbnail>, ThumbnailError> {
    let mut feed = pool.feed(kind);
    let mut received = Vec::new();
    for piece in body.chunks(chunk) {
        received.extend_from_slice(piece);
        feed.push(&Bytes::copy_from_slice(piece), &received).await;
    }
    feed.finish(Bytes::from(received)).await
}

fn streaming_pool(budget: u64) -> (Arc<ThumbnailPool>, Arc<MemoryBudget>) {
    let budget = MemoryBudget::new(budget, Duration::from_secs(5));
    let pool = ThumbnailPool::new(&ThumbnailSettings::default(), MAX_PIXELS, budget.clone());
    (Arc::new(pool), budget)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_decoded_while_they_arrive_give_the_buffered_thumbnail() {
    let (pool, budget) = streaming_pool(1 << 28);
    let mut images: Vec<(FileKind, String, Vec<u8>)> = [
        (FileKind::Jpeg, "orientation-6.jpg"),
        (FileKind::Jpeg, "exif-gps.jpg"),
        (FileKind::Jpeg, "cmyk.jpg"),
        (FileKind::Jpeg, "gray.jpg"),
        (FileKind::Png, "palette-trns.png"),
        (FileKind::Png, "rgb16.png"),
        (FileKind::Png, "rgba-disc.png"),
        (FileKind::Png, "gray.png"),
        (FileKind::Png, "metadata.png"),
    ]
    .into_iter()
    .map(|(kind, name)| (kind, name.to_owned(), image(name)))
    .collect();
    images.push((
        FileKind::Jpeg,
        "progressive".into(),
        progressive_jpeg(1600, 1200),
    ));
    // Decoded at 1/8: its unused scans are dropped as they stream by.
    images.push((
        FileKind::Jpeg,
        "progressive at 1/8".into(),
        progressive_jpeg(2800, 2100),
    ));
    images.push((FileKind::Png, "large".into(), large_png(1500).to_vec()));
    images.push((FileKind::Png, "noisy".into(), noisy_png(600).to_vec()));
    for (kind, name, body) in &images {
        let buffered = thumbnailer().make(*kind, body).unwrap().unwrap();
        for chunk in [61, 4096, 65536] {
            let before = pool.streamed_bytes();
            let streamed = feed_in_chunks(&pool, *kind, body, chunk)
                .await
                .unwrap_or_else(|error| panic!("{name} in {chunk}-byte chunks: {error}"))
                .unwrap();
            assert!(
                streamed.bytes == buffered.bytes,
                "{name} in {chunk}-byte chunks: another thumbnail"
            );
            assert_eq!(
                (streamed.source_width, streamed.source_height),
                (buffered.source_width, buffered.source_height)
            );
            assert_eq!(
                pool.streamed_bytes() - before,
                body.len() as u64,
                "{name} in {chunk}-byte chunks was decoded while it arrived"
            );
        }
    }
    assert_eq!(
        pool.stream_fallbacks(),
        0,
        "every image streamed to its end"
    );
    assert_eq!(pool.streaming(), 0);
    assert_eq!(pool.reserved_bytes(), 0);
    assert!(budget.is_idle());
}

#[test]
fn images_decoded_byte_by_byte_give_the_whole_file_thumbnail() {
    let thumbnailer = thumbnailer();
    for (kind, name) in [
        (FileKind::Jpeg, "orientation-6.jpg"),
        (FileKind::Jpeg, "cmyk.jpg"),
        (FileKind::Jpeg, "gray.jpg"),
        (FileKind::Png, "palette-trns.png"),
        (FileKind::Png, "rgb16.png"),
        (FileKind::Png, "rgba-disc.png"),
    ] {
        let body = image(name);
        let whole = thumbnailer.make(kind, &body).unwrap().unwrap();
        for piece in [1, 13] {
            let streamed = thumbnailer
                .make_in_pieces(kind, &body, piece)
                .unwrap_or_else(|error| panic!("{name} in {piece}-byte pieces: {error}"))
                .unwrap();
            assert!(
                streamed.bytes == whole.bytes,
                "{name} in {piece}-byte pieces"
            );
        }
    }
    let progressive = progressive_jpeg(2800, 2100);
    let whole = thumbnailer
        .make(FileKind::Jpeg, &progressive)
        .unwrap()
        .unwrap();
    let streamed = thumbnailer
        .make_in_pieces(FileKind::Jpeg, &progressive, 7)
        .unwrap()
        .unwrap();
    assert!(
        streamed.bytes == whole.bytes,
        "progressive at 1/8 in 7-byte pieces"
    );
    // Bytes after the end (a motion photo's video after a JPEG's end marker) are not kept:
    // more than the decoder may hold unconsumed, and still the thumbnail streams.
    let mut motion_photo = image("orientation-6.jpg");
    let whole = thumbnailer
        .make(FileKind::Jpeg, &motion_photo)
        .unwrap()
        .unwrap();
    motion_photo.extend(std::iter::repeat_n(0x5A, 3 << 20));
    let streamed = thumbnailer
        .make_in_pieces(FileKind::Jpeg, &motion_photo, 64 * 1024)
        .unwrap()
        .unwrap();
    assert!(
        streamed.bytes == whole.bytes,
        "a JPEG with 3 MiB after its end"
    );
    for (kind, name) in [
        (FileKind::Jpeg, "truncated.jpg"),
        (FileKind::Png, "corrupt.png"),
    ] {
        assert!(matches!(
            thumbnailer.make_in_pieces(kind, &image(name), 5),
            Err(ThumbnailError::Undecodable(_))
        ));
    }
}

/// Polls `condition` every millisecond for at most five seconds.
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(started.elapsed() < Duration::from_secs(5), "never: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_decoder_has_consumed_the_head_before_the_last_chunk_arrives() {
    let (pool, budget) = streaming_pool(1 << 28);
    for (kind, body) in [
        (FileKind::Jpeg, progressive_jpeg(1600, 1200)),
        (FileKind::Jpeg, progressive_jpeg(2800, 2100)),
        (FileKind::Jpeg, image("exif-gps.jpg")),
        (FileKind::Png, noisy_png(600).to_vec()),
    ] {
        let (head, last) = body.split_at(body.len() - 1000);
        let base = pool.streamed_bytes();
        let mut feed = pool.feed(kind);
        let mut received = Vec::new();
        for piece in head.chunks(8192) {
            received.extend_from_slice(piece);
            feed.push(&Bytes::copy_from_slice(piece), &received).await;
        }
        // Every byte but the last thousand (and those short of a step) is decoded before they
        // are sent.
        until("the head is decoded", || {
            pool.streamed_bytes() - base + STEP_BYTES as u64 > head.len() as u64
        })
        .await;
        assert_eq!(pool.streaming(), 1, "one decoder follows the upload");
        assert!(pool.reserved_bytes() > 0, "its memory is reserved");
        received.extend_from_slice(last);
        feed.push(&Bytes::copy_from_slice(last), &received).await;
        let thumbnail = feed.finish(Bytes::from(received)).await.unwrap().unwrap();
        assert_eq!(
            thumbnail.bytes,
            thumbnailer().make(kind, &body).unwrap().unwrap().bytes
        );
        assert_eq!(pool.streamed_bytes() - base, body.len() as u64);
        assert_eq!(pool.streaming(), 0);
        assert!(budget.is_idle());
    }
    assert_eq!(pool.stream_fallbacks(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_feed_stops_its_decoder_and_frees_its_memory() {
    let (pool, budget) = streaming_pool(1 << 28);
    let body = noisy_png(600);
    let half = &body[..body.len() / 2];
    let mut feed = pool.feed(FileKind::Png);
    let mut received = Vec::new();
    for piece in half.chunks(8192) {
        received.extend_from_slice(piece);
        feed.push(&Bytes::copy_from_slice(piece), &received).await;
    }
    until("the half is decoded", || {
        pool.streamed_bytes() + STEP_BYTES as u64 > half.len() as u64
    })
    .await;
    assert_eq!(pool.streaming(), 1);
    assert!(!budget.is_idle());
    // The upload failed, was cancelled or went idle: its body and feed are dropped.
    drop(feed);
    until("the decoder is gone", || pool.streaming() == 0).await;
    assert_eq!(pool.reserved_bytes(), 0);
    assert!(budget.is_idle());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_holds_no_worker_while_its_decoder_waits() {
    // One worker, waited for at most 200 ms: a decoder that kept it (or a thread) while its
    // upload stalls would make the next image WORKERS_BUSY.
    let settings = ThumbnailSettings {
        workers: 1,
        queue_timeout: Duration::from_millis(200),
        stream_idle_timeout: Duration::from_secs(60),
        ..ThumbnailSettings::default()
    };
    let budget = MemoryBudget::new(1 << 28, Duration::from_secs(5));
    let pool = Arc::new(ThumbnailPool::new(&settings, MAX_PIXELS, budget.clone()));
    let stalled_body = large_png(1500);
    let half = &stalled_body[..stalled_body.len() / 2];
    let mut stalled = pool.feed(FileKind::Png);
    stalled.push(&Bytes::copy_from_slice(half), half).await;
    until("the stalled upload's half is decoded", || {
        pool.streamed_bytes() == half.len() as u64
    })
    .await;
    assert_eq!(pool.decoding(), 0, "no decode runs while the upload stalls");
    for (kind, name) in [
        (FileKind::Jpeg, "exif-gps.jpg"),
        (FileKind::Png, "rgb16.png"),
    ] {
        let body = image(name);
        let streamed = feed_in_chunks(&pool, kind, &body, 4096)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            streamed.bytes,
            thumbnailer().make(kind, &body).unwrap().unwrap().bytes
        );
        let whole = pool.make(kind, Bytes::from(body)).await.unwrap().unwrap();
        assert_eq!(whole.bytes, streamed.bytes, "{name}");
    }
    assert_eq!(pool.streaming(), 1, "the stalled decoder is still there");
    drop(stalled);
    until("the stalled decoder is gone", || pool.streaming() == 0).await;
    assert!(budget.is_idle());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_images_fed_while_arriving_get_the_buffered_verdict() {
    let (pool, budget) = streaming_pool(1 << 28);
    // A JPEG cut inside its scans, a PNG whose image data is damaged, both long enough to be
    // stepped before their end.
    let mut truncated = progressive_jpeg(1600, 1200);
    truncated.truncate(truncated.len() * 2 / 3);
    let mut corrupt = noisy_png(600).to_vec();
    let middle = corrupt.len() / 2;
    corrupt[middle..middle + 64].fill(0xA5);
    for (kind, name, body) in [
        (FileKind::Jpeg, "truncated.jpg", image("truncated.jpg")),
        (FileKind::Png, "corrupt.png", image("corrupt.png")),
        (FileKind::Jpeg, "a long truncated JPEG", truncated),
        (FileKind::Png, "a long corrupt PNG", corrupt),
    ] {
        let whole = thumbnailer()
            .make(kind, &body)
            .expect_err("the whole file does not decode");
        assert!(matches!(whole, ThumbnailError::Undecodable(_)), "{name}");
        let (steps, fallbacks) = (pool.stream_steps(), pool.stream_fallbacks());
        let streamed = feed_in_chunks(&pool, kind, &body, 997).await;
        assert_eq!(streamed.map(|made| made.is_some()), Err(whole), "{name}");
        assert!(
            pool.stream_steps() > steps,
            "{name} was decoded while it arrived"
        );
        assert_eq!(pool.stream_fallbacks(), fallbacks + 1, "{name}");
    }
    // A file of too many scans is refused as before, whether it streamed or not.
    let many = many_scan_jpeg(64, 48, 5, 2, 300);
    let settings = ThumbnailSettings {
        max_jpeg_scans: 100,
        ..ThumbnailSettings::default()
    };
    let pool = Arc::new(ThumbnailPool::new(&settings, MAX_PIXELS, budget.clone()));
    assert!(matches!(
        feed_in_chunks(&pool, FileKind::Jpeg, &many, 997).await,
        Err(ThumbnailError::TooManyScans { max_scans: 100 })
    ));
    assert_eq!(pool.streaming(), 0);
    assert!(budget.is_idle());
}

/// A progressive JPEG with a DHT segment of about `segment` bytes after each scan, which defines
/// one table over and over as it stands (the same image): libjpeg reads such a segment whole,
/// from its start again at every step that ends inside it.
fn jpeg_with_long_tables(body: &[u8], segment: usize) -> Vec<u8> {
    // The latest definition of the file's first table (class and id, 16 counts, the values).
    let mut table: Option<Vec<u8>> = None;
    let mut out = body[..2].to_vec();
    let mut position = 2;
    while position + 2 <= body.len() {
        assert_eq!(body[position], 0xFF);
        let marker = body[position + 1];
        if marker == 0xD9 {
            out.extend_from_slice(&body[position..position + 2]);
            break;
        }
        let length = usize::from(u16::from_be_bytes([body[position + 2], body[position + 3]]));
        let mut end = position + 2 + length;
        if marker == 0xC4 {
            let mut at = position + 4;
            while at < end {
                let counts: usize = body[at + 1..at + 17].iter().map(|&n| usize::from(n)).sum();
                let definition = &body[at..at + 17 + counts];
                if table.as_ref().is_none_or(|table| table[0] == definition[0]) {
                    table = Some(definition.to_vec());
                }
                at += 17 + counts;
            }
        }
        if marker == 0xDA {
            // The scan's entropy-coded data runs to the next marker.
            while body[end] != 0xFF || matches!(body[end + 1], 0x00 | 0xD0..=0xD7) {
                end += 1;
            }
        }
        out.extend_from_slice(&body[position..end]);
        if marker == 0xDA {
            let table = table.as_ref().expect("a table before the first scan");
            let copies = (segment - 4) / table.len();
            out.extend_from_slice(&[0xFF, 0xC4]);
            out.extend_from_slice(&((2 + copies * table.len()) as u16).to_be_bytes());
            for _ in 0..copies {
                out.extend_from_slice(table);
            }
        }
        position = end;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_decode_works_in_proportion_to_the_bytes_received_whatever_the_chunks() {
    let (pool, budget) = streaming_pool(1 << 28);
    for (name, body) in [
        // At 1/4: libjpeg sees every byte; at 1/8 through the scan filter.
        (
            "1600 x 1200",
            jpeg_with_long_tables(&progressive_jpeg(1600, 1200), 60_000),
        ),
        (
            "2800 x 2100",
            jpeg_with_long_tables(&progressive_jpeg(2800, 2100), 60_000),
        ),
    ] {
        let whole = thumbnailer().make(FileKind::Jpeg, &body).unwrap().unwrap();
        for chunk in [1, 61, 1 << 20] {
            let (handed, steps) = (pool.handed_bytes(), pool.stream_steps());
            let streamed = feed_in_chunks(&pool, FileKind::Jpeg, &body, chunk)
                .await
                .unwrap_or_else(|error| panic!("{name} in {chunk}-byte chunks: {error}"))
                .unwrap();
            assert!(
                streamed.bytes == whole.bytes,
                "{name} in {chunk}-byte chunks"
            );
            let (handed, steps) = (pool.handed_bytes() - handed, pool.stream_steps() - steps);
            // A step per STEP_BYTES received (or run of them), plus the head's and the last.
            assert!(
                steps <= (body.len() / STEP_BYTES) as u64 + 2,
                "{name} in {chunk}-byte chunks: {steps} steps for {} bytes",
                body.len()
            );
            // Each byte handed over once, and again only for what a step left unconsumed: here
            // at most a 60 kB table segment per step of 64 KiB (in general at most 256 KiB, so
            // at most 5 times the bytes received). A step per chunk would hand each table over
            // again for every chunk inside it.
            assert!(
                handed <= 2 * body.len() as u64,
                "{name} in {chunk}-byte chunks: {handed} bytes handed for {}",
                body.len()
            );
        }
    }
    assert_eq!(pool.stream_fallbacks(), 0);
    assert!(budget.is_idle());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_motion_photo_streams_to_its_end_marker_and_not_beyond() {
    let (pool, budget) = streaming_pool(1 << 28);
    // Decoded at 1/8 through the scan filter, which must not count the video's bytes as scans.
    let jpeg = progressive_jpeg(2800, 2100);
    let whole = thumbnailer().make(FileKind::Jpeg, &jpeg).unwrap().unwrap();
    let mut photo = jpeg.clone();
    photo.extend_from_slice(b"\0\0\0\x18ftypmp42");
    for _ in 0..200_000 {
        photo.extend_from_slice(&[0xFF, 0xDA, 0, 8, 1, 1, 0, 1, 0x3F, 0x10, 0x55, 0x55]);
    }
    assert!(photo.len() - jpeg.len() > 4 * STEP_BYTES);
    for chunk in [4096, 65536] {
        let (handed, steps) = (pool.handed_bytes(), pool.stream_steps());
        // Once the JPEG and some of the video arrived, the decode is over: its decoder and
        // memory are gone before the upload ends.
        let mut feed = pool.feed(FileKind::Jpeg);
        let mut received = Vec::new();
        let (image_part, video) = photo.split_at(jpeg.len() + 2 * STEP_BYTES);
        for piece in image_part.chunks(chunk) {
            received.extend_from_slice(piece);
            feed.push(&Bytes::copy_from_slice(piece), &received).await;
        }
        until("the decode ends at the end marker", || {
            pool.streaming() == 0 && pool.reserved_bytes() == 0
        })
        .await;
        for piece in video.chunks(chunk) {
            received.extend_from_slice(piece);
            feed.push(&Bytes::copy_from_slice(piece), &received).await;
        }
        let streamed = feed.finish(Bytes::from(received)).await.unwrap().unwrap();
        assert!(streamed.bytes == whole.bytes, "in {chunk}-byte chunks");
        // The video is stored, not decoded: no step for its bytes, none of them handed to
        // libjpeg (which gets less than the JPEG: its unused scans are left out).
        let (handed, steps) = (pool.handed_bytes() - handed, pool.stream_steps() - steps);
        assert!(
            handed < jpeg.len() as u64,
            "in {chunk}-byte chunks: {handed} bytes handed of a {}-byte JPEG",
            jpeg.len()
        );
        assert!(
            steps <= (jpeg.len() / STEP_BYTES) as u64 + 2,
            "in {chunk}-byte chunks: {steps} steps"
        );
    }
    assert_eq!(
        pool.stream_fallbacks(),
        0,
        "the trailer made no decode fail"
    );
    assert!(budget.is_idle());
}

/// A streamed decode never holds the body twice, so it needs less memory than the buffered
/// one; it must still refuse what the buffered decode refuses (here a small photo behind a long
/// trailer, whose body alone nearly fills the budget), not make a thumbnail of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_decode_gives_the_buffered_verdict_on_memory_too() {
    let mut photo = image("exif-gps.jpg");
    photo.extend(std::iter::repeat_n(0x5A, 24 << 20));
    let (pool, budget) = streaming_pool(24 << 20);
    let buffered = pool.make(FileKind::Jpeg, Bytes::from(photo.clone())).await;
    assert!(
        matches!(buffered, Err(ThumbnailError::TooLargeToDecode { .. })),
        "buffered: {:?}",
        buffered.map(|made| made.map(|thumbnail| thumbnail.bytes.len()))
    );
    let steps = pool.stream_steps();
    let streamed = feed_in_chunks(&pool, FileKind::Jpeg, &photo, 64 * 1024).await;
    assert!(
        pool.stream_steps() > steps,
        "the photo was decoded while it arrived"
    );
    assert!(
        matches!(streamed, Err(ThumbnailError::TooLargeToDecode { .. })),
        "streamed: {:?}",
        streamed.map(|made| made.map(|thumbnail| thumbnail.bytes.len()))
    );
    assert!(budget.is_idle());
}

/// Streamed decodes take their memory without waiting, so together they hold at most half the
/// budget's main pool whatever `thumbnails.max_streaming_bytes` says: with a small budget, a
/// large progressive JPEG is decoded after its last byte (and still made).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_decodes_hold_at_most_half_a_small_budget() {
    let jpeg = progressive_jpeg(2800, 2100);
    let peak = thumbnailer()
        .plan(FileKind::Jpeg, &jpeg)
        .unwrap()
        .unwrap()
        .peak_bytes();
    // Room for the buffered decode, while the streamed one would need over half of it.
    let (pool, budget) = streaming_pool((peak + 6 * MIB) * 8 / 7 + MIB);
    assert!(ThumbnailSettings::default().max_streaming_bytes.as_u64() > budget.main_bytes());
    let steps = pool.stream_steps();
    let made = feed_in_chunks(&pool, FileKind::Jpeg, &jpeg, 64 * 1024)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pool.stream_steps(), steps, "not decoded while it arrived");
    assert!(
        made.bytes
            == thumbnailer()
                .make(FileKind::Jpeg, &jpeg)
                .unwrap()
                .unwrap()
                .bytes
    );
    assert!(budget.is_idle());
}

/// Feeds `bytes` in chunks of 16 KiB after `received`, the body so far.
async fn feed_bytes(feed: &mut ImageFeed, received: &mut Vec<u8>, bytes: &[u8]) {
    for piece in bytes.chunks(16 * 1024) {
        received.extend_from_slice(piece);
        feed.push(&Bytes::copy_from_slice(piece), received).await;
    }
}

/// Feeds the rest of the PNG `body` after `received`, finishes, and checks the thumbnail is
/// the whole file's under `settings`.
async fn finish_as_the_whole_png(
    mut feed: ImageFeed,
    mut received: Vec<u8>,
    body: &[u8],
    settings: &ThumbnailSettings,
) {
    let rest = &body[received.len()..];
    feed_bytes(&mut feed, &mut received, rest).await;
    let thumbnail = feed.finish(Bytes::from(received)).await.unwrap().unwrap();
    let whole = Thumbnailer::new(settings, MAX_PIXELS)
        .make(FileKind::Png, body)
        .unwrap()
        .unwrap();
    assert_eq!(thumbnail.bytes, whole.bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_idle_between_steps_gives_its_decoder_memory_back() {
    let settings = ThumbnailSettings {
        stream_idle_timeout: Duration::from_millis(200),
        ..ThumbnailSettings::default()
    };
    let (pool, budget) = pool(&settings, 1 << 28);
    let body = large_png(1500);
    let mut feed = pool.feed(FileKind::Png);
    let mut received = Vec::new();
    feed_bytes(&mut feed, &mut received, &body[..body.len() / 2]).await;
    assert_eq!(pool.streaming(), 1);
    // Nothing more for longer than the idle timeout: the decoder and its memory go.
    until("the idle decoder is dropped", || pool.streaming() == 0).await;
    assert_eq!(pool.reserved_bytes(), 0);
    assert_eq!(pool.stream_fallbacks(), 1);
    // The rest arrives after all: decoded whole, the same thumbnail.
    finish_as_the_whole_png(feed, received, &body, &settings).await;
    assert!(budget.is_idle());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_decodes_beyond_their_memory_cap_are_decoded_after_the_last_byte() {
    let body = large_png(1500);
    // What one streamed decode of this image reserves.
    let (probe, _) = streaming_pool(1 << 28);
    let mut feed = probe.feed(FileKind::Png);
    feed_bytes(&mut feed, &mut Vec::new(), &body[..body.len() / 2]).await;
    let one = probe.reserved_bytes();
    assert!(one > 0);
    drop(feed);
    // Room for one and a half: the second image is decoded after its last byte.
    for (cap, streaming) in [(one + one / 2, 1), (0, 0)] {
        let settings = ThumbnailSettings {
            max_streaming_bytes: bytesize::ByteSize::b(cap),
            ..ThumbnailSettings::default()
        };
        let (pool, budget) = pool(&settings, 1 << 28);
        let mut feeds = Vec::new();
        for _ in 0..2 {
            let mut feed = pool.feed(FileKind::Png);
            let mut received = Vec::new();
            feed_bytes(&mut feed, &mut received, &body[..body.len() / 2]).await;
            feeds.push((feed, received));
        }
        assert_eq!(pool.streaming(), streaming, "cap {cap}");
        assert!(pool.reserved_bytes() <= cap, "cap {cap}");
        assert_eq!(pool.stream_fallbacks(), 2 - streaming as u64, "cap {cap}");
        for (feed, received) in feeds {
            finish_as_the_whole_png(feed, received, &body, &settings).await;
        }
        assert!(budget.is_idle());
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile JPEGs: decodes that would run for minutes, bounded by the scan limit and the deadline.

/// Writes the entropy-coded data of one scan: bits MSB first, 0xFF stuffed, padded with ones.
#[derive(Default)]
struct Bits {
    bytes: Vec<u8>,
    buffer: u32,
    count: u32,
}

impl Bits {
    fn put(&mut self, value: u32, width: u32) {
        for bit in (0..width).rev() {
            self.buffer = (self.buffer << 1) | ((value >> bit) & 1);
            self.count += 1;
            if self.count == 8 {
                self.push_byte();
            }
        }
    }

    fn push_byte(&mut self) {
        let byte = self.buffer as u8;
        self.bytes.push(byte);
        if byte == 0xFF {
            self.bytes.push(0);
        }
        self.buffer = 0;
        self.count = 0;
    }

    fn finish(mut self) -> Vec<u8> {
        if self.count > 0 {
            let pad = 8 - self.count;
            self.put((1 << pad) - 1, pad);
        }
        self.bytes
    }
}

/// A hand-written progressive 4:2:0 JPEG of a flat gray `width` x `height` image (every
/// coefficient zero), a few bytes per scan whatever the size, with a valid progression:
/// one DC scan per component, then for each of the first `coefficients` AC coefficients of
/// each component a first scan at bit `refinements` and `refinements` refinement scans, all
/// end-of-band runs. Each scan costs libjpeg a pass over all the blocks of its component. The
/// last scan is then repeated `repeats` times: with `refinements == 0` that is the shape of a
/// file of a million scans, which libjpeg accepts without a warning.
fn many_scan_jpeg(
    width: u16,
    height: u16,
    coefficients: u8,
    refinements: u8,
    repeats: usize,
) -> Vec<u8> {
    fn segment(jpeg: &mut Vec<u8>, marker: u8, body: &[u8]) {
        jpeg.extend_from_slice(&[0xFF, marker]);
        jpeg.extend_from_slice(&u16::try_from(body.len() + 2).unwrap().to_be_bytes());
        jpeg.extend_from_slice(body);
    }
    // (id, sampling): Y at 2x2, Cb and Cr at 1x1.
    let components = [(1u8, 2usize), (2, 1), (3, 1)];
    let blocks = |sampling: usize| {
        let side = |pixels: u16| (usize::from(pixels) * sampling).div_ceil(2).div_ceil(8);
        side(width) * side(height)
    };
    // An AC scan: end-of-band runs of at most 32767 blocks (symbol r << 4, then r bits).
    let end_of_bands = |mut left: usize| {
        let mut bits = Bits::default();
        while left > 0 {
            let run = left.min(32_767);
            let r = run.ilog2();
            bits.put(r, 4);
            bits.put((run - (1 << r)) as u32, r);
            left -= run;
        }
        bits.finish()
    };
    let scan = |id: u8, band: (u8, u8), ah_al: u8, data: &[u8]| {
        let mut scan = vec![0xFF, 0xDA, 0, 8, 1, id, 0x00, band.0, band.1, ah_al];
        scan.extend_from_slice(data);
        scan
    };
    let mut jpeg = vec![0xFF, 0xD8];
    let mut quantisation = vec![0u8];
    quantisation.extend_from_slice(&[1; 64]);
    segment(&mut jpeg, 0xDB, &quantisation);
    let mut frame = vec![8];
    frame.extend_from_slice(&height.to_be_bytes());
    frame.extend_from_slice(&width.to_be_bytes());
    frame.push(3);
    for (id, sampling) in components {
        frame.extend_from_slice(&[id, (sampling as u8) * 0x11, 0]);
    }
    segment(&mut jpeg, 0xC2, &frame);
    // DC: one symbol (difference category 0), code "0". AC: the 15 end-of-band run symbols,
    // codes 0000..1110.
    let mut dc_table = vec![0x00, 1];
    dc_table.extend_from_slice(&[0; 15]);
    dc_table.push(0x00);
    segment(&mut jpeg, 0xC4, &dc_table);
    let mut ac_table = vec![0x10, 0, 0, 0, 15];
    ac_table.extend_from_slice(&[0; 12]);
    ac_table.extend((0..15u8).map(|r| r << 4));
    segment(&mut jpeg, 0xC4, &ac_table);
    let mut last = Vec::new();
    for (id, sampling) in components {
        let mut bits = Bits::default();
        for _ in 0..blocks(sampling) {
            bits.put(0, 1);
        }
        last = scan(id, (0, 0), 0x00, &bits.finish());
        jpeg.extend_from_slice(&last);
    }
    for (id, sampling) in components {
        let data = end_of_bands(blocks(sampling));
        for coefficient in 1..=coefficients {
            let band = (coefficient, coefficient);
            last = scan(id, band, refinements, &data);
            jpeg.extend_from_slice(&last);
            for bit in (1..=refinements).rev() {
                last = scan(id, band, (bit << 4) | (bit - 1), &data);
                jpeg.extend_from_slice(&last);
            }
        }
    }
    for _ in 0..repeats {
        jpeg.extend_from_slice(&last);
    }
    jpeg.extend_from_slice(&[0xFF, 0xD9]);
    jpeg
}

/// A valid JPEG whose decode takes many seconds (thousands of scans over a 36 MP frame): only
/// the deadline, a cancellation or the shutdown stops it.
fn slow_jpeg() -> Bytes {
    Bytes::from(many_scan_jpeg(6000, 6000, 63, 13, 0))
}

/// Scans in `slow_jpeg`: one DC and 63 x 14 AC scans per component.
const SLOW_JPEG_SCANS: u32 = 3 * (1 + 63 * 14);

/// Settings under which `slow_jpeg` is decoded at full scale (so no scan is left out) and
/// within the scan limit.
fn slow_settings(workers: usize, timeout: Duration) -> ThumbnailSettings {
    ThumbnailSettings {
        max_jpeg_scans: SLOW_JPEG_SCANS,
        max_edge: 4096,
        ..settings(workers, timeout)
    }
}

#[test]
fn generated_many_scan_jpegs_are_valid() {
    let small = many_scan_jpeg(64, 48, 5, 2, 0);
    let thumbnail = thumbnailer().make(FileKind::Jpeg, &small).unwrap().unwrap();
    assert_eq!((thumbnail.width, thumbnail.height), (64, 48));
    assert_colour("many scans", &thumbnail, &[128.0, 128.0, 128.0], 1.0);
}

/// A pool of `workers` over a budget of `budget` bytes that lets decodes wait a minute for it.
fn pool(settings: &ThumbnailSettings, budget: u64) -> (Arc<ThumbnailPool>, Arc<MemoryBudget>) {
    let budget = MemoryBudget::new(budget, Duration::from_secs(60));
    let pool = ThumbnailPool::new(settings, MAX_PIXELS, budget.clone());
    (Arc::new(pool), budget)
}

/// Starts decoding `slow_jpeg` and waits until it holds a worker (and its memory); aborting the
/// task cancels the decode.
async fn occupy_a_worker(
    pool: &Arc<ThumbnailPool>,
) -> tokio::task::JoinHandle<Result<Option<Thumbnail>, ThumbnailError>> {
    let decoded = pool.decoding();
    let slow = tokio::spawn({
        let pool = pool.clone();
        async move { pool.make(FileKind::Jpeg, slow_jpeg()).await }
    });
    until_decoding(pool, decoded + 1).await;
    slow
}

/// Polls until the pool runs `count` decodes.
async fn until_decoding(pool: &ThumbnailPool, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pool.decoding() != count {
        assert!(
            Instant::now() < deadline,
            "{} decodes, not {count}",
            pool.decoding()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jpeg_of_many_scans_is_refused_before_it_takes_a_worker() {
    // The reported file: a million tiny scans that libjpeg accepts without a warning.
    let hostile = Bytes::from(many_scan_jpeg(2048, 2048, 1, 0, 100_000));
    let (pool, _) = pool(&settings(1, Duration::from_secs(60)), 1 << 30);
    let started = Instant::now();
    match pool.make(FileKind::Jpeg, hostile).await {
        Err(ThumbnailError::TooManyScans { max_scans: 256 }) => {}
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(pool.decoding(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_past_its_deadline_gives_back_its_worker_and_memory_when_it_answers() {
    let (pool, budget) = pool(&slow_settings(1, Duration::from_millis(300)), 1 << 30);
    let total = budget.available_bytes();
    let started = Instant::now();
    match pool.make(FileKind::Jpeg, slow_jpeg()).await {
        Err(ThumbnailError::TimedOut) => {}
        other => panic!("{other:?}"),
    }
    // libjpeg's progress monitor stopped it inside the scans: nothing is held any more.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(pool.decoding(), 0);
    assert_eq!(pool.reserved_bytes(), 0);
    assert_eq!(budget.available_bytes(), total);
    let made = pool
        .make(FileKind::Png, large_png(64))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((made.width, made.height), (64, 64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_worker_ends_busy_after_the_queue_timeout() {
    let settings = ThumbnailSettings {
        queue_timeout: Duration::from_millis(200),
        ..slow_settings(1, Duration::from_secs(60))
    };
    let (pool, budget) = pool(&settings, 1 << 30);
    let total = budget.available_bytes();
    let slow = occupy_a_worker(&pool).await;
    let started = Instant::now();
    match pool.make(FileKind::Png, large_png(64)).await {
        Err(ThumbnailError::WorkersBusy) => {}
        other => panic!("{other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    // The caller going away cancels the slow decode.
    slow.abort();
    until_decoding(&pool, 0).await;
    // The slot's count drops a moment before its memory goes back (both when the decode ends).
    let deadline = Instant::now() + Duration::from_secs(10);
    while budget.available_bytes() != total {
        assert!(
            Instant::now() < deadline,
            "the cancelled decode kept {} bytes",
            total - budget.available_bytes()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_step_without_a_worker_falls_back_to_the_decode_after_the_last_byte() {
    let settings = ThumbnailSettings {
        queue_timeout: Duration::from_millis(200),
        ..slow_settings(1, Duration::from_secs(60))
    };
    let (pool, budget) = pool(&settings, 1 << 30);
    let slow = occupy_a_worker(&pool).await;
    let body = large_png(1500);
    let mut feed = pool.feed(FileKind::Png);
    let mut received = Vec::new();
    feed_bytes(&mut feed, &mut received, &body[..body.len() / 2]).await;
    // Its first step finds no worker within the queue timeout: the upload goes on, without
    // the decoder and its memory.
    until("the decoder without a worker is dropped", || {
        pool.streaming() == 0
    })
    .await;
    assert_eq!(pool.stream_fallbacks(), 1);
    slow.abort();
    until_decoding(&pool, 0).await;
    finish_as_the_whole_png(feed, received, &body, &settings).await;
    until("the memory is back", || budget.is_idle()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_steps_count_against_the_queue_and_dropped_feeds_stop_waiting_at_once() {
    // Waits for a worker would last a minute: nothing here may wait for them to end.
    let settings = ThumbnailSettings {
        queue_timeout: Duration::from_secs(60),
        stream_idle_timeout: Duration::from_secs(60),
        max_streaming_bytes: bytesize::ByteSize::gib(1),
        ..slow_settings(1, Duration::from_secs(60))
    };
    let (pool, budget) = pool(&settings, 1 << 30);
    let slow = occupy_a_worker(&pool).await;
    let reserved_by_slow = pool.reserved_bytes();
    // The queue's other places go to streamed decodes whose steps wait for the worker.
    let body = large_png(1500);
    let mut feeds = Vec::new();
    for _ in 0..QUEUE_PER_WORKER {
        let mut feed = pool.feed(FileKind::Png);
        feed_bytes(&mut feed, &mut Vec::new(), &body[..body.len() / 2]).await;
        feeds.push(feed);
    }
    until("every streamed step waits in the queue", || {
        pool.admitted() == 1 + QUEUE_PER_WORKER
    })
    .await;
    assert_eq!(pool.streaming(), QUEUE_PER_WORKER);
    // The queue is full: a new image is refused at once, not after the queue timeout.
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        pool.make(FileKind::Png, large_png(64)),
    )
    .await
    .expect("refused at once");
    assert!(
        matches!(refused, Err(ThumbnailError::WorkersBusy)),
        "{refused:?}"
    );
    // The uploads go away: their decoders stop waiting, and their memory is back at once.
    drop(feeds);
    until("the waiting decoders are gone", || {
        pool.streaming() == 0 && pool.admitted() == 1
    })
    .await;
    assert_eq!(pool.reserved_bytes(), reserved_by_slow);
    slow.abort();
    until_decoding(&pool, 0).await;
    until("the memory is back", || budget.is_idle()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_larger_than_the_whole_budget_is_refused_at_once() {
    // 4000 x 3000 progressive: libjpeg must hold every coefficient, about 36 MB.
    let jpeg = Bytes::from(many_scan_jpeg(4000, 3000, 1, 0, 0));
    let budget_bytes = 8 << 20;
    let (pool, budget) = pool(&settings(1, Duration::from_secs(60)), budget_bytes);
    let started = Instant::now();
    match pool.make(FileKind::Jpeg, jpeg).await {
        Err(ThumbnailError::TooLargeToDecode {
            needed_bytes,
            budget_bytes: reported,
        }) => {
            assert!(needed_bytes > 36_000_000, "{needed_bytes}");
            // Decodes draw from the budget's whole-buffer pool (seven eighths of it).
            assert_eq!(reported, budget.main_bytes());
            assert!(reported < budget_bytes);
        }
        other => panic!("{other:?}"),
    }
    // Not after the budget's minute-long wait.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(budget.available_bytes(), budget_bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_pool_stops_the_running_decodes() {
    let (pool, budget) = pool(&slow_settings(1, Duration::from_secs(60)), 1 << 30);
    let total = budget.available_bytes();
    let slow = occupy_a_worker(&pool).await;
    let started = Instant::now();
    pool.close();
    match slow.await.unwrap() {
        Err(ThumbnailError::ShuttingDown) => {}
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(budget.available_bytes(), total);
    assert!(matches!(
        pool.make(FileKind::Png, large_png(64)).await,
        Err(ThumbnailError::ShuttingDown)
    ));
}

// ---------------------------------------------------------------------------------------------
// The same through the real service, on Redis and the S3 server that scripts/test starts.

mod service {
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use svc_messaging::{
        config::Settings,
        grpc::pb::{
            self, file_relay_service_client::FileRelayServiceClient,
            messaging_service_client::MessagingServiceClient,
        },
    };
    use tonic::{Code, Status, transport::Channel};
    use tonic_types::StatusExt;

    use super::{
        SLOW_JPEG_SCANS, STEP_BYTES, large_png, many_scan_jpeg, noisy_png, progressive_jpeg,
        slow_jpeg,
    };
    use crate::support::{
        ServiceProcess, TestServer,
        cloud::{self, bucket_leftovers, file_record_pattern, redis_keys, use_cloud},
        create_conversation, reason, unique_prefix,
    };

    type Files = FileRelayServiceClient<Channel>;

    /// One worker, Redis under its own prefix, the test bucket; `customize` adds the rest.
    async fn server(key_prefix: &str, customize: impl FnOnce(&mut Settings)) -> TestServer {
        TestServer::start_with(|settings| {
            use_cloud(settings, key_prefix);
            settings.thumbnails.workers = 1;
            customize(settings);
        })
        .await
    }

    /// Lets `slow_jpeg` through the scan limit and decodes it at full scale (no scan left out).
    fn allow_slow_jpeg(settings: &mut Settings) {
        settings.thumbnails.max_jpeg_scans = SLOW_JPEG_SCANS;
        settings.thumbnails.max_edge = 4096;
        settings.uploads.memory_budget = bytesize::ByteSize::gib(1);
    }

    async fn upload(
        channel: &Channel,
        conversation_id: &str,
        name: &str,
        body: Bytes,
    ) -> Result<pb::FileInfo, Status> {
        let content_type = if name.ends_with(".png") {
            "image/png"
        } else {
            "image/jpeg"
        };
        let metadata = cloud::metadata(conversation_id, name, content_type, &body, false);
        cloud::upload(&mut Files::new(channel.clone()), "alice", metadata, &body)
            .await
            .map(|response| response.file.expect("file info"))
    }

    /// Objects and open multipart uploads under the conversation, and the file records in Redis
    /// under `key_prefix`: everything an upload leaves behind.
    async fn leftovers(key_prefix: &str, conversation_id: &str) -> Vec<String> {
        let mut left = bucket_leftovers(conversation_id).await;
        left.extend(redis_keys(&file_record_pattern(key_prefix)));
        left.sort();
        left
    }

    /// What a stored image leaves: its object, its thumbnail and its record.
    fn kept(key_prefix: &str, conversation_id: &str, file_id: &str) -> Vec<String> {
        let mut kept = vec![
            format!("files/{conversation_id}/{file_id}"),
            format!("thumbs/{conversation_id}/{file_id}"),
            format!("{key_prefix}:{{f:{file_id}}}:file"),
        ];
        kept.sort();
        kept
    }

    async fn conversation(server: &TestServer) -> (Channel, String) {
        let channel = server.channel().await;
        let mut messaging = MessagingServiceClient::new(channel.clone());
        let conversation_id = create_conversation(&mut messaging, "alice", &[]).await;
        (channel, conversation_id)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_jpeg_of_many_scans_is_refused_at_once_and_a_png_next_to_it_gets_its_thumbnail() {
        let key_prefix = unique_prefix("thumbs-many-scans");
        let server = server(&key_prefix, |_| {}).await;
        let (channel, conversation_id) = conversation(&server).await;
        let hostile = Bytes::from(many_scan_jpeg(2048, 2048, 1, 0, 100_000));
        let started = Instant::now();
        let (refused, stored) = tokio::join!(
            upload(&channel, &conversation_id, "scans.jpg", hostile),
            upload(&channel, &conversation_id, "small.png", large_png(8)),
        );
        let status = refused.expect_err("many scans are refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(reason(&status), "IMAGE_TOO_COMPLEX");
        assert!(
            status.message().contains("256 scans"),
            "{}",
            status.message()
        );
        let stored = stored.expect("the PNG is stored");
        assert!(stored.has_thumbnail, "{stored:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            leftovers(&key_prefix, &conversation_id).await,
            kept(&key_prefix, &conversation_id, &stored.file_id)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_decode_past_its_deadline_frees_the_only_worker_for_the_next_upload() {
        let key_prefix = unique_prefix("thumbs-deadline");
        let server = server(&key_prefix, |settings| {
            allow_slow_jpeg(settings);
            settings.thumbnails.timeout = Duration::from_millis(300);
        })
        .await;
        let (channel, conversation_id) = conversation(&server).await;
        let started = Instant::now();
        let status = upload(&channel, &conversation_id, "slow.jpg", slow_jpeg())
            .await
            .expect_err("the decode times out");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert_eq!(reason(&status), "IMAGE_DECODE_TIMEOUT");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        // The worker is free at once: the decode did not run on behind the answer.
        let started = Instant::now();
        let stored = upload(&channel, &conversation_id, "next.png", large_png(8))
            .await
            .expect("the next image gets the worker");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            leftovers(&key_prefix, &conversation_id).await,
            kept(&key_prefix, &conversation_id, &stored.file_id)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiting_for_a_busy_worker_ends_resource_exhausted_with_retry_info() {
        let key_prefix = unique_prefix("thumbs-queue");
        let server = server(&key_prefix, |settings| {
            allow_slow_jpeg(settings);
            settings.thumbnails.timeout = Duration::from_secs(60);
            settings.thumbnails.queue_timeout = Duration::from_millis(300);
        })
        .await;
        let (channel, conversation_id) = conversation(&server).await;
        let slow = tokio::spawn({
            let (channel, conversation_id) = (channel.clone(), conversation_id.clone());
            async move { upload(&channel, &conversation_id, "slow.jpg", slow_jpeg()).await }
        });
        // PNGs go through until the slow JPEG holds the worker; then one waits and is refused.
        let mut stored = Vec::new();
        let status = loop {
            let started = Instant::now();
            match upload(&channel, &conversation_id, "next.png", large_png(8)).await {
                Ok(file) => stored.push(file.file_id),
                Err(status) => {
                    let waited = started.elapsed();
                    assert!(
                        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
                        "{waited:?}"
                    );
                    break status;
                }
            }
            assert!(stored.len() < 100, "the slow JPEG never took the worker");
        };
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(reason(&status), "THUMBNAIL_WORKERS_BUSY");
        let retry = status.get_details_retry_info().expect("RetryInfo attached");
        assert!(
            retry
                .retry_delay
                .is_some_and(|delay| delay > Duration::ZERO)
        );
        // The slow upload's caller goes away: its decode is cancelled, its upload aborted.
        slow.abort();
        let mut expected: Vec<String> = stored
            .iter()
            .flat_map(|file_id| kept(&key_prefix, &conversation_id, file_id))
            .collect();
        expected.sort();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = leftovers(&key_prefix, &conversation_id).await;
            if left == expected {
                break;
            }
            assert!(Instant::now() < deadline, "left behind: {left:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_decode_that_could_never_fit_the_memory_budget_is_refused_at_once() {
        let key_prefix = unique_prefix("thumbs-over-budget");
        let server = server(&key_prefix, |settings| {
            settings.uploads.part_size = bytesize::ByteSize::mib(5);
            settings.uploads.parts_in_flight = 1;
            settings.uploads.memory_budget = bytesize::ByteSize::mib(12);
            // The budget must hold two images at the limit.
            settings.uploads.image_max_size = bytesize::ByteSize::mib(6);
            settings.uploads.memory_wait_timeout = Duration::from_secs(30);
        })
        .await;
        let (channel, conversation_id) = conversation(&server).await;
        // 4000 x 3000 progressive: decoding holds about 36 MB of coefficients.
        let jpeg = Bytes::from(many_scan_jpeg(4000, 3000, 1, 0, 0));
        let started = Instant::now();
        let status = upload(&channel, &conversation_id, "large.jpg", jpeg)
            .await
            .expect_err("refused");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(reason(&status), "IMAGE_TOO_LARGE_TO_DECODE");
        let info = status.get_details_error_info().unwrap();
        // What the budget has for whole buffers and decodes: seven eighths of it.
        assert_eq!(
            info.metadata["memory_budget_bytes"],
            ((12u64 << 20) - (12u64 << 20) / 8).to_string()
        );
        assert!(leftovers(&key_prefix, &conversation_id).await.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_service_exits_0_within_the_grace_while_a_decode_runs() {
        let scans = SLOW_JPEG_SCANS.to_string();
        let mut service = ServiceProcess::spawn(&[
            ("SVC_MESSAGING__SERVER__SHUTDOWN_GRACE", "1s"),
            ("SVC_MESSAGING__THUMBNAILS__WORKERS", "1"),
            ("SVC_MESSAGING__THUMBNAILS__TIMEOUT", "5m"),
            ("SVC_MESSAGING__THUMBNAILS__MAX_EDGE", "4096"),
            ("SVC_MESSAGING__THUMBNAILS__MAX_JPEG_SCANS", &scans),
            ("SVC_MESSAGING__UPLOADS__MEMORY_BUDGET", "1GiB"),
        ]);
        let channel = Channel::from_shared(format!("http://{}", service.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut messaging = MessagingServiceClient::new(channel.clone());
        let conversation_id = create_conversation(&mut messaging, "alice", &[]).await;
        let slow = tokio::spawn({
            let (channel, conversation_id) = (channel.clone(), conversation_id.clone());
            async move { upload(&channel, &conversation_id, "slow.jpg", slow_jpeg()).await }
        });
        // The upload has arrived and its decode started (it runs for many seconds more).
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!slow.is_finished());
        let signalled = Instant::now();
        service.signal("TERM");
        let exit = tokio::task::spawn_blocking(move || {
            let exit = service.wait_exit(Duration::from_secs(10));
            (exit, service)
        });
        let (exit, service) = exit.await.unwrap();
        let exit = exit.expect("the service exits");
        let took = signalled.elapsed();
        assert!(exit.success(), "{exit:?}: {}", service.output());
        // The grace, then at most the 2 s given to cancelled calls and 1 s to blocking threads.
        assert!(
            took < Duration::from_millis(1000 + 3500),
            "exit after {took:?}"
        );
        // The decode was still running when the grace ended: the upload was cut off.
        let status = slow.await.unwrap().expect_err("cut off by the shutdown");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }

    // -----------------------------------------------------------------------------------------
    // Decoding while the bytes arrive, observed through /metrics.

    /// A metric without labels from the server's /metrics.
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

    /// Polls the metric until it reads `value` (five seconds at most).
    async fn until_metric(server: &TestServer, name: &str, value: f64) {
        let started = Instant::now();
        loop {
            let now = metric(server, name).await;
            if now == value {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{name} stayed {now}, not {value}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Polls the metric until it reads more than `value` (five seconds at most).
    async fn until_metric_above(server: &TestServer, name: &str, value: f64) {
        let started = Instant::now();
        loop {
            let now = metric(server, name).await;
            if now > value {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{name} stayed {now}, not above {value}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// An UploadFile call whose messages the test sends one at a time.
    struct OpenUpload {
        sender: tokio::sync::mpsc::UnboundedSender<pb::UploadFileRequest>,
        call: tokio::task::JoinHandle<Result<pb::FileInfo, Status>>,
    }

    impl OpenUpload {
        fn start(channel: &Channel, conversation_id: &str, name: &str, size: usize) -> Self {
            let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
            let content_type = if name.ends_with(".png") {
                "image/png"
            } else {
                "image/jpeg"
            };
            let metadata = cloud::metadata_of_size(conversation_id, name, content_type, size);
            sender
                .send(pb::UploadFileRequest {
                    payload: Some(pb::upload_file_request::Payload::Metadata(metadata)),
                })
                .unwrap();
            let messages = futures::stream::poll_fn(move |cx| receiver.poll_recv(cx));
            let mut files = Files::new(channel.clone());
            let call = tokio::spawn(async move {
                files
                    .upload_file(crate::support::as_user("alice", messages))
                    .await
                    .map(|response| response.into_inner().file.expect("file info"))
            });
            Self { sender, call }
        }

        fn send(&self, bytes: &[u8], chunk: usize) {
            for piece in bytes.chunks(chunk) {
                let payload =
                    pb::upload_file_request::Payload::Chunk(Bytes::copy_from_slice(piece));
                self.sender
                    .send(pb::UploadFileRequest {
                        payload: Some(payload),
                    })
                    .unwrap();
            }
        }
    }

    const STREAMED: &str = "thumbnail_streamed_bytes_total";
    const DECODERS: &str = "thumbnail_streaming_decoders";
    const RESERVED: &str = "thumbnail_reserved_bytes";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_image_upload_is_decoded_while_its_bytes_arrive() {
        let key_prefix = unique_prefix("thumbs-streamed");
        let server = server(&key_prefix, |_| {}).await;
        let (channel, conversation_id) = conversation(&server).await;
        let mut streamed = 0.0;
        for (name, body) in [
            ("photo.jpg", progressive_jpeg(1600, 1200)),
            ("drawing.png", noisy_png(600).to_vec()),
        ] {
            let (head, last) = body.split_at(body.len() - 4096);
            let upload = OpenUpload::start(&channel, &conversation_id, name, body.len());
            upload.send(head, 16 * 1024);
            // The decoder has consumed every byte sent (but those short of a step), before the
            // last chunk leaves.
            until_metric_above(
                &server,
                STREAMED,
                streamed + (head.len() - STEP_BYTES) as f64,
            )
            .await;
            streamed += head.len() as f64;
            assert_eq!(metric(&server, DECODERS).await, 1.0, "{name}");
            assert!(metric(&server, RESERVED).await > 0.0, "{name}");
            upload.send(last, 16 * 1024);
            drop(upload.sender);
            let file = upload.call.await.unwrap().unwrap();
            assert!(file.has_thumbnail, "{name}");
            streamed += last.len() as f64;
            assert_eq!(metric(&server, STREAMED).await, streamed, "{name}");
            until_metric(&server, DECODERS, 0.0).await;
            until_metric(&server, RESERVED, 0.0).await;
            let mut left = leftovers(&key_prefix, &conversation_id).await;
            left.retain(|key| key.contains(&file.file_id));
            assert_eq!(left, kept(&key_prefix, &conversation_id, &file.file_id));
        }
        assert_eq!(
            metric(&server, "thumbnail_stream_fallbacks_total").await,
            0.0
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stalled_refused_and_cancelled_image_uploads_free_their_decoder() {
        let key_prefix = unique_prefix("thumbs-streamed-ends");
        let server = server(&key_prefix, |settings| {
            settings.uploads.idle_timeout = Duration::from_millis(400);
        })
        .await;
        let (channel, conversation_id) = conversation(&server).await;
        let body = noisy_png(600);
        let half = &body[..body.len() / 2];
        let mut streamed = 0.0;
        for ending in ["stalled", "refused", "cancelled"] {
            let upload = OpenUpload::start(&channel, &conversation_id, "drawing.png", body.len());
            upload.send(half, 16 * 1024);
            until_metric_above(
                &server,
                STREAMED,
                streamed + (half.len() - STEP_BYTES) as f64,
            )
            .await;
            streamed = metric(&server, STREAMED).await;
            assert_eq!(metric(&server, DECODERS).await, 1.0, "{ending}");
            match ending {
                // Nothing more comes: the idle timeout ends the upload, and its decoder.
                "stalled" => {
                    let status = upload.call.await.unwrap().unwrap_err();
                    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
                    assert_eq!(reason(&status), "UPLOAD_IDLE_TIMEOUT");
                }
                // More bytes than declared.
                "refused" => {
                    upload.send(&body, 64 * 1024);
                    let status = upload.call.await.unwrap().unwrap_err();
                    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
                    assert_eq!(reason(&status), "SIZE_MISMATCH");
                }
                // The client goes away mid-upload.
                _ => {
                    upload.call.abort();
                    let _ = upload.call.await;
                }
            }
            until_metric(&server, DECODERS, 0.0).await;
            until_metric(&server, RESERVED, 0.0).await;
        }
        assert!(leftovers(&key_prefix, &conversation_id).await.is_empty());
    }
}
