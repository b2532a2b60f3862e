//! `sim`: the durability model behind obnam's defaults (issue: simulations). Each scenario is
//! deterministic and prints a table, or JSON with `--json`.
//!
//! ```text
//! sim durability --k K --n N --monthly-loss P [--json]   S1, the analytic check
//! sim all [--json]                                       every scenario, at a reduced size
//! ```
//!
//! Implemented so far: S1 ([`obnam_simulations::durability`]). The availability, churn and
//! placement scenarios (S2-S7) are not written yet.

use anyhow::{Result, bail};
use obnam_simulations::bench::{Flags, main_with};
use obnam_simulations::durability::durability;
use serde_json::{Value, json};

/// The examples the Storj v3 whitepaper (§3.4) gives for a monthly loss of 10%.
const PUBLISHED: [(u32, u32, f64); 3] = [
    (1, 2, 0.982_476_903_693_578_3),
    (2, 4, 0.992_073_668_132_746_2),
    (8, 16, 0.999_954_624_068_782_6),
];

fn usage() -> &'static str {
    "usage: sim durability --k K --n N --monthly-loss P [--json]\n\
     \x20      sim all [--json]"
}

enum Scenario {
    Durability { k: u32, n: u32, loss: f64 },
    All,
}

struct Options {
    scenario: Scenario,
    json: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let Some((first, rest)) = args.split_first() else {
        bail!("{}", usage());
    };
    let mut flags = Flags::new(rest);
    let (mut k, mut n, mut loss, mut json) = (None, None, None, false);
    while let Some(f) = flags.next_flag() {
        match f {
            "--k" => k = Some(flags.parsed::<u32>(f)?),
            "--n" => n = Some(flags.parsed::<u32>(f)?),
            "--monthly-loss" => loss = Some(flags.parsed::<f64>(f)?),
            "--json" => json = true,
            "-h" | "--help" => bail!("{}", usage()),
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    let scenario = match first.as_str() {
        "durability" => {
            let (Some(k), Some(n), Some(loss)) = (k, n, loss) else {
                bail!("durability needs --k, --n and --monthly-loss\n{}", usage());
            };
            Scenario::Durability { k, n, loss }
        }
        "all" => {
            if k.is_some() || n.is_some() || loss.is_some() {
                bail!("all takes only --json\n{}", usage());
            }
            Scenario::All
        }
        other => bail!("unknown scenario {other:?}\n{}", usage()),
    };
    Ok(Options { scenario, json })
}

/// One row of the S1 table.
fn row(k: u32, n: u32, loss: f64) -> Result<Value> {
    let d = durability(k, n, loss)?;
    let published = PUBLISHED
        .iter()
        .find(|(pk, pn, _)| (*pk, *pn) == (k, n) && loss == 0.1)
        .map(|(_, _, v)| *v);
    Ok(json!({
        "k": k,
        "n": n,
        "monthly_loss": loss,
        "lambda": loss * f64::from(n),
        "durability": d,
        "published": published,
    }))
}

/// A figure to at most 6 decimals, without trailing zeros.
fn trim(x: f64) -> String {
    let s = format!("{x:.6}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

fn table(title: &str, rows: &[Value]) -> String {
    let mut out = format!(
        "{title}\n\n| k | n | monthly loss | λ | durability | published |\n|---|---|---|---|---|---|\n"
    );
    for r in rows {
        let published = r["published"]
            .as_f64()
            .map_or_else(|| "–".to_owned(), |v| format!("{v:.17}"));
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.17} | {} |\n",
            r["k"],
            r["n"],
            r["monthly_loss"],
            trim(r["lambda"].as_f64().unwrap_or(f64::NAN)),
            r["durability"].as_f64().unwrap_or(f64::NAN),
            published
        ));
    }
    out
}

fn run(o: Options) -> Result<()> {
    match o.scenario {
        Scenario::Durability { k, n, loss } => {
            let r = row(k, n, loss)?;
            if o.json {
                println!("{}", json!({ "durability": r["durability"] }));
            } else {
                print!("{}", table("S1: monthly durability (Storj v3 §3.4)", &[r]));
            }
        }
        Scenario::All => {
            // S1 over the whitepaper's examples and replicas 1 to 5, at 10% monthly loss.
            let mut rows = Vec::new();
            for (k, n) in [
                (1, 1),
                (1, 2),
                (1, 3),
                (1, 4),
                (1, 5),
                (2, 4),
                (4, 8),
                (8, 16),
            ] {
                rows.push(row(k, n, 0.1)?);
            }
            if o.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "durability": rows }))?
                );
            } else {
                print!(
                    "{}",
                    table("S1: monthly durability at 10% monthly loss", &rows)
                );
            }
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    main_with("sim", parse, run)
}
