//! What a stage declares about itself, before it runs: its kind and version, its inputs
//! and what it reads from each, the raw files it takes, and the tables and files it
//! produces.
//!
//! Like DataFusion's `TableProvider::schema()`, the declaration is the contract the rest
//! of the system plans against: the pipeline checks every wiring against it when
//! `pipeline.toml` is loaded (an input connected to a node that does not produce the
//! table it reads fails at the input's line, not minutes later in the middle of a run),
//! `cachemoney stages` prints it, and after every build the runner holds the stage's
//! output directory to it ([`StageSpec::check_outputs`]), so a declaration cannot drift
//! from what the code writes.

use std::fmt;
use std::fs::File;
use std::path::Path;

use parquet::arrow::arrow_reader::ArrowReaderMetadata;

use crate::FileRole;

mod columns;
use columns::column_text;
pub use columns::{arrow_schema, Column, ColumnType};

/// A stage's declaration. Build one with struct-update syntax from [`StageSpec::NONE`]:
///
/// ```
/// use cachemoney_stage_api::{Column, ColumnType::*, Input, Output, Read, StageSpec};
///
/// const SPEC: StageSpec = StageSpec {
///     kind: "token-stats",
///     version: 1,
///     summary: "token tables -> per-token counts",
///     inputs: &[Input::required("tokens", &[Read::table("vocab", &["id", "piece"])])],
///     outputs: &[Output::table("token_counts", &[Column::new("token", U16)])],
///     ..StageSpec::NONE
/// };
/// assert_eq!(SPEC.output_names(), vec!["token_counts"]);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct StageSpec {
    /// The name used in `pipeline.toml` (`stage = "tokenize"`).
    pub kind: &'static str,
    /// Bumped whenever the meaning of the outputs changes, so that old artifacts stop
    /// being reused. Refactors that keep the bytes identical keep the version.
    pub version: u32,
    /// One line for listings.
    pub summary: &'static str,
    /// Upstream artifacts, by input name, and what the stage reads from each.
    pub inputs: &'static [Input],
    /// Named groups of raw files (the `files` table of a node).
    pub files: &'static [FileRole],
    /// What the stage writes: tables (`NAME.parquet`, queryable as `NODE.NAME`) and
    /// other files.
    pub outputs: &'static [Output],
    /// The parameter that seeds this stage's randomness *as a run* (the record's `SEED`
    /// for training), which `cachemoney run --seeds` sets to each seed in turn. A seed
    /// that defines the data (a train/val split, a sample of positions) is not one: runs
    /// with different run seeds must be comparable on the same data.
    pub run_seed_param: Option<&'static str>,
    /// Numeric keys of the stage's report worth comparing across runs (a BPB, a
    /// calibrated parameter), in reading order.
    pub metrics: &'static [&'static str],
    /// A parameter that selects between parameter sets (`pass1`'s `model`), with its
    /// values and the default: each value has its own parameters and defaults.
    pub variants: Option<Variants>,
    /// Set by a stage that judges a chain by re-running it on perturbed data (the
    /// `legality` probes): the pipeline makes the copies, see [`Reruns`].
    pub reruns: Option<Reruns>,
}

impl StageSpec {
    /// The empty declaration, for struct-update syntax.
    pub const NONE: StageSpec = StageSpec {
        kind: "",
        version: 0,
        summary: "",
        inputs: &[],
        files: &[],
        outputs: &[],
        run_seed_param: None,
        metrics: &[],
        variants: None,
        reruns: None,
    };

    pub fn input(&self, name: &str) -> Option<&'static Input> {
        self.inputs.iter().find(|i| i.name == name)
    }

    pub fn output(&self, name: &str) -> Option<&'static Output> {
        self.outputs.iter().find(|o| o.name == name)
    }

    /// Whether each node declares what it writes (`command`, through
    /// `Stage::node_spec`): the stage's own declaration then lists no outputs.
    pub fn declared_per_node(&self) -> bool {
        self.outputs.is_empty()
    }

    pub fn output_names(&self) -> Vec<&'static str> {
        self.outputs.iter().map(|o| o.name).collect()
    }

    /// Why `read` cannot be satisfied by what this stage produces, if it cannot: the
    /// table or file is missing, or the table lacks a column.
    pub fn cannot_provide(&self, read: &Read) -> Option<String> {
        let Some(output) = self.output(read.name) else {
            return Some("not produced".into());
        };
        match (&read.what, &output.what) {
            (ReadKind::Table(columns), Produced::Table(produced)) => {
                let missing: Vec<&str> = columns
                    .iter()
                    .copied()
                    .filter(|c| !produced.iter().any(|p| p.name == *c))
                    .collect();
                if !missing.is_empty() {
                    return Some(format!("no column {}", missing.join(", ")));
                }
                let derived: Vec<&str> = columns
                    .iter()
                    .copied()
                    .filter(|c| produced.iter().any(|p| p.name == *c && !p.is_stored()))
                    .collect();
                (!derived.is_empty()).then(|| {
                    format!(
                        "column {} is derived in SQL, not stored: read what it is computed from",
                        derived.join(", ")
                    )
                })
            }
            (ReadKind::File, Produced::File { .. }) => None,
            (ReadKind::Table(_), Produced::File { .. }) => Some("a file, not a table".into()),
            (ReadKind::File, Produced::Table(_)) => Some("a table, not a file".into()),
        }
    }

    /// Holds a finished output directory to the declaration: every declared table is
    /// there with exactly the declared columns and types, every unconditional file is
    /// there, and nothing undeclared is. A failure is a bug in the stage, reported as one
    /// line naming the file.
    pub fn check_outputs(&self, dir: &Path) -> Result<(), String> {
        let mut expected = std::collections::BTreeSet::new();
        for output in self.outputs {
            let file_name = output.file_name();
            let path = dir.join(&file_name);
            expected.insert(file_name.clone());
            match &output.what {
                Produced::Table(_) if output.only_with.is_some() && !path.exists() => {}
                Produced::Table(columns) => {
                    let file = File::open(&path).map_err(|e| {
                        format!(
                            "stage '{}' declares table {} but wrote no {file_name} ({e})",
                            self.kind, output.name
                        )
                    })?;
                    let metadata = ArrowReaderMetadata::load(&file, Default::default())
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    let written: Vec<String> = metadata
                        .schema()
                        .fields()
                        .iter()
                        .map(|f| {
                            column_text(
                                f.name(),
                                &ColumnType::name_of(f.data_type()),
                                f.is_nullable(),
                            )
                        })
                        .collect();
                    let declared: Vec<String> = columns
                        .iter()
                        .filter(|c| c.is_stored())
                        .map(Column::to_string)
                        .collect();
                    if written != declared {
                        return Err(format!(
                            "{}: stage '{}' v{} declares {}({}) but wrote ({})",
                            path.display(),
                            self.kind,
                            self.version,
                            output.name,
                            declared.join(", "),
                            written.join(", ")
                        ));
                    }
                }
                Produced::File { conditional, .. } => {
                    if !conditional && !path.exists() {
                        return Err(format!(
                            "{}: stage '{}' declares this file but did not write it",
                            path.display(),
                            self.kind
                        ));
                    }
                }
            }
        }
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for entry in entries {
            let name = entry
                .map_err(|e| format!("{}: {e}", dir.display()))?
                .file_name()
                .to_string_lossy()
                .into_owned();
            if !expected.contains(&name) {
                return Err(format!(
                    "{}: stage '{}' wrote a file it does not declare",
                    dir.join(&name).display(),
                    self.kind
                ));
            }
        }
        Ok(())
    }
}

/// A selector parameter and its values (see [`StageSpec::variants`]).
#[derive(Debug, Clone, Copy)]
pub struct Variants {
    pub param: &'static str,
    pub values: &'static [&'static str],
    pub default: &'static str,
}

/// How a judging stage asks the pipeline for re-runs of a chain (see
/// [`StageSpec::reruns`]).
///
/// The chain is the node wired to `input` and every node upstream of it that produces
/// one of `members`; its source is the one upstream node, outside the chain, from which
/// members read `source_table`. For each entry of the list parameter `param`, the
/// pipeline adds a node of stage `stage` (parameters: that entry) reading the source,
/// and a copy of every member reading it instead (other inputs, such as a trained
/// model, stay shared), and wires the copy of the chain's end into the judging node as
/// input `wired_as[i]`. Content addressing caches the copies like any node.
#[derive(Debug, Clone, Copy)]
pub struct Reruns {
    pub input: &'static str,
    /// A string parameter of the judging node that, left empty, the pipeline sets to
    /// the chain's last node (a label for its rows).
    pub label_param: Option<&'static str>,
    pub members: &'static [&'static str],
    pub source_table: &'static str,
    pub param: &'static str,
    pub stage: &'static str,
    pub wired_as: &'static [&'static str],
    /// A string parameter of the judging node holding the judge's secret: left empty,
    /// the pipeline fills it with the store's (`$CACHEMONEY_SECRET`, else the store's
    /// own `.secret`), and every entry of `param` gets it as its `secret`. The runs are
    /// then built in an order drawn from it, each re-run copy beside its original.
    pub secret_param: Option<&'static str>,
    /// Parameters every entry of `param` takes from a member of the chain, unless the
    /// entry sets them: (the product the member produces, its parameter, the entry's
    /// parameter); 0 where the member has no such parameter.
    pub inherit: &'static [(&'static str, &'static str, &'static str)],
    /// Parameters of the chain's members mixed with the judge's secret, (the product the
    /// member produces, its parameter): a seed whose draws a scorer could otherwise
    /// compute from `pipeline.toml` (pass-1's `mass_seed`, which places the original
    /// run's distributions and with them the cuts) becomes as secret as the rest. Each
    /// node's is mixed once, before anything inherits it.
    pub secret_seeds: &'static [(&'static str, &'static str)],
    /// The member producing this product, and its copies, wired into the judging node
    /// too when it is not the chain's end: (product, the original's input, the copies'
    /// inputs in entry order).
    pub companion: Option<(&'static str, &'static str, &'static [&'static str])>,
    /// Products of the chain's originals that aim the re-runs: (the product, an input
    /// name). The original member producing it is wired as that input into every
    /// perturbing node and into the judging node (a tilt chain's hints on the original
    /// stream, which tell the perturbing stage where a hint fires). Absent from chains
    /// without such a member, so their re-runs are what they were.
    pub guides: &'static [(&'static str, &'static str)],
}

/// An upstream artifact a stage reads.
#[derive(Debug, Clone, Copy)]
pub struct Input {
    pub name: &'static str,
    /// Optional inputs are read only under some parameters (`pass1`'s `model` input,
    /// which only `model = "gpt"` reads).
    pub required: bool,
    /// The tables (with the columns it needs) and files it reads from the input.
    pub reads: &'static [Read],
    /// What the input is, for one whose reads depend on what it is wired to (a legality
    /// node's `chain`: a pass-1 node, or a pass2 node).
    pub help: Option<&'static str>,
    /// Wired by the pipeline when it adds a judge's re-runs, never in `pipeline.toml`
    /// (`stages` lists such inputs apart).
    pub by_pipeline: bool,
}

impl Input {
    pub const fn required(name: &'static str, reads: &'static [Read]) -> Input {
        Input {
            name,
            required: true,
            reads,
            help: None,
            by_pipeline: false,
        }
    }

    pub const fn optional(name: &'static str, reads: &'static [Read]) -> Input {
        Input {
            name,
            required: false,
            reads,
            help: None,
            by_pipeline: false,
        }
    }

    /// An optional input the pipeline wires for a judge's re-runs (see [`Reruns`]).
    pub const fn by_pipeline(name: &'static str, reads: &'static [Read]) -> Input {
        Input {
            by_pipeline: true,
            ..Input::optional(name, reads)
        }
    }

    /// This input, described (see [`Input::help`]).
    pub const fn described(self, help: &'static str) -> Input {
        Input {
            help: Some(help),
            ..self
        }
    }
}

/// One table (and the columns used) or one file read from an input.
#[derive(Debug, Clone, Copy)]
pub struct Read {
    pub name: &'static str,
    pub what: ReadKind,
}

#[derive(Debug, Clone, Copy)]
pub enum ReadKind {
    Table(&'static [&'static str]),
    File,
}

impl Read {
    pub const fn table(name: &'static str, columns: &'static [&'static str]) -> Read {
        Read {
            name,
            what: ReadKind::Table(columns),
        }
    }

    pub const fn file(name: &'static str) -> Read {
        Read {
            name,
            what: ReadKind::File,
        }
    }
}

impl Read {
    /// `pass1(position, model_p)` for a table, the name for a file.
    pub fn signature(&self) -> String {
        match self.what {
            ReadKind::Table(columns) => format!("{}({})", self.name, columns.join(", ")),
            ReadKind::File => self.name.to_string(),
        }
    }
}

impl fmt::Display for Read {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.what {
            ReadKind::Table(_) => "table",
            ReadKind::File => "file",
        };
        write!(f, "a {what} {}", self.signature())
    }
}

/// A table or a file a stage writes.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// The table's name (its file is `NAME.parquet`), or the file's name.
    pub name: &'static str,
    pub what: Produced,
    /// A table written only when this input is wired (`pass1`'s `hint_p`, with
    /// `inputs.hints`); a reader finds out at run time.
    pub only_with: Option<&'static str>,
    /// Not reproducible by nature (a log, wall-clock seconds per step): the runner records
    /// and verifies it but leaves it out of the content hash, so it neither breaks early
    /// cut-off nor fails `audit`. Every other output must be deterministic.
    pub volatile: bool,
}

#[derive(Debug, Clone, Copy)]
pub enum Produced {
    Table(&'static [Column]),
    File {
        help: &'static str,
        /// Written only under some parameters.
        conditional: bool,
    },
}

impl Output {
    pub const fn table(name: &'static str, columns: &'static [Column]) -> Output {
        Output {
            name,
            what: Produced::Table(columns),
            only_with: None,
            volatile: false,
        }
    }

    /// A table written only when `input` is wired.
    pub const fn table_with(
        name: &'static str,
        columns: &'static [Column],
        input: &'static str,
    ) -> Output {
        Output {
            name,
            what: Produced::Table(columns),
            only_with: Some(input),
            volatile: false,
        }
    }

    pub const fn file(name: &'static str, help: &'static str) -> Output {
        Output {
            name,
            what: Produced::File {
                help,
                conditional: false,
            },
            only_with: None,
            volatile: false,
        }
    }

    /// A file written only under some parameters (`help` says which).
    pub const fn file_if(name: &'static str, help: &'static str) -> Output {
        Output {
            name,
            what: Produced::File {
                help,
                conditional: true,
            },
            only_with: None,
            volatile: false,
        }
    }

    /// This output, volatile (see [`Output::volatile`]).
    pub const fn volatile(self) -> Output {
        Output {
            volatile: true,
            ..self
        }
    }

    /// Whether the file `name` an artifact holds is a declared volatile output.
    pub fn is_volatile_file(outputs: &[Output], name: &str) -> bool {
        outputs.iter().any(|o| o.volatile && o.file_name() == name)
    }

    pub fn file_name(&self) -> String {
        match self.what {
            Produced::Table(_) => format!("{}.parquet", self.name),
            Produced::File { .. } => self.name.to_string(),
        }
    }

    pub fn is_table(&self) -> bool {
        matches!(self.what, Produced::Table(_))
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.what {
            Produced::Table(columns) => {
                let columns: Vec<String> = columns.iter().map(Column::to_string).collect();
                write!(f, "{}({})", self.name, columns.join(", "))
            }
            Produced::File { help, .. } => write!(f, "{}: {help}", self.name),
        }
    }
}

#[cfg(test)]
mod tests;
