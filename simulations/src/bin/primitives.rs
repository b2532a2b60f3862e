//! `primitives`: the physical limit of this machine for obnam's pipeline, and how close obnam
//! gets to it. Run it through `bench/primitives`; docs/performance.md explains the figures.
//!
//! 1. Single-core throughput, on incompressible data in 1 MiB blocks, of each CPU stage, with
//!    the node's own code where it has it: FastCDC (obnam's chunker), keyed BLAKE3 (the chunk
//!    id), zstd at the configured level, XChaCha20-Poly1305 (the node's cipher). Also a disk
//!    write with fsync, and one libp2p stream over loopback with the node's transport settings.
//!    And the disk when it is shared: its write while every core hashes, and a cold read and a
//!    write at once; they bound what 3 and 4 can reach on this disk.
//! 2. The limit: cores ÷ Σ(1/throughput) over chunking, hashing, compression and sealing.
//! 3. The pipeline: a real `obnam-node` with no friends (`replicas = 0`, so packs stay in the
//!    outbox) backs up one file of random bytes; its rate is compared with the limit (≥ 70%).
//! 4. Replication: a node that holds those packs in its outbox gains a friend; the time until
//!    the outbox is empty gives the replication rate, compared with the stream's (≥ 80%).
//!
//! 5. A diagnostic, not a target: 3 and 4 again with the nodes' data directories in memory
//!    (`/dev/shm`), which shows what the disk costs them.
//!
//! Every measurement runs once per round (`--rounds`, 3 by default); the figures are medians.
//!
//! `primitives [--mib N] [--rounds N] [--work DIR] [--out DIR]`

use anyhow::{Context, Result, anyhow, bail};
use chacha20poly1305::XNonce;
use chacha20poly1305::aead::{Aead, Payload};
use obnam_node::chunker::Chunker;
use obnam_node::config::NodeConfig;
use obnam_node::keys::{Keys, MasterSecret};
use obnam_protocol::snapshot::ChunkerParams;
use obnam_simulations::bench::median;
use obnam_simulations::{Bins, Node, wait_until};
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const MB: f64 = 1e6;
const BLOCK: usize = 1 << 20;

/// Deterministic incompressible bytes (xorshift64*).
fn random_bytes(n: usize, mut x: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(n);
    v
}

/// The median rate (MB/s) of three runs of `f` over `bytes` bytes.
fn rate(bytes: usize, mut f: impl FnMut()) -> f64 {
    let runs: Vec<f64> = (0..3)
        .map(|_| {
            let t = Instant::now();
            f();
            bytes as f64 / MB / t.elapsed().as_secs_f64()
        })
        .collect();
    median(&runs).unwrap_or(0.0)
}

struct Options {
    mib: usize,
    rounds: usize,
    work: PathBuf,
    out: PathBuf,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        mib: 512,
        rounds: 3,
        work: PathBuf::from(obnam_simulations::bench::WORK_DIR),
        out: obnam_simulations::bench::results_dir()?,
    };
    let mut f = obnam_simulations::bench::Flags::new(args);
    while let Some(a) = f.next_flag() {
        match a {
            "--mib" => o.mib = f.parsed(a)?,
            "--rounds" => o.rounds = f.parsed(a)?,
            "--work" => o.work = PathBuf::from(f.value(a)?),
            "--out" => o.out = PathBuf::from(f.value(a)?),
            other => bail!(
                "unknown argument {other:?}; usage: primitives [--mib N] [--rounds N] [--work DIR] [--out DIR]"
            ),
        }
    }
    if o.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if o.mib < 16 {
        bail!("--mib must be at least 16");
    }
    Ok(o)
}

/// Single-core rates in MB/s.
fn cpu_stages(data: &[u8], level: i32) -> Result<Value> {
    let keys = Keys::derive(&MasterSecret::generate());
    let mut chunker = Chunker::new(&ChunkerParams::DEFAULT, keys.gear_seed());
    let chunking = rate(data.len(), || {
        std::hint::black_box(chunker.lengths(data));
    });
    let hashing = rate(data.len(), || {
        for b in data.chunks(BLOCK) {
            std::hint::black_box(keys.chunk_id(b));
        }
    });
    let mut compressor = zstd::bulk::Compressor::new(level).context("zstd")?;
    let mut out = vec![0u8; zstd::zstd_safe::compress_bound(BLOCK)];
    let compression = rate(data.len(), || {
        for b in data.chunks(BLOCK) {
            std::hint::black_box(compressor.compress_to_buffer(b, &mut out[..]).ok());
        }
    });
    let nonce = XNonce::from([7u8; 24]);
    let sealing = rate(data.len(), || {
        for b in data.chunks(BLOCK) {
            std::hint::black_box(
                keys.cipher()
                    .encrypt(
                        &nonce,
                        Payload {
                            msg: b,
                            aad: b"bench",
                        },
                    )
                    .ok(),
            );
        }
    });
    Ok(json!({
        "chunking": chunking, "hashing": hashing,
        "compression": compression, "sealing": sealing,
    }))
}

/// Writes `data` to a new file at `path` in 8 MiB writes, then fsyncs it.
fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path)
        .with_context(|| format!("creating the disk test file {}", path.display()))?;
    for b in data.chunks(8 << 20) {
        f.write_all(b)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Disk write with fsync, MB/s: `mib` MiB in 8 MiB writes, then fsync.
fn disk(dir: &Path, data: &[u8]) -> Result<f64> {
    let path = dir.join("primitives-disk.bin");
    let mut runs = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        write_synced(&path, data)?;
        runs.push(data.len() as f64 / MB / t.elapsed().as_secs_f64());
        std::fs::remove_file(&path)?;
    }
    median(&runs).ok_or_else(|| anyhow!("no disk figure"))
}

/// The disk when it is shared, MB/s, each once:
/// - the write with fsync while every core computes keyed BLAKE3: the pipeline's case, whose
///   CPU stages run on the cores that the disk's writes also need;
/// - a cold read and a write with fsync of as many bytes, at once (the rate counts the time
///   until both end): replication's case when both nodes use this disk, the owner reading each
///   pack back from its outbox and the friend writing it.
fn disk_shared(dir: &Path, data: &[u8], cores: usize) -> Result<(f64, f64)> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let target = dir.join("primitives-disk.bin");
    let stop = AtomicBool::new(false);
    let keys = Keys::derive(&MasterSecret::generate());
    let busy = std::thread::scope(|s| {
        for _ in 0..cores {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    for b in data.chunks(BLOCK) {
                        std::hint::black_box(keys.chunk_id(b));
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                    }
                }
            });
        }
        let t = Instant::now();
        let written = write_synced(&target, data);
        let secs = t.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        written.map(|()| data.len() as f64 / MB / secs)
    })?;
    std::fs::remove_file(&target)?;

    // A file of the same size, on the disk and out of the page cache.
    let cold = dir.join("primitives-cold.bin");
    write_synced(&cold, data)?;
    let f = std::fs::File::open(&cold)?;
    nix::fcntl::posix_fadvise(
        &f,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .context("dropping the test file from the page cache")?;
    let t = Instant::now();
    let (read, written) = std::thread::scope(|s| {
        let reader = s.spawn(move || -> std::io::Result<u64> {
            let mut f = f;
            let mut buf = vec![0u8; BLOCK];
            let mut n = 0u64;
            loop {
                match std::io::Read::read(&mut f, &mut buf)? {
                    0 => return Ok(n),
                    k => n += k as u64,
                }
            }
        });
        let written = write_synced(&target, data);
        let read = reader
            .join()
            .map_err(|_| anyhow!("the disk reader panicked"))
            .and_then(|r| r.context("reading the cold test file"));
        (read, written)
    });
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&cold);
    let _ = std::fs::remove_file(&target);
    if read? != data.len() as u64 {
        bail!("the cold test file was short");
    }
    written?;
    Ok((busy, data.len() as f64 / MB / secs))
}

fn outbox_bytes(node: &Node) -> Result<u64> {
    node.status()?["outbox_bytes"]
        .as_u64()
        .ok_or_else(|| anyhow!("no outbox_bytes in status"))
}

/// The pipeline rate (no friend) and the replication rate, MB/s, the replication rate with one
/// lane (if `one_lane`), and the bytes replicated. The source file is in `work`; the nodes'
/// data directories are in `nodes` (the work directory, or a memory file system for the
/// diagnostic without the disk).
fn pipeline_and_replication(
    work: &Path,
    nodes: &Path,
    data: &[u8],
    one_lane: bool,
) -> Result<(f64, f64, Option<f64>, u64)> {
    let bins = Bins::beside_current_exe()?;
    let src = work.join("primitives-src");
    let dir = nodes.join("primitives");
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&src)?;
    std::fs::create_dir_all(&dir)?;
    std::fs::write(src.join("random.bin"), data)?;
    let src_arg = src
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 work directory"))?;

    // The pipeline: no friend, nothing to wait for.
    let mut lone = Node::new(&bins, "lone", &dir.join("lone"), "replicas = 0\n")?;
    lone.start()?;
    lone.init("bench")?;
    let t = Instant::now();
    lone.json(&["backup", src_arg], 0)?;
    let pipeline = data.len() as f64 / MB / t.elapsed().as_secs_f64();
    lone.stop();

    // Replication: one lane (one pack at a time per friend), then the default lanes.
    let one_lane = if one_lane {
        Some(replication(&bins, &dir, src_arg, 1)?.0)
    } else {
        None
    };
    let (replication, replicated) = replication(
        &bins,
        &dir,
        src_arg,
        NodeConfig::default().uploads_in_flight,
    )?;
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&src);
    Ok((pipeline, replication, one_lane, replicated))
}

/// Replication over loopback with `lanes` uploads in flight: a backup with no friend fills the
/// outbox, then a friend appears; MB/s from adding it until the outbox is empty, and the bytes.
fn replication(bins: &Bins, dir: &Path, src_arg: &str, lanes: usize) -> Result<(f64, u64)> {
    let config = format!(
        "replicas = 1\nreplication_timeout_secs = 1\nreplication_interval_secs = 1\nuploads_in_flight = {lanes}\n"
    );
    let tag = format!("lanes{lanes}");
    let mut a = Node::new(bins, "owner", &dir.join(format!("owner-{tag}")), &config)?;
    let mut b = Node::new(bins, "friend", &dir.join(format!("friend-{tag}")), &config)?;
    a.start()?;
    b.start()?;
    a.init("bench")?;
    // Without friends the backup ends at once (0), or after the replication timeout (4).
    let run = a.obnam(&["backup", src_arg, "--json"])?;
    if run.code != 0 && run.code != 4 {
        bail!("the backup failed: {run:?}");
    }
    let stored = run.json()?["stored_bytes"].as_u64().unwrap_or(0);
    let pending = outbox_bytes(&a)?;
    if pending == 0 {
        bail!("the packs left the outbox without a friend");
    }
    b.add_peer(&a, &["--quota", "1TiB"])?;
    let t = Instant::now();
    a.add_peer(&b, &["--quota", "1TiB"])?;
    wait_until("the outbox to empty", Duration::from_secs(600), || {
        Ok(outbox_bytes(&a)? == 0)
    })?;
    let rate = pending as f64 / MB / t.elapsed().as_secs_f64();
    a.stop();
    b.stop();
    Ok((rate, stored.max(pending)))
}

/// One round of every measurement, in the order they run.
struct Round {
    stages: Value,
    limit: f64,
    disk: f64,
    /// [`disk_shared`]: the write while every core hashes, and a read and a write at once.
    disk_busy: f64,
    disk_read_write: f64,
    stream: f64,
    pipeline: f64,
    replication: f64,
    one_lane: f64,
    replicated: u64,
    /// The pipeline and replication rates with every node's data directory in memory
    /// (`/dev/shm`): a diagnostic of what the disk costs, not a target.
    in_memory: Option<(f64, f64)>,
}

/// A directory on a memory file system for the nodes of the diagnostic run, if there is one.
fn memory_dir() -> Option<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("obnam-primitives-")
        .tempdir_in("/dev/shm")
        .ok()
}

fn round(o: &Options, data: &[u8], cores: usize, level: i32) -> Result<Round> {
    eprintln!("CPU stages on {} MiB of random bytes…", o.mib);
    let stages = cpu_stages(data, level)?;
    let inverse: f64 = ["chunking", "hashing", "compression", "sealing"]
        .iter()
        .map(|k| 1.0 / stages[*k].as_f64().unwrap_or(f64::INFINITY))
        .sum();
    eprintln!("disk write with fsync…");
    let disk = disk(&o.work, data)?;
    eprintln!("disk write while every core hashes; disk read and write at once…");
    let (disk_busy, disk_read_write) = disk_shared(&o.work, data, cores)?;
    eprintln!("libp2p stream over loopback…");
    let stream = obnam_node::testing::stream_throughput((o.mib as u64) << 20)? / MB;
    eprintln!("obnam: backup with no friend, then replication to one…");
    let (pipeline, replication, one_lane, replicated) =
        pipeline_and_replication(&o.work, &o.work, data, true)?;
    let one_lane = one_lane.unwrap_or(0.0);
    let in_memory = match memory_dir() {
        Some(mem) => {
            eprintln!("the same with the nodes' data in memory (/dev/shm)…");
            let (p, r, _, _) = pipeline_and_replication(&o.work, mem.path(), data, false)?;
            Some((p, r))
        }
        None => None,
    };
    Ok(Round {
        stages,
        limit: cores as f64 / inverse,
        disk,
        disk_busy,
        disk_read_write,
        stream,
        pipeline,
        replication,
        one_lane,
        replicated,
        in_memory,
    })
}

fn run(o: Options) -> Result<()> {
    std::fs::create_dir_all(&o.work)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let level = NodeConfig::default().zstd_level;
    let data = random_bytes(o.mib << 20, 0x9e37_79b9_7f4a_7c15);
    // Every measurement once per round, the rounds one after the other: each share compares
    // figures taken within the same minute, and the tables give the medians over the rounds
    // (this machine's speed moves by a third between minutes).
    let mut rounds = Vec::new();
    for r in 1..=o.rounds {
        eprintln!("round {r} of {}", o.rounds);
        rounds.push(round(&o, &data, cores, level)?);
    }
    let med = |f: &dyn Fn(&Round) -> f64| {
        median(&rounds.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0)
    };
    let stage = |k: &'static str| move |r: &Round| r.stages[k].as_f64().unwrap_or(0.0);
    let stages = json!({
        "chunking": med(&stage("chunking")),
        "hashing": med(&stage("hashing")),
        "compression": med(&stage("compression")),
        "sealing": med(&stage("sealing")),
    });
    let (limit, disk_rate, stream) = (med(&|r| r.limit), med(&|r| r.disk), med(&|r| r.stream));
    let (disk_busy, disk_rw) = (med(&|r| r.disk_busy), med(&|r| r.disk_read_write));
    // What the disk alone allows each target, as a share of what the target is measured
    // against, from the same round's figures.
    let busy_share = med(&|r| r.disk_busy / r.limit);
    let rw_share = med(&|r| r.disk_read_write / r.stream);
    let (pipeline, replication, one_lane) = (
        med(&|r| r.pipeline),
        med(&|r| r.replication),
        med(&|r| r.one_lane),
    );
    let pipeline_share = med(&|r| r.pipeline / r.limit);
    let replication_share = med(&|r| r.replication / r.stream);
    let one_lane_share = med(&|r| r.one_lane / r.stream);
    let replicated = rounds.iter().map(|r| r.replicated).max().unwrap_or(0);
    // The diagnostic without the disk, where every round had a memory file system.
    let in_memory = if rounds.iter().all(|r| r.in_memory.is_some()) {
        let m =
            |f: &dyn Fn(&Round, (f64, f64)) -> f64| med(&|r| r.in_memory.map_or(0.0, |x| f(r, x)));
        Some((
            m(&|_, x| x.0),
            m(&|r, x| x.0 / r.limit),
            m(&|_, x| x.1),
            m(&|r, x| x.1 / r.stream),
        ))
    } else {
        None
    };
    let per_round: Vec<Value> = rounds
        .iter()
        .map(|r| {
            json!({
                "single_core_mb_s": r.stages, "limit_mb_s": r.limit, "disk_fsync_mb_s": r.disk,
                "disk_fsync_cores_busy_mb_s": r.disk_busy,
                "disk_read_and_write_mb_s": r.disk_read_write,
                "libp2p_stream_mb_s": r.stream, "pipeline_mb_s": r.pipeline,
                "replication_mb_s": r.replication, "replication_one_lane_mb_s": r.one_lane,
                "pipeline_share": r.pipeline / r.limit,
                "replication_share": r.replication / r.stream,
                "in_memory": r.in_memory.map(|(p, rep)| json!({
                    "pipeline_mb_s": p, "replication_mb_s": rep,
                })),
            })
        })
        .collect();
    let shares = |f: &dyn Fn(&Round) -> f64| {
        rounds
            .iter()
            .map(|r| format!("{:.0}%", 100.0 * f(r)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let pipeline_rounds = shares(&|r| r.pipeline / r.limit);
    let replication_rounds = shares(&|r| r.replication / r.stream);
    let date = obnam_simulations::bench::today()?;
    let doc = json!({
        "date": date,
        "cores": cores,
        "mib": o.mib,
        "rounds": o.rounds,
        "zstd_level": level,
        "single_core_mb_s": stages,
        "disk_fsync_mb_s": disk_rate,
        "disk_fsync_cores_busy_mb_s": disk_busy,
        "disk_read_and_write_mb_s": disk_rw,
        "disk_bound_shares": {"pipeline": busy_share, "replication": rw_share},
        "libp2p_stream_mb_s": stream,
        "limit_mb_s": limit,
        "pipeline_mb_s": pipeline,
        "pipeline_share": pipeline_share,
        "replication_mb_s": replication,
        "replication_share": replication_share,
        "replication_one_lane_mb_s": one_lane,
        "uploads_in_flight": NodeConfig::default().uploads_in_flight,
        "replicated_bytes": replicated,
        "per_round": per_round,
        "in_memory": in_memory.map(|(p, ps, r, rs)| json!({
            "pipeline_mb_s": p, "pipeline_share": ps,
            "replication_mb_s": r, "replication_share": rs,
        })),
        "targets": {"pipeline_share": 0.7, "replication_share": 0.8},
    });
    let f = |k: &str| stages[k].as_f64().unwrap_or(0.0);
    let md = format!(
        "# Primitives {date}\n\n{cores} cores; {mib} MiB of incompressible data; zstd level {level}.\n\n\
         | measure | MB/s |\n|---|---|\n\
         | FastCDC (obnam's chunker), one core | {:.0} |\n\
         | keyed BLAKE3 (chunk ids), one core | {:.0} |\n\
         | zstd level {level} (incompressible input), one core | {:.0} |\n\
         | XChaCha20-Poly1305 seal, one core | {:.0} |\n\
         | **limit**: {cores} cores ÷ Σ(1/throughput) | **{limit:.0}** |\n\
         | disk write with fsync | {disk_rate:.0} |\n\
         | disk write with fsync while every core computes BLAKE3 | {disk_busy:.0} |\n\
         | disk: a cold read and a write with fsync of as many bytes, at once | {disk_rw:.0} |\n\
         | libp2p stream over loopback (TCP, Noise, Yamux) | {stream:.0} |\n\n\
         | target | measured | share | needed |\n|---|---|---|---|\n\
         | backup with no friend (packs to the outbox) | {pipeline:.0} MB/s | {:.0}% of the limit (rounds: {pipeline_rounds}) | ≥ 70% |\n\
         | replication to one friend over loopback | {replication:.0} MB/s | {:.0}% of the stream (rounds: {replication_rounds}) | ≥ 80% |\n\n\
         Medians of {rounds} rounds; each share is the median of the rounds' shares, each round's \
         figures taken within the same minute. \
         Replication with one upload at a time per friend (`uploads_in_flight = 1`), same rounds: \
         {one_lane:.0} MB/s ({:.0}% of the stream); the default is {lanes}.\n\n\
         What the disk allows, from the same rounds: the pipeline writes every byte it seals while \
         its stages keep the cores busy, so on this disk it cannot pass {disk_busy:.0} MB/s \
         ({:.0}% of the limit); replication between two nodes on this disk reads every byte back \
         and writes it at the friend, so it cannot pass {disk_rw:.0} MB/s ({:.0}% of the stream).\n",
        f("chunking"),
        f("hashing"),
        f("compression"),
        f("sealing"),
        100.0 * pipeline_share,
        100.0 * replication_share,
        100.0 * one_lane_share,
        100.0 * busy_share,
        100.0 * rw_share,
        rounds = o.rounds,
        mib = o.mib,
        lanes = NodeConfig::default().uploads_in_flight,
    );
    let md = match in_memory {
        Some((p, ps, r, rs)) => format!(
            "{md}\nDiagnostic, not a target: the same backup and replication with every node's \
             data directory in memory (`/dev/shm`), the disk taken out: backup {p:.0} MB/s \
             ({:.0}% of the limit), replication {r:.0} MB/s ({:.0}% of the stream).\n",
            100.0 * ps,
            100.0 * rs
        ),
        None => md,
    };
    obnam_simulations::bench::write_results(&o.out, &date, "primitives", &doc, &md)?;
    Ok(())
}

fn main() -> ExitCode {
    obnam_simulations::bench::main_with("primitives", parse, run)
}
