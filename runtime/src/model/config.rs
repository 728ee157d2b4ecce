//! `config.json` of an HF checkpoint, straight through serde, and the facts the decoder derives
//! from it. Reads both transformers 4 (`rope_theta`, `rope_scaling`) and transformers 5
//! (`rope_parameters`) layouts.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The architectures the decoder implements, chosen by `architectures[0]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `LlamaForCausalLM`: Llama 2/3, TinyLlama; GQA through `num_key_value_heads`.
    Llama,
    /// `MistralForCausalLM`: the Llama layout (sliding window not applied).
    Mistral,
    /// `Qwen2ForCausalLM`: Qwen1.5, Qwen2, Qwen2.5 (bias on q/k/v).
    Qwen2,
    /// `Qwen3ForCausalLM`: q/k RMS norms, explicit `head_dim`, no bias.
    Qwen3,
}

/// The `architectures` names qscript loads.
pub const SUPPORTED: &[&str] = &[
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
];

impl Arch {
    /// The architecture for an `architectures[0]` name.
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "LlamaForCausalLM" => Arch::Llama,
            "MistralForCausalLM" => Arch::Mistral,
            "Qwen2ForCausalLM" => Arch::Qwen2,
            "Qwen3ForCausalLM" => Arch::Qwen3,
            other => {
                return Err(Error::UnsupportedArchitecture {
                    name: other.to_string(),
                    supported: SUPPORTED.join(", "),
                });
            }
        })
    }

    /// The HF class name.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
            Arch::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// The `model_type` in config.json.
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }
}

/// A token id or a list of them (`eos_token_id` is either).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl OneOrMany {
    /// All ids.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            OneOrMany::One(x) => vec![*x],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// RoPE parameters (`rope_scaling` in transformers 4, `rope_parameters` in 5).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct RopeParams {
    /// `default`, `linear` or `llama3`.
    #[serde(default, alias = "type", skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// The base (transformers 5 keeps it here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// Scaling factor (`linear`, `llama3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// `llama3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    /// `llama3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    /// `llama3`, `yarn` (default: `max_position_embeddings`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// `yarn`: the scale of cos and sin (default from `factor`, `mscale`, `mscale_all_dim`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f64>,
    /// `yarn`: the rotations bounding extrapolation (default 32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_fast: Option<f64>,
    /// `yarn`: the rotations bounding interpolation (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta_slow: Option<f64>,
    /// `yarn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale: Option<f64>,
    /// `yarn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mscale_all_dim: Option<f64>,
    /// `yarn`: round the correction range outwards (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncate: Option<bool>,
}

/// The fields of `config.json` the decoder uses. Unknown fields are ignored (checkpoints carry
/// many); missing required ones are errors that name the field and the file.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ModelConfig {
    /// `["Qwen2ForCausalLM"]`.
    pub architectures: Vec<String>,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); defaults to the query heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (transformers 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// RoPE scaling (transformers 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParams>,
    /// RoPE base and scaling (transformers 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParams>,
    /// Longest context.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Whether `lm_head` shares the embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v/o (Llama); Qwen2 always has q/k/v bias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Activation; only `silu` is supported.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Beginning-of-sequence id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence id(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<OneOrMany>,
    /// The dtype the weights were saved in (`torch_dtype` in transformers 4).
    #[serde(
        default,
        alias = "torch_dtype",
        skip_serializing_if = "Option::is_none"
    )]
    pub dtype: Option<String>,
    /// `llama`, `qwen2`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    /// How the checkpoint's weights are quantized (bitsandbytes' `BitsAndBytesConfig` as
    /// transformers saves it); kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization_config: Option<serde_json::Value>,
}

/// The largest `vocab_size` [`ModelConfig::check_ranges`] takes (16 M; real ones reach 262 k).
pub const MAX_VOCAB: usize = 1 << 24;
/// The largest `hidden_size` and `intermediate_size` (1 M; real ones reach 53 k).
pub const MAX_WIDTH: usize = 1 << 20;
/// The most `num_hidden_layers` (real ones reach 126).
pub const MAX_LAYERS: usize = 4096;
/// The most heads, and the widest head.
pub const MAX_HEADS: usize = 4096;
/// The largest `max_position_embeddings` (1 G; real ones reach 10 M).
pub const MAX_POSITIONS: usize = 1 << 30;

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}
fn default_act() -> String {
    "silu".into()
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = crate::files::read_config(path)?;
        cfg.validate()
            .and_then(|()| cfg.check_ranges())
            .map_err(|message| Error::Config {
                path: path.to_path_buf(),
                message,
            })?;
        Ok(cfg)
    }

    /// Whether the checkpoint holds 4-bit weights bitsandbytes quantized.
    pub fn is_quantized_4bit(&self) -> bool {
        self.quantization_config.as_ref().is_some_and(|q| {
            q.get("load_in_4bit").and_then(serde_json::Value::as_bool) == Some(true)
                || q.get("_load_in_4bit").and_then(serde_json::Value::as_bool) == Some(true)
        })
    }

    /// The checkpoint's quantization, refused unless it is bitsandbytes' 4-bit.
    fn check_quantization(&self) -> Result<(), String> {
        let Some(q) = &self.quantization_config else {
            return Ok(());
        };
        let method = q
            .get("quant_method")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        if method != "bitsandbytes" {
            return Err(format!(
                "`quantization_config.quant_method` is `{method}`; qscript loads bitsandbytes' \
                 4-bit checkpoints (nf4, fp4) and float ones"
            ));
        }
        let flag = |k: &str| q.get(k).and_then(serde_json::Value::as_bool) == Some(true);
        if flag("load_in_8bit") || flag("_load_in_8bit") {
            return Err(
                "`quantization_config` is bitsandbytes' 8-bit (LLM.int8); qscript loads its \
                 4-bit checkpoints (nf4, fp4) and float ones"
                    .into(),
            );
        }
        Ok(())
    }

    /// Checks what serde cannot: a known architecture, consistent head counts, a known RoPE type.
    pub fn validate(&self) -> Result<(), String> {
        self.check_quantization()?;
        let name = self
            .architectures
            .first()
            .ok_or("`architectures` is empty")?;
        Arch::from_name(name).map_err(|e| e.to_string())?;
        if self.hidden_act != "silu" {
            return Err(format!(
                "`hidden_act` is `{}`; only `silu` is supported",
                self.hidden_act
            ));
        }
        let (h, kv) = (self.num_attention_heads, self.num_kv_heads());
        if h == 0 || kv == 0 || !h.is_multiple_of(kv) {
            return Err(format!(
                "`num_attention_heads` ({h}) must be a positive multiple of `num_key_value_heads` ({kv})"
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(h) {
            return Err(format!(
                "`hidden_size` ({}) is not divisible by `num_attention_heads` ({h}) and no `head_dim` is given",
                self.hidden_size
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "`head_dim` ({}) must be even for RoPE",
                self.head_dim()
            ));
        }
        match self.rope().rope_type.as_deref().unwrap_or("default") {
            "dynamic" if self.head_dim() <= 2 => Err(format!(
                "dynamic RoPE scaling needs a `head_dim` over 2, got {}",
                self.head_dim()
            )),
            "default" | "linear" | "llama3" | "yarn" | "dynamic" => Ok(()),
            other => Err(format!(
                "unsupported RoPE type `{other}`; supported: `default`, `linear`, `llama3`, \
                 `yarn`, `dynamic`"
            )),
        }
    }

    /// Checks the sizes and constants of a `config.json` against what any real checkpoint has,
    /// before anything is sized from them: a hostile `num_hidden_layers: 10^12` would otherwise
    /// be an allocation of hundreds of terabytes (an abort), and `rms_norm_eps: -1` garbage.
    pub fn check_ranges(&self) -> Result<(), String> {
        let sizes = [
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, MAX_WIDTH),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_kv_heads(), MAX_HEADS),
            ("head_dim", self.head_dim(), MAX_HEADS),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                MAX_POSITIONS,
            ),
        ];
        for (field, value, max) in sizes {
            if value == 0 || value > max {
                return Err(format!("`{field}` is {value}; it must be in 1..={max}"));
            }
        }
        let positive = |field: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "`{field}` is {v}; it must be a finite number over 0"
                ))
            }
        };
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return Err(format!(
                "`rms_norm_eps` is {}; it must be over 0 and under 1",
                self.rms_norm_eps
            ));
        }
        let rope = self.rope();
        positive("rope_theta", rope.rope_theta.unwrap_or(10_000.0))?;
        let scaling = if self.rope_parameters.is_some() {
            "rope_parameters"
        } else {
            "rope_scaling"
        };
        for (name, v) in [
            ("factor", rope.factor),
            ("low_freq_factor", rope.low_freq_factor),
            ("high_freq_factor", rope.high_freq_factor),
            ("attention_factor", rope.attention_factor),
            ("beta_fast", rope.beta_fast),
            ("beta_slow", rope.beta_slow),
        ] {
            if let Some(v) = v {
                positive(&format!("{scaling}.{name}"), v)?;
            }
        }
        if let (Some(lo), Some(hi)) = (rope.low_freq_factor, rope.high_freq_factor)
            && lo >= hi
        {
            return Err(format!(
                "`{scaling}.low_freq_factor` ({lo}) must be under `{scaling}.high_freq_factor` ({hi})"
            ));
        }
        if rope.original_max_position_embeddings == Some(0) {
            return Err(format!(
                "`{scaling}.original_max_position_embeddings` is 0; it must be at least 1"
            ));
        }
        Ok(())
    }

    /// The architecture (validated on load).
    pub fn arch(&self) -> Result<Arch> {
        Arch::from_name(self.architectures.first().map_or("", String::as_str))
    }

    /// Key/value heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// RoPE parameters, merged from either layout, with the base filled in.
    pub fn rope(&self) -> RopeParams {
        let mut p = self
            .rope_parameters
            .clone()
            .or_else(|| self.rope_scaling.clone())
            .unwrap_or_default();
        if p.rope_theta.is_none() {
            p.rope_theta = Some(self.rope_theta.unwrap_or(10_000.0));
        }
        p
    }

    /// Whether q/k/v projections have a bias.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias
            .unwrap_or(matches!(self.arch(), Ok(Arch::Qwen2)))
    }

    /// Whether o_proj has a bias (Llama with `attention_bias`).
    pub fn o_bias(&self) -> bool {
        self.attention_bias.unwrap_or(false) && !matches!(self.arch(), Ok(Arch::Qwen2))
    }

    /// End-of-sequence ids from the config.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(OneOrMany::to_vec)
            .unwrap_or_default()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig, String> {
        let c: ModelConfig = serde_json::from_str(json).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    const BASE: &str = r#""vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2"#;

    #[test]
    fn reads_both_rope_layouts() {
        let v4 = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_theta": 500000.0,
               "rope_scaling": {{"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))
        .unwrap();
        let v5 = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_parameters": {{"rope_theta": 500000.0,
               "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}}}}"#
        ))
        .unwrap();
        assert_eq!(v4.rope(), v5.rope());
        assert_eq!(v4.rope().rope_theta, Some(500_000.0));
    }

    #[test]
    fn bad_configs_are_named() {
        let e = parse(r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 10}"#).unwrap_err();
        assert!(e.contains("missing field `hidden_size`"), "{e}");
        let e = parse(&format!(
            r#"{{"architectures": ["GPT2LMHeadModel"], {BASE}}}"#
        ))
        .unwrap_err();
        assert!(
            e.contains("`GPT2LMHeadModel`") && e.contains("Qwen3ForCausalLM"),
            "{e}"
        );
        let e = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "num_key_value_heads": 3}}"#
        ))
        .unwrap_err();
        assert!(e.contains("multiple of `num_key_value_heads` (3)"), "{e}");
        let e = parse(&format!(
            r#"{{"architectures": ["LlamaForCausalLM"], {BASE}, "rope_scaling": {{"type": "longrope", "factor": 2.0}}}}"#
        ))
        .unwrap_err();
        assert!(
            e.contains(
                "unsupported RoPE type `longrope`; supported: `default`, `linear`, `llama3`, `yarn`, `dynamic`"
            ),
            "{e}"
        );
    }

    #[test]
    fn sizes_and_constants_out_of_range_are_named() {
        let cfg = |extra: &str| {
            let mut base: serde_json::Value = serde_json::from_str(&format!(
                r#"{{"architectures": ["LlamaForCausalLM"], {BASE}}}"#
            ))
            .unwrap();
            let extra: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(&format!("{{{extra}}}")).unwrap();
            for (k, v) in extra {
                base[k] = v;
            }
            base.to_string()
        };
        let check = |extra: &str| {
            let c: ModelConfig = serde_json::from_str(&cfg(extra)).unwrap();
            c.validate().and_then(|()| c.check_ranges())
        };
        check(r#""rms_norm_eps": 1e-5"#).unwrap();
        for (extra, want) in [
            (
                r#""num_hidden_layers": 1000000000000"#,
                "`num_hidden_layers` is 1000000000000; it must be in 1..=4096",
            ),
            (r#""num_hidden_layers": 0"#, "`num_hidden_layers` is 0"),
            (
                r#""vocab_size": 100000000000"#,
                "`vocab_size` is 100000000000",
            ),
            (
                r#""rms_norm_eps": -1"#,
                "`rms_norm_eps` is -1; it must be over 0 and under 1",
            ),
            (
                r#""rope_theta": -1"#,
                "`rope_theta` is -1; it must be a finite number over 0",
            ),
            (
                r#""rope_scaling": {"rope_type": "linear", "factor": 0}"#,
                "`rope_scaling.factor` is 0; it must be a finite number over 0",
            ),
            (
                r#""rope_parameters": {"rope_type": "linear", "rope_theta": 0, "factor": 2}"#,
                "`rope_theta` is 0",
            ),
        ] {
            let e = check(extra).unwrap_err();
            assert!(e.contains(want), "{extra}: {e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, cfg(r#""rms_norm_eps": 0"#)).unwrap();
        let e = ModelConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            e.contains("config.json") && e.contains("`rms_norm_eps` is 0"),
            "{e}"
        );
    }

    #[test]
    fn real_configs_parse() {
        let Some(dir) = crate::testing::fixtures_dir("real model configs") else {
            return;
        };
        for name in [
            "Qwen3-4B",
            "Llama-3.2-1B",
            "Qwen2.5-7B-Instruct",
            "Qwen1.5-7B-Chat",
            "Qwen3-32B",
        ] {
            let c = ModelConfig::from_file(&dir.join("configs").join(name).join("config.json"))
                .unwrap();
            assert!(c.num_hidden_layers > 0, "{name}");
        }
    }
}
