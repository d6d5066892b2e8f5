//! The figures a run reports, as pure folds over the engine's outputs: match statistics
//! per n-gram order and phrase length (the `cache` stage's `cache_stats`), and the BPB
//! waterfall (model alone → after the n-gram blend → final; the `pass2` stage's
//! summary).
//!
//! Both are summed per chunk of positions and then merged in chunk order, so the stages
//! can compute them in parallel beside writing Parquet and still get the same bits on
//! any number of threads: floating-point sums depend on their order, and this one is
//! fixed by the positions, not by the scheduler.

use crate::blend::PROBABILITY_FLOOR;
use crate::ngram::{NgramConfig, NgramMatch, NgramTables};
use crate::phrase::{PhraseConfig, PhraseMatch, PhraseTables};

/// How often each n-gram order and phrase length matched, and the sum of the matches'
/// q (full count / context count), over targets 1..T: position 0 is never scored.
#[derive(Debug, Clone, PartialEq)]
pub struct MatchStats {
    /// By order: (matched positions, Σ q).
    pub ngram: Vec<(u64, f64)>,
    /// By length: (matched positions, Σ q).
    pub phrase: Vec<(u64, f64)>,
}

impl MatchStats {
    pub fn new(max_order: usize, max_length: usize) -> Self {
        MatchStats {
            ngram: vec![(0, 0.0); max_order + 1],
            phrase: vec![(0, 0.0); max_length + 1],
        }
    }

    /// Adds the matches of positions `start..start + ngram.len()`.
    pub fn add(&mut self, start: usize, ngram: &[NgramMatch], phrase: &[PhraseMatch]) {
        for (i, (n, p)) in ngram.iter().zip(phrase).enumerate() {
            if start + i == 0 {
                continue;
            }
            if n.matched() {
                let slot = &mut self.ngram[n.order as usize];
                slot.0 += 1;
                slot.1 += n.q();
            }
            if p.matched() {
                let slot = &mut self.phrase[p.length as usize];
                slot.0 += 1;
                slot.1 += p.q();
            }
        }
    }

    /// Adds a later chunk's statistics.
    pub fn merge(&mut self, later: &MatchStats) {
        for (mine, theirs) in [
            (&mut self.ngram, &later.ngram),
            (&mut self.phrase, &later.phrase),
        ] {
            for (total, part) in mine.iter_mut().zip(theirs) {
                total.0 += part.0;
                total.1 += part.1;
            }
        }
    }

    /// Mean q of a (matched, Σ q) slot; 0 when nothing matched.
    pub fn mean_q((matched, q_sum): (u64, f64)) -> f64 {
        q_sum / matched.max(1) as f64
    }
}

/// One row of the cache's statistics: an n-gram order or a phrase length.
#[derive(Debug, Clone, PartialEq)]
pub struct StatsRow {
    /// "ngram" or "phrase".
    pub kind: &'static str,
    /// The order or the length.
    pub size: u16,
    pub matched: u64,
    pub mean_q: f64,
    /// Null without finished tables (the causal modes keep none).
    pub buckets_used: Option<u64>,
    pub insertions_per_bucket: f64,
}

impl MatchStats {
    /// The statistics' rows over a stream of `positions` tokens: one per n-gram order in
    /// use, then one per phrase length in probe order. Bucket occupancy is a property of
    /// the finished tables, which only the reference mode keeps (`tables`).
    pub fn rows(
        &self,
        ngram: &NgramConfig,
        phrase: &PhraseConfig,
        positions: usize,
        tables: Option<(&NgramTables, &PhraseTables)>,
    ) -> Vec<StatsRow> {
        let insertions = |width: usize| positions.saturating_sub(width) as f64;
        let used = |table: &[u32]| Some(table.iter().filter(|&&c| c > 0).count() as u64);
        let mut rows = Vec::new();
        let orders = ngram.min_order..=ngram.max_order;
        for (order, &slot) in self
            .ngram
            .iter()
            .enumerate()
            .filter(|(o, _)| orders.contains(o))
        {
            rows.push(StatsRow {
                kind: "ngram",
                size: order as u16,
                matched: slot.0,
                mean_q: MatchStats::mean_q(slot),
                buckets_used: tables.and_then(|(ngram, _)| used(ngram.ctx_table(order))),
                insertions_per_bucket: insertions(order - 1) / ngram.buckets as f64,
            });
        }
        let phrase_used = tables.and_then(|(_, phrase)| used(&phrase.ctx));
        for &length in &phrase.lengths {
            let slot = self.phrase[length];
            rows.push(StatsRow {
                kind: "phrase",
                size: length as u16,
                matched: slot.0,
                mean_q: MatchStats::mean_q(slot),
                buckets_used: phrase_used,
                insertions_per_bucket: insertions(length) / phrase.buckets as f64,
            });
        }
        rows
    }
}

/// A sum of negative log-likelihoods, −Σ ln p, taken as the log of products of up to
/// [`NllSum::FACTORS`] probabilities: ln(a·b) = ln a + ln b, and one `ln` per 16 entries
/// instead of one per entry took a tenth of `pass2`'s time away. Every p is at least
/// [`PROBABILITY_FLOOR`] (10⁻¹², about 2⁻⁴⁰), so a product of 16 is at least 2⁻⁶⁴⁰ and
/// never underflows; its rounding error is at most 16 half-ulps, about 2·10⁻¹⁵ nats per
/// 16 entries, less than the spread between summation orders of the per-entry logs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NllSum {
    /// −ln of the products already closed.
    nats: f64,
    /// The open product and how many probabilities it holds.
    product: f64,
    factors: u32,
}

impl Default for NllSum {
    fn default() -> Self {
        NllSum {
            nats: 0.0,
            product: 1.0,
            factors: 0,
        }
    }
}

impl NllSum {
    pub const FACTORS: u32 = 16;

    /// Adds −ln max(p, floor).
    #[inline]
    pub fn add(&mut self, p: f64) {
        self.product *= p.max(PROBABILITY_FLOOR);
        self.factors += 1;
        if self.factors == Self::FACTORS {
            self.close();
        }
    }

    fn close(&mut self) {
        self.nats -= libm::log(self.product);
        self.product = 1.0;
        self.factors = 0;
    }

    /// The sum so far, in nats.
    pub fn nats(&self) -> f64 {
        self.nats - libm::log(self.product)
    }

    /// Adds a later chunk's sum: this chunk's open product is closed first, so the
    /// result depends on the chunks' order, never on which thread summed them.
    pub fn merge(&mut self, later: &NllSum) {
        self.close();
        self.nats += later.nats();
    }
}

/// Negative log-likelihoods (nats) summed at the three points of the waterfall, and the
/// bytes they are spread over.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Waterfall {
    pub neural_nll: NllSum,
    pub ngram_nll: NllSum,
    pub final_nll: NllSum,
    pub bytes: u64,
    pub entries: u64,
}

impl Waterfall {
    /// Adds one entry: the model's probability of the target, the probability after the
    /// n-gram blend and the final one (each floored as the record floors it), and the
    /// target's bytes.
    #[inline]
    pub fn add(&mut self, model_p: f32, p_ngram: f64, p_final: f64, bytes: u8) {
        self.neural_nll.add(model_p as f64);
        self.ngram_nll.add(p_ngram);
        self.final_nll.add(p_final);
        self.bytes += bytes as u64;
        self.entries += 1;
    }

    /// Adds a later chunk's sums.
    pub fn merge(&mut self, later: &Waterfall) {
        self.neural_nll.merge(&later.neural_nll);
        self.ngram_nll.merge(&later.ngram_nll);
        self.final_nll.merge(&later.final_nll);
        self.bytes += later.bytes;
        self.entries += later.entries;
    }

    fn per_byte(&self, nll: &NllSum) -> f64 {
        nll.nats() / (std::f64::consts::LN_2 * self.bytes.max(1) as f64)
    }

    pub fn neural_bpb(&self) -> f64 {
        self.per_byte(&self.neural_nll)
    }

    pub fn ngram_bpb(&self) -> f64 {
        self.per_byte(&self.ngram_nll)
    }

    pub fn final_bpb(&self) -> f64 {
        self.per_byte(&self.final_nll)
    }

    /// Mean final loss per entry, in nats.
    pub fn val_loss_nats(&self) -> f64 {
        self.final_nll.nats() / self.entries.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ngram(order: u8, context: u32, full: u32) -> NgramMatch {
        NgramMatch {
            order,
            context,
            full,
        }
    }

    fn phrase(length: u16, context: u32, full: u32) -> PhraseMatch {
        PhraseMatch {
            length,
            context,
            full,
        }
    }

    #[test]
    fn match_stats_skip_position_zero_and_merge_in_order() {
        let ngrams = [
            ngram(3, 4, 2),
            ngram(3, 4, 1),
            ngram(0, 0, 0),
            ngram(2, 2, 2),
        ];
        let phrases = [
            phrase(16, 2, 1),
            phrase(0, 0, 0),
            phrase(16, 4, 4),
            phrase(0, 0, 0),
        ];
        let mut whole = MatchStats::new(3, 16);
        whole.add(0, &ngrams, &phrases);
        // Position 0 is never scored: its order-3 and length-16 matches do not count.
        assert_eq!(whole.ngram[3], (1, 0.25));
        assert_eq!(whole.ngram[2], (1, 1.0));
        assert_eq!(whole.phrase[16], (1, 1.0));
        assert_eq!(MatchStats::mean_q(whole.ngram[3]), 0.25);
        assert_eq!(MatchStats::mean_q(whole.ngram[1]), 0.0);

        let mut chunked = MatchStats::new(3, 16);
        chunked.add(0, &ngrams[..2], &phrases[..2]);
        let mut later = MatchStats::new(3, 16);
        later.add(2, &ngrams[2..], &phrases[2..]);
        chunked.merge(&later);
        assert_eq!(chunked, whole);
    }

    #[test]
    fn the_waterfall_is_bits_per_byte_at_each_step() {
        let mut w = Waterfall::default();
        // p = 1/2 everywhere over 2 bytes: 1 bit each step, 0.5 bits per byte.
        w.add(0.5, 0.5, 0.5, 2);
        assert_eq!(w.neural_bpb(), 0.5);
        assert_eq!(w.final_bpb(), 0.5);
        // The n-gram and final steps improve on the model: fewer bits.
        let mut better = Waterfall::default();
        better.add(0.25, 0.5, 1.0, 1);
        assert_eq!(better.neural_bpb(), 2.0);
        assert_eq!(better.ngram_bpb(), 1.0);
        assert_eq!(better.final_bpb(), 0.0);
        // A zero probability is floored, not infinite.
        let mut floored = Waterfall::default();
        floored.add(0.0, 0.0, 0.0, 1);
        assert!(floored.final_bpb().is_finite());
        w.merge(&better);
        assert_eq!((w.entries, w.bytes), (2, 3));
        assert_eq!(w.val_loss_nats(), std::f64::consts::LN_2 / 2.0);
    }

    /// The products' logs equal the per-entry logs to far below the 10⁻¹² the golden
    /// tests ask, over probabilities down to the floor and across chunk merges.
    #[test]
    fn a_sum_of_product_logs_is_the_sum_of_logs() {
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Log-uniform over [1e-14, 1]: the floor and below it included.
            10f64.powf(-14.0 * (state >> 11) as f64 / (1u64 << 53) as f64)
        };
        let ps: Vec<f64> = (0..100_003).map(|_| next()).collect();
        let direct: f64 = ps.iter().map(|&p| -p.max(PROBABILITY_FLOOR).ln()).sum();
        let mut whole = NllSum::default();
        ps.iter().for_each(|&p| whole.add(p));
        let mut chunked = NllSum::default();
        for chunk in ps.chunks(1_000 + 7) {
            let mut part = NllSum::default();
            chunk.iter().for_each(|&p| part.add(p));
            chunked.merge(&part);
        }
        for sum in [whole, chunked] {
            assert!(
                ((sum.nats() - direct) / direct).abs() < 1e-14,
                "{} vs {direct}",
                sum.nats()
            );
        }
        assert_eq!(NllSum::default().nats(), 0.0);
    }
}
