//! `cache`: val tokens → per-position n-gram and phrase matches and per-order statistics.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, UInt16Array, UInt32Array,
    UInt64Array, UInt8Array,
};
use arrow::datatypes::{Schema, UInt16Type};
use stage_api::products;
use stage_api::{
    read_column, write_parquet, write_parquet_parallel, Column, ColumnType::*, Input, Output,
    ParquetLayout, Stage, StageContext, StageError, StageParams, StageReport, StageSpec,
};

use super::*;
use crate::figures::{MatchStats, StatsRow};
use crate::ngram::{NgramMatch, NgramTables};
use crate::phrase::{PhraseMatch, PhraseTables};

pub struct CacheStage;

/// `matches`: one row per val position. The two `q` columns are not stored: SQL
/// computes them from the counts, as [`crate::ngram::cache_q`] does (§5.1), which
/// keeps a gigabyte of f64s per 62M positions out of every build and every read.
const MATCHES_TABLE: &[Column] = &[
    Column::new("position", I64),
    Column::new("ngram_order", U8),
    Column::derived(
        "ngram_q",
        F64,
        "CAST(least(ngram_full, ngram_context) AS DOUBLE) / CAST(greatest(ngram_context, 1) AS DOUBLE)",
    ),
    Column::new("ngram_context", U32),
    Column::new("ngram_full", U32),
    Column::new("phrase_length", U16),
    Column::derived(
        "phrase_q",
        F64,
        "CAST(least(phrase_full, phrase_context) AS DOUBLE) / CAST(greatest(phrase_context, 1) AS DOUBLE)",
    ),
    Column::new("phrase_context", U32),
    Column::new("phrase_full", U32),
];

/// `cache_stats`: one row per n-gram order and phrase length.
const CACHE_STATS: &[Column] = &[
    Column::new("kind", Utf8),
    Column::new("size", U16),
    Column::new("matched", U64),
    Column::new("mean_q", F64),
    Column::nullable("buckets_used", U64),
    Column::new("insertions_per_bucket", F64),
];

impl StageParams for CacheParams {
    fn validate(&self) -> Result<(), StageError> {
        let located = |e: crate::ConfigError| StageError::invalid_param(e.param(), e.to_string());
        self.configs().map(drop).map_err(located)
    }
}

impl Stage for CacheStage {
    type Params = CacheParams;

    const SPEC: StageSpec = StageSpec {
        kind: "cache",
        // 3: `ngram_q` and `phrase_q` derived in SQL, no longer stored.
        version: 3,
        summary: "val tokens -> per-position n-gram and phrase matches, per-order statistics",
        inputs: &[Input::required("tokens", &[VAL_TOKENS])],
        outputs: &[
            Output::table(products::MATCHES.name, MATCHES_TABLE),
            Output::table("cache_stats", CACHE_STATS),
            Output::file("cache.json", "the parameters the tables were built with"),
        ],
        ..StageSpec::NONE
    };

    fn run(&self, ctx: &StageContext, params: CacheParams) -> Result<StageReport, StageError> {
        let tokens = read_column::<UInt16Type>(&ctx.input("tokens")?.file("val.parquet"), "token")?;
        let (ngram, phrase) = params.configs().map_err(|e| ctx.error(e.to_string()))?;
        ctx.check_memory(
            crate::memory::cache_stage_peak_bytes(
                params.mode,
                tokens.len() as u64,
                &ngram,
                &phrase,
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
        let lookups = Lookups::of(params.mode, &ngram, &phrase, &tokens, &mut report);

        // Lookups chunk by chunk, straight into Parquet, so that in reference mode the
        // per-position results are never all in memory at once.
        let started = Instant::now();
        let max_length = params.phrase_lengths.iter().max().copied().unwrap_or(0);
        let schema = matches_schema();
        let bar = ctx.progress(tokens.len() as u64, "cache lookups");
        let per_group = write_parquet_parallel(
            &ctx.output("matches.parquet"),
            schema.clone(),
            tokens.len(),
            &ParquetLayout::delta(&["position"]),
            |range| {
                let (ng, ph) = lookups.range(&tokens, range.clone());
                let mut stats = MatchStats::new(params.ngram_max_order, max_length);
                stats.add(range.start, &ng, &ph);
                bar.inc(range.len() as u64);
                Ok((matches_batch(&schema, range.start, &ng, &ph), stats))
            },
        )?;
        // Partial sums reduced in row-group order: the same on any number of threads.
        let mut stats = MatchStats::new(params.ngram_max_order, max_length);
        for part in &per_group {
            stats.merge(part);
        }
        bar.finish_and_clear();
        report.phase("lookups_and_write", started);

        let tables = match &lookups {
            Lookups::Tables(ngram, phrase) => Some((ngram, phrase)),
            Lookups::Made(..) => None,
        };
        let rows = stats.rows(&ngram, &phrase, tokens.len(), tables);
        write_stats(&ctx.output("cache_stats.parquet"), &rows)?;
        write_json(&ctx.output("cache.json"), &params)?;
        let ngram_matched: u64 = stats.ngram.iter().map(|s| s.0).sum();
        let phrase_matched: u64 = stats.phrase.iter().map(|s| s.0).sum();
        Ok(report.with_fields(&CacheReport {
            mode: params.mode,
            positions: tokens.len() as u64,
            ngram_matched,
            phrase_matched,
        }))
    }
}

/// What `cache` reports: how many positions each cache matched at some order or length.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct CacheReport {
    pub mode: Mode,
    pub positions: u64,
    pub ngram_matched: u64,
    pub phrase_matched: u64,
}

/// Where a position's matches come from.
enum Lookups {
    /// Reference mode: finished tables over every position, looked up chunk by chunk.
    Tables(NgramTables, PhraseTables),
    /// The causal modes: a lookup is part of the single pass that builds the tables, so
    /// all of them are made up front.
    Made(Vec<NgramMatch>, Vec<PhraseMatch>),
}

impl Lookups {
    /// The tables (reference mode) or every lookup (the causal modes) of `tokens`, each
    /// pass timed into `report`.
    fn of(
        mode: Mode,
        ngram: &Valid<NgramConfig>,
        phrase: &Valid<PhraseConfig>,
        tokens: &[u16],
        report: &mut StageReport,
    ) -> Lookups {
        match mode {
            Mode::Reference => {
                let started = Instant::now();
                let ngram = NgramTables::build(tokens, ngram);
                report.phase("ngram_build", started);
                let started = Instant::now();
                let phrase = PhraseTables::build(tokens, phrase);
                report.phase("phrase_build", started);
                Lookups::Tables(ngram, phrase)
            }
            Mode::Causal => {
                let started = Instant::now();
                let ngram = crate::causal::ngram_lookups(tokens, ngram);
                report.phase("ngram_causal_pass", started);
                let started = Instant::now();
                let phrase = crate::causal::phrase_lookups(tokens, phrase);
                report.phase("phrase_causal_pass", started);
                Lookups::Made(ngram, phrase)
            }
            Mode::CausalNormalised => {
                // One walk over the widths for both caches: the phrase lengths are built
                // from the n-gram's widths.
                let started = Instant::now();
                let (ngram, phrase) = crate::normalised::lookups(tokens, Some(ngram), Some(phrase));
                report.phase("exact_pass", started);
                Lookups::Made(ngram, phrase)
            }
        }
    }

    fn range(
        &self,
        tokens: &[u16],
        range: std::ops::Range<usize>,
    ) -> (Vec<NgramMatch>, Vec<PhraseMatch>) {
        match self {
            Lookups::Tables(ngram, phrase) => (
                ngram.lookup_range(tokens, range.clone()),
                phrase.lookup_range(tokens, range),
            ),
            Lookups::Made(ngram, phrase) => (ngram[range.clone()].to_vec(), phrase[range].to_vec()),
        }
    }
}

fn matches_schema() -> Arc<Schema> {
    stage_api::arrow_schema(MATCHES_TABLE)
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
        Arc::new(UInt32Array::from_iter_values(ng.iter().map(|m| m.context))),
        Arc::new(UInt32Array::from_iter_values(ng.iter().map(|m| m.full))),
        Arc::new(UInt16Array::from_iter_values(ph.iter().map(|m| m.length))),
        Arc::new(UInt32Array::from_iter_values(ph.iter().map(|m| m.context))),
        Arc::new(UInt32Array::from_iter_values(ph.iter().map(|m| m.full))),
    ];
    RecordBatch::try_new(schema.clone(), columns).expect("columns match schema")
}

fn write_stats(path: &Path, rows: &[StatsRow]) -> Result<u64, StageError> {
    let schema = stage_api::arrow_schema(CACHE_STATS);
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
