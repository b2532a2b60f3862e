//! Records a node keeps in its own redb index (never sent to anyone).

use crate::codec::{DecodeError, decode_versioned, encode_versioned};
use crate::ids::PackId;
use serde::{Deserialize, Serialize};

/// Where a chunk of ours is: its pack, and the sealed chunk's offset and length in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLoc {
    /// The pack.
    pub pack: PackId,
    /// Offset of the sealed chunk.
    pub offset: u32,
    /// Length of the sealed chunk.
    pub len: u32,
}

/// Encoded length of a [`ChunkLoc`].
pub const CHUNK_LOC_LEN: usize = 40;

impl ChunkLoc {
    /// Fixed 40-byte encoding: pack id, then offset and length little-endian.
    pub fn to_bytes(&self) -> [u8; CHUNK_LOC_LEN] {
        let mut out = [0u8; CHUNK_LOC_LEN];
        out[..32].copy_from_slice(self.pack.as_bytes());
        out[32..36].copy_from_slice(&self.offset.to_le_bytes());
        out[36..].copy_from_slice(&self.len.to_le_bytes());
        out
    }
    /// Decodes the fixed encoding.
    pub fn from_bytes(b: &[u8; CHUNK_LOC_LEN]) -> Self {
        let mut pack = [0u8; 32];
        pack.copy_from_slice(&b[..32]);
        let mut off = [0u8; 4];
        off.copy_from_slice(&b[32..36]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&b[36..]);
        Self {
            pack: PackId(pack),
            offset: u32::from_le_bytes(off),
            len: u32::from_le_bytes(len),
        }
    }
}

/// What the node knows of one of its own packs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackRecord {
    /// Length of the sealed pack in bytes.
    pub len: u64,
    /// Number of chunks in it.
    pub chunks: u32,
    /// When it was written, nanoseconds since the Unix epoch.
    pub created_ns: i64,
    /// Whether the pack file is still in the outbox.
    pub in_outbox: bool,
}

impl PackRecord {
    /// Encodes the record.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self)
    }
    /// Decodes the record.
    ///
    /// # Errors
    /// A bounded [`DecodeError`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_versioned("pack record", bytes, 256)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_chunk_loc() {
        let loc = ChunkLoc {
            pack: PackId([3; 32]),
            offset: 1,
            len: 0x0201,
        };
        let b = loc.to_bytes();
        assert_eq!(&b[..32], &[3; 32]);
        assert_eq!(&b[32..], &[1, 0, 0, 0, 1, 2, 0, 0]);
        assert_eq!(ChunkLoc::from_bytes(&b), loc);
    }

    #[test]
    fn golden_pack_record() {
        let r = PackRecord {
            len: 65536,
            chunks: 2,
            created_ns: 1,
            in_outbox: true,
        };
        assert_eq!(r.to_bytes(), vec![1, 0x80, 0x80, 0x04, 2, 2, 1]);
        assert_eq!(PackRecord::from_bytes(&r.to_bytes()).unwrap(), r);
    }
}
