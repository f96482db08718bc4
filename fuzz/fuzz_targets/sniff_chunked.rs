//! The content sniffers fed arbitrary bytes in arbitrary chunkings (empty chunks included).
//!
//! Input: byte 0 picks the declared file kind, byte 1 how many chunk sizes follow (each one
//! byte, scaled so chunks of many KiB occur), the rest is the file. Checks that nothing panics,
//! that the verdict is the same as for the file fed in one piece (chunking must never change what
//! is accepted), and that the work stays proportional to the bytes (`bytes_examined`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use svc_messaging::files::{
    policy::FileKind,
    sniff::{ContentSniffer, SniffError, SniffReport},
};

/// Small enough that the fuzzer's small images can hit the limit.
const MAX_PIXELS: u64 = 1_000_000;

fn sniff<'a>(
    kind: FileKind,
    chunks: impl Iterator<Item = &'a [u8]>,
) -> (Result<SniffReport, SniffError>, u64) {
    let mut sniffer = ContentSniffer::new(kind, MAX_PIXELS);
    for chunk in chunks {
        if let Err(error) = sniffer.feed(chunk) {
            return (Err(error), sniffer.bytes_examined());
        }
    }
    let examined = sniffer.bytes_examined();
    (sniffer.finish(), examined)
}

fuzz_target!(|input: &[u8]| {
    let [selector, count, rest @ ..] = input else {
        return;
    };
    let kind = FileKind::ALL[usize::from(*selector) % FileKind::ALL.len()];
    let count = usize::from(*count).min(rest.len());
    let (sizes, file) = rest.split_at(count);

    // Chunk sizes cycle through `sizes`: 0 is an empty chunk, others grow quadratically so one
    // byte can ask for anything from 1 byte to ~64 KiB.
    let mut chunks = Vec::new();
    let mut offset = 0;
    let mut index = 0;
    while offset < file.len() && !sizes.is_empty() {
        let size = usize::from(sizes[index % sizes.len()]);
        let size = (size * size).min(file.len() - offset);
        chunks.push(&file[offset..offset + size]);
        offset += size;
        index += 1;
        // Only empty chunks asked for: stop, the rest goes in one piece below.
        if index >= sizes.len() && offset == 0 {
            break;
        }
    }
    chunks.push(&file[offset..]);

    let (chunked, examined) = sniff(kind, chunks.iter().copied());
    let (whole, _) = sniff(kind, std::iter::once(file));
    assert_eq!(
        chunked, whole,
        "{kind:?}: the verdict depends on the chunking"
    );
    let len = file.len() as u64;
    assert!(
        examined <= 6 * len + 64,
        "{kind:?}: {examined} bytes examined for {len} in {} chunks",
        chunks.len()
    );
});
