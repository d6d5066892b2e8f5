//! What the remote holds, for `remote gc --dry-run`.

use std::collections::BTreeMap;

use anyhow::Result;
use futures::StreamExt;
use object_store::ObjectStoreExt;

use super::Remote;
use crate::store::Manifest;

impl Remote {
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
                // Filed as ac/STAGE/RECIPE.json: what a pull would check it against.
                let parts: Vec<String> = meta
                    .location
                    .parts()
                    .map(|p| p.as_ref().to_string())
                    .collect();
                let filed = match parts.as_slice() {
                    [.., stage, file] => file.strip_suffix(".json").map(|r| (stage.as_str(), r)),
                    _ => None,
                };
                match serde_json::from_slice::<Manifest>(&bytes) {
                    Ok(manifest) => match filed.and_then(|(stage, recipe)| {
                        super::manifest_problem(&manifest, stage, recipe)
                    }) {
                        // A pull refuses it: as broken as one that does not parse.
                        Some(problem) => inventory.unreadable.push(format!("{name}: {problem}")),
                        None => inventory.manifests.push((name, manifest)),
                    },
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
/// under `ac/` could not be read as a manifest or is one a pull would refuse.
#[derive(Debug, Default)]
pub struct Inventory {
    pub manifests: Vec<(String, Manifest)>,
    pub blobs: BTreeMap<String, (String, u64)>,
    pub unreadable: Vec<String>,
}
