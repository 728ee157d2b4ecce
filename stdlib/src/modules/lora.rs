//! `lora`: attach, load, merge and save LoRA adapters with PEFT's names and files.

#[allow(clippy::wildcard_imports)]
use rhai::plugin::*;

use serde::Deserialize;

/// Options of `lora::attach` (PEFT's `LoraConfig` names).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct AttachOpts {
    r: usize,
    lora_alpha: f64,
    lora_dropout: f64,
    target_modules: qscript_runtime::lora::Targets,
    bias: String,
    use_rslora: bool,
    task_type: String,
    seed: u64,
}

impl Default for AttachOpts {
    fn default() -> Self {
        let d = qscript_runtime::lora::LoraConfig::default();
        Self {
            r: d.r,
            lora_alpha: d.lora_alpha,
            lora_dropout: d.lora_dropout,
            target_modules: d.target_modules,
            bias: d.bias,
            use_rslora: d.use_rslora,
            task_type: d.task_type,
            seed: 42,
        }
    }
}

/// The `lora` module and the LoRA methods of `Model`.
// rhai's macro unwraps the `&mut` receiver of functions that also take a NativeCallContext.
#[allow(clippy::unwrap_used)]
#[export_module]
pub mod lora_module {
    use std::sync::Arc;

    use qscript_runtime::lora::{self as rt, LoraConfig};
    use rhai::{EvalAltResult, Map};

    use super::AttachOpts;
    use crate::context::RunContext;
    use crate::error::to_rhai_at;
    use crate::handles::ModelHandle;
    use crate::options::from_options;

    type Res<T> = Result<T, Box<EvalAltResult>>;

    /// A new model with LoRA adapters on the target modules; the input model is not changed and
    /// shares its frozen weights.
    ///
    /// # Options (PEFT's names)
    /// `r` (8), `lora_alpha` (8), `lora_dropout` (0), `target_modules` (names like `["q_proj",
    /// "v_proj"]`, a regex, or `"all-linear"`), `bias` (`"none"`), `use_rslora` (false),
    /// `task_type` (`"CAUSAL_LM"`), `seed` (42, for the initial A).
    ///
    /// ```rhai
    /// let peft = lora::attach(model::tiny(), #{ r: 8, lora_alpha: 32, target_modules: ["q_proj", "v_proj"] });
    /// peft.print_trainable_parameters();
    /// ```
    #[rhai_fn(return_raw)]
    pub fn attach(ctx: NativeCallContext, model: ModelHandle, opts: Map) -> Res<ModelHandle> {
        let o: AttachOpts = from_options(&ctx, "lora::attach", opts)?;
        let cfg = LoraConfig {
            r: o.r,
            lora_alpha: o.lora_alpha,
            lora_dropout: o.lora_dropout,
            target_modules: o.target_modules,
            bias: o.bias,
            use_rslora: o.use_rslora,
            task_type: o.task_type,
            ..LoraConfig::default()
        };
        let m = rt::attach(&model.0, &cfg, o.seed).map_err(to_rhai_at(&ctx))?;
        RunContext::of(&ctx)?.check_fact(
            "adapters",
            format!(
                "LoRA r={} alpha={} on {}: {}",
                cfg.r,
                cfg.lora_alpha,
                cfg.target_modules,
                rt::trainable_parameters(&m)
            ),
        );
        Ok(ModelHandle(Arc::new(m)))
    }

    /// Loads a PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`) onto a
    /// base model.
    ///
    /// ```rhai
    /// let peft = lora::attach(model::tiny(), #{ r: 4 });
    /// peft.save("adapter");
    /// let again = lora::load(model::tiny(), io::output_dir() + "/adapter");
    /// ```
    #[rhai_fn(return_raw)]
    pub fn load(ctx: NativeCallContext, model: ModelHandle, dir: &str) -> Res<ModelHandle> {
        let rc = RunContext::of(&ctx)?;
        let real = rc.resolve_read_dir(dir).map_err(to_rhai_at(&ctx))?;
        Ok(ModelHandle(Arc::new(
            rt::load_adapter(&model.0, &real).map_err(to_rhai_at(&ctx))?,
        )))
    }

    /// Prints what PEFT prints: `trainable params: 1,081,344 || all params: ... || trainable%: ...`.
    ///
    /// ```rhai
    /// lora::attach(model::tiny(), #{ r: 8 }).print_trainable_parameters();
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn print_trainable_parameters(ctx: NativeCallContext, m: &mut ModelHandle) -> Res<()> {
        let rc = RunContext::of(&ctx)?;
        rc.sink.out(&rt::trainable_parameters(&m.0));
        Ok(())
    }

    /// A plain model with the adapters folded into the weights (`W + scale B A`); save it with
    /// `m.save(dir, tok)` for transformers or vLLM.
    ///
    /// ```rhai
    /// let merged = lora::attach(model::tiny(), #{ r: 4 }).merge();
    /// merged.save("merged", tokenizer::builtin());
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn merge(ctx: NativeCallContext, m: &mut ModelHandle) -> Res<ModelHandle> {
        Ok(ModelHandle(Arc::new(
            rt::merge(&m.0).map_err(to_rhai_at(&ctx))?,
        )))
    }
}
