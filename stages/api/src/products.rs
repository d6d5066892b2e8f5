//! The products a chain's stages hand each other, named once: a pass-1 table, the
//! cache's matches, the calibrated blend, the per-entry scores, the mass audit, a tilt's
//! hints, the legality verdicts. Producers declare their outputs under these names, the
//! consumers (the next stage of a chain, `compare`, `report`, the legality probes' re-runs)
//! find them by these names, and each product's columns are what any consumer may rely
//! on: every stage that declares an output of a product's name declares at least its
//! columns (checked over every registered stage by the runner's registry).

use crate::spec::{Output, Produced, Read};

/// A table (or file) by the name every producer writes it under, with the columns that
/// make a table this product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Product {
    pub name: &'static str,
    /// The columns every producer declares (stored, or derived in SQL).
    pub columns: &'static [&'static str],
    /// A file (JSON), not a table.
    pub is_file: bool,
}

impl Product {
    const fn table(name: &'static str, columns: &'static [&'static str]) -> Product {
        Product {
            name,
            columns,
            is_file: false,
        }
    }

    const fn file(name: &'static str) -> Product {
        Product {
            name,
            columns: &[],
            is_file: true,
        }
    }

    /// A stage's read of some of its columns (a file is read whole).
    pub const fn read(self, columns: &'static [&'static str]) -> Read {
        match self.is_file {
            true => Read::file(self.name),
            false => Read::table(self.name, columns),
        }
    }

    /// What `output`, declared under this product's name, lacks of it: a table instead of
    /// a file (or the reverse), or columns it does not declare.
    pub fn lacks(&self, output: &Output) -> Option<String> {
        match (&output.what, self.is_file) {
            (Produced::File { .. }, true) => None,
            (Produced::Table(declared), false) => {
                let missing: Vec<&str> = self
                    .columns
                    .iter()
                    .copied()
                    .filter(|c| !declared.iter().any(|d| d.name == *c))
                    .collect();
                (!missing.is_empty()).then(|| format!("no column {}", missing.join(", ")))
            }
            (_, true) => Some("a table, not a file".into()),
            (_, false) => Some("a file, not a table".into()),
        }
    }

    /// The product named `name`, if it is one.
    pub fn named(name: &str) -> Option<Product> {
        ALL.iter().copied().find(|p| p.name == name)
    }
}

/// The val tokens (and their UTF-8 byte counts) a chain scores.
pub const VAL: Product = Product::table("val", &["token", "bytes"]);
/// Per-entry model probabilities: where a chain starts (and where a tilt chain ends).
pub const PASS1: Product = Product::table("pass1", &["position", "model_p", "entropy", "bytes"]);
/// The model's whole distributions at sampled positions.
pub const DISTRIBUTIONS: Product =
    Product::table("distributions", &["position", "candidate", "model_p"]);
/// The cache's per-position matches.
pub const MATCHES: Product = Product::table(
    "matches",
    &[
        "position",
        "ngram_order",
        "ngram_context",
        "ngram_full",
        "phrase_length",
        "phrase_context",
        "phrase_full",
    ],
);
/// The calibration grid, a row per point (and rank).
pub const GRID: Product = Product::table(
    "grid",
    &[
        "rank",
        "alpha_high",
        "entropy_thresh",
        "objective_nats",
        "chosen",
    ],
);
/// The calibrated blend.
pub const CALIBRATION: Product = Product::file("calibration.json");
/// Per-entry scores with `bits` and `bytes`: where a cache chain ends.
pub const SCORES: Product = Product::table("scores", &["position", "bits", "bytes"]);
/// The implied-mass audit, a row per sampled position.
pub const MASS: Product = Product::table("mass", &["position", "mass"]);
/// A tilt's per-target hints.
pub const HINTS: Product = Product::table("hints", &["position", "hint", "share"]);
/// A legality node's verdicts.
pub const LEGALITY: Product = Product::table("legality", &["chain", "probe", "verdict"]);
/// A training run's per-step log.
pub const TRAIN_LOG: Product = Product::table("train_log", &["step", "loss", "val_bpb"]);

/// Every product.
pub const ALL: &[Product] = &[
    VAL,
    PASS1,
    DISTRIBUTIONS,
    MATCHES,
    GRID,
    CALIBRATION,
    SCORES,
    MASS,
    HINTS,
    LEGALITY,
    TRAIN_LOG,
];
