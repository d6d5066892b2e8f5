//! The causal-normalised cache's counts as a hint: per position, the top continuation of
//! the longest context that occurred often enough before it.
//!
//! The n-gram tilt (docs/eval-techniques.md §1) proposes one hint token per target from
//! the prefix and boosts it inside the model's own distribution; the boost is
//! renormalised, so it is legal whatever proposes the hint, as long as the proposal reads
//! only the prefix. This module makes CacheMoney's cache such a proposer: its contexts
//! (orders 2–16), counted exactly as the causal-normalised mode counts them
//! ([`crate::classes`]: equal windows share a class, no hashing), choose the highest
//! order whose context occurred at least `min_count` times before p, and that context's
//! continuations name the hint.
//!
//! The hint is the token that first reached the context's highest count, as #2135's
//! kernel tracks it (§1.5: a continuation becomes the top only when its count passes the
//! top's, so ties keep the earlier token). With exact classes the count of a
//! continuation needs no table: the context followed by its target is the window one
//! token wider, whose rank (equal windows before it) the class walk gives.

use crate::classes::{Prefix, Ranks, Stepper, Windows, SINGLETON};
use crate::ngram::NgramConfig;
use crate::Valid;

/// Per position: the hint, how many of the chosen context's earlier occurrences it
/// followed (`top`), how many there were (`seen`), and the context's order (0: no
/// context qualified; then the rest are 0).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Continuations {
    pub token: Vec<u16>,
    pub top: Vec<u32>,
    pub seen: Vec<u32>,
    pub order: Vec<u8>,
}

impl Continuations {
    /// No continuation at any of `n` positions.
    pub fn none(n: usize) -> Continuations {
        Continuations {
            token: vec![0; n],
            top: vec![0; n],
            seen: vec![0; n],
            order: vec![0; n],
        }
    }
}

/// The top continuation of the highest order in `config.min_order..=config.max_order`
/// whose context (the order − 1 tokens before p) occurred at least `config.min_count`
/// times before p (at least once: a context never seen has no continuation), for every
/// position p of `tokens`. Position p reads only `tokens[..p]`. `config.buckets` is not
/// used: the counts are exact.
pub fn top_continuations(tokens: &[u16], config: &Valid<NgramConfig>) -> Continuations {
    let min_count = config.min_count.max(1);
    let orders: Vec<usize> = (config.min_order..=config.max_order).collect();
    gated_continuations(tokens, &orders, |_, _, seen| seen >= min_count)
}

/// For every position, the top continuation of the highest order in `orders` (each at
/// least 2) whose context's counts before the position pass `gate(order, top, seen)`
/// (called only for a context seen at least once). #1420/#1514's kernel is one such
/// gate: each order its own share threshold and minimum count
/// (docs/eval-techniques.md §2.7).
pub fn gated_continuations(
    tokens: &[u16],
    orders: &[usize],
    gate: impl Fn(usize, u32, u32) -> bool,
) -> Continuations {
    let mut out = Continuations::none(tokens.len());
    let highest = orders.iter().copied().max().unwrap_or(0);
    let (mut windows, _) = Windows::of_tokens(tokens);
    let mut stepper = Stepper::default();
    // Context widths in ascending order: a higher order overwrites a lower one.
    for width in 1..highest {
        let order = width + 1;
        // The context windows' classes, kept before the step replaces them with the
        // next width's: the step's ranks are those of the continuations.
        let contexts = orders
            .contains(&order)
            .then(|| (windows.ends.clone(), windows.class.clone()));
        stepper.extend(&mut windows, Prefix::Token(tokens), |pairs| {
            if let Some((ends, class)) = contexts {
                let gate = |top: &Top| top.seen > 0 && gate(order, top.count, top.seen);
                walk(tokens, &ends, &class, &pairs, order as u8, gate, &mut out);
            }
        });
        if windows.ends.is_empty() {
            break;
        }
    }
    out
}

/// One width's walk: each context's occurrences in stream order, its running top read
/// before and updated after each. One core walks it: the contexts' states are split
/// among cores easily, but neighbouring positions belong to different contexts, and
/// cores writing neighbouring positions made it slower, not faster.
fn walk(
    tokens: &[u16],
    ends: &[u32],
    class: &[u32],
    pairs: &Ranks<'_>,
    order: u8,
    gate: impl Fn(&Top) -> bool,
    out: &mut Continuations,
) {
    let classes = class
        .iter()
        .filter(|&&c| c != SINGLETON)
        .max()
        .map_or(0, |&c| c as usize + 1);
    let mut state = vec![Top::default(); classes];
    let mut next_pair = 0;
    for (&end, &class) in ends.iter().zip(class) {
        let p = end as usize;
        if class == SINGLETON || p >= tokens.len() {
            continue;
        }
        let top = &mut state[class as usize];
        if gate(top) {
            out.token[p] = top.token;
            out.top[p] = top.count;
            out.seen[p] = top.seen;
            out.order[p] = order;
        }
        // The continuation's count so far: equal (context, token) windows before this
        // one, which ends one token later; an end the step did not list occurs once.
        while next_pair < pairs.ends.len() && (pairs.ends[next_pair] as usize) < p + 1 {
            next_pair += 1;
        }
        let earlier = match pairs.ends.get(next_pair) {
            Some(&e) if e as usize == p + 1 => pairs.ranks[next_pair],
            _ => 0,
        };
        top.seen += 1;
        if earlier + 1 > top.count {
            top.count = earlier + 1;
            top.token = tokens[p];
        }
    }
}

/// One context's running top: the continuation that first reached the highest count.
#[derive(Debug, Default, Clone, Copy)]
struct Top {
    seen: u32,
    count: u32,
    token: u16,
}

#[cfg(test)]
mod tests;
