//! The tables the tokenize stage writes, and their schemas.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray, UInt16Array, UInt32Array,
    UInt64Array, UInt8Array,
};
use arrow::datatypes::Schema;
use stage_api::{arrow_schema, write_parquet, Column, ColumnType::*, ParquetLayout, StageError};

use crate::sentencepiece::ByteTable;

/// `train` and `val`: one row per position of the split's token stream.
pub const TOKEN_TABLE: &[Column] = &[
    Column::new("position", I64),
    Column::new("token", U16),
    Column::new("doc", U32),
    Column::new("bytes", U8),
];

/// `vocab`: one row per vocabulary entry.
pub const VOCAB_TABLE: &[Column] = &[
    Column::new("id", U16),
    Column::new("piece", Utf8),
    Column::new("base_bytes", U8),
    Column::new("is_boundary", Bool),
    Column::new("has_leading_space", Bool),
    Column::new("kind", Utf8),
];

/// `docs`: one row per document of either split.
pub const DOCS_TABLE: &[Column] = &[
    Column::new("split", Utf8),
    Column::new("doc", U32),
    Column::new("source", Utf8),
    Column::new("line", U64),
    Column::new("bytes", U64),
    Column::new("tokens", U64),
];

/// A split's token stream: row i is position i. `bytes[i]` is what token i adds to the
/// BPB denominator when it is scored as a target.
#[derive(Debug, Default, Clone)]
pub struct TokenTable {
    pub token: Vec<u16>,
    pub doc: Vec<u32>,
    pub bytes: Vec<u8>,
}

impl TokenTable {
    pub fn len(&self) -> usize {
        self.token.len()
    }

    pub fn is_empty(&self) -> bool {
        self.token.is_empty()
    }

    pub fn total_bytes(&self) -> u64 {
        self.bytes.iter().map(|&b| b as u64).sum()
    }

    pub fn push_document(&mut self, doc: u32, bos: u16, bos_bytes: u8) {
        self.token.push(bos);
        self.doc.push(doc);
        self.bytes.push(bos_bytes);
    }

    pub fn push(&mut self, token: u16, bytes: u8) {
        let doc = self.doc.last().copied().unwrap_or(0);
        self.token.push(token);
        self.doc.push(doc);
        self.bytes.push(bytes);
    }

    /// A shard stream as the challenge scores it: position 0 is never a target (0 bytes),
    /// every later position gets the §1.4 bytes given its predecessor; a document starts
    /// at each BOS.
    pub fn from_shard_stream(tokens: &[u16], bos: u16, table: &ByteTable) -> TokenTable {
        let mut doc = Vec::with_capacity(tokens.len());
        let mut bytes = Vec::with_capacity(tokens.len());
        let mut current: u32 = 0;
        let mut seen_bos = false;
        for (p, &t) in tokens.iter().enumerate() {
            if t == bos {
                if seen_bos {
                    current += 1;
                }
                seen_bos = true;
            }
            doc.push(current);
            bytes.push(if p == 0 {
                0
            } else {
                table.target_bytes(tokens[p - 1], t)
            });
        }
        TokenTable {
            token: tokens.to_vec(),
            doc,
            bytes,
        }
    }

    /// One row per document of a stream whose documents are told apart by `doc`.
    pub fn doc_rows(&self, split: &'static str) -> Vec<DocRow> {
        let mut rows: Vec<DocRow> = Vec::new();
        for (i, &doc) in self.doc.iter().enumerate() {
            if rows.last().is_none_or(|r| r.doc != doc) {
                rows.push(DocRow {
                    split,
                    doc,
                    source: String::new(),
                    line: 0,
                    bytes: 0,
                    tokens: 0,
                });
            }
            let row = rows.last_mut().expect("pushed above");
            row.tokens += 1;
            row.bytes += self.bytes[i] as u64;
        }
        rows
    }

    pub fn schema() -> Arc<Schema> {
        arrow_schema(TOKEN_TABLE)
    }

    pub fn write(&self, path: &Path) -> Result<u64, StageError> {
        let schema = Self::schema();
        write_parquet(
            path,
            schema.clone(),
            stage_api::row_groups(self.len()).map(|rows| self.batch(&schema, rows)),
            &ParquetLayout::delta(&["position", "doc"]),
        )
    }

    /// [`TokenTable::write`] with its row groups encoded on every core.
    pub fn write_parallel(&self, path: &Path) -> Result<u64, StageError> {
        let schema = Self::schema();
        stage_api::write_parquet_parallel(
            path,
            schema.clone(),
            self.len(),
            &ParquetLayout::delta(&["position", "doc"]),
            |rows| Ok((self.batch(&schema, rows), ())),
        )?;
        Ok(self.len() as u64)
    }

    fn batch(&self, schema: &Arc<Schema>, rows: std::ops::Range<usize>) -> RecordBatch {
        let (start, end) = (rows.start, rows.end);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_iter_values(start as i64..end as i64)),
            Arc::new(UInt16Array::from(self.token[start..end].to_vec())),
            Arc::new(UInt32Array::from(self.doc[start..end].to_vec())),
            Arc::new(UInt8Array::from(self.bytes[start..end].to_vec())),
        ];
        RecordBatch::try_new(schema.clone(), columns).expect("columns match schema")
    }
}

pub struct VocabRow {
    pub id: u16,
    pub piece: String,
    pub base_bytes: u8,
    pub is_boundary: bool,
    pub has_leading_space: bool,
    pub kind: &'static str,
}

pub fn write_vocab(path: &Path, rows: &[VocabRow]) -> Result<u64, StageError> {
    let schema = arrow_schema(VOCAB_TABLE);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt16Array::from_iter_values(rows.iter().map(|r| r.id))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.piece.as_str()),
        )),
        Arc::new(UInt8Array::from_iter_values(
            rows.iter().map(|r| r.base_bytes),
        )),
        Arc::new(BooleanArray::from_iter(
            rows.iter().map(|r| Some(r.is_boundary)),
        )),
        Arc::new(BooleanArray::from_iter(
            rows.iter().map(|r| Some(r.has_leading_space)),
        )),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.kind))),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).expect("columns match schema");
    write_parquet(path, schema, [batch], &ParquetLayout::default())
}

pub struct DocRow {
    pub split: &'static str,
    pub doc: u32,
    pub source: String,
    pub line: u64,
    pub bytes: u64,
    pub tokens: u64,
}

pub fn write_docs(path: &Path, rows: &[DocRow]) -> Result<u64, StageError> {
    let schema = arrow_schema(DOCS_TABLE);
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.split))),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.doc))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.source.as_str()),
        )),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.line))),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.bytes))),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.tokens))),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).expect("columns match schema");
    write_parquet(path, schema, [batch], &ParquetLayout::default())
}

#[cfg(test)]
mod tests {
    use super::TokenTable;

    /// The parallel writer gives the sequential one's bytes, so a stage may use either
    /// without moving a content hash.
    #[test]
    fn both_writers_give_the_same_bytes() {
        let rows = 2 * stage_api::ROW_GROUP_ROWS + 12_345;
        let table = TokenTable {
            token: (0..rows).map(|i| (i * 7919 % 1024) as u16).collect(),
            doc: (0..rows).map(|i| (i / 5000) as u32).collect(),
            bytes: (0..rows).map(|i| (i % 5) as u8).collect(),
        };
        let dir = std::env::temp_dir().join(format!("cm-writers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("sequential.parquet"), dir.join("parallel.parquet"));
        table.write(&a).unwrap();
        table.write_parallel(&b).unwrap();
        let same = std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(same);
    }
}
