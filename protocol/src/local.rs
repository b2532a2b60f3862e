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

/// A friend, as this node remembers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Friend {
    /// The friend's peer id, as bytes.
    #[serde(with = "serde_bytes")]
    pub peer_id: Vec<u8>,
    /// A display name.
    pub name: String,
    /// Household: replicas prefer friends in different households.
    pub household: String,
    /// Known addresses, as multiaddr bytes.
    pub addrs: Vec<serde_bytes::ByteBuf>,
    /// Bytes this node grants the friend.
    pub quota_given: u64,
    /// When the friend was added.
    pub added_ns: i64,
}

impl Friend {
    /// Encodes the record.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self)
    }
    /// Decodes the record.
    ///
    /// # Errors
    /// A bounded [`DecodeError`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_versioned("friend record", bytes, 64 * 1024)
    }
}

/// An owner whose data this node hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostedOwner {
    /// The node (peer id bytes) that proved the owner key and may read and write.
    #[serde(with = "serde_bytes")]
    pub bound_peer: Vec<u8>,
    /// Logical bytes of the owner's packs stored here.
    pub used: u64,
    /// Packs stored.
    pub packs: u64,
}

impl HostedOwner {
    /// Encodes the record.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self)
    }
    /// Decodes the record.
    ///
    /// # Errors
    /// A bounded [`DecodeError`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_versioned("hosted owner", bytes, 1024)
    }
}

/// What this node has sent a friend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PeerState {
    /// Sequence number of our head that the friend holds.
    pub head_seq: u64,
    /// Whether the friend holds our current key slot.
    pub slot_pushed: bool,
    /// Whether the friend refused a pack for lack of quota.
    pub quota_refused: bool,
    /// Bytes of our packs the friend holds.
    pub used_by_us: u64,
}

impl PeerState {
    /// Encodes the record.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self)
    }
    /// Decodes the record.
    ///
    /// # Errors
    /// A bounded [`DecodeError`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_versioned("peer state", bytes, 1024)
    }
}

#[cfg(test)]
mod friend_tests {
    use super::*;

    #[test]
    fn golden_friend_and_owner_records() {
        let f = Friend {
            peer_id: vec![1, 2],
            name: "b".into(),
            household: "h".into(),
            addrs: vec![],
            quota_given: 1,
            added_ns: 0,
        };
        assert_eq!(f.to_bytes(), vec![1, 2, 1, 2, 1, b'b', 1, b'h', 0, 1, 0]);
        assert_eq!(Friend::from_bytes(&f.to_bytes()).unwrap(), f);
        let o = HostedOwner {
            bound_peer: vec![9],
            used: 2,
            packs: 1,
        };
        assert_eq!(o.to_bytes(), vec![1, 1, 9, 2, 1]);
        let s = PeerState {
            head_seq: 3,
            slot_pushed: true,
            quota_refused: false,
            used_by_us: 0,
        };
        assert_eq!(s.to_bytes(), vec![1, 3, 1, 0, 0]);
    }
}
