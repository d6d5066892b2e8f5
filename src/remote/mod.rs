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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreExt, ObjectStoreScheme, RetryConfig};

use crate::recipe::short;
use crate::store::{content_hash, is_plain_file_name, Manifest, MANIFEST};

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
    /// Set when a write was denied: the rest of the process reads through the remote and
    /// pushes nothing (said once).
    writes_denied: std::sync::atomic::AtomicBool,
}

/// A remote object that failed verification (a corrupt or tampered blob, a manifest
/// that does not describe its recipe). Unlike an unreachable server, this is news about
/// one artifact: `run` builds it here instead, and its push repairs the blobs.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// The remote answered "access denied" (401 or 403): for a write, the credentials may
/// read and not write, as a shared store's readers often may; `run` then reads through
/// the remote and keeps what it builds here.
#[derive(Debug, thiserror::Error)]
#[error("remote {url}: access denied ({code}); check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for S3)")]
pub struct Denied {
    pub url: String,
    /// The server's reason: S3's error code (`AccessDenied`), else the client's message.
    pub code: String,
}

/// The [`Denied`] that `error` is or wraps, if it is one.
pub fn denial(error: &anyhow::Error) -> Option<&Denied> {
    error
        .chain()
        .find_map(|cause| cause.downcast_ref::<Denied>())
}

/// Whether `error` is (or wraps) a [`Refused`].
pub fn is_refused(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| cause.is::<Refused>())
}

macro_rules! refuse {
    ($($arg:tt)*) => {
        return Err(anyhow::Error::new(Refused(format!($($arg)*))))
    };
}

// After `refuse!`, which they use.
mod download;
mod errors;
mod inventory;
mod upload;

use errors::one_line;
pub use inventory::Inventory;

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
            writes_denied: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether a write was denied earlier in this process.
    pub fn writes_denied(&self) -> bool {
        self.writes_denied
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Records a denied write; true the first time (when it is to be said).
    pub fn deny_writes(&self) -> bool {
        !self
            .writes_denied
            .swap(true, std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `future` to completion on the remote's runtime. (A socket whose server went
    /// away fails its write with EPIPE: SIGPIPE stays ignored, as Rust leaves it.)
    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
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
}

/// Why a manifest fetched for (stage, recipe) must not be used, if it must not.
pub(super) fn manifest_problem(manifest: &Manifest, stage: &str, recipe: &str) -> Option<String> {
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
