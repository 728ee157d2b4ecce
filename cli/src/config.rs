//! `--config FILE`: params from a YAML or JSON file (TRL's `--config recipe.yaml`,
//! LLaMA-Factory's YAML), as `key = value` pairs that `params` parses like `--set` values
//! (sequences and mappings as JSON). `--set` goes on top.

use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

/// The params in `path`: a YAML (`.yaml`, `.yml`) or JSON (`.json`) mapping at the top level.
pub fn load(path: &Path) -> Result<Vec<(String, String)>, String> {
    let shown = path.display();
    if let Ok(meta) = std::fs::metadata(path)
        && meta.len() > MAX_BYTES
    {
        return Err(format!(
            "`--config {shown}` is {} bytes; a config file is at most {MAX_BYTES} bytes",
            meta.len()
        ));
    }
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
            bound(&text).map_err(|e| format!("`{shown}` {e}"))?;
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

/// The largest config file read.
const MAX_BYTES: u64 = 1 << 20;

/// The deepest nesting a config may have (configs are flat; a deeper file is not one).
const MAX_DEPTH: usize = 64;

/// The most nodes a config may expand to, aliases counted as copies of their anchors (so a
/// small file of nested aliases, a "billion laughs", stops here before anything is built).
const MAX_NODES: u64 = 100_000;

/// Checks the YAML's nesting and its size with aliases expanded, from the parser's events and
/// before `YamlLoader` builds (and clones) anything.
fn bound(text: &str) -> Result<(), String> {
    use yaml_rust2::parser::{Event, Parser};
    // The open collections: their anchor and the nodes inside them so far.
    let mut open: Vec<(usize, u64)> = Vec::new();
    let mut anchors: std::collections::HashMap<usize, u64> = std::collections::HashMap::new();
    let mut total: u64 = 0;
    let mut parser = Parser::new_from_str(text);
    loop {
        let (event, mark) = parser.next_token().map_err(|e| {
            let m = e.marker();
            format!("line {}, column {}: {}", m.line(), m.col() + 1, e.info())
        })?;
        // The nodes (aliases expanded) this event completes under its parent, and how many
        // of them are new to the total (a collection counted itself when it opened).
        let (added, new) = match event {
            Event::StreamEnd => return Ok(()),
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if open.len() >= MAX_DEPTH {
                    return Err(format!(
                        "line {}: nested deeper than {MAX_DEPTH} levels; a config is a mapping of params",
                        mark.line()
                    ));
                }
                open.push((anchor, 1));
                (0, 1)
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (anchor, n) = open.pop().unwrap_or((0, 1));
                if anchor > 0 {
                    anchors.insert(anchor, n);
                }
                (n, 0)
            }
            Event::Scalar(_, _, anchor, _) => {
                if anchor > 0 {
                    anchors.insert(anchor, 1);
                }
                (1, 1)
            }
            Event::Alias(id) => {
                let n = anchors.get(&id).copied().unwrap_or(1);
                (n, n)
            }
            _ => (0, 0),
        };
        if let Some(parent) = open.last_mut() {
            parent.1 = parent.1.saturating_add(added);
        }
        total = total.saturating_add(new);
        if total > MAX_NODES {
            return Err(format!(
                "line {}: the YAML expands to more than {MAX_NODES} values (aliases counted as copies); a config is a mapping of params",
                mark.line()
            ));
        }
    }
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

    /// A "billion laughs" (527 bytes, 10^9 values once its aliases are expanded) and 20,000
    /// nested sequences end in an error that names the file, before anything is built.
    #[test]
    fn alias_bombs_and_deep_nesting_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let y = dir.path().join("bomb.yaml");
        let mut bomb = String::from(
            "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
        );
        for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h"]
            .iter()
            .zip(["b", "c", "d", "e", "f", "g", "h", "i"])
        {
            let refs = vec![format!("*{prev}"); 9].join(",");
            bomb.push_str(&format!("{name}: &{name} [{refs}]\n"));
        }
        assert!(bomb.len() < 600, "{}", bomb.len());
        std::fs::write(&y, &bomb).unwrap();
        let e = load(&y).unwrap_err();
        assert!(e.starts_with(&format!("`{}` line ", y.display())), "{e}");
        assert!(e.contains("expands to more than 100000 values"), "{e}");
        // A few aliases are fine.
        std::fs::write(&y, "base: &b [q_proj, v_proj]\ntargets: *b\n").unwrap();
        assert_eq!(load(&y).unwrap()[1].1, r#"["q_proj","v_proj"]"#);

        std::fs::write(&y, format!("k:\n{}", "- ".repeat(20_000) + "x\n")).unwrap();
        let e = load(&y).unwrap_err();
        assert!(e.contains("nested deeper than 64 levels"), "{e}");
        assert!(e.contains("bomb.yaml"), "{e}");
        std::fs::write(
            &y,
            format!("k: {}{}\n", "[".repeat(20_000), "]".repeat(20_000)),
        )
        .unwrap();
        let e = load(&y).unwrap_err();
        assert!(e.contains("bomb.yaml"), "{e}");
    }
}
