//! Helpers shared by the unit tests of this crate's modules.

use tch::{nn, Device};

use crate::{Gpt, GptConfig};

/// libtorch's generator is global: tests that seed it and then draw from it hold
/// this lock, or a test on another thread could draw in between.
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub(crate) fn seeded(seed: i64) -> std::sync::MutexGuard<'static, ()> {
    let guard = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    guard
}

pub(crate) fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}

pub(crate) fn small() -> GptConfig {
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
pub(crate) fn randomised(config: &GptConfig) -> (nn::VarStore, Gpt) {
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
