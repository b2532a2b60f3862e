//! # obnam-node: the daemon
//!
//! The only crate that holds key material and knows tokio and libp2p. `obnam-cli` calls it
//! through [`daemon::run`] (the `obnam-node` binary) and [`control::Client`] (the `obnam`
//! binary).
//!
//! | module | role |
//! |---|---|
//! | [`config`] | settings (`config.toml`) and directories |
//! | [`keys`] | master secret, key slot, derived keys, secrets file |
//! | [`seal`] | zstd + XChaCha20-Poly1305 sealing and opening |
//! | [`chunker`] | FastCDC with the secret gear seed |
//! | [`pack`] | building and reading packs |
//! | [`outbox`] | pack files beside the database |
//! | [`repo`] | store + outbox + the owner's head |
//! | [`exclude`] | exclusion rules |
//! | [`backup`] | the backup pipeline (threads, bounded channels) |
//! | [`restore`] | restore and `ls` |
//! | [`net`] | the libp2p swarm: codec, event loop, [`net::Net`] handle |
//! | [`serve`] | the storage role: answering friends' requests and pack streams |
//! | [`peers`] | talking to friends as a client: owner proofs, uploads, fetches |
//! | [`replication`] | the actor that keeps packs and the head on the replica set, and repairs |
//! | [`audit`] | audits of friends: schedule, challenges, judgement, presence |
//! | [`scrub`] | the storage role re-hashes hosted packs and drops rotten ones |
//! | [`recover`] | recovery with name and passphrase, head survey, index rebuild |
//! | [`control`] | the local control socket, server and client |
//! | [`daemon`] | start-up and shutdown |
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod addrbook;
pub mod audit;
pub mod backup;
pub mod chunker;
pub mod config;
pub mod control;
pub mod daemon;
pub mod error;
pub mod exclude;
pub mod health;
pub mod keys;
pub mod net;
pub mod outbox;
pub mod pack;
pub mod peers;
pub mod reach;
pub mod recover;
pub mod replication;
pub mod repo;
pub mod restore;
pub mod rotate;
pub mod scrub;
pub mod seal;
pub mod serve;
#[cfg(feature = "testing")]
pub mod testing;

pub use error::NodeError;
