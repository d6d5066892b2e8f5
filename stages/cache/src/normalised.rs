//! Causal-normalised mode (`docs/honest-modes.md`): the cache as a proper next-token
//! distribution.
//!
//! At position p only the positions before it count (causal), and the order (or phrase
//! length) is chosen by the context alone: the highest order whose context occurred at
//! least `min_count` times before p. The cache's distribution is then the exact
//! next-token histogram of that context, q(v) = count(context, v) / count(context), which
//! sums to 1 over the vocabulary; the blend weights depend on the entropy and the order,
//! never on the target, so the blended distribution sums to 1 too.
//!
//! # Exact counts
//! The reference's count tables are 2^24 buckets shared by every context that hashes
//! there; merged contexts are what makes its ratios exceed 1. Here equal windows are
//! found exactly, by class ids built one width from the last (see [`crate::classes`]):
//! for each width, each end gets the number of equal windows ending before it. The
//! context count at p of width w is that number for the window ending at p, and the full
//! count needs no table of its own: the context followed by its target is the window of
//! width w + 1 ending at p + 1.
//!
//! Both caches come from one walk over the widths. The n-gram's widths (1 to the highest
//! order) are built a token at a time; a phrase length beyond them is reached in jumps
//! of that many tokens, its class being the pair of two shorter windows' classes.

use std::collections::BTreeSet;

use rayon::prelude::*;

use crate::classes::{Prefix, Ranks, Stepper, Windows};
use crate::ngram::{NgramConfig, NgramMatch};
use crate::phrase::{PhraseConfig, PhraseMatch};
use crate::Valid;

/// Causal-normalised n-gram lookups for every position: the highest order whose context
/// occurred at least `min_count` times before p, with that context's count and how many of
/// those occurrences were followed by p's token (`full`, possibly 0). `config.buckets` is
/// not used: the counts are exact.
pub fn ngram_lookups(tokens: &[u16], config: &Valid<NgramConfig>) -> Vec<NgramMatch> {
    lookups(tokens, Some(config), None).0
}

/// Causal-normalised phrase lookups: the longest length whose context occurred at least
/// `min_count` times before p (`config.buckets` is not used).
pub fn phrase_lookups(tokens: &[u16], config: &Valid<PhraseConfig>) -> Vec<PhraseMatch> {
    lookups(tokens, None, Some(config)).1
}

/// Both caches' lookups from one walk over the widths (an empty vector for a cache not
/// asked for): the phrase lengths build on the n-gram's widths instead of counting
/// them again.
pub fn lookups(
    tokens: &[u16],
    ngram: Option<&Valid<NgramConfig>>,
    phrase: Option<&Valid<PhraseConfig>>,
) -> (Vec<NgramMatch>, Vec<PhraseMatch>) {
    let mut needed = BTreeSet::new();
    let mut chained = BTreeSet::new();
    if let Some(config) = ngram {
        needed.extend(config.min_order - 1..=config.max_order);
    }
    if let Some(config) = phrase {
        for &length in &config.lengths {
            needed.extend([length, length + 1]);
            chained.insert(length);
        }
    }
    // The width whose classes longer windows are built from, a token at a time up to it.
    let step = match (ngram, phrase) {
        (Some(config), _) => config.max_order,
        (None, Some(config)) => *config.lengths.iter().min().expect("validated"),
        (None, None) => return (Vec::new(), Vec::new()),
    };
    chained.extend(1..=step);

    let mut ngram_result = ngram.map(|_| vec![NgramMatch::default(); tokens.len()]);
    let mut phrase_result: Option<Vec<PhraseMatch>> = None;
    walk_widths(tokens, step, &chained, &needed, |ranks| {
        let ranks = &ranks;
        if let (Some(config), Some(result)) = (ngram, ngram_result.as_mut()) {
            let orders = config.min_order..=config.max_order;
            fold(result, ranks, config.min_count, |context_width| {
                Some(context_width + 1).filter(|order| orders.contains(order))
            });
        }
        if let Some(config) = phrase {
            let length_of = |w: usize| Some(w).filter(|w| config.lengths.contains(w));
            if length_of(ranks.width)
                .or(length_of(ranks.width - 1))
                .is_some()
            {
                // Allocated when first needed: the n-gram's early widths, the walk's
                // largest, run without it.
                let result =
                    phrase_result.get_or_insert_with(|| vec![PhraseMatch::default(); tokens.len()]);
                fold(result, ranks, config.min_count, length_of);
            }
        }
    });
    let phrase_result =
        phrase.map(|_| phrase_result.unwrap_or_else(|| vec![PhraseMatch::default(); tokens.len()]));
    (
        ngram_result.unwrap_or_default(),
        phrase_result.unwrap_or_default(),
    )
}

/// Builds the classes of every width in `chained` (which holds 1..=step) in ascending
/// order, and hands `emit` the ranks of every width in `needed`, ascending. A chained
/// width beyond `step` is reached in jumps of `step` tokens where it can be, then a token
/// at a time; a needed width that is not chained is one token past the chained width
/// before it, and is counted without being kept.
fn walk_widths(
    tokens: &[u16],
    step: usize,
    chained: &BTreeSet<usize>,
    needed: &BTreeSet<usize>,
    mut emit: impl FnMut(Ranks),
) {
    let (mut windows, ranks) = Windows::of_tokens(tokens);
    if needed.contains(&1) {
        emit(Ranks {
            width: 1,
            ends: &windows.ends,
            ranks: &ranks,
        });
    }
    drop(ranks);
    let mut stepper = Stepper::default();
    let mut step_classes: Option<Vec<u32>> = (step == 1).then(|| windows.by_end(tokens.len()));
    for &target in chained.union(needed).filter(|&&w| w > 1) {
        if !chained.contains(&target) {
            assert_eq!(
                windows.width + 1,
                target,
                "a width counted beside the chain"
            );
            stepper.beside(&windows, Prefix::Token(tokens), &mut emit);
            continue;
        }
        while windows.width < target {
            let prefix = match &step_classes {
                Some(by_end) if windows.width + step <= target => Prefix::Classes {
                    width: step,
                    by_end,
                },
                _ => Prefix::Token(tokens),
            };
            let width = windows.width + prefix.width();
            stepper.extend(&mut windows, prefix, |ranks| {
                if width == target && needed.contains(&width) {
                    emit(ranks);
                }
            });
            if width == step && step_classes.is_none() {
                step_classes = Some(windows.by_end(tokens.len()));
            }
        }
    }
}

/// Calls `f` on the slot of position `end − back` for every end that `ranks` lists, with
/// its rank; in parallel over blocks of positions (the ends are ascending).
fn at_ends<T: Send>(
    result: &mut [T],
    ranks: &Ranks<'_>,
    back: usize,
    f: impl Fn(&mut T, u32) + Sync,
) {
    const BLOCK: usize = 1 << 16;
    result
        .par_chunks_mut(BLOCK)
        .enumerate()
        .for_each(|(block, slots)| {
            let first = block * BLOCK + back;
            let from = ranks.ends.partition_point(|&e| (e as usize) < first);
            let to = ranks
                .ends
                .partition_point(|&e| (e as usize) < first + slots.len());
            for (&e, &rank) in ranks.ends[from..to].iter().zip(&ranks.ranks[from..to]) {
                f(&mut slots[e as usize - first], rank);
            }
        });
}

/// A cache's per-position choice, as the folds below see it: a label (the n-gram's
/// order, the phrase's length) and the two counts.
trait Choice: Copy + Send {
    fn label(&self) -> usize;
    fn chosen(label: usize, context: u32) -> Self;
    fn set_full(&mut self, full: u32);
}

impl Choice for NgramMatch {
    fn label(&self) -> usize {
        self.order as usize
    }
    fn chosen(order: usize, context: u32) -> Self {
        NgramMatch {
            order: order as u8,
            context,
            full: 0,
        }
    }
    fn set_full(&mut self, full: u32) {
        self.full = full;
    }
}

impl Choice for PhraseMatch {
    fn label(&self) -> usize {
        self.length as usize
    }
    fn chosen(length: usize, context: u32) -> Self {
        PhraseMatch {
            length: length as u16,
            context,
            full: 0,
        }
    }
    fn set_full(&mut self, full: u32) {
        self.full = full;
    }
}

/// One cache's part of width w. `label_of(c)` is the label a context of width c stands
/// for, if the cache has one (an order is its context's width + 1; a phrase length, its
/// context's width). First, the full counts of the choices made at width w − 1: a
/// context and its target are the window one longer, ending one later. Then the choices
/// whose context of width w qualifies; labels ascend with the width, so a higher one that
/// qualifies overwrites a lower one. (The two never touch the same choice: one reads the
/// label of width w − 1, the other writes that of width w.)
fn fold<M: Choice>(
    result: &mut [M],
    ranks: &Ranks<'_>,
    min_count: u32,
    label_of: impl Fn(usize) -> Option<usize>,
) {
    let width = ranks.width;
    if let Some(label) = label_of(width - 1) {
        at_ends(result, ranks, 1, |slot, rank| {
            if slot.label() == label {
                slot.set_full(rank);
            }
        });
    }
    if let Some(label) = label_of(width) {
        if min_count == 0 {
            // Every context qualifies, even one never seen before.
            let from = width.min(result.len());
            result[from..]
                .par_iter_mut()
                .for_each(|slot| *slot = M::chosen(label, 0));
        }
        at_ends(result, ranks, 0, |slot, context| {
            if context >= min_count {
                *slot = M::chosen(label, context);
            }
        });
    }
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

    /// Every width's ranks, whether reached a token at a time, in jumps, or counted on
    /// the side, are the counts of earlier equal windows at every end.
    #[test]
    fn every_width_ranks_earlier_equal_windows() {
        // Drifting text, where longer windows soon occur once and are dropped, and a
        // text repeated with a few changes, where most windows recur and the few that
        // occur once are carried along instead.
        let mut repeated: Vec<u16> = (0..3000).map(|i| ((i % 97) * 7 % 12) as u16).collect();
        for i in [500, 1234, 2900] {
            repeated[i] = 11 - repeated[i];
        }
        for tokens in [stream(3000, 5), repeated] {
            check_every_width(&tokens);
        }
    }

    fn check_every_width(tokens: &[u16]) {
        let chained: BTreeSet<usize> = (1..=4).chain([7, 16, 65]).collect();
        let needed: BTreeSet<usize> = [1, 2, 3, 4, 7, 8, 16, 17, 65, 66].into();
        let mut emitted = Vec::new();
        walk_widths(tokens, 4, &chained, &needed, |ranks| {
            let mut by_end = vec![0u32; tokens.len() + 1];
            for (&e, &r) in ranks.ends.iter().zip(ranks.ranks) {
                by_end[e as usize] = r;
            }
            for (end, &count) in by_end.iter().enumerate() {
                let expected = if end < ranks.width {
                    0
                } else {
                    earlier_equal_windows(tokens, ranks.width, end)
                };
                assert_eq!(count, expected, "width {} end {end}", ranks.width);
            }
            emitted.push(ranks.width);
        });
        assert_eq!(emitted, needed.into_iter().collect::<Vec<_>>());
    }

    /// Both caches from one walk are each cache's own walk.
    #[test]
    fn one_walk_for_both_caches_is_two_walks() {
        let tokens = stream(4000, 3);
        let (ngram, phrase) = (
            NgramConfig::default().validated().unwrap(),
            PhraseConfig::default().validated().unwrap(),
        );
        let (a, b) = lookups(&tokens, Some(&ngram), Some(&phrase));
        assert_eq!(a, ngram_lookups(&tokens, &ngram));
        assert_eq!(b, phrase_lookups(&tokens, &phrase));
        assert!(b.iter().any(|m| m.matched()) && a.iter().any(|m| m.order >= 8));
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
        }
        .validated()
        .unwrap();
        let result = ngram_lookups(&tokens, &config);
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
            assert_eq!({ m.context }, next_tokens.iter().sum::<u32>(), "p {p}");
            assert_eq!({ m.full }, next_tokens[tokens[p] as usize], "p {p}");
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
        }
        .validated()
        .unwrap();
        let result = phrase_lookups(&tokens, &config);
        for p in (0..tokens.len()).step_by(13) {
            let m = result[p];
            let expected = config
                .lengths
                .iter()
                .copied()
                .find(|&l| p >= l && earlier_equal_windows(&tokens, l, p) >= 1);
            assert_eq!(m.matched().then_some(m.length as usize), expected, "p {p}");
            if let Some(l) = expected {
                assert_eq!({ m.context }, earlier_equal_windows(&tokens, l, p));
                assert_eq!({ m.full }, earlier_equal_windows(&tokens, l + 1, p + 1));
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
        let config = NgramConfig::default().validated().unwrap();
        let (a, b) = (
            ngram_lookups(&tokens, &config),
            ngram_lookups(&changed, &config),
        );
        assert_eq!(a[..cut], b[..cut]);
        assert_ne!(a[cut..], b[cut..]);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        assert_eq!(one.install(|| ngram_lookups(&tokens, &config)), a);
        let phrase = PhraseConfig::default().validated().unwrap();
        assert_eq!(
            one.install(|| phrase_lookups(&tokens, &phrase)),
            phrase_lookups(&tokens, &phrase)
        );
    }
}
