//! What a SQL session can read: every Parquet output of the resolved nodes' artifacts,
//! and, for a damaged artifact, the names a query would use with why they are unreadable.

use std::collections::BTreeMap;
use std::path::PathBuf;

use stage_api::Column;

use super::repair_hint;
use crate::registry::Registry;
use crate::runner::{NodeState, Resolved};
use crate::store::{OutputFile, Store};

/// One Parquet output of a node, as the session sees it.
pub(super) struct Entry {
    pub node: String,
    /// A legality re-run's table: reachable as NODE.TABLE only, so that `val` still
    /// means the val tokens.
    pub rerun: bool,
    pub stem: String,
    pub path: PathBuf,
    pub info: OutputFile,
    /// The table's declared columns, when its stage is known.
    pub declared: Option<&'static [Column]>,
    /// Why it cannot be read, if it cannot.
    pub problem: Option<String>,
}

pub(super) struct Catalogue {
    pub entries: Vec<Entry>,
    /// Table names a query may use but cannot read, with why.
    pub unavailable: BTreeMap<String, String>,
    /// Recipe → the node it is current for (for the `artifacts` table).
    pub current_recipes: BTreeMap<String, String>,
}

impl Catalogue {
    pub fn read(store: &Store, registry: &Registry, resolved: &[Resolved]) -> Catalogue {
        let mut entries = Vec::new();
        let mut unavailable = BTreeMap::new();
        let mut damaged_tables = Vec::new();
        let mut current_recipes = BTreeMap::new();
        for r in resolved {
            let Some(recipe) = &r.recipe else { continue };
            let problems = match &r.state {
                NodeState::Cached { .. } => Vec::new(),
                NodeState::Damaged { problems } => problems.clone(),
                _ => continue,
            };
            current_recipes.insert(recipe.clone(), r.node.clone());
            let manifest = match store.manifest(&r.stage, recipe) {
                Ok(Some(manifest)) => manifest,
                Ok(None) => continue,
                Err(e) => {
                    let reason = repair_hint(&r.node, &format!("{e:#}"));
                    // The manifest says which tables there are; without it, the stage's
                    // declaration does, so that a query names the damage, not "not found".
                    if let Some(stage) = registry.get(&r.stage) {
                        for output in stage.spec().outputs {
                            if let stage_api::Produced::Table(_) = output.what {
                                damaged_tables.push((r.node.clone(), output.name, reason.clone()));
                            }
                        }
                    }
                    unavailable.insert(r.node.clone(), reason);
                    continue;
                }
            };
            let dir = store.artifact_dir(&r.stage, recipe);
            for (file, info) in &manifest.files {
                let Some(stem) = file.strip_suffix(".parquet") else {
                    continue;
                };
                // A damaged artifact's files are all withheld: which one is damaged says
                // nothing about whether the others were written by the same build.
                let problem = (!problems.is_empty()).then(|| problems.join("; "));
                entries.push(Entry {
                    node: r.node.clone(),
                    rerun: r.rerun,
                    stem: stem.to_string(),
                    path: dir.join(file),
                    info: info.clone(),
                    declared: registry.table_columns(&r.stage, stem),
                    problem,
                });
            }
        }
        // A damaged manifest's tables, under NODE.TABLE and under TABLE where no readable
        // node's table has that name.
        for (node, stem, reason) in damaged_tables {
            unavailable.insert(format!("{node}.{stem}"), reason.clone());
            if !entries.iter().any(|e| !e.rerun && e.stem == stem) {
                unavailable.entry(stem.to_string()).or_insert(reason);
            }
        }
        Catalogue {
            entries,
            unavailable,
            current_recipes,
        }
    }
}
