//! `bench --section remote`: push and pull through a remote store, at the scale of the
//! real validation set (the pass-1 and cache chain of 62M targets) and of the demo.
//!
//! Without `--remote`, the bench starts the S3-compatible server the tests use
//! (tools/s3-server: `$CACHEMONEY_S3_SERVER`, or `.tools/bin/cachemoney-s3-server`,
//! which `./dev setup` builds) on a free loopback port, with its data under the bench
//! directory; with `--remote URL` it measures that remote instead (credentials from the
//! environment, as for `run`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{cache_chain_project, median, project_file, timed, timed_with_rss};

/// The loopback server, stopped when dropped.
struct LocalServer {
    child: Child,
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

fn start_server(data: &Path) -> Result<(LocalServer, String)> {
    let binary = std::env::var_os("CACHEMONEY_S3_SERVER")
        .map(PathBuf::from)
        .or_else(|| project_file(".tools/bin/cachemoney-s3-server").ok())
        .filter(|p| p.is_file())
        .context("no S3 server to bench against: pass --remote URL, or run `./dev setup` (it builds the test server into .tools/)")?;
    std::fs::create_dir_all(data.join("bench"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let (key, secret) = ("cachemoney-bench", "cachemoney-bench-secret");
    let child = Command::new(&binary)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", key, "--secret-key", secret])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("{}: cannot start", binary.display()))?;
    let server = LocalServer { child };
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if started.elapsed() > Duration::from_secs(20) {
            bail!("{}: not listening on port {port}", binary.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The children (push, pull) read these, as a user's would.
    std::env::set_var("AWS_ENDPOINT", format!("http://127.0.0.1:{port}"));
    std::env::set_var("AWS_ACCESS_KEY_ID", key);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", secret);
    std::env::set_var("AWS_REGION", "us-east-1");
    Ok((server, "s3://bench".to_string()))
}

/// Bytes under `dir`, recursively.
fn bytes_under(dir: &Path) -> (u64, u64) {
    let (mut total, mut largest) = (0u64, 0u64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(meta) = entry.metadata() {
                total += meta.len();
                largest = largest.max(meta.len());
            }
        }
    }
    (total, largest)
}

/// A second "machine": the project's pipeline and inputs, without its store.
fn fresh_copy(project: &Path, to: &Path, entries: &[&str]) -> Result<()> {
    if to.exists() {
        std::fs::remove_dir_all(to)?;
    }
    std::fs::create_dir_all(to)?;
    for entry in entries {
        let from = project.join(entry);
        if from.exists() {
            std::os::unix::fs::symlink(std::fs::canonicalize(&from)?, to.join(entry))?;
        }
    }
    Ok(())
}

/// Pushes `project`'s store to a fresh prefix and pulls it into a fresh store, `repeats`
/// times; prints wall time, rate and the largest peak RSS of each direction.
fn push_and_pull(
    label: &str,
    project: &Path,
    entries: &[&str],
    url: &str,
    scratch: &Path,
    repeats: usize,
    local_data: Option<&Path>,
) -> Result<()> {
    // What the pipeline points to (a store may hold older builds too): measured on the
    // second machine, which gets exactly that.
    let mut bytes = 0;
    let (mut pushes, mut pulls, mut push_rss, mut pull_rss) = (Vec::new(), Vec::new(), 0, 0);
    for run in 0..repeats.max(1) {
        let remote = format!("{url}/{label}-{}-{run}", std::process::id());
        let (seconds, rss) = timed_with_rss(project, &["--remote", &remote, "push", "-q"])?;
        pushes.push(seconds);
        push_rss = push_rss.max(rss);
        let machine_b = scratch.join(format!("{label}-machine-b"));
        fresh_copy(project, &machine_b, entries)?;
        let (seconds, rss) = timed_with_rss(&machine_b, &["--remote", &remote, "pull", "-q"])?;
        pulls.push(seconds);
        pull_rss = pull_rss.max(rss);
        let (pulled, largest) = bytes_under(&machine_b.join("artifacts"));
        if run == 0 {
            bytes = pulled;
            println!(
                "{label}: {:.2} GB in the pipeline's artifacts, largest file {:.2} GB (median of {repeats})",
                bytes as f64 / 1e9,
                largest as f64 / 1e9
            );
        } else if pulled != bytes {
            bail!("{label}: pulled {pulled} bytes, the first time {bytes}");
        }
        println!(
            "  push {:>7.2} s ({:>5.0} MB/s, peak RSS {:>4.0} MB)   pull {:>7.2} s ({:>5.0} MB/s, peak RSS {:>4.0} MB)",
            pushes[run],
            bytes as f64 / 1e6 / pushes[run],
            rss_mb(push_rss),
            pulls[run],
            bytes as f64 / 1e6 / pulls[run],
            rss_mb(pull_rss)
        );
        std::fs::remove_dir_all(&machine_b).ok();
        // The bench's own loopback server: its copy goes too (gigabytes per run).
        if let Some(data) = local_data {
            if let Some(prefix) = remote.rsplit('/').next() {
                std::fs::remove_dir_all(data.join("bench").join(prefix)).ok();
            }
        }
    }
    let (push, pull) = (median(pushes), median(pulls));
    println!(
        "{:<44} median {push:>8.2} s  {:>6.0} MB/s  peak RSS {:.0} MB",
        format!("{label}: push (files, then manifests)"),
        bytes as f64 / 1e6 / push,
        rss_mb(push_rss)
    );
    println!(
        "{:<44} median {pull:>8.2} s  {:>6.0} MB/s  peak RSS {:.0} MB",
        format!("{label}: pull (download, verify, commit)"),
        bytes as f64 / 1e6 / pull,
        rss_mb(pull_rss)
    );
    Ok(())
}

fn rss_mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

pub(super) fn remote(
    scratch: &Path,
    repeats: usize,
    targets: usize,
    remote: Option<String>,
) -> Result<()> {
    let data = scratch.join("s3-data");
    let (_server, url, local_data) = match remote {
        Some(url) => (None, url.trim_end_matches('/').to_string(), None),
        None => {
            let (server, url) = start_server(&data)?;
            (Some(server), url, Some(data.as_path()))
        }
    };
    println!("remote {url}");
    // The demo store, if this project has built it (`./dev run`).
    let demo = project_file("pipeline.toml")?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    if bytes_under(&demo.join("artifacts")).0 > 0 {
        push_and_pull(
            "demo",
            &demo,
            &["pipeline.toml", "data", "examples", ".venv"],
            &url,
            scratch,
            repeats,
            local_data,
        )?;
    } else {
        println!("demo: no store here (run `./dev run` first); skipped");
    }
    let chain = cache_chain_project(scratch, targets, "")?;
    timed(&chain, &["run", "-q"])?;
    push_and_pull(
        "chain",
        &chain,
        &["pipeline.toml", "shards"],
        &url,
        scratch,
        repeats,
        local_data,
    )
}
