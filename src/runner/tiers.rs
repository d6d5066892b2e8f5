//! The store's two tiers behind one interface, as Bazel's disk-and-remote cache client
//! has them: this machine's store, then the remote (when there is one and not
//! `--offline`). A lookup falls through from here to the remote (read-through); a commit
//! goes to both (write-through). The remote itself ([`crate::remote`]) knows nothing of
//! the store, and the runner's loop knows nothing of the remote: this is where they meet.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;

use super::{NodeState, Progress, Resolved};
use crate::pipeline::Node;
use crate::recipe::short;
use crate::remote::{denial, is_refused, transfer_bar, Pushed, Remote, Transfer};
use crate::store::{Manifest, Store, StoreLock, Stored};

impl Resolved {
    /// Whether `run` and `pull` fetch it: the remote holds its current recipe and this
    /// store does not (intact).
    pub fn only_on_remote(&self) -> bool {
        self.remote == Some(true) && !matches!(self.state, NodeState::Cached { .. })
    }
}

/// Where a lookup found a node's artifact.
pub(super) enum Found {
    /// Stored here, intact.
    Here(Manifest),
    /// Fetched from the remote and committed here; `seconds` is the transfer's (0 for
    /// one fetched with others before the run, whose time was said then).
    Fetched { manifest: Manifest, seconds: f64 },
    /// In neither tier, or forced: to be built. What this store holds for the recipe
    /// (damaged, or intact and forced), which the build is compared with.
    Neither(Stored),
}

/// How the artifact a commit keeps came to be.
pub(super) enum Commit<'p> {
    /// Built into this scratch directory: committed here, then pushed.
    Built(&'p Path),
    /// Already here (reused, or rebuilt with the same bytes): pushed, so that a run
    /// killed between its commit and its upload finishes the upload now.
    Here,
    /// Fetched from the remote: both tiers hold it already.
    Fetched,
}

/// This store, then the remote: lookups fall through, commits go to both.
pub(super) struct Tiers<'a> {
    store: &'a Store,
    remote: Option<&'a Remote>,
    lock: &'a StoreLock,
    show_progress: bool,
    /// Fetched together before the run.
    prefetched: BTreeSet<String>,
    /// Nodes whose remote artifact was refused (it failed verification): built here.
    refused: BTreeSet<String>,
}

impl<'a> Tiers<'a> {
    pub fn new(
        store: &'a Store,
        remote: Option<&'a Remote>,
        lock: &'a StoreLock,
        show_progress: bool,
    ) -> Self {
        Tiers {
            store,
            remote,
            lock,
            show_progress,
            prefetched: BTreeSet::new(),
            refused: BTreeSet::new(),
        }
    }

    pub fn has_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// Read-through, all at once: fetches every `wanted` node the remote holds and this
    /// store lacks (recipes resolved through the remote's manifests), the files of many
    /// small artifacts together, before anything is built.
    pub fn prefetch(
        &mut self,
        wanted: &[&Resolved],
        progress: &mut dyn FnMut(Progress) -> Result<()>,
    ) -> Result<()> {
        let Some(remote) = self.remote else {
            return Ok(());
        };
        let wanted: Vec<&Resolved> = wanted
            .iter()
            .copied()
            .filter(|r| r.only_on_remote())
            .collect();
        let started = Instant::now();
        let results = fetch_resolved(self.store, remote, &wanted, self.lock, self.show_progress)?;
        let mut total = Transfer::default();
        for (r, result) in wanted.iter().zip(results) {
            match result {
                Ok(Some((_, transfer))) => {
                    total.add(transfer);
                    self.prefetched.insert(r.node.clone());
                }
                Ok(None) => {}
                Err(e) if is_refused(&e) => {
                    progress(building_here_instead(&r.node, &e))?;
                    self.refused.insert(r.node.clone());
                }
                Err(e) => return Err(e.context(format!("node '{}': cannot pull", r.node))),
            }
        }
        // Fetched together: the time is the batch's, said once.
        total.seconds = started.elapsed().as_secs_f64();
        if !self.prefetched.is_empty() {
            progress(Progress::Prefetched {
                artifacts: self.prefetched.len(),
                url: remote.url(),
                transfer: &total,
            })?;
        }
        Ok(())
    }

    /// The node's artifact for `recipe`: here, else fetched from the remote, else
    /// neither. A forced node is never looked up: it is to be built. A remote artifact
    /// that fails verification is said and not used (the node is then built here, and
    /// its push repairs the remote); an unreachable remote is an error.
    pub fn lookup(
        &mut self,
        node: &Node,
        recipe: &str,
        forced: bool,
        progress: &mut dyn FnMut(Progress) -> Result<()>,
    ) -> Result<Found> {
        let stored = self.store.lookup(&node.stage, recipe);
        if forced {
            return Ok(Found::Neither(stored));
        }
        if let Stored::Intact(manifest) = stored {
            return Ok(match self.prefetched.contains(&node.name) {
                true => Found::Fetched {
                    manifest,
                    seconds: 0.0,
                },
                false => Found::Here(manifest),
            });
        }
        let Some(remote) = self.remote.filter(|_| !self.refused.contains(&node.name)) else {
            return Ok(Found::Neither(stored));
        };
        let label = format!("{}: pull", node.name);
        let wanted = [(node.stage.as_str(), recipe)];
        let fetched = fetch_many(
            self.store,
            remote,
            &wanted,
            &label,
            self.lock,
            self.show_progress,
        )?
        .pop()
        .expect("one result per artifact");
        match fetched {
            Ok(Some((manifest, transfer))) => Ok(Found::Fetched {
                manifest,
                seconds: transfer.seconds,
            }),
            Ok(None) => Ok(Found::Neither(stored)),
            Err(e) if is_refused(&e) => {
                progress(building_here_instead(&node.name, &e))?;
                Ok(Found::Neither(stored))
            }
            Err(e) => Err(e.context(format!("node '{}': cannot pull", node.name))),
        }
    }

    /// Keeps a node's artifact in both tiers (see [`Commit`]).
    pub fn commit(
        &self,
        node: &Node,
        recipe: &str,
        manifest: &Manifest,
        how: Commit,
        progress: &mut dyn FnMut(Progress) -> Result<()>,
    ) -> Result<()> {
        match how {
            Commit::Built(scratch) => {
                self.store.commit(self.lock, scratch, manifest)?;
            }
            Commit::Here => {}
            Commit::Fetched => return Ok(()),
        }
        match self.remote {
            Some(remote) => {
                let dir = self.store.artifact_dir(&node.stage, recipe);
                push(remote, node, &dir, manifest, self.show_progress, progress)
            }
            None => Ok(()),
        }
    }
}

/// A refused remote artifact, in `run`: said, and the node built here.
fn building_here_instead(node: &str, error: &anyhow::Error) -> Progress<'static> {
    Progress::Warning(format!(
        "node '{node}': {}; building it here instead",
        format!("{error:#}").replace('\n', " ")
    ))
}

/// Makes sure the remote holds a node's artifact (see [`Remote::push`]).
fn push(
    remote: &Remote,
    node: &Node,
    dir: &Path,
    manifest: &Manifest,
    show_progress: bool,
    progress: &mut dyn FnMut(Progress) -> Result<()>,
) -> Result<()> {
    if remote.writes_denied() {
        return Ok(());
    }
    let bar = transfer_bar(show_progress, &format!("{}: push", node.name));
    let pushed = remote.push(dir, manifest, &bar);
    bar.finish_and_clear();
    match pushed {
        Ok(Pushed::Uploaded(_) | Pushed::AlreadyThere | Pushed::Repaired(_)) => Ok(()),
        Ok(Pushed::Conflict { remote_content }) => progress(Progress::Warning(format!(
            "warning: node '{}': the remote holds other bytes for this recipe (content {} there, {} here): the stage is not deterministic; the remote keeps the first",
            node.name,
            short(&remote_content),
            short(&manifest.content_hash)
        ))),
        Err(e) if is_refused(&e) => progress(Progress::Warning(format!(
            "warning: node '{}': not pushed: {e:#}",
            node.name
        ))),
        Err(e) => match denial(&e) {
            // Credentials that may read and not write: read through, keep builds here.
            Some(denied) => {
                if remote.deny_writes() {
                    progress(Progress::Warning(format!(
                        "warning: remote {}: writes are denied ({}): it is only read through, and nothing is pushed",
                        denied.url, denied.code
                    )))?;
                }
                Ok(())
            }
            None => Err(e.context(format!("node '{}': cannot push", node.name))),
        },
    }
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
