//! The record's optimisers (algorithm.md §3.3–§3.7): Muon for the four weight banks,
//! two AdamW groups for everything else, global gradient clipping, the learning-rate
//! multiplier and the EMA of the weights. Written out rather than taken from tch's
//! `nn::Optimizer`, because the record's groups, Nesterov-Newton–Schulz update and
//! decoupled decay order have to be exactly these.

use tch::{Kind, Tensor};

/// The correctly rounded square root, computed the same way on every processor.
///
/// libtorch's `sqrt` on a CPU is MKL's vector-math routine, which refines a hardware
/// reciprocal-square-root estimate: its last bit depends on the processor even in MKL's
/// reproducible mode (measured: 10,014 of 65,536 values off the exact root here, a
/// different 9,500 on an emulated Haswell or EPYC). `rsqrt` and `reciprocal` are
/// ATen's own divisions and square roots, exact IEEE operations: two of them in f64 are
/// within 2⁻⁵² of the root, which rounded to f32 gives the correctly rounded f32 root
/// (checked against numpy's on 47 million values across the whole positive range,
/// subnormals and zero included: no difference).
pub fn sqrt(x: &Tensor) -> Tensor {
    x.to_kind(Kind::Double)
        .rsqrt()
        .reciprocal()
        .to_kind(x.kind())
}

/// Newton–Schulz quintic coefficients (§3.5).
const NS_COEFFICIENTS: (f64, f64, f64) = (3.4445, -4.7750, 2.0315);

/// NS5 (§3.5) on a matrix or a batch of matrices `[..., rows, cols]`: an approximate
/// orthogonalisation (singular values pushed towards 1, not exactly to 1).
pub fn newton_schulz5(u: &Tensor) -> Tensor {
    let size = u.size();
    let (rows, cols) = (size[size.len() - 2], size[size.len() - 1]);
    let tall = rows > cols;
    let x = if tall {
        u.transpose(-2, -1)
    } else {
        u.shallow_clone()
    };
    let norm = sqrt(
        &x.square()
            .sum_dim_intlist([-2, -1].as_slice(), true, x.kind()),
    );
    let mut x = &x / (norm + 1e-7);
    let (a, b, c) = NS_COEFFICIENTS;
    for _ in 0..5 {
        let gram = x.matmul(&x.transpose(-2, -1));
        let poly = &gram * b + gram.matmul(&gram) * c;
        x = &x * a + poly.matmul(&x);
    }
    if tall {
        x.transpose(-2, -1)
    } else {
        x
    }
}

/// Muon's momentum warm-up: 0.92 → 0.99 linearly over the first 1,500 steps.
pub fn muon_momentum(step: usize, warmup_steps: usize) -> f64 {
    let f = (step as f64 / warmup_steps.max(1) as f64).min(1.0);
    (1.0 - f) * 0.92 + f * 0.99
}

/// Muon over 3-D banks `[slices, rows, cols]`; every slice is one matrix.
pub struct Muon {
    pub lr: f64,
    pub weight_decay: f64,
    pub momentum_warmup_steps: usize,
    buffers: Vec<Tensor>,
}

impl Muon {
    pub fn new(banks: &[Tensor], lr: f64, weight_decay: f64) -> Muon {
        Muon {
            lr,
            weight_decay,
            momentum_warmup_steps: 1500,
            buffers: banks.iter().map(Tensor::zeros_like).collect(),
        }
    }

    /// One update of every bank from its `.grad()`, at learning-rate multiplier `scale`.
    pub fn step(&mut self, banks: &[Tensor], step: usize, scale: f64) {
        let mu = muon_momentum(step, self.momentum_warmup_steps);
        let lr = self.lr * scale;
        tch::no_grad(|| {
            for (bank, buffer) in banks.iter().zip(&mut self.buffers) {
                let grad = bank.grad();
                if !grad.defined() {
                    continue;
                }
                let _ = buffer.g_mul_scalar_(mu).g_add_(&grad);
                let update = newton_schulz5(&(&grad + &*buffer * mu));
                let size = bank.size();
                let (rows, cols) = (size[size.len() - 2], size[size.len() - 1]);
                let shape_factor = (rows as f64 / cols as f64).max(1.0).sqrt();
                let mut bank = bank.shallow_clone();
                let _ = bank.g_mul_scalar_(1.0 - lr * self.weight_decay);
                let _ = bank.g_sub_(&(update * (lr * shape_factor)));
            }
        });
    }
}

/// PyTorch's AdamW (decoupled decay, bias correction) for one parameter group.
pub struct AdamW {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    moments: Vec<(Tensor, Tensor)>,
    steps: i32,
}

impl AdamW {
    pub fn new(params: &[Tensor], lr: f64, weight_decay: f64) -> AdamW {
        AdamW {
            lr,
            betas: (0.9, 0.95),
            eps: 1e-8,
            weight_decay,
            moments: params
                .iter()
                .map(|p| (p.zeros_like(), p.zeros_like()))
                .collect(),
            steps: 0,
        }
    }

    /// One update of every parameter that has a gradient (the dead ValueEmbedding never
    /// does, so it keeps its initial values, as in the record).
    pub fn step(&mut self, params: &[Tensor], scale: f64) {
        self.steps += 1;
        let lr = self.lr * scale;
        let (b1, b2) = self.betas;
        let correction1 = 1.0 - b1.powi(self.steps);
        let correction2 = 1.0 - b2.powi(self.steps);
        tch::no_grad(|| {
            for (param, (m, v)) in params.iter().zip(&mut self.moments) {
                let grad = param.grad();
                if !grad.defined() {
                    continue;
                }
                let _ = m.g_mul_scalar_(b1).g_add_(&(&grad * (1.0 - b1)));
                let _ = v.g_mul_scalar_(b2).g_add_(&(grad.square() * (1.0 - b2)));
                let denominator = sqrt(&(&*v / correction2)) + self.eps;
                let mut param = param.shallow_clone();
                let _ = param.g_mul_scalar_(1.0 - lr * self.weight_decay);
                let _ = param.g_sub_(&(&*m / correction1 / denominator * lr));
            }
        });
    }
}

/// Scales every gradient by `min(1, max_norm / (norm + 1e-6))`, where `norm` is the L2
/// norm over all of them (§3.6). Returns the norm before clipping.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = params
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        let norm = grads
            .iter()
            .map(|g| g.square().sum(Kind::Double).double_value(&[]))
            .sum::<f64>()
            .sqrt();
        let factor = (max_norm / (norm + 1e-6)).min(1.0);
        if factor < 1.0 {
            for mut g in grads {
                let _ = g.g_mul_scalar_(factor);
            }
        }
        norm
    })
}

/// The learning-rate multiplier of §3.3, in time: 1 until the remaining time fits in
/// `warmdown_steps` steps at the average step time so far, then linear down to 0 at
/// `max_ms`.
pub fn lr_multiplier_wallclock(
    step: usize,
    elapsed_ms: f64,
    max_ms: f64,
    warmdown_steps: usize,
) -> f64 {
    let step_ms = elapsed_ms / step.max(1) as f64;
    let warmdown_ms = warmdown_steps as f64 * step_ms;
    let remaining = (max_ms - elapsed_ms).max(0.0);
    if remaining <= warmdown_ms && warmdown_ms > 0.0 {
        remaining / warmdown_ms
    } else {
        1.0
    }
}

/// The same shape in steps, for runs that must be reproducible: 1, then linear down to
/// 0 over the last `warmdown_steps` of `total_steps`.
pub fn lr_multiplier_steps(step: usize, total_steps: usize, warmdown_steps: usize) -> f64 {
    let remaining = total_steps.saturating_sub(step) as f64;
    if warmdown_steps > 0 && remaining <= warmdown_steps as f64 {
        remaining / warmdown_steps as f64
    } else {
        1.0
    }
}

/// An fp32 shadow of the weights, `ema ← decay·ema + (1 − decay)·w` after every step
/// (§3.7); the final weights are the shadow.
pub struct Ema {
    pub decay: f64,
    shadow: Vec<Tensor>,
}

impl Ema {
    pub fn new(params: &[Tensor], decay: f64) -> Ema {
        Ema {
            decay,
            shadow: params
                .iter()
                .map(|p| p.detach().to_kind(Kind::Float).copy())
                .collect(),
        }
    }

    pub fn update(&mut self, params: &[Tensor]) {
        tch::no_grad(|| {
            for (shadow, p) in self.shadow.iter_mut().zip(params) {
                let _ = shadow
                    .g_mul_scalar_(self.decay)
                    .g_add_(&(p.to_kind(Kind::Float) * (1.0 - self.decay)));
            }
        });
    }

    /// Copies the shadow into the parameters, in each parameter's dtype.
    pub fn apply(&self, params: &[Tensor]) {
        tch::no_grad(|| {
            for (shadow, p) in self.shadow.iter().zip(params) {
                p.shallow_clone().copy_(&shadow.to_kind(p.kind()));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use crate::optim;
    use crate::testing::seeded;
    use tch::{Device, Kind, Tensor};

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
    fn sqrt_is_the_correctly_rounded_root_everywhere_in_the_range() {
        // Bit patterns spread over every positive finite f32, subnormals and zero too.
        let values: Vec<f32> = (0..200_000u64)
            .map(|i| f32::from_bits(((i * 0x7f80_0000) / 200_000) as u32))
            .collect();
        let roots: Vec<f32> = Vec::try_from(optim::sqrt(&Tensor::from_slice(&values))).unwrap();
        for (value, root) in values.iter().zip(&roots) {
            assert_eq!(root.to_bits(), value.sqrt().to_bits(), "sqrt({value:e})");
        }
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
}
