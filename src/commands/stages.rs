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
        println!("  outputs:");
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
            if let Ok(serde_json::Value::Object(map)) = stage.canonical_params(&raw) {
                for (key, value) in map.iter().filter(|(k, _)| Some(k.as_str()) != skip) {
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
