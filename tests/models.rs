//! The decoder against transformers: logits (with padding and through the KV cache), the loss, and
//! the gradient of every weight, on tiny random Qwen2, Qwen3 and Llama-3 checkpoints made by
//! `scripts/make_model_goldens.py`.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use qscript_runtime::model::{KvCache, LoadOptions, Model};
use qscript_runtime::nn::AttnMask;
use qscript_runtime::nn::ops::cross_entropy;
use qscript_runtime::testing::repo_fixtures;
use qscript_runtime::train::engine::gradients;

const MODELS: &[&str] = &[
    "tiny-qwen2",
    "tiny-qwen3",
    "tiny-llama3",
    "tiny-qwen2-yarn",
    "tiny-llama-dynamic",
];

fn cpu_f32(trainable: bool) -> LoadOptions {
    LoadOptions {
        dtype: "f32".into(),
        device: "cpu".into(),
        trainable,
        ..Default::default()
    }
}

fn load(name: &str, trainable: bool) -> (Model, HashMap<String, Tensor>) {
    let dir = repo_fixtures().join("models").join(name);
    let m = Model::load(&dir, &cpu_f32(trainable)).unwrap();
    let g = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
    (m, g)
}

use qscript_runtime::testing::max_abs_diff as max_diff;

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
            // Dynamic RoPE rotates the cached keys with the base of the length they were made at,
            // so only its full forward sees one base (as in transformers).
            assert!(
                name.contains("dynamic") || max_diff(&step, &full.i((0, t)).unwrap()) < 1e-4,
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
        // The training engine (block-wise, hand-written backward) on the same batch, with and
        // without recomputation.
        let mask = AttnMask::from_attention_mask(&g["attention_mask"], 0).unwrap();
        let labels = g["labels"].flatten_all().unwrap().to_vec1::<i64>().unwrap();
        for recompute in [false, true] {
            let (engine_loss, grads) =
                gradients(&m, &ids, &mask, &labels, None, recompute).unwrap();
            assert!(
                (engine_loss as f32 - want).abs() < 1e-5,
                "{name}: engine loss {engine_loss} vs {want}"
            );
            assert!(!grads.is_empty());
            for (pname, got) in &grads {
                let want = &g[&format!("grad.{pname}")];
                let scale = qscript_runtime::testing::max_abs(want);
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
                grads.len(),
                g.keys().filter(|k| k.starts_with("grad.")).count(),
                "{name}: every parameter"
            );
        }
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

/// A copy of the tiny Qwen2 checkpoint in a temp dir, to break.
fn scratch_checkpoint() -> tempfile::TempDir {
    let src = repo_fixtures().join("models/tiny-qwen2");
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn load_err(dir: &std::path::Path) -> String {
    Model::load(dir, &cpu_f32(false)).unwrap_err().to_string()
}

fn edit_config(dir: &std::path::Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, v.to_string()).unwrap();
}

#[test]
fn bad_checkpoints_are_explained() {
    let missing = load_err(std::path::Path::new("/no/such/model"));
    assert!(
        missing.contains("`/no/such/model`: no such checkpoint directory"),
        "{missing}"
    );

    let d = scratch_checkpoint();
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("config.json`: No such file"), "{e}");

    let d = scratch_checkpoint();
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("no `model.safetensors` or `model.safetensors.index.json`"),
        "{e}"
    );

    let d = scratch_checkpoint();
    edit_config(d.path(), |v| {
        v["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    });
    let e = load_err(d.path());
    assert!(
        e.contains("unsupported architecture `GPTNeoXForCausalLM`; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"),
        "{e}"
    );

    let d = scratch_checkpoint();
    edit_config(d.path(), |v| {
        v.as_object_mut().unwrap().remove("num_hidden_layers");
    });
    let e = load_err(d.path());
    assert!(
        e.contains("config.json`: missing field `num_hidden_layers`"),
        "{e}"
    );

    let d = scratch_checkpoint();
    edit_config(d.path(), |v| {
        v["num_hidden_layers"] = serde_json::json!(3);
    });
    let e = load_err(d.path());
    assert!(
        e.contains(
            "tensor `model.layers.2.self_attn.q_proj.weight` is missing from the checkpoint"
        ),
        "{e}"
    );

    let d = scratch_checkpoint();
    edit_config(d.path(), |v| {
        v["intermediate_size"] = serde_json::json!(48);
    });
    let e = load_err(d.path());
    assert!(
        e.contains("tensor `model.layers.0.mlp.gate_proj.weight`")
            && e.contains("has shape [64, 32], but the config implies [48, 32]"),
        "{e}"
    );

    let d = scratch_checkpoint();
    let st = d.path().join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("model.safetensors`: not a valid safetensors file"),
        "{e}"
    );

    let d = scratch_checkpoint();
    std::fs::write(
        d.path().join("model.safetensors"),
        b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage",
    )
    .unwrap();
    let e = load_err(d.path());
    assert!(e.contains("not a valid safetensors file"), "{e}");
}

#[test]
fn sharded_checkpoints_load_through_the_index() {
    let (m, _) = load("tiny-llama3", false);
    let dir = tempfile::tempdir().unwrap();
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (i, (name, t)) in m.named().iter().enumerate() {
        let (shard, file) = if i % 2 == 0 {
            (&mut a, "model-00001-of-00002.safetensors")
        } else {
            (&mut b, "model-00002-of-00002.safetensors")
        };
        shard.insert(name.clone(), t.clone());
        map.insert(name.clone(), serde_json::json!(file));
    }
    candle_core::safetensors::save(&a, dir.path().join("model-00001-of-00002.safetensors"))
        .unwrap();
    candle_core::safetensors::save(&b, dir.path().join("model-00002-of-00002.safetensors"))
        .unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    std::fs::copy(
        repo_fixtures().join("models/tiny-llama3/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let sharded = Model::load(dir.path(), &cpu_f32(false)).unwrap();
    let ids = Tensor::new(&[[3u32, 4, 5]], &Device::Cpu).unwrap();
    let d = max_diff(
        &sharded.decoder.forward(&ids, None, None).unwrap(),
        &m.decoder.forward(&ids, None, None).unwrap(),
    );
    assert_eq!(d, 0.0);
}
