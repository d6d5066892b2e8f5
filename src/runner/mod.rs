//! Resolving a pipeline against the store (what is cached, stale, missing, and why) and
//! running what is not cached.
//!
//! The runner knows stages only through [`stage_api::Stage`]: it hashes what goes in,
//! hands a stage an empty scratch directory, and records what came out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::pipeline::{Node, Pipeline};
use crate::recipe::{short, FileIngredient, Ingredients};
use crate::registry::Registry;
use crate::remote::{Remote, Transfer};
use crate::store::{Manifest, NodeRef, Store, Stored};

mod build;
mod numerics;
mod tiers;

pub(crate) use build::{build, BuildRequest};
pub(crate) use numerics::NumericsNotes;
pub(crate) use tiers::fetch_resolved;
use tiers::{Commit, Found, Tiers};

/// Where a node stands relative to the store.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum NodeState {
    /// Its current recipe is stored.
    Cached { content_hash: String },
    /// It was built before, but its recipe changed since, for these reasons.
    Stale { reasons: Vec<String> },
    /// Never built with anything like the current pipeline.
    Missing { reason: String },
    /// Its current recipe is stored, but the files no longer match the manifest (or the
    /// manifest is unreadable): nothing is read from it; `run` rebuilds it.
    Damaged { problems: Vec<String> },
}

#[derive(Debug, Clone, Serialize)]
pub struct Resolved {
    pub node: String,
    pub stage: String,
    /// Known when every upstream node is cached.
    pub recipe: Option<String>,
    #[serde(skip)]
    pub ingredients: Option<Ingredients>,
    #[serde(flatten)]
    pub state: NodeState,
    /// Added by the pipeline for a legality probe's re-run (not written in the file).
    #[serde(skip)]
    pub rerun: bool,
    /// Whether the remote holds its recipe; absent without a remote.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<bool>,
    /// Why the remote's manifest for its recipe would be refused, when it would: the
    /// node counts as held there (`pull` and `run` try it, and say this), but its
    /// content is not known from it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote_refused: Option<String>,
}

pub struct RunContext<'a> {
    pub pipeline: &'a Pipeline,
    pub registry: &'a Registry,
    pub store: &'a Store,
    /// Handed to stages, which refuse a plan that needs more (`--memory-limit`).
    pub memory_limit: u64,
    /// The shared store, unless there is none or `--offline`: `run` pulls what it holds
    /// and pushes what it lacks; `status` shows what it holds.
    pub remote: Option<&'a Remote>,
}

impl RunContext<'_> {
    fn file_ingredients(&self, node: &Node) -> Result<BTreeMap<String, Vec<FileIngredient>>> {
        let mut files = BTreeMap::new();
        for (role, paths) in &node.files {
            let mut list = Vec::new();
            for path in paths {
                list.push(FileIngredient {
                    name: path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    blake3: self.store.hasher().hash(path)?,
                });
            }
            files.insert(role.clone(), list);
        }
        Ok(files)
    }

    fn ingredients(
        &self,
        node: &Node,
        upstream_content: &BTreeMap<String, String>,
    ) -> Result<Ingredients> {
        let stage = self
            .registry
            .get(&node.stage)
            .expect("validated when loading");
        let mut inputs = BTreeMap::new();
        for (input, upstream) in &node.inputs {
            inputs.insert(input.clone(), upstream_content[upstream].clone());
        }
        Ok(Ingredients {
            stage: node.stage.clone(),
            version: stage.spec().version,
            params: node.params.clone(),
            inputs,
            files: self.file_ingredients(node)?,
        })
    }

    /// Every node's state, in run order, without changing anything.
    pub fn resolve(&self) -> Result<Vec<Resolved>> {
        let mut content: BTreeMap<String, String> = BTreeMap::new();
        let mut states: BTreeMap<String, NodeState> = BTreeMap::new();
        let mut resolved = Vec::new();
        for node in &self.pipeline.nodes {
            let blocked: Vec<&String> = node
                .inputs
                .values()
                .filter(|up| !content.contains_key(*up))
                .collect();
            let previous = self.store.node_ref(&node.name);
            if let Some(upstream) = blocked.first() {
                let upstream_state = match &states[*upstream] {
                    NodeState::Stale { .. } => "stale",
                    NodeState::Damaged { .. } => "damaged",
                    _ => "not built",
                };
                let state = match previous {
                    Some(_) => NodeState::Stale {
                        reasons: vec![format!("upstream '{upstream}' is {upstream_state}")],
                    },
                    None => NodeState::Missing {
                        reason: format!("upstream '{upstream}' is {upstream_state}"),
                    },
                };
                states.insert(node.name.clone(), state.clone());
                resolved.push(Resolved {
                    node: node.name.clone(),
                    stage: node.stage.clone(),
                    recipe: None,
                    ingredients: None,
                    state,
                    rerun: node.rerun.is_some(),
                    remote: None,
                    remote_refused: None,
                });
                continue;
            }
            let ingredients = self.ingredients(node, &content)?;
            let recipe = ingredients.recipe();
            // What the remote holds counts for what downstream resolves to: a node that
            // is only there still has a known content, so its dependents' recipes are
            // known too (and `pull` can fetch them).
            // Whether the remote holds the recipe, the content it says it has, and why its
            // manifest would be refused if it would: news about this node only, as a bad
            // blob is (`pull` reports it and pulls the rest, `run` builds it here).
            let (on_remote, remote_content, remote_refused) = match self.remote {
                Some(remote) => match remote.manifest(&node.stage, &recipe) {
                    Ok(found) => (
                        Some(found.is_some()),
                        found.map(|manifest| manifest.content_hash),
                        None,
                    ),
                    Err(e) if crate::remote::is_refused(&e) => {
                        (Some(true), None, Some(format!("{e:#}")))
                    }
                    Err(e) => return Err(e),
                },
                None => (None, None, None),
            };
            let state = match self.store.lookup(&node.stage, &recipe) {
                Stored::Intact(manifest) => {
                    content.insert(node.name.clone(), manifest.content_hash.clone());
                    NodeState::Cached {
                        content_hash: manifest.content_hash,
                    }
                }
                Stored::Damaged { manifest, problems } => {
                    // The manifest's claim still defines what downstream was built from.
                    if let Some(manifest) = manifest {
                        content.insert(node.name.clone(), manifest.content_hash);
                    }
                    NodeState::Damaged { problems }
                }
                Stored::Absent => match previous {
                    Some(old) => {
                        let mut reasons = ingredients.differences_from(&old.ingredients);
                        if reasons.is_empty() {
                            reasons.push(format!(
                                "its artifact {}/{} was removed (gc?)",
                                node.stage,
                                short(&recipe)
                            ));
                        }
                        NodeState::Stale { reasons }
                    }
                    None => NodeState::Missing {
                        reason: "never built".into(),
                    },
                },
            };
            if let Some(content_hash) = remote_content {
                content.entry(node.name.clone()).or_insert(content_hash);
            }
            states.insert(node.name.clone(), state.clone());
            resolved.push(Resolved {
                node: node.name.clone(),
                stage: node.stage.clone(),
                recipe: Some(recipe),
                ingredients: Some(ingredients),
                state,
                rerun: node.rerun.is_some(),
                remote: on_remote,
                remote_refused,
            });
        }
        self.store.hasher().save().ok();
        Ok(resolved)
    }
}

pub struct RunOptions {
    pub until: Option<String>,
    pub force: BTreeSet<String>,
    pub wait: bool,
    pub quiet: bool,
    pub show_progress: bool,
}

/// What a run reports as it goes. The runner prints nothing: the caller (`commands/`)
/// decides what is said, and where.
pub enum Progress<'a> {
    /// For stderr unless quiet: a damaged artifact being rebuilt, unfinished artifacts
    /// of an interrupted run removed.
    Note(String),
    /// For stderr always: a warning (bytes that changed, a refused remote artifact, a
    /// push that did not happen, artifacts computed with other kernels).
    Warning(String),
    /// The remote's artifacts fetched together before anything was built.
    Prefetched {
        artifacts: usize,
        url: &'a str,
        transfer: &'a Transfer,
    },
    /// One node done (a legality re-run's too).
    Done(&'a Outcome),
}

/// What `run` did with one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Its recipe was stored and every file matched the manifest.
    Reused,
    /// Not stored: built.
    Built,
    /// Not stored here, but in the remote: downloaded and verified.
    Pulled,
    /// Forced, and the rebuild gave the stored bytes.
    RebuiltIdentical,
    /// The stored copy was damaged (or forced over a damaged one); replaced by the
    /// rebuild, whose bytes match the manifest's claim.
    Repaired,
    /// A rebuild with the same recipe gave other bytes: the stage is not deterministic,
    /// or the stored copy was damaged in a way that changed its claim.
    Changed,
}

impl Action {
    pub fn label(self) -> &'static str {
        match self {
            Action::Reused => "reused",
            Action::Built => "built",
            Action::Pulled => "pulled",
            Action::RebuiltIdentical => "rebuilt, identical",
            Action::Repaired => "rebuilt, repaired",
            Action::Changed => "rebuilt, CHANGED",
        }
    }
}

/// What happened to one node in a run.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub node: String,
    pub stage: String,
    pub action: Action,
    pub recipe: String,
    pub content_hash: String,
    pub seconds: f64,
    /// A legality re-run (`NODE_cutN`), summed up rather than listed.
    pub rerun: bool,
}

/// Runs the pipeline (up to `options.until`): each node's artifact is looked up in the
/// tiers (this store, then the remote), built when neither holds it, and committed to
/// both; `progress` hears of each node as it is done.
pub fn run(
    ctx: &RunContext,
    options: &RunOptions,
    progress: &mut dyn FnMut(Progress) -> Result<()>,
) -> Result<Vec<Outcome>> {
    // On a pipeline expanded for seeds, `--force model` means every seed's copy.
    let mut forced_nodes = BTreeSet::new();
    for forced in &options.force {
        for node in ctx.pipeline.nodes_named(forced)? {
            forced_nodes.insert(node.name.clone());
        }
    }
    let selected = match &options.until {
        Some(target) => ctx.pipeline.ancestors_of(target)?,
        None => ctx.pipeline.nodes.iter().map(|n| n.name.clone()).collect(),
    };
    let lock = ctx.store.lock(options.wait)?;
    let swept = ctx.store.sweep_tmp(&lock)?;
    if swept > 0 {
        progress(Progress::Note(format!(
            "removed {swept} unfinished artifact(s) left by an interrupted run"
        )))?;
    }
    let mut tiers = Tiers::new(ctx.store, ctx.remote, &lock, options.show_progress);
    if tiers.has_remote() {
        let resolved = ctx.resolve()?;
        let wanted: Vec<&Resolved> = resolved
            .iter()
            .filter(|r| selected.contains(&r.node) && !forced_nodes.contains(&r.node))
            .collect();
        tiers.prefetch(&wanted, progress)?;
    }
    let mut upstream = Upstream::default();
    let mut outcomes = Vec::new();
    let mut numerics = NumericsNotes::default();
    for node in ctx
        .pipeline
        .nodes
        .iter()
        .filter(|n| selected.contains(&n.name))
    {
        let ingredients = ctx.ingredients(node, &upstream.content)?;
        ctx.store.hasher().save().ok();
        let recipe = ingredients.recipe();
        let forced = forced_nodes.contains(&node.name);
        let (manifest, action, seconds, scratch) =
            match tiers.lookup(node, &recipe, forced, progress)? {
                Found::Here(manifest) => (manifest, Action::Reused, 0.0, None),
                Found::Fetched { manifest, seconds } => (manifest, Action::Pulled, seconds, None),
                Found::Neither(stored) => {
                    let request = BuildRequest {
                        node,
                        ingredients: &ingredients,
                        recipe: &recipe,
                        upstream: &upstream.artifacts,
                        lock: &lock,
                        show_progress: options.show_progress,
                    };
                    build_and_compare(ctx, &request, stored, progress)?
                }
            };
        if matches!(action, Action::Reused | Action::Pulled) {
            numerics.check(ctx, node, &manifest);
        }
        let how = match (action, &scratch) {
            (Action::Pulled, _) => Commit::Fetched,
            (_, Some(scratch)) => Commit::Built(scratch),
            (_, None) => Commit::Here,
        };
        tiers.commit(node, &recipe, &manifest, how, progress)?;
        ctx.store.set_node_ref(
            &lock,
            &node.name,
            &NodeRef {
                recipe: recipe.clone(),
                content_hash: manifest.content_hash.clone(),
                ingredients,
            },
        )?;
        let outcome = Outcome {
            rerun: node.rerun.is_some(),
            node: node.name.clone(),
            stage: node.stage.clone(),
            action,
            recipe: recipe.clone(),
            content_hash: manifest.content_hash.clone(),
            seconds,
        };
        progress(Progress::Done(&outcome))?;
        outcomes.push(outcome);
        let dir = ctx.store.artifact_dir(&node.stage, &recipe);
        upstream.add(&node.name, dir, manifest);
    }
    for line in numerics.lines() {
        progress(Progress::Warning(line))?;
    }
    Ok(outcomes)
}

/// What the nodes built so far in a run give those downstream: their content hashes
/// (for recipes) and their artifacts (for inputs).
#[derive(Default)]
struct Upstream {
    content: BTreeMap<String, String>,
    artifacts: BTreeMap<String, (PathBuf, Manifest)>,
}

impl Upstream {
    fn add(&mut self, node: &str, dir: PathBuf, manifest: Manifest) {
        self.content
            .insert(node.to_string(), manifest.content_hash.clone());
        self.artifacts.insert(node.to_string(), (dir, manifest));
    }
}

/// Builds a node that neither tier holds (or that is forced). Returns its manifest, what
/// happened (compared with what the store held for the recipe), the build's seconds and
/// the scratch directory to commit: none when it rebuilt the very bytes stored, whose
/// copy (and manifest, with the first build's report) stays.
fn build_and_compare(
    ctx: &RunContext,
    request: &BuildRequest,
    stored: Stored,
    progress: &mut dyn FnMut(Progress) -> Result<()>,
) -> Result<(Manifest, Action, f64, Option<PathBuf>)> {
    let node = request.node;
    if let Stored::Damaged { problems, .. } = &stored {
        progress(Progress::Note(format!(
            "node '{}': its stored artifact is damaged ({}); rebuilding",
            node.name,
            problems.join("; ")
        )))?;
    }
    let started = Instant::now();
    let (scratch, built) = build(ctx, request)
        .with_context(|| format!("node '{}' ({}) failed", node.name, node.stage))?;
    let seconds = started.elapsed().as_secs_f64();
    let action = match &stored {
        Stored::Absent => Action::Built,
        Stored::Intact(old) if old.content_hash == built.content_hash => Action::RebuiltIdentical,
        Stored::Damaged {
            manifest: Some(old),
            ..
        } if old.content_hash == built.content_hash => Action::Repaired,
        Stored::Damaged { manifest: None, .. } => Action::Repaired,
        Stored::Intact(old)
        | Stored::Damaged {
            manifest: Some(old),
            ..
        } => {
            let cause = match numerics::mismatch(ctx, node, old) {
                Some((recorded, here)) => {
                    format!("the stored bytes were computed with {recorded}, these with {here}")
                }
                None => "the stage is not deterministic".to_string(),
            };
            progress(Progress::Warning(format!(
                "warning: node '{}' rebuilt with the same recipe gave different bytes (content {} → {}): {cause}",
                node.name,
                short(&old.content_hash),
                short(&built.content_hash)
            )))?;
            Action::Changed
        }
    };
    match (action, stored) {
        (Action::RebuiltIdentical, Stored::Intact(old)) => {
            std::fs::remove_dir_all(&scratch).ok();
            Ok((old, action, seconds, None))
        }
        _ => Ok((built, action, seconds, Some(scratch))),
    }
}
