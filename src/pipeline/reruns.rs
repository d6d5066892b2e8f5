//! Re-runs of a chain on perturbed data, for stages that judge a chain by them (the
//! `legality` probes; see [`stage_api::Reruns`]).
//!
//! The copies are ordinary nodes, named `NODE_cutN`, so the runner builds, caches,
//! reuses and audits them like any other: a second `run` reuses every re-run, and a
//! re-run shared by two judges (the GPT's pass-1 under three cache modes) is built once.
//! Nothing here knows what a chain computes: its members are the nodes that produce
//! what the judging stage's declaration names, and its source is where they read the
//! table the perturbing stage replaces.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::source::node_name_problem;
use super::{Node, Rerun};
use crate::registry::Registry;

/// A problem with a judging node, reported at its table in `pipeline.toml`.
pub struct Problem {
    pub node: String,
    pub message: String,
}

/// Adds the re-runs every judging node asks for and wires them in. Returns whether it
/// added anything, and the secret the judges were given (if any asked for one): it also
/// orders the runs. Cuts with equal parameters share a number across judges. `secret`
/// is asked for only when a judge leaves its secret parameter empty.
pub fn add_reruns(
    nodes: &mut BTreeMap<String, Node>,
    registry: &Registry,
    secret: &mut dyn FnMut() -> Result<String, String>,
) -> Result<(bool, Option<String>), Problem> {
    let mut salt = None;
    let spec_of = |n: &Node| n.spec;
    let judges: Vec<String> = nodes
        .values()
        .filter(|n| spec_of(n).reruns.is_some())
        .map(|n| n.name.clone())
        .collect();
    // A cut's number names its copies: equal parameters and guides, one copy.
    let mut numbered_cuts: Vec<(Value, BTreeMap<String, String>)> = Vec::new();
    let mut secret_seeded: BTreeSet<String> = BTreeSet::new();
    for judge_name in &judges {
        let mut judge = nodes[judge_name].clone();
        let reruns = spec_of(&judge).reruns.expect("filtered");
        let problem = |message: String| Problem {
            node: judge_name.clone(),
            message,
        };
        let produces = |n: &Node, product: &str| spec_of(n).output(product).is_some();
        let is_member = |n: &Node| reruns.members.iter().any(|m| produces(n, m));
        let guide_inputs = reruns.guides.iter().map(|(_, input)| input);
        for wired in reruns.wired_as.iter().chain(guide_inputs) {
            if judge.inputs.contains_key(*wired) {
                return Err(problem(format!(
                    "inputs.{wired} is wired by the pipeline (one re-run per entry of params.{}); remove it",
                    reruns.param
                )));
            }
        }
        let end_name = judge
            .inputs
            .get(reruns.input)
            .ok_or_else(|| problem(format!("needs inputs.{}", reruns.input)))?;
        let end = &nodes[end_name];
        if !is_member(end) {
            return Err(problem(format!(
                "inputs.{} names node '{end_name}' ({}), which produces none of {}",
                reruns.input,
                end.stage,
                reruns.members.join(", ")
            )));
        }
        // The chain: the end and everything upstream of it that is a member.
        let mut members = BTreeSet::from([end_name.clone()]);
        let mut frontier = vec![end_name.clone()];
        while let Some(name) = frontier.pop() {
            for up in nodes[&name].inputs.values() {
                if is_member(&nodes[up]) && members.insert(up.clone()) {
                    frontier.push(up.clone());
                }
            }
        }
        let sources: BTreeSet<&String> = members
            .iter()
            .flat_map(|m| nodes[m].inputs.values())
            .filter(|up| !members.contains(*up) && produces(&nodes[*up], reruns.source_table))
            .collect();
        let source = match sources.into_iter().collect::<Vec<_>>()[..] {
            [one] => one.clone(),
            [] => {
                return Err(problem(format!(
                    "the chain ending at '{end_name}' reads no {} table, so there is nothing to perturb",
                    reruns.source_table
                )))
            }
            ref many => {
                let names: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
                return Err(problem(format!(
                    "the chain ending at '{end_name}' reads {} from several nodes ({}); a re-run perturbs one",
                    reruns.source_table,
                    names.join(", ")
                )));
            }
        };
        for (input, up) in &judge.inputs {
            if input != reruns.input && up != &source && produces(&nodes[up], reruns.source_table) {
                return Err(problem(format!(
                    "inputs.{input} is '{up}', but the chain reads {} from '{source}': judge it on the same tokens",
                    reruns.source_table
                )));
            }
        }
        let judge_secret = match reruns.secret_param {
            Some(param) => {
                let given = judge.params[param].as_str().unwrap_or("").to_string();
                let value = if given.is_empty() {
                    secret().map_err(&problem)?
                } else {
                    given
                };
                judge.params[param] = Value::from(value.clone());
                salt.get_or_insert_with(|| value.clone());
                Some(value)
            }
            None => None,
        };
        // Seeds a scorer could compute from pipeline.toml, mixed with the secret (once per
        // node, before anything inherits them or is copied from them).
        if let Some(value) = &judge_secret {
            for (product, param) in reruns.secret_seeds {
                let seeded: Vec<String> = members
                    .iter()
                    .filter(|m| produces(&nodes[*m], product) && !secret_seeded.contains(*m))
                    .cloned()
                    .collect();
                for member in seeded {
                    let node = nodes.get_mut(&member).expect("a member");
                    if let Some(seed) = node.params.get(*param).and_then(Value::as_u64) {
                        node.params[*param] = Value::from(secret_seed(value, param, seed));
                    }
                    secret_seeded.insert(member);
                }
            }
        }
        let mut cuts = judge.params[reruns.param]
            .as_array()
            .cloned()
            .unwrap_or_default();
        // What every entry takes from the judge and from the chain's members.
        for cut in &mut cuts {
            let Some(entry) = cut.as_object_mut() else {
                continue;
            };
            if let Some(value) = &judge_secret {
                entry.insert("secret".into(), Value::from(value.clone()));
            }
            for (product, param, as_param) in reruns.inherit {
                if entry.get(*as_param).is_some_and(|v| !v.is_null()) {
                    continue;
                }
                // From the first member producing the product that has the parameter (a
                // tilt chain has two pass-1 producers; only one has `mass_sample`). A
                // parameter every member leaves out (an optional one, absent from its
                // canonical form) is left out of the entry too.
                let value = members
                    .iter()
                    .filter(|m| produces(&nodes[*m], product))
                    .find_map(|m| nodes[m].params.get(*param));
                if let Some(value) = value {
                    entry.insert(as_param.to_string(), value.clone());
                }
            }
        }
        // The member that produces the companion product, when it is not the end.
        let companion = reruns.companion.and_then(|(product, input, copies)| {
            let member = members
                .iter()
                .find(|m| *m != end_name && produces(&nodes[*m], product))?;
            Some((member.clone(), input, copies))
        });
        if cuts.len() > reruns.wired_as.len() {
            return Err(problem(format!(
                "params.{}: {} entries; at most {}",
                reruns.param,
                cuts.len(),
                reruns.wired_as.len()
            )));
        }
        // The originals that aim the re-runs, wired into every perturbing node and the judge.
        let guides: BTreeMap<String, String> = reruns
            .guides
            .iter()
            .filter_map(|(product, input)| {
                let member = members.iter().find(|m| produces(&nodes[*m], product))?;
                Some((input.to_string(), member.clone()))
            })
            .collect();
        let perturbing = registry.get(reruns.stage).expect("a registered stage");
        let mut wired = BTreeMap::new();
        for (i, cut) in cuts.iter().enumerate() {
            let params = perturbing
                .canonical_params(cut)
                .map_err(|e| problem(format!("params.{}[{i}]: {e}", reruns.param)))?;
            let key = (params.clone(), guides.clone());
            let number = match numbered_cuts.iter().position(|c| *c == key) {
                Some(at) => at + 1,
                None => {
                    numbered_cuts.push(key);
                    numbered_cuts.len()
                }
            };
            let copy_name = |base: &str| format!("{base}_cut{number}");
            let perturbed_source = copy_name(&source);
            let first_input = perturbing
                .spec()
                .inputs
                .first()
                .expect("a perturbing stage declares the input it perturbs")
                .name;
            add(
                nodes,
                judge_name,
                Node {
                    name: perturbed_source.clone(),
                    stage: reruns.stage.to_string(),
                    params,
                    spec: perturbing.spec(),
                    inputs: guides
                        .clone()
                        .into_iter()
                        .chain([(first_input.to_string(), source.clone())])
                        .collect(),
                    files: BTreeMap::new(),
                    variant: None,
                    rerun: Some(Rerun {
                        base: source.clone(),
                        number,
                        source: true,
                    }),
                },
            )?;
            for member in &members {
                let original = nodes[member].clone();
                let inputs = original
                    .inputs
                    .iter()
                    .map(|(input, up)| {
                        let up = if members.contains(up) {
                            copy_name(up)
                        } else if *up == source {
                            perturbed_source.clone()
                        } else {
                            up.clone()
                        };
                        (input.clone(), up)
                    })
                    .collect();
                add(
                    nodes,
                    judge_name,
                    Node {
                        name: copy_name(member),
                        inputs,
                        rerun: Some(Rerun {
                            base: member.clone(),
                            number,
                            source: false,
                        }),
                        ..original
                    },
                )?;
            }
            wired.insert(reruns.wired_as[i].to_string(), copy_name(end_name));
            if let Some((member, _, copies)) = &companion {
                wired.insert(copies[i].to_string(), copy_name(member));
            }
        }
        if let Some((member, input, _)) = &companion {
            wired.insert(input.to_string(), member.clone());
        }
        wired.extend(guides);
        // The judge reads the entries as its re-runs were made from them.
        judge.params[reruns.param] = Value::Array(cuts.clone());
        let params = judge.params.clone();
        let judge = nodes.get_mut(judge_name).expect("exists");
        judge.params = params;
        judge.inputs.extend(wired);
        if let Some(label) = reruns.label_param {
            if judge.params[label].as_str() == Some("") {
                judge.params[label] = Value::from(end_name.as_str());
            }
        }
    }
    Ok((!judges.is_empty(), salt))
}

/// A seed mixed with the judge's secret: blake3 of both, 63 bits (a seed parameter is
/// an unsigned integer everywhere, and stays exact as a float-free JSON number).
fn secret_seed(secret: &str, param: &str, seed: u64) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"cachemoney secret seed\0");
    hasher.update(secret.as_bytes());
    hasher.update(b"\0");
    hasher.update(param.as_bytes());
    hasher.update(&seed.to_le_bytes());
    let bytes: [u8; 8] = hasher.finalize().as_bytes()[..8]
        .try_into()
        .expect("8 bytes");
    u64::from_le_bytes(bytes) >> 1
}

/// Adds a re-run node, once: the same copy serves every judge whose chain has it.
fn add(nodes: &mut BTreeMap<String, Node>, judge: &str, node: Node) -> Result<(), Problem> {
    let problem = |message: String| Problem {
        node: judge.to_string(),
        message,
    };
    if let Some(why) = node_name_problem(&node.name) {
        return Err(problem(format!(
            "the re-run copy of '{}': {why}",
            node.name
        )));
    }
    match nodes.get(&node.name) {
        Some(existing) if existing.rerun.is_none() => Err(problem(format!(
            "node '{}' clashes with the name of a re-run copy; rename it",
            node.name
        ))),
        Some(_) => Ok(()),
        None => {
            nodes.insert(node.name.clone(), node);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
