//! A real cluster under churn (the simulations issue): `obnam-node` processes on loopback,
//! each an owner backing up to `replicas` of its friends, stopped and started on a seeded
//! schedule over simulated days, with some machines lost for good and recovered from friends.
//!
//! - **Friends.** Node `i` is a friend of `i ± 1` and `i ± 2` (a ring), so each owner has four
//!   friends for three replicas.
//! - **Days.** A simulated day lasts `day_secs` real seconds, and the node's intervals are
//!   shortened to match: `lost_after` is `lost_after_days` days, 16 audits a simulated day, one
//!   replication round a second.
//! - **Churn.** 30% of the nodes are always on. The others are online on a given day with
//!   probability 0.75, and sometimes away for 3 to 5 days (longer than `lost_after`, so their
//!   owners repair around them, and count their copies again when they return).
//! - **Backups.** Every online owner changes its files and backs up once a day (`--timeout 1s`:
//!   replication goes on in the background). The harness keeps a copy of each snapshot's files.
//! - **Permanent loss.** `lost` nodes lose their disk for good (SIGKILL, data directory deleted)
//!   on seeded days, once a friend holds all of their backups (what never left a machine is lost
//!   with it, by definition). Two days later each comes back as a new machine with only the
//!   owner name, the passphrase and one friend (`init --recover`).
//! - **At the end** every node is started, replication is given time to finish, and every
//!   snapshot of every owner is restored and compared with its copy: none may be unrestorable.
//!
//! **Repair traffic.** The nodes count the bytes of packs their friends stored (`status`:
//! `sent_bytes`, read before each stop). Whatever is sent beyond `replicas ×` each owner's own
//! pack bytes is maintenance: repair after losses, and copies sent to a friend that was only
//! away. The **oracle**, which knows which failures are permanent, sends exactly what the lost
//! disks held (their `hosted_bytes` when they died).

use crate::crash::{copy_tree, random_file};
use crate::{Bins, Node, compare_trees, wait_until};
use anyhow::{Result, bail};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A cluster run's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Node processes.
    pub nodes: usize,
    /// Replicas per owner.
    pub replicas: u32,
    /// Simulated days.
    pub days: u32,
    /// Real seconds per simulated day.
    pub day_secs: u64,
    /// Machines lost for good (and recovered two days later).
    pub lost: usize,
    /// The node's `lost_after`, in simulated days.
    pub lost_after_days: f64,
    /// Seed of the schedule and the data.
    pub seed: u64,
    /// A scratch directory (emptied first).
    pub work: PathBuf,
    /// The programs.
    pub bins: Bins,
}

/// One machine of the cluster: its current node process, and what the harness knows of it.
struct Member {
    node: Node,
    name: String,
    always_on: bool,
    away_until: u32,
    /// Lost for good and not recovered yet.
    dead: bool,
    /// Incarnations so far (a recovery makes a new one).
    lives: u32,
    src: PathBuf,
    /// Counters harvested from earlier runs of this machine's processes.
    sent: u64,
    repaired: u64,
    /// Snapshot id → the copy of its files.
    expected: Vec<(String, PathBuf)>,
}

impl Member {
    /// Adds the counters of the running process to the harvested ones.
    fn harvest(&mut self) -> Result<()> {
        if self.node.pid().is_none() {
            return Ok(());
        }
        let s = self.node.status()?;
        self.sent += s["sent_bytes"].as_u64().unwrap_or(0);
        self.repaired += s["repaired_bytes"].as_u64().unwrap_or(0);
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        self.harvest()?;
        self.node.stop();
        Ok(())
    }
}

fn config(s: &Settings) -> String {
    let day = s.day_secs as f64;
    let audits = (16.0 * 86_400.0 / day).round() as u64;
    format!(
        "replicas = {}\nreplication_interval_secs = 1\nrequest_timeout_secs = 10\npresence_interval_secs = 1\nlost_after_secs = {}\naudits_per_day = {audits}\naudit_deadline_secs = 10\naudit_answers_per_minute = 100000\nseal_threads = 1\n",
        s.replicas,
        (s.lost_after_days * day).round() as u64,
    )
}

/// Runs the cluster and returns its report.
///
/// # Errors
/// A node that does not start, a command that fails, or a snapshot that does not restore.
pub fn run(s: &Settings) -> Result<Value> {
    if s.nodes < 5 {
        bail!("a ring of friends at distance 1 and 2 needs at least 5 nodes");
    }
    let started = Instant::now();
    let _ = std::fs::remove_dir_all(&s.work);
    std::fs::create_dir_all(&s.work)?;
    let mut rng = StdRng::seed_from_u64(s.seed);
    let cfg = config(s);
    let mut members = Vec::new();
    let always_on = (s.nodes * 3).div_ceil(10).max(1);
    for i in 0..s.nodes {
        let name = format!("n{i:02}");
        let mut node = Node::new(&s.bins, &name, &s.work.join(&name), &cfg)?;
        node.start()?;
        let src = s.work.join("src").join(&name);
        std::fs::create_dir_all(&src)?;
        for k in 0..4 {
            random_file(&src.join(format!("base-{k}.bin")), 256 << 10, &mut rng)?;
        }
        members.push(Member {
            node,
            name,
            always_on: i % (s.nodes / always_on).max(1) == 0,
            away_until: 0,
            dead: false,
            lives: 1,
            src,
            sent: 0,
            repaired: 0,
            expected: Vec::new(),
        });
    }
    for i in 0..s.nodes {
        for d in [1, 2] {
            let j = (i + d) % s.nodes;
            let (a, b) = (&members[i].node, &members[j].node);
            a.add_peer(b, &[])?;
            b.add_peer(a, &[])?;
        }
    }
    for m in &members {
        m.node.init(&format!("owner-{}", m.name))?;
    }
    // Which machines die, and when: spread over the run, never the last two days.
    let mut losses: Vec<(u32, usize)> = Vec::new();
    for k in 0..s.lost {
        let day = 2 + (k as u32 * (s.days.saturating_sub(4)).max(1)) / s.lost.max(1) as u32;
        let mut victim = rng.random_range(0..s.nodes);
        while losses.iter().any(|(_, v)| *v == victim) {
            victim = (victim + 1) % s.nodes;
        }
        losses.push((day, victim));
    }
    let mut oracle_bytes = 0u64;
    let (mut stops, mut starts, mut backups, mut pending_backups) = (0u32, 0u32, 0u32, 0u32);
    let mut events = Vec::new();
    for day in 0..s.days {
        let day_start = Instant::now();
        // Permanent losses and recoveries.
        for &(d, v) in &losses {
            if d == day {
                // What never left a machine is lost with it, by definition: the doomed machine
                // and its friends run until a friend holds all of its backups.
                let n = s.nodes;
                for f in [
                    v,
                    (v + 1) % n,
                    (v + n - 1) % n,
                    (v + 2) % n,
                    (v + n - 2) % n,
                ] {
                    if !members[f].dead && members[f].node.pid().is_none() {
                        members[f].node.start()?;
                        starts += 1;
                    }
                }
                let m = &mut members[v];
                wait_until(
                    "the doomed machine's backups to reach a friend",
                    Duration::from_secs(s.day_secs * 3 + 60),
                    || Ok(m.node.status()?["replicated_to"].as_u64().unwrap_or(0) >= 1),
                )?;
                m.harvest()?;
                let hosted = m.node.status()?["hosted_bytes"].as_u64().unwrap_or(0);
                oracle_bytes += hosted;
                m.node.kill();
                std::fs::remove_dir_all(&m.node.data_dir)?;
                m.dead = true;
                events.push(json!({"day": day, "node": m.name, "event": "disk lost", "hosted_bytes": hosted}));
            }
            if d + 2 == day {
                recover(s, &mut members, v, &cfg)?;
                events.push(json!({"day": day, "node": members[v].name, "event": "recovered"}));
            }
        }
        // Who is online today.
        for m in members.iter_mut().filter(|m| !m.dead) {
            let online = if m.always_on {
                true
            } else if day < m.away_until {
                false
            } else if rng.random::<f64>() < 0.12 {
                m.away_until = day + rng.random_range(3..=5);
                false
            } else {
                rng.random::<f64>() < 0.75
            };
            match (online, m.node.pid().is_some()) {
                (true, false) => {
                    m.node.start()?;
                    starts += 1;
                }
                (false, true) => {
                    m.stop()?;
                    stops += 1;
                }
                _ => {}
            }
        }
        // Each online owner's daily backup.
        for m in members
            .iter_mut()
            .filter(|m| !m.dead && m.node.pid().is_some())
        {
            random_file(&m.src.join(format!("day-{day}.bin")), 64 << 10, &mut rng)?;
            let note = format!("{} on day {day}: {}\n", m.name, rng.random::<u64>());
            std::fs::write(m.src.join("notes.txt"), note.repeat(50))?;
            let run = m.node.obnam(&[
                "backup",
                m.src.to_str().unwrap_or_default(),
                "--timeout",
                "1s",
                "--json",
            ])?;
            if run.code != 0 && run.code != 4 {
                bail!("{}'s backup on day {day} failed: {run:?}", m.name);
            }
            pending_backups += u32::from(run.code == 4);
            let report = run.json()?;
            let id = report["snapshot"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("no snapshot id in {report}"))?
                .to_owned();
            let copy = s.work.join("expected").join(&m.name).join(&id);
            std::fs::create_dir_all(copy.parent().unwrap_or(&s.work))?;
            copy_tree(&m.src, &copy)?;
            m.expected.push((id, copy));
            backups += 1;
        }
        let day_len = Duration::from_secs(s.day_secs);
        if let Some(rest) = day_len.checked_sub(day_start.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    // The end: everyone back, replication given time to finish.
    for m in members.iter_mut() {
        if m.dead {
            bail!(
                "{} is still lost at the end (a loss too close to the end)",
                m.name
            );
        }
        if m.node.pid().is_none() {
            m.node.start()?;
            starts += 1;
        }
    }
    let settle = Instant::now();
    let limit = Duration::from_secs((s.day_secs * 4).max(120));
    let converged = wait_until("every owner fully replicated", limit, || {
        for m in &members {
            let st = m.node.status()?;
            if st["replicated_to"].as_u64().unwrap_or(0) < u64::from(s.replicas)
                || st["outbox_packs"].as_u64().unwrap_or(1) > 0
            {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .is_ok();
    let settle_secs = settle.elapsed().as_secs_f64();
    // Every snapshot restores byte-identical.
    let (mut restored, mut failed) = (0u32, Vec::new());
    for m in &members {
        for (id, copy) in &m.expected {
            let target = s.work.join("restore").join(&m.name).join(id);
            let run = m.node.obnam(&[
                "restore",
                id,
                "--target",
                target.to_str().unwrap_or_default(),
                "--json",
            ])?;
            let inner = target.join(m.src.strip_prefix("/").unwrap_or(&m.src));
            let same = run.code == 0 && compare_trees(copy, &inner, &[]).is_ok();
            if same {
                restored += 1;
            } else {
                let out: String = run.stdout.chars().take(600).collect();
                failed.push(json!({"owner": m.name, "snapshot": id, "code": run.code, "stdout": out, "stderr": run.stderr}));
            }
            let _ = std::fs::remove_dir_all(&target);
        }
    }
    let mut own_pack_bytes = 0u64;
    for m in members.iter_mut() {
        own_pack_bytes += m.node.status()?["own_pack_bytes"].as_u64().unwrap_or(0);
        m.stop()?;
    }
    let sent: u64 = members.iter().map(|m| m.sent).sum();
    let repaired: u64 = members.iter().map(|m| m.repaired).sum();
    let first_copies = own_pack_bytes * u64::from(s.replicas);
    let maintenance = sent.saturating_sub(first_copies);
    let report = json!({
        "nodes": s.nodes, "replicas": s.replicas, "days": s.days, "day_secs": s.day_secs,
        "lost_after_days": s.lost_after_days, "seed": s.seed, "lost": s.lost,
        "always_on": members.iter().filter(|m| m.always_on).count(),
        "stops": stops, "starts": starts, "backups": backups,
        "backups_still_replicating_after_1s": pending_backups,
        "events": events,
        "converged": converged, "settle_secs": settle_secs,
        "snapshots_restored": restored, "snapshots_failed": failed,
        "own_pack_bytes": own_pack_bytes, "sent_bytes": sent, "first_copy_bytes": first_copies,
        "maintenance_bytes": maintenance, "repair_fetched_bytes": repaired,
        "oracle_bytes": oracle_bytes,
        "maintenance_over_oracle": if oracle_bytes > 0 { json!(maintenance as f64 / oracle_bytes as f64) } else { Value::Null },
        "lives": members.iter().map(|m| m.lives).sum::<u32>(),
        "seconds": started.elapsed().as_secs_f64(),
    });
    if !failed.is_empty() {
        bail!("snapshots did not restore byte-identical: {report}");
    }
    if !converged {
        bail!("replication did not finish within {limit:?} after the last day: {report}");
    }
    Ok(report)
}

/// Machine `v` comes back as a new one: a fresh data directory, one friend's ticket, and
/// `init --recover` with the owner name and passphrase.
fn recover(s: &Settings, members: &mut [Member], v: usize, cfg: &str) -> Result<()> {
    let n = members.len();
    // A friend that is running (started if none is).
    let friends = [(v + 1) % n, (v + n - 1) % n, (v + 2) % n, (v + n - 2) % n];
    let f = match friends.iter().find(|f| members[**f].node.pid().is_some()) {
        Some(f) => *f,
        None => {
            members[friends[0]].node.start()?;
            friends[0]
        }
    };
    let lives = members[v].lives + 1;
    let name = format!("{}-life{lives}", members[v].name);
    let mut node = Node::new(&s.bins, &name, &s.work.join(&name), cfg)?;
    node.start()?;
    node.add_peer(&members[f].node, &[])?;
    let owner = format!("owner-{}", members[v].name);
    node.json(&["init", "--recover", "--name", &owner], 0)?;
    let m = &mut members[v];
    m.node = node;
    m.lives = lives;
    m.dead = false;
    m.away_until = 0;
    Ok(())
}

/// The report as a few lines for people.
pub fn summary(r: &Value) -> String {
    let mb = |k: &str| r[k].as_u64().unwrap_or(0) as f64 / 1e6;
    format!(
        "cluster: {} nodes ({} always on), {} days of {} s, lost_after {} days, {} disks lost and recovered (seed {})\n\
         churn: {} stops, {} starts; {} backups ({} still replicating after 1 s)\n\
         end: replication finished in {:.0} s; {} snapshots restored byte-identical, {} failed\n\
         traffic: {:.1} MB of own packs × {} replicas = {:.1} MB of first copies; {:.1} MB sent in all; \
         maintenance {:.1} MB; oracle (what the lost disks held) {:.1} MB; maintenance / oracle = {}; \
         {:.1} MB fetched back for repair\n",
        r["nodes"],
        r["always_on"],
        r["days"],
        r["day_secs"],
        r["lost_after_days"],
        r["lost"],
        r["seed"],
        r["stops"],
        r["starts"],
        r["backups"],
        r["backups_still_replicating_after_1s"],
        r["settle_secs"].as_f64().unwrap_or(0.0),
        r["snapshots_restored"],
        r["snapshots_failed"].as_array().map_or(0, Vec::len),
        mb("own_pack_bytes"),
        r["replicas"],
        mb("first_copy_bytes"),
        mb("sent_bytes"),
        mb("maintenance_bytes"),
        mb("oracle_bytes"),
        r["maintenance_over_oracle"]
            .as_f64()
            .map_or_else(|| "–".to_owned(), |x| format!("{x:.2}")),
        mb("repair_fetched_bytes"),
    )
}
