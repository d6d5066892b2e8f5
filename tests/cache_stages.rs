//! pass1 → cache → calibrate → pass2 through the real binary, on real text.

use crate::common;

use common::{mass_node, mode_chain, write_pass1_table, Project};

fn cache_pipeline(pass1: &str) -> String {
    Project::small_pipeline(300)
        + &format!(
            r#"
[nodes.pass1]
stage = "pass1"
inputs.tokens = "tokens"
{pass1}
"#
        )
        + &Project::cache_chain(32768)
}

fn value(p: &Project, query: &str) -> String {
    p.sql(query).lines().nth(1).unwrap().to_string()
}

fn summary(p: &Project) -> serde_json::Value {
    let manifest: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "scores", "--json"])).unwrap();
    manifest["report"].clone()
}

#[test]
fn the_bigram_chain_prints_a_waterfall_that_sql_reproduces() {
    let p = Project::small();
    p.write_pipeline(&cache_pipeline("params.model = \"bigram\""));
    let out = p.ok(&["run"]);
    assert!(out.contains("scores: BPB: neural"), "{out}");
    let report = summary(&p);
    let (neural, final_bpb) = (
        report["neural_bpb"].as_f64().unwrap(),
        report["final_bpb"].as_f64().unwrap(),
    );
    assert!(final_bpb < neural, "{report}");

    // The summary is exactly what the per-entry scores add up to.
    let from_sql: f64 = value(&p, "SELECT sum(bits) / sum(bytes) FROM scores")
        .parse()
        .unwrap();
    assert!(
        ((from_sql - final_bpb) / final_bpb).abs() < 1e-12,
        "{from_sql} vs {final_bpb}"
    );
    // The derived columns: not in the files, and SQL computes the very bits the
    // stages compute, on every row (compared as f64 bit patterns; CSV prints the
    // shortest text that parses back to the same f64).
    let manifest: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "scores", "--json"])).unwrap();
    let stored = manifest["files"]["scores.parquet"]["schema"].to_string();
    assert!(
        stored.contains("p_final") && !stored.contains("bits"),
        "{stored}"
    );
    let f64s = |text: &str| -> Vec<f64> { text.split(',').map(|v| v.parse().unwrap()).collect() };
    let scores = p.sql("SELECT p_final, bits FROM scores");
    for line in scores.lines().skip(1) {
        let row = f64s(line);
        assert_eq!(
            row[1].to_bits(),
            stage_api::scores::bits(row[0]).to_bits(),
            "{line}"
        );
    }
    let matches = p.sql("SELECT ngram_context, ngram_full, ngram_q, phrase_context, phrase_full, phrase_q FROM matches");
    let mut matched = 0;
    for line in matches.lines().skip(1) {
        let row = f64s(line);
        for (context, full, q) in [(row[0], row[1], row[2]), (row[3], row[4], row[5])] {
            let expected = cache::ngram::cache_q(context as u32, full as u32);
            assert_eq!(q.to_bits(), expected.to_bits(), "{line}");
            matched += (q > 0.0 && q < 1.0) as usize;
        }
    }
    assert!(matched > 100, "too few fractional q to compare: {matched}");
    // One entry per val target.
    assert_eq!(
        value(&p, "SELECT count(*) FROM scores"),
        value(&p, "SELECT count(*) - 1 FROM val")
    );
    // The grid: 6 × 5 points, one chosen, the chosen one has the smallest objective.
    assert_eq!(
        value(
            &p,
            "SELECT count(*), sum(CASE WHEN chosen THEN 1 ELSE 0 END) FROM grid"
        ),
        "30,1"
    );
    assert_eq!(
        value(
            &p,
            "SELECT chosen FROM grid ORDER BY objective_nats, alpha_high, entropy_thresh LIMIT 1"
        ),
        "true"
    );
    // The README's query: BPB by n-gram order.
    let by_order = p.sql("SELECT ngram_order, count(*) AS n, sum(bits)/sum(bytes) AS bpb FROM scores JOIN matches USING (position) GROUP BY 1 ORDER BY 1");
    assert!(by_order.lines().count() > 3, "{by_order}");
    // Phrase matches: every target from position 16 on (no leave-one-out, §6).
    assert_eq!(
        value(
            &p,
            "SELECT min(position) FROM matches WHERE phrase_length > 0"
        ),
        "16"
    );
    let stats = p.sql("SELECT kind, size, matched FROM cache_stats ORDER BY kind, size");
    assert!(
        stats.contains("ngram,16,") && stats.contains("phrase,64,"),
        "{stats}"
    );
}

#[test]
fn an_imported_pass1_table_gives_the_same_scores_as_the_model_that_made_it() {
    let p = Project::small();
    // No sampled distributions: an imported table cannot have them, and the artifacts
    // must be byte-identical for the reuse below.
    p.write_pipeline(&cache_pipeline(
        "params.model = \"bigram\"\nparams.mass_sample = 0",
    ));
    p.ok(&["run"]);
    let bigram = summary(&p);
    // Export the bigram's pass-1 table as a user's own eval would, then import it.
    let manifest: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "pass1", "--json"])).unwrap();
    let artifact = p
        .path()
        .join("artifacts/pass1")
        .join(manifest["recipe"].as_str().unwrap());
    std::fs::copy(
        artifact.join("pass1.parquet"),
        p.path().join("my_eval.parquet"),
    )
    .unwrap();
    p.write_pipeline(&cache_pipeline(
        "params.model = \"import\"\nfiles.table = \"my_eval.parquet\"",
    ));
    let out = p.ok(&["run"]);
    // The imported table has the same bytes, so everything below pass1 is reused.
    assert!(
        out.lines()
            .any(|l| l.starts_with("scores ") && l.contains("reused")),
        "{out}"
    );
    assert_eq!(summary(&p)["final_bpb"], bigram["final_bpb"]);
}

#[test]
fn bad_cache_parameters_are_refused_before_anything_runs() {
    let p = Project::small();
    p.ok(&["run"]);
    let before = p.store_snapshot();
    for (change, expected) in [
        (
            "params.ngram_buckets = 65536",
            "params.ngram_buckets = 65000",
            "ngram buckets = 65000 is not a power of two",
        ),
        (
            "params.ngram_buckets = 65536",
            "params.ngram_buckets = 65536\nparams.ngram_max_order = 24",
            "n-gram orders 2..=24 are outside 2..=16",
        ),
        (
            "params.phrase_buckets = 32768",
            "params.phrase_buckets = 3",
            "phrase buckets = 3 is not a power of two",
        ),
        (
            "params.ngram_buckets = 65536",
            "params.ngram_buckets = 65536\nparams.mode = \"causal-sometime\"",
            "unknown variant `causal-sometime`",
        ),
    ]
    .map(|(a, b, c)| (cache_pipeline("params.model = \"bigram\"").replace(a, b), c))
    {
        p.write_pipeline(&change);
        let line = p.fails(&["run"]);
        assert!(
            line.contains("pipeline.toml:") && line.contains(expected),
            "{line}"
        );
    }
    assert_eq!(before, p.store_snapshot());
}

#[test]
fn a_bad_imported_pass1_table_is_refused_with_its_file_and_row() {
    let p = Project::small();
    p.write_pipeline(&cache_pipeline("params.model = \"bigram\""));
    p.ok(&["run"]);
    let cases = [
        (
            "nan.parquet",
            vec![1, 2],
            vec![0.5, 0.5],
            vec![1.0, f32::NAN],
            "row 1: entropy NaN",
        ),
        (
            "range.parquet",
            vec![1, 99_999_999],
            vec![0.5, 0.5],
            vec![1.0, 1.0],
            "row 1: position 99999999 is outside the val targets",
        ),
        (
            "zero.parquet",
            vec![1, 2],
            vec![0.0, 0.5],
            vec![1.0, 1.0],
            "row 0: model_p 0 is not in (0, 1]",
        ),
        (
            "empty.parquet",
            vec![],
            vec![],
            vec![],
            "the pass-1 table is empty",
        ),
        (
            "short.parquet",
            vec![1, 2, 3],
            vec![0.5; 3],
            vec![1.0; 3],
            "the pass-1 table covers 3 of the",
        ),
    ];
    for (name, position, model_p, entropy, expected) in cases {
        write_pass1_table(&p.path().join(name), position, model_p, entropy);
        let before = p.store_snapshot();
        p.write_pipeline(&cache_pipeline(&format!(
            "params.model = \"import\"\nfiles.table = \"{name}\""
        )));
        let line = p.fails(&["run"]);
        assert!(line.contains(name) && line.contains(expected), "{line}");
        assert_eq!(before, p.store_snapshot());
    }
}

#[test]
fn causal_mode_reuses_everything_upstream_and_scores_worse_than_the_leaky_reference() {
    let p = Project::small();
    let reference = cache_pipeline("params.model = \"bigram\"");
    p.write_pipeline(&reference);
    p.ok(&["run"]);
    let leaky = summary(&p);
    p.write_pipeline(&reference.replace(
        "params.ngram_buckets = 65536",
        "params.ngram_buckets = 65536\nparams.mode = \"causal\"",
    ));
    let out = p.ok(&["run"]);
    for node in ["tokens ", "pass1 "] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(node) && l.contains("reused")),
            "{out}"
        );
    }
    let honest = summary(&p);
    assert_eq!(honest["mode"], "causal");
    assert_eq!(honest["neural_bpb"], leaky["neural_bpb"]);
    let (honest_bpb, leaky_bpb) = (
        honest["final_bpb"].as_f64().unwrap(),
        leaky["final_bpb"].as_f64().unwrap(),
    );
    assert!(
        honest_bpb > leaky_bpb,
        "causal {honest_bpb} vs reference {leaky_bpb}"
    );
    // No count a position sees includes itself: the first document's first repeat is the
    // earliest possible match, so position 1 never matches.
    assert_eq!(
        value(
            &p,
            "SELECT ngram_order, ngram_context FROM matches WHERE position = 1"
        ),
        "0,0"
    );
    assert_eq!(
        value(
            &p,
            "SELECT count(*) FROM cache_stats WHERE buckets_used IS NULL"
        ),
        "19"
    );
}

#[test]
fn the_cache_chain_gives_identical_bytes_with_one_and_two_threads() {
    for mode in ["reference", "causal", "causal-normalised"] {
        let pipeline = cache_pipeline("params.model = \"bigram\"").replace(
            "params.ngram_buckets = 65536",
            &format!("params.ngram_buckets = 65536\nparams.mode = \"{mode}\""),
        );
        let hashes: Vec<String> = ["1", "2"]
            .iter()
            .map(|threads| {
                let p = Project::small();
                p.write_pipeline(&pipeline);
                p.ok(&["run", "--threads", threads]);
                p.sql("SELECT stage, content_hash FROM artifacts ORDER BY stage")
            })
            .collect();
        assert_eq!(hashes[0], hashes[1], "mode {mode}");
    }
}

#[test]
fn compare_shows_every_mode_on_one_pass1_and_normalised_picks_orders_without_the_target() {
    let p = Project::small();
    p.write_pipeline(&format!(
        "{}{}{}",
        cache_pipeline("params.model = \"bigram\""),
        mode_chain("causal", "causal"),
        mode_chain("normalised", "causal-normalised")
    ));
    p.ok(&["run"]);
    let out = p.ok(&["compare"]);
    assert!(out.contains("pass-1 'pass1' (model bigram"), "{out}");
    for (mode, node) in [
        ("reference", "scores"),
        ("causal", "scores_causal"),
        ("causal-normalised", "scores_normalised"),
    ] {
        assert!(
            out.lines()
                .any(|l| l.trim_start().starts_with(mode) && l.contains(node)),
            "{mode}: {out}"
        );
    }
    // The JSON rows carry each node's own summary.
    let rows: serde_json::Value = serde_json::from_str(&p.ok(&["compare", "--json"])).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let neural = &rows[0]["neural_bpb"];
    assert!(rows.iter().all(|r| &r["neural_bpb"] == neural));
    let normalised = rows
        .iter()
        .find(|r| r["mode"] == "causal-normalised")
        .unwrap();
    let manifest: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "scores_normalised", "--json"])).unwrap();
    assert_eq!(normalised["final_bpb"], manifest["report"]["final_bpb"]);

    // A claim held against the number the run produces: within its spread, exit 0; off
    // by more, exit 1 with the difference; a chain that is not built is named.
    let bpb = normalised["final_bpb"].as_f64().unwrap();
    let claimed = format!("{bpb:.4}");
    let out = p.ok(&[
        "compare",
        "--claim",
        &claimed,
        "--chain",
        "scores_normalised",
    ]);
    assert!(
        out.contains(&format!(
            "claim {claimed} ± 0.00005 (half a unit of its last digit)"
        )) && out.contains("scores_normalised: BPB")
            && out.contains(": within"),
        "{out}"
    );
    let off = format!("{:.4}", bpb + 0.01);
    let output = p.run(&[
        "compare",
        "--claim",
        &off,
        "--spread",
        "0.003",
        "--chain",
        "scores_normalised",
    ]);
    let out = String::from_utf8(output.stdout).unwrap();
    assert_eq!(output.status.code(), Some(1), "{out}");
    assert!(
        out.contains("(the stated spread)") && out.contains("OUTSIDE"),
        "{out}"
    );
    let err = p.fails(&["compare", "--claim", "1.0", "--chain", "nonesuch"]);
    assert!(err.contains("--chain nonesuch: not a built chain"), "{err}");
    let err = p.fails(&["compare", "--claim", "one"]);
    assert!(err.contains("--claim one: not a number"), "{err}");

    // Causal mode skips an order whose full count is 0 (it looks at the target);
    // normalised mode keeps the order its context earned and gives the target q = 0.
    assert_eq!(
        value(
            &p,
            "SELECT count(*) FROM cache_causal.matches WHERE ngram_order > 0 AND ngram_full = 0"
        ),
        "0"
    );
    let zero_q: u64 = value(
        &p,
        "SELECT count(*) FROM cache_normalised.matches WHERE ngram_order > 0 AND ngram_full = 0",
    )
    .parse()
    .unwrap();
    assert!(zero_q > 0);
    // Exact counts: a context is never followed by its target more often than it occurred.
    assert_eq!(
        value(
            &p,
            "SELECT count(*) FROM cache_normalised.matches WHERE ngram_full > ngram_context OR phrase_full > phrase_context"
        ),
        "0"
    );
}

#[test]
fn compare_before_anything_is_built_says_what_to_do() {
    let p = Project::small();
    p.write_pipeline(&cache_pipeline("params.model = \"bigram\""));
    let err = p.fails(&["compare"]);
    assert!(
        err.contains("no chain of") && err.contains("cachemoney run"),
        "{err}"
    );
}

#[test]
fn implied_mass_is_one_for_causal_normalised_and_more_for_the_reference() {
    let p = Project::small();
    p.write_pipeline(&format!(
        "{}{}{}{}{}{}",
        cache_pipeline("params.model = \"bigram\"\nparams.mass_sample = 300"),
        mode_chain("causal", "causal"),
        mode_chain("normalised", "causal-normalised"),
        mass_node("mass_reference", ""),
        mass_node("mass_causal", "_causal"),
        mass_node("mass_normalised", "_normalised"),
    ));
    let out = p.ok(&["run"]);
    assert!(out.contains("implied mass (causal-normalised)"), "{out}");
    let report = |node: &str| -> serde_json::Value {
        let manifest: serde_json::Value =
            serde_json::from_str(&p.ok(&["show", node, "--json"])).unwrap();
        manifest["report"].clone()
    };
    let normalised = report("mass_normalised");
    assert_eq!(normalised["samples"], 300);
    for key in ["mass_min", "mass_max", "mass_mean"] {
        let mass = normalised[key].as_f64().unwrap();
        assert!((mass - 1.0).abs() < 1e-6, "{key} {mass}");
    }
    let reference = report("mass_reference");
    assert!(
        reference["mass_mean"].as_f64().unwrap() > 1.0,
        "{reference}"
    );
    assert!(reference["mass_max"].as_f64().unwrap() > 1.5, "{reference}");
    // Renormalising can only cost bits when the mass exceeds 1.
    assert!(
        reference["normalised_sample_bpb"].as_f64().unwrap()
            > reference["sample_bpb"].as_f64().unwrap()
    );
    let causal = report("mass_causal");
    assert!(causal["mass_mean"].as_f64().unwrap() > 1.0, "{causal}");
    // The per-position table: the true token's probability is pass2's, position by position.
    assert_eq!(
        value(
            &p,
            "SELECT count(*) FROM mass_normalised.mass m JOIN scores_normalised.scores s USING (position) WHERE m.p_target = s.p_final"
        ),
        "300"
    );
}

/// The legality probes on the three modes: the record's reference fails C1 (prefix and
/// target) and C2 (and the blind estimate), causal holds the prefix but chooses by the
/// target and is not normalised, causal-normalised passes everything.
#[test]
fn the_legality_probes_sort_the_three_cache_modes() {
    let p = Project::small();
    let judge = |chain: &str, mass: &str| {
        // 300 distributions (the small corpus): below the default min_sample of 512.
        format!("\n[nodes.legality_{mass}]\nstage = \"legality\"\ninputs.tokens = \"tokens\"\ninputs.chain = \"{chain}\"\ninputs.mass = \"{mass}\"\nparams.min_sample = 300\n")
    };
    p.write_pipeline(&format!(
        "{}{}{}{}{}{}{}{}{}",
        cache_pipeline("params.model = \"bigram\"\nparams.mass_sample = 300"),
        mode_chain("causal", "causal"),
        mode_chain("normalised", "causal-normalised"),
        mass_node("mass_reference", ""),
        mass_node("mass_causal", "_causal"),
        mass_node("mass_normalised", "_normalised"),
        judge("scores", "mass_reference"),
        judge("scores_causal", "mass_causal"),
        judge("scores_normalised", "mass_normalised"),
    ));
    p.ok(&["run", "--quiet"]);
    let verdicts = value(
        &p,
        "SELECT string_agg(chain || ' ' || probe || ' ' || verdict, '; ' ORDER BY chain, probe) FROM legality",
    );
    assert_eq!(
        verdicts,
        "scores bytes pass; scores c1-prefix fail; scores c1-target fail; scores c2-blind fail; scores c2-normalised fail; scores coverage pass; scores sandbox pass; \
         scores_causal bytes pass; scores_causal c1-prefix pass; scores_causal c1-target fail; scores_causal c2-blind fail; scores_causal c2-normalised fail; scores_causal coverage pass; scores_causal sandbox pass; \
         scores_normalised bytes pass; scores_normalised c1-prefix pass; scores_normalised c1-target pass; scores_normalised c2-blind pass; scores_normalised c2-normalised pass; scores_normalised coverage pass; scores_normalised sandbox pass"
    );
    // The evidence of a failure names a position before the cut and two values.
    let evidence = value(
        &p,
        "SELECT position < 1000000 AND expected <> observed FROM legality WHERE chain = 'scores' AND probe = 'c1-prefix'",
    );
    assert_eq!(evidence, "true");
    let out = p.run(&["legality", "scores_normalised"]);
    assert!(out.status.success());
    assert!(!p.run(&["legality"]).status.success());
}

#[test]
fn an_imported_pass1_has_no_distributions_and_the_mass_audit_says_so() {
    let p = Project::small();
    p.write_pipeline(&format!(
        "{}{}",
        cache_pipeline("params.model = \"bigram\"\nparams.mass_sample = 0"),
        mass_node("mass_reference", ""),
    ));
    let err = p.fails(&["run"]);
    assert!(
        err.contains("distributions.parquet") && err.contains("kept no distributions"),
        "{err}"
    );
}
