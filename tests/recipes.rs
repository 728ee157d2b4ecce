//! Every recipe and example runs end to end.
#![allow(clippy::unwrap_used)]

#[path = "support/mod.rs"]
mod support;

use std::path::Path;

use support::{run_in, stderr};

fn scripts(dir: &str) -> Vec<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
    let mut v: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rhai"))
        .collect();
    v.sort();
    v
}

#[test]
fn recipes_and_examples_run() {
    let out = tempfile::tempdir().unwrap();
    let all: Vec<_> = scripts("recipes")
        .into_iter()
        .chain(scripts("examples"))
        .collect();
    assert!(all.len() >= 4, "{all:?}");
    for script in all {
        let o_dir = out.path().join("o");
        let mut args = vec![
            script.to_str().unwrap(),
            "--output-dir",
            o_dir.to_str().unwrap(),
        ];
        if std::fs::read_to_string(&script)
            .unwrap()
            .contains("max_steps:")
        {
            args.extend(["--set", "max_steps=3"]);
        }
        let o = run_in(out.path(), &args);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}:\n{}",
            script.display(),
            stderr(&o)
        );
    }
}

#[test]
fn the_huanhuan_recipe_trains_saves_and_chats() {
    let out = tempfile::tempdir().unwrap();
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/huanhuan_lora.rhai");
    let o_dir = out.path().join("o");
    let args = [
        recipe.to_str().unwrap(),
        "--output-dir",
        o_dir.to_str().unwrap(),
        "--set",
        "max_steps=4",
        "--set",
        "epochs=1.0",
    ];
    let o = run_in(out.path(), &args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("Total optimization steps = 4"), "{err}");
    let out_text = support::stdout(&o);
    assert!(
        out_text.contains("trainable params: 7,168 || all params: 114,944 || trainable%: 6.2361"),
        "{out_text}"
    );
    for f in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/tokenizer.json",
        "metrics.jsonl",
        "loss.svg",
        "loss.png",
        "training_args.json",
    ] {
        assert!(o_dir.join(f).is_file(), "{f} missing");
    }
}

/// Seed 000's recipe with `--set load_in_4bit=true`: QLoRA on the CPU (the tiny model saved, then
/// quantized on load), its loss falling, its adapter saved.
#[test]
fn the_huanhuan_recipe_runs_on_a_4bit_base() {
    let out = tempfile::tempdir().unwrap();
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/huanhuan_lora.rhai");
    let o_dir = out.path().join("o");
    let o = run_in(
        out.path(),
        &[
            recipe.to_str().unwrap(),
            "--output-dir",
            o_dir.to_str().unwrap(),
            "--set",
            "load_in_4bit=true",
            "--set",
            "max_steps=12",
        ],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        support::stdout(&o).contains("nf4 (float32 compute)"),
        "{}",
        support::stdout(&o)
    );
    let (first, last) = first_and_last_loss(&err);
    assert!(last < first, "loss {first} -> {last}");
    assert!(o_dir.join("adapter/adapter_model.safetensors").is_file());
}

/// `loss A -> B` of a run's summary line.
fn first_and_last_loss(err: &str) -> (f64, f64) {
    let tail = err
        .split(": loss ")
        .nth(1)
        .unwrap_or_else(|| panic!("no summary in {err}"));
    let mut it = tail
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|t| !t.is_empty());
    let a = it.next().unwrap().parse().unwrap();
    assert_eq!(it.next(), Some("->"));
    (a, it.next().unwrap().parse().unwrap())
}

/// Seeds 001-003 as recipes, with no arguments (tiny model, demo data): each trains with its loss
/// falling and leaves what its seed leaves.
#[test]
fn the_seed_recipes_run_as_shipped() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes");
    for (name, expect, files) in [
        (
            "sharegpt_sft.rhai",
            vec!["Total optimization steps = 10", "step 1, ", "step 10, "],
            vec!["model/config.json", "model/model.safetensors"],
        ),
        (
            "psychology_full_sft.rhai",
            vec![
                "eval_loss",
                "best eval loss ",
                "the returned model is that checkpoint's",
                "> How can I sleep better?",
            ],
            vec!["best/model.safetensors", "metrics.jsonl"],
        ),
        (
            "llamafactory_lora.rhai",
            vec![
                "data: `demo_alpaca`: 40 records, format `alpaca`",
                "data: `demo_sharegpt`: 30 records, format `sharegpt`",
                "8 optimizer steps per epoch, 32 in all",
                "Total optimization steps = 32",
            ],
            vec![
                "adapter/adapter_config.json",
                "merged/config.json",
                "merged/model.safetensors",
            ],
        ),
    ] {
        let out = tempfile::tempdir().unwrap();
        let o_dir = out.path().join("o");
        let o = run_in(
            out.path(),
            &[
                root.join(name).to_str().unwrap(),
                "--output-dir",
                o_dir.to_str().unwrap(),
            ],
        );
        let err = stderr(&o);
        let all = format!("{err}{}", support::stdout(&o));
        assert_eq!(o.status.code(), Some(0), "{name}: {err}");
        for e in expect {
            assert!(all.contains(e), "{name}: no `{e}` in\n{all}");
        }
        let (first, last) = first_and_last_loss(&err);
        assert!(last < first - 1.0, "{name}: loss {first} -> {last}");
        for f in files {
            assert!(o_dir.join(f).is_file(), "{name}: {f} missing");
        }
    }
}

#[test]
fn editing_the_training_cell_reuses_the_model_and_the_tokenized_data() {
    use std::sync::Arc;
    let out = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes");
    let dir = out.path().join("recipes");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::copy(
        src.join("data/huanhuan_demo.json"),
        dir.join("data/huanhuan_demo.json"),
    )
    .unwrap();
    let recipe = std::fs::read_to_string(src.join("huanhuan_lora.rhai")).unwrap();
    let path = dir.join("h.rhai");
    std::fs::write(&path, &recipe).unwrap();
    let mut opts = qscript_stdlib::RunOptions::new(&dir, out.path().join("o"));
    opts.overrides = vec![
        ("max_steps".into(), "2".into()),
        ("epochs".into(), "1.0".into()),
    ];
    let sink = qscript_stdlib::BufferSink::default();
    let mut s = qscript_stdlib::Session::new(&opts, Arc::new(sink.clone())).unwrap();
    let first = s.load_file(&path).unwrap();
    assert!(first.error.is_none(), "{:?}", first.error);
    let log = sink.take();
    assert!(log.contains("data: tokenized 40 examples"), "{log}");
    // Edit only the training cell: params, data, model and LoRA cells are reused.
    std::fs::write(
        &path,
        recipe.replace("warmup_ratio: 0.03,", "warmup_ratio: 0.1,"),
    )
    .unwrap();
    let again = s.load_file(&path).unwrap();
    assert!(again.error.is_none(), "{:?}", again.error);
    assert_eq!(again.reused, 5, "{}", again.summary());
    let log = sink.take();
    assert!(
        !log.contains("data: tokenized") && !log.contains("Model(Qwen2ForCausalLM"),
        "nothing reloaded: {log}"
    );
    assert!(log.contains("Total optimization steps = 2"), "{log}");
}

/// `recipes/dpo.rhai` under hot reload: editing the DPO cell re-runs DPO (and the chat after
/// it) only; the SFT model it starts from is the one already trained.
#[test]
fn editing_the_dpo_cell_reruns_dpo_only() {
    use std::sync::Arc;
    let out = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes");
    let dir = out.path().join("recipes");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::copy(
        src.join("data/dpo_demo.jsonl"),
        dir.join("data/dpo_demo.jsonl"),
    )
    .unwrap();
    let recipe = std::fs::read_to_string(src.join("dpo.rhai")).unwrap();
    let path = dir.join("d.rhai");
    std::fs::write(&path, &recipe).unwrap();
    let mut opts = qscript_stdlib::RunOptions::new(&dir, out.path().join("o"));
    opts.overrides = vec![
        ("sft_steps".into(), "2".into()),
        ("dpo_steps".into(), "2".into()),
    ];
    let sink = qscript_stdlib::BufferSink::default();
    let mut s = qscript_stdlib::Session::new(&opts, Arc::new(sink.clone())).unwrap();
    let first = s.load_file(&path).unwrap();
    assert!(first.error.is_none(), "{:?}", first.error);
    let log = sink.take();
    assert!(log.contains("rewards/accuracies"), "{log}");
    std::fs::write(
        &path,
        recipe.replace("warmup_ratio: 0.1,", "warmup_ratio: 0.2,"),
    )
    .unwrap();
    let again = s.load_file(&path).unwrap();
    assert!(again.error.is_none(), "{:?}", again.error);
    // The header, params, data, model + LoRA and SFT reused; DPO and the chat run again.
    assert_eq!(again.reused, 5, "{}", again.summary());
    let log = sink.take();
    assert_eq!(
        log.matches("***** Running training *****").count(),
        1,
        "{log}"
    );
    assert!(
        log.contains("reference: log-probabilities of 24 examples"),
        "{log}"
    );
}

/// Seed 002's TRL YAML (`trl sft --config recipe.yaml`, as TRL's docs write it) with
/// `recipes/trl_sft.rhai`: its ModelConfig/ScriptArguments keys are the recipe's params and its
/// SFTConfig keys reach `train::fit` (LoRA r16 on q/v from `use_peft`); the hub model it names
/// and no HF cache holds is an error saying how to download it.
#[test]
fn the_trl_recipe_runs_trls_yaml() {
    let out = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let recipe = root.join("recipes/trl_sft.rhai");
    let yaml = root.join("tests/fixtures/configs/trl_sft.yaml");
    let o_dir = out.path().join("o");
    let cache = out.path().join("empty-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let base = [
        recipe.to_str().unwrap(),
        "--config",
        yaml.to_str().unwrap(),
        "--allow-read",
        yaml.parent().unwrap().to_str().unwrap(),
        "--output-dir",
        o_dir.to_str().unwrap(),
    ];
    let o = support::qscript()
        .current_dir(out.path())
        .env("HF_HUB_CACHE", &cache)
        .args(base)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o)
            .contains("download it with `huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct`"),
        "{}",
        stderr(&o)
    );
    let mut args = base.to_vec();
    args.extend([
        "--set",
        "model_name_or_path=tiny",
        "--set",
        "dataset_name=data/sharegpt_demo.json",
        "--set",
        "max_steps=2",
    ]);
    let o = support::qscript()
        .current_dir(out.path())
        .env("HF_HUB_CACHE", &cache)
        .args(&args)
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("Number of trainable parameters = 7168"),
        "{err}"
    );
    assert!(err.contains("Gradient Accumulation steps = 2"), "{err}");
}

/// Seed 001 on its real model's files: `recipes/psychology_full_sft.rhai` on a Qwen3 checkpoint
/// (tiny random weights with Qwen3's vocabulary) with Qwen3's real tokenizer: every assistant
/// turn of the multi-turn conversations is learned through the template's training variant.
#[test]
fn seed_001_runs_on_a_qwen3_checkpoint_with_the_real_tokenizer() {
    let Some(fx) = qscript_runtime::testing::fixtures_dir("Qwen3's tokenizer") else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let make = out.path().join("make.rhai");
    std::fs::write(
        &make,
        format!(
            r#"let tok = tokenizer::load({:?});
model::tiny(#{{ arch: "qwen3", vocab: 151936, hidden: 16, layers: 1, heads: 2, kv_heads: 1, intermediate: 32, seed: 1 }}).save("qwen3-tiny", tok);"#,
            fx.join("tokenizers/qwen3").to_string_lossy()
        ),
    )
    .unwrap();
    let o = run_in(
        out.path(),
        &[
            make.to_str().unwrap(),
            "--allow-read",
            fx.to_str().unwrap(),
            "--output-dir",
            out.path().join("m").to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let model = out.path().join("m/qwen3-tiny");
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/psychology_full_sft.rhai");
    let o = run_in(
        out.path(),
        &[
            recipe.to_str().unwrap(),
            "--allow-read",
            model.to_str().unwrap(),
            "--output-dir",
            out.path().join("o").to_str().unwrap(),
            "--set",
            &format!("model={}", model.to_string_lossy()),
            "--set",
            "max_steps=2",
            "--set",
            "eval_steps=1",
        ],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("drops earlier turns' <think> blocks; SFT renders every assistant turn"),
        "{err}"
    );
    assert!(err.contains("Total optimization steps = 2"), "{err}");
}
