//! The phrase cache (algorithm.md §6): one pair of tables shared by all lengths, probed
//! longest first, without leave-one-out (so every position at least one length long
//! matches: its own occurrence is in both tables, as in the record).

use rayon::prelude::*;

use crate::hash::{context_hash, count_keys, full_hash, PHRASE_PRIMES};
use crate::{check_buckets, ConfigError};

#[derive(Debug, Clone, PartialEq)]
pub struct PhraseConfig {
    /// Probe order: longest first.
    pub lengths: Vec<usize>,
    pub buckets: usize,
    pub min_count: u32,
}

impl Default for PhraseConfig {
    fn default() -> Self {
        PhraseConfig {
            lengths: vec![64, 48, 32, 16],
            buckets: 1 << 23,
            min_count: 1,
        }
    }
}

impl PhraseConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let descending = self.lengths.windows(2).all(|w| w[0] > w[1]);
        if self.lengths.is_empty() || !descending || self.lengths.contains(&0) {
            return Err(ConfigError::PhraseLengths(self.lengths.clone()));
        }
        check_buckets("phrase buckets", self.buckets)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PhraseMatch {
    pub q: f64,
    /// 0 when unmatched.
    pub length: u16,
    /// Context and full counts at the matched length (no leave-one-out; 0 when unmatched).
    pub context: u32,
    pub full: u32,
}

impl PhraseMatch {
    pub fn matched(&self) -> bool {
        self.length != 0
    }
}

pub struct PhraseTables {
    config: PhraseConfig,
    mask: u32,
    pub ctx: Vec<u32>,
    pub full: Vec<u32>,
}

impl PhraseTables {
    pub fn build(tokens: &[u16], config: &PhraseConfig) -> Result<PhraseTables, ConfigError> {
        config.validate()?;
        let mask = (config.buckets - 1) as u32;
        // Each (length, ctx|full) job counts into its own table; the shared tables are
        // their sums, which integer addition makes independent of scheduling.
        let jobs: Vec<(usize, bool)> = config
            .lengths
            .iter()
            .flat_map(|&l| [(l, false), (l, true)])
            .collect();
        let partial: Vec<(bool, Vec<u32>)> = jobs
            .par_iter()
            .map(|&(length, full)| {
                (
                    full,
                    count_keys(tokens, length, &PHRASE_PRIMES, full, config.buckets),
                )
            })
            .collect();
        let mut ctx = vec![0u32; config.buckets];
        let mut full = vec![0u32; config.buckets];
        for (is_full, table) in partial {
            let target = if is_full { &mut full } else { &mut ctx };
            target
                .par_iter_mut()
                .zip(table.par_iter())
                .for_each(|(a, b)| *a += b);
        }
        Ok(PhraseTables {
            config: config.clone(),
            mask,
            ctx,
            full,
        })
    }

    pub fn lookup(&self, tokens: &[u16], p: usize) -> PhraseMatch {
        for &length in &self.config.lengths {
            if p < length {
                continue;
            }
            let h = context_hash(tokens, p, length, &PHRASE_PRIMES);
            let context = self.ctx[(h & self.mask) as usize];
            let full =
                self.full[(full_hash(h, tokens[p], length, &PHRASE_PRIMES) & self.mask) as usize];
            if context >= self.config.min_count && full > 0 {
                let q = (full.min(context) as f64 / context.max(1) as f64).clamp(0.0, 1.0);
                return PhraseMatch {
                    q,
                    length: length as u16,
                    context,
                    full,
                };
            }
        }
        PhraseMatch::default()
    }

    pub fn lookup_all(&self, tokens: &[u16]) -> Vec<PhraseMatch> {
        self.lookup_range(tokens, 0..tokens.len())
    }

    /// Lookups for `positions`, in parallel, in position order.
    pub fn lookup_range(
        &self,
        tokens: &[u16],
        positions: std::ops::Range<usize>,
    ) -> Vec<PhraseMatch> {
        positions
            .into_par_iter()
            .with_min_len(4096)
            .map(|p| self.lookup(tokens, p))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appendix B: on any stream, exactly positions 0..15 are unmatched.
    #[test]
    fn every_position_from_the_shortest_length_on_matches() {
        let mut state = 12345u32;
        let tokens: Vec<u16> = (0..20_001)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                ((state >> 16) % 1024) as u16
            })
            .collect();
        let tables = PhraseTables::build(&tokens, &PhraseConfig::default()).unwrap();
        let matches = tables.lookup_all(&tokens);
        let unmatched: Vec<usize> = (0..tokens.len())
            .filter(|&p| !matches[p].matched())
            .collect();
        assert_eq!(unmatched, (0..16).collect::<Vec<_>>());
    }
}
