//! Training and pass-1 throughput of the GPT on this machine's CPU (or CUDA when
//! present), for the record's shape and the small demo shape, with libtorch's own
//! kernels for this processor (`numerics = "native"`) and then, in a child process
//! started with the pinned environment, with `numerics = "portable"`: what pinning
//! costs (libtorch reads its kernel choice once, at start, so one process cannot
//! measure both).
//!
//! ./dev run is not needed: `cargo run --release -p cachemoney-gpt-torch --example
//! throughput` (after `./dev setup`); `-- demo` measures the demo shape alone.

use std::time::Instant;

use cachemoney_gpt_torch::{score, Gpt, GptConfig, TokenStream, TrainConfig, Trainer};
use gpt::Numerics;
use tch::{nn, Device};

/// The argument that marks the child process that measures the portable profile.
const PORTABLE_CHILD: &str = "--portable-child";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let portable = args.iter().any(|a| a == PORTABLE_CHILD);
    let demo_only = args.iter().any(|a| a == "demo");
    measure(if portable { "portable" } else { "native" }, demo_only);
    if !portable && !gpt::numerics::environment(Numerics::Portable).is_empty() {
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(&args)
            .arg(PORTABLE_CHILD)
            .envs(
                gpt::numerics::environment(Numerics::Portable)
                    .iter()
                    .copied(),
            )
            .status()
            .unwrap();
        assert!(status.success());
    }
}

fn measure(numerics: &str, demo_only: bool) {
    let device = Device::cuda_if_available();
    let shapes = [
        (
            "demo (4 layers, d 128, seq 256)",
            GptConfig {
                layers: 4,
                d_model: 128,
                heads: 4,
                kv_heads: 2,
                seq_len: 256,
                rope_train_len: 256,
                ..GptConfig::default()
            },
            8,
        ),
        (
            "record (6 layers, d 256, seq 2048)",
            GptConfig::default(),
            2,
        ),
    ];
    let tokens: Vec<u16> = (0..200_000u32)
        .map(|i| ((i * 7919) % 1024) as u16)
        .collect();
    println!(
        "device {device:?}, {} torch threads, numerics {numerics}: {}",
        tch::get_num_threads(),
        gpt::numerics::this_machine(
            if numerics == "portable" {
                Numerics::Portable
            } else {
                Numerics::Native
            },
            if device == Device::Cpu {
                gpt::Device::Cpu
            } else {
                gpt::Device::Cuda
            }
        )
    );
    let shapes = if demo_only { &shapes[..1] } else { &shapes[..] };
    for (label, config, batch) in shapes.iter().cloned() {
        tch::manual_seed(1);
        let vs = nn::VarStore::new(device);
        let model = Gpt::new(&vs.root(), &config).unwrap();
        let mut trainer = Trainer::new(&vs, &TrainConfig::default());
        let mut stream = TokenStream::new(&tokens);
        let steps = 5;
        let (x, y) = stream.next_batch(batch, config.seq_len);
        trainer.step(&model, &x.to_device(device), &y.to_device(device), 1.0);
        let started = Instant::now();
        for _ in 0..steps {
            let (x, y) = stream.next_batch(batch, config.seq_len);
            trainer.step(&model, &x.to_device(device), &y.to_device(device), 1.0);
        }
        let seconds = started.elapsed().as_secs_f64() / steps as f64;
        let per_step = (batch * config.seq_len) as f64;
        println!(
            "{label}: train step {:.3} s for {} tokens = {:.0} tokens/s",
            seconds,
            per_step,
            per_step / seconds
        );
        let stride = 64;
        let val = &tokens[..(config.seq_len as usize * 4).min(tokens.len())];
        let started = Instant::now();
        let scores = score::score(&model, val, stride, score::Tail::Once, 8, 0.85, &[], |_| {});
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "{label}: pass-1 {} entries (stride {stride}) in {:.2} s = {:.0} entries/s",
            scores.position.len(),
            seconds,
            scores.position.len() as f64 / seconds
        );
    }
}
