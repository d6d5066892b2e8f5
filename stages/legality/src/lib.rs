//! Is this number legal? The probes of the criteria Parameter Golf's reviewers converged
//! on (openai/parameter-golf issue #1017), run on any chain as a black box, re-run on
//! streams perturbed at secret cuts ([`perturb`]: a shuffle, and a replace that hides
//! targets drawn from a proposal):
//!
//! - **C1 prefix** (covers C3 and C4 in practice): every entry up to a cut bit-identical;
//! - **C1 target:** the distribution does not move when only its target changes;
//! - **C2 normalised:** every distribution returned in any run sums to 1 and is the one
//!   scored; **C2 blind:** the mass where none was asked for, estimated by p(u)/q(u);
//! - **coverage** (each target once), **bytes** (the challenge's rule) and **sandbox**;
//! - the rest of a reviewer's checklist, as stages of their own whose finding a judge
//!   shows: **overlap** (the val set in the training data) and **artifact** (model and
//!   code against 16,000,000 bytes), in [`checklist`].
//!
//! `stages` is the adapter, `runs` reads a chain's runs, `judge` runs each probe on
//! them; the checks themselves are pure ([`probes`]). docs/legality.md has the why.

pub mod aim;
pub mod checklist;
mod classes;
mod judge;
mod order_finding;
pub mod ordered;
pub mod overlap;
pub mod perturb;
mod perturb_stage;
pub mod probes;
mod proposal;
mod runs;
mod stages;

pub use aim::Hints;
pub use checklist::{ArtifactStage, OverlapStage};
pub use perturb::{cut_position, perturb, perturb_aimed, CutParams, Kind, Perturbed};
pub use perturb_stage::PerturbStage;
pub use probes::{Finding, Verdict, PROBES};
pub use stages::{LegalityParams, LegalityReport, LegalityStage, LEGALITY_TABLE};
