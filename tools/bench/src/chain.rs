//! `bench --section cache`: the cache → calibrate → pass2 chain as a user meets it, each
//! stage run by this binary as a child process, Parquet reading and writing included, on
//! a synthetic copy-span stream of the real validation set's size or on the user's own
//! shard (`--shard`). Ends with one table: stage, seconds, peak RSS, M entries/s.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use super::{median, project_file, timed, timed_with_rss, SP_MODEL};

pub(super) fn cache_chain(
    scratch: &Path,
    repeats: usize,
    targets: usize,
    shard: Option<&Path>,
) -> Result<()> {
    let (dir, what) = match shard {
        Some(shard) => (
            shard_chain_project(scratch, shard)?,
            format!("the tokens of {}", shard.display()),
        ),
        None => (
            cache_chain_project(scratch, targets, "")?,
            format!("{targets} targets of a copy-span stream"),
        ),
    };
    let entries = pass1_entries(&dir)?;
    println!("cache chain on {what}: {entries} pass-1 entries (median of {repeats}; peak RSS is the largest run's)");
    let mut table = Vec::new();
    for (mode, nodes) in [
        ("reference", ["cache", "calibration", "scores"]),
        (
            "causal-normalised",
            [
                "cache_normalised",
                "calibration_normalised",
                "scores_normalised",
            ],
        ),
    ] {
        println!("mode {mode}");
        let rows = chain_of_nodes(&dir, repeats, &nodes)?;
        let total = rows.iter().map(|r| r.1).sum::<f64>();
        let peak = rows.iter().map(|r| r.2).max().unwrap_or(0);
        for (node, seconds, rss) in rows {
            table.push((mode, node, seconds, rss));
        }
        table.push((mode, "chain".to_string(), total, peak));
    }
    println!(
        "\n{:<18} {:<24} {:>9} {:>10} {:>13}",
        "mode", "stage", "seconds", "peak RSS", "M entries/s"
    );
    for (mode, stage, seconds, rss) in table {
        println!(
            "{mode:<18} {stage:<24} {seconds:>9.2} {:>7.2} GB {:>13.1}",
            rss as f64 / 1e9,
            entries as f64 / seconds / 1e6
        );
    }
    Ok(())
}

/// Rows in the bench project's pass-1 table.
fn pass1_entries(dir: &Path) -> Result<u64> {
    let manifest = Command::new(std::env::current_exe()?)
        .args(["show", "pass1", "--json"])
        .current_dir(dir)
        .output()?;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest.stdout)?;
    manifest["report"]["entries"]
        .as_u64()
        .context("pass1's manifest has no entry count")
}

/// The bench project: a copy-span shard of `targets` targets, the bigram's pass-1, the
/// reference and causal-normalised chains, and `extra` nodes.
pub(super) fn cache_chain_project(scratch: &Path, targets: usize, extra: &str) -> Result<PathBuf> {
    let dir = scratch.join("cache-chain");
    std::fs::create_dir_all(dir.join("shards"))?;
    let shard = dir.join("shards/fineweb_val_000000.bin");
    let n = targets + 1;
    if std::fs::metadata(&shard).map(|m| m.len()).unwrap_or(0)
        != (text::shards::HEADER_BYTES + 2 * n) as u64
    {
        std::fs::write(
            &shard,
            text::shards::encode_shard(&cache::synthetic::copy_span_stream(n)),
        )?;
    }
    chain_project(&dir, extra)
}

/// The bench project over a user's own shard (challenge format), copied in once.
fn shard_chain_project(scratch: &Path, shard: &Path) -> Result<PathBuf> {
    let dir = scratch.join("cache-chain-shard");
    std::fs::create_dir_all(dir.join("shards"))?;
    let copy = dir.join("shards/fineweb_val_000000.bin");
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
    if size(&copy) != size(shard) {
        std::fs::copy(shard, &copy)
            .with_context(|| format!("{}: cannot copy into {}", shard.display(), dir.display()))?;
    }
    chain_project(&dir, "")
}

/// A `tokens` node over the bench's shards: val from `shards/fineweb_val_*.bin`, train
/// from `train` (a glob), with the challenge's tokenizer, val kept whole.
pub(super) fn shard_tokens_node(train: &str) -> Result<String> {
    let model = project_file(SP_MODEL)?;
    Ok(format!(
        r#"[nodes.tokens]
stage = "tokenize"
files.val = "shards/fineweb_val_*.bin"
files.train = "{train}"
files.tokenizer = {model:?}
params.source = "shards"
params.val_truncate_multiple = 0
"#
    ))
}

/// Writes the chain's pipeline into `dir` (whose `shards/` holds the val shard) and builds
/// everything up to pass 1.
fn chain_project(dir: &Path, extra: &str) -> Result<PathBuf> {
    let tokens = shard_tokens_node("shards/fineweb_val_*.bin")?;
    let (reference, normalised) = (
        chain_nodes("", "reference"),
        chain_nodes("_normalised", "causal-normalised"),
    );
    // The bigram is estimated on the val stream itself: this bench times the cache, not
    // the model, and a GPT's pass-1 has the same shape.
    std::fs::write(
        dir.join("pipeline.toml"),
        format!(
            r#"{tokens}
[nodes.pass1]
stage = "pass1"
inputs.tokens = "tokens"
{reference}{normalised}{extra}"#
        ),
    )?;
    timed(dir, &["run", "-q", "--until", "pass1"])?;
    Ok(dir.to_path_buf())
}

/// The nodes `cache{suffix}`, `calibration{suffix}`, `scores{suffix}` of one chain over
/// `tokens` and `pass1`, the cache in `mode`.
fn chain_nodes(suffix: &str, mode: &str) -> String {
    format!(
        r#"
[nodes.cache{suffix}]
stage = "cache"
inputs.tokens = "tokens"
params.mode = "{mode}"

[nodes.calibration{suffix}]
stage = "calibrate"
inputs.pass1 = "pass1"
inputs.cache = "cache{suffix}"

[nodes.scores{suffix}]
stage = "pass2"
inputs.tokens = "tokens"
inputs.pass1 = "pass1"
inputs.cache = "cache{suffix}"
inputs.calibration = "calibration{suffix}"
"#
    )
}

/// Runs each node of one cache chain `repeats` times; prints wall times, phases, peak RSS;
/// returns (node, median seconds, peak RSS) per node.
fn chain_of_nodes(dir: &Path, repeats: usize, nodes: &[&str]) -> Result<Vec<(String, f64, u64)>> {
    let mut peak = 0u64;
    let mut rows = Vec::new();
    for &node in nodes {
        let mut runs = Vec::new();
        let mut node_peak = 0u64;
        for _ in 0..repeats.max(1) {
            let (seconds, rss) =
                timed_with_rss(dir, &["run", "-q", "--until", node, "--force", node])?;
            runs.push(seconds);
            peak = peak.max(rss);
            node_peak = node_peak.max(rss);
            println!(
                "  {node:<12} run {seconds:>7.2} s  peak RSS {:>6.2} GB",
                rss as f64 / 1e9
            );
        }
        let manifest = Command::new(std::env::current_exe()?)
            .args(["show", node, "--json"])
            .current_dir(dir)
            .output()?;
        let manifest: serde_json::Value = serde_json::from_slice(&manifest.stdout)?;
        let phases: Vec<String> = manifest["phase_seconds"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                format!(
                    "{} {:.2}s",
                    p[0].as_str().unwrap_or(""),
                    p[1].as_f64().unwrap_or(0.0)
                )
            })
            .collect();
        let median = median(runs);
        println!(
            "{:<44} median {:>8.3} s   phases of the stored build: {}",
            format!("stage {node}"),
            median,
            phases.join(", ")
        );
        rows.push((node.to_string(), median, node_peak));
        if node.starts_with("scores") {
            let report = &manifest["report"];
            println!(
                "  BPB neural {:.4} -> n-gram {:.4} -> final {:.4}; {:.1} M entries/s through pass2 (median run)",
                report["neural_bpb"].as_f64().unwrap_or(f64::NAN),
                report["ngram_bpb"].as_f64().unwrap_or(f64::NAN),
                report["final_bpb"].as_f64().unwrap_or(f64::NAN),
                report["entries"].as_f64().unwrap_or(0.0) / median / 1e6
            );
        }
    }
    println!(
        "{:<44} {:>6.2} GB",
        "peak RSS over cache -> calibrate -> pass2",
        peak as f64 / 1e9
    );
    Ok(rows)
}
