//! GGUF export for llama.cpp and Ollama: a model's weights under llama.cpp's tensor names, in
//! f16, Q8_0 or llama.cpp's Q4_K_M mix (candle's quantizers), its hyperparameters under the
//! architecture's keys, and the tokenizer and chat template as llama.cpp reads them
//! (`vocab.rs`); an Ollama `Modelfile` beside it. A model with adapters is merged on the way, and
//! a 4-bit base dequantized (GGUF has no bitsandbytes type).
//!
//! Qwen2 and Qwen3 keep their weights as HF has them (llama.cpp rotates their heads in halves,
//! as HF does); Llama's q and k rows are interleaved the way `convert_hf_to_gguf.py` permutes
//! them, since llama.cpp rotates Llama's pairs of adjacent values.

mod vocab;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::model::block::Proj;
use crate::model::{Arch, Model};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The weight types a GGUF export writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufQuant {
    /// Every matrix in f16.
    F16,
    /// Every matrix in Q8_0 (blocks of 32, an f16 scale each).
    Q8_0,
    /// llama.cpp's Q4_K_M: Q4_K, with Q6_K for the head and for `attn_v` and `ffn_down` in the
    /// layers llama.cpp gives more bits (the first and last eighth, every third between).
    Q4KM,
}

impl GgufQuant {
    /// The type `name` names (`f16`, `q8_0`, `q4_k_m`).
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "f16" => Ok(GgufQuant::F16),
            "q8_0" => Ok(GgufQuant::Q8_0),
            "q4_k_m" => Ok(GgufQuant::Q4KM),
            other => Err(Error::InvalidArgument(format!(
                "`quant: \"{other}\"`: GGUF exports are \"f16\", \"q8_0\" or \"q4_k_m\""
            ))),
        }
    }

    /// llama.cpp's `general.file_type` for it.
    fn file_type(self) -> u32 {
        match self {
            GgufQuant::F16 => 1,
            GgufQuant::Q8_0 => 7,
            GgufQuant::Q4KM => 15,
        }
    }

    /// Its name as written.
    pub fn name(self) -> &'static str {
        match self {
            GgufQuant::F16 => "f16",
            GgufQuant::Q8_0 => "q8_0",
            GgufQuant::Q4KM => "q4_k_m",
        }
    }
}

/// What an export wrote.
#[derive(Debug)]
pub struct Exported {
    /// The GGUF file.
    pub path: PathBuf,
    /// The Ollama `Modelfile` beside it.
    pub modelfile: PathBuf,
    /// Bytes written.
    pub bytes: u64,
    /// Tensors written.
    pub tensors: usize,
    /// Adapters were merged on the way.
    pub merged: bool,
    /// A 4-bit base was dequantized on the way.
    pub dequantized: bool,
}

/// llama.cpp's architecture name and pre-tokenizer for `arch`.
fn llama_cpp_names(arch: Arch) -> Result<(&'static str, &'static str)> {
    match arch {
        Arch::Qwen2 => Ok(("qwen2", "qwen2")),
        Arch::Qwen3 => Ok(("qwen3", "qwen2")),
        Arch::Llama => Ok(("llama", "llama-bpe")),
        Arch::Mistral => Err(Error::InvalidArgument(
            "GGUF export writes Qwen2, Qwen3 and Llama models; Mistral's SentencePiece \
             tokenizer is not exported yet"
                .into(),
        )),
    }
}

/// Whether llama.cpp's Q4_K_M gives layer `i` of `n` more bits (its `use_more_bits`).
fn more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The GGUF type of a `[rows, cols]` matrix asked as `want`: a k-quant needs rows of 256, the
/// others of 32; llama.cpp's fallbacks otherwise (Q4_K -> Q5_0, Q6_K -> Q8_0, then f16).
fn matrix_type(want: GgmlDType, cols: usize) -> GgmlDType {
    let fallback = match want {
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        other => other,
    };
    if cols.is_multiple_of(want.block_size()) {
        want
    } else if cols.is_multiple_of(fallback.block_size()) {
        fallback
    } else {
        GgmlDType::F16
    }
}

/// Llama's q or k rows reordered as llama.cpp rotates them (`convert_hf_to_gguf.py`'s permute):
/// within each head, the two halves interleaved.
fn permute_heads(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((heads, 2, rows / heads / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// Writes `model` (merged, dequantized as needed) with `tok` to the GGUF file `path` as `quant`
/// says, and an Ollama `Modelfile` beside it.
pub fn export(model: &Model, tok: &Tokenizer, path: &Path, quant: GgufQuant) -> Result<Exported> {
    model.needs_weights("GGUF export")?;
    let (arch_name, pre) = llama_cpp_names(model.arch)?;
    let merged = model.lora.is_some();
    let dequantized = model.quant4().is_some();
    let m = if merged {
        crate::lora::merge(model)?
    } else {
        model.clone()
    };
    let c = m.config().clone();
    let n = c.num_hidden_layers;
    let a = |k: &str| format!("{arch_name}.{k}");
    let u = |x: usize| Value::U32(x as u32);
    let mut md: Vec<(String, Value)> = vec![
        (
            "general.architecture".into(),
            Value::String(arch_name.into()),
        ),
        (
            "general.name".into(),
            Value::String(
                m.source
                    .as_ref()
                    .and_then(|p| p.file_name())
                    .map_or_else(|| "qscript".into(), |f| f.to_string_lossy().into_owned()),
            ),
        ),
        ("general.file_type".into(), Value::U32(quant.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
        (a("context_length"), u(c.max_position_embeddings)),
        (a("embedding_length"), u(c.hidden_size)),
        (a("block_count"), u(n)),
        (a("feed_forward_length"), u(c.intermediate_size)),
        (a("attention.head_count"), u(c.num_attention_heads)),
        (a("attention.head_count_kv"), u(c.num_kv_heads())),
        (
            a("attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_norm_eps as f32),
        ),
        (
            a("rope.freq_base"),
            Value::F32(c.rope_theta.unwrap_or(10_000.0) as f32),
        ),
        (a("attention.key_length"), u(c.head_dim())),
        (a("attention.value_length"), u(c.head_dim())),
    ];
    if m.arch == Arch::Llama {
        md.push((a("rope.dimension_count"), u(c.head_dim())));
    }
    md.extend(vocab::metadata(tok, c.vocab_size, pre)?);

    let d = &m.decoder;
    let cpu =
        |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?) };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut put = |name: String, t: Tensor, want: GgmlDType| -> Result<()> {
        let dtype = if t.rank() == 1 {
            GgmlDType::F32
        } else {
            matrix_type(want, t.dim(1)?)
        };
        tensors.push((name, QTensor::quantize(&t, dtype)?));
        Ok(())
    };
    let base = match quant {
        GgufQuant::F16 => GgmlDType::F16,
        GgufQuant::Q8_0 => GgmlDType::Q8_0,
        GgufQuant::Q4KM => GgmlDType::Q4K,
    };
    let more = |i: usize| {
        if quant == GgufQuant::Q4KM && more_bits(i, n) {
            GgmlDType::Q6K
        } else {
            base
        }
    };
    put("token_embd.weight".into(), cpu(&d.embed)?, base)?;
    for (i, b) in d.blocks.iter().enumerate() {
        let blk = |s: &str| format!("blk.{i}.{s}");
        put(blk("attn_norm.weight"), cpu(&b.input_norm)?, base)?;
        put(blk("ffn_norm.weight"), cpu(&b.post_norm)?, base)?;
        if let Some(qn) = &b.attn.q_norm {
            put(blk("attn_q_norm.weight"), cpu(qn)?, base)?;
        }
        if let Some(kn) = &b.attn.k_norm {
            put(blk("attn_k_norm.weight"), cpu(kn)?, base)?;
        }
        for p in Proj::ALL {
            let (gguf, want) = match p {
                Proj::Q => ("attn_q", base),
                Proj::K => ("attn_k", base),
                Proj::V => ("attn_v", more(i)),
                Proj::O => ("attn_output", base),
                Proj::Gate => ("ffn_gate", base),
                Proj::Up => ("ffn_up", base),
                Proj::Down => ("ffn_down", more(i)),
            };
            let lin = b.proj(p);
            let mut w = cpu(&lin.weight.matrix(DType::F32)?)?;
            let mut bias = lin.bias.as_ref().map(cpu).transpose()?;
            if m.arch == Arch::Llama && matches!(p, Proj::Q | Proj::K) {
                let heads = if p == Proj::Q {
                    c.num_attention_heads
                } else {
                    c.num_kv_heads()
                };
                w = permute_heads(&w, heads)?;
                bias = bias
                    .map(|x| {
                        permute_heads(&x.reshape((x.dim(0)?, 1))?, heads)
                            .and_then(|t| Ok(t.flatten_all()?))
                    })
                    .transpose()?;
            }
            put(blk(&format!("{gguf}.weight")), w, want)?;
            if let Some(bias) = bias {
                put(blk(&format!("{gguf}.bias")), bias, base)?;
            }
        }
    }
    put("output_norm.weight".into(), cpu(&d.norm)?, base)?;
    if let Some(h) = &d.lm_head {
        let head = if quant == GgufQuant::Q4KM {
            GgmlDType::Q6K
        } else {
            base
        };
        put("output.weight".into(), cpu(h)?, head)?;
    }
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut bytes = 0u64;
    crate::sandbox::write_atomic_with(path, &mut |w| {
        let mut sized: &mut dyn crate::sandbox::WriteSeek = w;
        gguf_file::write(&mut sized, &md_refs, &t_refs).map_err(std::io::Error::other)?;
        bytes = w.stream_position()?;
        Ok(())
    })?;
    let modelfile = path.with_file_name("Modelfile");
    crate::sandbox::write_atomic(&modelfile, ollama_modelfile(path, tok).as_bytes())?;
    Ok(Exported {
        path: path.to_path_buf(),
        modelfile,
        bytes,
        tensors: tensors.len(),
        merged,
        dequantized,
    })
}

/// Ollama's `Modelfile` for the GGUF at `path`: `FROM` it, its stop token, and for ChatML
/// templates (Qwen's) the template in Ollama's Go syntax (Ollama reads other templates from the
/// GGUF's `tokenizer.chat_template` itself).
fn ollama_modelfile(path: &Path, tok: &Tokenizer) -> String {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut out = format!("FROM ./{file}\n");
    let chatml = tok
        .saved_template()
        .is_some_and(|t| t.contains("<|im_start|>"));
    if chatml {
        out.push_str(
            "TEMPLATE \"\"\"{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\
             {{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}\
             <|im_start|>assistant\n\"\"\"\n",
        );
        out.push_str("PARAMETER stop \"<|im_end|>\"\n");
    }
    if let Some(eos) = &tok.eos_token
        && !(chatml && eos == "<|im_end|>")
    {
        out.push_str(&format!("PARAMETER stop \"{eos}\"\n"));
    }
    out
}

#[cfg(test)]
mod tests;
