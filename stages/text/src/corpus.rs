//! Raw text in, documents out: `.txt` files (one document each) and `.jsonl` files (one
//! document per line, text in a named field), checked for UTF-8, then split into train and
//! val by document.

use std::path::{Path, PathBuf};

use stage_api::StageError;

/// One document of the corpus, with where it came from (for the `docs` table and for
/// error messages).
#[derive(Debug, Clone)]
pub struct Document {
    pub source: PathBuf,
    /// 1-based line in a `.jsonl` file, 0 for a `.txt` file.
    pub line: u64,
    pub text: String,
}

/// Reads every document of `path`. Empty documents are skipped: they would contribute a
/// lone BOS and nothing to score.
pub fn read_documents(path: &Path, text_field: &str) -> Result<Vec<Document>, StageError> {
    let bytes = std::fs::read(path).map_err(|e| StageError::io(path, e))?;
    let text = match std::str::from_utf8(&bytes) {
        Ok(text) => text,
        Err(e) => {
            return Err(StageError::input(
                path,
                format!("not valid UTF-8 at byte offset {}", e.valid_up_to()),
            ))
        }
    };
    let is_jsonl = path
        .extension()
        .is_some_and(|ext| ext == "jsonl" || ext == "ndjson");
    if !is_jsonl {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        return Ok(vec![Document {
            source: path.to_path_buf(),
            line: 0,
            text: text.to_string(),
        }]);
    }
    let mut documents = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_number = index as u64 + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| {
            StageError::input(path, format!("line {line_number}: invalid JSON ({e})"))
        })?;
        let field = value.get(text_field).ok_or_else(|| {
            StageError::input(
                path,
                format!("line {line_number}: no '{text_field}' field (set params.text_field)"),
            )
        })?;
        let text = field.as_str().ok_or_else(|| {
            StageError::input(
                path,
                format!("line {line_number}: field '{text_field}' is not a string"),
            )
        })?;
        if !text.is_empty() {
            documents.push(Document {
                source: path.to_path_buf(),
                line: line_number,
                text: text.to_string(),
            });
        }
    }
    Ok(documents)
}

/// Which of `count` documents go to val: the `round(count · val_fraction)` documents with
/// the smallest keyed hash `blake3(seed, index)`, returned in ascending order.
///
/// A keyed hash rather than a shuffle from an RNG crate, so that the split depends on
/// nothing but the seed and the document order, across crate upgrades and platforms.
pub fn val_document_indices(count: usize, val_fraction: f64, seed: u64) -> Vec<usize> {
    let wanted = ((count as f64) * val_fraction).round() as usize;
    let mut keyed: Vec<(u64, usize)> = (0..count)
        .map(|index| {
            let mut hasher = blake3::Hasher::new();
            hasher.update(b"cachemoney.val-split");
            hasher.update(&seed.to_le_bytes());
            hasher.update(&(index as u64).to_le_bytes());
            let digest = hasher.finalize();
            let key = u64::from_le_bytes(digest.as_bytes()[..8].try_into().unwrap());
            (key, index)
        })
        .collect();
    keyed.sort_unstable();
    let mut chosen: Vec<usize> = keyed
        .into_iter()
        .take(wanted.min(count))
        .map(|(_, i)| i)
        .collect();
    chosen.sort_unstable();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn val_split_is_deterministic_and_sized_by_fraction() {
        let a = val_document_indices(1000, 0.1, 7);
        assert_eq!(a.len(), 100);
        assert_eq!(a, val_document_indices(1000, 0.1, 7));
        assert_ne!(a, val_document_indices(1000, 0.1, 8));
        assert!(a.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn val_split_rounds_to_nothing_for_tiny_corpora() {
        assert!(val_document_indices(3, 0.1, 1).is_empty());
        assert_eq!(val_document_indices(10, 0.1, 1).len(), 1);
    }

    #[test]
    fn invalid_utf8_names_the_byte_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.txt");
        std::fs::write(&path, b"hello \xff world").unwrap();
        let err = read_documents(&path, "text").unwrap_err().to_string();
        assert!(err.contains("bad.txt"), "{err}");
        assert!(err.contains("byte offset 6"), "{err}");
    }
}
