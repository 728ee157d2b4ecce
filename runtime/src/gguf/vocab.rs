//! A tokenizer as llama.cpp reads it from GGUF metadata: the GPT-2 style byte-level BPE model
//! (`tokenizer.ggml.model = "gpt2"`), every token by id (the vocabulary padded to the
//! embedding's rows with `[PAD<id>]` tokens, as `convert_hf_to_gguf.py` pads it), their types
//! (1 normal, 3 control for special tokens, 4 user-defined for other added tokens, 5 unused
//! padding), the merges, the special ids and the chat template.

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// The `tokenizer.*` metadata of `tok` for a model of `rows` embedding rows; `pre` is llama.cpp's
/// pre-tokenizer name for the architecture (`qwen2`, `llama-bpe`).
pub fn metadata(tok: &Tokenizer, rows: usize, pre: &str) -> Result<Vec<(String, Value)>> {
    let json = tok.json()?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        return Err(Error::InvalidArgument(format!(
            "GGUF export writes byte-level BPE tokenizers (Qwen, Llama 3); this one is {}",
            model["type"]
        )));
    }
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; rows];
    let mut put = |id: u64, text: &str, kind: i32| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "token {id} (`{text}`) is past the model's {rows} embedding rows"
            ))
        })?;
        *slot = Some((text.to_string(), kind));
        Ok(())
    };
    for (text, id) in model["vocab"].as_object().into_iter().flatten() {
        put(id.as_u64().unwrap_or(u64::MAX), text, NORMAL)?;
    }
    for t in json["added_tokens"].as_array().into_iter().flatten() {
        let kind = if t["special"] == true {
            CONTROL
        } else {
            USER_DEFINED
        };
        put(
            t["id"].as_u64().unwrap_or(u64::MAX),
            t["content"].as_str().unwrap_or_default(),
            kind,
        )?;
    }
    let (texts, kinds): (Vec<Value>, Vec<Value>) = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| match t {
            Some((text, kind)) => (Value::String(text), Value::I32(kind)),
            None => (Value::String(format!("[PAD{i}]")), Value::I32(UNUSED)),
        })
        .unzip();
    // Merges are `"a b"` strings (tokenizers' older layout) or `["a", "b"]` pairs.
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::String(s) => Value::String(s.clone()),
            Json::Array(p) => Value::String(
                p.iter()
                    .filter_map(Json::as_str)
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            other => Value::String(other.to_string()),
        })
        .collect();
    let mut merges = merges;
    if merges.is_empty() {
        // candle's writer types an empty array as u32 and llama.cpp reads merges as strings only:
        // a tokenizer without merges (the built-in byte tokenizer) gets one merge of two control
        // tokens, which never meet inside a word (control tokens are matched whole, first).
        let controls: Vec<&str> = json["added_tokens"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["special"] == true)
            .filter_map(|t| t["content"].as_str())
            .collect();
        let [a, b, ..] = controls.as_slice() else {
            return Err(Error::InvalidArgument(
                "GGUF export needs a tokenizer with BPE merges or two special tokens".into(),
            ));
        };
        merges.push(Value::String(format!("{a} {b}")));
    }
    let mut out = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(texts)),
        ("tokenizer.ggml.token_type".into(), Value::Array(kinds)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ];
    let id = |t: &Option<String>| t.as_deref().and_then(|t| tok.token_to_id(t));
    for (key, v) in [
        ("bos_token_id", id(&tok.bos_token)),
        ("eos_token_id", id(&tok.eos_token)),
        ("padding_token_id", id(&tok.pad_token)),
    ] {
        if let Some(v) = v {
            out.push((format!("tokenizer.ggml.{key}"), Value::U32(v)));
        }
    }
    if let Some(t) = tok.saved_template() {
        out.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    Ok(out)
}
