//! `calibrate`: pass-1 + matches → the calibration grid and the chosen blend (§8).

use std::sync::Arc;
use std::time::Instant;

use std::ops::Range;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, RecordBatch, UInt32Array};
use arrow::datatypes::Int64Type;
use serde::{Deserialize, Serialize};
use stage_api::products;
use stage_api::{
    check_param, read_column, table_rows, write_parquet, Column, ColumnType::*, Input, Output,
    ParquetLayout, Stage, StageContext, StageError, StageParams, StageReport, StageSpec,
};

use super::*;
use crate::blend::BlendParams;
use crate::calibrate::{calibrate, CalibrationGrid, CalibrationResult};
use stage_api::windows::{rank_rows, windows, Tail};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CalibrateParams {
    pub alpha_high: Vec<f64>,
    pub entropy_thresh: Vec<f64>,
    pub fraction: f64,
    pub minimum: usize,
    pub alpha_low: f64,
    pub phrase_base_alpha: f64,
    /// Calibrate each of this many slices of pass 1 on its own first entries, as the
    /// record's 8 ranks did (§8); 1 is one global calibration.
    pub ranks: usize,
    /// How pass 1 laid out its windows (the record's 2048 and 64), which is how the
    /// ranks split the entries; read only when `ranks` > 1.
    pub window_len: usize,
    pub stride: usize,
}

impl CalibrateParams {
    /// The engine's grid: converted from the parameters here and nowhere else.
    fn grid(&self) -> CalibrationGrid {
        CalibrationGrid {
            alpha_high: self.alpha_high.clone(),
            entropy_thresh: self.entropy_thresh.clone(),
            fraction: self.fraction,
            minimum: self.minimum,
        }
    }

    /// The blend the grid calibrates, for the chain's cache: its orders and phrase
    /// lengths are the cache's.
    fn blend(&self, cache: &CacheParams) -> BlendParams {
        BlendParams {
            alpha_low: self.alpha_low,
            phrase_base_alpha: self.phrase_base_alpha,
            min_order: cache.ngram_min_order,
            max_order: cache.ngram_max_order,
            phrase_min_length: *cache.phrase_lengths.iter().min().unwrap_or(&16),
            phrase_max_length: *cache.phrase_lengths.iter().max().unwrap_or(&64),
            ..BlendParams::default()
        }
    }
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
            ranks: 1,
            window_len: 2048,
            stride: 64,
        }
    }
}

pub struct CalibrateStage;

/// The most values per calibration grid axis.
const MAX_GRID_VALUES: usize = 1000;

/// The most ranks (the record's 8; more only makes each calibration prefix smaller).
const MAX_RANKS: usize = 1024;

/// `grid`: one row per rank and (alpha_high, entropy_thresh) point.
const GRID: &[Column] = &[
    Column::new("rank", U32),
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
        for (param, value, most) in [
            ("ranks", self.ranks, MAX_RANKS),
            ("window_len", self.window_len, usize::MAX),
            ("stride", self.stride, self.window_len),
        ] {
            if value == 0 || value > most {
                return Err(StageError::invalid_param(
                    param,
                    format!("{value} is outside 1..={most}"),
                ));
            }
        }
        check_param(
            "fraction",
            self.fraction,
            0.0..=1.0,
            "the share of each rank's entries calibrated on",
        )?;
        Ok(())
    }
}

impl Stage for CalibrateStage {
    type Params = CalibrateParams;

    const SPEC: StageSpec = StageSpec {
        kind: "calibrate",
        // 3: the phrase weight's exp as numpy computes it; ranks; the grid's rank column.
        version: 3,
        summary: "pass-1 + matches -> calibration grid and the chosen blend",
        inputs: &[
            Input::required("pass1", &[PASS1]),
            Input::required("cache", &[MATCHES, CACHE_CONFIG]),
        ],
        outputs: &[
            Output::table(products::GRID.name, GRID),
            Output::file(
                products::CALIBRATION.name,
                "the chosen blend, every parameter of it",
            ),
        ],
        ..StageSpec::NONE
    };

    fn run(&self, ctx: &StageContext, params: CalibrateParams) -> Result<StageReport, StageError> {
        let (_, rows) = pass1_rows(ctx)?;
        let cache_params = cache_params_of(ctx)?;
        let (base, grid) = (params.blend(&cache_params), params.grid());
        let mut report = StageReport::default();
        let started = Instant::now();
        let slices = rank_slices(ctx, rows, &params)?;
        // Only the calibration entries are ever read, one rank at a time.
        let results: Vec<CalibrationResult> = slices
            .iter()
            .map(|rows| {
                let first = rows.start;
                let scored = load_rows(ctx, first..first + grid.calibration_entries(rows.len()))?;
                Ok(calibrate(&scored.entries(0..scored.len()), &base, &grid))
            })
            .collect::<Result<_, StageError>>()?;
        report.phase("grid", started);

        let schema = stage_api::arrow_schema(GRID);
        let points = || {
            results
                .iter()
                .enumerate()
                .flat_map(|(rank, r)| r.points.iter().map(move |p| (rank, r, p)))
        };
        let columns: Vec<ArrayRef> = vec![
            Arc::new(UInt32Array::from_iter_values(
                points().map(|(rank, _, _)| rank as u32),
            )),
            Arc::new(Float64Array::from_iter_values(
                points().map(|(_, _, p)| p.alpha_high),
            )),
            Arc::new(Float64Array::from_iter_values(
                points().map(|(_, _, p)| p.entropy_thresh),
            )),
            Arc::new(Float64Array::from_iter_values(
                points().map(|(_, _, p)| p.objective),
            )),
            Arc::new(BooleanArray::from_iter(points().map(|(_, r, p)| {
                Some(p.alpha_high == r.alpha_high && p.entropy_thresh == r.entropy_thresh)
            }))),
        ];
        let batch = RecordBatch::try_new(schema.clone(), columns).expect("columns match schema");
        write_parquet(
            &ctx.output("grid.parquet"),
            schema,
            [batch],
            &ParquetLayout::default(),
        )?;
        let ranks: Vec<RankCalibration> = results
            .iter()
            .zip(&slices)
            .enumerate()
            .map(|(rank, (result, rows))| RankCalibration {
                rank,
                first_row: rows.start,
                rows: rows.len(),
                alpha_high: result.alpha_high,
                entropy_thresh: result.entropy_thresh,
                objective_nats: result.objective,
                entries: result.entries,
            })
            .collect();
        let result = &results[0];
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
            ranks,
        };
        write_json(&ctx.output("calibration.json"), &calibration)?;
        Ok(report.with_fields(&CalibrateReport {
            alpha_high: result.alpha_high,
            entropy_thresh: result.entropy_thresh,
            objective_nats: result.objective,
            calibration_entries: result.entries as u64,
            ranks: slices.len() as u64,
        }))
    }
}

/// What `calibrate` reports: rank 0's chosen pair (the one `pass2`'s headline shows) and
/// how many ranks calibrated.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct CalibrateReport {
    pub alpha_high: f64,
    pub entropy_thresh: f64,
    /// Rank 0's objective at its chosen pair: mean nats per calibration entry.
    pub objective_nats: f64,
    pub calibration_entries: u64,
    pub ranks: u64,
}

/// The pass-1 rows of each rank: all of them for one rank; for more, the record's split
/// of its windows (§4.1), after checking that pass 1 lists exactly those windows'
/// entries, in their order (otherwise a slice would silently hold the wrong entries).
fn rank_slices(
    ctx: &StageContext,
    rows: usize,
    params: &CalibrateParams,
) -> Result<Vec<Range<usize>>, StageError> {
    if params.ranks == 1 {
        return Ok(std::iter::once(0..rows).collect());
    }
    let targets = table_rows(&ctx.input("cache")?.file("matches.parquet"))?.max(1) - 1;
    // Pass 1 scored its tail once or as the record did: its row count tells which.
    let entries = |tail| {
        let all = windows(targets, params.window_len, params.stride, tail);
        let n: usize = all.iter().map(|w| w.entries()).sum();
        (all, n)
    };
    let ((once, once_rows), (record, record_rows)) = (entries(Tail::Once), entries(Tail::Record));
    let layout = || {
        format!(
            "ranks = {} splits pass 1 by its windows (window_len {}, stride {})",
            params.ranks, params.window_len, params.stride
        )
    };
    let pass1 = ctx.input("pass1")?.file("pass1.parquet");
    let windows = if rows == once_rows {
        once
    } else if rows == record_rows {
        record
    } else {
        return Err(StageError::input(
            &pass1,
            format!(
                "{}, which give {once_rows} entries over {targets} targets ({record_rows} with the record's tail), but pass 1 has {}",
                layout(),
                rows
            ),
        ));
    };
    let positions = windows.iter().flat_map(|w| w.positions());
    if let Some((row, (&got, want))) = read_column::<Int64Type>(&pass1, "position")?
        .iter()
        .zip(positions)
        .enumerate()
        .find(|(_, (&got, want))| got as usize != *want)
    {
        return Err(StageError::input(
            &pass1,
            format!(
                "{}, which put position {want} at row {row}, but pass 1 has {got} there",
                layout()
            ),
        ));
    }
    // The record splits its windows between ranks; a rank without windows has no
    // entries to calibrate on, and the record's code fails there (an empty slice).
    if params.ranks > windows.len() {
        return Err(StageError::invalid_param(
            "ranks",
            format!(
                "{} ranks but pass 1 has {} windows (window_len {}, stride {}, over {targets} targets): a rank without windows has nothing to calibrate on",
                params.ranks,
                windows.len(),
                params.window_len,
                params.stride
            ),
        ));
    }
    Ok(rank_rows(&windows, params.ranks))
}
