//! The re-runs the pipeline adds for judging nodes, on pipelines parsed in memory.

use std::path::Path;

use crate::pipeline::Pipeline;
use crate::registry::Registry;

const CHAINS: &str = r#"
[nodes.tokens]
stage = "tokenize"
files.corpus = ["Cargo.toml"]
[nodes.model]
stage = "train"
inputs.tokens = "tokens"
[nodes.pass1]
stage = "pass1"
inputs.tokens = "tokens"
inputs.model = "model"
params.model = "gpt"
[nodes.cache]
stage = "cache"
inputs.tokens = "tokens"
[nodes.calibration]
stage = "calibrate"
inputs.pass1 = "pass1"
inputs.cache = "cache"
[nodes.scores]
stage = "pass2"
inputs.tokens = "tokens"
inputs.pass1 = "pass1"
inputs.cache = "cache"
inputs.calibration = "calibration"
"#;

fn parse(text: &str) -> anyhow::Result<Pipeline> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipeline.toml");
    Pipeline::parse(&root, text, &Registry::with_builtin_stages())
}

#[test]
fn a_judged_pass1s_sample_seed_is_mixed_with_the_secret() {
    let with = |secret: &str| {
        let text = format!(
            "{CHAINS}\n[nodes.judge]\nstage = \"legality\"\ninputs.tokens = \"tokens\"\ninputs.chain = \"scores\"\nparams.secret = \"{secret}\"\n"
        );
        let pipeline = parse(&text).unwrap();
        let seed = pipeline.node("pass1").unwrap().params["mass_seed"]
            .as_u64()
            .unwrap();
        let judge = pipeline.node("judge").unwrap();
        // Every entry inherits the mixed seed: the cuts fall where the original asks.
        for cut in judge.params["cuts"].as_array().unwrap() {
            assert_eq!(cut["original_seed"].as_u64(), Some(seed));
        }
        seed
    };
    let (a, b) = (with("s"), with("t"));
    assert_ne!(a, 1337);
    assert_ne!(a, b);
    assert_eq!(a, with("s"));
    // Unjudged, a pass-1's seed is the pipeline's own.
    let pipeline = parse(CHAINS).unwrap();
    assert_eq!(pipeline.node("pass1").unwrap().params["mass_seed"], 1337);
}

/// A tilt chain's hints aim its re-runs: the original hints node is wired into each
/// perturbing node and the judge, the tilt's gate is copied into every cut, and two
/// chains with other hints get copies of their own even where their cuts are equal.
#[test]
fn a_tilt_chains_hints_aim_its_own_re_runs() {
    let tilt = |n: &str, threshold: &str| {
        format!(
            "
[nodes.hints{n}]
stage = \"hints\"
inputs.tokens = \"tokens\"
params.min_count = {n}
params.kernel = \"cachemoney\"
[nodes.b_pass1{n}]
stage = \"pass1\"
inputs.tokens = \"tokens\"
inputs.hints = \"hints{n}\"
params.model = \"bigram\"
[nodes.a_tilt{n}]
stage = \"tilt\"
inputs.tokens = \"tokens\"
inputs.pass1 = \"b_pass1{n}\"
inputs.hints = \"hints{n}\"
params.threshold = {threshold}
[nodes.judge{n}]
stage = \"legality\"
inputs.tokens = \"tokens\"
inputs.chain = \"a_tilt{n}\"
params.secret = \"s\"
"
        )
    };
    let text = format!("{CHAINS}{}{}", tilt("1", "0.8"), tilt("2", "0.8"));
    let pipeline = parse(&text).unwrap();
    let node = |name: &str| pipeline.node(name).unwrap();
    assert_eq!(node("judge1").inputs["hints"], "hints1");
    assert_eq!(node("judge2").inputs["hints"], "hints2");
    for (judge, hints) in [("judge1", "hints1"), ("judge2", "hints2")] {
        for cut in ["cut1", "cut2"] {
            let copy = &node(judge).inputs[cut];
            let number = &copy[copy.rfind("_cut").unwrap()..];
            let source = node(&format!("tokens{number}"));
            assert_eq!(source.stage, "perturb");
            assert_eq!(source.inputs["hints"], hints, "{copy}");
            // The gate, and the sample of the pass-1 (the tilt, first by name, has none).
            let tilt = node(&judge.replace("judge", "a_tilt"));
            assert_eq!(source.params["hint_threshold"], tilt.params["threshold"]);
            assert_eq!(
                source.params["hint_threshold"].as_f64(),
                Some(0.8f32 as f64)
            );
            assert_eq!(source.params["original_sample"], 4096);
        }
    }
    // A user may not wire what the pipeline wires.
    let wired = text.replace(
        "inputs.chain = \"a_tilt1\"",
        "inputs.chain = \"a_tilt1\"\ninputs.hints = \"hints1\"",
    );
    let err = parse(&wired).unwrap_err().to_string();
    assert!(
        err.contains("inputs.hints is wired by the pipeline"),
        "{err}"
    );
}

#[test]
fn a_judge_gets_one_copy_of_its_chain_per_cut_and_shares_them() {
    let text = format!(
        "{CHAINS}
[nodes.judge_scores]
stage = \"legality\"
inputs.tokens = \"tokens\"
inputs.chain = \"scores\"
params.secret = \"s\"
[nodes.judge_pass1]
stage = \"legality\"
inputs.tokens = \"tokens\"
inputs.chain = \"pass1\"
params.secret = \"s\"
params.cuts = [{{ at = 0.3 }}, {{ draw = 1 }}]
"
    );
    let pipeline = parse(&text).unwrap();
    let node = |name: &str| pipeline.node(name).unwrap();
    // Judges in name order: judge_pass1's two entries are cuts 1 and 2; then
    // judge_scores' defaults, a shuffle of draw 1 (the same as judge_pass1's second:
    // shared) and a replace of draw 2, are 2 and 3.
    assert_eq!(node("judge_pass1").inputs["cut1"], "pass1_cut1");
    assert_eq!(node("judge_pass1").inputs["cut2"], "pass1_cut2");
    assert_eq!(node("judge_scores").inputs["cut1"], "scores_cut2");
    assert_eq!(node("judge_scores").inputs["cut2"], "scores_cut3");
    assert!(!node("judge_scores").inputs.contains_key("cut3"));
    assert_eq!(node("tokens_cut1").stage, "perturb");
    assert_eq!(node("tokens_cut1").params["at"], 0.3);
    assert_eq!(node("tokens_cut3").params["kind"], "replace");
    // Every entry carries the judge's secret and the original run's sample.
    for cut in ["tokens_cut1", "tokens_cut2", "tokens_cut3"] {
        assert_eq!(node(cut).params["secret"], "s");
        assert_eq!(
            node(cut).params["original_sample"],
            4096,
            "pass1's mass_sample"
        );
        assert_eq!(
            node(cut).params["original_seed"],
            node("pass1").params["mass_seed"],
            "pass1's mass_seed, mixed with the secret"
        );
    }
    assert_eq!(node("judge_scores").params["cuts"][0]["secret"], "s");
    // Members read the perturbed tokens and each other; the model stays shared.
    assert_eq!(node("pass1_cut3").inputs["tokens"], "tokens_cut3");
    assert_eq!(node("pass1_cut3").inputs["model"], "model");
    assert_eq!(
        node("scores_cut3").inputs["calibration"],
        "calibration_cut3"
    );
    // A cache chain's judge reads its pass-1 runs too.
    assert_eq!(node("judge_scores").inputs["pass1"], "pass1");
    assert_eq!(node("judge_scores").inputs["pass1_cut2"], "pass1_cut3");
    assert!(!node("judge_pass1").inputs.contains_key("pass1"));
    assert!(
        pipeline.node("model_cut1").is_err(),
        "the model is not retrained"
    );
    assert_eq!(node("judge_scores").params["chain"], "scores");
    assert!(node("scores_cut3").rerun.is_some() && node("scores").rerun.is_none());
    // Topological: every re-run after what it reads; each run beside its original.
    let at = |n: &str| pipeline.nodes.iter().position(|x| x.name == n).unwrap();
    assert!(at("tokens_cut3") < at("pass1_cut3") && at("scores_cut3") < at("judge_scores"));
    let pass1_runs: Vec<usize> = ["pass1", "pass1_cut1", "pass1_cut2", "pass1_cut3"]
        .iter()
        .map(|n| at(n))
        .collect();
    let (first, last) = (
        pass1_runs.iter().min().unwrap(),
        pass1_runs.iter().max().unwrap(),
    );
    assert_eq!(
        last - first,
        3,
        "the pass-1 runs are built one after another"
    );
}

#[test]
fn the_order_of_a_nodes_runs_is_drawn_from_the_secret() {
    let order_with = |secret: &str| {
        let text = format!(
            "{CHAINS}\n[nodes.judge]\nstage = \"legality\"\ninputs.tokens = \"tokens\"\ninputs.chain = \"pass1\"\nparams.secret = \"{secret}\"\nparams.cuts = [{{ draw = 1 }}, {{ draw = 2 }}, {{ draw = 3 }}]\n"
        );
        let pipeline = parse(&text).unwrap();
        let runs: Vec<String> = pipeline
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .filter(|n| n.starts_with("pass1"))
            .collect();
        let main: Vec<String> = pipeline
            .nodes
            .iter()
            .filter(|n| n.rerun.is_none())
            .map(|n| n.name.clone())
            .collect();
        (runs, main)
    };
    let orders: Vec<_> = (0..8).map(|i| order_with(&format!("secret {i}"))).collect();
    let distinct: std::collections::BTreeSet<&Vec<String>> =
        orders.iter().map(|(r, _)| r).collect();
    assert!(distinct.len() > 2, "{distinct:?}");
    assert!(
        orders.iter().any(|(runs, _)| runs[0] != "pass1"),
        "the original is not always first"
    );
    // The pipeline's own nodes keep their order whatever the secret.
    assert!(orders.iter().all(|(_, main)| *main == orders[0].1));
}

#[test]
fn judges_are_checked_where_they_are_written() {
    let wired = format!(
        "{CHAINS}\n[nodes.judge]\nstage = \"legality\"\ninputs.tokens = \"tokens\"\ninputs.chain = \"scores\"\ninputs.cut1 = \"scores\"\n"
    );
    let err = parse(&wired).unwrap_err().to_string();
    assert!(
        err.contains("inputs.cut1 is wired by the pipeline"),
        "{err}"
    );
    // The companion's inputs too: a judge's pass-1 of the chain is the pipeline's to wire.
    let wired = format!(
        "{CHAINS}\n[nodes.judge]\nstage = \"legality\"\ninputs.tokens = \"tokens\"\ninputs.chain = \"scores\"\ninputs.pass1 = \"pass1\"\n"
    );
    let err = parse(&wired).unwrap_err().to_string();
    assert!(
        err.contains("inputs.pass1 is wired by the pipeline"),
        "{err}"
    );
    let not_a_chain = format!(
        "{CHAINS}\n[nodes.judge]\nstage = \"legality\"\ninputs.tokens = \"tokens\"\ninputs.chain = \"model\"\n"
    );
    let err = parse(&not_a_chain).unwrap_err().to_string();
    assert!(
        err.contains("pipeline.toml:") && err.contains("produces none of"),
        "{err}"
    );
    let clash = format!(
        "{CHAINS}\n[nodes.scores_cut1]\nstage = \"token-stats\"\ninputs.tokens = \"tokens\"\n[nodes.judge]\nstage = \"legality\"\ninputs.tokens = \"tokens\"\ninputs.chain = \"scores\"\n"
    );
    let err = parse(&clash).unwrap_err().to_string();
    assert!(
        err.contains("clashes with the name of a re-run copy"),
        "{err}"
    );
}
