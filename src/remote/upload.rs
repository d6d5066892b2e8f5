//! Pushes: the blobs the remote lacks (rehashed on the way up, large ones in parts),
//! then the manifest with a create-only put.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use indicatif::ProgressBar;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use tokio::io::AsyncReadExt;

use super::{Pushed, Remote, Transfer, CONCURRENCY, PARTS_IN_FLIGHT};
use crate::recipe::short;
use crate::store::{Manifest, OutputFile, MANIFEST};

impl Remote {
    /// Uploads the artifact in `dir` unless the remote has its recipe: the blobs it
    /// lacks, then the manifest with a create-only put.
    pub fn push(&self, dir: &Path, manifest: &Manifest, bar: &ProgressBar) -> Result<Pushed> {
        self.block_on(async {
            let started = Instant::now();
            if let Some(remote) = self
                .fetch_manifest(&manifest.stage, &manifest.recipe)
                .await?
            {
                let pushed = self.compare(&remote, manifest);
                // Blobs a pull found corrupt, which this verified copy can put right.
                let repairs: Vec<(&String, &OutputFile)> = match pushed {
                    Pushed::AlreadyThere => {
                        let corrupt = self.corrupt.lock().expect("not poisoned").clone();
                        manifest
                            .files
                            .iter()
                            .filter(|(_, f)| corrupt.contains(&f.blake3))
                            .collect()
                    }
                    _ => Vec::new(),
                };
                if repairs.is_empty() {
                    return Ok(pushed);
                }
                bar.set_length(repairs.iter().map(|(_, f)| f.bytes).sum());
                for (name, file) in &repairs {
                    self.upload(&dir.join(name), file, true, bar).await?;
                    self.corrupt
                        .lock()
                        .expect("not poisoned")
                        .remove(&file.blake3);
                }
                return Ok(Pushed::Repaired(Transfer {
                    files: repairs.len(),
                    bytes: repairs.iter().map(|(_, f)| f.bytes).sum(),
                    seconds: started.elapsed().as_secs_f64(),
                }));
            }
            // What the remote lacks (or holds corrupt), by blob.
            let wanted: BTreeMap<&String, &OutputFile> = manifest
                .files
                .values()
                .map(|file| (&file.blake3, file))
                .collect();
            let missing: Vec<(&OutputFile, bool)> = futures::stream::iter(wanted.into_values())
                .map(|file| async move {
                    let corrupt = self
                        .corrupt
                        .lock()
                        .expect("not poisoned")
                        .contains(&file.blake3);
                    match self.objects.head(&self.blob_key(&file.blake3)).await {
                        Ok(meta) if meta.size == file.bytes && !corrupt => Ok(None),
                        Ok(_) => Ok(Some((file, true))),
                        Err(object_store::Error::NotFound { .. }) => Ok(Some((file, false))),
                        Err(e) => Err(self.explain(e)),
                    }
                })
                .buffer_unordered(CONCURRENCY)
                .try_filter_map(|found| async move { Ok(found) })
                .try_collect()
                .await?;
            bar.set_length(missing.iter().map(|(f, _)| f.bytes).sum());
            let by_hash: BTreeMap<&String, &String> = manifest
                .files
                .iter()
                .map(|(name, file)| (&file.blake3, name))
                .collect();
            futures::stream::iter(&missing)
                .map(|(file, overwrite)| {
                    let path = dir.join(by_hash[&file.blake3]);
                    async move { self.upload(&path, file, *overwrite, bar).await }
                })
                .buffer_unordered(CONCURRENCY)
                .try_collect::<Vec<()>>()
                .await?;
            // The commit point: written once, by the first writer, and only now.
            let key = self.manifest_key(&manifest.stage, &manifest.recipe);
            let path = dir.join(MANIFEST);
            let bytes =
                std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
            let create = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            match self
                .objects
                .put_opts(&key, PutPayload::from(bytes), create)
                .await
            {
                Ok(_) => Ok(Pushed::Uploaded(Transfer {
                    files: missing.len(),
                    bytes: missing.iter().map(|(f, _)| f.bytes).sum(),
                    seconds: started.elapsed().as_secs_f64(),
                })),
                // Another writer of the same recipe got there first.
                Err(object_store::Error::AlreadyExists { .. }) => {
                    match self
                        .fetch_manifest(&manifest.stage, &manifest.recipe)
                        .await?
                    {
                        Some(remote) => Ok(self.compare(&remote, manifest)),
                        None => bail!(
                            "remote object {}: said to exist, then not found",
                            self.name_of(&key)
                        ),
                    }
                }
                Err(e) => Err(self.explain(e)),
            }
        })
    }

    fn compare(&self, remote: &Manifest, local: &Manifest) -> Pushed {
        if remote.content_hash == local.content_hash {
            Pushed::AlreadyThere
        } else {
            Pushed::Conflict {
                remote_content: remote.content_hash.clone(),
            }
        }
    }

    /// Uploads one file as the blob `file.blake3`, rehashing it on the way (a file
    /// changed since its manifest was written is not uploaded). Large files go up in
    /// parts, a few at a time, so memory stays at a few parts whatever the file's size.
    async fn upload(
        &self,
        path: &Path,
        file: &OutputFile,
        overwrite: bool,
        bar: &ProgressBar,
    ) -> Result<()> {
        let key = self.blob_key(&file.blake3);
        let mut reader = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let mut hasher = blake3::Hasher::new();
        let changed = |hash: &str| {
            anyhow!(
                "{}: content hash {} differs from its manifest's {} (changed after it was written); not uploaded; `cachemoney verify` lists such files",
                path.display(),
                short(hash),
                short(&file.blake3)
            )
        };
        if file.bytes as usize <= self.part_size {
            let chunk = read_chunk(&mut reader, self.part_size, path).await?;
            hasher.update(&chunk);
            let hash = hasher.finalize().to_hex().to_string();
            if hash != file.blake3 || chunk.len() as u64 != file.bytes {
                return Err(changed(&hash));
            }
            let size = chunk.len() as u64;
            let options = PutOptions {
                mode: if overwrite {
                    PutMode::Overwrite
                } else {
                    PutMode::Create
                },
                ..Default::default()
            };
            match self
                .objects
                .put_opts(&key, PutPayload::from(chunk), options)
                .await
            {
                // A concurrent writer uploaded the same bytes.
                Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(self.explain(e)),
            }
            bar.inc(size);
            return Ok(());
        }
        // Parts: one large file at a time, a few parts of it in flight.
        let _one_large_file = self.large_file.lock().await;
        let upload = self
            .objects
            .put_multipart(&key)
            .await
            .map_err(|e| self.explain(e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, self.part_size);
        let mut sent = 0u64;
        let outcome: Result<()> = async {
            loop {
                let chunk = read_chunk(&mut reader, self.part_size, path).await?;
                if chunk.is_empty() {
                    break;
                }
                hasher.update(&chunk);
                sent += chunk.len() as u64;
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| self.explain(e))?;
                let len = chunk.len() as u64;
                writer.put(chunk);
                bar.inc(len);
            }
            let hash = hasher.finalize().to_hex().to_string();
            if hash != file.blake3 || sent != file.bytes {
                return Err(changed(&hash));
            }
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => {
                writer.finish().await.map_err(|e| self.explain(e))?;
                Ok(())
            }
            Err(e) => {
                // Best effort: an upload left open is invisible, and lifecycle rules
                // (AbortIncompleteMultipartUpload) reclaim it anyway.
                writer.abort().await.ok();
                Err(e)
            }
        }
    }
}

/// Reads up to `size` bytes (fewer only at the end of the file).
async fn read_chunk(reader: &mut tokio::fs::File, size: usize, path: &Path) -> Result<Bytes> {
    let mut buffer = vec![0u8; size];
    let mut filled = 0;
    while filled < size {
        let n = reader
            .read(&mut buffer[filled..])
            .await
            .with_context(|| format!("{}: cannot read", path.display()))?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buffer.truncate(filled);
    Ok(Bytes::from(buffer))
}
