//! The contract between cachemoney's runner and its stages.
//!
//! A *stage* is a pure function from input artifacts, raw input files and parameters to a
//! directory of output files. This crate defines that function's shape (the [`Stage`]
//! trait), what a stage is handed when it runs ([`StageContext`]), and small helpers for
//! writing Arrow tables as Parquet the same way everywhere, so that equal data always
//! gives equal bytes.
//!
//! What this crate deliberately does not know: where artifacts live, how recipes are
//! hashed, locking, manifests. Those belong to the runner. A stage never sees a path
//! outside its own inputs and its (temporary) output directory, which is what makes the
//! runner free to cache, resume and audit it.

mod error;
pub mod order;
mod parquet_io;
pub mod products;
mod sample;
pub mod scores;
mod spec;
pub mod windows;

pub use error::StageError;
pub use parquet_io::{
    read_column, read_column_rows, read_distributions, read_parquet, table_rows, write_parquet,
    write_parquet_parallel, ParquetLayout, ParquetTable, ROW_GROUP_ROWS,
};
pub use products::Product;
pub use sample::sample_positions;
pub use spec::{
    arrow_schema, Column, ColumnType, Input, Output, Produced, Read, ReadKind, Reruns, StageSpec,
    Variants,
};

use std::collections::BTreeMap;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

/// A pipeline stage: a declaration ([`Stage::SPEC`]), typed parameters, and the work.
///
/// Implementations must be deterministic: the same inputs, files and parameters must
/// produce byte-identical outputs whatever the thread count. The runner relies on it for
/// caching ("early cut-off") and `audit` checks it. The runner holds stages as
/// [`AnyStage`], which every `Stage` is.
pub trait Stage: Send + Sync + 'static {
    /// The parameters: serde gives their names, types and defaults (`Default`), and
    /// [`StageParams::validate`] the bounds serde cannot say.
    type Params: StageParams;

    /// What the stage reads and writes; see [`StageSpec`].
    const SPEC: StageSpec;

    /// Checks, when the pipeline is loaded, what the declaration cannot say about a
    /// node's wiring: inputs or file roles that some parameters need and others refuse
    /// (`pass1`'s `inputs.model` is for `model = "gpt"` only). `inputs` and `files` are
    /// the names the node connects.
    fn check_wiring(
        _params: &Self::Params,
        _inputs: &[&str],
        _files: &[&str],
    ) -> Result<(), String> {
        Ok(())
    }

    /// Does the work. Outputs go into `ctx.out_dir`; the runner checks them against
    /// [`Stage::SPEC`] and hashes them afterwards.
    fn run(&self, ctx: &StageContext, params: Self::Params) -> Result<StageReport, StageError>;

    /// A line worth printing at the end of `run`, from this stage's stored report (say,
    /// the BPB waterfall). Most stages have none.
    fn headline(&self, _report: &serde_json::Map<String, Value>) -> Option<String> {
        None
    }

    /// Where a node's bytes depend on the machine that computes them (libtorch picks its
    /// kernels by processor), the kernels this machine would compute `params` with, as
    /// one line of text. The stage records what it did compute with in its report under
    /// [`NUMERICS_KEY`] (as a volatile entry: it describes the build), and the runner
    /// compares the two wherever it uses an artifact it did not just build (reused from
    /// another machine's store, pulled from a remote, audited), so that bytes from
    /// other kernels are said, never silent. Stages whose bytes are the same everywhere
    /// have none.
    fn numerics(_params: &Self::Params) -> Option<String> {
        None
    }

    /// For a stage whose inputs and outputs each node declares (`command`): the node's
    /// own declaration, from its parameters and the inputs it wires, which the pipeline
    /// then checks wiring against and the runner holds the outputs to, exactly as it
    /// does [`Stage::SPEC`] for every other stage. Most stages have none.
    fn node_spec(_params: &Self::Params, _inputs: &[&str]) -> Option<StageSpec> {
        None
    }
}

/// The report entry in which a stage records the kernels it computed with (see
/// [`Stage::numerics`]).
pub const NUMERICS_KEY: &str = "numerics";

/// A stage's parameters. Unknown parameters are an error (`#[serde(deny_unknown_fields)]`)
/// and missing ones take their defaults (`#[serde(default)]`).
pub trait StageParams: serde::Serialize + serde::de::DeserializeOwned + Default {
    /// Checks what types cannot: ranges, consistency between parameters. Errors should
    /// name their parameter ([`StageError::invalid_param`]) so the pipeline can point at
    /// its line.
    fn validate(&self) -> Result<(), StageError> {
        Ok(())
    }

    /// The parameters as the recipe records them, after [`StageParams::validate`]: a
    /// parameter that only one variant has, absent from the others' canonical form, is
    /// filled in here with its default for the variant that has it, so that changing
    /// that default changes the recipe.
    fn resolved(self) -> Self {
        self
    }
}

/// A [`Stage`] with its types erased, as the runner's registry holds it.
pub trait AnyStage: Send + Sync {
    fn spec(&self) -> &'static StageSpec;

    /// Validates the user's parameters and returns them in canonical form, with every
    /// default filled in. The canonical form is what goes into the recipe, so writing a
    /// default explicitly does not invalidate the cache.
    fn canonical_params(&self, raw: &Value) -> Result<Value, StageError>;

    /// See [`Stage::check_wiring`]; `params` are canonical.
    fn check_wiring(&self, params: &Value, inputs: &[&str], files: &[&str]) -> Result<(), String>;

    /// Runs the stage on canonical parameters.
    fn run(&self, ctx: &StageContext) -> Result<StageReport, StageError>;

    fn headline(&self, report: &serde_json::Map<String, Value>) -> Option<String>;

    /// See [`Stage::numerics`]; `params` are canonical.
    fn numerics(&self, params: &Value) -> Option<String>;

    /// The parameters' defaults, unvalidated: for listings, where a stage has a
    /// parameter that no default can fill (`command`'s program).
    fn default_params(&self) -> Value;

    /// The declaration a node of this stage is held to: [`Stage::node_spec`] where the
    /// stage has one (kept for the life of the process: a pipeline is loaded once and
    /// its nodes live as long), else [`Stage::SPEC`]. `params` are canonical.
    fn node_spec(&self, params: &Value, inputs: &[&str]) -> &'static StageSpec;
}

impl<S: Stage> AnyStage for S {
    fn spec(&self) -> &'static StageSpec {
        &S::SPEC
    }

    fn canonical_params(&self, raw: &Value) -> Result<Value, StageError> {
        let mut raw = if raw.is_null() {
            Value::Object(Default::default())
        } else {
            raw.clone()
        };
        if let (Some(variants), Some(object)) = (S::SPEC.variants, raw.as_object_mut()) {
            object
                .entry(variants.param)
                .or_insert_with(|| Value::from(variants.default));
        }
        let params: S::Params = parse_params(&raw).map_err(|e| explain_variant::<S>(&raw, e))?;
        params.validate()?;
        serde_json::to_value(params.resolved())
            .map_err(|e| StageError::InvalidParams(e.to_string()))
    }

    fn check_wiring(&self, params: &Value, inputs: &[&str], files: &[&str]) -> Result<(), String> {
        let params: S::Params =
            serde_json::from_value(params.clone()).map_err(|e| e.to_string())?;
        S::check_wiring(&params, inputs, files)
    }

    fn run(&self, ctx: &StageContext) -> Result<StageReport, StageError> {
        let params: S::Params = ctx.params_as()?;
        Stage::run(self, ctx, params)
    }

    fn headline(&self, report: &serde_json::Map<String, Value>) -> Option<String> {
        Stage::headline(self, report)
    }

    fn numerics(&self, params: &Value) -> Option<String> {
        let params: S::Params = serde_json::from_value(params.clone()).ok()?;
        S::numerics(&params)
    }

    fn default_params(&self) -> Value {
        serde_json::to_value(S::Params::default()).unwrap_or(Value::Null)
    }

    fn node_spec(&self, params: &Value, inputs: &[&str]) -> &'static StageSpec {
        serde_json::from_value::<S::Params>(params.clone())
            .ok()
            .and_then(|params| S::node_spec(&params, inputs))
            .map_or(&S::SPEC, |spec| Box::leak(Box::new(spec)))
    }
}

/// An unknown parameter that belongs to another variant (`stride` on `model = "bigram"`)
/// is told so, rather than listed against the variant's own parameters.
fn explain_variant<S: Stage>(raw: &Value, error: StageError) -> StageError {
    let (Some(variants), StageError::InvalidParam { param, message }) = (S::SPEC.variants, &error)
    else {
        return error;
    };
    if !message.starts_with("unknown field") {
        return error;
    }
    let chosen = raw
        .get(variants.param)
        .and_then(Value::as_str)
        .unwrap_or("");
    let owners: Vec<String> = variants
        .values
        .iter()
        .filter(|v| **v != chosen)
        .filter(|v| {
            let probe = serde_json::json!({ variants.param: v });
            parse_params::<S::Params>(&probe)
                .ok()
                .and_then(|p| serde_json::to_value(p).ok())
                .is_some_and(|c| c.get(param.as_str()).is_some())
        })
        .map(|v| format!("{} = \"{v}\"", variants.param))
        .collect();
    if owners.is_empty() {
        return error;
    }
    StageError::invalid_param(
        param.clone(),
        format!(
            "applies only to {} (this node has {} = \"{chosen}\")",
            owners.join(" or "),
            variants.param
        ),
    )
}

/// A named group of raw input files a stage accepts.
#[derive(Debug, Clone, Copy)]
pub struct FileRole {
    pub name: &'static str,
    pub required: bool,
    pub help: &'static str,
}

/// An upstream artifact as a stage sees it: a directory of files.
#[derive(Debug, Clone)]
pub struct InputArtifact {
    pub dir: PathBuf,
    pub content_hash: String,
}

impl InputArtifact {
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Everything a stage run is given.
pub struct StageContext {
    /// The node's name in the pipeline (for messages only; never affects outputs).
    pub node: String,
    /// Canonical parameters, as returned by [`AnyStage::canonical_params`].
    pub params: Value,
    /// Upstream artifacts by input name.
    pub inputs: BTreeMap<String, InputArtifact>,
    /// Raw files by role, each role's files sorted by path.
    pub files: BTreeMap<String, Vec<PathBuf>>,
    /// Empty directory the stage writes its outputs into.
    pub out_dir: PathBuf,
    /// The directory of `pipeline.toml`: where a user's command runs, so that the
    /// relative paths in its arguments mean what they mean in the pipeline file.
    pub work_dir: PathBuf,
    /// Whether progress bars may be drawn.
    pub show_progress: bool,
    /// Bytes the stage may plan to allocate (`--memory-limit`; by default what the
    /// machine has available). See [`StageContext::check_memory`].
    pub memory_limit: u64,
}

impl StageContext {
    pub fn input(&self, name: &str) -> Result<&InputArtifact, StageError> {
        self.inputs
            .get(name)
            .ok_or_else(|| self.error(format!("input '{name}' is not connected")))
    }

    /// An error about this node's parameters or wiring, found while running it.
    pub fn error(&self, message: impl Into<String>) -> StageError {
        StageError::Node {
            node: self.node.clone(),
            message: message.into(),
        }
    }

    pub fn files(&self, role: &str) -> &[PathBuf] {
        self.files.get(role).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn output(&self, name: &str) -> PathBuf {
        self.out_dir.join(name)
    }

    /// A progress bar that is hidden under `--quiet` or when stderr is not a terminal.
    pub fn progress(&self, len: u64, message: &str) -> ProgressBar {
        let bar = if self.show_progress {
            ProgressBar::new(len)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {msg:<28} [{bar:30}] {human_pos}/{human_len} ({eta})",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_message(format!("{}: {message}", self.node));
        bar
    }

    /// Refuses, before allocating, a plan whose estimated peak exceeds the memory limit:
    /// an allocation failure aborts the process without a word, and swapping or the OOM
    /// killer are no better. `what` names the big allocation and the parameters that
    /// size it.
    pub fn check_memory(&self, estimate_bytes: u64, what: &str) -> Result<(), StageError> {
        if estimate_bytes <= self.memory_limit {
            return Ok(());
        }
        Err(self.error(format!(
            "{what} need about {}, but only {} is available; lower those parameters, or raise --memory-limit if the estimate is wrong",
            human_bytes(estimate_bytes),
            human_bytes(self.memory_limit)
        )))
    }

    /// Parameters as a concrete type; call after [`AnyStage::canonical_params`].
    pub fn params_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, StageError> {
        serde_json::from_value(self.params.clone()).map_err(|e| self.error(e.to_string()))
    }
}

/// What a stage tells the runner beyond its files: figures worth keeping in the manifest
/// (row counts, a BPB, the seed it used). Must be deterministic: it is part of what
/// `audit` compares. Its entries come only from typed structs ([`StageReport::with_fields`]),
/// so that whoever reads them back ([`report_fields`]) reads the same type.
#[derive(Debug, Default, Clone)]
pub struct StageReport {
    pub summary: serde_json::Map<String, Value>,
    /// Wall-clock seconds per phase, in the order they ran. Kept apart from `summary`
    /// because timings are never reproducible.
    pub phase_seconds: Vec<(String, f64)>,
    /// Report entries that describe the build rather than the recipe's inputs (the size
    /// of the code that ran, counted against the record's artifact budget): recorded like
    /// any entry, but `audit` does not hold a rebuild by newer code to them.
    pub volatile_keys: Vec<String>,
}

/// Reads a typed report (one added with [`StageReport::with_fields`]) back from a
/// manifest's report, without copying it; none when the report is another stage's.
pub fn report_fields<T: serde::de::DeserializeOwned>(
    report: &serde_json::Map<String, Value>,
) -> Option<T> {
    T::deserialize(report).ok()
}

/// A typed report's fields as report entries.
fn entries_of<T: serde::Serialize>(fields: &T) -> serde_json::Map<String, Value> {
    match serde_json::to_value(fields) {
        Ok(Value::Object(map)) => map,
        _ => panic!("a typed report serialises to an object"),
    }
}

impl StageReport {
    /// Adds every field of a typed report (a struct that serialises to an object), so
    /// that a stage's report has a type its readers can deserialise, not only keys.
    pub fn with_fields<T: serde::Serialize>(mut self, fields: &T) -> Self {
        self.summary.extend(entries_of(fields));
        self
    }

    /// Like [`StageReport::with_fields`], for fields that describe the build (see
    /// [`StageReport::volatile_keys`]).
    pub fn with_volatile_fields<T: serde::Serialize>(mut self, fields: &T) -> Self {
        let entries = entries_of(fields);
        self.volatile_keys.extend(entries.keys().cloned());
        self.summary.extend(entries);
        self
    }

    /// Records how long `phase` took since `started`.
    pub fn phase(&mut self, phase: &str, started: std::time::Instant) {
        self.phase_seconds
            .push((phase.to_string(), started.elapsed().as_secs_f64()));
    }
}

/// `raw` as `T`, errors naming the parameter they are about. A value of the wrong type is
/// reported with the parameter's path (`params.seed: invalid type: …`).
pub fn parse_params<T: serde::de::DeserializeOwned>(raw: &Value) -> Result<T, StageError> {
    let none = Value::Object(Default::default());
    let raw = if raw.is_null() { &none } else { raw };
    serde_path_to_error::deserialize(raw).map_err(|e| {
        let message = e.inner().to_string();
        let mut param = e.path().to_string();
        // An unknown key is reported at its parent; name the key itself.
        if let Some(key) = message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split('`').next())
        {
            param = match param.as_str() {
                "." | "" => key.to_string(),
                // Through a flattened struct the path ends with the key already.
                path if path == key || path.ends_with(&format!(".{key}")) => path.to_string(),
                parent => format!("{parent}.{key}"),
            };
        }
        match param.as_str() {
            "." | "" => match culprit::<T>(raw) {
                Some(key) => StageError::invalid_param(key, message),
                None => StageError::InvalidParams(message),
            },
            _ => StageError::invalid_param(param, message),
        }
    })
}

/// The parameter whose value spoils `raw`, where the error could not say: serde reads a
/// tagged enum's fields (pass-1's, selected by `model`) from a buffer, and the path of
/// the bad field is lost on the way. The key without which `raw` parses is the culprit.
fn culprit<T: serde::de::DeserializeOwned>(raw: &Value) -> Option<String> {
    let object = raw.as_object()?;
    object.keys().find_map(|key| {
        let mut without = object.clone();
        without.remove(key);
        serde_json::from_value::<T>(Value::Object(without))
            .is_ok()
            .then(|| key.clone())
    })
}

/// Checks that a size parameter lies in `range`, saying why the bound is what it is.
pub fn check_param<T>(
    param: &str,
    value: T,
    range: std::ops::RangeInclusive<T>,
    why: &str,
) -> Result<(), StageError>
where
    T: PartialOrd + std::fmt::Display,
{
    if range.contains(&value) {
        return Ok(());
    }
    Err(StageError::invalid_param(
        param,
        format!(
            "{value} is outside {}..={} ({why})",
            range.start(),
            range.end()
        ),
    ))
}

/// `1.5 GB`, `512.0 MB`: sizes as people read them in messages.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Row ranges of at most [`ROW_GROUP_ROWS`] rows covering `0..len`, one Parquet row group
/// (and one record batch) each; an empty table still gets one empty range, so its file
/// carries the schema.
pub fn row_groups(len: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..len.div_ceil(ROW_GROUP_ROWS).max(1))
        .map(move |i| (i * ROW_GROUP_ROWS).min(len)..((i + 1) * ROW_GROUP_ROWS).min(len))
}
