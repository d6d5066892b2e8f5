//! Scorers run as processes (`pass1 model = "command"`) and the legality probes on them:
//! the example scorers under examples/scorers, run by the project's Python, and scorers
//! that misbehave in every way the protocol names.

use crate::common;

use common::{neural_pipeline, tiny_model, Project};
use serde_json::Value;

/// A project with the repository's example scorers and Python (`./dev` makes .venv).
fn with_scorers(project: &Project) {
    let root = common::repo_root();
    for shared in ["examples", ".venv"] {
        std::os::unix::fs::symlink(root.join(shared), project.path().join(shared)).unwrap();
    }
}

fn scorer_node(name: &str, script: &str, args: &str, model: bool) -> String {
    format!(
        r#"
[nodes.{name}]
stage = "pass1"
inputs.tokens = "tokens"
{model}params.model = "command"
params.command = [".venv/bin/python", "{script}"{args}]
files.scorer = ["{script}"]
"#,
        model = if model {
            "inputs.model = \"model\"\n"
        } else {
            ""
        }
    )
}

fn legality_node(chain: &str) -> String {
    format!(
        r#"
[nodes.legality_{chain}]
stage = "legality"
inputs.tokens = "tokens"
inputs.chain = "{chain}"
"#
    )
}

fn content_hashes(project: &Project) -> std::collections::BTreeMap<String, String> {
    let json: Value = serde_json::from_str(&project.ok(&["status", "--json"])).unwrap();
    json.as_array()
        .unwrap()
        .iter()
        .filter_map(|n| {
            Some((
                n["node"].as_str()?.to_string(),
                n["content_hash"].as_str()?.to_string(),
            ))
        })
        .collect()
}

/// The verdicts of `legality --json` as (chain, probe) → (verdict, row).
fn verdicts(project: &Project, args: &[&str]) -> (bool, Vec<Value>) {
    let mut full = vec!["legality", "--json"];
    full.extend_from_slice(args);
    let out = project.run(&full);
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "legality --json: {e}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), rows)
}

fn verdict(rows: &[Value], chain: &str, probe: &str) -> String {
    rows.iter()
        .find(|r| r["chain"] == chain && r["probe"] == probe)
        .map(|r| r["verdict"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("no {chain}/{probe} in {rows:?}"))
}

/// The PyTorch GPT (written from the spec, independently of our tch model) gives our
/// pass-1 bit for bit; the numpy bigram agrees with the built-in one; both pass every
/// probe, as does the GPT itself, while the leaky two-pass cache fails C1 with evidence.
#[test]
fn example_scorers_agree_with_our_models_and_the_probes_sort_them() {
    let project = Project::small();
    with_scorers(&project);
    let text = neural_pipeline(&tiny_model(300), 30)
        + &scorer_node(
            "pass1_torch",
            "examples/scorers/gpt_torch.py",
            r#", "--stride", "8", "--batch", "16""#,
            true,
        )
        + "\n[nodes.pass1_bigram]\nstage = \"pass1\"\ninputs.tokens = \"tokens\"\n"
        + &scorer_node(
            "pass1_numpy",
            "examples/scorers/bigram_numpy.py",
            r#", "0.85", "0.1""#,
            false,
        )
        + &scorer_node("pass1_leaky", "examples/scorers/leaky_cache.py", "", false)
        + &[
            "pass1",
            "pass1_torch",
            "pass1_bigram",
            "pass1_numpy",
            "pass1_leaky",
        ]
        .map(legality_node)
        .concat();
    project.write_pipeline(&text);
    project.ok(&["run", "--quiet"]);

    let hashes = content_hashes(&project);
    assert_eq!(
        hashes["pass1_torch"], hashes["pass1"],
        "the PyTorch scorer's pass-1 (model_p, entropy, distributions) is our tch pass-1's, bit for bit"
    );
    // The numpy bigram: the same model in f64 numpy, within f32 rounding of ours.
    let diff: f64 = project
        .sql("SELECT max(abs(CAST(a.model_p AS DOUBLE) - CAST(b.model_p AS DOUBLE))) AS d FROM pass1_bigram.pass1 a JOIN pass1_numpy.pass1 b ON a.position = b.position")
        .lines()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(diff <= 1e-7, "numpy bigram differs from ours by {diff}");

    let (all_pass, rows) = verdicts(&project, &[]);
    assert!(
        !all_pass,
        "the leaky scorer fails, so legality exits non-zero"
    );
    for chain in ["pass1", "pass1_torch", "pass1_bigram", "pass1_numpy"] {
        for probe in [
            "c1-prefix",
            "c1-target",
            "c2-normalised",
            "c2-blind",
            "coverage",
            "bytes",
            "sandbox",
        ] {
            assert_eq!(verdict(&rows, chain, probe), "pass", "{chain} {probe}");
        }
    }
    assert_eq!(verdict(&rows, "pass1_leaky", "c1-prefix"), "fail");
    assert_eq!(verdict(&rows, "pass1_leaky", "c1-target"), "fail");
    assert_eq!(verdict(&rows, "pass1_leaky", "c2-normalised"), "pass");
    assert_eq!(verdict(&rows, "pass1_leaky", "c2-blind"), "fail");
    let evidence = rows
        .iter()
        .find(|r| r["chain"] == "pass1_leaky" && r["probe"] == "c1-prefix")
        .unwrap();
    assert!(
        evidence["position"].as_i64().is_some()
            && evidence["expected"] != evidence["observed"]
            && evidence["detail"]
                .as_str()
                .unwrap()
                .contains("depends on later tokens"),
        "{evidence}"
    );
    // Asked about the honest ones only, legality exits 0.
    let (honest, _) = verdicts(&project, &["pass1_torch", "legality_pass1_numpy"]);
    assert!(honest);
    // The scorer's log is kept, out of the content hash.
    let log = project.ok(&["show", "pass1_torch"]);
    assert!(log.contains("scorer.log"), "{log}");
}

/// Protocol version 3: a node with `inputs.hints` hands the scorer the n-gram tilt's
/// hints, and the PyTorch GPT answers each entry's p(hint) as our tch GPT does, bit for
/// bit; a scorer that speaks only version 2 is a one-line error there, and runs as before
/// everywhere else; a scorer whose p(hint) is not its own distribution's is refused.
#[test]
fn a_scorer_gives_the_hints_probability_through_protocol_3() {
    let project = Project::small();
    with_scorers(&project);
    let hints = "\n[nodes.hints]\nstage = \"hints\"\ninputs.tokens = \"tokens\"\nparams.kernel = \"cachemoney\"\n";
    let hinted = |node: String| {
        node.replace(
            "inputs.tokens = \"tokens\"\n",
            "inputs.tokens = \"tokens\"\ninputs.hints = \"hints\"\n",
        )
    };
    let text = neural_pipeline(&tiny_model(300), 30)
        + hints
        + "\n[nodes.pass1_hinted]\nstage = \"pass1\"\ninputs.tokens = \"tokens\"\ninputs.hints = \"hints\"\ninputs.model = \"model\"\nparams.model = \"gpt\"\nparams.stride = 8\nparams.batch = 16\n"
        + &hinted(scorer_node(
            "pass1_torch",
            "examples/scorers/gpt_torch.py",
            r#", "--stride", "8", "--batch", "16""#,
            true,
        ))
        + "\n[nodes.tilt]\nstage = \"tilt\"\ninputs.tokens = \"tokens\"\ninputs.pass1 = \"pass1_torch\"\ninputs.hints = \"hints\"\n"
        + &legality_node("tilt");
    project.write_pipeline(&text);
    project.ok(&["run", "--quiet"]);
    // Every entry's p(target), entropy, hint and p(hint) (the judged scorer keeps its
    // distributions at the judge's secret positions, so its artifact differs there).
    let differing = project.sql(
        "SELECT count(*) AS n, sum(CASE WHEN a.model_p <> b.model_p OR a.entropy <> b.entropy \
         OR c.hint <> d.hint OR c.hint_p <> d.hint_p THEN 1 ELSE 0 END) AS differ \
         FROM pass1_torch.pass1 a JOIN pass1_hinted.pass1 b ON a.position = b.position \
         JOIN pass1_torch.hint_p c ON c.position = a.position JOIN pass1_hinted.hint_p d ON d.position = a.position",
    );
    let row: Vec<u64> = differing
        .lines()
        .nth(1)
        .unwrap()
        .split(',')
        .map(|v| v.trim().parse().unwrap())
        .collect();
    let entries = project.sql("SELECT count(*) AS n FROM pass1_hinted.pass1");
    let entries: u64 = entries.lines().nth(1).unwrap().trim().parse().unwrap();
    assert_eq!(row, [entries, 0], "{differing}");
    let fired = project.sql("SELECT count(*) AS n FROM tilt.pass1 WHERE fired");
    let fired: u64 = fired.lines().nth(1).unwrap().trim().parse().unwrap();
    assert!(fired > 100, "{fired} fired");
    let (legal, rows) = verdicts(&project, &["tilt"]);
    assert!(legal, "{rows:?}");

    // A version-2 scorer (it ignores the hints) is told what it missed.
    project.write_pipeline(
        &(Project::small_pipeline(300)
            + hints
            + &hinted(scorer_node(
                "pass1_numpy",
                "examples/scorers/bigram_numpy.py",
                r#", "0.85", "0.1""#,
                false,
            ))),
    );
    let before = project.store_snapshot();
    let line = project.fails(&["run", "--quiet"]);
    assert!(
        line.contains("hint_p.parquet")
            && line.contains("the request carried hints (cachemoney-scorer/3)"),
        "{line}"
    );
    assert_eq!(
        before.keys().filter(|k| k.starts_with("pass1/")).count(),
        project
            .store_snapshot()
            .keys()
            .filter(|k| k.starts_with("pass1/"))
            .count()
    );

    // A scorer that understates p(hint) where it also wrote the whole distribution.
    std::fs::write(project.path().join("bad.py"), BAD_SCORER).unwrap();
    let bad = r#"
[nodes.bad]
stage = "pass1"
inputs.tokens = "tokens"
inputs.hints = "hints"
params.model = "command"
params.command = [".venv/bin/python", "bad.py", "hint_p"]
files.scorer = ["bad.py"]
"#;
    project.write_pipeline(&(Project::small_pipeline(300) + hints + bad));
    let line = project.fails(&["run", "--quiet"]);
    assert!(
        line.contains("hint_p.parquet")
            && line.contains("but the distribution it wrote there gives the hint"),
        "{line}"
    );
}

/// A scorer for the bad-input cases: the numpy bigram, then broken as `mode` says.
const BAD_SCORER: &str = r#"
import json, os, sys, time
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
mode = sys.argv[1]
request = json.load(sys.stdin)
out, vocab = request["output_dir"], request["vocab_size"]
if mode == "crash":
    print("loading weights", file=sys.stderr)
    print("RuntimeError: the scorer broke here", file=sys.stderr)
    sys.exit(3)
if mode == "hang":
    time.sleep(60)
if mode == "nothing":
    sys.exit(0)
position = np.arange(request["score_first"], request["score_last"] + 1)
p = np.full(len(position), 1.0 / vocab)
if mode == "nan":
    p[5] = np.nan
if mode == "zero":
    p[7] = 0.0
if mode == "rows":
    position, p = position[:-10], p[:-10]
kind = pa.float64() if mode == "schema" else pa.float32()
target = os.path.join(out, "..", "..", "pass1.parquet") if mode == "outside" else os.path.join(out, "pass1.parquet")
pq.write_table(pa.table({
    "position": pa.array(position, pa.int64()),
    "model_p": pa.array(p, kind),
    "entropy": pa.array(np.full(len(position), np.log(vocab)), pa.float32()),
}), target)
at = np.array(request["distributions"], dtype=np.int64)
v = vocab - 1 if mode == "vocab" else vocab
pq.write_table(pa.table({
    "position": pa.array(np.repeat(at, v), pa.int64()),
    "candidate": pa.array(np.tile(np.arange(v), len(at)), pa.uint16()),
    "model_p": pa.array(np.full(len(at) * v, 1.0 / vocab), pa.float32()),
}), os.path.join(out, "distributions.parquet"))
if mode == "hint_p":
    hints = pq.read_table(request["hints_parquet"])["hint"].to_numpy()
    pq.write_table(pa.table({
        "position": pa.array(position, pa.int64()),
        "hint": pa.array(hints[position - 1], pa.uint16()),
        "hint_p": pa.array(np.full(len(position), 0.5 / vocab), pa.float32()),
    }), os.path.join(out, "hint_p.parquet"))
"#;

#[test]
fn a_misbehaving_scorer_is_a_one_line_error_and_the_store_is_unchanged() {
    let project = Project::small();
    with_scorers(&project);
    std::fs::write(project.path().join("bad.py"), BAD_SCORER).unwrap();
    let base = Project::small_pipeline(300);
    project.write_pipeline(&base);
    project.ok(&["run", "--quiet"]);
    for (mode, file, expected) in [
        (
            "crash",
            "scorer.log",
            "the scorer failed (exit status: 3); its log: ",
        ),
        (
            "hang",
            "scorer.log",
            "ran past its timeout of 2 s and was killed",
        ),
        (
            "nothing",
            "pass1.parquet",
            "missing: the scorer exited 0 but did not write it",
        ),
        (
            "schema",
            "pass1.parquet",
            "column 'model_p' is Float64, the protocol says Float32",
        ),
        (
            "rows",
            "pass1.parquet",
            "it is shorter than, or from other tokens than, the val table",
        ),
        (
            "nan",
            "pass1.parquet",
            "row 5: model_p NaN is not in (0, 1]",
        ),
        ("zero", "pass1.parquet", "row 7: model_p 0 is not in (0, 1]"),
        ("vocab", "distributions.parquet", "where (position"),
        // Confined, it cannot write there at all; unconfined (no Landlock), what it
        // wrote is found.
        // (Read-only mounts refuse it first where the sandbox has them.)
        if sandbox::landlock_abi().is_some() {
            ("outside", "scorer.log", "")
        } else {
            (
                "outside",
                "pass1.parquet",
                "written by the scorer outside its output directory",
            )
        },
    ] {
        project.write_pipeline(&format!(
            "{base}\n[nodes.scorer]\nstage = \"pass1\"\ninputs.tokens = \"tokens\"\nparams.model = \"command\"\nparams.command = [\".venv/bin/python\", \"bad.py\", \"{mode}\"]\nparams.timeout_s = 2\nfiles.scorer = [\"bad.py\"]\n"
        ));
        let before = project.store_snapshot();
        let started = std::time::Instant::now();
        let line = project.fails(&["run", "--quiet"]);
        assert!(
            line.contains("scorer") && line.contains(file) && line.contains(expected),
            "{mode}: {line}"
        );
        if mode == "outside" && sandbox::landlock_abi().is_some() {
            assert!(
                line.contains("Permission denied") || line.contains("Read-only file system"),
                "{line}"
            );
        }
        if mode == "crash" {
            assert!(
                line.ends_with("RuntimeError: the scorer broke here"),
                "{line}"
            );
        }
        if mode == "hang" {
            assert!(
                started.elapsed().as_secs() < 30,
                "the timeout did not kill it"
            );
        }
        // Only the work area (swept at the next run) may differ.
        let after = project.store_snapshot();
        let outside_tmp = |s: &std::collections::BTreeMap<String, String>| {
            s.iter()
                .filter(|(k, _)| !k.starts_with(".tmp"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(outside_tmp(&before), outside_tmp(&after), "{mode}");
    }
}

/// Killing cachemoney kills its scorer: no orphan keeps running (it could write into
/// the store it can reach where there is no sandbox).
#[test]
fn the_scorer_dies_with_cachemoney() {
    let project = Project::small();
    // A marker on the command line finds the scorer's processes in /proc (inside its
    // PID namespace its own pid means nothing out here).
    std::fs::write(project.path().join("sleepy.sh"), "#!/bin/sh\nsleep 61.25\n").unwrap();
    let base = Project::small_pipeline(300);
    project.write_pipeline(&format!(
        "{base}\n[nodes.scorer]\nstage = \"pass1\"\ninputs.tokens = \"tokens\"\nparams.model = \"command\"\nparams.command = [\"sh\", \"sleepy.sh\"]\nfiles.scorer = [\"sleepy.sh\"]\n"
    ));
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("cachemoney"))
        .current_dir(project.path())
        .args(["run", "--quiet"])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while common::processes_with("61.25").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the scorer never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let alive = common::processes_with("61.25");
        if alive.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "scorer processes {alive:?} outlived cachemoney"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
