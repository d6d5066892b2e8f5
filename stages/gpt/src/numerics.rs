//! Which CPU kernels libtorch computes with, and so which bits come out.
//!
//! libtorch picks its kernels by the processor it runs on, in three places, and each
//! changes the last bits of a result (and so, over a thousand training steps, every
//! weight):
//!
//! - **ATen's dispatch** (`ATEN_CPU_CAPABILITY`): the same kernel is compiled for
//!   plain x86-64, AVX2 and AVX-512 and chosen at start. Vector widths differ (8 or 16
//!   floats per register), so reductions add in another order, and the SIMD `exp`,
//!   `tanh` and `log` are other polynomials.
//! - **MKL** (every fp32 matmul, the QR of orthogonal init, the vector-math `sqrt`):
//!   its automatic branch picks a code path per processor *and vendor*. Its
//!   reproducibility mode pins the path; only `COMPATIBLE` (SSE2 code) is the same on
//!   Intel and AMD: its `AVX2` branch is Intel's only, and on an AMD CPU MKL silently
//!   falls back to its automatic branch (measured: matmuls differ under an emulated
//!   EPYC).
//! - **oneDNN**, which libtorch uses for bf16/fp16 matmuls and convolutions (not the
//!   GPT's fp32 path today, capped anyway so that a change of path cannot leak in): it
//!   takes AVX-512 or AMX where it finds them unless told otherwise.
//!
//! The rest is pinned elsewhere: the thread count is part of each recipe (libtorch
//! splits reductions by it), MKL may not lower it (`MKL_DYNAMIC=FALSE`), denormals are
//! left as libtorch leaves them (not flushed, on every thread), and the one MKL routine
//! whose last bit depends on the processor even in `COMPATIBLE` mode, the vector `sqrt`
//! (it refines a hardware reciprocal-square-root estimate, and Intel's and AMD's
//! estimates differ), is not used by the model code (`gpt-torch`'s `optim::sqrt`).
//!
//! [`Numerics::Portable`] (the default) sets all of that in the environment of the
//! processes that run libtorch, so a recipe gives the same bytes on every x86-64 CPU with
//! AVX2 and FMA, with or without AVX-512, Intel or AMD: what a remote shared between
//! machines needs. It costs speed (MKL's SSE2 matmuls; docs/benchmarks.md has the
//! figures), so [`Numerics::Native`] leaves libtorch to pick its fastest kernels, and a
//! recipe that says so is reproducible only on the same kind of processor.
//!
//! The mode is a parameter of the recipe; the kernels it came to on a given machine (a
//! [`profile`]) are not, since a key that changed from machine to machine would defeat
//! the shared remote. The profile is recorded with each artifact instead, and the
//! runner says so in one line where a stored artifact's profile is not this machine's.

use serde::{Deserialize, Serialize};

use crate::Device;

/// How a stage that runs libtorch on a CPU chooses its kernels.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Numerics {
    /// The same bytes on every x86-64 CPU with AVX2 and FMA (x86-64-v3), Intel or AMD.
    #[default]
    Portable,
    /// libtorch's own choice for this processor: faster, and reproducible only on the
    /// same kind of processor.
    Native,
}

/// The variables [`Numerics::Portable`] sets for a process that runs libtorch (the
/// worker, a scorer), on x86-64. Native sets none.
const PORTABLE_X86_64: &[(&str, &str)] = &[
    ("ATEN_CPU_CAPABILITY", "avx2"),
    ("MKL_CBWR", "COMPATIBLE"),
    ("MKL_DYNAMIC", "FALSE"),
    ("ONEDNN_MAX_CPU_ISA", "AVX2"),
    // oneDNN's name before v2.5, which some libtorch builds still read.
    ("DNNL_MAX_CPU_ISA", "AVX2"),
    // fp32 stays fp32: no implicit bf16 or tf32 in oneDNN.
    ("ONEDNN_DEFAULT_FPMATH_MODE", "STRICT"),
];

/// The environment a process running libtorch gets in `mode` on this machine.
pub fn environment(mode: Numerics) -> &'static [(&'static str, &'static str)] {
    match mode {
        Numerics::Portable if cfg!(target_arch = "x86_64") => PORTABLE_X86_64,
        _ => &[],
    }
}

/// Checks, in a process that runs libtorch, that its environment is what `mode` asks
/// for: a worker started by hand, or by a runner that did not set it, would otherwise
/// compute other bytes under the same recipe without a word.
pub fn check_environment(mode: Numerics) -> Result<(), String> {
    for (name, value) in environment(mode) {
        let found = std::env::var(name).ok();
        if found.as_deref() != Some(*value) {
            return Err(format!(
                "numerics = \"portable\" needs {name}={value} in this process's environment, found {}; the runner sets it (start this through `cachemoney run`)",
                found.map_or("nothing".to_string(), |v| format!("{name}={v}"))
            ));
        }
    }
    Ok(())
}

/// ATen's kernel levels on x86-64, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Default,
    Avx2,
    Avx512,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Default => "default",
            Level::Avx2 => "AVX2",
            Level::Avx512 => "AVX-512",
        }
    }

    /// What `ATEN_CPU_CAPABILITY` says, if it names a level.
    fn from_env_value(value: &str) -> Option<Level> {
        match value.to_ascii_lowercase().as_str() {
            "default" => Some(Level::Default),
            "avx2" => Some(Level::Avx2),
            "avx512" => Some(Level::Avx512),
            _ => None,
        }
    }
}

/// The processor facts the profile depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpu {
    pub arch: &'static str,
    /// The highest ATen level the processor supports (x86-64 only).
    pub level: Option<Level>,
    /// Vendor, family and model, e.g. `GenuineIntel family 6 model 207`: MKL's
    /// automatic branch depends on all three.
    pub model: String,
}

impl Cpu {
    /// One line for a report: `x86_64 GenuineIntel family 6 model 207`.
    pub fn describe(&self) -> String {
        match self.model.as_str() {
            "" => self.arch.to_string(),
            model => format!("{} {model}", self.arch),
        }
    }

    /// This machine's processor.
    pub fn this() -> Cpu {
        Cpu {
            arch: std::env::consts::ARCH,
            level: x86::level(),
            model: x86::model().unwrap_or_default(),
        }
    }
}

/// The kernels libtorch computes with in `mode` on `cpu`, with `aten_env` the
/// `ATEN_CPU_CAPABILITY` of the process's environment (native mode honours it, as ATen
/// does, when it names a level the processor has). Two artifacts of one recipe with the
/// same profile have the same bytes; with different profiles, they may not.
pub fn profile(mode: Numerics, device: Device, cpu: &Cpu, aten_env: Option<&str>) -> String {
    if device == Device::Cuda {
        return "cuda".into();
    }
    let Some(supported) = cpu.level else {
        return format!(
            "cpu {} native (the portable profile is for x86-64 only)",
            cpu.arch
        );
    };
    match mode {
        Numerics::Portable if supported >= Level::Avx2 => {
            "cpu x86-64 portable (AVX2 kernels, MKL COMPATIBLE)".into()
        }
        Numerics::Portable => format!(
            "cpu x86-64 without AVX2 and FMA (default kernels, MKL COMPATIBLE; not the portable profile) on {}",
            cpu.model
        ),
        Numerics::Native => {
            let level = aten_env
                .and_then(Level::from_env_value)
                .map_or(supported, |asked| asked.min(supported));
            format!(
                "cpu x86-64 native ({} kernels, MKL automatic) on {}",
                level.name(),
                cpu.model
            )
        }
    }
}

/// This machine's profile for `mode` and `device`, as a process started with
/// [`environment`] computes it.
pub fn this_machine(mode: Numerics, device: Device) -> String {
    let aten = std::env::var("ATEN_CPU_CAPABILITY").ok();
    profile(mode, device, &Cpu::this(), aten.as_deref())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Level;

    /// ATen's own tests: AVX-512 needs F, BW, VL and DQ (and FMA); AVX2 needs FMA too.
    pub fn level() -> Option<Level> {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq");
        Some(if avx512 {
            Level::Avx512
        } else if avx2 {
            Level::Avx2
        } else {
            Level::Default
        })
    }

    pub fn model() -> Option<String> {
        use std::arch::x86_64::__cpuid;
        // CPUID exists on every x86-64 processor, and leaves 0 and 1 always do.
        let (vendor, signature) = (__cpuid(0), __cpuid(1));
        let mut name = Vec::with_capacity(12);
        for word in [vendor.ebx, vendor.edx, vendor.ecx] {
            name.extend_from_slice(&word.to_le_bytes());
        }
        let eax = signature.eax;
        let base_family = (eax >> 8) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((eax >> 20) & 0xff)
        } else {
            base_family
        };
        let model = if base_family == 0x6 || base_family == 0xf {
            ((eax >> 4) & 0xf) | (((eax >> 16) & 0xf) << 4)
        } else {
            (eax >> 4) & 0xf
        };
        Some(format!(
            "{} family {family} model {model}",
            String::from_utf8_lossy(&name)
        ))
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    use super::Level;

    pub fn level() -> Option<Level> {
        None
    }

    pub fn model() -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(level: Level) -> Cpu {
        Cpu {
            arch: "x86_64",
            level: Some(level),
            model: "AuthenticAMD family 23 model 49".into(),
        }
    }

    #[test]
    fn portable_is_one_profile_on_every_x86_64_cpu_with_avx2() {
        let portable = |level, aten| profile(Numerics::Portable, Device::Cpu, &cpu(level), aten);
        let reference = portable(Level::Avx512, None);
        assert_eq!(portable(Level::Avx2, None), reference);
        // The environment cannot move it: the runner sets ATen's level itself.
        assert_eq!(portable(Level::Avx512, Some("default")), reference);
        let intel = Cpu {
            model: "GenuineIntel family 6 model 207".into(),
            ..cpu(Level::Avx2)
        };
        assert_eq!(
            profile(Numerics::Portable, Device::Cpu, &intel, None),
            reference
        );
        // Without AVX2, ATen falls back to its default kernels: another profile.
        assert_ne!(portable(Level::Default, None), reference);
    }

    #[test]
    fn native_names_the_level_and_the_processor() {
        let native = |level, aten| profile(Numerics::Native, Device::Cpu, &cpu(level), aten);
        assert_eq!(
            native(Level::Avx512, None),
            "cpu x86-64 native (AVX-512 kernels, MKL automatic) on AuthenticAMD family 23 model 49"
        );
        assert_ne!(native(Level::Avx2, None), native(Level::Avx512, None));
        // ATen honours a lower level from the environment, never a higher one.
        assert_eq!(
            native(Level::Avx512, Some("avx2")),
            native(Level::Avx2, None)
        );
        assert_eq!(
            native(Level::Avx2, Some("avx512")),
            native(Level::Avx2, None)
        );
        assert_eq!(
            native(Level::Avx2, Some("nonsense")),
            native(Level::Avx2, None)
        );
    }

    #[test]
    fn other_architectures_and_cuda_have_their_own_profiles() {
        let arm = Cpu {
            arch: "aarch64",
            level: None,
            model: String::new(),
        };
        let text = profile(Numerics::Portable, Device::Cpu, &arm, None);
        assert!(text.starts_with("cpu aarch64 native"), "{text}");
        assert_eq!(
            profile(Numerics::Portable, Device::Cuda, &cpu(Level::Avx2), None),
            "cuda"
        );
    }

    #[test]
    fn the_portable_environment_pins_every_library_and_native_sets_nothing() {
        let names: Vec<&str> = environment(Numerics::Portable)
            .iter()
            .map(|(name, _)| *name)
            .collect();
        if cfg!(target_arch = "x86_64") {
            for name in ["ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA"] {
                assert!(names.contains(&name), "{name} missing from {names:?}");
            }
        }
        assert!(environment(Numerics::Native).is_empty());
        assert!(check_environment(Numerics::Native).is_ok());
    }

    #[test]
    fn this_machine_is_described() {
        let cpu = Cpu::this();
        if cfg!(target_arch = "x86_64") {
            assert!(cpu.level.is_some());
            assert!(cpu.model.contains("family"), "{}", cpu.model);
        }
    }
}
