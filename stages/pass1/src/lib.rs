//! The `pass1` stage for sources that need no GPT.
//!
//! Pass 1 gives, for every scored validation entry, the model's probability of the true
//! token (`model_p`) and the entropy of its (tempered) next-token distribution, which is
//! all the cache stages need from a model. Two sources live here:
//!
//! - `model = "bigram"`: an add-k smoothed bigram model estimated on the train split. A
//!   real baseline, not a placeholder: CacheMoney's lineage showed that with a good cache
//!   a tiny model does almost as well as a trained GPT (the blend weight is ≈ 0.99).
//! - `model = "import"`: a Parquet table exported from someone's own eval (PyTorch, say),
//!   validated before use.
//!
//! - `model = "gpt"`: the record's GPT from a `train` artifact (the node's `model` input),
//!   slid over the val stream as §4 says. It runs in the libtorch worker
//!   (`neural::worker`); this crate only validates its parameters, and the
//!   worker writes the same table through [`Pass1Table::write`].

use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Array, Int64Array, RecordBatch, UInt16Array, UInt8Array};
use arrow::datatypes::{DataType, Field, Float32Type, Int64Type, Schema, UInt16Type, UInt8Type};
use neural::{run_in_worker, Device, GptPass1Options, Task};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use stage_api::{
    canonicalize, read_column, row_groups, write_parquet, FileRole, InputArtifact, ParquetLayout,
    Stage, StageContext, StageError, StageReport,
};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Model {
    Bigram,
    Import,
    Gpt,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pass1Params {
    pub model: Model,
    /// Applied to the model's distribution before `model_p` and `entropy` are taken:
    /// p_T(v) ∝ p(v)^(1/T). The record uses 0.85 (algorithm.md §4.3).
    pub temperature: f64,
    /// Bigram: the pseudo-count added to every (previous, next) pair.
    pub add_k: f64,
    /// GPT: targets scored per window after the first (the record's 64).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stride: Option<usize>,
    /// GPT: windows per forward pass (the record's 32).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    /// GPT: `"cpu"` or `"cuda"`; part of the recipe (CUDA rounds differently).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<Device>,
    /// GPT: libtorch's CPU threads; part of the recipe because the bits depend on it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// How many target positions keep the model's whole (tempered) next-token
    /// distribution, in `distributions.parquet`, for the implied-mass audit (0: none).
    /// Not available for `model = "import"`, whose table has only the true token.
    pub mass_sample: usize,
    /// Seeds which positions those are.
    pub mass_seed: u64,
}

impl Pass1Params {
    /// The GPT's options, defaults filled in where the node does not set them.
    pub fn gpt_options(&self) -> GptPass1Options {
        let defaults = GptPass1Options::default();
        GptPass1Options {
            stride: self.stride.unwrap_or(defaults.stride),
            batch: self.batch.unwrap_or(defaults.batch),
            device: self.device.unwrap_or(defaults.device),
            threads: self.threads.unwrap_or(defaults.threads),
        }
    }
}

impl Default for Pass1Params {
    fn default() -> Self {
        Pass1Params {
            model: Model::Bigram,
            temperature: 0.85,
            add_k: 0.1,
            stride: None,
            batch: None,
            device: None,
            threads: None,
            mass_sample: 4096,
            mass_seed: 1337,
        }
    }
}

/// The largest vocabulary the bigram keeps as a dense V×V table.
const BIGRAM_MAX_VOCAB: usize = 8192;

pub struct Pass1Stage;

/// The most positions whose full distribution pass-1 keeps (4,096 by default): 65,536
/// distributions over a 1,024-token vocabulary are 67M rows already.
pub const MAX_MASS_SAMPLE: usize = 65_536;

const FILE_ROLES: &[FileRole] = &[FileRole {
    name: "table",
    required: false,
    help: "import: Parquet with position (i64), model_p (f32), entropy (f32, nats), optional bytes",
}];

/// pass1.parquet, one row per scored entry in pass-1 order.
pub fn pass1_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("position", DataType::Int64, false),
        Field::new("model_p", DataType::Float32, false),
        Field::new("entropy", DataType::Float32, false),
        Field::new("bytes", DataType::UInt8, false),
    ]))
}

impl Stage for Pass1Stage {
    fn kind(&self) -> &'static str {
        "pass1"
    }

    fn version(&self) -> u32 {
        // 3: distributions.parquet for the implied-mass audit.
        3
    }

    fn summary(&self) -> &'static str {
        "val tokens (+ a model) -> per-entry model_p and entropy; model = bigram, import, or gpt (with inputs.model and stride, batch, device, threads)"
    }

    fn metrics(&self) -> &'static [&'static str] {
        &["neural_bpb"]
    }

    fn canonical_params(&self, raw: &Value) -> Result<Value, StageError> {
        let canonical = canonicalize::<Pass1Params>(raw)?;
        let mut params: Pass1Params = serde_json::from_value(canonical.clone()).unwrap();
        let bad = StageError::InvalidParams;
        // The GPT's options exist only for it: written for another model they would
        // silently do nothing, so they are refused; for the GPT their defaults are filled
        // in, so that writing one explicitly keeps the recipe.
        if params.model == Model::Gpt {
            let options = params.gpt_options();
            if options.stride == 0 || options.batch == 0 || options.threads == 0 {
                return Err(bad("stride, batch and threads must be at least 1".into()));
            }
            params.stride = Some(options.stride);
            params.batch = Some(options.batch);
            params.device = Some(options.device);
            params.threads = Some(options.threads);
        } else if params.stride.is_some()
            || params.batch.is_some()
            || params.device.is_some()
            || params.threads.is_some()
        {
            return Err(bad(
                "stride, batch, device and threads apply only to model = \"gpt\"".into(),
            ));
        }
        stage_api::check_param(
            "mass_sample",
            params.mass_sample,
            0..=MAX_MASS_SAMPLE,
            "each sampled position keeps a whole distribution over the vocabulary",
        )?;
        if let (Some(stride), Some(batch), Some(threads)) =
            (params.stride, params.batch, params.threads)
        {
            stage_api::check_param("stride", stride, 1..=65_536, "at most a window's length")?;
            stage_api::check_param("batch", batch, 1..=4096, "windows per forward pass")?;
            stage_api::check_param("threads", threads, 1..=256, "libtorch CPU threads")?;
        }
        if !(params.temperature > 0.0 && params.temperature.is_finite()) {
            return Err(bad(format!(
                "temperature {} must be positive",
                params.temperature
            )));
        }
        if !(params.add_k > 0.0 && params.add_k.is_finite()) {
            return Err(bad(format!("add_k {} must be positive", params.add_k)));
        }
        serde_json::to_value(params).map_err(|e| bad(e.to_string()))
    }

    fn input_names(&self) -> &'static [&'static str] {
        &["tokens"]
    }

    fn optional_input_names(&self) -> &'static [&'static str] {
        &["model"]
    }

    fn file_roles(&self) -> &'static [FileRole] {
        FILE_ROLES
    }

    fn run(&self, ctx: &StageContext) -> Result<StageReport, StageError> {
        let params: Pass1Params = ctx.params_as()?;
        match (params.model, ctx.inputs.contains_key("model")) {
            (Model::Gpt, true) if !ctx.files("table").is_empty() => {
                return Err(param_error(ctx, "files.table is for model = \"import\""))
            }
            (Model::Gpt, true) => return run_in_worker(Task::Pass1, ctx),
            (Model::Gpt, false) => {
                return Err(param_error(
                    ctx,
                    "model = \"gpt\" needs inputs.model (a train node)",
                ))
            }
            (_, true) => {
                return Err(param_error(
                    ctx,
                    "inputs.model is only read by model = \"gpt\"",
                ))
            }
            (_, false) => {}
        }
        let tokens = ctx.input("tokens")?;
        let (val, val_bytes) = read_val(tokens)?;
        let table = match params.model {
            Model::Bigram => {
                if !ctx.files("table").is_empty() {
                    return Err(param_error(ctx, "files.table is for model = \"import\""));
                }
                let train_path = tokens.file("train.parquet");
                let train = read_column::<UInt16Type>(&train_path, "token")?;
                let vocab_size =
                    read_column::<UInt16Type>(&tokens.file("vocab.parquet"), "id")?.len();
                bigram_pass1(&train, &val, &val_bytes, vocab_size, &params)
                    .map_err(|m| StageError::input(&train_path, m))?
            }
            Model::Gpt => unreachable!("handled by the worker above"),
            Model::Import => {
                let path = match ctx.files("table") {
                    [one] => one,
                    _ => {
                        return Err(param_error(
                            ctx,
                            "model = \"import\" needs exactly one files.table",
                        ))
                    }
                };
                import_pass1(path, &val_bytes)?
            }
        };
        let report = table.summary();
        table.write(&ctx.output("pass1.parquet"))?;
        table.write_distributions(&ctx.output("distributions.parquet"))?;
        Ok(report.with("model", serde_json::to_value(params.model).unwrap()))
    }
}

fn param_error(ctx: &StageContext, message: &str) -> StageError {
    StageError::Param {
        node: ctx.node.clone(),
        message: message.to_string(),
    }
}

/// The val stream of a `tokenize` artifact and each token's bytes; fewer than two
/// tokens leave nothing to score.
pub fn read_val(tokens: &InputArtifact) -> Result<(Vec<u16>, Vec<u8>), StageError> {
    let val_path = tokens.file("val.parquet");
    let val = read_column::<UInt16Type>(&val_path, "token")?;
    let val_bytes = read_column::<UInt8Type>(&val_path, "bytes")?;
    if val.len() < 2 {
        return Err(StageError::input(
            &val_path,
            "fewer than 2 val tokens: nothing to score",
        ));
    }
    Ok((val, val_bytes))
}

/// A pass-1 table in memory.
#[derive(Debug, Default)]
pub struct Pass1Table {
    pub position: Vec<i64>,
    pub model_p: Vec<f32>,
    pub entropy: Vec<f32>,
    pub bytes: Vec<u8>,
    /// The whole tempered next-token distribution at a few target positions (see
    /// [`mass_sample_positions`]), sorted by position.
    pub distributions: Vec<(i64, Vec<f32>)>,
}

/// `distributions.parquet`: one row per (sampled position, candidate token).
pub fn distributions_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("position", DataType::Int64, false),
        Field::new("candidate", DataType::UInt16, false),
        Field::new("model_p", DataType::Float32, false),
    ]))
}

/// The `count` target positions in 1..=targets whose distributions pass-1 keeps: those
/// with the smallest keyed hash, so the sample is fixed by the seed, spread over the whole
/// stream, and the same for every model. Sorted.
pub fn mass_sample_positions(targets: usize, count: usize, seed: u64) -> Vec<i64> {
    use std::collections::BinaryHeap;
    let key = |p: u64| {
        // splitmix64's finaliser over (seed, p).
        let mut z =
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ p.wrapping_add(0x632B_E59B_D9B4_E019);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut smallest: BinaryHeap<(u64, i64)> = BinaryHeap::with_capacity(count + 1);
    for p in 1..=targets as i64 {
        let k = (key(p as u64), p);
        if smallest.len() < count {
            smallest.push(k);
        } else if smallest.peek().is_some_and(|top| k < *top) {
            smallest.pop();
            smallest.push(k);
        }
    }
    let mut positions: Vec<i64> = smallest.into_iter().map(|(_, p)| p).collect();
    positions.sort_unstable();
    positions
}

impl Pass1Table {
    /// Entries, bytes and the neural BPB, summed in order (a parallel float sum would
    /// depend on the thread count).
    pub fn summary(&self) -> StageReport {
        let nll: f64 = self.model_p.iter().map(|&p| -(p as f64).ln()).sum();
        let bytes: u64 = self.bytes.iter().map(|&b| b as u64).sum();
        StageReport::default()
            .with("entries", self.position.len() as u64)
            .with("bytes", bytes)
            .with(
                "neural_bpb",
                nll / (std::f64::consts::LN_2 * bytes.max(1) as f64),
            )
    }

    /// Writes `distributions.parquet` (possibly with no rows: the model kept none).
    pub fn write_distributions(&self, path: &std::path::Path) -> Result<u64, StageError> {
        let schema = distributions_schema();
        let batches = self.distributions.iter().map(|(position, probs)| {
            let columns: Vec<ArrayRef> = vec![
                Arc::new(Int64Array::from(vec![*position; probs.len()])),
                Arc::new(UInt16Array::from_iter_values(0..probs.len() as u16)),
                Arc::new(Float32Array::from(probs.clone())),
            ];
            RecordBatch::try_new(schema.clone(), columns).expect("columns match schema")
        });
        write_parquet(
            path,
            schema.clone(),
            batches,
            &ParquetLayout::delta(&["position"]),
        )
    }

    pub fn write(&self, path: &std::path::Path) -> Result<u64, StageError> {
        let schema = pass1_schema();
        let n = self.position.len();
        let batches = row_groups(n).map(|rows| {
            let (start, end) = (rows.start, rows.end);
            let columns: Vec<ArrayRef> = vec![
                Arc::new(Int64Array::from(self.position[start..end].to_vec())),
                Arc::new(Float32Array::from(self.model_p[start..end].to_vec())),
                Arc::new(Float32Array::from(self.entropy[start..end].to_vec())),
                Arc::new(UInt8Array::from(self.bytes[start..end].to_vec())),
            ];
            RecordBatch::try_new(schema.clone(), columns).expect("columns match schema")
        });
        write_parquet(
            path,
            schema.clone(),
            batches,
            &ParquetLayout::delta(&["position"]),
        )
    }
}

/// Add-k bigram on `train`, scored on every val target 1..T (non-overlapping: one entry
/// per position), with the distribution tempered before p and entropy are taken.
pub fn bigram_pass1(
    train: &[u16],
    val: &[u16],
    val_bytes: &[u8],
    vocab_size: usize,
    params: &Pass1Params,
) -> Result<Pass1Table, String> {
    if vocab_size > BIGRAM_MAX_VOCAB {
        return Err(format!("the bigram model keeps a dense table and supports vocabularies up to {BIGRAM_MAX_VOCAB} (this one has {vocab_size})"));
    }
    if train.len() < 2 {
        return Err(
            "the train split has fewer than 2 tokens: nothing to estimate a bigram from".into(),
        );
    }
    let v = vocab_size;
    let mut counts = vec![0u32; v * v];
    for pair in train.windows(2) {
        let (a, b) = (pair[0] as usize, pair[1] as usize);
        if a >= v || b >= v {
            return Err(format!(
                "token id {} is outside the vocabulary ({v} entries)",
                a.max(b)
            ));
        }
        counts[a * v + b] += 1;
    }
    // Per previous token: the tempered distribution and its entropy, once.
    let inverse_t = 1.0 / params.temperature;
    let rows: Vec<(Vec<f32>, f32)> = (0..v)
        .into_par_iter()
        .map(|a| {
            let row = &counts[a * v..(a + 1) * v];
            let total: f64 = row.iter().map(|&c| c as f64 + params.add_k).sum();
            let log_p: Vec<f64> = row
                .iter()
                .map(|&c| ((c as f64 + params.add_k) / total).ln() * inverse_t)
                .collect();
            let max = log_p.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = log_p.iter().map(|l| (l - max).exp()).sum();
            let log_z = max + z.ln();
            let probs: Vec<f64> = log_p.iter().map(|l| (l - log_z).exp()).collect();
            let entropy = -probs
                .iter()
                .zip(&log_p)
                .map(|(p, l)| p * (l - log_z))
                .sum::<f64>();
            (probs.iter().map(|&p| p as f32).collect(), entropy as f32)
        })
        .collect();
    let mut table = Pass1Table::default();
    for p in mass_sample_positions(val.len() - 1, params.mass_sample, params.mass_seed) {
        let prev = val[p as usize - 1] as usize;
        if prev < v {
            table.distributions.push((p, rows[prev].0.clone()));
        }
    }
    for p in 1..val.len() {
        let (prev, token) = (val[p - 1] as usize, val[p] as usize);
        if prev >= v || token >= v {
            return Err(format!(
                "val token id {} is outside the vocabulary ({v} entries)",
                prev.max(token)
            ));
        }
        table.position.push(p as i64);
        table.model_p.push(rows[prev].0[token]);
        table.entropy.push(rows[prev].1);
        table.bytes.push(val_bytes[p]);
    }
    Ok(table)
}

/// Reads and validates an imported pass-1 table against the val tokens.
pub fn import_pass1(path: &std::path::Path, val_bytes: &[u8]) -> Result<Pass1Table, StageError> {
    let position = read_column::<Int64Type>(path, "position")?;
    let model_p = read_column::<Float32Type>(path, "model_p")?;
    let entropy = read_column::<Float32Type>(path, "entropy")?;
    if position.is_empty() {
        return Err(StageError::input(path, "the pass-1 table is empty"));
    }
    let last = val_bytes.len() as i64 - 1;
    for (row, &p) in position.iter().enumerate() {
        if p < 1 || p > last {
            return Err(StageError::input(
                path,
                format!("row {row}: position {p} is outside the val targets 1..={last}"),
            ));
        }
        let mp = model_p[row];
        if !(mp > 0.0 && mp <= 1.0) {
            return Err(StageError::input(
                path,
                format!("row {row}: model_p {mp} is not in (0, 1]"),
            ));
        }
        let h = entropy[row];
        if !h.is_finite() || h < 0.0 {
            return Err(StageError::input(
                path,
                format!("row {row}: entropy {h} is not a finite non-negative number"),
            ));
        }
    }
    // Every target must be scored at least once (a sliding window scores some twice, as
    // the record's tail does); a table covering a subset would give a BPB over a subset.
    let mut covered = vec![false; val_bytes.len()];
    for &p in &position {
        covered[p as usize] = true;
    }
    if let Some(missing) = (1..val_bytes.len()).find(|&p| !covered[p]) {
        let count = covered.iter().skip(1).filter(|&&c| c).count();
        return Err(StageError::input(
            path,
            format!(
                "the pass-1 table covers {count} of the {last} val targets (first missing position {missing}): it is shorter than, or from other tokens than, the val table"
            ),
        ));
    }
    let has_bytes = read_column::<UInt8Type>(path, "bytes");
    let bytes = match has_bytes {
        Ok(b) => b,
        Err(StageError::Input { message, .. }) if message.starts_with("no column") => {
            position.iter().map(|&p| val_bytes[p as usize]).collect()
        }
        Err(e) => return Err(e),
    };
    Ok(Pass1Table {
        position,
        model_p,
        entropy,
        bytes,
        distributions: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPT's options are all filled in (so writing a default keeps the recipe),
    /// checked, and refused for the other models.
    #[test]
    fn gpt_options_are_canonical_and_only_for_the_gpt() {
        let stage = Pass1Stage;
        let implicit = stage
            .canonical_params(&serde_json::json!({ "model": "gpt" }))
            .unwrap();
        let explicit = stage
            .canonical_params(&serde_json::json!({
                "model": "gpt", "stride": 64, "batch": 32, "device": "cpu", "threads": 2
            }))
            .unwrap();
        assert_eq!(implicit, explicit);
        assert_eq!(implicit["threads"], 2);
        for zero in ["stride", "batch", "threads"] {
            let raw = serde_json::json!({ "model": "gpt", zero: 0 });
            assert!(stage.canonical_params(&raw).is_err(), "{zero} = 0 accepted");
        }
        for option in ["stride", "batch", "threads"] {
            let raw = serde_json::json!({ "model": "bigram", option: 4 });
            let err = stage.canonical_params(&raw).unwrap_err().to_string();
            assert!(err.contains("apply only to model = \"gpt\""), "{err}");
        }
        let bigram = stage.canonical_params(&Value::Null).unwrap();
        assert!(bigram.get("threads").is_none(), "{bigram}");
    }

    #[test]
    fn bigram_probabilities_are_a_tempered_distribution() {
        let train: Vec<u16> = (0..1000).map(|i| (i % 7) as u16).collect();
        let val: Vec<u16> = vec![0, 1, 2, 3, 0, 5];
        let bytes = vec![0, 1, 1, 1, 1, 1];
        let params = Pass1Params::default();
        let table = bigram_pass1(&train, &val, &bytes, 8, &params).unwrap();
        assert_eq!(table.position, vec![1, 2, 3, 4, 5]);
        // 0 → 1 is what train always does: close to 1, and sharper than untempered.
        assert!(table.model_p[0] > 0.99, "{}", table.model_p[0]);
        // 0 → 5 never happens in train: small but positive.
        assert!(table.model_p[4] > 0.0 && table.model_p[4] < 1e-3);
        assert!(table.entropy.iter().all(|h| *h >= 0.0 && *h < (8f32).ln()));
    }
}
