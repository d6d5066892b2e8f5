//! The runner end to end on real text: caching, staleness, early cut-off, inspection.

use crate::common;

use common::Project;

#[test]
fn first_run_builds_second_run_reuses() {
    let p = Project::small();
    let out = p.ok(&["run"]);
    assert!(out.contains("tokens") && out.contains("built"), "{out}");
    assert!(out.contains("2 node(s): 0 reused, 2 built"), "{out}");
    let again = p.ok(&["run"]);
    assert!(again.contains("2 node(s): 2 reused, 0 built"), "{again}");
    let status = p.ok(&["status"]);
    assert_eq!(status.matches("cached").count(), 2, "{status}");
}

#[test]
fn val_bytes_equal_the_utf8_length_of_the_val_documents() {
    let p = Project::small();
    p.ok(&["run"]);
    // Which documents went to val, by line, from the docs table ...
    let lines = p.sql("SELECT line FROM docs WHERE split = 'val' ORDER BY line");
    let val_lines: Vec<usize> = lines.lines().skip(1).map(|l| l.parse().unwrap()).collect();
    assert_eq!(val_lines.len(), 3, "12 documents × 0.25");
    // ... and their UTF-8 length computed here, independently of the tool.
    let corpus = std::fs::read_to_string(p.path().join("corpus/docs.jsonl")).unwrap();
    let expected: usize = corpus
        .lines()
        .enumerate()
        .filter(|(i, _)| val_lines.contains(&(i + 1)))
        .map(|(_, l)| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .len()
        })
        .sum();
    let total = p.sql("SELECT sum(bytes) AS b FROM val");
    assert_eq!(total.lines().nth(1).unwrap(), expected.to_string());
    let train_total = p.sql("SELECT sum(bytes) AS b FROM train");
    let all: usize = corpus
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .len()
        })
        .sum();
    assert_eq!(
        train_total.lines().nth(1).unwrap(),
        (all - expected).to_string()
    );
    // Every document starts with BOS, which counts no bytes.
    let bos = p.sql("SELECT count(*) AS n FROM val v JOIN vocab ON v.token = vocab.id WHERE vocab.kind = 'control' AND v.bytes = 0");
    assert_eq!(bos.lines().nth(1).unwrap(), "3");
}

#[test]
fn a_changed_parameter_makes_the_node_and_its_dependents_stale_and_says_why() {
    let p = Project::small();
    p.ok(&["run"]);
    p.write_pipeline(&Project::small_pipeline(280));
    let status = p.ok(&["status"]);
    let tokens = status.lines().find(|l| l.starts_with("tokens ")).unwrap();
    assert!(
        tokens.contains("stale") && tokens.contains("param vocab_size: 300 → 280"),
        "{status}"
    );
    let stats = status
        .lines()
        .find(|l| l.starts_with("token_stats"))
        .unwrap();
    assert!(
        stats.contains("stale") && stats.contains("upstream 'tokens' is stale"),
        "{status}"
    );
    let json: serde_json::Value = serde_json::from_str(&p.ok(&["status", "--json"])).unwrap();
    assert_eq!(json[0]["state"], "stale");
    p.ok(&["run"]);
    // Going back to the old value finds the old artifacts again.
    p.write_pipeline(&Project::small_pipeline(300));
    let back = p.ok(&["run"]);
    assert!(back.contains("2 reused"), "{back}");
}

#[test]
fn an_identical_rebuild_leaves_downstream_cached() {
    let p = Project::small();
    p.ok(&["run"]);
    let out = p.ok(&["run", "--force", "tokens"]);
    let tokens = out.lines().find(|l| l.starts_with("tokens ")).unwrap();
    assert!(tokens.contains("rebuilt, identical"), "{out}");
    let stats = out.lines().find(|l| l.starts_with("token_stats")).unwrap();
    assert!(stats.contains("reused"), "{out}");
}

#[test]
fn touching_an_input_file_without_changing_it_keeps_everything_cached() {
    let p = Project::small();
    p.ok(&["run"]);
    let corpus = p.path().join("corpus/docs.jsonl");
    let text = std::fs::read(&corpus).unwrap();
    std::fs::remove_file(&corpus).unwrap();
    std::fs::write(&corpus, text).unwrap(); // new inode and mtime, same bytes
    assert!(p.ok(&["run"]).contains("2 reused"));
}

#[test]
fn until_stops_after_the_named_node() {
    let p = Project::small();
    let out = p.ok(&["run", "--until", "tokens"]);
    assert!(out.contains("1 node(s)"), "{out}");
    let status = p.ok(&["status"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("token_stats") && l.contains("missing")),
        "{status}"
    );
}

#[test]
fn explain_lists_every_ingredient_of_the_recipe() {
    let p = Project::small();
    p.ok(&["run"]);
    let out = p.ok(&["explain", "tokens"]);
    assert!(out.contains("stage    tokenize v1"), "{out}");
    assert!(out.contains("\"vocab_size\":300"), "{out}");
    assert!(
        out.contains("\"seed\":1337"),
        "defaults are part of the recipe: {out}"
    );
    assert!(out.contains("file     corpus: docs.jsonl blake3"), "{out}");
    let stats = p.ok(&["explain", "token_stats"]);
    assert!(
        stats.contains("input    tokens = node 'tokens', content"),
        "{stats}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&p.ok(&["explain", "tokens", "--json"])).unwrap();
    assert_eq!(json["ingredients"]["params"]["vocab_size"], 300);
}

#[test]
fn show_prints_manifest_schema_and_rows() {
    let p = Project::small();
    p.ok(&["run"]);
    let out = p.ok(&["show", "tokens", "--rows", "3"]);
    assert!(
        out.contains("val.parquet: position Int64, token UInt16, doc UInt32, bytes UInt8"),
        "{out}"
    );
    assert!(out.contains("| position | token | doc | bytes |"), "{out}");
    let manifest: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "tokens", "--json"])).unwrap();
    assert_eq!(manifest["stage"], "tokenize");
    assert!(manifest["files"]["val.parquet"]["rows"].as_u64().unwrap() > 1000);
}

#[test]
fn sql_answers_in_three_formats_and_refuses_writes() {
    let p = Project::small();
    p.ok(&["run"]);
    let csv = p.ok(&[
        "sql",
        "--format",
        "csv",
        "SELECT count(*) AS n FROM tokens.vocab",
    ]);
    assert_eq!(csv.trim(), "n\n300");
    let json = p.ok(&[
        "sql",
        "--format",
        "json",
        "SELECT count(*) AS n FROM token_stats",
    ]);
    assert_eq!(json.trim(), r#"[{"n":300}]"#);
    let table = p.ok(&["sql", "SELECT stage, current FROM artifacts ORDER BY stage"]);
    assert!(table.contains("| token-stats | true    |"), "{table}");
    for statement in [
        "CREATE TABLE x AS SELECT 1",
        "INSERT INTO val VALUES (1, 1, 1, 1)",
        "COPY val TO 'out.csv'",
        "DROP TABLE val",
    ] {
        let line = p.fails(&["sql", statement]);
        assert!(line.contains("read-only"), "{statement}: {line}");
    }
    assert!(!p.path().join("out.csv").exists());
    // An error raised while a constant is folded says what failed, not which optimizer
    // rule noticed it.
    for query in [
        "SELECT CAST('abc' AS INT)",
        "SELECT CAST('abc' AS INT) FROM tokens.vocab",
    ] {
        let line = p.fails(&["sql", query]);
        assert!(
            line.contains("Cannot cast string 'abc' to value of Int32 type")
                && !line.contains("Optimizer rule"),
            "{query}: {line}"
        );
    }
}

/// A reader that stops early (`cachemoney sql … | head -1`) ends the command quietly and
/// successfully: the closed pipe is a write error handled like any other, not a signal.
#[test]
fn a_reader_that_stops_early_ends_the_command_quietly() {
    use std::io::{BufRead, BufReader};
    let p = Project::small();
    p.ok(&["run"]);
    for args in [
        vec!["sql", "SELECT * FROM val"],
        vec!["sql", "--format", "csv", "SELECT * FROM val"],
        vec!["stages"],
    ] {
        let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("cachemoney"))
            .current_dir(p.path())
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(!first.is_empty(), "{args:?}");
        // The reader is dropped here, as `head -1` exits.
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {:?} {stderr}", out.status);
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

#[test]
fn the_prompt_reads_statements_and_backslash_commands() {
    let p = Project::small();
    p.ok(&["run"]);
    let out = p
        .cmd()
        .arg("sql")
        .write_stdin("\\d\n\\d val\nSELECT count(*) AS docs\nFROM docs;\n\\q\n")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert!(
        stdout.contains("tokens.val") && stdout.contains("artifacts"),
        "{stdout}"
    );
    assert!(
        stdout.contains("position                 Int64"),
        "{stdout}"
    );
    assert!(stdout.contains("| 12   |"), "{stdout}");
}

#[test]
fn gc_removes_only_what_no_node_points_to() {
    let p = Project::small();
    p.ok(&["run"]);
    p.write_pipeline(&Project::small_pipeline(280));
    p.ok(&["run"]);
    // By default `gc` keeps each node's last unreferenced build; these flags remove all.
    let dry = p.ok(&["gc", "--dry-run", "--keep", "0", "--grace", "0"]);
    assert!(dry.contains("would free 2 artifact(s)"), "{dry}");
    p.ok(&["gc", "--keep", "0", "--grace", "0"]);
    let left = p.sql("SELECT count(*) AS n FROM artifacts");
    assert_eq!(left.lines().nth(1).unwrap(), "2");
    assert!(p.ok(&["run"]).contains("2 reused"));
    assert!(p.ok(&["verify"]).contains("ok: 2 artifact(s)"));
}

#[test]
fn output_does_not_depend_on_the_thread_count() {
    let a = Project::small();
    let b = Project::small();
    std::fs::copy(
        a.path().join("corpus/docs.jsonl"),
        b.path().join("corpus/docs.jsonl"),
    )
    .unwrap();
    a.ok(&["run", "--threads", "1"]);
    b.ok(&["run", "--threads", "2"]);
    let content = |p: &Project| p.sql("SELECT stage, content_hash FROM artifacts ORDER BY stage");
    assert_eq!(content(&a), content(&b));
}

#[test]
fn stages_lists_kinds_and_defaults() {
    let p = Project::small();
    let out = p.ok(&["stages"]);
    assert!(
        out.contains("tokenize (v1)") && out.contains("params.vocab_size"),
        "{out}"
    );
    assert!(out.contains("token-stats (v1)"), "{out}");
    // What each stage reads and writes.
    assert!(
        out.contains("    pass1        reads pass1(position, model_p, entropy, bytes)\n"),
        "{out}"
    );
    assert!(
        out.contains("  outputs:\n    scores(position i64, token u16, model_p f32, p_ngram f64, p_final f64, bits f64 (derived), bytes u8)\n"),
        "{out}"
    );
    // pass1's parameters, one set per model.
    assert!(
        out.contains("  params.model = \"gpt\"\n    params.batch                  default 32\n"),
        "{out}"
    );
    // What `run --seeds` varies and tabulates.
    assert!(
        out.contains("  run seed: params.seed (set per seed by --seeds)\n  metrics: final_val_bpb"),
        "{out}"
    );
    assert!(
        out.contains("  metrics: ngram_bpb, final_bpb, alpha_high, entropy_thresh"),
        "{out}"
    );
}

/// Each stage declares the tables (with columns) and files it reads from each input and
/// what it produces, so a wiring mistake is caught when `pipeline.toml` is loaded, at
/// the input's own line, before anything runs.
#[test]
fn wiring_mistakes_fail_at_load_with_line_and_column() {
    let p = Project::small();
    let good = Project::small_pipeline(300)
        + "\n[nodes.pass1]\nstage = \"pass1\"\ninputs.tokens = \"tokens\"\n"
        + &Project::cache_chain(65536);
    let line_of = |text: &str, needle: &str| {
        1 + text
            .lines()
            .position(|l| l == needle)
            .unwrap_or_else(|| panic!("no line {needle:?}"))
    };
    let cases = [
        (
            "inputs.pass1 = \"pass1\"\ninputs.cache = \"cache\"\n\n[nodes.scores]",
            "inputs.pass1 = \"cache\"\ninputs.cache = \"cache\"\n\n[nodes.scores]",
            "inputs.pass1 = \"cache\"",
            "node 'calibration': input 'pass1' expects a table pass1(position, model_p, entropy, bytes); node 'cache' (cache) produces matches, cache_stats, cache.json",
        ),
        (
            "inputs.calibration = \"calibration\"",
            "inputs.calibration = \"pass1\"",
            "inputs.calibration = \"pass1\"",
            "node 'scores': input 'calibration' expects a file calibration.json; node 'pass1' (pass1) produces pass1, distributions",
        ),
        (
            "[nodes.cache]\nstage = \"cache\"\ninputs.tokens = \"tokens\"",
            "[nodes.cache]\nstage = \"cache\"\ninputs.tokens = \"token_stats\"",
            "inputs.tokens = \"token_stats\"",
            "node 'cache': input 'tokens' expects a table val(token, bytes); node 'token_stats' (token-stats) produces token_counts",
        ),
    ];
    let before = p.store_snapshot();
    for (from, to, line, message) in cases {
        assert!(good.contains(from), "{from}");
        let wrong = good.replacen(from, to, 1);
        p.write_pipeline(&wrong);
        let column = 1 + line.find('"').unwrap();
        let at = format!("pipeline.toml:{}:{column}: ", line_of(&wrong, line));
        for command in [&["status"][..], &["run", "--quiet"]] {
            let error = p.fails(command);
            assert!(
                error.contains(&format!("{at}{message}")),
                "{error}\nwanted {at}{message}"
            );
        }
    }
    // What the declaration cannot say, the stage checks at load too: the GPT source
    // without a model to score with.
    p.write_pipeline(&good.replace(
        "[nodes.pass1]\nstage = \"pass1\"\n",
        "[nodes.pass1]\nstage = \"pass1\"\nparams.model = \"gpt\"\n",
    ));
    let error = p.fails(&["status"]);
    assert!(
        error.contains("pipeline.toml:")
            && error.ends_with("node 'pass1': model = \"gpt\" needs inputs.model (a train node)"),
        "{error}"
    );
    assert_eq!(
        p.store_snapshot(),
        before,
        "a refused pipeline changed the store"
    );
    p.write_pipeline(&good);
    p.ok(&["run", "--quiet"]);
}
