//! The storage role and the friend list.
//!
//! | table | key → value |
//! |---|---|
//! | `friends-0` | peer id bytes → [`Friend`] |
//! | `owners-0` | owner id → [`HostedOwner`] (the bound node, bytes used) |
//! | `hosted-0` | owner id ‖ pack id → pack length (the body is a file beside the database) |
//! | `heads-0` | owner id → sequence (u64 LE) ‖ signed head |
//! | `slots-0` | lookup id → owner id ‖ key slot |
//! | `placement-0` | pack id →→ peer id bytes (multimap: friends holding our pack) |
//! | `peer-state-0` | peer id bytes → [`PeerState`] (what we sent that friend) |
//! | `dropped-0` | owner id ‖ pack id → when (ns): hosted packs dropped as lost or corrupt, until the owner stores them again |
//! | `suspect-0` | pack id →→ peer id bytes (multimap: friends that failed an audit of our pack; their word that they hold it counts for nothing until an audit of it passes or they store it again) |
//! | `friend-health-0` | peer id bytes → [`FriendHealth`] (audits and presence of that friend) |
//!
//! Quota is counted in logical bytes (pack lengths) and checked in the same write transaction
//! that records the pack.

use crate::{Store, StoreError};
use obnam_protocol::local::{Friend, FriendHealth, HostedOwner, PeerState};
use obnam_protocol::{LookupId, OwnerId, PackId};
use redb::{
    MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    TableDefinition,
};

pub(crate) const FRIENDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("friends-0");
pub(crate) const OWNERS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("owners-0");
pub(crate) const HOSTED: TableDefinition<&[u8; 64], u64> = TableDefinition::new("hosted-0");
pub(crate) const HEADS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("heads-0");
pub(crate) const SLOTS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("slots-0");
pub(crate) const PLACEMENT: MultimapTableDefinition<&[u8; 32], &[u8]> =
    MultimapTableDefinition::new("placement-0");
pub(crate) const PEER_STATE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("peer-state-0");
pub(crate) const DROPPED: TableDefinition<&[u8; 64], i64> = TableDefinition::new("dropped-0");
pub(crate) const SUSPECT: MultimapTableDefinition<&[u8; 32], &[u8]> =
    MultimapTableDefinition::new("suspect-0");
pub(crate) const FRIEND_HEALTH: TableDefinition<&[u8], &[u8]> =
    TableDefinition::new("friend-health-0");
/// Retired owner → its successor. Kept after the owner's data is deleted, so that the retired
/// key can never be bound (or written for) again.
pub(crate) const RETIRED: TableDefinition<&[u8; 32], &[u8; 32]> = TableDefinition::new("retired-0");

pub(crate) fn corrupt(what: String) -> impl FnOnce(obnam_protocol::DecodeError) -> StoreError {
    move |source| StoreError::Corrupt { what, source }
}

/// Changes a friend's [`PeerState`] inside `tx` (a default one if it has none yet).
fn modify_peer_state(
    tx: &redb::WriteTransaction,
    peer: &[u8],
    f: impl FnOnce(&mut PeerState),
) -> Result<PeerState, StoreError> {
    let mut t = tx.open_table(PEER_STATE)?;
    let mut state = match t.get(peer)? {
        None => PeerState::default(),
        Some(v) => PeerState::from_bytes(v.value()).map_err(corrupt("peer state".into()))?,
    };
    f(&mut state);
    t.insert(peer, state.to_bytes().as_slice())?;
    Ok(state)
}

/// A stored head: its sequence number (u64 little-endian) and the signed head after it.
fn split_head(b: &[u8]) -> (u64, &[u8]) {
    let mut s = [0u8; 8];
    let n = b.len().min(8);
    s[..n].copy_from_slice(&b[..n]);
    (u64::from_le_bytes(s), b.get(8..).unwrap_or_default())
}

fn hosted_key(owner: &OwnerId, pack: &PackId) -> [u8; 64] {
    let mut k = [0u8; 64];
    k[..32].copy_from_slice(owner.as_bytes());
    k[32..].copy_from_slice(pack.as_bytes());
    k
}

/// An owner's record in the owners table.
fn owner_record(
    t: &impl ReadableTable<&'static [u8; 32], &'static [u8]>,
    owner: &OwnerId,
) -> Result<Option<HostedOwner>, StoreError> {
    match t.get(owner.as_bytes())? {
        Some(v) => Ok(Some(
            HostedOwner::from_bytes(v.value()).map_err(corrupt(format!("owner {owner}")))?,
        )),
        None => Ok(None),
    }
}

/// Most owner keys one friend's node may bind here.
pub const MAX_OWNERS_PER_FRIEND: usize = 16;

/// The result of binding an owner to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Binding {
    /// Refused: that node has bound [`MAX_OWNERS_PER_FRIEND`] owners already.
    TooMany,
    /// Newly bound, or already bound to this node.
    Bound,
    /// Bound to another node (its peer id bytes).
    Elsewhere(Vec<u8>),
    /// The owner key was retired (`keys rotate`) and takes no more writes.
    Retired,
}

/// The result of a successor statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetireOutcome {
    /// The old owner is retired (now or before), the new one is bound to the same node, and the
    /// key slot is the new owner's.
    Retired,
    /// Refused: the old owner is not bound to the sending node here.
    NotBound,
    /// Refused: the new owner is bound to another node.
    NewElsewhere,
}

/// The result of storing a hosted pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// Stored now.
    Stored,
    /// Already stored: nothing changed.
    AlreadyHad,
    /// Refused: the quota would be exceeded; `available` bytes are left.
    QuotaExceeded {
        /// Bytes left under the quota.
        available: u64,
    },
    /// Refused: the owner is not bound to a friend of ours.
    NoQuota,
}

/// The result of storing a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadOutcome {
    /// Stored (or the same head again).
    Stored,
    /// Refused: not newer than the stored head with this sequence number.
    Stale {
        /// The stored sequence number.
        stored: u64,
    },
}

impl Store {
    /// Adds or replaces a friend.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn put_friend(&self, friend: &Friend) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(FRIENDS)?
            .insert(friend.peer_id.as_slice(), friend.to_bytes().as_slice())?;
        tx.commit()?;
        Ok(())
    }

    /// Removes a friend; returns whether it was one.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn remove_friend(&self, peer: &[u8]) -> Result<bool, StoreError> {
        let tx = self.db.begin_write()?;
        let existed = tx.open_table(FRIENDS)?.remove(peer)?.is_some();
        tx.commit()?;
        Ok(existed)
    }

    /// A friend by peer id bytes.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn friend(&self, peer: &[u8]) -> Result<Option<Friend>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(FRIENDS)?;
        match t.get(peer)? {
            None => Ok(None),
            Some(v) => Ok(Some(
                Friend::from_bytes(v.value()).map_err(corrupt("friend record".into()))?,
            )),
        }
    }

    /// Every friend.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn friends(&self) -> Result<Vec<Friend>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(FRIENDS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (_, v) = item?;
            out.push(Friend::from_bytes(v.value()).map_err(corrupt("friend record".into()))?);
        }
        Ok(out)
    }

    /// Binds an owner to the node that proved its key, unless it is bound to another node.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn bind_owner(&self, owner: &OwnerId, peer: &[u8]) -> Result<Binding, StoreError> {
        let tx = self.db.begin_write()?;
        if tx.open_table(RETIRED)?.get(owner.as_bytes())?.is_some() {
            return Ok(Binding::Retired);
        }
        let outcome = {
            let mut t = tx.open_table(OWNERS)?;
            let existing = owner_record(&t, owner)?;
            match existing {
                Some(rec) if rec.bound_peer != peer => Binding::Elsewhere(rec.bound_peer),
                Some(_) => Binding::Bound,
                None => {
                    // A friend's node may prove many owner keys; bound owners cost a head and a
                    // slot each, outside the quota, so their number is capped.
                    let mut bound_here = 0;
                    for item in t.iter()? {
                        let (_, v) = item?;
                        if HostedOwner::from_bytes(v.value()).is_ok_and(|o| o.bound_peer == peer) {
                            bound_here += 1;
                        }
                    }
                    if bound_here >= MAX_OWNERS_PER_FRIEND {
                        return Ok(Binding::TooMany);
                    }
                    let rec = HostedOwner {
                        bound_peer: peer.to_vec(),
                        used: 0,
                        packs: 0,
                    };
                    t.insert(owner.as_bytes(), rec.to_bytes().as_slice())?;
                    Binding::Bound
                }
            }
        };
        tx.commit()?;
        Ok(outcome)
    }

    /// A hosted owner's record.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn hosted_owner(&self, owner: &OwnerId) -> Result<Option<HostedOwner>, StoreError> {
        let tx = self.db.begin_read()?;
        owner_record(&tx.open_table(OWNERS)?, owner)
    }

    /// Every hosted owner.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn hosted_owners(&self) -> Result<Vec<(OwnerId, HostedOwner)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(OWNERS)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, v) = item?;
            let id = OwnerId(*k.value());
            out.push((
                id,
                HostedOwner::from_bytes(v.value()).map_err(corrupt(format!("owner {id}")))?,
            ));
        }
        Ok(out)
    }

    /// Whether we host this pack of this owner.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn has_hosted(&self, owner: &OwnerId, pack: &PackId) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx
            .open_table(HOSTED)?
            .get(&hosted_key(owner, pack))?
            .map(|v| v.value()))
    }

    /// Bytes still available to an owner: the quota granted to the friend it is bound to, less
    /// what it uses. `None` when the owner is not bound to a friend.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn available(&self, owner: &OwnerId) -> Result<Option<(u64, u64)>, StoreError> {
        let Some(rec) = self.hosted_owner(owner)? else {
            return Ok(None);
        };
        let Some(friend) = self.friend(&rec.bound_peer)? else {
            return Ok(None);
        };
        let used = self
            .hosted_owners()?
            .iter()
            .filter(|(_, o)| o.bound_peer == rec.bound_peer)
            .map(|(_, o)| o.used)
            .sum();
        Ok(Some((friend.quota_given, used)))
    }

    /// Records a hosted pack whose body is already durable in its file, checking the quota in
    /// the same transaction.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn commit_hosted(
        &self,
        owner: &OwnerId,
        pack: &PackId,
        len: u64,
    ) -> Result<PutOutcome, StoreError> {
        let tx = self.db.begin_write()?;
        let outcome = {
            let mut hosted = tx.open_table(HOSTED)?;
            let key = hosted_key(owner, pack);
            if hosted.get(&key)?.is_some() {
                PutOutcome::AlreadyHad
            } else {
                let mut owners = tx.open_table(OWNERS)?;
                let rec = owner_record(&owners, owner)?;
                let friend = match &rec {
                    Some(r) => match tx.open_table(FRIENDS)?.get(r.bound_peer.as_slice())? {
                        Some(v) => Some(
                            Friend::from_bytes(v.value())
                                .map_err(corrupt("friend record".into()))?,
                        ),
                        None => None,
                    },
                    None => None,
                };
                match (rec, friend) {
                    (Some(mut rec), Some(friend)) => {
                        // The quota belongs to the friend, whatever number of owner keys its
                        // node proves: count every owner bound to it.
                        let mut used_by_friend = 0u64;
                        for item in owners.iter()? {
                            let (_, v) = item?;
                            let o = HostedOwner::from_bytes(v.value())
                                .map_err(corrupt("hosted owner".into()))?;
                            if o.bound_peer == rec.bound_peer {
                                used_by_friend += o.used;
                            }
                        }
                        if used_by_friend.saturating_add(len) > friend.quota_given {
                            PutOutcome::QuotaExceeded {
                                available: friend.quota_given.saturating_sub(used_by_friend),
                            }
                        } else {
                            rec.used += len;
                            rec.packs += 1;
                            owners.insert(owner.as_bytes(), rec.to_bytes().as_slice())?;
                            hosted.insert(&key, len)?;
                            tx.open_table(DROPPED)?.remove(&key)?;
                            PutOutcome::Stored
                        }
                    }
                    _ => PutOutcome::NoQuota,
                }
            }
        };
        tx.commit()?;
        Ok(outcome)
    }

    /// Stores an owner's head if its sequence number is above the stored one (or it is the same
    /// head).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn put_head(
        &self,
        owner: &OwnerId,
        seq: u64,
        head: &[u8],
    ) -> Result<HeadOutcome, StoreError> {
        let tx = self.db.begin_write()?;
        let outcome = {
            let mut t = tx.open_table(HEADS)?;
            let stored = t.get(owner.as_bytes())?.map(|v| {
                let (seq, head) = split_head(v.value());
                (seq, head.to_vec())
            });
            match stored {
                Some((s, bytes)) if s > seq || (s == seq && bytes != head) => {
                    HeadOutcome::Stale { stored: s }
                }
                _ => {
                    let mut v = seq.to_le_bytes().to_vec();
                    v.extend_from_slice(head);
                    t.insert(owner.as_bytes(), v.as_slice())?;
                    HeadOutcome::Stored
                }
            }
        };
        tx.commit()?;
        Ok(outcome)
    }

    /// An owner's stored head and its sequence number.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn get_head(&self, owner: &OwnerId) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(HEADS)?;
        Ok(t.get(owner.as_bytes())?.map(|v| {
            let (seq, head) = split_head(v.value());
            (seq, head.to_vec())
        }))
    }

    /// Files an owner's key slot under its lookup id, replacing any older slot of that owner.
    /// Returns false, and changes nothing, when the lookup id is filed for another owner.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn put_slot(
        &self,
        owner: &OwnerId,
        lookup: &LookupId,
        slot: &[u8],
    ) -> Result<bool, StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(SLOTS)?;
            // First owner wins: a lookup id filed for another owner is never overwritten (a
            // friend that learned someone's lookup id must not be able to replace their slot).
            if let Some(v) = t.get(lookup.as_bytes())?
                && v.value().get(..32) != Some(owner.as_bytes().as_slice())
            {
                return Ok(false);
            }
            let mut stale = Vec::new();
            for item in t.iter()? {
                let (k, v) = item?;
                if v.value().get(..32) == Some(owner.as_bytes().as_slice())
                    && k.value() != lookup.as_bytes()
                {
                    stale.push(*k.value());
                }
            }
            for k in stale {
                t.remove(&k)?;
            }
            let mut v = owner.as_bytes().to_vec();
            v.extend_from_slice(slot);
            t.insert(lookup.as_bytes(), v.as_slice())?;
        }
        tx.commit()?;
        Ok(true)
    }

    /// The key slot filed under a lookup id, with its owner.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn get_slot(&self, lookup: &LookupId) -> Result<Option<(OwnerId, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(SLOTS)?;
        Ok(t.get(lookup.as_bytes())?.and_then(|v| {
            let b = v.value();
            let owner: [u8; 32] = b.get(..32)?.try_into().ok()?;
            Some((OwnerId(owner), b[32..].to_vec()))
        }))
    }

    /// Records that a friend holds one of our packs.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn add_placement(&self, pack: &PackId, peer: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_multimap_table(PLACEMENT)?
            .insert(pack.as_bytes(), peer)?;
        tx.commit()?;
        Ok(())
    }

    /// Forgets that a friend holds one of our packs (it failed an audit or said it has not got
    /// it): the pack counts as below its replica target until repaired. Returns whether the
    /// placement was known.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn remove_placement(&self, pack: &PackId, peer: &[u8]) -> Result<bool, StoreError> {
        // Most calls find nothing to remove (a friend's dropped list repeats every round): look
        // before opening a write transaction.
        if !self.holders(pack)?.iter().any(|h| h == peer) {
            return Ok(false);
        }
        let tx = self.db.begin_write()?;
        let removed = tx
            .open_multimap_table(PLACEMENT)?
            .remove(pack.as_bytes(), peer)?;
        tx.commit()?;
        Ok(removed)
    }

    /// A failed audit: the friend no longer counts as holding the pack, and its word that it
    /// holds it (a `Have` answer, an upload answered "already stored") counts for nothing until
    /// an audit of that pack passes ([`Store::confirm_placement`]) or it stores the pack again.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn suspect_placement(&self, pack: &PackId, peer: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_multimap_table(PLACEMENT)?
            .remove(pack.as_bytes(), peer)?;
        tx.open_multimap_table(SUSPECT)?
            .insert(pack.as_bytes(), peer)?;
        tx.commit()?;
        Ok(())
    }

    /// Proof that a friend holds the pack (an audit passed, or it stored the pack now): it
    /// counts as a holder and is no longer suspect.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn confirm_placement(&self, pack: &PackId, peer: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_multimap_table(PLACEMENT)?
            .insert(pack.as_bytes(), peer)?;
        tx.open_multimap_table(SUSPECT)?
            .remove(pack.as_bytes(), peer)?;
        tx.commit()?;
        Ok(())
    }

    /// A friend stored one of our packs of `len` bytes: [`Store::confirm_placement`] and the
    /// friend's `used_by_us` grows by `len`, in one commit (an upload's bookkeeping used to take
    /// two, each an fsync).
    ///
    /// The commit is not synced (`Durability::None`): the next durable commit of this database
    /// (eviction's, a backup's index commit, any other write) makes it durable with it, and
    /// nothing irreversible depends on it before that (eviction commits durably before it removes
    /// a file). A crash in between forgets that the friend holds the pack; the next round sends
    /// it again and the friend answers that it has it. One fsync per pack and friend was on
    /// every upload lane's path, on a disk the friend may share.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn confirm_upload(&self, pack: &PackId, peer: &[u8], len: u64) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write()?;
        tx.set_durability(redb::Durability::None)?;
        tx.open_multimap_table(PLACEMENT)?
            .insert(pack.as_bytes(), peer)?;
        tx.open_multimap_table(SUSPECT)?
            .remove(pack.as_bytes(), peer)?;
        modify_peer_state(&tx, peer, |s| s.used_by_us += len)?;
        tx.commit()?;
        Ok(())
    }

    /// Whether a friend failed an audit of the pack and has not proved it since.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn is_suspect(&self, pack: &PackId, peer: &[u8]) -> Result<bool, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_multimap_table(SUSPECT)?;
        for v in t.get(pack.as_bytes())? {
            if v?.value() == peer {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The packs a friend is suspect for (audits retry them).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn suspects_of(&self, peer: &[u8]) -> Result<Vec<PackId>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_multimap_table(SUSPECT)?;
        let mut out = Vec::new();
        for item in t.iter()? {
            let (k, vs) = item?;
            for v in vs {
                if v?.value() == peer {
                    out.push(PackId(*k.value()));
                }
            }
        }
        Ok(out)
    }

    /// Drops a hosted pack whose body is gone or corrupt: the record goes and its bytes no
    /// longer count against the owner's quota. Returns the pack's length if it was recorded.
    /// The caller removes the body.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn drop_hosted(&self, owner: &OwnerId, pack: &PackId) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_write()?;
        let dropped = {
            let mut hosted = tx.open_table(HOSTED)?;
            let key = hosted_key(owner, pack);
            let len = hosted.remove(&key)?.map(|v| v.value());
            if let Some(len) = len {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
                    .unwrap_or(0);
                tx.open_table(DROPPED)?.insert(&key, now)?;
                let mut owners = tx.open_table(OWNERS)?;
                if let Some(mut rec) = owner_record(&owners, owner)? {
                    rec.used = rec.used.saturating_sub(len);
                    rec.packs = rec.packs.saturating_sub(1);
                    owners.insert(owner.as_bytes(), rec.to_bytes().as_slice())?;
                }
            }
            len
        };
        tx.commit()?;
        Ok(dropped)
    }

    /// Packs of `owner` dropped here as lost or corrupt and not stored again since, at most
    /// `limit`: the owner asks for them at each contact and repairs them.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn dropped_packs(&self, owner: &OwnerId, limit: usize) -> Result<Vec<PackId>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(DROPPED)?;
        let start = hosted_key(owner, &PackId([0; 32]));
        let end = hosted_key(owner, &PackId([0xff; 32]));
        let mut out = Vec::new();
        for item in t.range::<&[u8; 64]>(&start..=&end)?.take(limit) {
            let (k, _) = item?;
            let mut id = [0u8; 32];
            id.copy_from_slice(&k.value()[32..]);
            out.push(PackId(id));
        }
        Ok(out)
    }

    /// Forgets dropped-pack entries older than `before_ns`: an owner that has not stored them
    /// again in that time has been told often enough.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn expire_dropped(&self, before_ns: i64) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        tx.open_table(DROPPED)?.retain(|_, at| at >= before_ns)?;
        tx.commit()?;
        Ok(())
    }

    /// A friend's audit and presence record (empty when none yet, or when it does not decode).
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn friend_health(&self, peer: &[u8]) -> Result<FriendHealth, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(FRIEND_HEALTH)?;
        // Health is advice: a record that does not decode (another version) starts afresh rather
        // than stop replication.
        Ok(t.get(peer)?
            .and_then(|v| FriendHealth::from_bytes(v.value()).ok())
            .unwrap_or_default())
    }

    /// Updates a friend's audit and presence record.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn update_friend_health(
        &self,
        peer: &[u8],
        f: impl FnOnce(&mut FriendHealth),
    ) -> Result<FriendHealth, StoreError> {
        let tx = self.db.begin_write()?;
        let health = {
            let mut t = tx.open_table(FRIEND_HEALTH)?;
            let mut health = t
                .get(peer)?
                .and_then(|v| FriendHealth::from_bytes(v.value()).ok())
                .unwrap_or_default();
            f(&mut health);
            t.insert(peer, health.to_bytes().as_slice())?;
            health
        };
        tx.commit()?;
        Ok(health)
    }

    /// The friends known to hold one of our packs.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn holders(&self, pack: &PackId) -> Result<Vec<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_multimap_table(PLACEMENT)?;
        let mut out = Vec::new();
        for v in t.get(pack.as_bytes())? {
            out.push(v?.value().to_vec());
        }
        Ok(out)
    }

    /// For each friend (peer id bytes), how many of our packs it is known to hold: one scan of
    /// the placement table.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn holder_counts(&self) -> Result<std::collections::HashMap<Vec<u8>, u64>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_multimap_table(PLACEMENT)?;
        let mut counts = std::collections::HashMap::new();
        for item in t.iter()? {
            let (_, holders) = item?;
            for h in holders {
                *counts.entry(h?.value().to_vec()).or_insert(0) += 1;
            }
        }
        Ok(counts)
    }

    /// Marks our `packs` as no longer in the outbox (their files are about to be removed), in
    /// one commit.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn mark_sent_many(&self, packs: &[PackId]) -> Result<(), StoreError> {
        if packs.is_empty() {
            return Ok(());
        }
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(self.own.packs)?;
            for pack in packs {
                let rec = match t.get(pack.as_bytes())? {
                    None => continue,
                    Some(v) => obnam_protocol::local::PackRecord::from_bytes(v.value())
                        .map_err(corrupt(format!("pack record {pack}")))?,
                };
                let mut rec = rec;
                rec.in_outbox = false;
                t.insert(pack.as_bytes(), rec.to_bytes().as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Marks one of our packs as back in the outbox (repair fetched it from a friend).
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn mark_in_outbox(&self, pack: &PackId) -> Result<(), StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(self.own.packs)?;
            let rec = match t.get(pack.as_bytes())? {
                Some(v) => Some(
                    obnam_protocol::local::PackRecord::from_bytes(v.value())
                        .map_err(corrupt(format!("pack record {pack}")))?,
                ),
                None => None,
            };
            if let Some(mut rec) = rec {
                rec.in_outbox = true;
                t.insert(pack.as_bytes(), rec.to_bytes().as_slice())?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// What we sent a friend.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn peer_state(&self, peer: &[u8]) -> Result<PeerState, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(PEER_STATE)?;
        match t.get(peer)? {
            None => Ok(PeerState::default()),
            Some(v) => PeerState::from_bytes(v.value()).map_err(corrupt("peer state".into())),
        }
    }

    /// Updates what we sent a friend.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn update_peer_state(
        &self,
        peer: &[u8],
        f: impl FnOnce(&mut PeerState),
    ) -> Result<PeerState, StoreError> {
        let tx = self.db.begin_write()?;
        let state = modify_peer_state(&tx, peer, f)?;
        tx.commit()?;
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn friend(peer: u8, quota: u64) -> Friend {
        Friend {
            peer_id: vec![peer],
            name: "f".into(),
            household: String::new(),
            addrs: vec![],
            quota_given: quota,
            added_ns: 0,
        }
    }

    fn quota_is_enforced_in_the_write(store: &Store) -> TestResult {
        let owner = OwnerId([1; 32]);
        assert_eq!(
            store.commit_hosted(&owner, &PackId([1; 32]), 10)?,
            PutOutcome::NoQuota
        );
        store.put_friend(&friend(7, 100))?;
        assert_eq!(store.bind_owner(&owner, &[7])?, Binding::Bound);
        assert_eq!(store.bind_owner(&owner, &[7])?, Binding::Bound);
        assert_eq!(store.bind_owner(&owner, &[8])?, Binding::Elsewhere(vec![7]));
        assert_eq!(
            store.commit_hosted(&owner, &PackId([1; 32]), 60)?,
            PutOutcome::Stored
        );
        assert_eq!(
            store.commit_hosted(&owner, &PackId([1; 32]), 60)?,
            PutOutcome::AlreadyHad
        );
        assert_eq!(
            store.commit_hosted(&owner, &PackId([2; 32]), 50)?,
            PutOutcome::QuotaExceeded { available: 40 }
        );
        assert_eq!(
            store.commit_hosted(&owner, &PackId([2; 32]), 40)?,
            PutOutcome::Stored
        );
        assert_eq!(store.available(&owner)?, Some((100, 100)));
        assert_eq!(store.has_hosted(&owner, &PackId([2; 32]))?, Some(40));
        assert_eq!(store.hosted_owner(&owner)?.map(|o| o.packs), Some(2));
        // A second owner key proved by the same friend shares its quota.
        let other = OwnerId([2; 32]);
        store.bind_owner(&other, &[7])?;
        assert_eq!(
            store.commit_hosted(&other, &PackId([3; 32]), 1)?,
            PutOutcome::QuotaExceeded { available: 0 }
        );
        assert_eq!(store.available(&other)?, Some((100, 100)));
        // A dropped pack (corrupt or lost) frees its bytes, and can be stored again.
        assert_eq!(store.drop_hosted(&owner, &PackId([2; 32]))?, Some(40));
        assert_eq!(store.drop_hosted(&owner, &PackId([2; 32]))?, None);
        assert_eq!(store.dropped_packs(&owner, 10)?, vec![PackId([2; 32])]);
        assert_eq!(store.dropped_packs(&other, 10)?, vec![]);
        store.expire_dropped(0)?;
        assert_eq!(
            store.dropped_packs(&owner, 10)?.len(),
            1,
            "recent entries stay"
        );
        assert_eq!(store.has_hosted(&owner, &PackId([2; 32]))?, None);
        assert_eq!(store.available(&owner)?, Some((100, 60)));
        assert_eq!(store.hosted_owner(&owner)?.map(|o| o.packs), Some(1));
        assert_eq!(
            store.commit_hosted(&owner, &PackId([2; 32]), 40)?,
            PutOutcome::Stored
        );
        assert_eq!(store.dropped_packs(&owner, 10)?, vec![], "stored again");
        Ok(())
    }

    fn heads_only_move_forward(store: &Store) -> TestResult {
        let owner = OwnerId([1; 32]);
        assert_eq!(store.put_head(&owner, 2, b"two")?, HeadOutcome::Stored);
        assert_eq!(
            store.put_head(&owner, 2, b"two")?,
            HeadOutcome::Stored,
            "the same head again is fine"
        );
        assert_eq!(
            store.put_head(&owner, 2, b"fork")?,
            HeadOutcome::Stale { stored: 2 }
        );
        assert_eq!(
            store.put_head(&owner, 1, b"one")?,
            HeadOutcome::Stale { stored: 2 }
        );
        assert_eq!(store.put_head(&owner, 3, b"three")?, HeadOutcome::Stored);
        assert_eq!(store.get_head(&owner)?, Some((3, b"three".to_vec())));
        Ok(())
    }

    fn slots_replace_older_ones(store: &Store) -> TestResult {
        let owner = OwnerId([1; 32]);
        assert!(store.put_slot(&owner, &LookupId([1; 32]), b"old")?);
        assert!(
            !store.put_slot(&OwnerId([9; 32]), &LookupId([1; 32]), b"evil")?,
            "another owner cannot overwrite a slot"
        );
        assert_eq!(
            store.get_slot(&LookupId([1; 32]))?,
            Some((owner, b"old".to_vec()))
        );
        store.put_slot(&owner, &LookupId([2; 32]), b"new")?;
        assert_eq!(store.get_slot(&LookupId([1; 32]))?, None);
        assert_eq!(
            store.get_slot(&LookupId([2; 32]))?,
            Some((owner, b"new".to_vec()))
        );
        Ok(())
    }

    #[test]
    fn storage_role_mem() -> TestResult {
        let s = Store::in_memory()?;
        quota_is_enforced_in_the_write(&s)?;
        heads_only_move_forward(&s)?;
        slots_replace_older_ones(&s)
    }

    #[test]
    fn storage_role_file() -> TestResult {
        let dir = tempfile::tempdir()?;
        let s = Store::open(&dir.path().join("s.redb"), &crate::StoreOptions::default())?;
        quota_is_enforced_in_the_write(&s)?;
        heads_only_move_forward(&s)?;
        slots_replace_older_ones(&s)?;
        s.add_placement(&PackId([5; 32]), &[1])?;
        s.add_placement(&PackId([5; 32]), &[2])?;
        s.add_placement(&PackId([5; 32]), &[1])?;
        assert_eq!(s.holders(&PackId([5; 32]))?, vec![vec![1], vec![2]]);
        s.add_placement(&PackId([6; 32]), &[1])?;
        let counts = s.holder_counts()?;
        assert_eq!((counts[&vec![1u8]], counts[&vec![2u8]]), (2, 1));
        assert!(s.remove_placement(&PackId([5; 32]), &[1])?);
        assert!(!s.remove_placement(&PackId([5; 32]), &[1])?);
        assert_eq!(s.holders(&PackId([5; 32]))?, vec![vec![2]]);
        s.suspect_placement(&PackId([5; 32]), &[2])?;
        assert!(s.holders(&PackId([5; 32]))?.is_empty());
        assert!(s.is_suspect(&PackId([5; 32]), &[2])?);
        assert!(!s.is_suspect(&PackId([5; 32]), &[1])?);
        assert_eq!(s.suspects_of(&[2])?, vec![PackId([5; 32])]);
        s.confirm_placement(&PackId([5; 32]), &[2])?;
        assert!(!s.is_suspect(&PackId([5; 32]), &[2])?);
        assert_eq!(s.holders(&PackId([5; 32]))?, vec![vec![2]]);
        assert_eq!(s.friend_health(&[1])?.audits_failed, 0);
        s.update_friend_health(&[1], |h| h.audits_failed += 2)?;
        assert_eq!(s.friend_health(&[1])?.audits_failed, 2);
        s.update_peer_state(&[1], |p| p.head_seq = 4)?;
        assert_eq!(s.peer_state(&[1])?.head_seq, 4);
        // An upload: placed, no longer suspect, and counted in what the friend holds for us.
        s.suspect_placement(&PackId([6; 32]), &[1])?;
        s.confirm_upload(&PackId([6; 32]), &[1], 1000)?;
        s.confirm_upload(&PackId([7; 32]), &[1], 500)?;
        assert!(!s.is_suspect(&PackId([6; 32]), &[1])?);
        assert_eq!(s.holders(&PackId([7; 32]))?, vec![vec![1]]);
        assert_eq!(s.peer_state(&[1])?.used_by_us, 1500);
        assert_eq!(s.peer_state(&[1])?.head_seq, 4);
        assert!(s.remove_friend(&[7])?);
        // The uploads' unsynced commits became durable with the durable commit after them.
        drop(s);
        let s = Store::open(&dir.path().join("s.redb"), &crate::StoreOptions::default())?;
        assert_eq!(s.holders(&PackId([7; 32]))?, vec![vec![1]]);
        assert_eq!(s.peer_state(&[1])?.used_by_us, 1500);
        Ok(())
    }
}

/// The result of a takeover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeoverOutcome {
    /// The owner now belongs to the new node (the previous node's peer id bytes).
    Moved(Vec<u8>),
    /// The owner already belonged to that node.
    Same,
    /// Refused: the statement starts below the head stored here.
    Stale {
        /// The stored head's sequence number.
        stored: u64,
    },
    /// Refused: this node hosts nothing for that owner.
    Unknown,
}

impl Store {
    /// The successor of a retired owner.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn successor(&self, owner: &OwnerId) -> Result<Option<OwnerId>, StoreError> {
        let tx = self.db.begin_read()?;
        Ok(tx
            .open_table(RETIRED)?
            .get(owner.as_bytes())?
            .map(|v| OwnerId(*v.value())))
    }

    /// Retires `old` in favour of `new`, in one transaction: `new` is bound to `peer` (which must
    /// be `old`'s node), the slot under `lookup` becomes `new`'s (unless another owner filed it),
    /// other slots of `old` are removed, and `old` takes no more writes. Its data stays until
    /// [`Store::delete_owner`]. Sending it again changes nothing.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn retire_owner(
        &self,
        old: &OwnerId,
        new: &OwnerId,
        peer: &[u8],
        lookup: &LookupId,
        slot: &[u8],
    ) -> Result<RetireOutcome, StoreError> {
        let tx = self.db.begin_write()?;
        {
            let mut owners = tx.open_table(OWNERS)?;
            let old_rec = owner_record(&owners, old)?;
            if old_rec.is_none_or(|r| r.bound_peer != peer) {
                return Ok(RetireOutcome::NotBound);
            }
            let new_rec = owner_record(&owners, new)?;
            match new_rec {
                Some(r) if r.bound_peer != peer => return Ok(RetireOutcome::NewElsewhere),
                Some(_) => {}
                None => {
                    let rec = HostedOwner {
                        bound_peer: peer.to_vec(),
                        used: 0,
                        packs: 0,
                    };
                    owners.insert(new.as_bytes(), rec.to_bytes().as_slice())?;
                }
            }
            let mut slots = tx.open_table(SLOTS)?;
            let mut stale = Vec::new();
            for item in slots.iter()? {
                let (k, v) = item?;
                if v.value().get(..32) == Some(old.as_bytes().as_slice())
                    && k.value() != lookup.as_bytes()
                {
                    stale.push(*k.value());
                }
            }
            for k in stale {
                slots.remove(&k)?;
            }
            let filed_by = slots
                .get(lookup.as_bytes())?
                .and_then(|v| v.value().get(..32).map(<[u8]>::to_vec));
            let ours = filed_by
                .as_deref()
                .is_none_or(|o| o == old.as_bytes().as_slice() || o == new.as_bytes().as_slice());
            if ours {
                let mut v = new.as_bytes().to_vec();
                v.extend_from_slice(slot);
                slots.insert(lookup.as_bytes(), v.as_slice())?;
            }
            tx.open_table(RETIRED)?
                .insert(old.as_bytes(), new.as_bytes())?;
        }
        tx.commit()?;
        Ok(RetireOutcome::Retired)
    }

    /// Deletes everything stored for a retired owner bound to `peer`: its pack records, head,
    /// slots and binding (the caller removes the pack files). Returns the bytes freed, or
    /// `None` when the owner is not retired or not bound to `peer` (nothing changes). The
    /// retirement record stays.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn delete_owner(&self, owner: &OwnerId, peer: &[u8]) -> Result<Option<u64>, StoreError> {
        let tx = self.db.begin_write()?;
        let freed = {
            if tx.open_table(RETIRED)?.get(owner.as_bytes())?.is_none() {
                return Ok(None);
            }
            let mut owners = tx.open_table(OWNERS)?;
            let rec = owner_record(&owners, owner)?;
            let Some(rec) = rec else {
                // Deleted before: done.
                return Ok(Some(0));
            };
            if rec.bound_peer != peer {
                return Ok(None);
            }
            owners.remove(owner.as_bytes())?;
            let start = hosted_key(owner, &PackId([0; 32]));
            let end = hosted_key(owner, &PackId([0xff; 32]));
            tx.open_table(HOSTED)?
                .retain_in::<&[u8; 64], _>(&start..=&end, |_, _| false)?;
            tx.open_table(DROPPED)?
                .retain_in::<&[u8; 64], _>(&start..=&end, |_, _| false)?;
            tx.open_table(HEADS)?.remove(owner.as_bytes())?;
            tx.open_table(SLOTS)?
                .retain(|_, v| v.get(..32) != Some(owner.as_bytes().as_slice()))?;
            rec.used
        };
        tx.commit()?;
        Ok(Some(freed))
    }

    /// The owner's packs held here, in id order, after `after`, at most `limit`.
    ///
    /// # Errors
    /// [`StoreError::Db`].
    pub fn hosted_packs(
        &self,
        owner: &OwnerId,
        after: Option<&PackId>,
        limit: usize,
    ) -> Result<Vec<(PackId, u64)>, StoreError> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(HOSTED)?;
        let start = match after {
            Some(p) => {
                // The first key after (owner, p): increment the pack id as a big-endian number.
                let mut k = hosted_key(owner, p);
                let mut i = 63;
                loop {
                    let (v, carry) = k[i].overflowing_add(1);
                    k[i] = v;
                    if !carry || i == 32 {
                        if carry {
                            return Ok(Vec::new());
                        }
                        break;
                    }
                    i -= 1;
                }
                k
            }
            None => hosted_key(owner, &PackId([0; 32])),
        };
        let end = hosted_key(owner, &PackId([0xff; 32]));
        let mut out = Vec::new();
        for item in t.range::<&[u8; 64]>(&start..=&end)? {
            let (k, v) = item?;
            let mut id = [0u8; 32];
            id.copy_from_slice(&k.value()[32..]);
            out.push((PackId(id), v.value()));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Moves an owner to a new node: the owner binding and the friendship (name, household,
    /// quota) of the old node pass to the new one, in one transaction. The old node can no longer
    /// write for that owner.
    ///
    /// # Errors
    /// [`StoreError::Db`] or [`StoreError::Corrupt`].
    pub fn takeover(
        &self,
        owner: &OwnerId,
        new_peer: &[u8],
        from_seq: u64,
    ) -> Result<TakeoverOutcome, StoreError> {
        let tx = self.db.begin_write()?;
        if tx.open_table(RETIRED)?.get(owner.as_bytes())?.is_some() {
            // A retired key moves nowhere: its data waits for deletion by its node.
            return Ok(TakeoverOutcome::Unknown);
        }
        let outcome = {
            let mut owners = tx.open_table(OWNERS)?;
            let rec = owner_record(&owners, owner)?;
            let stored_seq = tx
                .open_table(HEADS)?
                .get(owner.as_bytes())?
                .map(|v| split_head(v.value()).0);
            match (rec, stored_seq) {
                (None, _) => TakeoverOutcome::Unknown,
                // Already this node's: a statement sent again after later backups is fine.
                (Some(rec), _) if rec.bound_peer == new_peer => TakeoverOutcome::Same,
                (Some(_), Some(s)) if s > from_seq => TakeoverOutcome::Stale { stored: s },
                (Some(mut rec), _) => {
                    let old = std::mem::replace(&mut rec.bound_peer, new_peer.to_vec());
                    owners.insert(owner.as_bytes(), rec.to_bytes().as_slice())?;
                    let mut friends = tx.open_table(FRIENDS)?;
                    let old_friend = match friends.remove(old.as_slice())? {
                        Some(v) => Some(
                            Friend::from_bytes(v.value())
                                .map_err(corrupt("friend record".into()))?,
                        ),
                        None => None,
                    };
                    if let Some(mut f) = old_friend {
                        f.peer_id = new_peer.to_vec();
                        f.addrs.clear();
                        friends.insert(new_peer, f.to_bytes().as_slice())?;
                    }
                    TakeoverOutcome::Moved(old)
                }
            }
        };
        tx.commit()?;
        Ok(outcome)
    }
}

#[cfg(test)]
mod recovery_tests {
    use super::*;

    #[test]
    fn packs_are_listed_in_pages_per_owner() -> Result<(), Box<dyn std::error::Error>> {
        let s = Store::in_memory()?;
        let (a, b) = (OwnerId([1; 32]), OwnerId([2; 32]));
        s.put_friend(&Friend {
            peer_id: vec![7],
            name: "f".into(),
            household: String::new(),
            addrs: vec![],
            quota_given: 1 << 30,
            added_ns: 0,
        })?;
        s.bind_owner(&a, &[7])?;
        s.bind_owner(&b, &[7])?;
        for i in 0..5u8 {
            s.commit_hosted(&a, &PackId([i; 32]), 10)?;
        }
        s.commit_hosted(&b, &PackId([9; 32]), 10)?;
        let first = s.hosted_packs(&a, None, 2)?;
        assert_eq!(
            first.iter().map(|p| p.0).collect::<Vec<_>>(),
            vec![PackId([0; 32]), PackId([1; 32])]
        );
        let rest = s.hosted_packs(&a, Some(&first[1].0), 10)?;
        assert_eq!(rest.len(), 3);
        assert!(
            s.hosted_packs(&a, Some(&PackId([0xff; 32])), 10)?
                .is_empty()
        );
        assert_eq!(s.hosted_packs(&b, None, 10)?, vec![(PackId([9; 32]), 10)]);
        Ok(())
    }

    #[test]
    fn a_retired_owner_hands_over_its_slot_then_is_deleted()
    -> Result<(), Box<dyn std::error::Error>> {
        let s = Store::in_memory()?;
        let (old, new, lookup) = (OwnerId([1; 32]), OwnerId([2; 32]), LookupId([3; 32]));
        s.put_friend(&Friend {
            peer_id: vec![7],
            name: "alice".into(),
            household: String::new(),
            addrs: vec![],
            quota_given: 1000,
            added_ns: 5,
        })?;
        // Deleting an owner that was never retired does nothing.
        s.bind_owner(&old, &[7])?;
        assert_eq!(s.delete_owner(&old, &[7])?, None);
        assert_eq!(
            s.commit_hosted(&old, &PackId([4; 32]), 100)?,
            PutOutcome::Stored
        );
        s.put_head(&old, 3, b"old head")?;
        assert!(s.put_slot(&old, &lookup, b"old slot")?);
        // Only the old owner's node may retire it.
        assert_eq!(
            s.retire_owner(&old, &new, &[8], &lookup, b"new slot")?,
            RetireOutcome::NotBound
        );
        assert_eq!(s.get_slot(&lookup)?, Some((old, b"old slot".to_vec())));
        assert_eq!(
            s.retire_owner(&old, &new, &[7], &lookup, b"new slot")?,
            RetireOutcome::Retired
        );
        assert_eq!(
            s.retire_owner(&old, &new, &[7], &lookup, b"new slot")?,
            RetireOutcome::Retired,
            "sent again"
        );
        assert_eq!(s.get_slot(&lookup)?, Some((new, b"new slot".to_vec())));
        assert_eq!(s.hosted_owner(&new)?.map(|o| o.bound_peer), Some(vec![7]));
        assert_eq!(s.successor(&old)?, Some(new));
        // The old data stays readable until it is deleted, by its node only.
        assert_eq!(s.hosted_packs(&old, None, 10)?.len(), 1);
        assert_eq!(s.delete_owner(&old, &[8])?, None);
        assert_eq!(s.delete_owner(&old, &[7])?, Some(100));
        assert_eq!(s.delete_owner(&old, &[7])?, Some(0), "deleted before");
        assert!(s.hosted_packs(&old, None, 10)?.is_empty());
        assert_eq!(s.get_head(&old)?, None);
        assert_eq!(s.hosted_owner(&old)?, None);
        assert_eq!(
            s.available(&new)?,
            Some((1000, 0)),
            "the quota is free again"
        );
        // A retired key can never be bound again, nor taken over.
        assert_eq!(s.bind_owner(&old, &[7])?, Binding::Retired);
        assert_eq!(s.takeover(&old, &[9], 3)?, TakeoverOutcome::Unknown);
        Ok(())
    }

    #[test]
    fn a_takeover_moves_binding_and_friendship() -> Result<(), Box<dyn std::error::Error>> {
        let s = Store::in_memory()?;
        let owner = OwnerId([1; 32]);
        assert_eq!(s.takeover(&owner, &[8], 1)?, TakeoverOutcome::Unknown);
        s.put_friend(&Friend {
            peer_id: vec![7],
            name: "alice".into(),
            household: "h".into(),
            addrs: vec![],
            quota_given: 100,
            added_ns: 5,
        })?;
        s.bind_owner(&owner, &[7])?;
        s.put_head(&owner, 4, b"head")?;
        assert_eq!(
            s.takeover(&owner, &[8], 3)?,
            TakeoverOutcome::Stale { stored: 4 }
        );
        assert_eq!(
            s.takeover(&owner, &[8], 4)?,
            TakeoverOutcome::Moved(vec![7])
        );
        assert_eq!(s.takeover(&owner, &[8], 4)?, TakeoverOutcome::Same);
        s.put_head(&owner, 9, b"later")?;
        assert_eq!(
            s.takeover(&owner, &[8], 4)?,
            TakeoverOutcome::Same,
            "a statement sent again after later backups"
        );
        assert_eq!(s.hosted_owner(&owner)?.map(|o| o.bound_peer), Some(vec![8]));
        assert!(
            s.friend(&[7])?.is_none(),
            "the old node is no longer the friend"
        );
        let moved = s.friend(&[8])?.expect("moved friend");
        assert_eq!((moved.name.as_str(), moved.quota_given), ("alice", 100));
        assert_eq!(s.bind_owner(&owner, &[7])?, Binding::Elsewhere(vec![8]));
        Ok(())
    }
}
