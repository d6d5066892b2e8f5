//! The `hints` stage: the n-gram tilt's hint for every val target, from the stream alone.
//!
//! Hints are a pure function of the token stream, so one hints artifact serves every
//! model and every boost: the tilt stage reads it beside a pass-1 with the hint's
//! probability, and a threshold sweep only changes which hints fire (the share is kept).
//!
//! Three proposers: `kernel = "2135"`, the challenge's top row (hashed 15-token contexts,
//! docs/eval-techniques.md §1, to the bit); `kernel = "1514"`, the merged #1514's
//! prefix-gated orders 16, 14, …, 8 (§2.7, with contexts counted exactly); and `kernel =
//! "cachemoney"`, CacheMoney's own cache made a proposer: the causal-normalised mode's
//! exact counts of orders 2–16, the longest context seen at least `min_count` times
//! naming its top continuation.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Float32Array, Int64Array, RecordBatch, UInt16Array, UInt32Array};
use arrow::datatypes::UInt16Type;
use serde::{Deserialize, Serialize};
use stage_api::products;
use stage_api::{
    arrow_schema, check_param, read_column, write_parquet_parallel, Column, ColumnType::*, Input,
    Output, ParquetLayout, Stage, StageContext, StageError, StageParams, StageReport, StageSpec,
};

use crate::kernel::{Hints, Kernel, ORDER};

/// `hints`: one row per val target.
pub struct HintsStage;

/// Which token starts the ring (docs/eval-techniques.md §1.4): #2135 pushes the first
/// target, #1145 the stream's first token. It matters only where the stream's first
/// window recurs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Seed {
    FirstTarget,
    FirstToken,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HintsParams {
    /// The kernel: "2135", the token-only tilt of the challenge's top row (§1), or
    /// "cachemoney", the causal-normalised cache's top continuations.
    pub kernel: String,
    /// Context length plus one (#2135: 16); for "cachemoney", the highest order.
    pub order: usize,
    /// #2135's seed token; "cachemoney" has none (its contexts start at the stream's
    /// first token).
    pub seed: Seed,
    /// The tables' size in bits; absent: the reference's rule for the stream's length
    /// (it decides only where a run on a stream too long for 2^28 slots aborts).
    pub table_bits: Option<u32>,
    /// "cachemoney" only: the lowest order (default 2). Left out of the canonical form
    /// when absent, as is `min_count`, so #2135's recipes are what they were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_order: Option<usize>,
    /// "cachemoney" only: how many times a context must have occurred before a target
    /// for its order to be chosen (default 1, the causal-normalised cache's: the longest
    /// context seen before. On the demo 1 beats 2 and 3, whose longer contexts' hints
    /// hit more often but fire on a third as many targets).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_count: Option<u32>,
}

/// The two proposers, as a validated parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proposer {
    Hashed2135,
    PrefixGated1514,
    CacheMoney { min_order: usize, min_count: u32 },
}

/// The first parameter of `set` that was given, refused with `why`.
fn refuse_set(set: &[(&str, bool)], why: &str) -> Result<(), StageError> {
    match set.iter().find(|(_, given)| *given) {
        Some((name, _)) => Err(StageError::invalid_param(*name, why.to_string())),
        None => Ok(()),
    }
}

/// #1420/#1514's orders, highest first, each with its share threshold (compared in f32)
/// and the count its context must have reached (docs/eval-techniques.md §2.7).
pub const ORDERS_1514: [(usize, f32, u32); 5] = [
    (16, 0.50, 2),
    (14, 0.50, 2),
    (12, 0.60, 2),
    (10, 0.70, 3),
    (8, 0.70, 3),
];

impl HintsParams {
    fn proposer(&self) -> Result<Proposer, StageError> {
        match self.kernel.as_str() {
            "2135" => {
                refuse_set(
                    &[
                        ("min_order", self.min_order.is_some()),
                        ("min_count", self.min_count.is_some()),
                    ],
                    "applies to kernel = \"cachemoney\" only",
                )?;
                Ok(Proposer::Hashed2135)
            }
            "1514" => {
                refuse_set(
                    &[
                        ("table_bits", self.table_bits.is_some()),
                        ("min_order", self.min_order.is_some()),
                        ("min_count", self.min_count.is_some()),
                        ("seed", self.seed != Seed::FirstTarget),
                        ("order", self.order != ORDER),
                    ],
                    "kernel = \"1514\" is #1514's as it ran: orders 16, 14, 12, 10, 8 with their own gates, counted exactly",
                )?;
                Ok(Proposer::PrefixGated1514)
            }
            "cachemoney" => {
                if self.table_bits.is_some() {
                    return Err(StageError::invalid_param(
                        "table_bits",
                        "kernel = \"cachemoney\" counts exactly, with no table to size"
                            .to_string(),
                    ));
                }
                if self.seed != Seed::FirstTarget {
                    return Err(StageError::invalid_param(
                        "seed",
                        "kernel = \"cachemoney\" has no seed token".to_string(),
                    ));
                }
                let min_order = self.min_order.unwrap_or(2);
                check_param("min_order", min_order, 2..=self.order.max(2), "lowest order, at most `order`")?;
                Ok(Proposer::CacheMoney {
                    min_order,
                    min_count: self.min_count.unwrap_or(1),
                })
            }
            other => Err(StageError::invalid_param(
                "kernel",
                format!(
                    "{other:?}: the kernels built are \"2135\" (eval-techniques.md §1), \"1514\" (§2.7) and \"cachemoney\" (the causal-normalised cache's top continuations)"
                ),
            )),
        }
    }
}

impl Default for HintsParams {
    fn default() -> Self {
        HintsParams {
            kernel: "2135".into(),
            order: ORDER,
            seed: Seed::FirstTarget,
            table_bits: None,
            min_order: None,
            min_count: None,
        }
    }
}

impl StageParams for HintsParams {
    /// The cache's kernel records its orders and count in the recipe.
    fn resolved(mut self) -> Self {
        if let Ok(Proposer::CacheMoney {
            min_order,
            min_count,
        }) = self.proposer()
        {
            self.min_order = Some(min_order);
            self.min_count = Some(min_count);
        }
        self
    }

    fn validate(&self) -> Result<(), StageError> {
        match self.proposer()? {
            Proposer::Hashed2135 => {
                check_param("order", self.order, 1..=33, "context length plus one")?
            }
            Proposer::PrefixGated1514 => {}
            Proposer::CacheMoney { .. } => check_param(
                "order",
                self.order,
                2..=16,
                "the cache's highest order (its orders are 2–16)",
            )?,
        }
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
        summary: "tokens -> per val target, the n-gram tilt's hint token, its context's top share and count (#2135's kernel, exact; or the causal-normalised cache's)",
        inputs: &[Input::required(
            "tokens",
            &[products::VAL.read(&["token"])],
        )],
        outputs: &[Output::table(products::HINTS.name, HINTS_TABLE)],
        metrics: &["gated"],
        ..StageSpec::NONE
    };

    fn headline(&self, report: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
        let HintsReport {
            kernel,
            targets,
            gated,
            gate_rate,
        } = stage_api::report_fields(report)?;
        let gate = match kernel.as_str() {
            "1514" => "past #1514's gates",
            _ => "at share ≥ 0.8",
        };
        Some(format!(
            "{targets} targets, {gated} hints {gate} ({:.2}%)",
            gate_rate * 100.0
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
        let started = Instant::now();
        let hints = match params.proposer()? {
            Proposer::Hashed2135 => {
                let seed = match params.seed {
                    Seed::FirstTarget => targets[0],
                    Seed::FirstToken => val[0],
                };
                let kernel = Kernel {
                    order: params.order,
                    table_bits: params.table_bits,
                };
                kernel
                    .hints(targets, seed)
                    .map_err(|full| StageError::input(&val_path, full.to_string()))?
            }
            Proposer::PrefixGated1514 => prefix_gated_hints(&val),
            Proposer::CacheMoney {
                min_order,
                min_count,
            } => cachemoney_hints(&val, params.order, min_order, min_count),
        };
        let mut report = StageReport::default();
        report.phase("kernel", started);
        // #1514's hints are gated already (a hint is given only past its order's gate);
        // the others' gate is the reference's share.
        let gated = match params.proposer()? {
            Proposer::PrefixGated1514 => hints.seen.iter().filter(|&&s| s > 0).count(),
            _ => hints.share.iter().filter(|&&s| s >= THRESHOLD).count(),
        } as u64;
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
        Ok(report.with_fields(&HintsReport {
            kernel: params.kernel.clone(),
            targets: n as u64,
            gated,
            gate_rate: gated as f64 / n as f64,
        }))
    }
}

/// What `hints` reports: how many targets got a hint past the kernel's gates.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct HintsReport {
    /// The proposer, as the parameter names it.
    pub kernel: String,
    pub targets: u64,
    pub gated: u64,
    pub gate_rate: f64,
}

/// The causal-normalised cache's top continuations as hints for the targets `val[1..]`:
/// a target's context may reach back to the stream's first token.
fn cachemoney_hints(val: &[u16], order: usize, min_order: usize, min_count: u32) -> Hints {
    let config = cache::NgramConfig {
        min_order,
        max_order: order,
        min_count,
        ..cache::NgramConfig::default()
    }
    .validated()
    .expect("orders validated with the parameters");
    as_hints(cache::continuations::top_continuations(val, &config))
}

/// #1420/#1514's hints (§2.7) for the targets `val[1..]`: the highest of its orders whose
/// context passes that order's gate names its top continuation; no hint where none does.
/// Contexts are counted exactly: the spec leaves the kernel's pair key unstated, and
/// with it which updates its 16-probe rule drops, so hashing would only look exact.
fn prefix_gated_hints(val: &[u16]) -> Hints {
    let orders: Vec<usize> = ORDERS_1514.iter().map(|&(order, ..)| order).collect();
    let found = cache::continuations::gated_continuations(val, &orders, |order, top, seen| {
        let &(_, threshold, minimum) = ORDERS_1514
            .iter()
            .find(|&&(o, ..)| o == order)
            .expect("one of the orders");
        seen >= minimum && top as f32 / seen as f32 >= threshold
    });
    as_hints(found)
}

/// The engine's per-position continuations as the hints of the targets (positions 1…).
fn as_hints(found: cache::continuations::Continuations) -> Hints {
    Hints {
        hint: found.token[1..].to_vec(),
        share: found.top[1..]
            .iter()
            .zip(&found.seen[1..])
            .map(|(&top, &seen)| match seen {
                0 => 0.0,
                // Single precision, as #2135's kernel divides.
                _ => top as f32 / seen as f32,
            })
            .collect(),
        seen: found.seen[1..].to_vec(),
    }
}
