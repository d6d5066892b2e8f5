//! The probability of the n-gram tilt's hint under the model (issue 28): with
//! `inputs.hints` wired, a pass-1 source writes `hint_p`, one row per entry, because the
//! tilt needs p(hint) at every position, a token other than the target in general, and
//! only the model's own pass has the whole distribution there.

use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Array, Int64Array, RecordBatch, UInt16Array};
use arrow::datatypes::{Int64Type, UInt16Type};
use stage_api::{
    read_column, row_groups, write_parquet, Column, ColumnType::*, InputArtifact, ParquetLayout,
    StageError,
};

/// `hint_p`: per pass-1 entry (same rows), the hint it was given and its probability
/// under the (tempered) model.
pub const HINT_P_TABLE: &[Column] = &[
    Column::new("position", I64),
    Column::new("hint", U16),
    Column::new("hint_p", F32),
];

/// The hint of every target of a `hints` artifact, indexed by position − 1; it must
/// cover the val stream's `targets` targets, positions 1, 2, …
pub fn read_hints(input: &InputArtifact, targets: usize) -> Result<Vec<u16>, StageError> {
    let path = input.file("hints.parquet");
    let position = read_column::<Int64Type>(&path, "position")?;
    if position.len() != targets || position.iter().zip(1..).any(|(&p, q)| p != q) {
        return Err(StageError::input(
            &path,
            format!(
                "hints for another stream: {} rows where the val stream has {targets} targets (positions 1..={targets}); wire the hints node of these tokens",
                position.len()
            ),
        ));
    }
    read_column::<UInt16Type>(&path, "hint")
}

/// Writes `hint_p.parquet`.
pub fn write_hint_p(
    path: &std::path::Path,
    position: &[i64],
    hint: &[u16],
    hint_p: &[f32],
) -> Result<u64, StageError> {
    let schema = stage_api::arrow_schema(HINT_P_TABLE);
    let batches = row_groups(position.len()).map(|rows| {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(position[rows.clone()].to_vec())),
            Arc::new(UInt16Array::from(hint[rows.clone()].to_vec())),
            Arc::new(Float32Array::from(hint_p[rows].to_vec())),
        ];
        RecordBatch::try_new(schema.clone(), columns).expect("columns match schema")
    });
    write_parquet(
        path,
        schema.clone(),
        batches,
        &ParquetLayout::delta(&["position"]),
    )
}
