//! Recipes: what a stage run depends on, and its hash.
//!
//! A recipe covers the stage kind and version, the canonical parameters, the *content*
//! hashes of upstream artifacts and the content hashes (and file names) of raw inputs.
//! Never paths, environment variables, timestamps or thread counts: those would make two
//! machines, or two checkouts, disagree about what is cached (bazel #2574).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileIngredient {
    /// The file's name without its directory.
    pub name: String,
    pub blake3: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Ingredients {
    pub stage: String,
    pub version: u32,
    pub params: Value,
    /// Input name → upstream content hash.
    pub inputs: BTreeMap<String, String>,
    /// File role → the role's files, in path order.
    pub files: BTreeMap<String, Vec<FileIngredient>>,
}

impl Ingredients {
    pub fn recipe(&self) -> String {
        let value = serde_json::to_value(self).expect("ingredients serialise");
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"cachemoney.recipe.v1\n");
        hasher.update(canonical_json(&value).as_bytes());
        hasher.finalize().to_hex().to_string()
    }

    /// Human-readable reasons why `self` (the current pipeline) differs from `old` (what
    /// was last built for the node).
    pub fn differences_from(&self, old: &Ingredients) -> Vec<String> {
        let mut reasons = Vec::new();
        if self.stage != old.stage {
            reasons.push(format!("stage kind {} → {}", old.stage, self.stage));
        }
        if self.version != old.version {
            reasons.push(format!(
                "stage version {} → {} (the stage's code changed meaning)",
                old.version, self.version
            ));
        }
        let empty = serde_json::Map::new();
        let new_params = self.params.as_object().unwrap_or(&empty);
        let old_params = old.params.as_object().unwrap_or(&empty);
        let keys: std::collections::BTreeSet<&String> =
            new_params.keys().chain(old_params.keys()).collect();
        for key in keys {
            let (a, b) = (old_params.get(key), new_params.get(key));
            if a != b {
                reasons.push(format!(
                    "param {key}: {} → {}",
                    a.map(Value::to_string).unwrap_or_else(|| "unset".into()),
                    b.map(Value::to_string).unwrap_or_else(|| "unset".into())
                ));
            }
        }
        let names: std::collections::BTreeSet<&String> =
            self.inputs.keys().chain(old.inputs.keys()).collect();
        for name in names {
            match (old.inputs.get(name), self.inputs.get(name)) {
                (Some(a), Some(b)) if a != b => reasons.push(format!(
                    "input {name}: upstream content {} → {}",
                    short(a),
                    short(b)
                )),
                (None, Some(_)) => reasons.push(format!("input {name}: added")),
                (Some(_), None) => reasons.push(format!("input {name}: removed")),
                _ => {}
            }
        }
        let roles: std::collections::BTreeSet<&String> =
            self.files.keys().chain(old.files.keys()).collect();
        for role in roles {
            let a = old.files.get(role).cloned().unwrap_or_default();
            let b = self.files.get(role).cloned().unwrap_or_default();
            if a == b {
                continue;
            }
            let a_by_name: BTreeMap<_, _> = a.iter().map(|f| (&f.name, &f.blake3)).collect();
            let b_by_name: BTreeMap<_, _> = b.iter().map(|f| (&f.name, &f.blake3)).collect();
            let mut details = Vec::new();
            for (name, hash) in &b_by_name {
                match a_by_name.get(name) {
                    None => details.push(format!("{name} added")),
                    Some(old_hash) if old_hash != hash => details.push(format!("{name} changed")),
                    _ => {}
                }
            }
            for name in a_by_name.keys() {
                if !b_by_name.contains_key(name) {
                    details.push(format!("{name} removed"));
                }
            }
            if details.is_empty() {
                details.push("order changed".into());
            }
            reasons.push(format!("files.{role}: {}", details.join(", ")));
        }
        reasons
    }
}

pub fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// JSON with object keys sorted at every level and no whitespace: the same value always
/// gives the same text, whatever map type serde_json was built with.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*key).clone()).to_string());
                out.push(':');
                write_canonical(&map[*key], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ingredients(params: Value) -> Ingredients {
        Ingredients {
            stage: "tokenize".into(),
            version: 1,
            params,
            inputs: BTreeMap::new(),
            files: BTreeMap::new(),
        }
    }

    #[test]
    fn key_order_does_not_change_the_recipe() {
        let a: Value = serde_json::from_str(r#"{"a":1,"b":{"y":2,"x":3}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"b":{"x":3,"y":2},"a":1}"#).unwrap();
        assert_eq!(ingredients(a).recipe(), ingredients(b).recipe());
    }

    #[test]
    fn any_parameter_changes_the_recipe() {
        let a = ingredients(json!({"vocab_size": 1024}));
        let b = ingredients(json!({"vocab_size": 512}));
        assert_ne!(a.recipe(), b.recipe());
        assert_eq!(b.differences_from(&a), vec!["param vocab_size: 1024 → 512"]);
    }
}
