//! Measuring processes for the benchmarks: CPU time and peak RSS of long-running processes
//! (read from `/proc`, with the peak reset between phases), of one-shot commands (through a
//! `measure` wrapper that waits for exactly one child and reads `getrusage(RUSAGE_CHILDREN)`),
//! and the disk space a directory takes.
//!
//! Linux only. Everything here reads; nothing changes what it measures except the peak-RSS
//! reset (`/proc/PID/clear_refs`), which only resets the counter.

use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What one process used during one phase.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// User plus system CPU seconds.
    pub cpu_s: f64,
    /// Peak resident set size in bytes.
    pub peak_rss: u64,
}

impl Usage {
    /// As JSON.
    pub fn to_json(self) -> Value {
        json!({"cpu_s": self.cpu_s, "peak_rss": self.peak_rss})
    }
}

/// Clock ticks per second, for `/proc/PID/stat`.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system) a running process has used so far.
///
/// # Errors
/// When `/proc/PID/stat` cannot be read or parsed.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name is in parentheses and may contain spaces: split after the last ')'.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("malformed /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: f64 = fields.get(11).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let stime: f64 = fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    Ok((utime + stime) / clock_ticks())
}

/// Peak RSS (VmHWM) of a running process, in bytes.
///
/// # Errors
/// When `/proc/PID/status` cannot be read.
pub fn peak_rss(pid: u32) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb = text
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| anyhow!("no VmHWM in /proc/{pid}/status"))?;
    Ok(kb * 1024)
}

/// Resets a process's peak RSS to its current RSS.
///
/// # Errors
/// When `/proc/PID/clear_refs` cannot be written (another user's process, or no permission).
pub fn reset_peak(pid: u32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting the peak RSS of process {pid}"))
}

/// Watches a long-running process over one phase: [`Watch::start`] resets its peak RSS and
/// notes its CPU time, [`Watch::finish`] returns what the phase used.
#[derive(Debug, Clone, Copy)]
pub struct Watch {
    pid: u32,
    cpu0: f64,
}

impl Watch {
    /// Starts watching `pid`.
    ///
    /// # Errors
    /// When its `/proc` files cannot be read or written.
    pub fn start(pid: u32) -> Result<Self> {
        reset_peak(pid)?;
        Ok(Self {
            pid,
            cpu0: cpu_seconds(pid)?,
        })
    }

    /// What the process used since [`Watch::start`].
    ///
    /// # Errors
    /// When its `/proc` files cannot be read (it exited).
    pub fn finish(self) -> Result<Usage> {
        Ok(Usage {
            cpu_s: cpu_seconds(self.pid)? - self.cpu0,
            peak_rss: peak_rss(self.pid)?,
        })
    }
}

/// What a measured one-shot command did.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Its exit code (-1 when killed by a signal).
    pub code: i32,
    /// Wall-clock seconds.
    pub wall_s: f64,
    /// Its CPU time and peak RSS.
    pub usage: Usage,
    /// Standard output.
    pub stdout: String,
}

/// The `measure` wrapper's side: runs `argv` as its only child (standard output to
/// `stdout_file`, standard error inherited), kills it after `timeout`, and writes its rusage
/// as JSON to `report`. Returns the child's exit code.
///
/// # Errors
/// When the command cannot be started or the report cannot be written.
pub fn measure_child(
    report: &Path,
    stdout_file: &Path,
    timeout: Duration,
    argv: &[String],
) -> Result<i32> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| anyhow!("measure: no command"))?;
    let out = std::fs::File::create(stdout_file)
        .with_context(|| format!("creating {}", stdout_file.display()))?;
    let started = Instant::now();
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .spawn()
        .with_context(|| format!("starting {prog}"))?;
    let status = crate::wait_child(&mut child, timeout, Duration::from_millis(5))
        .with_context(|| prog.clone())?;
    let wall_s = started.elapsed().as_secs_f64();
    let ru = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .context("getrusage")?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    let doc = json!({
        "code": status.code().unwrap_or(-1),
        "wall_s": wall_s,
        "cpu_s": secs(ru.user_time()) + secs(ru.system_time()),
        // Linux reports ru_maxrss in KiB.
        "peak_rss": u64::try_from(ru.max_rss()).unwrap_or(0) * 1024,
    });
    std::fs::write(report, doc.to_string())
        .with_context(|| format!("writing {}", report.display()))?;
    Ok(status.code().unwrap_or(-1))
}

/// Runs `cmd` through the `measure` wrapper (`self_exe measure …`), which must be the running
/// program's hidden subcommand. `scratch` holds the wrapper's report and captured output.
///
/// # Errors
/// When the wrapper fails or times out, or its report is missing.
pub fn measure(
    self_exe: &Path,
    scratch: &Path,
    timeout: Duration,
    cmd: &Command,
) -> Result<Measured> {
    let report = scratch.join("measure.json");
    let stdout_file = scratch.join("measure.out");
    let _ = std::fs::remove_file(&report);
    let mut wrapper = Command::new(self_exe);
    wrapper
        .arg("measure")
        .arg(&report)
        .arg(&stdout_file)
        .arg(timeout.as_secs().to_string())
        .arg("--")
        .arg(cmd.get_program());
    wrapper.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapper.env(k, v),
            None => wrapper.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        wrapper.current_dir(dir);
    }
    let started = Instant::now();
    let status = wrapper
        .stdin(Stdio::null())
        .status()
        .context("running the measure wrapper")?;
    let outer_wall = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&report).with_context(|| {
        format!(
            "the measure wrapper wrote no report for {:?} (exit {status})",
            cmd.get_program()
        )
    })?;
    let v: Value = serde_json::from_str(&text)?;
    let stdout = std::fs::read_to_string(&stdout_file).unwrap_or_default();
    Ok(Measured {
        code: v["code"].as_i64().map_or(-1, |c| c as i32),
        wall_s: v["wall_s"].as_f64().unwrap_or(outer_wall),
        usage: Usage {
            cpu_s: v["cpu_s"].as_f64().unwrap_or(0.0),
            peak_rss: v["peak_rss"].as_u64().unwrap_or(0),
        },
        stdout,
    })
}

/// Disk space the files below `path` take (allocated blocks, as `du` counts them), in bytes.
///
/// # Errors
/// When the tree cannot be read.
pub fn disk_usage(path: &Path) -> Result<u64> {
    let meta =
        std::fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for e in std::fs::read_dir(path).with_context(|| format!("listing {}", path.display()))? {
            total += disk_usage(&e?.path())?;
        }
    }
    Ok(total)
}

/// The median of `xs` (the mean of the middle two for an even count); `None` when empty.
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Removes a directory tree; one that does not exist is fine.
///
/// # Errors
/// When it exists and cannot be removed.
pub fn remove_tree(p: &Path) -> Result<()> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", p.display())),
    }
}

/// Makes (or reuses) the pristine `scale` dataset under `work` with `shared`'s `make-dataset`.
///
/// # Errors
/// When `make-dataset` fails.
pub fn pristine_dataset(shared: &Path, work: &Path, scale: &str) -> Result<std::path::PathBuf> {
    let dir = work.join(format!("{scale}-pristine"));
    let id = dir.join("DATASET_ID");
    let ok = std::fs::read_to_string(&id)
        .is_ok_and(|t| t.contains(&format!("scale={scale}")) && !t.contains("round"));
    if ok {
        return Ok(dir);
    }
    remove_tree(&dir)?;
    eprintln!("making the {scale} dataset in {}", dir.display());
    let status = Command::new(shared.join("make-dataset"))
        .arg(&dir)
        .arg(scale)
        .stdout(Stdio::null())
        .status()
        .context("running make-dataset")?;
    if !status.success() {
        anyhow::bail!("make-dataset {scale} failed");
    }
    Ok(dir)
}

/// Where the benchmarks keep their datasets and scratch files unless told otherwise.
pub const WORK_DIR: &str = "/var/tmp/obnam-bench";

/// This workspace's `bench/results/`, where the benchmarks write their tables.
///
/// # Errors
/// When the workspace root cannot be found from this crate's directory.
pub fn results_dir() -> Result<std::path::PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|root| root.join("bench").join("results"))
        .ok_or_else(|| anyhow!("no workspace root"))
}

/// A benchmark's command line: flags, each followed by its value.
pub struct Flags<'a> {
    it: std::slice::Iter<'a, String>,
}

impl<'a> Flags<'a> {
    /// The arguments after the program name.
    pub fn new(args: &'a [String]) -> Self {
        Self { it: args.iter() }
    }

    /// The next flag.
    pub fn next_flag(&mut self) -> Option<&'a str> {
        self.it.next().map(String::as_str)
    }

    /// The value that follows `flag`.
    ///
    /// # Errors
    /// When there is none.
    pub fn value(&mut self, flag: &str) -> Result<String> {
        self.it
            .next()
            .cloned()
            .ok_or_else(|| anyhow!("{flag} needs a value"))
    }

    /// The value that follows `flag`, parsed.
    ///
    /// # Errors
    /// When there is none, or it does not parse.
    pub fn parsed<T: std::str::FromStr>(&mut self, flag: &str) -> Result<T>
    where
        T::Err: std::error::Error + Send + Sync + 'static,
    {
        self.value(flag)?.parse().context(flag.to_owned())
    }
}

/// Today's date (UTC, `YYYY-MM-DD`), which names the results files.
///
/// # Errors
/// When `date` cannot run.
pub fn today() -> Result<String> {
    let out = Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .context("running date")?;
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// `stem`, or `stem-2`, `stem-3`, and so on: the first for which neither `OUT/<stem>.md` nor
/// `OUT/<stem>.json`
/// exists, so that a second run on the same day does not overwrite the first one's results.
pub fn unused_stem(out: &Path, stem: &str) -> String {
    let taken =
        |s: &str| out.join(format!("{s}.md")).exists() || out.join(format!("{s}.json")).exists();
    if !taken(stem) {
        return stem.to_owned();
    }
    (2u32..)
        .map(|n| format!("{stem}-{n}"))
        .find(|s| !taken(s))
        .unwrap_or_else(|| stem.to_owned())
}

/// Writes `OUT/DATE-KIND.json` and `OUT/DATE-KIND.md` (`-KIND` left out when `kind` is empty;
/// `-2`, `-3`, … added when a run of the same day already wrote them) and prints the Markdown.
///
/// # Errors
/// When the files cannot be written.
pub fn write_results(out: &Path, date: &str, kind: &str, doc: &Value, md: &str) -> Result<()> {
    let stem = if kind.is_empty() {
        date.to_owned()
    } else {
        format!("{date}-{kind}")
    };
    let stem = unused_stem(out, &stem);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(
        out.join(format!("{stem}.json")),
        serde_json::to_string_pretty(doc)?,
    )?;
    std::fs::write(out.join(format!("{stem}.md")), md)?;
    println!("{md}");
    Ok(())
}

/// The `main` of a benchmark program: parses the arguments, runs, and reports a failure as
/// `NAME: error` with exit code 1.
pub fn main_with<O>(
    name: &str,
    parse: impl FnOnce(&[String]) -> Result<O>,
    run: impl FnOnce(O) -> Result<()>,
) -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse(&args).and_then(run) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn this_process_can_be_watched() {
        let pid = std::process::id();
        let w = Watch::start(pid).unwrap();
        let v: Vec<u8> = vec![1; 64 << 20];
        let mut x = 0u64;
        for b in &v {
            x = x.wrapping_add(u64::from(*b));
        }
        assert_eq!(x, 64 << 20);
        let u = w.finish().unwrap();
        assert!(u.peak_rss >= 64 << 20, "{u:?}");
        assert!(u.cpu_s >= 0.0);
        assert!(disk_usage(Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap() > 0);
    }
}
