//! The record's hashes (algorithm.md §5 and §6).
//!
//! A context of width c ending just before position p hashes to the XOR of
//! `tok[p−c+k] · prime[k]` over k = 0..c−1, counting k from the *oldest* token. The "full"
//! key folds in the target with the next prime. Only the low 24 (n-gram) or 23 (phrase)
//! bits are ever used, and the low bits of a product and of an XOR depend only on the low
//! bits of the operands, so wrapping u32 arithmetic gives exactly the keys the reference
//! computes in u64, for any vocabulary size.

/// The n-gram primes; order n uses `NGRAM_PRIMES[0..n]` (index `k mod 16`).
pub const NGRAM_PRIMES: [u32; 16] = [
    36313, 27191, 51647, 81929, 131071, 196613, 262147, 393241, 524309, 655373, 786433, 917521,
    1048583, 1179653, 1310729, 1441801,
];

/// The phrase primes: the n-gram primes followed by 32 more (index `k mod 48`).
pub const PHRASE_PRIMES: [u32; 48] = [
    36313, 27191, 51647, 81929, 131071, 196613, 262147, 393241, 524309, 655373, 786433, 917521,
    1048583, 1179653, 1310729, 1441801, 1572871, 1703939, 1835017, 1966093, 2097169, 2228243,
    2359321, 2490377, 2621447, 2752523, 2883593, 3014657, 3145739, 3276811, 3407879, 3538961,
    3670037, 3801131, 3932203, 4063267, 4194319, 4325381, 4456441, 4587503, 4718579, 4849651,
    4980719, 5111789, 5242877, 5373953, 5505023, 5636089,
];

/// The unmasked context hash of the `width` tokens before `p` (requires `p ≥ width`).
#[inline]
pub fn context_hash(tokens: &[u16], p: usize, width: usize, primes: &[u32]) -> u32 {
    let window = &tokens[p - width..p];
    let mut h = 0u32;
    for (k, &t) in window.iter().enumerate() {
        h ^= (t as u32).wrapping_mul(primes[k % primes.len()]);
    }
    h
}

/// The unmasked full hash: the context hash with the target folded in.
#[inline]
pub fn full_hash(context: u32, target: u16, width: usize, primes: &[u32]) -> u32 {
    context ^ (target as u32).wrapping_mul(primes[width % primes.len()])
}

/// Context hashes of width `width` for every position `p` in `width..tokens.len()`,
/// written to `out[p − width]`. Organised prime by prime so the inner loop vectorises.
///
/// The build targets baseline x86-64 (SSE2), which has no 32-bit lane multiply; on a CPU
/// with AVX2 (checked once at run time, then a cached flag) the same loop is compiled
/// with `vpmulld`, eight lanes at a time. Both compute the same wrapping products.
pub fn context_hashes(tokens: &[u16], width: usize, primes: &[u32], out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { context_hashes_avx2(tokens, width, primes, out) };
        return;
    }
    context_hashes_portable(tokens, width, primes, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn context_hashes_avx2(tokens: &[u16], width: usize, primes: &[u32], out: &mut [u32]) {
    context_hashes_portable(tokens, width, primes, out)
}

#[inline(always)]
fn context_hashes_portable(tokens: &[u16], width: usize, primes: &[u32], out: &mut [u32]) {
    let count = tokens.len().saturating_sub(width);
    let out = &mut out[..count];
    out.fill(0);
    for k in 0..width {
        let prime = primes[k % primes.len()];
        // Position p = width + i reads tok[p − width + k] = tok[i + k].
        for (h, &t) in out.iter_mut().zip(&tokens[k..k + count]) {
            *h ^= (t as u32).wrapping_mul(prime);
        }
    }
}

/// Hints the CPU to start loading `table[index]` into cache. Lookups are bound by memory
/// latency (each probe is a random read from a 64 MB table); issuing the probes of a
/// position a few positions ahead lets those misses overlap instead of queueing.
#[inline(always)]
pub fn prefetch(table: &[u32], index: usize) {
    #[cfg(target_arch = "x86_64")]
    if let Some(slot) = table.get(index) {
        // SAFETY: prefetching is a hint with no architectural effect; the pointer is
        // in bounds anyway.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                (slot as *const u32).cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (table, index);
}

/// Positions looked up per block: each block hashes all its positions at every order
/// first (vectorised), then probes the tables with prefetching.
pub const LOOKUP_BLOCK: usize = 4096;

/// How many positions ahead the lookups prefetch.
pub const PREFETCH_DISTANCE: usize = 16;

/// Lookups for `positions` in parallel, one [`LOOKUP_BLOCK`] at a time:
/// `lookup_block(first_position, out)` fills one block's results.
///
/// The result is written once: each block fills a small buffer that stays in cache and is
/// then copied to its place, so the (62M-entry) result is never first filled with
/// defaults by one thread, and its pages are first touched by the threads doing lookups.
pub fn lookups_in_blocks<T: Copy + Default + Send>(
    positions: std::ops::Range<usize>,
    lookup_block: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    let count = positions.len();
    let mut out: Vec<T> = Vec::with_capacity(count);
    out.spare_capacity_mut()[..count]
        .par_chunks_mut(LOOKUP_BLOCK)
        .enumerate()
        .for_each_init(
            || vec![T::default(); LOOKUP_BLOCK],
            |buffer, (block, slots)| {
                let buffer = &mut buffer[..slots.len()];
                lookup_block(positions.start + block * LOOKUP_BLOCK, buffer);
                for (slot, &value) in slots.iter_mut().zip(buffer.iter()) {
                    slot.write(value);
                }
            },
        );
    // SAFETY: the chunks cover `out[..count]` exactly and every slot was written above.
    unsafe { out.set_len(count) };
    out
}

/// Context hashes of each width in `widths` for the positions `start..start + len`, row
/// by row in the order of `widths`: `out[k · len + i]` is the hash of the `widths[k]`
/// tokens before `start + i`. Entries for positions below their width (which have no such
/// context) hold unspecified values.
///
/// One pass per width up to the widest, rather than w passes for each width w: the
/// context of width w + 1 at p is the context of width w at p − 1 with the token at p − 1
/// folded in under prime w, so each width is the one below it shifted by one position.
/// The n-gram lookups' 15 widths cost 15 passes instead of 120, the phrase lookups'
/// lengths 64/48/32/16 cost 64 instead of 160.
pub fn context_hashes_of_widths(
    tokens: &[u16],
    start: usize,
    len: usize,
    widths: &[usize],
    primes: &[u32],
    out: &mut [u32],
) {
    let widest = widths.iter().copied().max().unwrap_or(0);
    assert!(out.len() >= widths.len() * len && start + len <= tokens.len());
    if len == 0 || widest == 0 {
        return;
    }
    // Width 1 at every position from `widest − 1` before the block on: each width up
    // needs one position further left.
    let from = start.saturating_sub(widest - 1);
    let span = start + len - from;
    let folded = |w: usize, p: usize| (tokens[p - 1] as u32).wrapping_mul(primes[w % primes.len()]);
    let mut current: Vec<u32> = (from..start + len)
        .map(|p| if p >= 1 { folded(0, p) } else { 0 })
        .collect();
    let mut next = vec![0u32; span];
    for width in 1..=widest {
        for (k, _) in widths.iter().enumerate().filter(|&(_, &w)| w == width) {
            out[k * len..(k + 1) * len].copy_from_slice(&current[start - from..]);
        }
        if width == widest {
            break;
        }
        let prime = primes[width % primes.len()];
        next[0] = 0;
        for (i, (h, &t)) in next[1..]
            .iter_mut()
            .zip(&tokens[from..start + len - 1])
            .enumerate()
        {
            *h = current[i] ^ (t as u32).wrapping_mul(prime);
        }
        std::mem::swap(&mut current, &mut next);
    }
}

/// Positions hashed per block when counting: a block's keys (64 KB) stay in L2 between
/// hashing them and scattering them.
pub const KEY_BLOCK: usize = 1 << 14;

/// A count table of `buckets` entries: for every position p ≥ width, +1 at the masked
/// context hash of the `width` tokens before p or, with `full`, at the full hash (the
/// target folded in). This is the record's `np.bincount` per table, counted by
/// partitions ([`crate::partition`]): the keys are hashed twice rather than kept.
/// `runs` is the partitions' scratch space, reused from call to call.
pub fn count_keys(
    tokens: &[u16],
    width: usize,
    primes: &[u32],
    full: bool,
    buckets: usize,
    runs: &mut Vec<u16>,
) -> Vec<u32> {
    let mask = (buckets - 1) as u32;
    if tokens.len() <= width {
        return crate::zeroed::zeroed_table(buckets);
    }
    // The full key folds in the target under the next prime; a context key folds in 0.
    let target_prime = if full {
        primes[width % primes.len()]
    } else {
        0
    };
    crate::partition::count_table(buckets, runs, |emit| {
        let mut hashes = vec![0u32; KEY_BLOCK];
        let mut start = width;
        while start < tokens.len() {
            let end = (start + KEY_BLOCK).min(tokens.len());
            let keys = &mut hashes[..end - start];
            context_hashes(&tokens[start - width..end], width, primes, keys);
            for (h, &t) in keys.iter_mut().zip(&tokens[start..end]) {
                *h = (*h ^ (t as u32).wrapping_mul(target_prime)) & mask;
            }
            emit(keys);
            start = end;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK24: u32 = (1 << 24) - 1;
    const MASK23: u32 = (1 << 23) - 1;

    /// algorithm.md Appendix B.
    #[test]
    fn ngram_keys_match_the_spec_test_vectors() {
        let tokens = [1u16, 260, 300, 1023, 4, 260, 300, 1023, 17];
        let expect = [
            (2, 3_593_767, 3_636_987),
            (3, 936_837, 879_993),
            (4, 13_261_393, 13_589_109),
        ];
        for (order, ctx_key, full_key) in expect {
            let width = order - 1;
            let h = context_hash(&tokens, 4, width, &NGRAM_PRIMES);
            assert_eq!(h & MASK24, ctx_key, "order {order}");
            assert_eq!(
                full_hash(h, tokens[4], width, &NGRAM_PRIMES) & MASK24,
                full_key,
                "order {order}"
            );
        }
        let h = context_hash(&tokens, 8, 1, &NGRAM_PRIMES);
        assert_eq!(h & MASK24, 3_593_767);
        assert_eq!(
            full_hash(h, tokens[8], 1, &NGRAM_PRIMES) & MASK24,
            3_267_456
        );
    }

    #[test]
    fn phrase_keys_match_the_spec_test_vectors() {
        let tokens: Vec<u16> = (0..70).map(|i| 100 + i).collect();
        for (length, ctx_key, full_key) in [(16, 3_787_778, 2_738_312), (64, 6_971_236, 8_018_926)]
        {
            let h = context_hash(&tokens, 66, length, &PHRASE_PRIMES);
            assert_eq!(h & MASK23, ctx_key, "L {length}");
            assert_eq!(
                full_hash(h, tokens[66], length, &PHRASE_PRIMES) & MASK23,
                full_key,
                "L {length}"
            );
        }
    }

    /// Every width from the one below it, against the direct hash of each width.
    #[test]
    fn hashes_of_many_widths_equal_the_direct_hashes() {
        let tokens: Vec<u16> = (0..3000u32)
            .map(|i| ((i * 7919 + i / 7) % 1024) as u16)
            .collect();
        let ngram: Vec<usize> = (1..=15).collect();
        let phrase = [64, 48, 32, 16];
        for (widths, primes) in [
            (&ngram[..], &NGRAM_PRIMES[..]),
            (&phrase[..], &PHRASE_PRIMES[..]),
        ] {
            // Blocks at the very start (positions below the widths), inside, and at the end.
            for (start, len) in [(0, 100), (3, 70), (40, 1), (1000, 1500), (2900, 100)] {
                let mut out = vec![0u32; widths.len() * len];
                context_hashes_of_widths(&tokens, start, len, widths, primes, &mut out);
                for (k, &width) in widths.iter().enumerate() {
                    for i in (0..len).filter(|&i| start + i >= width) {
                        let expected = context_hash(&tokens, start + i, width, primes);
                        assert_eq!(out[k * len + i], expected, "width {width} p {}", start + i);
                    }
                }
            }
        }
    }

    /// The AVX2 build of the bulk hash (taken on this CPU if it has AVX2) and the baseline
    /// one compute the same keys.
    #[test]
    fn dispatched_bulk_hashes_equal_the_portable_ones() {
        let tokens: Vec<u16> = (0..10_000u32).map(|i| ((i * 7919) % 1024) as u16).collect();
        for width in [1, 7, 15, 16, 48, 64] {
            let count = tokens.len() - width;
            let (mut fast, mut portable) = (vec![0; count], vec![0; count]);
            context_hashes(&tokens, width, &PHRASE_PRIMES, &mut fast);
            context_hashes_portable(&tokens, width, &PHRASE_PRIMES, &mut portable);
            assert_eq!(fast, portable, "width {width}");
        }
    }

    #[test]
    fn bulk_hashes_equal_single_hashes() {
        let tokens: Vec<u16> = (0..500u32).map(|i| ((i * 7919) % 1024) as u16).collect();
        for width in [1, 5, 15, 16, 48, 64] {
            let mut out = vec![0; tokens.len()];
            context_hashes(&tokens, width, &PHRASE_PRIMES, &mut out);
            for p in width..tokens.len() {
                assert_eq!(
                    out[p - width],
                    context_hash(&tokens, p, width, &PHRASE_PRIMES)
                );
            }
        }
    }
}
