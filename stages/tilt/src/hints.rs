//! The `hints` stage: the n-gram tilt's hint for every val target, from the stream alone.
//!
//! Hints are a pure function of the token stream, so one hints artifact serves every
//! model and every boost: the tilt stage reads it beside a pass-1 with the hint's
//! probability, and a threshold sweep only changes which hints fire (the share is kept).

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Float32Array, Int64Array, RecordBatch, UInt16Array, UInt32Array};
use arrow::datatypes::UInt16Type;
use serde::{Deserialize, Serialize};
use stage_api::{
    arrow_schema, check_param, read_column, write_parquet_parallel, Column, ColumnType::*, Input,
    Output, ParquetLayout, Read, Stage, StageContext, StageError, StageParams, StageReport,
    StageSpec,
};

use crate::kernel::{Kernel, ORDER};

/// `hints`: one row per val target.
pub struct HintsStage;

/// Which token starts the ring (eval-techniques.md §1.4): #2135 pushes the first target,
/// #1145 the stream's first token. It matters only where the stream's first window recurs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Seed {
    FirstTarget,
    FirstToken,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HintsParams {
    /// The kernel: "2135", the token-only tilt of the challenge's top row (§1).
    pub kernel: String,
    /// Context length plus one (#2135: 16).
    pub order: usize,
    pub seed: Seed,
    /// The tables' size in bits; absent: the reference's rule for the stream's length
    /// (it decides only where a run on a stream too long for 2^28 slots aborts).
    pub table_bits: Option<u32>,
}

impl Default for HintsParams {
    fn default() -> Self {
        HintsParams {
            kernel: "2135".into(),
            order: ORDER,
            seed: Seed::FirstTarget,
            table_bits: None,
        }
    }
}

impl StageParams for HintsParams {
    fn validate(&self) -> Result<(), StageError> {
        if self.kernel != "2135" {
            return Err(StageError::invalid_param(
                "kernel",
                format!(
                    "{:?}: the kernel built is \"2135\" (eval-techniques.md §1)",
                    self.kernel
                ),
            ));
        }
        check_param("order", self.order, 1..=33, "context length plus one")?;
        check_param(
            "table_bits",
            self.table_bits.unwrap_or(12),
            1..=32,
            "bits of table size",
        )
    }
}

/// `hints`: per target position, the hint, the context's top share, and how many times
/// the context was seen before (0: new, or the window not yet full; hint and share 0).
pub const HINTS_TABLE: &[Column] = &[
    Column::new("position", I64),
    Column::new("hint", U16),
    Column::new("share", F32),
    Column::new("seen", U32),
];

/// The reference's gate: a hint fires when its share is at least 0.8 (in f32).
pub const THRESHOLD: f32 = 0.8;

impl Stage for HintsStage {
    type Params = HintsParams;

    const SPEC: StageSpec = StageSpec {
        kind: "hints",
        version: 1,
        summary: "tokens -> per val target, the n-gram tilt's hint token, its context's top share and count (#2135's kernel, exact)",
        inputs: &[Input::required(
            "tokens",
            &[Read::table("val", &["token"])],
        )],
        outputs: &[Output::table("hints", HINTS_TABLE)],
        metrics: &["gated"],
        ..StageSpec::NONE
    };

    fn headline(&self, report: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
        Some(format!(
            "{} targets, {} hints at share ≥ 0.8 ({:.2}%)",
            report.get("targets")?.as_u64()?,
            report.get("gated")?.as_u64()?,
            report.get("gate_rate")?.as_f64()? * 100.0
        ))
    }

    fn run(&self, ctx: &StageContext, params: HintsParams) -> Result<StageReport, StageError> {
        let tokens = ctx.input("tokens")?;
        let val_path = tokens.file("val.parquet");
        let val = read_column::<UInt16Type>(&val_path, "token")?;
        if val.len() < 2 {
            return Err(StageError::input(
                &val_path,
                format!("{} val tokens: no target to hint", val.len()),
            ));
        }
        let targets = &val[1..];
        ctx.check_memory(
            targets.len() as u64 * 40,
            &format!("hinting {} targets", targets.len()),
        )?;
        let seed = match params.seed {
            Seed::FirstTarget => targets[0],
            Seed::FirstToken => val[0],
        };
        let started = Instant::now();
        let kernel = Kernel {
            order: params.order,
            table_bits: params.table_bits,
        };
        let hints = kernel
            .hints(targets, seed)
            .map_err(|full| StageError::input(&val_path, full.to_string()))?;
        let mut report = StageReport::default();
        report.phase("kernel", started);
        let gated = hints.share.iter().filter(|&&s| s >= THRESHOLD).count() as u64;
        let schema = arrow_schema(HINTS_TABLE);
        let n = targets.len();
        let started = Instant::now();
        // Row groups built and encoded on every core; positions delta-packed (1, 2, …).
        write_parquet_parallel(
            &ctx.output("hints.parquet"),
            schema.clone(),
            n,
            &ParquetLayout::delta(&["position"]).uncompressed(&["share"]),
            |rows| {
                let batch = RecordBatch::try_new(
                    schema.clone(),
                    vec![
                        Arc::new(Int64Array::from_iter_values(
                            rows.start as i64 + 1..rows.end as i64 + 1,
                        )),
                        Arc::new(UInt16Array::from(hints.hint[rows.clone()].to_vec())),
                        Arc::new(Float32Array::from(hints.share[rows.clone()].to_vec())),
                        Arc::new(UInt32Array::from(hints.seen[rows].to_vec())),
                    ],
                )
                .expect("columns match schema");
                Ok((batch, ()))
            },
        )?;
        report.phase("write", started);
        Ok(report
            .with("targets", n as u64)
            .with("gated", gated)
            .with("gate_rate", gated as f64 / n as f64))
    }
}
