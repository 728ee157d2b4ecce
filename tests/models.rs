//! The decoder against transformers: logits (with padding and through the KV cache), the loss, and
//! the gradient of every weight, on tiny random Qwen2, Qwen3 and Llama-3 checkpoints made by
//! `scripts/make_model_goldens.py`.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use qscript_runtime::model::{KvCache, LoadOptions, Model};
use qscript_runtime::nn::ops::cross_entropy;
use qscript_runtime::testing::repo_fixtures;

const MODELS: &[&str] = &["tiny-qwen2", "tiny-qwen3", "tiny-llama3"];

fn cpu_f32(trainable: bool) -> LoadOptions {
    LoadOptions {
        dtype: "f32".into(),
        device: "cpu".into(),
        trainable,
    }
}

fn load(name: &str, trainable: bool) -> (Model, HashMap<String, Tensor>) {
    let dir = repo_fixtures().join("models").join(name);
    let m = Model::load(&dir, &cpu_f32(trainable)).unwrap();
    let g = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
    (m, g)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    a.sub(b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn logits_match_transformers_with_padding() {
    for name in MODELS {
        let (m, g) = load(name, false);
        let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
        let mask = &g["attention_mask"];
        let logits = m.decoder.forward(&ids, Some(mask), None).unwrap();
        // Row 0 is unpadded; row 1 is left-padded by 2: compare its real positions.
        let d0 = max_diff(&logits.i(0).unwrap(), &g["logits"].i(0).unwrap());
        let d1 = max_diff(
            &logits.i((1, 2..)).unwrap(),
            &g["logits"].i((1, 2..)).unwrap(),
        );
        assert!(d0 < 1e-4 && d1 < 1e-4, "{name}: max |diff| {d0} / {d1}");
    }
}

#[test]
fn kv_cache_decoding_matches_transformers_and_the_full_forward() {
    for name in MODELS {
        let (m, g) = load(name, false);
        let ids = g["input_ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .i(0..1)
            .unwrap();
        let mut cache = KvCache::new(m.config().num_hidden_layers);
        let pre = m
            .decoder
            .forward(&ids.i((.., 0..4)).unwrap(), None, Some(&mut cache))
            .unwrap();
        assert!(
            max_diff(&pre, &g["prefill_logits"]) < 1e-4,
            "{name} prefill"
        );
        let full = m.decoder.forward(&ids, None, None).unwrap();
        for (k, t) in (4..7).enumerate() {
            let step = m
                .decoder
                .forward(&ids.i((.., t..=t)).unwrap(), None, Some(&mut cache))
                .unwrap();
            let step = step.i((0, 0)).unwrap();
            assert!(
                max_diff(&step, &g["step_logits"].i(k).unwrap()) < 1e-4,
                "{name} step {k}"
            );
            assert!(
                max_diff(&step, &full.i((0, t)).unwrap()) < 1e-4,
                "{name} step {k} vs full"
            );
        }
        assert_eq!(cache.len(), 7);
    }
}

#[test]
fn loss_and_every_gradient_match_transformers() {
    for name in MODELS {
        let (m, g) = load(name, true);
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
        let (loss, _) = cross_entropy(&shifted, &labels).unwrap();
        let want: f32 = g["loss"].to_scalar().unwrap();
        let got: f32 = loss.to_scalar().unwrap();
        assert!((got - want).abs() < 1e-5, "{name}: loss {got} vs {want}");
        let grads = loss.backward().unwrap();
        assert!(!m.vars.is_empty());
        for (pname, var) in &m.vars {
            let got = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
            let want = &g[&format!("grad.{pname}")];
            let scale: f32 = want
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap();
            let d = max_diff(got, want);
            assert!(
                scale > 0.0 && d.is_finite(),
                "{name}: {pname} zero or non-finite gradient"
            );
            assert!(
                d <= 1e-5 + 1e-3 * scale,
                "{name}: {pname} gradient differs by {d} (scale {scale})"
            );
        }
        assert_eq!(
            m.vars.len(),
            g.keys().filter(|k| k.starts_with("grad.")).count(),
            "{name}: every parameter"
        );
    }
}

#[test]
fn stories260k_greedy_decoding_matches_its_golden() {
    let Some(fx) = qscript_runtime::testing::fixtures_dir("the stories260K checkpoint") else {
        return;
    };
    let root = fx.join("models/stories260K");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("golden_greedy.json")).unwrap())
            .unwrap();
    let ids = |k: &str| -> Vec<u32> {
        golden[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
            .collect()
    };
    let (prompt, want) = (ids("prompt_ids"), ids("greedy_ids"));
    let m = Model::load(&root.join("hf"), &cpu_f32(false)).unwrap();
    let opts = qscript_runtime::model::GenerateOptions {
        max_new_tokens: want.len() - prompt.len(),
        ..Default::default()
    };
    let cancel = qscript_runtime::cancel::CancelToken::new();
    let new = m
        .generate(&prompt, &opts, &cancel, &mut |_| Ok(()))
        .unwrap();
    let got: Vec<u32> = prompt.iter().chain(&new).copied().collect();
    assert_eq!(got, want);
}
