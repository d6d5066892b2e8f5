//! The orders in which a scorer may take the val stream's documents.
//!
//! The criteria speak of "the prefix", which presumes one order. Real scorers have used
//! two at once: #2135 (the challenge's top row) builds its n-gram hints in stream order
//! and trains and scores documents longest first (docs/eval-techniques.md §5.4). Under
//! either order alone some score depends on a later token; no target ever sees its own.
//! A scorer declares the order of each of its components, and the legality probes test
//! prefix invariance in the orders declared (a score may depend on what comes before it
//! in *some* declared order, never on what comes after it in *every* one).
//!
//! Within a document every order is stream order: only documents are reordered.

use serde::{Deserialize, Serialize};

/// One component's order over the val documents (runs of one value of the `doc` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DocumentOrder {
    /// As they come.
    Stream,
    /// The longest document first; equal lengths in stream order (#2135's batches).
    LongestFirst,
}

impl DocumentOrder {
    pub fn name(self) -> &'static str {
        match self {
            DocumentOrder::Stream => "stream",
            DocumentOrder::LongestFirst => "longest_first",
        }
    }

    /// Each position's rank in this order (`doc` holds each token's document; a
    /// document is a run of one value). `None` for stream order, whose rank is the
    /// position itself: a table of 62M ranks is not built to say so.
    pub fn ranks(self, doc: &[u32]) -> Option<Vec<u32>> {
        match self {
            DocumentOrder::Stream => None,
            DocumentOrder::LongestFirst => {
                assert!(doc.len() < u32::MAX as usize, "positions fit u32");
                let mut runs: Vec<(usize, usize)> = Vec::new();
                let mut start = 0;
                for p in 1..=doc.len() {
                    if p == doc.len() || doc[p] != doc[start] {
                        runs.push((start, p));
                        start = p;
                    }
                }
                // Stable: equal lengths keep stream order.
                runs.sort_by_key(|&(a, b)| std::cmp::Reverse(b - a));
                let mut ranks = vec![0u32; doc.len()];
                let mut next = 0u32;
                for (a, b) in runs {
                    for rank in &mut ranks[a..b] {
                        *rank = next;
                        next += 1;
                    }
                }
                Some(ranks)
            }
        }
    }
}

/// The distinct orders of a declaration (component → order), stream order standing for
/// an empty one.
pub fn declared_orders<'a>(
    declared: impl IntoIterator<Item = &'a DocumentOrder>,
) -> Vec<DocumentOrder> {
    let mut orders: Vec<DocumentOrder> = declared.into_iter().copied().collect();
    orders.sort_unstable();
    orders.dedup();
    if orders.is_empty() {
        orders.push(DocumentOrder::Stream);
    }
    orders
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_first_ranks_documents_by_length_then_stream_order() {
        // Documents 7 (2 tokens), 8 (3), 9 (2), 10 (3).
        let doc = [7, 7, 8, 8, 8, 9, 9, 10, 10, 10];
        let ranks = DocumentOrder::LongestFirst.ranks(&doc).unwrap();
        assert_eq!(ranks, vec![6, 7, 0, 1, 2, 8, 9, 3, 4, 5]);
        assert_eq!(DocumentOrder::Stream.ranks(&doc), None);
    }

    #[test]
    fn a_declaration_is_its_distinct_orders() {
        use DocumentOrder::*;
        assert_eq!(declared_orders(&[]), vec![Stream]);
        assert_eq!(
            declared_orders(&[LongestFirst, Stream, LongestFirst]),
            vec![Stream, LongestFirst]
        );
        let parsed: std::collections::BTreeMap<String, DocumentOrder> =
            serde_json::from_str(r#"{"hints": "stream", "ttt": "longest_first"}"#).unwrap();
        assert_eq!(parsed["ttt"], LongestFirst);
    }
}
