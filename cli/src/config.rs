//! `--config FILE`: params from a YAML or JSON file (TRL's `--config recipe.yaml`,
//! LLaMA-Factory's YAML), as `key = value` pairs that `params` parses like `--set` values
//! (sequences and mappings as JSON). `--set` goes on top.

use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

/// The params in `path`: a YAML (`.yaml`, `.yml`) or JSON (`.json`) mapping at the top level.
pub fn load(path: &Path) -> Result<Vec<(String, String)>, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read `--config {shown}`: {e}"))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let json: serde_json::Value = match ext.as_str() {
        "json" => serde_json::from_str(&text).map_err(|e| format!("`{shown}`: {e}"))?,
        "yaml" | "yml" => {
            let docs = YamlLoader::load_from_str(&text).map_err(|e| {
                let m = e.marker();
                format!(
                    "`{shown}` line {}, column {}: {}",
                    m.line(),
                    m.col() + 1,
                    e.info()
                )
            })?;
            match docs.as_slice() {
                [] => serde_json::Value::Object(serde_json::Map::new()),
                [one] => to_json(one).map_err(|e| format!("`{shown}`: {e}"))?,
                _ => {
                    return Err(format!(
                        "`{shown}` holds {} YAML documents; give one",
                        docs.len()
                    ));
                }
            }
        }
        _ => {
            return Err(format!(
                "`--config {shown}`: expected a `.yaml`, `.yml` or `.json` file"
            ));
        }
    };
    let serde_json::Value::Object(map) = json else {
        return Err(format!(
            "`{shown}` must hold a mapping of params (`key: value` lines), not a {}",
            kind(&json)
        ));
    };
    Ok(map
        .into_iter()
        .map(|(k, v)| {
            let raw = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (k, raw)
        })
        .collect())
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "list",
        serde_json::Value::Object(_) => "mapping",
    }
}

fn to_json(y: &Yaml) -> Result<serde_json::Value, String> {
    use serde_json::Value as J;
    Ok(match y {
        Yaml::Real(s) => s
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| J::String(s.clone()), J::Number),
        Yaml::Integer(i) => J::from(*i),
        Yaml::String(s) => J::String(s.clone()),
        Yaml::Boolean(b) => J::Bool(*b),
        Yaml::Array(a) => J::Array(a.iter().map(to_json).collect::<Result<_, _>>()?),
        Yaml::Hash(h) => {
            let mut m = serde_json::Map::new();
            for (k, v) in h {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => return Err(format!("a mapping key that is not a name: {other:?}")),
                };
                m.insert(key, to_json(v)?);
            }
            J::Object(m)
        }
        Yaml::Null => J::Null,
        Yaml::Alias(_) | Yaml::BadValue => {
            return Err("an alias or a value YAML cannot read".into());
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn yaml_and_json_give_the_same_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let y = dir.path().join("run.yaml");
        std::fs::write(&y, "learning_rate: 2.0e-4\nmax_steps: 10\nbf16: true\nmodel: /m\ntargets: [q_proj, v_proj]\n").unwrap();
        let j = dir.path().join("run.json");
        std::fs::write(&j, r#"{"learning_rate": 2.0e-4, "max_steps": 10, "bf16": true, "model": "/m", "targets": ["q_proj", "v_proj"]}"#).unwrap();
        let (a, b) = (load(&y).unwrap(), load(&j).unwrap());
        assert_eq!(a, b);
        assert_eq!(
            a[4],
            ("targets".to_string(), r#"["q_proj","v_proj"]"#.to_string())
        );
        std::fs::write(&y, "- a\n- b\n").unwrap();
        assert!(
            load(&y)
                .unwrap_err()
                .contains("must hold a mapping of params")
        );
        std::fs::write(&y, "a: [1, 2\n").unwrap();
        assert!(load(&y).unwrap_err().contains("line"));
        assert!(
            load(&dir.path().join("run.toml"))
                .unwrap_err()
                .contains("cannot read")
        );
    }
}
