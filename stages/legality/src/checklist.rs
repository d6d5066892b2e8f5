//! The rest of a reviewer's checklist, as stages whose one finding a `legality` node
//! shows beside its own probes (wired as its `overlap` and `artifact` inputs):
//!
//! - `overlap`: is the val set in the training data? ([`crate::overlap`])
//! - `artifact`: do the model's files and the scorer's code fit the challenge's 16,000,000
//!   bytes? One submission was 42 KB over once its code was counted.
//!
//! Both are about what a chain was built from, not about how it scores, so they are
//! computed once and shared by every judge that wires them.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float64Array, RecordBatch, StringArray, UInt32Array,
    UInt64Array,
};
use arrow::datatypes::{Float64Type, Int64Type, UInt16Type, UInt32Type, UInt64Type};
use serde::{Deserialize, Serialize};
use stage_api::products;
use stage_api::{
    arrow_schema, read_column, read_column_rows, table_rows, write_parquet, Column, ColumnType::*,
    FileRole, Input, Output, ParquetLayout, Read, Stage, StageContext, StageError, StageParams,
    StageReport, StageSpec,
};

use crate::overlap::{per_document, ValWindows};
use crate::probes::{self, Finding, Verdict};
use crate::stages::{write_findings, LEGALITY_TABLE};

/// The file a checklist stage writes its finding to (the `legality` table's columns).
pub const FINDING: &str = "finding.parquet";
pub(crate) const FINDING_READ: Read = Read::table(
    "finding",
    &[
        "probe", "verdict", "checked", "position", "expected", "observed", "detail",
    ],
);

/// Reads a checklist stage's finding (one row).
pub(crate) fn read_finding(path: &Path) -> Result<Finding, StageError> {
    let batches = stage_api::read_parquet(path)?;
    let batch = batches
        .iter()
        .find(|b| b.num_rows() > 0)
        .ok_or_else(|| StageError::input(path, "no finding in it"))?;
    let text = |name: &str| {
        batch
            .column_by_name(name)
            .map(|c| c.as_string::<i32>().value(0).to_string())
    };
    let probe = match text("probe").as_deref() {
        Some(probes::OVERLAP) => probes::OVERLAP,
        Some(probes::ARTIFACT) => probes::ARTIFACT,
        other => {
            return Err(StageError::input(
                path,
                format!("probe {other:?} is not a checklist probe (overlap, artifact)"),
            ))
        }
    };
    let verdict = match text("verdict").as_deref() {
        Some("pass") => Verdict::Pass,
        Some("fail") => Verdict::Fail,
        other => return Err(StageError::input(path, format!("verdict {other:?}"))),
    };
    let float = |name: &str| {
        let c = batch.column_by_name(name)?.as_primitive::<Float64Type>();
        c.is_valid(0).then(|| c.value(0))
    };
    let position = batch
        .column_by_name("position")
        .map(|c| c.as_primitive::<Int64Type>())
        .and_then(|c| c.is_valid(0).then(|| c.value(0)));
    Ok(Finding {
        probe,
        verdict,
        checked: batch
            .column_by_name("checked")
            .map_or(0, |c| c.as_primitive::<UInt64Type>().value(0)),
        position,
        expected: float("expected"),
        observed: float("observed"),
        detail: text("detail").unwrap_or_default(),
    })
}

/// `overlap`: the val documents and windows the training data holds.
pub struct OverlapStage;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverlapParams {
    /// Tokens in a window (the reviewers used 64).
    pub window: usize,
    /// A document occurs in the training data when this share of its windows do.
    pub doc_share: f64,
    /// The probe fails when more than this share of the val documents occur.
    pub max_share: f64,
    /// Whether the tokens artifact's train split counts (a pipeline's own models train
    /// on it); `files.train` shards always count.
    pub train_split: bool,
}

impl Default for OverlapParams {
    fn default() -> Self {
        OverlapParams {
            window: 64,
            doc_share: 0.5,
            max_share: 0.01,
            train_split: true,
        }
    }
}

impl StageParams for OverlapParams {
    fn validate(&self) -> Result<(), StageError> {
        stage_api::check_param("window", self.window, 8..=4096, "tokens")?;
        for (name, value) in [("doc_share", self.doc_share), ("max_share", self.max_share)] {
            if !(0.0..=1.0).contains(&value) {
                return Err(StageError::invalid_param(
                    name,
                    format!("{value} is not inside [0, 1]"),
                ));
            }
        }
        Ok(())
    }
}

/// `overlap`: one row per val document with a window in the training data.
pub const OVERLAP_TABLE: &[Column] = &[
    Column::new("doc", U32),
    Column::new("windows", U64),
    Column::new("found", U64),
    Column::new("share", F64),
    Column::new("in_train", Bool),
];

/// Rows of the train split read at a time: the training data is streamed, never whole.
const TRAIN_CHUNK: usize = 1 << 24;

impl Stage for OverlapStage {
    type Params = OverlapParams;

    const SPEC: StageSpec = StageSpec {
        kind: "overlap",
        version: 1,
        summary: "tokens (+ train shards) -> the val documents and 64-token windows that also occur in the training data, and a verdict",
        inputs: &[Input::required(
            "tokens",
            &[
                products::VAL.read(&["token", "doc"]),
                Read::table("train", &["token"]),
                Read::table("vocab", &["id"]),
            ],
        )],
        files: &[FileRole {
            name: "train",
            required: false,
            help: "training shards in the challenge's format (a model trained outside the pipeline), streamed one at a time",
        }],
        outputs: &[
            Output::table("overlap", OVERLAP_TABLE),
            Output::table("finding", LEGALITY_TABLE),
        ],
        metrics: &["doc_share", "window_share"],
        ..StageSpec::NONE
    };

    fn run(&self, ctx: &StageContext, params: OverlapParams) -> Result<StageReport, StageError> {
        let tokens = ctx.input("tokens")?;
        let val_path = tokens.file("val.parquet");
        let val = read_column::<UInt16Type>(&val_path, "token")?;
        let doc = read_column::<UInt32Type>(&val_path, "doc")?;
        let vocab = table_rows(&tokens.file("vocab.parquet"))?;
        // The index: a window's hash, start, document and group, sorted (see overlap.rs).
        ctx.check_memory(
            val.len() as u64 * 48,
            format!("indexing the {} val tokens' windows", val.len()).as_str(),
        )?;
        let mut report = StageReport::default();
        let started = Instant::now();
        let windows = ValWindows::new(&val, &doc, params.window);
        report.phase("index_val", started);
        let started = Instant::now();
        let mut found = vec![false; windows.groups()];
        let mut train_tokens = 0u64;
        if params.train_split {
            let path = tokens.file("train.parquet");
            let rows = table_rows(&path)?;
            // Each chunk starts a window early, so no window is lost at a chunk's edge.
            let mut first = 0;
            while first < rows {
                let from = first.saturating_sub(params.window - 1);
                let chunk =
                    read_column_rows::<UInt16Type>(&path, "token", from..first + TRAIN_CHUNK)?;
                windows.scan(&chunk, &mut found);
                first += TRAIN_CHUNK;
            }
            train_tokens += rows as u64;
        }
        for shard in ctx.files("train") {
            let chunk = text::shards::read_shard(shard, vocab)?;
            windows.scan(&chunk, &mut found);
            train_tokens += chunk.len() as u64;
        }
        report.phase("scan_train", started);
        if train_tokens == 0 {
            return Err(ctx.error(
                "no training data to compare with: the train split is empty or not counted (train_split = false) and files.train names no shard",
            ));
        }
        let docs = per_document(&windows, &doc, &found);
        write_overlap(&ctx.output("overlap.parquet"), &docs, params.doc_share)?;
        let total_windows = windows.windows() as u64;
        let found_windows: u64 = docs.iter().map(|d| d.found).sum();
        let in_train: Vec<_> = docs
            .iter()
            .filter(|d| d.found > 0 && d.share() >= params.doc_share)
            .collect();
        let judged = docs.len() as u64;
        let doc_share = in_train.len() as f64 / judged.max(1) as f64;
        let window_share = found_windows as f64 / total_windows.max(1) as f64;
        // Documents are runs of one id: counted without copying the column.
        let documents = 1 + doc.windows(2).filter(|w| w[0] != w[1]).count() as u64;
        let short = documents - judged;
        let listed: Vec<String> = in_train
            .iter()
            .take(5)
            .map(|d| format!("doc {} ({:.0}%)", d.doc, 100.0 * d.share()))
            .collect();
        let detail = format!(
            "{} of {judged} val documents ({:.2}%) occur in the training data ({} tokens; a document occurs when {:.0}% of its {}-token windows do), and {found_windows} of {total_windows} windows ({:.2}%){}{}",
            in_train.len(),
            100.0 * doc_share,
            train_tokens,
            100.0 * params.doc_share,
            params.window,
            100.0 * window_share,
            match listed.is_empty() {
                true => String::new(),
                false => format!(
                    ": {}{}",
                    listed.join(", "),
                    if in_train.len() > listed.len() { ", … (overlap.parquet lists them all)" } else { "" }
                ),
            },
            match short {
                0 => String::new(),
                n => format!("; {n} documents shorter than a window are not judged"),
            },
        );
        let finding = if doc_share > params.max_share {
            let first = in_train[0];
            Finding::fail(
                probes::OVERLAP,
                judged,
                // The first token of the first document found.
                doc.iter().position(|&d| d == first.doc).unwrap_or(0) as i64,
                params.max_share,
                doc_share,
                format!("the training data holds the val set: {detail}; the threshold is {:.2}% (first: doc {})", 100.0 * params.max_share, first.doc),
            )
        } else {
            Finding::pass(
                probes::OVERLAP,
                judged,
                format!(
                    "{detail}; the threshold is {:.2}%",
                    100.0 * params.max_share
                ),
            )
        };
        write_findings(&ctx.output(FINDING), "", std::slice::from_ref(&finding))?;
        Ok(report.with_fields(&OverlapReport {
            val_windows: total_windows,
            train_tokens,
            documents: judged,
            documents_in_train: in_train.len() as u64,
            doc_share,
            window_share,
            overlap: finding.verdict,
        }))
    }
}

/// What `overlap` reports: the shares of val found in the training data, and the
/// probe's verdict under its name ([`probes::OVERLAP`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct OverlapReport {
    pub val_windows: u64,
    pub train_tokens: u64,
    /// Val documents judged (those long enough to hold a window).
    pub documents: u64,
    pub documents_in_train: u64,
    pub doc_share: f64,
    pub window_share: f64,
    pub overlap: Verdict,
}

fn write_overlap(
    path: &Path,
    docs: &[crate::overlap::DocOverlap],
    doc_share: f64,
) -> Result<u64, StageError> {
    let docs: Vec<_> = docs.iter().filter(|d| d.found > 0).collect();
    let schema = arrow_schema(OVERLAP_TABLE);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from_iter_values(docs.iter().map(|d| d.doc))),
        Arc::new(UInt64Array::from_iter_values(
            docs.iter().map(|d| d.windows),
        )),
        Arc::new(UInt64Array::from_iter_values(docs.iter().map(|d| d.found))),
        Arc::new(Float64Array::from_iter_values(
            docs.iter().map(|d| d.share()),
        )),
        Arc::new(BooleanArray::from_iter(
            docs.iter().map(|d| Some(d.share() >= doc_share)),
        )),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).expect("columns match schema");
    write_parquet(
        path,
        schema,
        std::iter::once(batch),
        &ParquetLayout::default(),
    )
}

/// `artifact`: the model's files and the scorer's code against the size limit.
pub struct ArtifactStage;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArtifactParams {
    /// The challenge's limit on code plus compressed model, in bytes.
    pub limit: u64,
    /// The files of the `model` input that count, compressed with xz (level 6) as a
    /// submission would ship them.
    pub model_files: Vec<String>,
}

impl Default for ArtifactParams {
    fn default() -> Self {
        ArtifactParams {
            limit: 16_000_000,
            model_files: vec!["model.safetensors".into(), "config.json".into()],
        }
    }
}

impl StageParams for ArtifactParams {}

/// `parts`: what was counted, one row per file.
pub const PARTS_TABLE: &[Column] = &[
    Column::new("part", Utf8),
    Column::new("file", Utf8),
    Column::new("bytes", U64),
    Column::new("counted_bytes", U64),
];

impl Stage for ArtifactStage {
    type Params = ArtifactParams;

    const SPEC: StageSpec = StageSpec {
        kind: "artifact",
        version: 1,
        summary: "a model (train node) and the scorer's declared files -> their total size against the limit (16,000,000 bytes), listing the parts",
        inputs: &[
            Input::optional("model", &[]),
            // The scorer's pass-1 node: what it declares it loads must all be counted.
            Input::optional("scorer", &[]),
        ],
        files: &[
            FileRole {
                name: "code",
                required: false,
                help: "the scorer's code, counted as it is",
            },
            FileRole {
                name: "weights",
                required: false,
                help: "model files the scorer loads, counted as they are (already in the form a submission ships)",
            },
        ],
        outputs: &[
            Output::table("parts", PARTS_TABLE),
            Output::table("finding", LEGALITY_TABLE),
        ],
        metrics: &["total_bytes"],
        ..StageSpec::NONE
    };

    fn check_wiring(_: &ArtifactParams, inputs: &[&str], files: &[&str]) -> Result<(), String> {
        if inputs.is_empty() && files.is_empty() {
            return Err("nothing to count: wire inputs.model (a train node) or declare files.code / files.weights".into());
        }
        Ok(())
    }

    fn run(&self, ctx: &StageContext, params: ArtifactParams) -> Result<StageReport, StageError> {
        // (part, file, bytes, counted bytes)
        let mut parts: Vec<(&str, String, u64, u64)> = Vec::new();
        if let Some(model) = ctx.inputs.get("model") {
            for name in &params.model_files {
                let path = model.file(name);
                let raw = std::fs::read(&path).map_err(|e| StageError::io(&path, e))?;
                parts.push((
                    "model",
                    name.clone(),
                    raw.len() as u64,
                    xz_len(&path, &raw)?,
                ));
            }
        }
        for (role, part) in [("code", "code"), ("weights", "weights")] {
            for path in ctx.files(role) {
                let bytes = std::fs::metadata(path)
                    .map_err(|e| StageError::io(path, e))?
                    .len();
                let shown = path.strip_prefix(&ctx.work_dir).unwrap_or(path);
                parts.push((part, shown.display().to_string(), bytes, bytes));
            }
        }
        let total: u64 = parts.iter().map(|p| p.3).sum();
        let uncounted = match ctx.inputs.get("scorer") {
            Some(scorer) => uncounted_by(ctx, scorer)?,
            None => Vec::new(),
        };
        let listing: Vec<String> = parts
            .iter()
            .map(|(part, file, bytes, counted)| match part {
                &"model" => format!("{file} {counted} (xz of {bytes})"),
                _ => format!("{file} {counted}"),
            })
            .collect();
        let detail = format!(
            "{total} bytes against the limit of {}: {}",
            params.limit,
            listing.join(" + ")
        );
        let finding = if !uncounted.is_empty() {
            Finding::fail(
                probes::ARTIFACT,
                parts.len() as u64,
                0,
                params.limit as f64,
                total as f64,
                format!(
                    "cannot be verified: {}; counted: {detail}",
                    uncounted.join("; ")
                ),
            )
        } else if total > params.limit {
            Finding::fail(
                probes::ARTIFACT,
                parts.len() as u64,
                0,
                params.limit as f64,
                total as f64,
                format!("{} bytes over: {detail}", total - params.limit),
            )
        } else {
            Finding::pass(probes::ARTIFACT, parts.len() as u64, detail)
        };
        let schema = arrow_schema(PARTS_TABLE);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(parts.iter().map(|p| p.0))),
            Arc::new(StringArray::from_iter_values(
                parts.iter().map(|p| p.1.as_str()),
            )),
            Arc::new(UInt64Array::from_iter_values(parts.iter().map(|p| p.2))),
            Arc::new(UInt64Array::from_iter_values(parts.iter().map(|p| p.3))),
        ];
        let batch = RecordBatch::try_new(schema.clone(), columns).expect("columns match schema");
        write_parquet(
            &ctx.output("parts.parquet"),
            schema,
            std::iter::once(batch),
            &ParquetLayout::default(),
        )?;
        write_findings(&ctx.output(FINDING), "", std::slice::from_ref(&finding))?;
        Ok(StageReport::default().with_fields(&ArtifactReport {
            total_bytes: total,
            limit: params.limit,
            artifact: finding.verdict,
        }))
    }
}

/// What `artifact` reports: the counted size, the limit, and the probe's verdict under
/// its name ([`probes::ARTIFACT`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct ArtifactReport {
    pub total_bytes: u64,
    pub limit: u64,
    pub artifact: Verdict,
}

/// What the scorer's pass-1 node declares it loads that this node does not count: its
/// own files (`files.scorer`, by content), the model artifact it reads, and any
/// `params.read` paths (whose contents no recipe records).
fn uncounted_by(
    ctx: &StageContext,
    scorer: &stage_api::InputArtifact,
) -> Result<Vec<String>, StageError> {
    let path = scorer.file("manifest.json");
    let text = std::fs::read(&path).map_err(|e| StageError::io(&path, e))?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| StageError::format(&path, e))?;
    let ingredients = &manifest["ingredients"];
    let mut counted = std::collections::BTreeSet::new();
    for role in ["code", "weights"] {
        for file in ctx.files(role) {
            let bytes = std::fs::read(file).map_err(|e| StageError::io(file, e))?;
            counted.insert(blake3::hash(&bytes).to_hex().to_string());
        }
    }
    let mut uncounted = Vec::new();
    let declared = ingredients["files"].as_object().into_iter().flatten();
    for (role, files) in declared {
        for file in files.as_array().into_iter().flatten() {
            let hash = file["blake3"].as_str().unwrap_or_default();
            if !counted.contains(hash) {
                uncounted.push(format!(
                    "the scorer loads {} (its files.{role}), which files.code and files.weights do not hold",
                    file["name"].as_str().unwrap_or("?")
                ));
            }
        }
    }
    if let Some(model) = ingredients["inputs"]["model"].as_str() {
        match ctx.inputs.get("model") {
            Some(counted) if counted.content_hash == model => {}
            Some(_) => uncounted.push(format!(
                "the scorer loads model artifact {}, not the one wired as inputs.model",
                &model[..12.min(model.len())]
            )),
            None => uncounted.push(format!(
                "the scorer loads model artifact {}, and no inputs.model counts it",
                &model[..12.min(model.len())]
            )),
        }
    }
    let read: Vec<&str> = ingredients["params"]["read"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str())
        .collect();
    if !read.is_empty() {
        uncounted.push(format!(
            "the scorer may also read {} (params.read), whose contents no recipe records: declare what it loads in files.scorer",
            read.join(", ")
        ));
    }
    Ok(uncounted)
}

/// The size of `raw` (read from `path`) compressed with xz at level 6.
fn xz_len(path: &Path, raw: &[u8]) -> Result<u64, StageError> {
    let mut compressed = Vec::new();
    let mut encoder = liblzma::read::XzEncoder::new(raw, 6);
    std::io::Read::read_to_end(&mut encoder, &mut compressed)
        .map_err(|e| StageError::io(path, e))?;
    Ok(compressed.len() as u64)
}

#[cfg(test)]
mod report_tests {
    use super::*;

    /// A checklist stage reports its verdict under its probe's name.
    #[test]
    fn checklist_verdicts_are_reported_under_their_probes_names() {
        let overlap = StageReport::default().with_fields(&OverlapReport {
            val_windows: 1,
            train_tokens: 1,
            documents: 1,
            documents_in_train: 0,
            doc_share: 0.0,
            window_share: 0.0,
            overlap: Verdict::Pass,
        });
        assert_eq!(overlap.summary[probes::OVERLAP], "pass");
        let artifact = StageReport::default().with_fields(&ArtifactReport {
            total_bytes: 1,
            limit: 2,
            artifact: Verdict::Fail,
        });
        assert_eq!(artifact.summary[probes::ARTIFACT], "fail");
    }
}
