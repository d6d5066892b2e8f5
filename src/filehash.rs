//! Content hashes of raw input files, remembered by (path, size, mtime, inode), so that a
//! no-op `run` over a multi-gigabyte corpus does not rehash it (dvc #10691, #6656).
//!
//! The memo is only a cache: a missing or corrupt memo file means rehashing, never a
//! wrong answer, and a file whose size, mtime or inode changed is rehashed.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::store::{hash_file, write_atomic};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    inode: u64,
    blake3: String,
}

pub struct FileHasher {
    memo_path: PathBuf,
    memo: Mutex<BTreeMap<String, Stamp>>,
    dirty: Mutex<bool>,
}

impl FileHasher {
    pub fn load(memo_path: PathBuf) -> FileHasher {
        let memo = std::fs::read(&memo_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        FileHasher {
            memo_path,
            memo: Mutex::new(memo),
            dirty: Mutex::new(false),
        }
    }

    pub fn hash(&self, path: &Path) -> Result<String> {
        let absolute = std::fs::canonicalize(path)
            .with_context(|| format!("{}: cannot read input file", path.display()))?;
        let meta = std::fs::metadata(&absolute)
            .with_context(|| format!("{}: cannot read input file", path.display()))?;
        let key = absolute.to_string_lossy().into_owned();
        let mtime_ns = meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128;
        if let Some(stamp) = self.memo.lock().unwrap().get(&key) {
            if stamp.size == meta.len() && stamp.mtime_ns == mtime_ns && stamp.inode == meta.ino() {
                return Ok(stamp.blake3.clone());
            }
        }
        let blake3 = hash_file(&absolute)?;
        self.memo.lock().unwrap().insert(
            key,
            Stamp {
                size: meta.len(),
                mtime_ns,
                inode: meta.ino(),
                blake3: blake3.clone(),
            },
        );
        *self.dirty.lock().unwrap() = true;
        Ok(blake3)
    }

    /// Persists new hashes. Best effort for readers (`status`), who hold no lock: losing
    /// a memo update only costs a rehash later.
    pub fn save(&self) -> Result<()> {
        if !*self.dirty.lock().unwrap() {
            return Ok(());
        }
        if let Some(parent) = self.memo_path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let bytes = serde_json::to_vec(&*self.memo.lock().unwrap())?;
        write_atomic(&self.memo_path, &bytes)?;
        *self.dirty.lock().unwrap() = false;
        Ok(())
    }
}
