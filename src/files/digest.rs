//! A SHA-256 whose state can be saved at a block boundary and resumed elsewhere.
//!
//! An upload's sha256 covers the whole file, but a resumed upload (issue 11) continues on any
//! replica, possibly after a restart: the state reached at the last durable part must travel
//! with the session. `sha2`'s hasher cannot be serialized, so this one keeps its own eight-word
//! state and feeds whole 64-byte blocks to `sha2::compress256` (the same, SIMD-accelerated,
//! compression function); parts are whole multiples of 64 bytes, so a checkpoint at a part
//! boundary holds no partial block.

use serde::{Deserialize, Serialize};
use sha2::{Sha256VarCore, digest::core_api::Block};

const BLOCK: usize = 64;
/// Blocks handed to `compress256` per call (4 KiB, on the stack).
const GROUP: usize = 64;
const INITIAL_STATE: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// What a [`ResumableSha256`] needs to carry on: its state after `length` bytes, a multiple of
/// 64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sha256Checkpoint {
    pub state: [u32; 8],
    pub length: u64,
}

/// SHA-256 over bytes fed in any pieces; see the module docs.
#[derive(Clone)]
pub struct ResumableSha256 {
    state: [u32; 8],
    /// Bytes compressed into `state` so far (always whole blocks).
    compressed: u64,
    pending: [u8; BLOCK],
    pending_len: usize,
}

impl Default for ResumableSha256 {
    fn default() -> Self {
        Self::new()
    }
}

impl ResumableSha256 {
    pub fn new() -> Self {
        Self::resume(&Sha256Checkpoint {
            state: INITIAL_STATE,
            length: 0,
        })
    }

    /// Carries on from a checkpoint.
    pub fn resume(checkpoint: &Sha256Checkpoint) -> Self {
        Self {
            state: checkpoint.state,
            compressed: checkpoint.length,
            pending: [0; BLOCK],
            pending_len: 0,
        }
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.compressed + self.pending_len as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        if self.pending_len > 0 {
            let take = (BLOCK - self.pending_len).min(bytes.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&bytes[..take]);
            self.pending_len += take;
            bytes = &bytes[take..];
            if self.pending_len < BLOCK {
                return;
            }
            let block = self.pending;
            self.compress_all(&block);
            self.pending_len = 0;
        }
        let whole = bytes.len() - bytes.len() % BLOCK;
        self.compress_all(&bytes[..whole]);
        let rest = &bytes[whole..];
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    /// The state to resume from, when the bytes fed so far are a whole number of blocks.
    pub fn checkpoint(&self) -> Option<Sha256Checkpoint> {
        (self.pending_len == 0).then_some(Sha256Checkpoint {
            state: self.state,
            length: self.compressed,
        })
    }

    /// The digest of everything fed (FIPS 180-4 padding: 0x80, zeros, the bit length).
    pub fn finalize(mut self) -> [u8; 32] {
        let bit_length = self.len().wrapping_mul(8);
        let mut tail = [0u8; 2 * BLOCK];
        tail[..self.pending_len].copy_from_slice(&self.pending[..self.pending_len]);
        tail[self.pending_len] = 0x80;
        let tail_len = if self.pending_len < BLOCK - 8 {
            BLOCK
        } else {
            2 * BLOCK
        };
        tail[tail_len - 8..tail_len].copy_from_slice(&bit_length.to_be_bytes());
        self.compress_all(&tail[..tail_len]);
        let mut digest = [0u8; 32];
        for (out, word) in digest.chunks_exact_mut(4).zip(self.state) {
            out.copy_from_slice(&word.to_be_bytes());
        }
        digest
    }

    /// Compresses `blocks` (whole blocks only), many per call: `compress256` checks the CPU's
    /// SHA extensions and sets its rounds up on every call, which cost 12% over a 50 MiB file
    /// fed one block per call. The copy into the group is far cheaper than that.
    fn compress_all(&mut self, blocks: &[u8]) {
        debug_assert_eq!(blocks.len() % BLOCK, 0);
        let mut group = [Block::<Sha256VarCore>::default(); GROUP];
        for bytes in blocks.chunks(GROUP * BLOCK) {
            let count = bytes.len() / BLOCK;
            for (block, bytes) in group.iter_mut().zip(bytes.chunks_exact(BLOCK)) {
                block.copy_from_slice(bytes);
            }
            sha2::compress256(&mut self.state, &group[..count]);
        }
        self.compressed += blocks.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    use super::*;

    /// Deterministic bytes (xorshift).
    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    #[test]
    fn matches_sha2_for_every_length_around_the_padding_edges() {
        for len in (0..300).chain([1000, 4095, 4096, 4097, 100_000]) {
            let data = bytes(len, len as u64);
            let mut ours = ResumableSha256::new();
            ours.update(&data);
            assert_eq!(
                ours.finalize(),
                <[u8; 32]>::from(Sha256::digest(&data)),
                "{len}"
            );
        }
    }

    #[test]
    fn any_split_into_pieces_gives_the_same_digest() {
        let data = bytes(10_000, 7);
        let expected = <[u8; 32]>::from(Sha256::digest(&data));
        for piece in [1, 3, 63, 64, 65, 127, 1000, 4096] {
            let mut ours = ResumableSha256::new();
            for chunk in data.chunks(piece) {
                ours.update(chunk);
            }
            ours.update(&[]);
            assert_eq!(ours.len(), data.len() as u64);
            assert_eq!(ours.finalize(), expected, "pieces of {piece}");
        }
    }

    #[test]
    fn a_checkpoint_saved_at_a_block_boundary_resumes_elsewhere() {
        let data = bytes(50_000, 11);
        let expected = <[u8; 32]>::from(Sha256::digest(&data));
        let mut first = ResumableSha256::new();
        first.update(&data[..100]);
        assert_eq!(first.checkpoint(), None, "100 bytes are not whole blocks");
        first.update(&data[100..8192]);
        let checkpoint = first.checkpoint().expect("8192 bytes are whole blocks");
        assert_eq!(checkpoint.length, 8192);
        // Saved as text (e.g. in Redis) and read back on another replica.
        let saved = serde_json::to_string(&checkpoint).unwrap();
        let restored: Sha256Checkpoint = serde_json::from_str(&saved).unwrap();
        let mut second = ResumableSha256::resume(&restored);
        second.update(&data[8192..]);
        assert_eq!(second.len(), data.len() as u64);
        assert_eq!(second.finalize(), expected);
    }
}
