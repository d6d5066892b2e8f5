//! No silent wrong answers: damaged data never produces a number, names cannot escape the
//! store, big numbers are refused with a sentence, and the commands behave in scripts.

use crate::common;

use std::path::PathBuf;
use std::process::Stdio;

use common::Project;

fn built() -> Project {
    let p = Project::small();
    p.ok(&["run"]);
    p
}

/// The one artifact directory of `stage`.
fn artifact_dir(p: &Project, stage: &str) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(p.path().join("artifacts").join(stage))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs.into_iter().next().unwrap()
}

/// Changes one byte in the middle of `path`, then puts its size and mtime back, as an
/// in-place edit by another tool would: only the ctime tells.
fn flip_byte_keeping_mtime(path: &std::path::Path) {
    let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(path, &bytes).unwrap();
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
}

fn sh(p: &Project, script: &str) -> std::process::Output {
    let bin = assert_cmd::cargo::cargo_bin("cachemoney");
    std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .env("CACHEMONEY", bin)
        .current_dir(p.path())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

// ---- 1. Damaged data never produces a number ----------------------------------------

#[test]
fn a_damaged_table_gives_no_number_anywhere_and_run_repairs_it() {
    let p = built();
    let query = "SELECT sum(token) AS total FROM val";
    let good = p.sql(query);
    let val = artifact_dir(&p, "tokenize").join("val.parquet");
    flip_byte_keeping_mtime(&val);

    let status = p.ok(&["status"]);
    let line = status.lines().find(|l| l.starts_with("tokens")).unwrap();
    assert!(
        line.contains("damaged") && line.contains("val.parquet"),
        "{status}"
    );
    // Downstream artifacts are intact and still readable.
    assert!(status.contains("token_stats"), "{status}");

    let error = p.fails(&["sql", query]);
    assert!(
        error.contains("val.parquet") && error.contains("cachemoney run --force tokens"),
        "{error}"
    );
    // One damaged table does not break queries that do not read it.
    p.sql("SELECT count(*) FROM token_stats");

    let error = p.fails(&["show", "tokens"]);
    assert!(error.contains("val.parquet"), "{error}");

    let audit = p.run(&["audit", "tokens"]);
    let stdout = String::from_utf8_lossy(&audit.stdout);
    assert!(!audit.status.success(), "{stdout}");
    assert!(
        stdout.contains("DIFFERS")
            && stdout.contains("val.parquet: the rebuild matches the manifest, but the stored file no longer matches its manifest"),
        "{stdout}"
    );

    let run = p.ok(&["run"]);
    assert!(run.contains("rebuilt, repaired"), "{run}");
    assert!(
        run.contains("token_stats") && run.contains("reused"),
        "{run}"
    );
    assert_eq!(p.sql(query), good);
}

#[test]
fn a_deleted_file_and_a_damaged_footer_are_named() {
    let p = built();
    let stats = artifact_dir(&p, "token-stats");
    let table = std::fs::read_dir(&stats)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|f| f.extension().is_some_and(|x| x == "parquet"))
        .unwrap();
    std::fs::remove_file(&table).unwrap();
    let status = p.ok(&["status"]);
    assert!(
        status.contains("damaged") && status.contains("missing"),
        "{status}"
    );
    p.ok(&["run"]);

    // A footer cut short: the manifest's size no longer matches, and no Parquet error
    // without a file name reaches the user.
    let val = artifact_dir(&p, "tokenize").join("val.parquet");
    let bytes = std::fs::read(&val).unwrap();
    std::fs::write(&val, &bytes[..bytes.len() - 3]).unwrap();
    let error = p.fails(&["sql", "SELECT count(*) FROM val"]);
    assert!(
        error.contains("val.parquet") && error.contains("size"),
        "{error}"
    );
}

#[test]
fn an_input_edited_in_place_with_its_mtime_restored_makes_the_node_stale() {
    let p = built();
    flip_byte_keeping_mtime(&p.path().join("corpus/docs.jsonl"));
    let status = p.ok(&["status"]);
    let line = status.lines().find(|l| l.starts_with("tokens")).unwrap();
    assert!(
        line.contains("stale") && line.contains("corpus"),
        "{status}"
    );
}

// ---- 2. Names are validated; nothing is written outside the store -------------------

#[test]
fn node_names_outside_the_grammar_are_refused_at_their_line() {
    let p = built();
    let outside = p.path().parent().unwrap().join("escape.json");
    for name in [
        "\"../../escape\"",
        "\"x/y\"",
        "\"\"",
        "Model",
        "pass-1",
        "\"a.b\"",
        "table",
    ] {
        let before = p.store_snapshot();
        p.write_pipeline(&format!(
            "[nodes.tokens]\nstage = \"tokenize\"\nfiles.corpus = [\"corpus/*.jsonl\"]\n\n[nodes.{name}]\nstage = \"token-stats\"\ninputs.tokens = \"tokens\"\n"
        ));
        let error = p.fails(&["run"]);
        assert!(
            error.contains("pipeline.toml:5:") && error.contains("node name"),
            "{name}: {error}"
        );
        assert_eq!(before, p.store_snapshot(), "{name}");
    }
    assert!(!outside.exists());
}

// ---- 3. Big numbers are refused, not fatal ----------------------------------------------

fn cache_pipeline(params: &str) -> String {
    Project::small_pipeline(300)
        + &format!("\n[nodes.cache]\nstage = \"cache\"\ninputs.tokens = \"tokens\"\n{params}\n")
}

#[test]
fn size_parameters_have_stated_bounds() {
    let p = built();
    let cases = [
        (
            "params.ngram_buckets = 1099511627776",
            "ngram buckets = 1099511627776 is more than 2147483648",
        ),
        ("params.ngram_buckets = 1000", "is not a power of two"),
        ("params.phrase_lengths = [100000, 16]", "1..=4096"),
    ];
    for (line, expected) in cases {
        p.write_pipeline(&cache_pipeline(line));
        let error = p.fails(&["status"]);
        assert!(error.contains(expected), "{line}: {error}");
    }
    let pass1 = |params: &str| {
        Project::small_pipeline(300)
            + &format!("\n[nodes.pass1]\nstage = \"pass1\"\ninputs.tokens = \"tokens\"\nparams.model = \"bigram\"\n{params}\n")
    };
    for value in ["1099511627776", "1000000000"] {
        p.write_pipeline(&pass1(&format!("params.mass_sample = {value}")));
        let error = p.fails(&["run"]);
        assert!(
            error.contains("pipeline.toml:15:")
                && error.contains("params.mass_sample")
                && error.contains("outside 0..=65536"),
            "{error}"
        );
    }
    for threads in ["100000", "0"] {
        let error = p.fails(&["--threads", threads, "status"]);
        assert!(error.contains("--threads"), "{error}");
    }
}

#[test]
fn a_table_larger_than_memory_is_refused_before_it_is_allocated() {
    let p = built();
    p.write_pipeline(&cache_pipeline("params.ngram_buckets = 2147483648"));
    let error = p.fails(&["--memory-limit", "8G", "run"]);
    assert!(
        error.contains("node 'cache'")
            && error.contains("ngram_buckets = 2147483648")
            && error.contains("only 8.0 GB is available"),
        "{error}"
    );
    // The default limit comes from the machine: an 8 GB address-space cap, as containers
    // and shared machines impose, is read and respected.
    let out = sh(&p, "ulimit -v 8388608 && exec \"$CACHEMONEY\" run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("node 'cache'") && stderr.contains("is available"),
        "{stderr}"
    );
}

// ---- 4. Scriptable and honest commands ----------------------------------------------------

#[test]
fn piped_sql_runs_the_last_statement_and_fails_on_errors() {
    let p = built();
    let out = sh(
        &p,
        "printf 'SELECT 1 AS first;\\n-- a comment\\nSELECT 2 AS last' | \"$CACHEMONEY\" sql",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("first") && stdout.contains("last"),
        "{stdout}"
    );

    let out = sh(
        &p,
        "printf 'SELECT 1 AS fine;\\nSELECT * FROM nowhere;\\nSELECT 3 AS never;\\n' | \"$CACHEMONEY\" sql",
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(!out.status.success());
    assert!(
        stdout.contains("fine") && !stdout.contains("never"),
        "{stdout}"
    );
    assert!(!stdout.contains("error"), "{stdout}");
    assert!(
        stderr.contains("line 2") && stderr.contains("nowhere"),
        "{stderr}"
    );
}

#[test]
fn query_errors_name_the_tables_and_files_they_read() {
    let p = built();
    let error = p.fails(&[
        "sql",
        "SELECT CAST(CAST(token AS VARCHAR) || 'x' AS INT) FROM val",
    ]);
    assert!(
        error.contains("'val'") && error.contains("val.parquet"),
        "{error}"
    );
}

#[test]
fn a_corrupt_manifest_or_a_stray_file_blocks_nothing() {
    let p = built();
    let stats = artifact_dir(&p, "token-stats");
    std::fs::write(stats.join("manifest.json"), b"{ not json").unwrap();
    std::fs::write(p.path().join("artifacts/tokenize/notes.txt"), b"mine").unwrap();

    let status = p.ok(&["status"]);
    assert!(
        status.contains("damaged") && status.contains("corrupt manifest"),
        "{status}"
    );
    let verify = p.run(&["verify"]);
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(!verify.status.success());
    assert!(
        stderr.contains("manifest.json: corrupt manifest") && stderr.contains("notes.txt"),
        "{stderr}"
    );
    p.sql("SELECT count(*) FROM val");

    let dry = p.ok(&["gc", "--dry-run"]);
    assert!(
        dry.contains("would remove") && dry.contains("notes.txt"),
        "{dry}"
    );
    p.ok(&["gc"]);
    assert!(!stats.exists() && !p.path().join("artifacts/tokenize/notes.txt").exists());
    p.ok(&["verify"]);
    let run = p.ok(&["run"]);
    assert!(
        run.contains("token_stats") && run.contains("built"),
        "{run}"
    );
}

/// What is put inside an artifact's directory, or in `refs/`, after the fact is reported
/// by `verify` and collected by `gc`, the artifact itself kept.
#[test]
fn a_stray_file_inside_an_artifact_or_in_refs_is_reported_and_collected() {
    let p = built();
    let stats = artifact_dir(&p, "token-stats");
    let refs = p.path().join("artifacts/refs");
    let strays = [
        stats.join("notes.txt"),
        refs.join("README"),
        refs.join("tokens.tmp-4242"),
    ];
    for stray in &strays {
        std::fs::write(stray, b"mine").unwrap();
    }
    std::fs::write(refs.join("ghost.json"), b"{ half").unwrap();
    let verify = p.run(&["verify"]);
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(!verify.status.success());
    for (name, why) in [
        ("notes.txt", "not in its artifact's manifest"),
        ("README", "a stray file in refs/"),
        ("tokens.tmp-4242", "an interrupted write's leftover"),
        ("ghost.json", "a node record that does not parse"),
    ] {
        assert!(
            stderr.lines().any(|l| l.contains(name) && l.contains(why)),
            "{name}: {stderr}"
        );
    }
    let dry = p.ok(&["gc", "--dry-run"]);
    assert!(
        dry.contains("would remove") && dry.contains("notes.txt"),
        "{dry}"
    );
    p.ok(&["gc"]);
    assert!(strays.iter().all(|s| !s.exists()) && !refs.join("ghost.json").exists());
    assert!(stats.join("manifest.json").exists());
    p.ok(&["verify"]);
    p.ok(&["status"]);
}

/// A truncated manifest: `sql` and `compare` name the damaged artifact instead of saying
/// the table is not there or nothing is built.
#[test]
fn a_truncated_manifest_is_named_by_sql_and_compare() {
    let p = Project::small();
    p.write_pipeline(
        &(Project::small_pipeline(300)
            + "\n[nodes.pass1]\nstage = \"pass1\"\ninputs.tokens = \"tokens\"\nparams.model = \"bigram\"\n"
            + &Project::cache_chain(32768)),
    );
    p.ok(&["run"]);
    let truncate = |stage: &str| {
        let manifest = artifact_dir(&p, stage).join("manifest.json");
        let bytes = std::fs::read(&manifest).unwrap();
        std::fs::write(&manifest, &bytes[..bytes.len() / 2]).unwrap();
    };
    truncate("pass2");
    let line = p.fails(&["compare"]);
    assert!(
        line.contains("no chain of")
            && line.contains("scores: ")
            && line.contains("corrupt manifest"),
        "{line}"
    );
    truncate("tokenize");
    for query in [
        "SELECT count(*) FROM tokens.val",
        "SELECT count(*) FROM val",
    ] {
        let line = p.fails(&["sql", query]);
        assert!(
            line.contains("cannot be read")
                && line.contains("manifest.json: corrupt manifest")
                && line.contains("cachemoney run --force tokens"),
            "{query}: {line}"
        );
    }
    // The scores are stale now (their tokens are damaged): the damage is named.
    let line = p.fails(&["compare"]);
    assert!(
        line.contains("no chain of")
            && line.contains("damaged: tokens: ")
            && line.contains("corrupt manifest"),
        "{line}"
    );
}

#[test]
fn a_run_that_changes_nothing_writes_nothing() {
    let p = built();
    let refs = p.path().join("artifacts/refs");
    let stamps = || -> Vec<(PathBuf, std::time::SystemTime)> {
        let mut v: Vec<_> = std::fs::read_dir(&refs)
            .unwrap()
            .map(|e| {
                let path = e.unwrap().path();
                let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
                (path, modified)
            })
            .collect();
        v.sort();
        v
    };
    let before = stamps();
    std::thread::sleep(std::time::Duration::from_millis(20));
    p.ok(&["run"]);
    assert_eq!(before, stamps());
}

#[test]
fn parameter_errors_name_the_parameter_and_its_own_line() {
    let p = built();
    let pipeline = |line: &str| {
        format!("[nodes.tokens]\nstage = \"tokenize\"\nfiles.corpus = [\"corpus/*.jsonl\"]\nparams.vocab_size = 300\n{line}\nparams.val_fraction = 0.25\n")
    };
    p.write_pipeline(&pipeline("params.seed = \"1337\""));
    let error = p.fails(&["run"]);
    assert!(
        error.contains("pipeline.toml:5:") && error.contains("params.seed: invalid type"),
        "{error}"
    );
    p.write_pipeline(&pipeline("params.text_field = nan"));
    let error = p.fails(&["run"]);
    assert!(
        error.contains("pipeline.toml:5:")
            && error.contains("params.text_field: nan is not a finite number"),
        "{error}"
    );
    p.write_pipeline(&pipeline("params.vocab_size_typo = 3"));
    let error = p.fails(&["run"]);
    assert!(
        error.contains("pipeline.toml:5:") && error.contains("vocab_size_typo"),
        "{error}"
    );
}

#[test]
fn gc_waits_when_asked_and_keeps_recent_builds_by_default() {
    let p = built();
    // Another process holds the lock and has not written who it is.
    let mut holder = std::process::Command::new("flock")
        .arg(p.path().join("artifacts/.lock"))
        .args(["sleep", "2"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let error = p.fails(&["gc"]);
    assert!(
        error.contains("--wait") && !error.contains("held by  "),
        "{error}"
    );
    p.ok(&["gc", "--wait"]);
    holder.wait().unwrap();

    // An edit leaves the old artifacts unreferenced: kept by default, and said so.
    p.write_pipeline(&Project::small_pipeline(280));
    p.ok(&["run"]);
    let gc = p.ok(&["gc"]);
    assert!(
        gc.contains("freed 0 artifact(s)") && gc.contains("kept 2 unreferenced artifact(s)"),
        "{gc}"
    );
    let gc = p.ok(&["gc", "--keep", "0", "--grace", "0"]);
    assert!(gc.contains("freed 2 artifact(s)"), "{gc}");
}
