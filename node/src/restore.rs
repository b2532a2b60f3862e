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
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
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
    match std::fs::read_dir(&target) {
        Ok(mut rd) => {
            if rd.next().is_some() && !req.force {
                return Err(NodeError::TargetNotEmpty { path: target });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&target).map_err(|e| {
                NodeError::io(format!("creating restore target {}", target.display()), e)
            })?;
        }
        Err(e) => {
            return Err(NodeError::io(
                format!("opening restore target {}", target.display()),
                e,
            ));
        }
    }
    // The packs of the selected files, in the order the walk below needs them.
    let mut packs = Vec::new();
    let probe = Restorer::new(repo, keys, events, filters.clone(), id, None);
    probe.collect(
        &record.root,
        &mut Vec::new(),
        &mut packs,
        &mut std::collections::HashSet::new(),
    );
    // Files are written by a pool of threads (opening, decompressing and checking chunks is
    // CPU work), out of order; directories get their metadata once their files are done.
    let threads = repo.config.seal_threads();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (report, result) = std::thread::scope(|s| {
        // Packs come from friends, several at a time, in that order, while the files are
        // written: a writer that needs a pack being fetched waits for that fetch. When the walk
        // ends, fails or panics, the prefetch stops.
        let stop = &stop;
        let _stop_on_exit = StopOnDrop(stop);
        s.spawn(move || {
            if let Err(e) = repo.prefetch(keys, packs, stop) {
                tracing::warn!(error = %e.full_message(), "prefetch incomplete; affected files will be reported");
            }
        });
        let (job_tx, job_rx) = sync_channel::<FileJob>(threads * 4);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = std::sync::mpsc::channel::<FileDone>();
        let is_root = nix::unistd::geteuid().is_root();
        for _ in 0..threads {
            let rx = Arc::clone(&job_rx);
            let tx = done_tx.clone();
            s.spawn(move || file_worker(repo, keys, is_root, &rx, &tx));
        }
        drop(done_tx);
        let mut r = Restorer::new(repo, keys, events, filters, id, Some((job_tx, done_rx)));
        let mut result = r.restore_dir(&record.root, &target, &mut Vec::new());
        r.flush_dirs();
        r.pool = None;
        // Every pack the walk needed has been read; after a failure, fetch no more.
        stop.store(true, Ordering::Relaxed);
        if result.is_ok() {
            // One sync for the whole restore instead of one per file.
            result = std::fs::File::open(&target)
                .and_then(|d| nix::unistd::syncfs(&d).map_err(std::io::Error::from))
                .map_err(|e| NodeError::io(format!("syncing {}", target.display()), e));
        }
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

/// A file for the pool to write.
struct FileJob {
    entry: Entry,
    path: PathBuf,
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
    is_root: bool,
    rx: &Mutex<Receiver<FileJob>>,
    tx: &std::sync::mpsc::Sender<FileDone>,
) {
    loop {
        let job = {
            let Ok(guard) = rx.lock() else { return };
            guard.recv()
        };
        let Ok(job) = job else { return };
        let result = write_file(repo, keys, is_root, &job.entry, &job.path);
        let done = FileDone {
            path: job.path,
            size: job.entry.size,
            result,
        };
        if tx.send(done).is_err() {
            return;
        }
    }
}

type Pool = (SyncSender<FileJob>, Receiver<FileDone>);

struct Restorer<'a> {
    repo: &'a Repo,
    keys: &'a Keys,
    events: &'a dyn Events,
    filters: Vec<Vec<Vec<u8>>>,
    is_root: bool,
    links: HashMap<u64, PathBuf>,
    report: RestoreReport,
    last_progress: Instant,
    /// The file-writing pool; without it, files are written on this thread.
    pool: Option<Pool>,
    /// Jobs sent to the pool and not yet reported done.
    outstanding: usize,
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
        pool: Option<Pool>,
    ) -> Self {
        Self {
            repo,
            keys,
            events,
            filters,
            is_root: nix::unistd::geteuid().is_root(),
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
            pending_dirs: Vec::new(),
        }
    }

    /// Counts a file the pool finished, or reports its failure.
    fn file_done(&mut self, done: FileDone) {
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

    /// Waits until the pool has written every file sent so far.
    fn drain(&mut self) {
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
            if let Err(err) = set_meta(self.is_root, &path, &e) {
                self.problem(&path, err);
            }
        }
    }

    /// Writes a regular file: on the pool when there is one, else here.
    fn submit_file(&mut self, e: &Entry, path: &Path) -> Result<(), NodeError> {
        // Hard-linked files are written here, so that later links find them.
        let Some((tx, _)) = self.pool.as_ref().filter(|_| e.hardlink.is_none()) else {
            write_file(self.repo, self.keys, self.is_root, e, path)?;
            self.report.files += 1;
            self.report.bytes += e.size;
            if let Some(group) = e.hardlink {
                self.links.insert(group, path.to_owned());
            }
            return Ok(());
        };
        let job = FileJob {
            entry: e.clone(),
            path: path.to_owned(),
        };
        if tx.send(job).is_err() {
            return Err(NodeError::Usage(
                "the restore's file writers stopped".into(),
            ));
        }
        self.outstanding += 1;
        // Take what is done, without waiting.
        while let Some(done) = self.pool.as_ref().and_then(|(_, rx)| rx.try_recv().ok()) {
            self.file_done(done);
        }
        Ok(())
    }

    fn select(&self, parts: &[Vec<u8>]) -> Selection {
        if self.filters.is_empty() {
            return Selection::All;
        }
        let mut partly = false;
        for f in &self.filters {
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

    /// The packs holding the selected files' data (trees are read, and fetched, on the way).
    fn collect(
        &self,
        tree: &[ChunkId],
        parts: &mut Vec<Vec<u8>>,
        out: &mut Vec<obnam_protocol::PackId>,
        seen: &mut std::collections::HashSet<obnam_protocol::PackId>,
    ) {
        let Ok(tree) = self.repo.read_tree(self.keys, tree) else {
            return;
        };
        for e in tree.entries {
            parts.push(e.name.clone());
            match (self.select(parts), e.kind) {
                (Selection::No, _) => {}
                (_, EntryKind::Dir) => self.collect(&e.content, parts, out, seen),
                (Selection::All, EntryKind::File) => {
                    for c in &e.content {
                        if let Ok(Some(loc)) = self.repo.store.chunk(c)
                            && seen.insert(loc.pack)
                        {
                            out.push(loc.pack);
                        }
                    }
                }
                _ => {}
            }
            parts.pop();
        }
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
                    if let Err(err) = make_real_dir(&path) {
                        self.problem(&path, err);
                        parts.pop();
                        continue;
                    }
                    // Owner-only access while we fill it in; the real mode comes after the children.
                    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700));
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
            remove_existing(path).map_err(|err| io("replacing", err))?;
            std::fs::hard_link(&first, path).map_err(|err| io("linking", err))?;
            self.report.files += 1;
            return Ok(());
        }
        match e.kind {
            EntryKind::File => return self.submit_file(e, path),
            EntryKind::Symlink => {
                remove_existing(path).map_err(|err| io("replacing", err))?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&e.target), path)
                    .map_err(|err| io("creating symlink", err))?;
            }
            EntryKind::Fifo => {
                remove_existing(path).map_err(|err| io("replacing", err))?;
                nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .map_err(|err| io("creating FIFO", err.into()))?;
            }
            EntryKind::CharDevice | EntryKind::BlockDevice => {
                if !self.is_root {
                    return Err(NodeError::Usage(format!(
                        "{}: device nodes can only be restored by root",
                        path.display()
                    )));
                }
                remove_existing(path).map_err(|err| io("replacing", err))?;
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
        set_meta(self.is_root, path, e).map_err(|err| io("setting metadata of", err))
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

/// Writes one regular file: to a temporary name, renamed into place once every chunk opened
/// and verified and the metadata is set. Not synced: the restore syncs the file system once.
fn write_file(
    repo: &Repo,
    keys: &Keys,
    is_root: bool,
    e: &Entry,
    path: &Path,
) -> Result<(), NodeError> {
    // A random temporary name, created exclusively: it cannot collide with (and so never
    // removes) a name in the snapshot.
    let mut tag = [0u8; 12];
    rand::fill(&mut tag[..]);
    let tmp_name = format!(
        ".obnam-restore-{}",
        tag.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        // A leftover temporary file (or a link planted in its place) is removed, never followed.
        remove_existing(&tmp)
            .map_err(|err| NodeError::io(format!("replacing {}", tmp.display()), err))?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&tmp)
            .map_err(|err| NodeError::io(format!("creating {}", path.display()), err))?;
        for c in &e.content {
            let data = repo.read_chunk(keys, c)?;
            f.write_all(&data)
                .map_err(|err| NodeError::io(format!("writing {}", path.display()), err))?;
        }
        drop(f);
        set_meta(is_root, &tmp, e)
            .map_err(|err| NodeError::io(format!("setting metadata of {}", path.display()), err))?;
        if path.is_dir() && !path.is_symlink() {
            return Err(NodeError::Usage(format!(
                "{} exists and is a directory",
                path.display()
            )));
        }
        std::fs::rename(&tmp, path)
            .map_err(|err| NodeError::io(format!("renaming into {}", path.display()), err))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Owner (as root), mode (except for symlinks), then mtime.
fn set_meta(is_root: bool, path: &Path, e: &Entry) -> std::io::Result<()> {
    if is_root {
        std::os::unix::fs::lchown(path, Some(e.uid), Some(e.gid))?;
    }
    if e.kind != EntryKind::Symlink {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(e.mode & 0o7777))?;
    }
    let secs = e.mtime_ns.div_euclid(1_000_000_000);
    let nanos = e.mtime_ns.rem_euclid(1_000_000_000) as u32;
    let t = filetime::FileTime::from_unix_time(secs, nanos);
    filetime::set_symlink_file_times(path, t, t)
}

/// Makes `path` a real directory. An existing directory is kept; anything else in the way
/// (a file, or a symlink, which is never followed) is replaced. Only a `--force` restore can
/// meet such things, since other restores start from an empty target.
fn make_real_dir(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => {
            std::fs::remove_file(path)?;
            std::fs::create_dir(path)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir(path),
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
