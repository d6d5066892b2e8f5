//! The pipeline stages around the engine, one file each: `cache` (tokens → per-position
//! matches), `calibrate` (pass-1 + matches → grid and chosen blend), `pass2` (→ per-entry
//! scores and the BPB waterfall) and `audit-mass` (the implied-mass audit). This module
//! holds what they share: the cache's parameters, the calibrated blend they hand on, and
//! reading pass-1 entries beside their matches.

mod audit_mass;
mod cache;
mod calibrate;
mod pass2;

pub use audit_mass::{AuditMassParams, AuditMassStage, MassReport};
pub use cache::CacheStage;
pub use calibrate::{CalibrateParams, CalibrateStage};
pub use pass2::{Pass2Params, Pass2Stage, Pass2Summary};

use std::path::Path;

use arrow::datatypes::{Float32Type, Int64Type, UInt16Type, UInt32Type, UInt8Type};
use serde::{Deserialize, Serialize};
use stage_api::products;
use stage_api::{read_column_rows, table_rows, Input, Read, StageContext, StageError};

use crate::blend::{BlendParams, Entry, PreparedBlend};
use crate::config::Valid;
use crate::ngram::{NgramConfig, NgramMatch};
use crate::phrase::{PhraseConfig, PhraseMatch};

pub use crate::config::Mode;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheParams {
    pub mode: Mode,
    pub ngram_min_order: usize,
    pub ngram_max_order: usize,
    pub ngram_buckets: usize,
    pub ngram_min_count: u32,
    pub phrase_lengths: Vec<usize>,
    pub phrase_buckets: usize,
    pub phrase_min_count: u32,
}

impl Default for CacheParams {
    fn default() -> Self {
        let (n, p) = (NgramConfig::default(), PhraseConfig::default());
        CacheParams {
            mode: Mode::Reference,
            ngram_min_order: n.min_order,
            ngram_max_order: n.max_order,
            ngram_buckets: n.buckets,
            ngram_min_count: n.min_count,
            phrase_lengths: p.lengths,
            phrase_buckets: p.buckets,
            phrase_min_count: p.min_count,
        }
    }
}

impl CacheParams {
    /// The engine's two configurations, checked: converted from the parameters here
    /// and nowhere else.
    fn configs(&self) -> Result<(Valid<NgramConfig>, Valid<PhraseConfig>), crate::ConfigError> {
        let ngram = NgramConfig {
            min_order: self.ngram_min_order,
            max_order: self.ngram_max_order,
            buckets: self.ngram_buckets,
            min_count: self.ngram_min_count,
        };
        let phrase = PhraseConfig {
            lengths: self.phrase_lengths.clone(),
            buckets: self.phrase_buckets,
            min_count: self.phrase_min_count,
        };
        Ok((ngram.validated()?, phrase.validated()?))
    }
}

// What the stages read from their inputs, declared once (see `stage_api::StageSpec`).
const VAL_TOKENS: Read = products::VAL.read(&["token", "bytes"]);
const PASS1: Read = products::PASS1.read(&["position", "model_p", "entropy", "bytes"]);
const MATCHES: Read = Read::table(
    "matches",
    &[
        "ngram_order",
        "ngram_context",
        "ngram_full",
        "phrase_length",
        "phrase_context",
        "phrase_full",
    ],
);
const CACHE_CONFIG: Read = Read::file("cache.json");
const CALIBRATION: Read = products::CALIBRATION.read(&[]);

/// The inputs of a stage downstream of calibration (`pass2`, `audit-mass`).
const CHAIN_INPUTS: [Input; 4] = [
    Input::required("tokens", &[VAL_TOKENS]),
    Input::required("pass1", &[PASS1]),
    Input::required("cache", &[MATCHES, CACHE_CONFIG]),
    Input::required("calibration", &[CALIBRATION]),
];

/// Pass-1 entries and the cache's per-position matches, as columns; an [`Entry`] is
/// assembled only when needed, so that a 62M-entry run never holds all entries at once.
/// It may hold only some rows of pass 1 (see [`load_rows`]), with the matches of just
/// the positions they score.
struct Scored {
    /// Target positions: u32 rather than the table's i64, a quarter GB less at 62M rows
    /// (positions are checked to fit, as indices into the matches, on loading).
    position: Vec<u32>,
    model_p: Vec<f32>,
    entropy: Vec<f32>,
    bytes: Vec<u8>,
    matches: MatchColumns,
}

impl Scored {
    fn len(&self) -> usize {
        self.position.len()
    }

    /// Entry `row` (of the rows held) with the matches at its target position.
    fn entry(&self, row: usize) -> Entry {
        let (ngram, phrase) = self.matches.at(self.position[row] as usize);
        Entry {
            model_p: self.model_p[row],
            entropy: self.entropy[row],
            ngram,
            phrase,
        }
    }

    fn entries(&self, rows: std::ops::Range<usize>) -> Vec<Entry> {
        rows.map(|row| self.entry(row)).collect()
    }
}

/// A range of positions of a `matches` table (the cache stage's), column by column:
/// the one reader of it for the stages that blend (calibrate, pass2) and the audit.
struct MatchColumns {
    /// The first position held.
    offset: usize,
    ngram_order: Vec<u8>,
    ngram_context: Vec<u32>,
    ngram_full: Vec<u32>,
    phrase_length: Vec<u16>,
    phrase_context: Vec<u32>,
    phrase_full: Vec<u32>,
}

impl MatchColumns {
    /// Positions `held` (clipped to the table) of the matches table at `path`, read from
    /// only the row groups that hold them.
    fn read(path: &std::path::Path, held: std::ops::Range<usize>) -> Result<Self, StageError> {
        Ok(MatchColumns {
            offset: held.start,
            ngram_order: read_column_rows::<UInt8Type>(path, "ngram_order", held.clone())?,
            ngram_context: read_column_rows::<UInt32Type>(path, "ngram_context", held.clone())?,
            ngram_full: read_column_rows::<UInt32Type>(path, "ngram_full", held.clone())?,
            phrase_length: read_column_rows::<UInt16Type>(path, "phrase_length", held.clone())?,
            phrase_context: read_column_rows::<UInt32Type>(path, "phrase_context", held.clone())?,
            phrase_full: read_column_rows::<UInt32Type>(path, "phrase_full", held)?,
        })
    }

    /// The matches at `position` (one of those held).
    fn at(&self, position: usize) -> (NgramMatch, PhraseMatch) {
        let i = position - self.offset;
        (
            NgramMatch {
                order: self.ngram_order[i],
                context: self.ngram_context[i],
                full: self.ngram_full[i],
            },
            PhraseMatch {
                length: self.phrase_length[i],
                context: self.phrase_context[i],
                full: self.phrase_full[i],
            },
        )
    }
}

/// Pass-1 rows `rows` (clipped to the table) and the matches of the positions they
/// score, read from only the row groups that hold them.
fn load_rows(ctx: &StageContext, rows: std::ops::Range<usize>) -> Result<Scored, StageError> {
    let pass1 = ctx.input("pass1")?.file("pass1.parquet");
    let matches = ctx.input("cache")?.file("matches.parquet");
    let position = read_column_rows::<Int64Type>(&pass1, "position", rows.clone())?;
    let entropy = read_column_rows::<Float32Type>(&pass1, "entropy", rows.clone())?;
    let positions = table_rows(&matches)? as i64;
    for (i, (&p, &h)) in position.iter().zip(&entropy).enumerate() {
        let row = rows.start + i;
        if p < 1 || p >= positions {
            return Err(StageError::input(
                &pass1,
                format!("row {row}: position {p} is outside the cached val stream's targets 1..{} (pass-1 and cache come from different val tokens?)", positions - 1),
            ));
        }
        if !h.is_finite() {
            return Err(StageError::input(
                &pass1,
                format!("row {row}: entropy is {h}"),
            ));
        }
    }
    // Checked above to be in 1..positions, and a matches table has fewer than 2^32 rows
    // (the cache stage's tables index positions with u32).
    let position: Vec<u32> = position.into_iter().map(|p| p as u32).collect();
    let (first, last) = position.iter().fold((usize::MAX, 0), |(lo, hi), &p| {
        (lo.min(p as usize), hi.max(p as usize))
    });
    let held = first.min(last)..last + 1;
    Ok(Scored {
        model_p: read_column_rows::<Float32Type>(&pass1, "model_p", rows.clone())?,
        bytes: read_column_rows::<UInt8Type>(&pass1, "bytes", rows)?,
        position,
        entropy,
        matches: MatchColumns::read(&matches, held)?,
    })
}

/// What `calibrate` hands to `pass2`: every blend parameter, calibrated ones included.
/// The top-level pair is rank 0's (the only one when there is one rank); `ranks` has
/// every rank's pair and the pass-1 rows it scores.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Calibration {
    pub alpha_high: f64,
    pub entropy_thresh: f64,
    pub alpha_low: f64,
    pub phrase_base_alpha: f64,
    pub min_order: usize,
    pub max_order: usize,
    pub phrase_min_length: usize,
    pub phrase_max_length: usize,
    pub objective_nats: f64,
    pub entries: usize,
    pub ranks: Vec<RankCalibration>,
}

/// One rank's calibration (§8): its rows of pass 1, the pair it chose on its own first
/// `entries` rows, and that pair's objective.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RankCalibration {
    pub rank: usize,
    pub first_row: usize,
    pub rows: usize,
    pub alpha_high: f64,
    pub entropy_thresh: f64,
    pub objective_nats: f64,
    pub entries: usize,
}

impl Calibration {
    /// Each rank's pass-1 rows and the blend it scores them with.
    pub fn rank_blends(&self) -> RankBlends {
        RankBlends(
            self.ranks
                .iter()
                .map(|r| {
                    (
                        r.first_row + r.rows,
                        self.blend_with(r.alpha_high, r.entropy_thresh).prepared(),
                    )
                })
                .collect(),
        )
    }

    fn blend_with(&self, alpha_high: f64, entropy_thresh: f64) -> BlendParams {
        BlendParams {
            alpha_high,
            entropy_thresh,
            alpha_low: self.alpha_low,
            phrase_base_alpha: self.phrase_base_alpha,
            min_order: self.min_order,
            max_order: self.max_order,
            phrase_min_length: self.phrase_min_length,
            phrase_max_length: self.phrase_max_length,
            ..BlendParams::default()
        }
    }
}

/// The blends of a calibration's ranks, by the pass-1 rows they score.
pub struct RankBlends(Vec<(usize, PreparedBlend)>);

impl RankBlends {
    /// How many pass-1 rows the ranks cover (all of pass 1, for a matching calibration).
    pub fn rows(&self) -> usize {
        self.0.last().map_or(0, |(end, _)| *end)
    }

    /// The blend of the rank that scores pass-1 row `row` (the last rank's past the end).
    pub fn for_row(&self, row: usize) -> &PreparedBlend {
        let rank = self.0.partition_point(|&(end, _)| end <= row);
        &self.0[rank.min(self.0.len() - 1)].1
    }
}

/// Pass 1's table and its row count, refusing an empty one.
fn pass1_rows(ctx: &StageContext) -> Result<(std::path::PathBuf, usize), StageError> {
    let pass1 = ctx.input("pass1")?.file("pass1.parquet");
    let rows = table_rows(&pass1)?;
    if rows == 0 {
        return Err(StageError::input(&pass1, "the pass-1 table is empty"));
    }
    Ok((pass1, rows))
}

/// The calibrated blend, from the `calibration` input's `calibration.json`.
fn calibration_of(ctx: &StageContext) -> Result<Calibration, StageError> {
    let path = ctx.input("calibration")?.file("calibration.json");
    let bytes = std::fs::read(&path).map_err(|e| StageError::io(&path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| StageError::format(&path, e))
}

/// The configuration the cache stage ran with, from its `cache.json`.
fn cache_params_of(ctx: &StageContext) -> Result<CacheParams, StageError> {
    let path = ctx.input("cache")?.file("cache.json");
    let bytes = std::fs::read(&path).map_err(|e| StageError::io(&path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| StageError::format(&path, e))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), StageError> {
    let text = serde_json::to_vec_pretty(value).expect("serialisable");
    std::fs::write(path, text)
        .and_then(|_| std::fs::File::open(path)?.sync_all())
        .map_err(|e| StageError::io(path, e))
}
