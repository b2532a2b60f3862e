//! # obnam-store: the node's redb database
//!
//! Synchronous, with no tasks and no tokio. One redb file per node holds:
//!
//! | table | key → value | what |
//! |---|---|---|
//! | `index-0` | chunk id → [`ChunkLoc`] (40 bytes) | where each of our chunks is sealed |
//! | `packs-0` | pack id → [`PackRecord`] | our packs, and whether their file is in the outbox |
//! | `snapshots-0` | snapshot id → encoded [`SnapshotRecord`] | our snapshots |
//! | `meta-0` | name → bytes | the signed head, the schema version |
//! | `files-0` | directory key → [`DirCache`] | the file cache: what the last backup saw of each file |
//! | `addr-book-0` | peer id bytes → [`AddressRecord`](obnam_protocol::local::AddressRecord) | each friend's newest signed address record ([`addrbook`]) |
//! | `snapshot-packs-0` | snapshot id → [`PackSetDelta`](obnam_protocol::local::PackSetDelta) | which packs each snapshot uses ([`packsets`]) |
//!
//! Pack bodies never go into redb: they are files in the outbox beside it, because redb stores
//! large values at 1.5–2.5× their size (see `../shared/DEPS.md`).
//!
//! Write order is the caller's duty and the store's promise: [`Store::commit_pack`] makes a
//! pack's chunks visible in one transaction, only after the caller made the pack file durable;
//! [`Store::commit_snapshot`] records a snapshot and the new head in one transaction, only after
//! every chunk it references is committed.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod addrbook;
mod error;
pub mod hosted;
pub mod packsets;

pub use error::StoreError;
pub use hosted::{Binding, HeadOutcome, PutOutcome, RetireOutcome, TakeoverOutcome};
pub use packsets::{PackChange, PackSets};

use obnam_protocol::local::{CHUNK_LOC_LEN, ChunkLoc, DirCache, PackRecord};
use obnam_protocol::snapshot::SnapshotRecord;
use obnam_protocol::{ChunkId, PackId, SnapshotId};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::path::Path;
use std::sync::Arc;

type IndexTable = TableDefinition<'static, &'static [u8; 32], &'static [u8; CHUNK_LOC_LEN]>;
type IdTable = TableDefinition<'static, &'static [u8; 32], &'static [u8]>;

/// The tables of one key generation of the owner's own data. `keys rotate` builds the next
/// generation beside the current one and swaps them in one transaction.
pub(crate) struct OwnTables {
    index: IndexTable,
    pub(crate) packs: IdTable,
    snapshots: IdTable,
    head: &'static str,
}

static CURRENT: OwnTables = OwnTables {
    index: TableDefinition::new("index-0"),
    packs: TableDefinition::new("packs-0"),
    snapshots: TableDefinition::new("snapshots-0"),
    head: "own-head",
};

static NEXT: OwnTables = OwnTables {
    index: TableDefinition::new("next-index-0"),
    packs: TableDefinition::new("next-packs-0"),
    snapshots: TableDefinition::new("next-snapshots-0"),
    head: "next-head",
};
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta-0");
const FILES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("files-0");
const MEMO: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("rotate-memo-0");

/// Every snapshot of a snapshots table, oldest first (ties by id).
pub(crate) fn read_snapshots(
    table: &impl ReadableTable<&'static [u8; 32], &'static [u8]>,
) -> Result<Vec<(SnapshotId, SnapshotRecord)>, StoreError> {
    let mut out = Vec::new();
    for item in table.iter()? {
        let (k, v) = item?;
        let id = SnapshotId(*k.value());
        let rec = SnapshotRecord::from_bytes(v.value()).map_err(|e| StoreError::Corrupt {
            what: format!("snapshot {id}"),
            source: e,
        })?;
        out.push((id, rec));
    }
    out.sort_by_key(|(id, r)| (r.time_ns, *id));
    Ok(out)
}

const META_SCHEMA: &str = "schema";
const SCHEMA_VERSION: &[u8] = b"1";

/// Options for opening a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// redb page cache in bytes (redb's default is 1 GiB, too much for a small node).
    pub cache_bytes: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Counts of the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutboxUsage {
    /// Packs whose file is in the outbox.
    pub packs: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// The node's database. Cheap to clone; all clones share one redb handle.
#[derive(Clone)]
pub struct Store {
    pub(crate) db: Arc<Database>,
    pub(crate) own: &'static OwnTables,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    /// Opens or creates the database at `path`.
    ///
    /// # Errors
    /// [`StoreError::Open`] when the file cannot be opened or is not a redb database of ours.
    pub fn open(path: &Path, opts: &StoreOptions) -> Result<Self, StoreError> {
        let db = Database::builder()
            .set_cache_size(opts.cache_bytes)
            .create(path)
            .map_err(|e| StoreError::Open {
                path: path.to_owned(),
                source: e.into(),
            })?;
        let store = Self {
            db: Arc::new(db),
            own: &CURRENT,
        };
        store.init_tables().map_err(|e| StoreError::Open {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        Ok(store)
    }

    /// A store in memory, for tests.
    ///
    /// # Errors
    /// [`StoreError::Db`] if redb fails.
    pub fn in_memory() -> Result<Self, StoreError> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(|e| StoreError::Db(e.into()))?;
        let store = Self {
            db: Arc::new(db),
            own: &CURRENT,
        };
        store.init_tables()?;
        Ok(store)
    }

    /// Whether this is the current key generation (not the one `keys rotate` builds).
    pub(crate) fn is_current(&self) -> bool {
        std::ptr::eq(self.own, &CURRENT)
    }

    fn init_tables(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            tx.open_table(CURRENT.index)?;
            tx.open_table(CURRENT.packs)?;
            tx.open_table(CURRENT.snapshots)?;
            tx.open_table(NEXT.index)?;
            tx.open_table(NEXT.packs)?;
            tx.open_table(NEXT.snapshots)?;
            tx.open_table(FILES)?;
            tx.open_table(MEMO)?;
            tx.open_table(packsets::SNAPSHOT_PACKS)?;
            tx.open_table(hosted::FRIENDS)?;
            tx.open_table(hosted::RETIRED)?;
            tx.open_table(hosted::OWNERS)?;
            tx.open_table(hosted::HOSTED)?;
            tx.open_table(hosted::HEADS)?;
            tx.open_table(hosted::SLOTS)?;
            tx.open_multimap_table(hosted::PLACEMENT)?;
            tx.open_table(hosted::PEER_STATE)?;
            tx.open_table(hosted::FRIEND_HEALTH)?;
            tx.open_table(hosted::DROPPED)?;
            tx.open_multimap_table(hosted::SUSPECT)?;
            tx.open_table(addrbook::ADDR_BOOK)?;
            let mut meta = tx.open_table(META)?;
            let schema = meta.get(META_SCHEMA)?.map(|v| v.value().to_vec());
            match schema {
                None => {
                    meta.insert(META_SCHEMA, SCHEMA_VERSION)?;
                }
                Some(v) if v == SCHEMA_VERSION => {}
                Some(v) => {
                    return Err(StoreError::Schema {
                        found: String::from_utf8_lossy(&v).into_owned(),
                    });
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Where a chunk is, if we have it.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn chunk(&self, id: &ChunkId) -> Result<Option<ChunkLoc>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(self.own.index)?;
        Ok(table
            .get(id.as_bytes())?
            .map(|v| ChunkLoc::from_bytes(v.value())))
    }

    /// Number of chunks in the index.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn chunk_count(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(self.own.index)?.len()?)
    }

    /// Records a pack and its chunks in one transaction. Call only after the pack file is durable.
    /// Chunks already indexed elsewhere keep their first location.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn commit_pack(
        &self,
        id: &PackId,
        record: &PackRecord,
        chunks: &[(ChunkId, ChunkLoc)],
    ) -> Result<(), StoreError> {
        self.commit_packs(std::iter::once((id, record, chunks)))
    }

    /// Records several packs and their chunks in one transaction (one commit, so one sync for
    /// all of them), as [`Store::commit_pack`] does for one.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn commit_packs<'a>(
        &self,
        packs: impl IntoIterator<Item = (&'a PackId, &'a PackRecord, &'a [(ChunkId, ChunkLoc)])>,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(self.own.packs)?;
            let mut index = tx.open_table(self.own.index)?;
            for (id, record, chunks) in packs {
                table.insert(id.as_bytes(), record.to_bytes().as_slice())?;
                for (chunk, loc) in chunks {
                    if index.get(chunk.as_bytes())?.is_none() {
                        index.insert(chunk.as_bytes(), &loc.to_bytes())?;
                    }
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// A pack's record.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn pack(&self, id: &PackId) -> Result<Option<PackRecord>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(self.own.packs)?;
        match table.get(id.as_bytes())? {
            None => Ok(None),
            Some(v) => Ok(Some(PackRecord::from_bytes(v.value()).map_err(|e| {
                StoreError::Corrupt {
                    what: format!("pack record {id}"),
                    source: e,
                }
            })?)),
        }
    }

    /// Every pack we know, in id order.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn packs(&self) -> Result<Vec<(PackId, PackRecord)>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(self.own.packs)?;
        let mut out = Vec::new();
        for item in table.iter()? {
            let (k, v) = item?;
            let id = PackId(*k.value());
            let rec = PackRecord::from_bytes(v.value()).map_err(|e| StoreError::Corrupt {
                what: format!("pack record {id}"),
                source: e,
            })?;
            out.push((id, rec));
        }
        Ok(out)
    }

    /// How many packs, and how many bytes, wait in the outbox.
    ///
    /// # Errors
    /// As [`Store::packs`].
    pub fn outbox_usage(&self) -> Result<OutboxUsage, StoreError> {
        let mut usage = OutboxUsage::default();
        for (_, rec) in self.packs()? {
            if rec.in_outbox {
                usage.packs += 1;
                usage.bytes += rec.len;
            }
        }
        Ok(usage)
    }

    /// Records a snapshot, the head that lists it and, if given, the packs it uses (see
    /// [`packsets`]), in one transaction. Call only after every chunk the snapshot references
    /// is committed.
    ///
    /// # Errors
    /// [`StoreError::Db`], or [`StoreError::Corrupt`] for an undecodable snapshot record.
    pub fn commit_snapshot(
        &self,
        id: &SnapshotId,
        record: &SnapshotRecord,
        signed_head: &[u8],
        packs: Option<&[PackId]>,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut snaps = tx.open_table(self.own.snapshots)?;
            snaps.insert(id.as_bytes(), record.to_bytes().as_slice())?;
            drop(snaps);
            let mut meta = tx.open_table(META)?;
            meta.insert(self.own.head, signed_head)?;
            if let Some(packs) = packs
                && self.is_current()
            {
                self.put_pack_set(&tx, *id, packs)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every snapshot, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn snapshots(&self) -> Result<Vec<(SnapshotId, SnapshotRecord)>, StoreError> {
        let tx = self.db.begin_read()?;
        read_snapshots(&tx.open_table(self.own.snapshots)?)
    }

    /// Replaces the snapshot list and the head with those of a head adopted from friends.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn adopt_head(
        &self,
        snapshots: &[(SnapshotId, SnapshotRecord)],
        signed_head: &[u8],
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut snaps = tx.open_table(self.own.snapshots)?;
            for (id, record) in snapshots {
                snaps.insert(id.as_bytes(), record.to_bytes().as_slice())?;
            }
            tx.open_table(META)?.insert(self.own.head, signed_head)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// A value in the meta table.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(META)?.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Sets a value in the meta table.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn set_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(META)?.insert(key, value)?;
        tx.commit()?;
        Ok(())
    }

    /// The file-cache record of the directory with key `key` (see
    /// [`obnam_protocol::local::dir_cache_key`]). A record that does not decode is treated as
    /// absent: the cache only ever saves work.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn dir_cache(&self, key: &[u8]) -> Result<Option<DirCache>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(FILES)?;
        let Some(v) = table.get(key)? else {
            return Ok(None);
        };
        Ok(DirCache::from_bytes(v.value()).ok())
    }

    /// Removes the records of the directories in `drop` and of everything below them, then
    /// writes `puts`, in one transaction.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn write_dir_caches(
        &self,
        puts: &[(Vec<u8>, DirCache)],
        drop: &[Vec<u8>],
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut table = tx.open_table(FILES)?;
            for key in drop {
                // The key itself sorts first, then exactly the keys starting with `key + [0]`.
                let start = key.clone();
                let mut end = key.clone();
                end.push(1);
                table.retain_in(start.as_slice()..end.as_slice(), |_, _| false)?;
            }
            for (key, rec) in puts {
                table.insert(key.as_slice(), rec.to_bytes().as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Empties the file cache.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn clear_file_cache(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(FILES)?.retain(|_, _| false)?;
        tx.commit()?;
        Ok(())
    }

    /// Number of directories in the file cache.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn file_cache_dirs(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(FILES)?.len()?)
    }

    /// The same database, seen through the tables of the next key generation (built by
    /// `keys rotate` before [`Store::switch_generation`]). Hosted and friend tables are shared.
    pub fn next_generation(&self) -> Store {
        Store {
            db: Arc::clone(&self.db),
            own: &NEXT,
        }
    }

    /// Whether the next generation holds anything (a rotation was started).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn next_generation_started(&self) -> Result<bool, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(!tx.open_table(NEXT.packs)?.is_empty()?
            || tx.open_table(META)?.get(NEXT.head)?.is_some())
    }

    /// Makes the next generation current, in one transaction: its chunks, packs, snapshots and
    /// head replace the current ones; the file cache, the rotation memo and the placements are
    /// emptied; what we sent each friend is forgotten (the new owner starts from nothing);
    /// `meta` entries are set.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn switch_generation(&self, meta: &[(&str, &[u8])]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            tx.delete_table(CURRENT.index)?;
            tx.delete_table(CURRENT.packs)?;
            tx.delete_table(CURRENT.snapshots)?;
            tx.rename_table(NEXT.index, CURRENT.index)?;
            tx.rename_table(NEXT.packs, CURRENT.packs)?;
            tx.rename_table(NEXT.snapshots, CURRENT.snapshots)?;
            tx.open_table(NEXT.index)?;
            tx.open_table(NEXT.packs)?;
            tx.open_table(NEXT.snapshots)?;
            let mut m = tx.open_table(META)?;
            let head = m.remove(NEXT.head)?.map(|v| v.value().to_vec());
            match head {
                Some(h) => m.insert(CURRENT.head, h.as_slice())?,
                None => m.remove(CURRENT.head)?,
            };
            for (k, v) in meta {
                m.insert(*k, *v)?;
            }
            drop(m);
            tx.open_table(FILES)?.retain(|_, _| false)?;
            tx.open_table(MEMO)?.retain(|_, _| false)?;
            Self::clear_pack_sets(&tx)?;
            tx.delete_multimap_table(hosted::PLACEMENT)?;
            tx.open_multimap_table(hosted::PLACEMENT)?;
            tx.delete_multimap_table(hosted::SUSPECT)?;
            tx.open_multimap_table(hosted::SUSPECT)?;
            let mut states = tx.open_table(hosted::PEER_STATE)?;
            states.retain(|_, _| false)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Empties the next generation (a rotation that starts over).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn discard_next_generation(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            tx.open_table(NEXT.index)?.retain(|_, _| false)?;
            tx.open_table(NEXT.packs)?.retain(|_, _| false)?;
            tx.open_table(NEXT.snapshots)?.retain(|_, _| false)?;
            tx.open_table(META)?.remove(NEXT.head)?;
            tx.open_table(MEMO)?.retain(|_, _| false)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// A rotation memo entry: the stamp it was written under and its value.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn memo(&self, key: &[u8; 32]) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(MEMO)?;
        Ok(t.get(key)?.and_then(|v| {
            let b = v.value();
            let stamp = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
            Some((stamp, b[8..].to_vec()))
        }))
    }

    /// Writes rotation memo entries under `stamp`.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn put_memos(&self, stamp: u64, entries: &[([u8; 32], Vec<u8>)]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(MEMO)?;
            for (k, v) in entries {
                let mut val = stamp.to_le_bytes().to_vec();
                val.extend_from_slice(v);
                t.insert(k, val.as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Removes the rotation memo entries written under a stamp above `max_stamp` (by a build
    /// that was interrupted before its snapshot was committed).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn prune_memos(&self, max_stamp: u64) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(MEMO)?.retain(|_, v| {
            v.get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .is_some_and(|stamp| stamp <= max_stamp)
        })?;
        tx.commit()?;
        Ok(())
    }

    /// Removes a value from the meta table.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn remove_meta(&self, key: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(META)?.remove(key)?;
        tx.commit()?;
        Ok(())
    }

    /// The owner's current signed head, if any.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn own_head(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read()?;
        let table = tx.open_table(META)?;
        Ok(table.get(self.own.head)?.map(|v| v.value().to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use obnam_protocol::snapshot::ChunkerParams;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn loc(p: u8, off: u32) -> ChunkLoc {
        ChunkLoc {
            pack: PackId([p; 32]),
            offset: off,
            len: 10,
        }
    }

    fn record(time_ns: i64) -> SnapshotRecord {
        SnapshotRecord {
            time_ns,
            host: "h".into(),
            paths: vec![],
            tags: vec![],
            root: vec![],
            files: 0,
            dirs: 0,
            bytes: 0,
            failed_files: 0,
            chunker: ChunkerParams::V1,
        }
    }

    fn index_and_outbox(store: &Store) -> TestResult {
        let rec = PackRecord {
            len: 65536,
            chunks: 2,
            created_ns: 1,
            in_outbox: true,
        };
        store.commit_pack(
            &PackId([1; 32]),
            &rec,
            &[
                (ChunkId([7; 32]), loc(1, 0)),
                (ChunkId([8; 32]), loc(1, 10)),
            ],
        )?;
        // A chunk seen again in a later pack keeps its first location.
        store.commit_pack(&PackId([2; 32]), &rec, &[(ChunkId([7; 32]), loc(2, 0))])?;
        assert_eq!(store.chunk(&ChunkId([7; 32]))?, Some(loc(1, 0)));
        assert_eq!(store.chunk(&ChunkId([8; 32]))?, Some(loc(1, 10)));
        assert_eq!(store.chunk(&ChunkId([9; 32]))?, None);
        assert_eq!(store.chunk_count()?, 2);
        assert_eq!(
            store.outbox_usage()?,
            OutboxUsage {
                packs: 2,
                bytes: 131072
            }
        );
        assert_eq!(store.pack(&PackId([2; 32]))?, Some(rec.clone()));
        // Several packs in one commit: the same rules, within the batch too.
        let (a, b) = (
            [
                (ChunkId([10; 32]), loc(3, 0)),
                (ChunkId([7; 32]), loc(3, 10)),
            ],
            [
                (ChunkId([10; 32]), loc(4, 0)),
                (ChunkId([11; 32]), loc(4, 10)),
            ],
        );
        store.commit_packs([
            (&PackId([3; 32]), &rec, &a[..]),
            (&PackId([4; 32]), &rec, &b[..]),
        ])?;
        assert_eq!(store.chunk(&ChunkId([7; 32]))?, Some(loc(1, 0)));
        assert_eq!(store.chunk(&ChunkId([10; 32]))?, Some(loc(3, 0)));
        assert_eq!(store.chunk(&ChunkId([11; 32]))?, Some(loc(4, 10)));
        assert_eq!(store.chunk_count()?, 4);
        assert_eq!(store.outbox_usage()?.packs, 4);
        Ok(())
    }

    fn snapshots_are_ordered(store: &Store) -> TestResult {
        store.commit_snapshot(&SnapshotId([1; 32]), &record(20), b"head1", None)?;
        store.commit_snapshot(&SnapshotId([2; 32]), &record(10), b"head2", None)?;
        let ids: Vec<_> = store.snapshots()?.into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, vec![SnapshotId([2; 32]), SnapshotId([1; 32])]);
        assert_eq!(store.own_head()?, Some(b"head2".to_vec()));
        Ok(())
    }

    #[test]
    fn index_and_outbox_mem() -> TestResult {
        index_and_outbox(&Store::in_memory()?)
    }

    #[test]
    fn index_and_outbox_file() -> TestResult {
        let dir = tempfile::tempdir()?;
        index_and_outbox(&Store::open(
            &dir.path().join("s.redb"),
            &StoreOptions::default(),
        )?)
    }

    #[test]
    fn snapshots_are_ordered_mem() -> TestResult {
        snapshots_are_ordered(&Store::in_memory()?)
    }

    #[test]
    fn snapshots_are_ordered_file() -> TestResult {
        let dir = tempfile::tempdir()?;
        snapshots_are_ordered(&Store::open(
            &dir.path().join("s.redb"),
            &StoreOptions::default(),
        )?)
    }

    #[test]
    fn data_survives_reopen() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("s.redb");
        {
            let store = Store::open(&path, &StoreOptions::default())?;
            index_and_outbox(&store)?;
        }
        let store = Store::open(&path, &StoreOptions::default())?;
        assert_eq!(store.chunk(&ChunkId([8; 32]))?, Some(loc(1, 10)));
        Ok(())
    }

    #[test]
    fn a_generation_switch_replaces_the_own_tables_in_one_go() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("s.redb");
        let store = Store::open(&path, &StoreOptions::default())?;
        index_and_outbox(&store)?;
        store.commit_snapshot(&SnapshotId([1; 32]), &record(1), b"old head", None)?;
        store.add_placement(&PackId([1; 32]), b"friend")?;
        store.update_peer_state(b"friend", |s| s.head_seq = 9)?;
        let next = store.next_generation();
        assert!(!store.next_generation_started()?);
        assert_eq!(next.chunk_count()?, 0);
        let rec = PackRecord {
            len: 65536,
            chunks: 1,
            created_ns: 2,
            in_outbox: true,
        };
        next.commit_pack(&PackId([5; 32]), &rec, &[(ChunkId([6; 32]), loc(5, 0))])?;
        next.commit_snapshot(&SnapshotId([2; 32]), &record(2), b"new head", None)?;
        assert!(store.next_generation_started()?);
        store.put_memos(1, &[([1; 32], vec![1])])?;
        store.put_memos(2, &[([2; 32], vec![2])])?;
        store.prune_memos(1)?;
        assert_eq!(store.memo(&[1; 32])?, Some((1, vec![1])));
        assert_eq!(
            store.memo(&[2; 32])?,
            None,
            "a stamp above the last committed one"
        );
        // The current generation does not see the next one.
        assert_eq!(store.chunk(&ChunkId([6; 32]))?, None);
        assert_eq!(store.own_head()?, Some(b"old head".to_vec()));
        store.switch_generation(&[("rotation", b"x")])?;
        drop((store, next));
        let store = Store::open(&path, &StoreOptions::default())?;
        assert_eq!(store.chunk(&ChunkId([6; 32]))?, Some(loc(5, 0)));
        assert_eq!(store.chunk(&ChunkId([7; 32]))?, None);
        assert_eq!(store.packs()?.len(), 1);
        let snaps: Vec<_> = store.snapshots()?.into_iter().map(|(id, _)| id).collect();
        assert_eq!(snaps, vec![SnapshotId([2; 32])]);
        assert_eq!(store.own_head()?, Some(b"new head".to_vec()));
        assert_eq!(store.meta("rotation")?, Some(b"x".to_vec()));
        assert!(store.holders(&PackId([1; 32]))?.is_empty());
        assert_eq!(store.peer_state(b"friend")?.head_seq, 0);
        assert!(!store.next_generation_started()?);
        assert_eq!(store.memo(&[1; 32])?, None, "the switch empties the memo");
        Ok(())
    }

    #[test]
    fn file_cache_subtrees_are_dropped_by_key_range() -> TestResult {
        use obnam_protocol::local::dir_cache_key;
        let store = Store::in_memory()?;
        let rec = DirCache {
            stat_ns: 1,
            ..DirCache::default()
        };
        let keys: Vec<Vec<u8>> = [
            &[&b"a"[..]][..],
            &[b"a", b"b"],
            &[b"a", b"b", b"c"],
            &[b"a-b"],
            &[b"ab"],
        ]
        .iter()
        .map(|p| dir_cache_key(p.iter().copied()))
        .collect();
        let puts: Vec<_> = keys.iter().map(|k| (k.clone(), rec.clone())).collect();
        store.write_dir_caches(&puts, &[])?;
        assert_eq!(store.file_cache_dirs()?, 5);
        // Dropping /a/b removes it and /a/b/c, and keeps /a and the look-alikes of /a.
        store.write_dir_caches(&[], &[keys[1].clone()])?;
        assert_eq!(store.dir_cache(&keys[0])?, Some(rec.clone()));
        assert_eq!(store.dir_cache(&keys[1])?, None);
        assert_eq!(store.dir_cache(&keys[2])?, None);
        assert!(store.dir_cache(&keys[3])?.is_some());
        assert!(store.dir_cache(&keys[4])?.is_some());
        store.write_dir_caches(&[], &[keys[0].clone()])?;
        assert_eq!(store.file_cache_dirs()?, 2);
        store.clear_file_cache()?;
        assert_eq!(store.file_cache_dirs()?, 0);
        Ok(())
    }

    #[test]
    fn a_file_that_is_not_a_database_is_a_clear_error() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("s.redb");
        std::fs::write(&path, vec![0x55u8; 8192])?;
        let err = Store::open(&path, &StoreOptions::default()).unwrap_err();
        assert!(err.to_string().contains("s.redb"), "{err}");
        Ok(())
    }
}
