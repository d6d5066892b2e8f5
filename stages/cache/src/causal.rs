//! Causal mode (`docs/honest-modes.md`): every position is looked up in tables holding
//! only the positions before it, then added. No leave-one-out is needed: a position's own
//! occurrence is never in the table when it is scored. Lookup rules, q and the blend are
//! otherwise the reference's.
//!
//! "Score, then update" over a stream is one sequential pass per table, but the count a
//! position sees is simply the number of earlier positions with the same key, so each
//! n-gram table is an independent pass and tables run in parallel. The phrase cache shares
//! one table pair among its lengths, so it is one pass that, at each position, first reads
//! every length and then inserts every length.
//!
//! The n-gram cache needs no full tables. The full key of order n at position p hashes the
//! n − 1 tokens before p and the token at p: exactly the context key of order n + 1 at
//! p + 1 (the reference's tables rest on the same identity, [`crate::ngram`]). So the
//! number of q < p with p's full key is the number of q' = q + 1 < p + 1 with the
//! context key of p + 1: order n + 1's causal context count one position later. One
//! context pass per width, 1 to `max_order` (the widest standing in for the top order's
//! full table), gives every count: half the random memory traffic of a pair per order.

use rayon::prelude::*;

use crate::hash::{
    context_hash, context_hashes, context_hashes_of_widths, full_hash, prefetch, KEY_BLOCK,
    NGRAM_PRIMES, PHRASE_PRIMES, PREFETCH_DISTANCE,
};
use crate::ngram::{NgramConfig, NgramMatch};
use crate::partition::rank_among_equal_keys;
use crate::phrase::{PhraseConfig, PhraseMatch};
use crate::zeroed::zeroed_table;
use crate::Valid;

/// One width's causal context counts into `counts`, for every p in 0..=len: how many q in
/// width..p have p's context key (the `width` tokens before it), the key's rank among the
/// equal keys before it ([`rank_among_equal_keys`], with `runs` its scratch); 0 where
/// p < width. `counts[len]` is the count of the key no position has, the stream's last
/// `width` tokens, which the full count of the last position needs. Both buffers are
/// kept across the passes a thread runs: a fresh quarter-gigabyte per pass costs more in
/// page faults than reusing the pages.
fn context_counts(
    tokens: &[u16],
    width: usize,
    buckets: usize,
    counts: &mut Vec<u32>,
    runs: &mut Vec<u32>,
) {
    let mask = (buckets - 1) as u32;
    if counts.len() != tokens.len() + 1 {
        // Huge pages: a quarter of a gigabyte in 4 KB pages faults in slowly.
        *counts = zeroed_table(tokens.len() + 1);
    }
    counts[..width.min(tokens.len() + 1)].fill(0);
    if tokens.len() < width {
        return;
    }
    // Each position's key in its own slot, then every key replaced by its rank.
    let mut start = width;
    while start < tokens.len() {
        let end = (start + KEY_BLOCK).min(tokens.len());
        let keys = &mut counts[start..end];
        context_hashes(&tokens[start - width..end], width, &NGRAM_PRIMES, keys);
        keys.iter_mut().for_each(|h| *h &= mask);
        start = end;
    }
    counts[tokens.len()] = context_hash(tokens, tokens.len(), width, &NGRAM_PRIMES) & mask;
    rank_among_equal_keys(&mut counts[width..], buckets, runs);
}

/// Causal n-gram lookups for every position: the highest order whose earlier context
/// count reaches `min_count` and whose earlier full count is positive.
pub fn ngram_lookups(tokens: &[u16], config: &Valid<NgramConfig>) -> Vec<NgramMatch> {
    let mut result = vec![NgramMatch::default(); tokens.len()];
    // Widths top down, one per core at a time. Order n = width + 1 takes its context
    // counts from its own width's pass and its full counts from the pass one wider,
    // shifted by a position, so each group keeps the pass above it (`above`). Orders are
    // merged highest first, so the outcome does not depend on scheduling.
    let widths: Vec<usize> = (config.min_order - 1..=config.max_order).rev().collect();
    let threads = rayon::current_num_threads().max(1);
    // Each thread's counts and ranking scratch; the counts of the round before are kept
    // in `above`, without scratch of their own.
    let mut counts: Vec<Vec<u32>> = vec![Vec::new(); threads];
    let mut scratch: Vec<Vec<u32>> = vec![Vec::new(); threads];
    let mut above = Vec::new();
    for (round, group) in widths.chunks(threads).enumerate() {
        group
            .par_iter()
            .zip(counts.par_iter_mut().zip(scratch.par_iter_mut()))
            .for_each(|(&width, (out, runs))| {
                context_counts(tokens, width, config.buckets, out, runs)
            });
        for (i, &width) in group.iter().enumerate() {
            let wider = match (round, i) {
                // The widest pass only supplies the top order's full counts.
                (0, 0) => continue,
                (_, 0) => &above,
                _ => &counts[i - 1],
            };
            let order = (width + 1) as u8;
            let (contexts, fulls) = (&counts[i], &wider[1..]);
            result
                .par_iter_mut()
                .zip(contexts.par_iter().zip(fulls.par_iter()))
                .for_each(|(slot, (&context, &full))| {
                    if slot.matched() || context < config.min_count || full == 0 {
                        return;
                    }
                    *slot = NgramMatch {
                        order,
                        context,
                        full,
                    };
                });
        }
        std::mem::swap(&mut above, &mut counts[group.len() - 1]);
    }
    result
}

/// Causal phrase lookups: one pass over the stream; at each position every length is read
/// (longest first, first hit wins), then every length is inserted.
///
/// Every length shares one table pair, so the pass is sequential in position, but the
/// context table and the full table never meet until a position's counts are compared:
/// the two tables are walked side by side, one per core, a block of positions at a time,
/// and each block's counts are then merged. A walk hashes its block at every length at
/// once ([`context_hashes_of_widths`]) and prefetches the buckets of the position
/// [`PREFETCH_DISTANCE`] ahead.
pub fn phrase_lookups(tokens: &[u16], config: &Valid<PhraseConfig>) -> Vec<PhraseMatch> {
    let mut result = vec![PhraseMatch::default(); tokens.len()];
    let lengths = &config.lengths;
    let mut context = PhraseTableWalk::new(config, false);
    let mut full = PhraseTableWalk::new(config, true);
    let mut start = 0;
    while start < tokens.len() {
        let end = (start + PHRASE_BLOCK).min(tokens.len());
        let n = end - start;
        rayon::join(
            || context.walk(tokens, start, n, lengths),
            || full.walk(tokens, start, n, lengths),
        );
        for (i, slot) in result[start..end].iter_mut().enumerate() {
            let p = start + i;
            for (li, &length) in lengths.iter().enumerate() {
                if p < length {
                    continue;
                }
                let (context, full) = (context.counts[li * n + i], full.counts[li * n + i]);
                if context >= config.min_count && full > 0 {
                    *slot = PhraseMatch {
                        length: length as u16,
                        context,
                        full,
                    };
                    break;
                }
            }
        }
        start = end;
    }
    result
}

/// One of the phrase cache's two tables, walked causally a block at a time.
struct PhraseTableWalk {
    table: Vec<u32>,
    mask: u32,
    /// The full table's keys fold in the target.
    full: bool,
    /// The block's keys, then (`counts`) what each key had before its position: row per
    /// length, `[li · n + i]` for position start + i; unspecified where p < length.
    keys: Vec<u32>,
    counts: Vec<u32>,
}

impl PhraseTableWalk {
    fn new(config: &PhraseConfig, full: bool) -> PhraseTableWalk {
        let cells = config.lengths.len() * PHRASE_BLOCK;
        PhraseTableWalk {
            table: zeroed_table(config.buckets),
            mask: (config.buckets - 1) as u32,
            full,
            keys: vec![0; cells],
            counts: vec![0; cells],
        }
    }

    /// Reads, then adds, every length's key at each position of start..start + n.
    fn walk(&mut self, tokens: &[u16], start: usize, n: usize, lengths: &[usize]) {
        let (table, keys, counts, mask) =
            (&mut self.table, &mut self.keys, &mut self.counts, self.mask);
        context_hashes_of_widths(tokens, start, n, lengths, &PHRASE_PRIMES, keys);
        for (li, &length) in lengths.iter().enumerate() {
            let row = &mut keys[li * n..(li + 1) * n];
            for (i, key) in row.iter_mut().enumerate() {
                let h = if self.full {
                    full_hash(*key, tokens[start + i], length, &PHRASE_PRIMES)
                } else {
                    *key
                };
                *key = h & mask;
            }
        }
        // Lengths that fit at every position of the block (all but the stream's start).
        let fits = |i: usize, length: usize| start + i >= length;
        for i in 0..n {
            if i + PREFETCH_DISTANCE < n {
                let ahead = i + PREFETCH_DISTANCE;
                for (li, &length) in lengths.iter().enumerate() {
                    if fits(ahead, length) {
                        prefetch(table, keys[li * n + ahead] as usize);
                    }
                }
            }
            for (li, &length) in lengths.iter().enumerate() {
                if fits(i, length) {
                    counts[li * n + i] = table[keys[li * n + i] as usize];
                }
            }
            for (li, &length) in lengths.iter().enumerate() {
                if fits(i, length) {
                    table[keys[li * n + i] as usize] += 1;
                }
            }
        }
    }
}

/// Positions per block of the causal phrase pass: its keys and counts (8 bytes per length
/// and position) stay in cache.
const PHRASE_BLOCK: usize = 1 << 14;

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

    fn small() -> (Valid<NgramConfig>, Valid<PhraseConfig>) {
        let ngram = NgramConfig {
            buckets: 1 << 12,
            ..NgramConfig::default()
        };
        let phrase = PhraseConfig {
            buckets: 1 << 11,
            ..PhraseConfig::default()
        };
        (ngram.validated().unwrap(), phrase.validated().unwrap())
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
        let (a, b) = (ngram_lookups(&tokens, &ng), ngram_lookups(&changed, &ng));
        assert_eq!(a[..cut], b[..cut]);
        assert_ne!(a[cut..], b[cut..]);
        let (a, b) = (phrase_lookups(&tokens, &ph), phrase_lookups(&changed, &ph));
        assert_eq!(a[..cut], b[..cut]);
    }

    /// Against a direct count of earlier occurrences, position by position.
    #[test]
    fn counts_are_the_number_of_earlier_occurrences() {
        let (ng, _) = small();
        let tokens = stream(1500, 3);
        let mask = (ng.buckets - 1) as u32;
        let result = ngram_lookups(&tokens, &ng);
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

    /// The n-gram rule written out directly: a context and a full table per order, each
    /// position read top order first, then added to every order.
    fn direct_ngram_lookups(tokens: &[u16], ng: &NgramConfig) -> Vec<NgramMatch> {
        let mask = (ng.buckets - 1) as u32;
        let mut ctx = vec![vec![0u32; ng.buckets]; ng.max_order + 1];
        let mut full = ctx.clone();
        let mut expected = vec![NgramMatch::default(); tokens.len()];
        for p in 0..tokens.len() {
            let keys: Vec<(usize, usize, usize)> = (ng.min_order..=ng.max_order)
                .rev()
                .filter(|&n| p >= n - 1)
                .map(|n| {
                    let h = context_hash(tokens, p, n - 1, &NGRAM_PRIMES);
                    let f = full_hash(h, tokens[p], n - 1, &NGRAM_PRIMES);
                    (n, (h & mask) as usize, (f & mask) as usize)
                })
                .collect();
            if let Some(&(n, c, f)) = keys
                .iter()
                .find(|&&(n, c, f)| ctx[n][c] >= ng.min_count && full[n][f] > 0)
            {
                expected[p] = NgramMatch {
                    order: n as u8,
                    context: ctx[n][c],
                    full: full[n][f],
                };
            }
            for &(n, c, f) in &keys {
                ctx[n][c] += 1;
                full[n][f] += 1;
            }
        }
        expected
    }

    /// The one-pass-per-width counts (full counts borrowed from the next order's context
    /// counts) against the direct rule, on every position: the last one's full counts
    /// come from the key past the end of the stream.
    #[test]
    fn ngram_pass_equals_the_direct_definition() {
        for (min_order, max_order, min_count) in [(2, 16, 1), (2, 16, 3), (4, 9, 1)] {
            let ng = NgramConfig {
                min_order,
                max_order,
                buckets: 1 << 10, // small enough for keys of different orders to collide
                min_count,
            }
            .validated()
            .unwrap();
            let tokens = stream(3000, 9);
            let got = ngram_lookups(&tokens, &ng);
            assert!(got.iter().filter(|m| m.matched()).count() > 2000);
            assert!(got.last().unwrap().matched());
            assert_eq!(got, direct_ngram_lookups(&tokens, &ng), "{ng:?}");
        }
        // Streams no longer than the widest context.
        for len in [0, 1, 2, 3, 15, 16, 17, 18] {
            let tokens: Vec<u16> = (0..len).map(|i| (i % 2) as u16).collect();
            let ng = NgramConfig {
                buckets: 1 << 10,
                ..NgramConfig::default()
            }
            .validated()
            .unwrap();
            assert_eq!(
                ngram_lookups(&tokens, &ng),
                direct_ngram_lookups(&tokens, &ng)
            );
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
        let got = phrase_lookups(&tokens, &ph);
        assert!(got.iter().filter(|m| m.matched()).count() > 1000);
        assert_eq!(got, expected);
    }

    #[test]
    fn same_result_with_one_and_two_threads() {
        let (ng, ph) = small();
        let tokens = stream(40_000, 11);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let two = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let a = one.install(|| ngram_lookups(&tokens, &ng));
        let b = two.install(|| ngram_lookups(&tokens, &ng));
        assert_eq!(a, b);
        let a = one.install(|| phrase_lookups(&tokens, &ph));
        let b = two.install(|| phrase_lookups(&tokens, &ph));
        assert_eq!(a, b);
    }
}
