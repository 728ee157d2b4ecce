//! LLaMA-Factory's `dataset_info.json`: an entry names a file, its `formatting` (alpaca or
//! sharegpt), its `columns` and its ShareGPT `tags`. An alpaca entry with only a `prompt` column
//! over records without a response (`c4_demo`, `wiki_demo`: what `stage: pt` trains) is
//! pretraining text. A `ranking` entry (or one with a `kto_tag` column) is preference or KTO
//! data, for `data::preference`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::formats::{Columns, FormatOptions, Tags};
use crate::{Error, Result};

#[derive(Debug, Deserialize)]
struct Entry {
    #[serde(default)]
    file_name: Option<String>,
    #[serde(default)]
    hf_hub_url: Option<String>,
    #[serde(default)]
    ms_hub_url: Option<String>,
    #[serde(default)]
    formatting: Option<String>,
    #[serde(default)]
    ranking: bool,
    #[serde(default)]
    columns: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    tags: Option<Tags>,
}

/// The data file and the format options of entry `name` in the `dataset_info.json` at `path`.
pub fn read_info(path: &Path, name: &str) -> Result<(PathBuf, FormatOptions)> {
    let text = crate::files::read_text(path)?;
    let all: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
    let bad =
        |m: String| Error::InvalidArgument(format!("`{}`: entry `{name}`: {m}", path.display()));
    let raw = all.get(name).ok_or_else(|| {
        let mut names: Vec<&String> = all.keys().collect();
        names.sort();
        let mut scored: Vec<(f64, &String)> = names
            .iter()
            .map(|n| (strsim::jaro_winkler(name, n), *n))
            .filter(|(s, _)| *s > 0.8)
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        let close: Vec<String> = scored
            .iter()
            .take(3)
            .map(|(_, n)| format!("`{n}`"))
            .collect();
        let hint = if close.is_empty() {
            format!("it has {} entries", names.len())
        } else {
            format!("close names: {}", close.join(", "))
        };
        Error::InvalidArgument(format!("`{}`: no entry `{name}`; {hint}", path.display()))
    })?;
    let e: Entry = serde_json::from_value(raw.clone()).map_err(|e| bad(e.to_string()))?;
    let Some(file) = e.file_name else {
        let hub = e.hf_hub_url.or(e.ms_hub_url).unwrap_or_default();
        return Err(bad(format!(
            "it has no `file_name` (hub dataset `{hub}`?); qscript reads local files only"
        )));
    };
    let mut columns = Columns::default();
    let mut messages_col = None;
    for (k, v) in &e.columns {
        let v = v.as_str().map(str::to_string);
        match k.as_str() {
            "prompt" => columns.prompt = v,
            "query" => columns.query = v,
            "response" => columns.response = v,
            "history" => columns.history = v,
            "system" => columns.system = v,
            "messages" => messages_col = v,
            "tools" => columns.tools = v,
            "chosen" => columns.chosen = v,
            "rejected" => columns.rejected = v,
            "kto_tag" => columns.kto_tag = v,
            "images" | "videos" | "audios" => {
                return Err(bad(format!("multimodal column `{k}` is not supported")));
            }
            _ => {}
        }
    }
    columns.messages = messages_col;
    let formatting = e.formatting.unwrap_or_else(|| "alpaca".into());
    let format = match formatting.as_str() {
        "alpaca" => "alpaca",
        "sharegpt" => "sharegpt",
        other => {
            return Err(bad(format!(
                "unknown `formatting` `{other}`; expected `alpaca` or `sharegpt`"
            )));
        }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let preference = e.ranking || columns.chosen.is_some() || columns.kto_tag.is_some();
    let opts = FormatOptions {
        format: format.into(),
        preference,
        columns,
        tags: e.tags.unwrap_or_default(),
        ..FormatOptions::default()
    };
    Ok((dir.join(file), opts))
}

/// The text column when an entry's records are pretraining text: an alpaca entry whose only
/// column is `prompt`, and whose first record has that column and no response (LLaMA-Factory's
/// `c4_demo` and `wiki_demo`, which `stage: pt` trains). `None` for chat data.
pub fn pretrain_column(opts: &FormatOptions, first: &serde_json::Value) -> Option<String> {
    let c = &opts.columns;
    let only_prompt = c.query.is_none()
        && c.response.is_none()
        && c.history.is_none()
        && c.messages.is_none()
        && c.tools.is_none();
    let prompt = c.prompt.as_deref()?;
    (opts.format == "alpaca"
        && only_prompt
        && first.get(prompt).is_some_and(serde_json::Value::is_string)
        && first.get("output").is_none())
    .then(|| prompt.to_string())
}
