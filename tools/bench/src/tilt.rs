//! The n-gram tilt at the challenge's scale, run as a user runs it: the `hints` stage over
//! the val stream (`--tokens`, 62M by default: the cache bench's copy-span stream, 60% of
//! whose documents copy a shared text, so that contexts recur and hints fire), through
//! this very binary.

use std::path::Path;

use anyhow::Result;

use super::{median, timed, timed_with_rss};

pub(super) fn tilt(scratch: &Path, repeats: usize, targets: usize) -> Result<()> {
    let dir = scratch.join("tilt");
    // One token more than targets: the first is only a context.
    let tokens = targets + 1;
    std::fs::create_dir_all(dir.join("shards"))?;
    let shard = dir.join("shards/fineweb_val_000000.bin");
    let size = (text::shards::HEADER_BYTES + 2 * tokens) as u64;
    if std::fs::metadata(&shard).map(|m| m.len()).ok() != Some(size) {
        std::fs::write(
            &shard,
            text::shards::encode_shard(&cache::synthetic::copy_span_stream(tokens)),
        )?;
    }
    let node = super::chain::shard_tokens_node("shards/fineweb_val_*.bin")?;
    std::fs::write(
        dir.join("pipeline.toml"),
        format!(
            r#"{node}
[nodes.hints]
stage = "hints"
inputs.tokens = "tokens"

[nodes.hints_cachemoney]
stage = "hints"
inputs.tokens = "tokens"
params.kernel = "cachemoney"

[nodes.hints_1514]
stage = "hints"
inputs.tokens = "tokens"
params.kernel = "1514"

[nodes.pass1]
stage = "pass1"
inputs.tokens = "tokens"
inputs.hints = "hints"
params.model = "bigram"
params.temperature = 1.0

[nodes.tilt]
stage = "tilt"
inputs.tokens = "tokens"
inputs.pass1 = "pass1"
inputs.hints = "hints"
"#
        ),
    )?;
    timed(&dir, &["run", "-q", "--until", "tokens"])?;
    time_node(&dir, "hints", "hints", "targets", targets, repeats)?;
    for kernel in ["cachemoney", "1514"] {
        let label = format!("hints (kernel {kernel})");
        time_node(
            &dir,
            &format!("hints_{kernel}"),
            &label,
            "targets",
            targets,
            repeats,
        )?;
    }
    timed(&dir, &["run", "-q", "--until", "pass1"])?;
    time_node(&dir, "tilt", "tilt", "entries", targets, repeats)?;
    for node in ["hints", "hints_cachemoney", "hints_1514", "tilt"] {
        show(&dir, node)?;
    }
    Ok(())
}

/// Builds `node` again `repeats` times (forced) and prints the median time and peak RSS.
fn time_node(
    dir: &Path,
    node: &str,
    label: &str,
    what: &str,
    count: usize,
    repeats: usize,
) -> Result<()> {
    let (mut runs, mut peaks) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        let (seconds, peak) =
            timed_with_rss(dir, &["run", "-q", "--until", node, "--force", node])?;
        runs.push(seconds);
        peaks.push(peak as f64);
    }
    let shown: Vec<String> = runs.iter().map(|s| format!("{s:.2}")).collect();
    println!(
        "{label}: {count} {what} in {:.2} s (runs {} s), peak RSS {:.2} GB",
        median(runs.clone()),
        shown.join(", "),
        median(peaks) / 1e9
    );
    Ok(())
}

/// The node's phases and figures, from `show`.
fn show(dir: &Path, node: &str) -> Result<()> {
    let report = std::process::Command::new(std::env::current_exe()?)
        .args(["show", node])
        .current_dir(dir)
        .output()?;
    let wanted = [
        "phases",
        "gated",
        "bpb_before",
        "neural_bpb",
        "fired",
        "hit_rate",
    ];
    for line in String::from_utf8_lossy(&report.stdout)
        .lines()
        .filter(|l| wanted.iter().any(|k| l.trim_start().starts_with(k)))
    {
        println!("  {node}: {}", line.trim());
    }
    Ok(())
}
