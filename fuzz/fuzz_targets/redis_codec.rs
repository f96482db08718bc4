//! The parsers of what the Redis store reads back (event members, stored messages, pub/sub
//! payloads, conversation snapshots): a corrupt or hostile value is an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use svc_messaging::store::redis::fuzzing;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    fuzzing::decode_all(text);
});
