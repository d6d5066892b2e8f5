//! Causal mode (`spec/honest-modes.md`): every position is looked up in tables holding
//! only the positions before it, then added. No leave-one-out is needed: a position's own
//! occurrence is never in the table when it is scored. Lookup rules, q and the blend are
//! otherwise the reference's.
//!
//! "Score, then update" over a stream is one sequential pass per table, but the count a
//! position sees is simply the number of earlier positions with the same key, so each
//! n-gram order is an independent pass and orders run in parallel. The phrase cache shares
//! one table pair among its lengths, so it is one pass that, at each position, first reads
//! every length and then inserts every length.

use rayon::prelude::*;

use crate::hash::{
    context_hashes, full_hash, prefetch, zeroed_table, NGRAM_PRIMES, PHRASE_PRIMES,
    PREFETCH_DISTANCE,
};
use crate::ngram::{NgramConfig, NgramMatch};
use crate::phrase::{PhraseConfig, PhraseMatch};
use crate::ConfigError;

const BLOCK: usize = 1 << 20;

/// What one order's pass needs, kept across the orders a thread runs: fresh 64 MB tables
/// and a 0.5 GB result per order cost more in page faults (zeroing every new page) than
/// clearing the same memory again.
#[derive(Default)]
struct OrderPass {
    ctx: Vec<u32>,
    full: Vec<u32>,
    /// Per position: (context count before p, full count before p).
    counts: Vec<(u32, u32)>,
}

impl OrderPass {
    fn run(&mut self, tokens: &[u16], width: usize, buckets: usize) {
        let mask = (buckets - 1) as u32;
        for table in [&mut self.ctx, &mut self.full] {
            if table.len() == buckets {
                table.fill(0);
            } else {
                *table = zeroed_table(buckets);
            }
        }
        let (ctx, full, out) = (&mut self.ctx, &mut self.full, &mut self.counts);
        out.resize(tokens.len(), (0, 0));
        out[..width.min(tokens.len())].fill((0, 0));
        if tokens.len() <= width {
            return;
        }
        let target_prime = NGRAM_PRIMES[width % NGRAM_PRIMES.len()];
        let mut hashes = vec![0u32; BLOCK];
        let mut start = width;
        while start < tokens.len() {
            let end = (start + BLOCK).min(tokens.len());
            context_hashes(
                &tokens[start - width..end],
                width,
                &NGRAM_PRIMES,
                &mut hashes,
            );
            let keys = |i: usize| {
                let h = hashes[i];
                let target = (tokens[start + i] as u32).wrapping_mul(target_prime);
                ((h & mask) as usize, ((h ^ target) & mask) as usize)
            };
            let n = end - start;
            for i in 0..n {
                // Every bucket is a cache miss (two 64 MB tables): ask for the ones
                // PREFETCH_DISTANCE positions ahead while this one is counted.
                if i + PREFETCH_DISTANCE < n {
                    let (c, f) = keys(i + PREFETCH_DISTANCE);
                    prefetch(ctx, c);
                    prefetch(full, f);
                }
                let (ctx_key, full_key) = keys(i);
                out[start + i] = (ctx[ctx_key], full[full_key]);
                ctx[ctx_key] += 1;
                full[full_key] += 1;
            }
            start = end;
        }
    }
}

/// Causal n-gram lookups for every position: the highest order whose earlier context
/// count reaches `min_count` and whose earlier full count is positive.
pub fn ngram_lookups(tokens: &[u16], config: &NgramConfig) -> Result<Vec<NgramMatch>, ConfigError> {
    config.validate()?;
    let mut result = vec![NgramMatch::default(); tokens.len()];
    // Orders in parallel, one per core at a time; each pass's counts are merged highest
    // order first, so the outcome does not depend on scheduling.
    let orders: Vec<usize> = (config.min_order..=config.max_order).rev().collect();
    let threads = rayon::current_num_threads().max(1);
    let mut passes: Vec<OrderPass> = (0..threads).map(|_| OrderPass::default()).collect();
    for group in orders.chunks(threads) {
        group
            .par_iter()
            .zip(passes.par_iter_mut())
            .for_each(|(&order, pass)| pass.run(tokens, order - 1, config.buckets));
        for (&order, pass) in group.iter().zip(&passes) {
            result.par_iter_mut().zip(pass.counts.par_iter()).for_each(
                |(slot, &(context, full))| {
                    if slot.matched() || context < config.min_count || full == 0 {
                        return;
                    }
                    *slot = NgramMatch {
                        order: order as u8,
                        context,
                        full,
                    };
                },
            );
        }
    }
    Ok(result)
}

/// Causal phrase lookups: one pass over the stream; at each position every length is read
/// (longest first, first hit wins), then every length is inserted.
///
/// The pass is sequential (every length shares one table pair), but its keys are pure
/// functions of the tokens: each block's hashes are computed first, length by length with
/// the vectorised [`context_hashes`], and the walk prefetches the buckets of the position
/// [`PREFETCH_DISTANCE`] ahead, so it waits on memory less and multiplies nothing.
pub fn phrase_lookups(
    tokens: &[u16],
    config: &PhraseConfig,
) -> Result<Vec<PhraseMatch>, ConfigError> {
    config.validate()?;
    let mask = (config.buckets - 1) as u32;
    let mut ctx = zeroed_table(config.buckets);
    let mut full = zeroed_table(config.buckets);
    let mut result = vec![PhraseMatch::default(); tokens.len()];
    let lengths = &config.lengths;
    // Per length, the block's masked (context, full) keys; `None` before the length fits.
    let mut hashes = vec![vec![0u32; PHRASE_BLOCK]; lengths.len()];
    let mut block_keys = vec![vec![None; PHRASE_BLOCK]; lengths.len()];
    let mut start = 0;
    while start < tokens.len() {
        let end = (start + PHRASE_BLOCK).min(tokens.len());
        for (li, &length) in lengths.iter().enumerate() {
            let first = start.max(length);
            let keys = &mut block_keys[li];
            keys[..first.min(end) - start].fill(None);
            if first >= end {
                continue;
            }
            let out = &mut hashes[li][first - start..end - start];
            context_hashes(&tokens[first - length..end], length, &PHRASE_PRIMES, out);
            for (p, &h) in (first..end).zip(out.iter()) {
                let full_key = full_hash(h, tokens[p], length, &PHRASE_PRIMES) & mask;
                keys[p - start] = Some(((h & mask) as usize, full_key as usize));
            }
        }
        for p in start..end {
            if let Some(ahead) = (p + PREFETCH_DISTANCE < end).then_some(p + PREFETCH_DISTANCE) {
                for keys in &block_keys {
                    if let Some((c, f)) = keys[ahead - start] {
                        prefetch(&ctx, c);
                        prefetch(&full, f);
                    }
                }
            }
            for (li, keys) in block_keys.iter().enumerate() {
                let Some((ctx_key, full_key)) = keys[p - start] else {
                    continue;
                };
                let (context, full_count) = (ctx[ctx_key], full[full_key]);
                if context >= config.min_count && full_count > 0 {
                    result[p] = PhraseMatch {
                        length: lengths[li] as u16,
                        context,
                        full: full_count,
                    };
                    break;
                }
            }
            for keys in &block_keys {
                if let Some((ctx_key, full_key)) = keys[p - start] {
                    ctx[ctx_key] += 1;
                    full[full_key] += 1;
                }
            }
        }
        start = end;
    }
    Ok(result)
}

/// Positions per block of the causal phrase pass: its hashes (4 bytes per length) and
/// keys stay in cache.
const PHRASE_BLOCK: usize = 1 << 14;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::context_hash;

    fn stream(n: usize, seed: u32) -> Vec<u16> {
        let mut state = seed;
        let base: Vec<u16> = (0..300)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                ((state >> 16) % 64) as u16
            })
            .collect();
        (0..n).map(|i| base[(i * 13 / 7) % base.len()]).collect()
    }

    fn small() -> (NgramConfig, PhraseConfig) {
        (
            NgramConfig {
                buckets: 1 << 12,
                ..NgramConfig::default()
            },
            PhraseConfig {
                buckets: 1 << 11,
                ..PhraseConfig::default()
            },
        )
    }

    /// The defining property: what position p sees depends on tokens ..=p only.
    #[test]
    fn lookups_never_see_the_future() {
        let (ng, ph) = small();
        let tokens = stream(4000, 7);
        let cut = 2500;
        let mut changed = tokens.clone();
        for t in &mut changed[cut..] {
            *t = (*t + 17) % 64;
        }
        let (a, b) = (
            ngram_lookups(&tokens, &ng).unwrap(),
            ngram_lookups(&changed, &ng).unwrap(),
        );
        assert_eq!(a[..cut], b[..cut]);
        assert_ne!(a[cut..], b[cut..]);
        let (a, b) = (
            phrase_lookups(&tokens, &ph).unwrap(),
            phrase_lookups(&changed, &ph).unwrap(),
        );
        assert_eq!(a[..cut], b[..cut]);
    }

    /// Against a direct count of earlier occurrences, position by position.
    #[test]
    fn counts_are_the_number_of_earlier_occurrences() {
        let (ng, _) = small();
        let tokens = stream(1500, 3);
        let mask = (ng.buckets - 1) as u32;
        let result = ngram_lookups(&tokens, &ng).unwrap();
        for p in (0..tokens.len()).step_by(37) {
            let m = result[p];
            if !m.matched() {
                continue;
            }
            let width = m.order as usize - 1;
            let key = |q: usize| context_hash(&tokens, q, width, &NGRAM_PRIMES);
            let fkey = |q: usize| full_hash(key(q), tokens[q], width, &NGRAM_PRIMES) & mask;
            let context = (width..p)
                .filter(|&q| key(q) & mask == key(p) & mask)
                .count() as u32;
            let full = (width..p).filter(|&q| fkey(q) == fkey(p)).count() as u32;
            assert_eq!((m.context, m.full), (context, full), "p {p}");
        }
    }

    /// The blocked, prefetching pass against the definition written out directly: at
    /// each position hash every length, read longest first, then insert every length.
    #[test]
    fn phrase_pass_equals_the_direct_definition() {
        let (_, ph) = small();
        let tokens = stream(40_000, 5); // several blocks
        let mask = (ph.buckets - 1) as u32;
        let (mut ctx, mut full) = (vec![0u32; ph.buckets], vec![0u32; ph.buckets]);
        let mut expected = vec![PhraseMatch::default(); tokens.len()];
        for p in 0..tokens.len() {
            let keys: Vec<(usize, usize, usize)> = ph
                .lengths
                .iter()
                .filter(|&&l| p >= l)
                .map(|&l| {
                    let h = context_hash(&tokens, p, l, &PHRASE_PRIMES);
                    let f = full_hash(h, tokens[p], l, &PHRASE_PRIMES);
                    (l, (h & mask) as usize, (f & mask) as usize)
                })
                .collect();
            if let Some(&(l, c, f)) = keys
                .iter()
                .find(|&&(_, c, f)| ctx[c] >= ph.min_count && full[f] > 0)
            {
                expected[p] = PhraseMatch {
                    length: l as u16,
                    context: ctx[c],
                    full: full[f],
                };
            }
            for &(_, c, f) in &keys {
                ctx[c] += 1;
                full[f] += 1;
            }
        }
        let got = phrase_lookups(&tokens, &ph).unwrap();
        assert!(got.iter().filter(|m| m.matched()).count() > 1000);
        assert_eq!(got, expected);
    }

    #[test]
    fn same_result_with_one_and_two_threads() {
        let (ng, _) = small();
        let tokens = stream(20_000, 11);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let two = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let a = one.install(|| ngram_lookups(&tokens, &ng).unwrap());
        let b = two.install(|| ngram_lookups(&tokens, &ng).unwrap());
        assert_eq!(a, b);
    }
}
