//! Token classes, as a gate on the target would see them: the perturbations change the
//! target after a cut to the other class, so that a target-gated channel flips there
//! (see [`crate::perturb`]).

use text::sentencepiece::ByteTable;

/// Each token's class, as a gate on the target would see it: 0 a boundary, 1 a word
/// start, 2 a word's continuation.
#[derive(Debug, Clone)]
pub struct Classes(pub(crate) Vec<u8>);

/// GPT-2's printable stand-in for the space byte, which begins a byte-level BPE
/// piece that starts a word.
const BPE_SPACE: char = '\u{0120}';

impl Classes {
    /// From a tokens artifact's vocabulary: a word starts with a SentencePiece leading
    /// space (`has_leading_space`) or with a byte-level BPE piece's space.
    pub fn new(rule: &ByteTable, pieces: &[String]) -> Classes {
        Classes(
            (0..rule.base_bytes.len())
                .map(|t| {
                    let space = rule.has_leading_space[t]
                        || pieces.get(t).is_some_and(|p| p.starts_with(BPE_SPACE));
                    match (rule.is_boundary[t], space) {
                        (true, _) => 0,
                        (false, true) => 1,
                        (false, false) => 2,
                    }
                })
                .collect(),
        )
    }

    pub fn vocab(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn of(&self, token: u16) -> u8 {
        self.0[token as usize]
    }

    /// Whether `token` is of the class a changed target takes in place of `original`'s:
    /// a word's continuation for a word start and the other way round (the line a gate on
    /// the target's class draws), any word token for a boundary. Never a boundary: a
    /// control token in running text would give a re-run away.
    pub(crate) fn flipped(&self, original: u16, token: u16) -> bool {
        match (self.of(original), self.of(token)) {
            (_, 0) => false,
            (0, _) => true,
            (a, b) => a != b,
        }
    }
}
