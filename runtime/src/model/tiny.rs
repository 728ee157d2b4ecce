//! Built-in tiny models with random weights from a seed: the no-download default of recipes and
//! the models tests train. Matrices are normal(0, 0.02), norms one and biases zero, as transformers
//! initialises them; the embedding has its own `embed_std` (0.1 by default) so that a tiny
//! tied-embedding model can reach confident logits and its loss can fall visibly.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use serde::Deserialize;

use super::block::{Norm, Proj};
use super::config::{Arch, ModelConfig, OneOrMany};
use super::load::{LoadOptions, Model};
use super::module_id::ModuleId;
use super::weights::WeightSource;
use crate::{Error, Result};

/// Shape of a tiny model. Option names follow config.json where one exists.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TinyConfig {
    /// `qwen2`, `qwen3` or `llama`.
    pub arch: String,
    /// `hidden_size`.
    pub hidden: usize,
    /// `num_hidden_layers`.
    pub layers: usize,
    /// `num_attention_heads`.
    pub heads: usize,
    /// `num_key_value_heads`.
    pub kv_heads: usize,
    /// `intermediate_size`.
    pub intermediate: usize,
    /// `vocab_size` (259 fits the built-in tokenizer).
    pub vocab: usize,
    /// `max_position_embeddings`.
    pub max_positions: usize,
    /// `tie_word_embeddings`.
    pub tie_embeddings: bool,
    /// Seed of the random weights.
    pub seed: u64,
    /// Standard deviation of the embedding (transformers uses 0.02 everywhere; a larger one lets a
    /// tiny tied-embedding model reach confident logits, so its loss can fall visibly).
    pub embed_std: f64,
    /// `f32`, `bf16`, `f16` or `auto`.
    pub dtype: String,
    /// `cpu`, `cuda:N` or `auto`.
    pub device: String,
    /// Every weight trainable (full fine-tuning), as `model::load`'s `trainable`.
    pub trainable: bool,
}

impl Default for TinyConfig {
    fn default() -> Self {
        Self {
            arch: "qwen2".into(),
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 172,
            vocab: 259,
            max_positions: 512,
            tie_embeddings: true,
            seed: 0,
            embed_std: 0.1,
            dtype: "f32".into(),
            device: "cpu".into(),
            trainable: false,
        }
    }
}

impl TinyConfig {
    /// The config.json this shape corresponds to.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let arch = match self.arch.as_str() {
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "llama" => Arch::Llama,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown tiny `arch` `{other}`; use `qwen2`, `qwen3` or `llama`"
                )));
            }
        };
        let cfg = ModelConfig {
            architectures: vec![arch.name().into()],
            vocab_size: self.vocab,
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_key_value_heads: Some(self.kv_heads),
            // Qwen3's config always names it (transformers' default is 128, not hidden/heads).
            head_dim: (arch == Arch::Qwen3).then_some(self.hidden / self.heads),
            rms_norm_eps: 1e-6,
            rope_theta: Some(10_000.0),
            rope_scaling: None,
            rope_parameters: None,
            max_position_embeddings: self.max_positions,
            tie_word_embeddings: self.tie_embeddings,
            attention_bias: None,
            hidden_act: "silu".into(),
            bos_token_id: None,
            eos_token_id: Some(OneOrMany::One(256.min(self.vocab.saturating_sub(1)) as u32)),
            dtype: None,
            model_type: Some(arch.model_type().into()),
            quantization_config: None,
        };
        cfg.validate()
            .map_err(|m| Error::InvalidArgument(format!("tiny model: {m}")))?;
        Ok(cfg)
    }
}

/// A tiny model with seeded random weights.
pub fn tiny(t: &TinyConfig) -> Result<Model> {
    let cfg = t.model_config()?;
    let opts = LoadOptions {
        dtype: t.dtype.clone(),
        device: t.device.clone(),
        trainable: t.trainable,
        ..Default::default()
    };
    let device = opts.resolve_device()?;
    let dtype = opts.resolve_dtype(&device)?;
    cfg.validate().map_err(Error::InvalidArgument)?;
    // Sizes no machine holds are an error here, not a failed allocation: the f32 weights are
    // made on the CPU first, then the model's copy in its dtype.
    let params = crate::plan::memory::param_count(&cfg);
    crate::device::check_fits(
        params * (4.0 + dtype.size_in_bytes() as f64),
        &Device::Cpu,
        &format!(
            "`model::tiny` with hidden {}, {} layers, intermediate {} and vocab {} ({params:.3e} parameters)",
            cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
        ),
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(t.seed);
    let normal = Normal::new(0f32, 0.02).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let embed_normal =
        Normal::new(0f32, t.embed_std as f32).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let mut tensors = HashMap::new();
    let mut add = |name: String, shape: &[usize], kind: Init| -> Result<()> {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match kind {
            Init::Normal => (0..n).map(|_| normal.sample(&mut rng)).collect(),
            Init::Embed => (0..n).map(|_| embed_normal.sample(&mut rng)).collect(),
            Init::Ones => vec![1.0; n],
            Init::Zeros => vec![0.0; n],
        };
        tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        Ok(())
    };
    let (h, hd) = (cfg.hidden_size, cfg.head_dim());
    let (q_out, kv_out) = (cfg.num_attention_heads * hd, cfg.num_kv_heads() * hd);
    add(
        ModuleId::Embedding.tensor("weight"),
        &[cfg.vocab_size, h],
        Init::Embed,
    )?;
    let weight = |m: ModuleId, path: &str| m.tensor(&format!("{path}.weight"));
    for i in 0..cfg.num_hidden_layers {
        let m = ModuleId::Layer(i);
        for (proj, out, inp) in [
            (Proj::Q, q_out, h),
            (Proj::K, kv_out, h),
            (Proj::V, kv_out, h),
            (Proj::O, h, q_out),
        ] {
            add(weight(m, proj.path()), &[out, inp], Init::Normal)?;
            if cfg.qkv_bias() && proj != Proj::O {
                add(
                    m.tensor(&format!("{}.bias", proj.path())),
                    &[out],
                    Init::Zeros,
                )?;
            }
        }
        if cfg.arch()? == Arch::Qwen3 {
            add(m.tensor(&Norm::Q.weight()), &[hd], Init::Ones)?;
            add(m.tensor(&Norm::K.weight()), &[hd], Init::Ones)?;
        }
        let inter = cfg.intermediate_size;
        add(weight(m, Proj::Gate.path()), &[inter, h], Init::Normal)?;
        add(weight(m, Proj::Up.path()), &[inter, h], Init::Normal)?;
        add(weight(m, Proj::Down.path()), &[h, inter], Init::Normal)?;
        add(m.tensor(&Norm::Input.weight()), &[h], Init::Ones)?;
        add(m.tensor(&Norm::PostAttention.weight()), &[h], Init::Ones)?;
    }
    add(ModuleId::FinalNorm.tensor("weight"), &[h], Init::Ones)?;
    if !cfg.tie_word_embeddings {
        add(
            ModuleId::Head.tensor("weight"),
            &[cfg.vocab_size, h],
            Init::Normal,
        )?;
    }
    let src = WeightSource::Memory {
        dir: PathBuf::from("<tiny>"),
        tensors,
    };
    Model::build(cfg, &src, dtype, &device, t.trainable)
}

#[derive(Clone, Copy)]
enum Init {
    Normal,
    Embed,
    Ones,
    Zeros,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_weights_and_a_save_load_round_trip() {
        for arch in ["qwen2", "qwen3", "llama"] {
            let t = TinyConfig {
                arch: arch.into(),
                seed: 7,
                ..TinyConfig::default()
            };
            let a = tiny(&t).unwrap();
            let b = tiny(&t).unwrap();
            assert_eq!(a.named().len(), b.named().len());
            for ((n1, t1), (_, t2)) in a.named().iter().zip(&b.named()) {
                assert_eq!(t1.to_vec1::<f32>().ok(), t2.to_vec1::<f32>().ok(), "{n1}");
            }
            let dir = tempfile::tempdir().unwrap();
            a.save(dir.path()).unwrap();
            let c = Model::load(
                dir.path(),
                &LoadOptions {
                    dtype: "f32".into(),
                    device: "cpu".into(),
                    trainable: false,
                    ..Default::default()
                },
            )
            .unwrap();
            let ids = Tensor::new(&[[1u32, 5, 9, 200]], &Device::Cpu).unwrap();
            let la = a.decoder.forward(&ids, None, None).unwrap();
            let lc = c.decoder.forward(&ids, None, None).unwrap();
            let d = crate::testing::max_abs_diff(&la, &lc);
            assert_eq!(d, 0.0, "{arch}: saved and loaded model differ");
            assert_eq!(c.to_string(), a.to_string());
        }
    }
}
