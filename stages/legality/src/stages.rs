//! The `legality` stage: reading a chain's runs (the original and every re-run) around
//! the probes.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
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

use crate::perturb::{perturb, CutParams, Kind, Perturbed};
use crate::perturb_stage::{VAL, VOCAB};
use crate::probes::{self, Finding, Verdict};

/// `legality`: the probes' verdicts on one chain.
pub struct LegalityStage;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LegalityParams {
    /// The label of this chain's rows; the pipeline sets it to the chain's last node.
    pub chain: String,
    /// The re-runs: each a `perturb` node and a copy of the chain.
    pub cuts: Vec<CutParams>,
    /// How far from 1 a distribution's sum may be (float rounding over a vocabulary).
    pub tolerance: f64,
    /// `c2-blind`: how far above 1 the estimated mass may be, beyond its interval.
    pub blind_tolerance: f64,
    /// `c2-blind`: the chance that a scorer whose distributions sum to 1 fails it.
    pub false_alarm: f64,
    /// What the cuts, shuffles, replaced targets and asked-about positions are drawn
    /// from; the pipeline fills it with the store's secret (docs/legality.md).
    pub secret: String,
}

impl Default for LegalityParams {
    fn default() -> Self {
        LegalityParams {
            chain: String::new(),
            cuts: vec![
                CutParams {
                    kind: Kind::Shuffle,
                    draw: 1,
                    ..CutParams::default()
                },
                CutParams {
                    kind: Kind::Replace,
                    draw: 2,
                    ..CutParams::default()
                },
            ],
            tolerance: 1e-4,
            blind_tolerance: 0.01,
            false_alarm: 1e-6,
            secret: String::new(),
        }
    }
}

const CUT_INPUTS: [&str; 8] = [
    "cut1", "cut2", "cut3", "cut4", "cut5", "cut6", "cut7", "cut8",
];
/// A cache chain's pass-1, original and re-runs: its distributions and its model_p are
/// the model's own, to be judged like a pass-1 chain's.
const PASS1_INPUTS: [&str; 8] = [
    "pass1_cut1",
    "pass1_cut2",
    "pass1_cut3",
    "pass1_cut4",
    "pass1_cut5",
    "pass1_cut6",
    "pass1_cut7",
    "pass1_cut8",
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
        for (name, value) in [
            ("tolerance", self.tolerance),
            ("blind_tolerance", self.blind_tolerance),
            ("false_alarm", self.false_alarm),
        ] {
            if !(value > 0.0 && value < 1.0) {
                return Err(StageError::invalid_param(
                    name,
                    format!("{value} is not inside (0, 1)"),
                ));
            }
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
        // 2: secret cuts, fresh positions per run, the blind, coverage and sandbox
        // probes, every run's distributions checked, a cache chain's pass-1 judged too.
        version: 2,
        summary: "a chain (pass-1, or pass-1 -> cache -> calibrate -> pass2) and its secret re-runs -> verdicts of the C1, C2, coverage, byte and sandbox probes, with evidence",
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
            Input::optional("pass1", &[]),
            Input::optional("pass1_cut1", &[]),
            Input::optional("pass1_cut2", &[]),
            Input::optional("pass1_cut3", &[]),
            Input::optional("pass1_cut4", &[]),
            Input::optional("pass1_cut5", &[]),
            Input::optional("pass1_cut6", &[]),
            Input::optional("pass1_cut7", &[]),
            Input::optional("pass1_cut8", &[]),
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
            secret_param: Some("secret"),
            inherit: &[
                ("distributions", "mass_sample", "original_sample"),
                ("distributions", "mass_seed", "original_seed"),
            ],
            companion: Some(("distributions", "pass1", &PASS1_INPUTS)),
        }),
        ..StageSpec::NONE
    };

    fn headline(&self, report: &serde_json::Map<String, Value>) -> Option<String> {
        let verdicts: Vec<String> = probes::PROBES
            .iter()
            .filter_map(|p| Some(format!("{p} {}", report.get(*p)?.as_str()?)))
            .collect();
        let claimed = report
            .get("bpb")
            .and_then(Value::as_f64)
            .map_or(String::new(), |b| format!(" (claims BPB {b:.4})"));
        Some(format!(
            "{}{claimed}: {}",
            report.get("chain")?.as_str()?,
            verdicts.join(", ")
        ))
    }

    fn run(&self, ctx: &StageContext, params: LegalityParams) -> Result<StageReport, StageError> {
        let tokens_input = ctx.input("tokens")?;
        let val_path = tokens_input.file("val.parquet");
        let tokens = read_column::<UInt16Type>(&val_path, "token")?;
        let vocab_path = tokens_input.file("vocab.parquet");
        let vocab = read_column::<UInt16Type>(&vocab_path, "id")?.len();
        let rule = text::sentencepiece::ByteTable::read_vocab(&vocab_path)?;
        if let Some(bad) = rule.first_unknown(&tokens) {
            return Err(StageError::input(
                &val_path,
                format!("token {bad} is outside the vocabulary"),
            ));
        }
        let original = Run::read(
            "the original run",
            ctx.input("chain")?,
            ctx.inputs.get("pass1"),
        )?;
        let mut reruns = Vec::new();
        for (i, cut) in params.cuts.iter().enumerate() {
            let wired = |name: &str| {
                ctx.input(name).map_err(|_| {
                    ctx.error(format!(
                        "input '{name}' (the re-run for cuts[{i}]) is not wired: the pipeline wires it"
                    ))
                })
            };
            let end = wired(CUT_INPUTS[i])?;
            let model = match original.end_is_model {
                true => None,
                false => Some(wired(PASS1_INPUTS[i])?),
            };
            let perturbed =
                perturb(&tokens, vocab, cut).map_err(|m| StageError::input(&val_path, m))?;
            let label = format!(
                "re-run {} ({}, cut after {})",
                i + 1,
                match perturbed.kind {
                    Kind::Shuffle => "shuffled",
                    Kind::Replace => "targets replaced",
                },
                perturbed.cut
            );
            reruns.push(Rerun {
                label,
                end,
                model,
                perturbed,
            });
        }
        // Each probe timed, as a phase of the report.
        let mut report = StageReport::default();
        let mut findings = Vec::new();
        let mut clock = std::time::Instant::now();
        let mut record = |report: &mut StageReport, name: &str, finding: Finding| {
            findings.push(finding);
            report.phase(name, clock);
            clock = std::time::Instant::now();
        };
        record(&mut report, "prefix", prefix_probe(&original, &reruns)?);
        record(
            &mut report,
            "target",
            target_probe(ctx, &original, &reruns, &tokens)?,
        );
        let normalised = normalised_probe(ctx, &original, &reruns, &tokens, params.tolerance)?;
        record(&mut report, "normalised", normalised);
        record(&mut report, "blind", blind_probe(&reruns, &params)?);
        let (bits, bytes) = (original.end.column("bits")?, original.end.bytes()?);
        // The BPB the chain claims: every entry counted, as its own stage reports it.
        let claimed =
            bits.iter().sum::<f64>() / bytes.iter().map(|&b| b as u64).sum::<u64>().max(1) as f64;
        let positions = &original.end.position;
        let coverage = probes::check_coverage(tokens.len() - 1, positions, &bits, &bytes);
        record(&mut report, "coverage", coverage);
        let checked_bytes = probes::check_bytes(&tokens, &rule, positions, &bits, &bytes);
        record(&mut report, "bytes", checked_bytes);
        record(&mut report, "sandbox", sandbox_probe(&original, &reruns));
        write_findings(&ctx.output("legality.parquet"), &params.chain, &findings)?;
        let failed = findings
            .iter()
            .filter(|f| f.verdict == Verdict::Fail)
            .count();
        let mut report = report
            .with("chain", params.chain.clone())
            .with("bpb", claimed)
            .with("failed", failed as u64);
        for f in &findings {
            report = report.with(f.probe, f.verdict.as_str());
        }
        Ok(report)
    }
}

/// One run of the chain: its last table, and the model's own pass-1 (the same table for
/// a pass-1 chain) with the distributions the model kept.
struct Run {
    label: String,
    end: Table,
    /// A cache chain's pass-1; none for a pass-1 chain, whose end is its model.
    own_model: Option<Table>,
    end_is_model: bool,
    /// The model's pass-1 artifact, for what its sandbox reported.
    model_dir: PathBuf,
}

impl Run {
    fn read(
        label: &str,
        end: &InputArtifact,
        model: Option<&InputArtifact>,
    ) -> Result<Run, StageError> {
        let end_table = Table::read(end)?;
        let end_is_model = end_table.distributions.is_some();
        let (own_model, model_dir) =
            match (end_is_model, model) {
                (true, _) => (None, end.dir.clone()),
                (false, Some(model)) => {
                    let table = Table::read(model)?;
                    if table.distributions.is_none() {
                        return Err(StageError::input(
                            &table.table,
                            "input 'pass1' is not a pass-1 artifact",
                        ));
                    }
                    (Some(table), model.dir.clone())
                }
                (false, None) => return Err(StageError::input(
                    &end.dir,
                    "a cache chain's judge needs its pass-1 (input 'pass1'): the pipeline wires it",
                )),
            };
        Ok(Run {
            label: label.to_string(),
            end: end_table,
            own_model,
            end_is_model,
            model_dir,
        })
    }

    /// The model's own pass-1 table.
    fn model(&self) -> &Table {
        self.own_model.as_ref().unwrap_or(&self.end)
    }

    fn distributions(&self) -> &[(i64, Vec<f32>)] {
        self.model().distributions.as_deref().unwrap_or(&[])
    }

    fn distribution_at(&self, position: i64) -> Option<&[f32]> {
        let d = self.distributions();
        let i = d.binary_search_by_key(&position, |(p, _)| *p).ok()?;
        Some(&d[i].1)
    }
}

/// A re-run: where its artifacts are and the stream it was run on. Its tables are read
/// by each probe in turn and dropped (at 62M entries a run's positions alone are half a
/// gigabyte).
struct Rerun<'a> {
    label: String,
    end: &'a InputArtifact,
    model: Option<&'a InputArtifact>,
    perturbed: Perturbed,
}

impl Rerun<'_> {
    fn read(&self) -> Result<Run, StageError> {
        Run::read(&self.label, self.end, self.model)
    }
}

/// A chain's table: a pass2 node's `scores`, or a pass-1 node's `pass1` and its kept
/// distributions. Columns are read when compared, one at a time (at 62M entries each
/// holds gigabytes).
struct Table {
    table: PathBuf,
    position: Vec<i64>,
    /// Set for a pass-1 table.
    distributions: Option<Vec<(i64, Vec<f32>)>>,
}

impl Table {
    fn read(input: &InputArtifact) -> Result<Table, StageError> {
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
        Ok(Table {
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

    /// The probability the chain scored its target with.
    fn scored_column(&self) -> &'static str {
        match self.distributions {
            Some(_) => "model_p",
            None => "p_final",
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

    /// The row of each wanted position's first entry (one pass over the positions; a
    /// map of all 62M would cost seconds and gigabytes).
    fn first_rows(&self, wanted: impl IntoIterator<Item = i64>) -> HashMap<i64, usize> {
        let wanted: std::collections::HashSet<i64> = wanted.into_iter().collect();
        let mut first = HashMap::with_capacity(wanted.len());
        for (row, &p) in self.position.iter().enumerate() {
            if wanted.contains(&p) {
                first.entry(p).or_insert(row);
            }
        }
        first
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

/// The first difference, at or before `cut`, between two tables' compared columns:
/// (its row, the finding's pieces).
fn first_difference(
    a: &Table,
    b: &Table,
    cut: i64,
    checked: &mut u64,
) -> Result<Option<probes::Difference>, StageError> {
    let mut earliest: Option<probes::Difference> = None;
    for &name in a.compared_columns() {
        let (x, y) = (a.column(name)?, b.column(name)?);
        let (difference, n) =
            probes::first_prefix_difference(&a.position, &b.position, (name, &x, &y), cut);
        *checked += n;
        if let Some(d) = difference {
            if earliest.as_ref().is_none_or(|e| d.row < e.row) {
                earliest = Some(d);
            }
        }
    }
    Ok(earliest)
}

/// Whether the model scored everything after the cut exactly as in the original run:
/// then it never read the stream it was given (a frozen table), and its re-runs prove
/// nothing.
fn unchanged_after_cut(original: &Table, rerun: &Table, cut: i64) -> Result<bool, StageError> {
    let (a, b) = (original.column("model_p")?, rerun.column("model_p")?);
    if original.position != rerun.position {
        return Ok(false);
    }
    Ok(original
        .position
        .iter()
        .enumerate()
        .filter(|(_, &p)| p > cut + 1)
        .all(|(row, _)| a[row].to_bits() == b[row].to_bits()))
}

fn prefix_probe(original: &Run, reruns: &[Rerun]) -> Result<Finding, StageError> {
    if reruns.is_empty() {
        return Ok(Finding::fail(
            probes::PREFIX,
            0,
            0,
            0.0,
            0.0,
            "cannot be verified: no re-runs (params.cuts is empty)",
        ));
    }
    let mut checked = 0;
    let asked_in_original: BTreeSet<i64> =
        original.distributions().iter().map(|(p, _)| *p).collect();
    let mut asked_only_in_reruns = BTreeSet::new();
    for rerun in reruns {
        let run = &rerun.read()?;
        let cut = rerun.perturbed.cut as i64;
        let what = match rerun.perturbed.kind {
            Kind::Shuffle => "shuffled",
            Kind::Replace => "changed",
        };
        let mut tables = vec![(&original.end, &run.end)];
        if !original.end_is_model {
            tables.push((original.model(), run.model()));
        }
        for (a, b) in tables {
            if let Some(d) = first_difference(a, b, cut, &mut checked)? {
                return Ok(Finding::fail(
                    probes::PREFIX,
                    checked,
                    d.position,
                    d.original,
                    d.perturbed,
                    format!("{}: the stream after position {cut} was {what}, and {} at position {} (before the cut) changed: the score depends on later tokens", run.label, d.column, d.position),
                ));
            }
        }
        // Distributions asked of both runs up to the cut must not move either.
        for (position, probs) in original.distributions().iter().filter(|(p, _)| *p <= cut) {
            let Some(other) = run.distribution_at(*position) else {
                continue;
            };
            checked += probs.len() as u64;
            if let Some((v, a, b)) = probes::first_distribution_difference(probs, other) {
                return Ok(Finding::fail(
                    probes::PREFIX,
                    checked,
                    *position,
                    a as f64,
                    b as f64,
                    format!("{}: the stream after position {cut} was {what}, and p(candidate {v}) at position {position} (before the cut) changed", run.label),
                ));
            }
        }
        if unchanged_after_cut(original.model(), run.model(), cut)? {
            return Ok(Finding::fail(
                probes::PREFIX,
                checked,
                cut + 1,
                0.0,
                0.0,
                format!("cannot be verified: in {}, the model scored every target after the cut exactly as in the original run, although the stream there changed: it did not read the stream it was given (an imported table?)", run.label),
            ));
        }
        asked_only_in_reruns.extend(
            run.distributions()
                .iter()
                .map(|(p, _)| *p)
                .filter(|p| *p <= cut && !asked_in_original.contains(p)),
        );
    }
    let n = asked_only_in_reruns.len();
    let cuts: Vec<String> = reruns.iter().map(|r| r.perturbed.cut.to_string()).collect();
    Ok(Finding::pass(
        probes::PREFIX,
        checked,
        format!(
            "{checked} values before the secret cuts (after positions {}) bit-identical when everything after each cut changes; {n} positions before the cuts were asked about only in a re-run, where the distribution must give the model_p the original scored: a scorer honest only where it is asked escapes them with probability (1−f)^{n} when it cheats at a fraction f of positions (5% once f ≥ {:.3}%); a leak confined to a fraction r of the stream escapes the {} cuts with probability about (1−r)^{}",
            cuts.join(", "),
            escape_fraction(n),
            cuts.len(),
            cuts.len()
        ),
    ))
}

/// The fraction f of cheated positions above which a cheat escapes `n` checked positions
/// with probability below 5%: (1 − f)^n = 0.05, in percent.
fn escape_fraction(n: usize) -> f64 {
    if n == 0 {
        return 100.0;
    }
    100.0 * (1.0 - 0.05f64.powf(1.0 / n as f64))
}

fn target_probe(
    ctx: &StageContext,
    original: &Run,
    reruns: &[Rerun],
    tokens: &[u16],
) -> Result<Finding, StageError> {
    let model = model_target_probe(original, reruns, tokens)?;
    if original.end_is_model || model.verdict == Verdict::Fail {
        return Ok(model);
    }
    // A cache chain: its model, then its rule.
    let rule = cache_target_probe(ctx)?;
    if rule.verdict == Verdict::Fail {
        return Ok(rule);
    }
    Ok(Finding {
        detail: format!(
            "the model: {}; the cache rule: {}",
            model.detail, rule.detail
        ),
        checked: model.checked + rule.checked,
        ..rule
    })
}

fn model_target_probe(
    original: &Run,
    reruns: &[Rerun],
    tokens: &[u16],
) -> Result<Finding, StageError> {
    let mut checked = 0;
    let mut compared = Vec::new();
    let original_entropy = original.model().column("entropy")?;
    let original_first = original
        .model()
        .first_rows(reruns.iter().map(|r| r.perturbed.changed() as i64));
    for rerun in reruns {
        let t = rerun.perturbed.changed() as i64;
        let (from, to) = (tokens[t as usize], rerun.perturbed.tokens[t as usize]);
        if from == to {
            continue;
        }
        let run = &rerun.read()?;
        let (Some(a), Some(b)) = (original.distribution_at(t), run.distribution_at(t)) else {
            continue;
        };
        checked += a.len() as u64;
        if let Some((v, pa, pb)) = probes::first_distribution_difference(a, b) {
            return Ok(Finding::fail(
                probes::TARGET,
                checked,
                t,
                pa as f64,
                pb as f64,
                format!("{}: with the same prefix, replacing the target at {t} ({from} -> {to}) moved p(candidate {v}): the distribution depends on the target", run.label),
            ));
        }
        // The entropy weights the cache in the blend: it may not see the target either.
        let rerun_first = run.model().first_rows([t]);
        if let (Some(&ra), Some(&rb)) = (original_first.get(&t), rerun_first.get(&t)) {
            checked += 1;
            let (ha, hb) = (original_entropy[ra], run.model().column("entropy")?[rb]);
            if ha.to_bits() != hb.to_bits() {
                return Ok(Finding::fail(
                    probes::TARGET,
                    checked,
                    t,
                    ha,
                    hb,
                    format!("{}: with the same prefix, replacing the target at {t} ({from} -> {to}) moved the entropy the blend reads: it depends on the target", run.label),
                ));
            }
        }
        compared.push(format!("{t} ({from} -> {to})"));
    }
    if compared.is_empty() {
        return Ok(Finding::fail(
            probes::TARGET,
            0,
            0,
            0.0,
            0.0,
            "cannot be verified: the original run kept no distribution at any re-run's changed target (pass-1's mass_sample is 0, or an imported table)",
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
        return Ok(Finding::fail(
            probes::TARGET,
            0,
            0,
            0.0,
            0.0,
            "cannot be verified: the cache rule's choices are read from its audit-mass node; wire it as inputs.mass",
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

/// C2 of every run's distributions, each against what that run scored; and for a cache
/// chain, the implied mass of its final distribution.
fn normalised_probe(
    ctx: &StageContext,
    original: &Run,
    reruns: &[Rerun],
    tokens: &[u16],
    tolerance: f64,
) -> Result<Finding, StageError> {
    let mut checked = 0;
    let mut worst: Option<(i64, f64)> = None;
    let mut with_distributions = 0;
    for index in 0..=reruns.len() {
        let read;
        let (run, stream) = match index {
            0 => (original, tokens),
            i => {
                read = reruns[i - 1].read()?;
                (&read, reruns[i - 1].perturbed.tokens.as_slice())
            }
        };
        let model_p = run.model().column("model_p")?;
        let entropy = run.model().column("entropy")?;
        let first = run
            .model()
            .first_rows(run.distributions().iter().map(|(p, _)| *p));
        let scored_at = |p: i64| {
            first
                .get(&p)
                .map(|&row| (model_p[row] as f32, entropy[row] as f32))
        };
        match probes::check_distributions(
            &run.label,
            run.distributions(),
            stream,
            scored_at,
            tolerance,
        ) {
            Err(failure) => return Ok(failure),
            Ok((n, run_worst)) => {
                checked += n;
                with_distributions += usize::from(n > 0);
                if let Some((p, s)) = run_worst {
                    if worst.is_none_or(|(_, w)| (s - 1.0).abs() > (w - 1.0).abs()) {
                        worst = Some((p, s));
                    }
                }
            }
        }
    }
    let Some((position, sum)) = worst else {
        return Ok(Finding::fail(
            probes::NORMALISED,
            0,
            0,
            1.0,
            f64::NAN,
            "cannot be verified: no run kept a distribution (an imported table keeps none)",
        ));
    };
    let model = Finding {
        position: Some(position),
        expected: Some(1.0),
        observed: Some(sum),
        ..Finding::pass(
            probes::NORMALISED,
            checked,
            format!(
                "Σ_v p(v) at {checked} positions in {with_distributions} runs, each equal at its target to the model_p the run scored, with the entropy it scored; worst {sum:.9} at position {position}; tolerance {tolerance:e}"
            ),
        )
    };
    if original.end_is_model {
        return Ok(model);
    }
    let rule = cache_normalised_probe(ctx, tolerance)?;
    if rule.verdict == Verdict::Fail {
        return Ok(rule);
    }
    Ok(Finding {
        detail: format!("the model: {}; the chain: {}", model.detail, rule.detail),
        checked: model.checked + rule.checked,
        ..rule
    })
}

fn cache_normalised_probe(ctx: &StageContext, tolerance: f64) -> Result<Finding, StageError> {
    let Some(mass) = ctx.inputs.get("mass") else {
        return Ok(Finding::fail(
            probes::NORMALISED,
            0,
            0,
            1.0,
            f64::NAN,
            "cannot be verified: the cache chain's implied mass is read from its audit-mass node; wire it as inputs.mass",
        ));
    };
    let path = mass.file("mass.parquet");
    Ok(probes::check_mass(
        &read_column::<Int64Type>(&path, "position")?,
        &read_column::<Float64Type>(&path, "mass")?,
        tolerance,
    ))
}

/// The replace re-runs' importance weights p(u)/q(u) at their hidden targets, from the
/// probability the chain's last stage scored each with.
fn blind_probe(reruns: &[Rerun], params: &LegalityParams) -> Result<Finding, StageError> {
    let mut weights = Vec::new();
    let mut replaced = 0;
    for rerun in reruns.iter().filter(|r| r.perturbed.kind == Kind::Replace) {
        replaced += 1;
        let run = rerun.read()?;
        let end = &run.end;
        let scored = end.column(end.scored_column())?;
        let first = end.first_rows(rerun.perturbed.hidden.iter().map(|h| h.position));
        for hidden in &rerun.perturbed.hidden {
            if let Some(&row) = first.get(&hidden.position) {
                weights.push((hidden.position, scored[row] / hidden.q));
            }
        }
    }
    if replaced == 0 {
        return Ok(Finding::fail(
            probes::BLIND,
            0,
            0,
            1.0,
            f64::NAN,
            "cannot be verified: no re-run replaces targets (params.cuts has no kind = \"replace\" entry)",
        ));
    }
    let z = probes::one_sided_z(params.false_alarm);
    Ok(probes::check_blind(
        &weights,
        z,
        params.blind_tolerance,
        params.false_alarm,
    ))
}

/// Whether every run of a scorer process was confined; a built-in source is the
/// project's own code and has nothing to confine.
fn sandbox_probe(original: &Run, reruns: &[Rerun]) -> Finding {
    let runs = std::iter::once((original.label.clone(), original.model_dir.clone())).chain(
        reruns
            .iter()
            .map(|r| (r.label.clone(), r.model.unwrap_or(r.end).dir.clone())),
    );
    let mut reports = Vec::new();
    for (label, dir) in runs {
        let path = dir.join("sandbox.json");
        if !path.exists() {
            continue;
        }
        let isolation = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<sandbox::Isolation>(&b).ok());
        match isolation {
            Some(i) if i.confined() => reports.push(i.describe()),
            Some(i) => {
                return Finding::fail(
                    probes::SANDBOX,
                    reports.len() as u64 + 1,
                    0,
                    1.0,
                    0.0,
                    format!("the verdicts above were reached without a sandbox: {label} ran with {}: the scorer could read the store (the original stream among it) and keep state between runs", i.describe()),
                )
            }
            None => {
                return Finding::fail(
                    probes::SANDBOX,
                    reports.len() as u64 + 1,
                    0,
                    1.0,
                    0.0,
                    format!("{label}: {} is unreadable: whether the scorer was confined is unknown", path.display()),
                )
            }
        }
    }
    if reports.is_empty() {
        return Finding::pass(
            probes::SANDBOX,
            0,
            "a built-in source (cachemoney's own code): no scorer process to confine",
        );
    }
    reports.dedup();
    Finding::pass(
        probes::SANDBOX,
        reports.len() as u64,
        format!(
            "every run of the scorer was confined: {}",
            reports.join("; ")
        ),
    )
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
