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
//! time order; a record resolves through the snapshot it names, also when another snapshot was
//! adopted in between since. A known set is never rewritten, so no later record's base
//! changes under it.

use crate::{Store, StoreError};
use obnam_protocol::local::PackSetDelta;
use obnam_protocol::{PackId, SnapshotId};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::{HashMap, HashSet};

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

/// Reads the pack-set chain in time order, keeping the set of the snapshot last fed, and the
/// sets of the snapshots that a later record names as its base though they are not just
/// before it (a snapshot was adopted in between since).
#[derive(Debug, Default)]
pub struct PackSets {
    set: HashSet<PackId>,
    prev: Option<SnapshotId>,
    known: bool,
    wanted: HashSet<SnapshotId>,
    kept: HashMap<SnapshotId, HashSet<PackId>>,
}

impl PackSets {
    /// A reader for `chain` (every snapshot in time order with its record), which is then fed
    /// to [`PackSets::step`] in the same order.
    pub fn new(chain: &[(SnapshotId, Option<PackSetDelta>)]) -> Self {
        let mut wanted = HashSet::new();
        let mut prev = None;
        for (id, rec) in chain {
            if let Some(b) = rec.as_ref().and_then(|r| r.base)
                && Some(b) != prev
            {
                wanted.insert(b);
            }
            prev = Some(*id);
        }
        Self {
            wanted,
            ..Self::default()
        }
    }

    /// Moves the running set to `target`, reporting each change.
    fn become_set(&mut self, target: HashSet<PackId>, change: &mut impl FnMut(PackChange)) {
        for p in &self.set {
            if !target.contains(p) {
                change(PackChange::Remove(*p));
            }
        }
        for p in &target {
            if !self.set.contains(p) {
                change(PackChange::Add(*p));
            }
        }
        self.set = target;
    }

    /// Feeds the next snapshot in time order and its record, if any. Calls `change` for each
    /// pack that joins or leaves the running set; returns whether the snapshot's set is known.
    /// A record resolves through its base: the snapshot just before it (the usual case, done
    /// as a change of the running set), or an earlier one kept for it. An unknown set leaves
    /// the running set empty.
    pub fn step(
        &mut self,
        id: SnapshotId,
        record: Option<&PackSetDelta>,
        mut change: impl FnMut(PackChange),
    ) -> bool {
        let known = match record {
            None => false,
            Some(d) => match d.base {
                None => {
                    self.become_set(d.added.iter().copied().collect(), &mut change);
                    true
                }
                Some(b) if self.known && self.prev == Some(b) => {
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
                    true
                }
                Some(b) => match self.kept.get(&b) {
                    Some(base) => {
                        let mut target = base.clone();
                        for p in &d.removed {
                            target.remove(p);
                        }
                        target.extend(d.added.iter().copied());
                        self.become_set(target, &mut change);
                        true
                    }
                    None => false,
                },
            },
        };
        if !known {
            for p in self.set.drain() {
                change(PackChange::Remove(p));
            }
        }
        if known && self.wanted.contains(&id) {
            self.kept.insert(id, self.set.clone());
        }
        self.prev = Some(id);
        self.known = known;
        known
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
    Ok(crate::read_snapshots(table)?
        .into_iter()
        .map(|(id, _)| id)
        .collect())
}

/// A record as stored; an undecodable one counts as missing (it is recomputed).
fn decode(bytes: Option<&[u8]>) -> Option<PackSetDelta> {
    bytes.and_then(|b| PackSetDelta::from_bytes(b).ok())
}

/// Writes `id`'s set as a change from the snapshot just before it, if that one's set is
/// known, else whole. With `only_if_unknown`, leaves a set that is already known alone (a
/// later record may be a change from it). Returns whether it wrote.
fn put(
    snapshots: &[SnapshotId],
    sets: &mut redb::Table<'_, &'static [u8; 32], &'static [u8]>,
    id: SnapshotId,
    packs: &[PackId],
    only_if_unknown: bool,
) -> Result<bool, StoreError> {
    let mut packs = packs.to_vec();
    packs.sort_unstable();
    packs.dedup();
    let mut chain = Vec::with_capacity(snapshots.len());
    for s in snapshots {
        chain.push((
            *s,
            decode(sets.get(s.as_bytes())?.as_ref().map(|v| v.value())),
        ));
    }
    let mut walk = PackSets::new(&chain);
    let mut base = None;
    let mut own = None;
    for (s, rec) in &chain {
        if *s == id {
            own = rec.as_ref();
            break;
        }
        base = walk.step(*s, rec.as_ref(), |_| {}).then_some(*s);
    }
    let old = base.map(|_| walk.sorted());
    if only_if_unknown && own.is_some() && walk.step(id, own, |_| {}) {
        return Ok(false);
    }
    let delta = PackSetDelta::between(base.zip(old.as_deref()), &packs);
    sets.insert(id.as_bytes(), delta.to_bytes().as_slice())?;
    Ok(true)
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
        put(&order, &mut sets, id, packs, false).map(|_| ())
    }

    /// Records which packs snapshot `id` uses (any order; duplicates are ignored), unless its
    /// set is known by now (a later record may be a change from it). A snapshot that is not in
    /// the list is ignored. Returns whether it wrote.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn set_snapshot_packs(&self, id: SnapshotId, packs: &[PackId]) -> Result<bool, StoreError> {
        let tx = self.db.begin_write()?;
        let wrote = {
            let snaps = tx.open_table(self.own.snapshots)?;
            let order = ordered(&snaps)?;
            if self.is_current() && order.contains(&id) {
                let mut sets = tx.open_table(SNAPSHOT_PACKS)?;
                put(&order, &mut sets, id, packs, true)?
            } else {
                false
            }
        };
        tx.commit()?;
        Ok(wrote)
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
        let chain = self.pack_sets()?;
        let mut walk = PackSets::new(&chain);
        Ok(chain
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
        let chain = store.pack_sets().unwrap();
        let mut walk = PackSets::new(&chain);
        chain
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
        assert!(store.set_snapshot_packs(s(3), &[p(5)])?);
        assert!(store.snapshots_without_pack_sets()?.is_empty());
        assert_eq!(sets(&store)[2], Some(vec![p(5)]));
        assert_eq!(sets(&store)[3], Some(vec![p(3), p(4)]));
        // A known set is not rewritten.
        assert!(!store.set_snapshot_packs(s(3), &[p(6)])?);
        assert_eq!(sets(&store)[2], Some(vec![p(5)]));
        // An older snapshot adopted later: only it lacks a set; the one after it still resolves
        // through its own base.
        store.adopt_head(&[(s(9), record(15))], b"h9")?;
        assert_eq!(store.snapshots_without_pack_sets()?, vec![s(9)]);
        assert_eq!(sets(&store)[2], Some(vec![p(1), p(3)]));
        assert!(store.set_snapshot_packs(s(9), &[p(7)])?);
        assert_eq!(
            sets(&store),
            vec![
                Some(vec![p(1), p(2)]),
                Some(vec![p(7)]),
                Some(vec![p(1), p(3)]),
                Some(vec![p(5)]),
                Some(vec![p(3), p(4)])
            ]
        );
        // Unknown snapshots are ignored.
        assert!(!store.set_snapshot_packs(s(8), &[p(1)])?);
        assert_eq!(store.pack_sets()?.len(), 5);
        Ok(())
    }

    #[test]
    fn changes_report_joins_and_leaves() {
        let mut walk = PackSets::default();
        // (No chain given: no record names a base out of order.)
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
