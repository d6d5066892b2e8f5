//! A deterministic token stream with the golden data's kind of repetition, for benchmarks
//! at the record's scale where the real FineWeb validation set is not at hand.

/// `n` tokens in documents of 200–2200 tokens, each starting with BOS = 1; 60% of the
/// documents copy a span of a shared 1M-token base text, the rest are random. Token ids
/// are drawn from 4..1024 (the SentencePiece vocabulary without its control pieces).
pub fn copy_span_stream(n: usize) -> Vec<u16> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let base: Vec<u16> = (0..1_000_000).map(|_| 4 + (next() % 1020) as u16).collect();
    let mut tokens = Vec::with_capacity(n);
    while tokens.len() < n {
        tokens.push(1);
        let len = 200 + (next() % 2000) as usize;
        if next() % 10 < 6 {
            let start = (next() as usize) % (base.len() - len);
            tokens.extend_from_slice(&base[start..start + len]);
        } else {
            tokens.extend((0..len).map(|_| 4 + (next() % 1020) as u16));
        }
    }
    tokens.truncate(n);
    tokens
}
