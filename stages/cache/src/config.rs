//! The engine's configurations, checked once. A [`Valid`] configuration can only be made
//! by `validated()`, so the entry points that take one (building tables, the causal and
//! normalised passes, the mass audit's candidates) never check it again and cannot fail.

use std::ops::Deref;

use serde::{Deserialize, Serialize};

use crate::hash::NGRAM_PRIMES;
use crate::ngram::NgramConfig;
use crate::phrase::{PhraseConfig, MAX_PHRASE_LENGTH};

/// Which tables and lookups the cache uses (`docs/honest-modes.md`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// algorithm.md as the record ran it: tables over all positions, leave-one-out.
    Reference,
    /// Each position looked up in tables of the positions before it, then added.
    Causal,
    /// Causal, with the order chosen by the context alone and exact next-token counts of
    /// that context as the cache's distribution: the blend sums to 1 over the vocabulary.
    CausalNormalised,
}

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

pub(crate) fn check_buckets(what: &'static str, value: usize) -> Result<(), ConfigError> {
    if value > MAX_BUCKETS {
        Err(ConfigError::TooManyBuckets { what, value })
    } else if !value.is_power_of_two() {
        Err(ConfigError::NotPowerOfTwo { what, value })
    } else {
        Ok(())
    }
}

/// A configuration that passed its checks; read it through `Deref`.
#[derive(Debug, Clone, PartialEq)]
pub struct Valid<C>(C);

impl<C> Deref for Valid<C> {
    type Target = C;

    fn deref(&self) -> &C {
        &self.0
    }
}

impl NgramConfig {
    /// This configuration, checked: orders within 2..=16, a power-of-two bucket count
    /// a table can hold.
    pub fn validated(self) -> Result<Valid<NgramConfig>, ConfigError> {
        if self.min_order < 2
            || self.max_order > NGRAM_PRIMES.len()
            || self.min_order > self.max_order
        {
            return Err(ConfigError::Orders {
                min: self.min_order,
                max: self.max_order,
            });
        }
        check_buckets("ngram buckets", self.buckets)?;
        Ok(Valid(self))
    }
}

impl PhraseConfig {
    /// This configuration, checked: lengths non-empty, distinct, in 1..=4096 and longest
    /// first, and a power-of-two bucket count a table can hold.
    pub fn validated(self) -> Result<Valid<PhraseConfig>, ConfigError> {
        let descending = self.lengths.windows(2).all(|w| w[0] > w[1]);
        let too_long = self.lengths.iter().any(|&l| l > MAX_PHRASE_LENGTH);
        if self.lengths.is_empty() || !descending || self.lengths.contains(&0) || too_long {
            return Err(ConfigError::PhraseLengths(self.lengths));
        }
        check_buckets("phrase buckets", self.buckets)?;
        Ok(Valid(self))
    }
}
