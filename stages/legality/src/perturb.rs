//! Perturbed val streams: the prefix kept, the suffix after a cut replaced by a seeded
//! shuffle of itself.
//!
//! A legal scorer's numbers for targets up to the cut cannot change (C1: they may
//! depend on the prefix only), and its distribution at the first target after the cut
//! cannot either, although that target changed (its prefix did not). A shuffle keeps
//! the suffix's own tokens, so the stream stays in-distribution and the same length
//! (every position is still scored), while every later bigram and longer context moves.

use serde::{Deserialize, Serialize};
use stage_api::{check_param, StageError, StageParams};

/// One cut: where, and how the suffix is shuffled. These are the `perturb` stage's
/// parameters and the entries of the `legality` stage's `cuts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CutParams {
    /// Where the cut falls, as a fraction of the val targets.
    pub at: f64,
    /// Seeds the shuffle of the suffix.
    pub seed: u64,
    /// The cut is moved to just before the first position, from `at` on, where pass-1
    /// keeps its whole distribution (pass-1's `mass_sample` and `mass_seed`, whose
    /// defaults these are), so that the distribution at the changed target exists in
    /// both runs.
    pub sample: usize,
    pub sample_seed: u64,
}

impl Default for CutParams {
    fn default() -> Self {
        CutParams {
            at: 0.5,
            seed: 1337,
            sample: 4096,
            sample_seed: 1337,
        }
    }
}

impl StageParams for CutParams {
    fn validate(&self) -> Result<(), StageError> {
        if !(self.at > 0.0 && self.at < 1.0) {
            return Err(StageError::invalid_param(
                "at",
                format!(
                    "{} is not inside (0, 1): the cut is a fraction of the val targets",
                    self.at
                ),
            ));
        }
        check_param("sample", self.sample, 0..=65_536, "as pass-1's mass_sample")
    }
}

/// A perturbed stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Perturbed {
    /// Targets 1..=cut keep their prefix and their token.
    pub cut: usize,
    pub tokens: Vec<u16>,
}

impl Perturbed {
    /// The first changed target.
    pub fn changed(&self) -> usize {
        self.cut + 1
    }
}

/// The cut for a stream of `len` tokens (targets 1..len).
pub fn cut_position(len: usize, cut: &CutParams) -> Result<usize, String> {
    if len < 3 {
        return Err(format!("{len} val tokens: too few to cut (at least 3)"));
    }
    let targets = len - 1;
    let wanted = ((cut.at * targets as f64).ceil() as usize).clamp(2, targets);
    let sample = stage_api::sample_positions(targets, cut.sample, cut.sample_seed);
    let first_changed = sample
        .iter()
        .map(|&p| p as usize)
        .find(|&p| p >= wanted)
        .unwrap_or(wanted);
    Ok(first_changed - 1)
}

/// The stream with everything after the cut shuffled (Fisher–Yates driven by
/// splitmix64 from `seed`, reproducible in a few lines of any language), and the first
/// changed target made to differ from the original's.
pub fn perturb(tokens: &[u16], cut: &CutParams) -> Result<Perturbed, String> {
    let k = cut_position(tokens.len(), cut)?;
    let mut out = tokens.to_vec();
    let suffix = &mut out[k + 1..];
    let mut state = cut.seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..suffix.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        suffix.swap(i, j);
    }
    let original = tokens[k + 1];
    if suffix[0] == original {
        let Some(other) = suffix.iter().position(|&t| t != original) else {
            return Err(format!(
                "every val token after position {k} is {original}: no shuffle can change the target at {}",
                k + 1
            ));
        };
        suffix.swap(0, other);
    }
    Ok(Perturbed {
        cut: k,
        tokens: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_stays_the_suffix_is_a_permutation_and_the_first_target_moves() {
        let tokens: Vec<u16> = (0..1000).map(|i| (i * 7 % 13) as u16).collect();
        let cut = CutParams {
            at: 0.3,
            ..CutParams::default()
        };
        let p = perturb(&tokens, &cut).unwrap();
        assert!(p.cut >= 299, "{}", p.cut);
        assert_eq!(p.tokens[..=p.cut], tokens[..=p.cut]);
        assert_ne!(p.tokens[p.changed()], tokens[p.changed()]);
        let (mut a, mut b) = (
            tokens[p.changed()..].to_vec(),
            p.tokens[p.changed()..].to_vec(),
        );
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
        assert_eq!(p, perturb(&tokens, &cut).unwrap(), "seeded");
        let other = perturb(
            &tokens,
            &CutParams {
                seed: 7,
                ..cut.clone()
            },
        )
        .unwrap();
        assert_ne!(p.tokens, other.tokens);
    }

    #[test]
    fn the_cut_lands_just_before_a_sampled_position() {
        let cut = CutParams {
            at: 0.5,
            sample: 64,
            ..CutParams::default()
        };
        let k = cut_position(10_001, &cut).unwrap();
        let sample = stage_api::sample_positions(10_000, 64, 1337);
        assert!(sample.contains(&(k as i64 + 1)), "{k}");
        assert!(k + 1 >= 5000);
        let unsampled = CutParams { sample: 0, ..cut };
        assert_eq!(cut_position(10_001, &unsampled).unwrap(), 4999);
    }

    #[test]
    fn a_constant_suffix_cannot_be_perturbed() {
        let tokens = vec![3u16; 100];
        let err = perturb(&tokens, &CutParams::default()).unwrap_err();
        assert!(err.contains("no shuffle can change the target"), "{err}");
    }
}
