//! Replication: gets every pack and the newest head onto the owner's replica set.
//!
//! An actor task ([`Replicator::run`]) makes a round when woken (after a backup, when a friend
//! connects, after `peer add`) and every `replication_interval_secs`. A round:
//!
//! 1. chooses the replica set: `replicas` friends, one per household first, skipping friends
//!    that refused for quota (they are replaced by others);
//! 2. for each member, in parallel: proves the owner key if asked, pushes the key slot if the
//!    friend lacks it, streams every outbox pack the friend does not hold, and then the head
//!    (only once the friend holds every pack);
//! 3. removes from the outbox the packs that `replicas` friends hold;
//! 4. while a key rotation retires the old owner key ([`crate::rotate`]) and the replica set
//!    holds everything of the new key: sends every friend a successor statement, and once all
//!    have switched, a delete-owner request; then forgets the old key.
//!
//! Its state is durable (outbox, placements, peer state in redb), so a restart loses nothing:
//! the next round carries on. Progress is published on a watch channel, which `obnam backup`
//! waits on.

use crate::error::NodeError;
use crate::keys::Owner;
use crate::net::Net;
use crate::peers::{self, Upload};
use crate::repo::Repo;
use libp2p::{Multiaddr, PeerId};
use obnam_protocol::local::Friend;
use obnam_protocol::msg::{ErrorCode, Request, Response, SuccessorStatement};
use obnam_protocol::snapshot::SignedHead;
use serde_bytes::ByteBuf;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, watch};

const META_RETIRE: &str = "retire-state";
/// Failed repair fetches after which a round's repair stops.
const MAX_REPAIR_FAILURES: usize = 3;

/// Which friends switched to the new owner key, and which deleted the old key's data.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct RetireState {
    switched: Vec<ByteBuf>,
    deleted: Vec<ByteBuf>,
}

/// How far replication is for one head.
#[derive(Debug, Clone, Default)]
pub struct Health {
    /// Friends holding every pack and a head at least this new.
    pub holders: u32,
    /// The size of the replica set (`min(replicas, eligible friends)`).
    pub target: u32,
    /// The configured number of replicas.
    pub replicas: u32,
    /// Members of the replica set still missing something, with what.
    pub waiting: Vec<String>,
}

/// The replication actor.
pub struct Replicator {
    repo: Repo,
    net: Net,
    wake: Arc<Notify>,
    progress: watch::Sender<u64>,
    sent: AtomicU64,
    repaired: AtomicU64,
    errors: Mutex<HashMap<PeerId, String>>,
    /// Friends that accepted our takeover statement in this run.
    took_over: Mutex<HashSet<PeerId>>,
    /// Packs whose repair failed and was reported: the same failure is logged once, not every
    /// round, until a repair of the pack succeeds.
    repair_reported: Arc<Mutex<HashSet<obnam_protocol::PackId>>>,
}

fn peer_of(f: &Friend) -> Option<PeerId> {
    PeerId::from_bytes(&f.peer_id).ok()
}

/// A friend as the placement policy sees it: no I/O, so the simulations can call
/// [`choose_replica_set`] with the node's own rules.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// When it was added (earlier friends come first).
    pub added_ns: i64,
    /// A tie-breaker: its peer id bytes.
    pub id: &'a [u8],
    /// Its household ("" for none).
    pub household: &'a str,
    /// Whether it may hold our data now: not refusing for quota, not having removed us, not lost.
    pub eligible: bool,
}

/// The placement policy: up to `replicas` eligible friends, earliest added first, one per
/// household before a second from any household. Returns indexes into `candidates`.
pub fn choose_replica_set(candidates: &[Candidate<'_>], replicas: usize) -> Vec<usize> {
    let mut eligible: Vec<usize> = (0..candidates.len())
        .filter(|&i| candidates[i].eligible)
        .collect();
    eligible.sort_by_key(|&i| (candidates[i].added_ns, candidates[i].id));
    let mut set: Vec<usize> = Vec::new();
    let mut households = HashSet::new();
    for &i in &eligible {
        let h = candidates[i].household;
        if set.len() < replicas && (h.is_empty() || households.insert(h)) {
            set.push(i);
        }
    }
    for &i in &eligible {
        if set.len() < replicas && !set.contains(&i) {
            set.push(i);
        }
    }
    set
}

/// Whether a friend last seen at `seen_ns` (or added then) counts as lost at `now_ns`.
pub fn is_lost(now_ns: i64, seen_ns: i64, lost_after_secs: u64) -> bool {
    let lost_after = i64::try_from(lost_after_secs)
        .unwrap_or(i64::MAX)
        .saturating_mul(1_000_000_000);
    now_ns.saturating_sub(seen_ns) > lost_after
}

fn addrs_of(f: &Friend) -> Vec<Multiaddr> {
    f.addrs
        .iter()
        .filter_map(|a| Multiaddr::try_from(a.to_vec()).ok())
        .collect()
}

impl Replicator {
    /// Where to dial a friend: the addresses given to `peer add`, and those of its newest
    /// signed address record (unless `learn_addresses` is off).
    fn friend_addrs(&self, f: &Friend) -> Vec<Multiaddr> {
        let mut addrs = addrs_of(f);
        if self.repo.config.learn_addresses
            && let Ok(Some(rec)) = self.repo.store.address_record(&f.peer_id)
            && let Ok(checked) = crate::addrbook::open(&rec.envelope)
        {
            for a in checked.addrs {
                if !addrs.contains(&a) {
                    addrs.push(a);
                }
            }
        }
        addrs
    }

    /// A replicator for the node's repository and network.
    pub fn new(repo: Repo, net: Net, wake: Arc<Notify>) -> Arc<Self> {
        let (progress, _) = watch::channel(0);
        Arc::new(Self {
            repo,
            net,
            wake,
            progress,
            sent: AtomicU64::new(0),
            repaired: AtomicU64::new(0),
            errors: Mutex::new(HashMap::new()),
            took_over: Mutex::new(HashSet::new()),
            repair_reported: Arc::default(),
        })
    }

    /// Bounds one transfer with the request timeout, so a friend that stops answering cannot
    /// stall a round.
    async fn timed<T>(
        &self,
        bytes: u64,
        f: impl std::future::Future<Output = Result<T, NodeError>>,
    ) -> Result<T, NodeError> {
        // The request timeout, plus time for the bytes at a slow 32 KiB/s uplink.
        let limit =
            Duration::from_secs(self.repo.config.request_timeout_secs.max(1) + bytes / (32 * 1024));
        tokio::time::timeout(limit, f)
            .await
            .map_err(|_| NodeError::Net(format!("a transfer took longer than {limit:?}")))?
    }

    /// Asks for a round soon.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// A receiver that changes whenever something reached a friend.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.progress.subscribe()
    }

    /// Bytes sent to friends since the node started.
    pub fn sent_bytes(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Number of friends.
    ///
    /// # Errors
    /// Database errors.
    pub fn friend_count(&self) -> Result<usize, NodeError> {
        Ok(self.repo.store.friends()?.len())
    }

    /// The last error seen with a friend.
    pub fn last_error(&self, peer: &PeerId) -> Option<String> {
        self.errors.lock().ok().and_then(|e| e.get(peer).cloned())
    }

    fn bump(&self) {
        self.progress.send_modify(|v| *v += 1);
    }

    /// Records the last error with `peer`. It is logged as a warning when it is new, and at
    /// debug level when it repeats the last one (a friend that is away fails every round).
    fn note_error(&self, peer: PeerId, e: impl std::fmt::Display) {
        let text = e.to_string();
        let Ok(mut m) = self.errors.lock() else {
            tracing::warn!(%peer, error = %text, "replication");
            return;
        };
        if m.get(&peer) == Some(&text) {
            tracing::debug!(%peer, error = %text, "replication (again)");
        } else {
            tracing::warn!(%peer, error = %text, "replication");
        }
        m.insert(peer, text);
    }

    /// Runs rounds until the node stops.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        loop {
            let started = std::time::Instant::now();
            if let Err(e) = self.round().await {
                tracing::warn!(error = %e.full_message(), "replication round failed");
            }
            tracing::debug!(took = ?started.elapsed(), "replication round done");
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// The replica set: up to `replicas` friends, one per household first, skipping friends
    /// that refused for quota, friends that no longer accept us as a friend, and friends unseen for longer than `lost_after_secs` (their copies
    /// count as lost; they are audited, and count again, when they are back).
    pub fn replica_set(&self, friends: &[Friend]) -> Result<Vec<Friend>, NodeError> {
        let now = crate::repo::now_ns();
        let mut candidates = Vec::new();
        for f in friends {
            candidates.push(Candidate {
                added_ns: f.added_ns,
                id: &f.peer_id,
                household: &f.household,
                eligible: !self.repo.store.peer_state(&f.peer_id)?.quota_refused
                    && self.counts(f, now)?,
            });
        }
        Ok(
            choose_replica_set(&candidates, self.repo.config.replicas as usize)
                .into_iter()
                .map(|i| friends[i].clone())
                .collect(),
        )
    }

    /// Whether a friend's copies count: it has not removed us, and it was seen within
    /// `lost_after_secs` (or is connected now).
    ///
    /// # Errors
    /// Database errors.
    pub fn counts(&self, f: &Friend, now: i64) -> Result<bool, NodeError> {
        let online = peer_of(f).is_some_and(|p| self.net.is_connected(&p));
        let health = self.repo.store.friend_health(&f.peer_id)?;
        let seen = health.last_seen_ns.max(f.added_ns);
        Ok(health.refused_since_ns == 0
            && (online || !is_lost(now, seen, self.repo.config.lost_after_secs)))
    }

    /// The friends whose copies count ([`Replicator::counts`]), as peer id bytes.
    ///
    /// # Errors
    /// Database errors.
    pub fn counted_friends(&self) -> Result<Vec<Vec<u8>>, NodeError> {
        let now = crate::repo::now_ns();
        let mut out = Vec::new();
        for f in self.repo.store.friends()? {
            if self.counts(&f, now)? {
                out.push(f.peer_id);
            }
        }
        Ok(out)
    }

    /// How many friends hold every pack and a head of sequence `seq` or newer (friends whose
    /// copies do not count, see [`Replicator::counts`], are not counted).
    ///
    /// # Errors
    /// Database errors.
    pub fn health(&self, seq: u64) -> Result<Health, NodeError> {
        let friends = self.repo.store.friends()?;
        let set = self.replica_set(&friends)?;
        // One scan of the placements, not one lookup per pack and friend.
        let packs = self.repo.store.packs()?.len() as u64;
        let counts = self.repo.store.holder_counts()?;
        let mut holders = 0;
        let mut waiting = Vec::new();
        let now = crate::repo::now_ns();
        for f in &friends {
            if !self.counts(f, now)? {
                continue;
            }
            let state = self.repo.store.peer_state(&f.peer_id)?;
            let held = counts.get(&f.peer_id).copied().unwrap_or(0);
            let missing = packs.saturating_sub(held);
            let complete = missing == 0 && state.head_seq >= seq;
            if complete {
                holders += 1;
            } else if set.iter().any(|s| s.peer_id == f.peer_id) {
                let name = peer_of(f).map(|p| p.to_string()).unwrap_or_default();
                let why = self
                    .last_error(&peer_of(f).unwrap_or(self.net.peer_id))
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                waiting.push(format!(
                    "{} {name}: {missing} packs and the head{why}",
                    f.name
                ));
            }
        }
        Ok(Health {
            holders,
            target: set.len() as u32,
            replicas: self.repo.config.replicas,
            waiting,
        })
    }

    async fn round(&self) -> Result<(), NodeError> {
        let repo = self.repo.clone();
        let loaded = tokio::task::spawn_blocking(
            move || -> Result<Option<(Owner, Vec<Friend>)>, NodeError> {
                let owner = match repo.owner() {
                    Ok(o) => o,
                    Err(NodeError::NotInitialized) => return Ok(None),
                    Err(e) => return Err(e),
                };
                Ok(Some((owner, repo.store.friends()?)))
            },
        )
        .await
        .map_err(|e| NodeError::Control(e.to_string()))??;
        let (owner, friends) = match loaded {
            Some((o, f)) => (Some(o), f),
            None => (None, self.repo.store.friends()?),
        };
        // Keep connections to friends up, whether or not this node backs up itself: a friend
        // that only stores our data must still be reachable, and its connection to us lets us
        // reach it after it moved.
        for f in &friends {
            if let Some(peer) = peer_of(f)
                && !self.net.is_connected(&peer)
            {
                self.net.add_addrs(peer, self.friend_addrs(f)).await?;
            }
        }
        let Some(owner) = owner else { return Ok(()) };
        if friends.is_empty() {
            return Ok(());
        }
        let set = self.replica_set(&friends)?;
        let owner = Arc::new(owner);
        if let Err(e) = self.repair(&owner, &set).await {
            tracing::warn!(error = %e.full_message(), "repair");
        }
        // Every friend gets the key slot (recovery needs only one of them); the replica set gets
        // the data too.
        let work = friends.iter().map(|f| {
            let in_set = set.iter().any(|s| s.peer_id == f.peer_id);
            self.sync_friend(f.clone(), Arc::clone(&owner), in_set)
        });
        futures::future::join_all(work).await;
        // A friend that refused for quota left the set: run again so its replacement catches up.
        if set.iter().any(|f| {
            self.repo
                .store
                .peer_state(&f.peer_id)
                .map(|s| s.quota_refused)
                .unwrap_or(false)
        }) {
            let set2 = self.replica_set(&friends)?;
            let work = set2
                .iter()
                .filter(|f| !set.iter().any(|s| s.peer_id == f.peer_id))
                .map(|f| self.sync_friend(f.clone(), Arc::clone(&owner), true));
            futures::future::join_all(work).await;
        }
        let set = self.replica_set(&friends)?;
        self.evict(&set)?;
        self.retire(&owner, &friends).await
    }

    /// Repair: packs that left the outbox but that a member of the replica set no longer holds
    /// (it failed an audit, lost them, or replaced a lost friend) come back into the outbox from
    /// a friend that still holds them, fewest holders first and at most
    /// `repair_bytes_per_round` bytes per round; the uploads that follow send them on, and the
    /// outbox lets them go again once `replicas` friends hold them.
    async fn repair(&self, owner: &Arc<Owner>, set: &[Friend]) -> Result<(), NodeError> {
        if set.is_empty() {
            return Ok(());
        }
        let repo = self.repo.clone();
        let owner = Arc::clone(owner);
        // Only for members we can send to now: a pack fetched for an offline member would wait in
        // the outbox.
        let members: Vec<Vec<u8>> = set
            .iter()
            .filter(|f| peer_of(f).is_some_and(|p| self.net.is_connected(&p)))
            .map(|f| f.peer_id.clone())
            .collect();
        if members.is_empty() {
            return Ok(());
        }
        let budget = self.repo.config.repair_bytes_per_round.max(1);
        let reported = Arc::clone(&self.repair_reported);
        let repaired = tokio::task::spawn_blocking(move || -> Result<u64, NodeError> {
            let packs = repo.store.packs()?;
            let counts = repo.store.holder_counts()?;
            let total = packs.len() as u64;
            if members
                .iter()
                .all(|m| counts.get(m).copied().unwrap_or(0) >= total)
            {
                return Ok(0);
            }
            let mut todo = Vec::new();
            for (id, rec) in packs {
                if rec.in_outbox {
                    continue;
                }
                let holders = repo.store.holders(&id)?;
                if members.iter().any(|m| !holders.contains(m)) {
                    todo.push((holders.len(), rec.created_ns, id, rec.len));
                }
            }
            // Most at risk first: the fewest holders, then the newest.
            todo.sort_by_key(|(holders, created, _, _)| (*holders, std::cmp::Reverse(*created)));
            let mut spent = 0u64;
            let mut repaired = 0u64;
            let mut failures = 0;
            for (holders, _, id, len) in todo {
                // Failed attempts count against the budget too, and a few failures end the
                // round's repair: a friend that stalls must not hold up the uploads.
                if (spent > 0 && spent.saturating_add(len) > budget)
                    || failures >= MAX_REPAIR_FAILURES
                {
                    break;
                }
                spent += len;
                match repo.reclaim(&owner.keys, &id) {
                    Ok(()) => {
                        repaired += len;
                        reported.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                        tracing::info!(pack = %id.short(), holders, "repair: fetched a pack below its replica target back into the outbox");
                    }
                    Err(e) => {
                        failures += 1;
                        if reported.lock().unwrap_or_else(|e| e.into_inner()).insert(id) {
                            tracing::error!(pack = %id.short(), holders, error = %e.full_message(), "repair: no friend could send a good copy of a pack below its replica target (tried again every round; logged once)");
                        } else {
                            tracing::debug!(pack = %id.short(), error = %e.full_message(), "repair failed again");
                        }
                    }
                }
            }
            Ok(repaired)
        })
        .await
        .map_err(|e| NodeError::Control(format!("repair worker failed: {e}")))??;
        if repaired > 0 {
            self.repaired.fetch_add(repaired, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Bytes fetched back into the outbox by repair since the node started.
    pub fn repaired_bytes(&self) -> u64 {
        self.repaired.load(Ordering::Relaxed)
    }

    fn retire_state(&self) -> Result<RetireState, NodeError> {
        match self.repo.store.meta(META_RETIRE)? {
            None => Ok(RetireState::default()),
            Some(b) => {
                obnam_protocol::codec::decode_bounded("retire state", &b, 1 << 20).map_err(|e| {
                    NodeError::Corrupt {
                        what: "retire state".into(),
                        source: e,
                    }
                })
            }
        }
    }

    /// Friends that still hold the retiring key's data (empty when no rotation is retiring).
    ///
    /// # Errors
    /// Database errors.
    pub fn rotation_pending(&self) -> Result<Vec<String>, NodeError> {
        if !crate::rotate::retiring(&self.repo.paths) {
            return Ok(Vec::new());
        }
        let state = self.retire_state()?;
        Ok(self
            .repo
            .store
            .friends()?
            .into_iter()
            .filter(|f| {
                !state
                    .deleted
                    .iter()
                    .any(|d| d.as_ref() == f.peer_id.as_slice())
            })
            .map(|f| {
                let switched = state
                    .switched
                    .iter()
                    .any(|d| d.as_ref() == f.peer_id.as_slice());
                let step = if switched {
                    "to delete the old key's data"
                } else {
                    "to switch to the new key"
                };
                format!(
                    "{} {}: {step}",
                    f.name,
                    peer_of(&f).map(|p| p.to_string()).unwrap_or_default()
                )
            })
            .collect())
    }

    /// Phase 3 of a key rotation; see [`crate::rotate`].
    async fn retire(&self, owner: &Owner, friends: &[Friend]) -> Result<(), NodeError> {
        let secrets = self.repo.paths.secrets();
        if !crate::rotate::retiring(&self.repo.paths) {
            return Ok(());
        }
        let seq = self
            .repo
            .store
            .own_head()?
            .and_then(|h| SignedHead::verify(&h, &owner.keys.owner_id()).ok())
            .map(|(_, h)| h.seq)
            .unwrap_or(0);
        let health = self.health(seq)?;
        if health.replicas > 0 && (health.target == 0 || health.holders < health.target) {
            // The new set is not complete yet: the old one stays.
            return Ok(());
        }
        let old = crate::keys::load_owner(&crate::keys::retired_path(&secrets))?;
        let old_id = old.keys.owner_id();
        let new_id = owner.keys.owner_id();
        if old_id == new_id {
            // A rotation stopped before its switch: the "retired" key is the current one, and
            // retiring it would delete this owner's data. The next `keys rotate` clears it.
            tracing::error!(owner = %old_id.short(), "secrets.retired holds the current key (an interrupted rotation); not retiring it; run `obnam keys rotate` again");
            return Ok(());
        }
        let mut state = self.retire_state()?;
        let has =
            |list: &[ByteBuf], f: &Friend| list.iter().any(|d| d.as_ref() == f.peer_id.as_slice());
        let statement = SuccessorStatement {
            old: old_id,
            new: new_id,
            lookup: owner.lookup,
            slot: ByteBuf::from(owner.slot.clone()),
            signature: old
                .keys
                .sign(
                    obnam_protocol::signed::CONTEXT_SUCCESSOR,
                    &SuccessorStatement::payload(&old_id, &new_id, &owner.lookup, &owner.slot),
                )
                .to_vec(),
        };
        let todo: Vec<&Friend> = friends
            .iter()
            .filter(|f| !has(&state.switched, f))
            .collect();
        for f in todo {
            let Some(peer) = peer_of(f) else { continue };
            match self
                .retire_request(peer, Request::Successor(statement.clone()))
                .await
            {
                Ok(()) => {
                    tracing::info!(%peer, old = %old_id.short(), "friend switched to the new owner key");
                    state.switched.push(ByteBuf::from(f.peer_id.clone()));
                }
                Err(e) => self.note_error(peer, e.full_message()),
            }
        }
        self.save_retire_state(&state)?;
        if friends.iter().any(|f| !has(&state.switched, f)) {
            // Every friend must hand out the new slot before any deletes the old data.
            return Ok(());
        }
        let todo: Vec<&Friend> = friends.iter().filter(|f| !has(&state.deleted, f)).collect();
        for f in todo {
            let Some(peer) = peer_of(f) else { continue };
            match self
                .retire_request(peer, Request::DeleteOwner { owner: old_id })
                .await
            {
                Ok(()) => {
                    tracing::info!(%peer, old = %old_id.short(), "friend deleted the old owner key's data");
                    state.deleted.push(ByteBuf::from(f.peer_id.clone()));
                }
                Err(e) => self.note_error(peer, e.full_message()),
            }
        }
        self.save_retire_state(&state)?;
        if friends.iter().all(|f| has(&state.deleted, f)) {
            std::fs::remove_file(crate::keys::retired_path(&secrets))
                .map_err(|e| NodeError::io("removing the retired key", e))?;
            crate::outbox::sync_dir(&self.repo.paths.data)?;
            self.repo.store.remove_meta(META_RETIRE)?;
            tracing::warn!(old = %old_id.short(), "key rotation complete: no friend holds data under the old key");
            // The slot goes out again as usual.
            self.wake();
        }
        Ok(())
    }

    /// One retirement request; a friend that never stored the old key counts as done.
    async fn retire_request(&self, peer: PeerId, req: Request) -> Result<(), NodeError> {
        match self.net.request(peer, req).await? {
            Response::Ok => Ok(()),
            Response::Error(e) if e.code == ErrorCode::NotFound => Ok(()),
            Response::Error(e) => Err(crate::serve::wire_error(&peer, &e)),
            other => Err(NodeError::Net(format!("{peer} answered {other:?}"))),
        }
    }

    fn save_retire_state(&self, state: &RetireState) -> Result<(), NodeError> {
        self.repo
            .store
            .set_meta(META_RETIRE, &obnam_protocol::codec::encode(state))?;
        Ok(())
    }

    async fn sync_friend(&self, f: Friend, owner: Arc<Owner>, data: bool) {
        let Some(peer) = peer_of(&f) else { return };
        if let Err(e) = self.sync_friend_inner(peer, &f, &owner, data).await {
            self.note_error(peer, e.full_message());
        }
    }

    /// Sends the stored takeover statement to `peer`. A friend that was away during the
    /// recovery may hold a head newer than the one the statement starts at (what the lost
    /// machine sent it last): that head is fetched and merged into ours, so none of its
    /// snapshots is lost, and the statement, raised to it, is sent again.
    async fn take_over(&self, peer: PeerId, owner: &Arc<Owner>) -> Result<(), NodeError> {
        let keys = &owner.keys;
        for attempt in 0..2 {
            let Some(statement) = crate::recover::stored_takeover(&self.repo)? else {
                return Ok(());
            };
            match self.net.request(peer, Request::Takeover(statement)).await? {
                Response::Ok => {
                    tracing::info!(%peer, "friend accepted the takeover");
                    return Ok(());
                }
                Response::Error(e) if e.code == ErrorCode::NotFound => return Ok(()),
                Response::Error(e) if e.code == ErrorCode::StaleHead && attempt == 0 => {
                    let theirs = peers::owner_request(
                        &self.net,
                        peer,
                        keys,
                        Request::GetHead {
                            owner: keys.owner_id(),
                        },
                    )
                    .await?;
                    let Response::Head(Some(head)) = theirs else {
                        return Err(crate::serve::wire_error(&peer, &e));
                    };
                    let seq = obnam_protocol::snapshot::SignedHead::verify(&head, &keys.owner_id())
                        .map(|(_, h)| h.seq)
                        .map_err(|e| NodeError::Authentication {
                            what: format!("the head friend {peer} holds: {e}"),
                        })?;
                    let merged = self.repo.merge_head(keys, &head)?;
                    tracing::warn!(%peer, seq, ?merged, "friend holds a head newer than the takeover; merged it into ours");
                    crate::recover::raise_takeover(&self.repo, keys, &self.net.peer_id, seq)?;
                    // Friends that accepted the old statement take the raised one in stride.
                    if let Ok(mut t) = self.took_over.lock() {
                        t.clear();
                    }
                }
                Response::Error(e) => return Err(crate::serve::wire_error(&peer, &e)),
                other => {
                    return Err(NodeError::Net(format!(
                        "{peer} answered {other:?} to a takeover"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Pushes the key slot (to every friend) and, when `data`, packs and the head (to members of
    /// the replica set).
    async fn sync_friend_inner(
        &self,
        peer: PeerId,
        f: &Friend,
        owner: &Arc<Owner>,
        data: bool,
    ) -> Result<(), NodeError> {
        // After a recovery, every friend must accept this node as the owner's writer, including
        // friends that were away then: send the stored takeover statement once per run.
        let taken = self
            .took_over
            .lock()
            .map(|t| t.contains(&peer))
            .unwrap_or(false);
        if !taken && self.repo.store.meta("takeover")?.is_some() {
            self.net.add_addrs(peer, self.friend_addrs(f)).await?;
            peers::prove(&self.net, peer, &owner.keys).await?;
            self.take_over(peer, owner).await?;
            if let Ok(mut t) = self.took_over.lock() {
                t.insert(peer);
            }
        }
        let store = &self.repo.store;
        self.net.add_addrs(peer, self.friend_addrs(f)).await?;
        let keys = &owner.keys;
        let owner_id = keys.owner_id();
        // Every round asks each friend which of our packs it dropped as lost or corrupt (its scrub
        // or an audit found them): they no longer count as held there, and repair sends them
        // again. A friend that answers `NotFriend` removed us: it leaves the replica set (its
        // copies count as lost) until it answers again.
        match peers::owner_request(&self.net, peer, keys, Request::Dropped { owner: owner_id })
            .await
        {
            Ok(Response::Dropped(dropped)) => {
                let mut forgotten = 0;
                for id in dropped.iter().take(obnam_protocol::msg::MAX_LIST as usize) {
                    if store.remove_placement(id, &f.peer_id)? {
                        forgotten += 1;
                    }
                }
                if forgotten > 0 {
                    tracing::warn!(%peer, packs = forgotten, "friend reports it dropped our packs as lost or corrupt; repairing");
                }
                if store.friend_health(&f.peer_id)?.refused_since_ns != 0 {
                    tracing::info!(%peer, "friend accepts us again");
                    store.update_friend_health(&f.peer_id, |h| h.refused_since_ns = 0)?;
                }
                // A friend that could not be asked when the index was rebuilt (after a
                // recovery) is asked now: what only it holds joins the index.
                if crate::recover::unlisted(&self.repo)?.contains(&f.peer_id) {
                    let repo = self.repo.clone();
                    let owner = Arc::clone(owner);
                    let added = tokio::task::spawn_blocking(move || {
                        let remote = repo.remote.get().ok_or(NodeError::Shutdown)?;
                        crate::recover::complete_index(&repo, remote, &owner.keys, peer)
                    })
                    .await
                    .map_err(|e| NodeError::Control(format!("index completion failed: {e}")))??;
                    if let Some(n) = added {
                        tracing::info!(%peer, packs = n, "index completed from a friend that was away when it was rebuilt");
                    }
                }
            }
            Ok(Response::Error(e)) if e.code == ErrorCode::NotFriend => {
                let now = crate::repo::now_ns();
                store.update_friend_health(&f.peer_id, |h| {
                    if h.refused_since_ns == 0 {
                        h.refused_since_ns = now;
                    }
                })?;
                return Err(crate::serve::wire_error(&peer, &e));
            }
            _ => {}
        }
        let state = store.peer_state(&f.peer_id)?;
        // While the old key retires, the slot's lookup id is still filed for it at friends; the
        // successor statement moves it.
        if !state.slot_pushed && !crate::rotate::retiring(&self.repo.paths) {
            // The head goes first: a friend that holds the key slot then always holds a head
            // naming the other friends, even if the connection drops right after the slot.
            if let Some(head_bytes) = store.own_head()? {
                self.push_head(peer, f, keys, head_bytes).await?;
            }
            let req = Request::PutSlot {
                owner: owner_id,
                lookup: owner.lookup,
                slot: ByteBuf::from(owner.slot.clone()),
            };
            match peers::owner_request(&self.net, peer, keys, req).await? {
                Response::Ok => {
                    // A passphrase change in between makes this slot stale: only mark it pushed if it
                    // is still the current one.
                    let current = crate::keys::load_secrets(&self.repo.paths.secrets())
                        .map(|s| s.lookup == owner.lookup)
                        .unwrap_or(false);
                    if current {
                        store.update_peer_state(&f.peer_id, |s| s.slot_pushed = true)?;
                    }
                    tracing::info!(%peer, "key slot stored at friend");
                }
                Response::Error(e) => return Err(crate::serve::wire_error(&peer, &e)),
                other => return Err(NodeError::Net(format!("{peer} answered {other:?}"))),
            }
        }
        if !data {
            // Every friend gets the head (it is small), not only the replica set: a recovery
            // through any one friend then finds every snapshot and every other friend.
            if let Some(head_bytes) = store.own_head()? {
                self.push_head(peer, f, keys, head_bytes).await?;
            }
            // The friend's last error (a full quota that put it out of the set) stands.
            return Ok(());
        }
        // The head is read before the pack list: a backup committing in between must not send
        // a friend a head whose packs this round did not send.
        let head_at_start = store.own_head()?;
        // Packs we do not know the friend to hold, and cannot send from the outbox: it may hold
        // them already (after a recovery, or an index rebuild while it was away). Ask.
        let unknown: Vec<_> = store
            .packs()?
            .into_iter()
            .filter(|(id, rec)| {
                !rec.in_outbox
                    && !store
                        .holders(id)
                        .map(|h| h.contains(&f.peer_id))
                        .unwrap_or(false)
            })
            .map(|(id, _)| id)
            .collect();
        for batch in unknown.chunks(obnam_protocol::msg::MAX_HAVE) {
            let req = Request::Have {
                owner: owner_id,
                packs: batch.to_vec(),
            };
            if let Response::Have(flags) = peers::owner_request(&self.net, peer, keys, req).await? {
                for (id, held) in batch.iter().zip(flags) {
                    // A friend's word counts for nothing on a pack it failed an audit of.
                    if held && !store.is_suspect(id, &f.peer_id)? {
                        store.add_placement(id, &f.peer_id)?;
                    }
                }
            }
        }
        // Packs the friend lacks that are ours to send (those that left the outbox are held by
        // other friends; repair brings them back when needed).
        let mut todo = std::collections::VecDeque::new();
        for (id, rec) in store.packs()? {
            if rec.in_outbox && !store.holders(&id)?.contains(&f.peer_id) {
                todo.push_back((id, rec));
            }
        }
        // `uploads_in_flight` lanes, each with its own stream, take packs from one queue: the
        // next pack travels while the friend makes the last one durable.
        let lanes = todo.len().min(self.repo.config.uploads_in_flight.max(1));
        let queue = std::sync::Mutex::new(todo);
        let lane = || async {
            let mut stream: Option<libp2p::Stream> = None;
            loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                let Some((id, rec)) = next else { break };
                let s = match stream.as_mut() {
                    Some(s) => s,
                    None => stream.insert(self.net.open_stream(peer).await?),
                };
                let mut result = self
                    .timed(
                        rec.len,
                        peers::upload(s, peer, owner_id, id, &self.repo.outbox.path(&id)),
                    )
                    .await;
                if result.is_err() {
                    // The stream broke (or the friend's accept queue dropped it): one fresh try.
                    let s = stream.insert(self.net.open_stream(peer).await?);
                    result = self
                        .timed(
                            rec.len,
                            peers::upload(s, peer, owner_id, id, &self.repo.outbox.path(&id)),
                        )
                        .await;
                }
                let mut result = result?;
                if let Upload::Refused(e) = &result
                    && e.code == ErrorCode::Unproven
                {
                    peers::prove(&self.net, peer, keys).await?;
                    let s = stream.insert(self.net.open_stream(peer).await?);
                    result = self
                        .timed(
                            rec.len,
                            peers::upload(s, peer, owner_id, id, &self.repo.outbox.path(&id)),
                        )
                        .await?;
                }
                match result {
                    Upload::Already if store.is_suspect(&id, &f.peer_id)? => {
                        // It failed an audit of this pack and still says it has it: only a
                        // passing audit (or storing it anew) makes it count again.
                        tracing::warn!(%peer, pack = %id.short(), "friend says it holds a pack it failed an audit of; not counting it until an audit passes");
                    }
                    Upload::Stored => {
                        // One commit (an fsync), off the executor: on a worker thread it held
                        // up the connection's own task.
                        let (st, holder, len) = (store.clone(), f.peer_id.clone(), rec.len);
                        tokio::task::spawn_blocking(move || st.confirm_upload(&id, &holder, len))
                            .await
                            .map_err(|e| {
                                NodeError::io("recording an upload", std::io::Error::other(e))
                            })??;
                        self.sent.fetch_add(rec.len, Ordering::Relaxed);
                        self.bump();
                    }
                    Upload::Already => {
                        store.add_placement(&id, &f.peer_id)?;
                        self.bump();
                    }
                    Upload::Refused(e) if e.code == ErrorCode::QuotaExceeded => {
                        tracing::warn!(%peer, available = ?e.available, "friend refused a pack for quota; choosing another friend");
                        store.update_peer_state(&f.peer_id, |s| s.quota_refused = true)?;
                        return Err(crate::serve::wire_error(&peer, &e));
                    }
                    Upload::Refused(e) => return Err(crate::serve::wire_error(&peer, &e)),
                }
            }
            if let Some(mut s) = stream.take() {
                let _ = futures::AsyncWriteExt::close(&mut s).await;
            }
            Ok::<(), NodeError>(())
        };
        // The first failing lane ends the others (their uploads are dropped and tried again
        // next round).
        futures::future::try_join_all((0..lanes).map(|_| lane())).await?;
        // The head goes to the friend even when it lacks packs that left the outbox (held by
        // other friends, or waiting for repair from a friend that is away): a recovery through
        // this friend then finds every snapshot, and the index picks up the other packs from
        // the friends that hold them. `replicated_to` still counts only friends holding all.
        if let Some(head_bytes) = head_at_start {
            self.push_head(peer, f, keys, head_bytes).await?;
        }
        if let Ok(mut m) = self.errors.lock() {
            m.remove(&peer);
        }
        Ok(())
    }

    /// Sends `head_bytes` (our head) to `peer` unless it holds it already.
    async fn push_head(
        &self,
        peer: PeerId,
        f: &Friend,
        keys: &crate::keys::Keys,
        head_bytes: Vec<u8>,
    ) -> Result<(), NodeError> {
        let store = &self.repo.store;
        let owner_id = keys.owner_id();
        let state = store.peer_state(&f.peer_id)?;
        let (_, parsed) =
            SignedHead::verify(&head_bytes, &owner_id).map_err(|e| NodeError::Authentication {
                what: format!("own head: {e}"),
            })?;
        if state.head_seq < parsed.seq {
            match peers::owner_request(
                &self.net,
                peer,
                keys,
                Request::PutHead {
                    owner: owner_id,
                    head: ByteBuf::from(head_bytes.clone()),
                },
            )
            .await?
            {
                Response::Ok => {
                    store.update_peer_state(&f.peer_id, |s| s.head_seq = parsed.seq)?;
                    tracing::info!(%peer, seq = parsed.seq, "head stored at friend");
                    self.bump();
                }
                Response::Error(e) if e.code == ErrorCode::StaleHead => {
                    // The friend holds another head at or above ours: count it as holding ours
                    // only if it is exactly ours; otherwise another node writes for this owner.
                    let theirs = peers::owner_request(
                        &self.net,
                        peer,
                        keys,
                        Request::GetHead { owner: owner_id },
                    )
                    .await?;
                    match theirs {
                        Response::Head(Some(h)) if h.as_ref() == head_bytes.as_slice() => {
                            store.update_peer_state(&f.peer_id, |s| s.head_seq = parsed.seq)?;
                        }
                        _ => {
                            return Err(NodeError::Net(format!(
                                "friend {peer} holds a different head than ours ({}): another node may be writing for this owner; run `obnam snapshots`",
                                e.message
                            )));
                        }
                    }
                }
                Response::Error(e) => return Err(crate::serve::wire_error(&peer, &e)),
                other => return Err(NodeError::Net(format!("{peer} answered {other:?}"))),
            }
        }
        Ok(())
    }

    /// Removes from the outbox the packs that `replicas` members of the current replica set
    /// hold. A backup calls it once its snapshot is replicated, so that the outbox is empty
    /// when the backup returns rather than at the end of the replication round.
    ///
    /// # Errors
    /// Database errors.
    pub fn evict_replicated(&self) -> Result<(), NodeError> {
        let friends = self.repo.store.friends()?;
        let set = self.replica_set(&friends)?;
        self.evict(&set)
    }

    /// Removes from the outbox the packs that `replicas` members of the replica set hold (a
    /// friend that left the set, being lost or having removed us, does not count).
    fn evict(&self, friends: &[Friend]) -> Result<(), NodeError> {
        let store = &self.repo.store;
        let replicas = self.repo.config.replicas as usize;
        if replicas == 0 {
            return Ok(());
        }
        let mut leaving = Vec::new();
        for (id, rec) in store.packs()? {
            if !rec.in_outbox {
                continue;
            }
            let holders = store.holders(&id)?;
            let count = friends
                .iter()
                .filter(|f| holders.contains(&f.peer_id))
                .count();
            if count >= replicas {
                leaving.push(id);
            }
        }
        // One commit for all of them (one per pack took about a second for 2 GiB), then the
        // files: a crash in between leaves files the index says are sent, which are removed
        // at start.
        store.mark_sent_many(&leaving)?;
        for id in &leaving {
            let _ = self.repo.outbox.remove(id);
            tracing::debug!(pack = %id.short(), "pack left the outbox");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c<'a>(added_ns: i64, id: &'a [u8], household: &'a str, eligible: bool) -> Candidate<'a> {
        Candidate {
            added_ns,
            id,
            household,
            eligible,
        }
    }

    #[test]
    fn the_replica_set_spreads_over_households_and_skips_the_ineligible() {
        let list = [
            c(1, b"a", "home", true),
            c(2, b"b", "home", true),
            c(3, b"c", "", true),
            c(4, b"d", "flat", false),
            c(5, b"e", "flat", true),
        ];
        // One per household first (a, c has none, e), then the rest in order.
        assert_eq!(choose_replica_set(&list, 3), vec![0, 2, 4]);
        assert_eq!(choose_replica_set(&list, 4), vec![0, 2, 4, 1]);
        assert_eq!(choose_replica_set(&list, 10), vec![0, 2, 4, 1]);
        assert!(choose_replica_set(&list, 0).is_empty());
    }

    #[test]
    fn friends_count_as_lost_only_after_lost_after() {
        let s = 1_000_000_000;
        assert!(!is_lost(100 * s, 90 * s, 10));
        assert!(is_lost(100 * s, 89 * s, 10));
        assert!(!is_lost(i64::MAX, 0, u64::MAX));
    }
}
