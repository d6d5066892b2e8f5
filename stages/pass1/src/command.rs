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

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arrow::datatypes::UInt16Type;
use sandbox::{Confinement, Finished, Isolation};
use serde::Serialize;
use stage_api::{read_column, StageContext, StageError};

use crate::params::CommandParams;

mod log;
mod outputs;
use crate::{read_val, Pass1Table};
use log::{last_line, CappedLog};
use outputs::{check_directory, defuse, read_outputs};

/// The protocol's name and version, first in every request. Version 2: paths are
/// relative to the scorer's working directory (private copies), and the request no
/// longer names the node (a re-run must not be told from the original).
pub const PROTOCOL: &str = "cachemoney-scorer/2";
/// Version 3 is version 2 with the n-gram tilt's hints (`hints_parquet`), to which the
/// scorer answers with `hint_p.parquet`. Only a node with `inputs.hints` sends it, so a
/// scorer that speaks version 2 runs as it did wherever it is not asked for hints.
pub const PROTOCOL_HINTS: &str = "cachemoney-scorer/3";
/// The environment variable that names the request file.
pub const REQUEST_ENV: &str = "CACHEMONEY_REQUEST";
/// The scorer's stdout and stderr, kept in the artifact (volatile: not hashed).
pub const SCORER_LOG: &str = "scorer.log";
/// What the sandbox achieved for this run, kept in the artifact (volatile) for the
/// legality probes to report.
pub const SANDBOX_REPORT: &str = "sandbox.json";
/// The log keeps this many bytes from the start and as many from the end of what the
/// scorer printed, and says how much it dropped between.
pub const LOG_CAP: usize = 512 * 1024;

/// Every input file the scorer sees is dated this (2001-09-09): a date that differs
/// from run to run would tell a re-run from the original.
const INPUT_MTIME_SECONDS: u64 = 1_000_000_000;

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

/// The scorer's private directory: its working directory, with its files, its inputs
/// (`in/`), its output directory (`out/`) and a home (`home/`, also its TMPDIR), all
/// deleted after the run. Beside it, out of the scorer's reach, the control directory
/// where the sandbox launcher is told what to do and reports back.
struct Workspace {
    root: PathBuf,
    control: PathBuf,
}

impl Workspace {
    /// A fresh one in the store's scratch area, under a random name.
    fn create(ctx: &StageContext) -> Result<Workspace, StageError> {
        let scratch = ctx.out_dir.parent().unwrap_or(&ctx.out_dir);
        let name = format!("sandbox-{:016x}", random_u64());
        let root = scratch.join(&name);
        let control = scratch.join(format!("{name}.control"));
        for dir in [
            root.clone(),
            root.join("in"),
            root.join("out"),
            root.join("home/tmp"),
            control.clone(),
        ] {
            std::fs::create_dir_all(&dir).map_err(|e| StageError::io(&dir, e))?;
        }
        Ok(Workspace { root, control })
    }

    fn out(&self) -> PathBuf {
        self.root.join("out")
    }

    fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_dir_all(&self.control);
    }
}

/// A random number for a directory name (the hasher's per-process random keys).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish()
}

/// Copies `from` to `to` (a directory: its files, recursively) and dates it
/// [`INPUT_MTIME_SECONDS`]. A copy, not a link: a link would lead back into the store
/// and its link count would differ between runs.
fn copy_input(from: &Path, to: &Path) -> Result<(), StageError> {
    if from.is_dir() {
        std::fs::create_dir_all(to).map_err(|e| StageError::io(to, e))?;
        let entries = std::fs::read_dir(from).map_err(|e| StageError::io(from, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name == "manifest.json" {
                continue;
            }
            copy_input(&entry.path(), &to.join(name))?;
        }
    } else {
        std::fs::copy(from, to).map_err(|e| StageError::io(to, e))?;
    }
    date(to)
}

fn date(path: &Path) -> Result<(), StageError> {
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(INPUT_MTIME_SECONDS);
    let file = File::open(path).map_err(|e| StageError::io(path, e))?;
    file.set_times(
        std::fs::FileTimes::new()
            .set_accessed(when)
            .set_modified(when),
    )
    .map_err(|e| StageError::io(path, e))
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
    let outcome = prepare(ctx, params, &workspace, tokens, &val, vocab_size).and_then(|request| {
        let isolation = run_scorer(ctx, params, &workspace, &request)?;
        check_directory(ctx, &workspace)?;
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
        Err(e) => Err(keep_for_inspection(ctx, e, &workspace)),
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
    for file in ctx.files("scorer") {
        let relative = relative_to(file, &ctx.work_dir).ok_or_else(|| {
            StageError::input(
                file,
                "files.scorer must lie inside the pipeline's directory: the scorer gets a copy at the same relative path",
            )
        })?;
        let to = root.join(&relative);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| StageError::io(parent, e))?;
        }
        std::fs::copy(file, &to).map_err(|e| StageError::io(&to, e))?;
        date(&to)?;
    }
    let input = |name: &str| PathBuf::from("in").join(name);
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
    let path = root.join("request.json");
    let body = serde_json::to_vec_pretty(&request).expect("requests serialise");
    std::fs::write(&path, body).map_err(|e| StageError::io(&path, e))?;
    date(&path)?;
    date_directories(root)?;
    Ok(request)
}

/// Dates every directory under `root` (its files are dated when copied), deepest
/// first: when a directory was made must not tell one run from another.
fn date_directories(root: &Path) -> Result<(), StageError> {
    let entries = std::fs::read_dir(root).map_err(|e| StageError::io(root, e))?;
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            date_directories(&entry.path())?;
        }
    }
    date(root)
}

/// `path` relative to `base`, if it lies inside it: as written (a link inside the
/// pipeline's directory to files elsewhere is still inside), else once both are
/// resolved.
fn relative_to(path: &Path, base: &Path) -> Option<PathBuf> {
    if let Ok(rest) = path.strip_prefix(base) {
        if !rest
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            return Some(rest.to_path_buf());
        }
    }
    let path = path.canonicalize().ok()?;
    let base = base.canonicalize().ok()?;
    path.strip_prefix(&base).ok().map(Path::to_path_buf)
}

/// The program to run: a path with a separator is the pipeline directory's, a bare
/// name is looked up in `PATH`, as a shell would.
fn resolve_program(ctx: &StageContext, program: &str) -> Result<PathBuf, StageError> {
    let found = if program.contains('/') {
        Some(ctx.work_dir.join(program))
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|candidate| candidate.is_file())
        })
    };
    match found {
        Some(path) if path.exists() => {
            std::path::absolute(&path).map_err(|e| StageError::io(&path, e))
        }
        _ => Err(ctx.error(format!(
            "cannot start the scorer {program} (in {}): no such program",
            ctx.work_dir.display()
        ))),
    }
}

/// What the program needs to read to run: the installation it belongs to, for each
/// link on the way to the real file (`.venv/bin/python` → the virtualenv and the
/// Python it points at). An installation is the directory above a `bin`, else the
/// program's own directory; one that holds the store is refused in favour of the
/// program's directory alone, so that no rule ever reaches the store.
fn program_prefixes(program: &Path, store: &Path) -> Vec<PathBuf> {
    let mut prefixes = Vec::new();
    let mut hop = program.to_path_buf();
    for _ in 0..16 {
        if let Some(dir) = hop.parent() {
            let installation = match dir.file_name() {
                Some(name) if name == "bin" => dir.parent().unwrap_or(dir),
                _ => dir,
            };
            let candidates = [installation, dir];
            if let Some(safe) = candidates.iter().find(|c| !store.starts_with(c)) {
                prefixes.push(safe.to_path_buf());
            } else {
                prefixes.push(hop.clone());
            }
        }
        match std::fs::read_link(&hop) {
            Ok(target) => {
                hop = match hop.parent() {
                    Some(dir) if target.is_relative() => dir.join(target),
                    _ => target,
                }
            }
            Err(_) => break,
        }
    }
    prefixes
}

/// The environment the scorer gets: nothing of ours but what makes a program run, the
/// numerics it is pinned to, and its recipe's own `env`. The same in every run.
fn environment(params: &CommandParams) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ("HOME", "home"),
        ("TMPDIR", "home/tmp"),
        ("LANG", "C.UTF-8"),
        ("PYTHONDONTWRITEBYTECODE", "1"),
        (REQUEST_ENV, "request.json"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.extend(
        gpt::numerics::environment(params.numerics)
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    for (k, v) in &params.env {
        env.retain(|(name, _)| name != k);
        env.push((k.clone(), v.clone()));
    }
    env
}

fn run_scorer(
    ctx: &StageContext,
    params: &CommandParams,
    workspace: &Workspace,
    request: &Request,
) -> Result<Isolation, StageError> {
    let body = serde_json::to_vec_pretty(request).expect("requests serialise");
    let (program, args) = params.command.split_first().expect("validated: not empty");
    let program_path = resolve_program(ctx, program)?;
    let store = ctx
        .out_dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(&ctx.out_dir);
    let mut read = vec![workspace.root.clone()];
    read.extend(program_prefixes(&program_path, store));
    // Never the store, nor a directory holding it (the project's own, say), however
    // named: through a link, `..`, or the store's root (the red team's, after stop 33).
    let store_real = std::fs::canonicalize(store).unwrap_or(store.to_path_buf());
    for extra in &params.read {
        let path = ctx.work_dir.join(extra);
        let real = std::fs::canonicalize(&path).unwrap_or(path.clone());
        if real.starts_with(&store_real) || store_real.starts_with(&real) {
            return Err(ctx.error(format!(
                "params.read: {extra} is {} the artifact store ({}): a scorer may not read the store",
                if real.starts_with(&store_real) { "inside" } else { "a directory holding" },
                store_real.display()
            )));
        }
        read.push(path);
    }
    // HOME and TMPDIR are relative in `environment`: made absolute here, where the
    // workspace is known (the scorer sees the same relative layout in every run).
    let env = environment(params)
        .into_iter()
        .map(|(k, v)| match k.as_str() {
            "HOME" | "TMPDIR" => {
                // Absolute: the scorer runs in the workspace, and a pipeline named by a
                // relative path (`-p backtest.toml`) gives a relative workspace.
                let path = workspace.root.join(&v);
                let path = std::path::absolute(&path).unwrap_or(path);
                (k, path.display().to_string())
            }
            _ => (k, v),
        })
        .collect();
    let confinement = Confinement {
        program: program_path,
        args: args.iter().map(Into::into).collect(),
        cwd: workspace.root.clone(),
        env,
        read,
        write: vec![workspace.out(), workspace.root.join("home")],
    };
    let mut running = sandbox::spawn(
        &confinement,
        &workspace.control,
        Stdio::piped(),
        Stdio::piped(),
        Stdio::piped(),
    )
    .map_err(|e| ctx.error(format!("cannot start the scorer {program}: {e}")))?;
    let log = Arc::new(Mutex::new(CappedLog::default()));
    let readers: Vec<_> = [
        running
            .stdout()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        running
            .stderr()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|mut stream| {
        let log = log.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 64 * 1024];
            while let Ok(n) = stream.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                log.lock().expect("not poisoned").push(&buffer[..n]);
            }
        })
    })
    .collect();
    // A scorer that never reads its stdin must not block us: write from a thread. Its
    // pipe closes when the tree is killed, whoever holds it.
    let writer = running.stdin().map(|mut stdin| {
        std::thread::spawn(move || {
            let _ = stdin.write_all(&body);
        })
    });
    let deadline = Instant::now() + Duration::from_secs(params.timeout_s);
    let finished = running
        .wait(deadline)
        .map_err(|e| ctx.error(format!("waiting for the scorer: {e}")))?;
    for reader in readers {
        let _ = reader.join();
    }
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    let log_path = ctx.output(SCORER_LOG);
    let text = log.lock().expect("not poisoned").finish();
    std::fs::write(&log_path, &text).map_err(|e| StageError::io(&log_path, e))?;
    let isolation = running
        .isolation()
        .map_err(|m| ctx.error(format!("the scorer's sandbox: {m}")))?;
    match finished {
        Finished::TimedOut => Err(ctx.error(format!(
            "the scorer ran past its timeout of {} s and was killed with everything it started (params.timeout_s); its log: {}{}",
            params.timeout_s,
            log_path.display(),
            last_line(&log_path)
        ))),
        Finished::Exited(status) if status.code() == Some(sandbox::COULD_NOT_START) => Err(ctx.error(format!(
            "cannot start the scorer {program} (in its sandbox); its log: {}{}",
            log_path.display(),
            last_line(&log_path)
        ))),
        Finished::Exited(status) if !status.success() => Err(ctx.error(format!(
            "the scorer failed ({status}); its log: {}{}",
            log_path.display(),
            last_line(&log_path)
        ))),
        Finished::Exited(_) => Ok(isolation),
    }
}

/// On failure the scorer's directory and log are moved beside the scratch directory
/// (swept at the next run), and the error names them there.
fn keep_for_inspection(ctx: &StageContext, error: StageError, workspace: &Workspace) -> StageError {
    let _ = std::fs::remove_dir_all(&workspace.control);
    let kept = ctx.out_dir.with_file_name(format!(
        "{}.failed-scorer",
        ctx.out_dir
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let _ = std::fs::remove_dir_all(&kept);
    let scratch = &workspace.root;
    if std::fs::rename(scratch, &kept).is_err() {
        let _ = std::fs::remove_dir_all(scratch);
        return error;
    }
    defuse(&kept);
    let log = ctx.output(SCORER_LOG);
    let kept_log = kept.join(SCORER_LOG);
    let _ = std::fs::rename(&log, &kept_log);
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
        message
            .replace(&log.display().to_string(), &kept_log.display().to_string())
            .replace(&scratch.display().to_string(), &kept.display().to_string())
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
