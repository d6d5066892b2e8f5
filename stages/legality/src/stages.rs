//! The `legality` stage: reading a chain's runs (the original and every re-run) around
//! the probes.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::UInt16Type;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use stage_api::products;
use stage_api::{
    arrow_schema, read_column, write_parquet, Column, ColumnType::*, Input, Output, ParquetLayout,
    Read, Reruns, Stage, StageContext, StageError, StageParams, StageReport, StageSpec,
};

use crate::checklist::{read_finding, FINDING, FINDING_READ};
use crate::judge::{blind_probe, normalised_probe, prefix_probe, sandbox_probe, target_probe};
use crate::order_finding::order_probe;
use crate::perturb::{perturb_aimed, CutParams, Kind, Perturbed};
use crate::perturb_stage::{read_classes, read_hints, HINTS, VAL, VOCAB};
use crate::probes::{self, Finding, Verdict};
use crate::runs::{Rerun, Run};

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
    /// The fewest whole distributions the original run may keep: with fewer, the
    /// positions a re-run asks about are too few to catch a scorer honest only where it
    /// is asked, and `c1-prefix` cannot be verified.
    pub min_sample: usize,
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
            min_sample: 512,
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
            // Checked when the pipeline makes the re-runs.
            Input::required("chain", &[]).described(
                "the chain judged: a pass-1 node (pass1, distributions), or a pass2 node (scores) and what it was built from",
            ),
            Input::optional("mass", &[MASS]),
            // The reviewer's checklist: an `overlap` and an `artifact` node's finding.
            Input::optional("overlap", &[FINDING_READ]),
            Input::optional("artifact", &[FINDING_READ]),
            // A tilt chain's hints, which aimed its replace re-runs.
            Input::by_pipeline("hints", &[HINTS]),
            // The re-runs' ends, and their pass-1 when the end is not a pass-1.
            Input::by_pipeline("cut1", &[]),
            Input::by_pipeline("cut2", &[]),
            Input::by_pipeline("cut3", &[]),
            Input::by_pipeline("cut4", &[]),
            Input::by_pipeline("cut5", &[]),
            Input::by_pipeline("cut6", &[]),
            Input::by_pipeline("cut7", &[]),
            Input::by_pipeline("cut8", &[]),
            Input::by_pipeline("pass1", &[]),
            Input::by_pipeline("pass1_cut1", &[]),
            Input::by_pipeline("pass1_cut2", &[]),
            Input::by_pipeline("pass1_cut3", &[]),
            Input::by_pipeline("pass1_cut4", &[]),
            Input::by_pipeline("pass1_cut5", &[]),
            Input::by_pipeline("pass1_cut6", &[]),
            Input::by_pipeline("pass1_cut7", &[]),
            Input::by_pipeline("pass1_cut8", &[]),
        ],
        outputs: &[Output::table(products::LEGALITY.name, LEGALITY_TABLE)],
        metrics: &["failed"],
        reruns: Some(Reruns {
            input: "chain",
            label_param: Some("chain"),
            // A tilt chain's hints are recomputed on each perturbed stream too.
            members: &[
                products::SCORES.name,
                products::PASS1.name,
                products::MATCHES.name,
                products::CALIBRATION.name,
                products::HINTS.name,
            ],
            source_table: "val",
            param: "cuts",
            stage: "perturb",
            wired_as: &CUT_INPUTS,
            secret_param: Some("secret"),
            inherit: &[
                ("distributions", "mass_sample", "original_sample"),
                ("distributions", "mass_seed", "original_seed"),
                ("distributions", "order", "order"),
                ("distributions", "threshold", "hint_threshold"),
            ],
            secret_seeds: &[("distributions", "mass_seed")],
            companion: Some(("distributions", "pass1", &PASS1_INPUTS)),
            guides: &[("hints", "hints")],
        }),
        ..StageSpec::NONE
    };

    fn headline(&self, report: &serde_json::Map<String, Value>) -> Option<String> {
        let report = LegalityReport::from_report(report)?;
        let verdicts: Vec<String> = probes::PROBES
            .iter()
            .filter_map(|p| Some(format!("{p} {}", report.verdicts.get(*p)?)))
            .collect();
        let claimed = report
            .bpb
            .map_or(String::new(), |b| format!(" (claims BPB {b:.4})"));
        Some(format!(
            "{}{claimed}: {}",
            report.chain,
            verdicts.join(", ")
        ))
    }

    fn run(&self, ctx: &StageContext, params: LegalityParams) -> Result<StageReport, StageError> {
        let tokens_input = ctx.input("tokens")?;
        let val_path = tokens_input.file("val.parquet");
        let tokens = read_column::<UInt16Type>(&val_path, "token")?;
        let doc = read_column::<arrow::datatypes::UInt32Type>(&val_path, "doc")?;
        let vocab_path = tokens_input.file("vocab.parquet");
        let rule = text::sentencepiece::ByteTable::read_vocab(&vocab_path)?;
        if let Some(bad) = rule.first_unknown(&tokens) {
            return Err(StageError::input(
                &val_path,
                format!("token {bad} is outside the vocabulary"),
            ));
        }
        let classes = read_classes(&vocab_path, &rule)?;
        let original = Run::read(
            "the original run",
            ctx.input("chain")?,
            ctx.inputs.get("pass1"),
        )?;
        // The perturbed streams, again (the judge needs each stream and its hidden
        // targets), computed side by side.
        // The chain's hints, read once for every cut.
        let hints = read_hints(ctx, tokens.len())?;
        let perturbed: Vec<_> = {
            use rayon::prelude::*;
            params
                .cuts
                .par_iter()
                .map(|cut| {
                    perturb_aimed(&tokens, &doc, &classes, cut, hints.as_ref())
                        .map_err(|m| StageError::input(&val_path, m))
                })
                .collect::<Result<_, _>>()?
        };
        let reruns = wire_reruns(ctx, &original, perturbed)?;
        // Each probe timed, as a phase of the report.
        let mut report = StageReport::default();
        let mut findings = Vec::new();
        let mut clock = std::time::Instant::now();
        let mut record = |report: &mut StageReport, name: &str, finding: Finding| {
            findings.push(finding);
            report.phase(name, clock);
            clock = std::time::Instant::now();
        };
        let mut prefix = prefix_probe(&original, &reruns)?;
        let asked = original.distributions().len();
        if prefix.verdict == Verdict::Pass && asked < params.min_sample {
            prefix = Finding::fail(
                probes::PREFIX,
                prefix.checked,
                0,
                params.min_sample as f64,
                asked as f64,
                format!("cannot be verified: the original run keeps {asked} whole distributions, fewer than min_sample ({}): the positions a re-run asks about before its cut are too few to catch a scorer honest only where it is asked; raise the chain's mass_sample", params.min_sample),
            );
        }
        record(&mut report, "prefix", prefix);
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
        let positions = &original.end.positions.to_slice();
        let coverage = probes::check_coverage(tokens.len() - 1, positions, &bits, &bytes);
        record(&mut report, "coverage", coverage);
        let checked_bytes = probes::check_bytes(&tokens, &rule, positions, &bits, &bytes);
        record(&mut report, "bytes", checked_bytes);
        record(&mut report, "sandbox", sandbox_probe(&original, &reruns));
        // The orders the chain's pass-1 declares (every cut inherits them).
        let declared = params
            .cuts
            .iter()
            .map(|cut| &cut.order)
            .find(|order| !order.is_empty())
            .cloned()
            .unwrap_or_default();
        if let Some(order) = order_probe(&original, &reruns, &declared)? {
            record(&mut report, "order", order);
        }
        for name in ["overlap", "artifact"] {
            if let Some(input) = ctx.inputs.get(name) {
                record(&mut report, name, read_finding(&input.file(FINDING))?);
            }
        }
        write_findings(&ctx.output("legality.parquet"), &params.chain, &findings)?;
        let failed = findings
            .iter()
            .filter(|f| f.verdict == Verdict::Fail)
            .count();
        Ok(report.with_fields(&LegalityReport {
            chain: params.chain.clone(),
            bpb: claimed.is_finite().then_some(claimed),
            failed: failed as u64,
            verdicts: findings
                .iter()
                .map(|f| (f.probe.to_string(), f.verdict.as_str().to_string()))
                .collect(),
        }))
    }
}

/// What a legality node reports: the chain judged, the BPB it claims, how many probes
/// failed, and each probe's verdict under its name; `legality`, `compare` and the
/// headline read it as this type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LegalityReport {
    pub chain: String,
    /// Every entry counted, as the chain's own stage reports it (null if not a number).
    pub bpb: Option<f64>,
    pub failed: u64,
    /// Probe name → "pass" or "fail".
    #[serde(flatten)]
    pub verdicts: std::collections::BTreeMap<String, String>,
}

impl LegalityReport {
    /// A legality node's report, from its manifest's (none from another stage's).
    pub fn from_report(report: &serde_json::Map<String, Value>) -> Option<Self> {
        stage_api::report_fields(report)
    }
}

/// The re-runs, one per cut, each read from the inputs the pipeline wired for it (the
/// chain's end, and its pass-1 where the end is not the scorer's own).
fn wire_reruns<'a>(
    ctx: &'a StageContext,
    original: &Run,
    perturbed: Vec<Perturbed>,
) -> Result<Vec<Rerun<'a>>, StageError> {
    let mut reruns = Vec::new();
    for (i, perturbed) in perturbed.into_iter().enumerate() {
        let wired = |name: &str| {
            ctx.input(name).map_err(|_| {
                ctx.error(format!(
                    "input '{name}' (the re-run for cuts[{i}]) is not wired: the pipeline wires it"
                ))
            })
        };
        let end = wired(CUT_INPUTS[i])?;
        let model = match original.end_is_model {
            // A tilt chain's pass-1, wired when the end is not the scorer's own.
            true => ctx.inputs.get(PASS1_INPUTS[i]),
            false => Some(wired(PASS1_INPUTS[i])?),
        };
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
            run: Default::default(),
        });
    }
    Ok(reruns)
}

pub(crate) fn write_findings(
    path: &Path,
    chain: &str,
    findings: &[Finding],
) -> Result<u64, StageError> {
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
