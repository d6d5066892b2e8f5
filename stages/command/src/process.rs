//! One run of a user's program, confined: the discipline that `pass1`'s scorers and the
//! generic `command` stage share.
//!
//! The program runs in a fresh private directory (its [`Workspace`]) holding copies of
//! its own files and of its inputs, with an environment of its recipe's alone, reading
//! nothing else of the project or the store, writing only its output directory and a
//! private home, its whole process tree killed when it ends, times out, or when we die
//! (`cachemoney-sandbox`). What it printed is kept, capped, as a volatile file of the
//! artifact. A run that fails leaves its directory beside the scratch area for
//! inspection, swept at the next run.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sandbox::{Confinement, Finished, Isolation};
use stage_api::{StageContext, StageError};

use crate::log::{last_line, CappedLog};

/// The environment variable that names the request file.
pub const REQUEST_ENV: &str = "CACHEMONEY_REQUEST";

/// Every input file the program sees is dated this (2001-09-09): a date that differs
/// from run to run would tell a re-run from the original.
const INPUT_MTIME_SECONDS: u64 = 1_000_000_000;

/// The program's private directory: its working directory, with its files, its inputs
/// (`in/`), its output directory (`out/`) and a home (`home/`, also its TMPDIR), all
/// deleted after the run. Beside it, out of the program's reach, the control directory
/// where the sandbox launcher is told what to do and reports back.
pub struct Workspace {
    pub root: PathBuf,
    control: PathBuf,
}

impl Workspace {
    /// A fresh one in the store's scratch area, under a random name.
    pub fn create(ctx: &StageContext) -> Result<Workspace, StageError> {
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

    pub fn out(&self) -> PathBuf {
        self.root.join("out")
    }

    /// The request file (`$CACHEMONEY_REQUEST`, and the program's stdin).
    pub fn request(&self) -> PathBuf {
        self.root.join("request.json")
    }

    /// Where an input called `name` goes, relative to the workspace (as the request
    /// names it).
    pub fn input(name: &str) -> PathBuf {
        PathBuf::from("in").join(name)
    }

    pub fn remove(&self) {
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

/// Copies `from` to `to` (a directory: its files, recursively, but its manifest) and
/// dates it [`INPUT_MTIME_SECONDS`]. A copy, not a link: a link would lead back into the
/// store and its link count would differ between runs.
pub fn copy_input(from: &Path, to: &Path) -> Result<(), StageError> {
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

/// Dates `path` [`INPUT_MTIME_SECONDS`].
pub fn date(path: &Path) -> Result<(), StageError> {
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(INPUT_MTIME_SECONDS);
    let file = File::open(path).map_err(|e| StageError::io(path, e))?;
    file.set_times(
        std::fs::FileTimes::new()
            .set_accessed(when)
            .set_modified(when),
    )
    .map_err(|e| StageError::io(path, e))
}

/// Dates every directory under `root` (its files are dated when copied), deepest
/// first: when a directory was made must not tell one run from another.
pub fn date_directories(root: &Path) -> Result<(), StageError> {
    let entries = std::fs::read_dir(root).map_err(|e| StageError::io(root, e))?;
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            date_directories(&entry.path())?;
        }
    }
    date(root)
}

/// Copies the node's `files.ROLE` (the program's own files) into the workspace at their
/// paths relative to the pipeline's directory, where its command line expects them, and
/// returns those paths.
pub fn copy_own_files(
    ctx: &StageContext,
    role: &str,
    root: &Path,
) -> Result<Vec<PathBuf>, StageError> {
    let mut copied = Vec::new();
    for file in ctx.files(role) {
        let relative = relative_to(file, &ctx.work_dir).ok_or_else(|| {
            StageError::input(
                file,
                format!("files.{role} must lie inside the pipeline's directory: the program gets a copy at the same relative path"),
            )
        })?;
        let to = root.join(&relative);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).map_err(|e| StageError::io(parent, e))?;
        }
        std::fs::copy(file, &to).map_err(|e| StageError::io(&to, e))?;
        date(&to)?;
        copied.push(relative);
    }
    Ok(copied)
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

/// The environment every program gets before its recipe's own: nothing of ours but what
/// makes a program run, and where its request is. `HOME` and `TMPDIR` are relative to
/// the workspace (made absolute by [`run`]), so the program sees the same environment in
/// every run.
pub fn base_environment() -> Vec<(String, String)> {
    [
        ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ("HOME", "home"),
        ("TMPDIR", "home/tmp"),
        ("LANG", "C.UTF-8"),
        ("PYTHONDONTWRITEBYTECODE", "1"),
        (REQUEST_ENV, "request.json"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Sets `name` to `value` in `env`, replacing what was there.
pub fn set_env(env: &mut Vec<(String, String)>, name: &str, value: &str) {
    env.retain(|(k, _)| k != name);
    env.push((name.to_string(), value.to_string()));
}

/// How to run a program: what the node's recipe says.
pub struct Program<'a> {
    /// What to call it in messages: "scorer", "command".
    pub what: &'a str,
    /// The program and its arguments.
    pub command: &'a [String],
    /// The role of the node's own files (`files.program`, `files.scorer`).
    pub files: &'a str,
    /// Its whole environment (see [`base_environment`]).
    pub env: Vec<(String, String)>,
    /// `params.read`: more paths (relative to the pipeline's directory) it may read.
    pub read: &'a [String],
    pub timeout_s: u64,
    /// A network of its own with a loopback that is up (for programs that talk to
    /// themselves, as `torchrun`'s processes do); otherwise none.
    pub loopback: bool,
    /// The artifact's file its log is kept in.
    pub log: &'a str,
}

/// The program to run: a path with a separator is the pipeline directory's, a bare
/// name is looked up in `PATH`, as a shell would.
fn resolve_program(ctx: &StageContext, program: &str, what: &str) -> Result<PathBuf, StageError> {
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
            "cannot start the {what} {program} (in {}): no such program",
            ctx.work_dir.display()
        ))),
    }
}

/// What the program needs to read to run: the installation it belongs to, for each
/// link on the way to the real file (`.venv/bin/python` → the virtualenv and the
/// Python it points at). An installation is the directory above a `bin`, else the
/// program's own directory; one that holds the store is refused in favour of the
/// program's directory alone, and that one too in favour of the file alone, so that no
/// rule ever reaches the store. `store` is resolved (absolute, no links), and so is
/// every candidate before it is compared: a relative store is held by no absolute
/// directory as written, and `/bin` may be a link to `/usr/bin` (the fourth red team
/// had `/` granted through `/bin/sh` that way).
fn program_prefixes(program: &Path, store: &Path) -> Vec<PathBuf> {
    let holds_store = |dir: &Path| {
        let real = std::fs::canonicalize(dir).unwrap_or(dir.to_path_buf());
        store.starts_with(&real)
    };
    let mut prefixes = Vec::new();
    let mut hop = program.to_path_buf();
    for _ in 0..16 {
        if let Some(dir) = hop.parent() {
            let installation = match dir.file_name() {
                Some(name) if name == "bin" => dir.parent().unwrap_or(dir),
                _ => dir,
            };
            let candidates = [installation, dir];
            match candidates.iter().find(|c| !holds_store(c)) {
                Some(safe) => prefixes.push(safe.to_path_buf()),
                None => prefixes.push(hop.clone()),
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

/// The program to run, as the sandbox is to start it. One that lies in the pipeline's
/// directory (a script, a binary built there) must be among the node's own files
/// (`files.ROLE`): they are hashed into the recipe, so editing it reruns the node, and
/// it runs as its private copy. A program reached through a link inside the directory
/// to an installation elsewhere (`.venv/bin/python`) is not the directory's, and one in
/// a virtual environment there (`pyvenv.cfg`) is an installation, not a step's code.
fn program_to_run(
    ctx: &StageContext,
    program: &Program,
    workspace: &Workspace,
    found: PathBuf,
) -> Result<PathBuf, StageError> {
    let real = std::fs::canonicalize(&found).unwrap_or(found.clone());
    let work = std::fs::canonicalize(&ctx.work_dir).unwrap_or(ctx.work_dir.clone());
    let Ok(inside) = real.strip_prefix(&work) else {
        return Ok(found);
    };
    let in_installation = real
        .ancestors()
        .take_while(|dir| dir.starts_with(&work) && *dir != work)
        .any(|dir| dir.join("pyvenv.cfg").is_file());
    if in_installation {
        return Ok(found);
    }
    let own = ctx
        .files(program.files)
        .iter()
        .any(|file| std::fs::canonicalize(file).is_ok_and(|file| file == real));
    if !own {
        return Err(ctx.error(format!(
            "the {} {} lies in the pipeline's directory but is not among the node's files.{}: list it there, so that editing it reruns the node (it then runs as its private copy)",
            program.what,
            program.command[0],
            program.files
        )));
    }
    let copy = workspace.root.join(inside);
    std::path::absolute(&copy).map_err(|e| StageError::io(&copy, e))
}

/// What the program may read and write, and its environment: the workspace, the
/// program's own prefixes and `params.read`, never the artifact store.
fn confinement(
    ctx: &StageContext,
    program: &Program,
    workspace: &Workspace,
    program_path: PathBuf,
    args: &[String],
) -> Result<Confinement, StageError> {
    let what = program.what;
    let store = ctx
        .out_dir
        .parent()
        .and_then(Path::parent)
        .unwrap_or(&ctx.out_dir);
    // Never the store, nor a directory holding it (the project's own, say), however
    // named: through a link, `..`, or the store's root (the red team's, after stop 33).
    let store_real = std::fs::canonicalize(store).unwrap_or(store.to_path_buf());
    let mut read = vec![workspace.root.clone()];
    read.extend(program_prefixes(&program_path, &store_real));
    for extra in program.read {
        let path = ctx.work_dir.join(extra);
        let real = std::fs::canonicalize(&path).unwrap_or(path.clone());
        if real.starts_with(&store_real) || store_real.starts_with(&real) {
            return Err(ctx.error(format!(
                "params.read: {extra} is {} the artifact store ({}): a {what} may not read the store",
                if real.starts_with(&store_real) { "inside" } else { "a directory holding" },
                store_real.display()
            )));
        }
        read.push(path);
    }
    let env = program
        .env
        .iter()
        .map(|(k, v)| match k.as_str() {
            "HOME" | "TMPDIR" => {
                // Absolute: the program runs in the workspace, and a pipeline named by a
                // relative path (`-p backtest.toml`) gives a relative workspace.
                let path = workspace.root.join(v);
                let path = std::path::absolute(&path).unwrap_or(path);
                (k.clone(), path.display().to_string())
            }
            _ => (k.clone(), v.clone()),
        })
        .collect();
    Ok(Confinement {
        program: program_path,
        args: args.iter().map(Into::into).collect(),
        cwd: workspace.root.clone(),
        env,
        read,
        write: vec![workspace.out(), workspace.root.join("home")],
        loopback: program.loopback,
    })
}

/// Runs `program` confined in `workspace` with the file `request` (in the workspace) on
/// its standard input, keeps its log in the artifact, and returns what its sandbox
/// achieved, or a one-line error. The request is a file, not a pipe we write: a program
/// that exits without reading it must not leave us writing into a closed pipe.
pub fn run(
    ctx: &StageContext,
    program: &Program,
    workspace: &Workspace,
    request: &Path,
) -> Result<Isolation, StageError> {
    let what = program.what;
    let (name, args) = program.command.split_first().expect("validated: not empty");
    let program_path = program_to_run(ctx, program, workspace, resolve_program(ctx, name, what)?)?;
    let confinement = confinement(ctx, program, workspace, program_path, args)?;
    let stdin = File::open(request).map_err(|e| StageError::io(request, e))?;
    let mut running = sandbox::spawn(
        &confinement,
        &workspace.control,
        Stdio::from(stdin),
        Stdio::piped(),
        Stdio::piped(),
    )
    .map_err(|e| ctx.error(format!("cannot start the {what} {name}: {e}")))?;
    let log = Arc::new(Mutex::new(CappedLog::new(what)));
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
    let deadline = Instant::now() + Duration::from_secs(program.timeout_s);
    let finished = running
        .wait(deadline)
        .map_err(|e| ctx.error(format!("waiting for the {what}: {e}")))?;
    for reader in readers {
        let _ = reader.join();
    }
    let log_path = ctx.output(program.log);
    let text = log.lock().expect("not poisoned").finish();
    std::fs::write(&log_path, &text).map_err(|e| StageError::io(&log_path, e))?;
    let isolation = running
        .isolation()
        .map_err(|m| ctx.error(format!("the {what}'s sandbox: {m}")))?;
    match finished {
        Finished::TimedOut => Err(ctx.error(format!(
            "the {what} ran past its timeout of {} s and was killed with everything it started (params.timeout_s); its log: {}{}",
            program.timeout_s,
            log_path.display(),
            last_line(&log_path)
        ))),
        Finished::Exited(status) if status.code() == Some(sandbox::COULD_NOT_START) => Err(ctx.error(format!(
            "cannot start the {what} {name} (in its sandbox); its log: {}{}",
            log_path.display(),
            last_line(&log_path)
        ))),
        Finished::Exited(status) if !status.success() => Err(ctx.error(format!(
            "the {what} failed ({status}); its log: {}{}",
            log_path.display(),
            last_line(&log_path)
        ))),
        Finished::Exited(_) => Ok(isolation),
    }
}

/// On failure the program's directory and log are moved beside the scratch directory
/// (`…failed-WHAT`, swept at the next run), and the error names them there.
pub fn keep_for_inspection(
    ctx: &StageContext,
    error: StageError,
    workspace: &Workspace,
    program: &Program,
) -> StageError {
    let _ = std::fs::remove_dir_all(&workspace.control);
    let kept = ctx.out_dir.with_file_name(format!(
        "{}.failed-{}",
        ctx.out_dir
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        program.what
    ));
    let _ = std::fs::remove_dir_all(&kept);
    let scratch = &workspace.root;
    if std::fs::rename(scratch, &kept).is_err() {
        let _ = std::fs::remove_dir_all(scratch);
        return error;
    }
    defuse(&kept);
    let log = ctx.output(program.log);
    let kept_log = kept.join(program.log);
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
        StageError::Node { node, message } => StageError::Node {
            node,
            message: text(message),
        },
        StageError::Format { path, message } => StageError::Format {
            path: moved(&path),
            message: text(message),
        },
        StageError::Io { path, source } => StageError::Io {
            path: moved(&path),
            source,
        },
        other => other,
    }
}

/// Removes everything under `dir` that is not a plain file or directory (a FIFO, a
/// link, a device node), so that whoever inspects a failed run's directory cannot hang
/// on a pipe or follow a link out of it.
pub fn defuse(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => defuse(&path),
            Ok(meta) if meta.is_file() => {}
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// An output that must be a plain file inside the output directory: not a link out of
/// it, not a pipe or a device (reading a FIFO would hang).
pub fn check_plain_file(path: &Path, what: &str) -> Result<bool, StageError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => Err(StageError::input(
            path,
            format!("a symbolic link: the {what} must write its outputs inside its output directory"),
        )),
        Ok(meta) if meta.is_dir() => Err(StageError::input(
            path,
            format!("a directory: the {what} must write its outputs as files"),
        )),
        Ok(meta) if !meta.is_file() => Err(StageError::input(
            path,
            format!("not a regular file (a pipe or a device?): the {what} must write its outputs as files"),
        )),
        Ok(_) => Ok(true),
        Err(_) => Ok(false),
    }
}

/// Nothing but the log may have appeared in the artifact's own directory, and the output
/// directory must still be a directory (not replaced by a link).
pub fn check_out_dir(
    ctx: &StageContext,
    workspace: &Workspace,
    program: &Program,
) -> Result<(), StageError> {
    let entries = std::fs::read_dir(&ctx.out_dir).map_err(|e| StageError::io(&ctx.out_dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != program.log {
            return Err(StageError::input(
                entry.path(),
                format!(
                    "written by the {} outside its output directory (request.output_dir)",
                    program.what
                ),
            ));
        }
    }
    let out = workspace.out();
    match std::fs::symlink_metadata(&out) {
        Ok(meta) if meta.is_dir() => Ok(()),
        _ => Err(StageError::input(
            &out,
            format!(
                "not a directory any more: the {} replaced its output directory (by a link?)",
                program.what
            ),
        )),
    }
}
