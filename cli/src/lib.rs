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

/// Sets up logging to stderr: `default` level, one step more detailed per `-v`, only warnings
/// with `-q`. `OBNAM_LOG` (an env-filter directive) overrides all of it.
pub fn init_logging(g: &args::Global, default: &str) {
    let levels = ["warn", "info", "debug", "trace"];
    let base = levels.iter().position(|l| *l == default).unwrap_or(0);
    let level = if g.quiet {
        "warn"
    } else {
        levels[(base + usize::from(g.verbose)).min(levels.len() - 1)]
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("OBNAM_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "obnam={level},obnam_node={level},obnam_cli={level},warn"
        ))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
