//! `scale`: how obnam's backup behaves as the number of files grows. Run it through
//! `bench/scale`; docs/performance.md explains the figures.
//!
//! For each count (100 000 and 1 000 000 by default) it makes a tree of that many small files
//! (64 B to 1 KiB of distinct bytes each, `--per-dir` files per directory; kept and reused
//! between runs), starts a fresh `obnam-node` with no friends (`replicas = 0`, so packs stay in
//! the outbox), and measures two backups: the first one, which reads everything, and a second
//! one, which finds every file in the file cache. For each it records the wall time, the time
//! per file, and the node's CPU time and peak RSS (reset between the two). The target: the
//! node's peak RSS at the largest count is under 1.5× that at the smallest.
//!
//! `scale [--counts 100000,1000000] [--per-dir N] [--work DIR] [--out DIR] [--max-minutes M]`

use anyhow::{Context, Result, anyhow, bail};
use obnam_simulations::bench::{Watch, disk_usage};
use obnam_simulations::{Bins, Node, run_with_timeout};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const MIB: f64 = 1024.0 * 1024.0;

struct Options {
    counts: Vec<u64>,
    per_dir: u64,
    work: PathBuf,
    out: PathBuf,
    max_minutes: u64,
}

const USAGE: &str = "usage: scale [--counts 100000,1000000] [--per-dir N] [--work DIR] \
                     [--out DIR] [--max-minutes M]";

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        counts: vec![100_000, 1_000_000],
        per_dir: 1000,
        work: PathBuf::from(obnam_simulations::bench::WORK_DIR),
        out: obnam_simulations::bench::results_dir()?,
        max_minutes: 90,
    };
    let mut f = obnam_simulations::bench::Flags::new(args);
    while let Some(a) = f.next_flag() {
        match a {
            "--counts" => {
                o.counts = f
                    .value(a)?
                    .split(',')
                    .map(|c| c.trim().parse::<u64>().context("--counts"))
                    .collect::<Result<_>>()?;
            }
            "--per-dir" => o.per_dir = f.parsed(a)?,
            "--work" => o.work = PathBuf::from(f.value(a)?),
            "--out" => o.out = PathBuf::from(f.value(a)?),
            "--max-minutes" => o.max_minutes = f.parsed(a)?,
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    if o.counts.is_empty() || o.counts.contains(&0) || o.per_dir == 0 {
        bail!("--counts and --per-dir must be positive; {USAGE}");
    }
    o.counts.sort_unstable();
    o.counts.dedup();
    Ok(o)
}

/// The bytes of file `i`: a header naming it, then up to 1 KiB of deterministic noise, so that
/// every file is a distinct chunk.
fn content(i: u64) -> Vec<u8> {
    let len = 64 + (i.wrapping_mul(7919) % 961) as usize;
    let mut v = format!("file {i}\n").into_bytes();
    let mut x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// The tree of `count` files under `work/files-COUNT`, made once and reused (a marker file
/// records that it is complete).
fn tree(work: &Path, count: u64, per_dir: u64) -> Result<(PathBuf, u64)> {
    let dir = work.join(format!("files-{count}-{per_dir}"));
    let marker = work.join(format!("files-{count}-{per_dir}.complete"));
    let bytes: u64 = (0..count).map(|i| content(i).len() as u64).sum();
    if marker.exists() {
        return Ok((dir, bytes));
    }
    eprintln!("making {count} files in {}…", dir.display());
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
    }
    for i in 0..count {
        let sub = dir.join(format!("d{:05}", i / per_dir));
        if i % per_dir == 0 {
            std::fs::create_dir_all(&sub).with_context(|| format!("creating {}", sub.display()))?;
        }
        let path = sub.join(format!("f{i:08}"));
        std::fs::write(&path, content(i)).with_context(|| format!("writing {}", path.display()))?;
    }
    // The file cache re-reads files changed within its margin before a backup.
    std::thread::sleep(Duration::from_secs(3));
    std::fs::write(&marker, b"")?;
    Ok((dir, bytes))
}

/// One measured backup: wall seconds, the node's usage, the report.
fn backup(node: &Node, src: &Path, timeout: Duration) -> Result<Value> {
    let pid = node
        .pid()
        .ok_or_else(|| anyhow!("the node is not running"))?;
    let src = src
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 work directory"))?;
    // Start from a quiet disk: the write-back of the tree or of an earlier run's files would
    // otherwise land in this measurement.
    run_with_timeout(std::process::Command::new("sync"), timeout)?;
    let watch = Watch::start(pid)?;
    let t = Instant::now();
    let run = run_with_timeout(node.command(&["backup", src, "--json"]), timeout)?;
    let wall = t.elapsed().as_secs_f64();
    let usage = watch.finish()?;
    if run.code != 0 {
        bail!("the backup exited {}: {run:?}\n{}", run.code, node.log());
    }
    let report = run.json()?;
    Ok(json!({
        "wall_s": wall,
        "node_cpu_s": usage.cpu_s,
        "node_peak_rss": usage.peak_rss,
        "files": report["files"],
        "cached_files": report["cached_files"],
        "new_bytes": report["new_bytes"],
    }))
}

fn measure_count(bins: &Bins, o: &Options, count: u64, deadline: Instant) -> Result<Value> {
    let (src, bytes) = tree(&o.work, count, o.per_dir)?;
    let dir = o.work.join("scale-node");
    let _ = std::fs::remove_dir_all(&dir);
    let mut node = Node::new(bins, "scale", &dir, "replicas = 0\n")?;
    node.start()?;
    node.init("scale")?;
    let left = || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("the benchmark ran out of time (--max-minutes)");
        }
        Ok(left)
    };
    eprintln!("{count} files: first backup…");
    let first = backup(&node, &src, left()?)?;
    eprintln!("{count} files: unchanged backup…");
    let second = backup(&node, &src, left()?)?;
    if first["files"].as_u64() != Some(count) {
        bail!("the first backup saw {} files, not {count}", first["files"]);
    }
    if second["cached_files"].as_u64() != Some(count) {
        bail!(
            "the unchanged backup read {} files again",
            count - second["cached_files"].as_u64().unwrap_or(0)
        );
    }
    let data_dir_bytes = disk_usage(&node.data_dir).unwrap_or(0);
    node.stop();
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
    let per_file_us = |v: &Value| v["wall_s"].as_f64().unwrap_or(0.0) * 1e6 / count as f64;
    Ok(json!({
        "files": count,
        "bytes": bytes,
        "first": first,
        "unchanged": second,
        "first_us_per_file": per_file_us(&first),
        "unchanged_us_per_file": per_file_us(&second),
        "data_dir_bytes": data_dir_bytes,
    }))
}

fn run(o: Options) -> Result<()> {
    std::fs::create_dir_all(&o.work)?;
    let bins = Bins::beside_current_exe()?;
    let deadline = Instant::now() + Duration::from_secs(o.max_minutes * 60);
    let mut rows = Vec::new();
    for &count in &o.counts {
        rows.push(measure_count(&bins, &o, count, deadline)?);
    }
    let rss = |r: &Value| {
        r["first"]["node_peak_rss"]
            .as_u64()
            .max(r["unchanged"]["node_peak_rss"].as_u64())
            .unwrap_or(0) as f64
    };
    let (small, large) = (&rows[0], &rows[rows.len() - 1]);
    let ratio = rss(large) / rss(small).max(1.0);
    let date = obnam_simulations::bench::today()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let doc = json!({
        "date": date,
        "cores": cores,
        "per_dir": o.per_dir,
        "runs": rows,
        "rss_ratio": ratio,
        "rss_ratio_between": [small["files"], large["files"]],
        "target": {"rss_ratio": 1.5},
    });
    let mut md = format!(
        "# Scale {date}\n\n{cores} cores; small files of 64 B to 1 KiB, {} per directory; a \
         node with no friend (packs stay in the outbox). Peak RSS is the backing-up node's.\n\n\
         | files | data | first backup | per file | node CPU | node peak RSS | unchanged backup \
         | per file | node peak RSS | data dir |\n|---|---|---|---|---|---|---|---|---|---|\n",
        o.per_dir
    );
    for r in &rows {
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
        md += &format!(
            "| {} | {:.0} MiB | {:.1} s | {:.0} µs | {:.1} s | {:.0} MiB | {:.1} s | {:.0} µs \
             | {:.0} MiB | {:.0} MiB |\n",
            r["files"],
            f(r, "bytes") / MIB,
            f(&r["first"], "wall_s"),
            f(r, "first_us_per_file"),
            f(&r["first"], "node_cpu_s"),
            f(&r["first"], "node_peak_rss") / MIB,
            f(&r["unchanged"], "wall_s"),
            f(r, "unchanged_us_per_file"),
            f(&r["unchanged"], "node_peak_rss") / MIB,
            f(r, "data_dir_bytes") / MIB,
        );
    }
    md += &format!(
        "\nPeak RSS at {} files ÷ at {} files: **{ratio:.2}** (target < 1.5: {}).\n",
        large["files"],
        small["files"],
        if ratio < 1.5 { "met" } else { "not met" }
    );
    obnam_simulations::bench::write_results(&o.out, &date, "scale", &doc, &md)?;
    Ok(())
}

fn main() -> ExitCode {
    obnam_simulations::bench::main_with("scale", parse, run)
}
