//! `cachemoney-bench`: figures at the real validation set's scale.
//!
//! A tool beside the product, not part of it. The `engine` section times the pure cache
//! engine in this process, phase by phase, the way the record reports its own phases.
//! The others take figures the way a user meets them, by running the `cachemoney` binary
//! built beside this one as a child process (`run`, `status`, `sql`), so process start,
//! pipeline loading, Parquet reading and writing, input hashing and the store's
//! bookkeeping are all inside the numbers. Each figure is the median of `--repeat` runs.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;

mod chain;
mod legality;
mod overlap;
mod remote;
mod tilt;

use chain::cache_chain_project;

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

/// The `cachemoney` binary built beside this one (`cargo build --release --workspace
/// --bins` builds both), which every section but `engine` runs as a user would.
fn cachemoney_exe() -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let exe = me.with_file_name("cachemoney");
    if !exe.is_file() {
        bail!(
            "{}: not found; build it with `cargo build --release --workspace --bins`",
            exe.display()
        );
    }
    Ok(exe)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// Runs this binary with `args` in `dir`, returns wall seconds; fails on a non-zero exit.
fn timed(dir: &Path, args: &[&str]) -> Result<f64> {
    let exe = cachemoney_exe()?;
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

/// Which parts of the bench to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    /// Shard import, status, cached run, SQL, text tokenization.
    Spine,
    /// The pure cache engine, phase by phase, in this process.
    Engine,
    /// The cache chain: cache, calibrate, pass2 (each stage's wall time and peak RSS).
    Cache,
    /// The legality probes' re-runs of the reference chain, against one chain.
    Legality,
    /// The `overlap` probe: the val set's windows against --train-shards shards of 100M
    /// training tokens. Not part of `all`: it writes 200 MB of shards per 100M tokens.
    Overlap,
    /// The n-gram tilt: the `hints` stage over the val stream (62M targets by default).
    Tilt,
    /// Push and pull through a remote store: the demo store and the 62M-target chain.
    /// Not part of `all`: it needs a server (`--remote URL`, or the tests' s3s-fs).
    Remote,
    All,
}

/// Figures at the real validation set's scale (62M tokens by default).
#[derive(Parser)]
#[command(name = "cachemoney-bench", version)]
struct Options {
    /// Where to put the scratch store and generated data (default: a temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Repetitions per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Tokens in the generated shard set.
    #[arg(long, default_value_t = 62_021_632)]
    tokens: usize,
    /// Megabytes of text for the tokenize throughput figure.
    #[arg(long, default_value_t = 100)]
    text_mb: usize,
    /// Which part to measure.
    #[arg(long, value_enum, default_value_t = Section::All)]
    section: Section,
    /// Time the engine and the cache chain (sections engine, cache) on this shard's
    /// tokens (challenge format) instead of a synthetic stream of --tokens.
    #[arg(long)]
    shard: Option<PathBuf>,
    /// Section overlap: shards of 100M training tokens to stream past the val set.
    #[arg(long, default_value_t = 10)]
    train_shards: usize,
    /// Section remote: the remote store's URL (default: the tests' S3 server on a free
    /// port); credentials and endpoint from the environment, as for `cachemoney`.
    #[arg(long)]
    remote: Option<String>,
    /// Worker threads for the engine section (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> ExitCode {
    let options = Options::parse();
    if let Some(threads) = options.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
        {
            eprintln!("error: --threads {threads}: cannot start the thread pool: {e}");
            return ExitCode::FAILURE;
        }
    }
    match run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn run(options: Options) -> Result<()> {
    let Options {
        dir,
        repeat: repeats,
        tokens,
        text_mb,
        section,
        shard,
        train_shards,
        remote: remote_url,
        threads: _,
    } = options;
    if matches!(section, Section::Engine | Section::All) {
        let stream = match &shard {
            Some(path) => text::shards::read_shard(path, 1 << 16)?,
            None => cache::synthetic::copy_span_stream(tokens + 1),
        };
        engine(&stream, repeats)?;
        if section == Section::Engine {
            return Ok(());
        }
    }
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
    if section == Section::Remote {
        return remote::remote(&scratch, repeats, tokens, remote_url);
    }
    if section == Section::Overlap {
        return overlap::overlap(&scratch, repeats, tokens, train_shards);
    }
    if matches!(section, Section::Tilt | Section::All) {
        tilt::tilt(&scratch, repeats, tokens)?;
        if section == Section::Tilt {
            return Ok(());
        }
    }
    if matches!(section, Section::Cache | Section::All) {
        chain::cache_chain(&scratch, repeats, tokens, shard.as_deref())?;
    }
    if matches!(section, Section::Legality | Section::All) {
        legality::legality_reruns(&scratch, repeats, tokens)?;
    }
    if matches!(section, Section::Cache | Section::Legality) {
        return Ok(());
    }
    spine(&scratch, repeats, tokens, text_mb)
}

/// Section spine: a shard set of `tokens` imported, `status`, a cached `run` and SQL
/// over it; then `text_mb` MB of raw text tokenized (BPE training plus encoding).
fn spine(scratch: &Path, repeats: usize, tokens: usize, text_mb: usize) -> Result<()> {
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
        timed(scratch, args)
    })?;
    show(
        &format!("import {n} tokens, write Parquet"),
        &import,
        &format!("({:.1} M tokens/s)", n as f64 / import.0 / 1e6),
    );
    show(
        "status (62M-token table in the store)",
        &repeat(repeats, || timed(scratch, &["status"]))?,
        "",
    );
    show(
        "run, fully cached",
        &repeat(repeats, || timed(scratch, &["run", "-q"]))?,
        "",
    );
    show(
        "sql: SELECT count(*), sum(bytes) FROM val",
        &repeat(repeats, || {
            timed(scratch, &["sql", "SELECT count(*), sum(bytes) FROM val"])
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
    let manifest = Command::new(cachemoney_exe()?)
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

/// Runs this binary with `args` in `dir`; returns (wall seconds, the child's peak RSS in
/// bytes), read with wait4 so that each figure is that one process's own.
fn timed_with_rss(dir: &Path, args: &[&str]) -> Result<(f64, u64)> {
    let exe = cachemoney_exe()?;
    let started = Instant::now();
    let child = Command::new(exe)
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: zeroed rusage is a valid value, and wait4 only writes into the two
    // out-pointers, which outlive the call.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own unwaited child, and both out-pointers are live locals.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let seconds = started.elapsed().as_secs_f64();
    if waited != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr {
            use std::io::Read;
            let _ = pipe.read_to_string(&mut stderr);
        }
        bail!("cachemoney {} failed: {}", args.join(" "), stderr.trim());
    }
    Ok((seconds, usage.ru_maxrss as u64 * 1024))
}

/// Seconds `f` takes, and what it returned.
fn stopwatch<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let started = Instant::now();
    let value = f();
    (started.elapsed().as_secs_f64(), value)
}

/// The engine's phases on `tokens` (all of it is the val stream; every position but the
/// first is a target). Pass-1 values are synthetic but varied, so every blend branch runs;
/// the figures time the cache, not a model.
fn engine(tokens: &[u16], repeats: usize) -> Result<()> {
    use cache::{BlendParams, CalibrationGrid, Entry, NgramConfig, PhraseConfig};
    use rayon::prelude::*;

    let repeats = repeats.max(1);
    let targets = tokens.len().saturating_sub(1);
    println!(
        "cache engine on {targets} targets, {} threads (median of {repeats})",
        rayon::current_num_threads()
    );
    let (ngram_config, phrase_config) = (
        NgramConfig::default().validated()?,
        PhraseConfig::default().validated()?,
    );
    let mut times: Vec<(&str, Vec<f64>)> = Vec::new();
    let mut record =
        |label: &'static str, seconds: f64| match times.iter_mut().find(|(l, _)| *l == label) {
            Some((_, runs)) => runs.push(seconds),
            None => times.push((label, vec![seconds])),
        };
    let mut outcome = None;
    for _ in 0..repeats {
        let (s, ngram) = stopwatch(|| cache::NgramTables::build(tokens, &ngram_config));
        record("n-gram build", s);
        let (s, phrase) = stopwatch(|| cache::PhraseTables::build(tokens, &phrase_config));
        record("phrase build", s);
        let (s, ngram_matches) = stopwatch(|| ngram.lookup_all(tokens));
        record("n-gram lookups", s);
        let (s, phrase_matches) = stopwatch(|| phrase.lookup_all(tokens));
        record("phrase lookups", s);
        drop((ngram, phrase));
        let entry = |p: usize| Entry {
            model_p: 0.01 + (p % 97) as f32 / 100.0,
            entropy: (p % 61) as f32 / 10.0,
            ngram: ngram_matches[p],
            phrase: phrase_matches[p],
        };
        let grid = CalibrationGrid::default();
        let sample: Vec<Entry> = (1..=grid.calibration_entries(targets)).map(entry).collect();
        let (s, calibrated) =
            stopwatch(|| cache::calibrate(&sample, &BlendParams::default(), &grid));
        record("calibration grid", s);
        let params = BlendParams {
            alpha_high: calibrated.alpha_high,
            entropy_thresh: calibrated.entropy_thresh,
            ..BlendParams::default()
        };
        // Chunk sums reduced in chunk order: the same total on any thread count.
        let (s, nll) = stopwatch(|| {
            const CHUNK: usize = 1 << 16;
            let chunks: Vec<f64> = (0..targets.div_ceil(CHUNK))
                .into_par_iter()
                .map(|c| {
                    let first = 1 + c * CHUNK;
                    (first..(first + CHUNK).min(targets + 1))
                        .map(|p| params.nll(&entry(p)))
                        .sum::<f64>()
                })
                .collect();
            chunks.iter().sum::<f64>()
        });
        record("blend", s);
        outcome = Some((calibrated.alpha_high, calibrated.entropy_thresh, nll));
        let (s, _) = stopwatch(|| cache::causal::ngram_lookups(tokens, &ngram_config));
        record("causal n-gram pass", s);
        let (s, _) = stopwatch(|| cache::causal::phrase_lookups(tokens, &phrase_config));
        record("causal phrase pass", s);
        let (s, _) = stopwatch(|| cache::normalised::ngram_lookups(tokens, &ngram_config));
        record("causal-normalised n-gram pass", s);
        let (s, _) = stopwatch(|| cache::normalised::phrase_lookups(tokens, &phrase_config));
        record("causal-normalised phrase pass", s);
        let (s, _) = stopwatch(|| {
            cache::normalised::lookups(tokens, Some(&ngram_config), Some(&phrase_config))
        });
        record("causal-normalised, both in one walk", s);
    }
    let med = |label: &str| {
        times
            .iter()
            .find(|(l, _)| *l == label)
            .map_or(f64::NAN, |(_, runs)| median(runs.clone()))
    };
    for (label, runs) in &times {
        let per_second = targets as f64 / median(runs.clone()) / 1e6;
        show(
            &format!("engine {label}"),
            &(median(runs.clone()), runs.clone()),
            &format!("({per_second:.1} M positions/s)"),
        );
    }
    let pass2 = med("n-gram lookups") + med("phrase lookups") + med("blend");
    println!(
        "{:<44} {:>8.3} s   ({:.1} M entries/s; the record's rescore: 79.1 s)",
        "engine pass-2 = lookups + blend",
        pass2,
        targets as f64 / pass2 / 1e6
    );
    if let Some((alpha_high, entropy_thresh, nll)) = outcome {
        println!(
            "  calibrated ({alpha_high}, {entropy_thresh}); mean NLL {:.4} nats",
            nll / targets.max(1) as f64
        );
    }
    Ok(())
}
