//! The first pass over `pipeline.toml`'s nodes: each node's stage, canonical parameters
//! and declaration, so that the second pass checks every wiring against what its
//! upstream node declares, whichever comes first by name.

use std::ops::Range;

use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use stage_api::{AnyStage, StageSpec};
use toml::Spanned;

use super::source::{node_name_problem, toml_to_json, Source};
use super::NodeFile;
use crate::registry::Registry;

/// One node's stage, canonical parameters and declaration.
pub(super) type Prepared<'r> = (&'r dyn AnyStage, Value, &'static StageSpec);

/// Checks `name`'s stage and parameters (and, for a stage whose nodes declare their
/// outputs, the node's `outputs`), each error at its line.
pub(super) fn prepare<'r>(
    name: &str,
    spanned: &Spanned<NodeFile>,
    registry: &'r Registry,
    source: &Source,
    at: &dyn Fn(Option<Range<usize>>) -> String,
) -> Result<Prepared<'r>> {
    let node_at = at(Some(spanned.span()));
    if let Some(problem) = node_name_problem(name) {
        let span = source.key_span(&["nodes", name]).or(Some(spanned.span()));
        bail!("{}: {problem}", at(span));
    }
    let def = spanned.get_ref();
    let stage_name = def.stage.get_ref();
    let stage = registry.get(stage_name).ok_or_else(|| {
        anyhow!(
            "{}: node '{name}': unknown stage kind '{stage_name}' (known: {})",
            at(Some(def.stage.span())),
            registry.kinds().join(", ")
        )
    })?;
    let params_at = def
        .params
        .as_ref()
        .map(|p| at(Some(p.span())))
        .unwrap_or_else(|| node_at.clone());
    let outputs_at = def.outputs.as_ref().map(|o| {
        at(source
            .key_span(&["nodes", name, "outputs"])
            .or(Some(o.span())))
    });
    // A node's declared outputs are `outputs.…`, not `params.outputs.…`.
    let param_at = |param: &str| {
        let path: Vec<&str> = param.split('.').collect();
        match (&outputs_at, source.param_span(name, param)) {
            (Some(_), _) if path[0] == "outputs" => {
                let mut key = vec!["nodes", name];
                key.extend(path.iter().map(|s| s.split('[').next().unwrap_or(s)));
                at(source.key_span(&key))
            }
            (_, Some(span)) => at(Some(span)),
            _ => params_at.clone(),
        }
    };
    let mut raw_params = match &def.params {
        Some(p) => toml_to_json(&toml::Value::Table(p.get_ref().clone()), "").map_err(
            |(param, message)| {
                anyhow!(
                    "{}: node '{name}': params.{param}: {message}",
                    param_at(&param)
                )
            },
        )?,
        None => Value::Object(Default::default()),
    };
    // A stage whose nodes declare their outputs has no outputs of its own.
    let declares_per_node = stage.spec().declared_per_node();
    if declares_per_node && def.outputs.is_none() && raw_params.get("outputs").is_some() {
        bail!(
            "{}: node '{name}': declare what the node writes as outputs.tables.NAME and outputs.files, not as params.outputs",
            param_at("outputs")
        );
    }
    if let (Some(outputs), Some(outputs_at)) = (&def.outputs, &outputs_at) {
        if raw_params.get("outputs").is_some() {
            bail!("{outputs_at}: node '{name}': outputs are declared here, not as params.outputs");
        }
        let declared = toml_to_json(&toml::Value::Table(outputs.get_ref().clone()), "").map_err(
            |(param, message)| anyhow!("{outputs_at}: node '{name}': outputs.{param}: {message}"),
        )?;
        raw_params["outputs"] = declared;
    }
    let params = stage.canonical_params(&raw_params).map_err(|e| match &e {
        stage_api::StageError::InvalidParam { param, .. }
            if param.split('.').next() == Some("outputs") && def.outputs.is_some() =>
        {
            if declares_per_node {
                // Written `outputs.…` in the node, so named that way.
                let message = e.to_string();
                let message = message.strip_prefix("params.").unwrap_or(&message);
                anyhow!("{}: node '{name}': {message}", param_at(param))
            } else {
                anyhow!(
                    "{}: node '{name}': stage '{stage_name}' declares its own outputs; a node declares them only for stage = \"command\"",
                    param_at(param)
                )
            }
        }
        stage_api::StageError::InvalidParam { param, .. } => {
            anyhow!("{}: node '{name}': {e}", param_at(param))
        }
        _ => anyhow!("{params_at}: node '{name}': {e}"),
    })?;
    let input_names: Vec<&str> = def.inputs.keys().map(String::as_str).collect();
    let spec = stage.node_spec(&params, &input_names);
    Ok((stage, params, spec))
}
