//! `pass2`: the sequential blend over every entry → per-entry scores and the BPB waterfall (§7).

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    ArrayRef, Float32Array, Float64Array, Int64Array, RecordBatch, UInt16Array, UInt8Array,
};
use arrow::datatypes::UInt16Type;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use stage_api::products;
use stage_api::{
    read_column, write_parquet_parallel, Column, ColumnType::*, Output, ParquetLayout, Stage,
    StageContext, StageError, StageParams, StageReport, StageSpec,
};

use super::*;
use crate::figures::Waterfall;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pass2Params {}

impl StageParams for Pass2Params {}

pub struct Pass2Stage;

/// `scores`: one row per scored entry, in pass-1 order. `bits` is not stored: SQL
/// computes it from `p_final` (a 62M-row table is 0.5 GB smaller, and faster to write).
const SCORES: &[Column] = &[
    Column::new("position", I64),
    Column::new("token", U16),
    Column::new("model_p", F32),
    Column::new("p_ngram", F64),
    Column::new("p_final", F64),
    Column::derived("bits", F64, stage_api::scores::BITS_SQL),
    Column::new("bytes", U8),
];

impl Stage for Pass2Stage {
    type Params = Pass2Params;

    const SPEC: StageSpec = StageSpec {
        kind: "pass2",
        // 3: the phrase weight's exp as numpy computes it; per-rank blends.
        // 4: `bits` derived in SQL, no longer stored; tokens and bytes delta-packed.
        // 5: the waterfall's logs taken of products of 16 probabilities (the summary's
        //    last digits change, within 1e-14 relative).
        version: 5,
        summary: "pass-1 + matches + calibration -> per-entry scores and the BPB waterfall",
        inputs: &CHAIN_INPUTS,
        outputs: &[
            Output::table(products::SCORES.name, SCORES),
            Output::file("summary.json", "the BPB waterfall and the blend it used"),
        ],
        metrics: &["ngram_bpb", "final_bpb", "alpha_high", "entropy_thresh"],
        ..StageSpec::NONE
    };

    fn headline(&self, report: &serde_json::Map<String, Value>) -> Option<String> {
        let s = Pass2Summary::from_report(report)?;
        let ranks = match s.ranks {
            r if r > 1 => format!(" on rank 0 of {r}"),
            _ => String::new(),
        };
        // The pair as JSON writes it: the shortest text that reads back the same f64.
        let (alpha_high, entropy_thresh) =
            (Value::from(s.alpha_high), Value::from(s.entropy_thresh));
        Some(format!(
            "BPB: neural {:.4} → after n-gram {:.4} → final {:.4}  ({} entries, {} bytes; calibrated alpha_high {alpha_high}, entropy_thresh {entropy_thresh}{ranks})",
            s.neural_bpb, s.ngram_bpb, s.final_bpb, s.entries, s.bytes,
        ))
    }

    fn run(&self, ctx: &StageContext, _: Pass2Params) -> Result<StageReport, StageError> {
        let calibration = calibration_of(ctx)?;
        let rank_blends = calibration.rank_blends();
        let tokens = read_column::<UInt16Type>(&ctx.input("tokens")?.file("val.parquet"), "token")?;
        let (pass1, n) = pass1_rows(ctx)?;
        let covered = rank_blends.rows();
        if covered != n {
            return Err(StageError::input(
                ctx.input("calibration")?.file("calibration.json"),
                format!("its ranks cover {covered} pass-1 rows, but pass 1 has {n} (calibrated on another pass 1?)"),
            ));
        }
        let mut report = StageReport::default();
        let started = Instant::now();
        let schema = stage_api::arrow_schema(SCORES);
        // Row groups are read, blended and encoded in parallel, each reading only its
        // own rows of pass 1 and the matches of the positions they score (pass-1 order
        // is nearly position order, so that is about one row group of each): the inputs
        // are never all in memory, and reading overlaps writing. Each returns its
        // waterfall sums, reduced below in group order.
        let partials = write_parquet_parallel(
            &ctx.output("scores.parquet"),
            schema.clone(),
            n,
            // Tokens and byte counts delta-packed rather than dictionary-encoded: the
            // table is 1% larger, but the dictionary's per-value hashing was a tenth of
            // the stage's CPU time.
            &ParquetLayout::delta(&["position", "token", "bytes"])
                .uncompressed(&["model_p", "p_ngram", "p_final"]),
            |range| {
                let scored = load_rows(ctx, range.clone())?;
                if scored.position.iter().any(|&p| p as usize >= tokens.len()) {
                    return Err(StageError::input(&pass1, "positions beyond the val tokens"));
                }
                // One pass per row: blend it with its rank's pair (a row group may
                // straddle two ranks) and add it to the waterfall.
                let mut waterfall = Waterfall::default();
                let (mut p_ngram, mut p_final) = (
                    Vec::with_capacity(scored.len()),
                    Vec::with_capacity(scored.len()),
                );
                for i in 0..scored.len() {
                    let entry = scored.entry(i);
                    let (ngram, last) = rank_blends.for_row(range.start + i).blend(&entry);
                    waterfall.add(entry.model_p, ngram, last, scored.bytes[i]);
                    p_ngram.push(ngram);
                    p_final.push(last);
                }
                let positions = &scored.position;
                let columns: Vec<ArrayRef> = vec![
                    Arc::new(Int64Array::from_iter_values(
                        positions.iter().map(|&p| p as i64),
                    )),
                    Arc::new(UInt16Array::from_iter_values(
                        positions.iter().map(|&p| tokens[p as usize]),
                    )),
                    Arc::new(Float32Array::from(scored.model_p)),
                    Arc::new(Float64Array::from(p_ngram)),
                    Arc::new(Float64Array::from(p_final)),
                    Arc::new(UInt8Array::from(scored.bytes)),
                ];
                let batch =
                    RecordBatch::try_new(schema.clone(), columns).expect("columns match schema");
                Ok((batch, waterfall))
            },
        )?;
        let mut waterfall = Waterfall::default();
        for part in &partials {
            waterfall.merge(part);
        }
        report.phase("blend_and_write", started);
        let summary = Pass2Summary {
            alpha_high: calibration.alpha_high,
            bytes: waterfall.bytes,
            entries: n as u64,
            entropy_thresh: calibration.entropy_thresh,
            final_bpb: waterfall.final_bpb(),
            mode: cache_params_of(ctx)?.mode,
            neural_bpb: waterfall.neural_bpb(),
            ngram_bpb: waterfall.ngram_bpb(),
            ranks: calibration.ranks.len() as u64,
            val_loss_nats: waterfall.val_loss_nats(),
        };
        write_json(&ctx.output("summary.json"), &summary)?;
        Ok(report.with_fields(&summary))
    }
}

/// What `pass2` reports: its `summary.json`, and the entries of its manifest's report,
/// which `report` and the headline read as this type rather than by key. The fields are
/// in alphabetical order: the file's bytes are those of the sorted map it replaced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pass2Summary {
    /// Rank 0's calibrated pair.
    pub alpha_high: f64,
    pub bytes: u64,
    pub entries: u64,
    pub entropy_thresh: f64,
    pub final_bpb: f64,
    pub mode: Mode,
    pub neural_bpb: f64,
    pub ngram_bpb: f64,
    pub ranks: u64,
    pub val_loss_nats: f64,
}

impl Pass2Summary {
    /// A pass2 node's summary, from its manifest's report (none from another stage's).
    pub fn from_report(report: &serde_json::Map<String, Value>) -> Option<Pass2Summary> {
        stage_api::report_fields(report)
    }
}
