//! Is this number legal? The probes of the criteria Parameter Golf's reviewers converged
//! on (openai/parameter-golf issue #1017), run on any chain as a black box:
//!
//! - **C1 prefix invariance** (covers C3 score-before-update and C4 one pass in
//!   practice): the chain is re-run on streams whose suffix after a cut is shuffled
//!   ([`perturb`]), and every entry up to the cut must be bit-identical.
//! - **C1 target independence:** the distribution at a position must not move when
//!   only its target changes: for a model, its whole distribution at the first changed
//!   target of each cut; for a cache rule, the choice the rule makes evaluated with
//!   every candidate as the target (the `audit-mass` node's `states`).
//! - **C2 normalisation:** Σ_v p(v) = 1 and p(v) ≥ 0 where distributions are kept.
//! - **Byte accounting:** the chain's bytes against the challenge's rule.
//!
//! The stages here are adapters; the probes themselves are pure ([`probes`]).

pub mod perturb;
mod perturb_stage;
pub mod probes;
mod stages;

pub use perturb::{cut_position, perturb, CutParams, Kind, Perturbed};
pub use perturb_stage::PerturbStage;
pub use probes::{Finding, Verdict, PROBES};
pub use stages::{LegalityParams, LegalityStage, LEGALITY_TABLE};
