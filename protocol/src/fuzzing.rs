//! Fuzz entry points: one function per cargo-fuzz target in `fuzz/fuzz_targets/`.
//!
//! Each function feeds arbitrary bytes to the real decoders of one family, the way `obnam-node`
//! meets them (from a friend, from its own disk or from the control socket), and then the checks
//! it would run next on what decoded (signatures, key slots, audit proofs, pack geometry). Both
//! the fuzz targets and the replay test (`tests/fuzz_regressions.rs`) call these functions, so
//! the two cannot drift apart.
//!
//! A function returns `Err` with the decoder's message when the input does not decode: that is
//! the expected answer to garbage. It **panics** only when an invariant of a decoded value does
//! not hold (a pack trailer pointing outside its pack, a value that does not survive
//! `encode → decode`): a panic is a bug, and the fuzzer reports it as a crash.
//!
//! Where one target covers several decoders, the first input byte selects one of them (modulo
//! their number) and the rest is the encoding; [`with_selector`] builds such inputs.
//!
//! Not part of the stable API: hidden from the docs, for fuzzing and its regression test only.

use crate::audit::{self, Challenge, MAX_RANGE};
use crate::codec::{DecodeError, decode_versioned, encode};
use crate::envelope::Sealed;
use crate::ids::{ChunkId, OwnerId, PackId, SnapshotId};
use crate::keyslot::{KeySlot, SecretsFile};
use crate::local::{
    CHUNK_LOC_LEN, ChunkLoc, DirCache, FileStat, Friend, FriendHealth, HostedOwner, PackRecord,
    PackSetDelta, PeerState,
};
use crate::msg::{self, MAX_HEAD, MAX_MESSAGE, MAX_STREAM_HEADER};
use crate::pack::{PackIndex, PackTrailer, TRAILER_LEN, chunk_locations};
use crate::snapshot::{Head, HeadBody, MAX_HEAD_LEN, SignedHead, SnapshotRecord};
use crate::ticket::Ticket;
use crate::tree::Tree;
use crate::{control, ids};
use serde::{Serialize, de::DeserializeOwned};
use std::fmt::Debug;
use std::sync::LazyLock;

/// The names of the fuzz targets, as in `fuzz/Cargo.toml` and `tests/fuzz-regressions/`.
pub const TARGETS: [&str; 11] = [
    "wire_request",
    "wire_response",
    "stream_header",
    "pack_index",
    "tree",
    "head",
    "ticket",
    "control",
    "audit_proof",
    "local_records",
    "key_slot",
];

/// Runs the entry point of the target `name` on `data`.
///
/// # Errors
/// What that entry point returns; `Err` for an unknown name too.
pub fn run(name: &str, data: &[u8]) -> Result<(), String> {
    match name {
        "wire_request" => wire_request(data),
        "wire_response" => wire_response(data),
        "stream_header" => stream_header(data),
        "pack_index" => pack_index(data),
        "tree" => tree(data),
        "head" => head(data),
        "ticket" => ticket(data),
        "control" => control(data),
        "audit_proof" => audit_proof(data),
        "local_records" => local_records(data),
        "key_slot" => key_slot(data),
        _ => Err(format!("no fuzz target named {name:?}")),
    }
}

/// An input for a target that covers several decoders: the selector byte, then `body`.
pub fn with_selector(selector: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + body.len());
    out.push(selector);
    out.extend_from_slice(body);
    out
}

fn split_selector(data: &[u8], choices: u8) -> (u8, &[u8]) {
    match data.split_first() {
        Some((&s, rest)) => (s % choices, rest),
        None => (0, data),
    }
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Asserts that a decoded postcard value encodes to something that decodes to itself.
fn assert_round_trip<T>(what: &'static str, value: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let again: Result<T, DecodeError> =
        crate::codec::decode_bounded(what, &encode(value), usize::MAX);
    assert_eq!(
        again.as_ref(),
        Ok(value),
        "{what} does not survive encode → decode"
    );
}

/// The owner a signed head claims, so that its signature can be checked against that owner
/// (as a node does when it adopts its own head). `None` when the bytes are no signed head.
fn claimed_owner(bytes: &[u8]) -> Option<OwnerId> {
    let signed: SignedHead = decode_versioned("signed head", bytes, MAX_HEAD_LEN).ok()?;
    let head: Head = decode_versioned("head", &signed.head, MAX_HEAD_LEN).ok()?;
    Some(head.owner)
}

/// Verifies a signed head against the owner it names, and on success checks its chain hash.
fn check_signed_head(bytes: &[u8]) -> Result<(), String> {
    let owner = claimed_owner(bytes).unwrap_or(OwnerId([0; 32]));
    let (signed, head) = SignedHead::verify(bytes, &owner).map_err(text)?;
    assert_eq!(head.owner, owner, "a verified head names its owner");
    assert_eq!(signed.hash(), *blake3::hash(&signed.to_bytes()).as_bytes());
    Ok(())
}

/// A key slot as a friend serves it: decode, then split the sealed secret.
fn check_key_slot(bytes: &[u8]) -> Result<(), String> {
    let slot = KeySlot::from_bytes(bytes).map_err(text)?;
    assert_eq!(KeySlot::from_bytes(&slot.to_bytes()).as_ref(), Ok(&slot));
    Sealed::parse("key slot", &slot.sealed_secret).map_err(text)?;
    Ok(())
}

/// The prover's peer id (as bytes) that `wire_request` checks owner proofs for.
pub const PROVER: &[u8] = b"fuzz prover";
/// The verifier's peer id (as bytes) that `wire_request` checks owner proofs for.
pub const VERIFIER: &[u8] = b"fuzz verifier";

/// `wire_request`: a request on `/obnam/exchange/1` ([`msg::Request`]), as a friend's server
/// decodes it, then the checks its handler makes: owner proofs, takeover and successor
/// statements, signed heads and key slots.
///
/// # Errors
/// The decoder's message when the bytes are no request.
pub fn wire_request(data: &[u8]) -> Result<(), String> {
    let request: msg::Request = msg::decode("request", data, MAX_MESSAGE).map_err(text)?;
    assert_round_trip("request", &request);
    // The follow-up checks may fail on fuzzed input; only a panic matters.
    match &request {
        msg::Request::ProveOwner(proof) => {
            let _ = proof.verify(PROVER, VERIFIER);
        }
        msg::Request::Takeover(statement) => {
            let _ = statement.verify();
        }
        msg::Request::Successor(statement) => {
            let _ = statement.verify();
            let _ = check_key_slot(&statement.slot);
        }
        msg::Request::PutHead { owner, head } if head.len() <= MAX_HEAD => {
            let _ = SignedHead::verify(head, owner);
            let _ = check_signed_head(head);
        }
        msg::Request::PutSlot { slot, .. } => {
            let _ = check_key_slot(slot);
        }
        msg::Request::Audit { challenge, .. } => {
            let _ = challenge.check(u64::from(challenge.len));
        }
        _ => {}
    }
    Ok(())
}

/// `wire_response`: a response on `/obnam/exchange/1` ([`msg::Response`]), as the asking node
/// decodes it, then what it does with heads, key slots and audit proofs.
///
/// # Errors
/// The decoder's message when the bytes are no response.
pub fn wire_response(data: &[u8]) -> Result<(), String> {
    let response: msg::Response = msg::decode("response", data, MAX_MESSAGE).map_err(text)?;
    assert_round_trip("response", &response);
    match &response {
        msg::Response::Head(Some(head)) => {
            let _ = check_signed_head(head);
        }
        msg::Response::Slot(Some(slot)) => {
            let _ = check_key_slot(slot);
        }
        msg::Response::Proof { proof, .. } => {
            let (challenge, size) = audit_challenge(0, 0, MAX_RANGE);
            let _ = audit::verify(&challenge, size, proof);
        }
        msg::Response::Error(e) => {
            let _ = e.to_string();
        }
        _ => {}
    }
    Ok(())
}

/// `stream_header`: a frame on `/obnam/packs/1`. Selector 0: a [`msg::StreamRequest`] (the
/// server's side); 1: a [`msg::StreamReply`] (the client's side).
///
/// # Errors
/// The decoder's message when the bytes are no such frame.
pub fn stream_header(data: &[u8]) -> Result<(), String> {
    match split_selector(data, 2) {
        (0, body) => {
            let r: msg::StreamRequest =
                msg::decode("stream frame", body, MAX_STREAM_HEADER).map_err(text)?;
            assert_round_trip("stream request", &r);
        }
        (_, body) => {
            let r: msg::StreamReply =
                msg::decode("stream frame", body, MAX_STREAM_HEADER).map_err(text)?;
            assert_round_trip("stream reply", &r);
        }
    }
    Ok(())
}

/// `pack_index`: the opened parts of a pack. Selector 0: a [`PackIndex`]; 1: a [`PackTrailer`]
/// for a pack whose length is the first 8 bytes (little-endian), the trailer being the rest; 2:
/// a sealed envelope (the sealed index or trailer before it is opened).
///
/// # Errors
/// The decoder's message when the bytes do not decode.
///
/// # Panics
/// When a trailer decodes that points outside its pack.
pub fn pack_index(data: &[u8]) -> Result<(), String> {
    match split_selector(data, 3) {
        (0, body) => {
            let index = PackIndex::from_bytes(body).map_err(text)?;
            assert_eq!(
                PackIndex::from_bytes(&index.to_bytes()).as_ref(),
                Ok(&index)
            );
            let locations = chunk_locations(PackId([0; 32]), &index.entries);
            assert_eq!(locations.len(), index.entries.len());
        }
        (1, body) => {
            let Some((len, trailer)) = body.split_first_chunk::<8>() else {
                return Err(format!(
                    "pack trailer input of {} bytes is too short",
                    body.len()
                ));
            };
            let pack_len = u64::from_le_bytes(*len);
            let t = PackTrailer::from_bytes(trailer, pack_len).map_err(text)?;
            let end = t
                .index_offset
                .checked_add(t.index_len)
                .and_then(|end| end.checked_add(TRAILER_LEN as u64));
            assert!(
                end.is_some_and(|end| end <= pack_len),
                "trailer {t:?} points outside a pack of {pack_len} bytes"
            );
            assert_eq!(PackTrailer::from_bytes(&t.to_bytes(), pack_len), Ok(t));
        }
        (_, body) => {
            let sealed = Sealed::parse("sealed blob", body).map_err(text)?;
            assert_eq!(1 + sealed.nonce.len() + sealed.ciphertext.len(), body.len());
        }
    }
    Ok(())
}

/// `tree`: a directory listing ([`Tree`]), as a restore decodes it after opening its chunks.
///
/// # Errors
/// The decoder's message when the bytes are no valid tree.
pub fn tree(data: &[u8]) -> Result<(), String> {
    let tree = Tree::from_bytes(data).map_err(text)?;
    assert_eq!(Tree::from_bytes(&tree.to_bytes()).as_ref(), Ok(&tree));
    Ok(())
}

/// `head`: the owner's head. Selector 0: a [`SignedHead`], verified against the owner it names;
/// 1: a [`HeadBody`] (after opening); 2: a [`SnapshotRecord`] (after opening).
///
/// # Errors
/// The decoder's or verifier's message.
pub fn head(data: &[u8]) -> Result<(), String> {
    match split_selector(data, 3) {
        (0, body) => check_signed_head(body)?,
        (1, body) => {
            let b = HeadBody::from_bytes(body).map_err(text)?;
            assert_eq!(HeadBody::from_bytes(&b.to_bytes()).as_ref(), Ok(&b));
        }
        (_, body) => {
            let r = SnapshotRecord::from_bytes(body).map_err(text)?;
            let _ = r.paths_lossy();
            assert_eq!(SnapshotRecord::from_bytes(&r.to_bytes()).as_ref(), Ok(&r));
        }
    }
    Ok(())
}

/// `ticket`: a ticket pasted by a user (`peer add`), and the hex ids and id prefixes users type.
/// Any bytes are read as (lossy) UTF-8 text.
///
/// # Errors
/// The ticket decoder's message.
///
/// # Panics
/// When a decoded ticket does not survive `encode → decode`.
pub fn ticket(data: &[u8]) -> Result<(), String> {
    let text_in = String::from_utf8_lossy(data);
    if let Ok(id) = text_in.parse::<SnapshotId>() {
        assert_eq!(id.to_hex().parse::<SnapshotId>(), Ok(id));
    }
    let _ = ids::matches_prefix(&SnapshotId([0xab; 32]), &text_in);
    let t = Ticket::decode(&text_in).map_err(text)?;
    assert_eq!(Ticket::decode(&t.encode()).as_ref(), Ok(&t));
    Ok(())
}

/// `control`: a control-socket frame. Selector 0: a [`control::Request`] (the node's side);
/// 1: an [`control::Event`] and 2: a [`control::Reply`] (the client's side). The frame's length
/// prefix check runs on the first 4 bytes of the body as well.
///
/// # Errors
/// The decoder's message.
pub fn control(data: &[u8]) -> Result<(), String> {
    let (selector, body) = split_selector(data, 3);
    if let Some(prefix) = body.first_chunk::<4>() {
        let _ = control::frame_len(*prefix);
    }
    match selector {
        0 => {
            let r: control::Request =
                control::decode_body("control request", body).map_err(text)?;
            assert_round_trip("control request", &r);
        }
        1 => {
            let e: control::Event = control::decode_body("control event", body).map_err(text)?;
            assert_round_trip("control event", &e);
        }
        _ => {
            let r: control::Reply = control::decode_body("control reply", body).map_err(text)?;
            assert_round_trip("control reply", &r);
        }
    }
    Ok(())
}

/// Pack lengths of the fixed audit cases: one 4 KiB leaf and a bit, a few hundred leaves, and
/// the largest pack (where proofs are longest).
pub const AUDIT_SIZES: [u64; 3] = [4097, 300_000, crate::pack::MAX_PACK_LEN];

/// The fixed pack of `size` bytes that the audit cases are about: BLAKE3-XOF output, so that
/// tests can build valid proofs for it.
pub fn audit_pack(size: u64) -> Vec<u8> {
    let mut data = vec![0u8; usize::try_from(size).unwrap_or(0)];
    let mut h = blake3::Hasher::new();
    h.update(b"obnam fuzz audit pack");
    h.update(&size.to_le_bytes());
    h.finalize_xof().fill(&mut data);
    data
}

static AUDIT_PACKS: LazyLock<Vec<PackId>> = LazyLock::new(|| {
    AUDIT_SIZES
        .iter()
        .map(|&size| PackId::of(&audit_pack(size)))
        .collect()
});

/// The challenge of audit case `case` (modulo the number of cases: which fixed pack) for
/// `offset` and `len` (taken modulo the pack's length and [`MAX_RANGE`] + 1, so most inputs
/// name a range that fits), and the pack's length. `wire_response` checks proofs against
/// case 0 at offset 0 for [`MAX_RANGE`] bytes.
pub fn audit_challenge(case: u8, offset: u64, len: u32) -> (Challenge, u64) {
    let i = usize::from(case) % AUDIT_SIZES.len();
    let size = AUDIT_SIZES[i];
    let challenge = Challenge {
        pack: AUDIT_PACKS[i],
        offset: offset % size,
        len: len % (MAX_RANGE + 1),
        nonce: [0; 32],
    };
    (challenge, size)
}

/// Length of the fixed part of an `audit_proof` input: case, offset, length.
const AUDIT_HEADER: usize = 1 + 8 + 4;

/// An `audit_proof` input: the case, offset and length of [`audit_challenge`] (little-endian),
/// then the proof.
pub fn audit_input(case: u8, offset: u64, len: u32, proof: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(AUDIT_HEADER + proof.len());
    out.push(case);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(proof);
    out
}

/// The challenge an `audit_proof` input names, its pack's size, and the proof bytes.
fn audit_parts(data: &[u8]) -> Option<(Challenge, u64, &[u8])> {
    let (&case, rest) = data.split_first()?;
    let (offset, rest) = rest.split_first_chunk::<8>()?;
    let (len, proof) = rest.split_first_chunk::<4>()?;
    let (challenge, size) =
        audit_challenge(case, u64::from_le_bytes(*offset), u32::from_le_bytes(*len));
    Some((challenge, size, proof))
}

/// `audit_proof`: a friend's answer to an audit ([`audit::verify`]) for a challenge of one of
/// the fixed packs ([`audit_input`] lays out the input).
///
/// # Errors
/// The verifier's message.
///
/// # Panics
/// When a proof verifies but yields bytes other than the pack's.
pub fn audit_proof(data: &[u8]) -> Result<(), String> {
    let Some((challenge, size, proof)) = audit_parts(data) else {
        return Err(format!("audit input of {} bytes is too short", data.len()));
    };
    let bytes = audit::verify(&challenge, size, proof).map_err(text)?;
    assert_eq!(
        bytes.len(),
        challenge.len as usize,
        "proof yields the challenged length"
    );
    Ok(())
}

/// `local_records`: the records a node keeps in its own redb index, as read back from disk.
/// Selector 0: [`PackRecord`]; 1: [`Friend`]; 2: [`HostedOwner`]; 3: [`FriendHealth`] (then
/// its presence is updated and summed, as the auditor does); 4: [`PeerState`]; 5: [`DirCache`]
/// (then a file is looked up in it); 6: [`ChunkLoc`] (fixed length); 7: [`PackSetDelta`] (then
/// applied to a set, as the health figures do).
///
/// # Errors
/// The decoder's message.
pub fn local_records(data: &[u8]) -> Result<(), String> {
    match split_selector(data, 8) {
        (0, body) => {
            let r = PackRecord::from_bytes(body).map_err(text)?;
            assert_eq!(PackRecord::from_bytes(&r.to_bytes()).as_ref(), Ok(&r));
        }
        (1, body) => {
            let r = Friend::from_bytes(body).map_err(text)?;
            assert_eq!(Friend::from_bytes(&r.to_bytes()).as_ref(), Ok(&r));
        }
        (2, body) => {
            let r = HostedOwner::from_bytes(body).map_err(text)?;
            assert_eq!(HostedOwner::from_bytes(&r.to_bytes()).as_ref(), Ok(&r));
        }
        (3, body) => {
            let mut r = FriendHealth::from_bytes(body).map_err(text)?;
            assert_eq!(FriendHealth::from_bytes(&r.to_bytes()).as_ref(), Ok(&r));
            let _ = r.online_fraction();
            // A day well inside the range a clock can give (i64 nanoseconds).
            let now_ns = r.last_audit_ns.clamp(0, 4_000_000_000_000_000_000);
            r.note_presence(now_ns, 60, r.last_passed);
            let _ = r.online_fraction();
        }
        (4, body) => {
            let r = PeerState::from_bytes(body).map_err(text)?;
            assert_eq!(PeerState::from_bytes(&r.to_bytes()).as_ref(), Ok(&r));
        }
        (5, body) => {
            let r = DirCache::from_bytes(body).map_err(text)?;
            assert_eq!(DirCache::from_bytes(&r.to_bytes()).as_ref(), Ok(&r));
            if let Some(f) = r.files.first() {
                let stat = FileStat {
                    dev: f.dev,
                    ino: f.ino,
                    size: f.size,
                    mtime_ns: f.mtime_ns,
                    ctime_ns: f.ctime_ns,
                };
                let _ = r.lookup(&f.name, &stat);
            }
        }
        (7, body) => {
            let r = PackSetDelta::from_bytes(body).map_err(text)?;
            assert_eq!(PackSetDelta::from_bytes(&r.to_bytes()).as_ref(), Ok(&r));
            let mut set = r.removed.clone();
            set.sort_unstable();
            set.dedup();
            r.apply(&mut set);
            assert!(set.windows(2).all(|w| w[0] < w[1]));
        }
        (_, body) => {
            let b: &[u8; CHUNK_LOC_LEN] = body.try_into().map_err(|_| {
                format!(
                    "chunk location is {} bytes, not {CHUNK_LOC_LEN}",
                    body.len()
                )
            })?;
            let loc = ChunkLoc::from_bytes(b);
            assert_eq!(&loc.to_bytes(), b);
        }
    }
    Ok(())
}

/// `key_slot`: key material read from a friend or the disk. Selector 0: a [`KeySlot`] (then its
/// sealed secret is split); 1: a [`SecretsFile`] (then the slot inside it); 2: any sealed
/// envelope ([`Sealed::parse`]), e.g. a sealed chunk.
///
/// # Errors
/// The decoder's message.
pub fn key_slot(data: &[u8]) -> Result<(), String> {
    match split_selector(data, 3) {
        (0, body) => check_key_slot(body)?,
        (1, body) => {
            let f = SecretsFile::from_bytes(body).map_err(text)?;
            assert_eq!(SecretsFile::from_bytes(&f.to_bytes()).as_ref(), Ok(&f));
            let _ = check_key_slot(&f.slot);
        }
        (_, body) => {
            let sealed = Sealed::parse("sealed chunk", body).map_err(text)?;
            let _ =
                crate::envelope::chunk_aad(&ChunkId(*blake3::hash(sealed.ciphertext).as_bytes()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_has_an_entry_point() {
        for name in TARGETS {
            // Empty input: an error, never an unknown target.
            let out = run(name, &[]);
            assert!(
                out.as_ref()
                    .is_err_and(|e| !e.starts_with("no fuzz target")),
                "{name}: {out:?}"
            );
        }
        assert!(run("nope", &[]).is_err());
    }

    #[test]
    fn selectors_wrap() {
        assert_eq!(split_selector(&[7, 1], 3), (1, &[1u8][..]));
        assert_eq!(split_selector(&[], 3), (0, &[][..]));
    }
}
