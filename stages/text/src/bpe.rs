//! Byte-level BPE with Hugging Face `tokenizers`: trained on the train split only, used to
//! encode both splits in parallel.
//!
//! Byte-level means every token stands for a fixed byte string and every byte sequence is
//! encodable, so the bytes a token contributes to BPB are simply its length, and the bytes
//! of a split add up to its UTF-8 length exactly (tested below and in the stage).

use rayon::prelude::*;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, NormalizerWrapper, PostProcessorWrapper, TokenizerImpl};

/// The document separator. Never produced from text: special tokens in the text are
/// encoded as ordinary text (see [`train`]).
pub const BOS_PIECE: &str = "<|bos|>";

pub type ByteLevelBpe =
    TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, PostProcessorWrapper, ByteLevel>;

/// Encoding works on pieces of about this many bytes, cut where the pre-tokenizer would
/// cut anyway, so that one long book still keeps both cores busy.
const CHUNK_BYTES: usize = 64 * 1024;

fn byte_level() -> ByteLevel {
    // No dummy prefix space: it would add a byte that is not in the text.
    ByteLevel::new(false, true, true)
}

/// Trains a byte-level BPE tokenizer of `vocab_size` entries (BOS + 256 bytes + merges).
pub fn train<S>(documents: &[S], vocab_size: usize) -> Result<ByteLevelBpe, String>
where
    S: AsRef<str> + Sync,
{
    if vocab_size < 258 {
        return Err(format!(
            "vocab_size {vocab_size} is too small for byte-level BPE (needs at least 258: BOS, 256 bytes and one merge)"
        ));
    }
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(vec![AddedToken::from(BOS_PIECE, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer: ByteLevelBpe = TokenizerImpl::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(byte_level()));
    tokenizer.with_decoder(Some(byte_level()));
    // Pre-tokenize in chunks too: word counts are what the trainer consumes, and chunking
    // at pre-tokenizer boundaries leaves them unchanged.
    let chunks: Vec<&str> = documents
        .iter()
        .flat_map(|d| split_at_word_boundaries(d.as_ref(), CHUNK_BYTES))
        .collect();
    tokenizer
        .train(&mut trainer, chunks.into_iter())
        .map_err(|e| format!("BPE training failed: {e}"))?;
    // A literal "<|bos|>" in the text must stay text, or byte counts would not add up.
    tokenizer.set_encode_special_tokens(true);
    Ok(tokenizer)
}

/// Encodes one document to token ids (without BOS), in parallel over its chunks.
pub fn encode(tokenizer: &ByteLevelBpe, text: &str) -> Result<Vec<u32>, String> {
    let pieces = split_at_word_boundaries(text, CHUNK_BYTES);
    let encoded: Vec<Vec<u32>> = pieces
        .par_iter()
        .map(|piece| {
            tokenizer
                .encode_fast(*piece, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| format!("encoding failed: {e}"))
        })
        .collect::<Result<_, _>>()?;
    Ok(encoded.concat())
}

/// Bytes per token id: the length of the byte string a byte-level piece stands for (each
/// character of a byte-level piece is one byte), 0 for special tokens.
pub fn token_bytes(tokenizer: &ByteLevelBpe) -> Vec<(String, u8, bool)> {
    let vocab_size = tokenizer.get_vocab_size(true);
    (0..vocab_size as u32)
        .map(|id| {
            let piece = tokenizer.id_to_token(id).unwrap_or_default();
            let special = piece == BOS_PIECE;
            let bytes = if special {
                0
            } else {
                piece.chars().count() as u8
            };
            (piece, bytes, special)
        })
        .collect()
}

/// Cuts `text` into pieces of at least `target` bytes (the last may be shorter), only at
/// places where the byte-level pre-tokenizer splits the whole text too: right after a
/// `\n` that follows a visible ASCII character and precedes one. There the newline is a
/// word of its own and the next word starts fresh, so encoding the pieces one by one
/// gives exactly the tokens of encoding the whole.
pub fn split_at_word_boundaries(text: &str, target: usize) -> Vec<&str> {
    let bytes = text.as_bytes();
    let visible = |b: u8| (0x21..=0x7e).contains(&b);
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut i = start + target;
    while i < bytes.len() {
        if i >= 2 && bytes[i - 1] == b'\n' && visible(bytes[i - 2]) && visible(bytes[i]) {
            pieces.push(&text[start..i]);
            start = i;
            i = start + target;
        } else {
            i += 1;
        }
    }
    if start < bytes.len() {
        pieces.push(&text[start..]);
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_text() -> String {
        let mut text = String::new();
        for i in 0..400 {
            text.push_str(&format!(
                "Chapter {i}.\nIt was the best of times, it was the worst of times;\n\n  \
                 \u{201c}Quoth the raven\u{201d}, {i} times.\n\t(tab) naïve café <|bos|>\r\n"
            ));
        }
        text
    }

    #[test]
    fn chunked_encoding_equals_whole_document_encoding() {
        let text = sample_text();
        let tokenizer = train(&[text.as_str()], 400).unwrap();
        let whole = tokenizer
            .encode_fast(text.as_str(), false)
            .unwrap()
            .get_ids()
            .to_vec();
        for target in [1, 7, 100, 1000] {
            let mut chunked = Vec::new();
            for piece in split_at_word_boundaries(&text, target) {
                chunked.extend_from_slice(tokenizer.encode_fast(piece, false).unwrap().get_ids());
            }
            assert_eq!(chunked, whole, "target {target}");
        }
    }

    #[test]
    fn token_bytes_add_up_to_utf8_length() {
        let text = sample_text();
        let tokenizer = train(&[text.as_str()], 300).unwrap();
        let table = token_bytes(&tokenizer);
        let ids = encode(&tokenizer, &text).unwrap();
        let total: usize = ids.iter().map(|&id| table[id as usize].1 as usize).sum();
        assert_eq!(total, text.len());
        // The literal "<|bos|>" in the text was encoded as text, not as BOS.
        let bos = tokenizer.token_to_id(BOS_PIECE).unwrap();
        assert!(!ids.contains(&bos));
    }

    #[test]
    fn training_is_deterministic() {
        let text = sample_text();
        let a = train(&[text.as_str()], 350).unwrap();
        let b = train(&[text.as_str()], 350).unwrap();
        assert_eq!(a.to_string(false).unwrap(), b.to_string(false).unwrap());
    }

    #[test]
    fn split_never_cuts_inside_a_character() {
        let text = "é\nà\nb\nc".repeat(50);
        let pieces = split_at_word_boundaries(&text, 3);
        assert_eq!(pieces.concat(), text);
    }
}
