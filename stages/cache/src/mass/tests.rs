use super::*;
use crate::blend::BlendParams;

fn stream(n: usize) -> Vec<u16> {
    let mut state = 7u32;
    let base: Vec<u16> = (0..300)
        .map(|_| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            ((state >> 16) % 16) as u16
        })
        .collect();
    (0..n)
        .map(|i| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            if (state >> 16).is_multiple_of(7) {
                ((state >> 20) % 16) as u16
            } else {
                base[(i * 3 / 2) % base.len()]
            }
        })
        .collect()
}

/// A flat model distribution over 16 tokens, for every sample.
fn samples(
    positions: &[usize],
    model: &[f32],
    blend: &'static PreparedBlend,
) -> Vec<MassSample<'static>> {
    let model: &'static [f32] = Box::leak(model.to_vec().into_boxed_slice());
    positions
        .iter()
        .map(|&p| MassSample {
            position: p,
            entropy: 2.0,
            model,
            blend,
        })
        .collect()
}

fn small_configs() -> (Valid<NgramConfig>, Valid<PhraseConfig>) {
    let ngram = NgramConfig {
        buckets: 1 << 10,
        ..NgramConfig::default()
    };
    let phrase = PhraseConfig {
        lengths: vec![32, 16],
        buckets: 1 << 9,
        ..PhraseConfig::default()
    };
    (ngram.validated().unwrap(), phrase.validated().unwrap())
}

#[test]
fn normalised_mass_is_one_and_reference_mass_is_more() {
    let tokens = stream(6000);
    let (ng, ph) = small_configs();
    let positions: Vec<usize> = (100..6000).step_by(97).collect();
    let model = vec![1.0f32 / 16.0; 16];
    let blend = Box::leak(Box::new(
        BlendParams {
            phrase_min_length: 16,
            phrase_max_length: 32,
            ..BlendParams::default()
        }
        .prepared(),
    ));
    let samples = samples(&positions, &model, blend);

    let lookups = crate::normalised::ngram_lookups(&tokens, &ng);
    let phrases = crate::normalised::phrase_lookups(&tokens, &ph);
    let chosen: Vec<_> = positions
        .iter()
        .map(|&p| (lookups[p], phrases[p]))
        .collect();
    let candidates = normalised_candidates(&tokens, &positions, &chosen, 16).unwrap();
    for m in implied_mass(&tokens, &samples, &candidates) {
        assert!((m.mass - 1.0).abs() < 1e-6, "{m:?}");
    }
    // The candidates' matches at the true token are the stored ones.
    for ((&p, c), stored) in positions.iter().zip(&candidates).zip(&chosen) {
        assert_eq!(c[tokens[p] as usize], *stored, "p {p}");
    }

    let tables = (
        NgramTables::build(&tokens, &ng),
        PhraseTables::build(&tokens, &ph),
    );
    let candidates = reference_candidates(&tokens, &tables.0, &tables.1, &positions, 16);
    let masses = implied_mass(&tokens, &samples, &candidates);
    let mean = masses.iter().map(|m| m.mass).sum::<f64>() / masses.len() as f64;
    assert!(mean > 1.05, "mean reference mass {mean}");
    // The candidate that is the true token gets the stored lookup.
    for (&p, c) in positions.iter().zip(&candidates) {
        assert_eq!(c[tokens[p] as usize].0, tables.0.lookup(&tokens, p));
    }

    let candidates = causal_candidates(&tokens, &ng, &ph, &positions, 16);
    let causal_n = crate::causal::ngram_lookups(&tokens, &ng);
    let causal_p = crate::causal::phrase_lookups(&tokens, &ph);
    for (&p, c) in positions.iter().zip(&candidates) {
        assert_eq!(c[tokens[p] as usize], (causal_n[p], causal_p[p]), "p {p}");
    }
}

#[test]
fn histograms_count_earlier_equal_windows_exactly() {
    let tokens = stream(3000);
    let requests = [(2999, 3), (1500, 1), (10, 9), (2000, 40), (5, 7)];
    let histograms = next_token_histograms(&tokens, &requests, 16);
    for (&(p, w), histogram) in requests.iter().zip(&histograms) {
        let mut expected = vec![0u32; 16];
        if p >= w {
            for e in w..p {
                if tokens[e - w..e] == tokens[p - w..p] {
                    expected[tokens[e] as usize] += 1;
                }
            }
        }
        assert_eq!(histogram, &expected, "({p}, {w})");
    }
}
