//! One node of `pipeline.toml` wired: each input checked against what the upstream
//! node's stage declares it produces, file patterns expanded, and the stage's own check
//! of the whole (`Stage::check_wiring`), each error at its line.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use stage_api::StageSpec;
use toml::Spanned;

use super::prepare::Prepared;
use super::{list_or_none, Node, NodeFile, OneOrMany};

/// Where a span of the pipeline file is (`pipeline.toml:LINE:COL`).
type At<'a> = &'a dyn Fn(Option<Range<usize>>) -> String;

/// Node `name` wired, from its table and every node's prepared stage and parameters.
/// An input whose upstream cannot provide what it reads is kept in `miswired` (the
/// first one only) rather than failing: the caller reports a cycle first, since in a
/// cycle some input is always miswired too, and the cycle is the mistake to fix.
pub(super) fn wire(
    name: &str,
    spanned: &Spanned<NodeFile>,
    prepared: &BTreeMap<String, Prepared>,
    base: &Path,
    at: At,
    miswired: &mut Option<anyhow::Error>,
) -> Result<Node> {
    let node_at = at(Some(spanned.span()));
    let def = spanned.get_ref();
    let (stage, params, spec) = prepared[name].clone();
    let inputs = inputs(name, def, spec, prepared, at, miswired)?;
    for wanted in spec.inputs.iter().filter(|i| i.required) {
        if !inputs.contains_key(wanted.name) {
            bail!(
                "{node_at}: node '{name}': stage '{}' needs inputs.{}",
                def.stage.get_ref(),
                wanted.name
            );
        }
    }
    let files = files(name, def, spec, base, at)?;
    for role in spec.files.iter().filter(|r| r.required) {
        if !files.contains_key(role.name) {
            bail!(
                "{node_at}: node '{name}': needs files.{} ({})",
                role.name,
                role.help
            );
        }
    }
    let input_names: Vec<&str> = inputs.keys().map(String::as_str).collect();
    let file_roles: Vec<&str> = files.keys().map(String::as_str).collect();
    stage
        .check_wiring(&params, &input_names, &file_roles)
        .map_err(|problem| anyhow!("{node_at}: node '{name}': {problem}"))?;
    Ok(Node {
        name: name.to_string(),
        stage: def.stage.get_ref().clone(),
        params,
        spec,
        inputs,
        files,
        variant: None,
        rerun: None,
    })
}

/// Input name → upstream node, each declared by the stage and naming a defined node.
fn inputs(
    name: &str,
    def: &NodeFile,
    spec: &StageSpec,
    prepared: &BTreeMap<String, Prepared>,
    at: At,
    miswired: &mut Option<anyhow::Error>,
) -> Result<BTreeMap<String, String>> {
    let stage_name = def.stage.get_ref();
    let takes = || list_or_none(spec.inputs.iter().map(|i| i.name));
    let mut inputs = BTreeMap::new();
    for (input, upstream) in &def.inputs {
        let input_at = at(Some(upstream.span()));
        let Some(declared) = spec.input(input) else {
            bail!(
                "{input_at}: node '{name}': stage '{stage_name}' has no input '{input}' (it takes: {})",
                takes()
            );
        };
        let Some((_, _, produced)) = prepared.get(upstream.get_ref()) else {
            bail!(
                "{input_at}: node '{name}': input '{input}' names node '{}', which is not defined",
                upstream.get_ref()
            );
        };
        if let Some(read) = declared
            .reads
            .iter()
            .find(|read| produced.cannot_provide(read).is_some())
        {
            miswired.get_or_insert_with(|| {
                anyhow!(
                    "{input_at}: node '{name}': input '{input}' expects {read}; node '{}' ({}) produces {}",
                    upstream.get_ref(),
                    produced.kind,
                    list_or_none(produced.outputs.iter().map(|o| o.name))
                )
            });
        }
        inputs.insert(input.clone(), upstream.get_ref().clone());
    }
    Ok(inputs)
}

/// File role → the files its patterns match (relative to `base`), in order, each
/// role declared by the stage.
fn files(
    name: &str,
    def: &NodeFile,
    spec: &StageSpec,
    base: &Path,
    at: At,
) -> Result<BTreeMap<String, Vec<PathBuf>>> {
    let stage_name = def.stage.get_ref();
    let mut files = BTreeMap::new();
    for (role, patterns) in &def.files {
        let role_at = at(Some(patterns.span()));
        if !spec.files.iter().any(|r| r.name == role) {
            bail!(
                "{role_at}: node '{name}': stage '{stage_name}' has no file role '{role}' (it takes: {})",
                list_or_none(spec.files.iter().map(|r| r.name))
            );
        }
        let patterns = match patterns.get_ref() {
            OneOrMany::One(p) => vec![p.clone()],
            OneOrMany::Many(ps) => ps.clone(),
        };
        let mut matched = BTreeSet::new();
        for pattern in &patterns {
            let full = base.join(pattern);
            let hits = expand(&full).map_err(|e| {
                anyhow!(
                    "{role_at}: node '{name}': files.{role}: {e}{}",
                    bracket_hint(pattern)
                )
            })?;
            if hits.is_empty() {
                bail!(
                    "{role_at}: node '{name}': files.{role} pattern '{pattern}' matches no file (looked for {}){}",
                    full.display(),
                    bracket_hint(pattern)
                );
            }
            matched.extend(hits);
        }
        files.insert(role.clone(), matched.into_iter().collect());
    }
    Ok(files)
}

/// For a pattern with `[` or `]`, which a glob reads as a character class: how to
/// write them for a file whose name has them.
fn bracket_hint(pattern: &str) -> String {
    if !pattern.contains(['[', ']']) {
        return String::new();
    }
    let literal: String = pattern
        .chars()
        .map(|c| match c {
            '[' => "[[]".to_string(),
            ']' => "[]]".to_string(),
            c => c.to_string(),
        })
        .collect();
    format!(
        "; '[' and ']' are glob characters (a class of characters): a file whose name has them is matched by '{literal}'"
    )
}

fn expand(pattern: &Path) -> Result<Vec<PathBuf>> {
    let text = pattern.to_string_lossy();
    if !text.contains(['*', '?', '[']) {
        return Ok(if pattern.is_file() {
            vec![pattern.to_path_buf()]
        } else {
            Vec::new()
        });
    }
    let mut hits = Vec::new();
    for entry in glob::glob(&text).map_err(|e| anyhow!("bad pattern '{text}': {e}"))? {
        let path = entry?;
        if path.is_file() {
            hits.push(path);
        }
    }
    Ok(hits)
}
