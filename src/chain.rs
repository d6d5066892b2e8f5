//! "The chain" a cachemoney number comes from: a pass-1 table, the cache's matches, the
//! calibrated blend, the per-entry scores, and the implied-mass audit of the same blend.
//!
//! `compare` and `report` both read chains. They find them from what the nodes' stages
//! declare they produce ([`stage_api::StageSpec::outputs`]), never from stage names: a
//! chain ends at a node that produces a `scores` table, and its other members are the
//! upstream nodes that produce the tables and files it was wired to. A new stage that
//! produces `scores` from the same inputs joins the comparison without a change here.
//!
//! A tilt chain ends instead at a pass-1 made from another pass-1 (a model on top of a
//! model, such as the n-gram tilt): `compare` shows it beside the cache chains, with the
//! node that produced its hints.

use stage_api::products::{CALIBRATION, HINTS, MASS, MATCHES, PASS1, SCORES};

use crate::pipeline::{Node, Pipeline};

/// The error of `compare` and `report` when no chain is built.
pub fn none_built(pipeline: &Pipeline) -> anyhow::Error {
    anyhow::anyhow!(
        "no chain of {} is built yet (no node that produces a scores table, such as a pass2 node); run `cachemoney run` first",
        pipeline.path.display()
    )
}

/// The nodes of one chain, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The node that produces `scores` (in the default pipeline, a `pass2` node).
    pub scores: String,
    /// Its input that produces `pass1`.
    pub pass1: Option<String>,
    /// Its input that produces `matches`.
    pub cache: Option<String>,
    /// Its input that produces `calibration.json`.
    pub calibration: Option<String>,
    /// A node that produces `mass` from the same pass-1, cache and calibration.
    pub audit: Option<String>,
    /// For a tilt chain: its input that produces `hints`.
    pub hints: Option<String>,
}

impl Chain {
    /// A tilt chain's mode, `tilt (KERNEL)` with its hints node's kernel; none for a
    /// cache chain, whose mode its report names.
    pub fn tilt_mode(&self, pipeline: &Pipeline) -> Option<String> {
        let hints = self.hints.as_ref()?;
        let kernel = pipeline
            .node(hints)
            .ok()
            .and_then(|n| n.params.get("kernel"))
            .and_then(|v| v.as_str())
            .unwrap_or("?");
        Some(format!("tilt ({kernel})"))
    }
}

/// What the nodes of a pipeline produce, from their declarations.
pub struct Products<'a> {
    pipeline: &'a Pipeline,
}

impl<'a> Products<'a> {
    pub fn new(pipeline: &'a Pipeline) -> Self {
        Products { pipeline }
    }

    /// Whether `node`'s stage declares an output (table or file) called `product`.
    pub fn produces(&self, node: &Node, product: &str) -> bool {
        node.spec.output(product).is_some()
    }

    /// The nodes that produce `product`, in run order; the re-runs the pipeline adds
    /// for the legality probes are not chains of their own.
    pub fn producers(&self, product: &str) -> Vec<&'a Node> {
        self.pipeline
            .nodes
            .iter()
            .filter(|n| n.rerun.is_none() && self.produces(n, product))
            .collect()
    }

    /// The upstream node wired into `node` that produces `product`.
    fn input_producing(&self, node: &Node, product: &str) -> Option<String> {
        node.inputs
            .values()
            .find(|up| {
                self.pipeline
                    .node(up)
                    .is_ok_and(|up| self.produces(up, product))
            })
            .cloned()
    }

    /// Every chain of the pipeline, in run order of their `scores` nodes.
    pub fn chains(&self) -> Vec<Chain> {
        self.producers(SCORES.name)
            .into_iter()
            .map(|node| {
                let member = |product| self.input_producing(node, product);
                let (pass1, cache, calibration) = (
                    member(PASS1.name),
                    member(MATCHES.name),
                    member(CALIBRATION.name),
                );
                let audit = self
                    .producers(MASS.name)
                    .into_iter()
                    .find(|a| {
                        let of = |product| self.input_producing(a, product);
                        calibration.is_some()
                            && of(CALIBRATION.name) == calibration
                            && of(MATCHES.name) == cache
                            && of(PASS1.name) == pass1
                    })
                    .map(|a| a.name.clone());
                Chain {
                    scores: node.name.clone(),
                    pass1,
                    cache,
                    calibration,
                    audit,
                    hints: None,
                }
            })
            .collect()
    }

    /// Every tilt chain, in run order: a node that produces `pass1` from an input that
    /// produces `pass1` (its `scores` is that node, its `pass1` the base).
    pub fn tilts(&self) -> Vec<Chain> {
        self.producers(PASS1.name)
            .into_iter()
            .filter_map(|node| {
                let base = self.input_producing(node, PASS1.name)?;
                Some(Chain {
                    scores: node.name.clone(),
                    pass1: Some(base),
                    cache: None,
                    calibration: None,
                    audit: None,
                    hints: self.input_producing(node, HINTS.name),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stage_api::products::TRAIN_LOG;

    #[test]
    fn chains_are_found_from_declared_outputs() {
        let registry = crate::registry::Registry::with_builtin_stages();
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipeline.toml"),
        )
        .unwrap();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipeline.toml");
        let pipeline = Pipeline::parse(&path, &text, &registry).unwrap();
        let chains = Products::new(&pipeline).chains();
        let mut names: Vec<&str> = chains.iter().map(|c| c.scores.as_str()).collect();
        names.sort();
        assert_eq!(names, ["scores", "scores_causal", "scores_normalised"]);
        assert_eq!(
            *chains.iter().find(|c| c.scores == "scores_causal").unwrap(),
            Chain {
                scores: "scores_causal".into(),
                pass1: Some("pass1".into()),
                cache: Some("cache_causal".into()),
                calibration: Some("calibration_causal".into()),
                audit: Some("mass_causal".into()),
                hints: None,
            }
        );
        let tilts = Products::new(&pipeline).tilts();
        assert_eq!(
            tilts.iter().map(|c| c.scores.as_str()).collect::<Vec<_>>(),
            ["tilt", "tilt_cachemoney"]
        );
        assert_eq!(tilts[1].pass1.as_deref(), Some("pass1_cachemoney"));
        assert_eq!(tilts[1].hints.as_deref(), Some("hints_cachemoney"));
        let trained: Vec<&str> = Products::new(&pipeline)
            .producers(TRAIN_LOG.name)
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(trained, ["model"]);
    }
}
