//! `calibrate`: pass-1 + matches → the calibration grid and the chosen blend (§8).

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use stage_api::{
    canonicalize, write_parquet, ParquetLayout, Stage, StageContext, StageError, StageReport,
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

impl Stage for CalibrateStage {
    fn kind(&self) -> &'static str {
        "calibrate"
    }

    fn version(&self) -> u32 {
        2
    }

    fn summary(&self) -> &'static str {
        "pass-1 + matches -> calibration grid and the chosen blend"
    }

    fn canonical_params(&self, raw: &Value) -> Result<Value, StageError> {
        let canonical = canonicalize::<CalibrateParams>(raw)?;
        let p: CalibrateParams = serde_json::from_value(canonical.clone()).unwrap();
        if p.alpha_high.is_empty() || p.entropy_thresh.is_empty() {
            return Err(invalid_params("the calibration grid is empty"));
        }
        for (param, values) in [
            ("alpha_high", &p.alpha_high),
            ("entropy_thresh", &p.entropy_thresh),
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
        if !(0.0..=1.0).contains(&p.fraction) {
            return Err(invalid_params(format!(
                "fraction {} is outside 0..=1",
                p.fraction
            )));
        }
        Ok(canonical)
    }

    fn input_names(&self) -> &'static [&'static str] {
        &["pass1", "cache"]
    }

    fn run(&self, ctx: &StageContext) -> Result<StageReport, StageError> {
        let params: CalibrateParams = ctx.params_as()?;
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

        let schema = Arc::new(Schema::new(vec![
            Field::new("alpha_high", DataType::Float64, false),
            Field::new("entropy_thresh", DataType::Float64, false),
            Field::new("objective_nats", DataType::Float64, false),
            Field::new("chosen", DataType::Boolean, false),
        ]));
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
