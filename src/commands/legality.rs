//! `cachemoney legality`: the legality probes' verdicts on every chain, as one matrix,
//! with the evidence behind each failure; the exit status says whether any failed, so
//! a submission's CI can gate on it.

use anyhow::{bail, Result};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Float64Type, Int64Type, UInt64Type};
use serde::Serialize;

use super::Session;
use crate::chain::Products;
use crate::runner::{NodeState, Resolved};
use stage_api::products::LEGALITY;

/// One probe's verdict on one chain (`legality --json` prints a list of these).
#[derive(Debug, Clone, Serialize)]
pub struct LegalityRow {
    /// The judging node.
    pub node: String,
    pub chain: String,
    /// The BPB the chain claims (every entry counted), from the judge's report.
    pub bpb: Option<f64>,
    pub probe: String,
    pub verdict: String,
    pub checked: u64,
    pub position: Option<i64>,
    pub expected: Option<f64>,
    pub observed: Option<f64>,
    pub detail: String,
}

impl Session {
    /// Prints the matrix; returns whether every verdict shown passed.
    pub fn legality(&self, wanted: &[String], json: bool) -> Result<bool> {
        let resolved = self.context().resolve()?;
        let products = Products::new(&self.pipeline);
        let judges: Vec<_> = products
            .producers(LEGALITY.name)
            .into_iter()
            .filter(|n| {
                wanted.is_empty()
                    || wanted
                        .iter()
                        .any(|w| *w == n.name || n.params["chain"].as_str() == Some(w.as_str()))
            })
            .collect();
        if judges.is_empty() {
            if wanted.is_empty() {
                bail!(
                    "{} has no legality node (stage = \"legality\"); docs/legality.md shows how to add one per chain",
                    self.pipeline.path.display()
                );
            }
            bail!(
                "no legality node or chain called {} in {}",
                wanted.join(", "),
                self.pipeline.path.display()
            );
        }
        let mut rows = Vec::new();
        let mut unbuilt = Vec::new();
        for judge in judges {
            match self.verdicts(&resolved, &judge.name)? {
                Some(verdicts) => rows.extend(verdicts),
                None => unbuilt.push(judge.name.clone()),
            }
        }
        if rows.is_empty() {
            bail!(
                "no legality node is built yet ({}); run `cachemoney run` first",
                unbuilt.join(", ")
            );
        }
        if json {
            outln!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            print_matrix(&rows)?;
            if !unbuilt.is_empty() {
                outln!("not built yet: {}", unbuilt.join(", "));
            }
        }
        Ok(rows.iter().all(|r| r.verdict != "fail"))
    }
}

impl Session {
    /// A built legality node's verdicts (None: not built).
    pub(super) fn verdicts(
        &self,
        resolved: &[Resolved],
        judge: &str,
    ) -> Result<Option<Vec<LegalityRow>>> {
        let r = resolved.iter().find(|r| r.node == judge).expect("resolved");
        let (NodeState::Cached { .. }, Some(recipe)) = (&r.state, &r.recipe) else {
            return Ok(None);
        };
        let path = self
            .store
            .artifact_dir(&r.stage, recipe)
            .join(format!("{}.parquet", LEGALITY.name));
        let bpb = self
            .store
            .manifest(&r.stage, recipe)?
            .and_then(|m| legality::LegalityReport::from_report(&m.report))
            .and_then(|r| r.bpb);
        let mut rows = Vec::new();
        for batch in stage_api::read_parquet(&path)? {
            rows.extend(rows_of(judge, bpb, &batch));
        }
        Ok(Some(rows))
    }
}

fn rows_of(node: &str, bpb: Option<f64>, batch: &RecordBatch) -> Vec<LegalityRow> {
    let text = |name: &str| {
        batch
            .column_by_name(name)
            .expect("declared")
            .as_string::<i32>()
            .clone()
    };
    let (chain, probe, verdict, detail) = (
        text("chain"),
        text("probe"),
        text("verdict"),
        text("detail"),
    );
    let checked = batch
        .column_by_name("checked")
        .expect("declared")
        .as_primitive::<UInt64Type>()
        .clone();
    let position = batch
        .column_by_name("position")
        .expect("declared")
        .as_primitive::<Int64Type>()
        .clone();
    let float = |name: &str| {
        batch
            .column_by_name(name)
            .expect("declared")
            .as_primitive::<Float64Type>()
            .clone()
    };
    let (expected, observed) = (float("expected"), float("observed"));
    (0..batch.num_rows())
        .map(|i| LegalityRow {
            node: node.to_string(),
            chain: chain.value(i).to_string(),
            bpb,
            probe: probe.value(i).to_string(),
            verdict: verdict.value(i).to_string(),
            checked: checked.value(i),
            position: position.is_valid(i).then(|| position.value(i)),
            expected: expected.is_valid(i).then(|| expected.value(i)),
            observed: observed.is_valid(i).then(|| observed.value(i)),
            detail: detail.value(i).to_string(),
        })
        .collect()
}

/// Chains down, probes across; then one line of evidence per failure. A row is one
/// judge: a chain judged by two nodes (with other cuts, say) gets a row for each, named
/// after its node, so that no row mixes two judges' verdicts.
fn print_matrix(rows: &[LegalityRow]) -> anyhow::Result<()> {
    let mut judges: Vec<(&str, &str, Option<f64>)> = Vec::new();
    let mut probes: Vec<&str> = Vec::new();
    for r in rows {
        if !judges.iter().any(|(node, _, _)| *node == r.node) {
            judges.push((&r.node, &r.chain, r.bpb));
        }
        if !probes.contains(&r.probe.as_str()) {
            probes.push(&r.probe);
        }
    }
    let label = |node: &str, chain: &str| {
        if judges.iter().filter(|(_, c, _)| *c == chain).count() > 1 {
            format!("{chain} ({node})")
        } else {
            chain.to_string()
        }
    };
    let labels: Vec<String> = judges.iter().map(|(n, c, _)| label(n, c)).collect();
    let width = labels.iter().map(|c| c.len()).max().unwrap_or(0).max(5);
    // Wide enough for the probe's name and its longest verdict ("mismatch").
    let cell = |p: &str| {
        rows.iter()
            .filter(|r| r.probe == p)
            .map(|r| r.verdict.len())
            .fold(p.len().max(6), usize::max)
    };
    let mut header = format!("{:width$}  {:>6}", "chain", "BPB");
    for p in &probes {
        header += &format!("  {:w$}", p, w = cell(p));
    }
    outln!("{}", header.trim_end());
    for ((node, _, bpb), name) in judges.iter().zip(&labels) {
        let bpb = bpb.map_or("-".to_string(), |b| format!("{b:.4}"));
        let mut line = format!("{name:width$}  {bpb:>6}");
        for p in &probes {
            let verdict = rows
                .iter()
                .find(|r| r.node == *node && r.probe == *p)
                .map_or("-", |r| match r.verdict.as_str() {
                    "fail" => "FAIL",
                    v => v,
                });
            line += &format!("  {:w$}", verdict, w = cell(p));
        }
        outln!("{}", line.trim_end());
    }
    // A failure, or a finding that is neither (an order mismatch), with its evidence.
    let failures: Vec<&LegalityRow> = rows.iter().filter(|r| r.verdict != "pass").collect();
    if failures.is_empty() {
        outln!("every probe passed");
        return Ok(());
    }
    outln!();
    for r in failures {
        let values = match (r.position, r.expected, r.observed) {
            (Some(p), Some(e), Some(o)) => format!(" [position {p}: {e} vs {o}]"),
            _ => String::new(),
        };
        outln!(
            "{} {}: {}{values}",
            label(&r.node, &r.chain),
            r.probe,
            r.detail
        );
    }
    Ok(())
}
