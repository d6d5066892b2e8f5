//! The subcommands, over one loaded pipeline and its store.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::pipeline::Pipeline;
use crate::recipe::short;
use crate::registry::Registry;
use crate::remote::Remote;
use crate::runner::{NodeState, Resolved, RunContext};
use crate::sql::{self, Format, SqlSession};
use crate::store::{verify_artifact, Manifest, Store, Stored};

mod compare;
mod ingredients;
mod legality;
mod remote;
mod run;
mod sql_input;
mod stages;

pub use compare::{Claim, CompareRow};
use sql_input::{interactive, sql_runtime};
pub use stages::stages;

pub struct Session {
    pub pipeline: Pipeline,
    pub registry: Registry,
    pub store: Store,
    /// What stages may plan to allocate (`--memory-limit`).
    pub memory_limit: u64,
    /// `--remote URL`, which overrides the pipeline's `remote` key.
    pub remote_url: Option<String>,
    /// `--offline`: no remote, whatever the pipeline says.
    pub offline: bool,
}

impl Session {
    /// Loads the pipeline, expanded for `seeds` (the `--seeds` flag) or else for the
    /// file's own `seeds` key, if either is given.
    pub fn open(pipeline_path: &Path, seeds: Option<&[u64]>) -> Result<Session> {
        let registry = Registry::with_builtin_stages();
        let pipeline = Pipeline::load(pipeline_path, &registry)?;
        let seeds = seeds.map_or_else(|| pipeline.seeds_in_file.clone(), <[u64]>::to_vec);
        let pipeline = pipeline.for_seeds(&seeds, &registry)?;
        let store = Store::open(&pipeline.store_dir);
        Ok(Session {
            pipeline,
            registry,
            store,
            memory_limit: u64::MAX,
            remote_url: None,
            offline: false,
        })
    }

    fn context(&self) -> RunContext<'_> {
        self.context_with(None)
    }

    fn context_with<'a>(&'a self, remote: Option<&'a Remote>) -> RunContext<'a> {
        RunContext {
            pipeline: &self.pipeline,
            registry: &self.registry,
            store: &self.store,
            memory_limit: self.memory_limit,
            remote,
        }
    }

    /// The URL of the remote in use: `--remote`, else the pipeline's `remote` key;
    /// none under `--offline`.
    pub fn remote_url(&self) -> Option<&str> {
        if self.offline {
            return None;
        }
        self.remote_url
            .as_deref()
            .or(self.pipeline.remote.as_deref())
    }

    /// The remote, opened and contacted once (so a wrong endpoint, wrong credentials or
    /// a missing bucket fail before anything is built); `None` without one.
    pub fn remote(&self) -> Result<Option<Remote>> {
        let Some(url) = self.remote_url() else {
            return Ok(None);
        };
        let remote = Remote::open(url)?;
        remote.check()?;
        Ok(Some(remote))
    }

    /// The seeds table's rows; none unless the pipeline is expanded for seeds.
    fn seed_rows(&self, resolved: &[Resolved]) -> Result<Vec<crate::seeds::SeedRow>> {
        crate::seeds::seed_rows(&self.pipeline, &self.registry, &self.store, resolved)
    }

    pub fn status(&self, json: bool) -> Result<()> {
        let remote = self.remote()?;
        let resolved = self.context_with(remote.as_ref()).resolve()?;
        if json {
            outln!("{}", serde_json::to_string_pretty(&resolved)?);
            return Ok(());
        }
        let width = self.pipeline.name_width();
        if let Some(remote) = &remote {
            return self::remote::print_status(&resolved, remote, width);
        }
        outln!("{:<width$} {:<12} {:<8} detail", "node", "stage", "state");
        for r in &resolved {
            let (state, detail) = state_and_detail(&r.state);
            outln!("{:<width$} {:<12} {:<8} {}", r.node, r.stage, state, detail);
        }
        Ok(())
    }

    fn resolved_node(&self, node: &str) -> Result<Resolved> {
        self.pipeline.node(node)?;
        let resolved = self.context().resolve()?;
        Ok(resolved
            .into_iter()
            .find(|r| r.node == node)
            .expect("node exists"))
    }

    pub fn explain(&self, node: &str, json: bool) -> Result<()> {
        let r = self.resolved_node(node)?;
        let Some(ingredients) = &r.ingredients else {
            let reason = match &r.state {
                NodeState::Stale { reasons } => reasons.join("; "),
                NodeState::Missing { reason } => reason.clone(),
                NodeState::Damaged { problems } => problems.join("; "),
                NodeState::Cached { .. } => String::new(),
            };
            bail!("node '{node}': its recipe is not known yet ({reason}); run `cachemoney run --until {node}` first");
        };
        let recipe = r.recipe.as_deref().unwrap_or_default();
        if json {
            let value = serde_json::json!({"node": node, "recipe": recipe, "ingredients": ingredients, "state": r.state});
            outln!("{}", serde_json::to_string_pretty(&value)?);
            return Ok(());
        }
        ingredients::print(node, recipe, ingredients, &self.pipeline)?;
        let state = match &r.state {
            NodeState::Cached { content_hash } => {
                format!("cached (content {})", short(content_hash))
            }
            NodeState::Stale { reasons } => format!("stale: {}", reasons.join("; ")),
            NodeState::Missing { reason } => format!("missing: {reason}"),
            NodeState::Damaged { problems } => format!("damaged: {}", problems.join("; ")),
        };
        outln!("state    {state}");
        Ok(())
    }

    /// The node's current artifact, or its last build if it is stale: the manifest,
    /// whether it is current, and what is wrong with its files (empty when intact).
    fn artifact_for(&self, node: &str) -> Result<(Manifest, bool, Vec<String>)> {
        let r = self.resolved_node(node)?;
        let mut candidates = Vec::new();
        if let Some(recipe) = &r.recipe {
            candidates.push((r.stage.clone(), recipe.clone(), true));
        }
        if let Some(previous) = self.store.node_ref(node) {
            candidates.push((previous.ingredients.stage, previous.recipe, false));
        }
        for (stage, recipe, current) in candidates {
            match self.store.lookup(&stage, &recipe) {
                Stored::Absent => continue,
                Stored::Intact(manifest) => return Ok((manifest, current, Vec::new())),
                Stored::Damaged {
                    manifest: Some(manifest),
                    problems,
                } => return Ok((manifest, current, problems)),
                Stored::Damaged {
                    manifest: None,
                    problems,
                } => bail!(
                    "node '{node}': {}; rebuild it with `cachemoney run --force {node}`",
                    problems.join("; ")
                ),
            }
        }
        bail!("node '{node}' has no artifact yet; run `cachemoney run --until {node}`")
    }

    pub fn show(&self, node: &str, rows: usize, json: bool) -> Result<()> {
        let (manifest, current, problems) = self.artifact_for(node)?;
        if json {
            outln!("{}", serde_json::to_string_pretty(&manifest)?);
            return Ok(());
        }
        let dir = self.store.artifact_dir(&manifest.stage, &manifest.recipe);
        if !current {
            outln!("note: node '{node}' is stale; showing its last build");
        }
        outln!("node     {node} ({} v{})", manifest.stage, manifest.version);
        outln!("recipe   {}", manifest.recipe);
        outln!("content  {}", manifest.content_hash);
        outln!("path     {}", dir.display());
        outln!(
            "built    {} in {:.2}s on {} thread(s), cachemoney {}",
            manifest.created_at,
            manifest.seconds,
            manifest.threads,
            manifest.tool_version
        );
        if !manifest.phase_seconds.is_empty() {
            let phases: Vec<String> = manifest
                .phase_seconds
                .iter()
                .map(|(phase, seconds)| format!("{phase} {seconds:.2}s"))
                .collect();
            outln!("phases   {}", phases.join(", "));
        }
        if !manifest.report.is_empty() {
            outln!("report");
            for (key, value) in &manifest.report {
                outln!("  {key:<32} {value}");
            }
        }
        outln!("files");
        for (name, file) in &manifest.files {
            let rows_text = file.rows.map(|r| format!("{r} rows")).unwrap_or_default();
            outln!(
                "  {name:<20} {:>12} bytes  {rows_text:<16} blake3 {}",
                file.bytes,
                short(&file.blake3)
            );
        }
        if !problems.is_empty() {
            bail!(
                "node '{node}': its artifact is damaged, so no rows are shown: {}; rebuild it with `cachemoney run --force {node}`",
                problems.join("; ")
            );
        }
        for (name, file) in &manifest.files {
            let Some(schema) = &file.schema else { continue };
            let columns: Vec<String> = schema.iter().map(|(c, t)| format!("{c} {t}")).collect();
            outln!("\n{name}: {}", columns.join(", "));
            // The columns the file leaves out because SQL computes them.
            let declared = name
                .strip_suffix(".parquet")
                .and_then(|table| self.registry.table_columns(&manifest.stage, table));
            for column in declared.unwrap_or(&[]) {
                if let Some(sql) = column.derived {
                    outln!("  derived in SQL: {} = {sql}", column.name);
                }
            }
            if rows > 0 {
                let path = dir.join(name);
                let batches = first_rows(&path, rows)
                    .map_err(|e| anyhow!("{}: cannot read: {e}", path.display()))?;
                outln!("{}", sql::format_batches(&batches, Format::Table)?);
            }
        }
        Ok(())
    }

    pub fn sql(&self, query: Option<&str>, format: Format) -> Result<()> {
        // With a remote, recipes resolve through its manifests too, so a node pulled
        // without its upstream (`pull scores`) is queryable.
        let remote = self.remote()?;
        let resolved = self.context_with(remote.as_ref()).resolve()?;
        let runtime = sql_runtime()?;
        // The seeds table: this pipeline's, if it is expanded for seeds; else the last
        // multi-seed run's, as `run --seeds` wrote it.
        let seeds = if !self.pipeline.seeds.is_empty() {
            Some(vec![crate::seeds::to_batch(&self.seed_rows(&resolved)?)])
        } else {
            let path = self.store.seeds_table_path();
            match path.is_file() {
                true => Some(stage_api::read_parquet(&path)?),
                false => None,
            }
        };
        runtime.block_on(async {
            let mut session = SqlSession::open(&self.store, &self.registry, &resolved).await?;
            if let Some(batches) = seeds {
                let schema = batches
                    .first()
                    .map_or_else(|| crate::seeds::to_batch(&[]).schema(), |b| b.schema());
                session.register_batches("seeds", "(run --seeds)", schema, batches)?;
            }
            match query {
                Some(q) => {
                    outln!("{}", sql::execute(&session, q, format).await?);
                    Ok(())
                }
                None => interactive(&session, format).await,
            }
        })
    }

    /// `cachemoney report`: the HTML page of figures (see [`crate::report`]).
    pub fn report(&self, out: &Path, quiet: bool) -> Result<()> {
        let resolved = self.context().resolve()?;
        for r in &resolved {
            if let NodeState::Damaged { problems } = &r.state {
                eprintln!(
                    "warning: node '{}' is left out of the report: {}; `cachemoney run` rebuilds it",
                    r.node,
                    problems.join("; ")
                );
            }
        }
        let seed_rows = self.seed_rows(&resolved)?;
        let runtime = sql_runtime()?;
        let (html, figures) = runtime.block_on(async {
            let session = SqlSession::open(&self.store, &self.registry, &resolved).await?;
            crate::report::build(
                &self.pipeline,
                &self.registry,
                &self.store,
                &resolved,
                &session,
                &seed_rows,
            )
            .await
        })?;
        crate::report::write(out, &html)?;
        if !quiet {
            outln!(
                "wrote {} ({figures} figures, {} KB); open it in a browser",
                out.display(),
                html.len().div_ceil(1024)
            );
        }
        Ok(())
    }

    pub fn verify(&self, quiet: bool) -> Result<bool> {
        let listing = self.store.list();
        let mut problems: Vec<String> = listing
            .problems
            .iter()
            .map(|p| format!("{}: {}", p.path.display(), p.message))
            .collect();
        let mut files = 0;
        for (dir, manifest) in &listing.artifacts {
            files += manifest.files.len();
            problems.extend(verify_artifact(dir, manifest));
        }
        for p in &problems {
            eprintln!("corrupt: {p}");
        }
        if problems.is_empty() {
            if !quiet {
                outln!(
                    "ok: {} artifact(s), {files} file(s), every hash matches its manifest",
                    listing.artifacts.len()
                );
            }
            Ok(true)
        } else {
            eprintln!(
                "{} problem(s) in {} artifact(s); rebuild damaged nodes with `cachemoney run --force NODE`, remove entries that are not artifacts with `cachemoney gc`",
                problems.len(),
                listing.artifacts.len()
            );
            Ok(false)
        }
    }

    /// `cachemoney gc`: removes what no node of the pipeline points to, except each
    /// node's `keep` most recent other builds and anything younger than `grace`, so an
    /// edit of `pipeline.toml` followed by `gc` does not delete a model that took hours;
    /// and removes what is not an artifact at all (corrupt manifests, stray files).
    pub fn gc(&self, options: &GcOptions) -> Result<()> {
        let lock = self.store.lock(options.wait)?;
        self.store.sweep_tmp(&lock)?;
        let resolved = self.context().resolve()?;
        let live: std::collections::BTreeSet<String> =
            resolved.iter().filter_map(|r| r.recipe.clone()).collect();
        let listing = self.store.list();
        let verb = if options.dry_run {
            "would remove"
        } else {
            "removed"
        };
        for problem in &listing.problems {
            outln!("{verb} {} ({})", problem.path.display(), problem.message);
            if !options.dry_run {
                self.store.remove_path(&lock, &problem.path)?;
            }
        }
        let now = std::time::SystemTime::now();
        // Per node that built them, the unreferenced artifacts newest first.
        let mut by_node: std::collections::BTreeMap<&str, Vec<&Manifest>> = Default::default();
        for (_, manifest) in &listing.artifacts {
            if !live.contains(&manifest.recipe) {
                by_node.entry(&manifest.node).or_default().push(manifest);
            }
        }
        let (mut freed, mut removed) = (0u64, 0usize);
        let (mut kept_recent, mut kept_young, mut kept_bytes) = (0usize, 0usize, 0u64);
        for manifests in by_node.values_mut() {
            manifests.sort_by(|a, b| b.created_at.cmp(&a.created_at));
            for (rank, manifest) in manifests.iter().enumerate() {
                let bytes: u64 = manifest.files.values().map(|f| f.bytes).sum();
                let age = crate::store::age_of(&manifest.created_at, now);
                if rank < options.keep {
                    kept_recent += 1;
                    kept_bytes += bytes;
                    continue;
                }
                if age.is_some_and(|age| age < options.grace) {
                    kept_young += 1;
                    kept_bytes += bytes;
                    continue;
                }
                outln!(
                    "{verb} {}/{} (built by node '{}' at {}, {} bytes)",
                    manifest.stage,
                    short(&manifest.recipe),
                    manifest.node,
                    manifest.created_at,
                    bytes
                );
                if !options.dry_run {
                    self.store
                        .remove(&lock, &manifest.stage, &manifest.recipe)?;
                }
                freed += bytes;
                removed += 1;
            }
        }
        if !options.dry_run {
            self.store.hasher().forget_missing();
            self.store.hasher().save()?;
        }
        outln!(
            "{} {removed} artifact(s), {freed} bytes",
            if options.dry_run {
                "would free"
            } else {
                "freed"
            }
        );
        if kept_recent + kept_young > 0 {
            outln!(
                "kept {} unreferenced artifact(s), {kept_bytes} bytes: {kept_recent} as their node's last {} build(s) (--keep), {kept_young} younger than {} (--grace); `cachemoney gc --keep 0 --grace 0` removes them too",
                kept_recent + kept_young,
                options.keep,
                crate::store::format_duration(options.grace),
            );
        }
        Ok(())
    }
}

/// A node's state in `status`: one word, and the detail behind it.
fn state_and_detail(state: &NodeState) -> (&'static str, String) {
    match state {
        NodeState::Cached { content_hash } => {
            ("cached", format!("content {}", short(content_hash)))
        }
        NodeState::Stale { reasons } => ("stale", reasons.join("; ")),
        NodeState::Missing { reason } => ("missing", reason.clone()),
        NodeState::Damaged { problems } => (
            "damaged",
            format!("{}; `cachemoney run` rebuilds it", problems.join("; ")),
        ),
    }
}

/// What `gc` keeps besides what the pipeline points to.
pub struct GcOptions {
    pub dry_run: bool,
    pub wait: bool,
    /// Per node, this many most recent unreferenced builds.
    pub keep: usize,
    /// Anything built less than this long ago.
    pub grace: std::time::Duration,
}

fn first_rows(path: &Path, rows: usize) -> Result<Vec<arrow::array::RecordBatch>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path)?)?
        .with_batch_size(rows)
        .with_limit(rows)
        .build()?;
    Ok(reader.collect::<std::result::Result<Vec<_>, _>>()?)
}
