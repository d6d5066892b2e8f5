//! Content hashes of files, remembered by (path, size, mtime, ctime, inode), so that a
//! no-op `run` over a multi-gigabyte corpus does not rehash it (dvc #10691, #6656), and so
//! that every command can afford to check each stored file it reads against its manifest.
//!
//! The memo is only a cache: a missing or corrupt memo file means rehashing, never a
//! wrong answer. A file whose size, mtime, ctime or inode changed is rehashed. The ctime
//! is what catches an in-place edit that keeps the size and puts the mtime back (`touch
//! -d`, `cp --preserve`): a process cannot set a file's ctime, the kernel moves it on
//! every write and every metadata change.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::durable::write_atomic;

/// A file's blake3, read through a memory map by rayon's threads.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_mmap_rayon(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(hasher.finalize().to_hex().to_string())
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    /// Absent in memos written before ctime was recorded: such entries never match.
    #[serde(default)]
    ctime_ns: i128,
    inode: u64,
    blake3: String,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata, blake3: String) -> Stamp {
        Stamp {
            size: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
            inode: meta.ino(),
            blake3,
        }
    }

    fn same_file(&self, other: &Stamp) -> bool {
        self.size == other.size
            && self.mtime_ns == other.mtime_ns
            && self.ctime_ns == other.ctime_ns
            && self.inode == other.inode
    }
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

    fn key_and_meta(path: &Path) -> Result<(String, std::fs::Metadata)> {
        let absolute = std::fs::canonicalize(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let meta = std::fs::metadata(&absolute)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        Ok((absolute.to_string_lossy().into_owned(), meta))
    }

    /// The file's blake3, from the memo when the file is unchanged since it was hashed.
    pub fn hash(&self, path: &Path) -> Result<String> {
        let (key, meta) = Self::key_and_meta(path)?;
        let now = Stamp::of(&meta, String::new());
        if let Some(stamp) = self.memo.lock().unwrap().get(&key) {
            if stamp.same_file(&now) {
                return Ok(stamp.blake3.clone());
            }
        }
        let blake3 = hash_file(path)?;
        self.insert(
            key,
            Stamp {
                blake3: blake3.clone(),
                ..now
            },
        );
        Ok(blake3)
    }

    /// Records a hash computed elsewhere (a stage's output, hashed while it was described),
    /// so that the first reader of a new artifact does not hash it again.
    pub fn remember(&self, path: &Path, blake3: &str) -> Result<()> {
        let (key, meta) = Self::key_and_meta(path)?;
        self.insert(key, Stamp::of(&meta, blake3.to_string()));
        Ok(())
    }

    fn insert(&self, key: String, stamp: Stamp) {
        self.memo.lock().unwrap().insert(key, stamp);
        *self.dirty.lock().unwrap() = true;
    }

    /// Forgets files that no longer exist (after `gc`), so the memo does not grow forever.
    pub fn forget_missing(&self) {
        let mut memo = self.memo.lock().unwrap();
        let before = memo.len();
        memo.retain(|path, _| Path::new(path).exists());
        if memo.len() != before {
            *self.dirty.lock().unwrap() = true;
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_in_place_edit_that_restores_size_and_mtime_is_rehashed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("corpus.txt");
        std::fs::write(&file, b"hello world").unwrap();
        let hasher = FileHasher::load(dir.path().join("memo.json"));
        let first = hasher.hash(&file).unwrap();
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        // Same size, same mtime afterwards: only the ctime tells.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file, b"HELLO world").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let second = hasher.hash(&file).unwrap();
        assert_ne!(first, second);
        assert_eq!(second, hash_file(&file).unwrap());
    }

    #[test]
    fn the_memo_survives_a_reload_and_a_stale_entry_never_answers() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.bin");
        std::fs::write(&file, b"abc").unwrap();
        let memo = dir.path().join("memo.json");
        let hasher = FileHasher::load(memo.clone());
        hasher.remember(&file, "not the real hash").unwrap();
        hasher.save().unwrap();
        // The remembered value is served while the file is untouched...
        assert_eq!(
            FileHasher::load(memo.clone()).hash(&file).unwrap(),
            "not the real hash"
        );
        // ...and never once it changed.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&file, b"abd").unwrap();
        assert_eq!(
            FileHasher::load(memo).hash(&file).unwrap(),
            hash_file(&file).unwrap()
        );
    }
}
