//! `sim`: the durability model behind obnam's defaults (issue: simulations). Each scenario is
//! deterministic, prints a table (or JSON with `--json`) and writes a PNG plot under
//! `simulations/results/` (or `--out DIR`).
//!
//! ```text
//! sim durability --k K --n N --monthly-loss P [--json]   S1, the analytic check
//! sim availability [--share-on S] [--a-on A] [--json]     S2, restore availability
//! sim audit-efficacy [--trials N] [--online A] [--json]  S5, how fast audits catch loss
//! sim correlated [--trials N] [--json]                   S4, correlated failure and placement
//! sim transient [--reduced] [--json]                     S3, transient versus permanent failure
//! sim bandwidth [--reduced] [--json]                     S6, maintenance bandwidth
//! sim restore-time [--reduced] [--json]                  S7, time to restore after a disaster
//! sim all [--json]                                       every scenario, at a reduced size
//! ```
//!
//! S1 is [`obnam_simulations::durability`], S2 [`obnam_simulations::availability`], S4
//! [`obnam_simulations::correlated`] (with the node's own placement policy) and S5
//! [`obnam_simulations::efficacy`] (driving the node's own audit schedule and judgement). S3, S6
//! and S7 run the churn simulator ([`obnam_simulations::churn`], driving the node's placement,
//! repair trigger and audit schedule) through [`obnam_simulations::policy`].

use anyhow::{Result, bail};
use obnam_simulations::availability::{self, Scheme};
use obnam_simulations::bench::{Flags, main_with};
use obnam_simulations::durability::durability;
use obnam_simulations::plot::{Figure, Series, write_png};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// The examples the Storj v3 whitepaper (§3.4) gives for a monthly loss of 10%.
const PUBLISHED: [(u32, u32, f64); 3] = [
    (1, 2, 0.982_476_903_693_578_3),
    (2, 4, 0.992_073_668_132_746_2),
    (8, 16, 0.999_954_624_068_782_6),
];

fn usage() -> &'static str {
    "usage: sim durability --k K --n N --monthly-loss P [--json] [--out DIR]\n\
     \x20      sim availability [--share-on S] [--a-on A] [--json] [--out DIR]\n\
     \x20      sim audit-efficacy [--trials N] [--online A] [--json] [--out DIR]\n\
     \x20      sim correlated [--trials N] [--json] [--out DIR]\n\
     \x20      sim transient|bandwidth|restore-time [--reduced] [--json] [--out DIR]\n\
     \x20      sim all [--json] [--out DIR]"
}

enum Scenario {
    Durability { k: u32, n: u32, loss: f64 },
    Availability,
    Efficacy,
    Correlated,
    Transient,
    Bandwidth,
    RestoreTime,
    All,
}

struct Options {
    scenario: Scenario,
    json: bool,
    out: PathBuf,
    share_on: f64,
    a_on: f64,
    trials: Option<usize>,
    online: f64,
    reduced: bool,
}

/// Where plots go by default: `simulations/results/` of this source tree.
fn default_out() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("results")
}

fn parse(args: &[String]) -> Result<Options> {
    let Some((first, rest)) = args.split_first() else {
        bail!("{}", usage());
    };
    let mut flags = Flags::new(rest);
    let (mut k, mut n, mut loss, mut json) = (None, None, None, false);
    let (mut out, mut share_on, mut a_on) = (default_out(), 0.3, 0.99);
    let (mut trials, mut online, mut reduced) = (None, 0.7, false);
    while let Some(f) = flags.next_flag() {
        match f {
            "--out" => out = PathBuf::from(flags.parsed::<String>(f)?),
            "--share-on" => share_on = flags.parsed::<f64>(f)?,
            "--a-on" => a_on = flags.parsed::<f64>(f)?,
            "--trials" => trials = Some(flags.parsed::<usize>(f)?),
            "--online" => online = flags.parsed::<f64>(f)?,
            "--k" => k = Some(flags.parsed::<u32>(f)?),
            "--n" => n = Some(flags.parsed::<u32>(f)?),
            "--monthly-loss" => loss = Some(flags.parsed::<f64>(f)?),
            "--json" => json = true,
            "--reduced" => reduced = true,
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
        "availability" => Scenario::Availability,
        "audit-efficacy" => Scenario::Efficacy,
        "correlated" => Scenario::Correlated,
        "transient" => Scenario::Transient,
        "bandwidth" => Scenario::Bandwidth,
        "restore-time" => Scenario::RestoreTime,
        "all" => {
            if k.is_some() || n.is_some() || loss.is_some() {
                bail!("all takes only --json and --out\n{}", usage());
            }
            Scenario::All
        }
        other => bail!("unknown scenario {other:?}\n{}", usage()),
    };
    for (name, p) in [
        ("--share-on", share_on),
        ("--a-on", a_on),
        ("--online", online),
    ] {
        if !(0.0..=1.0).contains(&p) {
            bail!("{name} must be a probability between 0 and 1, got {p}");
        }
    }
    Ok(Options {
        scenario,
        json,
        out,
        share_on,
        a_on,
        trials,
        online,
        reduced,
    })
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

/// "Nines" of a probability: −log10(1 − p), capped at 8 (0.999 is 3).
fn nines(p: f64) -> f64 {
    (-(1.0 - p).max(1e-8).log10()).clamp(0.0, 8.0)
}

/// The availabilities S2 reports: 0.10 to 0.99 in steps of 0.01.
fn grid() -> Vec<f64> {
    (10..=99).map(|i| f64::from(i) / 100.0).collect()
}

/// S1's plot: nines of monthly durability against the monthly loss, for a few schemes.
fn s1_plot(out: &Path) -> Result<PathBuf> {
    let losses: Vec<f64> = (1..=50).map(|i| f64::from(i) / 100.0).collect();
    let mut series = Vec::new();
    for (k, n) in [(1, 2), (1, 3), (2, 4), (4, 8), (8, 16)] {
        let mut points = Vec::new();
        for p in &losses {
            points.push((*p, nines(durability(k, n, *p)?)));
        }
        series.push(Series {
            name: Scheme { k, n }.name(),
            points,
        });
    }
    let path = out.join("s1-durability.png");
    write_png(
        &path,
        &Figure {
            title: "S1: monthly durability (Storj v3 model)".into(),
            x_label: "monthly loss per piece".into(),
            y_label: "nines of durability".into(),
            x: 0.0..0.5,
            y: 0.0..8.0,
            series,
        },
    )?;
    Ok(path)
}

/// S2: the table, the JSON and the two plots.
fn s2(o: &Options) -> Result<Value> {
    let schemes = availability::schemes();
    let mut rows = Vec::new();
    let mut indep_series = Vec::new();
    let mut p10_series = Vec::new();
    for s in &schemes {
        let mut indep = Vec::new();
        let mut two = Vec::new();
        for a in grid() {
            let t = availability::two_class(*s, o.share_on, o.a_on, a);
            indep.push((a, availability::independent(*s, a)));
            two.push((a, t.mean, t.p10));
        }
        indep_series.push(Series {
            name: format!("{} (×{})", s.name(), trim(s.expansion())),
            points: indep.iter().map(|(a, p)| (*a, nines(*p))).collect(),
        });
        p10_series.push(Series {
            name: format!("{} (×{})", s.name(), trim(s.expansion())),
            points: two.iter().map(|(a, _, p10)| (*a, nines(*p10))).collect(),
        });
        rows.push(json!({
            "scheme": s.name(),
            "k": s.k,
            "n": s.n,
            "expansion": s.expansion(),
            "independent": indep.iter().map(|(a, p)| json!([a, p])).collect::<Vec<_>>(),
            "two_class_mean": two.iter().map(|(a, m, _)| json!([a, m])).collect::<Vec<_>>(),
            "two_class_p10": two.iter().map(|(a, _, p)| json!([a, p])).collect::<Vec<_>>(),
        }));
    }
    let p1 = o.out.join("s2-availability.png");
    write_png(
        &p1,
        &Figure {
            title: "S2: P(restore now), friends online independently".into(),
            x_label: "availability of each friend".into(),
            y_label: "nines of P(restore possible)".into(),
            x: 0.1..1.0,
            y: 0.0..8.0,
            series: indep_series,
        },
    )?;
    let p2 = o.out.join("s2-two-class.png");
    write_png(
        &p2,
        &Figure {
            title: format!(
                "S2: worst decile of owners, {}% always-on friends (online {})",
                trim(o.share_on * 100.0),
                o.a_on
            ),
            x_label: "availability of each laptop".into(),
            y_label: "nines of P(restore possible)".into(),
            x: 0.1..1.0,
            y: 0.0..8.0,
            series: p10_series,
        },
    )?;
    Ok(json!({
        "share_on": o.share_on,
        "a_on": o.a_on,
        "schemes": rows,
        "plots": [p1.display().to_string(), p2.display().to_string()],
    }))
}

/// S5: the table rows, the JSON and the plot.
fn s5(o: &Options, trials: usize) -> Result<Value> {
    use obnam_simulations::efficacy::{Settings, caught_within, efficacy};
    let settings = Settings {
        packs: 1000,
        online: o.online,
        trials,
        horizon_days: 3650,
        seed: 5,
    };
    let rates = [1u32, 2, 4, 8, 16, 32, 64];
    let mut rows = Vec::new();
    let mut series = Vec::new();
    for f in [0.001, 0.01, 0.1, 1.0] {
        let mut points = Vec::new();
        for c in rates {
            let e = efficacy(f, c, &settings);
            if e.median_days.is_finite() {
                points.push((
                    f64::from(c).log2(),
                    (e.median_days.max(1.0 / 1440.0)).log10(),
                ));
            }
            rows.push(json!({
                "dropped": f,
                "audits_per_day": c,
                "median_days": if e.median_days.is_finite() { json!(e.median_days) } else { Value::Null },
                "p90_days": if e.p90_days.is_finite() { json!(e.p90_days) } else { Value::Null },
                "missed": e.missed,
                "analytic_median_days": e.analytic_median_days,
                "caught_within_one_day_analytic": caught_within(f, c),
                "false_alarms": e.false_alarms,
                "honest_audits": e.honest_audits,
            }));
        }
        series.push(Series {
            name: format!("{}% dropped", trim(f * 100.0)),
            points,
        });
    }
    let path = o.out.join("s5-audit-efficacy.png");
    write_png(
        &path,
        &Figure {
            title: format!(
                "S5: median time until audits catch a friend (online {}, 1000 packs)",
                o.online
            ),
            x_label: "log2 of audits per day".into(),
            y_label: "log10 of days until caught".into(),
            x: 0.0..6.0,
            y: -3.5..4.0,
            series,
        },
    )?;
    Ok(json!({
        "online": o.online,
        "packs": settings.packs,
        "trials": trials,
        "horizon_days": settings.horizon_days,
        "rows": rows,
        "plot": path.display().to_string(),
    }))
}

/// S4: fixed friends against random scattering when a share of all nodes fails at once.
fn s4(o: &Options, trials: usize) -> Result<Value> {
    use obnam_simulations::correlated::{any_loss, simulate_fixed};
    const NODES: u64 = 5000;
    const PACKS_PER_OWNER: f64 = 1000.0;
    let mut rows = Vec::new();
    for r in [2u64, 3, 4] {
        for q in [0.01, 0.1, 0.3, 0.6] {
            let failed = (q * NODES as f64).round() as u64;
            // Random scattering uses about one set per pack (capped by the sets that exist).
            let all_sets = (0..r).fold(1.0, |acc, i| acc * (NODES - i) as f64 / (i + 1) as f64);
            let scatter_sets = (NODES as f64 * PACKS_PER_OWNER).min(all_sets);
            let sim = simulate_fixed(
                NODES as usize,
                5,
                r as usize,
                failed as usize,
                trials,
                11 + r,
            );
            rows.push(json!({
                "replicas": r,
                "failed_share": q,
                "fixed_friends": any_loss(NODES, failed, r, sim.distinct_sets),
                "fixed_friends_simulated": sim.losses as f64 / sim.trials.max(1) as f64,
                "random_scattering": any_loss(NODES, failed, r, scatter_sets),
                "copysets_paper": if r == 3 && q == 0.01 { json!({"random": 0.9999, "copyset": 0.0015}) } else { Value::Null },
            }));
        }
    }
    let mut series = Vec::new();
    for (name, sets) in [
        ("fixed friends (one set per owner)", NODES as f64),
        (
            "random scattering (one set per pack)",
            NODES as f64 * PACKS_PER_OWNER,
        ),
    ] {
        for r in [2u64, 3] {
            series.push(Series {
                name: format!("{name}, {r} replicas"),
                points: (1..=150)
                    .map(|i| {
                        let q = f64::from(i) / 1000.0;
                        let failed = (q * NODES as f64).round() as u64;
                        (q, any_loss(NODES, failed, r, sets))
                    })
                    .collect(),
            });
        }
    }
    let path = o.out.join("s4-correlated.png");
    write_png(
        &path,
        &Figure {
            title: "S4: P(some owner loses data) when a share of 5,000 nodes fails at once".into(),
            x_label: "share of nodes failing together".into(),
            y_label: "probability that some owner loses data".into(),
            x: 0.0..0.15,
            y: 0.0..1.05,
            series,
        },
    )?;
    Ok(json!({
        "nodes": NODES,
        "packs_per_owner": PACKS_PER_OWNER,
        "friends_per_owner": 5,
        "trials": trials,
        "rows": rows,
        "plot": path.display().to_string(),
    }))
}

fn s4_table(v: &Value) -> String {
    let mut t = format!(
        "S4: P(some owner loses data) when a share of {} nodes fails together (each owner: 5 friends, 1000 packs; {} simulated trials per row). Copysets (ATC 2013), 5,000 nodes, 1% failing, 3 replicas: random replication 99.99%, copyset replication 0.15%.\n\n| replicas | failing | fixed friends (formula) | fixed friends (simulated) | random scattering |\n|---|---|---|---|---|\n",
        v["nodes"], v["trials"]
    );
    for r in v["rows"].as_array().into_iter().flatten() {
        t.push_str(&format!(
            "| {} | {}% | {:.6} | {:.3} | {:.6} |\n",
            r["replicas"],
            trim(r["failed_share"].as_f64().unwrap_or(0.0) * 100.0),
            r["fixed_friends"].as_f64().unwrap_or(f64::NAN),
            r["fixed_friends_simulated"].as_f64().unwrap_or(f64::NAN),
            r["random_scattering"].as_f64().unwrap_or(f64::NAN),
        ));
    }
    t
}

fn s5_table(v: &Value) -> String {
    let mut t = format!(
        "S5: days until audits catch a friend that dropped a share of {} packs (online {}, {} trials; median, 90th percentile, and the analytic median 1 − (1 − f)^c for random picks)\n\n| dropped | audits/day | median days | p90 days | analytic median | P(caught in 1 day) analytic | missed | false alarms |\n|---|---|---|---|---|---|---|---|\n",
        v["packs"], v["online"], v["trials"]
    );
    let days = |x: &Value| {
        x.as_f64()
            .map_or_else(|| "never".to_owned(), |d| format!("{d:.3}"))
    };
    for r in v["rows"].as_array().into_iter().flatten() {
        t.push_str(&format!(
            "| {}% | {} | {} | {} | {:.3} | {:.4} | {} | {} of {} |\n",
            trim(r["dropped"].as_f64().unwrap_or(0.0) * 100.0),
            r["audits_per_day"],
            days(&r["median_days"]),
            days(&r["p90_days"]),
            r["analytic_median_days"].as_f64().unwrap_or(f64::NAN),
            r["caught_within_one_day_analytic"]
                .as_f64()
                .unwrap_or(f64::NAN),
            r["missed"],
            r["false_alarms"],
            r["honest_audits"]
        ));
    }
    t
}

/// S2's table at a few availabilities.
fn s2_table(v: &Value) -> String {
    let cols = [0.1, 0.3, 0.5, 0.7, 0.9, 0.99];
    let at = |series: &Value, a: f64| {
        series
            .as_array()
            .and_then(|l| {
                l.iter()
                    .find(|p| (p[0].as_f64().unwrap_or(-1.0) - a).abs() < 1e-9)
            })
            .and_then(|p| p[1].as_f64())
            .unwrap_or(f64::NAN)
    };
    let header = |title: &str| {
        let mut t = format!("{title}\n\n| scheme | ×stored |");
        for a in cols {
            t.push_str(&format!(" a = {a} |"));
        }
        t.push_str("\n|---|---|");
        for _ in cols {
            t.push_str("---|");
        }
        t.push('\n');
        t
    };
    let mut out = String::new();
    for (key, title) in [
        (
            "independent",
            "S2: P(restore possible now), friends online independently with probability a"
                .to_owned(),
        ),
        (
            "two_class_mean",
            format!(
                "S2: two classes ({}% always-on, online {}; laptops online a): mean over owners",
                trim(v["share_on"].as_f64().unwrap_or(0.0) * 100.0),
                v["a_on"]
            ),
        ),
        (
            "two_class_p10",
            "S2: two classes: the worst decile of owners (those with the fewest always-on friends)"
                .to_owned(),
        ),
    ] {
        out.push_str(&header(&title));
        for r in v["schemes"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "| {} | {} |",
                r["scheme"].as_str().unwrap_or("?"),
                trim(r["expansion"].as_f64().unwrap_or(f64::NAN))
            ));
            for a in cols {
                out.push_str(&format!(" {:.6} |", at(&r[key], a)));
            }
            out.push('\n');
        }
        out.push('\n');
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
            s1_plot(&o.out)?;
        }
        Scenario::Correlated => {
            let v = s4(&o, o.trials.unwrap_or(200))?;
            if o.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", s4_table(&v));
            }
        }
        Scenario::Efficacy => {
            let v = s5(&o, o.trials.unwrap_or(1000))?;
            if o.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", s5_table(&v));
            }
        }
        Scenario::Transient | Scenario::Bandwidth | Scenario::RestoreTime => {
            use obnam_simulations::policy::{self, Size};
            let size = if o.reduced { Size::REDUCED } else { Size::FULL };
            let (v, t) = match o.scenario {
                Scenario::Transient => {
                    let v = policy::s3(&o.out, size)?;
                    let t = policy::s3_table(&v);
                    (v, t)
                }
                Scenario::Bandwidth => {
                    let v = policy::s6(&o.out, size)?;
                    let t = policy::s6_table(&v);
                    (v, t)
                }
                _ => {
                    let v = policy::s7(&o.out, size)?;
                    let t = policy::s7_table(&v);
                    (v, t)
                }
            };
            if o.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{t}");
            }
        }
        Scenario::Availability => {
            let v = s2(&o)?;
            if o.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", s2_table(&v));
            }
        }
        Scenario::All => {
            let s2v = s2(&o)?;
            let s5v = s5(&o, o.trials.unwrap_or(100))?;
            let s4v = s4(&o, o.trials.unwrap_or(20))?;
            let size = obnam_simulations::policy::Size::REDUCED;
            let s3v = obnam_simulations::policy::s3(&o.out, size)?;
            let s6v = obnam_simulations::policy::s6(&o.out, size)?;
            let s7v = obnam_simulations::policy::s7(&o.out, size)?;
            let s1_png = s1_plot(&o.out)?;
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
                    serde_json::to_string_pretty(&json!({
                        "durability": rows,
                        "durability_plot": s1_png.display().to_string(),
                        "availability": s2v,
                        "audit_efficacy": s5v,
                        "correlated": s4v,
                        "transient": s3v,
                        "bandwidth": s6v,
                        "restore_time": s7v,
                    }))?
                );
            } else {
                print!(
                    "{}",
                    table("S1: monthly durability at 10% monthly loss", &rows)
                );
                println!();
                print!("{}", s2_table(&s2v));
                println!();
                print!("{}", s5_table(&s5v));
                println!();
                print!("{}", s4_table(&s4v));
                println!();
                print!("{}", obnam_simulations::policy::s3_table(&s3v));
                println!();
                print!("{}", obnam_simulations::policy::s6_table(&s6v));
                println!();
                print!("{}", obnam_simulations::policy::s7_table(&s7v));
                println!("plots: {}", o.out.display());
            }
        }
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    main_with("sim", parse, run)
}
