#![allow(clippy::unwrap_used)]
//! Read back with candle's GGUF reader, and run by candle's llama.cpp-layout models
//! (`quantized_qwen2`, `quantized_qwen3`, `quantized_llama`): the metadata llama.cpp reads, and
//! a greedy continuation equal to qscript's for f16 (q8_0 and q4_k_m: logits near qscript's).

use super::*;
use crate::model::{GenerateOptions, TinyConfig, tiny};

fn model(arch: &str) -> Model {
    tiny(&TinyConfig {
        arch: arch.into(),
        hidden: 256,
        intermediate: 512,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        tie_embeddings: arch == "qwen2",
        embed_std: 1.0,
        seed: 5,
        ..TinyConfig::default()
    })
    .unwrap()
}

/// qscript's greedy continuation of `prompt`.
fn ours(m: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let opts = GenerateOptions {
        max_new_tokens: n,
        ..GenerateOptions::default()
    };
    m.generate(
        prompt,
        &opts,
        &crate::cancel::CancelToken::new(),
        &mut |_| Ok(()),
    )
    .unwrap()
}

/// The next-token logits of candle's llama.cpp-layout model of `arch` from the GGUF at `path`,
/// and its greedy continuation.
fn theirs(arch: &str, path: &Path, prompt: &[u32], n: usize) -> (Vec<f32>, Vec<u32>) {
    use candle_transformers::models::{quantized_llama, quantized_qwen2, quantized_qwen3};
    let mut f = std::fs::File::open(path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    enum M {
        Q2(quantized_qwen2::ModelWeights),
        Q3(quantized_qwen3::ModelWeights),
        L(quantized_llama::ModelWeights),
    }
    let mut m = match arch {
        "qwen2" => {
            M::Q2(quantized_qwen2::ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap())
        }
        "qwen3" => {
            M::Q3(quantized_qwen3::ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap())
        }
        _ => M::L(quantized_llama::ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap()),
    };
    let mut forward = |ids: &[u32], pos: usize| -> Vec<f32> {
        let x = Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let y = match &mut m {
            M::Q2(m) => m.forward(&x, pos),
            M::Q3(m) => m.forward(&x, pos),
            M::L(m) => m.forward(&x, pos),
        }
        .unwrap();
        y.flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32
    };
    let first = forward(prompt, 0);
    let mut out = vec![argmax(&first)];
    let mut pos = prompt.len();
    while out.len() < n {
        let next = forward(&[*out.last().unwrap()], pos);
        pos += 1;
        out.push(argmax(&next));
    }
    (first, out)
}

fn last_logits(m: &Model, prompt: &[u32]) -> Vec<f32> {
    let x = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let y = m.decoder.forward(&x, None, None).unwrap();
    let s = prompt.len();
    y.narrow(1, s - 1, 1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// f16 exports of Qwen2, Qwen3 and Llama run in llama.cpp's layout to qscript's greedy
/// continuation, their metadata as llama.cpp reads it.
#[test]
fn f16_exports_continue_as_qscript_does() {
    let tok = Tokenizer::builtin().unwrap();
    let prompt = [12u32, 99, 7, 180, 33, 250];
    for arch in ["qwen2", "qwen3", "llama"] {
        let m = model(arch);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let e = export(&m, &tok, &path, GgufQuant::F16).unwrap();
        assert!(e.bytes > 0 && dir.path().join("Modelfile").is_file());
        let want = ours(&m, &prompt, 8);
        let (_, got) = theirs(arch, &path, &prompt, want.len());
        assert_eq!(got, want, "{arch}");
        let ct = gguf_file::Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
        let get = |k: &str| ct.metadata.get(k).unwrap_or_else(|| panic!("{arch}: {k}"));
        assert_eq!(get("general.architecture").to_string().unwrap(), arch);
        assert_eq!(get(&format!("{arch}.block_count")).to_u32().unwrap(), 2);
        assert_eq!(get("tokenizer.ggml.model").to_string().unwrap(), "gpt2");
        let Value::Array(tokens) = get("tokenizer.ggml.tokens") else {
            panic!("tokens");
        };
        assert_eq!(tokens.len(), 259);
        assert_eq!(tokens[257].to_string().unwrap(), "<|im_start|>");
        let Value::Array(kinds) = get("tokenizer.ggml.token_type") else {
            panic!("types");
        };
        assert_eq!(
            kinds[257].to_i32().unwrap(),
            3,
            "a special token is a control token"
        );
        assert_eq!(get("tokenizer.ggml.eos_token_id").to_u32().unwrap(), 256);
        assert!(
            get("tokenizer.chat_template")
                .to_string()
                .unwrap()
                .contains("<|im_start|>")
        );
    }
}

/// Q8_0 and Q4_K_M exports: every matrix in its type (Q4_K_M's Q6_K layers as llama.cpp picks
/// them), and next-token logits near qscript's.
#[test]
fn quantized_exports_stay_near_qscript() {
    let tok = Tokenizer::builtin().unwrap();
    let prompt = [12u32, 99, 7, 180, 33, 250];
    let m = model("qwen2");
    let want = last_logits(&m, &prompt);
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    for (quant, tol) in [(GgufQuant::Q8_0, 0.02), (GgufQuant::Q4KM, 0.15)] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        export(&m, &tok, &path, quant).unwrap();
        let ct = gguf_file::Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
        let ty = |n: &str| ct.tensor_infos[n].ggml_dtype;
        if quant == GgufQuant::Q8_0 {
            assert_eq!(ty("blk.0.ffn_down.weight"), GgmlDType::Q8_0);
        } else {
            // Of two layers llama.cpp gives the last (its last eighth) more bits.
            assert_eq!(ty("blk.1.ffn_down.weight"), GgmlDType::Q6K);
            assert_eq!(ty("blk.1.attn_v.weight"), GgmlDType::Q6K);
            assert_eq!(ty("blk.0.ffn_down.weight"), GgmlDType::Q4K);
            assert_eq!(ty("blk.0.attn_q.weight"), GgmlDType::Q4K);
            assert_eq!(ty("token_embd.weight"), GgmlDType::Q4K);
        }
        assert_eq!(ty("blk.0.attn_norm.weight"), GgmlDType::F32);
        let (got, _) = theirs("qwen2", &path, &prompt, 1);
        let worst = got
            .iter()
            .zip(&want)
            .fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(
            worst <= tol * scale,
            "{}: logits off by {worst} (scale {scale})",
            quant.name()
        );
    }
    assert!(more_bits(0, 28) && more_bits(27, 28) && more_bits(5, 28) && !more_bits(4, 28));
}

/// A LoRA model is merged on the way; what cannot be exported is named.
#[test]
fn adapters_merge_on_the_way_and_refusals_are_named() {
    let tok = Tokenizer::builtin().unwrap();
    let m = model("qwen2");
    let cfg = crate::lora::LoraConfig {
        r: 2,
        target_modules: crate::lora::Targets::Pattern("all-linear".into()),
        ..crate::lora::LoraConfig::default()
    };
    let mut peft = crate::lora::attach(&m, &cfg, 1).unwrap();
    // Fixed adapter values (an unseeded draw made the f16 greedy text differ now and then).
    let mut k = 0usize;
    crate::model::params::visit_adapters_mut(&mut peft.decoder, &mut |_, t| {
        k += 1;
        let n = t.elem_count();
        let v: Vec<f32> = (0..n)
            .map(|i| 0.2 * ((i * 7 + k * 13) as f32 * 0.61).sin())
            .collect();
        *t = candle_core::Tensor::from_vec(v, t.shape(), t.device())?.to_dtype(t.dtype())?;
        Ok(())
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    let e = export(&peft, &tok, &path, GgufQuant::F16).unwrap();
    assert!(e.merged && !e.dequantized);
    let prompt = [5u32, 77, 140];
    let want = ours(&crate::lora::merge(&peft).unwrap(), &prompt, 6);
    assert_eq!(theirs("qwen2", &path, &prompt, 6).1, want);
    assert!(
        GgufQuant::parse("q2_k")
            .unwrap_err()
            .to_string()
            .contains("\"q4_k_m\"")
    );
    let mistral = tiny(&TinyConfig {
        arch: "mistral".into(),
        ..TinyConfig::default()
    });
    if let Ok(mistral) = mistral {
        let e = export(&mistral, &tok, &path, GgufQuant::F16).unwrap_err();
        assert!(e.to_string().contains("Mistral"), "{e}");
    }
}
