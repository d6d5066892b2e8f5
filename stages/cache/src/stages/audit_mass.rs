//! `audit-mass`: the implied-mass audit of one cache chain (see [`crate::mass`]).

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, UInt16Array, UInt32Array, UInt8Array,
};
use arrow::datatypes::{Float32Type, Int64Type, UInt16Type, UInt8Type};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use stage_api::products;
use stage_api::{
    read_column, write_parquet, Column, ColumnType::*, Input, Output, ParquetLayout, Stage,
    StageContext, StageError, StageParams, StageReport, StageSpec,
};

use super::*;
use crate::mass::{self, Choices, Mass, MassSample, MassSummary};
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
                &[PASS1, products::DISTRIBUTIONS.read(&["position", "candidate", "model_p"])],
            ),
            CHAIN_INPUTS[2],
            CHAIN_INPUTS[3],
        ],
        outputs: &[Output::table(products::MASS.name, MASS)],
        metrics: &["mass_mean", "normalised_sample_bpb"],
        ..StageSpec::NONE
    };

    fn headline(&self, report: &serde_json::Map<String, Value>) -> Option<String> {
        let r = MassReport::from_report(report)?;
        let mode = serde_json::to_value(r.mode).ok()?;
        Some(format!(
            "implied mass ({}): mean {:.6}, median {:.6}, max {:.6} over {} positions; BPB there {:.4}, renormalised {:.4}",
            mode.as_str()?,
            r.mass_mean,
            r.mass_median,
            r.mass_max,
            r.samples,
            r.sample_bpb,
            r.normalised_sample_bpb,
        ))
    }

    fn run(&self, ctx: &StageContext, _: AuditMassParams) -> Result<StageReport, StageError> {
        let rank_blends = calibration_of(ctx)?.rank_blends();
        let params = cache_params_of(ctx)?;
        let val_path = ctx.input("tokens")?.file("val.parquet");
        let tokens = read_column::<UInt16Type>(&val_path, "token")?;
        let val_bytes = read_column::<UInt8Type>(&val_path, "bytes")?;
        let pass1 = ctx.input("pass1")?;
        let kept = Distributions::read(&pass1.file("distributions.parquet"), &tokens)?;
        let samples = kept.samples(&pass1.file("pass1.parquet"), &rank_blends, tokens.len())?;

        let mut report = StageReport::default();
        let started = Instant::now();
        let candidates = candidates(ctx, &params, &tokens, &kept)?;
        let masses = mass::implied_mass(&tokens, &samples, &candidates);
        let choices = mass::choices(&tokens, &kept.positions, &candidates);
        report.phase("candidates", started);
        write_mass_table(ctx, &masses, &choices, &val_bytes)?;

        let summary = MassSummary::of(&masses, &choices, |p| val_bytes[p]);
        Ok(report.with_fields(&MassReport {
            mode: params.mode,
            samples: summary.samples as u64,
            target_dependent: summary.target_dependent as u64,
            mass_mean: summary.mean,
            mass_median: summary.median,
            mass_min: summary.min,
            mass_max: summary.max,
            sample_bpb: summary.sample_bpb,
            normalised_sample_bpb: summary.normalised_sample_bpb,
        }))
    }
}

/// What `audit-mass` reports ([`MassSummary`] under the names the report has always
/// used); `report` and the headline read it as this type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MassReport {
    pub mode: Mode,
    pub samples: u64,
    pub target_dependent: u64,
    pub mass_mean: f64,
    pub mass_median: f64,
    pub mass_min: f64,
    pub mass_max: f64,
    pub sample_bpb: f64,
    pub normalised_sample_bpb: f64,
}

impl MassReport {
    /// An audit-mass node's report, from its manifest's (none from another stage's).
    pub fn from_report(report: &serde_json::Map<String, Value>) -> Option<Self> {
        stage_api::report_fields(report)
    }
}

/// The model's distributions pass 1 kept: one per sampled position, `vocab` values each.
struct Distributions {
    path: std::path::PathBuf,
    positions: Vec<usize>,
    model_p: Vec<f32>,
    vocab: usize,
}

impl Distributions {
    fn read(path: &std::path::Path, tokens: &[u16]) -> Result<Self, StageError> {
        if !path.exists() {
            return Err(StageError::input(path, "missing: this pass-1 kept no distributions (model = \"import\", or mass_sample = 0)"));
        }
        let position = read_column::<Int64Type>(path, "position")?;
        let model_p = read_column::<Float32Type>(path, "model_p")?;
        let mut positions: Vec<usize> = position.iter().map(|&p| p as usize).collect();
        positions.dedup();
        let vocab = mass::sampled_vocab(&positions, model_p.len(), tokens)
            .map_err(|m| StageError::input(path, m))?;
        Ok(Distributions {
            path: path.to_path_buf(),
            positions,
            model_p,
            vocab,
        })
    }

    /// Each sampled position with its distribution, and the entropy and blend of its
    /// first pass-1 entry (the rank that scored it first) in the table at `pass1_path`.
    fn samples<'a>(
        &'a self,
        pass1_path: &std::path::Path,
        rank_blends: &'a RankBlends,
        stream_len: usize,
    ) -> Result<Vec<MassSample<'a>>, StageError> {
        let entry_position = read_column::<Int64Type>(pass1_path, "position")?;
        let entry_entropy = read_column::<Float32Type>(pass1_path, "entropy")?;
        // Only the sampled positions are kept (a map of all 62M entries cost seconds and
        // gigabytes); a bitmap says which ones those are.
        let mut sampled = vec![false; stream_len];
        for &p in &self.positions {
            sampled[p] = true;
        }
        let mut entropy_at = std::collections::HashMap::with_capacity(self.positions.len());
        for (row, (&p, &h)) in entry_position.iter().zip(&entry_entropy).enumerate() {
            if usize::try_from(p).is_ok_and(|p| p < sampled.len() && sampled[p]) {
                entropy_at.entry(p as usize).or_insert((h, row));
            }
        }
        let vocab = self.vocab;
        self.positions
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let &(entropy, row) = entropy_at.get(&p).ok_or_else(|| {
                    StageError::input(&self.path, format!("position {p} has no pass-1 entry"))
                })?;
                Ok(MassSample {
                    position: p,
                    entropy,
                    model: &self.model_p[i * vocab..(i + 1) * vocab],
                    blend: rank_blends.for_row(row),
                })
            })
            .collect()
    }
}

/// What the chain's mode gives every candidate at each sampled position.
fn candidates(
    ctx: &StageContext,
    params: &CacheParams,
    tokens: &[u16],
    kept: &Distributions,
) -> Result<Vec<mass::CandidateMatches>, StageError> {
    let (positions, vocab) = (&kept.positions, kept.vocab);
    let configs = || params.configs().map_err(|e| ctx.error(e.to_string()));
    Ok(match params.mode {
        Mode::Reference => {
            let (ngram, phrase) = configs()?;
            let ngram = NgramTables::build(tokens, &ngram);
            let phrase = PhraseTables::build(tokens, &phrase);
            mass::reference_candidates(tokens, &ngram, &phrase, positions, vocab)
        }
        Mode::Causal => {
            let (ngram, phrase) = configs()?;
            mass::causal_candidates(tokens, &ngram, &phrase, positions, vocab)
        }
        Mode::CausalNormalised => {
            // The order and length each position's lookup chose, from the chain's cache.
            let matches_path = ctx.input("cache")?.file("matches.parquet");
            let held = positions[0]..positions[positions.len() - 1] + 1;
            let matches = MatchColumns::read(&matches_path, held)?;
            let chosen: Vec<(NgramMatch, PhraseMatch)> =
                positions.iter().map(|&p| matches.at(p)).collect();
            mass::normalised_candidates(tokens, positions, &chosen, vocab)
                .map_err(|m| StageError::input(&matches_path, m))?
        }
    })
}

/// `mass.parquet`: a row per sampled position.
fn write_mass_table(
    ctx: &StageContext,
    masses: &[Mass],
    choices: &[Choices],
    val_bytes: &[u8],
) -> Result<(), StageError> {
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
    Ok(())
}
