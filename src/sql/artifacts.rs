//! The `artifacts` table: one row per stored artifact, from its manifest, with whether
//! the pipeline's current recipe points at it.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Result;
use arrow::array::{ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};

use crate::store::Store;

pub(super) fn artifacts_table(
    store: &Store,
    current: &BTreeMap<String, String>,
) -> Result<RecordBatch> {
    let manifests = store.list().artifacts;
    let schema = Arc::new(Schema::new(vec![
        Field::new("node", DataType::Utf8, true),
        Field::new("stage", DataType::Utf8, false),
        Field::new("version", DataType::UInt64, false),
        Field::new("recipe", DataType::Utf8, false),
        Field::new("content_hash", DataType::Utf8, false),
        Field::new("current", DataType::Boolean, false),
        Field::new("created_at", DataType::Utf8, false),
        Field::new("seconds", DataType::Float64, false),
        Field::new("files", DataType::UInt64, false),
        Field::new("bytes", DataType::UInt64, false),
        Field::new("rows", DataType::UInt64, false),
        Field::new("path", DataType::Utf8, false),
    ]));
    let m = &manifests;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter(m.iter().map(|(_, m)| {
            Some(
                current
                    .get(&m.recipe)
                    .cloned()
                    .unwrap_or_else(|| m.node.clone()),
            )
        }))),
        Arc::new(StringArray::from_iter_values(
            m.iter().map(|(_, m)| m.stage.as_str()),
        )),
        Arc::new(UInt64Array::from_iter_values(
            m.iter().map(|(_, m)| m.version as u64),
        )),
        Arc::new(StringArray::from_iter_values(
            m.iter().map(|(_, m)| m.recipe.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            m.iter().map(|(_, m)| m.content_hash.as_str()),
        )),
        Arc::new(BooleanArray::from_iter(
            m.iter().map(|(_, m)| Some(current.contains_key(&m.recipe))),
        )),
        Arc::new(StringArray::from_iter_values(
            m.iter().map(|(_, m)| m.created_at.as_str()),
        )),
        Arc::new(Float64Array::from_iter_values(
            m.iter().map(|(_, m)| m.seconds),
        )),
        Arc::new(UInt64Array::from_iter_values(
            m.iter().map(|(_, m)| m.files.len() as u64),
        )),
        Arc::new(UInt64Array::from_iter_values(
            m.iter()
                .map(|(_, m)| m.files.values().map(|f| f.bytes).sum::<u64>()),
        )),
        Arc::new(UInt64Array::from_iter_values(m.iter().map(|(_, m)| {
            m.files.values().filter_map(|f| f.rows).sum::<u64>()
        }))),
        Arc::new(StringArray::from_iter_values(
            m.iter().map(|(p, _)| p.to_string_lossy().into_owned()),
        )),
    ];
    Ok(RecordBatch::try_new(schema, columns)?)
}
