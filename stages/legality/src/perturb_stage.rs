//! The `perturb` stage: a tokens artifact whose val stream is changed after a secret cut
//! (shuffled, or with hidden targets replaced), and the positions where the re-run on it
//! is asked for whole distributions (the legality probes' re-runs start from it; see
//! [`crate::perturb`]).

use std::path::Path;

use arrow::array::AsArray;
use arrow::datatypes::{UInt16Type, UInt32Type, UInt8Type};
use stage_api::products;
use stage_api::{
    read_column, Input, Output, Read, Stage, StageContext, StageError, StageReport, StageSpec,
};
use text::sentencepiece::ByteTable;
use text::{TokenTable, TOKEN_TABLE, VOCAB_TABLE};

use crate::aim::Hints;
use crate::perturb::{perturb_aimed, Classes, CutParams};

/// `perturb`: a tokens artifact whose val stream is changed after a cut.
pub struct PerturbStage;

/// `probe_positions`: where every pass-1 source run on this artifact keeps its whole
/// distribution (read by `pass1`, see `pass1::probe_positions`).
pub const PROBE_POSITIONS_TABLE: &[stage_api::Column] = &[stage_api::Column::new(
    "position",
    stage_api::ColumnType::I64,
)];

pub(crate) const VAL: Read = products::VAL.read(&["token", "doc", "bytes"]);
pub(crate) const VOCAB: Read = Read::table(
    "vocab",
    &[
        "id",
        "piece",
        "base_bytes",
        "is_boundary",
        "has_leading_space",
    ],
);

/// A tilt chain's hints on the original stream, which aim a replace re-run
/// ([`crate::aim`]; wired by the pipeline).
pub(crate) const HINTS: Read = products::HINTS.read(&["hint", "share"]);

/// The hints wired as `hints`, if any, for a val stream of `tokens` tokens.
pub(crate) fn read_hints(ctx: &StageContext, tokens: usize) -> Result<Option<Hints>, StageError> {
    match ctx.inputs.get("hints") {
        None => Ok(None),
        Some(input) => Hints::read(&input.file("hints.parquet"), tokens).map(Some),
    }
}

/// The vocabulary's token classes, from a tokens artifact's `vocab.parquet`.
pub(crate) fn read_classes(path: &Path, rule: &ByteTable) -> Result<Classes, StageError> {
    let batches = stage_api::read_parquet(path)?;
    let mut pieces = Vec::with_capacity(rule.base_bytes.len());
    for batch in &batches {
        let column = batch
            .column_by_name("piece")
            .ok_or_else(|| StageError::input(path, "no column 'piece'"))?;
        let text = column
            .as_string_opt::<i32>()
            .ok_or_else(|| StageError::input(path, "column 'piece' is not text"))?;
        pieces.extend(text.iter().map(|p| p.unwrap_or("").to_string()));
    }
    Ok(Classes::new(rule, &pieces))
}

impl Stage for PerturbStage {
    type Params = CutParams;

    const SPEC: StageSpec = StageSpec {
        kind: "perturb",
        // 2: secret cuts, the replace kind, probe positions. 3: the secret's random
        // stream read block by block (the draws changed; found by `audit`, which rebuilt a
        // version-2 artifact with another cut). 4: shuffle cuts anywhere a shuffle can still
        // change a target (they stopped at 95%), the changed target of another class. 5:
        // that class read from byte-level BPE pieces too, never a boundary. (A cut in
        // declared orders, `order`, is new and leaves stream cuts as they were.)
        version: 5,
        summary: "tokens -> the same tokens changed after a secret cut (shuffled, or hidden targets replaced), and the positions a re-run is asked about (for the legality probes; made by the pipeline)",
        inputs: &[
            Input::required("tokens", &[VAL, VOCAB, Read::table("train", &["token"])]),
            Input::optional("hints", &[HINTS]),
        ],
        outputs: &[
            Output::table("train", TOKEN_TABLE),
            Output::table(products::VAL.name, TOKEN_TABLE),
            Output::table("vocab", VOCAB_TABLE),
            Output::table("probe_positions", PROBE_POSITIONS_TABLE),
            Output::file(
                "perturbation.json",
                "the kind, the cut, the first changed target and how many targets are hidden",
            ),
        ],
        ..StageSpec::NONE
    };

    fn run(&self, ctx: &StageContext, cut: CutParams) -> Result<StageReport, StageError> {
        let tokens = ctx.input("tokens")?;
        let val_path = tokens.file("val.parquet");
        let val = read_column::<UInt16Type>(&val_path, "token")?;
        let doc = read_column::<UInt32Type>(&val_path, "doc")?;
        let mut bytes = read_column::<UInt8Type>(&val_path, "bytes")?;
        let rule = ByteTable::read_vocab(&tokens.file("vocab.parquet"))?;
        if let Some(bad) = rule.first_unknown(&val) {
            return Err(StageError::input(
                &val_path,
                format!("token {bad} is outside the vocabulary"),
            ));
        }
        let classes = read_classes(&tokens.file("vocab.parquet"), &rule)?;
        let hints = read_hints(ctx, val.len())?;
        let perturbed = perturb_aimed(&val, &doc, &classes, &cut, hints.as_ref())
            .map_err(|m| StageError::input(&val_path, m))?;
        let changed = perturbed.tokens.windows(2).zip(&mut bytes[1..]);
        // In declared orders, targets before the cut in stream order may change too.
        let first = match perturbed.ordering {
            Some(_) => 0,
            None => perturbed.cut,
        };
        for (pair, b) in changed.skip(first) {
            *b = rule.target_bytes(pair[0], pair[1]);
        }
        TokenTable {
            token: perturbed.tokens.clone(),
            doc,
            bytes,
        }
        .write_parallel(&ctx.output("val.parquet"))?;
        for name in ["train.parquet", "vocab.parquet"] {
            link_or_copy(&tokens.file(name), &ctx.output(name))?;
        }
        write_positions(
            &ctx.output("probe_positions.parquet"),
            &perturbed.probe_positions,
        )?;
        let changed = perturbed.changed();
        let mut record = serde_json::json!({
            "kind": perturbed.kind,
            "cut": perturbed.cut,
            "changed": changed,
            "original_target": val[changed],
            "new_target": perturbed.tokens[changed],
            "hidden": perturbed.hidden.len(),
            "probe_positions": perturbed.probe_positions.len(),
        });
        if let Some(hint) = perturbed.aimed {
            record["aimed_at_hint"] = serde_json::Value::from(hint);
        }
        if let Some(ordering) = &perturbed.ordering {
            record["order"] = serde_json::Value::from(ordering.describe());
        }
        let path = ctx.output("perturbation.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&record).expect("json"))
            .map_err(|e| StageError::io(&path, e))?;
        Ok(StageReport::default().with_fields(&PerturbReport {
            cut: perturbed.cut as u64,
            val_tokens: val.len() as u64,
        }))
    }
}

/// What `perturb` reports: where the copy of val was cut, and its length.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct PerturbReport {
    pub cut: u64,
    pub val_tokens: u64,
}

fn write_positions(path: &Path, positions: &[i64]) -> Result<u64, StageError> {
    use std::sync::Arc;
    let schema = stage_api::arrow_schema(PROBE_POSITIONS_TABLE);
    let batch = arrow::array::RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(arrow::array::Int64Array::from(positions.to_vec()))],
    )
    .expect("one column");
    stage_api::write_parquet(path, schema, [batch], &stage_api::ParquetLayout::default())
}

/// Unchanged tables are hard links where the file system allows (artifacts are never
/// written in place), copies elsewhere.
fn link_or_copy(from: &Path, to: &Path) -> Result<(), StageError> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| StageError::io(to, e))
}
