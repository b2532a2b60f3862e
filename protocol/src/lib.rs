//! # obnam-protocol: every byte layout of obnam
//!
//! This crate is the only place that decides how obnam's data looks as bytes, on disk and on the wire.
//! It knows no keys and does no encryption: it defines the envelopes that `obnam-node` fills.
//!
//! | module | what it lays out |
//! |---|---|
//! | [`ids`] | chunk, pack, snapshot, owner and lookup ids (32 bytes, shown as hex) |
//! | [`codec`] | the postcard encoding with size bounds, and the format version byte |
//! | [`envelope`] | the sealed-chunk and sealed-blob envelopes (XChaCha20-Poly1305 layout, associated data) |
//! | [`pack`] | packs: sealed chunks, a sealed index, random padding to 64 KiB, a sealed trailer |
//! | [`tree`] | directory listings (entries with names as bytes, metadata and content chunk ids) |
//! | [`snapshot`] | snapshot records and the owner's head (signed, hash-chained) |
//! | [`keyslot`] | the passphrase-wrapped key slot and the key-derivation context strings |
//! | [`signed`] | domain-separated Ed25519 signatures |
//! | [`ticket`] | the copy-pasteable ticket that introduces a node to a friend |
//! | [`local`] | records the node keeps in its own redb index |
//! | [`control`] | messages between `obnam` and `obnam-node` over the local socket |
//! | [`msg`] | messages between friends' nodes (exchange and pack streams) |
//! | [`audit`] | audit challenges and BLAKE3 verified-streaming proofs against a pack id |
//!
//! ## Goals
//! - Every layout is versioned, and every change to one fails a golden-bytes test.
//! - Every decoder is bounded: a length is checked before anything is allocated.
//! - A friend that stores our packs can verify a pack id (a plain BLAKE3 hash) without any key.
//!
//! ## Non-goals
//! - Schema evolution inside one version: postcard has none. New fields mean a new version;
//!   enums only grow at the end.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod audit;
pub mod codec;
pub mod control;
pub mod envelope;
#[doc(hidden)]
pub mod fuzzing;
pub mod ids;
pub mod keyslot;
pub mod local;
pub mod msg;
pub mod pack;
pub mod signed;
pub mod snapshot;
pub mod ticket;
pub mod tree;

pub use codec::{DecodeError, FORMAT_VERSION};
pub use ids::{ChunkId, LookupId, OwnerId, PackId, SnapshotId};
