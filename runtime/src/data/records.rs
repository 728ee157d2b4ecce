//! Records from JSON arrays and JSONL files, named by a path or a glob the sandbox allows. Every
//! error names the file, and the line or the record, so a bad line in a 100k-line file is found at
//! once.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::cancel::CancelToken;
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
    /// A hub dataset's split (`train` when unset): its data files.
    pub split: Option<String>,
    /// A hub dataset's branch, tag or commit in the HF cache (`main` when unset).
    pub revision: Option<String>,
}

/// The data files of `split` in a hub dataset's snapshot, as HF datasets finds them: the
/// `.parquet`, `.json`, `.jsonl` and `.txt` files whose name starts with the split
/// (`data/train-00000-of-00001.parquet`, `train.jsonl`) or that lie in a folder named after it
/// (`data/train/...`); a repo whose files name no split has them all as `train`. Sorted;
/// `cancel` is polled at every entry.
pub fn split_files(snapshot: &Path, split: &str, cancel: &CancelToken) -> Result<Vec<PathBuf>> {
    const SPLITS: [&str; 4] = ["train", "test", "validation", "dev"];
    let mut data = Vec::new();
    for (p, kind) in crate::sandbox::walk(snapshot, usize::MAX, cancel)? {
        let supported = p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
            ["parquet", "json", "jsonl", "txt"]
                .iter()
                .any(|x| e.eq_ignore_ascii_case(x))
        });
        if supported && kind == crate::sandbox::Kind::File {
            data.push(p);
        }
    }
    let named = |p: &Path, split: &str| {
        let rel = p.strip_prefix(snapshot).unwrap_or(p);
        let file = rel
            .file_name()
            .map(|f| f.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        rel.parent()
            .is_some_and(|d| d.components().any(|c| c.as_os_str() == split))
            || [
                format!("{split}-"),
                format!("{split}."),
                format!("{split}_"),
            ]
            .iter()
            .any(|pre| file.starts_with(pre.as_str()))
    };
    let any_split = data.iter().any(|p| SPLITS.iter().any(|s| named(p, s)));
    let files: Vec<PathBuf> = if any_split {
        data.iter().filter(|p| named(p, split)).cloned().collect()
    } else if split == "train" {
        data.clone()
    } else {
        Vec::new()
    };
    if files.is_empty() {
        let shown: Vec<String> = data
            .iter()
            .take(8)
            .map(|p| format!("`{}`", p.strip_prefix(snapshot).unwrap_or(p).display()))
            .collect();
        return Err(Error::InvalidArgument(format!(
            "the dataset has no `{split}` split: no data file is named for it (its files: {})",
            if shown.is_empty() {
                "none of .parquet, .json, .jsonl or .txt".to_string()
            } else {
                shown.join(", ")
            }
        )));
    }
    Ok(files)
}

/// The files `pattern` names (relative to the recipe directory; `*`, `?`, `[..]` and `**` glob),
/// each resolved through the sandbox, in sorted order. A pattern without glob characters is one
/// path. Neither a glob error nor a refusal names a match, and a pattern that reaches outside the
/// sandbox is refused with one message whether or not anything there exists or matches. The walk
/// polls `cancel` at every directory entry.
pub fn resolve_files(
    sandbox: &Sandbox,
    pattern: &str,
    cancel: &CancelToken,
) -> Result<Vec<PathBuf>> {
    if !pattern.contains(['*', '?', '[']) {
        return Ok(vec![sandbox.resolve_read(pattern)?]);
    }
    let outside = || {
        Error::Sandbox(format!(
            "`{pattern}` matches files outside the recipe's sandbox; pass `--allow-read PATH` to allow more"
        ))
    };
    let none = || Error::Glob(format!("no files match `{pattern}`"));
    let comps: Vec<PathBuf> = sandbox
        .base()
        .join(pattern)
        .components()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let full: PathBuf = comps.iter().collect();
    let glob_chars = |c: &PathBuf| c.to_string_lossy().contains(['*', '?', '[']);
    let first = comps.iter().position(glob_chars).unwrap_or(comps.len());
    let matcher = glob::Pattern::new(&full.to_string_lossy())
        .map_err(|e| Error::InvalidArgument(format!("bad glob `{pattern}`: {e}")))?;
    // The walk starts where the pattern's literal part leads, checked first: outside the sandbox
    // it is refused whether it exists or not.
    let root: PathBuf = comps[..first].iter().collect();
    match sandbox.resolve_read(&root) {
        Ok(_) => {}
        Err(Error::Sandbox(_)) => return Err(outside()),
        Err(_) => return Err(none()),
    }
    let depth = if comps[first..].iter().any(|c| c.as_os_str() == "**") {
        usize::MAX
    } else {
        comps.len() - first
    };
    // `glob::glob`'s matching: `*` stays within a component, a leading dot matches.
    let opts = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    let mut out = Vec::new();
    // Listed through the sandbox's handles: a link is followed only inside its root, each
    // directory entered once (a loop ends); an unreadable entry names no path.
    let entries = crate::sandbox::walk(&root, depth, cancel).map_err(|e| match e {
        Error::Cancelled => e,
        _ => Error::Glob(format!("cannot read a match of `{pattern}`")),
    })?;
    for (path, _) in entries {
        if !matcher.matches_path_with(&path, opts) {
            continue;
        }
        let real = sandbox.resolve_read(&path).map_err(|e| match e {
            Error::Sandbox(_) => outside(),
            other => other,
        })?;
        out.push(real);
    }
    if out.is_empty() {
        return Err(none());
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
/// JSONL (one object per line; blank lines skipped), parquet (`.parquet`, a record a row), or
/// plain text (`.txt`: one `{"text": line}`
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
    let ext = |x: &str| path.extension().is_some_and(|e| e.eq_ignore_ascii_case(x));
    if ext("parquet") {
        // Row groups are read from the file as the rows reach them.
        return parquet_rows(path, crate::sandbox::open(path)?);
    }
    let bytes = crate::sandbox::read(path)?;
    // Binary formats by their content as well as their name (a parquet file saved as `.json`
    // is read as what it is).
    if bytes.starts_with(b"PAR1") {
        return parquet_rows(path, crate::sandbox::open(path)?);
    }
    if ext("arrow") || bytes.starts_with(b"ARROW1") || bytes.starts_with(&[0xff, 0xff, 0xff, 0xff])
    {
        return arrow_rows(path, bytes);
    }
    // Other binary files: say what they look like rather than "not UTF-8".
    let looks = [
        (
            &[0x1f, 0x8b][..],
            "a gzip-compressed file: decompress it first (`gunzip`)",
        ),
        (&b"PK\x03\x04"[..], "a zip archive: unpack it first"),
        (
            &[0x28, 0xb5, 0x2f, 0xfd][..],
            "a zstd-compressed file: decompress it first (`unzstd`)",
        ),
        (
            &b"BZh"[..],
            "a bzip2-compressed file: decompress it first (`bunzip2`)",
        ),
    ];
    if let Some((_, what)) = looks.iter().find(|(magic, _)| bytes.starts_with(magic)) {
        return Err(Error::InvalidArgument(format!(
            "`{}`: {what}; data::load reads JSON, JSONL, parquet, Arrow and text files",
            path.display()
        )));
    }
    let text = crate::files::text_of(path, bytes)?;
    if ext("txt") {
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

/// A parquet file's rows as records (HF datasets' `data/train-00000-of-00001.parquet`): each
/// row an object of its columns; lists and structs (a `messages` column of `{role, content}`) as
/// JSON arrays and objects. A file the parquet reader cannot read (or that makes it panic) is an
/// error naming the file, and the row when one row is bad.
fn parquet_rows(path: &Path, file: std::fs::File) -> Result<Vec<Value>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let bad = |m: String| {
        Error::InvalidArgument(format!(
            "`{}`: not a parquet file the reader can read: {m}",
            path.display()
        ))
    };
    let rows = crate::panic::catch(|| -> Result<Vec<Value>> {
        let reader = SerializedFileReader::new(file).map_err(|e| bad(e.to_string()))?;
        let iter = reader.get_row_iter(None).map_err(|e| bad(e.to_string()))?;
        let mut rows = Vec::new();
        for (i, row) in iter.enumerate() {
            let row = row.map_err(|e| bad(format!("row {i}: {e}")))?;
            rows.push(row.to_json_value());
        }
        Ok(rows)
    })
    .map_err(bad)??;
    Ok(rows)
}

/// An Arrow IPC file's rows as records: what HF datasets keeps in its cache
/// (`~/.cache/huggingface/datasets/.../name-train.arrow`, the stream format) or the file format.
fn arrow_rows(path: &Path, bytes: Vec<u8>) -> Result<Vec<Value>> {
    use arrow_array::RecordBatch;
    let bad = |m: String| {
        Error::InvalidArgument(format!(
            "`{}`: not an Arrow file the reader can read: {m}",
            path.display()
        ))
    };
    let rows = crate::panic::catch(|| -> Result<Vec<Value>> {
        let batches: Vec<RecordBatch> = if bytes.starts_with(b"ARROW1") {
            arrow_ipc::reader::FileReader::try_new(std::io::Cursor::new(&bytes), None)
                .map_err(|e| bad(e.to_string()))?
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| bad(e.to_string()))?
        } else {
            arrow_ipc::reader::StreamReader::try_new(std::io::Cursor::new(&bytes), None)
                .map_err(|e| bad(e.to_string()))?
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| bad(e.to_string()))?
        };
        let mut rows = Vec::new();
        for batch in &batches {
            let mut w = arrow_json::ArrayWriter::new(Vec::new());
            w.write(batch).map_err(|e| bad(e.to_string()))?;
            w.finish().map_err(|e| bad(e.to_string()))?;
            let out = w.into_inner();
            if out.is_empty() {
                continue;
            }
            let v: Vec<Value> = serde_json::from_slice(&out).map_err(|e| bad(e.to_string()))?;
            rows.extend(v);
        }
        Ok(rows)
    })
    .map_err(bad)??;
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
    fn compressed_files_are_named_for_what_they_are() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("data.json");
        std::fs::write(&p, [0x1f, 0x8b, 8, 0, 0, 0]).unwrap();
        let e = load_files(&[p]).unwrap_err().to_string();
        assert!(
            e.contains("data.json`: a gzip-compressed file: decompress it first"),
            "{e}"
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
            names(resolve_files(&sb, "data/*.jsonl", &CancelToken::new()).unwrap()),
            ["a.jsonl", "b.jsonl"]
        );
        assert_eq!(
            names(resolve_files(&sb, "data/c.json", &CancelToken::new()).unwrap()),
            ["c.json"]
        );
        let e = resolve_files(&sb, "data/*.csv", &CancelToken::new()).unwrap_err();
        assert_eq!(
            (e.kind(), e.to_string()),
            ("io", "no files match `data/*.csv`".into())
        );
        let e = resolve_files(&sb, "../*.jsonl", &CancelToken::new()).unwrap_err();
        assert_eq!(e.kind(), "sandbox");
        assert!(
            e.to_string()
                .starts_with("`../*.jsonl` matches files outside"),
            "{e}"
        );
        let ds = load(
            &resolve_files(&sb, "data/*", &CancelToken::new()).unwrap(),
            &LoadOptions {
                max_samples: Some(2),
                ..LoadOptions::default()
            },
        )
        .unwrap();
        assert_eq!((ds.len(), ds.source.as_str()), (2, "3 files"));
    }

    /// A tree of links that fan out tenfold over six levels (a million paths from seven
    /// directories) is walked at once, each directory entered once; a cancel stops a walk.
    #[test]
    fn a_glob_walk_enters_each_directory_once_and_stops_when_cancelled() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("recipe");
        let levels = 7;
        for l in 0..levels {
            std::fs::create_dir_all(root.join(format!("tree/L{l}"))).unwrap();
        }
        for l in 0..levels - 1 {
            for k in 0..10 {
                std::os::unix::fs::symlink(
                    root.join(format!("tree/L{}", l + 1)),
                    root.join(format!("tree/L{l}/a{k}")),
                )
                .unwrap();
            }
        }
        let sb = Sandbox::new(&root, root.join("runs"), &[]).unwrap();
        crate::sandbox::activate(Some(sb.clone()));
        let cancel = CancelToken::new();
        let start = std::time::Instant::now();
        let r = resolve_files(&sb, "tree/L0/**/zz*.qqq", &cancel);
        let took = start.elapsed();
        assert!(matches!(r, Err(Error::Glob(_))), "{r:?}");
        assert!(took < std::time::Duration::from_secs(1), "{took:?}");
        cancel.cancel();
        let r = resolve_files(&sb, "tree/L0/**/zz*.qqq", &cancel);
        assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
        crate::sandbox::activate(None);
    }

    /// A glob that reaches outside the sandbox is refused with the same message whether files
    /// there match or not (file names outside cannot be probed), directly or through a link.
    #[cfg(unix)]
    #[test]
    fn an_outside_glob_is_refused_alike_whether_it_matches_or_not() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("recipe");
        std::fs::create_dir_all(&root).unwrap();
        write(d.path(), "secret.json", "[]");
        std::os::unix::fs::symlink(d.path(), root.join("l")).unwrap();
        let sb = Sandbox::new(&root, root.join("runs"), &[]).unwrap();
        let c = CancelToken::new();
        for (hit, miss) in [
            ("../secre[t].json", "../missin[g].json"),
            ("l/secre[t].json", "l/missin[g].json"),
            ("../nothere/secre[t].json", "../secre[t].json"),
        ] {
            let a = resolve_files(&sb, hit, &c).unwrap_err();
            let b = resolve_files(&sb, miss, &c).unwrap_err();
            assert_eq!(a.kind(), "sandbox", "{a}");
            assert_eq!(
                a.to_string().replace(hit, "P"),
                b.to_string().replace(miss, "P"),
            );
        }
    }
}
