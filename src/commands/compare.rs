//! `cachemoney compare`: the BPB of every built chain side by side, grouped by the pass-1
//! they score, with each chain's legality verdict, so the leaky reference number, the
//! honest ones and the legal tilts are read off one table.

use anyhow::Result;
use serde::Serialize;
use serde_json::{Map, Value};

use super::Session;
use crate::chain::{Chain, Products};
use crate::runner::{NodeState, Resolved};
use cache::stages::{MassReport, Pass2Summary};
use stage_api::products::LEGALITY;
use tilt::TiltReport;

/// One row of `compare` (and of `compare --json`): a chain's figures from its `scores`
/// node's report and, where built, its implied-mass audit's.
#[derive(Debug, Serialize)]
pub struct CompareRow {
    /// The node that produced the scores.
    pub node: String,
    /// The pass-1 node it scores, and that node's `model` and `temperature` parameters.
    pub pass1: String,
    pub model: String,
    pub temperature: Option<f64>,
    /// The cache mode (`reference`, `causal`, `causal-normalised`), or for a tilt chain
    /// `tilt (KERNEL)` with its hints' kernel.
    pub mode: String,
    pub neural_bpb: Option<f64>,
    pub ngram_bpb: Option<f64>,
    pub final_bpb: Option<f64>,
    pub alpha_high: Option<f64>,
    pub entropy_thresh: Option<f64>,
    pub entries: Option<u64>,
    /// The audit node, when one is built for this chain.
    pub audit: Option<String>,
    pub mass_mean: Option<f64>,
    pub mass_max: Option<f64>,
    pub sample_bpb: Option<f64>,
    pub normalised_sample_bpb: Option<f64>,
    /// The legality node that judges this chain, and its verdict: `pass`, or `FAIL`
    /// and the probes that failed (`not built` when the judge is not).
    pub legality_node: Option<String>,
    pub legality: Option<String>,
}

/// A claimed BPB to hold chains against (`compare --claim`): reviewers compared a
/// submission's headline with the number its own run produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub bpb: f64,
    /// How far a chain's BPB may be from the claim.
    pub spread: f64,
    /// Whether the spread was stated or read off the claim's digits.
    pub stated: bool,
    /// The spread as printed.
    pub spread_text: String,
    pub chain: Option<String>,
}

impl Claim {
    /// `claim` as written ("1.0565"); without a stated spread, half a unit of its last
    /// digit: the claim is taken as precise as it is written.
    pub fn parse(claim: &str, spread: Option<f64>, chain: Option<String>) -> Result<Claim> {
        let bpb: f64 = claim
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--claim {claim}: not a number"))?;
        if !(bpb.is_finite() && bpb > 0.0) {
            anyhow::bail!("--claim {claim}: a BPB is a positive number");
        }
        if let Some(s) = spread {
            if !(s.is_finite() && s >= 0.0) {
                anyhow::bail!("--spread {s}: a spread is a number ≥ 0");
            }
        }
        let decimals = claim.trim().split('.').nth(1).map_or(0, str::len) as i32;
        let half_unit = 0.5 * 10f64.powi(-decimals);
        Ok(Claim {
            bpb,
            spread: spread.unwrap_or(half_unit),
            stated: spread.is_some(),
            spread_text: match spread {
                Some(s) => s.to_string(),
                None => format!("{half_unit:.*}", decimals as usize + 1),
            },
            chain,
        })
    }

    /// The line for one chain, and whether it is within the spread.
    pub fn judge(&self, node: &str, bpb: f64) -> (String, bool) {
        let difference = bpb - self.bpb;
        let within = difference.abs() <= self.spread + 1e-12;
        let spreads = match self.spread > 0.0 {
            true => format!(", {:.1} spreads", difference.abs() / self.spread),
            false => String::new(),
        };
        let line = format!(
            "{node}: BPB {bpb:.6}, {difference:+.6} from the claim{spreads}: {}",
            if within { "within" } else { "OUTSIDE" }
        );
        (line, within)
    }
}

impl Session {
    /// Prints the table; with a claim, a line per chain checked, and returns whether each
    /// is within the claim's spread.
    pub fn compare(&self, json: bool, claim: Option<&Claim>) -> Result<bool> {
        let resolved = self.context().resolve()?;
        let mut rows = Vec::new();
        let mut unbuilt = Vec::new();
        let products = Products::new(&self.pipeline);
        for chain in products.chains().into_iter().chain(products.tilts()) {
            match self.built_report(&resolved, &chain.scores)? {
                Some(report) => rows.push(self.compare_row(&resolved, &chain, &report)?),
                None => unbuilt.push(match state_of(&resolved, &chain.scores) {
                    Some(NodeState::Damaged { .. }) => {
                        format!("{} (damaged: `cachemoney status` says why)", chain.scores)
                    }
                    _ => chain.scores.clone(),
                }),
            }
        }
        if rows.is_empty() {
            // Nothing to compare because something is damaged (the scores, or a node
            // they depend on): that is what to say, not that nothing was built.
            let damaged: Vec<String> = resolved
                .iter()
                .filter_map(|r| match &r.state {
                    NodeState::Damaged { problems } => {
                        Some(format!("{}: {}", r.node, problems.join("; ")))
                    }
                    _ => None,
                })
                .collect();
            if !damaged.is_empty() {
                anyhow::bail!(
                    "no chain of {} can be read, damaged: {}; `cachemoney run` rebuilds it",
                    self.pipeline.path.display(),
                    damaged.join("; ")
                );
            }
            return Err(crate::chain::none_built(&self.pipeline));
        }
        if let Some(Claim {
            chain: Some(chain), ..
        }) = claim
        {
            if !rows.iter().any(|r| &r.node == chain) {
                let built: Vec<&str> = rows.iter().map(|r| r.node.as_str()).collect();
                anyhow::bail!(
                    "--chain {chain}: not a built chain of {} (built: {})",
                    self.pipeline.path.display(),
                    built.join(", ")
                );
            }
        }
        if json {
            outln!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            print_table(&rows)?;
            if !unbuilt.is_empty() {
                outln!("\nnot built (run `cachemoney run`): {}", unbuilt.join(", "));
            }
        }
        let Some(claim) = claim else {
            return Ok(true);
        };
        let checked = rows
            .iter()
            .filter(|r| claim.chain.as_ref().is_none_or(|c| c == &r.node));
        let mut lines = Vec::new();
        let mut all_within = true;
        for row in checked {
            let Some(bpb) = row.final_bpb else { continue };
            let (line, within) = claim.judge(&row.node, bpb);
            all_within &= within;
            lines.push(line);
        }
        let how = match claim.stated {
            true => "the stated spread",
            false => "half a unit of its last digit",
        };
        let out = format!(
            "\nclaim {} ± {} ({how}):\n  {}",
            claim.bpb,
            claim.spread_text,
            lines.join("\n  ")
        );
        match json {
            true => eprintln!("{}", out.trim_start()),
            false => outln!("{out}"),
        }
        Ok(all_within)
    }

    /// The stored report of `node`, if it is built and intact.
    fn built_report(
        &self,
        resolved: &[Resolved],
        node: &str,
    ) -> Result<Option<Map<String, Value>>> {
        let Some(r) = resolved.iter().find(|r| r.node == node) else {
            return Ok(None);
        };
        Ok(match (&r.state, &r.recipe) {
            (NodeState::Cached { .. }, Some(recipe)) => {
                self.store.manifest(&r.stage, recipe)?.map(|m| m.report)
            }
            _ => None,
        })
    }

    fn compare_row(
        &self,
        resolved: &[Resolved],
        chain: &Chain,
        report: &Map<String, Value>,
    ) -> Result<CompareRow> {
        let mass = match &chain.audit {
            Some(audit) => self.built_report(resolved, audit)?,
            None => None,
        };
        let mass = mass.as_ref().and_then(MassReport::from_report);
        let pass1 = chain.pass1.clone().unwrap_or_else(|| "?".into());
        let param = |node: &str, key: &str| {
            self.pipeline
                .node(node)
                .ok()
                .and_then(|n| n.params.get(key).cloned())
        };
        let model = param(&pass1, "model")
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_else(|| "?".into());
        let (legality_node, legality) = self.legality_of(resolved, &chain.scores)?;
        let mut row = CompareRow {
            node: chain.scores.clone(),
            pass1: pass1.clone(),
            model,
            temperature: param(&pass1, "temperature").and_then(|v| v.as_f64()),
            mode: "?".into(),
            neural_bpb: None,
            ngram_bpb: None,
            final_bpb: None,
            alpha_high: None,
            entropy_thresh: None,
            entries: None,
            audit: mass.as_ref().and(chain.audit.clone()),
            mass_mean: mass.as_ref().map(|m| m.mass_mean),
            mass_max: mass.as_ref().map(|m| m.mass_max),
            sample_bpb: mass.as_ref().map(|m| m.sample_bpb),
            normalised_sample_bpb: mass.as_ref().map(|m| m.normalised_sample_bpb),
            legality_node,
            legality,
        };
        // A tilt chain's report is a pass-1's: BPB before and after the tilt.
        match chain.tilt_mode(&self.pipeline) {
            Some(mode) => {
                row.mode = mode;
                if let Some(t) = TiltReport::from_report(report) {
                    row.neural_bpb = Some(t.bpb_before);
                    row.final_bpb = Some(t.neural_bpb);
                    row.entries = Some(t.entries);
                }
            }
            None => {
                if let Some(s) = Pass2Summary::from_report(report) {
                    row.mode = serde_json::to_value(s.mode)?
                        .as_str()
                        .unwrap_or("?")
                        .to_string();
                    row.neural_bpb = Some(s.neural_bpb);
                    row.ngram_bpb = Some(s.ngram_bpb);
                    row.final_bpb = Some(s.final_bpb);
                    row.alpha_high = Some(s.alpha_high);
                    row.entropy_thresh = Some(s.entropy_thresh);
                    row.entries = Some(s.entries);
                }
            }
        }
        Ok(row)
    }

    /// The first legality node that judges `chain`, and its verdict in a word or few.
    fn legality_of(
        &self,
        resolved: &[Resolved],
        chain: &str,
    ) -> Result<(Option<String>, Option<String>)> {
        let products = Products::new(&self.pipeline);
        let Some(judge) = products
            .producers(LEGALITY.name)
            .into_iter()
            .find(|n| n.inputs.get("chain").map(String::as_str) == Some(chain))
        else {
            return Ok((None, None));
        };
        let verdict = match self.verdicts(resolved, &judge.name)? {
            None => "not built".to_string(),
            Some(rows) => {
                let failed: Vec<&str> = rows
                    .iter()
                    .filter(|r| r.verdict == "fail")
                    .map(|r| r.probe.as_str())
                    .collect();
                match failed.is_empty() {
                    true => "pass".to_string(),
                    false => format!("FAIL {}", failed.join(" ")),
                }
            }
        };
        Ok((Some(judge.name.clone()), Some(verdict)))
    }
}

fn state_of<'a>(resolved: &'a [Resolved], node: &str) -> Option<&'a NodeState> {
    resolved.iter().find(|r| r.node == node).map(|r| &r.state)
}

fn print_table(rows: &[CompareRow]) -> anyhow::Result<()> {
    let mut groups: Vec<&str> = rows.iter().map(|r| r.pass1.as_str()).collect();
    groups.dedup();
    let bpb = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.4}"));
    for (i, pass1) in groups.iter().enumerate() {
        let group: Vec<&CompareRow> = rows.iter().filter(|r| r.pass1 == *pass1).collect();
        if i > 0 {
            outln!();
        }
        outln!(
            "pass-1 '{pass1}' (model {}{}, {} entries)",
            group[0].model,
            group[0]
                .temperature
                .map_or(String::new(), |t| format!(", temperature {t}")),
            group[0].entries.map_or("?".into(), |n| n.to_string())
        );
        outln!(
            "  {:<18} {:<17} {:>7} {:>12} {:>7} {:>10} {:>10}  legality",
            "mode",
            "node",
            "neural",
            "after n-gram",
            "final",
            "mass mean",
            "renorm BPB"
        );
        for r in group {
            outln!(
                "  {:<18} {:<17} {:>7} {:>12} {:>7} {:>10} {:>10}  {}",
                r.mode,
                r.node,
                bpb(r.neural_bpb),
                bpb(r.ngram_bpb),
                bpb(r.final_bpb),
                bpb(r.mass_mean),
                bpb(r.normalised_sample_bpb),
                r.legality.as_deref().unwrap_or("-"),
            );
        }
    }
    outln!("\nmass mean: Σ_v p(v) at the sampled positions (1 for a distribution); renorm BPB: the BPB there with p(target)/Σ_v p(v), from the chain's audit-mass node; legality: the verdict of the chain's legality node, the failed probes named ('-': none built)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Claim;

    #[test]
    fn a_claim_is_as_precise_as_it_is_written_unless_a_spread_is_stated() {
        let claim = Claim::parse("1.0565", None, None).unwrap();
        assert_eq!((claim.bpb, claim.stated), (1.0565, false));
        assert!((claim.spread - 0.00005).abs() < 1e-15);
        assert!(claim.judge("a", 1.05654).1);
        assert!(!claim.judge("a", 1.05656).1);
        let stated = Claim::parse("0.0804", Some(0.00003), None).unwrap();
        let (line, within) = stated.judge("scores", 0.08046);
        assert!(!within);
        assert_eq!(
            line,
            "scores: BPB 0.080460, +0.000060 from the claim, 2.0 spreads: OUTSIDE"
        );
        assert!(Claim::parse("-1", None, None).is_err());
        assert!(Claim::parse("1.0", Some(-0.1), None).is_err());
    }
}
