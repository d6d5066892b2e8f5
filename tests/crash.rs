//! Crash safety and concurrency: kill -9 at several points of a multi-second tokenize run,
//! then rerun; two runs at once.

use crate::common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{write_jsonl, Project};

/// A corpus big enough that tokenize takes seconds: the sample books, three times over,
/// as 60 documents.
fn slow_project() -> Project {
    let p = Project::empty();
    std::fs::create_dir_all(p.path().join("corpus")).unwrap();
    let mut docs = common::small_documents(60, 200_000);
    docs.retain(|d| !d.is_empty());
    write_jsonl(&p.path().join("corpus/docs.jsonl"), &docs);
    p.write_pipeline(
        "[nodes.tokens]\nstage = \"tokenize\"\nfiles.corpus = \"corpus/docs.jsonl\"\nparams.vocab_size = 1024\n",
    );
    p
}

fn spawn(p: &Project, args: &[&str]) -> Child {
    Command::new(assert_cmd::cargo::cargo_bin("cachemoney"))
        .args(args)
        .current_dir(p.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn content_hash(p: &Project) -> String {
    let json: serde_json::Value = serde_json::from_str(&p.ok(&["status", "--json"])).unwrap();
    assert_eq!(json[0]["state"], "cached", "{json}");
    json[0]["content_hash"].as_str().unwrap().to_string()
}

/// Only finished artifacts are visible: every directory under artifacts/tokenize has a
/// manifest, and every file a manifest lists is there.
fn assert_no_partial_artifact(p: &Project) {
    let stage_dir = p.path().join("artifacts/tokenize");
    let Ok(entries) = std::fs::read_dir(&stage_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let manifest = entry.path().join("manifest.json");
        assert!(
            manifest.exists(),
            "partial artifact visible: {}",
            entry.path().display()
        );
    }
}

#[test]
fn killed_runs_leave_nothing_partial_and_a_rerun_gives_the_same_bytes() {
    let reference = slow_project();
    let started = Instant::now();
    reference.ok(&["run"]);
    let full_run = started.elapsed();
    let expected = content_hash(&reference);
    assert!(
        full_run > Duration::from_millis(1500),
        "corpus too small to kill mid-run: {full_run:?}"
    );

    let p = slow_project();
    std::fs::copy(
        reference.path().join("corpus/docs.jsonl"),
        p.path().join("corpus/docs.jsonl"),
    )
    .unwrap();
    // Kill at several points: hashing/reading, BPE training, encoding, writing.
    for fraction in [0.05, 0.3, 0.6, 0.85] {
        let mut child = spawn(&p, &["run", "-q"]);
        std::thread::sleep(full_run.mul_f64(fraction));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert_no_partial_artifact(&p);
        let status = p.ok(&["status"]);
        assert!(
            status.contains("missing") || status.contains("cached"),
            "{status}"
        );
    }
    let out = p.ok(&["run"]);
    assert!(out.contains("tokens"), "{out}");
    assert_eq!(content_hash(&p), expected);
    assert!(p.ok(&["verify"]).contains("ok: 1 artifact(s)"));
    // The interrupted runs' scratch directories were swept.
    assert_eq!(
        std::fs::read_dir(p.path().join("artifacts/.tmp"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn a_second_concurrent_run_fails_clearly_and_the_first_completes() {
    let p = slow_project();
    let mut first = spawn(&p, &["run", "-q"]);
    // Wait until the first run holds the lock.
    let lock = p.path().join("artifacts/.lock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&lock).is_ok_and(|s| s.starts_with("pid")) {
        assert!(Instant::now() < deadline, "first run never took the lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    let line = p.fails(&["run"]);
    assert!(
        line.contains("artifacts/.lock") && line.contains("locked by another cachemoney run"),
        "{line}"
    );
    assert!(line.contains(&format!("pid {}", first.id())), "{line}");
    // Read-only commands still work while a run holds the lock.
    p.ok(&["status"]);
    // --wait waits for the first run, then finds everything cached.
    let waited = p.ok(&["run", "--wait"]);
    assert!(first.wait().unwrap().success());
    assert!(waited.contains("1 reused"), "{waited}");
    assert!(p.ok(&["verify"]).contains("ok: 1 artifact(s)"));
}

#[test]
fn a_lock_left_by_a_killed_run_does_not_block_the_next() {
    let p = slow_project();
    let mut child = spawn(&p, &["run", "-q"]);
    let lock = p.path().join("artifacts/.lock");
    while !std::fs::read_to_string(&lock).is_ok_and(|s| s.starts_with("pid")) {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        lock.exists(),
        "the lock file stays behind, as after a real crash"
    );
    p.ok(&["run", "-q"]);
    content_hash(&p);
}

/// Processes whose parent is `pid` (from /proc).
fn children_of(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after the ')'.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        if after.split(' ').nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            found.push(child);
        }
    }
    found
}

/// `kill -9` of `cachemoney` while its libtorch worker trains: the worker dies with it
/// (it would otherwise go on training into a swept directory), nothing partial is
/// visible, and the rerun builds the model.
#[test]
fn killing_a_run_kills_its_training_worker_too() {
    let p = Project::small();
    let pipeline = Project::small_pipeline(300)
        + r#"
[nodes.model]
stage = "train"
inputs.tokens = "tokens"
params.model = { vocab_size = 300, layers = 2, d_model = 32, heads = 2, kv_heads = 1, seq_len = 32, rope_dims = 8, xsa_last = 1, bigram_rows = 64, bigram_dim = 16 }
params.batch = 4
params.steps = 100000
params.val_every = 0
params.val_tokens = 2000
"#;
    p.write_pipeline(&pipeline);
    let mut run = spawn(&p, &["run", "--quiet"]);
    let started = Instant::now();
    let worker = loop {
        if let Some(&w) = children_of(run.id()).first() {
            break w;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no worker started"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // Let it get into training.
    std::thread::sleep(Duration::from_secs(2));
    run.kill().unwrap();
    run.wait().unwrap();
    let killed = Instant::now();
    while std::path::Path::new(&format!("/proc/{worker}")).exists()
        && std::fs::read_to_string(format!("/proc/{worker}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "worker {worker} outlived its parent"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !p.path().join("artifacts/train").exists() || {
            std::fs::read_dir(p.path().join("artifacts/train"))
                .unwrap()
                .flatten()
                .all(|e| e.path().join("manifest.json").exists())
        }
    );
    // A short run of the same node now succeeds and sweeps the scratch directory.
    p.write_pipeline(&pipeline.replace("params.steps = 100000", "params.steps = 3"));
    let out = p.ok(&["run"]);
    assert!(out.contains("model          train        built"), "{out}");
}
