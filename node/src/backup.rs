//! The backup engine.
//!
//! ```text
//! walker (this thread)          seal workers (N threads)        packer          writer        committer
//! read → FastCDC → keyed hash ─► zstd → XChaCha20-Poly1305 ──► pack builder ─► temp file ─► fsync, rename,
//!   dedup: index + pending        bounded channel               seal index,     in outbox/    index commit
//!   trees built post-order                                       pad, trailer   tmp/          (in batches)
//! ```
//!
//! Every stage is a thread, never an async task, and every channel is bounded: chunks travel in
//! batches (of at most 128 KiB and one chunk, or 16 chunks), at most `2 × workers` batches wait
//! for sealing, `2 × workers` sealed batches wait for the packer, and `2 × packs_in_flight`
//! windows of 1 MiB wait for the writer. A pack is never whole in memory:
//! the packer streams it into windows (hashing them for the pack id), the writer writes them to
//! a temporary file and, at the pack's end, hands it to the committer, which syncs it, renames
//! it to the id's name and indexes it (the packs waiting for it together: one index commit).
//! Memory does not depend on the size or number of files.
//!
//! Write order: pack file (durable) → index commit → (after the pipeline drained) snapshot and
//! head in one commit. A crash leaves no snapshot pointing at missing data; packs that were
//! written are reused by the next backup (committed ones through the index, uncommitted ones
//! adopted at start, see [`Repo::adopt_orphans`](crate::repo::Repo::adopt_orphans)).
//!
//! A file that cannot be read is reported through [`Events`] and skipped; the backup goes on.
//!
//! The file cache: each walked directory's [`DirCache`] record (in redb) says what the last
//! backup saw of its files. A file that [`DirCache::lookup`] finds unchanged, and whose chunks
//! are all still indexed, is not opened; its chunk list is reused.

use crate::chunker;
use crate::error::NodeError;
use crate::exclude::Excluder;
use crate::keys::Keys;
use crate::outbox::{PackWriter, Window};
use crate::pack::{PackBuilder, PackOut};
use crate::repo::{Repo, now_ns};
use crate::seal::{SEAL_PREFIX, SealedIn, seal_prefixed};
use obnam_protocol::control::{BackupReport, BackupRequest, Event, FileProblem, Progress};
use obnam_protocol::local::{CachedFile, DirCache, FileStat, PackRecord, dir_cache_key};
use obnam_protocol::pack::{MAX_PACK_CHUNKS, PACK_TARGET, PackIndexEntry};
use obnam_protocol::snapshot::{ChunkerParams, SnapshotRecord};
use obnam_protocol::tree::{Entry, EntryKind, Tree};
use obnam_protocol::{ChunkId, PackId, SnapshotId};
use serde_bytes::ByteBuf;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::Metadata;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where long work reports progress and problems. Implementations must not block for long.
pub trait Events: Send + Sync {
    /// Sends one event.
    fn send(&self, event: Event);
}

/// An [`Events`] that drops everything.
pub struct NoEvents;
impl Events for NoEvents {
    fn send(&self, _: Event) {}
}

struct Job {
    id: ChunkId,
    /// [`SEAL_PREFIX`] bytes of room, then the plaintext.
    data: Vec<u8>,
}

struct SealedChunk {
    id: ChunkId,
    sealed: Vec<u8>,
    plain_len: u64,
}

/// Chunks travel between the walker, the seal workers and the packer in batches of up to this
/// many bytes of plaintext, plus one chunk (or [`BATCH_CHUNKS`] chunks), not one by one: most
/// files are smaller than one chunk, and a hand-off per chunk cost two thread wake-ups, each a
/// cross-core interrupt on a virtual machine (a sixth of the seal workers' time was in the
/// kernel). The smallest chunk of a file larger than one chunk (128 KiB, the chunker's least)
/// fills a batch alone: only the chunks of small files are batched, and the chunks in flight
/// take no more memory than when they travelled one by one.
const BATCH_BYTES: usize = 128 * 1024;

/// The most chunks in one batch.
const BATCH_CHUNKS: usize = 16;

/// State shared by the pipeline's threads.
struct Shared {
    pending: Mutex<HashSet<ChunkId>>,
    abort: AtomicBool,
}

impl Shared {
    fn pending(&self) -> std::sync::MutexGuard<'_, HashSet<ChunkId>> {
        // A poisoned lock means a pipeline thread panicked; the set itself is still usable.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Normalises a backup path: absolute, without `.`/`..` or trailing slashes.
///
/// # Errors
/// [`NodeError::Usage`] for a relative path.
pub fn normalize(path: &Path) -> Result<PathBuf, NodeError> {
    if !path.is_absolute() {
        return Err(NodeError::Usage(format!(
            "path {} is not absolute",
            path.display()
        )));
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Runs one backup. Blocking: call from a blocking thread.
///
/// # Errors
/// A missing path, bad exclude rules, a full outbox, a disk or database failure. Unreadable
/// files are not errors: they are reported and counted in `failed_files`.
pub fn backup(
    repo: &Repo,
    req: &BackupRequest,
    events: &dyn Events,
) -> Result<BackupReport, NodeError> {
    let owner = repo.owner()?;
    let params = repo.chunker(&owner.keys)?;
    if !chunker::supported(&params) {
        return Err(NodeError::Usage(format!(
            "this obnam cannot use chunker parameters {params:?}"
        )));
    }
    if req.paths.is_empty() {
        return Err(NodeError::Usage(
            "nothing to back up: name at least one path".into(),
        ));
    }
    let mut roots = Vec::new();
    for p in &req.paths {
        let path = normalize(Path::new(std::ffi::OsStr::from_bytes(p)))?;
        if let Err(e) = std::fs::symlink_metadata(&path) {
            return Err(NodeError::Usage(format!(
                "cannot back up {}: {e}",
                path.display()
            )));
        }
        roots.push(path);
    }
    let files: Vec<PathBuf> = req
        .exclude_files
        .iter()
        .map(|f| PathBuf::from(std::ffi::OsStr::from_bytes(f)))
        .collect();
    let excluder = Excluder::new(
        &req.excludes,
        &files,
        req.exclude_caches,
        std::slice::from_ref(&repo.paths.data),
    )?;
    let keys = owner.keys;
    let started = now_ns();
    let outcome = with_pipeline(repo, &keys, params, |sink| {
        let mut walker = Walker {
            repo,
            sink,
            excluder: &excluder,
            events,
            one_file_system: req.one_file_system,
            force: req.force,
            cache_puts: Vec::new(),
            cache_drops: Vec::new(),
            cache_buffered: 0,
            cached_files: 0,
            hardlinks: HashMap::new(),
            next_group: 0,
            files: 0,
            dirs: 0,
            bytes: 0,
            problems: Vec::new(),
            last_progress: Instant::now(),
        };
        let walked = walker.run(&roots);
        walker.flush_cache();
        let root = walked?;
        let record = SnapshotRecord {
            time_ns: started,
            host: nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            paths: roots
                .iter()
                .map(|p| ByteBuf::from(p.as_os_str().as_bytes().to_vec()))
                .collect(),
            tags: req.tags.clone(),
            root,
            files: walker.files,
            dirs: walker.dirs,
            bytes: walker.bytes,
            failed_files: walker.problems.len() as u64,
            chunker: params,
        };
        Ok((
            record,
            walker.cached_files,
            std::mem::take(&mut walker.problems),
        ))
    })?;
    let ((record, cached_files, problems), new_bytes, stored_bytes, packs) = outcome;
    // The record travels sealed inside the signed head, not in a pack, so an unchanged backup
    // adds no pack. Its id is the keyed hash of its encoding.
    let id = SnapshotId::from(keys.chunk_id(&record.to_bytes()));
    let head_seq = repo.commit_snapshot(&keys, id, &record, Some(&packs))?;
    tracing::info!(snapshot = %id, files = record.files, bytes = record.bytes, new_bytes, stored_bytes, "backup done");
    Ok(BackupReport {
        snapshot: id,
        files: record.files,
        failed_files: record.failed_files,
        bytes: record.bytes,
        new_bytes,
        cached_files,
        stored_bytes,
        replicas: 0,
        problems,
        sent_bytes: 0,
        head_seq,
        pending: Vec::new(),
    })
}

/// Runs `body` with a [`Sink`] that feeds the pipeline (seal workers, packer, pack writer), then
/// closes the pipeline and waits until every pack is durable and indexed. Returns what `body`
/// returned, the plaintext bytes of new chunks, the sealed bytes written to the outbox, and
/// every pack that holds a chunk `body` put in the sink (found in the index, or written now),
/// sorted: the snapshot's pack set. The set holds 32 bytes per pack (4 MiB per TiB of packs).
///
/// # Errors
/// The first error of `body` or of a pipeline stage.
pub(crate) fn with_pipeline<T>(
    repo: &Repo,
    keys: &Keys,
    params: ChunkerParams,
    body: impl FnOnce(&mut Sink<'_>) -> Result<T, NodeError>,
) -> Result<(T, u64, u64, Vec<PackId>), NodeError> {
    let threads = repo.config.seal_threads();
    let in_flight = repo.config.packs_in_flight.max(1);
    let shared = Shared {
        pending: Mutex::new(HashSet::new()),
        abort: AtomicBool::new(false),
    };
    // Chunk buffers live only in the channels and the workers, and are reused. A pack is
    // never whole in memory: the packer copies each sealed chunk into 1 MiB windows, which
    // wait for the writer in a channel and come back to be filled again.
    let chunk_bufs = Recycler::new(2 * threads + 2);
    let windows = Windows {
        free: Mutex::new(Vec::new()),
        max: in_flight * WINDOWS_PER_PACK + 2,
    };
    std::thread::scope(|s| {
        // The channels live in this closure: if a thread cannot be started, returning drops
        // them, so the threads already started see their channel close and stop.
        let (job_tx, job_rx) = sync_channel::<Vec<Job>>(threads * 2);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (sealed_tx, sealed_rx) =
            sync_channel::<Result<Vec<SealedChunk>, NodeError>>(threads * 2);
        let (pack_tx, pack_rx) = sync_channel::<Piece>(in_flight * WINDOWS_PER_PACK);
        let spawn_failed = |e| NodeError::io("starting a backup pipeline thread", e);
        for _ in 0..threads {
            let rx = Arc::clone(&job_rx);
            let tx = sealed_tx.clone();
            let level = repo.config.zstd_level;
            let bufs = &chunk_bufs;
            std::thread::Builder::new()
                .name("obnam-seal".into())
                .spawn_scoped(s, move || seal_worker(keys, level, &rx, &tx, bufs))
                .map_err(spawn_failed)?;
        }
        drop(sealed_tx);
        // Only the workers hold the job receiver: when they all stop (because the packer or the
        // writer failed), the producer's next send fails instead of blocking forever.
        drop(job_rx);
        let shared = &shared;
        let chunks = &chunk_bufs;
        let windows = &windows;
        let packer = std::thread::Builder::new()
            .name("obnam-packer".into())
            .spawn_scoped(s, move || {
                packer(keys, sealed_rx, pack_tx, shared, chunks, windows)
            })
            .map_err(spawn_failed)?;
        // Finished packs hold no memory (a file and its index entries): enough may wait for
        // the committer that a slow sync (the disk is shared with the uploads to friends)
        // does not stall the stages before it.
        let (done_tx, done_rx) = sync_channel::<Finished>(MAX_COMMIT_BATCH);
        let writer = std::thread::Builder::new()
            .name("obnam-writer".into())
            .spawn_scoped(s, move || writer(repo, pack_rx, done_tx, shared, windows))
            .map_err(spawn_failed)?;
        let committer = std::thread::Builder::new()
            .name("obnam-commit".into())
            .spawn_scoped(s, move || committer(repo, done_rx, shared))
            .map_err(spawn_failed)?;
        let mut sink = Sink {
            repo,
            keys,
            chunker: chunker::Chunker::new(&params, keys.gear_seed()),
            jobs: Some(job_tx),
            batch: Vec::new(),
            batch_bytes: 0,
            shared,
            bufs: &chunk_bufs,
            new_bytes: 0,
            used: RefCell::new(HashSet::new()),
        };
        let produced = body(&mut sink).and_then(|out| sink.flush().map(|()| out));
        // Close the pipeline and wait for every pack to be durable and indexed.
        let new_bytes = sink.new_bytes;
        let used = sink.used.take();
        drop(sink);
        let packed = packer
            .join()
            .unwrap_or_else(|_| Err(NodeError::Key("the packer thread panicked".into())));
        let wrote = writer
            .join()
            .unwrap_or_else(|_| Err(NodeError::Key("the pack writer thread panicked".into())));
        let written = committer
            .join()
            .unwrap_or_else(|_| Err(NodeError::Key("the pack committer thread panicked".into())));
        match (produced, packed, wrote, written) {
            (_, Err(e), _, _) | (_, _, Err(e), _) | (_, _, _, Err(e)) => Err(e),
            (Err(e), _, _, _) => Err(e),
            (Ok(out), Ok(()), Ok(()), Ok((stored, written))) => {
                let mut packs: Vec<PackId> = used.into_iter().chain(written).collect();
                packs.sort_unstable();
                packs.dedup();
                Ok((out, new_bytes, stored, packs))
            }
        }
    })
}

/// Chunk buffers that a later stage of the pipeline hands back for an earlier one to fill
/// again: the seal workers give back the plaintext, the packer the sealed chunks. Fresh
/// buffers cost page faults; with the copies that sealing in place removed, faults and copies
/// were about a quarter of a backup's CPU time in profiles. At most `max` wait; more are freed. A buffer is reused only
/// for a request of at least half its capacity, so that a large buffer does not keep its pages
/// for a small chunk.
pub(crate) struct Recycler {
    bufs: Mutex<Vec<Vec<u8>>>,
    max: usize,
}

impl Recycler {
    fn new(max: usize) -> Self {
        Self {
            bufs: Mutex::new(Vec::with_capacity(max)),
            max,
        }
    }

    /// A buffer that waited and fits `capacity`, or a new one.
    fn take(&self, capacity: usize) -> Vec<u8> {
        let reused = self.bufs.lock().ok().and_then(|mut bufs| {
            let fits = |b: &Vec<u8>| b.capacity() >= capacity && b.capacity() / 2 <= capacity;
            let at = bufs.iter().position(fits)?;
            Some(bufs.swap_remove(at))
        });
        reused.unwrap_or_else(|| Vec::with_capacity(capacity))
    }

    /// Hands `buf` back (it is freed when `max` already wait).
    fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        if let Ok(mut bufs) = self.bufs.lock()
            && bufs.len() < self.max
        {
            bufs.push(buf);
        }
    }
}

/// [`Sink::known`], over the fields it needs (so that it can run while the chunker's buffer is
/// borrowed).
fn known(
    repo: &Repo,
    shared: &Shared,
    used: &RefCell<HashSet<PackId>>,
    id: &ChunkId,
) -> Result<bool, NodeError> {
    if shared.pending().contains(id) {
        return Ok(true);
    }
    match repo.store.chunk(id)? {
        Some(loc) => {
            used.borrow_mut().insert(loc.pack);
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Where producers put plaintext: chunks it, hashes, deduplicates (against the index and the
/// chunks on their way to disk) and hands new chunks to the seal workers.
pub(crate) struct Sink<'a> {
    repo: &'a Repo,
    keys: &'a Keys,
    chunker: chunker::Chunker,
    jobs: Option<SyncSender<Vec<Job>>>,
    /// New chunks not yet handed to the seal workers, and their bytes (see [`BATCH_BYTES`]).
    batch: Vec<Job>,
    batch_bytes: usize,
    shared: &'a Shared,
    bufs: &'a Recycler,
    new_bytes: u64,
    /// Packs of the indexed chunks asked about (see [`Sink::known`]).
    used: RefCell<HashSet<PackId>>,
}

impl Sink<'_> {
    /// Whether a chunk is indexed or on its way to disk. An indexed chunk's pack joins the
    /// packs this pipeline's output uses.
    pub(crate) fn known(&self, id: &ChunkId) -> Result<bool, NodeError> {
        known(self.repo, self.shared, &self.used, id)
    }

    /// Whether a pipeline stage failed.
    fn aborted(&self) -> bool {
        self.shared.abort.load(Ordering::Relaxed)
    }

    /// Hands a chunk that is not [`known`](Sink::known) to the seal workers (`data` as in
    /// [`Job::data`]).
    fn submit(&mut self, id: ChunkId, data: Vec<u8>) -> Result<(), NodeError> {
        self.shared.pending().insert(id);
        self.new_bytes += data.len().saturating_sub(SEAL_PREFIX) as u64;
        self.batch_bytes += data.len();
        self.batch.push(Job { id, data });
        if self.batch_bytes >= BATCH_BYTES || self.batch.len() >= BATCH_CHUNKS {
            self.flush()?;
        }
        Ok(())
    }

    /// Hands the chunks waiting in the batch to the seal workers.
    fn flush(&mut self) -> Result<(), NodeError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_CHUNKS));
        self.batch_bytes = 0;
        let jobs = self.jobs.as_ref().ok_or_else(aborted)?;
        jobs.send(batch).map_err(|_| aborted())
    }

    /// Chunks everything `reader` yields; returns the chunk ids and the byte count.
    pub(crate) fn ingest(
        &mut self,
        mut reader: impl Read,
    ) -> Result<(Vec<ChunkId>, u64), IngestError> {
        let mut ids = Vec::new();
        let mut size = 0u64;
        self.chunker.reset();
        loop {
            if self.aborted() {
                return Err(IngestError::Abort(aborted()));
            }
            let chunk = match self.chunker.next_chunk(&mut reader) {
                None => break,
                Some(Err(e)) => return Err(IngestError::Read(e)),
                Some(Ok(chunk)) => chunk,
            };
            let id = self.keys.chunk_id(chunk);
            size += chunk.len() as u64;
            if !known(self.repo, self.shared, &self.used, &id).map_err(IngestError::Abort)? {
                // Room in front for the envelope's header: an incompressible chunk is sealed
                // in this buffer, where it lies.
                let mut buf = self.bufs.take(SEAL_PREFIX + chunk.len() + 64);
                buf.resize(SEAL_PREFIX, 0);
                buf.extend_from_slice(chunk);
                self.submit(id, buf).map_err(IngestError::Abort)?;
            }
            ids.push(id);
        }
        Ok((ids, size))
    }

    /// Chunks an in-memory blob (a tree).
    pub(crate) fn ingest_blob(&mut self, bytes: &[u8]) -> Result<Vec<ChunkId>, NodeError> {
        match self.ingest(bytes) {
            Ok((ids, _)) => Ok(ids),
            Err(IngestError::Read(e)) => Err(NodeError::io("chunking a tree", e)),
            Err(IngestError::Abort(e)) => Err(e),
        }
    }
}

fn seal_worker(
    keys: &Keys,
    level: i32,
    rx: &Mutex<Receiver<Vec<Job>>>,
    tx: &SyncSender<Result<Vec<SealedChunk>, NodeError>>,
    bufs: &Recycler,
) {
    loop {
        let batch = {
            let Ok(guard) = rx.lock() else { return };
            guard.recv()
        };
        let Ok(batch) = batch else { return };
        let out = batch
            .into_iter()
            .map(|job| seal_job(keys, level, job, bufs))
            .collect();
        if tx.send(out).is_err() {
            return;
        }
    }
}

/// Seals one chunk; its plaintext buffer goes back to `bufs` (or carries the sealed chunk).
fn seal_job(keys: &Keys, level: i32, job: Job, bufs: &Recycler) -> Result<SealedChunk, NodeError> {
    let mut data = job.data;
    let plain_len = data.len().saturating_sub(SEAL_PREFIX) as u64;
    let mut spare = bufs.take(data.len() + 64);
    let out = seal_prefixed(keys, &job.id, &mut data, level, &mut spare).map(|into| {
        let sealed = match into {
            SealedIn::Buf => std::mem::replace(&mut data, spare),
            SealedIn::Out => spare,
        };
        SealedChunk {
            id: job.id,
            sealed,
            plain_len,
        }
    });
    bufs.give(data);
    out
}

/// Windows (of 1 MiB) that may wait for the pack writer, per `packs_in_flight`.
const WINDOWS_PER_PACK: usize = 2;

/// What the packer hands the pack writer.
enum Piece {
    /// The next window of the current pack.
    Data(Window),
    /// The current pack is complete: its id, length and chunks.
    End {
        id: PackId,
        len: u64,
        entries: Vec<PackIndexEntry>,
    },
}

/// Windows the writer hands back for the packer to fill again (a fresh window costs a page
/// fault per 4 KiB, as a fresh pack buffer did).
struct Windows {
    free: Mutex<Vec<Window>>,
    max: usize,
}

impl Windows {
    fn take(&self) -> Result<Window, NodeError> {
        let reused = self.free.lock().ok().and_then(|mut w| w.pop());
        match reused {
            Some(w) => Ok(w),
            None => Window::new().map_err(|e| NodeError::io("allocating a pack window", e)),
        }
    }

    fn give(&self, mut w: Window) {
        w.clear();
        if let Ok(mut free) = self.free.lock()
            && free.len() < self.max
        {
            free.push(w);
        }
    }
}

/// The packer's [`PackOut`]: fills windows, hashes each (the pack id is the hash of the whole
/// pack) and sends each full one to the writer.
struct Stream<'a> {
    window: Window,
    hasher: blake3::Hasher,
    tx: &'a SyncSender<Piece>,
    windows: &'a Windows,
}

impl<'a> Stream<'a> {
    fn new(tx: &'a SyncSender<Piece>, windows: &'a Windows) -> Result<Self, NodeError> {
        Ok(Self {
            window: windows.take()?,
            hasher: blake3::Hasher::new(),
            tx,
            windows,
        })
    }

    /// Sends the window if anything is in it.
    fn send(&mut self) -> Result<(), NodeError> {
        if self.window.bytes().is_empty() {
            return Ok(());
        }
        self.hasher.update(self.window.bytes());
        let full = std::mem::replace(&mut self.window, self.windows.take()?);
        self.tx.send(Piece::Data(full)).map_err(|_| aborted())
    }

    /// Sends what is left, then the pack's end.
    fn end(mut self, len: u64, entries: Vec<PackIndexEntry>) -> Result<(), NodeError> {
        self.send()?;
        let id = PackId::from(*self.hasher.finalize().as_bytes());
        self.windows.give(self.window);
        self.tx
            .send(Piece::End { id, len, entries })
            .map_err(|_| aborted())
    }
}

impl PackOut for Stream<'_> {
    fn put(&mut self, mut bytes: &[u8]) -> Result<(), NodeError> {
        while !bytes.is_empty() {
            let n = self.window.push(bytes);
            bytes = &bytes[n..];
            if self.window.is_full() {
                self.send()?;
            }
        }
        Ok(())
    }
}

fn packer(
    keys: &Keys,
    rx: Receiver<Result<Vec<SealedChunk>, NodeError>>,
    tx: SyncSender<Piece>,
    shared: &Shared,
    chunk_bufs: &Recycler,
    windows: &Windows,
) -> Result<(), NodeError> {
    let result = (|| {
        let finish = |b: PackBuilder<Stream<'_>>| {
            let (stream, len, entries) = b.finish_into(keys)?;
            stream.end(len, entries)
        };
        let mut builder = PackBuilder::to(Stream::new(&tx, windows)?);
        for batch in rx {
            for chunk in batch? {
                builder.add(chunk.id, &chunk.sealed, chunk.plain_len)?;
                chunk_bufs.give(chunk.sealed);
                if builder.len() >= PACK_TARGET || builder.count() >= MAX_PACK_CHUNKS {
                    let next = PackBuilder::to(Stream::new(&tx, windows)?);
                    finish(std::mem::replace(&mut builder, next))?;
                }
            }
        }
        if !builder.is_empty() {
            finish(builder)?;
        }
        Ok(())
    })();
    match result {
        // The writer stopped: it recorded its error and set the abort flag before it let go
        // of its end of the channel.
        Err(_) if shared.abort.load(Ordering::SeqCst) => Ok(()),
        Err(e) => {
            shared.abort.store(true, Ordering::SeqCst);
            Err(e)
        }
        Ok(()) => Ok(()),
    }
}

/// A pack the writer wrote to a temporary file, for the committer to make durable and index.
struct Finished {
    file: PackWriter,
    id: PackId,
    len: u64,
    entries: Vec<PackIndexEntry>,
}

/// Most packs the committer syncs and indexes together.
const MAX_COMMIT_BATCH: usize = 8;

/// Writes the packer's windows to temporary files in the outbox and hands each finished pack
/// to the committer. It does not wait for the syncs: while the committer waits for the disk,
/// the next pack's windows go on being written, so the stages before it do not stall once per
/// pack for as long as the syncs take (3-4 per pack, seconds over a large backup).
fn writer(
    repo: &Repo,
    rx: Receiver<Piece>,
    tx: SyncSender<Finished>,
    shared: &Shared,
    windows: &Windows,
) -> Result<(), NodeError> {
    let mut current: Option<PackWriter> = None;
    let result = (|| {
        let mut used = repo.store.outbox_usage()?.bytes;
        let max = repo.config.outbox_max_bytes;
        for piece in rx.iter() {
            let (id, need, entries) = match piece {
                Piece::Data(w) => {
                    let file = match &mut current {
                        Some(f) => f,
                        None => current.insert(repo.outbox.begin()?),
                    };
                    file.write_window(&w)
                        .map_err(|e| NodeError::io("writing a pack to the outbox", e))?;
                    windows.give(w);
                    continue;
                }
                Piece::End { id, len, entries } => (id, len, entries),
            };
            let file = current
                .take()
                .ok_or_else(|| NodeError::Key(format!("pack {id} ended before it began")))?;
            if file.len() != need || used + need > max {
                file.abandon();
                if used + need > max {
                    return Err(NodeError::OutboxFull { used, max, need });
                }
                return Err(NodeError::Key(format!(
                    "pack {id}: wrote a length other than its own"
                )));
            }
            used += need;
            let done = Finished {
                file,
                id,
                len: need,
                entries,
            };
            if let Err(std::sync::mpsc::SendError(done)) = tx.send(done) {
                // The committer stopped: it recorded its error and set the abort flag.
                done.file.abandon();
                return Err(aborted());
            }
        }
        Ok(())
    })();
    if let Some(file) = current.take() {
        file.abandon();
    }
    let result = match result {
        Err(_) if shared.abort.load(Ordering::SeqCst) => Ok(()),
        Err(e) => {
            shared.abort.store(true, Ordering::SeqCst);
            Err(e)
        }
        Ok(()) => Ok(()),
    };
    // Only now does the packer's next send fail (`rx` drops here), so it finds the abort flag.
    drop(rx);
    result
}

/// Makes the writer's packs durable (fsync, rename, directory fsync) and commits them to the
/// index, in order; the packs that are waiting when it is free go together (one directory
/// sync per directory and one index commit for all). Returns the sealed bytes and the packs.
fn committer(
    repo: &Repo,
    rx: Receiver<Finished>,
    shared: &Shared,
) -> Result<(u64, Vec<PackId>), NodeError> {
    let mut stored = 0u64;
    let mut written = Vec::new();
    let mut result = Ok(());
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_COMMIT_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        if let Err(e) = commit_batch(repo, shared, batch, &mut stored, &mut written) {
            result = Err(e);
            break;
        }
    }
    if result.is_err() {
        shared.abort.store(true, Ordering::SeqCst);
        // What the writer already handed over is not placed: the next start would remove it.
        for f in rx.try_iter() {
            f.file.abandon();
        }
    }
    // The writer's next send fails once `rx` drops here, so it finds the abort flag.
    drop(rx);
    result.map(|()| (stored, written))
}

fn commit_batch(
    repo: &Repo,
    shared: &Shared,
    batch: Vec<Finished>,
    stored: &mut u64,
    written: &mut Vec<PackId>,
) -> Result<(), NodeError> {
    let started = Instant::now();
    let mut files = Vec::with_capacity(batch.len());
    let mut rows = Vec::with_capacity(batch.len());
    for f in batch {
        let record = PackRecord {
            len: f.len,
            chunks: f.entries.len() as u32,
            created_ns: now_ns(),
            in_outbox: true,
        };
        let chunks = obnam_protocol::pack::chunk_locations(f.id, &f.entries);
        files.push((f.file, f.id));
        rows.push((f.id, record, chunks));
    }
    repo.outbox.place_all(files)?;
    repo.store
        .commit_packs(rows.iter().map(|(id, r, c)| (id, r, c.as_slice())))?;
    let mut pending = shared.pending();
    for (_, _, chunks) in &rows {
        for (c, _) in chunks {
            pending.remove(c);
        }
    }
    drop(pending);
    let rows_len = rows.len();
    for (id, record, chunks) in rows {
        *stored += record.len;
        written.push(id);
        tracing::debug!(pack = %id, bytes = record.len, chunks = chunks.len(), "pack written");
    }
    tracing::debug!(packs = rows_len, took = ?started.elapsed(), "packs committed");
    if let Some(remote) = repo.remote.get() {
        remote.packs_ready.notify_one();
    }
    // Freed chunk buffers and B-tree pages leave holes in malloc's arenas, which stay
    // resident; give their pages back once per batch.
    crate::daemon::release_free_memory();
    Ok(())
}

/// A directory's file-cache record as found, and as this backup rebuilds it.
struct DirCacheUpdate {
    old: Option<DirCache>,
    new: DirCache,
}

/// The file-cache key of an absolute path.
pub(crate) fn cache_key(path: &Path) -> Vec<u8> {
    dir_cache_key(path.components().filter_map(|c| match c {
        Component::Normal(n) => Some(n.as_bytes()),
        _ => None,
    }))
}

/// A directory on the way down to the backup roots.
#[derive(Default)]
struct Trie {
    target: bool,
    children: BTreeMap<Vec<u8>, Trie>,
}

pub(crate) enum IngestError {
    Read(std::io::Error),
    Abort(NodeError),
}

struct Walker<'a, 's> {
    repo: &'a Repo,
    sink: &'a mut Sink<'s>,
    excluder: &'a Excluder,
    events: &'a dyn Events,
    one_file_system: bool,
    force: bool,
    cache_puts: Vec<(Vec<u8>, DirCache)>,
    cache_drops: Vec<Vec<u8>>,
    cache_buffered: usize,
    cached_files: u64,
    hardlinks: HashMap<(u64, u64), (u64, Vec<ChunkId>)>,
    next_group: u64,
    files: u64,
    dirs: u64,
    bytes: u64,
    problems: Vec<FileProblem>,
    last_progress: Instant,
}

fn aborted() -> NodeError {
    NodeError::Io {
        context: "backup stopped".into(),
        source: std::io::Error::other("the pack writer failed"),
    }
}

impl Walker<'_, '_> {
    fn run(&mut self, roots: &[PathBuf]) -> Result<Vec<ChunkId>, NodeError> {
        let mut trie = Trie::default();
        for r in roots {
            let mut node = &mut trie;
            for c in r.components() {
                if let Component::Normal(n) = c {
                    node = node.children.entry(n.as_bytes().to_vec()).or_default();
                }
            }
            node.target = true;
        }
        let root = Path::new("/");
        if trie.target {
            let dev = std::fs::symlink_metadata(root)
                .map_err(|e| NodeError::io("reading /", e))?
                .dev();
            self.walk_dir(root, dev)?
                .ok_or_else(|| NodeError::Usage("cannot read /".into()))
        } else {
            self.virtual_dir(root, &trie)
        }
    }

    fn virtual_dir(&mut self, path: &Path, node: &Trie) -> Result<Vec<ChunkId>, NodeError> {
        let mut tree = Tree::default();
        for (name, child) in &node.children {
            let child_path = path.join(std::ffi::OsStr::from_bytes(name));
            if child.target {
                let meta = std::fs::symlink_metadata(&child_path).map_err(|e| {
                    NodeError::Usage(format!("cannot back up {}: {e}", child_path.display()))
                })?;
                if self.excluder.excludes(&child_path) {
                    continue;
                }
                // Roots below an unwalked directory are not cached: that directory's record
                // would list only the roots of this backup.
                if let Some(e) =
                    self.entry_for(&child_path, name.clone(), &meta, meta.dev(), None)?
                {
                    tree.entries.push(e);
                }
            } else {
                let meta = std::fs::metadata(&child_path)
                    .map_err(|e| NodeError::io(format!("reading {}", child_path.display()), e))?;
                let mut e = base_entry(name.clone(), EntryKind::Dir, &meta);
                e.content = self.virtual_dir(&child_path, child)?;
                self.dirs += 1;
                tree.entries.push(e);
            }
        }
        self.sink.ingest_blob(&tree.to_bytes())
    }

    fn problem(&mut self, path: &Path, error: impl std::fmt::Display) {
        let p = FileProblem {
            path: path.display().to_string(),
            error: error.to_string(),
        };
        tracing::warn!(path = %p.path, error = %p.error, "skipped");
        self.events
            .send(Event::Warning(format!("skipped {}: {}", p.path, p.error)));
        self.problems.push(p);
    }

    /// Reads a directory; `None` when it cannot be read (reported).
    fn walk_dir(&mut self, dir: &Path, root_dev: u64) -> Result<Option<Vec<ChunkId>>, NodeError> {
        let mut names: Vec<std::ffi::OsString> = match std::fs::read_dir(dir) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect(),
            Err(e) => {
                self.problem(dir, e);
                return Ok(None);
            }
        };
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let key = cache_key(dir);
        let old = if self.force {
            None
        } else {
            self.repo.store.dir_cache(&key)?
        };
        let mut cache = DirCacheUpdate {
            old,
            new: DirCache {
                stat_ns: now_ns(),
                ..DirCache::default()
            },
        };
        let mut tree = Tree::default();
        for name in names {
            if self.sink.aborted() {
                return Err(aborted());
            }
            let path = dir.join(&name);
            if self.excluder.excludes(&path) {
                continue;
            }
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    self.problem(&path, e);
                    continue;
                }
            };
            if let Some(e) = self.entry_for(
                &path,
                name.as_bytes().to_vec(),
                &meta,
                root_dev,
                Some(&mut cache),
            )? {
                tree.entries.push(e);
            }
        }
        self.save_cache(key, cache);
        self.sink.ingest_blob(&tree.to_bytes()).map(Some)
    }

    /// Queues a directory's new file-cache record if it changed, and the removal of the
    /// records of subdirectories that are gone.
    fn save_cache(&mut self, key: Vec<u8>, update: DirCacheUpdate) {
        let DirCacheUpdate { old, new } = update;
        if let Some(old) = &old {
            if !old.seeded && old.files == new.files && old.dirs == new.dirs {
                return;
            }
            for gone in old
                .dirs
                .iter()
                .filter(|d| new.dirs.binary_search(d).is_err())
            {
                let mut k = key.clone();
                k.push(0);
                k.extend_from_slice(gone);
                self.cache_drops.push(k);
            }
        }
        self.cache_buffered += new.files.len() + 1;
        self.cache_puts.push((key, new));
        if self.cache_buffered >= 65_536 {
            self.flush_cache();
        }
    }

    /// Writes the queued file-cache changes. The cache only saves work, so a failure is logged,
    /// not fatal.
    fn flush_cache(&mut self) {
        if self.cache_puts.is_empty() && self.cache_drops.is_empty() {
            return;
        }
        if let Err(e) = self
            .repo
            .store
            .write_dir_caches(&self.cache_puts, &self.cache_drops)
        {
            tracing::warn!(error = %e, "could not update the file cache");
        }
        self.cache_puts.clear();
        self.cache_drops.clear();
        self.cache_buffered = 0;
    }

    /// The cached chunks of a file, if the cache shows it unchanged and every chunk is still
    /// in the index (a record written by a backup that then failed may name chunks that never
    /// were committed).
    fn cached(
        &self,
        cache: Option<&DirCacheUpdate>,
        name: &[u8],
        stat: &FileStat,
    ) -> Result<Option<Vec<ChunkId>>, NodeError> {
        let Some(chunks) = cache
            .and_then(|c| c.old.as_ref())
            .and_then(|old| old.lookup(name, stat))
        else {
            return Ok(None);
        };
        for c in chunks {
            if !self.sink.known(c)? {
                return Ok(None);
            }
        }
        Ok(Some(chunks.to_vec()))
    }

    fn entry_for(
        &mut self,
        path: &Path,
        name: Vec<u8>,
        meta: &Metadata,
        root_dev: u64,
        mut cache: Option<&mut DirCacheUpdate>,
    ) -> Result<Option<Entry>, NodeError> {
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_file() {
            EntryKind::File
        } else if ft.is_symlink() {
            EntryKind::Symlink
        } else if ft.is_fifo() {
            EntryKind::Fifo
        } else if ft.is_char_device() {
            EntryKind::CharDevice
        } else if ft.is_block_device() {
            EntryKind::BlockDevice
        } else {
            EntryKind::Socket
        };
        let mut e = base_entry(name, kind, meta);
        match kind {
            EntryKind::Dir => {
                if self.excluder.is_excluded_cache(path) {
                    return Ok(None);
                }
                if self.one_file_system && meta.dev() != root_dev {
                    // A mount point: kept as an empty directory, as restic and borg do.
                    e.content = self.sink.ingest_blob(&Tree::default().to_bytes())?;
                } else {
                    match self.walk_dir(path, root_dev)? {
                        Some(c) => e.content = c,
                        None => return Ok(None),
                    }
                    if let Some(c) = cache.as_deref_mut() {
                        c.new.dirs.push(serde_bytes::ByteBuf::from(e.name.clone()));
                    }
                }
                self.dirs += 1;
            }
            EntryKind::File => {
                let key = (meta.dev(), meta.ino());
                if meta.nlink() > 1
                    && let Some((group, content)) = self.hardlinks.get(&key)
                {
                    e.hardlink = Some(*group);
                    e.content = content.clone();
                    self.files += 1;
                    return Ok(Some(e));
                }
                let stat = FileStat {
                    dev: meta.dev(),
                    ino: meta.ino(),
                    size: meta.len(),
                    mtime_ns: e.mtime_ns,
                    ctime_ns: meta
                        .ctime()
                        .saturating_mul(1_000_000_000)
                        .saturating_add(meta.ctime_nsec()),
                };
                if let Some(chunks) = self.cached(cache.as_deref(), &e.name, &stat)? {
                    e.content = chunks;
                    e.size = stat.size;
                    self.cached_files += 1;
                } else {
                    self.progress(path);
                    if !self.read_file(path, &mut e)? {
                        return Ok(None);
                    }
                }
                if let Some(c) = cache
                    && e.size == stat.size
                {
                    c.new.files.push(CachedFile {
                        name: e.name.clone(),
                        dev: stat.dev,
                        ino: stat.ino,
                        size: stat.size,
                        mtime_ns: stat.mtime_ns,
                        ctime_ns: stat.ctime_ns,
                        chunks: e.content.clone(),
                    });
                }
                self.files += 1;
                self.bytes += e.size;
                if meta.nlink() > 1 {
                    let group = self.next_group;
                    self.next_group += 1;
                    e.hardlink = Some(group);
                    self.hardlinks.insert(key, (group, e.content.clone()));
                }
            }
            EntryKind::Symlink => match std::fs::read_link(path) {
                Ok(t) => e.target = t.as_os_str().as_bytes().to_vec(),
                Err(err) => {
                    self.problem(path, err);
                    return Ok(None);
                }
            },
            EntryKind::CharDevice | EntryKind::BlockDevice => e.rdev = meta.rdev(),
            EntryKind::Fifo | EntryKind::Socket => {}
        }
        Ok(Some(e))
    }

    /// Reads and chunks a regular file into `e`. `false` when it could not be read (reported).
    fn read_file(&mut self, path: &Path, e: &mut Entry) -> Result<bool, NodeError> {
        // O_NOFOLLOW and O_NONBLOCK: if the file was swapped for a symlink or a FIFO since we
        // looked, opening fails or does not block; then check it is still a file.
        use std::os::unix::fs::OpenOptionsExt;
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(path)
            .and_then(|f| {
                if f.metadata()?.is_file() {
                    Ok(f)
                } else {
                    Err(std::io::Error::other(
                        "it changed into something other than a regular file during the backup",
                    ))
                }
            });
        let file = match opened {
            Ok(f) => f,
            Err(err) => {
                self.problem(path, err);
                return Ok(false);
            }
        };
        match self.sink.ingest(file) {
            Ok((content, size)) => {
                e.content = content;
                e.size = size;
                Ok(true)
            }
            Err(IngestError::Read(err)) => {
                self.problem(path, err);
                Ok(false)
            }
            Err(IngestError::Abort(err)) => Err(err),
        }
    }

    fn progress(&mut self, path: &Path) {
        if self.last_progress.elapsed() >= Duration::from_millis(200) {
            self.last_progress = Instant::now();
            self.events.send(Event::Progress(Progress {
                files: self.files,
                bytes: self.bytes,
                total_files: None,
                total_bytes: None,
                current: path.display().to_string(),
            }));
        }
    }
}

fn base_entry(name: Vec<u8>, kind: EntryKind, meta: &Metadata) -> Entry {
    let mut e = Entry::new(name, kind);
    e.mode = meta.mode() & 0o7777;
    e.uid = meta.uid();
    e.gid = meta.gid();
    e.mtime_ns = meta
        .mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec());
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized() {
        assert_eq!(
            normalize(Path::new("/a/./b/../c/")).unwrap(),
            PathBuf::from("/a/c")
        );
        assert_eq!(normalize(Path::new("/")).unwrap(), PathBuf::from("/"));
        assert!(normalize(Path::new("a")).is_err());
    }
}
