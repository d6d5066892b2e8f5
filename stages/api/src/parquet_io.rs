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
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ParquetRecordBatchReaderBuilder};
use parquet::arrow::arrow_writer::{compute_leaves, ArrowColumnChunk};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use rayon::prelude::*;

use crate::StageError;

/// Rows per row group: large enough for good compression, small enough that a
/// 62M-token table has dozens of row groups to scan in parallel.
pub const ROW_GROUP_ROWS: usize = 1 << 20;

#[derive(Debug, Clone, Default)]
pub struct ParquetLayout {
    /// Columns to write with DELTA_BINARY_PACKED and no dictionary.
    pub delta_columns: Vec<&'static str>,
    /// Columns to write without compression: nearly random bits (probabilities, bit
    /// counts) that Snappy scans at some cost per byte only to save a few percent.
    pub uncompressed_columns: Vec<&'static str>,
}

impl ParquetLayout {
    pub fn delta(columns: &[&'static str]) -> Self {
        ParquetLayout {
            delta_columns: columns.to_vec(),
            ..ParquetLayout::default()
        }
    }

    pub fn uncompressed(mut self, columns: &[&'static str]) -> Self {
        self.uncompressed_columns = columns.to_vec();
        self
    }

    fn properties(&self, schema: &Schema) -> WriterProperties {
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
        for column in &self.uncompressed_columns {
            builder = builder
                .set_column_compression(ColumnPath::from(*column), Compression::UNCOMPRESSED);
        }
        // Probabilities and bit counts are nearly all distinct: a dictionary would be
        // built, overflow and be thrown away on every page, which cost a fifth of the
        // time spent writing a 62M-row scores table.
        for field in schema.fields() {
            if field.data_type().is_floating() {
                builder = builder
                    .set_column_dictionary_enabled(ColumnPath::from(field.name().as_str()), false);
            }
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
    let properties = layout.properties(&schema);
    let mut writer = ArrowWriter::try_new(file, schema, Some(properties))
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

/// Writes a table of `len` rows whose row groups (the ranges of [`crate::row_groups`]) are
/// built *and encoded* in parallel by `make`, then appended in order; fsyncs the file.
///
/// Encoding dominates writing a wide table (a 62M-row table spends more time in Parquet
/// encoders than in the computation that fills it), so a sequential `ArrowWriter` would
/// leave all but one core idle. Each row group is encoded independently and appended in
/// index order, so the bytes do not depend on the thread count. `make` also returns a
/// per-group value (partial sums, statistics); they come back in group order, so that a
/// caller reducing them sequentially gets the same floating-point result on any machine.
/// At most two row groups per thread are in memory at once (one being encoded, one of
/// the window before being appended).
pub fn write_parquet_parallel<A, F>(
    path: &Path,
    schema: Arc<Schema>,
    len: usize,
    layout: &ParquetLayout,
    make: F,
) -> Result<Vec<A>, StageError>
where
    A: Send,
    F: Fn(std::ops::Range<usize>) -> Result<(RecordBatch, A), StageError> + Sync,
{
    let format = |e: parquet::errors::ParquetError| StageError::format(path, e);
    let file = File::create(path).map_err(|e| StageError::io(path, e))?;
    let fd = file.try_clone().map_err(|e| StageError::io(path, e))?;
    // ArrowWriter sets up what the sequential writer would (embedded Arrow schema,
    // properties); its lower half then takes column chunks encoded elsewhere.
    let (mut file_writer, factory) =
        ArrowWriter::try_new(file, schema.clone(), Some(layout.properties(&schema)))
            .and_then(ArrowWriter::into_serialized_writer)
            .map_err(format)?;
    let groups: Vec<_> = crate::row_groups(len).enumerate().collect();
    let window = rayon::current_num_threads().max(1);
    let mut values = Vec::with_capacity(groups.len());
    // While one window of row groups is encoded, the one before is appended to the file:
    // the copy into the page cache overlaps encoding instead of following it.
    let mut encoded_before: Vec<(Vec<ArrowColumnChunk>, A)> = Vec::new();
    let mut append = |encoded: Vec<(Vec<ArrowColumnChunk>, A)>| -> Result<(), StageError> {
        for (chunks, value) in encoded {
            let mut row_group = file_writer.next_row_group().map_err(format)?;
            for chunk in chunks {
                chunk.append_to_row_group(&mut row_group).map_err(format)?;
            }
            row_group.close().map_err(format)?;
            values.push(value);
        }
        start_writeback(&fd);
        Ok(())
    };
    for window in groups.chunks(window) {
        let before = std::mem::take(&mut encoded_before);
        let (encoded, appended) = rayon::join(
            || {
                window
                    .par_iter()
                    .map(|(index, range)| {
                        let (batch, value) = make(range.clone())?;
                        let mut writers = factory.create_column_writers(*index).map_err(format)?;
                        let mut next = writers.iter_mut();
                        for (field, column) in schema.fields().iter().zip(batch.columns()) {
                            for leaf in compute_leaves(field, column).map_err(format)? {
                                next.next()
                                    .expect("one writer per leaf")
                                    .write(&leaf)
                                    .map_err(format)?;
                            }
                        }
                        let chunks = writers
                            .into_iter()
                            .map(|w| w.close())
                            .collect::<Result<Vec<ArrowColumnChunk>, _>>()
                            .map_err(format)?;
                        Ok((chunks, value))
                    })
                    .collect::<Vec<Result<_, StageError>>>()
                    // Every group of the window finishes, so that a failure names the
                    // first bad row group whichever thread got to it first.
                    .into_iter()
                    .collect::<Result<Vec<_>, StageError>>()
            },
            || append(before),
        );
        appended?;
        encoded_before = encoded?;
    }
    append(encoded_before)?;
    // The last use of `append`, which borrows the writer mutably.
    let file = file_writer.into_inner().map_err(format)?;
    file.sync_all().map_err(|e| StageError::io(path, e))?;
    Ok(values)
}

/// Asks the kernel to start writing the file's dirty pages to disk now, without waiting.
/// A large table is otherwise all still in the page cache when the final fsync comes (the
/// kernel's background writeback starts at a tenth of RAM), and the fsync then waits for
/// the whole file; started early, the disk works while the stage computes.
fn start_writeback(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a descriptor the caller keeps open; an error only
        // means the final fsync does all the work, as without this call.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
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

/// How many rows a Parquet table has, from its footer alone.
pub fn table_rows(path: &Path) -> Result<usize, StageError> {
    let file = File::open(path).map_err(|e| StageError::io(path, e))?;
    let metadata = ArrowReaderMetadata::load(&file, Default::default())
        .map_err(|e| StageError::format(path, e))?;
    Ok(metadata.metadata().file_metadata().num_rows() as usize)
}

/// One column of a Parquet table as a plain vector, cast to `T` when the stored type
/// differs losslessly (say u8 → i64). Only that column is decoded.
pub fn read_column<T>(path: &Path, name: &str) -> Result<Vec<T::Native>, StageError>
where
    T: arrow::datatypes::ArrowPrimitiveType,
{
    read_column_rows::<T>(path, name, 0..usize::MAX)
}

/// Rows `rows` (clipped to the table) of one column: only the row groups that hold them
/// are decoded, and within those only the pages that hold them, so a stage that needs a
/// table's first 5% reads about 5% of it, and a range straddling two row groups costs
/// about its own length rather than two whole groups.
pub fn read_column_rows<T>(
    path: &Path,
    name: &str,
    rows: std::ops::Range<usize>,
) -> Result<Vec<T::Native>, StageError>
where
    T: arrow::datatypes::ArrowPrimitiveType,
{
    ParquetTable::open(path)?.column_rows::<T>(name, rows)
}

/// A Parquet table whose footer has been read once, for a stage that reads many ranges
/// of its columns (a row group at a time, say): each read then costs its rows only.
pub struct ParquetTable {
    path: std::path::PathBuf,
    metadata: ArrowReaderMetadata,
}

impl ParquetTable {
    pub fn open(path: &Path) -> Result<ParquetTable, StageError> {
        let file = File::open(path).map_err(|e| StageError::io(path, e))?;
        let metadata = ArrowReaderMetadata::load(&file, Default::default())
            .map_err(|e| StageError::format(path, e))?;
        Ok(ParquetTable {
            path: path.to_path_buf(),
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The row count its footer gives.
    pub fn rows(&self) -> usize {
        self.metadata.metadata().file_metadata().num_rows() as usize
    }

    /// Rows `rows` (clipped to the table) of the column `name`, as [`read_column_rows`].
    pub fn column_rows<T>(
        &self,
        name: &str,
        rows: std::ops::Range<usize>,
    ) -> Result<Vec<T::Native>, StageError>
    where
        T: arrow::datatypes::ArrowPrimitiveType,
    {
        use arrow::array::{Array, AsArray};
        use parquet::arrow::arrow_reader::{RowSelection, RowSelector};
        use parquet::arrow::ProjectionMask;

        let (path, metadata) = (self.path.as_path(), &self.metadata);
        let index = metadata
            .schema()
            .fields()
            .iter()
            .position(|f| f.name() == name)
            .ok_or_else(|| StageError::input(path, format!("no column '{name}'")))?;
        let mask = ProjectionMask::roots(metadata.parquet_schema(), [index]);
        // The row groups that hold some of `rows`, each with the rows of it wanted:
        // (row group, rows of it to skip, rows to take, rows it holds).
        let mut groups = Vec::new();
        let mut first_row = 0;
        for (index, group) in metadata.metadata().row_groups().iter().enumerate() {
            let size = group.num_rows() as usize;
            let (start, end) = (rows.start.max(first_row), rows.end.min(first_row + size));
            if start < end {
                groups.push((index, start - first_row, end - start, size));
            }
            first_row += size;
        }
        // Row groups are decoded in parallel, each straight into its slice of the output.
        // The output is not zeroed first: every slot is written once below (zeroing cost a
        // twentieth of `pass2`, which reads ten columns a row group at a time).
        let total = groups.iter().map(|g| g.2).sum();
        let mut values: Vec<T::Native> = Vec::with_capacity(total);
        let mut slices = Vec::with_capacity(groups.len());
        let mut rest = &mut values.spare_capacity_mut()[..total];
        for &(group, skip, take, size) in &groups {
            let (slice, tail) = rest.split_at_mut(take);
            slices.push((group, skip, size, slice));
            rest = tail;
        }
        slices
            .into_par_iter()
            .try_for_each(|(group, skip, size, slice)| {
                let file = File::open(path).map_err(|e| StageError::io(path, e))?;
                let mut builder =
                    ParquetRecordBatchReaderBuilder::new_with_metadata(file, metadata.clone())
                        .with_projection(mask.clone())
                        .with_row_groups(vec![group])
                        .with_batch_size(ROW_GROUP_ROWS);
                if slice.len() < size {
                    // Whole pages before and after the rows are skipped undecoded.
                    builder = builder.with_row_selection(RowSelection::from(vec![
                        RowSelector::skip(skip),
                        RowSelector::select(slice.len()),
                        RowSelector::skip(size - skip - slice.len()),
                    ]));
                }
                let reader = builder.build().map_err(|e| StageError::format(path, e))?;
                let mut filled = 0;
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
                    let part = cast.as_primitive::<T>().values();
                    let end = filled + part.len();
                    if end > slice.len() {
                        return Err(StageError::input(
                            path,
                            format!("row group {group} holds more rows than its metadata says"),
                        ));
                    }
                    slice[filled..end].write_copy_of_slice(part);
                    filled = end;
                }
                if filled != slice.len() {
                    return Err(StageError::input(
                        path,
                        format!("row group {group} holds fewer rows than its metadata says"),
                    ));
                }
                Ok(())
            })?;
        // SAFETY: each slice was checked above to be filled exactly, and together the
        // slices are the first `total` slots of the capacity.
        unsafe { values.set_len(total) };
        Ok(values)
    }
}

/// A distributions table (`position`, `candidate`, `model_p`: one row per candidate, a
/// position's rows together, positions increasing, as pass-1 writes it) as one
/// distribution per position.
pub fn read_distributions(path: &Path) -> Result<Vec<(i64, Vec<f32>)>, StageError> {
    use arrow::datatypes::{Float32Type, Int64Type};
    let position = read_column::<Int64Type>(path, "position")?;
    let model_p = read_column::<Float32Type>(path, "model_p")?;
    let mut kept: Vec<(i64, Vec<f32>)> = Vec::new();
    for (&p, &v) in position.iter().zip(&model_p) {
        match kept.last_mut() {
            Some((last, probs)) if *last == p => probs.push(v),
            Some((last, _)) if *last > p => {
                return Err(StageError::input(
                    path,
                    format!(
                    "position {p} comes after {last}: the distributions are not sorted by position"
                ),
                ))
            }
            _ => kept.push((p, vec![v])),
        }
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Int64Type};

    /// Ranges inside one row group, across a boundary, past the end and empty: each
    /// comes back as exactly its rows, whichever pages and groups were skipped.
    #[test]
    fn a_range_of_rows_reads_exactly_those_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let len = 2 * ROW_GROUP_ROWS + 12_345;
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let column = Int64Array::from_iter_values((0..len as i64).map(|i| i * 3 + 1));
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(column)]).unwrap();
        write_parquet(&path, schema, [batch], &ParquetLayout::default()).unwrap();
        let g = ROW_GROUP_ROWS;
        for rows in [
            0..10,
            g - 7..g + 70_000,
            5..2 * g + 3,
            2 * g + 12_000..usize::MAX,
            g + 40_000..g + 40_000,
            0..usize::MAX,
        ] {
            let got = read_column_rows::<Int64Type>(&path, "v", rows.clone()).unwrap();
            let expected: Vec<i64> = (rows.start.min(len)..rows.end.min(len))
                .map(|i| i as i64 * 3 + 1)
                .collect();
            assert!(got == expected, "rows {rows:?}: {} values", got.len());
        }
    }
}
