//! A chain's runs, as the probes read them: the original and each re-run, their last
//! table and their model's pass-1, read lazily (at 62M entries a run's columns hold
//! gigabytes).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arrow::datatypes::{Float32Type, Float64Type, Int64Type, UInt8Type};
use stage_api::{read_column, InputArtifact, StageError};

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
    /// The model's pass-1 artifact, for what its sandbox reported.
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
                (true, _) => (None, end.dir.clone()),
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
/// by each probe in turn and dropped (at 62M entries a run's positions alone are half a
/// gigabyte).
pub(crate) struct Rerun<'a> {
    pub(crate) label: String,
    pub(crate) end: &'a InputArtifact,
    pub(crate) model: Option<&'a InputArtifact>,
    pub(crate) perturbed: Perturbed,
}

impl Rerun<'_> {
    pub(crate) fn read(&self) -> Result<Run, StageError> {
        Run::read(&self.label, self.end, self.model)
    }
}

/// A chain's table: a pass2 node's `scores`, or a pass-1 node's `pass1` and its kept
/// distributions. Columns are read when compared, one at a time (at 62M entries each
/// holds gigabytes).
pub(crate) struct Table {
    pub(crate) table: PathBuf,
    pub(crate) position: Vec<i64>,
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
            position: read_column::<Int64Type>(&table, "position")?,
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
        match (name, &self.distributions) {
            ("model_p" | "entropy", _) => Ok(read_column::<Float32Type>(&self.table, name)?
                .into_iter()
                .map(f64::from)
                .collect()),
            // A pass-1 chain's bits are its model's.
            ("bits", Some(_)) => Ok(self
                .column("model_p")?
                .into_iter()
                .map(|p| -libm::log2(p))
                .collect()),
            // A pass2 table's are derived from its final probability, not stored.
            ("bits", None) => Ok(self
                .column("p_final")?
                .into_iter()
                .map(stage_api::scores::bits)
                .collect()),
            _ => read_column::<Float64Type>(&self.table, name),
        }
    }

    pub(crate) fn bytes(&self) -> Result<Vec<u8>, StageError> {
        read_column::<UInt8Type>(&self.table, "bytes")
    }

    /// The row of each wanted position's first entry (one pass over the positions; a
    /// map of all 62M would cost seconds and gigabytes).
    pub(crate) fn first_rows(&self, wanted: impl IntoIterator<Item = i64>) -> HashMap<i64, usize> {
        let wanted: std::collections::HashSet<i64> = wanted.into_iter().collect();
        let mut first = HashMap::with_capacity(wanted.len());
        for (row, &p) in self.position.iter().enumerate() {
            if wanted.contains(&p) {
                first.entry(p).or_insert(row);
            }
        }
        first
    }
}

pub(crate) fn read_distributions(path: &Path) -> Result<Vec<(i64, Vec<f32>)>, StageError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let position = read_column::<Int64Type>(path, "position")?;
    let model_p = read_column::<Float32Type>(path, "model_p")?;
    let mut out: Vec<(i64, Vec<f32>)> = Vec::new();
    for (&p, &v) in position.iter().zip(&model_p) {
        match out.last_mut() {
            Some((last, probs)) if *last == p => probs.push(v),
            _ => out.push((p, vec![v])),
        }
    }
    Ok(out)
}

/// The first difference, at or before `cut`, between two tables' compared columns:
/// (its row, the finding's pieces).
pub(crate) fn first_difference(
    a: &Table,
    b: &Table,
    cut: i64,
    checked: &mut u64,
) -> Result<Option<probes::Difference>, StageError> {
    let mut earliest: Option<probes::Difference> = None;
    for &name in a.compared_columns() {
        let (x, y) = (a.column(name)?, b.column(name)?);
        let (difference, n) =
            probes::first_prefix_difference(&a.position, &b.position, (name, &x, &y), cut);
        *checked += n;
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
    let (a, b) = (original.column("model_p")?, rerun.column("model_p")?);
    if original.position != rerun.position {
        return Ok(false);
    }
    Ok(original
        .position
        .iter()
        .enumerate()
        .filter(|(_, &p)| p > cut + 1)
        .all(|(row, _)| a[row].to_bits() == b[row].to_bits()))
}
