//! S5, audit efficacy: how long until audits catch a friend that silently dropped a share `f`
//! of our packs, at `c` audits a day, and how many false alarms friends that are merely offline
//! cause.
//!
//! The simulation drives the node's own audit code: the schedule ([`kind_of`]: of every
//! `audits_per_day` audits one names the newest pack and one the latest root), the choice of
//! pack ([`pick`]) and the judgement of answers ([`judge`]). A friend holds `packs` of our
//! packs and has dropped a random `⌈f·packs⌉` of them (never the newest or the root's: those
//! would be caught by the first audit of each day). At each scheduled audit it is online with
//! probability `online`; an offline friend's audit is judged from a network error with no open
//! connection, as the node does. Detection is the first audit whose pack the friend dropped.
//!
//! The analytic check: with every pick at random, an audit catches the friend with probability
//! `f`, so `P(caught within c audits) = 1 − (1 − f)^c`, and the median time is
//! `ln 2 / (−ln(1 − f) · c · online)` days. The newest and root picks never catch this friend,
//! so the simulated times run a little longer than that: by `c / (c − 2)` for `c ≥ 3`, and by 3
//! for one or two audits a day (the node's schedule then cycles newest, root, random).

use obnam_node::NodeError;
use obnam_node::audit::{Outcome, judge, kind_of, pick};
use obnam_protocol::PackId;
use obnam_protocol::audit::Challenge;
use rand::{RngExt, SeedableRng};

/// One row: a drop share and an audit rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Efficacy {
    /// Share of packs dropped.
    pub dropped: f64,
    /// Audits per day.
    pub per_day: u32,
    /// Median days until caught, over the trials (`f64::INFINITY` if not caught in the horizon).
    pub median_days: f64,
    /// 90th percentile of the days until caught.
    pub p90_days: f64,
    /// Trials not caught within the horizon.
    pub missed: usize,
    /// The analytic median (random picks only).
    pub analytic_median_days: f64,
    /// Audits of an honest friend, while it was offline, that were judged failures.
    pub false_alarms: u64,
    /// Audits of an honest friend made in all.
    pub honest_audits: u64,
}

/// The scenario's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Packs the friend holds.
    pub packs: usize,
    /// Chance the friend is online at an audit.
    pub online: f64,
    /// Trials per row.
    pub trials: usize,
    /// Days simulated at most per trial.
    pub horizon_days: u32,
    /// Seed.
    pub seed: u64,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::INFINITY;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The judgement of an audit of an offline friend, as the node makes it.
fn offline_outcome(pack: PackId, size: u64) -> Outcome {
    let challenge = Challenge::random(pack, size, &[0; 40]);
    judge(
        &challenge,
        size,
        Err(NodeError::Net("connection refused".into())),
        false,
    )
}

/// Runs S5 for one drop share and audit rate.
pub fn efficacy(dropped: f64, per_day: u32, s: &Settings) -> Efficacy {
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(s.seed ^ u64::from(per_day) << 32 ^ dropped.to_bits());
    let packs: Vec<(PackId, u64)> = (0..s.packs)
        .map(|i| {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&(i as u64).to_le_bytes());
            (PackId(id), 8 << 20)
        })
        .collect();
    let newest = packs.last().map(|p| p.0);
    let root = packs.get(packs.len().saturating_sub(2)).map(|p| p.0);
    let lost_count = ((dropped * s.packs as f64).ceil() as usize).clamp(1, s.packs.max(2) - 2);
    let mut times = Vec::with_capacity(s.trials);
    let mut missed = 0;
    let mut false_alarms = 0;
    let mut honest_audits = 0;
    let audits_max = u64::from(per_day) * u64::from(s.horizon_days);
    for _ in 0..s.trials {
        // Which packs the friend dropped: any but the newest and the root's.
        let mut lost = vec![false; s.packs];
        let mut chosen = 0;
        while chosen < lost_count {
            let i = rng.random_range(0..s.packs - 2);
            if !lost[i] {
                lost[i] = true;
                chosen += 1;
            }
        }
        let mut caught = None;
        for n in 0..audits_max {
            let kind = kind_of(n, per_day);
            let Some((pack, _)) = pick(kind, &packs, newest, root, rng.random::<u64>()) else {
                break;
            };
            if rng.random::<f64>() >= s.online {
                continue;
            }
            let i = usize::try_from(u64::from_le_bytes(pack.0[..8].try_into().unwrap_or([0; 8])))
                .unwrap_or(0);
            if lost[i] {
                caught = Some(n as f64 / f64::from(per_day));
                break;
            }
        }
        match caught {
            Some(t) => times.push(t),
            None => {
                missed += 1;
                times.push(f64::INFINITY);
            }
        }
        // The same schedule for an honest friend: an offline audit must never fail it.
        for n in 0..u64::from(per_day) {
            honest_audits += 1;
            if rng.random::<f64>() >= s.online {
                let kind = kind_of(n, per_day);
                if let Some((pack, size)) = pick(kind, &packs, newest, root, rng.random::<u64>())
                    && matches!(offline_outcome(pack, size), Outcome::Failed(_))
                {
                    false_alarms += 1;
                }
            }
        }
    }
    times.sort_by(f64::total_cmp);
    let analytic = if dropped >= 1.0 {
        0.0
    } else {
        std::f64::consts::LN_2 / (-(1.0 - dropped).ln() * f64::from(per_day) * s.online)
    };
    Efficacy {
        dropped,
        per_day,
        median_days: quantile(&times, 0.5),
        p90_days: quantile(&times, 0.9),
        missed,
        analytic_median_days: analytic,
        false_alarms,
        honest_audits,
    }
}

/// The closed form of the issue: P(caught within `c` audits) = 1 − (1 − f)^c.
pub fn caught_within(dropped: f64, audits: u32) -> f64 {
    1.0 - (1.0 - dropped).powi(audits as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(trials: usize) -> Settings {
        Settings {
            packs: 200,
            online: 1.0,
            trials,
            horizon_days: 3650,
            seed: 1,
        }
    }

    #[test]
    fn simulated_detection_matches_the_closed_form() {
        // f = 10%, 16 a day, always online: 14 of 16 picks are random, so the median is about
        // 16/14 of the analytic ln 2 / (−ln 0.9 · 16) = 0.411 days.
        let e = efficacy(0.1, 16, &settings(2000));
        let expected = e.analytic_median_days * 16.0 / 14.0;
        assert!(
            (e.median_days - expected).abs() < 0.15 * expected + 1.0 / 16.0,
            "{e:?} vs {expected}"
        );
        assert_eq!(e.missed, 0);
        assert!((caught_within(0.1, 16) - (1.0 - 0.9f64.powi(16))).abs() < 1e-15);
        assert_eq!(caught_within(1.0, 1), 1.0);
    }

    #[test]
    fn offline_friends_cause_no_false_alarms_and_runs_are_seeded() {
        let mut s = settings(50);
        s.online = 0.5;
        let a = efficacy(0.01, 4, &s);
        assert_eq!(a.false_alarms, 0);
        assert!(a.honest_audits > 0);
        assert_eq!(a, efficacy(0.01, 4, &s));
    }
}
