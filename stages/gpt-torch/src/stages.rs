//! The worker's side of the `train` and `pass1 (model = "gpt")` stages: read the input
//! artifacts, run the model code of this crate, write the outputs into the scratch
//! directory the runner gave. Parameters were validated by `gpt` before
//! the worker started; what only the data can tell (vocabulary sizes, a readable model
//! file) is checked here.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, UInt32Array};
use arrow::datatypes::{UInt16Type, UInt8Type};
use gpt::numerics::{self, Numerics};
use gpt::{Device, Machine, Request, Schedule, Task, TrainBuild, TrainParams, TrainReport};
use pass1::{GptScoring, Pass1Params, Pass1Report, Pass1Table};
use stage_api::{
    read_column, write_parquet, InputArtifact, ParquetLayout, StageContext, StageError, StageReport,
};
use tch::{nn, Kind, Tensor};

use crate::config::GptConfig;
use crate::model::Gpt;
use crate::optim::{lr_multiplier_steps, lr_multiplier_wallclock};
use crate::train::{TokenStream, TrainConfig, Trainer};
use crate::{export, score};

/// The challenge's limit on the artifact: compressed model plus the code that defines it
/// (§3.10).
pub const ARTIFACT_BUDGET_BYTES: u64 = 16_000_000;

/// The code that defines and runs the model, counted against the budget the way the
/// record counts `train_gpt.py`: this crate's sources (the stage plumbing excluded).
const MODEL_SOURCES: &[&str] = &[
    include_str!("../../gpt/src/config.rs"),
    include_str!("model.rs"),
    include_str!("optim.rs"),
    include_str!("train.rs"),
    include_str!("score.rs"),
    include_str!("export.rs"),
];

/// A source file without its unit tests (from `#[cfg(test)]` to the end): the record
/// counts `train_gpt.py`, which has none, so tests are not model code.
fn without_tests(source: &str) -> &str {
    match source.find("\n#[cfg(test)]") {
        Some(at) => &source[..at + 1],
        None => source,
    }
}

/// Runs one request: the entry point of the `cachemoney-gpt` worker.
pub fn run(request: &Request) -> Result<StageReport, StageError> {
    let ctx = request.context();
    match request.task {
        Task::Train => train(&ctx),
        Task::Pass1 => pass1(&ctx),
    }
}

fn device(ctx: &StageContext, wanted: Device) -> Result<tch::Device, StageError> {
    match wanted {
        Device::Cpu => Ok(tch::Device::Cpu),
        Device::Cuda if tch::Cuda::is_available() => Ok(tch::Device::Cuda(0)),
        Device::Cuda => Err(ctx.error("device = \"cuda\" but libtorch sees no CUDA device here")),
    }
}

/// The vocabulary size of a `tokenize` artifact.
fn vocab_size(tokens: &InputArtifact) -> Result<usize, StageError> {
    Ok(read_column::<UInt16Type>(&tokens.file("vocab.parquet"), "id")?.len())
}

/// Says what is wrong when a model's vocabulary is not the tokens'.
fn vocab_mismatch(
    config: &GptConfig,
    tokens: &InputArtifact,
) -> Result<Option<String>, StageError> {
    let vocab = vocab_size(tokens)?;
    Ok((config.vocab_size as usize != vocab).then(|| {
        format!(
            "vocab_size is {}, but the tokens' vocabulary ({}) has {vocab} entries",
            config.vocab_size,
            tokens.file("vocab.parquet").display()
        )
    }))
}

/// Mean NLL (nats, temperature 1) and bytes over non-overlapping `seq_len` windows of
/// `tokens`, the record's periodic validation (§3.9), as bits per byte.
fn validation_bpb(model: &Gpt, tokens: &[u16], bytes: &[u8], batch: usize) -> f64 {
    let n = model.config().seq_len as usize;
    let windows = tokens.len().saturating_sub(1) / n;
    let (mut nats, mut byte_total) = (0.0f64, 0u64);
    tch::no_grad(|| {
        for first in (0..windows).step_by(batch.max(1)) {
            let rows = (windows - first).min(batch.max(1));
            let start = first * n;
            let x: Vec<i64> = tokens[start..start + rows * n]
                .iter()
                .map(|&t| t as i64)
                .collect();
            let y: Vec<i64> = tokens[start + 1..start + rows * n + 1]
                .iter()
                .map(|&t| t as i64)
                .collect();
            let x = Tensor::from_slice(&x)
                .view([rows as i64, n as i64])
                .to_device(model.device());
            let y = Tensor::from_slice(&y).to_device(model.device());
            let logits = model.forward(&x).to_kind(Kind::Float);
            let vocab = model.config().vocab_size;
            let loss = logits.view([-1, vocab]).cross_entropy_loss::<Tensor>(
                &y,
                None,
                tch::Reduction::Sum,
                -100,
                0.0,
            );
            nats += loss.double_value(&[]);
            byte_total += bytes[start + 1..start + rows * n + 1]
                .iter()
                .map(|&b| b as u64)
                .sum::<u64>();
        }
    });
    nats / (std::f64::consts::LN_2 * byte_total.max(1) as f64)
}

/// One row of `train_log`.
struct LogRow {
    step: u32,
    loss: f64,
    lr_multiplier: f64,
    tokens_seen: i64,
    val_bpb: Option<f64>,
    seconds: f64,
}

fn write_train_log(path: &Path, rows: &[LogRow]) -> Result<u64, StageError> {
    let schema = stage_api::arrow_schema(gpt::TRAIN_LOG);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.step))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.loss))),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.lr_multiplier),
        )),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.tokens_seen),
        )),
        Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.val_bpb))),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).expect("columns match schema");
    write_parquet(path, schema, [batch], &ParquetLayout::default())
}

/// Wall-clock seconds per step: not reproducible, so kept out of `train_log` (whose
/// bytes are) and written as a volatile table the runner leaves out of the content hash.
fn write_train_timing(path: &Path, rows: &[LogRow]) -> Result<u64, StageError> {
    let schema = stage_api::arrow_schema(gpt::TRAIN_TIMING);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.step))),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.seconds),
        )),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).expect("columns match schema");
    write_parquet(path, schema, [batch], &ParquetLayout::default())
}

/// xz (LZMA2, preset 6) of the model file: the record's size accounting (§3.10), which
/// compresses its `torch.save` of the same fp16 tensors.
fn xz_size(path: &Path) -> Result<u64, StageError> {
    let raw = std::fs::read(path).map_err(|e| StageError::io(path, e))?;
    let mut compressed = Vec::new();
    let mut encoder = liblzma::read::XzEncoder::new(raw.as_slice(), 6);
    std::io::Read::read_to_end(&mut encoder, &mut compressed)
        .map_err(|e| StageError::io(path, e))?;
    Ok(compressed.len() as u64)
}

/// Refuses to compute when this process's environment is not what `mode` pins (so a
/// worker started by hand cannot write other bytes under the same recipe), and says
/// which kernels it computes with, on which processor, for the report.
fn pinned_numerics(
    ctx: &StageContext,
    mode: Numerics,
    device: Device,
) -> Result<(String, String), StageError> {
    numerics::check_environment(mode).map_err(|m| ctx.error(m))?;
    Ok((
        numerics::this_machine(mode, device),
        numerics::Cpu::this().describe(),
    ))
}

fn train(ctx: &StageContext) -> Result<StageReport, StageError> {
    let params: TrainParams = ctx.params_as()?;
    let (numerics, cpu) = pinned_numerics(ctx, params.numerics, params.device)?;
    tch::set_num_threads(params.threads as i32);
    let data = TrainingData::read(ctx, &params)?;
    let device = device(ctx, params.device)?;
    let mut report = StageReport::default();

    let started = Instant::now();
    tch::manual_seed(params.seed);
    let vs = nn::VarStore::new(device);
    let model = Gpt::new(&vs.root(), &params.model)
        .map_err(|e| StageError::InvalidParams(format!("model: {e}")))?;
    let parameters: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
    let mut trainer = Trainer::new(&vs, &optimiser_config(&params));
    let val_batch = (params.batch as usize).max(1);
    let validate =
        |model: &Gpt| validation_bpb(model, &data.val_tokens, &data.val_bytes, val_batch);
    let initial_val_bpb = validate(&model);
    let (log, last_val_bpb) = train_steps(
        ctx,
        &params,
        &data,
        (&model, &mut trainer, device),
        (&validate, initial_val_bpb),
    )?;
    let steps_done = log.len();
    let (batch, seq_len) = (params.batch, params.model.seq_len);
    report.phase("train", started);

    // The final weights are the EMA, stored in fp16; the figure that counts is measured
    // on exactly those (loaded back from the file), as the record's round-trip check.
    let started = Instant::now();
    trainer.finish();
    let model_path = ctx.output("model.safetensors");
    export::write_fp16(&vs, &model_path).map_err(|e| StageError::format(&model_path, e))?;
    export::load_into(&vs, &model_path).map_err(|m| StageError::format(&model_path, m))?;
    let final_val_bpb = validate(&model);
    let config_path = ctx.output("config.json");
    let config_json = serde_json::to_string_pretty(&params.model).expect("configs serialise");
    std::fs::write(&config_path, config_json + "\n")
        .map_err(|e| StageError::io(&config_path, e))?;
    write_train_log(&ctx.output("train_log.parquet"), &log)?;
    write_train_timing(&ctx.output("train_timing.parquet"), &log)?;
    report.phase("export", started);

    let started = Instant::now();
    let model_bytes = std::fs::metadata(&model_path)
        .map_err(|e| StageError::io(&model_path, e))?
        .len();
    let compressed = xz_size(&model_path)?;
    let code_bytes: u64 = MODEL_SOURCES
        .iter()
        .map(|s| without_tests(s).len() as u64)
        .sum();
    report.phase("size_accounting", started);

    let tokens_seen = steps_done as i64 * batch * seq_len;
    Ok(report
        .with_fields(&TrainReport {
            parameters,
            steps: steps_done as u64,
            tokens_seen,
            final_loss: log.last().map(|r| r.loss),
            initial_val_bpb,
            pre_ema_val_bpb: last_val_bpb,
            final_val_bpb,
            model_bytes,
            compressed_model_bytes: compressed,
            artifact_budget_bytes: ARTIFACT_BUDGET_BYTES,
            device: params.device,
        })
        .with_volatile_fields(&TrainBuild {
            code_bytes,
            artifact_bytes: compressed + code_bytes,
            within_budget: compressed + code_bytes <= ARTIFACT_BUDGET_BYTES,
            machine: Machine { numerics, cpu },
        }))
}

/// The optimisers' settings: converted from the stage's parameters (which the runner
/// checks without libtorch) here and nowhere else.
fn optimiser_config(params: &TrainParams) -> TrainConfig {
    TrainConfig {
        matrix_lr: params.matrix_lr,
        tied_embed_lr: params.tied_embed_lr,
        scalar_lr: params.scalar_lr,
        weight_decay: params.weight_decay,
        grad_clip: params.grad_clip,
        ema_decay: params.ema_decay,
        momentum_warmup_steps: params.momentum_warmup_steps,
    }
}

/// The token streams `train` reads: every train token, and the val tokens (and their
/// bytes) it validates on, cut to `val_tokens` when that is set.
struct TrainingData {
    train_tokens: Vec<u16>,
    val_tokens: Vec<u16>,
    val_bytes: Vec<u8>,
}

impl TrainingData {
    fn read(ctx: &StageContext, params: &TrainParams) -> Result<Self, StageError> {
        let tokens = ctx.input("tokens")?;
        if let Some(message) = vocab_mismatch(&params.model, tokens)? {
            return Err(ctx.error(format!("params.model.{message}")));
        }
        let train_path = tokens.file("train.parquet");
        let train_tokens = read_column::<UInt16Type>(&train_path, "token")?;
        if train_tokens.len() < 2 {
            return Err(StageError::input(
                &train_path,
                "fewer than 2 train tokens: nothing to train on",
            ));
        }
        let val_path = tokens.file("val.parquet");
        let mut val_tokens = read_column::<UInt16Type>(&val_path, "token")?;
        let mut val_bytes = read_column::<UInt8Type>(&val_path, "bytes")?;
        if params.val_tokens > 0 && val_tokens.len() > params.val_tokens + 1 {
            val_tokens.truncate(params.val_tokens + 1);
            val_bytes.truncate(params.val_tokens + 1);
        }
        if val_tokens.len() <= params.model.seq_len as usize {
            return Err(StageError::input(
                &val_path,
                format!(
                    "{} val tokens are too few for one validation window of seq_len {}",
                    val_tokens.len(),
                    params.model.seq_len
                ),
            ));
        }
        Ok(TrainingData {
            train_tokens,
            val_tokens,
            val_bytes,
        })
    }
}

/// The training loop: steps until `params.steps` (or the wall-clock budget), a log row
/// per step, validating every `val_every` steps and after the last. Returns the log and
/// the last validation's BPB (of the weights before the EMA; the initial one when no step
/// validated).
fn train_steps(
    ctx: &StageContext,
    params: &TrainParams,
    data: &TrainingData,
    (model, trainer, device): (&Gpt, &mut Trainer, tch::Device),
    (validate, initial_val_bpb): (&dyn Fn(&Gpt) -> f64, f64),
) -> Result<(Vec<LogRow>, f64), StageError> {
    let mut stream = TokenStream::new(&data.train_tokens);
    let (batch, seq_len) = (params.batch, params.model.seq_len);
    let bar = ctx.progress(params.steps as u64, "training steps");
    let mut log: Vec<LogRow> = Vec::with_capacity(params.steps);
    let mut last_val_bpb = initial_val_bpb;
    let mut training_seconds = 0.0f64;
    for step in 0..params.steps {
        let step_started = Instant::now();
        let scale = match params.schedule {
            Schedule::Steps => lr_multiplier_steps(step, params.steps, params.warmdown_steps),
            Schedule::Wallclock => lr_multiplier_wallclock(
                step,
                training_seconds * 1000.0,
                params.max_seconds * 1000.0,
                params.warmdown_steps,
            ),
        };
        let (x, y) = stream.next_batch(batch, seq_len);
        let loss = trainer.step(model, &x.to_device(device), &y.to_device(device), scale);
        let seconds = step_started.elapsed().as_secs_f64();
        training_seconds += seconds;
        let steps_done = step + 1;
        if !loss.is_finite() {
            return Err(ctx.error(format!(
                "training diverged at step {steps_done}: loss {loss}; lower the learning rates"
            )));
        }
        let last = steps_done == params.steps
            || (params.schedule == Schedule::Wallclock && training_seconds >= params.max_seconds);
        let val_bpb =
            if last || (params.val_every > 0 && steps_done.is_multiple_of(params.val_every)) {
                last_val_bpb = validate(model);
                Some(last_val_bpb)
            } else {
                None
            };
        log.push(LogRow {
            step: steps_done as u32,
            loss,
            lr_multiplier: scale,
            tokens_seen: steps_done as i64 * batch * seq_len,
            val_bpb,
            seconds,
        });
        bar.inc(1);
        if last {
            break;
        }
    }
    bar.finish_and_clear();
    Ok((log, last_val_bpb))
}

/// Reads a `train` artifact's `config.json` and `model.safetensors` into a model on
/// `device`.
fn load_model(
    model: &InputArtifact,
    tokens: &InputArtifact,
    device: tch::Device,
) -> Result<(nn::VarStore, Gpt), StageError> {
    let config_path = model.file("config.json");
    let text =
        std::fs::read_to_string(&config_path).map_err(|e| StageError::io(&config_path, e))?;
    let config: GptConfig = serde_json::from_str(&text)
        .map_err(|e| StageError::input(&config_path, format!("not a model config: {e}")))?;
    config
        .validate()
        .map_err(|e| StageError::input(&config_path, e.to_string()))?;
    if let Some(message) = vocab_mismatch(&config, tokens)? {
        return Err(StageError::input(
            &config_path,
            format!("the model's {message}"),
        ));
    }
    let vs = nn::VarStore::new(device);
    let gpt = Gpt::new(&vs.root(), &config)
        .map_err(|e| StageError::input(&config_path, e.to_string()))?;
    export::load_into(&vs, &model.file("model.safetensors"))
        .map_err(|m| StageError::input(model.file("model.safetensors"), m))?;
    Ok((vs, gpt))
}

fn pass1(ctx: &StageContext) -> Result<StageReport, StageError> {
    let Pass1Params::Gpt(params) = ctx.params_as()? else {
        return Err(ctx.error("the GPT worker scores only model = \"gpt\""));
    };
    let options = &params;
    let (numerics, cpu) = pinned_numerics(ctx, options.numerics, options.device)?;
    tch::set_num_threads(options.threads as i32);
    let tokens = ctx.input("tokens")?;
    let (val, val_bytes) = pass1::read_val(tokens)?;
    let device = device(ctx, options.device)?;
    let mut report = StageReport::default();
    let started = Instant::now();
    let (_vs, model) = load_model(ctx.input("model")?, tokens, device)?;
    report.phase("load", started);

    let started = Instant::now();
    let n_ctx = model.config().seq_len as usize;
    let windows = score::windows(val.len() - 1, n_ctx, options.stride, options.tail).len();
    let bar = ctx.progress(windows as u64, "pass-1 windows");
    let hints = match ctx.inputs.get("hints") {
        Some(h) => pass1::hints::read_hints(h, val.len() - 1)?,
        None => Vec::new(),
    };
    let scores = score::score_with_hints(
        &model,
        &val,
        &hints,
        (options.stride, options.tail, options.batch),
        params.temperature,
        &pass1::probe_positions(tokens, val.len() - 1, params.mass_sample, params.mass_seed)?,
        |done| bar.inc(done as u64),
    );
    bar.finish_and_clear();
    report.phase("score", started);
    if let Some(bad) = scores.model_p.iter().position(|p| !(*p > 0.0 && *p <= 1.0)) {
        return Err(StageError::input(
            ctx.input("model")?.file("model.safetensors"),
            format!(
                "the model gave probability {} at position {}: are its weights finite?",
                scores.model_p[bad], scores.position[bad]
            ),
        ));
    }

    let started = Instant::now();
    let hint = hints;
    let table = Pass1Table {
        bytes: scores
            .position
            .iter()
            .map(|&p| val_bytes[p as usize])
            .collect(),
        position: scores.position,
        model_p: scores.model_p,
        entropy: scores.entropy,
        distributions: scores.distributions,
        hint,
        hint_p: scores.hint_p,
    };
    table.write(&ctx.output("pass1.parquet"))?;
    table.write_distributions(&ctx.output("distributions.parquet"))?;
    table.write_hint_p(&ctx.output("hint_p.parquet"))?;
    report.phase("write", started);
    Ok(report
        .with_fields(&Pass1Report {
            summary: table.summary(),
            model: "gpt".to_string(),
        })
        .with_fields(&GptScoring {
            windows: windows as u64,
            n_ctx: n_ctx as u64,
            stride: options.stride as u64,
            tail: options.tail,
            device: options.device,
        })
        .with_volatile_fields(&Machine { numerics, cpu }))
}
