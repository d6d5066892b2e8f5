//! The process boundary between the runner and the libtorch worker.
//!
//! The stage hands its whole [`StageContext`] to `cachemoney-gpt` as one JSON [`Request`]
//! on the worker's stdin; the worker writes its outputs into the same scratch directory
//! the runner gave the stage and answers with one JSON [`Response`] on stdout. stderr is
//! inherited, so the worker's progress bars draw on the user's terminal. Nothing about
//! the artifact store crosses: the worker sees input directories and an output directory,
//! exactly what an in-process stage sees, and the runner hashes and commits as usual.
//! Ctrl-C reaches both processes (same process group); the scratch directory is swept
//! by the next run like any other interrupted stage's.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use stage_api::{InputArtifact, StageContext, StageError, StageReport};

use crate::numerics::{self, Numerics};

/// The worker binary's file name; it is looked for next to the running executable.
pub const WORKER: &str = "cachemoney-gpt";

/// Overrides where the worker is looked for (say, a CUDA build on a GPU machine). Only a
/// location: it never enters a recipe.
pub const WORKER_ENV: &str = "CACHEMONEY_GPT_WORKER";

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    Train,
    Pass1,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    pub task: Task,
    pub node: String,
    pub params: Value,
    /// Input name → (directory, content hash).
    pub inputs: BTreeMap<String, (PathBuf, String)>,
    pub files: BTreeMap<String, Vec<PathBuf>>,
    pub out_dir: PathBuf,
    #[serde(default)]
    pub work_dir: PathBuf,
    pub show_progress: bool,
    #[serde(default = "unlimited")]
    pub memory_limit: u64,
}

fn unlimited() -> u64 {
    u64::MAX
}

impl Request {
    pub fn from_context(task: Task, ctx: &StageContext) -> Request {
        Request {
            task,
            node: ctx.node.clone(),
            params: ctx.params.clone(),
            inputs: ctx
                .inputs
                .iter()
                .map(|(name, a)| (name.clone(), (a.dir.clone(), a.content_hash.clone())))
                .collect(),
            files: ctx.files.clone(),
            out_dir: ctx.out_dir.clone(),
            work_dir: ctx.work_dir.clone(),
            show_progress: ctx.show_progress,
            memory_limit: ctx.memory_limit,
        }
    }

    /// The context the worker runs the stage with: the one the runner built.
    pub fn context(&self) -> StageContext {
        StageContext {
            node: self.node.clone(),
            params: self.params.clone(),
            inputs: self
                .inputs
                .iter()
                .map(|(name, (dir, hash))| {
                    (
                        name.clone(),
                        InputArtifact {
                            dir: dir.clone(),
                            content_hash: hash.clone(),
                        },
                    )
                })
                .collect(),
            files: self.files.clone(),
            out_dir: self.out_dir.clone(),
            work_dir: self.work_dir.clone(),
            show_progress: self.show_progress,
            memory_limit: self.memory_limit,
        }
    }
}

/// A [`StageError`] on the wire: its kind and its parts, so that the runner prints the
/// same one line it would for an in-process stage.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum WireError {
    Input { path: PathBuf, message: String },
    Params { message: String },
    Param { node: String, message: String },
    Format { path: PathBuf, message: String },
}

impl From<StageError> for WireError {
    fn from(e: StageError) -> WireError {
        match e {
            StageError::Input { path, message } => WireError::Input { path, message },
            StageError::Io { path, source } => WireError::Input {
                path,
                message: source.to_string(),
            },
            StageError::InvalidParams(message) => WireError::Params { message },
            e @ StageError::InvalidParam { .. } => WireError::Params {
                message: e.to_string(),
            },
            StageError::Node { node, message } => WireError::Param { node, message },
            StageError::Format { path, message } => WireError::Format { path, message },
        }
    }
}

impl From<WireError> for StageError {
    fn from(e: WireError) -> StageError {
        match e {
            WireError::Input { path, message } => StageError::Input { path, message },
            WireError::Params { message } => StageError::InvalidParams(message),
            WireError::Param { node, message } => StageError::Node { node, message },
            WireError::Format { path, message } => StageError::Format { path, message },
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Response {
    Done {
        summary: serde_json::Map<String, Value>,
        phase_seconds: Vec<(String, f64)>,
        #[serde(default)]
        volatile_keys: Vec<String>,
    },
    Failed(WireError),
}

impl From<Result<StageReport, StageError>> for Response {
    fn from(result: Result<StageReport, StageError>) -> Response {
        match result {
            Ok(report) => Response::Done {
                summary: report.summary,
                phase_seconds: report.phase_seconds,
                volatile_keys: report.volatile_keys,
            },
            Err(e) => Response::Failed(e.into()),
        }
    }
}

/// Where the worker is: `$CACHEMONEY_GPT_WORKER`, else next to this executable.
pub fn worker_path() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(WORKER_ENV) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate this program: {e}"))?;
    Ok(exe.with_file_name(WORKER))
}

/// Runs `task` for `ctx` in the worker process, its environment set for `numerics`, and
/// returns its report.
pub fn run_in_worker(
    task: Task,
    ctx: &StageContext,
    numerics: Numerics,
) -> Result<StageReport, StageError> {
    let fail = |message: String| StageError::Node {
        node: ctx.node.clone(),
        message,
    };
    let worker = worker_path().map_err(fail)?;
    if !worker.is_file() {
        return Err(fail(format!(
            "the GPT stages run in the libtorch worker {}, which is missing: build it too (`cargo build --release --workspace`; ./dev run does, and installs libtorch), or point {WORKER_ENV} at a worker",
            worker.display()
        )));
    }
    let request = Request::from_context(task, ctx);
    let mut command = Command::new(&worker);
    command
        .envs(numerics::environment(numerics).iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    die_with_parent(&mut command);
    let mut child = command
        .spawn()
        .map_err(|e| fail(format!("cannot start {}: {e}", worker.display())))?;
    let body = serde_json::to_vec(&request).expect("requests serialise");
    // A worker that dies at start (libtorch missing) closes stdin early: its exit status
    // below says more than the broken pipe would.
    let _ = child.stdin.take().expect("piped").write_all(&body);
    let output = child
        .wait_with_output()
        .map_err(|e| fail(format!("waiting for {}: {e}", worker.display())))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    match stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str::<Response>(line).ok())
    {
        Some(Response::Done {
            summary,
            phase_seconds,
            volatile_keys,
        }) if output.status.success() => Ok(StageReport {
            summary,
            phase_seconds,
            volatile_keys,
        }),
        Some(Response::Failed(e)) => Err(e.into()),
        _ => Err(fail(format!(
            "the libtorch worker {} ended ({}) without a report{}",
            worker.display(),
            output.status,
            if exit_code_means_loader_failure(&output.status) {
                "; is libtorch installed (./dev setup)?"
            } else {
                ""
            }
        ))),
    }
}

/// Ctrl-C reaches the worker through the process group, but `kill -9` of `cachemoney`
/// alone would leave it training into a scratch directory the next run sweeps. On Linux
/// the kernel kills it when its parent dies.
#[cfg(target_os = "linux")]
pub fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe, which is all pre_exec requires.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
pub fn die_with_parent(_command: &mut Command) {}

/// The dynamic loader exits with 127 when a shared library (libtorch) is missing.
fn exit_code_means_loader_failure(status: &std::process::ExitStatus) -> bool {
    status.code() == Some(127)
}

/// The worker's side: reads a request from stdin.
pub fn read_request(mut input: impl std::io::Read) -> Result<Request, String> {
    let mut body = String::new();
    input
        .read_to_string(&mut body)
        .map_err(|e| format!("reading the request: {e}"))?;
    serde_json::from_str(&body).map_err(|e| format!("not a worker request: {e}"))
}

/// The worker's side: the one line the runner reads back.
pub fn write_response(response: &Response, mut out: impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{}",
        serde_json::to_string(response).expect("serialises")
    )
}
