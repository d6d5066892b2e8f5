//! Where things are in `pipeline.toml`, so that every error can point at its line: the
//! spans of keys and values (a parameter's own line, not its node's), node names checked
//! against the grammar the store and SQL need, and parameters turned into JSON without
//! losing a value JSON cannot hold.

use std::ops::Range;

use serde_json::Value;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::store::{is_valid_node_name, MAX_NODE_NAME};

/// The pipeline file's text with the span of every key, parsed once.
pub struct Source<'t> {
    document: Option<Spanned<DeTable<'t>>>,
}

impl<'t> Source<'t> {
    pub fn parse(text: &'t str) -> Source<'t> {
        Source {
            document: DeTable::parse(text).ok(),
        }
    }

    /// The span of the key at `path` (`["nodes", "tokens", "params", "seed"]`), or of the
    /// deepest key on that path that exists.
    pub fn key_span(&self, path: &[&str]) -> Option<Range<usize>> {
        let mut table = self.document.as_ref()?.get_ref();
        let mut found = None;
        for (depth, segment) in path.iter().enumerate() {
            let Some((key, value)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == *segment)
            else {
                break;
            };
            found = Some(key.span());
            match value.get_ref() {
                DeValue::Table(inner) if depth + 1 < path.len() => table = inner,
                _ => break,
            }
        }
        found
    }

    /// The span of the line that sets parameter `param` (a dotted path such as
    /// `model.layers` or `phrase_lengths[2]`) of `node`.
    pub fn param_span(&self, node: &str, param: &str) -> Option<Range<usize>> {
        let mut path = vec!["nodes", node, "params"];
        path.extend(param.split('.').map(|s| s.split('[').next().unwrap_or(s)));
        self.key_span(&path)
    }
}

/// Why `name` cannot name a node, if it cannot: node names become file names
/// (`refs/NODE.json`) and SQL identifiers (`NODE.table`), so they are what both accept
/// without quoting.
pub fn node_name_problem(name: &str) -> Option<String> {
    if !is_valid_node_name(name) {
        return Some(format!(
            "node name '{name}' is not allowed: use lower-case letters, digits and '_', starting with a letter or '_', at most {MAX_NODE_NAME} characters (node names are file names and SQL table names)"
        ));
    }
    let query = format!("SELECT * FROM {name}.t");
    let dialect = datafusion::sql::sqlparser::dialect::GenericDialect {};
    let parsed = datafusion::sql::sqlparser::parser::Parser::parse_sql(&dialect, &query);
    match parsed {
        Ok(statements) if statements.len() == 1 && statements[0].to_string() == query => None,
        _ => Some(format!(
            "node name '{name}' is an SQL keyword, so SQL could not name its tables without quotes; pick another name"
        )),
    }
}

/// A TOML value as JSON. JSON has no NaN or infinity (serde_json would quietly turn
/// them into `null`) and no dates, so those are refused with the value's path.
pub fn toml_to_json(value: &toml::Value, path: &str) -> Result<Value, (String, String)> {
    Ok(match value {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) if f.is_finite() => Value::from(*f),
        toml::Value::Float(f) => {
            let written = match (f.is_nan(), *f > 0.0) {
                (true, _) => "nan",
                (false, true) => "inf",
                (false, false) => "-inf",
            };
            return Err((
                path.to_string(),
                format!("{written} is not a finite number; no parameter takes it"),
            ));
        }
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => {
            return Err((
                path.to_string(),
                format!("{d} is a date; no parameter takes one"),
            ))
        }
        toml::Value::Array(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| toml_to_json(item, &format!("{path}[{i}]")))
                .collect::<Result<_, (String, String)>>()?,
        ),
        toml::Value::Table(table) => Value::Object(
            table
                .iter()
                .map(|(key, item)| {
                    let inner = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    Ok((key.clone(), toml_to_json(item, &inner)?))
                })
                .collect::<Result<_, (String, String)>>()?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_follow_the_grammar() {
        for good in [
            "tokens",
            "pass1_gpt",
            "_x",
            "model_seed42",
            "select",
            "order",
        ] {
            assert_eq!(node_name_problem(good), None, "{good}");
        }
        for bad in [
            "",
            "../../escape",
            "x/y",
            "Model",
            "pass-1",
            "a.b",
            "1st",
            "table",
        ] {
            assert!(node_name_problem(bad).is_some(), "{bad}");
        }
        assert!(node_name_problem(&"a".repeat(64)).is_some());
    }

    #[test]
    fn params_are_located_on_their_own_line() {
        let text = "[nodes.tokens]\nstage = \"tokenize\"\nparams.vocab_size = 1024\n\n[nodes.model.params]\nseed = 7\nmodel = { layers = 2 }\n";
        let source = Source::parse(text);
        let line = |span: Range<usize>| text[..span.start].matches('\n').count() + 1;
        assert_eq!(line(source.param_span("tokens", "vocab_size").unwrap()), 3);
        assert_eq!(line(source.param_span("model", "seed").unwrap()), 6);
        assert_eq!(line(source.param_span("model", "model.layers").unwrap()), 7);
        assert_eq!(line(source.key_span(&["nodes", "model"]).unwrap()), 5);
    }

    #[test]
    fn non_finite_floats_are_refused_with_their_path() {
        let table: toml::Table = toml::from_str("a = { b = [1.0, nan] }").unwrap();
        let err = toml_to_json(&toml::Value::Table(table), "").unwrap_err();
        assert_eq!(err.0, "a.b[1]");
    }
}
