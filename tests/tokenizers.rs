//! Real tokenizers (Qwen2.5, Qwen3, Mistral, stories260K) against the goldens made with the
//! `tokenizers` library and jinja2 configured like transformers: every id, every decode, and the
//! chat-template renders byte for byte.
#![allow(clippy::unwrap_used)]

use qscript_runtime::testing::fixtures_dir;
use qscript_runtime::tokenizer::{TemplateOptions, Tokenizer};
use serde_json::Value;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

#[test]
fn encodings_decodings_and_chat_templates_match_the_goldens() {
    let Some(fx) = fixtures_dir("the real tokenizers") else {
        return;
    };
    for name in ["qwen2.5", "qwen3", "mistral-7b-v0.1"] {
        let dir = fx.join("tokenizers").join(name);
        let tok = Tokenizer::load(&dir, &qscript_runtime::cancel::CancelToken::new()).unwrap();
        let golden: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                .unwrap();
        assert_eq!(
            tok.vocab_size() as u64,
            golden["vocab_size_with_added"].as_u64().unwrap(),
            "{name}"
        );
        for case in golden["encode"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let got = tok.encode(text, true).unwrap();
            assert_eq!(got, ids(&case["ids"]), "{name}: {text:?}");
            assert_eq!(
                tok.decode(&got, false).unwrap(),
                case["decoded"].as_str().unwrap(),
                "{name}: {text:?}"
            );
        }
        let renders = golden["chat_template_renders"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        for case in renders {
            let opts = TemplateOptions {
                add_generation_prompt: case["kwargs"]["add_generation_prompt"]
                    .as_bool()
                    .unwrap_or(false),
                ..TemplateOptions::default()
            };
            let text = tok.apply_chat_template(&case["messages"], &opts).unwrap();
            assert_eq!(
                text,
                case["text"].as_str().unwrap(),
                "{name}: {}",
                case["name"]
            );
            assert_eq!(
                tok.encode(&text, false).unwrap(),
                ids(&case["ids"]),
                "{name}: {}",
                case["name"]
            );
        }
    }
}

#[test]
fn stories260k_tokenizer_matches_its_golden() {
    let Some(fx) = fixtures_dir("the stories260K tokenizer") else {
        return;
    };
    let root = fx.join("models/stories260K");
    let tok = Tokenizer::load(
        &root.join("hf"),
        &qscript_runtime::cancel::CancelToken::new(),
    )
    .unwrap();
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("golden_greedy.json")).unwrap())
            .unwrap();
    for (text, want) in golden["encode_examples"].as_object().unwrap() {
        assert_eq!(tok.encode(text, true).unwrap(), ids(want), "{text:?}");
    }
    let text = tok.decode(&ids(&golden["greedy_ids"]), true).unwrap();
    assert_eq!(text, golden["greedy_text"].as_str().unwrap());
    assert!(
        tok.pad_is_eos_fallback,
        "stories260K has no pad token: eos stands in"
    );
    assert_eq!(tok.pad_token.as_deref(), Some("</s>"));
}

/// The chat template of Llama-2-chat (tokenizer_config.json of meta-llama/Llama-2-7b-chat-hf).
const LLAMA2_TEMPLATE: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

#[test]
fn a_template_that_raises_shows_its_message() {
    let Some(fx) = fixtures_dir("the Mistral tokenizer") else {
        return;
    };
    let mut tok = Tokenizer::load(
        &fx.join("tokenizers/mistral-7b-v0.1"),
        &qscript_runtime::cancel::CancelToken::new(),
    )
    .unwrap();
    let none = tok
        .apply_chat_template(&serde_json::json!([]), &TemplateOptions::default())
        .unwrap_err();
    assert!(
        none.to_string()
            .contains("this tokenizer has no `chat_template`"),
        "{none}"
    );
    tok.chat_template = Some(LLAMA2_TEMPLATE.into());
    let ok: Value = serde_json::json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": " hi "}, {"role": "assistant", "content": "hello"}]);
    let text = tok
        .apply_chat_template(&ok, &TemplateOptions::default())
        .unwrap();
    assert_eq!(
        text,
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n hi [/INST] hello </s>"
    );
    let bad: Value =
        serde_json::json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]);
    let e = tok
        .apply_chat_template(&bad, &TemplateOptions::default())
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("chat template: Conversation roles must alternate user/assistant"),
        "{e}"
    );
}

/// Each token's bytes (a log-probability's `bytes`) put together give the text's bytes, split
/// characters included: byte-level BPE (Qwen2.5) through GPT-2's byte table, SentencePiece with
/// byte fallback (Mistral) through `▁` and `<0xNN>`.
#[test]
fn token_bytes_put_together_give_the_text() {
    let Some(fx) = fixtures_dir("the real tokenizers") else {
        return;
    };
    let text = "Hello 你好, wörld 🦀!";
    for (name, prefix) in [("qwen2.5", ""), ("mistral-7b-v0.1", " ")] {
        let dir = fx.join("tokenizers").join(name);
        let tok = Tokenizer::load(&dir, &qscript_runtime::cancel::CancelToken::new()).unwrap();
        let ids = tok.encode(text, false).unwrap();
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| tok.token_bytes(i).unwrap())
            .collect();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            format!("{prefix}{text}"),
            "{name}: {ids:?}"
        );
        // Some token holds part of a character: its own decode cannot say it, its bytes do.
        assert!(
            ids.iter()
                .any(|&i| std::str::from_utf8(&tok.token_bytes(i).unwrap()).is_err()),
            "{name}: no split character in {ids:?}"
        );
    }
}
