//! Parameter Golf shard import against the challenge's own byte totals
//! (`tests/fixtures/fineweb-sp1024/gutenberg_classics_val_000000.expected.json`).

use crate::common;

use common::{shard_fixture, sp_model, Project};

fn import(truncate_multiple: usize) -> Project {
    let shard = shard_fixture();
    let p = Project::empty();
    p.write_pipeline(&format!(
        r#"[nodes.tokens]
stage = "tokenize"
files.val = "{}"
files.tokenizer = "{}"
params.source = "shards"
params.val_truncate_multiple = {truncate_multiple}
"#,
        shard.display(),
        sp_model().display()
    ));
    p.ok(&["run"]);
    p
}

fn row(p: &Project, query: &str) -> String {
    p.sql(query).lines().nth(1).unwrap().to_string()
}

#[test]
fn byte_totals_match_the_challenge_rule_after_val_truncation() {
    let p = import(2048);
    // 1,832,960 targets after truncation, plus position 0 which is never a target.
    assert_eq!(
        row(&p, "SELECT count(*), sum(bytes), sum(CASE WHEN position = 0 THEN bytes ELSE 0 END) FROM val"),
        "1832961,4727739,0"
    );
    assert_eq!(row(&p, "SELECT count(*) FROM train"), "0");
    // Ten books, each `[BOS] + tokens`.
    assert_eq!(
        row(
            &p,
            "SELECT count(*), sum(tokens) FROM docs WHERE split = 'val'"
        ),
        "10,1832961"
    );
    // The byte table itself (spec §1.4): byte-fallback ids 4..259, ▁ = 939.
    assert_eq!(
        row(&p, "SELECT count(*) FROM vocab WHERE kind = 'byte' AND base_bytes = 1 AND id BETWEEN 4 AND 259"),
        "256"
    );
    assert_eq!(
        row(
            &p,
            "SELECT piece, base_bytes, has_leading_space FROM vocab WHERE id = 939"
        ),
        "▁,0,true"
    );
    assert_eq!(row(&p, "SELECT count(*) FROM vocab WHERE is_boundary"), "4");
}

#[test]
fn byte_totals_match_over_all_targets_without_truncation() {
    let p = import(0);
    assert_eq!(
        row(&p, "SELECT count(*) - 1, sum(bytes) FROM val"),
        "1833807,4729671"
    );
}
