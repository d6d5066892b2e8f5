//! Running one stage into a scratch directory and describing what it wrote.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use stage_api::{InputArtifact, StageContext};

use super::RunContext;
use crate::pipeline::Node;
use crate::recipe::{short, Ingredients};
use crate::store::{content_hash, hash_file, now_rfc3339, Manifest, OutputFile, StoreLock};

/// One stage run to do: the node, what goes into its recipe, and the built artifacts of
/// its upstream nodes (by node name: directory and manifest).
pub(crate) struct BuildRequest<'a> {
    pub node: &'a Node,
    pub ingredients: &'a Ingredients,
    pub recipe: &'a str,
    pub upstream: &'a BTreeMap<String, (PathBuf, Manifest)>,
    pub lock: &'a StoreLock,
    pub show_progress: bool,
}

/// Runs one stage into a scratch directory and describes the result. Returns the scratch
/// directory and the manifest to commit.
pub(crate) fn build(ctx: &RunContext, request: &BuildRequest) -> Result<(PathBuf, Manifest)> {
    let BuildRequest {
        node,
        ingredients,
        recipe,
        lock,
        ..
    } = *request;
    let stage = ctx
        .registry
        .get(&node.stage)
        .expect("validated when loading");
    // Inputs are checked before use: a tampered artifact must not poison what is built
    // from it (bazel #6126).
    let mut inputs = BTreeMap::new();
    for (input, upstream) in &node.inputs {
        let (dir, manifest) = &request.upstream[upstream];
        let problems = ctx.store.check_files(dir, manifest);
        if let Some(first) = problems.first() {
            bail!(
                "input '{input}' (node '{upstream}') is corrupt: {first}; rebuild it with `cachemoney run --force {upstream}`"
            );
        }
        inputs.insert(
            input.clone(),
            InputArtifact {
                dir: dir.clone(),
                content_hash: manifest.content_hash.clone(),
            },
        );
    }
    let scratch = ctx
        .store
        .scratch_dir(lock, &format!("{}-{}", node.stage, short(recipe)))?;
    let stage_ctx = StageContext {
        node: node.name.clone(),
        params: node.params.clone(),
        inputs,
        files: node.files.clone(),
        out_dir: scratch.clone(),
        work_dir: ctx.pipeline.base_dir(),
        show_progress: request.show_progress,
        memory_limit: ctx.memory_limit,
    };
    let started = Instant::now();
    let report = match stage.run(&stage_ctx) {
        Ok(report) => report,
        Err(e) => {
            std::fs::remove_dir_all(&scratch).ok();
            // The context names the node already.
            return Err(match e {
                stage_api::StageError::Node { node: n, message } if n == node.name => {
                    anyhow!(message)
                }
                e => {
                    // A parameter that only the inputs showed wrong, at its line.
                    let at = match &e {
                        stage_api::StageError::InvalidParam { param, .. } => {
                            ctx.pipeline.param_location(node, param)
                        }
                        _ => None,
                    };
                    match at {
                        Some(at) => anyhow!("{at}: {e}"),
                        None => anyhow!(e),
                    }
                }
            });
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    // The declaration is what wiring was checked against; a stage that wrote something
    // else is a bug, caught before anything downstream relies on it.
    if let Err(problem) = node.spec.check_outputs(&scratch) {
        std::fs::remove_dir_all(&scratch).ok();
        bail!("{problem}");
    }
    let files = describe_outputs(&scratch, node.spec.outputs)?;
    if files.is_empty() {
        bail!("stage '{}' wrote no output", node.stage);
    }
    let manifest = Manifest {
        recipe: recipe.to_string(),
        stage: node.stage.clone(),
        version: stage.spec().version,
        node: node.name.clone(),
        ingredients: ingredients.clone(),
        content_hash: content_hash(&files),
        files,
        report: report.summary,
        volatile_report: report.volatile_keys,
        phase_seconds: report.phase_seconds,
        created_at: now_rfc3339(),
        seconds,
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        threads: rayon::current_num_threads(),
    };
    Ok((scratch, manifest))
}

/// Every file in `dir`, hashed, each marked volatile as its stage declares it.
fn describe_outputs(
    dir: &std::path::Path,
    declared: &[stage_api::Output],
) -> Result<BTreeMap<String, OutputFile>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if !path.is_file() {
            bail!("{}: stages may only write plain files", path.display());
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let bytes = entry.metadata()?.len();
        let (rows, schema) = if name.ends_with(".parquet") {
            let file = std::fs::File::open(&path)?;
            let builder = ParquetRecordBatchReaderBuilder::try_new(file)
                .with_context(|| format!("{}: unreadable Parquet", path.display()))?;
            let rows = builder.metadata().file_metadata().num_rows() as u64;
            let schema = builder
                .schema()
                .fields()
                .iter()
                .map(|f| (f.name().clone(), f.data_type().to_string()))
                .collect();
            (Some(rows), Some(schema))
        } else {
            (None, None)
        };
        let is_volatile = stage_api::Output::is_volatile_file(declared, &name);
        files.insert(
            name,
            OutputFile {
                blake3: hash_file(&path)?,
                bytes,
                rows,
                schema,
                volatile: is_volatile,
            },
        );
    }
    Ok(files)
}
