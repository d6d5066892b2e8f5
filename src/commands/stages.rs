//! `cachemoney stages`: every stage's declaration, as `pipeline.toml` authors need it.

use crate::registry::Registry;

/// `cachemoney stages`: every stage's declaration.
pub fn stages() -> anyhow::Result<()> {
    let registry = Registry::with_builtin_stages();
    for kind in registry.kinds() {
        let stage = registry.get(kind).expect("listed");
        let spec = stage.spec();
        outln!("{kind} (v{}): {}", spec.version, spec.summary);
        if !spec.inputs.is_empty() {
            outln!("  inputs:");
        }
        for input in spec.inputs.iter().filter(|i| !i.by_pipeline) {
            let reads: Vec<String> = input.reads.iter().map(|r| r.signature()).collect();
            let optional = if input.required { "" } else { " (optional)" };
            match input.help {
                Some(help) => outln!("    {:<12} {help}{optional}", input.name),
                None => outln!(
                    "    {:<12} reads {}{optional}",
                    input.name,
                    reads.join(", ")
                ),
            }
        }
        let by_pipeline: Vec<&str> = spec
            .inputs
            .iter()
            .filter(|i| i.by_pipeline)
            .map(|i| i.name)
            .collect();
        if !by_pipeline.is_empty() {
            outln!(
                "  wired by the pipeline for the re-runs, not in pipeline.toml: {}",
                by_pipeline.join(", ")
            );
        }
        let declared_per_node = spec.declared_per_node();
        if declared_per_node {
            outln!("  inputs: any, by any name (the program gets a copy of each)");
            outln!("  outputs: declared by each node: outputs.tables.NAME = [\"column type\", ...], outputs.files = [...]");
        } else {
            outln!("  outputs:");
        }
        for output in spec.outputs {
            outln!("    {output}");
        }
        if let Some(param) = spec.run_seed_param {
            outln!("  run seed: params.{param} (set per seed by --seeds)");
        }
        if !spec.metrics.is_empty() {
            outln!("  metrics: {}", spec.metrics.join(", "));
        }
        for role in spec.files {
            outln!(
                "  files.{:<10} {}{}",
                role.name,
                role.help,
                if role.required { " (required)" } else { "" }
            );
        }
        let print_defaults = |raw: serde_json::Value, skip: Option<&str>, indent: &str| {
            let canonical = stage.canonical_params(&raw).ok();
            // A stage with a parameter no default fills (a program to run) lists its
            // defaults unvalidated, that parameter's empty default included.
            let params = canonical.unwrap_or_else(|| stage.default_params());
            if let serde_json::Value::Object(map) = params {
                // A node's declared outputs are written `outputs.…`, listed above.
                let listed = |k: &str| Some(k) != skip && !(declared_per_node && k == "outputs");
                for (key, value) in map.iter().filter(|(k, _)| listed(k)) {
                    outln!("{indent}params.{key:<22} default {value}");
                }
            }
            anyhow::Ok(())
        };
        match spec.variants {
            None => print_defaults(serde_json::Value::Null, None, "  ")?,
            Some(variants) => {
                for value in variants.values {
                    let default = if *value == variants.default {
                        " (the default)"
                    } else {
                        ""
                    };
                    outln!("  params.{} = \"{value}\"{default}", variants.param);
                    print_defaults(
                        serde_json::json!({ variants.param: value }),
                        Some(variants.param),
                        "    ",
                    )?;
                }
            }
        }
    }
    Ok(())
}
