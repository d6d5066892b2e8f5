//! The report's figures: plain data in, an SVG string out (plotters' SVG backend).
//!
//! No fonts are measured here: the SVG backend writes `<text>` elements and the browser
//! sets them, so the report needs no font files and looks native wherever it is opened.

use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

/// The palette every figure uses for its series, in order (colour-blind-safe, Okabe–Ito).
pub const PALETTE: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(86, 180, 233),
    RGBColor(230, 159, 0),
    RGBColor(0, 0, 0),
];
const DECREASE: RGBColor = RGBColor(0, 158, 115);
const INCREASE: RGBColor = RGBColor(213, 94, 0);
const TOTAL: RGBColor = RGBColor(120, 120, 120);
const FONT: &str = "sans-serif";

pub fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Draws onto an SVG canvas of `size` and returns the document.
fn svg(
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend, Shift>) -> Result<()>,
) -> Result<String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, size).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        draw(&root)?;
        root.present().map_err(plot_error)?;
    }
    Ok(out)
}

fn plot_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting failed: {e:?}")
}

/// One chain's BPB waterfall: the model alone, what the n-gram blend changes, what the
/// phrase blend changes, and the final figure. `top` fixes the y range so that several
/// chains drawn side by side compare by eye.
pub fn waterfall(title: &str, neural: f64, ngram: f64, fin: f64, top: f64) -> Result<String> {
    svg((360, 300), |root| {
        let mut chart = titled_chart(root, title, (30, 45), -0.5f64..3.5f64, 0f64..top)?;
        let labels = ["neural", "n-gram", "phrase", "final"];
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(4)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && (0.0..4.0).contains(&i) {
                    labels[i as usize].to_string()
                } else {
                    String::new()
                }
            })
            .y_desc("bits per byte")
            .draw()
            .map_err(plot_error)?;
        let bars = [
            (0.0, neural, TOTAL),
            (
                ngram.min(neural),
                ngram.max(neural),
                step_colour(neural, ngram),
            ),
            (fin.min(ngram), fin.max(ngram), step_colour(ngram, fin)),
            (0.0, fin, TOTAL),
        ];
        chart
            .draw_series(bars.iter().enumerate().map(|(i, &(low, high, c))| {
                let x = i as f64;
                Rectangle::new([(x - 0.35, low), (x + 0.35, high)], c.filled())
            }))
            .map_err(plot_error)?;
        let values = [neural, ngram - neural, fin - ngram, fin];
        chart
            .draw_series(values.iter().zip(&bars).enumerate().map(|(i, (v, b))| {
                let text = if i == 0 || i == 3 {
                    format!("{v:.4}")
                } else {
                    format!("{v:+.4}")
                };
                Text::new(
                    text,
                    (i as f64 - 0.3, b.1 + top * 0.06),
                    (FONT, 12).into_font(),
                )
            }))
            .map_err(plot_error)?;
        Ok(())
    })
}

fn step_colour(from: f64, to: f64) -> RGBColor {
    if to <= from {
        DECREASE
    } else {
        INCREASE
    }
}

/// A chart with the report's caption style and margins, `label_areas` (x, y) pixels for
/// the axes' labels, over the given ranges.
fn titled_chart<'a, 'b: 'a>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
    title: &str,
    label_areas: (u32, u32),
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
) -> Result<Chart<'a, 'b>> {
    ChartBuilder::on(root)
        .caption(title, (FONT, 16))
        .margin(10)
        .x_label_area_size(label_areas.0)
        .y_label_area_size(label_areas.1)
        .build_cartesian_2d(x, y)
        .map_err(plot_error)
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The series' names in the upper right corner, over a translucent box.
fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>) -> Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font((FONT, 12))
        .draw()
        .map_err(plot_error)
}

/// One calibration cell: the objective (mean nats on the calibration entries) at one
/// grid point.
#[derive(Debug, Clone, PartialEq)]
pub struct GridCell {
    pub alpha_high: f64,
    pub entropy_thresh: f64,
    pub objective: f64,
    pub chosen: bool,
}

/// The calibration grid as a heat map (darker = lower objective = better), the chosen
/// point ringed and labelled.
pub fn heatmap(title: &str, cells: &[GridCell]) -> Result<String> {
    let mut alphas: Vec<f64> = cells.iter().map(|c| c.alpha_high).collect();
    let mut thresholds: Vec<f64> = cells.iter().map(|c| c.entropy_thresh).collect();
    for axis in [&mut alphas, &mut thresholds] {
        axis.sort_by(f64::total_cmp);
        axis.dedup();
    }
    let index = |axis: &[f64], v: f64| axis.iter().position(|&a| a == v).unwrap_or(0) as f64;
    let (lo, hi) = cells.iter().fold((f64::MAX, f64::MIN), |(lo, hi), c| {
        (lo.min(c.objective), hi.max(c.objective))
    });
    let span = if hi > lo { hi - lo } else { 1.0 };
    svg((420, 340), |root| {
        let mut chart = titled_chart(
            root,
            title,
            (40, 50),
            -0.5f64..thresholds.len() as f64 - 0.5,
            -0.5f64..alphas.len() as f64 - 0.5,
        )?;
        let tick = |axis: &[f64], x: f64| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < axis.len() {
                format!("{}", axis[i as usize])
            } else {
                String::new()
            }
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(thresholds.len())
            .y_labels(alphas.len())
            .x_label_formatter(&|x| tick(&thresholds, *x))
            .y_label_formatter(&|y| tick(&alphas, *y))
            .x_desc("entropy_thresh")
            .y_desc("alpha_high")
            .draw()
            .map_err(plot_error)?;
        chart
            .draw_series(cells.iter().map(|c| {
                let x = index(&thresholds, c.entropy_thresh);
                let y = index(&alphas, c.alpha_high);
                // Lower objective (better) is darker.
                let shade = ViridisRGB::get_color_normalized((c.objective - lo) / span, 0.0, 1.0);
                Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], shade.filled())
            }))
            .map_err(plot_error)?;
        chart
            .draw_series(cells.iter().map(|c| {
                let x = index(&thresholds, c.entropy_thresh);
                let y = index(&alphas, c.alpha_high);
                let light = (c.objective - lo) / span < 0.6;
                let ink = if light { WHITE } else { BLACK };
                Text::new(
                    format!("{:.3}", c.objective),
                    (x - 0.3, y + 0.1),
                    (FONT, 10).into_font().color(&ink),
                )
            }))
            .map_err(plot_error)?;
        if let Some(c) = cells.iter().find(|c| c.chosen) {
            let at = (
                index(&thresholds, c.entropy_thresh),
                index(&alphas, c.alpha_high),
            );
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(at.0 - 0.46, at.1 - 0.46), (at.0 + 0.46, at.1 + 0.46)],
                    RED.stroke_width(3),
                )))
                .map_err(plot_error)?;
        }
        Ok(())
    })
}

/// A named series of (x, y) points.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Lines with markers, one per series, with a legend. With `categories`, the series'
/// x values are indices into it (a categorical axis: "none", 2, 3, … 16).
pub fn lines(
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    categories: Option<&[String]>,
) -> Result<String> {
    let points = series.iter().flat_map(|s| s.points.iter());
    let (x_lo, x_hi, y_hi) = points.fold((f64::MAX, f64::MIN, 0f64), |(a, b, c), &(x, y)| {
        (a.min(x), b.max(x), c.max(y))
    });
    let (x_lo, x_hi) = if x_lo <= x_hi {
        (x_lo, x_hi)
    } else {
        (0.0, 1.0)
    };
    let pad = ((x_hi - x_lo) * 0.04).max(0.5);
    let y_hi = if y_hi > 0.0 { y_hi * 1.1 } else { 1.0 };
    let markers = series.iter().map(|s| s.points.len()).max().unwrap_or(0) <= 40;
    svg((560, 340), |root| {
        let mut chart = titled_chart(root, title, (40, 55), x_lo - pad..x_hi + pad, 0f64..y_hi)?;
        let mut mesh = chart.configure_mesh();
        mesh.x_desc(x_desc).y_desc(y_desc);
        let formatter = |x: &f64| match categories {
            Some(names) => {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < names.len() {
                    names[i as usize].clone()
                } else {
                    String::new()
                }
            }
            None => format!("{x}"),
        };
        if let Some(names) = categories {
            mesh.x_labels(names.len()).x_max_light_lines(0);
        }
        mesh.x_label_formatter(&formatter)
            .draw()
            .map_err(plot_error)?;
        for (i, s) in series.iter().enumerate() {
            let c = colour(i);
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2)))
                .map_err(plot_error)?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
            if markers {
                chart
                    .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, c.filled())))
                    .map_err(plot_error)?;
            }
        }
        legend(&mut chart)
    })
}

/// Overlaid histograms of log10(values), one per series: the implied mass, which spans
/// four orders of magnitude between modes.
pub fn log_histogram(title: &str, x_desc: &str, series: &[Series]) -> Result<String> {
    const BIN: f64 = 0.05;
    let logs: Vec<Vec<f64>> = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .filter(|p| p.1 > 0.0)
                .map(|p| p.1.log10())
                .collect()
        })
        .collect();
    let (lo, hi) = logs
        .iter()
        .flatten()
        .fold((0f64, 0f64), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    // Bins are centred on multiples of BIN, so that a mass of exactly 1 (log 0) sits in
    // the middle of one bin rather than on the edge between two.
    let (lo, hi) = (
        (lo / BIN).round() * BIN - BIN,
        (hi / BIN).round() * BIN + BIN,
    );
    let bins = ((hi - lo) / BIN).round() as usize + 1;
    let counts: Vec<Vec<f64>> = logs
        .iter()
        .map(|values| {
            let mut counts = vec![0f64; bins];
            for v in values {
                counts[(((v - lo) / BIN).round() as usize).min(bins - 1)] += 1.0;
            }
            // Shares, so that series of different sizes compare.
            let n = values.len().max(1) as f64;
            counts.iter_mut().for_each(|c| *c /= n);
            counts
        })
        .collect();
    let top = counts.iter().flatten().fold(0f64, |a, &b| a.max(b)) * 1.1;
    svg((560, 340), |root| {
        let mut chart = titled_chart(
            root,
            title,
            (40, 55),
            lo - BIN..hi + BIN,
            0f64..top.max(1e-9),
        )?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("share of sampled positions")
            .x_label_formatter(&|x| format!("{}", round_sig(10f64.powf(*x))))
            .draw()
            .map_err(plot_error)?;
        for (i, (s, counts)) in series.iter().zip(&counts).enumerate() {
            let c = colour(i);
            chart
                .draw_series(
                    counts
                        .iter()
                        .enumerate()
                        .filter(|(_, &n)| n > 0.0)
                        .map(|(b, &n)| {
                            let x = lo + b as f64 * BIN;
                            Rectangle::new(
                                [(x - BIN / 2.0, 0.0), (x + BIN / 2.0, n)],
                                c.mix(0.55).filled(),
                            )
                        }),
                )
                .map_err(plot_error)?
                .label(s.name.as_str())
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.mix(0.55).filled())
                });
        }
        legend(&mut chart)
    })
}

/// Two significant digits, for log-axis tick labels (1, 3.2, 10, 32, 100).
fn round_sig(x: f64) -> f64 {
    if x == 0.0 {
        return 0.0;
    }
    let scale = 10f64.powi(1 - x.abs().log10().floor() as i32);
    (x * scale).round() / scale
}

/// A verdict matrix: one row per chain, one column per probe, each cell pass (green),
/// fail (orange) or not applicable (grey), with its word written in it.
pub fn verdict_matrix(
    chains: &[String],
    probes: &[String],
    verdict: impl Fn(&str, &str) -> String,
) -> Result<String> {
    let (label, cell, row, top) = (170i32, 110i32, 30i32, 40i32);
    let size = (
        (label + cell * probes.len() as i32 + 10) as u32,
        (top + row * chains.len() as i32 + 10) as u32,
    );
    svg(size, |root| {
        let font = |size| (FONT, size).into_font();
        for (j, probe) in probes.iter().enumerate() {
            let x = label + cell * j as i32 + 8;
            root.draw(&Text::new(
                probe.clone(),
                (x, top - 22),
                font(13).style(FontStyle::Bold),
            ))
            .map_err(plot_error)?;
        }
        for (i, chain) in chains.iter().enumerate() {
            let y = top + row * i as i32;
            root.draw(&Text::new(chain.clone(), (6, y + 9), font(13)))
                .map_err(plot_error)?;
            for (j, probe) in probes.iter().enumerate() {
                let x = label + cell * j as i32;
                let v = verdict(chain, probe);
                let fill = match v.as_str() {
                    "pass" => DECREASE,
                    "fail" => INCREASE,
                    _ => RGBColor(200, 200, 200),
                };
                root.draw(&Rectangle::new(
                    [(x + 2, y + 2), (x + cell - 2, y + row - 2)],
                    fill.filled(),
                ))
                .map_err(plot_error)?;
                let word = if v == "not-applicable" {
                    "n/a".to_string()
                } else {
                    v
                };
                root.draw(&Text::new(word, (x + 10, y + 9), font(13).color(&WHITE)))
                    .map_err(plot_error)?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_figure_is_an_svg_document_with_its_marks() {
        let wf = waterfall("reference", 2.24, 1.90, 0.11, 2.5).unwrap();
        assert!(wf.starts_with("<svg") && wf.trim_end().ends_with("</svg>"));
        assert!(wf.contains("+0.3400") || wf.contains("-0.3400"), "{wf}");
        let cells: Vec<GridCell> = (0..6)
            .flat_map(|a| {
                (0..5).map(move |t| GridCell {
                    alpha_high: 0.5 + a as f64 * 0.1,
                    entropy_thresh: 2.0 + t as f64 * 0.5,
                    objective: 1.0 + (a * 5 + t) as f64 * 0.01,
                    chosen: a == 0 && t == 0,
                })
            })
            .collect();
        let map = heatmap("grid", &cells).unwrap();
        assert!(map.matches("<rect").count() >= 31, "30 cells and a marker");
        let series = vec![Series {
            name: "loss".into(),
            points: (0..100)
                .map(|i| (i as f64, 5.0 / (1.0 + i as f64)))
                .collect(),
        }];
        assert!(lines("t", "step", "nats", &series, None)
            .unwrap()
            .contains("<polyline"));
        let masses = vec![Series {
            name: "reference".into(),
            points: (1..200).map(|i| (0.0, i as f64)).collect(),
        }];
        assert!(log_histogram("mass", "Σ p", &masses)
            .unwrap()
            .contains("reference"));
        assert_eq!(round_sig(31.62), 32.0);
        assert_eq!(round_sig(1.0), 1.0);
    }
}
