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
//! - `model = "command"`: a user's scorer run as a process ([`command`]).
//! - `model = "gpt"`: the record's GPT from a `train` artifact (the node's `model` input),
//!   slid over the val stream as §4 says. It runs in the libtorch worker
//!   (`gpt::worker`); this crate only validates its parameters, and the
//!   worker writes the same table through [`Pass1Table::write`].

use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Array, Int64Array, RecordBatch, UInt16Array, UInt8Array};
use arrow::datatypes::{Float32Type, Int64Type, Schema, UInt16Type, UInt8Type};
use gpt::{run_in_worker, Task};
use rayon::prelude::*;
use stage_api::products;
use stage_api::{
    read_column, row_groups, write_parquet, Column, ColumnType::*, FileRole, Input, InputArtifact,
    Output, ParquetLayout, Read, Stage, StageContext, StageError, StageReport, StageSpec, Variants,
};

pub mod command;
pub mod hints;
mod params;
mod report;
pub use params::{BigramParams, CommandParams, GptParams, ImportParams, Pass1Params};
pub use report::{GptScoring, Pass1Build, Pass1Report, Pass1Summary};

/// The largest vocabulary the bigram keeps as a dense V×V table.
const BIGRAM_MAX_VOCAB: usize = 8192;

pub struct Pass1Stage;

/// The most positions whose full distribution pass-1 keeps (4,096 by default): 65,536
/// distributions over a 1,024-token vocabulary are 67M rows already.
pub const MAX_MASS_SAMPLE: usize = 65_536;

/// pass1.parquet, one row per scored entry in pass-1 order.
pub const PASS1_TABLE: &[Column] = &[
    Column::new("position", I64),
    Column::new("model_p", F32),
    Column::new("entropy", F32),
    Column::new("bytes", U8),
];

/// distributions.parquet: one row per (sampled position, candidate token).
pub const DISTRIBUTIONS_TABLE: &[Column] = &[
    Column::new("position", I64),
    Column::new("candidate", U16),
    Column::new("model_p", F32),
];

pub fn pass1_schema() -> Arc<Schema> {
    stage_api::arrow_schema(PASS1_TABLE)
}

impl Stage for Pass1Stage {
    type Params = Pass1Params;

    const SPEC: StageSpec = StageSpec {
        kind: "pass1",
        // 3: distributions.parquet for the implied-mass audit.
        version: 3,
        summary: "val tokens (+ a model) -> per-entry model_p and entropy; model = bigram, import, or gpt (with inputs.model)",
        inputs: &[
            Input::required(
                "tokens",
                &[
                    products::VAL.read(&["token", "bytes"]),
                    Read::table("train", &["token"]),
                    Read::table("vocab", &["id"]),
                ],
            ),
            Input::optional(
                "model",
                &[Read::file("model.safetensors"), Read::file("config.json")],
            ),
            // The n-gram tilt's hints: then `hint_p` is written (bigram, gpt, and a
            // scorer through protocol version 3).
            Input::optional("hints", &[products::HINTS.read(&["position", "hint"])]),
        ],
        files: &[
            FileRole {
                name: "table",
                required: false,
                help: "import: Parquet with position (i64), model_p (f32), entropy (f32, nats), optional bytes",
            },
            FileRole {
                name: "scorer",
                required: false,
                help: "command: the scorer's own files (hashed, so editing them reruns the node)",
            },
        ],
        outputs: &[
            Output::table(products::PASS1.name, PASS1_TABLE),
            Output::table(products::DISTRIBUTIONS.name, DISTRIBUTIONS_TABLE),
            Output::table_with("hint_p", hints::HINT_P_TABLE, "hints"),
            Output::file_if(
                command::SCORER_LOG,
                "model = \"command\": the scorer's stdout and stderr (volatile: not hashed)",
            )
            .volatile(),
            Output::file_if(
                command::SANDBOX_REPORT,
                "model = \"command\": what confined the scorer on this machine (volatile: not hashed)",
            )
            .volatile(),
        ],
        metrics: &["neural_bpb"],
        variants: Some(Variants {
            param: "model",
            values: &["bigram", "import", "gpt", "command"],
            default: "bigram",
        }),
        ..StageSpec::NONE
    };

    fn check_wiring(params: &Pass1Params, inputs: &[&str], files: &[&str]) -> Result<(), String> {
        let has_model = inputs.contains(&"model");
        let has_table = files.contains(&"table");
        let has_scorer = files.contains(&"scorer");
        match params {
            Pass1Params::Gpt(_) if !has_model => {
                Err("model = \"gpt\" needs inputs.model (a train node)".into())
            }
            Pass1Params::Bigram(_) | Pass1Params::Import(_) if has_model => Err(
                "inputs.model is only read by model = \"gpt\" and model = \"command\"".into(),
            ),
            Pass1Params::Import(_) if !has_table => {
                Err("model = \"import\" needs files.table".into())
            }
            _ if has_table && !matches!(params, Pass1Params::Import(_)) => {
                Err("files.table is for model = \"import\"".into())
            }
            Pass1Params::Command(_) if !has_scorer => Err(
                "model = \"command\" needs files.scorer (the scorer's own files, hashed so that editing them reruns the node)".into(),
            ),
            _ if has_scorer && !matches!(params, Pass1Params::Command(_)) => {
                Err("files.scorer is for model = \"command\"".into())
            }
            Pass1Params::Import(_) if inputs.contains(&"hints") => Err(
                "inputs.hints is read by model = \"bigram\", \"gpt\" and \"command\" (an imported table cannot give the hint's probability)".into(),
            ),
            _ => Ok(()),
        }
    }

    fn run(&self, ctx: &StageContext, params: Pass1Params) -> Result<StageReport, StageError> {
        let connected: Vec<&str> = ctx.inputs.keys().map(String::as_str).collect();
        let files: Vec<&str> = ctx
            .files
            .iter()
            .filter(|(_, paths)| !paths.is_empty())
            .map(|(role, _)| role.as_str())
            .collect();
        Self::check_wiring(&params, &connected, &files).map_err(|m| ctx.error(m))?;
        let tokens = ctx.input("tokens")?;
        let mut sandbox = None;
        let table = match &params {
            Pass1Params::Gpt(gpt) => return run_in_worker(Task::Pass1, ctx, gpt.numerics),
            Pass1Params::Command(command) => {
                let (table, isolation) = command::command_pass1(ctx, command)?;
                let path = ctx.output(command::SANDBOX_REPORT);
                std::fs::write(&path, serde_json::to_vec_pretty(&isolation).expect("json"))
                    .map_err(|e| StageError::io(&path, e))?;
                sandbox = Some(isolation.describe());
                table
            }
            Pass1Params::Bigram(bigram) => {
                let (val, val_bytes) = read_val(tokens)?;
                let train_path = tokens.file("train.parquet");
                let train = read_column::<UInt16Type>(&train_path, "token")?;
                let vocab_size =
                    read_column::<UInt16Type>(&tokens.file("vocab.parquet"), "id")?.len();
                let kept =
                    probe_positions(tokens, val.len() - 1, bigram.mass_sample, bigram.mass_seed)?;
                let hints = match ctx.inputs.get("hints") {
                    Some(h) => hints::read_hints(h, val.len() - 1)?,
                    None => Vec::new(),
                };
                bigram_pass1(&train, &val, &val_bytes, vocab_size, bigram, &kept, hints)
                    .map_err(|m| StageError::input(&train_path, m))?
            }
            Pass1Params::Import(_) => {
                let (_, val_bytes) = read_val(tokens)?;
                let [path] = ctx.files("table") else {
                    return Err(ctx.error("model = \"import\" needs exactly one files.table"));
                };
                import_pass1(path, &val_bytes)?
            }
        };
        table.write(&ctx.output("pass1.parquet"))?;
        table.write_distributions(&ctx.output("distributions.parquet"))?;
        table.write_hint_p(&ctx.output("hint_p.parquet"))?;
        Ok(StageReport::default()
            .with_fields(&Pass1Report {
                summary: table.summary(),
                model: params.model_name().to_string(),
            })
            .with_volatile_fields(&Pass1Build {
                numerics: Self::numerics(&params),
                sandbox,
            }))
    }

    /// The GPT and a scorer run libtorch (a scorer may); the bigram and an import do not.
    fn numerics(params: &Pass1Params) -> Option<String> {
        let (mode, device) = match params {
            Pass1Params::Gpt(p) => (p.numerics, p.device),
            Pass1Params::Command(p) => (p.numerics, gpt::Device::Cpu),
            Pass1Params::Bigram(_) | Pass1Params::Import(_) => return None,
        };
        Some(gpt::numerics::this_machine(mode, device))
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
    /// With `inputs.hints`: the hint of each target (by position − 1) and, per entry,
    /// the model's probability of it; empty without.
    pub hint: Vec<u16>,
    pub hint_p: Vec<f32>,
}

pub fn distributions_schema() -> Arc<Schema> {
    stage_api::arrow_schema(DISTRIBUTIONS_TABLE)
}

/// The `count` target positions in 1..=targets whose distributions pass-1 keeps (see
/// [`stage_api::sample_positions`]).
pub fn mass_sample_positions(targets: usize, count: usize, seed: u64) -> Vec<i64> {
    stage_api::sample_positions(targets, count, seed)
}

/// The table of a tokens artifact that names the positions where a judge wants every
/// pass-1 source's whole distribution (a legality re-run's secret sample; see
/// `perturb`). Absent from a `tokenize` artifact.
pub const PROBE_POSITIONS: &str = "probe_positions.parquet";

/// Where this run keeps whole distributions: the positions its tokens' judge asks for,
/// when there is one, else the node's own `mass_sample` drawn with `mass_seed`.
pub fn probe_positions(
    tokens: &InputArtifact,
    targets: usize,
    count: usize,
    seed: u64,
) -> Result<Vec<i64>, StageError> {
    let path = tokens.file(PROBE_POSITIONS);
    if !path.exists() {
        return Ok(mass_sample_positions(targets, count, seed));
    }
    let positions = read_column::<Int64Type>(&path, "position")?;
    let ordered = positions.windows(2).all(|w| w[0] < w[1]);
    let inside = positions.iter().all(|&p| p >= 1 && p as usize <= targets);
    if !ordered || !inside {
        return Err(StageError::input(
            &path,
            format!("positions must be increasing and within 1..={targets}"),
        ));
    }
    Ok(positions)
}

impl Pass1Table {
    /// Entries, bytes and the neural BPB, summed in order (a parallel float sum would
    /// depend on the thread count).
    pub fn summary(&self) -> Pass1Summary {
        let nll: f64 = self.model_p.iter().map(|&p| -libm::log(p as f64)).sum();
        let bytes: u64 = self.bytes.iter().map(|&b| b as u64).sum();
        Pass1Summary {
            entries: self.position.len() as u64,
            bytes,
            neural_bpb: nll / (std::f64::consts::LN_2 * bytes.max(1) as f64),
        }
    }

    /// Writes `hint_p.parquet` when the table has hints.
    pub fn write_hint_p(&self, path: &std::path::Path) -> Result<(), StageError> {
        if self.hint_p.is_empty() {
            return Ok(());
        }
        let hint: Vec<u16> = self
            .position
            .iter()
            .map(|&p| self.hint[p as usize - 1])
            .collect();
        hints::write_hint_p(path, &self.position, &hint, &self.hint_p)?;
        Ok(())
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
/// per position), with the distribution tempered before p and entropy are taken; with
/// `hints` (one per target, by position − 1; empty: none), each hint's probability too.
pub fn bigram_pass1(
    train: &[u16],
    val: &[u16],
    val_bytes: &[u8],
    vocab_size: usize,
    params: &BigramParams,
    kept: &[i64],
    hints: Vec<u16>,
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
                .map(|&c| libm::log((c as f64 + params.add_k) / total) * inverse_t)
                .collect();
            let max = log_p.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = log_p.iter().map(|l| libm::exp(l - max)).sum();
            let log_z = max + libm::log(z);
            let probs: Vec<f64> = log_p.iter().map(|l| libm::exp(l - log_z)).collect();
            let entropy = -probs
                .iter()
                .zip(&log_p)
                .map(|(p, l)| p * (l - log_z))
                .sum::<f64>();
            (probs.iter().map(|&p| p as f32).collect(), entropy as f32)
        })
        .collect();
    let mut table = Pass1Table::default();
    for &p in kept {
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
        if let Some(&hint) = hints.get(p - 1) {
            let p_hint = rows[prev].0.get(hint as usize).ok_or_else(|| {
                format!("hint token {hint} is outside the vocabulary ({v} entries)")
            })?;
            table.hint_p.push(*p_hint);
        }
    }
    table.hint = hints;
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
        ..Pass1Table::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use stage_api::AnyStage;

    /// Each source's parameters are all filled in (so writing a default keeps the
    /// recipe), checked, and refused on another source with a message naming the owner.
    #[test]
    fn each_model_has_its_own_canonical_parameters() {
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
        assert!(implicit.get("add_k").is_none(), "{implicit}");
        for zero in ["stride", "batch", "threads"] {
            let raw = serde_json::json!({ "model": "gpt", zero: 0 });
            assert!(stage.canonical_params(&raw).is_err(), "{zero} = 0 accepted");
        }
        for option in ["stride", "batch", "threads"] {
            let raw = serde_json::json!({ "model": "bigram", option: 4 });
            let err = stage.canonical_params(&raw).unwrap_err().to_string();
            assert_eq!(
                err,
                format!("params.{option}: applies only to model = \"gpt\" (this node has model = \"bigram\")")
            );
        }
        let err = stage
            .canonical_params(&serde_json::json!({ "model": "import", "temperature": 1.0 }))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("applies only to model = \"bigram\" or model = \"gpt\""),
            "{err}"
        );
        // No model is the bigram, written out.
        let bigram = stage.canonical_params(&serde_json::Value::Null).unwrap();
        assert_eq!(
            bigram,
            serde_json::json!({
                "model": "bigram", "temperature": 0.85, "add_k": 0.1,
                "mass_sample": 4096, "mass_seed": 1337
            })
        );
        let err = stage
            .canonical_params(&serde_json::json!({ "model": "lstm" }))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `lstm`"), "{err}");
    }

    #[test]
    fn bigram_probabilities_are_a_tempered_distribution() {
        let train: Vec<u16> = (0..1000).map(|i| (i % 7) as u16).collect();
        let val: Vec<u16> = vec![0, 1, 2, 3, 0, 5];
        let bytes = vec![0, 1, 1, 1, 1, 1];
        let params = BigramParams::default();
        let kept = mass_sample_positions(val.len() - 1, params.mass_sample, params.mass_seed);
        let table = bigram_pass1(&train, &val, &bytes, 8, &params, &kept, Vec::new()).unwrap();
        assert_eq!(table.position, vec![1, 2, 3, 4, 5]);
        // 0 → 1 is what train always does: close to 1, and sharper than untempered.
        assert!(table.model_p[0] > 0.99, "{}", table.model_p[0]);
        // 0 → 5 never happens in train: small but positive.
        assert!(table.model_p[4] > 0.0 && table.model_p[4] < 1e-3);
        assert!(table.entropy.iter().all(|h| *h >= 0.0 && *h < (8f32).ln()));
    }
}
