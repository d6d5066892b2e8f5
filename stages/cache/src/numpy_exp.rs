//! `exp` on `float32` as numpy computes it on the record's machines.
//!
//! The phrase weight (§6) takes `exp` of a float32 array. numpy does not call libm for
//! that: on x86 CPUs with AVX2+FMA3 or AVX-512F it runs its own vectorised kernel, which
//! differs from libm's `expf` (what `f32::exp` calls) by one or two units in the last
//! place on about 39% of the inputs the blend sees, with a bias that does not average
//! out over 62M entries. To reproduce the record's `val_bpb` to the last digits we
//! evaluate the same algorithm, operation by operation:
//!
//! 1. saturate: `x ≥ 88.7228…` gives +∞, `x ≤ −103.972…` gives 0;
//! 2. `k = rint(x·log2(e))`, the multiply rounded to float32, the rint done by adding and
//!    subtracting 1.5·2²³;
//! 3. Cody–Waite reduction with ln 2 split in two float32 parts, each step one fused
//!    multiply-add: `y = k·c₁ + x`, `y = k·c₂ + y`;
//! 4. a rational minimax approximation `P₅(y) / Q₂(y)`, both by Horner with fused
//!    multiply-adds, and one correctly rounded float32 division;
//! 5. scale by 2^k (exact for the results the blend uses, which are normal numbers).
//!
//! The coefficients are numpy's published ones (`npy_simd_data.h`). Verified against
//! numpy on every float32 input of the blend's range by `tests/numpy_exp.rs`, which also
//! shows that numpy with its SIMD paths disabled (`NPY_DISABLE_CPU_FEATURES`) falls back
//! to libm, i.e. to [`f32::exp`].

// numpy's constants, digit for digit as its sources write them (more digits than an f32
// holds: each rounds to the float32 numpy uses).
#![allow(clippy::excessive_precision)]

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// ln 2 = −(C1 + C2), split so that `k·C1` is exact for the k that occur.
const CODY_WAITE_C1: f32 = -6.931_457_52e-1;
const CODY_WAITE_C2: f32 = -1.428_606_77e-6;
/// 1.5·2²³: adding and subtracting it rounds a float32 below 2²² to the nearest integer
/// (ties to even).
const RINT_MAGIC: f32 = 12_582_912.0;
const P: [f32; 6] = [
    9.999_999_999_980_870_924_916e-1,
    7.257_664_613_233_124_478_488e-1,
    2.473_615_434_895_520_810_817e-1,
    5.114_512_081_637_298_353_406e-2,
    6.757_896_990_527_504_603_057e-3,
    5.082_762_527_590_693_718_096e-4,
];
const Q: [f32; 3] = [
    1.0,
    -2.742_335_390_411_667_452_936e-1,
    2.159_509_375_685_829_852_307e-2,
];
const X_MAX: f32 = 88.722_839_355_468_75;
const X_MIN: f32 = -103.972_084_045_410_156_25;

/// `numpy.exp` of one float32, as numpy's AVX2/AVX-512F kernel computes it.
#[inline]
pub fn numpy_exp_f32(x: f32) -> f32 {
    // The same arithmetic either way (a fused multiply-add is exact before its one
    // rounding, in hardware or in software); the FMA instruction is ten times faster
    // than the library routine `mul_add` becomes without it.
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has FMA, checked just above.
        return unsafe { numpy_exp_f32_fma(x) };
    }
    numpy_exp_kernel(x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn numpy_exp_f32_fma(x: f32) -> f32 {
    numpy_exp_kernel(x)
}

#[inline(always)]
fn numpy_exp_kernel(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x >= X_MAX {
        return f32::INFINITY;
    }
    if x <= X_MIN {
        return 0.0;
    }
    let k = (x * LOG2E + RINT_MAGIC) - RINT_MAGIC;
    let y = k.mul_add(CODY_WAITE_C1, x);
    let y = k.mul_add(CODY_WAITE_C2, y);
    let numerator = P[5]
        .mul_add(y, P[4])
        .mul_add(y, P[3])
        .mul_add(y, P[2])
        .mul_add(y, P[1])
        .mul_add(y, P[0]);
    let denominator = Q[2].mul_add(y, Q[1]).mul_add(y, Q[0]);
    scale_by_power_of_two(numerator / denominator, k as i32)
}

/// `r·2^k`, exact while the result is a normal float32 (as AVX-512's `scalef`); outside
/// that (only for |x| near the saturation bounds) it is two exact steps and one rounding.
fn scale_by_power_of_two(r: f32, k: i32) -> f32 {
    let half = k / 2;
    r * power_of_two(half) * power_of_two(k - half)
}

fn power_of_two(k: i32) -> f32 {
    f32::from_bits(((k + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issues_example_differs_from_libm_as_numpy_does() {
        let x = -2.0f32 * (2.366_804_4f32 - 2.5);
        assert_eq!(numpy_exp_f32(x), 1.305_245_8);
        assert_eq!(x.exp(), 1.305_245_6);
    }

    #[test]
    fn the_fma_instruction_and_the_library_routine_agree() {
        let mut x = -104.0f32;
        while x < 89.0 {
            assert_eq!(
                numpy_exp_f32(x).to_bits(),
                numpy_exp_kernel(x).to_bits(),
                "{x}"
            );
            x += 0.000_77;
        }
    }

    #[test]
    fn saturation_and_special_values() {
        assert_eq!(numpy_exp_f32(0.0), 1.0);
        assert_eq!(numpy_exp_f32(100.0), f32::INFINITY);
        assert_eq!(numpy_exp_f32(-200.0), 0.0);
        assert!(numpy_exp_f32(f32::NAN).is_nan());
    }

    #[test]
    fn stays_within_three_ulp_of_libm_over_the_blends_range() {
        let mut x = -9.0f32;
        while x < 9.0 {
            let (a, b) = (numpy_exp_f32(x), x.exp());
            let ulps = (a.to_bits() as i64 - b.to_bits() as i64).abs();
            assert!(ulps <= 3, "x = {x}: {a} vs {b}");
            x += 0.000_37;
        }
    }
}
