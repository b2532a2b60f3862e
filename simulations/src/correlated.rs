//! S4, correlated failure and placement: the chance that **any** owner loses data when a share
//! `q` of all nodes fail at once (a power cut in a city, a bad update), for two placements:
//!
//! - **whole-set replicas on fixed friends** (obnam): each owner's every pack goes to the same
//!   `r` friends, chosen by the node's own policy ([`choose_replica_set`]) among friends drawn at
//!   random from the population. An owner loses data when all `r` of them fail;
//! - **random scattering**: each pack goes to `r` nodes drawn at random, so every owner uses
//!   many different sets of `r` nodes, and losing all `r` of any one of them loses data.
//!
//! With `N` nodes of which `F = q·N` fail, one set of `r` distinct nodes fails entirely with
//! probability `p = C(F, r) / C(N, r)`, and data is lost somewhere with probability
//! `1 − (1 − p)^S`, where `S` is the number of distinct sets in use: one per owner for fixed
//! friends, and about one per pack for scattering. This is the argument of the Copysets paper
//! (Cidon et al., USENIX ATC 2013), whose figure is printed beside ours: at 1% of 5,000 nodes
//! failing with 3 replicas, random replication loses data with probability 99.99%, copyset
//! replication with 0.15%.
//!
//! The fixed-friend figure is also simulated (seeded): owners pick friends at random, the node's
//! policy picks the replica set, `F` random nodes fail, and the run counts trials in which some
//! owner's whole set failed.

use obnam_node::replication::{Candidate, choose_replica_set};
use rand::{RngExt, SeedableRng};

/// `ln C(n, k)`.
fn ln_choose(n: u64, k: u64) -> f64 {
    if k > n {
        return f64::NEG_INFINITY;
    }
    (0..k)
        .map(|i| ((n - i) as f64).ln() - ((i + 1) as f64).ln())
        .sum()
}

/// The chance that one given set of `r` distinct nodes fails entirely when `failed` of `nodes`
/// fail.
pub fn set_fails(nodes: u64, failed: u64, r: u64) -> f64 {
    (ln_choose(failed, r) - ln_choose(nodes, r)).exp()
}

/// The chance that data is lost somewhere when `sets` distinct sets are in use.
pub fn any_loss(nodes: u64, failed: u64, r: u64, sets: f64) -> f64 {
    let p = set_fails(nodes, failed, r);
    // 1 − (1 − p)^S without cancellation.
    -(sets * (-p).ln_1p()).exp_m1()
}

/// One simulated row.
#[derive(Debug, Clone, PartialEq)]
pub struct Simulated {
    /// Trials in which some owner lost data.
    pub losses: usize,
    /// Trials run.
    pub trials: usize,
    /// Distinct replica sets in use (averaged over trials).
    pub distinct_sets: f64,
}

/// Simulates fixed friends: `nodes` owners, each with `friends` friends drawn at random and a
/// replica set of `r` chosen by the node's policy; `failed` random nodes fail together.
pub fn simulate_fixed(
    nodes: usize,
    friends: usize,
    r: usize,
    failed: usize,
    trials: usize,
    seed: u64,
) -> Simulated {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut losses = 0;
    let mut distinct = 0.0;
    for _ in 0..trials {
        // Each owner's friends and its replica set by the node's own rule.
        let mut sets: Vec<Vec<usize>> = Vec::with_capacity(nodes);
        for owner in 0..nodes {
            let mut mine: Vec<usize> = Vec::with_capacity(friends);
            while mine.len() < friends.min(nodes - 1) {
                let f = rng.random_range(0..nodes);
                if f != owner && !mine.contains(&f) {
                    mine.push(f);
                }
            }
            let ids: Vec<[u8; 8]> = mine.iter().map(|f| (*f as u64).to_be_bytes()).collect();
            let candidates: Vec<Candidate<'_>> = mine
                .iter()
                .zip(&ids)
                .enumerate()
                .map(|(i, (_, id))| Candidate {
                    added_ns: i as i64,
                    id,
                    household: "",
                    eligible: true,
                })
                .collect();
            let mut set: Vec<usize> = choose_replica_set(&candidates, r)
                .into_iter()
                .map(|i| mine[i])
                .collect();
            set.sort_unstable();
            sets.push(set);
        }
        let mut unique = sets.clone();
        unique.sort();
        unique.dedup();
        distinct += unique.len() as f64;
        let mut down = vec![false; nodes];
        let mut n = 0;
        while n < failed.min(nodes) {
            let i = rng.random_range(0..nodes);
            if !down[i] {
                down[i] = true;
                n += 1;
            }
        }
        if sets
            .iter()
            .any(|s| s.len() == r && s.iter().all(|&i| down[i]))
        {
            losses += 1;
        }
    }
    Simulated {
        losses,
        trials,
        distinct_sets: distinct / trials.max(1) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copysets_figure_is_reproduced() {
        // Copysets (ATC 2013): 5,000 nodes, 1% fail, 3 replicas. With random replication the
        // paper's cluster used enough distinct sets to lose data with probability 99.99%; with
        // about 1e7 sets in use our formula gives the same.
        let p = any_loss(5000, 50, 3, 1e7);
        assert!(p > 0.9999, "{p}");
        // One set per owner: 5,000 sets.
        let fixed = any_loss(5000, 50, 3, 5000.0);
        assert!((0.004..0.006).contains(&fixed), "{fixed}");
        // p = C(50,3)/C(5000,3), exactly.
        let exact = (50.0 * 49.0 * 48.0) / (5000.0 * 4999.0 * 4998.0);
        assert!((set_fails(5000, 50, 3) - exact).abs() < 1e-18);
        assert_eq!(any_loss(10, 10, 3, 1.0), 1.0);
        assert_eq!(any_loss(10, 2, 3, 5.0), 0.0);
    }

    #[test]
    fn the_simulation_agrees_with_the_formula() {
        // 200 nodes, 30% fail together, 3 replicas out of 5 friends each.
        let s = simulate_fixed(200, 5, 3, 60, 400, 7);
        let analytic = any_loss(200, 60, 3, s.distinct_sets);
        let simulated = s.losses as f64 / s.trials as f64;
        assert!(
            (simulated - analytic).abs() < 0.08,
            "{simulated} vs {analytic}"
        );
        assert_eq!(s, simulate_fixed(200, 5, 3, 60, 400, 7), "seeded");
    }
}
