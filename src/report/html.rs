//! The page itself: a summary table, the seeds table, then each section's figures with
//! their captions and queries, as one static HTML file.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};

use super::{Built, Section};
use crate::pipeline::Pipeline;
use crate::seeds::SeedRow;

pub(super) fn render<'a>(
    pipeline: &Pipeline,
    chains: &[&'a Built<'a>],
    audit_of: &dyn Fn(&Built) -> Option<&'a Built<'a>>,
    seed_rows: &[SeedRow],
    sections: &[Section],
) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>cachemoney report: {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>cachemoney report</h1>\n<p class=\"meta\">pipeline <code>{}</code> · cachemoney {} · every figure names the artifacts it read (content hashes) and the SQL it ran; <code>cachemoney sql</code> reruns it.</p>\n",
        escape(&pipeline.path.display().to_string()),
        escape(&pipeline.path.display().to_string()),
        env!("CARGO_PKG_VERSION"),
    );
    html.push_str("<h2>Summary</h2>\n<table class=\"summary\">\n<tr><th>chain</th><th>mode</th><th>pass-1</th><th>neural</th><th>after n-gram</th><th>final</th><th>alpha_high</th><th>entropy_thresh</th><th>mass mean</th><th>renormalised BPB</th></tr>\n");
    let cell =
        |v: Option<f64>, digits: usize| v.map_or("–".to_string(), |x| format!("{x:.digits$}"));
    for chain in chains {
        let audit = audit_of(chain);
        let _ = writeln!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(chain.node),
            escape(&chain.mode()),
            escape(chain.pass1()),
            cell(chain.steps().0, 4),
            cell(chain.steps().1.filter(|_| chain.tilt.is_none()), 4),
            cell(chain.steps().2, 4),
            cell(chain.pass2().map(|s| s.alpha_high), 2),
            cell(chain.pass2().map(|s| s.entropy_thresh), 2),
            cell(audit.and_then(|a| a.mass()).map(|m| m.mass_mean), 4),
            cell(
                audit.and_then(|a| a.mass()).map(|m| m.normalised_sample_bpb),
                4,
            ),
        );
    }
    html.push_str("</table>\n");
    if !seed_rows.is_empty() {
        let seeds = &pipeline.seeds;
        html.push_str("<h2>Seeds</h2>\n<p>Each metric per run seed, with the mean and sample standard deviation (the <code>seeds</code> table).</p>\n<table>\n<tr><th>node</th><th>metric</th>");
        for seed in seeds {
            let _ = write!(html, "<th>{seed}</th>");
        }
        html.push_str("<th>mean</th><th>std</th></tr>\n");
        for group in seed_rows.chunk_by(|a, b| a.node == b.node && a.metric == b.metric) {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td>",
                escape(&group[0].node),
                escape(&group[0].metric)
            );
            for seed in seeds {
                let v = group
                    .iter()
                    .find(|r| r.seed == Some(*seed))
                    .and_then(|r| r.value);
                let _ = write!(html, "<td>{}</td>", cell(v, 6));
            }
            for kind in ["mean", "std"] {
                let v = group.iter().find(|r| r.kind == kind).and_then(|r| r.value);
                let _ = write!(html, "<td>{}</td>", cell(v, 6));
            }
            html.push_str("</tr>\n");
        }
        html.push_str("</table>\n");
    }
    for section in sections {
        let _ = writeln!(
            html,
            "<h2>{}</h2>\n<p>{}</p>",
            escape(section.title),
            escape(&section.intro)
        );
        if let Some(missing) = &section.missing {
            let _ = writeln!(html, "<p class=\"missing\">{}</p>", escape(missing));
        }
        html.push_str("<div class=\"row\">\n");
        for figure in &section.figures {
            let _ = write!(
                html,
                "<figure class=\"plot\" id=\"{}\">\n{}\n<figcaption>{}",
                escape(&figure.id),
                strip_xml_declaration(&figure.svg),
                escape(&figure.caption)
            );
            if let Some(query) = &figure.query {
                let _ = write!(
                    html,
                    "<details><summary>SQL</summary><pre>{}</pre></details>",
                    escape(query)
                );
            }
            html.push_str("</figcaption>\n</figure>\n");
        }
        html.push_str("</div>\n");
    }
    html.push_str("</body>\n</html>\n");
    html
}

/// Inline SVG in HTML takes no XML declaration.
fn strip_xml_declaration(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(start) => &svg[start..],
        None => svg,
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Writes the page next to its final name and renames it into place, so a reader never
/// sees half a report.
pub fn write(path: &Path, html: &str) -> Result<()> {
    let tmp = path.with_extension(format!("html.tmp-{}", std::process::id()));
    std::fs::write(&tmp, html).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))
}

const STYLE: &str = "
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; }
h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.meta, figcaption, .missing { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child, th:nth-child(2), td:nth-child(2) { text-align: left; }
.summary td:nth-child(3), .summary th:nth-child(3) { text-align: left; }
.row { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; width: min-content; }
figure svg { display: block; }
pre { white-space: pre-wrap; font-size: 0.85em; background: #f6f6f6; padding: 0.5em; }
";
