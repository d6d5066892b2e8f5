//! `pipeline.toml`: the nodes of the DAG, checked against the registered stages before
//! anything runs.
//!
//! ```toml
//! store = "artifacts"            # optional, relative to this file
//! seeds = [1337, 42, 2024]       # optional: run the training seed's subgraph per seed
//!
//! [nodes.tokens]
//! stage = "tokenize"
//! files.corpus = ["data/sample/*.jsonl"]
//! params.vocab_size = 1024
//!
//! [nodes.token_stats]
//! stage = "token-stats"
//! inputs.tokens = "tokens"
//! ```
//!
//! Every error names `pipeline.toml:LINE:COLUMN`, because a DAG is only as easy to fix as
//! its error messages are precise.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use toml::Spanned;

use crate::registry::Registry;

mod prepare;
mod reruns;
pub mod secret;
mod seeds;
mod source;
mod wiring;
use seeds::check_seeds;
use source::Source;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineFile {
    store: Option<String>,
    remote: Option<String>,
    seeds: Option<Spanned<Vec<u64>>>,
    #[serde(default)]
    nodes: BTreeMap<String, Spanned<NodeFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    stage: Spanned<String>,
    #[serde(default)]
    inputs: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    files: BTreeMap<String, Spanned<OneOrMany>>,
    #[serde(default)]
    params: Option<Spanned<toml::Table>>,
    /// What the node writes, for a stage whose nodes declare it (`command`); the stage
    /// reads it as its `outputs` parameter, so the recipe covers it.
    #[serde(default)]
    outputs: Option<Spanned<toml::Table>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A validated node.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub stage: String,
    /// Canonical parameters (defaults filled in).
    pub params: Value,
    /// What the node reads and writes: its stage's declaration, or the node's own for a
    /// stage whose nodes declare theirs ([`stage_api::Stage::node_spec`]).
    pub spec: &'static stage_api::StageSpec,
    /// Input name → upstream node name.
    pub inputs: BTreeMap<String, String>,
    /// File role → files, sorted by path.
    pub files: BTreeMap<String, Vec<PathBuf>>,
    /// Set on the per-seed copies that [`Pipeline::for_seeds`] makes.
    pub variant: Option<SeedVariant>,
    /// Set on the nodes the pipeline adds for a judging stage's re-runs
    /// ([`stage_api::Reruns`]).
    pub rerun: Option<Rerun>,
}

/// A node added for re-runs: the node it copies (the chain's source for the perturbing
/// node) and the number of the re-run (`_cutN` in its name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rerun {
    pub base: String,
    pub number: usize,
    /// The perturbing node itself (a copy of the chain's source), not a member's copy.
    pub source: bool,
}

/// Which node of `pipeline.toml` a per-seed copy was made from, and for which seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedVariant {
    pub base: String,
    pub seed: u64,
}

#[derive(Debug)]
pub struct Pipeline {
    pub path: PathBuf,
    pub store_dir: PathBuf,
    /// The file's `remote` key: a shared store's URL (`s3://bucket/prefix`), if any.
    pub remote: Option<String>,
    /// In topological order; ties broken by name.
    pub nodes: Vec<Node>,
    /// The file's `seeds` key (empty if none). [`Pipeline::for_seeds`] expands them.
    pub seeds_in_file: Vec<u64>,
    /// The run seeds this pipeline was expanded for (empty: not expanded).
    pub seeds: Vec<u64>,
}

/// The width of a node-name column: the longest name, and at least 14 (the header's).
fn name_column<'a>(nodes: impl Iterator<Item = &'a Node>) -> usize {
    nodes.map(|n| n.name.len()).max().unwrap_or(0).max(14)
}

impl Pipeline {
    /// The directory of the pipeline file, where relative paths in it resolve.
    pub fn base_dir(&self) -> PathBuf {
        directory_of(&self.path)
    }

    pub fn load(path: &Path, registry: &Registry) -> Result<Pipeline> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the pipeline file", path.display()))?;
        Self::parse(path, &text, registry)
    }

    pub fn parse(path: &Path, text: &str, registry: &Registry) -> Result<Pipeline> {
        let base = directory_of(path);
        let at = |span: Option<Range<usize>>| -> String {
            match span {
                Some(span) => {
                    let (line, column) = line_column(text, span.start);
                    format!("{}:{line}:{column}", path.display())
                }
                None => path.display().to_string(),
            }
        };
        let file: PipelineFile = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().replace('\n', " ");
            anyhow!("{}: {}", at(e.span()), plain_toml_error(&message))
        })?;
        if file.nodes.is_empty() {
            bail!("{}: no [nodes.NAME] table: nothing to run", path.display());
        }
        let source = Source::parse(text);
        let seeds_in_file = match &file.seeds {
            Some(seeds) => {
                check_seeds(seeds.get_ref())
                    .map_err(|e| anyhow!("{}: seeds: {e}", at(Some(seeds.span()))))?;
                seeds.get_ref().clone()
            }
            None => Vec::new(),
        };

        // First every node's parameters and declaration, so that wiring is checked
        // against what each upstream node declares, whichever comes first by name.
        let mut prepared = BTreeMap::new();
        for (name, spanned) in &file.nodes {
            let node = prepare::prepare(name, spanned, registry, &source, &at)?;
            prepared.insert(name.clone(), node);
        }

        let mut nodes = BTreeMap::new();
        let mut miswired = None;
        for (name, spanned) in &file.nodes {
            let node = wiring::wire(name, spanned, &prepared, &base, &at, &mut miswired)?;
            nodes.insert(name.clone(), node);
        }

        let order = topological_order(&nodes).map_err(|cycle| {
            anyhow!(
                "{}: cycle in the DAG: {}",
                path.display(),
                cycle.join(" → ")
            )
        })?;
        if let Some(error) = miswired {
            return Err(error);
        }
        let store_dir = base.join(file.store.as_deref().unwrap_or("artifacts"));
        let mut judges_key = || secret::judges_key(&store_dir).map_err(|e| format!("{e:#}"));
        let order = match reruns::add_reruns(&mut nodes, registry, &mut judges_key) {
            Ok((true, salt)) => ordered(&nodes, salt.as_deref().unwrap_or(""))
                .expect("re-runs copy an acyclic chain"),
            Ok((false, _)) => order,
            Err(problem) => {
                let span = source.key_span(&["nodes", &problem.node]);
                bail!("{}: node '{}': {}", at(span), problem.node, problem.message)
            }
        };
        Ok(Pipeline {
            path: path.to_path_buf(),
            store_dir,
            remote: file.remote.clone(),
            nodes: order.into_iter().map(|n| nodes[&n].clone()).collect(),
            seeds_in_file,
            seeds: Vec::new(),
        })
    }

    /// The width of the node column in listings: 14, or the longest name.
    pub fn name_width(&self) -> usize {
        name_column(self.nodes.iter())
    }

    /// [`Pipeline::name_width`] for a listing that sums the judges' re-runs up in one
    /// line instead of listing them (`run`'s).
    pub fn name_width_without_reruns(&self) -> usize {
        name_column(self.nodes.iter().filter(|n| n.rerun.is_none()))
    }

    /// The nodes a name on the command line means: the node itself, or, in a pipeline
    /// expanded for seeds, every seed's copy of it.
    pub fn nodes_named(&self, name: &str) -> Result<Vec<&Node>> {
        if let Some(node) = self.nodes.iter().find(|n| n.name == name) {
            return Ok(vec![node]);
        }
        let copies: Vec<&Node> = self
            .nodes
            .iter()
            .filter(|n| n.variant.as_ref().is_some_and(|v| v.base == name))
            .collect();
        if copies.is_empty() {
            self.node(name)?;
        }
        Ok(copies)
    }

    pub fn node(&self, name: &str) -> Result<&Node> {
        self.nodes.iter().find(|n| n.name == name).ok_or_else(|| {
            anyhow!(
                "{}: no node named '{name}' (nodes: {})",
                self.path.display(),
                self.nodes
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }

    /// `name` (every seed's copy of it, if it has copies) and everything it depends on.
    pub fn ancestors_of(&self, name: &str) -> Result<BTreeSet<String>> {
        let mut wanted = BTreeSet::new();
        let mut stack: Vec<String> = self
            .nodes_named(name)?
            .into_iter()
            .map(|n| n.name.clone())
            .collect();
        while let Some(n) = stack.pop() {
            if wanted.insert(n.clone()) {
                stack.extend(self.node(&n)?.inputs.values().cloned());
            }
        }
        Ok(wanted)
    }
}

/// The TOML parser's message, or what it means where the parser speaks of its own
/// internals: an integer past 64 bits is read as an i128 it then cannot place.
fn plain_toml_error(message: &str) -> String {
    match message
        .strip_prefix("invalid type: integer `")
        .and_then(|rest| rest.split_once("` as i128"))
    {
        Some((number, _)) => format!(
            "the integer {number} is out of range: TOML integers are 64-bit signed ({} to {})",
            i64::MIN,
            i64::MAX
        ),
        None => message.to_string(),
    }
}

fn list_or_none<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let items: Vec<&str> = items.collect();
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}

impl Pipeline {
    /// Where `param` of `node` is written in the pipeline file (`pipeline.toml:LINE:COL`),
    /// for a parameter a stage could only check against its inputs, when it ran. A seed's
    /// or a re-run's copy points at the node it copies; a parameter left to its default,
    /// at the node's `params` (or the node).
    pub fn param_location(&self, node: &Node, param: &str) -> Option<String> {
        let text = std::fs::read_to_string(&self.path).ok()?;
        let source = Source::parse(&text);
        let name = match (&node.variant, &node.rerun) {
            (Some(variant), _) => &variant.base,
            (_, Some(rerun)) => &rerun.base,
            _ => &node.name,
        };
        let span = source
            .param_span(name, param)
            .or_else(|| source.key_span(&["nodes", name]))?;
        let (line, column) = line_column(&text, span.start);
        Some(format!("{}:{line}:{column}", self.path.display()))
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
    (line, column)
}

/// Kahn's algorithm with a sorted ready set, so the order is stable. On a cycle, returns
/// one cycle's nodes.
/// The directory a file is in (`.` for a bare file name).
fn directory_of(path: &Path) -> PathBuf {
    path.parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The order a pipeline with re-runs is built in: the plain topological order (by
/// depth, then name), except that each node and its re-run copies are one group, built
/// one after the other in an order drawn from `salt` (the judges' secret), so that a
/// scorer cannot count on its original run coming first. A re-run's perturbing node
/// goes in the same wave as what it perturbs, so that every copy is ready with its
/// original.
fn ordered(
    nodes: &BTreeMap<String, Node>,
    salt: &str,
) -> std::result::Result<Vec<String>, Vec<String>> {
    let plain = topological_order(nodes)?;
    let mut depth: BTreeMap<&str, usize> = BTreeMap::new();
    for name in &plain {
        let node = &nodes[name];
        let step = usize::from(!node.rerun.as_ref().is_some_and(|r| r.source));
        let d = node
            .inputs
            .values()
            .map(|up| depth[up.as_str()] + step)
            .max()
            .unwrap_or(0);
        depth.insert(name, d);
    }
    let key = |name: &str| {
        let node = &nodes[name];
        let group = node.rerun.as_ref().map_or(name, |r| r.base.as_str());
        let draw = blake3::hash(format!("{salt}\0{name}").as_bytes());
        (depth[name], group.to_string(), *draw.as_bytes())
    };
    // Kahn's algorithm, always taking the ready node with the smallest key.
    let mut waiting: BTreeMap<&str, usize> = nodes
        .iter()
        .map(|(name, n)| (name.as_str(), n.inputs.len()))
        .collect();
    let mut ready: BTreeSet<(usize, String, [u8; 32], &str)> = BTreeSet::new();
    for (name, count) in &waiting {
        if *count == 0 {
            let (d, g, h) = key(name);
            ready.insert((d, g, h, name));
        }
    }
    let mut order = Vec::with_capacity(nodes.len());
    while let Some(next) = ready.pop_first() {
        let name = next.3;
        order.push(name.to_string());
        for (other, node) in nodes {
            let uses = node
                .inputs
                .values()
                .filter(|up| up.as_str() == name)
                .count();
            if uses > 0 {
                let count = waiting.get_mut(other.as_str()).expect("every node");
                *count -= uses;
                if *count == 0 {
                    let (d, g, h) = key(other);
                    ready.insert((d, g, h, other.as_str()));
                }
            }
        }
    }
    Ok(order)
}

pub(crate) fn topological_order(
    nodes: &BTreeMap<String, Node>,
) -> std::result::Result<Vec<String>, Vec<String>> {
    let mut remaining: BTreeMap<&str, BTreeSet<&str>> = nodes
        .iter()
        .map(|(name, n)| {
            (
                name.as_str(),
                n.inputs.values().map(String::as_str).collect(),
            )
        })
        .collect();
    let mut order = Vec::new();
    loop {
        let ready: Vec<&str> = remaining
            .iter()
            .filter(|(_, deps)| deps.is_empty())
            .map(|(n, _)| *n)
            .collect();
        if ready.is_empty() {
            break;
        }
        for n in ready {
            remaining.remove(n);
            for deps in remaining.values_mut() {
                deps.remove(n);
            }
            order.push(n.to_string());
        }
    }
    if remaining.is_empty() {
        return Ok(order);
    }
    // Walk from any remaining node along unresolved dependencies until a node repeats.
    let mut path: Vec<&str> = vec![remaining.keys().next().copied().unwrap()];
    loop {
        let last = *path.last().unwrap();
        let next = *remaining[last].iter().next().unwrap();
        if let Some(start) = path.iter().position(|&n| n == next) {
            let mut cycle: Vec<String> = path[start..].iter().map(|s| s.to_string()).collect();
            cycle.push(next.to_string());
            return Err(cycle);
        }
        path.push(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_are_one_based() {
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_column("ab", 0), (1, 1));
    }
}
