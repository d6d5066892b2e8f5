//! Parameter Golf token shards (algorithm.md §1.1–1.2): a 256 × int32 header (magic
//! 20240520, version 1, token count) followed by that many little-endian u16 tokens.

use std::path::Path;

use rayon::prelude::*;
use stage_api::StageError;

pub const SHARD_MAGIC: i32 = 20240520;
pub const SHARD_VERSION: i32 = 1;
pub const HEADER_BYTES: usize = 256 * 4;

/// Writes `tokens` as one shard (for a user's scorer that reads the challenge's format).
pub fn write_shard(path: &Path, tokens: &[u16]) -> Result<(), StageError> {
    let count = i32::try_from(tokens.len()).map_err(|_| {
        StageError::input(
            path,
            format!("{} tokens do not fit a shard's int32 count", tokens.len()),
        )
    })?;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + 2 * tokens.len());
    for (i, word) in [SHARD_MAGIC, SHARD_VERSION, count].into_iter().enumerate() {
        debug_assert_eq!(bytes.len(), i * 4);
        bytes.extend_from_slice(&word.to_le_bytes());
    }
    bytes.resize(HEADER_BYTES, 0);
    for token in tokens {
        bytes.extend_from_slice(&token.to_le_bytes());
    }
    std::fs::write(path, bytes).map_err(|e| StageError::io(path, e))
}

/// Reads one shard, checking everything the reference checks plus the token range.
pub fn read_shard(path: &Path, vocab_size: usize) -> Result<Vec<u16>, StageError> {
    let bytes = std::fs::read(path).map_err(|e| StageError::io(path, e))?;
    parse_shard(path, &bytes, vocab_size)
}

pub fn parse_shard(path: &Path, bytes: &[u8], vocab_size: usize) -> Result<Vec<u16>, StageError> {
    if bytes.len() < HEADER_BYTES {
        return Err(StageError::input(
            path,
            format!(
                "truncated shard: {} bytes, shorter than the {HEADER_BYTES}-byte header",
                bytes.len()
            ),
        ));
    }
    let header = |i: usize| i32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap());
    if header(0) != SHARD_MAGIC {
        return Err(StageError::input(
            path,
            format!(
                "wrong magic number {} (expected {SHARD_MAGIC}): not a Parameter Golf shard",
                header(0)
            ),
        ));
    }
    if header(1) != SHARD_VERSION {
        return Err(StageError::input(
            path,
            format!(
                "unsupported shard version {} (expected {SHARD_VERSION})",
                header(1)
            ),
        ));
    }
    let declared = header(2);
    if declared < 0 {
        return Err(StageError::input(
            path,
            format!("header declares a negative token count ({declared})"),
        ));
    }
    let expected = HEADER_BYTES as u64 + 2 * declared as u64;
    let actual = bytes.len() as u64;
    if actual != expected {
        let what = if actual < expected {
            "truncated shard"
        } else {
            "shard size does not match its header"
        };
        return Err(StageError::input(
            path,
            format!("{what}: {actual} bytes, header declares {declared} tokens = {expected} bytes"),
        ));
    }
    let tokens: Vec<u16> = bytes[HEADER_BYTES..]
        .par_chunks_exact(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    let first_bad = tokens
        .par_iter()
        .position_first(|&t| t as usize >= vocab_size);
    if let Some(index) = first_bad {
        return Err(StageError::input(
            path,
            format!(
                "token id {} at token index {index} is outside the vocabulary (vocab_size {vocab_size})",
                tokens[index]
            ),
        ));
    }
    Ok(tokens)
}

/// The val truncation of §1.2: keep `usable + 1` tokens with
/// `usable = floor((n − 1) / multiple) · multiple`. `multiple = 0` keeps everything.
pub fn truncated_len(n: usize, multiple: usize) -> usize {
    if multiple == 0 || n == 0 {
        return n;
    }
    (n - 1) / multiple * multiple + 1
}

/// Writes a shard in the challenge's layout (for fixtures and benchmarks).
pub fn encode_shard(tokens: &[u16]) -> Vec<u8> {
    let mut bytes = vec![0u8; HEADER_BYTES + 2 * tokens.len()];
    bytes[0..4].copy_from_slice(&SHARD_MAGIC.to_le_bytes());
    bytes[4..8].copy_from_slice(&SHARD_VERSION.to_le_bytes());
    bytes[8..12].copy_from_slice(&(tokens.len() as i32).to_le_bytes());
    for (slot, t) in bytes[HEADER_BYTES..].chunks_exact_mut(2).zip(tokens) {
        slot.copy_from_slice(&t.to_le_bytes());
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(bytes: &[u8]) -> String {
        parse_shard(Path::new("x.bin"), bytes, 1024)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn round_trip() {
        let tokens = vec![1, 2, 1023, 0];
        let bytes = encode_shard(&tokens);
        assert_eq!(parse_shard(Path::new("x"), &bytes, 1024).unwrap(), tokens);
    }

    #[test]
    fn rejects_bad_shards_with_reasons() {
        let good = encode_shard(&[1, 2, 3]);
        assert!(err(&good[..100]).contains("truncated shard: 100 bytes"));
        assert!(err(&good[..good.len() - 1]).contains("truncated shard"));
        let mut padded = good.clone();
        padded.extend_from_slice(&[0, 0]);
        assert!(err(&padded).contains("does not match its header"));
        let mut magic = good.clone();
        magic[0] = 0;
        assert!(err(&magic).contains("wrong magic number"));
        let mut version = good.clone();
        version[4] = 2;
        assert!(err(&version).contains("unsupported shard version 2"));
        let big = encode_shard(&[1, 5000]);
        assert!(err(&big).contains("token id 5000 at token index 1"));
    }

    #[test]
    fn truncation_matches_the_reference_rule() {
        assert_eq!(truncated_len(1_833_808, 2048), 1_832_961);
        assert_eq!(truncated_len(62_021_633 + 100, 2048), 62_021_633);
        assert_eq!(truncated_len(10, 0), 10);
    }
}
