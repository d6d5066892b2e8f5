//! The runner's side of the remote: fetching what the remote holds before building
//! (read-through) and uploading what was built or reused (write-through). The remote
//! itself ([`crate::remote`]) knows nothing of the store; this is where the two meet.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;

use super::{NodeState, Resolved, RunContext, RunOptions};
use crate::pipeline::Node;
use crate::recipe::short;
use crate::remote::{denial, is_refused, transfer_bar, Pushed, Remote, Transfer};
use crate::store::{Manifest, Store, StoreLock};

impl Resolved {
    /// Whether `run` and `pull` fetch it: the remote holds its current recipe and this
    /// store does not (intact).
    pub fn only_on_remote(&self) -> bool {
        self.remote == Some(true) && !matches!(self.state, NodeState::Cached { .. })
    }
}

/// Fetches every selected node that the remote holds and the store lacks (recipes
/// resolved through the remote's manifests). Returns the nodes fetched and those whose
/// remote artifact was refused (to be built here).
pub(super) fn prefetch(
    ctx: &RunContext,
    remote: &Remote,
    selected: &BTreeSet<String>,
    forced: &BTreeSet<String>,
    lock: &StoreLock,
    options: &RunOptions,
) -> Result<(BTreeSet<String>, BTreeSet<String>)> {
    let resolved = ctx.resolve()?;
    let wanted: Vec<&Resolved> = resolved
        .iter()
        .filter(|r| selected.contains(&r.node) && !forced.contains(&r.node) && r.only_on_remote())
        .collect();
    let (mut fetched, mut refused) = (BTreeSet::new(), BTreeSet::new());
    let started = Instant::now();
    let results = fetch_resolved(ctx.store, remote, &wanted, lock, options.show_progress)?;
    let mut total = Transfer::default();
    for (r, result) in wanted.iter().zip(results) {
        match result {
            Ok(Some((_, transfer))) => {
                total.add(transfer);
                fetched.insert(r.node.clone());
            }
            Ok(None) => {}
            Err(e) if is_refused(&e) => {
                building_here_instead(&r.node, &e);
                refused.insert(r.node.clone());
            }
            Err(e) => return Err(e.context(format!("node '{}': cannot pull", r.node))),
        }
    }
    // Fetched together: the time is the batch's, said once.
    total.seconds = started.elapsed().as_secs_f64();
    if !fetched.is_empty() && !options.quiet {
        outln!(
            "pulled {} artifact(s) from {}: {}",
            fetched.len(),
            remote.url(),
            total.describe()
        );
    }
    Ok((fetched, refused))
}

/// A refused remote artifact, in `run`: said, and the node built here.
fn building_here_instead(node: &str, error: &anyhow::Error) {
    eprintln!(
        "node '{node}': {}; building it here instead",
        format!("{error:#}").replace('\n', " ")
    );
}

/// [`fetch_many`] for resolved nodes that are only on the remote, in `pull` as in `run`.
pub(crate) fn fetch_resolved(
    store: &Store,
    remote: &Remote,
    wanted: &[&Resolved],
    lock: &StoreLock,
    show_progress: bool,
) -> Result<Vec<FetchResult>> {
    let pairs: Vec<(&str, &str)> = wanted
        .iter()
        .map(|r| {
            let recipe = r.recipe.as_deref();
            (
                r.stage.as_str(),
                recipe.expect("a node on the remote has a known recipe"),
            )
        })
        .collect();
    fetch_many(store, remote, &pairs, "pull", lock, show_progress)
}

/// What fetching one artifact gave: nothing (not on the remote), or the artifact
/// committed with what its transfer moved.
pub(crate) type FetchResult = Result<Option<(Manifest, Transfer)>>;

/// Fetches a node's artifact from the remote into the store, if the remote holds its
/// recipe. A remote artifact that fails verification is reported and not used (the node
/// is then built here, and its push repairs the remote); an unreachable remote is an
/// error.
pub(super) fn pull_node(
    ctx: &RunContext,
    remote: &Remote,
    node: &Node,
    recipe: &str,
    lock: &StoreLock,
    options: &RunOptions,
) -> Result<Option<(Manifest, f64)>> {
    let label = format!("{}: pull", node.name);
    let wanted = [(node.stage.as_str(), recipe)];
    let fetched = fetch_many(
        ctx.store,
        remote,
        &wanted,
        &label,
        lock,
        options.show_progress,
    )?
    .pop()
    .expect("one result per artifact");
    match fetched {
        Ok(found) => Ok(found.map(|(manifest, transfer)| (manifest, transfer.seconds))),
        Err(e) if is_refused(&e) => {
            building_here_instead(&node.name, &e);
            Ok(None)
        }
        Err(e) => Err(e.context(format!("node '{}': cannot pull", node.name))),
    }
}

/// Downloads the remote's artifacts for these (stage, recipe) pairs, their files
/// together, into scratch directories, verifies them, and commits each one whose every
/// file matched. One result per pair, in order; the outer error is the store's (a failed
/// commit).
fn fetch_many(
    store: &Store,
    remote: &Remote,
    wanted: &[(&str, &str)],
    label: &str,
    lock: &StoreLock,
    show_progress: bool,
) -> Result<Vec<FetchResult>> {
    let mut results: Vec<FetchResult> = Vec::new();
    let mut jobs = Vec::new();
    for (index, &(stage, recipe)) in wanted.iter().enumerate() {
        match remote.manifest(stage, recipe) {
            Ok(Some(manifest)) => {
                let scratch =
                    store.scratch_dir(lock, &format!("pull-{stage}-{}", short(recipe)))?;
                jobs.push((index, manifest, scratch));
                results.push(Ok(None));
            }
            other => results.push(other.map(|_| None)),
        }
    }
    let bar = transfer_bar(show_progress, label);
    let pairs: Vec<(&Manifest, &Path)> = jobs
        .iter()
        .map(|(_, manifest, scratch)| (manifest, scratch.as_path()))
        .collect();
    let pulled = remote.pull_many(&pairs, &bar);
    bar.finish_and_clear();
    for ((index, manifest, scratch), outcome) in jobs.into_iter().zip(pulled) {
        results[index] = match outcome {
            Ok(transfer) => {
                store.commit(lock, &scratch, &manifest)?;
                Ok(Some((manifest, transfer)))
            }
            Err(e) => {
                std::fs::remove_dir_all(&scratch).ok();
                Err(e)
            }
        };
    }
    Ok(results)
}

/// Makes sure the remote holds a node's artifact (see [`Remote::push`]).
pub(super) fn push_node(
    remote: &Remote,
    node: &Node,
    dir: &Path,
    manifest: &Manifest,
    options: &RunOptions,
) -> Result<()> {
    if remote.writes_denied() {
        return Ok(());
    }
    let bar = transfer_bar(options.show_progress, &format!("{}: push", node.name));
    let pushed = remote.push(dir, manifest, &bar);
    bar.finish_and_clear();
    match pushed {
        Ok(Pushed::Uploaded(_) | Pushed::AlreadyThere | Pushed::Repaired(_)) => Ok(()),
        Ok(Pushed::Conflict { remote_content }) => {
            eprintln!(
                "warning: node '{}': the remote holds other bytes for this recipe (content {} there, {} here): the stage is not deterministic; the remote keeps the first",
                node.name,
                short(&remote_content),
                short(&manifest.content_hash)
            );
            Ok(())
        }
        Err(e) if is_refused(&e) => {
            eprintln!("warning: node '{}': not pushed: {e:#}", node.name);
            Ok(())
        }
        Err(e) => match denial(&e) {
            // Credentials that may read and not write: read through, keep builds here.
            Some(denied) => {
                if remote.deny_writes() {
                    eprintln!(
                        "warning: remote {}: writes are denied ({}): it is only read through, and nothing is pushed",
                        denied.url, denied.code
                    );
                }
                Ok(())
            }
            None => Err(e.context(format!("node '{}': cannot push", node.name))),
        },
    }
}
