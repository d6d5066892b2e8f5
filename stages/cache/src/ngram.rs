//! Hashed n-gram count tables and the record's lookup (algorithm.md §5, §5.1).
//!
//! The record keeps two u32 tables per order, `ctx_n` and `full_n`. Since
//! `full_key(n, p) == ctx_key(n+1, p+1)`, `full_n` equals `ctx_{n+1}` plus one increment
//! at the full key of the last position, so we keep the context tables and only the
//! highest order's full table: 16 tables instead of 30, with identical lookups.

use rayon::prelude::*;

use crate::hash::{
    context_hash, context_hashes_of_widths, count_keys, full_hash, lookups_in_blocks, prefetch,
    NGRAM_PRIMES, PREFETCH_DISTANCE,
};
use crate::Valid;

#[derive(Debug, Clone, PartialEq)]
pub struct NgramConfig {
    pub min_order: usize,
    pub max_order: usize,
    pub buckets: usize,
    /// Minimum leave-one-out context count for an order to be used.
    pub min_count: u32,
}

impl Default for NgramConfig {
    fn default() -> Self {
        NgramConfig {
            min_order: 2,
            max_order: 16,
            buckets: 1 << 24,
            min_count: 1,
        }
    }
}

/// The n-gram result for one position: `order == 0` means no match.
///
/// The cache's probability is not stored: it is a function of the two counts
/// ([`NgramMatch::q`]), and the fields are packed without padding: a match is 9 bytes,
/// and 62M of them 0.56 GB (the causal modes hold every position's at once).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[repr(C, packed)]
pub struct NgramMatch {
    pub order: u8,
    /// Leave-one-out context and full counts at the matched order (0 when unmatched).
    pub context: u32,
    pub full: u32,
}

impl NgramMatch {
    pub fn matched(&self) -> bool {
        self.order != 0
    }

    /// The cache's probability of the target, `full / context` (§5.1).
    #[inline]
    pub fn q(&self) -> f64 {
        cache_q(self.context, self.full)
    }
}

/// `min(full, context) / max(context, 1)` clipped to [0, 1]: the record's q for both
/// caches, in every mode.
#[inline]
pub fn cache_q(context: u32, full: u32) -> f64 {
    (full.min(context) as f64 / context.max(1) as f64).clamp(0.0, 1.0)
}

pub struct NgramTables {
    config: NgramConfig,
    mask: u32,
    /// `ctx[n − min_order]` for n in min_order..=max_order.
    ctx: Vec<Vec<u32>>,
    /// `full_{max_order}`.
    full_top: Vec<u32>,
    /// For n < max_order: the key where `full_n` exceeds `ctx_{n+1}` by one (the full key
    /// of the last position), if the stream is long enough to have one.
    tail_key: Vec<Option<u32>>,
}

impl NgramTables {
    /// Counts every position of `tokens` (the whole stream, position 0 included).
    pub fn build(tokens: &[u16], config: &Valid<NgramConfig>) -> NgramTables {
        let mask = (config.buckets - 1) as u32;
        let top = config.max_order;
        // One job per context table plus one for the top full table; rayon spreads them
        // over the cores and each table is only ever touched by its own job.
        let jobs: Vec<(usize, bool)> = (config.min_order..=top)
            .map(|n| (n, false))
            .chain(std::iter::once((top, true)))
            .collect();
        let mut tables: Vec<Vec<u32>> = jobs
            .par_iter()
            .map_init(Vec::new, |runs, &(order, full)| {
                count_keys(tokens, order - 1, &NGRAM_PRIMES, full, config.buckets, runs)
            })
            .collect();
        let full_top = tables.pop().expect("the full job is last");
        let last = tokens.len().saturating_sub(1);
        let tail_key = (config.min_order..=top)
            .map(|n| {
                let width = n - 1;
                (n < top && last >= width).then(|| {
                    let h = context_hash(tokens, last, width, &NGRAM_PRIMES);
                    full_hash(h, tokens[last], width, &NGRAM_PRIMES) & mask
                })
            })
            .collect();
        NgramTables {
            config: (**config).clone(),
            mask,
            ctx: tables,
            full_top,
            tail_key,
        }
    }

    pub fn config(&self) -> &NgramConfig {
        &self.config
    }

    pub fn ctx_table(&self, order: usize) -> &[u32] {
        &self.ctx[order - self.config.min_order]
    }

    #[inline]
    fn full_count(&self, order: usize, key: u32) -> u32 {
        if order == self.config.max_order {
            self.full_top[key as usize]
        } else {
            let extra = (self.tail_key[order - self.config.min_order] == Some(key)) as u32;
            self.ctx[order + 1 - self.config.min_order][key as usize] + extra
        }
    }

    /// `full_n` as the record stores it (for checks against the record's tables).
    pub fn full_table(&self, order: usize) -> Vec<u32> {
        if order == self.config.max_order {
            return self.full_top.clone();
        }
        let mut table = self.ctx[order + 1 - self.config.min_order].clone();
        if let Some(key) = self.tail_key[order - self.config.min_order] {
            table[key as usize] += 1;
        }
        table
    }

    /// §5.1: the highest order whose leave-one-out context count reaches `min_count` and
    /// whose leave-one-out target count is positive.
    pub fn lookup(&self, tokens: &[u16], p: usize) -> NgramMatch {
        self.lookup_as_if(tokens, p, tokens[p])
    }

    /// [`Self::lookup`] with `target` in place of the token at p: what the record's rule
    /// gives candidate `target` (for the implied-mass audit).
    pub fn lookup_as_if(&self, tokens: &[u16], p: usize, target: u16) -> NgramMatch {
        self.lookup_hashed(target, |order| {
            let width = order - 1;
            (p >= width).then(|| context_hash(tokens, p, width, &NGRAM_PRIMES))
        })
    }

    /// [`Self::lookup`] with the unmasked context hash of each order supplied by
    /// `context_of(order)` (None where the position has no context that long).
    #[inline]
    fn lookup_hashed(&self, target: u16, context_of: impl Fn(usize) -> Option<u32>) -> NgramMatch {
        let min_count = self.config.min_count;
        for order in (self.config.min_order..=self.config.max_order).rev() {
            let Some(h) = context_of(order) else {
                continue;
            };
            let width = order - 1;
            let context = self.ctx_table(order)[(h & self.mask) as usize];
            let context_loo = context.saturating_sub(1);
            if context_loo < min_count {
                continue;
            }
            let full = self.full_count(
                order,
                full_hash(h, target, width, &NGRAM_PRIMES) & self.mask,
            );
            let full_loo = full.saturating_sub(1);
            if full_loo == 0 {
                continue;
            }
            return NgramMatch {
                order: order as u8,
                context: context_loo,
                full: full_loo,
            };
        }
        NgramMatch::default()
    }

    /// Lookups for every position of the stream, in parallel.
    pub fn lookup_all(&self, tokens: &[u16]) -> Vec<NgramMatch> {
        self.lookup_range(tokens, 0..tokens.len())
    }

    /// Lookups for `positions`, in parallel, in position order; equal to [`Self::lookup`]
    /// at each position (tested), but hashed in bulk and prefetched.
    pub fn lookup_range(
        &self,
        tokens: &[u16],
        positions: std::ops::Range<usize>,
    ) -> Vec<NgramMatch> {
        lookups_in_blocks(positions, |start, out| {
            self.lookup_block(tokens, start, out)
        })
    }

    fn lookup_block(&self, tokens: &[u16], start: usize, out: &mut [NgramMatch]) {
        let (min_order, max_order) = (self.config.min_order, self.config.max_order);
        let len = out.len();
        // hashes[(order − min_order) · len + i]: the context hash of position start + i.
        let widths: Vec<usize> = (min_order - 1..max_order).collect();
        let mut hashes = vec![0u32; widths.len() * len];
        context_hashes_of_widths(tokens, start, len, &widths, &NGRAM_PRIMES, &mut hashes);
        let hash = |order: usize, i: usize| hashes[(order - min_order) * len + i];
        // Which orders a lookup will probe is known only once it runs (it stops at its
        // match), but neighbouring positions tend to match at similar orders: prefetch
        // the orders the latest lookup probed, and one more.
        let prefetch_position = |i: usize, orders: usize| {
            let p = start + i;
            for order in (min_order..=max_order).rev().take(orders) {
                let width = order - 1;
                if p < width {
                    continue;
                }
                let h = hash(order, i);
                prefetch(self.ctx_table(order), (h & self.mask) as usize);
                let full_key = (full_hash(h, tokens[p], width, &NGRAM_PRIMES) & self.mask) as usize;
                if order == max_order {
                    prefetch(&self.full_top, full_key);
                } else {
                    prefetch(self.ctx_table(order + 1), full_key);
                }
            }
        };
        let all_orders = max_order - min_order + 1;
        for i in 0..len.min(PREFETCH_DISTANCE) {
            prefetch_position(i, all_orders);
        }
        let mut probed = all_orders;
        for (i, slot) in out.iter_mut().enumerate() {
            if i + PREFETCH_DISTANCE < len {
                prefetch_position(i + PREFETCH_DISTANCE, probed + 1);
            }
            let p = start + i;
            let found =
                self.lookup_hashed(tokens[p], |order| (p >= order - 1).then(|| hash(order, i)));
            probed = if found.matched() {
                max_order - found.order as usize + 1
            } else {
                all_orders
            };
            *slot = found;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::LOOKUP_BLOCK;

    fn stream(n: usize) -> Vec<u16> {
        let base: Vec<u16> = (0..97u32).map(|i| ((i * 37 + 11) % 50) as u16).collect();
        (0..n).map(|i| base[(i * 7 / 5) % base.len()]).collect()
    }

    #[test]
    fn derived_full_tables_equal_directly_counted_ones() {
        let tokens = stream(3000);
        let config = NgramConfig {
            buckets: 1 << 10,
            ..NgramConfig::default()
        }
        .validated()
        .unwrap();
        let tables = NgramTables::build(&tokens, &config);
        for order in 2..=16 {
            let direct = count_keys(
                &tokens,
                order - 1,
                &NGRAM_PRIMES,
                true,
                1 << 10,
                &mut Vec::new(),
            );
            assert_eq!(tables.full_table(order), direct, "order {order}");
        }
    }

    #[test]
    fn block_lookups_equal_single_lookups() {
        // Small tables so that collisions, matches and misses all occur; ranges that
        // start inside the first contexts and cross block edges.
        let tokens = stream(3 * LOOKUP_BLOCK + 123);
        let config = NgramConfig {
            buckets: 1 << 12,
            ..NgramConfig::default()
        }
        .validated()
        .unwrap();
        let tables = NgramTables::build(&tokens, &config);
        for range in [0..tokens.len(), 5..LOOKUP_BLOCK + 77, 100..100] {
            let bulk = tables.lookup_range(&tokens, range.clone());
            let single: Vec<NgramMatch> = range.map(|p| tables.lookup(&tokens, p)).collect();
            assert_eq!(bulk, single);
        }
        assert!(tables.lookup_all(&tokens).iter().any(|m| m.matched()));
    }

    #[test]
    fn leave_one_out_never_matches_a_unique_context() {
        let tokens: Vec<u16> = (0..200).collect();
        let tables = NgramTables::build(&tokens, &NgramConfig::default().validated().unwrap());
        assert!(tables.lookup_all(&tokens).iter().all(|m| !m.matched()));
    }

    #[test]
    fn bad_configs_are_refused() {
        let bad = NgramConfig {
            buckets: 1000,
            ..NgramConfig::default()
        };
        assert!(matches!(
            bad.validated(),
            Err(crate::ConfigError::NotPowerOfTwo { .. })
        ));
        let bad = NgramConfig {
            max_order: 24,
            ..NgramConfig::default()
        };
        assert!(matches!(
            bad.validated(),
            Err(crate::ConfigError::Orders { .. })
        ));
    }
}
