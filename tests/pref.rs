//! Preference objectives against TRL: on one batch of the tiny checkpoints, the loss, TRL's
//! logged metrics and every trainable tensor's gradient equal what `DPOTrainer` (sigmoid, IPO,
//! hinge, robust, with an SFT term; LoRA and full fine-tuning), ORPO, SimPO (TRL's CPO) and
//! `KTOTrainer` give (fixtures by `scripts/make_pref_goldens.py`, f32 on the CPU).
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use qscript_runtime::data::batch::collate;
use qscript_runtime::data::example::{Example, IGNORE, Pref};
use qscript_runtime::lora;
use qscript_runtime::model::{LoadOptions, Model};
use qscript_runtime::testing::{max_abs, max_abs_diff, repo_fixtures};
use qscript_runtime::train::engine::objective_gradients;
use qscript_runtime::train::preference::{PrefConfig, Preference, reference_logps};
use serde_json::Value;

fn load(dir: &Path, trainable: bool) -> Model {
    let o = LoadOptions {
        dtype: "f32".into(),
        device: "cpu".into(),
        trainable,
        ..Default::default()
    };
    Model::load(dir, &o).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

/// `prompt` then `answer`, labels on the answer only.
fn row(prompt: &[u32], answer: &[u32]) -> (Vec<u32>, Vec<i64>) {
    let mut ids = prompt.to_vec();
    ids.extend(answer);
    let labels = ids
        .iter()
        .enumerate()
        .map(|(k, &t)| {
            if k < prompt.len() {
                IGNORE
            } else {
                i64::from(t)
            }
        })
        .collect();
    (ids, labels)
}

/// The batch of `meta` as qscript's two-row examples.
fn examples(meta: &Value) -> Vec<Example> {
    let pair = |p: &[u32], first: &[u32], second: &[u32], desirable: Option<bool>| {
        let (input_ids, labels) = row(p, first);
        let (second_ids, second_labels) = row(p, second);
        Example {
            input_ids,
            labels,
            pref: Some(Box::new(Pref {
                prompt_len: p.len(),
                second_ids,
                second_labels,
                desirable,
                ref_logps: None,
            })),
            ..Example::default()
        }
    };
    if meta["kind"] == "kto" {
        meta["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                pair(
                    &ids(&r["prompt_ids"]),
                    &ids(&r["completion_ids"]),
                    &ids(&r["KL_completion_ids"]),
                    r["label"].as_bool(),
                )
            })
            .collect()
    } else {
        meta["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                pair(
                    &ids(&r["prompt_ids"]),
                    &ids(&r["chosen_ids"]),
                    &ids(&r["rejected_ids"]),
                    None,
                )
            })
            .collect()
    }
}

/// qscript's options for a case (TRL's `loss_type` list with `sft` is `rpo_alpha`).
fn config(case: &str, meta: &Value) -> PrefConfig {
    let o = &meta["options"];
    let loss_type = match o["loss_type"].as_array() {
        Some(list) => list[0].as_str().unwrap().to_string(),
        None => o["loss_type"]
            .as_str()
            .map_or_else(|| case.to_string(), str::to_string),
    };
    PrefConfig {
        loss_type,
        beta: o["beta"].as_f64().unwrap(),
        label_smoothing: o["label_smoothing"].as_f64().unwrap_or(0.0),
        rpo_alpha: o["loss_weights"].as_array().map(|w| w[1].as_f64().unwrap()),
        simpo_gamma: o["simpo_gamma"].as_f64().unwrap_or(0.5),
        desirable_weight: o["desirable_weight"].as_f64().unwrap_or(1.0),
        undesirable_weight: o["undesirable_weight"].as_f64().unwrap_or(1.0),
        ..PrefConfig::default()
    }
}

#[test]
fn preference_objectives_equal_trl_on_loss_metrics_and_gradients() {
    let root = repo_fixtures().join("pref");
    let models = repo_fixtures().join("models");
    let adapter = repo_fixtures().join("lora").join("qwen2-qkvo-r4");
    let cases = [
        "dpo-sigmoid",
        "dpo-ipo",
        "dpo-hinge",
        "dpo-robust",
        "dpo-rpo",
        "dpo-full",
        "orpo",
        "simpo",
        "kto",
    ];
    for case in cases {
        let dir = root.join(case);
        let meta: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
        let golden: HashMap<String, Tensor> =
            candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
        let lora = meta["lora"].as_bool().unwrap();
        // The reference is the model as training started (TRL keeps a copy of the adapter, or of
        // the whole model); the policy has moved since (saved in `policy/`), except for the
        // reference-free ORPO and SimPO.
        let (reference, policy) = if lora {
            let base = load(&models.join("tiny-qwen2"), false);
            let reference = lora::load_adapter(&base, &adapter).unwrap();
            let policy = if dir.join("policy").is_dir() {
                lora::load_adapter(&base, &dir.join("policy")).unwrap()
            } else {
                reference.clone()
            };
            (reference, policy)
        } else {
            (
                load(&models.join("tiny-llama3"), true),
                load(&dir.join("policy"), true),
            )
        };
        let objective = Preference::new(config(case, &meta), meta["kind"] == "kto").unwrap();
        let mut ex = examples(&meta);
        if objective.needs_reference() {
            reference_logps(
                &reference,
                &mut ex,
                2,
                0,
                &qscript_runtime::cancel::CancelToken::new(),
            )
            .unwrap();
        }
        let refs: Vec<&Example> = ex.iter().collect();
        let batch = collate(&refs, 0, None, &Device::Cpu).unwrap();
        // One row a pair: the prompt once, both answers after it (read back as TRL's two rows).
        assert_eq!(batch.input_ids.dims2().unwrap().0, ex.len(), "{case}");
        assert!(
            batch.shared.as_ref().unwrap().iter().all(|&n| n > 0),
            "{case}"
        );
        let (loss, grads, metrics) =
            objective_gradients(&policy, &objective, &batch, ex.len() as f64).unwrap();
        let want = meta["loss"].as_f64().unwrap();
        assert!(
            (loss - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{case}: loss {loss} vs TRL's {want}"
        );
        for (name, value) in meta["metrics"].as_object().unwrap() {
            // KTO's margin is TRL's difference of the two means, not a per-example metric.
            if name == "rewards/margins" && case == "kto" {
                continue;
            }
            let (_, sum, count) = metrics
                .iter()
                .find(|m| m.0 == name)
                .unwrap_or_else(|| panic!("{case}: no metric {name} in {metrics:?}"));
            let (got, want) = (sum / count, value.as_f64().unwrap());
            assert!(
                (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{case}: {name} {got} vs TRL's {want}"
            );
        }
        let expected = golden.keys().filter(|k| k.starts_with("grad.")).count();
        assert_eq!(grads.len(), expected, "{case}: trainable tensors");
        for (name, got) in &grads {
            let want = &golden[&format!("grad.{name}")];
            let (d, scale) = (max_abs_diff(got, want), max_abs(want));
            assert!(
                scale > 0.0 && d <= 1e-5 + 1e-3 * scale,
                "{case}: {name} gradient differs by {d} (scale {scale})"
            );
        }
    }
}

mod support;

/// `train::dpo` and `train::kto` as users meet them: a run that checkpoints and resumes from
/// its checkpoint (the reference pass again before the restore), and every mistake named.
#[test]
fn preference_runs_resume_and_explain_their_mistakes() {
    let env = support::Env::new();
    let mut s = env.session();
    env.write(
        "p.jsonl",
        "{\"prompt\": \"Q: 2+2? A:\", \"chosen\": \" 4\", \"rejected\": \" 5\"}\n\
         {\"prompt\": \"Q: 3+3? A:\", \"chosen\": \" 6\", \"rejected\": \" 7\"}\n\
         {\"prompt\": \"Q: 1+1? A:\", \"chosen\": \" 2\", \"rejected\": \" 3\"}\n",
    );
    env.write(
        "k.jsonl",
        "{\"prompt\": \"Q: 2+2? A:\", \"completion\": \" 4\", \"label\": true}\n\
         {\"prompt\": \"Q: 3+3? A:\", \"completion\": \" 7\", \"label\": false}\n",
    );
    s.eval(
        r#"let tok = tokenizer::builtin();
let pairs = data::preference(data::load("p.jsonl"), tok);
let kto = data::preference(data::load("k.jsonl"), tok);
let sft = data::sft(data::to_messages(data::load("p.jsonl").map(|r| #{ instruction: r.prompt, output: r.chosen })), tok);
let peft = lora::attach(model::tiny(#{ seed: 1 }), #{ r: 4 });
let opts = #{ per_device_train_batch_size: 1, learning_rate: 1e-2, lr_scheduler_type: "constant", logging_steps: 1, save_steps: 2, seed: 3 };"#,
    )
    .unwrap();
    // The whole run, then the same run stopped after 2 steps and resumed: the same last loss.
    s.eval(r#"let full = train::dpo(peft, pairs, opts + #{ max_steps: 4, output_dir: "whole" });"#)
        .unwrap();
    let whole = std::fs::read_to_string(env.out_dir().join("whole/metrics.jsonl")).unwrap();
    s.eval(r#"let half = train::dpo(peft, pairs, opts + #{ max_steps: 2, output_dir: "part" });"#)
        .unwrap();
    s.eval(r#"let rest = train::dpo(peft, pairs, opts + #{ max_steps: 4, output_dir: "part", resume_from_checkpoint: true });"#)
        .unwrap();
    let part = std::fs::read_to_string(env.out_dir().join("part/metrics.jsonl")).unwrap();
    let last = |t: &str| -> Value { serde_json::from_str(t.lines().last().unwrap()).unwrap() };
    let (a, b) = (last(&whole), last(&part));
    assert_eq!(a["step"], 4);
    for key in ["loss", "rewards/margins", "logps/chosen"] {
        let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
        assert!(
            (x - y).abs() < 1e-5 * x.abs().max(1.0),
            "{key}: {x} vs {y} resumed"
        );
    }
    s.eval(r#"let k = train::kto(peft, kto, #{ per_device_train_batch_size: 2, max_steps: 1, save_steps: 0, output_dir: "kto" });"#)
        .unwrap();
    for (code, want) in [
        (
            r"train::fit(peft, pairs, #{ max_steps: 1 })",
            "`train::fit` was given preference pairs (from `data::preference`); train them with `train::dpo`",
        ),
        (
            r"train::dpo(peft, sft, #{ max_steps: 1 })",
            "`train::dpo` was given SFT examples (from `data::sft`); train them with `train::fit`",
        ),
        (
            r"train::dpo(peft, kto, #{ max_steps: 1 })",
            "was given KTO answers with a `label` (from `data::preference`); train them with `train::kto`",
        ),
        (
            r#"train::dpo(peft, pairs, #{ loss_type: "sigmod" })"#,
            "unknown `loss_type` `sigmod`; use `sigmoid` (DPO), `ipo`, `hinge`, `robust`, `orpo` or `simpo`",
        ),
        (
            r"train::dpo(peft, pairs, #{ beta: -1.0 })",
            "`beta` must be above 0, got -1",
        ),
        (
            r"train::dpo(peft, pairs, #{ label_smoothing: 0.1 })",
            "`label_smoothing` is for `loss_type` `robust` or `simpo`",
        ),
        (
            r"train::dpo(peft, pairs, #{ packing: true })",
            "`packing` is for SFT; preference pairs are padded",
        ),
        (
            r"train::fit(peft, sft, #{ beta: 0.1 })",
            "`beta` is a preference option: train pairs with `train::dpo`",
        ),
        (
            r#"train::kto(peft, kto, #{ loss_type: "ipo" })"#,
            "`loss_type: \"ipo\"` is for preference pairs; KTO data trains with `loss_type: \"kto\"`",
        ),
    ] {
        let e = s.eval(code).unwrap_err();
        assert!(e.rendered.contains(want), "{code}: {}", e.rendered);
    }
}

/// DPO on two data-parallel ranks (threads over the TCP group) trains like one process with the
/// same global batch: the same losses, and the logged rewards summed over both ranks' shares.
#[test]
fn two_ranks_train_dpo_like_one_process() {
    use qscript_runtime::cancel::CancelToken;
    use qscript_runtime::dist::{Group, World, set_thread_group};
    use qscript_runtime::train::plan::RunData;
    use qscript_runtime::train::{Mode, TrainConfig, TrainReport, Trainer, collective, fit};
    use std::sync::Arc;
    let base = load(&repo_fixtures().join("models").join("tiny-qwen2"), false);
    let m = lora::load_adapter(&base, &repo_fixtures().join("lora").join("qwen2-qkvo-r4")).unwrap();
    let mut ex: Vec<Example> = (0..8u32)
        .map(|i| {
            let t = |k: u32| (i * 13 + k * 7) % 120 + 3;
            let p: Vec<u32> = (0..4 + i % 3).map(t).collect();
            let c: Vec<u32> = (10..13 + i % 2).map(t).collect();
            let r: Vec<u32> = (20..22 + i % 4).map(t).collect();
            let (input_ids, labels) = row(&p, &c);
            let (second_ids, second_labels) = row(&p, &r);
            Example {
                input_ids,
                labels,
                pref: Some(Box::new(Pref {
                    prompt_len: p.len(),
                    second_ids,
                    second_labels,
                    desirable: None,
                    ref_logps: None,
                })),
                ..Example::default()
            }
        })
        .collect();
    reference_logps(&m, &mut ex, 4, 0, &CancelToken::new()).unwrap();
    let cfg = |dir: &Path, batch: usize| TrainConfig {
        output_dir: dir.to_string_lossy().into_owned(),
        per_device_train_batch_size: batch,
        gradient_accumulation_steps: 2,
        max_steps: 3,
        learning_rate: 1e-2,
        logging_steps: 1,
        save_steps: 0,
        ..TrainConfig::default()
    };
    let dpo = |m: &Model, ex: &[Example], cfg: &TrainConfig| -> TrainReport {
        let objective = Arc::new(Preference::new(PrefConfig::default(), false).unwrap());
        let t = Trainer::start(
            m,
            RunData::new(Arc::new(ex.to_vec()), None),
            cfg,
            0,
            collective::from_env(m).unwrap(),
            objective,
            Mode::Train,
        )
        .unwrap();
        fit::run(t, &CancelToken::new(), &mut |_| Ok(())).unwrap()
    };
    let one_dir = tempfile::tempdir().unwrap();
    let one = dpo(&m, &ex, &cfg(one_dir.path(), 4));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let root = tempfile::tempdir().unwrap();
    let ranks: Vec<_> = (0..2)
        .map(|rank| {
            let (m, ex) = (m.clone(), ex.clone());
            let c = cfg(&root.path().join(format!("r{rank}")), 2);
            std::thread::spawn(move || {
                let world = World {
                    rank,
                    size: 2,
                    local_rank: rank,
                    local_size: 2,
                    master_addr: "127.0.0.1".into(),
                    master_port: port,
                };
                let g = Group::connect(&world, std::time::Duration::from_secs(30)).unwrap();
                set_thread_group(Some(Arc::new(g)));
                let r = dpo(&m, &ex, &c);
                set_thread_group(None);
                r
            })
        })
        .collect();
    let reports: Vec<TrainReport> = ranks.into_iter().map(|h| h.join().unwrap()).collect();
    for ((s, a), (_, b)) in one.losses.iter().zip(&reports[0].losses) {
        assert!(
            (a - b).abs() < 1e-5,
            "step {s}: one process {a}, two ranks {b}"
        );
    }
    let logged = |r: &TrainReport| -> Vec<Value> {
        r.log_history
            .iter()
            .filter(|x| x.get("loss").is_some())
            .cloned()
            .collect()
    };
    let (a, b) = (logged(&one), logged(&reports[0]));
    assert_eq!(a.len(), 3);
    // Step 1's rewards are 0 up to rounding (the policy is the reference): its accuracy is a tie.
    for (x, y) in a.iter().zip(&b).skip(1) {
        for key in [
            "rewards/chosen",
            "rewards/accuracies",
            "rewards/margins",
            "logps/rejected",
        ] {
            let (p, q) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!((p - q).abs() < 1e-4 * p.abs().max(1.0), "{key}: {p} vs {q}");
        }
    }
}
