//! sharp (libvips) in a Node child process, the baseline of the thumbnail benchmarks
//! (`benches/thumbnail.rs`, `benches/thumbnail_stream.rs`): one request at a time, answered by
//! `benches/sharp-baseline.mjs`.

#![allow(dead_code)] // Each benchmark uses what it needs.

use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Command, Stdio},
};

use svc_messaging::config::ThumbnailSettings;

/// sharp in a Node child process, one request at a time.
pub struct Sharp {
    input: std::process::ChildStdin,
    output: BufReader<std::process::ChildStdout>,
    pub versions: String,
    _child: std::process::Child,
}

pub struct SharpRun {
    pub ms: f64,
    pub width: u32,
    pub height: u32,
}

impl Sharp {
    pub fn start(script: &Path, sharp_dir: &Path) -> Self {
        let mut child = Command::new("node")
            .arg(script)
            .env("SHARP_BENCH_DIR", sharp_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start node");
        let input = child.stdin.take().expect("stdin");
        let mut output = BufReader::new(child.stdout.take().expect("stdout"));
        let mut first = String::new();
        output.read_line(&mut first).expect("sharp versions");
        let json: serde_json::Value = serde_json::from_str(&first).expect("versions JSON");
        let versions = format!(
            "sharp {}, libvips {}, mozjpeg {}, libpng {}, zlib-ng {}, SIMD {}",
            json["versions"]["sharp"],
            json["versions"]["vips"],
            json["versions"]["mozjpeg"],
            json["versions"]["png"],
            json["versions"]["zlib-ng"],
            json["simd"]
        )
        .replace('"', "");
        Self {
            input,
            output,
            versions,
            _child: child,
        }
    }

    pub fn run(
        &mut self,
        file: &Path,
        settings: &ThumbnailSettings,
        format: &str,
        out: Option<&Path>,
    ) -> SharpRun {
        let request = serde_json::json!({
            "file": file,
            "maxEdge": settings.max_edge,
            "quality": settings.jpeg_quality,
            "format": format,
            "out": out,
        });
        writeln!(self.input, "{request}").expect("write to sharp");
        let mut line = String::new();
        self.output.read_line(&mut line).expect("read from sharp");
        let answer: serde_json::Value = serde_json::from_str(&line).expect("sharp JSON");
        SharpRun {
            ms: answer["ms"].as_f64().expect("ms"),
            width: answer["width"].as_u64().expect("width") as u32,
            height: answer["height"].as_u64().expect("height") as u32,
        }
    }
}
