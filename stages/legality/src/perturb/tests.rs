//! Cuts, shuffles and replacements: what each keeps and what each changes.

use super::*;
use text::sentencepiece::ByteTable;

pub(crate) fn secret(kind: Kind, draw: u32) -> CutParams {
    CutParams {
        kind,
        draw,
        secret: "a secret".into(),
        original_sample: Some(64),
        original_seed: Some(1337),
        hidden: 50,
        ..CutParams::default()
    }
}

/// Token 0 a boundary, every third one a word start, the rest continuations.
pub(crate) fn rule(vocab: usize) -> Classes {
    let rule = ByteTable {
        base_bytes: vec![1; vocab],
        has_leading_space: (0..vocab).map(|t| t % 3 == 1).collect(),
        is_boundary: (0..vocab).map(|t| t == 0).collect(),
    };
    Classes::new(&rule, &[])
}

#[test]
fn a_byte_level_bpe_piece_with_a_space_starts_a_word() {
    let rule = ByteTable {
        base_bytes: vec![1; 3],
        has_leading_space: vec![false; 3],
        is_boundary: vec![true, false, false],
    };
    let pieces = ["<s>", "\u{0120}the", "the"].map(String::from);
    assert_eq!(Classes::new(&rule, &pieces).0, vec![0, 1, 2]);
}

#[test]
fn the_changed_target_is_of_another_class() {
    let tokens = stream();
    let rule = rule(13);
    for draw in 0..50 {
        for kind in [Kind::Shuffle, Kind::Replace] {
            let p = perturb(&tokens, &one_doc(&tokens), &rule, &secret(kind, draw)).unwrap();
            let (old, new) = (tokens[p.changed()], p.tokens[p.changed()]);
            assert!(rule.flipped(old, new), "{kind:?} {draw}: {old} -> {new}");
            assert_ne!(rule.of(new), 0, "a boundary in running text");
        }
    }
}

fn one_doc(tokens: &[u16]) -> Vec<u32> {
    vec![0; tokens.len()]
}

fn stream() -> Vec<u16> {
    (0..10_000).map(|i| (i * 7 % 13) as u16).collect()
}

#[test]
fn a_shuffle_keeps_the_prefix_permutes_the_suffix_and_moves_the_first_target() {
    let tokens = stream();
    let cut = secret(Kind::Shuffle, 1);
    let p = perturb(&tokens, &one_doc(&tokens), &rule(13), &cut).unwrap();
    assert_eq!(p.tokens[..=p.cut], tokens[..=p.cut]);
    assert_ne!(p.tokens[p.changed()], tokens[p.changed()]);
    let (mut a, mut b) = (
        tokens[p.changed()..].to_vec(),
        p.tokens[p.changed()..].to_vec(),
    );
    a.sort_unstable();
    b.sort_unstable();
    assert_eq!(a, b);
    assert_eq!(
        p,
        perturb(&tokens, &one_doc(&tokens), &rule(13), &cut).unwrap(),
        "the secret fixes it"
    );
    assert!(p.hidden.is_empty());
}

#[test]
fn the_secret_moves_everything_and_the_cut_lands_on_an_original_position() {
    let tokens = stream();
    let (a, b) = (secret(Kind::Shuffle, 1), secret(Kind::Shuffle, 2));
    let other_secret = CutParams {
        secret: "another".into(),
        ..a.clone()
    };
    let pa = perturb(&tokens, &one_doc(&tokens), &rule(13), &a).unwrap();
    let original = stage_api::sample_positions(9_999, 64, 1337);
    for cut in [&a, &b, &other_secret] {
        let p = perturb(&tokens, &one_doc(&tokens), &rule(13), cut).unwrap();
        assert!(original.contains(&(p.changed() as i64)), "{}", p.cut);
        assert!(p.cut >= 1 && p.cut < 9_998, "{}", p.cut);
    }
    let pb = perturb(&tokens, &one_doc(&tokens), &rule(13), &b).unwrap();
    let pc = perturb(&tokens, &one_doc(&tokens), &rule(13), &other_secret).unwrap();
    assert_ne!(pa.probe_positions, pb.probe_positions);
    assert_ne!(pa.probe_positions, pc.probe_positions);
    assert_ne!(pa.tokens, pc.tokens);
}

#[test]
fn a_rerun_asks_as_many_positions_as_the_original_the_changed_one_among_them() {
    let p = perturb(
        &stream(),
        &one_doc(&stream()),
        &rule(13),
        &secret(Kind::Shuffle, 1),
    )
    .unwrap();
    assert_eq!(p.probe_positions.len(), 64);
    assert!(p.probe_positions.contains(&(p.changed() as i64)));
    assert!(p.probe_positions.windows(2).all(|w| w[0] < w[1]));
    let original = stage_api::sample_positions(9_999, 64, 1337);
    let shared = p
        .probe_positions
        .iter()
        .filter(|q| original.contains(q))
        .count();
    assert!(shared < 5, "fresh positions, not the original's: {shared}");
}

#[test]
fn a_replace_hides_its_positions_and_records_the_proposal() {
    let tokens = stream();
    let p = perturb(
        &tokens,
        &one_doc(&tokens),
        &rule(13),
        &secret(Kind::Replace, 3),
    )
    .unwrap();
    assert_eq!(p.tokens[..=p.cut], tokens[..=p.cut]);
    assert_ne!(p.tokens[p.changed()], tokens[p.changed()]);
    assert!(p.cut < 5_000, "a replace cut leaves room: {}", p.cut);
    assert_eq!(p.hidden.len(), 50);
    let proposal = Proposal::new(&tokens, 13);
    for h in &p.hidden {
        let t = h.position as usize;
        assert!(t > p.changed());
        assert_eq!(p.tokens[t], h.token);
        assert_eq!(h.q, proposal.q(p.tokens[t - 1], h.token));
        assert!(
            !p.probe_positions.contains(&h.position),
            "a hidden position was asked about"
        );
    }
    // Outside the hidden positions (and the changed target), the stream is the original.
    let hidden: Vec<usize> = p.hidden.iter().map(|h| h.position as usize).collect();
    for (t, (new, old)) in p
        .tokens
        .iter()
        .zip(tokens)
        .enumerate()
        .skip(p.changed() + 1)
    {
        if !hidden.contains(&t) {
            assert_eq!(new, &old);
        }
    }
}

#[test]
fn an_explicit_cut_is_just_before_the_first_original_position_from_there() {
    let cut = CutParams {
        at: Some(0.5),
        original_sample: Some(64),
        original_seed: Some(1337),
        ..CutParams::default()
    };
    let tokens: Vec<u16> = (0..10_001).map(|i| (i % 13) as u16).collect();
    let k = cut_position(&tokens, &cut).unwrap();
    let sample = stage_api::sample_positions(10_000, 64, 1337);
    assert!(sample.contains(&(k as i64 + 1)), "{k}");
    assert!(k + 1 >= 5000);
    let unsampled = CutParams {
        original_sample: Some(0),
        ..cut
    };
    assert_eq!(cut_position(&tokens, &unsampled).unwrap(), 4999);
}

#[test]
fn a_constant_suffix_cannot_be_shuffled() {
    let tokens = vec![3u16; 100];
    let err = perturb(&tokens, &one_doc(&tokens), &rule(4), &CutParams::default()).unwrap_err();
    assert!(err.contains("no shuffle can change"), "{err}");
}

#[test]
fn shuffle_cuts_reach_both_ends_of_the_stream_and_stop_before_a_constant_tail() {
    // Unsampled, so the cut may be any position: over many draws some land in the first
    // and some in the last 5% (a leak confined there is not out of reach).
    let mut tokens = stream();
    let cuts: Vec<usize> = (0..400)
        .map(|draw| {
            let cut = CutParams {
                original_sample: Some(0),
                ..secret(Kind::Shuffle, draw)
            };
            cut_position(&tokens, &cut).unwrap()
        })
        .collect();
    assert!(cuts.iter().any(|&k| k < 500), "none in the first 5%");
    assert!(cuts.iter().any(|&k| k >= 9_500), "none in the last 5%");
    // A tail of one token: the changed target is the last one a shuffle can change.
    tokens[9_000..].fill(5);
    for draw in 0..200 {
        let cut = CutParams {
            original_sample: Some(0),
            ..secret(Kind::Shuffle, draw)
        };
        let p = perturb(&tokens, &one_doc(&tokens), &rule(13), &cut).unwrap();
        assert!(p.changed() <= 8_999, "{}", p.changed());
        assert_ne!(p.tokens[p.changed()], tokens[p.changed()]);
    }
}

/// Hints on `tokens` that fire at one target in three (share 0.9, else 0.3), naming the
/// target itself at every other firing one: hits and misses both.
fn hints(tokens: &[u16]) -> Hints {
    let targets = tokens.len() - 1;
    let share = (1..=targets)
        .map(|t| if t % 3 == 0 { 0.9 } else { 0.3 })
        .collect();
    let hint = (1..=targets)
        .map(|t| {
            if t % 2 == 0 {
                tokens[t]
            } else {
                (tokens[t] + 1) % 13
            }
        })
        .collect();
    Hints::new(hint, share)
}

/// A cut with the gate the hints above are meant for.
fn gated(cut: CutParams) -> CutParams {
    CutParams {
        hint_threshold: Some(0.8),
        ..cut
    }
}

#[test]
fn an_aimed_replace_changes_a_firing_target_across_the_hint() {
    let tokens = stream();
    let hints = hints(&tokens);
    let (mut hits, mut misses) = (0, 0);
    for draw in 0..60 {
        let cut = gated(secret(Kind::Replace, draw));
        let p = perturb_aimed(&tokens, &one_doc(&tokens), &rule(13), &cut, Some(&hints)).unwrap();
        let changed = p.changed();
        let hint = hints
            .firing(changed, 0.8)
            .expect("the cut is at a firing hint");
        assert_eq!(p.aimed, Some(hint));
        let (old, new) = (tokens[changed], p.tokens[changed]);
        assert_ne!(
            old == hint,
            new == hint,
            "{draw}: {old} -> {new}, hint {hint}"
        );
        hits += (old == hint) as u32;
        misses += (old != hint) as u32;
        // Still one of the original's positions, and the prefix kept.
        let original = stage_api::sample_positions(tokens.len() - 1, 64, 1337);
        assert!(original.contains(&(changed as i64)));
        assert_eq!(p.tokens[..changed], tokens[..changed]);
    }
    assert!(hits > 3 && misses > 3, "{hits} hits, {misses} misses");
    // A shuffle is not aimed, and without hints a replace is what it was.
    let shuffle = secret(Kind::Shuffle, 3);
    let aimed = perturb_aimed(
        &tokens,
        &one_doc(&tokens),
        &rule(13),
        &shuffle,
        Some(&hints),
    );
    assert_eq!(
        aimed.unwrap(),
        perturb(&tokens, &one_doc(&tokens), &rule(13), &shuffle).unwrap()
    );
    let replace = secret(Kind::Replace, 3);
    let unaimed = perturb_aimed(&tokens, &one_doc(&tokens), &rule(13), &replace, None).unwrap();
    assert_eq!(unaimed.aimed, None);
}

/// Where a hint fires, a hidden target is the hint about half the time, and its q is
/// the mixture it was drawn from: over every token, the q's of one position sum to 1.
#[test]
fn hidden_targets_where_a_hint_fires_are_drawn_half_from_the_hint() {
    let tokens = stream();
    let hints = hints(&tokens);
    let mut cut = gated(secret(Kind::Replace, 7));
    cut.hidden = 3000;
    let p = perturb_aimed(&tokens, &one_doc(&tokens), &rule(13), &cut, Some(&hints)).unwrap();
    let proposal = Proposal::new(&tokens, 13);
    let (mut firing, mut hinted) = (0, 0);
    for h in &p.hidden {
        let t = h.position as usize;
        let previous = p.tokens[t - 1];
        match hints.firing(t, 0.8) {
            Some(hint) => {
                firing += 1;
                hinted += (h.token == hint) as u32;
                let want =
                    0.5 * (h.token == hint) as u8 as f64 + 0.5 * proposal.q(previous, h.token);
                assert_eq!(h.q, want);
                let total: f64 = (0..13u16)
                    .map(|u| 0.5 * (u == hint) as u8 as f64 + 0.5 * proposal.q(previous, u))
                    .sum();
                assert!((total - 1.0).abs() < 1e-12);
            }
            None => assert_eq!(h.q, proposal.q(previous, h.token)),
        }
    }
    let rate = hinted as f64 / firing as f64;
    assert!(firing > 800 && rate > 0.45, "{hinted} of {firing}");
}
