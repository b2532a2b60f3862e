//! `obnam keys rotate`: a new master secret, every snapshot re-encrypted under it, and the old
//! key's data deleted at every friend once the new set is complete.
//!
//! The answer to a stolen secrets file. It runs in three phases, each safe to interrupt:
//!
//! 1. **Build** (this module, blocking). The new master secret is written to `secrets.next`
//!    before anything is sealed with it. Every snapshot, oldest first, is read under the old
//!    keys and chunked, sealed and packed again under the new ones, into the store's `next`
//!    tables and `outbox-next/`. New chunk ids and boundaries come from the new keys, so the
//!    next backup deduplicates against the rotated data. A memo (old tree or file → new chunks)
//!    skips what earlier snapshots already rewrote. Entries carry the stamp of their run; a
//!    stamp counts once its snapshot was committed, and entries of an interrupted run are
//!    pruned when the build resumes where it stopped.
//! 2. **Switch** (one redb transaction, then renames). `secrets.retired` gets the old key, the
//!    `next` tables replace the current ones with a `rotation-switching` marker, then
//!    `outbox-next/` becomes `outbox/` and `secrets.next` becomes `secrets`. [`finish_switch`]
//!    completes these steps at start after a crash.
//! 3. **Retire** ([`crate::replication`]). Replication sends the new owner's packs and head as
//!    for any owner. Once the replica set holds everything, each friend gets a successor
//!    statement signed with the old key: it moves the key slot to the new owner and refuses
//!    further writes for the old one. Only when every friend has switched does each get a
//!    delete-owner request; then `secrets.retired` is removed. Until every friend switched,
//!    a recovery through any friend finds a complete set: the old one where the slot is still
//!    old, the new one where it moved.

use crate::backup::{IngestError, Sink, with_pipeline};
use crate::config::Paths;
use crate::error::NodeError;
use crate::keys::{self, Keys};
use crate::repo::Repo;
use obnam_protocol::tree::{EntryKind, Tree};
use obnam_protocol::{ChunkId, OwnerId, SnapshotId};
use obnam_store::Store;
use std::collections::HashMap;
use std::path::PathBuf;

const META_SWITCHING: &str = "rotation-switching";
const META_STAMP: &str = "rotation-stamp";
const META_VALID: &str = "rotation-valid";
/// Memo entries buffered before they are written.
const MEMO_BATCH: usize = 4096;

/// The outbox of the next key generation.
pub fn next_outbox(paths: &Paths) -> PathBuf {
    paths.data.join("outbox-next")
}

/// What a rotation did.
#[derive(Debug, Clone)]
pub struct Rotated {
    /// The retired owner.
    pub old: OwnerId,
    /// The new owner.
    pub new: OwnerId,
    /// Snapshots now under the new key.
    pub snapshots: u64,
    /// Plaintext bytes chunked and sealed again.
    pub new_bytes: u64,
    /// Sealed bytes written to the outbox.
    pub stored_bytes: u64,
}

/// Whether a previous rotation is still retiring the old key at friends.
pub fn retiring(paths: &Paths) -> bool {
    keys::retired_path(&paths.secrets()).exists()
}

/// Runs phases 1 and 2. Blocking: call from a blocking thread, holding the backup lock.
///
/// # Errors
/// A wrong passphrase, a rotation still retiring, or any read, network or disk error (the
/// build resumes when run again).
pub fn rotate(repo: &Repo, passphrase: &str) -> Result<Rotated, NodeError> {
    let secrets = repo.paths.secrets();
    keys::check_passphrase(&secrets, passphrase)?;
    // A lost or damaged index would rotate nothing, and the retirement would then delete the
    // old data at friends.
    repo.check_index()?;
    let old = repo.owner()?;
    let retired = keys::retired_path(&secrets);
    if retired.exists() && keys::load_owner(&retired)?.keys.owner_id() == old.keys.owner_id() {
        // Left by a rotation interrupted before its switch: the current key is not retiring.
        std::fs::remove_file(&retired)
            .map_err(|e| NodeError::io("removing a stale secrets.retired", e))?;
    }
    if retiring(&repo.paths) {
        return Err(NodeError::Usage(
            "the previous key rotation is still deleting the old key's data at friends (see `obnam status`); rotate again when it is done".into(),
        ));
    }
    let new = keys::prepare_next(&secrets, passphrase)?;
    let next = repo.next_generation()?;
    next.adopt_orphans(&new.keys)?;
    let src = repo.with_private_cache();
    let mut valid = meta_u64(&repo.store, META_VALID)?;
    // Entries of an interrupted run may name chunks that never reached the disk (a tree's chunk
    // can be packed before its children's): forget them.
    repo.store.prune_memos(valid)?;
    let mut snapshots = 0;
    let (mut new_bytes, mut stored_bytes) = (0, 0);
    for (old_id, record) in repo.store.snapshots()? {
        let done_key = memo_key(b"snapshot", &[ChunkId::from(old_id)]);
        if let Some((stamp, _)) = repo.store.memo(&done_key)?
            && stamp <= valid
        {
            snapshots += 1;
            continue;
        }
        // A fresh stamp for this run: memo entries of an interrupted run stay invalid.
        let stamp = meta_u64(&repo.store, META_STAMP)?.max(valid) + 1;
        repo.store.set_meta(META_STAMP, &stamp.to_le_bytes())?;
        let mut rw = Rewriter {
            src: &src,
            old: &old.keys,
            store: &repo.store,
            stamp,
            valid,
            buffer: HashMap::new(),
        };
        let (root, nb, sb, _) = with_pipeline(&next, &new.keys, record.chunker, |sink| {
            let root = rw.tree(sink, &record.root)?;
            rw.flush()?;
            Ok(root)
        })?;
        new_bytes += nb;
        stored_bytes += sb;
        // Every chunk of the new snapshot is durable and indexed now.
        let new_record = obnam_protocol::snapshot::SnapshotRecord {
            root,
            ..record.clone()
        };
        let new_id = SnapshotId::from(new.keys.chunk_id(&new_record.to_bytes()));
        if !next.store.snapshots()?.iter().any(|(id, _)| *id == new_id) {
            // Pack sets belong to the current generation only; after the switch they come from
            // the trees (see `obnam_store::packsets`).
            next.commit_snapshot(&new.keys, new_id, &new_record, None)?;
        }
        repo.store
            .put_memos(stamp, &[(done_key, new_id.as_bytes().to_vec())])?;
        repo.store.set_meta(META_VALID, &stamp.to_le_bytes())?;
        valid = stamp;
        src.clear_cache();
        snapshots += 1;
        tracing::info!(old = %old_id.short(), new = %new_id.short(), "snapshot re-encrypted under the new key");
    }
    // Phase 2.
    keys::copy_secrets(&secrets, &keys::retired_path(&secrets))?;
    repo.store.switch_generation(&[(META_SWITCHING, b"1")])?;
    finish_switch(&repo.paths, &repo.store)?;
    if repo.store.friends()?.is_empty() {
        // Nobody holds data under the old key: there is nothing to retire.
        std::fs::remove_file(keys::retired_path(&secrets))
            .map_err(|e| NodeError::io("removing the retired key", e))?;
    }
    tracing::warn!(old = %old.keys.owner_id().short(), new = %new.keys.owner_id().short(), snapshots, "keys rotated; the old key's data is deleted at friends once they hold the new set");
    Ok(Rotated {
        old: old.keys.owner_id(),
        new: new.keys.owner_id(),
        snapshots,
        new_bytes,
        stored_bytes,
    })
}

/// Completes a switch whose tables moved but whose files may not have: `outbox-next/` becomes
/// `outbox/` (the old one is removed) and `secrets.next` becomes `secrets`. Every step can be
/// repeated. Call before the outbox is opened.
///
/// # Errors
/// I/O and database errors.
pub fn finish_switch(paths: &Paths, store: &Store) -> Result<(), NodeError> {
    if store.meta(META_SWITCHING)?.is_none() {
        return Ok(());
    }
    let io = |what: &str, e| NodeError::io(format!("finishing a key rotation: {what}"), e);
    let outbox = paths.outbox();
    let next = next_outbox(paths);
    let old = paths.data.join("outbox-old");
    if next.exists() {
        if outbox.exists() {
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(|e| io("removing outbox-old", e))?;
            }
            std::fs::rename(&outbox, &old).map_err(|e| io("moving the old outbox", e))?;
        }
        std::fs::rename(&next, &outbox).map_err(|e| io("moving the new outbox", e))?;
        crate::outbox::sync_dir(&paths.data)?;
    }
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| io("removing the old outbox", e))?;
    }
    let secrets = paths.secrets();
    let next_secrets = keys::next_path(&secrets);
    if next_secrets.exists() {
        std::fs::rename(&next_secrets, &secrets).map_err(|e| io("installing the new key", e))?;
        crate::outbox::sync_dir(&paths.data)?;
    }
    // A takeover statement signed with the old key means nothing to friends any more.
    store.remove_meta("takeover")?;
    store.remove_meta(META_SWITCHING)?;
    store.remove_meta(META_STAMP)?;
    store.remove_meta(META_VALID)?;
    Ok(())
}

fn meta_u64(store: &Store, key: &str) -> Result<u64, NodeError> {
    Ok(store
        .meta(key)?
        .and_then(|v| v.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0))
}

fn memo_key(kind: &[u8], old: &[ChunkId]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(kind);
    h.update(&[0]);
    for c in old {
        h.update(c.as_bytes());
    }
    *h.finalize().as_bytes()
}

fn ids_of(bytes: &[u8]) -> Vec<ChunkId> {
    bytes
        .chunks_exact(32)
        .filter_map(|c| c.try_into().ok().map(ChunkId))
        .collect()
}

/// Re-encrypts trees and files of one snapshot.
struct Rewriter<'a> {
    src: &'a Repo,
    old: &'a Keys,
    store: &'a Store,
    stamp: u64,
    valid: u64,
    buffer: HashMap<[u8; 32], Vec<ChunkId>>,
}

impl Rewriter<'_> {
    /// New chunks for old content already rewritten, if every one is still known.
    fn memo(&self, sink: &Sink<'_>, key: &[u8; 32]) -> Result<Option<Vec<ChunkId>>, NodeError> {
        let ids = match self.buffer.get(key) {
            Some(ids) => ids.clone(),
            None => match self.store.memo(key)? {
                Some((stamp, v)) if stamp <= self.valid || stamp == self.stamp => ids_of(&v),
                _ => return Ok(None),
            },
        };
        for id in &ids {
            if !sink.known(id)? {
                return Ok(None);
            }
        }
        Ok(Some(ids))
    }

    fn remember(&mut self, key: [u8; 32], ids: &[ChunkId]) -> Result<(), NodeError> {
        self.buffer.insert(key, ids.to_vec());
        if self.buffer.len() >= MEMO_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), NodeError> {
        let entries: Vec<_> = self
            .buffer
            .drain()
            .map(|(k, ids)| (k, ids.iter().flat_map(|c| c.as_bytes().to_vec()).collect()))
            .collect();
        self.store.put_memos(self.stamp, &entries)?;
        Ok(())
    }

    fn tree(&mut self, sink: &mut Sink<'_>, old: &[ChunkId]) -> Result<Vec<ChunkId>, NodeError> {
        let key = memo_key(b"tree", old);
        if let Some(ids) = self.memo(sink, &key)? {
            return Ok(ids);
        }
        let tree = self.src.read_tree(self.old, old)?;
        let mut out = Tree::default();
        for mut e in tree.entries {
            match e.kind {
                EntryKind::Dir => e.content = self.tree(sink, &e.content)?,
                EntryKind::File => e.content = self.file(sink, &e.content, e.size)?,
                _ => {}
            }
            out.entries.push(e);
        }
        let ids = sink.ingest_blob(&out.to_bytes())?;
        self.remember(key, &ids)?;
        Ok(ids)
    }

    fn file(
        &mut self,
        sink: &mut Sink<'_>,
        old: &[ChunkId],
        size: u64,
    ) -> Result<Vec<ChunkId>, NodeError> {
        if old.is_empty() {
            return Ok(Vec::new());
        }
        let key = memo_key(b"file", old);
        if let Some(ids) = self.memo(sink, &key)? {
            return Ok(ids);
        }
        let reader = OldChunks {
            src: self.src,
            keys: self.old,
            chunks: old,
            next: 0,
            buf: Vec::new(),
            pos: 0,
        };
        let (ids, len) = match sink.ingest(reader) {
            Ok(r) => r,
            Err(IngestError::Read(e)) => {
                return Err(NodeError::io("reading data sealed under the old key", e));
            }
            Err(IngestError::Abort(e)) => return Err(e),
        };
        if len != size {
            return Err(NodeError::Authentication {
                what: format!("a file of {size} bytes whose chunks hold {len} bytes"),
            });
        }
        self.remember(key, &ids)?;
        Ok(ids)
    }
}

/// A file's plaintext, read chunk by chunk under the old keys.
struct OldChunks<'a> {
    src: &'a Repo,
    keys: &'a Keys,
    chunks: &'a [ChunkId],
    next: usize,
    buf: Vec<u8>,
    pos: usize,
}

impl std::io::Read for OldChunks<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.buf.len() {
            let Some(id) = self.chunks.get(self.next) else {
                return Ok(0);
            };
            self.buf = self
                .src
                .read_chunk(self.keys, id)
                .map_err(|e| std::io::Error::other(e.full_message()))?;
            self.pos = 0;
            self.next += 1;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A switch interrupted after its transaction, at each step of the file moves, completes
    /// when started again, and nothing of the new generation is lost.
    #[test]
    fn an_interrupted_switch_completes_at_every_step() {
        for crash_after in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let paths = Paths {
                config: dir.path().join("config.toml"),
                data: dir.path().to_owned(),
            };
            let store = Store::in_memory().unwrap();
            let outbox = paths.outbox();
            let next = next_outbox(&paths);
            std::fs::create_dir_all(&outbox).unwrap();
            std::fs::create_dir_all(&next).unwrap();
            std::fs::write(outbox.join("old.pack"), b"old").unwrap();
            std::fs::write(next.join("new.pack"), b"new").unwrap();
            std::fs::write(paths.secrets(), b"old key").unwrap();
            std::fs::write(keys::next_path(&paths.secrets()), b"new key").unwrap();
            store.switch_generation(&[(META_SWITCHING, b"1")]).unwrap();
            let old = paths.data.join("outbox-old");
            if crash_after >= 1 {
                std::fs::rename(&outbox, &old).unwrap();
            }
            if crash_after >= 2 {
                std::fs::rename(&next, &outbox).unwrap();
            }
            finish_switch(&paths, &store).unwrap();
            assert_eq!(std::fs::read(outbox.join("new.pack")).unwrap(), b"new");
            assert!(!outbox.join("old.pack").exists());
            assert!(!old.exists() && !next.exists());
            assert_eq!(std::fs::read(paths.secrets()).unwrap(), b"new key");
            assert_eq!(store.meta(META_SWITCHING).unwrap(), None);
            // Running it again changes nothing.
            finish_switch(&paths, &store).unwrap();
            assert_eq!(std::fs::read(outbox.join("new.pack")).unwrap(), b"new");
        }
    }
}
