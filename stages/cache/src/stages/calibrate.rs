//! `calibrate`: pass-1 + matches → the calibration grid and the chosen blend (§8).

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, RecordBatch};
use serde::{Deserialize, Serialize};
use stage_api::{
    write_parquet, Column, ColumnType::*, Input, Output, ParquetLayout, Stage, StageContext,
    StageError, StageParams, StageReport, StageSpec,
};

use super::*;
use crate::blend::BlendParams;
use crate::calibrate::{calibrate, CalibrationGrid};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalibrateParams {
    pub alpha_high: Vec<f64>,
    pub entropy_thresh: Vec<f64>,
    pub fraction: f64,
    pub minimum: usize,
    pub alpha_low: f64,
    pub phrase_base_alpha: f64,
}

impl Default for CalibrateParams {
    fn default() -> Self {
        let (grid, blend) = (CalibrationGrid::default(), BlendParams::default());
        CalibrateParams {
            alpha_high: grid.alpha_high,
            entropy_thresh: grid.entropy_thresh,
            fraction: grid.fraction,
            minimum: grid.minimum,
            alpha_low: blend.alpha_low,
            phrase_base_alpha: blend.phrase_base_alpha,
        }
    }
}

pub struct CalibrateStage;

/// The most values per calibration grid axis.
const MAX_GRID_VALUES: usize = 1000;

/// `grid`: one row per (alpha_high, entropy_thresh) point.
const GRID: &[Column] = &[
    Column::new("alpha_high", F64),
    Column::new("entropy_thresh", F64),
    Column::new("objective_nats", F64),
    Column::new("chosen", Bool),
];

impl StageParams for CalibrateParams {
    fn validate(&self) -> Result<(), StageError> {
        if self.alpha_high.is_empty() || self.entropy_thresh.is_empty() {
            return Err(StageError::InvalidParams(
                "the calibration grid is empty".into(),
            ));
        }
        for (param, values) in [
            ("alpha_high", &self.alpha_high),
            ("entropy_thresh", &self.entropy_thresh),
        ] {
            if values.len() > MAX_GRID_VALUES {
                return Err(StageError::invalid_param(
                    param,
                    format!(
                        "{} values are more than {MAX_GRID_VALUES} (each grid point is a pass over the calibration entries)",
                        values.len()
                    ),
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.fraction) {
            return Err(StageError::InvalidParams(format!(
                "fraction {} is outside 0..=1",
                self.fraction
            )));
        }
        Ok(())
    }
}

impl Stage for CalibrateStage {
    type Params = CalibrateParams;

    const SPEC: StageSpec = StageSpec {
        kind: "calibrate",
        version: 2,
        summary: "pass-1 + matches -> calibration grid and the chosen blend",
        inputs: &[
            Input::required("pass1", &[PASS1]),
            Input::required("cache", &[MATCHES, CACHE_CONFIG]),
        ],
        outputs: &[
            Output::table("grid", GRID),
            Output::file(
                "calibration.json",
                "the chosen blend, every parameter of it",
            ),
        ],
        ..StageSpec::NONE
    };

    fn run(&self, ctx: &StageContext, params: CalibrateParams) -> Result<StageReport, StageError> {
        let scored = load_entries(ctx)?;
        let cache_params = cache_params_of(ctx)?;
        let base = BlendParams {
            alpha_low: params.alpha_low,
            phrase_base_alpha: params.phrase_base_alpha,
            min_order: cache_params.ngram_min_order,
            max_order: cache_params.ngram_max_order,
            phrase_min_length: *cache_params.phrase_lengths.iter().min().unwrap_or(&16),
            phrase_max_length: *cache_params.phrase_lengths.iter().max().unwrap_or(&64),
            ..BlendParams::default()
        };
        let grid = CalibrationGrid {
            alpha_high: params.alpha_high.clone(),
            entropy_thresh: params.entropy_thresh.clone(),
            fraction: params.fraction,
            minimum: params.minimum,
        };
        let mut report = StageReport::default();
        let started = Instant::now();
        // Only the calibration entries are ever assembled.
        let sample = scored.entries(0..grid.calibration_entries(scored.len()));
        let result = calibrate(&sample, &base, &grid);
        report.phase("grid", started);

        let schema = stage_api::arrow_schema(GRID);
        let is_chosen = |a: f64, e: f64| a == result.alpha_high && e == result.entropy_thresh;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(Float64Array::from_iter_values(
                result.points.iter().map(|p| p.alpha_high),
            )),
            Arc::new(Float64Array::from_iter_values(
                result.points.iter().map(|p| p.entropy_thresh),
            )),
            Arc::new(Float64Array::from_iter_values(
                result.points.iter().map(|p| p.objective),
            )),
            Arc::new(BooleanArray::from_iter(
                result
                    .points
                    .iter()
                    .map(|p| Some(is_chosen(p.alpha_high, p.entropy_thresh))),
            )),
        ];
        let batch = RecordBatch::try_new(schema.clone(), columns).expect("columns match schema");
        write_parquet(
            &ctx.output("grid.parquet"),
            schema,
            [batch],
            &ParquetLayout::default(),
        )?;
        let calibration = Calibration {
            alpha_high: result.alpha_high,
            entropy_thresh: result.entropy_thresh,
            alpha_low: base.alpha_low,
            phrase_base_alpha: base.phrase_base_alpha,
            min_order: base.min_order,
            max_order: base.max_order,
            phrase_min_length: base.phrase_min_length,
            phrase_max_length: base.phrase_max_length,
            objective_nats: result.objective,
            entries: result.entries,
        };
        write_json(&ctx.output("calibration.json"), &calibration)?;
        Ok(report
            .with("alpha_high", result.alpha_high)
            .with("entropy_thresh", result.entropy_thresh)
            .with("objective_nats", result.objective)
            .with("calibration_entries", result.entries as u64))
    }
}
