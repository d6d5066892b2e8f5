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
//! A scorer is a black box that may be written to fool the legality probes, so it runs
//! confined (`cachemoney-sandbox`): in a fresh private directory holding copies of its
//! own files (`files.scorer`) and of its inputs, with an environment of its recipe's
//! alone, reading nothing else of the project or the store, writing only its output
//! directory and a private home, without network, its whole process tree killed when
//! it ends. The original run and every legality re-run look the same from inside: the
//! same file names, the same request keys, the same environment; only the data differ.
//!
//! Whether its numbers are legal is the legality probes' job, so an unnormalised
//! distribution is written through (the probe must see it), while anything that is not
//! a distribution at all (a missing candidate, a NaN) is refused.

use std::path::PathBuf;

use arrow::datatypes::UInt16Type;
use command::process::{self, copy_input, date, date_directories, Program, Workspace};
use sandbox::Isolation;
use serde::Serialize;
use stage_api::{read_column, StageContext, StageError};

use crate::params::CommandParams;

mod outputs;
use crate::{read_val, Pass1Table};
use outputs::{check_directory, read_outputs};

/// The protocol's name and version, first in every request. Version 2: paths are
/// relative to the scorer's working directory (private copies), and the request no
/// longer names the node (a re-run must not be told from the original).
pub const PROTOCOL: &str = "cachemoney-scorer/2";
/// Version 3 is version 2 with the n-gram tilt's hints (`hints_parquet`), to which the
/// scorer answers with `hint_p.parquet`. Only a node with `inputs.hints` sends it, so a
/// scorer that speaks version 2 runs as it did wherever it is not asked for hints.
pub const PROTOCOL_HINTS: &str = "cachemoney-scorer/3";
pub use command::process::REQUEST_ENV;
/// The scorer's stdout and stderr, kept in the artifact (volatile: not hashed).
pub const SCORER_LOG: &str = "scorer.log";
/// What the sandbox achieved for this run, kept in the artifact (volatile) for the
/// legality probes to report.
pub const SANDBOX_REPORT: &str = "sandbox.json";
pub use command::LOG_CAP;

/// What the scorer is asked to do. Paths are relative to its working directory.
#[derive(Debug, Serialize)]
pub struct Request {
    pub protocol: &'static str,
    pub vocab_size: usize,
    /// `val.parquet` of the tokens artifact: position, token, doc, bytes.
    pub val_parquet: PathBuf,
    /// The same val tokens as a challenge shard (256 × int32 header, then u16 tokens).
    pub val_shard: PathBuf,
    pub val_tokens: usize,
    pub train_parquet: PathBuf,
    pub vocab_parquet: PathBuf,
    /// A copy of the node's `inputs.model` artifact (model.safetensors, config.json).
    pub model_dir: Option<PathBuf>,
    /// Score every target position from `first` to `last` (inclusive): one row each at
    /// least (a sliding window may score some twice).
    pub score_first: usize,
    pub score_last: usize,
    /// Positions where the whole next-token distribution is wanted, sorted.
    pub distributions: Vec<i64>,
    /// Version 3: a copy of the node's `inputs.hints` table (position, hint, share,
    /// seen), one row per target; the scorer writes each entry's p(hint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hints_parquet: Option<PathBuf>,
    /// Where to write pass1.parquet and distributions.parquet (and hint_p.parquet).
    pub output_dir: PathBuf,
}

/// Runs the scorer and returns its validated table and what its sandbox achieved, or a
/// one-line error.
pub fn command_pass1(
    ctx: &StageContext,
    params: &CommandParams,
) -> Result<(Pass1Table, Isolation), StageError> {
    let tokens = ctx.input("tokens")?;
    let (val, val_bytes) = read_val(tokens)?;
    let vocab_size = read_column::<UInt16Type>(&tokens.file("vocab.parquet"), "id")?.len();
    let workspace = Workspace::create(ctx)?;
    let program = program(params);
    let outcome = prepare(ctx, params, &workspace, tokens, &val, vocab_size).and_then(|request| {
        let isolation = process::run(ctx, &program, &workspace, &workspace.request())?;
        check_directory(ctx, &workspace, &program)?;
        let hints = match ctx.inputs.get("hints") {
            Some(h) => crate::hints::read_hints(h, val.len() - 1)?,
            None => Vec::new(),
        };
        let table = read_outputs(&workspace.root, &request, &val_bytes, hints)?;
        Ok((table, isolation))
    });
    match outcome {
        Ok(done) => {
            workspace.remove();
            Ok(done)
        }
        Err(e) => Err(process::keep_for_inspection(ctx, e, &workspace, &program)),
    }
}

/// Fills the workspace: the scorer's files where its command line expects them, copies
/// of its inputs, and the request.
fn prepare(
    ctx: &StageContext,
    params: &CommandParams,
    workspace: &Workspace,
    tokens: &stage_api::InputArtifact,
    val: &[u16],
    vocab_size: usize,
) -> Result<Request, StageError> {
    let root = &workspace.root;
    process::copy_own_files(ctx, "scorer", root)?;
    let input = Workspace::input;
    for name in ["val.parquet", "train.parquet", "vocab.parquet"] {
        copy_input(&tokens.file(name), &root.join(input(name)))?;
    }
    text::shards::write_shard(&root.join(input("val.bin")), val)?;
    date(&root.join(input("val.bin")))?;
    let model_dir = match ctx.inputs.get("model") {
        Some(model) => {
            copy_input(&model.dir, &root.join(input("model")))?;
            Some(input("model"))
        }
        None => None,
    };
    let hints_parquet = match ctx.inputs.get("hints") {
        Some(hints) => {
            copy_input(
                &hints.file("hints.parquet"),
                &root.join(input("hints.parquet")),
            )?;
            Some(input("hints.parquet"))
        }
        None => None,
    };
    let request = Request {
        protocol: match hints_parquet {
            Some(_) => PROTOCOL_HINTS,
            None => PROTOCOL,
        },
        vocab_size,
        val_parquet: input("val.parquet"),
        val_shard: input("val.bin"),
        val_tokens: val.len(),
        train_parquet: input("train.parquet"),
        vocab_parquet: input("vocab.parquet"),
        model_dir,
        score_first: 1,
        score_last: val.len() - 1,
        distributions: crate::probe_positions(
            tokens,
            val.len() - 1,
            params.mass_sample,
            params.mass_seed,
        )?,
        hints_parquet,
        output_dir: PathBuf::from("out"),
    };
    let path = workspace.request();
    let body = serde_json::to_vec_pretty(&request).expect("requests serialise");
    std::fs::write(&path, body).map_err(|e| StageError::io(&path, e))?;
    date(&path)?;
    date_directories(root)?;
    Ok(request)
}

/// The environment the scorer gets: nothing of ours but what makes a program run, the
/// numerics it is pinned to, and its recipe's own `env`. The same in every run.
fn environment(params: &CommandParams) -> Vec<(String, String)> {
    let mut env = process::base_environment();
    for (k, v) in gpt::numerics::environment(params.numerics) {
        process::set_env(&mut env, k, v);
    }
    for (k, v) in &params.env {
        process::set_env(&mut env, k, v);
    }
    env
}

/// How the scorer runs: its recipe's command, environment, reads and timeout.
fn program(params: &CommandParams) -> Program<'_> {
    Program {
        what: "scorer",
        command: &params.command,
        files: "scorer",
        env: environment(params),
        read: &params.read,
        timeout_s: params.timeout_s,
        loopback: false,
        log: SCORER_LOG,
    }
}
