//! Tokenizers: `tokenizer.json` through the `tokenizers` crate, plus `tokenizer_config.json` (special
//! tokens, the chat template). Also a byte-level tokenizer built in code, with ChatML special
//! tokens, for the built-in tiny models.

use std::path::Path;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::chat_template;
use crate::{Error, Result};

/// Whether ids of a tokenizer of `tokens` tokens all have a row in a model's embedding of
/// `rows` rows: the one vocabulary check, for a tokenizer given with a model, or (with
/// `dataset`) for the tokenizer that made a dataset.
pub fn check_fits(tokens: usize, rows: usize, dataset: Option<&str>) -> Result<()> {
    if tokens <= rows {
        return Ok(());
    }
    Err(Error::InvalidArgument(match dataset {
        Some(source) => format!(
            "`{source}` was tokenized with a tokenizer of {tokens} tokens and the model's \
             embedding has {rows} rows: ids from {rows} on have no embedding; tokenize with the \
             model's own tokenizer"
        ),
        None => format!(
            "the tokenizer has {tokens} tokens and the model's embedding {rows} rows: ids from \
             {rows} on have no embedding; use the model's own tokenizer"
        ),
    }))
}

/// A token in `tokenizer_config.json`: a string or `{"content": ...}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Text(String),
    Added { content: String },
}

impl TokenSpec {
    fn text(self) -> String {
        match self {
            TokenSpec::Text(s) | TokenSpec::Added { content: s } => s,
        }
    }
}

/// `chat_template`: one string, or named templates.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum TemplateSpec {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Clone, Debug, Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct TokenizerConfig {
    #[serde(default)]
    bos_token: Option<TokenSpec>,
    #[serde(default)]
    eos_token: Option<TokenSpec>,
    #[serde(default)]
    pad_token: Option<TokenSpec>,
    #[serde(default)]
    unk_token: Option<TokenSpec>,
    #[serde(default)]
    chat_template: Option<TemplateSpec>,
}

/// Options of `apply_chat_template`, with transformers' names. Other keys are passed to the
/// template as variables (`enable_thinking`, `tools`, ...).
#[derive(Clone, Debug, Default)]
pub struct TemplateOptions {
    /// Append the assistant turn's opening.
    pub add_generation_prompt: bool,
    /// Extra template variables.
    pub extra: serde_json::Map<String, Value>,
}

/// A tokenizer with its special tokens and chat template.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Beginning-of-sequence token.
    pub bos_token: Option<String>,
    /// End-of-sequence token.
    pub eos_token: Option<String>,
    /// Padding token (eos when the config has none; see [`Tokenizer::pad_is_eos_fallback`]).
    pub pad_token: Option<String>,
    /// Unknown token.
    pub unk_token: Option<String>,
    /// The Jinja chat template.
    pub chat_template: Option<String>,
    /// True when the config had no pad token and eos stands in for it (as seed recipes do).
    pub pad_is_eos_fallback: bool,
    /// The file the chat template came from (`tokenizer_config.json` or `chat_template.jinja`).
    pub template_source: Option<std::path::PathBuf>,
    /// The `tokenizer.json` it was loaded from (`None` for one built in code).
    file: Option<std::path::PathBuf>,
    /// Every key of the `tokenizer_config.json` it was loaded from, written back on save
    /// (`model_max_length`, `add_bos_token`, `additional_special_tokens`, ...).
    config: serde_json::Map<String, Value>,
    /// The chat template examples were made with (`data::sft`'s `template`), saved in place of
    /// the tokenizer's own; shared by the clones of this tokenizer.
    trained_template: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

/// The most backtracking steps one regex search of a tokenizer's pre-tokenizer may take (a
/// catastrophic pattern such as `(a|aa)+$` on a long record stops at about a second, as an error
/// naming the record, instead of running for hours deaf to Ctrl-C). Onig's default bounds one
/// match attempt (10M) but not a search over every start position.
const REGEX_SEARCH_BUDGET: u32 = 50_000_000;

/// Sets [`REGEX_SEARCH_BUDGET`] for the process (once).
fn budget_regexes() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sets one global integer of oniguruma's; no pointer, no precondition.
        #[allow(unsafe_code)]
        unsafe {
            onig_sys::onig_set_retry_limit_in_search(REGEX_SEARCH_BUDGET.into());
        }
    });
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` and `chat_template.jinja`
    /// from `dir`. Building the tokenizer (seconds for a large vocabulary) answers `cancel`
    /// within a fraction of a second.
    pub fn load(dir: &Path, cancel: &crate::cancel::CancelToken) -> Result<Self> {
        budget_regexes();
        let file = dir.join("tokenizer.json");
        if !file.is_file() {
            return Err(Error::io(
                &file,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no `tokenizer.json` here"),
            ));
        }
        // Read through the sandbox's check on the opened file, then parsed from the bytes.
        let bytes = crate::sandbox::read(&file)?;
        check_charsmaps(&bytes, &file)?;
        // A hostile file can make `tokenizers` panic (a `Precompiled` charsmap too short for its
        // trie, for one): caught, and named as the file's fault.
        let mut inner = crate::cancel::detached(cancel, move || {
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| e.to_string())
        })?
        .map_err(|_| {
            Error::Tokenizer(format!(
                "`{}`: the tokenizer cannot be built from this file (a broken normalizer, \
                     pre-tokenizer or model)",
                file.display()
            ))
        })?
        .map_err(|e| Error::Tokenizer(format!("`{}`: {e}", file.display())))?;
        // The file's own padding and truncation are dropped, as transformers drops them when it
        // encodes without padding or truncation asked for (qscript pads and cuts batches
        // itself). Kept, a `Fixed` padding of 10^12 allocated terabytes per text (an abort).
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(format!("`{}`: {e}", file.display())))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let (cfg, raw): (TokenizerConfig, serde_json::Map<String, Value>) = if cfg_path.is_file() {
            (
                crate::files::read_config(&cfg_path)?,
                crate::files::read_config(&cfg_path)?,
            )
        } else {
            Default::default()
        };
        let mut source = cfg.chat_template.is_some().then(|| cfg_path.clone());
        let mut chat_template = match cfg.chat_template {
            Some(TemplateSpec::One(t)) => Some(t),
            Some(TemplateSpec::Named(v)) => v
                .iter()
                .find(|t| t.name == "default")
                .or(v.first())
                .map(|t| t.template.clone()),
            None => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if chat_template.is_none() && jinja.is_file() {
            chat_template = Some(crate::files::read_text(&jinja)?);
            source = Some(jinja);
        }
        let mut tok = Self::assemble(
            inner,
            cfg.bos_token.map(TokenSpec::text),
            cfg.eos_token.map(TokenSpec::text),
            cfg.pad_token.map(TokenSpec::text),
            cfg.unk_token.map(TokenSpec::text),
            chat_template,
        );
        tok.template_source = source;
        tok.file = Some(file);
        tok.config = raw;
        Ok(tok)
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        bos_token: Option<String>,
        eos_token: Option<String>,
        pad_token: Option<String>,
        unk_token: Option<String>,
        chat_template: Option<String>,
    ) -> Self {
        let pad_is_eos_fallback = pad_token.is_none() && eos_token.is_some();
        let pad_token = pad_token.or_else(|| eos_token.clone());
        Self {
            inner,
            bos_token,
            eos_token,
            pad_token,
            unk_token,
            chat_template,
            pad_is_eos_fallback,
            template_source: None,
            file: None,
            config: serde_json::Map::new(),
            trained_template: std::sync::Arc::default(),
        }
    }

    /// The built-in byte-level tokenizer: 256 byte tokens plus `<|endoftext|>` (eos),
    /// `<|im_start|>` and `<|im_end|>`, with the ChatML template.
    pub fn builtin() -> Result<Self> {
        let vocab: serde_json::Map<String, Value> = byte_chars()
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), json!(i)))
            .collect();
        let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
        let added: Vec<Value> = specials
            .iter()
            .enumerate()
            .map(|(i, t)| json!({"id": 256 + i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
            .collect();
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "ignore_merges": false, "vocab": vocab, "merges": []}
        });
        let inner: tokenizers::Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e: tokenizers::Error| Error::Tokenizer(format!("built-in tokenizer: {e}")))?;
        Ok(Self::assemble(
            inner,
            None,
            Some("<|endoftext|>".into()),
            Some("<|endoftext|>".into()),
            None,
            Some(chat_template::CHATML.into()),
        ))
    }

    /// Token ids of `text`; `add_special_tokens` as in transformers (BOS for Llama, for instance).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self.encoding(text, add_special_tokens)?.get_ids().to_vec())
    }

    /// Token strings of `text` (for display).
    pub fn tokens(&self, text: &str, add_special_tokens: bool) -> Result<Vec<String>> {
        Ok(self
            .encoding(text, add_special_tokens)?
            .get_tokens()
            .to_vec())
    }

    /// `tokenizers`' encoding of `text`; a panic inside (a regex over onig's match limit, a
    /// broken normalizer) is an error naming the tokenizer file.
    fn encoding(&self, text: &str, add_special_tokens: bool) -> Result<tokenizers::Encoding> {
        crate::panic::catch(|| self.inner.encode(text, add_special_tokens))
            .map_err(|_| self.broken("encoding a text"))?
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The error for a panic inside `tokenizers` while `doing` something.
    fn broken(&self, doing: &str) -> Error {
        let file = match &self.file {
            Some(f) => format!("`{}`", f.display()),
            None => "the built-in tokenizer".into(),
        };
        Error::Tokenizer(format!(
            "{file} failed while {doing}: its normalizer, pre-tokenizer or model is \
             broken, or a regex in it ran over its match limit"
        ))
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        crate::panic::catch(|| self.inner.decode(ids, skip_special_tokens))
            .map_err(|_| self.broken("decoding token ids"))?
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// The bytes token `id` stands for (a log-probability's `bytes` in OpenAI's API; one token
    /// may hold part of a character): a byte-level BPE token's characters mapped back through
    /// GPT-2's byte table, a byte-fallback token `<0xNN>` its byte, a SentencePiece piece with
    /// `▁` read as a space. `None` for an id outside the vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        use tokenizers::decoders::DecoderWrapper;
        let t = self.inner.id_to_token(id)?;
        let byte_level = match self.inner.get_decoder() {
            Some(DecoderWrapper::ByteLevel(_)) => true,
            Some(DecoderWrapper::Sequence(s)) => s
                .get_decoders()
                .iter()
                .any(|d| matches!(d, DecoderWrapper::ByteLevel(_))),
            _ => false,
        };
        if byte_level {
            static TABLE: std::sync::OnceLock<std::collections::HashMap<char, u8>> =
                std::sync::OnceLock::new();
            let table = TABLE.get_or_init(|| {
                byte_chars()
                    .into_iter()
                    .enumerate()
                    .map(|(b, c)| (c, b as u8))
                    .collect()
            });
            let mut out = Vec::with_capacity(t.len());
            for c in t.chars() {
                match table.get(&c) {
                    Some(b) => out.push(*b),
                    None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
            return Some(out);
        }
        if let Some(hex) = t.strip_prefix("<0x").and_then(|h| h.strip_suffix('>'))
            && hex.len() == 2
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            return Some(vec![b]);
        }
        Some(t.replace('\u{2581}', " ").into_bytes())
    }

    /// The id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The eos id.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// The pad id.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Vocabulary size with added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Renders `messages` through the chat template, as transformers' `apply_chat_template(...,
    /// tokenize=False)`.
    pub fn apply_chat_template(&self, messages: &Value, opts: &TemplateOptions) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::Template("this tokenizer has no `chat_template`; pass a template or use one with `chat_template` in tokenizer_config.json".into())
        })?;
        self.render_template(template, messages, opts)
    }

    /// Renders `messages` through `template` with this tokenizer's special tokens (`bos_token`,
    /// `eos_token`, `pad_token`) in scope.
    pub fn render_template(
        &self,
        template: &str,
        messages: &Value,
        opts: &TemplateOptions,
    ) -> Result<String> {
        let mut ctx = opts.extra.clone();
        ctx.insert("messages".into(), messages.clone());
        ctx.insert(
            "add_generation_prompt".into(),
            json!(opts.add_generation_prompt),
        );
        ctx.insert(
            "bos_token".into(),
            json!(self.bos_token.clone().unwrap_or_default()),
        );
        ctx.insert(
            "eos_token".into(),
            json!(self.eos_token.clone().unwrap_or_default()),
        );
        if let Some(p) = &self.pad_token {
            ctx.entry("pad_token").or_insert(json!(p));
        }
        chat_template::render(template, &Value::Object(ctx))
    }

    /// Records `template` as the chat template examples were made with: [`Tokenizer::save`]
    /// writes it (as TRL and LLaMA-Factory save the template they trained with).
    pub fn set_trained_template(&self, template: &str) {
        if let Ok(mut t) = self.trained_template.lock() {
            *t = Some(template.to_string());
        }
    }

    /// The chat template a save writes: the one examples were made with, else the tokenizer's.
    pub fn saved_template(&self) -> Option<String> {
        self.trained_template
            .lock()
            .ok()
            .and_then(|t| t.clone())
            .or_else(|| self.chat_template.clone())
    }

    /// The tokenizer as `tokenizer.json` holds it (its model's vocabulary and merges, the added
    /// tokens), for exporters that write it another way (GGUF).
    pub fn json(&self) -> Result<Value> {
        let text = self
            .inner
            .to_string(false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` to `dir`: every key of the original
    /// config, with the special tokens and the chat template (the one trained with) set.
    pub fn save(&self, dir: &Path) -> Result<()> {
        crate::sandbox::create_dir_all(dir)?;
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        crate::sandbox::write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
        let mut cfg = self.config.clone();
        let trained = self.trained_template.lock().ok().and_then(|t| t.clone());
        // A list of named templates is kept as it was unless training used another template.
        let keep_list = trained.is_none() && cfg.get("chat_template").is_some_and(Value::is_array);
        let mut put = |k: &str, v: &Option<String>| {
            cfg.insert(k.into(), v.as_ref().map_or(Value::Null, |s| json!(s)));
        };
        put("bos_token", &self.bos_token);
        put("eos_token", &self.eos_token);
        put(
            "pad_token",
            &if self.pad_is_eos_fallback {
                None
            } else {
                self.pad_token.clone()
            },
        );
        put("unk_token", &self.unk_token);
        if !keep_list {
            put("chat_template", &self.saved_template());
        }
        let text = serde_json::to_string_pretty(&Value::Object(cfg)).unwrap_or_default();
        crate::sandbox::write_atomic(&dir.join("tokenizer_config.json"), text.as_bytes())
    }
}

/// Refuses a `Precompiled` normalizer whose `precompiled_charsmap` declares a trie longer than
/// the charsmap itself: `tokenizers` (spm_precompiled) reserves the declared size before it reads
/// it, so 4 hostile bytes ask for up to 8 GiB and abort the process. The file is refused first,
/// naming the field.
fn check_charsmaps(bytes: &[u8], file: &Path) -> Result<()> {
    use base64::Engine;
    fn walk(v: &Value, path: &mut Vec<String>, file: &Path) -> Result<()> {
        match v {
            Value::Object(o) => {
                if o.get("type").and_then(Value::as_str) == Some("Precompiled")
                    && let Some(map) = o.get("precompiled_charsmap").and_then(Value::as_str)
                    && let Ok(blob) = base64::engine::general_purpose::STANDARD.decode(map)
                {
                    let declared = blob
                        .first_chunk::<4>()
                        .map_or(0, |b| u32::from_le_bytes(*b) as usize);
                    if blob.len() < 4 || declared > blob.len() - 4 {
                        return Err(Error::Tokenizer(format!(
                            "`{}`: {}.precompiled_charsmap declares a trie of {declared} bytes but holds \
                             {} after its 4-byte size: the file is broken",
                            file.display(),
                            path.join("."),
                            blob.len().saturating_sub(4)
                        )));
                    }
                }
                for (k, x) in o {
                    path.push(k.clone());
                    walk(x, path, file)?;
                    path.pop();
                }
            }
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    path.push(i.to_string());
                    walk(x, path, file)?;
                    path.pop();
                }
            }
            _ => {}
        }
        Ok(())
    }
    // Not JSON: `tokenizers` says so below.
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return Ok(());
    };
    walk(&v, &mut Vec::new(), file)
}

/// GPT-2's byte -> printable char table (index = byte).
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            let code = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(code).unwrap_or('?')
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Loading answers a cancel: the build runs detached while the caller polls the token
    /// (here set before the call, so the load stops at its first poll).
    #[test]
    fn loading_answers_a_cancel() {
        let Some(fx) = crate::testing::fixtures_dir("loading_answers_a_cancel") else {
            return;
        };
        let dir = fx.join("tokenizers/qwen2.5");
        let cancel = crate::cancel::CancelToken::new();
        cancel.cancel();
        assert!(matches!(
            Tokenizer::load(&dir, &cancel),
            Err(Error::Cancelled)
        ));
        cancel.reset();
        assert!(Tokenizer::load(&dir, &cancel).is_ok());
    }

    #[test]
    fn builtin_round_trips_any_text_and_knows_chatml() {
        let t = Tokenizer::builtin().unwrap();
        assert_eq!(t.vocab_size(), 259);
        for text in ["Hello, world!", "你好，世界", "  two\n\nlines\t"] {
            let ids = t.encode(text, true).unwrap();
            assert_eq!(ids.len(), text.len(), "one token per byte");
            assert_eq!(t.decode(&ids, false).unwrap(), text);
        }
        let ids = t.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
        assert_eq!(ids[0], 257);
        assert_eq!(*ids.last().unwrap(), 258);
        assert_eq!(t.eos_id(), Some(256));
        assert_eq!(t.pad_id(), Some(256));
    }

    /// A `tokenizer.json` whose own padding is `Fixed` to 10^12 (or a multiple of 10^12) once
    /// aborted the process allocating 4 TB per text; its padding and truncation are dropped on
    /// load, as transformers drops them, and texts encode to their own tokens.
    #[test]
    fn a_file_s_own_padding_and_truncation_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let file = |padding: Value, truncation: Value| {
            let v = serde_json::json!({
                "version": "1.0", "truncation": truncation, "padding": padding,
                "added_tokens": [], "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
                "post_processor": null, "decoder": null,
                "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "hello": 1, "world": 2}, "unk_token": "<unk>"}
            });
            std::fs::write(dir.path().join("tokenizer.json"), v.to_string()).unwrap();
            Tokenizer::load(dir.path(), &crate::cancel::CancelToken::new()).unwrap()
        };
        let pad = |strategy: Value, multiple: Value| {
            serde_json::json!({"strategy": strategy, "direction": "Right", "pad_to_multiple_of": multiple,
                "pad_id": 0, "pad_type_id": 0, "pad_token": "<unk>"})
        };
        for padding in [
            pad(
                serde_json::json!({"Fixed": 1_000_000_000_000u64}),
                Value::Null,
            ),
            pad(
                serde_json::json!("BatchLongest"),
                serde_json::json!(1_000_000_000_000u64),
            ),
        ] {
            let t = file(padding, Value::Null);
            assert_eq!(t.encode("hello world", false).unwrap(), [1, 2]);
        }
        let cut = serde_json::json!({"direction": "Right", "max_length": 1, "strategy": "LongestFirst", "stride": 0});
        let t = file(Value::Null, cut);
        assert_eq!(t.encode("hello world", false).unwrap(), [1, 2]);
    }
}
