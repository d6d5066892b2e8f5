//! `model = "command"`: a user's scorer, run as a process (docs/scorers.md).
//!
//! The stage hands the program a request (JSON on stdin, and the same JSON in the file
//! `$CACHEMONEY_REQUEST`) naming the val tokens (Parquet, and a challenge-format shard),
//! the vocabulary, the trained model if the node has one, the positions to score, the
//! positions where the whole distribution is wanted, and an output directory. The
//! program writes `pass1.parquet` and `distributions.parquet` there and exits 0.
//! Everything it wrote is then validated as strictly as an imported table, because a
//! scorer's bug must be a one-line error here, not a wrong number three stages later.
//!
//! A scorer is a black box: whether its numbers are legal is the legality probes' job,
//! so an unnormalised distribution is written through (the probe must see it), while
//! anything that is not a distribution at all (a missing candidate, a NaN) is refused.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arrow::datatypes::{DataType, Float32Type, Int64Type, UInt16Type};
use parquet::arrow::arrow_reader::ArrowReaderMetadata;
use serde::Serialize;
use stage_api::{read_column, StageContext, StageError};

use crate::params::CommandParams;
use crate::{import_pass1, mass_sample_positions, read_val, Pass1Table};

/// The protocol's name and version, first in every request.
pub const PROTOCOL: &str = "cachemoney-scorer/1";
/// The environment variable that names the request file.
pub const REQUEST_ENV: &str = "CACHEMONEY_REQUEST";
/// The scorer's stdout and stderr, kept in the artifact (volatile: not hashed).
pub const SCORER_LOG: &str = "scorer.log";

/// What the scorer is asked to do.
#[derive(Debug, Serialize)]
pub struct Request {
    pub protocol: &'static str,
    pub node: String,
    pub vocab_size: usize,
    /// `val.parquet` of the tokens artifact: position, token, doc, bytes.
    pub val_parquet: PathBuf,
    /// The same val tokens as a challenge shard (256 × int32 header, then u16 tokens).
    pub val_shard: PathBuf,
    pub val_tokens: usize,
    pub train_parquet: PathBuf,
    pub vocab_parquet: PathBuf,
    /// The node's `inputs.model` artifact directory (model.safetensors, config.json).
    pub model_dir: Option<PathBuf>,
    /// Score every target position from `first` to `last` (inclusive): one row each at
    /// least (a sliding window may score some twice).
    pub score_first: usize,
    pub score_last: usize,
    /// Positions where the whole next-token distribution is wanted, sorted.
    pub distributions: Vec<i64>,
    /// Where to write pass1.parquet and distributions.parquet.
    pub output_dir: PathBuf,
}

/// Runs the scorer and returns its validated table, or a one-line error.
pub fn command_pass1(ctx: &StageContext, params: &CommandParams) -> Result<Pass1Table, StageError> {
    let tokens = ctx.input("tokens")?;
    let (val, val_bytes) = read_val(tokens)?;
    let vocab_size = read_column::<UInt16Type>(&tokens.file("vocab.parquet"), "id")?.len();
    let scratch = ctx.output("scorer");
    let output_dir = scratch.join("out");
    std::fs::create_dir_all(&output_dir).map_err(|e| StageError::io(&output_dir, e))?;
    let shard = scratch.join("val.bin");
    text::shards::write_shard(&shard, &val)?;
    let request = Request {
        protocol: PROTOCOL,
        node: ctx.node.clone(),
        vocab_size,
        val_parquet: tokens.file("val.parquet"),
        val_shard: shard,
        val_tokens: val.len(),
        train_parquet: tokens.file("train.parquet"),
        vocab_parquet: tokens.file("vocab.parquet"),
        model_dir: ctx.inputs.get("model").map(|m| m.dir.clone()),
        score_first: 1,
        score_last: val.len() - 1,
        distributions: mass_sample_positions(val.len() - 1, params.mass_sample, params.mass_seed),
        output_dir: output_dir.clone(),
    };
    let log_path = ctx.output(SCORER_LOG);
    let outcome = run_scorer(ctx, params, &request, &scratch, &log_path)
        .and_then(|()| check_directory(ctx, &scratch))
        .and_then(|()| read_outputs(&request, &val_bytes));
    match outcome {
        Ok(table) => {
            std::fs::remove_dir_all(&scratch).map_err(|e| StageError::io(&scratch, e))?;
            Ok(table)
        }
        Err(e) => Err(keep_for_inspection(ctx, e, &scratch, &log_path)),
    }
}

fn run_scorer(
    ctx: &StageContext,
    params: &CommandParams,
    request: &Request,
    scratch: &Path,
    log_path: &Path,
) -> Result<(), StageError> {
    let body = serde_json::to_vec_pretty(request).expect("requests serialise");
    let request_path = scratch.join("request.json");
    std::fs::write(&request_path, &body).map_err(|e| StageError::io(&request_path, e))?;
    let log = File::create(log_path).map_err(|e| StageError::io(log_path, e))?;
    let log_err = log.try_clone().map_err(|e| StageError::io(log_path, e))?;
    let (program, args) = params.command.split_first().expect("validated: not empty");
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(&ctx.work_dir)
        .envs(gpt::numerics::environment(params.numerics).iter().copied())
        .envs(&params.env)
        .env(REQUEST_ENV, &request_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err));
    isolate(&mut command);
    let mut child = command.spawn().map_err(|e| {
        ctx.error(format!(
            "cannot start the scorer {program} (in {}): {e}",
            ctx.work_dir.display()
        ))
    })?;
    // A scorer that never reads its stdin must not block us: write from a thread.
    let mut stdin = child.stdin.take().expect("piped");
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let deadline = Instant::now() + Duration::from_secs(params.timeout_s);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                kill_group(&child);
                let _ = child.wait();
                return Err(ctx.error(format!(
                    "the scorer ran past its timeout of {} s and was killed (params.timeout_s); its log: {}{}",
                    params.timeout_s,
                    log_path.display(),
                    last_line(log_path)
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(ctx.error(format!("waiting for the scorer: {e}"))),
        }
    };
    let _ = writer.join();
    if !status.success() {
        return Err(ctx.error(format!(
            "the scorer failed ({status}); its log: {}{}",
            log_path.display(),
            last_line(log_path)
        )));
    }
    Ok(())
}

/// The scorer gets its own process group (so that a timeout kills what it started too)
/// and dies with cachemoney, as the GPT worker does.
fn isolate(command: &mut Command) {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        command.process_group(0);
    }
    gpt::worker::die_with_parent(command);
}

fn kill_group(child: &std::process::Child) {
    #[cfg(unix)]
    // SAFETY: kill(2) with a process group id we created; no memory is touched.
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
    #[cfg(not(unix))]
    let _ = child;
}

/// `: LAST LINE` of the log, or `: (empty)`.
fn last_line(log: &Path) -> String {
    let last = File::open(log).ok().and_then(|f| {
        BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter(|l| !l.trim().is_empty())
            .last()
    });
    match last {
        Some(line) => format!(": {}", line.trim()),
        None => " (empty)".into(),
    }
}

/// The scorer writes only in its output directory: the artifact directory around it
/// must hold nothing new, and its outputs must be files, not links to elsewhere.
fn check_directory(ctx: &StageContext, scratch: &Path) -> Result<(), StageError> {
    let entries = std::fs::read_dir(&ctx.out_dir).map_err(|e| StageError::io(&ctx.out_dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != SCORER_LOG && entry.path() != scratch {
            return Err(StageError::input(
                entry.path(),
                "written by the scorer outside its output directory (request.output_dir)",
            ));
        }
    }
    for name in ["pass1.parquet", "distributions.parquet"] {
        let path = scratch.join("out").join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => return Err(StageError::input(
                &path,
                "a symbolic link: the scorer must write its outputs inside its output directory",
            )),
            Ok(_) => {}
            Err(_) if name == "distributions.parquet" => {}
            Err(_) => {
                return Err(StageError::input(
                    &path,
                    "missing: the scorer exited 0 but did not write it",
                ))
            }
        }
    }
    Ok(())
}

/// The protocol's column types, exactly: a float64 `model_p` would otherwise be
/// narrowed silently, and a scorer that thinks it writes f64 has other surprises.
fn check_schema(path: &Path, wanted: &[(&str, DataType)]) -> Result<(), StageError> {
    let file = File::open(path).map_err(|e| StageError::io(path, e))?;
    let metadata = ArrowReaderMetadata::load(&file, Default::default())
        .map_err(|e| StageError::format(path, e))?;
    let schema = metadata.schema();
    for (name, kind) in wanted {
        match schema.field_with_name(name) {
            Ok(field) if field.data_type() == kind => {}
            Ok(field) => {
                return Err(StageError::input(
                    path,
                    format!(
                        "column '{name}' is {}, the protocol says {kind}",
                        field.data_type()
                    ),
                ))
            }
            Err(_) => {
                let have: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                return Err(StageError::input(
                    path,
                    format!("no column '{name}' (it has: {})", have.join(", ")),
                ));
            }
        }
    }
    Ok(())
}

fn read_outputs(request: &Request, val_bytes: &[u8]) -> Result<Pass1Table, StageError> {
    let pass1_path = request.output_dir.join("pass1.parquet");
    check_schema(
        &pass1_path,
        &[
            ("position", DataType::Int64),
            ("model_p", DataType::Float32),
            ("entropy", DataType::Float32),
        ],
    )?;
    let mut table = import_pass1(&pass1_path, val_bytes)?;
    // Bytes are the tokens' (the challenge's rule), never the scorer's.
    table.bytes = table
        .position
        .iter()
        .map(|&p| val_bytes[p as usize])
        .collect();
    table.distributions =
        read_distributions(&request.output_dir.join("distributions.parquet"), request)?;
    Ok(table)
}

/// One full distribution per requested position, candidates 0..V in order, every
/// probability finite and non-negative. Sums are not checked here: that is the
/// normalisation probe's finding to make.
fn read_distributions(path: &Path, request: &Request) -> Result<Vec<(i64, Vec<f32>)>, StageError> {
    if request.distributions.is_empty() && !path.exists() {
        return Ok(Vec::new());
    }
    if !path.exists() {
        return Err(StageError::input(
            path,
            format!(
                "missing: the request asked for the distribution at {} positions",
                request.distributions.len()
            ),
        ));
    }
    check_schema(
        path,
        &[
            ("position", DataType::Int64),
            ("candidate", DataType::UInt16),
            ("model_p", DataType::Float32),
        ],
    )?;
    let position = read_column::<Int64Type>(path, "position")?;
    let candidate = read_column::<UInt16Type>(path, "candidate")?;
    let model_p = read_column::<Float32Type>(path, "model_p")?;
    let v = request.vocab_size;
    let expected_rows = request.distributions.len() * v;
    let mut out: Vec<(i64, Vec<f32>)> = Vec::with_capacity(request.distributions.len());
    for row in 0..position.len().min(expected_rows) {
        let (want_position, want_candidate) = (request.distributions[row / v], row % v);
        if position[row] != want_position || candidate[row] as usize != want_candidate {
            return Err(StageError::input(
                path,
                format!(
                    "row {row}: (position {}, candidate {}) where (position {want_position}, candidate {want_candidate}) was expected: one row per candidate 0..={} of a {v}-token vocabulary at each requested position, in order",
                    position[row], candidate[row], v - 1
                ),
            ));
        }
        let p = model_p[row];
        if !(p.is_finite() && p >= 0.0) {
            return Err(StageError::input(
                path,
                format!("row {row}: model_p {p} is not a finite non-negative probability"),
            ));
        }
        if want_candidate == 0 {
            out.push((want_position, Vec::with_capacity(v)));
        }
        out.last_mut().expect("pushed at candidate 0").1.push(p);
    }
    if position.len() != expected_rows {
        return Err(StageError::input(
            path,
            format!(
                "{} rows where {} positions × {v} candidates = {expected_rows} were expected (a distribution over another vocabulary size, or positions missing or extra)",
                position.len(),
                request.distributions.len()
            ),
        ));
    }
    Ok(out)
}

/// On failure the scorer's directory and log are moved beside the scratch directory
/// (swept at the next run), and the error names them there.
fn keep_for_inspection(
    ctx: &StageContext,
    error: StageError,
    scratch: &Path,
    log: &Path,
) -> StageError {
    let kept = ctx.out_dir.with_file_name(format!(
        "{}.failed-scorer",
        ctx.out_dir
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let _ = std::fs::remove_dir_all(&kept);
    if std::fs::rename(scratch, &kept).is_err() {
        return error;
    }
    let kept_log = kept.join(SCORER_LOG);
    let _ = std::fs::rename(log, &kept_log);
    let moved = |path: &Path| -> PathBuf {
        if let Ok(rest) = path.strip_prefix(scratch) {
            kept.join(rest)
        } else if path == log {
            kept_log.clone()
        } else {
            path.to_path_buf()
        }
    };
    let text = |message: String| {
        message.replace(&log.display().to_string(), &kept_log.display().to_string())
    };
    match error {
        StageError::Input { path, message } => StageError::Input {
            path: moved(&path),
            message: text(message),
        },
        StageError::Param { node, message } => StageError::Param {
            node,
            message: text(message),
        },
        other => other,
    }
}
