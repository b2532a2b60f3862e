//! Packs: how sealed chunks travel and rest.
//!
//! ```text
//! pack = sealed chunk* ‖ sealed index ‖ random padding ‖ sealed trailer
//! ```
//!
//! - The **index** is a [`PackIndex`] (chunk id, offset, length of every sealed chunk), encoded with
//!   postcard and sealed as a blob in the domain [`DOMAIN_PACK_INDEX`](crate::envelope::DOMAIN_PACK_INDEX).
//! - The **padding** is random bytes that make the pack's length a multiple of [`PACK_ALIGN`]
//!   (64 KiB), so a holder learns pack sizes only in 64 KiB steps.
//! - The **trailer** is the last [`TRAILER_LEN`] bytes: a sealed [`PackTrailer`] (offset and length
//!   of the index) in the domain [`DOMAIN_PACK_TRAILER`](crate::envelope::DOMAIN_PACK_TRAILER).
//!
//! The pack id is BLAKE3 of all these bytes ([`PackId::of`](crate::ids::PackId::of)).

use crate::codec::{DecodeError, decode_bounded, encode};
use crate::envelope::OVERHEAD;
use crate::ids::ChunkId;
use serde::{Deserialize, Serialize};

/// Packs are padded to a multiple of this many bytes.
pub const PACK_ALIGN: u64 = 64 * 1024;
/// A pack is closed once its chunks reach this many bytes.
pub const PACK_TARGET: u64 = 8 * 1024 * 1024;
/// A pack is also closed at this many chunks, so its sealed index stays far below
/// [`MAX_INDEX_LEN`] (an entry encodes in at most 42 bytes).
pub const MAX_PACK_CHUNKS: usize = 50_000;
/// The largest pack any node accepts or reads.
pub const MAX_PACK_LEN: u64 = 32 * 1024 * 1024;
/// Plaintext length of a trailer: index offset and index length, both u64 little-endian.
pub const TRAILER_PLAIN_LEN: usize = 16;
/// Length of the sealed trailer at the end of every pack.
pub const TRAILER_LEN: usize = TRAILER_PLAIN_LEN + OVERHEAD;
/// The largest sealed index accepted.
pub const MAX_INDEX_LEN: usize = 4 * 1024 * 1024;

/// Where one sealed chunk sits in its pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackIndexEntry {
    /// The chunk's id.
    pub chunk: ChunkId,
    /// Offset of the sealed chunk from the start of the pack.
    pub offset: u32,
    /// Length of the sealed chunk.
    pub len: u32,
}

/// The sealed index of a pack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PackIndex {
    /// Every chunk in the pack, in pack order.
    pub entries: Vec<PackIndexEntry>,
}

/// Where each chunk of a pack's index is, as index records: chunk id → (pack, offset, length).
pub fn chunk_locations(
    pack: crate::PackId,
    entries: &[PackIndexEntry],
) -> Vec<(ChunkId, crate::local::ChunkLoc)> {
    entries
        .iter()
        .map(|e| {
            (
                e.chunk,
                crate::local::ChunkLoc {
                    pack,
                    offset: e.offset,
                    len: e.len,
                },
            )
        })
        .collect()
}

impl PackIndex {
    /// Encodes the index (before sealing).
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes an index (after opening).
    ///
    /// # Errors
    /// A bounded [`DecodeError`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_bounded("pack index", bytes, MAX_INDEX_LEN)
    }
}

/// The plaintext of the trailer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackTrailer {
    /// Offset of the sealed index.
    pub index_offset: u64,
    /// Length of the sealed index.
    pub index_len: u64,
}

impl PackTrailer {
    /// Fixed 16-byte little-endian encoding.
    pub fn to_bytes(&self) -> [u8; TRAILER_PLAIN_LEN] {
        let mut out = [0u8; TRAILER_PLAIN_LEN];
        out[..8].copy_from_slice(&self.index_offset.to_le_bytes());
        out[8..].copy_from_slice(&self.index_len.to_le_bytes());
        out
    }

    /// Decodes the trailer and checks that the index lies inside a pack of `pack_len` bytes.
    ///
    /// # Errors
    /// [`DecodeError::Truncated`] or [`DecodeError::Malformed`].
    pub fn from_bytes(bytes: &[u8], pack_len: u64) -> Result<Self, DecodeError> {
        let what = "pack trailer";
        let bytes: [u8; TRAILER_PLAIN_LEN] =
            bytes.try_into().map_err(|_| DecodeError::Truncated {
                what,
                need: TRAILER_PLAIN_LEN,
                have: bytes.len(),
            })?;
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        a.copy_from_slice(&bytes[..8]);
        b.copy_from_slice(&bytes[8..]);
        let trailer = Self {
            index_offset: u64::from_le_bytes(a),
            index_len: u64::from_le_bytes(b),
        };
        if trailer.index_len > MAX_INDEX_LEN as u64 {
            return Err(DecodeError::Malformed {
                what,
                reason: format!(
                    "index of {} bytes is over the limit of {MAX_INDEX_LEN} bytes",
                    trailer.index_len
                ),
            });
        }
        // Checked all the way: offset, length and trailer are read from the pack, and a sum
        // that wrapped around would let an index "fit" anywhere.
        let end = trailer
            .index_offset
            .checked_add(trailer.index_len)
            .and_then(|end| end.checked_add(TRAILER_LEN as u64));
        if end.is_none_or(|end| end > pack_len) {
            return Err(DecodeError::Malformed {
                what,
                reason: format!(
                    "index of {} bytes at offset {} and the {TRAILER_LEN}-byte trailer do not fit a pack of {pack_len} bytes",
                    trailer.index_len, trailer.index_offset
                ),
            });
        }
        Ok(trailer)
    }
}

/// How many padding bytes make a pack of `unpadded` bytes (trailer included) a multiple of [`PACK_ALIGN`].
pub fn padding_for(unpadded: u64) -> u64 {
    let rem = unpadded % PACK_ALIGN;
    if rem == 0 { 0 } else { PACK_ALIGN - rem }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn golden_index_bytes() {
        let index = PackIndex {
            entries: vec![PackIndexEntry {
                chunk: ChunkId([1; 32]),
                offset: 0,
                len: 300,
            }],
        };
        let mut expected = vec![1u8];
        expected.extend_from_slice(&[1u8; 32]);
        expected.extend_from_slice(&[0, 0xac, 0x02]);
        assert_eq!(index.to_bytes(), expected);
    }

    #[test]
    fn golden_trailer_bytes() {
        let t = PackTrailer {
            index_offset: 0x0102,
            index_len: 3,
        };
        assert_eq!(
            t.to_bytes(),
            [2, 1, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(PackTrailer::from_bytes(&t.to_bytes(), 1 << 20), Ok(t));
        assert!(PackTrailer::from_bytes(&t.to_bytes(), 100).is_err());
        assert_eq!(TRAILER_LEN, 57);
    }

    #[test]
    fn a_trailer_whose_end_wraps_around_is_refused() {
        // Found by the `pack_index` fuzz target: offset + length + trailer wrapped around u64
        // and "fit" (or overflowed in a debug build).
        let t = PackTrailer {
            index_offset: u64::MAX - 20,
            index_len: 0,
        };
        let err = PackTrailer::from_bytes(&t.to_bytes(), 1 << 20).unwrap_err();
        assert!(
            err.to_string()
                .contains("do not fit a pack of 1048576 bytes"),
            "{err}"
        );
        let big = PackTrailer {
            index_offset: 0,
            index_len: MAX_INDEX_LEN as u64 + 1,
        };
        let err = PackTrailer::from_bytes(&big.to_bytes(), u64::MAX).unwrap_err();
        assert!(err.to_string().contains("over the limit"), "{err}");
    }

    #[test]
    fn padding_reaches_alignment() {
        assert_eq!(padding_for(0), 0);
        assert_eq!(padding_for(1), PACK_ALIGN - 1);
        assert_eq!(padding_for(PACK_ALIGN), 0);
    }

    proptest! {
        #[test]
        fn index_round_trips(entries in proptest::collection::vec((any::<[u8; 32]>(), any::<u32>(), any::<u32>()), 0..50)) {
            let index = PackIndex {
                entries: entries.into_iter().map(|(c, o, l)| PackIndexEntry { chunk: ChunkId(c), offset: o, len: l }).collect(),
            };
            prop_assert_eq!(PackIndex::from_bytes(&index.to_bytes()).unwrap(), index);
        }

        #[test]
        fn trailer_never_points_outside(off in any::<u64>(), len in any::<u64>(), pack_len in any::<u64>()) {
            let t = PackTrailer { index_offset: off, index_len: len };
            if let Ok(t) = PackTrailer::from_bytes(&t.to_bytes(), pack_len) {
                let end = t.index_offset.checked_add(t.index_len).and_then(|e| e.checked_add(TRAILER_LEN as u64));
                prop_assert!(end.is_some_and(|end| end <= pack_len));
            }
        }
    }
}
