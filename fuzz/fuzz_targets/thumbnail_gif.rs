//! The gif thumbnail path (header plan, decode, resize, encode) on arbitrary bytes: it never
//! panics, and it returns (an error or a thumbnail within the bounding box).
#![no_main]

use libfuzzer_sys::fuzz_target;
use svc_messaging::{config::ThumbnailSettings, files::policy::FileKind, thumbnails::Thumbnailer};

fuzz_target!(|bytes: &[u8]| {
    let settings = ThumbnailSettings::default();
    // A small pixel limit keeps each run fast; larger images take the refusal path.
    let thumbnailer = Thumbnailer::new(&settings, 1_000_000);
    if let Ok(Some(thumbnail)) = thumbnailer.make(FileKind::Gif, bytes) {
        assert!(thumbnail.width.max(thumbnail.height) <= settings.max_edge);
    }
});
