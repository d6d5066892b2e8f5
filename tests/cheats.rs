//! Cheating scorers against the legality probes (issue 26): one of our own for each class
//! of cheat that once passed every probe (examples/scorers/cheats/), each failed by the
//! probe that should fail it, with evidence, and its claimed BPB printed beside the honest
//! scorer's. The honest scorer passes everything. And the runs look alike: a scorer that
//! records everything it can observe sees the same in the original run and its re-runs.

use crate::common;

use std::collections::BTreeMap;

use common::Project;
use serde_json::Value;

const CHEATS: &str = "examples/scorers/cheats";

/// A project with the repository's examples and Python (`./dev` makes .venv).
fn project() -> Project {
    let project = Project::small();
    let root = common::repo_root();
    for shared in ["examples", ".venv"] {
        std::os::unix::fs::symlink(root.join(shared), project.path().join(shared)).unwrap();
    }
    project
}

fn scorer(name: &str, script: &str, extra: &str) -> String {
    format!(
        r#"
[nodes.{name}]
stage = "pass1"
inputs.tokens = "tokens"
params.model = "command"
params.command = [".venv/bin/python", "{CHEATS}/{script}"]
files.scorer = ["{CHEATS}/honest.py", "{CHEATS}/{script}"]
{extra}
[nodes.legality_{name}]
stage = "legality"
inputs.tokens = "tokens"
inputs.chain = "{name}"
"#
    )
}

/// A causal-normalised cache chain after pass-1 node `pass1`, with its mass audit and
/// its judge: the cache itself is legal, so what fails is the pass-1's.
fn cache_chain(pass1: &str) -> String {
    format!(
        r#"
[nodes.cache_{pass1}]
stage = "cache"
inputs.tokens = "tokens"
params.mode = "causal-normalised"
params.ngram_buckets = 65536
params.phrase_buckets = 32768

[nodes.calibration_{pass1}]
stage = "calibrate"
inputs.pass1 = "{pass1}"
inputs.cache = "cache_{pass1}"

[nodes.scores_{pass1}]
stage = "pass2"
inputs.tokens = "tokens"
inputs.pass1 = "{pass1}"
inputs.cache = "cache_{pass1}"
inputs.calibration = "calibration_{pass1}"

[nodes.mass_{pass1}]
stage = "audit-mass"
inputs.tokens = "tokens"
inputs.pass1 = "{pass1}"
inputs.cache = "cache_{pass1}"
inputs.calibration = "calibration_{pass1}"

[nodes.legality_scores_{pass1}]
stage = "legality"
inputs.tokens = "tokens"
inputs.chain = "scores_{pass1}"
inputs.mass = "mass_{pass1}"
"#
    )
}

/// `legality --json`, by judge: (chain, claimed BPB, probe → (verdict, detail)).
type Verdicts = BTreeMap<String, (String, f64, BTreeMap<String, (String, String)>)>;

fn verdicts(project: &Project) -> Verdicts {
    let output = project.run(&["legality", "--json"]);
    let rows: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    let mut out = Verdicts::new();
    for r in rows {
        let entry = out
            .entry(r["node"].as_str().unwrap().to_string())
            .or_insert((
                r["chain"].as_str().unwrap().to_string(),
                r["bpb"].as_f64().unwrap(),
                BTreeMap::new(),
            ));
        entry.2.insert(
            r["probe"].as_str().unwrap().to_string(),
            (
                r["verdict"].as_str().unwrap().to_string(),
                r["detail"].as_str().unwrap().to_string(),
            ),
        );
    }
    out
}

/// Builds `pipeline`, prints the verdict matrix (the claimed gains, for whoever reads the
/// test's output), expects `legality` to fail some judge, and returns the verdicts.
fn judged(project: &Project, pipeline: &str) -> Verdicts {
    project.write_pipeline(pipeline);
    project.ok(&["run", "--quiet"]);
    let matrix = project.run(&["legality"]);
    eprintln!("{}", String::from_utf8_lossy(&matrix.stdout));
    assert_eq!(matrix.status.code(), Some(1));
    verdicts(project)
}

/// Asserts that every probe of `judge` passed; returns the BPB its chain claims.
fn passed(v: &Verdicts, judge: &str) -> f64 {
    let (_, bpb, probes) = &v[judge];
    for (probe, (verdict, detail)) in probes {
        assert_eq!(verdict, "pass", "{judge} {probe}: {detail}");
    }
    *bpb
}

#[test]
fn every_cheat_is_failed_with_evidence_and_the_honest_scorer_passes() {
    let project = project();
    let mut pipeline = Project::small_pipeline(300);
    pipeline += &scorer("honest", "honest_scorer.py", "");
    pipeline += &cache_chain("honest");
    pipeline += &scorer("disclosed", "disclosed.py", "");
    pipeline += &scorer(
        "no_distributions",
        "no_distributions.py",
        "params.mass_sample = 0\n",
    );
    pipeline += &scorer("store_reader", "store_reader.py", "");
    pipeline += &scorer("entropy_channel", "entropy_channel.py", "");
    pipeline += &cache_chain("entropy_channel");
    pipeline += &scorer("duplicates", "duplicates.py", "");
    pipeline += &scorer("around_cuts", "around_cuts.py", "");
    pipeline += &scorer("heavy_model", "heavy_model.py", "");
    pipeline += &cache_chain("heavy_model");
    // The sample `mass_seed` = 1337 gives, where the cuts fell while it was public.
    project.ok(&["run", "--quiet", "--until", "tokens"]);
    let tokenize = std::fs::read_dir(project.path().join("artifacts/tokenize"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let targets = stage_api::table_rows(&tokenize.join("val.parquet")).unwrap() - 1;
    let public = stage_api::sample_positions(targets, 4096, 1337);
    std::fs::write(
        project.path().join("public_sample.json"),
        serde_json::to_string(&public).unwrap(),
    )
    .unwrap();
    pipeline += &scorer("known_cuts", "known_cuts.py", "").replace(
        "known_cuts.py\"]",
        "known_cuts.py\", \"public_sample.json\"]",
    );
    let v = judged(&project, &pipeline);

    let honest_bpb = &passed(&v, "legality_honest");
    let honest_chain_bpb = &passed(&v, "legality_scores_honest");

    // (judge, the probe that must fail it, words its evidence must hold, the honest BPB
    // it would be compared with).
    let expected = [
        (
            "legality_disclosed",
            "c1-prefix",
            "model_p at position",
            *honest_bpb,
        ),
        ("legality_disclosed", "c2-blind", "never asked", *honest_bpb),
        (
            "legality_no_distributions",
            "c1-target",
            "cannot be verified",
            *honest_bpb,
        ),
        (
            "legality_no_distributions",
            "c2-normalised",
            "cannot be verified",
            *honest_bpb,
        ),
        (
            "legality_store_reader",
            "c1-prefix",
            "depends on later tokens",
            *honest_bpb,
        ),
        (
            "legality_entropy_channel",
            "c1-prefix",
            "entropy at position",
            *honest_bpb,
        ),
        (
            "legality_scores_entropy_channel",
            "c1-prefix",
            "before the cut) changed",
            *honest_chain_bpb,
        ),
        (
            "legality_duplicates",
            "coverage",
            "more than once",
            *honest_bpb,
        ),
        (
            "legality_around_cuts",
            "c1-prefix",
            "depends on later tokens",
            *honest_bpb,
        ),
        (
            "legality_scores_heavy_model",
            "c2-normalised",
            "Σ_v p(v) = 2.0",
            *honest_chain_bpb,
        ),
        (
            "legality_known_cuts",
            "c1-prefix",
            "depends on later tokens",
            *honest_bpb,
        ),
    ];
    for (judge, probe, evidence, baseline) in expected {
        let (chain, bpb, found) = &v[judge];
        let (verdict, detail) = &found[probe];
        assert_eq!(verdict, "fail", "{judge} {probe}: {detail}");
        assert!(detail.contains(evidence), "{judge} {probe}: {detail}");
        eprintln!(
            "{chain}: claims BPB {bpb:.4} (honest {baseline:.4}), failed by {probe}: {detail}"
        );
    }
    // The cheats that change the scores claim a gain; the entropy channel's is in its
    // cache chain.
    for judge in [
        "legality_disclosed",
        "legality_no_distributions",
        "legality_store_reader",
        "legality_duplicates",
        "legality_around_cuts",
        "legality_heavy_model",
        "legality_known_cuts",
    ] {
        assert!(
            v[judge].1 < *honest_bpb,
            "{judge}: {} vs {honest_bpb}",
            v[judge].1
        );
    }
    // The store reader found nothing to read in the sandbox, and said so.
    if sandbox::landlock_abi().is_some() {
        let log = scorer_logs(&project, "store_reader");
        assert!(
            log.iter().all(|l| l.contains("found no original stream")),
            "{log:?}"
        );
    }
}

/// The scorer.log of node `name` and of its re-runs, found by their manifests' node.
fn scorer_logs(project: &Project, name: &str) -> Vec<String> {
    let status: Value = serde_json::from_str(&project.ok(&["status", "--json"])).unwrap();
    let mut logs = Vec::new();
    for node in status.as_array().unwrap() {
        let node_name = node["node"].as_str().unwrap();
        if node_name != name && !node_name.starts_with(&format!("{name}_cut")) {
            continue;
        }
        let dir = project
            .path()
            .join("artifacts")
            .join(node["stage"].as_str().unwrap())
            .join(node["recipe"].as_str().unwrap());
        logs.push(std::fs::read_to_string(dir.join("scorer.log")).unwrap_or_default());
    }
    logs
}

/// Records what a scorer can observe of its run, then scores honestly.
const RECORDER: &str = r#"
import json, os, socket, sys
import honest as h

def listing(root):
    out = []
    for base, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            path = os.path.join(base, name)
            st = os.lstat(path)
            out.append([os.path.relpath(path, root), st.st_mode, st.st_size if not os.path.isdir(path) else 0, int(st.st_mtime)])
    return out

req = h.request()
view = {
    "argv": sys.argv,
    "cwd": os.getcwd(),
    "environment": sorted(os.environ.items()),
    "request": {k: (len(v) if k == "distributions" else v) for k, v in req.items()},
    "request_file": open(os.environ.get("CACHEMONEY_REQUEST", "request.json")).read().count("\n"),
    "files": listing("."),
    "ids": [os.getuid(), os.getgid(), os.getpid(), os.getppid()],
    "host": socket.gethostname(),
    "tmp_readable": os.access("/tmp", os.R_OK),
}
print("VIEW " + json.dumps(view, sort_keys=True), file=sys.stderr)
h.honest(req)
"#;

#[test]
fn the_original_run_and_its_re_runs_look_alike_to_the_scorer() {
    let project = project();
    std::fs::write(project.path().join("recorder.py"), RECORDER).unwrap();
    std::fs::copy(
        common::repo_root().join(CHEATS).join("honest.py"),
        project.path().join("honest.py"),
    )
    .unwrap();
    let mut pipeline = Project::small_pipeline(300);
    pipeline += r#"
[nodes.recorder]
stage = "pass1"
inputs.tokens = "tokens"
params.model = "command"
params.command = [".venv/bin/python", "recorder.py"]
files.scorer = ["recorder.py", "honest.py"]

[nodes.legality_recorder]
stage = "legality"
inputs.tokens = "tokens"
inputs.chain = "recorder"
"#;
    project.write_pipeline(&pipeline);
    project.ok(&["run", "--quiet"]);
    let views: Vec<String> = scorer_logs(&project, "recorder")
        .iter()
        .map(|log| {
            let line = log
                .lines()
                .find_map(|l| l.strip_prefix("VIEW "))
                .unwrap_or_else(|| panic!("no view in {log}"));
            // Each run's private directory has a random name: unlike a node name or a
            // counter, it tells nothing of which run this is.
            let mut view: Value = serde_json::from_str(line).unwrap();
            let cwd = view["cwd"].as_str().unwrap().to_string();
            let random = cwd.rsplit('/').next().unwrap().to_string();
            assert!(random.starts_with("sandbox-"), "{cwd}");
            view["cwd"] = Value::from(cwd.replace(&random, "sandbox-RANDOM"));
            // The data differ by design (another stream, other asked-for positions), and
            // with them the sizes of the files that hold them.
            for file in view["files"].as_array_mut().unwrap() {
                if ["request.json", "in/val.parquet"].contains(&file[0].as_str().unwrap()) {
                    file[2] = Value::from("SIZE");
                }
            }
            view.to_string().replace(&random, "sandbox-RANDOM")
        })
        .collect();
    assert_eq!(views.len(), 3, "the original and two re-runs");
    assert_eq!(views[0], views[1]);
    assert_eq!(views[0], views[2]);
}

/// The judges' secret: the store's own (made on first use, readable by its user only),
/// unless `CACHEMONEY_SECRET` gives one; the re-runs' recipes follow it, so two stores
/// draw other cuts unless they are given the same secret.
#[test]
fn the_secret_is_the_stores_own_unless_given() {
    use std::os::unix::fs::PermissionsExt;
    let recipe_of_cut = |project: &Project, secret: Option<&str>| {
        let mut cmd = project.cmd();
        cmd.env_remove("CACHEMONEY_SECRET");
        if let Some(secret) = secret {
            cmd.env("CACHEMONEY_SECRET", secret);
        }
        let out = cmd.args(["status", "--json"]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status: Value = serde_json::from_slice(&out.stdout).unwrap();
        status
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == "tokens_cut1")
            .map(|n| n["recipe"].as_str().unwrap().to_string())
            .unwrap()
    };
    let (a, b) = (Project::small(), Project::small());
    for p in [&a, &b] {
        p.write_pipeline(
            &(Project::small_pipeline(300)
                + "\n[nodes.pass1]\nstage = \"pass1\"\ninputs.tokens = \"tokens\"\nparams.model = \"bigram\"\n"
                + "\n[nodes.judge]\nstage = \"legality\"\ninputs.tokens = \"tokens\"\ninputs.chain = \"pass1\"\n"),
        );
        // The cuts' recipes need the tokens' content.
        p.ok(&["run", "--quiet", "--until", "tokens"]);
    }
    let (own_a, own_b) = (recipe_of_cut(&a, None), recipe_of_cut(&b, None));
    assert_ne!(own_a, own_b, "two stores, two secrets");
    assert_eq!(own_a, recipe_of_cut(&a, None), "a store keeps its secret");
    let file = a.path().join("artifacts/.secret");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", file.display());
    assert_eq!(
        recipe_of_cut(&a, Some("shared")),
        recipe_of_cut(&b, Some("shared"))
    );
    assert_ne!(recipe_of_cut(&a, Some("shared")), own_a);
}

/// A tilt chain after `pass1` (a hint oracle, or the same scorer honest) and its judge.
fn tilt_chain(name: &str, argument: &str) -> String {
    format!(
        r#"
[nodes.{name}]
stage = "pass1"
inputs.tokens = "tokens"
inputs.hints = "hints"
params.model = "command"
params.command = [".venv/bin/python", "{CHEATS}/hint_oracle.py", "{argument}"]
files.scorer = ["{CHEATS}/honest.py", "{CHEATS}/hint_oracle.py"]

[nodes.tilt_{name}]
stage = "tilt"
inputs.tokens = "tokens"
inputs.pass1 = "{name}"
inputs.hints = "hints"

[nodes.legality_{name}]
stage = "legality"
inputs.tokens = "tokens"
inputs.chain = "tilt_{name}"
"#
    )
}

/// Red team round 5's hint oracle: a scorer that reads the target only where its hint
/// fires, every row normalised. At a random cut it passed every probe; the replace re-run
/// aimed at a firing hint fails it on c1-target, with the hint and the two distributions
/// as evidence, and the same scorer without the peek passes everything.
#[test]
fn a_target_oracle_where_a_hint_fires_is_failed_and_its_honest_twin_passes() {
    let project = project();
    let mut pipeline = Project::small_pipeline(300)
        + "
[nodes.hints]
stage = \"hints\"
inputs.tokens = \"tokens\"
params.kernel = \"cachemoney\"
";
    pipeline += &tilt_chain("oracle", "cheat");
    pipeline += &tilt_chain("twin", "honest");
    let v = judged(&project, &pipeline);
    let twin_bpb = &passed(&v, "legality_twin");
    let twin = &v["legality_twin"].2;
    let (_, oracle_bpb, oracle) = &v["legality_oracle"];
    assert!(oracle_bpb < twin_bpb, "{oracle_bpb} vs {twin_bpb}");
    let (verdict, detail) = &oracle["c1-target"];
    assert_eq!(verdict, "fail", "c1-target: {detail}");
    assert!(detail.contains("across the hint"), "{detail}");
    // The scorer under the tilt is the one whose confinement counts.
    if sandbox::landlock_abi().is_some() {
        let (_, detail) = &twin["sandbox"];
        assert!(!detail.contains("built-in"), "{detail}");
    }
    for (probe, (verdict, detail)) in oracle {
        eprintln!(
            "oracle (claims {oracle_bpb:.4}, honest {twin_bpb:.4}) {probe}: {verdict}: {detail}"
        );
    }
    // The replace re-run says where it aimed: the hint fires at its changed target, and
    // its new target crosses the line between the hint and the rest.
    let mut aimed = 0;
    for dir in std::fs::read_dir(project.path().join("artifacts/perturb")).unwrap() {
        let record = dir.unwrap().path().join("perturbation.json");
        let record: Value = serde_json::from_slice(&std::fs::read(record).unwrap()).unwrap();
        if record["kind"] == "replace" {
            let hint = record["aimed_at_hint"].as_u64().expect("aimed");
            let crossed = (record["original_target"].as_u64() == Some(hint))
                != (record["new_target"].as_u64() == Some(hint));
            assert!(crossed, "{record}");
            aimed += 1;
        }
    }
    assert_eq!(aimed, 1, "one replace re-run, shared by both chains");
}
