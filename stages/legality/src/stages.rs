//! The `legality` stage: reading the chain's tables around the probes.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{Float32Type, Float64Type, Int64Type, UInt16Type, UInt32Type, UInt8Type};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use stage_api::{
    arrow_schema, read_column, write_parquet, Column, ColumnType::*, Input, InputArtifact, Output,
    ParquetLayout, Read, Reruns, Stage, StageContext, StageError, StageParams, StageReport,
    StageSpec,
};

use crate::perturb::{perturb, CutParams};
use crate::perturb_stage::{VAL, VOCAB};
use crate::probes::{self, Finding, Verdict};

/// `legality`: the probes' verdicts on one chain.
pub struct LegalityStage;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LegalityParams {
    /// The label of this chain's rows; the pipeline sets it to the chain's last node.
    pub chain: String,
    /// The perturbed re-runs: each a `perturb` node and a copy of the chain.
    pub cuts: Vec<CutParams>,
    /// How far from 1 a distribution's sum may be (float rounding over a vocabulary).
    pub tolerance: f64,
}

impl Default for LegalityParams {
    fn default() -> Self {
        LegalityParams {
            chain: String::new(),
            cuts: [0.3, 0.7]
                .into_iter()
                .map(|at| CutParams {
                    at,
                    ..CutParams::default()
                })
                .collect(),
            tolerance: 1e-4,
        }
    }
}

const CUT_INPUTS: [&str; 8] = [
    "cut1", "cut2", "cut3", "cut4", "cut5", "cut6", "cut7", "cut8",
];

impl StageParams for LegalityParams {
    fn validate(&self) -> Result<(), StageError> {
        stage_api::check_param(
            "cuts",
            self.cuts.len(),
            0..=CUT_INPUTS.len(),
            "re-runs of the chain",
        )?;
        for (i, cut) in self.cuts.iter().enumerate() {
            cut.validate().map_err(|e| match e {
                StageError::InvalidParam { param, message } => {
                    StageError::invalid_param(format!("cuts[{i}].{param}"), message)
                }
                other => other,
            })?;
        }
        if !(self.tolerance > 0.0 && self.tolerance < 1.0) {
            return Err(StageError::invalid_param(
                "tolerance",
                format!("{} is not inside (0, 1)", self.tolerance),
            ));
        }
        Ok(())
    }
}

/// `legality`: one row per probe.
pub const LEGALITY_TABLE: &[Column] = &[
    Column::new("chain", Utf8),
    Column::new("probe", Utf8),
    Column::new("verdict", Utf8),
    Column::new("checked", U64),
    Column::nullable("position", I64),
    Column::nullable("expected", F64),
    Column::nullable("observed", F64),
    Column::new("detail", Utf8),
];

/// What `audit-mass` writes and the target probe reads.
const MASS: Read = Read::table(
    "mass",
    &[
        "position",
        "mass",
        "states",
        "target_order",
        "target_length",
        "other_token",
        "other_order",
        "other_length",
    ],
);

impl Stage for LegalityStage {
    type Params = LegalityParams;

    const SPEC: StageSpec = StageSpec {
        kind: "legality",
        version: 1,
        summary: "a chain (pass-1, or pass-1 -> cache -> calibrate -> pass2) -> verdicts of the C1/C2 and byte probes, with evidence",
        inputs: &[
            Input::required("tokens", &[VAL, VOCAB]),
            // A pass-1 node (pass1, distributions) or a pass2 node (scores); checked when
            // the pipeline makes the re-runs.
            Input::required("chain", &[]),
            Input::optional("mass", &[MASS]),
            Input::optional("cut1", &[]),
            Input::optional("cut2", &[]),
            Input::optional("cut3", &[]),
            Input::optional("cut4", &[]),
            Input::optional("cut5", &[]),
            Input::optional("cut6", &[]),
            Input::optional("cut7", &[]),
            Input::optional("cut8", &[]),
        ],
        outputs: &[Output::table("legality", LEGALITY_TABLE)],
        metrics: &["failed"],
        reruns: Some(Reruns {
            input: "chain",
            label_param: Some("chain"),
            members: &["scores", "pass1", "matches", "calibration.json"],
            source_table: "val",
            param: "cuts",
            stage: "perturb",
            wired_as: &CUT_INPUTS,
        }),
        ..StageSpec::NONE
    };

    fn headline(&self, report: &serde_json::Map<String, Value>) -> Option<String> {
        let verdicts: Vec<String> = probes::PROBES
            .iter()
            .filter_map(|p| Some(format!("{p} {}", report.get(*p)?.as_str()?)))
            .collect();
        Some(format!(
            "{}: {}",
            report.get("chain")?.as_str()?,
            verdicts.join(", ")
        ))
    }

    fn run(&self, ctx: &StageContext, params: LegalityParams) -> Result<StageReport, StageError> {
        let tokens_input = ctx.input("tokens")?;
        let val_path = tokens_input.file("val.parquet");
        let tokens = read_column::<UInt16Type>(&val_path, "token")?;
        let rule = text::sentencepiece::ByteTable::read_vocab(&tokens_input.file("vocab.parquet"))?;
        if let Some(bad) = rule.first_unknown(&tokens) {
            return Err(StageError::input(
                &val_path,
                format!("token {bad} is outside the vocabulary"),
            ));
        }
        let original = ChainEnd::read(ctx.input("chain")?)?;
        let mut reruns = Vec::new();
        for (i, cut) in params.cuts.iter().enumerate() {
            let input = ctx.input(CUT_INPUTS[i]).map_err(|_| {
                ctx.error(format!(
                    "input '{}' (the re-run for cuts[{i}]) is not wired: the pipeline wires it",
                    CUT_INPUTS[i]
                ))
            })?;
            let perturbed = perturb(&tokens, cut).map_err(|m| StageError::input(&val_path, m))?;
            reruns.push((perturbed, input.clone()));
        }
        let findings = vec![
            prefix_probe(&original, &reruns)?,
            match &original.distributions {
                Some(_) => model_target_probe(&original, &reruns, &tokens)?,
                None => cache_target_probe(ctx)?,
            },
            match &original.distributions {
                Some(d) => {
                    // The first entry of each sampled position (a window may score one twice).
                    let wanted: std::collections::HashSet<i64> =
                        d.iter().map(|(p, _)| *p).collect();
                    let mut first = std::collections::HashMap::new();
                    let model_p = original.column("model_p")?;
                    let entropy = original.column("entropy")?;
                    for (row, p) in original.position.iter().enumerate() {
                        if wanted.contains(p) {
                            first
                                .entry(*p)
                                .or_insert((model_p[row] as f32, entropy[row] as f32));
                        }
                    }
                    probes::check_distributions(
                        d,
                        &tokens,
                        |p| first.get(&p).copied(),
                        params.tolerance,
                    )
                }
                None => cache_normalised_probe(ctx, params.tolerance)?,
            },
            probes::check_bytes(
                &tokens,
                &rule,
                &original.position,
                &original.column("bits")?,
                &original.bytes()?,
            ),
        ];
        write_findings(&ctx.output("legality.parquet"), &params.chain, &findings)?;
        let failed = findings
            .iter()
            .filter(|f| f.verdict == Verdict::Fail)
            .count();
        let mut report = StageReport::default()
            .with("chain", params.chain.clone())
            .with("failed", failed as u64);
        for f in &findings {
            report = report.with(f.probe, f.verdict.as_str());
        }
        Ok(report)
    }
}

/// The last table of a chain: a pass2 node's `scores`, or a pass-1 node's `pass1` and
/// its kept distributions. Columns are read when compared, one at a time.
struct ChainEnd {
    table: std::path::PathBuf,
    position: Vec<i64>,
    /// Set for a pass-1 chain.
    distributions: Option<Vec<(i64, Vec<f32>)>>,
}

impl ChainEnd {
    fn read(input: &InputArtifact) -> Result<ChainEnd, StageError> {
        let scores = input.file("scores.parquet");
        let pass1 = input.file("pass1.parquet");
        let (table, distributions) = if scores.exists() {
            (scores, None)
        } else if pass1.exists() {
            (
                pass1,
                Some(read_distributions(&input.file("distributions.parquet"))?),
            )
        } else {
            return Err(StageError::input(
                &input.dir,
                "neither scores.parquet nor pass1.parquet: inputs.chain must be a pass2 or a pass1 node",
            ));
        };
        Ok(ChainEnd {
            position: read_column::<Int64Type>(&table, "position")?,
            table,
            distributions,
        })
    }

    /// The columns a legal chain cannot change before a cut.
    fn compared_columns(&self) -> &'static [&'static str] {
        match self.distributions {
            Some(_) => &["model_p", "entropy"],
            None => &["model_p", "p_ngram", "p_final", "bits"],
        }
    }

    fn column(&self, name: &str) -> Result<Vec<f64>, StageError> {
        match (name, &self.distributions) {
            ("model_p" | "entropy", _) => Ok(read_column::<Float32Type>(&self.table, name)?
                .into_iter()
                .map(f64::from)
                .collect()),
            // A pass-1 chain's bits are its model's.
            ("bits", Some(_)) => Ok(self
                .column("model_p")?
                .into_iter()
                .map(|p| -libm::log2(p))
                .collect()),
            // A pass2 table's are derived from its final probability, not stored.
            ("bits", None) => Ok(self
                .column("p_final")?
                .into_iter()
                .map(stage_api::scores::bits)
                .collect()),
            _ => read_column::<Float64Type>(&self.table, name),
        }
    }

    fn bytes(&self) -> Result<Vec<u8>, StageError> {
        read_column::<UInt8Type>(&self.table, "bytes")
    }

    fn distribution_at(&self, position: i64) -> Option<&[f32]> {
        let d = self.distributions.as_ref()?;
        let i = d.binary_search_by_key(&position, |(p, _)| *p).ok()?;
        Some(&d[i].1)
    }
}

fn read_distributions(path: &Path) -> Result<Vec<(i64, Vec<f32>)>, StageError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let position = read_column::<Int64Type>(path, "position")?;
    let model_p = read_column::<Float32Type>(path, "model_p")?;
    let mut out: Vec<(i64, Vec<f32>)> = Vec::new();
    for (&p, &v) in position.iter().zip(&model_p) {
        match out.last_mut() {
            Some((last, probs)) if *last == p => probs.push(v),
            _ => out.push((p, vec![v])),
        }
    }
    Ok(out)
}

/// A re-run's output, read one at a time (at 62M entries each holds gigabytes).
type Rerun = (crate::Perturbed, InputArtifact);

fn prefix_probe(original: &ChainEnd, reruns: &[Rerun]) -> Result<Finding, StageError> {
    if reruns.is_empty() {
        return Ok(Finding::not_applicable(
            probes::PREFIX,
            "no cuts (params.cuts is empty)",
        ));
    }
    let mut checked = 0;
    for (perturbed, rerun) in reruns {
        let rerun = ChainEnd::read(rerun)?;
        let cut = perturbed.cut as i64;
        let mut earliest: Option<probes::Difference> = None;
        for &name in original.compared_columns() {
            let (a, b) = (original.column(name)?, rerun.column(name)?);
            let (difference, n) = probes::first_prefix_difference(
                &original.position,
                &rerun.position,
                (name, &a, &b),
                cut,
            );
            checked += n;
            if let Some(d) = difference {
                if earliest.as_ref().is_none_or(|e| d.row < e.row) {
                    earliest = Some(d);
                }
            }
        }
        if let Some(d) = earliest {
            return Ok(Finding::fail(
                probes::PREFIX,
                checked,
                d.position,
                d.original,
                d.perturbed,
                format!("the stream after position {cut} was shuffled, and {} at position {} (before the cut) changed: the score depends on later tokens", d.column, d.position),
            ));
        }
        // The kept distributions up to the cut must not move either.
        if let Some(d) = &original.distributions {
            for (position, probs) in d.iter().filter(|(p, _)| *p <= cut) {
                checked += probs.len() as u64;
                let other = rerun.distribution_at(*position).unwrap_or(&[]);
                if let Some((v, a, b)) = probes::first_distribution_difference(probs, other) {
                    return Ok(Finding::fail(
                        probes::PREFIX,
                        checked,
                        *position,
                        a as f64,
                        b as f64,
                        format!("the stream after position {cut} was shuffled, and p(candidate {v}) at position {position} (before the cut) changed"),
                    ));
                }
            }
        }
    }
    let cuts: Vec<String> = reruns.iter().map(|(p, _)| p.cut.to_string()).collect();
    Ok(Finding::pass(
        probes::PREFIX,
        checked,
        format!("{checked} values before the cuts (after positions {}) bit-identical when everything after each cut is shuffled", cuts.join(", ")),
    ))
}

fn model_target_probe(
    original: &ChainEnd,
    reruns: &[Rerun],
    tokens: &[u16],
) -> Result<Finding, StageError> {
    let mut checked = 0;
    let mut compared = Vec::new();
    let original_entropy = original.column("entropy")?;
    let first_row = |positions: &[i64], t: i64| positions.iter().position(|&p| p == t);
    for (perturbed, rerun) in reruns {
        let rerun = ChainEnd::read(rerun)?;
        let t = perturbed.changed() as i64;
        let (Some(a), Some(b)) = (original.distribution_at(t), rerun.distribution_at(t)) else {
            continue;
        };
        checked += a.len() as u64;
        let (from, to) = (tokens[t as usize], perturbed.tokens[t as usize]);
        if let Some((v, pa, pb)) = probes::first_distribution_difference(a, b) {
            return Ok(Finding::fail(
                probes::TARGET,
                checked,
                t,
                pa as f64,
                pb as f64,
                format!("with the same prefix, replacing the target at {t} ({from} -> {to}) moved p(candidate {v}): the distribution depends on the target"),
            ));
        }
        // The entropy weights the cache in the blend: it may not see the target either.
        if let (Some(ra), Some(rb)) = (
            first_row(&original.position, t),
            first_row(&rerun.position, t),
        ) {
            checked += 1;
            let (ha, hb) = (original_entropy[ra], rerun.column("entropy")?[rb]);
            if ha.to_bits() != hb.to_bits() {
                return Ok(Finding::fail(
                    probes::TARGET,
                    checked,
                    t,
                    ha,
                    hb,
                    format!("with the same prefix, replacing the target at {t} ({from} -> {to}) moved the entropy the blend reads: it depends on the target"),
                ));
            }
        }
        compared.push(format!("{t} ({from} -> {to})"));
    }
    if compared.is_empty() {
        return Ok(Finding::not_applicable(
            probes::TARGET,
            "no cut's first changed target has a kept distribution in both runs (no cuts, or pass-1's mass_sample/mass_seed differ from the cuts' sample/sample_seed)",
        ));
    }
    Ok(Finding::pass(
        probes::TARGET,
        checked,
        format!(
            "the whole distribution and the entropy unchanged, bit for bit, when only the target changes at {}",
            compared.join(", ")
        ),
    ))
}

/// A cache rule's choice (n-gram order, phrase length) evaluated with every candidate
/// as the target must be the same choice: else the distribution moves with the target.
fn cache_target_probe(ctx: &StageContext) -> Result<Finding, StageError> {
    let Some(mass) = ctx.inputs.get("mass") else {
        return Ok(Finding::not_applicable(
            probes::TARGET,
            "no inputs.mass: wire the chain's audit-mass node",
        ));
    };
    let path = mass.file("mass.parquet");
    let position = read_column::<Int64Type>(&path, "position")?;
    let states = read_column::<UInt32Type>(&path, "states")?;
    let moved = states.iter().filter(|&&s| s > 1).count();
    let Some(row) = states.iter().position(|&s| s > 1) else {
        return Ok(Finding::pass(
            probes::TARGET,
            position.len() as u64,
            format!(
                "at {} sampled positions, the rule makes the same choice whatever the target",
                position.len()
            ),
        ));
    };
    let u8s = |name| read_column::<UInt8Type>(&path, name);
    let u16s = |name| read_column::<UInt16Type>(&path, name);
    let (target_order, other_order) = (u8s("target_order")?[row], u8s("other_order")?[row]);
    let (target_length, other_length) = (u16s("target_length")?[row], u16s("other_length")?[row]);
    let other = u16s("other_token")?[row];
    Ok(Finding::fail(
        probes::TARGET,
        position.len() as u64,
        position[row],
        target_order as f64,
        other_order as f64,
        format!(
            "the rule's choice depends on the target at {moved} of {} sampled positions; at position {}: n-gram order {target_order}, phrase length {target_length} for the true target, order {other_order}, length {other_length} had the target been {other}",
            position.len(),
            position[row]
        ),
    ))
}

fn cache_normalised_probe(ctx: &StageContext, tolerance: f64) -> Result<Finding, StageError> {
    let Some(mass) = ctx.inputs.get("mass") else {
        return Ok(Finding::not_applicable(
            probes::NORMALISED,
            "no inputs.mass: wire the chain's audit-mass node",
        ));
    };
    let path = mass.file("mass.parquet");
    Ok(probes::check_mass(
        &read_column::<Int64Type>(&path, "position")?,
        &read_column::<Float64Type>(&path, "mass")?,
        tolerance,
    ))
}

fn write_findings(path: &Path, chain: &str, findings: &[Finding]) -> Result<u64, StageError> {
    let schema = arrow_schema(LEGALITY_TABLE);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            findings.iter().map(|_| chain),
        )),
        Arc::new(StringArray::from_iter_values(
            findings.iter().map(|f| f.probe),
        )),
        Arc::new(StringArray::from_iter_values(
            findings.iter().map(|f| f.verdict.as_str()),
        )),
        Arc::new(UInt64Array::from_iter_values(
            findings.iter().map(|f| f.checked),
        )),
        Arc::new(Int64Array::from_iter(findings.iter().map(|f| f.position))),
        Arc::new(Float64Array::from_iter(findings.iter().map(|f| f.expected))),
        Arc::new(Float64Array::from_iter(findings.iter().map(|f| f.observed))),
        Arc::new(StringArray::from_iter_values(
            findings.iter().map(|f| f.detail.as_str()),
        )),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).expect("columns match schema");
    write_parquet(
        path,
        schema,
        std::iter::once(batch),
        &ParquetLayout::default(),
    )
}
