//! `bench --section legality`: what the legality probes cost at the real scale, in
//! cache chains.

use std::path::Path;

use anyhow::Result;

use super::{cache_chain_project, median, timed, timed_with_rss};

/// The legality probes at scale: the reference chain (the bigram's pass-1 -> cache ->
/// calibrate -> pass2) once, then everything its legality node adds (two perturbed
/// streams, the chain re-run on each, the judge), both forced, so that the ratio is the
/// probes' cost in chains.
pub(super) fn legality_reruns(scratch: &Path, repeats: usize, targets: usize) -> Result<()> {
    // The judge as the default pipeline wires a cache chain's: with its implied-mass
    // audit, which the probes' cost includes.
    let judge = r#"
[nodes.mass]
stage = "audit-mass"
inputs.tokens = "tokens"
inputs.pass1 = "pass1"
inputs.cache = "cache"
inputs.calibration = "calibration"

[nodes.legality]
stage = "legality"
inputs.tokens = "tokens"
inputs.chain = "scores"
inputs.mass = "mass"
"#;
    let dir = cache_chain_project(scratch, targets, judge)?;
    timed(&dir, &["run", "-q", "--until", "scores"])?;
    let force = |nodes: &[String]| -> Vec<String> {
        nodes
            .iter()
            .flat_map(|n| ["--force".to_string(), n.clone()])
            .collect()
    };
    // The bigram chain whole, its pass-1 included: each re-run runs all four.
    let chain: Vec<String> = ["pass1", "cache", "calibration", "scores"]
        .map(String::from)
        .to_vec();
    let mut probes = vec!["mass".to_string(), "legality".to_string()];
    for i in 1..=2 {
        for node in ["tokens", "pass1", "cache", "calibration", "scores"] {
            probes.push(format!("{node}_cut{i}"));
        }
    }
    println!("legality probes on {targets} targets (reference chain, pass-1 from the bigram; median of {repeats})");
    let (mut one, mut all, mut peak) = (Vec::new(), Vec::new(), 0u64);
    for _ in 0..repeats.max(1) {
        let mut args = vec!["run", "-q", "--until", "scores"];
        let forced = force(&chain);
        args.extend(forced.iter().map(String::as_str));
        let (seconds, _) = timed_with_rss(&dir, &args)?;
        one.push(seconds);
        let mut args = vec!["run", "-q", "--until", "legality"];
        let forced = force(&probes);
        args.extend(forced.iter().map(String::as_str));
        let (seconds, rss) = timed_with_rss(&dir, &args)?;
        all.push(seconds);
        peak = peak.max(rss);
        println!(
            "  one chain {:>7.2} s   probes {seconds:>7.2} s  peak RSS {:>6.2} GB",
            one[one.len() - 1],
            rss as f64 / 1e9
        );
    }
    let (one, all) = (median(one), median(all));
    println!(
        "{:<44} median {:>8.2} s\n{:<44} median {:>8.2} s  ({:.2}× one chain; peak RSS {:.2} GB)",
        "one chain (bigram pass-1, cache, calibrate, pass2)",
        one,
        "probes (2 cuts: perturb, re-run, compare)",
        all,
        all / one,
        peak as f64 / 1e9
    );
    Ok(())
}
