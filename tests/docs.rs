//! The documentation's transcripts are tests: every ```console block of README.md and
//! docs/*.md is run, in reading order, in a copy of the demo project (its first block
//! builds the demo store from scratch), and its output must be what the page shows.
//!
//! - `$ COMMAND` lines run with `sh -c` (stderr folded into stdout, `cachemoney` on the
//!   PATH); the lines after one, up to the next `$ `, are its expected output.
//! - Comparison is after a normaliser: durations (`2.48s`, `0.14 s`), timestamps and
//!   runs of spaces (so a longer duration may shift a column) are masked on both sides;
//!   an expected line may say `[..]` where the output is volatile by nature (a
//!   per-step timing table's values).
//! - A ```text block that shows a `$ cachemoney` command must say why it is not run,
//!   in an `<!-- unchecked: REASON -->` comment on the line above (a benchmark at 62M
//!   tokens; two more trainings for `--seeds`), so no transcript drifts unnoticed.
//! - `CACHEMONEY_BLESS=1 cargo test --release --test integration docs::` rewrites the
//!   expected outputs from a run (keeping `[..]` lines that still match).

use std::path::{Path, PathBuf};

use crate::common;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The pages, in the order a reader (and the demo's state) goes through them.
const PAGES: &[&str] = &[
    "README.md",
    "docs/commands.md",
    "docs/stages.md",
    "docs/gpt.md",
    "docs/scorers.md",
    "docs/steps.md",
    "docs/legality.md",
    "docs/store.md",
    "docs/remote.md",
    "docs/bad-input.md",
    "docs/benchmarks.md",
];

struct Block {
    /// Line index of the opening fence in the page.
    fence: usize,
    /// Line index of the closing fence.
    end: usize,
    commands: Vec<Command>,
}

struct Command {
    line: String,
    expected: Vec<String>,
}

fn console_blocks(lines: &[&str]) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_end() != "```console" {
            i += 1;
            continue;
        }
        let fence = i;
        let mut commands: Vec<Command> = Vec::new();
        i += 1;
        while i < lines.len() && lines[i].trim_end() != "```" {
            match lines[i].strip_prefix("$ ") {
                Some(command) => commands.push(Command {
                    line: command.to_string(),
                    expected: Vec::new(),
                }),
                None => commands
                    .last_mut()
                    .unwrap_or_else(|| panic!("line {}: output before any `$ ` command", i + 1))
                    .expected
                    .push(lines[i].to_string()),
            }
            i += 1;
        }
        blocks.push(Block {
            fence,
            end: i,
            commands,
        });
        i += 1;
    }
    blocks
}

/// ```text blocks that show a cachemoney command without saying why they are not run.
fn unexplained_text_transcripts(lines: &[&str]) -> Vec<usize> {
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let shows_command = lines
            .get(i + 1)
            .is_some_and(|next| next.starts_with("$ cachemoney"));
        if line.trim_end() == "```text" && shows_command {
            let explained = i > 0 && lines[i - 1].starts_with("<!-- unchecked:");
            if !explained {
                found.push(i + 1);
            }
        }
    }
    found
}

fn mask_durations(line: &str) -> String {
    // Durations and timestamps are measured, not computed: mask them.
    let mut out = String::with_capacity(line.len());
    let chars: Vec<char> = line.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let starts_number = chars[i].is_ascii_digit()
            && (i == 0 || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '_'));
        if starts_number {
            let mut j = i;
            while j < chars.len() && (chars[j].is_ascii_digit() || chars[j] == '.') {
                j += 1;
            }
            // A timestamp: 2026-11-24T09:09:06Z.
            let rest: String = chars[i..chars.len().min(i + 20)].iter().collect();
            if rest.len() == 20 && rest.as_bytes()[4] == b'-' && rest.ends_with('Z') {
                out.push_str("<time>");
                i += 20;
                continue;
            }
            // A transfer rate: 211 MB/s.
            let rest_of_line: String = chars[j..].iter().collect();
            if rest_of_line.starts_with(" MB/s") {
                out.push_str("<rate>");
                i = j + " MB/s".len();
                continue;
            }
            let mut k = j;
            if chars.get(k) == Some(&' ') && chars.get(k + 1) == Some(&'s') {
                k += 1;
            }
            let is_seconds = chars.get(k) == Some(&'s')
                && !chars
                    .get(k + 1)
                    .is_some_and(|c| c.is_alphanumeric() || *c == '_');
            if is_seconds {
                out.push_str("<secs>");
                i = k + 1;
                continue;
            }
            out.extend(&chars[i..j]);
            i = j;
            continue;
        }
        out.push(chars[i]);
        i += 1;
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn line_matches(expected: &str, actual: &str) -> bool {
    let (expected, actual) = (mask_durations(expected), mask_durations(actual));
    if !expected.contains("[..]") {
        return expected == actual;
    }
    let parts: Vec<&str> = expected.split("[..]").collect();
    let mut rest = actual.as_str();
    for (n, part) in parts.iter().enumerate() {
        if n == 0 {
            let Some(after) = rest.strip_prefix(part) else {
                return false;
            };
            rest = after;
        } else if n == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            let Some(at) = rest.find(part) else {
                return false;
            };
            rest = &rest[at + part.len()..];
        }
    }
    true
}

fn run_command(
    dir: &Path,
    bin_dir: &Path,
    env: &[(&'static str, String)],
    command: &str,
) -> Vec<String> {
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{command} 2>&1"))
        .current_dir(dir)
        .env("PATH", path)
        .envs(env.iter().cloned())
        .env_remove("CACHEMONEY_GPT_WORKER")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_end().to_string())
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[test]
fn every_transcript_in_the_docs_is_what_the_program_prints() {
    let root = repo_root();
    let bless = std::env::var_os("CACHEMONEY_BLESS").is_some();
    let demo = tempfile::tempdir().unwrap();
    std::fs::copy(
        root.join("pipeline.toml"),
        demo.path().join("pipeline.toml"),
    )
    .unwrap();
    copy_dir(&root.join("data"), &demo.path().join("data"));
    // The pipeline's scorers: the example scripts, run by the project's Python.
    for shared in ["examples", ".venv"] {
        std::os::unix::fs::symlink(root.join(shared), demo.path().join(shared)).unwrap();
    }
    let bin = assert_cmd::cargo::cargo_bin("cachemoney");
    let bin_dir = bin.parent().unwrap().to_path_buf();
    // The remote the pages push to and pull from: a real S3-compatible server on
    // loopback, found the way a reader's shell would (AWS_ENDPOINT and the keys).
    let server = common::s3::S3Server::start();
    let mut env = server.env();
    // The judges' secret fixed, so that the legality re-runs (and their hashes) in the
    // pages are the same on every machine (docs/legality.md, "The secret").
    env.push(("CACHEMONEY_SECRET", "the docs' transcripts".to_string()));

    let mut failures = Vec::new();
    let mut checked = 0;
    for page in PAGES {
        let path = root.join(page);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let lines: Vec<&str> = text.lines().collect();
        for line in unexplained_text_transcripts(&lines) {
            failures.push(format!(
                "{page}:{line}: a ```text block shows a cachemoney command; make it ```console (checked) or say why not with <!-- unchecked: REASON -->"
            ));
        }
        let mut rewritten: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        // Rewrite from the last block back, so earlier line numbers stay valid.
        let mut replacements = Vec::new();
        for block in console_blocks(&lines) {
            let mut body = Vec::new();
            for command in &block.commands {
                let actual = run_command(demo.path(), &bin_dir, &env, &command.line);
                checked += 1;
                let same = actual.len() == command.expected.len()
                    && actual
                        .iter()
                        .zip(&command.expected)
                        .all(|(a, e)| line_matches(e, a));
                if !same {
                    failures.push(format!(
                        "{page}:{}: `$ {}` printed:\n{}\n--- but the page shows:\n{}\n",
                        block.fence + 1,
                        command.line,
                        actual.join("\n"),
                        command.expected.join("\n")
                    ));
                }
                body.push(format!("$ {}", command.line));
                for (n, line) in actual.iter().enumerate() {
                    match command.expected.get(n) {
                        Some(e) if e.contains("[..]") && line_matches(e, line) => {
                            body.push(e.clone())
                        }
                        _ => body.push(line.clone()),
                    }
                }
            }
            replacements.push((block.fence + 1, block.end, body));
        }
        if bless {
            for (start, end, body) in replacements.into_iter().rev() {
                rewritten.splice(start..end, body);
            }
            let mut out = rewritten.join("\n");
            out.push('\n');
            std::fs::write(&path, out).unwrap();
        }
    }
    assert!(checked > 0, "no transcript was checked");
    if !bless {
        assert!(
            failures.is_empty(),
            "{} transcript(s) drifted (CACHEMONEY_BLESS=1 rewrites them):\n\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}

#[test]
fn the_normaliser_masks_measurements_only() {
    assert_eq!(
        mask_durations("tokens  tokenize  built   2.48s  content 58669ac7197a"),
        "tokens tokenize built <secs> content 58669ac7197a"
    );
    assert_eq!(
        mask_durations("built    2026-11-24T09:09:06Z in 234.31s on 2 thread(s)"),
        "built <time> in <secs> on 2 thread(s)"
    );
    assert_eq!(
        mask_durations("wrote it in 0.14 s; 3 seeds"),
        "wrote it in <secs>; 3 seeds"
    );
    assert_eq!(
        mask_durations("176.4 MB in 0.81s (218 MB/s)"),
        "176.4 MB in <secs> (<rate>)"
    );
    assert_eq!(
        mask_durations("val BPB 2.1619, 1200 steps"),
        "val BPB 2.1619, 1200 steps"
    );
    assert!(line_matches("| 1 | [..] |", "| 1    | 0.270383581 |"));
    assert!(!line_matches("| 1 | [..] |", "| 2 | 0.27 |"));
}
