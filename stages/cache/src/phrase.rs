//! The phrase cache (algorithm.md §6): one pair of tables shared by all lengths, probed
//! longest first, without leave-one-out (so every position at least one length long
//! matches: its own occurrence is in both tables, as in the record).

use rayon::prelude::*;

use crate::hash::{
    context_hash, context_hashes_of_widths, count_keys, full_hash, lookups_in_blocks, prefetch,
    PHRASE_PRIMES, PREFETCH_DISTANCE,
};
use crate::zeroed::zeroed_table;
use crate::Valid;

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

/// The phrase result for one position, packed to 10 bytes like [`NgramMatch`].
///
/// [`NgramMatch`]: crate::ngram::NgramMatch
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[repr(C, packed)]
pub struct PhraseMatch {
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

    /// The cache's probability of the target, `full / context` (§6).
    #[inline]
    pub fn q(&self) -> f64 {
        crate::ngram::cache_q(self.context, self.full)
    }
}

pub struct PhraseTables {
    config: PhraseConfig,
    mask: u32,
    pub ctx: Vec<u32>,
    pub full: Vec<u32>,
}

/// The longest phrase a table may key on (the record's longest is 64).
pub const MAX_PHRASE_LENGTH: usize = 4096;

impl PhraseTables {
    pub fn build(tokens: &[u16], config: &Valid<PhraseConfig>) -> PhraseTables {
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
            .map_init(Vec::new, |runs, &(length, full)| {
                (
                    full,
                    count_keys(tokens, length, &PHRASE_PRIMES, full, config.buckets, runs),
                )
            })
            .collect();
        let mut ctx = zeroed_table(config.buckets);
        let mut full = zeroed_table(config.buckets);
        for (is_full, table) in partial {
            let target = if is_full { &mut full } else { &mut ctx };
            target
                .par_iter_mut()
                .zip(table.par_iter())
                .for_each(|(a, b)| *a += b);
        }
        PhraseTables {
            config: (**config).clone(),
            mask,
            ctx,
            full,
        }
    }

    /// §6: the longest length whose context count reaches `min_count` and whose full
    /// count is positive (no leave-one-out, as the record).
    pub fn lookup(&self, tokens: &[u16], p: usize) -> PhraseMatch {
        self.lookup_as_if(tokens, p, tokens[p])
    }

    /// [`Self::lookup`] with `target` in place of the token at p.
    pub fn lookup_as_if(&self, tokens: &[u16], p: usize, target: u16) -> PhraseMatch {
        self.lookup_hashed(target, |k| {
            let length = self.config.lengths[k];
            (p >= length).then(|| context_hash(tokens, p, length, &PHRASE_PRIMES))
        })
    }

    /// [`Self::lookup`] with the unmasked context hash of the `k`-th configured length
    /// supplied by `context_of(k)` (None where the position has no context that long).
    #[inline]
    fn lookup_hashed(&self, target: u16, context_of: impl Fn(usize) -> Option<u32>) -> PhraseMatch {
        for (k, &length) in self.config.lengths.iter().enumerate() {
            let Some(h) = context_of(k) else {
                continue;
            };
            let context = self.ctx[(h & self.mask) as usize];
            let full =
                self.full[(full_hash(h, target, length, &PHRASE_PRIMES) & self.mask) as usize];
            if context >= self.config.min_count && full > 0 {
                return PhraseMatch {
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

    /// Lookups for `positions`, in parallel, in position order; equal to [`Self::lookup`]
    /// at each position (tested), but hashed in bulk and prefetched.
    pub fn lookup_range(
        &self,
        tokens: &[u16],
        positions: std::ops::Range<usize>,
    ) -> Vec<PhraseMatch> {
        lookups_in_blocks(positions, |start, out| {
            self.lookup_block(tokens, start, out)
        })
    }

    /// The n-gram lookups' scheme (see `NgramTables::lookup_block`): hash the block at
    /// every length, then probe with the next positions' buckets already on their way.
    fn lookup_block(&self, tokens: &[u16], start: usize, out: &mut [PhraseMatch]) {
        let lengths = &self.config.lengths;
        let len = out.len();
        let mut hashes = vec![0u32; lengths.len() * len];
        context_hashes_of_widths(tokens, start, len, lengths, &PHRASE_PRIMES, &mut hashes);
        let hash = |k: usize, i: usize| hashes[k * len + i];
        let prefetch_position = |i: usize, count: usize| {
            let p = start + i;
            for (k, &length) in lengths.iter().enumerate().take(count) {
                if p < length {
                    continue;
                }
                let h = hash(k, i);
                prefetch(&self.ctx, (h & self.mask) as usize);
                let full_key = full_hash(h, tokens[p], length, &PHRASE_PRIMES) & self.mask;
                prefetch(&self.full, full_key as usize);
            }
        };
        for i in 0..len.min(PREFETCH_DISTANCE) {
            prefetch_position(i, lengths.len());
        }
        let mut probed = lengths.len();
        for (i, slot) in out.iter_mut().enumerate() {
            if i + PREFETCH_DISTANCE < len {
                prefetch_position(i + PREFETCH_DISTANCE, probed + 1);
            }
            let p = start + i;
            let found = self.lookup_hashed(tokens[p], |k| (p >= lengths[k]).then(|| hash(k, i)));
            probed = if found.matched() {
                lengths
                    .iter()
                    .position(|&l| l == found.length as usize)
                    .map_or(lengths.len(), |k| k + 1)
            } else {
                lengths.len()
            };
            *slot = found;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::LOOKUP_BLOCK;

    #[test]
    fn block_lookups_equal_single_lookups() {
        // A stream that repeats with variations, small tables (collisions), and ranges
        // that start inside the first contexts and cross block edges.
        let base: Vec<u16> = (0..300u32).map(|i| ((i * 7919) % 1024) as u16).collect();
        let tokens: Vec<u16> = (0..3 * LOOKUP_BLOCK + 123)
            .map(|i| {
                if i % 97 == 0 {
                    5
                } else {
                    base[(i * 3 / 2) % base.len()]
                }
            })
            .collect();
        let config = PhraseConfig {
            buckets: 1 << 10,
            ..PhraseConfig::default()
        }
        .validated()
        .unwrap();
        let tables = PhraseTables::build(&tokens, &config);
        for range in [0..tokens.len(), 40..LOOKUP_BLOCK + 77, 100..100] {
            let bulk = tables.lookup_range(&tokens, range.clone());
            let single: Vec<PhraseMatch> = range.map(|p| tables.lookup(&tokens, p)).collect();
            assert_eq!(bulk, single);
        }
    }

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
        let tables = PhraseTables::build(&tokens, &PhraseConfig::default().validated().unwrap());
        let matches = tables.lookup_all(&tokens);
        let unmatched: Vec<usize> = (0..tokens.len())
            .filter(|&p| !matches[p].matched())
            .collect();
        assert_eq!(unmatched, (0..16).collect::<Vec<_>>());
    }
}
