//! `cachemoney audit`: re-executes stored artifacts from their stored inputs and
//! compares the result with what the manifest claims, byte for byte.
//!
//! `verify` proves that files were not changed after they were written; `audit` proves
//! that the code, given the same inputs and parameters, writes them again. A mismatch is
//! located as precisely as the file allows: for a table, the column and the first row
//! that differ, with both values; for another file, the first differing byte.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use arrow::array::{Array, ArrayRef, RecordBatchReader};
use arrow::util::display::array_value_to_string;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Serialize;

use crate::recipe::short;
use crate::runner::{self, NodeState, RunContext, RunOptions};
use crate::store::{hash_file, Manifest};

/// One node's audit.
#[derive(Debug, Clone, Serialize)]
pub struct AuditOutcome {
    pub node: String,
    pub stage: String,
    pub identical: bool,
    pub content_hash: String,
    pub rebuilt_content_hash: String,
    /// Where the rebuild differs (empty when identical).
    pub differences: Vec<String>,
    /// Report entries that describe the build (the code's size) and differ: shown, not
    /// counted as differences.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    pub seconds: f64,
}

/// Audits `nodes` (all of the pipeline's when empty), in pipeline order. Every one must
/// be built with its current recipe: an audit compares a claim with a rebuild, and an
/// unbuilt node makes no claim.
pub fn audit(
    ctx: &RunContext,
    nodes: &[String],
    options: &RunOptions,
    mut on_outcome: impl FnMut(&AuditOutcome) -> Result<()>,
) -> Result<Vec<AuditOutcome>> {
    let mut wanted = std::collections::BTreeSet::new();
    for node in nodes {
        for named in ctx.pipeline.nodes_named(node)? {
            wanted.insert(named.name.clone());
        }
    }
    let resolved = ctx.resolve()?;
    // Built nodes, damaged ones included: a damaged artifact still makes a claim (its
    // manifest), which the audit compares with both the stored bytes and a rebuild.
    let mut upstream: BTreeMap<String, (PathBuf, Manifest)> = BTreeMap::new();
    for r in &resolved {
        if let (NodeState::Cached { .. } | NodeState::Damaged { .. }, Some(recipe)) =
            (&r.state, &r.recipe)
        {
            if let Ok(Some(manifest)) = ctx.store.manifest(&r.stage, recipe) {
                let dir = ctx.store.artifact_dir(&r.stage, recipe);
                upstream.insert(r.node.clone(), (dir, manifest));
            }
        }
    }
    let selected: Vec<&runner::Resolved> = resolved
        .iter()
        .filter(|r| nodes.is_empty() || wanted.contains(&r.node))
        .collect();
    for r in &selected {
        if !upstream.contains_key(&r.node) {
            bail!(
                "node '{}' is not built with its current recipe ({}); `cachemoney run` first, then audit",
                r.node,
                match &r.state {
                    NodeState::Stale { .. } => "stale",
                    NodeState::Damaged { .. } => "its manifest is unreadable",
                    _ => "missing",
                }
            );
        }
    }

    let lock = ctx.store.lock(options.wait)?;
    ctx.store.sweep_tmp(&lock)?;
    let mut outcomes = Vec::new();
    for r in selected {
        let node = ctx.pipeline.node(&r.node)?;
        let (stored_dir, stored) = &upstream[&r.node];
        let ingredients = r.ingredients.clone().expect("built nodes have ingredients");
        let started = Instant::now();
        let (scratch, rebuilt) = runner::build(
            ctx,
            &runner::BuildRequest {
                node,
                ingredients: &ingredients,
                recipe: &stored.recipe,
                upstream: &upstream,
                lock: &lock,
                show_progress: options.show_progress,
            },
        )
        .with_context(|| format!("auditing node '{}' ({})", r.node, r.stage))?;
        let seconds = started.elapsed().as_secs_f64();
        let (differences, notes) = compare(&r.node, stored_dir, stored, &scratch, &rebuilt);
        std::fs::remove_dir_all(&scratch).ok();
        let outcome = AuditOutcome {
            node: r.node.clone(),
            stage: r.stage.clone(),
            identical: differences.is_empty(),
            content_hash: stored.content_hash.clone(),
            rebuilt_content_hash: rebuilt.content_hash.clone(),
            differences,
            notes,
            seconds,
        };
        on_outcome(&outcome)?;
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// Everything that differs between the stored artifact and its rebuild: the stored bytes
/// against the manifest (every file, rehashed), the files the content hash covers
/// against the rebuild, and the stage's report; and, apart, the report entries that
/// describe the build and differ.
fn compare(
    node: &str,
    stored_dir: &Path,
    stored: &Manifest,
    rebuilt_dir: &Path,
    rebuilt: &Manifest,
) -> (Vec<String>, Vec<String>) {
    let mut notes = Vec::new();
    let mut differences = Vec::new();
    let names: std::collections::BTreeSet<&String> =
        stored.files.keys().chain(rebuilt.files.keys()).collect();
    for name in names {
        // What is on disk now, not what the manifest says was written.
        let on_disk = stored
            .files
            .get(name)
            .map(|_| hash_file(&stored_dir.join(name)).ok());
        let stored_intact = |s: &crate::store::OutputFile| {
            on_disk.as_ref().and_then(|h| h.as_deref()) == Some(s.blake3.as_str())
        };
        match (stored.files.get(name), rebuilt.files.get(name)) {
            (Some(s), _) if s.volatile && !stored_intact(s) => differences.push(format!(
                "{name}: the stored file {} (volatile, so not compared with the rebuild)",
                describe_damage(node, on_disk.as_ref().and_then(|h| h.as_deref()), s)
            )),
            (Some(s), _) if s.volatile => {}
            (_, Some(r)) if r.volatile => {}
            (Some(_), None) => differences.push(format!("{name}: not written by the rebuild")),
            (None, Some(_)) => {
                differences.push(format!("{name}: written by the rebuild, not stored"))
            }
            (Some(s), Some(r)) if s.blake3 == r.blake3 && stored_intact(s) => {}
            (Some(s), Some(r)) => {
                let stored_path = stored_dir.join(name);
                let mut line = if s.blake3 == r.blake3 {
                    format!(
                        "{name}: the rebuild matches the manifest, but the stored file {}",
                        describe_damage(node, on_disk.as_ref().and_then(|h| h.as_deref()), s)
                    )
                } else {
                    format!(
                        "{name}: blake3 {} stored, {} rebuilt",
                        short(&s.blake3),
                        short(&r.blake3)
                    )
                };
                if s.blake3 != r.blake3 && !stored_intact(s) {
                    line.push_str(&format!(
                        " (and the stored file {})",
                        describe_damage(node, on_disk.as_ref().and_then(|h| h.as_deref()), s)
                    ));
                }
                if on_disk.as_ref().is_some_and(Option::is_none) {
                    differences.push(line);
                    continue;
                }
                let rebuilt_path = rebuilt_dir.join(name);
                let located = if name.ends_with(".parquet") {
                    first_table_difference(&stored_path, &rebuilt_path).or_else(|_| {
                        // A damaged footer makes the stored table unreadable: bytes, then.
                        first_byte_difference(&stored_path, &rebuilt_path)
                    })
                } else {
                    first_byte_difference(&stored_path, &rebuilt_path)
                };
                match located {
                    Ok(Some(place)) => line.push_str(&format!("; {place}")),
                    Ok(None) => line.push_str("; same values, different encoding"),
                    Err(e) => line.push_str(&format!("; cannot compare: {e:#}")),
                }
                differences.push(line);
            }
            (None, None) => unreachable!("the name came from one of them"),
        }
    }
    for key in stored
        .report
        .keys()
        .chain(rebuilt.report.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (a, b) = (stored.report.get(key), rebuilt.report.get(key));
        if a != b {
            let line = format!(
                "report {key}: stored {}, rebuilt {}",
                a.map_or("(none)".into(), |v| v.to_string()),
                b.map_or("(none)".into(), |v| v.to_string())
            );
            // The rebuild's list counts too: a manifest written before the stage declared
            // the entry volatile does not list it.
            if key == stage_api::NUMERICS_KEY {
                notes.push(format!(
                    "stored bytes computed with {}, the rebuild with {}: other kernels may give other bytes",
                    text(a),
                    text(b)
                ));
            } else if stored.volatile_report.contains(key) || rebuilt.volatile_report.contains(key)
            {
                notes.push(format!("{line} (describes the build, not compared)"));
            } else {
                differences.push(line);
            }
        }
    }
    (differences, notes)
}

/// A report entry's text, without JSON's quotes.
fn text(value: Option<&serde_json::Value>) -> String {
    match value {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "kernels it did not record".into(),
    }
}

/// How a stored file departs from its manifest entry (`on_disk`: its blake3 now, `None`
/// when it cannot be read).
fn describe_damage(
    node: &str,
    on_disk: Option<&str>,
    recorded: &crate::store::OutputFile,
) -> String {
    match on_disk {
        None => format!("is missing or unreadable; repair it with `cachemoney run --force {node}`"),
        Some(hash) => format!(
            "no longer matches its manifest (blake3 {} on disk, {} recorded); repair it with `cachemoney run --force {node}`",
            short(hash),
            short(&recorded.blake3)
        ),
    }
}

/// The first differing byte of two files.
fn first_byte_difference(a: &Path, b: &Path) -> Result<Option<String>> {
    let a_bytes = std::fs::read(a).with_context(|| format!("{}", a.display()))?;
    let b_bytes = std::fs::read(b).with_context(|| format!("{}", b.display()))?;
    let at = a_bytes
        .iter()
        .zip(&b_bytes)
        .position(|(x, y)| x != y)
        .or_else(|| (a_bytes.len() != b_bytes.len()).then(|| a_bytes.len().min(b_bytes.len())));
    Ok(at.map(|offset| {
        format!(
            "first differing byte at offset {offset} (sizes {} and {})",
            a_bytes.len(),
            b_bytes.len()
        )
    }))
}

const COMPARE_BATCH_ROWS: usize = 65_536;

fn open_batches(path: &Path) -> Result<parquet::arrow::arrow_reader::ParquetRecordBatchReader> {
    let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: unreadable Parquet", path.display()))?
        .with_batch_size(COMPARE_BATCH_ROWS)
        .build()
        .with_context(|| format!("{}: unreadable Parquet", path.display()))
}

/// The first column (in schema order) whose values differ, with its first differing row
/// and both values; or a schema or row-count difference.
fn first_table_difference(stored: &Path, rebuilt: &Path) -> Result<Option<String>> {
    let mut a = open_batches(stored)?;
    let mut b = open_batches(rebuilt)?;
    if a.schema() != b.schema() {
        let describe = |s: &arrow::datatypes::Schema| {
            s.fields()
                .iter()
                .map(|f| format!("{} {}", f.name(), f.data_type()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Ok(Some(format!(
            "schema differs: stored ({}), rebuilt ({})",
            describe(&a.schema()),
            describe(&b.schema())
        )));
    }
    let schema = a.schema();
    // Per column: its first differing row, once found.
    let mut first: Vec<Option<(usize, String, String)>> = vec![None; schema.fields().len()];
    let mut offset = 0usize;
    loop {
        let (x, y) = (a.next().transpose()?, b.next().transpose()?);
        let (x, y) = match (x, y) {
            (None, None) => break,
            (Some(x), Some(y)) if x.num_rows() == y.num_rows() => (x, y),
            (x, y) => {
                let rows =
                    |r: &Option<arrow::array::RecordBatch>| r.as_ref().map_or(0, |b| b.num_rows());
                return Ok(Some(format!(
                    "row counts differ from row {offset} on ({} stored, {} rebuilt in the next batch)",
                    rows(&x),
                    rows(&y)
                )));
            }
        };
        for (column, slot) in first.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            let (xa, ya) = (x.column(column), y.column(column));
            if xa.to_data() == ya.to_data() {
                continue;
            }
            if let Some(row) = first_differing_row(xa, ya) {
                *slot = Some((
                    offset + row,
                    array_value_to_string(xa, row).unwrap_or_default(),
                    array_value_to_string(ya, row).unwrap_or_default(),
                ));
            }
        }
        if first.iter().all(Option::is_some) {
            break;
        }
        offset += x.num_rows();
    }
    let differing: Vec<String> = first
        .iter()
        .enumerate()
        .filter_map(|(column, found)| {
            found.as_ref().map(|(row, s, r)| {
                format!(
                    "column '{}' first differs at row {row}: stored {s}, rebuilt {r}",
                    schema.field(column).name()
                )
            })
        })
        .collect();
    Ok((!differing.is_empty()).then(|| differing.join("; ")))
}

fn first_differing_row(a: &ArrayRef, b: &ArrayRef) -> Option<usize> {
    (0..a.len().min(b.len())).find(|&row| a.slice(row, 1).to_data() != b.slice(row, 1).to_data())
}
