//! The pipeline stages around the engine: `cache` (tokens → per-position matches),
//! `calibrate` (pass-1 + matches → grid and chosen blend), `pass2` (→ per-entry scores and
//! the BPB waterfall).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    ArrayRef, BooleanArray, Float32Array, Float64Array, Int64Array, RecordBatch, StringArray,
    UInt16Array, UInt32Array, UInt64Array, UInt8Array,
};
use arrow::datatypes::{
    DataType, Field, Float32Type, Int64Type, Schema, UInt16Type, UInt32Type, UInt8Type,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use stage_api::{
    canonicalize, read_column, write_parquet, write_parquet_parallel, ParquetLayout, Stage,
    StageContext, StageError, StageReport,
};

use crate::blend::{BlendParams, Entry, PROBABILITY_FLOOR};
use crate::calibrate::{calibrate, CalibrationGrid};
use crate::ngram::{NgramConfig, NgramMatch, NgramTables};
use crate::phrase::{PhraseConfig, PhraseMatch, PhraseTables};

/// Which tables and lookups the cache uses (`spec/honest-modes.md`).
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
    fn ngram(&self) -> NgramConfig {
        NgramConfig {
            min_order: self.ngram_min_order,
            max_order: self.ngram_max_order,
            buckets: self.ngram_buckets,
            min_count: self.ngram_min_count,
        }
    }

    fn phrase(&self) -> PhraseConfig {
        PhraseConfig {
            lengths: self.phrase_lengths.clone(),
            buckets: self.phrase_buckets,
            min_count: self.phrase_min_count,
        }
    }
}

fn param_error(node: &str, message: impl std::fmt::Display) -> StageError {
    StageError::Param {
        node: node.to_string(),
        message: message.to_string(),
    }
}

fn invalid_params(message: impl std::fmt::Display) -> StageError {
    StageError::InvalidParams(message.to_string())
}

pub struct CacheStage;

impl Stage for CacheStage {
    fn kind(&self) -> &'static str {
        "cache"
    }

    fn version(&self) -> u32 {
        2
    }

    fn summary(&self) -> &'static str {
        "val tokens -> per-position n-gram and phrase matches, per-order statistics"
    }

    fn canonical_params(&self, raw: &Value) -> Result<Value, StageError> {
        let canonical = canonicalize::<CacheParams>(raw)?;
        let params: CacheParams = serde_json::from_value(canonical.clone()).unwrap();
        params.ngram().validate().map_err(invalid_params)?;
        params.phrase().validate().map_err(invalid_params)?;
        Ok(canonical)
    }

    fn input_names(&self) -> &'static [&'static str] {
        &["tokens"]
    }

    fn run(&self, ctx: &StageContext) -> Result<StageReport, StageError> {
        let params: CacheParams = ctx.params_as()?;
        let tokens = read_column::<UInt16Type>(&ctx.input("tokens")?.file("val.parquet"), "token")?;
        ctx.check_memory(
            crate::memory::cache_stage_peak_bytes(
                params.mode,
                tokens.len() as u64,
                &params.ngram(),
                &params.phrase(),
                rayon::current_num_threads() as u64,
            ),
            &format!(
                "the {:?} cache over {} tokens with ngram_buckets = {} and phrase_buckets = {}",
                params.mode,
                tokens.len(),
                params.ngram_buckets,
                params.phrase_buckets
            ),
        )?;
        let mut report = StageReport::default();
        let node_error = |e: crate::ConfigError| param_error(&ctx.node, e);
        // Either tables to look positions up in (reference), or all lookups at once
        // (causal, where a lookup is part of the single pass that builds the tables).
        let (reference, causal) = match params.mode {
            Mode::Reference => {
                let started = Instant::now();
                let ngram = NgramTables::build(&tokens, &params.ngram()).map_err(node_error)?;
                report.phase("ngram_build", started);
                let started = Instant::now();
                let phrase = PhraseTables::build(&tokens, &params.phrase()).map_err(node_error)?;
                report.phase("phrase_build", started);
                (Some((ngram, phrase)), None)
            }
            Mode::Causal => {
                let started = Instant::now();
                let ngram =
                    crate::causal::ngram_lookups(&tokens, &params.ngram()).map_err(node_error)?;
                report.phase("ngram_causal_pass", started);
                let started = Instant::now();
                let phrase =
                    crate::causal::phrase_lookups(&tokens, &params.phrase()).map_err(node_error)?;
                report.phase("phrase_causal_pass", started);
                (None, Some((ngram, phrase)))
            }
            Mode::CausalNormalised => {
                let started = Instant::now();
                let ngram = crate::normalised::ngram_lookups(&tokens, &params.ngram())
                    .map_err(node_error)?;
                report.phase("ngram_exact_pass", started);
                let started = Instant::now();
                let phrase = crate::normalised::phrase_lookups(&tokens, &params.phrase())
                    .map_err(node_error)?;
                report.phase("phrase_exact_pass", started);
                (None, Some((ngram, phrase)))
            }
        };

        // Lookups chunk by chunk, straight into Parquet, so that in reference mode the
        // per-position results are never all in memory at once.
        let started = Instant::now();
        let mut ngram_stats = vec![(0u64, 0f64); params.ngram_max_order + 1];
        let mut phrase_stats =
            vec![(0u64, 0f64); params.phrase_lengths.iter().max().copied().unwrap_or(0) + 1];
        let schema = matches_schema();
        let bar = ctx.progress(tokens.len() as u64, "cache lookups");
        let (ngram_len, phrase_len) = (ngram_stats.len(), phrase_stats.len());
        let per_group = write_parquet_parallel(
            &ctx.output("matches.parquet"),
            schema.clone(),
            tokens.len(),
            &ParquetLayout::delta(&["position"]),
            |range| {
                let (ng, ph) = match (&reference, &causal) {
                    (Some((ngram, phrase)), _) => (
                        ngram.lookup_range(&tokens, range.clone()),
                        phrase.lookup_range(&tokens, range.clone()),
                    ),
                    (_, Some((ngram, phrase))) => (
                        ngram[range.clone()].to_vec(),
                        phrase[range.clone()].to_vec(),
                    ),
                    _ => unreachable!("one mode is set"),
                };
                // Statistics over targets 1..T (position 0 is never scored).
                let mut ngram_part = vec![(0u64, 0f64); ngram_len];
                let mut phrase_part = vec![(0u64, 0f64); phrase_len];
                for (i, (n, p)) in ng.iter().zip(&ph).enumerate() {
                    if range.start + i == 0 {
                        continue;
                    }
                    if n.matched() {
                        ngram_part[n.order as usize].0 += 1;
                        ngram_part[n.order as usize].1 += n.q();
                    }
                    if p.matched() {
                        phrase_part[p.length as usize].0 += 1;
                        phrase_part[p.length as usize].1 += p.q();
                    }
                }
                bar.inc(range.len() as u64);
                Ok((
                    matches_batch(&schema, range.start, &ng, &ph),
                    (ngram_part, phrase_part),
                ))
            },
        )?;
        // Partial sums reduced in row-group order: the same on any number of threads.
        for (ngram_part, phrase_part) in per_group {
            for (total, part) in ngram_stats.iter_mut().zip(ngram_part) {
                total.0 += part.0;
                total.1 += part.1;
            }
            for (total, part) in phrase_stats.iter_mut().zip(phrase_part) {
                total.0 += part.0;
                total.1 += part.1;
            }
        }
        bar.finish_and_clear();
        report.phase("lookups_and_write", started);

        // Per-order and per-length statistics. Bucket occupancy is a property of the
        // finished tables, which only the reference mode keeps; in causal mode it is null.
        let insertions = |width: usize| tokens.len().saturating_sub(width) as f64;
        let used = |table: &[u32]| Some(table.iter().filter(|&&c| c > 0).count() as u64);
        let mut rows = Vec::new();
        let ngram_orders = params.ngram_min_order..=params.ngram_max_order;
        for (order, &(matched, q_sum)) in ngram_stats
            .iter()
            .enumerate()
            .filter(|(o, _)| ngram_orders.contains(o))
        {
            rows.push(StatsRow {
                kind: "ngram",
                size: order as u16,
                matched,
                mean_q: q_sum / matched.max(1) as f64,
                buckets_used: reference
                    .as_ref()
                    .and_then(|(ngram, _)| used(ngram.ctx_table(order))),
                insertions_per_bucket: insertions(order - 1) / params.ngram_buckets as f64,
            });
        }
        let phrase_used = reference.as_ref().and_then(|(_, phrase)| used(&phrase.ctx));
        for &length in &params.phrase_lengths {
            let (matched, q_sum) = phrase_stats[length];
            rows.push(StatsRow {
                kind: "phrase",
                size: length as u16,
                matched,
                mean_q: q_sum / matched.max(1) as f64,
                buckets_used: phrase_used,
                insertions_per_bucket: insertions(length) / params.phrase_buckets as f64,
            });
        }
        write_stats(&ctx.output("cache_stats.parquet"), &rows)?;
        write_json(&ctx.output("cache.json"), &params)?;
        let ngram_matched: u64 = ngram_stats.iter().map(|s| s.0).sum();
        let phrase_matched: u64 = phrase_stats.iter().map(|s| s.0).sum();
        Ok(report
            .with("mode", serde_json::to_value(params.mode).unwrap())
            .with("positions", tokens.len() as u64)
            .with("ngram_matched", ngram_matched)
            .with("phrase_matched", phrase_matched))
    }
}

fn matches_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("position", DataType::Int64, false),
        Field::new("ngram_order", DataType::UInt8, false),
        Field::new("ngram_q", DataType::Float64, false),
        Field::new("ngram_context", DataType::UInt32, false),
        Field::new("ngram_full", DataType::UInt32, false),
        Field::new("phrase_length", DataType::UInt16, false),
        Field::new("phrase_q", DataType::Float64, false),
        Field::new("phrase_context", DataType::UInt32, false),
        Field::new("phrase_full", DataType::UInt32, false),
    ]))
}

fn matches_batch(
    schema: &Arc<Schema>,
    start: usize,
    ng: &[NgramMatch],
    ph: &[PhraseMatch],
) -> RecordBatch {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(
            start as i64..(start + ng.len()) as i64,
        )),
        Arc::new(UInt8Array::from_iter_values(ng.iter().map(|m| m.order))),
        Arc::new(Float64Array::from_iter_values(ng.iter().map(|m| m.q()))),
        Arc::new(UInt32Array::from_iter_values(ng.iter().map(|m| m.context))),
        Arc::new(UInt32Array::from_iter_values(ng.iter().map(|m| m.full))),
        Arc::new(UInt16Array::from_iter_values(ph.iter().map(|m| m.length))),
        Arc::new(Float64Array::from_iter_values(ph.iter().map(|m| m.q()))),
        Arc::new(UInt32Array::from_iter_values(ph.iter().map(|m| m.context))),
        Arc::new(UInt32Array::from_iter_values(ph.iter().map(|m| m.full))),
    ];
    RecordBatch::try_new(schema.clone(), columns).expect("columns match schema")
}

/// One row of `cache_stats`: an n-gram order or a phrase length.
struct StatsRow {
    kind: &'static str,
    size: u16,
    matched: u64,
    mean_q: f64,
    /// Null in causal mode, which keeps no finished tables.
    buckets_used: Option<u64>,
    insertions_per_bucket: f64,
}

fn write_stats(path: &Path, rows: &[StatsRow]) -> Result<u64, StageError> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("kind", DataType::Utf8, false),
        Field::new("size", DataType::UInt16, false),
        Field::new("matched", DataType::UInt64, false),
        Field::new("mean_q", DataType::Float64, false),
        Field::new("buckets_used", DataType::UInt64, true),
        Field::new("insertions_per_bucket", DataType::Float64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.kind))),
        Arc::new(UInt16Array::from_iter_values(rows.iter().map(|r| r.size))),
        Arc::new(UInt64Array::from_iter_values(
            rows.iter().map(|r| r.matched),
        )),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.mean_q),
        )),
        Arc::new(UInt64Array::from_iter(rows.iter().map(|r| r.buckets_used))),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.insertions_per_bucket),
        )),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).expect("columns match schema");
    write_parquet(path, schema, [batch], &ParquetLayout::default())
}

/// Pass-1 entries and the cache's per-position matches, as columns; an [`Entry`] is
/// assembled only when needed, so that a 62M-entry run never holds all entries at once.
struct Scored {
    position: Vec<i64>,
    model_p: Vec<f32>,
    entropy: Vec<f32>,
    bytes: Vec<u8>,
    ngram_order: Vec<u8>,
    ngram_context: Vec<u32>,
    ngram_full: Vec<u32>,
    phrase_length: Vec<u16>,
    phrase_context: Vec<u32>,
    phrase_full: Vec<u32>,
}

impl Scored {
    fn len(&self) -> usize {
        self.position.len()
    }

    /// Entry `row` of pass 1 with the matches at its target position.
    fn entry(&self, row: usize) -> Entry {
        let i = self.position[row] as usize;
        Entry {
            model_p: self.model_p[row],
            entropy: self.entropy[row],
            ngram: NgramMatch {
                order: self.ngram_order[i],
                context: self.ngram_context[i],
                full: self.ngram_full[i],
            },
            phrase: PhraseMatch {
                length: self.phrase_length[i],
                context: self.phrase_context[i],
                full: self.phrase_full[i],
            },
        }
    }

    fn entries(&self, rows: std::ops::Range<usize>) -> Vec<Entry> {
        rows.map(|row| self.entry(row)).collect()
    }
}

fn load_entries(ctx: &StageContext) -> Result<Scored, StageError> {
    let pass1 = ctx.input("pass1")?.file("pass1.parquet");
    let matches = ctx.input("cache")?.file("matches.parquet");
    let scored = Scored {
        position: read_column::<Int64Type>(&pass1, "position")?,
        model_p: read_column::<Float32Type>(&pass1, "model_p")?,
        entropy: read_column::<Float32Type>(&pass1, "entropy")?,
        bytes: read_column::<UInt8Type>(&pass1, "bytes")?,
        ngram_order: read_column::<UInt8Type>(&matches, "ngram_order")?,
        ngram_context: read_column::<UInt32Type>(&matches, "ngram_context")?,
        ngram_full: read_column::<UInt32Type>(&matches, "ngram_full")?,
        phrase_length: read_column::<UInt16Type>(&matches, "phrase_length")?,
        phrase_context: read_column::<UInt32Type>(&matches, "phrase_context")?,
        phrase_full: read_column::<UInt32Type>(&matches, "phrase_full")?,
    };
    if scored.len() == 0 {
        return Err(StageError::input(&pass1, "the pass-1 table is empty"));
    }
    let positions = scored.ngram_order.len() as i64;
    for (row, &p) in scored.position.iter().enumerate() {
        if p < 1 || p >= positions {
            return Err(StageError::input(
                &pass1,
                format!("row {row}: position {p} is outside the cached val stream's targets 1..{} (pass-1 and cache come from different val tokens?)", positions - 1),
            ));
        }
        let h = scored.entropy[row];
        if !h.is_finite() {
            return Err(StageError::input(
                &pass1,
                format!("row {row}: entropy is {h}"),
            ));
        }
    }
    Ok(scored)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalibrateParams {
    pub alpha_high: Vec<f64>,
    pub entropy_thresh: Vec<f64>,
    pub fraction: f64,
    pub minimum: usize,
    pub alpha_low: f64,
    pub phrase_base_alpha: f64,
}

impl Default for CalibrateParams {
    fn default() -> Self {
        let (grid, blend) = (CalibrationGrid::default(), BlendParams::default());
        CalibrateParams {
            alpha_high: grid.alpha_high,
            entropy_thresh: grid.entropy_thresh,
            fraction: grid.fraction,
            minimum: grid.minimum,
            alpha_low: blend.alpha_low,
            phrase_base_alpha: blend.phrase_base_alpha,
        }
    }
}

/// What `calibrate` hands to `pass2`: every blend parameter, calibrated ones included.
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
}

impl Calibration {
    /// The blend `pass2` scores with.
    pub fn blend(&self) -> BlendParams {
        BlendParams {
            alpha_high: self.alpha_high,
            entropy_thresh: self.entropy_thresh,
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

/// The calibrated blend, from the `calibration` input's `calibration.json`.
fn calibration_of(ctx: &StageContext) -> Result<Calibration, StageError> {
    let path = ctx.input("calibration")?.file("calibration.json");
    let bytes = std::fs::read(&path).map_err(|e| StageError::io(&path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| StageError::format(&path, e))
}

pub struct CalibrateStage;

/// The most values per calibration grid axis.
const MAX_GRID_VALUES: usize = 1000;

impl Stage for CalibrateStage {
    fn kind(&self) -> &'static str {
        "calibrate"
    }

    fn version(&self) -> u32 {
        2
    }

    fn summary(&self) -> &'static str {
        "pass-1 + matches -> calibration grid and the chosen blend"
    }

    fn canonical_params(&self, raw: &Value) -> Result<Value, StageError> {
        let canonical = canonicalize::<CalibrateParams>(raw)?;
        let p: CalibrateParams = serde_json::from_value(canonical.clone()).unwrap();
        if p.alpha_high.is_empty() || p.entropy_thresh.is_empty() {
            return Err(invalid_params("the calibration grid is empty"));
        }
        for (param, values) in [
            ("alpha_high", &p.alpha_high),
            ("entropy_thresh", &p.entropy_thresh),
        ] {
            if values.len() > MAX_GRID_VALUES {
                return Err(StageError::invalid_param(
                    param,
                    format!(
                        "{} values are more than {MAX_GRID_VALUES} (each grid point is a pass over the calibration entries)",
                        values.len()
                    ),
                ));
            }
        }
        if !(0.0..=1.0).contains(&p.fraction) {
            return Err(invalid_params(format!(
                "fraction {} is outside 0..=1",
                p.fraction
            )));
        }
        Ok(canonical)
    }

    fn input_names(&self) -> &'static [&'static str] {
        &["pass1", "cache"]
    }

    fn run(&self, ctx: &StageContext) -> Result<StageReport, StageError> {
        let params: CalibrateParams = ctx.params_as()?;
        let scored = load_entries(ctx)?;
        let cache_params = cache_params_of(ctx)?;
        let base = BlendParams {
            alpha_low: params.alpha_low,
            phrase_base_alpha: params.phrase_base_alpha,
            min_order: cache_params.ngram_min_order,
            max_order: cache_params.ngram_max_order,
            phrase_min_length: *cache_params.phrase_lengths.iter().min().unwrap_or(&16),
            phrase_max_length: *cache_params.phrase_lengths.iter().max().unwrap_or(&64),
            ..BlendParams::default()
        };
        let grid = CalibrationGrid {
            alpha_high: params.alpha_high.clone(),
            entropy_thresh: params.entropy_thresh.clone(),
            fraction: params.fraction,
            minimum: params.minimum,
        };
        let mut report = StageReport::default();
        let started = Instant::now();
        // Only the calibration entries are ever assembled.
        let sample = scored.entries(0..grid.calibration_entries(scored.len()));
        let result = calibrate(&sample, &base, &grid);
        report.phase("grid", started);

        let schema = Arc::new(Schema::new(vec![
            Field::new("alpha_high", DataType::Float64, false),
            Field::new("entropy_thresh", DataType::Float64, false),
            Field::new("objective_nats", DataType::Float64, false),
            Field::new("chosen", DataType::Boolean, false),
        ]));
        let is_chosen = |a: f64, e: f64| a == result.alpha_high && e == result.entropy_thresh;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Float64Array::from_iter_values(
                result.points.iter().map(|p| p.alpha_high),
            )),
            Arc::new(Float64Array::from_iter_values(
                result.points.iter().map(|p| p.entropy_thresh),
            )),
            Arc::new(Float64Array::from_iter_values(
                result.points.iter().map(|p| p.objective),
            )),
            Arc::new(BooleanArray::from_iter(
                result
                    .points
                    .iter()
                    .map(|p| Some(is_chosen(p.alpha_high, p.entropy_thresh))),
            )),
        ];
        let batch = RecordBatch::try_new(schema.clone(), columns).expect("columns match schema");
        write_parquet(
            &ctx.output("grid.parquet"),
            schema,
            [batch],
            &ParquetLayout::default(),
        )?;
        let calibration = Calibration {
            alpha_high: result.alpha_high,
            entropy_thresh: result.entropy_thresh,
            alpha_low: base.alpha_low,
            phrase_base_alpha: base.phrase_base_alpha,
            min_order: base.min_order,
            max_order: base.max_order,
            phrase_min_length: base.phrase_min_length,
            phrase_max_length: base.phrase_max_length,
            objective_nats: result.objective,
            entries: result.entries,
        };
        write_json(&ctx.output("calibration.json"), &calibration)?;
        Ok(report
            .with("alpha_high", result.alpha_high)
            .with("entropy_thresh", result.entropy_thresh)
            .with("objective_nats", result.objective)
            .with("calibration_entries", result.entries as u64))
    }
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

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pass2Params {}

pub struct Pass2Stage;

impl Stage for Pass2Stage {
    fn kind(&self) -> &'static str {
        "pass2"
    }

    fn version(&self) -> u32 {
        2
    }

    fn summary(&self) -> &'static str {
        "pass-1 + matches + calibration -> per-entry scores and the BPB waterfall"
    }

    fn canonical_params(&self, raw: &Value) -> Result<Value, StageError> {
        canonicalize::<Pass2Params>(raw)
    }

    fn headline(&self, report: &serde_json::Map<String, Value>) -> Option<String> {
        let get = |k: &str| report.get(k).and_then(Value::as_f64);
        Some(format!(
            "BPB: neural {:.4} → after n-gram {:.4} → final {:.4}  ({} entries, {} bytes; calibrated alpha_high {}, entropy_thresh {})",
            get("neural_bpb")?,
            get("ngram_bpb")?,
            get("final_bpb")?,
            report.get("entries")?,
            report.get("bytes")?,
            report.get("alpha_high")?,
            report.get("entropy_thresh")?
        ))
    }

    fn metrics(&self) -> &'static [&'static str] {
        &["ngram_bpb", "final_bpb", "alpha_high", "entropy_thresh"]
    }

    fn input_names(&self) -> &'static [&'static str] {
        &["tokens", "pass1", "cache", "calibration"]
    }

    fn run(&self, ctx: &StageContext) -> Result<StageReport, StageError> {
        let calibration = calibration_of(ctx)?;
        let blend = calibration.blend();
        let tokens = read_column::<UInt16Type>(&ctx.input("tokens")?.file("val.parquet"), "token")?;
        let scored = load_entries(ctx)?;
        if scored.position.iter().any(|&p| p as usize >= tokens.len()) {
            return Err(StageError::input(
                ctx.input("pass1")?.file("pass1.parquet"),
                "positions beyond the val tokens",
            ));
        }
        let mut report = StageReport::default();
        let started = Instant::now();
        let schema = Arc::new(Schema::new(vec![
            Field::new("position", DataType::Int64, false),
            Field::new("token", DataType::UInt16, false),
            Field::new("model_p", DataType::Float32, false),
            Field::new("p_ngram", DataType::Float64, false),
            Field::new("p_final", DataType::Float64, false),
            Field::new("bits", DataType::Float64, false),
            Field::new("bytes", DataType::UInt8, false),
        ]));
        let n = scored.len();
        // Row groups are blended and encoded in parallel; each returns its partial sums
        // (neural, after n-gram, final NLL in nats; bytes), reduced below in group order.
        let partials = write_parquet_parallel(
            &ctx.output("scores.parquet"),
            schema.clone(),
            n,
            &ParquetLayout::delta(&["position"]),
            |range| {
                let entries = scored.entries(range.clone());
                let blended: Vec<(f64, f64)> = entries.iter().map(|e| blend.blend(e)).collect();
                let (mut neural, mut ngram, mut fin, mut bytes) = (0f64, 0f64, 0f64, 0u64);
                let mut bits = Vec::with_capacity(range.len());
                for ((entry, &(p_ngram, p_final)), &b) in entries
                    .iter()
                    .zip(&blended)
                    .zip(&scored.bytes[range.clone()])
                {
                    neural -= (entry.model_p as f64).max(PROBABILITY_FLOOR).ln();
                    ngram -= p_ngram.max(PROBABILITY_FLOOR).ln();
                    let nll = -p_final.max(PROBABILITY_FLOOR).ln();
                    fin += nll;
                    bytes += b as u64;
                    bits.push(nll / std::f64::consts::LN_2);
                }
                let positions = &scored.position[range.clone()];
                let columns: Vec<ArrayRef> = vec![
                    Arc::new(Int64Array::from(positions.to_vec())),
                    Arc::new(UInt16Array::from_iter_values(
                        positions.iter().map(|&p| tokens[p as usize]),
                    )),
                    Arc::new(Float32Array::from_iter_values(
                        entries.iter().map(|e| e.model_p),
                    )),
                    Arc::new(Float64Array::from_iter_values(blended.iter().map(|b| b.0))),
                    Arc::new(Float64Array::from_iter_values(blended.iter().map(|b| b.1))),
                    Arc::new(Float64Array::from(bits)),
                    Arc::new(UInt8Array::from(scored.bytes[range].to_vec())),
                ];
                let batch =
                    RecordBatch::try_new(schema.clone(), columns).expect("columns match schema");
                Ok((batch, (neural, ngram, fin, bytes)))
            },
        )?;
        let (mut neural_nll, mut ngram_nll, mut final_nll, mut total_bytes) =
            (0f64, 0f64, 0f64, 0u64);
        for (neural, ngram, fin, bytes) in partials {
            neural_nll += neural;
            ngram_nll += ngram;
            final_nll += fin;
            total_bytes += bytes;
        }
        report.phase("blend_and_write", started);
        let per_byte = |nll: f64| nll / (std::f64::consts::LN_2 * total_bytes.max(1) as f64);
        let summary = serde_json::json!({
            "mode": cache_params_of(ctx)?.mode,
            "neural_bpb": per_byte(neural_nll),
            "ngram_bpb": per_byte(ngram_nll),
            "final_bpb": per_byte(final_nll),
            "val_loss_nats": final_nll / n.max(1) as f64,
            "entries": n,
            "bytes": total_bytes,
            "alpha_high": calibration.alpha_high,
            "entropy_thresh": calibration.entropy_thresh,
        });
        write_json(&ctx.output("summary.json"), &summary)?;
        let mut out = report;
        for (key, value) in summary.as_object().unwrap() {
            out = out.with(key, value.clone());
        }
        Ok(out)
    }
}

/// `audit-mass`: the implied-mass audit of one cache chain (see [`crate::mass`]).
pub struct AuditMassStage;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditMassParams {}

impl Stage for AuditMassStage {
    fn kind(&self) -> &'static str {
        "audit-mass"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "pass-1 distributions + cache + calibration -> Σ_v p(v) at the sampled positions, and the BPB renormalised there"
    }

    fn canonical_params(&self, raw: &Value) -> Result<Value, StageError> {
        canonicalize::<AuditMassParams>(raw)
    }

    fn headline(&self, report: &serde_json::Map<String, Value>) -> Option<String> {
        let get = |k: &str| report.get(k).and_then(Value::as_f64);
        Some(format!(
            "implied mass ({}): mean {:.6}, median {:.6}, max {:.6} over {} positions; BPB there {:.4}, renormalised {:.4}",
            report.get("mode")?.as_str()?,
            get("mass_mean")?,
            get("mass_median")?,
            get("mass_max")?,
            report.get("samples")?,
            get("sample_bpb")?,
            get("normalised_sample_bpb")?,
        ))
    }

    fn metrics(&self) -> &'static [&'static str] {
        &["mass_mean", "normalised_sample_bpb"]
    }

    fn input_names(&self) -> &'static [&'static str] {
        &["tokens", "pass1", "cache", "calibration"]
    }

    fn run(&self, ctx: &StageContext) -> Result<StageReport, StageError> {
        let blend = calibration_of(ctx)?.blend();
        let params = cache_params_of(ctx)?;
        let tokens_input = ctx.input("tokens")?;
        let val_path = tokens_input.file("val.parquet");
        let tokens = read_column::<UInt16Type>(&val_path, "token")?;
        let val_bytes = read_column::<UInt8Type>(&val_path, "bytes")?;

        // The sampled distributions, grouped by position.
        let pass1 = ctx.input("pass1")?;
        let dist_path = pass1.file("distributions.parquet");
        if !dist_path.exists() {
            return Err(StageError::input(&dist_path, "missing: this pass-1 kept no distributions (model = \"import\", or mass_sample = 0)"));
        }
        let dist_position = read_column::<Int64Type>(&dist_path, "position")?;
        let dist_p = read_column::<Float32Type>(&dist_path, "model_p")?;
        let mut positions: Vec<usize> = dist_position.iter().map(|&p| p as usize).collect();
        positions.dedup();
        if positions.is_empty() {
            return Err(StageError::input(&dist_path, "no rows: this pass-1 kept no distributions (model = \"import\", or mass_sample = 0)"));
        }
        let vocab = dist_p.len() / positions.len();
        if vocab * positions.len() != dist_p.len()
            || positions.windows(2).any(|w| w[0] >= w[1])
            || positions.iter().any(|&p| p == 0 || p >= tokens.len())
        {
            return Err(StageError::input(
                &dist_path,
                "not one full distribution per sampled val position, sorted by position",
            ));
        }
        // Entropy at each sampled position, from pass-1's own rows.
        let pass1_path = pass1.file("pass1.parquet");
        let entry_position = read_column::<Int64Type>(&pass1_path, "position")?;
        let entry_entropy = read_column::<Float32Type>(&pass1_path, "entropy")?;
        let mut entropy_at = std::collections::HashMap::with_capacity(positions.len());
        for (&p, &h) in entry_position.iter().zip(&entry_entropy) {
            entropy_at.entry(p as usize).or_insert(h);
        }
        let samples: Vec<crate::mass::MassSample> = positions
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                Ok(crate::mass::MassSample {
                    position: p,
                    entropy: *entropy_at.get(&p).ok_or_else(|| {
                        StageError::input(&dist_path, format!("position {p} has no pass-1 entry"))
                    })?,
                    model: &dist_p[i * vocab..(i + 1) * vocab],
                })
            })
            .collect::<Result<_, StageError>>()?;
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(StageError::input(
                &dist_path,
                format!("distributions cover {vocab} tokens, but the val stream has token {bad}"),
            ));
        }

        let mut report = StageReport::default();
        let started = Instant::now();
        let node_error = |e: crate::ConfigError| param_error(&ctx.node, e);
        let candidates = match params.mode {
            Mode::Reference => {
                let ngram = NgramTables::build(&tokens, &params.ngram()).map_err(node_error)?;
                let phrase = PhraseTables::build(&tokens, &params.phrase()).map_err(node_error)?;
                crate::mass::reference_candidates(&tokens, &ngram, &phrase, &positions, vocab)
            }
            Mode::Causal => crate::mass::causal_candidates(
                &tokens,
                &params.ngram(),
                &params.phrase(),
                &positions,
                vocab,
            )
            .map_err(node_error)?,
            Mode::CausalNormalised => {
                let matches_path = ctx.input("cache")?.file("matches.parquet");
                let column = |name: &str| read_column::<UInt32Type>(&matches_path, name);
                let (ngram_context, ngram_full) = (column("ngram_context")?, column("ngram_full")?);
                let (phrase_context, phrase_full) =
                    (column("phrase_context")?, column("phrase_full")?);
                let ngram_order = read_column::<UInt8Type>(&matches_path, "ngram_order")?;
                let phrase_length = read_column::<UInt16Type>(&matches_path, "phrase_length")?;
                let chosen: Vec<(NgramMatch, PhraseMatch)> = positions
                    .iter()
                    .map(|&p| {
                        (
                            NgramMatch {
                                order: ngram_order[p],
                                context: ngram_context[p],
                                full: ngram_full[p],
                            },
                            PhraseMatch {
                                length: phrase_length[p],
                                context: phrase_context[p],
                                full: phrase_full[p],
                            },
                        )
                    })
                    .collect();
                crate::mass::normalised_candidates(&tokens, &positions, &chosen, vocab)
                    .map_err(|m| StageError::input(&matches_path, m))?
            }
        };
        let masses = crate::mass::implied_mass(&tokens, &samples, &candidates, &blend);
        report.phase("candidates", started);

        let ln2 = std::f64::consts::LN_2;
        let bits = |p: f64| -p.max(PROBABILITY_FLOOR).ln() / ln2;
        let schema = Arc::new(Schema::new(vec![
            Field::new("position", DataType::Int64, false),
            Field::new("mass", DataType::Float64, false),
            Field::new("p_target", DataType::Float64, false),
            Field::new("bits", DataType::Float64, false),
            Field::new("bits_normalised", DataType::Float64, false),
            Field::new("bytes", DataType::UInt8, false),
        ]));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(
                masses.iter().map(|m| m.position as i64),
            )),
            Arc::new(Float64Array::from_iter_values(
                masses.iter().map(|m| m.mass),
            )),
            Arc::new(Float64Array::from_iter_values(
                masses.iter().map(|m| m.p_target),
            )),
            Arc::new(Float64Array::from_iter_values(
                masses.iter().map(|m| bits(m.p_target)),
            )),
            Arc::new(Float64Array::from_iter_values(
                masses.iter().map(|m| bits(m.p_target / m.mass)),
            )),
            Arc::new(UInt8Array::from_iter_values(
                masses.iter().map(|m| val_bytes[m.position]),
            )),
        ];
        let batch = RecordBatch::try_new(schema.clone(), columns).expect("columns match schema");
        write_parquet(
            &ctx.output("mass.parquet"),
            schema,
            [batch],
            &ParquetLayout::default(),
        )?;

        let mut sorted: Vec<f64> = masses.iter().map(|m| m.mass).collect();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        let total_bytes: u64 = masses.iter().map(|m| val_bytes[m.position] as u64).sum();
        let per_byte = |total_bits: f64| total_bits / total_bytes.max(1) as f64;
        Ok(report
            .with("mode", serde_json::to_value(params.mode).unwrap())
            .with("samples", n as u64)
            .with("mass_mean", sorted.iter().sum::<f64>() / n as f64)
            .with("mass_median", median)
            .with("mass_min", sorted[0])
            .with("mass_max", sorted[n - 1])
            .with(
                "sample_bpb",
                per_byte(masses.iter().map(|m| bits(m.p_target)).sum()),
            )
            .with(
                "normalised_sample_bpb",
                per_byte(masses.iter().map(|m| bits(m.p_target / m.mass)).sum()),
            ))
    }
}
