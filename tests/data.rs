//! Data on the real fixtures: huanhuan (alpaca), LLaMA-Factory's dataset_info.json demos (alpaca,
//! sharegpt with tool calls, custom tags), FastChat ShareGPT, EmoLLM messages and `[{human,
//! assistant}]` conversations, tokenized with the real Qwen2.5 and Qwen3 tokenizers. Snapshots show
//! the rendered prompt with the learned spans in `[[...]]`.
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::path::PathBuf;

use insta::assert_snapshot;
use qscript_runtime::testing::fixtures_dir;
use support::Env;

/// A session that may read the fixtures.
fn session(env: &Env, fx: &std::path::Path) -> qscript_stdlib::Session {
    let mut opts = env.options();
    opts.allow_read.push(fx.to_path_buf());
    env.session_with(&opts)
}

/// Record `i` of tokenized dataset `var`, decoded span by span, learned spans in `[[...]]`.
fn masked(s: &mut qscript_stdlib::Session, var: &str, i: usize) -> String {
    let code = format!(
        r#"let ex = {var}[{i}];
let out = ""; let cur = []; let learn = false;
for k in 0..ex.input_ids.len() {{
    let l = ex.labels[k] != -100;
    if l != learn && cur.len() > 0 {{ out += if learn {{ "[[" + tok.decode(cur) + "]]" }} else {{ tok.decode(cur) }}; cur = []; }}
    learn = l; cur.push(ex.input_ids[k]);
}}
if cur.len() > 0 {{ out += if learn {{ "[[" + tok.decode(cur) + "]]" }} else {{ tok.decode(cur) }}; }}
`${{ex.input_ids.len()}} tokens: ${{ex.input_ids}}\n${{out}}`"#
    );
    let v = s.eval(&code).unwrap().unwrap();
    let text = v
        .strip_prefix("=> \"")
        .and_then(|t| t.strip_suffix("\" : string"))
        .unwrap()
        .to_string();
    text.replace("\\n", "\n").replace("\\\"", "\"")
}

fn setup(env: &Env) -> Option<(qscript_stdlib::Session, PathBuf)> {
    let fx = fixtures_dir("datasets and tokenizers")?;
    let mut s = session(env, &fx);
    s.eval(&format!("const FX = {:?};", fx.to_string_lossy()))
        .unwrap();
    s.eval(r#"let tok = tokenizer::load(FX + "/tokenizers/qwen2.5");"#)
        .unwrap();
    Some((s, fx))
}

#[test]
fn huanhuan_alpaca_to_masked_chatml() {
    let env = Env::new();
    let Some((mut s, _)) = setup(&env) else {
        return;
    };
    s.eval(
        r#"let raw = data::load(FX + "/datasets/huanhuan/huanhuan.json");
let msgs = data::to_messages(raw, #{ system: "现在你要扮演皇帝身边的女人--甄嬛" });
let ds = data::sft(msgs, tok, #{ max_length: 128 });"#,
    )
    .unwrap();
    let log = env.sink.take();
    assert!(
        log.contains("detected format `alpaca`: record 0 has `instruction` and `output`"),
        "{log}"
    );
    assert_eq!(
        s.eval("raw.len()").unwrap().as_deref(),
        Some("=> 3729 : i64")
    );
    assert_snapshot!("huanhuan_record0", masked(&mut s, "ds", 0));
    assert_snapshot!("huanhuan_stats", s.eval("ds.stats()").unwrap().unwrap());
    assert_snapshot!("huanhuan_log", log);
}

#[test]
fn seed_000_handwritten_mapping_equals_sft_with_its_template() {
    let env = Env::new();
    let Some((mut s, _)) = setup(&env) else {
        return;
    };
    s.eval(
        r#"const SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛";
let raw = data::load(FX + "/datasets/huanhuan/huanhuan.json").select(0..200);
// Seed 000, as users write it in Python, with tok.encode.
let by_hand = raw.map(|r| {
    let inst = tok.encode("<|im_start|>system\n" + SYSTEM + "<|im_end|>\n<|im_start|>user\n" + r.instruction + r.input + "<|im_end|>\n<|im_start|>assistant\n", false);
    let resp = tok.encode(r.output, false);
    let ids = inst + resp + [tok.pad_id];
    let labels = [];
    for x in inst { labels.push(-100); }
    labels += resp + [tok.pad_id];
    if ids.len() > 128 { ids = ids.extract(0, 128); labels = labels.extract(0, 128); }
    #{ input_ids: ids, labels: labels }
});
const SEED_TEMPLATE = "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}{{ pad_token }}{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
let by_sft = data::sft(data::to_messages(raw, #{ system: SYSTEM, input_separator: "" }), tok, #{ max_length: 128, template: SEED_TEMPLATE });"#,
    )
    .unwrap();
    // sft drops what truncation left without a label (HF would train on nothing there).
    let log = env.sink.take();
    assert!(
        log.contains("tokenized 199 examples (")
            && log.contains(", 1 dropped with every label masked)"),
        "{log}"
    );
    s.eval("by_hand = by_hand.filter(|r| r.labels.some(|l| l != -100));")
        .unwrap();
    assert_eq!(
        s.eval("by_hand.len()").unwrap().as_deref(),
        Some("=> 199 : i64")
    );
    let same = s
        .eval("let same = true; for i in 0..by_hand.len() { if by_hand[i].input_ids != by_sft[i].input_ids || by_hand[i].labels != by_sft[i].labels { same = false; } } same && by_hand.len() == by_sft.len()")
        .unwrap();
    let diff = s
        .eval("let d = (); for i in 0..by_hand.len() { if d == () && (by_hand[i].input_ids != by_sft[i].input_ids || by_hand[i].labels != by_sft[i].labels) { d = `${i}: ${by_hand[i]} vs ${by_sft[i]}`; } } d")
        .unwrap();
    assert_eq!(same.as_deref(), Some("=> true : bool"), "{diff:?}");
}

#[test]
fn llamafactory_dataset_info_entries() {
    let env = Env::new();
    let Some((mut s, _)) = setup(&env) else {
        return;
    };
    s.eval(r#"const INFO = FX + "/datasets/llamafactory/dataset_info.json";"#)
        .unwrap();
    for (name, var) in [
        ("alpaca_zh_demo", "a"),
        ("glaive_toolcall_en_demo", "g"),
        ("identity", "i"),
    ] {
        s.eval(&format!(r#"let {var} = data::sft(data::from_info(INFO, "{name}"), tok, #{{ max_length: 512 }});"#)).unwrap();
    }
    let log = env.sink.take();
    assert!(
        log.contains("data: `glaive_toolcall_en_demo`: 300 records, format `sharegpt`"),
        "{log}"
    );
    assert_snapshot!("lf_alpaca_zh_record0", masked(&mut s, "a", 0));
    assert_snapshot!("lf_glaive_toolcall_record0", masked(&mut s, "g", 0));
    // KTO data is never trained as SFT (issue 26): its `label: false` answers are undesirable.
    let e = s
        .eval(r#"data::sft(data::from_info(INFO, "kto_en_demo"), tok)"#)
        .unwrap_err();
    assert!(
        e.rendered.contains(
            "record 0 is KTO data (a boolean `label` marks each answer desirable or not), not \
             supervised fine-tuning: tokenize it with `data::preference(ds, tok)`"
        ),
        "{}",
        e.rendered
    );
    let e = s
        .eval(r#"data::from_info(INFO, "alpaca_demo")"#)
        .unwrap_err();
    assert!(
        e.rendered.contains("no entry `alpaca_demo`; close names: "),
        "{}",
        e.rendered
    );
}

/// Pretraining text as LLaMA-Factory (`c4_demo`, `wiki_demo.txt`, `stage: pt`) and TRL (`text`,
/// `dataset_text_field`) have it: every token learned, eos appended, packed in a run.
#[test]
fn pretraining_text_trains_every_token_and_packs() {
    let env = Env::new();
    let Some((mut s, _)) = setup(&env) else {
        return;
    };
    s.eval(
        r#"const INFO = FX + "/datasets/llamafactory/dataset_info.json";
let c4 = data::sft(data::from_info(INFO, "c4_demo"), tok, #{ max_length: 256 });
let wiki = data::sft(data::from_info(INFO, "wiki_demo"), tok, #{ max_length: 256 });
let raw = data::sft(data::load(FX + "/datasets/llamafactory/c4_demo.jsonl"), tok, #{ max_length: 256 });"#,
    )
    .unwrap();
    let log = env.sink.take();
    for want in [
        "data: `c4_demo`: 300 records, format `text` (pretraining text, column `text`) from dataset_info.json",
        "data: `wiki_demo`: 30 records, format `text`",
        "data: 300 records are plain text (`text`): every token learned, eos appended",
    ] {
        assert!(log.contains(want), "{want}\n{log}");
    }
    let every = s
        .eval(
            "let ok = c4.len() == 300 && wiki.len() == 30; for d in [c4, wiki, raw] { for i in 0..d.len() { \
             let e = d[i]; if e.labels != e.input_ids { ok = false; } \
             if e.input_ids.len() < 256 && e.input_ids[-1] != tok.eos_id { ok = false; } } } \
             ok && c4[5].input_ids == raw[5].input_ids",
        )
        .unwrap();
    assert_eq!(every.as_deref(), Some("=> true : bool"));
    // The first document, as LLaMA-Factory's `stage: pt` makes it: its text and eos.
    let doc = s
        .eval("tok.decode(wiki[1].input_ids.extract(0, 8)) + \"|\" + tok.decode(c4[0].input_ids.extract(c4[0].input_ids.len() - 3))")
        .unwrap()
        .unwrap();
    assert!(
        doc.starts_with("=> \"Autism is a neurodevelopmental"),
        "{doc}"
    );
    assert!(doc.ends_with("<|im_end|>\" : string"), "{doc}");
    // Chat conversion says where text goes.
    let e = s
        .eval(r#"data::to_messages(data::load(FX + "/datasets/llamafactory/c4_demo.jsonl"))"#)
        .unwrap_err();
    assert!(
        e.rendered.contains("plain text (`text` records, for pretraining) needs no conversion: give it to `data::sft` as it is"),
        "{}",
        e.rendered
    );
    // Packed in a run.
    s.eval(
        r#"let pt = data::sft(data::load(FX + "/datasets/llamafactory/wiki_demo.txt").select(0..12), tokenizer::builtin(), #{ max_length: 48 });
train::fit(lora::attach(model::tiny(), #{ r: 2 }), pt, #{ packing: true, max_length: 128, max_steps: 2, save_steps: 0 });"#,
    )
    .unwrap();
    let log = env.sink.take();
    assert!(
        log.contains("packing: 12 examples into 6 rows of up to 128 tokens"),
        "{log}"
    );
}

/// An exported tokenizer serves as the original does: every key of Qwen3's `tokenizer_config.json`
/// kept, the chat template `data::sft` trained with saved, and `save` says where it wrote.
#[test]
fn saved_tokenizers_keep_their_config_and_the_training_template() {
    let env = Env::new();
    let Some((mut s, fx)) = setup(&env) else {
        return;
    };
    s.eval(
        r#"let q3 = tokenizer::load(FX + "/tokenizers/qwen3");
q3.save("q3");
const T = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
io::write_text("a.json", `[{"instruction": "hi", "output": "hello"}]`);
let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/a.json")), q3, #{ template: T });
q3.save("served");
model::tiny().save("m", tokenizer::builtin());
lora::attach(model::tiny(), #{ r: 2 }).save("adapter");"#,
    )
    .unwrap();
    let log = env.sink.take();
    assert!(log.contains("saved the tokenizer to `"), "{log}");
    for want in [
        "saved the tokenizer to `[TMP]/out/q3`",
        "saved the model and its tokenizer to `[TMP]/out/m`",
        "saved the LoRA adapter (PEFT's layout) to `[TMP]/out/adapter`",
    ] {
        assert!(env.filter(&log).contains(want), "{want}\n{log}");
    }
    let read = |p: PathBuf| -> serde_json::Map<String, serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let orig = read(fx.join("tokenizers/qwen3/tokenizer_config.json"));
    let saved = read(env.out_dir().join("q3/tokenizer_config.json"));
    assert_eq!(orig.len(), 14);
    assert_eq!(saved, orig, "every key and value kept");
    let served = read(env.out_dir().join("served/tokenizer_config.json"));
    assert_eq!(served.len(), 14);
    assert!(
        served["chat_template"]
            .as_str()
            .unwrap()
            .starts_with("{% for m in messages %}<|im_start|>"),
        "{:?}",
        served["chat_template"]
    );
    for k in [
        "model_max_length",
        "add_bos_token",
        "additional_special_tokens",
    ] {
        assert_eq!(served[k], orig[k], "{k}");
    }
}

/// Preference pairs and KTO records, as TRL and LLaMA-Factory ship them, are an error naming the
/// format wherever they enter (`to_messages`, or `sft` on the raw records), never SFT examples.
#[test]
fn preference_and_kto_records_are_never_trained_as_sft() {
    let env = Env::new();
    let Some((mut s, _)) = setup(&env) else {
        return;
    };
    s.eval(r#"const LF = FX + "/datasets/llamafactory/";"#)
        .unwrap();
    env.write(
        "trl_dpo.jsonl",
        r#"{"prompt": "2+2?", "chosen": "4", "rejected": "5"}"#,
    );
    env.write(
        "trl_kto.jsonl",
        r#"{"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "5"}], "label": false}"#,
    );
    for (code, want) in [
        (
            r#"data::to_messages(data::load(LF + "kto_en_demo.json"))"#,
            "kto_en_demo.json`: record 0 is KTO data (a boolean `label` marks each answer desirable or not), not supervised fine-tuning: tokenize it with `data::preference(ds, tok)` and train it with `train::dpo` (pairs) or `train::kto`",
        ),
        (
            r#"data::sft(data::load(LF + "kto_en_demo.json"), tok)"#,
            "record 0 is KTO data",
        ),
        (
            r#"data::to_messages(data::load(LF + "dpo_en_demo.json"), #{ format: "sharegpt" })"#,
            "dpo_en_demo.json`: record 0 is DPO preference data (`chosen`/`rejected`), not supervised fine-tuning",
        ),
        (
            r#"data::to_messages(data::load(LF + "v1_dpo_demo.jsonl"))"#,
            "record 0 is DPO preference data (`chosen_messages`/`rejected_messages`, LLaMA-Factory v1)",
        ),
        (
            r#"data::to_messages(data::load("trl_dpo.jsonl"))"#,
            "trl_dpo.jsonl`: record 0 is DPO preference data (`chosen`/`rejected`)",
        ),
        (
            r#"data::to_messages(data::load("trl_kto.jsonl"))"#,
            "trl_kto.jsonl`: record 0 is KTO data",
        ),
        (
            r#"data::sft(data::from_info(LF + "dataset_info.json", "dpo_en_demo"), tok)"#,
            "dpo_en_demo.json`: record 0 is DPO preference data (`chosen`/`rejected`), not supervised fine-tuning",
        ),
    ] {
        let e = s.eval(code).unwrap_err();
        assert!(e.rendered.contains(want), "{code}: {}", e.rendered);
    }
}

#[test]
fn sharegpt_messages_and_conversation_formats() {
    let env = Env::new();
    let Some((mut s, _)) = setup(&env) else {
        return;
    };
    s.eval(r#"let tok3 = tokenizer::load(FX + "/tokenizers/qwen3");"#)
        .unwrap();
    s.eval(
        r#"let fc = data::sft(data::to_messages(data::load(FX + "/datasets/fastchat/dummy_conversation.json")), tok, #{ max_length: 256 });
let em = data::sft(data::to_messages(data::load(FX + "/datasets/emollm/emollm_messages.jsonl", #{ max_samples: 50 })), tok3, #{ max_length: 2048, train_on: "last_assistant" });
let ff = data::sft(data::to_messages(data::load(FX + "/datasets/emollm/emollm_firefly.jsonl", #{ max_samples: 50 }), #{ system: "现在你是一个心理专家" }), tok, #{ max_length: 2048 });"#,
    )
    .unwrap();
    let log = env.sink.take();
    assert!(
        log.contains("detected format `sharegpt`: record 0 has `conversations`"),
        "{log}"
    );
    assert!(log.contains("detected format `messages`"), "{log}");
    assert!(log.contains("detected format `conversation`"), "{log}");
    assert_snapshot!("fastchat_record0", masked(&mut s, "fc", 0));
    s.eval("let tok_keep = tok; tok = tok3;").unwrap();
    assert_snapshot!(
        "emollm_qwen3_last_assistant_record0",
        masked(&mut s, "em", 0)
    );
    s.eval("tok = tok_keep;").unwrap();
    assert_snapshot!("firefly_record0", masked(&mut s, "ff", 0));
}

#[test]
fn bad_data_is_reported_with_file_record_and_fields() {
    let env = Env::new();
    let mut s = env.session();
    env.write(
        "missing.json",
        r#"[{"instruction": "a", "output": "b"}, {"instruction": "c"}]"#,
    );
    env.write("type.json", r#"[{"instruction": "a", "output": 42}]"#);
    env.write(
        "bad.jsonl",
        "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\" \"output\": \"b\"}\n",
    );
    env.write(
        "role.json",
        r#"[{"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}]"#,
    );
    env.write("empty.json", "[]");
    env.write("unknown.json", r#"[{"text": "just text"}]"#);
    env.write(
        "long.json",
        r#"[{"instruction": "a very long prompt that will not fit", "output": "b"}]"#,
    );
    let t = support::transcript(
        &env,
        &mut s,
        r#"data::to_messages(data::load("missing.json"))
data::to_messages(data::load("type.json"))
data::load("bad.jsonl")
data::to_messages(data::load("role.json"))
data::load("empty.json")
data::to_messages(data::load("unknown.json"))
data::sft(data::to_messages(data::load("long.json")), tokenizer::builtin(), #{ max_length: 8 })
data::sft(data::load("long.json"), tokenizer::builtin())
data::sft(data::to_messages(data::load("long.json")), tokenizer::builtin(), #{ max_len: 8 })
data::load("nothing-*.json")
data::load("long.json").map(|r| r.missing.len())
"#,
    );
    assert_snapshot!("bad_data", t);
}

/// Datasets combine: two `dataset_info.json` entries (alpaca + sharegpt) as LLaMA-Factory's
/// `dataset: a,b`, `concat`, `interleave` (in turn, drawn, all exhausted), iteration, and the
/// mistakes a recipe can make with them.
#[test]
fn datasets_combine_and_iterate() {
    let env = Env::new();
    let Some((mut s, _)) = setup(&env) else {
        return;
    };
    s.eval(r#"const INFO = FX + "/datasets/llamafactory/dataset_info.json";"#)
        .unwrap();
    s.eval(r#"let a = data::from_info(INFO, "alpaca_zh_demo"); let g = data::from_info(INFO, "glaive_toolcall_zh_demo");"#)
        .unwrap();
    let v = |s: &mut qscript_stdlib::Session, e: &str| s.eval(e).unwrap().unwrap();
    assert_eq!(
        v(
            &mut s,
            r#"let both = data::from_info(INFO, ["alpaca_zh_demo", "glaive_toolcall_zh_demo"]); both.len() == a.len() + g.len()"#
        ),
        "=> true : bool"
    );
    assert_eq!(
        v(
            &mut s,
            r#"data::from_info(INFO, "alpaca_zh_demo, glaive_toolcall_zh_demo").len() == both.len()"#
        ),
        "=> true : bool"
    );
    assert_eq!(
        v(
            &mut s,
            "let c = data::concat([a, g]); c[a.len()].messages == g[0].messages"
        ),
        "=> true : bool"
    );
    // in turn: a0, g0, a1, g1, ... until the shorter one runs out
    assert_eq!(
        v(
            &mut s,
            "let i = data::interleave([a, g]); i[1].messages == g[0].messages && i[2].messages == a[1].messages && i.len() == 2 * g.len() + 1"
        ),
        "=> true : bool"
    );
    assert_eq!(
        v(
            &mut s,
            "let d = data::interleave([a, g], #{ probabilities: [0.7, 0.3], seed: 1 }); let e = data::interleave([a, g], #{ probabilities: [0.7, 0.3], seed: 1 }); d.len() == e.len() && d[3].messages == e[3].messages"
        ),
        "=> true : bool"
    );
    assert_eq!(
        v(
            &mut s,
            r#"data::interleave([a, g], #{ stopping_strategy: "all_exhausted" }).len() == 2 * a.len() - 1"#
        ),
        "=> true : bool"
    );
    assert_eq!(
        v(
            &mut s,
            "let n = 0; for r in g { n += r.messages.len(); } n > g.len()"
        ),
        "=> true : bool"
    );
    assert_eq!(
        v(
            &mut s,
            "a.to_messages().sft(tok, #{ max_length: 64 }).len() == data::sft(a, tok, #{ max_length: 64 }).len()"
        ),
        "=> true : bool"
    );
    for (code, want) in [
        (
            "data::concat([a, data::sft(g, tok)])",
            "dataset 1 holds tokenized examples, dataset 0 records",
        ),
        (
            "data::concat([a, 3])",
            "`data::concat`: item 1 is not a dataset: `3`",
        ),
        (
            "data::concat([])",
            "needs a list of datasets, got an empty one",
        ),
        (
            "data::interleave([a, g], #{ probabilities: [0.5] })",
            "`probabilities` has 1 entries for 2 datasets",
        ),
        (
            "data::interleave([a, g], #{ probabilities: [0.5, 0.6] })",
            "must be non-negative and sum to 1",
        ),
        (
            r#"data::interleave([a, g], #{ stopping_strategy: "longest" })"#,
            "must be `first_exhausted` or `all_exhausted`",
        ),
        (
            "data::interleave([a, g], #{ probability: [0.5, 0.5] })",
            "probability",
        ),
    ] {
        let e = s.eval(code).unwrap_err();
        assert!(e.rendered.contains(want), "{code}: {}", e.rendered);
    }
}

/// Preference data as users have it, tokenized as TRL does: LLaMA-Factory's ranking entry
/// (`dpo_en_demo`) and KTO entry (`kto_en_demo`) give the ids TRL's `DPOTrainer` and
/// `KTOTrainer` give with Qwen2.5's tokenizer (`scripts/make_pref_goldens.py`); v1's
/// `chosen_messages` load too; bad records are skipped and named.
#[test]
fn preference_data_tokenizes_as_trl_does() {
    let env = Env::new();
    let Some((mut s, _)) = setup(&env) else {
        return;
    };
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            qscript_runtime::testing::repo_fixtures().join("pref/tokenized_demo.json"),
        )
        .unwrap(),
    )
    .unwrap();
    s.eval(
        r#"const INFO = FX + "/datasets/llamafactory/dataset_info.json";
let dpo = data::preference(data::from_info(INFO, "dpo_en_demo"), tok, #{ max_length: 0 });
let kto = data::preference(data::from_info(INFO, "kto_en_demo"), tok, #{ max_length: 0 });
let v1 = data::preference(data::load(FX + "/datasets/llamafactory/v1_dpo_demo.jsonl"), tok, #{ max_length: 512 });"#,
    )
    .unwrap();
    let log = env.sink.take();
    assert!(
        log.contains("data: `dpo_en_demo`: 300 records, preference data (`ranking`)"),
        "{log}"
    );
    for (var, key, fields) in [
        (
            "dpo",
            "dpo_en_demo",
            &["prompt_ids", "chosen_ids", "rejected_ids"][..],
        ),
        (
            "kto",
            "kto_en_demo",
            &["prompt_ids", "completion_ids", "label"][..],
        ),
    ] {
        for (i, want) in golden[key].as_array().unwrap().iter().enumerate() {
            for f in fields {
                // The REPL's display: `=> value: type`.
                let got = s.eval(&format!("{var}[{i}].{f}")).unwrap().unwrap();
                let got = got.replace(' ', "");
                let got = got.trim_start_matches("=>").rsplit_once(':').unwrap().0;
                assert_eq!(got, want[*f].to_string(), "{key} record {i}: {f}");
            }
        }
    }
    assert_eq!(
        s.eval("kto.len()").unwrap().as_deref(),
        Some("=> 300 : i64")
    );
    assert!(log.contains("KTO answers ("), "{log}");
    assert_eq!(
        s.eval("v1.len() > 0").unwrap().as_deref(),
        Some("=> true : bool")
    );
    // Bad records: skipped, counted, named.
    env.write(
        "bad.jsonl",
        "{\"prompt\": \"Q\", \"chosen\": \"a\", \"rejected\": \"a\"}\n{\"prompt\": \"Q\", \"chosen\": \"\", \"rejected\": \"b\"}\n{\"prompt\": \"Q\", \"chosen\": \"yes\"}\n{\"prompt\": \"Q\", \"chosen\": \"yes\", \"rejected\": \"no\"}\n",
    );
    s.eval(r#"let bad = data::preference(data::load("bad.jsonl"), tok);"#)
        .unwrap();
    let log = env.sink.take();
    assert!(
        log.contains(
            "bad.jsonl`: 3 records skipped (record 0: the chosen and rejected answers are the \
             same; record 1: an answer is empty; record 2: missing `rejected` (the rejected answer))"
        ),
        "{log}"
    );
    let e = s
        .eval(r#"data::preference(data::load("bad.jsonl").select(0..3), tok)"#)
        .unwrap_err();
    assert!(
        e.rendered.contains("no example is left to train on"),
        "{}",
        e.rendered
    );
}

/// Parquet files as HF datasets ship them (`data/train-00000-of-00001.parquet`): pyarrow's
/// snappy, zstd and gzip files read as records (lists of structs as message lists), train as
/// SFT and preference data; a damaged file is named.
#[test]
fn parquet_files_load_as_records() {
    let env = Env::new();
    let mut s = env.session();
    let dir = qscript_runtime::testing::repo_fixtures().join("data");
    std::fs::copy(
        dir.join("alpaca-snappy.parquet"),
        env.recipe_dir().join("a.parquet"),
    )
    .unwrap();
    std::fs::copy(
        dir.join("messages-zstd.parquet"),
        env.recipe_dir().join("m.parquet"),
    )
    .unwrap();
    std::fs::copy(
        dir.join("pref-gzip.parquet"),
        env.recipe_dir().join("p.parquet"),
    )
    .unwrap();
    s.eval(
        r#"let tok = tokenizer::builtin();
let a = data::load("a.parquet");
let m = data::load("m.parquet");
let sft = data::sft(data::to_messages(a), tok);
let chat = data::sft(m, tok);
let pairs = data::preference(data::load("p.parquet"), tok);"#,
    )
    .unwrap();
    for (code, want) in [
        ("a[1].output", "\"4\""),
        ("m[0].messages[1].content", "\"hello\""),
        ("m[1].score == ()", "true"),
        ("sft.len() + chat.len()", "4"),
        ("pairs.len()", "1"),
    ] {
        let got = s.eval(code).unwrap().unwrap();
        assert!(got.contains(want), "{code}: {got}");
    }
    let bytes = std::fs::read(dir.join("alpaca-snappy.parquet")).unwrap();
    std::fs::write(
        env.recipe_dir().join("cut.parquet"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let e = s.eval(r#"data::load("cut.parquet")"#).unwrap_err();
    assert!(
        e.rendered
            .contains("cut.parquet`: not a parquet file the reader can read: Parquet error"),
        "{}",
        e.rendered
    );
}

/// Seed 001's real model: Qwen3's template drops earlier turns' `<think>` blocks, so SFT renders
/// each conversation through its training variant (every turn kept, `{% generation %}` marking
/// what is learned): the ids and the learned tokens equal TRL's `assistant_only_loss`
/// tokenization with Qwen3's tokenizer (`scripts/make_template_goldens.py`), multi-turn and with
/// reasoning; `train_on: "last_assistant"` learns the last turn only (rendered through the
/// original template, as inference renders it: the same tokens for that turn).
#[test]
fn qwen3_multi_turn_sft_learns_what_trl_learns() {
    let env = Env::new();
    let Some((mut s, _)) = setup(&env) else {
        return;
    };
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            qscript_runtime::testing::repo_fixtures().join("templates/qwen3_multiturn.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let convs = golden["conversations"].as_array().unwrap();
    let mut lines = String::new();
    for c in convs {
        lines.push_str(&serde_json::json!({"messages": c["messages"]}).to_string());
        lines.push('\n');
    }
    env.write("conv.jsonl", &lines);
    s.eval(
        r#"let tok3 = tokenizer::load(FX + "/tokenizers/qwen3");
let ds = data::sft(data::load("conv.jsonl"), tok3, #{ max_length: 4096 });
let last = data::sft(data::load("conv.jsonl"), tok3, #{ max_length: 4096, train_on: "last_assistant" });"#,
    )
    .unwrap();
    for (i, c) in convs.iter().enumerate() {
        let ids = s.eval(&format!("ds[{i}].input_ids")).unwrap().unwrap();
        let want_ids: Vec<u64> = c["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let got = ids.replace(' ', "");
        let got = got.trim_start_matches("=>").rsplit_once(':').unwrap().0;
        assert_eq!(
            got,
            serde_json::to_string(&want_ids).unwrap(),
            "conversation {i}: ids"
        );
        let learned = s
            .eval(&format!(
                "ds[{i}].labels.map(|l| if l == -100 {{ 0 }} else {{ 1 }})"
            ))
            .unwrap()
            .unwrap();
        let got = learned.replace(' ', "");
        let got = got.trim_start_matches("=>").rsplit_once(':').unwrap().0;
        assert_eq!(
            got,
            c["assistant_masks"].to_string(),
            "conversation {i}: learned tokens"
        );
        // The last turn only: a suffix of the learned tokens.
        let n: i64 = s
            .eval(&format!("last[{i}].labels.filter(|l| l != -100).len()"))
            .unwrap()
            .unwrap()
            .trim_start_matches("=> ")
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let all = c["assistant_masks"].as_array().unwrap();
        let last_run = all
            .iter()
            .rev()
            .skip_while(|m| m.as_u64() == Some(0))
            .take_while(|m| m.as_u64() == Some(1))
            .count();
        assert_eq!(n as usize, last_run, "conversation {i}: the last turn");
    }
}

/// A dataset directory as a hub dataset repo lays it out (`data/train-*.parquet`,
/// `data/test-*.parquet`) loads by `split`; a parquet file saved under another name is read as
/// what its bytes say.
#[test]
fn dataset_directories_load_by_split_and_binary_files_by_content() {
    let env = Env::new();
    let mut s = env.session();
    let fx = qscript_runtime::testing::repo_fixtures().join("data");
    let data = env.recipe_dir().join("repo/data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::copy(
        fx.join("alpaca-snappy.parquet"),
        data.join("train-00000-of-00001.parquet"),
    )
    .unwrap();
    std::fs::copy(
        fx.join("messages-zstd.parquet"),
        data.join("test-00000-of-00001.parquet"),
    )
    .unwrap();
    std::fs::copy(
        fx.join("alpaca-snappy.parquet"),
        env.recipe_dir().join("misnamed.json"),
    )
    .unwrap();
    s.eval(
        r#"let train = data::load("repo");
let test = data::load("repo", #{ split: "test" });
let misnamed = data::load("misnamed.json");"#,
    )
    .unwrap();
    assert_eq!(
        s.eval("train[0].output").unwrap().as_deref(),
        Some("=> \"hello\" : string")
    );
    assert_eq!(s.eval("test.len()").unwrap().as_deref(), Some("=> 2 : i64"));
    assert_eq!(
        s.eval("misnamed.len()").unwrap().as_deref(),
        Some("=> 2 : i64")
    );
    let e = s
        .eval(r#"data::load("repo", #{ split: "validation" })"#)
        .unwrap_err();
    assert!(
        e.rendered.contains("the dataset has no `validation` split"),
        "{}",
        e.rendered
    );
}
