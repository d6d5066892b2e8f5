//! The content-addressed artifact store.
//!
//! ```text
//! artifacts/
//!   <stage>/<recipe>/          one finished artifact: its files and manifest.json
//!   refs/<node>.json           the last recipe each pipeline node resolved to (for `status`)
//!   seeds.parquet              the `seeds` table of the last `run --seeds` (per-seed metrics)
//!   .tmp/                      work in progress; never read, swept at the next run
//!   .cache/file-hashes.json    blake3 of raw inputs and stored files, by (path, size, mtime, ctime, inode)
//!   .lock                      held (flock) by the one process that may write
//! ```
//!
//! Why it is built this way (docs/store.md): an artifact directory appears by a single
//! `rename` of a fully written, fsynced temporary directory whose manifest was written
//! last, so a directory with a manifest is complete, and a crash leaves only `.tmp/`
//! litter. The lock is an OS file lock, so a killed run cannot leave a lock behind; the
//! PID written into the lock file only serves the error message of a second run.
//!
//! Every reader checks what it reads: a stored file whose bytes no longer match its
//! manifest is reported (file, problem, the command that repairs it) and never read. The
//! check costs one `stat` per file, because blake3s are memoised by the file's identity
//! (see [`crate::filehash`]); a file that changed in any way is rehashed.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use arrow::array::RecordBatch;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::durable::sync_dir;
pub use crate::durable::{write_atomic, write_synced};
pub use crate::filehash::hash_file;
use crate::filehash::FileHasher;
use crate::recipe::Ingredients;
pub use crate::timestamps::{age_of, format_duration, now_rfc3339, parse_duration};

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
    /// content hash (see `stage_api::Output::volatile`).
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

/// What the last run recorded for a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRef {
    pub recipe: String,
    pub content_hash: String,
    pub ingredients: Ingredients,
}

mod listing;
pub use listing::{Listing, StoreProblem};

pub struct Store {
    root: PathBuf,
    hasher: FileHasher,
}

/// An artifact as the store holds it, checked against its manifest.
#[derive(Debug)]
pub enum Stored {
    /// No artifact with that recipe.
    Absent,
    /// Every file matches the manifest.
    Intact(Manifest),
    /// Present, but not to be read: an unreadable manifest (`manifest` is `None`) or
    /// files that are missing or differ from it. Each problem names a file.
    Damaged {
        manifest: Option<Manifest>,
        problems: Vec<String>,
    },
}

/// Node names become file names (`refs/NODE.json`) and SQL identifiers; the pipeline
/// refuses other names when it loads, and the store refuses them again rather than
/// build a path from one.
pub fn is_valid_node_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= MAX_NODE_NAME
}

pub const MAX_NODE_NAME: usize = 63;

/// A file name a manifest may list: one plain path component.
pub(crate) fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
}

/// Held while a process may write to the store; released on drop or process death.
pub struct StoreLock {
    _file: File,
}

impl Store {
    pub fn open(root: impl Into<PathBuf>) -> Store {
        let root = root.into();
        let hasher = FileHasher::load(root.join(".cache").join("file-hashes.json"));
        Store { root, hasher }
    }

    /// The memo of file hashes (raw inputs and stored files alike).
    pub fn hasher(&self) -> &FileHasher {
        &self.hasher
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
        // On a read-only store the lock is taken on a read-only descriptor (flock needs
        // no write access), so a run that has nothing to write still works there.
        let (mut file, writable) = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
        {
            Ok(file) => (file, true),
            Err(e) if path.exists() && e.kind() != std::io::ErrorKind::NotFound => (
                File::open(&path)
                    .with_context(|| format!("{}: cannot open lock file", path.display()))?,
                false,
            ),
            Err(e) => {
                return Err(e).with_context(|| format!("{}: cannot open lock file", path.display()))
            }
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "a process that has not said who it is yet",
                    text => text,
                };
                if !wait {
                    bail!(
                        "{}: the store is locked by another cachemoney run ({holder}); wait for it to finish or pass --wait",
                        path.display(),
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
        if writable {
            file.set_len(0)?;
            let mut writer = &file;
            write!(writer, "pid {} since {}", std::process::id(), now_rfc3339())?;
            writer.flush()?;
        }
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

    /// The artifact with this recipe, checked file by file against its manifest (a `stat`
    /// per file while the memoised hashes hold).
    pub fn lookup(&self, stage: &str, recipe: &str) -> Stored {
        let dir = self.artifact_dir(stage, recipe);
        match read_manifest(&dir) {
            Ok(None) => Stored::Absent,
            Err(e) => Stored::Damaged {
                manifest: None,
                problems: vec![format!("{e:#}")],
            },
            Ok(Some(manifest)) => {
                let problems = self.check_files(&dir, &manifest);
                if problems.is_empty() {
                    Stored::Intact(manifest)
                } else {
                    Stored::Damaged {
                        manifest: Some(manifest),
                        problems,
                    }
                }
            }
        }
    }

    /// What is wrong with an artifact's files, by memoised hashes; empty when intact.
    pub fn check_files(&self, dir: &Path, manifest: &Manifest) -> Vec<String> {
        let problems = check_files_with(dir, manifest, |path| self.hasher.hash(path));
        // Readers hold no lock: losing a memo update only costs a rehash later.
        self.hasher.save().ok();
        problems
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
        // The files were hashed when they were described: remember those hashes under
        // their final paths, so the first reader does not hash gigabytes again.
        for (name, file) in &manifest.files {
            self.hasher.remember(&target.join(name), &file.blake3)?;
        }
        self.hasher.save()?;
        Ok(target)
    }

    /// Deletes an artifact: first renamed out of sight, then removed.
    pub fn remove(&self, _lock: &StoreLock, stage: &str, recipe: &str) -> Result<()> {
        self.remove_path(_lock, &self.artifact_dir(stage, recipe))
    }

    /// Deletes a directory or file of the store (an artifact, or what `verify` lists as
    /// a problem): renamed out of sight first, so no reader sees it half removed.
    pub fn remove_path(&self, _lock: &StoreLock, path: &Path) -> Result<()> {
        if !path.starts_with(&self.root) || path == self.root {
            bail!(
                "{}: not inside the store {}",
                path.display(),
                self.root.display()
            );
        }
        let trash = self.root.join(".tmp").join(format!(
            "gc-{}-{}",
            path.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        fs::rename(path, &trash).with_context(|| format!("{}: cannot remove", path.display()))?;
        let removed = if trash.is_dir() {
            fs::remove_dir_all(&trash)
        } else {
            fs::remove_file(&trash)
        };
        removed.with_context(|| format!("{}: cannot remove", trash.display()))
    }

    fn node_ref_path(&self, node: &str) -> Result<PathBuf> {
        if !is_valid_node_name(node) {
            bail!("node name '{node}' is not a valid node name; refusing to build a path from it");
        }
        Ok(self.root.join("refs").join(format!("{node}.json")))
    }

    pub fn node_ref(&self, node: &str) -> Option<NodeRef> {
        let text = fs::read(self.node_ref_path(node).ok()?).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Records what `node` resolved to; written only when it changed, so a run that
    /// changes nothing writes nothing (and works on a read-only store).
    pub fn set_node_ref(&self, _lock: &StoreLock, node: &str, node_ref: &NodeRef) -> Result<()> {
        let path = self.node_ref_path(node)?;
        let bytes = serde_json::to_vec_pretty(node_ref)?;
        if fs::read(&path).is_ok_and(|old| old == bytes) {
            return Ok(());
        }
        write_atomic(&path, &bytes)
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
    let manifest: Manifest = match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            anyhow::anyhow!(
                "{}: corrupt manifest ({e}); `cachemoney gc` removes it",
                path.display()
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
    };
    if let Some(bad) = manifest.files.keys().find(|name| !is_plain_file_name(name)) {
        bail!(
            "{}: corrupt manifest (file name '{bad}' is not a plain file name); `cachemoney gc` removes it",
            path.display()
        );
    }
    Ok(Some(manifest))
}

/// Problems found by rehashing an artifact's files against its manifest, ignoring any
/// memo: what `verify` and `audit` use.
pub fn verify_artifact(dir: &Path, manifest: &Manifest) -> Vec<String> {
    check_files_with(dir, manifest, hash_file)
}

fn check_files_with(
    dir: &Path,
    manifest: &Manifest,
    hash: impl Fn(&Path) -> Result<String>,
) -> Vec<String> {
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
            Ok(_) => match hash(&path) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
