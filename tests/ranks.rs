//! The record's per-rank calibration (`calibrate`'s `ranks`, algorithm.md §4.1 and §8),
//! through the real binary, against an independent computation in this file.
//!
//! pass 1 is a table imported in the record's window order, with values chosen so the
//! two ranks want different blends: on rank 0 the model is nearly always wrong (the caches
//! should dominate: the largest alpha_high), on rank 1 nearly always right (the caches
//! should be trusted least).

use crate::common;

use common::{write_pass1_table, Project};

const WINDOW_LEN: usize = 128;
const STRIDE: usize = 16;
const ALPHA_HIGH: [f64; 6] = [0.85, 0.90, 0.93, 0.95, 0.97, 0.99];
const ENTROPY_THRESH: [f64; 5] = [3.0, 3.5, 4.0, 4.5, 5.0];

fn pipeline(ranks: usize) -> String {
    Project::small_pipeline(300)
        + r#"
[nodes.pass1]
stage = "pass1"
inputs.tokens = "tokens"
params.model = "import"
files.table = "pass1.parquet"
"#
        + &Project::cache_chain(32768).replace(
            "stage = \"calibrate\"\n",
            &format!(
                "stage = \"calibrate\"\nparams.ranks = {ranks}\nparams.window_len = {WINDOW_LEN}\nparams.stride = {STRIDE}\n"
            ),
        )
}

/// The record's window order (§4.1), written independently of the product's code.
fn window_positions(targets: usize) -> Vec<Vec<usize>> {
    (0..targets)
        .step_by(STRIDE)
        .map(|start| {
            let len = (start + WINDOW_LEN).min(targets) - start;
            let first = if start == 0 {
                0
            } else {
                len.saturating_sub(STRIDE)
            };
            (start + first + 1..=start + len).collect()
        })
        .collect()
}

struct Row {
    position: usize,
    model_p: f32,
    entropy: f32,
}

/// Entries at these positions, every one with the same probability and entropy: where
/// only the layout of pass 1 is under test.
fn flat_rows(positions: impl IntoIterator<Item = usize>) -> Vec<Row> {
    positions
        .into_iter()
        .map(|position| Row {
            position,
            model_p: 0.5,
            entropy: 1.0,
        })
        .collect()
}

fn write_pass1(p: &Project, rows: &[Row]) {
    write_pass1_table(
        &p.path().join("pass1.parquet"),
        rows.iter().map(|r| r.position as i64).collect(),
        rows.iter().map(|r| r.model_p).collect(),
        rows.iter().map(|r| r.entropy).collect(),
    );
}

/// One position's matches, as the `matches` table has them.
#[derive(Clone, Copy)]
struct Matches {
    ngram_order: u32,
    ngram_q: f64,
    phrase_length: u32,
    phrase_q: f64,
}

fn q(context: f64, full: f64) -> f64 {
    (full.min(context) / context.max(1.0)).clamp(0.0, 1.0)
}

/// −ln p_final for one entry under (alpha_high, entropy_thresh): §5.2, §6, §7 as written.
fn nll(row: &Row, m: &Matches, alpha_high: f64, entropy_thresh: f64) -> f64 {
    let h = row.entropy as f64;
    let mut p = row.model_p as f64;
    if m.ngram_order > 0 {
        let o = (m.ngram_order as f64 - 2.0) / 14.0;
        let (hi, lo) = (entropy_thresh + 1.0, (entropy_thresh - 2.0).max(1.5));
        let sigma = 1.0 / (1.0 + (-2.0 * (h - (hi - o * (hi - lo)))).exp());
        let a = ((0.05 + (alpha_high - 0.05) * sigma) * (0.3 + 1.7 * o)).clamp(0.0, 0.99);
        p = (1.0 - a) * p + a * m.ngram_q;
    }
    if m.phrase_length > 0 {
        let len_factor = 0.90 + 0.09 * (m.phrase_length as f64 - 16.0) / 48.0;
        let ent = 1.0 / (1.0 + (-2.0 * (h - 2.5)).exp());
        let b = (len_factor * (0.5 + 0.5 * ent)).clamp(0.0, 0.99);
        p = (1.0 - b) * p + b * m.phrase_q;
    }
    -p.max(1e-12).ln()
}

/// §8 on one rank's rows: objectives in loop order and the first strict minimum.
fn calibrate(rows: &[Row], matches: &[Matches]) -> (Vec<f64>, (f64, f64)) {
    let n = ((0.05 * rows.len() as f64).floor() as usize)
        .max(1000)
        .min(rows.len());
    let mut objectives = Vec::new();
    let mut best = (f64::INFINITY, (0.0, 0.0));
    for a in ALPHA_HIGH {
        for t in ENTROPY_THRESH {
            let objective = rows[..n]
                .iter()
                .map(|r| nll(r, &matches[r.position], a, t))
                .sum::<f64>()
                / n as f64;
            if objective < best.0 {
                best = (objective, (a, t));
            }
            objectives.push(objective);
        }
    }
    (objectives, best.1)
}

fn csv_rows(p: &Project, query: &str) -> Vec<Vec<f64>> {
    p.sql(query)
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(|v| v.parse::<f64>().unwrap()).collect())
        .collect()
}

#[test]
fn two_ranks_calibrate_on_their_own_prefixes_and_pass2_scores_each_with_its_pair() {
    let p = Project::small();
    p.ok(&["run"]); // the val tokens, to lay pass 1 out over
    let targets = csv_rows(&p, "SELECT count(*) - 1 FROM val")[0][0] as usize;
    let windows = window_positions(targets);
    let mut rows = Vec::new();
    for (w, positions) in windows.iter().enumerate() {
        let wrong = w < windows.len() / 2; // rank 0's windows
        for &position in positions {
            let i = rows.len();
            rows.push(Row {
                position,
                model_p: if wrong { 0.002 } else { 0.97 },
                entropy: (i % 61) as f32 / 10.0,
            });
        }
    }
    write_pass1(&p, &rows);
    p.write_pipeline(&pipeline(2));
    p.ok(&["run"]);

    let matches: Vec<Matches> = csv_rows(
        &p,
        "SELECT ngram_order, ngram_context, ngram_full, phrase_length, phrase_context, phrase_full FROM matches ORDER BY position",
    )
    .iter()
    .map(|r| Matches {
        ngram_order: r[0] as u32,
        ngram_q: q(r[1], r[2]),
        phrase_length: r[3] as u32,
        phrase_q: q(r[4], r[5]),
    })
    .collect();
    let rank_windows = windows.len() / 2;
    let split: usize = windows[..rank_windows].iter().map(Vec::len).sum();
    let slices = [&rows[..split], &rows[split..]];

    let grid = csv_rows(
        &p,
        "SELECT rank, alpha_high, entropy_thresh, objective_nats, CAST(chosen AS INT) FROM grid",
    );
    assert_eq!(grid.len(), 60);
    let mut pairs = Vec::new();
    for (rank, slice) in slices.iter().enumerate() {
        let (objectives, pair) = calibrate(slice, &matches);
        let ours: Vec<&Vec<f64>> = grid.iter().filter(|g| g[0] == rank as f64).collect();
        for (g, expected) in ours.iter().zip(&objectives) {
            assert!(
                ((g[3] - expected) / expected).abs() < 1e-6,
                "rank {rank} ({}, {}): {} vs {expected}",
                g[1],
                g[2],
                g[3]
            );
        }
        let chosen: Vec<(f64, f64)> = ours
            .iter()
            .filter(|g| g[4] == 1.0)
            .map(|g| (g[1], g[2]))
            .collect();
        assert_eq!(chosen, vec![pair], "rank {rank}");
        pairs.push(pair);
    }
    // The case is only a test if the ranks disagree.
    assert_ne!(pairs[0], pairs[1]);

    // pass 2: every entry with its own rank's pair, the sums combined over ranks.
    let bytes: Vec<f64> = csv_rows(&p, "SELECT bytes FROM val ORDER BY position")
        .iter()
        .map(|r| r[0])
        .collect();
    let (mut total_nll, mut total_bytes) = (0.0, 0.0);
    for (slice, (a, t)) in slices.iter().zip(&pairs) {
        for r in slice.iter() {
            total_nll += nll(r, &matches[r.position], *a, *t);
            total_bytes += bytes[r.position];
        }
    }
    let expected_bpb = total_nll / std::f64::consts::LN_2 / total_bytes;
    let final_bpb = csv_rows(&p, "SELECT sum(bits) / sum(bytes) FROM scores")[0][0];
    assert!(
        ((final_bpb - expected_bpb) / expected_bpb).abs() < 1e-6,
        "{final_bpb} vs {expected_bpb}"
    );

    // One rank is one global calibration: rank 0's pair is not the global one here.
    p.write_pipeline(&pipeline(1));
    p.ok(&["run"]);
    let global = csv_rows(
        &p,
        "SELECT rank, alpha_high, entropy_thresh FROM grid WHERE chosen",
    );
    let (_, pair) = calibrate(&rows, &matches);
    assert_eq!(global, vec![vec![0.0, pair.0, pair.1]]);
}

#[test]
fn ranks_refuse_a_pass1_that_is_not_in_the_record_window_order() {
    let p = Project::small();
    p.ok(&["run"]); // the val tokens, to lay pass 1 out over
    let targets = csv_rows(&p, "SELECT count(*) - 1 FROM val")[0][0] as usize;
    // Every target once, in order, and the last one again: neither the record's windows
    // (which score their last 16 targets again) nor every target once.
    let rows = flat_rows((1..=targets).chain([targets]));
    write_pass1(&p, &rows);
    p.write_pipeline(&pipeline(2));
    p.ok(&["run", "--until", "cache"]);
    p.ok(&["run", "--until", "pass1"]);
    let before = p.store_snapshot();
    let line = p.fails(&["run"]);
    assert!(
        line.contains("pass1.parquet")
            && line.contains("ranks = 2 splits pass 1 by its windows (window_len 128, stride 16)"),
        "{line}"
    );
    assert_eq!(before, p.store_snapshot());
    // Right count, wrong order: the same entries with two rows swapped.
    let mut rows = flat_rows(window_positions(targets).into_iter().flatten());
    rows.swap(3000, 3001);
    write_pass1(&p, &rows);
    let line = p.fails(&["run"]);
    assert!(line.contains("at row 3000, but pass 1 has"), "{line}");
}

/// More ranks than pass 1 has windows: a rank would have no entries to calibrate on (the
/// record's code fails there), so the node is refused at the parameter's line.
#[test]
fn more_ranks_than_windows_are_refused_at_the_parameters_line() {
    let p = Project::small();
    p.ok(&["run"]);
    let targets = csv_rows(&p, "SELECT count(*) - 1 FROM val")[0][0] as usize;
    // Windows as long as their stride score every target once: three windows here.
    let window = targets.div_ceil(3);
    let rows = flat_rows(1..=targets);
    write_pass1(&p, &rows);
    let pipeline = pipeline(4).replace(
        &format!("params.window_len = {WINDOW_LEN}\nparams.stride = {STRIDE}\n"),
        &format!("params.window_len = {window}\nparams.stride = {window}\n"),
    );
    p.write_pipeline(&pipeline);
    p.ok(&["run", "--until", "cache"]);
    p.ok(&["run", "--until", "pass1"]);
    let before = p.store_snapshot();
    let line = p.fails(&["run"]);
    let at = pipeline
        .lines()
        .position(|l| l.starts_with("params.ranks = 4"))
        .unwrap()
        + 1;
    assert!(
        line.contains(&format!("pipeline.toml:{at}:"))
            && line.contains("params.ranks")
            && line.contains("4 ranks but pass 1 has 3 windows")
            && line.contains("nothing to calibrate on"),
        "{line}"
    );
    assert_eq!(before, p.store_snapshot());
    // Three ranks, one window each, calibrate.
    p.write_pipeline(&pipeline.replace("params.ranks = 4", "params.ranks = 3"));
    p.ok(&["run"]);
}
