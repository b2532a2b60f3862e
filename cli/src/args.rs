//! Command-line arguments. `--data-dir`, `--json`, `-v` and `-q` are global: they work before or
//! after the subcommand.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// Flags every command takes.
#[derive(Debug, Args, Clone)]
pub struct Global {
    /// Keep everything of this node under DIR (config, keys, database, outbox, socket).
    #[arg(long, global = true, env = "OBNAM_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print exactly one JSON document to stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// More detail (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
}

/// obnam: back up to your friends, restore from any of them.
#[derive(Debug, Parser)]
#[command(name = "obnam", version)]
pub struct Cli {
    /// Global flags.
    #[command(flatten)]
    pub global: Global,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands of `obnam`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the owner keys from a name and a passphrase.
    Init(InitArgs),
    /// Show this node's peer id, addresses and ticket.
    Id,
    /// Back up paths (default: your home directory).
    Backup(BackupArgs),
    /// List snapshots, oldest first.
    Snapshots,
    /// List the files of a snapshot.
    Ls(LsArgs),
    /// Restore a snapshot into a directory.
    Restore(RestoreArgs),
    /// Show the node's state.
    Status,
    /// Audit every friend now: each proves that it holds our newest pack, the latest snapshot's
    /// root and two random packs, without sending them (exit 1 if an audit fails).
    Verify(VerifyArgs),
    /// Passphrase operations.
    #[command(subcommand)]
    Passphrase(PassphraseCommand),
    /// Key operations.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Friends: the nodes that store your backups, and whose backups you store.
    #[command(subcommand)]
    Peer(PeerCommand),
    /// The local index.
    #[command(subcommand)]
    Index(IndexCommand),
}

/// `obnam verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Also download PCT percent of the packs (at least one) from every friend that holds them,
    /// and decrypt and check every chunk.
    #[arg(long, value_name = "PCT", value_parser = clap::value_parser!(u32).range(1..=100))]
    pub sample: Option<u32>,
}

/// `obnam index`.
#[derive(Debug, Subcommand)]
pub enum IndexCommand {
    /// Rebuild the local index (chunks, packs, holders, snapshots) from what the friends hold.
    Rebuild,
}

/// `obnam peer`.
#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Make a node a friend (both sides must add each other before data moves).
    Add(PeerAddArgs),
    /// List friends.
    List,
    /// Stop being friends with a node.
    Remove {
        /// Its peer id.
        peer_id: String,
    },
}

/// `obnam peer add`.
#[derive(Debug, Args)]
pub struct PeerAddArgs {
    /// The friend's ticket (from `obnam id`), or its bare peer id with --addr.
    pub who: String,
    /// An address of the friend (repeatable), e.g. /ip4/192.0.2.7/tcp/4411.
    #[arg(long, value_name = "MULTIADDR")]
    pub addr: Vec<String>,
    /// Space you grant this friend on your disk, e.g. 50GiB (default: the config's default_quota).
    #[arg(long, value_parser = parse_size)]
    pub quota: Option<u64>,
    /// A name for the friend.
    #[arg(long)]
    pub name: Option<String>,
    /// The friend's household: replicas prefer friends in different households.
    #[arg(long)]
    pub household: Option<String>,
}

/// Parses sizes such as `500MB`, `50GiB`, `1T` or a plain number of bytes.
///
/// # Errors
/// A message naming the bad size.
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("{s:?} is not a size like 50GiB: {e}"))
}

/// `obnam init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Owner name (default: your login name). You need it, with the passphrase, to recover.
    #[arg(long)]
    pub name: Option<String>,
    /// Read the passphrase from this file (first line) instead of a prompt or OBNAM_PASSPHRASE.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Accept a passphrase that the strength check rejects.
    #[arg(long)]
    pub weak_passphrase_ok: bool,
    /// Recover the keys of an existing owner from a friend (a new machine): needs the owner name,
    /// the passphrase, and one friend added with `obnam peer add`.
    #[arg(long)]
    pub recover: bool,
}

/// `obnam passphrase`.
#[derive(Debug, Subcommand)]
pub enum PassphraseCommand {
    /// Check that you still know the passphrase (it is the only way back after losing this machine).
    Check(PassphraseArgs),
    /// Change the passphrase: the new key slot goes to every friend and replaces the old one
    /// there; no data is re-uploaded. The old passphrase stops working at every friend reached.
    Change(ChangeArgs),
}

/// `obnam keys`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a new master secret and re-encrypt every snapshot under it; friends delete the old
    /// key's data once they hold the new set. The answer to a stolen secrets file.
    Rotate(PassphraseArgs),
}

/// `obnam passphrase change`.
#[derive(Debug, Args)]
pub struct ChangeArgs {
    /// Read the current passphrase from this file (first line); else OBNAM_PASSPHRASE or a prompt.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Read the new passphrase from this file (first line); else OBNAM_NEW_PASSPHRASE or a prompt.
    #[arg(long, value_name = "FILE")]
    pub new_passphrase_file: Option<PathBuf>,
    /// Accept a new passphrase that the strength check rejects.
    #[arg(long)]
    pub weak_passphrase_ok: bool,
}

/// Where a passphrase comes from.
#[derive(Debug, Args)]
pub struct PassphraseArgs {
    /// Read the passphrase from this file (first line).
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

/// `obnam backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Files and directories to back up.
    pub paths: Vec<PathBuf>,
    /// Leave out paths matching this glob (repeatable). `*.log` matches names anywhere,
    /// `/home/*/.cache` whole paths, `build/*.o` path endings.
    #[arg(long, value_name = "PATTERN")]
    pub exclude: Vec<String>,
    /// Read exclude patterns from this file, one a line (repeatable).
    #[arg(long, value_name = "FILE")]
    pub exclude_file: Vec<PathBuf>,
    /// Leave out directories that hold a CACHEDIR.TAG.
    #[arg(long)]
    pub exclude_caches: bool,
    /// Do not cross into other file systems.
    #[arg(short = 'x', long)]
    pub one_file_system: bool,
    /// Read every file, even those the file cache shows unchanged since the last backup.
    #[arg(long)]
    pub force: bool,
    /// Tag the snapshot (repeatable).
    #[arg(long, value_name = "TAG")]
    pub tag: Vec<String>,
    /// Wait this long for replication to friends without progress (e.g. 60s, 5m).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub timeout: Option<std::time::Duration>,
}

/// `obnam ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Snapshot id (8 or more hex characters) or `latest`.
    pub snapshot: String,
    /// Original absolute path to list below.
    pub path: Option<PathBuf>,
}

/// `obnam restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot id (8 or more hex characters) or `latest`.
    pub snapshot: String,
    /// Directory to restore into; files land at TARGET/<original absolute path>.
    #[arg(long, value_name = "DIR")]
    pub target: PathBuf,
    /// Restore only this original absolute path (repeatable).
    #[arg(long, value_name = "PATH")]
    pub path: Vec<PathBuf>,
    /// Restore into a non-empty target, replacing files that are in the way.
    #[arg(long)]
    pub force: bool,
}

/// obnam-node: the obnam daemon.
#[derive(Debug, Parser)]
#[command(name = "obnam-node", version)]
pub struct NodeCli {
    /// Global flags.
    #[command(flatten)]
    pub global: Global,
    /// The command.
    #[command(subcommand)]
    pub command: NodeCommand,
}

/// The commands of `obnam-node`.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Run the node in the foreground (creates its node key on first start).
    Start {
        /// Listen on this libp2p address (repeatable; replaces the config's `listen`).
        #[arg(long, value_name = "MULTIADDR")]
        listen: Vec<String>,
    },
}
