//! `tune`: measurements behind the choice of chunk sizes, zstd level and pack size. Run it
//! through `bench/tune`; docs/performance.md records the choices and these figures.
//!
//! On a `make-dataset` tree (medium by default) and a copy changed by `mutate-dataset`:
//! 1. **Chunk sizes.** For each FastCDC parameter set (min / average / max), with the node's own
//!    `Chunker` and keyed chunk ids: the chunks and unique bytes of the tree, the bytes a backup
//!    after the 1% mutation must store anew (deduplication), and the chunking rate on one core.
//!    Fewer, larger chunks mean a smaller index and less per-chunk overhead; smaller chunks
//!    deduplicate edits better.
//! 2. **zstd level.** Every unique chunk (with the default chunk sizes) compressed at each level:
//!    the stored share and the single-core rate.
//! 3. **Pack size.** From the sealed size of the tree: how many packs each target size makes,
//!    what padding to 64 KiB costs, and how many fsyncs and pack transfers a backup needs.
//!
//! `tune [--dataset tiny|small|medium] [--work DIR] [--out DIR]`

use anyhow::{Context, Result, anyhow, bail};
use obnam_node::chunker::Chunker;
use obnam_node::keys::{Keys, MasterSecret};
use obnam_protocol::snapshot::ChunkerParams;
use obnam_simulations::bench::{pristine_dataset, remove_tree};
use obnam_simulations::shared_bench;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

const MIB: f64 = 1024.0 * 1024.0;
const MB: f64 = 1e6;
const KIB: u32 = 1024;

struct Options {
    dataset: String,
    work: PathBuf,
    out: PathBuf,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        dataset: "medium".into(),
        work: PathBuf::from(obnam_simulations::bench::WORK_DIR),
        out: obnam_simulations::bench::results_dir()?,
    };
    let mut f = obnam_simulations::bench::Flags::new(args);
    while let Some(a) = f.next_flag() {
        match a {
            "--dataset" => o.dataset = f.value(a)?,
            "--work" => o.work = PathBuf::from(f.value(a)?),
            "--out" => o.out = PathBuf::from(f.value(a)?),
            other => bail!(
                "unknown argument {other:?}; usage: tune [--dataset tiny|small|medium] \
                 [--work DIR] [--out DIR]"
            ),
        }
    }
    Ok(o)
}

/// Every regular file below `dir`, in a stable order.
fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .with_context(|| format!("listing {}", d.display()))?
            .collect::<Result<_, _>>()?;
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for e in entries {
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file() {
                out.push(e.path());
            }
        }
    }
    Ok(out)
}

/// Calls `f` with every chunk of every file, cut with `params`; returns the chunking time.
fn each_chunk(
    list: &[PathBuf],
    params: &ChunkerParams,
    keys: &Keys,
    mut f: impl FnMut(&[u8]),
) -> Result<Duration> {
    let mut chunker = Chunker::new(params, keys.gear_seed());
    let mut cutting = Duration::ZERO;
    for path in list {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        chunker.reset();
        loop {
            let t = Instant::now();
            let next = chunker.next_chunk(&mut file);
            cutting += t.elapsed();
            match next {
                None => break,
                Some(Ok(chunk)) => f(chunk),
                Some(Err(e)) => {
                    return Err(e).with_context(|| format!("reading {}", path.display()));
                }
            }
        }
    }
    Ok(cutting)
}

fn params(min: u32, avg: u32, max: u32) -> ChunkerParams {
    ChunkerParams {
        min,
        avg,
        max,
        ..ChunkerParams::V1
    }
}

fn run(o: Options) -> Result<()> {
    let shared = shared_bench().ok_or_else(|| anyhow!("../shared/bench is missing"))?;
    std::fs::create_dir_all(&o.work)?;
    let pristine = pristine_dataset(&shared, &o.work, &o.dataset)?;
    let mutated = o.work.join("tune-mutated");
    remove_tree(&mutated)?;
    let ok = Command::new("cp")
        .arg("-a")
        .arg(&pristine)
        .arg(&mutated)
        .status()?;
    if !ok.success() {
        bail!("copying the dataset failed");
    }
    let ok = Command::new(shared.join("mutate-dataset"))
        .arg(&mutated)
        .status()?;
    if !ok.success() {
        bail!("mutate-dataset failed");
    }
    let before = files(&pristine)?;
    let after = files(&mutated)?;
    let total: u64 = before
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    let keys = Keys::derive(&MasterSecret::generate());

    eprintln!("chunk sizes…");
    let candidates = [
        params(64 * KIB, 256 * KIB, 1024 * KIB),
        ChunkerParams::DEFAULT,
        ChunkerParams::V1,
        params(512 * KIB, 2048 * KIB, 4096 * KIB),
    ];
    let mut chunking = Vec::new();
    for p in &candidates {
        let mut seen = HashSet::new();
        let (mut chunks, mut unique) = (0u64, 0u64);
        let cut = each_chunk(&before, p, &keys, |c| {
            chunks += 1;
            if seen.insert(keys.chunk_id(c)) {
                unique += c.len() as u64;
            }
        })?;
        let mut new_bytes = 0u64;
        each_chunk(&after, p, &keys, |c| {
            if seen.insert(keys.chunk_id(c)) {
                new_bytes += c.len() as u64;
            }
        })?;
        eprintln!(
            "  {}/{}/{} KiB: {chunks} chunks, {new_bytes} new bytes after the mutation",
            p.min / KIB,
            p.avg / KIB,
            p.max / KIB
        );
        chunking.push(json!({
            "min": p.min, "avg": p.avg, "max": p.max,
            "chunks": chunks,
            "unique_bytes": unique,
            "new_bytes_after_mutation": new_bytes,
            "chunking_mb_s": total as f64 / MB / cut.as_secs_f64(),
        }));
    }

    eprintln!("zstd levels…");
    let levels = [1, 3, 6, 9];
    let mut compressors = levels
        .iter()
        .map(|&l| zstd::bulk::Compressor::new(l).map(|c| (l, c, 0u64, Duration::ZERO)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = HashSet::new();
    let mut unique = 0u64;
    let mut out = vec![0u8; zstd::zstd_safe::compress_bound(4 << 20)];
    each_chunk(&before, &ChunkerParams::DEFAULT, &keys, |c| {
        if !seen.insert(keys.chunk_id(c)) {
            return;
        }
        unique += c.len() as u64;
        for (_, comp, stored, time) in &mut compressors {
            let t = Instant::now();
            let n = comp.compress_to_buffer(c, &mut out[..]).unwrap_or(c.len());
            *time += t.elapsed();
            // The node stores a chunk uncompressed when zstd does not make it smaller.
            *stored += n.min(c.len()) as u64;
        }
    })?;
    let zstd: Vec<Value> = compressors
        .iter()
        .map(|(l, _, stored, time)| {
            json!({
                "level": l,
                "stored_bytes": stored,
                "stored_share": *stored as f64 / unique as f64,
                "mb_s": unique as f64 / MB / time.as_secs_f64(),
            })
        })
        .collect();

    // Pack sizes, from the sealed size at the default level (3): each pack is padded to the
    // next 64 KiB (half of that on average).
    let sealed = zstd
        .iter()
        .find(|z| z["level"] == 3)
        .and_then(|z| z["stored_bytes"].as_u64())
        .unwrap_or(unique);
    let packs: Vec<Value> = [4u64, 8, 16, 32]
        .iter()
        .map(|&mib| {
            let count = sealed.div_ceil(mib << 20);
            let padding = count * 32 * 1024;
            json!({
                "target_mib": mib,
                "packs": count,
                "padding_share": padding as f64 / sealed as f64,
            })
        })
        .collect();

    let date = obnam_simulations::bench::today()?;
    let doc = json!({
        "date": date,
        "dataset": o.dataset,
        "bytes": total,
        "files": before.len(),
        "chunking": chunking,
        "zstd": zstd,
        "packs": packs,
    });
    let mut md = format!(
        "# Tuning {date}\n\nThe {} dataset: {} files, {:.0} MiB; then `mutate-dataset`. One core.\n\n\
         ## Chunk sizes (FastCDC min / average / max)\n\n\
         | sizes | chunks | unique MiB | new MiB after the 1% mutation | chunking MB/s |\n\
         |---|---|---|---|---|\n",
        o.dataset,
        before.len(),
        total as f64 / MIB
    );
    for c in &chunking {
        let kib = |k: &str| c[k].as_u64().unwrap_or(0) / 1024;
        md += &format!(
            "| {} / {} / {} KiB | {} | {:.0} | {:.1} | {:.0} |\n",
            kib("min"),
            kib("avg"),
            kib("max"),
            c["chunks"],
            c["unique_bytes"].as_f64().unwrap_or(0.0) / MIB,
            c["new_bytes_after_mutation"].as_f64().unwrap_or(0.0) / MIB,
            c["chunking_mb_s"].as_f64().unwrap_or(0.0),
        );
    }
    md += "\n## zstd level (unique chunks, the default chunk sizes)\n\n\
           | level | stored share | MB/s, one core |\n|---|---|---|\n";
    for z in &zstd {
        md += &format!(
            "| {} | {:.3} | {:.0} |\n",
            z["level"],
            z["stored_share"].as_f64().unwrap_or(0.0),
            z["mb_s"].as_f64().unwrap_or(0.0)
        );
    }
    md += "\n## Pack size (sealed data at level 3, padding to 64 KiB)\n\n\
           | target | packs (fsyncs, transfers) | padding share |\n|---|---|---|\n";
    for p in &packs {
        md += &format!(
            "| {} MiB | {} | {:.4} |\n",
            p["target_mib"],
            p["packs"],
            p["padding_share"].as_f64().unwrap_or(0.0)
        );
    }
    obnam_simulations::bench::write_results(&o.out, &date, "tune", &doc, &md)?;
    remove_tree(&mutated)?;
    Ok(())
}

fn main() -> ExitCode {
    obnam_simulations::bench::main_with("tune", parse, run)
}
