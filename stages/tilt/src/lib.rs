//! The legal n-gram tilt (docs/eval-techniques.md §1), the technique that replaced
//! CacheMoney's cache: from the prefix alone, a hashed 15-token context proposes one hint
//! token; when the context's past continuations agree strongly enough, the hint's logit
//! gets a boost and the distribution is renormalised exactly. Causal, normalised and
//! independent of the target.
//!
//! [`kernel`] computes the hints exactly as #2135 does, partitioned by context key;
//! [`tilt`] applies one; [`hints`] and `stage` (`tilt`) are the stage adapters.

pub mod hints;
pub mod kernel;
mod stage;
pub mod tilt;

pub use hints::{HintsParams, HintsStage, HINTS_TABLE};
pub use stage::{TiltParams, TiltReport, TiltStage, TILTED_TABLE};
