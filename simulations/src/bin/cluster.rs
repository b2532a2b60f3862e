//! `cluster`: a real cluster under churn (issue: simulations). Node processes on loopback, stopped
//! and started on a seeded schedule over simulated days, disks lost for good and recovered; see
//! [`obnam_simulations::cluster`].
//!
//! ```text
//! cluster [--nodes N] [--days D] [--day-secs S] [--lost L] [--lost-after-days X] [--seed S]
//!         [--work DIR] [--json]
//! ```
//!
//! `bench/cluster` runs 20 nodes for 10 days with 2 disks lost (release build); `.ci/run` runs 6
//! nodes with 1 (debug build).

use anyhow::{Result, bail};
use obnam_simulations::Bins;
use obnam_simulations::bench::{Flags, main_with};
use obnam_simulations::cluster::{Settings, run, summary};
use std::path::PathBuf;

struct Options {
    settings: Settings,
    json: bool,
}

fn usage() -> &'static str {
    "usage: cluster [--nodes N] [--days D] [--day-secs S] [--lost L] [--lost-after-days X] [--seed S] [--work DIR] [--json]"
}

fn parse(args: &[String]) -> Result<Options> {
    let mut flags = Flags::new(args);
    let (mut nodes, mut days, mut day_secs, mut lost) = (20usize, 10u32, 40u64, 2usize);
    let (mut lost_after_days, mut seed, mut work, mut json) = (2.0f64, 1u64, None, false);
    while let Some(f) = flags.next_flag() {
        match f {
            "--nodes" => nodes = flags.parsed(f)?,
            "--days" => days = flags.parsed(f)?,
            "--day-secs" => day_secs = flags.parsed(f)?,
            "--lost" => lost = flags.parsed(f)?,
            "--lost-after-days" => lost_after_days = flags.parsed(f)?,
            "--seed" => seed = flags.parsed(f)?,
            "--work" => work = Some(PathBuf::from(flags.parsed::<String>(f)?)),
            "--json" => json = true,
            "-h" | "--help" => bail!("{}", usage()),
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    if days < 5 || day_secs < 5 || lost_after_days <= 0.0 {
        bail!(
            "need at least 5 days of at least 5 s, and a positive lost_after\n{}",
            usage()
        );
    }
    let work = work.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("obnam-cluster-{}", std::process::id()))
    });
    Ok(Options {
        settings: Settings {
            nodes,
            replicas: 3,
            days,
            day_secs,
            lost,
            lost_after_days,
            seed,
            work,
            bins: Bins::beside_current_exe()?,
        },
        json,
    })
}

fn go(o: Options) -> Result<()> {
    let report = match run(&o.settings) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "the nodes' data and logs are kept in {}",
                o.settings.work.display()
            );
            return Err(e);
        }
    };
    let _ = std::fs::remove_dir_all(&o.settings.work);
    if o.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", summary(&report));
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    main_with("cluster", parse, go)
}
