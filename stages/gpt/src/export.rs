//! The model artifact (§3.10): every state-dict tensor in float16, in a safetensors
//! file under the record's tensor names, so that PyTorch users can load it with
//! `safetensors.torch.load_file` and compare it with the record's own state dict.

use std::path::Path;

use tch::{nn, Kind, TchError, Tensor};

/// Writes every variable of `vs` as float16, sorted by name (the file's bytes depend only
/// on the weights).
pub fn write_fp16(vs: &nn::VarStore, path: &Path) -> Result<(), TchError> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| (name, t.detach().to_kind(Kind::Half).contiguous()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Tensor::write_safetensors(&named, path)
}

/// Loads a float16 (or any float) safetensors file into `vs`, casting to each variable's
/// own dtype: the weights the record evaluates are fp16-rounded EMA weights (§3.10).
/// Every variable must be present with its shape. Errors do not repeat the path: the
/// caller names the file.
pub fn load_into(vs: &nn::VarStore, path: &Path) -> Result<(), String> {
    let stored: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(path)
        .map_err(|e| format!("not a readable safetensors file: {e}"))?
        .into_iter()
        .collect();
    let variables = vs.variables();
    let mut names: Vec<&String> = variables.keys().collect();
    names.sort();
    for name in names {
        let variable = &variables[name];
        let tensor = stored
            .get(name)
            .ok_or_else(|| format!("tensor '{name}' is missing"))?;
        if tensor.size() != variable.size() {
            return Err(format!(
                "tensor '{name}' has shape {:?}, the model expects {:?}",
                tensor.size(),
                variable.size()
            ));
        }
        tch::no_grad(|| {
            variable
                .shallow_clone()
                .copy_(&tensor.to_kind(variable.kind()))
        });
    }
    Ok(())
}
