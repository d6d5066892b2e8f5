//! Blend weights and the sequential blend (algorithm.md §5.2, §6, §7).

use crate::ngram::NgramMatch;
use crate::numpy_exp::numpy_exp_f32;
use crate::phrase::PhraseMatch;

/// The final probability floor before taking the log (§7); the scores table's `bits`
/// use the same one.
pub use stage_api::scores::PROBABILITY_FLOOR;

/// One scored entry as the blend sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Entry {
    pub model_p: f32,
    /// Entropy of the tempered model distribution, in nats.
    pub entropy: f32,
    pub ngram: NgramMatch,
    pub phrase: PhraseMatch,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlendParams {
    pub alpha_low: f64,
    /// Calibrated (§8).
    pub alpha_high: f64,
    /// Calibrated (§8).
    pub entropy_thresh: f64,
    pub min_order: usize,
    pub max_order: usize,
    pub phrase_base_alpha: f64,
    pub phrase_min_length: usize,
    pub phrase_max_length: usize,
    /// The clip applied to both weights.
    pub alpha_max: f64,
}

impl Default for BlendParams {
    fn default() -> Self {
        BlendParams {
            alpha_low: 0.05,
            alpha_high: 0.95,
            entropy_thresh: 4.0,
            min_order: 2,
            max_order: 16,
            phrase_base_alpha: 0.90,
            phrase_min_length: 16,
            phrase_max_length: 64,
            alpha_max: 0.99,
        }
    }
}

impl BlendParams {
    /// §5.2, the "PR #913 alpha curve": higher orders are trusted at lower entropy and
    /// with a larger multiplier.
    pub fn ngram_alpha(&self, entropy: f32, order: u8) -> f64 {
        self.ngram_alpha_from_sigma(self.ngram_sigma(entropy, order), order)
    }

    /// The entropy sigmoid of the n-gram weight. It depends on `entropy_thresh` but not
    /// on `alpha_high`, which lets calibration compute it once per threshold.
    pub fn ngram_sigma(&self, entropy: f32, order: u8) -> f64 {
        sigmoid_above(entropy, self.ngram_threshold(order))
    }

    /// The n-gram weight given its sigmoid (see [`BlendParams::ngram_sigma`]).
    pub fn ngram_alpha_from_sigma(&self, sigma: f64, order: u8) -> f64 {
        self.ngram_weight(sigma, self.ngram_multiplier(order))
    }

    /// The entropy at which an order's sigmoid is one half: lower for higher orders.
    fn ngram_threshold(&self, order: u8) -> f64 {
        let o = self.order_fraction(order);
        let th_hi = self.entropy_thresh + 1.0;
        let th_lo = (self.entropy_thresh - 2.0).max(1.5);
        th_hi - o * (th_hi - th_lo)
    }

    fn ngram_multiplier(&self, order: u8) -> f64 {
        0.3 + 1.7 * self.order_fraction(order)
    }

    fn ngram_weight(&self, sigma: f64, multiplier: f64) -> f64 {
        let base = self.alpha_low + (self.alpha_high - self.alpha_low) * sigma;
        (base * multiplier).clamp(0.0, self.alpha_max)
    }

    fn order_fraction(&self, order: u8) -> f64 {
        let span = (self.max_order as f64 - self.min_order as f64).max(1.0);
        (order as f64 - self.min_order as f64) / span
    }

    /// §6: longer phrases are trusted more. The entropy factor is computed in f32, as the
    /// record's numpy code does, `exp` included (see [`numpy_exp_f32`]).
    pub fn phrase_alpha(&self, entropy: f32, length: u16) -> f64 {
        self.phrase_weight(entropy, self.phrase_length_factor(length))
    }

    fn phrase_length_factor(&self, length: u16) -> f64 {
        let span = (self.phrase_max_length as f64 - self.phrase_min_length as f64).max(1.0);
        self.phrase_base_alpha
            + (0.99 - self.phrase_base_alpha) * (length as f64 - self.phrase_min_length as f64)
                / span
    }

    fn phrase_weight(&self, entropy: f32, length_factor: f64) -> f64 {
        let ent_factor: f32 = 1.0 / (1.0 + numpy_exp_f32(-2.0f32 * (entropy - 2.5f32)));
        let entropy_weight: f32 = 0.5 + 0.5 * ent_factor;
        (length_factor * entropy_weight as f64).clamp(0.0, self.alpha_max)
    }

    /// §7: the model's probability, then the n-gram on top, then the phrase on top.
    /// Returns (p after the n-gram stage, final p before the floor).
    pub fn blend(&self, entry: &Entry) -> (f64, f64) {
        let ngram_weight = entry
            .ngram
            .matched()
            .then(|| self.ngram_alpha(entry.entropy, entry.ngram.order));
        let phrase_weight = entry
            .phrase
            .matched()
            .then(|| self.phrase_alpha(entry.entropy, entry.phrase.length));
        blend_with_weights(entry, ngram_weight, phrase_weight)
    }

    /// The entry's final NLL in nats.
    pub fn nll(&self, entry: &Entry) -> f64 {
        -libm::log(self.blend(entry).1.max(PROBABILITY_FLOOR))
    }

    /// This blend with its per-order and per-length terms worked out once.
    pub fn prepared(&self) -> PreparedBlend {
        PreparedBlend {
            ngram: (0..=u8::MAX)
                .map(|o| (self.ngram_threshold(o), self.ngram_multiplier(o)))
                .collect(),
            phrase: (0..PreparedBlend::LENGTHS)
                .map(|l| self.phrase_length_factor(l))
                .collect(),
            params: self.clone(),
        }
    }
}

/// `1 / (1 + e^(−2(H − threshold)))`: near 1 when the entropy is well above the threshold.
#[inline]
fn sigmoid_above(entropy: f32, threshold: f64) -> f64 {
    1.0 / (1.0 + libm::exp(-2.0 * (entropy as f64 - threshold)))
}

/// A [`BlendParams`] with what depends only on the n-gram order or the phrase length
/// looked up rather than recomputed: three divisions fewer per entry, on the path that
/// blends 62M entries. The same operations run in the same order on the same values, so
/// the results are the same bits (a test compares every order and length).
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedBlend {
    params: BlendParams,
    /// By order: the sigmoid's threshold and the weight's multiplier.
    ngram: Vec<(f64, f64)>,
    /// By phrase length below [`PreparedBlend::LENGTHS`]: the length factor.
    phrase: Vec<f64>,
}

impl PreparedBlend {
    /// Phrase lengths with a precomputed factor; longer ones (no configuration uses
    /// them) are computed as they come.
    const LENGTHS: u16 = 256;

    pub fn params(&self) -> &BlendParams {
        &self.params
    }

    /// [`BlendParams::blend`].
    #[inline]
    pub fn blend(&self, entry: &Entry) -> (f64, f64) {
        let params = &self.params;
        let ngram_weight = entry.ngram.matched().then(|| {
            let (threshold, multiplier) = self.ngram[entry.ngram.order as usize];
            params.ngram_weight(sigmoid_above(entry.entropy, threshold), multiplier)
        });
        let phrase_weight = entry.phrase.matched().then(|| {
            let length = entry.phrase.length;
            let factor = match self.phrase.get(length as usize) {
                Some(&factor) => factor,
                None => params.phrase_length_factor(length),
            };
            params.phrase_weight(entry.entropy, factor)
        });
        blend_with_weights(entry, ngram_weight, phrase_weight)
    }
}

/// The sequential blend with the weights already known (`None`: that cache did not match).
#[inline]
pub fn blend_with_weights(
    entry: &Entry,
    ngram_weight: Option<f64>,
    phrase_weight: Option<f64>,
) -> (f64, f64) {
    let mut p = entry.model_p as f64;
    if let Some(a) = ngram_weight {
        p = (1.0 - a) * p + a * entry.ngram.q();
    }
    let after_ngram = p;
    if let Some(b) = phrase_weight {
        p = (1.0 - b) * p + b * entry.phrase.q();
    }
    (after_ngram, p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table of sample weights in algorithm.md §5.2.
    #[test]
    fn ngram_alpha_matches_the_spec_table() {
        let params = BlendParams {
            alpha_high: 0.99,
            entropy_thresh: 3.0,
            ..BlendParams::default()
        };
        let table = [
            (2, [0.0151, 0.0157, 0.0201, 0.0486, 0.156, 0.292]),
            (8, [0.0542, 0.0714, 0.182, 0.569, 0.917, 0.99]),
            (12, [0.0925, 0.191, 0.637, 0.99, 0.99, 0.99]),
            (16, [0.189, 0.606, 0.99, 0.99, 0.99, 0.99]),
        ];
        for (order, row) in table {
            for (h, expected) in [0.0f32, 1.0, 2.0, 3.0, 4.0, 6.0].iter().zip(row) {
                let got = params.ngram_alpha(*h, order);
                let digits = if expected < 0.1 { 1e-4 } else { 1e-3 };
                assert!(
                    (got - expected).abs() <= digits,
                    "order {order} H {h}: {got} vs {expected}"
                );
            }
        }
    }

    #[test]
    fn phrase_alpha_matches_the_spec_examples() {
        let params = BlendParams::default();
        for (h, expected) in [(0.0f32, 0.498), (2.5, 0.743), (4.0, 0.967), (6.0, 0.99)] {
            let got = params.phrase_alpha(h, 64);
            assert!((got - expected).abs() < 1e-3, "H {h}: {got}");
        }
        assert!((params.phrase_alpha(100.0, 16) - 0.90).abs() < 1e-9);
    }

    /// The prepared blend is the plain one, bit for bit, at every order and length.
    #[test]
    fn a_prepared_blend_is_the_same_bits() {
        let params = BlendParams {
            alpha_high: 0.87,
            entropy_thresh: 3.3,
            ..BlendParams::default()
        };
        let prepared = params.prepared();
        for order in 0..=u8::MAX {
            for length in [0u16, 1, 15, 16, 17, 32, 48, 63, 64, 65, 255, 256, 300] {
                for entropy in [0.0f32, 0.3, 1.7, 2.5, 3.9, 4.0, 6.25, 11.0] {
                    let entry = Entry {
                        model_p: 0.0123,
                        entropy,
                        ngram: NgramMatch {
                            order,
                            context: 7,
                            full: 3,
                        },
                        phrase: PhraseMatch {
                            length,
                            context: 5,
                            full: 4,
                        },
                    };
                    let (a, b) = (params.blend(&entry), prepared.blend(&entry));
                    assert_eq!(
                        (a.0.to_bits(), a.1.to_bits()),
                        (b.0.to_bits(), b.1.to_bits()),
                        "order {order} length {length} H {entropy}"
                    );
                }
            }
        }
    }
}
