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
    context_hash, context_hashes, full_hash, zeroed_table, NGRAM_PRIMES, PHRASE_PRIMES,
};
use crate::ngram::{NgramConfig, NgramMatch};
use crate::phrase::{PhraseConfig, PhraseMatch};
use crate::ConfigError;

const BLOCK: usize = 1 << 20;

/// Per position of one order: (context count before p, full count before p).
fn counts_before(tokens: &[u16], width: usize, buckets: usize) -> Vec<(u32, u32)> {
    let mask = (buckets - 1) as u32;
    let mut ctx = zeroed_table(buckets);
    let mut full = zeroed_table(buckets);
    let mut out = vec![(0u32, 0u32); tokens.len()];
    if tokens.len() <= width {
        return out;
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
        for (i, &h) in hashes[..end - start].iter().enumerate() {
            let p = start + i;
            let ctx_key = (h & mask) as usize;
            let full_key = ((h ^ (tokens[p] as u32).wrapping_mul(target_prime)) & mask) as usize;
            out[p] = (ctx[ctx_key], full[full_key]);
            ctx[ctx_key] += 1;
            full[full_key] += 1;
        }
        start = end;
    }
    out
}

/// Causal n-gram lookups for every position: the highest order whose earlier context
/// count reaches `min_count` and whose earlier full count is positive.
pub fn ngram_lookups(tokens: &[u16], config: &NgramConfig) -> Result<Vec<NgramMatch>, ConfigError> {
    config.validate()?;
    let mut result = vec![NgramMatch::default(); tokens.len()];
    // Orders in parallel, two at a time at most in flight per core; each pass's counts
    // are merged highest order first, so the outcome does not depend on scheduling.
    let orders: Vec<usize> = (config.min_order..=config.max_order).rev().collect();
    for group in orders.chunks(rayon::current_num_threads().max(1)) {
        let counts: Vec<(usize, Vec<(u32, u32)>)> = group
            .par_iter()
            .map(|&order| (order, counts_before(tokens, order - 1, config.buckets)))
            .collect();
        for (order, counts) in counts {
            result
                .par_iter_mut()
                .zip(counts.par_iter())
                .for_each(|(slot, &(context, full))| {
                    if slot.matched() || context < config.min_count || full == 0 {
                        return;
                    }
                    *slot = NgramMatch {
                        order: order as u8,
                        context,
                        full,
                    };
                });
        }
    }
    Ok(result)
}

/// Causal phrase lookups: one pass over the stream; at each position every length is read
/// (longest first, first hit wins), then every length is inserted.
pub fn phrase_lookups(
    tokens: &[u16],
    config: &PhraseConfig,
) -> Result<Vec<PhraseMatch>, ConfigError> {
    config.validate()?;
    let mask = (config.buckets - 1) as u32;
    let mut ctx = zeroed_table(config.buckets);
    let mut full = zeroed_table(config.buckets);
    let mut result = vec![PhraseMatch::default(); tokens.len()];
    let mut keys = Vec::with_capacity(config.lengths.len());
    for p in 0..tokens.len() {
        keys.clear();
        for &length in &config.lengths {
            if p < length {
                continue;
            }
            let h = context_hash(tokens, p, length, &PHRASE_PRIMES);
            keys.push((
                length,
                (h & mask) as usize,
                (full_hash(h, tokens[p], length, &PHRASE_PRIMES) & mask) as usize,
            ));
        }
        for &(length, ctx_key, full_key) in &keys {
            let (context, full_count) = (ctx[ctx_key], full[full_key]);
            if context >= config.min_count && full_count > 0 {
                result[p] = PhraseMatch {
                    length: length as u16,
                    context,
                    full: full_count,
                };
                break;
            }
        }
        for &(_, ctx_key, full_key) in &keys {
            ctx[ctx_key] += 1;
            full[full_key] += 1;
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

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
