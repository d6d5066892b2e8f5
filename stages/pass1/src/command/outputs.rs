//! What a scorer left: its output directory checked to hold plain files only, and its
//! tables read and validated as strictly as an imported one.

use std::fs::File;
use std::path::Path;

use arrow::datatypes::{DataType, Float32Type, Int64Type, UInt16Type};
use parquet::arrow::arrow_reader::ArrowReaderMetadata;
use stage_api::{read_column, StageContext, StageError};

use command::process::{self, Program, Workspace};

use super::Request;
use crate::{import_pass1, Pass1Table};

/// The scorer's outputs must be plain files in a plain directory: not links out of it,
/// not pipes or devices (reading a FIFO would hang), and nothing may have appeared in
/// the artifact's own directory.
pub(super) fn check_directory(
    ctx: &StageContext,
    workspace: &Workspace,
    program: &Program,
) -> Result<(), StageError> {
    process::check_out_dir(ctx, workspace, program)?;
    let out = workspace.out();
    for name in ["pass1.parquet", "distributions.parquet", "hint_p.parquet"] {
        let path = out.join(name);
        if process::check_plain_file(&path, program.what)? {
            continue;
        }
        if name == "distributions.parquet"
            || (name == "hint_p.parquet" && !ctx.inputs.contains_key("hints"))
        {
            continue;
        }
        if name == "hint_p.parquet" {
            return Err(StageError::input(
                &path,
                format!("missing: the request carried hints ({}) and the scorer did not answer with each entry's p(hint); it may speak only cachemoney-scorer/2", super::PROTOCOL_HINTS),
            ));
        }
        return Err(StageError::input(
            &path,
            "missing: the scorer exited 0 but did not write it",
        ));
    }
    Ok(())
}

/// The protocol's column types, exactly: a float64 `model_p` would otherwise be
/// narrowed silently, and a scorer that thinks it writes f64 has other surprises.
pub(super) fn check_schema(path: &Path, wanted: &[(&str, DataType)]) -> Result<(), StageError> {
    let file = File::open(path).map_err(|e| StageError::io(path, e))?;
    let metadata = ArrowReaderMetadata::load(&file, Default::default())
        .map_err(|e| StageError::format(path, e))?;
    let schema = metadata.schema();
    for (name, kind) in wanted {
        match schema.field_with_name(name) {
            Ok(field) if field.data_type() == kind => {}
            Ok(field) => {
                return Err(StageError::input(
                    path,
                    format!(
                        "column '{name}' is {}, the protocol says {kind}",
                        field.data_type()
                    ),
                ))
            }
            Err(_) => {
                let have: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                return Err(StageError::input(
                    path,
                    format!("no column '{name}' (it has: {})", have.join(", ")),
                ));
            }
        }
    }
    Ok(())
}

pub(super) fn read_outputs(
    root: &Path,
    request: &Request,
    val_bytes: &[u8],
    hints: Vec<u16>,
) -> Result<Pass1Table, StageError> {
    let output_dir = root.join(&request.output_dir);
    let pass1_path = output_dir.join("pass1.parquet");
    check_schema(
        &pass1_path,
        &[
            ("position", DataType::Int64),
            ("model_p", DataType::Float32),
            ("entropy", DataType::Float32),
        ],
    )?;
    let mut table = import_pass1(&pass1_path, val_bytes)?;
    // Bytes are the tokens' (the challenge's rule), never the scorer's.
    table.bytes = table
        .position
        .iter()
        .map(|&p| val_bytes[p as usize])
        .collect();
    table.distributions = read_distributions(&output_dir.join("distributions.parquet"), request)?;
    if request.hints_parquet.is_some() {
        table.hint_p = read_hint_p(&output_dir.join("hint_p.parquet"), &table, &hints)?;
        table.hint = hints;
    }
    Ok(table)
}

/// Version 3's answer: per entry of `pass1.parquet` (same rows), the hint it was given
/// and its probability, which where the whole distribution was asked for must be that
/// distribution's p(hint) to the bit: the tilt renormalises with it, so a scorer that
/// understated it elsewhere would make the tilted distribution sum past 1 where no probe
/// looks, and the secret sample makes every position one a probe might look at.
fn read_hint_p(path: &Path, table: &Pass1Table, hints: &[u16]) -> Result<Vec<f32>, StageError> {
    check_schema(
        path,
        &[
            ("position", DataType::Int64),
            ("hint", DataType::UInt16),
            ("hint_p", DataType::Float32),
        ],
    )?;
    let position = read_column::<Int64Type>(path, "position")?;
    let hint = read_column::<UInt16Type>(path, "hint")?;
    let hint_p = read_column::<Float32Type>(path, "hint_p")?;
    if position != table.position {
        let row = position
            .iter()
            .zip(&table.position)
            .position(|(a, b)| a != b)
            .unwrap_or(position.len().min(table.position.len()));
        return Err(StageError::input(
            path,
            format!(
                "{} rows where pass1.parquet has {}, first different at row {row}: one row per entry of pass1.parquet, in its order",
                position.len(),
                table.position.len()
            ),
        ));
    }
    let kept: std::collections::HashMap<i64, &Vec<f32>> =
        table.distributions.iter().map(|(p, d)| (*p, d)).collect();
    for (row, (&p, (&h, &q))) in position.iter().zip(hint.iter().zip(&hint_p)).enumerate() {
        if hints.get(p as usize - 1) != Some(&h) {
            return Err(StageError::input(
                path,
                format!(
                    "row {row} (position {p}): hint {h}, but the request's hints say {}",
                    hints
                        .get(p as usize - 1)
                        .map_or("none".into(), |h| h.to_string())
                ),
            ));
        }
        if !(q.is_finite() && (0.0..=1.0).contains(&q)) {
            return Err(StageError::input(
                path,
                format!("row {row} (position {p}): hint_p {q} is not a probability"),
            ));
        }
        if let Some(d) = kept.get(&p) {
            let full = d.get(h as usize).copied().unwrap_or(f32::NAN);
            if full.to_bits() != q.to_bits() {
                return Err(StageError::input(
                    path,
                    format!("row {row} (position {p}): hint_p {q}, but the distribution it wrote there gives the hint {h} probability {full}"),
                ));
            }
        }
    }
    Ok(hint_p)
}

/// One full distribution per requested position, candidates 0..V in order, every
/// probability finite and non-negative. Sums are not checked here: that is the
/// normalisation probe's finding to make.
pub(super) fn read_distributions(
    path: &Path,
    request: &Request,
) -> Result<Vec<(i64, Vec<f32>)>, StageError> {
    if request.distributions.is_empty() && !path.exists() {
        return Ok(Vec::new());
    }
    if !path.exists() {
        return Err(StageError::input(
            path,
            format!(
                "missing: the request asked for the distribution at {} positions",
                request.distributions.len()
            ),
        ));
    }
    check_schema(
        path,
        &[
            ("position", DataType::Int64),
            ("candidate", DataType::UInt16),
            ("model_p", DataType::Float32),
        ],
    )?;
    let position = read_column::<Int64Type>(path, "position")?;
    let candidate = read_column::<UInt16Type>(path, "candidate")?;
    let model_p = read_column::<Float32Type>(path, "model_p")?;
    let v = request.vocab_size;
    let expected_rows = request.distributions.len() * v;
    let mut out: Vec<(i64, Vec<f32>)> = Vec::with_capacity(request.distributions.len());
    for row in 0..position.len().min(expected_rows) {
        let (want_position, want_candidate) = (request.distributions[row / v], row % v);
        if position[row] != want_position || candidate[row] as usize != want_candidate {
            return Err(StageError::input(
                path,
                format!(
                    "row {row}: (position {}, candidate {}) where (position {want_position}, candidate {want_candidate}) was expected: one row per candidate 0..={} of a {v}-token vocabulary at each requested position, in order",
                    position[row], candidate[row], v - 1
                ),
            ));
        }
        let p = model_p[row];
        if !(p.is_finite() && p >= 0.0) {
            return Err(StageError::input(
                path,
                format!("row {row}: model_p {p} is not a finite non-negative probability"),
            ));
        }
        if want_candidate == 0 {
            out.push((want_position, Vec::with_capacity(v)));
        }
        out.last_mut().expect("pushed at candidate 0").1.push(p);
    }
    if position.len() != expected_rows {
        return Err(StageError::input(
            path,
            format!(
                "{} rows where {} positions × {v} candidates = {expected_rows} were expected (a distribution over another vocabulary size, or positions missing or extra)",
                position.len(),
                request.distributions.len()
            ),
        ));
    }
    Ok(out)
}
