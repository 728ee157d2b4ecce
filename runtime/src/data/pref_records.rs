//! Preference and KTO records in the shapes users have, read into TRL's terms
//! ([`Normalized`]): TRL's `{prompt, chosen, rejected}` as plain text or as conversations (the
//! prompt may be implicit: the turns both answers share), LLaMA-Factory's ranking data (ShareGPT
//! `conversations` with `chosen` / `rejected` messages, alpaca `instruction` with `chosen` /
//! `rejected` strings, v1's `chosen_messages` / `rejected_messages`), and KTO's unpaired records
//! (`prompt` + `completion`, or a conversation whose last turn is the answer, with a boolean
//! `label`). [`super::pref`] tokenizes them.

use serde_json::{Value, json};

use super::formats::{FormatOptions, convert_record, detect, field_names, message_content};
use super::records::{Dataset, kind};
use crate::{Error, Result};

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

    pub(super) fn is_empty(&self) -> bool {
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
pub(super) fn common_prefix<T: PartialEq>(a: &[T], b: &[T]) -> usize {
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
}
