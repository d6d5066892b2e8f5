//! What a `cache` stage run will need at its peak, estimated before anything is
//! allocated, so that a table size the machine cannot hold is refused with a sentence
//! rather than an allocation abort. The figures follow the allocations of each mode
//! (measured at 62M tokens: reference 1.72 GB, causal-normalised 2.37 GB) and err high.

use crate::config::Mode;
use crate::ngram::NgramConfig;
use crate::phrase::PhraseConfig;

const COUNT_BYTES: u64 = 4;

/// Bytes at the peak of a `cache` stage over `tokens` val tokens with `threads` workers.
pub fn cache_stage_peak_bytes(
    mode: Mode,
    tokens: u64,
    ngram: &NgramConfig,
    phrase: &PhraseConfig,
    threads: u64,
) -> u64 {
    let orders = (ngram.max_order + 1).saturating_sub(ngram.min_order) as u64;
    let lengths = phrase.lengths.len() as u64;
    let (ngram_buckets, phrase_buckets) = (ngram.buckets as u64, phrase.buckets as u64);
    let token_bytes = 2 * tokens;
    let per_token = |bytes: u64| bytes.saturating_mul(tokens);
    let tables =
        |count: u64, buckets: u64| count.saturating_mul(buckets).saturating_mul(COUNT_BYTES);
    let estimate = match mode {
        // Every context table and the top full table at once, then the phrase tables'
        // per-length partials beside their two sums, and each counting thread's
        // partitioned keys (u16 per position); lookups stream in chunks.
        Mode::Reference => tables(orders + 1, ngram_buckets)
            .saturating_add(tables(2 * lengths + 2, phrase_buckets))
            .saturating_add(per_token(8 + 2 * threads)),
        // Counts and ranking scratch per position for each width being counted (one
        // per thread), the counts kept from the round before, the phrase pass's table
        // pair and the results of both caches (9 and 10 bytes).
        Mode::Causal => per_token(8 * threads.min(orders + 1) + 4)
            .saturating_add(tables(2, phrase_buckets))
            .saturating_add(per_token(19)),
        // Exact counting (measured 2.37 GB at 62M): the results of both caches (9 and
        // 10 bytes), the windows still counted (end and class), the step's partition ids,
        // scattered keys and ranks, and the jump width's classes by end.
        Mode::CausalNormalised => per_token(9 + 10 + 8 + 2 + 8 + 4 + 4),
    };
    estimate.saturating_add(token_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_shape_fits_a_small_machine_and_two_to_the_31_buckets_do_not() {
        let (ngram, phrase) = (NgramConfig::default(), PhraseConfig::default());
        let record = cache_stage_peak_bytes(Mode::Reference, 62_021_632, &ngram, &phrase, 2);
        assert!(record > 1 << 30 && record < 3 << 30, "{record}");
        let huge = NgramConfig {
            buckets: 1 << 31,
            ..ngram
        };
        let estimate = cache_stage_peak_bytes(Mode::Reference, 1000, &huge, &phrase, 2);
        assert!(estimate > 100 << 30, "{estimate}");
    }
}
