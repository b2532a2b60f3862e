//! The node's errors. Each has a stable [`NodeError::kind`] that `obnam --json` prints.

use obnam_protocol::DecodeError;
use obnam_store::StoreError;
use std::path::PathBuf;

/// What went wrong in the node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// No home directory to derive the default directories from.
    #[error("cannot determine a data directory: set --data-dir or OBNAM_DATA_DIR")]
    NoHome,
    /// The config file is bad.
    #[error("config file {}: {reason}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The owner has not run `obnam init`.
    #[error("this node has no owner keys yet: run `obnam init`")]
    NotInitialized,
    /// `obnam init` on a node that has keys.
    #[error("this node is already initialised for owner {name:?}")]
    AlreadyInitialized {
        /// The owner name.
        name: String,
    },
    /// The passphrase does not open the key slot.
    #[error("wrong passphrase for owner {name:?}")]
    WrongPassphrase {
        /// The owner name.
        name: String,
    },
    /// The passphrase is too easy to guess.
    #[error("passphrase is too weak ({reason}); choose a longer one, or pass --weak-passphrase-ok")]
    WeakPassphrase {
        /// zxcvbn's feedback.
        reason: String,
    },
    /// The secrets file may be read by others.
    #[error("secrets file {} has mode {mode:o}: it must not be readable by group or others (run `chmod 400 {}`)", path.display(), path.display())]
    InsecureSecrets {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// A file that should decode does not.
    #[error("{what} is damaged: {source}")]
    Corrupt {
        /// Which file or object.
        what: String,
        /// The decoder's complaint.
        #[source]
        source: DecodeError,
    },
    /// Authenticated decryption failed.
    #[error("{what} failed authentication (damaged or tampered with)")]
    Authentication {
        /// Which chunk, pack or file.
        what: String,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Bad input from the user.
    #[error("{0}")]
    Usage(String),
    /// A snapshot name that matches nothing (or too much).
    #[error("{0}")]
    NoSuchSnapshot(String),
    /// A path that is not in the snapshot.
    #[error("{0}")]
    NoSuchPath(String),
    /// The restore target is not empty.
    #[error("restore target {} is not empty: choose an empty directory, or pass --force", path.display())]
    TargetNotEmpty {
        /// The target.
        path: PathBuf,
    },
    /// The outbox would exceed its cap.
    #[error(
        "the outbox is full: {used} of {max} bytes used, this pack needs {need} more; raise outbox_max_bytes in the config"
    )]
    OutboxFull {
        /// Bytes in the outbox.
        used: u64,
        /// The cap.
        max: u64,
        /// Bytes the next pack needs.
        need: u64,
    },
    /// Another daemon holds this data directory.
    #[error("another obnam-node is already running on {}", path.display())]
    AlreadyRunning {
        /// The data directory.
        path: PathBuf,
    },
    /// A crypto or key error that is not the user's fault.
    #[error("key error: {0}")]
    Key(String),
    /// The network layer failed.
    #[error("network: {0}")]
    Net(String),
    /// The node is shutting down.
    #[error("the node is shutting down")]
    Shutdown,
    /// No node answers on the control socket.
    #[error("obnam-node is not running for data directory {} (no answer on {}): start it with `obnam-node start{}`", data_dir.display(), socket.display(), hint)]
    NotRunning {
        /// The data directory.
        data_dir: PathBuf,
        /// The socket tried.
        socket: PathBuf,
        /// The `--data-dir` hint to show.
        hint: String,
    },
    /// No friend holds a key slot that this name and passphrase open.
    #[error(
        "no reachable friend holds a key slot for owner name {name:?} and this passphrase ({asked} friends asked): check the name and the passphrase"
    )]
    NoSlot {
        /// The owner name tried.
        name: String,
        /// Friends asked.
        asked: usize,
    },
    /// The local index is missing or damaged.
    #[error("the local index {reason}: run `obnam index rebuild` to rebuild it from your friends")]
    IndexMissing {
        /// What is wrong with it.
        reason: String,
    },
    /// The control connection broke or carried garbage.
    #[error("control connection: {0}")]
    Control(String),
}

impl NodeError {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        NodeError::Io {
            context: context.into(),
            source,
        }
    }

    /// A stable, machine-readable kind.
    pub fn kind(&self) -> &'static str {
        match self {
            NodeError::NoHome => "no_data_dir",
            NodeError::Config { .. } => "config",
            NodeError::Io { .. } => "io",
            NodeError::NotInitialized => "not_initialized",
            NodeError::AlreadyInitialized { .. } => "already_initialized",
            NodeError::WrongPassphrase { .. } => "wrong_passphrase",
            NodeError::WeakPassphrase { .. } => "weak_passphrase",
            NodeError::InsecureSecrets { .. } => "insecure_secrets",
            NodeError::Corrupt { .. } => "corrupt",
            NodeError::Authentication { .. } => "authentication",
            NodeError::Store(_) => "database",
            NodeError::Usage(_) => "usage",
            NodeError::NoSuchSnapshot(_) => "no_such_snapshot",
            NodeError::NoSuchPath(_) => "no_such_path",
            NodeError::TargetNotEmpty { .. } => "target_not_empty",
            NodeError::OutboxFull { .. } => "outbox_full",
            NodeError::AlreadyRunning { .. } => "already_running",
            NodeError::Key(_) => "key",
            NodeError::Net(_) => "network",
            NodeError::Shutdown => "shutdown",
            NodeError::NotRunning { .. } => "not_running",
            NodeError::Control(_) => "control",
            NodeError::NoSlot { .. } => "no_slot",
            NodeError::IndexMissing { .. } => "index_missing",
        }
    }

    /// The message with its chain of causes.
    pub fn full_message(&self) -> String {
        let mut msg = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(s) = src {
            let text = s.to_string();
            if !msg.contains(&text) {
                msg.push_str(": ");
                msg.push_str(&text);
            }
            src = s.source();
        }
        msg
    }
}
