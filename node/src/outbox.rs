//! The outbox: sealed packs as files beside the redb index, waiting for friends.
//!
//! A pack is `outbox/<first two hex digits>/<pack id>.pack`. It is written to a temporary
//! name, synced, renamed into place and its directory synced, so a pack file that exists under
//! its final name is complete. Only then does the caller commit it to the index.

use crate::error::NodeError;
use obnam_protocol::PackId;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Fsyncs a directory, so a rename or create in it is durable.
///
/// # Errors
/// [`NodeError::Io`].
pub fn sync_dir(dir: &Path) -> Result<(), NodeError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| NodeError::io(format!("syncing directory {}", dir.display()), e))
}

/// The outbox directory.
#[derive(Debug, Clone)]
pub struct Outbox {
    dir: PathBuf,
}

impl Outbox {
    /// Opens (and creates) the outbox directory.
    ///
    /// # Errors
    /// [`NodeError::Io`].
    pub fn open(dir: PathBuf) -> Result<Self, NodeError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| NodeError::io(format!("creating outbox {}", dir.display()), e))?;
        Ok(Self { dir })
    }

    /// Where a pack's file is.
    pub fn path(&self, id: &PackId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(format!("{hex}.pack"))
    }

    /// Writes a pack durably.
    ///
    /// # Errors
    /// [`NodeError::Io`] naming the pack.
    pub fn write(&self, id: &PackId, bytes: &[u8]) -> Result<(), NodeError> {
        let path = self.path(id);
        let dir = path.parent().unwrap_or(&self.dir).to_owned();
        let ctx = || format!("writing pack {id} to {}", path.display());
        std::fs::create_dir_all(&dir).map_err(|e| NodeError::io(ctx(), e))?;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp).map_err(|e| NodeError::io(ctx(), e))?;
        f.write_all(bytes).map_err(|e| NodeError::io(ctx(), e))?;
        f.sync_all().map_err(|e| NodeError::io(ctx(), e))?;
        drop(f);
        std::fs::rename(&tmp, &path).map_err(|e| NodeError::io(ctx(), e))?;
        sync_dir(&dir)
    }

    /// Reads `len` bytes at `offset` of a pack.
    ///
    /// # Errors
    /// [`NodeError::Io`] naming the pack.
    pub fn read_range(&self, id: &PackId, offset: u64, len: usize) -> Result<Vec<u8>, NodeError> {
        let path = self.path(id);
        let ctx = || {
            format!(
                "reading {len} bytes at {offset} of pack {id} ({})",
                path.display()
            )
        };
        let f = std::fs::File::open(&path).map_err(|e| NodeError::io(ctx(), e))?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset)
            .map_err(|e| NodeError::io(ctx(), e))?;
        Ok(buf)
    }

    /// Reads a whole pack.
    ///
    /// # Errors
    /// [`NodeError::Io`] naming the pack.
    pub fn read(&self, id: &PackId) -> Result<Vec<u8>, NodeError> {
        let path = self.path(id);
        std::fs::read(&path)
            .map_err(|e| NodeError::io(format!("reading pack {id} ({})", path.display()), e))
    }

    /// Every complete pack file, and removes leftover temporary files.
    ///
    /// # Errors
    /// [`NodeError::Io`].
    pub fn scan(&self) -> Result<Vec<PackId>, NodeError> {
        let mut out = Vec::new();
        let ctx = |p: &Path| format!("scanning outbox {}", p.display());
        for sub in std::fs::read_dir(&self.dir).map_err(|e| NodeError::io(ctx(&self.dir), e))? {
            let sub = sub.map_err(|e| NodeError::io(ctx(&self.dir), e))?.path();
            if !sub.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&sub).map_err(|e| NodeError::io(ctx(&sub), e))? {
                let path = f.map_err(|e| NodeError::io(ctx(&sub), e))?.path();
                match path.extension().and_then(|e| e.to_str()) {
                    Some("tmp") => {
                        let _ = std::fs::remove_file(&path);
                    }
                    Some("pack") => {
                        if let Some(id) = path
                            .file_stem()
                            .and_then(|s| s.to_str())
                            .and_then(|s| s.parse().ok())
                        {
                            out.push(id);
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    /// Deletes a pack file.
    ///
    /// # Errors
    /// [`NodeError::Io`].
    pub fn remove(&self, id: &PackId) -> Result<(), NodeError> {
        let path = self.path(id);
        std::fs::remove_file(&path).map_err(|e| NodeError::io(format!("removing pack {id}"), e))
    }
}
