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
