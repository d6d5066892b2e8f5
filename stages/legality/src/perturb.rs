//! The streams a chain is re-run on: the prefix kept up to a secret cut, everything after
//! it changed, and a secret, fresh set of positions where the re-run is asked for whole
//! distributions.
//!
//! Two kinds, each with a cut k (targets 1..=k keep their prefix and their token; the
//! target at k+1 is always changed, its prefix is not, and where the stream allows it
//! the new target is of the other class: a word's continuation for a word start, and
//! the other way round (never a boundary, which would give a re-run away). A gate that
//! reads the target's class, the classic target dependence (#1145's within-word
//! channel), then flips at k+1 on every cut instead of by chance):
//!
//! - **shuffle**: the suffix after k is a seeded shuffle of itself. It keeps the suffix's
//!   own tokens, so the stream stays the same length and in distribution, while every
//!   later bigram and longer context moves. A legal scorer's numbers up to k cannot
//!   change (C1), nor its distribution at k+1 (target independence).
//! - **replace**: at `hidden` secret positions after k+1, the target is replaced by a
//!   token drawn from a proposal q (the val stream's own bigram, mixed with the uniform
//!   distribution), so a replaced token reads like a real one. For a scorer whose
//!   distributions sum to 1, E_u~q[p(u)/q(u)] = Σ_u p(u) = 1: the mean weight estimates
//!   the mass where no distribution was ever asked for (the blind normalisation probe).
//!   Those positions are never among the ones a run is asked about.
//!
//! Everything secret is drawn from the judge's secret (a store's own, unknown to whoever
//! wrote the scorer) and the entry's `draw`: the cut, the shuffle, the replaced positions
//! and tokens, and the positions asked about. A re-run asks for as many distributions as
//! the original run does, at other positions, so a scorer cannot tell the runs apart by
//! the request and cannot be honest only where it is asked.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use stage_api::order::{declared_orders, DocumentOrder};
use stage_api::{check_param, StageError, StageParams};

use crate::aim::{Hints, HINT_SHARE};
use crate::ordered::{perturb_in_order, Ordering};

pub use crate::classes::Classes;
pub use crate::proposal::{Proposal, PROPOSAL_ADD_K, PROPOSAL_BIGRAM_SHARE};

/// How a re-run changes the stream after its cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[default]
    Shuffle,
    Replace,
}

/// One re-run: the `perturb` stage's parameters and an entry of the `legality` stage's
/// `cuts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CutParams {
    pub kind: Kind,
    /// Where the cut falls, as a fraction of the val targets. Absent (the default): drawn
    /// from the secret, anywhere in the stream for a shuffle (up to the last target
    /// whose suffix can still change), 5%–50% for a replace (which needs room after it).
    pub at: Option<f64>,
    /// Tells apart entries that are otherwise equal: each draws its own secret values.
    pub draw: u32,
    /// Positions where the re-run asks for whole distributions (0: as many as the
    /// original run keeps).
    pub sample: usize,
    /// `replace`: how many targets after the changed one are replaced.
    pub hidden: usize,
    /// The original run's sample (its pass-1's `mass_sample` and `mass_seed`; the
    /// pipeline copies them when absent): the changed target is one of its positions,
    /// so that the original has the distribution there too.
    pub original_sample: Option<usize>,
    pub original_seed: Option<u64>,
    /// The judge's secret; the pipeline fills it from the store's.
    pub secret: String,
    /// The orders in which the scorer's components take the documents (its pass-1's
    /// `order`; the pipeline copies it): the cut keeps what lies before it in every one
    /// ([`crate::ordered`]). Absent: stream order.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub order: BTreeMap<String, DocumentOrder>,
    /// The gate of the chain's tilt (its `threshold`; the pipeline copies it): where a
    /// replace re-run aimed at the chain's hints counts a hint as fired ([`crate::aim`]).
    /// Absent: every hint with a share above 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint_threshold: Option<f32>,
}

impl Default for CutParams {
    fn default() -> Self {
        CutParams {
            kind: Kind::Shuffle,
            at: None,
            draw: 0,
            sample: 0,
            hidden: 4096,
            original_sample: None,
            original_seed: None,
            secret: String::new(),
            order: BTreeMap::new(),
            hint_threshold: None,
        }
    }
}

impl StageParams for CutParams {
    fn validate(&self) -> Result<(), StageError> {
        if let Some(at) = self.at {
            if !(at > 0.0 && at < 1.0) {
                return Err(StageError::invalid_param(
                    "at",
                    format!("{at} is not inside (0, 1): the cut is a fraction of the val targets"),
                ));
            }
        }
        if let Some(t) = self.hint_threshold {
            if !(0.0..=1.0).contains(&t) {
                return Err(StageError::invalid_param(
                    "hint_threshold",
                    format!("{t} is not a share in [0, 1]"),
                ));
            }
        }
        check_param("sample", self.sample, 0..=65_536, "as pass-1's mass_sample")?;
        check_param("hidden", self.hidden, 1..=1 << 20, "replaced targets")?;
        check_param(
            "original_sample",
            self.original_sample.unwrap_or(0),
            0..=65_536,
            "pass-1's mass_sample",
        )
    }
}

impl CutParams {
    /// Where a hint fires for an aimed cut ([`crate::aim`]).
    fn gate(&self) -> f32 {
        self.hint_threshold.unwrap_or(0.0)
    }

    /// The original run's sample: (count, seed).
    fn original(&self) -> (usize, u64) {
        (
            self.original_sample.unwrap_or(0),
            self.original_seed.unwrap_or(0),
        )
    }
}

/// A target replaced by the proposal, with the proposal's probability of the token drawn.
#[derive(Debug, Clone, PartialEq)]
pub struct Hidden {
    pub position: i64,
    pub token: u16,
    pub q: f64,
}

/// A perturbed stream and what the judge needs to read the re-run on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Perturbed {
    pub kind: Kind,
    /// Targets 1..=cut keep their prefix and their token.
    pub cut: usize,
    pub tokens: Vec<u16>,
    /// Where the re-run is asked for whole distributions: sorted, the changed target
    /// among them, no hidden position.
    pub probe_positions: Vec<i64>,
    /// `replace`: the replaced targets, in stream order.
    pub hidden: Vec<Hidden>,
    /// Set for a cut in declared orders other than stream order alone: then the targets
    /// kept are those before the changed one in every order, not those up to `cut`.
    pub ordering: Option<Arc<Ordering>>,
    /// A replace re-run aimed at the chain's hints ([`crate::aim`]): the hint that fires
    /// at the changed target.
    pub aimed: Option<u16>,
}

impl Perturbed {
    /// The first changed target.
    pub fn changed(&self) -> usize {
        self.cut + 1
    }

    /// Whether the target at `position` keeps its token and all a legal scorer may read
    /// for it, so that its score cannot move.
    pub fn kept(&self, position: i64) -> bool {
        match &self.ordering {
            None => position <= self.cut as i64,
            Some(o) => position >= 0 && o.kept(position as usize, self.changed()),
        }
    }
}

/// A stream of secret random numbers for one purpose of one entry: blake3 in XOF mode,
/// keyed by the secret, the entry's draw and the purpose. Reproducible from the
/// parameters alone; unpredictable without the secret.
pub struct Secret {
    reader: blake3::OutputReader,
    /// Read ahead: the XOF computes a 64-byte block per read, so reading 8 bytes at a
    /// time would cost eight blocks per block (a 62M-token shuffle: seconds).
    buffer: Box<[u8; 4096]>,
    used: usize,
}

impl Secret {
    pub fn new(cut: &CutParams, purpose: &str) -> Secret {
        let mut hasher = blake3::Hasher::new_derive_key("cachemoney legality secret v1");
        hasher.update(cut.secret.as_bytes());
        hasher.update(&[0]);
        hasher.update(&cut.draw.to_le_bytes());
        hasher.update(purpose.as_bytes());
        Secret {
            reader: hasher.finalize_xof(),
            buffer: Box::new([0; 4096]),
            used: 4096,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        if self.used == self.buffer.len() {
            self.reader.fill(&mut self.buffer[..]);
            self.used = 0;
        }
        let bytes = &self.buffer[self.used..self.used + 8];
        self.used += 8;
        u64::from_le_bytes(bytes.try_into().expect("8 bytes"))
    }

    /// Uniform in 0..n (n > 0), without modulo bias worth the name at these sizes.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in [0, 1), 53 bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `count` distinct positions of `range` not in `excluded` (sorted), each with the
    /// same chance.
    pub fn positions(
        &mut self,
        range: std::ops::RangeInclusive<i64>,
        count: usize,
        excluded: &BTreeSet<i64>,
    ) -> Vec<i64> {
        self.positions_among(range.filter(|p| !excluded.contains(p)), count)
    }

    /// `count` distinct positions of `candidates` (sorted), each with the same chance.
    pub fn positions_among(
        &mut self,
        candidates: impl IntoIterator<Item = i64>,
        count: usize,
    ) -> Vec<i64> {
        let key = self.next_u64();
        // The `count` smallest keys, kept in a bounded heap: memory in the sample's size,
        // not the stream's (62M positions at the challenge's scale).
        let mut smallest: std::collections::BinaryHeap<(u64, i64)> =
            std::collections::BinaryHeap::with_capacity(count + 1);
        for p in candidates {
            let entry = (mix(key, p as u64), p);
            if smallest.len() < count {
                smallest.push(entry);
            } else if smallest.peek().is_some_and(|top| entry < *top) {
                smallest.pop();
                smallest.push(entry);
            }
        }
        let mut chosen: Vec<i64> = smallest.into_iter().map(|(_, p)| p).collect();
        chosen.sort_unstable();
        chosen
    }
}

/// splitmix64's finaliser over a key and a value: a keyed order of positions.
fn mix(key: u64, value: u64) -> u64 {
    let mut z = key ^ value.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The cut for the stream `tokens` (targets 1..len).
pub fn cut_position(tokens: &[u16], cut: &CutParams) -> Result<usize, String> {
    cut_aimed(tokens, cut, None)
}

/// The cut, for a replace re-run with `hints` where one of the original's positions in
/// range has a firing hint: one of those ([`crate::aim`]).
fn cut_aimed(tokens: &[u16], cut: &CutParams, hints: Option<&Hints>) -> Result<usize, String> {
    let len = tokens.len();
    if len < 3 {
        return Err(format!("{len} val tokens: too few to cut (at least 3)"));
    }
    let targets = len - 1;
    // A shuffle's cut may fall anywhere a shuffle can still change the target after it:
    // a read-ahead confined to the first 5% escaped every probe when cuts started there,
    // and one confined to the last 5% when they stopped at 95% (the red team's, both). The
    // changed target must have a different token somewhere after it, so it lies before
    // the stream's final run of one token. A replace needs room after it for its hidden
    // targets, and starts after the first 5%.
    let (lowest, highest) = match cut.kind {
        Kind::Shuffle => {
            let last = tokens[targets];
            let final_run = tokens.iter().rposition(|&t| t != last).map_or(0, |i| i + 1);
            (2, final_run.saturating_sub(1).min(targets))
        }
        Kind::Replace => {
            let lowest = ((0.05 * targets as f64).ceil() as usize).clamp(2, targets);
            (
                lowest,
                ((0.5 * targets as f64).floor() as usize).clamp(lowest, targets),
            )
        }
    };
    if highest < lowest {
        return Err(format!(
            "every val token from position {} on is {}: no shuffle can change a target",
            lowest, tokens[targets]
        ));
    }
    let (count, seed) = cut.original();
    let original = stage_api::sample_positions(targets, count, seed);
    let changed = match cut.at {
        // Given: the first of the original's positions from there (or there).
        Some(at) => {
            let wanted = ((at * targets as f64).ceil() as usize).clamp(2, targets);
            original
                .iter()
                .map(|&p| p as usize)
                .find(|&p| p >= wanted)
                .unwrap_or(wanted)
        }
        // Secret: one of the original's positions in the range, or any position there.
        None => {
            let mut secret = Secret::new(cut, "cut");
            let mut inside: Vec<usize> = original
                .iter()
                .map(|&p| p as usize)
                .filter(|p| (lowest..=highest).contains(p))
                .collect();
            if let Some(hints) = hints.filter(|_| cut.kind == Kind::Replace) {
                let firing: Vec<usize> = inside
                    .iter()
                    .copied()
                    .filter(|&p| hints.firing(p, cut.gate()).is_some())
                    .collect();
                if !firing.is_empty() {
                    inside = firing;
                }
            }
            if inside.is_empty() {
                lowest + secret.below((highest - lowest + 1) as u64) as usize
            } else {
                inside[secret.below(inside.len() as u64) as usize]
            }
        }
    };
    Ok(changed - 1)
}

/// The perturbed stream for `cut` (see the module's documentation); `doc` is each
/// token's document, `classes` are the vocabulary's (every token of `tokens` inside it).
pub fn perturb(
    tokens: &[u16],
    doc: &[u32],
    classes: &Classes,
    cut: &CutParams,
) -> Result<Perturbed, String> {
    perturb_aimed(tokens, doc, classes, cut, None)
}

/// [`perturb`], a replace re-run aimed at the chain's `hints` ([`crate::aim`]). Cuts in
/// declared orders are not aimed: hints read the stream's order.
pub fn perturb_aimed(
    tokens: &[u16],
    doc: &[u32],
    classes: &Classes,
    cut: &CutParams,
    hints: Option<&Hints>,
) -> Result<Perturbed, String> {
    let orders = declared_orders(cut.order.values());
    if orders != [DocumentOrder::Stream] {
        return perturb_in_order(tokens, doc, classes, cut, Ordering::new(orders, doc));
    }
    let vocab = classes.vocab();
    let k = cut_aimed(tokens, cut, hints)?;
    let targets = tokens.len() - 1;
    let changed = k + 1;
    let mut out = tokens.to_vec();
    let mut hidden = Vec::new();
    let mut aimed = None;
    match cut.kind {
        Kind::Shuffle => {
            let suffix = &mut out[changed..];
            let mut secret = Secret::new(cut, "shuffle");
            for i in (1..suffix.len()).rev() {
                let j = secret.below(i as u64 + 1) as usize;
                suffix.swap(i, j);
            }
            // The other class where the suffix has one, else another token.
            let original = tokens[changed];
            if !classes.flipped(original, suffix[0]) {
                let other = suffix
                    .iter()
                    .position(|&t| classes.flipped(original, t))
                    .or_else(|| suffix.iter().position(|&t| t != original));
                let Some(other) = other else {
                    return Err(format!(
                        "every val token after position {k} is {original}: no shuffle can change the target at {changed}"
                    ));
                };
                suffix.swap(0, other);
            }
        }
        Kind::Replace => {
            if vocab < 2 {
                return Err("a vocabulary of one token: nothing to replace a target with".into());
            }
            let proposal = Proposal::new(tokens, vocab);
            let mut secret = Secret::new(cut, "replace");
            let original = tokens[changed];
            let other_class = (0..vocab as u16).any(|t| classes.flipped(original, t));
            // Aimed: the target crosses the line between the hint and the rest (taken
            // away below by any change when the original is the hint).
            aimed = hints.and_then(|h| h.firing(changed, cut.gate()));
            out[changed] = if let Some(hint) = aimed.filter(|&h| h != original) {
                hint
            } else if other_class {
                proposal.draw(
                    out[changed - 1],
                    |t| classes.flipped(original, t),
                    &mut secret,
                )
            } else {
                proposal.draw(out[changed - 1], |t| t != original, &mut secret)
            };
            let chosen = secret.positions(
                changed as i64 + 1..=targets as i64,
                cut.hidden,
                &Default::default(),
            );
            hidden = hide(
                &mut out,
                chosen,
                &proposal,
                hints.map(|h| (h, cut.gate())),
                &mut secret,
            );
        }
    }
    let excluded = hidden.iter().map(|h| h.position).collect();
    Ok(Perturbed {
        kind: cut.kind,
        cut: k,
        tokens: out,
        probe_positions: probe_positions(cut, targets, changed, excluded),
        hidden,
        ordering: None,
        aimed,
    })
}

/// Replaces the targets at `positions` (ascending) by proposal draws, each drawn after
/// the token before it as that now stands, and records what the blind probe needs.
/// Where one of `hints` fires, the proposal is the hint with probability [`HINT_SHARE`]
/// and the usual draw otherwise ([`crate::aim`]).
pub(crate) fn hide(
    out: &mut [u16],
    positions: Vec<i64>,
    proposal: &Proposal,
    hints: Option<(&Hints, f32)>,
    secret: &mut Secret,
) -> Vec<Hidden> {
    let mut hidden = Vec::with_capacity(positions.len());
    for t in positions {
        let t = t as usize;
        let previous = out[t - 1];
        let hint = hints.and_then(|(h, gate)| h.firing(t, gate));
        let token = match hint {
            Some(h) if secret.unit() < HINT_SHARE => h,
            _ => proposal.draw(previous, |_| true, secret),
        };
        let q = match hint {
            Some(h) => {
                HINT_SHARE * (token == h) as u8 as f64
                    + (1.0 - HINT_SHARE) * proposal.q(previous, token)
            }
            None => proposal.q(previous, token),
        };
        hidden.push(Hidden {
            position: t as i64,
            token,
            q,
        });
        out[t] = token;
    }
    hidden
}

/// Where a re-run is asked for whole distributions: as many positions as the original
/// asked for (none when it asked for none: a re-run may not be told apart by what it
/// asks), one of them the changed target, none hidden.
pub(crate) fn probe_positions(
    cut: &CutParams,
    targets: usize,
    changed: usize,
    mut excluded: BTreeSet<i64>,
) -> Vec<i64> {
    let count = match (cut.sample, cut.original().0) {
        (0, n) | (n, _) => n,
    };
    excluded.insert(changed as i64);
    let mut positions = Vec::new();
    if count > 0 {
        positions = Secret::new(cut, "probe").positions(1..=targets as i64, count - 1, &excluded);
        positions.push(changed as i64);
        positions.sort_unstable();
    }
    positions
}

#[cfg(test)]
pub(crate) mod tests;
