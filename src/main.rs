use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cachemoney::commands::{self, Session};
use cachemoney::runner::RunOptions;
use cachemoney::sql::Format;

/// cachemoney: a content-addressed pipeline for LM-compression experiments.
///
/// It reproduces the "CacheMoney" Parameter Golf record (a tiny GPT plus n-gram and phrase
/// caches) as a DAG of stages: tokenize → train → pass-1 → cache → calibrate → pass-2.
/// Each stage's outputs are stored under artifacts/, keyed by a hash of everything that
/// went into them, so a rerun only redoes what changed and every number can be traced
/// and re-derived.
///
/// Start with `cachemoney run`, then `cachemoney status` and `cachemoney sql`.
#[derive(Parser)]
#[command(name = "cachemoney", version, max_term_width = 100)]
struct Cli {
    /// The pipeline to work on.
    #[arg(long, short = 'p', global = true, default_value = "pipeline.toml")]
    pipeline: PathBuf,

    /// No progress bars and no per-node lines; errors still go to stderr.
    #[arg(long, short = 'q', global = true)]
    quiet: bool,

    /// Worker threads for stages (default: all cores; 1 to 1024). Outputs do not depend
    /// on it.
    #[arg(long, global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,

    /// Memory a stage may plan to use, as bytes or with a unit (512M, 8G); stages that
    /// allocate large tables refuse up front when their estimate exceeds it. Default:
    /// what the machine has available (MemAvailable, the cgroup's limit and the
    /// address-space limit, whichever is least).
    #[arg(long, global = true, value_name = "SIZE", value_parser = parse_size)]
    memory_limit: Option<u64>,

    /// Run seeds (comma-separated): every node that depends on the training seed is run
    /// once per seed, as NODE_seedN; the rest is shared. Overrides the pipeline's `seeds`.
    /// `run` then writes the `seeds` table (per-seed metrics, mean, sample std).
    #[arg(long, global = true, value_delimiter = ',', value_name = "SEEDS")]
    seeds: Option<Vec<u64>>,

    /// A shared store (s3://bucket/prefix, gs://, az://, file:///path, http(s)://):
    /// `run` pulls what it holds and pushes what it builds. Overrides the pipeline's
    /// `remote`. Credentials and endpoint come from the environment (docs/remote.md).
    #[arg(long, global = true, value_name = "URL")]
    remote: Option<String>,

    /// Ignore the remote: work with the local store alone.
    #[arg(long, global = true, conflicts_with = "remote")]
    offline: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build every node that is not cached, in dependency order.
    ///
    /// A node is reused when an artifact with its exact recipe (stage, version,
    /// parameters, input contents) exists. Upstream nodes that rerun but produce the same
    /// bytes leave everything downstream cached. Interrupted runs leave nothing half
    /// written: rerun and only the unfinished node is redone.
    Run {
        /// Stop after this node (and what it needs).
        #[arg(long, value_name = "NODE")]
        until: Option<String>,
        /// Rebuild this node even if cached (repeatable). Downstream stays cached when the
        /// rebuild gives identical bytes.
        #[arg(long, value_name = "NODE")]
        force: Vec<String>,
        /// If another run holds the store, wait for it instead of failing.
        #[arg(long)]
        wait: bool,
    },
    /// Show each node as cached, stale (and why) or missing; with a remote, whether the
    /// remote holds it too.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show everything that goes into a node's recipe, and the recipe.
    Explain {
        node: String,
        #[arg(long)]
        json: bool,
    },
    /// Show a node's artifact: manifest, files, table schemas and first rows.
    Show {
        node: String,
        /// Rows to print per table.
        #[arg(long, default_value_t = 5)]
        rows: usize,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Query artifacts with SQL (DataFusion); without a query, an interactive prompt.
    ///
    /// Tables: every Parquet output of every cached node, as NODE.TABLE (tokens.val), as
    /// TABLE when the name is unique (val), and as NODE when the node has one table; plus
    /// `artifacts`, one row per stored artifact. Read-only. In the prompt, \d lists
    /// tables and \d TABLE shows columns.
    Sql {
        query: Option<String>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Every built pass2 node's BPB side by side (neural, after n-gram, final) with its
    /// cache mode and calibrated blend, grouped by the pass-1 it scores.
    Compare {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// A claimed BPB (a submission's headline) to hold each chain's final BPB against;
        /// exits 1 when a chain checked is outside the spread.
        #[arg(long, value_name = "BPB")]
        claim: Option<String>,
        /// The claim's stated seed spread; by default half a unit of its last digit (the
        /// claim as precise as it is written).
        #[arg(long, value_name = "BPB", requires = "claim")]
        spread: Option<f64>,
        /// The chain (its scores node) the claim is about; by default every chain.
        #[arg(long, value_name = "NODE", requires = "claim")]
        chain: Option<String>,
    },
    /// The legality probes' verdicts on every chain: C1 prefix invariance, C1 target
    /// independence, C2 normalisation, byte accounting (docs/legality.md).
    ///
    /// Reads the built legality nodes (`cachemoney run` builds them) and prints chains
    /// down, probes across, then the evidence of each failure. Exits 1 when any probe
    /// shown failed, so CI can gate on it.
    Legality {
        /// Only these legality nodes or chains (the chain's last node).
        nodes: Vec<String>,
        /// Machine-readable output: one object per (chain, probe) with its evidence.
        #[arg(long)]
        json: bool,
    },
    /// Write one self-contained HTML page of figures over the built artifacts.
    ///
    /// BPB waterfalls per chain, calibration grids as heat maps, match rate and BPB by
    /// n-gram order and phrase length, training curves, the implied-mass distribution,
    /// and the seeds table in a multi-seed run. Inline SVG, nothing fetched: it opens
    /// offline. Each figure shows the SQL and artifacts it came from.
    Report {
        /// Where to write the page.
        #[arg(long, short = 'o', default_value = "report.html")]
        out: PathBuf,
    },
    /// Rehash every stored file and compare with its manifest.
    Verify,
    /// Rebuild nodes from their stored inputs and compare with the stored bytes.
    ///
    /// `verify` shows that files were not changed after they were written; `audit` shows
    /// that the code writes them again: each node is re-executed into a scratch directory,
    /// its stored files are rehashed against the manifest, and the rebuild is compared
    /// with both. A difference names the file and, for a table, the column and first row
    /// that differ, with both values. Exits 1 if any node differs. The store is not
    /// changed.
    Audit {
        /// Nodes to audit (in pipeline order); each must be built.
        #[arg(required_unless_present = "all")]
        nodes: Vec<String>,
        /// Audit every node of the pipeline.
        #[arg(long, conflicts_with = "nodes")]
        all: bool,
        /// If another run holds the store, wait for it instead of failing.
        #[arg(long)]
        wait: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Delete artifacts that no node of the pipeline currently points to.
    ///
    /// By default it keeps, per node, the most recent build it no longer points to
    /// (`--keep`) and anything built in the last day (`--grace`), and says what it kept;
    /// `--keep 0 --grace 0` removes every unreferenced artifact. Entries that are not
    /// artifacts (a corrupt manifest, a stray file) are removed too.
    Gc {
        /// Only list what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// If another run holds the store, wait for it instead of failing.
        #[arg(long)]
        wait: bool,
        /// Per node, keep this many of its most recent unreferenced builds.
        #[arg(long, default_value_t = 1, value_name = "N")]
        keep: usize,
        /// Keep anything built less than this long ago (90s, 30m, 24h, 7d, 0).
        #[arg(long, default_value = "1d", value_parser = cachemoney::store::parse_duration, value_name = "AGE")]
        grace: std::time::Duration,
    },
    /// Upload built nodes' artifacts to the remote (default: every built node).
    ///
    /// Files go first, each under its blake3, then the manifest with a create-only put:
    /// the remote never holds a manifest whose files are not all there, and the first
    /// writer of a recipe wins. What the remote already holds is skipped. Exits 1 when
    /// the remote holds other bytes for a recipe (a stage that is not deterministic).
    Push {
        /// Only these nodes.
        nodes: Vec<String>,
    },
    /// Download from the remote what this store lacks (default: every node the remote
    /// holds), verifying every file against its manifest before it is stored.
    ///
    /// Recipes resolve through the remote's manifests, so a node can be pulled without
    /// its upstream. `run` does the same for what it needs; `pull` fetches without
    /// building anything. Exits 1 when a remote object fails verification.
    Pull {
        /// Only these nodes.
        nodes: Vec<String>,
        /// If another run holds the store, wait for it instead of failing.
        #[arg(long)]
        wait: bool,
    },
    /// The remote store itself.
    Remote {
        #[command(subcommand)]
        command: RemoteCommand,
    },
    /// List the stage kinds this binary knows, with their parameters' defaults.
    Stages,
}

#[derive(Subcommand)]
enum RemoteCommand {
    /// List what in the remote no manifest references, and manifests whose files are
    /// missing there. Only with --dry-run: cachemoney never deletes remote objects.
    Gc {
        /// List only (required).
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() -> ExitCode {
    // A scorer's sandbox launcher is this program re-entered (cachemoney-sandbox): it
    // must start single-threaded, before anything else runs.
    sandbox::enter_launcher_if_requested();
    let cli = Cli::parse();
    if let Some(threads) = cli.threads {
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.into())
            .build_global()
        {
            eprintln!("error: --threads {threads}: cannot start the thread pool: {e}");
            return ExitCode::FAILURE;
        }
    }
    match dispatch(cli) {
        Ok(code) => code,
        // Like other Unix filters: `cachemoney sql … | head` ends quietly when its reader
        // has read enough (see cachemoney::output).
        Err(e) if cachemoney::output::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let message = format!("{e:#}");
            eprintln!("error: {}", message.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    cachemoney::memory::parse_size(text)
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let show_progress = !cli.quiet && std::io::stderr().is_terminal();
    if let Command::Stages = cli.command {
        commands::stages()?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut session = Session::open(&cli.pipeline, cli.seeds.as_deref())?;
    session.remote_url = cli.remote;
    session.offline = cli.offline;
    session.memory_limit = match cli.memory_limit {
        Some(limit) => limit,
        None => cachemoney::memory::available_bytes(),
    };
    match cli.command {
        Command::Run { until, force, wait } => {
            let options = RunOptions {
                until,
                force: force.into_iter().collect::<BTreeSet<_>>(),
                wait,
                quiet: cli.quiet,
                show_progress,
            };
            session.run(&options)?;
        }
        Command::Status { json } => session.status(json)?,
        Command::Push { nodes } => {
            if !session.push(&nodes, cli.quiet, show_progress)? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Pull { nodes, wait } => {
            if !session.pull(&nodes, wait, cli.quiet, show_progress)? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Remote {
            command: RemoteCommand::Gc { dry_run },
        } => {
            if !session.remote_gc(dry_run)? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Explain { node, json } => session.explain(&node, json)?,
        Command::Show { node, rows, json } => session.show(&node, rows, json)?,
        Command::Sql { query, format } => session.sql(query.as_deref(), format)?,
        Command::Compare {
            json,
            claim,
            spread,
            chain,
        } => {
            let claim = claim
                .map(|c| commands::Claim::parse(&c, spread, chain))
                .transpose()?;
            if !session.compare(json, claim.as_ref())? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Report { out } => session.report(&out, cli.quiet)?,
        Command::Legality { nodes, json } => {
            if !session.legality(&nodes, json)? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Verify => {
            if !session.verify(cli.quiet)? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Audit {
            nodes,
            all: _,
            wait,
            json,
        } => {
            let options = RunOptions {
                until: None,
                force: BTreeSet::new(),
                wait,
                quiet: cli.quiet,
                show_progress,
            };
            if !session.audit(&nodes, &options, json)? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Gc {
            dry_run,
            wait,
            keep,
            grace,
        } => session.gc(&commands::GcOptions {
            dry_run,
            wait,
            keep,
            grace,
        })?,
        Command::Stages => unreachable!("handled above"),
    }
    Ok(ExitCode::SUCCESS)
}
