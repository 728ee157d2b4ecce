//! The trainer on a tiny model (CPU): overfitting, accumulation = bigger batch, resume = one run,
//! checkpoint rotation, NaN detection, and options errors.
#![allow(clippy::unwrap_used)]

use qscript_runtime::cancel::CancelToken;
use qscript_runtime::data::Dataset;
use qscript_runtime::data::formats::{FormatOptions, to_messages};
use qscript_runtime::data::sft::{Example, SftOptions, sft};
use qscript_runtime::lora::{self, LoraConfig, Targets};
use qscript_runtime::model::{Model, TinyConfig, tiny};
use qscript_runtime::nn::dropout::Key;
use qscript_runtime::testing::{max_abs, max_abs_diff};
use qscript_runtime::tokenizer::Tokenizer;
use qscript_runtime::train::{Event, TrainConfig, fit};

fn examples(n: usize) -> Vec<Example> {
    let tok = Tokenizer::builtin().unwrap();
    let rows = (0..n)
        .map(|i| serde_json::json!({"instruction": format!("question {i}?"), "output": format!("answer number {i}.")}))
        .collect();
    let msgs = to_messages(
        &Dataset {
            rows,
            source: "t".into(),
        },
        &FormatOptions::default(),
    )
    .unwrap();
    sft(
        &msgs.dataset,
        &tok,
        &SftOptions {
            max_length: 64,
            ..SftOptions::default()
        },
        &CancelToken::new(),
    )
    .unwrap()
    .examples
}

fn peft(seed: u64) -> Model {
    peft_with(seed, 0.1)
}

fn peft_with(seed: u64, lora_dropout: f64) -> Model {
    let m = tiny(&TinyConfig {
        hidden: 32,
        layers: 2,
        intermediate: 64,
        seed,
        ..TinyConfig::default()
    })
    .unwrap();
    // Dropout on, so resume and checkpointing are checked with the masks they must replay.
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout,
        target_modules: Targets::Pattern("all-linear".into()),
        ..LoraConfig::default()
    };
    lora::attach(&m, &cfg, seed).unwrap()
}

/// A tiny model of 3 layers (seeded), saved and loaded back with every weight trainable.
fn full_tiny(seed: u64) -> Model {
    let saved = tempfile::tempdir().unwrap();
    tiny(&TinyConfig {
        hidden: 32,
        layers: 3,
        intermediate: 64,
        seed,
        ..TinyConfig::default()
    })
    .unwrap()
    .save(saved.path())
    .unwrap();
    let opts = qscript_runtime::model::LoadOptions {
        dtype: "f32".into(),
        device: "cpu".into(),
        trainable: true,
        ..Default::default()
    };
    Model::load(saved.path(), &opts).unwrap()
}

fn cfg(dir: &std::path::Path) -> TrainConfig {
    TrainConfig {
        output_dir: dir.to_string_lossy().into_owned(),
        per_device_train_batch_size: 4,
        learning_rate: 1e-2,
        lr_scheduler_type: "constant".into(),
        max_steps: 6,
        logging_steps: 1,
        save_steps: 0,
        ..TrainConfig::default()
    }
}

fn run(
    m: &Model,
    data: &[Example],
    c: &TrainConfig,
    cancel_after: Option<usize>,
) -> qscript_runtime::train::TrainReport {
    let cancel = CancelToken::new();
    let c2 = cancel.clone();
    fit(m, data, None, c, 256, &cancel, &mut |e| {
        if let (Event::Step { step, .. }, Some(n)) = (e, cancel_after)
            && *step == n
        {
            c2.cancel();
        }
        Ok(())
    })
    .unwrap()
}

#[test]
fn overfitting_one_batch_drives_the_loss_down() {
    let dir = tempfile::tempdir().unwrap();
    let data = examples(4);
    let c = TrainConfig {
        max_steps: 60,
        learning_rate: 3e-2,
        ..cfg(dir.path())
    };
    let m = peft(0);
    let r = run(&m, &data, &c, None);
    let (first, last) = (r.losses[0].1, r.losses.last().unwrap().1);
    assert!(last < 0.8 * first, "LoRA: loss {first} -> {last}");
    // The input handle is untouched: its adapters are still B = 0.
    let b = &lora::adapters(&m)[0].1.b;
    assert_eq!(
        b.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    assert!(
        dir.path().join("metrics.jsonl").is_file()
            && dir.path().join("loss.svg").is_file()
            && dir.path().join("loss.png").is_file()
    );
    let lines = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 60);
}

/// Each log record holds the mean loss of the steps since the last one and the gradient norm of
/// the step it is logged at, as HF's Trainer logs them.
#[test]
fn a_log_record_has_the_mean_loss_and_the_last_steps_gradient_norm() {
    let data = examples(8);
    let records = |every: usize| -> Vec<serde_json::Value> {
        let dir = tempfile::tempdir().unwrap();
        let c = TrainConfig {
            max_steps: 4,
            per_device_train_batch_size: 2,
            logging_steps: every,
            ..cfg(dir.path())
        };
        run(&peft(2), &data, &c, None);
        std::fs::read_to_string(dir.path().join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (each, pairs) = (records(1), records(2));
    assert_eq!((each.len(), pairs.len()), (4, 2));
    let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap();
    for (i, r) in pairs.iter().enumerate() {
        let (a, b) = (&each[2 * i], &each[2 * i + 1]);
        assert!(
            (f(r, "loss") - f64::midpoint(f(a, "loss"), f(b, "loss"))).abs() < 1e-9,
            "{r}"
        );
        assert!(
            (f(r, "grad_norm") - f(b, "grad_norm")).abs() < 1e-9,
            "{r} vs {b}"
        );
        assert!(
            (f(a, "grad_norm") - f(b, "grad_norm")).abs() > 1e-9,
            "{a} {b}"
        );
    }
}

#[test]
fn accumulating_k_micro_batches_equals_a_k_times_larger_batch_and_merging_them() {
    // With dropout: the masks are keyed per example of the window, so the split does not matter.
    let data = examples(8);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let big = TrainConfig {
        max_steps: 2,
        ..cfg(dirs[0].path())
    };
    let small = |dir: &tempfile::TempDir, merge| TrainConfig {
        output_dir: dir.path().to_string_lossy().into_owned(),
        per_device_train_batch_size: 1,
        gradient_accumulation_steps: 4,
        merge_micro_batches: Some(merge),
        ..big.clone()
    };
    let a = run(&peft_with(1, 0.1), &data, &big, None);
    for (dir, merge) in [(&dirs[1], false), (&dirs[2], true)] {
        let b = run(&peft_with(1, 0.1), &data, &small(dir, merge), None);
        for ((_, la), (_, lb)) in a.losses.iter().zip(&b.losses) {
            assert!((la - lb).abs() < 1e-5, "merge {merge}: {la} vs {lb}");
        }
        for ((n, va), (_, vb)) in lora::adapter_tensors(&a.model)
            .iter()
            .zip(lora::adapter_tensors(&b.model).iter())
        {
            let d = max_abs_diff(va, vb);
            assert!(d < 1e-5, "merge {merge}: {n} differs by {d}");
        }
    }
}

#[test]
fn resuming_reproduces_the_uninterrupted_run_exactly() {
    let data = examples(12);
    let d1 = tempfile::tempdir().unwrap();
    let full = run(&peft(2), &data, &cfg(d1.path()), None);
    let d2 = tempfile::tempdir().unwrap();
    let c = cfg(d2.path());
    let first = run(&peft(2), &data, &c, Some(3));
    assert!(first.interrupted, "cancelled after step 3");
    assert!(
        d2.path()
            .join("checkpoint-3/adapter_model.safetensors")
            .is_file()
    );
    // trainer_state.json in transformers' layout, resumed from below.
    let st: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d2.path().join("checkpoint-3/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(st["global_step"], 3);
    assert!(st["epoch"].as_f64().unwrap() > 0.0, "{st}");
    for k in [
        "max_steps",
        "num_train_epochs",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "train_batch_size",
        "best_model_checkpoint",
        "best_metric",
        "log_history",
        "stateful_callbacks",
    ] {
        assert!(st.get(k).is_some(), "{k}: {st}");
    }
    let resumed = run(
        &peft(2),
        &data,
        &TrainConfig {
            resume_from_checkpoint: Some(serde_json::json!(true)),
            ..c
        },
        None,
    );
    let tail: Vec<f64> = full.losses.iter().skip(3).map(|l| l.1).collect();
    let got: Vec<f64> = resumed.losses.iter().map(|l| l.1).collect();
    assert_eq!(got, tail);
    // The plot of the resumed run covers the whole run: the steps before the resume too.
    let series = qscript_runtime::train::plot::Series::of(&resumed.log_history);
    let steps: Vec<f64> = series.loss.iter().map(|p| p.0).collect();
    assert_eq!(steps, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert!(d2.path().join("loss.png").is_file());
}

#[test]
fn save_total_limit_keeps_the_newest_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let c = TrainConfig {
        save_steps: 1,
        save_total_limit: Some(2),
        ..cfg(dir.path())
    };
    run(&peft(3), &examples(8), &c, None);
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint"))
        .collect();
    names.sort();
    assert_eq!(names, ["checkpoint-5", "checkpoint-6"]);
}

#[test]
fn a_nan_loss_names_the_step_and_bad_options_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let c = TrainConfig {
        learning_rate: 1e6,
        max_grad_norm: 0.0,
        max_steps: 20,
        ..cfg(dir.path())
    };
    let mut broken = peft(4);
    set_lora_b(&mut broken, f64::NAN);
    let e = fit(
        &broken,
        &examples(4),
        None,
        &c,
        256,
        &CancelToken::new(),
        &mut |_| Ok(()),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("the loss is") && e.contains("at step"), "{e}");
    let bad: Result<TrainConfig, _> =
        serde_json::from_value(serde_json::json!({"learning_rat": 1e-4}));
    let e = bad.unwrap_err().to_string();
    assert!(
        e.contains("unknown field `learning_rat`, expected one of")
            && e.contains("`learning_rate`"),
        "{e}"
    );
    let plain = tiny(&TinyConfig::default()).unwrap();
    let e = fit(
        &plain,
        &examples(2),
        None,
        &cfg(dir.path()),
        256,
        &CancelToken::new(),
        &mut |_| Ok(()),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("the model has nothing to train"), "{e}");
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    use qscript_runtime::data::batch::collate;
    use qscript_runtime::nn::AttnMask;
    use qscript_runtime::train::engine::gradients;
    let data = examples(3);
    let refs: Vec<&Example> = data.iter().collect();
    let batch = collate(&refs, 256, Some(8), &candle_core::Device::Cpu).unwrap();
    // LoRA adapters with nonzero B, and full fine-tuning of every weight.
    let full = full_tiny(5);
    let mut lora_model = peft(5);
    set_lora_b(&mut lora_model, 0.05);
    // Without dropout a recompute skips the down projection's GEMM and keeps its adapter's input.
    let mut lora_plain = peft_with(5, 0.0);
    set_lora_b(&mut lora_plain, 0.05);
    let mask = AttnMask::right_padded(&batch.lens);
    for (name, m) in [
        ("lora", &lora_model),
        ("lora without dropout", &lora_plain),
        ("full", &full),
    ] {
        let run = |recompute: qscript_runtime::train::Checkpointing| {
            gradients(
                m,
                &batch.input_ids,
                &mask,
                &batch.labels_host,
                Some(Key::new(7)),
                recompute,
            )
            .unwrap()
        };
        assert_same_gradients(name, &run(false.into()), &run(true.into()), 1e-4);
        // `"auto"` resolved: the last blocks keep their activations, the others are recomputed.
        for keep in [1, 2] {
            assert_same_gradients(
                &format!("{name}, the last {keep} kept"),
                &run(false.into()),
                &run(qscript_runtime::train::Checkpointing::KeepLast(keep)),
                1e-4,
            );
        }
    }
}

/// Two runs' losses within 1e-6 and every gradient within `1e-6 + rel` of its scale (none of
/// them zero, and some gradients at all).
fn assert_same_gradients(
    what: &str,
    (l1, g1): &(f64, Vec<(String, candle_core::Tensor)>),
    (l2, g2): &(f64, Vec<(String, candle_core::Tensor)>),
    rel: f32,
) {
    assert!((l1 - l2).abs() < 1e-6, "{what}: loss {l1} vs {l2}");
    assert!(!g1.is_empty() && g1.len() == g2.len(), "{what}");
    for ((n, a), (_, b)) in g1.iter().zip(g2) {
        let (d, scale) = (max_abs_diff(a, b), max_abs(a));
        assert!(
            scale > 0.0 && d <= 1e-6 + rel * scale,
            "{what}: {n} differs by {d} (scale {scale})"
        );
    }
}

/// A trainer's snapshot holds the weights of the step it was taken at: later steps do not change
/// it, and it equals the model the run returns when taken last (what a server is published).
#[test]
fn a_snapshot_keeps_its_step() {
    use qscript_runtime::train::Trainer;
    let data = examples(8);
    let model = peft(3);
    let dir = tempfile::tempdir().unwrap();
    let c = TrainConfig {
        max_steps: 2,
        per_device_train_batch_size: 4,
        ..cfg(dir.path())
    };
    let mut t = Trainer::new(&model, std::sync::Arc::new(data), None, &c, 256).unwrap();
    let mut windows = t.windows();
    windows.reverse();
    t.step(&windows.pop().unwrap()).unwrap();
    let first = t.snapshot().unwrap();
    let before: Vec<(String, candle_core::Tensor)> =
        qscript_runtime::model::params::trainable(&first)
            .into_iter()
            .map(|(n, x)| (n, x.copy().unwrap()))
            .collect();
    t.step(&windows.pop().unwrap()).unwrap();
    let last = t.snapshot().unwrap();
    let mut moved = false;
    for ((n, a), (_, b)) in qscript_runtime::model::params::trainable(&first)
        .iter()
        .zip(&before)
    {
        assert_eq!(max_abs_diff(a, b), 0.0, "{n} changed after its step");
    }
    for ((_, a), (_, b)) in qscript_runtime::model::params::trainable(&last)
        .iter()
        .zip(&before)
    {
        moved |= max_abs_diff(a, b) > 0.0;
    }
    assert!(moved, "the second step changed nothing");
    let report = t.finish(false).unwrap();
    for ((n, a), (_, b)) in qscript_runtime::model::params::trainable(&last)
        .iter()
        .zip(&qscript_runtime::model::params::trainable(&report.model))
    {
        assert_eq!(max_abs_diff(a, b), 0.0, "{n}");
    }
}

/// The MLP in row tiles (Unsloth's tiled MLP, here forced on a tiny model by a small tile size:
/// tiles of 8 rows, the last one partial) gives the untiled loss and gradients, for LoRA on every
/// linear layer and for full fine-tuning, with and without checkpointing.
#[test]
fn the_tiled_mlp_gives_the_untiled_gradients() {
    use qscript_runtime::data::batch::collate;
    use qscript_runtime::model::block::with_mlp_tile_bytes;
    use qscript_runtime::nn::AttnMask;
    use qscript_runtime::train::engine::gradients;
    let data = examples(3);
    let refs: Vec<&Example> = data.iter().collect();
    let batch = collate(&refs, 256, Some(8), &candle_core::Device::Cpu).unwrap();
    let mask = AttnMask::right_padded(&batch.lens);
    let full = full_tiny(5);
    let mut lora_model = peft_with(5, 0.0);
    set_lora_b(&mut lora_model, 0.05);
    for (name, m) in [("lora", &lora_model), ("full", &full)] {
        for recompute in [false, true] {
            let run = || {
                gradients(
                    m,
                    &batch.input_ids,
                    &mask,
                    &batch.labels_host,
                    Some(Key::new(7)),
                    recompute,
                )
                .unwrap()
            };
            // 64 intermediate features in f32: 8 rows a tile.
            let tiled = with_mlp_tile_bytes(64 * 4 * 8, run);
            assert_same_gradients(
                &format!("{name}, recompute {recompute}"),
                &run(),
                &tiled,
                1e-5,
            );
        }
    }
}

/// Activation offload, by each of its names, trains as plain checkpointing does (on the CPU the
/// block inputs already lie in host memory: the engine's bookkeeping of parking, releasing and
/// fetching them runs, and its order shows in the losses); an unknown value names the valid ones.
#[test]
fn offloaded_checkpointing_trains_as_checkpointing_does() {
    let data = examples(8);
    let model = peft(3);
    let losses = |opts: serde_json::Value| {
        let dir = tempfile::tempdir().unwrap();
        let mut v = serde_json::to_value(cfg(dir.path())).unwrap();
        for (k, x) in opts.as_object().unwrap() {
            v[k] = x.clone();
        }
        let c: TrainConfig = serde_json::from_value(v).unwrap();
        run(&model, &data, &c, None).losses
    };
    let want = losses(serde_json::json!({"gradient_checkpointing": true}));
    for opts in [
        serde_json::json!({"gradient_checkpointing": "offload"}),
        serde_json::json!({"gradient_checkpointing": "unsloth"}),
        serde_json::json!({"offload_activations": true}),
        // Planned: as many blocks keep their activations as fit (all of this tiny model's).
        serde_json::json!({"gradient_checkpointing": "auto"}),
    ] {
        let got = losses(opts.clone());
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            assert!(
                a.0 == b.0 && (a.1 - b.1).abs() < 1e-6,
                "{opts}: {got:?} vs {want:?}"
            );
        }
    }
    let e =
        serde_json::from_value::<TrainConfig>(serde_json::json!({"gradient_checkpointing": "yes"}))
            .unwrap_err()
            .to_string();
    assert!(
        e.contains(r#"expected true, false, "offload" or "auto""#),
        "{e}"
    );
}

/// Sets every LoRA B of `m` to `value` (so adapters contribute).
fn set_lora_b(m: &mut Model, value: f64) {
    qscript_runtime::model::params::visit_adapters_mut(&mut m.decoder, &mut |name, t| {
        if name.ends_with("lora_B.weight") {
            *t = (t.ones_like()? * value)?;
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn lora_dropout_is_seeded_and_only_active_in_training() {
    let mut m = peft(9);
    set_lora_b(&mut m, 0.05);
    let ids = candle_core::Tensor::new(&[[5u32, 9, 17, 33]], &candle_core::Device::Cpu).unwrap();
    let f = |seed: Option<u64>| {
        m.decoder
            .forward_t(&ids, None, None, seed.map(Key::new))
            .unwrap()
    };
    let diff = max_abs_diff;
    assert_eq!(diff(&f(Some(1)), &f(Some(1))), 0.0, "same seed, same masks");
    assert!(
        diff(&f(Some(1)), &f(Some(2))) > 1e-4,
        "another seed, other masks"
    );
    assert!(
        diff(&f(None), &f(Some(1))) > 1e-4,
        "no dropout at inference"
    );
}

#[test]
fn early_stopping_and_the_best_model_at_end() {
    use qscript_runtime::train::trainer::evaluate;
    let dir = tempfile::tempdir().unwrap();
    let data = examples(8);
    // A learning rate far too high: the eval loss gets worse after the first steps.
    let c = TrainConfig {
        max_steps: 50,
        learning_rate: 0.5,
        max_grad_norm: 0.0,
        eval_strategy: "steps".into(),
        eval_steps: Some(1),
        early_stopping_patience: Some(2),
        load_best_model_at_end: true,
        metric_for_best_model: Some("eval_loss".into()),
        save_total_limit: Some(1),
        ..cfg(dir.path())
    };
    let r = fit(
        &peft_with(6, 0.0),
        &data,
        Some(&data),
        &c,
        256,
        &CancelToken::new(),
        &mut |_| Ok(()),
    )
    .unwrap();
    assert!(r.steps < 50, "stopped early at step {}", r.steps);
    let evals: Vec<f64> = r
        .log_history
        .iter()
        .filter_map(|x| x.get("eval_loss").and_then(serde_json::Value::as_f64))
        .collect();
    let best = evals.iter().copied().fold(f64::MAX, f64::min);
    let last_two = &evals[evals.len() - 2..];
    assert!(last_two.iter().all(|&e| e > best), "{evals:?}");
    let final_loss = evaluate(&r.model, &data, &c, 256).unwrap();
    assert!(
        (final_loss - best).abs() < 1e-6,
        "the best checkpoint was restored: {final_loss} vs {best}"
    );
    let kept: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        .collect();
    assert_eq!(kept.len(), 1, "save_total_limit keeps the best");
}

/// A label outside the vocabulary is named (example, id, vocabulary) before any step runs.
#[test]
fn an_id_outside_the_vocabulary_is_named_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let mut data = examples(2);
    let n = data[0].labels.len();
    data[0].labels[n - 1] = 100_000;
    let e = fit(
        &peft(2),
        &data,
        None,
        &TrainConfig {
            per_device_train_batch_size: 2,
            ..cfg(dir.path())
        },
        256,
        &CancelToken::new(),
        &mut |_| Ok(()),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(
            "training example 0 holds token id 100000, outside the model's vocabulary (0..259)"
        ),
        "{e}"
    );
    assert!(!dir.path().join("metrics.jsonl").exists(), "no step ran");
}

#[test]
fn the_plan_says_how_many_epochs_max_steps_takes() {
    use qscript_runtime::train::trainer::Trainer;
    let dir = tempfile::tempdir().unwrap();
    // 12 examples, batch 4 x accumulation 1: 3 steps an epoch; 7 steps take 3 epochs (HF's count).
    let data = std::sync::Arc::new(examples(12));
    let epochs = |max_steps| {
        let c = TrainConfig {
            max_steps,
            num_train_epochs: 20.0,
            ..cfg(dir.path())
        };
        match Trainer::new(&peft(0), data.clone(), None, &c, 256)
            .unwrap()
            .start_event()
        {
            Event::Start { epochs, .. } => epochs,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(epochs(7), 3.0);
    assert_eq!(epochs(-1), 20.0);
}

/// TRL's packing: examples packed into rows (attention kept inside each example, positions
/// restarting, the first label of each later example dropped) give the unpacked loss and the
/// unpacked gradients of every LoRA tensor, without dropout (masks are keyed per row).
#[test]
fn packed_rows_give_the_unpacked_loss_and_gradients() {
    use qscript_runtime::data::batch::{collate, pack};
    use qscript_runtime::train::engine::gradients;
    let data = examples(7);
    let longest = data.iter().map(|e| e.input_ids.len()).max().unwrap();
    let packed = pack(&data, 3 * longest);
    assert!(
        packed.len() < data.len(),
        "{} rows for {} examples",
        packed.len(),
        data.len()
    );
    assert!(packed.iter().any(|r| !r.packed.is_empty()));
    let total: usize = data.iter().map(|e| e.input_ids.len()).sum();
    assert_eq!(
        packed.iter().map(|r| r.input_ids.len()).sum::<usize>(),
        total
    );
    let mut m = peft_with(3, 0.0);
    set_lora_b(&mut m, 0.05);
    let cpu = candle_core::Device::Cpu;
    let grads = |rows: &[Example]| {
        let refs: Vec<&Example> = rows.iter().collect();
        let batch = collate(&refs, 256, None, &cpu).unwrap();
        gradients(
            &m,
            &batch.input_ids,
            &batch.mask(),
            &batch.labels_host,
            None,
            false,
        )
        .unwrap()
    };
    let ((lu, gu), (lp, gp)) = (grads(&data), grads(&packed));
    assert!((lu - lp).abs() < 1e-5, "loss unpacked {lu} vs packed {lp}");
    assert!(!gu.is_empty());
    for ((n, a), (_, b)) in gu.iter().zip(&gp) {
        let d = max_abs_diff(a, b);
        let scale = max_abs(a);
        assert!(
            scale > 0.0 && d <= 1e-6 + 1e-4 * scale,
            "{n} differs by {d} (scale {scale})"
        );
    }
}

/// `packing: true` in a run: fewer, fuller rows, and the loss still falls.
#[test]
fn a_packed_run_trains_on_full_rows() {
    let data = examples(24);
    let dir = tempfile::tempdir().unwrap();
    let c = TrainConfig {
        packing: true,
        max_length: Some(128),
        per_device_train_batch_size: 2,
        max_steps: 8,
        ..cfg(dir.path())
    };
    let report = run(&peft(1), &data, &c, None);
    let first = report.losses.first().unwrap().1;
    let last = report.losses.last().unwrap().1;
    assert!(last < first, "loss {first} -> {last}");
    let notes = qscript_runtime::notice::take();
    assert!(
        notes
            .iter()
            .any(|n| n.starts_with("packing: 24 examples into ")),
        "{notes:?}"
    );
}

/// A model placed module by module (`device_map` naming a device for each) trains through the
/// per-block device code and gives the losses of the model loaded on one device. On the CPU
/// every module's device is the CPU; the GPU test runs the same over a GPU and the CPU.
#[test]
fn a_placed_model_trains_like_the_unplaced_one() {
    use qscript_runtime::plan::DeviceMap;
    let saved = tempfile::tempdir().unwrap();
    tiny(&TinyConfig {
        hidden: 32,
        layers: 3,
        intermediate: 64,
        seed: 9,
        ..TinyConfig::default()
    })
    .unwrap()
    .save(saved.path())
    .unwrap();
    let load = |map: Option<DeviceMap>| {
        let opts = qscript_runtime::model::LoadOptions {
            dtype: "f32".into(),
            device: "cpu".into(),
            device_map: map,
            ..Default::default()
        };
        let m = Model::load(saved.path(), &opts).unwrap();
        let cfg = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            target_modules: Targets::Pattern("all-linear".into()),
            ..LoraConfig::default()
        };
        lora::attach(&m, &cfg, 3).unwrap()
    };
    let explicit = DeviceMap::Explicit(
        [
            "model.embed_tokens",
            "model.layers.0",
            "model.layers.1",
            "model.layers.2",
            "model.norm",
        ]
        .iter()
        .map(|m| ((*m).to_string(), "cpu".to_string()))
        .collect(),
    );
    let placed = load(Some(explicit));
    let p = placed.placement.as_ref().expect("placed");
    assert_eq!(p.device_of("model.layers.2"), Some("cpu"));
    let data = examples(8);
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = run(&load(None), &data, &cfg(d1.path()), None);
    let b = run(&placed, &data, &cfg(d2.path()), None);
    assert_eq!(a.losses.len(), 6);
    for ((s, x), (_, y)) in a.losses.iter().zip(&b.losses) {
        assert!((x - y).abs() < 1e-6, "step {s}: {x} vs {y}");
    }
    // A map that misses a module, or names one the model does not have, is an error.
    let opts = qscript_runtime::model::LoadOptions {
        dtype: "f32".into(),
        device: "cpu".into(),
        device_map: Some(DeviceMap::Explicit(vec![(
            "model.layers".into(),
            "cpu".into(),
        )])),
        ..Default::default()
    };
    let e = Model::load(saved.path(), &opts).unwrap_err().to_string();
    assert!(e.contains("no device for `model.embed_tokens`"), "{e}");
}

/// `report_to: "tensorboard"` writes an event file TensorBoard reads: parsed back with its
/// framing checksums, it holds every logged step's `train/loss` and the run's learning rates;
/// an unknown integration is an error, one qscript does not write is a notice.
#[test]
fn tensorboard_event_files_hold_the_logged_scalars() {
    let dir = tempfile::tempdir().unwrap();
    let data = examples(8);
    let c = TrainConfig {
        report_to: Some(serde_json::json!(["tensorboard"])),
        ..cfg(dir.path())
    };
    let report = run(&peft(1), &data, &c, None);
    let files: Vec<_> = std::fs::read_dir(dir.path().join("runs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let events = qscript_runtime::train::tensorboard::read_events(&files[0]).unwrap();
    let losses: Vec<(i64, f32)> = events
        .iter()
        .filter_map(|e| {
            let v = e
                .summary
                .as_ref()?
                .value
                .iter()
                .find(|v| v.tag == "train/loss")?;
            Some((e.step, v.simple_value?))
        })
        .collect();
    assert_eq!(losses.len(), report.losses.len());
    for ((s, l), (rs, rl)) in losses.iter().zip(&report.losses) {
        assert_eq!(*s as usize, *rs);
        assert!((f64::from(*l) - rl).abs() < 1e-5, "step {s}: {l} vs {rl}");
    }
    assert!(events.iter().any(|e| {
        e.summary
            .as_ref()
            .is_some_and(|s| s.value.iter().any(|v| v.tag == "train/learning_rate"))
    }));
    let bad = TrainConfig {
        report_to: Some(serde_json::json!("tensorbord")),
        ..cfg(dir.path())
    };
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("unknown integration `tensorbord`")
    );
    let other = TrainConfig {
        report_to: Some(serde_json::json!("wandb")),
        ..cfg(dir.path())
    };
    assert!(other.validate().is_ok());
}

/// Data parallel: two ranks (threads of this process, over the TCP group) with half the
/// per-device batch give the single process's losses and adapters: every rank takes its share
/// of each global micro-batch, the loss is normalised by the whole window's learned tokens and
/// the gradients are summed over the ranks. Rank 1 writes nothing; rank 0 logs.
#[test]
fn two_ranks_train_like_one_process_with_the_same_global_batch() {
    let data = examples(13);
    let m = peft_with(4, 0.0);
    let one_dir = tempfile::tempdir().unwrap();
    let one_cfg = TrainConfig {
        gradient_accumulation_steps: 2,
        max_steps: 4,
        ..cfg(one_dir.path())
    };
    let one = run(&m, &data, &one_cfg, None);
    let root = tempfile::tempdir().unwrap();
    let reports = on_two_ranks(
        &m,
        &data,
        &[],
        [root.path().join("r0"), root.path().join("r1")],
        |dir| TrainConfig {
            per_device_train_batch_size: 2,
            gradient_accumulation_steps: 2,
            max_steps: 4,
            ..cfg(dir)
        },
    );
    for (rank, r) in reports.iter().enumerate() {
        assert_eq!(r.losses.len(), 4, "rank {rank}");
        for ((s, a), (_, b)) in one.losses.iter().zip(&r.losses) {
            assert!(
                (a - b).abs() < 1e-5,
                "rank {rank} step {s}: one process {a}, two ranks {b}"
            );
        }
        let (a, b) = (
            &lora::adapters(&one.model)[0].1.b,
            &lora::adapters(&r.model)[0].1.b,
        );
        assert!(
            max_abs_diff(a, b) < 1e-5 * max_abs(a).max(1e-3),
            "rank {rank} adapters"
        );
        // Rank 0 alone logs (and writes metrics).
        let logs = r
            .log_history
            .iter()
            .filter(|x| x.get("loss").is_some())
            .count();
        assert_eq!(logs, if rank == 0 { 4 } else { 0 }, "rank {rank} logs");
    }
    assert!(root.path().join("r0/metrics.jsonl").is_file());
    assert!(!root.path().join("r1/metrics.jsonl").exists());
}

/// Runs `cfg(rank, dir)` on two ranks (threads over the TCP group), each into its own `dir`;
/// their reports, rank 0 first.
fn on_two_ranks(
    m: &Model,
    data: &[Example],
    eval: &[Example],
    dirs: [std::path::PathBuf; 2],
    cfg: impl Fn(&std::path::Path) -> TrainConfig + Send + Sync + Clone + 'static,
) -> Vec<qscript_runtime::train::TrainReport> {
    use qscript_runtime::dist::{Group, World, set_thread_group};
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ranks: Vec<_> = dirs
        .into_iter()
        .enumerate()
        .map(|(rank, dir)| {
            let (m, data, cfg) = (m.clone(), data.to_vec(), cfg.clone());
            let eval = (!eval.is_empty()).then(|| eval.to_vec());
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
                set_thread_group(Some(std::sync::Arc::new(g)));
                let r = fit(
                    &m,
                    &data,
                    eval.as_deref(),
                    &cfg(&dir),
                    256,
                    &CancelToken::new(),
                    &mut |_| Ok(()),
                );
                set_thread_group(None);
                r.unwrap()
            })
        })
        .collect();
    ranks.into_iter().map(|h| h.join().unwrap()).collect()
}

/// ZeRO stage 1: two ranks, each with the moments of half the parameters, train like one
/// process; a run stopped at a checkpoint and resumed on two ranks continues it exactly.
#[test]
fn zero_stage_one_trains_and_resumes_like_one_process() {
    zero_trains_and_resumes_like_one_process(1);
}

/// ZeRO stage 2: each rank also keeps only its half of the summed gradients (each block's summed
/// into the shares as every pass's backward leaves it; the last micro-batch of an epoch has no
/// example for rank 1, which sums zeros); the same as one process, and resumes exactly.
#[test]
fn zero_stage_two_trains_and_resumes_like_one_process() {
    zero_trains_and_resumes_like_one_process(2);
}

fn zero_trains_and_resumes_like_one_process(stage: usize) {
    let data = examples(13);
    let m = peft_with(5, 0.0);
    let one_dir = tempfile::tempdir().unwrap();
    let one = run(
        &m,
        &data,
        &TrainConfig {
            gradient_accumulation_steps: 2,
            max_steps: 4,
            weight_decay: 0.1,
            ..cfg(one_dir.path())
        },
        None,
    );
    let root = tempfile::tempdir().unwrap();
    let dirs = || [root.path().join("r0"), root.path().join("r1")];
    let zero = |steps: i64, resume: bool| {
        move |dir: &std::path::Path| TrainConfig {
            per_device_train_batch_size: 2,
            gradient_accumulation_steps: 2,
            max_steps: steps,
            weight_decay: 0.1,
            zero_stage: stage,
            save_steps: 2,
            resume_from_checkpoint: resume.then(|| serde_json::json!(true)),
            ..cfg(dir)
        }
    };
    let check = |reports: &[qscript_runtime::train::TrainReport], from: usize| {
        for (rank, r) in reports.iter().enumerate() {
            for (s, b) in &r.losses {
                let a = one.losses[s - 1].1;
                assert!(
                    (a - b).abs() < 1e-5,
                    "rank {rank} step {s}: one process {a}, ZeRO {b}"
                );
            }
            assert_eq!(r.losses.first().map(|l| l.0), Some(from), "rank {rank}");
            let (a, b) = (
                &lora::adapters(&one.model)[0].1.a,
                &lora::adapters(&r.model)[0].1.a,
            );
            if r.steps == 4 {
                assert!(
                    max_abs_diff(a, b) < 1e-5 * max_abs(a).max(1e-3),
                    "rank {rank} adapters"
                );
            }
        }
    };
    check(&on_two_ranks(&m, &data, &[], dirs(), zero(2, false)), 1);
    // Rank 0 wrote the checkpoint (rank 1 nothing); both resume from it.
    assert!(root.path().join("r0/checkpoint-2").is_dir());
    assert!(!root.path().join("r1/checkpoint-2").exists());
    let copy = |from: &std::path::Path, to: &std::path::Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    };
    // Rank 1 resumes from the same checkpoint (as ranks on one output dir would).
    copy(
        &root.path().join("r0/checkpoint-2"),
        &root.path().join("r1/checkpoint-2"),
    );
    check(&on_two_ranks(&m, &data, &[], dirs(), zero(4, true)), 3);
}

/// ZeRO stage 1 with `load_best_model_at_end`: rank 0 evaluates and tells the others when a new
/// best is found, every rank sends its share of the moments for that checkpoint, and at the end
/// every rank holds the best model, the one process's best.
#[test]
fn zero_stage_one_keeps_and_loads_the_best_model_like_one_process() {
    let data = examples(13);
    // Evaluated on the training rows with other targets (each token's neighbour below it in the
    // vocabulary), at a learning rate far too high: the best checkpoint is the first one.
    let eval: Vec<Example> = examples(5)
        .into_iter()
        .map(|mut e| {
            e.labels = e
                .input_ids
                .iter()
                .map(|&t| i64::from(t.saturating_sub(1)))
                .collect();
            e
        })
        .collect();
    let m = peft_with(5, 0.0);
    let best_cfg = |dir: &std::path::Path| TrainConfig {
        gradient_accumulation_steps: 2,
        max_steps: 4,
        eval_strategy: "steps".into(),
        eval_steps: Some(2),
        load_best_model_at_end: true,
        learning_rate: 0.3,
        ..cfg(dir)
    };
    let one_dir = tempfile::tempdir().unwrap();
    let one = fit(
        &m,
        &data,
        Some(&eval),
        &best_cfg(one_dir.path()),
        256,
        &CancelToken::new(),
        &mut |_| Ok(()),
    )
    .unwrap();
    let root = tempfile::tempdir().unwrap();
    // Both ranks on one output dir, as under the launcher (rank 1 writes nothing there).
    let dirs = [root.path().join("out"), root.path().join("out")];
    let reports = on_two_ranks(&m, &data, &eval, dirs, move |dir| TrainConfig {
        per_device_train_batch_size: 2,
        zero_stage: 1,
        ..best_cfg(dir)
    });
    assert!(one.loaded_best, "the one process loaded its best");
    assert_eq!(
        one.best.as_ref().map(|b| b.0.as_str()),
        Some("checkpoint-2"),
        "the best is an early checkpoint"
    );
    for (rank, r) in reports.iter().enumerate() {
        if rank == 0 {
            let (want, got) = (one.best.clone().unwrap(), r.best.clone().unwrap());
            assert_eq!(want.0, got.0, "the best checkpoint");
            assert!((want.1 - got.1).abs() < 1e-5, "{want:?} vs {got:?}");
        }
        assert!(r.loaded_best, "rank {rank} loaded the best");
        let (a, b) = (
            &lora::adapters(&one.model)[0].1.a,
            &lora::adapters(&r.model)[0].1.a,
        );
        assert!(
            max_abs_diff(a, b) < 1e-4 * max_abs(a).max(1e-3),
            "rank {rank}: the best adapters"
        );
    }
}

/// ZeRO stage 2 with every weight trained: the embedding, final norm and head sum at the end of
/// the window, the blocks as each backward leaves them; two ranks give the one process's losses
/// and weights.
#[test]
fn zero_stage_two_full_fine_tuning_trains_like_one_process() {
    let m = full_tiny(6);
    let data = examples(13);
    let base = |dir: &std::path::Path| TrainConfig {
        gradient_accumulation_steps: 2,
        max_steps: 3,
        weight_decay: 0.1,
        learning_rate: 1e-3,
        ..cfg(dir)
    };
    let one_dir = tempfile::tempdir().unwrap();
    let one = run(&m, &data, &base(one_dir.path()), None);
    let root = tempfile::tempdir().unwrap();
    let reports = on_two_ranks(
        &m,
        &data,
        &[],
        [root.path().join("r0"), root.path().join("r1")],
        move |dir| TrainConfig {
            per_device_train_batch_size: 2,
            zero_stage: 2,
            ..base(dir)
        },
    );
    let weights = |m: &Model| qscript_runtime::model::params::trainable(m);
    for (rank, r) in reports.iter().enumerate() {
        for ((s, a), (_, b)) in one.losses.iter().zip(&r.losses) {
            assert!((a - b).abs() < 1e-5, "rank {rank} step {s}: {a} vs {b}");
        }
        for ((name, a), (_, b)) in weights(&one.model).iter().zip(weights(&r.model)) {
            assert!(
                max_abs_diff(a, &b) < 1e-5 * max_abs(a).max(1e-3),
                "rank {rank}: `{name}`"
            );
        }
    }
}

/// The objective seam: an objective written outside the engine (here the causal-LM loss times
/// two) plugs into the loop without touching it, and its loss and gradients are the ones the
/// step reads back (the loss and the gradient norm double; AdamW's first step does not depend
/// on the scale, so the weights after it nearly agree).
#[test]
fn an_objective_plugs_into_the_loop_without_touching_it() {
    use qscript_runtime::nn::GradSink;
    use qscript_runtime::nn::loss::LossOut;
    use qscript_runtime::train::collective::Single;
    use qscript_runtime::train::objective::{CausalLm, Labels, Objective};
    use qscript_runtime::train::plan::RunData;
    use qscript_runtime::train::{Mode, Trainer};
    use std::sync::Arc;

    #[derive(Debug)]
    struct Twice;
    impl Objective for Twice {
        fn loss(
            &self,
            hidden: &candle_core::Tensor,
            head: &candle_core::Tensor,
            labels: Labels<'_>,
            denom: f64,
            sink: Option<&mut dyn GradSink>,
        ) -> candle_core::Result<LossOut> {
            CausalLm.loss(hidden, head, labels, denom / 2.0, sink)
        }
        fn normalizer(&self, examples: &[&Example]) -> usize {
            CausalLm.normalizer(examples)
        }
    }

    let data = Arc::new(examples(8));
    let step = |objective: Arc<dyn Objective>| {
        let dir = tempfile::tempdir().unwrap();
        let c = TrainConfig {
            max_steps: 1,
            max_grad_norm: 0.0,
            ..cfg(dir.path())
        };
        let mut t = Trainer::start(
            &peft(3),
            RunData::new(data.clone(), None),
            &c,
            256,
            Arc::new(Single::new()),
            objective,
            Mode::Train,
        )
        .unwrap();
        let w = t.windows().remove(0);
        t.step(&w).unwrap();
        t.read_step().unwrap()
    };
    let (loss, norm) = step(Arc::new(CausalLm));
    let (loss2, norm2) = step(Arc::new(Twice));
    assert!((loss2 - 2.0 * loss).abs() < 1e-5 * loss, "{loss} {loss2}");
    assert!((norm2 - 2.0 * norm).abs() < 1e-4 * norm, "{norm} {norm2}");
}

/// `qscript check`'s executor runs the same loop through every step: the plan, the windows and
/// the learning rates of the real run, with nothing computed and nothing written.
#[test]
fn the_check_executor_runs_the_loop_and_writes_nothing() {
    use qscript_runtime::train::collective::Single;
    use qscript_runtime::train::objective::CausalLm;
    use qscript_runtime::train::plan::RunData;
    use qscript_runtime::train::{Mode, Trainer};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let c = TrainConfig {
        save_steps: 2,
        lr_scheduler_type: "linear".into(),
        ..cfg(&out)
    };
    let data = Arc::new(examples(12));
    let start = |mode| {
        Trainer::start(
            &peft(0),
            RunData::new(data.clone(), None),
            &c,
            256,
            Arc::new(Single::new()),
            Arc::new(CausalLm),
            mode,
        )
        .unwrap()
    };
    let mut dry = start(Mode::Check);
    let mut steps = Vec::new();
    while !dry.is_done() {
        for w in dry.windows() {
            let o = dry.step(&w).unwrap();
            assert!(o.events.iter().all(|e| matches!(e, Event::Step { .. })));
            assert!(dry.read_step().unwrap().0.is_nan());
            steps.push((w, o.learning_rate));
        }
    }
    assert_eq!(steps.len(), 6);
    assert!(dry.save_checkpoint().unwrap().ends_with("checkpoint-6"));
    assert!(!out.exists(), "a dry run writes nothing");
    let mut real = start(Mode::Train);
    for (w, lr) in &steps {
        assert_eq!(&real.windows()[0], w);
        assert_eq!(real.step(w).unwrap().learning_rate, *lr);
    }
    assert!(real.is_done());
    assert!(out.join("checkpoint-6").is_dir());
}

/// HF's `eval_strategy: "epoch"` and `save_strategy: "epoch"`: an evaluation and a checkpoint at
/// exactly each epoch's end (and at the last step, where HF's last, partial epoch ends); none
/// between. `save_strategy: "no"` writes none even with `save_steps`.
#[test]
fn epoch_strategies_evaluate_and_save_at_the_epoch_ends() {
    // 8 examples, 2 a micro-batch, 2 micro-batches a step: 2 steps an epoch.
    let data = examples(8);
    let at = |c: &TrainConfig| {
        let (mut step, mut evals, mut saves) = (0, Vec::new(), Vec::new());
        fit(
            &peft(3),
            &data,
            Some(&data),
            c,
            256,
            &CancelToken::new(),
            &mut |e| {
                match e {
                    Event::Step { step: s, .. } => step = *s,
                    Event::Eval(_) => evals.push(step),
                    Event::Saved(p) => {
                        saves.push(p.file_name().unwrap().to_string_lossy().into_owned());
                    }
                    _ => {}
                }
                Ok(())
            },
        )
        .unwrap();
        (evals, saves)
    };
    let dir = tempfile::tempdir().unwrap();
    let epochs = TrainConfig {
        per_device_train_batch_size: 2,
        gradient_accumulation_steps: 2,
        max_steps: -1,
        num_train_epochs: 3.0,
        eval_strategy: "epoch".into(),
        save_strategy: "epoch".into(),
        save_steps: 1,
        ..cfg(dir.path())
    };
    let (evals, saves) = at(&epochs);
    assert_eq!(evals, [2, 4, 6]);
    assert_eq!(saves, ["checkpoint-2", "checkpoint-4", "checkpoint-6"]);
    // Stopped by `max_steps` inside the third epoch: its (partial) end is the last step.
    let dir = tempfile::tempdir().unwrap();
    let (evals, saves) = at(&TrainConfig {
        max_steps: 5,
        ..TrainConfig {
            output_dir: dir.path().to_string_lossy().into_owned(),
            ..epochs.clone()
        }
    });
    assert_eq!(evals, [2, 4, 5]);
    assert_eq!(saves, ["checkpoint-2", "checkpoint-4", "checkpoint-5"]);
    // `save_strategy: "no"` saves nothing; `"steps"` keeps `save_steps`.
    let dir = tempfile::tempdir().unwrap();
    let (evals, saves) = at(&TrainConfig {
        save_strategy: "no".into(),
        eval_strategy: "no".into(),
        ..TrainConfig {
            output_dir: dir.path().to_string_lossy().into_owned(),
            ..epochs.clone()
        }
    });
    assert!(evals.is_empty() && saves.is_empty(), "{evals:?} {saves:?}");
    let dir = tempfile::tempdir().unwrap();
    let (_, saves) = at(&TrainConfig {
        save_strategy: "steps".into(),
        save_steps: 3,
        ..TrainConfig {
            output_dir: dir.path().to_string_lossy().into_owned(),
            ..epochs.clone()
        }
    });
    assert_eq!(saves, ["checkpoint-3", "checkpoint-6"]);
}

/// HF's names for the options users set: `optim` (AdamW's names), `lr_scheduler_type:
/// "cosine_with_min_lr"` with `lr_scheduler_kwargs`; other optimizers and NEFTune are errors
/// that say what works.
#[test]
fn hf_optim_and_scheduler_names() {
    let data = examples(4);
    let dir = tempfile::tempdir().unwrap();
    let go = |c: TrainConfig| {
        fit(
            &peft(3),
            &data,
            None,
            &c,
            256,
            &CancelToken::new(),
            &mut |_| Ok(()),
        )
        .map(|r| r.steps)
        .map_err(|e| e.to_string())
    };
    for name in ["adamw_torch", "adamw_torch_fused", "adamw_hf"] {
        assert_eq!(
            go(TrainConfig {
                optim: name.into(),
                max_steps: 1,
                ..cfg(dir.path())
            }),
            Ok(1)
        );
    }
    let e = go(TrainConfig {
        optim: "adafactor".into(),
        ..cfg(dir.path())
    })
    .unwrap_err();
    assert!(e.contains("`optim` `adafactor` is not supported; qscript's optimizer is AdamW: use `adamw_torch` (also spelled `adamw_torch_fused` or `adamw_hf`), or `adamw_8bit` (`adamw_bnb_8bit`, `paged_adamw_8bit`)"), "{e}");
    let e = go(TrainConfig {
        optim: "adamw_8bit".into(),
        zero_stage: 1,
        ..cfg(dir.path())
    })
    .unwrap_err();
    assert!(
        e.contains("`optim` `adamw_8bit` with `zero_stage` 1: 8-bit states are not sharded"),
        "{e}"
    );
    let e = go(TrainConfig {
        neftune_noise_alpha: Some(5.0),
        ..cfg(dir.path())
    })
    .unwrap_err();
    assert!(
        e.contains("`neftune_noise_alpha` (5) is not supported yet"),
        "{e}"
    );
    let kw = |v: serde_json::Value| TrainConfig {
        lr_scheduler_type: "cosine_with_min_lr".into(),
        lr_scheduler_kwargs: Some(v),
        max_steps: 2,
        ..cfg(dir.path())
    };
    assert_eq!(go(kw(serde_json::json!({ "min_lr": 1e-4 }))), Ok(2));
    assert_eq!(go(kw(serde_json::json!({ "min_lr_rate": 0.1 }))), Ok(2));
    let e = go(kw(serde_json::json!({}))).unwrap_err();
    assert!(
        e.contains("needs `min_lr` or `min_lr_rate` in `lr_scheduler_kwargs`"),
        "{e}"
    );
    let e = go(TrainConfig {
        eval_strategy: "epoch".into(),
        ..cfg(dir.path())
    })
    .unwrap_err();
    assert!(
        e.contains("`eval_strategy: \"epoch\"` needs an eval dataset"),
        "{e}"
    );
    let e = go(TrainConfig {
        save_strategy: "best".into(),
        ..cfg(dir.path())
    })
    .unwrap_err();
    assert!(
        e.contains("`save_strategy` `best` is not supported; use `steps`, `epoch` or `no`"),
        "{e}"
    );
}

/// `optim: "adamw_8bit"` (bitsandbytes' 8-bit states; the arithmetic is checked against
/// bitsandbytes in `train::optim::eight_bit`) trains full fine-tuning as AdamW does, within the
/// states' rounding, and a resumed run reproduces the uninterrupted one exactly (the blocks'
/// absmax are saved beside the moments).
#[test]
fn eight_bit_adamw_trains_and_resumes_exactly() {
    let data = examples(12);
    let c8 = |d: &std::path::Path| TrainConfig {
        optim: "adamw_8bit".into(),
        weight_decay: 0.01,
        ..cfg(d)
    };
    let d0 = tempfile::tempdir().unwrap();
    let f32_run = run(&full_tiny(4), &data, &cfg(d0.path()), None);
    let d1 = tempfile::tempdir().unwrap();
    let full = run(&full_tiny(4), &data, &c8(d1.path()), None);
    let (first, last) = (full.losses[0].1, full.losses.last().unwrap().1);
    assert!(last < first * 0.9, "{:?}", full.losses);
    for (a, b) in full.losses.iter().zip(&f32_run.losses) {
        assert!((a.1 - b.1).abs() < 0.02 * b.1, "8-bit {a:?} vs f32 {b:?}");
    }
    let d2 = tempfile::tempdir().unwrap();
    let c = c8(d2.path());
    assert!(run(&full_tiny(4), &data, &c, Some(3)).interrupted);
    let resumed = run(
        &full_tiny(4),
        &data,
        &TrainConfig {
            resume_from_checkpoint: Some(serde_json::json!(true)),
            ..c
        },
        None,
    );
    let tail: Vec<f64> = full.losses.iter().skip(3).map(|l| l.1).collect();
    let got: Vec<f64> = resumed.losses.iter().map(|l| l.1).collect();
    assert_eq!(got, tail);
}

/// A run stopped because `--watch` saw the recipe change (`cancel_superseded`) keeps no Ctrl-C
/// checkpoint: the edited recipe runs again, and no stale "unfinished run" blocks the next one.
#[test]
fn a_run_superseded_by_an_edit_leaves_no_checkpoint() {
    let data = examples(12);
    let d = tempfile::tempdir().unwrap();
    let cancel = CancelToken::new();
    let c2 = cancel.clone();
    let r = fit(
        &peft(2),
        &data,
        None,
        &cfg(d.path()),
        256,
        &cancel,
        &mut |e| {
            if let Event::Step { step: 3, .. } = e {
                c2.cancel_superseded();
            }
            Ok(())
        },
    )
    .unwrap();
    assert!(r.interrupted);
    assert!(r.last_checkpoint.is_none());
    assert!(!d.path().join("checkpoint-3").exists());
    assert!(qscript_runtime::train::checkpoint::unfinished(d.path()).is_none());
}

/// LoRA on a 4-bit base (QLoRA, the CPU reference path): the loss falls, a resumed run
/// reproduces the uninterrupted one, checkpointing gives the same gradients, and the merged
/// model is a float model.
#[test]
fn qlora_trains_resumes_and_merges_on_a_4bit_base() {
    use qscript_runtime::quant::{Quant4Config, QuantType};
    let saved = tempfile::tempdir().unwrap();
    tiny(&TinyConfig {
        hidden: 64,
        layers: 2,
        intermediate: 128,
        seed: 4,
        ..TinyConfig::default()
    })
    .unwrap()
    .save(saved.path())
    .unwrap();
    let qlora = || {
        let opts = qscript_runtime::model::LoadOptions {
            dtype: "f32".into(),
            device: "cpu".into(),
            quant: Some(Quant4Config {
                quant_type: QuantType::Nf4,
                double_quant: true,
            }),
            ..Default::default()
        };
        let base = Model::load(saved.path(), &opts).unwrap();
        let cfg = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.1,
            target_modules: Targets::Pattern("all-linear".into()),
            ..LoraConfig::default()
        };
        lora::attach(&base, &cfg, 4).unwrap()
    };
    let data = examples(12);
    let d1 = tempfile::tempdir().unwrap();
    let long = run(
        &qlora(),
        &data,
        &TrainConfig {
            max_steps: 40,
            learning_rate: 3e-2,
            ..cfg(d1.path())
        },
        None,
    );
    let (first, last) = (long.losses[0].1, long.losses.last().unwrap().1);
    assert!(last < 0.8 * first, "QLoRA: loss {first} -> {last}");
    let d2 = tempfile::tempdir().unwrap();
    let full = run(&qlora(), &data, &cfg(d2.path()), None);
    let d3 = tempfile::tempdir().unwrap();
    let c = TrainConfig {
        gradient_checkpointing: qscript_runtime::train::Checkpointing::On,
        ..cfg(d3.path())
    };
    let first = run(&qlora(), &data, &c, Some(3));
    assert!(first.interrupted);
    let resumed = run(
        &qlora(),
        &data,
        &TrainConfig {
            resume_from_checkpoint: Some(serde_json::json!(true)),
            ..c
        },
        None,
    );
    let tail: Vec<f64> = full.losses.iter().skip(3).map(|l| l.1).collect();
    let got: Vec<f64> = resumed.losses.iter().map(|l| l.1).collect();
    assert_eq!(tail.len(), got.len());
    for (a, b) in tail.iter().zip(&got) {
        assert!((a - b).abs() < 1e-5, "{tail:?} vs {got:?}");
    }
    let merged = lora::merge(&resumed_model(&qlora(), d3.path())).unwrap();
    assert!(merged.quant4().is_none());
}

/// `model` with the adapter of the newest checkpoint in `dir`.
fn resumed_model(model: &Model, dir: &std::path::Path) -> Model {
    let (_, ck) = qscript_runtime::train::checkpoint::list(dir).pop().unwrap();
    lora::load_adapter(model, &ck).unwrap()
}
