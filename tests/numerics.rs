//! The same recipe gives the same bytes on every x86-64 CPU with AVX2 (issue 25).
//!
//! A tiny GPT is trained and scored (pass-1) through the real binary and its libtorch
//! worker, with `numerics = "portable"` (the default) and `"native"`:
//!
//! - under every dispatch level this machine supports, forced through the environment
//!   the way a machine with only that much would choose: ATen's kernels
//!   (`ATEN_CPU_CAPABILITY`), MKL's instructions, oneDNN's ISA, and glibc's own
//!   (its libm and string functions, through the hwcaps tunable). Portable gives one set
//!   of bytes; native gives other bytes at each level, which shows the forcing reaches
//!   libtorch (else the first claim would be empty);
//! - on other processors, emulated by `qemu-x86_64` (Debian's qemu-user, which
//!   `./dev setup` installs): an Intel Haswell (AVX2, no AVX-512) and an AMD EPYC
//!   (another vendor: MKL's automatic and AVX2 branches take other paths there);
//! - and where an artifact was computed with other kernels than this machine's, `run`,
//!   `pull` and `audit` say so in one line.

use crate::common;

use std::path::PathBuf;

use common::{small_documents, write_jsonl, Project};

/// A corpus and model small enough to train and score under emulation in about a
/// minute: about 2,000 val tokens, one window of 32 per 32 targets.
fn tiny_project(numerics: &str) -> Project {
    let project = Project::empty();
    std::fs::create_dir_all(project.path().join("corpus")).unwrap();
    write_jsonl(
        &project.path().join("corpus/docs.jsonl"),
        &small_documents(4, 8_000),
    );
    project.write_pipeline(&format!(
        r#"[nodes.tokens]
stage = "tokenize"
files.corpus = ["corpus/*.jsonl"]
params.vocab_size = 300
params.val_fraction = 0.25

[nodes.model]
stage = "train"
inputs.tokens = "tokens"
params.model = {{ vocab_size = 300, layers = 2, d_model = 32, heads = 2, kv_heads = 1, seq_len = 32, rope_dims = 8, xsa_last = 1, bigram_rows = 64, bigram_dim = 16 }}
params.batch = 4
params.steps = 20
params.warmdown_steps = 10
params.val_every = 10
params.val_tokens = 500
params.threads = 1
params.numerics = "{numerics}"

[nodes.pass1]
stage = "pass1"
inputs.tokens = "tokens"
inputs.model = "model"
params.model = "gpt"
params.stride = 32
params.batch = 16
params.threads = 1
params.mass_sample = 16
params.numerics = "{numerics}"
"#
    ));
    project
}

fn manifest(project: &Project, stage: &str) -> serde_json::Value {
    let dir = project.path().join("artifacts").join(stage);
    let found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path().join("manifest.json"))
        .filter(|p| p.is_file())
        .collect();
    assert_eq!(found.len(), 1, "one {stage} artifact expected");
    serde_json::from_str(&std::fs::read_to_string(&found[0]).unwrap()).unwrap()
}

/// The content hashes of the model and of pass-1, and the kernels each recorded.
fn built(project: &Project, env: &[(&str, String)]) -> (String, String) {
    project.ok_with(env, &["run", "--quiet"]);
    let (train, pass1) = (manifest(project, "train"), manifest(project, "pass1"));
    assert_eq!(train["report"]["numerics"], pass1["report"]["numerics"]);
    (
        format!("{} {}", train["content_hash"], pass1["content_hash"]),
        train["report"]["numerics"].as_str().unwrap().to_string(),
    )
}

const AVX512_FEATURES: &str = "-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD";

/// The dispatch levels this machine supports, each as the environment that forces a
/// process down to it.
fn forced_levels() -> Vec<(&'static str, Vec<(&'static str, String)>)> {
    let mut levels = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq");
        if avx512 {
            levels.push((
                "AVX-512",
                vec![
                    ("ATEN_CPU_CAPABILITY", "avx512".to_string()),
                    ("MKL_ENABLE_INSTRUCTIONS", "AVX512".to_string()),
                    ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE".to_string()),
                ],
            ));
        }
        if avx2 {
            levels.push((
                "AVX2",
                vec![
                    ("ATEN_CPU_CAPABILITY", "avx2".to_string()),
                    ("MKL_ENABLE_INSTRUCTIONS", "AVX2".to_string()),
                    ("ONEDNN_MAX_CPU_ISA", "AVX2".to_string()),
                    (
                        "GLIBC_TUNABLES",
                        format!("glibc.cpu.hwcaps={AVX512_FEATURES}"),
                    ),
                ],
            ));
        }
        levels.push((
            "default",
            vec![
                ("ATEN_CPU_CAPABILITY", "default".to_string()),
                ("MKL_ENABLE_INSTRUCTIONS", "SSE4_2".to_string()),
                ("ONEDNN_MAX_CPU_ISA", "SSE41".to_string()),
                (
                    "GLIBC_TUNABLES",
                    format!("glibc.cpu.hwcaps=-AVX2,-FMA,{AVX512_FEATURES}"),
                ),
            ],
        ));
    }
    levels
}

#[cfg(target_arch = "x86_64")]
#[test]
fn portable_gives_one_set_of_bytes_under_every_dispatch_level_and_native_does_not() {
    let levels = forced_levels();
    let portable: Vec<(String, String)> = levels
        .iter()
        .map(|(_, env)| built(&tiny_project("portable"), env))
        .collect();
    for ((level, _), (bytes, kernels)) in levels.iter().zip(&portable) {
        assert_eq!(
            bytes, &portable[0].0,
            "portable bytes under the {level} level differ from the {} level's",
            levels[0].0
        );
        assert_eq!(
            kernels,
            "cpu x86-64 portable (AVX2 kernels, MKL COMPATIBLE)"
        );
    }

    let native: Vec<(String, String)> = levels
        .iter()
        .map(|(_, env)| built(&tiny_project("native"), env))
        .collect();
    for (i, ((level, _), (bytes, kernels))) in levels.iter().zip(&native).enumerate() {
        assert!(
            kernels.starts_with(&format!("cpu x86-64 native ({level} kernels")),
            "{level}: {kernels}"
        );
        for ((other, _), (other_bytes, _)) in levels.iter().zip(&native).skip(i + 1) {
            assert_ne!(
                bytes, other_bytes,
                "native bytes under {level} and {other} are the same: the forced levels do not reach libtorch, so the portable check above proves nothing"
            );
        }
    }
}

/// A script that runs the libtorch worker on an emulated `cpu`.
fn emulated_worker(dir: &std::path::Path, cpu: &str) -> PathBuf {
    let worker = assert_cmd::cargo::cargo_bin("cachemoney").with_file_name("cachemoney-gpt");
    let script = dir.join(format!("worker-on-{cpu}.sh"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec qemu-x86_64 -cpu {cpu} {} \"$@\"\n",
            worker.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[cfg(target_arch = "x86_64")]
#[test]
fn portable_gives_the_same_bytes_on_an_emulated_intel_haswell_and_amd_epyc() {
    let qemu = std::process::Command::new("qemu-x86_64")
        .arg("--version")
        .output();
    assert!(
        qemu.is_ok_and(|o| o.status.success()),
        "qemu-x86_64 is not installed: this test runs the worker on emulated processors (Debian's qemu-user; `./dev setup` installs it)"
    );
    let (here, kernels) = built(&tiny_project("portable"), &[]);
    for (cpu, identity) in [
        ("Haswell-v4", "x86_64 GenuineIntel family 6 model 60"),
        ("EPYC-Rome-v1", "x86_64 AuthenticAMD family 23 model 49"),
    ] {
        let project = tiny_project("portable");
        let worker = emulated_worker(project.path(), cpu);
        let (there, their_kernels) = built(
            &project,
            &[("CACHEMONEY_GPT_WORKER", worker.display().to_string())],
        );
        // The worker saw the emulated processor, not this one.
        assert_eq!(manifest(&project, "train")["report"]["cpu"], identity);
        assert_eq!(there, here, "portable bytes on an emulated {cpu} differ");
        assert_eq!(their_kernels, kernels);
    }
}

/// An artifact computed with native kernels at another level (ATen's level forced down,
/// as a smaller machine would have it) and then used here: `run` reuses it and says so,
/// `run --force` names the kernels as the cause of the new bytes, `audit` too, and a
/// second store that pulls it from a remote says so.
#[cfg(target_arch = "x86_64")]
#[test]
fn bytes_from_other_kernels_are_said_in_one_line_never_silent() {
    let levels = forced_levels();
    if levels.len() < 2 {
        eprintln!("this CPU has one dispatch level: no other kernels to compare");
        return;
    }
    // Explicit on both sides: the suite itself may run under a forced level.
    let (here, lower) = (levels[0].1.clone(), levels[levels.len() - 1].1.clone());
    let remote = tempfile::tempdir().unwrap();
    let url = format!("file://{}", remote.path().display());
    let project = tiny_project("native");
    project.ok_with(&lower, &["run", "--quiet", "--remote", &url]);
    let recorded = manifest(&project, "train")["report"]["numerics"]
        .as_str()
        .unwrap()
        .to_string();

    let out = project.run_with(&here, &["run"]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stdout.contains("model          train        reused"),
        "{stdout}"
    );
    let notes: Vec<&str> = stderr.lines().filter(|l| l.starts_with("note:")).collect();
    assert_eq!(notes.len(), 1, "{stderr}");
    assert!(
        notes[0].starts_with(&format!("note: model, pass1: computed with {recorded}; this machine computes with cpu x86-64 native ("))
            && notes[0].ends_with("so a rebuild here may give other bytes"),
        "{}",
        notes[0]
    );

    let audit = project.run_with(&here, &["audit", "model"]);
    assert!(!audit.status.success(), "other kernels, other bytes");
    let audit = String::from_utf8(audit.stdout).unwrap();
    assert!(audit.contains("DIFFERS"), "{audit}");
    assert!(
        audit.contains(&format!(
            "note: stored bytes computed with {recorded}, the rebuild with cpu x86-64 native ("
        )),
        "{audit}"
    );

    let second = tiny_project("native");
    let out = second.run_with(&here, &["pull", "--remote", &url]);
    assert!(out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.lines().any(|l| l.starts_with(&format!(
            "note: model, pass1: computed with {recorded}; this machine"
        ))),
        "{stderr}"
    );

    let forced = project.run_with(&here, &["run", "--force", "model"]);
    let stderr = String::from_utf8(forced.stderr).unwrap();
    let warning = stderr
        .lines()
        .find(|l| {
            l.starts_with("warning: node 'model' rebuilt with the same recipe gave different bytes")
        })
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        warning.contains(&format!(
            "the stored bytes were computed with {recorded}, these with cpu x86-64 native ("
        )),
        "{warning}"
    );
}

/// A worker started without the environment its recipe pins refuses to compute rather
/// than write other bytes under the same recipe.
#[cfg(target_arch = "x86_64")]
#[test]
fn a_worker_without_the_pinned_environment_refuses_in_one_line() {
    let project = tiny_project("portable");
    let script = project.path().join("unpinned-worker.sh");
    let worker = assert_cmd::cargo::cargo_bin("cachemoney").with_file_name("cachemoney-gpt");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec env -u MKL_CBWR {} \"$@\"\n",
            worker.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let before = project.store_snapshot();
    let line = project.fails_with(
        &[("CACHEMONEY_GPT_WORKER", script.display().to_string())],
        &["run", "--quiet"],
    );
    assert!(
        line.contains("node 'model'")
            && line.contains("numerics = \"portable\" needs MKL_CBWR=COMPATIBLE")
            && line.contains("found nothing"),
        "{line}"
    );
    // tokens was built and committed before; nothing of the model's is.
    let after = project.store_snapshot();
    assert!(after.keys().all(|k| !k.starts_with("train/")), "{after:?}");
    assert!(before.len() <= after.len());
}
