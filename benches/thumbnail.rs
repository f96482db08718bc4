//! Thumbnail speed against sharp (libvips), one thread each, interleaved on the same core.
//!
//! `scripts/bench-thumbnails` installs what this needs (sharp in a bench-only npm folder, Pillow
//! for the corpus) and runs it; `cargo bench --bench thumbnail` alone does the same preparation
//! through that script's `--prepare` step. For every corpus file (photo-like JPEGs of 1-24 MP,
//! PNGs in every colour model, made by `scripts/make-test-images.py corpus`), runs alternate
//! ours / sharp `THUMBNAIL_BENCH_RUNS` times (default 15) after two warm-ups each, and prints
//! per-file and per-format medians with the ratio ours / sharp, output sizes, quality (PSNR of
//! each against a full-resolution Lanczos3 reference) and our peak heap per thumbnail. The
//! table is also written to `target/thumbnail-bench.md`.
//!
//! Environment: THUMBNAIL_CORPUS (default ~/.cache/svc-messaging/thumbnail-corpus),
//! SHARP_BENCH_DIR (default ~/.cache/svc-messaging/sharp-bench), THUMBNAIL_BENCH_CPU (the core
//! both are pinned to, default 1), THUMBNAIL_BENCH_RUNS.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

#[path = "sharp/mod.rs"]
mod sharp;

use fast_image_resize::{
    FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer,
    images::{Image, ImageRef},
};
use svc_messaging::{
    config::ThumbnailSettings,
    files::policy::FileKind,
    thumbnails::{Orientation, Thumbnail, Thumbnailer},
};

/// Counts heap bytes in use and their peak, to report what one thumbnail holds.
struct CountingAllocator;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; only counters are added.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let pointer = unsafe { System.alloc(layout) };
        if !pointer.is_null() {
            let now = IN_USE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        pointer
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(pointer, layout) };
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let moved = unsafe { System.realloc(pointer, layout, new_size) };
        if !moved.is_null() {
            IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
            let now = IN_USE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

const PINNED_ENV: &str = "THUMBNAIL_BENCH_PINNED";

fn main() {
    // `cargo bench` passes `--bench`; `--peak-memory KIND FILE` is this benchmark calling itself.
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, kind, file] = args.as_slice()
        && flag == "--peak-memory"
    {
        peak_memory(kind, Path::new(file));
        return;
    }
    pin_to_one_core();
    let home = PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()));
    let cache = home.join(".cache/svc-messaging");
    let corpus = std::env::var_os("THUMBNAIL_CORPUS")
        .map_or_else(|| cache.join("thumbnail-corpus"), PathBuf::from);
    let sharp_dir = std::env::var_os("SHARP_BENCH_DIR")
        .map_or_else(|| cache.join("sharp-bench"), PathBuf::from);
    let runs: usize = std::env::var("THUMBNAIL_BENCH_RUNS")
        .ok()
        .and_then(|runs| runs.parse().ok())
        .unwrap_or(15);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if !corpus.join("jpeg-24mp-420.jpg").exists() || !sharp_dir.join("node_modules/sharp").exists()
    {
        let status = Command::new("bash")
            .arg(root.join("scripts/bench-thumbnails"))
            .arg("--prepare")
            .env("THUMBNAIL_CORPUS", &corpus)
            .env("SHARP_BENCH_DIR", &sharp_dir)
            .status()
            .expect("run scripts/bench-thumbnails --prepare");
        assert!(status.success(), "preparing the benchmark failed");
    }

    let settings = ThumbnailSettings::default();
    let thumbnailer = Thumbnailer::new(&settings, 40_000_000);
    let mut sharp = sharp::Sharp::start(&root.join("benches/sharp-baseline.mjs"), &sharp_dir);
    let scratch = tempfile::tempdir().expect("temp dir");

    let mut files: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .expect("corpus folder")
        .map(|entry| entry.expect("corpus entry").path())
        .filter(|path| matches!(extension(path), "jpg" | "png"))
        // THUMBNAIL_BENCH_ONLY: only the files whose name contains it (e.g. for `perf record`).
        .filter(|path| {
            path.to_string_lossy()
                .contains(&std::env::var("THUMBNAIL_BENCH_ONLY").unwrap_or_default())
        })
        .collect();
    files.sort();

    let mut rows = Vec::new();
    for path in &files {
        let kind = if extension(path) == "jpg" {
            FileKind::Jpeg
        } else {
            FileKind::Png
        };
        let bytes = std::fs::read(path).expect("read corpus file");
        let plan = thumbnailer
            .plan(kind, &bytes)
            .expect("plan")
            .expect("image");

        let peak_rss = measure_peak_rss(kind, path);
        let baseline = IN_USE.load(Ordering::Relaxed);
        PEAK.store(baseline, Ordering::Relaxed);
        let ours = thumbnailer.render(&plan, &bytes).expect("thumbnail");
        let peak_heap = PEAK.load(Ordering::Relaxed) - baseline;

        let format = if ours.content_type == "image/png" {
            "png"
        } else {
            "jpeg"
        };
        let sharp_out = scratch.path().join(format!("sharp.{format}"));
        let first = sharp.run(path, &settings, format, Some(&sharp_out));
        assert_eq!(
            (first.width, first.height),
            (ours.width, ours.height),
            "{}: same thumbnail size",
            path.display()
        );
        let sharp_bytes = std::fs::read(&sharp_out).expect("sharp output");
        let reference = reference(kind, &bytes, &plan);
        let ours_quality = psnr(&reference, &decode_output(&ours.bytes, format));
        let sharp_quality = psnr(&reference, &decode_output(&sharp_bytes, format));

        let _ = thumbnailer.render(&plan, &bytes);
        let _ = sharp.run(path, &settings, format, None);
        let (mut our_times, mut sharp_times) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let started = Instant::now();
            let thumbnail = thumbnailer.render(&plan, &bytes).expect("thumbnail");
            our_times.push(started.elapsed().as_secs_f64() * 1000.0);
            drop(thumbnail);
            sharp_times.push(sharp.run(path, &settings, format, None).ms);
        }
        let (source_width, source_height) = plan.source_size();
        let row = Row {
            name: path.file_stem().unwrap().to_string_lossy().into_owned(),
            png: kind == FileKind::Png,
            source: format!("{source_width}x{source_height}"),
            decoded: format!("{}x{}", plan.decoded_size().0, plan.decoded_size().1),
            output: format!("{} {}x{}", format, ours.width, ours.height),
            ours_ms: median(&mut our_times),
            sharp_ms: median(&mut sharp_times),
            ours_bytes: ours.bytes.len(),
            sharp_bytes: sharp_bytes.len(),
            ours_quality,
            sharp_quality,
            peak_heap,
            peak_rss,
            reserved: plan.peak_bytes(),
            full_decode: u64::from(source_width) * u64::from(source_height) * channels(&ours),
        };
        eprintln!(
            "{:<32} ours {:7.2} ms  sharp {:7.2} ms  ratio {:.2}",
            row.name,
            row.ours_ms,
            row.sharp_ms,
            row.ours_ms / row.sharp_ms
        );
        rows.push(row);
    }
    let report = report(&rows, runs, &sharp.versions);
    println!("{report}");
    let out = root.join("target/thumbnail-bench.md");
    if std::fs::write(&out, &report).is_ok() {
        eprintln!("written to {}", out.display());
    }
}

/// Peak resident memory one thumbnail adds, libjpeg's own buffers included (the heap counter
/// sees only Rust's): measured in a fresh process of this benchmark, on its second thumbnail.
fn measure_peak_rss(kind: FileKind, file: &Path) -> u64 {
    let kind = if kind == FileKind::Jpeg {
        "jpeg"
    } else {
        "png"
    };
    let output = Command::new(std::env::current_exe().expect("current exe"))
        .args(["--peak-memory", kind])
        .arg(file)
        .env(PINNED_ENV, "1")
        .output()
        .expect("run the memory probe");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("memory probe output")
}

/// Prints how much the peak resident set grew while making one thumbnail.
fn peak_memory(kind: &str, file: &Path) {
    let kind = if kind == "jpeg" {
        FileKind::Jpeg
    } else {
        FileKind::Png
    };
    let bytes = std::fs::read(file).expect("read corpus file");
    let thumbnailer = Thumbnailer::new(&ThumbnailSettings::default(), 40_000_000);
    let plan = thumbnailer
        .plan(kind, &bytes)
        .expect("plan")
        .expect("image");
    // A first run pages in the code and sets the allocator up; then the high-water mark is
    // reset (Linux: `5` to clear_refs) and the second run measured.
    std::hint::black_box(thumbnailer.render(&plan, &bytes).expect("thumbnail"));
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = status_kib("VmRSS:");
    std::hint::black_box(thumbnailer.render(&plan, &bytes).expect("thumbnail"));
    let peak = status_kib("VmHWM:");
    println!("{}", peak.saturating_sub(before) * 1024);
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with(field))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

/// Re-runs this benchmark under `taskset` so it and the sharp child share one core.
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

fn extension(path: &Path) -> &str {
    path.extension().and_then(|e| e.to_str()).unwrap_or("")
}

fn channels(thumbnail: &Thumbnail) -> u64 {
    if thumbnail.content_type == "image/png" {
        4
    } else {
        3
    }
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

/// RGBA pixels (alpha 255 for opaque images).
struct Pixels {
    width: u32,
    height: u32,
    rgba: Vec<u8>,
}

/// What an ideal thumbnail looks like: the full-resolution decode, Lanczos3 (premultiplied),
/// turned upright.
fn reference(kind: FileKind, bytes: &[u8], plan: &svc_messaging::thumbnails::DecodePlan) -> Pixels {
    let full = if kind == FileKind::Jpeg {
        decode_jpeg(bytes)
    } else {
        decode_png(bytes)
    };
    let stored_target = plan
        .orientation()
        .displayed(plan.thumbnail_size().0, plan.thumbnail_size().1);
    let source = ImageRef::new(full.width, full.height, &full.rgba, PixelType::U8x4).unwrap();
    let mut resized = Image::new(stored_target.0, stored_target.1, PixelType::U8x4);
    Resizer::new()
        .resize(
            &source,
            &mut resized,
            &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3)),
        )
        .unwrap();
    let resized = Pixels {
        width: stored_target.0,
        height: stored_target.1,
        rgba: resized.into_vec(),
    };
    match plan.orientation() {
        Orientation::Normal => resized,
        Orientation::Rotate90 => rotate_clockwise(&resized),
        other => panic!("the corpus has no {other:?} image"),
    }
}

fn rotate_clockwise(image: &Pixels) -> Pixels {
    let (width, height) = (image.width as usize, image.height as usize);
    let mut rgba = Vec::with_capacity(image.rgba.len());
    for y in 0..width {
        for x in 0..height {
            let start = ((height - 1 - x) * width + y) * 4;
            rgba.extend_from_slice(&image.rgba[start..start + 4]);
        }
    }
    Pixels {
        width: image.height,
        height: image.width,
        rgba,
    }
}

fn decode_output(bytes: &[u8], format: &str) -> Pixels {
    if format == "png" {
        decode_png(bytes)
    } else {
        decode_jpeg(bytes)
    }
}

fn decode_jpeg(bytes: &[u8]) -> Pixels {
    let mut decoder = mozjpeg::Decompress::new_mem(bytes).unwrap().rgba().unwrap();
    let (width, height) = (decoder.width() as u32, decoder.height() as u32);
    let rgba: Vec<u8> = decoder.read_scanlines().unwrap();
    Pixels {
        width,
        height,
        rgba,
    }
}

fn decode_png(bytes: &[u8]) -> Pixels {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().unwrap();
    let mut buffer = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buffer).unwrap();
    let samples = frame.color_type.samples();
    let rgba = buffer[..frame.buffer_size()]
        .chunks_exact(samples)
        .flat_map(|pixel| match samples {
            1 => [pixel[0], pixel[0], pixel[0], 255],
            2 => [pixel[0], pixel[0], pixel[0], pixel[1]],
            3 => [pixel[0], pixel[1], pixel[2], 255],
            _ => [pixel[0], pixel[1], pixel[2], pixel[3]],
        })
        .collect();
    Pixels {
        width: frame.width,
        height: frame.height,
        rgba,
    }
}

/// PSNR of luma and of chroma (Cb and Cr together), on premultiplied colour.
#[derive(Clone, Copy)]
struct Quality {
    luma: f64,
    chroma: f64,
}

fn psnr(reference: &Pixels, image: &Pixels) -> Quality {
    assert_eq!(
        (reference.width, reference.height),
        (image.width, image.height)
    );
    let ycc = |pixel: &[u8]| {
        let alpha = f64::from(pixel[3]) / 255.0;
        let (r, g, b) = (
            f64::from(pixel[0]) * alpha,
            f64::from(pixel[1]) * alpha,
            f64::from(pixel[2]) * alpha,
        );
        (
            0.299 * r + 0.587 * g + 0.114 * b,
            -0.168_736 * r - 0.331_264 * g + 0.5 * b,
            0.5 * r - 0.418_688 * g - 0.081_312 * b,
        )
    };
    let (mut luma, mut chroma) = (0.0, 0.0);
    for (a, b) in reference
        .rgba
        .chunks_exact(4)
        .zip(image.rgba.chunks_exact(4))
    {
        let (ya, cba, cra) = ycc(a);
        let (yb, cbb, crb) = ycc(b);
        luma += (ya - yb).powi(2);
        chroma += (cba - cbb).powi(2) + (cra - crb).powi(2);
    }
    let count = (reference.rgba.len() / 4) as f64;
    let to_db = |mse: f64| 10.0 * (255.0f64.powi(2) / mse.max(1e-9)).log10();
    Quality {
        luma: to_db(luma / count),
        chroma: to_db(chroma / (2.0 * count)),
    }
}

struct Row {
    name: String,
    png: bool,
    source: String,
    decoded: String,
    output: String,
    ours_ms: f64,
    sharp_ms: f64,
    ours_bytes: usize,
    sharp_bytes: usize,
    ours_quality: Quality,
    sharp_quality: Quality,
    peak_heap: usize,
    peak_rss: u64,
    reserved: u64,
    full_decode: u64,
}

fn report(rows: &[Row], runs: usize, sharp_versions: &str) -> String {
    let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
    let mut out = String::new();
    let _ = writeln!(out, "## Thumbnails against sharp\n");
    let _ = writeln!(
        out,
        "{}; {runs} interleaved runs per file after 2 warm-ups, both pinned to one core; \
         max_edge 320, JPEG quality 80. Baseline: {sharp_versions}, `concurrency(1)`, cache off.\n",
        machine()
    );
    let _ = writeln!(
        out,
        "| file | source | decoded at | output | sharp ms | ours ms | ours/sharp | KiB ours/sharp \
         | PSNR Y ours/sharp | PSNR CbCr ours/sharp | our peak heap / RSS | reserved | full decode |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.2} | {:.2} | **{:.2}** | {:.1} / {:.1} | {:.1} / {:.1} | {:.1} / {:.1} | {:.2} / {:.2} MiB | {:.2} MiB | {:.1} MiB |",
            row.name,
            row.source,
            row.decoded,
            row.output,
            row.sharp_ms,
            row.ours_ms,
            row.ours_ms / row.sharp_ms,
            row.ours_bytes as f64 / 1024.0,
            row.sharp_bytes as f64 / 1024.0,
            row.ours_quality.luma,
            row.sharp_quality.luma,
            row.ours_quality.chroma,
            row.sharp_quality.chroma,
            mib(row.peak_heap as f64),
            mib(row.peak_rss as f64),
            mib(row.reserved as f64),
            mib(row.full_decode as f64),
        );
    }
    let _ = writeln!(
        out,
        "\n| format | files | median sharp ms | median ours ms | ratio of medians | median of ratios | goal <= 0.8 |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for (label, group) in [
        (
            "JPEG",
            rows.iter().filter(|row| !row.png).collect::<Vec<_>>(),
        ),
        ("PNG", rows.iter().filter(|row| row.png).collect()),
        ("all", rows.iter().collect()),
    ] {
        if group.is_empty() {
            continue;
        }
        let mut sharp: Vec<f64> = group.iter().map(|row| row.sharp_ms).collect();
        let mut ours: Vec<f64> = group.iter().map(|row| row.ours_ms).collect();
        let mut ratios: Vec<f64> = group.iter().map(|row| row.ours_ms / row.sharp_ms).collect();
        let (sharp, ours, ratio) = (median(&mut sharp), median(&mut ours), median(&mut ratios));
        let _ = writeln!(
            out,
            "| {label} | {} | {sharp:.2} | {ours:.2} | **{:.2}** | {ratio:.2} | {} |",
            group.len(),
            ours / sharp,
            if ours / sharp <= 0.8 && ratio <= 0.8 {
                "met"
            } else {
                "not met"
            }
        );
    }
    out
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let rustc = Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default();
    let node = Command::new("node")
        .arg("--version")
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores visible, {rustc}, node {node}")
}
