//! LoRA against PEFT: adapters written by PEFT load with the same outputs and the same loss,
//! LoRA gradients match PEFT's, `print_trainable_parameters` prints what PEFT prints, and the
//! invariants: B = 0 equals the base, merged equals unmerged, only adapters get gradients, and
//! save -> load is bit-identical.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use qscript_runtime::lora::{self, LoraConfig, Targets};
use qscript_runtime::model::{LoadOptions, Model};
use qscript_runtime::nn::AttnMask;
use qscript_runtime::nn::ops::cross_entropy;
use qscript_runtime::testing::repo_fixtures;
use qscript_runtime::train::engine::gradients;

const CASES: &[(&str, &str)] = &[
    ("qwen2-qkvo-r4", "tiny-qwen2"),
    ("llama3-all-linear-rslora", "tiny-llama3"),
    ("qwen3-regex-r2", "tiny-qwen3"),
];

fn base(name: &str) -> Model {
    let o = LoadOptions {
        dtype: "f32".into(),
        device: "cpu".into(),
        trainable: false,
        ..Default::default()
    };
    Model::load(&repo_fixtures().join("models").join(name), &o).unwrap()
}

fn golden(case: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        repo_fixtures()
            .join("lora")
            .join(case)
            .join("golden.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

use qscript_runtime::testing::max_abs_diff as max_diff;

fn loss(m: &Model, g: &HashMap<String, Tensor>) -> (Tensor, Tensor) {
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let logits = m
        .decoder
        .forward(&ids, Some(&g["attention_mask"]), None)
        .unwrap();
    let (b, s, v) = logits.dims3().unwrap();
    let shifted = logits
        .i((.., ..s - 1))
        .unwrap()
        .reshape((b * (s - 1), v))
        .unwrap();
    let labels = g["labels"].i((.., 1..)).unwrap().flatten_all().unwrap();
    (cross_entropy(&shifted, &labels).unwrap().0, logits)
}

#[test]
fn peft_adapters_load_with_the_same_outputs_loss_and_gradients() {
    for (case, model) in CASES {
        let g = golden(case);
        let m = lora::load_adapter(&base(model), &repo_fixtures().join("lora").join(case)).unwrap();
        let (loss, logits) = loss(&m, &g);
        let d0 = max_diff(&logits.i(0).unwrap(), &g["logits"].i(0).unwrap());
        let d1 = max_diff(
            &logits.i((1, 2..)).unwrap(),
            &g["logits"].i((1, 2..)).unwrap(),
        );
        assert!(
            d0 < 1e-4 && d1 < 1e-4,
            "{case}: logits differ by {d0} / {d1}"
        );
        let (got, want): (f32, f32) = (loss.to_scalar().unwrap(), g["loss"].to_scalar().unwrap());
        assert!((got - want).abs() < 1e-5, "{case}: loss {got} vs {want}");
        // The training engine (block-wise, hand-written backward) gives PEFT's loss and gradients.
        let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
        let mask = AttnMask::from_attention_mask(&g["attention_mask"], 0).unwrap();
        let labels = g["labels"].flatten_all().unwrap().to_vec1::<i64>().unwrap();
        let (engine_loss, grads) = gradients(&m, &ids, &mask, &labels, None, false).unwrap();
        assert!(
            (engine_loss as f32 - want).abs() < 1e-5,
            "{case}: engine loss {engine_loss} vs {want}"
        );
        assert_eq!(
            grads.len(),
            g.keys().filter(|k| k.starts_with("grad.")).count(),
            "{case}: adapter count"
        );
        for (name, got) in &grads {
            // Only adapters are trainable: nothing else gets a gradient.
            assert!(
                name.contains(".lora_"),
                "{case}: frozen {name} got a gradient"
            );
            let want = &g[&format!("grad.{name}")];
            let scale = qscript_runtime::testing::max_abs(want);
            let d = max_diff(got, want);
            assert!(
                scale > 0.0 && d <= 1e-5 + 1e-3 * scale,
                "{case}: {name} gradient differs by {d} (scale {scale})"
            );
        }
        let printed = std::fs::read_to_string(
            repo_fixtures()
                .join("lora")
                .join(case)
                .join("print_trainable_parameters.txt"),
        )
        .unwrap();
        assert_eq!(lora::trainable_parameters(&m), printed.trim(), "{case}");
    }
}

#[test]
fn fresh_adapters_start_at_the_base_model_and_merge_exactly() {
    let m = base("tiny-qwen2");
    let cfg = LoraConfig {
        r: 4,
        lora_alpha: 16.0,
        target_modules: Targets::Pattern("all-linear".into()),
        ..LoraConfig::default()
    };
    let peft = lora::attach(&m, &cfg, 1).unwrap();
    assert!(
        m.lora.is_none() && lora::adapters(&m).is_empty(),
        "the input model is not changed"
    );
    let ids = Tensor::new(&[[5u32, 9, 17, 33, 2]], &Device::Cpu).unwrap();
    let base_out = m.decoder.forward(&ids, None, None).unwrap();
    assert_eq!(
        max_diff(&peft.decoder.forward(&ids, None, None).unwrap(), &base_out),
        0.0,
        "B = 0"
    );
    // Nonzero B: merged equals unmerged.
    let loaded = lora::load_adapter(
        &base("tiny-qwen2"),
        &repo_fixtures().join("lora/qwen2-qkvo-r4"),
    )
    .unwrap();
    let merged = lora::merge(&loaded).unwrap();
    assert!(lora::adapters(&merged).is_empty());
    let a = loaded.decoder.forward(&ids, None, None).unwrap();
    let b = merged.decoder.forward(&ids, None, None).unwrap();
    assert!(
        max_diff(&a, &b) < 1e-5,
        "merged differs by {}",
        max_diff(&a, &b)
    );
    assert!(
        max_diff(&a, &base_out) > 1e-3,
        "the adapter changes the output"
    );
}

#[test]
fn adapter_save_then_load_is_bit_identical() {
    let m = lora::load_adapter(
        &base("tiny-llama3"),
        &repo_fixtures().join("lora/llama3-all-linear-rslora"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    lora::save_adapter(&m, dir.path()).unwrap();
    let again = lora::load_adapter(&base("tiny-llama3"), dir.path()).unwrap();
    for ((n1, v1), (n2, v2)) in lora::adapter_tensors(&m)
        .iter()
        .zip(lora::adapter_tensors(&again).iter())
    {
        assert_eq!(n1, n2);
        let (a, b) = (
            v1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            v2.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{n1}"
        );
    }
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    // PEFT saved this adapter with `all-linear` expanded to the 14 module paths; they round-trip.
    assert_eq!(cfg["target_modules"].as_array().map(Vec::len), Some(14));
    assert_eq!(cfg["use_rslora"], true);
}

#[test]
fn bad_lora_configs_are_explained() {
    let m = base("tiny-qwen2");
    let e = lora::attach(
        &m,
        &LoraConfig {
            target_modules: Targets::Names(vec!["c_attn".into()]),
            ..LoraConfig::default()
        },
        0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("`c_attn` matches no module of this model; its linear layers are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"), "{e}");
    let e = lora::attach(
        &m,
        &LoraConfig {
            r: 0,
            ..LoraConfig::default()
        },
        0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("`r` must be at least 1"), "{e}");
    let e = lora::attach(
        &m,
        &LoraConfig {
            target_modules: Targets::Pattern("(".into()),
            ..LoraConfig::default()
        },
        0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("not a valid regex"), "{e}");
}

/// The 4-bit fixtures bitsandbytes made (`scripts/make_bnb_goldens.py`).
fn bnb(name: &str) -> std::path::PathBuf {
    repo_fixtures().join("bnb").join(name)
}

fn load_4bit(dir: &str, quant: Option<qscript_runtime::quant::Quant4Config>) -> Model {
    let o = LoadOptions {
        dtype: "f32".into(),
        device: "cpu".into(),
        quant,
        ..Default::default()
    };
    Model::load(&bnb(dir), &o).unwrap()
}

/// A checkpoint bitsandbytes saved in 4 bits loads as it is; quantizing the same bf16 weights on
/// load gives bitsandbytes' 4-bit codes (the double-quantized absmax within one 8-bit code: its
/// CPU kernel rounds a value near a midpoint the other way now and then).
#[test]
fn a_bitsandbytes_checkpoint_and_quantizing_on_load_agree() {
    use qscript_runtime::nn::Weight;
    use qscript_runtime::quant::{Absmax, Quant4Config, QuantType};
    let stored = load_4bit("tiny-nf4", None);
    let cfg = Quant4Config {
        quant_type: QuantType::Nf4,
        double_quant: true,
    };
    let ours = load_4bit("tiny-bf16", Some(cfg));
    assert!(
        stored.to_string().contains("nf4 (float32 compute)"),
        "{stored}"
    );
    let mut layers = 0;
    for (a, b) in stored.decoder.blocks.iter().zip(&ours.decoder.blocks) {
        for p in qscript_runtime::model::block::Proj::ALL {
            let (Weight::Quant4(x), Weight::Quant4(y)) = (&a.proj(p).weight, &b.proj(p).weight)
            else {
                panic!("{p:?} is not 4-bit");
            };
            assert_eq!(
                x.packed.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
                y.packed.to_vec1::<u8>().unwrap(),
                "{p:?} codes"
            );
            let (Absmax::Nested { codes: cx, .. }, Absmax::Nested { codes: cy, .. }) =
                (&x.absmax, &y.absmax)
            else {
                panic!("{p:?}: no double quantization");
            };
            let (cx, cy) = (cx.to_vec1::<u8>().unwrap(), cy.to_vec1::<u8>().unwrap());
            assert!(
                cx.iter().zip(&cy).all(|(a, b)| a.abs_diff(*b) <= 1),
                "{p:?}"
            );
            let d = max_diff(
                &x.dequantize(DType::F32).unwrap(),
                &y.dequantize(DType::F32).unwrap(),
            );
            assert!(d < 1e-3, "{p:?}: dequantized weights differ by {d}");
            layers += 1;
        }
    }
    assert_eq!(layers, 14);
    // The head, embedding and norms stay in the compute dtype.
    assert_eq!(stored.decoder.head_weight().dtype(), DType::F32);
}

/// One QLoRA step on bitsandbytes' 4-bit model gives PEFT's loss and adapter gradients.
#[test]
fn a_qlora_step_matches_peft_on_bitsandbytes() {
    let g = candle_core::safetensors::load(bnb("qlora_step.safetensors"), &Device::Cpu).unwrap();
    let m = lora::load_adapter(&load_4bit("tiny-nf4", None), &bnb("qlora-adapter")).unwrap();
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let (b, s) = ids.dims2().unwrap();
    let mask =
        AttnMask::from_attention_mask(&Tensor::ones((b, s), DType::I64, &Device::Cpu).unwrap(), 0)
            .unwrap();
    let labels = g["input_ids"]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap();
    let (loss, grads) = gradients(&m, &ids, &mask, &labels, None, false).unwrap();
    let want: f32 = g["loss"].to_vec1::<f32>().unwrap()[0];
    assert!((loss as f32 - want).abs() < 1e-5, "loss {loss} vs {want}");
    assert_eq!(grads.len(), 2 * 7 * 2);
    for (name, got) in &grads {
        let want = &g[name];
        let scale = qscript_runtime::testing::max_abs(want);
        let d = max_diff(got, want);
        assert!(
            scale > 0.0 && d <= 1e-5 + 1e-3 * scale,
            "{name} gradient differs by {d} (scale {scale})"
        );
    }
    // Merged, the 4-bit base is dequantized and the adapter folded in: the same outputs.
    let merged = lora::merge(&m).unwrap();
    assert!(merged.quant4().is_none());
    let x = merged.decoder.forward(&ids, None, None).unwrap();
    let y = m.decoder.forward(&ids, None, None).unwrap();
    assert!(max_diff(&x, &y) < 1e-4);
}

/// A 4-bit model saves in bitsandbytes' layout with its `quantization_config`, and loads back
/// value for value.
#[test]
fn a_4bit_model_saves_as_bitsandbytes_does() {
    use qscript_runtime::nn::Weight;
    let m = load_4bit("tiny-nf4", None);
    let dir = tempfile::tempdir().unwrap();
    m.save(dir.path()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    let q = &cfg["quantization_config"];
    assert_eq!(q["quant_method"], "bitsandbytes");
    assert_eq!(q["bnb_4bit_quant_type"], "nf4");
    assert_eq!(q["bnb_4bit_use_double_quant"], true);
    let back = Model::load(
        dir.path(),
        &LoadOptions {
            dtype: "f32".into(),
            device: "cpu".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let (Weight::Quant4(a), Weight::Quant4(b)) = (
        &m.decoder.blocks[1].mlp.down.weight,
        &back.decoder.blocks[1].mlp.down.weight,
    ) else {
        panic!("not 4-bit");
    };
    assert_eq!(
        a.dequantize(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
        b.dequantize(DType::F32).unwrap().to_vec2::<f32>().unwrap()
    );
    // Every tensor name is one bitsandbytes writes.
    let names_of = |p: &std::path::Path| {
        let mut n: Vec<String> = candle_core::safetensors::load(p, &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
        n.sort();
        n
    };
    let names = names_of(&dir.path().join("model.safetensors"));
    let want = names_of(&bnb("tiny-nf4/model.safetensors"));
    assert_eq!(names, want);
}

/// A 4-bit checkpoint whose parts do not fit, or options a 4-bit load cannot take, are named.
#[test]
fn bad_4bit_checkpoints_and_options_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(bnb("tiny-nf4").join(f), dir.path().join(f)).unwrap();
    }
    let bytes = std::fs::read(bnb("tiny-nf4/model.safetensors")).unwrap();
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    let victim = "model.layers.0.self_attn.q_proj.weight";
    tensors.remove(&format!("{victim}.quant_state.bitsandbytes__nf4"));
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let o = LoadOptions {
        dtype: "f32".into(),
        device: "cpu".into(),
        ..Default::default()
    };
    let e = Model::load(dir.path(), &o).unwrap_err().to_string();
    assert!(e.contains(victim) && e.contains("quant_state"), "{e}");
    // A nested absmax of the wrong size.
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    tensors.insert(
        format!("{victim}.absmax"),
        Tensor::zeros(3, DType::U8, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let e = Model::load(dir.path(), &o).unwrap_err().to_string();
    assert!(e.contains(&format!("{victim}.absmax")), "{e}");
    // 8-bit and other quantization methods.
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bnb("tiny-nf4/config.json")).unwrap())
            .unwrap();
    cfg["quantization_config"]["load_in_8bit"] = true.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let e = Model::load(dir.path(), &o).unwrap_err().to_string();
    assert!(e.contains("8-bit") && e.contains("config.json"), "{e}");
    cfg["quantization_config"] = serde_json::json!({"quant_method": "gptq", "bits": 4});
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let e = Model::load(dir.path(), &o).unwrap_err().to_string();
    assert!(e.contains("`gptq`"), "{e}");
    // Full fine-tuning of a 4-bit model.
    let e = Model::load(
        &bnb("tiny-bf16"),
        &LoadOptions {
            trainable: true,
            quant: Some(qscript_runtime::quant::Quant4Config::default()),
            ..o.clone()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("adapters only"), "{e}");
}
