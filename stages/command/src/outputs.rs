//! What a `command` node's program wrote, held to the node's declaration and moved into
//! the artifact.

use std::fs::File;
use std::path::Path;

use arrow::array::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use stage_api::{arrow_schema, Column, ColumnType, ParquetLayout, StageContext, StageError};

use crate::process::{self, Workspace};
use crate::stage::Declared;

/// What `command` reports: each declared table's row count, under `TABLE_rows` (the
/// tables are the node's own, so the keys are too).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CommandReport {
    #[serde(flatten)]
    pub table_rows: std::collections::BTreeMap<String, u64>,
}

/// Holds what the program wrote to the declaration and moves it into the artifact:
/// files as they are, tables re-encoded in our layout.
pub(crate) fn collect(
    ctx: &StageContext,
    declared: &Declared,
    workspace: &Workspace,
) -> Result<CommandReport, StageError> {
    let out = workspace.out();
    let entries = std::fs::read_dir(&out).map_err(|e| StageError::io(&out, e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_declared = declared.files.contains(&name)
            || name
                .strip_suffix(".parquet")
                .is_some_and(|table| declared.tables.contains_key(table));
        if !is_declared {
            return Err(StageError::input(
                &path,
                "written by the command but not declared in the node's outputs (outputs.files, outputs.tables.NAME)",
            ));
        }
        if !process::check_plain_file(&path, "command")? {
            return Err(StageError::input(&path, "not a file"));
        }
    }
    let mut report = CommandReport::default();
    for (table, columns) in declared.columns() {
        let from = out.join(format!("{table}.parquet"));
        if !from.exists() {
            return Err(StageError::input(
                &from,
                format!(
                    "missing: the command exited 0 but did not write it (outputs.tables.{table})"
                ),
            ));
        }
        let rows = reencode(
            &from,
            &ctx.output(&format!("{table}.parquet")),
            table,
            &columns,
        )?;
        report.table_rows.insert(format!("{table}_rows"), rows);
    }
    for file in &declared.files {
        let from = out.join(file);
        if !from.exists() {
            return Err(StageError::input(
                &from,
                "missing: the command exited 0 but did not write it (outputs.files)",
            ));
        }
        let to = ctx.output(file);
        std::fs::rename(&from, &to).map_err(|e| StageError::io(&to, e))?;
    }
    Ok(report)
}

/// Reads the program's table, holds its schema to the declaration (names, order, types
/// exactly; nulls only where declared), and writes it again in our layout. Returns its
/// row count.
fn reencode(from: &Path, to: &Path, table: &str, columns: &[Column]) -> Result<u64, StageError> {
    let file = File::open(from).map_err(|e| StageError::io(from, e))?;
    let reader =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| StageError::format(from, e))?;
    let written: Vec<(String, String)> = reader
        .schema()
        .fields()
        .iter()
        .map(|f| (f.name().clone(), ColumnType::name_of(f.data_type())))
        .collect();
    let declared: Vec<(String, String)> = columns
        .iter()
        .map(|c| (c.name.to_string(), c.ty.name().to_string()))
        .collect();
    if written != declared {
        let show = |cs: &[(String, String)]| {
            cs.iter()
                .map(|(n, t)| format!("{n} {t}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(StageError::input(
            from,
            format!(
                "outputs.tables.{table} declares ({}) but the command wrote ({})",
                show(&declared),
                show(&written)
            ),
        ));
    }
    let schema = arrow_schema(columns);
    // Batch by batch, from the reader to the writer: a step's table may be as large as
    // the val set, and need never be whole in memory. The first problem stops the
    // stream and is returned once the writer has finished with what came before it.
    let mut problem = None;
    let mut rows = 0u64;
    let reader = reader.build().map_err(|e| StageError::format(from, e))?;
    let batches = reader.map_while(|batch| {
        let checked = batch.map_err(|e| StageError::format(from, e)).and_then(|batch| {
            if let Some(column) = columns
                .iter()
                .zip(batch.columns())
                .find_map(|(c, array)| (!c.nullable && array.null_count() > 0).then_some(c))
            {
                return Err(StageError::input(
                    from,
                    format!(
                        "column '{}' holds nulls, which outputs.tables.{table} does not allow (declare it \"{} {}?\")",
                        column.name,
                        column.name,
                        column.ty.name()
                    ),
                ));
            }
            RecordBatch::try_new(schema.clone(), batch.columns().to_vec())
                .map_err(|e| StageError::format(from, e))
        });
        match checked {
            Ok(batch) => {
                rows += batch.num_rows() as u64;
                Some(batch)
            }
            Err(e) => {
                problem = Some(e);
                None
            }
        }
    });
    stage_api::write_parquet(to, schema.clone(), batches, &ParquetLayout::default())?;
    match problem {
        Some(e) => Err(e),
        None => Ok(rows),
    }
}
