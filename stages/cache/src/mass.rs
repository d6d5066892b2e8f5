//! The implied-mass audit (`docs/honest-modes.md`, "Audit outputs"): at a few positions,
//! evaluate a mode's final probability for *every* candidate token, as if it were the
//! target, and add them up. A proper distribution sums to 1; the record's hashed,
//! target-aware cache does not (PR #886 measured ≈ 277).
//!
//! Each mode answers "what would the cache give candidate v at p" with its own rule:
//! - `reference`: the record's lookup with v as the target, in the finished tables
//!   (leave-one-out included, as the formula is applied);
//! - `causal`: the same rule in tables of the positions before p, replayed by one pass per
//!   order (and one for the phrase lengths) that stops to read every candidate's count at
//!   each sampled position;
//! - `causal-normalised`: the order (and phrase length) its lookup chose, which does not
//!   depend on the target, and that context's exact next-token histogram before p.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::blend::{Entry, PreparedBlend};
use crate::fingerprint::{Rolling, BASE_KEY};
use crate::hash::{context_hash, full_hash, zeroed_table, NGRAM_PRIMES, PHRASE_PRIMES};
use crate::ngram::{NgramConfig, NgramMatch, NgramTables};
use crate::phrase::{PhraseConfig, PhraseMatch, PhraseTables};
use crate::ConfigError;

/// What the cache gives each candidate token at one sampled position.
pub type CandidateMatches = Vec<(NgramMatch, PhraseMatch)>;

/// One sampled position: the model's tempered distribution there and its entropy.
pub struct MassSample<'a> {
    pub position: usize,
    pub entropy: f32,
    pub model: &'a [f32],
    /// The blend of the rank that scored this position.
    pub blend: &'a PreparedBlend,
}

/// Σ_v p_final(v) and p_final(target) at one sampled position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mass {
    pub position: usize,
    pub mass: f64,
    pub p_target: f64,
}

/// What the rule chose at one sampled position, evaluated with each candidate as the
/// target: how many distinct (n-gram order, phrase length) choices there were, the true
/// target's, and the first candidate's that differs (the target's own if none does). A
/// rule whose choice depends on the target gives a distribution that moves with the
/// target (C1): the legality probe reads this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choices {
    pub states: u32,
    pub target: (u8, u16),
    pub other_token: u16,
    pub other: (u8, u16),
}

pub fn choices(
    tokens: &[u16],
    positions: &[usize],
    candidates: &[CandidateMatches],
) -> Vec<Choices> {
    positions
        .iter()
        .zip(candidates)
        .map(|(&p, matches)| {
            let choice = |v: usize| (matches[v].0.order, matches[v].1.length);
            let target_token = tokens[p] as usize;
            let target = choice(target_token);
            let mut distinct: Vec<(u8, u16)> = (0..matches.len()).map(choice).collect();
            distinct.sort_unstable();
            distinct.dedup();
            let other_token = (0..matches.len())
                .find(|&v| choice(v) != target)
                .unwrap_or(target_token);
            Choices {
                states: distinct.len() as u32,
                target,
                other_token: other_token as u16,
                other: choice(other_token),
            }
        })
        .collect()
}

/// Blends every candidate and adds them up.
pub fn implied_mass(
    tokens: &[u16],
    samples: &[MassSample],
    candidates: &[CandidateMatches],
) -> Vec<Mass> {
    samples
        .par_iter()
        .zip(candidates)
        .map(|(sample, matches)| {
            let p_final = |v: usize| {
                let (ngram, phrase) = matches[v];
                sample
                    .blend
                    .blend(&Entry {
                        model_p: sample.model[v],
                        entropy: sample.entropy,
                        ngram,
                        phrase,
                    })
                    .1
            };
            // In candidate order: the same sum on any thread count.
            let mass = (0..sample.model.len()).map(p_final).sum();
            Mass {
                position: sample.position,
                mass,
                p_target: p_final(tokens[sample.position] as usize),
            }
        })
        .collect()
}

/// Reference mode: the record's lookups with each candidate as the target.
pub fn reference_candidates(
    tokens: &[u16],
    ngram: &NgramTables,
    phrase: &PhraseTables,
    positions: &[usize],
    vocab: usize,
) -> Vec<CandidateMatches> {
    positions
        .par_iter()
        .map(|&p| {
            (0..vocab as u16)
                .map(|v| {
                    (
                        ngram.lookup_as_if(tokens, p, v),
                        phrase.lookup_as_if(tokens, p, v),
                    )
                })
                .collect()
        })
        .collect()
}

/// At each sampled position (sorted), for each probed width: the context count and every
/// candidate's full count in tables of the earlier positions.
type Snapshot = Vec<(u32, Vec<u32>)>;

/// Causal mode: replays the score-then-update passes, reading every candidate's counts at
/// the sampled positions (`positions` sorted).
pub fn causal_candidates(
    tokens: &[u16],
    ngram: &NgramConfig,
    phrase: &PhraseConfig,
    positions: &[usize],
    vocab: usize,
) -> Result<Vec<CandidateMatches>, ConfigError> {
    ngram.validate()?;
    phrase.validate()?;
    let orders: Vec<usize> = (ngram.min_order..=ngram.max_order).rev().collect();
    // One pass per order (orders in parallel): that order's own pair of tables.
    let per_order: Vec<Snapshot> = orders
        .par_iter()
        .map(|&order| {
            let width = order - 1;
            let mask = (ngram.buckets - 1) as u32;
            let (mut ctx, mut full) = (zeroed_table(ngram.buckets), zeroed_table(ngram.buckets));
            let mut snapshots = Vec::with_capacity(positions.len());
            let mut next = positions.iter().peekable();
            for p in 0..tokens.len() {
                let h = (p >= width).then(|| context_hash(tokens, p, width, &NGRAM_PRIMES));
                while next.peek() == Some(&&p) {
                    next.next();
                    snapshots.push(match h {
                        Some(h) => (
                            ctx[(h & mask) as usize],
                            (0..vocab as u16)
                                .map(|v| {
                                    full[(full_hash(h, v, width, &NGRAM_PRIMES) & mask) as usize]
                                })
                                .collect(),
                        ),
                        None => (0, vec![0; vocab]),
                    });
                }
                if let Some(h) = h {
                    ctx[(h & mask) as usize] += 1;
                    full[(full_hash(h, tokens[p], width, &NGRAM_PRIMES) & mask) as usize] += 1;
                }
            }
            snapshots
        })
        .collect();
    // The phrase lengths share one pair of tables: one pass, all lengths read, then added.
    let mask = (phrase.buckets - 1) as u32;
    let (mut ctx, mut full) = (zeroed_table(phrase.buckets), zeroed_table(phrase.buckets));
    let mut per_length: Vec<Snapshot> = vec![Vec::new(); phrase.lengths.len()];
    let mut next = positions.iter().peekable();
    for p in 0..tokens.len() {
        let hashes: Vec<Option<u32>> = phrase
            .lengths
            .iter()
            .map(|&l| (p >= l).then(|| context_hash(tokens, p, l, &PHRASE_PRIMES)))
            .collect();
        while next.peek() == Some(&&p) {
            next.next();
            for ((snapshot, &h), &length) in per_length.iter_mut().zip(&hashes).zip(&phrase.lengths)
            {
                snapshot.push(match h {
                    Some(h) => (
                        ctx[(h & mask) as usize],
                        (0..vocab as u16)
                            .map(|v| {
                                full[(full_hash(h, v, length, &PHRASE_PRIMES) & mask) as usize]
                            })
                            .collect(),
                    ),
                    None => (0, vec![0; vocab]),
                });
            }
        }
        for (&h, &length) in hashes.iter().zip(&phrase.lengths) {
            if let Some(h) = h {
                ctx[(h & mask) as usize] += 1;
                full[(full_hash(h, tokens[p], length, &PHRASE_PRIMES) & mask) as usize] += 1;
            }
        }
    }
    // The causal rules (see `causal`), per candidate.
    Ok((0..positions.len())
        .into_par_iter()
        .map(|i| {
            (0..vocab)
                .map(|v| {
                    let ngram_match = orders
                        .iter()
                        .zip(&per_order)
                        .find_map(|(&order, snapshots)| {
                            let (context, ref fulls) = snapshots[i];
                            (context >= ngram.min_count && fulls[v] > 0).then_some(NgramMatch {
                                order: order as u8,
                                context,
                                full: fulls[v],
                            })
                        })
                        .unwrap_or_default();
                    let phrase_match = phrase
                        .lengths
                        .iter()
                        .zip(&per_length)
                        .find_map(|(&length, snapshots)| {
                            let (context, ref fulls) = snapshots[i];
                            (context >= phrase.min_count && fulls[v] > 0).then_some(PhraseMatch {
                                length: length as u16,
                                context,
                                full: fulls[v],
                            })
                        })
                        .unwrap_or_default();
                    (ngram_match, phrase_match)
                })
                .collect()
        })
        .collect())
}

/// For each request (target position p, context width w), the exact histogram of the
/// tokens that followed the w tokens before p at earlier positions. Windows are compared
/// token by token (a fingerprint only finds the candidates), so the counts are exact.
pub fn next_token_histograms(
    tokens: &[u16],
    requests: &[(usize, usize)],
    vocab: usize,
) -> Vec<Vec<u32>> {
    let mut histograms = vec![Vec::new(); requests.len()];
    let mut widths: Vec<usize> = requests.iter().map(|r| r.1).filter(|&w| w > 0).collect();
    widths.sort_unstable();
    widths.dedup();
    let per_width: Vec<Vec<(usize, Vec<u32>)>> = widths
        .par_iter()
        .map(|&width| {
            // Requests of this width, by position; distinct windows get one running
            // histogram each.
            let mut mine: Vec<(usize, usize)> = requests
                .iter()
                .enumerate()
                .filter(|(_, r)| r.1 == width && r.0 >= width)
                .map(|(i, r)| (r.0, i))
                .collect();
            mine.sort_unstable();
            let mut window_of: HashMap<&[u16], usize> = HashMap::new();
            let mut windows: Vec<&[u16]> = Vec::new();
            let mut by_fingerprint: HashMap<u64, Vec<usize>> = HashMap::new();
            let mut window_index = Vec::with_capacity(mine.len());
            for &(p, _) in &mine {
                let window = &tokens[p - width..p];
                let index = *window_of.entry(window).or_insert_with(|| {
                    windows.push(window);
                    let fingerprint = Rolling::new(window, BASE_KEY).value;
                    by_fingerprint
                        .entry(fingerprint)
                        .or_default()
                        .push(windows.len() - 1);
                    windows.len() - 1
                });
                window_index.push(index);
            }
            let mut running = vec![vec![0u32; vocab]; windows.len()];
            let mut out = Vec::with_capacity(mine.len());
            let mut next = 0;
            if tokens.len() >= width {
                let mut rolling = Rolling::new(&tokens[..width], BASE_KEY);
                for e in width..=tokens.len() {
                    if e > width {
                        rolling.slide(tokens[e - 1 - width], tokens[e - 1]);
                    }
                    // Requests at p = e see the windows ending before e.
                    while next < mine.len() && mine[next].0 == e {
                        out.push((mine[next].1, running[window_index[next]].clone()));
                        next += 1;
                    }
                    if e == tokens.len() {
                        break;
                    }
                    if let Some(indices) = by_fingerprint.get(&rolling.value) {
                        for &i in indices {
                            if windows[i] == &tokens[e - width..e] {
                                running[i][tokens[e] as usize] += 1;
                            }
                        }
                    }
                }
            }
            out
        })
        .collect();
    for (i, histogram) in per_width.into_iter().flatten() {
        histograms[i] = histogram;
    }
    // Width 0 (nothing matched) or no window that long before p: no earlier occurrence.
    for histogram in histograms.iter_mut().filter(|h| h.is_empty()) {
        *histogram = vec![0; vocab];
    }
    histograms
}

/// Causal-normalised mode: the lookups' (target-independent) choice at each position,
/// with every candidate's exact count. `chosen` holds the stored matches at `positions`.
/// Fails if a histogram does not add up to the stored context count, which would mean
/// the fast exact counting and this direct one disagree.
pub fn normalised_candidates(
    tokens: &[u16],
    positions: &[usize],
    chosen: &[(NgramMatch, PhraseMatch)],
    vocab: usize,
) -> Result<Vec<CandidateMatches>, String> {
    let requests: Vec<(usize, usize)> = positions
        .iter()
        .zip(chosen)
        .flat_map(|(&p, (n, ph))| {
            [
                (p, if n.matched() { n.order as usize - 1 } else { 0 }),
                (p, ph.length as usize),
            ]
        })
        .collect();
    let histograms = next_token_histograms(tokens, &requests, vocab);
    let mut out = Vec::with_capacity(positions.len());
    for (i, (&p, (n, ph))) in positions.iter().zip(chosen).enumerate() {
        let (ngram_counts, phrase_counts) = (&histograms[2 * i], &histograms[2 * i + 1]);
        for (matched, context, counts, what) in [
            (n.matched(), n.context, ngram_counts, "n-gram"),
            (ph.matched(), ph.context, phrase_counts, "phrase"),
        ] {
            let total: u32 = counts.iter().sum();
            if matched && total != context {
                return Err(format!("position {p}: the {what} context occurred {total} times before it, but the matches table says {context}"));
            }
        }
        out.push(
            (0..vocab)
                .map(|v| {
                    let ngram = if n.matched() {
                        NgramMatch {
                            full: ngram_counts[v],
                            ..*n
                        }
                    } else {
                        NgramMatch::default()
                    };
                    let phrase = if ph.matched() {
                        PhraseMatch {
                            full: phrase_counts[v],
                            ..*ph
                        }
                    } else {
                        PhraseMatch::default()
                    };
                    (ngram, phrase)
                })
                .collect(),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blend::BlendParams;

    fn stream(n: usize) -> Vec<u16> {
        let mut state = 7u32;
        let base: Vec<u16> = (0..300)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                ((state >> 16) % 16) as u16
            })
            .collect();
        (0..n)
            .map(|i| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                if (state >> 16).is_multiple_of(7) {
                    ((state >> 20) % 16) as u16
                } else {
                    base[(i * 3 / 2) % base.len()]
                }
            })
            .collect()
    }

    /// A flat model distribution over 16 tokens, for every sample.
    fn samples(
        positions: &[usize],
        model: &[f32],
        blend: &'static PreparedBlend,
    ) -> Vec<MassSample<'static>> {
        let model: &'static [f32] = Box::leak(model.to_vec().into_boxed_slice());
        positions
            .iter()
            .map(|&p| MassSample {
                position: p,
                entropy: 2.0,
                model,
                blend,
            })
            .collect()
    }

    fn small_configs() -> (NgramConfig, PhraseConfig) {
        (
            NgramConfig {
                buckets: 1 << 10,
                ..NgramConfig::default()
            },
            PhraseConfig {
                lengths: vec![32, 16],
                buckets: 1 << 9,
                ..PhraseConfig::default()
            },
        )
    }

    #[test]
    fn normalised_mass_is_one_and_reference_mass_is_more() {
        let tokens = stream(6000);
        let (ng, ph) = small_configs();
        let positions: Vec<usize> = (100..6000).step_by(97).collect();
        let model = vec![1.0f32 / 16.0; 16];
        let blend = Box::leak(Box::new(
            BlendParams {
                phrase_min_length: 16,
                phrase_max_length: 32,
                ..BlendParams::default()
            }
            .prepared(),
        ));
        let samples = samples(&positions, &model, blend);

        let lookups = crate::normalised::ngram_lookups(&tokens, &ng).unwrap();
        let phrases = crate::normalised::phrase_lookups(&tokens, &ph).unwrap();
        let chosen: Vec<_> = positions
            .iter()
            .map(|&p| (lookups[p], phrases[p]))
            .collect();
        let candidates = normalised_candidates(&tokens, &positions, &chosen, 16).unwrap();
        for m in implied_mass(&tokens, &samples, &candidates) {
            assert!((m.mass - 1.0).abs() < 1e-6, "{m:?}");
        }
        // The candidates' matches at the true token are the stored ones.
        for ((&p, c), stored) in positions.iter().zip(&candidates).zip(&chosen) {
            assert_eq!(c[tokens[p] as usize], *stored, "p {p}");
        }

        let tables = (
            NgramTables::build(&tokens, &ng).unwrap(),
            PhraseTables::build(&tokens, &ph).unwrap(),
        );
        let candidates = reference_candidates(&tokens, &tables.0, &tables.1, &positions, 16);
        let masses = implied_mass(&tokens, &samples, &candidates);
        let mean = masses.iter().map(|m| m.mass).sum::<f64>() / masses.len() as f64;
        assert!(mean > 1.05, "mean reference mass {mean}");
        // The candidate that is the true token gets the stored lookup.
        for (&p, c) in positions.iter().zip(&candidates) {
            assert_eq!(c[tokens[p] as usize].0, tables.0.lookup(&tokens, p));
        }

        let candidates = causal_candidates(&tokens, &ng, &ph, &positions, 16).unwrap();
        let causal_n = crate::causal::ngram_lookups(&tokens, &ng).unwrap();
        let causal_p = crate::causal::phrase_lookups(&tokens, &ph).unwrap();
        for (&p, c) in positions.iter().zip(&candidates) {
            assert_eq!(c[tokens[p] as usize], (causal_n[p], causal_p[p]), "p {p}");
        }
    }

    #[test]
    fn histograms_count_earlier_equal_windows_exactly() {
        let tokens = stream(3000);
        let requests = [(2999, 3), (1500, 1), (10, 9), (2000, 40), (5, 7)];
        let histograms = next_token_histograms(&tokens, &requests, 16);
        for (&(p, w), histogram) in requests.iter().zip(&histograms) {
            let mut expected = vec![0u32; 16];
            if p >= w {
                for e in w..p {
                    if tokens[e - w..e] == tokens[p - w..p] {
                        expected[tokens[e] as usize] += 1;
                    }
                }
            }
            assert_eq!(histogram, &expected, "({p}, {w})");
        }
    }
}
