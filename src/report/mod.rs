//! `cachemoney report`: one self-contained HTML page of figures over the built artifacts.
//!
//! Every figure is drawn from the same tables a user can query (`cachemoney sql`): the
//! page prints the query beside each figure and the content hash of every artifact it
//! read, so a figure is as traceable as a number. The page is static (inline SVG and CSS,
//! no script, nothing fetched), so it can be mailed, archived or opened offline.

mod html;
mod orders;
pub mod plots;

pub use html::write;

use anyhow::{anyhow, Context, Result};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type};

use crate::chain::{Chain, Products};
use crate::pipeline::Pipeline;
use crate::recipe::short;
use crate::registry::Registry;
use crate::runner::{NodeState, Resolved};
use crate::seeds::SeedRow;
use crate::sql::SqlSession;
use crate::store::{Manifest, Store};
use cache::stages::{MassReport, Pass2Summary};
use plots::{GridCell, Series};
use stage_api::products::{GRID, LEGALITY, MASS, MATCHES, SCORES, TRAIN_LOG};
use stage_api::Read;
use tilt::TiltReport;

/// A built node and what its manifest says.
struct Built<'a> {
    node: &'a str,
    manifest: Manifest,
    /// Set when the node ends a chain (produces `scores`, or tilts a pass-1).
    chain: Option<Chain>,
    /// A tilt chain's mode, `tilt (KERNEL)`.
    tilt: Option<String>,
    /// A pass2 node's report, typed (read once: the steps, the table and the by-order
    /// section all read it).
    pass2: Option<Pass2Summary>,
}

impl Built<'_> {
    /// The chain's pass-1 node.
    fn pass1(&self) -> &str {
        self.chain
            .as_ref()
            .and_then(|c| c.pass1.as_deref())
            .unwrap_or("?")
    }
    fn cache(&self) -> Option<&str> {
        self.chain.as_ref().and_then(|c| c.cache.as_deref())
    }
    fn calibration(&self) -> Option<&str> {
        self.chain.as_ref().and_then(|c| c.calibration.as_deref())
    }
    fn pass2(&self) -> Option<&Pass2Summary> {
        self.pass2.as_ref()
    }
    /// An audit-mass node's report, typed.
    fn mass(&self) -> Option<MassReport> {
        MassReport::from_report(&self.manifest.report)
    }
    /// (neural, after the n-gram step, final) BPB. A tilt chain's report is a pass-1's:
    /// its n-gram step is the tilt, and there is no phrase step.
    fn steps(&self) -> (Option<f64>, Option<f64>, Option<f64>) {
        if self.tilt.is_some() {
            return match TiltReport::from_report(&self.manifest.report) {
                Some(r) => (Some(r.bpb_before), Some(r.neural_bpb), Some(r.neural_bpb)),
                None => (None, None, None),
            };
        }
        match self.pass2() {
            Some(s) => (Some(s.neural_bpb), Some(s.ngram_bpb), Some(s.final_bpb)),
            None => (None, None, None),
        }
    }
    /// The cache mode of a pass2 or audit-mass node (both report theirs, typed), or a
    /// tilt chain's label.
    fn mode(&self) -> String {
        #[derive(serde::Deserialize)]
        struct Moded {
            mode: cache::Mode,
        }
        if let Some(tilt) = &self.tilt {
            return tilt.clone();
        }
        match stage_api::report_fields::<Moded>(&self.manifest.report) {
            Some(Moded { mode }) => serde_json::to_value(mode)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            None => "?".to_string(),
        }
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

/// What the page reads by SQL, declared: checked at load against the products
/// ([`stage_api::products`]), whose columns every producer declares, so a producer that
/// renames one fails the check, naming the column, rather than a figure.
const READS: &[Read] = &[
    GRID.read(&[
        "rank",
        "alpha_high",
        "entropy_thresh",
        "objective_nats",
        "chosen",
    ]),
    SCORES.read(&["position", "bits", "bytes"]),
    MATCHES.read(&["position", "ngram_order", "phrase_length"]),
    TRAIN_LOG.read(&["step", "loss", "val_bpb"]),
    MASS.read(&["mass"]),
    LEGALITY.read(&["chain", "probe", "verdict"]),
];

/// Builds the page. `seed_rows` is the `seeds` table when the pipeline runs several seeds.
pub async fn build(
    pipeline: &Pipeline,
    registry: &Registry,
    store: &Store,
    resolved: &[Resolved],
    sql: &SqlSession,
    seed_rows: &[SeedRow],
) -> Result<(String, usize)> {
    registry
        .check_sql_reads(READS)
        .map_err(|problem| anyhow!("report: the page's queries: {problem}"))?;
    let products = Products::new(pipeline);
    let mut all_chains = products.chains();
    all_chains.extend(products.tilts());
    let mut built: Vec<Built> = Vec::new();
    for r in resolved {
        if let (NodeState::Cached { .. }, Some(recipe)) = (&r.state, &r.recipe) {
            if let Some(manifest) = store.manifest(&r.stage, recipe)? {
                let node = pipeline.node(&r.node)?;
                let chain = all_chains.iter().find(|c| c.scores == node.name).cloned();
                built.push(Built {
                    node: &node.name,
                    pass2: Pass2Summary::from_report(&manifest.report),
                    manifest,
                    tilt: chain.as_ref().and_then(|c| c.tilt_mode(pipeline)),
                    chain,
                });
            }
        }
    }
    let producing = |product: &str| -> Vec<&Built> {
        let names: Vec<&str> = products
            .producers(product)
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        built.iter().filter(|b| names.contains(&b.node)).collect()
    };
    let chains: Vec<&Built> = built.iter().filter(|b| b.chain.is_some()).collect();
    if chains.is_empty() {
        return Err(crate::chain::none_built(pipeline));
    }
    let audits = producing(MASS.name);
    let audit_of = |chain: &Built| {
        let audit = chain.chain.as_ref()?.audit.as_deref()?;
        audits.iter().find(|a| a.node == audit).copied()
    };

    let sections = vec![
        waterfalls(&chains)?,
        calibration_grids(&chains, &built, sql).await?,
        orders::by_order_and_length(&chains, sql).await?,
        training_curves(&producing(TRAIN_LOG.name), sql).await?,
        implied_mass(&audits, sql).await?,
        legality(&producing(LEGALITY.name), sql).await?,
    ];

    let figures: usize = sections.iter().map(|s| s.figures.len()).sum();
    Ok((
        html::render(pipeline, &chains, &audit_of, seed_rows, &sections),
        figures,
    ))
}

/// The BPB waterfall of every chain, on one scale.
fn waterfalls(chains: &[&Built]) -> Result<Section> {
    let top = chains
        .iter()
        .filter_map(|c| c.steps().0)
        .fold(0f64, f64::max)
        * 1.15;
    let mut figures = Vec::new();
    for chain in chains {
        let (Some(neural), Some(ngram), Some(fin)) = chain.steps() else {
            continue;
        };
        let title = format!("{} ({})", chain.node, chain.mode());
        let steps = match chain.tilt {
            Some(_) => format!("neural {neural:.4} → tilted {fin:.4} BPB"),
            None => format!("neural {neural:.4} → after n-gram {ngram:.4} → final {fin:.4} BPB"),
        };
        figures.push(Figure {
            id: format!("waterfall-{}", chain.node),
            svg: plots::waterfall(&title, neural, ngram, fin, top.max(0.1))?,
            caption: format!(
                "{}: {steps}; pass-1 '{}', content {}",
                chain.node,
                chain.pass1(),
                short(&chain.manifest.content_hash)
            ),
            query: None,
        });
    }
    Ok(Section {
        title: "BPB waterfall per chain",
        intro: "Bits per byte of the model alone, the change the n-gram blend makes, the change the phrase blend makes, and the final figure (green: fewer bits); for a tilt chain, the model alone and the change the tilt makes. Same y scale for every chain. Only a causal-normalised chain's number and a tilt chain's are real compression rates; the others' distributions do not sum to 1 (see the implied mass below).".into(),
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
            .calibration()
            .and_then(|c| built.iter().find(|b| b.node == c))
        else {
            continue;
        };
        if seen.contains(&calibration.node) {
            continue;
        }
        seen.push(calibration.node);
        let query = format!(
            "SELECT alpha_high, entropy_thresh, objective_nats, chosen FROM \"{}\".\"{}\" WHERE rank = 0",
            calibration.node, GRID.name
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
                    "{}: mean nats per entry on the calibration prefix (rank 0's, when calibrated per rank) at each grid point; chosen (red) alpha_high {} and entropy_thresh {} ({:.4} nats); content {}",
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

/// Training loss and validation-BPB curves of every trained model.
async fn training_curves(models: &[&Built<'_>], sql: &SqlSession) -> Result<Section> {
    let mut loss = Vec::new();
    let mut val = Vec::new();
    // One query per series; the caption shows them all.
    let mut queries = String::new();
    for model in models {
        let query = format!(
            "SELECT step, loss, val_bpb FROM \"{}\".\"{}\" ORDER BY step",
            model.node, TRAIN_LOG.name
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
        let query = format!("SELECT mass FROM \"{}\".\"{}\"", audit.node, MASS.name);
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

/// The legality probes' verdicts on every chain, as one matrix.
async fn legality(judges: &[&Built<'_>], sql: &SqlSession) -> Result<Section> {
    let (mut chains, mut probes, mut cells) = (Vec::new(), Vec::new(), Vec::new());
    let mut queries = String::new();
    for judge in judges {
        let query = format!(
            "SELECT chain, probe, verdict FROM \"{}\".\"{}\"",
            judge.node, LEGALITY.name
        );
        for batch in sql.query(&query).await? {
            let text = |name: &str| -> Vec<String> {
                let column = batch.column_by_name(name).expect("declared");
                let column =
                    arrow::compute::cast(column, &arrow::datatypes::DataType::Utf8).expect("text");
                arrow::array::AsArray::as_string::<i32>(&column)
                    .iter()
                    .map(|v| v.unwrap_or("").to_string())
                    .collect()
            };
            for ((chain, probe), verdict) in text("chain")
                .into_iter()
                .zip(text("probe"))
                .zip(text("verdict"))
            {
                if !chains.contains(&chain) {
                    chains.push(chain.clone());
                }
                if !probes.contains(&probe) {
                    probes.push(probe.clone());
                }
                cells.push((chain, probe, verdict));
            }
        }
        queries.push_str(&query);
        queries.push_str(";\n");
    }
    let mut figures = Vec::new();
    if !cells.is_empty() {
        let verdict = |chain: &str, probe: &str| {
            cells
                .iter()
                .find(|(c, p, _)| c == chain && p == probe)
                .map_or("-".to_string(), |(_, _, v)| v.clone())
        };
        figures.push(Figure {
            id: "legality".into(),
            svg: plots::verdict_matrix(&chains, &probes, verdict)?,
            caption: "C1 prefix: every entry before a cut bit-identical when the stream after it is shuffled; C1 target: the distribution does not move when only its target changes; C2: distributions sum to 1; bytes: the chain's bytes are the challenge's rule. `cachemoney legality` prints the evidence behind each failure.".into(),
            query: Some(queries),
        });
    }
    Ok(Section {
        title: "Legality",
        intro: "The probes of the criteria the challenge's reviewers converged on, run on each chain as a black box (docs/legality.md).".into(),
        missing: figures.is_empty().then(|| "No legality node is built in this pipeline.".into()),
        figures,
    })
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
