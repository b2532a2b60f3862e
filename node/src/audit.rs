//! Audits of friends, from the owner's side: is each friend still holding our packs?
//!
//! The schedule and the judgement are plain functions with no I/O ([`kind_of`], [`pick`],
//! [`judge`], [`audit_interval`]), so the simulations in `obnam-simulations` can drive the same
//! code. The [`Auditor`] actor does the I/O:
//!
//! - every `86400 / audits_per_day` seconds it sends each friend one challenge
//!   ([`obnam_protocol::audit::Challenge`]): a random 1-4 KiB range of a pack the friend is
//!   known to hold. Of every `audits_per_day` challenges to a friend, one names our newest pack
//!   and one the pack that holds the latest snapshot's root tree; the rest are random;
//! - the answer is checked against the pack id alone ([`obnam_protocol::audit::verify`]), so
//!   audits work after a recovery, with no local copy of anything;
//! - a wrong or missing answer, or none within `audit_deadline_secs` while the friend is
//!   connected, is a failed audit: it is logged, counted in the friend's health record (shown
//!   by `status` and `peer list`), and the pack no longer counts as held there, so replication
//!   repairs it. A friend that is offline is not failed; it is audited when it is back;
//! - every `presence_interval_secs` it notes which friends are connected, for the online share
//!   over 30 days, and works out the pack sets of snapshots that have none yet
//!   ([`crate::health::fill`]).
//!
//! A failed audit never bans the friend: its other copies still count, and it is audited again.

use crate::error::NodeError;
use crate::net::Net;
use crate::peers;
use crate::replication::Replicator;
use crate::repo::{Repo, now_ns};
use libp2p::PeerId;
use obnam_protocol::audit::{self, Challenge};
use obnam_protocol::local::{Friend, MAX_REASON, MAX_UNANSWERED};
use obnam_protocol::msg::{ErrorCode, Request, Response};
use obnam_protocol::{PackId, SnapshotId};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

/// Why a pack was chosen for a challenge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Our newest pack that the friend holds.
    Newest,
    /// The pack that holds the latest snapshot's root tree.
    Root,
    /// Any pack the friend holds, at random.
    Random,
    /// Not an audit: a copy downloaded and checked by `verify --sample` (with its chunk count).
    Sample(u64),
}

impl Kind {
    /// The name `verify --json` uses.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Newest => "newest",
            Kind::Root => "root",
            Kind::Random => "random",
            Kind::Sample(_) => "sample",
        }
    }
}

/// The kind of the `n`-th audit of a friend: of every `per_day` audits, the first names the
/// newest pack and the second the root's pack, and the rest are random. Below 3 a day the cycle
/// is 3 audits long (newest, root, random), so random packs are audited at every rate: with a
/// cycle of 2, one or two audits a day would never look beyond those two packs (S5 of the
/// simulations found it).
pub fn kind_of(n: u64, per_day: u32) -> Kind {
    let cycle = u64::from(per_day.max(3));
    match n % cycle {
        0 => Kind::Newest,
        1 => Kind::Root,
        _ => Kind::Random,
    }
}

/// Time between two audits of one friend.
pub fn audit_interval(per_day: u32) -> Duration {
    Duration::from_secs_f64(86_400.0 / f64::from(per_day.max(1)))
}

/// Chooses the pack for an audit of `kind` among `held` (the packs the friend is known to hold,
/// with their lengths). `newest` and `root` fall back to a random pack when the friend does not
/// hold them. `random` picks among `held`.
pub fn pick(
    kind: Kind,
    held: &[(PackId, u64)],
    newest: Option<PackId>,
    root: Option<PackId>,
    random: u64,
) -> Option<(PackId, u64)> {
    if held.is_empty() {
        return None;
    }
    let want = match kind {
        Kind::Newest => newest,
        Kind::Root => root,
        Kind::Random | Kind::Sample(_) => None,
    };
    if let Some(want) = want
        && let Some(found) = held.iter().find(|(p, _)| *p == want)
    {
        return Some(*found);
    }
    let i = usize::try_from(random % held.len() as u64).unwrap_or(0);
    held.get(i).copied()
}

/// What came of one audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The friend proved the range.
    Passed,
    /// A wrong or missing answer: the pack no longer counts as held there.
    Failed(String),
    /// A connected friend did not answer (it was busy, or the connection dropped): not a
    /// failure by itself, but [`MAX_UNANSWERED`] in a row are.
    Unanswered(String),
    /// No audit happened (the friend is offline, or holds nothing of ours); nothing is counted.
    Unreachable(String),
}

/// Judges a friend's answer to `challenge` for a pack of `size` bytes. `connected` says whether
/// a connection to the friend was open when the challenge was sent or when the answer failed to
/// come: a timeout then is a failure, and a dropped connection is [`Outcome::Unanswered`];
/// silence from an offline friend is not counted.
pub fn judge(
    challenge: &Challenge,
    size: u64,
    answer: Result<Response, NodeError>,
    connected: bool,
) -> Outcome {
    match answer {
        Ok(Response::Proof { nonce, proof }) => {
            if nonce != challenge.nonce {
                return Outcome::Failed("the answer echoes another challenge's nonce".into());
            }
            match audit::verify(challenge, size, &proof) {
                Ok(_) => Outcome::Passed,
                Err(e) => Outcome::Failed(e.to_string()),
            }
        }
        Ok(Response::Error(e)) if e.code == ErrorCode::Busy => {
            Outcome::Unanswered(format!("busy: {}", e.message))
        }
        Ok(Response::Error(e)) if e.code == ErrorCode::NotFound => Outcome::Failed(format!(
            "it has not got pack {}: {}",
            challenge.pack.short(),
            e.message
        )),
        Ok(Response::Error(e)) => Outcome::Failed(format!("it refused: {e}")),
        Ok(_) => Outcome::Failed("it answered with another kind of message".into()),
        Err(NodeError::Net(e)) if connected && e.starts_with(TIMED_OUT) => {
            Outcome::Failed(format!("no answer in time: {e}"))
        }
        Err(e) if connected => Outcome::Unanswered(e.to_string()),
        Err(e) => Outcome::Unreachable(e.to_string()),
    }
}

/// How a timed-out audit's error starts.
const TIMED_OUT: &str = "no answer from";

/// One audit made, for `verify` and the log.
#[derive(Debug, Clone)]
pub struct Audited {
    /// The friend.
    pub friend: Friend,
    /// The pack challenged, if the friend holds any.
    pub pack: Option<PackId>,
    /// Why that pack.
    pub kind: Kind,
    /// What came of it.
    pub outcome: Outcome,
}

/// The audit actor.
pub struct Auditor {
    repo: Repo,
    net: Net,
    replicator: Arc<Replicator>,
    /// Whether a [`crate::health::fill`] is running.
    filling: Arc<std::sync::atomic::AtomicBool>,
    /// Recoveries and index rebuilds under way: no fill starts meanwhile.
    fill_holds: Arc<std::sync::atomic::AtomicUsize>,
    /// Snapshots whose pack set could not be worked out, and when: retried after
    /// [`FILL_RETRY`].
    fill_failed: Arc<std::sync::Mutex<HashMap<SnapshotId, std::time::Instant>>>,
}

/// A hold on [`Auditor`]'s pack-set fill (see [`Auditor::hold_fill`]).
pub struct FillHold {
    holds: Arc<std::sync::atomic::AtomicUsize>,
    failed: Arc<std::sync::Mutex<HashMap<SnapshotId, std::time::Instant>>>,
}

impl Drop for FillHold {
    fn drop(&mut self) {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.holds.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Marks a fill as running while it lives.
struct Running(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// How long a snapshot whose trees could not be read waits before the next try.
const FILL_RETRY: Duration = Duration::from_secs(3600);

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    rand::fill(&mut b[..]);
    u64::from_le_bytes(b)
}

impl Auditor {
    /// An auditor for the node's repository and network.
    pub fn new(repo: Repo, net: Net, replicator: Arc<Replicator>) -> Arc<Self> {
        Arc::new(Self {
            repo,
            net,
            replicator,
            filling: Arc::default(),
            fill_holds: Arc::default(),
            fill_failed: Arc::default(),
        })
    }

    /// Audits and notes presence until the node stops.
    pub async fn run(self: Arc<Self>) {
        let every = audit_interval(self.repo.config.audits_per_day);
        let presence = Duration::from_secs(self.repo.config.presence_interval_secs.max(1));
        let mut audits = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut looks = tokio::time::interval(presence);
        audits.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        looks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = audits.tick() => {
                    if self.repo.config.audits_per_day > 0 {
                        self.round(None).await;
                    }
                }
                _ = looks.tick() => {
                    if let Err(e) = self.note_presence(presence) {
                        tracing::warn!(error = %e.full_message(), "noting friends' presence");
                    }
                    self.start_fill();
                }
            }
        }
    }

    /// Keeps [`crate::health::fill`] from starting until the hold is dropped (a recovery or an
    /// index rebuild is filling the index); then snapshots that failed are tried again at once.
    pub fn hold_fill(&self) -> FillHold {
        self.fill_holds
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        FillHold {
            holds: Arc::clone(&self.fill_holds),
            failed: Arc::clone(&self.fill_failed),
        }
    }

    /// Starts working out missing snapshot pack sets on a blocking thread, unless that is
    /// already running or held.
    fn start_fill(&self) {
        use std::sync::atomic::Ordering;
        if self.fill_holds.load(Ordering::Acquire) > 0 || self.filling.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let repo = self.repo.clone();
        let filling = Arc::clone(&self.filling);
        let failed = Arc::clone(&self.fill_failed);
        tokio::task::spawn_blocking(move || {
            // Cleared however the closure ends, a panic included.
            let _running = Running(filling);
            let skip: HashSet<SnapshotId> = {
                let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                f.retain(|_, at| at.elapsed() < FILL_RETRY);
                f.keys().copied().collect()
            };
            match crate::health::fill(&repo, &skip) {
                Ok((_, errors)) => {
                    let mut f = failed.lock().unwrap_or_else(|e| e.into_inner());
                    for (id, e) in errors {
                        tracing::warn!(snapshot = %id.short(), error = %e.full_message(), "cannot work out which packs the snapshot uses; retrying in an hour");
                        f.insert(id, std::time::Instant::now());
                    }
                }
                Err(NodeError::NotInitialized) => {}
                Err(e) => {
                    tracing::warn!(error = %e.full_message(), "working out snapshots' pack sets");
                }
            }
        });
    }

    fn note_presence(&self, every: Duration) -> Result<(), NodeError> {
        let now = now_ns();
        let secs = u32::try_from(every.as_secs()).unwrap_or(u32::MAX);
        for f in self.repo.store.friends()? {
            let online = PeerId::from_bytes(&f.peer_id).is_ok_and(|p| self.net.is_connected(&p));
            self.repo
                .store
                .update_friend_health(&f.peer_id, |h| h.note_presence(now, secs, online))?;
        }
        Ok(())
    }

    /// One audit of every friend, in parallel. With `kinds`, every friend gets one audit of
    /// each kind (for `verify`); without, the next kind on each friend's schedule.
    pub async fn round(&self, kinds: Option<&[Kind]>) -> Vec<Audited> {
        let repo = self.repo.clone();
        let loaded = tokio::task::spawn_blocking(move || targets(&repo)).await;
        let (owner, friends, newest, root) = match loaded {
            Ok(Ok(Some(t))) => t,
            Ok(Ok(None)) => return Vec::new(),
            Ok(Err(e)) => {
                tracing::warn!(error = %e.full_message(), "audit round");
                return Vec::new();
            }
            Err(e) => {
                tracing::warn!(error = %e, "audit round");
                return Vec::new();
            }
        };
        let work = friends.into_iter().map(|(f, held)| {
            let owner = Arc::clone(&owner);
            async move {
                let per_day = self.repo.config.audits_per_day;
                let plan: Vec<Kind> = match kinds {
                    Some(k) => k.to_vec(),
                    None => {
                        let n = self
                            .repo
                            .store
                            .update_friend_health(&f.peer_id, |h| h.audits_sent += 1)
                            .map(|h| h.audits_sent - 1)
                            .unwrap_or(0);
                        vec![kind_of(n, per_day)]
                    }
                };
                let mut out = Vec::new();
                for kind in plan {
                    let target = pick(kind, &held, newest, root, random_u64());
                    out.push(self.audit_one(&owner, &f, kind, target).await);
                }
                out
            }
        });
        let results: Vec<Audited> = futures::future::join_all(work)
            .await
            .into_iter()
            .flatten()
            .collect();
        if results
            .iter()
            .any(|a| matches!(a.outcome, Outcome::Failed(_)))
        {
            // Packs that failed no longer count as held: replication repairs them.
            self.replicator.wake();
        }
        results
    }

    async fn audit_one(
        &self,
        owner: &crate::keys::Owner,
        f: &Friend,
        kind: Kind,
        target: Option<(PackId, u64)>,
    ) -> Audited {
        let done = |pack, outcome| Audited {
            friend: f.clone(),
            pack,
            kind,
            outcome,
        };
        let Ok(peer) = PeerId::from_bytes(&f.peer_id) else {
            return done(None, Outcome::Unreachable("bad peer id".into()));
        };
        let Some((pack, size)) = target else {
            return done(
                None,
                Outcome::Unreachable("it holds none of our packs yet".into()),
            );
        };
        let mut random = [0u8; 40];
        rand::fill(&mut random[..]);
        let challenge = Challenge::random(pack, size, &random);
        let deadline = Duration::from_secs(self.repo.config.audit_deadline_secs.max(1));
        let req = Request::Audit {
            owner: owner.keys.owner_id(),
            challenge,
        };
        let connected_before = self.net.is_connected(&peer);
        let answer = match tokio::time::timeout(
            deadline,
            peers::owner_request(&self.net, peer, &owner.keys, req),
        )
        .await
        {
            Ok(a) => a,
            Err(_) => Err(NodeError::Net(format!(
                "{TIMED_OUT} {peer} within {deadline:?}"
            ))),
        };
        let connected = connected_before || self.net.is_connected(&peer);
        let outcome = judge(&challenge, size, answer, connected);
        match self.record(f, &pack, outcome) {
            Ok(outcome) => done(Some(pack), outcome),
            Err(e) => {
                tracing::warn!(%peer, error = %e.full_message(), "recording an audit");
                done(Some(pack), Outcome::Unreachable(e.to_string()))
            }
        }
    }

    /// Counts an audit in the friend's record, and returns the outcome as counted (enough
    /// unanswered audits in a row become a failure).
    fn record(&self, f: &Friend, pack: &PackId, outcome: Outcome) -> Result<Outcome, NodeError> {
        let now = now_ns();
        let store = &self.repo.store;
        let outcome = match outcome {
            Outcome::Unanswered(why) => {
                let h = store.update_friend_health(&f.peer_id, |h| h.unanswered += 1)?;
                if h.unanswered >= MAX_UNANSWERED {
                    Outcome::Failed(format!(
                        "it left {} audits in a row unanswered while connected; the last: {why}",
                        h.unanswered
                    ))
                } else {
                    tracing::debug!(friend = %f.name, why = %why, "audit unanswered");
                    return Ok(Outcome::Unanswered(why));
                }
            }
            other => other,
        };
        match &outcome {
            Outcome::Passed => {
                tracing::debug!(friend = %f.name, pack = %pack.short(), "audit passed");
                store.update_friend_health(&f.peer_id, |h| {
                    h.audits_passed += 1;
                    h.last_audit_ns = now;
                    h.last_passed = true;
                    h.unanswered = 0;
                })?;
                // Proof beats any earlier doubt: the pack counts as held there again.
                if store.is_suspect(pack, &f.peer_id)? {
                    tracing::info!(friend = %f.name, pack = %pack.short(), "audit passed for a pack the friend had failed before; it counts again");
                    store.confirm_placement(pack, &f.peer_id)?;
                }
            }
            Outcome::Failed(why) => {
                let why: String = why.chars().take(MAX_REASON).collect();
                tracing::error!(friend = %f.name, pack = %pack.short(), why = %why, "AUDIT FAILED: the friend could not prove it holds our pack; it will be repaired");
                store.update_friend_health(&f.peer_id, |h| {
                    h.audits_failed += 1;
                    h.last_audit_ns = now;
                    h.last_passed = false;
                    h.last_failure_ns = now;
                    h.last_failure = format!("pack {}: {why}", pack.short());
                    h.unanswered = 0;
                })?;
                store.suspect_placement(pack, &f.peer_id)?;
            }
            Outcome::Unanswered(_) => {}
            Outcome::Unreachable(why) => {
                tracing::debug!(friend = %f.name, why = %why, "audit skipped");
            }
        }
        Ok(outcome)
    }
}

/// One copy checked by `verify --sample`.
#[derive(Debug, Clone)]
pub struct SampleCheck {
    /// The friend that sent the copy.
    pub friend: Friend,
    /// The pack.
    pub pack: PackId,
    /// Passed, failed (the friend's copy, or the pack itself), or could not be fetched.
    pub outcome: Outcome,
    /// Chunks decrypted and checked.
    pub chunks: u64,
}

impl Auditor {
    /// `verify --sample PERCENT`: picks that share of our packs at random (at least one) and
    /// downloads each from every friend known to hold it, checking each copy: its hash against
    /// the pack id, its sealed index, and every chunk, decrypted and checked against its id. A
    /// copy that is missing or does not hash to its id counts as a failed audit of that friend.
    /// Blocking: call it from a blocking thread.
    ///
    /// # Errors
    /// [`NodeError::NotInitialized`], [`NodeError::Shutdown`] without a network, database and
    /// I/O errors.
    pub fn sample(
        &self,
        percent: u32,
        events: &dyn crate::backup::Events,
    ) -> Result<Vec<SampleCheck>, NodeError> {
        use obnam_protocol::control::{Event, Progress};
        let repo = &self.repo;
        let owner = repo.owner()?;
        let remote = repo.remote.get().ok_or(NodeError::Shutdown)?;
        let mut packs = repo.store.packs()?;
        let want = sample_size(packs.len(), percent);
        // A partial Fisher-Yates shuffle: the first `want` are the sample.
        for i in 0..want {
            let j = i + usize::try_from(random_u64() % (packs.len() - i) as u64).unwrap_or(0);
            packs.swap(i, j);
        }
        packs.truncate(want);
        let friends = repo.store.friends()?;
        let mut copies = Vec::new();
        for (id, rec) in &packs {
            let holders = repo.store.holders(id)?;
            for f in friends.iter().filter(|f| holders.contains(&f.peer_id)) {
                copies.push((f.clone(), *id, rec.len));
            }
        }
        let total_bytes: u64 = copies.iter().map(|(_, _, len)| len).sum();
        let mut tag = [0u8; 8];
        rand::fill(&mut tag[..]);
        let dir = repo
            .paths
            .data
            .join("cache")
            .join(format!("sample-{}", hex::encode(tag)));
        std::fs::create_dir_all(&dir)
            .map_err(|e| NodeError::io(format!("creating {}", dir.display()), e))?;
        let mut out = Vec::new();
        let mut done_bytes = 0;
        for (n, (f, pack, len)) in copies.iter().enumerate() {
            events.send(Event::Progress(Progress {
                files: n as u64,
                bytes: done_bytes,
                total_files: Some(copies.len() as u64),
                total_bytes: Some(total_bytes),
                current: format!("pack {} from {}", pack.short(), f.name),
            }));
            let (outcome, chunks) = self.check_copy(remote, &owner.keys, f, pack, &dir);
            done_bytes += len;
            let outcome = match outcome {
                // Only a bad copy is the friend's fault.
                o @ (Outcome::Failed(_) | Outcome::Unanswered(_)) if chunks == u64::MAX => {
                    self.record(f, pack, o)?
                }
                o => o,
            };
            out.push(SampleCheck {
                friend: f.clone(),
                pack: *pack,
                outcome,
                chunks: if chunks == u64::MAX { 0 } else { chunks },
            });
        }
        let _ = std::fs::remove_dir_all(&dir);
        if out.iter().any(|c| matches!(c.outcome, Outcome::Failed(_))) {
            self.replicator.wake();
        }
        Ok(out)
    }

    /// Fetches one friend's copy of a pack and checks it. The count is `u64::MAX` when the
    /// friend's copy itself is bad (missing, or not hashing to its id): a failure to record
    /// against the friend.
    fn check_copy(
        &self,
        remote: &crate::repo::Remote,
        keys: &crate::keys::Keys,
        f: &Friend,
        pack: &PackId,
        dir: &std::path::Path,
    ) -> (Outcome, u64) {
        let Ok(peer) = PeerId::from_bytes(&f.peer_id) else {
            return (Outcome::Unreachable("bad peer id".into()), 0);
        };
        let path = dir.join(format!("{}.pack", pack.to_hex()));
        let limit = self.repo.pack_fetch_limit();
        let connected = self.net.is_connected(&peer);
        let fetched = remote.handle.block_on(async {
            tokio::time::timeout(limit, peers::fetch(&self.net, peer, keys, *pack, &path)).await
        });
        let result = match fetched {
            Ok(Ok(got)) if got == *pack => check_chunks(keys, pack, &path)
                .map(|n| (Outcome::Passed, n))
                .unwrap_or_else(|e| {
                    // The copy is exactly what we sent: the pack itself is damaged.
                    (
                        Outcome::Failed(format!(
                            "the pack itself is damaged (the friend's copy is byte-identical to it): {}",
                            e.full_message()
                        )),
                        0,
                    )
                }),
            Ok(Ok(got)) => (
                Outcome::Failed(format!("its copy hashes to {}", got.short())),
                u64::MAX,
            ),
            Ok(Err(e)) if e.to_string().contains("refused") => (
                Outcome::Failed(format!("it could not send the pack: {}", e.full_message())),
                u64::MAX,
            ),
            Ok(Err(e)) if connected => (Outcome::Unanswered(e.full_message()), u64::MAX),
            Ok(Err(e)) => (Outcome::Unreachable(e.full_message()), 0),
            Err(_) if connected => (
                Outcome::Unanswered(format!("the download took longer than {limit:?}")),
                u64::MAX,
            ),
            Err(_) => (Outcome::Unreachable("offline".into()), 0),
        };
        let _ = std::fs::remove_file(&path);
        result
    }
}

/// How many of `packs` packs a sample of `percent` checks: at least one when there are any.
pub fn sample_size(packs: usize, percent: u32) -> usize {
    let p = u64::from(percent.min(100));
    let n = (packs as u64 * p).div_ceil(100);
    usize::try_from(n)
        .unwrap_or(packs)
        .clamp(packs.min(1), packs)
}

/// Opens every chunk of a downloaded pack; returns how many.
fn check_chunks(
    keys: &crate::keys::Keys,
    pack: &PackId,
    path: &std::path::Path,
) -> Result<u64, NodeError> {
    use std::os::unix::fs::FileExt;
    let ctx = || format!("reading downloaded pack {pack}");
    let file = std::fs::File::open(path).map_err(|e| NodeError::io(ctx(), e))?;
    let len = file.metadata().map_err(|e| NodeError::io(ctx(), e))?.len();
    let read = |off: u64, n: usize| {
        let mut buf = vec![0u8; n];
        file.read_exact_at(&mut buf, off)
            .map_err(|e| NodeError::io(ctx(), e))?;
        Ok(buf)
    };
    let index = crate::pack::read_index(keys, pack, len, read)?;
    let mut n = 0;
    for e in &index.entries {
        let sealed = read(u64::from(e.offset), e.len as usize)?;
        crate::seal::open_chunk(keys, &e.chunk, &sealed).map_err(|err| {
            NodeError::Authentication {
                what: format!("chunk {} in pack {pack}: {err}", e.chunk),
            }
        })?;
        n += 1;
    }
    Ok(n)
}

type Targets = (
    Arc<crate::keys::Owner>,
    Vec<(Friend, Vec<(PackId, u64)>)>,
    Option<PackId>,
    Option<PackId>,
);

/// What a round audits: for each friend, the packs it is known to hold; our newest pack; and the
/// pack of the latest snapshot's root tree. `None` before `init`.
fn targets(repo: &Repo) -> Result<Option<Targets>, NodeError> {
    let owner = match repo.owner() {
        Ok(o) => o,
        Err(NodeError::NotInitialized) => return Ok(None),
        Err(e) => return Err(e),
    };
    let packs = repo.store.packs()?;
    let newest = packs
        .iter()
        .max_by_key(|(id, r)| (r.created_ns, *id))
        .map(|(id, _)| *id);
    let root = repo
        .store
        .snapshots()?
        .iter()
        .max_by_key(|(_, r)| r.time_ns)
        .and_then(|(_, r)| r.root.first().copied())
        .and_then(|c| repo.store.chunk(&c).ok().flatten())
        .map(|loc| loc.pack);
    let list = repo.store.friends()?;
    let mut held: Vec<Vec<(PackId, u64)>> = vec![Vec::new(); list.len()];
    for (id, rec) in &packs {
        let holders = repo.store.holders(id)?;
        for (i, f) in list.iter().enumerate() {
            if holders.contains(&f.peer_id) {
                held[i].push((*id, rec.len));
            }
        }
    }
    let mut friends = Vec::new();
    for (f, mut held) in list.into_iter().zip(held) {
        // Packs the friend failed before are audited again: a pass makes them count again.
        for id in repo.store.suspects_of(&f.peer_id)? {
            if let Some((_, rec)) = packs.iter().find(|(p, _)| *p == id)
                && !held.iter().any(|(p, _)| *p == id)
            {
                held.push((id, rec.len));
            }
        }
        friends.push((f, held));
    }
    Ok(Some((Arc::new(owner), friends, newest, root)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use obnam_protocol::msg::WireError;
    use serde_bytes::ByteBuf;

    #[test]
    fn samples_take_at_least_one_pack_and_never_more_than_all() {
        assert_eq!(sample_size(0, 10), 0);
        assert_eq!(sample_size(5, 0), 1);
        assert_eq!(sample_size(5, 1), 1);
        assert_eq!(sample_size(200, 5), 10);
        assert_eq!(sample_size(201, 5), 11);
        assert_eq!(sample_size(7, 100), 7);
        assert_eq!(sample_size(7, 500), 7);
    }

    #[test]
    fn every_days_audits_include_the_newest_pack_and_the_root() {
        for per_day in [1u32, 2, 3, 16, 64] {
            let kinds: Vec<Kind> = (0..u64::from(per_day.max(3)))
                .map(|n| kind_of(n, per_day))
                .collect();
            assert!(kinds.contains(&Kind::Newest), "{per_day}");
            assert!(kinds.contains(&Kind::Root), "{per_day}");
            assert!(kinds.contains(&Kind::Random), "{per_day}");
        }
        assert_eq!(audit_interval(16), Duration::from_secs(5400));
        assert_eq!(audit_interval(0), Duration::from_secs(86_400));
    }

    #[test]
    fn picks_prefer_the_named_pack_and_fall_back_to_random() {
        let held = [(PackId([1; 32]), 10), (PackId([2; 32]), 20)];
        let two = Some(PackId([2; 32]));
        let nine = Some(PackId([9; 32]));
        assert_eq!(pick(Kind::Newest, &held, two, None, 0), Some(held[1]));
        assert_eq!(pick(Kind::Root, &held, None, two, 0), Some(held[1]));
        assert_eq!(pick(Kind::Newest, &held, nine, None, 0), Some(held[0]));
        assert_eq!(pick(Kind::Random, &held, two, two, 3), Some(held[1]));
        assert_eq!(pick(Kind::Random, &[], two, two, 3), None);
    }

    #[test]
    fn answers_are_judged_on_the_proof_alone() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let c = Challenge::random(PackId::of(&data), data.len() as u64, &[3; 40]);
        let proof = audit::prove(&c, data.len() as u64, &data[..], &data[..]).unwrap();
        let size = data.len() as u64;
        let answer = |nonce, proof: &[u8]| {
            Ok(Response::Proof {
                nonce,
                proof: ByteBuf::from(proof.to_vec()),
            })
        };
        assert_eq!(
            judge(&c, size, answer(c.nonce, &proof), true),
            Outcome::Passed
        );
        assert!(matches!(
            judge(&c, size, answer([0; 32], &proof), true),
            Outcome::Failed(_)
        ));
        let mut bad = proof.clone();
        bad[proof.len() / 2] ^= 1;
        assert!(matches!(
            judge(&c, size, answer(c.nonce, &bad), true),
            Outcome::Failed(_)
        ));
        let refusal = |code| {
            Ok(Response::Error(WireError {
                code,
                message: "x".into(),
                available: None,
            }))
        };
        assert!(matches!(
            judge(&c, size, refusal(ErrorCode::NotFound), true),
            Outcome::Failed(_)
        ));
        assert!(matches!(
            judge(&c, size, refusal(ErrorCode::Busy), true),
            Outcome::Unanswered(_)
        ));
        let dropped = || Err(NodeError::Net("connection closed".into()));
        assert!(matches!(
            judge(&c, size, dropped(), true),
            Outcome::Unanswered(_)
        ));
        let silence = || Err(NodeError::Net(format!("{TIMED_OUT} x within 10s")));
        assert!(matches!(
            judge(&c, size, silence(), true),
            Outcome::Failed(_)
        ));
        assert!(matches!(
            judge(&c, size, silence(), false),
            Outcome::Unreachable(_)
        ));
    }
}
