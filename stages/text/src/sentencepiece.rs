//! The SentencePiece `.model` file, read only as far as the byte table needs: each
//! piece's text and type. Implements algorithm.md §1.4.

use std::path::Path;

use prost::Message;
use stage_api::StageError;

/// `sentencepiece_model.proto`, the two messages we read. Unknown fields (trainer and
/// normalizer specs) are skipped by prost.
#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pieces: Vec<SentencePieceProto>,
}

#[derive(Clone, PartialEq, Message)]
struct SentencePieceProto {
    #[prost(string, optional, tag = "1")]
    piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    score: Option<f32>,
    #[prost(int32, optional, tag = "3")]
    kind: Option<i32>,
}

/// SentencePiece's piece types (`SentencePiece.Type` in the proto).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceKind {
    fn from_proto(value: Option<i32>) -> Option<PieceKind> {
        Some(match value.unwrap_or(1) {
            1 => PieceKind::Normal,
            2 => PieceKind::Unknown,
            3 => PieceKind::Control,
            4 => PieceKind::UserDefined,
            5 => PieceKind::Unused,
            6 => PieceKind::Byte,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            PieceKind::Normal => "normal",
            PieceKind::Unknown => "unknown",
            PieceKind::Control => "control",
            PieceKind::UserDefined => "user_defined",
            PieceKind::Unused => "unused",
            PieceKind::Byte => "byte",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Piece {
    pub text: String,
    pub kind: PieceKind,
}

pub fn load_pieces(path: &Path) -> Result<Vec<Piece>, StageError> {
    let bytes = std::fs::read(path).map_err(|e| StageError::io(path, e))?;
    let model = ModelProto::decode(bytes.as_slice())
        .map_err(|e| StageError::input(path, format!("not a SentencePiece model ({e})")))?;
    if model.pieces.is_empty() {
        return Err(StageError::input(
            path,
            "not a SentencePiece model (no pieces)",
        ));
    }
    model
        .pieces
        .into_iter()
        .enumerate()
        .map(|(id, p)| {
            let kind = PieceKind::from_proto(p.kind).ok_or_else(|| {
                StageError::input(path, format!("piece {id} has unknown type {:?}", p.kind))
            })?;
            let _ = p.score;
            Ok(Piece {
                text: p.piece.unwrap_or_default(),
                kind,
            })
        })
        .collect()
}

/// The three lookup tables of algorithm.md §1.4, indexed by token id, sized
/// `max(pieces, table_size)`; ids beyond the model's pieces are boundaries.
#[derive(Debug, Clone)]
pub struct ByteTable {
    pub base_bytes: Vec<u8>,
    pub has_leading_space: Vec<bool>,
    pub is_boundary: Vec<bool>,
}

const SPACE_MARK: char = '\u{2581}';

impl ByteTable {
    pub fn new(pieces: &[Piece], table_size: usize) -> ByteTable {
        let size = pieces.len().max(table_size);
        let mut table = ByteTable {
            base_bytes: vec![0; size],
            has_leading_space: vec![false; size],
            is_boundary: vec![true; size],
        };
        for (id, piece) in pieces.iter().enumerate() {
            match piece.kind {
                PieceKind::Control | PieceKind::Unknown | PieceKind::Unused => {}
                PieceKind::Byte => {
                    table.is_boundary[id] = false;
                    table.base_bytes[id] = 1;
                }
                PieceKind::Normal | PieceKind::UserDefined => {
                    table.is_boundary[id] = false;
                    // At most one leading ▁ is the space; a second one is text.
                    let text = match piece.text.strip_prefix(SPACE_MARK) {
                        Some(rest) => {
                            table.has_leading_space[id] = true;
                            rest
                        }
                        None => piece.text.as_str(),
                    };
                    table.base_bytes[id] = text.len().min(u8::MAX as usize) as u8;
                }
            }
        }
        table
    }

    /// The table a `tokenize` artifact's `vocab.parquet` holds (its `base_bytes`,
    /// `has_leading_space` and `is_boundary` columns): the rule by which its `bytes`
    /// were counted, for whoever must count them again.
    pub fn read_vocab(path: &Path) -> Result<ByteTable, StageError> {
        use arrow::datatypes::UInt8Type;
        let column = |name: &str| stage_api::read_column::<UInt8Type>(path, name);
        let flags = |name: &str| -> Result<Vec<bool>, StageError> {
            Ok(column(name)?.into_iter().map(|b| b != 0).collect())
        };
        Ok(ByteTable {
            base_bytes: column("base_bytes")?,
            has_leading_space: flags("has_leading_space")?,
            is_boundary: flags("is_boundary")?,
        })
    }

    /// The first token of `tokens` that the table has no entry for.
    pub fn first_unknown(&self, tokens: &[u16]) -> Option<u16> {
        tokens
            .iter()
            .copied()
            .find(|&t| t as usize >= self.base_bytes.len())
    }

    /// bytes(p) for a target `token` preceded by `previous` (§1.4).
    #[inline]
    pub fn target_bytes(&self, previous: u16, token: u16) -> u8 {
        let t = token as usize;
        self.base_bytes[t]
            + (self.has_leading_space[t] && !self.is_boundary[previous as usize]) as u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(text: &str, kind: PieceKind) -> Piece {
        Piece {
            text: text.to_string(),
            kind,
        }
    }

    #[test]
    fn leading_space_counts_only_after_a_non_boundary() {
        let pieces = vec![
            piece("<pad>", PieceKind::Control),
            piece("<s>", PieceKind::Control),
            piece("<0x41>", PieceKind::Byte),
            piece("\u{2581}the", PieceKind::Normal),
            piece("\u{2581}\u{2581}x", PieceKind::Normal),
        ];
        let table = ByteTable::new(&pieces, 8);
        assert_eq!(table.base_bytes[..5], [0, 0, 1, 3, 4]);
        assert_eq!(table.target_bytes(1, 3), 3, "▁the after BOS: no space");
        assert_eq!(table.target_bytes(2, 3), 4, "▁the after a byte: space");
        assert!(table.is_boundary[7], "ids past the model are boundaries");
    }
}
