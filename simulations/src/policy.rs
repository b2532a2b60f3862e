//! The policy scenarios of `sim` that run the churn simulator ([`crate::churn`]): S3
//! (transient against permanent failure), S6 (maintenance bandwidth) and S7 (time to restore
//! after a disaster). Each returns its JSON, prints as a table and writes a PNG plot.

use crate::churn::{Outcome, Policy, RestoreSettings, Settings, restore_days, run};
use crate::plot::{Figure, Series, write_png};
use anyhow::Result;
use serde_json::{Value, json};
use std::path::Path;

/// How big a run is.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    /// Nodes simulated.
    pub nodes: usize,
    /// Simulated years.
    pub years: f64,
    /// Seeds averaged over.
    pub seeds: u64,
    /// Restores per S7 row.
    pub restores: usize,
}

impl Size {
    /// The full size.
    pub const FULL: Size = Size {
        nodes: 300,
        years: 3.0,
        seeds: 3,
        restores: 200,
    };
    /// For `sim all` and CI.
    pub const REDUCED: Size = Size {
        nodes: 100,
        years: 1.0,
        seeds: 1,
        restores: 40,
    };
}

/// Runs `s` under `size.seeds` seeds and averages the outcomes.
fn averaged(s: &Settings, size: Size) -> Outcome {
    let mut sum = Outcome::default();
    let n = size.seeds.max(1);
    for seed in 0..n {
        let o = run(&Settings {
            seed: s.seed.wrapping_add(seed * 7919),
            ..s.clone()
        });
        sum.repair_gb_per_node_year += o.repair_gb_per_node_year;
        sum.repairs += o.repairs;
        sum.transient_repairs += o.transient_repairs;
        sum.under_replicated += o.under_replicated;
        sum.no_copy += o.no_copy;
        sum.unrecoverable += o.unrecoverable;
        sum.owner_deaths += o.owner_deaths;
        sum.availability += o.availability;
        sum.copies += o.copies;
    }
    let k = n as f64;
    sum.repair_gb_per_node_year /= k;
    sum.under_replicated /= k;
    sum.no_copy /= k;
    sum.availability /= k;
    sum.copies /= k;
    sum
}

fn outcome_json(o: &Outcome) -> Value {
    json!({
        "repair_gb_per_node_year": o.repair_gb_per_node_year,
        "repairs": o.repairs,
        "transient_repairs": o.transient_repairs,
        "under_replicated": o.under_replicated,
        "no_copy": o.no_copy,
        "unrecoverable": o.unrecoverable,
        "owner_deaths": o.owner_deaths,
        "availability": o.availability,
        "copies": o.copies,
    })
}

/// The `lost_after` values S3 sweeps, in hours: 1 hour to 30 days.
pub const TIMEOUTS_H: [u64; 8] = [1, 6, 24, 72, 168, 336, 504, 720];

/// S3: repair traffic and data loss against `lost_after`, with and without reintegration,
/// against the oracle.
///
/// # Errors
/// Writing the plot.
pub fn s3(out: &Path, size: Size) -> Result<Value> {
    let base = Settings {
        nodes: size.nodes,
        years: size.years,
        ..Settings::default()
    };
    let oracle = averaged(
        &Settings {
            policy: Policy::Oracle,
            ..base.clone()
        },
        size,
    );
    let floor = oracle.repair_gb_per_node_year.max(1e-9);
    let mut rows = Vec::new();
    let mut series = Vec::new();
    for reintegrate in [true, false] {
        let mut points = Vec::new();
        for t in TIMEOUTS_H {
            let o = averaged(
                &Settings {
                    lost_after_secs: t * 3600,
                    policy: Policy::Node { reintegrate },
                    ..base.clone()
                },
                size,
            );
            let ratio = o.repair_gb_per_node_year / floor;
            points.push(((t as f64).log10(), ratio.min(10.0)));
            rows.push(json!({
                "lost_after_hours": t,
                "reintegrate": reintegrate,
                "traffic_over_oracle": ratio,
                "outcome": outcome_json(&o),
            }));
        }
        series.push(Series {
            name: if reintegrate {
                "obnam (returning friends count again)".into()
            } else {
                "without reintegration".into()
            },
            points,
        });
    }
    let lo = (TIMEOUTS_H[0] as f64).log10();
    let hi = (TIMEOUTS_H[TIMEOUTS_H.len() - 1] as f64).log10();
    series.push(Series {
        name: "Carbonite's policy: 1.44 × oracle".into(),
        points: vec![(lo, 1.44), (hi, 1.44)],
    });
    series.push(Series {
        name: "naive policies: about 2 × oracle".into(),
        points: vec![(lo, 2.0), (hi, 2.0)],
    });
    let path = out.join("s3-transient.png");
    write_png(
        &path,
        &Figure {
            title: format!(
                "S3: repair traffic over the oracle's, {} nodes, {} years",
                size.nodes, size.years
            ),
            x_label: "log10 of lost_after, hours".into(),
            y_label: "repair traffic / oracle's (capped at 10)".into(),
            x: lo..hi,
            y: 0.0..10.0,
            series,
        },
    )?;
    Ok(json!({
        "settings": settings_json(&base),
        "seeds": size.seeds,
        "oracle": outcome_json(&oracle),
        "rows": rows,
        "published": {"carbonite_policy_over_oracle": 1.44, "naive_over_oracle": 2.0},
        "plot": path.display().to_string(),
    }))
}

fn settings_json(s: &Settings) -> Value {
    json!({
        "nodes": s.nodes, "friends": s.friends, "replicas": s.replicas, "years": s.years,
        "share_always_on": s.share_on, "data_gb": s.data_gb, "uplink_mbps": s.uplink_mbps,
        "death_per_year": s.death_per_year, "disaster_per_year": s.disaster_per_year,
        "household_outages_per_year": s.outage_per_year, "outage_hours": s.outage_hours,
        "city_outages_per_year": s.city_outage_per_year, "away_per_year": s.away_per_year,
        "silent_loss_per_year": s.silent_loss_per_year, "audits_per_day": s.audits_per_day,
        "replace_friend_days": s.replace_friend_days,
    })
}

/// S3's table.
pub fn s3_table(v: &Value) -> String {
    let o = &v["oracle"];
    let mut t = format!(
        "S3: repair traffic against lost_after ({} nodes, {} years, {} seed(s)). Oracle (repairs permanent losses only): {:.1} GB per node-year. Carbonite (NSDI 2006): its policy +44% over the oracle, naive policies about 2×.\n\n| lost_after | reintegration | GB/node-year | × oracle | copies held | repairs | not explained by a loss | under-replicated | no copy | unrecoverable |\n|---|---|---|---|---|---|---|---|---|---|\n",
        v["settings"]["nodes"],
        v["settings"]["years"],
        v["seeds"],
        o["repair_gb_per_node_year"].as_f64().unwrap_or(f64::NAN)
    );
    for r in v["rows"].as_array().into_iter().flatten() {
        let x = &r["outcome"];
        t.push_str(&format!(
            "| {} | {} | {:.1} | {:.2} | {:.2} | {} | {} | {:.4} | {:.6} | {} |\n",
            hours(r["lost_after_hours"].as_u64().unwrap_or(0)),
            if r["reintegrate"] == true {
                "yes"
            } else {
                "no"
            },
            x["repair_gb_per_node_year"].as_f64().unwrap_or(f64::NAN),
            r["traffic_over_oracle"].as_f64().unwrap_or(f64::NAN),
            x["copies"].as_f64().unwrap_or(f64::NAN),
            x["repairs"],
            x["transient_repairs"],
            x["under_replicated"].as_f64().unwrap_or(f64::NAN),
            x["no_copy"].as_f64().unwrap_or(f64::NAN),
            x["unrecoverable"],
        ));
    }
    t.push_str(&format!(
        "| oracle | – | {:.1} | 1.00 | {:.2} | {} | {} | {:.4} | {:.6} | {} |\n",
        o["repair_gb_per_node_year"].as_f64().unwrap_or(f64::NAN),
        o["copies"].as_f64().unwrap_or(f64::NAN),
        o["repairs"],
        o["transient_repairs"],
        o["under_replicated"].as_f64().unwrap_or(f64::NAN),
        o["no_copy"].as_f64().unwrap_or(f64::NAN),
        o["unrecoverable"],
    ));
    t
}

fn hours(h: u64) -> String {
    if h.is_multiple_of(24) {
        format!("{} d", h / 24)
    } else {
        format!("{h} h")
    }
}

/// S6: repair traffic and time under-replicated against data size, replicas, friend lifetime
/// and uplink speed, at the node's defaults otherwise.
///
/// # Errors
/// Writing the plot.
pub fn s6(out: &Path, size: Size) -> Result<Value> {
    let sizes = [50.0, 200.0, 500.0, 1000.0, 2000.0];
    let base = Settings {
        nodes: size.nodes,
        years: size.years,
        ..Settings::default()
    };
    let mut rows = Vec::new();
    let mut traffic = Vec::new();
    let mut under = Vec::new();
    let push = |rows: &mut Vec<Value>, s: &Settings| -> Outcome {
        let o = averaged(s, size);
        rows.push(json!({
            "data_gb": s.data_gb, "replicas": s.replicas,
            "friend_lifetime_years": 1.0 / s.death_per_year, "uplink_mbps": s.uplink_mbps,
            "monthly_cap_gb": if s.monthly_cap_gb.is_finite() { json!(s.monthly_cap_gb) } else { Value::Null },
            "repair_gb_per_node_month": o.repair_gb_per_node_year / 12.0,
            "outcome": outcome_json(&o),
        }));
        o
    };
    for replicas in [2usize, 3, 4] {
        let mut t = Vec::new();
        for gb in sizes {
            let o = push(
                &mut rows,
                &Settings {
                    data_gb: gb,
                    replicas,
                    ..base.clone()
                },
            );
            t.push((gb, o.repair_gb_per_node_year / 12.0));
        }
        traffic.push(Series {
            name: format!("{replicas} replicas, 20 Mbit/s, 10-year lifetime"),
            points: t,
        });
    }
    for (death, mbps, cap) in [
        (0.2, 20.0, f64::INFINITY),
        (0.1, 5.0, f64::INFINITY),
        (0.1, 100.0, f64::INFINITY),
        (0.1, 20.0, 100.0),
    ] {
        let mut u = Vec::new();
        for gb in sizes {
            let o = push(
                &mut rows,
                &Settings {
                    data_gb: gb,
                    death_per_year: death,
                    uplink_mbps: mbps,
                    monthly_cap_gb: cap,
                    ..base.clone()
                },
            );
            u.push((gb, o.under_replicated * 100.0));
        }
        let capped = if cap.is_finite() {
            format!(", {cap} GB/month cap")
        } else {
            String::new()
        };
        under.push(Series {
            name: format!(
                "3 replicas, {mbps} Mbit/s, {}-year lifetime{capped}",
                1.0 / death
            ),
            points: u,
        });
    }
    // The default row (3 replicas, 20 Mbit/s, 10 years) for the under-replication plot.
    let default_under: Vec<(f64, f64)> = rows
        .iter()
        .filter(|r| {
            r["replicas"] == 3
                && r["uplink_mbps"] == 20.0
                && r["friend_lifetime_years"] == 10.0
                && r["monthly_cap_gb"].is_null()
        })
        .map(|r| {
            (
                r["data_gb"].as_f64().unwrap_or(0.0),
                r["outcome"]["under_replicated"].as_f64().unwrap_or(0.0) * 100.0,
            )
        })
        .collect();
    under.insert(
        0,
        Series {
            name: "3 replicas, 20 Mbit/s, 10-year lifetime".into(),
            points: default_under,
        },
    );
    let max_t = traffic
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    let max_u = under
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    let p1 = out.join("s6-bandwidth.png");
    write_png(
        &p1,
        &Figure {
            title: "S6: repair traffic per node against data size".into(),
            x_label: "backup size per owner, GB".into(),
            y_label: "repair upload per node, GB per month".into(),
            x: 0.0..2000.0,
            y: 0.0..max_t * 1.1,
            series: traffic,
        },
    )?;
    let p2 = out.join("s6-under-replicated.png");
    write_png(
        &p2,
        &Figure {
            title: "S6: share of time a backup is under-replicated".into(),
            x_label: "backup size per owner, GB".into(),
            y_label: "% of owner-hours below the replica target".into(),
            x: 0.0..2000.0,
            y: 0.0..max_u * 1.1,
            series: under,
        },
    )?;
    Ok(json!({
        "settings": settings_json(&base),
        "seeds": size.seeds,
        "rows": rows,
        "plots": [p1.display().to_string(), p2.display().to_string()],
    }))
}

/// S6's table.
pub fn s6_table(v: &Value) -> String {
    let mut t = format!(
        "S6: maintenance bandwidth ({} nodes, {} years, lost_after 14 d with reintegration)\n\n| data | replicas | friend lifetime | uplink | monthly cap | repair GB/node-month | under-replicated | no copy | unrecoverable |\n|---|---|---|---|---|---|---|---|---|\n",
        v["settings"]["nodes"], v["settings"]["years"]
    );
    for r in v["rows"].as_array().into_iter().flatten() {
        let x = &r["outcome"];
        t.push_str(&format!(
            "| {} GB | {} | {} y | {} Mbit/s | {} | {:.2} | {:.4} | {:.6} | {} |\n",
            r["data_gb"],
            r["replicas"],
            r["friend_lifetime_years"],
            r["uplink_mbps"],
            r["monthly_cap_gb"]
                .as_f64()
                .map_or_else(|| "none".to_owned(), |c| format!("{c} GB")),
            r["repair_gb_per_node_month"].as_f64().unwrap_or(f64::NAN),
            x["under_replicated"].as_f64().unwrap_or(f64::NAN),
            x["no_copy"].as_f64().unwrap_or(f64::NAN),
            x["unrecoverable"],
        ));
    }
    t
}

/// S7: days to restore everything after a disaster, against data size, with and without 30% of
/// friends behind a relay.
///
/// # Errors
/// Writing the plot.
pub fn s7(out: &Path, size: Size) -> Result<Value> {
    let s = Settings::default();
    let sizes = [100.0, 250.0, 500.0, 1000.0, 2000.0];
    let mut rows = Vec::new();
    let mut series = Vec::new();
    for relay_share in [0.0, 0.3] {
        let (mut med, mut p90) = (Vec::new(), Vec::new());
        for gb in sizes {
            let days = restore_days(
                &s,
                &RestoreSettings {
                    data_gb: gb,
                    relay_share,
                    relay_mbps: 5.0,
                    downlink_mbps: 100.0,
                    trials: size.restores,
                },
            );
            let q = |x: f64| days[((days.len() - 1) as f64 * x).round() as usize];
            med.push((gb, q(0.5)));
            p90.push((gb, q(0.9)));
            rows.push(json!({
                "data_gb": gb, "relay_share": relay_share,
                "median_days": q(0.5), "p90_days": q(0.9), "max_days": q(1.0),
            }));
        }
        let label = format!("{}% relayed", relay_share * 100.0);
        series.push(Series {
            name: format!("median, {label}"),
            points: med,
        });
        series.push(Series {
            name: format!("90th percentile, {label}"),
            points: p90,
        });
    }
    let max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    let path = out.join("s7-restore-time.png");
    write_png(
        &path,
        &Figure {
            title: "S7: days to restore everything from 3 friends after a disaster".into(),
            x_label: "backup size, GB".into(),
            y_label: "days".into(),
            x: 0.0..2000.0,
            y: 0.0..max * 1.1,
            series,
        },
    )?;
    Ok(json!({
        "replicas": s.replicas, "uplink_mbps": s.uplink_mbps, "relay_mbps": 5.0,
        "downlink_mbps": 100.0, "share_always_on": s.share_on, "restores": size.restores,
        "rows": rows, "plot": path.display().to_string(),
    }))
}

/// S7's table.
pub fn s7_table(v: &Value) -> String {
    let mut t = format!(
        "S7: days to restore everything after a disaster (3 friends at {} Mbit/s up, {}% always on; relayed friends at {} Mbit/s; {} Mbit/s down; {} restores per row)\n\n| data | relayed | median days | 90th percentile | worst |\n|---|---|---|---|---|\n",
        v["uplink_mbps"],
        v["share_always_on"].as_f64().unwrap_or(0.0) * 100.0,
        v["relay_mbps"],
        v["downlink_mbps"],
        v["restores"]
    );
    for r in v["rows"].as_array().into_iter().flatten() {
        t.push_str(&format!(
            "| {} GB | {}% | {:.2} | {:.2} | {:.2} |\n",
            r["data_gb"],
            r["relay_share"].as_f64().unwrap_or(0.0) * 100.0,
            r["median_days"].as_f64().unwrap_or(f64::NAN),
            r["p90_days"].as_f64().unwrap_or(f64::NAN),
            r["max_days"].as_f64().unwrap_or(f64::NAN),
        ));
    }
    t
}
