//! `bench --section legality`: what the legality probes cost at the real scale, in
//! cache chains.

use std::path::Path;

use anyhow::Result;

use super::{cache_chain_project, median, timed, timed_with_rss};

/// The legality probes at scale: the reference chain (cache -> calibrate -> pass2) once,
/// then everything its legality node adds (three perturbed streams, the chain re-run on
/// each, the comparison), both forced, so that the ratio is the probes' cost in chains.
pub(super) fn legality_reruns(scratch: &Path, repeats: usize, targets: usize) -> Result<()> {
    let judge = "\n[nodes.legality]\nstage = \"legality\"\ninputs.tokens = \"tokens\"\ninputs.chain = \"scores\"\n";
    let dir = cache_chain_project(scratch, targets, judge)?;
    timed(&dir, &["run", "-q", "--until", "scores"])?;
    let force = |nodes: &[String]| -> Vec<String> {
        nodes
            .iter()
            .flat_map(|n| ["--force".to_string(), n.clone()])
            .collect()
    };
    let chain: Vec<String> = ["cache", "calibration", "scores"]
        .map(String::from)
        .to_vec();
    let mut probes = vec!["legality".to_string()];
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
        "one chain (cache, calibrate, pass2)",
        one,
        "probes (2 cuts: perturb, re-run, compare)",
        all,
        all / one,
        peak as f64 / 1e9
    );
    Ok(())
}
