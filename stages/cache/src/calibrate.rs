//! Online alpha calibration (algorithm.md §8): a grid over (alpha_high, entropy_thresh),
//! scored by mean NLL on the first entries in pass-1 order; the first strict minimum in
//! loop order wins.

use rayon::prelude::*;

use crate::blend::{BlendParams, Entry};

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
    let pairs: Vec<(f64, f64)> = grid
        .alpha_high
        .iter()
        .flat_map(|&a| grid.entropy_thresh.iter().map(move |&e| (a, e)))
        .collect();
    // Points in parallel; each point's sum is sequential, so the result does not depend
    // on the thread count.
    let points: Vec<GridPoint> = pairs
        .par_iter()
        .map(|&(alpha_high, entropy_thresh)| {
            let params = BlendParams {
                alpha_high,
                entropy_thresh,
                ..base.clone()
            };
            let total: f64 = sample.iter().map(|e| params.nll(e)).sum();
            GridPoint {
                alpha_high,
                entropy_thresh,
                objective: total / n.max(1) as f64,
            }
        })
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
