//! Identifiers: 32-byte values shown as lowercase hex.
//!
//! - [`ChunkId`]: BLAKE3 keyed hash of a chunk's plaintext, with the owner's secret chunk-id key.
//!   Only the owner can compute one; friends never see them.
//! - [`PackId`]: plain BLAKE3 hash of a sealed pack's bytes. The only id a friend sees, and one it
//!   can verify without a key.
//! - [`SnapshotId`]: the chunk id of a snapshot's sealed record.
//! - [`OwnerId`]: an owner's Ed25519 public key.
//! - [`LookupId`]: where friends file an owner's key slot; derived from the passphrase and name.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The shortest id prefix accepted where a user names a snapshot.
pub const MIN_PREFIX_LEN: usize = 8;

/// Why a string is not an id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{input:?} is not a 64-character hex id")]
pub struct ParseIdError {
    input: String,
}

macro_rules! id32 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub [u8; 32]);

        impl $name {
            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }
            /// Lowercase hex, 64 characters.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
            /// The first 4 bytes as 8 hex characters, for logs and listings.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..4])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out)
                    .map_err(|_| ParseIdError { input: s.to_owned() })?;
                Ok(Self(out))
            }
        }

        impl From<[u8; 32]> for $name {
            fn from(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }
        }
    };
}

id32!(
    /// BLAKE3 keyed hash of a chunk's plaintext (keyed with the owner's chunk-id key).
    ChunkId
);
id32!(
    /// BLAKE3 hash of a sealed pack's bytes; anyone can verify it.
    PackId
);
id32!(
    /// The chunk id of a snapshot's sealed record.
    SnapshotId
);
id32!(
    /// An owner's Ed25519 public key.
    OwnerId
);
id32!(
    /// Where friends file an owner's key slot: derived from the Argon2id output.
    LookupId
);

impl PackId {
    /// The id of a sealed pack: BLAKE3 of its bytes.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }
}

impl From<ChunkId> for SnapshotId {
    fn from(id: ChunkId) -> Self {
        Self(id.0)
    }
}

impl From<SnapshotId> for ChunkId {
    fn from(id: SnapshotId) -> Self {
        Self(id.0)
    }
}

/// Whether `prefix` is an acceptable abbreviation of `id`: at least [`MIN_PREFIX_LEN`]
/// hex characters, matching case-insensitively.
pub fn matches_prefix(id: &SnapshotId, prefix: &str) -> bool {
    prefix.len() >= MIN_PREFIX_LEN
        && prefix.len() <= 64
        && id.to_hex().starts_with(&prefix.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_errors() {
        let id = PackId::of(b"hello");
        assert_eq!(
            id.to_hex(),
            "ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f"
        );
        assert_eq!(id.to_hex().parse::<PackId>(), Ok(id));
        assert!("xyz".parse::<PackId>().is_err());
        assert!(id.to_hex()[..63].parse::<PackId>().is_err());
    }

    #[test]
    fn prefixes_need_eight_characters() {
        let id = SnapshotId([0xab; 32]);
        assert!(matches_prefix(&id, "abababab"));
        assert!(matches_prefix(&id, "ABABABAB"));
        assert!(!matches_prefix(&id, "abababa"));
        assert!(!matches_prefix(&id, "abababac"));
    }
}
