//! The content sniffer on arbitrary bytes in arbitrary chunkings (empty chunks included): it
//! never panics, and its verdict does not depend on how the bytes were cut into chunks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use svc_messaging::files::{
    policy::FileKind,
    sniff::{ContentSniffer, SniffError, SniffReport},
};

/// Small, so pixel-limit refusals are reached too.
const MAX_PIXELS: u64 = 4096 * 4096;

fn sniff<'a>(
    kind: FileKind,
    chunks: impl Iterator<Item = &'a [u8]>,
) -> Result<SniffReport, SniffError> {
    let mut sniffer = ContentSniffer::new(kind, MAX_PIXELS);
    for chunk in chunks {
        sniffer.feed(chunk)?;
    }
    sniffer.finish()
}

/// Cuts `body` into chunks of 0..=31 bytes chosen by a small generator seeded from the input.
fn chunked(body: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut state = u32::from(seed) | 1;
    let mut chunks = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let size = (state % 32) as usize;
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        chunks.push(chunk);
        rest = tail;
    }
    chunks
}

fuzz_target!(|input: &[u8]| {
    let [selector, seed, body @ ..] = input else {
        return;
    };
    let kind = FileKind::ALL[usize::from(*selector) % FileKind::ALL.len()];
    let whole = sniff(kind, std::iter::once(body));
    let pieces = sniff(kind, chunked(body, *seed).into_iter());
    assert_eq!(
        whole, pieces,
        "{kind:?}: the verdict depends on the chunking"
    );
});
