//! The `tilt` stage: a pass-1 with its hints' probabilities, tilted. Its output has a
//! pass-1's shape (a model on top of a model: `model_p` is the tilted probability of the
//! target, `entropy` the tilted distribution's, the kept distributions tilted too), so
//! that the legality probes, `compare`, the report and SQL treat a tilt chain like any
//! other, and it keeps, per entry, the base probability, the hint and whether it fired.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, BooleanArray, Float32Array, Int64Array, RecordBatch, UInt8Array};
use arrow::datatypes::{Float32Type, Int64Type, UInt16Type, UInt8Type};
use serde::{Deserialize, Serialize};
use stage_api::products;
use stage_api::{
    arrow_schema, write_parquet_parallel, Column, ColumnType::*, Input, Output, ParquetLayout,
    ParquetTable, Read, Stage, StageContext, StageError, StageParams, StageReport, StageSpec,
};

use crate::hints::THRESHOLD;
use crate::tilt::{tilted, LnProduct};

pub struct TiltStage;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TiltParams {
    /// Added to the hint's logit where the gate is open (#2135: 2.625).
    pub beta: f64,
    /// The gate: a hint fires when its context's share is at least this, compared in
    /// f32 as the reference does (#2135: 0.8).
    pub threshold: f32,
    /// #1514's boost, in place of `beta`: β = this × the hint's share (§2.7: 2.0, with
    /// `threshold = 0`, its hints being gated already). Left out of the canonical form
    /// when absent, so #2135's recipes are what they were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta_per_share: Option<f64>,
}

impl TiltParams {
    /// The boost of a hint with this share, 0 where the gate is shut.
    fn beta(&self, share: f32) -> f64 {
        if share < self.threshold {
            return 0.0;
        }
        match self.beta_per_share {
            Some(k) => k * share as f64,
            None => self.beta,
        }
    }
}

impl Default for TiltParams {
    fn default() -> Self {
        TiltParams {
            beta: 2.625,
            threshold: THRESHOLD,
            beta_per_share: None,
        }
    }
}

impl StageParams for TiltParams {
    fn validate(&self) -> Result<(), StageError> {
        if !(self.beta.is_finite() && self.beta >= 0.0 && self.beta <= 20.0) {
            return Err(StageError::invalid_param(
                "beta",
                format!("{} is not in [0, 20]", self.beta),
            ));
        }
        if let Some(k) = self.beta_per_share {
            if !(k.is_finite() && (0.0..=20.0).contains(&k)) {
                return Err(StageError::invalid_param(
                    "beta_per_share",
                    format!("{k} is not in [0, 20]"),
                ));
            }
        }
        if !(self.threshold >= 0.0 && self.threshold <= 1.0) {
            return Err(StageError::invalid_param(
                "threshold",
                format!("{} is not a share in [0, 1]", self.threshold),
            ));
        }
        Ok(())
    }
}

/// The tilted pass-1: its first four columns are a pass-1's, then whether the hint
/// fired. The base probability, the hint and its probability are the input pass-1's
/// (`model_p` of its `pass1`, `hint` and `hint_p` of its `hint_p`, same rows): not
/// copied, a 62M-row table is written in half the time without them.
pub const TILTED_TABLE: &[Column] = &[
    Column::new("position", I64),
    Column::new("model_p", F32),
    Column::new("entropy", F32),
    Column::new("bytes", U8),
    Column::new("fired", Bool),
    Column::derived(
        "bits",
        F64,
        "-ln(greatest(model_p, 1e-12)) / 0.6931471805599453",
    ),
];

impl Stage for TiltStage {
    type Params = TiltParams;

    const SPEC: StageSpec = StageSpec {
        kind: "tilt",
        version: 1,
        summary: "pass-1 (with inputs.hints) + hints -> the pass-1 with each fired hint's logit boosted by beta and the distribution renormalised (the legal n-gram tilt)",
        inputs: &[
            Input::required("tokens", &[products::VAL.read(&["token"])]),
            Input::required(
                "pass1",
                &[
                    products::PASS1.read(&["position", "model_p", "entropy", "bytes"]),
                    Read::table("hint_p", &["position", "hint", "hint_p"]),
                    products::DISTRIBUTIONS.read(&["position", "candidate", "model_p"]),
                ],
            ),
            Input::required("hints", &[products::HINTS.read(&["position", "hint", "share"])]),
        ],
        outputs: &[
            Output::table(products::PASS1.name, TILTED_TABLE),
            Output::table(products::DISTRIBUTIONS.name, pass1::DISTRIBUTIONS_TABLE),
        ],
        metrics: &["neural_bpb", "bpb_before"],
        ..StageSpec::NONE
    };

    fn headline(&self, report: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
        let r = TiltReport::from_report(report)?;
        Some(format!(
            "BPB {:.4} -> {:.4}: {} hints fired ({:.2}% of entries), {:.1}% of them hits",
            r.bpb_before,
            r.neural_bpb,
            r.fired,
            r.fire_rate * 100.0,
            r.hit_rate * 100.0
        ))
    }

    fn run(&self, ctx: &StageContext, params: TiltParams) -> Result<StageReport, StageError> {
        let started = Instant::now();
        let pass1 = ctx.input("pass1")?;
        let hint_p_path = pass1.file("hint_p.parquet");
        if !hint_p_path.exists() {
            return Err(StageError::input(
                &pass1.dir,
                "this pass-1 wrote no hint_p table: wire its inputs.hints to the tilt's hints node",
            ));
        }
        let inputs = Inputs {
            val: ParquetTable::open(&ctx.input("tokens")?.file("val.parquet"))?,
            pass1: ParquetTable::open(&pass1.file("pass1.parquet"))?,
            hint_p: ParquetTable::open(&hint_p_path)?,
            hints: ParquetTable::open(&ctx.input("hints")?.file("hints.parquet"))?,
        };
        let n = inputs.pass1.rows();
        let (entries, targets) = (inputs.hint_p.rows(), inputs.hints.rows());
        if entries != n || targets + 1 != inputs.val.rows() {
            return Err(StageError::input(
                &hint_p_path,
                format!(
                    "{entries} hint probabilities for {n} entries, {targets} hints for {} targets: another stream's",
                    inputs.val.rows().saturating_sub(1)
                ),
            ));
        }
        let distributions = pass1.file("distributions.parquet");
        let mut kept = stage_api::read_distributions(&distributions)?;
        let kept_positions: Vec<i64> = kept.iter().map(|(p, _)| *p).collect();
        // Each row group is read, tilted and encoded in one task (the writer's), so no
        // column is ever whole in memory; its sums come back in group order, the same
        // figures on any number of threads, with the hints of the kept distributions'
        // positions it met.
        let fixed = Boost::new(params.beta);
        let groups = write_parquet_parallel(
            &ctx.output("pass1.parquet"),
            arrow_schema(TILTED_TABLE),
            n,
            &ParquetLayout::delta(&["position"]).uncompressed(&["model_p", "entropy"]),
            |range| inputs.tilt(range, &params, &fixed, &kept_positions),
        )?;
        let mut report = StageReport::default();
        report.phase("read, tilt and write", started);
        let started = Instant::now();
        let mut total = Totals::default();
        let mut kept_hints = vec![None; kept.len()];
        for (sums, met) in &groups {
            total.add(sums);
            for &(index, hint, share) in met {
                kept_hints[index].get_or_insert((hint, share));
            }
        }
        for ((p, probs), hint) in kept.iter_mut().zip(kept_hints) {
            let (h, share) = hint.ok_or_else(|| {
                StageError::input(
                    &distributions,
                    format!("position {p} is kept but has no entry in the pass-1"),
                )
            })?;
            let h = h as usize;
            let q = *probs.get(h).ok_or_else(|| {
                StageError::input(&distributions, format!("position {p}: no candidate {h}"))
            })? as f64;
            let beta = params.beta(share);
            for (a, v) in probs.iter_mut().enumerate() {
                *v = tilted(*v as f64, q, a == h, beta) as f32;
            }
        }
        // Written as the pass-1's are: a tilted pass-1 is a pass-1.
        pass1::Pass1Table {
            distributions: kept,
            ..Default::default()
        }
        .write_distributions(&ctx.output("distributions.parquet"))?;
        report.phase("distributions", started);
        let (fired, hits) = (total.fired, total.hits);
        let before = (total.nats_before, total.bytes);
        let after = (total.nats_after, total.bytes);
        let bits_saved = (before.0 - after.0) / std::f64::consts::LN_2;
        Ok(report.with_fields(&TiltReport {
            entries: n as u64,
            bytes: before.1,
            bpb_before: before.0 / (std::f64::consts::LN_2 * before.1.max(1) as f64),
            neural_bpb: after.0 / (std::f64::consts::LN_2 * after.1.max(1) as f64),
            fired,
            fire_rate: fired as f64 / n.max(1) as f64,
            hit_rate: hits as f64 / fired.max(1) as f64,
            bits_saved_per_fired: bits_saved / fired.max(1) as f64,
        }))
    }
}

/// What `tilt` reports: a pass-1's report (`neural_bpb` is the tilted BPB, so the tilt
/// joins a chain as a pass-1 does), with the BPB before the tilt and how the hints did;
/// `report` and the headline read it as this type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TiltReport {
    pub entries: u64,
    pub bytes: u64,
    pub bpb_before: f64,
    pub neural_bpb: f64,
    pub fired: u64,
    pub fire_rate: f64,
    pub hit_rate: f64,
    pub bits_saved_per_fired: f64,
}

impl TiltReport {
    /// A tilt node's report, from its manifest's (none from another stage's).
    pub fn from_report(report: &serde_json::Map<String, serde_json::Value>) -> Option<Self> {
        stage_api::report_fields(report)
    }
}

/// The four tables a tilt reads, their footers read once: the val tokens, the pass-1,
/// its hints' probabilities (same rows) and the hints node's table (one row a target).
struct Inputs {
    val: ParquetTable,
    pass1: ParquetTable,
    hint_p: ParquetTable,
    hints: ParquetTable,
}

/// A row group's counts, and the products of its target probabilities before and after
/// the tilt (their logarithms are its nats).
#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    fired: u64,
    hits: u64,
    before: LnProduct,
    after: LnProduct,
    bytes: u64,
}

/// The sums of all row groups, added in group order.
#[derive(Debug, Default)]
struct Totals {
    fired: u64,
    hits: u64,
    nats_before: f64,
    nats_after: f64,
    bytes: u64,
}

impl Totals {
    fn add(&mut self, group: &Sums) {
        self.fired += group.fired;
        self.hits += group.hits;
        self.nats_before -= group.before.ln();
        self.nats_after -= group.after.ln();
        self.bytes += group.bytes;
    }
}

/// A kept distribution's index among them, its hint and the hint's share.
type KeptHint = (usize, u16, f32);

impl Inputs {
    /// The tilted rows `range` of the pass-1, as a batch of the tilted table; their
    /// sums; and the hints of the kept positions among their targets.
    fn tilt(
        &self,
        range: std::ops::Range<usize>,
        params: &TiltParams,
        fixed: &Boost,
        kept: &[i64],
    ) -> Result<(RecordBatch, (Sums, Vec<KeptHint>)), StageError> {
        let rows = range.clone();
        let position = self
            .pass1
            .column_rows::<Int64Type>("position", rows.clone())?;
        let base_p = self
            .pass1
            .column_rows::<Float32Type>("model_p", rows.clone())?;
        let entropy = self
            .pass1
            .column_rows::<Float32Type>("entropy", rows.clone())?;
        let bytes = self.pass1.column_rows::<UInt8Type>("bytes", rows.clone())?;
        let hint = self
            .hint_p
            .column_rows::<UInt16Type>("hint", rows.clone())?;
        let hint_p = self.hint_p.column_rows::<Float32Type>("hint_p", rows)?;
        // The targets these entries score, and so the rows of the val tokens (one a
        // position) and of the hints (one a target, from position 1) they need.
        let first = position.iter().min().copied().unwrap_or(1);
        let last = position.iter().max().copied().unwrap_or(0);
        if first < 1 || last >= self.val.rows() as i64 {
            let p = if first < 1 { first } else { last };
            return Err(StageError::input(
                self.pass1.path(),
                format!(
                    "position {p} is not a target of the val stream (1 to {})",
                    self.hints.rows()
                ),
            ));
        }
        // (No rows: first 1 and last 0, an empty span.)
        let span = first as usize..(last + 1) as usize;
        let val = self.val.column_rows::<UInt16Type>("token", span.clone())?;
        let hints = self
            .hints
            .column_rows::<UInt16Type>("hint", span.start - 1..span.end - 1)?;
        let share = self
            .hints
            .column_rows::<Float32Type>("share", span.start - 1..span.end - 1)?;
        let len = position.len();
        let (mut model_p, mut tilted_entropy, mut fired) = (
            Vec::with_capacity(len),
            Vec::with_capacity(len),
            Vec::with_capacity(len),
        );
        let mut sums = Sums::default();
        for row in 0..len {
            let p = position[row];
            let at = p as usize - span.start;
            if hints[at] != hint[row] {
                return Err(StageError::input(
                    self.hint_p.path(),
                    format!("row {} (position {p}): the hint is not the hints node's: the pass-1 read another hints artifact", range.start + row),
                ));
            }
            let beta = params.beta(share[at]);
            let (base, h) = (base_p[row], entropy[row]);
            let (tilted_p, tilted_h) = if beta > 0.0 {
                let (q, hit) = (hint_p[row] as f64, val[at] == hint[row]);
                let per_share;
                let boost = match params.beta_per_share {
                    None => fixed,
                    Some(_) => {
                        per_share = Boost::new(beta);
                        &per_share
                    }
                };
                sums.fired += 1;
                sums.hits += hit as u64;
                (
                    boost.tilt(base as f64, q, hit) as f32,
                    boost.entropy(h as f64, q) as f32,
                )
            } else {
                // β = 0: the base distribution as it is.
                (base, h)
            };
            sums.before.times(base as f64);
            sums.after.times(tilted_p as f64);
            sums.bytes += bytes[row] as u64;
            model_p.push(tilted_p);
            tilted_entropy.push(tilted_h);
            fired.push(beta > 0.0);
        }
        // The kept positions among these targets, with their hints.
        let from = kept.partition_point(|&k| k < span.start as i64);
        let to = kept.partition_point(|&k| k < span.end as i64);
        let met = (from..to)
            .map(|index| {
                let at = kept[index] as usize - span.start;
                (index, hints[at], share[at])
            })
            .collect();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(position)),
            Arc::new(Float32Array::from(model_p)),
            Arc::new(Float32Array::from(tilted_entropy)),
            Arc::new(UInt8Array::from(bytes)),
            Arc::new(BooleanArray::from(fired)),
        ];
        let batch = RecordBatch::try_new(arrow_schema(TILTED_TABLE), columns)
            .expect("columns match schema");
        Ok((batch, (sums, met)))
    }
}

/// A boost with its exponentials taken once (62M targets would take them 62M times).
struct Boost {
    beta: f64,
    exp: f64,
    exp_m1: f64,
}

impl Boost {
    fn new(beta: f64) -> Boost {
        Boost {
            beta,
            exp: beta.exp(),
            exp_m1: beta.exp_m1(),
        }
    }

    /// [`tilted`], to the bit.
    fn tilt(&self, p: f64, q: f64, hit: bool) -> f64 {
        let z = 1.0 + q * self.exp_m1;
        p * if hit { self.exp } else { 1.0 } / z
    }

    /// The tilted distribution's entropy (nats) from the base's H and the hint's q:
    /// H' = ln Z − (−H + q(e^β − 1) ln q + q e^β β) / Z.
    fn entropy(&self, h: f64, q: f64) -> f64 {
        if self.beta == 0.0 || q <= 0.0 {
            return h;
        }
        let z = 1.0 + q * self.exp_m1;
        z.ln() - (-h + q * self.exp_m1 * q.ln() + q * self.exp * self.beta) / z
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tilted_entropy_is_the_tilted_distributions() {
        let p = [0.2f64, 0.5, 0.3];
        let h: f64 = -p.iter().map(|x| x * x.ln()).sum::<f64>();
        let beta = 2.625;
        let t: Vec<f64> = (0..3).map(|a| tilted(p[a], 0.2, a == 0, beta)).collect();
        let direct: f64 = -t.iter().map(|x| x * x.ln()).sum::<f64>();
        assert!((Boost::new(beta).entropy(h, 0.2) - direct).abs() < 1e-12);
        assert_eq!(Boost::new(0.0).entropy(h, 0.2), h);
        for (q, hit) in [(0.2, true), (0.7, false), (1e-9, true)] {
            let p = 0.3;
            assert_eq!(Boost::new(beta).tilt(p, q, hit), tilted(p, q, hit, beta));
        }
    }
}
