//! `run` and `audit`: the pipeline's nodes built (or reused, or pulled), or rebuilt and
//! compared with what is stored; what the runner reports, said here.

use anyhow::Result;

use super::Session;
use crate::recipe::short;
use crate::runner::{self, Progress, RunOptions};

impl Session {
    /// `cachemoney audit`: returns whether every audited node rebuilt identically.
    pub fn audit(&self, nodes: &[String], options: &RunOptions, json: bool) -> Result<bool> {
        let started = std::time::Instant::now();
        let mut header = !json && !options.quiet;
        let width = self.pipeline.name_width();
        let outcomes = crate::audit::audit(&self.context(), nodes, options, |o| {
            if json || options.quiet {
                return Ok(());
            }
            if std::mem::take(&mut header) {
                outln!(
                    "{:<width$} {:<12} {:<10} {:>8}",
                    "node",
                    "stage",
                    "audit",
                    "seconds",
                    width = width
                );
            }
            outln!(
                "{:<width$} {:<12} {:<10} {:>7.2}s  content {}{}",
                o.node,
                o.stage,
                if o.identical { "identical" } else { "DIFFERS" },
                o.seconds,
                short(&o.content_hash),
                if o.content_hash == o.rebuilt_content_hash {
                    String::new()
                } else {
                    format!(" → {}", short(&o.rebuilt_content_hash))
                },
                width = width
            );
            for difference in &o.differences {
                outln!("  {difference}");
            }
            for note in &o.notes {
                outln!("  note: {note}");
            }
            Ok(())
        })?;
        let differing = outcomes.iter().filter(|o| !o.identical).count();
        if json {
            outln!("{}", serde_json::to_string_pretty(&outcomes)?);
        } else if !options.quiet || differing > 0 {
            outln!(
                "{} node(s) audited in {:.1}s: {} identical, {} differ",
                outcomes.len(),
                started.elapsed().as_secs_f64(),
                outcomes.len() - differing,
                differing
            );
        }
        Ok(differing == 0)
    }

    pub fn run(&self, options: &RunOptions) -> Result<()> {
        let remote = self.remote()?;
        // The legality probes' re-runs are summed up in one line, not listed.
        let width = self.pipeline.name_width_without_reruns();
        let quiet = options.quiet;
        let outcomes = runner::run(
            &self.context_with(remote.as_ref()),
            options,
            &mut |progress| {
                match progress {
                    Progress::Warning(line) => eprintln!("{line}"),
                    Progress::Note(line) if !quiet => eprintln!("{line}"),
                    Progress::Prefetched {
                        artifacts,
                        url,
                        transfer,
                    } if !quiet => outln!(
                        "pulled {artifacts} artifact(s) from {url}: {}",
                        transfer.describe()
                    ),
                    Progress::Done(o) if !quiet && !o.rerun => outln!(
                        "{:<width$} {:<12} {:<20} {:>8}  content {}",
                        o.node,
                        o.stage,
                        o.action.label(),
                        if o.seconds > 0.0 {
                            format!("{:.2}s", o.seconds)
                        } else {
                            String::new()
                        },
                        short(&o.content_hash),
                    ),
                    _ => {}
                }
                Ok(())
            },
        )?;
        let reruns: Vec<&runner::Outcome> = outcomes.iter().filter(|o| o.rerun).collect();
        if !reruns.is_empty() && !options.quiet {
            let reused = reruns
                .iter()
                .filter(|o| o.action == runner::Action::Reused)
                .count();
            let seconds: f64 = reruns.iter().map(|o| o.seconds).sum();
            outln!(
                "{} legality re-run node(s) (NODE_cutN, listed by `status`): {} built in {seconds:.2}s, {reused} reused",
                reruns.len(),
                reruns.len() - reused
            );
        }
        if !options.quiet {
            // The re-runs' own headlines (a BPB on a shuffled stream) mean nothing alone.
            for outcome in outcomes.iter().filter(|o| !o.rerun) {
                let stage = self.registry.get(&outcome.stage).expect("registered");
                if let Some(manifest) = self.store.manifest(&outcome.stage, &outcome.recipe)? {
                    if let Some(line) = stage.headline(&manifest.report) {
                        outln!("{}: {line}", outcome.node);
                    }
                }
            }
            let count = |action| outcomes.iter().filter(|o| o.action == action).count();
            let (reused, pulled) = (count(runner::Action::Reused), count(runner::Action::Pulled));
            let built = outcomes.len() - reused - pulled;
            let pulled = match pulled {
                0 => String::new(),
                n => format!(", {n} pulled"),
            };
            outln!(
                "{} node(s): {reused} reused, {built} built{pulled}",
                outcomes.len(),
            );
        }
        if !self.pipeline.seeds.is_empty() {
            let rows = self.seed_rows(&self.context().resolve()?)?;
            let lock = self.store.lock(options.wait)?;
            self.store
                .set_seeds_table(&lock, crate::seeds::to_batch(&rows))?;
            if !options.quiet {
                outln!(
                    "\nseeds table ({}; mean and sample std over {} seeds):",
                    self.store.seeds_table_path().display(),
                    self.pipeline.seeds.len()
                );
                crate::seeds::print(&rows, &self.pipeline.seeds)?;
            }
        }
        Ok(())
    }
}
