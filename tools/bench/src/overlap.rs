//! The `overlap` probe at scale, run as a user runs it: the val set (`--tokens`, 62M by
//! default) indexed, and `--train-shards` shards of 100M training tokens streamed past
//! it, through this very binary. The figure to extrapolate from is the scan's rate: the
//! training data is read a shard at a time, so time grows with it and memory does not.

use std::path::Path;

use anyhow::Result;

use super::{median, timed, timed_with_rss};

const SHARD_TOKENS: usize = 100_000_000;

/// Seeded filler tokens in 2..1024 (no BOS), `n` of them.
fn filler(n: usize, seed: u64) -> Vec<u16> {
    let mut state = seed | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            2 + (state % 1022) as u16
        })
        .collect()
}

fn write_once(path: &Path, tokens: impl FnOnce() -> Vec<u16>, n: usize) -> Result<()> {
    let size = (text::shards::HEADER_BYTES + 2 * n) as u64;
    if std::fs::metadata(path).map(|m| m.len()).ok() != Some(size) {
        std::fs::write(path, text::shards::encode_shard(&tokens()))?;
    }
    Ok(())
}

pub(super) fn overlap(scratch: &Path, repeats: usize, tokens: usize, shards: usize) -> Result<()> {
    let dir = scratch.join("overlap");
    std::fs::create_dir_all(dir.join("shards"))?;
    std::fs::create_dir_all(dir.join("train"))?;
    // FineWeb-shaped documents of random tokens: only what is planted in train can match
    // (the cache's copy-span stream repeats itself, so planted spans would match all over).
    let val = super::synthetic_stream(tokens);
    write_once(
        &dir.join("shards/fineweb_val_000000.bin"),
        || val.clone(),
        tokens,
    )?;
    write_once(
        &dir.join("shards/fineweb_train_000000.bin"),
        || filler(1_000_000, 1),
        1_000_000,
    )?;
    // The training data: filler, with 1M val tokens copied into the first shard (the
    // documents they cover must be found, the rest not).
    for i in 0..shards {
        write_once(
            &dir.join(format!("train/big_{i:03}.bin")),
            || {
                let mut t = filler(SHARD_TOKENS, 7 + i as u64);
                if i == 0 {
                    let (from, len) = (tokens / 2, 1_000_000.min(tokens / 4));
                    t[SHARD_TOKENS / 2..SHARD_TOKENS / 2 + len]
                        .copy_from_slice(&val[from..from + len]);
                }
                t
            },
            SHARD_TOKENS,
        )?;
    }
    let tokens = super::chain::shard_tokens_node("shards/fineweb_train_*.bin")?;
    std::fs::write(
        dir.join("pipeline.toml"),
        format!(
            r#"{tokens}
[nodes.overlap]
stage = "overlap"
inputs.tokens = "tokens"
params.train_split = false
files.train = ["train/big_*.bin"]
"#
        ),
    )?;
    timed(&dir, &["run", "-q", "--until", "tokens"])?;
    let mut runs = Vec::new();
    let mut peaks = Vec::new();
    for _ in 0..repeats {
        let (seconds, peak) = timed_with_rss(
            &dir,
            &["run", "-q", "--until", "overlap", "--force", "overlap"],
        )?;
        runs.push(seconds);
        peaks.push(peak as f64);
    }
    let train = (shards * SHARD_TOKENS) as f64;
    let seconds = median(runs.clone());
    let shown: Vec<String> = runs.iter().map(|s| format!("{s:.1}")).collect();
    println!(
        "overlap: {tokens} val tokens against {} train tokens in {shards} shards: {seconds:.1} s (runs {} s), peak RSS {:.2} GB; {:.0}M train tokens/s, so 8B train tokens about {:.0} s",
        train as u64,
        shown.join(", "),
        median(peaks) / 1e9,
        train / seconds / 1e6,
        8e9 / (train / seconds)
    );
    let report = std::process::Command::new(std::env::current_exe()?)
        .args(["show", "overlap"])
        .current_dir(&dir)
        .output()?;
    let report = String::from_utf8_lossy(&report.stdout);
    for line in report.lines().filter(|l| {
        ["documents", "index_val", "scan_train", "window_share"]
            .iter()
            .any(|k| l.contains(k))
    }) {
        println!("  {}", line.trim());
    }
    Ok(())
}
