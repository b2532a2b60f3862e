//! `bench`: obnam against restic and borg on the same data, in one run on one machine. Run it
//! through `bench/run`; docs/performance.md explains the method and the figures.
//!
//! For each round (at least 3, the tools interleaved) and each tool, it copies a fresh dataset
//! made by `../shared/bench/make-dataset`, then measures four phases: the initial backup, a
//! backup with nothing changed, a backup after `mutate-dataset` changed about 1%, and a full
//! restore, which it checks against the source with `../shared/bench/manifest --compare`.
//! Every phase records wall time, CPU time and peak RSS of every process involved, separately
//! (obnam's client node, the `obnam` command, each friend node; restic and its `rclone serve
//! restic` server), and the bytes each store holds. Medians go to
//! `bench/results/<date>.{md,json}`.
//!
//! A restore starts at least [`Ctx::settle`]'s interval after the last bulk deletion: ext4
//! skips, at a cost, recently freed inodes when it allocates new ones, so a tool restoring soon
//! after a tree was removed would pay for the removal.
//!
//! `bench run [--dataset tiny|small|medium] [--runs N] [--tools LIST] [--work DIR] [--out DIR]
//! [--max-minutes M] [--no-install]`

use anyhow::{Context, Result, anyhow, bail};
use obnam_simulations::bench::{
    Measured, Usage, Watch, disk_usage, measure, measure_child, median,
};
use obnam_simulations::{Bins, Node, shared_bench};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

const TOOLS: [&str; 5] = ["obnam-1", "obnam-2", "restic", "restic-rest", "borg"];
const PHASES: [&str; 4] = ["initial", "unchanged", "mutated", "restore"];
const PASSWORD: &str = "bench password, not a secret";
const OWNER: &str = "bench";

struct Options {
    dataset: String,
    runs: usize,
    tools: Vec<String>,
    work: PathBuf,
    out: PathBuf,
    max_minutes: u64,
    install: bool,
}

fn usage() -> &'static str {
    "usage: bench run [--dataset tiny|small|medium] [--runs N] [--tools obnam-1,obnam-2,restic,restic-rest,borg]\n\
     \x20                [--work DIR] [--out DIR] [--max-minutes M] [--no-install]"
}

fn parse(args: &[String]) -> Result<Options> {
    let root = workspace_root()?;
    let mut o = Options {
        dataset: "medium".into(),
        runs: 3,
        tools: TOOLS.iter().map(|s| (*s).to_owned()).collect(),
        work: PathBuf::from("/var/tmp/obnam-bench"),
        out: root.join("bench").join("results"),
        max_minutes: 240,
        install: true,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| anyhow!("{a} needs a value\n{}", usage()))
        };
        match a.as_str() {
            "--dataset" => o.dataset = value()?,
            "--runs" => o.runs = value()?.parse().context("--runs")?,
            "--tools" => o.tools = value()?.split(',').map(str::to_owned).collect(),
            "--work" => o.work = PathBuf::from(value()?),
            "--out" => o.out = PathBuf::from(value()?),
            "--max-minutes" => o.max_minutes = value()?.parse().context("--max-minutes")?,
            "--no-install" => o.install = false,
            "-h" | "--help" => bail!("{}", usage()),
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    if !["tiny", "small", "medium"].contains(&o.dataset.as_str()) {
        bail!(
            "--dataset must be tiny, small or medium, not {:?}",
            o.dataset
        );
    }
    if o.runs == 0 {
        bail!("--runs must be at least 1");
    }
    for t in &o.tools {
        if !TOOLS.contains(&t.as_str()) {
            bail!("unknown tool {t:?}; known: {}", TOOLS.join(", "));
        }
    }
    Ok(o)
}

fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .ok_or_else(|| anyhow!("no workspace root"))
}

/// The shared run state.
struct Ctx {
    exe: PathBuf,
    bins: Bins,
    shared: PathBuf,
    work: PathBuf,
    pristine: PathBuf,
    deadline: Instant,
    /// When a tree was last removed or the dataset mutated; `None` to never wait (tiny data).
    removed: std::cell::Cell<Option<Instant>>,
}

impl Ctx {
    /// Time left for one command (at most an hour).
    fn timeout(&self) -> Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("the benchmark ran out of time (--max-minutes)");
        }
        Ok(left.min(Duration::from_secs(3600)))
    }

    /// Runs a set-up command that is not measured; fails unless it exits 0.
    fn setup(&self, mut cmd: Command) -> Result<String> {
        let what = format!("{cmd:?}");
        let run = obnam_simulations::run_with_timeout(
            std::mem::replace(&mut cmd, Command::new("true")),
            self.timeout()?,
        )?;
        if run.code != 0 {
            bail!("{what} exited {}: {}{}", run.code, run.stdout, run.stderr);
        }
        Ok(run.stdout)
    }

    fn measure(&self, cmd: &Command) -> Result<Measured> {
        let m = measure(&self.exe, &self.work, self.timeout()?, cmd)?;
        if m.code != 0 {
            bail!(
                "{:?} exited {}: {}",
                cmd.get_program(),
                m.code,
                m.stdout.chars().take(2000).collect::<String>()
            );
        }
        Ok(m)
    }

    /// Removes a tree and notes when, for [`Ctx::settle`].
    fn remove(&self, p: &Path) -> Result<()> {
        remove(p)?;
        self.note_removal();
        Ok(())
    }

    fn note_removal(&self) {
        if self.removed.get().is_some() {
            self.removed.set(Some(Instant::now()));
        }
    }

    /// Waits until the files removed last no longer count as recently deleted. ext4 without a
    /// journal does not reuse an inode freed less than `dirty_expire_centisecs` (+ 5 s while its
    /// block is dirty) ago, and checking each candidate made a restore of 100 k files take 2-3×
    /// its time here. Measured on this machine: 38 s after the removal was not always enough
    /// for a restore that creates files on several threads, 90 s was; so three times the
    /// expiry interval.
    fn settle(&self) -> Result<()> {
        let Some(at) = self.removed.get() else {
            return Ok(());
        };
        let centisecs: u64 = std::fs::read_to_string("/proc/sys/vm/dirty_expire_centisecs")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(3000);
        let quiet = Duration::from_millis(centisecs * 30);
        self.setup(Command::new("sync"))?;
        let left = (at + quiet).saturating_duration_since(Instant::now());
        if !left.is_zero() {
            eprintln!(
                "  waiting {:.0} s for removed files to settle",
                left.as_secs_f64()
            );
            std::thread::sleep(left);
        }
        Ok(())
    }

    /// A fresh copy of the pristine dataset at `work/src`.
    fn fresh_source(&self) -> Result<PathBuf> {
        let src = self.work.join("src");
        self.remove(&src)?;
        let mut cp = Command::new("cp");
        cp.arg("-a").arg(&self.pristine).arg(&src);
        self.setup(cp)?;
        Ok(src)
    }

    fn mutate(&self, src: &Path) -> Result<()> {
        let mut cmd = Command::new(self.shared.join("mutate-dataset"));
        cmd.arg(src);
        self.setup(cmd)?;
        self.note_removal();
        Ok(())
    }

    /// Checks a restored tree against the source (types, modes, sizes, contents, link targets).
    fn verify(&self, src: &Path, restored: &Path) -> Result<()> {
        let mut cmd = Command::new(self.shared.join("manifest"));
        cmd.arg("--compare").arg(src).arg(restored);
        self.setup(cmd).map(drop).with_context(|| {
            format!(
                "the restore at {} differs from the source",
                restored.display()
            )
        })
    }
}

use obnam_simulations::bench::remove_tree as remove;

/// One measured phase of one tool in one round.
#[derive(Debug, Clone)]
struct Sample {
    tool: String,
    round: usize,
    phase: &'static str,
    wall_s: f64,
    /// Per process: the client (obnam's node, restic, borg), `cli` (the `obnam` command),
    /// `friend-N`, `server` (rclone).
    procs: BTreeMap<String, Usage>,
    /// Bytes each store holds after a backup phase.
    stored: BTreeMap<String, u64>,
}

impl Sample {
    fn cpu_s(&self) -> f64 {
        self.procs.values().map(|u| u.cpu_s).sum()
    }

    fn to_json(&self) -> Value {
        json!({
            "tool": self.tool,
            "round": self.round,
            "phase": self.phase,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s(),
            "procs": self.procs.iter().map(|(k, v)| (k.clone(), v.to_json())).collect::<Map<_, _>>(),
            "stored": self.stored,
        })
    }
}

fn sample(tool: &str, round: usize, phase: &'static str, m: &Measured, client: &str) -> Sample {
    let mut procs = BTreeMap::new();
    procs.insert(client.to_owned(), m.usage);
    Sample {
        tool: tool.to_owned(),
        round,
        phase,
        wall_s: m.wall_s,
        procs,
        stored: BTreeMap::new(),
    }
}

fn progress(s: &Sample) {
    let rss: Vec<String> = s
        .procs
        .iter()
        .map(|(k, u)| format!("{k} {:.0} MiB", u.peak_rss as f64 / 1048576.0))
        .collect();
    eprintln!(
        "  round {} {:<12} {:<10} {:>8.2} s wall {:>8.2} s CPU  {}",
        s.round,
        s.tool,
        s.phase,
        s.wall_s,
        s.cpu_s(),
        rss.join(", ")
    );
}

// ---------------------------------------------------------------------------------------------
// obnam

fn run_obnam(ctx: &Ctx, friends: usize, round: usize) -> Result<Vec<Sample>> {
    let tool = format!("obnam-{friends}");
    let dir = ctx.work.join(&tool);
    ctx.remove(&dir)?;
    std::fs::create_dir_all(&dir)?;
    let src = ctx.fresh_source()?;
    let config = format!("replicas = {friends}\nreplication_interval_secs = 5\n");
    let mut client = Node::new(&ctx.bins, "client", &dir.join("client"), &config)?;
    client.start()?;
    client.init(OWNER)?;
    let mut others = Vec::new();
    for i in 1..=friends {
        let mut f = Node::new(
            &ctx.bins,
            &format!("friend-{i}"),
            &dir.join(format!("friend-{i}")),
            &config,
        )?;
        f.start()?;
        client.add_peer(&f, &["--quota", "1TiB"])?;
        f.add_peer(&client, &["--quota", "1TiB"])?;
        others.push(f);
    }
    let baseline: Vec<u64> = others
        .iter()
        .map(|f| disk_usage(&f.data_dir))
        .collect::<Result<_>>()?;
    let src_arg = src
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 work directory"))?;
    let target = dir.join("restore");
    let target_arg = target
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 work directory"))?;
    let mut out = Vec::new();
    for phase in PHASES {
        if phase == "mutated" {
            ctx.mutate(&src)?;
        }
        let args: Vec<&str> = if phase == "restore" {
            vec!["restore", "latest", "--target", target_arg, "--json"]
        } else {
            vec!["backup", src_arg, "--json"]
        };
        if phase == "restore" {
            ctx.settle()?;
        }
        let pids: Vec<(String, u32)> = std::iter::once(&client)
            .chain(others.iter())
            .map(|n| {
                n.pid()
                    .map(|p| (n.name.clone(), p))
                    .ok_or_else(|| anyhow!("{} is not running", n.name))
            })
            .collect::<Result<_>>()?;
        let watches: Vec<(String, Watch)> = pids
            .iter()
            .map(|(n, p)| Watch::start(*p).map(|w| (n.clone(), w)))
            .collect::<Result<_>>()?;
        let m = ctx
            .measure(&client.command(&args))
            .with_context(|| format!("{tool} {phase}; client log:\n{}", tail(&client.log())))?;
        let mut s = sample(&tool, round, phase, &m, "cli");
        for (name, w) in watches {
            s.procs.insert(name, w.finish()?);
        }
        if phase == "restore" {
            ctx.verify(&src, &target.join(src.strip_prefix("/")?))?;
        } else {
            for (f, base) in others.iter().zip(&baseline) {
                s.stored.insert(
                    f.name.clone(),
                    disk_usage(&f.data_dir)?.saturating_sub(*base),
                );
            }
        }
        progress(&s);
        out.push(s);
    }
    Ok(out)
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// restic, over a local repository or `rclone serve restic`

/// A process killed (by PID) when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn start_rclone(dir: &Path, repo: &Path) -> Result<(Server, String)> {
    let port = free_port()?;
    let log = std::fs::File::create(dir.join("rclone.log"))?;
    let child = Command::new("rclone")
        .args(["serve", "restic", "--addr"])
        .arg(format!("127.0.0.1:{port}"))
        .arg(repo)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting rclone serve restic")?;
    let server = Server(child);
    obnam_simulations::wait_until("rclone to listen", Duration::from_secs(30), || {
        Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
    })?;
    Ok((server, format!("rest:http://127.0.0.1:{port}/")))
}

fn run_restic(ctx: &Ctx, rest: bool, round: usize) -> Result<Vec<Sample>> {
    let tool = if rest { "restic-rest" } else { "restic" };
    let dir = ctx.work.join(tool);
    ctx.remove(&dir)?;
    std::fs::create_dir_all(&dir)?;
    let src = ctx.fresh_source()?;
    let repo_dir = dir.join("repo");
    let mut server = None;
    let repo = if rest {
        let (s, url) = start_rclone(&dir, &repo_dir)?;
        server = Some(s);
        url
    } else {
        repo_dir.to_string_lossy().into_owned()
    };
    let restic = |args: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut c = Command::new("restic");
        for a in args {
            c.arg(a);
        }
        c.arg("-q")
            .env("RESTIC_PASSWORD", PASSWORD)
            .env("RESTIC_REPOSITORY", &repo)
            .env("RESTIC_CACHE_DIR", dir.join("cache"));
        c
    };
    ctx.setup(restic(&[&"init"]))?;
    let target = dir.join("restore");
    let mut out = Vec::new();
    for phase in PHASES {
        if phase == "mutated" {
            ctx.mutate(&src)?;
        }
        let cmd = if phase == "restore" {
            restic(&[&"restore", &"latest", &"--target", &target])
        } else {
            restic(&[&"backup", &src])
        };
        if phase == "restore" {
            ctx.settle()?;
        }
        let watch = match &server {
            Some(s) => Some(Watch::start(s.0.id())?),
            None => None,
        };
        let m = ctx
            .measure(&cmd)
            .with_context(|| format!("{tool} {phase}"))?;
        let mut s = sample(tool, round, phase, &m, "client");
        if let Some(w) = watch {
            s.procs.insert("server".into(), w.finish()?);
        }
        if phase == "restore" {
            ctx.verify(&src, &target.join(src.strip_prefix("/")?))?;
        } else {
            s.stored.insert("repo".into(), disk_usage(&repo_dir)?);
        }
        progress(&s);
        out.push(s);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// borg

fn run_borg(ctx: &Ctx, round: usize) -> Result<Vec<Sample>> {
    let tool = "borg";
    let dir = ctx.work.join(tool);
    ctx.remove(&dir)?;
    std::fs::create_dir_all(&dir)?;
    let src = ctx.fresh_source()?;
    let repo = dir.join("repo");
    let borg = |args: &[&dyn AsRef<std::ffi::OsStr>]| {
        let mut c = Command::new("borg");
        for a in args {
            c.arg(a);
        }
        c.env("BORG_PASSPHRASE", PASSWORD)
            .env("BORG_REPO", &repo)
            .env("BORG_BASE_DIR", dir.join("base"))
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes");
        c
    };
    ctx.setup(borg(&[&"init", &"--encryption", &"repokey-blake2"]))?;
    let target = dir.join("restore");
    std::fs::create_dir_all(&target)?;
    let mut out = Vec::new();
    for phase in PHASES {
        if phase == "mutated" {
            ctx.mutate(&src)?;
        }
        let cmd = if phase == "restore" {
            let mut c = borg(&[&"extract", &"::mutated"]);
            c.current_dir(&target);
            c
        } else {
            borg(&[&"create", &format!("::{phase}"), &src])
        };
        if phase == "restore" {
            ctx.settle()?;
        }
        let m = ctx
            .measure(&cmd)
            .with_context(|| format!("{tool} {phase}"))?;
        let mut s = sample(tool, round, phase, &m, "client");
        if phase == "restore" {
            ctx.verify(&src, &target.join(src.strip_prefix("/")?))?;
        } else {
            s.stored.insert("repo".into(), disk_usage(&repo)?);
        }
        progress(&s);
        out.push(s);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// the run, the medians and the reports

fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program} >/dev/null"))
        .status()
        .is_ok_and(|s| s.success())
}

fn binary_for(tool: &str) -> &'static [&'static str] {
    match tool {
        "restic" => &["restic"],
        "restic-rest" => &["restic", "rclone"],
        "borg" => &["borg"],
        _ => &[],
    }
}

/// Installs restic, borg and rclone with apt-get when they are missing and we are root.
fn install_missing(tools: &[String]) {
    let missing: Vec<&str> = tools
        .iter()
        .flat_map(|t| binary_for(t).iter().copied())
        .filter(|b| !have(b))
        .collect();
    if missing.is_empty() || !nix::unistd::geteuid().is_root() {
        return;
    }
    let packages: Vec<&str> = missing
        .iter()
        .map(|b| if *b == "borg" { "borgbackup" } else { b })
        .collect();
    eprintln!("installing {} with apt-get", packages.join(" "));
    let quiet = |c: &mut Command| {
        c.env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !quiet(
        Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&packages),
    ) {
        quiet(Command::new("apt-get").args(["update", "-qq"]));
        quiet(
            Command::new("apt-get")
                .args(["install", "-y", "-qq"])
                .args(&packages),
        );
    }
}

fn version(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "not installed".into())
}

fn shell(cmd: &str) -> String {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Medians per tool and phase.
fn medians(samples: &[Sample]) -> BTreeMap<String, BTreeMap<String, Value>> {
    let mut out: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    let mut keys: Vec<(String, &'static str)> =
        samples.iter().map(|s| (s.tool.clone(), s.phase)).collect();
    keys.sort();
    keys.dedup();
    for (tool, phase) in keys {
        let these: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.tool == tool && s.phase == phase)
            .collect();
        let of = |f: &dyn Fn(&Sample) -> Option<f64>| {
            median(&these.iter().filter_map(|s| f(s)).collect::<Vec<_>>())
        };
        let mut procs = Map::new();
        for name in these[0].procs.keys() {
            procs.insert(
                name.clone(),
                json!({
                    "cpu_s": of(&|s| s.procs.get(name).map(|u| u.cpu_s)),
                    "peak_rss": of(&|s| s.procs.get(name).map(|u| u.peak_rss as f64)),
                }),
            );
        }
        let mut stored = Map::new();
        for name in these[0].stored.keys() {
            stored.insert(
                name.clone(),
                json!(of(&|s| s.stored.get(name).map(|b| *b as f64))),
            );
        }
        out.entry(tool).or_default().insert(
            phase.to_owned(),
            json!({
                "runs": these.len(),
                "wall_s": of(&|s| Some(s.wall_s)),
                "cpu_s": of(&|s| Some(s.cpu_s())),
                "procs": procs,
                "stored": stored,
            }),
        );
    }
    out
}

/// The issue's targets: (what, obnam tool, phase, measure, limit).
const TARGETS: [(&str, &str, &str, &str, f64); 8] = [
    (
        "initial backup, wall time, 1 friend",
        "obnam-1",
        "initial",
        "wall",
        0.5,
    ),
    (
        "initial backup, wall time, 2 friends",
        "obnam-2",
        "initial",
        "wall",
        0.7,
    ),
    (
        "no-change backup, wall time",
        "obnam-1",
        "unchanged",
        "wall",
        0.2,
    ),
    (
        "backup after the 1% mutation, wall time",
        "obnam-1",
        "mutated",
        "wall",
        0.3,
    ),
    (
        "restore from one friend, wall time",
        "obnam-1",
        "restore",
        "wall",
        0.5,
    ),
    (
        "peak RSS of the backing-up node (initial backup)",
        "obnam-1",
        "initial",
        "rss",
        0.5,
    ),
    (
        "bytes stored on each friend (1 friend)",
        "obnam-1",
        "mutated",
        "stored",
        1.05,
    ),
    (
        "bytes stored on each friend (2 friends)",
        "obnam-2",
        "mutated",
        "stored",
        1.05,
    ),
];

fn measure_of(
    m: &BTreeMap<String, BTreeMap<String, Value>>,
    tool: &str,
    phase: &str,
    what: &str,
) -> Option<f64> {
    let v = m.get(tool)?.get(phase)?;
    match what {
        "wall" => v["wall_s"].as_f64(),
        // The process that backs up: obnam's client node, restic or borg.
        "rss" => v["procs"]["client"]["peak_rss"].as_f64(),
        // The most any one store holds.
        _ => v["stored"]
            .as_object()?
            .values()
            .filter_map(Value::as_f64)
            .reduce(f64::max),
    }
}

fn targets(m: &BTreeMap<String, BTreeMap<String, Value>>) -> Vec<Value> {
    TARGETS
        .iter()
        .map(|(what, tool, phase, measure, limit)| {
            let ours = measure_of(m, tool, phase, measure);
            let theirs = measure_of(m, "restic", phase, measure);
            let ratio = match (ours, theirs) {
                (Some(a), Some(b)) if b > 0.0 => Some(a / b),
                _ => None,
            };
            json!({
                "target": what, "tool": tool, "phase": phase, "measure": measure,
                "obnam": ours, "restic": theirs, "ratio": ratio, "limit": limit,
                "met": ratio.map(|r| r <= *limit),
            })
        })
        .collect()
}

fn mib(b: f64) -> String {
    format!("{:.1}", b / 1048576.0)
}

fn markdown(doc: &Value, m: &BTreeMap<String, BTreeMap<String, Value>>) -> String {
    let mut s = String::new();
    let h = &doc["header"];
    s.push_str(&format!(
        "# Benchmark {} ({} dataset)\n\n{} rounds, tools interleaved; medians. Machine: {} cores, {}; kernel {}. \
         obnam {} ({}). {}; {}; {}.\n\n",
        h["date"].as_str().unwrap_or_default(),
        h["dataset"].as_str().unwrap_or_default(),
        h["runs"],
        h["cores"],
        h["cpu"].as_str().unwrap_or_default(),
        h["kernel"].as_str().unwrap_or_default(),
        h["obnam"].as_str().unwrap_or_default(),
        h["commit"].as_str().unwrap_or_default(),
        h["restic"].as_str().unwrap_or_default(),
        h["borg"].as_str().unwrap_or_default(),
        h["rclone"].as_str().unwrap_or_default(),
    ));
    s.push_str(&format!(
        "Dataset: {}\n\n",
        h["dataset_id"].as_str().unwrap_or_default()
    ));
    s.push_str("## Targets (obnam ÷ restic with a local repository)\n\n| target | obnam | restic | ratio | limit | met |\n|---|---|---|---|---|---|\n");
    for t in doc["targets"].as_array().into_iter().flatten() {
        let fmt = |v: &Value| match (v.as_f64(), t["measure"].as_str()) {
            (None, _) => "–".to_owned(),
            (Some(x), Some("wall")) => format!("{x:.2} s"),
            (Some(x), _) => format!("{} MiB", mib(x)),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | ≤ {} | {} |\n",
            t["target"].as_str().unwrap_or_default(),
            fmt(&t["obnam"]),
            fmt(&t["restic"]),
            t["ratio"]
                .as_f64()
                .map_or("–".into(), |r| format!("{r:.2}")),
            t["limit"],
            match t["met"].as_bool() {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "–",
            }
        ));
    }
    for phase in PHASES {
        s.push_str(&format!(
            "\n## {phase}\n\n| tool | wall s | CPU s | peak RSS MiB per process | stored MiB |\n|---|---|---|---|---|\n"
        ));
        for (tool, phases) in m {
            let Some(v) = phases.get(phase) else { continue };
            let rss: Vec<String> = v["procs"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, p)| format!("{k} {}", p["peak_rss"].as_f64().map_or("–".into(), mib)))
                .collect();
            let stored: Vec<String> = v["stored"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, b)| format!("{k} {}", b.as_f64().map_or("–".into(), mib)))
                .collect();
            s.push_str(&format!(
                "| {tool} | {:.2} | {:.2} | {} | {} |\n",
                v["wall_s"].as_f64().unwrap_or(f64::NAN),
                v["cpu_s"].as_f64().unwrap_or(f64::NAN),
                rss.join(", "),
                if stored.is_empty() {
                    "–".into()
                } else {
                    stored.join(", ")
                },
            ));
        }
    }
    s.push_str("\nThe JSON file beside this one has every sample.\n");
    s
}

fn run(o: Options) -> Result<()> {
    let started = Instant::now();
    let shared =
        shared_bench().ok_or_else(|| anyhow!("../shared/bench (make-dataset) is missing"))?;
    if o.install {
        install_missing(&o.tools);
    }
    let mut tools = Vec::new();
    for t in &o.tools {
        let missing: Vec<&str> = binary_for(t).iter().copied().filter(|b| !have(b)).collect();
        if missing.is_empty() {
            tools.push(t.clone());
        } else {
            eprintln!("skipping {t}: {} not installed", missing.join(", "));
        }
    }
    std::fs::create_dir_all(&o.work).with_context(|| format!("creating {}", o.work.display()))?;
    let ctx = Ctx {
        exe: std::env::current_exe()?,
        bins: Bins::beside_current_exe()?,
        pristine: obnam_simulations::bench::pristine_dataset(&shared, &o.work, &o.dataset)?,
        shared,
        work: o.work.clone(),
        deadline: started + Duration::from_secs(o.max_minutes * 60),
        // The tiny dataset is a smoke test; its few files need no settling.
        removed: std::cell::Cell::new((o.dataset != "tiny").then(Instant::now)),
    };
    let mut samples = Vec::new();
    for round in 1..=o.runs {
        for tool in &tools {
            let got = match tool.as_str() {
                "obnam-1" => run_obnam(&ctx, 1, round),
                "obnam-2" => run_obnam(&ctx, 2, round),
                "restic" => run_restic(&ctx, false, round),
                "restic-rest" => run_restic(&ctx, true, round),
                _ => run_borg(&ctx, round),
            }
            .with_context(|| format!("round {round}, {tool}"))?;
            samples.extend(got);
            ctx.remove(&ctx.work.join(tool))?;
        }
    }
    remove(&ctx.work.join("src"))?;
    let m = medians(&samples);
    let date = shell("date -u +%F");
    let header = json!({
        "date": date,
        "dataset": o.dataset,
        "dataset_id": std::fs::read_to_string(ctx.pristine.join("DATASET_ID")).unwrap_or_default().split_whitespace().collect::<Vec<_>>().join(" "),
        "runs": o.runs,
        "tools": tools,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": shell("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
        "kernel": shell("uname -r"),
        "obnam": version(&ctx.bins.obnam.to_string_lossy(), &["--version"]),
        "commit": shell(&format!("git -C {} rev-parse --short HEAD", workspace_root()?.display())),
        "restic": version("restic", &["version"]),
        "borg": version("borg", &["--version"]),
        "rclone": version("rclone", &["version"]),
        "seconds": started.elapsed().as_secs(),
    });
    let doc = json!({
        "header": header,
        "medians": m,
        "targets": targets(&m),
        "samples": samples.iter().map(Sample::to_json).collect::<Vec<_>>(),
    });
    std::fs::create_dir_all(&o.out)?;
    let stem = if o.dataset == "medium" {
        date.clone()
    } else {
        format!("{date}-{}", o.dataset)
    };
    let stem = obnam_simulations::bench::unused_stem(&o.out, &stem);
    let json_path = o.out.join(format!("{stem}.json"));
    let md_path = o.out.join(format!("{stem}.md"));
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc)?)?;
    let md = markdown(&doc, &m);
    std::fs::write(&md_path, &md)?;
    println!("{md}");
    eprintln!(
        "wrote {} and {} in {:.0} s",
        md_path.display(),
        json_path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        // The hidden wrapper: measure REPORT STDOUT TIMEOUT_S -- PROGRAM ARGS…
        Some("measure") if args.len() >= 6 && args[4] == "--" => {
            let timeout = args[3]
                .parse()
                .map(Duration::from_secs)
                .unwrap_or(Duration::from_secs(3600));
            return match measure_child(
                Path::new(&args[1]),
                Path::new(&args[2]),
                timeout,
                &args[5..],
            ) {
                Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
                Err(e) => {
                    eprintln!("measure: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        Some("run") => parse(&args[1..]).and_then(run),
        _ => Err(anyhow!("{}", usage())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
