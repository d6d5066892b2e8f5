//! Aiming a replace re-run at a tilt chain's hints.
//!
//! A scorer may read the target only where a hint fires: give the hint almost all the
//! mass when it is the target and none when it is not, its rows normalised, `hint_p`
//! taken from the same row (the red team's hint oracle, docs/legality.md). Each row it
//! returns sums to 1, and at a position drawn at random the target's class or token
//! rarely crosses the line that matters to it (the target equal to the hint or not), so
//! a cut at a random position caught it about one time in eight. Aimed, the replace
//! re-run's changed target is a position where the hint fires, and the new target
//! crosses that line: it becomes the hint when the original was not, and is never the
//! hint when the original was. Its hidden targets, where the hint fires, are the hint
//! half the time ([`HINT_SHARE`]), so that the blind probe's proposal puts its weight
//! where such a scorer puts the mass it invents.
//!
//! The hints are the original stream's. At the changed target they are the re-run's too
//! (its prefix is kept, and hints read only the prefix); at hidden targets later on they
//! are a guess, which leaves the blind estimate unbiased (the weight divides by the
//! proposal the token was drawn from) and makes it sharp where the guess is right.

use std::path::Path;

use arrow::datatypes::{Float32Type, UInt16Type};
use stage_api::{read_column, StageError};

/// The share of the blind proposal given to the hint where it fires.
pub const HINT_SHARE: f64 = 0.5;

/// A chain's hints on the original stream: one table serves every cut, each with the
/// gate it inherited (`CutParams::hint_threshold`).
#[derive(Debug, Clone, PartialEq)]
pub struct Hints {
    /// Per target (target t at index t − 1): the hint and its context's share.
    hint: Vec<u16>,
    share: Vec<f32>,
}

impl Hints {
    pub fn new(hint: Vec<u16>, share: Vec<f32>) -> Hints {
        assert_eq!(hint.len(), share.len(), "a share per hint");
        Hints { hint, share }
    }

    /// A hints table (`hint`, `share`) for a stream of `tokens` tokens.
    pub fn read(path: &Path, tokens: usize) -> Result<Hints, StageError> {
        let hint = read_column::<UInt16Type>(path, "hint")?;
        let share = read_column::<Float32Type>(path, "share")?;
        if hint.len() + 1 != tokens || share.len() != hint.len() {
            return Err(StageError::input(
                path,
                format!(
                    "{} hints for {} val targets: another stream's",
                    hint.len(),
                    tokens.saturating_sub(1)
                ),
            ));
        }
        Ok(Hints::new(hint, share))
    }

    /// The hint of target `t` (1-based) where it fires: its share is above 0 and at least
    /// `threshold` (the tilt's; 0 where the chain has no tilt, so every hint counts).
    pub fn firing(&self, t: usize, threshold: f32) -> Option<u16> {
        let i = t.checked_sub(1)?;
        let share = *self.share.get(i)?;
        (share > 0.0 && share >= threshold).then(|| self.hint[i])
    }
}
