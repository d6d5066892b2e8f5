//! Pulls: the files of many artifacts fetched together, each blob once, every file
//! verified (size, then blake3 as the bytes arrive) before anything is committed.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use futures::StreamExt;
use indicatif::ProgressBar;
use object_store::ObjectStoreExt;

use super::{Refused, Remote, Transfer, CONCURRENCY, PARTS_IN_FLIGHT};
use crate::recipe::short;
use crate::store::{Manifest, OutputFile};

impl Remote {
    /// Downloads the artifacts the manifests describe, each into its directory (an empty
    /// scratch directory), their files fetched together (a store of many small artifacts
    /// is bound by round trips, not bandwidth): one result per artifact, in order. A
    /// failed artifact's directory must be thrown away.
    pub fn pull_many(
        &self,
        jobs: &[(&Manifest, &Path)],
        bar: &ProgressBar,
    ) -> Vec<Result<Transfer>> {
        let started = Instant::now();
        bar.set_length(
            jobs.iter()
                .flat_map(|(m, _)| m.files.values())
                .map(|f| f.bytes)
                .sum(),
        );
        // Each blob is downloaded once; files with the same content (a re-run's copy of
        // its input, say) are then hard links to it, as in any content-addressed store.
        let mut first: BTreeMap<&str, (usize, &str)> = BTreeMap::new();
        let mut downloads = Vec::new();
        let mut duplicates = Vec::new();
        for (job, (manifest, dir)) in jobs.iter().enumerate() {
            for (name, file) in &manifest.files {
                match first.get(file.blake3.as_str()) {
                    Some(&(source_job, source_name)) => {
                        duplicates.push((job, name.as_str(), file, source_job, source_name))
                    }
                    None => {
                        first.insert(&file.blake3, (job, name));
                        downloads.push((job, name.as_str(), file, *dir));
                    }
                }
            }
        }
        let outcomes: Vec<(usize, Result<()>)> = self.block_on(
            futures::stream::iter(downloads)
                .map(|(job, name, file, dir)| async move {
                    (job, self.download(name, file, dir, bar).await)
                })
                .buffer_unordered(CONCURRENCY)
                .collect(),
        );
        let mut errors: Vec<Option<anyhow::Error>> = jobs.iter().map(|_| None).collect();
        for (job, outcome) in outcomes {
            if let (Err(e), None) = (outcome, &errors[job]) {
                errors[job] = Some(e);
            }
        }
        for (job, name, file, source_job, source_name) in duplicates {
            if errors[job].is_some() {
                continue;
            }
            let (source, target) = (jobs[source_job].1.join(source_name), jobs[job].1.join(name));
            let linked = match &errors[source_job] {
                Some(_) => Err(anyhow::Error::new(Refused(format!(
                    "remote object {}: refused (file '{name}')",
                    self.name_of(&self.blob_key(&file.blake3))
                )))),
                None => std::fs::hard_link(&source, &target)
                    .or_else(|_| std::fs::copy(&source, &target).map(|_| ()))
                    .with_context(|| format!("{}: cannot write", target.display())),
            };
            if let Err(e) = linked {
                errors[job] = Some(e);
            } else {
                bar.inc(file.bytes);
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        jobs.iter()
            .zip(errors)
            .map(|((manifest, _), error)| match error {
                Some(e) => Err(e),
                None => Ok(Transfer {
                    files: manifest.files.len(),
                    bytes: manifest.files.values().map(|f| f.bytes).sum(),
                    seconds,
                }),
            })
            .collect()
    }

    async fn download(
        &self,
        name: &str,
        file: &OutputFile,
        dir: &Path,
        bar: &ProgressBar,
    ) -> Result<()> {
        let key = self.blob_key(&file.blake3);
        let object = self.name_of(&key);
        let size = match self.objects.head(&key).await {
            Ok(meta) => meta.size,
            Err(object_store::Error::NotFound { .. }) => {
                self.mark_corrupt(&file.blake3);
                refuse!(
                    "remote object {object}: missing, though the manifest names it (file '{name}'); refused"
                )
            }
            Err(e) => return Err(self.explain(e)),
        };
        if size != file.bytes {
            self.mark_corrupt(&file.blake3);
            refuse!(
                "remote object {object}: size {size} differs from the manifest's {} (file '{name}'); refused, nothing was stored",
                file.bytes
            );
        }
        let path = dir.join(name);
        let cannot_write = |e: std::io::Error| anyhow!("{}: cannot write: {e}", path.display());
        // Plain blocking writes: they land in the page cache, and a hop to a blocking
        // thread per network chunk (tokio::fs) would cost more than the write.
        let mut out = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(&path).map_err(cannot_write)?,
        );
        let mut hasher = blake3::Hasher::new();
        let _one_large_file = if size > self.part_size as u64 {
            Some(self.large_file.lock().await)
        } else {
            None
        };
        // In ranges of a part each, a few in flight and taken in order, so that one
        // large file is not bound by one stream, and hashing stays in file order.
        let part = self.part_size as u64;
        let ranges = (0..size.div_ceil(part)).map(|i| i * part..((i + 1) * part).min(size));
        let mut chunks = futures::stream::iter(ranges)
            .map(|range| self.objects.get_range(&key, range))
            .buffered(PARTS_IN_FLIGHT);
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| self.explain(e))?;
            hasher.update(&chunk);
            out.write_all(&chunk).map_err(cannot_write)?;
            bar.inc(chunk.len() as u64);
        }
        let out = out.into_inner().map_err(|e| cannot_write(e.into_error()))?;
        out.sync_all().map_err(cannot_write)?;
        let hash = hasher.finalize().to_hex().to_string();
        if hash != file.blake3 {
            self.mark_corrupt(&file.blake3);
            refuse!(
                "remote object {object}: content hash {} differs from its name and the manifest's (file '{name}'): corrupt or tampered; refused, nothing was stored",
                short(&hash)
            );
        }
        Ok(())
    }

    fn mark_corrupt(&self, blake3: &str) {
        self.corrupt
            .lock()
            .expect("not poisoned")
            .insert(blake3.to_string());
    }
}
