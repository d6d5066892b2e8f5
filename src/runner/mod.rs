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
use crate::remote::Remote;
use crate::store::{Manifest, NodeRef, Store, Stored};

mod build;
mod numerics;
mod remote;

pub(crate) use build::{build, BuildRequest};
pub(crate) use numerics::NumericsNotes;
pub(crate) use remote::fetch_resolved;
use remote::{prefetch, pull_node, push_node};

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

pub fn run(ctx: &RunContext, options: &RunOptions) -> Result<Vec<Outcome>> {
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
    if swept > 0 && !options.quiet {
        eprintln!("removed {swept} unfinished artifact(s) left by an interrupted run");
    }

    // The legality probes' re-runs are summed up in one line, not listed.
    let width = ctx
        .pipeline
        .nodes
        .iter()
        .filter(|n| n.rerun.is_none())
        .map(|n| n.name.len())
        .max()
        .unwrap_or(0)
        .max(14);
    // Read-through, all at once: what the remote holds and this store lacks is fetched
    // before anything is built (the files of many small artifacts together).
    let (prefetched, refused) = match ctx.remote {
        Some(remote) => prefetch(ctx, remote, &selected, &forced_nodes, &lock, options)?,
        None => Default::default(),
    };
    let (mut reruns_built, mut reruns_reused, mut rerun_seconds) = (0usize, 0usize, 0f64);
    let mut content: BTreeMap<String, String> = BTreeMap::new();
    let mut upstream: BTreeMap<String, (PathBuf, Manifest)> = BTreeMap::new();
    let mut outcomes = Vec::new();
    let mut numerics = NumericsNotes::default();
    for node in ctx
        .pipeline
        .nodes
        .iter()
        .filter(|n| selected.contains(&n.name))
    {
        let ingredients = ctx.ingredients(node, &content)?;
        ctx.store.hasher().save().ok();
        let recipe = ingredients.recipe();
        let dir = ctx.store.artifact_dir(&node.stage, &recipe);
        let stored = ctx.store.lookup(&node.stage, &recipe);
        let forced = forced_nodes.contains(&node.name);
        // Read-through: what is not here (or damaged here) may be in the remote.
        let pulled = match ctx.remote {
            Some(remote)
                if !forced
                    && !refused.contains(&node.name)
                    && !matches!(stored, Stored::Intact(_)) =>
            {
                pull_node(ctx, remote, node, &recipe, &lock, options)?
            }
            _ => None,
        };
        let (manifest, action, seconds) = match (pulled, stored) {
            (Some((manifest, seconds)), _) => (manifest, Action::Pulled, seconds),
            // Fetched with the others before the loop; the time was said then.
            (None, Stored::Intact(manifest)) if prefetched.contains(&node.name) => {
                (manifest, Action::Pulled, 0.0)
            }
            (None, Stored::Intact(manifest)) if !forced => (manifest, Action::Reused, 0.0),
            (None, stored) => {
                if let Stored::Damaged { problems, .. } = &stored {
                    if !options.quiet {
                        eprintln!(
                            "node '{}': its stored artifact is damaged ({}); rebuilding",
                            node.name,
                            problems.join("; ")
                        );
                    }
                }
                let started = Instant::now();
                let (scratch, built) = build(
                    ctx,
                    &BuildRequest {
                        node,
                        ingredients: &ingredients,
                        recipe: &recipe,
                        upstream: &upstream,
                        lock: &lock,
                        show_progress: options.show_progress,
                    },
                )
                .with_context(|| format!("node '{}' ({}) failed", node.name, node.stage))?;
                let seconds = started.elapsed().as_secs_f64();
                let action = match &stored {
                    Stored::Absent => Action::Built,
                    Stored::Intact(old) if old.content_hash == built.content_hash => {
                        Action::RebuiltIdentical
                    }
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
                            Some((recorded, here)) => format!(
                                "the stored bytes were computed with {recorded}, these with {here}"
                            ),
                            None => "the stage is not deterministic".to_string(),
                        };
                        eprintln!(
                            "warning: node '{}' rebuilt with the same recipe gave different bytes (content {} → {}): {cause}",
                            node.name,
                            short(&old.content_hash),
                            short(&built.content_hash)
                        );
                        Action::Changed
                    }
                };
                match (action, stored) {
                    (Action::RebuiltIdentical, Stored::Intact(old)) => {
                        std::fs::remove_dir_all(&scratch).ok();
                        (old, action, seconds)
                    }
                    _ => {
                        ctx.store.commit(&lock, &scratch, &built)?;
                        (built, action, seconds)
                    }
                }
            }
        };
        if matches!(action, Action::Reused | Action::Pulled) {
            numerics.check(ctx, node, &manifest);
        }
        // Write-through, for what was reused too: a run killed between its commit here
        // and its upload finishes the upload now.
        if let (Some(remote), false) = (ctx.remote, action == Action::Pulled) {
            push_node(remote, node, &dir, &manifest, options)?;
        }
        ctx.store.set_node_ref(
            &lock,
            &node.name,
            &NodeRef {
                recipe: recipe.clone(),
                content_hash: manifest.content_hash.clone(),
                ingredients: ingredients.clone(),
            },
        )?;
        if node.rerun.is_some() {
            match action {
                Action::Reused => reruns_reused += 1,
                _ => reruns_built += 1,
            }
            rerun_seconds += seconds;
        } else if !options.quiet {
            outln!(
                "{:<width$} {:<12} {:<20} {:>8}  content {}",
                node.name,
                node.stage,
                action.label(),
                if seconds > 0.0 {
                    format!("{seconds:.2}s")
                } else {
                    String::new()
                },
                short(&manifest.content_hash),
                width = width
            );
        }
        outcomes.push(Outcome {
            rerun: node.rerun.is_some(),
            node: node.name.clone(),
            stage: node.stage.clone(),
            action,
            recipe: recipe.clone(),
            content_hash: manifest.content_hash.clone(),
            seconds,
        });
        content.insert(node.name.clone(), manifest.content_hash.clone());
        upstream.insert(node.name.clone(), (dir, manifest));
    }
    if reruns_built + reruns_reused > 0 && !options.quiet {
        outln!(
            "{} legality re-run node(s) (NODE_cutN, listed by `status`): {reruns_built} built in {rerun_seconds:.2}s, {reruns_reused} reused",
            reruns_built + reruns_reused
        );
    }
    for line in numerics.lines() {
        eprintln!("{line}");
    }
    Ok(outcomes)
}
