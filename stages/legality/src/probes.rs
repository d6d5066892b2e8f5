//! The probes, as pure functions of tables in memory. Each returns a [`Finding`]: a
//! verdict and the evidence a reviewer needs to check it by hand (a position, the two
//! values that should have been equal, and a sentence).

use serde::Serialize;

use text::sentencepiece::ByteTable;

/// The criteria (openai/parameter-golf issue #1017) and what checks them here.
pub const PREFIX: &str = "c1-prefix";
pub const TARGET: &str = "c1-target";
pub const NORMALISED: &str = "c2-normalised";
pub const BYTES: &str = "bytes";
pub const PROBES: [&str; 4] = [PREFIX, TARGET, NORMALISED, BYTES];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Pass,
    Fail,
    NotApplicable,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::NotApplicable => "not-applicable",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub probe: &'static str,
    pub verdict: Verdict,
    /// How many values were compared or checked.
    pub checked: u64,
    pub position: Option<i64>,
    pub expected: Option<f64>,
    pub observed: Option<f64>,
    pub detail: String,
}

impl Finding {
    pub fn pass(probe: &'static str, checked: u64, detail: impl Into<String>) -> Finding {
        Finding {
            probe,
            verdict: Verdict::Pass,
            checked,
            position: None,
            expected: None,
            observed: None,
            detail: detail.into(),
        }
    }

    pub fn not_applicable(probe: &'static str, why: impl Into<String>) -> Finding {
        Finding {
            verdict: Verdict::NotApplicable,
            ..Finding::pass(probe, 0, why)
        }
    }

    pub fn fail(
        probe: &'static str,
        checked: u64,
        position: i64,
        expected: f64,
        observed: f64,
        detail: impl Into<String>,
    ) -> Finding {
        Finding {
            probe,
            verdict: Verdict::Fail,
            checked,
            position: Some(position),
            expected: Some(expected),
            observed: Some(observed),
            detail: detail.into(),
        }
    }
}

/// Where a re-run first differs from the original before a cut.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    pub row: usize,
    pub position: i64,
    pub column: String,
    pub original: f64,
    pub perturbed: f64,
}

/// The first row at or before `cut` where a column differs bit for bit between the
/// original and the re-run (rows are entries in scoring order; both runs must score
/// the same positions in the same order up to the cut), and how many values were
/// compared. Called one column at a time, so that a 62M-entry table is never held
/// whole, and the caller keeps the earliest row.
pub fn first_prefix_difference(
    original_position: &[i64],
    perturbed_position: &[i64],
    column: (&str, &[f64], &[f64]),
    cut: i64,
) -> (Option<Difference>, u64) {
    let (name, a, b) = column;
    let mut checked = 0;
    let rows = original_position.len().max(perturbed_position.len());
    for row in 0..rows {
        let (pa, pb) = (original_position.get(row), perturbed_position.get(row));
        if pa == pb {
            let p = *pa.expect("row < rows");
            if p > cut {
                continue;
            }
            checked += 1;
            if a[row].to_bits() != b[row].to_bits() {
                let d = Difference {
                    row,
                    position: p,
                    column: name.into(),
                    original: a[row],
                    perturbed: b[row],
                };
                return (Some(d), checked);
            }
            continue;
        }
        // Another set of entries: a scorer whose windows depend on the data.
        let first = pa.into_iter().chain(pb).copied().min().expect("one exists");
        if first <= cut {
            let value = |p: Option<&i64>| p.map_or(f64::NAN, |&p| p as f64);
            let d = Difference {
                row,
                position: first,
                column: "position".into(),
                original: value(pa),
                perturbed: value(pb),
            };
            return (Some(d), checked);
        }
    }
    (None, checked)
}

/// The first candidate whose probability differs bit for bit between two
/// distributions: (candidate, original, perturbed).
pub fn first_distribution_difference(a: &[f32], b: &[f32]) -> Option<(usize, f32, f32)> {
    if a.len() != b.len() {
        return Some((a.len().min(b.len()), f32::NAN, f32::NAN));
    }
    a.iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits())
        .map(|v| (v, a[v], b[v]))
}

/// How far a reported entropy may be from its distribution's, in nats (float32
/// softmax rounding over a vocabulary is orders of magnitude below).
pub const ENTROPY_TOLERANCE: f64 = 1e-3;

/// C2 for distributions written by a model: at each position, Σ_v p(v) within
/// `tolerance` of 1, every p(v) ≥ 0, and the distribution's p(target) and entropy equal
/// to the model_p and entropy the chain scored with (else the distribution shown is not
/// the one used).
pub fn check_distributions(
    distributions: &[(i64, Vec<f32>)],
    tokens: &[u16],
    scored_at: impl Fn(i64) -> Option<(f32, f32)>,
    tolerance: f64,
) -> Finding {
    let mut worst: Option<(i64, f64)> = None;
    for (position, probs) in distributions {
        if let Some(v) = probs.iter().position(|&p| p.is_nan() || p < 0.0) {
            return Finding::fail(
                NORMALISED,
                distributions.len() as u64,
                *position,
                0.0,
                probs[v] as f64,
                format!(
                    "p(candidate {v}) = {} is negative or not a number",
                    probs[v]
                ),
            );
        }
        // In candidate order, in f64: the same sum on every machine.
        let sum: f64 = probs.iter().map(|&p| p as f64).sum();
        if worst.is_none_or(|(_, w)| (sum - 1.0).abs() > (w - 1.0).abs()) {
            worst = Some((*position, sum));
        }
        let target = tokens[*position as usize] as usize;
        let scored = scored_at(*position);
        // The entropy sets the cache's blend weight: a scorer could leak through it
        // while its distribution looks clean.
        if let Some((_, reported)) = scored {
            let entropy: f64 = -probs
                .iter()
                .filter(|&&p| p > 0.0)
                .map(|&p| p as f64 * libm::log(p as f64))
                .sum::<f64>();
            if (entropy - reported as f64).abs() > ENTROPY_TOLERANCE {
                return Finding::fail(
                    NORMALISED,
                    distributions.len() as u64,
                    *position,
                    entropy,
                    reported as f64,
                    format!("the entropy the chain scored with ({reported} nats) is not its distribution's ({entropy:.6} nats): the distribution shown is not the one used"),
                );
            }
        }
        if let (Some((scored, _)), Some(&shown)) = (scored, probs.get(target)) {
            if (scored as f64 - shown as f64).abs() > tolerance * (scored as f64).max(1e-30) {
                return Finding::fail(
                    NORMALISED,
                    distributions.len() as u64,
                    *position,
                    scored as f64,
                    shown as f64,
                    format!("the distribution's p(target {target}) is not the model_p the chain scored with: the distribution shown is not the one used"),
                );
            }
        }
    }
    let Some((position, sum)) = worst else {
        return Finding::not_applicable(
            NORMALISED,
            "the pass-1 kept no distributions (model = \"import\", or mass_sample = 0)",
        );
    };
    let detail = format!(
        "Σ_v p(v) at {} positions; worst {sum:.9} at position {position}; tolerance {tolerance:e}",
        distributions.len()
    );
    if (sum - 1.0).abs() <= tolerance {
        Finding {
            position: Some(position),
            expected: Some(1.0),
            observed: Some(sum),
            ..Finding::pass(NORMALISED, distributions.len() as u64, detail)
        }
    } else {
        Finding::fail(
            NORMALISED,
            distributions.len() as u64,
            position,
            1.0,
            sum,
            detail,
        )
    }
}

/// C2 for a cache chain, from its implied-mass audit: Σ_v p_final(v) at each sampled
/// position within `tolerance` of 1.
pub fn check_mass(position: &[i64], mass: &[f64], tolerance: f64) -> Finding {
    let Some(worst) = (0..mass.len()).max_by(|&a, &b| {
        (mass[a] - 1.0)
            .abs()
            .total_cmp(&(mass[b] - 1.0).abs())
            .then(b.cmp(&a))
    }) else {
        return Finding::not_applicable(NORMALISED, "the audit sampled no positions");
    };
    let over = mass.iter().filter(|m| (*m - 1.0).abs() > tolerance).count();
    let detail = format!(
        "Σ_v p_final(v) at {} sampled positions (audit-mass); {over} off by more than {tolerance:e}; worst {:.6} at position {}",
        mass.len(),
        mass[worst],
        position[worst]
    );
    if over == 0 {
        Finding {
            position: Some(position[worst]),
            expected: Some(1.0),
            observed: Some(mass[worst]),
            ..Finding::pass(NORMALISED, mass.len() as u64, detail)
        }
    } else {
        Finding::fail(
            NORMALISED,
            mass.len() as u64,
            position[worst],
            1.0,
            mass[worst],
            detail,
        )
    }
}

/// Byte accounting: every entry's bytes by the challenge's rule, and the BPB over the
/// entries with those bytes against the chain's own.
pub fn check_bytes(
    tokens: &[u16],
    rule: &ByteTable,
    position: &[i64],
    bits: &[f64],
    bytes: &[u8],
) -> Finding {
    let checked = position.len() as u64;
    let rule_at = |p: i64| rule.target_bytes(tokens[p as usize - 1], tokens[p as usize]);
    let (mut chain_bytes, mut rule_bytes, mut total_bits) = (0u64, 0u64, 0f64);
    let mut first_wrong = None;
    for row in 0..position.len() {
        let expected = rule_at(position[row]);
        if expected != bytes[row] && first_wrong.is_none() {
            first_wrong = Some((position[row], expected, bytes[row]));
        }
        chain_bytes += bytes[row] as u64;
        rule_bytes += expected as u64;
        total_bits += bits[row];
    }
    let stream_bytes: u64 = (1..tokens.len() as i64).map(|p| rule_at(p) as u64).sum();
    let distinct = {
        let mut seen = vec![false; tokens.len()];
        position.iter().for_each(|&p| seen[p as usize] = true);
        seen.iter().filter(|&&s| s).count()
    };
    let chain_bpb = total_bits / chain_bytes.max(1) as f64;
    let rule_bpb = total_bits / rule_bytes.max(1) as f64;
    let detail = format!(
        "{} entries over {distinct} of {} targets; bytes: chain {chain_bytes}, rule {rule_bytes} over the entries, {stream_bytes} in the val stream; BPB chain {chain_bpb:.6}, by the rule {rule_bpb:.6}",
        position.len(),
        tokens.len() - 1
    );
    match first_wrong {
        None => Finding {
            expected: Some(rule_bpb),
            observed: Some(chain_bpb),
            ..Finding::pass(BYTES, checked, detail)
        },
        Some((p, want, got)) => Finding::fail(
            BYTES,
            checked,
            p,
            rule_bpb,
            chain_bpb,
            format!("position {p} counts {got} bytes, the rule {want}; {detail}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_difference_after_the_cut_is_allowed_and_one_before_it_is_found() {
        let at = [1, 2, 3, 4];
        let original = [0.1, 0.2, 0.3, 0.4];
        let check =
            |other: &[f64], cut| first_prefix_difference(&at, &at, ("p", &original, other), cut);
        assert_eq!(check(&[0.1, 0.2, 0.3, 0.9], 3), (None, 3));
        let (diff, _) = check(&[0.1, 0.25, 0.3, 0.4], 3);
        let diff = diff.unwrap();
        assert_eq!(
            (diff.row, diff.position, diff.original, diff.perturbed),
            (1, 2, 0.2, 0.25)
        );
        // The last bit counts.
        let ulp = f64::from_bits(0.2f64.to_bits() + 1);
        assert!(check(&[0.1, ulp, 0.3, 0.4], 2).0.is_some());
        // Other entries before the cut are a difference too.
        let (moved, _) =
            first_prefix_difference(&at, &[1, 3, 3, 4], ("p", &original, &original), 3);
        assert_eq!(moved.unwrap().column, "position");
    }

    #[test]
    fn normalisation_needs_the_sum_and_the_scored_probability() {
        let tokens = [0u16, 1, 0];
        let good = vec![(1, vec![0.25f32, 0.75]), (2, vec![0.5, 0.5])];
        let h = |probs: &[f64]| -probs.iter().map(|p| p * p.ln()).sum::<f64>() as f32;
        let scored = |p: i64| {
            Some(if p == 1 {
                (0.75, h(&[0.25, 0.75]))
            } else {
                (0.5, h(&[0.5, 0.5]))
            })
        };
        assert_eq!(
            check_distributions(&good, &tokens, scored, 1e-6).verdict,
            Verdict::Pass
        );
        let heavy = vec![(1, vec![0.5f32, 0.75])];
        let f = check_distributions(&heavy, &tokens, |_| Some((0.75, h(&[0.5, 0.75]))), 1e-6);
        assert_eq!((f.verdict, f.observed), (Verdict::Fail, Some(1.25)));
        let other = check_distributions(&good, &tokens, |p| scored(p).map(|(_, h)| (0.9, h)), 1e-6);
        assert_eq!(other.verdict, Verdict::Fail);
        assert!(
            other.detail.contains("not the one used"),
            "{}",
            other.detail
        );
        let flat = check_distributions(&good, &tokens, |p| scored(p).map(|(q, _)| (q, 0.1)), 1e-6);
        assert_eq!(flat.verdict, Verdict::Fail);
        assert!(flat.detail.contains("entropy"), "{}", flat.detail);
        assert_eq!(
            check_distributions(&[], &tokens, scored, 1e-6).verdict,
            Verdict::NotApplicable
        );
    }

    #[test]
    fn bytes_follow_the_leading_space_rule() {
        let rule = ByteTable {
            base_bytes: vec![0, 3, 2],
            has_leading_space: vec![false, true, false],
            is_boundary: vec![true, false, false],
        };
        // 0 is a boundary: 1 after it gets no space byte; after 2 it does.
        let tokens = [0u16, 1, 2, 1];
        let f = check_bytes(&tokens, &rule, &[1, 2, 3], &[1.0, 1.0, 1.0], &[3, 2, 4]);
        assert_eq!(f.verdict, Verdict::Pass, "{}", f.detail);
        let wrong = check_bytes(&tokens, &rule, &[1, 2, 3], &[1.0, 1.0, 1.0], &[3, 2, 3]);
        assert_eq!((wrong.verdict, wrong.position), (Verdict::Fail, Some(3)));
    }
}
