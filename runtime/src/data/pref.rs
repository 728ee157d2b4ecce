//! Preference data to tokenized examples, as TRL's `DPOTrainer` and `KTOTrainer` prepare it.
//!
//! Records come in the shapes users have, read into TRL's terms by
//! [`super::pref_records::normalize`]. Each is tokenized as TRL does: the prompt alone (with the generation prompt) and the prompt
//! followed by each answer; the answer starts where the two token lists diverge, so both rows
//! share the prompt's tokens exactly. `max_prompt_length` keeps the end of a long prompt,
//! `max_length` keeps the start of each row, and a record whose prompt alone fills `max_length`
//! is dropped. Bad records (a missing side, an empty answer, the same answer twice) are skipped,
//! counted and named.

use rayon::prelude::*;
use serde::Deserialize;
use serde_json::Value;

use super::example::{Example, IGNORE, Pref};
use super::formats::FormatOptions;
use super::pref_records::{Side, common_prefix, normalize};
use super::records::Dataset;
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
    use serde_json::json;

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
