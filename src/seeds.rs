//! The `seeds` table of a multi-seed run (`cachemoney run --seeds 1337,42,2024`): every
//! metric of every node that depends on the run seed, per seed, with its mean and
//! sample standard deviation, the way the record reports its three seeds.
//!
//! Which nodes depend on the seed is the pipeline's business ([`Pipeline::for_seeds`]);
//! which report keys are worth tabulating is each stage's ([`stage_api::Stage::metrics`]).
//! This module only reads manifests and does arithmetic.
//!
//! [`Pipeline::for_seeds`]: crate::pipeline::Pipeline::for_seeds

use std::sync::Arc;

use anyhow::Result;
use arrow::array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};

use crate::pipeline::Pipeline;
use crate::registry::Registry;
use crate::runner::{NodeState, Resolved};
use crate::store::Store;

/// One row: a seed's value of a metric (`kind = "seed"`), or the metric's `mean` or `std`
/// over the seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedRow {
    /// The node as `pipeline.toml` names it (not its `_seedN` copy).
    pub node: String,
    pub stage: String,
    pub metric: String,
    pub kind: &'static str,
    pub seed: Option<u64>,
    /// Missing when that seed's copy is not built (or, for `mean`/`std`, when any is not).
    pub value: Option<f64>,
    /// The artifact the value was read from (per-seed rows only).
    pub content_hash: Option<String>,
}

/// Every seeded node's metrics, in pipeline order; empty unless the pipeline was
/// expanded for seeds.
pub fn seed_rows(
    pipeline: &Pipeline,
    registry: &Registry,
    store: &Store,
    resolved: &[Resolved],
) -> Result<Vec<SeedRow>> {
    let mut rows = Vec::new();
    let mut bases: Vec<(&str, &str)> = Vec::new();
    // The legality re-runs' metrics (a BPB on a shuffled stream) are not results.
    for node in pipeline.nodes.iter().filter(|n| n.rerun.is_none()) {
        if let Some(variant) = &node.variant {
            if !bases.iter().any(|(b, _)| *b == variant.base) {
                bases.push((&variant.base, &node.stage));
            }
        }
    }
    for (base, stage) in bases {
        let metrics = registry.get(stage).expect("validated").spec().metrics;
        if metrics.is_empty() {
            continue;
        }
        // Each seed's report, if its copy is built with the current recipe.
        let mut reports = Vec::new();
        for &seed in &pipeline.seeds {
            let copy = pipeline.nodes.iter().find(|n| {
                n.variant
                    .as_ref()
                    .is_some_and(|v| v.base == base && v.seed == seed)
            });
            let built = copy
                .and_then(|c| resolved.iter().find(|r| r.node == c.name))
                .and_then(|r| match (&r.state, &r.recipe) {
                    (NodeState::Cached { .. }, Some(recipe)) => Some((r, recipe)),
                    _ => None,
                });
            let manifest = match built {
                Some((r, recipe)) => store.manifest(&r.stage, recipe)?,
                None => None,
            };
            reports.push((seed, manifest));
        }
        for metric in metrics {
            let values: Vec<Option<f64>> = reports
                .iter()
                .map(|(_, m)| {
                    m.as_ref()
                        .and_then(|m| m.report.get(*metric))
                        .and_then(|v| v.as_f64())
                })
                .collect();
            let row = |kind, seed, value, content_hash| SeedRow {
                node: base.to_string(),
                stage: stage.to_string(),
                metric: metric.to_string(),
                kind,
                seed,
                value,
                content_hash,
            };
            for ((seed, manifest), value) in reports.iter().zip(&values) {
                rows.push(row(
                    "seed",
                    Some(*seed),
                    *value,
                    manifest.as_ref().map(|m| m.content_hash.clone()),
                ));
            }
            let all: Option<Vec<f64>> = values.iter().copied().collect();
            let (mean, std) = match all {
                Some(values) => mean_and_sample_std(&values),
                None => (None, None),
            };
            rows.push(row("mean", None, mean, None));
            rows.push(row("std", None, std, None));
        }
    }
    Ok(rows)
}

/// The mean and the sample standard deviation (n − 1 in the denominator: the record's
/// post-quant "Std 0.0013" over 1.3268, 1.3293, 1.3273 is this one; the population
/// std would be 0.0011). The std needs two values.
pub fn mean_and_sample_std(values: &[f64]) -> (Option<f64>, Option<f64>) {
    if values.is_empty() {
        return (None, None);
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (Some(mean), None);
    }
    let squares: f64 = values.iter().map(|v| (v - mean) * (v - mean)).sum();
    (Some(mean), Some((squares / (n - 1.0)).sqrt()))
}

pub fn to_batch(rows: &[SeedRow]) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("node", DataType::Utf8, false),
        Field::new("stage", DataType::Utf8, false),
        Field::new("metric", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("seed", DataType::UInt64, true),
        Field::new("value", DataType::Float64, true),
        Field::new("content_hash", DataType::Utf8, true),
    ]));
    let strings = |f: fn(&SeedRow) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    let columns: Vec<ArrayRef> = vec![
        strings(|r| &r.node),
        strings(|r| &r.stage),
        strings(|r| &r.metric),
        strings(|r| r.kind),
        Arc::new(UInt64Array::from_iter(rows.iter().map(|r| r.seed))),
        Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.value))),
        Arc::new(StringArray::from_iter(
            rows.iter().map(|r| r.content_hash.as_deref()),
        )),
    ];
    RecordBatch::try_new(schema, columns).expect("columns match the schema")
}

/// The table pivoted for reading: one line per node and metric, one column per seed.
pub fn print(rows: &[SeedRow], seeds: &[u64]) -> anyhow::Result<()> {
    let mut header = format!("{:<22} {:<22}", "node", "metric");
    for seed in seeds {
        header.push_str(&format!(" {:>10}", seed));
    }
    header.push_str(&format!(" {:>10} {:>10}", "mean", "std"));
    outln!("{header}");
    let number = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.6}"));
    for group in rows.chunk_by(|a, b| a.node == b.node && a.metric == b.metric) {
        let mut line = format!("{:<22} {:<22}", group[0].node, group[0].metric);
        for seed in seeds {
            let value = group
                .iter()
                .find(|r| r.seed == Some(*seed))
                .and_then(|r| r.value);
            line.push_str(&format!(" {:>10}", number(value)));
        }
        for kind in ["mean", "std"] {
            let value = group.iter().find(|r| r.kind == kind).and_then(|r| r.value);
            line.push_str(&format!(" {:>10}", number(value)));
        }
        outln!("{line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_records_three_seeds_give_its_std() {
        let (mean, std) = mean_and_sample_std(&[1.3268, 1.3293, 1.3273]);
        assert!((mean.unwrap() - 1.3278).abs() < 1e-4);
        assert_eq!(format!("{:.4}", std.unwrap()), "0.0013");
        assert_eq!(mean_and_sample_std(&[0.5]), (Some(0.5), None));
        assert_eq!(mean_and_sample_std(&[]), (None, None));
        assert_eq!(mean_and_sample_std(&[2.0, 2.0]), (Some(2.0), Some(0.0)));
    }
}
