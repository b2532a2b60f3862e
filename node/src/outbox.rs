//! The outbox: sealed packs as files beside the redb index, waiting for friends.
//!
//! A pack is `outbox/<first two hex digits>/<pack id>.pack`. It is written to a temporary
//! name, synced, renamed into place and its directory synced, so a pack file that exists under
//! its final name is complete. Only then does the caller commit it to the index.
//!
//! Pack bodies are written and read for sending with direct I/O (`O_DIRECT`) where the file
//! system allows it: a pack is written once and read once or twice, so passing it through the
//! page cache only costs a copy and the cache's memory (on the benchmark machine the writer's
//! copy into the page cache was the largest single item of a backup's CPU time). Where direct
//! I/O is refused (tmpfs, some network file systems) the same calls use ordinary buffered I/O.

use crate::error::NodeError;
use obnam_protocol::PackId;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Alignment of buffers, offsets and lengths for direct I/O: 4096 covers every common logical
/// block size. Packs are padded to 64 KiB, so whole packs and [`DIRECT_PIECE`]s are aligned.
const DIRECT_ALIGN: usize = 4096;

/// Bytes per direct write (the size of a [`PackWriter`]'s window).
const DIRECT_PIECE: usize = 1024 * 1024;

/// Where in `buf` (grown to `len` + [`DIRECT_ALIGN`] if needed) an aligned run of `len` bytes
/// starts. The same for every call while `buf` is not grown.
fn aligned(buf: &mut Vec<u8>, len: usize) -> std::io::Result<usize> {
    if buf.len() < len + DIRECT_ALIGN {
        buf.resize(len + DIRECT_ALIGN, 0);
    }
    let off = buf.as_ptr().align_offset(DIRECT_ALIGN);
    if off > DIRECT_ALIGN {
        return Err(std::io::Error::other("no aligned buffer for direct I/O"));
    }
    Ok(off)
}

/// Opens `path` with the options `set` sets, plus `O_DIRECT` if the file system accepts it;
/// says which it got.
fn open_direct(
    path: &Path,
    set: impl Fn(&mut std::fs::OpenOptions),
) -> std::io::Result<(std::fs::File, bool)> {
    let mut o = std::fs::OpenOptions::new();
    set(&mut o);
    match o.clone().custom_flags(nix::libc::O_DIRECT).open(path) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => Ok((o.open(path)?, false)),
        Err(e) => Err(e),
    }
}

/// One [`DIRECT_PIECE`] of a pack on its way to the disk, in a buffer aligned for direct I/O.
/// A backup's packer fills windows and its writer writes them, so a pack is never whole in
/// memory: a finished pack's bytes wait for the disk in windows, not in an 8 MiB buffer.
pub struct Window {
    buf: Vec<u8>,
    start: usize,
    fill: usize,
}

impl Window {
    /// An empty window (its buffer is allocated, not touched).
    ///
    /// # Errors
    /// When no aligned buffer can be had.
    pub fn new() -> std::io::Result<Self> {
        let mut buf = Vec::new();
        let start = aligned(&mut buf, DIRECT_PIECE)?;
        Ok(Self {
            buf,
            start,
            fill: 0,
        })
    }

    /// Copies as much of `data` as fits; returns how much that was.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let take = (DIRECT_PIECE - self.fill).min(data.len());
        let at = self.start + self.fill;
        self.buf[at..at + take].copy_from_slice(&data[..take]);
        self.fill += take;
        take
    }

    /// Whether no more fits.
    pub fn is_full(&self) -> bool {
        self.fill == DIRECT_PIECE
    }

    /// The bytes pushed so far.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.fill]
    }

    /// Empties the window, to be filled again.
    pub fn clear(&mut self) {
        self.fill = 0;
    }
}

/// Writes a new pack file front to back, from pieces of any size, with direct I/O where the
/// file system allows it (see the module docs): whole aligned windows go straight to the disk,
/// and a tail that is not a multiple of the block size is written the ordinary way.
pub struct PackWriter {
    path: PathBuf,
    file: std::fs::File,
    direct: bool,
    /// The aligned window ([`DIRECT_PIECE`] bytes inside it) and how much of it is filled.
    buf: Vec<u8>,
    fill: usize,
    /// Bytes written to the file so far.
    offset: u64,
}

impl PackWriter {
    /// Creates (or truncates) the file at `path`.
    ///
    /// # Errors
    /// When it cannot be created.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let (file, direct) = open_direct(path, |o| {
            o.write(true).create(true).truncate(true);
        })?;
        Ok(Self {
            path: path.to_owned(),
            file,
            direct,
            buf: Vec::new(),
            fill: 0,
            offset: 0,
        })
    }

    /// Appends `data`.
    ///
    /// # Errors
    /// When the write fails.
    pub fn write(&mut self, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            if !self.direct {
                self.file.write_all_at(data, self.offset)?;
                self.offset += data.len() as u64;
                return Ok(());
            }
            let start = aligned(&mut self.buf, DIRECT_PIECE)? + self.fill;
            let take = (DIRECT_PIECE - self.fill).min(data.len());
            self.buf[start..start + take].copy_from_slice(&data[..take]);
            self.fill += take;
            data = &data[take..];
            if self.fill == DIRECT_PIECE {
                self.flush_window()?;
            }
        }
        Ok(())
    }

    /// Appends a whole [`Window`], straight from its buffer where direct I/O allows (no copy).
    ///
    /// # Errors
    /// When the write fails.
    pub fn write_window(&mut self, window: &Window) -> std::io::Result<()> {
        let data = window.bytes();
        if self.direct && self.fill == 0 && data.len().is_multiple_of(DIRECT_ALIGN) {
            match self.file.write_all_at(data, self.offset) {
                Ok(()) => {
                    self.offset += data.len() as u64;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        self.write(data)
    }

    /// Bytes written (or taken to be written) so far.
    pub fn len(&self) -> u64 {
        self.offset + self.fill as u64
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the filled part of the window: directly when it is a whole number of blocks;
    /// otherwise (the tail), or when the file system refuses, the ordinary way from then on.
    fn flush_window(&mut self) -> std::io::Result<()> {
        let n = self.fill;
        if n == 0 {
            return Ok(());
        }
        let off = aligned(&mut self.buf, DIRECT_PIECE)?;
        let window = off..off + n;
        if self.direct && n.is_multiple_of(DIRECT_ALIGN) {
            match self
                .file
                .write_all_at(&self.buf[window.clone()], self.offset)
            {
                Ok(()) => {
                    self.offset += n as u64;
                    self.fill = 0;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        if self.direct {
            self.file = std::fs::OpenOptions::new().write(true).open(&self.path)?;
            self.direct = false;
        }
        self.file.write_all_at(&self.buf[window], self.offset)?;
        self.offset += n as u64;
        self.fill = 0;
        Ok(())
    }

    /// Writes what is left and syncs the file.
    ///
    /// # Errors
    /// When the write or the sync fails.
    pub fn finish(mut self) -> std::io::Result<()> {
        self.flush_window()?;
        self.file.sync_all()
    }

    /// Gives up: removes the file (a file that cannot be removed now is a leftover temporary
    /// file, removed by the next [`Outbox::scan`]).
    pub fn abandon(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads a pack file front to back, in pieces, with direct I/O where the file system allows
/// it (see the module docs).
pub struct PackReader {
    path: PathBuf,
    file: std::fs::File,
    direct: bool,
    buf: Vec<u8>,
    offset: u64,
    /// Where the last piece starts in `buf`, and its length.
    piece: (usize, usize),
}

impl PackReader {
    /// Opens `path` for reading.
    ///
    /// # Errors
    /// When the file cannot be opened.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let (file, direct) = open_direct(path, |o| {
            o.read(true);
        })?;
        Ok(Self {
            path: path.to_owned(),
            file,
            direct,
            buf: Vec::new(),
            offset: 0,
            piece: (0, 0),
        })
    }

    /// The file's length.
    ///
    /// # Errors
    /// When it cannot be read.
    pub fn file_len(&self) -> std::io::Result<u64> {
        self.file.metadata().map(|m| m.len())
    }

    /// Moves to `offset`: the next piece starts there.
    pub fn seek(&mut self, offset: u64) {
        self.offset = offset;
    }

    /// Reads the next `n` bytes; [`PackReader::piece`] then holds them.
    ///
    /// # Errors
    /// When they cannot be read (a file shorter than expected is an error).
    pub fn read_next(&mut self, n: usize) -> std::io::Result<()> {
        if self.direct && n.is_multiple_of(DIRECT_ALIGN) {
            let off = aligned(&mut self.buf, n)?;
            match self
                .file
                .read_exact_at(&mut self.buf[off..off + n], self.offset)
            {
                Ok(()) => {
                    self.piece = (off, n);
                    self.offset += n as u64;
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        // Buffered: the file system refused direct I/O, or the piece is not aligned.
        if self.direct {
            self.file = std::fs::File::open(&self.path)?;
            self.direct = false;
        }
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
        self.file.read_exact_at(&mut self.buf[..n], self.offset)?;
        self.piece = (0, n);
        self.offset += n as u64;
        Ok(())
    }

    /// The bytes the last [`PackReader::read_next`] read.
    pub fn piece(&self) -> &[u8] {
        self.buf
            .get(self.piece.0..self.piece.0 + self.piece.1)
            .unwrap_or(&[])
    }
}

/// Fsyncs a directory, so a rename or create in it is durable.
///
/// # Errors
/// [`NodeError::Io`].
pub fn sync_dir(dir: &Path) -> Result<(), NodeError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| NodeError::io(format!("syncing directory {}", dir.display()), e))
}

/// The outbox directory.
#[derive(Debug, Clone)]
pub struct Outbox {
    dir: PathBuf,
}

impl Outbox {
    /// Opens (and creates) the outbox directory.
    ///
    /// # Errors
    /// [`NodeError::Io`].
    pub fn open(dir: PathBuf) -> Result<Self, NodeError> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| NodeError::io(format!("creating outbox {}", dir.display()), e))?;
        Ok(Self { dir })
    }

    /// Where a pack's file is.
    pub fn path(&self, id: &PackId) -> PathBuf {
        let hex = id.to_hex();
        self.dir.join(&hex[..2]).join(format!("{hex}.pack"))
    }

    /// Writes a pack durably.
    ///
    /// # Errors
    /// [`NodeError::Io`] naming the pack.
    pub fn write(&self, id: &PackId, bytes: &[u8]) -> Result<(), NodeError> {
        let mut w = self.begin()?;
        let written = w.write(bytes);
        if let Err(e) = written {
            w.abandon();
            return Err(NodeError::io(format!("writing pack {id}"), e));
        }
        self.place(w, id)
    }

    /// Starts a pack whose id is not known yet (it is the hash of what will be written): a
    /// temporary file under `tmp/`, which [`Outbox::place`] makes durable under the pack's
    /// name. A crash leaves the temporary file, which [`Outbox::scan`] removes.
    ///
    /// # Errors
    /// [`NodeError::Io`].
    pub fn begin(&self) -> Result<PackWriter, NodeError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = self.dir.join("tmp");
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!("{}-{n}.tmp", std::process::id()));
        let ctx = || format!("creating {}", tmp.display());
        std::fs::create_dir_all(&dir).map_err(|e| NodeError::io(ctx(), e))?;
        PackWriter::create(&tmp).map_err(|e| NodeError::io(ctx(), e))
    }

    /// Syncs a pack [`Outbox::begin`] started and moves it to its place as pack `id`, durably.
    ///
    /// # Errors
    /// [`NodeError::Io`] naming the pack (the temporary file is removed).
    pub fn place(&self, w: PackWriter, id: &PackId) -> Result<(), NodeError> {
        self.place_all(vec![(w, *id)])
    }

    /// [`Outbox::place`] for several packs: each is synced and renamed, then each directory
    /// they went to is synced once (not once per pack).
    ///
    /// # Errors
    /// [`NodeError::Io`] naming the first pack that failed; the temporary files of it and of
    /// the packs after it are removed (those before it are in place).
    pub fn place_all(&self, packs: Vec<(PackWriter, PackId)>) -> Result<(), NodeError> {
        let mut dirs = std::collections::BTreeSet::new();
        let mut packs = packs.into_iter();
        while let Some((w, id)) = packs.next() {
            let path = self.path(&id);
            let dir = path.parent().unwrap_or(&self.dir).to_owned();
            let tmp = w.path.clone();
            let placed = std::fs::create_dir_all(&dir)
                .and_then(|()| w.finish())
                .and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(e) = placed {
                let _ = std::fs::remove_file(&tmp);
                for (rest, _) in packs {
                    rest.abandon();
                }
                return Err(NodeError::io(
                    format!("writing pack {id} to {}", path.display()),
                    e,
                ));
            }
            dirs.insert(dir);
        }
        for dir in dirs {
            sync_dir(&dir)?;
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` of a pack.
    ///
    /// # Errors
    /// [`NodeError::Io`] naming the pack.
    pub fn read_range(&self, id: &PackId, offset: u64, len: usize) -> Result<Vec<u8>, NodeError> {
        let path = self.path(id);
        let ctx = || {
            format!(
                "reading {len} bytes at {offset} of pack {id} ({})",
                path.display()
            )
        };
        let f = std::fs::File::open(&path).map_err(|e| NodeError::io(ctx(), e))?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset)
            .map_err(|e| NodeError::io(ctx(), e))?;
        Ok(buf)
    }

    /// Reads a whole pack.
    ///
    /// # Errors
    /// [`NodeError::Io`] naming the pack.
    pub fn read(&self, id: &PackId) -> Result<Vec<u8>, NodeError> {
        let path = self.path(id);
        std::fs::read(&path)
            .map_err(|e| NodeError::io(format!("reading pack {id} ({})", path.display()), e))
    }

    /// Every complete pack file, and removes leftover temporary files.
    ///
    /// # Errors
    /// [`NodeError::Io`].
    pub fn scan(&self) -> Result<Vec<PackId>, NodeError> {
        let mut out = Vec::new();
        let ctx = |p: &Path| format!("scanning outbox {}", p.display());
        for sub in std::fs::read_dir(&self.dir).map_err(|e| NodeError::io(ctx(&self.dir), e))? {
            let sub = sub.map_err(|e| NodeError::io(ctx(&self.dir), e))?.path();
            if !sub.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(&sub).map_err(|e| NodeError::io(ctx(&sub), e))? {
                let path = f.map_err(|e| NodeError::io(ctx(&sub), e))?.path();
                match path.extension().and_then(|e| e.to_str()) {
                    Some("tmp") => {
                        let _ = std::fs::remove_file(&path);
                    }
                    Some("pack") => {
                        if let Some(id) = path
                            .file_stem()
                            .and_then(|s| s.to_str())
                            .and_then(|s| s.parse().ok())
                        {
                            out.push(id);
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    /// Deletes a pack file.
    ///
    /// # Errors
    /// [`NodeError::Io`].
    pub fn remove(&self, id: &PackId) -> Result<(), NodeError> {
        let path = self.path(id);
        std::fs::remove_file(&path).map_err(|e| NodeError::io(format!("removing pack {id}"), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes packs of aligned and unaligned lengths into an outbox under `base`, and reads
    /// each back whole, by range, and piece by piece as an upload does.
    fn round_trip(base: &Path) {
        let dir = tempfile::tempdir_in(base).unwrap();
        let outbox = Outbox::open(dir.path().join("outbox")).unwrap();
        for len in [3 * 65536, 5 * DIRECT_PIECE / 2, 65536 + 17, 1] {
            let mut bytes = vec![0u8; len];
            rand::fill(&mut bytes[..]);
            let id = PackId::of(&bytes);
            outbox.write(&id, &bytes).unwrap();
            assert_eq!(outbox.read(&id).unwrap(), bytes, "len {len}");
            assert_eq!(
                outbox.read_range(&id, 0, len.min(100)).unwrap(),
                bytes[..len.min(100)]
            );
            let mut r = PackReader::open(&outbox.path(&id)).unwrap();
            assert_eq!(r.file_len().unwrap(), len as u64);
            let mut got = Vec::new();
            let mut left = len;
            while left > 0 {
                let n = (256 * 1024).min(left);
                r.read_next(n).unwrap();
                got.extend_from_slice(r.piece());
                left -= n;
            }
            assert_eq!(got, bytes, "len {len}");
            // Past the end is an error, not a short piece.
            assert!(r.read_next(4096).is_err());
        }
    }

    /// A [`PackWriter`] fed pieces of awkward sizes writes exactly their concatenation,
    /// whether the total is a whole number of blocks or not.
    fn writer_round_trip(base: &Path) {
        let dir = tempfile::tempdir_in(base).unwrap();
        for total in [
            4 * 65536,
            3 * DIRECT_PIECE + 4096,
            2 * DIRECT_PIECE + 12345,
            7,
            0,
        ] {
            let mut bytes = vec![0u8; total];
            rand::fill(&mut bytes[..]);
            let path = dir.path().join(format!("{total}.pack"));
            let mut w = PackWriter::create(&path).unwrap();
            let mut rest = &bytes[..];
            for size in [1000, 300_000, DIRECT_PIECE + 7, 1].iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let n = (*size).min(rest.len());
                w.write(&rest[..n]).unwrap();
                rest = &rest[n..];
            }
            w.finish().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "total {total}");
        }
    }

    #[test]
    fn pack_writers_write_what_they_are_given() {
        writer_round_trip(&std::env::temp_dir());
        if Path::new("/dev/shm").is_dir() {
            writer_round_trip(Path::new("/dev/shm"));
        }
    }

    #[test]
    fn packs_placed_together_are_each_in_place_and_the_temporary_files_gone() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path().join("outbox")).unwrap();
        let mut packs = Vec::new();
        let mut placed = Vec::new();
        for len in [65536, 3 * DIRECT_PIECE + 100, 1] {
            let mut bytes = vec![0u8; len];
            rand::fill(&mut bytes[..]);
            let id = PackId::of(&bytes);
            let mut w = outbox.begin().unwrap();
            w.write(&bytes).unwrap();
            packs.push((w, id));
            placed.push((id, bytes));
        }
        outbox.place_all(packs).unwrap();
        for (id, bytes) in &placed {
            assert_eq!(&outbox.read(id).unwrap(), bytes);
        }
        let tmp: Vec<_> = std::fs::read_dir(dir.path().join("outbox/tmp"))
            .unwrap()
            .collect();
        assert!(tmp.is_empty(), "left in tmp/: {tmp:?}");
        // A pack that cannot be placed (its directory's name is taken by a file) fails with
        // its id named, and neither it nor the packs after it are left behind.
        let mut bytes = vec![0u8; 4096];
        let bad = loop {
            rand::fill(&mut bytes[..]);
            let id = PackId::of(&bytes);
            if !outbox.path(&id).parent().unwrap().exists() {
                break id;
            }
        };
        let blocker = outbox.path(&bad).parent().unwrap().to_owned();
        std::fs::write(&blocker, b"not a directory").unwrap();
        let mut w = outbox.begin().unwrap();
        w.write(&bytes).unwrap();
        let mut after = outbox.begin().unwrap();
        after.write(b"more").unwrap();
        let err = outbox
            .place_all(vec![(w, bad), (after, PackId([9; 32]))])
            .unwrap_err();
        assert!(err.to_string().contains(&bad.to_string()), "{err}");
        let tmp: Vec<_> = std::fs::read_dir(dir.path().join("outbox/tmp"))
            .unwrap()
            .collect();
        assert!(tmp.is_empty(), "left in tmp/: {tmp:?}");
        assert!(!outbox.path(&PackId([9; 32])).exists());
    }

    #[test]
    fn packs_read_back_as_written() {
        round_trip(&std::env::temp_dir());
    }

    #[test]
    fn packs_read_back_as_written_where_direct_io_is_refused() {
        // tmpfs refuses O_DIRECT on older kernels (newer ones accept it and buffer anyway);
        // either way the same calls must work.
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            round_trip(shm);
        } else {
            eprintln!("skipped: no /dev/shm (tmpfs) here");
        }
    }
}
