//! `tokenizer`: HF tokenizers, special tokens and chat templates.

#[allow(clippy::wildcard_imports)]
use rhai::plugin::*;

/// The `tokenizer` module and the `Tokenizer` methods.
// rhai's macro unwraps the `&mut` receiver of functions that also take a NativeCallContext.
#[allow(clippy::unwrap_used)]
#[export_module]
pub mod tokenizer_module {
    use std::sync::Arc;

    use qscript_runtime::tokenizer::{TemplateOptions, Tokenizer};
    use rhai::{Array, EvalAltResult, Map};

    use crate::context::{Memo, RunContext};
    use crate::error::{to_rhai, to_rhai_at};
    use crate::handles::TokenizerHandle;
    use crate::options::{from_ids, to_ids};

    type Res<T> = Result<T, Box<EvalAltResult>>;

    /// Loads `tokenizer.json` and `tokenizer_config.json` (special tokens, chat template) from a
    /// directory, e.g. a model checkpoint. A missing pad token falls back to eos, with a notice.
    /// Memoized by path and file contents.
    ///
    /// ```rhai
    /// tokenizer::builtin().save("tok");
    /// let tok = tokenizer::load(io::output_dir() + "/tok");
    /// assert(tok.eos_token == "<|endoftext|>");
    /// ```
    #[rhai_fn(return_raw)]
    pub fn load(ctx: NativeCallContext, dir: &str) -> Res<TokenizerHandle> {
        let rc = RunContext::of(&ctx)?;
        let real = rc
            .resolve_repo_dir(dir, qscript_runtime::hub::RepoType::Model, None)
            .map_err(to_rhai_at(&ctx))?;
        let key =
            Memo::key("tokenizer::load", &real.to_string_lossy(), &[&real]).map_err(to_rhai)?;
        let value = rc.memo.get_or_try_insert(&key, || {
            let tok = Tokenizer::load(&real, &rc.cancel).map_err(to_rhai_at(&ctx))?;
            if tok.pad_is_eos_fallback {
                rc.sink.err(&format!(
                    "notice: the tokenizer has no pad token; using the eos token `{}` for padding",
                    tok.eos_token.as_deref().unwrap_or_default()
                ));
            }
            Ok::<_, Box<EvalAltResult>>(Dynamic::from(TokenizerHandle(Arc::new(tok))))
        })?;
        Ok(value.cast())
    }

    /// The built-in byte-level tokenizer (256 byte tokens plus `<|endoftext|>`, `<|im_start|>`,
    /// `<|im_end|>`, ChatML template) that goes with `model::tiny`.
    ///
    /// ```rhai
    /// let tok = tokenizer::builtin();
    /// assert(tok.vocab_size == 259);
    /// ```
    #[rhai_fn(return_raw)]
    pub fn builtin() -> Res<TokenizerHandle> {
        Ok(TokenizerHandle(Arc::new(
            Tokenizer::builtin().map_err(to_rhai)?,
        )))
    }

    /// Token ids of `text`, with the tokenizer's special tokens added (BOS for Llama), as
    /// transformers' `tokenizer.encode(text)`.
    ///
    /// ```rhai
    /// let ids = tokenizer::builtin().encode("hi");
    /// assert(ids == [104, 105]);
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn encode(tok: &mut TokenizerHandle, text: &str) -> Res<Array> {
        Ok(from_ids(&tok.0.encode(text, true).map_err(to_rhai)?))
    }

    /// Token ids of `text`; `add_special_tokens` as in transformers.
    ///
    /// ```rhai
    /// let ids = tokenizer::builtin().encode("<|im_end|>", false);
    /// assert(ids == [258]);
    /// ```
    #[rhai_fn(global, pure, name = "encode", return_raw)]
    pub fn encode_with(
        tok: &mut TokenizerHandle,
        text: &str,
        add_special_tokens: bool,
    ) -> Res<Array> {
        Ok(from_ids(
            &tok.0.encode(text, add_special_tokens).map_err(to_rhai)?,
        ))
    }

    /// Text of token ids, special tokens included.
    ///
    /// ```rhai
    /// let tok = tokenizer::builtin();
    /// assert(tok.decode(tok.encode("你好")) == "你好");
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn decode(tok: &mut TokenizerHandle, ids: Array) -> Res<String> {
        tok.0.decode(&to_ids("ids", &ids)?, false).map_err(to_rhai)
    }

    /// Text of token ids; `skip_special_tokens` drops `<|im_end|>` and the like.
    ///
    /// ```rhai
    /// let tok = tokenizer::builtin();
    /// assert(tok.decode([104, 105, 258], true) == "hi");
    /// ```
    #[rhai_fn(global, pure, name = "decode", return_raw)]
    pub fn decode_with(
        tok: &mut TokenizerHandle,
        ids: Array,
        skip_special_tokens: bool,
    ) -> Res<String> {
        tok.0
            .decode(&to_ids("ids", &ids)?, skip_special_tokens)
            .map_err(to_rhai)
    }

    /// Renders `messages` (`[#{ role, content }]`) through the chat template, ending with the
    /// assistant's opening (`add_generation_prompt: true`).
    ///
    /// ```rhai
    /// let text = tokenizer::builtin().apply_chat_template([#{ role: "user", content: "hi" }]);
    /// assert(text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn apply_chat_template(
        ctx: NativeCallContext,
        tok: &mut TokenizerHandle,
        messages: Array,
    ) -> Res<String> {
        let mut opts = Map::new();
        opts.insert("add_generation_prompt".into(), true.into());
        apply_chat_template_with(ctx, tok, messages, opts)
    }

    /// Renders `messages` through the chat template with transformers' options:
    /// `add_generation_prompt` (default false here, as in transformers) and any template variable
    /// (`enable_thinking: false` for Qwen3, `tools`, ...). A template that raises reports its
    /// message.
    ///
    /// ```rhai
    /// let tok = tokenizer::builtin();
    /// let text = tok.apply_chat_template([#{ role: "user", content: "hi" }], #{ add_generation_prompt: false });
    /// assert(text == "<|im_start|>user\nhi<|im_end|>\n");
    /// ```
    #[rhai_fn(global, pure, name = "apply_chat_template", return_raw)]
    pub fn apply_chat_template_with(
        ctx: NativeCallContext,
        tok: &mut TokenizerHandle,
        messages: Array,
        opts: Map,
    ) -> Res<String> {
        let messages: serde_json::Value =
            rhai::serde::from_dynamic(&Dynamic::from_array(messages))?;
        let mut extra: serde_json::Map<String, serde_json::Value> =
            rhai::serde::from_dynamic(&Dynamic::from_map(opts))?;
        let add_generation_prompt = extra
            .remove("add_generation_prompt")
            .is_some_and(|v| v.as_bool().unwrap_or(false));
        let opts = TemplateOptions {
            add_generation_prompt,
            extra,
        };
        tok.0
            .apply_chat_template(&messages, &opts)
            .map_err(to_rhai_at(&ctx))
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` under the output directory (every key
    /// of the original config kept; the chat template `data::sft` trained with, if it was given
    /// one) and says where.
    ///
    /// ```rhai
    /// tokenizer::builtin().save("my-tokenizer");
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn save(ctx: NativeCallContext, tok: &mut TokenizerHandle, dir: &str) -> Res<()> {
        let rc = RunContext::of(&ctx)?;
        let real = rc.resolve_write_dir(dir).map_err(to_rhai_at(&ctx))?;
        tok.0.save(&real).map_err(to_rhai_at(&ctx))?;
        rc.sink.err(&format!(
            "saved the tokenizer to `{}`",
            rc.sandbox.shown(&real).display()
        ));
        Ok(())
    }

    /// The end-of-sequence token, or `()`.
    #[rhai_fn(global, get = "eos_token", pure)]
    pub fn eos_token(tok: &mut TokenizerHandle) -> Dynamic {
        tok.0.eos_token.clone().map_or(Dynamic::UNIT, Dynamic::from)
    }

    /// The padding token (eos when the tokenizer has none), or `()`.
    #[rhai_fn(global, get = "pad_token", pure)]
    pub fn pad_token(tok: &mut TokenizerHandle) -> Dynamic {
        tok.0.pad_token.clone().map_or(Dynamic::UNIT, Dynamic::from)
    }

    /// The beginning-of-sequence token, or `()`.
    #[rhai_fn(global, get = "bos_token", pure)]
    pub fn bos_token(tok: &mut TokenizerHandle) -> Dynamic {
        tok.0.bos_token.clone().map_or(Dynamic::UNIT, Dynamic::from)
    }

    /// The id of the end-of-sequence token, or `()`.
    #[rhai_fn(global, get = "eos_id", pure)]
    pub fn eos_id(tok: &mut TokenizerHandle) -> Dynamic {
        tok.0
            .eos_id()
            .map_or(Dynamic::UNIT, |i| Dynamic::from(rhai::INT::from(i)))
    }

    /// The id of the padding token, or `()`.
    #[rhai_fn(global, get = "pad_id", pure)]
    pub fn pad_id(tok: &mut TokenizerHandle) -> Dynamic {
        tok.0
            .pad_id()
            .map_or(Dynamic::UNIT, |i| Dynamic::from(rhai::INT::from(i)))
    }

    /// Vocabulary size, added tokens included.
    #[rhai_fn(global, get = "vocab_size", pure)]
    pub fn vocab_size(tok: &mut TokenizerHandle) -> rhai::INT {
        rhai::INT::try_from(tok.0.vocab_size()).unwrap_or(rhai::INT::MAX)
    }

    /// `Tokenizer(vocab 259, eos <|endoftext|>, pad <|endoftext|>, chat template)`.
    ///
    /// ```rhai
    /// print(tokenizer::builtin());
    /// ```
    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn describe(tok: &mut TokenizerHandle) -> String {
        let t = &tok.0;
        format!(
            "Tokenizer(vocab {}, eos {}, pad {}{})",
            t.vocab_size(),
            t.eos_token.as_deref().unwrap_or("none"),
            t.pad_token.as_deref().unwrap_or("none"),
            if t.chat_template.is_some() {
                ", chat template"
            } else {
                ""
            }
        )
    }
}
