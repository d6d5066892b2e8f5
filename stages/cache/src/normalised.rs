//! Causal-normalised mode (`spec/honest-modes.md`): the cache as a proper next-token
//! distribution.
//!
//! At position p only the positions before it count (causal), and the order (or phrase
//! length) is chosen by the context alone: the highest order whose context occurred at
//! least `min_count` times before p. The cache's distribution is then the exact
//! next-token histogram of that context, q(v) = count(context, v) / count(context), which
//! sums to 1 over the vocabulary; the blend weights depend on the entropy and the order,
//! never on the target, so the blended distribution sums to 1 too.
//!
//! # Exact counts without hashing collisions
//! The reference's count tables are 2^24 buckets shared by every context that hashes
//! there; merged contexts are what makes its ratios exceed 1. Here a window of tokens is
//! identified by two independent polynomial fingerprints modulo the Mersenne prime
//! 2^61 − 1: the first (61 bits) is the key, and 12 bits of the second must agree too (10
//! pick the partition the key is counted in, 2 ride in the key's spare top bits). Two
//! different windows of w tokens merge only if both agree, with probability
//! ≤ w / 2^61 · 2^−12 per pair: over 62M windows, about 10^−5 expected false merges per
//! window length. (Even then the mass stays ≤ 1: see [`window_counts`].)
//!
//! # Counting earlier occurrences in parallel
//! For a window length w, `count_before[e]` is the number of windows ending before e (as
//! an exclusive end) equal to the one ending at e. That is the window's rank among its
//! equal keys in position order, which needs no sequential pass over one big table:
//! windows are scattered, in position order, into 1,024 partitions by their second
//! fingerprint, and each partition is counted with a small hash table that stays in cache.
//! The full count needs no table of its own: the context of width w at p followed by its
//! target is the window of width w + 1 ending at p + 1.

use rayon::prelude::*;

use crate::ngram::{NgramConfig, NgramMatch};
use crate::phrase::{PhraseConfig, PhraseMatch};
use crate::ConfigError;

const MERSENNE_61: u64 = (1 << 61) - 1;
/// The fingerprints' bases: fixed, so the counts (and every artifact) are reproducible.
pub(crate) const BASE_KEY: u64 = 0x0A3B_1C5D_7E9F_2468 % MERSENNE_61;
const BASE_PARTITION: u64 = 0x1F2E_3D4C_5B6A_7988 % MERSENNE_61;
/// Bits of the second fingerprint that two equal windows share: the partition's and
/// the ones folded into the key.
const CHECK_BITS: u32 = 12;
/// 1,024 partitions of about 60,000 windows at 62M: few enough write streams for the
/// scatter, small enough for each partition's counter (2 MB) to stay in cache.
const PARTITION_BITS: u32 = 10;

#[inline(always)]
fn mul_mod(a: u64, b: u64) -> u64 {
    let product = a as u128 * b as u128;
    let folded = (product as u64 & MERSENNE_61) + (product >> 61) as u64;
    let folded = (folded & MERSENNE_61) + (folded >> 61);
    if folded >= MERSENNE_61 {
        folded - MERSENNE_61
    } else {
        folded
    }
}

#[inline(always)]
fn add_mod(a: u64, b: u64) -> u64 {
    let sum = a + b;
    if sum >= MERSENNE_61 {
        sum - MERSENNE_61
    } else {
        sum
    }
}

fn pow_mod(base: u64, exponent: usize) -> u64 {
    (0..exponent).fold(1, |acc, _| mul_mod(acc, base))
}

/// A rolling polynomial fingerprint of the last `width` tokens (token + 1, so that
/// token 0 is not the zero polynomial).
pub(crate) struct Rolling {
    base: u64,
    /// base^(width − 1): the weight of the token leaving the window.
    top: u64,
    pub(crate) value: u64,
}

impl Rolling {
    pub(crate) fn new(window: &[u16], base: u64) -> Rolling {
        let value = window
            .iter()
            .fold(0, |h, &t| add_mod(mul_mod(h, base), t as u64 + 1));
        Rolling {
            base,
            top: pow_mod(base, window.len().saturating_sub(1)),
            value,
        }
    }

    /// Slide by one token: `leaving` drops out at the old end, `entering` comes in.
    #[inline(always)]
    pub(crate) fn slide(&mut self, leaving: u16, entering: u16) {
        let without = add_mod(
            self.value,
            MERSENNE_61 - mul_mod(leaving as u64 + 1, self.top),
        );
        self.value = add_mod(mul_mod(without, self.base), entering as u64 + 1);
    }
}

/// For every exclusive end e in 0..=len, how many windows of `width` tokens ending before
/// e equal the one ending at e (0 where e < width: there is no such window).
///
/// Sequential within one width (the widths run in parallel). The partitions are filled in
/// position order, so each partition's counting pass sees its windows in stream order:
/// the count a window gets is the number of equal windows before it.
pub fn window_counts(tokens: &[u16], width: usize) -> Vec<u32> {
    window_counts_with(tokens, width, &mut Scratch::default())
}

/// The per-window buffers of [`window_counts`], kept between the widths a thread counts:
/// fresh ones would fault in 0.6 GB of new pages per width at 62M tokens.
#[derive(Default)]
struct Scratch {
    /// Each window's check bits, whose low bits name its partition.
    partition_of: Vec<u16>,
    scattered: Vec<u64>,
}

fn window_counts_with(tokens: &[u16], width: usize, scratch: &mut Scratch) -> Vec<u32> {
    let ends = tokens.len() + 1;
    let mut counts = crate::hash::zeroed_table(ends);
    if width == 0 || tokens.len() < width {
        return counts;
    }
    let partitions = 1usize << PARTITION_BITS;
    let first_end = width;
    let windows = ends - first_end;

    // Pass 1: each window's partition, and the partitions' sizes.
    let partition_of = &mut scratch.partition_of;
    partition_of.resize(windows, 0);
    let mut sizes = vec![0usize; partitions];
    let mut rolling = Rolling::new(&tokens[..width], BASE_PARTITION);
    for (i, slot) in partition_of.iter_mut().enumerate() {
        let e = first_end + i;
        if i > 0 {
            rolling.slide(tokens[e - 1 - width], tokens[e - 1]);
        }
        let check = (rolling.value & ((1 << CHECK_BITS) - 1)) as u16;
        *slot = check;
        sizes[check as usize & (partitions - 1)] += 1;
    }

    // Pass 2: scatter the keys into their partitions, in position order.
    let mut starts = Vec::with_capacity(partitions + 1);
    starts.push(0usize);
    for size in &sizes {
        starts.push(starts.last().unwrap() + size);
    }
    let mut cursor = starts[..partitions].to_vec();
    let scattered = &mut scratch.scattered;
    scattered.resize(windows, 0);
    let mut rolling = Rolling::new(&tokens[..width], BASE_KEY);
    for (i, &check) in partition_of.iter().enumerate() {
        let e = first_end + i;
        if i > 0 {
            rolling.slide(tokens[e - 1 - width], tokens[e - 1]);
        }
        let slot = &mut cursor[check as usize & (partitions - 1)];
        // The check bits the partition does not hold, above the key's 61 bits.
        scattered[*slot] = rolling.value | (check as u64 >> PARTITION_BITS) << 61;
        *slot += 1;
    }

    // Pass 3: within each partition, replace every key by the number of equal keys before
    // it. Keys are uniform already, so their low bits index an open-addressed table.
    let largest = sizes.iter().copied().max().unwrap_or(0);
    let mut table = KeyCounter::with_room_for(largest);
    for range in starts.windows(2) {
        table.clear();
        for slot in &mut scattered[range[0]..range[1]] {
            *slot = table.count_and_add(*slot) as u64;
        }
    }

    // Pass 4: back to position order, walking the partitions' cursors again.
    let mut cursor = starts[..partitions].to_vec();
    for (i, &check) in partition_of.iter().enumerate() {
        let slot = &mut cursor[check as usize & (partitions - 1)];
        counts[first_end + i] = scattered[*slot] as u32;
        *slot += 1;
    }
    counts
}

/// Occurrence counts of 63-bit keys (a fingerprint and two check bits), cleared in O(1)
/// between partitions by a generation stamp.
struct KeyCounter {
    /// (key, count, generation)
    slots: Vec<(u64, u32, u32)>,
    mask: usize,
    generation: u32,
}

impl KeyCounter {
    fn with_room_for(keys: usize) -> KeyCounter {
        let size = (2 * keys).next_power_of_two().max(16);
        KeyCounter {
            slots: vec![(0, 0, 0); size],
            mask: size - 1,
            generation: 0,
        }
    }

    fn clear(&mut self) {
        self.generation += 1;
    }

    /// How many times `key` was added before, then add it once more.
    #[inline]
    fn count_and_add(&mut self, key: u64) -> u32 {
        let mut i = (key as usize) & self.mask;
        loop {
            let slot = &mut self.slots[i];
            if slot.2 != self.generation {
                *slot = (key, 1, self.generation);
                return 0;
            }
            if slot.0 == key {
                slot.1 += 1;
                return slot.1 - 1;
            }
            i = (i + 1) & self.mask;
        }
    }
}

/// Window counts for every width in `widths`, computed in parallel, in `widths`' order.
fn counts_for(tokens: &[u16], widths: &[usize]) -> Vec<Vec<u32>> {
    widths
        .par_iter()
        .map_init(Scratch::default, |scratch, &w| {
            window_counts_with(tokens, w, scratch)
        })
        .collect()
}

/// Causal-normalised n-gram lookups for every position: the highest order whose context
/// occurred at least `min_count` times before p, with that context's count and how many of
/// those occurrences were followed by p's token (`full`, possibly 0). `config.buckets` is
/// not used: the counts are exact.
pub fn ngram_lookups(tokens: &[u16], config: &NgramConfig) -> Result<Vec<NgramMatch>, ConfigError> {
    config.validate()?;
    let mut result = vec![NgramMatch::default(); tokens.len()];
    // Orders ascending, so a higher order that qualifies overwrites a lower one. Widths are
    // counted a few at a time (each count array is 4 bytes per token).
    let widths: Vec<usize> = (config.min_order - 1..=config.max_order).collect();
    let mut previous: Option<(usize, Vec<u32>)> = None;
    for group in widths.chunks(rayon::current_num_threads().max(1)) {
        for (width, counts) in group.iter().copied().zip(counts_for(tokens, group)) {
            if let Some((context_width, context_counts)) = previous.take() {
                let order = context_width + 1;
                result.par_iter_mut().enumerate().for_each(|(p, slot)| {
                    let context = context_counts[p];
                    if context >= config.min_count && p >= context_width {
                        *slot = NgramMatch {
                            order: order as u8,
                            context,
                            // The context and its target: the window one longer, ending
                            // one later.
                            full: counts[p + 1],
                        };
                    }
                });
            }
            previous = Some((width, counts));
        }
    }
    Ok(result)
}

/// Causal-normalised phrase lookups: the longest length whose context occurred at least
/// `min_count` times before p (`config.buckets` is not used).
pub fn phrase_lookups(
    tokens: &[u16],
    config: &PhraseConfig,
) -> Result<Vec<PhraseMatch>, ConfigError> {
    config.validate()?;
    let mut result = vec![PhraseMatch::default(); tokens.len()];
    // Shortest first, so a longer length that qualifies overwrites a shorter one.
    for &length in config.lengths.iter().rev() {
        let mut pair = counts_for(tokens, &[length, length + 1]);
        let (context_counts, full_counts) = (pair.remove(0), pair.remove(0));
        result.par_iter_mut().enumerate().for_each(|(p, slot)| {
            let context = context_counts[p];
            if context >= config.min_count && p >= length {
                *slot = PhraseMatch {
                    length: length as u16,
                    context,
                    full: full_counts[p + 1],
                };
            }
        });
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text-like: a short base text repeated with drift, over a small alphabet, so that
    /// contexts of every length recur and targets after a context vary.
    fn stream(n: usize, seed: u32) -> Vec<u16> {
        let mut state = seed;
        let mut next = move || {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            state >> 16
        };
        let base: Vec<u16> = (0..400).map(|_| (next() % 12) as u16).collect();
        (0..n)
            .map(|i| {
                if next() % 9 == 0 {
                    (next() % 12) as u16
                } else {
                    base[(i * 5 / 3) % base.len()]
                }
            })
            .collect()
    }

    fn earlier_equal_windows(tokens: &[u16], width: usize, end: usize) -> u32 {
        (width..end)
            .filter(|&e| tokens[e - width..e] == tokens[end - width..end])
            .count() as u32
    }

    #[test]
    fn window_counts_are_exact_counts_of_earlier_equal_windows() {
        let tokens = stream(3000, 5);
        for width in [1, 2, 3, 7, 16, 17, 65] {
            let counts = window_counts(&tokens, width);
            assert_eq!(counts.len(), tokens.len() + 1);
            for end in (0..=tokens.len()).step_by(7) {
                let expected = if end < width {
                    0
                } else {
                    earlier_equal_windows(&tokens, width, end)
                };
                assert_eq!(counts[end], expected, "width {width} end {end}");
            }
        }
    }

    /// The defining properties, against brute force: the highest order whose context was
    /// seen `min_count` times before (whatever the target), and q(v) over the vocabulary
    /// is the context's next-token histogram, so it sums to exactly 1.
    #[test]
    fn ngram_choice_ignores_the_target_and_its_distribution_sums_to_one() {
        let tokens = stream(2500, 9);
        let config = NgramConfig {
            min_count: 2,
            ..NgramConfig::default()
        };
        let result = ngram_lookups(&tokens, &config).unwrap();
        for p in (0..tokens.len()).step_by(11) {
            let m = result[p];
            let expected_order = (config.min_order..=config.max_order)
                .rev()
                .find(|&n| p > n - 1 && earlier_equal_windows(&tokens, n - 1, p) >= 2);
            assert_eq!(
                (m.matched()).then_some(m.order as usize),
                expected_order,
                "p {p}"
            );
            if !m.matched() {
                continue;
            }
            let width = m.order as usize - 1;
            let context = &tokens[p - width..p];
            let mut next_tokens = [0u32; 12];
            for e in width..p {
                if &tokens[e - width..e] == context {
                    next_tokens[tokens[e] as usize] += 1;
                }
            }
            assert_eq!(m.context, next_tokens.iter().sum::<u32>(), "p {p}");
            assert_eq!(m.full, next_tokens[tokens[p] as usize], "p {p}");
            let mass: f64 = next_tokens
                .iter()
                .map(|&c| crate::ngram::cache_q(m.context, c))
                .sum();
            assert!((mass - 1.0).abs() < 1e-12, "p {p}: {mass}");
        }
    }

    #[test]
    fn phrase_choice_is_the_longest_seen_context() {
        let tokens = stream(3000, 2);
        let config = PhraseConfig {
            lengths: vec![40, 24, 8],
            ..PhraseConfig::default()
        };
        let result = phrase_lookups(&tokens, &config).unwrap();
        for p in (0..tokens.len()).step_by(13) {
            let m = result[p];
            let expected = config
                .lengths
                .iter()
                .copied()
                .find(|&l| p >= l && earlier_equal_windows(&tokens, l, p) >= 1);
            assert_eq!(m.matched().then_some(m.length as usize), expected, "p {p}");
            if let Some(l) = expected {
                assert_eq!(m.context, earlier_equal_windows(&tokens, l, p));
                assert_eq!(m.full, earlier_equal_windows(&tokens, l + 1, p + 1));
            }
        }
    }

    #[test]
    fn lookups_never_see_the_future_and_do_not_depend_on_threads() {
        let tokens = stream(6000, 4);
        let cut = 4000;
        let mut changed = tokens.clone();
        for t in &mut changed[cut..] {
            *t = (*t + 5) % 12;
        }
        let config = NgramConfig::default();
        let (a, b) = (
            ngram_lookups(&tokens, &config).unwrap(),
            ngram_lookups(&changed, &config).unwrap(),
        );
        assert_eq!(a[..cut], b[..cut]);
        assert_ne!(a[cut..], b[cut..]);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        assert_eq!(one.install(|| ngram_lookups(&tokens, &config).unwrap()), a);
        let phrase = PhraseConfig::default();
        assert_eq!(
            one.install(|| phrase_lookups(&tokens, &phrase).unwrap()),
            phrase_lookups(&tokens, &phrase).unwrap()
        );
    }
}
