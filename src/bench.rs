//! `cachemoney bench`: the spine at the real validation set's scale.
//!
//! Figures are taken the way a user meets them, by running this very binary as a child
//! process (`run`, `status`, `sql`), so process start, pipeline loading, input hashing
//! and the store's bookkeeping are all inside the numbers. Each figure is the median of
//! `repeat` runs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};

const SAMPLE_CORPUS: &str = "data/sample/gutenberg_classics_small.jsonl";
const SP_MODEL: &str = "data/sp1024/fineweb_1024_bpe.model";

fn project_file(relative: &str) -> Result<PathBuf> {
    for base in [
        PathBuf::from("."),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    ] {
        let path = base.join(relative);
        if path.exists() {
            return Ok(std::fs::canonicalize(path)?);
        }
    }
    bail!("{relative}: not found (run the bench from the project root)")
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// Runs this binary with `args` in `dir`, returns wall seconds; fails on a non-zero exit.
fn timed(dir: &Path, args: &[&str]) -> Result<f64> {
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    let output = Command::new(exe).args(args).current_dir(dir).output()?;
    let seconds = started.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!(
            "cachemoney {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(seconds)
}

fn repeat(n: usize, mut f: impl FnMut() -> Result<f64>) -> Result<(f64, Vec<f64>)> {
    let runs = (0..n.max(1)).map(|_| f()).collect::<Result<Vec<_>>>()?;
    Ok((median(runs.clone()), runs))
}

fn show(label: &str, (median, runs): &(f64, Vec<f64>), extra: &str) {
    let runs: Vec<String> = runs.iter().map(|r| format!("{r:.3}")).collect();
    println!(
        "{label:<44} median {median:>8.3} s   runs [{}] {extra}",
        runs.join(", ")
    );
}

/// A token stream with the shape of FineWeb val: documents of a few hundred to a few
/// thousand tokens, each starting with BOS = 1, ids drawn from the whole vocabulary.
fn synthetic_stream(n: usize) -> Vec<u16> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut tokens = Vec::with_capacity(n);
    while tokens.len() < n {
        tokens.push(1u16);
        let len = 200 + (next() % 2000) as usize;
        for _ in 0..len.min(n - tokens.len()) {
            tokens.push(4 + (next() % 1020) as u16);
        }
    }
    tokens.truncate(n);
    tokens
}

pub fn run(dir: Option<PathBuf>, repeats: usize, tokens: usize, text_mb: usize) -> Result<()> {
    let scratch = match dir {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            d
        }
        None => {
            let d = std::env::temp_dir().join(format!("cachemoney-bench-{}", std::process::id()));
            std::fs::create_dir_all(&d)?;
            d
        }
    };
    println!(
        "bench directory {} ({} threads)",
        scratch.display(),
        rayon::current_num_threads()
    );

    // --- Shard import at the size of the real validation set ---------------------------
    let shard_dir = scratch.join("shards");
    std::fs::create_dir_all(&shard_dir)?;
    let shard = shard_dir.join("fineweb_val_000000.bin");
    let n = tokens + 1 + 1000; // one past T, plus a tail the truncation rule removes
    if std::fs::metadata(&shard).map(|m| m.len()).unwrap_or(0)
        != (text::shards::HEADER_BYTES + 2 * n) as u64
    {
        std::fs::write(&shard, text::shards::encode_shard(&synthetic_stream(n)))
            .with_context(|| format!("{}: cannot write", shard.display()))?;
    }
    let model = project_file(SP_MODEL)?;
    std::fs::write(
        scratch.join("pipeline.toml"),
        format!(
            "[nodes.tokens]\nstage = \"tokenize\"\nfiles.val = \"shards/fineweb_val_*.bin\"\nfiles.tokenizer = {model:?}\nparams.source = \"shards\"\n"
        ),
    )?;
    let _ = std::fs::remove_dir_all(scratch.join("artifacts"));
    let mut first = true;
    let import = repeat(repeats, || {
        let args: &[&str] = if first {
            &["run", "-q"]
        } else {
            &["run", "-q", "--force", "tokens"]
        };
        first = false;
        timed(&scratch, args)
    })?;
    show(
        &format!("import {n} tokens, write Parquet"),
        &import,
        &format!("({:.1} M tokens/s)", n as f64 / import.0 / 1e6),
    );
    show(
        "status (62M-token table in the store)",
        &repeat(repeats, || timed(&scratch, &["status"]))?,
        "",
    );
    show(
        "run, fully cached",
        &repeat(repeats, || timed(&scratch, &["run", "-q"]))?,
        "",
    );
    show(
        "sql: SELECT count(*), sum(bytes) FROM val",
        &repeat(repeats, || {
            timed(&scratch, &["sql", "SELECT count(*), sum(bytes) FROM val"])
        })?,
        "",
    );

    // --- Tokenize raw text: BPE training plus encoding -----------------------------------
    let sample = std::fs::read_to_string(project_file(SAMPLE_CORPUS)?)?;
    let corpus_dir = scratch.join("text");
    std::fs::create_dir_all(&corpus_dir)?;
    let corpus = corpus_dir.join("corpus.jsonl");
    let target = text_mb * 1_000_000;
    let mut body = String::with_capacity(target + sample.len());
    while body.len() < target {
        body.push_str(&sample);
    }
    std::fs::write(&corpus, &body)?;
    let text_bytes: usize = body
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["text"].as_str().map(str::len))
        .sum();
    std::fs::write(
        corpus_dir.join("pipeline.toml"),
        "[nodes.tokens]\nstage = \"tokenize\"\nfiles.corpus = \"corpus.jsonl\"\n",
    )?;
    let _ = std::fs::remove_dir_all(corpus_dir.join("artifacts"));
    let mut first = true;
    let tokenize = repeat(repeats, || {
        let args: &[&str] = if first {
            &["run", "-q"]
        } else {
            &["run", "-q", "--force", "tokens"]
        };
        first = false;
        timed(&corpus_dir, args)
    })?;
    show(
        &format!(
            "tokenize {:.0} MB of text (train BPE + encode)",
            text_bytes as f64 / 1e6
        ),
        &tokenize,
        &format!("({:.2} MB/s)", text_bytes as f64 / tokenize.0 / 1e6),
    );
    // The last run's phases, from its manifest.
    let manifest = Command::new(std::env::current_exe()?)
        .args(["show", "tokens", "--json"])
        .current_dir(&corpus_dir)
        .output()?;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest.stdout)?;
    let train_bytes = manifest["report"]["train_bytes"].as_f64().unwrap_or(0.0);
    for phase in manifest["phase_seconds"].as_array().into_iter().flatten() {
        let (name, seconds) = (
            phase[0].as_str().unwrap_or(""),
            phase[1].as_f64().unwrap_or(0.0),
        );
        let mb = if name == "train_bpe" {
            train_bytes
        } else {
            text_bytes as f64
        } / 1e6;
        println!(
            "  phase {name:<38} {seconds:>8.3} s   ({:.2} MB/s over {mb:.0} MB)",
            mb / seconds
        );
    }
    Ok(())
}
