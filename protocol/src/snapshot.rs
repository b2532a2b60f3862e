//! Snapshot records and the owner's head.
//!
//! - A [`SnapshotRecord`] describes one backup: when, where, what, and the root tree's chunks.
//!   It is encoded, then sealed as a chunk; its chunk id is the [`SnapshotId`].
//! - The [`Head`] is the owner's signed, hash-chained pointer to everything: a sequence number,
//!   the hash of the previous signed head, and a sealed [`HeadBody`] listing the snapshots, the
//!   friends and the chunker parameters. A [`SignedHead`] carries it with an Ed25519 signature in
//!   the context [`CONTEXT_HEAD`](crate::signed::CONTEXT_HEAD).

use crate::codec::{DecodeError, decode_versioned, encode_versioned};
use crate::ids::{ChunkId, OwnerId, SnapshotId};
use crate::signed::{self, CONTEXT_HEAD, SIGNATURE_LEN, SignatureError};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// The largest encoded snapshot record accepted.
pub const MAX_SNAPSHOT_LEN: usize = 1024 * 1024;
/// The largest encoded head body accepted.
pub const MAX_HEAD_BODY_LEN: usize = 64 * 1024 * 1024;
/// The largest encoded signed head accepted.
pub const MAX_HEAD_LEN: usize = MAX_HEAD_BODY_LEN + 1024;

/// How files are cut into chunks. Recorded in every snapshot and in the head, and read from
/// there, so that boundaries never change silently. The gear seed is secret and not recorded:
/// it is derived from the master secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    /// 1 = FastCDC v2020 with a keyed gear table (`with_level_and_seed`).
    pub version: u8,
    /// Minimum chunk size in bytes.
    pub min: u32,
    /// Average chunk size in bytes.
    pub avg: u32,
    /// Maximum chunk size in bytes.
    pub max: u32,
    /// FastCDC normalization level.
    pub level: u8,
}

impl ChunkerParams {
    /// The parameters of chunker version 1: FastCDC v2020, 256 KiB / 1 MiB / 4 MiB, level 1.
    pub const V1: ChunkerParams = ChunkerParams {
        version: 1,
        min: 256 * 1024,
        avg: 1024 * 1024,
        max: 4 * 1024 * 1024,
        level: 1,
    };

    /// What a new owner gets: chunker version 1 with 128 KiB / 512 KiB / 2 MiB. Chosen with
    /// `bench/tune` (docs/performance.md): on the medium dataset it stores 4% less than
    /// [`ChunkerParams::V1`]'s sizes, and 14% less after a 1% mutation, at the same chunking
    /// rate. An owner keeps the sizes its head names, so its cut points never change.
    pub const DEFAULT: ChunkerParams = ChunkerParams {
        version: 1,
        min: 128 * 1024,
        avg: 512 * 1024,
        max: 2 * 1024 * 1024,
        level: 1,
    };
}

/// One backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// When the backup started, nanoseconds since the Unix epoch.
    pub time_ns: i64,
    /// The host name of the machine backed up.
    pub host: String,
    /// The absolute paths backed up, as bytes.
    pub paths: Vec<ByteBuf>,
    /// User tags.
    pub tags: Vec<String>,
    /// Chunks of the encoded root tree (the file system root `/`).
    pub root: Vec<ChunkId>,
    /// Regular files in the snapshot.
    pub files: u64,
    /// Directories in the snapshot.
    pub dirs: u64,
    /// Plaintext bytes of the snapshot's regular files.
    pub bytes: u64,
    /// Files that could not be read and were skipped.
    pub failed_files: u64,
    /// The chunker that cut this snapshot.
    pub chunker: ChunkerParams,
}

impl SnapshotRecord {
    /// Encodes the record behind a version byte.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self)
    }
    /// Decodes a record.
    ///
    /// # Errors
    /// A bounded [`DecodeError`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_versioned("snapshot record", bytes, MAX_SNAPSHOT_LEN)
    }
    /// The paths as lossy text, for display.
    pub fn paths_lossy(&self) -> Vec<String> {
        self.paths
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect()
    }
}

/// A friend as remembered in the head, so a recovered node can find the owner's friends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FriendRecord {
    /// The friend's libp2p peer id, as bytes.
    #[serde(with = "serde_bytes")]
    pub peer_id: Vec<u8>,
    /// A display name.
    pub name: String,
    /// Its last known addresses, as multiaddr bytes.
    pub addrs: Vec<ByteBuf>,
}

/// A snapshot as listed in the head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    /// The snapshot id.
    pub id: SnapshotId,
    /// Its record.
    pub record: SnapshotRecord,
}

/// The sealed part of a head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadBody {
    /// Every snapshot, oldest first.
    pub snapshots: Vec<SnapshotEntry>,
    /// The owner's friends.
    pub friends: Vec<FriendRecord>,
    /// The chunker in force for new backups.
    pub chunker: ChunkerParams,
}

impl HeadBody {
    /// Encodes the body (before sealing).
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self)
    }
    /// Decodes a body (after opening).
    ///
    /// # Errors
    /// A bounded [`DecodeError`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_versioned("head body", bytes, MAX_HEAD_BODY_LEN)
    }
}

/// The signed part of a head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// The owner.
    pub owner: OwnerId,
    /// Sequence number, strictly increasing per owner.
    pub seq: u64,
    /// BLAKE3 of the previous [`SignedHead`]'s bytes, or `None` for the first head.
    pub prev: Option<[u8; 32]>,
    /// The sealed [`HeadBody`].
    #[serde(with = "serde_bytes")]
    pub sealed_body: Vec<u8>,
}

impl Head {
    /// The associated-data context of this head's sealed body: owner id ‖ sequence (LE).
    pub fn body_context(owner: &OwnerId, seq: u64) -> Vec<u8> {
        let mut ctx = owner.as_bytes().to_vec();
        ctx.extend_from_slice(&seq.to_le_bytes());
        ctx
    }
    /// Encodes the head (the bytes that are signed).
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self)
    }
}

/// A head with its signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHead {
    /// The encoded [`Head`].
    #[serde(with = "serde_bytes")]
    pub head: Vec<u8>,
    /// Ed25519 signature of `head` under [`CONTEXT_HEAD`].
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Why a signed head was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum HeadError {
    /// The bytes are not a head.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The signature does not verify.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// The head names another owner.
    #[error("head is for owner {found}, expected {expected}")]
    WrongOwner {
        /// The expected owner.
        expected: OwnerId,
        /// The owner named in the head.
        found: OwnerId,
    },
}

impl SignedHead {
    /// Encodes the signed head.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self)
    }

    /// The hash that the next head's `prev` names.
    pub fn hash(&self) -> [u8; 32] {
        *blake3::hash(&self.to_bytes()).as_bytes()
    }

    /// Decodes a signed head and verifies it is signed by `owner`.
    ///
    /// # Errors
    /// [`HeadError`] for malformed bytes, another owner, or a bad signature.
    pub fn verify(bytes: &[u8], owner: &OwnerId) -> Result<(SignedHead, Head), HeadError> {
        let signed: SignedHead = decode_versioned("signed head", bytes, MAX_HEAD_LEN)?;
        let head: Head = decode_versioned("head", &signed.head, MAX_HEAD_LEN)?;
        if head.owner != *owner {
            return Err(HeadError::WrongOwner {
                expected: *owner,
                found: head.owner,
            });
        }
        let sig: [u8; SIGNATURE_LEN] =
            signed
                .signature
                .as_slice()
                .try_into()
                .map_err(|_| DecodeError::Malformed {
                    what: "signed head",
                    reason: "signature is not 64 bytes".into(),
                })?;
        signed::verify(owner, CONTEXT_HEAD, &signed.head, &sig)?;
        Ok((signed, head))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record() -> SnapshotRecord {
        SnapshotRecord {
            time_ns: 1_700_000_000_000_000_000,
            host: "h".into(),
            paths: vec![ByteBuf::from(b"/x".to_vec())],
            tags: vec!["t".into()],
            root: vec![ChunkId([2; 32])],
            files: 1,
            dirs: 2,
            bytes: 3,
            failed_files: 0,
            chunker: ChunkerParams::V1,
        }
    }

    #[test]
    fn golden_snapshot_record() {
        let bytes = record().to_bytes();
        let expected = concat!(
            "01",                 // version
            "8080d0e2c6bfce972f", // time (zigzag varint)
            "0168",               // host "h"
            "01022f78",           // paths ["/x"]
            "010174",             // tags ["t"]
            "01",
            "0202020202020202020202020202020202020202020202020202020202020202",
            "01",
            "02",
            "03",
            "00", // files dirs bytes failed
            "01",
            "808010",
            "808040",
            "80808002",
            "01" // chunker v1
        );
        assert_eq!(hex::encode(&bytes), expected);
        assert_eq!(SnapshotRecord::from_bytes(&bytes).unwrap(), record());
    }

    proptest! {
        #[test]
        fn records_round_trip(time_ns in any::<i64>(), host in ".{0,20}", files in any::<u64>(), tags in proptest::collection::vec(".{0,8}", 0..4)) {
            let r = SnapshotRecord { time_ns, host, files, tags, ..record() };
            prop_assert_eq!(SnapshotRecord::from_bytes(&r.to_bytes()).unwrap(), r);
        }

        #[test]
        fn head_bodies_round_trip(n in 0usize..5, name in ".{0,10}") {
            let body = HeadBody {
                snapshots: (0..n).map(|i| SnapshotEntry { id: SnapshotId([i as u8; 32]), record: record() }).collect(),
                friends: vec![FriendRecord { peer_id: vec![1, 2], name, addrs: vec![ByteBuf::from(vec![4u8])] }],
                chunker: ChunkerParams::V1,
            };
            prop_assert_eq!(HeadBody::from_bytes(&body.to_bytes()).unwrap(), body);
        }
    }
}

#[cfg(test)]
mod head_tests {
    use super::*;
    use crate::signed::{CONTEXT_TAKEOVER, message};
    use ed25519_dalek::{Signer, SigningKey};

    fn key(b: u8) -> (SigningKey, OwnerId) {
        let k = SigningKey::from_bytes(&[b; 32]);
        let id = OwnerId(k.verifying_key().to_bytes());
        (k, id)
    }

    fn signed(k: &SigningKey, owner: OwnerId, seq: u64, context: &str) -> SignedHead {
        let head = Head {
            owner,
            seq,
            prev: Some([9; 32]),
            sealed_body: vec![1, 2, 3],
        }
        .to_bytes();
        let signature = k.sign(&message(context, &head)).to_bytes().to_vec();
        SignedHead { head, signature }
    }

    #[test]
    fn golden_head_bytes() {
        let (_, owner) = key(1);
        let head = Head {
            owner,
            seq: 2,
            prev: None,
            sealed_body: vec![0xaa],
        };
        let mut expected = vec![1u8];
        expected.extend_from_slice(owner.as_bytes());
        expected.extend_from_slice(&[2, 0, 1, 0xaa]);
        assert_eq!(head.to_bytes(), expected);
    }

    #[test]
    fn heads_verify_only_for_their_owner_and_context() {
        let (k, owner) = key(1);
        let (k2, owner2) = key(2);
        let good = signed(&k, owner, 5, CONTEXT_HEAD);
        let (_, head) = SignedHead::verify(&good.to_bytes(), &owner).unwrap();
        assert_eq!(head.seq, 5);
        assert_eq!(head.prev, Some([9; 32]));

        // Another owner's key.
        assert!(matches!(
            SignedHead::verify(&good.to_bytes(), &owner2),
            Err(HeadError::WrongOwner { .. })
        ));
        // Forged: signed by someone else, claiming to be the owner.
        let forged = signed(&k2, owner, 5, CONTEXT_HEAD);
        assert!(matches!(
            SignedHead::verify(&forged.to_bytes(), &owner),
            Err(HeadError::Signature(_))
        ));
        // Cross-context: a valid signature of another kind of statement.
        let cross = signed(&k, owner, 5, CONTEXT_TAKEOVER);
        assert!(matches!(
            SignedHead::verify(&cross.to_bytes(), &owner),
            Err(HeadError::Signature(_))
        ));
        // Tampered sequence number.
        let mut tampered = good.clone();
        let last = tampered.head.len() - 1;
        tampered.head[last] ^= 1;
        assert!(SignedHead::verify(&tampered.to_bytes(), &owner).is_err());
        // Garbage and truncation.
        assert!(matches!(
            SignedHead::verify(&[1, 2, 3], &owner),
            Err(HeadError::Decode(_))
        ));
        let bytes = good.to_bytes();
        assert!(SignedHead::verify(&bytes[..bytes.len() - 1], &owner).is_err());
        // The chain hash changes with any byte.
        assert_ne!(good.hash(), forged.hash());
    }
}
