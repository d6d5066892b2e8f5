//! The record's pass-1 evaluation windows (algorithm.md §4.1–§4.2) and how its 8 ranks
//! split them. Pass 1 produces entries in this order; calibration and pass 2 need the
//! same layout to reproduce the record's per-rank calibration, so it lives here, beside
//! the contract both sides share.

use std::ops::Range;

/// One window: inputs `tok[start .. start + len]`, targets `tok[start + 1 ..= start + len]`,
/// scored at local indices `first_scored .. len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: usize,
    pub len: usize,
    pub first_scored: usize,
}

impl Window {
    /// How many entries the window contributes to pass 1.
    pub fn entries(&self) -> usize {
        self.len - self.first_scored
    }

    /// The target positions it scores, in pass-1 order.
    pub fn positions(&self) -> Range<usize> {
        self.start + self.first_scored + 1..self.start + self.len + 1
    }
}

/// What the windows do at the end of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tail {
    /// Each target scored exactly once: a short tail window scores only what no window
    /// before it did, and a window with nothing new is dropped. The `coverage` probe's
    /// rule (docs/legality.md).
    #[default]
    Once,
    /// The record's §4.2 quirk: every short tail window kept, each re-scoring the last
    /// `stride` targets with less context. Reproduces the record's entries and its BPB.
    Record,
}

/// §4.1 for a stream with `targets` = len(val) − 1 targets: starts 0, stride, 2·stride, …
/// while below `targets`; the first window scores all of its targets, the others their
/// last `stride`; at the end, as `tail` says.
pub fn windows(targets: usize, n_ctx: usize, stride: usize, tail: Tail) -> Vec<Window> {
    let mut covered: usize = 0;
    (0..targets)
        .step_by(stride.max(1))
        .filter_map(|start| {
            let len = (start + n_ctx).min(targets) - start;
            let mut first_scored = if start == 0 {
                0
            } else {
                len.saturating_sub(stride)
            };
            if tail == Tail::Once {
                first_scored = first_scored.max(covered.saturating_sub(start));
                if first_scored >= len {
                    return None;
                }
            }
            covered = covered.max(start + len);
            Some(Window {
                start,
                len,
                first_scored,
            })
        })
        .collect()
}

/// The pass-1 rows of each of `ranks` ranks: rank r evaluates the contiguous windows
/// `[⌊W·r/ranks⌋, ⌊W·(r+1)/ranks⌋)` (the record's distributed evaluation), and pass 1
/// lists entries by window, so each rank's entries are one contiguous run of rows.
pub fn rank_rows(windows: &[Window], ranks: usize) -> Vec<Range<usize>> {
    let w = windows.len();
    let mut first_row = 0;
    (0..ranks)
        .map(|r| {
            let slice = &windows[w * r / ranks..w * (r + 1) / ranks];
            let rows = first_row..first_row + slice.iter().map(Window::entries).sum::<usize>();
            first_row = rows.end;
            rows
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_window_set_has_the_record_totals() {
        let targets = 62_021_632;
        let all = windows(targets, 2048, 64, Tail::Record);
        assert_eq!(all.len(), 969_088);
        let entries: usize = all.iter().map(Window::entries).sum();
        assert_eq!(entries, 62_023_616);
        // 31 short tail windows, each re-scoring the last 64 targets.
        let short: Vec<&Window> = all.iter().filter(|w| w.len < 2048).collect();
        assert_eq!(short.len(), 31);
        assert!(short.iter().all(|w| w.positions().start == targets - 63));
    }

    /// §4.2: 7,754,688 entries on rank 0 (the first window's 2048 included), 7,752,704 on
    /// ranks 1–7, and rank r ≥ 1 starts at position r·7,752,704 + 1985.
    #[test]
    fn the_record_ranks_have_the_record_sizes() {
        let all = windows(62_021_632, 2048, 64, Tail::Record);
        let rows = rank_rows(&all, 8);
        let sizes: Vec<usize> = rows.iter().map(|r| r.len()).collect();
        assert_eq!(sizes[0], 7_754_688);
        assert!(sizes[1..].iter().all(|&n| n == 7_752_704), "{sizes:?}");
        assert_eq!(rows[7].end, 62_023_616);
        for r in 1..8 {
            let first_window = all.len() * r / 8;
            assert_eq!(all[first_window].positions().start, r * 7_752_704 + 1985);
        }
        assert_eq!(rank_rows(&all, 1), vec![0..62_023_616]);
    }

    #[test]
    fn every_target_is_scored_once_or_only_the_tail_twice() {
        for (targets, n_ctx, stride) in [
            (1000, 128, 16),
            (1001, 128, 16),
            (50, 128, 16),
            (300, 64, 64),
            (62_021_632 / 64, 2048 / 64, 1),
        ] {
            for tail in [Tail::Once, Tail::Record] {
                let mut times = vec![0usize; targets + 1];
                let all = windows(targets, n_ctx, stride, tail);
                for w in &all {
                    assert!(w.entries() > 0);
                    for p in w.positions() {
                        times[p] += 1;
                    }
                }
                assert_eq!(times[0], 0);
                let case = format!("{targets} {n_ctx} {stride} {tail:?}");
                match tail {
                    Tail::Once => assert!(times[1..].iter().all(|&t| t == 1), "{case}"),
                    Tail::Record => {
                        assert!(times[1..].iter().all(|&t| t >= 1), "{case}");
                        let repeated = times.iter().position(|&t| t > 1).unwrap_or(targets + 1);
                        assert!(repeated + stride > targets || repeated > targets, "{case}");
                    }
                }
                // The two differ only at the tail: the same windows up to there.
                let record = windows(targets, n_ctx, stride, Tail::Record);
                let full = record
                    .iter()
                    .take_while(|w| w.len == n_ctx.min(targets))
                    .count();
                assert_eq!(
                    all[..full.min(all.len())],
                    record[..full.min(all.len())],
                    "{case}"
                );
            }
        }
    }
}
