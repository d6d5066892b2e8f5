//! The record's GPT (algorithm.md §2–§4) on libtorch through tch.
//!
//! Pure compute: the model and, in time, its training loop and sliding-window pass-1
//! scorer. What this crate does not know: files, artifacts, manifests.

pub mod config;
pub mod model;

pub use config::{GptConfig, ShapeError};
pub use model::Gpt;

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device, Kind, Tensor};

    fn parameter_count(vs: &nn::VarStore) -> i64 {
        vs.variables().values().map(|t| t.numel() as i64).sum()
    }

    #[test]
    fn the_record_shape_has_the_record_parameter_count() {
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
    fn randomised(config: &GptConfig) -> (nn::VarStore, Gpt) {
        tch::manual_seed(7);
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
