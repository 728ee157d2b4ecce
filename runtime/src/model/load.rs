//! Building a [`Model`]: from an HF checkpoint directory, or from tensors in memory (the built-in
//! tiny models); saving it back as an HF directory.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use super::block::{Attention, Block, Mlp, Norm, Proj};
use super::config::{Arch, ModelConfig, OneOrMany};
use super::decoder::Decoder;
use super::module_id::ModuleId;
use super::rope::Rope;
use super::weights::WeightSource;
use crate::cancel::CancelToken;
use crate::device::{DeviceSpec, Machine};
use crate::nn::{Linear, Weight};
use crate::quant::Quant4;
use crate::{Error, Result};
use std::sync::Arc;

/// `dtype` and `device` choices for loading, as scripts spell them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// `f32`, `bf16`, `f16` or `auto` (bf16 on GPUs that support it, else f16; f32 on CPU).
    pub dtype: String,
    /// `cpu`, `cuda:N` (or `cuda`, `N`), or `auto` (the first GPU if there is one, else CPU):
    /// a [`DeviceSpec`].
    pub device: String,
    /// Train every weight (full fine-tuning), not only adapters.
    pub trainable: bool,
    /// Where each module goes (HF's `device_map`); `None`: everything on `device`.
    pub device_map: Option<crate::plan::DeviceMap>,
    /// Per device (`cpu`, `cuda:N` or `N`), the bytes placement may use (HF's `max_memory`);
    /// unset devices are probed.
    pub max_memory: Vec<(String, u64)>,
    /// Quantize the layers' linear weights to 4 bits on load (HF's `load_in_4bit`); a checkpoint
    /// bitsandbytes already quantized loads as it is, with or without this.
    pub quant: Option<crate::quant::Quant4Config>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: "auto".into(),
            device: "auto".into(),
            trainable: false,
            device_map: None,
            max_memory: Vec::new(),
            quant: None,
        }
    }
}

impl LoadOptions {
    /// The device named by `device`.
    pub fn resolve_device(&self) -> Result<Device> {
        crate::device::resolve(self.device.parse()?)
    }

    /// The dtype named by `dtype` for `device`.
    pub fn resolve_dtype(&self, device: &Device) -> Result<DType> {
        self.dtype_for(device.is_cpu(), device.supports_bf16())
    }

    /// The device of `machine` and the dtype these options name there.
    pub fn resolve(&self, machine: &crate::device::Machine) -> Result<(DeviceSpec, DType)> {
        let device = machine.resolve(self.device.parse()?)?;
        let dtype = self.dtype_for(device.is_cpu(), machine.supports_bf16(device))?;
        Ok((device, dtype))
    }

    /// The dtype named by `dtype` on the CPU (`cpu`) or a GPU that computes in bf16 or not.
    pub fn dtype_for(&self, cpu: bool, bf16: bool) -> Result<DType> {
        Ok(match self.dtype.as_str() {
            "auto" if cpu => DType::F32,
            "auto" if bf16 => DType::BF16,
            "auto" => DType::F16,
            "f32" | "float32" => DType::F32,
            "bf16" | "bfloat16" => DType::BF16,
            "f16" | "float16" => DType::F16,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown dtype `{other}`; use `auto`, `f32`, `bf16` or `f16`"
                )));
            }
        })
    }
}

/// What both loads read before the weights: the config, the generation defaults, and the
/// device (of `machine`) and dtype the options resolve to.
struct Checkpoint {
    cfg: ModelConfig,
    generation: GenerationConfig,
    device: DeviceSpec,
    dtype: DType,
}

impl Checkpoint {
    fn open(dir: &Path, opts: &LoadOptions, machine: &Machine) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such checkpoint directory"),
            ));
        }
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let (device, dtype) = opts.resolve(machine)?;
        let gen_path = dir.join("generation_config.json");
        let generation = if gen_path.is_file() {
            let g: GenerationConfig = crate::files::read_config(&gen_path)?;
            g.validate().map_err(|message| Error::Config {
                path: gen_path.clone(),
                message,
            })?;
            g
        } else {
            GenerationConfig::default()
        };
        Ok(Self {
            cfg,
            generation,
            device,
            dtype,
        })
    }
}

/// The placement `opts.device_map` asks for (`None`: every module on `opts.device`).
fn place(
    cfg: &ModelConfig,
    dtype: DType,
    opts: &LoadOptions,
    machine: &Machine,
) -> Result<Option<crate::plan::Placement>> {
    let Some(map) = &opts.device_map else {
        if !opts.max_memory.is_empty() {
            return Err(Error::InvalidArgument(
                "`max_memory` limits a `device_map`; give `device_map: \"auto\"` (or another) with it".into(),
            ));
        }
        return Ok(None);
    };
    let max_memory = crate::device::budget::max_memory(&opts.max_memory)?;
    let budgets = machine.budgets(&max_memory)?;
    let quant4 = opts
        .quant
        .map(|q| q.double_quant)
        .or_else(|| cfg.is_quantized_4bit().then_some(true));
    let modules = crate::plan::memory::modules(cfg, dtype, quant4);
    let mut placement = match crate::plan::place(&modules, &budgets, map) {
        Ok(p) => p,
        // Weights that do not fit in 16 bits may in 4: say so, with what they would take.
        Err(Error::InvalidArgument(msg)) if quant4.is_none() => {
            let in4 = crate::plan::memory::modules(cfg, dtype, Some(true));
            if crate::plan::place(&in4, &budgets, map).is_err() {
                return Err(Error::InvalidArgument(msg));
            }
            let bytes: u64 = in4.iter().map(|m| m.bytes).sum();
            return Err(Error::InvalidArgument(format!(
                "{msg}; in 4 bits they would fit: {}, about {} of weights",
                crate::plan::fit::Lever::Quant4,
                crate::bytes::human(bytes as f64)
            )));
        }
        Err(e) => return Err(e),
    };
    placement.capped = !max_memory.is_empty();
    Ok(Some(placement))
}

/// `generation_config.json`: the defaults `generate` starts from.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
pub struct GenerationConfig {
    /// End-of-sequence id(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<OneOrMany>,
    /// Beginning-of-sequence id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// Sample instead of greedy decoding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub do_sample: Option<bool>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Top-k sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Repetition penalty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f32>,
}

impl GenerationConfig {
    /// Checks the sampling values: `temperature` over 0 (with sampling), `top_p` in (0, 1],
    /// `top_k` at least 1, `repetition_penalty` over 0.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(t) = self.temperature
            && !(t.is_finite() && t >= 0.0)
        {
            return Err(format!(
                "`temperature` is {t}; it must be a finite number, 0 or over"
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(format!("`top_p` is {p}; it must be over 0 and at most 1"));
        }
        if self.top_k == Some(0) {
            return Err("`top_k` is 0; it must be at least 1".into());
        }
        if let Some(r) = self.repetition_penalty
            && !(r.is_finite() && r > 0.0)
        {
            return Err(format!(
                "`repetition_penalty` is {r}; it must be a finite number over 0"
            ));
        }
        Ok(())
    }
}

/// Where a dry-run model is planned to lie: one device of a machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Planned {
    /// `cpu` or `cuda:N`.
    pub device: DeviceSpec,
    /// This machine, or GPUs named by `qscript check --gpu`.
    pub machine: Machine,
}

/// A loaded causal LM: the decoder plus what came with it.
#[derive(Clone, Debug)]
pub struct Model {
    /// The network.
    pub decoder: Decoder,
    /// The architecture.
    pub arch: Arch,
    /// Generation defaults.
    pub generation: GenerationConfig,
    /// The checkpoint directory, if loaded from one.
    pub source: Option<PathBuf>,
    /// Every weight is trained (full fine-tuning), not only adapters.
    pub trainable: bool,
    /// The LoRA config when adapters are attached (see [`crate::lora`]).
    pub lora: Option<super::lora_config::LoraConfig>,
    /// Where each module lies when `device_map` placed the model over several devices.
    pub placement: Option<crate::plan::Placement>,
    /// `Some`: a dry-run model (`qscript check`, [`Model::load_shapes`]) with the shapes and
    /// dtypes of the checkpoint's headers and no weights, planned for a device of a machine.
    pub planned: Option<Planned>,
}

impl Model {
    /// Loads an HF checkpoint directory: `config.json`, the safetensors weights, and
    /// `generation_config.json` when present.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::load_with(dir, opts, &CancelToken::new())
    }

    /// [`Model::load`], polling `cancel` before each file and each tensor.
    pub fn load_with(dir: &Path, opts: &LoadOptions, cancel: &CancelToken) -> Result<Self> {
        let c = Checkpoint::open(dir, opts, &Machine::Here)?;
        let src = WeightSource::open(dir, cancel)?;
        let placement = place(&c.cfg, c.dtype, opts, &Machine::Here)?;
        let device = crate::device::resolve(c.device)?;
        let mut m = Self::build_placed(c.cfg, &src, c.dtype, &device, opts, placement)?;
        m.generation = c.generation;
        m.source = Some(dir.to_path_buf());
        Ok(m)
    }

    /// What [`Model::load`] would load, from `config.json` and the safetensors headers alone (no
    /// weight is read): every tensor's presence, shape and dtype checked, each file's size
    /// checked against its header. The model has no weights (see [`Model::planned`]).
    pub fn load_shapes(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        Self::load_shapes_with(dir, opts, &Machine::Here, &CancelToken::new())
    }

    /// [`Model::load_shapes`] planned for `machine` (this one, or GPUs named by `qscript check
    /// --gpu`), polling `cancel` before each file and each tensor.
    pub fn load_shapes_with(
        dir: &Path,
        opts: &LoadOptions,
        machine: &Machine,
        cancel: &CancelToken,
    ) -> Result<Self> {
        let c = Checkpoint::open(dir, opts, machine)?;
        let src = WeightSource::headers(dir, cancel)?;
        let placement = place(&c.cfg, c.dtype, opts, machine)?;
        let mut m = Self::build_placed(c.cfg, &src, c.dtype, &Device::Cpu, opts, None)?;
        m.placement = placement;
        m.generation = c.generation;
        m.source = Some(dir.to_path_buf());
        m.planned = Some(Planned {
            device: c.device,
            machine: machine.clone(),
        });
        Ok(m)
    }

    /// Whether this is a dry-run model (shapes only).
    pub fn is_shapes_only(&self) -> bool {
        self.planned.is_some()
    }

    /// An error when this model has no weights (a dry run's): `what` needs them.
    pub fn needs_weights(&self, what: &str) -> Result<()> {
        if self.is_shapes_only() {
            return Err(Error::InvalidArgument(format!(
                "{what} needs weights; this model was checked from its headers only (`qscript check`)"
            )));
        }
        Ok(())
    }

    /// Builds the model from `src` on `device`, checking every tensor's presence and shape.
    pub fn build(
        cfg: ModelConfig,
        src: &WeightSource,
        dtype: DType,
        device: &Device,
        trainable: bool,
    ) -> Result<Self> {
        let opts = LoadOptions {
            trainable,
            ..LoadOptions::default()
        };
        Self::build_placed(cfg, src, dtype, device, &opts, None)
    }

    /// [`Model::build`] with each module on the device `placement` gives it and the layers'
    /// linear weights in 4 bits when `opts.quant` asks (or the checkpoint has them so).
    pub fn build_placed(
        cfg: ModelConfig,
        src: &WeightSource,
        dtype: DType,
        device: &Device,
        opts: &LoadOptions,
        placement: Option<crate::plan::Placement>,
    ) -> Result<Self> {
        cfg.validate().map_err(|message| Error::Config {
            path: src.dir().join("config.json"),
            message,
        })?;
        let trainable = opts.trainable;
        if trainable && (opts.quant.is_some() || cfg.is_quantized_4bit()) {
            return Err(Error::InvalidArgument(
                "a 4-bit model trains adapters only (QLoRA): load it without `trainable: true` \
                 and attach LoRA, or load it without `load_in_4bit` to train every weight"
                    .into(),
            ));
        }
        let arch = cfg.arch()?;
        let mut devices = HashMap::new();
        if let Some(p) = &placement {
            for d in &p.devices {
                devices.insert(d.device, crate::device::resolve(d.device)?);
            }
        }
        let l = Loader {
            src,
            dtype,
            device,
            placement: placement.as_ref(),
            devices,
            quant: opts.quant,
        };
        let (h, hd) = (cfg.hidden_size, cfg.head_dim());
        let (q_out, kv_out) = (cfg.num_attention_heads * hd, cfg.num_kv_heads() * hd);
        let embed = l.get(ModuleId::Embedding, "weight", &[cfg.vocab_size, h])?;
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let m = ModuleId::Layer(i);
            let proj =
                |p: Proj, out: usize, inp: usize, bias: bool| l.linear(m, p.path(), out, inp, bias);
            let norm = |n: Norm, size: usize| l.get(m, &n.weight(), &[size]);
            let qkv_bias = cfg.qkv_bias();
            let q = proj(Proj::Q, q_out, h, qkv_bias)?;
            let k = proj(Proj::K, kv_out, h, qkv_bias)?;
            let v = proj(Proj::V, kv_out, h, qkv_bias)?;
            let o = proj(Proj::O, h, q_out, cfg.o_bias())?;
            let norms = if arch == Arch::Qwen3 {
                Some((norm(Norm::Q, hd)?, norm(Norm::K, hd)?))
            } else {
                None
            };
            let mut attn = Attention::new(&cfg, q, k, v, o, norms);
            // A frozen base's q/k/v as one product (`super::qkv`); full fine-tuning moves its
            // weights into the optimizer's buffer, so those stay apart.
            if !trainable && super::qkv::wanted(l.device_of(m)) {
                attn.fuse_qkv()?;
            }
            let inter = cfg.intermediate_size;
            let mlp = Mlp {
                gate: proj(Proj::Gate, inter, h, false)?,
                up: proj(Proj::Up, inter, h, false)?,
                down: proj(Proj::Down, h, inter, false)?,
            };
            blocks.push(Block {
                input_norm: norm(Norm::Input, h)?,
                attn,
                post_norm: norm(Norm::PostAttention, h)?,
                mlp,
                eps: cfg.rms_norm_eps,
            });
        }
        let norm = l.get(ModuleId::FinalNorm, "weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(l.dense(ModuleId::Head, "weight", (cfg.vocab_size, h))?)
        };
        let rope = Rope::new(&cfg);
        let generation = GenerationConfig {
            eos_token_id: cfg.eos_token_id.clone(),
            bos_token_id: cfg.bos_token_id,
            ..GenerationConfig::default()
        };
        let decoder = Decoder {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            rope,
        };
        Ok(Self {
            decoder,
            arch,
            generation,
            source: None,
            trainable,
            lora: None,
            placement,
            planned: None,
        })
    }

    /// The config.
    pub fn config(&self) -> &ModelConfig {
        &self.decoder.cfg
    }

    /// `cpu` or `cuda:N`.
    pub fn device_name(&self) -> String {
        if let Some(p) = &self.planned {
            return p.device.to_string();
        }
        match self.decoder.device().location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => DeviceSpec::gpu(gpu_id).to_string(),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
            candle_core::DeviceLocation::Cpu => DeviceSpec::Cpu.to_string(),
        }
    }

    /// End-of-sequence ids from `generation_config.json`, else config.json.
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.generation.eos_token_id {
            Some(e) => e.to_vec(),
            None => self.config().eos_ids(),
        }
    }

    /// The first 4-bit weight of the layers, if the model has any.
    pub fn quant4(&self) -> Option<&crate::quant::Quant4> {
        self.decoder.blocks.iter().find_map(|b| {
            super::block::Proj::ALL
                .iter()
                .find_map(|&p| match &b.proj(p).weight {
                    Weight::Quant4(q) => Some(q.as_ref()),
                    Weight::Dense(_) => None,
                })
        })
    }

    /// Writes an HF checkpoint directory: `config.json`, `generation_config.json` and
    /// `model.safetensors` (each file atomically).
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.needs_weights("saving a model")?;
        crate::sandbox::create_dir_all(dir)?;
        let mut cfg = self.config().clone();
        cfg.dtype = Some(dtype_name(self.decoder.dtype()).into());
        cfg.model_type = Some(self.arch.model_type().into());
        // 4-bit weights are saved as bitsandbytes saves them, under its config (transformers
        // loads the directory as a 4-bit model); a merged or float model has none.
        cfg.quantization_config = self.quant4().map(|q| {
            serde_json::json!({
                "quant_method": "bitsandbytes",
                "load_in_4bit": true,
                "load_in_8bit": false,
                "bnb_4bit_quant_type": q.quant_type.name(),
                "bnb_4bit_use_double_quant": matches!(q.absmax, crate::quant::Absmax::Nested { .. }),
                "bnb_4bit_compute_dtype": dtype_name(self.decoder.dtype()),
                "bnb_4bit_quant_storage": "uint8",
                "llm_int8_skip_modules": null,
                "llm_int8_threshold": 6.0,
                "llm_int8_has_fp16_weight": false,
                "llm_int8_enable_fp32_cpu_offload": false,
            })
        });
        let json = |v: &dyn erased::Json| v.to_json();
        crate::sandbox::write_atomic(&dir.join("config.json"), json(&cfg).as_bytes())?;
        crate::sandbox::write_atomic(
            &dir.join("generation_config.json"),
            json(&self.generation).as_bytes(),
        )?;
        let tensors: HashMap<String, Tensor> = self.named().into_iter().collect();
        super::weights::save_file(&tensors, &dir.join("model.safetensors"))
    }
}

mod erased {
    pub trait Json {
        fn to_json(&self) -> String;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> String {
            serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
        }
    }
}

/// `bfloat16`, `float32`, ... as config.json spells dtypes.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.config();
        let n = self.decoder.num_params();
        let params = if n >= 1_000_000_000 {
            format!("{:.2}B", n as f64 / 1e9)
        } else if n >= 1_000_000 {
            format!("{:.1}M", n as f64 / 1e6)
        } else {
            format!("{n}")
        };
        write!(
            f,
            "Model({}, {params} params, {} layers, hidden {}, heads {}/{}, vocab {}, {}, {})",
            self.arch.name(),
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_kv_heads(),
            c.vocab_size,
            match self.quant4() {
                Some(q) => format!(
                    "{} ({} compute)",
                    q.quant_type.name(),
                    dtype_name(self.decoder.dtype())
                ),
                None => dtype_name(self.decoder.dtype()).to_string(),
            },
            match &self.placement {
                Some(p) if p.devices.len() > 1 => p
                    .devices
                    .iter()
                    .map(|d| d.device.to_string())
                    .collect::<Vec<_>>()
                    .join("+"),
                _ => self.device_name(),
            },
        )
    }
}

struct Loader<'a> {
    src: &'a WeightSource,
    dtype: DType,
    device: &'a Device,
    placement: Option<&'a crate::plan::Placement>,
    devices: HashMap<DeviceSpec, Device>,
    /// Quantize the layers' linear weights on load.
    quant: Option<crate::quant::Quant4Config>,
}

impl Loader<'_> {
    /// The tensor `path` under `module` (`weight`, `mlp.up_proj.weight`).
    fn get(&self, module: ModuleId, path: &str, shape: &[usize]) -> Result<Tensor> {
        let device = self.device_of(module);
        self.src
            .get(&module.tensor(path), shape, self.dtype, device)
    }

    /// The device `module` is placed on.
    fn device_of(&self, module: ModuleId) -> &Device {
        let Some(p) = self.placement else {
            return self.device;
        };
        p.device(module)
            .and_then(|d| self.devices.get(&d))
            .unwrap_or(self.device)
    }

    /// The linear layer `path` of `module` (`""`: the module itself, the head).
    fn linear(
        &self,
        module: ModuleId,
        path: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Linear> {
        let sub = |kind: &str| {
            if path.is_empty() {
                kind.to_string()
            } else {
                format!("{path}.{kind}")
            }
        };
        let name = module.tensor(&sub("weight"));
        let device = self.device_of(module);
        let weight = if self.src.contains(&format!("{name}.absmax")) {
            Weight::Quant4(Arc::new(self.stored_4bit(&name, (out, inp), device)?))
        } else if let (Some(q), ModuleId::Layer(_)) = (self.quant, module) {
            // Read in the compute dtype on the host (bitsandbytes quantizes what transformers
            // loaded), one weight at a time: the float model is never whole in memory.
            let q4 = if self.src.is_headers() {
                self.src.get(&name, &[out, inp], self.dtype, &Device::Cpu)?;
                Quant4::planned((out, inp), &q, self.dtype)?
            } else {
                let w = self.src.get(&name, &[out, inp], self.dtype, &Device::Cpu)?;
                Quant4::quantize(&w, &q, device)?
            };
            Weight::Quant4(Arc::new(q4))
        } else {
            Weight::Dense(self.get(module, &sub("weight"), &[out, inp])?)
        };
        let b = if bias {
            Some(self.get(module, &sub("bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::with_weight(weight, b))
    }

    /// The float matrix `path` of `module` (`[out, in]`): a weight bitsandbytes stored in 4 bits
    /// is dequantized (the head stays in the compute dtype, as in HF).
    fn dense(&self, module: ModuleId, path: &str, shape: (usize, usize)) -> Result<Tensor> {
        let name = module.tensor(path);
        if self.src.contains(&format!("{name}.absmax")) {
            let q = self.stored_4bit(&name, shape, self.device_of(module))?;
            return Ok(q.dequantize(self.dtype)?);
        }
        self.get(module, path, &[shape.0, shape.1])
    }

    /// The 4-bit weight `name` as bitsandbytes saved it (in a dry run: its parts' sizes checked,
    /// no data).
    fn stored_4bit(&self, name: &str, shape: (usize, usize), device: &Device) -> Result<Quant4> {
        let part = |suffix: &str| {
            if suffix.is_empty() {
                name.to_string()
            } else {
                format!("{name}.{suffix}")
            }
        };
        let has = |suffix: &str| self.src.contains(&part(suffix));
        let fetch = |suffix: &str, dtype: DType, dims: Option<&[usize]>| {
            let on = if suffix.starts_with("quant_state") {
                &Device::Cpu
            } else {
                device
            };
            self.src.get_stored(&part(suffix), dims, dtype, on)
        };
        if self.src.is_headers() {
            let quant_type = if has("quant_state.bitsandbytes__fp4") {
                crate::quant::QuantType::Fp4
            } else {
                crate::quant::QuantType::Nf4
            };
            let cfg = crate::quant::Quant4Config {
                quant_type,
                double_quant: has("nested_absmax"),
            };
            let n = shape.0 * shape.1;
            fetch("", DType::U8, Some(&[n.div_ceil(2), 1]))?;
            return Quant4::planned(shape, &cfg, self.dtype);
        }
        crate::quant::read_bnb(name, shape, &has, &fetch)
    }
}
