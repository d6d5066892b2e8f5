//! Online alpha calibration (algorithm.md §8): a grid over (alpha_high, entropy_thresh),
//! scored by mean NLL on the first entries in pass-1 order; the first strict minimum in
//! loop order wins.

use rayon::prelude::*;

use crate::blend::{blend_with_weights, BlendParams, Entry, PROBABILITY_FLOOR};

#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationGrid {
    /// Outer loop.
    pub alpha_high: Vec<f64>,
    /// Inner loop.
    pub entropy_thresh: Vec<f64>,
    /// Calibrate on `max(floor(fraction · N), minimum)` entries (at most N).
    pub fraction: f64,
    pub minimum: usize,
}

impl Default for CalibrationGrid {
    fn default() -> Self {
        CalibrationGrid {
            alpha_high: vec![0.85, 0.90, 0.93, 0.95, 0.97, 0.99],
            entropy_thresh: vec![3.0, 3.5, 4.0, 4.5, 5.0],
            fraction: 0.05,
            minimum: 1000,
        }
    }
}

impl CalibrationGrid {
    pub fn calibration_entries(&self, total: usize) -> usize {
        (((self.fraction * total as f64).floor() as usize).max(self.minimum)).min(total)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GridPoint {
    pub alpha_high: f64,
    pub entropy_thresh: f64,
    /// Mean NLL (nats per token) over the calibration entries.
    pub objective: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationResult {
    pub alpha_high: f64,
    pub entropy_thresh: f64,
    pub objective: f64,
    pub entries: usize,
    /// Every point, in loop order.
    pub points: Vec<GridPoint>,
}

/// Scores every grid point on `sample`: the calibration entries, i.e. the first
/// `grid.calibration_entries(total)` entries in pass-1 order, chosen by the caller (who
/// need not hold the rest in memory).
pub fn calibrate(
    sample: &[Entry],
    base: &BlendParams,
    grid: &CalibrationGrid,
) -> CalibrationResult {
    let n = sample.len();
    // The phrase weight does not depend on the grid, and the n-gram sigmoid depends only on
    // entropy_thresh: compute them once (per threshold), not once per point. The float
    // operations are the blend's own, so every objective is bit-identical to scoring each
    // point with `BlendParams::nll`.
    let phrase_weights: Vec<Option<f64>> = sample
        .par_iter()
        .map(|e| {
            e.phrase
                .matched()
                .then(|| base.phrase_alpha(e.entropy, e.phrase.length))
        })
        .collect();
    let mut by_threshold: Vec<Vec<GridPoint>> = Vec::new();
    for &entropy_thresh in &grid.entropy_thresh {
        let params = BlendParams {
            entropy_thresh,
            ..base.clone()
        };
        let sigmas: Vec<f64> = sample
            .par_iter()
            .map(|e| {
                if e.ngram.matched() {
                    params.ngram_sigma(e.entropy, e.ngram.order)
                } else {
                    0.0
                }
            })
            .collect();
        // Points in parallel; each point's sum is sequential, so the result does not depend
        // on the thread count.
        let points = grid
            .alpha_high
            .par_iter()
            .map(|&alpha_high| {
                let params = BlendParams {
                    alpha_high,
                    ..params.clone()
                };
                let total: f64 = sample
                    .iter()
                    .zip(&sigmas)
                    .zip(&phrase_weights)
                    .map(|((e, &sigma), &phrase_weight)| {
                        let ngram_weight = e
                            .ngram
                            .matched()
                            .then(|| params.ngram_alpha_from_sigma(sigma, e.ngram.order));
                        -libm::log(
                            blend_with_weights(e, ngram_weight, phrase_weight)
                                .1
                                .max(PROBABILITY_FLOOR),
                        )
                    })
                    .sum();
                GridPoint {
                    alpha_high,
                    entropy_thresh,
                    objective: total / n.max(1) as f64,
                }
            })
            .collect();
        by_threshold.push(points);
    }
    // Back to the record's loop order: alpha_high outer, entropy_thresh inner.
    let points: Vec<GridPoint> = (0..grid.alpha_high.len())
        .flat_map(|a| by_threshold.iter().map(move |row| row[a].clone()))
        .collect();
    let mut best = 0;
    for (i, point) in points.iter().enumerate() {
        if point.objective < points[best].objective {
            best = i;
        }
    }
    CalibrationResult {
        alpha_high: points[best].alpha_high,
        entropy_thresh: points[best].entropy_thresh,
        objective: points[best].objective,
        entries: n,
        points,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ngram::NgramMatch;
    use crate::phrase::PhraseMatch;

    /// The shortcut must give exactly the objective of scoring each point directly.
    #[test]
    fn objectives_equal_direct_scoring_bit_for_bit() {
        let sample: Vec<Entry> = (0..5000u32)
            .map(|i| Entry {
                model_p: 0.001 + (i % 97) as f32 / 100.0,
                entropy: (i % 71) as f32 / 10.0,
                ngram: NgramMatch {
                    // Every third entry unmatched, the rest spread over orders 2..=16.
                    order: if i % 3 == 0 { 0 } else { 2 + (i % 15) as u8 },
                    context: 13,
                    full: i % 13,
                },
                phrase: PhraseMatch {
                    length: [0u16, 16, 32, 48, 64][(i % 5) as usize],
                    context: 7,
                    full: i % 7,
                },
            })
            .collect();
        let base = BlendParams::default();
        let grid = CalibrationGrid::default();
        let result = calibrate(&sample, &base, &grid);
        let mut i = 0;
        for &alpha_high in &grid.alpha_high {
            for &entropy_thresh in &grid.entropy_thresh {
                let params = BlendParams {
                    alpha_high,
                    entropy_thresh,
                    ..base.clone()
                };
                let direct: f64 =
                    sample.iter().map(|e| params.nll(e)).sum::<f64>() / sample.len() as f64;
                let point = &result.points[i];
                assert_eq!(
                    (point.alpha_high, point.entropy_thresh),
                    (alpha_high, entropy_thresh)
                );
                assert_eq!(
                    point.objective.to_bits(),
                    direct.to_bits(),
                    "({alpha_high}, {entropy_thresh})"
                );
                i += 1;
            }
        }
    }
}
