//! The `order` finding (docs/eval-techniques.md §5.4): for a scorer that declares more
//! than one document order, whether one order alone explains its scores.

use stage_api::order::DocumentOrder;
use stage_api::StageError;

use crate::probes::{self, Finding, Verdict};
use crate::runs::{first_difference_at, Rerun, Run};

/// The first score that moved: the difference, the re-run that showed it, and its cut.
type FirstMove = (probes::Difference, String, usize);

/// The `order` finding for a scorer that declares its components' orders (`None` when it
/// declares none): in each declared order alone, does a score before a cut move? The
/// targets before the cut in one order but not in all are left as they were by every
/// re-run, and what a score there may read in that order too; a score that moves there
/// shows that order alone does not explain the scorer.
pub(crate) fn order_probe(
    original: &Run,
    reruns: &[Rerun],
    declared: &std::collections::BTreeMap<String, stage_api::order::DocumentOrder>,
) -> Result<Option<Finding>, StageError> {
    if declared.is_empty() {
        return Ok(None);
    }
    let listed: Vec<String> = declared
        .iter()
        .map(|(component, order)| format!("{component} = {}", order.name()))
        .collect();
    let listed = listed.join(", ");
    let orders = stage_api::order::declared_orders(declared.values());
    if orders.len() == 1 {
        return Ok(Some(Finding::pass(
            probes::ORDER,
            0,
            format!("declared {listed}: one order, in which c1-prefix tests prefix invariance"),
        )));
    }
    let mut checked = 0;
    // Per order, the first score that moved where only that order keeps the prefix.
    let mut moved: Vec<(DocumentOrder, Option<FirstMove>)> = Vec::new();
    for order in &orders {
        let mut found = None;
        for rerun in reruns {
            let Some(ordering) = &rerun.perturbed.ordering else {
                continue;
            };
            let Some(o) = ordering.orders.iter().position(|x| x == order) else {
                continue;
            };
            let c = rerun.perturbed.changed();
            let alone = |p: i64| {
                p > 0 && ordering.before_in(o, p as usize, c) && !ordering.kept(p as usize, c)
            };
            let run = rerun.read()?;
            let (a, b) = (&original.end, &run.end);
            if let Some(d) = first_difference_at(a, b, alone, a.compared_columns(), &mut checked)? {
                found = Some((d, run.label.clone(), c));
                break;
            }
        }
        moved.push((*order, found));
    }
    let consistent: Vec<&str> = moved
        .iter()
        .filter(|(_, m)| m.is_none())
        .map(|(o, _)| o.name())
        .collect();
    if !consistent.is_empty() {
        return Ok(Some(Finding::pass(
            probes::ORDER,
            checked,
            format!(
                "declared {listed}; no score moved where only {} order keeps the prefix ({checked} values): consistent with {} order alone; c1-prefix tests the declared orders together",
                consistent.join(" or "),
                consistent.join(" or ")
            ),
        )));
    }
    let lines: Vec<String> = moved
        .iter()
        .filter_map(|(order, m)| {
            let (d, label, c) = m.as_ref()?;
            Some(format!(
                "in {} order alone, {} at position {} (before the changed target {c} in that order, not in another) moved in {label} [{} vs {}]",
                order.name(),
                d.column,
                d.position,
                d.original,
                d.perturbed
            ))
        })
        .collect();
    let (first, _, _) = moved[0].1.as_ref().expect("every order moved");
    Ok(Some(Finding {
        probe: probes::ORDER,
        verdict: Verdict::Mismatch,
        checked,
        position: Some(first.position),
        expected: Some(first.original),
        observed: Some(first.perturbed),
        detail: format!(
            "declared {listed}: no single order reproduces the scores: {}; each component may still be causal in its own order (c1-prefix tests that), which is how #2135 was accepted (eval-techniques.md §5.4)",
            lines.join("; ")
        ),
    }))
}
