//! Text in, token tables out: the `tokenize` stage.
//!
//! Two sources feed it. *Raw text* (`.txt`, `.jsonl`) is split into train and val by
//! document and encoded with a byte-level BPE trained on the train split alone.
//! *Parameter Golf shards* are imported as they are, with the challenge's SentencePiece
//! model supplying the bytes-per-token rule (algorithm.md §1.4) and the val truncation
//! (§1.2) applied, so that our byte totals are the challenge's byte totals.
//!
//! Both produce the same tables: `train` and `val` (`position`, `token`, `doc`, `bytes`),
//! `vocab` and `docs`, plus the tokenizer file. `bytes` is what each token contributes to
//! the BPB denominator, so `sum(bytes)` is the denominator, whichever source it came from.
//!
//! This crate knows nothing of the artifact store: it reads the files it is handed and
//! writes into the directory it is given.

pub mod bpe;
pub mod corpus;
pub mod sentencepiece;
pub mod shards;
mod stats;
mod tables;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stage_api::products;
use stage_api::{
    FileRole, Output, Stage, StageContext, StageError, StageParams, StageReport, StageSpec,
};

pub use stats::TokenStatsStage;
pub use tables::{TokenTable, DOCS_TABLE, TOKEN_TABLE, VOCAB_TABLE};

/// Where the tokens come from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `.txt` / `.jsonl` documents, tokenized with a BPE trained here.
    Text,
    /// Parameter Golf `.bin` shards plus their SentencePiece `.model`.
    Shards,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizeParams {
    pub source: Source,
    /// Vocabulary size: BPE target size, or the size shards and model must agree with.
    pub vocab_size: usize,
    /// Text: fraction of the `corpus` files' documents that go to val.
    pub val_fraction: f64,
    /// Text: seed of the document split.
    pub seed: u64,
    /// Text: JSON field holding a `.jsonl` document's text.
    pub text_field: String,
    /// Shards: val is cut to `floor((n−1)/m)·m + 1` tokens (§1.2); 0 keeps all.
    pub val_truncate_multiple: usize,
}

impl Default for TokenizeParams {
    fn default() -> Self {
        TokenizeParams {
            source: Source::Text,
            vocab_size: 1024,
            val_fraction: 0.1,
            seed: 1337,
            text_field: "text".to_string(),
            val_truncate_multiple: 2048,
        }
    }
}

pub struct TokenizeStage;

impl Stage for TokenizeStage {
    type Params = TokenizeParams;

    const SPEC: StageSpec = StageSpec {
        kind: "tokenize",
        version: 1,
        summary: "text or shards -> train/val token tables, vocab, docs, tokenizer",
        files: &[
            FileRole {
                name: "corpus",
                required: false,
                help: "text: documents split into train/val by val_fraction",
            },
            FileRole {
                name: "train",
                required: false,
                help: "text: documents that all go to train; shards: fineweb_train_*.bin",
            },
            FileRole {
                name: "val",
                required: false,
                help: "text: documents that all go to val; shards: fineweb_val_*.bin",
            },
            FileRole {
                name: "tokenizer",
                required: false,
                help: "shards: the SentencePiece .model",
            },
        ],
        outputs: &[
            Output::table("train", TOKEN_TABLE),
            Output::table(products::VAL.name, TOKEN_TABLE),
            Output::table("vocab", VOCAB_TABLE),
            Output::table("docs", DOCS_TABLE),
            Output::file_if("tokenizer.json", "source = \"text\": the BPE trained here"),
            Output::file_if(
                "tokenizer.model",
                "source = \"shards\": a copy of files.tokenizer",
            ),
        ],
        ..StageSpec::NONE
    };

    fn run(&self, ctx: &StageContext, params: TokenizeParams) -> Result<StageReport, StageError> {
        match params.source {
            Source::Text => tokenize_text(ctx, &params),
            Source::Shards => import_shards(ctx, &params),
        }
    }
}

impl StageParams for TokenizeParams {
    fn validate(&self) -> Result<(), StageError> {
        stage_api::check_param(
            "vocab_size",
            self.vocab_size,
            1..=65536,
            "tokens are stored as u16",
        )?;
        stage_api::check_param(
            "val_truncate_multiple",
            self.val_truncate_multiple,
            0..=1 << 24,
            "a window length",
        )?;
        if !(0.0..=1.0).contains(&self.val_fraction) {
            return Err(StageError::invalid_param(
                "val_fraction",
                format!("{} is outside 0..=1", self.val_fraction),
            ));
        }
        Ok(())
    }
}

/// The train and val documents of a text source: `files.train` and `files.val` as
/// given, and `files.corpus` split between them by `val_fraction` (seeded); each split
/// must have a document.
fn text_splits(
    ctx: &StageContext,
    params: &TokenizeParams,
) -> Result<(Vec<corpus::Document>, Vec<corpus::Document>), StageError> {
    if !ctx.files("tokenizer").is_empty() {
        return Err(ctx.error(
            "files.tokenizer is for source = \"shards\"; text sources train their own BPE",
        ));
    }
    let read_all = |paths: &[PathBuf]| -> Result<Vec<corpus::Document>, StageError> {
        let mut docs = Vec::new();
        for path in paths {
            docs.extend(corpus::read_documents(path, &params.text_field)?);
        }
        Ok(docs)
    };
    let corpus_docs = read_all(ctx.files("corpus"))?;
    let mut train_docs = read_all(ctx.files("train"))?;
    let mut val_docs = read_all(ctx.files("val"))?;
    let all_files: Vec<&PathBuf> = ["corpus", "train", "val"]
        .iter()
        .flat_map(|r| ctx.files(r))
        .collect();
    if all_files.is_empty() {
        return Err(ctx.error("no input files: set files.corpus (or files.train and files.val)"));
    }
    if corpus_docs.is_empty() && train_docs.is_empty() && val_docs.is_empty() {
        return Err(StageError::input(
            all_files[0],
            "empty corpus: no non-empty document in any input file",
        ));
    }
    let val_picks =
        corpus::val_document_indices(corpus_docs.len(), params.val_fraction, params.seed);
    let mut picks = val_picks.iter().peekable();
    for (index, doc) in corpus_docs.into_iter().enumerate() {
        if picks.peek() == Some(&&index) {
            picks.next();
            val_docs.push(doc);
        } else {
            train_docs.push(doc);
        }
    }
    let first_file = all_files[0];
    if val_docs.is_empty() {
        return Err(StageError::input(
            first_file,
            format!(
                "the val split is empty ({} documents × val_fraction {} rounds to 0); raise val_fraction or set files.val",
                train_docs.len(),
                params.val_fraction
            ),
        ));
    }
    if train_docs.is_empty() {
        return Err(StageError::input(
            first_file,
            "the train split is empty (every document went to val); lower val_fraction or add files.train",
        ));
    }
    Ok((train_docs, val_docs))
}

/// What `tokenize` reports: where the tokens came from, the vocabulary they index, and
/// each split's size.
#[derive(Debug, Serialize, Deserialize)]
pub struct TokenizeReport {
    pub source: Source,
    pub vocab_size: u64,
    /// The token that begins every document.
    pub bos: u64,
    pub train_tokens: u64,
    pub train_bytes: u64,
    pub val_tokens: u64,
    pub val_bytes: u64,
    /// Text: the documents of each split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_documents: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_documents: Option<u64>,
    /// Shards: the tokens before val was cut to whole windows (train is never cut).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_tokens_before_truncation: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_tokens_before_truncation: Option<u64>,
}

/// One split's figures, as the tokenizer counted them.
#[derive(Debug, Default, Clone, Copy)]
struct SplitFigures {
    tokens: u64,
    bytes: u64,
    documents: Option<u64>,
    tokens_before_truncation: Option<u64>,
}

impl TokenizeReport {
    fn new(source: Source, vocab_size: u64, bos: u16, [train, val]: [SplitFigures; 2]) -> Self {
        TokenizeReport {
            source,
            vocab_size,
            bos: bos as u64,
            train_tokens: train.tokens,
            train_bytes: train.bytes,
            val_tokens: val.tokens,
            val_bytes: val.bytes,
            train_documents: train.documents,
            val_documents: val.documents,
            train_tokens_before_truncation: train.tokens_before_truncation,
            val_tokens_before_truncation: val.tokens_before_truncation,
        }
    }
}

fn tokenize_text(ctx: &StageContext, params: &TokenizeParams) -> Result<StageReport, StageError> {
    let (train_docs, val_docs) = text_splits(ctx, params)?;
    let mut timings = StageReport::default();
    let started = std::time::Instant::now();
    let train_texts: Vec<&str> = train_docs.iter().map(|d| d.text.as_str()).collect();
    let training = ctx.progress(1, "training BPE");
    training.enable_steady_tick(std::time::Duration::from_millis(200));
    let tokenizer = bpe::train(&train_texts, params.vocab_size).map_err(|m| ctx.error(m))?;
    training.finish_and_clear();
    let bos = tokenizer
        .token_to_id(bpe::BOS_PIECE)
        .expect("BOS is a trained special token") as u16;
    let vocab = bpe::token_bytes(&tokenizer);
    let byte_of: Vec<u8> = vocab.iter().map(|v| v.1).collect();

    timings.phase("train_bpe", started);
    let started = std::time::Instant::now();
    let tokenizer_path = ctx.output("tokenizer.json");
    tokenizer
        .save(&tokenizer_path, false)
        .map_err(|e| StageError::format(&tokenizer_path, e))?;
    sync_file(&tokenizer_path)?;

    let total_bytes: u64 = train_docs
        .iter()
        .chain(val_docs.iter())
        .map(|d| d.text.len() as u64)
        .sum();
    let encoding = ctx.progress(total_bytes, "encoding");
    let mut docs_rows = Vec::new();
    let mut report = timings;
    let mut figures = [SplitFigures::default(); 2];
    for (i, (split, documents)) in [("train", &train_docs), ("val", &val_docs)]
        .into_iter()
        .enumerate()
    {
        let mut table = TokenTable::default();
        for (doc_index, doc) in documents.iter().enumerate() {
            let ids = bpe::encode(&tokenizer, &doc.text)
                .map_err(|m| StageError::input(&doc.source, m))?;
            table.push_document(doc_index as u32, bos, 0);
            for id in &ids {
                table.push(*id as u16, byte_of[*id as usize]);
            }
            docs_rows.push(tables::DocRow {
                split,
                doc: doc_index as u32,
                source: file_name(&doc.source),
                line: doc.line,
                bytes: doc.text.len() as u64,
                tokens: ids.len() as u64 + 1,
            });
            encoding.inc(doc.text.len() as u64);
        }
        let path = ctx.output(&format!("{split}.parquet"));
        table.write(&path)?;
        figures[i] = SplitFigures {
            tokens: table.len() as u64,
            bytes: table.total_bytes(),
            documents: Some(documents.len() as u64),
            tokens_before_truncation: None,
        };
    }
    encoding.finish_and_clear();
    report.phase("encode_and_write", started);

    let vocab_rows: Vec<tables::VocabRow> = vocab
        .iter()
        .enumerate()
        .map(|(id, (piece, bytes, special))| tables::VocabRow {
            id: id as u16,
            piece: piece.clone(),
            base_bytes: *bytes,
            is_boundary: *special,
            has_leading_space: false,
            kind: if *special { "control" } else { "normal" },
        })
        .collect();
    tables::write_vocab(&ctx.output("vocab.parquet"), &vocab_rows)?;
    tables::write_docs(&ctx.output("docs.parquet"), &docs_rows)?;
    Ok(report.with_fields(&TokenizeReport::new(
        Source::Text,
        vocab.len() as u64,
        bos,
        figures,
    )))
}

fn import_shards(ctx: &StageContext, params: &TokenizeParams) -> Result<StageReport, StageError> {
    let model_path = match ctx.files("tokenizer") {
        [one] => one,
        [] => {
            return Err(
                ctx.error("source = \"shards\" needs files.tokenizer (the SentencePiece .model)")
            )
        }
        many => {
            return Err(ctx.error(format!(
                "files.tokenizer matches {} files; name exactly one .model",
                many.len()
            )))
        }
    };
    if ctx.files("val").is_empty() {
        return Err(ctx.error("source = \"shards\" needs files.val (fineweb_val_*.bin)"));
    }
    if !ctx.files("corpus").is_empty() {
        return Err(ctx.error(
            "files.corpus is for text sources; name shards under files.train and files.val",
        ));
    }
    let pieces = sentencepiece::load_pieces(model_path)?;
    if pieces.len() != params.vocab_size {
        return Err(StageError::input(
            model_path,
            format!(
                "the model has {} pieces but vocab_size is {}: mismatched vocab sizes",
                pieces.len(),
                params.vocab_size
            ),
        ));
    }
    let table = sentencepiece::ByteTable::new(&pieces, params.vocab_size);
    let bos = pieces.iter().position(|p| p.text == "<s>").unwrap_or(1) as u16;

    let report = StageReport::default();
    let mut shard_doc_rows = Vec::new();
    let mut figures = [SplitFigures::default(); 2];
    for (i, split) in ["train", "val"].into_iter().enumerate() {
        let paths = ctx.files(split);
        let bar = ctx.progress(paths.len() as u64, &format!("reading {split} shards"));
        let mut tokens = Vec::new();
        for path in paths {
            tokens.extend(shards::read_shard(path, params.vocab_size)?);
            bar.inc(1);
        }
        bar.finish_and_clear();
        let before = tokens.len();
        if split == "val" {
            if tokens.len() < 2 {
                return Err(StageError::input(
                    &paths[0],
                    "the val shards hold fewer than 2 tokens: nothing to score",
                ));
            }
            let keep = shards::truncated_len(tokens.len(), params.val_truncate_multiple);
            if keep < 2 {
                return Err(StageError::input(
                    &paths[0],
                    format!(
                        "the val shards hold {} tokens, fewer than one {}-token window plus one",
                        tokens.len(),
                        params.val_truncate_multiple
                    ),
                ));
            }
            tokens.truncate(keep);
        }
        let token_table = TokenTable::from_shard_stream(&tokens, bos, &table);
        shard_doc_rows.extend(token_table.doc_rows(split));
        let path = ctx.output(&format!("{split}.parquet"));
        token_table.write(&path)?;
        figures[i] = SplitFigures {
            tokens: tokens.len() as u64,
            bytes: token_table.total_bytes(),
            documents: None,
            tokens_before_truncation: Some(before as u64),
        };
    }

    let vocab_rows: Vec<tables::VocabRow> = (0..params.vocab_size)
        .map(|id| {
            let piece = pieces.get(id);
            tables::VocabRow {
                id: id as u16,
                piece: piece.map(|p| p.text.clone()).unwrap_or_default(),
                base_bytes: table.base_bytes[id],
                is_boundary: table.is_boundary[id],
                has_leading_space: table.has_leading_space[id],
                kind: piece.map(|p| p.kind.name()).unwrap_or("unused"),
            }
        })
        .collect();
    tables::write_vocab(&ctx.output("vocab.parquet"), &vocab_rows)?;
    tables::write_docs(&ctx.output("docs.parquet"), &shard_doc_rows)?;
    let model_copy = ctx.output("tokenizer.model");
    std::fs::copy(model_path, &model_copy).map_err(|e| StageError::io(&model_copy, e))?;
    sync_file(&model_copy)?;
    Ok(report.with_fields(&TokenizeReport::new(
        Source::Shards,
        params.vocab_size as u64,
        bos,
        figures,
    )))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn sync_file(path: &Path) -> Result<(), StageError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| StageError::io(path, e))
}
