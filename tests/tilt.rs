//! The legal n-gram tilt (issue 28): the `hints` stage on the embedded corpus, end to end.
//! The kernel's exactness (the spec's worked examples, the reference with colliding
//! slots, contexts kept by their tokens) is tested beside it, in stages/tilt.

mod common;

use arrow::datatypes::{Float32Type, Int64Type, UInt16Type, UInt32Type};
use common::Project;

const HINTS: &str = "
[nodes.hints]
stage = \"hints\"
inputs.tokens = \"tokens\"
";

fn the_one(project: &Project, stage: &str) -> std::path::PathBuf {
    let dirs: Vec<_> = std::fs::read_dir(project.path().join("artifacts").join(stage))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|d| d.is_dir())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

#[test]
fn the_hints_table_is_the_kernels_one_row_per_target() {
    let project = Project::small();
    let pipeline = Project::small_pipeline(300) + HINTS;
    project.write_pipeline(&pipeline);
    let out = project.ok(&["run"]);
    assert!(out.contains("hints at share ≥ 0.8"), "{out}");
    let val = stage_api::read_column::<UInt16Type>(
        &the_one(&project, "tokenize").join("val.parquet"),
        "token",
    )
    .unwrap();
    let table = the_one(&project, "hints").join("hints.parquet");
    let position = stage_api::read_column::<Int64Type>(&table, "position").unwrap();
    let hint = stage_api::read_column::<UInt16Type>(&table, "hint").unwrap();
    let share = stage_api::read_column::<Float32Type>(&table, "share").unwrap();
    let seen = stage_api::read_column::<UInt32Type>(&table, "seen").unwrap();
    assert_eq!(position, (1..val.len() as i64).collect::<Vec<_>>());
    // #2135's seed: the first target.
    let expected = tilt::kernel::Kernel::default()
        .hints(&val[1..], val[1])
        .unwrap();
    assert_eq!(
        (hint, share.clone(), seen),
        (expected.hint, expected.share, expected.seen)
    );
    let gated = share.iter().filter(|&&s| s >= 0.8).count();
    assert!(
        gated > 100,
        "the small corpus repeats itself: {gated} gated"
    );
    // The same bytes again (forced), and reused when nothing changed.
    let before = std::fs::read(&table).unwrap();
    project.ok(&["run", "--force", "hints"]);
    assert_eq!(std::fs::read(&table).unwrap(), before);
}

#[test]
fn a_full_table_is_a_one_line_error_and_the_store_keeps_nothing_of_it() {
    let project = Project::small();
    project.ok(&["run"]);
    let before = project.store_snapshot();
    project.write_pipeline(&(Project::small_pipeline(300) + HINTS + "params.table_bits = 4\n"));
    let line = project.fails(&["run"]);
    assert!(
        line.contains("val.parquet")
            && line.contains("table (2^4 slots) is full at target")
            && line.contains("the reference aborts there"),
        "{line}"
    );
    let after = project.store_snapshot();
    let added: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    assert!(
        added.iter().all(|k| !k.starts_with("hints/")),
        "a failed hints node left {added:?}"
    );
}

#[test]
fn a_kernel_not_built_is_refused_when_the_pipeline_loads() {
    let project = Project::small();
    project.write_pipeline(&(Project::small_pipeline(300) + HINTS + "params.kernel = \"1514\"\n"));
    let line = project.fails(&["status"]);
    assert!(
        line.contains("kernel") && line.contains("\"2135\""),
        "{line}"
    );
}
