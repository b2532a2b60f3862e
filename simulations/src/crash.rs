//! Crash safety with real processes (the integrity issue): seeded SIGKILLs of the backing-up
//! node, and of a friend while it receives packs.
//!
//! **Owner points** ([`owner_crashes`]): node A backs up to friend B (`replicas = 1`). Before each
//! point the source tree changes (a new 12 MiB file replaces the oldest, small files change), A
//! starts `obnam backup`, and after a seeded delay, drawn from zero to a measured backup's
//! duration, A gets SIGKILL. A restarts. Then every snapshot A lists must restore byte-identical
//! to the source as it was when that snapshot's backup ran (the harness keeps a copy per
//! backup), and the next backup must complete.
//!
//! **Friend points** ([`friend_crashes`]): the same, but B gets SIGKILL while A's backup sends it
//! packs, and restarts at once. B's database must open (B starts), every pack file B holds must
//! hash to its name, no partly received body may be left, the bytes B says it hosts must equal
//! the bytes of those files, and once A's replication completes, `verify --sample 100` must
//! download every pack from B and find each one intact.
//!
//! Delays come from a seeded generator, so a failing point can be run again with its seed.

use crate::{Bins, Node, befriend_all, compare_trees, files_below, wait_until};
use anyhow::{Context, Result, bail};
use rand::{Rng, RngExt, SeedableRng};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const CONFIG: &str = "replication_interval_secs = 1\nrequest_timeout_secs = 20\nreplicas = 1\naudits_per_day = 0\nseal_threads = 2\n";
/// Big files in the source tree at once.
const BIG_FILES: usize = 3;
/// Size of each big file.
const BIG: usize = 12 << 20;

/// Options of a crash run.
pub struct CrashOptions {
    /// Kill points of each kind.
    pub points: usize,
    /// Seed of the delays and the data.
    pub seed: u64,
    /// A scratch directory (emptied first).
    pub work: PathBuf,
    /// The programs.
    pub bins: Bins,
}

pub(crate) fn random_file(path: &Path, len: usize, rng: &mut impl Rng) -> Result<()> {
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))
}

/// The source tree for backup `n`: a new big file replaces the oldest, and the small files
/// change.
fn mutate(src: &Path, n: usize, rng: &mut impl RngExt) -> Result<()> {
    std::fs::create_dir_all(src.join("small"))?;
    random_file(&src.join(format!("big-{n}.bin")), BIG, rng)?;
    if n >= BIG_FILES {
        let _ = std::fs::remove_file(src.join(format!("big-{}.bin", n - BIG_FILES)));
    }
    for i in 0..20 {
        let text = format!("file {i} of backup {n}: {}\n", rng.random::<u64>()).repeat(40);
        std::fs::write(src.join("small").join(format!("{i}.txt")), text)?;
    }
    Ok(())
}

pub(crate) fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()?;
    if !status.success() {
        bail!("cp -a {} {} failed", from.display(), to.display());
    }
    Ok(())
}

/// Restores every snapshot and compares it with the copy of the source taken for it.
fn check_all(a: &Node, dir: &Path, src: &Path, copies: &[PathBuf]) -> Result<usize> {
    let ids = a.snapshot_ids()?;
    if ids.len() != copies.len() {
        bail!(
            "{} snapshots listed, {} backups known to have committed",
            ids.len(),
            copies.len()
        );
    }
    for (id, copy) in ids.iter().zip(copies) {
        let target = dir.join("restore");
        let _ = std::fs::remove_dir_all(&target);
        let r = a.json(&["restore", id, "--target", &target.to_string_lossy()], 0)?;
        if r["problems"].as_array().is_some_and(|p| !p.is_empty()) {
            bail!("snapshot {id}: restore problems: {r}");
        }
        let restored = target.join(src.strip_prefix("/").unwrap_or(src));
        compare_trees(copy, &restored, &[]).with_context(|| format!("snapshot {id}"))?;
        std::fs::remove_dir_all(&target)?;
    }
    Ok(ids.len())
}

/// Runs `obnam backup` to completion; exit 0, or 4 (replication pending), is a completed backup.
fn backup(a: &Node, src: &Path) -> Result<Duration> {
    let started = Instant::now();
    let run = a.obnam(&["backup", &src.to_string_lossy(), "--json"])?;
    if run.code != 0 && run.code != 4 {
        bail!("backup failed: {run:?}\nlog:\n{}", a.log());
    }
    Ok(started.elapsed())
}

struct Setup {
    a: Node,
    b: Node,
    src: PathBuf,
    copies: Vec<PathBuf>,
    dir: PathBuf,
    rng: rand::rngs::StdRng,
    backups: usize,
    window: Duration,
}

fn setup(o: &CrashOptions, kind: &str) -> Result<Setup> {
    let dir = o.work.join(kind);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut a = Node::new(&o.bins, "a", &dir.join("a"), CONFIG)?;
    let mut b = Node::new(&o.bins, "b", &dir.join("b"), CONFIG)?;
    a.start()?;
    b.start()?;
    befriend_all(&[&a, &b])?;
    a.init("alice")?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
    let src = dir.join("src");
    let mut copies = Vec::new();
    // Calibration: the first backups, untouched, give the kill window.
    let mut window = Duration::ZERO;
    for n in 0..2 {
        mutate(&src, n, &mut rng)?;
        window = window.max(backup(&a, &src)?);
        let copy = dir.join(format!("copy-{n}"));
        copy_tree(&src, &copy)?;
        copies.push(copy);
    }
    Ok(Setup {
        a,
        b,
        src,
        copies,
        dir,
        rng,
        backups: 2,
        window: window.max(Duration::from_millis(100)),
    })
}

/// Starts a backup in the background.
fn spawn_backup(a: &Node, src: &Path) -> Result<std::process::Child> {
    let mut cmd = a.command(&["backup", &src.to_string_lossy(), "--json"]);
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    Ok(cmd.spawn()?)
}

fn reap(mut child: std::process::Child) -> Result<Option<i32>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.code());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("a backup client did not end within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILLs the backing-up node at seeded points; see the module docs.
///
/// # Errors
/// The first broken promise, naming the point and its delay.
pub fn owner_crashes(o: &CrashOptions) -> Result<Value> {
    let mut s = setup(o, "owner")?;
    let window_ms = u64::try_from(s.window.as_millis()).unwrap_or(u64::MAX);
    let mut points = Vec::new();
    let mut checked = 0;
    for p in 0..o.points {
        let n = s.backups;
        mutate(&s.src, n, &mut s.rng)?;
        let delay = Duration::from_millis(s.rng.random_range(0..=window_ms));
        let client = spawn_backup(&s.a, &s.src)?;
        std::thread::sleep(delay);
        s.a.kill();
        let code = reap(client)?;
        s.a.start()
            .with_context(|| format!("point {p} (delay {delay:?}): A does not restart"))?;
        // Did the killed backup commit? The source has not changed since it started.
        let listed = s.a.snapshot_ids()?.len();
        let committed = listed > s.copies.len();
        if committed {
            let copy = s.dir.join(format!("copy-{n}"));
            copy_tree(&s.src, &copy)?;
            s.copies.push(copy);
        }
        checked += check_all(&s.a, &s.dir, &s.src, &s.copies)
            .with_context(|| format!("point {p} (delay {delay:?}): an earlier snapshot"))?;
        // The next backup completes.
        let n2 = n + 1;
        mutate(&s.src, n2, &mut s.rng)?;
        backup(&s.a, &s.src).with_context(|| format!("point {p}: the backup after the crash"))?;
        let copy = s.dir.join(format!("copy-{n2}"));
        copy_tree(&s.src, &copy)?;
        s.copies.push(copy);
        s.backups = n2 + 1;
        points.push(json!({
            "point": p,
            "delay_ms": delay.as_millis() as u64,
            "client_exit": code,
            "killed_backup_committed": committed,
            "snapshots": s.copies.len(),
        }));
    }
    checked += check_all(&s.a, &s.dir, &s.src, &s.copies).context("after the last point")?;
    Ok(json!({
        "kind": "owner",
        "seed": o.seed,
        "window_ms": window_ms,
        "points": points,
        "snapshot_restores_checked": checked,
        "killed_backups_committed": points.iter().filter(|p| p["killed_backup_committed"] == true).count(),
    }))
}

/// Whether every pack file `b` hosts hashes to its name, their bytes are what `b` says it hosts,
/// and no partly received body was left behind. Returns the number of packs.
fn friend_is_sound(b: &Node) -> Result<usize> {
    let files = files_below(&b.data_dir.join("hosted"), "pack");
    let mut bytes = 0u64;
    for f in &files {
        let data = std::fs::read(f)?;
        let stem = f.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        let hash = obnam_protocol::PackId::of(&data).to_hex();
        if hash != stem {
            bail!("{} holds bytes that hash to {hash}", f.display());
        }
        bytes += data.len() as u64;
    }
    let leftovers = files_below(&b.data_dir.join("hosted"), "tmp").len();
    if leftovers > 0 {
        bail!("{leftovers} partly received bodies are still in B's hosted directory");
    }
    let hosted = b.status()?["hosted_bytes"].as_u64().unwrap_or(u64::MAX);
    if hosted != bytes {
        bail!(
            "B says it hosts {hosted} bytes, its {} pack files hold {bytes}",
            files.len()
        );
    }
    Ok(files.len())
}

/// SIGKILLs the friend while it receives packs, at seeded points; see the module docs.
///
/// # Errors
/// The first broken promise, naming the point and its delay.
pub fn friend_crashes(o: &CrashOptions) -> Result<Value> {
    let mut s = setup(o, "friend")?;
    let window_ms = u64::try_from(s.window.as_millis()).unwrap_or(u64::MAX);
    let mut points = Vec::new();
    for p in 0..o.points {
        let n = s.backups;
        mutate(&s.src, n, &mut s.rng)?;
        let delay = Duration::from_millis(s.rng.random_range(0..=window_ms));
        let client = spawn_backup(&s.a, &s.src)?;
        std::thread::sleep(delay);
        s.b.kill();
        // Evidence that the kill came mid-transfer: bodies B was still writing.
        let partial = files_below(&s.b.data_dir.join("hosted"), "tmp").len();
        s.b.start()
            .with_context(|| format!("point {p} (delay {delay:?}): B's database does not open"))?;
        let code = reap(client)?;
        if code != Some(0) && code != Some(4) {
            bail!(
                "point {p}: the backup failed (exit {code:?}):\n{}",
                s.a.log()
            );
        }
        let copy = s.dir.join(format!("copy-{n}"));
        copy_tree(&s.src, &copy)?;
        s.copies.push(copy);
        s.backups = n + 1;
        wait_until("B holds everything again", Duration::from_secs(120), || {
            let st = s.a.status()?;
            Ok(st["replicated_to"] == 1 && st["outbox_packs"] == 0)
        })
        .with_context(|| format!("point {p} (delay {delay:?})"))?;
        let packs =
            friend_is_sound(&s.b).with_context(|| format!("point {p} (delay {delay:?})"))?;
        let v =
            s.a.json(&["verify", "--sample", "100"], 0)
                .with_context(|| format!("point {p} (delay {delay:?}): B served a bad pack"))?;
        points.push(json!({
            "point": p,
            "delay_ms": delay.as_millis() as u64,
            "client_exit": code,
            "packs_at_friend": packs,
            "partial_bodies_at_kill": partial,
            "copies_verified": v["passed"],
        }));
    }
    // Every pack has left A's outbox, so these restores fetch everything from B.
    let checked =
        check_all(&s.a, &s.dir, &s.src, &s.copies).context("restoring every snapshot from B")?;
    Ok(json!({
        "kind": "friend",
        "seed": o.seed,
        "window_ms": window_ms,
        "points": points,
        "snapshot_restores_checked": checked,
        "kills_mid_transfer": points.iter().filter(|p| p["partial_bodies_at_kill"].as_u64().unwrap_or(0) > 0).count(),
    }))
}
