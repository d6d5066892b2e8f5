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
use stage_api::{
    arrow_schema, read_column, write_parquet_parallel, Column, ColumnType::*, Input, Output,
    ParquetLayout, Read, Stage, StageContext, StageError, StageParams, StageReport, StageSpec,
};

use crate::hints::THRESHOLD;
use crate::tilt::tilted;

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
            Input::required("tokens", &[Read::table("val", &["token"])]),
            Input::required(
                "pass1",
                &[
                    Read::table("pass1", &["position", "model_p", "entropy", "bytes"]),
                    Read::table("hint_p", &["position", "hint", "hint_p"]),
                    Read::table("distributions", &["position", "candidate", "model_p"]),
                ],
            ),
            Input::required("hints", &[Read::table("hints", &["position", "hint", "share"])]),
        ],
        outputs: &[
            Output::table("pass1", TILTED_TABLE),
            Output::table("distributions", pass1::DISTRIBUTIONS_TABLE),
        ],
        metrics: &["neural_bpb", "bpb_before"],
        ..StageSpec::NONE
    };

    fn headline(&self, report: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
        Some(format!(
            "BPB {:.4} -> {:.4}: {} hints fired ({:.2}% of entries), {:.1}% of them hits",
            report.get("bpb_before")?.as_f64()?,
            report.get("neural_bpb")?.as_f64()?,
            report.get("fired")?.as_u64()?,
            report.get("fire_rate")?.as_f64()? * 100.0,
            report.get("hit_rate")?.as_f64()? * 100.0
        ))
    }

    fn run(&self, ctx: &StageContext, params: TiltParams) -> Result<StageReport, StageError> {
        let started = Instant::now();
        let val_path = ctx.input("tokens")?.file("val.parquet");
        let pass1 = ctx.input("pass1")?;
        let table = pass1.file("pass1.parquet");
        let hint_p_path = pass1.file("hint_p.parquet");
        if !hint_p_path.exists() {
            return Err(StageError::input(
                &pass1.dir,
                "this pass-1 wrote no hint_p table: wire its inputs.hints to the tilt's hints node",
            ));
        }
        let hints_path = ctx.input("hints")?.file("hints.parquet");
        // Nine columns from four files, each decoded on its own: on two cores the read
        // takes about half as long as one after another.
        let (mut position, mut base_p, mut entropy, mut bytes) =
            (Ok(vec![]), Ok(vec![]), Ok(vec![]), Ok(vec![]));
        let (mut hint, mut hint_p, mut share, mut hints) =
            (Ok(vec![]), Ok(vec![]), Ok(vec![]), Ok(vec![]));
        let mut val = Ok(vec![]);
        rayon::scope(|scope| {
            scope.spawn(|_| val = read_column::<UInt16Type>(&val_path, "token"));
            scope.spawn(|_| position = read_column::<Int64Type>(&table, "position"));
            scope.spawn(|_| base_p = read_column::<Float32Type>(&table, "model_p"));
            scope.spawn(|_| entropy = read_column::<Float32Type>(&table, "entropy"));
            scope.spawn(|_| bytes = read_column::<UInt8Type>(&table, "bytes"));
            scope.spawn(|_| hint = read_column::<UInt16Type>(&hint_p_path, "hint"));
            scope.spawn(|_| hint_p = read_column::<Float32Type>(&hint_p_path, "hint_p"));
            scope.spawn(|_| share = read_column::<Float32Type>(&hints_path, "share"));
            scope.spawn(|_| hints = read_column::<UInt16Type>(&hints_path, "hint"));
        });
        let (position, base_p, entropy, bytes) = (position?, base_p?, entropy?, bytes?);
        let (hint, hint_p, share, hints) = (hint?, hint_p?, share?, hints?);
        let val = val?;
        if hint.len() != position.len() || share.len() + 1 != val.len() {
            return Err(StageError::input(
                &hint_p_path,
                format!(
                    "{} hint probabilities for {} entries, {} hints for {} targets: another stream's",
                    hint.len(),
                    position.len(),
                    share.len(),
                    val.len().saturating_sub(1)
                ),
            ));
        }
        let mut report = StageReport::default();
        report.phase("read", started);
        let started = Instant::now();
        let n = position.len();
        let rows = Rows {
            position: &position,
            base_p: &base_p,
            entropy: &entropy,
            bytes: &bytes,
            hint: &hint,
            hint_p: &hint_p,
            val: &val,
            hints: &hints,
            share: &share,
            hint_p_path: &hint_p_path,
        };
        // Each row group tilted and encoded in the same task (the writer's), its sums
        // coming back in group order: the same figures on any number of threads.
        let fixed = Boost::new(params.beta);
        // The kept distributions are tilted and written beside the table, on whatever
        // the table's encoding leaves idle (its writer is one thread).
        let distributions = pass1.file("distributions.parquet");
        let (sums, written) = rayon::join(
            || {
                write_parquet_parallel(
                    &ctx.output("pass1.parquet"),
                    arrow_schema(TILTED_TABLE),
                    n,
                    &ParquetLayout::delta(&["position"]).uncompressed(&["model_p", "entropy"]),
                    |range| rows.tilt(range, &params, &fixed),
                )
            },
            || {
                let kept = tilt_distributions(&distributions, &hints, &share, &params)?;
                // Written as the pass-1's are: a tilted pass-1 is a pass-1.
                pass1::Pass1Table {
                    distributions: kept,
                    ..Default::default()
                }
                .write_distributions(&ctx.output("distributions.parquet"))
            },
        );
        let (sums, _) = (sums?, written?);
        let total = sums.iter().fold(Sums::default(), |a, b| a.plus(b));
        let (fired, hits) = (total.fired, total.hits);
        let before = (total.nats_before, total.bytes);
        let after = (total.nats_after, total.bytes);
        report.phase("tilt and write", started);
        let bits_saved = (before.0 - after.0) / std::f64::consts::LN_2;
        Ok(report
            .with("entries", n as u64)
            .with("bytes", before.1)
            .with(
                "bpb_before",
                before.0 / (std::f64::consts::LN_2 * before.1.max(1) as f64),
            )
            .with(
                "neural_bpb",
                after.0 / (std::f64::consts::LN_2 * after.1.max(1) as f64),
            )
            .with("fired", fired)
            .with("fire_rate", fired as f64 / n.max(1) as f64)
            .with("hit_rate", hits as f64 / fired.max(1) as f64)
            .with("bits_saved_per_fired", bits_saved / fired.max(1) as f64))
    }
}

/// What a row group of the tilt reads: the pass-1's rows, its hints' probabilities, and
/// the hints node's table.
struct Rows<'a> {
    position: &'a [i64],
    base_p: &'a [f32],
    entropy: &'a [f32],
    bytes: &'a [u8],
    hint: &'a [u16],
    hint_p: &'a [f32],
    val: &'a [u16],
    hints: &'a [u16],
    share: &'a [f32],
    hint_p_path: &'a std::path::Path,
}

/// A row group's counts and sums (nats summed in row order within the group).
#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    fired: u64,
    hits: u64,
    nats_before: f64,
    nats_after: f64,
    bytes: u64,
}

impl Sums {
    fn plus(self, other: &Sums) -> Sums {
        Sums {
            fired: self.fired + other.fired,
            hits: self.hits + other.hits,
            nats_before: self.nats_before + other.nats_before,
            nats_after: self.nats_after + other.nats_after,
            bytes: self.bytes + other.bytes,
        }
    }
}

impl Rows<'_> {
    /// The tilted rows `range`, as a batch of the tilted table, and their sums.
    fn tilt(
        &self,
        range: std::ops::Range<usize>,
        params: &TiltParams,
        fixed: &Boost,
    ) -> Result<(RecordBatch, Sums), StageError> {
        let len = range.len();
        let (mut model_p, mut entropy, mut fired) = (
            Vec::with_capacity(len),
            Vec::with_capacity(len),
            Vec::with_capacity(len),
        );
        let mut sums = Sums::default();
        for row in range.clone() {
            let p = self.position[row];
            let target = p as usize;
            if target == 0 || target >= self.val.len() || self.hints[target - 1] != self.hint[row] {
                return Err(StageError::input(
                    self.hint_p_path,
                    format!("row {row} (position {p}): the hint is not the hints node's: the pass-1 read another hints artifact"),
                ));
            }
            let beta = params.beta(self.share[target - 1]);
            let (base, h) = (self.base_p[row], self.entropy[row]);
            let (tilted_p, tilted_h) = if beta > 0.0 {
                let (q, hit) = (self.hint_p[row] as f64, self.val[target] == self.hint[row]);
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
            let ln_base = (base as f64).ln();
            sums.nats_before -= ln_base;
            // Unfired, the target's probability is the base's: its logarithm too.
            sums.nats_after -= if beta > 0.0 {
                (tilted_p as f64).ln()
            } else {
                ln_base
            };
            sums.bytes += self.bytes[row] as u64;
            model_p.push(tilted_p);
            entropy.push(tilted_h);
            fired.push(beta > 0.0);
        }
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(self.position[range.clone()].to_vec())),
            Arc::new(Float32Array::from(model_p)),
            Arc::new(Float32Array::from(entropy)),
            Arc::new(UInt8Array::from(self.bytes[range].to_vec())),
            Arc::new(BooleanArray::from(fired)),
        ];
        let batch = RecordBatch::try_new(arrow_schema(TILTED_TABLE), columns)
            .expect("columns match schema");
        Ok((batch, sums))
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

/// The base pass-1's kept distributions, each tilted at its position.
fn tilt_distributions(
    path: &std::path::Path,
    hints: &[u16],
    share: &[f32],
    params: &TiltParams,
) -> Result<Vec<(i64, Vec<f32>)>, StageError> {
    let position = read_column::<Int64Type>(path, "position")?;
    let model_p = read_column::<Float32Type>(path, "model_p")?;
    let mut kept: Vec<(i64, Vec<f32>)> = Vec::new();
    for (&p, &v) in position.iter().zip(&model_p) {
        match kept.last_mut() {
            Some((last, probs)) if *last == p => probs.push(v),
            _ => kept.push((p, vec![v])),
        }
    }
    for (p, probs) in &mut kept {
        let t = *p as usize;
        if t == 0 || t > hints.len() {
            return Err(StageError::input(path, format!("position {p} has no hint")));
        }
        let h = hints[t - 1] as usize;
        let beta = params.beta(share[t - 1]);
        let q = *probs
            .get(h)
            .ok_or_else(|| StageError::input(path, format!("position {p}: no candidate {h}")))?
            as f64;
        for (a, v) in probs.iter_mut().enumerate() {
            *v = tilted(*v as f64, q, a == h, beta) as f32;
        }
    }
    Ok(kept)
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
