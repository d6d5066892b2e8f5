//! A scorer cannot hurt the host (issue 26): each way a hostile scorer tried, run through
//! the real binary, ends in a one-line error or a cap, with the store unchanged, and no
//! process of the scorer's left behind.

use crate::common;

use common::{processes_with, Project};

/// A scorer that writes a valid uniform pass-1 after misbehaving as `mode` says. Its
/// second argument is a path of the host's it may try to reach; its command line
/// carries a marker (`--marker M`) so that the test can find what it left running.
const HOSTILE: &str = r#"
import json, os, socket, sys, time
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
mode, target = sys.argv[1], sys.argv[2]
request = json.load(sys.stdin)
out, vocab = request["output_dir"], request["vocab_size"]

def write_outputs(directory):
    position = np.arange(request["score_first"], request["score_last"] + 1)
    pq.write_table(pa.table({
        "position": pa.array(position, pa.int64()),
        "model_p": pa.array(np.full(len(position), 1.0 / vocab), pa.float32()),
        "entropy": pa.array(np.full(len(position), np.log(vocab)), pa.float32()),
    }), os.path.join(directory, "pass1.parquet"))
    at = np.array(request["distributions"], dtype=np.int64)
    pq.write_table(pa.table({
        "position": pa.array(np.repeat(at, vocab), pa.int64()),
        "candidate": pa.array(np.tile(np.arange(vocab), len(at)), pa.uint16()),
        "model_p": pa.array(np.full(len(at) * vocab, 1.0 / vocab), pa.float32()),
    }), os.path.join(directory, "distributions.parquet"))

def linger(seconds, then=None):
    # A grandchild that leaves the process group and outlives its parent.
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c",
                f"import time, sys\ntime.sleep({seconds})\n" + (then or ""), "--marker", sys.argv[4]])
        os._exit(0)

def attempt(action):
    try:
        action()
        print("attempt succeeded", file=sys.stderr)
    except OSError as e:
        print(f"attempt refused: {e}", file=sys.stderr)

if mode == "fifo":
    attempt(lambda: os.mkfifo(os.path.join(out, "pass1.parquet")))
    sys.exit(0)
if mode == "stdin":
    linger(30)
    write_outputs(out)
    sys.exit(0)
if mode == "outlive":
    linger(1, f"open({os.path.join(out, 'pass1.parquet')!r}, 'ab').write(b'late garbage')")
    write_outputs(out)
    sys.exit(0)
if mode == "absolute":
    attempt(lambda: open(target, "w").write("pwned"))
    write_outputs(out)
    sys.exit(0)
if mode == "symlink":
    os.rename(out, "elsewhere")
    os.symlink(os.path.abspath("home"), out)
    write_outputs(out)
    sys.exit(0)
if mode == "store":
    attempt(lambda: open(target, "ab").write(b"tampered"))
    attempt(lambda: open(target, "rb").read(16))
    write_outputs(out)
    sys.exit(0)
if mode == "network":
    attempt(lambda: socket.create_connection(("127.0.0.1", int(target)), timeout=2).sendall(b"leak"))
    write_outputs(out)
    sys.exit(0)
if mode == "metadata":
    # State for the next run, kept in a readable file's metadata (Landlock alone does
    # not confine these calls).
    attempt(lambda: os.setxattr(target, "user.state", b"the stream"))
    attempt(lambda: os.utime(target, (1, 1)))
    attempt(lambda: os.chmod(target, 0o600))
    write_outputs(out)
    sys.exit(0)
if mode == "keyring":
    # State for the next run in the kernel's keyrings, which no namespace separates: a
    # key added to the user's keyring (-4) outlives the run.
    import ctypes, errno, platform
    calls = {"x86_64": 248, "aarch64": 217}
    libc = ctypes.CDLL(None, use_errno=True)
    def add_key():
        key = libc.syscall(calls[platform.machine()], b"user", target.encode(), b"the stream", 10, -4)
        if key < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        print(f"key {key}", file=sys.stderr)
    attempt(add_key)
    write_outputs(out)
    sys.exit(0)
if mode == "flood":
    chunk = b"x" * (1 << 20)
    for _ in range(2048):
        sys.stderr.buffer.write(chunk)
    sys.stderr.flush()
    print("the last line", file=sys.stderr)
    write_outputs(out)
    sys.exit(0)
raise SystemExit(f"unknown mode {mode}")
"#;

fn project_with_hostile_scorer(mode: &str, target: &str, marker: &str) -> Project {
    project_with_hostile_scorer_at(mode, |_| target.to_string(), marker)
}

/// As [`project_with_hostile_scorer`], with the target computed once the tokens are
/// built (a path into the store, say).
fn project_with_hostile_scorer_at(
    mode: &str,
    target: impl Fn(&Project) -> String,
    marker: &str,
) -> Project {
    let project = Project::small();
    std::os::unix::fs::symlink(
        common::repo_root().join(".venv"),
        project.path().join(".venv"),
    )
    .unwrap();
    std::fs::write(project.path().join("hostile.py"), HOSTILE).unwrap();
    let base = Project::small_pipeline(300);
    project.write_pipeline(&base);
    project.ok(&["run", "--quiet"]);
    let target = target(&project);
    project.write_pipeline(&format!(
        "{base}\n[nodes.scorer]\nstage = \"pass1\"\ninputs.tokens = \"tokens\"\nparams.model = \"command\"\nparams.command = [\".venv/bin/python\", \"hostile.py\", \"{mode}\", \"{target}\", \"--marker\", \"{marker}\"]\nparams.timeout_s = 60\nparams.read = [\"state\"]\nfiles.scorer = [\"hostile.py\"]\n"
    ));
    project
}

/// Everything in the store but the scratch area, which the next run sweeps.
fn store_outside_tmp(project: &Project) -> Vec<(String, String)> {
    project
        .store_snapshot()
        .into_iter()
        .filter(|(k, _)| !k.starts_with(".tmp"))
        .collect()
}

fn the_scorer_log(project: &Project) -> String {
    let dir = project.path().join("artifacts/pass1");
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let log = entry.path().join("scorer.log");
        if log.exists() {
            return std::fs::read_to_string(log).unwrap_or_default();
        }
    }
    panic!("no scorer.log under {}", dir.display())
}

fn confined() -> bool {
    sandbox::landlock_abi().is_some()
}

#[test]
fn an_output_that_is_a_fifo_is_refused_and_hangs_nothing() {
    let project = project_with_hostile_scorer("fifo", "-", "fifo-9d2");
    let before = store_outside_tmp(&project);
    let started = std::time::Instant::now();
    let line = project.fails(&["run", "--quiet"]);
    assert!(started.elapsed().as_secs() < 30, "the FIFO hung the run");
    assert!(
        line.contains("pass1.parquet")
            && (line.contains("missing: the scorer exited 0 but did not write it")
                || line.contains("not a regular file")),
        "{line}"
    );
    assert_eq!(before, store_outside_tmp(&project));
}

#[test]
fn a_grandchild_holding_stdin_neither_hangs_the_run_nor_survives_it() {
    let project = project_with_hostile_scorer("stdin", "-", "stdin-4be");
    let started = std::time::Instant::now();
    project.ok(&["run", "--quiet"]);
    assert!(
        started.elapsed().as_secs() < 25,
        "the run waited for the grandchild"
    );
    assert!(
        processes_with("stdin-4be").is_empty(),
        "the grandchild outlived the run"
    );
}

#[test]
fn a_grandchild_that_outlives_its_scorer_is_killed_before_it_writes() {
    let project = project_with_hostile_scorer("outlive", "-", "outlive-77a");
    project.ok(&["run", "--quiet"]);
    assert!(processes_with("outlive-77a").is_empty());
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // Every stored file still matches its manifest (verify exits 1 otherwise): nothing
    // was appended after the run.
    project.ok(&["verify"]);
    let rows = project.sql("SELECT count(*) FROM scorer.pass1");
    assert!(rows.lines().nth(1).unwrap().parse::<u64>().unwrap() > 0);
}

#[test]
fn writes_outside_the_output_directory_never_land() {
    let target = tempfile::tempdir().unwrap();
    let pwned = target.path().join("pwned");
    let project = project_with_hostile_scorer("absolute", &pwned.display().to_string(), "abs-31c");
    project.ok(&["run", "--quiet"]);
    if confined() {
        assert!(!pwned.exists(), "an absolute-path write got through");
        assert!(the_scorer_log(&project).contains("attempt refused"));
    }
}

#[test]
fn an_output_directory_replaced_by_a_link_is_refused() {
    let project = project_with_hostile_scorer("symlink", "-", "link-5e0");
    let before = store_outside_tmp(&project);
    let line = project.fails(&["run", "--quiet"]);
    assert!(
        line.contains("Permission denied")
            || line.contains("Read-only file system")
            || line.contains("not a directory any more"),
        "{line}"
    );
    assert_eq!(before, store_outside_tmp(&project));
}

#[test]
fn another_artifact_can_be_neither_read_nor_edited() {
    let project = project_with_hostile_scorer_at(
        "store",
        |project| {
            std::fs::read_dir(project.path().join("artifacts/tokenize"))
                .unwrap()
                .flatten()
                .map(|e| e.path().join("val.parquet"))
                .find(|p| p.exists())
                .unwrap()
                .display()
                .to_string()
        },
        "store-c18",
    );
    let before = store_outside_tmp(&project);
    project.ok(&["run", "--quiet"]);
    if confined() {
        let log = the_scorer_log(&project);
        assert_eq!(log.matches("attempt refused").count(), 2, "{log}");
    }
    let after = store_outside_tmp(&project);
    let tokenize = |s: &Vec<(String, String)>| {
        s.iter()
            .filter(|(k, _)| k.starts_with("tokenize/"))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(tokenize(&before), tokenize(&after));
    project.ok(&["verify"]);
}

/// `params.read` may not name the store, anything in it, or a directory holding it,
/// however it is spelled: through a link, `..`, or the project's own directory.
#[test]
fn a_read_path_into_the_store_is_refused_before_the_scorer_runs() {
    let project = project_with_hostile_scorer("network", "1", "read-store");
    std::os::unix::fs::symlink("artifacts", project.path().join("cache_link")).unwrap();
    let pipeline = std::fs::read_to_string(project.path().join("pipeline.toml")).unwrap();
    for read in [
        "artifacts/tokenize",
        "cache_link/tokenize",
        "artifacts",
        "state/../artifacts",
        ".",
    ] {
        std::fs::create_dir_all(project.path().join("state")).unwrap();
        project.write_pipeline(&pipeline.replace(
            "params.read = [\"state\"]",
            &format!("params.read = [\"{read}\"]"),
        ));
        let before = store_outside_tmp(&project);
        let err = project.fails(&["run", "--quiet"]);
        assert!(
            err.contains(&format!("params.read: {read} is")),
            "{read}: {err}"
        );
        assert!(
            err.contains("a scorer may not read the store"),
            "{read}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert_eq!(before, store_outside_tmp(&project), "{read}");
    }
}

#[test]
fn no_state_survives_in_the_kernels_keyrings() {
    let project = project_with_hostile_scorer("keyring", "cachemoney-test-keyring", "key-3f1");
    project.ok(&["run", "--quiet"]);
    if confined() {
        let log = the_scorer_log(&project);
        assert!(log.contains("attempt refused: [Errno 1]"), "{log}");
        let status = std::fs::read_dir(project.path().join("artifacts/pass1"))
            .unwrap()
            .flatten()
            .map(|e| e.path().join("sandbox.json"))
            .find(|p| p.exists())
            .unwrap();
        let isolation: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(status).unwrap()).unwrap();
        assert_eq!(isolation["no_keyrings"], true, "{isolation}");
    }
}

#[test]
fn a_scorer_reaches_no_network() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let project = project_with_hostile_scorer("network", &port.to_string(), "net-a90");
    project.ok(&["run", "--quiet"]);
    if confined() {
        assert!(
            listener.accept().is_err(),
            "the scorer connected to the host"
        );
        assert!(the_scorer_log(&project).contains("attempt refused"));
    }
}

#[test]
fn two_gigabytes_on_stderr_leave_a_capped_log() {
    let project = project_with_hostile_scorer("flood", "-", "flood-e41");
    project.ok(&["run", "--quiet"]);
    let log = the_scorer_log(&project);
    assert!(log.len() <= 1_100_000, "{} bytes", log.len());
    assert!(log.contains("bytes of the scorer's output dropped here"));
    assert!(log.trim_end().ends_with("the last line"), "the end is kept");
}

#[test]
fn no_state_survives_in_a_readable_files_metadata() {
    let project = project_with_hostile_scorer_at(
        "metadata",
        |p| {
            let dir = p.path().join("state");
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join("kept");
            std::fs::write(&file, "").unwrap();
            file.display().to_string()
        },
        "meta-7a1",
    );
    let file = project.path().join("state/kept");
    let before = std::fs::metadata(&file).unwrap();
    project.ok(&["run", "--quiet"]);
    let log = the_scorer_log(&project);
    let isolation: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::fs::read_dir(project.path().join("artifacts/pass1"))
                .unwrap()
                .flatten()
                .map(|e| e.path().join("sandbox.json"))
                .find(|p| p.exists())
                .unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    if isolation["read_only"] != true {
        eprintln!(
            "no read-only mounts here ({isolation}): the hole docs/legality.md names is open"
        );
        return;
    }
    assert_eq!(log.matches("attempt refused").count(), 3, "{log}");
    let after = std::fs::metadata(&file).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (before.mtime(), before.mode()),
        (after.mtime(), after.mode())
    );
}
