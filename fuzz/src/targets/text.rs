//! Tokenizer files (`tokenizer.json`, `tokenizer_config.json`) and Jinja chat templates, read
//! as `tokenizer::load` reads them and used as `data::sft` and `apply_chat_template` use them.

use qscript_runtime::cancel::CancelToken;
use qscript_runtime::data::records::Dataset;
use qscript_runtime::data::sft::{SftOptions, sft};
use qscript_runtime::tokenizer::{TemplateOptions, Tokenizer};
use serde_json::{Value, json};

use super::{Harness, Outcome, Scratch, Shape, Target, err, fixture_files};

/// The targets of this file.
pub(super) const TARGETS: &[&Target] = &[&TOKENIZER, &TOKENIZER_CONFIG, &CHAT_TEMPLATE];

/// Texts every tokenizer encodes.
const TEXTS: &[&str] = &[
    "Hello, world! 你好 🙂",
    "<|im_start|>user\nhi<|im_end|>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!",
    "  \t\n\u{0}\u{feff}x\u{301}",
];

/// A short conversation with every role, a tool call and a multi-part content.
fn messages() -> Value {
    json!([
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
        ]},
        {"role": "tool", "content": "4"},
        {"role": "user", "content": [{"type": "text", "text": "thanks"}]},
        {"role": "assistant", "content": "<think>\nok\n</think>\n\nYou're welcome."}
    ])
}

/// Encodes, decodes and renders with `tok`, as data preparation and generation do.
fn exercise(tok: &Tokenizer) -> Outcome {
    for t in TEXTS {
        let ids = tok.encode(t, true).map_err(err)?;
        tok.tokens(t, false).map_err(err)?;
        tok.decode(&ids, false).map_err(err)?;
        tok.decode(&ids, true).map_err(err)?;
    }
    let _ = (tok.eos_id(), tok.pad_id(), tok.vocab_size());
    if tok.chat_template.is_some() {
        let opts = TemplateOptions {
            add_generation_prompt: true,
            ..TemplateOptions::default()
        };
        let text = tok.apply_chat_template(&messages(), &opts).map_err(err)?;
        tok.encode(&text, false).map_err(err)?;
    }
    Ok(())
}

/// A harness with a tokenizer directory: each input is written to `file`, the other file is
/// the built-in tokenizer's (or absent).
struct InTokenizerDir {
    scratch: Scratch,
    file: &'static str,
}

impl Harness for InTokenizerDir {
    fn run(&mut self, input: &[u8]) -> Outcome {
        self.scratch.put(self.file, input)?;
        let tok = Tokenizer::load(
            self.scratch.path(),
            &qscript_runtime::cancel::CancelToken::new(),
        )
        .map_err(err)?;
        exercise(&tok)
    }
}

/// The built-in tokenizer's files (`tokenizer.json`, `tokenizer_config.json`), saved.
fn builtin_dir() -> anyhow::Result<Scratch> {
    let s = Scratch::new()?;
    Tokenizer::builtin()?.save(s.path())?;
    Ok(s)
}

fn builtin_file(name: &str) -> Vec<Vec<u8>> {
    builtin_dir()
        .ok()
        .and_then(|s| std::fs::read(s.path().join(name)).ok())
        .into_iter()
        .collect()
}

/// `tokenizer.json` (alone in its directory).
pub static TOKENIZER: Target = Target {
    name: "tokenizer",
    entry: "Tokenizer::load on `tokenizer.json`, then encode / tokens / decode",
    max_len: 256 << 10,
    shape: Shape::Json,
    dict: &[
        "\"normalizer\"",
        "\"pre_tokenizer\"",
        "\"post_processor\"",
        "\"decoder\"",
        "\"added_tokens\"",
        "\"Precompiled\"",
        "\"precompiled_charsmap\"",
        "\"Split\"",
        "\"Regex\"",
        "\"(a+)+$\"",
        "\"(a|aa)+$\"",
        "\"ByteLevel\"",
        "\"Metaspace\"",
        "\"Sequence\"",
        "\"Replace\"",
        "\"TemplateProcessing\"",
        "\"BPE\"",
        "\"WordPiece\"",
        "\"WordLevel\"",
        "\"Unigram\"",
        "\"merges\"",
        "\"vocab\"",
        "\"unk_id\"",
        "\"unk_token\"",
        "\"byte_fallback\"",
        "\"special\"",
        "\"id\"",
        "\"content\"",
        "4294967295",
        "-1",
        "1e400",
        "\\u0000",
        "\\ud800",
    ],
    seeds: || {
        let mut out = builtin_file("tokenizer.json");
        out.extend(fixture_files(
            &["models/stories260K/hf/tokenizer.json"],
            256 << 10,
        ));
        out
    },
    harness: || {
        Ok(Box::new(InTokenizerDir {
            scratch: Scratch::new()?,
            file: "tokenizer.json",
        }))
    },
};

/// `tokenizer_config.json`, beside the built-in `tokenizer.json`.
pub static TOKENIZER_CONFIG: Target = Target {
    name: "tokenizer_config",
    entry: "Tokenizer::load on `tokenizer_config.json` (special tokens, chat template), then apply_chat_template",
    max_len: 64 << 10,
    shape: Shape::Json,
    dict: &[
        "\"chat_template\"",
        "\"bos_token\"",
        "\"eos_token\"",
        "\"pad_token\"",
        "\"unk_token\"",
        "\"added_tokens_decoder\"",
        "\"additional_special_tokens\"",
        "\"model_max_length\"",
        "\"name\"",
        "\"template\"",
        "\"default\"",
        "\"content\"",
        "{{ messages }}",
        "{% for m in messages %}",
        "{% endfor %}",
        "<|im_end|>",
        "1e30",
        "-1",
        "null",
    ],
    seeds: || {
        let mut out = builtin_file("tokenizer_config.json");
        out.extend(fixture_files(
            &[
                "tokenizers/qwen2.5/tokenizer_config.json",
                "tokenizers/qwen3/tokenizer_config.json",
                "tokenizers/mistral-7b-v0.1/tokenizer_config.json",
                "models/stories260K/hf/tokenizer_config.json",
                "configs/Qwen1.5-7B/tokenizer_config.json",
            ],
            64 << 10,
        ));
        out
    },
    harness: || {
        Ok(Box::new(InTokenizerDir {
            scratch: builtin_dir()?,
            file: "tokenizer_config.json",
        }))
    },
};

/// A chat template rendered with a conversation, and used for SFT tokenization.
struct TemplateHarness {
    tok: Tokenizer,
    data: Dataset,
}

impl Harness for TemplateHarness {
    fn run(&mut self, input: &[u8]) -> Outcome {
        let template = String::from_utf8_lossy(input);
        let opts = TemplateOptions {
            add_generation_prompt: true,
            ..TemplateOptions::default()
        };
        self.tok
            .render_template(&template, &messages(), &opts)
            .map_err(err)?;
        let sft_opts = SftOptions {
            template: template.into_owned(),
            max_length: 256,
            ..SftOptions::default()
        };
        sft(&self.data, &self.tok, &sft_opts, &CancelToken::new()).map_err(err)?;
        Ok(())
    }
}

/// Chat templates of the fixtures' tokenizer configs.
fn fixture_templates() -> Vec<Vec<u8>> {
    let configs = fixture_files(
        &[
            "tokenizers/qwen2.5/tokenizer_config.json",
            "tokenizers/qwen3/tokenizer_config.json",
            "tokenizers/mistral-7b-v0.1/tokenizer_config.json",
            "configs/Qwen1.5-7B/tokenizer_config.json",
        ],
        1 << 20,
    );
    configs
        .iter()
        .filter_map(|b| serde_json::from_slice::<Value>(b).ok())
        .filter_map(|v| {
            v.get("chat_template")?
                .as_str()
                .map(|s| s.as_bytes().to_vec())
        })
        .collect()
}

/// A Jinja chat template.
pub static CHAT_TEMPLATE: Target = Target {
    name: "chat_template",
    entry: "Tokenizer::render_template (chat_template::render) and data::sft::sft with `template`",
    max_len: 32 << 10,
    shape: Shape::Plain,
    dict: &[
        "{%",
        "%}",
        "{{",
        "}}",
        "{#",
        "#}",
        "{%- ",
        " -%}",
        "{% for m in messages %}",
        "{% endfor %}",
        "{% if ",
        "{% endif %}",
        "{% set x = ",
        "{% generation %}",
        "{% endgeneration %}",
        "{% macro f(x) %}{{ f(x) }}{% endmacro %}",
        "{{ f(1) }}",
        "messages",
        "m.content",
        "m['role']",
        "|tojson",
        "|tojson(indent=2)",
        "|tojson(indent=4000000000, sort_keys=true)",
        "|length",
        "|join",
        "* 100000",
        "~ x ~ x",
        "range(1000000)",
        "loop.index",
        "raise_exception('x')",
        "strftime_now('%Y')",
        "add_generation_prompt",
        "namespace(a=1)",
        ".split('a')",
        "<|im_start|>",
    ],
    seeds: || {
        let mut out = fixture_templates();
        if let Ok(t) = Tokenizer::builtin()
            && let Some(c) = t.chat_template
        {
            out.push(c.into_bytes());
        }
        out
    },
    harness: || {
        let tok = Tokenizer::builtin()?;
        let data = Dataset {
            rows: vec![json!({ "messages": messages() })],
            source: "fuzz".into(),
        };
        Ok(Box::new(TemplateHarness { tok, data }))
    },
};
