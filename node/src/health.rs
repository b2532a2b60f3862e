//! Per-snapshot health: how many friends hold every pack a snapshot uses, and what share of
//! those packs only one friend (or none) holds.
//!
//! The pack sets come from the store ([`obnam_store::packsets`]): a backup records its own.
//! Snapshots without one (after a recovery, after `keys rotate`, or from before pack sets were
//! recorded) get theirs from [`fill`], which reads their trees, and show as unknown until then.
//!
//! [`snapshot_health`] reads the whole chain once, oldest first, and keeps running totals, so a
//! call costs one pass over the packs and the changes between snapshots, not one pass over the
//! packs per snapshot.

use crate::error::NodeError;
use crate::keys::Keys;
use crate::repo::Repo;
use obnam_protocol::control::SnapshotHealth;
use obnam_protocol::tree::EntryKind;
use obnam_protocol::{ChunkId, PackId, SnapshotId};
use obnam_store::{PackChange, PackSets};
use std::collections::{HashMap, HashSet};

/// Packs fetched into the private cache while reading trees before it is emptied: bounds the
/// disk a [`fill`] uses to this many whole packs.
const FILL_CACHE_PACKS: usize = 32;

/// How well `friends` (peer id bytes: those whose copies count) hold each snapshot, oldest
/// first.
///
/// # Errors
/// Database errors.
pub fn snapshot_health(
    repo: &Repo,
    friends: &[Vec<u8>],
) -> Result<Vec<(SnapshotId, SnapshotHealth)>, NodeError> {
    // Each pack's length and which of `friends` hold it.
    let mut stats: HashMap<PackId, (u64, Vec<bool>)> = HashMap::new();
    for (id, rec) in repo.store.packs()? {
        let holders = repo.store.holders(&id)?;
        let held = friends.iter().map(|f| holders.contains(f)).collect();
        stats.insert(id, (rec.len, held));
    }
    let nobody = vec![false; friends.len()];
    let mut missing = vec![0i64; friends.len()];
    let mut acc = SnapshotHealth::default();
    let chain = repo.store.pack_sets()?;
    let mut walk = PackSets::new(&chain);
    let mut out = Vec::new();
    for (id, record) in chain {
        let known = walk.step(id, record.as_ref(), |change| {
            let (p, add) = match change {
                PackChange::Add(p) => (p, true),
                PackChange::Remove(p) => (p, false),
            };
            // A pack the index does not know is held by nobody and has no known length.
            let (len, held) = stats.get(&p).map_or((0, &nobody), |(l, h)| (*l, h));
            let n = held.iter().filter(|h| **h).count();
            let bump = |v: &mut u64| {
                *v = if add { *v + len } else { v.saturating_sub(len) };
            };
            bump(&mut acc.pack_bytes);
            match n {
                0 => bump(&mut acc.unheld_bytes),
                1 => bump(&mut acc.single_friend_bytes),
                _ => {}
            }
            for (m, h) in missing.iter_mut().zip(held) {
                if !h {
                    *m += if add { 1 } else { -1 };
                }
            }
        });
        out.push((
            id,
            if known {
                SnapshotHealth {
                    friends_holding_all: missing.iter().filter(|m| **m == 0).count() as u32,
                    ..acc
                }
            } else {
                SnapshotHealth {
                    unknown: true,
                    ..SnapshotHealth::default()
                }
            },
        ));
    }
    Ok(out)
}

/// What [`fill`] did: the snapshots recorded, and those that failed with why.
pub type Filled = (Vec<SnapshotId>, Vec<(SnapshotId, NodeError)>);

/// Works out the pack sets of the snapshots that have none, oldest first, by reading their
/// trees. Skipped while the index is known to be incomplete (see [`Repo::check_index`]), (from the outbox, or fetched from friends into a private cache that is emptied every
/// [`FILL_CACHE_PACKS`] packs). Snapshots in `skip` are left alone. Blocking: call it from a
/// blocking thread. Returns the snapshots recorded, and those that failed with why (a friend
/// unreachable, a chunk no pack holds); a failure does not stop the others.
///
/// # Errors
/// Database errors, or a missing owner key.
pub fn fill(repo: &Repo, skip: &HashSet<SnapshotId>) -> Result<Filled, NodeError> {
    let todo: Vec<SnapshotId> = repo
        .store
        .snapshots_without_pack_sets()?
        .into_iter()
        .filter(|s| !skip.contains(s))
        .collect();
    if todo.is_empty() || repo.check_index().is_err() {
        return Ok((Vec::new(), Vec::new()));
    }
    let owner = repo.owner()?;
    let records: HashMap<SnapshotId, Vec<ChunkId>> = repo
        .store
        .snapshots()?
        .into_iter()
        .map(|(id, r)| (id, r.root))
        .collect();
    let private = repo.with_private_cache();
    let (mut done, mut failed) = (Vec::new(), Vec::new());
    for id in todo {
        let Some(root) = records.get(&id) else {
            continue;
        };
        let result = packs_of(&private, &owner.keys, root)
            .and_then(|packs| Ok(repo.store.set_snapshot_packs(id, &packs)?));
        private.clear_cache();
        match result {
            Ok(true) => {
                tracing::info!(snapshot = %id.short(), "snapshot's pack set worked out from its trees");
                done.push(id);
            }
            // Known by now (a recovery or another fill got there first).
            Ok(false) => {}
            Err(e) => failed.push((id, e)),
        }
    }
    Ok((done, failed))
}

/// Every pack that holds a chunk of the tree `root` or of anything under it, sorted.
fn packs_of(repo: &Repo, keys: &Keys, root: &[ChunkId]) -> Result<Vec<PackId>, NodeError> {
    let pack_of = |c: &ChunkId| -> Result<PackId, NodeError> {
        repo.store
            .chunk(c)?
            .map(|loc| loc.pack)
            .ok_or_else(|| NodeError::IndexMissing {
                reason: format!("has no pack for chunk {}", c.short()),
            })
    };
    let mut packs = HashSet::new();
    let mut trees_seen: HashSet<[u8; 32]> = HashSet::new();
    let mut cached: HashSet<PackId> = HashSet::new();
    let mut stack = vec![root.to_vec()];
    while let Some(chunks) = stack.pop() {
        if chunks.is_empty() {
            continue;
        }
        let mut h = blake3::Hasher::new();
        for c in &chunks {
            h.update(c.as_bytes());
        }
        // A subtree that appears twice (a copied directory) is read once.
        if !trees_seen.insert(*h.finalize().as_bytes()) {
            continue;
        }
        for c in &chunks {
            let p = pack_of(c)?;
            packs.insert(p);
            if !repo.outbox.path(&p).exists() {
                cached.insert(p);
            }
        }
        if cached.len() > FILL_CACHE_PACKS {
            repo.clear_cache();
            cached.clear();
        }
        let tree = repo.read_tree(keys, &chunks)?;
        for e in tree.entries {
            match e.kind {
                EntryKind::Dir => stack.push(e.content),
                EntryKind::File => {
                    for c in &e.content {
                        packs.insert(pack_of(c)?);
                    }
                }
                _ => {}
            }
        }
    }
    let mut packs: Vec<PackId> = packs.into_iter().collect();
    packs.sort_unstable();
    Ok(packs)
}
