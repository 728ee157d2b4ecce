//! SFT tokenization: chat messages -> `input_ids` and `labels`, with -100 on every token the model
//! should not learn (system, user and template tokens). The conversation is rendered through the
//! chat template message by message; each segment is tokenized on its own and concatenated, so
//! the label mask follows segment boundaries exactly (LLaMA-Factory does the same).
//!
//! A record without `messages` whose `dataset_text_field` (`text`) is a string is plain text for
//! causal LM (TRL's language-modeling datasets, LLaMA-Factory's `stage: pt`): tokenized with the
//! tokenizer's special tokens, eos appended, every token learned.

use rayon::prelude::*;
use serde::Deserialize;
use serde_json::Value;

use super::records::Dataset;
use crate::cancel::CancelToken;
use crate::tokenizer::{TemplateOptions, Tokenizer};
use crate::{Error, Result};

pub use super::example::{Example, IGNORE};

/// Options of `data::sft`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct SftOptions {
    /// Examples are cut to this many tokens.
    pub max_length: usize,
    /// `assistant` (every assistant turn), `last_assistant`, or `all`.
    pub train_on: String,
    /// `model` (the tokenizer's chat template) or a Jinja template.
    pub template: String,
    /// The field of plain-text records (TRL's `dataset_text_field`).
    pub dataset_text_field: String,
    /// The most bytes of rendered text one record may have (the tokenizer holds a record's
    /// whole text and its tokens at once; 0: no limit). The run's `--max-record-size`.
    #[serde(skip)]
    pub max_record_bytes: usize,
}

/// The default of [`SftOptions::max_record_bytes`]: 4 MiB, a million tokens or so.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 4 << 20;

impl Default for SftOptions {
    fn default() -> Self {
        Self {
            max_length: 1024,
            train_on: "assistant".into(),
            template: "model".into(),
            dataset_text_field: "text".into(),
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
        }
    }
}

/// What `sft` did.
#[derive(Clone, Debug, Default)]
pub struct SftReport {
    /// The examples kept, in order.
    pub examples: Vec<Example>,
    /// Index in the input of each kept example.
    pub source_index: Vec<usize>,
    /// How many were cut at `max_length`.
    pub truncated: usize,
    /// How many were dropped because no label was left after truncation.
    pub dropped: usize,
    /// Assistant turns whose tool calls the chat template did not render (not trained: they
    /// would teach an empty turn).
    pub tool_turns_dropped: usize,
    /// Records whose `tools` list the chat template did not render.
    pub tools_ignored: usize,
    /// Records that were plain text (every token learned).
    pub text: usize,
}

/// The text of one conversation in segments marked trainable or not, and what the chat
/// template failed to render.
#[derive(Clone, Debug, Default)]
pub struct Segments {
    /// `(text, trainable)` in order.
    pub parts: Vec<(String, bool)>,
    /// Assistant turns with tool calls whose function names are not in their rendered text
    /// (kept as context, not trained).
    pub tool_turns_dropped: usize,
    /// The record has a `tools` list and the rendering names none of its tools.
    pub tools_ignored: bool,
}

/// The function names of a message's `tool_calls` (or of a `tools` list).
fn tool_names(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|t| {
                    t.get("function")
                        .unwrap_or(t)
                        .get("name")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The template whose `{% generation %}` blocks say what is learned, made once for a dataset:
/// `template` (or the tokenizer's) when it has such blocks, or, to learn every turn, the training
/// variant of a known one that rewrites earlier turns (Qwen3's). `None` for `train_on: "all"` and
/// for templates with neither (the last turn alone renders as inference does without it).
pub fn learned_template(tok: &Tokenizer, template: Option<&str>, train_on: &str) -> Option<String> {
    if train_on == "all" {
        return None;
    }
    template
        .or(tok.chat_template.as_deref())
        .map(|t| {
            if train_on == "assistant" {
                crate::chat_template::training_variant(t).unwrap_or(t)
            } else {
                t
            }
        })
        .and_then(crate::chat_template::mark_generation)
}

/// The text segments of one conversation, each marked trainable or not: one render through
/// `marked` ([`learned_template`]) when there is one, else turn by turn through `template`.
pub fn segments(
    tok: &Tokenizer,
    template: Option<&str>,
    marked: Option<&str>,
    record: &Value,
    train_on: &str,
) -> std::result::Result<Segments, SegmentError> {
    let messages = record
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("no `messages` list (convert with `data::to_messages` first)")?;
    let extra: serde_json::Map<String, Value> = match record.get("tools") {
        Some(t) => [("tools".to_string(), t.clone())].into_iter().collect(),
        None => serde_json::Map::new(),
    };
    let render =
        |upto: usize, generation_prompt: bool| -> std::result::Result<String, SegmentError> {
            let msgs = Value::Array(messages[..upto].to_vec());
            let opts = TemplateOptions {
                add_generation_prompt: generation_prompt,
                extra: extra.clone(),
            };
            match template {
                None => tok.apply_chat_template(&msgs, &opts),
                Some(t) => tok.render_template(t, &msgs, &opts),
            }
            .map_err(|e| match e {
                Error::Template(m) => SegmentError::Template(m),
                other => SegmentError::Data(other.to_string()),
            })
        };
    let assistant: Vec<usize> = messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m["role"] == "assistant")
        .map(|(i, _)| i)
        .collect();
    let last = *assistant.last().ok_or("no assistant message")?;
    if let Some(marked) = marked {
        return generation_segments(tok, marked, messages, &extra, train_on);
    }
    let mut out = Segments::default();
    let tools = tool_names(record.get("tools"));
    if !tools.is_empty() {
        let text = render(last + 1, false)?;
        out.tools_ignored = !tools.iter().any(|t| text.contains(t.as_str()));
    }
    if train_on == "all" {
        out.parts = vec![(render(last + 1, false)?, true)];
        return Ok(out);
    }
    let mut done = String::new();
    let turns: &[usize] = if train_on == "last_assistant" {
        &assistant[assistant.len() - 1..]
    } else {
        &assistant
    };
    for &i in turns {
        let prompt = render(i, true)?;
        let full = render(i + 1, false)?;
        let (Some(p), true) = (
            prompt.strip_prefix(done.as_str()),
            full.starts_with(&prompt),
        ) else {
            return Err(SegmentError::Data(format!(
                "the chat template does not render message {i} as an extension of the messages before it; \
                 use `train_on: \"last_assistant\"` or a custom `template`"
            )));
        };
        let reply = &full[prompt.len()..];
        let calls = tool_names(messages[i].get("tool_calls"));
        let dropped = !calls.is_empty() && !calls.iter().all(|c| reply.contains(c.as_str()));
        out.tool_turns_dropped += usize::from(dropped);
        out.parts.push((p.to_string(), false));
        out.parts.push((reply.to_string(), !dropped));
        done = full;
    }
    Ok(out)
}

/// The segments of one render of `messages` through `marked` (a template whose `{% generation
/// %}` blocks render as [`crate::chat_template::GENERATION_OPEN`] / `CLOSE`): the blocks are
/// learned (with `train_on: "last_assistant"`, the last one only), the rest is not.
fn generation_segments(
    tok: &Tokenizer,
    marked: &str,
    messages: &[Value],
    extra: &serde_json::Map<String, Value>,
    train_on: &str,
) -> std::result::Result<Segments, SegmentError> {
    use crate::chat_template::{GENERATION_CLOSE, GENERATION_OPEN};
    let text = serde_json::to_string(messages).unwrap_or_default();
    if text.contains(GENERATION_OPEN) || text.contains(GENERATION_CLOSE) {
        return Err(SegmentError::Data(
            "the messages hold the private-use characters U+E000 or U+E001, which mark what is \
             learned in a chat template's render"
                .into(),
        ));
    }
    let opts = TemplateOptions {
        add_generation_prompt: false,
        extra: extra.clone(),
    };
    let rendered = tok
        .render_template(marked, &Value::Array(messages.to_vec()), &opts)
        .map_err(|e| match e {
            Error::Template(m) => SegmentError::Template(m),
            other => SegmentError::Data(other.to_string()),
        })?;
    let mut parts: Vec<(String, bool)> = Vec::new();
    let mut cur = String::new();
    let mut inside = false;
    for c in rendered.chars() {
        if c == GENERATION_OPEN || c == GENERATION_CLOSE {
            if (c == GENERATION_OPEN) == inside {
                return Err(SegmentError::Template(
                    "its `{% generation %}` and `{% endgeneration %}` blocks do not pair up".into(),
                ));
            }
            if !cur.is_empty() {
                parts.push((std::mem::take(&mut cur), inside));
            }
            inside = c == GENERATION_OPEN;
        } else {
            cur.push(c);
        }
    }
    if inside {
        return Err(SegmentError::Template(
            "a `{% generation %}` block is not closed".into(),
        ));
    }
    if !cur.is_empty() {
        parts.push((cur, false));
    }
    if train_on == "last_assistant"
        && let Some(lastk) = parts.iter().rposition(|p| p.1)
    {
        for (k, p) in parts.iter_mut().enumerate() {
            p.1 &= k == lastk;
        }
    }
    if !parts.iter().any(|p| p.1) {
        return Err(SegmentError::Template(
            "its `{% generation %}` blocks rendered nothing for the assistant turns".into(),
        ));
    }
    Ok(Segments {
        parts,
        ..Segments::default()
    })
}

/// Why a record gave no segments: its data, or the chat template.
#[derive(Debug)]
pub enum SegmentError {
    /// The record (a message to prefix with the dataset and record).
    Data(String),
    /// The template failed to render.
    Template(String),
}

impl From<&str> for SegmentError {
    fn from(m: &str) -> Self {
        Self::Data(m.to_string())
    }
}

impl std::fmt::Display for SegmentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Data(m) | Self::Template(m) => f.write_str(m),
        }
    }
}

/// Tokenizes every conversation of `ds` (records with `messages`), polling `cancel` before each
/// record (a stop asked for ends the work within a record's time, not the dataset's).
pub fn sft(
    ds: &Dataset,
    tok: &Tokenizer,
    opts: &SftOptions,
    cancel: &CancelToken,
) -> Result<SftReport> {
    if !matches!(
        opts.train_on.as_str(),
        "assistant" | "last_assistant" | "all"
    ) {
        return Err(Error::InvalidArgument(format!(
            "unknown `train_on` `{}`; use `assistant`, `last_assistant` or `all`",
            opts.train_on
        )));
    }
    if opts.max_length == 0 {
        return Err(Error::InvalidArgument(
            "`max_length` must be at least 1".into(),
        ));
    }
    let template = (opts.template != "model").then_some(opts.template.as_str());
    let marked = learned_template(tok, template, &opts.train_on);
    // Render and tokenize every record in parallel (on the workers, with the main thread's
    // stack); keep the order, report the first error.
    let encoded: Vec<Result<(Example, usize, bool, bool)>> = crate::panic::in_workers(|| {
        ds.rows
        .par_iter()
        .enumerate()
        .map(|(i, r)| {
            cancel.check()?;
            if let Some(what) = super::formats::preference_kind(r) {
                return Err(super::formats::preference_error(&ds.source, i, &what));
            }
            if r.get("messages").is_none()
                && let Some(t) = r.get(&opts.dataset_text_field)
            {
                return text_example(tok, ds, i, t, opts).map(|ex| (ex, 0, false, true));
            }
            let segs = segments(tok, template, marked.as_deref(), r, &opts.train_on).map_err(|e| match e {
                SegmentError::Data(m) => {
                    Error::InvalidArgument(format!("`{}`: record {i}: {m}", ds.source))
                }
                // The template is at fault, not the record: name where it came from.
                SegmentError::Template(m) => Error::Template(format!(
                    "{} fails on record {i} of `{}`: {m}",
                    match (template, &tok.template_source) {
                        (Some(_), _) => "the `template` option of `data::sft`".to_string(),
                        (None, Some(p)) => format!("`{}`", p.display()),
                        (None, None) => "the tokenizer's".to_string(),
                    },
                    ds.source
                )),
            })?;
            let bytes: usize = segs.parts.iter().map(|(t, _)| t.len()).sum();
            if opts.max_record_bytes > 0 && bytes > opts.max_record_bytes {
                return Err(Error::InvalidArgument(format!(
                    "`{}`: record {i} renders to {bytes} bytes of text, over the limit of {} a \
                     record (examples are cut to {} tokens anyway); `--max-record-size N` raises it",
                    ds.source, opts.max_record_bytes, opts.max_length
                )));
            }
            let ex = encode_segments(tok, &segs.parts).map_err(|e| match e {
                Error::Tokenizer(m) => {
                    Error::Tokenizer(format!("record {i} of `{}`: {m}", ds.source))
                }
                e => e,
            })?;
            Ok((
                ex,
                segs.tool_turns_dropped,
                segs.tools_ignored,
                false,
            ))
        })
        .collect()
    });
    let mut report = SftReport::default();
    for (i, ex) in encoded.into_iter().enumerate() {
        let (ex, turns, ignored, text) = ex?;
        report.text += usize::from(text);
        report.tool_turns_dropped += turns;
        report.tools_ignored += usize::from(ignored);
        let ex = truncate(ex, opts.max_length, &mut report.truncated);
        if ex.labels.iter().all(|&l| l == IGNORE) {
            report.dropped += 1;
            continue;
        }
        report.examples.push(ex);
        report.source_index.push(i);
    }
    Ok(report)
}

/// Record `i` of `ds`, plain text `value`: its tokens (with the tokenizer's special tokens, as
/// TRL tokenizes text) and eos, every one learned.
fn text_example(
    tok: &Tokenizer,
    ds: &Dataset,
    i: usize,
    value: &Value,
    opts: &SftOptions,
) -> Result<Example> {
    let field = &opts.dataset_text_field;
    let Value::String(text) = value else {
        return Err(Error::InvalidArgument(format!(
            "`{}`: record {i}: `{field}` is {}, expected a string of text",
            ds.source,
            super::records::kind(value)
        )));
    };
    if opts.max_record_bytes > 0 && text.len() > opts.max_record_bytes {
        return Err(Error::InvalidArgument(format!(
            "`{}`: record {i} has {} bytes of text, over the limit of {} a record (examples are \
             cut to {} tokens anyway); `--max-record-size N` raises it",
            ds.source,
            text.len(),
            opts.max_record_bytes,
            opts.max_length
        )));
    }
    let mut ids = tok.encode(text, true).map_err(|e| match e {
        Error::Tokenizer(m) => Error::Tokenizer(format!("record {i} of `{}`: {m}", ds.source)),
        e => e,
    })?;
    if let Some(eos) = tok.eos_id().filter(|e| ids.last() != Some(e)) {
        ids.push(eos);
    }
    Ok(Example {
        labels: ids.iter().map(|&id| i64::from(id)).collect(),
        input_ids: ids,
        packed: Vec::new(),
        pref: None,
    })
}

/// Tokenizes each segment (no special tokens added) and concatenates, labelling trainable ones.
pub fn encode_segments(tok: &Tokenizer, segs: &[(String, bool)]) -> Result<Example> {
    let mut ex = Example {
        input_ids: Vec::new(),
        labels: Vec::new(),
        packed: Vec::new(),
        pref: None,
    };
    for (text, train) in segs {
        let ids = tok.encode(text, false)?;
        ex.labels.extend(
            ids.iter()
                .map(|&id| if *train { i64::from(id) } else { IGNORE }),
        );
        ex.input_ids.extend(ids);
    }
    Ok(ex)
}

fn truncate(mut ex: Example, max: usize, count: &mut usize) -> Example {
    if ex.input_ids.len() > max {
        *count += 1;
        ex.input_ids.truncate(max);
        ex.labels.truncate(max);
    }
    ex
}

/// The decoded example with the learned spans in `[[...]]` (what `qscript check` shows of the
/// first examples). A span that fails to decode shows as empty.
pub fn masked_spans(tok: &Tokenizer, ex: &Example) -> String {
    let mut out = String::new();
    let mut start = 0;
    while start < ex.input_ids.len() {
        let learn = ex.labels[start] != IGNORE;
        let mut end = start;
        while end < ex.input_ids.len() && (ex.labels[end] != IGNORE) == learn {
            end += 1;
        }
        let text = tok
            .decode(&ex.input_ids[start..end], false)
            .unwrap_or_default();
        if learn {
            out.push_str("[[");
            out.push_str(&text);
            out.push_str("]]");
        } else {
            out.push_str(&text);
        }
        start = end;
    }
    out
}

/// Length statistics of tokenized examples.
#[derive(Clone, Debug, PartialEq)]
pub struct LengthStats {
    /// Examples.
    pub count: usize,
    /// Shortest.
    pub min: usize,
    /// Longest.
    pub max: usize,
    /// Mean length.
    pub mean: f64,
    /// Median.
    pub p50: usize,
    /// 90th percentile.
    pub p90: usize,
    /// 99th percentile.
    pub p99: usize,
    /// Tokens with a label.
    pub trained_tokens: usize,
    /// All tokens.
    pub total_tokens: usize,
}

/// Statistics of `examples`.
pub fn stats(examples: &[Example]) -> LengthStats {
    let mut lens: Vec<usize> = examples.iter().map(|e| e.input_ids.len()).collect();
    lens.sort_unstable();
    let pct = |p: f64| {
        lens.get(((lens.len().saturating_sub(1)) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    let total: usize = lens.iter().sum();
    LengthStats {
        count: lens.len(),
        min: lens.first().copied().unwrap_or(0),
        max: lens.last().copied().unwrap_or(0),
        mean: if lens.is_empty() {
            0.0
        } else {
            total as f64 / lens.len() as f64
        },
        p50: pct(0.5),
        p90: pct(0.9),
        p99: pct(0.99),
        trained_tokens: examples
            .iter()
            .map(|e| e.labels.iter().filter(|&&l| l != IGNORE).count())
            .sum(),
        total_tokens: total,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conv() -> Value {
        json!({"messages": [
            {"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]})
    }

    #[test]
    fn only_assistant_tokens_are_labelled() {
        let tok = Tokenizer::builtin().unwrap();
        let ds = Dataset {
            rows: vec![conv()],
            source: "t".into(),
        };
        let r = sft(&ds, &tok, &SftOptions::default(), &CancelToken::new()).unwrap();
        let ex = &r.examples[0];
        let learned: Vec<u32> = ex
            .labels
            .iter()
            .filter(|&&l| l != IGNORE)
            .map(|&l| u32::try_from(l).unwrap())
            .collect();
        assert_eq!(
            tok.decode(&learned, false).unwrap(),
            "a1<|im_end|>\na2<|im_end|>\n"
        );
        let full = tok
            .apply_chat_template(&conv()["messages"], &TemplateOptions::default())
            .unwrap();
        assert_eq!(tok.decode(&ex.input_ids, false).unwrap(), full);
        let last = sft(
            &ds,
            &tok,
            &SftOptions {
                train_on: "last_assistant".into(),
                ..SftOptions::default()
            },
            &CancelToken::new(),
        )
        .unwrap();
        let learned: Vec<u32> = last.examples[0]
            .labels
            .iter()
            .filter(|&&l| l != IGNORE)
            .map(|&l| u32::try_from(l).unwrap())
            .collect();
        assert_eq!(tok.decode(&learned, false).unwrap(), "a2<|im_end|>\n");
    }

    #[test]
    fn text_records_learn_every_token_and_end_with_eos() {
        let tok = Tokenizer::builtin().unwrap();
        let ds = Dataset {
            rows: vec![
                json!({"text": "ab"}),
                json!({"body": "cd", "text": 1}),
                conv(),
            ],
            source: "t".into(),
        };
        let opts = SftOptions {
            dataset_text_field: "body".into(),
            ..SftOptions::default()
        };
        let e = sft(&ds, &tok, &SftOptions::default(), &CancelToken::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`t`: record 1: `text` is a number, expected a string of text"
        );
        let ds = Dataset {
            rows: ds.rows[1..].to_vec(),
            source: "t".into(),
        };
        let r = sft(&ds, &tok, &opts, &CancelToken::new()).unwrap();
        assert_eq!(r.text, 1);
        let ex = &r.examples[0];
        assert_eq!(tok.decode(&ex.input_ids, false).unwrap(), "cd<|endoftext|>");
        let ids: Vec<i64> = ex.input_ids.iter().map(|&i| i64::from(i)).collect();
        assert_eq!(ex.labels, ids);
        // the conversation beside it is still masked
        assert_eq!(r.examples[1].labels[0], IGNORE);
    }

    #[test]
    fn masked_spans_bracket_what_is_learned() {
        let tok = Tokenizer::builtin().unwrap();
        let ds = Dataset {
            rows: vec![conv()],
            source: "t".into(),
        };
        let r = sft(&ds, &tok, &SftOptions::default(), &CancelToken::new()).unwrap();
        let shown = masked_spans(&tok, &r.examples[0]);
        assert_eq!(
            shown,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\n\
             [[a1<|im_end|>\n]]<|im_start|>user\nu2<|im_end|>\n<|im_start|>assistant\n[[a2<|im_end|>\n]]"
        );
    }

    #[test]
    fn truncation_counts_and_fully_masked_examples_are_dropped() {
        let tok = Tokenizer::builtin().unwrap();
        let ds = Dataset {
            rows: vec![conv(), conv()],
            source: "t".into(),
        };
        // The first assistant token sits after "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\n".
        let r = sft(
            &ds,
            &tok,
            &SftOptions {
                max_length: 10,
                ..SftOptions::default()
            },
            &CancelToken::new(),
        )
        .unwrap();
        assert_eq!((r.examples.len(), r.dropped, r.truncated), (0, 2, 2));
        let r = sft(
            &ds,
            &tok,
            &SftOptions {
                max_length: 40,
                ..SftOptions::default()
            },
            &CancelToken::new(),
        )
        .unwrap();
        assert_eq!((r.examples.len(), r.dropped, r.truncated), (2, 0, 2));
        assert!(r.examples.iter().all(|e| e.input_ids.len() == 40));
        let s = stats(&r.examples);
        assert_eq!((s.count, s.min, s.max), (2, 40, 40));
    }

    /// Tokenizing stops within a second of a cancel set from another thread, long before a
    /// large dataset is done.
    #[test]
    fn tokenizing_stops_when_cancelled() {
        let tok = Tokenizer::builtin().unwrap();
        let ds = Dataset {
            rows: vec![conv(); 300_000],
            source: "t".into(),
        };
        let (cancel, stopper) = crate::testing::cancel_after(std::time::Duration::from_millis(300));
        let start = std::time::Instant::now();
        let r = sft(&ds, &tok, &SftOptions::default(), &cancel);
        let took = start.elapsed();
        stopper.join().unwrap();
        assert!(
            matches!(r, Err(Error::Cancelled)),
            "{:?}",
            r.map(|r| r.examples.len())
        );
        assert!(took < std::time::Duration::from_millis(1300), "{took:?}");
    }
}
