//! Dataset formats to chat messages: alpaca, ShareGPT, OpenAI-style messages, and the
//! `[{human, assistant}]` conversation lists of Firefly-style data, with LLaMA-Factory's column and
//! tag names. `auto` looks at the first record and says what it detected and why. A record of
//! another shape is an error that names the record and the fields it has.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::records::{Dataset, kind};
use crate::{Error, Result};

/// LLaMA-Factory's `columns`: which field holds what.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Columns {
    /// alpaca instruction (default `instruction`).
    pub prompt: Option<String>,
    /// alpaca input (default `input`).
    pub query: Option<String>,
    /// alpaca output (default `output`).
    pub response: Option<String>,
    /// alpaca history: `[[user, assistant], ...]` (default `history`).
    pub history: Option<String>,
    /// per-record system prompt (default `system`).
    pub system: Option<String>,
    /// ShareGPT / messages list (default `conversations` / `messages`).
    pub messages: Option<String>,
    /// tool definitions (default `tools`).
    pub tools: Option<String>,
    /// ranking data's chosen answer (default `chosen`).
    pub chosen: Option<String>,
    /// ranking data's rejected answer (default `rejected`).
    pub rejected: Option<String>,
    /// KTO's desirable-or-not label (default `label`).
    pub kto_tag: Option<String>,
}

/// LLaMA-Factory's ShareGPT `tags`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Tags {
    /// Key of a message's role (default `from`).
    pub role_tag: Option<String>,
    /// Key of a message's text (default `value`).
    pub content_tag: Option<String>,
    /// User role value (default `human`).
    pub user_tag: Option<String>,
    /// Assistant role value (default `gpt`).
    pub assistant_tag: Option<String>,
    /// Tool result role value (default `observation`).
    pub observation_tag: Option<String>,
    /// Tool call role value (default `function_call`).
    pub function_tag: Option<String>,
    /// System role value (default `system`).
    pub system_tag: Option<String>,
}

/// Options of `to_messages`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct FormatOptions {
    /// `auto`, `alpaca`, `sharegpt`, `messages` or `conversation`.
    pub format: String,
    /// System prompt for records that have none.
    pub system: Option<String>,
    /// Column names.
    pub columns: Columns,
    /// ShareGPT tags.
    pub tags: Tags,
    /// Joins alpaca instruction and input (LLaMA-Factory: a newline).
    pub input_separator: String,
    /// Preference (`ranking`) or KTO data (`kto_tag`), from a `dataset_info.json` entry.
    #[serde(skip)]
    pub preference: bool,
}

impl Default for FormatOptions {
    fn default() -> Self {
        Self {
            format: "auto".into(),
            system: None,
            columns: Columns::default(),
            tags: Tags::default(),
            input_separator: "\n".into(),
            preference: false,
        }
    }
}

/// The result of a conversion.
#[derive(Clone, Debug)]
pub struct Converted {
    /// `{"messages": [...], "tools"?: ...}` per record.
    pub dataset: Dataset,
    /// The format used.
    pub format: String,
    /// Why (for `auto`).
    pub reason: String,
}

fn col<'a>(c: &'a Option<String>, default: &'a str) -> &'a str {
    c.as_deref().unwrap_or(default)
}

fn fields(r: &Value) -> String {
    match r {
        Value::Object(m) if !m.is_empty() => m
            .keys()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", "),
        _ => "no fields".into(),
    }
}

/// What every refusal of preference data ends with.
pub const NOT_YET: &str = "not supervised fine-tuning: tokenize it with `data::preference(ds, tok)` \
     and train it with `train::dpo` (pairs) or `train::kto` (a `label` per answer); trained as SFT \
     it would learn its rejected answers too";

/// What preference or KTO data `record` is, if it is: `DPO preference data (`chosen`/`rejected`)`.
/// TRL's and LLaMA-Factory's pairs (`chosen`/`rejected`, v1's `chosen_messages`/
/// `rejected_messages`) and KTO's records (a boolean `label` beside the prompt and completion or
/// messages) are never trained as SFT.
pub fn preference_kind(record: &Value) -> Option<String> {
    let has = |k: &str| record.get(k).is_some();
    if has("chosen_messages") || has("rejected_messages") {
        return Some(
            "DPO preference data (`chosen_messages`/`rejected_messages`, LLaMA-Factory v1)".into(),
        );
    }
    if has("chosen") && has("rejected") {
        return Some("DPO preference data (`chosen`/`rejected`)".into());
    }
    let text = [
        "completion",
        "messages",
        "conversations",
        "output",
        "response",
    ];
    if record.get("label").is_some_and(Value::is_boolean) && text.iter().any(|k| has(k)) {
        return Some("KTO data (a boolean `label` marks each answer desirable or not)".into());
    }
    None
}

/// The error for preference record `i` of `source`.
pub fn preference_error(source: &str, i: usize, what: &str) -> Error {
    Error::InvalidArgument(format!("`{source}`: record {i} is {what}, {NOT_YET}"))
}

/// Detects the format of `record` (the first of a dataset) with the column names of `opts`.
pub fn detect(record: &Value, opts: &FormatOptions) -> Result<(String, String)> {
    let c = &opts.columns;
    let has = |k: &str| record.get(k).is_some();
    let msgs = col(&c.messages, "messages");
    if has(msgs) || has("messages") {
        let key = if has(msgs) { msgs } else { "messages" };
        let first = record[key].get(0);
        return Ok(if first.and_then(|m| m.get("from")).is_some() {
            (
                "sharegpt".into(),
                format!("record 0 has `{key}` with `from`/`value` messages"),
            )
        } else {
            (
                "messages".into(),
                format!("record 0 has `{key}` with `role`/`content` messages"),
            )
        });
    }
    if has(col(&c.messages, "conversations")) {
        return Ok(("sharegpt".into(), "record 0 has `conversations`".into()));
    }
    if has("conversation") {
        return Ok((
            "conversation".into(),
            "record 0 has `conversation` (a list of `{human, assistant}` turns)".into(),
        ));
    }
    let (p, r) = (col(&c.prompt, "instruction"), col(&c.response, "output"));
    if has(p) && has(r) {
        return Ok(("alpaca".into(), format!("record 0 has `{p}` and `{r}`")));
    }
    Err(Error::InvalidArgument(format!(
        "cannot tell the format of record 0, which has {}; expected `instruction`/`output` (alpaca), \
         `conversations` (sharegpt), `messages`, or `conversation` (`[{{human, assistant}}]`); \
         pass `format` and `columns` to say which; plain text (`text` records, for pretraining) \
         needs no conversion: give it to `data::sft` as it is",
        fields(record)
    )))
}

/// Pretraining text: `{"text": ...}` for every record of `ds`, from its string field `column`
/// (LLaMA-Factory's `prompt` column of a `stage: pt` entry).
pub fn to_text(ds: &Dataset, column: &str) -> Result<Dataset> {
    let rows = ds
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| match text_field(r, column, true) {
            Ok(t) => Ok(json!({ "text": t.unwrap_or_default() })),
            Err(m) => Err(Error::InvalidArgument(format!(
                "`{}`: record {i} (text): {m}; the record has {}",
                ds.source,
                fields(r)
            ))),
        })
        .collect::<Result<_>>()?;
    Ok(Dataset {
        rows,
        source: ds.source.clone(),
    })
}

/// Converts every record of `ds` to chat messages.
pub fn to_messages(ds: &Dataset, opts: &FormatOptions) -> Result<Converted> {
    let first = ds
        .rows
        .first()
        .ok_or_else(|| Error::InvalidArgument(format!("`{}`: the dataset is empty", ds.source)))?;
    if let Some(what) = preference_kind(first) {
        return Err(preference_error(&ds.source, 0, &what));
    }
    let (format, reason) = if opts.format == "auto" {
        detect(first, opts)?
    } else {
        (
            opts.format.clone(),
            format!("`format: \"{}\"` was given", opts.format),
        )
    };
    let convert: fn(&Value, &FormatOptions) -> std::result::Result<Value, String> = match format
        .as_str()
    {
        "alpaca" => alpaca,
        "sharegpt" => sharegpt,
        "messages" => messages,
        "conversation" => conversation,
        other => {
            return Err(Error::InvalidArgument(format!(
                "unknown format `{other}`; use `auto`, `alpaca`, `sharegpt`, `messages` or `conversation`"
            )));
        }
    };
    let mut rows = Vec::with_capacity(ds.len());
    for (i, r) in ds.rows.iter().enumerate() {
        if let Some(what) = preference_kind(r) {
            return Err(preference_error(&ds.source, i, &what));
        }
        let v = convert(r, opts).map_err(|m| {
            Error::InvalidArgument(format!(
                "`{}`: record {i} ({format}): {m}; the record has {}",
                ds.source,
                fields(r)
            ))
        })?;
        rows.push(v);
    }
    Ok(Converted {
        dataset: Dataset {
            rows,
            source: ds.source.clone(),
        },
        format,
        reason,
    })
}

/// Converts one record of `format` (`alpaca`, `sharegpt`, `messages`, `conversation`) to
/// `{"messages": [...]}`; the error says what is wrong with the record.
pub fn convert_record(
    r: &Value,
    opts: &FormatOptions,
    format: &str,
) -> std::result::Result<Value, String> {
    match format {
        "alpaca" => alpaca(r, opts),
        "sharegpt" => sharegpt(r, opts),
        "messages" => messages(r, opts),
        "conversation" => conversation(r, opts),
        other => Err(format!(
            "unknown format `{other}`; use `auto`, `alpaca`, `sharegpt`, `messages` or `conversation`"
        )),
    }
}

/// What a record's fields are, for messages that name them.
pub fn field_names(r: &Value) -> String {
    fields(r)
}

fn text_field(r: &Value, key: &str, required: bool) -> std::result::Result<Option<String>, String> {
    match r.get(key) {
        None | Some(Value::Null) if !required => Ok(None),
        None => Err(format!("missing field `{key}`")),
        Some(Value::Null) => Err(format!("`{key}` is null, expected a string")),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(format!("`{key}` is {}, expected a string", kind(other))),
    }
}

fn msg(role: &str, content: String) -> Value {
    json!({"role": role, "content": content})
}

fn finish(
    mut messages: Vec<Value>,
    system: Option<String>,
    r: &Value,
    opts: &FormatOptions,
) -> std::result::Result<Value, String> {
    if let Some(s) = system
        .or_else(|| opts.system.clone())
        .filter(|s| !s.is_empty())
    {
        messages.insert(0, msg("system", s));
    }
    if !messages.iter().any(|m| m["role"] == "assistant") {
        return Err("it has no assistant message to learn from".into());
    }
    let mut out = Map::new();
    out.insert("messages".into(), Value::Array(messages));
    if let Some(t) = r
        .get(col(&opts.columns.tools, "tools"))
        .filter(|t| !t.is_null())
    {
        let tools = match t {
            Value::String(s) if s.trim().is_empty() => None,
            Value::String(s) => Some(
                serde_json::from_str(s).map_err(|e| format!("`tools` is not valid JSON: {e}"))?,
            ),
            other => Some(other.clone()),
        };
        if let Some(tools) = tools {
            out.insert("tools".into(), tools);
        }
    }
    Ok(Value::Object(out))
}

fn alpaca(r: &Value, opts: &FormatOptions) -> std::result::Result<Value, String> {
    let c = &opts.columns;
    let instruction = text_field(r, col(&c.prompt, "instruction"), true)?.unwrap_or_default();
    let input = text_field(r, col(&c.query, "input"), false)?.unwrap_or_default();
    let output = text_field(r, col(&c.response, "output"), true)?.unwrap_or_default();
    let system = text_field(r, col(&c.system, "system"), false)?;
    let mut messages = Vec::new();
    let hist_key = col(&c.history, "history");
    match r.get(hist_key) {
        None | Some(Value::Null) => {}
        Some(Value::Array(turns)) => {
            for (k, t) in turns.iter().enumerate() {
                match t.as_array().map(Vec::as_slice) {
                    Some([Value::String(u), Value::String(a)]) => {
                        messages.push(msg("user", u.clone()));
                        messages.push(msg("assistant", a.clone()));
                    }
                    _ => {
                        return Err(format!(
                            "`{hist_key}[{k}]` is not a `[user, assistant]` pair of strings"
                        ));
                    }
                }
            }
        }
        Some(other) => {
            return Err(format!(
                "`{hist_key}` is {}, expected a list of `[user, assistant]` pairs",
                kind(other)
            ));
        }
    }
    let user = if input.is_empty() {
        instruction
    } else {
        format!("{instruction}{}{input}", opts.input_separator)
    };
    messages.push(msg("user", user));
    messages.push(msg("assistant", output));
    finish(messages, system, r, opts)
}

fn sharegpt(r: &Value, opts: &FormatOptions) -> std::result::Result<Value, String> {
    let (c, t) = (&opts.columns, &opts.tags);
    let key = if r.get(col(&c.messages, "conversations")).is_some() {
        col(&c.messages, "conversations")
    } else {
        "messages"
    };
    let list = match r.get(key) {
        Some(Value::Array(l)) => l,
        Some(other) => {
            return Err(format!(
                "`{key}` is {}, expected a list of messages",
                kind(other)
            ));
        }
        None => return Err(format!("missing field `{key}`")),
    };
    let (role_tag, content_tag) = (col(&t.role_tag, "from"), col(&t.content_tag, "value"));
    let roles = [
        (col(&t.user_tag, "human"), "user"),
        (col(&t.assistant_tag, "gpt"), "assistant"),
        (col(&t.observation_tag, "observation"), "tool"),
        (col(&t.function_tag, "function_call"), "function_call"),
        (col(&t.system_tag, "system"), "system"),
    ];
    let mut system = text_field(r, col(&c.system, "system"), false)?;
    let mut messages = Vec::new();
    for (k, m) in list.iter().enumerate() {
        let role = m
            .get(role_tag)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("message {k} has no string `{role_tag}`"))?;
        let content = m
            .get(content_tag)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("message {k} has no string `{content_tag}`"))?;
        let mapped = roles
            .iter()
            .find(|(tag, _)| *tag == role)
            .map(|(_, r)| *r)
            .ok_or_else(|| {
                let known: Vec<_> = roles.iter().map(|(t, _)| format!("`{t}`")).collect();
                format!(
                    "message {k} has role `{role}`; expected one of {}",
                    known.join(", ")
                )
            })?;
        match mapped {
            "system" if k == 0 => system = Some(content.to_string()),
            "system" => return Err(format!("message {k} is a system message after the first")),
            "function_call" => {
                let call: Value =
                    serde_json::from_str(content).unwrap_or(Value::String(content.into()));
                messages.push(json!({"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]}));
            }
            r => messages.push(msg(r, content.to_string())),
        }
    }
    finish(messages, system, r, opts)
}

fn messages(r: &Value, opts: &FormatOptions) -> std::result::Result<Value, String> {
    let key = col(&opts.columns.messages, "messages");
    let list = match r.get(key) {
        Some(Value::Array(l)) => l,
        Some(other) => {
            return Err(format!(
                "`{key}` is {}, expected a list of messages",
                kind(other)
            ));
        }
        None => return Err(format!("missing field `{key}`")),
    };
    let mut out = Vec::new();
    for (k, m) in list.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("message {k} has no string `role`"))?;
        if !matches!(role, "system" | "user" | "assistant" | "tool") {
            return Err(format!(
                "message {k} has role `{role}`; expected one of `system`, `user`, `assistant`, `tool`"
            ));
        }
        let content = message_content(m).map_err(|e| format!("message {k}{e}"))?;
        let mut mm = m.as_object().cloned().unwrap_or_default();
        mm.insert("content".into(), Value::String(content));
        out.push(Value::Object(mm));
    }
    finish(out, None, r, opts)
}

/// A message's `content` as text: a string, or LLaMA-Factory v1's `[{type: "text", value}]`
/// parts joined. The error continues "message k": ` has no `content``, or what it is instead.
pub fn message_content(m: &Value) -> std::result::Result<String, String> {
    match m.get("content") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => Ok(parts
            .iter()
            .filter_map(|p| {
                p.get("value")
                    .or_else(|| p.get("text"))
                    .and_then(Value::as_str)
            })
            .collect()),
        Some(other) => Err(format!(": `content` is {}, expected a string", kind(other))),
        None => Err(" has no `content`".into()),
    }
}

fn conversation(r: &Value, opts: &FormatOptions) -> std::result::Result<Value, String> {
    let list = match r.get("conversation") {
        Some(Value::Array(l)) => l,
        Some(other) => {
            return Err(format!(
                "`conversation` is {}, expected a list of turns",
                kind(other)
            ));
        }
        None => return Err("missing field `conversation`".into()),
    };
    let mut system = text_field(r, col(&opts.columns.system, "system"), false)?;
    let mut messages = Vec::new();
    for (k, turn) in list.iter().enumerate() {
        if let Some(s) = turn.get("system").and_then(Value::as_str) {
            system = Some(s.into());
        }
        let human = turn
            .get("human")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("turn {k} has no string `human`"))?;
        let assistant = turn
            .get("assistant")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("turn {k} has no string `assistant`"))?;
        messages.push(msg("user", human.into()));
        messages.push(msg("assistant", assistant.into()));
    }
    finish(messages, system, r, opts)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ds(rows: Value) -> Dataset {
        Dataset {
            rows: rows.as_array().unwrap().clone(),
            source: "t.json".into(),
        }
    }

    #[test]
    fn each_format_converts() {
        let opts = FormatOptions {
            system: Some("sys".into()),
            ..FormatOptions::default()
        };
        let a = to_messages(
            &ds(json!([{"instruction": "i", "input": "x", "output": "o"}])),
            &opts,
        )
        .unwrap();
        assert_eq!(a.format, "alpaca");
        assert_eq!(
            a.dataset.rows[0]["messages"],
            json!([{"role": "system", "content": "sys"}, {"role": "user", "content": "i\nx"}, {"role": "assistant", "content": "o"}])
        );
        let s = to_messages(&ds(json!([{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]}])), &FormatOptions::default()).unwrap();
        assert_eq!(s.format, "sharegpt");
        assert_eq!(
            s.dataset.rows[0]["messages"][0],
            json!({"role": "system", "content": "S"})
        );
        let c = to_messages(&ds(json!([{"conversation": [{"human": "h1", "assistant": "a1"}, {"human": "h2", "assistant": "a2"}]}])), &FormatOptions::default()).unwrap();
        assert_eq!(c.dataset.rows[0]["messages"].as_array().unwrap().len(), 4);
    }

    #[test]
    fn preference_and_kto_records_are_not_sft() {
        for (rows, want) in [
            (
                json!([{"prompt": "p", "chosen": "c", "rejected": "r"}]),
                "`t.json`: record 0 is DPO preference data (`chosen`/`rejected`), not supervised fine-tuning: tokenize it with `data::preference(ds, tok)` and train it with `train::dpo`",
            ),
            (
                json!([{"chosen_messages": [], "rejected_messages": []}]),
                "record 0 is DPO preference data (`chosen_messages`/`rejected_messages`, LLaMA-Factory v1)",
            ),
            (
                json!([{"instruction": "i", "output": "o"}, {"prompt": "p", "completion": "c", "label": true}]),
                "`t.json`: record 1 is KTO data (a boolean `label` marks each answer desirable or not)",
            ),
        ] {
            let e = to_messages(&ds(rows), &FormatOptions::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
        // A `label` that is not KTO's boolean is a plain column.
        let ok = to_messages(
            &ds(json!([{"instruction": "i", "output": "o", "label": "pos"}])),
            &FormatOptions::default(),
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn bad_records_are_named() {
        let e = to_messages(
            &ds(json!([{"instruction": "i", "output": "o"}, {"instruction": "i", "output": 3}])),
            &FormatOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "`t.json`: record 1 (alpaca): `output` is a number, expected a string; the record has `instruction`, `output`"
        );
        let e = to_messages(&ds(json!([{"text": "x"}])), &FormatOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("cannot tell the format of record 0, which has `text`"),
            "{e}"
        );
        let e = to_messages(
            &ds(json!([{"conversations": [{"from": "robot", "value": "x"}]}])),
            &FormatOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("message 0 has role `robot`; expected one of `human`, `gpt`"),
            "{e}"
        );
    }
}
