//! Bad input: one line naming the file and the problem, a non-zero exit, and a store
//! exactly as it was before.

use crate::common;

use common::{sp_model, write_jsonl, Project};

/// A project with one good run already in its store, so "unchanged" is a real claim.
fn project_with_history() -> Project {
    let p = Project::small();
    p.ok(&["run"]);
    p
}

/// Runs `run` with `pipeline`, expects failure, checks the store did not change.
fn run_fails(p: &Project, pipeline: &str) -> String {
    let before = p.store_snapshot();
    p.write_pipeline(pipeline);
    let line = p.fails(&["run"]);
    assert_eq!(before, p.store_snapshot(), "store changed after: {line}");
    line
}

fn shard_pipeline(val: &str, vocab_size: usize) -> String {
    format!(
        r#"[nodes.tokens]
stage = "tokenize"
files.val = ["{val}"]
files.tokenizer = "{}"
params.source = "shards"
params.vocab_size = {vocab_size}
params.val_truncate_multiple = 16
"#,
        sp_model().display()
    )
}

fn shard_bytes(tokens: &[u16]) -> Vec<u8> {
    let mut bytes = vec![0u8; 1024];
    bytes[0..4].copy_from_slice(&20240520i32.to_le_bytes());
    bytes[4..8].copy_from_slice(&1i32.to_le_bytes());
    bytes[8..12].copy_from_slice(&(tokens.len() as i32).to_le_bytes());
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    bytes
}

fn good_tokens() -> Vec<u16> {
    (0..100)
        .map(|i| if i % 25 == 0 { 1 } else { 300 + i as u16 })
        .collect()
}

#[test]
fn shard_errors_name_the_file_and_the_problem() {
    let p = project_with_history();
    let good = shard_bytes(&good_tokens());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated.bin",
            good[..good.len() - 10].to_vec(),
            "truncated shard: 1214 bytes, header declares 100 tokens = 1224 bytes",
        ),
        (
            "short.bin",
            good[..500].to_vec(),
            "truncated shard: 500 bytes, shorter than the 1024-byte header",
        ),
        (
            "magic.bin",
            {
                let mut b = good.clone();
                b[0] ^= 1;
                b
            },
            "wrong magic number 20240521",
        ),
        (
            "version.bin",
            {
                let mut b = good.clone();
                b[4] = 7;
                b
            },
            "unsupported shard version 7",
        ),
        (
            "padded.bin",
            {
                let mut b = good.clone();
                b.extend_from_slice(&[0; 6]);
                b
            },
            "shard size does not match its header",
        ),
        (
            "vocab.bin",
            shard_bytes(&[1, 5, 2000, 7]),
            "token id 2000 at token index 2 is outside the vocabulary",
        ),
    ];
    for (name, bytes, expected) in cases {
        std::fs::write(p.path().join(name), bytes).unwrap();
        let line = run_fails(&p, &shard_pipeline(name, 1024));
        assert!(line.contains(name), "{name}: {line}");
        assert!(line.contains(expected), "{name}: {line}");
    }
}

#[test]
fn a_model_whose_vocabulary_does_not_match_is_refused() {
    let p = project_with_history();
    std::fs::write(p.path().join("ok.bin"), shard_bytes(&good_tokens())).unwrap();
    let line = run_fails(&p, &shard_pipeline("ok.bin", 512));
    assert!(line.contains("fineweb_1024_bpe.model"), "{line}");
    assert!(line.contains("mismatched vocab sizes"), "{line}");
}

#[test]
fn a_file_that_is_not_a_sentencepiece_model_is_refused() {
    let p = project_with_history();
    std::fs::write(p.path().join("ok.bin"), shard_bytes(&good_tokens())).unwrap();
    std::fs::write(p.path().join("fake.model"), b"\xff\xff\xff not a protobuf").unwrap();
    let pipeline =
        shard_pipeline("ok.bin", 1024).replace(&sp_model().display().to_string(), "fake.model");
    let line = run_fails(&p, &pipeline);
    assert!(
        line.contains("fake.model") && line.contains("not a SentencePiece model"),
        "{line}"
    );
}

fn text_pipeline(pattern: &str, val_fraction: f64) -> String {
    format!(
        "[nodes.tokens]\nstage = \"tokenize\"\nfiles.corpus = [\"{pattern}\"]\nparams.vocab_size = 300\nparams.val_fraction = {val_fraction}\n"
    )
}

#[test]
fn an_empty_corpus_is_refused() {
    let p = project_with_history();
    std::fs::write(p.path().join("empty.jsonl"), "\n\n").unwrap();
    let line = run_fails(&p, &text_pipeline("empty.jsonl", 0.1));
    assert!(
        line.contains("empty.jsonl") && line.contains("empty corpus"),
        "{line}"
    );
}

#[test]
fn a_corpus_whose_val_split_is_empty_is_refused() {
    let p = project_with_history();
    write_jsonl(
        &p.path().join("three.jsonl"),
        &common::small_documents(3, 2000),
    );
    let line = run_fails(&p, &text_pipeline("three.jsonl", 0.1));
    assert!(
        line.contains("three.jsonl") && line.contains("the val split is empty"),
        "{line}"
    );
}

#[test]
fn non_utf8_text_names_the_file_and_byte_offset() {
    let p = project_with_history();
    let mut bytes = b"Chapter 1. It was a dark and stormy night".to_vec();
    bytes.push(0xC3); // a lead byte with no continuation
    bytes.extend_from_slice(b" and more");
    std::fs::write(p.path().join("latin1.txt"), bytes).unwrap();
    let line = run_fails(&p, &text_pipeline("latin1.txt", 0.1));
    assert!(
        line.contains("latin1.txt") && line.contains("not valid UTF-8 at byte offset 41"),
        "{line}"
    );
}

#[test]
fn a_missing_file_is_named() {
    let p = project_with_history();
    let line = run_fails(&p, &text_pipeline("nowhere/corpus.jsonl", 0.1));
    assert!(
        line.contains("pipeline.toml:3:")
            && line.contains("'nowhere/corpus.jsonl' matches no file"),
        "{line}"
    );
}

/// A file whose name has brackets is a glob's character class when written as it is: the
/// message says how to write it, and the written form works.
#[test]
fn a_file_name_with_brackets_gets_a_hint_how_to_write_it() {
    let p = project_with_history();
    let text = std::fs::read_to_string(
        p.path()
            .join("corpus")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
    )
    .unwrap();
    std::fs::write(p.path().join("notes[1].jsonl"), &text).unwrap();
    let line = run_fails(&p, &text_pipeline("notes[1].jsonl", 0.1));
    assert!(
        line.contains("pipeline.toml:3:")
            && line.contains("'notes[1].jsonl' matches no file")
            && line.contains("'[' and ']' are glob characters")
            && line.contains("matched by 'notes[[]1[]].jsonl'"),
        "{line}"
    );
    p.write_pipeline(&text_pipeline("notes[[]1[]].jsonl", 0.1));
    p.ok(&["status"]);
}

#[test]
fn malformed_pipeline_gives_line_and_column() {
    let p = project_with_history();
    let line = run_fails(
        &p,
        "[nodes.tokens]\nstage = \"tokenize\"\nparams.vocab_size = = 3\n",
    );
    assert!(line.contains("pipeline.toml:3:"), "{line}");
}

#[test]
fn unknown_stage_kind_is_named_with_the_known_ones() {
    let p = project_with_history();
    let line = run_fails(&p, "[nodes.tokens]\nstage = \"tokenise\"\n");
    assert!(line.contains("pipeline.toml:2:9"), "{line}");
    assert!(
        line.contains("unknown stage kind 'tokenise' (known: artifact, audit-mass, cache, calibrate, command, hints, legality, overlap, pass1, pass2, perturb, tilt, token-stats, tokenize, train)"),
        "{line}"
    );
}

#[test]
fn an_unknown_parameter_of_a_flattened_set_is_named_once() {
    let p = project_with_history();
    let line = run_fails(
        &p,
        "[nodes.tokens]\nstage = \"tokenize\"\nfiles.corpus = \"corpus/*.jsonl\"\n\n[nodes.cache]\nstage = \"cache\"\ninputs.tokens = \"tokens\"\ninputs.pass1 = \"tokens\"\nparams.ngram_bukets = 5\n",
    );
    assert!(
        line.contains("pipeline.toml:9:")
            && line.contains("node 'cache': params.ngram_bukets: unknown field `ngram_bukets`"),
        "{line}"
    );
}

#[test]
fn an_integer_past_64_bits_is_said_to_be_one() {
    let p = project_with_history();
    let line = run_fails(
        &p,
        "[nodes.tokens]\nstage = \"tokenize\"\nfiles.corpus = \"corpus/*.jsonl\"\nparams.vocab_size = 18446744073709551616\n",
    );
    assert!(
        line.contains("pipeline.toml:4:")
            && line.contains("the integer 18446744073709551616 is out of range: TOML integers are 64-bit signed (-9223372036854775808 to 9223372036854775807)"),
        "{line}"
    );
}

#[test]
fn unknown_parameter_is_named() {
    let p = project_with_history();
    let line = run_fails(&p, "[nodes.tokens]\nstage = \"tokenize\"\nfiles.corpus = \"corpus/*.jsonl\"\nparams.vocab = 300\n");
    assert!(
        line.contains("pipeline.toml:") && line.contains("unknown field `vocab`"),
        "{line}"
    );
}

#[test]
fn a_cycle_is_named() {
    let p = project_with_history();
    let line = run_fails(
        &p,
        "[nodes.a]\nstage = \"token-stats\"\ninputs.tokens = \"b\"\n[nodes.b]\nstage = \"token-stats\"\ninputs.tokens = \"a\"\n",
    );
    assert!(line.contains("cycle in the DAG: a → b → a"), "{line}");
}

#[test]
fn a_tampered_artifact_is_found_by_verify_and_refused_as_an_input() {
    let p = project_with_history();
    assert!(p.ok(&["verify"]).contains("ok: 2 artifact(s)"));
    let val = std::fs::read_dir(p.path().join("artifacts/tokenize"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("val.parquet");
    let mut bytes = std::fs::read(&val).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55; // same size: only a rehash can tell
    std::fs::write(&val, bytes).unwrap();

    let out = p.run(&["verify"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("val.parquet: content hash")
            && stderr.contains("differs from the manifest"),
        "{stderr}"
    );

    // A stage is never handed a corrupt input: `audit`, which rebuilds from the stored
    // inputs without repairing them, is refused.
    let line = p.fails(&["audit", "token_stats"]);
    assert!(
        line.contains("input 'tokens' (node 'tokens') is corrupt") && line.contains("val.parquet"),
        "{line}"
    );
    assert!(line.contains("cachemoney run --force tokens"), "{line}");

    // `run` repairs the damaged upstream before building from it.
    let out = p.ok(&["run", "--force", "token_stats"]);
    assert!(out.contains("rebuilt, repaired"), "{out}");
    assert!(p.ok(&["verify"]).contains("ok:"));
}

/// A pass-1's parameters are one set per `model`, read through a tagged enum, which loses
/// the path of a bad value: the message still names the parameter, at its line.
#[test]
fn a_pass1_parameter_of_the_wrong_type_or_value_is_named_at_its_line() {
    let p = project_with_history();
    let head = "[nodes.tokens]\nstage = \"tokenize\"\nfiles.corpus = \"corpus/*.jsonl\"\n\n[nodes.pass1]\nstage = \"pass1\"\ninputs.tokens = \"tokens\"\nparams.model = \"bigram\"\n";
    for (line_text, want) in [
        (
            "params.mass_sample = -5",
            "params.mass_sample: invalid value: integer `-5`, expected usize",
        ),
        (
            "params.temperature = \"hot\"",
            "params.temperature: invalid type: string \"hot\", expected f64",
        ),
    ] {
        let line = run_fails(&p, &format!("{head}params.add_k = 0.1\n{line_text}\n"));
        assert!(
            line.contains("pipeline.toml:10:") && line.contains(&format!("node 'pass1': {want}")),
            "{line}"
        );
    }
    // calibrate's fraction, checked like every other bound, at its line too.
    let line = run_fails(
        &p,
        "[nodes.tokens]\nstage = \"tokenize\"\nfiles.corpus = \"corpus/*.jsonl\"\n\n[nodes.calibration]\nstage = \"calibrate\"\ninputs.pass1 = \"tokens\"\ninputs.cache = \"tokens\"\nparams.fraction = 1.5\n",
    );
    assert!(
        line.contains("pipeline.toml:9:") && line.contains("params.fraction: 1.5 is outside 0..=1"),
        "{line}"
    );
}
