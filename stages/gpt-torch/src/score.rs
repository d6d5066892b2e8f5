//! Pass 1 (algorithm.md §4): the model slides over the val stream in windows of `n_ctx`
//! with a stride; each window scores only its last `stride` targets (the first window
//! scores all of its own), so every target is predicted with at least `n_ctx − stride`
//! tokens of context. For each scored entry: the probability of the true token and the
//! entropy of the whole next-token distribution, both after the temperature.

use tch::{Kind, Tensor};

use crate::model::Gpt;

pub use stage_api::windows::{windows, Tail, Window};

/// Per-entry values in pass-1 order (by window, then by position in the window).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Scores {
    /// The global target position p (the target is `tok[p]`).
    pub position: Vec<i64>,
    pub model_p: Vec<f32>,
    /// Nats, of the tempered distribution.
    pub entropy: Vec<f32>,
    /// The whole tempered distribution at the requested sample positions (the first time
    /// each is scored), sorted by position.
    pub distributions: Vec<(i64, Vec<f32>)>,
    /// Per entry, the probability of the n-gram tilt's hint (with hints; else empty).
    pub hint_p: Vec<f32>,
}

/// Runs the model over `tokens` (the whole val stream) window by window, `batch` windows
/// at a time. Windows are the model's `seq_len` long (the record's n_ctx is its training
/// length, and the RoPE base is fixed by it), zero-padded at the tail (causal attention
/// makes the padding invisible to the scored positions). `progress` is told how many
/// windows are done.
#[allow(
    clippy::too_many_arguments,
    reason = "the window layout, temperature and sample as pass-1's parameters name them"
)]
pub fn score(
    model: &Gpt,
    tokens: &[u16],
    stride: usize,
    tail: Tail,
    batch: usize,
    temperature: f64,
    sample: &[i64],
    progress: impl FnMut(usize),
) -> Scores {
    let windows = (stride, tail, batch);
    score_with_hints(model, tokens, &[], windows, temperature, sample, progress)
}

/// [`score`], and with `hints` (one per target, by position − 1; empty: none) each
/// entry's probability of its hint, gathered from the same distribution as its target's.
pub fn score_with_hints(
    model: &Gpt,
    tokens: &[u16],
    hints: &[u16],
    (stride, tail, batch): (usize, Tail, usize),
    temperature: f64,
    sample: &[i64],
    mut progress: impl FnMut(usize),
) -> Scores {
    let mut wanted: std::collections::BTreeSet<i64> = sample.iter().copied().collect();
    let device = model.device();
    let n_ctx = model.config().seq_len as usize;
    let targets = tokens.len().saturating_sub(1);
    let all = windows(targets, n_ctx, stride, tail);
    let mut out = Scores::default();
    tch::no_grad(|| {
        for group in all.chunks(batch.max(1)) {
            let mut inputs = vec![0i64; group.len() * n_ctx];
            for (row, w) in group.iter().enumerate() {
                for j in 0..w.len {
                    inputs[row * n_ctx + j] = tokens[w.start + j] as i64;
                }
            }
            let x = Tensor::from_slice(&inputs)
                .view([group.len() as i64, n_ctx as i64])
                .to_device(device);
            let z = model.forward(&x).to_kind(Kind::Float) / temperature;
            let log_p = z.log_softmax(-1, Kind::Float);
            let entropy =
                -(log_p.exp() * &log_p).sum_dim_intlist([-1].as_slice(), false, Kind::Float);
            let log_p = log_p.to_device(tch::Device::Cpu);
            let entropy = entropy.to_device(tch::Device::Cpu);
            for (row, w) in group.iter().enumerate() {
                let scored = w.first_scored as i64..w.len as i64;
                let targets: Vec<i64> = scored
                    .clone()
                    .map(|j| tokens[w.start + j as usize + 1] as i64)
                    .collect();
                let count = targets.len() as i64;
                let rows = log_p
                    .get(row as i64)
                    .narrow(0, w.first_scored as i64, count);
                let picked = rows
                    .gather(1, &Tensor::from_slice(&targets).unsqueeze(1), false)
                    .exp()
                    .squeeze_dim(1);
                let h = entropy
                    .get(row as i64)
                    .narrow(0, w.first_scored as i64, count);
                if !hints.is_empty() {
                    let hinted: Vec<i64> = (w.first_scored..w.len)
                        .map(|j| hints[w.start + j] as i64)
                        .collect();
                    let q = rows
                        .gather(1, &Tensor::from_slice(&hinted).unsqueeze(1), false)
                        .exp()
                        .squeeze_dim(1);
                    out.hint_p
                        .extend(Vec::<f32>::try_from(&q).expect("f32 values"));
                }
                for j in scored.clone() {
                    let position = (w.start + j as usize + 1) as i64;
                    if wanted.remove(&position) {
                        let probs = log_p.get(row as i64).get(j).exp();
                        out.distributions
                            .push((position, Vec::<f32>::try_from(&probs).expect("f32 values")));
                    }
                }
                out.position
                    .extend(scored.map(|j| (w.start + j as usize + 1) as i64));
                out.model_p
                    .extend(Vec::<f32>::try_from(&picked).expect("f32 values"));
                out.entropy
                    .extend(Vec::<f32>::try_from(&h).expect("f32 values"));
            }
            progress(group.len());
        }
    });
    out.distributions.sort_by_key(|(position, _)| *position);
    out
}

/// Pass 1 against the model itself (the tests above need no model).
#[cfg(test)]
mod against_the_model {
    use crate::score;
    use crate::testing::{randomised, seeded, small};
    use tch::{Kind, Tensor};

    /// Pass 1 agrees with one plain forward over the first window, and its values are
    /// probabilities and entropies of the tempered distribution.
    #[test]
    fn pass1_matches_a_direct_forward_and_is_tempered() {
        let _seeded = seeded(5);
        let config = small();
        let (_vs, model) = randomised(&config);
        let tokens: Vec<u16> = (0..100).map(|i| ((i * 37) % 1024) as u16).collect();
        let scores = score::score(
            &model,
            &tokens,
            8,
            score::Tail::Record,
            3,
            0.85,
            &[5, 40, 99],
            |_| {},
        );
        // The kept distributions sum to 1 and agree with model_p at the true token.
        assert_eq!(
            scores.distributions.iter().map(|d| d.0).collect::<Vec<_>>(),
            [5, 40, 99]
        );
        for (position, probs) in &scores.distributions {
            let sum: f64 = probs.iter().map(|&p| p as f64).sum();
            assert!((sum - 1.0).abs() < 1e-4, "{position}: {sum}");
            let row = scores.position.iter().position(|p| p == position).unwrap();
            let true_token = tokens[*position as usize] as usize;
            assert!((probs[true_token] - scores.model_p[row]).abs() < 1e-6);
        }
        let entries: usize = score::windows(99, 32, 8, score::Tail::Record)
            .iter()
            .map(|w| w.len - w.first_scored)
            .sum();
        assert_eq!(scores.position.len(), entries);
        assert_eq!(&scores.position[..32], &(1..=32).collect::<Vec<i64>>()[..]);
        let x = Tensor::from_slice(&tokens[..32].iter().map(|&t| t as i64).collect::<Vec<_>>())
            .view([1, 32]);
        let log_p = (model.forward(&x) / 0.85).log_softmax(-1, Kind::Float);
        for j in [0usize, 7, 31] {
            let direct = log_p
                .double_value(&[0, j as i64, tokens[j + 1] as i64])
                .exp();
            assert!((scores.model_p[j] as f64 - direct).abs() < 1e-6, "j {j}");
        }
        let max_entropy = (1024f32).ln();
        assert!(scores.model_p.iter().all(|&p| p > 0.0 && p <= 1.0));
        assert!(scores
            .entropy
            .iter()
            .all(|&h| h >= 0.0 && h <= max_entropy + 1e-4));
    }
}
