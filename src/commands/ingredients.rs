//! `cachemoney explain`'s listing: what went into a node's recipe, line by line.

use crate::pipeline::Pipeline;
use crate::recipe::Ingredients;

/// Prints a recipe's ingredients, then the recipe they hash to.
pub(super) fn print(
    node: &str,
    recipe: &str,
    ingredients: &Ingredients,
    pipeline: &Pipeline,
) -> anyhow::Result<()> {
    let def = pipeline.node(node).expect("node exists");
    outln!("node     {node}");
    outln!("stage    {} v{}", ingredients.stage, ingredients.version);
    outln!(
        "params   {}",
        serde_json::to_string(&ingredients.params).unwrap_or_default()
    );
    for (input, hash) in &ingredients.inputs {
        outln!(
            "input    {input} = node '{}', content {hash}",
            def.inputs[input]
        );
    }
    for (role, files) in &ingredients.files {
        for (file, path) in files.iter().zip(&def.files[role]) {
            outln!(
                "file     {role}: {} blake3 {}  ({})",
                file.name,
                file.blake3,
                path.display()
            );
        }
    }
    outln!("recipe   {recipe}");
    outln!("         = blake3 of the canonical JSON of the lines above (file paths excluded)");
    Ok(())
}
