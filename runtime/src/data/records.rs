//! Records from JSON arrays and JSONL files. Every error names the file, and the line or the
//! record, so a bad line in a 100k-line file is found at once.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, Result};

/// An ordered collection of records (JSON objects), with where they came from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dataset {
    /// The records.
    pub rows: Vec<Value>,
    /// A short description of the source, for messages (`data/train.jsonl`, `2 files`).
    pub source: String,
}

impl Dataset {
    /// Number of records.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Column names in first-seen order across all records.
    pub fn columns(&self) -> Vec<String> {
        let mut cols: Vec<String> = Vec::new();
        for r in &self.rows {
            if let Value::Object(m) = r {
                for k in m.keys() {
                    if !cols.iter().any(|c| c == k) {
                        cols.push(k.clone());
                    }
                }
            }
        }
        cols
    }
}

/// Reads every file in `paths` (in order) into one dataset. A file is a JSON array of objects, or
/// JSONL (one object per line; blank lines skipped). An empty result is an error.
pub fn load_files(paths: &[PathBuf]) -> Result<Dataset> {
    let mut rows = Vec::new();
    for p in paths {
        rows.extend(load_file(p)?);
    }
    let source = match paths {
        [one] => one.display().to_string(),
        many => format!("{} files", many.len()),
    };
    if rows.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "`{source}`: the dataset is empty (no records)"
        )));
    }
    Ok(Dataset { rows, source })
}

fn load_file(path: &Path) -> Result<Vec<Value>> {
    let text = crate::error::read_text(path)?;
    let trimmed = text.trim_start();
    let rows = if trimmed.starts_with('[') {
        match serde_json::from_str::<Value>(trimmed) {
            Ok(Value::Array(rows)) => rows,
            Ok(other) => {
                return Err(Error::InvalidArgument(format!(
                    "`{}`: expected a JSON array of records, found {}",
                    path.display(),
                    kind(&other)
                )));
            }
            Err(source) => {
                return Err(Error::Json {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
    } else {
        let mut rows = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line).map_err(|e| {
                let msg = e.to_string();
                let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
                Error::InvalidArgument(format!(
                    "`{}`: line {}, column {}: invalid JSON: {msg}",
                    path.display(),
                    i + 1,
                    e.column()
                ))
            })?;
            if !v.is_object() {
                return Err(Error::InvalidArgument(format!(
                    "`{}`: line {}: expected a JSON object (one record per line), found {}",
                    path.display(),
                    i + 1,
                    kind(&v)
                )));
            }
            rows.push(v);
        }
        rows
    };
    if let Some((i, v)) = rows.iter().enumerate().find(|(_, v)| !v.is_object()) {
        return Err(Error::InvalidArgument(format!(
            "`{}`: record {i} is {}, expected an object",
            path.display(),
            kind(v)
        )));
    }
    Ok(rows)
}

/// `a string`, `an array`, ... for messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn json_arrays_and_jsonl() {
        let d = tempfile::tempdir().unwrap();
        let a = write(d.path(), "a.json", r#"[{"x": 1}, {"x": 2, "y": "b"}]"#);
        let b = write(d.path(), "b.jsonl", "{\"x\": 3}\n\n{\"z\": true}\n");
        let ds = load_files(&[a, b]).unwrap();
        assert_eq!(ds.len(), 4);
        assert_eq!(ds.columns(), ["x", "y", "z"]);
        assert_eq!(ds.source, "2 files");
    }

    #[test]
    fn bad_inputs_name_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "bad.jsonl", "{\"x\": 1}\n{\"x\": 2,}\n");
        let e = load_files(&[p]).unwrap_err().to_string();
        assert!(
            e.contains("bad.jsonl`: line 2, column 9: invalid JSON: trailing comma"),
            "{e}"
        );
        let p = write(d.path(), "arr.jsonl", "{\"x\": 1}\n[1]\n");
        let e = load_files(&[p]).unwrap_err().to_string();
        assert!(
            e.contains("arr.jsonl`: line 2: expected a JSON object"),
            "{e}"
        );
        let p = write(d.path(), "s.json", "[{\"x\": 1}, \"oops\"]");
        let e = load_files(&[p]).unwrap_err().to_string();
        assert!(e.contains("s.json`: record 1 is a string"), "{e}");
        let p = write(d.path(), "broken.json", "[{\"x\": 1},\n {\"x\": }]");
        let e = load_files(&[p]).unwrap_err().to_string();
        assert!(
            e.contains("broken.json`: invalid JSON") && e.contains("line 2"),
            "{e}"
        );
        let p = write(d.path(), "empty.json", "[]");
        let e = load_files(&[p]).unwrap_err().to_string();
        assert!(e.contains("the dataset is empty"), "{e}");
    }
}
