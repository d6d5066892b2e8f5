//! The remote store: artifacts shared between machines through object storage.
//!
//! ```text
//! <url>/
//!   cas/<blake3>                  a stored file's bytes, named by their blake3
//!   ac/<stage>/<recipe>.json      an artifact's manifest: recipe → files (the action cache)
//! ```
//!
//! The shape is Bazel's remote cache: a content-addressed blob store plus an action cache
//! from recipe to result. It is built so that no reader can see a half-written artifact
//! and no writer can spoil another's:
//!
//! - Blobs are named by their content, so two writers of one key write the same bytes;
//!   uploading one again is harmless, and a kill mid-upload leaves at most an unfinished
//!   multipart upload, which no reader sees.
//! - The manifest is the commit point: written last, with a create-only (conditional)
//!   put, so a manifest in the remote names only blobs that were complete before it, and
//!   the first writer of a recipe wins.
//! - A pull trusts nothing it downloads: the manifest must describe the recipe it is
//!   filed under, and every file's blake3 and size must match it before the artifact is
//!   committed to the local store (by the same rename as a build).
//!
//! Credentials and endpoints come from each cloud's usual environment variables (read by
//! `object_store`'s builders); see docs/remote.md.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressStyle};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutMode, PutOptions, PutPayload,
    RetryConfig, WriteMultipart,
};
use std::io::Write;

use tokio::io::AsyncReadExt;

use crate::recipe::short;
use crate::store::{content_hash, is_plain_file_name, Manifest, OutputFile, MANIFEST};

/// Files larger than this go up in parts of this size (S3's minimum part is 5 MiB).
const DEFAULT_PART_SIZE: usize = 8 << 20;
/// Transfers in flight at once: files of an artifact, or parts of one large file.
const CONCURRENCY: usize = 8;
/// Parts of one large file in flight at once, up or down. Large files move one at a
/// time (small ones beside them), so memory stays near this many parts whatever the
/// files' sizes: about 100 MB with 8 MiB parts.
const PARTS_IN_FLIGHT: usize = 4;

/// A remote store, opened from its URL; every call blocks on its own async runtime.
pub struct Remote {
    /// The URL as given, without a trailing `/`: what messages name.
    url: String,
    objects: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    runtime: tokio::runtime::Runtime,
    part_size: usize,
    /// Manifests fetched and checked, by (stage, recipe).
    manifests: Mutex<BTreeMap<(String, String), Manifest>>,
    /// Held while a large file moves (see [`PARTS_IN_FLIGHT`]).
    large_file: futures::lock::Mutex<()>,
    /// Blobs that a pull in this process found corrupt: a push of verified bytes may
    /// overwrite them (they are content-addressed, so the right bytes are never wrong).
    corrupt: Mutex<BTreeSet<String>>,
}

/// A remote object that failed verification (a corrupt or tampered blob, a manifest
/// that does not describe its recipe). Unlike an unreachable server, this is news about
/// one artifact: `run` builds it here instead, and its push repairs the blobs.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Whether `error` is (or wraps) a [`Refused`].
pub fn is_refused(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| cause.is::<Refused>())
}

macro_rules! refuse {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new(Refused(format!($($arg)*))))
    };
}

/// What one transfer moved.
#[derive(Debug, Clone, Copy, Default)]
pub struct Transfer {
    pub files: usize,
    pub bytes: u64,
    pub seconds: f64,
}

impl Transfer {
    pub fn add(&mut self, other: Transfer) {
        self.files += other.files;
        self.bytes += other.bytes;
        self.seconds += other.seconds;
    }

    /// `12 files, 17.6 MB in 0.12s (147 MB/s)`
    pub fn describe(&self) -> String {
        let rate = if self.seconds > 0.0 {
            format!(" ({:.0} MB/s)", self.bytes as f64 / 1e6 / self.seconds)
        } else {
            String::new()
        };
        format!(
            "{} file(s), {:.1} MB in {:.2}s{rate}",
            self.files,
            self.bytes as f64 / 1e6,
            self.seconds
        )
    }
}

/// What a push found and did.
#[derive(Debug, Clone)]
pub enum Pushed {
    /// Uploaded: the blobs the remote lacked, then the manifest.
    Uploaded(Transfer),
    /// The remote already holds this recipe with the same content.
    AlreadyThere,
    /// The remote holds this recipe, but some of its blobs failed a pull's verification:
    /// they were uploaded again from this verified copy.
    Repaired(Transfer),
    /// The remote holds this recipe with other content (a stage that is not
    /// deterministic, built on two machines): the first writer's stays.
    Conflict { remote_content: String },
}

impl Remote {
    /// Opens the remote at `url` (`s3://bucket/prefix`, `gs://…`, `az://…`,
    /// `file:///path`, `http(s)://…`). Nothing is contacted yet; [`Remote::check`] does.
    pub fn open(url: &str) -> Result<Remote> {
        let url = url.trim_end_matches('/').to_string();
        let parsed = url::Url::parse(&url).map_err(|e| {
            anyhow!("remote '{url}': not a URL ({e}); expected s3://bucket/prefix, gs://bucket/prefix, az://container/prefix, file:///path or http(s)://host/path")
        })?;
        let (scheme, prefix) = ObjectStoreScheme::parse(&parsed)
            .map_err(|e| anyhow!("remote '{url}': not a storage URL object_store knows ({e})"))?;
        let prefix = ObjectPath::parse(prefix.as_ref())
            .map_err(|e| anyhow!("remote '{url}': bad path ({e})"))?;
        let refused = |e: object_store::Error| anyhow!("remote '{url}': {}", one_line(&e));
        let objects: Arc<dyn ObjectStore> = match scheme {
            ObjectStoreScheme::AmazonS3 => {
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(&url)
                    .with_retry(retry_config());
                // An explicit http:// endpoint (a server on the LAN or on loopback) is
                // what the user asked for; object_store would otherwise refuse it.
                let endpoint = std::env::var("AWS_ENDPOINT_URL")
                    .or_else(|_| std::env::var("AWS_ENDPOINT"))
                    .unwrap_or_default();
                if endpoint.starts_with("http://") {
                    builder = builder.with_allow_http(true);
                }
                Arc::new(builder.build().map_err(refused)?)
            }
            ObjectStoreScheme::GoogleCloudStorage => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(&url)
                    .with_retry(retry_config())
                    .build()
                    .map_err(refused)?,
            ),
            ObjectStoreScheme::MicrosoftAzure => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(&url)
                    .with_retry(retry_config())
                    .build()
                    .map_err(refused)?,
            ),
            ObjectStoreScheme::Http => Arc::new(
                object_store::http::HttpBuilder::new()
                    .with_url(&parsed[..url::Position::BeforePath])
                    .with_retry(retry_config())
                    .build()
                    .map_err(refused)?,
            ),
            ObjectStoreScheme::Local => {
                let dir = parsed
                    .to_file_path()
                    .map_err(|()| anyhow!("remote '{url}': not a local path"))?;
                if !dir.is_dir() {
                    bail!(
                        "remote '{url}': {} is not a directory (create it first)",
                        dir.display()
                    );
                }
                Arc::new(object_store::local::LocalFileSystem::new())
            }
            other => bail!("remote '{url}': {other:?} stores hold nothing between runs"),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .on_thread_start(|| {
                block_sigpipe();
            })
            .build()
            .context("cannot start the async runtime for the remote")?;
        let part_size = match std::env::var("CACHEMONEY_REMOTE_PART_SIZE") {
            Ok(text) => crate::memory::parse_size(&text)
                .ok()
                .filter(|&size| size >= 5 << 20)
                .ok_or_else(|| {
                    anyhow!("CACHEMONEY_REMOTE_PART_SIZE={text}: expected a size of at least 5M (S3's smallest part)")
                })? as usize,
            Err(_) => DEFAULT_PART_SIZE,
        };
        Ok(Remote {
            url,
            objects,
            prefix,
            runtime,
            part_size,
            manifests: Mutex::new(BTreeMap::new()),
            large_file: futures::lock::Mutex::new(()),
            corrupt: Mutex::new(BTreeSet::new()),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs `future` to completion on the remote's runtime, with SIGPIPE held back on
    /// this thread meanwhile (see [`block_sigpipe`]); one raised meanwhile is discarded.
    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        let previous = block_sigpipe();
        let output = self.runtime.block_on(future);
        // SAFETY: plain signal-set calls on stack values; the zero timeout makes
        // sigtimedwait a non-blocking poll for a pending SIGPIPE.
        unsafe {
            let mut pipe: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut pipe);
            libc::sigaddset(&mut pipe, libc::SIGPIPE);
            let zero = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            while libc::sigtimedwait(&pipe, std::ptr::null_mut(), &zero) == libc::SIGPIPE {}
            libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        }
        output
    }

    /// Contacts the remote once (a listing under its prefix), so that a wrong endpoint,
    /// wrong credentials or a missing bucket fail before anything is built.
    pub fn check(&self) -> Result<()> {
        self.block_on(self.objects.list_with_delimiter(Some(&self.prefix)))
            .map(|_| ())
            .map_err(|e| self.explain(e))
    }

    fn manifest_key(&self, stage: &str, recipe: &str) -> ObjectPath {
        self.prefix
            .clone()
            .join("ac")
            .join(stage)
            .join(format!("{recipe}.json"))
    }

    fn blob_key(&self, blake3: &str) -> ObjectPath {
        self.prefix.clone().join("cas").join(blake3)
    }

    /// How messages name an object: the remote's URL and the key below its prefix.
    fn name_of(&self, key: &ObjectPath) -> String {
        let relative = key
            .prefix_match(&self.prefix)
            .map(|parts| parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>())
            .unwrap_or_default();
        format!("{}/{}", self.url, relative.join("/"))
    }

    /// A failure of the remote as one line: the URL, what went wrong in words, and what
    /// to do about it.
    fn explain(&self, error: object_store::Error) -> anyhow::Error {
        use object_store::Error as E;
        // Classified on the whole chain, shown clipped.
        let detail = chain_of(&error);
        let reason = match &error {
            _ if detail.contains("NoSuchBucket") => {
                "the bucket does not exist (create it, or fix the URL)".to_string()
            }
            E::NotFound { .. } => format!("not found ({}); does the bucket exist?", clip(&detail)),
            // With no keys in the environment, the S3 client asks the instance metadata
            // service, which a laptop does not have.
            _ if detail.contains("169.254.169.254") => {
                "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (no instance profile answered either)".to_string()
            }
            _ if is_denied(&error, &detail) => format!(
                "access denied ({}); check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for S3)",
                s3_error_code(&detail).map_or_else(|| innermost(&error), str::to_string)
            ),
            _ if is_unreachable(&detail) => format!(
                "cannot reach the server ({}); check the endpoint (AWS_ENDPOINT for an S3-compatible server), or pass --offline to work without the remote",
                innermost(&error)
            ),
            _ => clip(&detail),
        };
        anyhow!("remote {}: {reason}", self.url)
    }

    /// The manifest the remote holds for this recipe, checked against it; `None` when
    /// the remote has none.
    pub fn manifest(&self, stage: &str, recipe: &str) -> Result<Option<Manifest>> {
        self.block_on(self.fetch_manifest(stage, recipe))
    }

    async fn fetch_manifest(&self, stage: &str, recipe: &str) -> Result<Option<Manifest>> {
        // A manifest in the remote never changes (create-only), so one fetched and
        // checked once serves the rest of the process (resolving, then pulling).
        let memo_key = (stage.to_string(), recipe.to_string());
        if let Some(manifest) = self.manifests.lock().expect("not poisoned").get(&memo_key) {
            return Ok(Some(manifest.clone()));
        }
        let key = self.manifest_key(stage, recipe);
        let bytes = match self.objects.get(&key).await {
            Ok(result) => result.bytes().await.map_err(|e| self.explain(e))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.explain(e)),
        };
        let manifest: Manifest = match serde_json::from_slice(&bytes) {
            Ok(manifest) => manifest,
            Err(e) => refuse!(
                "remote object {}: not a manifest ({e}); refused",
                self.name_of(&key)
            ),
        };
        if let Some(problem) = manifest_problem(&manifest, stage, recipe) {
            refuse!("remote object {}: {problem}; refused", self.name_of(&key));
        }
        self.manifests
            .lock()
            .expect("not poisoned")
            .insert(memo_key, manifest.clone());
        Ok(Some(manifest))
    }

    /// Downloads the artifact `manifest` describes into `dir` (an empty scratch
    /// directory), verifying every file's size and blake3 on the way. On error, what was
    /// written to `dir` must be thrown away.
    pub fn pull(&self, manifest: &Manifest, dir: &Path, bar: &ProgressBar) -> Result<Transfer> {
        self.pull_many(&[(manifest, dir)], bar)
            .pop()
            .expect("one result per artifact")
    }

    /// [`Remote::pull`] for several artifacts at once, their files fetched together (a
    /// store of many small artifacts is bound by round trips, not bandwidth): one result
    /// per artifact, in order.
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

    /// Every manifest in the remote and every blob, for `remote gc --dry-run`.
    pub fn inventory(&self) -> Result<Inventory> {
        self.block_on(async {
            let mut inventory = Inventory::default();
            let ac = self.prefix.clone().join("ac");
            let mut listing = self.objects.list(Some(&ac));
            while let Some(meta) = listing.next().await {
                let meta = meta.map_err(|e| self.explain(e))?;
                let bytes = self
                    .objects
                    .get(&meta.location)
                    .await
                    .map_err(|e| self.explain(e))?
                    .bytes()
                    .await
                    .map_err(|e| self.explain(e))?;
                let name = self.name_of(&meta.location);
                match serde_json::from_slice::<Manifest>(&bytes) {
                    Ok(manifest) => inventory.manifests.push((name, manifest)),
                    Err(e) => inventory
                        .unreadable
                        .push(format!("{name}: not a manifest ({e})")),
                }
            }
            let cas = self.prefix.clone().join("cas");
            let mut listing = self.objects.list(Some(&cas));
            while let Some(meta) = listing.next().await {
                let meta = meta.map_err(|e| self.explain(e))?;
                let hash = meta.location.filename().unwrap_or_default().to_string();
                inventory
                    .blobs
                    .insert(hash, (self.name_of(&meta.location), meta.size));
            }
            Ok(inventory)
        })
    }
}

/// What the remote holds: its manifests, its blobs by hash (name and size), and what
/// under `ac/` could not be read as a manifest.
#[derive(Debug, Default)]
pub struct Inventory {
    pub manifests: Vec<(String, Manifest)>,
    pub blobs: BTreeMap<String, (String, u64)>,
    pub unreadable: Vec<String>,
}

/// Why a manifest fetched for (stage, recipe) must not be used, if it must not.
fn manifest_problem(manifest: &Manifest, stage: &str, recipe: &str) -> Option<String> {
    if manifest.stage != stage || manifest.recipe != recipe {
        return Some(format!(
            "describes {}/{}, not the recipe it is filed under",
            manifest.stage,
            short(&manifest.recipe)
        ));
    }
    if manifest.ingredients.recipe() != recipe {
        return Some("its ingredients do not hash to its recipe".into());
    }
    if let Some(bad) = manifest
        .files
        .keys()
        .find(|name| !is_plain_file_name(name) || name.as_str() == MANIFEST)
    {
        return Some(format!("file name '{bad}' is not a plain file name"));
    }
    if content_hash(&manifest.files) != manifest.content_hash {
        return Some("its content hash does not match its file list".into());
    }
    None
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

/// Blocks SIGPIPE on the calling thread and returns the previous mask. `main` restores
/// SIGPIPE's default action so that `cachemoney sql | head` ends quietly; but a socket
/// whose server went away must fail a write with EPIPE (a clear error), not kill the
/// process without a word. SIGPIPE is delivered to the thread that wrote, so holding it
/// back on the threads that talk to the network is enough.
fn block_sigpipe() -> libc::sigset_t {
    // SAFETY: plain signal-set calls on stack values.
    unsafe {
        let mut pipe: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut pipe);
        libc::sigaddset(&mut pipe, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &pipe, &mut previous);
        previous
    }
}

/// Retries with a short backoff: a server that is down is reported in about a second,
/// not after object_store's default three minutes. `CACHEMONEY_REMOTE_RETRIES` raises
/// the count for flaky links.
fn retry_config() -> RetryConfig {
    let max_retries = std::env::var("CACHEMONEY_REMOTE_RETRIES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(3);
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries,
        retry_timeout: Duration::from_secs(60),
    }
}

/// The deepest cause of an error (the I/O error under the HTTP error under the retry),
/// on one line and not too long (an XML error body is long).
fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut deepest: &(dyn std::error::Error + 'static) = error;
    while let Some(source) = deepest.source() {
        deepest = source;
    }
    clip(&deepest.to_string())
}

fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    clip(&chain_of(error))
}

/// An error and its causes, each said once, joined on one line.
fn chain_of(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![error.to_string()];
    let mut current = error.source();
    while let Some(source) = current {
        let text = source.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = source.source();
    }
    parts.join(": ")
}

fn clip(text: &str) -> String {
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match text.char_indices().nth(300) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

/// The `<Code>` of an S3 error body quoted in a message (`SignatureDoesNotMatch`).
fn s3_error_code(detail: &str) -> Option<&str> {
    let start = detail.find("<Code>")? + "<Code>".len();
    let length = detail[start..].find("</Code>")?;
    Some(&detail[start..start + length])
}

/// 401 and 403, whichever way the client reports them (object_store maps some to
/// `PermissionDenied`, and leaves a listing's as a generic error with the status).
fn is_denied(error: &object_store::Error, detail: &str) -> bool {
    matches!(
        error,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
    ) || [
        "403 Forbidden",
        "401 Unauthorized",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "AccessDenied",
    ]
    .iter()
    .any(|needle| detail.contains(needle))
}

fn is_unreachable(detail: &str) -> bool {
    let detail = detail.to_ascii_lowercase();
    [
        "connection refused",
        "error sending request",
        "connection reset",
        "dns error",
        "timed out",
        "connection closed",
        "broken pipe",
    ]
    .iter()
    .any(|needle| detail.contains(needle))
}

/// A transfer's progress bar: bytes, rate, and time left; hidden unless `show`.
pub fn transfer_bar(show: bool, label: &str) -> ProgressBar {
    let bar = if show {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:<28} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    bar.set_message(label.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_stay_on_one_line_and_short() {
        let long = format!("a\n{}", "b ".repeat(400));
        let clipped = clip(&long);
        assert!(!clipped.contains('\n'));
        assert!(clipped.chars().count() <= 301, "{}", clipped.len());
    }

    #[test]
    fn a_refused_connection_reads_as_unreachable() {
        assert!(is_unreachable(
            "Generic S3 error: error sending request for url: Connection refused (os error 111)"
        ));
        assert!(!is_unreachable("access denied"));
    }
}
