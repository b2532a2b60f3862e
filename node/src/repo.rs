//! The node's own repository: the store, the outbox, and the owner's head.
//!
//! Everything here is synchronous; the daemon calls it from blocking threads.

use crate::config::{NodeConfig, Paths};
use crate::error::NodeError;
use crate::keys::{self, Keys, Owner};
use crate::outbox::Outbox;
use crate::pack;
use crate::seal::{self, OpenError};
use obnam_protocol::envelope::DOMAIN_HEAD_BODY;
use obnam_protocol::ids::matches_prefix;
use obnam_protocol::local::PackRecord;
use obnam_protocol::signed::CONTEXT_HEAD;
use obnam_protocol::snapshot::{
    ChunkerParams, Head, HeadBody, SignedHead, SnapshotEntry, SnapshotRecord,
};
use obnam_protocol::tree::Tree;
use obnam_protocol::{ChunkId, SnapshotId};
use obnam_store::{Store, StoreOptions};

/// The network, once the node has started it: how the repository fetches packs that are no
/// longer in the outbox.
pub struct Remote {
    /// The network handle.
    pub net: crate::net::Net,
    /// The runtime, to wait on the network from blocking threads.
    pub handle: tokio::runtime::Handle,
    /// Wakes the replicator: a backup calls it for every pack it writes, so packs travel to
    /// friends while the backup goes on.
    pub packs_ready: std::sync::Arc<tokio::sync::Notify>,
    warnings: std::sync::Mutex<Vec<String>>,
}

impl Remote {
    /// A remote for the node's network; `packs_ready` wakes the replicator.
    pub fn new(
        net: crate::net::Net,
        handle: tokio::runtime::Handle,
        packs_ready: std::sync::Arc<tokio::sync::Notify>,
    ) -> Self {
        Self {
            net,
            handle,
            packs_ready,
            warnings: std::sync::Mutex::new(Vec::new()),
        }
    }
}

/// Warnings about damaged copies kept until a command collects them.
const MAX_WARNINGS: usize = 1000;

/// Attempts per friend to fetch one pack.
pub const FETCH_ATTEMPTS: usize = 3;

/// How many packs a restore fetches at once.
pub const FETCH_PARALLEL: usize = 4;

/// The node's repository.
#[derive(Clone)]
pub struct Repo {
    /// Directories.
    pub paths: Paths,
    /// Settings.
    pub config: NodeConfig,
    /// The redb database.
    pub store: Store,
    /// The pack files.
    pub outbox: Outbox,
    /// The network, once started.
    pub remote: std::sync::Arc<std::sync::OnceLock<Remote>>,
    /// Why the local index cannot be trusted, until `obnam index rebuild` runs.
    index_problem: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// Where packs fetched from friends are kept during one operation.
    cache_dir: std::path::PathBuf,
    /// Packs being fetched into `cache_dir` now, and fetches that failed lately: a second
    /// reader waits for the first fetch instead of fetching the pack again (a restore's
    /// prefetch and its file writers), and shares its failure.
    fetching: std::sync::Arc<std::sync::Mutex<FetchTable>>,
    /// Keep pack files open between reads (a private cache only: the shared one lives as long
    /// as the node, and would keep deleted outbox files on disk).
    keep_open: bool,
    /// Held while a new head is built from the current one and committed, so a backup's commit
    /// and a merge of a friend's head never build on the same head.
    head_lock: std::sync::Arc<std::sync::Mutex<()>>,
}

/// What [`Repo::merge_head`] did with a friend's head.
#[derive(Debug)]
pub enum HeadMerge {
    /// Ours already lists everything in theirs and is at least as new: nothing changed.
    Kept {
        /// Their opened body.
        body: HeadBody,
    },
    /// Theirs lists everything in ours and is newer: it became ours as it is.
    Adopted {
        /// Its opened body.
        body: HeadBody,
    },
    /// Each listed snapshots the other lacks (a recovery from a friend that held an older
    /// head, while another friend held a newer one): a new head lists both.
    Merged {
        /// Its opened body.
        body: HeadBody,
        /// Snapshots that came from theirs.
        added: usize,
        /// The new head's sequence number.
        seq: u64,
    },
}

/// How long a failed fetch is remembered: readers of the same pack get its error instead of
/// asking every friend again; after that, a reader tries again (a friend may be back).
const FETCH_FAILURE_MEMORY: std::time::Duration = std::time::Duration::from_secs(60);

/// See [`Repo::ensure_cached`].
#[derive(Default)]
struct FetchTable {
    in_flight: std::collections::HashSet<obnam_protocol::PackId>,
    failed: std::collections::HashMap<obnam_protocol::PackId, (std::time::Instant, String)>,
    /// Woken whenever a fetch ends, so readers waiting for it go on at once.
    ended: std::sync::Arc<tokio::sync::Notify>,
    /// Open pack files of a private cache (see [`Repo::with_private_cache`]): a restore reads
    /// many chunks of each pack, and opens it once, not once per chunk. At most [`OPEN_PACKS`];
    /// closed by [`Repo::clear_cache`].
    open: std::collections::HashMap<obnam_protocol::PackId, std::sync::Arc<std::fs::File>>,
}

/// Pack files a private cache keeps open.
const OPEN_PACKS: usize = 64;

/// A claim on fetching one pack; dropping it (after the fetch, or when the fetch is cancelled
/// or panics) lets other readers go on.
struct Claim<'a> {
    table: &'a std::sync::Mutex<FetchTable>,
    pack: obnam_protocol::PackId,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut t = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        t.in_flight.remove(&self.pack);
        t.ended.notify_waiters();
    }
}

impl Repo {
    /// Opens the database and outbox under the data directory.
    ///
    /// # Errors
    /// [`NodeError::Store`] or [`NodeError::Io`].
    pub fn open(paths: Paths, config: NodeConfig) -> Result<Self, NodeError> {
        let db = paths.database();
        let initialised = paths.secrets().exists();
        let existed = db.exists();
        let opts = StoreOptions {
            cache_bytes: config.db_cache_mib * 1024 * 1024,
        };
        let mut problem = None;
        let store = match Store::open(&db, &opts) {
            Ok(s) => s,
            Err(e @ obnam_store::StoreError::Schema { .. }) => return Err(e.into()),
            Err(e) if initialised => {
                // Keep the damaged file for inspection and start afresh; commands refuse to run
                // until the index is rebuilt from the friends.
                let aside = db.with_extension(format!("redb.damaged-{}", now_ns()));
                std::fs::rename(&db, &aside)
                    .map_err(|io| NodeError::io(format!("moving aside {}", db.display()), io))?;
                tracing::error!(error = %e, saved = %aside.display(), "the index database is damaged");
                problem = Some(format!("was damaged ({e}; kept as {})", aside.display()));
                Store::open(&db, &opts)?
            }
            Err(e) => return Err(e.into()),
        };
        if initialised && !existed && problem.is_none() {
            tracing::error!(path = %db.display(), "the index database is missing");
            problem = Some(format!("{} is missing", db.display()));
        }
        // A key rotation that switched its tables but not yet its files finishes first.
        crate::rotate::finish_switch(&paths, &store)?;
        let outbox = Outbox::open(paths.outbox())?;
        let cache_dir = paths.data.join("cache").join("shared");
        Ok(Self {
            paths,
            config,
            store,
            outbox,
            remote: std::sync::Arc::new(std::sync::OnceLock::new()),
            index_problem: std::sync::Arc::new(std::sync::Mutex::new(problem)),
            cache_dir,
            fetching: std::sync::Arc::default(),
            keep_open: false,
            head_lock: std::sync::Arc::default(),
        })
    }

    /// The next key generation that `keys rotate` builds: the same database through its `next`
    /// tables, and the `outbox-next` directory.
    ///
    /// # Errors
    /// I/O errors creating the outbox.
    pub fn next_generation(&self) -> Result<Repo, NodeError> {
        let mut r = self.with_private_cache();
        r.store = self.store.next_generation();
        r.outbox = Outbox::open(crate::rotate::next_outbox(&self.paths))?;
        Ok(r)
    }

    /// A handle whose fetched packs go to a cache of its own, removed by [`Repo::clear_cache`]
    /// without touching other operations' caches.
    pub fn with_private_cache(&self) -> Repo {
        let mut r = self.clone();
        let mut tag = [0u8; 8];
        rand::fill(&mut tag[..]);
        r.cache_dir = self
            .paths
            .data
            .join("cache")
            .join(tag.iter().map(|b| format!("{b:02x}")).collect::<String>());
        r.fetching = std::sync::Arc::default();
        r.keep_open = true;
        r
    }

    /// Refuses to work on a missing or damaged index.
    ///
    /// # Errors
    /// [`NodeError::IndexMissing`] naming `obnam index rebuild`.
    pub fn check_index(&self) -> Result<(), NodeError> {
        match self.index_problem.lock().ok().and_then(|p| p.clone()) {
            Some(reason) => Err(NodeError::IndexMissing { reason }),
            None => Ok(()),
        }
    }

    /// Marks the index as rebuilt.
    pub fn index_ok(&self) {
        if let Ok(mut p) = self.index_problem.lock() {
            *p = None;
        }
    }

    /// Loads the owner's keys from the secrets file (checking its mode every time).
    ///
    /// # Errors
    /// [`NodeError::NotInitialized`], [`NodeError::InsecureSecrets`], …
    pub fn owner(&self) -> Result<Owner, NodeError> {
        keys::load_owner(&self.paths.secrets())
    }

    /// Indexes pack files that a crash left in the outbox before their index commit, so the next
    /// backup reuses them. Files that do not verify are removed, and so are files of packs the
    /// index says were sent (a crash between marking them sent and removing them). Returns how
    /// many were adopted.
    ///
    /// # Errors
    /// I/O or database errors; a damaged pack is removed, not an error.
    pub fn adopt_orphans(&self, keys: &Keys) -> Result<usize, NodeError> {
        let mut adopted = 0;
        for id in self.outbox.scan()? {
            if let Some(rec) = self.store.pack(&id)? {
                if !rec.in_outbox {
                    // Sent (friends hold it): the node stopped between marking it sent and
                    // removing the file.
                    tracing::info!(pack = %id, "removing a sent pack's file left in the outbox");
                    self.outbox.remove(&id)?;
                }
                continue;
            }
            let bytes = self.outbox.read(&id)?;
            let index = if obnam_protocol::PackId::of(&bytes) == id {
                pack::read_index(keys, &id, bytes.len() as u64, |off, len| {
                    bytes
                        .get(off as usize..off as usize + len)
                        .map(<[u8]>::to_vec)
                        .ok_or_else(|| NodeError::Authentication {
                            what: format!("pack {id} (range)"),
                        })
                })
                .ok()
            } else {
                None
            };
            let Some(index) = index else {
                tracing::warn!(pack = %id, "removing an outbox file that does not verify");
                self.outbox.remove(&id)?;
                continue;
            };
            let record = PackRecord {
                len: bytes.len() as u64,
                chunks: index.entries.len() as u32,
                created_ns: now_ns(),
                in_outbox: true,
            };
            let chunks = obnam_protocol::pack::chunk_locations(id, &index.entries);
            self.store.commit_pack(&id, &record, &chunks)?;
            tracing::info!(pack = %id, chunks = chunks.len(), "adopted a pack left by an interrupted backup");
            adopted += 1;
        }
        Ok(adopted)
    }

    /// The chunker parameters in force: those of the head, or [`ChunkerParams::DEFAULT`] for a
    /// new owner.
    ///
    /// # Errors
    /// As [`Repo::head_body`].
    pub fn chunker(&self, keys: &Keys) -> Result<ChunkerParams, NodeError> {
        Ok(self
            .head_body(keys)?
            .map(|(_, _, b)| b.chunker)
            .unwrap_or(ChunkerParams::DEFAULT))
    }

    /// The current head, verified and opened.
    ///
    /// # Errors
    /// [`NodeError::Corrupt`] or [`NodeError::Authentication`] for a bad head.
    pub fn head_body(
        &self,
        keys: &Keys,
    ) -> Result<Option<(SignedHead, Head, HeadBody)>, NodeError> {
        let Some(bytes) = self.store.own_head()? else {
            return Ok(None);
        };
        let owner_id = keys.owner_id();
        let (signed, head) =
            SignedHead::verify(&bytes, &owner_id).map_err(|e| NodeError::Authentication {
                what: format!("own head: {e}"),
            })?;
        let body = seal::open_blob(
            keys,
            DOMAIN_HEAD_BODY,
            &Head::body_context(&owner_id, head.seq),
            &head.sealed_body,
        )
        .map_err(|_| NodeError::Authentication {
            what: "own head body".into(),
        })?;
        let body = HeadBody::from_bytes(&body).map_err(|e| NodeError::Corrupt {
            what: "own head body".into(),
            source: e,
        })?;
        Ok(Some((signed, head, body)))
    }

    /// Records a snapshot: builds the next head (sequence + 1, chained to the current one), signs
    /// it, and commits snapshot, head and (if known) the packs the snapshot uses together.
    ///
    /// # Errors
    /// Database or key errors.
    pub fn commit_snapshot(
        &self,
        keys: &Keys,
        id: SnapshotId,
        record: &SnapshotRecord,
        packs: Option<&[obnam_protocol::PackId]>,
    ) -> Result<u64, NodeError> {
        let _head = self.lock_head();
        let (seq, prev, mut body) = self.next_head(keys, record.chunker)?;
        body.snapshots.push(SnapshotEntry {
            id,
            record: record.clone(),
        });
        let signed = self.sign_head(keys, seq, prev, &mut body)?;
        self.store
            .commit_snapshot(&id, record, &signed.to_bytes(), packs)?;
        Ok(seq)
    }

    /// Writes a new head when the friend list changed since the current one (or when there is
    /// no head yet): same snapshots, sequence + 1, the friends as they are now. The head is what
    /// a recovery through any one friend reads to find the others, so it is kept true from
    /// `init` on, not only at the next backup. Returns the new sequence number, or `None` when
    /// the head already lists exactly these friends.
    ///
    /// # Errors
    /// Database or key errors.
    pub fn record_friends(&self, keys: &Keys) -> Result<Option<u64>, NodeError> {
        let _head = self.lock_head();
        let mut now: Vec<Vec<u8>> = self
            .store
            .friends()?
            .into_iter()
            .map(|f| f.peer_id)
            .collect();
        now.sort();
        let (seq, prev, mut body) = self.next_head(keys, ChunkerParams::DEFAULT)?;
        let mut listed: Vec<Vec<u8>> = body.friends.iter().map(|f| f.peer_id.clone()).collect();
        listed.sort();
        if seq > 1 && listed == now {
            return Ok(None);
        }
        let signed = self.sign_head(keys, seq, prev, &mut body)?;
        self.store.adopt_head(&[], &signed.to_bytes())?;
        tracing::info!(
            seq,
            friends = body.friends.len(),
            "head records the friend list"
        );
        Ok(Some(seq))
    }

    /// [`Repo::record_friends`] with the owner's keys, when this node has an owner yet (a node
    /// befriends its friends before `init`, and `init` records them).
    ///
    /// # Errors
    /// Database or key errors, or a damaged secrets file.
    pub fn record_friends_if_owner(&self) -> Result<Option<u64>, NodeError> {
        match self.owner() {
            Ok(owner) => self.record_friends(&owner.keys),
            Err(NodeError::NotInitialized) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The sequence number, previous hash and body of the head after the current one (the
    /// current body, to be changed), or of a first head using `chunker`. Call with the head lock
    /// held.
    fn next_head(
        &self,
        keys: &Keys,
        chunker: ChunkerParams,
    ) -> Result<(u64, Option<[u8; 32]>, HeadBody), NodeError> {
        Ok(match self.head_body(keys)? {
            Some((signed, head, body)) => (head.seq + 1, Some(signed.hash()), body),
            None => (
                1,
                None,
                HeadBody {
                    snapshots: Vec::new(),
                    friends: Vec::new(),
                    chunker,
                },
            ),
        })
    }

    fn lock_head(&self) -> std::sync::MutexGuard<'_, ()> {
        self.head_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Seals `body` (with the current friend list: it travels sealed in the head, so a
    /// recovered node finds all friends) into a signed head.
    fn sign_head(
        &self,
        keys: &Keys,
        seq: u64,
        prev: Option<[u8; 32]>,
        body: &mut HeadBody,
    ) -> Result<SignedHead, NodeError> {
        let owner_id = keys.owner_id();
        body.friends = self
            .store
            .friends()?
            .into_iter()
            .map(|f| obnam_protocol::snapshot::FriendRecord {
                peer_id: f.peer_id,
                name: f.name,
                addrs: f.addrs,
            })
            .collect();
        let sealed_body = seal::seal_blob(
            keys,
            DOMAIN_HEAD_BODY,
            &Head::body_context(&owner_id, seq),
            &body.to_bytes(),
        )?;
        let head = Head {
            owner: owner_id,
            seq,
            prev,
            sealed_body,
        };
        let head_bytes = head.to_bytes();
        let signature = keys.sign(CONTEXT_HEAD, &head_bytes).to_vec();
        Ok(SignedHead {
            head: head_bytes,
            signature,
        })
    }

    /// Brings a head a friend holds (`bytes`, signed by this owner) together with ours, so no
    /// snapshot that reached a friend is ever dropped from the list: a newer head that lists
    /// all of ours is adopted as it is, and heads that each list snapshots the other lacks are
    /// merged into a new head, numbered above both, that lists them all (oldest first).
    ///
    /// # Errors
    /// [`NodeError::Authentication`] for a head that is not this owner's, or whose body does not
    /// open; database errors.
    pub fn merge_head(&self, keys: &Keys, bytes: &[u8]) -> Result<HeadMerge, NodeError> {
        let owner_id = keys.owner_id();
        let (signed, head) =
            SignedHead::verify(bytes, &owner_id).map_err(|e| NodeError::Authentication {
                what: format!("a friend's head: {e}"),
            })?;
        let theirs = open_head_body(keys, &head)?;
        let _head = self.lock_head();
        let adopt = |body: HeadBody| -> Result<HeadMerge, NodeError> {
            let entries: Vec<_> = body
                .snapshots
                .iter()
                .map(|e| (e.id, e.record.clone()))
                .collect();
            self.store.adopt_head(&entries, bytes)?;
            Ok(HeadMerge::Adopted { body })
        };
        let Some((our_signed, our_head, mut ours)) = self.head_body(keys)? else {
            return adopt(theirs);
        };
        if our_signed.hash() == signed.hash() {
            return Ok(HeadMerge::Kept { body: theirs });
        }
        let our_ids: std::collections::HashSet<SnapshotId> =
            ours.snapshots.iter().map(|e| e.id).collect();
        let their_ids: std::collections::HashSet<SnapshotId> =
            theirs.snapshots.iter().map(|e| e.id).collect();
        let only_theirs: Vec<SnapshotEntry> = theirs
            .snapshots
            .iter()
            .filter(|e| !our_ids.contains(&e.id))
            .cloned()
            .collect();
        let only_ours = ours.snapshots.iter().any(|e| !their_ids.contains(&e.id));
        if !only_ours && head.seq > our_head.seq {
            return adopt(theirs);
        }
        if only_theirs.is_empty() && our_head.seq > head.seq {
            return Ok(HeadMerge::Kept { body: theirs });
        }
        let added = only_theirs.len();
        let entries: Vec<_> = only_theirs
            .iter()
            .map(|e| (e.id, e.record.clone()))
            .collect();
        ours.snapshots.extend(only_theirs);
        ours.snapshots
            .sort_by_key(|e| (e.record.time_ns, *e.id.as_bytes()));
        let seq = head.seq.max(our_head.seq) + 1;
        let merged = self.sign_head(keys, seq, Some(our_signed.hash()), &mut ours)?;
        self.store.adopt_head(&entries, &merged.to_bytes())?;
        tracing::warn!(
            seq,
            their_seq = head.seq,
            our_seq = our_head.seq,
            added,
            "a friend held a head with snapshots ours lacked; merged them into a new head"
        );
        Ok(HeadMerge::Merged {
            body: theirs,
            added,
            seq,
        })
    }

    /// Resolves `latest`, a full id or a prefix of at least 8 hex characters.
    ///
    /// # Errors
    /// [`NodeError::NoSuchSnapshot`] when nothing or more than one snapshot matches.
    pub fn resolve_snapshot(&self, name: &str) -> Result<(SnapshotId, SnapshotRecord), NodeError> {
        let snaps = self.store.snapshots()?;
        if name == "latest" {
            return snaps
                .into_iter()
                .last()
                .ok_or_else(|| NodeError::NoSuchSnapshot("there are no snapshots yet".into()));
        }
        if name.len() < obnam_protocol::ids::MIN_PREFIX_LEN {
            return Err(NodeError::NoSuchSnapshot(format!(
                "snapshot id {name:?} is too short: give at least {} hex characters, or `latest`",
                obnam_protocol::ids::MIN_PREFIX_LEN
            )));
        }
        let mut found: Vec<_> = snaps
            .into_iter()
            .filter(|(id, _)| matches_prefix(id, name))
            .collect();
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(NodeError::NoSuchSnapshot(format!(
                "no snapshot matches {name:?}"
            ))),
            n => Err(NodeError::NoSuchSnapshot(format!(
                "{n} snapshots match {name:?}: give more characters"
            ))),
        }
    }

    /// Reads and opens one chunk of ours: from the outbox, or from a pack fetched from a friend.
    ///
    /// # Errors
    /// [`NodeError::Authentication`] naming the chunk and pack, or I/O and network errors.
    pub fn read_chunk(&self, keys: &Keys, id: &ChunkId) -> Result<Vec<u8>, NodeError> {
        let loc = self
            .store
            .chunk(id)?
            .ok_or_else(|| NodeError::Authentication {
                what: format!("chunk {id:?} (not in the index)"),
            })?;
        let sealed = self.pack_range(keys, &loc.pack, u64::from(loc.offset), loc.len as usize)?;
        seal::open_chunk(keys, id, &sealed).map_err(|e| {
            let what = format!("chunk {} in pack {}", id.short(), loc.pack);
            match e {
                OpenError::Authentication => NodeError::Authentication { what },
                OpenError::Mismatch | OpenError::Malformed(_) => NodeError::Authentication {
                    what: format!("{what} ({e})"),
                },
            }
        })
    }

    /// Repair: brings one of our packs that left the outbox back into it, fetched from any friend
    /// that still holds a good copy (the copy is checked against the pack id), so replication
    /// can send it to a friend that lost it. Blocking: call it from a blocking thread.
    ///
    /// # Errors
    /// [`NodeError::Shutdown`] without a network, [`NodeError::Net`] when no friend has a good
    /// copy, [`NodeError::Io`].
    pub fn reclaim(&self, keys: &Keys, pack: &obnam_protocol::PackId) -> Result<(), NodeError> {
        let remote = self.remote.get().ok_or(NodeError::Shutdown)?;
        let private = self.with_private_cache();
        let fetched = remote
            .handle
            .block_on(private.fetch_pack(remote, keys, *pack));
        let result = fetched.and_then(|()| {
            let to = self.outbox.path(pack);
            let dir = to.parent().unwrap_or(&self.paths.data).to_owned();
            let ctx = || format!("moving repaired pack {pack} into the outbox");
            std::fs::create_dir_all(&dir).map_err(|e| NodeError::io(ctx(), e))?;
            std::fs::rename(private.cache_path(pack), &to).map_err(|e| NodeError::io(ctx(), e))?;
            crate::outbox::sync_dir(&dir)?;
            self.store.mark_in_outbox(pack)?;
            Ok(())
        });
        private.clear_cache();
        result
    }

    /// How long one try of fetching a whole pack may take: the request timeout, plus a pack of
    /// `MAX_PACK_LEN` at a slow 32 KiB/s.
    pub fn pack_fetch_limit(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.config.request_timeout_secs.max(1)
                + obnam_protocol::pack::MAX_PACK_LEN / (32 * 1024),
        )
    }

    fn cache_path(&self, pack: &obnam_protocol::PackId) -> std::path::PathBuf {
        self.cache_dir.join(format!("{}.pack", pack.to_hex()))
    }

    /// Reads a byte range of one of our packs, fetching the pack from a friend when it is not in
    /// the outbox.
    ///
    /// # Errors
    /// I/O or network errors naming the pack.
    pub fn pack_range(
        &self,
        keys: &Keys,
        pack: &obnam_protocol::PackId,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, NodeError> {
        use std::os::unix::fs::FileExt;
        if let Some(f) = self.open_pack(pack) {
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, offset)
                .map_err(|e| NodeError::io(format!("reading pack {pack}"), e))?;
            return Ok(buf);
        }
        let cached = self.cache_path(pack);
        // The replicator deletes a pack from the outbox once its friends hold it, at any time:
        // a pack that goes between the look and the read is fetched like any other.
        let mut tries = 0;
        loop {
            tries += 1;
            if self.keep_open
                && let Ok(f) = std::fs::File::open(self.outbox.path(pack))
            {
                // Readable until closed, even if the replicator deletes it meanwhile.
                let mut buf = vec![0u8; len];
                f.read_exact_at(&mut buf, offset)
                    .map_err(|e| NodeError::io(format!("reading pack {pack} in the outbox"), e))?;
                self.keep(pack, f);
                return Ok(buf);
            }
            if !self.keep_open && self.outbox.path(pack).exists() {
                match self.outbox.read_range(pack, offset, len) {
                    Ok(bytes) => return Ok(bytes),
                    Err(e) if tries >= 3 || self.outbox.path(pack).exists() => return Err(e),
                    Err(_) => continue,
                }
            }
            if !cached.exists() {
                let remote = self.remote.get().ok_or_else(|| {
                    NodeError::Net(format!(
                        "pack {pack} is not in the outbox and the network is not running"
                    ))
                })?;
                remote
                    .handle
                    .block_on(self.ensure_cached(remote, keys, *pack))?;
            }
            let f = match std::fs::File::open(&cached) {
                Ok(f) => f,
                // `ensure_cached` found it in the outbox, which has let it go since.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && tries < 3 => continue,
                Err(e) => return Err(NodeError::io(format!("opening fetched pack {pack}"), e)),
            };
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, offset)
                .map_err(|e| NodeError::io(format!("reading fetched pack {pack}"), e))?;
            if self.keep_open {
                self.keep(pack, f);
            }
            return Ok(buf);
        }
    }

    /// A pack file kept open by [`Repo::keep`].
    fn open_pack(&self, pack: &obnam_protocol::PackId) -> Option<std::sync::Arc<std::fs::File>> {
        if !self.keep_open {
            return None;
        }
        self.fetching
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .open
            .get(pack)
            .cloned()
    }

    /// Keeps `file` (pack `pack`, whose content never changes) open for the next reads, closing
    /// another when [`OPEN_PACKS`] are open.
    fn keep(&self, pack: &obnam_protocol::PackId, file: std::fs::File) {
        let mut t = self
            .fetching
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if t.open.len() >= OPEN_PACKS
            && let Some(old) = t.open.keys().next().copied()
        {
            t.open.remove(&old);
        }
        t.open.insert(*pack, std::sync::Arc::new(file));
    }

    /// Fetches whole packs from friends into the cache, [`FETCH_PARALLEL`] at a time and in the
    /// order given, skipping those already here or being fetched. Call from a blocking thread;
    /// readers of the same packs ([`Repo::pack_range`]) may run at the same time and wait for
    /// these fetches instead of repeating them. Once `stop` is set, the fetches under way are
    /// dropped and no more start.
    ///
    /// # Errors
    /// The first pack that no friend could supply.
    pub fn prefetch(
        &self,
        keys: &Keys,
        packs: tokio::sync::mpsc::UnboundedReceiver<obnam_protocol::PackId>,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<(), NodeError> {
        use futures::StreamExt;
        let Some(remote) = self.remote.get() else {
            // Without a network only the outbox can be read: a pack missing there is reported
            // by the reader that needs it.
            return Ok(());
        };
        let wanted =
            futures::stream::unfold(
                packs,
                |mut rx| async move { rx.recv().await.map(|p| (p, rx)) },
            )
            .filter(|p| {
                let here = self.outbox.path(p).exists() || self.cache_path(p).exists();
                std::future::ready(!here)
            });
        let results: Vec<Result<(), NodeError>> = remote.handle.block_on(
            wanted
                .map(|p| async move {
                    // Once the caller stops (its walk ended or failed), fetches end.
                    let stopped = async {
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        }
                    };
                    tokio::select! {
                        r = self.ensure_cached(remote, keys, p) => r,
                        () = stopped => Ok(()),
                    }
                })
                .buffer_unordered(FETCH_PARALLEL)
                .collect(),
        );
        results.into_iter().collect()
    }

    /// Makes sure `pack` is in the outbox or the cache: waits for a fetch of it already under
    /// way, or fetches it (one fetch per pack at a time).
    async fn ensure_cached(
        &self,
        remote: &Remote,
        keys: &Keys,
        pack: obnam_protocol::PackId,
    ) -> Result<(), NodeError> {
        let here = || self.outbox.path(&pack).exists() || self.cache_path(&pack).exists();
        loop {
            if here() {
                return Ok(());
            }
            let claim = {
                let mut t = self
                    .fetching
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some((at, why)) = t.failed.get(&pack) {
                    if at.elapsed() < FETCH_FAILURE_MEMORY {
                        return Err(NodeError::Net(why.clone()));
                    }
                    t.failed.remove(&pack);
                }
                // Lazily: a `Claim` made and dropped here would lock the table again.
                t.in_flight.insert(pack).then(|| Claim {
                    table: &self.fetching,
                    pack,
                })
            };
            if let Some(claim) = claim {
                // The fetch that held the claim before may have finished just now.
                if here() {
                    return Ok(());
                }
                let result = self.fetch_pack(remote, keys, pack).await;
                if let Err(e) = &result {
                    self.fetching
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .failed
                        .insert(pack, (std::time::Instant::now(), e.full_message()));
                }
                drop(claim);
                return result;
            }
            // Another reader is fetching it: wait for that fetch to end, then look again.
            let ended = std::sync::Arc::clone(
                &self
                    .fetching
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .ended,
            );
            let notified = ended.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let still = self
                .fetching
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .in_flight
                .contains(&pack);
            if still {
                let _ = tokio::time::timeout(std::time::Duration::from_millis(200), notified).await;
            }
        }
    }

    async fn fetch_pack(
        &self,
        remote: &Remote,
        keys: &Keys,
        pack: obnam_protocol::PackId,
    ) -> Result<(), NodeError> {
        let dir = self.cache_dir.clone();
        std::fs::create_dir_all(&dir)
            .map_err(|e| NodeError::io(format!("creating {}", dir.display()), e))?;
        let mut candidates: Vec<libp2p::PeerId> = self
            .store
            .holders(&pack)?
            .iter()
            .filter_map(|b| libp2p::PeerId::from_bytes(b).ok())
            .collect();
        for f in self.store.friends()? {
            if let Ok(p) = libp2p::PeerId::from_bytes(&f.peer_id)
                && !candidates.contains(&p)
            {
                candidates.push(p);
            }
        }
        candidates.sort_by_key(|p| !remote.net.is_connected(p));
        // Spread a restore over every connected friend: each pack starts with another one.
        let connected = candidates
            .iter()
            .take_while(|p| remote.net.is_connected(p))
            .count();
        if connected > 1 {
            candidates[..connected].rotate_left(usize::from(pack.0[0]) % connected);
        }
        let mut errors = Vec::new();
        for peer in candidates {
            let tmp = dir.join(format!("{}.{}.part", pack.to_hex(), peer));
            // libp2p-stream drops an inbound stream when its accept queue is momentarily full:
            // retry a broken transfer a few times before moving on to another friend.
            let limit = self.pack_fetch_limit();
            let what = format!("fetching pack {} from {peer}", pack.short());
            let result = crate::peers::with_retries(FETCH_ATTEMPTS, limit, &what, || {
                crate::peers::fetch(&remote.net, peer, keys, pack, &tmp)
            })
            .await;
            match result {
                Ok(got) if got == pack => {
                    std::fs::rename(&tmp, self.cache_path(&pack))
                        .map_err(|e| NodeError::io(format!("caching pack {pack}"), e))?;
                    return Ok(());
                }
                Ok(got) => {
                    let _ = std::fs::remove_file(&tmp);
                    let w = format!(
                        "friend {peer} sent a damaged copy of pack {} (it hashes to {}); trying another friend",
                        pack.short(),
                        got.short()
                    );
                    tracing::warn!(%peer, pack = %pack, "{w}");
                    if let Ok(mut v) = remote.warnings.lock()
                        && v.len() < MAX_WARNINGS
                    {
                        v.push(w);
                    }
                    errors.push(format!("{peer}: damaged copy"));
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    tracing::debug!(%peer, pack = %pack.short(), error = %e, "fetch failed");
                    errors.push(format!("{peer}: {e}"));
                }
            }
        }
        Err(NodeError::Net(format!(
            "no reachable friend could supply pack {pack}: {}",
            errors.join("; ")
        )))
    }

    /// Warnings collected while fetching (damaged copies, with the friend that sent them).
    pub fn take_warnings(&self) -> Vec<String> {
        self.remote
            .get()
            .and_then(|r| r.warnings.lock().ok().map(|mut w| std::mem::take(&mut *w)))
            .unwrap_or_default()
    }

    /// Removes fetched packs.
    pub fn clear_cache(&self) {
        self.fetching
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .open
            .clear();
        let _ = std::fs::remove_dir_all(&self.cache_dir);
    }

    /// Reads a blob stored as chunks (a tree).
    ///
    /// # Errors
    /// As [`Repo::read_chunk`].
    pub fn read_blob(&self, keys: &Keys, chunks: &[ChunkId]) -> Result<Vec<u8>, NodeError> {
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&self.read_chunk(keys, c)?);
            if out.len() > obnam_protocol::tree::MAX_TREE_LEN {
                return Err(NodeError::Corrupt {
                    what: "tree".into(),
                    source: obnam_protocol::DecodeError::TooLarge {
                        what: "tree",
                        len: out.len(),
                        max: obnam_protocol::tree::MAX_TREE_LEN,
                    },
                });
            }
        }
        Ok(out)
    }

    /// Reads a tree.
    ///
    /// # Errors
    /// As [`Repo::read_chunk`], or [`NodeError::Corrupt`].
    pub fn read_tree(&self, keys: &Keys, chunks: &[ChunkId]) -> Result<Tree, NodeError> {
        let bytes = self.read_blob(keys, chunks)?;
        Tree::from_bytes(&bytes).map_err(|e| NodeError::Corrupt {
            what: "tree".into(),
            source: e,
        })
    }
}

/// Now, in nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// Opens the sealed body of one of this owner's heads.
///
/// # Errors
/// [`NodeError::Authentication`] when it does not open with this owner's keys, or
/// [`NodeError::Corrupt`].
pub fn open_head_body(keys: &Keys, head: &Head) -> Result<HeadBody, NodeError> {
    let body = seal::open_blob(
        keys,
        DOMAIN_HEAD_BODY,
        &Head::body_context(&keys.owner_id(), head.seq),
        &head.sealed_body,
    )
    .map_err(|_| NodeError::Authentication {
        what: format!("head {} from a friend", head.seq),
    })?;
    HeadBody::from_bytes(&body).map_err(|e| NodeError::Corrupt {
        what: "head body".into(),
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MasterSecret;

    fn repo(dir: &std::path::Path) -> Repo {
        let paths = Paths {
            config: dir.join("config.toml"),
            data: dir.to_owned(),
        };
        Repo::open(paths, NodeConfig::default()).unwrap()
    }

    fn snap(repo: &Repo, keys: &Keys, n: u8) -> SnapshotId {
        let id = SnapshotId([n; 32]);
        let record = SnapshotRecord {
            time_ns: i64::from(n),
            host: "h".into(),
            paths: vec![],
            tags: vec![],
            root: vec![],
            files: 0,
            dirs: 0,
            bytes: 0,
            failed_files: 0,
            chunker: ChunkerParams::DEFAULT,
        };
        repo.commit_snapshot(keys, id, &record, None).unwrap();
        id
    }

    fn listed(repo: &Repo, keys: &Keys) -> (u64, Vec<SnapshotId>) {
        let (_, head, body) = repo.head_body(keys).unwrap().unwrap();
        (head.seq, body.snapshots.iter().map(|e| e.id).collect())
    }

    /// At start, a pack file without an index entry is adopted, the file of a pack marked sent is
    /// removed, and an indexed pack still in the outbox stays.
    #[test]
    fn start_adopts_orphans_and_removes_sent_leftovers() {
        use crate::pack::PackBuilder;
        let keys = Keys::derive(&MasterSecret::generate());
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        let pack = |n: u8| {
            let data = vec![n; 1000];
            let id = keys.chunk_id(&data);
            let mut b = PackBuilder::new();
            b.add(
                id,
                &crate::seal::seal_chunk(&keys, &id, &data, 3).unwrap(),
                1000,
            )
            .unwrap();
            let p = b.finish(&keys).unwrap();
            repo.outbox.write(&p.id, &p.bytes).unwrap();
            p
        };
        let (orphan, sent, kept) = (pack(1), pack(2), pack(3));
        for p in [&sent, &kept] {
            let record = PackRecord {
                len: p.bytes.len() as u64,
                chunks: 1,
                created_ns: 0,
                in_outbox: true,
            };
            let chunks = obnam_protocol::pack::chunk_locations(p.id, &p.entries);
            repo.store.commit_pack(&p.id, &record, &chunks).unwrap();
        }
        repo.store.mark_sent_many(&[sent.id]).unwrap();
        // A pack a crash left half written (its id not known yet) is removed.
        let mut partial = repo.outbox.begin().unwrap();
        partial.write(&[7u8; 10_000]).unwrap();
        drop(partial);
        let tmp = dir.path().join("outbox").join("tmp");
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 1);
        assert_eq!(repo.adopt_orphans(&keys).unwrap(), 1);
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
        let mut left = repo.outbox.scan().unwrap();
        left.sort_unstable();
        let mut want = vec![orphan.id, kept.id];
        want.sort_unstable();
        assert_eq!(left, want);
        assert!(repo.store.pack(&orphan.id).unwrap().unwrap().in_outbox);
        assert!(!repo.store.pack(&sent.id).unwrap().unwrap().in_outbox);
    }

    /// Heads that each list snapshots the other lacks are merged into one numbered above both;
    /// a newer superset is adopted; an older subset changes nothing.
    /// The head lists the friends from the first one on, and a new head is written only when
    /// the friend list changed, with the same snapshots.
    #[test]
    fn heads_record_the_friend_list() {
        let keys = Keys::derive(&MasterSecret::generate());
        let d = tempfile::tempdir().unwrap();
        let repo = repo(d.path());
        let friend = |id: u8| obnam_protocol::local::Friend {
            peer_id: vec![id; 4],
            name: format!("f{id}"),
            household: String::new(),
            addrs: vec![],
            quota_given: 1,
            added_ns: 0,
        };
        let friends = |repo: &Repo| {
            let (_, head, body) = repo.head_body(&keys).unwrap().unwrap();
            let mut ids: Vec<Vec<u8>> = body.friends.into_iter().map(|f| f.peer_id).collect();
            ids.sort();
            (head.seq, ids, body.snapshots.len())
        };
        repo.store.put_friend(&friend(1)).unwrap();
        // No head yet: head 1, no snapshot, friend 1.
        assert_eq!(repo.record_friends(&keys).unwrap(), Some(1));
        assert_eq!(friends(&repo), (1, vec![vec![1; 4]], 0));
        // Nothing changed: no new head.
        assert_eq!(repo.record_friends(&keys).unwrap(), None);
        snap(&repo, &keys, 7);
        repo.store.put_friend(&friend(2)).unwrap();
        assert_eq!(repo.record_friends(&keys).unwrap(), Some(3));
        assert_eq!(friends(&repo), (3, vec![vec![1; 4], vec![2; 4]], 1));
        assert!(repo.store.remove_friend(&[1; 4]).unwrap());
        assert_eq!(repo.record_friends(&keys).unwrap(), Some(4));
        assert_eq!(friends(&repo), (4, vec![vec![2; 4]], 1));
        // The chain holds: each head names the one before it.
        let bytes = repo.store.own_head().unwrap().unwrap();
        assert!(
            SignedHead::verify(&bytes, &keys.owner_id())
                .unwrap()
                .1
                .prev
                .is_some()
        );
    }

    #[test]
    fn merging_heads_never_drops_a_snapshot() {
        let keys = Keys::derive(&MasterSecret::generate());
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (ours, theirs) = (repo(d1.path()), repo(d2.path()));
        let s1 = snap(&theirs, &keys, 1);
        let s2 = snap(&theirs, &keys, 2);
        let head2 = theirs.store.own_head().unwrap().unwrap();
        // No head of ours yet: adopted.
        assert!(matches!(
            ours.merge_head(&keys, &head2).unwrap(),
            HeadMerge::Adopted { .. }
        ));
        assert_eq!(listed(&ours, &keys), (2, vec![s1, s2]));
        // Both go on from head 2, each with a snapshot of its own: a fork at 3.
        let s3 = snap(&ours, &keys, 3);
        let s4 = snap(&theirs, &keys, 4);
        let their3 = theirs.store.own_head().unwrap().unwrap();
        match ours.merge_head(&keys, &their3).unwrap() {
            HeadMerge::Merged { added, seq, .. } => assert_eq!((added, seq), (1, 4)),
            other => panic!("{other:?}"),
        }
        assert_eq!(listed(&ours, &keys), (4, vec![s1, s2, s3, s4]));
        assert_eq!(ours.store.snapshots().unwrap().len(), 4);
        // The same head again, or an older one: nothing changes.
        assert!(matches!(
            ours.merge_head(&keys, &their3).unwrap(),
            HeadMerge::Kept { .. }
        ));
        assert!(matches!(
            ours.merge_head(&keys, &head2).unwrap(),
            HeadMerge::Kept { .. }
        ));
        assert_eq!(listed(&ours, &keys).0, 4);
        // The other side takes the merged head as it is: it lists everything it had.
        let merged = ours.store.own_head().unwrap().unwrap();
        assert!(matches!(
            theirs.merge_head(&keys, &merged).unwrap(),
            HeadMerge::Adopted { .. }
        ));
        assert_eq!(listed(&theirs, &keys), (4, vec![s1, s2, s3, s4]));
        // A head signed by another owner is refused.
        let stranger = Keys::derive(&MasterSecret::generate());
        let d3 = tempfile::tempdir().unwrap();
        let other = repo(d3.path());
        snap(&other, &stranger, 9);
        let foreign = other.store.own_head().unwrap().unwrap();
        assert!(ours.merge_head(&keys, &foreign).is_err());
        assert_eq!(listed(&ours, &keys).0, 4);
    }
}
