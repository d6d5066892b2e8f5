//! The legal n-gram tilt (issue 28): the `hints` stage on the embedded corpus, end to end.
//! The kernel's exactness (the spec's worked examples, the reference with colliding
//! slots, contexts kept by their tokens) is tested beside it, in stages/tilt.

use crate::common;

use arrow::datatypes::{Float32Type, Int64Type, UInt16Type, UInt32Type};
use common::Project;

const HINTS: &str = "
[nodes.hints]
stage = \"hints\"
inputs.tokens = \"tokens\"
";

#[test]
fn the_hints_table_is_the_kernels_one_row_per_target() {
    let project = Project::small();
    let pipeline = Project::small_pipeline(300) + HINTS;
    project.write_pipeline(&pipeline);
    let out = project.ok(&["run"]);
    assert!(out.contains("hints at share ≥ 0.8"), "{out}");
    let val = val_tokens(&project);
    let table = project.the_artifact("hints").join("hints.parquet");
    let position = stage_api::read_column::<Int64Type>(&table, "position").unwrap();
    let hint = stage_api::read_column::<UInt16Type>(&table, "hint").unwrap();
    let share = stage_api::read_column::<Float32Type>(&table, "share").unwrap();
    let seen = stage_api::read_column::<UInt32Type>(&table, "seen").unwrap();
    assert_eq!(position, (1..val.len() as i64).collect::<Vec<_>>());
    // #2135's seed: the first target.
    let expected = tilt::kernel::Kernel::default()
        .hints(&val[1..], val[1])
        .unwrap();
    assert_eq!(
        (hint, share.clone(), seen),
        (expected.hint, expected.share, expected.seen)
    );
    let gated = share.iter().filter(|&&s| s >= 0.8).count();
    assert!(
        gated > 100,
        "the small corpus repeats itself: {gated} gated"
    );
    // The same bytes again (forced), and reused when nothing changed.
    let before = std::fs::read(&table).unwrap();
    project.ok(&["run", "--force", "hints"]);
    assert_eq!(std::fs::read(&table).unwrap(), before);
}

#[test]
fn a_full_table_is_a_one_line_error_and_the_store_keeps_nothing_of_it() {
    let project = Project::small();
    project.ok(&["run"]);
    let before = project.store_snapshot();
    project.write_pipeline(&(Project::small_pipeline(300) + HINTS + "params.table_bits = 4\n"));
    let line = project.fails(&["run"]);
    assert!(
        line.contains("val.parquet")
            && line.contains("table (2^4 slots) is full at target")
            && line.contains("the reference aborts there"),
        "{line}"
    );
    let after = project.store_snapshot();
    let added: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    assert!(
        added.iter().all(|k| !k.starts_with("hints/")),
        "a failed hints node left {added:?}"
    );
}

#[test]
fn a_kernel_not_built_or_a_parameter_of_another_is_refused_when_the_pipeline_loads() {
    let project = Project::small();
    // #1145's within-word channel is illegal: it belongs to the backtest's scorers.
    project.write_pipeline(&(Project::small_pipeline(300) + HINTS + "params.kernel = \"1145\"\n"));
    let line = project.fails(&["status"]);
    assert!(
        line.contains("kernel")
            && line.contains("\"2135\"")
            && line.contains("\"1514\"")
            && line.contains("\"cachemoney\""),
        "{line}"
    );
    // #1514 runs as it ran: its orders and gates are not parameters.
    project.write_pipeline(
        &(Project::small_pipeline(300) + HINTS + "params.kernel = \"1514\"\nparams.order = 12\n"),
    );
    let line = project.fails(&["status"]);
    assert!(
        line.contains("order") && line.contains("#1514's as it ran"),
        "{line}"
    );
    // The cache's parameters belong to the cache's kernel, and #2135's table to #2135's.
    project.write_pipeline(&(Project::small_pipeline(300) + HINTS + "params.min_count = 2\n"));
    let line = project.fails(&["status"]);
    assert!(
        line.contains("min_count") && line.contains("\"cachemoney\" only"),
        "{line}"
    );
    project.write_pipeline(
        &(Project::small_pipeline(300)
            + HINTS
            + "params.kernel = \"cachemoney\"\nparams.table_bits = 20\n"),
    );
    let line = project.fails(&["status"]);
    assert!(
        line.contains("table_bits") && line.contains("counts exactly"),
        "{line}"
    );
}

/// CacheMoney made honest: the causal-normalised cache's top continuations as the
/// tilt's hints. The hints table is the engine's (whose property test holds it to the
/// definition), and the chain passes every probe.
#[test]
fn a_tilt_on_the_caches_hints_is_legal() {
    let project = Project::small();
    let chain = TILT_CHAIN.replace(
        "inputs.tokens = \"tokens\"\n\n[nodes.pass1]",
        "inputs.tokens = \"tokens\"\nparams.kernel = \"cachemoney\"\n\n[nodes.pass1]",
    );
    assert_ne!(chain, TILT_CHAIN);
    project.write_pipeline(&(Project::small_pipeline(300) + &chain));
    let run = project.ok(&["run"]);
    every_probe_passes(&project);
    let val = val_tokens(&project);
    let original = original(&project, "hints", "hints").join("hints.parquet");
    let hint = stage_api::read_column::<UInt16Type>(&original, "hint").unwrap();
    let seen = stage_api::read_column::<UInt32Type>(&original, "seen").unwrap();
    let share = stage_api::read_column::<Float32Type>(&original, "share").unwrap();
    let expected = cache::continuations::top_continuations(
        &val,
        &cache::NgramConfig::default().validated().unwrap(),
    );
    assert_eq!(hint, expected.token[1..]);
    assert_eq!(seen, expected.seen[1..]);
    for (i, &s) in share.iter().enumerate() {
        let (top, seen) = (expected.top[i + 1], expected.seen[i + 1]);
        let want = if seen == 0 {
            0.0
        } else {
            top as f32 / seen as f32
        };
        assert_eq!(s, want, "target {}", i + 1);
    }
    let gated = share.iter().filter(|&&s| s >= 0.8).count();
    assert!(gated > 1000, "{gated} gated: {run}");
}

/// The artifact directory of `node` (a node of `stage`) in the project's store: not a
/// legality re-run's, whose manifests name their own nodes.
fn original(project: &Project, stage: &str, node: &str) -> std::path::PathBuf {
    let named = format!("\"node\": \"{node}\"");
    std::fs::read_dir(project.path().join("artifacts").join(stage))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|d| {
            std::fs::read_to_string(d.join("manifest.json")).is_ok_and(|m| m.contains(&named))
        })
        .unwrap_or_else(|| panic!("no {stage} artifact of node {node}"))
}

/// `legality` exits 0 and says every probe passed.
fn every_probe_passes(project: &Project) {
    let out = project.run(&["legality"]);
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success() && printed.contains("every probe passed"),
        "{printed}"
    );
}

/// The val stream of the project's tokens.
fn val_tokens(project: &Project) -> Vec<u16> {
    stage_api::read_column::<UInt16Type>(
        &project.the_artifact("tokenize").join("val.parquet"),
        "token",
    )
    .unwrap()
}

const TILT_CHAIN: &str = "
[nodes.hints]
stage = \"hints\"
inputs.tokens = \"tokens\"

[nodes.pass1]
stage = \"pass1\"
inputs.tokens = \"tokens\"
inputs.hints = \"hints\"
params.model = \"bigram\"
params.temperature = 1.0
params.mass_sample = 512

[nodes.tilt]
stage = \"tilt\"
inputs.tokens = \"tokens\"
inputs.pass1 = \"pass1\"
inputs.hints = \"hints\"

[nodes.judge]
stage = \"legality\"
inputs.tokens = \"tokens\"
inputs.chain = \"tilt\"
params.min_sample = 300
";

/// The whole chain (hints → pass-1 with hint_p → tilt → legality) on the embedded
/// corpus: every probe passes, the tilt is the spec's arithmetic on every entry, and a
/// threshold sweep recomputes neither the hints nor the pass-1.
#[test]
fn a_tilt_chain_is_legal_and_a_threshold_sweep_reuses_the_hints() {
    let project = Project::small();
    project.write_pipeline(&(Project::small_pipeline(300) + TILT_CHAIN));
    project.ok(&["run"]);
    every_probe_passes(&project);

    let val = val_tokens(&project);
    // The base probability and the hint's are the pass-1's, same rows.
    let pass1 = original(&project, "pass1", "pass1");
    let tilted = original(&project, "tilt", "tilt").join("pass1.parquet");
    let model_p = stage_api::read_column::<Float32Type>(&tilted, "model_p").unwrap();
    let base_p =
        stage_api::read_column::<Float32Type>(&pass1.join("pass1.parquet"), "model_p").unwrap();
    let hint_p =
        stage_api::read_column::<Float32Type>(&pass1.join("hint_p.parquet"), "hint_p").unwrap();
    let hint = stage_api::read_column::<UInt16Type>(&pass1.join("hint_p.parquet"), "hint").unwrap();
    let position = stage_api::read_column::<Int64Type>(&tilted, "position").unwrap();
    let hints = tilt::kernel::Kernel::default()
        .hints(&val[1..], val[1])
        .unwrap();
    let mut fired = 0;
    for row in 0..position.len() {
        let t = position[row] as usize;
        assert_eq!(hint[row], hints.hint[t - 1]);
        let beta = if hints.share[t - 1] >= 0.8 {
            2.625
        } else {
            0.0
        };
        fired += (beta > 0.0) as usize;
        let want = tilt::tilt::tilted(
            base_p[row] as f64,
            hint_p[row] as f64,
            val[t] == hint[row],
            beta,
        ) as f32;
        assert_eq!(model_p[row], want, "row {row}");
    }
    assert!(fired > 100, "{fired} fired");

    // A threshold sweep: only the tilt (and its judge) are built again.
    let swept = Project::small_pipeline(300)
        + &TILT_CHAIN.replace(
            "inputs.hints = \"hints\"\n\n[nodes.judge]",
            "inputs.hints = \"hints\"\nparams.threshold = 0.6\n\n[nodes.judge]",
        );
    project.write_pipeline(&swept);
    let status = project.ok(&["status"]);
    for (node, state) in [("hints", "cached"), ("pass1", "cached"), ("tilt", "stale")] {
        let line = status
            .lines()
            .find(|l| l.split_whitespace().next() == Some(node))
            .unwrap();
        assert!(line.contains(state), "{node}: {line}");
    }
    let run = project.ok(&["run"]);
    assert!(run.contains("tilt"), "{run}");

    // A tilt given other hints than its pass-1 read is refused, naming the table, and
    // leaves nothing in the store.
    let crossed = Project::small_pipeline(300)
        + &TILT_CHAIN.replace(
            "inputs.pass1 = \"pass1\"\ninputs.hints = \"hints\"",
            "inputs.pass1 = \"pass1\"\ninputs.hints = \"hints_1514\"",
        )
        + "\n[nodes.hints_1514]\nstage = \"hints\"\ninputs.tokens = \"tokens\"\nparams.kernel = \"1514\"\n";
    project.write_pipeline(&crossed);
    let before = project.store_snapshot();
    let line = project.fails(&["run"]);
    assert!(
        line.contains("hint_p.parquet") && line.contains("the pass-1 read another hints artifact"),
        "{line}"
    );
    let after = project.store_snapshot();
    assert!(
        after
            .keys()
            .filter(|k| !before.contains_key(*k))
            .all(|k| !k.starts_with("tilt/")),
        "a failed tilt was kept"
    );
}

/// Links the repository's examples and Python into the project, and returns a `python`
/// node running the backtest's tilt (`tilt.py VARIANT`) on the bigram.
fn with_python_tilt(project: &Project, variant: &str) -> String {
    let root = common::repo_root();
    for shared in ["examples", ".venv"] {
        std::os::unix::fs::symlink(root.join(shared), project.path().join(shared)).unwrap();
    }
    format!(
        r#"
[nodes.python]
stage = "pass1"
inputs.tokens = "tokens"
params.model = "command"
params.command = [".venv/bin/python", "examples/scorers/backtest/tilt.py", "{variant}"]
params.mass_sample = 16
files.scorer = ["examples/scorers/backtest/common.py", "examples/scorers/backtest/tilt.py"]
"#
    )
}

/// The tilt chain's numbers are the backtest's independent Python tilt's (contexts kept
/// by their tokens, on the same bigram): every entry's tilted probability, to float32.
#[test]
fn the_tilt_agrees_with_the_backtests_python_tilt() {
    let project = Project::small();
    let python = with_python_tilt(&project, "token");
    let chain = TILT_CHAIN.split("[nodes.judge]").next().unwrap();
    project.write_pipeline(&(Project::small_pipeline(300) + chain + &python));
    project.ok(&["run"]);
    let read = |stage: &str| {
        let dir = project.the_artifact(stage);
        stage_api::read_column::<Float32Type>(&dir.join("pass1.parquet"), "model_p").unwrap()
    };
    let ours = read("tilt");
    let dirs: Vec<_> = std::fs::read_dir(project.path().join("artifacts/pass1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|d| d.join("scorer.log").exists())
        .collect();
    let theirs =
        stage_api::read_column::<Float32Type>(&dirs[0].join("pass1.parquet"), "model_p").unwrap();
    assert_eq!(ours.len(), theirs.len());
    // Where two different windows share a 64-bit key, the reference (and we) merge their
    // counts and the Python tilt does not: those targets are left out.
    let val = val_tokens(&project);
    let stream: Vec<u16> = std::iter::once(val[1])
        .chain(val[1..].iter().copied())
        .collect();
    let mut first_window: std::collections::HashMap<u64, &[u16]> = Default::default();
    let mut colliding = std::collections::HashSet::new();
    for w in stream.windows(15) {
        let key = tilt::kernel::context_key(w);
        if *first_window.entry(key).or_insert(w) != w {
            colliding.insert(key);
        }
    }
    let mut left_out = 0;
    let mut worst = 0f32;
    for (row, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        // Row r scores position r + 1, target index r, window stream[r − 14 ..= r].
        if row >= 14 && colliding.contains(&tilt::kernel::context_key(&stream[row - 14..=row])) {
            left_out += 1;
            continue;
        }
        worst = worst.max(((a - b) / b).abs());
    }
    assert!(worst < 1e-5, "largest relative difference {worst}");
    assert!(
        left_out * 100 < ours.len(),
        "{left_out} targets on colliding keys"
    );
}

/// An imported table has no distribution to read p(hint) from: wiring hints to it is
/// refused when the pipeline loads, in one line.
#[test]
fn hints_wired_to_an_imported_table_are_refused_at_load() {
    let project = Project::small();
    let import = "
[nodes.imported]
stage = \"pass1\"
inputs.tokens = \"tokens\"
inputs.hints = \"hints\"
params.model = \"import\"
files.table = [\"table.parquet\"]
";
    std::fs::write(project.path().join("table.parquet"), "").unwrap();
    project.write_pipeline(&(Project::small_pipeline(300) + HINTS + import));
    let line = project.fails(&["status"]);
    assert!(
        line.contains("an imported table cannot give the hint's probability"),
        "{line}"
    );
}

/// #1514's prefix-gated kernel (§2.7) end to end: its hints, β = 2 × share, agree with the
/// backtest's independent Python (`tilt.py 1514`: contexts kept by their tokens, as ours
/// are) on every entry, and the chain passes every probe.
#[test]
fn the_1514_kernel_agrees_with_the_backtests_python_and_is_legal() {
    let project = Project::small();
    let python = with_python_tilt(&project, "1514");
    let chain = TILT_CHAIN
        .replace(
            "inputs.tokens = \"tokens\"\n\n[nodes.pass1]",
            "inputs.tokens = \"tokens\"\nparams.kernel = \"1514\"\n\n[nodes.pass1]",
        )
        .replace(
            "inputs.hints = \"hints\"\n\n[nodes.judge]",
            "inputs.hints = \"hints\"\nparams.threshold = 0.0\nparams.beta_per_share = 2.0\n\n[nodes.judge]",
        );
    assert!(chain.contains("1514") && chain.contains("beta_per_share"));
    project.write_pipeline(&(Project::small_pipeline(300) + &chain + &python));
    let run = project.ok(&["run"]);
    assert!(run.contains("past #1514's gates"), "{run}");
    every_probe_passes(&project);
    let original = original(&project, "tilt", "tilt");
    let ours =
        stage_api::read_column::<Float32Type>(&original.join("pass1.parquet"), "model_p").unwrap();
    let python_dir = std::fs::read_dir(project.path().join("artifacts/pass1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|d| d.join("scorer.log").exists())
        .unwrap();
    let theirs =
        stage_api::read_column::<Float32Type>(&python_dir.join("pass1.parquet"), "model_p")
            .unwrap();
    assert_eq!(ours.len(), theirs.len());
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| ((a - b) / b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "largest relative difference {worst}");
    let hints = project.sql("SELECT count(*) AS n FROM tilt.pass1 WHERE fired");
    let fired: u64 = hints.lines().nth(1).unwrap().trim().parse().unwrap();
    assert!(fired > 100, "{fired} fired");
}
