//! Read-only SQL over the store with DataFusion.
//!
//! Every Parquet output of every cached node is a table, reachable as `node.table`
//! (`tokens.val`), as plain `table` when no other node has a table of that name (`val`),
//! and as `node` when the node has a single table (`token_stats`). `artifacts` lists every
//! manifest in the store. A table whose stage declares derived columns (`bits` from
//! `p_final`, say) is a view over its file that computes them, so queries see the table
//! the stage declares. Statements that would write (DDL, DML, COPY, SET) are refused:
//! the store only changes through `run` and `gc`.
//!
//! `ln` is the stages' own (the `libm` crate's, in pure Rust), not the C library's that
//! DataFusion calls: glibc picks its `log` by processor, and a derived column (`bits`)
//! must be the very f64 the stages compute, on every machine.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use anyhow::{anyhow, bail, Result};
use arrow::array::RecordBatch;
use datafusion::catalog::MemorySchemaProvider;
use datafusion::common::TableReference;
use datafusion::datasource::MemTable;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::{ident, ParquetReadOptions, SessionConfig, SessionContext};

mod artifacts;
mod catalogue;
mod ln;
use artifacts::artifacts_table;
use catalogue::{Catalogue, Entry};
use ln::natural_log;

use crate::registry::Registry;
use crate::runner::Resolved;
use crate::store::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// A table the session knows, for `\d`.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub name: String,
    pub aliases: Vec<String>,
    pub node: String,
    pub rows: Option<u64>,
    pub columns: Vec<(String, String)>,
}

pub struct SqlSession {
    ctx: SessionContext,
    pub tables: Vec<TableInfo>,
    /// Names a query may use but cannot read, with why: tables of damaged artifacts, or
    /// a file DataFusion could not open. A query that names one fails with the reason;
    /// every other query runs.
    unavailable: BTreeMap<String, String>,
    /// Every readable table name (qualified and aliases) → the file behind it, for
    /// errors raised while reading.
    files: BTreeMap<String, String>,
}

impl SqlSession {
    pub async fn open(
        store: &Store,
        registry: &Registry,
        resolved: &[Resolved],
    ) -> Result<SqlSession> {
        let config = SessionConfig::new().with_information_schema(true);
        let ctx = SessionContext::new_with_config(config);
        ctx.register_udf(natural_log());
        let Catalogue {
            entries,
            unavailable,
            current_recipes,
        } = Catalogue::read(store, registry, resolved);
        let mut session = SqlSession {
            ctx,
            tables: Vec::new(),
            unavailable,
            files: BTreeMap::new(),
        };
        let rerun_nodes: BTreeSet<String> = entries
            .iter()
            .filter(|e| e.rerun)
            .map(|e| e.node.clone())
            .collect();
        session.register_outputs(entries).await?;
        session.register_unions(&rerun_nodes).await?;
        session.register_artifacts(store, &current_recipes)?;
        Ok(session)
    }

    /// Registers every readable output under its qualified name and the aliases no
    /// other table claims; an unreadable one is listed, with why, under each name.
    async fn register_outputs(&mut self, entries: Vec<Entry>) -> Result<()> {
        let catalog = self
            .ctx
            .catalog("datafusion")
            .expect("default catalog exists");
        let mut stem_count: BTreeMap<String, usize> = BTreeMap::new();
        let mut node_tables: BTreeMap<String, usize> = BTreeMap::new();
        for e in entries.iter().filter(|e| !e.rerun) {
            *stem_count.entry(e.stem.clone()).or_default() += 1;
            *node_tables.entry(e.node.clone()).or_default() += 1;
        }
        let ctx = &self.ctx;
        for mut entry in entries {
            let qualified = format!("{}.{}", entry.node, entry.stem);
            let path_text = entry.path.to_string_lossy().into_owned();
            // What `\d` lists: the table as queries see it, derived columns included.
            let mut columns = entry.info.schema.clone().unwrap_or_default();
            if entry.problem.is_none() {
                match register(ctx, &catalog, &entry, &path_text).await {
                    Ok(schema) => {
                        columns = schema
                            .fields()
                            .iter()
                            .map(|f| (f.name().clone(), f.data_type().to_string()))
                            .collect()
                    }
                    Err(e) => {
                        entry.problem = Some(format!("{path_text}: {}", first_line(&e.to_string())))
                    }
                }
            }
            let mut names = vec![qualified.clone()];
            if !entry.rerun && stem_count[&entry.stem] == 1 {
                names.push(entry.stem.clone());
            }
            if !entry.rerun
                && node_tables[&entry.node] == 1
                && !stem_count.contains_key(&entry.node)
            {
                names.push(entry.node.clone());
            }
            let mut aliases = Vec::new();
            for name in names {
                if name == "artifacts" || name == "seeds" {
                    continue;
                }
                if let Some(problem) = &entry.problem {
                    self.unavailable
                        .insert(name.clone(), repair_hint(&entry.node, problem));
                } else {
                    if name != qualified {
                        if ctx.table_exist(name.as_str())? {
                            continue;
                        }
                        let provider = ctx.table_provider(qualified.as_str()).await?;
                        ctx.register_table(name.as_str(), provider)?;
                    }
                    self.files.insert(name.clone(), path_text.clone());
                }
                if name != qualified {
                    aliases.push(name);
                }
            }
            self.tables.push(TableInfo {
                name: qualified,
                aliases,
                node: entry.node.clone(),
                rows: entry.info.rows,
                columns,
            });
        }
        Ok(())
    }

    /// A table several nodes write (`legality`, `scores`): all of them under the plain
    /// name, with a leading `node` column, when their columns agree.
    async fn register_unions(&mut self, rerun_nodes: &BTreeSet<String>) -> Result<()> {
        let mut by_stem: BTreeMap<&str, Vec<&TableInfo>> = BTreeMap::new();
        for t in self
            .tables
            .iter()
            .filter(|t| !rerun_nodes.contains(&t.node))
        {
            if let Some((_, stem)) = t.name.split_once('.') {
                by_stem.entry(stem).or_default().push(t);
            }
        }
        let mut unions = Vec::new();
        for (stem, members) in by_stem {
            let readable = members.iter().all(|t| self.files.contains_key(&t.name));
            let same_columns = members.windows(2).all(|w| w[0].columns == w[1].columns);
            let has_node_column = members[0].columns.iter().any(|(c, _)| c == "node");
            if members.len() < 2
                || !readable
                || !same_columns
                || has_node_column
                || self.ctx.table_exist(stem)?
                || stem == "artifacts"
                || stem == "seeds"
            {
                continue;
            }
            let select: Vec<String> = members
                .iter()
                .map(|t| format!("SELECT '{}' AS node, * FROM {}", t.node, t.name))
                .collect();
            let view = self.ctx.sql(&select.join(" UNION ALL ")).await?.into_view();
            self.ctx.register_table(stem, view)?;
            let mut columns = vec![("node".to_string(), "Utf8".to_string())];
            columns.extend(members[0].columns.iter().cloned());
            unions.push(TableInfo {
                name: stem.to_string(),
                aliases: vec![],
                node: format!("({} nodes)", members.len()),
                rows: members.iter().map(|t| t.rows).sum(),
                columns,
            });
        }
        self.tables.extend(unions);
        Ok(())
    }

    /// `artifacts`: every manifest in the store, marked with the node it is current for.
    fn register_artifacts(
        &mut self,
        store: &Store,
        current_recipes: &BTreeMap<String, String>,
    ) -> Result<()> {
        let artifacts = artifacts_table(store, current_recipes)?;
        let columns = artifacts
            .schema()
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().to_string()))
            .collect();
        let rows = artifacts.num_rows() as u64;
        self.ctx.register_table(
            "artifacts",
            Arc::new(MemTable::try_new(
                artifacts.schema(),
                vec![vec![artifacts]],
            )?),
        )?;
        self.tables.push(TableInfo {
            name: "artifacts".into(),
            aliases: vec![],
            node: "(store)".into(),
            rows: Some(rows),
            columns,
        });
        Ok(())
    }

    /// Adds a table that is not a node's output (say, `seeds`), under `name`.
    pub fn register_batches(
        &mut self,
        name: &str,
        origin: &str,
        schema: arrow::datatypes::SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> Result<()> {
        let columns = schema
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().to_string()))
            .collect();
        let rows = batches.iter().map(|b| b.num_rows() as u64).sum();
        self.ctx
            .register_table(name, Arc::new(MemTable::try_new(schema, vec![batches])?))?;
        self.tables.push(TableInfo {
            name: name.into(),
            aliases: vec![],
            node: origin.into(),
            rows: Some(rows),
            columns,
        });
        Ok(())
    }

    pub async fn query(&self, sql: &str) -> Result<Vec<RecordBatch>> {
        // The tables the statement names: refused up front if unreadable, and named in
        // any error raised while reading them.
        let referenced = self.referenced_tables(sql);
        for name in &referenced {
            if let Some(reason) = self.unavailable.get(name) {
                bail!("table '{name}' cannot be read: {reason}");
            }
        }
        let reading = || {
            let files: Vec<String> = referenced
                .iter()
                .filter_map(|name| self.files.get(name).map(|f| format!("'{name}' ({f})")))
                .collect();
            match files.is_empty() {
                true => String::new(),
                false => format!(" [reading {}]", files.join(", ")),
            }
        };
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let frame = self.ctx.sql_with_options(sql, options).await.map_err(|e| {
            let message = root_cause(&e);
            if message.contains("not supported") && is_write_error(&message) {
                anyhow!("cachemoney sql is read-only: {}; the store changes only through `run` and `gc`", first_line(&message))
            } else {
                anyhow!("{}{}", first_line(&message), self.suggestions(&referenced))
            }
        })?;
        frame
            .collect()
            .await
            .map_err(|e| anyhow!("{}{}", first_line(&root_cause(&e)), reading()))
    }

    /// For names the query uses that are no table, the tables they may have meant: a
    /// table name shared by several nodes (`scores`) is only reachable qualified.
    fn suggestions(&self, referenced: &[String]) -> String {
        let mut lines = Vec::new();
        for name in referenced {
            let known = self.files.contains_key(name)
                || self.unavailable.contains_key(name)
                || self.tables.iter().any(|t| &t.name == name);
            if known {
                continue;
            }
            let candidates: Vec<&str> = self
                .tables
                .iter()
                .filter(|t| {
                    t.name.ends_with(&format!(".{name}")) || t.name.starts_with(&format!("{name}."))
                })
                .map(|t| t.name.as_str())
                .collect();
            if !candidates.is_empty() {
                lines.push(format!(
                    "'{name}' is ambiguous or not a table; did you mean {}?",
                    candidates.join(", ")
                ));
            }
        }
        match lines.is_empty() {
            true => String::new(),
            false => format!(" ({}; \\d lists every table)", lines.join("; ")),
        }
    }

    /// The table names `sql` refers to, as written (`node.table` or `table`); empty if it
    /// does not parse (DataFusion then reports the syntax error itself).
    fn referenced_tables(&self, sql: &str) -> Vec<String> {
        let state = self.ctx.state();
        let dialect = state.config().options().sql_parser.dialect;
        let Ok(statement) = state.sql_to_statement(sql, &dialect) else {
            return Vec::new();
        };
        state
            .resolve_table_references(&statement)
            .map(|refs| refs.iter().map(|r| r.to_string()).collect())
            .unwrap_or_default()
    }

    pub fn describe(&self, name: &str) -> Result<&TableInfo> {
        self.tables
            .iter()
            .find(|t| t.name == name || t.aliases.iter().any(|a| a == name))
            .ok_or_else(|| anyhow!("no table named '{name}' (\\d lists them)"))
    }
}

/// Registers one Parquet output as `node.stem` and returns its schema as queries see
/// it. A table that declares derived columns ([`stage_api::Column::derived`]) is a view
/// over its file that computes them, each at its declared place.
async fn register(
    ctx: &SessionContext,
    catalog: &Arc<dyn datafusion::catalog::CatalogProvider>,
    entry: &Entry,
    path: &str,
) -> Result<arrow::datatypes::SchemaRef> {
    if catalog.schema(&entry.node).is_none() {
        catalog.register_schema(&entry.node, Arc::new(MemorySchemaProvider::new()))?;
    }
    let name = TableReference::partial(entry.node.as_str(), entry.stem.as_str());
    let declared = entry.declared.unwrap_or(&[]);
    if declared.iter().all(|c| c.is_stored()) {
        ctx.register_parquet(name.clone(), path, ParquetReadOptions::default())
            .await?;
        return Ok(ctx.table_provider(name).await?.schema());
    }
    // The file holds exactly the declaration's stored columns: the runner checks every
    // build against it, and a recipe names the stage's version.
    let stored = ctx
        .read_parquet(path, ParquetReadOptions::default())
        .await?;
    let mut select = Vec::new();
    for column in declared {
        select.push(match column.derived {
            Some(sql) => stored.parse_sql_expr(sql)?.alias(column.name),
            None => ident(column.name),
        });
    }
    let view = stored.select(select)?.into_view();
    let schema = view.schema();
    ctx.register_table(name, view)?;
    Ok(schema)
}

fn repair_hint(node: &str, problem: &str) -> String {
    format!("{problem}; rebuild it with `cachemoney run --force {node}`")
}

fn is_write_error(message: &str) -> bool {
    ["DDL", "DML", "Statement", "COPY", "Insert", "INSERT"]
        .iter()
        .any(|w| message.contains(w))
}

/// What went wrong, not where DataFusion noticed: an error raised while an optimizer rule
/// folds a constant (`CAST('abc' AS INT)`) is wrapped in "Optimizer rule
/// 'simplify_expressions' failed", whose cause is the one a user can act on.
fn root_cause(error: &datafusion::error::DataFusionError) -> String {
    error.find_root().to_string()
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or_default().to_string()
}

pub fn format_batches(batches: &[RecordBatch], format: Format) -> Result<String> {
    match format {
        Format::Table => Ok(arrow::util::pretty::pretty_format_batches(batches)?.to_string()),
        Format::Csv => {
            let mut out = Vec::new();
            {
                let mut writer = arrow::csv::WriterBuilder::new()
                    .with_header(true)
                    .build(&mut out);
                for batch in batches {
                    writer.write(batch)?;
                }
            }
            Ok(String::from_utf8(out)?.trim_end().to_string())
        }
        Format::Json => {
            let mut out = Vec::new();
            {
                let mut writer = arrow::json::ArrayWriter::new(&mut out);
                for batch in batches {
                    writer.write(batch)?;
                }
                writer.finish()?;
            }
            let text = String::from_utf8(out)?;
            Ok(if text.is_empty() { "[]".into() } else { text })
        }
    }
}

/// `\d`: the tables; `\d NAME`: one table's columns.
pub fn describe_command(session: &SqlSession, arg: Option<&str>) -> Result<String> {
    let mut out = String::new();
    match arg {
        None => {
            let rows: Vec<[String; 4]> = session
                .tables
                .iter()
                .map(|t| {
                    [
                        t.name.clone(),
                        t.aliases.join(", "),
                        t.node.clone(),
                        t.rows.map(|r| r.to_string()).unwrap_or_default(),
                    ]
                })
                .collect();
            let header = ["table", "also as", "node", "rows"].map(String::from);
            let width = |i: usize| {
                std::iter::once(&header)
                    .chain(&rows)
                    .map(|r| r[i].chars().count())
                    .max()
                    .unwrap_or(0)
            };
            let (w0, w1, w2, w3) = (width(0), width(1), width(2), width(3));
            for [name, aliases, node, count] in std::iter::once(header.clone()).chain(rows) {
                out.push_str(&format!(
                    "{name:<w0$} {aliases:<w1$} {node:<w2$} {count:>w3$}\n"
                ));
            }
        }
        Some(name) => {
            let t = session.describe(name)?;
            out.push_str(&format!(
                "table {} (node {}, {} rows)\n",
                t.name,
                t.node,
                t.rows.unwrap_or(0)
            ));
            for (column, kind) in &t.columns {
                out.push_str(&format!("  {column:<24} {kind}\n"));
            }
        }
    }
    Ok(out.trim_end().to_string())
}

/// Runs one line of the interactive prompt (or of `sql "..."`): a backslash command or a
/// query.
pub async fn execute(session: &SqlSession, input: &str, format: Format) -> Result<String> {
    let input = input.trim().trim_end_matches(';').trim();
    if let Some(command) = input.strip_prefix('\\') {
        let mut words = command.split_whitespace();
        return match words.next() {
            Some("d") => describe_command(session, words.next()),
            Some("?") | Some("h") => Ok("\\d            list tables\n\\d TABLE      show a table's columns\n\\q            quit\nanything else is SQL (DataFusion dialect), read-only".into()),
            Some(other) => bail!("unknown command \\{other} (\\? lists them)"),
            None => bail!("empty command (\\? lists them)"),
        };
    }
    let batches = session.query(input).await?;
    format_batches(&batches, format)
}
