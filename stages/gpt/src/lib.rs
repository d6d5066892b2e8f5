//! The record's GPT (algorithm.md §2–§4) on libtorch through tch.
//!
//! Pure compute: the model, its optimisers and training step, the FP16 export and the
//! sliding-window pass-1 scorer. The one exception is [`stages`], the worker side of the
//! `train` and `pass1 (model = "gpt")` stages, which reads and writes the stage's
//! directories (never the store) for the `cachemoney-gpt` worker binary.

pub mod export;
pub mod model;
pub mod optim;
pub mod score;
pub mod stages;
pub mod train;

/// The model's shape lives with the libtorch-free stage definitions, so the runner can
/// validate it without loading libtorch.
pub use neural::config;

pub use config::{GptConfig, ShapeError};
pub use model::Gpt;
pub use train::{TokenStream, TrainConfig, Trainer};

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device, Kind, Tensor};

    /// libtorch's generator is global: tests that seed it and then draw from it hold
    /// this lock, or a test on another thread could draw in between.
    static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn seeded(seed: i64) -> std::sync::MutexGuard<'static, ()> {
        let guard = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(seed);
        guard
    }

    fn parameter_count(vs: &nn::VarStore) -> i64 {
        vs.variables().values().map(|t| t.numel() as i64).sum()
    }

    #[test]
    fn the_record_shape_has_the_record_parameter_count() {
        let _seeded = seeded(7);
        let vs = nn::VarStore::new(Device::Cpu);
        Gpt::new(&vs.root(), &GptConfig::default()).unwrap();
        assert_eq!(parameter_count(&vs), 4_234_268);
        let vs = nn::VarStore::new(Device::Cpu);
        let config = GptConfig {
            value_embedding: false,
            ..GptConfig::default()
        };
        Gpt::new(&vs.root(), &config).unwrap();
        assert_eq!(parameter_count(&vs), 4_103_193);
    }

    #[test]
    fn tensor_names_and_shapes_follow_the_spec_inventory() {
        let _seeded = seeded(7);
        let vs = nn::VarStore::new(Device::Cpu);
        Gpt::new(&vs.root(), &GptConfig::default()).unwrap();
        let vars = vs.variables();
        for (name, shape) in [
            ("tok_emb.weight", vec![1024, 256]),
            ("bigram.embed.weight", vec![2048, 128]),
            ("bigram.proj.weight", vec![256, 128]),
            ("bigram.scale", vec![]),
            ("smear.gate", vec![256]),
            ("skip_weights", vec![3, 256]),
            ("qo_bank", vec![12, 256, 256]),
            ("kv_bank", vec![12, 128, 256]),
            ("mlp_up_bank", vec![6, 768, 256]),
            ("mlp_down_bank", vec![6, 256, 768]),
            ("blocks.5.attn.q_gain", vec![4]),
            ("blocks.0.resid_mix", vec![2, 256]),
            ("ve_shared.embed.weight", vec![1024, 128]),
            ("ve_layer_scales.1", vec![]),
        ] {
            assert_eq!(vars[name].size(), shape, "{name}");
        }
    }

    #[test]
    fn the_ntk_rescaled_rope_base_matches_the_spec() {
        let base = GptConfig::default().effective_rope_base();
        assert!((base - 22081.79).abs() < 0.01, "{base}");
    }

    fn small() -> GptConfig {
        GptConfig {
            layers: 4,
            d_model: 64,
            heads: 4,
            kv_heads: 2,
            rope_dims: 8,
            seq_len: 32,
            rope_train_len: 16,
            xsa_last: 2,
            bigram_rows: 64,
            bigram_dim: 16,
            ..GptConfig::default()
        }
    }

    /// A model whose zero-initialised tensors are randomised too, so every path
    /// (Out and MLP-down banks, BigramHash table) carries signal in the tests.
    /// (The caller holds [`seeded`].)
    fn randomised(config: &GptConfig) -> (nn::VarStore, Gpt) {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Gpt::new(&vs.root(), config).unwrap();
        tch::no_grad(|| {
            for (_, mut t) in vs.variables() {
                let noise = t.randn_like() * 0.05;
                let _ = t.g_add_(&noise);
            }
        });
        (vs, model)
    }

    #[test]
    fn logits_are_causal_and_softcapped() {
        let _seeded = seeded(7);
        let config = small();
        let (_vs, model) = randomised(&config);
        let tokens = Tensor::randint(1024, [2, 20], (Kind::Int64, Device::Cpu));
        let logits = model.forward(&tokens);
        assert_eq!(logits.size(), vec![2, 20, 1024]);
        assert!(logits.abs().max().double_value(&[]) <= 30.0);
        // Changing token 12 changes nothing before position 12 and something after.
        let changed = tokens.copy();
        let _ = changed
            .get(0)
            .get(12)
            .fill_((tokens.int64_value(&[0, 12]) + 1) % 1024);
        let other = model.forward(&changed);
        let before = (&logits.narrow(1, 0, 12) - other.narrow(1, 0, 12))
            .abs()
            .max()
            .double_value(&[]);
        let after = (&logits.narrow(1, 12, 8) - other.narrow(1, 12, 8))
            .abs()
            .max()
            .double_value(&[]);
        assert_eq!(before, 0.0);
        assert!(after > 0.0);
    }

    #[test]
    fn every_parameter_gets_a_gradient_except_the_dead_value_embedding() {
        let _seeded = seeded(7);
        let config = small();
        let (vs, model) = randomised(&config);
        let tokens = Tensor::randint(1024, [2, 16], (Kind::Int64, Device::Cpu));
        let logits = model.forward(&tokens);
        let loss = logits
            .view([-1, 1024])
            .cross_entropy_for_logits(&tokens.view([-1]));
        loss.backward();
        for (name, t) in vs.variables() {
            let grad = t.grad();
            let has = grad.defined() && grad.abs().sum(Kind::Float).double_value(&[]) > 0.0;
            assert_eq!(has, !name.starts_with("ve_"), "{name}");
        }
    }

    #[test]
    fn newton_schulz_pushes_singular_values_towards_one_and_commutes_with_transpose() {
        let _seeded = seeded(1);
        let u = Tensor::randn([64, 32], (Kind::Float, Device::Cpu)) * 3.0;
        let o = optim::newton_schulz5(&u);
        // Singular values of O are the square roots of the eigenvalues of OᵀO.
        let s = Tensor::linalg_eigvalsh(&o.tr().matmul(&o), "L").sqrt();
        let (lo, hi) = (s.min().double_value(&[]), s.max().double_value(&[]));
        assert!(lo > 0.5 && hi < 1.3, "singular values in {lo}..{hi}");
        let ot = optim::newton_schulz5(&u.tr());
        let diff = (ot - o.tr()).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn schedules_follow_the_spec() {
        assert_eq!(optim::muon_momentum(0, 1500), 0.92);
        assert!((optim::muon_momentum(750, 1500) - 0.955).abs() < 1e-12);
        assert_eq!(optim::muon_momentum(5000, 1500), 0.99);
        // 600 s cap, 100 ms per step so far, 3500-step warmdown = 350 s of warmdown.
        assert_eq!(
            optim::lr_multiplier_wallclock(1000, 100_000.0, 600_000.0, 3500),
            1.0
        );
        let s = optim::lr_multiplier_wallclock(4250, 425_000.0, 600_000.0, 3500);
        assert!((s - 0.5).abs() < 1e-12, "{s}");
        assert_eq!(
            optim::lr_multiplier_wallclock(6000, 600_000.0, 600_000.0, 3500),
            0.0
        );
        assert_eq!(optim::lr_multiplier_steps(10, 100, 20), 1.0);
        assert_eq!(optim::lr_multiplier_steps(90, 100, 20), 0.5);
    }

    #[test]
    fn adamw_first_step_is_decay_then_a_sign_step() {
        let p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        (&p * Tensor::from_slice(&[3.0f32, -0.5]))
            .sum(Kind::Float)
            .backward();
        let mut adam = optim::AdamW::new(&[p.shallow_clone()], 0.1, 0.04);
        adam.step(&[p.shallow_clone()], 1.0);
        // m̂ = g and v̂ = g² after one step, so the update is lr · g / (|g| + eps).
        let expected = [1.0 * (1.0 - 0.004) - 0.1, -2.0 * (1.0 - 0.004) + 0.1];
        for (i, e) in expected.iter().enumerate() {
            assert!((p.double_value(&[i as i64]) - e).abs() < 1e-6);
        }
    }

    #[test]
    fn clipping_scales_the_global_norm_to_the_limit() {
        let a = Tensor::from_slice(&[3.0f32]).set_requires_grad(true);
        let b = Tensor::from_slice(&[4.0f32]).set_requires_grad(true);
        (a.square() / 2.0 + b.square() / 2.0)
            .sum(Kind::Float)
            .backward();
        let norm = optim::clip_grad_norm(&[a.shallow_clone(), b.shallow_clone()], 0.3);
        assert!((norm - 5.0).abs() < 1e-6);
        let after = (a.grad().square() + b.grad().square())
            .sqrt()
            .double_value(&[0]);
        assert!((after - 0.3).abs() < 1e-6, "{after}");
    }

    #[test]
    fn optimiser_groups_follow_the_inventory() {
        use train::{group_of, Group};
        assert_eq!(group_of("mlp_up_bank"), Group::Muon);
        assert_eq!(group_of("bigram.embed.weight"), Group::Tok);
        assert_eq!(group_of("bigram.proj.weight"), Group::Scalar);
        assert_eq!(group_of("blocks.3.attn.q_gain"), Group::Scalar);
    }

    /// A few steps on a repetitive stream: the loss falls a lot, and two seeded runs
    /// give the same weights bit for bit.
    fn train_small(seed: i64, steps: usize) -> (Vec<f64>, Vec<Tensor>) {
        let _seeded = seeded(seed);
        let config = small();
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Gpt::new(&vs.root(), &config).unwrap();
        let mut trainer = Trainer::new(&vs, &TrainConfig::default());
        let text: Vec<u16> = (0..4000)
            .map(|i| ((i * 7) % 61 + (i / 200) % 3) as u16)
            .collect();
        let mut stream = TokenStream::new(&text);
        let losses = (0..steps)
            .map(|_| {
                let (x, y) = stream.next_batch(4, 32);
                trainer.step(&model, &x, &y, 1.0)
            })
            .collect();
        trainer.finish();
        let mut named: Vec<_> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        (
            losses,
            named.into_iter().map(|(_, t)| t.detach().copy()).collect(),
        )
    }

    #[test]
    fn training_learns_and_is_deterministic() {
        let (losses, weights) = train_small(11, 60);
        let first = losses[0];
        let last = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
        assert!(first > 6.0, "starts near ln 1024: {first}");
        assert!(last < first / 2.0, "loss {first} -> {last}");
        let (again, weights_again) = train_small(11, 60);
        assert_eq!(losses, again);
        for (a, b) in weights.iter().zip(&weights_again) {
            assert!(a.equal(b));
        }
    }

    #[test]
    fn the_fp16_artifact_loads_in_python_and_round_trips() {
        let _seeded = seeded(3);
        let vs = nn::VarStore::new(Device::Cpu);
        Gpt::new(&vs.root(), &GptConfig::default()).unwrap();
        let dir = std::env::temp_dir().join(format!("cm-gpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        export::write_fp16(&vs, &path).unwrap();

        // PyTorch's own reader, from the project's virtualenv, sees the spec's inventory.
        let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/python");
        let script = r#"
import sys
from safetensors.torch import load_file
t = load_file(sys.argv[1])
assert all(v.dtype.is_floating_point and str(v.dtype) == "torch.float16" for v in t.values())
print(sum(v.numel() for v in t.values()), len(t), tuple(t["qo_bank"].shape), tuple(t["mlp_up_bank"].shape))
"#;
        let out = std::process::Command::new(python)
            .args(["-c", script, path.to_str().unwrap()])
            .output()
            .expect("the .venv python (./dev sets it up)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "4234268 38 (12, 256, 256) (6, 768, 256)"
        );

        // Loading it back gives the fp16-rounded weights; a wrong shape is refused.
        let other = nn::VarStore::new(Device::Cpu);
        Gpt::new(&other.root(), &GptConfig::default()).unwrap();
        export::load_into(&other, &path).unwrap();
        let (a, b) = (
            &vs.variables()["tok_emb.weight"],
            &other.variables()["tok_emb.weight"],
        );
        assert!(a.to_kind(Kind::Half).to_kind(Kind::Float).equal(b));
        let small_vs = nn::VarStore::new(Device::Cpu);
        Gpt::new(&small_vs.root(), &small()).unwrap();
        let err = export::load_into(&small_vs, &path).unwrap_err();
        assert!(err.contains("has shape"), "{err}");
        std::fs::write(&path, b"not safetensors").unwrap();
        let err = export::load_into(&other, &path).unwrap_err();
        assert!(err.contains("not a readable safetensors file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Pass 1 agrees with one plain forward over the first window, and its values are
    /// probabilities and entropies of the tempered distribution.
    #[test]
    fn pass1_matches_a_direct_forward_and_is_tempered() {
        let _seeded = seeded(5);
        let config = small();
        let (_vs, model) = randomised(&config);
        let tokens: Vec<u16> = (0..100).map(|i| ((i * 37) % 1024) as u16).collect();
        let scores = score::score(&model, &tokens, 8, 3, 0.85, &[5, 40, 99], |_| {});
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
        let entries: usize = score::windows(99, 32, 8)
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

    #[test]
    fn impossible_shapes_are_refused() {
        let bad = GptConfig {
            heads: 3,
            ..GptConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .0
            .contains("do not divide d_model"));
        let bad = GptConfig {
            kv_heads: 3,
            ..GptConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
