//! Helpers shared by the integration tests: a throw-away project directory with a small
//! real corpus cut from the embedded sample, and a way to drive the real binary in it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use assert_cmd::Command;

pub mod s3;

/// Live (not zombie) processes whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| {
                    s.rsplit_once(')')
                        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
                })
                .unwrap_or(true);
            !zombie
                && String::from_utf8_lossy(&cmdline)
                    .replace('\0', " ")
                    .contains(marker)
        })
        .collect()
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn sample_corpus() -> PathBuf {
    repo_root().join("data/sample/gutenberg_classics_small.jsonl")
}

pub fn sp_model() -> PathBuf {
    repo_root().join("data/sp1024/fineweb_1024_bpe.model")
}

/// The challenge-format shard fixture (the Gutenberg val shard tokenized with the
/// challenge's SP1024 model), vendored from the project's `shared/data/`.
pub fn shard_fixture() -> PathBuf {
    repo_root().join("tests/fixtures/fineweb-sp1024/gutenberg_classics_val_000000.bin")
}

/// `count` documents of about `bytes` bytes each, cut from the sample books.
pub fn small_documents(count: usize, bytes: usize) -> Vec<String> {
    let text = std::fs::read_to_string(sample_corpus()).unwrap();
    let books: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    (0..count)
        .map(|i| {
            let book = &books[i % books.len()];
            let mut start = ((i / books.len()) * bytes) % book.len();
            while !book.is_char_boundary(start) {
                start += 1;
            }
            let mut end = (start + bytes).min(book.len());
            while !book.is_char_boundary(end) {
                end -= 1;
            }
            book[start..end].to_string()
        })
        .collect()
}

pub fn write_jsonl(path: &Path, docs: &[String]) {
    let body: String = docs
        .iter()
        .map(|d| serde_json::json!({ "text": d }).to_string() + "\n")
        .collect();
    std::fs::write(path, body).unwrap();
}

pub struct Project {
    pub dir: tempfile::TempDir,
}

impl Project {
    /// A project whose pipeline tokenizes 12 small documents with a 300-entry BPE and
    /// counts tokens.
    pub fn small() -> Project {
        let project = Project::empty();
        std::fs::create_dir_all(project.path().join("corpus")).unwrap();
        write_jsonl(
            &project.path().join("corpus/docs.jsonl"),
            &small_documents(12, 20_000),
        );
        project.write_pipeline(&Project::small_pipeline(300));
        project
    }

    pub fn small_pipeline(vocab_size: usize) -> String {
        format!(
            r#"[nodes.tokens]
stage = "tokenize"
files.corpus = ["corpus/*.jsonl"]
params.vocab_size = {vocab_size}
params.val_fraction = 0.25

[nodes.token_stats]
stage = "token-stats"
inputs.tokens = "tokens"
"#
        )
    }

    /// The cache → calibrate → pass2 nodes over nodes `tokens` and `pass1`, with tables
    /// small enough for the test corpus.
    pub fn cache_chain(phrase_buckets: usize) -> String {
        format!(
            r#"
[nodes.cache]
stage = "cache"
inputs.tokens = "tokens"
params.ngram_buckets = 65536
params.phrase_buckets = {phrase_buckets}

[nodes.calibration]
stage = "calibrate"
inputs.pass1 = "pass1"
inputs.cache = "cache"

[nodes.scores]
stage = "pass2"
inputs.tokens = "tokens"
inputs.pass1 = "pass1"
inputs.cache = "cache"
inputs.calibration = "calibration"
"#
        )
    }

    pub fn empty() -> Project {
        Project {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The one artifact of `stage` in the project's store (a test that builds one).
    pub fn the_artifact(&self, stage: &str) -> PathBuf {
        let dirs: Vec<_> = std::fs::read_dir(self.path().join("artifacts").join(stage))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|d| d.is_dir())
            .collect();
        assert_eq!(dirs.len(), 1, "{dirs:?}");
        dirs[0].clone()
    }

    pub fn write_pipeline(&self, text: &str) {
        std::fs::write(self.path().join("pipeline.toml"), text).unwrap();
    }

    pub fn cmd(&self) -> Command {
        let mut cmd = Command::cargo_bin("cachemoney").unwrap();
        cmd.current_dir(self.path());
        // The judges' secret fixed, so that which cuts the legality probes draw (and so
        // what they can see) is the same on every run of the suite.
        cmd.env("CACHEMONEY_SECRET", "the tests' secret");
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.run_with(&[], args)
    }

    /// Runs with these environment variables set (a remote's endpoint and keys).
    pub fn run_with(&self, env: &[(&str, String)], args: &[&str]) -> Output {
        self.cmd()
            .envs(env.iter().cloned())
            .args(args)
            .output()
            .unwrap()
    }

    /// Starts the binary with `env` and `args` and returns at once (stdout and stderr
    /// piped), for a test that kills it or runs two at once.
    pub fn spawn_with(&self, env: &[(&str, String)], args: &[&str]) -> std::process::Child {
        std::process::Command::new(assert_cmd::cargo::cargo_bin("cachemoney"))
            .args(args)
            .envs(env.iter().cloned())
            .current_dir(self.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        self.ok_with(&[], args)
    }

    /// [`Project::ok`] with environment variables.
    pub fn ok_with(&self, env: &[(&str, String)], args: &[&str]) -> String {
        let out = self.run_with(env, args);
        assert!(
            out.status.success(),
            "cachemoney {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs and asserts failure with a one-line error; returns that line.
    pub fn fails(&self, args: &[&str]) -> String {
        self.fails_with(&[], args)
    }

    /// [`Project::fails`] with environment variables.
    pub fn fails_with(&self, env: &[(&str, String)], args: &[&str]) -> String {
        let out = self.run_with(env, args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            !out.status.success(),
            "cachemoney {args:?} should have failed:\n{stderr}"
        );
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "expected one error line, got:\n{stderr}");
        errors[0].to_string()
    }

    /// Every file of the store with its content, except the lock and the hash memo:
    /// what "the store is unchanged" means.
    pub fn store_snapshot(&self) -> BTreeMap<String, String> {
        let root = self.path().join("artifacts");
        let mut files = BTreeMap::new();
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                let rel = path
                    .strip_prefix(&root)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                if rel == ".lock" || rel.starts_with(".cache") {
                    continue;
                }
                let Ok(meta) = std::fs::symlink_metadata(&path) else {
                    continue;
                };
                if meta.is_dir() {
                    files.insert(rel + "/", String::new());
                    stack.push(path);
                } else if !meta.is_file() {
                    // A link, a FIFO (reading one would hang): its kind, not its content.
                    files.insert(rel, format!("{:?}", meta.file_type()));
                } else {
                    files.insert(
                        rel,
                        blake3::hash(&std::fs::read(&path).unwrap())
                            .to_hex()
                            .to_string(),
                    );
                }
            }
        }
        files
    }

    pub fn sql(&self, query: &str) -> String {
        self.ok(&["sql", "--format", "csv", query])
    }
}

/// One more cache → calibrate → pass2 chain over `tokens` and `pass1`, in cache `mode`,
/// as nodes `cache_NAME`, `calibration_NAME`, `scores_NAME`.
pub fn mode_chain(name: &str, mode: &str) -> String {
    format!(
        r#"
[nodes.cache_{name}]
stage = "cache"
inputs.tokens = "tokens"
params.mode = "{mode}"
params.ngram_buckets = 65536
params.phrase_buckets = 32768

[nodes.calibration_{name}]
stage = "calibrate"
inputs.pass1 = "pass1"
inputs.cache = "cache_{name}"

[nodes.scores_{name}]
stage = "pass2"
inputs.tokens = "tokens"
inputs.pass1 = "pass1"
inputs.cache = "cache_{name}"
inputs.calibration = "calibration_{name}"
"#
    )
}

/// An `audit-mass` node over the chain whose nodes end in `chain` ("" or "_NAME").
pub fn mass_node(name: &str, chain: &str) -> String {
    format!(
        r#"
[nodes.{name}]
stage = "audit-mass"
inputs.tokens = "tokens"
inputs.pass1 = "pass1"
inputs.cache = "cache{chain}"
inputs.calibration = "calibration{chain}"
"#
    )
}

/// A GPT small enough to train in seconds on the 300-entry test vocabulary.
pub fn tiny_model(vocab: usize) -> String {
    format!(
        "{{ vocab_size = {vocab}, layers = 2, d_model = 32, heads = 2, kv_heads = 1, seq_len = 32, rope_dims = 8, xsa_last = 1, bigram_rows = 64, bigram_dim = 16 }}"
    )
}

pub fn neural_pipeline(model: &str, steps: usize) -> String {
    Project::small_pipeline(300)
        + &format!(
            r#"
[nodes.model]
stage = "train"
inputs.tokens = "tokens"
params.model = {model}
params.batch = 4
params.steps = {steps}
params.warmdown_steps = 10
params.val_every = 10
params.val_tokens = 2000
params.threads = 1

[nodes.pass1]
stage = "pass1"
inputs.tokens = "tokens"
inputs.model = "model"
params.model = "gpt"
params.stride = 8
params.batch = 16
"#
        )
        + &Project::cache_chain(65536)
}

/// Writes a pass-1 table as a user's own eval would (`position`, `model_p`, `entropy`),
/// for `pass1 model = "import"`.
pub fn write_pass1_table(path: &Path, position: Vec<i64>, model_p: Vec<f32>, entropy: Vec<f32>) {
    use arrow::array::{Float32Array, Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    let schema = std::sync::Arc::new(Schema::new(vec![
        Field::new("position", DataType::Int64, false),
        Field::new("model_p", DataType::Float32, false),
        Field::new("entropy", DataType::Float32, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            std::sync::Arc::new(Int64Array::from(position)),
            std::sync::Arc::new(Float32Array::from(model_p)),
            std::sync::Arc::new(Float32Array::from(entropy)),
        ],
    )
    .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}
