//! `numpy_exp_f32` against numpy itself (the project's `.venv`, which `./dev` sets up),
//! on every float32 from numpy's underflow bound to its overflow bound: 2.2 billion
//! inputs, the blend's range [−8.9, 5] included. Rust streams its results to a Python
//! process that computes `numpy.exp` on the same inputs and compares the bits.
//!
//! numpy picks its kernel at run time; `NPY_DISABLE_CPU_FEATURES` turns paths off, which
//! shows which ones the emulation reproduces: the AVX-512 and the AVX2 kernels (the same
//! algorithm), and, with both off, numpy's fallback to libm, which is `f32::exp`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use cachemoney_cache::numpy_exp::numpy_exp_f32;
use rayon::prelude::*;

const COMPARE: &str = r#"
import sys
import numpy as np
stride = int(sys.argv[1])
ranges = [(int(a), int(b)) for a, b in (r.split(":") for r in sys.argv[2:])]
from numpy._core._multiarray_umath import __cpu_features__, __cpu_dispatch__
print("simd:", " ".join(f for f in __cpu_dispatch__ if __cpu_features__.get(f)), flush=True)
chunk = 1 << 22
inp = sys.stdin.buffer
compared = mismatched = 0
for lo, hi in ranges:
    for start in range(lo, hi, chunk * stride):
        stop = min(start + chunk * stride, hi)
        x = np.arange(start, stop, stride, dtype=np.uint64).astype(np.uint32).view(np.float32)
        theirs = np.exp(x).view(np.uint32)
        ours = np.frombuffer(inp.read(4 * len(x)), dtype=np.uint32)
        bad = np.nonzero(ours != theirs)[0]
        compared += len(x)
        for i in bad[: max(0, 5 - mismatched)]:
            print(f"x = {x[i]!r} (0x{x.view(np.uint32)[i]:08x}): numpy {theirs.view(np.float32)[i]!r}, ours {ours.view(np.float32)[i]!r}", flush=True)
        mismatched += len(bad)
print(f"compared {compared} mismatched {mismatched}", flush=True)
"#;

/// The bit ranges [lo, hi) of every float32 in [numpy's underflow bound, its overflow
/// bound]: the positive ones, then the negative ones (sign bit set).
fn domain() -> [(u64, u64); 2] {
    // The bounds' exact decimal values, as numpy writes them.
    #[allow(clippy::excessive_precision)]
    let (x_max, x_min) = (88.722_839_355_468_75f32, -103.972_084_045_410_156_25f32);
    [
        (0, x_max.to_bits() as u64 + 1),
        (0x8000_0000, x_min.to_bits() as u64 + 1),
    ]
}

/// Runs numpy's `exp` with `disabled` CPU features off over every `stride`-th input of
/// the domain, against `ours`; returns the comparison's report.
fn compare_with_numpy(disabled: &str, stride: u64, ours: fn(f32) -> f32) -> (String, u64) {
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/python");
    let ranges = domain();
    let mut child = Command::new(python)
        .arg("-c")
        .arg(COMPARE)
        .arg(stride.to_string())
        .args(ranges.iter().map(|(a, b)| format!("{a}:{b}")))
        .env("NPY_DISABLE_CPU_FEATURES", disabled)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the project's .venv python with numpy (./dev sets it up)");
    let mut stdin = child.stdin.take().unwrap();
    let chunk = 1u64 << 22;
    let mut written = 0u64;
    for (lo, hi) in ranges {
        let mut start = lo;
        while start < hi {
            let stop = (start + chunk * stride).min(hi);
            let bits: Vec<u8> = (0..(stop - start).div_ceil(stride))
                .into_par_iter()
                .flat_map_iter(|i| {
                    let x = f32::from_bits((start + i * stride) as u32);
                    ours(x).to_bits().to_le_bytes()
                })
                .collect();
            written += bits.len() as u64 / 4;
            stdin.write_all(&bits).expect("numpy's side ended early");
            start = stop;
        }
    }
    drop(stdin);
    let mut report = String::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        report.push_str(&line.unwrap());
        report.push('\n');
    }
    assert!(child.wait().unwrap().success(), "{report}");
    (report, written)
}

fn assert_identical(report: &str, written: u64) {
    assert!(
        report.contains(&format!("compared {written} mismatched 0\n")),
        "{report}"
    );
}

#[test]
fn matches_numpy_simd_kernel_on_every_float32_of_the_domain() {
    let (report, written) = compare_with_numpy("", 1, numpy_exp_f32);
    assert!(written > 2_200_000_000, "{written}");
    // numpy must be on a SIMD path (AVX2+FMA3 or AVX-512) for the check to mean anything.
    assert!(report.contains("simd: X86_V3"), "{report}");
    assert_identical(&report, written);
}

#[test]
fn matches_numpy_avx2_kernel() {
    let (report, written) = compare_with_numpy("X86_V4 AVX512_ICL AVX512_SPR", 97, numpy_exp_f32);
    assert!(report.contains("simd: X86_V3\n"), "{report}");
    assert_identical(&report, written);
}

#[test]
fn numpy_without_simd_is_libm() {
    let (report, written) = compare_with_numpy("X86_V3 X86_V4 AVX512_ICL AVX512_SPR", 97, f32::exp);
    assert!(report.contains("simd: \n"), "{report}");
    assert_identical(&report, written);
}
