//! The storage role: answers friends' requests and pack streams.
//!
//! Every request is authorised here, in its handler:
//! - a node that is not a friend may only fetch a key slot by lookup id (an unknown id gets a
//!   stable fake, so probing learns nothing; lookups are rate-limited per node and in total) and
//!   prove an owner key; anything else is refused with `NotFriend` and logged;
//! - a node that proved an owner key ([`OwnerProof`], over a nonce we chose) may read that
//!   owner's heads, packs and pack list;
//! - writes for an owner need a friend bound to the owner: the first friend that proves the key
//!   is bound, and a signed takeover statement moves the binding (and the friendship) to a
//!   recovered node, after which the old node's writes are refused.
//!
//! Pack bodies are written to a temporary file on a blocking thread while they are hashed; the
//! pack is accepted only if the bytes hash to its id, and recorded under the owner's quota in the
//! same transaction that makes it visible. Bodies live in `hosted/<owner>/<pack>.pack`.

use crate::error::NodeError;
use futures::{AsyncReadExt, AsyncWriteExt};
use libp2p::PeerId;
use obnam_protocol::audit;
use obnam_protocol::keyslot::KeySlot;
use obnam_protocol::msg::{
    self, ErrorCode, MAX_HAVE, MAX_HEAD, MAX_SLOT, MAX_STREAM_HEADER, OwnerProof, Request,
    Response, StreamReply, StreamRequest, SuccessorStatement, WireError,
};
use obnam_protocol::pack::MAX_PACK_LEN;
use obnam_protocol::snapshot::SignedHead;
use obnam_protocol::{LookupId, OwnerId, PackId};
use obnam_store::{Binding, HeadOutcome, PutOutcome, RetireOutcome, Store, TakeoverOutcome};
use serde_bytes::ByteBuf;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const NONCE_LIFETIME: Duration = Duration::from_secs(120);

/// How long a proved owner key lets a node read that owner's data.
const PROVEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Most outstanding nonces.
const MAX_NONCES: usize = 4096;
/// Key slot lookups allowed per node, and in total, per minute.
pub const SLOT_LOOKUPS_PER_NODE: u32 = 10;
/// See [`SLOT_LOOKUPS_PER_NODE`].
pub const SLOT_LOOKUPS_TOTAL: u32 = 60;

/// A fixed-window rate limit on key slot lookups, per node and in total: a friend holding a
/// slot can already guess passphrases offline, but strangers must not use us as an oracle.
#[derive(Default)]
struct SlotLimiter {
    window: Option<Instant>,
    total: u32,
    per_node: HashMap<PeerId, u32>,
}

impl SlotLimiter {
    fn allow(&mut self, peer: PeerId) -> bool {
        if self
            .window
            .is_none_or(|w| w.elapsed() >= Duration::from_secs(60))
        {
            self.window = Some(Instant::now());
            self.total = 0;
            self.per_node.clear();
        }
        let mine = self.per_node.entry(peer).or_insert(0);
        if *mine >= SLOT_LOOKUPS_PER_NODE || self.total >= SLOT_LOOKUPS_TOTAL {
            return false;
        }
        *mine += 1;
        self.total += 1;
        true
    }
}
/// Audit answers made at once (each re-hashes a whole pack); more are answered `Busy`.
pub const MAX_AUDITS: usize = 2;

/// One of a bounded number of slots, given back on drop.
struct Slot<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Slot<'a> {
    fn take(count: &'a std::sync::atomic::AtomicUsize, max: usize) -> Option<Self> {
        use std::sync::atomic::Ordering;
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(count))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A file's identity (device, inode, modification time in ns): it changes when a put replaces
/// the file.
pub type FileId = (u64, u64, i64);

/// The identity of the file `meta` describes.
pub fn file_identity(meta: &std::fs::Metadata) -> FileId {
    use std::os::unix::fs::MetadataExt;
    (
        meta.dev(),
        meta.ino(),
        meta.mtime().saturating_mul(1_000_000_000) + meta.mtime_nsec(),
    )
}

/// Bytes moved per read or write of a pack body.
pub const IO_CHUNK: usize = 256 * 1024;

fn refuse(code: ErrorCode, message: impl Into<String>) -> WireError {
    WireError {
        code,
        message: message.into(),
        available: None,
    }
}

/// What the server calls with a friend's addresses from a newer address record.
pub type OnAddresses = Box<dyn Fn(PeerId, Vec<libp2p::Multiaddr>) + Send + Sync>;

/// Answers friends.
pub struct Server {
    store: Store,
    hosted: PathBuf,
    local: PeerId,
    nonces: Mutex<HashMap<PeerId, ([u8; 32], Instant)>>,
    /// Owners each node proved in this run: such a node may read that owner's data.
    proven: Mutex<HashMap<(PeerId, OwnerId), Instant>>,
    /// Answers unknown lookup ids with a stable fake slot.
    probe_secret: [u8; 32],
    slot_lookups: Mutex<SlotLimiter>,
    audits_running: std::sync::atomic::AtomicUsize,
    audit_counts: Mutex<(Option<Instant>, HashMap<PeerId, u32>)>,
    /// Audits one node may ask of us per minute; more are answered `Busy`.
    pub audits_per_minute: u32,
    /// Held while a hosted pack's file and record change together (a put's rename and commit,
    /// a drop), so a drop never removes a copy that a put has just stored.
    hosted_lock: std::sync::Arc<Mutex<()>>,
    /// How long a pack stream may stay silent (between frames, or in the middle of a body).
    pub stream_idle: Duration,
    on_connect: Box<dyn Fn(PeerId) + Send + Sync>,
    /// Called with a friend's addresses from a newer address record (set once the network runs).
    pub on_addresses: std::sync::OnceLock<OnAddresses>,
}

impl Server {
    /// A server for the store and hosted-pack directory of this node.
    pub fn new(
        store: Store,
        hosted: PathBuf,
        local: PeerId,
        probe_secret: [u8; 32],
        on_connect: Box<dyn Fn(PeerId) + Send + Sync>,
    ) -> Self {
        Self {
            store,
            hosted,
            local,
            nonces: Mutex::new(HashMap::new()),
            proven: Mutex::new(HashMap::new()),
            probe_secret,
            slot_lookups: Mutex::new(SlotLimiter::default()),
            audits_running: std::sync::atomic::AtomicUsize::new(0),
            audit_counts: Mutex::new((None, HashMap::new())),
            audits_per_minute: 10,
            hosted_lock: std::sync::Arc::new(Mutex::new(())),
            stream_idle: Duration::from_secs(60),
            on_connect,
            on_addresses: std::sync::OnceLock::new(),
        }
    }

    /// Called by the event loop when a connection opens: a friend's arrival wakes replication
    /// (a stranger's does not).
    pub fn on_connected(&self, peer: PeerId) {
        if self.is_friend(&peer) {
            (self.on_connect)(peer);
        }
    }

    /// Removes the temporary bodies of puts that a crash interrupted (`hosted/<owner>/*.tmp`):
    /// nothing refers to them. Call before serving. Returns how many were removed.
    pub fn remove_partial_bodies(&self) -> usize {
        let mut removed = 0;
        for owner in std::fs::read_dir(&self.hosted)
            .into_iter()
            .flatten()
            .flatten()
        {
            for f in std::fs::read_dir(owner.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let p = f.path();
                if p.extension().is_some_and(|x| x == "tmp") && std::fs::remove_file(&p).is_ok() {
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            tracing::info!(
                removed,
                "removed partly received pack bodies left by a crash"
            );
        }
        removed
    }

    /// The directory of an owner's hosted packs.
    pub fn owner_dir(&self, owner: &OwnerId) -> PathBuf {
        self.hosted.join(owner.to_hex())
    }

    /// Where a hosted pack's body is.
    pub fn pack_path(&self, owner: &OwnerId, pack: &PackId) -> PathBuf {
        self.owner_dir(owner)
            .join(format!("{}.pack", pack.to_hex()))
    }

    /// Keeps a checked address record of a friend if it is newer than the one held, and hands
    /// its addresses to the network (which dials them when the friend is not connected).
    /// Returns whether it was newer.
    ///
    /// # Errors
    /// `NotFriend` for a record of a node that is not a friend; `Internal` for the store.
    pub fn learn_addresses(&self, rec: crate::addrbook::Checked) -> Result<bool, WireError> {
        if !self.is_friend(&rec.peer) {
            return Err(refuse(
                ErrorCode::NotFriend,
                format!("{} is not a friend of {}", rec.peer, self.local),
            ));
        }
        let newer = self
            .store
            .put_address_record(&rec.peer.to_bytes(), &rec.record)
            .map_err(|e| refuse(ErrorCode::Internal, e.to_string()))?;
        if newer {
            tracing::info!(peer = %rec.peer, seq = rec.seq, addrs = ?rec.addrs, "new address record");
            if let Some(f) = self.on_addresses.get() {
                f(rec.peer, rec.addrs);
            }
        }
        Ok(newer)
    }

    /// Whether `peer` is a friend.
    pub fn is_friend(&self, peer: &PeerId) -> bool {
        matches!(self.store.friend(&peer.to_bytes()), Ok(Some(_)))
    }

    fn friend_check(&self, peer: &PeerId) -> Result<(), WireError> {
        match self.store.friend(&peer.to_bytes()) {
            Ok(Some(_)) => Ok(()),
            Ok(None) => {
                tracing::warn!(%peer, "refused a request: not a friend");
                Err(refuse(
                    ErrorCode::NotFriend,
                    format!(
                        "{} is not a friend of {}: both sides must run `obnam peer add`",
                        peer, self.local
                    ),
                ))
            }
            Err(e) => Err(refuse(ErrorCode::Internal, e.to_string())),
        }
    }

    /// Writes for an owner: a friend bound to the owner.
    fn owner_check(&self, peer: &PeerId, owner: &OwnerId) -> Result<(), WireError> {
        self.friend_check(peer)?;
        match self.store.successor(owner) {
            Ok(None) => {}
            Ok(Some(new)) => {
                tracing::warn!(%peer, owner = %owner.short(), successor = %new.short(), "refused a write for a retired owner key");
                return Err(refuse(
                    ErrorCode::Retired,
                    format!(
                        "owner key {} was retired by `obnam keys rotate` (its successor is {})",
                        owner.short(),
                        new.short()
                    ),
                ));
            }
            Err(e) => return Err(refuse(ErrorCode::Internal, e.to_string())),
        }
        match self.store.hosted_owner(owner) {
            Ok(Some(rec)) if rec.bound_peer == peer.to_bytes() => Ok(()),
            Ok(Some(_)) => {
                tracing::warn!(%peer, owner = %owner.short(), "refused a write: the owner is bound to another node");
                Err(refuse(
                    ErrorCode::BoundElsewhere,
                    format!("owner {} is bound to another node", owner.short()),
                ))
            }
            Ok(None) => Err(refuse(
                ErrorCode::Unproven,
                format!("{peer} has not proved owner key {}", owner.short()),
            )),
            Err(e) => Err(refuse(ErrorCode::Internal, e.to_string())),
        }
    }

    /// Reads for an owner: the bound node, or any node that proved the owner key in this run
    /// (a recovering node is no friend yet).
    fn read_check(&self, peer: &PeerId, owner: &OwnerId) -> Result<(), WireError> {
        let proven = self.proven.lock().ok().is_some_and(|p| {
            p.get(&(*peer, *owner))
                .is_some_and(|t| t.elapsed() < PROVEN_LIFETIME)
        });
        if proven {
            return Ok(());
        }
        match self.store.hosted_owner(owner) {
            Ok(Some(rec)) if rec.bound_peer == peer.to_bytes() && self.is_friend(peer) => Ok(()),
            // Anyone may read after proving the owner key: say so, whoever asks.
            Ok(_) => Err(refuse(
                ErrorCode::Unproven,
                format!("prove owner key {} to read its data", owner.short()),
            )),
            Err(e) => Err(refuse(ErrorCode::Internal, e.to_string())),
        }
    }

    /// Answers one exchange request. Blocking: runs on a blocking thread.
    pub fn handle_request(&self, peer: PeerId, request: crate::net::Inbound) -> Response {
        let request = match request {
            crate::net::Inbound::Valid(r) => r,
            crate::net::Inbound::Invalid(code, message) => {
                tracing::warn!(%peer, ?code, %message, "bad request");
                return Response::Error(refuse(code, message));
            }
        };
        match self.answer(peer, request) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "request refused");
                Response::Error(e)
            }
        }
    }

    /// A slot-shaped answer for a lookup id nobody filed: stable per lookup id and node, the size
    /// of a real slot, and useless, so probing learns nothing.
    fn fake_slot(&self, lookup: &LookupId) -> Vec<u8> {
        let mut h = blake3::Hasher::new_keyed(&self.probe_secret);
        h.update(lookup.as_bytes());
        let mut sealed = vec![
            0u8;
            1 + obnam_protocol::envelope::NONCE_LEN
                + obnam_protocol::keyslot::MASTER_LEN
                + obnam_protocol::envelope::TAG_LEN
        ];
        h.finalize_xof().fill(&mut sealed);
        sealed[0] = obnam_protocol::FORMAT_VERSION;
        KeySlot {
            version: obnam_protocol::keyslot::SLOT_VERSION,
            sealed_secret: sealed,
        }
        .to_bytes()
    }

    fn answer(&self, peer: PeerId, request: Request) -> Result<Response, WireError> {
        let internal = |e: obnam_store::StoreError| refuse(ErrorCode::Internal, e.to_string());
        match request {
            // Strangers may do two things: fetch a key slot, and prove an owner key.
            Request::Nonce => {
                let mut nonce = [0u8; 32];
                rand::fill(&mut nonce[..]);
                if let Ok(mut n) = self.nonces.lock() {
                    n.retain(|_, (_, t)| t.elapsed() < NONCE_LIFETIME);
                    if n.len() >= MAX_NONCES && !n.contains_key(&peer) {
                        return Err(refuse(ErrorCode::Busy, "too many owner proofs in progress"));
                    }
                    n.insert(peer, (nonce, Instant::now()));
                }
                Ok(Response::Nonce(nonce))
            }
            Request::ProveOwner(proof) => {
                self.check_proof(&peer, &proof)?;
                // Remember the proof for reading only for owners we host (a stranger proving
                // throwaway keys gets nothing to remember), and never more than MAX_NONCES.
                let hosted = self
                    .store
                    .hosted_owner(&proof.owner)
                    .map_err(internal)?
                    .is_some();
                if hosted && let Ok(mut p) = self.proven.lock() {
                    p.retain(|_, t| t.elapsed() < PROVEN_LIFETIME);
                    if p.len() < MAX_NONCES {
                        p.insert((peer, proof.owner), Instant::now());
                    }
                }
                if !self.is_friend(&peer) {
                    tracing::info!(%peer, owner = %proof.owner.short(), "a node that is not a friend proved an owner key: it may read that owner's data");
                    return Ok(Response::Ok);
                }
                match self
                    .store
                    .bind_owner(&proof.owner, &peer.to_bytes())
                    .map_err(internal)?
                {
                    Binding::Bound => {
                        tracing::info!(%peer, owner = %proof.owner.short(), "owner key proved");
                        Ok(Response::Ok)
                    }
                    // The proof stands for reading; writing needs a takeover.
                    Binding::Elsewhere(_) => Ok(Response::Ok),
                    // A retired key may still read what is left until it is deleted.
                    Binding::Retired => Ok(Response::Ok),
                    Binding::TooMany => Err(refuse(
                        ErrorCode::QuotaExceeded,
                        "this node already stores data for too many owner keys of yours",
                    )),
                }
            }
            Request::GetSlot { lookup } => {
                let allowed = self
                    .slot_lookups
                    .lock()
                    .map(|mut l| l.allow(peer))
                    .unwrap_or(false);
                if !allowed {
                    tracing::warn!(%peer, "key slot lookups: rate limit reached");
                    return Err(refuse(
                        ErrorCode::Busy,
                        "too many key slot lookups; try again in a minute",
                    ));
                }
                let slot = match self.store.get_slot(&lookup).map_err(internal)? {
                    Some((_, s)) => s,
                    None => self.fake_slot(&lookup),
                };
                Ok(Response::Slot(Some(ByteBuf::from(slot))))
            }
            Request::Have { owner, packs } => {
                self.read_check(&peer, &owner)?;
                if packs.len() > MAX_HAVE {
                    return Err(refuse(
                        ErrorCode::TooLarge,
                        format!("at most {MAX_HAVE} pack ids per request"),
                    ));
                }
                let mut out = Vec::with_capacity(packs.len());
                for p in &packs {
                    out.push(
                        self.store
                            .has_hosted(&owner, p)
                            .map_err(internal)?
                            .is_some(),
                    );
                }
                Ok(Response::Have(out))
            }
            Request::PutHead { owner, head } => {
                self.owner_check(&peer, &owner)?;
                if head.len() > MAX_HEAD {
                    return Err(refuse(
                        ErrorCode::TooLarge,
                        format!("head of {} bytes is over {MAX_HEAD}", head.len()),
                    ));
                }
                let (_, parsed) = SignedHead::verify(&head, &owner)
                    .map_err(|e| refuse(ErrorCode::Malformed, format!("head: {e}")))?;
                match self
                    .store
                    .put_head(&owner, parsed.seq, &head)
                    .map_err(internal)?
                {
                    HeadOutcome::Stored => Ok(Response::Ok),
                    HeadOutcome::Stale { stored } => Err(refuse(
                        ErrorCode::StaleHead,
                        format!(
                            "head {} is not newer than the stored head {stored}",
                            parsed.seq
                        ),
                    )),
                }
            }
            Request::GetHead { owner } => {
                self.read_check(&peer, &owner)?;
                Ok(Response::Head(
                    self.store
                        .get_head(&owner)
                        .map_err(internal)?
                        .map(|(_, h)| ByteBuf::from(h)),
                ))
            }
            Request::PutSlot {
                owner,
                lookup,
                slot,
            } => {
                self.owner_check(&peer, &owner)?;
                if slot.len() > MAX_SLOT {
                    return Err(refuse(ErrorCode::TooLarge, "key slot too large"));
                }
                KeySlot::from_bytes(&slot)
                    .map_err(|e| refuse(ErrorCode::Malformed, format!("key slot: {e}")))?;
                if !self
                    .store
                    .put_slot(&owner, &lookup, &slot)
                    .map_err(internal)?
                {
                    tracing::warn!(%peer, "refused a key slot: its lookup id is filed for another owner");
                    return Err(refuse(
                        ErrorCode::BoundElsewhere,
                        "that lookup id is filed for another owner",
                    ));
                }
                Ok(Response::Ok)
            }
            Request::Usage { owner } => {
                self.read_check(&peer, &owner)?;
                let (quota, used) = self
                    .store
                    .available(&owner)
                    .map_err(internal)?
                    .unwrap_or((0, 0));
                Ok(Response::Usage { quota, used })
            }
            Request::ListPacks {
                owner,
                after,
                limit,
            } => {
                self.read_check(&peer, &owner)?;
                let limit = limit.clamp(1, msg::MAX_LIST) as usize;
                Ok(Response::Packs(
                    self.store
                        .hosted_packs(&owner, after.as_ref(), limit)
                        .map_err(internal)?,
                ))
            }
            Request::Successor(statement) => self.successor(peer, statement),
            Request::Audit { owner, challenge } => self.audit(peer, owner, challenge),
            Request::Dropped { owner } => {
                // Only a friend asks this in its replication rounds; a node we removed learns
                // here that we are no longer its friend.
                self.friend_check(&peer)?;
                self.read_check(&peer, &owner)?;
                Ok(Response::Dropped(
                    self.store
                        .dropped_packs(&owner, msg::MAX_LIST as usize)
                        .map_err(internal)?,
                ))
            }
            Request::DeleteOwner { owner } => self.delete_owner(peer, owner),
            Request::Addresses(envelope) => {
                self.friend_check(&peer)?;
                let rec = crate::addrbook::open(&envelope)
                    .map_err(|e| refuse(ErrorCode::Malformed, e.to_string()))?;
                if rec.peer != peer {
                    return Err(refuse(
                        ErrorCode::Malformed,
                        format!(
                            "address record of {} pushed by {peer}: push your own",
                            rec.peer
                        ),
                    ));
                }
                self.learn_addresses(rec)?;
                Ok(Response::Ok)
            }
            Request::WhereIs { peer: whom } => {
                self.friend_check(&peer)?;
                let whom = PeerId::from_bytes(&whom)
                    .map_err(|e| refuse(ErrorCode::Malformed, format!("peer id: {e}")))?;
                // Only records of friends are kept, and only handed to other friends.
                if !self.is_friend(&whom) {
                    return Ok(Response::Addresses(None));
                }
                let rec = self
                    .store
                    .address_record(&whom.to_bytes())
                    .map_err(internal)?;
                Ok(Response::Addresses(rec.map(|r| r.envelope)))
            }
            Request::Takeover(statement) => {
                let proven = self
                    .proven
                    .lock()
                    .ok()
                    .is_some_and(|p| p.contains_key(&(peer, statement.owner)));
                if !proven {
                    return Err(refuse(
                        ErrorCode::Unproven,
                        "prove the owner key before a takeover",
                    ));
                }
                if statement.new_node != peer.to_bytes() {
                    return Err(refuse(
                        ErrorCode::Malformed,
                        "a takeover must name the node that sends it",
                    ));
                }
                statement
                    .verify()
                    .map_err(|e| refuse(ErrorCode::Unproven, format!("takeover statement: {e}")))?;
                match self
                    .store
                    .takeover(&statement.owner, &peer.to_bytes(), statement.from_seq)
                    .map_err(internal)?
                {
                    TakeoverOutcome::Moved(old) => {
                        let old = PeerId::from_bytes(&old)
                            .map(|p| p.to_string())
                            .unwrap_or_else(|_| "?".into());
                        tracing::warn!(owner = %statement.owner.short(), from = %old, to = %peer, seq = statement.from_seq, "takeover: the owner moved to a new node; the old node may no longer write");
                        Ok(Response::Ok)
                    }
                    TakeoverOutcome::Same => Ok(Response::Ok),
                    TakeoverOutcome::Stale { stored } => Err(refuse(
                        ErrorCode::StaleHead,
                        format!(
                            "the takeover starts at head {} but head {stored} is stored here",
                            statement.from_seq
                        ),
                    )),
                    TakeoverOutcome::Unknown => Err(refuse(
                        ErrorCode::NotFound,
                        "this node stores nothing for that owner",
                    )),
                }
            }
        }
    }

    /// Answers an audit challenge with a proof made from the stored pack. Making the proof
    /// re-hashes the whole pack, so an answer is also a scrub of that pack: a copy that is gone or
    /// no longer hashes to its id is dropped (its owner repairs it) and the answer is `NotFound`.
    fn audit(
        &self,
        peer: PeerId,
        owner: OwnerId,
        challenge: audit::Challenge,
    ) -> Result<Response, WireError> {
        self.read_check(&peer, &owner)?;
        let pack = challenge.pack;
        let Some(size) = self
            .store
            .has_hosted(&owner, &pack)
            .map_err(|e| refuse(ErrorCode::Internal, e.to_string()))?
        else {
            return Err(refuse(
                ErrorCode::NotFound,
                format!("pack {pack} of owner {} is not stored here", owner.short()),
            ));
        };
        challenge
            .check(size)
            .map_err(|e| refuse(ErrorCode::Malformed, e.to_string()))?;
        if !self.allow_audit(peer) {
            tracing::warn!(%peer, "audits: rate limit reached");
            return Err(refuse(
                ErrorCode::Busy,
                format!(
                    "more than {} audits in a minute; try again later",
                    self.audits_per_minute
                ),
            ));
        }
        let Some(_slot) = Slot::take(&self.audits_running, MAX_AUDITS) else {
            return Err(refuse(ErrorCode::Busy, "too many audits in progress"));
        };
        let path = self.pack_path(&owner, &pack);
        if !self.owner_dir(&owner).is_dir() {
            // The whole directory is gone (an unmounted disk?): not a reason to drop anything.
            return Err(refuse(
                ErrorCode::Internal,
                "the hosted-pack directory is missing here",
            ));
        }
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.drop_pack(&owner, &pack, None, "its file is missing");
                return Err(refuse(
                    ErrorCode::NotFound,
                    format!("pack {pack} was lost here (its file is missing) and is dropped"),
                ));
            }
            Err(e) => {
                return Err(refuse(
                    ErrorCode::Internal,
                    format!("opening pack {pack}: {e}"),
                ));
            }
        };
        let meta = file
            .metadata()
            .map_err(|e| refuse(ErrorCode::Internal, format!("reading pack {pack}: {e}")))?;
        let (on_disk, identity) = (meta.len(), Some(file_identity(&meta)));
        if on_disk != size {
            self.drop_pack(
                &owner,
                &pack,
                identity,
                &format!("its file has {on_disk} bytes, not {size}"),
            );
            return Err(refuse(
                ErrorCode::NotFound,
                format!("pack {pack} was damaged here (wrong length) and is dropped"),
            ));
        }
        let reader = std::io::BufReader::with_capacity(IO_CHUNK, &file);
        match audit::prove(&challenge, size, reader, &file) {
            Ok(proof) => Ok(Response::Proof {
                nonce: challenge.nonce,
                proof: ByteBuf::from(proof),
            }),
            Err(e @ audit::AuditError::Corrupt { .. }) => {
                self.drop_pack(&owner, &pack, identity, &e.to_string());
                Err(refuse(
                    ErrorCode::NotFound,
                    format!("pack {pack} was corrupt here and is dropped"),
                ))
            }
            Err(e) => Err(refuse(ErrorCode::Internal, e.to_string())),
        }
    }

    /// Whether `peer` may ask another audit this minute.
    fn allow_audit(&self, peer: PeerId) -> bool {
        let Ok(mut counts) = self.audit_counts.lock() else {
            return false;
        };
        let (window, per_peer) = &mut *counts;
        if window.is_none_or(|w| w.elapsed() >= Duration::from_secs(60)) {
            *window = Some(Instant::now());
            per_peer.clear();
        }
        if per_peer.len() >= MAX_NONCES && !per_peer.contains_key(&peer) {
            return false;
        }
        let n = per_peer.entry(peer).or_insert(0);
        *n += 1;
        *n <= self.audits_per_minute
    }

    /// Forgets a hosted pack whose copy is lost or corrupt, removes its file and lists it for
    /// its owner, who sends it again. `judged` is the identity of the file found bad (`None`:
    /// it was missing); if the file changed since (a put stored a good copy), nothing happens.
    pub fn drop_pack(&self, owner: &OwnerId, pack: &PackId, judged: Option<FileId>, why: &str) {
        let Ok(_guard) = self.hosted_lock.lock() else {
            return;
        };
        let path = self.pack_path(owner, pack);
        let now = std::fs::symlink_metadata(&path)
            .ok()
            .map(|m| file_identity(&m));
        if now != judged {
            tracing::debug!(pack = %pack.short(), "a hosted pack changed while it was judged; not dropping it");
            return;
        }
        match self.store.drop_hosted(owner, pack) {
            Ok(Some(_)) => {
                tracing::warn!(owner = %owner.short(), pack = %pack.short(), why, "dropped a hosted pack; its owner will send it again");
            }
            Ok(None) => return,
            Err(e) => {
                tracing::error!(owner = %owner.short(), pack = %pack.short(), error = %e, "could not drop a bad hosted pack");
                return;
            }
        }
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "could not remove a dropped pack's file");
        }
    }

    fn successor(&self, peer: PeerId, st: SuccessorStatement) -> Result<Response, WireError> {
        self.friend_check(&peer)?;
        if st.slot.len() > MAX_SLOT {
            return Err(refuse(ErrorCode::TooLarge, "key slot too large"));
        }
        KeySlot::from_bytes(&st.slot)
            .map_err(|e| refuse(ErrorCode::Malformed, format!("key slot: {e}")))?;
        st.verify()
            .map_err(|e| refuse(ErrorCode::Unproven, format!("successor statement: {e}")))?;
        match self
            .store
            .retire_owner(&st.old, &st.new, &peer.to_bytes(), &st.lookup, &st.slot)
            .map_err(|e| refuse(ErrorCode::Internal, e.to_string()))?
        {
            RetireOutcome::Retired => {
                tracing::info!(%peer, old = %st.old.short(), new = %st.new.short(), "an owner key was retired; its key slot now belongs to the successor");
                Ok(Response::Ok)
            }
            RetireOutcome::NotBound => Err(refuse(
                ErrorCode::NotFound,
                format!("owner {} is not bound to {peer} here", st.old.short()),
            )),
            RetireOutcome::NewElsewhere => Err(refuse(
                ErrorCode::BoundElsewhere,
                format!("owner {} is bound to another node", st.new.short()),
            )),
        }
    }

    fn delete_owner(&self, peer: PeerId, owner: OwnerId) -> Result<Response, WireError> {
        self.friend_check(&peer)?;
        match self
            .store
            .delete_owner(&owner, &peer.to_bytes())
            .map_err(|e| refuse(ErrorCode::Internal, e.to_string()))?
        {
            None => Err(refuse(
                ErrorCode::NotFound,
                format!(
                    "owner {} is not a retired owner of {peer} here: nothing deleted",
                    owner.short()
                ),
            )),
            Some(freed) => {
                // The records are gone; the bodies go now. A crash here leaves only files that
                // nothing references.
                let dir = self.owner_dir(&owner);
                if let Err(e) = std::fs::remove_dir_all(&dir)
                    && e.kind() != std::io::ErrorKind::NotFound
                {
                    tracing::warn!(dir = %dir.display(), error = %e, "could not remove a retired owner's packs");
                }
                tracing::info!(%peer, owner = %owner.short(), freed, "deleted the data of a retired owner key");
                Ok(Response::Ok)
            }
        }
    }

    fn check_proof(&self, peer: &PeerId, proof: &OwnerProof) -> Result<(), WireError> {
        let issued = self.nonces.lock().ok().and_then(|mut n| n.remove(peer));
        match issued {
            Some((nonce, at)) if nonce == proof.nonce && at.elapsed() < NONCE_LIFETIME => {}
            _ => {
                return Err(refuse(
                    ErrorCode::Unproven,
                    "the proof does not answer a fresh nonce of ours",
                ));
            }
        }
        proof
            .verify(&peer.to_bytes(), &self.local.to_bytes())
            .map_err(|e| {
                tracing::warn!(%peer, error = %e, "owner proof failed");
                refuse(ErrorCode::Unproven, format!("owner proof failed: {e}"))
            })
    }

    /// Serves one pack stream until the peer closes it.
    pub async fn handle_stream(&self, peer: PeerId, mut stream: libp2p::Stream) {
        loop {
            // A peer that opens a stream and sends nothing is dropped after the timeout.
            let header = match tokio::time::timeout(
                self.stream_idle,
                read_frame::<StreamRequest>(&mut stream, MAX_STREAM_HEADER),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => {
                    tracing::debug!(%peer, "pack stream idle; closing");
                    break;
                }
            };
            let header: StreamRequest = match header {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "bad pack stream header");
                    let _ = write_frame(
                        &mut stream,
                        &StreamReply::Error(refuse(ErrorCode::Malformed, e)),
                    )
                    .await;
                    break;
                }
            };
            let keep_going = match header {
                StreamRequest::Put { owner, pack, len } => {
                    self.put(&peer, &mut stream, owner, pack, len).await
                }
                StreamRequest::Get {
                    owner,
                    pack,
                    offset,
                    len,
                } => self.get(&peer, &mut stream, owner, pack, offset, len).await,
            };
            if !keep_going {
                break;
            }
        }
        let _ = stream.close().await;
    }

    async fn put(
        &self,
        peer: &PeerId,
        stream: &mut libp2p::Stream,
        owner: OwnerId,
        pack: PackId,
        len: u64,
    ) -> bool {
        let reply = |e: WireError| StreamReply::Error(e);
        if let Err(e) = self.owner_check(peer, &owner) {
            // Refused: answer and close, so a stranger cannot hold a stream slot.
            let _ = write_frame(stream, &reply(e)).await;
            return false;
        }
        if len > MAX_PACK_LEN {
            let _ = write_frame(
                stream,
                &reply(refuse(
                    ErrorCode::TooLarge,
                    format!("pack of {len} bytes is over {MAX_PACK_LEN}"),
                )),
            )
            .await;
            return false;
        }
        match self.store.has_hosted(&owner, &pack) {
            Ok(Some(_)) => {
                return write_frame(stream, &StreamReply::Stored { already: true })
                    .await
                    .is_ok();
            }
            Ok(None) => {}
            Err(e) => {
                return write_frame(stream, &reply(refuse(ErrorCode::Internal, e.to_string())))
                    .await
                    .is_ok();
            }
        }
        match self.store.available(&owner) {
            Ok(Some((quota, used))) if used.saturating_add(len) <= quota => {}
            Ok(Some((quota, used))) => {
                let available = quota.saturating_sub(used);
                tracing::info!(%peer, owner = %owner.short(), len, available, "pack refused: quota");
                let e = WireError {
                    code: ErrorCode::QuotaExceeded,
                    message: format!(
                        "pack of {len} bytes exceeds the quota: {available} of {quota} bytes left"
                    ),
                    available: Some(available),
                };
                return write_frame(stream, &reply(e)).await.is_ok();
            }
            Ok(None) => {
                return write_frame(
                    stream,
                    &reply(refuse(ErrorCode::Unproven, "no quota for this owner")),
                )
                .await
                .is_ok();
            }
            Err(e) => {
                return write_frame(stream, &reply(refuse(ErrorCode::Internal, e.to_string())))
                    .await
                    .is_ok();
            }
        }
        if write_frame(stream, &StreamReply::Ready).await.is_err() {
            return false;
        }
        let result = self.receive(stream, &owner, &pack, len).await;
        let answer = match result {
            Ok(PutOutcome::Stored) => StreamReply::Stored { already: false },
            Ok(PutOutcome::AlreadyHad) => StreamReply::Stored { already: true },
            Ok(PutOutcome::QuotaExceeded { available }) => StreamReply::Error(WireError {
                code: ErrorCode::QuotaExceeded,
                message: format!("quota exceeded: {available} bytes left"),
                available: Some(available),
            }),
            Ok(PutOutcome::NoQuota) => {
                reply(refuse(ErrorCode::Unproven, "no quota for this owner"))
            }
            Err(e) => {
                tracing::warn!(%peer, pack = %pack.short(), error = %e, "pack refused");
                let _ = write_frame(stream, &reply(e)).await;
                // After a broken body the stream is out of step: close it.
                return false;
            }
        };
        write_frame(stream, &answer).await.is_ok()
    }

    /// Reads `len` body bytes into a temporary file (on a blocking thread that also hashes them),
    /// verifies the pack id, makes the file durable and records it under the quota.
    async fn receive(
        &self,
        stream: &mut libp2p::Stream,
        owner: &OwnerId,
        pack: &PackId,
        len: u64,
    ) -> Result<PutOutcome, WireError> {
        let dir = self.owner_dir(owner);
        let final_path = self.pack_path(owner, pack);
        let mut tmp_name = [0u8; 8];
        rand::fill(&mut tmp_name[..]);
        let tmp = dir.join(format!("{}.tmp", hex_of(&tmp_name)));
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        // The writer hands the pieces back to be filled again: a fresh zeroed piece per 256 KiB
        // (allocation, zero-fill, page faults) showed in profiles of a friend receiving.
        let (spare_tx, spare_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(5);
        let writer_tmp = tmp.clone();
        let writer = tokio::task::spawn_blocking(move || -> Result<PackId, String> {
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let mut f =
                crate::outbox::PackWriter::create(&writer_tmp).map_err(|e| e.to_string())?;
            let mut hasher = blake3::Hasher::new();
            while let Some(piece) = rx.blocking_recv() {
                hasher.update(&piece);
                f.write(&piece).map_err(|e| e.to_string())?;
                let _ = spare_tx.try_send(piece);
            }
            f.finish().map_err(|e| e.to_string())?;
            Ok(PackId(*hasher.finalize().as_bytes()))
        });
        let mut left = len;
        let mut read_err = None;
        while left > 0 {
            let n = IO_CHUNK.min(usize::try_from(left).unwrap_or(IO_CHUNK));
            let mut buf = spare_rx.try_recv().unwrap_or_default();
            buf.resize(n, 0);
            match tokio::time::timeout(self.stream_idle, stream.read_exact(&mut buf)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    read_err = Some(e);
                    break;
                }
                Err(_) => {
                    read_err = Some(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no data for a minute",
                    ));
                    break;
                }
            }
            left -= n as u64;
            if tx.send(buf).await.is_err() {
                break;
            }
        }
        drop(tx);
        let written = writer
            .await
            .map_err(|e| refuse(ErrorCode::Internal, e.to_string()))?;
        let cleanup = || {
            let _ = std::fs::remove_file(&tmp);
        };
        if let Some(e) = read_err {
            cleanup();
            return Err(refuse(
                ErrorCode::Malformed,
                format!("pack body ended early: {e}"),
            ));
        }
        let id = match written {
            Ok(id) => id,
            Err(e) => {
                cleanup();
                return Err(refuse(
                    ErrorCode::Internal,
                    format!("storing the pack: {e}"),
                ));
            }
        };
        if id != *pack {
            cleanup();
            return Err(refuse(
                ErrorCode::BadPack,
                format!(
                    "the bytes hash to {}, not to pack {}",
                    id.short(),
                    pack.short()
                ),
            ));
        }
        let store = self.store.clone();
        let (owner, pack) = (*owner, *pack);
        let lock = std::sync::Arc::clone(&self.hosted_lock);
        tokio::task::spawn_blocking(move || -> Result<PutOutcome, WireError> {
            let _guard = lock
                .lock()
                .map_err(|_| refuse(ErrorCode::Internal, "hosted lock poisoned"))?;
            std::fs::rename(&tmp, &final_path)
                .map_err(|e| refuse(ErrorCode::Internal, e.to_string()))?;
            if let Some(dir) = final_path.parent() {
                crate::outbox::sync_dir(dir)
                    .map_err(|e| refuse(ErrorCode::Internal, e.to_string()))?;
            }
            let outcome = store
                .commit_hosted(&owner, &pack, len)
                .map_err(|e| refuse(ErrorCode::Internal, e.to_string()))?;
            if matches!(
                outcome,
                PutOutcome::QuotaExceeded { .. } | PutOutcome::NoQuota
            ) {
                let _ = std::fs::remove_file(&final_path);
            }
            Ok(outcome)
        })
        .await
        .map_err(|e| refuse(ErrorCode::Internal, e.to_string()))?
    }

    async fn get(
        &self,
        peer: &PeerId,
        stream: &mut libp2p::Stream,
        owner: OwnerId,
        pack: PackId,
        offset: u64,
        len: u64,
    ) -> bool {
        if let Err(e) = self.read_check(peer, &owner) {
            let _ = write_frame(stream, &StreamReply::Error(e)).await;
            return false;
        }
        let size = match self.store.has_hosted(&owner, &pack) {
            Ok(Some(s)) => s,
            Ok(None) => {
                return write_frame(
                    stream,
                    &StreamReply::Error(refuse(
                        ErrorCode::NotFound,
                        format!("no pack {} here", pack.short()),
                    )),
                )
                .await
                .is_ok();
            }
            Err(e) => {
                return write_frame(
                    stream,
                    &StreamReply::Error(refuse(ErrorCode::Internal, e.to_string())),
                )
                .await
                .is_ok();
            }
        };
        if offset > size || !offset.is_multiple_of(obnam_protocol::pack::PACK_ALIGN) {
            return write_frame(
                stream,
                &StreamReply::Error(refuse(
                    ErrorCode::Malformed,
                    "offset must be a multiple of 64 KiB inside the pack",
                )),
            )
            .await
            .is_ok();
        }
        let len = len.min(size - offset);
        let path = self.pack_path(&owner, &pack);
        // Reads happen on the blocking pool, one piece at a time (direct I/O where possible).
        let opened = tokio::task::spawn_blocking(move || crate::outbox::PackReader::open(&path))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        let mut reader = match opened {
            Ok(r) => r,
            Err(e) => {
                return write_frame(
                    stream,
                    &StreamReply::Error(refuse(ErrorCode::Internal, e.to_string())),
                )
                .await
                .is_ok();
            }
        };
        reader.seek(offset);
        if write_frame(stream, &StreamReply::Data { len })
            .await
            .is_err()
        {
            return false;
        }
        let mut left = len;
        while left > 0 {
            let n = IO_CHUNK.min(usize::try_from(left).unwrap_or(IO_CHUNK));
            let Ok((r, read)) = tokio::task::spawn_blocking(move || {
                let read = reader.read_next(n);
                (reader, read)
            })
            .await
            else {
                return false;
            };
            reader = r;
            if read.is_err() {
                return false;
            }
            // A reader that stops reading is dropped after the idle timeout.
            if !matches!(
                tokio::time::timeout(self.stream_idle, stream.write_all(reader.piece())).await,
                Ok(Ok(()))
            ) {
                return false;
            }
            left -= n as u64;
        }
        stream.flush().await.is_ok()
    }
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Reads one `length ‖ postcard` frame of at most `max` bytes; `None` at a clean end of stream.
///
/// # Errors
/// A message for a truncated, oversized or malformed frame.
pub async fn read_frame<T: serde::de::DeserializeOwned>(
    io: &mut libp2p::Stream,
    max: usize,
) -> Result<Option<T>, String> {
    let mut len = [0u8; 4];
    match io.read_exact(&mut len).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.to_string()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(format!("frame of {len} bytes is over the limit of {max}"));
    }
    let mut body = vec![0u8; len];
    io.read_exact(&mut body)
        .await
        .map_err(|e| format!("truncated frame: {e}"))?;
    msg::decode("stream frame", &body, max)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// Writes one frame.
///
/// # Errors
/// I/O errors.
pub async fn write_frame<T: serde::Serialize>(
    io: &mut libp2p::Stream,
    m: &T,
) -> std::io::Result<()> {
    io.write_all(&msg::frame(m)).await?;
    io.flush().await
}

/// Maps a refusal to a node error naming the friend.
pub fn wire_error(peer: &PeerId, e: &WireError) -> NodeError {
    NodeError::Net(format!("friend {peer} refused: {}", e.message))
}
