//! `stage = "command"`: any program as a step, its outputs declared in `pipeline.toml`.
//!
//! ```toml
//! [nodes.model_ddp]
//! stage = "command"
//! inputs.tokens = "tokens"
//! files.program = ["examples/trainers/gpt_ddp.py", "examples/scorers/gpt_torch.py"]
//! params.command = [".venv/bin/python", "-m", "torch.distributed.run", "--standalone",
//!                   "--nproc_per_node", "2", "examples/trainers/gpt_ddp.py", "--steps", "150"]
//! params.network = "loopback"
//! outputs.files = ["model.safetensors", "config.json"]
//! outputs.tables.train_log = ["step u32", "loss f64"]
//! ```
//!
//! The program gets the request scorers get, in this stage's own protocol: every input
//! artifact's tables and files by path (private copies), its own files, what it must
//! write and where. What it wrote is then held to the declaration, each problem one line
//! naming the file: a declared output missing, a file not declared, a column of another
//! type, a null where the declaration has none. Tables are re-encoded in our own layout,
//! so their bytes (and the node's content hash) do not depend on which Parquet library
//! the program used.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use stage_api::{
    check_param, Column, ColumnType, FileRole, Input, Output, Stage, StageContext, StageError,
    StageParams, StageReport, StageSpec,
};

use crate::outputs::collect;
pub use crate::outputs::CommandReport;
use crate::process::{self, Program, Workspace};

/// The protocol's name and version, first in every request.
pub const PROTOCOL: &str = "cachemoney-command/1";
/// What the program printed, kept in the artifact (volatile: not hashed).
pub const COMMAND_LOG: &str = "command.log";
/// What the sandbox achieved for the run, kept in the artifact (volatile).
pub const SANDBOX_REPORT: &str = "sandbox.json";

/// The volatile report entry of a stage that ran a program confined: the sandbox it got,
/// in one line (it describes the machine, not the recipe).
#[derive(Debug, Serialize, Deserialize)]
pub struct Sandboxed {
    pub sandbox: String,
}

pub struct CommandStage;

/// The program's network.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// None at all (the default).
    #[default]
    None,
    /// A network of its own with only a loopback: for programs whose processes talk to
    /// each other over TCP (`torchrun`, gloo, NCCL's bootstrap).
    Loopback,
}

/// What the program must write, as the node declares it (`outputs.tables.NAME =
/// ["column type", ...]`, `outputs.files = [...]`). Column types are the ones
/// `cachemoney stages` prints (`u16`, `i64`, `f32`, `utf8`, ...); `?` after the type lets
/// the column hold nulls.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Declared {
    pub tables: BTreeMap<String, Vec<String>>,
    pub files: Vec<String>,
}

/// `command`'s parameters. `outputs` comes from the node's `outputs` table, not from
/// `params`: the pipeline puts it here so that the recipe (and the content hash) covers
/// the declaration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandParams {
    /// The program and its arguments, run in the pipeline file's directory layout.
    pub command: Vec<String>,
    /// Extra environment variables (the program's environment is otherwise only what
    /// makes a program run; nothing of the caller's leaks in).
    pub env: BTreeMap<String, String>,
    /// Seconds before the program, and everything it started, is killed.
    pub timeout_s: u64,
    /// Paths (relative to the pipeline's directory, or absolute) it may read beside its
    /// own files, its inputs and its interpreter's installation. Never the store.
    pub read: Vec<String>,
    pub network: Network,
    pub outputs: Declared,
}

impl Default for CommandParams {
    fn default() -> Self {
        CommandParams {
            command: Vec::new(),
            env: BTreeMap::new(),
            timeout_s: 3600,
            read: Vec::new(),
            network: Network::None,
            outputs: Declared::default(),
        }
    }
}

/// Files of the artifact that are ours, not the program's: its outputs may not take
/// these names.
const RESERVED: &[&str] = &[COMMAND_LOG, SANDBOX_REPORT, "manifest.json"];

impl StageParams for CommandParams {
    fn validate(&self) -> Result<(), StageError> {
        if self
            .command
            .first()
            .is_none_or(|program| program.is_empty())
        {
            return Err(StageError::invalid_param(
                "command",
                "give the program and its arguments, e.g. [\".venv/bin/python\", \"step.py\"]",
            ));
        }
        check_param("timeout_s", self.timeout_s, 1..=7 * 24 * 3600, "seconds")?;
        if self.outputs.tables.is_empty() && self.outputs.files.is_empty() {
            return Err(StageError::invalid_param(
                "outputs",
                "declare what the program writes: outputs.files = [\"model.safetensors\"], outputs.tables.NAME = [\"column type\", ...]",
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (table, columns) in &self.outputs.tables {
            let param = format!("outputs.tables.{table}");
            if !is_identifier(table) || table.chars().any(|c| c.is_ascii_uppercase()) {
                return Err(StageError::invalid_param(
                    param,
                    "a table's name is lower-case letters, digits and _, not starting with a digit (SQL reads it as NODE.NAME, and folds unquoted names to lower case)",
                ));
            }
            if columns.is_empty() {
                return Err(StageError::invalid_param(
                    param,
                    "declare its columns, e.g. [\"token u16\", \"count i64\"]",
                ));
            }
            let mut seen = std::collections::BTreeSet::new();
            for text in columns {
                let (name, _, _) =
                    parse_column(text).map_err(|m| StageError::invalid_param(&param, m))?;
                if !seen.insert(name) {
                    return Err(StageError::invalid_param(
                        &param,
                        format!("column '{name}' is declared twice"),
                    ));
                }
            }
            names.insert(format!("{table}.parquet"));
        }
        for file in &self.outputs.files {
            let lower = file.to_ascii_lowercase();
            let plain = file
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            let problem = if file.is_empty()
                || file.len() > 200
                || !plain
                || file.starts_with(['.', '-'])
            {
                Some(format!(
                    "{file:?}: a file's name is letters, digits, '.', '_' and '-', not starting with '.' or '-', without a directory (outputs are the files of one directory)"
                ))
            } else if RESERVED.iter().any(|r| *r == lower) {
                Some(format!(
                    "'{file}' is the artifact's own ({})",
                    RESERVED.join(", ")
                ))
            } else if lower.ends_with(".parquet") {
                Some(format!(
                    "declare a Parquet output as a table, with its columns (outputs.tables.{} = [...]): tables are checked and queryable",
                    &file[..file.len() - ".parquet".len()]
                ))
            } else if !names.insert(file.clone()) {
                Some(format!("'{file}' is declared twice"))
            } else {
                None
            };
            if let Some(message) = problem {
                return Err(StageError::invalid_param("outputs.files", message));
            }
        }
        Ok(())
    }
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `"count i64"` → (count, I64, not nullable); `"note utf8?"` → nullable.
fn parse_column(text: &str) -> Result<(&str, ColumnType, bool), String> {
    let mut words = text.split_whitespace();
    let (Some(name), Some(ty), None) = (words.next(), words.next(), words.next()) else {
        return Err(format!(
            "'{text}': write a column as \"NAME TYPE\", e.g. \"count i64\" (\"note utf8?\" where nulls may occur)"
        ));
    };
    if !is_identifier(name) {
        return Err(format!(
            "'{text}': a column's name is letters, digits and _, not starting with a digit"
        ));
    }
    let (ty, nullable) = match ty.strip_suffix('?') {
        Some(ty) => (ty, true),
        None => (ty, false),
    };
    let known = || {
        ColumnType::ALL
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ty = ColumnType::from_name(ty)
        .ok_or_else(|| format!("'{text}': unknown type '{ty}' (known: {})", known()))?;
    Ok((name, ty, nullable))
}

fn leak(text: &str) -> &'static str {
    Box::leak(text.to_owned().into_boxed_str())
}

impl Declared {
    /// The declared tables as columns (validated parameters).
    pub(crate) fn columns(&self) -> Vec<(&str, Vec<Column>)> {
        self.tables
            .iter()
            .map(|(table, texts)| {
                let columns = texts
                    .iter()
                    .map(|text| {
                        let (name, ty, nullable) = parse_column(text).expect("validated");
                        if nullable {
                            Column::nullable(leak(name), ty)
                        } else {
                            Column::new(leak(name), ty)
                        }
                    })
                    .collect();
                (table.as_str(), columns)
            })
            .collect()
    }
}

impl Stage for CommandStage {
    type Params = CommandParams;

    const SPEC: StageSpec = StageSpec {
        kind: "command",
        version: 1,
        summary: "a program of yours as a step: inputs wired like any node's (any names), outputs declared in the node (outputs.tables.NAME, outputs.files)",
        files: &[FileRole {
            name: "program",
            required: false,
            help: "the program's own files (hashed, so editing them reruns the node), copied to the same relative paths",
        }],
        ..StageSpec::NONE
    };

    /// The node's inputs are the ones it wires (read whole: the program is a black box),
    /// its outputs the ones it declares, beside the log and the sandbox's report.
    fn node_spec(params: &CommandParams, inputs: &[&str]) -> Option<StageSpec> {
        let inputs: Vec<Input> = inputs
            .iter()
            .map(|name| Input::optional(leak(name), &[]))
            .collect();
        let mut outputs: Vec<Output> = params
            .outputs
            .columns()
            .into_iter()
            .map(|(table, columns)| {
                Output::table(leak(table), Box::leak(columns.into_boxed_slice()))
            })
            .collect();
        outputs.extend(
            params
                .outputs
                .files
                .iter()
                .map(|file| Output::file(leak(file), "declared in pipeline.toml")),
        );
        outputs.push(
            Output::file_if(
                COMMAND_LOG,
                "what the program printed, capped (volatile: not hashed)",
            )
            .volatile(),
        );
        outputs.push(
            Output::file_if(
                SANDBOX_REPORT,
                "what the sandbox achieved for the run (volatile)",
            )
            .volatile(),
        );
        Some(StageSpec {
            inputs: Box::leak(inputs.into_boxed_slice()),
            outputs: Box::leak(outputs.into_boxed_slice()),
            ..Self::SPEC
        })
    }

    fn run(&self, ctx: &StageContext, params: CommandParams) -> Result<StageReport, StageError> {
        let workspace = Workspace::create(ctx)?;
        let program = program(&params);
        let outcome = prepare(ctx, &params, &workspace).and_then(|()| {
            let isolation = process::run(ctx, &program, &workspace, &workspace.request())?;
            process::check_out_dir(ctx, &workspace, &program)?;
            let report = collect(ctx, &params.outputs, &workspace)?;
            let path = ctx.output(SANDBOX_REPORT);
            let text = serde_json::to_vec_pretty(&isolation).expect("serialises");
            std::fs::write(&path, text).map_err(|e| StageError::io(&path, e))?;
            Ok(StageReport::default()
                .with_fields(&report)
                .with_volatile_fields(&Sandboxed {
                    sandbox: isolation.describe(),
                }))
        });
        match outcome {
            Ok(report) => {
                workspace.remove();
                Ok(report)
            }
            Err(e) => Err(process::keep_for_inspection(ctx, e, &workspace, &program)),
        }
    }
}

fn program(params: &CommandParams) -> Program<'_> {
    let mut env = process::base_environment();
    for (k, v) in &params.env {
        process::set_env(&mut env, k, v);
    }
    Program {
        what: "command",
        command: &params.command,
        files: "program",
        env,
        read: &params.read,
        timeout_s: params.timeout_s,
        loopback: params.network == Network::Loopback,
        log: COMMAND_LOG,
    }
}

/// What the program is asked to do (JSON on stdin and in `$CACHEMONEY_REQUEST`). Paths
/// are relative to its working directory.
#[derive(Debug, Serialize)]
pub struct Request<'a> {
    pub protocol: &'static str,
    /// Per input name, a private copy of the artifact: its directory, its tables by name
    /// (`NAME.parquet`), and every file.
    pub inputs: BTreeMap<String, InputFiles>,
    /// The node's own files by role (`files.program`), at their relative paths.
    pub files: BTreeMap<String, Vec<PathBuf>>,
    /// What to write into `output_dir`, and nothing else.
    pub outputs: &'a Declared,
    pub output_dir: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct InputFiles {
    pub dir: PathBuf,
    pub tables: BTreeMap<String, PathBuf>,
    pub files: Vec<PathBuf>,
}

/// Fills the workspace: the program's files, copies of its inputs, the request.
fn prepare(
    ctx: &StageContext,
    params: &CommandParams,
    workspace: &Workspace,
) -> Result<(), StageError> {
    let root = &workspace.root;
    let mut files = BTreeMap::new();
    for role in ctx.files.keys() {
        files.insert(role.clone(), process::copy_own_files(ctx, role, root)?);
    }
    let mut inputs = BTreeMap::new();
    for (name, artifact) in &ctx.inputs {
        let dir = Workspace::input(name);
        process::copy_input(&artifact.dir, &root.join(&dir))?;
        let mut listed: Vec<PathBuf> = Vec::new();
        list_files(&root.join(&dir), &dir, &mut listed)?;
        listed.sort();
        let tables = listed
            .iter()
            .filter(|path| path.parent() == Some(dir.as_path()))
            .filter_map(|path| {
                let name = path.file_name()?.to_str()?.strip_suffix(".parquet")?;
                Some((name.to_string(), path.clone()))
            })
            .collect();
        inputs.insert(
            name.clone(),
            InputFiles {
                dir,
                tables,
                files: listed,
            },
        );
    }
    let request = Request {
        protocol: PROTOCOL,
        inputs,
        files,
        outputs: &params.outputs,
        output_dir: PathBuf::from("out"),
    };
    let path = workspace.request();
    let body = serde_json::to_vec_pretty(&request).expect("requests serialise");
    std::fs::write(&path, body).map_err(|e| StageError::io(&path, e))?;
    process::date(&path)?;
    process::date_directories(root)?;
    Ok(())
}

/// Every file under `dir` (named `relative` in the request), recursively.
fn list_files(dir: &Path, relative: &Path, out: &mut Vec<PathBuf>) -> Result<(), StageError> {
    let entries = std::fs::read_dir(dir).map_err(|e| StageError::io(dir, e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = relative.join(entry.file_name());
        if path.is_dir() {
            list_files(&path, &name, out)?;
        } else {
            out.push(name);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(tables: &[(&str, &[&str])], files: &[&str]) -> CommandParams {
        CommandParams {
            command: vec!["true".into()],
            outputs: Declared {
                tables: tables
                    .iter()
                    .map(|(t, cs)| (t.to_string(), cs.iter().map(|c| c.to_string()).collect()))
                    .collect(),
                files: files.iter().map(|f| f.to_string()).collect(),
            },
            ..CommandParams::default()
        }
    }

    fn refused(p: &CommandParams) -> String {
        p.validate().expect_err("refused").to_string()
    }

    #[test]
    fn a_declaration_is_checked_when_the_pipeline_loads() {
        assert!(
            params(&[("counts", &["token u16", "note utf8?"])], &["model.bin"])
                .validate()
                .is_ok()
        );
        assert!(refused(&params(&[], &[])).starts_with("params.outputs: declare"));
        assert!(refused(&params(&[("counts", &["token u17"])], &[]))
            .contains("unknown type 'u17' (known: bool, u8, u16"));
        assert!(refused(&params(&[("counts", &["token"])], &[])).contains("\"NAME TYPE\""));
        assert!(refused(&params(&[("counts", &["a u8", "a u8"])], &[])).contains("twice"));
        assert!(refused(&params(&[("9x", &["a u8"])], &[])).contains("letters, digits"));
        assert!(refused(&params(&[], &["sub/model.bin"])).contains("without a directory"));
        assert!(refused(&params(&[], &["a b"])).contains("letters, digits"));
        assert!(refused(&params(&[], &["-rf"])).contains("not starting with"));
        assert!(refused(&params(&[], &["Command.LOG"])).contains("the artifact's own"));
        assert!(refused(&params(&[], &["X.PARQUET"])).contains("as a table"));
        assert!(refused(&params(&[("Counts", &["a u8"])], &[])).contains("lower-case"));
        assert!(refused(&params(&[], &["command.log"])).contains("the artifact's own"));
        assert!(refused(&params(&[], &["t.parquet"])).contains("as a table"));
        assert!(refused(&params(&[("t", &["a u8"])], &["t.parquet"])).contains("as a table"));
        let no_program = CommandParams {
            command: vec![],
            ..params(&[], &["x"])
        };
        assert!(refused(&no_program).starts_with("params.command"));
    }

    #[test]
    fn a_nodes_declaration_is_its_spec() {
        let p = params(&[("counts", &["token u16", "note utf8?"])], &["model.bin"]);
        let spec = CommandStage::node_spec(&p, &["tokens"]).expect("declared");
        assert_eq!(spec.kind, "command");
        assert_eq!(spec.inputs.len(), 1);
        assert_eq!(spec.inputs[0].name, "tokens");
        let outputs: Vec<String> = spec.outputs.iter().map(|o| o.to_string()).collect();
        assert_eq!(outputs[0], "counts(token u16, note utf8?)");
        assert!(outputs[1].starts_with("model.bin: "));
        assert_eq!(spec.outputs.len(), 4, "{outputs:?}");
    }
}
