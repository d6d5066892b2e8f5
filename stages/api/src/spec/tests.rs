use super::*;
use ColumnType::*;

const PRODUCER: StageSpec = StageSpec {
    kind: "producer",
    version: 1,
    outputs: &[
        Output::table(
            "t",
            &[
                Column::new("a", I64),
                Column::nullable("b", F32),
                Column::derived("twice_a", F64, "a * 2"),
            ],
        ),
        Output::file("meta.json", "metadata"),
        Output::file_if("extra.txt", "only sometimes"),
    ],
    ..StageSpec::NONE
};

#[test]
fn a_read_is_satisfied_by_a_table_with_the_columns_or_says_what_is_missing() {
    assert_eq!(
        PRODUCER.cannot_provide(&Read::table("t", &["b", "a"])),
        None
    );
    assert_eq!(
        PRODUCER
            .cannot_provide(&Read::table("t", &["a", "c"]))
            .as_deref(),
        Some("no column c")
    );
    assert_eq!(
        PRODUCER
            .cannot_provide(&Read::table("u", &["a"]))
            .as_deref(),
        Some("not produced")
    );
    assert_eq!(
        PRODUCER
            .cannot_provide(&Read::table("t", &["a", "twice_a"]))
            .as_deref(),
        Some("column twice_a is derived in SQL, not stored: read what it is computed from")
    );
    assert_eq!(PRODUCER.cannot_provide(&Read::file("meta.json")), None);
    assert_eq!(
        PRODUCER
            .cannot_provide(&Read::table("meta.json", &[]))
            .as_deref(),
        Some("a file, not a table")
    );
}

#[test]
fn a_derived_column_is_declared_but_not_in_the_files_schema() {
    let Produced::Table(columns) = PRODUCER.outputs[0].what else {
        unreachable!()
    };
    let schema = arrow_schema(columns);
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(
        PRODUCER.outputs[0].to_string(),
        "t(a i64, b f32?, twice_a f64 (derived))"
    );
}

#[test]
fn outputs_are_held_to_the_declaration() {
    let dir = std::env::temp_dir().join(format!("spec-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let write = |columns: &[Column]| {
        let schema = arrow_schema(columns);
        let batch = arrow::array::RecordBatch::new_empty(schema.clone());
        crate::write_parquet(&dir.join("t.parquet"), schema, [batch], &Default::default()).unwrap();
    };
    write(&[Column::new("a", I64), Column::nullable("b", F32)]);
    let missing_file = PRODUCER.check_outputs(&dir).unwrap_err();
    assert!(missing_file.contains("meta.json"), "{missing_file}");
    std::fs::write(dir.join("meta.json"), "{}").unwrap();
    PRODUCER.check_outputs(&dir).unwrap();

    write(&[Column::new("a", I64), Column::new("b", F64)]);
    let wrong_type = PRODUCER.check_outputs(&dir).unwrap_err();
    assert!(
        wrong_type.ends_with("declares t(a i64, b f32?) but wrote (a i64, b f64)"),
        "{wrong_type}"
    );
    write(&[Column::new("a", I64), Column::nullable("b", F32)]);
    std::fs::write(dir.join("stray.bin"), "").unwrap();
    let stray = PRODUCER.check_outputs(&dir).unwrap_err();
    assert!(
        stray.contains("stray.bin") && stray.contains("does not declare"),
        "{stray}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
