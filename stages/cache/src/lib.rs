//! The CacheMoney cache engine (algorithm.md §5–§8), as pure functions over slices.
//!
//! Given the validation token stream and, per scored entry, the model's probability of
//! the true token and its entropy, the engine builds hashed n-gram (orders 2–16) and
//! phrase (lengths 64/48/32/16) count tables, looks every position up with the record's
//! leave-one-out and target-aware backoff, blends, and calibrates the blend on the first
//! entries. It reproduces the record's own numpy code bit for bit (tested against
//! `tests/fixtures/golden/`, the record's own outputs).
//!
//! What the engine modules deliberately do not know: files, artifacts, manifests. The
//! pipeline stages that wrap them (`cache`, `calibrate`, `pass2`) are in [`stages`], which
//! only converts between Parquet columns and the engine's slices.

pub mod blend;
pub mod calibrate;
pub mod causal;
pub mod classes;
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

pub use blend::{BlendParams, Entry};
pub use calibrate::{calibrate, CalibrationGrid, CalibrationResult};
pub use ngram::{NgramConfig, NgramMatch, NgramTables};
pub use phrase::{PhraseConfig, PhraseMatch, PhraseTables};

/// Configuration errors, caught before any table is allocated.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("{what} = {value} is not a power of two")]
    NotPowerOfTwo { what: &'static str, value: usize },
    #[error("{what} = {value} is more than {MAX_BUCKETS} (2^31), the most a table can hold: bucket indices are 32-bit and counts are 4 bytes each")]
    TooManyBuckets { what: &'static str, value: usize },
    #[error("n-gram orders {min}..={max} are outside 2..=16 (the record has 16 primes)")]
    Orders { min: usize, max: usize },
    #[error(
        "phrase lengths must be non-empty, distinct, in 1..=4096, listed longest first; got {0:?}"
    )]
    PhraseLengths(Vec<usize>),
}

impl ConfigError {
    /// The stage parameter the error is about, so the pipeline can point at its line.
    pub fn param(&self) -> &'static str {
        match self {
            ConfigError::NotPowerOfTwo { what, .. } | ConfigError::TooManyBuckets { what, .. } => {
                if what.starts_with("ngram") {
                    "ngram_buckets"
                } else {
                    "phrase_buckets"
                }
            }
            ConfigError::Orders { .. } => "ngram_max_order",
            ConfigError::PhraseLengths(_) => "phrase_lengths",
        }
    }
}

/// The most buckets a count table may have: bucket indices are masked 32-bit hashes.
pub const MAX_BUCKETS: usize = 1 << 31;

fn check_buckets(what: &'static str, value: usize) -> Result<(), ConfigError> {
    if value > MAX_BUCKETS {
        Err(ConfigError::TooManyBuckets { what, value })
    } else if !value.is_power_of_two() {
        Err(ConfigError::NotPowerOfTwo { what, value })
    } else {
        Ok(())
    }
}
