//! `owners`: one storage node serving many owners at once. Run it through `bench/owners`;
//! docs/performance.md explains the figures.
//!
//! A real `obnam-node` process (the storage node, its redb store and `hosted/` files) gets
//! `--registered` friends (1000 by default), each with a quota, and every one of them binds an
//! owner key (proves it). Then, for each of `--rounds` rounds:
//! 1. one owner stores `--single-packs` packs;
//! 2. `--owners` owners (100 by default) store `--packs` packs each, all at once.
//!
//! The owners run in this process ([`obnam_node::testing::load`]), each with its own libp2p
//! swarm and TCP connection on loopback. For each phase the benchmark records the aggregate rate
//! (pack bytes ÷ seconds from the moment every owner is ready until the last pack is
//! acknowledged) and the storage node's CPU time and peak RSS. Targets: every upload completes
//! (the node's `hosted_bytes` grows by exactly what was sent), the aggregate rate with many
//! owners is at least 80% of the rate with one, and the node's memory stays bounded.
//!
//! `owners [--owners N] [--registered N] [--packs N] [--single-packs N] [--pack-mib N]
//!         [--rounds N] [--work DIR] [--out DIR]`

use anyhow::{Context, Result, anyhow, bail};
use obnam_node::testing::load;
use obnam_simulations::bench::{Watch, median};
use obnam_simulations::{Bins, Node};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

const MIB: f64 = 1024.0 * 1024.0;
const MB: f64 = 1e6;

struct Options {
    owners: u32,
    registered: u32,
    packs: u32,
    single_packs: u32,
    pack_mib: usize,
    rounds: u32,
    work: PathBuf,
    out: PathBuf,
}

const USAGE: &str = "usage: owners [--owners N] [--registered N] [--packs N] [--single-packs N] \
                     [--pack-mib N] [--rounds N] [--work DIR] [--out DIR]";

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        owners: 100,
        registered: 1000,
        packs: 3,
        single_packs: 48,
        pack_mib: 8,
        rounds: 3,
        work: PathBuf::from(obnam_simulations::bench::WORK_DIR),
        out: obnam_simulations::bench::results_dir()?,
    };
    let mut f = obnam_simulations::bench::Flags::new(args);
    while let Some(a) = f.next_flag() {
        match a {
            "--owners" => o.owners = f.parsed(a)?,
            "--registered" => o.registered = f.parsed(a)?,
            "--packs" => o.packs = f.parsed(a)?,
            "--single-packs" => o.single_packs = f.parsed(a)?,
            "--pack-mib" => o.pack_mib = f.parsed(a)?,
            "--rounds" => o.rounds = f.parsed(a)?,
            "--work" => o.work = PathBuf::from(f.value(a)?),
            "--out" => o.out = PathBuf::from(f.value(a)?),
            other => bail!("unknown argument {other:?}; {USAGE}"),
        }
    }
    if o.owners == 0 || o.packs == 0 || o.single_packs == 0 || o.pack_mib == 0 || o.rounds == 0 {
        bail!("every count must be positive; {USAGE}");
    }
    // Every phase uses owners of its own, so no pack is ever already stored.
    o.registered = o.registered.max(o.rounds * (o.owners + 1));
    Ok(o)
}

fn hosted_bytes(node: &Node) -> Result<u64> {
    node.status()?["hosted_bytes"]
        .as_u64()
        .ok_or_else(|| anyhow!("no hosted_bytes in status"))
}

/// One measured phase: `owners` store `packs` packs each, from owner index `first` on.
fn phase(
    node: &Node,
    target: &str,
    first: u32,
    owners: u32,
    packs: u32,
    o: &Options,
) -> Result<Value> {
    let pid = node
        .pid()
        .ok_or_else(|| anyhow!("the storage node is not running"))?;
    let before = hosted_bytes(node)?;
    let watch = Watch::start(pid)?;
    let t = Instant::now();
    let r = load::upload(target, first..first + owners, packs, o.pack_mib << 20)
        .with_context(|| format!("{owners} owners uploading"))?;
    let wall = t.elapsed().as_secs_f64();
    let usage = watch.finish()?;
    let after = hosted_bytes(node)?;
    if after - before != r.bytes {
        bail!(
            "the storage node holds {} new bytes, but {} were acknowledged",
            after - before,
            r.bytes
        );
    }
    eprintln!(
        "  {owners} owner(s): {:.0} MB/s, {} retries, node peak RSS {:.0} MiB",
        r.bytes as f64 / MB / r.secs,
        r.retries,
        usage.peak_rss as f64 / MIB
    );
    Ok(json!({
        "owners": owners,
        "packs": r.packs,
        "bytes": r.bytes,
        "secs": r.secs,
        "wall_s": wall,
        "mb_s": r.bytes as f64 / MB / r.secs,
        "retries": r.retries,
        "node_cpu_s": usage.cpu_s,
        "node_peak_rss": usage.peak_rss,
    }))
}

fn run(o: Options) -> Result<()> {
    let bins = Bins::beside_current_exe()?;
    let dir = o.work.join("owners");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut node = Node::new(&bins, "storage", &dir.join("storage"), "replicas = 0\n")?;
    node.start()?;
    node.init("storage")?;
    let pid = node
        .pid()
        .ok_or_else(|| anyhow!("the storage node is not running"))?;
    let target = format!(
        "{}/p2p/{}",
        node.addrs
            .first()
            .ok_or_else(|| anyhow!("the storage node listens nowhere"))?,
        node.peer_id
    );
    // Each owner may store everything it sends in every round, and then some.
    let per_owner =
        u64::from(o.rounds) * u64::from(o.packs.max(o.single_packs)) * ((o.pack_mib as u64) << 20);
    let quota = format!("{}MiB", (per_owner >> 20) * 2 + 64);

    eprintln!(
        "registering {} friends with a quota of {quota} each…",
        o.registered
    );
    let t = Instant::now();
    for i in 0..o.registered {
        let id = load::owner_peer_id(i)?;
        node.json(&["peer", "add", &id, "--quota", &quota], 0)
            .with_context(|| format!("adding friend {i}"))?;
    }
    let add_s = t.elapsed().as_secs_f64();
    let watch = Watch::start(pid)?;
    let t = Instant::now();
    let register_retries = load::register(&target, 0..o.registered, 32)?;
    let bind_s = t.elapsed().as_secs_f64();
    let registered = watch.finish()?;
    let status = node.status()?;
    eprintln!(
        "{} owners bound in {bind_s:.1} s ({register_retries} retries); node peak RSS {:.0} MiB",
        o.registered,
        registered.peak_rss as f64 / MIB
    );

    let mut single = Vec::new();
    let mut many = Vec::new();
    for round in 0..o.rounds {
        eprintln!("round {}:", round + 1);
        // Owners get fresh pack ids each round from their index range: owner 0 and the many
        // owners are told apart by index, and every round uses other owners' indexes for the
        // single phase so no pack is ever "already stored".
        single.push(phase(&node, &target, round, 1, o.single_packs, &o)?);
        many.push(phase(
            &node,
            &target,
            o.rounds + round * o.owners,
            o.owners,
            o.packs,
            &o,
        )?);
    }
    let rate = |v: &[Value]| {
        median(
            &v.iter()
                .filter_map(|x| x["mb_s"].as_f64())
                .collect::<Vec<_>>(),
        )
        .unwrap_or(0.0)
    };
    let rss = |v: &[Value]| {
        v.iter()
            .filter_map(|x| x["node_peak_rss"].as_u64())
            .max()
            .unwrap_or(0)
    };
    let (one, all) = (rate(&single), rate(&many));
    let share = all / one.max(f64::MIN_POSITIVE);
    let final_status = node.status()?;
    node.stop();
    let date = obnam_simulations::bench::today()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let doc = json!({
        "date": date,
        "cores": cores,
        "pack_mib": o.pack_mib,
        "registered": o.registered,
        "peer_add_s": add_s,
        "bind_s": bind_s,
        "bind_retries": register_retries,
        "registered_peak_rss": registered.peak_rss,
        "status_after_binding": status,
        "single": single,
        "many": many,
        "single_mb_s": one,
        "many_mb_s": all,
        "share": share,
        "single_peak_rss": rss(&single),
        "many_peak_rss": rss(&many),
        "hosted_bytes": final_status["hosted_bytes"],
        "target": {"share": 0.8},
    });
    let md = format!(
        "# Many owners {date}\n\n{cores} cores; one storage node (`obnam-node`, default limits) \
         with {registered} friends, each with a quota of {quota} and a bound owner key; owners \
         in one process, each with its own libp2p swarm and TCP connection on loopback; packs \
         of {pack} MiB; {rounds} rounds, medians.\n\n\
         | phase | owners | packs each | aggregate MB/s | retries (median) | node CPU s (median) \
         | node peak RSS (max) |\n|---|---|---|---|---|---|---|\n\
         | one owner | 1 | {sp} | {one:.0} | {r1} | {c1:.1} | {m1:.0} MiB |\n\
         | many owners at once | {owners} | {mp} | {all:.0} | {r2} | {c2:.1} | {m2:.0} MiB |\n\n\
         Many ÷ one: **{pct:.0}%** (target ≥ 80%: {met}). Binding {registered} owner keys took \
         {bind_s:.1} s; the node's peak RSS then was {mr:.0} MiB. `peer add` × {registered}: \
         {add_s:.0} s. Every upload completed: the node's `hosted_bytes` grew by exactly the \
         bytes acknowledged in every phase ({hb:.0} MiB in all).\n",
        registered = o.registered,
        pack = o.pack_mib,
        rounds = o.rounds,
        sp = o.single_packs,
        owners = o.owners,
        mp = o.packs,
        r1 = median_of(&single, "retries"),
        r2 = median_of(&many, "retries"),
        c1 = median_of(&single, "node_cpu_s"),
        c2 = median_of(&many, "node_cpu_s"),
        m1 = rss(&single) as f64 / MIB,
        m2 = rss(&many) as f64 / MIB,
        pct = share * 100.0,
        met = if share >= 0.8 { "met" } else { "not met" },
        mr = registered.peak_rss as f64 / MIB,
        hb = final_status["hosted_bytes"].as_f64().unwrap_or(0.0) / MIB,
    );
    obnam_simulations::bench::write_results(&o.out, &date, "owners", &doc, &md)?;
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn median_of(v: &[Value], key: &str) -> f64 {
    median(&v.iter().filter_map(|x| x[key].as_f64()).collect::<Vec<_>>()).unwrap_or(0.0)
}

fn main() -> ExitCode {
    obnam_simulations::bench::main_with("owners", parse, run)
}
