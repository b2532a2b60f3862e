//! Sealed envelopes: the byte layout of everything obnam encrypts.
//!
//! ```text
//! sealed = version (1 byte) ‖ nonce (24 bytes) ‖ XChaCha20-Poly1305 ciphertext ‖ tag (16 bytes)
//! ```
//!
//! - A **sealed chunk** encrypts `compression (1 byte) ‖ data`; its associated data is
//!   `version ‖ chunk id`, so a chunk cannot be passed off as another.
//! - A **sealed blob** (pack index, pack trailer, head body, key slot) uses the same layout with
//!   associated data `version ‖ domain string ‖ context bytes`, one domain per kind of blob.
//!
//! The encryption itself lives in `obnam-node`, the only crate that holds keys.

use crate::codec::{DecodeError, FORMAT_VERSION};
use crate::ids::ChunkId;

/// Length of an XChaCha20-Poly1305 nonce.
pub const NONCE_LEN: usize = 24;
/// Length of a Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed envelope adds around its ciphertext body: version, nonce and tag.
pub const OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;

/// Inner compression byte: the data is stored as is.
pub const COMPRESSION_NONE: u8 = 0;
/// Inner compression byte: the data is a zstd frame.
pub const COMPRESSION_ZSTD: u8 = 1;

/// Domain of the sealed index inside a pack.
pub const DOMAIN_PACK_INDEX: &[u8] = b"obnam pack index";
/// Domain of the sealed trailer at the end of a pack.
pub const DOMAIN_PACK_TRAILER: &[u8] = b"obnam pack trailer";
/// Domain of the sealed body of a head (followed by the owner id and sequence number).
pub const DOMAIN_HEAD_BODY: &[u8] = b"obnam head body";
/// Domain of the wrapped master secret in a key slot.
pub const DOMAIN_KEY_SLOT: &[u8] = b"obnam key slot";

/// The parts of a sealed envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed<'a> {
    /// The random nonce.
    pub nonce: &'a [u8; NONCE_LEN],
    /// Ciphertext followed by the tag.
    pub ciphertext: &'a [u8],
}

impl<'a> Sealed<'a> {
    /// Splits sealed bytes into nonce and ciphertext, checking the version and minimum length.
    ///
    /// # Errors
    /// [`DecodeError::Version`] or [`DecodeError::Truncated`].
    pub fn parse(what: &'static str, bytes: &'a [u8]) -> Result<Self, DecodeError> {
        if bytes.len() < OVERHEAD {
            return Err(DecodeError::Truncated {
                what,
                need: OVERHEAD,
                have: bytes.len(),
            });
        }
        let rest = crate::codec::split_version(what, bytes)?;
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce: &[u8; NONCE_LEN] = nonce.try_into().map_err(|_| DecodeError::Truncated {
            what,
            need: OVERHEAD,
            have: bytes.len(),
        })?;
        Ok(Self { nonce, ciphertext })
    }
}

/// The envelope header: version and nonce. `header ‖ ciphertext ‖ tag` is an envelope.
pub fn header(nonce: &[u8; NONCE_LEN]) -> [u8; 1 + NONCE_LEN] {
    let mut h = [0u8; 1 + NONCE_LEN];
    h[0] = FORMAT_VERSION;
    h[1..].copy_from_slice(nonce);
    h
}

/// Writes the envelope header (version and nonce) in front of `ciphertext`.
pub fn assemble(nonce: &[u8; NONCE_LEN], ciphertext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + NONCE_LEN + ciphertext.len());
    out.push(FORMAT_VERSION);
    out.extend_from_slice(nonce);
    out.extend_from_slice(ciphertext);
    out
}

/// Associated data of a sealed chunk: `version ‖ chunk id`.
pub fn chunk_aad(id: &ChunkId) -> [u8; 33] {
    let mut aad = [0u8; 33];
    aad[0] = FORMAT_VERSION;
    aad[1..].copy_from_slice(id.as_bytes());
    aad
}

/// Associated data of a sealed blob: `version ‖ domain ‖ context`.
pub fn blob_aad(domain: &[u8], context: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(1 + domain.len() + context.len());
    aad.push(FORMAT_VERSION);
    aad.extend_from_slice(domain);
    aad.extend_from_slice(context);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_envelope_layout() {
        let nonce = [7u8; NONCE_LEN];
        let sealed = assemble(&nonce, &[1, 2, 3]);
        let mut expected = vec![1u8];
        expected.extend_from_slice(&[7u8; 24]);
        expected.extend_from_slice(&[1, 2, 3]);
        assert_eq!(sealed, expected);
        // too short for a tag
        assert!(matches!(
            Sealed::parse("chunk", &sealed),
            Err(DecodeError::Truncated { .. })
        ));
        let long = assemble(&nonce, &[9u8; TAG_LEN]);
        let parsed = Sealed::parse("chunk", &long).unwrap();
        assert_eq!(parsed.nonce, &nonce);
        assert_eq!(parsed.ciphertext, &[9u8; TAG_LEN]);
    }

    #[test]
    fn golden_aad() {
        let aad = chunk_aad(&ChunkId([0xee; 32]));
        assert_eq!(aad[0], 1);
        assert_eq!(&aad[1..], &[0xee; 32]);
        assert_eq!(blob_aad(b"ab", b"c"), vec![1, b'a', b'b', b'c']);
    }

    #[test]
    fn other_versions_are_refused() {
        let mut sealed = assemble(&[0; NONCE_LEN], &[0; TAG_LEN]);
        sealed[0] = 2;
        assert_eq!(
            Sealed::parse("chunk", &sealed),
            Err(DecodeError::Version {
                what: "chunk",
                version: 2
            })
        );
    }
}
