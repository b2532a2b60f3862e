//! Many owners at once against one storage node, for the many-owners benchmark (feature
//! `testing`).
//!
//! Each owner is a swarm of its own in this process (its own peer id, TCP connection, Noise and
//! Yamux, as the node's transport sets them up), with an owner key of its own. [`register`]
//! binds owners to the storage node (nonce, owner proof); [`upload`] makes them all store packs
//! at once, over real pack streams, and measures the aggregate rate. The pack bytes are
//! incompressible filler with a distinct header per pack: the storage node sees only opaque
//! bytes and their BLAKE3 id, exactly as with real sealed packs.
//!
//! The storage node's limits apply as to any owner: a connection or a pack stream beyond them is
//! closed, and the owner tries again after a short, growing pause. [`LoadReport`] counts those
//! retries.

use super::{connect_as, exchange_decoded};
use crate::error::NodeError;
use crate::serve::read_frame;
use futures::AsyncWriteExt;
use libp2p::identity::Keypair;
use libp2p::{PeerId, StreamProtocol};
use obnam_protocol::msg::{
    self, ErrorCode, OwnerProof, Request, Response, StreamReply, StreamRequest, WireError,
};
use obnam_protocol::{OwnerId, PackId};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The libp2p identity of load owner `i`.
fn peer_key(i: u32) -> Result<Keypair, NodeError> {
    let seed = blake3::derive_key("obnam load owner peer v1", &i.to_le_bytes());
    Keypair::ed25519_from_bytes(seed).map_err(|e| NodeError::Key(e.to_string()))
}

/// The owner key of load owner `i`.
fn owner_key(i: u32) -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&blake3::derive_key(
        "obnam load owner key v1",
        &i.to_le_bytes(),
    ))
}

/// The peer id of load owner `i`, for `obnam peer add` on the storage node.
///
/// # Errors
/// Key errors.
pub fn owner_peer_id(i: u32) -> Result<String, NodeError> {
    Ok(peer_key(i)?.public().to_peer_id().to_string())
}

/// What [`upload`] measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadReport {
    /// Owners that uploaded.
    pub owners: u32,
    /// Packs stored (all of them, or [`upload`] fails).
    pub packs: u64,
    /// Pack bytes stored.
    pub bytes: u64,
    /// Seconds from the moment every owner was connected and proved until the last pack was
    /// acknowledged.
    pub secs: f64,
    /// Connections, exchanges or pack streams that had to be tried again (the storage node's
    /// limits, or `Busy`).
    pub retries: u64,
}

/// How long an owner keeps trying one step before [`upload`] gives up.
const STEP_LIMIT: Duration = Duration::from_secs(300);
/// How long one exchange, or one pack on a stream, may take before it counts as broken.
const IO_LIMIT: Duration = Duration::from_secs(120);

async fn pause(attempt: u32) {
    let ms = (50u64 << attempt.min(5)).min(2000);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// One owner's session: its connection to the storage node and its owner key.
struct Session {
    index: u32,
    local: PeerId,
    peer: PeerId,
    control: libp2p_stream::Control,
    driver: tokio::task::JoinHandle<()>,
    owner: OwnerId,
    key: ed25519_dalek::SigningKey,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl Session {
    /// Connects (trying again while the node refuses more connections) and proves the owner
    /// key (trying again while it answers `Busy`).
    async fn open(index: u32, target: &str, retries: &AtomicU64) -> Result<Self, NodeError> {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            let key = peer_key(index)?;
            let local = key.public().to_peer_id();
            let sk = owner_key(index);
            match connect_as(key, target).await {
                Ok((control, peer, driver)) => {
                    let mut s = Self {
                        index,
                        local,
                        peer,
                        control,
                        driver,
                        owner: OwnerId(sk.verifying_key().to_bytes()),
                        key: sk,
                    };
                    match s.prove().await {
                        Ok(()) => return Ok(s),
                        Err(e) if started.elapsed() > STEP_LIMIT => return Err(e),
                        Err(_) => {}
                    }
                }
                Err(e) if started.elapsed() > STEP_LIMIT => {
                    return Err(NodeError::Net(format!("load owner {index}: {e}")));
                }
                Err(_) => {}
            }
            retries.fetch_add(1, Ordering::Relaxed);
            pause(attempt).await;
            attempt += 1;
        }
    }

    async fn exchange(&mut self, req: &Request) -> Result<Response, NodeError> {
        tokio::time::timeout(
            IO_LIMIT,
            exchange_decoded(&mut self.control, self.peer, &msg::frame(req)),
        )
        .await
        .ok()
        .flatten()
        .ok_or_else(|| NodeError::Net(format!("load owner {}: no answer to {req:?}", self.index)))
    }

    async fn prove(&mut self) -> Result<(), NodeError> {
        let nonce = match self.exchange(&Request::Nonce).await? {
            Response::Nonce(n) => n,
            other => {
                return Err(NodeError::Net(format!(
                    "load owner {}: {other:?} to a nonce request",
                    self.index
                )));
            }
        };
        let payload = OwnerProof::payload(
            &self.owner,
            &nonce,
            &self.local.to_bytes(),
            &self.peer.to_bytes(),
        );
        let signature = ed25519_dalek::Signer::sign(
            &self.key,
            &obnam_protocol::signed::message(obnam_protocol::signed::CONTEXT_OWNER_PROOF, &payload),
        );
        let proof = Request::ProveOwner(OwnerProof {
            owner: self.owner,
            nonce,
            signature: signature.to_bytes().to_vec(),
        });
        match self.exchange(&proof).await? {
            Response::Ok => Ok(()),
            other => Err(NodeError::Net(format!(
                "load owner {}: {other:?} to its owner proof",
                self.index
            ))),
        }
    }

    /// Stores packs `0..packs` of `len` bytes (`filler` after a 16-byte header), on one pack
    /// stream, opening another when the node closed it.
    async fn store_packs(
        &mut self,
        packs: u32,
        filler: &[u8],
        retries: &AtomicU64,
    ) -> Result<u64, NodeError> {
        let mut stream: Option<libp2p::Stream> = None;
        let mut stored = 0u64;
        for p in 0..packs {
            let mut header = [0u8; 16];
            header[..4].copy_from_slice(&self.index.to_le_bytes());
            header[4..8].copy_from_slice(&p.to_le_bytes());
            let mut h = blake3::Hasher::new();
            h.update(&header);
            h.update(filler);
            let pack = PackId(*h.finalize().as_bytes());
            let len = (header.len() + filler.len()) as u64;
            let started = Instant::now();
            let mut attempt = 0;
            loop {
                let s = match stream.as_mut() {
                    Some(s) => s,
                    None => match self
                        .control
                        .open_stream(self.peer, StreamProtocol::new(msg::PACKS_PROTOCOL))
                        .await
                    {
                        Ok(s) => stream.insert(s),
                        Err(e) => {
                            if started.elapsed() > STEP_LIMIT {
                                return Err(NodeError::Net(format!(
                                    "load owner {}: opening a pack stream: {e}",
                                    self.index
                                )));
                            }
                            retries.fetch_add(1, Ordering::Relaxed);
                            pause(attempt).await;
                            attempt += 1;
                            continue;
                        }
                    },
                };
                let attempt_result =
                    tokio::time::timeout(IO_LIMIT, put(s, self.owner, pack, len, &header, filler))
                        .await
                        .unwrap_or_else(|_| Err(Attempt::Broken("timed out".into())));
                match attempt_result {
                    Ok(()) => {
                        stored += len;
                        break;
                    }
                    Err(Attempt::Refused(e)) => {
                        return Err(NodeError::Net(format!(
                            "load owner {}: pack {} refused: {:?}: {}",
                            self.index,
                            pack.short(),
                            e.code,
                            e.message
                        )));
                    }
                    Err(Attempt::Broken(e)) => {
                        // The node closed the stream (too many at once) or it broke: open
                        // another and send this pack again.
                        stream = None;
                        if started.elapsed() > STEP_LIMIT {
                            return Err(NodeError::Net(format!(
                                "load owner {}: pack {}: {e}",
                                self.index,
                                pack.short()
                            )));
                        }
                        retries.fetch_add(1, Ordering::Relaxed);
                        pause(attempt).await;
                        attempt += 1;
                    }
                }
            }
        }
        if let Some(mut s) = stream {
            let _ = s.close().await;
        }
        Ok(stored)
    }
}

enum Attempt {
    Refused(WireError),
    Broken(String),
}

/// One `Put` on an open pack stream: header, `Ready`, body, `Stored`.
async fn put(
    s: &mut libp2p::Stream,
    owner: OwnerId,
    pack: PackId,
    len: u64,
    header: &[u8],
    filler: &[u8],
) -> Result<(), Attempt> {
    let broken = |e: std::io::Error| Attempt::Broken(e.to_string());
    s.write_all(&msg::frame(&StreamRequest::Put { owner, pack, len }))
        .await
        .map_err(broken)?;
    s.flush().await.map_err(broken)?;
    match read_frame::<StreamReply>(s, msg::MAX_STREAM_HEADER).await {
        Ok(Some(StreamReply::Ready)) => {}
        Ok(Some(StreamReply::Stored { .. })) => return Ok(()),
        Ok(Some(StreamReply::Error(e))) if e.code == ErrorCode::Busy => {
            return Err(Attempt::Broken("busy".into()));
        }
        Ok(Some(StreamReply::Error(e))) => return Err(Attempt::Refused(e)),
        Ok(other) => return Err(Attempt::Broken(format!("{other:?} before the body"))),
        Err(e) => return Err(Attempt::Broken(e.to_string())),
    }
    s.write_all(header).await.map_err(broken)?;
    for part in filler.chunks(256 * 1024) {
        s.write_all(part).await.map_err(broken)?;
    }
    s.flush().await.map_err(broken)?;
    match read_frame::<StreamReply>(s, msg::MAX_STREAM_HEADER).await {
        Ok(Some(StreamReply::Stored { .. })) => Ok(()),
        Ok(Some(StreamReply::Error(e))) => Err(Attempt::Refused(e)),
        Ok(other) => Err(Attempt::Broken(format!("{other:?} after the body"))),
        Err(e) => Err(Attempt::Broken(e.to_string())),
    }
}

/// Binds load owners `owners` to the storage node at `target` (a multiaddr ending in
/// `/p2p/<peer id>`; each owner's peer id must be its friend), `parallel` at a time.
/// Returns the number of retries.
///
/// # Errors
/// When an owner cannot connect or prove its key within the step limit.
pub fn register(
    target: &str,
    owners: std::ops::Range<u32>,
    parallel: usize,
) -> Result<u64, NodeError> {
    super::runtime()?.block_on(async {
        let retries = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for i in owners {
            let (target, retries, gate) =
                (target.to_owned(), Arc::clone(&retries), Arc::clone(&gate));
            tasks.spawn(async move {
                let _permit = gate
                    .acquire_owned()
                    .await
                    .map_err(|e| NodeError::Net(e.to_string()))?;
                Session::open(i, &target, &retries).await.map(drop)
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.map_err(|e| NodeError::Net(e.to_string()))??;
        }
        Ok(retries.load(Ordering::Relaxed))
    })
}

/// Load owners `owners` (at most the node's 256 connections) connect to the storage node at
/// `target`, prove their keys, and then, all at once, each store `packs` packs of `pack_len`
/// bytes. The clock runs from the moment
/// the last owner is ready until the last pack is acknowledged.
///
/// # Errors
/// When a pack is refused, or an owner cannot get through within the step limit.
pub fn upload(
    target: &str,
    owners: std::ops::Range<u32>,
    packs: u32,
    pack_len: usize,
) -> Result<LoadReport, NodeError> {
    let count = owners.len() as u32;
    let mut filler = vec![0u8; pack_len.saturating_sub(16)];
    rand::fill(&mut filler[..]);
    let filler: Arc<[u8]> = filler.into();
    super::runtime()?.block_on(async {
        let retries = Arc::new(AtomicU64::new(0));
        let ready = Arc::new(tokio::sync::Barrier::new(owners.len() + 1));
        let mut tasks = tokio::task::JoinSet::new();
        for i in owners {
            let (target, retries, ready, filler) = (
                target.to_owned(),
                Arc::clone(&retries),
                Arc::clone(&ready),
                Arc::clone(&filler),
            );
            tasks.spawn(async move {
                let session = Session::open(i, &target, &retries).await;
                // Everyone waits at the barrier, even an owner that failed, so no one hangs.
                ready.wait().await;
                let mut session = session?;
                session.store_packs(packs, &filler, &retries).await
            });
        }
        ready.wait().await;
        let started = Instant::now();
        let mut bytes = 0u64;
        while let Some(done) = tasks.join_next().await {
            bytes += done.map_err(|e| NodeError::Net(e.to_string()))??;
        }
        Ok(LoadReport {
            owners: count,
            packs: u64::from(count) * u64::from(packs),
            bytes,
            secs: started.elapsed().as_secs_f64(),
            retries: retries.load(Ordering::Relaxed),
        })
    })
}
