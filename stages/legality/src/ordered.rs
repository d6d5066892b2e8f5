//! Cuts in a scorer's declared document orders ([`stage_api::order`]).
//!
//! In stream order a cut keeps every target before it. A scorer whose components take
//! the documents in other orders (#2135: hints in stream order, test-time training
//! longest first) may let a score depend on what comes before it in *any* of them, so a
//! cut at target c keeps the targets before c in *every* declared order, and changes only
//! targets at or after c in every one. A legal scorer's kept scores cannot move: each
//! depends on targets before it in some order, and each of those is before c in that
//! order. The targets before c in one order but not in all are where the orders
//! disagree: a score that moves there shows that order alone does not explain the
//! scorer (the `order` finding).
//!
//! Documents keep their places and lengths (the `doc` column is never changed), so a
//! re-run's processing order is the original's.

use std::collections::BTreeSet;

use stage_api::order::DocumentOrder;

use crate::classes::Classes;
use crate::perturb::{hide, CutParams, Kind, Perturbed, Secret};
use crate::proposal::Proposal;

/// The declared orders of a stream, each position's rank in each.
#[derive(Debug, Clone, PartialEq)]
pub struct Ordering {
    pub orders: Vec<DocumentOrder>,
    /// Per order; `None` for stream order (the rank is the position).
    ranks: Vec<Option<Vec<u32>>>,
}

impl Ordering {
    /// `orders` as [`stage_api::order::declared_orders`] gives them (distinct, sorted).
    pub fn new(orders: Vec<DocumentOrder>, doc: &[u32]) -> Ordering {
        let ranks = orders.iter().map(|o| o.ranks(doc)).collect();
        Ordering { orders, ranks }
    }

    fn rank(&self, order: usize, position: usize) -> usize {
        match &self.ranks[order] {
            None => position,
            Some(ranks) => ranks[position] as usize,
        }
    }

    /// Before `changed` in every declared order: a legal scorer's score cannot move.
    pub fn kept(&self, position: usize, changed: usize) -> bool {
        (0..self.orders.len()).all(|o| self.rank(o, position) < self.rank(o, changed))
    }

    /// At or after `changed` in every declared order: what a re-run may change.
    pub fn changeable(&self, position: usize, changed: usize) -> bool {
        (0..self.orders.len()).all(|o| self.rank(o, position) >= self.rank(o, changed))
    }

    /// Before `changed` in the `order`-th declared order.
    pub fn before_in(&self, order: usize, position: usize, changed: usize) -> bool {
        self.rank(order, position) < self.rank(order, changed)
    }

    /// "stream and longest_first".
    pub fn describe(&self) -> String {
        let names: Vec<&str> = self.orders.iter().map(|o| o.name()).collect();
        names.join(" and ")
    }
}

/// The changed target for `cut` in `ordering`: inside a document (the target before it
/// is in the same one, so nothing before it in any order moves), one of the original
/// run's sampled positions where one fits; for a replace, in 5%–50% of every order, so
/// that hidden targets have room after it.
fn changed_target(
    tokens: &[u16],
    doc: &[u32],
    ordering: &Ordering,
    cut: &CutParams,
) -> Result<usize, String> {
    let targets = tokens.len() - 1;
    let (low, high) = match cut.kind {
        Kind::Shuffle => (0.0, 1.0),
        Kind::Replace => (0.05, 0.5),
    };
    let fits = |c: usize| {
        c >= 2
            && c <= targets
            && doc[c - 1] == doc[c]
            && (0..ordering.orders.len()).all(|o| {
                let rank = ordering.rank(o, c) as f64 / targets as f64;
                rank >= low && rank <= high
            })
    };
    let (count, seed) = (
        cut.original_sample.unwrap_or(0),
        cut.original_seed.unwrap_or(0),
    );
    let sampled: Vec<usize> = stage_api::sample_positions(targets, count, seed)
        .iter()
        .map(|&p| p as usize)
        .filter(|&p| fits(p))
        .collect();
    let chosen = match cut.at {
        Some(at) => {
            let wanted = (at * targets as f64).ceil() as usize;
            sampled
                .iter()
                .copied()
                .find(|&p| p >= wanted)
                .or_else(|| (wanted..=targets).find(|&p| fits(p)))
        }
        None => {
            let mut secret = Secret::new(cut, "cut");
            if sampled.is_empty() {
                let all: Vec<usize> = (2..=targets).filter(|&p| fits(p)).collect();
                (!all.is_empty()).then(|| all[secret.below(all.len() as u64) as usize])
            } else {
                Some(sampled[secret.below(sampled.len() as u64) as usize])
            }
        }
    };
    chosen.ok_or_else(|| {
        format!(
            "no target inside a document lies where a {} cut in {} order may fall",
            match cut.kind {
                Kind::Shuffle => "shuffle",
                Kind::Replace => "replace",
            },
            ordering.describe()
        )
    })
}

/// [`crate::perturb::perturb`] for a cut in `ordering`: the targets at or after the
/// changed one in every order are shuffled among themselves (the changed one of the
/// other class), or replaced at hidden positions.
pub(crate) fn perturb_in_order(
    tokens: &[u16],
    doc: &[u32],
    classes: &Classes,
    cut: &CutParams,
    ordering: Ordering,
) -> Result<Perturbed, String> {
    if doc.len() != tokens.len() {
        return Err(format!(
            "{} documents for {} tokens",
            doc.len(),
            tokens.len()
        ));
    }
    if tokens.len() < 3 {
        return Err(format!(
            "{} val tokens: too few to cut (at least 3)",
            tokens.len()
        ));
    }
    let targets = tokens.len() - 1;
    let changed = changed_target(tokens, doc, &ordering, cut)?;
    let changeable: Vec<usize> = (1..=targets)
        .filter(|&p| ordering.changeable(p, changed))
        .collect();
    let mut out = tokens.to_vec();
    let mut hidden = Vec::new();
    let original = tokens[changed];
    match cut.kind {
        Kind::Shuffle => {
            let mut secret = Secret::new(cut, "shuffle");
            for i in (1..changeable.len()).rev() {
                let j = secret.below(i as u64 + 1) as usize;
                out.swap(changeable[i], changeable[j]);
            }
            if !classes.flipped(original, out[changed]) {
                let other = changeable
                    .iter()
                    .find(|&&q| classes.flipped(original, out[q]))
                    .or_else(|| changeable.iter().find(|&&q| out[q] != original));
                let Some(&other) = other else {
                    return Err(format!(
                        "every val token that a cut at {changed} in {} order may change is {original}",
                        ordering.describe()
                    ));
                };
                out.swap(changed, other);
            }
        }
        Kind::Replace => {
            let vocab = classes.vocab();
            if vocab < 2 {
                return Err("a vocabulary of one token: nothing to replace a target with".into());
            }
            let proposal = Proposal::new(tokens, vocab);
            let mut secret = Secret::new(cut, "replace");
            let other_class = (0..vocab as u16).any(|t| classes.flipped(original, t));
            out[changed] = proposal.draw(
                out[changed - 1],
                |t| match other_class {
                    true => classes.flipped(original, t),
                    false => t != original,
                },
                &mut secret,
            );
            let candidates = changeable
                .iter()
                .filter(|&&p| p != changed)
                .map(|&p| p as i64);
            let chosen = secret.positions_among(candidates, cut.hidden);
            hidden = hide(&mut out, chosen, &proposal, None, &mut secret);
        }
    }
    let excluded: BTreeSet<i64> = hidden.iter().map(|h| h.position).collect();
    Ok(Perturbed {
        kind: cut.kind,
        cut: changed - 1,
        probe_positions: crate::perturb::probe_positions(cut, targets, changed, excluded),
        tokens: out,
        hidden,
        ordering: Some(std::sync::Arc::new(ordering)),
        aimed: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perturb::tests::{rule as classes, secret as cut};

    /// Documents of lengths 5, 40, 17, 40, 3, 90, … in stream order.
    fn stream() -> (Vec<u16>, Vec<u32>) {
        let lengths = [5, 40, 17, 40, 3, 90, 12, 60, 25, 8].repeat(20);
        let doc: Vec<u32> = lengths
            .iter()
            .enumerate()
            .flat_map(|(d, &n)| std::iter::repeat_n(d as u32, n))
            .collect();
        let tokens = (0..doc.len()).map(|i| (i * 7 % 13) as u16).collect();
        (tokens, doc)
    }

    #[test]
    fn only_targets_after_the_cut_in_every_order_change_and_documents_keep_their_lengths() {
        let (tokens, doc) = stream();
        let orders = vec![DocumentOrder::Stream, DocumentOrder::LongestFirst];
        for draw in 0..20 {
            for kind in [Kind::Shuffle, Kind::Replace] {
                let ordering = Ordering::new(orders.clone(), &doc);
                let p = perturb_in_order(&tokens, &doc, &classes(13), &cut(kind, draw), ordering)
                    .unwrap();
                let ordering = p.ordering.as_deref().unwrap();
                let c = p.changed();
                assert_eq!(doc[c - 1], doc[c], "inside a document");
                assert!(classes(13).flipped(tokens[c], p.tokens[c]));
                for (q, (new, old)) in p.tokens.iter().zip(&tokens).enumerate() {
                    if new != old {
                        assert!(ordering.changeable(q, c), "{kind:?} {draw}: {q} moved");
                    }
                }
                // Some targets before the cut in stream order are not kept: a document
                // processed later lies there.
                assert!((1..c).any(|q| !ordering.kept(q, c)) || c < 200, "{c}");
            }
        }
    }

    #[test]
    fn a_cut_in_processing_order_alone_changes_what_comes_later_in_it() {
        let (tokens, doc) = stream();
        let ordering = Ordering::new(vec![DocumentOrder::LongestFirst], &doc);
        let p = perturb_in_order(
            &tokens,
            &doc,
            &classes(13),
            &cut(Kind::Shuffle, 3),
            ordering,
        )
        .unwrap();
        let ordering = p.ordering.as_deref().unwrap();
        let c = p.changed();
        let (kept, changeable) = (0..tokens.len()).fold((0, 0), |(k, s), q| {
            (
                k + ordering.kept(q, c) as usize,
                s + ordering.changeable(q, c) as usize,
            )
        });
        assert_eq!(
            kept + changeable,
            tokens.len(),
            "one order: every target is one or the other"
        );
    }
}
