//! The probes on a chain's runs: each reads what it needs of them and returns one
//! finding with its evidence (the checks themselves are pure, in [`crate::probes`]).

use std::collections::BTreeSet;

use arrow::datatypes::{Float64Type, Int64Type, UInt16Type, UInt32Type, UInt8Type};
use stage_api::{read_column, StageContext, StageError};

use crate::perturb::{Kind, Perturbed};
use crate::probes::{self, Finding, Verdict};
use crate::runs::{first_difference, first_difference_at, unchanged_after_cut, Rerun, Run};
use crate::stages::LegalityParams;

pub(crate) fn prefix_probe(original: &Run, reruns: &[Rerun]) -> Result<Finding, StageError> {
    if reruns.is_empty() {
        return Ok(Finding::fail(
            probes::PREFIX,
            0,
            0,
            0.0,
            0.0,
            "cannot be verified: no re-runs (params.cuts is empty)",
        ));
    }
    let mut checked = 0;
    let asked_in_original: BTreeSet<i64> =
        original.distributions().iter().map(|(p, _)| *p).collect();
    let mut asked_only_in_reruns = BTreeSet::new();
    for rerun in reruns {
        let run = rerun.read()?;
        if let Some(failure) = prefix_failure(original, run, &rerun.perturbed, &mut checked)? {
            return Ok(failure);
        }
        let perturbed = &rerun.perturbed;
        asked_only_in_reruns.extend(
            run.distributions()
                .iter()
                .map(|(p, _)| *p)
                .filter(|p| perturbed.kept(*p) && !asked_in_original.contains(p)),
        );
    }
    let n = asked_only_in_reruns.len();
    let cuts: Vec<String> = reruns.iter().map(|r| r.perturbed.cut.to_string()).collect();
    // A replace cut falls in 5%–50% only: anywhere else only the shuffles reach.
    let shuffles = reruns
        .iter()
        .filter(|r| r.perturbed.kind == crate::perturb::Kind::Shuffle)
        .count();
    // Where a run-consistent read-ahead shows: the entry before each cut, and the
    // changed target whose distribution `c1-target` compares (red team round 6).
    let looks = reruns.len() + 1;
    let order = reruns
        .iter()
        .find_map(|r| r.perturbed.ordering.as_ref())
        .map_or(String::new(), |o| {
            format!(" in every declared order ({})", o.describe())
        });
    Ok(Finding::pass(
        probes::PREFIX,
        checked,
        format!(
            "{checked} values before the secret cuts{order} (after positions {}) bit-identical when everything after each cut changes; {n} positions before the cuts were asked about only in a re-run, where the distribution must give the model_p the original scored: a scorer honest only where it is asked escapes them with probability (1−f)^{n} when it cheats at a fraction f of positions (5% once f ≥ {:.3}%); a leak confined to a fraction r of the stream escapes the {shuffles} shuffle cuts (which fall anywhere) with probability about (1−r)^{shuffles}, and the replace cuts too when it lies outside 5%–50%; a read-ahead that is the same in every run, scattered over a fraction f of positions, shows only where a cut changes the next token and keeps the prefix (one position per cut, and the changed target): it escapes with probability about (1−f)^{looks} ({:.2} at f = 5%; more cuts, up to 8, for a number in dispute)",
            cuts.join(", "),
            escape_fraction(n),
            0.95f64.powi(looks as i32),
        ),
    ))
}

/// One re-run against the original: a score or an asked distribution before the cut
/// that moved, or a model that scored the changed stream exactly as the original (it did
/// not read what it was given), as the failing finding; `checked` counts the values
/// compared.
fn prefix_failure(
    original: &Run,
    run: &Run,
    perturbed: &Perturbed,
    checked: &mut u64,
) -> Result<Option<Finding>, StageError> {
    let cut = perturbed.cut as i64;
    let what = match perturbed.kind {
        Kind::Shuffle => "shuffled",
        Kind::Replace => "changed",
    };
    // What changed, and where the kept targets lie.
    let (changed, before) = match &perturbed.ordering {
        None => (
            format!("the stream after position {cut} was {what}"),
            "before the cut".to_string(),
        ),
        Some(o) => (
            format!(
                "the targets from {} on in {} order were {what}",
                perturbed.changed(),
                o.describe()
            ),
            "before the cut in every declared order".to_string(),
        ),
    };
    let mut tables = vec![(&original.end, &run.end)];
    if !original.end_is_model {
        tables.push((original.model(), run.model()));
    }
    for (a, b) in tables {
        let difference = match perturbed.ordering {
            None => first_difference(a, b, cut, checked)?,
            Some(_) => {
                first_difference_at(a, b, |p| perturbed.kept(p), a.compared_columns(), checked)?
            }
        };
        if let Some(d) = difference {
            return Ok(Some(Finding::fail(
                probes::PREFIX,
                *checked,
                d.position,
                d.original,
                d.perturbed,
                format!("{}: {changed}, and {} at position {} ({before}) changed: the score depends on later tokens", run.label, d.column, d.position),
            )));
        }
    }
    // Distributions asked of both runs up to the cut must not move either.
    for (position, probs) in original
        .distributions()
        .iter()
        .filter(|(p, _)| perturbed.kept(*p))
    {
        let Some(other) = run.distribution_at(*position) else {
            continue;
        };
        *checked += probs.len() as u64;
        if let Some((v, a, b)) = probes::first_distribution_difference(probs, other) {
            return Ok(Some(Finding::fail(
                probes::PREFIX,
                *checked,
                *position,
                a as f64,
                b as f64,
                format!(
                    "{}: {changed}, and p(candidate {v}) at position {position} ({before}) changed",
                    run.label
                ),
            )));
        }
    }
    let unchanged = match &perturbed.ordering {
        None => unchanged_after_cut(original.model(), run.model(), cut)?,
        Some(o) => {
            let c = perturbed.changed();
            let later = |p: i64| p > 0 && p as usize != c && o.changeable(p as usize, c);
            let mut compared = 0;
            let moved = first_difference_at(
                original.model(),
                run.model(),
                later,
                &["model_p"],
                &mut compared,
            )?;
            moved.is_none() && compared > 0
        }
    };
    if unchanged {
        return Ok(Some(Finding::fail(
            probes::PREFIX,
            *checked,
            cut + 1,
            0.0,
            0.0,
            format!("cannot be verified: in {}, the model scored every target after the cut exactly as in the original run, although the stream there changed: it did not read the stream it was given (an imported table?)", run.label),
        )));
    }
    Ok(None)
}

/// The fraction f of cheated positions above which a cheat escapes `n` checked positions
/// with probability below 5%: (1 − f)^n = 0.05, in percent.
pub(crate) fn escape_fraction(n: usize) -> f64 {
    if n == 0 {
        return 100.0;
    }
    100.0 * (1.0 - 0.05f64.powf(1.0 / n as f64))
}

pub(crate) fn target_probe(
    ctx: &StageContext,
    original: &Run,
    reruns: &[Rerun],
    tokens: &[u16],
) -> Result<Finding, StageError> {
    let model = model_target_probe(original, reruns, tokens)?;
    if original.end_is_model || model.verdict == Verdict::Fail {
        return Ok(model);
    }
    // A cache chain: its model, then its rule.
    let rule = cache_target_probe(ctx)?;
    if rule.verdict == Verdict::Fail {
        return Ok(rule);
    }
    Ok(Finding {
        detail: format!(
            "the model: {}; the cache rule: {}",
            model.detail, rule.detail
        ),
        checked: model.checked + rule.checked,
        ..rule
    })
}

pub(crate) fn model_target_probe(
    original: &Run,
    reruns: &[Rerun],
    tokens: &[u16],
) -> Result<Finding, StageError> {
    let mut checked = 0;
    let mut compared = Vec::new();
    let original_first = original
        .model()
        .first_rows(reruns.iter().map(|r| r.perturbed.changed() as i64));
    for rerun in reruns {
        let t = rerun.perturbed.changed() as i64;
        let (from, to) = (tokens[t as usize], rerun.perturbed.tokens[t as usize]);
        if from == to {
            continue;
        }
        let run = rerun.read()?;
        let (Some(a), Some(b)) = (original.distribution_at(t), run.distribution_at(t)) else {
            continue;
        };
        checked += a.len() as u64;
        if let Some((v, pa, pb)) = probes::first_distribution_difference(a, b) {
            return Ok(Finding::fail(
                probes::TARGET,
                checked,
                t,
                pa as f64,
                pb as f64,
                format!(
                    "{}: with the same prefix, replacing the target at {t} ({from} -> {to}{}) moved p(candidate {v}): the distribution depends on the target",
                    run.label,
                    match rerun.perturbed.aimed {
                        Some(h) => format!(", across the hint {h} that fires there"),
                        None => String::new(),
                    }
                ),
            ));
        }
        // The entropy weights the cache in the blend: it may not see the target either.
        let rerun_first = run.model().first_rows([t]);
        if let (Some(&ra), Some(&rb)) = (original_first.get(&t), rerun_first.get(&t)) {
            checked += 1;
            let ha = original.model().values_at("entropy", &[ra])?[0];
            let hb = run.model().values_at("entropy", &[rb])?[0];
            if ha.to_bits() != hb.to_bits() {
                return Ok(Finding::fail(
                    probes::TARGET,
                    checked,
                    t,
                    ha,
                    hb,
                    format!("{}: with the same prefix, replacing the target at {t} ({from} -> {to}) moved the entropy the blend reads: it depends on the target", run.label),
                ));
            }
        }
        compared.push(format!("{t} ({from} -> {to})"));
    }
    if compared.is_empty() {
        return Ok(Finding::fail(
            probes::TARGET,
            0,
            0,
            0.0,
            0.0,
            "cannot be verified: the original run kept no distribution at any re-run's changed target (pass-1's mass_sample is 0, or an imported table)",
        ));
    }
    Ok(Finding::pass(
        probes::TARGET,
        checked,
        format!(
            "the whole distribution and the entropy unchanged, bit for bit, when only the target changes at {}",
            compared.join(", ")
        ),
    ))
}

/// A cache rule's choice (n-gram order, phrase length) evaluated with every candidate
/// as the target must be the same choice: else the distribution moves with the target.
pub(crate) fn cache_target_probe(ctx: &StageContext) -> Result<Finding, StageError> {
    let Some(mass) = ctx.inputs.get("mass") else {
        return Ok(Finding::fail(
            probes::TARGET,
            0,
            0,
            0.0,
            0.0,
            "cannot be verified: the cache rule's choices are read from its audit-mass node; wire it as inputs.mass",
        ));
    };
    let path = mass.file("mass.parquet");
    let position = read_column::<Int64Type>(&path, "position")?;
    let states = read_column::<UInt32Type>(&path, "states")?;
    let moved = states.iter().filter(|&&s| s > 1).count();
    let Some(row) = states.iter().position(|&s| s > 1) else {
        return Ok(Finding::pass(
            probes::TARGET,
            position.len() as u64,
            format!(
                "at {} sampled positions, the rule makes the same choice whatever the target",
                position.len()
            ),
        ));
    };
    let u8s = |name| read_column::<UInt8Type>(&path, name);
    let u16s = |name| read_column::<UInt16Type>(&path, name);
    let (target_order, other_order) = (u8s("target_order")?[row], u8s("other_order")?[row]);
    let (target_length, other_length) = (u16s("target_length")?[row], u16s("other_length")?[row]);
    let other = u16s("other_token")?[row];
    Ok(Finding::fail(
        probes::TARGET,
        position.len() as u64,
        position[row],
        target_order as f64,
        other_order as f64,
        format!(
            "the rule's choice depends on the target at {moved} of {} sampled positions; at position {}: n-gram order {target_order}, phrase length {target_length} for the true target, order {other_order}, length {other_length} had the target been {other}",
            position.len(),
            position[row]
        ),
    ))
}

/// C2 of every run's distributions, each against what that run scored; and for a cache
/// chain, the implied mass of its final distribution.
pub(crate) fn normalised_probe(
    ctx: &StageContext,
    original: &Run,
    reruns: &[Rerun],
    tokens: &[u16],
    tolerance: f64,
) -> Result<Finding, StageError> {
    let mut checked = 0;
    let mut worst: Option<(i64, f64)> = None;
    let mut with_distributions = 0;
    for index in 0..=reruns.len() {
        let (run, stream) = match index {
            0 => (original, tokens),
            i => (
                reruns[i - 1].read()?,
                reruns[i - 1].perturbed.tokens.as_slice(),
            ),
        };
        // Only the rows of the asked-about positions are read.
        let first = run
            .model()
            .first_rows(run.distributions().iter().map(|(p, _)| *p));
        let rows: Vec<usize> = first.values().copied().collect();
        let model_p = run.model().values_at("model_p", &rows)?;
        let entropy = run.model().values_at("entropy", &rows)?;
        let scored: std::collections::HashMap<i64, (f32, f32)> = first
            .keys()
            .zip(model_p.iter().zip(&entropy))
            .map(|(&p, (&m, &h))| (p, (m as f32, h as f32)))
            .collect();
        let scored_at = |p: i64| scored.get(&p).copied();
        match probes::check_distributions(
            &run.label,
            run.distributions(),
            stream,
            scored_at,
            tolerance,
        ) {
            Err(failure) => return Ok(failure),
            Ok((n, run_worst)) => {
                checked += n;
                with_distributions += usize::from(n > 0);
                if let Some((p, s)) = run_worst {
                    if worst.is_none_or(|(_, w)| (s - 1.0).abs() > (w - 1.0).abs()) {
                        worst = Some((p, s));
                    }
                }
            }
        }
    }
    let Some((position, sum)) = worst else {
        return Ok(Finding::fail(
            probes::NORMALISED,
            0,
            0,
            1.0,
            f64::NAN,
            "cannot be verified: no run kept a distribution (an imported table keeps none)",
        ));
    };
    let model = Finding {
        position: Some(position),
        expected: Some(1.0),
        observed: Some(sum),
        ..Finding::pass(
            probes::NORMALISED,
            checked,
            format!(
                "Σ_v p(v) at {checked} positions in {with_distributions} runs, each equal at its target to the model_p the run scored, with the entropy it scored; worst {sum:.9} at position {position}; tolerance {tolerance:e}"
            ),
        )
    };
    if original.end_is_model {
        return Ok(model);
    }
    let rule = cache_normalised_probe(ctx, tolerance)?;
    if rule.verdict == Verdict::Fail {
        return Ok(rule);
    }
    Ok(Finding {
        detail: format!("the model: {}; the chain: {}", model.detail, rule.detail),
        checked: model.checked + rule.checked,
        ..rule
    })
}

pub(crate) fn cache_normalised_probe(
    ctx: &StageContext,
    tolerance: f64,
) -> Result<Finding, StageError> {
    let Some(mass) = ctx.inputs.get("mass") else {
        return Ok(Finding::fail(
            probes::NORMALISED,
            0,
            0,
            1.0,
            f64::NAN,
            "cannot be verified: the cache chain's implied mass is read from its audit-mass node; wire it as inputs.mass",
        ));
    };
    let path = mass.file("mass.parquet");
    Ok(probes::check_mass(
        &read_column::<Int64Type>(&path, "position")?,
        &read_column::<Float64Type>(&path, "mass")?,
        tolerance,
    ))
}

/// The replace re-runs' importance weights p(u)/q(u) at their hidden targets, from the
/// probability the chain's last stage scored each with.
pub(crate) fn blind_probe(
    reruns: &[Rerun],
    params: &LegalityParams,
) -> Result<Finding, StageError> {
    let mut weights = Vec::new();
    let mut replaced = 0;
    for rerun in reruns.iter().filter(|r| r.perturbed.kind == Kind::Replace) {
        replaced += 1;
        let run = rerun.read()?;
        let end = &run.end;
        let first = end.first_rows(rerun.perturbed.hidden.iter().map(|h| h.position));
        let found: Vec<_> = rerun
            .perturbed
            .hidden
            .iter()
            .filter_map(|h| Some((h, *first.get(&h.position)?)))
            .collect();
        let rows: Vec<usize> = found.iter().map(|(_, row)| *row).collect();
        let scored = end.values_at(end.scored_column(), &rows)?;
        for ((hidden, _), p) in found.iter().zip(scored) {
            weights.push((hidden.position, p / hidden.q));
        }
    }
    if replaced == 0 {
        return Ok(Finding::fail(
            probes::BLIND,
            0,
            0,
            1.0,
            f64::NAN,
            "cannot be verified: no re-run replaces targets (params.cuts has no kind = \"replace\" entry)",
        ));
    }
    let z = probes::one_sided_z(params.false_alarm);
    Ok(probes::check_blind(
        &weights,
        z,
        params.blind_tolerance,
        params.false_alarm,
    ))
}

/// Whether every run of a scorer process was confined; a built-in source is the
/// project's own code and has nothing to confine.
pub(crate) fn sandbox_probe(original: &Run, reruns: &[Rerun]) -> Finding {
    let runs = std::iter::once((original.label.clone(), original.model_dir.clone())).chain(
        reruns
            .iter()
            .map(|r| (r.label.clone(), r.model.unwrap_or(r.end).dir.clone())),
    );
    let mut reports = Vec::new();
    for (label, dir) in runs {
        let path = dir.join("sandbox.json");
        if !path.exists() {
            continue;
        }
        let isolation = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<sandbox::Isolation>(&b).ok());
        match isolation {
            Some(i) if i.confined() => reports.push(i.describe()),
            Some(i) => {
                return Finding::fail(
                    probes::SANDBOX,
                    reports.len() as u64 + 1,
                    0,
                    1.0,
                    0.0,
                    format!("the verdicts above were reached without a sandbox: {label} ran with {}: the scorer could read the store (the original stream among it) and keep state between runs", i.describe()),
                )
            }
            None => {
                return Finding::fail(
                    probes::SANDBOX,
                    reports.len() as u64 + 1,
                    0,
                    1.0,
                    0.0,
                    format!("{label}: {} is unreadable: whether the scorer was confined is unknown", path.display()),
                )
            }
        }
    }
    if reports.is_empty() {
        return Finding::pass(
            probes::SANDBOX,
            0,
            "a built-in source (cachemoney's own code): no scorer process to confine",
        );
    }
    reports.dedup();
    Finding::pass(
        probes::SANDBOX,
        reports.len() as u64,
        format!(
            "every run of the scorer was confined: {}",
            reports.join("; ")
        ),
    )
}
