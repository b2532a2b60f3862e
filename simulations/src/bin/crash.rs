//! `crash`: crash safety with real processes (issue: integrity). Seeded SIGKILLs of the
//! backing-up node and of a friend receiving packs; see [`obnam_simulations::crash`].
//!
//! ```text
//! crash [owner|friend|all] [--points N] [--seed S] [--work DIR] [--json]
//! ```
//!
//! `bench/crash` runs 20 points of each kind in release mode; `.ci/run` runs 5 of each.

use anyhow::{Result, bail};
use obnam_simulations::Bins;
use obnam_simulations::bench::{Flags, main_with};
use obnam_simulations::crash::{CrashOptions, friend_crashes, owner_crashes};
use serde_json::{Value, json};
use std::path::PathBuf;

struct Options {
    owner: bool,
    friend: bool,
    crash: CrashOptions,
    json: bool,
}

fn usage() -> &'static str {
    "usage: crash [owner|friend|all] [--points N] [--seed S] [--work DIR] [--json]"
}

fn parse(args: &[String]) -> Result<Options> {
    let (which, rest) = match args.split_first() {
        Some((w, rest)) if !w.starts_with('-') => (w.as_str(), rest),
        _ => ("all", args),
    };
    let (owner, friend) = match which {
        "owner" => (true, false),
        "friend" => (false, true),
        "all" => (true, true),
        other => bail!("unknown kind {other:?}\n{}", usage()),
    };
    let mut flags = Flags::new(rest);
    let (mut points, mut seed, mut work, mut json) = (5, 1, None, false);
    while let Some(f) = flags.next_flag() {
        match f {
            "--points" => points = flags.parsed::<usize>(f)?,
            "--seed" => seed = flags.parsed::<u64>(f)?,
            "--work" => work = Some(PathBuf::from(flags.parsed::<String>(f)?)),
            "--json" => json = true,
            "-h" | "--help" => bail!("{}", usage()),
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    let work = match work {
        Some(w) => w,
        None => std::env::temp_dir().join(format!("obnam-crash-{}", std::process::id())),
    };
    Ok(Options {
        owner,
        friend,
        crash: CrashOptions {
            points,
            seed,
            work,
            bins: Bins::beside_current_exe()?,
        },
        json,
    })
}

fn summary(r: &Value) -> String {
    let points = r["points"].as_array().map_or(0, Vec::len);
    let mut line = format!(
        "{} kills: {points} points (seed {}, delays 0-{} ms), {} snapshot restores byte-identical",
        r["kind"].as_str().unwrap_or("?"),
        r["seed"],
        r["window_ms"],
        r["snapshot_restores_checked"]
    );
    if let Some(c) = r["kills_mid_transfer"].as_u64() {
        line.push_str(&format!(", {c} kills while the friend was writing a pack"));
    }
    if let Some(c) = r["killed_backups_committed"].as_u64() {
        line.push_str(&format!(
            ", {c} killed backups had committed their snapshot"
        ));
    }
    line
}

fn run(o: Options) -> Result<()> {
    let mut reports = Vec::new();
    let result = (|| -> Result<()> {
        if o.owner {
            let r = owner_crashes(&o.crash)?;
            if !o.json {
                println!("{}", summary(&r));
            }
            reports.push(r);
        }
        if o.friend {
            let r = friend_crashes(&o.crash)?;
            if !o.json {
                println!("{}", summary(&r));
            }
            reports.push(r);
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&o.crash.work);
    result?;
    if o.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "runs": reports }))?
        );
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    main_with("crash", parse, run)
}
