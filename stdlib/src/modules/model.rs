//! `model`: loading HF checkpoints and built-in tiny models, saving, generating, chatting.

#[allow(clippy::wildcard_imports)]
use rhai::plugin::*;

use std::sync::atomic::Ordering;

use qscript_runtime::model::GenerateOptions;
use rhai::EvalAltResult;
use serde::Deserialize;

use crate::context::RunContext;
use crate::error::to_rhai_at;
use crate::handles::{ModelHandle, TokenizerHandle};

/// Options of `model::load`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LoadOpts {
    dtype: String,
    device: String,
    trainable: bool,
    device_map: Option<serde_json::Value>,
    max_memory: Option<std::collections::BTreeMap<String, serde_json::Value>>,
    /// A hub id's branch, tag or commit in the HF cache (`main` when unset).
    revision: Option<String>,
    /// HF's `BitsAndBytesConfig` names: quantize the layers' linear weights to 4 bits on load.
    load_in_4bit: bool,
    load_in_8bit: bool,
    bnb_4bit_quant_type: Option<String>,
    bnb_4bit_use_double_quant: Option<bool>,
    bnb_4bit_compute_dtype: Option<String>,
    /// LLaMA-Factory's name: 4 is `load_in_4bit`.
    quantization_bit: Option<i64>,
}

impl Default for LoadOpts {
    fn default() -> Self {
        Self {
            dtype: "auto".into(),
            device: "auto".into(),
            trainable: false,
            device_map: None,
            max_memory: None,
            revision: None,
            load_in_4bit: false,
            load_in_8bit: false,
            bnb_4bit_quant_type: None,
            bnb_4bit_use_double_quant: None,
            bnb_4bit_compute_dtype: None,
            quantization_bit: None,
        }
    }
}

impl LoadOpts {
    /// The runtime's options: `device_map` as a name or a map of modules to devices, and
    /// `max_memory` sizes as accelerate writes them (`"20GiB"`, `"500MB"`, bytes). Devices are
    /// passed on as written (a number as its digits): the runtime's `DeviceSpec` parses them.
    fn to_runtime(&self) -> Result<qscript_runtime::model::LoadOptions, String> {
        use qscript_runtime::plan::DeviceMap;
        let device_map = match &self.device_map {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(n)) => {
                Some(DeviceMap::from_name(n).map_err(|e| e.to_string())?)
            }
            Some(serde_json::Value::Object(m)) => {
                let mut entries = Vec::new();
                for (k, v) in m {
                    let dev = match v {
                        serde_json::Value::String(d) => d.clone(),
                        serde_json::Value::Number(n) => n.to_string(),
                        other => {
                            return Err(format!(
                                "`device_map.{k}`: a device (`\"cuda:0\"`, `0`, `\"cpu\"`), got {other}"
                            ));
                        }
                    };
                    entries.push((k.clone(), dev));
                }
                Some(DeviceMap::Explicit(entries))
            }
            Some(other) => {
                return Err(format!(
                    "`device_map`: `\"auto\"`, `\"balanced\"`, `\"sequential\"` or a map of module names to devices, got {other}"
                ));
            }
        };
        let mut max_memory = Vec::new();
        for (k, v) in self.max_memory.iter().flatten() {
            max_memory.push((k.clone(), size(k, v)?));
        }
        let (quant, dtype) = self.quantization()?;
        Ok(qscript_runtime::model::LoadOptions {
            dtype,
            device: self.device.clone(),
            trainable: self.trainable,
            device_map,
            max_memory,
            quant,
        })
    }

    /// The 4-bit quantization the options ask for, and the dtype the model computes in
    /// (`bnb_4bit_compute_dtype` stands for `dtype`).
    fn quantization(
        &self,
    ) -> Result<(Option<qscript_runtime::quant::Quant4Config>, String), String> {
        use qscript_runtime::quant::{Quant4Config, QuantType};
        let eight = "8-bit weights (LLM.int8) are not supported; use `load_in_4bit: true` \
                     (QLoRA's 4-bit NF4) or a float dtype";
        if self.load_in_8bit {
            return Err(format!("`load_in_8bit`: {eight}"));
        }
        let four = match self.quantization_bit {
            None => self.load_in_4bit,
            Some(4) => true,
            Some(8) => return Err(format!("`quantization_bit: 8`: {eight}")),
            Some(b) => {
                return Err(format!(
                    "`quantization_bit: {b}`: 4 is the quantization qscript has (NF4)"
                ));
            }
        };
        let mut dtype = self.dtype.clone();
        if !four {
            for (set, name) in [
                (self.bnb_4bit_quant_type.is_some(), "bnb_4bit_quant_type"),
                (
                    self.bnb_4bit_use_double_quant.is_some(),
                    "bnb_4bit_use_double_quant",
                ),
                (
                    self.bnb_4bit_compute_dtype.is_some(),
                    "bnb_4bit_compute_dtype",
                ),
            ] {
                if set {
                    return Err(format!("`{name}` goes with `load_in_4bit: true`"));
                }
            }
            return Ok((None, dtype));
        }
        if let Some(c) = &self.bnb_4bit_compute_dtype {
            let c = c.trim_start_matches("torch.").to_string();
            if !["f32", "float32", "bf16", "bfloat16", "f16", "float16"].contains(&c.as_str()) {
                return Err(format!(
                    "`bnb_4bit_compute_dtype: \"{c}\"`: 4-bit weights compute in \"bf16\", \"f16\" or \"f32\""
                ));
            }
            if dtype != "auto" && dtype != c {
                return Err(format!(
                    "`bnb_4bit_compute_dtype: \"{c}\"` and `dtype: \"{dtype}\"` disagree; the \
                     model computes in one dtype (give one of them)"
                ));
            }
            dtype = c;
        }
        let quant_type = QuantType::parse(self.bnb_4bit_quant_type.as_deref().unwrap_or("nf4"))
            .map_err(|e| e.to_string())?;
        Ok((
            Some(Quant4Config {
                quant_type,
                double_quant: self.bnb_4bit_use_double_quant.unwrap_or(false),
            }),
            dtype,
        ))
    }
}

/// `"20GiB"`, `"20GB"`, `"512MiB"`, `"1.5GiB"` or a number of bytes.
fn size(key: &str, v: &serde_json::Value) -> Result<u64, String> {
    let bad = || {
        format!(
            "`max_memory.{key}`: a size like `\"20GiB\"`, `\"500MB\"` or a number of bytes, got {v}"
        )
    };
    if let Some(n) = v.as_u64() {
        return Ok(n);
    }
    let s = v.as_str().ok_or_else(bad)?;
    qscript_runtime::bytes::parse_size(s).map_err(|()| bad())
}

/// Options of `generate` and `chat`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct GenOpts {
    max_new_tokens: usize,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<usize>,
    repetition_penalty: Option<f32>,
    seed: u64,
    stream: Option<bool>,
    skip_special_tokens: bool,
    enable_thinking: Option<bool>,
}

impl Default for GenOpts {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: None,
            top_p: None,
            top_k: None,
            repetition_penalty: None,
            seed: 0,
            stream: None,
            skip_special_tokens: true,
            enable_thinking: None,
        }
    }
}

/// A model with adapters saves its adapter (PEFT's `save_pretrained`); a plain model its weights.
fn save_model(
    m: &qscript_runtime::model::Model,
    dir: &std::path::Path,
) -> qscript_runtime::Result<()> {
    if m.lora.is_some() {
        qscript_runtime::lora::save_adapter(m, dir)
    } else {
        m.save(dir)
    }
}

/// `model::load` in a dry run: a model "saved" earlier in the run, or the checkpoint's shapes
/// from its headers (no weight is read). When only the weights are missing, the memory their
/// config implies is printed before the error.
fn load_shapes(
    ctx: &NativeCallContext,
    rc: &RunContext,
    dir: &std::path::Path,
    lo: &qscript_runtime::model::LoadOptions,
) -> Result<ModelHandle, Box<EvalAltResult>> {
    if let Some(m) = crate::context::lock(&rc.dry_models).get(dir) {
        return Ok(m.clone());
    }
    let machine = &rc.machine;
    let m = qscript_runtime::model::Model::load_shapes_with(dir, lo, machine, &rc.cancel).map_err(
        |e| {
            if let Ok(cfg) =
                qscript_runtime::model::ModelConfig::from_file(&dir.join("config.json"))
                && let Ok((_, dtype)) = lo.resolve(machine)
            {
                let params = qscript_runtime::plan::memory::param_count(&cfg);
                let bytes = params * dtype.size_in_bytes() as f64;
                rc.sink.err(&format!(
                "check: `{}`: config.json describes {params:.3e} parameters, {} of weights in {}",
                dir.display(),
                qscript_runtime::plan::memory::human(bytes),
                qscript_runtime::model::load::dtype_name(dtype)
            ));
            }
            to_rhai_at(ctx)(e)
        },
    )?;
    rc.sink.err(&format!(
        "check: model `{}`: {m}; weights not read",
        rc.sandbox.shown(dir).display()
    ));
    rc.check_fact("model", format!("{m} (headers only)"));
    Ok(ModelHandle(std::sync::Arc::new(m)))
}

/// Saves `m` into `dir`; in a dry run a model without weights is kept in memory for later loads
/// of `dir` (its adapters, which are real, are still written).
fn save_model_or_shapes(
    rc: &RunContext,
    m: &ModelHandle,
    dir: &std::path::Path,
    tok: Option<&TokenizerHandle>,
) -> qscript_runtime::Result<()> {
    if m.0.is_shapes_only() && m.0.lora.is_none() {
        crate::context::lock(&rc.dry_models).insert(dir.to_path_buf(), m.clone());
        rc.sink.err(&format!(
            "check: would write the model to `{}`",
            rc.sandbox.shown(dir).display()
        ));
        if let Some(t) = tok {
            t.0.save(dir)?;
        }
        return Ok(());
    }
    save_model(&m.0, dir)?;
    let what = if m.0.lora.is_some() {
        "the LoRA adapter (PEFT's layout)"
    } else {
        "the model"
    };
    let with = if let Some(t) = tok {
        t.0.save(dir)?;
        " and its tokenizer"
    } else {
        ""
    };
    rc.sink.err(&format!(
        "saved {what}{with} to `{}`",
        rc.sandbox.shown(dir).display()
    ));
    Ok(())
}

/// The reply of `m` to one user `prompt` (after `system`, if given) through `tok`'s chat template:
/// greedy, at most `max_new_tokens`, not streamed (for side-by-side comparisons).
pub(crate) fn reply(
    ctx: &NativeCallContext,
    m: &ModelHandle,
    tok: &TokenizerHandle,
    system: Option<&str>,
    prompt: &str,
    max_new_tokens: usize,
    enable_thinking: Option<bool>,
) -> Result<String, Box<EvalAltResult>> {
    let mut messages = Vec::new();
    if let Some(s) = system {
        messages.push(serde_json::json!({"role": "system", "content": s}));
    }
    messages.push(serde_json::json!({"role": "user", "content": prompt}));
    let opts = GenOpts {
        max_new_tokens,
        stream: Some(false),
        enable_thinking,
        ..GenOpts::default()
    };
    chat_reply(ctx, m, tok, &serde_json::Value::Array(messages), &opts)
}

/// The reply of `m` to `messages` rendered with `tok`'s chat template (the generation prompt
/// added; `enable_thinking` passed to it when given), generated as `opts` says.
fn chat_reply(
    ctx: &NativeCallContext,
    m: &ModelHandle,
    tok: &TokenizerHandle,
    messages: &serde_json::Value,
    opts: &GenOpts,
) -> Result<String, Box<EvalAltResult>> {
    let mut extra = serde_json::Map::new();
    if let Some(t) = opts.enable_thinking {
        extra.insert("enable_thinking".into(), t.into());
    }
    let topts = qscript_runtime::tokenizer::TemplateOptions {
        add_generation_prompt: true,
        extra,
    };
    let text = tok
        .0
        .apply_chat_template(messages, &topts)
        .map_err(to_rhai_at(ctx))?;
    let ids = tok.0.encode(&text, false).map_err(to_rhai_at(ctx))?;
    run_generate(ctx, m, tok, &ids, opts)
}

/// Generates after `prompt` and returns the new text, streaming it when asked (or by default in
/// the interactive REPL).
fn run_generate(
    ctx: &NativeCallContext,
    m: &ModelHandle,
    tok: &TokenizerHandle,
    prompt: &[u32],
    opts: &GenOpts,
) -> Result<String, Box<EvalAltResult>> {
    let rc = RunContext::of(ctx)?;
    let stream = opts
        .stream
        .unwrap_or_else(|| rc.stream_by_default.load(Ordering::Relaxed));
    let mut stop_ids: Vec<u32> = tok.0.eos_id().into_iter().collect();
    stop_ids.extend(tok.0.token_to_id("<|im_end|>"));
    let g = GenerateOptions {
        max_new_tokens: opts.max_new_tokens,
        temperature: opts.temperature,
        top_p: opts.top_p,
        top_k: opts.top_k,
        repetition_penalty: opts.repetition_penalty,
        seed: opts.seed,
        stop_ids,
        ignore_eos: false,
    };
    // A tokenizer whose ids the model's embedding cannot hold is an error naming both sizes.
    qscript_runtime::tokenizer::check_fits(tok.0.vocab_size(), m.0.config().vocab_size, None)
        .map_err(to_rhai_at(ctx))?;
    if rc.checking() {
        // A dry run: the prompt and options are checked, nothing is generated.
        m.0.check_generate(prompt, &g).map_err(to_rhai_at(ctx))?;
        return Ok(String::new());
    }
    let mut text = qscript_runtime::detok::Detok::new(Vec::new());
    let mut shown = false;
    let skip = opts.skip_special_tokens;
    let ids = m.0.generate(prompt, &g, &rc.cancel, &mut |id| {
        if stream {
            let new = text.push(id, |ids| tok.0.decode(ids, skip))?;
            if !new.is_empty() {
                rc.sink.stream(&new);
                shown = true;
            }
        }
        Ok(())
    });
    if stream && shown {
        // A reply that printed nothing (only special tokens) leaves no blank line.
        rc.sink.stream("\n");
    }
    let ids = ids.map_err(to_rhai_at(ctx))?;
    if m.0.source.is_none() {
        qscript_runtime::notice::say(
            "note: the model is a built-in tiny one (random weights, at most a demo's training): \
             its replies are not meant to read well; `--set model=DIR` for a real checkpoint",
        );
    }
    tok.0.decode(&ids, skip).map_err(to_rhai_at(ctx))
}

/// The `model` module and the `Model` methods.
// rhai's macro unwraps the `&mut` receiver of functions that also take a NativeCallContext.
#[allow(clippy::unwrap_used)]
#[export_module]
pub mod model_module {
    use std::sync::Arc;

    use qscript_runtime::model::{Model, TinyConfig, tiny as make_tiny};
    use rhai::{Array, EvalAltResult, Map};

    use super::{GenOpts, LoadOpts, run_generate};
    use crate::context::{Memo, RunContext};
    use crate::error::{to_rhai, to_rhai_at};
    use crate::handles::{ModelHandle, TokenizerHandle};
    use crate::options::{from_options, to_ids};

    type Res<T> = Result<T, Box<EvalAltResult>>;

    /// Loads an HF checkpoint directory (`config.json`, `model.safetensors` or a sharded index,
    /// `generation_config.json`) with `dtype: "auto"` and `device: "auto"`. A hub id
    /// (`"Qwen/Qwen2.5-0.5B-Instruct"`) that is not a local path loads from the HF cache where
    /// `huggingface-cli download` put it (`$HF_HUB_CACHE`, `$HF_HOME/hub` or
    /// `~/.cache/huggingface/hub`; `revision` picks a branch, tag or commit); the recipe may then
    /// read that repo's cache folder, nothing else of the cache. Memoized by path, options and
    /// file contents, so a re-run cell does not reload.
    ///
    /// ```rhai
    /// model::tiny(#{ seed: 1 }).save("ckpt");
    /// let m = model::load(io::output_dir() + "/ckpt");
    /// assert(m.arch == "Qwen2ForCausalLM");
    /// ```
    #[rhai_fn(return_raw)]
    pub fn load(ctx: NativeCallContext, dir: &str) -> Res<ModelHandle> {
        load_with(ctx, dir, Map::new())
    }

    /// Loads an HF checkpoint directory.
    ///
    /// # Options
    /// | key | values |
    /// |---|---|
    /// | `dtype` | `"auto"` (bf16 on GPUs that support it, else f16; f32 on CPU), `"f32"`, `"bf16"`, `"f16"` |
    /// | `device` | `"auto"` (first GPU, else CPU), `"cpu"`, `"cuda:N"` |
    /// | `trainable` | `true` makes every weight trainable: full fine-tuning with `train::fit` |
    /// | `device_map` | HF's: `"auto"` / `"balanced"` (even over the GPUs, the CPU for what does not fit), `"sequential"` (fill in order), or a map of module names (or prefixes) to devices: `#{ "model.layers.20": "cuda:1", model: "cuda:0", lm_head: "cuda:1" }` |
    /// | `max_memory` | with `device_map`, the most each device may hold: `#{ "cuda:0": "20GiB", cpu: "64GiB" }` (unset devices are probed; `GB` = 10^9, `GiB` = 2^30). Weights are placed within it, and a training run's whole need on the device (weights, activations, optimizer state, the CUDA runtime) is planned against it: a 16 GiB card's run can be checked and fitted on a larger one |
    /// | `revision` | a hub id's branch, tag or commit in the HF cache (default `main`) |
    /// | `load_in_4bit` | `true`: the layers' linear weights in 4 bits (QLoRA), as bitsandbytes quantizes them (blocks of 64; the head, embedding and norms stay in `dtype`); adapters train on it. A checkpoint bitsandbytes saved in 4 bits loads as it is |
    /// | `bnb_4bit_quant_type` | `"nf4"` (default) or `"fp4"` |
    /// | `bnb_4bit_use_double_quant` | `true`: the absmax in 8 bits too (about 0.4 bits a weight less) |
    /// | `bnb_4bit_compute_dtype` | the dtype the model computes in (`dtype`'s values) |
    /// | `quantization_bit` | LLaMA-Factory's: `4` is `load_in_4bit: true` |
    ///
    /// ```rhai
    /// model::tiny(#{ seed: 1 }).save("ckpt");
    /// let m = model::load(io::output_dir() + "/ckpt", #{ dtype: "f32", device: "cpu" });
    /// print(m);
    /// let q = model::load(io::output_dir() + "/ckpt", #{ load_in_4bit: true, bnb_4bit_use_double_quant: true, device: "cpu" });
    /// print(q.generate(tokenizer::builtin(), "Once upon a time", #{ max_new_tokens: 2 }));
    /// let placed = model::load(io::output_dir() + "/ckpt", #{ dtype: "f32", device_map: "auto", max_memory: #{ cpu: "1GiB" } });
    /// assert(placed.device == "cpu");
    /// ```
    #[rhai_fn(name = "load", return_raw)]
    pub fn load_with(ctx: NativeCallContext, dir: &str, opts: Map) -> Res<ModelHandle> {
        let rc = RunContext::of(&ctx)?;
        let o: LoadOpts = from_options(&ctx, "model::load", opts)?;
        let real = rc
            .resolve_repo_dir(
                dir,
                qscript_runtime::hub::RepoType::Model,
                o.revision.as_deref(),
            )
            .map_err(to_rhai_at(&ctx))?;
        let lo = o
            .to_runtime()
            .map_err(|e| to_rhai_at(&ctx)(qscript_runtime::Error::InvalidArgument(e)))?;
        if rc.checking() {
            return super::load_shapes(&ctx, &rc, &real, &lo);
        }
        let args = format!("{} {o:?}", real.display());
        let key = Memo::key("model::load", &args, &[&real]).map_err(to_rhai)?;
        let value = rc.memo.get_or_try_insert(&key, || {
            let m = Model::load_with(&real, &lo, &rc.cancel).map_err(to_rhai_at(&ctx))?;
            Ok::<_, Box<EvalAltResult>>(Dynamic::from(ModelHandle(Arc::new(m))))
        })?;
        Ok(value.cast())
    }

    /// A tiny model with random weights from a seed: the no-download default of recipes.
    ///
    /// # Options
    /// `arch` (`"qwen2"`, `"qwen3"`, `"llama"`), `hidden` (64), `layers` (2), `heads` (4),
    /// `kv_heads` (2), `intermediate` (172), `vocab` (259, the built-in tokenizer's),
    /// `max_positions` (512), `tie_embeddings` (true), `seed` (0), `embed_std` (0.1), `dtype` (`"f32"`), `device`
    /// (`"cpu"`), `trainable` (false; `true`: every weight trains, full fine-tuning).
    ///
    /// ```rhai
    /// let m = model::tiny(#{ arch: "llama", hidden: 32, layers: 1, seed: 3 });
    /// assert(m.num_layers == 1);
    /// ```
    #[rhai_fn(name = "tiny", return_raw)]
    pub fn tiny_with(ctx: NativeCallContext, opts: Map) -> Res<ModelHandle> {
        let cfg: TinyConfig = from_options(&ctx, "model::tiny", opts)?;
        let m = make_tiny(&cfg).map_err(to_rhai_at(&ctx))?;
        RunContext::of(&ctx)?.check_fact("model", format!("{m} (built-in, random weights)"));
        Ok(ModelHandle(Arc::new(m)))
    }

    /// The default tiny model (Qwen2 layout, hidden 64, 2 layers, seed 0).
    ///
    /// ```rhai
    /// let m = model::tiny();
    /// assert(m.vocab_size == 259);
    /// ```
    #[rhai_fn(name = "tiny", return_raw)]
    pub fn tiny(ctx: NativeCallContext) -> Res<ModelHandle> {
        tiny_with(ctx, Map::new())
    }

    /// Writes the model as an HF checkpoint (`config.json`, `generation_config.json`,
    /// `model.safetensors`) under the output directory; a model with LoRA adapters writes the
    /// adapter in PEFT's layout instead (`adapter_config.json`, `adapter_model.safetensors`).
    /// Prints where it wrote.
    ///
    /// ```rhai
    /// model::tiny().save("tiny-checkpoint");
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn save(ctx: NativeCallContext, m: &mut ModelHandle, dir: &str) -> Res<()> {
        let rc = RunContext::of(&ctx)?;
        let real = rc.resolve_write_dir(dir).map_err(to_rhai_at(&ctx))?;
        super::save_model_or_shapes(&rc, m, &real, None).map_err(to_rhai_at(&ctx))
    }

    /// Writes the model and its tokenizer files, a directory transformers loads as is (the
    /// tokenizer's whole original config, and the chat template `data::sft` trained with).
    ///
    /// ```rhai
    /// model::tiny().save("tiny-with-tokenizer", tokenizer::builtin());
    /// ```
    #[rhai_fn(global, pure, name = "save", return_raw)]
    pub fn save_with_tokenizer(
        ctx: NativeCallContext,
        m: &mut ModelHandle,
        dir: &str,
        tok: TokenizerHandle,
    ) -> Res<()> {
        let rc = RunContext::of(&ctx)?;
        let real = rc.resolve_write_dir(dir).map_err(to_rhai_at(&ctx))?;
        super::save_model_or_shapes(&rc, m, &real, Some(&tok)).map_err(to_rhai_at(&ctx))
    }

    /// Writes the model as one GGUF file for llama.cpp and Ollama (`quant` `"f16"`, the default),
    /// with `tok` and its chat template in the file's metadata and an Ollama `Modelfile` beside
    /// it. A model with adapters is merged on the way, a 4-bit base dequantized. Prints where it
    /// wrote.
    ///
    /// ```rhai
    /// model::tiny().export_gguf("tiny.gguf", tokenizer::builtin());
    /// ```
    #[rhai_fn(global, pure, name = "export_gguf", return_raw)]
    pub fn export_gguf(
        ctx: NativeCallContext,
        m: &mut ModelHandle,
        path: &str,
        tok: TokenizerHandle,
    ) -> Res<()> {
        export_gguf_with(ctx, m, path, tok, Map::new())
    }

    /// [`export_gguf`] with options.
    ///
    /// # Options
    /// | key | values |
    /// |---|---|
    /// | `quant` | `"f16"` (default), `"q8_0"`, or `"q4_k_m"` (llama.cpp's mix: Q4_K, with Q6_K for the head and some layers' `attn_v` and `ffn_down`) |
    ///
    /// ```rhai
    /// model::tiny().export_gguf("tiny-q8.gguf", tokenizer::builtin(), #{ quant: "q8_0" });
    /// ```
    #[rhai_fn(global, pure, name = "export_gguf", return_raw)]
    pub fn export_gguf_with(
        ctx: NativeCallContext,
        m: &mut ModelHandle,
        path: &str,
        tok: TokenizerHandle,
        opts: Map,
    ) -> Res<()> {
        #[derive(Deserialize)]
        #[serde(default, deny_unknown_fields)]
        struct GgufOpts {
            quant: String,
        }
        impl Default for GgufOpts {
            fn default() -> Self {
                Self {
                    quant: "f16".into(),
                }
            }
        }
        let rc = RunContext::of(&ctx)?;
        let o: GgufOpts = crate::options::from_options(&ctx, "export_gguf", opts)?;
        let quant = qscript_runtime::gguf::GgufQuant::parse(&o.quant).map_err(to_rhai_at(&ctx))?;
        let real = rc.sandbox.resolve_write(path).map_err(to_rhai_at(&ctx))?;
        if m.0.is_shapes_only() {
            rc.sink.err(&format!(
                "check: would write the GGUF ({}) to `{}`",
                quant.name(),
                rc.sandbox.shown(&real).display()
            ));
            return Ok(());
        }
        let e =
            qscript_runtime::gguf::export(&m.0, &tok.0, &real, quant).map_err(to_rhai_at(&ctx))?;
        let mut how = Vec::new();
        if e.merged {
            how.push("adapters merged");
        }
        if e.dequantized {
            how.push("4-bit base dequantized");
        }
        rc.sink.err(&format!(
            "exported GGUF ({}, {} tensors, {}{}) to `{}` and an Ollama Modelfile beside it",
            quant.name(),
            e.tensors,
            qscript_runtime::bytes::human(e.bytes as f64),
            if how.is_empty() {
                String::new()
            } else {
                format!("; {}", how.join(", "))
            },
            rc.sandbox.shown(&e.path).display()
        ));
        Ok(())
    }

    /// Generates text after `prompt` (a string, encoded with special tokens, or an array of
    /// token ids) and returns the new text. Greedy unless a `temperature` is given.
    ///
    /// ```rhai
    /// let m = model::tiny();
    /// let text = m.generate(tokenizer::builtin(), "Once upon a time", #{ max_new_tokens: 5 });
    /// assert(type_of(text) == "string");
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn generate(
        ctx: NativeCallContext,
        m: &mut ModelHandle,
        tok: TokenizerHandle,
        prompt: Dynamic,
        opts: Map,
    ) -> Res<String> {
        let o: GenOpts = from_options(&ctx, "generate", opts)?;
        let ids = if let Some(arr) = prompt.clone().try_cast::<Array>() {
            to_ids("prompt", &arr)?
        } else if let Ok(text) = prompt.into_string() {
            tok.0.encode(&text, true).map_err(to_rhai_at(&ctx))?
        } else {
            let mut e = crate::error::script_error(
                "invalid_argument",
                "`prompt` must be a string or an array of token ids",
            );
            e.set_position(ctx.call_position());
            return Err(e);
        };
        run_generate(&ctx, m, &tok, &ids, &o)
    }

    /// Generates with the default options (greedy, at most 128 new tokens).
    ///
    /// # Options (of the 4-argument form)
    /// `max_new_tokens` (128), `temperature` (0 = greedy), `top_p`, `top_k`,
    /// `repetition_penalty`, `seed` (0), `stream` (true in the interactive REPL),
    /// `skip_special_tokens` (true).
    ///
    /// ```rhai
    /// let m = model::tiny();
    /// let ids = tokenizer::builtin().encode("hi");
    /// let text = m.generate(tokenizer::builtin(), ids);
    /// ```
    #[rhai_fn(global, pure, name = "generate", return_raw)]
    pub fn generate_default(
        ctx: NativeCallContext,
        m: &mut ModelHandle,
        tok: TokenizerHandle,
        prompt: Dynamic,
    ) -> Res<String> {
        generate(ctx, m, tok, prompt, Map::new())
    }

    /// Applies the chat template to `messages` (with the assistant's opening), generates, and
    /// returns the reply. Takes `generate`'s options and `enable_thinking` (Qwen3).
    ///
    /// ```rhai
    /// let m = model::tiny();
    /// let reply = m.chat(tokenizer::builtin(), [#{ role: "user", content: "你是谁？" }], #{ max_new_tokens: 4 });
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn chat(
        ctx: NativeCallContext,
        m: &mut ModelHandle,
        tok: TokenizerHandle,
        messages: Array,
        opts: Map,
    ) -> Res<String> {
        let o: GenOpts = from_options(&ctx, "chat", opts)?;
        let messages: serde_json::Value =
            rhai::serde::from_dynamic(&Dynamic::from_array(messages))?;
        super::chat_reply(&ctx, m, &tok, &messages, &o)
    }

    /// `chat` with the default options.
    ///
    /// ```rhai
    /// let reply = model::tiny().chat(tokenizer::builtin(), [#{ role: "user", content: "hi" }]);
    /// ```
    #[rhai_fn(global, pure, name = "chat", return_raw)]
    pub fn chat_default(
        ctx: NativeCallContext,
        m: &mut ModelHandle,
        tok: TokenizerHandle,
        messages: Array,
    ) -> Res<String> {
        chat(ctx, m, tok, messages, Map::new())
    }

    /// The architecture (`Qwen2ForCausalLM`, ...).
    #[rhai_fn(global, get = "arch", pure)]
    pub fn arch(m: &mut ModelHandle) -> String {
        m.0.arch.name().into()
    }

    /// Number of parameters.
    #[rhai_fn(global, get = "num_params", pure)]
    pub fn num_params(m: &mut ModelHandle) -> rhai::INT {
        rhai::INT::try_from(m.0.decoder.num_params()).unwrap_or(rhai::INT::MAX)
    }

    /// Number of decoder blocks.
    #[rhai_fn(global, get = "num_layers", pure)]
    pub fn num_layers(m: &mut ModelHandle) -> rhai::INT {
        rhai::INT::try_from(m.0.config().num_hidden_layers).unwrap_or(rhai::INT::MAX)
    }

    /// Model width.
    #[rhai_fn(global, get = "hidden_size", pure)]
    pub fn hidden_size(m: &mut ModelHandle) -> rhai::INT {
        rhai::INT::try_from(m.0.config().hidden_size).unwrap_or(rhai::INT::MAX)
    }

    /// Vocabulary size.
    #[rhai_fn(global, get = "vocab_size", pure)]
    pub fn vocab_size(m: &mut ModelHandle) -> rhai::INT {
        rhai::INT::try_from(m.0.config().vocab_size).unwrap_or(rhai::INT::MAX)
    }

    /// `bfloat16`, `float32`, ...
    #[rhai_fn(global, get = "dtype", pure)]
    pub fn dtype(m: &mut ModelHandle) -> String {
        qscript_runtime::model::load::dtype_name(m.0.decoder.dtype()).into()
    }

    /// `cpu` or `cuda:N`.
    #[rhai_fn(global, get = "device", pure)]
    pub fn device(m: &mut ModelHandle) -> String {
        m.0.device_name()
    }

    /// `Model(Qwen2ForCausalLM, 0.1M params, 2 layers, ...)`.
    ///
    /// ```rhai
    /// print(model::tiny());
    /// ```
    #[rhai_fn(global, name = "to_string", name = "to_debug", pure)]
    pub fn describe(m: &mut ModelHandle) -> String {
        m.0.to_string()
    }
}
