//! Data files: JSON (an array of records), JSON Lines and plain text read by `data::load`'s
//! reader, converted to SFT messages (or TRL's preference terms) and tokenized with the built-in
//! tokenizer's chat template, as `data::load` + `data::sft` / `data::preference` do; and
//! LLaMA-Factory's `dataset_info.json`.

use std::path::Path;

use qscript_runtime::cancel::CancelToken;
use qscript_runtime::data::formats::{FormatOptions, preference_kind, to_messages, to_text};
use qscript_runtime::data::info::read_info;
use qscript_runtime::data::pref_records::to_trl;
use qscript_runtime::data::records::load_files;
use qscript_runtime::data::sft::{SftOptions, sft};
use qscript_runtime::tokenizer::Tokenizer;

use super::{Harness, Outcome, Scratch, Shape, Target, err, fixture_files};

/// The targets of this file.
pub(super) const TARGETS: &[&Target] = &[&DATA_JSON, &DATA_JSONL, &DATA_TEXT, &DATASET_INFO];

/// Tokens the data targets' mutator knows.
const DICT: &[&str] = &[
    "\"instruction\"",
    "\"input\"",
    "\"output\"",
    "\"history\"",
    "\"system\"",
    "\"conversations\"",
    "\"from\"",
    "\"value\"",
    "\"human\"",
    "\"gpt\"",
    "\"function_call\"",
    "\"observation\"",
    "\"messages\"",
    "\"role\"",
    "\"content\"",
    "\"user\"",
    "\"assistant\"",
    "\"tool_calls\"",
    "\"tools\"",
    "\"text\"",
    "\"prompt\"",
    "\"completion\"",
    "\"chosen\"",
    "\"rejected\"",
    "\"label\"",
    "\"file_name\"",
    "\"formatting\"",
    "\"sharegpt\"",
    "\"alpaca\"",
    "\"columns\"",
    "\"tags\"",
    "\"ranking\"",
    "\"kto_tag\"",
    "\"role_tag\"",
    "\"content_tag\"",
    "{%",
    "<|im_end|>",
    "\\u0000",
    "\\ud83d",
    "1e999",
    "null",
    "\n",
];

/// Loads `path` as `data::load` does, converts and tokenizes what it can.
fn load_and_prepare(path: &Path, fmt: &FormatOptions, tok: &Tokenizer) -> Outcome {
    let ds = load_files(&[path.to_path_buf()]).map_err(err)?;
    let first = ds.rows.first().cloned().unwrap_or_default();
    if fmt.preference || preference_kind(&first).is_some() {
        to_trl(&ds, fmt).map_err(err)?;
        return Ok(());
    }
    let opts = SftOptions {
        max_length: 128,
        ..SftOptions::default()
    };
    let ds = if first.get("text").is_some() {
        // Plain text for pretraining: tokenized as it is.
        to_text(&ds, "text").map_err(err)?
    } else {
        to_messages(&ds, fmt).map_err(err)?.dataset
    };
    sft(&ds, tok, &opts, &CancelToken::new()).map_err(err)?;
    Ok(())
}

/// A data file named `file`, loaded and prepared.
struct DataFile {
    scratch: Scratch,
    file: &'static str,
    tok: Tokenizer,
}

impl Harness for DataFile {
    fn run(&mut self, input: &[u8]) -> Outcome {
        let p = self.scratch.put(self.file, input)?;
        load_and_prepare(&p, &FormatOptions::default(), &self.tok)
    }
}

fn data_file(file: &'static str) -> anyhow::Result<Box<dyn Harness>> {
    Ok(Box::new(DataFile {
        scratch: Scratch::new()?,
        file,
        tok: Tokenizer::builtin()?,
    }))
}

/// The first `n` bytes of each fixture file, cut at a line end.
fn heads(rel: &[&str], n: usize) -> Vec<Vec<u8>> {
    fixture_files(rel, 64 << 20)
        .into_iter()
        .map(|b| {
            let cut = b
                .iter()
                .take(n)
                .rposition(|&c| c == b'\n')
                .map_or(b.len().min(n), |i| i + 1);
            b[..cut].to_vec()
        })
        .collect()
}

/// A JSON array of records (`data.json`).
pub static DATA_JSON: Target = Target {
    name: "data_json",
    entry: "data::records::load_files (.json), formats::to_messages / pref_records::to_trl, data::sft::sft",
    max_len: 128 << 10,
    shape: Shape::Json,
    dict: DICT,
    seeds: || {
        fixture_files(
            &[
                "datasets/huanhuan/huanhuan-100.json",
                "datasets/llamafactory/identity.json",
            ],
            128 << 10,
        )
    },
    harness: || data_file("data.json"),
};

/// JSON Lines (`data.jsonl`).
pub static DATA_JSONL: Target = Target {
    name: "data_jsonl",
    entry: "data::records::load_files (.jsonl), formats::to_messages / pref_records::to_trl, data::sft::sft",
    max_len: 128 << 10,
    shape: Shape::Json,
    dict: DICT,
    seeds: || {
        let mut out = heads(&["datasets/huanhuan/huanhuan.jsonl"], 8 << 10);
        out.extend(heads(
            &["datasets/llamafactory/v1_dpo_demo.jsonl"],
            16 << 10,
        ));
        out
    },
    harness: || data_file("data.jsonl"),
};

/// Plain text (`data.txt`, a record per line).
pub static DATA_TEXT: Target = Target {
    name: "data_text",
    entry: "data::records::load_files (.txt), formats::to_text",
    max_len: 64 << 10,
    shape: Shape::Plain,
    dict: &["\n", "\r\n", "\u{0}", "\u{feff}", "\u{2028}", "\u{85}"],
    seeds: || heads(&["datasets/llamafactory/wiki_demo.txt"], 8 << 10),
    harness: || data_file("data.txt"),
};

/// `dataset_info.json` beside two small data files (`a.json`, alpaca; `b.json`, ShareGPT).
struct Info {
    scratch: Scratch,
    tok: Tokenizer,
}

impl Harness for Info {
    fn run(&mut self, input: &[u8]) -> Outcome {
        let p = self.scratch.put("dataset_info.json", input)?;
        let mut first = None;
        for name in ["a", "b", "identity"] {
            let done = read_info(&p, name).map_err(err).and_then(|(file, fmt)| {
                // The engine reads the data file through its sandbox; here only files of this
                // directory are read.
                if file.parent() == Some(self.scratch.path()) && file.is_file() {
                    load_and_prepare(&file, &fmt, &self.tok)
                } else {
                    Ok(())
                }
            });
            if let Err(e) = done {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// LLaMA-Factory's `dataset_info.json`.
pub static DATASET_INFO: Target = Target {
    name: "dataset_info",
    entry: "data::info::read_info on `dataset_info.json`, then the entry's file loaded and prepared",
    max_len: 64 << 10,
    shape: Shape::Json,
    dict: DICT,
    seeds: || {
        let mut out = vec![
            br#"{"a": {"file_name": "a.json"}, "b": {"file_name": "b.json", "formatting": "sharegpt", "columns": {"messages": "conversations"}, "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}}, "identity": {"file_name": "a.json", "ranking": true, "columns": {"prompt": "instruction", "chosen": "output", "rejected": "input"}}}"#
                .to_vec(),
        ];
        out.extend(fixture_files(
            &["datasets/llamafactory/dataset_info.json"],
            64 << 10,
        ));
        out
    },
    harness: || {
        let scratch = Scratch::new()?;
        scratch
            .put(
                "a.json",
                br#"[{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "x", "input": "y", "output": "z", "history": [["a", "b"]]}]"#,
            )
            .map_err(anyhow::Error::msg)?;
        scratch
            .put(
                "b.json",
                br#"[{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}], "system": "be nice"}]"#,
            )
            .map_err(anyhow::Error::msg)?;
        Ok(Box::new(Info {
            scratch,
            tok: Tokenizer::builtin()?,
        }))
    },
};
