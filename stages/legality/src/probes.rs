//! The probes, as pure functions of tables in memory. Each returns a [`Finding`]: a
//! verdict and the evidence a reviewer needs to check it by hand (a position, the two
//! values that should have been equal, and a sentence).

use serde::Serialize;

use text::sentencepiece::ByteTable;

/// The criteria (openai/parameter-golf issue #1017) and what checks them here.
pub const PREFIX: &str = "c1-prefix";
pub const TARGET: &str = "c1-target";
pub const NORMALISED: &str = "c2-normalised";
pub const BLIND: &str = "c2-blind";
pub const COVERAGE: &str = "coverage";
pub const BYTES: &str = "bytes";
pub const SANDBOX: &str = "sandbox";
/// A scorer that declares its components' document orders
/// (docs/eval-techniques.md §5.4): whether one order alone explains its scores. Shown
/// only where an order is declared.
pub const ORDER: &str = "order";
/// The reviewer's checklist beyond C1–C4 (`overlap` and `artifact` nodes wired into a
/// judge): shown only where wired.
pub const OVERLAP: &str = "overlap";
pub const ARTIFACT: &str = "artifact";
pub const PROBES: [&str; 10] = [
    PREFIX, TARGET, NORMALISED, BLIND, COVERAGE, BYTES, SANDBOX, ORDER, OVERLAP, ARTIFACT,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Pass,
    Fail,
    /// The `order` finding: no single order reproduces the scores, while each component
    /// is causal in its own (what #2135 was accepted with). Neither a pass nor a failure.
    Mismatch,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Mismatch => "mismatch",
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

/// C2 for the distributions one run of a model wrote (`run` names it in the evidence):
/// at each position, Σ_v p(v) within `tolerance` of 1, every p(v) ≥ 0, and the
/// distribution's p(target) and entropy equal to the model_p and entropy that run scored
/// with (else the distribution shown is not the one used). Returns how many were checked
/// and the worst sum, or the first failure.
pub fn check_distributions(
    run: &str,
    distributions: &[(i64, Vec<f32>)],
    tokens: &[u16],
    scored_at: impl Fn(i64) -> Option<(f32, f32)>,
    tolerance: f64,
) -> Result<(u64, Option<(i64, f64)>), Finding> {
    let mut worst: Option<(i64, f64)> = None;
    let checked = distributions.len() as u64;
    for (position, probs) in distributions {
        if let Some(v) = probs.iter().position(|&p| p.is_nan() || p < 0.0) {
            return Err(Finding::fail(
                NORMALISED,
                checked,
                *position,
                0.0,
                probs[v] as f64,
                format!(
                    "{run}: p(candidate {v}) = {} is negative or not a number",
                    probs[v]
                ),
            ));
        }
        // In candidate order, in f64: the same sum on every machine.
        let sum: f64 = probs.iter().map(|&p| p as f64).sum();
        if worst.is_none_or(|(_, w)| (sum - 1.0).abs() > (w - 1.0).abs()) {
            worst = Some((*position, sum));
        }
        if (sum - 1.0).abs() > tolerance {
            return Err(Finding::fail(
                NORMALISED,
                checked,
                *position,
                1.0,
                sum,
                format!(
                    "{run}: Σ_v p(v) = {sum:.9} at position {position}; tolerance {tolerance:e}"
                ),
            ));
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
                return Err(Finding::fail(
                    NORMALISED,
                    checked,
                    *position,
                    entropy,
                    reported as f64,
                    format!("{run}: the entropy the chain scored with ({reported} nats) is not its distribution's ({entropy:.6} nats): the distribution shown is not the one used"),
                ));
            }
        }
        if let (Some((scored, _)), Some(&shown)) = (scored, probs.get(target)) {
            if (scored as f64 - shown as f64).abs() > tolerance * (scored as f64).max(1e-30) {
                return Err(Finding::fail(
                    NORMALISED,
                    checked,
                    *position,
                    scored as f64,
                    shown as f64,
                    format!("{run}: the distribution's p(target {target}) is not the model_p the chain scored with: the distribution shown is not the one used"),
                ));
            }
        }
    }
    Ok((checked, worst))
}

/// Φ⁻¹(1 − α): how many standard errors above the mean an honest estimate stays with
/// probability 1 − α (one-sided, normal).
pub fn one_sided_z(alpha: f64) -> f64 {
    let tail = |z: f64| 0.5 * libm::erfc(z / std::f64::consts::SQRT_2);
    let (mut lo, mut hi) = (0.0f64, 40.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if tail(mid) > alpha {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// The blind normalisation estimate from the importance weights p(u)/q(u) at the hidden
/// targets: their mean estimates Σ_v p(v) there (1 for a distribution). Fails when even
/// the interval's lower end, `z` standard errors below the mean, is above 1 + tolerance:
/// an honest scorer fails with probability at most α (the weights of a distribution have
/// mean 1; a heavy right tail raises the standard error with the mean, so it cannot push
/// the lower end up).
pub fn check_blind(weights: &[(i64, f64)], z: f64, tolerance: f64, alpha: f64) -> Finding {
    let n = weights.len();
    if n < 2 {
        return Finding::fail(
            BLIND,
            n as u64,
            0,
            1.0,
            f64::NAN,
            "cannot be verified: fewer than 2 hidden targets were scored",
        );
    }
    let mean = weights.iter().map(|(_, w)| w).sum::<f64>() / n as f64;
    let variance = weights.iter().map(|(_, w)| (w - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let se = (variance / n as f64).sqrt();
    let (low, high) = (mean - z * se, mean + z * se);
    let worst = weights
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .expect("n >= 2");
    let detail = format!(
        "mean weight p(u)/q(u) {mean:.4} over {n} hidden targets replaced by proposal draws (interval {low:.4} to {high:.4} at a false-alarm rate of {alpha:e}; a distribution's is 1, tolerance {tolerance}): it sees a mass above 1 by more than {:.4}",
        z * se + tolerance
    );
    if low > 1.0 + tolerance {
        Finding::fail(
            BLIND,
            n as u64,
            worst.0,
            1.0,
            mean,
            format!("the scorer puts more than probability 1 where it was never asked: {detail}; the largest weight {:.3} at position {}", worst.1, worst.0),
        )
    } else {
        Finding {
            position: Some(worst.0),
            expected: Some(1.0),
            observed: Some(mean),
            ..Finding::pass(BLIND, n as u64, detail)
        }
    }
}

/// C4: each target scored exactly once. `positions` are the chain's entries, `bits` and
/// `bytes` theirs.
pub fn check_coverage(targets: usize, positions: &[i64], bits: &[f64], bytes: &[u8]) -> Finding {
    let mut count = vec![0u32; targets + 1];
    for &p in positions {
        if p >= 1 && (p as usize) <= targets {
            count[p as usize] += 1;
        }
    }
    let missing = count[1..].iter().filter(|&&c| c == 0).count();
    let repeated = count[1..].iter().filter(|&&c| c > 1).count();
    let extra: u64 = count[1..].iter().map(|&c| c.saturating_sub(1) as u64).sum();
    let (mut all_bits, mut all_bytes, mut once_bits, mut once_bytes) = (0f64, 0u64, 0f64, 0u64);
    let mut seen = vec![false; targets + 1];
    for row in 0..positions.len() {
        all_bits += bits[row];
        all_bytes += bytes[row] as u64;
        let p = positions[row] as usize;
        if p <= targets && !seen[p] {
            seen[p] = true;
            once_bits += bits[row];
            once_bytes += bytes[row] as u64;
        }
    }
    let (all, once) = (
        all_bits / all_bytes.max(1) as f64,
        once_bits / once_bytes.max(1) as f64,
    );
    let first =
        |want: &dyn Fn(u32) -> bool| (1..=targets).find(|&t| want(count[t])).unwrap_or(0) as i64;
    if missing > 0 {
        return Finding::fail(
            COVERAGE,
            positions.len() as u64,
            first(&|c| c == 0),
            1.0,
            0.0,
            format!(
                "{missing} of {targets} targets are never scored (first at position {})",
                first(&|c| c == 0)
            ),
        );
    }
    let detail = format!(
        "{} entries for {targets} targets; BPB over every entry {all:.6}, over each target once {once:.6}",
        positions.len()
    );
    if repeated > 0 {
        let at = first(&|c| c > 1);
        return Finding::fail(
            COVERAGE,
            positions.len() as u64,
            at,
            1.0,
            count[at as usize] as f64,
            format!(
                "{repeated} targets are scored more than once ({extra} extra entries, first at position {at}, {} times), which moves the BPB by {:+.6}: {detail}",
                count[at as usize],
                all - once
            ),
        );
    }
    Finding::pass(
        COVERAGE,
        positions.len() as u64,
        format!("every target scored exactly once: {detail}"),
    )
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
        return Finding::fail(
            NORMALISED,
            0,
            0,
            1.0,
            f64::NAN,
            "cannot be verified: the audit sampled no positions (its pass-1's mass_sample is 0)",
        );
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
        let h = |probs: &[f64]| -probs.iter().map(|p| p * libm::log(*p)).sum::<f64>() as f32;
        let scored = |p: i64| {
            Some(if p == 1 {
                (0.75, h(&[0.25, 0.75]))
            } else {
                (0.5, h(&[0.5, 0.5]))
            })
        };
        let check = |d: &[(i64, Vec<f32>)], s: &dyn Fn(i64) -> Option<(f32, f32)>| {
            check_distributions("run", d, &tokens, s, 1e-6)
        };
        assert_eq!(check(&good, &scored).unwrap().0, 2);
        let heavy = vec![(1, vec![0.5f32, 0.75])];
        let f = check(&heavy, &|_| Some((0.75, h(&[0.5, 0.75])))).unwrap_err();
        assert_eq!((f.verdict, f.observed), (Verdict::Fail, Some(1.25)));
        let other = check(&good, &|p| scored(p).map(|(_, h)| (0.9, h))).unwrap_err();
        assert!(
            other.detail.contains("not the one used"),
            "{}",
            other.detail
        );
        let flat = check(&good, &|p| scored(p).map(|(q, _)| (q, 0.1))).unwrap_err();
        assert!(flat.detail.contains("entropy"), "{}", flat.detail);
        assert_eq!(check(&[], &scored).unwrap(), (0, None));
    }

    #[test]
    fn the_blind_estimate_passes_a_distribution_and_fails_an_inflated_one() {
        // Weights of an honest scorer: mean 1 with a heavy right tail.
        let honest: Vec<(i64, f64)> = (0..4000)
            .map(|i| (i, if i % 10 == 0 { 5.5 } else { 0.5 }))
            .collect();
        let z = one_sided_z(1e-6);
        assert!((z - 4.753).abs() < 0.01, "{z}");
        assert_eq!(check_blind(&honest, z, 0.01, 1e-6).verdict, Verdict::Pass);
        let inflated: Vec<(i64, f64)> = honest.iter().map(|&(p, w)| (p, w * 1.5)).collect();
        let f = check_blind(&inflated, z, 0.01, 1e-6);
        assert_eq!(f.verdict, Verdict::Fail, "{}", f.detail);
        assert!(f.detail.contains("never asked"), "{}", f.detail);
        assert_eq!(
            check_blind(&[(1, 1.0)], z, 0.01, 1e-6).verdict,
            Verdict::Fail
        );
    }

    #[test]
    fn coverage_finds_repeats_and_gaps_and_weighs_them() {
        let once = check_coverage(3, &[1, 2, 3], &[1.0, 2.0, 3.0], &[1, 1, 1]);
        assert_eq!(once.verdict, Verdict::Pass, "{}", once.detail);
        let twice = check_coverage(
            3,
            &[1, 2, 3, 3, 3],
            &[1.0, 2.0, 3.0, 0.0, 0.0],
            &[1, 1, 1, 1, 1],
        );
        assert_eq!((twice.verdict, twice.position), (Verdict::Fail, Some(3)));
        assert!(
            twice.detail.contains("2 extra entries") && twice.detail.contains("-0.8"),
            "{}",
            twice.detail
        );
        let gap = check_coverage(3, &[1, 3], &[1.0, 1.0], &[1, 1]);
        assert_eq!((gap.verdict, gap.position), (Verdict::Fail, Some(2)));
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
