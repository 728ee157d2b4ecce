//! Preference data to tokenized examples, as TRL's `DPOTrainer` and `KTOTrainer` prepare it.
//!
//! Records come in the shapes users have: TRL's `{prompt, chosen, rejected}` as plain text or
//! as conversations (the prompt may be implicit: the turns both answers share), LLaMA-Factory's
//! ranking data (ShareGPT `conversations` with `chosen` / `rejected` messages, alpaca
//! `instruction` with `chosen` / `rejected` strings, v1's `chosen_messages` /
//! `rejected_messages`), and KTO's unpaired records (`prompt` + `completion`, or a conversation
//! whose last turn is the answer, with a boolean `label`).
//!
//! Each is tokenized as TRL does: the prompt alone (with the generation prompt) and the prompt
//! followed by each answer; the answer starts where the two token lists diverge, so both rows
//! share the prompt's tokens exactly. `max_prompt_length` keeps the end of a long prompt,
//! `max_length` keeps the start of each row, and a record whose prompt alone fills `max_length`
//! is dropped. Bad records (a missing side, an empty answer, the same answer twice) are skipped,
//! counted and named.

use rayon::prelude::*;
use serde::Deserialize;
use serde_json::{Value, json};

use super::example::{Example, IGNORE, Pref};
use super::formats::{FormatOptions, convert_record, detect, field_names, message_content};
use super::records::{Dataset, kind};
use crate::cancel::CancelToken;
use crate::tokenizer::{TemplateOptions, Tokenizer};
use crate::{Error, Result};

/// Options of `data::preference`, with TRL's names.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct PrefOptions {
    /// Each row (prompt + answer) is cut to this many tokens, keeping its start (TRL's
    /// `max_length`, default 1024); `0`: no limit.
    pub max_length: usize,
    /// A longer prompt keeps its last this many tokens (older TRL's `max_prompt_length`).
    pub max_prompt_length: Option<usize>,
    /// `model` (the tokenizer's chat template) or a Jinja template.
    pub template: String,
    /// The most bytes of rendered text one record may have (0: no limit).
    #[serde(skip)]
    pub max_record_bytes: usize,
}

impl Default for PrefOptions {
    fn default() -> Self {
        Self {
            max_length: 1024,
            max_prompt_length: None,
            template: "model".into(),
            max_record_bytes: super::sft::DEFAULT_MAX_RECORD_BYTES,
        }
    }
}

/// A side of a record: plain text, or chat messages (`{role, content}`).
#[derive(Clone, Debug, PartialEq)]
pub enum Side {
    /// Plain text (tokenized as it is, eos after an answer).
    Text(String),
    /// Chat messages (rendered with the chat template).
    Messages(Vec<Value>),
}

impl Side {
    fn to_json(&self) -> Value {
        match self {
            Self::Text(t) => Value::String(t.clone()),
            Self::Messages(m) => Value::Array(m.clone()),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Self::Text(t) => t.trim().is_empty(),
            Self::Messages(m) => {
                m.is_empty()
                    || m.iter()
                        .all(|x| x["content"].as_str().is_none_or(|c| c.trim().is_empty()))
            }
        }
    }
}

/// One preference record in TRL's terms.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalized {
    /// The prompt both answers follow.
    pub prompt: Side,
    /// The chosen answer (a pair) or the answer (KTO).
    pub answer: Side,
    /// A pair's rejected answer.
    pub rejected: Option<Side>,
    /// KTO: whether the answer is desirable.
    pub desirable: Option<bool>,
}

impl Normalized {
    /// TRL's form: `{prompt, chosen, rejected}` or `{prompt, completion, label}`.
    pub fn to_json(&self) -> Value {
        match (&self.rejected, self.desirable) {
            (Some(r), _) => json!({
                "prompt": self.prompt.to_json(),
                "chosen": self.answer.to_json(),
                "rejected": r.to_json(),
            }),
            (None, d) => json!({
                "prompt": self.prompt.to_json(),
                "completion": self.answer.to_json(),
                "label": d.unwrap_or(true),
            }),
        }
    }
}

/// Messages of a TRL conversational list: each `{role, content}`, content a string (or
/// LLaMA-Factory v1's `[{type: "text", value}]` parts, joined).
fn plain_messages(v: &Value, what: &str) -> std::result::Result<Vec<Value>, String> {
    let Value::Array(list) = v else {
        return Err(format!(
            "`{what}` is {}, expected a list of messages",
            kind(v)
        ));
    };
    list.iter()
        .enumerate()
        .map(|(k, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("`{what}` message {k} has no string `role`"))?;
            let content = message_content(m).map_err(|e| format!("`{what}` message {k}{e}"))?;
            Ok(json!({"role": role, "content": content}))
        })
        .collect()
}

/// How many leading items `a` and `b` share.
fn common_prefix<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The shared turns of two conversations as the prompt, the rest as the two answers (TRL's
/// `extract_prompt`).
fn split_pair(c: Vec<Value>, r: Vec<Value>) -> (Side, Side, Side) {
    let n = common_prefix(&c, &r);
    // The prompt ends before an assistant turn: a shared assistant prefix stays in the answers.
    let n = c[..n]
        .iter()
        .rposition(|m| m["role"] != "assistant")
        .map_or(0, |i| i + 1);
    let p = c[..n].to_vec();
    (
        Side::Messages(p),
        Side::Messages(c[n..].to_vec()),
        Side::Messages(r[n..].to_vec()),
    )
}

/// A record's conversation with `answer` as its last turn, in the format `opts` says (or the
/// one detected), as chat messages.
fn with_answer(
    r: &Value,
    opts: &FormatOptions,
    answer: &Value,
) -> std::result::Result<Vec<Value>, String> {
    let mut rec = r.clone();
    let Some(obj) = rec.as_object_mut() else {
        return Err(format!("the record is {}, expected an object", kind(r)));
    };
    let format = if opts.format == "auto" {
        detect(r, opts).map(|(f, _)| f).or_else(|_| {
            // alpaca ranking: `instruction` with string answers.
            let p = opts.columns.prompt.as_deref().unwrap_or("instruction");
            if obj.contains_key(p) {
                Ok("alpaca".to_string())
            } else {
                Err(format!(
                    "no prompt: expected `prompt` (TRL), `conversations` or `messages` \
                     (ShareGPT) or `instruction` (alpaca); the record has {}",
                    field_names(r)
                ))
            }
        })?
    } else {
        opts.format.clone()
    };
    match (format.as_str(), answer) {
        ("alpaca", Value::String(_)) => {
            let key = opts.columns.response.clone().unwrap_or("output".into());
            obj.insert(key, answer.clone());
        }
        ("sharegpt" | "messages", Value::Object(_)) => {
            let key = opts.columns.messages.clone().unwrap_or_else(|| {
                if obj.contains_key("conversations") {
                    "conversations".into()
                } else {
                    "messages".into()
                }
            });
            let list = obj
                .get_mut(&key)
                .and_then(Value::as_array_mut)
                .ok_or_else(|| format!("`{key}` is not a list of messages"))?;
            list.push(answer.clone());
        }
        (f, a) => {
            return Err(format!(
                "a `{f}` record's answers are {}, expected {}",
                kind(a),
                if f == "alpaca" { "strings" } else { "messages" }
            ));
        }
    }
    let v = convert_record(&rec, opts, &format)?;
    Ok(v["messages"].as_array().cloned().unwrap_or_default())
}

/// Record `r` in TRL's terms, or what is wrong with it.
pub fn normalize(r: &Value, opts: &FormatOptions) -> std::result::Result<Normalized, String> {
    if !r.is_object() {
        return Err(format!("the record is {}, expected an object", kind(r)));
    }
    let get = |k: &str| r.get(k).filter(|v| !v.is_null());
    let kto_key = opts.columns.kto_tag.as_deref().unwrap_or("label");
    if let Some(label) = get(kto_key) {
        let Some(desirable) = label.as_bool() else {
            return Err(format!(
                "`{kto_key}` is {}, expected true (desirable) or false",
                kind(label)
            ));
        };
        let (prompt, answer) = if let Some(c) = get("completion") {
            let p = get("prompt").ok_or("a `completion` needs a `prompt`")?;
            match (p, c) {
                (Value::String(p), Value::String(c)) => {
                    (Side::Text(p.clone()), Side::Text(c.clone()))
                }
                (Value::String(p), c) => (
                    Side::Messages(vec![json!({"role": "user", "content": p})]),
                    Side::Messages(plain_messages(c, "completion")?),
                ),
                (p, c) => (
                    Side::Messages(plain_messages(p, "prompt")?),
                    Side::Messages(plain_messages(c, "completion")?),
                ),
            }
        } else {
            let fmt = FormatOptions {
                format: if opts.format == "auto" {
                    detect(r, opts).map_err(|e| e.to_string())?.0
                } else {
                    opts.format.clone()
                },
                ..opts.clone()
            };
            let v = convert_record(r, &fmt, &fmt.format)?;
            let mut m = v["messages"].as_array().cloned().unwrap_or_default();
            if m.last().is_none_or(|x| x["role"] != "assistant") {
                return Err("the last message is not the assistant's answer".into());
            }
            let answer = m.split_off(m.len() - 1);
            (Side::Messages(m), Side::Messages(answer))
        };
        return Ok(Normalized {
            prompt,
            answer,
            rejected: None,
            desirable: Some(desirable),
        });
    }
    if get("chosen_messages").is_some() || get("rejected_messages").is_some() {
        let c = plain_messages(
            get("chosen_messages").ok_or("missing `chosen_messages`")?,
            "chosen_messages",
        )?;
        let rj = plain_messages(
            get("rejected_messages").ok_or("missing `rejected_messages`")?,
            "rejected_messages",
        )?;
        let (prompt, answer, rejected) = split_pair(c, rj);
        return Ok(Normalized {
            prompt,
            answer,
            rejected: Some(rejected),
            desirable: None,
        });
    }
    let (ck, rk) = (
        opts.columns.chosen.as_deref().unwrap_or("chosen"),
        opts.columns.rejected.as_deref().unwrap_or("rejected"),
    );
    let (c, rj) = match (get(ck), get(rk)) {
        (Some(c), Some(rj)) => (c, rj),
        (None, Some(_)) => return Err(format!("missing `{ck}` (the chosen answer)")),
        (Some(_), None) => return Err(format!("missing `{rk}` (the rejected answer)")),
        (None, None) => {
            return Err(format!(
                "neither preference data (`{ck}`/`{rk}`) nor KTO data (a boolean `{kto_key}`); \
                 the record has {}",
                field_names(r)
            ));
        }
    };
    let (prompt, answer, rejected) = match (get("prompt"), c, rj) {
        (Some(Value::String(p)), Value::String(c), Value::String(rj)) => (
            Side::Text(p.clone()),
            Side::Text(c.clone()),
            Side::Text(rj.clone()),
        ),
        (Some(p), c @ Value::Array(_), rj @ Value::Array(_)) => {
            let p = match p {
                Value::String(s) => vec![json!({"role": "user", "content": s})],
                p => plain_messages(p, "prompt")?,
            };
            (
                Side::Messages(p),
                Side::Messages(plain_messages(c, ck)?),
                Side::Messages(plain_messages(rj, rk)?),
            )
        }
        (None, c @ Value::Array(_), rj @ Value::Array(_)) => {
            split_pair(plain_messages(c, ck)?, plain_messages(rj, rk)?)
        }
        (_, c, rj) if c.is_object() || c.is_string() => {
            split_pair(with_answer(r, opts, c)?, with_answer(r, opts, rj)?)
        }
        (_, c, _) => {
            return Err(format!(
                "`{ck}` is {}, expected a string, a message or a list of messages",
                kind(c)
            ));
        }
    };
    Ok(Normalized {
        prompt,
        answer,
        rejected: Some(rejected),
        desirable: None,
    })
}

/// Every record of `ds` in TRL's form (LLaMA-Factory's ranking and KTO entries, with their
/// columns and tags); a bad record is an error naming it.
pub fn to_trl(ds: &Dataset, opts: &FormatOptions) -> Result<Dataset> {
    let rows = ds
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| {
            normalize(r, opts)
                .map(|n| n.to_json())
                .map_err(|m| Error::InvalidArgument(format!("`{}`: record {i}: {m}", ds.source)))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Dataset {
        rows,
        source: ds.source.clone(),
    })
}

/// What `tokenize` did.
#[derive(Clone, Debug, Default)]
pub struct PrefReport {
    /// The examples kept, in order.
    pub examples: Vec<Example>,
    /// Index in the input of each kept example.
    pub source_index: Vec<usize>,
    /// Records whose prompt was cut at `max_prompt_length` or a row at `max_length`.
    pub truncated: usize,
    /// Records dropped because the prompt alone fills `max_length` (nothing to learn is left).
    pub dropped: usize,
    /// Records skipped, with why (a missing side, an empty answer, the same answer twice).
    pub skipped: Vec<(usize, String)>,
    /// KTO: how many answers are desirable and undesirable (both 0 for pairs).
    pub desirable: (usize, usize),
}

/// The ids of the prompt alone and of the prompt followed by `answer`.
fn encode(
    tok: &Tokenizer,
    template: Option<&str>,
    prompt: &Side,
    answer: &Side,
    limit: usize,
) -> std::result::Result<(Vec<u32>, Vec<u32>), Error> {
    let check = |text: &str| {
        if limit > 0 && text.len() > limit {
            Err(Error::InvalidArgument(format!(
                "it renders to {} bytes of text, over the limit of {limit} a record; \
                 `--max-record-size N` raises it",
                text.len()
            )))
        } else {
            Ok(())
        }
    };
    match (prompt, answer) {
        (Side::Text(p), Side::Text(a)) => {
            let mut full = format!("{p}{a}");
            if let Some(eos) = tok.eos_token.as_deref().filter(|e| !a.ends_with(e)) {
                full.push_str(eos);
            }
            check(&full)?;
            Ok((tok.encode(p, true)?, tok.encode(&full, true)?))
        }
        (Side::Messages(p), Side::Messages(a)) => {
            let render = |msgs: Vec<Value>, gen_prompt: bool| {
                let o = TemplateOptions {
                    add_generation_prompt: gen_prompt,
                    extra: serde_json::Map::new(),
                };
                let msgs = Value::Array(msgs);
                match template {
                    None => tok.apply_chat_template(&msgs, &o),
                    Some(t) => tok.render_template(t, &msgs, &o),
                }
            };
            let prompt_text = render(p.clone(), true)?;
            let full = render(p.iter().chain(a).cloned().collect(), false)?;
            check(&full)?;
            Ok((tok.encode(&prompt_text, false)?, tok.encode(&full, false)?))
        }
        _ => Err(Error::InvalidArgument(
            "the prompt and the answer are not both text or both messages".into(),
        )),
    }
}

/// A row of `prompt_len` prompt tokens and the answer after them: labels -100 on the prompt.
fn row(ids: Vec<u32>, prompt_len: usize) -> (Vec<u32>, Vec<i64>) {
    let labels = ids
        .iter()
        .enumerate()
        .map(|(k, &t)| if k < prompt_len { IGNORE } else { i64::from(t) })
        .collect();
    (ids, labels)
}

/// What tokenizing one record gave: an example (and whether it was cut), a skip (its data,
/// with why), or a drop (the prompt fills `max_length`); errors (the template, the tokenizer, a
/// limit) stop the dataset.
enum Outcome {
    Kept(Box<Example>, bool),
    Skipped(String),
    Dropped,
}

/// Tokenizes every record of `ds` (any shape [`normalize`] reads), polling `cancel` before each.
pub fn tokenize(
    ds: &Dataset,
    tok: &Tokenizer,
    opts: &PrefOptions,
    cancel: &CancelToken,
) -> Result<PrefReport> {
    if opts.max_prompt_length == Some(0) {
        return Err(Error::InvalidArgument(
            "`max_prompt_length` must be at least 1".into(),
        ));
    }
    let template = (opts.template != "model").then_some(opts.template.as_str());
    let fopts = FormatOptions::default();
    let one = |i: usize, r: &Value| -> Result<Outcome> {
        cancel.check()?;
        let n = match normalize(r, &fopts) {
            Ok(n) => n,
            Err(m) => return Ok(Outcome::Skipped(m)),
        };
        if n.answer.is_empty() || n.rejected.as_ref().is_some_and(Side::is_empty) {
            return Ok(Outcome::Skipped("an answer is empty".into()));
        }
        if n.rejected.as_ref() == Some(&n.answer) {
            return Ok(Outcome::Skipped(
                "the chosen and rejected answers are the same".into(),
            ));
        }
        let named = |e: Error| match e {
            Error::Template(m) => Error::Template(format!(
                "{} fails on record {i} of `{}`: {m}",
                match (template, &tok.template_source) {
                    (Some(_), _) => "the `template` option of `data::preference`".to_string(),
                    (None, Some(p)) => format!("`{}`", p.display()),
                    (None, None) => "the tokenizer's chat template".to_string(),
                },
                ds.source
            )),
            Error::Tokenizer(m) => Error::Tokenizer(format!("record {i} of `{}`: {m}", ds.source)),
            Error::InvalidArgument(m) => {
                Error::InvalidArgument(format!("`{}`: record {i}: {m}", ds.source))
            }
            e => e,
        };
        let (p, first) =
            encode(tok, template, &n.prompt, &n.answer, opts.max_record_bytes).map_err(named)?;
        let (prompt_len, second) = match &n.rejected {
            Some(rj) => {
                let (_, second) =
                    encode(tok, template, &n.prompt, rj, opts.max_record_bytes).map_err(named)?;
                let pl = common_prefix(&p, &first).min(common_prefix(&p, &second));
                (pl, second)
            }
            None => (common_prefix(&p, &first), Vec::new()),
        };
        if first.len() == prompt_len || (n.rejected.is_some() && second.len() == prompt_len) {
            return Ok(Outcome::Skipped(
                "an answer has no tokens after the prompt".into(),
            ));
        }
        if first == second {
            return Ok(Outcome::Skipped(
                "the chosen and rejected answers tokenize the same".into(),
            ));
        }
        let (mut first, mut second, mut prompt_len) = (first, second, prompt_len);
        let mut cut = false;
        if let Some(mp) = opts.max_prompt_length.filter(|&m| prompt_len > m) {
            // Keep the end of the prompt.
            let drop = prompt_len - mp;
            first.drain(..drop);
            if !second.is_empty() {
                second.drain(..drop);
            }
            prompt_len = mp;
            cut = true;
        }
        if opts.max_length > 0 {
            if prompt_len >= opts.max_length {
                return Ok(Outcome::Dropped);
            }
            cut |= first.len() > opts.max_length || second.len() > opts.max_length;
            first.truncate(opts.max_length);
            second.truncate(opts.max_length);
        }
        let (input_ids, labels) = row(first, prompt_len);
        let (second_ids, second_labels) = row(second, prompt_len);
        Ok(Outcome::Kept(
            Box::new(Example {
                input_ids,
                labels,
                pref: Some(Box::new(Pref {
                    prompt_len,
                    second_ids,
                    second_labels,
                    desirable: n.desirable,
                    ref_logps: None,
                })),
                ..Example::default()
            }),
            cut,
        ))
    };
    let outcomes: Vec<Result<Outcome>> = crate::panic::in_workers(|| {
        ds.rows
            .par_iter()
            .enumerate()
            .map(|(i, r)| one(i, r))
            .collect()
    });
    let mut report = PrefReport::default();
    for (i, o) in outcomes.into_iter().enumerate() {
        match o? {
            Outcome::Kept(ex, cut) => {
                report.truncated += usize::from(cut);
                report.examples.push(*ex);
                report.source_index.push(i);
            }
            Outcome::Skipped(why) => report.skipped.push((i, why)),
            Outcome::Dropped => report.dropped += 1,
        }
    }
    let kto = report
        .examples
        .iter()
        .filter(|e| e.pref.as_ref().is_some_and(|p| p.desirable.is_some()))
        .count();
    if kto > 0 && kto < report.examples.len() {
        return Err(Error::InvalidArgument(format!(
            "`{}` mixes KTO records (a boolean `label`) with preference pairs; use one kind",
            ds.source
        )));
    }
    if kto > 0 {
        kl_rows(&mut report.examples, opts.max_length);
        let yes = report
            .examples
            .iter()
            .filter(|e| e.pref.as_ref().and_then(|p| p.desirable) == Some(true))
            .count();
        report.desirable = (yes, report.examples.len() - yes);
    }
    Ok(report)
}

/// KTO's KL rows: each example's prompt followed by the previous example's completion (the
/// first takes the last one's), as TRL pairs them within a batch: mismatched pairs from the
/// same data, whose log-ratio estimates the KL term.
fn kl_rows(examples: &mut [Example], max_length: usize) {
    let n = examples.len();
    let completions: Vec<Vec<u32>> = examples
        .iter()
        .map(|e| {
            let pl = e.pref.as_ref().map_or(0, |p| p.prompt_len);
            e.input_ids[pl.min(e.input_ids.len())..].to_vec()
        })
        .collect();
    for (i, e) in examples.iter_mut().enumerate() {
        let pl = e.pref.as_ref().map_or(0, |p| p.prompt_len);
        let mut ids = e.input_ids[..pl.min(e.input_ids.len())].to_vec();
        ids.extend(&completions[(i + n - 1) % n]);
        if max_length > 0 {
            ids.truncate(max_length);
        }
        let (ids, labels) = row(ids, pl);
        if let Some(p) = &mut e.pref {
            p.second_ids = ids;
            p.second_labels = labels;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn norm(v: Value) -> std::result::Result<Normalized, String> {
        normalize(&v, &FormatOptions::default())
    }

    fn msgs(v: Value) -> Side {
        Side::Messages(v.as_array().unwrap().clone())
    }

    #[test]
    fn every_shape_normalizes() {
        let user = json!([{"role": "user", "content": "hi"}]);
        let want = Normalized {
            prompt: msgs(user.clone()),
            answer: msgs(json!([{"role": "assistant", "content": "hello"}])),
            rejected: Some(msgs(json!([{"role": "assistant", "content": "go away"}]))),
            desirable: None,
        };
        // TRL conversational, explicit and implicit prompt.
        let explicit = json!({"prompt": user, "chosen": [{"role": "assistant", "content": "hello"}], "rejected": [{"role": "assistant", "content": "go away"}]});
        assert_eq!(norm(explicit).unwrap(), want);
        let implicit = json!({"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]});
        assert_eq!(norm(implicit).unwrap(), want);
        // LLaMA-Factory ShareGPT ranking and alpaca ranking.
        let sharegpt = json!({"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "hello"}, "rejected": {"from": "gpt", "value": "go away"}});
        assert_eq!(norm(sharegpt).unwrap(), want);
        let alpaca = json!({"instruction": "hi", "chosen": "hello", "rejected": "go away"});
        assert_eq!(norm(alpaca).unwrap(), want);
        // v1's messages with content parts.
        let v1 = json!({"chosen_messages": [{"role": "user", "content": [{"type": "text", "value": "hi"}]}, {"role": "assistant", "content": [{"type": "text", "value": "hello"}]}], "rejected_messages": [{"role": "user", "content": [{"type": "text", "value": "hi"}]}, {"role": "assistant", "content": [{"type": "text", "value": "go away"}]}]});
        assert_eq!(norm(v1).unwrap(), want);
        // TRL plain text.
        let text = norm(json!({"prompt": "Q: ", "chosen": "yes", "rejected": "no"})).unwrap();
        assert_eq!(text.answer, Side::Text("yes".into()));
        // KTO: prompt + completion, and a conversation whose last turn is the answer.
        let kto = norm(json!({"prompt": "Q: ", "completion": "yes", "label": false})).unwrap();
        assert_eq!((kto.desirable, kto.rejected.is_none()), (Some(false), true));
        let kto = norm(json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "label": true})).unwrap();
        assert_eq!(kto.prompt, msgs(user));
        assert_eq!(kto.desirable, Some(true));
    }

    #[test]
    fn bad_records_say_what_is_missing() {
        let e = norm(json!({"prompt": "Q", "chosen": "yes"})).unwrap_err();
        assert!(e.contains("missing `rejected`"), "{e}");
        let e = norm(json!({"instruction": "Q", "output": "A"})).unwrap_err();
        assert!(e.contains("neither preference data"), "{e}");
        let e = norm(json!({"prompt": "Q", "completion": "A", "label": "yes"})).unwrap_err();
        assert!(e.contains("expected true (desirable) or false"), "{e}");
        let e = norm(json!({"chosen": 3, "rejected": 4})).unwrap_err();
        assert!(e.contains("expected a string, a message or a list"), "{e}");
    }

    #[test]
    fn pairs_share_the_prompt_and_bad_records_are_skipped() {
        let tok = Tokenizer::builtin().unwrap();
        let ds = Dataset {
            rows: vec![
                json!({"prompt": [{"role": "user", "content": "hi there"}], "chosen": [{"role": "assistant", "content": "hello"}], "rejected": [{"role": "assistant", "content": "go away now"}]}),
                json!({"prompt": "Q", "chosen": "same", "rejected": "same"}),
                json!({"prompt": "Q", "chosen": "", "rejected": "no"}),
                json!({"prompt": "Q", "chosen": "yes"}),
            ],
            source: "p.json".into(),
        };
        let r = tokenize(&ds, &tok, &PrefOptions::default(), &CancelToken::new()).unwrap();
        assert_eq!(r.examples.len(), 1);
        let ex = &r.examples[0];
        let p = ex.pref.as_ref().unwrap();
        assert_eq!(ex.input_ids[..p.prompt_len], p.second_ids[..p.prompt_len]);
        assert!(ex.labels[..p.prompt_len].iter().all(|&l| l == IGNORE));
        assert!(ex.labels[p.prompt_len..].iter().all(|&l| l != IGNORE));
        let why: Vec<_> = r.skipped.iter().map(|(i, w)| format!("{i}: {w}")).collect();
        assert_eq!(
            why,
            [
                "1: the chosen and rejected answers are the same",
                "2: an answer is empty",
                "3: missing `rejected` (the rejected answer)"
            ]
        );
        // A prompt that fills `max_length` drops the record; `max_prompt_length` keeps its end.
        let short = PrefOptions {
            max_length: p.prompt_len,
            ..PrefOptions::default()
        };
        let r2 = tokenize(&ds, &tok, &short, &CancelToken::new()).unwrap();
        assert_eq!((r2.examples.len(), r2.dropped), (0, 1));
        let keep_end = PrefOptions {
            max_prompt_length: Some(3),
            ..PrefOptions::default()
        };
        let r3 = tokenize(&ds, &tok, &keep_end, &CancelToken::new()).unwrap();
        let e3 = &r3.examples[0];
        assert_eq!(e3.pref.as_ref().unwrap().prompt_len, 3);
        assert_eq!(e3.input_ids[..], ex.input_ids[p.prompt_len - 3..]);
        assert_eq!(r3.truncated, 1);
    }

    #[test]
    fn kto_rows_pair_each_prompt_with_the_previous_completion() {
        let tok = Tokenizer::builtin().unwrap();
        let ds = Dataset {
            rows: vec![
                json!({"prompt": "ab", "completion": "cd", "label": true}),
                json!({"prompt": "ef", "completion": "gh", "label": false}),
            ],
            source: "k.json".into(),
        };
        let r = tokenize(&ds, &tok, &PrefOptions::default(), &CancelToken::new()).unwrap();
        assert_eq!(r.desirable, (1, 1));
        let (a, b) = (&r.examples[0], &r.examples[1]);
        let (pa, pb) = (a.pref.as_ref().unwrap(), b.pref.as_ref().unwrap());
        // a's KL row: a's prompt + b's completion; b's: b's prompt + a's completion.
        let mut want = a.input_ids[..pa.prompt_len].to_vec();
        want.extend(&b.input_ids[pb.prompt_len..]);
        assert_eq!(pa.second_ids, want);
        let mut want = b.input_ids[..pb.prompt_len].to_vec();
        want.extend(&a.input_ids[pa.prompt_len..]);
        assert_eq!(pb.second_ids, want);
    }
}
