//! The GPT of algorithm.md §2, written to be read beside it: every section of the spec
//! is one method here.
//!
//! Weights live in a tch `VarStore` under the record's tensor names (so an exported
//! safetensors file lines up with the record's state dict). Attention, MLP and output
//! projections of all layers are stored as "banks" (one 3-D tensor per kind) because
//! that is the shape Muon optimises.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use crate::config::{GptConfig, ShapeError};

/// float32 machine epsilon: PyTorch's RMSNorm default for `eps=None` (§2.2).
const RMS_EPS: f64 = 1.192_092_9e-7;

/// The two primes of the BigramHash index (§2.4).
const BIGRAM_PRIMES: (i64, i64) = (36313, 27191);

/// The per-layer scalars and vectors (§2.2, §2.3).
struct BlockParams {
    q_gain: Tensor,
    attn_scale: Tensor,
    mlp_scale: Tensor,
    resid_mix: Tensor,
}

pub struct Gpt {
    config: GptConfig,
    tok_emb: Tensor,
    bigram_embed: Tensor,
    bigram_proj: Tensor,
    bigram_scale: Tensor,
    smear_gate: Tensor,
    skip_weights: Tensor,
    /// Q of layers 0..L, then Out of layers 0..L.
    qo_bank: Tensor,
    /// K of layers 0..L, then V of layers 0..L.
    kv_bank: Tensor,
    mlp_up_bank: Tensor,
    mlp_down_bank: Tensor,
    blocks: Vec<BlockParams>,
    /// RoPE angles' cos and sin for positions 0..seq_len, [seq_len, rope_dims / 2].
    rope_cos: Tensor,
    rope_sin: Tensor,
}

/// `x / sqrt(mean(x²) + ε)` over the last dim, no weight (§2.2).
fn rms_norm(x: &Tensor) -> Tensor {
    let mean_square = x.square().mean_dim(-1, true, Kind::Float);
    x * (mean_square + RMS_EPS).rsqrt()
}

/// `n` orthogonal `rows × cols` slices stacked, then `zeros` zero slices (§2.8).
fn bank_init(orthogonal: i64, zeros: i64, rows: i64, cols: i64, device: tch::Device) -> Tensor {
    let mut slices: Vec<Tensor> = (0..orthogonal)
        .map(|_| nn::init::init(Init::Orthogonal { gain: 1.0 }, &[rows, cols], device))
        .collect();
    slices.extend((0..zeros).map(|_| Tensor::zeros([rows, cols], (Kind::Float, device))));
    Tensor::stack(&slices, 0)
}

impl Gpt {
    /// Creates the model's variables under `vs` with the spec's initialisation (§2.8).
    /// The RNG is libtorch's: seed it with `tch::manual_seed` first.
    pub fn new(vs: &nn::Path, config: &GptConfig) -> Result<Gpt, ShapeError> {
        config.validate()?;
        let c = config;
        let device = vs.device();
        let (l, d) = (c.layers, c.d_model);
        let tok_emb = (vs / "tok_emb").var(
            "weight",
            &[c.vocab_size, d],
            Init::Randn {
                mean: 0.0,
                stdev: 0.005,
            },
        );
        let bigram_embed =
            (vs / "bigram" / "embed").zeros("weight", &[c.bigram_rows, c.bigram_dim]);
        let bigram_proj = (vs / "bigram" / "proj").var(
            "weight",
            &[d, c.bigram_dim],
            Init::Orthogonal { gain: 1.0 },
        );
        let bigram_scale = (vs / "bigram").var("scale", &[], Init::Const(c.bigram_scale_init));
        let smear_gate = (vs / "smear").zeros("gate", &[d]);
        let decoder = l - c.encoder_layers();
        let skips = c.encoder_layers().min(decoder);
        let skip_weights = vs.ones("skip_weights", &[skips, d]);
        let qo_bank = vs.var_copy("qo_bank", &bank_init(l, l, d, d, device));
        let kv_bank = vs.var_copy("kv_bank", &bank_init(2 * l, 0, c.kv_dim(), d, device));
        let mlp_up_bank = vs.var_copy("mlp_up_bank", &bank_init(l, 0, c.mlp_hidden(), d, device));
        let mlp_down_bank =
            vs.var_copy("mlp_down_bank", &bank_init(0, l, d, c.mlp_hidden(), device));
        let blocks = (0..l)
            .map(|i| {
                let p = vs / "blocks" / i;
                BlockParams {
                    q_gain: (&p / "attn").var("q_gain", &[c.heads], Init::Const(c.qk_gain_init)),
                    attn_scale: p.ones("attn_scale", &[d]),
                    mlp_scale: p.ones("mlp_scale", &[d]),
                    resid_mix: p.var_copy(
                        "resid_mix",
                        &Tensor::stack(
                            &[
                                Tensor::ones([d], (Kind::Float, device)),
                                Tensor::zeros([d], (Kind::Float, device)),
                            ],
                            0,
                        ),
                    ),
                }
            })
            .collect();
        if c.value_embedding {
            // Never applied (§2.6), but part of the state dict and the parameter count.
            let ve = vs / "ve_shared";
            let _ = (&ve / "embed").var(
                "weight",
                &[c.vocab_size, c.kv_dim()],
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.01,
                },
            );
            let _ = ve.var("scale", &[], Init::Const(0.1));
            for k in 0..c.ve_layer_scales {
                let _ = (vs / "ve_layer_scales").ones(&k.to_string(), &[]);
            }
        }
        // RoPE angles in fp32 (§2.3): θ_{t,j} = t · base^(−2j/rope_dims).
        let half = c.rope_dims / 2;
        let base = c.effective_rope_base();
        let freqs: Vec<f32> = (0..half)
            .map(|j| base.powf(-2.0 * j as f64 / c.rope_dims as f64) as f32)
            .collect();
        let positions = Tensor::arange(c.seq_len, (Kind::Float, device));
        let angles = positions
            .unsqueeze(1)
            .matmul(&Tensor::from_slice(&freqs).to_device(device).unsqueeze(0));
        Ok(Gpt {
            config: c.clone(),
            tok_emb,
            bigram_embed,
            bigram_proj,
            bigram_scale,
            smear_gate,
            skip_weights,
            qo_bank,
            kv_bank,
            mlp_up_bank,
            mlp_down_bank,
            blocks,
            rope_cos: angles.cos(),
            rope_sin: angles.sin(),
        })
    }

    pub fn config(&self) -> &GptConfig {
        &self.config
    }

    pub fn device(&self) -> tch::Device {
        self.tok_emb.device()
    }

    /// Logits `[batch, n, vocab]` for token windows `[batch, n]` (i64, n ≤ seq_len); every
    /// window starts afresh (BigramHash row and SmearGate history reset, §2.4–§2.5).
    pub fn forward(&self, tokens: &Tensor) -> Tensor {
        let c = &self.config;
        // §2.2 steps 1–3.
        let e = Tensor::embedding(&self.tok_emb, tokens, -1, false, false) + self.bigram(tokens);
        let x0 = self.smear(&rms_norm(&e));
        // Steps 4–5: encoder layers push, decoder layers pop (last in, first out).
        let mut x = x0.shallow_clone();
        let mut skips = Vec::new();
        for i in 0..c.encoder_layers() {
            x = self.block(i, &x, &x0);
            skips.push(x.shallow_clone());
        }
        for (j, i) in (c.encoder_layers()..c.layers).enumerate() {
            if let Some(skip) = skips.pop() {
                // Not `+=`: that would add in place into storage the skip stack and
                // autograd still hold.
                #[allow(clippy::assign_op_pattern)]
                {
                    x = x + self.skip_weights.get(j as i64) * skip;
                }
            }
            x = self.block(i, &x, &x0);
        }
        // Step 6: tied output embedding, tanh softcap.
        let logits = rms_norm(&x).matmul(&self.tok_emb.tr());
        (logits / c.logit_softcap).tanh() * c.logit_softcap
    }

    /// §2.4: `scale · P · Tbl[index]`, index 2047 ("no previous token") at t = 0, else
    /// `((36313·x_t) XOR (27191·x_{t−1})) mod 2047`.
    fn bigram(&self, tokens: &Tensor) -> Tensor {
        let (batch, n) = tokens.size2().expect("tokens are [batch, n]");
        let last = self.config.bigram_rows - 1;
        let first = Tensor::full([batch, 1], last, (Kind::Int64, tokens.device()));
        let rest = if n > 1 {
            let current = tokens.narrow(1, 1, n - 1) * BIGRAM_PRIMES.0;
            let previous = tokens.narrow(1, 0, n - 1) * BIGRAM_PRIMES.1;
            current.bitwise_xor_tensor(&previous).remainder(last)
        } else {
            Tensor::zeros([batch, 0], (Kind::Int64, tokens.device()))
        };
        let index = Tensor::cat(&[first, rest], 1);
        let rows = Tensor::embedding(&self.bigram_embed, &index, -1, false, false);
        rows.matmul(&self.bigram_proj.tr()) * &self.bigram_scale
    }

    /// §2.5: `x_t ← (1−g) x_t + g x_{t−1}` with g = sigmoid(γ) and x_{−1} = 0.
    fn smear(&self, x: &Tensor) -> Tensor {
        let (batch, n, d) = x.size3().expect("[batch, n, d]");
        let g = self.smear_gate.sigmoid();
        let previous = Tensor::cat(
            &[
                Tensor::zeros([batch, 1, d], (x.kind(), x.device())),
                x.narrow(1, 0, n - 1),
            ],
            1,
        );
        x * (1.0 - &g) + previous * g
    }

    /// §2.2: residual mix with x0, then attention and MLP on the scaled, normed input.
    fn block(&self, i: i64, x: &Tensor, x0: &Tensor) -> Tensor {
        let p = &self.blocks[i as usize];
        let s = 1.0 / ((i + 1) as f64).sqrt();
        let x_in = x * p.resid_mix.get(0) + x0 * p.resid_mix.get(1);
        let x1 = &x_in + &p.attn_scale * self.attention(i, &(rms_norm(&x_in) * s));
        let mlp = self.mlp(i, &(rms_norm(&x1) * s));
        x1 + &p.mlp_scale * mlp
    }

    /// §2.3.
    fn attention(&self, i: i64, u: &Tensor) -> Tensor {
        let c = &self.config;
        let (batch, n, d) = u.size3().expect("[batch, n, d]");
        let (h, hkv, hd) = (c.heads, c.kv_heads, c.head_dim());
        let l = c.layers;
        let q = u.matmul(&self.qo_bank.get(i).tr()).view([batch, n, h, hd]);
        let k = u
            .matmul(&self.kv_bank.get(i).tr())
            .view([batch, n, hkv, hd]);
        let v = u
            .matmul(&self.kv_bank.get(l + i).tr())
            .view([batch, n, hkv, hd]);
        let q = self.rope(&rms_norm(&q), n) * self.blocks[i as usize].q_gain.view([1, 1, h, 1]);
        let k = self.rope(&rms_norm(&k), n);
        // [batch, heads, n, hd]; query head h reads kv head ⌊h / group⌋ (enable_gqa).
        let y = Tensor::scaled_dot_product_attention(
            &q.transpose(1, 2),
            &k.transpose(1, 2),
            &v.transpose(1, 2),
            None::<Tensor>,
            0.0,
            true,
            1.0 / (hd as f64).sqrt(),
            true,
        )
        .transpose(1, 2);
        let y = if i >= l - c.xsa_last {
            // XSA: remove each head's component along its own position's value direction.
            let v_hat = &v
                / v.norm_scalaropt_dim(2, [-1].as_slice(), true)
                    .clamp_min(1e-12);
            let v_hat = v_hat.repeat_interleave_self_int(h / hkv, 2, None);
            let along = (&y * &v_hat).sum_dim_intlist([-1].as_slice(), true, Kind::Float);
            y - along * v_hat
        } else {
            y
        };
        y.reshape([batch, n, d])
            .matmul(&self.qo_bank.get(l + i).tr())
    }

    /// Partial RoPE on the first `rope_dims` of each head, rotate-half layout, rotating
    /// by −θ as the record does (§2.3): a' = a cos + b sin, b' = −a sin + b cos.
    fn rope(&self, x: &Tensor, n: i64) -> Tensor {
        let c = &self.config;
        let half = c.rope_dims / 2;
        if half == 0 {
            return x.shallow_clone();
        }
        let hd = x.size()[3];
        let cos = self.rope_cos.narrow(0, 0, n).view([1, n, 1, half]);
        let sin = self.rope_sin.narrow(0, 0, n).view([1, n, 1, half]);
        let a = x.narrow(3, 0, half);
        let b = x.narrow(3, half, half);
        let rotated = [&a * &cos + &b * &sin, -(&a * &sin) + &b * &cos];
        let rest = x.narrow(3, c.rope_dims, hd - c.rope_dims);
        Tensor::cat(&[&rotated[0], &rotated[1], &rest], 3)
    }

    /// §2.7: LeakyReLU(0.5)², no biases.
    fn mlp(&self, i: i64, z: &Tensor) -> Tensor {
        let u = z.matmul(&self.mlp_up_bank.get(i).tr());
        let a = u.maximum(&(&u * 0.5)).square();
        a.matmul(&self.mlp_down_bank.get(i).tr())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{parameter_count, randomised, seeded, small};
    use crate::GptConfig;
    use tch::{nn, Device, Kind, Tensor};

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
