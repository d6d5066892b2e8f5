//! `audit-mass`: the implied-mass audit of one cache chain (see [`crate::mass`]).

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, UInt16Array, UInt32Array, UInt8Array,
};
use arrow::datatypes::{Float32Type, Int64Type, UInt16Type, UInt32Type, UInt8Type};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use stage_api::{
    read_column, write_parquet, Column, ColumnType::*, Input, Output, ParquetLayout, Read, Stage,
    StageContext, StageError, StageParams, StageReport, StageSpec,
};

use super::*;
use crate::ngram::{NgramMatch, NgramTables};
use crate::phrase::{PhraseMatch, PhraseTables};

/// `audit-mass`: the implied-mass audit of one cache chain (see [`crate::mass`]).
pub struct AuditMassStage;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditMassParams {}

impl StageParams for AuditMassParams {}

/// `mass`: one row per sampled position.
const MASS: &[Column] = &[
    Column::new("position", I64),
    Column::new("mass", F64),
    Column::new("p_target", F64),
    Column::new("bits", F64),
    Column::new("bits_normalised", F64),
    Column::new("bytes", U8),
    // The rule's choice with every candidate as the target (see mass::choices).
    Column::new("states", U32),
    Column::new("target_order", U8),
    Column::new("target_length", U16),
    Column::new("other_token", U16),
    Column::new("other_order", U8),
    Column::new("other_length", U16),
];

impl Stage for AuditMassStage {
    type Params = AuditMassParams;

    const SPEC: StageSpec = StageSpec {
        kind: "audit-mass",
        // 2: the rule's choices per candidate (states, target_*, other_*).
        // 3: the phrase weight's exp as numpy computes it; each sample with its rank's blend.
        version: 3,
        summary: "pass-1 distributions + cache + calibration -> Σ_v p(v) at the sampled positions, and the BPB renormalised there",
        inputs: &[
            CHAIN_INPUTS[0],
            Input::required(
                "pass1",
                &[PASS1, Read::table("distributions", &["position", "candidate", "model_p"])],
            ),
            CHAIN_INPUTS[2],
            CHAIN_INPUTS[3],
        ],
        outputs: &[Output::table("mass", MASS)],
        metrics: &["mass_mean", "normalised_sample_bpb"],
        ..StageSpec::NONE
    };

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

    fn run(&self, ctx: &StageContext, _: AuditMassParams) -> Result<StageReport, StageError> {
        let rank_blends = calibration_of(ctx)?.rank_blends();
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
        // Entropy and blend at each sampled position, from its first pass-1 entry (the
        // rank that scored it first).
        // Only the sampled positions are kept (a map of all 62M entries cost seconds and
        // gigabytes); a bitmap says which ones those are.
        let mut sampled = vec![false; tokens.len()];
        for &p in &positions {
            sampled[p] = true;
        }
        let mut entropy_at = std::collections::HashMap::with_capacity(positions.len());
        for (row, (&p, &h)) in entry_position.iter().zip(&entry_entropy).enumerate() {
            if usize::try_from(p).is_ok_and(|p| p < sampled.len() && sampled[p]) {
                entropy_at.entry(p as usize).or_insert((h, row));
            }
        }
        let samples: Vec<crate::mass::MassSample> = positions
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let &(entropy, row) = entropy_at.get(&p).ok_or_else(|| {
                    StageError::input(&dist_path, format!("position {p} has no pass-1 entry"))
                })?;
                Ok(crate::mass::MassSample {
                    position: p,
                    entropy,
                    model: &dist_p[i * vocab..(i + 1) * vocab],
                    blend: rank_blends.for_row(row),
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
        let node_error = |e: crate::ConfigError| ctx.error(e.to_string());
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
        let masses = crate::mass::implied_mass(&tokens, &samples, &candidates);
        let choices = crate::mass::choices(&tokens, &positions, &candidates);
        report.phase("candidates", started);

        let bits = stage_api::scores::bits;
        let schema = stage_api::arrow_schema(MASS);
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
            Arc::new(UInt32Array::from_iter_values(
                choices.iter().map(|c| c.states),
            )),
            Arc::new(UInt8Array::from_iter_values(
                choices.iter().map(|c| c.target.0),
            )),
            Arc::new(UInt16Array::from_iter_values(
                choices.iter().map(|c| c.target.1),
            )),
            Arc::new(UInt16Array::from_iter_values(
                choices.iter().map(|c| c.other_token),
            )),
            Arc::new(UInt8Array::from_iter_values(
                choices.iter().map(|c| c.other.0),
            )),
            Arc::new(UInt16Array::from_iter_values(
                choices.iter().map(|c| c.other.1),
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
            .with(
                "target_dependent",
                choices.iter().filter(|c| c.states > 1).count() as u64,
            )
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
