//! Parquet in one house style, so equal tables are equal bytes.
//!
//! Every artifact table is written with the same writer properties: a fixed `created_by`
//! (so a parquet-crate upgrade alone does not change content hashes), 1 Mi-row row groups
//! (DataFusion scans row groups in parallel), Snappy pages, statistics on. Monotone
//! integer columns such as positions and document ids are better delta-encoded than
//! dictionary-encoded; the caller names them in [`ParquetLayout::delta_columns`].

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::StageError;

/// Rows per row group: large enough for good compression, small enough that a
/// 62M-token table has dozens of row groups to scan in parallel.
pub const ROW_GROUP_ROWS: usize = 1 << 20;

#[derive(Debug, Clone, Default)]
pub struct ParquetLayout {
    /// Columns to write with DELTA_BINARY_PACKED and no dictionary.
    pub delta_columns: Vec<&'static str>,
}

impl ParquetLayout {
    pub fn delta(columns: &[&'static str]) -> Self {
        ParquetLayout {
            delta_columns: columns.to_vec(),
        }
    }

    fn properties(&self) -> WriterProperties {
        let mut builder = WriterProperties::builder()
            .set_created_by("cachemoney".to_string())
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_statistics_enabled(EnabledStatistics::Chunk);
        for column in &self.delta_columns {
            let path = ColumnPath::from(*column);
            builder = builder
                .set_column_dictionary_enabled(path.clone(), false)
                .set_column_encoding(path, Encoding::DELTA_BINARY_PACKED);
        }
        builder.build()
    }
}

/// Writes `batches` (all of `schema`) to `path` and fsyncs it. Returns the row count.
pub fn write_parquet<I>(
    path: &Path,
    schema: Arc<Schema>,
    batches: I,
    layout: &ParquetLayout,
) -> Result<u64, StageError>
where
    I: IntoIterator<Item = RecordBatch>,
{
    let file = File::create(path).map_err(|e| StageError::io(path, e))?;
    let mut writer = ArrowWriter::try_new(file, schema, Some(layout.properties()))
        .map_err(|e| StageError::format(path, e))?;
    let mut rows = 0u64;
    for batch in batches {
        rows += batch.num_rows() as u64;
        writer
            .write(&batch)
            .map_err(|e| StageError::format(path, e))?;
    }
    let file = writer
        .into_inner()
        .map_err(|e| StageError::format(path, e))?;
    file.sync_all().map_err(|e| StageError::io(path, e))?;
    Ok(rows)
}

/// Reads a whole Parquet file into record batches.
pub fn read_parquet(path: &Path) -> Result<Vec<RecordBatch>, StageError> {
    let file = File::open(path).map_err(|e| StageError::io(path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| StageError::format(path, e))?
        .with_batch_size(ROW_GROUP_ROWS)
        .build()
        .map_err(|e| StageError::format(path, e))?;
    reader
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StageError::format(path, e))
}

/// One column of a Parquet table as a plain vector, cast to `T` when the stored type
/// differs losslessly (say u8 → i64). Only that column is decoded.
pub fn read_column<T>(path: &Path, name: &str) -> Result<Vec<T::Native>, StageError>
where
    T: arrow::datatypes::ArrowPrimitiveType,
{
    use arrow::array::{Array, AsArray};
    use parquet::arrow::ProjectionMask;

    let file = File::open(path).map_err(|e| StageError::io(path, e))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| StageError::format(path, e))?;
    let index = builder
        .schema()
        .fields()
        .iter()
        .position(|f| f.name() == name)
        .ok_or_else(|| StageError::input(path, format!("no column '{name}'")))?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), [index]);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(ROW_GROUP_ROWS)
        .build()
        .map_err(|e| StageError::format(path, e))?;
    let mut values = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| StageError::format(path, e))?;
        let column = batch.column(0);
        if column.null_count() > 0 {
            return Err(StageError::input(
                path,
                format!("column '{name}' has nulls"),
            ));
        }
        let cast = arrow::compute::cast(column, &T::DATA_TYPE).map_err(|e| {
            StageError::input(
                path,
                format!("column '{name}' is {}: {e}", column.data_type()),
            )
        })?;
        values.extend_from_slice(cast.as_primitive::<T>().values());
    }
    Ok(values)
}
