//! Test fixtures: a started, initialised node in a temporary directory.

use obnam_simulations::{Bins, Node};
use std::path::{Path, PathBuf};

pub type TestResult = anyhow::Result<()>;

pub fn bins() -> Bins {
    Bins {
        obnam: PathBuf::from(env!("CARGO_BIN_EXE_obnam")),
        node: PathBuf::from(env!("CARGO_BIN_EXE_obnam-node")),
    }
}

pub struct Fixture {
    pub dir: Tmp,
    pub node: Node,
}

impl Fixture {
    /// A started node (not initialised) with `config` appended to its config file.
    pub fn started(config: &str) -> anyhow::Result<Self> {
        let dir = tempdir("obnam-test-")?;
        let mut node = Node::new(&bins(), "node", &dir.path().join("node"), config)?;
        node.start()?;
        Ok(Self { dir, node })
    }

    /// A started, initialised node.
    pub fn ready() -> anyhow::Result<Self> {
        let f = Self::started("")?;
        f.node.init("alice")?;
        Ok(f)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

/// Where a restore puts `original` under `target`.
pub fn restored(target: &Path, original: &Path) -> PathBuf {
    target.join(original.strip_prefix("/").unwrap_or(original))
}

/// Deterministic pseudo-random bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Creating a temporary directory changes the mtime of `/tmp`, which every snapshot of a path
/// below it records (as restic does). Tests create theirs under a shared lock; tests that check
/// that an unchanged backup stores nothing hold it exclusively across their backups.
static TMP_LOCK: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// A temporary directory, created and removed under the shared lock (both change `/tmp`).
pub struct Tmp(Option<tempfile::TempDir>);

impl Tmp {
    pub fn path(&self) -> &Path {
        self.0
            .as_ref()
            .map(|d| d.path())
            .unwrap_or(Path::new("/nonexistent"))
    }
}

impl Drop for Tmp {
    fn drop(&mut self) {
        let _shared = TMP_LOCK.read().unwrap_or_else(|e| e.into_inner());
        drop(self.0.take());
    }
}

/// A temporary directory, created under the shared lock.
pub fn tempdir(prefix: &str) -> anyhow::Result<Tmp> {
    let _shared = TMP_LOCK.read().unwrap_or_else(|e| e.into_inner());
    Ok(Tmp(Some(
        tempfile::Builder::new().prefix(prefix).tempdir()?,
    )))
}

/// Keeps other tests from creating temporary directories while held.
pub fn quiet_tmp() -> std::sync::RwLockWriteGuard<'static, ()> {
    TMP_LOCK.write().unwrap_or_else(|e| e.into_inner())
}

/// For a test that creates entries directly in the temp directory for its whole run.
pub fn touching_tmp() -> std::sync::RwLockReadGuard<'static, ()> {
    TMP_LOCK.read().unwrap_or_else(|e| e.into_inner())
}
