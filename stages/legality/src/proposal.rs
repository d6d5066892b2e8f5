//! The proposal the replace re-run draws its hidden targets from (see [`crate::perturb`]):
//! close enough to a real model that a replaced token reads like a real one, and with a
//! floor, so that the blind probe's weights p(u)/q(u) are bounded.

use crate::perturb::Secret;

/// The share of the proposal that is the val bigram (the rest is uniform, so that every
/// token has a probability of at least (1 − λ)/V and no weight is unbounded).
pub const PROPOSAL_BIGRAM_SHARE: f64 = 0.9;
/// The proposal bigram's pseudo-count.
pub const PROPOSAL_ADD_K: f64 = 0.1;

/// The proposal q(· | previous token): the val stream's add-k bigram, mixed with the
/// uniform distribution.
pub struct Proposal {
    vocab: usize,
    counts: Vec<u32>,
    totals: Vec<u64>,
}

impl Proposal {
    pub fn new(tokens: &[u16], vocab: usize) -> Proposal {
        let mut counts = vec![0u32; vocab * vocab];
        let mut totals = vec![0u64; vocab];
        for pair in tokens.windows(2) {
            let (a, b) = (pair[0] as usize, pair[1] as usize);
            if a < vocab && b < vocab {
                counts[a * vocab + b] += 1;
                totals[a] += 1;
            }
        }
        Proposal {
            vocab,
            counts,
            totals,
        }
    }

    /// q(next | previous).
    pub fn q(&self, previous: u16, next: u16) -> f64 {
        let (a, b, v) = (previous as usize, next as usize, self.vocab as f64);
        let bigram = (self.counts[a * self.vocab + b] as f64 + PROPOSAL_ADD_K)
            / (self.totals[a] as f64 + PROPOSAL_ADD_K * v);
        PROPOSAL_BIGRAM_SHARE * bigram + (1.0 - PROPOSAL_BIGRAM_SHARE) / v
    }

    /// A draw from q(· | previous) restricted to the tokens `allowed` lets through, by
    /// inverse CDF in candidate order.
    pub(crate) fn draw(
        &self,
        previous: u16,
        allowed: impl Fn(u16) -> bool,
        secret: &mut Secret,
    ) -> u16 {
        let weight = |t: usize| {
            if allowed(t as u16) {
                self.q(previous, t as u16)
            } else {
                0.0
            }
        };
        let total: f64 = (0..self.vocab).map(weight).sum();
        let mut left = secret.unit() * total;
        for t in 0..self.vocab {
            left -= weight(t);
            if left < 0.0 {
                return t as u16;
            }
        }
        (0..self.vocab)
            .rev()
            .find(|&t| weight(t) > 0.0)
            .unwrap_or(0) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> Vec<u16> {
        (0..10_000).map(|i| (i * 7 % 13) as u16).collect()
    }

    #[test]
    fn the_proposal_is_a_distribution_with_a_floor() {
        let proposal = Proposal::new(&stream(), 13);
        for previous in 0..13u16 {
            let sum: f64 = (0..13u16).map(|t| proposal.q(previous, t)).sum();
            assert!((sum - 1.0).abs() < 1e-12, "{sum}");
            assert!((0..13u16).all(|t| proposal.q(previous, t) >= 0.1 / 13.0));
        }
    }
}
