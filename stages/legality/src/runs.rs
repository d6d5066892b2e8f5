//! A chain's runs, as the probes read them: the original and each re-run, their last
//! table and their model's pass-1, read lazily (at 62M entries a run's columns hold
//! gigabytes).

use std::borrow::Cow;
use std::cell::OnceCell;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use arrow::datatypes::{Float32Type, Float64Type, Int64Type, UInt8Type};
use stage_api::{read_column, read_column_rows, InputArtifact, StageError};

use crate::perturb::Perturbed;
use crate::probes;

/// One run of the chain: its last table, and the model's own pass-1 (the same table for
/// a pass-1 chain) with the distributions the model kept.
pub(crate) struct Run {
    pub(crate) label: String,
    pub(crate) end: Table,
    /// A cache chain's pass-1; none for a pass-1 chain, whose end is its model.
    pub(crate) own_model: Option<Table>,
    pub(crate) end_is_model: bool,
    /// The model's pass-1 artifact, for what its sandbox reported (a tilt chain's: the
    /// pass-1 it tilts).
    pub(crate) model_dir: PathBuf,
}

impl Run {
    pub(crate) fn read(
        label: &str,
        end: &InputArtifact,
        model: Option<&InputArtifact>,
    ) -> Result<Run, StageError> {
        let end_table = Table::read(end)?;
        let end_is_model = end_table.distributions.is_some();
        let (own_model, model_dir) =
            match (end_is_model, model) {
                // A tilt chain's end is a model over a model: the scorer that may need
                // confining is the pass-1's under it, when one is wired.
                (true, model) => (None, model.unwrap_or(end).dir.clone()),
                (false, Some(model)) => {
                    let table = Table::read(model)?;
                    if table.distributions.is_none() {
                        return Err(StageError::input(
                            &table.table,
                            "input 'pass1' is not a pass-1 artifact",
                        ));
                    }
                    (Some(table), model.dir.clone())
                }
                (false, None) => return Err(StageError::input(
                    &end.dir,
                    "a cache chain's judge needs its pass-1 (input 'pass1'): the pipeline wires it",
                )),
            };
        Ok(Run {
            label: label.to_string(),
            end: end_table,
            own_model,
            end_is_model,
            model_dir,
        })
    }

    /// The model's own pass-1 table.
    pub(crate) fn model(&self) -> &Table {
        self.own_model.as_ref().unwrap_or(&self.end)
    }

    pub(crate) fn distributions(&self) -> &[(i64, Vec<f32>)] {
        self.model().distributions.as_deref().unwrap_or(&[])
    }

    pub(crate) fn distribution_at(&self, position: i64) -> Option<&[f32]> {
        let d = self.distributions();
        let i = d.binary_search_by_key(&position, |(p, _)| *p).ok()?;
        Some(&d[i].1)
    }
}

/// A re-run: where its artifacts are and the stream it was run on. Its tables are read
/// once, by the first probe that asks (their positions are held compactly: at 62M
/// entries a listed run's positions alone are half a gigabyte).
pub(crate) struct Rerun<'a> {
    pub(crate) label: String,
    pub(crate) end: &'a InputArtifact,
    pub(crate) model: Option<&'a InputArtifact>,
    pub(crate) perturbed: Perturbed,
    pub(crate) run: OnceCell<Run>,
}

impl Rerun<'_> {
    pub(crate) fn read(&self) -> Result<&Run, StageError> {
        if let Some(run) = self.run.get() {
            return Ok(run);
        }
        let run = Run::read(&self.label, self.end, self.model)?;
        Ok(self.run.get_or_init(|| run))
    }
}

/// Which position each row of a table scores. A scorer that scores each target once, in
/// order, writes rows `first, first + 1, …`: kept as that range, not as a vector.
pub(crate) enum Positions {
    Contiguous { first: i64, len: usize },
    Listed(Vec<i64>),
}

impl Positions {
    fn new(listed: Vec<i64>) -> Positions {
        match listed.first() {
            Some(&first) if listed.iter().zip(first..).all(|(&p, q)| p == q) => {
                Positions::Contiguous {
                    first,
                    len: listed.len(),
                }
            }
            _ => Positions::Listed(listed),
        }
    }

    /// The positions as a slice (built for a contiguous table).
    pub(crate) fn to_slice(&self) -> Cow<'_, [i64]> {
        match self {
            Positions::Contiguous { first, len } => {
                Cow::Owned((*first..*first + *len as i64).collect())
            }
            Positions::Listed(v) => Cow::Borrowed(v),
        }
    }

    /// How many leading rows score positions at or before `cut`, for a contiguous table.
    fn rows_through(&self, cut: i64) -> Option<usize> {
        match self {
            Positions::Contiguous { first, len } => {
                Some((cut - first + 1).clamp(0, *len as i64) as usize)
            }
            Positions::Listed(_) => None,
        }
    }
}

/// A chain's table: a pass2 node's `scores`, or a pass-1 node's `pass1` and its kept
/// distributions. Columns are read when compared, one at a time (at 62M entries each
/// holds gigabytes), and only the rows a probe needs where it needs few.
pub(crate) struct Table {
    pub(crate) table: PathBuf,
    pub(crate) positions: Positions,
    /// Set for a pass-1 table.
    pub(crate) distributions: Option<Vec<(i64, Vec<f32>)>>,
}

impl Table {
    pub(crate) fn read(input: &InputArtifact) -> Result<Table, StageError> {
        let scores = input.file("scores.parquet");
        let pass1 = input.file("pass1.parquet");
        let (table, distributions) = if scores.exists() {
            (scores, None)
        } else if pass1.exists() {
            (
                pass1,
                Some(read_distributions(&input.file("distributions.parquet"))?),
            )
        } else {
            return Err(StageError::input(
                &input.dir,
                "neither scores.parquet nor pass1.parquet: inputs.chain must be a pass2 or a pass1 node",
            ));
        };
        Ok(Table {
            positions: Positions::new(read_column::<Int64Type>(&table, "position")?),
            table,
            distributions,
        })
    }

    /// The columns a legal chain cannot change before a cut.
    pub(crate) fn compared_columns(&self) -> &'static [&'static str] {
        match self.distributions {
            Some(_) => &["model_p", "entropy"],
            None => &["model_p", "p_ngram", "p_final", "bits"],
        }
    }

    /// The probability the chain scored its target with.
    pub(crate) fn scored_column(&self) -> &'static str {
        match self.distributions {
            Some(_) => "model_p",
            None => "p_final",
        }
    }

    pub(crate) fn column(&self, name: &str) -> Result<Vec<f64>, StageError> {
        self.column_rows(name, 0..usize::MAX)
    }

    /// Rows `rows` (clipped to the table) of a column, as f64.
    pub(crate) fn column_rows(
        &self,
        name: &str,
        rows: Range<usize>,
    ) -> Result<Vec<f64>, StageError> {
        match (name, &self.distributions) {
            ("model_p" | "entropy", _) => {
                Ok(read_column_rows::<Float32Type>(&self.table, name, rows)?
                    .into_iter()
                    .map(f64::from)
                    .collect())
            }
            // A pass-1 chain's bits are its model's.
            ("bits", Some(_)) => Ok(self
                .column_rows("model_p", rows)?
                .into_iter()
                .map(|p| -libm::log2(p))
                .collect()),
            // A pass2 table's are derived from its final probability, not stored.
            ("bits", None) => Ok(self
                .column_rows("p_final", rows)?
                .into_iter()
                .map(stage_api::scores::bits)
                .collect()),
            _ => read_column_rows::<Float64Type>(&self.table, name, rows),
        }
    }

    /// A column's values at a few rows: each read alone when they are few, picked from
    /// the whole column when they are many (every page would be decoded anyway).
    pub(crate) fn values_at(&self, name: &str, rows: &[usize]) -> Result<Vec<f64>, StageError> {
        if rows.len() <= 64 {
            let mut values = Vec::with_capacity(rows.len());
            for &row in rows {
                let value = self.column_rows(name, row..row + 1)?;
                values.push(*value.first().ok_or_else(|| {
                    StageError::input(&self.table, format!("no row {row} in column '{name}'"))
                })?);
            }
            return Ok(values);
        }
        // A stored float32 column is picked from before widening (the whole column as
        // f64 would be half a gigabyte at 62M).
        if matches!(name, "model_p" | "entropy") {
            let whole = read_column::<Float32Type>(&self.table, name)?;
            return Ok(rows.iter().map(|&row| f64::from(whole[row])).collect());
        }
        let whole = self.column(name)?;
        Ok(rows.iter().map(|&row| whole[row]).collect())
    }

    pub(crate) fn bytes(&self) -> Result<Vec<u8>, StageError> {
        read_column::<UInt8Type>(&self.table, "bytes")
    }

    /// The row of each wanted position's first entry: by arithmetic for a contiguous
    /// table, else in one pass over the positions with a bitmap of the wanted ones (a
    /// hash lookup per entry cost seconds at 62M).
    pub(crate) fn first_rows(&self, wanted: impl IntoIterator<Item = i64>) -> HashMap<i64, usize> {
        let wanted: Vec<i64> = wanted.into_iter().collect();
        match &self.positions {
            Positions::Contiguous { first, len } => wanted
                .into_iter()
                .filter(|p| (*first..*first + *len as i64).contains(p))
                .map(|p| (p, (p - first) as usize))
                .collect(),
            Positions::Listed(positions) => {
                let bound = wanted
                    .iter()
                    .copied()
                    .max()
                    .map_or(0, |m| m.max(0) as usize + 1);
                let mut marked = vec![false; bound];
                for &p in wanted.iter().filter(|&&p| p >= 0) {
                    marked[p as usize] = true;
                }
                let mut first = HashMap::with_capacity(wanted.len());
                for (row, &p) in positions.iter().enumerate() {
                    if p >= 0 && (p as usize) < bound && marked[p as usize] {
                        first.entry(p).or_insert(row);
                    }
                }
                first
            }
        }
    }
}

/// A pass-1's kept distributions; none where it kept none.
pub(crate) fn read_distributions(path: &Path) -> Result<Vec<(i64, Vec<f32>)>, StageError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    stage_api::read_distributions(path)
}

/// The first difference, at or before `cut`, between two tables' compared columns:
/// (its row, the finding's pieces). Two contiguous tables are compared over the rows
/// before the cut only.
pub(crate) fn first_difference(
    a: &Table,
    b: &Table,
    cut: i64,
    checked: &mut u64,
) -> Result<Option<probes::Difference>, StageError> {
    // Two contiguous tables from the same first position: the rows before the cut, in
    // each, and that first position.
    let prefix = match (&a.positions, &b.positions) {
        (
            Positions::Contiguous { first, len: la },
            Positions::Contiguous { first: fb, len: lb },
        ) if first == fb => {
            let through = |len: &usize| (cut - first + 1).clamp(0, *len as i64) as usize;
            Some((through(la), through(lb), *first))
        }
        _ => None,
    };
    let mut earliest: Option<probes::Difference> = None;
    for &name in a.compared_columns() {
        let difference = match prefix {
            Some((rows_a, rows_b, first)) => {
                let rows = rows_a.min(rows_b);
                let (x, y) = (a.column_rows(name, 0..rows)?, b.column_rows(name, 0..rows)?);
                let differing = x
                    .iter()
                    .zip(&y)
                    .position(|(p, q)| p.to_bits() != q.to_bits());
                // Values compared up to and including the first difference.
                *checked += differing.map_or(rows, |row| row + 1) as u64;
                match (differing, rows_a == rows_b) {
                    (Some(row), _) => Some(probes::Difference {
                        row,
                        position: first + row as i64,
                        column: name.into(),
                        original: x[row],
                        perturbed: y[row],
                    }),
                    // One scored fewer entries before the cut than the other.
                    (None, false) => Some(probes::Difference {
                        row: rows,
                        position: first + rows as i64,
                        column: "position".into(),
                        original: if rows < rows_a {
                            (first + rows as i64) as f64
                        } else {
                            f64::NAN
                        },
                        perturbed: if rows < rows_b {
                            (first + rows as i64) as f64
                        } else {
                            f64::NAN
                        },
                    }),
                    (None, true) => None,
                }
            }
            None => {
                let (x, y) = (a.column(name)?, b.column(name)?);
                let (pa, pb) = (a.positions.to_slice(), b.positions.to_slice());
                let (difference, n) =
                    probes::first_prefix_difference(&pa, &pb, (name, &x, &y), cut);
                *checked += n;
                difference
            }
        };
        if let Some(d) = difference {
            if earliest.as_ref().is_none_or(|e| d.row < e.row) {
                earliest = Some(d);
            }
        }
    }
    Ok(earliest)
}

/// Whether the model scored everything after the cut exactly as in the original run:
/// then it never read the stream it was given (a frozen table), and its re-runs prove
/// nothing.
pub(crate) fn unchanged_after_cut(
    original: &Table,
    rerun: &Table,
    cut: i64,
) -> Result<bool, StageError> {
    if let (
        Positions::Contiguous { first: fa, len: la },
        Positions::Contiguous { first: fb, len: lb },
    ) = (&original.positions, &rerun.positions)
    {
        if (fa, la) != (fb, lb) {
            return Ok(false);
        }
        let after = original.positions.rows_through(cut + 1).unwrap_or(0);
        let (a, b) = (
            original.column_rows("model_p", after..*la)?,
            rerun.column_rows("model_p", after..*lb)?,
        );
        return Ok(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
    let (pa, pb) = (original.positions.to_slice(), rerun.positions.to_slice());
    if pa != pb {
        return Ok(false);
    }
    let (a, b) = (original.column("model_p")?, rerun.column("model_p")?);
    Ok(pa
        .iter()
        .enumerate()
        .filter(|(_, &p)| p > cut + 1)
        .all(|(row, _)| a[row].to_bits() == b[row].to_bits()))
}

/// The first difference (the earliest position) between two tables' `columns` at the
/// positions `selected` picks, matched by position: for a cut in declared orders, whose
/// kept targets are not a prefix of either table.
pub(crate) fn first_difference_at(
    a: &Table,
    b: &Table,
    selected: impl Fn(i64) -> bool,
    columns: &[&str],
    checked: &mut u64,
) -> Result<Option<probes::Difference>, StageError> {
    let (pa, pb) = (a.positions.to_slice(), b.positions.to_slice());
    let rows_a: Vec<usize> = (0..pa.len()).filter(|&r| selected(pa[r])).collect();
    let in_b = b.first_rows(rows_a.iter().map(|&r| pa[r]));
    let mut earliest: Option<probes::Difference> = None;
    let mut keep = |d: probes::Difference| {
        if earliest.as_ref().is_none_or(|e| d.position < e.position) {
            earliest = Some(d);
        }
    };
    let missing = |row: usize, position: i64, in_a: bool| probes::Difference {
        row,
        position,
        column: "position".into(),
        original: if in_a { position as f64 } else { f64::NAN },
        perturbed: if in_a { f64::NAN } else { position as f64 },
    };
    // Scored in one run and not the other.
    for &r in rows_a.iter().filter(|&&r| !in_b.contains_key(&pa[r])) {
        keep(missing(r, pa[r], true));
    }
    let in_a: HashSet<i64> = rows_a.iter().map(|&r| pa[r]).collect();
    for (r, &p) in pb.iter().enumerate() {
        if selected(p) && !in_a.contains(&p) {
            keep(missing(r, p, false));
        }
    }
    for &name in columns {
        let (x, y) = (a.column(name)?, b.column(name)?);
        for &r in &rows_a {
            let Some(&rb) = in_b.get(&pa[r]) else {
                continue;
            };
            *checked += 1;
            if x[r].to_bits() != y[rb].to_bits() {
                keep(probes::Difference {
                    row: r,
                    position: pa[r],
                    column: name.into(),
                    original: x[r],
                    perturbed: y[rb],
                });
                break;
            }
        }
    }
    Ok(earliest)
}
