//! `push`, `pull`, `remote gc --dry-run`, and `status` beside a remote (see
//! [`crate::remote`] for the remote's layout and guarantees).

use std::collections::BTreeSet;

use anyhow::{anyhow, Result};

use super::{state_and_detail, Session};
use crate::recipe::short;
use crate::remote::{is_refused, transfer_bar, Pushed, Remote, Transfer};
use crate::runner::{self, NodeState, Resolved};
use crate::store::NodeRef;

/// `status` with a remote: one more column, whether the remote holds the node's recipe.
pub(super) fn print_status(resolved: &[Resolved], remote: &Remote, width: usize) -> Result<()> {
    outln!("remote {}", remote.url());
    outln!(
        "{:<width$} {:<12} {:<8} {:<7} detail",
        "node",
        "stage",
        "state",
        "remote"
    );
    for r in resolved {
        let (state, mut detail) = state_and_detail(&r.state);
        let on_remote = match (r.remote, &r.remote_refused) {
            (_, Some(_)) => "refused",
            (Some(true), _) => "yes",
            (Some(false), _) => "no",
            (None, _) => "-",
        };
        if let Some(why) = &r.remote_refused {
            detail.push_str(&format!(
                "; the remote's copy is refused ({why}): `cachemoney run` builds it here"
            ));
        } else if r.remote == Some(true) && !matches!(r.state, NodeState::Cached { .. }) {
            detail.push_str("; on the remote: `cachemoney pull` or `run` fetches it");
        }
        outln!(
            "{:<width$} {:<12} {:<8} {:<7} {}",
            r.node,
            r.stage,
            state,
            on_remote,
            detail
        );
    }
    Ok(())
}

/// How many of what, for the closing line of `push` and `pull`.
#[derive(Default)]
struct Tally {
    moved: usize,
    transfer: Transfer,
    already: usize,
    absent: usize,
    failed: usize,
    /// Legality re-runs (`NODE_cutN`) are counted, not listed.
    reruns: usize,
}

impl Session {
    fn required_remote(&self, command: &str) -> Result<Remote> {
        if self.offline {
            anyhow::bail!("{command}: --offline leaves no remote to {command} with");
        }
        self.remote()?.ok_or_else(|| {
            anyhow!(
                "{command}: no remote; set `remote = \"s3://bucket/prefix\"` in {} or pass --remote URL",
                self.pipeline.path.display()
            )
        })
    }

    /// The nodes a command names (seed copies included), or every node.
    fn selected(&self, nodes: &[String]) -> Result<Option<BTreeSet<String>>> {
        if nodes.is_empty() {
            return Ok(None);
        }
        let mut selected = BTreeSet::new();
        for name in nodes {
            for node in self.pipeline.nodes_named(name)? {
                selected.insert(node.name.clone());
            }
        }
        Ok(Some(selected))
    }

    /// `cachemoney push`: makes sure the remote holds the current artifact of every
    /// built node (or of those named). Returns whether nothing failed.
    pub fn push(&self, nodes: &[String], quiet: bool, show_progress: bool) -> Result<bool> {
        let remote = self.required_remote("push")?;
        let selected = self.selected(nodes)?;
        let resolved = self.context().resolve()?;
        let width = self.pipeline.name_width();
        let mut tally = Tally::default();
        for r in &resolved {
            if selected.as_ref().is_some_and(|s| !s.contains(&r.node)) {
                continue;
            }
            tally.reruns += usize::from(r.rerun);
            let (NodeState::Cached { .. }, Some(recipe)) = (&r.state, &r.recipe) else {
                tally.absent += 1;
                if !quiet && !r.rerun {
                    outln!(
                        "{:<width$} {:<12} {:<14} its current recipe is not in the local store; `cachemoney run` builds it",
                        r.node,
                        r.stage,
                        "not built",
                    );
                }
                continue;
            };
            let manifest = self
                .store
                .manifest(&r.stage, recipe)?
                .ok_or_else(|| anyhow!("node '{}': its manifest vanished", r.node))?;
            let dir = self.store.artifact_dir(&r.stage, recipe);
            let bar = transfer_bar(show_progress, &format!("{}: push", r.node));
            let pushed = remote.push(&dir, &manifest, &bar);
            bar.finish_and_clear();
            let (label, detail) = match pushed {
                Ok(Pushed::Uploaded(transfer)) => {
                    tally.moved += 1;
                    tally.transfer.add(transfer);
                    ("pushed", transfer.describe())
                }
                Ok(Pushed::Repaired(transfer)) => {
                    tally.moved += 1;
                    tally.transfer.add(transfer);
                    ("repaired", format!("{} re-uploaded", transfer.describe()))
                }
                Ok(Pushed::AlreadyThere) => {
                    tally.already += 1;
                    ("already there", String::new())
                }
                Ok(Pushed::Conflict { remote_content }) => {
                    tally.failed += 1;
                    (
                        "CONFLICT",
                        format!(
                            "the remote holds content {} for this recipe, this store {}: the stage is not deterministic; the remote keeps the first",
                            short(&remote_content),
                            short(&manifest.content_hash)
                        ),
                    )
                }
                Err(e) if is_refused(&e) => {
                    tally.failed += 1;
                    ("REFUSED", format!("{e:#}"))
                }
                Err(e) => return Err(e.context(format!("node '{}': cannot push", r.node))),
            };
            if !quiet && !r.rerun {
                outln!(
                    "{:<width$} {:<12} {:<14} content {}  {detail}",
                    r.node,
                    r.stage,
                    label,
                    short(&manifest.content_hash)
                );
            }
        }
        if !quiet || tally.failed > 0 {
            print_tally(&tally, "pushed", remote.url())?;
        }
        Ok(tally.failed == 0)
    }

    /// `cachemoney pull`: fetches from the remote every node (or those named) whose
    /// current recipe the remote holds and this store lacks, verifying each file.
    /// Recipes resolve through the remote's manifests, so `pull pass2` needs neither
    /// the GPT nor pass 1 here. Returns whether nothing was refused.
    pub fn pull(
        &self,
        nodes: &[String],
        wait: bool,
        quiet: bool,
        show_progress: bool,
    ) -> Result<bool> {
        let remote = self.required_remote("pull")?;
        let selected = self.selected(nodes)?;
        let lock = self.store.lock(wait)?;
        self.store.sweep_tmp(&lock)?;
        let ctx = self.context_with(Some(&remote));
        let resolved = ctx.resolve()?;
        let width = self.pipeline.name_width();
        let mut tally = Tally::default();
        let mut numerics = runner::NumericsNotes::default();
        // What to fetch: all of it at once (many small artifacts are bound by round
        // trips), then one line per node in pipeline order.
        let wanted: Vec<&Resolved> = resolved
            .iter()
            .filter(|r| selected.as_ref().is_none_or(|s| s.contains(&r.node)) && r.only_on_remote())
            .collect();
        let started = std::time::Instant::now();
        let fetched = runner::fetch_resolved(&self.store, &remote, &wanted, &lock, show_progress)?;
        let seconds = started.elapsed().as_secs_f64();
        let mut outcomes: std::collections::BTreeMap<&str, _> = wanted
            .iter()
            .map(|r| r.node.as_str())
            .zip(fetched)
            .collect();
        for r in &resolved {
            if selected.as_ref().is_some_and(|s| !s.contains(&r.node)) {
                continue;
            }
            tally.reruns += usize::from(r.rerun);
            let line = |label: &str, detail: &str| {
                if !quiet && !r.rerun {
                    outln!("{:<width$} {:<12} {:<14} {detail}", r.node, r.stage, label);
                }
                anyhow::Ok(())
            };
            if let NodeState::Cached { content_hash } = &r.state {
                tally.already += 1;
                line("here already", &format!("content {}", short(content_hash)))?;
                continue;
            }
            let (Some(recipe), Some(ingredients), Some(outcome)) =
                (&r.recipe, &r.ingredients, outcomes.remove(r.node.as_str()))
            else {
                tally.absent += 1;
                line(
                    "not on remote",
                    "its current recipe is not in the remote either",
                )?;
                continue;
            };
            match outcome {
                Ok(Some((manifest, transfer))) => {
                    self.store.set_node_ref(
                        &lock,
                        &r.node,
                        &NodeRef {
                            recipe: recipe.clone(),
                            content_hash: manifest.content_hash.clone(),
                            ingredients: ingredients.clone(),
                        },
                    )?;
                    numerics.check(&ctx, self.pipeline.node(&r.node)?, &manifest);
                    tally.moved += 1;
                    tally.transfer.add(transfer);
                    line(
                        "pulled",
                        &format!(
                            "content {}  {} file(s), {:.1} MB",
                            short(&manifest.content_hash),
                            transfer.files,
                            transfer.bytes as f64 / 1e6
                        ),
                    )?;
                }
                Ok(None) => {
                    tally.absent += 1;
                    line("not on remote", "removed from the remote meanwhile")?;
                }
                Err(e) if is_refused(&e) => {
                    tally.failed += 1;
                    eprintln!("node '{}': {}", r.node, format!("{e:#}").replace('\n', " "));
                }
                Err(e) => return Err(e.context(format!("node '{}': cannot pull", r.node))),
            }
        }
        tally.transfer.seconds = seconds;
        if !quiet || tally.failed > 0 {
            print_tally(&tally, "pulled", remote.url())?;
        }
        for line in numerics.lines() {
            eprintln!("{line}");
        }
        Ok(tally.failed == 0)
    }

    /// `cachemoney remote gc --dry-run`: what in the remote no manifest references, and
    /// which manifests name blobs the remote lacks (neither should exist but for
    /// interrupted uploads and tampering). Deletes nothing.
    pub fn remote_gc(&self, dry_run: bool) -> Result<bool> {
        if !dry_run {
            anyhow::bail!(
                "remote gc: only --dry-run exists: cachemoney never deletes remote objects (others' pipelines may need them); delete with your storage's own tools or lifecycle rules"
            );
        }
        let remote = self.required_remote("remote gc")?;
        let inventory = remote.inventory()?;
        let mut referenced = BTreeSet::new();
        let mut broken = 0;
        for (name, manifest) in &inventory.manifests {
            for (file, output) in &manifest.files {
                referenced.insert(output.blake3.clone());
                match inventory.blobs.get(&output.blake3) {
                    Some((_, bytes)) if *bytes == output.bytes => {}
                    Some((_, bytes)) => {
                        broken += 1;
                        outln!("broken {name}: file '{file}' has {bytes} bytes there, {} in the manifest", output.bytes);
                    }
                    None => {
                        broken += 1;
                        outln!(
                            "broken {name}: file '{file}' (blob {}) is missing",
                            short(&output.blake3)
                        );
                    }
                }
            }
        }
        for problem in &inventory.unreadable {
            broken += 1;
            outln!("broken {problem}");
        }
        let (mut orphans, mut orphan_bytes, mut kept_bytes) = (0usize, 0u64, 0u64);
        for (hash, (name, bytes)) in &inventory.blobs {
            if referenced.contains(hash) {
                kept_bytes += bytes;
            } else {
                orphans += 1;
                orphan_bytes += bytes;
                outln!("would remove {name} ({bytes} bytes, referenced by no manifest)");
            }
        }
        outln!(
            "{}: {} manifest(s) referencing {} blob(s), {kept_bytes} bytes; {orphans} unreferenced blob(s), {orphan_bytes} bytes; {broken} broken manifest(s)",
            remote.url(),
            inventory.manifests.len(),
            referenced.len(),
        );
        outln!("nothing was deleted: cachemoney never deletes remote objects");
        Ok(broken == 0)
    }
}

fn print_tally(tally: &Tally, verb: &str, url: &str) -> anyhow::Result<()> {
    if tally.reruns > 0 {
        outln!(
            "{} legality re-run node(s) (NODE_cutN) among them",
            tally.reruns
        );
    }
    let moved = match tally.moved {
        0 => format!("0 {verb}"),
        n => format!("{n} {verb} ({})", tally.transfer.describe()),
    };
    let mut line = format!(
        "{url}: {moved}, {} already there, {} not available",
        tally.already, tally.absent
    );
    if tally.failed > 0 {
        line.push_str(&format!(", {} FAILED", tally.failed));
    }
    outln!("{line}");
    Ok(())
}
