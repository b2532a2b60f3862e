//! Which packs each snapshot uses (`snapshot-packs-0`): the exact set behind each snapshot's
//! health figures (how many friends hold all of its packs, and what share only one holds).
//!
//! A backup records its set in the transaction that commits the snapshot. Snapshots that came
//! without one (adopted from friends by a recovery, rebuilt by `keys rotate`, or written before
//! this table existed) get theirs later, when the node walks their trees
//! ([`Store::set_snapshot_packs`]).
//!
//! Only the current key generation has pack sets: `keys rotate` empties the table when it
//! switches, and the rebuilt snapshots get theirs from their trees.
//!
//! Each record is a [`PackSetDelta`]: the change from the snapshot just before it in time order,
//! or the whole set when that one has none. Daily backups of a large, slowly changing data set
//! so cost a few packs each, not the whole list again. [`PackSets`] reads the chain back in
//! time order and treats a record whose base is not the snapshot just before it (a snapshot
//! adopted in between later) as missing, so that it is recomputed.

use crate::{Store, StoreError};
use obnam_protocol::local::PackSetDelta;
use obnam_protocol::snapshot::SnapshotRecord;
use obnam_protocol::{PackId, SnapshotId};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::HashSet;

pub(crate) const SNAPSHOT_PACKS: TableDefinition<&[u8; 32], &[u8]> =
    TableDefinition::new("snapshot-packs-0");

/// One step of [`PackSets::step`]: a pack that joins or leaves the running set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackChange {
    /// The snapshot uses this pack; the one before did not (or had no known set).
    Add(PackId),
    /// The snapshot before used this pack; this one does not (or has no known set).
    Remove(PackId),
}

/// Reads the pack-set chain in time order, keeping the set of the snapshot last fed.
#[derive(Debug, Default)]
pub struct PackSets {
    set: HashSet<PackId>,
    prev: Option<SnapshotId>,
    known: bool,
}

impl PackSets {
    /// Feeds the next snapshot in time order and its record, if any. Calls `change` for each
    /// pack that joins or leaves the running set; returns whether the snapshot's set is known.
    /// An unknown set leaves the running set empty.
    pub fn step(
        &mut self,
        id: SnapshotId,
        record: Option<&PackSetDelta>,
        mut change: impl FnMut(PackChange),
    ) -> bool {
        let usable = match record {
            None => None,
            Some(d) if d.base.is_none() => Some(d),
            Some(d) if self.known && d.base == self.prev => Some(d),
            Some(_) => None,
        };
        match usable {
            Some(d) if d.base.is_none() => {
                let whole: HashSet<PackId> = d.added.iter().copied().collect();
                self.set.retain(|p| {
                    let keep = whole.contains(p);
                    if !keep {
                        change(PackChange::Remove(*p));
                    }
                    keep
                });
                for p in &d.added {
                    if self.set.insert(*p) {
                        change(PackChange::Add(*p));
                    }
                }
            }
            Some(d) => {
                for p in &d.removed {
                    if self.set.remove(p) {
                        change(PackChange::Remove(*p));
                    }
                }
                for p in &d.added {
                    if self.set.insert(*p) {
                        change(PackChange::Add(*p));
                    }
                }
            }
            None => {
                for p in self.set.drain() {
                    change(PackChange::Remove(p));
                }
            }
        }
        self.prev = Some(id);
        self.known = usable.is_some();
        self.known
    }

    /// The running set, sorted.
    pub fn sorted(&self) -> Vec<PackId> {
        let mut v: Vec<PackId> = self.set.iter().copied().collect();
        v.sort_unstable();
        v
    }
}

/// Snapshot ids in time order (as [`Store::snapshots`] orders them).
fn ordered(
    table: &impl ReadableTable<&'static [u8; 32], &'static [u8]>,
) -> Result<Vec<SnapshotId>, StoreError> {
    let mut out = Vec::new();
    for item in table.iter()? {
        let (k, v) = item?;
        let id = SnapshotId(*k.value());
        let rec = SnapshotRecord::from_bytes(v.value()).map_err(|e| StoreError::Corrupt {
            what: format!("snapshot {id}"),
            source: e,
        })?;
        out.push((rec.time_ns, id));
    }
    out.sort_unstable();
    Ok(out.into_iter().map(|(_, id)| id).collect())
}

/// A record as stored; an undecodable one counts as missing (it is recomputed).
fn decode(bytes: Option<&[u8]>) -> Option<PackSetDelta> {
    bytes.and_then(|b| PackSetDelta::from_bytes(b).ok())
}

/// Writes `id`'s set as a change from the snapshot just before it, if that one's set is known.
fn put(
    snapshots: &[SnapshotId],
    sets: &mut redb::Table<'_, &'static [u8; 32], &'static [u8]>,
    id: SnapshotId,
    packs: &[PackId],
) -> Result<(), StoreError> {
    let mut packs = packs.to_vec();
    packs.sort_unstable();
    packs.dedup();
    let mut walk = PackSets::default();
    let mut base = None;
    for s in snapshots {
        if *s == id {
            break;
        }
        let rec = decode(sets.get(s.as_bytes())?.as_ref().map(|v| v.value()));
        let known = walk.step(*s, rec.as_ref(), |_| {});
        base = known.then_some(*s);
    }
    let old = base.map(|_| walk.sorted());
    let delta = PackSetDelta::between(base.zip(old.as_deref()), &packs);
    sets.insert(id.as_bytes(), delta.to_bytes().as_slice())?;
    Ok(())
}

impl Store {
    pub(crate) fn put_pack_set(
        &self,
        tx: &redb::WriteTransaction,
        id: SnapshotId,
        packs: &[PackId],
    ) -> Result<(), StoreError> {
        let snaps = tx.open_table(self.own.snapshots)?;
        let order = ordered(&snaps)?;
        let mut sets = tx.open_table(SNAPSHOT_PACKS)?;
        put(&order, &mut sets, id, packs)
    }

    /// Records which packs snapshot `id` uses (any order; duplicates are ignored). A snapshot
    /// that is not in the list is ignored.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn set_snapshot_packs(&self, id: SnapshotId, packs: &[PackId]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let snaps = tx.open_table(self.own.snapshots)?;
            let order = ordered(&snaps)?;
            if self.is_current() && order.contains(&id) {
                let mut sets = tx.open_table(SNAPSHOT_PACKS)?;
                put(&order, &mut sets, id, packs)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every snapshot in time order, with its pack-set record if it has one.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn pack_sets(&self) -> Result<Vec<(SnapshotId, Option<PackSetDelta>)>, StoreError> {
        let tx = self.db.begin_read()?;
        let snaps = tx.open_table(self.own.snapshots)?;
        let sets = tx.open_table(SNAPSHOT_PACKS)?;
        let mut out = Vec::new();
        for id in ordered(&snaps)? {
            let rec = if self.is_current() {
                decode(sets.get(id.as_bytes())?.as_ref().map(|v| v.value()))
            } else {
                None
            };
            out.push((id, rec));
        }
        Ok(out)
    }

    /// Snapshots whose pack set is not known (no record, or one that does not chain), oldest
    /// first.
    ///
    /// # Errors
    /// As [`Store::pack_sets`].
    pub fn snapshots_without_pack_sets(&self) -> Result<Vec<SnapshotId>, StoreError> {
        let mut walk = PackSets::default();
        Ok(self
            .pack_sets()?
            .into_iter()
            .filter(|(id, rec)| !walk.step(*id, rec.as_ref(), |_| {}))
            .map(|(id, _)| id)
            .collect())
    }

    /// Forgets every pack set (the snapshots they named are gone).
    pub(crate) fn clear_pack_sets(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
        tx.open_table(SNAPSHOT_PACKS)?.retain(|_, _| false)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use obnam_protocol::snapshot::{ChunkerParams, SnapshotRecord};

    fn record(t: i64) -> SnapshotRecord {
        SnapshotRecord {
            time_ns: t,
            host: "h".into(),
            paths: Vec::new(),
            tags: Vec::new(),
            root: Vec::new(),
            files: 0,
            dirs: 0,
            bytes: 0,
            failed_files: 0,
            chunker: ChunkerParams::V1,
        }
    }

    fn p(b: u8) -> PackId {
        PackId([b; 32])
    }

    /// Every snapshot's set, rebuilt from the records (None where unknown).
    fn sets(store: &Store) -> Vec<Option<Vec<PackId>>> {
        let mut walk = PackSets::default();
        store
            .pack_sets()
            .unwrap()
            .into_iter()
            .map(|(id, rec)| walk.step(id, rec.as_ref(), |_| {}).then(|| walk.sorted()))
            .collect()
    }

    #[test]
    fn sets_chain_and_survive_gaps() -> Result<(), StoreError> {
        let store = Store::in_memory()?;
        let s = |b: u8| SnapshotId([b; 32]);
        store.commit_snapshot(&s(1), &record(10), b"h1", Some(&[p(2), p(1)]))?;
        store.commit_snapshot(&s(2), &record(20), b"h2", Some(&[p(1), p(3), p(3)]))?;
        // Stored as a change: one pack added, one removed.
        let recs = store.pack_sets()?;
        let d = recs[1].1.clone().unwrap();
        assert_eq!(
            (d.base, d.added, d.removed),
            (Some(s(1)), vec![p(3)], vec![p(2)])
        );
        // A snapshot without a set (adopted from friends) in between.
        store.commit_snapshot(&s(3), &record(30), b"h3", None)?;
        store.commit_snapshot(&s(4), &record(40), b"h4", Some(&[p(3), p(4)]))?;
        assert_eq!(
            sets(&store),
            vec![
                Some(vec![p(1), p(2)]),
                Some(vec![p(1), p(3)]),
                None,
                Some(vec![p(3), p(4)])
            ]
        );
        assert_eq!(store.snapshots_without_pack_sets()?, vec![s(3)]);
        store.set_snapshot_packs(s(3), &[p(5)])?;
        assert!(store.snapshots_without_pack_sets()?.is_empty());
        assert_eq!(sets(&store)[2], Some(vec![p(5)]));
        assert_eq!(sets(&store)[3], Some(vec![p(3), p(4)]));
        // An older snapshot adopted later breaks the chain after it, up to the next whole set
        // (snapshot 4 was recorded whole while 3 had no set): those are recomputed.
        store.adopt_head(&[(s(9), record(15))], b"h9")?;
        assert_eq!(store.snapshots_without_pack_sets()?, vec![s(9), s(2), s(3)]);
        // Unknown snapshots are ignored.
        store.set_snapshot_packs(s(8), &[p(1)])?;
        assert_eq!(store.pack_sets()?.len(), 5);
        Ok(())
    }

    #[test]
    fn changes_report_joins_and_leaves() {
        let mut walk = PackSets::default();
        let mut seen = Vec::new();
        let whole = PackSetDelta::between(None, &[p(1), p(2)]);
        assert!(walk.step(SnapshotId([1; 32]), Some(&whole), |c| seen.push(c)));
        assert_eq!(seen.len(), 2);
        seen.clear();
        // A change whose base is not the snapshot before: unknown, and the set empties.
        let stray = PackSetDelta::between(Some((SnapshotId([7; 32]), &[])), &[p(3)]);
        assert!(!walk.step(SnapshotId([2; 32]), Some(&stray), |c| seen.push(c)));
        seen.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(
            seen,
            vec![PackChange::Remove(p(1)), PackChange::Remove(p(2))]
        );
        assert!(walk.sorted().is_empty());
    }
}
