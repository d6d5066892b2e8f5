//! The content-addressed artifact store.
//!
//! ```text
//! artifacts/
//!   <stage>/<recipe>/          one finished artifact: its files and manifest.json
//!   refs/<node>.json           the last recipe each pipeline node resolved to (for `status`)
//!   seeds.parquet              the `seeds` table of the last `run --seeds` (per-seed metrics)
//!   .tmp/                      work in progress; never read, swept at the next run
//!   .cache/file-hashes.json    content hashes of raw inputs, keyed by (path, size, mtime, inode)
//!   .lock                      held (flock) by the one process that may write
//! ```
//!
//! Why it is built this way (DESIGN.md §3): an artifact directory appears by a single
//! `rename` of a fully written, fsynced temporary directory whose manifest was written
//! last, so a directory with a manifest is complete, and a crash leaves only `.tmp/`
//! litter. The lock is an OS file lock, so a killed run cannot leave a lock behind; the
//! PID written into the lock file only serves the error message of a second run.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::recipe::Ingredients;

pub const MANIFEST: &str = "manifest.json";

/// One output file of an artifact as recorded in its manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutputFile {
    pub blake3: String,
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    /// `[column, arrow type]` pairs for Parquet tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Vec<(String, String)>>,
    /// Not reproducible by nature (timings): verified like any file, but left out of the
    /// content hash (see `StageReport::volatile_files`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub volatile: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub recipe: String,
    pub stage: String,
    pub version: u32,
    /// The node that built it. Informational: the same recipe may serve several nodes.
    pub node: String,
    pub ingredients: Ingredients,
    pub files: BTreeMap<String, OutputFile>,
    pub content_hash: String,
    /// What the stage reported (counts, figures).
    pub report: serde_json::Map<String, Value>,
    pub created_at: String,
    pub seconds: f64,
    /// Report entries that describe the build, not the inputs (`StageReport::volatile_keys`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volatile_report: Vec<String>,
    /// The stage's own phase timings, e.g. `train_bpe`, `encode_and_write`.
    #[serde(default)]
    pub phase_seconds: Vec<(String, f64)>,
    pub tool_version: String,
    pub threads: usize,
}

/// The hash of an artifact's content: its file names and their hashes, nothing else.
/// Volatile files (timings) are left out: they differ on every run by nature.
pub fn content_hash(files: &BTreeMap<String, OutputFile>) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"cachemoney.content.v1\n");
    for (name, file) in files.iter().filter(|(_, f)| !f.volatile) {
        hasher.update(name.as_bytes());
        hasher.update(b"\0");
        hasher.update(file.blake3.as_bytes());
        hasher.update(b"\n");
    }
    hasher.finalize().to_hex().to_string()
}

pub fn hash_file(path: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_mmap_rayon(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// What the last run recorded for a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRef {
    pub recipe: String,
    pub content_hash: String,
    pub ingredients: Ingredients,
}

pub struct Store {
    root: PathBuf,
}

/// Held while a process may write to the store; released on drop or process death.
pub struct StoreLock {
    _file: File,
}

impl Store {
    pub fn open(root: impl Into<PathBuf>) -> Store {
        Store { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn artifact_dir(&self, stage: &str, recipe: &str) -> PathBuf {
        self.root.join(stage).join(recipe)
    }

    fn ensure_layout(&self) -> Result<()> {
        for dir in [
            self.root.clone(),
            self.root.join(".tmp"),
            self.root.join("refs"),
            self.root.join(".cache"),
        ] {
            fs::create_dir_all(&dir)
                .with_context(|| format!("{}: cannot create store directory", dir.display()))?;
        }
        Ok(())
    }

    /// Takes the store's write lock. With `wait`, blocks until the other run ends;
    /// otherwise fails at once, naming the process that holds it.
    pub fn lock(&self, wait: bool) -> Result<StoreLock> {
        self.ensure_layout()?;
        let path = self.root.join(".lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("{}: cannot open lock file", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                if !wait {
                    bail!(
                        "{}: the store is locked by another cachemoney run ({}); wait for it to finish or pass --wait",
                        path.display(),
                        if holder.is_empty() { "unknown process" } else { holder }
                    );
                }
                eprintln!("waiting for the store lock held by {holder} ...");
                file.lock()
                    .with_context(|| format!("{}: cannot lock", path.display()))?;
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("{}: cannot lock", path.display()))
            }
        }
        // Record who holds it, for the message a second run prints. A lock file left by
        // a killed run is harmless: the OS dropped its lock with the process.
        file.set_len(0)?;
        let mut writer = &file;
        write!(writer, "pid {} since {}", std::process::id(), now_rfc3339())?;
        writer.flush()?;
        Ok(StoreLock { _file: file })
    }

    /// Removes work left in `.tmp/` by a crashed or killed run. Call with the lock held.
    pub fn sweep_tmp(&self, _lock: &StoreLock) -> Result<usize> {
        let tmp = self.root.join(".tmp");
        let mut swept = 0;
        if let Ok(entries) = fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let path = entry.path();
                let removed = if path.is_dir() {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                };
                removed.with_context(|| format!("{}: cannot remove leftover", path.display()))?;
                swept += 1;
            }
        }
        Ok(swept)
    }

    /// A fresh, empty directory for a stage to write into.
    pub fn scratch_dir(&self, _lock: &StoreLock, label: &str) -> Result<PathBuf> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = self
            .root
            .join(".tmp")
            .join(format!("{label}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        Ok(dir)
    }

    /// The manifest of a finished artifact, if there is one.
    pub fn manifest(&self, stage: &str, recipe: &str) -> Result<Option<Manifest>> {
        read_manifest(&self.artifact_dir(stage, recipe))
    }

    /// Writes `manifest` into `scratch`, fsyncs, and renames it into place. If the same
    /// recipe is already stored (a forced rebuild), the old artifact is replaced.
    pub fn commit(
        &self,
        _lock: &StoreLock,
        scratch: &Path,
        manifest: &Manifest,
    ) -> Result<PathBuf> {
        let manifest_path = scratch.join(MANIFEST);
        let json = serde_json::to_vec_pretty(manifest)?;
        write_synced(&manifest_path, &json)?;
        sync_dir(scratch)?;
        let stage_dir = self.root.join(&manifest.stage);
        fs::create_dir_all(&stage_dir)
            .with_context(|| format!("{}: cannot create", stage_dir.display()))?;
        let target = stage_dir.join(&manifest.recipe);
        if target.exists() {
            let trash = self.root.join(".tmp").join(format!(
                "replaced-{}-{}",
                manifest.recipe,
                std::process::id()
            ));
            fs::rename(&target, &trash)
                .with_context(|| format!("{}: cannot move aside", target.display()))?;
            fs::rename(scratch, &target)
                .with_context(|| format!("{}: cannot move into place", target.display()))?;
            let _ = fs::remove_dir_all(&trash);
        } else {
            fs::rename(scratch, &target)
                .with_context(|| format!("{}: cannot move into place", target.display()))?;
        }
        sync_dir(&stage_dir)?;
        Ok(target)
    }

    /// Deletes an artifact: first renamed out of sight, then removed.
    pub fn remove(&self, _lock: &StoreLock, stage: &str, recipe: &str) -> Result<()> {
        let dir = self.artifact_dir(stage, recipe);
        let trash = self
            .root
            .join(".tmp")
            .join(format!("gc-{recipe}-{}", std::process::id()));
        fs::rename(&dir, &trash).with_context(|| format!("{}: cannot remove", dir.display()))?;
        fs::remove_dir_all(&trash).with_context(|| format!("{}: cannot remove", trash.display()))
    }

    /// Every finished artifact in the store.
    pub fn all_manifests(&self) -> Result<Vec<(PathBuf, Manifest)>> {
        let mut found = Vec::new();
        let Ok(stages) = fs::read_dir(&self.root) else {
            return Ok(found);
        };
        for stage in stages.flatten() {
            let name = stage.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name == "refs" || !stage.path().is_dir() {
                continue;
            }
            for artifact in fs::read_dir(stage.path())?.flatten() {
                let dir = artifact.path();
                if let Some(manifest) = read_manifest(&dir)? {
                    found.push((dir, manifest));
                }
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(found)
    }

    pub fn node_ref(&self, node: &str) -> Option<NodeRef> {
        let text = fs::read(self.root.join("refs").join(format!("{node}.json"))).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn set_node_ref(&self, _lock: &StoreLock, node: &str, node_ref: &NodeRef) -> Result<()> {
        let path = self.root.join("refs").join(format!("{node}.json"));
        write_atomic(&path, &serde_json::to_vec_pretty(node_ref)?)
    }

    /// The `seeds` table of the last `run --seeds` (see [`crate::seeds`]).
    pub fn seeds_table_path(&self) -> PathBuf {
        self.root.join("seeds.parquet")
    }

    /// Written like a stage's table (fixed Parquet properties, fsynced), then renamed into
    /// place, so a reader sees the old table or the new one.
    pub fn set_seeds_table(&self, _lock: &StoreLock, table: RecordBatch) -> Result<()> {
        let path = self.seeds_table_path();
        let tmp = path.with_extension(format!("parquet.tmp-{}", std::process::id()));
        stage_api::write_parquet(&tmp, table.schema(), [table], &Default::default())?;
        fs::rename(&tmp, &path).with_context(|| format!("{}: cannot replace", path.display()))
    }

    pub fn file_hash_cache_path(&self) -> PathBuf {
        self.root.join(".cache").join("file-hashes.json")
    }
}

fn read_manifest(dir: &Path) -> Result<Option<Manifest>> {
    let path = dir.join(MANIFEST);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{}: corrupt manifest", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
    }
}

/// Problems found by rehashing an artifact's files against its manifest.
pub fn verify_artifact(dir: &Path, manifest: &Manifest) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, recorded) in &manifest.files {
        let path = dir.join(name);
        match fs::metadata(&path) {
            Err(_) => problems.push(format!("{}: missing", path.display())),
            Ok(meta) if meta.len() != recorded.bytes => problems.push(format!(
                "{}: size {} differs from the manifest's {}",
                path.display(),
                meta.len(),
                recorded.bytes
            )),
            Ok(_) => match hash_file(&path) {
                Ok(hash) if hash == recorded.blake3 => {}
                Ok(hash) => problems.push(format!(
                    "{}: content hash {} differs from the manifest's {} (modified after it was written)",
                    path.display(),
                    &hash[..16],
                    &recorded.blake3[..16]
                )),
                Err(e) => problems.push(format!("{e:#}")),
            },
        }
    }
    if content_hash(&manifest.files) != manifest.content_hash {
        problems.push(format!(
            "{}: content hash in the manifest does not match its file list",
            dir.join(MANIFEST).display()
        ));
    }
    problems
}

pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file =
        File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .with_context(|| format!("{}: cannot write", path.display()))
}

/// Write to a sibling temporary file, fsync, rename over: readers see old or new, whole.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, path).with_context(|| format!("{}: cannot replace", path.display()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("{}: cannot fsync directory", dir.display()))
}

pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_781), (2026, 11, 24));
    }

    #[test]
    fn second_lock_fails_fast_and_names_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path());
        let _held = store.lock(false).unwrap();
        // A second open file description contends like a second process would.
        let err = store.lock(false).err().unwrap().to_string();
        assert!(err.contains("locked by another cachemoney run"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
    }
}
