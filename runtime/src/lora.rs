//! LoRA, as PEFT does it: `LoraConfig` straight from `adapter_config.json`, injection by module
//! name, regex or `all-linear`, PEFT's initialisation (A kaiming-uniform, B zeros) and scaling
//! (`alpha / r`, or `alpha / sqrt(r)` with rsLoRA), adapters saved and loaded under PEFT's tensor
//! names, and merging into plain weights.
//!
//! [`attach`] returns a new [`Model`] that shares every frozen base tensor with its input and owns
//! fresh adapter tensors; the input model is not changed.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Uniform};

use crate::model::block::Proj;
pub use crate::model::lora_config::{LoraConfig, Targets, is_target};
use crate::model::params::PEFT_PREFIX;
use crate::model::{Model, ModuleId};
use crate::nn::linear::{Linear, LoraAdapter, Weight};
use crate::{Error, Result};

fn linear_mut(model: &mut Model, layer: usize, proj: Proj) -> &mut Linear {
    model.decoder.blocks[layer].proj_mut(proj)
}

/// Every linear layer of the model with its module path.
pub fn linears(model: &Model) -> Vec<(String, &Linear)> {
    let mut out = Vec::new();
    for (i, b) in model.decoder.blocks.iter().enumerate() {
        for p in Proj::ALL {
            out.push((ModuleId::Layer(i).tensor(p.path()), b.proj(p)));
        }
    }
    out
}

/// A copy of `model` with fresh adapters on the target modules (A kaiming-uniform from `seed`,
/// B zeros), sharing the frozen base tensors. Errors when no module matches.
pub fn attach(model: &Model, cfg: &LoraConfig, seed: u64) -> Result<Model> {
    cfg.validate()?;
    check_targets(model, &cfg.target_modules)?;
    // A rank no machine holds is an error here, not a failed allocation.
    let mut elems = 0f64;
    for (path, lin) in linears(model) {
        if is_target(&cfg.target_modules, &path)? {
            elems += (cfg.r as f64) * (lin.in_features() + lin.out_features()) as f64;
        }
    }
    crate::device::check_fits(
        elems * 4.0 * 2.0,
        model.decoder.device(),
        &format!("LoRA with `r: {}` ({elems:.3e} adapter parameters)", cfg.r),
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = model.clone();
    out.lora = None;
    let mut count = 0;
    for i in 0..out.decoder.blocks.len() {
        for proj in Proj::ALL {
            let path = ModuleId::Layer(i).tensor(proj.path());
            if !is_target(&cfg.target_modules, &path)? {
                continue;
            }
            let lin = linear_mut(&mut out, i, proj);
            let (o, inp) = (lin.out_features(), lin.in_features());
            let bound = 1.0 / (inp as f32).sqrt();
            let uni =
                Uniform::new(-bound, bound).map_err(|e| Error::InvalidArgument(e.to_string()))?;
            let a: Vec<f32> = (0..cfg.r * inp).map(|_| uni.sample(&mut rng)).collect();
            let device = lin.weight.device().clone();
            let a = Tensor::from_vec(a, (cfg.r, inp), &device)?;
            let b = Tensor::zeros((o, cfg.r), DType::F32, &device)?;
            lin.lora = Some(LoraAdapter::new(a, b, cfg.scale(), cfg.lora_dropout)?);
            count += 1;
        }
    }
    if count == 0 {
        let modules: Vec<&str> = Proj::ALL.iter().map(|p| p.short()).collect();
        return Err(Error::InvalidArgument(format!(
            "`target_modules` {} matches no module; this model's linear layers are {}",
            cfg.target_modules,
            modules.join(", ")
        )));
    }
    out.lora = Some(cfg.clone());
    Ok(out)
}

/// Every name of a `target_modules` list must match a module of `model`: a misspelled one would
/// silently give a smaller adapter than asked for.
fn check_targets(model: &Model, targets: &Targets) -> Result<()> {
    let Targets::Names(names) = targets else {
        return Ok(());
    };
    let paths: Vec<String> = linears(model).into_iter().map(|(p, _)| p).collect();
    for n in names {
        let hit = paths
            .iter()
            .any(|p| p == n || p.ends_with(&format!(".{n}")));
        if !hit {
            let modules: Vec<&str> = Proj::ALL.iter().map(|p| p.short()).collect();
            let near = modules
                .iter()
                .map(|m| (strsim::levenshtein(n, m), *m))
                .filter(|(d, _)| *d <= 2)
                .min()
                .map_or_else(String::new, |(_, m)| format!(" (did you mean `{m}`?)"));
            return Err(Error::InvalidArgument(format!(
                "`target_modules`: `{n}` matches no module of this model{near}; its linear layers \
                 are {}",
                modules.join(", ")
            )));
        }
    }
    Ok(())
}

/// `(module path, adapter)` for every adapter of `model`.
pub fn adapters(model: &Model) -> Vec<(String, &LoraAdapter)> {
    linears(model)
        .into_iter()
        .filter_map(|(p, l)| l.lora.as_ref().map(|a| (p, a)))
        .collect()
}

/// The adapter tensors under PEFT's tensor names (shared, not copied).
pub fn adapter_tensors(model: &Model) -> Vec<(String, Tensor)> {
    crate::model::params::adapters(&model.decoder)
}

/// PEFT's `print_trainable_parameters` line.
pub fn trainable_parameters(model: &Model) -> String {
    let trainable: usize = adapter_tensors(model)
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    let all = model.decoder.num_params() + trainable;
    format!(
        "trainable params: {} || all params: {} || trainable%: {:.4}",
        thousands(trainable),
        thousands(all),
        100.0 * trainable as f64 / all.max(1) as f64
    )
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` (PEFT's layout) to `dir`.
pub fn save_adapter(model: &Model, dir: &Path) -> Result<()> {
    let cfg = model
        .lora
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("this model has no LoRA adapters to save".into()))?;
    crate::sandbox::create_dir_all(dir)?;
    let mut cfg = cfg.clone();
    cfg.base_model_name_or_path = cfg
        .base_model_name_or_path
        .or_else(|| model.source.as_ref().map(|p| p.display().to_string()));
    let json = serde_json::to_string_pretty(&cfg).unwrap_or_default();
    crate::sandbox::write_atomic(&dir.join("adapter_config.json"), json.as_bytes())?;
    let tensors: HashMap<String, Tensor> = adapter_tensors(model).into_iter().collect();
    crate::model::weights::save_file(&tensors, &dir.join("adapter_model.safetensors"))
}

/// Loads a PEFT adapter directory onto `model` (a new model; `model` is not changed).
pub fn load_adapter(model: &Model, dir: &Path) -> Result<Model> {
    let cfg = LoraConfig::from_file(&dir.join("adapter_config.json"))?;
    let file = dir.join("adapter_model.safetensors");
    if !file.is_file() {
        return Err(Error::io(
            &file,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no `adapter_model.safetensors` in the adapter directory",
            ),
        ));
    }
    // Read through the sandbox's check on the opened file.
    let bytes = crate::sandbox::read(&file)?;
    let tensors = crate::model::weights::load_all(
        &file,
        &bytes,
        &candle_core::Device::Cpu,
        &crate::cancel::CancelToken::new(),
    )?;
    let mut out = attach(model, &cfg, 0)?;
    for (i, proj) in adapted(&out) {
        let p = ModuleId::Layer(i).tensor(proj.path());
        let lin = linear_mut(&mut out, i, proj);
        let (o, inp) = (lin.out_features(), lin.in_features());
        let device = lin.weight.device().clone();
        let get = |suffix: &str, shape: [usize; 2]| -> Result<Tensor> {
            let key = format!("{PEFT_PREFIX}{p}.{suffix}.weight");
            let t = tensors.get(&key).ok_or_else(|| Error::MissingTensor {
                name: key.clone(),
                path: dir.to_path_buf(),
            })?;
            if t.dims() != shape {
                return Err(Error::ShapeMismatch {
                    name: key,
                    path: dir.to_path_buf(),
                    expected: shape.to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            Ok(t.to_dtype(DType::F32)?.to_device(&device)?)
        };
        let (a, b) = (get("lora_A", [cfg.r, inp])?, get("lora_B", [o, cfg.r])?);
        lin.lora = Some(LoraAdapter::new(a, b, cfg.scale(), cfg.lora_dropout)?);
    }
    Ok(out)
}

/// `(layer, projection)` of every adapter of `model`, in model order.
fn adapted(model: &Model) -> Vec<(usize, Proj)> {
    let mut out = Vec::new();
    for (i, b) in model.decoder.blocks.iter().enumerate() {
        out.extend(
            Proj::ALL
                .into_iter()
                .filter(|&p| b.proj(p).lora.is_some())
                .map(|p| (i, p)),
        );
    }
    out
}

/// A plain model with every adapter folded into its base weight: `W + scale * B A`.
/// (A dry-run model, [`Model::is_shapes_only`], loses its adapters and keeps its shapes.)
pub fn merge(model: &Model) -> Result<Model> {
    let mut out = model.clone();
    for (i, proj) in adapted(model) {
        let lin = linear_mut(&mut out, i, proj);
        if let Some(ad) = lin.lora.take()
            && !model.is_shapes_only()
        {
            // A 4-bit base is dequantized on the way (HF's merge of a QLoRA adapter): the merged
            // weight is a float weight in the compute dtype.
            let dtype = model.decoder.dtype();
            let delta = (ad.b.matmul(&ad.a)? * ad.scale)?;
            let base = lin.weight.matrix(dtype)?.to_dtype(DType::F32)?;
            let delta = delta.to_device(base.device())?;
            lin.weight = Weight::Dense((base + delta)?.to_dtype(dtype)?);
        }
    }
    // A replaced q/k/v weight ends their one allocation (`model::qkv`).
    for b in &mut out.decoder.blocks {
        b.attn.settle()?;
    }
    out.lora = None;
    Ok(out)
}
