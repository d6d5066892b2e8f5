//! What the store holds, finished artifacts and everything else: what `verify` lists
//! and `gc` removes, one bad entry never hiding the others.

use std::fs;
use std::path::{Path, PathBuf};

use super::{is_valid_node_name, read_manifest, Manifest, NodeRef, Store, MANIFEST};

/// Something in the store that is not a finished artifact: a directory with a corrupt
/// or missing manifest, a stray file. Listed by `verify`, removed by `gc`.
#[derive(Debug, Clone)]
pub struct StoreProblem {
    pub path: PathBuf,
    pub message: String,
}

/// Every finished artifact in the store, and whatever else was found beside them.
#[derive(Debug, Default)]
pub struct Listing {
    pub artifacts: Vec<(PathBuf, Manifest)>,
    pub problems: Vec<StoreProblem>,
}

impl Store {
    /// Every finished artifact in the store, and every entry that is not one (a corrupt
    /// manifest, a directory without one, a stray file): one bad entry never hides the
    /// others.
    pub fn list(&self) -> Listing {
        let mut listing = Listing::default();
        let Ok(stages) = fs::read_dir(&self.root) else {
            return listing;
        };
        let problem = |path: PathBuf, message: String| StoreProblem { path, message };
        for stage in stages.flatten() {
            let name = stage.file_name().to_string_lossy().into_owned();
            let path = stage.path();
            if name.starts_with('.') || name == "refs" || name == "seeds.parquet" {
                continue;
            }
            if !path.is_dir() {
                listing.problems.push(problem(
                    path,
                    "stray file in the store (not part of any artifact)".into(),
                ));
                continue;
            }
            let entries = match fs::read_dir(&path) {
                Ok(entries) => entries,
                Err(e) => {
                    listing
                        .problems
                        .push(problem(path, format!("cannot list: {e}")));
                    continue;
                }
            };
            for artifact in entries.flatten() {
                let dir = artifact.path();
                if !dir.is_dir() {
                    listing.problems.push(problem(
                        dir,
                        "stray file in the store (not part of any artifact)".into(),
                    ));
                    continue;
                }
                match read_manifest(&dir) {
                    Ok(Some(manifest)) => {
                        listing.problems.extend(stray_entries(&dir, &manifest));
                        listing.artifacts.push((dir, manifest));
                    }
                    Ok(None) => listing.problems.push(problem(
                        dir,
                        "directory without a manifest (not a finished artifact)".into(),
                    )),
                    Err(e) => listing.problems.push(problem(dir, format!("{e:#}"))),
                }
            }
        }
        listing.problems.extend(self.stray_refs());
        listing.artifacts.sort_by(|a, b| a.0.cmp(&b.0));
        listing.problems.sort_by(|a, b| a.path.cmp(&b.path));
        listing
    }

    /// What in `refs/` is not a node's record: a file by another name, one that does not
    /// parse, a directory, or an interrupted write's leftover.
    fn stray_refs(&self) -> Vec<StoreProblem> {
        let Ok(entries) = fs::read_dir(self.root.join("refs")) else {
            return Vec::new();
        };
        let mut problems = Vec::new();
        for entry in entries.flatten() {
            let (path, name) = (entry.path(), entry.file_name());
            let name = name.to_string_lossy();
            let message = if path.is_dir() {
                "a directory in refs/ (which holds only NODE.json files)"
            } else if name.contains(".tmp-") {
                "an interrupted write's leftover in refs/"
            } else if !name.strip_suffix(".json").is_some_and(is_valid_node_name) {
                "a stray file in refs/ (which holds only NODE.json files)"
            } else if fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<NodeRef>(&bytes).ok())
                .is_none()
            {
                "a node record that does not parse (the node is resolved again on the next run)"
            } else {
                continue;
            };
            problems.push(StoreProblem {
                path,
                message: message.to_string(),
            });
        }
        problems
    }
}

/// What an artifact's directory holds besides its manifest and the files it lists: nothing
/// a stage wrote (those are all listed), so something put there afterwards.
fn stray_entries(dir: &Path, manifest: &Manifest) -> Vec<StoreProblem> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut problems: Vec<StoreProblem> = entries
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name != MANIFEST && !manifest.files.contains_key(name.as_ref())
        })
        .map(|entry| StoreProblem {
            path: entry.path(),
            message: "not in its artifact's manifest (put there after the artifact was built)"
                .into(),
        })
        .collect();
    problems.sort_by(|a, b| a.path.cmp(&b.path));
    problems
}
