//! `cachemoney report`: one self-contained HTML page of figures over the built artifacts.
//!
//! Every figure is drawn from the same tables a user can query (`cachemoney sql`): the
//! page prints the query beside each figure and the content hash of every artifact it
//! read, so a figure is as traceable as a number. The page is static (inline SVG and CSS,
//! no script, nothing fetched), so it can be mailed, archived or opened offline.

pub mod plots;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type};
use serde_json::{Map, Value};

use crate::pipeline::Pipeline;
use crate::recipe::short;
use crate::runner::{NodeState, Resolved};
use crate::seeds::SeedRow;
use crate::sql::SqlSession;
use crate::store::{Manifest, Store};
use plots::{GridCell, Series};

/// A built node and what its manifest says.
struct Built<'a> {
    node: &'a str,
    inputs: &'a BTreeMap<String, String>,
    manifest: Manifest,
}

impl Built<'_> {
    fn number(&self, key: &str) -> Option<f64> {
        self.manifest.report.get(key).and_then(Value::as_f64)
    }
    fn mode(&self) -> String {
        self.manifest
            .report
            .get("mode")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string()
    }
    fn report(&self) -> &Map<String, Value> {
        &self.manifest.report
    }
}

/// One figure of the page.
pub struct Figure {
    pub id: String,
    pub svg: String,
    pub caption: String,
    /// The SQL the figure's data came from, if any.
    pub query: Option<String>,
}

/// A section: a heading, a paragraph on how to read it, its figures (or why none).
struct Section {
    title: &'static str,
    intro: String,
    figures: Vec<Figure>,
    missing: Option<String>,
}

/// Builds the page. `seed_rows` is the `seeds` table when the pipeline runs several seeds.
pub async fn build(
    pipeline: &Pipeline,
    store: &Store,
    resolved: &[Resolved],
    sql: &SqlSession,
    seed_rows: &[SeedRow],
) -> Result<(String, usize)> {
    let mut built: Vec<Built> = Vec::new();
    for r in resolved {
        if let (NodeState::Cached { .. }, Some(recipe)) = (&r.state, &r.recipe) {
            if let Some(manifest) = store.manifest(&r.stage, recipe)? {
                let node = pipeline.node(&r.node)?;
                built.push(Built {
                    node: &node.name,
                    inputs: &node.inputs,
                    manifest,
                });
            }
        }
    }
    let of_stage = |stage: &str| -> Vec<&Built> {
        built.iter().filter(|b| b.manifest.stage == stage).collect()
    };
    let chains = of_stage("pass2");
    if chains.is_empty() {
        bail!(
            "no pass2 node of {} is built yet; run `cachemoney run` first",
            pipeline.path.display()
        );
    }
    let audits = of_stage("audit-mass");
    let audit_of = |chain: &Built| {
        audits
            .iter()
            .find(|a| a.inputs.get("calibration") == chain.inputs.get("calibration"))
            .copied()
    };

    let sections = vec![
        waterfalls(&chains)?,
        calibration_grids(&chains, &built, sql).await?,
        by_order_and_length(&chains, sql).await?,
        training_curves(&of_stage("train"), sql).await?,
        implied_mass(&audits, sql).await?,
    ];

    let figures: usize = sections.iter().map(|s| s.figures.len()).sum();
    Ok((
        render(pipeline, &chains, &audit_of, seed_rows, &sections),
        figures,
    ))
}

/// The BPB waterfall of every chain, on one scale.
fn waterfalls(chains: &[&Built]) -> Result<Section> {
    let top = chains
        .iter()
        .filter_map(|c| c.number("neural_bpb"))
        .fold(0f64, f64::max)
        * 1.15;
    let mut figures = Vec::new();
    for chain in chains {
        let (Some(neural), Some(ngram), Some(fin)) = (
            chain.number("neural_bpb"),
            chain.number("ngram_bpb"),
            chain.number("final_bpb"),
        ) else {
            continue;
        };
        let title = format!("{} ({})", chain.node, chain.mode());
        figures.push(Figure {
            id: format!("waterfall-{}", chain.node),
            svg: plots::waterfall(&title, neural, ngram, fin, top.max(0.1))?,
            caption: format!(
                "{}: neural {neural:.4} → after n-gram {ngram:.4} → final {fin:.4} BPB; pass-1 '{}', content {}",
                chain.node,
                chain.inputs.get("pass1").map_or("?", String::as_str),
                short(&chain.manifest.content_hash)
            ),
            query: None,
        });
    }
    Ok(Section {
        title: "BPB waterfall per chain",
        intro: "Bits per byte of the model alone, the change the n-gram blend makes, the change the phrase blend makes, and the final figure (green: fewer bits). Same y scale for every chain. Only a causal-normalised chain's number is a real compression rate; the others' distributions do not sum to 1 (see the implied mass below).".into(),
        figures,
        missing: None,
    })
}

/// Each chain's calibration grid as a heat map.
async fn calibration_grids(
    chains: &[&Built<'_>],
    built: &[Built<'_>],
    sql: &SqlSession,
) -> Result<Section> {
    let mut figures = Vec::new();
    let mut seen = Vec::new();
    for chain in chains {
        let Some(calibration) = chain
            .inputs
            .get("calibration")
            .and_then(|c| built.iter().find(|b| b.node == c))
        else {
            continue;
        };
        if seen.contains(&calibration.node) {
            continue;
        }
        seen.push(calibration.node);
        let query = format!(
            "SELECT alpha_high, entropy_thresh, objective_nats, chosen FROM \"{}\".\"grid\"",
            calibration.node
        );
        let batches = sql.query(&query).await?;
        let alpha = floats(&batches, "alpha_high")?;
        let thresh = floats(&batches, "entropy_thresh")?;
        let objective = floats(&batches, "objective_nats")?;
        let chosen = bools(&batches, "chosen")?;
        let cells: Vec<GridCell> = (0..alpha.len())
            .filter_map(|i| {
                Some(GridCell {
                    alpha_high: alpha[i]?,
                    entropy_thresh: thresh[i]?,
                    objective: objective[i]?,
                    chosen: chosen[i],
                })
            })
            .collect();
        if cells.is_empty() {
            continue;
        }
        let best = cells.iter().find(|c| c.chosen);
        figures.push(Figure {
            id: format!("calibration-{}", calibration.node),
            svg: plots::heatmap(&format!("{} ({})", calibration.node, chain.mode()), &cells)?,
            caption: match best {
                Some(b) => format!(
                    "{}: mean nats per entry on the calibration prefix at each grid point; chosen (red) alpha_high {} and entropy_thresh {} ({:.4} nats); content {}",
                    calibration.node, b.alpha_high, b.entropy_thresh, b.objective, short(&calibration.manifest.content_hash)
                ),
                None => format!("{}: no point marked chosen", calibration.node),
            },
            query: Some(query),
        });
    }
    Ok(Section {
        title: "Calibration grid",
        intro: "The online alpha calibration (algorithm.md §8) scores each (alpha_high, entropy_thresh) pair on the first entries and keeps the lowest mean loss; darker is better. A chosen point on the grid's edge says the grid may be too narrow.".into(),
        figures,
        missing: None,
    })
}

/// Share of entries and final BPB by n-gram order and by phrase length.
async fn by_order_and_length(chains: &[&Built<'_>], sql: &SqlSession) -> Result<Section> {
    let mut by_order: [(Vec<Series>, Vec<Series>); 2] = Default::default();
    let mut queries = [String::new(), String::new()];
    for chain in chains {
        let Some(cache) = chain.inputs.get("cache") else {
            continue;
        };
        let total = chain
            .report()
            .get("entries")
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        for (slot, column) in ["ngram_order", "phrase_length"].into_iter().enumerate() {
            let query = format!(
                "SELECT m.{column} AS k, count(*) AS n, sum(s.bits) AS bits, sum(CAST(s.bytes AS BIGINT)) AS bytes \
                 FROM \"{}\".\"scores\" s JOIN \"{cache}\".\"matches\" m ON s.position = m.position \
                 GROUP BY m.{column} ORDER BY k",
                chain.node
            );
            let batches = sql.query(&query).await?;
            let k = floats(&batches, "k")?;
            let n = floats(&batches, "n")?;
            let bits = floats(&batches, "bits")?;
            let bytes = floats(&batches, "bytes")?;
            let name = format!("{} ({})", chain.node, chain.mode());
            let mut rate = Series {
                name: name.clone(),
                points: Vec::new(),
            };
            let mut bpb = Series {
                name,
                points: Vec::new(),
            };
            for i in 0..k.len() {
                let (Some(k), Some(n), Some(bits), Some(bytes)) = (k[i], n[i], bits[i], bytes[i])
                else {
                    continue;
                };
                rate.points.push((k, n / total.max(1.0)));
                if bytes > 0.0 {
                    bpb.points.push((k, bits / bytes));
                }
            }
            by_order[slot].0.push(rate);
            by_order[slot].1.push(bpb);
            queries[slot].push_str(&query);
            queries[slot].push_str(";\n");
        }
    }
    let mut figures = Vec::new();
    for (slot, (what, id)) in [("n-gram order", "ngram"), ("phrase length", "phrase")]
        .into_iter()
        .enumerate()
    {
        let (rates, bpbs) = &mut by_order[slot];
        if rates.iter().all(|s| s.points.is_empty()) {
            continue;
        }
        // A categorical axis of the orders (lengths) that occur: "none", 2, 3, … (16, 32, …).
        let mut present: Vec<f64> = rates
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .collect();
        present.sort_by(f64::total_cmp);
        present.dedup();
        let names: Vec<String> = present
            .iter()
            .map(|&k| {
                if k == 0.0 {
                    "none".to_string()
                } else {
                    format!("{k}")
                }
            })
            .collect();
        for series in rates.iter_mut().chain(bpbs.iter_mut()) {
            for point in &mut series.points {
                point.0 = present.iter().position(|&k| k == point.0).unwrap_or(0) as f64;
            }
        }
        let ticks = Some(names.as_slice());
        figures.push(Figure {
            id: format!("{id}-match-rate"),
            svg: plots::lines(
                &format!("Share of entries by {what}"),
                what,
                "share of entries",
                rates,
                ticks,
            )?,
            caption: format!("The {what} each entry's cache lookup settled on (none: no match), as a share of the chain's entries."),
            query: Some(queries[slot].clone()),
        });
        figures.push(Figure {
            id: format!("{id}-bpb"),
            svg: plots::lines(
                &format!("Final BPB by {what}"),
                what,
                "bits per byte",
                bpbs,
                ticks,
            )?,
            caption: format!(
                "Final bits per byte of the entries at each {what}: where the cache pays."
            ),
            query: Some(queries[slot].clone()),
        });
    }
    Ok(Section {
        title: "By n-gram order and phrase length",
        intro: "How often each order or phrase length is the one used, and how many bits its entries cost after blending. In the reference mode high orders match almost everywhere on repeated text, because each position's own continuation is in the tables.".into(),
        figures,
        missing: None,
    })
}

/// Training loss and validation-BPB curves of every trained model.
async fn training_curves(models: &[&Built<'_>], sql: &SqlSession) -> Result<Section> {
    let mut loss = Vec::new();
    let mut val = Vec::new();
    // One query per series; the caption shows them all.
    let mut queries = String::new();
    for model in models {
        let query = format!(
            "SELECT step, loss, val_bpb FROM \"{}\".\"train_log\" ORDER BY step",
            model.node
        );
        let batches = sql.query(&query).await?;
        queries.push_str(&query);
        queries.push_str(";\n");
        let step = floats(&batches, "step")?;
        let l = floats(&batches, "loss")?;
        let v = floats(&batches, "val_bpb")?;
        loss.push(Series {
            name: model.node.to_string(),
            points: step
                .iter()
                .zip(&l)
                .filter_map(|(s, l)| Some(((*s)?, (*l)?)))
                .collect(),
        });
        val.push(Series {
            name: model.node.to_string(),
            points: step
                .iter()
                .zip(&v)
                .filter_map(|(s, v)| Some(((*s)?, (*v)?)))
                .collect(),
        });
    }
    let mut figures = Vec::new();
    if !loss.is_empty() {
        figures.push(Figure {
            id: "training-loss".into(),
            svg: plots::lines(
                "Training loss",
                "step",
                "train loss (nats per token)",
                &loss,
                None,
            )?,
            caption: "Cross-entropy of each training batch, per step, for every trained model."
                .into(),
            query: Some(queries.clone()),
        });
        if val.iter().any(|s| !s.points.is_empty()) {
            figures.push(Figure {
                id: "training-val-bpb".into(),
                svg: plots::lines(
                    "Validation BPB while training",
                    "step",
                    "bits per byte",
                    &val,
                    None,
                )?,
                caption: "The EMA weights' BPB on the validation sample at every val_every steps."
                    .into(),
                query: Some(queries),
            });
        }
    }
    Ok(Section {
        title: "Training",
        intro: "The GPT's loss curve (one line per seed in a multi-seed run).".into(),
        missing: figures.is_empty().then(|| "No trained model is built in this pipeline (pass-1 uses a bigram or an imported table).".into()),
        figures,
    })
}

/// The implied-mass distribution of every audit-mass node.
async fn implied_mass(audits: &[&Built<'_>], sql: &SqlSession) -> Result<Section> {
    let mut masses = Vec::new();
    let mut queries = String::new();
    for audit in audits {
        let query = format!("SELECT mass FROM \"{}\".\"mass\"", audit.node);
        let batches = sql.query(&query).await?;
        queries.push_str(&query);
        queries.push_str(";\n");
        masses.push(Series {
            name: format!("{} ({})", audit.node, audit.mode()),
            points: floats(&batches, "mass")?
                .into_iter()
                .flatten()
                .map(|m| (0.0, m))
                .collect(),
        });
    }
    let mut figures = Vec::new();
    if !masses.is_empty() {
        figures.push(Figure {
            id: "implied-mass".into(),
            svg: plots::log_histogram("Implied mass Σ_v p(v)", "Σ_v p(v) (log scale)", &masses)?,
            caption: "At the sampled positions, every candidate token's final probability summed. A distribution sums to 1; the reference mode's sums are why its BPB is not a compression rate.".into(),
            query: Some(queries),
        });
    }
    Ok(Section {
        title: "Implied mass",
        intro: "The audit-mass nodes evaluate each mode's probability for all 1,024 candidates at a seeded sample of positions.".into(),
        missing: figures.is_empty().then(|| "No audit-mass node is built in this pipeline.".into()),
        figures,
    })
}

fn render<'a>(
    pipeline: &Pipeline,
    chains: &[&'a Built<'a>],
    audit_of: &dyn Fn(&Built) -> Option<&'a Built<'a>>,
    seed_rows: &[SeedRow],
    sections: &[Section],
) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>cachemoney report: {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>cachemoney report</h1>\n<p class=\"meta\">pipeline <code>{}</code> · cachemoney {} · every figure names the artifacts it read (content hashes) and the SQL it ran; <code>cachemoney sql</code> reruns it.</p>\n",
        escape(&pipeline.path.display().to_string()),
        escape(&pipeline.path.display().to_string()),
        env!("CARGO_PKG_VERSION"),
    );
    html.push_str("<h2>Summary</h2>\n<table class=\"summary\">\n<tr><th>chain</th><th>mode</th><th>pass-1</th><th>neural</th><th>after n-gram</th><th>final</th><th>alpha_high</th><th>entropy_thresh</th><th>mass mean</th><th>renormalised BPB</th></tr>\n");
    let cell =
        |v: Option<f64>, digits: usize| v.map_or("–".to_string(), |x| format!("{x:.digits$}"));
    for chain in chains {
        let audit = audit_of(chain);
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(chain.node),
            escape(&chain.mode()),
            escape(chain.inputs.get("pass1").map_or("?", String::as_str)),
            cell(chain.number("neural_bpb"), 4),
            cell(chain.number("ngram_bpb"), 4),
            cell(chain.number("final_bpb"), 4),
            cell(chain.number("alpha_high"), 2),
            cell(chain.number("entropy_thresh"), 2),
            cell(audit.and_then(|a| a.number("mass_mean")), 4),
            cell(audit.and_then(|a| a.number("normalised_sample_bpb")), 4),
        );
    }
    html.push_str("</table>\n");
    if !seed_rows.is_empty() {
        let seeds = &pipeline.seeds;
        html.push_str("<h2>Seeds</h2>\n<p>Each metric per run seed, with the mean and sample standard deviation (the <code>seeds</code> table).</p>\n<table>\n<tr><th>node</th><th>metric</th>");
        for seed in seeds {
            let _ = write!(html, "<th>{seed}</th>");
        }
        html.push_str("<th>mean</th><th>std</th></tr>\n");
        for group in seed_rows.chunk_by(|a, b| a.node == b.node && a.metric == b.metric) {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td>",
                escape(&group[0].node),
                escape(&group[0].metric)
            );
            for seed in seeds {
                let v = group
                    .iter()
                    .find(|r| r.seed == Some(*seed))
                    .and_then(|r| r.value);
                let _ = write!(html, "<td>{}</td>", cell(v, 6));
            }
            for kind in ["mean", "std"] {
                let v = group.iter().find(|r| r.kind == kind).and_then(|r| r.value);
                let _ = write!(html, "<td>{}</td>", cell(v, 6));
            }
            html.push_str("</tr>\n");
        }
        html.push_str("</table>\n");
    }
    for section in sections {
        let _ = writeln!(
            html,
            "<h2>{}</h2>\n<p>{}</p>",
            escape(section.title),
            escape(&section.intro)
        );
        if let Some(missing) = &section.missing {
            let _ = writeln!(html, "<p class=\"missing\">{}</p>", escape(missing));
        }
        html.push_str("<div class=\"row\">\n");
        for figure in &section.figures {
            let _ = write!(
                html,
                "<figure class=\"plot\" id=\"{}\">\n{}\n<figcaption>{}",
                escape(&figure.id),
                strip_xml_declaration(&figure.svg),
                escape(&figure.caption)
            );
            if let Some(query) = &figure.query {
                let _ = write!(
                    html,
                    "<details><summary>SQL</summary><pre>{}</pre></details>",
                    escape(query)
                );
            }
            html.push_str("</figcaption>\n</figure>\n");
        }
        html.push_str("</div>\n");
    }
    html.push_str("</body>\n</html>\n");
    html
}

/// Inline SVG in HTML takes no XML declaration.
fn strip_xml_declaration(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(start) => &svg[start..],
        None => svg,
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A column of every batch as f64 (integers and floats cast), nulls as `None`.
fn floats(batches: &[RecordBatch], name: &str) -> Result<Vec<Option<f64>>> {
    let mut out = Vec::new();
    for batch in batches {
        let column = batch
            .column_by_name(name)
            .with_context(|| format!("query result has no column '{name}'"))?;
        let column = arrow::compute::cast(column, &DataType::Float64)?;
        let column = column.as_primitive::<Float64Type>();
        out.extend((0..column.len()).map(|i| column.is_valid(i).then(|| column.value(i))));
    }
    Ok(out)
}

fn bools(batches: &[RecordBatch], name: &str) -> Result<Vec<bool>> {
    let mut out = Vec::new();
    for batch in batches {
        let column = batch
            .column_by_name(name)
            .with_context(|| format!("query result has no column '{name}'"))?;
        let column = arrow::compute::cast(column, &DataType::Boolean)?;
        let column = column.as_boolean();
        out.extend((0..column.len()).map(|i| column.is_valid(i) && column.value(i)));
    }
    Ok(out)
}

/// Writes the page next to its final name and renames it into place, so a reader never
/// sees half a report.
pub fn write(path: &Path, html: &str) -> Result<()> {
    let tmp = path.with_extension(format!("html.tmp-{}", std::process::id()));
    std::fs::write(&tmp, html).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))
}

const STYLE: &str = "
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.meta, figcaption, .missing { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
.summary td:nth-child(3), .summary th:nth-child(3) { text-align: left; }
.row { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; width: min-content; }
figure svg { display: block; }
pre { white-space: pre-wrap; font-size: 0.85em; background: #f6f6f6; padding: 0.5em; }
";
