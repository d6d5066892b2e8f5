//! The record's GPT as the runner sees it, without libtorch: its shape ([`config`]), the
//! `train` stage, the GPT source of `pass1`'s process boundary ([`worker`]).
//!
//! The compute lives in `cachemoney-gpt-torch` (stages/gpt-torch), which links libtorch. Linking libtorch into the
//! `cachemoney` binary would make every command (`status`, `sql`, `show`) load a 1 GB
//! library first (0.25 s) and refuse to start wherever libtorch is missing, for the sake
//! of two stages. So the binary stays libtorch-free, and these stages run in a worker
//! process, `cachemoney-gpt`, that sits next to it (see [`worker`]). What is here, free
//! of libtorch: the parameters and their validation (a wrong shape is reported before
//! anything runs), and the process boundary.

pub mod config;
pub mod numerics;
pub mod worker;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use stage_api::products;
use stage_api::{
    Column, ColumnType::*, Input, Output, Read, Stage, StageContext, StageError, StageParams,
    StageReport, StageSpec,
};

pub use config::{GptConfig, ShapeError};
pub use numerics::Numerics;
pub use worker::{run_in_worker, Request, Response, Task};

/// Where the GPT stages compute. Part of the recipe: CUDA kernels round differently
/// from CPU ones, so a CPU artifact must never stand in for a CUDA run (and `audit`
/// must compare like with like).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
}

/// How the learning rate winds down (§3.3).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// `steps` steps, the last `warmdown_steps` of them linearly down to 0: the same
    /// steps on every machine, so the run is reproducible.
    Steps,
    /// The record's rule: stop at `max_seconds` of training time, winding down over the
    /// last `warmdown_steps` steps' worth of time. How far it gets depends on the
    /// machine, so its artifacts are not reproducible (and `audit` will say so).
    Wallclock,
}

/// Parameters of the `train` stage. Defaults are the record's optimiser (§3.4–§3.7);
/// the model shape defaults to the record's too, and the demo pipeline picks a small one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainParams {
    pub model: GptConfig,
    /// Sequences of `model.seq_len` tokens per optimiser step.
    pub batch: i64,
    pub schedule: Schedule,
    /// The step cap (with `schedule = "wallclock"`, the run may stop earlier).
    pub steps: usize,
    pub warmdown_steps: usize,
    /// Training-time cap for `schedule = "wallclock"` (the record's 600 s).
    pub max_seconds: f64,
    pub seed: i64,
    pub matrix_lr: f64,
    pub tied_embed_lr: f64,
    pub scalar_lr: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub ema_decay: f64,
    pub momentum_warmup_steps: usize,
    /// Validation BPB (non-overlapping `seq_len` windows of val, temperature 1) at step
    /// 0, every `val_every` steps and at the end; 0 means start and end only.
    pub val_every: usize,
    /// Caps the val tokens used for those checks (0: all), so long val sets do not
    /// dominate training time.
    pub val_tokens: usize,
    pub device: Device,
    /// libtorch's CPU threads. Part of the recipe, unlike the runner's `--threads`:
    /// libtorch splits its reductions by thread count, so the bits depend on it.
    pub threads: usize,
    /// `"portable"`: the same bytes on every x86-64 CPU with AVX2; `"native"`: libtorch's
    /// fastest kernels for this processor (see [`numerics`]).
    pub numerics: Numerics,
}

impl Default for TrainParams {
    fn default() -> Self {
        TrainParams {
            model: GptConfig::default(),
            batch: 48,
            schedule: Schedule::Steps,
            steps: 15_676,
            warmdown_steps: 3_500,
            max_seconds: 600.0,
            seed: 1337,
            matrix_lr: 0.025,
            tied_embed_lr: 0.035,
            scalar_lr: 0.025,
            weight_decay: 0.04,
            grad_clip: 0.3,
            ema_decay: 0.997,
            momentum_warmup_steps: 1_500,
            val_every: 4_000,
            val_tokens: 0,
            device: Device::Cpu,
            threads: DEFAULT_TORCH_THREADS,
            numerics: Numerics::Portable,
        }
    }
}

impl TrainParams {
    /// The stated bounds of every size parameter: beyond them a run would take days or
    /// allocate more than any machine this runs on has.
    fn check_sizes(&self) -> Result<(), StageError> {
        use stage_api::check_param;
        let steps = "a step count";
        check_param("batch", self.batch, 1..=4096, "sequences per step")?;
        check_param("steps", self.steps, 1..=100_000_000, steps)?;
        check_param(
            "warmdown_steps",
            self.warmdown_steps,
            0..=100_000_000,
            steps,
        )?;
        check_param(
            "momentum_warmup_steps",
            self.momentum_warmup_steps,
            0..=100_000_000,
            steps,
        )?;
        check_param("val_every", self.val_every, 0..=100_000_000, steps)?;
        check_param("val_tokens", self.val_tokens, 0..=1 << 40, "a token count")?;
        check_param("threads", self.threads, 1..=256, "libtorch CPU threads")?;
        let m = &self.model;
        check_param("model.layers", m.layers, 1..=64, "the record has 6")?;
        check_param("model.d_model", m.d_model, 1..=8192, "the record has 256")?;
        check_param("model.heads", m.heads, 1..=256, "the record has 4")?;
        check_param("model.kv_heads", m.kv_heads, 1..=256, "the record has 2")?;
        check_param(
            "model.seq_len",
            m.seq_len,
            1..=65_536,
            "the record has 2048",
        )?;
        check_param(
            "model.bigram_rows",
            m.bigram_rows,
            2..=1 << 24,
            "the record has 2048",
        )?;
        check_param(
            "model.bigram_dim",
            m.bigram_dim,
            1..=8192,
            "the record has 128",
        )?;
        check_param("model.mlp_mult", m.mlp_mult, 1..=64, "the record has 3")?;
        Ok(())
    }

    fn check(&self) -> Result<(), String> {
        self.model.validate().map_err(|e| e.to_string())?;
        if self.batch < 1 {
            return Err(format!("batch {} must be at least 1", self.batch));
        }
        if self.threads < 1 {
            return Err("threads must be at least 1".into());
        }
        if self.steps < 1 {
            return Err("steps must be at least 1".into());
        }
        if !(self.max_seconds > 0.0 && self.max_seconds.is_finite()) {
            return Err(format!("max_seconds {} must be positive", self.max_seconds));
        }
        for (name, value) in [
            ("matrix_lr", self.matrix_lr),
            ("tied_embed_lr", self.tied_embed_lr),
            ("scalar_lr", self.scalar_lr),
            ("grad_clip", self.grad_clip),
        ] {
            if !(value > 0.0 && value.is_finite()) {
                return Err(format!("{name} {value} must be positive"));
            }
        }
        if !(0.0..1.0).contains(&self.ema_decay) {
            return Err(format!("ema_decay {} must be in [0, 1)", self.ema_decay));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(format!(
                "weight_decay {} must be non-negative",
                self.weight_decay
            ));
        }
        Ok(())
    }
}

/// `train`: tokens.train → `model.safetensors` (FP16), `config.json`, `train_log`.
pub struct TrainStage;

/// `train_log`: one row per optimiser step; `val_bpb` where validation ran.
pub const TRAIN_LOG: &[Column] = &[
    Column::new("step", U32),
    Column::new("loss", F64),
    Column::new("lr_multiplier", F64),
    Column::new("tokens_seen", I64),
    Column::nullable("val_bpb", F64),
];

/// `train_timing`: wall-clock seconds per step (volatile: never reproducible).
pub const TRAIN_TIMING: &[Column] = &[Column::new("step", U32), Column::new("seconds", F64)];

impl StageParams for TrainParams {
    fn validate(&self) -> Result<(), StageError> {
        self.check_sizes()?;
        self.check().map_err(StageError::InvalidParams)
    }
}

impl Stage for TrainStage {
    type Params = TrainParams;

    const SPEC: StageSpec = StageSpec {
        kind: "train",
        version: 1,
        summary: "train tokens -> the record's GPT (FP16 safetensors, config.json, train_log), via libtorch",
        inputs: &[Input::required(
            "tokens",
            &[
                Read::table("train", &["token"]),
                products::VAL.read(&["token", "bytes"]),
                Read::table("vocab", &["id"]),
            ],
        )],
        outputs: &[
            Output::file("model.safetensors", "the EMA weights in fp16"),
            Output::file("config.json", "the model's shape"),
            Output::table(products::TRAIN_LOG.name, TRAIN_LOG),
            Output::table("train_timing", TRAIN_TIMING).volatile(),
        ],
        run_seed_param: Some("seed"),
        metrics: &["final_val_bpb"],
        ..StageSpec::NONE
    };

    fn run(&self, ctx: &StageContext, params: TrainParams) -> Result<StageReport, StageError> {
        run_in_worker(Task::Train, ctx, params.numerics)
    }

    fn numerics(params: &TrainParams) -> Option<String> {
        Some(numerics::this_machine(params.numerics, params.device))
    }

    fn headline(&self, report: &serde_json::Map<String, Value>) -> Option<String> {
        let TrainReport {
            steps,
            final_val_bpb,
            compressed_model_bytes,
            ..
        } = stage_api::report_fields(report)?;
        Some(format!(
            "trained {steps} steps: val BPB {final_val_bpb:.4} (EMA weights, fp16); model {compressed_model_bytes} bytes xz-compressed"
        ))
    }
}

/// What `train` reports about the recipe's model (the worker writes it; the headline and
/// the seeds table read it).
#[derive(Debug, Serialize, Deserialize)]
pub struct TrainReport {
    pub parameters: i64,
    pub steps: u64,
    pub tokens_seen: i64,
    /// The last step's training loss (NaN, stored as null, when no step ran).
    pub final_loss: Option<f64>,
    pub initial_val_bpb: f64,
    /// Val BPB of the live weights at the last validation, before the EMA took over.
    pub pre_ema_val_bpb: f64,
    /// Val BPB of the exported EMA weights, loaded back from their fp16 file.
    pub final_val_bpb: f64,
    pub model_bytes: u64,
    pub compressed_model_bytes: u64,
    pub artifact_budget_bytes: u64,
    pub device: Device,
}

/// What `train` reports about the build that trained the model: not a function of the
/// recipe, so recorded as volatile (a model reused by newer code keeps the size of the
/// code that trained it).
#[derive(Debug, Serialize, Deserialize)]
pub struct TrainBuild {
    pub code_bytes: u64,
    /// Compressed model plus code, against [`TrainReport::artifact_budget_bytes`].
    pub artifact_bytes: u64,
    pub within_budget: bool,
    #[serde(flatten)]
    pub machine: Machine,
}

/// The machine a libtorch stage computed on: the kernels ([`stage_api::NUMERICS_KEY`])
/// and the processor. Volatile report entries: they describe the build.
#[derive(Debug, Serialize, Deserialize)]
pub struct Machine {
    pub numerics: String,
    pub cpu: String,
}

/// libtorch threads when a node does not say: the laptop-class machine this tool is
/// built on has two cores. A fixed default (rather than "all cores") keeps a recipe's
/// bytes the same on every machine.
pub const DEFAULT_TORCH_THREADS: usize = 2;

#[cfg(test)]
mod tests {
    use super::*;

    /// The runner and `audit` find the kernels under `stage_api::NUMERICS_KEY`: the
    /// field that records them must be named so.
    #[test]
    fn the_machine_records_its_kernels_under_the_numerics_key() {
        let machine = Machine {
            numerics: "cpu".into(),
            cpu: "x".into(),
        };
        let report = StageReport::default().with_volatile_fields(&machine);
        assert_eq!(report.summary[stage_api::NUMERICS_KEY], "cpu");
        assert!(report
            .volatile_keys
            .contains(&stage_api::NUMERICS_KEY.to_string()));
    }
}
