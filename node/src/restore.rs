//! Restore and listing.
//!
//! Files land at `<target>/<original absolute path>`, as with restic. Contents are written to a
//! temporary name beside the final one and renamed into place only after every chunk of the file
//! opened and verified, so nothing is ever written from unauthenticated data. Metadata follows:
//! owner (when root), mode, then mtime; directories get theirs after their children.
//! A file that fails is reported with its path and the pack at fault; the restore goes on.

use crate::backup::{Events, normalize};
use crate::error::NodeError;
use crate::keys::Keys;
use crate::repo::Repo;
use obnam_protocol::control::{
    Event, FileProblem, LsEntry, LsRequest, Progress, RestoreReport, RestoreRequest,
};
use obnam_protocol::tree::{Entry, EntryKind};
use obnam_protocol::{ChunkId, SnapshotId};
use serde_bytes::ByteBuf;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Splits an absolute path into its components as bytes.
fn components(path: &Path) -> Vec<Vec<u8>> {
    path.components()
        .filter_map(|c| {
            if let Component::Normal(n) = c {
                Some(n.as_bytes().to_vec())
            } else {
                None
            }
        })
        .collect()
}

/// Finds the entry at `path` (absolute, original) in the tree of a snapshot.
fn lookup(
    repo: &Repo,
    keys: &Keys,
    root: &[ChunkId],
    path: &Path,
) -> Result<Option<Entry>, NodeError> {
    let parts = components(path);
    let mut content = root.to_vec();
    let mut found = None;
    for (i, part) in parts.iter().enumerate() {
        let tree = repo.read_tree(keys, &content)?;
        let Some(e) = tree.entries.into_iter().find(|e| &e.name == part) else {
            return Ok(None);
        };
        if i + 1 < parts.len() && e.kind != EntryKind::Dir {
            return Ok(None);
        }
        content = e.content.clone();
        found = Some(e);
    }
    Ok(found)
}

/// Lists a snapshot's entries (below `req.path`, or all), sending each as [`Event::Entry`].
///
/// # Errors
/// [`NodeError::NoSuchSnapshot`], [`NodeError::NoSuchPath`], or read errors.
pub fn ls(
    repo: &Repo,
    req: &LsRequest,
    events: &dyn Events,
) -> Result<(SnapshotId, u64), NodeError> {
    let repo = &repo.with_private_cache();
    let owner = repo.owner()?;
    let keys = &owner.keys;
    let (id, record) = repo.resolve_snapshot(&req.snapshot)?;
    let mut count = 0u64;
    let mut emit = |path: &Path, e: &Entry| {
        count += 1;
        events.send(Event::Entry(LsEntry {
            path: ByteBuf::from(path.as_os_str().as_bytes().to_vec()),
            kind: e.kind,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            size: e.size,
            mtime_ns: e.mtime_ns,
            target: ByteBuf::from(e.target.clone()),
        }));
    };
    match &req.path {
        None => walk(repo, keys, &record.root, Path::new("/"), &mut emit)?,
        Some(p) => {
            let path = normalize(Path::new(OsStr::from_bytes(p)))?;
            if path == Path::new("/") {
                walk(repo, keys, &record.root, &path, &mut emit)?;
            } else {
                let Some(e) = lookup(repo, keys, &record.root, &path)? else {
                    return Err(NodeError::NoSuchPath(format!(
                        "{} is not in snapshot {}",
                        path.display(),
                        id.short()
                    )));
                };
                emit(&path, &e);
                if e.kind == EntryKind::Dir {
                    walk(repo, keys, &e.content, &path, &mut emit)?;
                }
            }
        }
    }
    repo.clear_cache();
    Ok((id, count))
}

fn walk(
    repo: &Repo,
    keys: &Keys,
    tree: &[ChunkId],
    dir: &Path,
    emit: &mut dyn FnMut(&Path, &Entry),
) -> Result<(), NodeError> {
    for e in repo.read_tree(keys, tree)?.entries {
        let path = dir.join(OsStr::from_bytes(&e.name));
        emit(&path, &e);
        if e.kind == EntryKind::Dir {
            walk(repo, keys, &e.content, &path, emit)?;
        }
    }
    Ok(())
}

/// Restores a snapshot (or some of its paths) under `req.target`.
///
/// # Errors
/// Unknown snapshot or path, a non-empty target without `force`, or an unusable target.
/// Failures of single files are in the report's `problems`.
pub fn restore(
    repo: &Repo,
    req: &RestoreRequest,
    events: &dyn Events,
) -> Result<RestoreReport, NodeError> {
    let repo = &repo.with_private_cache();
    let owner = repo.owner()?;
    let keys = &owner.keys;
    let (id, record) = repo.resolve_snapshot(&req.snapshot)?;
    let target = normalize(Path::new(OsStr::from_bytes(&req.target)))?;
    let mut filters = Vec::new();
    for p in &req.paths {
        let path = normalize(Path::new(OsStr::from_bytes(p)))?;
        if path != Path::new("/") && lookup(repo, keys, &record.root, &path)?.is_none() {
            return Err(NodeError::NoSuchPath(format!(
                "{} is not in snapshot {}",
                path.display(),
                id.short()
            )));
        }
        filters.push(components(&path));
    }
    let fresh = match std::fs::read_dir(&target) {
        Ok(mut rd) => {
            let empty = rd.next().is_none();
            if !empty && !req.force {
                return Err(NodeError::TargetNotEmpty { path: target });
            }
            empty
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&target).map_err(|e| {
                NodeError::io(format!("creating restore target {}", target.display()), e)
            })?;
            true
        }
        Err(e) => {
            return Err(NodeError::io(
                format!("opening restore target {}", target.display()),
                e,
            ));
        }
    };
    let how = How {
        is_root: nix::unistd::geteuid().is_root(),
        fresh,
    };
    // Files are written by a pool of threads (opening, decompressing and checking chunks is
    // CPU work), out of order; directories get their metadata once their files are done.
    let threads = repo.config.seal_threads();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let started = Instant::now();
    let fetched_in = Mutex::new(None);
    let (report, result) = std::thread::scope(|s| {
        // Packs come from friends, several at a time, in that order, while the files are
        // written: a writer that needs a pack being fetched waits for that fetch. When the walk
        // ends, fails or panics, the prefetch stops.
        let stop = &stop;
        let fetched_in = &fetched_in;
        let _stop_on_exit = StopOnDrop(stop);
        // The packs of the selected files, in the order the walk below needs them, found by a
        // walk of the trees ahead of the one that writes (its tree reads fetch the packs that
        // hold trees; the writing walk then finds them here).
        let (pack_tx, pack_rx) = tokio::sync::mpsc::unbounded_channel();
        let plan_filters = filters.clone();
        let root = &record.root;
        s.spawn(move || {
            let mut send = |p| pack_tx.send(p).is_ok();
            collect(
                repo,
                keys,
                &plan_filters,
                root,
                &mut Vec::new(),
                &mut send,
                &mut std::collections::HashSet::new(),
                stop,
            );
        });
        s.spawn(move || {
            if let Err(e) = repo.prefetch(keys, pack_rx, stop) {
                tracing::warn!(error = %e.full_message(), "prefetch incomplete; affected files will be reported");
            }
            if let Ok(mut t) = fetched_in.lock() {
                *t = Some(started.elapsed());
            }
        });
        // Each job holds its file open: at most (2 × threads + 2) × BATCH_FILES files are.
        let (job_tx, job_rx) = sync_channel::<Vec<FileJob>>(threads * 2);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = std::sync::mpsc::channel::<Vec<FileDone>>();
        for _ in 0..threads {
            let rx = Arc::clone(&job_rx);
            let tx = done_tx.clone();
            s.spawn(move || file_worker(repo, keys, how, &rx, &tx));
        }
        drop(done_tx);
        let mut r = Restorer::new(
            repo,
            keys,
            events,
            filters,
            id,
            how,
            Some((job_tx, done_rx)),
        );
        let mut result = r.restore_dir(&record.root, &target, &mut Vec::new());
        r.flush_dirs();
        r.pool = None;
        let written_in = started.elapsed();
        // Every pack the walk needed has been read; after a failure, fetch no more.
        stop.store(true, Ordering::Relaxed);
        if result.is_ok() {
            // The fetched packs go first, so the sync does not write them out too (when the
            // node's data directory shares the target's file system).
            repo.clear_cache();
            // One sync for the whole restore instead of one per file.
            result = std::fs::File::open(&target)
                .and_then(|d| nix::unistd::syncfs(&d).map_err(std::io::Error::from))
                .map_err(|e| NodeError::io(format!("syncing {}", target.display()), e));
        }
        tracing::info!(
            files = r.report.files,
            bytes = r.report.bytes,
            packs_fetched_s = fetched_in
                .lock()
                .ok()
                .and_then(|t| *t)
                .map(|t| t.as_secs_f64()),
            written_s = written_in.as_secs_f64(),
            synced_s = started.elapsed().as_secs_f64(),
            "restore done"
        );
        (r.report, result)
    });
    for w in repo.take_warnings() {
        events.send(Event::Warning(w));
    }
    repo.clear_cache();
    result?;
    Ok(report)
}

/// Sets the flag when dropped.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// How entries are written.
#[derive(Clone, Copy)]
struct How {
    /// Owners and device nodes are restored only by root.
    is_root: bool,
    /// The target was empty (or did not exist) when the restore began, so nothing is in the
    /// way: files are created under their own names, exclusively, and nothing is replaced.
    /// Otherwise (`--force` into a non-empty target) each file is written under a temporary
    /// name and renamed into place, and whatever is in the way of an entry is removed first.
    fresh: bool,
}

/// A file for the pool to write.
struct FileJob {
    entry: Entry,
    path: PathBuf,
    /// The file, already created (in a fresh target the walk creates the files, one at a
    /// time: threads creating files in one directory only contend for its lock).
    created: Option<Created>,
}

/// What the pool did with a [`FileJob`].
struct FileDone {
    path: PathBuf,
    size: u64,
    result: Result<(), NodeError>,
}

/// Directories whose metadata waits until their files are written; at most this many wait.
const PENDING_DIRS: usize = 4096;

fn file_worker(
    repo: &Repo,
    keys: &Keys,
    how: How,
    rx: &Mutex<Receiver<Vec<FileJob>>>,
    tx: &std::sync::mpsc::Sender<Vec<FileDone>>,
) {
    loop {
        let jobs = {
            let Ok(guard) = rx.lock() else { return };
            guard.recv()
        };
        let Ok(jobs) = jobs else { return };
        let done = jobs
            .into_iter()
            .map(|job| {
                let result = match job.created {
                    Some(c) => fill_file(repo, keys, how, &job.entry, &job.path, c),
                    None => write_file(repo, keys, how, &job.entry, &job.path),
                };
                FileDone {
                    path: job.path,
                    size: job.entry.size,
                    result,
                }
            })
            .collect();
        if tx.send(done).is_err() {
            return;
        }
    }
}

/// Files of at least this size are handed to the disk as soon as they are written.
const WRITE_BACK_EARLY: u64 = 1 << 20;

/// Small files go to the pool in batches of up to this many files…
const BATCH_FILES: usize = 32;
/// …or this many bytes: one hand-over (and one wake-up of a writer) per batch, not per file.
const BATCH_BYTES: u64 = 1 << 20;

type Pool = (SyncSender<Vec<FileJob>>, Receiver<Vec<FileDone>>);

struct Restorer<'a> {
    repo: &'a Repo,
    keys: &'a Keys,
    events: &'a dyn Events,
    filters: Vec<Vec<Vec<u8>>>,
    how: How,
    links: HashMap<u64, PathBuf>,
    report: RestoreReport,
    last_progress: Instant,
    /// The file-writing pool; without it, files are written on this thread.
    pool: Option<Pool>,
    /// Jobs sent to the pool and not yet reported done.
    outstanding: usize,
    /// Files not yet handed to the pool, and their bytes.
    batch: Vec<FileJob>,
    batch_bytes: u64,
    /// Directories (children first) whose metadata waits for their files.
    pending_dirs: Vec<(PathBuf, Entry)>,
}

enum Selection {
    All,
    Partly,
    No,
}

impl<'a> Restorer<'a> {
    fn new(
        repo: &'a Repo,
        keys: &'a Keys,
        events: &'a dyn Events,
        filters: Vec<Vec<Vec<u8>>>,
        snapshot: SnapshotId,
        how: How,
        pool: Option<Pool>,
    ) -> Self {
        Self {
            repo,
            keys,
            events,
            filters,
            how,
            links: HashMap::new(),
            report: RestoreReport {
                snapshot,
                files: 0,
                dirs: 0,
                others: 0,
                bytes: 0,
                problems: Vec::new(),
            },
            last_progress: Instant::now(),
            pool,
            outstanding: 0,
            batch: Vec::new(),
            batch_bytes: 0,
            pending_dirs: Vec::new(),
        }
    }

    /// Counts a file the pool finished, or reports its failure.
    fn file_done(&mut self, done: Vec<FileDone>) {
        for done in done {
            self.outstanding -= 1;
            match done.result {
                Ok(()) => {
                    self.report.files += 1;
                    self.report.bytes += done.size;
                    self.progress(&done.path);
                }
                Err(e) => self.problem(&done.path, e.full_message()),
            }
        }
    }

    /// Hands the files batched so far to the pool.
    fn send_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let n = batch.len();
        let unsent = match self.pool.as_ref() {
            Some((tx, _)) => tx.send(batch).err().map(|e| e.0),
            None => Some(batch),
        };
        match unsent {
            None => self.outstanding += n,
            Some(jobs) => {
                for job in jobs {
                    // The created file would stay empty: remove it.
                    if let Some(c) = job.created {
                        let _ = std::fs::remove_file(&c.dest);
                    }
                    self.problem(&job.path, "the restore's file writers stopped");
                }
            }
        }
    }

    /// Waits until the pool has written every file sent so far.
    fn drain(&mut self) {
        self.send_batch();
        while self.outstanding > 0 {
            let Some(done) = self.pool.as_ref().and_then(|(_, rx)| rx.recv().ok()) else {
                // The pool is gone (it cannot be, while we hold its sender).
                self.outstanding = 0;
                return;
            };
            self.file_done(done);
        }
    }

    /// Writes every file sent so far, then gives the waiting directories their metadata.
    fn flush_dirs(&mut self) {
        self.drain();
        for (path, e) in std::mem::take(&mut self.pending_dirs) {
            if let Err(err) = set_meta(self.how.is_root, &path, &e) {
                self.problem(&path, err);
            }
        }
    }

    /// Writes a regular file: on the pool when there is one, else here.
    fn submit_file(&mut self, e: &Entry, path: &Path) -> Result<(), NodeError> {
        // Hard-linked files are written here, so that later links find them.
        if self.pool.is_none() || e.hardlink.is_some() {
            write_file(self.repo, self.keys, self.how, e, path)?;
            self.report.files += 1;
            self.report.bytes += e.size;
            if let Some(group) = e.hardlink {
                self.links.insert(group, path.to_owned());
            }
            return Ok(());
        }
        let created = if self.how.fresh {
            Some(create_file(self.how, path)?)
        } else {
            None
        };
        self.batch.push(FileJob {
            entry: e.clone(),
            path: path.to_owned(),
            created,
        });
        self.batch_bytes += e.size;
        if self.batch.len() >= BATCH_FILES || self.batch_bytes >= BATCH_BYTES {
            self.send_batch();
        }
        // Take what is done, without waiting.
        while let Some(done) = self.pool.as_ref().and_then(|(_, rx)| rx.try_recv().ok()) {
            self.file_done(done);
        }
        Ok(())
    }

    fn select(&self, parts: &[Vec<u8>]) -> Selection {
        select(&self.filters, parts)
    }

    fn problem(&mut self, path: &Path, err: impl std::fmt::Display) {
        let p = FileProblem {
            path: path.display().to_string(),
            error: err.to_string(),
        };
        tracing::warn!(path = %p.path, error = %p.error, "not restored");
        self.events.send(Event::Warning(format!(
            "could not restore {}: {}",
            p.path, p.error
        )));
        self.report.problems.push(p);
    }

    fn restore_dir(
        &mut self,
        tree: &[ChunkId],
        dest: &Path,
        parts: &mut Vec<Vec<u8>>,
    ) -> Result<(), NodeError> {
        let tree = match self.repo.read_tree(self.keys, tree) {
            Ok(t) => t,
            Err(e) => {
                self.problem(dest, e.full_message());
                return Ok(());
            }
        };
        for e in tree.entries {
            parts.push(e.name.clone());
            let sel = self.select(parts);
            let path = dest.join(OsStr::from_bytes(&e.name));
            match sel {
                Selection::No => {}
                Selection::Partly | Selection::All if e.kind == EntryKind::Dir => {
                    // Owner-only access while we fill it in; the real mode comes after the children.
                    if let Err(err) = make_real_dir(self.how.fresh, &path) {
                        self.problem(&path, err);
                        parts.pop();
                        continue;
                    }
                    self.restore_dir(&e.content, &path, parts)?;
                    self.report.dirs += 1;
                    self.pending_dirs.push((path, e));
                    if self.pending_dirs.len() >= PENDING_DIRS {
                        self.flush_dirs();
                    }
                }
                Selection::Partly => {}
                Selection::All => {
                    if let Err(err) = self.restore_entry(&e, &path) {
                        self.problem(&path, err.full_message());
                    }
                }
            }
            parts.pop();
        }
        Ok(())
    }

    fn restore_entry(&mut self, e: &Entry, path: &Path) -> Result<(), NodeError> {
        let io = |what: &str, err: std::io::Error| {
            NodeError::io(format!("{what} {}", path.display()), err)
        };
        if let Some(group) = e.hardlink
            && let Some(first) = self.links.get(&group).cloned()
        {
            self.clear(path)?;
            std::fs::hard_link(&first, path).map_err(|err| io("linking", err))?;
            self.report.files += 1;
            return Ok(());
        }
        match e.kind {
            EntryKind::File => return self.submit_file(e, path),
            EntryKind::Symlink => {
                self.clear(path)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&e.target), path)
                    .map_err(|err| io("creating symlink", err))?;
            }
            EntryKind::Fifo => {
                self.clear(path)?;
                nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .map_err(|err| io("creating FIFO", err.into()))?;
            }
            EntryKind::CharDevice | EntryKind::BlockDevice => {
                if !self.how.is_root {
                    return Err(NodeError::Usage(format!(
                        "{}: device nodes can only be restored by root",
                        path.display()
                    )));
                }
                self.clear(path)?;
                let kind = if e.kind == EntryKind::CharDevice {
                    nix::sys::stat::SFlag::S_IFCHR
                } else {
                    nix::sys::stat::SFlag::S_IFBLK
                };
                nix::sys::stat::mknod(
                    path,
                    kind,
                    nix::sys::stat::Mode::from_bits_truncate(0o600),
                    e.rdev,
                )
                .map_err(|err| io("creating device", err.into()))?;
            }
            EntryKind::Socket => {
                // Sockets belong to running programs; there is nothing to restore.
                return Ok(());
            }
            EntryKind::Dir => return Err(NodeError::Usage("directory restored as a file".into())),
        }
        self.report.others += 1;
        set_meta(self.how.is_root, path, e).map_err(|err| io("setting metadata of", err))
    }

    /// Removes whatever is in the way of `path`; in a fresh target nothing can be.
    fn clear(&self, path: &Path) -> Result<(), NodeError> {
        if self.how.fresh {
            return Ok(());
        }
        remove_existing(path)
            .map_err(|err| NodeError::io(format!("replacing {}", path.display()), err))
    }

    fn progress(&mut self, path: &Path) {
        if self.last_progress.elapsed() >= Duration::from_millis(200) {
            self.last_progress = Instant::now();
            self.events.send(Event::Progress(Progress {
                files: self.report.files,
                bytes: self.report.bytes,
                total_files: None,
                total_bytes: None,
                current: path.display().to_string(),
            }));
        }
    }
}

/// Whether the entry at `parts` is selected by `filters` (paths as components; none selects
/// everything), or only some of its children are.
fn select(filters: &[Vec<Vec<u8>>], parts: &[Vec<u8>]) -> Selection {
    if filters.is_empty() {
        return Selection::All;
    }
    let mut partly = false;
    for f in filters {
        if parts.len() >= f.len() && parts[..f.len()] == f[..] {
            return Selection::All;
        }
        if f.len() > parts.len() && f[..parts.len()] == parts[..] {
            partly = true;
        }
    }
    if partly {
        Selection::Partly
    } else {
        Selection::No
    }
}

/// Sends each pack holding the selected files' data to `out`, once, in the order a walk of the
/// trees meets them (trees are read, and fetched, on the way). Ends early when `stop` is set
/// or `out` returns false.
#[allow(clippy::too_many_arguments)]
fn collect(
    repo: &Repo,
    keys: &Keys,
    filters: &[Vec<Vec<u8>>],
    tree: &[ChunkId],
    parts: &mut Vec<Vec<u8>>,
    out: &mut dyn FnMut(obnam_protocol::PackId) -> bool,
    seen: &mut std::collections::HashSet<obnam_protocol::PackId>,
    stop: &std::sync::atomic::AtomicBool,
) -> bool {
    let Ok(tree) = repo.read_tree(keys, tree) else {
        return true;
    };
    for e in tree.entries {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        parts.push(e.name.clone());
        let go_on = match (select(filters, parts), e.kind) {
            (Selection::No, _) => true,
            (_, EntryKind::Dir) => collect(repo, keys, filters, &e.content, parts, out, seen, stop),
            (Selection::All, EntryKind::File) => {
                e.content.iter().all(|c| match repo.store.chunk(c) {
                    Ok(Some(loc)) if seen.insert(loc.pack) => out(loc.pack),
                    _ => true,
                })
            }
            _ => true,
        };
        parts.pop();
        if !go_on {
            return false;
        }
    }
    true
}

/// A regular file being restored: created, empty, under `dest`.
struct Created {
    file: std::fs::File,
    dest: PathBuf,
}

/// Writes one regular file: [`create_file`], then [`fill_file`].
fn write_file(repo: &Repo, keys: &Keys, how: How, e: &Entry, path: &Path) -> Result<(), NodeError> {
    let created = create_file(how, path)?;
    fill_file(repo, keys, how, e, path, created)
}

/// Creates the file that will become `path`, exclusively and without following links. In a
/// fresh target that is `path` itself (nothing can be in the way, and nothing is replaced);
/// otherwise a temporary name beside it, renamed into place by [`fill_file`].
fn create_file(how: How, path: &Path) -> Result<Created, NodeError> {
    let dest = if how.fresh {
        path.to_owned()
    } else {
        // A random temporary name, created exclusively: it cannot collide with (and so never
        // removes) a name in the snapshot.
        let mut tag = [0u8; 12];
        rand::fill(&mut tag[..]);
        let tmp_name = format!(
            ".obnam-restore-{}",
            tag.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let tmp = path.with_file_name(tmp_name);
        // A leftover temporary file (or a link planted in its place) is removed, never followed.
        remove_existing(&tmp)
            .map_err(|err| NodeError::io(format!("replacing {}", tmp.display()), err))?;
        tmp
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&dest)
        .map_err(|err| NodeError::io(format!("creating {}", path.display()), err))?;
    Ok(Created { file, dest })
}

/// Writes a created file's data (every chunk opened and verified) and metadata, through the
/// open file, then renames it into place if it has a temporary name. On failure the file is
/// removed. Not synced: the restore syncs the file system once.
fn fill_file(
    repo: &Repo,
    keys: &Keys,
    how: How,
    e: &Entry,
    path: &Path,
    created: Created,
) -> Result<(), NodeError> {
    let io =
        |what: &str, err: std::io::Error| NodeError::io(format!("{what} {}", path.display()), err);
    let Created { mut file, dest } = created;
    let result = (|| {
        for c in &e.content {
            let data = repo.read_chunk(keys, c)?;
            file.write_all(&data).map_err(|err| io("writing", err))?;
        }
        set_file_meta(how.is_root, &file, e).map_err(|err| io("setting metadata of", err))?;
        if e.size >= WRITE_BACK_EARLY {
            // Start writing it to disk now (the kernel does it in the background), so the one
            // sync at the end has little left to wait for. Only advice: errors do not matter.
            let _ = nix::fcntl::posix_fadvise(
                &file,
                0,
                0,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
        }
        drop(file);
        if how.fresh {
            return Ok(());
        }
        if path.is_dir() && !path.is_symlink() {
            return Err(NodeError::Usage(format!(
                "{} exists and is a directory",
                path.display()
            )));
        }
        std::fs::rename(&dest, path).map_err(|err| io("renaming into", err))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&dest);
    }
    result
}

/// [`set_meta`] for a regular file, through its open handle (no path lookups).
fn set_file_meta(is_root: bool, f: &std::fs::File, e: &Entry) -> std::io::Result<()> {
    if is_root {
        std::os::unix::fs::fchown(f, Some(e.uid), Some(e.gid))?;
    }
    f.set_permissions(std::fs::Permissions::from_mode(e.mode & 0o7777))?;
    let t = mtime(e);
    filetime::set_file_handle_times(f, Some(t), Some(t))
}

fn mtime(e: &Entry) -> filetime::FileTime {
    let secs = e.mtime_ns.div_euclid(1_000_000_000);
    let nanos = e.mtime_ns.rem_euclid(1_000_000_000) as u32;
    filetime::FileTime::from_unix_time(secs, nanos)
}

/// Owner (as root), mode (except for symlinks), then mtime.
fn set_meta(is_root: bool, path: &Path, e: &Entry) -> std::io::Result<()> {
    if is_root {
        std::os::unix::fs::lchown(path, Some(e.uid), Some(e.gid))?;
    }
    if e.kind != EntryKind::Symlink {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(e.mode & 0o7777))?;
    }
    let t = mtime(e);
    filetime::set_symlink_file_times(path, t, t)
}

/// Makes `path` a real directory with owner-only access. In a fresh target it is created;
/// otherwise an existing directory is kept (and its mode set), and anything else in the way (a
/// file, or a symlink, which is never followed) is replaced. Only a `--force` restore can meet
/// such things, since other restores start from an empty target.
fn make_real_dir(fresh: bool, path: &Path) -> std::io::Result<()> {
    let create = || std::fs::DirBuilder::new().mode(0o700).create(path);
    if fresh {
        return create();
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        }
        Ok(_) => {
            std::fs::remove_file(path)?;
            create()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(),
        Err(e) => Err(e),
    }
}

fn remove_existing(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "a directory is in the way",
        )),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
