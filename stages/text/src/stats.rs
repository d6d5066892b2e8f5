//! The `token-stats` stage: how often each vocabulary entry occurs in each split, and how
//! many bytes it covers. The first thing to look at after a tokenizer change, and the
//! simplest consumer of a token table.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, RecordBatch, StringArray, UInt16Array, UInt64Array, UInt8Array,
};
use serde::{Deserialize, Serialize};
use stage_api::products;
use stage_api::{
    read_parquet, write_parquet, Column, ColumnType::*, Input, Output, ParquetLayout, Read, Stage,
    StageContext, StageError, StageParams, StageReport, StageSpec,
};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenStatsParams {}

impl StageParams for TokenStatsParams {}

pub struct TokenStatsStage;

/// `token_counts`: one row per vocabulary entry.
const TOKEN_COUNTS: &[Column] = &[
    Column::new("token", U16),
    Column::new("piece", Utf8),
    Column::new("train_count", U64),
    Column::new("val_count", U64),
    Column::new("train_bytes", U64),
    Column::new("val_bytes", U64),
];

/// What `token-stats` reports.
#[derive(Debug, Serialize, Deserialize)]
pub struct TokenStatsReport {
    pub vocab_size: u64,
    /// Vocabulary entries that never occur in val.
    pub val_tokens_unused_entries: u64,
}

impl Stage for TokenStatsStage {
    type Params = TokenStatsParams;

    const SPEC: StageSpec = StageSpec {
        kind: "token-stats",
        version: 1,
        summary: "token tables -> per-token counts and bytes in train and val",
        inputs: &[Input::required(
            "tokens",
            &[
                Read::table("vocab", &["piece"]),
                Read::table("train", &["token", "bytes"]),
                products::VAL.read(&["token", "bytes"]),
            ],
        )],
        outputs: &[Output::table("token_counts", TOKEN_COUNTS)],
        ..StageSpec::NONE
    };

    fn run(&self, ctx: &StageContext, _: TokenStatsParams) -> Result<StageReport, StageError> {
        let tokens = ctx.input("tokens")?;
        let vocab_path = tokens.file("vocab.parquet");
        let mut pieces: Vec<String> = Vec::new();
        for batch in read_parquet(&vocab_path)? {
            let column = string_column(&batch, "piece", &vocab_path)?;
            pieces.extend((0..column.len()).map(|i| column.value(i).to_string()));
        }
        let vocab_size = pieces.len();
        let mut counts = [vec![0u64; vocab_size], vec![0u64; vocab_size]];
        let mut bytes = [vec![0u64; vocab_size], vec![0u64; vocab_size]];
        for (split, name) in ["train", "val"].iter().enumerate() {
            let path = tokens.file(&format!("{name}.parquet"));
            for batch in read_parquet(&path)? {
                let token = typed_column::<UInt16Array>(&batch, "token", &path)?;
                let token_bytes = typed_column::<UInt8Array>(&batch, "bytes", &path)?;
                for (t, b) in token.values().iter().zip(token_bytes.values().iter()) {
                    let t = *t as usize;
                    if t >= vocab_size {
                        return Err(StageError::input(
                            &path,
                            format!(
                                "token id {t} is outside the vocabulary ({vocab_size} entries)"
                            ),
                        ));
                    }
                    counts[split][t] += 1;
                    bytes[split][t] += *b as u64;
                }
            }
        }
        let schema = stage_api::arrow_schema(TOKEN_COUNTS);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(UInt16Array::from_iter_values(0..vocab_size as u16)),
            Arc::new(StringArray::from_iter_values(pieces.iter())),
            Arc::new(UInt64Array::from(counts[0].clone())),
            Arc::new(UInt64Array::from(counts[1].clone())),
            Arc::new(UInt64Array::from(bytes[0].clone())),
            Arc::new(UInt64Array::from(bytes[1].clone())),
        ];
        let batch = RecordBatch::try_new(schema.clone(), columns).expect("columns match schema");
        write_parquet(
            &ctx.output("token_counts.parquet"),
            schema,
            [batch],
            &ParquetLayout::default(),
        )?;
        let unused_in_val = counts[1].iter().filter(|&&c| c == 0).count();
        Ok(StageReport::default().with_fields(&TokenStatsReport {
            vocab_size: vocab_size as u64,
            val_tokens_unused_entries: unused_in_val as u64,
        }))
    }
}

fn typed_column<'a, T: 'static>(
    batch: &'a RecordBatch,
    name: &str,
    path: &std::path::Path,
) -> Result<&'a T, StageError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<T>())
        .ok_or_else(|| {
            StageError::input(
                path,
                format!("column '{name}' is missing or has the wrong type"),
            )
        })
}

fn string_column<'a>(
    batch: &'a RecordBatch,
    name: &str,
    path: &std::path::Path,
) -> Result<&'a StringArray, StageError> {
    typed_column::<StringArray>(batch, name, path)
}
