//! `cachemoney compare`: the BPB of every built chain side by side, grouped by the pass-1
//! they score, so the leaky reference number and the honest ones are read off one table.

use anyhow::Result;
use serde::Serialize;
use serde_json::{Map, Value};

use super::Session;
use crate::chain::{Chain, Products};
use crate::runner::{NodeState, Resolved};

/// One row of `compare` (and of `compare --json`): a chain's figures from its `scores`
/// node's report and, where built, its implied-mass audit's.
#[derive(Debug, Serialize)]
pub struct CompareRow {
    /// The node that produced the scores.
    pub node: String,
    /// The pass-1 node it scores, and that node's `model` parameter.
    pub pass1: String,
    pub model: String,
    /// The cache mode (`reference`, `causal`, `causal-normalised`).
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
}

impl Session {
    pub fn compare(&self, json: bool) -> Result<()> {
        let resolved = self.context().resolve()?;
        let mut rows = Vec::new();
        let mut unbuilt = Vec::new();
        for chain in Products::new(&self.pipeline, &self.registry).chains() {
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
            return Err(crate::chain::none_built(&self.pipeline));
        }
        if json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
            return Ok(());
        }
        print_table(&rows);
        if !unbuilt.is_empty() {
            println!("\nnot built (run `cachemoney run`): {}", unbuilt.join(", "));
        }
        Ok(())
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
        let number = |report: Option<&Map<String, Value>>, key: &str| {
            report.and_then(|r| r.get(key)).and_then(Value::as_f64)
        };
        let pass1 = chain.pass1.clone().unwrap_or_else(|| "?".into());
        let model = self
            .pipeline
            .node(&pass1)
            .ok()
            .and_then(|n| n.params.get("model").and_then(Value::as_str))
            .unwrap_or("?")
            .to_string();
        Ok(CompareRow {
            node: chain.scores.clone(),
            pass1,
            model,
            mode: report
                .get("mode")
                .and_then(Value::as_str)
                .unwrap_or("?")
                .to_string(),
            neural_bpb: number(Some(report), "neural_bpb"),
            ngram_bpb: number(Some(report), "ngram_bpb"),
            final_bpb: number(Some(report), "final_bpb"),
            alpha_high: number(Some(report), "alpha_high"),
            entropy_thresh: number(Some(report), "entropy_thresh"),
            entries: report.get("entries").and_then(Value::as_u64),
            audit: mass.as_ref().and(chain.audit.clone()),
            mass_mean: number(mass.as_ref(), "mass_mean"),
            mass_max: number(mass.as_ref(), "mass_max"),
            sample_bpb: number(mass.as_ref(), "sample_bpb"),
            normalised_sample_bpb: number(mass.as_ref(), "normalised_sample_bpb"),
        })
    }
}

fn state_of<'a>(resolved: &'a [Resolved], node: &str) -> Option<&'a NodeState> {
    resolved.iter().find(|r| r.node == node).map(|r| &r.state)
}

fn print_table(rows: &[CompareRow]) {
    let mut groups: Vec<&str> = rows.iter().map(|r| r.pass1.as_str()).collect();
    groups.dedup();
    let bpb = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.4}"));
    let param = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x}"));
    for (i, pass1) in groups.iter().enumerate() {
        let group: Vec<&CompareRow> = rows.iter().filter(|r| r.pass1 == *pass1).collect();
        if i > 0 {
            println!();
        }
        println!(
            "pass-1 '{pass1}' (model {}, {} entries)",
            group[0].model,
            group[0].entries.map_or("?".into(), |n| n.to_string())
        );
        println!(
            "  {:<18} {:<18} {:>7} {:>12} {:>7} {:>10} {:>14} {:>10} {:>10}",
            "mode",
            "node",
            "neural",
            "after n-gram",
            "final",
            "alpha_high",
            "entropy_thresh",
            "mass mean",
            "renorm BPB"
        );
        for r in group {
            println!(
                "  {:<18} {:<18} {:>7} {:>12} {:>7} {:>10} {:>14} {:>10} {:>10}",
                r.mode,
                r.node,
                bpb(r.neural_bpb),
                bpb(r.ngram_bpb),
                bpb(r.final_bpb),
                param(r.alpha_high),
                param(r.entropy_thresh),
                bpb(r.mass_mean),
                bpb(r.normalised_sample_bpb),
            );
        }
    }
    println!("\nmass mean: Σ_v p(v) at the sampled positions (1 for a distribution); renorm BPB: the BPB there with p(target)/Σ_v p(v), from the chain's audit-mass node ('-': none built)");
}
