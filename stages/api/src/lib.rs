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
mod parquet_io;

pub use error::StageError;
pub use parquet_io::{
    read_column, read_parquet, write_parquet, write_parquet_parallel, ParquetLayout, ROW_GROUP_ROWS,
};

use std::collections::BTreeMap;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

/// A pipeline stage, registered with the runner by its [`Stage::kind`].
///
/// Implementations must be deterministic: the same inputs, files and parameters must
/// produce byte-identical outputs whatever the thread count. The runner relies on it for
/// caching ("early cut-off") and `audit` checks it.
pub trait Stage: Send + Sync {
    /// The name used in `pipeline.toml` (`stage = "tokenize"`).
    fn kind(&self) -> &'static str;

    /// Bumped whenever the meaning of the outputs changes, so that old artifacts stop
    /// being reused. Refactors that keep the bytes identical keep the version.
    fn version(&self) -> u32;

    /// One line for `--help` style listings.
    fn summary(&self) -> &'static str;

    /// Validates the user's parameters and returns them in canonical form, with every
    /// default filled in. The canonical form is what goes into the recipe, so writing a
    /// default explicitly does not invalidate the cache. Unknown parameters are an error.
    fn canonical_params(&self, raw: &Value) -> Result<Value, StageError>;

    /// Names of the upstream artifacts this stage reads (the `inputs` table of a node),
    /// and of the raw-file roles it reads (the `files` table), for validation.
    fn input_names(&self) -> &'static [&'static str] {
        &[]
    }
    /// Upstream artifacts a node may connect or not (say, `pass1`'s `model`, which only
    /// `model = "gpt"` reads); the stage checks in `run` that it got what its parameters
    /// need.
    fn optional_input_names(&self) -> &'static [&'static str] {
        &[]
    }
    fn file_roles(&self) -> &'static [FileRole] {
        &[]
    }

    /// Does the work. Outputs go into `ctx.out_dir`; the runner hashes them afterwards.
    fn run(&self, ctx: &StageContext) -> Result<StageReport, StageError>;

    /// A line worth printing at the end of `run`, from this stage's stored report (say,
    /// the BPB waterfall). Most stages have none.
    fn headline(&self, _report: &serde_json::Map<String, Value>) -> Option<String> {
        None
    }

    /// The parameter that seeds this stage's randomness *as a run* (the record's `SEED`
    /// for training), which `cachemoney run --seeds` sets to each seed in turn. A seed
    /// that defines the data (a train/val split, a sample of positions) is not one: runs
    /// with different run seeds must be comparable on the same data.
    fn run_seed_param(&self) -> Option<&'static str> {
        None
    }

    /// Numeric keys of this stage's report worth comparing across runs (a BPB, a
    /// calibrated parameter), in reading order; `run --seeds` tabulates them per seed
    /// with their mean and standard deviation.
    fn metrics(&self) -> &'static [&'static str] {
        &[]
    }
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
    /// Canonical parameters, as returned by [`Stage::canonical_params`].
    pub params: Value,
    /// Upstream artifacts by input name.
    pub inputs: BTreeMap<String, InputArtifact>,
    /// Raw files by role, each role's files sorted by path.
    pub files: BTreeMap<String, Vec<PathBuf>>,
    /// Empty directory the stage writes its outputs into.
    pub out_dir: PathBuf,
    /// Whether progress bars may be drawn.
    pub show_progress: bool,
    /// Bytes the stage may plan to allocate (`--memory-limit`; by default what the
    /// machine has available). See [`StageContext::check_memory`].
    pub memory_limit: u64,
}

impl StageContext {
    pub fn input(&self, name: &str) -> Result<&InputArtifact, StageError> {
        self.inputs.get(name).ok_or_else(|| StageError::Param {
            node: self.node.clone(),
            message: format!("input '{name}' is not connected"),
        })
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
        Err(StageError::Param {
            node: self.node.clone(),
            message: format!(
                "{what} need about {}, but only {} is available; lower those parameters, or raise --memory-limit if the estimate is wrong",
                human_bytes(estimate_bytes),
                human_bytes(self.memory_limit)
            ),
        })
    }

    /// Parameters as a concrete type; call after [`Stage::canonical_params`].
    pub fn params_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, StageError> {
        serde_json::from_value(self.params.clone()).map_err(|e| StageError::Param {
            node: self.node.clone(),
            message: e.to_string(),
        })
    }
}

/// What a stage tells the runner beyond its files: figures worth keeping in the manifest
/// (row counts, a BPB, the seed it used). Must be deterministic: it is part of what
/// `audit` compares.
#[derive(Debug, Default, Clone)]
pub struct StageReport {
    pub summary: serde_json::Map<String, Value>,
    /// Wall-clock seconds per phase, in the order they ran. Kept apart from `summary`
    /// because timings are never reproducible.
    pub phase_seconds: Vec<(String, f64)>,
    /// Output files whose bytes are not reproducible by nature (per-step timings): the
    /// runner records and verifies them but leaves them out of the content hash, so they
    /// neither break early cut-off nor fail `audit`. Everything else must be
    /// deterministic.
    pub volatile_files: Vec<String>,
    /// Report entries that describe the build rather than the recipe's inputs (the size
    /// of the code that ran, counted against the record's artifact budget): recorded like
    /// any entry, but `audit` does not hold a rebuild by newer code to them.
    pub volatile_keys: Vec<String>,
}

impl StageReport {
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.summary.insert(key.to_string(), value.into());
        self
    }

    /// Like [`StageReport::with`], for an entry that describes the build (see
    /// [`StageReport::volatile_keys`]).
    pub fn with_volatile(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.volatile_keys.push(key.to_string());
        self.with(key, value)
    }

    /// Records how long `phase` took since `started`.
    pub fn phase(&mut self, phase: &str, started: std::time::Instant) {
        self.phase_seconds
            .push((phase.to_string(), started.elapsed().as_secs_f64()));
    }
}

/// Parses `raw` (a JSON object, possibly empty) into `T`, rejecting unknown fields, and
/// returns `T` re-serialised: the canonical form with defaults filled in. A value of the
/// wrong type is reported with the parameter's path (`params.seed: invalid type: …`).
pub fn canonicalize<T>(raw: &Value) -> Result<Value, StageError>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let parsed: T = parse_params(raw)?;
    serde_json::to_value(parsed).map_err(|e| StageError::InvalidParams(e.to_string()))
}

/// `raw` as `T`, errors naming the parameter they are about.
pub fn parse_params<T: serde::de::DeserializeOwned>(raw: &Value) -> Result<T, StageError> {
    let raw = if raw.is_null() {
        Value::Object(Default::default())
    } else {
        raw.clone()
    };
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
                parent => format!("{parent}.{key}"),
            };
        }
        match param.as_str() {
            "." | "" => StageError::InvalidParams(message),
            _ => StageError::invalid_param(param, message),
        }
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
