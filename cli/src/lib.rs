//! # obnam-cli: the `obnam` and `obnam-node` programs
//!
//! Thin: [`args`] parses the command line (clap), [`commands`] turns arguments into requests to
//! the node and [`output`] prints the results, for people or as JSON. No backup logic lives here.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod args;
pub mod commands;
pub mod output;

/// Exit codes of `obnam`.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// An error.
    pub const ERROR: u8 = 1;
    /// A usage error (clap's own code).
    pub const USAGE: u8 = 2;
    /// The backup completed, but some files were skipped.
    pub const PARTIAL: u8 = 3;
    /// The snapshot is saved, but replication to friends is pending.
    pub const PENDING: u8 = 4;
}
