//! S2, restore availability: the chance that a restore is possible **now**, when each friend
//! holding a piece is online with probability `a`.
//!
//! With `n` pieces, any `k` of which suffice (replicas are `k = 1`, `n = r`), and friends online
//! independently:
//!
//! ```text
//! P(restore) = Σ_{i=k}^{n} C(n, i) · aⁱ · (1 − a)ⁿ⁻ⁱ
//! ```
//!
//! **Two classes.** Homes mix always-on machines (a NAS, a desktop: online with probability
//! `a_on`) and laptops (online with probability `a`). An owner's `n` friends are drawn from a
//! population where a share `s` is always-on, so the number `J` of always-on holders is
//! Binomial(n, s), and for a given owner
//!
//! ```text
//! P(restore | J = j) = P(at least k of: j holders at a_on and n − j holders at a)
//! ```
//!
//! Averaged over owners this equals the independent formula at the mean availability
//! `s·a_on + (1 − s)·a`, so the figure that matters is the spread: [`two_class`] gives the mean
//! and the worst decile, the owners whose friends are all laptops.
//!
//! Sums of at most a few dozen terms of binomial probabilities: plain `f64` is exact to far
//! better than the figures need (the tests compare with closed forms).

/// A redundancy scheme: `k` of `n` pieces suffice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheme {
    /// Pieces needed.
    pub k: u32,
    /// Pieces stored.
    pub n: u32,
}

impl Scheme {
    /// `r` whole copies.
    pub fn replicas(r: u32) -> Self {
        Self { k: 1, n: r }
    }

    /// A short name: `3 replicas`, `2-of-4`.
    pub fn name(&self) -> String {
        if self.k == 1 {
            format!("{} replica{}", self.n, if self.n == 1 { "" } else { "s" })
        } else {
            format!("{}-of-{}", self.k, self.n)
        }
    }

    /// Bytes stored per byte of data.
    pub fn expansion(&self) -> f64 {
        f64::from(self.n) / f64::from(self.k)
    }
}

/// The schemes of S2: replicas 1 to 5 and the erasure codes 2-of-4, 3-of-6 and 4-of-8.
pub fn schemes() -> Vec<Scheme> {
    let mut s: Vec<Scheme> = (1..=5).map(Scheme::replicas).collect();
    s.extend([(2, 4), (3, 6), (4, 8)].map(|(k, n)| Scheme { k, n }));
    s
}

fn binomial(n: u32, i: u32) -> f64 {
    let i = i.min(n - i);
    (0..i).fold(1.0, |acc, j| acc * f64::from(n - j) / f64::from(j + 1))
}

/// The distribution of the number of successes among `n` independent trials of probability `p`.
fn binomial_pmf(n: u32, p: f64) -> Vec<f64> {
    (0..=n)
        .map(|i| binomial(n, i) * p.powi(i as i32) * (1.0 - p).powi((n - i) as i32))
        .collect()
}

/// P(at least `k` of `n` holders online), each online with probability `a`, independently.
pub fn independent(s: Scheme, a: f64) -> f64 {
    binomial_pmf(s.n, a)[s.k as usize..].iter().sum()
}

/// P(at least `k` online) with `j` holders at `a_on` and `n − j` at `a`.
fn mixed(s: Scheme, j: u32, a_on: f64, a: f64) -> f64 {
    let on = binomial_pmf(j, a_on);
    let off = binomial_pmf(s.n - j, a);
    let mut p = 0.0;
    for (x, px) in on.iter().enumerate() {
        for (y, py) in off.iter().enumerate() {
            if x + y >= s.k as usize {
                p += px * py;
            }
        }
    }
    p
}

/// A two-class population: always-on machines (share `share_on`, online with probability
/// `a_on`) and laptops online with probability `a`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TwoClass {
    /// Mean P(restore) over owners.
    pub mean: f64,
    /// P(restore) of the worst 10% of owners (the tenth percentile over owners).
    pub p10: f64,
    /// The share of owners whose friends are all laptops.
    pub all_laptops: f64,
}

/// S2 for the two-class population; see the module docs.
pub fn two_class(s: Scheme, share_on: f64, a_on: f64, a: f64) -> TwoClass {
    let owners = binomial_pmf(s.n, share_on);
    let by_j: Vec<(f64, f64)> = owners
        .iter()
        .enumerate()
        .map(|(j, w)| (mixed(s, j as u32, a_on, a), *w))
        .collect();
    let mean = by_j.iter().map(|(p, w)| p * w).sum();
    let mut sorted = by_j.clone();
    sorted.sort_by(|x, y| x.0.total_cmp(&y.0));
    let mut acc = 0.0;
    let mut p10 = sorted.first().map_or(0.0, |x| x.0);
    for (p, w) in &sorted {
        acc += w;
        p10 = *p;
        if acc >= 0.1 {
            break;
        }
    }
    TwoClass {
        mean,
        p10,
        all_laptops: owners[0],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_and_codes_match_closed_forms() {
        for a in [0.1, 0.5, 0.9, 0.99] {
            for r in 1..=5 {
                let closed = 1.0 - (1.0f64 - a).powi(r as i32);
                assert!((independent(Scheme::replicas(r), a) - closed).abs() < 1e-15);
            }
            // 2-of-4: 1 − P(0 online) − P(1 online).
            let closed = 1.0 - (1.0f64 - a).powi(4) - 4.0 * a * (1.0f64 - a).powi(3);
            assert!((independent(Scheme { k: 2, n: 4 }, a) - closed).abs() < 1e-15);
            // n-of-n: everyone must be online.
            assert!((independent(Scheme { k: 3, n: 3 }, a) - a.powi(3)).abs() < 1e-15);
        }
        assert_eq!(schemes().len(), 8);
        assert_eq!(Scheme { k: 3, n: 6 }.name(), "3-of-6");
        assert_eq!(Scheme::replicas(1).name(), "1 replica");
    }

    #[test]
    fn two_classes_average_to_the_mean_availability_and_spread_below_it() {
        for s in schemes() {
            for a in [0.2, 0.5, 0.8] {
                let t = two_class(s, 0.3, 0.99, a);
                let mean_a = 0.3 * 0.99 + 0.7 * a;
                assert!((t.mean - independent(s, mean_a)).abs() < 1e-12, "{s:?} {a}");
                assert!(t.p10 <= t.mean + 1e-15);
                assert!((t.all_laptops - 0.7f64.powi(s.n as i32)).abs() < 1e-12);
            }
        }
        // Two replicas, 30% always-on: 49% of owners have two laptops, so the worst decile is
        // exactly the all-laptop case.
        let t = two_class(Scheme::replicas(2), 0.3, 0.99, 0.5);
        assert!((t.p10 - 0.75).abs() < 1e-12, "{t:?}");
    }
}
