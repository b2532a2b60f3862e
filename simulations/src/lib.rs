//! # obnam-simulations: the multi-node harness
//!
//! Starts real `obnam-node` processes on 127.0.0.1 with temporary data directories, drives them
//! through the real `obnam` client, and kills every process it started, by PID, on every exit
//! path (including panics: [`Node`] kills its process in `Drop`). Nothing here enables mDNS or
//! any other multicast or broadcast.
//!
//! Used by the process-level tests in `cli/tests/`, by the `demo` binary, and by the `bench`
//! binary behind `bench/run` (which measures processes with [`bench`]). The `sim` binary runs
//! the durability model ([`durability`]).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod availability;
pub mod bench;
pub mod churn;
pub mod cluster;
pub mod correlated;
pub mod crash;
pub mod durability;
pub mod efficacy;
pub mod netns;
pub mod plot;
pub mod policy;
pub mod proxy;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The passphrase the harness uses (strong enough for the zxcvbn check).
pub const PASSPHRASE: &str = "violet tractor sings under 9 quiet lamps";
/// How long any single `obnam` command may take before the harness kills it.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// Where the two programs are.
#[derive(Debug, Clone)]
pub struct Bins {
    /// `obnam`.
    pub obnam: PathBuf,
    /// `obnam-node`.
    pub node: PathBuf,
}

impl Bins {
    /// The binaries beside the running executable (`target/<profile>/`). Under `cargo run`
    /// (where `CARGO` is set) they are built first, so they are never stale; otherwise they must
    /// exist.
    ///
    /// # Errors
    /// When they cannot be found or built.
    pub fn beside_current_exe() -> Result<Self> {
        let exe = std::env::current_exe().context("locating the running program")?;
        let mut dir = exe
            .parent()
            .ok_or_else(|| anyhow!("no parent directory"))?
            .to_owned();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let bins = Self {
            obnam: dir.join("obnam"),
            node: dir.join("obnam-node"),
        };
        if let Some(cargo) = std::env::var_os("CARGO") {
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "-p", "obnam-cli", "--bins"]);
            if dir.ends_with("release") {
                cmd.arg("--release");
            }
            let status = cmd.status().context("running cargo build for obnam-cli")?;
            if !status.success() {
                bail!("building obnam and obnam-node failed");
            }
        }
        if !bins.obnam.exists() || !bins.node.exists() {
            bail!(
                "obnam and obnam-node are not in {}: run `cargo build -p obnam-cli` first",
                dir.display()
            );
        }
        Ok(bins)
    }
}

/// The result of one `obnam` command.
#[derive(Debug, Clone)]
pub struct Run {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// stdout parsed as JSON.
    ///
    /// # Errors
    /// When stdout is not one JSON document.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("stdout is not JSON: {self:?}"))
    }
}

/// A running (or stopped) `obnam-node` process with its own data directory.
pub struct Node {
    /// A name for messages.
    pub name: String,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The programs.
    pub bins: Bins,
    /// The peer id, once started.
    pub peer_id: String,
    /// Run the node as this (uid, gid) (root only).
    pub run_as: Option<(u32, u32)>,
    /// The addresses of the first start; later starts listen there again, like a node with a
    /// fixed port.
    pub addrs: Vec<String>,
    /// Run the node inside this network namespace (`ip netns exec`; root only).
    pub netns: Option<String>,
    child: Option<Child>,
}

/// Runs a command with a deadline; kills it (by PID) when the deadline passes.
///
/// # Errors
/// When it cannot be started or waited for, or times out.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Result<Run> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let mut out = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut err = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = wait_child(&mut child, timeout, Duration::from_millis(20))
        .with_context(|| format!("{cmd:?}"))?;
    Ok(Run {
        code: status.code().unwrap_or(-1),
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    })
}

/// Waits for `child`, polling every `poll`; kills it (by PID) and fails once `timeout` passed.
///
/// # Errors
/// When it cannot be waited for, or times out.
pub fn wait_child(
    child: &mut Child,
    timeout: Duration,
    poll: Duration,
) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("did not finish within {timeout:?}");
        }
        std::thread::sleep(poll);
    }
}

impl Node {
    /// A node that is not started yet. `config` is appended to its `config.toml`, after a
    /// `listen` on 127.0.0.1 with a free port.
    ///
    /// # Errors
    /// When the directory or config cannot be written.
    pub fn new(bins: &Bins, name: &str, data_dir: &Path, config: &str) -> Result<Self> {
        std::fs::create_dir_all(data_dir)?;
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))?;
        let text =
            format!("listen = [\"/ip4/127.0.0.1/tcp/0\"]\nmdns = false\nupnp = false\n{config}");
        std::fs::write(data_dir.join("config.toml"), text)?;
        Ok(Self {
            name: name.into(),
            data_dir: data_dir.to_owned(),
            bins: bins.clone(),
            peer_id: String::new(),
            run_as: None,
            addrs: Vec::new(),
            netns: None,
            child: None,
        })
    }

    /// A node that is not started yet and will run inside network namespace `netns`,
    /// listening on every address of it with TCP and QUIC on port 4411 (each namespace has its
    /// own ports). `config` is appended to its `config.toml`.
    ///
    /// # Errors
    /// When the directory or config cannot be written.
    pub fn new_in_netns(
        bins: &Bins,
        name: &str,
        data_dir: &Path,
        netns: &str,
        config: &str,
    ) -> Result<Self> {
        let mut n = Self::new(bins, name, data_dir, "")?;
        let text = format!(
            "listen = [\"/ip4/0.0.0.0/tcp/4411\", \"/ip4/0.0.0.0/udp/4411/quic-v1\"]\nmdns = false\nupnp = false\n{config}"
        );
        std::fs::write(data_dir.join("config.toml"), text)?;
        n.netns = Some(netns.to_owned());
        Ok(n)
    }

    /// The PID of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process and waits (up to 60 s) until it serves its control socket.
    ///
    /// # Errors
    /// When it does not start or reports an error.
    pub fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("{} is already running", self.name);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                // `ip netns exec` execs the program, so the child's PID is the node's.
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns.as_str()]).arg(&self.bins.node);
                c
            }
            None => Command::new(&self.bins.node),
        };
        cmd.arg("start")
            .arg("--json")
            .arg("--data-dir")
            .arg(&self.data_dir);
        for a in &self.addrs {
            cmd.arg("--listen").arg(a);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
        cmd.env(
            "OBNAM_LOG",
            std::env::var("OBNAM_TEST_LOG").unwrap_or_else(|_| "info".into()),
        );
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        self.child = Some(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).map_err(|_| {
            anyhow!(
                "{} did not become ready within 60 s; log: {}",
                self.name,
                self.log()
            )
        })?;
        let v: Value = serde_json::from_str(line.trim()).map_err(|_| {
            anyhow!(
                "{} did not start: {:?}; log: {}",
                self.name,
                line,
                self.log()
            )
        })?;
        if let Some(err) = v.get("error") {
            bail!("{} failed to start: {err}", self.name);
        }
        self.peer_id = v["peer_id"].as_str().unwrap_or_default().to_owned();
        if self.addrs.is_empty() {
            self.addrs = v["addrs"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
        }
        Ok(())
    }

    /// The node's log file (stderr).
    pub fn log_path(&self) -> PathBuf {
        let mut p = self.data_dir.clone().into_os_string();
        p.push(".log");
        PathBuf::from(p)
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Kills the process with SIGKILL (a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the process with SIGTERM, and SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// An `obnam` command for this node, not yet run.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bins.obnam);
        cmd.arg("--data-dir").arg(&self.data_dir).args(args);
        cmd.env("OBNAM_PASSPHRASE", PASSPHRASE);
        cmd.env_remove("OBNAM_DATA_DIR");
        cmd
    }

    /// Runs `obnam --data-dir <dir> ARGS` (with the harness passphrase).
    ///
    /// # Errors
    /// When it cannot run or times out.
    pub fn obnam(&self, args: &[&str]) -> Result<Run> {
        run_with_timeout(self.command(args), COMMAND_TIMEOUT)
    }

    /// Runs a command with `--json`, requires exit code `expect`, and returns the document.
    ///
    /// # Errors
    /// Another exit code, or no JSON.
    pub fn json(&self, args: &[&str], expect: i32) -> Result<Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let run = self.obnam(&all)?;
        if run.code != expect {
            bail!(
                "obnam {args:?} exited {} (expected {expect}): {run:?}\nnode log:\n{}",
                run.code,
                self.log()
            );
        }
        run.json()
    }

    /// `obnam init --name NAME` with the harness passphrase.
    ///
    /// # Errors
    /// When init fails.
    pub fn init(&self, name: &str) -> Result<Value> {
        self.json(&["init", "--name", name], 0)
    }

    /// Backs up `paths` (plus extra arguments) and returns the JSON report.
    ///
    /// # Errors
    /// Another exit code than `expect`.
    pub fn backup(&self, paths: &[&Path], extra: &[&str], expect: i32) -> Result<Value> {
        let mut args: Vec<&str> = vec!["backup"];
        for p in paths {
            args.push(p.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?);
        }
        args.extend_from_slice(extra);
        self.json(&args, expect)
    }
}

impl Node {
    /// This node's ticket (`obnam id`).
    ///
    /// # Errors
    /// When `obnam id` fails.
    pub fn ticket(&self) -> Result<String> {
        let v = self.json(&["id"], 0)?;
        v["ticket"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no ticket in {v}"))
    }

    /// `obnam peer add <other's ticket> --name <other's name> EXTRA…`.
    ///
    /// # Errors
    /// When the command fails.
    pub fn add_peer(&self, other: &Node, extra: &[&str]) -> Result<Value> {
        let ticket = other.ticket()?;
        let mut args = vec![
            "peer",
            "add",
            ticket.as_str(),
            "--name",
            other.name.as_str(),
        ];
        args.extend_from_slice(extra);
        self.json(&args, 0)
    }

    /// `obnam status --json`.
    ///
    /// # Errors
    /// When the command fails.
    pub fn status(&self) -> Result<Value> {
        self.json(&["status"], 0)
    }

    /// The ids `obnam snapshots --json` lists, oldest first.
    ///
    /// # Errors
    /// When the command fails.
    pub fn snapshot_ids(&self) -> Result<Vec<String>> {
        let list = self.json(&["snapshots"], 0)?;
        Ok(list
            .as_array()
            .map(|l| {
                l.iter()
                    .filter_map(|s| s["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// Makes every node a friend of every other one (both directions).
///
/// # Errors
/// When a `peer add` fails.
pub fn befriend_all(nodes: &[&Node]) -> Result<()> {
    for a in nodes {
        for b in nodes {
            if a.data_dir != b.data_dir {
                a.add_peer(b, &[])?;
            }
        }
    }
    Ok(())
}

/// Polls `cond` every 100 ms until it holds or `timeout` passes.
///
/// # Errors
/// On timeout, with `what`; or the first error `cond` returns.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if cond()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every file below `dir` whose name ends in `.ext`, sorted (none when `dir` is missing).
pub fn files_below(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == ext) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Whether any file below `dir` contains `needle` (in its name or its bytes).
///
/// # Errors
/// When the tree cannot be read.
pub fn tree_contains(dir: &Path, needle: &[u8]) -> Result<Vec<PathBuf>> {
    let mut hits = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.as_os_str()
            .as_encoded_bytes()
            .windows(needle.len())
            .any(|w| w == needle)
        {
            hits.push(p.clone());
        }
        let meta = std::fs::symlink_metadata(&p)?;
        if meta.is_dir() {
            hits.extend(tree_contains(&p, needle)?);
        } else if meta.is_file() {
            let bytes = std::fs::read(&p).unwrap_or_default();
            if bytes.windows(needle.len()).any(|w| w == needle) {
                hits.push(p);
            }
        }
    }
    Ok(hits)
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Compares two trees: entry types, modes, contents, symlink targets, and mtimes of files,
/// symlinks and directories. Entries named in `skip` (by file name) are left out of both.
///
/// # Errors
/// The first differences found, listed.
pub fn compare_trees(a: &Path, b: &Path, skip: &[&str]) -> Result<usize> {
    let mut diffs = Vec::new();
    let mut count = 0;
    compare_dir(a, b, skip, &mut diffs, &mut count)?;
    if diffs.is_empty() {
        Ok(count)
    } else {
        bail!(
            "{} differences between {} and {}:\n{}",
            diffs.len(),
            a.display(),
            b.display(),
            diffs.join("\n")
        )
    }
}

fn names(dir: &Path, skip: &[&str]) -> Result<Vec<std::ffi::OsString>> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .filter(|n| !skip.iter().any(|s| n == std::ffi::OsStr::new(s)))
        .collect();
    v.sort();
    Ok(v)
}

fn compare_dir(
    a: &Path,
    b: &Path,
    skip: &[&str],
    diffs: &mut Vec<String>,
    count: &mut usize,
) -> Result<()> {
    let na = names(a, skip)?;
    let nb = names(b, skip)?;
    if na != nb {
        diffs.push(format!(
            "{}: entries differ: {:?} vs {:?}",
            a.display(),
            na,
            nb
        ));
        return Ok(());
    }
    for n in na {
        *count += 1;
        let pa = a.join(&n);
        let pb = b.join(&n);
        let ma = std::fs::symlink_metadata(&pa)?;
        let mb = std::fs::symlink_metadata(&pb)?;
        if ma.file_type() != mb.file_type() {
            diffs.push(format!("{}: type differs", pa.display()));
            continue;
        }
        if !ma.file_type().is_symlink() && ma.mode() != mb.mode() {
            diffs.push(format!(
                "{}: mode {:o} vs {:o}",
                pa.display(),
                ma.mode(),
                mb.mode()
            ));
        }
        if ma.file_type().is_symlink() {
            if std::fs::read_link(&pa)? != std::fs::read_link(&pb)? {
                diffs.push(format!("{}: symlink target differs", pa.display()));
            }
        } else if ma.is_file() {
            if ma.len() != mb.len() || !same_content(&pa, &pb)? {
                diffs.push(format!("{}: content differs", pa.display()));
            }
        } else if ma.is_dir() {
            compare_dir(&pa, &pb, skip, diffs, count)?;
        } else if ma.rdev() != mb.rdev() {
            diffs.push(format!("{}: device number differs", pa.display()));
        }
        if (ma.mtime(), ma.mtime_nsec()) != (mb.mtime(), mb.mtime_nsec()) {
            diffs.push(format!("{}: mtime differs", pa.display()));
        }
    }
    Ok(())
}

fn same_content(a: &Path, b: &Path) -> Result<bool> {
    let mut fa = std::fs::File::open(a)?;
    let mut fb = std::fs::File::open(b)?;
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(fb.read(&mut bb)? == 0);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// The shared dataset tools (`../shared/bench/` from the workspace root), when present.
pub fn shared_bench() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?.to_owned();
    let p = root.parent()?.join("shared").join("bench");
    p.join("make-dataset").exists().then_some(p)
}
