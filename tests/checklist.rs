//! The reviewer's checklist beyond C1–C4: the `overlap` probe (the val set in the
//! training data) and the `artifact` probe (model and code against the size limit), shown
//! by the legality judge that wires them.

use crate::common;

use std::path::Path;

use arrow::datatypes::{UInt16Type, UInt32Type};
use common::Project;

const JUDGE: &str = r#"
[nodes.pass1]
stage = "pass1"
inputs.tokens = "tokens"
params.model = "bigram"

[nodes.overlap]
stage = "overlap"
inputs.tokens = "tokens"

[nodes.judge]
stage = "legality"
inputs.tokens = "tokens"
inputs.chain = "pass1"
inputs.overlap = "overlap"
"#;

/// A shard in the challenge's format (256 int32 header words, then u16 tokens).
fn write_shard(path: &Path, tokens: &[u16]) {
    let mut bytes = vec![0u8; 1024];
    bytes[0..4].copy_from_slice(&20240520i32.to_le_bytes());
    bytes[4..8].copy_from_slice(&1i32.to_le_bytes());
    bytes[8..12].copy_from_slice(&(tokens.len() as i32).to_le_bytes());
    bytes.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
    std::fs::write(path, bytes).unwrap();
}

/// Seeded filler tokens below `vocab`.
fn filler(n: usize, vocab: u16, seed: u64) -> Vec<u16> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u16
        })
        .collect()
}

/// The val stream's documents, as token lists.
fn val_documents(p: &Project) -> Vec<Vec<u16>> {
    let val = p.the_artifact("tokenize").join("val.parquet");
    let tokens = stage_api::read_column::<UInt16Type>(&val, "token").unwrap();
    let doc = stage_api::read_column::<UInt32Type>(&val, "doc").unwrap();
    let mut docs: Vec<Vec<u16>> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        if i == 0 || doc[i] != doc[i - 1] {
            docs.push(Vec::new());
        }
        docs.last_mut().unwrap().push(*t);
    }
    docs
}

#[test]
fn an_honest_split_passes_overlap_and_val_documents_in_a_train_shard_fail_it() {
    let p = Project::small();
    p.write_pipeline(&(Project::small_pipeline(300) + JUDGE));
    p.ok(&["run"]);
    let verdicts = p.ok(&["legality"]);
    assert!(verdicts.contains("overlap"), "{verdicts}");
    assert!(verdicts.contains("every probe passed"), "{verdicts}");
    let overlap = p.ok(&["show", "overlap"]);
    assert!(overlap.contains("documents_in_train"), "{overlap}");

    // The scorer's training data, declared as a shard: filler with two of the three val
    // documents copied into it.
    let docs = val_documents(&p);
    assert!(docs.len() >= 3, "{} val documents", docs.len());
    let mut train = filler(200_000, 300, 7);
    train.splice(50_000..50_000, docs[0].iter().copied());
    train.splice(120_000..120_000, docs[2].iter().copied());
    write_shard(&p.path().join("train_000.bin"), &train);
    p.write_pipeline(
        &(Project::small_pipeline(300)
            + &JUDGE.replace(
                "[nodes.overlap]\nstage = \"overlap\"\ninputs.tokens = \"tokens\"\n",
                "[nodes.overlap]\nstage = \"overlap\"\ninputs.tokens = \"tokens\"\nparams.train_split = false\nfiles.train = [\"train_*.bin\"]\n",
            )),
    );
    p.ok(&["run"]);
    let out = p.run(&["legality"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let evidence = text
        .lines()
        .find(|l| l.starts_with("pass1 overlap:"))
        .unwrap_or_else(|| panic!("no overlap evidence:\n{text}"));
    let expected = format!("2 of {} val documents", docs.len());
    assert!(evidence.contains(&expected), "{evidence}");
    assert!(
        evidence.contains("the training data holds the val set"),
        "{evidence}"
    );
    let listed = p.sql("SELECT count(*) FROM overlap.overlap WHERE in_train");
    assert_eq!(listed.lines().nth(1), Some("2"), "{listed}");
}

/// The issue's scale: 100M training tokens in two shards, streamed past the val index.
#[test]
fn overlap_streams_a_hundred_million_train_tokens() {
    let p = Project::small();
    p.write_pipeline(&Project::small_pipeline(300));
    p.ok(&["run"]);
    let docs = val_documents(&p);
    for (i, seed) in [(0usize, 11u64), (1, 13)] {
        let mut train = filler(50_000_000, 300, seed);
        // Document 0 in the first shard, near its end; document 2 in the second.
        let (doc, at) = [(0usize, 49_000_000usize), (2, 10)][i];
        train[at..at + docs[doc].len()].copy_from_slice(&docs[doc]);
        write_shard(&p.path().join(format!("big_{i}.bin")), &train);
    }
    p.write_pipeline(
        &(Project::small_pipeline(300)
            + "\n[nodes.overlap]\nstage = \"overlap\"\ninputs.tokens = \"tokens\"\nparams.train_split = false\nfiles.train = [\"big_*.bin\"]\n"),
    );
    p.ok(&["run"]);
    let report = p.ok(&["show", "overlap"]);
    assert!(report.contains("100000000"), "{report}");
    let found = p.sql("SELECT doc FROM overlap.overlap WHERE in_train ORDER BY doc");
    let found: Vec<&str> = found.lines().skip(1).collect();
    let val = p.the_artifact("tokenize").join("val.parquet");
    let doc_ids = stage_api::read_column::<UInt32Type>(&val, "doc").unwrap();
    let mut ids = doc_ids.clone();
    ids.dedup();
    let expected = [ids[0].to_string(), ids[2].to_string()];
    assert_eq!(
        found,
        expected.iter().map(String::as_str).collect::<Vec<_>>()
    );
}

#[test]
fn the_artifact_probe_counts_code_and_weights_against_the_limit() {
    let p = Project::small();
    std::fs::write(p.path().join("scorer.py"), "x".repeat(600)).unwrap();
    std::fs::write(p.path().join("weights.bin"), vec![7u8; 500]).unwrap();
    let pipeline = |limit: u64| {
        Project::small_pipeline(300)
            + &JUDGE.replace(
                "inputs.overlap = \"overlap\"",
                "inputs.artifact = \"artifact\"",
            )
            + &format!(
                "\n[nodes.artifact]\nstage = \"artifact\"\nfiles.code = [\"scorer.py\"]\nfiles.weights = [\"weights.bin\"]\nparams.limit = {limit}\n"
            )
    };
    p.write_pipeline(&pipeline(1_100));
    p.ok(&["run"]);
    assert!(p.ok(&["legality"]).contains("every probe passed"));
    p.write_pipeline(&pipeline(1_000));
    p.ok(&["run"]);
    let out = p.run(&["legality"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("pass1 artifact: 100 bytes over: 1100 bytes against the limit of 1000: scorer.py 600 + weights.bin 500"),
        "{text}"
    );
    // Nothing to count is a wiring error, before anything runs.
    p.write_pipeline(
        &(Project::small_pipeline(300) + "\n[nodes.artifact]\nstage = \"artifact\"\n"),
    );
    let err = p.fails(&["run"]);
    assert!(err.contains("nothing to count"), "{err}");
}

#[test]
fn a_corrupt_train_shard_is_a_one_line_error_naming_it() {
    let p = Project::small();
    let mut bytes = vec![0u8; 1024];
    bytes[0..4].copy_from_slice(&20240520i32.to_le_bytes());
    bytes[4..8].copy_from_slice(&1i32.to_le_bytes());
    bytes[8..12].copy_from_slice(&1000i32.to_le_bytes());
    bytes.extend([1u8; 100]); // 50 tokens where the header promises 1,000
    std::fs::write(p.path().join("train_000.bin"), bytes).unwrap();
    p.write_pipeline(
        &(Project::small_pipeline(300)
            + "\n[nodes.overlap]\nstage = \"overlap\"\ninputs.tokens = \"tokens\"\nfiles.train = [\"train_*.bin\"]\n"),
    );
    let err = p.fails(&["run", "--until", "overlap"]);
    assert!(err.contains("train_000.bin"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // The tokens were built; nothing of the overlap node was committed.
    let store = p.store_snapshot();
    assert!(
        store.keys().any(|k| k.starts_with("tokenize/")),
        "{store:?}"
    );
    assert!(!store.keys().any(|k| k.starts_with("overlap")), "{store:?}");
}

/// The `artifact` node told which pass-1 runs the scorer: everything that scorer declares
/// it loads must be counted, or the size cannot be verified.
#[test]
fn the_artifact_probe_counts_what_the_scorer_declares_it_loads() {
    let p = Project::small();
    let root = common::repo_root();
    for shared in ["examples", ".venv"] {
        std::os::unix::fs::symlink(root.join(shared), p.path().join(shared)).unwrap();
    }
    std::fs::write(p.path().join("weights.bin"), vec![7u8; 5_000]).unwrap();
    let pipeline = |weights: &str| {
        format!(
            r#"{}
[nodes.scorer]
stage = "pass1"
inputs.tokens = "tokens"
params.model = "command"
params.command = [".venv/bin/python", "examples/scorers/bigram_numpy.py", "1.0", "0.1"]
files.scorer = ["examples/scorers/bigram_numpy.py", "weights.bin"]

[nodes.artifact]
stage = "artifact"
inputs.scorer = "scorer"
files.code = ["examples/scorers/bigram_numpy.py"]
{weights}

[nodes.judge]
stage = "legality"
inputs.tokens = "tokens"
inputs.chain = "scorer"
inputs.artifact = "artifact"
"#,
            Project::small_pipeline(300)
        )
    };
    p.write_pipeline(&pipeline(""));
    p.ok(&["run", "--quiet"]);
    let out = p.run(&["legality"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("scorer artifact: cannot be verified: the scorer loads weights.bin (its files.scorer), which files.code and files.weights do not hold"),
        "{text}"
    );
    p.write_pipeline(&pipeline("files.weights = [\"weights.bin\"]"));
    p.ok(&["run", "--quiet"]);
    let text = p.ok(&["legality"]);
    assert!(text.contains("every probe passed"), "{text}");
}
