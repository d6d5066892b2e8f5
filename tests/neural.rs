//! The neural stages end to end through the real binary and its libtorch worker: a tiny
//! GPT is trained on the small test corpus, scored by pass-1 and fed to the cache
//! stages; reruns are reproducible; bad models and bad wiring fail with one line.

use crate::common;

use common::{neural_pipeline, tiny_model, Project};

fn manifest(project: &Project, stage: &str) -> serde_json::Value {
    let dir = project.path().join("artifacts").join(stage);
    let mut found: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path().join("manifest.json"))
        .filter(|p| p.is_file())
        .collect();
    assert_eq!(found.len(), 1, "one {stage} artifact expected");
    serde_json::from_str(&std::fs::read_to_string(found.pop().unwrap()).unwrap()).unwrap()
}

#[test]
fn a_trained_gpt_feeds_pass1_and_the_cache_stages_reproducibly() {
    let project = Project::small();
    project.write_pipeline(&neural_pipeline(&tiny_model(300), 30));
    project.ok(&["run", "--quiet"]);

    let train = manifest(&project, "train");
    let report = &train["report"];
    assert_eq!(report["steps"], 30);
    assert_eq!(report["tokens_seen"], 30 * 4 * 32);
    let initial = report["initial_val_bpb"].as_f64().unwrap();
    let last = report["final_val_bpb"].as_f64().unwrap();
    assert!(
        last < initial,
        "training did not lower val BPB: {initial} → {last}"
    );
    assert_eq!(report["within_budget"], true);
    assert!(report["compressed_model_bytes"].as_u64().unwrap() > 0);
    let files = train["files"].as_object().unwrap();
    for name in [
        "config.json",
        "model.safetensors",
        "train_log.parquet",
        "train_timing.parquet",
    ] {
        assert!(files.contains_key(name), "{name} missing: {files:?}");
    }
    assert_eq!(files["train_timing.parquet"]["volatile"], true);
    assert!(files["train_log.parquet"].get("volatile").is_none());

    // The log has one row per step, a validation point every 10 steps, and its timings
    // join on the step.
    let log = project.sql(
        "SELECT count(*) AS steps, count(val_bpb) AS checks, max(tokens_seen) AS seen, min(lr_multiplier) AS lowest FROM train_log",
    );
    assert_eq!(log.lines().nth(1).unwrap(), "30,3,3840,0.1");
    let timed = project
        .sql("SELECT count(*) FROM train_log JOIN train_timing USING (step) WHERE seconds > 0");
    assert_eq!(timed.lines().nth(1).unwrap(), "30");

    // pass-1 scores every val target once, plus the tail windows' repeats (§4.2).
    let pass1 = manifest(&project, "pass1");
    let val_tokens = project.sql("SELECT count(*) FROM tokens.val");
    let targets: u64 = val_tokens.lines().nth(1).unwrap().parse::<u64>().unwrap() - 1;
    let entries = pass1["report"]["entries"].as_u64().unwrap();
    assert!(
        entries >= targets && entries < targets + 32,
        "{entries} entries for {targets} targets"
    );
    let distinct = project.sql("SELECT count(DISTINCT position), min(position), max(position), min(model_p) > 0, max(model_p) <= 1 FROM pass1");
    assert_eq!(
        distinct.lines().nth(1).unwrap(),
        format!("{targets},1,{targets},true,true")
    );
    let neural = pass1["report"]["neural_bpb"].as_f64().unwrap();
    assert!(neural.is_finite() && neural > 0.0);

    // The same recipe rebuilt gives the same bytes: training is seeded and deterministic,
    // and the wall-clock table does not count. Downstream stays as it was.
    let forced = project.ok(&["run", "--force", "model", "--force", "pass1"]);
    assert!(
        forced.contains("model          train        rebuilt, identical"),
        "{forced}"
    );
    assert!(
        forced.contains("pass1          pass1        rebuilt, identical"),
        "{forced}"
    );
    assert!(
        forced.contains("scores         pass2        reused"),
        "{forced}"
    );
}

/// `--threads` sizes the runner's pool; libtorch's threads are a parameter of the
/// neural stages (its reductions split by thread count), so the flag changes no bytes.
#[test]
fn the_neural_stages_do_not_depend_on_the_runners_thread_count() {
    let hashes: Vec<String> = ["1", "2"]
        .iter()
        .map(|threads| {
            let project = Project::small();
            project.write_pipeline(&neural_pipeline(&tiny_model(300), 12));
            project.ok(&["--threads", threads, "run", "--quiet", "--until", "pass1"]);
            format!(
                "{} {}",
                manifest(&project, "train")["content_hash"],
                manifest(&project, "pass1")["content_hash"]
            )
        })
        .collect();
    assert_eq!(hashes[0], hashes[1]);
}

#[test]
fn impossible_shapes_and_vocabulary_mismatches_are_refused_before_anything_is_written() {
    let project = Project::small();
    project.write_pipeline(&neural_pipeline(
        "{ vocab_size = 300, d_model = 30, heads = 4, kv_heads = 2 }",
        5,
    ));
    let line = project.fails(&["run"]);
    assert!(
        line.contains("pipeline.toml:") && line.contains("heads (4) do not divide d_model (30)"),
        "{line}"
    );
    assert!(project.store_snapshot().values().all(|h| h.is_empty()));

    // The default vocab_size (1024) against a 300-entry tokenizer.
    project.write_pipeline(&neural_pipeline(
        "{ layers = 1, d_model = 32, heads = 2, kv_heads = 1, seq_len = 32, rope_dims = 8, xsa_last = 1 }",
        5,
    ));
    let line = project.fails(&["run", "--quiet"]);
    assert!(
        line.contains("node 'model'")
            && line.contains("vocab_size is 1024")
            && line.contains("vocab.parquet")
            && line.contains("has 300 entries"),
        "{line}"
    );
    assert!(!project.path().join("artifacts/train").exists());
}

#[test]
fn a_model_trained_on_another_vocabulary_is_refused_by_pass1() {
    let project = Project::small();
    // The model is trained on a 300-entry tokenizer and scored on a 400-entry one.
    let pipeline = neural_pipeline(&tiny_model(300), 3).replace(
        "[nodes.pass1]\nstage = \"pass1\"\ninputs.tokens = \"tokens\"",
        "[nodes.other_tokens]\nstage = \"tokenize\"\nfiles.corpus = [\"corpus/*.jsonl\"]\nparams.vocab_size = 400\nparams.val_fraction = 0.25\n\n[nodes.pass1]\nstage = \"pass1\"\ninputs.tokens = \"other_tokens\"",
    );
    project.write_pipeline(&pipeline);
    let line = project.fails(&["run", "--quiet", "--until", "pass1"]);
    assert!(
        line.contains("config.json")
            && line.contains("vocab_size is 300")
            && line.contains("has 400 entries"),
        "{line}"
    );
    assert!(!project.path().join("artifacts/pass1").exists());
    assert!(project.path().join("artifacts/train").exists());
    let tmp = project.path().join("artifacts/.tmp");
    assert!(
        std::fs::read_dir(&tmp).map_or(true, |mut d| d.next().is_none()),
        "scratch left behind"
    );
}

#[test]
fn a_corrupt_model_file_is_named_and_nothing_is_built_from_it() {
    let project = Project::small();
    project.write_pipeline(&neural_pipeline(&tiny_model(300), 3));
    project.ok(&["run", "--quiet", "--until", "pass1"]);
    let train = manifest(&project, "train");
    let dir = project
        .path()
        .join("artifacts/train")
        .join(train["recipe"].as_str().unwrap());
    let model = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&model, bytes).unwrap();
    // `audit` rebuilds pass1 from its stored inputs as they are: the worker is never
    // handed the corrupt model.
    let line = project.fails(&["audit", "pass1"]);
    assert!(
        line.contains("input 'model'")
            && line.contains("model.safetensors")
            && line.contains("corrupt"),
        "{line}"
    );
    // `run` retrains the damaged model first; its bytes are the manifest's again, so
    // pass-1 stays as it was.
    let out = project.ok(&["run", "--until", "pass1"]);
    let action = |node: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{node} ")))
            .map(|l| l.to_string())
            .unwrap_or_default()
    };
    assert!(action("model").contains("rebuilt, repaired"), "{out}");
    assert!(action("pass1").contains("reused"), "{out}");
}

#[test]
fn pass1_wiring_mistakes_are_one_line_errors() {
    let project = Project::small();
    let gpt_without_model = neural_pipeline(&tiny_model(300), 3).replace(
        "inputs.model = \"model\"\nparams.model = \"gpt\"",
        "params.model = \"gpt\"",
    );
    project.write_pipeline(&gpt_without_model);
    let line = project.fails(&["run", "--quiet", "--until", "pass1"]);
    assert!(line.contains("needs inputs.model"), "{line}");

    let stride_for_bigram = neural_pipeline(&tiny_model(300), 3).replace(
        "inputs.model = \"model\"\nparams.model = \"gpt\"",
        "params.model = \"bigram\"",
    );
    project.write_pipeline(&stride_for_bigram);
    let line = project.fails(&["run", "--quiet"]);
    assert!(
        line.contains("pipeline.toml:") && line.contains("applies only to model = \"gpt\""),
        "{line}"
    );
}

#[test]
fn a_missing_worker_is_a_clear_error() {
    let project = Project::small();
    project.write_pipeline(&neural_pipeline(&tiny_model(300), 3));
    let out = project
        .cmd()
        .args(["run", "--quiet", "--until", "model"])
        .env("CACHEMONEY_GPT_WORKER", "/nonexistent/cachemoney-gpt")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("libtorch worker /nonexistent/cachemoney-gpt, which is missing")
            && stderr.contains("cargo build --release --workspace"),
        "{stderr}"
    );
    assert!(!project.path().join("artifacts/train").exists());
}

/// `cachemoney` links nothing of libtorch: `cargo build --release` (the root package
/// alone) needs no libtorch on the machine and answers the GPT stages as in the test
/// above. The worker is the gpt-torch package's, and only it links tch.
#[test]
fn the_core_builds_without_libtorch() {
    let tree =
        |package: &str| cargo_tree(&["-p", package, "-e", "normal,build", "--prefix", "none"]);
    let links_torch = |tree: &str| {
        tree.lines()
            .any(|l| l.starts_with("tch ") || l.starts_with("torch-sys "))
    };
    let core = tree("cachemoney");
    assert!(!links_torch(&core), "{core}");
    assert!(core.lines().any(|l| l.starts_with("datafusion ")), "{core}");
    assert!(links_torch(&tree("cachemoney-gpt-torch")));
}

/// The README's main command runs the repository's own pipeline.toml: it must load
/// (every node's stage, parameters and wiring valid), list every stage, and without the
/// GPT worker run everything the GPT is not needed for.
#[test]
fn the_default_pipeline_loads_with_its_neural_nodes() {
    let project = Project::empty();
    let root = common::repo_root();
    std::fs::copy(
        root.join("pipeline.toml"),
        project.path().join("pipeline.toml"),
    )
    .unwrap();
    for shared in ["data", "examples", ".venv"] {
        std::os::unix::fs::symlink(root.join(shared), project.path().join(shared)).unwrap();
    }
    let status = project.ok(&["status"]);
    for (node, stage) in [
        ("tokens", "tokenize"),
        ("model", "train"),
        ("pass1", "pass1"),
        ("pass1_bigram", "pass1"),
        ("scores", "pass2"),
    ] {
        assert!(
            status
                .lines()
                .any(|l| l.starts_with(node) && l.contains(stage) && l.contains("missing")),
            "{node} ({stage}) not listed as missing:\n{status}"
        );
    }

    // Without the libtorch worker (`cargo build --release` builds none; here it is
    // pointed away), every node that does not need the GPT runs, and the first that does
    // stops the run with one line saying how to get it.
    let out = project
        .cmd()
        .args(["run", "--quiet"])
        .env("CACHEMONEY_GPT_WORKER", "/nonexistent/cachemoney-gpt")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert!(
        errors.len() == 1 && errors[0].contains("which is missing: build it too"),
        "{stderr}"
    );
    let status = project.ok(&["status"]);
    let state = |node: &str| {
        status
            .lines()
            .find(|l| l.split_whitespace().next() == Some(node))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("?")
            .to_string()
    };
    for node in ["tokens", "cache", "cache_causal", "cache_normalised"] {
        assert_eq!(state(node), "cached", "{node}:\n{status}");
    }
    assert_eq!(state("model"), "missing", "{status}");
}

/// Without a GPU, asking for one is a one-line error before any training; with one, the
/// same pipeline trains on it.
#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    let project = Project::small();
    project.write_pipeline(&neural_pipeline(&tiny_model(300), 3).replace(
        "params.threads = 1",
        "params.threads = 1\nparams.device = \"cuda\"",
    ));
    let out = project.run(&["run", "--quiet", "--until", "model"]);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("node 'model'")
                && stderr.contains("device = \"cuda\" but libtorch sees no CUDA device here"),
            "{stderr}"
        );
        assert!(!project.path().join("artifacts/train").exists());
    }
}

/// `run --seeds`: the training seed's subgraph is copied per seed, the rest is built once
/// and shared, and the `seeds` table holds each seed's numbers with their mean and sample
/// standard deviation, read from the very artifacts it names.
#[test]
fn run_seeds_trains_once_per_seed_shares_the_rest_and_tabulates_the_spread() {
    let project = Project::small();
    project.write_pipeline(&neural_pipeline(&tiny_model(300), 20));
    let out = project.ok(&["run", "--seeds", "7,8"]);
    let (nodes, _) = out
        .split_once("seeds table")
        .expect("the run prints the seeds table");
    let built = |node: &str| {
        nodes
            .lines()
            .filter(|l| l.split_whitespace().next() == Some(node))
            .count()
    };
    for shared in ["tokens", "token_stats", "cache"] {
        assert_eq!(built(shared), 1, "{shared} once:\n{out}");
    }
    for seeded in ["model", "pass1", "calibration", "scores"] {
        assert_eq!(built(seeded), 0, "{seeded} has only copies:\n{out}");
        for seed in [7, 8] {
            assert_eq!(built(&format!("{seeded}_seed{seed}")), 1, "{out}");
        }
    }
    let explained = project.ok(&["explain", "model_seed8", "--json", "--seeds", "7,8"]);
    let explained: serde_json::Value = serde_json::from_str(&explained).unwrap();
    assert_eq!(explained["ingredients"]["params"]["seed"], 8);

    let rows = project.sql(
        "SELECT kind, seed, value FROM seeds WHERE node = 'scores' AND metric = 'final_bpb' ORDER BY kind, seed",
    );
    let rows: Vec<Vec<&str>> = rows
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(
        rows.iter().map(|r| (r[0], r[1])).collect::<Vec<_>>(),
        [("mean", ""), ("seed", "7"), ("seed", "8"), ("std", "")]
    );
    let value = |i: usize| rows[i][2].parse::<f64>().unwrap();
    let (mean, seven, eight, std) = (value(0), value(1), value(2), value(3));
    assert_ne!(seven, eight, "two training seeds gave the same model");
    assert!((mean - (seven + eight) / 2.0).abs() < 1e-12);
    assert!((std - (seven - eight).abs() / 2f64.sqrt()).abs() < 1e-12);
    let shown = project.ok(&["show", "scores_seed7", "--json", "--seeds", "7,8"]);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["report"]["final_bpb"].as_f64().unwrap(), seven);
    let metrics = project.sql("SELECT DISTINCT node || '.' || metric AS m FROM seeds ORDER BY m");
    for expected in [
        "model.final_val_bpb",
        "pass1.neural_bpb",
        "scores.final_bpb",
    ] {
        assert!(metrics.contains(expected), "{metrics}");
    }

    // A third seed builds only its own copies; the first two are reused.
    let out = project.ok(&["run", "--seeds", "7,8,9"]);
    let action = |node: &str| {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(node))
            .map(|l| l.split_whitespace().nth(2).unwrap_or_default().to_string())
    };
    assert_eq!(action("model_seed7").as_deref(), Some("reused"), "{out}");
    assert_eq!(action("model_seed9").as_deref(), Some("built"), "{out}");
    assert_eq!(action("cache").as_deref(), Some("reused"), "{out}");
    let nine = project.sql("SELECT count(*) FROM seeds WHERE seed = 9 AND value IS NOT NULL");
    assert_ne!(nine.lines().nth(1).unwrap(), "0");
    // gc keeps what the seeds point to when told the seeds.
    let gc = project.ok(&["gc", "--dry-run", "--seeds", "7,8,9"]);
    assert!(gc.contains("would free 0 artifact(s)"), "{gc}");
    // A damaged seeds table is named, in one line, by the command that reads it.
    let table = project.path().join("artifacts/seeds.parquet");
    std::fs::write(&table, b"not parquet").unwrap();
    let err = project.fails(&["sql", "SELECT 1"]);
    assert!(err.contains("seeds.parquet"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn seeds_that_cannot_apply_are_one_line_errors() {
    let project = Project::small();
    project.write_pipeline(&neural_pipeline(&tiny_model(300), 20));
    let twice = project.fails(&["status", "--seeds", "3,3"]);
    assert!(
        twice.contains("--seeds: [3, 3] names a seed twice"),
        "{twice}"
    );
    project.write_pipeline(&Project::small_pipeline(300));
    let none = project.fails(&["run", "--seeds", "1,2"]);
    assert!(
        none.contains("no node has a run seed to vary (stages with one: train)"),
        "{none}"
    );
    project.write_pipeline(&("seeds = []\n".to_string() + &Project::small_pipeline(300)));
    let empty = project.fails(&["status"]);
    assert!(empty.contains("seeds: the list is empty"), "{empty}");
}

/// The code's size (`code_bytes`, counted against the record's artifact budget) is a fact
/// about the build, not a function of the recipe: a model reused by newer code keeps the
/// size of the code that trained it. `audit` shows such an entry but does not fail on it;
/// any other report entry that differs still fails the audit.
#[test]
fn audit_notes_build_facts_but_fails_on_other_report_differences() {
    let project = Project::small();
    project.write_pipeline(&neural_pipeline(&tiny_model(300), 20));
    project.ok(&["run", "--quiet", "--until", "model"]);
    let train = manifest(&project, "train");
    assert_eq!(
        train["volatile_report"],
        // Sorted, as the report's own keys: they come from a typed struct's fields.
        serde_json::json!([
            "artifact_bytes",
            "code_bytes",
            "cpu",
            "numerics",
            "within_budget"
        ])
    );
    let path = project
        .path()
        .join("artifacts/train")
        .join(train["recipe"].as_str().unwrap())
        .join("manifest.json");
    let rewrite = |key: &str, value: serde_json::Value| {
        let mut m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        m["report"][key] = value;
        std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    };
    // As if an older version of the model code (1 byte shorter) had trained it.
    let code_bytes = train["report"]["code_bytes"].as_u64().unwrap();
    rewrite("code_bytes", (code_bytes - 1).into());
    let out = project.ok(&["audit", "model"]);
    assert!(out.contains("identical"), "{out}");
    assert!(
        out.contains(&format!(
            "note: report code_bytes: stored {}, rebuilt {code_bytes} (describes the build, not compared)",
            code_bytes - 1
        )),
        "{out}"
    );
    rewrite("final_val_bpb", 0.5.into());
    let out = project.run(&["audit", "model"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("report final_val_bpb: stored 0.5, rebuilt"),
        "{stdout}"
    );
}

/// `./dev run` (`cargo build --release --workspace --bins`) and `./dev test` (`cargo
/// test --release --workspace`) compile every dependency once between them: a
/// dev-dependency that turned on a feature of a shared dependency would make the test
/// build compile it, and everything above it, a second time (DataFusion, tch).
#[test]
fn the_test_build_reuses_the_run_build() {
    // Package → the feature sets it is built with (a build dependency may have its own).
    type Features = std::collections::BTreeMap<String, std::collections::BTreeSet<String>>;
    let features = |edges: &str| -> Features {
        let tree = cargo_tree(&[
            "--workspace",
            "-e",
            edges,
            "-f",
            "{p}|{f}",
            "--prefix",
            "none",
        ]);
        let mut features = Features::new();
        for line in tree.lines() {
            if let Some((package, set)) = line.trim_end_matches(" (*)").split_once('|') {
                features
                    .entry(package.to_string())
                    .or_default()
                    .insert(set.to_string());
            }
        }
        features
    };
    let run = features("normal,build");
    let test = features("normal,build,dev");
    let differ: Vec<String> = run
        .iter()
        .filter(|(package, f)| test.get(*package).is_some_and(|g| g != *f))
        .map(|(package, f)| format!("{package}: {f:?} vs {:?}", test[package]))
        .collect();
    assert!(differ.is_empty(), "features differ: {differ:#?}");
}

/// `cargo tree ARGS` in the repository, as text.
fn cargo_tree(args: &[&str]) -> String {
    let out = std::process::Command::new(std::env::var("CARGO").unwrap_or("cargo".into()))
        .arg("tree")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
