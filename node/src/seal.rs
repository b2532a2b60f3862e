//! Sealing and opening: zstd, then XChaCha20-Poly1305, in the envelopes of
//! [`obnam_protocol::envelope`]. Synchronous and CPU-bound: call from worker threads only.

use crate::error::NodeError;
use crate::keys::Keys;
use chacha20poly1305::XNonce;
use chacha20poly1305::aead::{Aead, AeadInOut, Payload};
use obnam_protocol::ChunkId;
use obnam_protocol::envelope::{self, COMPRESSION_NONE, COMPRESSION_ZSTD, NONCE_LEN, Sealed};

/// The largest plaintext chunk: the chunker's maximum.
pub const MAX_CHUNK: usize = 4 * 1024 * 1024;

thread_local! {
    /// One zstd compression context per thread and level: creating one per chunk showed up in
    /// profiles.
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    /// One zstd decompression context per thread.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// zstd-compresses `plain` at `level` into `out` (after what is there), with this thread's
/// context. Returns false, leaving `out` as it was, when the result would not be smaller.
fn compress_into(plain: &[u8], level: i32, out: &mut Vec<u8>) -> bool {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = zstd::bulk::Compressor::new(level).ok().map(|c| (level, c));
        }
        let Some((_, c)) = slot.as_mut() else {
            return false;
        };
        // zstd writes into the spare capacity after `start` (not zeroed first: the zero-fill
        // showed up in profiles); a result that is not smaller than the input is dropped.
        let start = out.len();
        out.reserve(plain.len());
        let mut cursor = std::io::Cursor::new(std::mem::take(out));
        cursor.set_position(start as u64);
        let result = c.compress_to_buffer(plain, &mut cursor);
        *out = cursor.into_inner();
        match result {
            Ok(n) if n < plain.len() => true,
            _ => {
                out.truncate(start);
                false
            }
        }
    })
}

/// zstd-decompresses `data` (at most [`MAX_CHUNK`] bytes of output) with this thread's context.
fn decompress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new()?);
        }
        match slot.as_mut() {
            Some(d) => d.decompress(data, MAX_CHUNK),
            None => Err(std::io::Error::other("no zstd context")),
        }
    })
}

/// The size of each sample [`worth_compressing`] tries.
const SAMPLE: usize = 8 * 1024;

/// Whether zstd is likely to shrink `plain`. A chunk of at least 8 samples' size is tried at
/// its start, middle and end, in that order; if none of the samples shrinks by 3%, it is
/// stored as it is without compressing the rest. Compressed, encrypted and media files are
/// most of a large backup's bytes, and on them zstd spends about as long as the encryption
/// and gains nothing (borg's `auto` compression makes the same guess with lz4). A chunk that is
/// incompressible in all three places but compressible elsewhere is stored uncompressed.
fn worth_compressing(plain: &[u8], level: i32) -> bool {
    if plain.len() < 8 * SAMPLE {
        return true;
    }
    let mid = plain.len() / 2 - SAMPLE / 2;
    let end = plain.len() - SAMPLE;
    let mut out = Vec::with_capacity(SAMPLE);
    [0, mid, end].into_iter().any(|at| {
        out.clear();
        let sample = &plain[at..at + SAMPLE];
        // A sample that does not fit in 97% of its size fails to compress.
        compress_into(sample, level, &mut out) && out.len() < SAMPLE * 97 / 100
    })
}

fn random_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    rand::fill(&mut nonce[..]);
    nonce
}

/// Compresses (when that helps) and encrypts one chunk.
///
/// # Errors
/// [`NodeError::Key`] if encryption fails (it does not for valid inputs).
pub fn seal_chunk(
    keys: &Keys,
    id: &ChunkId,
    plain: &[u8],
    zstd_level: i32,
) -> Result<Vec<u8>, NodeError> {
    let mut buf = Vec::with_capacity(SEAL_PREFIX + plain.len() + envelope::TAG_LEN);
    buf.resize(SEAL_PREFIX, 0);
    buf.extend_from_slice(plain);
    let mut out = Vec::new();
    Ok(
        match seal_prefixed(keys, id, &mut buf, zstd_level, &mut out)? {
            SealedIn::Buf => buf,
            SealedIn::Out => out,
        },
    )
}

/// The room [`seal_prefixed`] needs in front of a chunk's plaintext: the envelope's header and
/// the compression byte.
pub const SEAL_PREFIX: usize = 1 + NONCE_LEN + 1;

/// Where [`seal_prefixed`] left the sealed chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum SealedIn {
    /// In the plaintext's own buffer: stored uncompressed, encrypted where it lay.
    Buf,
    /// In `out`: compressed.
    Out,
}

/// [`seal_chunk`] of the plaintext in `buf[SEAL_PREFIX..]`. A chunk worth compressing is
/// compressed into `out` (cleared first) and sealed there; one that is not is sealed in `buf`
/// itself, around the plaintext, so that it is never copied (the copy showed in profiles of
/// incompressible data). Either way the envelope is built in place: header, body encrypted
/// where it lies, tag.
///
/// # Errors
/// [`NodeError::Key`] if encryption fails (it does not for valid inputs).
pub fn seal_prefixed(
    keys: &Keys,
    id: &ChunkId,
    buf: &mut Vec<u8>,
    zstd_level: i32,
    out: &mut Vec<u8>,
) -> Result<SealedIn, NodeError> {
    let nonce = random_nonce();
    let aad = envelope::chunk_aad(id);
    let failed = |_| NodeError::Key(format!("sealing chunk {id:?} failed"));
    let header = envelope::header(&nonce);
    let plain = buf.get(SEAL_PREFIX..).unwrap_or_default();
    if worth_compressing(plain, zstd_level) {
        out.clear();
        out.reserve(SEAL_PREFIX + plain.len() + envelope::TAG_LEN);
        out.extend_from_slice(&header);
        let body = out.len();
        out.push(COMPRESSION_ZSTD);
        if compress_into(plain, zstd_level, out) {
            let tag = keys
                .cipher()
                .encrypt_inout_detached(&XNonce::from(nonce), &aad, (&mut out[body..]).into())
                .map_err(failed)?;
            out.extend_from_slice(&tag);
            return Ok(SealedIn::Out);
        }
    }
    if buf.len() < SEAL_PREFIX {
        buf.resize(SEAL_PREFIX, 0);
    }
    buf[..header.len()].copy_from_slice(&header);
    buf[header.len()] = COMPRESSION_NONE;
    let tag = keys
        .cipher()
        .encrypt_inout_detached(
            &XNonce::from(nonce),
            &aad,
            (&mut buf[header.len()..]).into(),
        )
        .map_err(failed)?;
    buf.extend_from_slice(&tag);
    Ok(SealedIn::Buf)
}

/// Why a chunk could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    /// The envelope is malformed.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// The tag does not verify: damaged, tampered with, or another owner's.
    #[error("authentication failed")]
    Authentication,
    /// The plaintext does not hash to the chunk id.
    #[error("content does not match its chunk id")]
    Mismatch,
}

/// Opens one sealed chunk and checks that its plaintext hashes to `id`.
///
/// # Errors
/// [`OpenError`]; nothing is returned from unauthenticated bytes.
pub fn open_chunk(keys: &Keys, id: &ChunkId, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
    let parts =
        Sealed::parse("sealed chunk", sealed).map_err(|e| OpenError::Malformed(e.to_string()))?;
    let aad = envelope::chunk_aad(id);
    let inner = keys
        .cipher()
        .decrypt(
            &XNonce::from(*parts.nonce),
            Payload {
                msg: parts.ciphertext,
                aad: &aad,
            },
        )
        .map_err(|_| OpenError::Authentication)?;
    let plain = match inner.split_first() {
        Some((&COMPRESSION_NONE, data)) => data.to_vec(),
        Some((&COMPRESSION_ZSTD, data)) => {
            decompress(data).map_err(|e| OpenError::Malformed(format!("zstd: {e}")))?
        }
        _ => return Err(OpenError::Malformed("unknown compression".into())),
    };
    if keys.chunk_id(&plain) != *id {
        return Err(OpenError::Mismatch);
    }
    Ok(plain)
}

/// Encrypts a blob in `domain` with `context` bound as associated data.
///
/// # Errors
/// [`NodeError::Key`] if encryption fails.
pub fn seal_blob(
    keys: &Keys,
    domain: &[u8],
    context: &[u8],
    plain: &[u8],
) -> Result<Vec<u8>, NodeError> {
    let nonce = random_nonce();
    let aad = envelope::blob_aad(domain, context);
    let ct = keys
        .cipher()
        .encrypt(
            &XNonce::from(nonce),
            Payload {
                msg: plain,
                aad: &aad,
            },
        )
        .map_err(|_| NodeError::Key("sealing a blob failed".into()))?;
    Ok(envelope::assemble(&nonce, &ct))
}

/// Opens a blob sealed by [`seal_blob`].
///
/// # Errors
/// [`OpenError`].
pub fn open_blob(
    keys: &Keys,
    domain: &[u8],
    context: &[u8],
    sealed: &[u8],
) -> Result<Vec<u8>, OpenError> {
    let parts =
        Sealed::parse("sealed blob", sealed).map_err(|e| OpenError::Malformed(e.to_string()))?;
    let aad = envelope::blob_aad(domain, context);
    keys.cipher()
        .decrypt(
            &XNonce::from(*parts.nonce),
            Payload {
                msg: parts.ciphertext,
                aad: &aad,
            },
        )
        .map_err(|_| OpenError::Authentication)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MasterSecret;

    #[test]
    fn chunks_round_trip_compressed_or_not() {
        let keys = Keys::derive(&MasterSecret::generate());
        let text = b"hello hello hello hello hello hello hello hello".repeat(100);
        let mut random = vec![0u8; 10000];
        rand::fill(&mut random[..]);
        for plain in [&text[..], &random[..], b""] {
            let id = keys.chunk_id(plain);
            let sealed = seal_chunk(&keys, &id, plain, 3).unwrap();
            assert_eq!(open_chunk(&keys, &id, &sealed).unwrap(), plain);
        }
        let id = keys.chunk_id(&text);
        assert!(seal_chunk(&keys, &id, &text, 3).unwrap().len() < text.len() / 10);
        let id = keys.chunk_id(&random);
        assert_eq!(
            seal_chunk(&keys, &id, &random, 3).unwrap().len(),
            random.len() + 1 + envelope::OVERHEAD
        );
    }

    #[test]
    fn sealing_reuses_a_buffer_and_skips_incompressible_chunks() {
        let keys = Keys::derive(&MasterSecret::generate());
        let mut random = vec![0u8; 512 * 1024];
        rand::fill(&mut random[..]);
        // Text in the middle only: the middle sample finds it, and the chunk is compressed.
        let mut mixed = random.clone();
        let text = b"the quick brown fox jumps over the lazy dog ".repeat(4000);
        let mid = mixed.len() / 2 - text.len() / 2;
        mixed[mid..mid + text.len()].copy_from_slice(&text);
        let mut out = b"left over from an earlier chunk".to_vec();
        for (plain, compressed) in [(&random, false), (&mixed, true)] {
            let id = keys.chunk_id(plain);
            let mut buf = vec![9u8; SEAL_PREFIX];
            buf.extend_from_slice(plain);
            let sealed = match seal_prefixed(&keys, &id, &mut buf, 3, &mut out).unwrap() {
                SealedIn::Buf => &buf,
                SealedIn::Out => &out,
            };
            assert_eq!(&open_chunk(&keys, &id, sealed).unwrap(), plain);
            let raw_len = plain.len() + 1 + envelope::OVERHEAD;
            assert_eq!(sealed.len() < raw_len, compressed, "{}", sealed.len());
            assert_eq!(std::ptr::eq(sealed, &buf), !compressed);
        }
        assert!(worth_compressing(&text, 3));
        assert!(!worth_compressing(&random, 3));
    }

    #[test]
    fn tampering_and_swapping_are_detected() {
        let keys = Keys::derive(&MasterSecret::generate());
        let a = keys.chunk_id(b"a");
        let b = keys.chunk_id(b"b");
        let mut sealed = seal_chunk(&keys, &a, b"a", 3).unwrap();
        assert_eq!(
            open_chunk(&keys, &b, &sealed),
            Err(OpenError::Authentication)
        );
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert_eq!(
            open_chunk(&keys, &a, &sealed),
            Err(OpenError::Authentication)
        );
        let other = Keys::derive(&MasterSecret::generate());
        let sealed = seal_chunk(&keys, &a, b"a", 3).unwrap();
        assert_eq!(
            open_chunk(&other, &a, &sealed),
            Err(OpenError::Authentication)
        );
        assert!(matches!(
            open_chunk(&keys, &a, &sealed[..10]),
            Err(OpenError::Malformed(_))
        ));
    }

    #[test]
    fn blobs_are_bound_to_their_domain() {
        let keys = Keys::derive(&MasterSecret::generate());
        let s = seal_blob(&keys, b"d1", b"c", b"secret").unwrap();
        assert_eq!(open_blob(&keys, b"d1", b"c", &s).unwrap(), b"secret");
        assert!(open_blob(&keys, b"d2", b"c", &s).is_err());
        assert!(open_blob(&keys, b"d1", b"x", &s).is_err());
    }
}
