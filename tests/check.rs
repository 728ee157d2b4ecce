//! `qscript check` as a dry run: each mistake a new user makes fails it with a clear message and
//! exit 1 before any weight is read; a custom loop is not trained; nothing is written under the
//! output dir while writes and reads of the same recipe still work; a 7B checkpoint checks in
//! seconds from its headers.
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::io::Write as _;

use support::{Env, run_in, stderr, stdout};

/// A model directory saved by a real run (the built-in tiny model and tokenizer) at
/// `recipe/models/m`, and a small alpaca file at `recipe/d.json`.
fn env_with_model() -> Env {
    let env = Env::new();
    env.write(
        "save.rhai",
        "model::tiny(#{ seed: 1 }).save(\"m\", tokenizer::builtin());\n",
    );
    let models = env.recipe_dir().join("models");
    let o = run_in(
        env.dir.path(),
        &["recipe/save.rhai", "--output-dir", models.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    env.write(
        "d.json",
        r#"[{"instruction": "hi", "output": "hello"}, {"instruction": "bye", "output": "see you"},
            {"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]"#,
    );
    env
}

const RECIPE: &str = r#"let tok = tokenizer::load("models/m");
let ds = data::sft(data::to_messages(data::load("d.json")), tok);
let m = model::load("models/m");
let peft = lora::attach(m, #{ r: 4, lora_alpha: 8, target_modules: ["q_proj", "v_proj"] });
let out = train::fit(peft, ds, #{ max_steps: 2, learning_rate: 1e-3, per_device_train_batch_size: 2 });
print(out.chat(tok, [#{ role: "user", content: "hi" }], #{ max_new_tokens: 4 }));
"#;

/// The mistakes of the issue, each as an edit of a recipe that checks: the message it must give.
#[test]
fn each_mistake_fails_check_with_a_clear_message() {
    let env = env_with_model();
    env.write("ok.rhai", RECIPE);
    let o = run_in(env.dir.path(), &["check", "recipe/ok.rhai"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("weights not read"), "{err}");
    assert!(
        err.contains("check: steps: 4 examples / batch 2 = 2 micro-batches an epoch"),
        "{err}"
    );
    assert!(err.contains("check:   total"), "{err}");
    let out = stdout(&o);
    for topic in ["data", "model", "adapters", "steps", "memory", "plan"] {
        assert!(
            out.contains(&format!("\n  {topic:<9} ")),
            "summary line `{topic}` in\n{out}"
        );
    }
    assert!(out.contains("  steps     2 ("), "{out}");
    assert!(!err.contains("Running training"), "{err}");
    // Planned for two data-parallel ranks: one micro-batch of 2 x 2 examples an epoch.
    let o = run_in(
        env.dir.path(),
        &["check", "--nproc-per-node", "2", "recipe/ok.rhai"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let two = stderr(&o);
    assert!(
        two.contains("check: steps: 4 examples / batch 2 x 2 ranks = 1 micro-batches an epoch")
            && two.contains("2 x 2 devices x 1)"),
        "{two}"
    );
    std::fs::create_dir(env.recipe_dir().join("models/empty")).unwrap();
    let cases: [(&str, &str, &str, &str); 8] = [
        (
            "option",
            "learning_rate: 1e-3",
            "learning_rat: 1e-3",
            "did you mean `learning_rate`",
        ),
        (
            "scheduler",
            "max_steps: 2,",
            "max_steps: 2, lr_scheduler_type: \"cosin\",",
            "unknown `lr_scheduler_type` `cosin`",
        ),
        (
            "lora_option",
            "lora_alpha: 8",
            "lora_alhpa: 8",
            "did you mean `lora_alpha`",
        ),
        (
            "target",
            "\"v_proj\"",
            "\"o_prj\"",
            "`o_prj` matches no module of this model (did you mean `o_proj`?)",
        ),
        (
            "max_steps_type",
            "max_steps: 2,",
            "max_steps: \"10\",",
            "max_steps",
        ),
        (
            "eval",
            "max_steps: 2,",
            "max_steps: 2, eval_strategy: \"steps\",",
            "needs an eval dataset",
        ),
        (
            "no_config",
            "model::load(\"models/m\")",
            "model::load(\"models/empty\")",
            "config.json",
        ),
        (
            "vocab",
            "model::load(\"models/m\")",
            "model::tiny(#{ vocab: 100 })",
            "a tokenizer of 259 tokens and the model's embedding has 100 rows",
        ),
    ];
    for (name, from, to, want) in cases {
        assert!(RECIPE.contains(from), "{name}");
        env.write(&format!("{name}.rhai"), &RECIPE.replacen(from, to, 1));
        let o = run_in(env.dir.path(), &["check", &format!("recipe/{name}.rhai")]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(want), "{name}: wanted `{want}` in\n{err}");
        assert!(err.contains("error["), "{name}: {err}");
        assert!(!err.contains("Running training"), "{name}: {err}");
    }
    assert!(!env.dir.path().join("runs").exists(), "check wrote nothing");
}

/// 4-bit options a load cannot take are named before anything loads; LLaMA-Factory's
/// `quantization_bit: 4` checks and trains on a 4-bit base.
#[test]
fn four_bit_options_a_load_cannot_take_are_named() {
    let env = env_with_model();
    let load = "model::load(\"models/m\")";
    let cases = [
        (
            "eight",
            "#{ load_in_8bit: true }",
            "8-bit weights (LLM.int8) are not supported",
        ),
        ("bit8", "#{ quantization_bit: 8 }", "`quantization_bit: 8`"),
        (
            "bit3",
            "#{ quantization_bit: 3 }",
            "4 is the quantization qscript has",
        ),
        (
            "qtype",
            "#{ load_in_4bit: true, bnb_4bit_quant_type: \"int4\" }",
            "`bnb_4bit_quant_type: \"int4\"`",
        ),
        (
            "alone",
            "#{ bnb_4bit_use_double_quant: true }",
            "goes with `load_in_4bit: true`",
        ),
        (
            "cdtype",
            "#{ load_in_4bit: true, bnb_4bit_compute_dtype: \"int8\" }",
            "`bnb_4bit_compute_dtype: \"int8\"`",
        ),
        (
            "clash",
            "#{ load_in_4bit: true, dtype: \"f32\", bnb_4bit_compute_dtype: \"bf16\" }",
            "disagree",
        ),
        (
            "full",
            "#{ load_in_4bit: true, trainable: true }",
            "trains adapters only",
        ),
    ];
    for (name, opts, want) in cases {
        let to = format!("model::load(\"models/m\", {opts})");
        env.write(&format!("{name}.rhai"), &RECIPE.replacen(load, &to, 1));
        for mode in [&["check"][..], &[][..]] {
            let mut args = mode.to_vec();
            let path = format!("recipe/{name}.rhai");
            args.push(&path);
            let o = run_in(env.dir.path(), &args);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(1), "{name}: {err}");
            assert!(err.contains(want), "{name}: wanted `{want}` in\n{err}");
            assert!(!err.contains("Running training"), "{name}: {err}");
        }
    }
    env.write(
        "q4.rhai",
        &RECIPE.replacen(
            load,
            "model::load(\"models/m\", #{ quantization_bit: 4 })",
            1,
        ),
    );
    let o = run_in(env.dir.path(), &["check", "recipe/q4.rhai"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("nf4"), "{}", stderr(&o));
    let o = run_in(env.dir.path(), &["recipe/q4.rhai"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// A custom loop runs to its end in a dry run, step by step, without training.
/// The summary's data is the training set, not the eval split tokenized after it (issue 26).
#[test]
fn the_summary_reports_the_training_set_size() {
    let env = env_with_model();
    env.write(
        "split.rhai",
        r#"let tok = tokenizer::load("models/m");
let s = data::to_messages(data::load("d.json")).train_test_split(#{ test_size: 1, seed: 0 });
let train = data::sft(s.train, tok);
let val = data::sft(s.test, tok);
let peft = lora::attach(model::load("models/m"), #{ r: 4 });
train::fit(peft, train, #{ max_steps: 2, per_device_train_batch_size: 2 }, val);
let tokenized = data::sft(data::to_messages(data::load("d.json")), tok).train_test_split(#{ test_size: 1, seed: 0 });
train::fit(lora::attach(model::load("models/m"), #{ r: 4 }), tokenized.train, #{ max_steps: 1 });
"#,
    );
    let o = run_in(env.dir.path(), &["check", "recipe/split.rhai"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("\n  data      3 examples from `"),
        "the training set's 3 examples, not the eval split's 1:\n{out}"
    );
}

#[test]
fn a_custom_loop_is_not_trained_by_check() {
    let env = env_with_model();
    env.write(
        "loop.rhai",
        r#"let tok = tokenizer::load("models/m");
let ds = data::sft(data::to_messages(data::load("d.json")), tok);
let peft = lora::attach(model::load("models/m"), #{ r: 4 });
let t = train::trainer(peft, ds, #{ max_steps: 3, per_device_train_batch_size: 2, save_steps: 1 });
let steps = 0;
while t.global_step < t.total_steps {
    for b in t.batches() {
        let out = t.step(b);
        steps += 1;
        if out.done { break; }
    }
}
t.save_checkpoint();
print(`ran ${steps} steps`);
"#,
    );
    let o = run_in(env.dir.path(), &["check", "recipe/loop.rhai"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(stdout(&o).contains("ran 3 steps"), "{}", stdout(&o));
    assert!(err.contains("check: train::trainer"), "{err}");
    assert!(!err.contains("Running training"), "{err}");
    assert!(
        !env.dir.path().join("runs").exists(),
        "no checkpoint written"
    );
    // The same recipe really trains.
    let o = run_in(env.dir.path(), &["recipe/loop.rhai"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(env.dir.path().join("runs/loop/checkpoint-3").is_dir());
}

/// Writes go to a throw-away overlay that later reads of the same recipe see: a file written
/// and read back, a dataset written then loaded, a model saved then loaded. The output dir is
/// never created.
#[test]
fn check_writes_nothing_and_sees_its_own_writes() {
    let env = env_with_model();
    env.write(
        "rw.rhai",
        r#"let tok = tokenizer::load("models/m");
let p = io::write_text("notes/a.txt", "hello");
assert(io::read_text(p) == "hello");
io::write_text("mine.json", `[{"instruction": "x", "output": "y"}, {"instruction": "z", "output": "w"}]`);
let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/mine.json")), tok);
let full = model::load("models/m", #{ trainable: true });
let trained = train::fit(full, ds, #{ max_steps: 1, auto_micro_batch: false });
trained.save("final", tok);
let again = model::load(io::output_dir() + "/final");
assert(again.num_params == full.num_params);
tok.save("tok");
print("done");
"#,
    );
    let out = env.dir.path().join("out-rw");
    let o = run_in(
        env.dir.path(),
        &[
            "check",
            "recipe/rw.rhai",
            "--output-dir",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("done"));
    assert!(!out.exists(), "nothing under the output dir");
}

/// The shape of every tensor of a Qwen2 checkpoint with `cfg`'s sizes, HF's names.
fn decoder_tensors(cfg: &serde_json::Value) -> Vec<(String, Vec<usize>)> {
    let n = |k: &str| cfg[k].as_u64().unwrap() as usize;
    let (h, i, v, layers) = (
        n("hidden_size"),
        n("intermediate_size"),
        n("vocab_size"),
        n("num_hidden_layers"),
    );
    let qwen3 = cfg["model_type"] == "qwen3";
    let hd = cfg["head_dim"]
        .as_u64()
        .map_or(h / n("num_attention_heads"), |d| d as usize);
    let (q, kv) = (n("num_attention_heads") * hd, n("num_key_value_heads") * hd);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        let mut names = vec![
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
            ("input_layernorm.weight", vec![h]),
            ("post_attention_layernorm.weight", vec![h]),
        ];
        if qwen3 {
            names.push(("self_attn.q_norm.weight", vec![hd]));
            names.push(("self_attn.k_norm.weight", vec![hd]));
        } else {
            names.push(("self_attn.q_proj.bias", vec![q]));
            names.push(("self_attn.k_proj.bias", vec![kv]));
            names.push(("self_attn.v_proj.bias", vec![kv]));
        }
        for (name, shape) in names {
            out.push((format!("{p}.{name}"), shape));
        }
    }
    out.push(("model.norm.weight".into(), vec![h]));
    if !cfg["tie_word_embeddings"].as_bool().unwrap_or(false) {
        out.push(("lm_head.weight".into(), vec![v, h]));
    }
    out
}

/// A Qwen2.5-7B-Instruct checkpoint (the real config, the real tokenizer) whose 15 GB of bf16
/// weights are a sparse file: a real load would read them all; check reads the headers only,
/// prints the 7B plan and finishes in seconds.
#[test]
fn a_7b_recipe_checks_in_seconds_from_its_headers() {
    let Some(fx) = qscript_runtime::testing::fixtures_dir("a 7B config and tokenizer") else {
        return;
    };
    let env = Env::new();
    let offset = sparse_qwen7b(&env, &fx, "qwen7b", None);
    assert!(offset > 15_000_000_000, "a 7B's weights: {offset} bytes");
    env.write(
        "d.json",
        r#"[{"instruction": "你是谁？", "output": "臣妾是甄嬛。"}]"#,
    );
    env.write(
        "big.rhai",
        r#"let tok = tokenizer::load("qwen7b");
let ds = data::sft(data::to_messages(data::load("d.json")), tok);
let m = model::load("qwen7b", #{ dtype: "bf16" });
let peft = lora::attach(m, #{ r: 8, lora_alpha: 32, target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"] });
train::fit(peft, ds, #{ per_device_train_batch_size: 1, gradient_accumulation_steps: 16, num_train_epochs: 3, gradient_checkpointing: true });
"#,
    );
    let started = std::time::Instant::now();
    let o = run_in(env.dir.path(), &["check", "recipe/big.rhai"]);
    let secs = started.elapsed().as_secs_f64();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("7.62B params"), "{err}");
    assert!(err.contains("weights not read"), "{err}");
    assert!(
        err.contains("check:   weights                      14.19 GiB"),
        "{err}"
    );
    assert!(secs < 30.0, "check took {secs:.1} s");
    // The same run on a 4-bit base (QLoRA): the layers' weights counted as bitsandbytes stores
    // them, planned from the same headers.
    let text = std::fs::read_to_string(env.recipe_dir().join("big.rhai"))
        .unwrap()
        .replace(
            r#"#{ dtype: "bf16" }"#,
            r#"#{ dtype: "bf16", load_in_4bit: true, bnb_4bit_use_double_quant: true }"#,
        );
    env.write("q4.rhai", &text);
    let o = run_in(env.dir.path(), &["check", "recipe/q4.rhai"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("nf4 (bfloat16 compute)"), "{err}");
    assert!(
        err.contains("check:   weights                       5.16 GiB"),
        "{err}"
    );
}

/// A run that cannot fit is refused before anything loads, with the memory it needs, what the
/// device has and what to lower; placed over devices (`device_map`), the device that cannot
/// hold its part is named. (Full fine-tuning of a Qwen2.5-7B stretched to 80 layers, about
/// 21B parameters: some 300 GB with its Adam state, more than any test machine has.)
#[test]
fn a_run_that_cannot_fit_is_refused_with_what_to_lower() {
    let Some(fx) = qscript_runtime::testing::fixtures_dir("a 7B config and tokenizer") else {
        return;
    };
    let env = Env::new();
    sparse_qwen7b(&env, &fx, "huge", Some(80));
    env.write("d.json", r#"[{"instruction": "hi", "output": "hello"}]"#);
    let recipe = |opts: &str| {
        format!(
            r#"let tok = tokenizer::load("huge");
let ds = data::sft(data::to_messages(data::load("d.json")), tok);
let m = model::load("huge", #{{ dtype: "bf16", trainable: true{opts} }});
train::fit(m, ds, #{{ per_device_train_batch_size: 2, max_steps: 1 }});
"#
        )
    };
    env.write("one.rhai", &recipe(""));
    let o = run_in(env.dir.path(), &["check", "recipe/one.rhai"]);
    let err = stderr(&o);
    assert_ne!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("this run needs about"), "{err}");
    assert!(err.contains("is free"), "{err}");
    assert!(err.contains("what would make it fit"), "{err}");
    assert!(
        err.contains("- `gradient_checkpointing: true`: about"),
        "{err}"
    );
    assert!(
        err.contains(
            "- LoRA instead of full fine-tuning (`lora::attach`, r 16 on every linear layer): about"
        ),
        "{err}"
    );
    env.write(
        "placed.rhai",
        &recipe(r#", device_map: "auto", max_memory: #{ cpu: "1000GiB" }"#),
    );
    let o = run_in(env.dir.path(), &["check", "recipe/placed.rhai"]);
    let err = stderr(&o);
    assert_ne!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("training needs about"), "{err}");
    assert!(err.contains("on cpu and it holds"), "{err}");
    assert!(err.contains("place less on it"), "{err}");
    assert!(err.contains("what would make it fit"), "{err}");
}

/// A long-context LoRA run planned for an 80 GB GPU: offloading the block inputs keeps two of
/// them on the device (the activations drop by the other 26 layers' inputs, which the plan shows
/// as host memory), and a 64k-token row runs its MLP in tiles (no sequence-long intermediates).
#[test]
fn offload_and_the_tiled_mlp_show_in_the_plan() {
    let Some(fx) = qscript_runtime::testing::fixtures_dir("real model configs") else {
        return;
    };
    let env = Env::new();
    sparse_checkpoint(&env, &fx, "Qwen2.5-7B-Instruct", "q7", None);
    let long = "the quick brown fox jumps over the lazy dog ".repeat(8000);
    env.write(
        "long.json",
        &serde_json::to_string(&[serde_json::json!({"instruction": "story", "output": long})])
            .unwrap(),
    );
    let recipe = |ckpt: &str| {
        format!(
            r#"let tok = tokenizer::load("q7");
let ds = data::sft(data::to_messages(data::load("long.json")), tok, #{{ max_length: 65536 }});
let m = lora::attach(model::load("q7", #{{ dtype: "bf16" }}), #{{ r: 8, target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"] }});
train::fit(m, ds, #{{ per_device_train_batch_size: 1, max_steps: 1, gradient_checkpointing: {ckpt} }});
"#
        )
    };
    let mut activations = Vec::new();
    for (name, ckpt) in [("plain", "true"), ("offload", r#""offload""#)] {
        env.write(&format!("{name}.rhai"), &recipe(ckpt));
        let o = run_in(
            env.dir.path(),
            &[
                "check",
                &format!("recipe/{name}.rhai"),
                "--gpu",
                "h100-80gb",
            ],
        );
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(0), "{err}");
        let line = |what: &str| {
            err.lines()
                .find(|l| l.starts_with(&format!("check:   {what}")))
                .map(ToString::to_string)
        };
        activations.push(line("activations").unwrap_or_default());
        assert_eq!(
            line("offloaded (host, pinned)").is_some(),
            name == "offload",
            "{err}"
        );
    }
    let gib = |l: &str| -> f64 {
        let v: Vec<&str> = l.split_whitespace().collect();
        let n: f64 = v[v.len() - 2].parse().unwrap();
        if v[v.len() - 1] == "MiB" {
            n / 1024.0
        } else {
            n
        }
    };
    let (plain, offload) = (gib(&activations[0]), gib(&activations[1]));
    // 26 of 28 block inputs of about 0.45 GiB each leave the device.
    assert!(
        plain - offload > 10.0 && plain - offload < 13.0,
        "{activations:?}"
    );
}

/// `gradient_checkpointing: "auto"` recomputes only as many blocks as the card needs: a 64k-token
/// row of a 7B keeps more of its last blocks' activations on an 80 GB card than on a 40 GB one,
/// and the plan says how many.
#[test]
fn auto_checkpointing_keeps_what_the_card_holds() {
    let Some(fx) = qscript_runtime::testing::fixtures_dir("real model configs") else {
        return;
    };
    let env = Env::new();
    sparse_checkpoint(&env, &fx, "Qwen2.5-7B-Instruct", "q7", None);
    let long = "the quick brown fox jumps over the lazy dog ".repeat(2000);
    env.write(
        "long.json",
        &serde_json::to_string(&[serde_json::json!({"instruction": "story", "output": long})])
            .unwrap(),
    );
    env.write(
        "auto.rhai",
        r#"let tok = tokenizer::load("q7");
let ds = data::sft(data::to_messages(data::load("long.json")), tok, #{ max_length: 16384 });
let m = lora::attach(model::load("q7", #{ dtype: "bf16" }), #{ r: 8, target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"] });
train::fit(m, ds, #{ per_device_train_batch_size: 1, max_steps: 1, gradient_checkpointing: "auto" });
"#,
    );
    let kept = |gpu: &str| -> usize {
        let o = run_in(env.dir.path(), &["check", "recipe/auto.rhai", "--gpu", gpu]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(0), "{err}");
        let at = err
            .find("gradient_checkpointing: \"auto\": ")
            .unwrap_or_else(|| panic!("no auto note: {err}"));
        let rest = &err[at..];
        let k = rest
            .split("the last ")
            .nth(1)
            .unwrap_or_else(|| panic!("{rest}"));
        k.split_whitespace().next().unwrap().parse().unwrap()
    };
    let (big, small) = (kept("h100-80gb"), kept("a100-40gb"));
    assert!(
        small < big && big < 28,
        "kept {small} on 40 GB, {big} on 80 GB"
    );
}

/// Generation is planned too: a KV cache past what the GPU holds is refused before anything is
/// computed, with how many new tokens would fit; one that fits passes.
#[test]
fn generation_that_would_not_fit_is_refused_with_what_fits() {
    let Some(fx) = qscript_runtime::testing::fixtures_dir("real model configs") else {
        return;
    };
    let env = Env::new();
    sparse_checkpoint(&env, &fx, "Qwen2.5-7B-Instruct", "q7", None);
    let recipe = |n: usize| {
        format!(
            r#"let tok = tokenizer::load("q7");
let m = model::load("q7", #{{ dtype: "bf16" }});
m.generate(tok, "hello", #{{ max_new_tokens: {n} }});
"#
        )
    };
    env.write("big.rhai", &recipe(1_000_000));
    let o = run_in(
        env.dir.path(),
        &["check", "recipe/big.rhai", "--gpu", "24GiB"],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("generating 1000000 tokens after a 1-token prompt needs about 71.97 GiB on cuda:0 (the KV cache 57.00 GiB) and it has 24.00 GiB free"),
        "{err}"
    );
    assert!(
        err.contains("lower `max_new_tokens` (about 125000 fit)"),
        "{err}"
    );
    env.write("small.rhai", &recipe(4096));
    let o = run_in(
        env.dir.path(),
        &["check", "recipe/small.rhai", "--gpu", "24GiB"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// Seed 000 as written (Qwen1.5-7B LoRA on huanhuan, batch 1 x 16, 128 tokens) planned for a
/// 16 GiB card with `--fit`: it fits as it is (weights and all, before anything loads); on a 12 GiB
/// card nothing training can change fits, and the 4-bit base is named.
#[test]
fn seed_000_is_planned_for_a_16_gib_card() {
    let Some(fx) = qscript_runtime::testing::fixtures_dir("real model configs") else {
        return;
    };
    let env = Env::new();
    sparse_checkpoint(&env, &fx, "Qwen1.5-7B", "q15", None);
    let recipe =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/huanhuan_lora.rhai");
    let model = env.recipe_dir().join("q15");
    let data = fx.join("datasets/huanhuan/huanhuan.json");
    let run_with = |gpu: &str, max_memory: &str| {
        let o = run_in(
            env.dir.path(),
            &[
                "check",
                recipe.to_str().unwrap(),
                "--gpu",
                gpu,
                "--set",
                &format!("max_memory={max_memory}"),
                "--fit",
                "--allow-read",
                env.dir.path().to_str().unwrap(),
                "--allow-read",
                fx.to_str().unwrap(),
                "--set",
                &format!("model={}", model.display()),
                "--set",
                &format!("data={}", data.display()),
                "--set",
                "max_length=128",
                "--set",
                "batch_size=1",
                "--set",
                "accumulation=16",
            ],
        );
        (o.status.code(), stderr(&o))
    };
    let run = |gpu: &str| run_with(gpu, "");
    let total_gib = |err: &str| -> f64 {
        let total = err
            .lines()
            .find(|l| l.starts_with("check:   total"))
            .unwrap_or_else(|| panic!("{err}"));
        total
            .split_whitespace()
            .rev()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    };
    let (code, err) = run("16GiB");
    assert_eq!(code, Some(0), "{err}");
    assert!(total_gib(&err) < 16.0, "{err}");
    assert!(!err.contains("auto_fit:"), "{err}");
    let (code, err) = run("12GiB");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("`load_in_4bit: true` in `model::load` (QLoRA)"),
        "{err}"
    );
    // On an 80 GB card, `max_memory` is the budget: 16 GiB fits as it is; at 15 GiB the
    // weights are placed (14.38 GiB) but the run does not fit beside them, which the card alone
    // would hold, and the 4-bit base is named; 12 GiB does not hold the weights.
    let (code, err) = run_with("h100-80gb", "16GiB");
    assert_eq!(code, Some(0), "{err}");
    assert!(total_gib(&err) < 16.0, "{err}");
    let (code, err) = run_with("h100-80gb", "15GiB");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("15.00 GiB"), "{err}");
    assert!(
        err.contains("`load_in_4bit: true` in `model::load` (QLoRA)"),
        "{err}"
    );
    let (code, err) = run_with("h100-80gb", "12GiB");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("`load_in_4bit: true` in `model::load` (QLoRA)"),
        "{err}"
    );
}

/// Writes a Qwen2.5-7B-Instruct checkpoint (the real config, `layers` of them if given, the real
/// tokenizer) named `name` beside the recipes, its bf16 weights a sparse file (only headers are
/// real); returns the weights' bytes.
fn sparse_qwen7b(env: &Env, fx: &std::path::Path, name: &str, layers: Option<usize>) -> usize {
    sparse_checkpoint(env, fx, "Qwen2.5-7B-Instruct", name, layers)
}

/// [`sparse_qwen7b`] for the real config in `configs/<config>` (Qwen2 or Qwen3), with the
/// Qwen2.5 tokenizer.
fn sparse_checkpoint(
    env: &Env,
    fx: &std::path::Path,
    config: &str,
    name: &str,
    layers: Option<usize>,
) -> usize {
    let dir = env.recipe_dir().join(name);
    std::fs::create_dir(&dir).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fx.join("configs").join(config).join("config.json")).unwrap(),
    )
    .unwrap();
    if let Some(n) = layers {
        cfg["num_hidden_layers"] = serde_json::json!(n);
        cfg["max_window_layers"] = serde_json::json!(n);
    }
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fx.join("tokenizers/qwen2.5").join(f), dir.join(f)).unwrap();
    }
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in decoder_tensors(&cfg) {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            name,
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut text = serde_json::to_string(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut f = std::fs::File::create(dir.join("model.safetensors")).unwrap();
    f.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.set_len((8 + text.len() + offset) as u64).unwrap();
    offset
}

/// The fit solver's proposals for fixed models and budgets, planned with `--gpu` on a machine
/// without a GPU: each lever alone with its estimated peak and speed, cheapest first, and the
/// cheapest that fits (a 7B LoRA at 16/24/40/80 GiB, a 32B LoRA at 80 GiB, a 4B full
/// fine-tuning at 40 GiB). The figures are the estimate's; a change to it shows here.
#[test]
fn check_names_what_would_fit_for_each_budget() {
    let Some(fx) = qscript_runtime::testing::fixtures_dir("real model configs") else {
        return;
    };
    let env = Env::new();
    sparse_checkpoint(&env, &fx, "Qwen2.5-7B-Instruct", "q7", None);
    sparse_checkpoint(&env, &fx, "Qwen3-32B", "q32", None);
    sparse_checkpoint(&env, &fx, "Qwen3-4B", "q4", None);
    let long = "the quick brown fox jumps over the lazy dog ".repeat(400);
    let records: Vec<serde_json::Value> = (0..8)
        .map(|i| serde_json::json!({"instruction": format!("story {i}"), "output": long}))
        .collect();
    env.write("long.json", &serde_json::to_string(&records).unwrap());
    let recipe = |model: &str, load: &str, lora: bool, train: &str| {
        let attach = if lora {
            r#"let m = lora::attach(m, #{ r: 8, lora_alpha: 16, target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"] });"#
        } else {
            ""
        };
        format!(
            r#"let tok = tokenizer::load("{model}");
let ds = data::sft(data::to_messages(data::load("long.json")), tok, #{{ max_length: 2048 }});
let m = model::load("{model}", #{{ dtype: "bf16"{load} }});
{attach}
train::fit(m, ds, #{{ {train}, max_steps: 1 }});
"#
        )
    };
    env.write(
        "lora7.rhai",
        &recipe(
            "q7",
            "",
            true,
            "per_device_train_batch_size: 8, gradient_accumulation_steps: 2",
        ),
    );
    env.write(
        "lora32.rhai",
        &recipe("q32", "", true, "per_device_train_batch_size: 4"),
    );
    env.write(
        "full4.rhai",
        &recipe(
            "q4",
            ", trainable: true",
            false,
            "per_device_train_batch_size: 4, gradient_checkpointing: true",
        ),
    );
    let mut got = String::new();
    for (recipe, gpu) in [
        ("lora7", "16GiB"),
        ("lora7", "24GiB"),
        ("lora7", "40GiB"),
        ("lora7", "80GiB"),
        ("lora32", "80GiB"),
        ("full4", "40GiB"),
    ] {
        let o = run_in(
            env.dir.path(),
            &["check", &format!("recipe/{recipe}.rhai"), "--gpu", gpu],
        );
        let err = stderr(&o);
        got.push_str(&format!("{recipe} at {gpu}:\n"));
        for line in err.lines().filter(|l| {
            l.starts_with("  - ")
                || l.starts_with("the cheapest")
                || l.starts_with("nothing here")
                || l.starts_with("check:   total")
        }) {
            got.push_str(line);
            got.push('\n');
        }
    }
    assert_eq!(
        got.trim_end(),
        FIT_SNAPSHOT.trim_end(),
        "the proposals changed:\n{got}"
    );
}

const FIT_SNAPSHOT: &str = r#"lora7 at 16GiB:
  - `optim: "adamw_8bit"` (8-bit optimizer states): about 84.64 GiB of 16.00 GiB (does not fit), ~0.99x the speed
  - `per_device_train_batch_size: 1, gradient_accumulation_steps: 16`: about 23.96 GiB of 16.00 GiB (does not fit), ~0.90x the speed
  - `load_in_4bit: true` in `model::load` (QLoRA): about 75.77 GiB of 16.00 GiB (does not fit), ~0.83x the speed
  - `gradient_checkpointing: "auto"` (27 of 28 blocks recomputed): about 22.15 GiB of 16.00 GiB (does not fit), ~0.76x the speed
  - `gradient_checkpointing: true`: about 22.26 GiB of 16.00 GiB (does not fit), ~0.75x the speed
  - `gradient_checkpointing: "offload"` (block inputs in host memory): about 19.42 GiB of 16.00 GiB (does not fit), ~0.74x the speed
  - 24 of 28 layers on the CPU (`device_map: "auto"` with `max_memory`): about 15.99 GiB of 16.00 GiB (fits), ~0.02x the speed
the cheapest that fits: `load_in_4bit: true` in `model::load` (QLoRA) + `per_device_train_batch_size: 1, gradient_accumulation_steps: 16`: about 15.07 GiB of 16.00 GiB (fits), ~0.75x the speed
the cheapest training can apply to the model as loaded: `gradient_checkpointing: "offload"` (block inputs in host memory) + `per_device_train_batch_size: 1, gradient_accumulation_steps: 16`: about 15.81 GiB of 16.00 GiB (fits), ~0.67x the speed; `auto_fit: true` (or `qscript --fit`) applies it
lora7 at 24GiB:
  - `optim: "adamw_8bit"` (8-bit optimizer states): about 84.64 GiB of 24.00 GiB (does not fit), ~0.99x the speed
  - `per_device_train_batch_size: 1, gradient_accumulation_steps: 16`: about 23.96 GiB of 24.00 GiB (fits), ~0.90x the speed
  - `load_in_4bit: true` in `model::load` (QLoRA): about 75.77 GiB of 24.00 GiB (does not fit), ~0.83x the speed
  - `gradient_checkpointing: "auto"` (27 of 28 blocks recomputed): about 22.15 GiB of 24.00 GiB (fits), ~0.76x the speed
  - `gradient_checkpointing: true`: about 22.26 GiB of 24.00 GiB (fits), ~0.75x the speed
  - `gradient_checkpointing: "offload"` (block inputs in host memory): about 19.42 GiB of 24.00 GiB (fits), ~0.74x the speed
  - 22 of 28 layers on the CPU (`device_map: "auto"` with `max_memory`): about 21.71 GiB of 24.00 GiB (fits), ~0.03x the speed
the cheapest that fits: `per_device_train_batch_size: 1, gradient_accumulation_steps: 16`: about 23.96 GiB of 24.00 GiB (fits), ~0.90x the speed; `auto_fit: true` (or `qscript --fit`) applies it
lora7 at 40GiB:
  - `optim: "adamw_8bit"` (8-bit optimizer states): about 84.64 GiB of 40.00 GiB (does not fit), ~0.99x the speed
  - `per_device_train_batch_size: 2, gradient_accumulation_steps: 8`: about 32.63 GiB of 40.00 GiB (fits), ~0.96x the speed
  - `load_in_4bit: true` in `model::load` (QLoRA): about 75.77 GiB of 40.00 GiB (does not fit), ~0.83x the speed
  - `gradient_checkpointing: "auto"` (22 of 28 blocks recomputed): about 33.73 GiB of 40.00 GiB (fits), ~0.79x the speed
  - `gradient_checkpointing: true`: about 22.26 GiB of 40.00 GiB (fits), ~0.75x the speed
  - `gradient_checkpointing: "offload"` (block inputs in host memory): about 19.42 GiB of 40.00 GiB (fits), ~0.74x the speed
  - 16 of 28 layers on the CPU (`device_map: "auto"` with `max_memory`): about 38.88 GiB of 40.00 GiB (fits), ~0.03x the speed
the cheapest that fits: `per_device_train_batch_size: 2, gradient_accumulation_steps: 8`: about 32.63 GiB of 40.00 GiB (fits), ~0.96x the speed; `auto_fit: true` (or `qscript --fit`) applies it
lora7 at 80GiB:
  - `optim: "adamw_8bit"` (8-bit optimizer states): about 84.64 GiB of 80.00 GiB (does not fit), ~0.99x the speed
  - `per_device_train_batch_size: 4, gradient_accumulation_steps: 4`: about 49.98 GiB of 80.00 GiB (fits), ~0.98x the speed
  - `gradient_checkpointing: "auto"` (6 of 28 blocks recomputed): about 70.77 GiB of 80.00 GiB (fits), ~0.93x the speed
  - `load_in_4bit: true` in `model::load` (QLoRA): about 75.77 GiB of 80.00 GiB (fits), ~0.83x the speed
  - `gradient_checkpointing: true`: about 22.26 GiB of 80.00 GiB (fits), ~0.75x the speed
  - `gradient_checkpointing: "offload"` (block inputs in host memory): about 19.42 GiB of 80.00 GiB (fits), ~0.74x the speed
  - 2 of 28 layers on the CPU (`device_map: "auto"` with `max_memory`): about 78.94 GiB of 80.00 GiB (fits), ~0.22x the speed
the cheapest that fits: `per_device_train_batch_size: 4, gradient_accumulation_steps: 4`: about 49.98 GiB of 80.00 GiB (fits), ~0.98x the speed; `auto_fit: true` (or `qscript --fit`) applies it
lora32 at 80GiB:
  - `optim: "adamw_8bit"` (8-bit optimizer states): about 185.41 GiB of 80.00 GiB (does not fit), ~0.99x the speed
  - `per_device_train_batch_size: 1, gradient_accumulation_steps: 4`: about 93.15 GiB of 80.00 GiB (does not fit), ~0.92x the speed
  - `load_in_4bit: true` in `model::load` (QLoRA): about 142.63 GiB of 80.00 GiB (does not fit), ~0.83x the speed
  - `gradient_checkpointing: "auto"` (63 of 64 blocks recomputed): about 70.20 GiB of 80.00 GiB (fits), ~0.75x the speed
  - `gradient_checkpointing: true`: about 70.28 GiB of 80.00 GiB (fits), ~0.75x the speed
  - `gradient_checkpointing: "offload"` (block inputs in host memory): about 65.43 GiB of 80.00 GiB (fits), ~0.74x the speed
  - 38 of 64 layers on the CPU (`device_map: "auto"` with `max_memory`): about 78.31 GiB of 80.00 GiB (fits), ~0.03x the speed
the cheapest that fits: `gradient_checkpointing: "auto"` (10 of 64 blocks recomputed) + `load_in_4bit: true` in `model::load` (QLoRA) + `per_device_train_batch_size: 2, gradient_accumulation_steps: 2`: about 71.89 GiB of 80.00 GiB (fits), ~0.77x the speed
the cheapest training can apply to the model as loaded: `gradient_checkpointing: "auto"` (63 of 64 blocks recomputed): about 70.20 GiB of 80.00 GiB (fits), ~0.75x the speed; `auto_fit: true` (or `qscript --fit`) applies it
full4 at 40GiB:
  - LoRA instead of full fine-tuning (`lora::attach`, r 16 on every linear layer): about 11.67 GiB of 40.00 GiB (fits), ~1.00x the speed
  - `gradient_checkpointing: "offload"` (block inputs in host memory): about 63.05 GiB of 40.00 GiB (does not fit), ~0.99x the speed
  - `optim: "adamw_8bit"` (8-bit optimizer states): about 42.02 GiB of 40.00 GiB (does not fit), ~0.99x the speed
  - `per_device_train_batch_size: 1, gradient_accumulation_steps: 4`: about 62.39 GiB of 40.00 GiB (does not fit), ~0.92x the speed
  - 15 of 36 layers on the CPU (`device_map: "auto"` with `max_memory`): about 38.77 GiB of 40.00 GiB (fits), ~0.05x the speed
the cheapest that fits: `gradient_checkpointing: "offload"` (block inputs in host memory) + `optim: "adamw_8bit"` (8-bit optimizer states) + `per_device_train_batch_size: 1, gradient_accumulation_steps: 4`: about 39.69 GiB of 40.00 GiB (fits), ~0.90x the speed; `auto_fit: true` (or `qscript --fit`) applies it"#;

/// `--fit` (or `auto_fit: true`) applies the cheapest change training can make and says so; an
/// eval batch that would not fit beside the training state is split; `--gpu` names the machine
/// planned for, and a card it does not know is refused with the ones it does.
#[test]
fn fit_applies_the_cheapest_change_and_splits_the_eval_batch() {
    let Some(fx) = qscript_runtime::testing::fixtures_dir("real model configs") else {
        return;
    };
    let env = Env::new();
    sparse_checkpoint(&env, &fx, "Qwen2.5-7B-Instruct", "q7", None);
    let long = "the quick brown fox jumps over the lazy dog ".repeat(400);
    let records: Vec<serde_json::Value> = (0..8)
        .map(|i| serde_json::json!({"instruction": format!("story {i}"), "output": long}))
        .collect();
    env.write("long.json", &serde_json::to_string(&records).unwrap());
    let many: Vec<serde_json::Value> = (0..256).map(|i| records[i % 8].clone()).collect();
    env.write("eval.json", &serde_json::to_string(&many).unwrap());
    env.write(
        "fit.rhai",
        r#"let tok = tokenizer::load("q7");
let ds = data::sft(data::to_messages(data::load("long.json")), tok, #{ max_length: 2048 });
let m = lora::attach(model::load("q7", #{ dtype: "bf16" }), #{ r: 8, target_modules: ["q_proj", "v_proj"] });
train::fit(m, ds, #{ per_device_train_batch_size: 8, max_steps: 1, eval_strategy: "steps",
    eval_steps: 1, per_device_eval_batch_size: 256 },
    data::sft(data::to_messages(data::load("eval.json")), tok, #{ max_length: 2048 }));
"#,
    );
    let o = run_in(
        env.dir.path(),
        &["check", "recipe/fit.rhai", "--gpu", "24GiB", "--fit"],
    );
    let (out, err) = (stdout(&o), stderr(&o));
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        out.contains("planned for: 24GiB (24.00 GiB each), named by `--gpu`"),
        "{out}"
    );
    assert!(
        err.contains("check: auto_fit: the options as given need about 84.61 GiB on cuda:0, which holds 24.00 GiB; training with `per_device_train_batch_size: 1, gradient_accumulation_steps: 8` instead"),
        "{err}"
    );
    assert!(
        err.contains("eval: batches of 79 examples (`per_device_eval_batch_size` 256 would need about 36.73 GiB"),
        "{err}"
    );
    assert!(
        err.contains("check: steps: 8 examples / batch 1 = 8 micro-batches"),
        "{err}"
    );
    // Without `--fit` the same run is refused, with the change listed.
    let o = run_in(
        env.dir.path(),
        &["check", "recipe/fit.rhai", "--gpu", "24GiB"],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("`auto_fit: true` (or `qscript --fit`) applies it"),
        "{err}"
    );
    // A card it does not know, and `--gpu` outside `check`.
    let o = run_in(
        env.dir.path(),
        &["check", "recipe/fit.rhai", "--gpu", "h900"],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("`--gpu h900`: expected a card (h200-141gb, "),
        "{err}"
    );
    let o = run_in(env.dir.path(), &["recipe/fit.rhai", "--gpu", "h100"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("`--gpu` plans a run for other GPUs: use it with `qscript check`"));
}
