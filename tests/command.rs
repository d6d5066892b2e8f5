//! `stage = "command"`: a user's program as a step, its outputs declared in the node;
//! programs that keep their declaration and programs that break it in every way it
//! names; and the record's training through `torchrun` with two CPU processes (gloo),
//! scored by our pass-1.

use crate::common;

use common::{tiny_model, Project};

/// A project with the repository's examples, the tests' misbehaving step and Python.
fn with_programs(project: &Project) {
    let root = common::repo_root();
    for shared in ["examples", ".venv"] {
        std::os::unix::fs::symlink(root.join(shared), project.path().join(shared)).unwrap();
    }
    std::os::unix::fs::symlink(
        root.join("tests/fixtures/steps"),
        project.path().join("steps"),
    )
    .unwrap();
}

const COUNTS_NODE: &str = r#"
[nodes.val_counts]
stage = "command"
inputs.tokens = "tokens"
files.program = ["examples/steps/token_counts.py"]
params.command = [".venv/bin/python", "examples/steps/token_counts.py"]
outputs.tables.counts = ["token u16", "count i64"]
outputs.files = ["summary.json"]
"#;

/// A step running `steps/misbehave.py HOW`, declaring the counts table.
fn misbehaving(how: &str, extra: &str) -> String {
    format!(
        r#"
[nodes.step]
stage = "command"
inputs.tokens = "tokens"
files.program = ["steps/misbehave.py"]
params.command = [".venv/bin/python", "steps/misbehave.py", "{how}"]
outputs.tables.counts = ["token u16", "count i64"]
{extra}"#
    )
}

#[test]
fn a_program_with_declared_outputs_is_a_node_like_any_other() {
    let project = Project::small();
    with_programs(&project);
    project.write_pipeline(&(Project::small_pipeline(300) + COUNTS_NODE));
    project.ok(&["run"]);
    // Its table is queryable, and holds what token-stats computes in its own way.
    let ours = project.sql("SELECT token, count FROM val_counts.counts ORDER BY token");
    let stats = project.sql(
        "SELECT token, CAST(val_count AS BIGINT) AS count FROM token_stats.token_counts WHERE val_count > 0 ORDER BY token",
    );
    assert_eq!(ours, stats);
    assert!(ours.lines().count() > 50, "{ours}");
    let show = project.ok(&["show", "val_counts"]);
    assert!(show.contains("counts_rows"), "{show}");
    assert!(show.contains("summary.json"), "{show}");
    assert!(show.contains("command.log"), "{show}");
    // Reused when nothing changed; rebuilt when its program changes (a copy, edited).
    assert!(project.ok(&["run"]).contains("0 built"));
    std::fs::create_dir_all(project.path().join("mine")).unwrap();
    let mine = project.path().join("mine/token_counts.py");
    let text =
        std::fs::read_to_string(project.path().join("examples/steps/token_counts.py")).unwrap();
    std::fs::write(&mine, text.clone() + "\n# edited\n").unwrap();
    project.write_pipeline(
        &(Project::small_pipeline(300)
            + &COUNTS_NODE.replace("examples/steps/token_counts.py", "mine/token_counts.py")),
    );
    let status = project.ok(&["status"]);
    assert!(status.contains("val_counts"), "{status}");
    let run = project.ok(&["run"]);
    assert!(run.contains("1 built"), "{run}");
    // The same data, so the same table bytes: tables are re-encoded in our layout.
    assert_eq!(
        project.sql("SELECT token, count FROM val_counts.counts ORDER BY token"),
        ours
    );
    assert!(project.ok(&["audit", "val_counts"]).contains("identical"));
}

#[test]
fn a_program_that_breaks_its_declaration_fails_with_one_line_naming_the_file() {
    let project = Project::small();
    with_programs(&project);
    project.write_pipeline(&Project::small_pipeline(300));
    project.ok(&["run"]);
    let before = project.store_snapshot();
    let cases = [
        ("missing", "", "counts.parquet: missing: the command exited 0 but did not write it (outputs.tables.counts)"),
        ("wrong-type", "", "counts.parquet: outputs.tables.counts declares (token u16, count i64) but the command wrote (token Int32, count i64)"),
        ("nulls", "", "column 'token' holds nulls, which outputs.tables.counts does not allow (declare it \"token u16?\")"),
        ("extra", "", "notes.txt: written by the command but not declared in the node's outputs"),
        ("ok", "outputs.files = [\"model.bin\"]\n", "model.bin: missing: the command exited 0 but did not write it (outputs.files)"),
        ("outside", "", "the command failed (exit status: 1)"),
    ];
    for (how, extra, expected) in cases {
        project.write_pipeline(&(Project::small_pipeline(300) + &misbehaving(how, extra)));
        let error = project.fails(&["run"]);
        assert!(error.contains("node 'step' (command)"), "{how}: {error}");
        assert!(error.contains(expected), "{how}: {error}");
        // Nothing of the failed step is in the store; the failed run is kept aside.
        let after: Vec<String> = project
            .store_snapshot()
            .into_keys()
            .filter(|k| !before.contains_key(k) && !k.starts_with(".tmp"))
            .collect();
        assert!(after.is_empty(), "{how}: {after:?}");
    }
    // A column may hold nulls where the declaration says so.
    project.write_pipeline(
        &(Project::small_pipeline(300)
            + &misbehaving("nulls", "").replace("\"token u16\"", "\"token u16?\"")),
    );
    project.ok(&["run"]);
    assert_eq!(
        project.sql("SELECT count(*) AS n FROM step.counts WHERE token IS NULL"),
        "n\n1\n"
    );
}

#[test]
fn a_program_past_its_timeout_is_killed_with_everything_it_started() {
    let project = Project::small();
    with_programs(&project);
    project.write_pipeline(
        &(Project::small_pipeline(300) + &misbehaving("sleep", "params.timeout_s = 3\n")),
    );
    let started = std::time::Instant::now();
    let error = project.fails(&["run"]);
    assert!(
        error.contains("the command ran past its timeout of 3 s and was killed with everything it started (params.timeout_s)"),
        "{error}"
    );
    assert!(error.contains("sleeping past the timeout"), "{error}");
    assert!(started.elapsed().as_secs() < 60);
    assert!(common::processes_with("misbehave.py sleep").is_empty());
}

#[test]
fn a_program_has_no_network_unless_it_asks_for_a_loopback() {
    let project = Project::small();
    with_programs(&project);
    project.write_pipeline(&(Project::small_pipeline(300) + &misbehaving("network", "")));
    let error = project.fails(&["run"]);
    assert!(error.contains("the command failed"), "{error}");
    project.write_pipeline(
        &(Project::small_pipeline(300)
            + &misbehaving("network", "params.network = \"loopback\"\n")),
    );
    project.ok(&["run"]);
    let log = std::fs::read_to_string(project.the_artifact("command").join("command.log")).unwrap();
    assert!(log.contains("no network"), "{log}");
    assert!(log.contains("loopback works"), "{log}");
}

#[test]
fn a_program_reads_neither_the_store_nor_the_host_however_it_is_named() {
    let project = Project::small();
    with_programs(&project);
    project.write_pipeline(&Project::small_pipeline(300));
    project.ok(&["run"]);
    let store = project.path().join("artifacts").canonicalize().unwrap();
    // Through the system's shell, whose `bin` may be a link into /usr: not `/`.
    let shell = |script: &str| {
        format!(
            r#"
[nodes.step]
stage = "command"
inputs.tokens = "tokens"
params.command = ["/bin/sh", "-c", "{script}"]
outputs.files = ["leak.txt"]
"#
        )
    };
    for target in [
        store.join("refs/tokens.json"),
        project.path().join("pipeline.toml"),
    ] {
        project.write_pipeline(
            &(Project::small_pipeline(300)
                + &shell(&format!("cat {} > out/leak.txt", target.display()))),
        );
        let error = project.fails(&["run"]);
        assert!(error.contains("the command failed"), "{error}");
        assert!(error.contains("Permission denied"), "{error}");
    }
    // A script of the pipeline's directory runs only as one of the node's files (so
    // that it is in the recipe), and then as its private copy.
    std::fs::write(
        project.path().join("tool.sh"),
        "#!/bin/sh\necho copied > out/leak.txt\nls .. > /dev/null 2>&1 && echo 'read the store' >> out/leak.txt\nexit 0\n",
    )
    .unwrap();
    let mut permissions = std::fs::metadata(project.path().join("tool.sh"))
        .unwrap()
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(project.path().join("tool.sh"), permissions).unwrap();
    let tool = r#"
[nodes.step]
stage = "command"
inputs.tokens = "tokens"
params.command = ["./tool.sh"]
outputs.files = ["leak.txt"]
"#;
    project.write_pipeline(&(Project::small_pipeline(300) + tool));
    let error = project.fails(&["run"]);
    assert!(
        error.contains("the command ./tool.sh lies in the pipeline's directory but is not among the node's files.program"),
        "{error}"
    );
    project
        .write_pipeline(&(Project::small_pipeline(300) + tool + "files.program = [\"tool.sh\"]\n"));
    project.ok(&["run"]);
    let leak = std::fs::read_to_string(project.the_artifact("command").join("leak.txt")).unwrap();
    assert_eq!(
        leak, "copied\n",
        "the workspace's parent is the store's scratch area"
    );
}

#[test]
fn a_program_cannot_reach_the_hosts_unix_sockets() {
    let project = Project::small();
    with_programs(&project);
    let socket = project.path().join("host.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    project.write_pipeline(
        &(Project::small_pipeline(300)
            + &misbehaving("unix", "")
                .replace("\"unix\"]", &format!("\"unix\", \"{}\"]", socket.display()))),
    );
    project.ok(&["run"]);
    let log = std::fs::read_to_string(project.the_artifact("command").join("command.log")).unwrap();
    assert!(log.contains("no Unix socket"), "{log}");
    assert!(log.contains("no io_uring: errno 1"), "{log}");
    assert!(log.contains("no mincore: errno 1"), "{log}");
    assert!(listener.accept().is_err(), "the step reached the listener");
    assert!(project.ok(&["show", "step"]).contains("no Unix sockets"));
}

#[test]
fn a_program_that_never_reads_a_large_request_is_no_problem() {
    let project = Project::small();
    with_programs(&project);
    std::fs::create_dir_all(project.path().join("many")).unwrap();
    for i in 0..1500 {
        std::fs::write(project.path().join(format!("many/file_{i:04}.txt")), "x").unwrap();
    }
    project.write_pipeline(
        &(Project::small_pipeline(300)
            + &misbehaving("ok", "")
                .replace("files.program = [", "files.program = [\"many/*.txt\", ")),
    );
    project.ok(&["run"]);
}

#[test]
fn wiring_against_a_declaration_is_checked_when_the_pipeline_loads() {
    let project = Project::small();
    with_programs(&project);
    // A GPT pass-1 reading a model from a step that does not declare one.
    let wrong = Project::small_pipeline(300)
        + &misbehaving("ok", "outputs.files = [\"weights.bin\"]\n")
        + r#"
[nodes.pass1]
stage = "pass1"
inputs.tokens = "tokens"
inputs.model = "step"
params.model = "gpt"
"#;
    project.write_pipeline(&wrong);
    let error = project.fails(&["status"]);
    assert!(
        error.contains("input 'model' expects a file model.safetensors; node 'step' (command) produces counts, weights.bin"),
        "{error}"
    );
    assert!(error.contains("pipeline.toml:"), "{error}");
    // A declaration that is not one, at its line.
    project.write_pipeline(
        &(Project::small_pipeline(300) + &misbehaving("ok", "").replace("u16", "u17")),
    );
    let error = project.fails(&["status"]);
    assert!(
        error.contains("node 'step': outputs.tables.counts: 'token u17': unknown type 'u17'"),
        "{error}"
    );
    let line = Project::small_pipeline(300).lines().count() + 7;
    assert!(error.contains(&format!("pipeline.toml:{line}:")), "{error}");
    // Declared at the node, not as a parameter.
    project.write_pipeline(
        &(Project::small_pipeline(300)
            + &misbehaving("ok", "")
                .replace("outputs.tables.counts", "params.outputs.tables.counts")),
    );
    let error = project.fails(&["status"]);
    assert!(
        error.contains("declare what the node writes as outputs.tables.NAME and outputs.files, not as params.outputs"),
        "{error}"
    );
    // Outputs are declared by command nodes only.
    project.write_pipeline(
        &(Project::small_pipeline(300).replace(
            "[nodes.token_stats]",
            "[nodes.token_stats]\noutputs.files = [\"x\"]",
        )),
    );
    let error = project.fails(&["status"]);
    assert!(
        error.contains("stage 'token-stats' declares its own outputs; a node declares them only for stage = \"command\""),
        "{error}"
    );
}

/// Our `train` and the PyTorch DDP trainer on the same data, seed and arguments.
fn training_pipeline() -> String {
    let model = tiny_model(300);
    let config = r#"{"vocab_size": 300, "layers": 2, "d_model": 32, "heads": 2, "kv_heads": 1, "seq_len": 32, "rope_dims": 8, "xsa_last": 1, "bigram_rows": 64, "bigram_dim": 16}"#;
    let ddp = |name: &str, processes: usize| {
        format!(
            r#"
[nodes.{name}]
stage = "command"
inputs.tokens = "tokens"
files.program = ["examples/trainers/gpt_ddp.py", "examples/scorers/gpt_torch.py"]
params.command = [".venv/bin/python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "{processes}", "examples/trainers/gpt_ddp.py", "--device", "cpu", "--config", '{config}', "--batch", "4", "--steps", "60", "--warmdown-steps", "10", "--val-every", "0", "--val-tokens", "2000"]
params.env = {{ ATEN_CPU_CAPABILITY = "avx2", MKL_CBWR = "COMPATIBLE", MKL_DYNAMIC = "FALSE", ONEDNN_MAX_CPU_ISA = "AVX2", ONEDNN_DEFAULT_FPMATH_MODE = "STRICT" }}
params.network = "loopback"
outputs.files = ["model.safetensors", "config.json"]

[nodes.pass1_{name}]
stage = "pass1"
inputs.tokens = "tokens"
inputs.model = "{name}"
params.model = "gpt"
params.stride = 8
params.threads = 1
"#
        )
    };
    Project::small_pipeline(300)
        + &format!(
            r#"
[nodes.model]
stage = "train"
inputs.tokens = "tokens"
params.model = {model}
params.batch = 4
params.steps = 60
params.warmdown_steps = 10
params.val_every = 0
params.val_tokens = 2000
params.threads = 1

[nodes.pass1]
stage = "pass1"
inputs.tokens = "tokens"
inputs.model = "model"
params.model = "gpt"
params.stride = 8
params.threads = 1
"#
        )
        + &ddp("ddp2", 2)
        + &ddp("ddp1", 1)
        + r#"
[nodes.pass1_torch_ddp2]
stage = "pass1"
inputs.tokens = "tokens"
inputs.model = "ddp2"
params.model = "command"
params.command = [".venv/bin/python", "examples/scorers/gpt_torch.py", "--temperature", "0.85", "--stride", "8"]
files.scorer = ["examples/scorers/gpt_torch.py"]
"#
}

fn report_value(project: &Project, node: &str, key: &str) -> f64 {
    let show = project.ok(&["show", node]);
    show.lines()
        .find_map(|l| l.trim().strip_prefix(key)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in:\n{show}"))
}

fn file_hash(project: &Project, node: &str, file: &str) -> String {
    let show = project.ok(&["show", node]);
    show.lines()
        .find(|l| l.trim_start().starts_with(file))
        .and_then(|l| l.split("blake3 ").nth(1))
        .unwrap_or_else(|| panic!("no {file} in:\n{show}"))
        .to_string()
}

/// The stated tolerance: the two-process model's pass-1 BPB within 0.5% of our own
/// trainer's. They compute the same averaged gradient up to rounding (measured: 1e-7
/// relative apart); one process computes ours op for op, to the byte.
#[test]
fn torchrun_with_two_cpu_processes_trains_a_model_our_pass1_scores() {
    let project = Project::small();
    with_programs(&project);
    project.write_pipeline(&training_pipeline());
    project.ok(&["run"]);
    let ours = report_value(&project, "pass1", "neural_bpb");
    let ddp2 = report_value(&project, "pass1_ddp2", "neural_bpb");
    assert!(ours.is_finite() && ours > 0.0);
    assert!(
        ((ddp2 - ours) / ours).abs() < 0.005,
        "two processes: {ddp2} against our {ours}"
    );
    let log = std::fs::read_to_string(
        std::fs::read_dir(project.path().join("artifacts/command"))
            .unwrap()
            .map(|e| e.unwrap().path().join("command.log"))
            .find(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains("2 rank(s) on cpu")))
            .expect("the two-process run's log"),
    )
    .unwrap();
    assert!(log.contains("final_val_bpb"), "{log}");
    // The PyTorch scorer loads it too, and agrees with our pass-1 on it.
    let torch = report_value(&project, "pass1_torch_ddp2", "neural_bpb");
    assert!(
        ((torch - ddp2) / ddp2).abs() < 1e-4,
        "the PyTorch scorer: {torch} against our pass-1's {ddp2}"
    );
    // One process is our trainer, op for op: the same weights, byte for byte.
    assert_eq!(
        file_hash(&project, "ddp1", "model.safetensors"),
        file_hash(&project, "model", "model.safetensors")
    );
    assert_eq!(
        file_hash(&project, "ddp1", "config.json"),
        file_hash(&project, "model", "config.json")
    );
}
