//! Artifacts computed with other kernels than this machine would use.
//!
//! A stage whose bytes depend on the processor (libtorch's) says which kernels this
//! machine would compute a node with ([`stage_api::Stage::numerics`]) and records the
//! ones it did compute with in the artifact's report. The recipe does not hold them (a
//! key that changed from machine to machine would defeat a shared remote), so where the
//! runner uses an artifact it did not just build, reused from a store another machine
//! filled or pulled from a remote, it compares the two and says so, one line per cause.
//! The runner does not know what the text means; equal text means equal kernels.

use std::collections::BTreeMap;

use stage_api::NUMERICS_KEY;

use super::RunContext;
use crate::pipeline::Node;
use crate::store::Manifest;

/// The kernels an artifact was computed with, and this machine's, where they differ.
pub(crate) fn mismatch(
    ctx: &RunContext,
    node: &Node,
    manifest: &Manifest,
) -> Option<(String, String)> {
    let stage = ctx.registry.get(&node.stage)?;
    let here = stage.numerics(&node.params)?;
    let recorded = match manifest.report.get(NUMERICS_KEY) {
        Some(serde_json::Value::String(text)) => text.clone(),
        _ => "kernels it did not record".to_string(),
    };
    (recorded != here).then_some((recorded, here))
}

/// The lines of one command, gathered so that a pipeline's many nodes (the legality
/// re-runs of a GPT chain among them) say each cause once.
#[derive(Default)]
pub(crate) struct NumericsNotes {
    by_cause: BTreeMap<(String, String), (Vec<String>, usize)>,
}

impl NumericsNotes {
    /// Notes `manifest` if it was computed with other kernels than this machine's.
    pub fn check(&mut self, ctx: &RunContext, node: &Node, manifest: &Manifest) {
        let Some(cause) = mismatch(ctx, node, manifest) else {
            return;
        };
        let (nodes, reruns) = self.by_cause.entry(cause).or_default();
        if node.rerun.is_some() {
            *reruns += 1;
        } else {
            nodes.push(node.name.clone());
        }
    }

    /// One line per cause: the nodes, what they were computed with, what this machine
    /// computes with.
    pub fn lines(&self) -> Vec<String> {
        self.by_cause
            .iter()
            .map(|((recorded, here), (nodes, reruns))| {
                let mut who = nodes.join(", ");
                if *reruns > 0 {
                    let reruns = format!("{reruns} legality re-run node(s)");
                    who = if who.is_empty() {
                        reruns
                    } else {
                        format!("{who} and {reruns}")
                    };
                }
                line(&who, recorded, here)
            })
            .collect()
    }
}

/// The one line for `who`.
pub(crate) fn line(who: &str, recorded: &str, here: &str) -> String {
    format!(
        "note: {who}: computed with {recorded}; this machine computes with {here}, so a rebuild here may give other bytes"
    )
}

#[cfg(test)]
mod tests {
    use super::line;

    #[test]
    fn the_note_is_one_line_naming_both_sides() {
        let text = line(
            "model, pass1",
            "cpu aarch64 native (x)",
            "cpu x86-64 portable (y)",
        );
        assert!(!text.contains('\n'));
        assert!(text.starts_with("note: model, pass1: computed with cpu aarch64 native (x);"));
        assert!(text.contains("this machine computes with cpu x86-64 portable (y)"));
    }
}
