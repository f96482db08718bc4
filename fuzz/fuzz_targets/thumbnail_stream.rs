//! The JPEG and PNG thumbnail paths decoded while the bytes arrive (libjpeg's suspending source,
//! the `png` reader resumed after each piece, the progressive scan filter) on arbitrary bytes cut
//! into arbitrary pieces: they never panic, and return an error or a thumbnail within the
//! bounding box, the very thumbnail the whole-body decode makes of the same bytes (the service
//! keeps a streamed thumbnail only when the streamed decode succeeds, so it must never accept
//! what the whole-body decode refuses, nor differ from it). The first byte picks the format
//! (lowest bit) and the piece size (the rest).
#![no_main]

use libfuzzer_sys::fuzz_target;
use svc_messaging::{config::ThumbnailSettings, files::policy::FileKind, thumbnails::Thumbnailer};

fuzz_target!(|data: &[u8]| {
    let Some((&head, bytes)) = data.split_first() else {
        return;
    };
    let kind = if head & 1 == 0 {
        FileKind::Jpeg
    } else {
        FileKind::Png
    };
    // 1, 2, ... 128 bytes per piece: suspensions everywhere, inside markers and MCUs.
    let piece = usize::from(head >> 1) + 1;
    let settings = ThumbnailSettings::default();
    // A small pixel limit keeps each run fast; larger images take the refusal path.
    let thumbnailer = Thumbnailer::new(&settings, 1_000_000);
    if let Ok(Some(thumbnail)) = thumbnailer.make_in_pieces(kind, bytes, piece) {
        assert!(thumbnail.width.max(thumbnail.height) <= settings.max_edge);
        match thumbnailer.make(kind, bytes) {
            Ok(Some(whole)) => assert!(whole.bytes == thumbnail.bytes, "a different thumbnail"),
            other => panic!(
                "streamed made a thumbnail, the whole body gave {:?}",
                other.map(|made| made.is_some())
            ),
        }
    }
});
