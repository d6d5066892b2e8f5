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
use crate::hash::{context_hash, full_hash, NGRAM_PRIMES, PHRASE_PRIMES};
use crate::ngram::{NgramConfig, NgramMatch, NgramTables};
use crate::phrase::{PhraseConfig, PhraseMatch, PhraseTables};
use crate::zeroed::zeroed_table;
use crate::Valid;

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

/// The audit's figures over its samples: how the mass is spread, and the BPB at the
/// sampled positions before and after renormalising by it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MassSummary {
    pub samples: usize,
    /// Positions where the rule's choice depends on which candidate is the target.
    pub target_dependent: usize,
    pub mean: f64,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub sample_bpb: f64,
    pub normalised_sample_bpb: f64,
}

impl MassSummary {
    /// The figures of `masses` (at least one) and their `choices`; `bytes(p)` is the
    /// UTF-8 length of the token at position `p`.
    pub fn of(masses: &[Mass], choices: &[Choices], bytes: impl Fn(usize) -> u8) -> MassSummary {
        let bits = stage_api::scores::bits;
        let mut sorted: Vec<f64> = masses.iter().map(|m| m.mass).collect();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        let total_bytes: u64 = masses.iter().map(|m| bytes(m.position) as u64).sum();
        let per_byte = |total_bits: f64| total_bits / total_bytes.max(1) as f64;
        MassSummary {
            samples: n,
            target_dependent: choices.iter().filter(|c| c.states > 1).count(),
            mean: sorted.iter().sum::<f64>() / n as f64,
            median,
            min: sorted[0],
            max: sorted[n - 1],
            sample_bpb: per_byte(masses.iter().map(|m| bits(m.p_target)).sum()),
            normalised_sample_bpb: per_byte(masses.iter().map(|m| bits(m.p_target / m.mass)).sum()),
        }
    }
}

/// Distributions kept at `positions` (in the order kept, one per position) as `values`
/// probabilities in all, for the val stream `tokens`: checks that they are one full
/// distribution per target position, sorted, and cover every token of the stream, and
/// returns their vocabulary size.
pub fn sampled_vocab(positions: &[usize], values: usize, tokens: &[u16]) -> Result<usize, String> {
    if positions.is_empty() {
        return Err(
            "no rows: this pass-1 kept no distributions (model = \"import\", or mass_sample = 0)"
                .into(),
        );
    }
    let vocab = values / positions.len();
    if vocab * positions.len() != values
        || positions.windows(2).any(|w| w[0] >= w[1])
        || positions.iter().any(|&p| p == 0 || p >= tokens.len())
    {
        return Err(
            "not one full distribution per sampled val position, sorted by position".into(),
        );
    }
    if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(format!(
            "distributions cover {vocab} tokens, but the val stream has token {bad}"
        ));
    }
    Ok(vocab)
}

/// The rule's choices at each sampled position (see [`Choices`]).
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
    ngram: &Valid<NgramConfig>,
    phrase: &Valid<PhraseConfig>,
    positions: &[usize],
    vocab: usize,
) -> Vec<CandidateMatches> {
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
    (0..positions.len())
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
        .collect()
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
mod tests;
