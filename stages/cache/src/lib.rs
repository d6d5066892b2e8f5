//! The CacheMoney cache engine (algorithm.md §5–§8), as pure functions over slices.
//!
//! Given the validation token stream and, per scored entry, the model's probability of
//! the true token and its entropy, the engine builds hashed n-gram (orders 2–16) and
//! phrase (lengths 64/48/32/16) count tables, looks every position up with the record's
//! leave-one-out and target-aware backoff, blends, and calibrates the blend on the first
//! entries. It reproduces the record's own numpy code bit for bit (tested against
//! `tests/fixtures/golden/`, the record's own outputs).
//!
//! What the engine modules deliberately do not know: files, artifacts, manifests, the
//! stages' parameters. The pipeline stages that wrap them (`cache`, `calibrate`, `pass2`,
//! `audit-mass`) are in [`stages`], which only converts: Parquet columns to the engine's
//! slices and back, parameters to the engine's checked configurations ([`config`], once
//! per run), and the engine's figures to a stage report. No engine module imports from
//! [`stages`].

pub mod blend;
pub mod calibrate;
pub mod causal;
pub mod classes;
pub mod config;
pub mod continuations;
pub mod figures;
pub(crate) mod fingerprint;
pub mod hash;
pub mod mass;
pub mod memory;
pub mod ngram;
pub mod normalised;
pub mod numpy_exp;
pub mod partition;
pub mod phrase;
pub mod stages;
pub mod synthetic;
pub mod zeroed;

pub use blend::{BlendParams, Entry};
pub use calibrate::{calibrate, CalibrationGrid, CalibrationResult};
pub use config::{ConfigError, Mode, Valid, MAX_BUCKETS};
pub use ngram::{NgramConfig, NgramMatch, NgramTables};
pub use phrase::{PhraseConfig, PhraseMatch, PhraseTables};
