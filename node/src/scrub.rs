//! Scrubbing: the storage role re-hashes the packs it hosts against their ids, slowly, so rot is
//! found before anyone needs the data.
//!
//! One thread walks every hosted owner's packs in id order, reads each pack file and hashes it,
//! at most `scrub_bytes_per_sec` bytes per second (0 turns scrubbing off), then starts over after
//! `scrub_interval_secs`.
//! A pack whose file is missing, has the wrong length or no longer hashes to its id is dropped
//! ([`Server::drop_pack`]): its record goes, its bytes no longer count against the quota, and
//! it is listed for its owner, who asks at its next contact ([`Request::Dropped`]) and repairs it.
//!
//! [`Request::Dropped`]: obnam_protocol::msg::Request::Dropped

use crate::serve::{FileId, IO_CHUNK, Server, file_identity};
use obnam_protocol::{OwnerId, PackId};
use obnam_store::Store;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a dropped pack stays listed for its owner (30 days).
const DROPPED_KEPT_NS: i64 = 30 * 86_400 * 1_000_000_000;
/// Packs listed per database read.
const PAGE: usize = 256;

/// What one pass found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Packs checked.
    pub packs: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Packs dropped.
    pub dropped: u64,
}

/// Keeps reads at `rate` bytes per second on average.
struct Pace {
    rate: u64,
    start: Instant,
    bytes: u64,
}

impl Pace {
    fn new(rate: u64) -> Self {
        Self {
            rate: rate.max(1),
            start: Instant::now(),
            bytes: 0,
        }
    }

    fn account(&mut self, n: usize) {
        self.bytes += n as u64;
        let due = Duration::from_secs_f64(self.bytes as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// Starts the scrub thread (unless `rate` is 0): a pass, a pause of `pause`, and again, until
/// the process ends.
pub fn start(server: Arc<Server>, store: Store, rate: u64, pause: Duration) {
    if rate == 0 {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("scrub".into())
        .spawn(move || {
            loop {
                match pass(&server, &store, rate) {
                    Ok(p) if p.packs > 0 => {
                        tracing::info!(
                            packs = p.packs,
                            bytes = p.bytes,
                            dropped = p.dropped,
                            "scrub pass done"
                        )
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "scrub pass failed"),
                }
                std::thread::sleep(pause);
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "could not start the scrub thread");
    }
}

/// Checks every hosted pack once, at `rate` bytes per second.
///
/// # Errors
/// Database errors.
pub fn pass(server: &Server, store: &Store, rate: u64) -> Result<Pass, obnam_store::StoreError> {
    let mut pace = Pace::new(rate);
    let mut out = Pass::default();
    let mut buf = vec![0u8; IO_CHUNK];
    store.expire_dropped(crate::repo::now_ns().saturating_sub(DROPPED_KEPT_NS))?;
    for (owner, _) in store.hosted_owners()? {
        if !server.owner_dir(&owner).is_dir() {
            // The whole directory is gone (an unmounted disk?): not a reason to drop anything.
            tracing::warn!(owner = %owner.short(), "scrub: the owner's hosted-pack directory is missing; skipping it");
            continue;
        }
        let mut after: Option<PackId> = None;
        loop {
            let page = store.hosted_packs(&owner, after.as_ref(), PAGE)?;
            let Some(last) = page.last() else { break };
            after = Some(last.0);
            for (pack, len) in page {
                out.packs += 1;
                if let Some((judged, why)) =
                    check(server, &owner, &pack, len, &mut buf, &mut pace, &mut out)
                {
                    // `drop_pack` does nothing if a put replaced the file meanwhile.
                    server.drop_pack(&owner, &pack, judged, &why);
                    if store.has_hosted(&owner, &pack)?.is_none() {
                        out.dropped += 1;
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Why a hosted pack is bad (with the identity of the file judged, `None` when it is missing),
/// or `None` when it hashes to its id.
fn check(
    server: &Server,
    owner: &OwnerId,
    pack: &PackId,
    len: u64,
    buf: &mut [u8],
    pace: &mut Pace,
    out: &mut Pass,
) -> Option<(Option<FileId>, String)> {
    let path = server.pack_path(owner, pack);
    let mut file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Some((None, "scrub: its file is missing".into()));
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "scrub: cannot open a hosted pack");
            return None;
        }
    };
    let judged = match file.metadata() {
        Ok(m) => Some(file_identity(&m)),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "scrub: cannot stat a hosted pack");
            return None;
        }
    };
    let mut hasher = blake3::Hasher::new();
    let mut total = 0u64;
    loop {
        match file.read(buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                total += n as u64;
                out.bytes += n as u64;
                pace.account(n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                // An unreadable sector is rot too.
                return Some((judged, format!("scrub: reading its file failed: {e}")));
            }
        }
    }
    if total != len {
        return Some((
            judged,
            format!("scrub: its file has {total} bytes, not {len}"),
        ));
    }
    let actual = PackId(*hasher.finalize().as_bytes());
    (actual != *pack).then(|| (judged, format!("scrub: it hashes to {actual}")))
}
