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
use stage_api::Reruns;

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
    let judges: Vec<String> = nodes
        .values()
        .filter(|n| n.spec.reruns.is_some())
        .map(|n| n.name.clone())
        .collect();
    let mut numbering = CutNumbers::default();
    let mut secret_seeded: BTreeSet<String> = BTreeSet::new();
    for judge_name in &judges {
        let mut judge = nodes[judge_name].clone();
        let reruns = judge.spec.reruns.as_ref().expect("filtered");
        let problem = |message: String| Problem {
            node: judge_name.clone(),
            message,
        };
        let chain = Chain::judged_by(nodes, &judge, reruns).map_err(problem)?;
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
        if let Some(value) = &judge_secret {
            seed_with_secret(nodes, reruns, &chain, value, &mut secret_seeded);
        }
        let cuts =
            cut_entries(nodes, &judge, reruns, &chain, judge_secret.as_deref()).map_err(problem)?;
        let wired = add_copies(
            nodes,
            registry,
            judge_name,
            reruns,
            &chain,
            &cuts,
            &mut numbering,
        )?;
        // The judge reads the entries as its re-runs were made from them.
        judge.params[reruns.param] = Value::Array(cuts);
        let node = nodes.get_mut(judge_name).expect("exists");
        node.params = judge.params;
        node.inputs.extend(wired);
        if let Some(label) = reruns.label_param {
            if node.params[label].as_str() == Some("") {
                node.params[label] = Value::from(chain.end.as_str());
            }
        }
    }
    Ok((!judges.is_empty(), salt))
}

/// Whether `node` produces `product`.
fn produces(node: &Node, product: &str) -> bool {
    node.spec.output(product).is_some()
}

/// The chain a judge judges: its end (the judged input's node), the members upstream of
/// it that produce what the judge names, and the one node they read the source table
/// from (the table a re-run perturbs).
struct Chain {
    end: String,
    members: BTreeSet<String>,
    source: String,
}

impl Chain {
    fn judged_by(
        nodes: &BTreeMap<String, Node>,
        judge: &Node,
        reruns: &Reruns,
    ) -> Result<Chain, String> {
        let is_member = |n: &Node| reruns.members.iter().any(|m| produces(n, m));
        // What the spec declares `by_pipeline` (the registry's tests hold it to the
        // re-runs' wiring) is the pipeline's to connect, never the user's.
        let wired_here = judge.spec.inputs.iter().filter(|i| i.by_pipeline);
        if let Some(wired) = wired_here
            .map(|i| i.name)
            .find(|n| judge.inputs.contains_key(*n))
        {
            return Err(format!(
                "inputs.{wired} is wired by the pipeline (one re-run per entry of params.{}); remove it",
                reruns.param
            ));
        }
        let end_name = judge
            .inputs
            .get(reruns.input)
            .ok_or_else(|| format!("needs inputs.{}", reruns.input))?;
        let end = &nodes[end_name];
        if !is_member(end) {
            return Err(format!(
                "inputs.{} names node '{end_name}' ({}), which produces none of {}",
                reruns.input,
                end.stage,
                reruns.members.join(", ")
            ));
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
                return Err(format!(
                    "the chain ending at '{end_name}' reads no {} table, so there is nothing to perturb",
                    reruns.source_table
                ))
            }
            ref many => {
                let names: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
                return Err(format!(
                    "the chain ending at '{end_name}' reads {} from several nodes ({}); a re-run perturbs one",
                    reruns.source_table,
                    names.join(", ")
                ));
            }
        };
        for (input, up) in &judge.inputs {
            if input != reruns.input && up != &source && produces(&nodes[up], reruns.source_table) {
                return Err(format!(
                    "inputs.{input} is '{up}', but the chain reads {} from '{source}': judge it on the same tokens",
                    reruns.source_table
                ));
            }
        }
        Ok(Chain {
            end: end_name.clone(),
            members,
            source,
        })
    }

    /// The first member that produces `product`, and is not `except`.
    fn member_producing<'a>(
        &'a self,
        nodes: &BTreeMap<String, Node>,
        product: &str,
        except: Option<&str>,
    ) -> Option<&'a String> {
        self.members
            .iter()
            .find(|m| Some(m.as_str()) != except && produces(&nodes[*m], product))
    }
}

/// Seeds a scorer could compute from pipeline.toml, mixed with the secret (once per
/// node, before anything inherits them or is copied from them).
fn seed_with_secret(
    nodes: &mut BTreeMap<String, Node>,
    reruns: &Reruns,
    chain: &Chain,
    secret: &str,
    secret_seeded: &mut BTreeSet<String>,
) {
    for (product, param) in reruns.secret_seeds {
        let seeded: Vec<String> = chain
            .members
            .iter()
            .filter(|m| produces(&nodes[*m], product) && !secret_seeded.contains(*m))
            .cloned()
            .collect();
        for member in seeded {
            let node = nodes.get_mut(&member).expect("a member");
            if let Some(seed) = node.params.get(*param).and_then(Value::as_u64) {
                node.params[*param] = Value::from(secret_seed(secret, param, seed));
            }
            secret_seeded.insert(member);
        }
    }
}

/// The judge's entries, each with what it takes from the judge (the secret) and from
/// the chain's members (the parameters the perturbing stage inherits).
fn cut_entries(
    nodes: &BTreeMap<String, Node>,
    judge: &Node,
    reruns: &Reruns,
    chain: &Chain,
    secret: Option<&str>,
) -> Result<Vec<Value>, String> {
    let mut cuts = judge.params[reruns.param]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for cut in &mut cuts {
        let Some(entry) = cut.as_object_mut() else {
            continue;
        };
        if let Some(value) = secret {
            entry.insert("secret".into(), Value::from(value));
        }
        for (product, param, as_param) in reruns.inherit {
            if entry.get(*as_param).is_some_and(|v| !v.is_null()) {
                continue;
            }
            // From the first member producing the product that has the parameter (a
            // tilt chain has two pass-1 producers; only one has `mass_sample`). A
            // parameter every member leaves out (an optional one, absent from its
            // canonical form) is left out of the entry too.
            let value = chain
                .members
                .iter()
                .filter(|m| produces(&nodes[*m], product))
                .find_map(|m| nodes[m].params.get(*param));
            if let Some(value) = value {
                entry.insert(as_param.to_string(), value.clone());
            }
        }
    }
    if cuts.len() > reruns.wired_as.len() {
        return Err(format!(
            "params.{}: {} entries; at most {}",
            reruns.param,
            cuts.len(),
            reruns.wired_as.len()
        ));
    }
    Ok(cuts)
}

/// A cut's number names its copies: equal parameters and guides, one copy, whichever
/// judge asks for it.
#[derive(Default)]
struct CutNumbers(Vec<(Value, BTreeMap<String, String>)>);

impl CutNumbers {
    fn number(&mut self, params: &Value, guides: &BTreeMap<String, String>) -> usize {
        let key = (params.clone(), guides.clone());
        match self.0.iter().position(|c| *c == key) {
            Some(at) => at + 1,
            None => {
                self.0.push(key);
                self.0.len()
            }
        }
    }
}

/// Adds each cut's copies (the perturbed source and every member), and returns the
/// judge's inputs that read them: the copies of the end (and of the companion), the
/// companion itself and the guides.
fn add_copies(
    nodes: &mut BTreeMap<String, Node>,
    registry: &Registry,
    judge_name: &str,
    reruns: &Reruns,
    chain: &Chain,
    cuts: &[Value],
    numbering: &mut CutNumbers,
) -> Result<BTreeMap<String, String>, Problem> {
    let problem = |message: String| Problem {
        node: judge_name.to_string(),
        message,
    };
    // The member that produces the companion product, when it is not the end.
    let companion = reruns.companion.and_then(|(product, input, copies)| {
        let member = chain.member_producing(nodes, product, Some(&chain.end))?;
        Some((member.clone(), input, copies))
    });
    // The originals that aim the re-runs, wired into every perturbing node and the judge.
    let guides: BTreeMap<String, String> = reruns
        .guides
        .iter()
        .filter_map(|(product, input)| {
            let member = chain.member_producing(nodes, product, None)?;
            Some((input.to_string(), member.clone()))
        })
        .collect();
    let perturbing = registry.get(reruns.stage).expect("a registered stage");
    let first_input = perturbing
        .spec()
        .inputs
        .first()
        .expect("a perturbing stage declares the input it perturbs")
        .name;
    let mut wired = BTreeMap::new();
    for (i, cut) in cuts.iter().enumerate() {
        let params = perturbing
            .canonical_params(cut)
            .map_err(|e| problem(format!("params.{}[{i}]: {e}", reruns.param)))?;
        let number = numbering.number(&params, &guides);
        let copy_name = |base: &str| format!("{base}_cut{number}");
        let perturbed_source = copy_name(&chain.source);
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
                    .chain([(first_input.to_string(), chain.source.clone())])
                    .collect(),
                files: BTreeMap::new(),
                variant: None,
                rerun: Some(Rerun {
                    base: chain.source.clone(),
                    number,
                    source: true,
                }),
            },
        )?;
        for member in &chain.members {
            let original = nodes[member].clone();
            let inputs = original
                .inputs
                .iter()
                .map(|(input, up)| {
                    let up = if chain.members.contains(up) {
                        copy_name(up)
                    } else if *up == chain.source {
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
        wired.insert(reruns.wired_as[i].to_string(), copy_name(&chain.end));
        if let Some((member, _, copies)) = &companion {
            wired.insert(copies[i].to_string(), copy_name(member));
        }
    }
    if let Some((member, input, _)) = &companion {
        wired.insert(input.to_string(), member.clone());
    }
    wired.extend(guides);
    Ok(wired)
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
