//! `cachemoney audit`: a rebuild from stored inputs compared byte for byte with what the
//! manifests claim, with differences located to a column and a row.

use crate::common;

use std::sync::Arc;

use arrow::array::{ArrayRef, Float32Array, RecordBatch};
use common::Project;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;

fn pipeline() -> String {
    Project::small_pipeline(300)
        + r#"
[nodes.pass1]
stage = "pass1"
inputs.tokens = "tokens"
params.model = "bigram"
"# + &Project::cache_chain(65536)
}

fn only_artifact(project: &Project, stage: &str) -> std::path::PathBuf {
    let mut dirs: Vec<_> = std::fs::read_dir(project.path().join("artifacts").join(stage))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(dirs.len(), 1);
    dirs.pop().unwrap()
}

#[test]
fn every_node_rebuilds_identically_and_the_store_is_untouched() {
    let project = Project::small();
    project.write_pipeline(&pipeline());
    project.ok(&["run", "--quiet"]);
    let before = project.store_snapshot();
    let out = project.ok(&["audit", "--all"]);
    for node in [
        "tokens",
        "token_stats",
        "pass1",
        "cache",
        "calibration",
        "scores",
    ] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(node) && l.contains("identical")),
            "{node}: {out}"
        );
    }
    assert!(out.contains("6 node(s) audited"), "{out}");
    assert!(out.contains("6 identical, 0 differ"), "{out}");
    assert_eq!(before, project.store_snapshot());
}

/// An artifact whose manifest was made to match a changed file passes `verify` (the
/// files are as the manifest says) but not `audit` (the code does not write them): the
/// report names the file, the column, the row and both values.
#[test]
fn a_forged_artifact_is_caught_with_its_column_and_row() {
    let project = Project::small();
    project.write_pipeline(&pipeline());
    project.ok(&["run", "--quiet"]);

    let dir = only_artifact(&project, "pass1");
    let path = dir.join("pass1.parquet");
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
    let schema = batches[0].schema();
    let column = schema.index_of("model_p").unwrap();
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema.clone(), None).unwrap();
    let mut row = 0usize;
    for batch in &batches {
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        if row <= 41 && 41 < row + batch.num_rows() {
            let values = batch
                .column(column)
                .as_any()
                .downcast_ref::<Float32Array>()
                .unwrap();
            let mut changed: Vec<f32> = values.values().to_vec();
            changed[41 - row] = 0.5;
            columns[column] = Arc::new(Float32Array::from(changed));
        }
        writer
            .write(&RecordBatch::try_new(schema.clone(), columns).unwrap())
            .unwrap();
        row += batch.num_rows();
    }
    writer.close().unwrap();

    // Make the manifest agree with the forged file.
    let manifest_path = dir.join("manifest.json");
    let mut manifest: cachemoney::store::Manifest =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    let entry = manifest.files.get_mut("pass1.parquet").unwrap();
    entry.blake3 = cachemoney::store::hash_file(&path).unwrap();
    entry.bytes = std::fs::metadata(&path).unwrap().len();
    manifest.content_hash = cachemoney::store::content_hash(&manifest.files);
    std::fs::write(
        &manifest_path,
        serde_json::to_string_pretty(&manifest).unwrap(),
    )
    .unwrap();
    project.ok(&["verify"]);

    let out = project.run(&["audit", "pass1"]);
    assert!(!out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("pass1          pass1        DIFFERS"),
        "{stdout}"
    );
    assert!(
        stdout.contains("pass1.parquet: blake3")
            && stdout.contains("column 'model_p' first differs at row 41: stored 0.5, rebuilt"),
        "{stdout}"
    );
    assert!(stdout.contains("1 node(s) audited"), "{stdout}");
    assert!(stdout.contains("0 identical, 1 differ"), "{stdout}");
}

#[test]
fn auditing_an_unbuilt_or_unknown_node_is_a_one_line_error() {
    let project = Project::small();
    project.write_pipeline(&pipeline());
    let line = project.fails(&["audit", "pass1"]);
    assert!(
        line.contains("node 'pass1' is not built") && line.contains("`cachemoney run` first"),
        "{line}"
    );
    let line = project.fails(&["audit", "nosuch"]);
    assert!(line.contains("no node named 'nosuch'"), "{line}");
}
