//! Applying a hint (docs/eval-techniques.md §1.7): the hinted token's logit gets a boost
//! β and the distribution is renormalised exactly, p'(a) = p(a)·e^{β[a=h]} / Z with
//! Z = 1 + q(e^β − 1), q = p(h). It needs the model's probability of the hint, a token
//! other than the target in general, which only the model's pass can give.

/// The tilted probability of the target: `p` the model's, `q` the hint's, `hit` whether
/// the target is the hint. β = 0 leaves `p` as it is.
pub fn tilted(p: f64, q: f64, hit: bool, beta: f64) -> f64 {
    let z = 1.0 + q * beta.exp_m1();
    let boost = if hit { beta.exp() } else { 1.0 };
    p * boost / z
}

/// The reference's tilted loss in nats, in f32 as #2135 computes it:
/// −ln p − β·[hit] + ln(1 + q·expm1(β)).
pub fn tilted_loss_f32(p: f32, q: f32, hit: bool, beta: f32) -> f32 {
    let gain = if hit { beta } else { 0.0 };
    -p.ln() - gain + (q * beta.exp_m1()).ln_1p()
}

/// The hit rate above which a hint pays off at hint probability `q`: ln Z / β.
pub fn break_even(q: f64, beta: f64) -> f64 {
    (q * beta.exp_m1()).ln_1p() / beta
}

/// Σ ln x over many probabilities, taken as the logarithm of their product: the running
/// product's mantissa and binary exponent are kept apart (so it never underflows), and
/// one logarithm is taken at the end instead of one per value. 62M entries took 62M
/// logarithms, a seventh of the tilt's time; a product's rounding error (one ulp a
/// factor) is also below a sum of logarithms' (one ulp of a growing sum a term).
#[derive(Debug, Clone, Copy)]
pub struct LnProduct {
    /// In [1, 2).
    mantissa: f64,
    exponent: i64,
    /// The logarithms of the factors whose product would not be a normal number (0,
    /// infinity, NaN, as `ln` takes them), summed.
    degenerate: f64,
}

impl Default for LnProduct {
    fn default() -> Self {
        LnProduct {
            mantissa: 1.0,
            exponent: 0,
            degenerate: 0.0,
        }
    }
}

impl LnProduct {
    const EXPONENT_BITS: u64 = 0x7ff << 52;

    pub fn times(&mut self, x: f64) {
        let m = self.mantissa * x;
        if !m.is_normal() {
            self.degenerate += x.ln();
            return;
        }
        let bits = m.to_bits();
        self.exponent += ((bits & Self::EXPONENT_BITS) >> 52) as i64 - 1023;
        self.mantissa = f64::from_bits((bits & !Self::EXPONENT_BITS) | (1023 << 52));
    }

    /// The sum of the factors' logarithms.
    pub fn ln(&self) -> f64 {
        self.mantissa.ln() + self.exponent as f64 * std::f64::consts::LN_2 + self.degenerate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BETA: f64 = 2.625;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 5e-7
    }

    #[test]
    fn the_tilt_numbers_of_the_spec() {
        assert!(close(BETA.exp(), 13.804574), "{}", BETA.exp());
        let z = 1.0 + 0.2 * BETA.exp_m1();
        assert!(close(z, 3.560915) && close(z.ln(), 1.270017));
        // A hit at p = 0.2, a miss at p = 0.5, with q = 0.2.
        let hit = tilted(0.2, 0.2, true, BETA);
        assert!(close(hit, 0.775339), "{hit}");
        assert!(close(-hit.ln(), 0.254455));
        assert!(close(-tilted(0.5, 0.2, false, BETA).ln(), 1.963165));
        let f32_loss = tilted_loss_f32(0.2, 0.2, true, BETA as f32);
        assert!((f32_loss - 0.254455).abs() < 1e-5, "{f32_loss}");
        // (0.2, 0.5, 0.3) with the first hinted becomes (0.775339, 0.140413, 0.084248).
        let p = [0.2, 0.5, 0.3];
        let tilted: Vec<f64> = (0..3).map(|a| tilted(p[a], 0.2, a == 0, BETA)).collect();
        for (t, want) in tilted.iter().zip([0.775339, 0.140413, 0.084248]) {
            assert!(close(*t, want), "{t} vs {want}");
        }
        assert!(close(tilted.iter().sum::<f64>(), 1.0));
        for (q, want) in [(0.05, 0.189), (0.2, 0.484), (0.5, 0.763)] {
            assert!((break_even(q, BETA) - want).abs() < 5e-4, "{q}");
        }
        assert_eq!(super::tilted(0.3, 0.9, true, 0.0), 0.3);
    }

    #[test]
    fn a_product_s_logarithm_is_the_sum_of_the_logarithms() {
        // Small enough that a plain product would underflow after a few dozen factors.
        let mut state = 0x9e3779b97f4a7c15u64;
        let factors: Vec<f64> = (0..200_000)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (state >> 11) as f64 / (1u64 << 53) as f64;
                (u * 1e-30_f64.ln()).exp() as f32 as f64
            })
            .collect();
        let mut product = LnProduct::default();
        factors.iter().for_each(|&x| product.times(x));
        let sum: f64 = factors.iter().map(|x| x.ln()).sum();
        assert!(
            (product.ln() - sum).abs() < 1e-9 * sum.abs(),
            "{} vs {sum}",
            product.ln()
        );
        assert_eq!(LnProduct::default().ln(), 0.0);
        for (x, want) in [(0.0, f64::NEG_INFINITY), (f64::INFINITY, f64::INFINITY)] {
            let mut p = LnProduct::default();
            p.times(0.5);
            p.times(x);
            assert_eq!(p.ln(), want);
        }
        let mut p = LnProduct::default();
        p.times(f64::NAN);
        assert!(p.ln().is_nan());
        // Subnormal f32 probabilities are normal in f64.
        let mut p = LnProduct::default();
        p.times(f32::from_bits(1) as f64);
        assert_eq!(p.ln(), (f32::from_bits(1) as f64).ln());
    }
}
