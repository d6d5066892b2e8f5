//! `pass1`'s parameters, one set per source.

use std::collections::BTreeMap;

use gpt::{Device, Numerics};
use serde::{Deserialize, Serialize};
use stage_api::{check_param, order::DocumentOrder, windows::Tail, StageError, StageParams};

use crate::MAX_MASS_SAMPLE;

/// `pass1`'s parameters: one set per source, selected by `model`, so that an option of
/// one source cannot be written on another and silently do nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "lowercase")]
pub enum Pass1Params {
    Bigram(BigramParams),
    Import(ImportParams),
    Gpt(GptParams),
    Command(CommandParams),
}

impl Default for Pass1Params {
    fn default() -> Self {
        Pass1Params::Bigram(BigramParams::default())
    }
}

impl Pass1Params {
    pub fn model_name(&self) -> &'static str {
        match self {
            Pass1Params::Bigram(_) => "bigram",
            Pass1Params::Import(_) => "import",
            Pass1Params::Gpt(_) => "gpt",
            Pass1Params::Command(_) => "command",
        }
    }
}

/// `model = "bigram"`: an add-k bigram estimated on the train split.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BigramParams {
    /// Applied to the model's distribution before `model_p` and `entropy` are taken:
    /// p_T(v) ∝ p(v)^(1/T). The record uses 0.85 (algorithm.md §4.3).
    pub temperature: f64,
    /// The pseudo-count added to every (previous, next) pair.
    pub add_k: f64,
    /// How many target positions keep the model's whole (tempered) next-token
    /// distribution, in `distributions.parquet`, for the implied-mass audit (0: none).
    pub mass_sample: usize,
    /// Seeds which positions those are.
    pub mass_seed: u64,
}

impl Default for BigramParams {
    fn default() -> Self {
        BigramParams {
            temperature: 0.85,
            add_k: 0.1,
            mass_sample: 4096,
            mass_seed: 1337,
        }
    }
}

/// `model = "import"`: a table computed elsewhere (`files.table`); it has only the true
/// token's probability, so no temperature applies and no distributions are kept.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportParams {}

/// `model = "gpt"`: the record's GPT from a `train` node (`inputs.model`), §4.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GptParams {
    /// As for the bigram: the record's 0.85.
    pub temperature: f64,
    /// Targets scored per window after the first (the record's 64); windows are the
    /// model's `seq_len` long.
    pub stride: usize,
    /// `"once"` (each target scored exactly once, the default) or `"record"` (the
    /// record's short tail windows that score its last `stride` targets again).
    pub tail: Tail,
    /// Windows per forward pass (the record's 32).
    pub batch: usize,
    /// `"cpu"` or `"cuda"`; part of the recipe (CUDA rounds differently).
    pub device: Device,
    /// libtorch's CPU threads; part of the recipe because the bits depend on it.
    pub threads: usize,
    /// `"portable"` (the same bytes on every x86-64 CPU with AVX2) or `"native"`
    /// (libtorch's fastest kernels here); see `gpt::numerics`.
    pub numerics: Numerics,
    pub mass_sample: usize,
    pub mass_seed: u64,
}

impl Default for GptParams {
    fn default() -> Self {
        GptParams {
            temperature: 0.85,
            stride: 64,
            tail: Tail::Once,
            batch: 32,
            device: Device::Cpu,
            threads: gpt::DEFAULT_TORCH_THREADS,
            numerics: Numerics::Portable,
            mass_sample: 4096,
            mass_seed: 1337,
        }
    }
}

/// `model = "command"`: a user's scorer run as a process (`command`, an argv list run
/// in the pipeline file's directory; its own files as `files.scorer`). See
/// docs/scorers.md for the protocol.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandParams {
    /// The program and its arguments, e.g. `[".venv/bin/python", "scorer.py"]`.
    pub command: Vec<String>,
    /// Extra environment variables for the program (they win over `numerics`' ones).
    pub env: BTreeMap<String, String>,
    /// The environment that pins libtorch's kernels (and MKL's, oneDNN's) for a scorer
    /// that uses PyTorch: `"portable"` (the default) or `"native"`; see `gpt::numerics`.
    pub numerics: Numerics,
    /// Seconds before the program is killed and the node fails.
    pub timeout_s: u64,
    /// Paths (relative to the pipeline's directory, or absolute) the scorer may read
    /// beside its own files, its inputs and its interpreter's installation: a model
    /// cache, say. Never the store.
    pub read: Vec<String>,
    /// As for the bigram: how many positions get their whole distribution asked for.
    pub mass_sample: usize,
    pub mass_seed: u64,
    /// The order in which each of the scorer's components takes the val documents, e.g.
    /// `{ hints = "stream", ttt = "longest_first" }` (absent: stream order). Not passed
    /// to the scorer: the legality probes test prefix invariance in these orders
    /// (docs/legality.md).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub order: BTreeMap<String, DocumentOrder>,
}

impl Default for CommandParams {
    fn default() -> Self {
        CommandParams {
            command: Vec::new(),
            env: BTreeMap::new(),
            numerics: Numerics::Portable,
            timeout_s: 3600,
            read: Vec::new(),
            mass_sample: 4096,
            mass_seed: 1337,
            order: BTreeMap::new(),
        }
    }
}

impl StageParams for Pass1Params {
    fn validate(&self) -> Result<(), StageError> {
        let (temperature, mass_sample) = match self {
            Pass1Params::Import(_) => return Ok(()),
            Pass1Params::Command(p) => {
                if p.command.first().is_none_or(|program| program.is_empty()) {
                    return Err(StageError::invalid_param(
                        "command",
                        "give the scorer's program and arguments, e.g. [\".venv/bin/python\", \"scorer.py\"]",
                    ));
                }
                check_param("timeout_s", p.timeout_s, 1..=7 * 24 * 3600, "seconds")?;
                if p.order.keys().any(|component| component.is_empty()) {
                    return Err(StageError::invalid_param(
                        "order",
                        "name each component, e.g. { hints = \"stream\", ttt = \"longest_first\" }",
                    ));
                }
                (1.0, p.mass_sample)
            }
            Pass1Params::Bigram(p) => {
                positive("add_k", p.add_k)?;
                (p.temperature, p.mass_sample)
            }
            Pass1Params::Gpt(p) => {
                check_param("stride", p.stride, 1..=65_536, "at most a window's length")?;
                check_param("batch", p.batch, 1..=4096, "windows per forward pass")?;
                check_param("threads", p.threads, 1..=256, "libtorch CPU threads")?;
                (p.temperature, p.mass_sample)
            }
        };
        positive("temperature", temperature)?;
        check_param(
            "mass_sample",
            mass_sample,
            0..=MAX_MASS_SAMPLE,
            "each sampled position keeps a whole distribution over the vocabulary",
        )
    }
}

fn positive(param: &str, value: f64) -> Result<(), StageError> {
    if value > 0.0 && value.is_finite() {
        return Ok(());
    }
    Err(StageError::invalid_param(
        param,
        format!("{value} must be positive"),
    ))
}
