//! `cachemoney stages`: every stage's declaration, as `pipeline.toml` authors need it.

use crate::registry::Registry;

/// `cachemoney stages`: every stage's declaration.
pub fn stages() {
    let registry = Registry::with_builtin_stages();
    for kind in registry.kinds() {
        let stage = registry.get(kind).expect("listed");
        let spec = stage.spec();
        println!("{kind} (v{}): {}", spec.version, spec.summary);
        if !spec.inputs.is_empty() {
            println!("  inputs:");
        }
        for input in spec.inputs {
            let reads: Vec<String> = input.reads.iter().map(|r| r.signature()).collect();
            let optional = if input.required { "" } else { " (optional)" };
            println!(
                "    {:<12} reads {}{optional}",
                input.name,
                reads.join(", ")
            );
        }
        let declared_per_node = spec.declared_per_node();
        if declared_per_node {
            println!("  inputs: any, by any name (the program gets a copy of each)");
            println!("  outputs: declared by each node: outputs.tables.NAME = [\"column type\", ...], outputs.files = [...]");
        } else {
            println!("  outputs:");
        }
        for output in spec.outputs {
            println!("    {output}");
        }
        if let Some(param) = spec.run_seed_param {
            println!("  run seed: params.{param} (set per seed by --seeds)");
        }
        if !spec.metrics.is_empty() {
            println!("  metrics: {}", spec.metrics.join(", "));
        }
        for role in spec.files {
            println!(
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
                    println!("{indent}params.{key:<22} default {value}");
                }
            }
        };
        match spec.variants {
            None => print_defaults(serde_json::Value::Null, None, "  "),
            Some(variants) => {
                for value in variants.values {
                    let default = if *value == variants.default {
                        " (the default)"
                    } else {
                        ""
                    };
                    println!("  params.{} = \"{value}\"{default}", variants.param);
                    print_defaults(
                        serde_json::json!({ variants.param: value }),
                        Some(variants.param),
                        "    ",
                    );
                }
            }
        }
    }
}
