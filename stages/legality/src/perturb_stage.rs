//! The `perturb` stage: a tokens artifact whose val suffix after a cut is shuffled (the
//! legality probes' re-runs start from it; see [`crate::perturb`]).

use std::path::Path;

use arrow::datatypes::{UInt16Type, UInt32Type, UInt8Type};
use stage_api::{
    read_column, Input, Output, Read, Stage, StageContext, StageError, StageReport, StageSpec,
};
use text::sentencepiece::ByteTable;
use text::{TokenTable, TOKEN_TABLE, VOCAB_TABLE};

use crate::perturb::{perturb, CutParams};

/// `perturb`: a tokens artifact whose val suffix after a cut is shuffled.
pub struct PerturbStage;

pub(crate) const VAL: Read = Read::table("val", &["token", "doc", "bytes"]);
pub(crate) const VOCAB: Read = Read::table(
    "vocab",
    &["id", "base_bytes", "is_boundary", "has_leading_space"],
);

impl Stage for PerturbStage {
    type Params = CutParams;

    const SPEC: StageSpec = StageSpec {
        kind: "perturb",
        version: 1,
        summary: "tokens -> the same tokens with the val suffix after a cut shuffled (for the legality probes; made by the pipeline)",
        inputs: &[Input::required(
            "tokens",
            &[VAL, VOCAB, Read::table("train", &["token"])],
        )],
        outputs: &[
            Output::table("train", TOKEN_TABLE),
            Output::table("val", TOKEN_TABLE),
            Output::table("vocab", VOCAB_TABLE),
            Output::file("perturbation.json", "the cut and the first changed target"),
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
        let perturbed = perturb(&val, &cut).map_err(|m| StageError::input(&val_path, m))?;
        let changed = perturbed.tokens.windows(2).zip(&mut bytes[1..]);
        for (pair, b) in changed.skip(perturbed.cut) {
            *b = rule.target_bytes(pair[0], pair[1]);
        }
        TokenTable {
            token: perturbed.tokens.clone(),
            doc,
            bytes,
        }
        .write(&ctx.output("val.parquet"))?;
        for name in ["train.parquet", "vocab.parquet"] {
            link_or_copy(&tokens.file(name), &ctx.output(name))?;
        }
        let changed = perturbed.changed();
        let record = serde_json::json!({
            "cut": perturbed.cut,
            "changed": changed,
            "original_target": val[changed],
            "new_target": perturbed.tokens[changed],
        });
        let path = ctx.output("perturbation.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&record).expect("json"))
            .map_err(|e| StageError::io(&path, e))?;
        Ok(StageReport::default()
            .with("cut", perturbed.cut as u64)
            .with("val_tokens", val.len() as u64))
    }
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
