//! A pipeline run once per run seed (`seeds = [...]`, `run --seeds`), as one DAG.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{anyhow, bail, Result};

use serde_json::Value;

use super::source::node_name_problem;
use super::{topological_order, Node, Pipeline, SeedVariant};
use crate::registry::Registry;

impl Pipeline {
    /// The pipeline run once per run seed, as one DAG: every node whose stage has a run
    /// seed ([`stage_api::StageSpec::run_seed_param`], the training seed) and everything
    /// downstream of one is copied per seed as `NODE_seedN`, with that seed set; nodes
    /// that do not depend on a run seed (tokenizing, the cache tables) stay single and
    /// shared. Content addressing does the rest: a seed whose copies were built before is
    /// reused, and the base seed's copy is the very artifact the plain pipeline builds.
    pub fn for_seeds(self, seeds: &[u64], registry: &Registry) -> Result<Pipeline> {
        if seeds.is_empty() {
            return Ok(self);
        }
        check_seeds(seeds).map_err(|e| anyhow!("--seeds: {e}"))?;
        let seed_param = |node: &Node| node.spec.run_seed_param;
        // Nodes are in topological order, so one sweep finds everything downstream.
        let mut seeded = BTreeSet::new();
        for node in &self.nodes {
            if seed_param(node).is_some() || node.inputs.values().any(|up| seeded.contains(up)) {
                seeded.insert(node.name.clone());
            }
        }
        if seeded.is_empty() {
            let with_seed: Vec<&str> = registry
                .kinds()
                .into_iter()
                .filter(|k| {
                    registry
                        .get(k)
                        .and_then(|s| s.spec().run_seed_param)
                        .is_some()
                })
                .collect();
            bail!(
                "{}: no node has a run seed to vary (stages with one: {}); --seeds needs one",
                self.path.display(),
                with_seed.join(", ")
            );
        }
        let variant_name = |name: &str, seed: u64| format!("{name}_seed{seed}");
        let mut nodes: Vec<Node> = self
            .nodes
            .iter()
            .filter(|n| !seeded.contains(&n.name))
            .cloned()
            .collect();
        for &seed in seeds {
            for node in self.nodes.iter().filter(|n| seeded.contains(&n.name)) {
                let name = variant_name(&node.name, seed);
                if let Some(problem) = node_name_problem(&name) {
                    bail!(
                        "{}: the copy of node '{}' for seed {seed}: {problem}",
                        self.path.display(),
                        node.name
                    );
                }
                if self.nodes.iter().any(|n| n.name == name) {
                    bail!(
                        "{}: node '{name}' clashes with the copy of '{}' for seed {seed}; rename it",
                        self.path.display(),
                        node.name
                    );
                }
                let mut params = node.params.clone();
                if let Some(key) = seed_param(node) {
                    params[key] = Value::from(seed);
                    params = registry
                        .get(&node.stage)
                        .expect("validated when loading")
                        .canonical_params(&params)
                        .map_err(|e| anyhow!("node '{name}': seed {seed}: {e}"))?;
                }
                let inputs = node
                    .inputs
                    .iter()
                    .map(|(input, up)| {
                        let up = if seeded.contains(up) {
                            variant_name(up, seed)
                        } else {
                            up.clone()
                        };
                        (input.clone(), up)
                    })
                    .collect();
                nodes.push(Node {
                    name,
                    stage: node.stage.clone(),
                    params,
                    spec: node.spec,
                    inputs,
                    files: node.files.clone(),
                    variant: Some(SeedVariant {
                        base: node.name.clone(),
                        seed,
                    }),
                    rerun: node.rerun.clone(),
                });
            }
        }
        let by_name: BTreeMap<String, Node> =
            nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
        let order = topological_order(&by_name).expect("copies keep the DAG acyclic");
        Ok(Pipeline {
            nodes: order.into_iter().map(|n| by_name[&n].clone()).collect(),
            seeds: seeds.to_vec(),
            ..self
        })
    }
}

pub(super) fn check_seeds(seeds: &[u64]) -> std::result::Result<(), String> {
    if seeds.is_empty() {
        return Err("the list is empty".into());
    }
    let distinct: BTreeSet<&u64> = seeds.iter().collect();
    if distinct.len() != seeds.len() {
        return Err(format!("{seeds:?} names a seed twice"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn for_seeds_copies_what_depends_on_the_training_seed_and_shares_the_rest() {
        let text = r#"
[nodes.tokens]
stage = "tokenize"
files.corpus = ["Cargo.toml"]
[nodes.model]
stage = "train"
inputs.tokens = "tokens"
[nodes.pass1]
stage = "pass1"
inputs.tokens = "tokens"
inputs.model = "model"
params.model = "gpt"
[nodes.cache]
stage = "cache"
inputs.tokens = "tokens"
[nodes.calibration]
stage = "calibrate"
inputs.pass1 = "pass1"
inputs.cache = "cache"
"#;
        let registry = Registry::with_builtin_stages();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipeline.toml");
        let pipeline = Pipeline::parse(&root, text, &registry).unwrap();
        let expanded = pipeline.for_seeds(&[7, 9], &registry).unwrap();
        let names: Vec<&str> = expanded.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "tokens",
                "cache",
                "model_seed7",
                "model_seed9",
                "pass1_seed7",
                "pass1_seed9",
                "calibration_seed7",
                "calibration_seed9"
            ]
        );
        let node = |name: &str| expanded.node(name).unwrap();
        assert_eq!(node("model_seed9").params["seed"], 9);
        assert_eq!(node("pass1_seed9").inputs["model"], "model_seed9");
        assert_eq!(node("pass1_seed9").inputs["tokens"], "tokens");
        assert_eq!(node("calibration_seed7").inputs["cache"], "cache");
        assert_eq!(
            node("calibration_seed7").variant,
            Some(SeedVariant {
                base: "calibration".into(),
                seed: 7
            })
        );
        assert_eq!(node("cache").variant, None);
        let copies: Vec<&str> = expanded
            .nodes_named("pass1")
            .unwrap()
            .iter()
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(copies, ["pass1_seed7", "pass1_seed9"]);
        assert!(expanded
            .ancestors_of("calibration")
            .unwrap()
            .contains("model_seed9"));
    }
}
