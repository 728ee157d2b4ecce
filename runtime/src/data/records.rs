//! Records from JSON arrays and JSONL files, named by a path or a glob the sandbox allows. Every
//! error names the file, and the line or the record, so a bad line in a 100k-line file is found at
//! once.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::sandbox::Sandbox;
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

/// Options of `data::load`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct LoadOptions {
    /// Keep the first N records (LLaMA-Factory's `max_samples`).
    pub max_samples: Option<usize>,
}

/// The files `pattern` names (relative to the recipe directory; `*`, `?` and `[..]` glob), each
/// resolved through the sandbox, in sorted order. A pattern without glob characters is one path.
/// Neither a glob error nor a refusal names a match: it may lie outside the sandbox.
pub fn resolve_files(sandbox: &Sandbox, pattern: &str) -> Result<Vec<PathBuf>> {
    if !pattern.contains(['*', '?', '[']) {
        return Ok(vec![sandbox.resolve_read(pattern)?]);
    }
    let full = sandbox.base().join(pattern);
    let paths = glob::glob(&full.to_string_lossy())
        .map_err(|e| Error::InvalidArgument(format!("bad glob `{pattern}`: {e}")))?;
    let mut out = Vec::new();
    for p in paths {
        let p = p.map_err(|_| Error::Glob(format!("cannot read a match of `{pattern}`")))?;
        let real = sandbox.resolve_read(&p).map_err(|e| match e {
            Error::Sandbox(_) => Error::Sandbox(format!(
                "`{pattern}` matches files outside the recipe's sandbox; pass `--allow-read PATH` to allow more"
            )),
            other => other,
        })?;
        out.push(real);
    }
    if out.is_empty() {
        return Err(Error::Glob(format!("no files match `{pattern}`")));
    }
    out.sort();
    Ok(out)
}

/// [`load_files`], keeping the first `max_samples` records.
pub fn load(paths: &[PathBuf], opts: &LoadOptions) -> Result<Dataset> {
    let mut ds = load_files(paths)?;
    if let Some(n) = opts.max_samples {
        ds.rows.truncate(n);
    }
    Ok(ds)
}

/// Reads every file in `paths` (in order) into one dataset. A file is a JSON array of objects,
/// JSONL (one object per line; blank lines skipped), or plain text (`.txt`: one `{"text": line}`
/// record per non-blank line, as HF datasets' `text` loader and LLaMA-Factory's `wiki_demo.txt`
/// have it). An empty result is an error.
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
    let text = crate::files::read_text(path)?;
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("txt"))
    {
        return Ok(text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::json!({ "text": l }))
            .collect());
    }
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
        let t = write(d.path(), "wiki.txt", "First doc.\n\n  \nSecond {doc}.\n");
        let ds = load_files(&[t]).unwrap();
        assert_eq!(
            ds.rows,
            [
                serde_json::json!({"text": "First doc."}),
                serde_json::json!({"text": "Second {doc}."})
            ]
        );
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

    #[test]
    fn globs_expand_to_sorted_files_the_sandbox_allows() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("recipe");
        std::fs::create_dir_all(root.join("data")).unwrap();
        for name in ["b.jsonl", "a.jsonl", "c.json"] {
            write(&root.join("data"), name, "{\"x\": 1}\n");
        }
        write(d.path(), "outside.jsonl", "{\"x\": 1}\n");
        let sb = Sandbox::new(&root, root.join("runs"), &[]).unwrap();
        let names = |files: Vec<PathBuf>| -> Vec<String> {
            files
                .iter()
                .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            names(resolve_files(&sb, "data/*.jsonl").unwrap()),
            ["a.jsonl", "b.jsonl"]
        );
        assert_eq!(
            names(resolve_files(&sb, "data/c.json").unwrap()),
            ["c.json"]
        );
        let e = resolve_files(&sb, "data/*.csv").unwrap_err();
        assert_eq!(
            (e.kind(), e.to_string()),
            ("io", "no files match `data/*.csv`".into())
        );
        let e = resolve_files(&sb, "../*.jsonl").unwrap_err();
        assert_eq!(e.kind(), "sandbox");
        assert!(
            e.to_string()
                .starts_with("`../*.jsonl` matches files outside"),
            "{e}"
        );
        let ds = load(
            &resolve_files(&sb, "data/*").unwrap(),
            &LoadOptions {
                max_samples: Some(2),
            },
        )
        .unwrap();
        assert_eq!((ds.len(), ds.source.as_str()), (2, "3 files"));
    }
}
