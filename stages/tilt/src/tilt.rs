//! Applying a hint (eval-techniques.md §1.7): the hinted token's logit gets a boost β and
//! the distribution is renormalised exactly, p'(a) = p(a)·e^{β[a=h]} / Z with
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
}
