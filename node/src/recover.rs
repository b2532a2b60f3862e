//! Recovery of a lost machine, and rebuilding the local index from friends.
//!
//! `obnam init --recover` on a new node that has one friend:
//! 1. stretches the passphrase with the owner name and asks each friend for the key slot under
//!    the lookup id (friends answer strangers this one question, rate-limited, and answer unknown
//!    ids with a fake, so a wrong name or passphrase simply opens nothing);
//! 2. writes the secrets file, proves the owner key to every friend and merges the heads that
//!    verify (stale friends and forks are reported): the newest is adopted, and heads that list
//!    snapshots the newest lacks are merged into a new head (see [`Repo::merge_head`]);
//! 3. learns the owner's other friends from the heads, befriends them, and merges their heads
//!    too, until no head names a friend not asked yet ([`survey_all`]); every friend holding the
//!    key slot holds a head naming the friends, because `init` writes one and a friend gets the
//!    head before the slot;
//! 4. sends every friend a signed takeover statement, so the new node becomes the writer;
//! 5. rebuilds the index: lists the packs each friend holds, reads each pack's sealed index from
//!    its last 64 KiB-aligned ranges, and records chunks, packs and holders.
//!
//! Everything here blocks: call it from a blocking thread; the network is reached through the
//! runtime handle in [`Remote`].

use crate::error::NodeError;
use crate::keys::{self, Keys};
use crate::peers;
use crate::repo::{HeadMerge, Remote, Repo, now_ns};
use crate::seal;
use futures::StreamExt;
use libp2p::PeerId;
use obnam_protocol::PackId;
use obnam_protocol::envelope::{DOMAIN_PACK_INDEX, DOMAIN_PACK_TRAILER};
use obnam_protocol::keyslot::{KeySlot, SLOT_VERSION};
use obnam_protocol::local::{Friend, PackRecord};
use obnam_protocol::msg::{self, Request, Response, TakeoverStatement};
use obnam_protocol::pack::{PACK_ALIGN, PackIndex, PackTrailer, TRAILER_LEN};
use obnam_protocol::signed::CONTEXT_TAKEOVER;
use obnam_protocol::snapshot::{Head, HeadBody, SignedHead};
use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;

/// What the friends' heads say.
#[derive(Debug, Default)]
pub struct HeadSurvey {
    /// The newest head that verifies: its bytes and parsed form.
    pub best: Option<(Vec<u8>, Head)>,
    /// Every distinct head that verifies, oldest first.
    pub heads: Vec<(u64, Vec<u8>)>,
    /// Friends holding an older head.
    pub stale: Vec<String>,
    /// Friends holding a different head at the newest sequence number.
    pub forks: Vec<String>,
    /// Friends that could not be asked.
    pub unreachable: Vec<String>,
    /// Each friend that holds a head that verifies, with that head's hash.
    pub held: Vec<(PeerId, [u8; 32])>,
}

impl HeadSurvey {
    /// Stale friends and forks, as sentences for the user.
    pub fn warnings(&self) -> Vec<String> {
        let mut w: Vec<String> = self
            .stale
            .iter()
            .map(|s| format!("stale friend: {s}"))
            .collect();
        w.extend(self.forks.iter().map(|f| format!("fork: {f}")));
        w
    }
}

/// Asks every friend for the owner's head, verifies each, and takes the newest.
pub async fn survey_heads(remote: &Remote, keys: &Keys, friends: &[PeerId]) -> HeadSurvey {
    let owner = keys.owner_id();
    let asks = friends.iter().map(|&peer| async move {
        let answer =
            peers::owner_request(&remote.net, peer, keys, Request::GetHead { owner }).await;
        (peer, answer)
    });
    let answers = futures::future::join_all(asks).await;
    let mut survey = HeadSurvey::default();
    let mut heads: Vec<(PeerId, SignedHead, Head, Vec<u8>)> = Vec::new();
    for (peer, answer) in answers {
        match answer {
            Ok(Response::Head(Some(bytes))) => match SignedHead::verify(&bytes, &owner) {
                Ok((signed, head)) => heads.push((peer, signed, head, bytes.into_vec())),
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "friend holds a head that does not verify");
                    survey
                        .forks
                        .push(format!("{peer} (holds a head that does not verify: {e})"));
                }
            },
            Ok(Response::Head(None)) => survey.stale.push(format!("{peer} (holds no head)")),
            Ok(other) => survey.unreachable.push(format!("{peer}: {other:?}")),
            Err(e) => survey.unreachable.push(format!("{peer}: {e}")),
        }
    }
    for (peer, signed, h, bytes) in &heads {
        survey.held.push((*peer, signed.hash()));
        if !survey.heads.iter().any(|(_, b)| b == bytes) {
            survey.heads.push((h.seq, bytes.clone()));
        }
    }
    survey.heads.sort_by_key(|(seq, _)| *seq);
    let Some(top) = heads.iter().map(|h| h.2.seq).max() else {
        return survey;
    };
    let best = heads
        .iter()
        .find(|h| h.2.seq == top)
        .map(|h| (h.0, h.1.hash(), h.3.clone(), h.2.clone()));
    if let Some((best_peer, best_hash, bytes, head)) = best {
        for (peer, signed, h, _) in &heads {
            if h.seq < top {
                tracing::warn!(%peer, seq = h.seq, newest = top, "friend holds a stale head");
                survey
                    .stale
                    .push(format!("{peer} (head {} of {top})", h.seq));
            } else if signed.hash() != best_hash {
                tracing::warn!(%peer, other = %best_peer, seq = top, "fork: two different heads with the same sequence number");
                survey.forks.push(format!(
                    "{peer} and {best_peer} hold different heads at sequence {top}"
                ));
            }
        }
        survey.best = Some((bytes, head));
    }
    survey
}

/// Merges every head of `survey` into ours (see [`Repo::merge_head`]), oldest first, and
/// befriends the friends they list. When this node took over the owner (a recovery), its
/// takeover statement is raised to the newest head merged, so friends that hold it accept the
/// node as the writer. Returns the friends added, as `name peer-id`.
///
/// # Errors
/// Key or database errors.
pub fn merge_survey(
    repo: &Repo,
    remote: &Remote,
    keys: &Keys,
    survey: &HeadSurvey,
) -> Result<Vec<String>, NodeError> {
    let mut added = Vec::new();
    for (seq, bytes) in &survey.heads {
        let body = match repo.merge_head(keys, bytes)? {
            HeadMerge::Kept { body }
            | HeadMerge::Adopted { body }
            | HeadMerge::Merged { body, .. } => body,
        };
        added.extend(learn_friends(repo, remote, &body)?);
        raise_takeover(repo, keys, &remote.net.peer_id, *seq)?;
    }
    Ok(added)
}

/// After a recovery, a friend that was away may hold a head newer than the one the node took
/// over from, and refuses the takeover until it names that head. Once that head is merged into
/// ours (so the statement is true), the stored statement is signed again from `seq`; friends
/// that accepted it before accept it again. Does nothing without a stored statement or when it
/// already starts at `seq` or later.
///
/// # Errors
/// Database errors.
pub fn raise_takeover(
    repo: &Repo,
    keys: &Keys,
    local: &PeerId,
    seq: u64,
) -> Result<bool, NodeError> {
    let Some(old) = stored_takeover(repo)? else {
        return Ok(false);
    };
    if old.from_seq >= seq {
        return Ok(false);
    }
    repo.store.set_meta(
        "takeover",
        &obnam_protocol::codec::encode(&takeover_statement(keys, local, seq)),
    )?;
    Ok(true)
}

/// The takeover statement of the last `init --recover` (meta `takeover`), if any.
///
/// # Errors
/// Database errors, or [`NodeError::Corrupt`] for a statement that does not decode.
pub fn stored_takeover(repo: &Repo) -> Result<Option<TakeoverStatement>, NodeError> {
    let Some(bytes) = repo.store.meta("takeover")? else {
        return Ok(None);
    };
    obnam_protocol::codec::decode_bounded("takeover statement", &bytes, 4096)
        .map(Some)
        .map_err(|e| NodeError::Corrupt {
            what: "takeover statement".into(),
            source: e,
        })
}

/// A signed statement that `local` writes for this owner from head `seq` on.
fn takeover_statement(keys: &Keys, local: &PeerId, seq: u64) -> TakeoverStatement {
    let owner = keys.owner_id();
    let local = local.to_bytes();
    let payload = TakeoverStatement::payload(&owner, &local, seq);
    TakeoverStatement {
        owner,
        new_node: local,
        from_seq: seq,
        signature: keys.sign(CONTEXT_TAKEOVER, &payload).to_vec(),
    }
}

/// A pack, its length and holders, and its index as fetched.
type IndexFetch = (PackId, u64, Vec<PeerId>, Result<PackIndex, NodeError>);

/// What an index rebuild found.
#[derive(Debug, Default)]
pub struct Rebuilt {
    /// Packs recorded.
    pub packs: u64,
    /// Chunks recorded.
    pub chunks: u64,
    /// Packs whose index could not be read from any friend.
    pub failed: Vec<String>,
    /// Directories whose file-cache record was seeded from the newest snapshot.
    pub seeded_dirs: u64,
    /// Friends whose pack list could not be read (away, or not accepting us yet): the index
    /// lacks what only they hold until they are back (see [`complete_index`]).
    pub unlisted: Vec<PeerId>,
}

/// Where the friends that [`rebuild_index`] could not ask are remembered.
const META_UNLISTED: &str = "index-unlisted";

/// Friends whose pack lists the index still lacks (peer id bytes).
///
/// # Errors
/// Database errors.
pub fn unlisted(repo: &Repo) -> Result<Vec<Vec<u8>>, NodeError> {
    let Some(bytes) = repo.store.meta(META_UNLISTED)? else {
        return Ok(Vec::new());
    };
    let list: Vec<serde_bytes::ByteBuf> =
        obnam_protocol::codec::decode_bounded("unlisted friends", &bytes, 64 * 1024).map_err(
            |e| NodeError::Corrupt {
                what: "list of friends the index still lacks".into(),
                source: e,
            },
        )?;
    Ok(list
        .into_iter()
        .map(serde_bytes::ByteBuf::into_vec)
        .collect())
}

/// Remembers the friends `rebuilt` could not ask, for [`complete_index`].
fn remember_unlisted(repo: &Repo, rebuilt: &Rebuilt) -> Result<(), NodeError> {
    let peers: Vec<Vec<u8>> = rebuilt.unlisted.iter().map(|p| p.to_bytes()).collect();
    set_unlisted(repo, &peers)
}

fn set_unlisted(repo: &Repo, peers: &[Vec<u8>]) -> Result<(), NodeError> {
    let list: Vec<serde_bytes::ByteBuf> = peers
        .iter()
        .map(|p| serde_bytes::ByteBuf::from(p.clone()))
        .collect();
    repo.store
        .set_meta(META_UNLISTED, &obnam_protocol::codec::encode(&list))?;
    Ok(())
}

/// Completes the index from a friend that could not be asked when it was rebuilt: lists its
/// packs and records those the index lacks. Blocking. Returns the packs added, or `None` when
/// the friend could not be asked this time either (it stays on the list).
///
/// # Errors
/// Database errors.
pub fn complete_index(
    repo: &Repo,
    remote: &Remote,
    keys: &Keys,
    peer: PeerId,
) -> Result<Option<u64>, NodeError> {
    let rebuilt = rebuild_index(repo, remote, keys, &[peer])?;
    if !rebuilt.unlisted.is_empty() {
        return Ok(None);
    }
    let bytes = peer.to_bytes();
    let rest: Vec<Vec<u8>> = unlisted(repo)?
        .into_iter()
        .filter(|p| *p != bytes)
        .collect();
    set_unlisted(repo, &rest)?;
    for f in &rebuilt.failed {
        tracing::warn!(%peer, "completing the index: {f}");
    }
    Ok(Some(rebuilt.packs))
}

/// Replaces the file cache with a seed from the newest snapshot, so that files still on disk
/// and unchanged (same size and mtime, and a ctime older than the seed) are not read again by
/// the next backup. Returns how many directories were seeded.
///
/// Device, inode and ctime are not in snapshots, so a seeded record cannot see a change that
/// kept a file's size and mtime *before* the seed; a normal record, written by every backup,
/// can. Recovery onto a new machine does not seed: restored files have new ctimes and would
/// never match, and the seed would fetch every pack holding a tree.
///
/// # Errors
/// Database errors. A tree that cannot be read is skipped (its files are read again).
pub fn seed_file_cache(repo: &Repo, keys: &Keys) -> Result<u64, NodeError> {
    use obnam_protocol::local::{CachedFile, DirCache};
    use obnam_protocol::tree::EntryKind;
    repo.store.clear_file_cache()?;
    let Some((_, record)) = repo.store.snapshots()?.into_iter().last() else {
        return Ok(0);
    };
    let repo = repo.with_private_cache();
    let stat_ns = now_ns();
    let mut seeded = 0u64;
    let mut puts = Vec::new();
    let mut stack = vec![(std::path::PathBuf::from("/"), record.root.clone())];
    while let Some((path, content)) = stack.pop() {
        let tree = match repo.read_tree(keys, &content) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(dir = %path.display(), error = %e.full_message(), "not seeding the file cache below this directory");
                continue;
            }
        };
        let mut rec = DirCache {
            stat_ns,
            seeded: true,
            ..DirCache::default()
        };
        for e in tree.entries {
            match e.kind {
                EntryKind::File => rec.files.push(CachedFile {
                    name: e.name,
                    dev: 0,
                    ino: 0,
                    size: e.size,
                    mtime_ns: e.mtime_ns,
                    ctime_ns: 0,
                    chunks: e.content,
                }),
                EntryKind::Dir => {
                    stack.push((path.join(std::ffi::OsStr::from_bytes(&e.name)), e.content));
                    rec.dirs.push(serde_bytes::ByteBuf::from(e.name));
                }
                _ => {}
            }
        }
        rec.dirs.sort();
        puts.push((crate::backup::cache_key(&path), rec));
        seeded += 1;
        if puts.len() >= 1024 {
            repo.store.write_dir_caches(&puts, &[])?;
            puts.clear();
        }
    }
    repo.store.write_dir_caches(&puts, &[])?;
    repo.clear_cache();
    Ok(seeded)
}

/// Rebuilds the chunk → pack and pack → holders index from what the friends hold. Packs the
/// index has already only gain their holders. Friends whose pack list cannot be read are
/// returned in [`Rebuilt::unlisted`].
///
/// # Errors
/// Database errors; unreadable packs are listed in [`Rebuilt::failed`].
pub fn rebuild_index(
    repo: &Repo,
    remote: &Remote,
    keys: &Keys,
    friends: &[PeerId],
) -> Result<Rebuilt, NodeError> {
    let owner = keys.owner_id();
    let mut packs: HashMap<PackId, (u64, Vec<PeerId>)> = HashMap::new();
    let mut unlisted = Vec::new();
    for &peer in friends {
        let mut after = None;
        loop {
            let req = Request::ListPacks {
                owner,
                after,
                limit: msg::MAX_LIST,
            };
            match remote
                .handle
                .block_on(peers::owner_request(&remote.net, peer, keys, req))
            {
                Ok(Response::Packs(list)) => {
                    let done = list.len() < msg::MAX_LIST as usize;
                    after = list.last().map(|p| p.0);
                    for (id, len) in list {
                        packs.entry(id).or_insert((len, Vec::new())).1.push(peer);
                    }
                    if done || after.is_none() {
                        break;
                    }
                }
                Ok(other) => {
                    tracing::warn!(%peer, ?other, "could not list packs");
                    unlisted.push(peer);
                    break;
                }
                Err(e) => {
                    tracing::warn!(%peer, error = %e.full_message(), "could not list packs");
                    unlisted.push(peer);
                    break;
                }
            }
        }
    }
    let mut rebuilt = Rebuilt {
        unlisted,
        ..Rebuilt::default()
    };
    let mut work = Vec::new();
    for (id, (len, holders)) in packs {
        if repo.store.pack(&id)?.is_some() {
            for h in &holders {
                repo.store.add_placement(&id, &h.to_bytes())?;
            }
        } else {
            work.push((id, (len, holders)));
        }
    }
    let results: Vec<IndexFetch> = remote.handle.block_on(
        futures::stream::iter(work.into_iter().map(|(id, (len, holders))| async move {
            let mut last = Err(NodeError::Net(format!("no friend holds pack {id}")));
            for &peer in &holders {
                let limit = std::time::Duration::from_secs(repo.config.request_timeout_secs.max(1));
                let what = format!("reading the index of pack {} from {peer}", id.short());
                last = peers::with_retries(crate::repo::FETCH_ATTEMPTS, limit, &what, || {
                    remote_index(remote, peer, keys, id, len)
                })
                .await;
                if last.is_ok() {
                    break;
                }
            }
            (id, len, holders, last)
        }))
        .buffer_unordered(crate::repo::FETCH_PARALLEL)
        .collect(),
    );
    for (id, len, holders, index) in results {
        match index {
            Ok(index) => {
                let in_outbox = repo.outbox.path(&id).exists();
                let record = PackRecord {
                    len,
                    chunks: index.entries.len() as u32,
                    created_ns: now_ns(),
                    in_outbox,
                };
                let chunks = obnam_protocol::pack::chunk_locations(id, &index.entries);
                repo.store.commit_pack(&id, &record, &chunks)?;
                for h in &holders {
                    repo.store.add_placement(&id, &h.to_bytes())?;
                }
                rebuilt.packs += 1;
                rebuilt.chunks += chunks.len() as u64;
            }
            Err(e) => rebuilt
                .failed
                .push(format!("pack {id}: {}", e.full_message())),
        }
    }
    Ok(rebuilt)
}

/// Reads a pack's sealed index from a friend: the last 64 KiB-aligned range holds the trailer
/// (and usually the index); an index that starts earlier costs one more aligned range.
async fn remote_index(
    remote: &Remote,
    peer: PeerId,
    keys: &Keys,
    pack: PackId,
    len: u64,
) -> Result<PackIndex, NodeError> {
    if len < TRAILER_LEN as u64 {
        return Err(NodeError::Authentication {
            what: format!("pack {pack} (too short)"),
        });
    }
    let tail_off = (len - TRAILER_LEN as u64) / PACK_ALIGN * PACK_ALIGN;
    let tail = peers::fetch_range(&remote.net, peer, keys, pack, tail_off, len - tail_off).await?;
    let auth = || NodeError::Authentication {
        what: format!("pack {pack} from {peer}"),
    };
    let trailer_at = usize::try_from(len - TRAILER_LEN as u64 - tail_off).map_err(|_| auth())?;
    let sealed_trailer = tail.get(trailer_at..).ok_or_else(auth)?;
    let trailer =
        seal::open_blob(keys, DOMAIN_PACK_TRAILER, &[], sealed_trailer).map_err(|_| auth())?;
    let trailer = PackTrailer::from_bytes(&trailer, len).map_err(|e| NodeError::Corrupt {
        what: format!("pack {pack}"),
        source: e,
    })?;
    let (buf, base) = if trailer.index_offset >= tail_off {
        (tail, tail_off)
    } else {
        let start = trailer.index_offset / PACK_ALIGN * PACK_ALIGN;
        let mut head =
            peers::fetch_range(&remote.net, peer, keys, pack, start, tail_off - start).await?;
        head.extend_from_slice(&tail);
        (head, start)
    };
    let from = usize::try_from(trailer.index_offset - base).map_err(|_| auth())?;
    let to = from + usize::try_from(trailer.index_len).map_err(|_| auth())?;
    let sealed_index = buf.get(from..to).ok_or_else(auth)?;
    let index = seal::open_blob(keys, DOMAIN_PACK_INDEX, &[], sealed_index).map_err(|_| auth())?;
    PackIndex::from_bytes(&index).map_err(|e| NodeError::Corrupt {
        what: format!("index of pack {pack}"),
        source: e,
    })
}

/// The result of a recovery.
#[derive(Debug)]
pub struct Recovered {
    /// The owner's keys, now in the secrets file.
    pub owner: obnam_protocol::OwnerId,
    /// The head adopted, if any friend held one.
    pub head_seq: u64,
    /// Snapshots listed in that head.
    pub snapshots: u64,
    /// Friends learned from the head and added.
    pub friends_added: Vec<String>,
    /// Friends that accepted the takeover.
    pub took_over: Vec<String>,
    /// The index rebuild.
    pub rebuilt: Rebuilt,
    /// Stale friends and forks, for the user.
    pub warnings: Vec<String>,
}

/// Friends of this node as peer ids, connected ones first.
pub fn friend_peers(repo: &Repo, remote: &Remote) -> Result<Vec<PeerId>, NodeError> {
    let mut peers: Vec<PeerId> = repo
        .store
        .friends()?
        .iter()
        .filter_map(|f| PeerId::from_bytes(&f.peer_id).ok())
        .collect();
    peers.sort_by_key(|p| !remote.net.is_connected(p));
    Ok(peers)
}

/// `obnam init --recover`: see the module documentation.
///
/// # Errors
/// [`NodeError::AlreadyInitialized`], [`NodeError::NoSlot`] for a wrong name or passphrase,
/// network and database errors.
pub fn recover(
    repo: &Repo,
    remote: &Remote,
    name: &str,
    passphrase: &str,
) -> Result<Recovered, NodeError> {
    let path = repo.paths.secrets();
    if let Ok(existing) = keys::load_secrets(&path) {
        return Err(NodeError::AlreadyInitialized {
            name: existing.name.clone(),
        });
    }
    let friends = friend_peers(repo, remote)?;
    if friends.is_empty() {
        return Err(NodeError::Usage(
            "recovery needs one friend: first run `obnam peer add <ticket>` with a friend's ticket"
                .into(),
        ));
    }
    let stretched = keys::stretch(passphrase, name, SLOT_VERSION)?;
    let mut found = None;
    let mut busy = false;
    for &peer in &friends {
        match remote.handle.block_on(remote.net.request(
            peer,
            Request::GetSlot {
                lookup: stretched.lookup,
            },
        )) {
            Ok(Response::Slot(Some(bytes))) => {
                let Ok(slot) = KeySlot::from_bytes(&bytes) else {
                    continue;
                };
                if let Ok(master) = keys::unwrap(&slot, &stretched, name) {
                    found = Some((master, bytes.into_vec()));
                    break;
                }
            }
            Ok(Response::Error(e)) if e.code == obnam_protocol::msg::ErrorCode::Busy => busy = true,
            Ok(other) => tracing::debug!(%peer, ?other, "no slot"),
            Err(e) => tracing::debug!(%peer, error = %e, "slot lookup failed"),
        }
    }
    let Some((master, slot)) = found else {
        if busy {
            return Err(NodeError::Net(
                "friends limit key slot lookups to a few a minute: wait a minute and try again"
                    .into(),
            ));
        }
        return Err(NodeError::NoSlot {
            name: name.to_owned(),
            asked: friends.len(),
        });
    };
    let owner = keys::write_recovered(&path, name, &master, slot, stretched.lookup)?;
    let keys = &owner.keys;
    let owner_id = keys.owner_id();
    tracing::info!(name, owner = %owner_id, "key slot found and opened");

    let survey = survey_all(repo, remote, keys, &friends)?;
    let warnings = survey.warnings;
    let friends_added = survey.friends_added;
    let head_seq = match repo.head_body(keys)? {
        Some((_, head, _)) => head.seq,
        None => 0,
    };
    let snapshots = repo.store.snapshots()?.len() as u64;

    // Become the writer: a signed statement naming this node and the head it continues from.
    let statement = takeover_statement(keys, &remote.net.peer_id, head_seq);
    repo.store
        .set_meta("takeover", &obnam_protocol::codec::encode(&statement))?;
    let mut took_over = Vec::new();
    for peer in friend_peers(repo, remote)? {
        if remote
            .handle
            .block_on(send_takeover(remote, keys, peer, &statement))
            .is_ok()
        {
            took_over.push(peer.to_string());
        }
    }
    let rebuilt = rebuild_index(repo, remote, keys, &friend_peers(repo, remote)?)?;
    remember_unlisted(repo, &rebuilt)?;
    // Friends that hold exactly our head need not be sent it again; every friend gets the key
    // slot again (it may hold an older one, or none).
    let ours = repo
        .head_body(keys)?
        .map(|(signed, head, _)| (signed.hash(), head.seq));
    for f in repo.store.friends()? {
        let holds = match (&ours, PeerId::from_bytes(&f.peer_id)) {
            (Some((hash, _)), Ok(peer)) => survey.held.contains(&(peer, *hash)),
            _ => false,
        };
        repo.store.update_peer_state(&f.peer_id, |s| {
            s.slot_pushed = false;
            if let (true, Some((_, seq))) = (holds, ours) {
                s.head_seq = seq;
            }
        })?;
    }
    repo.index_ok();
    Ok(Recovered {
        owner: owner_id,
        head_seq,
        snapshots,
        friends_added,
        took_over,
        rebuilt,
        warnings,
    })
}

/// What [`survey_all`] found.
#[derive(Debug, Default)]
pub struct FullSurvey {
    /// Stale friends and forks, for the user.
    pub warnings: Vec<String>,
    /// Friends learned from the heads, as `name peer-id`.
    pub friends_added: Vec<String>,
    /// Each friend that holds a head that verifies, with that head's hash.
    pub held: Vec<(PeerId, [u8; 32])>,
}

/// Surveys `friends` for the owner's heads and merges them (see [`merge_survey`]), then does
/// the same for every friend those heads name that was not asked yet, until no head names a
/// new one. A friend that missed the newest heads (it was away) still holds one naming the
/// others: the first head, written at `init`, lists the friends, and a friend gets a head before
/// it gets the key slot. Each friend is asked once, so this ends.
///
/// # Errors
/// Key or database errors.
pub fn survey_all(
    repo: &Repo,
    remote: &Remote,
    keys: &Keys,
    friends: &[PeerId],
) -> Result<FullSurvey, NodeError> {
    let mut out = FullSurvey::default();
    let mut asked: std::collections::HashSet<PeerId> = std::collections::HashSet::new();
    let mut next: Vec<PeerId> = friends.to_vec();
    while !next.is_empty() {
        asked.extend(next.iter().copied());
        let survey = remote.handle.block_on(survey_heads(remote, keys, &next));
        out.warnings.extend(survey.warnings());
        out.held.extend(survey.held.iter().copied());
        let added = merge_survey(repo, remote, keys, &survey)?;
        // Friends already known but not asked yet (named by a head merged just now) count too.
        next = friend_peers(repo, remote)?
            .into_iter()
            .filter(|p| !asked.contains(p))
            .collect();
        out.friends_added.extend(added);
    }
    out.friends_added.sort();
    out.friends_added.dedup();
    Ok(out)
}

/// Befriends the friends listed in a head that this node does not know yet (with the default
/// quota), and dials them. Returns them as `name peer-id`.
///
/// # Errors
/// Database errors.
pub fn learn_friends(
    repo: &Repo,
    remote: &Remote,
    body: &HeadBody,
) -> Result<Vec<String>, NodeError> {
    let mut added = Vec::new();
    for f in &body.friends {
        let Ok(peer) = PeerId::from_bytes(&f.peer_id) else {
            continue;
        };
        if peer == remote.net.peer_id || repo.store.friend(&f.peer_id)?.is_some() {
            continue;
        }
        let friend = Friend {
            peer_id: f.peer_id.clone(),
            name: f.name.clone(),
            household: String::new(),
            addrs: f.addrs.clone(),
            quota_given: repo.config.default_quota,
            added_ns: now_ns(),
        };
        repo.store.put_friend(&friend)?;
        let addrs = f
            .addrs
            .iter()
            .filter_map(|a| libp2p::Multiaddr::try_from(a.to_vec()).ok())
            .collect();
        let _ = remote.handle.block_on(remote.net.add_addrs(peer, addrs));
        added.push(format!("{} {peer}", f.name));
    }
    added.sort();
    Ok(added)
}

/// Proves the owner key to `peer` and sends it the takeover statement.
///
/// # Errors
/// [`NodeError::Net`] naming the friend.
pub async fn send_takeover(
    remote: &Remote,
    keys: &Keys,
    peer: PeerId,
    statement: &TakeoverStatement,
) -> Result<(), NodeError> {
    peers::prove(&remote.net, peer, keys).await?;
    match remote
        .net
        .request(peer, Request::Takeover(statement.clone()))
        .await?
    {
        Response::Ok => {
            tracing::info!(%peer, "friend accepted the takeover");
            Ok(())
        }
        Response::Error(e) => Err(crate::serve::wire_error(&peer, &e)),
        other => Err(NodeError::Net(format!(
            "{peer} answered {other:?} to a takeover"
        ))),
    }
}

/// `obnam index rebuild`: the index from the friends, and the newest head.
///
/// # Errors
/// Network and database errors.
pub fn rebuild(
    repo: &Repo,
    remote: &Remote,
) -> Result<(Rebuilt, Vec<String>, Vec<String>), NodeError> {
    let owner = repo.owner()?;
    let friends = friend_peers(repo, remote)?;
    if friends.is_empty() {
        return Err(NodeError::Usage(
            "this node knows no friends (they were in the lost index): add one with `obnam peer add <ticket>`, then run `obnam index rebuild` again; the others are learned from your newest head".into(),
        ));
    }
    // Merged, never rolled back: a backup that reached no friend yet stays listed.
    let survey = survey_all(repo, remote, &owner.keys, &friends)?;
    let (warnings, added) = (survey.warnings, survey.friends_added);
    let mut rebuilt = rebuild_index(repo, remote, &owner.keys, &friend_peers(repo, remote)?)?;
    remember_unlisted(repo, &rebuilt)?;
    repo.index_ok();
    rebuilt.seeded_dirs = seed_file_cache(repo, &owner.keys)?;
    Ok((rebuilt, warnings, added))
}
