//! The key slot and the key hierarchy's context strings.
//!
//! ```text
//! salt        = BLAKE3(SALT_DOMAIN ‖ owner name)
//! stretched   = Argon2id(passphrase, salt)            parameters fixed by the slot version
//! wrap key    = BLAKE3-derive_key(CTX_WRAP, stretched)
//! lookup id   = BLAKE3-derive_key(CTX_LOOKUP, stretched)
//! slot        = version ‖ sealed(master secret) under the wrap key, domain DOMAIN_KEY_SLOT
//! chunk-id key, data key, gear seed, owner signing key = BLAKE3-derive_key(CTX_*, master secret)
//! ```
//!
//! The node key (the libp2p identity) is separate and random per machine; it is never derived
//! from these.

use crate::codec::{DecodeError, decode_versioned, encode_versioned};
use serde::{Deserialize, Serialize};

/// The current slot version.
pub const SLOT_VERSION: u8 = 1;
/// Domain of the Argon2id salt.
pub const SALT_DOMAIN: &[u8] = b"obnam key slot v1 salt\0";
/// derive_key context: the key that wraps the master secret.
pub const CTX_WRAP: &str = "obnam 2026-11 key slot v1 wrapping key";
/// derive_key context: the lookup id under which friends file the slot.
pub const CTX_LOOKUP: &str = "obnam 2026-11 key slot v1 lookup id";
/// derive_key context: the keyed-hash key for chunk ids.
pub const CTX_CHUNK_ID: &str = "obnam 2026-11 chunk id key v1";
/// derive_key context: the XChaCha20-Poly1305 key for chunks and blobs.
pub const CTX_DATA: &str = "obnam 2026-11 data encryption key v1";
/// derive_key context: the FastCDC gear seed (first 8 bytes, little-endian).
pub const CTX_GEAR: &str = "obnam 2026-11 fastcdc gear seed v1";
/// derive_key context: the Ed25519 owner signing key.
pub const CTX_OWNER: &str = "obnam 2026-11 owner signing key v1";
/// Length of the master secret.
pub const MASTER_LEN: usize = 32;

/// Argon2id cost parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Params {
    /// Memory in KiB.
    pub m_kib: u32,
    /// Iterations.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

/// The Argon2id parameters of a slot version. They are fixed per version, never read from a
/// slot, so a slot served by someone else cannot lower the cost.
pub fn argon2_params(version: u8) -> Option<Argon2Params> {
    match version {
        1 => Some(Argon2Params {
            m_kib: 256 * 1024,
            t: 4,
            p: 1,
        }),
        _ => None,
    }
}

/// The Argon2id salt for an owner name.
pub fn salt(owner_name: &str) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(SALT_DOMAIN);
    h.update(owner_name.as_bytes());
    *h.finalize().as_bytes()
}

/// A wrapped master secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySlot {
    /// The slot version; it fixes the Argon2id parameters.
    pub version: u8,
    /// The sealed master secret (an envelope, see [`crate::envelope`]).
    #[serde(with = "serde_bytes")]
    pub sealed_secret: Vec<u8>,
}

impl KeySlot {
    /// Encodes the slot.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self)
    }
    /// Decodes a slot and checks that its version is known.
    ///
    /// # Errors
    /// A bounded [`DecodeError`], or `Version` for an unknown slot version.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let slot: KeySlot = decode_versioned("key slot", bytes, 1024)?;
        if argon2_params(slot.version).is_none() {
            return Err(DecodeError::Version {
                what: "key slot",
                version: slot.version,
            });
        }
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_salt_and_slot() {
        assert_eq!(
            hex::encode(salt("alice")),
            hex::encode(blake3::hash(b"obnam key slot v1 salt\0alice").as_bytes())
        );
        let slot = KeySlot {
            version: 1,
            sealed_secret: vec![9, 9],
        };
        assert_eq!(slot.to_bytes(), vec![1, 1, 2, 9, 9]);
        assert_eq!(KeySlot::from_bytes(&slot.to_bytes()).unwrap(), slot);
        let bad = KeySlot {
            version: 7,
            sealed_secret: vec![],
        };
        assert!(matches!(
            KeySlot::from_bytes(&bad.to_bytes()),
            Err(DecodeError::Version { version: 7, .. })
        ));
    }

    #[test]
    fn contexts_are_distinct() {
        let all = [
            CTX_WRAP,
            CTX_LOOKUP,
            CTX_CHUNK_ID,
            CTX_DATA,
            CTX_GEAR,
            CTX_OWNER,
        ];
        let set: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(set.len(), all.len());
    }
}

/// The secrets file of a node: what lets scheduled backups run without the passphrase.
/// Stored with mode 0400; nodes refuse it when group or others may read it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretsFile {
    /// The owner name.
    pub name: String,
    /// The master secret.
    #[serde(with = "serde_bytes")]
    pub master: Vec<u8>,
    /// The encoded key slot.
    #[serde(with = "serde_bytes")]
    pub slot: Vec<u8>,
    /// The lookup id under which friends file the slot.
    pub lookup: crate::ids::LookupId,
}

impl std::fmt::Debug for SecretsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretsFile")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl SecretsFile {
    /// Encodes the file.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode_versioned(self)
    }
    /// Decodes the file.
    ///
    /// # Errors
    /// A bounded [`DecodeError`], or `Malformed` for a master secret of the wrong length.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let f: SecretsFile = decode_versioned("secrets file", bytes, 4096)?;
        if f.master.len() != MASTER_LEN {
            return Err(DecodeError::Malformed {
                what: "secrets file",
                reason: "master secret is not 32 bytes".into(),
            });
        }
        Ok(f)
    }
}

#[cfg(test)]
mod secrets_tests {
    use super::*;

    #[test]
    fn golden_secrets_file() {
        let f = SecretsFile {
            name: "a".into(),
            master: vec![3; 32],
            slot: vec![4],
            lookup: crate::ids::LookupId([5; 32]),
        };
        let b = f.to_bytes();
        assert_eq!(&b[..4], &[1, 1, b'a', 32]);
        assert_eq!(&b[36..38], &[1, 4]);
        assert_eq!(&b[38..], &[5; 32]);
        assert_eq!(SecretsFile::from_bytes(&b).unwrap(), f);
        let short = SecretsFile {
            master: vec![1; 5],
            ..f
        };
        assert!(SecretsFile::from_bytes(&short.to_bytes()).is_err());
    }
}
