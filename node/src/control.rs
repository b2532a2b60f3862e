//! The control socket: how `obnam` talks to `obnam-node`.
//!
//! The server accepts at most [`MAX_CONNECTIONS`] connections at once. Each connection carries
//! one [`Request`] and receives [`Event`]s until a final `Done` or `Failed` (framing in
//! [`obnam_protocol::control`]). Work runs on blocking threads; its events travel through a
//! bounded channel (progress is dropped when the client reads slowly, warnings are not).
//! A client that disconnects does not stop a running backup.

use crate::backup::{self, Events};
use crate::config::Paths;
use crate::error::NodeError;
use crate::keys;
use crate::net::Net;
use crate::replication::Replicator;
use crate::repo::Repo;
use crate::restore;
use obnam_protocol::control::{
    self, ControlError, Event, IdReply, InitReply, Reply, Request, SnapshotInfo, StatusReply,
};
use obnam_protocol::ticket::Ticket;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Mutex, Semaphore, mpsc};

/// Most control connections served at once.
pub const MAX_CONNECTIONS: usize = 32;

/// What the control server needs.
pub struct Daemon {
    /// The repository.
    pub repo: Repo,
    /// The network.
    pub net: Net,
    /// The replication actor.
    pub replicator: Arc<Replicator>,
    /// The audit actor.
    pub auditor: Arc<crate::audit::Auditor>,
    /// Held by the running backup.
    pub backup_lock: Mutex<()>,
}

struct ChanEvents(mpsc::Sender<Event>);

impl Events for ChanEvents {
    fn send(&self, event: Event) {
        match event {
            Event::Progress(_) => {
                let _ = self.0.try_send(event);
            }
            other => {
                let _ = self.0.blocking_send(other);
            }
        }
    }
}

async fn read_frame<T: serde::de::DeserializeOwned>(
    r: &mut (impl AsyncReadExt + Unpin),
    what: &'static str,
) -> Result<Option<T>, NodeError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(NodeError::Control(format!("reading {what}: {e}"))),
    }
    let len = control::frame_len(len).map_err(|e| NodeError::Control(e.to_string()))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .await
        .map_err(|e| NodeError::Control(format!("reading {what}: {e}")))?;
    control::decode_body(what, &body)
        .map(Some)
        .map_err(|e| NodeError::Control(e.to_string()))
}

/// Accepts control connections until the listener fails.
pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let daemon = Arc::clone(&daemon);
        tokio::spawn(async move {
            handle(stream, daemon).await;
            drop(permit);
        });
    }
}

async fn handle(stream: UnixStream, daemon: Arc<Daemon>) {
    let (mut rd, mut wr) = stream.into_split();
    let req: Request = match read_frame(&mut rd, "control request").await {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            let ev = Event::Failed(ControlError {
                kind: "bad_request".into(),
                message: e.to_string(),
            });
            let _ = wr.write_all(&control::frame(&ev)).await;
            return;
        }
    };
    let (tx, mut rx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        let result = dispatch(&daemon, req, tx.clone()).await;
        let ev = match result {
            Ok(reply) => Event::Done(reply),
            Err(e) => Event::Failed(ControlError {
                kind: e.kind().into(),
                message: e.full_message(),
            }),
        };
        let _ = tx.send(ev).await;
    });
    let mut client_gone = false;
    while let Some(ev) = rx.recv().await {
        if !client_gone && wr.write_all(&control::frame(&ev)).await.is_err() {
            // Keep draining: the work goes on without its client.
            client_gone = true;
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| NodeError::Control(format!("worker failed: {e}")))?
}

async fn dispatch(
    daemon: &Arc<Daemon>,
    req: Request,
    tx: mpsc::Sender<Event>,
) -> Result<Reply, NodeError> {
    let repo = daemon.repo.clone();
    match req {
        Request::Id => {
            let addrs = daemon.net.addrs();
            let ticket = Ticket {
                peer_id: daemon.net.peer_id,
                addrs: addrs.clone(),
            }
            .encode();
            Ok(Reply::Id(IdReply {
                peer_id: daemon.net.peer_id.to_string(),
                addrs: addrs.iter().map(ToString::to_string).collect(),
                ticket,
            }))
        }
        Request::Init(init) => {
            blocking(move || {
                let path = repo.paths.secrets();
                if let Ok(existing) = keys::load_secrets(&path) {
                    return Err(NodeError::AlreadyInitialized { name: existing.name.clone() });
                }
                if init.name.trim().is_empty() {
                    return Err(NodeError::Usage("the owner name must not be empty".into()));
                }
                if init.passphrase.is_empty() {
                    return Err(NodeError::WeakPassphrase { reason: "it is empty".into() });
                }
                if !init.weak_ok {
                    keys::check_strength(&init.passphrase, &init.name)?;
                }
                let owner = keys::init(&path, &init.name, &init.passphrase)?;
                tracing::info!(name = %owner.name, owner = %owner.keys.owner_id(), "owner keys created");
                // The first head lists the friends, so each friend that gets the key slot gets a
                // head naming the others (see `Replicator`): a recovery through any one of them
                // finds them all, even before the first backup reached it.
                repo.record_friends(&owner.keys)?;
                Ok(Reply::Init(InitReply { name: owner.name.clone(), owner: owner.keys.owner_id() }))
            })
            .await
        }
        Request::CheckPassphrase { passphrase } => {
            blocking(move || {
                keys::check_passphrase(&repo.paths.secrets(), &passphrase)
                    .map(|name| Reply::PassphraseOk { name })
            })
            .await
        }
        Request::Backup(req) => {
            // Fail fast on a bad secrets file or index rather than after waiting for the lock.
            let check = repo.clone();
            blocking(move || {
                check.owner()?;
                check.check_index()
            })
            .await?;
            let _guard = match daemon.backup_lock.try_lock() {
                Ok(g) => g,
                Err(_) => {
                    let _ = tx
                        .send(Event::Notice(
                            "another backup is running on this node; waiting for it to finish"
                                .into(),
                        ))
                        .await;
                    daemon.backup_lock.lock().await
                }
            };
            let timeout = if req.timeout_secs > 0 {
                req.timeout_secs
            } else {
                repo.config.replication_timeout_secs
            };
            let events = ChanEvents(tx.clone());
            let backup_repo = repo.clone();
            let report = blocking(move || backup::backup(&backup_repo, &req, &events)).await?;
            wait_for_replicas(daemon, report, timeout, &tx)
                .await
                .map(Reply::Backup)
        }
        Request::Snapshots => {
            let replicator = Arc::clone(&daemon.replicator);
            blocking(move || {
                let owner = repo.owner()?;
                repo.check_index()?;
                // Friends may hold a newer head (written by another node of this owner, or before a
                // recovery): ask them, adopt the newest, and name stale friends and forks.
                if let Some(remote) = repo.remote.get() {
                    let friends = crate::recover::friend_peers(&repo, remote)?;
                    if !friends.is_empty() {
                        let survey = remote.handle.block_on(async {
                            tokio::time::timeout(
                                std::time::Duration::from_secs(repo.config.request_timeout_secs),
                                crate::recover::survey_heads(remote, &owner.keys, &friends),
                            )
                            .await
                        });
                        if let Ok(survey) = survey {
                            crate::recover::merge_survey(&repo, remote, &owner.keys, &survey)?;
                            for s in &survey.stale {
                                let _ =
                                    tx.blocking_send(Event::Warning(format!("stale friend: {s}")));
                            }
                            for f in &survey.forks {
                                let _ = tx.blocking_send(Event::Warning(format!("fork: {f}")));
                            }
                        }
                    }
                }
                let mut records = repo.store.snapshots()?;
                records.sort_by_key(|(_, r)| r.time_ns);
                let counted = replicator.counted_friends()?;
                let health: std::collections::HashMap<_, _> =
                    crate::health::snapshot_health(&repo, &counted)?
                        .into_iter()
                        .collect();
                let list = records
                    .into_iter()
                    .map(|(id, r)| SnapshotInfo {
                        id,
                        time_ns: r.time_ns,
                        host: r.host.clone(),
                        paths: r.paths_lossy(),
                        tags: r.tags.clone(),
                        files: r.files,
                        bytes: r.bytes,
                        health: health.get(&id).copied().unwrap_or_default(),
                    })
                    .collect();
                Ok(Reply::Snapshots(list))
            })
            .await
        }
        Request::Ls(req) => {
            let events = ChanEvents(tx);
            blocking(move || {
                repo.check_index()?;
                restore::ls(&repo, &req, &events)
                    .map(|(snapshot, entries)| Reply::Ls { snapshot, entries })
            })
            .await
        }
        Request::Restore(req) => {
            let events = ChanEvents(tx);
            blocking(move || {
                repo.check_index()?;
                restore::restore(&repo, &req, &events).map(Reply::Restore)
            })
            .await
        }
        Request::PeerAdd(req) => peer_add(daemon, req).await,
        Request::Recover { name, passphrase } => {
            // Pack sets come from trees once the index is rebuilt, not from a half-built one.
            let _hold = daemon.auditor.hold_fill();
            blocking(move || {
                let remote = repo.remote.get().ok_or(NodeError::Shutdown)?;
                let r = crate::recover::recover(&repo, remote, &name, &passphrase)?;
                let mut warnings = r.warnings;
                warnings.extend(unlisted_warnings(&r.rebuilt));
                warnings.extend(r.rebuilt.failed);
                Ok(Reply::Recovered(obnam_protocol::control::RecoverReply {
                    name,
                    owner: r.owner,
                    head_seq: r.head_seq,
                    snapshots: r.snapshots,
                    packs: r.rebuilt.packs,
                    chunks: r.rebuilt.chunks,
                    seeded_dirs: r.rebuilt.seeded_dirs,
                    friends_added: r.friends_added,
                    took_over: r.took_over,
                    warnings,
                }))
            })
            .await
            .inspect(|_| daemon.replicator.wake())
        }
        Request::Verify { sample_percent } => {
            blocking(move || repo.owner().map(|_| ())).await?;
            use crate::audit::{Kind, Outcome};
            let done = daemon
                .auditor
                .round(Some(&[
                    Kind::Newest,
                    Kind::Root,
                    Kind::Random,
                    Kind::Random,
                ]))
                .await;
            let sampled = match sample_percent {
                Some(p) => {
                    let auditor = Arc::clone(&daemon.auditor);
                    let events = ChanEvents(tx.clone());
                    blocking(move || auditor.sample(p, &events)).await?
                }
                None => Vec::new(),
            };
            let mut report = obnam_protocol::control::VerifyReport::default();
            let samples = sampled.into_iter().map(|c| crate::audit::Audited {
                friend: c.friend,
                pack: Some(c.pack),
                kind: Kind::Sample(c.chunks),
                outcome: c.outcome,
            });
            for a in done.into_iter().chain(samples) {
                let (outcome, detail) = match a.outcome {
                    Outcome::Passed => {
                        report.passed += 1;
                        ("passed", None)
                    }
                    Outcome::Failed(why) => {
                        report.failed += 1;
                        ("failed", Some(why))
                    }
                    Outcome::Unreachable(why) | Outcome::Unanswered(why) => {
                        report.unreachable += 1;
                        ("unreachable", Some(why))
                    }
                };
                report.audits.push(obnam_protocol::control::AuditInfo {
                    peer_id: peer_name(&a.friend),
                    name: a.friend.name.clone(),
                    pack: a.pack.map(|p| p.to_hex()),
                    kind: a.kind.name().into(),
                    outcome: outcome.into(),
                    detail: match (a.kind, detail) {
                        (Kind::Sample(n), None) => {
                            Some(format!("{n} chunks decrypted and checked"))
                        }
                        (_, d) => d,
                    },
                });
            }
            Ok(Reply::Verified(report))
        }
        Request::RotateKeys { passphrase } => {
            let _guard = daemon.backup_lock.lock().await;
            let r = blocking(move || crate::rotate::rotate(&repo, &passphrase)).await?;
            daemon.replicator.wake();
            Ok(Reply::KeysRotated {
                old_owner: r.old,
                new_owner: r.new,
                snapshots: r.snapshots,
                new_bytes: r.new_bytes,
                stored_bytes: r.stored_bytes,
            })
        }
        Request::ChangePassphrase { old, new, weak_ok } => {
            let d = Arc::clone(daemon);
            blocking(move || {
                let path = repo.paths.secrets();
                let name = keys::load_secrets(&path)?.name.clone();
                if new.is_empty() {
                    return Err(NodeError::WeakPassphrase { reason: "it is empty".into() });
                }
                if !weak_ok {
                    keys::check_strength(&new, &name)?;
                }
                keys::change_passphrase(&path, &old, &new)?;
                let mut pending = Vec::new();
                for f in repo.store.friends()? {
                    repo.store.update_peer_state(&f.peer_id, |s| s.slot_pushed = false)?;
                    pending.push(f.name.clone());
                }
                tracing::info!(name = %name, friends = pending.len(), "passphrase changed; pushing the new key slot to every friend");
                d.replicator.wake();
                Ok(Reply::PassphraseChanged { name, pending })
            })
            .await
        }
        Request::IndexRebuild => {
            let _hold = daemon.auditor.hold_fill();
            blocking(move || {
                let remote = repo.remote.get().ok_or(NodeError::Shutdown)?;
                let owner = repo.owner()?;
                let (rebuilt, mut warnings, added) = crate::recover::rebuild(&repo, remote)?;
                warnings.extend(unlisted_warnings(&rebuilt));
                warnings.extend(rebuilt.failed);
                Ok(Reply::Recovered(obnam_protocol::control::RecoverReply {
                    name: owner.name.clone(),
                    owner: owner.keys.owner_id(),
                    head_seq: current_seq(&repo)?,
                    snapshots: repo.store.snapshots()?.len() as u64,
                    packs: rebuilt.packs,
                    chunks: rebuilt.chunks,
                    seeded_dirs: rebuilt.seeded_dirs,
                    friends_added: added,
                    took_over: Vec::new(),
                    warnings,
                }))
            })
            .await
        }
        Request::PeerList => {
            let d = Arc::clone(daemon);
            blocking(move || {
                let mut out = Vec::new();
                for f in d.repo.store.friends()? {
                    out.push(peer_info(&d, &f)?);
                }
                Ok(Reply::Peers(out))
            })
            .await
        }
        Request::PeerRemove { peer_id } => {
            let peer: libp2p::PeerId = peer_id
                .parse()
                .map_err(|_| NodeError::Usage(format!("{peer_id:?} is not a peer id")))?;
            let removed = blocking(move || {
                if !repo.store.remove_friend(&peer.to_bytes())? {
                    return Err(NodeError::Usage(format!("{peer} is not a friend")));
                }
                repo.record_friends_if_owner()?;
                Ok(())
            });
            removed.await?;
            tracing::info!(%peer, "friend removed");
            daemon.replicator.wake();
            Ok(Reply::PeerRemoved {
                peer_id: peer.to_string(),
            })
        }
        Request::Status => {
            let running = daemon.backup_lock.try_lock().is_err();
            let peer_id = daemon.net.peer_id.to_string();
            let d = Arc::clone(daemon);
            blocking(move || {
                let owner_name = match keys::load_secrets(&repo.paths.secrets()) {
                    Ok(s) => Some(s.name.clone()),
                    Err(NodeError::NotInitialized) => None,
                    Err(e) => return Err(e),
                };
                let is_owner = owner_name.is_some();
                let snaps = repo.store.snapshots()?;
                let usage = repo.store.outbox_usage()?;
                let friends = repo.store.friends()?;
                let online = friends
                    .iter()
                    .filter(|f| {
                        libp2p::PeerId::from_bytes(&f.peer_id).is_ok_and(|p| d.net.is_connected(&p))
                    })
                    .count() as u64;
                let seq = current_seq(&repo)?;
                let health = d.replicator.health(seq)?;
                let hosted = repo.store.hosted_owners()?;
                let mut slot_pending = Vec::new();
                if is_owner {
                    for f in &friends {
                        if !repo.store.peer_state(&f.peer_id)?.slot_pushed {
                            slot_pending.push(f.name.clone());
                        }
                    }
                }
                Ok(Reply::Status(Box::new(StatusReply {
                    data_dir: repo.paths.data.display().to_string(),
                    peer_id,
                    owner_name,
                    snapshots: snaps.len() as u64,
                    last_backup_ns: snaps.last().map(|(_, r)| r.time_ns),
                    outbox_packs: usage.packs,
                    outbox_bytes: usage.bytes,
                    outbox_max_bytes: repo.config.outbox_max_bytes,
                    backup_running: running,
                    friends: friends.len() as u64,
                    friends_online: online,
                    replicas: health.replicas,
                    replicated_to: health.holders,
                    under_replicated: is_owner
                        && !snaps.is_empty()
                        && health.holders < health.replicas,
                    waiting: health.waiting,
                    hosted_owners: hosted.len() as u64,
                    hosted_bytes: hosted.iter().map(|(_, o)| o.used).sum(),
                    slot_pending,
                    rotation_pending: d.replicator.rotation_pending()?,
                    friend_health: friends
                        .iter()
                        .map(|f| {
                            Ok(obnam_protocol::control::FriendHealthInfo {
                                peer_id: peer_name(f),
                                name: f.name.clone(),
                                online: libp2p::PeerId::from_bytes(&f.peer_id)
                                    .is_ok_and(|p| d.net.is_connected(&p)),
                                audits: friend_audits(&repo, f)?,
                            })
                        })
                        .collect::<Result<_, NodeError>>()?,
                    latest_snapshot_health: crate::health::snapshot_health(
                        &repo,
                        &d.replicator.counted_friends()?,
                    )?
                    .last()
                    .map(|(_, h)| Box::new(*h)),
                    own_pack_bytes: repo.store.packs()?.iter().map(|(_, r)| r.len).sum(),
                    sent_bytes: d.replicator.sent_bytes(),
                    repaired_bytes: d.replicator.repaired_bytes(),
                })))
            })
            .await
        }
    }
}

/// One warning per friend the index could not be rebuilt from.
fn unlisted_warnings(r: &crate::recover::Rebuilt) -> Vec<String> {
    r.unlisted
        .iter()
        .map(|p| {
            format!(
                "friend {p} could not be asked which packs it holds; what only it holds is added to the index when it is back"
            )
        })
        .collect()
}

fn current_seq(repo: &Repo) -> Result<u64, NodeError> {
    let Some(head) = repo.store.own_head()? else {
        return Ok(0);
    };
    let owner = match repo.owner() {
        Ok(o) => o,
        Err(NodeError::NotInitialized) => return Ok(0),
        Err(e) => return Err(e),
    };
    obnam_protocol::snapshot::SignedHead::verify(&head, &owner.keys.owner_id())
        .map(|(_, h)| h.seq)
        .map_err(|e| NodeError::Authentication {
            what: format!("own head: {e}"),
        })
}

/// After a backup: waits until the replica set holds the snapshot's packs and head, or until
/// nothing moved for `timeout_secs`; then the report says what is still waiting.
async fn wait_for_replicas(
    daemon: &Arc<Daemon>,
    mut report: obnam_protocol::control::BackupReport,
    timeout_secs: u64,
    tx: &mpsc::Sender<Event>,
) -> Result<obnam_protocol::control::BackupReport, NodeError> {
    let sent_before = daemon.replicator.sent_bytes();
    let mut progress = daemon.replicator.subscribe();
    daemon.replicator.wake();
    let seq = report.head_seq;
    let mut told = false;
    loop {
        let r = Arc::clone(&daemon.replicator);
        let (health, friends) = blocking(move || Ok((r.health(seq)?, r.friend_count()?))).await?;
        report.replicas = health.holders;
        if friends == 0 || daemon.repo.config.replicas == 0 {
            break;
        }
        if health.target > 0 && health.holders >= health.target {
            report.pending.clear();
            // The round that sent the last pack evicts only once every friend's sync is over;
            // do it now, so that `obnam status` after the backup shows what is really waiting.
            let r = Arc::clone(&daemon.replicator);
            // The snapshot is safe whatever happens here: the next round evicts again.
            if let Err(e) = blocking(move || r.evict_replicated()).await {
                tracing::warn!(error = %e.full_message(), "clearing the outbox after a backup");
            }
            break;
        }
        if !told {
            told = true;
            let n = health.target.max(1);
            let friends = if n == 1 { "friend" } else { "friends" };
            let _ = tx
                .send(Event::Notice(format!(
                    "waiting for {n} {friends} to hold the snapshot"
                )))
                .await;
        }
        match tokio::time::timeout(
            std::time::Duration::from_secs(timeout_secs.max(1)),
            progress.changed(),
        )
        .await
        {
            Ok(Ok(())) => continue,
            _ => {
                report.pending = if health.waiting.is_empty() {
                    vec![
                        "no friend accepts our packs (all refused for quota, or none reachable)"
                            .into(),
                    ]
                } else {
                    health.waiting
                };
                break;
            }
        }
    }
    report.sent_bytes = daemon.replicator.sent_bytes().saturating_sub(sent_before);
    Ok(report)
}

async fn peer_add(
    daemon: &Arc<Daemon>,
    req: obnam_protocol::control::PeerAddRequest,
) -> Result<Reply, NodeError> {
    use libp2p::{Multiaddr, PeerId};
    let who = req.who.trim();
    let (peer, mut addrs): (PeerId, Vec<Multiaddr>) = if who
        .starts_with(obnam_protocol::ticket::PREFIX_V1)
    {
        let t = Ticket::decode(who).map_err(|e| NodeError::Usage(format!("bad ticket: {e}")))?;
        (t.peer_id, t.addrs)
    } else {
        let p = who.parse().map_err(|_| {
            NodeError::Usage(format!(
                "{who:?} is neither a ticket (obnam1…) nor a peer id"
            ))
        })?;
        (p, Vec::new())
    };
    for a in &req.addrs {
        addrs.push(
            a.parse()
                .map_err(|e| NodeError::Usage(format!("address {a:?}: {e}")))?,
        );
    }
    if peer == daemon.net.peer_id {
        return Err(NodeError::Usage("that is this node's own peer id".into()));
    }
    let d = Arc::clone(daemon);
    let dial = addrs.clone();
    let info = blocking(move || {
        let store = &d.repo.store;
        let existing = store.friend(&peer.to_bytes())?;
        let short = peer.to_string();
        let friend = obnam_protocol::local::Friend {
            peer_id: peer.to_bytes(),
            name: req
                .name
                .clone()
                .or_else(|| existing.as_ref().map(|f| f.name.clone()))
                .unwrap_or_else(|| format!("friend-{}", &short[short.len().saturating_sub(6)..])),
            household: req
                .household
                .clone()
                .or_else(|| existing.as_ref().map(|f| f.household.clone()))
                .unwrap_or_default(),
            // New addresses are added to the known ones, never replace them.
            addrs: {
                let mut all: Vec<serde_bytes::ByteBuf> = existing
                    .as_ref()
                    .map(|f| f.addrs.clone())
                    .unwrap_or_default();
                for a in &addrs {
                    let b = serde_bytes::ByteBuf::from(a.to_vec());
                    if !all.contains(&b) {
                        all.push(b);
                    }
                }
                all
            },
            quota_given: req
                .quota
                .or_else(|| existing.as_ref().map(|f| f.quota_given))
                .unwrap_or(d.repo.config.default_quota),
            added_ns: existing
                .as_ref()
                .map(|f| f.added_ns)
                .unwrap_or_else(crate::repo::now_ns),
        };
        store.put_friend(&friend)?;
        store.update_peer_state(&friend.peer_id, |s| {
            s.slot_pushed = false;
            s.quota_refused = false;
        })?;
        tracing::info!(%peer, name = %friend.name, quota = friend.quota_given, "friend added");
        d.repo.record_friends_if_owner()?;
        peer_info(&d, &friend)
    })
    .await?;
    daemon.net.add_addrs(peer, dial).await?;
    daemon.replicator.wake();
    Ok(Reply::PeerAdded(Box::new(info)))
}

fn peer_info(
    d: &Daemon,
    f: &obnam_protocol::local::Friend,
) -> Result<obnam_protocol::control::PeerInfo, NodeError> {
    let peer = libp2p::PeerId::from_bytes(&f.peer_id)
        .map_err(|e| NodeError::Key(format!("stored peer id: {e}")))?;
    let state = d.repo.store.peer_state(&f.peer_id)?;
    let used_by_them = d
        .repo
        .store
        .hosted_owners()?
        .iter()
        .filter(|(_, o)| o.bound_peer == f.peer_id)
        .map(|(_, o)| o.used)
        .sum();
    let path = d.net.path(&peer);
    let record = d
        .repo
        .store
        .address_record(&f.peer_id)?
        .and_then(|r| crate::addrbook::open(&r.envelope).ok());
    Ok(obnam_protocol::control::PeerInfo {
        peer_id: peer.to_string(),
        name: f.name.clone(),
        household: f.household.clone(),
        online: d.net.is_connected(&peer),
        addrs: f
            .addrs
            .iter()
            .filter_map(|a| libp2p::Multiaddr::try_from(a.to_vec()).ok())
            .map(|a| a.to_string())
            .collect(),
        quota_given: f.quota_given,
        used_by_them,
        used_by_us: state.used_by_us,
        holds_slot: state.slot_pushed,
        last_error: d.replicator.last_error(&peer),
        audits: friend_audits(&d.repo, f)?,
        path: path.as_ref().map(|p| p.path.clone()),
        path_addr: path.as_ref().map(|p| p.addr.clone()),
        rtt_us: path
            .as_ref()
            .and_then(|p| p.rtt)
            .map(|r| u64::try_from(r.as_micros()).unwrap_or(u64::MAX)),
        record_addrs: record
            .as_ref()
            .map(|r| r.addrs.iter().map(ToString::to_string).collect())
            .unwrap_or_default(),
        record_seq: record.as_ref().map(|r| r.seq),
    })
}

fn peer_name(f: &obnam_protocol::local::Friend) -> String {
    libp2p::PeerId::from_bytes(&f.peer_id)
        .map(|p| p.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// A friend's audits and presence for `status` and `peer list`.
fn friend_audits(
    repo: &Repo,
    f: &obnam_protocol::local::Friend,
) -> Result<obnam_protocol::control::FriendAudits, NodeError> {
    let h = repo.store.friend_health(&f.peer_id)?;
    let when = |ns: i64| (ns != 0).then_some(ns);
    Ok(obnam_protocol::control::FriendAudits {
        passed: h.audits_passed,
        failed: h.audits_failed,
        last_audit_ns: when(h.last_audit_ns),
        last_passed: (h.last_audit_ns != 0).then_some(h.last_passed),
        last_failure_ns: when(h.last_failure_ns),
        last_failure: (!h.last_failure.is_empty()).then(|| h.last_failure.clone()),
        online_permille_30d: h
            .online_fraction()
            .map(|x| (x * 1000.0).round().clamp(0.0, 1000.0) as u32),
        last_seen_ns: when(h.last_seen_ns),
    })
}

/// The client side: one request per connection.
pub struct Client {
    stream: UnixStream,
}

impl Client {
    /// Connects to the node of a data directory.
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] with how to start the node.
    pub async fn connect(paths: &Paths, explicit_data_dir: bool) -> Result<Self, NodeError> {
        let socket = paths.socket();
        match UnixStream::connect(&socket).await {
            Ok(stream) => Ok(Self { stream }),
            Err(_) => Err(NodeError::NotRunning {
                data_dir: paths.data.clone(),
                socket,
                hint: if explicit_data_dir {
                    format!(" --data-dir {}", paths.data.display())
                } else {
                    String::new()
                },
            }),
        }
    }

    /// Sends a request and passes every event to `on_event` until the final reply.
    ///
    /// # Errors
    /// The node's [`ControlError`], or a `control` error when the connection breaks.
    pub async fn request(
        mut self,
        req: &Request,
        mut on_event: impl FnMut(Event),
    ) -> Result<Reply, ControlError> {
        let broken = |e: String| ControlError {
            kind: "control".into(),
            message: e,
        };
        self.stream
            .write_all(&control::frame(req))
            .await
            .map_err(|e| broken(format!("sending request: {e}")))?;
        loop {
            let ev: Option<Event> = read_frame(&mut self.stream, "control event")
                .await
                .map_err(|e| broken(e.to_string()))?;
            match ev {
                None => {
                    return Err(broken(
                        "the node closed the connection before answering (did it stop?)".into(),
                    ));
                }
                Some(Event::Done(reply)) => return Ok(reply),
                Some(Event::Failed(err)) => return Err(err),
                Some(other) => on_event(other),
            }
        }
    }
}

/// Sends one request to the node of `paths` and waits for the reply, on a private runtime.
/// For synchronous callers (the `obnam` program), which then need no async runtime of their own.
///
/// # Errors
/// [`ControlError`] with kind `not_running` when no node answers, or the node's error.
pub fn call(
    paths: &Paths,
    explicit_data_dir: bool,
    req: &Request,
    on_event: impl FnMut(Event),
) -> Result<Reply, ControlError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ControlError {
            kind: "io".into(),
            message: format!("cannot start the client runtime: {e}"),
        })?;
    let started = std::time::Instant::now();
    tracing::debug!(socket = %paths.socket().display(), "connecting to obnam-node");
    let result = runtime.block_on(async {
        let client = Client::connect(paths, explicit_data_dir)
            .await
            .map_err(|e| ControlError {
                kind: e.kind().into(),
                message: e.to_string(),
            })?;
        client.request(req, on_event).await
    });
    tracing::debug!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        ok = result.is_ok(),
        "request finished"
    );
    result
}

/// Binds the control socket with mode 0600, replacing a stale socket file.
///
/// # Errors
/// [`NodeError::Io`].
pub fn bind(path: &Path) -> Result<UnixListener, NodeError> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| NodeError::io(format!("creating {}", dir.display()), e))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| NodeError::io(format!("binding control socket {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| NodeError::io(format!("securing control socket {}", path.display()), e))?;
    Ok(listener)
}

/// The socket path of a data directory (for messages).
pub fn socket_for(paths: &Paths) -> PathBuf {
    paths.socket()
}
