//! `cachemoney report`: the page is self-contained, and a real browser (headless
//! Chromium, Debian's `chromium`, which `./dev test` installs) renders every figure in it
//! without a console error.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{mass_node, mode_chain, neural_pipeline, tiny_model, Project};

/// The browser the test drives: `$CACHEMONEY_CHROMIUM`, or `chromium` on the PATH.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("CACHEMONEY_CHROMIUM") {
        return PathBuf::from(path);
    }
    for name in ["chromium", "chromium-browser"] {
        if Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return PathBuf::from(name);
        }
    }
    panic!(
        "the report test needs headless Chromium: `./dev test` installs Debian's `chromium` \
         package (apt-get install chromium), or point CACHEMONEY_CHROMIUM at a browser"
    );
}

/// What the page looks like to a browser: the page is loaded with a probe added (errors
/// and console.error calls recorded from the first byte on; every figure's drawn size and
/// marks measured after layout), and the DOM is dumped. Returns (probe JSON, stderr).
fn render_in_chromium(report: &Path) -> (serde_json::Value, String) {
    let html = std::fs::read_to_string(report).unwrap();
    let capture = "<script>window.__errors = []; \
        window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true); \
        const __log = console.error; console.error = (...a) => { window.__errors.push(a.join(' ')); __log(...a); };</script>";
    let measure = "<script>\
        const figures = [...document.querySelectorAll('figure.plot')].map(f => { \
          const svg = f.querySelector('svg'); \
          if (!svg) return { id: f.id, svg: false }; \
          const box = svg.getBBox(); const shown = f.getBoundingClientRect(); \
          return { id: f.id, svg: true, width: box.width, height: box.height, \
                   shown_width: shown.width, shown_height: shown.height, \
                   marks: svg.querySelectorAll('rect, polyline, path, circle, line').length, \
                   texts: [...svg.querySelectorAll('text')].filter(t => t.getComputedTextLength() > 0).length }; }); \
        document.documentElement.setAttribute('data-probe', JSON.stringify({ errors: window.__errors, figures }));\
        </script>";
    let probed = html
        .replacen("<head>", &format!("<head>{capture}"), 1)
        .replacen("</body>", &format!("{measure}</body>"), 1);
    let page = report.with_file_name("probed.html");
    std::fs::write(&page, probed).unwrap();
    let profile = report.with_file_name("chromium-profile");
    let output = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1400,1000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium starts");
    let dom = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "chromium failed: {stderr}");
    let start = dom.find("data-probe=\"").unwrap_or_else(|| {
        panic!(
            "the probe did not run; DOM:\n{}\nstderr:\n{stderr}",
            &dom[..dom.len().min(2000)]
        )
    }) + "data-probe=\"".len();
    let end = start + dom[start..].find('"').unwrap();
    let json = dom[start..end]
        .replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&");
    (serde_json::from_str(&json).unwrap(), stderr)
}

#[test]
fn the_report_renders_every_figure_in_a_browser_without_errors() {
    const TILT_CHAIN: &str = "
[nodes.hints]
stage = \"hints\"
inputs.tokens = \"tokens\"
params.kernel = \"cachemoney\"

[nodes.pass1_hinted]
stage = \"pass1\"
inputs.tokens = \"tokens\"
inputs.hints = \"hints\"
params.model = \"bigram\"
params.temperature = 1.0

[nodes.tilt]
stage = \"tilt\"
inputs.tokens = \"tokens\"
inputs.pass1 = \"pass1_hinted\"
inputs.hints = \"hints\"
";
    let project = Project::small();
    project.write_pipeline(&format!(
        "{}{}{}{}{}",
        neural_pipeline(&tiny_model(300), 20),
        mode_chain("normalised", "causal-normalised"),
        mass_node("mass_reference", ""),
        mass_node("mass_normalised", "_normalised"),
        TILT_CHAIN,
    ));
    project.ok(&["run", "--quiet"]);
    let out = project.ok(&["report", "--out", "figures.html"]);
    assert!(out.contains("figures.html (12 figures"), "{out}");
    let report = project.path().join("figures.html");
    let html = std::fs::read_to_string(&report).unwrap();

    // Self-contained: no script, nothing to fetch.
    assert!(!html.contains("<script"), "the report has a script");
    for attribute in ["src=\"http", "href=\"http", "url(http", "@import"] {
        assert!(
            !html.contains(attribute),
            "the report fetches something: {attribute}"
        );
    }
    // The numbers in its summary are the artifacts' own.
    let shown = project.ok(&["show", "scores_normalised", "--json"]);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let final_bpb = shown["report"]["final_bpb"].as_f64().unwrap();
    assert!(
        html.contains(&format!("<td>{final_bpb:.4}</td>")),
        "summary lacks {final_bpb:.4}"
    );
    // A tilt chain is a chain: its row gives the BPB before and after the tilt.
    let shown = project.ok(&["show", "tilt", "--json"]);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let (before, after) = (
        shown["report"]["bpb_before"].as_f64().unwrap(),
        shown["report"]["neural_bpb"].as_f64().unwrap(),
    );
    let row = format!("<tr><td>tilt</td><td>tilt (cachemoney)</td><td>pass1_hinted</td><td>{before:.4}</td><td>–</td><td>{after:.4}</td>");
    assert!(html.contains(&row), "summary lacks {row}");

    let (probe, stderr) = render_in_chromium(&report);
    assert_eq!(probe["errors"], serde_json::json!([]), "page errors");
    let console: Vec<&str> = stderr.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "console output: {console:?}");
    let figures = probe["figures"].as_array().unwrap();
    let ids: Vec<&str> = figures.iter().map(|f| f["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        [
            "waterfall-tilt",
            "waterfall-scores",
            "waterfall-scores_normalised",
            "calibration-calibration",
            "calibration-calibration_normalised",
            "ngram-match-rate",
            "ngram-bpb",
            "phrase-match-rate",
            "phrase-bpb",
            "training-loss",
            "training-val-bpb",
            "implied-mass",
        ][..],
        "{probe}"
    );
    for figure in figures {
        let number = |key: &str| figure[key].as_f64().unwrap_or(0.0);
        assert_eq!(figure["svg"], true, "{figure}");
        assert!(
            number("width") > 200.0 && number("height") > 200.0,
            "not drawn: {figure}"
        );
        assert!(
            number("shown_width") > 200.0 && number("shown_height") > 200.0,
            "not laid out: {figure}"
        );
        assert!(number("marks") >= 4.0, "no marks: {figure}");
        assert!(number("texts") >= 3.0, "no visible labels: {figure}");
    }
}

#[test]
fn a_report_before_anything_is_built_is_a_one_line_error_and_writes_nothing() {
    let project = Project::small();
    project.write_pipeline(&neural_pipeline(&tiny_model(300), 20));
    let err = project.fails(&["report"]);
    assert!(err.contains("no chain of"), "{err}");
    assert!(err.contains("run `cachemoney run` first"), "{err}");
    assert!(!project.path().join("report.html").exists());
}
