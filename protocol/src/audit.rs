//! Audits: a friend proves that it still holds a pack, and the owner checks the proof with
//! nothing but the pack id and the pack's length.
//!
//! A pack id is the plain BLAKE3 hash of the pack ([`PackId::of`]). BLAKE3 is a Merkle tree, so
//! a holder can prove any byte range against the root hash with the range's bytes and the
//! sibling hashes on the way up (BLAKE3 "verified streaming"). The encoding is that of the
//! `bao-tree` crate with [`AUDIT_BLOCK`] (4 KiB) leaves:
//!
//! ```text
//! proof = the bao-tree encoding of the chunk ranges that cover [offset, offset + len),
//!         for a tree of the pack's length (not sent: the owner knows it)
//! ```
//!
//! A challenge ([`Challenge`]) names a pack, a range of [`MIN_RANGE`] to [`MAX_RANGE`] bytes chosen
//! at random by the owner, and a fresh nonce that the answer echoes. The proof is at most
//! [`MAX_PROOF`] bytes: two 4 KiB leaves and two paths of at most 14 parent pairs for a pack of
//! [`MAX_PACK_LEN`] bytes.
//!
//! What an audit shows: that the friend could read those bytes of that pack when asked. Ranges
//! are random, so a friend that kept a fraction `h` of a pack passes `c` challenges with
//! probability about `h^c`. What it does not show: that the friend will still hold the pack
//! tomorrow. Audits run on a schedule for that reason.

use crate::PackId;
use crate::pack::MAX_PACK_LEN;
use bao_tree::io::outboard::PreOrderOutboard;
use bao_tree::io::sync::{CreateOutboard, DecodeResponseIter, ReadAt, encode_ranges_validated};
use bao_tree::io::{BaoContentItem, round_up_to_chunks};
use bao_tree::{BaoTree, BlockSize, ByteRanges, ChunkRanges};
use serde::{Deserialize, Serialize};

/// Leaf size of audit proofs: 4 KiB (4 BLAKE3 chunks).
pub const AUDIT_BLOCK: BlockSize = BlockSize::from_chunk_log(2);
/// The shortest challenged range (shorter only for a shorter pack).
pub const MIN_RANGE: u32 = 1024;
/// The longest challenged range.
pub const MAX_RANGE: u32 = 4096;
/// The largest proof accepted.
pub const MAX_PROOF: usize = 16 * 1024;

/// What the owner asks a friend to prove.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// The pack.
    pub pack: PackId,
    /// The first byte of the range.
    pub offset: u64,
    /// The range's length, [`MIN_RANGE`] to [`MAX_RANGE`].
    pub len: u32,
    /// Fresh randomness; the answer echoes it.
    pub nonce: [u8; 32],
}

/// Why an audit proof is refused or could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuditError {
    /// The challenge does not fit the pack.
    #[error(
        "challenge of {len} bytes at offset {offset} does not fit a pack of {size} bytes (ranges are {MIN_RANGE}-{MAX_RANGE} bytes)"
    )]
    BadRange {
        /// Challenged offset.
        offset: u64,
        /// Challenged length.
        len: u32,
        /// The pack's length.
        size: u64,
    },
    /// The proof is larger than [`MAX_PROOF`].
    #[error("proof of {0} bytes is over the limit of {MAX_PROOF}")]
    TooLarge(usize),
    /// The proof does not verify against the pack id.
    #[error("proof does not verify against pack {pack}: {reason}")]
    Invalid {
        /// The pack.
        pack: PackId,
        /// What failed.
        reason: String,
    },
    /// The stored bytes do not hash to the pack id: the holder's copy is corrupt.
    #[error("stored pack {expected} hashes to {actual}: the copy is corrupt")]
    Corrupt {
        /// The pack id.
        expected: PackId,
        /// What the stored bytes hash to.
        actual: PackId,
    },
    /// Reading the pack failed.
    #[error("reading pack {pack}: {reason}")]
    Io {
        /// The pack.
        pack: PackId,
        /// The I/O error.
        reason: String,
    },
}

impl Challenge {
    /// Checks that the challenge fits a pack of `size` bytes.
    ///
    /// # Errors
    /// [`AuditError::BadRange`].
    pub fn check(&self, size: u64) -> Result<(), AuditError> {
        let min = u64::from(MIN_RANGE).min(size);
        let len = u64::from(self.len);
        if size == 0
            || size > MAX_PACK_LEN
            || len < min.max(1)
            || self.len > MAX_RANGE
            || self.offset.checked_add(len).is_none_or(|end| end > size)
        {
            return Err(AuditError::BadRange {
                offset: self.offset,
                len: self.len,
                size,
            });
        }
        Ok(())
    }

    /// A challenge of a random range of a pack of `size` bytes. `random` supplies the
    /// randomness (8 bytes for the range, 32 for the nonce), so callers choose the generator and
    /// simulations stay deterministic.
    pub fn random(pack: PackId, size: u64, random: &[u8; 40]) -> Self {
        let mut r = [0u8; 8];
        r.copy_from_slice(&random[..8]);
        let r = u64::from_le_bytes(r);
        let span = u64::from(MAX_RANGE - MIN_RANGE) + 1;
        let len = (u64::from(MIN_RANGE) + r % span).min(size);
        let offset = (r >> 16) % (size - len + 1).max(1);
        let mut nonce = [0u8; 32];
        nonce.copy_from_slice(&random[8..]);
        Self {
            pack,
            offset,
            len: u32::try_from(len).unwrap_or(MIN_RANGE),
            nonce,
        }
    }

    fn ranges(&self) -> ChunkRanges {
        round_up_to_chunks(&ByteRanges::from(
            self.offset..self.offset + u64::from(self.len),
        ))
    }
}

/// Proves a challenge from a stored pack of `size` bytes: `data` is read whole once (to build
/// the hash tree, checking that the pack still hashes to its id), then the challenged leaves are
/// read again at their offsets. Memory: 64 bytes per 4 KiB of pack, plus the proof.
///
/// # Errors
/// [`AuditError::Corrupt`] when the stored bytes no longer hash to the pack id,
/// [`AuditError::BadRange`] and [`AuditError::Io`].
pub fn prove<D: std::io::Read, R: ReadAt>(
    challenge: &Challenge,
    size: u64,
    data: D,
    read_at: R,
) -> Result<Vec<u8>, AuditError> {
    challenge.check(size)?;
    let io = |e: &dyn std::fmt::Display| AuditError::Io {
        pack: challenge.pack,
        reason: e.to_string(),
    };
    let outboard =
        PreOrderOutboard::<Vec<u8>>::create_sized(data, size, AUDIT_BLOCK).map_err(|e| io(&e))?;
    let actual = PackId(*outboard.root.as_bytes());
    if actual != challenge.pack {
        return Err(AuditError::Corrupt {
            expected: challenge.pack,
            actual,
        });
    }
    let mut proof = Vec::new();
    encode_ranges_validated(read_at, &outboard, &challenge.ranges(), &mut proof)
        .map_err(|e| io(&e))?;
    if proof.len() > MAX_PROOF {
        return Err(AuditError::TooLarge(proof.len()));
    }
    Ok(proof)
}

/// Verifies a proof for a challenge of a pack of `size` bytes, using only the pack id. Returns
/// the challenged bytes.
///
/// # Errors
/// [`AuditError::BadRange`], [`AuditError::TooLarge`] and [`AuditError::Invalid`].
pub fn verify(challenge: &Challenge, size: u64, proof: &[u8]) -> Result<Vec<u8>, AuditError> {
    challenge.check(size)?;
    if proof.len() > MAX_PROOF {
        return Err(AuditError::TooLarge(proof.len()));
    }
    let invalid = |reason: String| AuditError::Invalid {
        pack: challenge.pack,
        reason,
    };
    let root = bao_tree::blake3::Hash::from_bytes(*challenge.pack.as_bytes());
    let ranges = challenge.ranges();
    let tree = BaoTree::new(size, AUDIT_BLOCK);
    let mut reader = std::io::Cursor::new(proof);
    let start = challenge.offset;
    let end = start + u64::from(challenge.len);
    let mut out = vec![0u8; challenge.len as usize];
    let mut covered = 0u64;
    for item in DecodeResponseIter::new(root, tree, &mut reader, &ranges) {
        let item = item.map_err(|e| invalid(e.to_string()))?;
        if let BaoContentItem::Leaf(leaf) = item {
            let leaf_end = leaf.offset + leaf.data.len() as u64;
            let (from, to) = (leaf.offset.max(start), leaf_end.min(end));
            if from < to {
                let src = &leaf.data[(from - leaf.offset) as usize..(to - leaf.offset) as usize];
                out[(from - start) as usize..(to - start) as usize].copy_from_slice(src);
                covered += to - from;
            }
        }
    }
    if covered != u64::from(challenge.len) {
        return Err(invalid(format!(
            "it covers {covered} of the {} challenged bytes",
            challenge.len
        )));
    }
    if reader.position() != proof.len() as u64 {
        return Err(invalid(format!(
            "{} bytes follow the proof",
            proof.len() as u64 - reader.position()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pack(len: usize, seed: u8) -> Vec<u8> {
        let mut data = vec![0u8; len];
        let mut x = blake3::Hasher::new();
        x.update(&[seed]);
        x.finalize_xof().fill(&mut data);
        data
    }

    fn challenge(data: &[u8], offset: u64, len: u32) -> Challenge {
        Challenge {
            pack: PackId::of(data),
            offset,
            len,
            nonce: [7; 32],
        }
    }

    fn prove_mem(c: &Challenge, data: &[u8]) -> Result<Vec<u8>, AuditError> {
        prove(c, data.len() as u64, data, data)
    }

    #[test]
    fn a_proof_verifies_and_yields_the_challenged_bytes() {
        let data = pack(1 << 20, 1);
        for (offset, len) in [
            (0, 1024),
            (4095, 4096),
            (12_345, 2000),
            ((1 << 20) - 4096, 4096),
        ] {
            let c = challenge(&data, offset, len);
            let proof = prove_mem(&c, &data).unwrap();
            assert!(proof.len() <= MAX_PROOF, "{}", proof.len());
            let got = verify(&c, data.len() as u64, &proof).unwrap();
            assert_eq!(got, &data[offset as usize..offset as usize + len as usize]);
        }
    }

    #[test]
    fn proofs_stay_small_for_the_largest_pack() {
        let data = pack(MAX_PACK_LEN as usize, 2);
        let c = challenge(&data, 7 * 1024 * 1024 + 3000, MAX_RANGE);
        let proof = prove_mem(&c, &data).unwrap();
        assert!(proof.len() <= MAX_PROOF, "{}", proof.len());
        verify(&c, data.len() as u64, &proof).unwrap();
    }

    #[test]
    fn a_corrupt_copy_is_found_by_the_holder() {
        let data = pack(300_000, 3);
        let c = challenge(&data, 0, 1024);
        let mut bad = data.clone();
        bad[200_000] ^= 1;
        assert!(matches!(
            prove(&c, bad.len() as u64, &bad[..], &bad[..]),
            Err(AuditError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_tampered_or_foreign_proof_is_refused() {
        let data = pack(300_000, 4);
        let c = challenge(&data, 100_000, 3000);
        let proof = prove_mem(&c, &data).unwrap();
        // Any flipped bit fails, in leaves and in parents.
        for i in (0..proof.len()).step_by(97) {
            let mut p = proof.clone();
            p[i] ^= 0x10;
            assert!(
                matches!(verify(&c, 300_000, &p), Err(AuditError::Invalid { .. })),
                "flip at {i}"
            );
        }
        // Truncated, extended, for another range, for another pack.
        assert!(verify(&c, 300_000, &proof[..proof.len() - 1]).is_err());
        let mut longer = proof.clone();
        longer.push(0);
        assert!(verify(&c, 300_000, &longer).is_err());
        let other_range = challenge(&data, 200_000, 3000);
        assert!(verify(&other_range, 300_000, &proof).is_err());
        let other = pack(300_000, 5);
        let foreign = prove_mem(&challenge(&other, 100_000, 3000), &other).unwrap();
        assert!(verify(&c, 300_000, &foreign).is_err());
        assert!(verify(&c, 300_000, &[]).is_err());
    }

    #[test]
    fn ranges_must_fit_the_pack() {
        let c = |offset, len| Challenge {
            pack: PackId([0; 32]),
            offset,
            len,
            nonce: [0; 32],
        };
        assert!(c(0, 1024).check(1024).is_ok());
        assert!(c(1, 1024).check(1024).is_err());
        assert!(c(0, 1023).check(4096).is_err());
        assert!(c(0, 4097).check(1 << 20).is_err());
        assert!(c(u64::MAX, 1024).check(1 << 20).is_err());
        assert!(c(0, 100).check(100).is_ok());
        assert!(c(0, 100).check(0).is_err());
        assert!(c(0, 1024).check(MAX_PACK_LEN + 1).is_err());
    }

    proptest! {
        #[test]
        fn random_challenges_fit_and_verify(r in any::<[u8; 32]>(), r2 in any::<[u8; 8]>(), size in 1usize..200_000) {
            let data = pack(size, 9);
            let mut random = [0u8; 40];
            random[..8].copy_from_slice(&r2);
            random[8..].copy_from_slice(&r);
            let c = Challenge::random(PackId::of(&data), size as u64, &random);
            prop_assert!(c.check(size as u64).is_ok());
            let proof = prove_mem(&c, &data).unwrap();
            prop_assert_eq!(
                verify(&c, size as u64, &proof).unwrap(),
                data[c.offset as usize..c.offset as usize + c.len as usize].to_vec()
            );
        }

        #[test]
        fn garbage_proofs_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..20_000)) {
            let c = Challenge { pack: PackId([1; 32]), offset: 5000, len: 2000, nonce: [0; 32] };
            prop_assert!(verify(&c, 1 << 20, &bytes).is_err());
        }
    }
}
