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

#[cfg(test)]
mod tests {
    use crate::export;
    use crate::testing::{seeded, small};
    use crate::{Gpt, GptConfig};
    use tch::{nn, Device, Kind};

    #[test]
    fn the_fp16_artifact_loads_in_python_and_round_trips() {
        let _seeded = seeded(3);
        let vs = nn::VarStore::new(Device::Cpu);
        Gpt::new(&vs.root(), &GptConfig::default()).unwrap();
        let dir = std::env::temp_dir().join(format!("cm-gpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        export::write_fp16(&vs, &path).unwrap();

        // PyTorch's own reader, from the project's virtualenv, sees the spec's inventory.
        let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv/bin/python");
        let script = r#"
import sys
from safetensors.torch import load_file
t = load_file(sys.argv[1])
assert all(v.dtype.is_floating_point and str(v.dtype) == "torch.float16" for v in t.values())
print(sum(v.numel() for v in t.values()), len(t), tuple(t["qo_bank"].shape), tuple(t["mlp_up_bank"].shape))
"#;
        let out = std::process::Command::new(python)
            .args(["-c", script, path.to_str().unwrap()])
            .output()
            .expect("the .venv python (./dev sets it up)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "4234268 38 (12, 256, 256) (6, 768, 256)"
        );

        // Loading it back gives the fp16-rounded weights; a wrong shape is refused.
        let other = nn::VarStore::new(Device::Cpu);
        Gpt::new(&other.root(), &GptConfig::default()).unwrap();
        export::load_into(&other, &path).unwrap();
        let (a, b) = (
            &vs.variables()["tok_emb.weight"],
            &other.variables()["tok_emb.weight"],
        );
        assert!(a.to_kind(Kind::Half).to_kind(Kind::Float).equal(b));
        let small_vs = nn::VarStore::new(Device::Cpu);
        Gpt::new(&small_vs.root(), &small()).unwrap();
        let err = export::load_into(&small_vs, &path).unwrap_err();
        assert!(err.contains("has shape"), "{err}");
        std::fs::write(&path, b"not safetensors").unwrap();
        let err = export::load_into(&other, &path).unwrap_err();
        assert!(err.contains("not a readable safetensors file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
