//! `train`: supervised fine-tuning with HF TrainingArguments names.

#[allow(clippy::wildcard_imports)]
use rhai::plugin::*;

use std::sync::Arc;

use qscript_runtime::train::{Event, TrainConfig};
use rhai::{EvalAltResult, Map};

use crate::context::RunContext;
use crate::error::{script_error, to_rhai_at};
use crate::handles::{Data, DatasetHandle, ModelHandle};
use crate::options::from_options;

fn examples<'a>(
    ds: &'a DatasetHandle,
    what: &str,
) -> Result<&'a [qscript_runtime::data::sft::Example], Box<EvalAltResult>> {
    match &*ds.0 {
        Data::Tokenized(t) => Ok(&t.examples),
        Data::Records(_) => Err(script_error(
            "invalid_argument",
            format!(
                "the {what} dataset is not tokenized; pass it through `data::sft(ds, tok, opts)` first"
            ),
        )),
    }
}

fn run_fit(
    ctx: &NativeCallContext,
    model: &ModelHandle,
    train: &DatasetHandle,
    opts: Map,
    eval: Option<&DatasetHandle>,
) -> Result<ModelHandle, Box<EvalAltResult>> {
    let rc = RunContext::of(ctx)?;
    let at = |mut e: Box<EvalAltResult>| {
        e.set_position(ctx.call_position());
        e
    };
    let mut cfg: TrainConfig = from_options(ctx, "train::fit", opts)?;
    let out = rc
        .resolve_write_dir(if cfg.output_dir.is_empty() {
            "."
        } else {
            &cfg.output_dir
        })
        .map_err(to_rhai_at(ctx))?;
    cfg.output_dir = out.to_string_lossy().into_owned();
    if let Some(serde_json::Value::String(p)) = &cfg.resume_from_checkpoint {
        let path = std::path::Path::new(p);
        let full = if path.is_absolute() {
            path.to_path_buf()
        } else {
            out.join(path)
        };
        let real = rc.sandbox.resolve_read(&full).map_err(to_rhai_at(ctx))?;
        cfg.resume_from_checkpoint = Some(serde_json::Value::String(
            real.to_string_lossy().into_owned(),
        ));
    }
    let dtype = qscript_runtime::model::load::dtype_name(model.0.decoder.dtype());
    if (cfg.bf16 && dtype != "bfloat16") || (cfg.fp16 && dtype != "float16") {
        rc.sink.err(&format!("note: the model is {dtype}; `bf16`/`fp16` train in the dtype the model was loaded with (`model::load(dir, #{{ dtype: \"bf16\" }})`)"));
    }
    let train_ex = examples(train, "training").map_err(at)?;
    let eval_ex = eval.map(|d| examples(d, "eval")).transpose().map_err(at)?;
    let pad = model.0.eos_ids().first().copied().unwrap_or(0);
    let bar = std::cell::RefCell::new(None::<indicatif::ProgressBar>);
    let sink = rc.sink.clone();
    let report = qscript_runtime::train::fit(
        &model.0,
        train_ex,
        eval_ex,
        &cfg,
        pad,
        &rc.cancel,
        &mut |e| {
            match e {
                Event::Start {
                    examples,
                    epochs,
                    total_batch,
                    total_steps,
                    trainable,
                    resumed_at,
                } => {
                    sink.err("***** Running training *****");
                    sink.err(&format!("  Num examples = {examples}"));
                    sink.err(&format!("  Num Epochs = {epochs}"));
                    sink.err(&format!(
                        "  Instantaneous batch size per device = {}",
                        cfg.per_device_train_batch_size
                    ));
                    sink.err(&format!(
                        "  Total train batch size (w. accumulation) = {total_batch}"
                    ));
                    sink.err(&format!(
                        "  Gradient Accumulation steps = {}",
                        cfg.gradient_accumulation_steps
                    ));
                    sink.err(&format!("  Total optimization steps = {total_steps}"));
                    sink.err(&format!("  Number of trainable parameters = {trainable}"));
                    if *resumed_at > 0 {
                        sink.err(&format!("  Resumed from step {resumed_at}"));
                    }
                    let b = indicatif::ProgressBar::new(*total_steps as u64);
                    b.set_position(*resumed_at as u64);
                    b.set_style(
                        indicatif::ProgressStyle::with_template(
                            "{bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    *bar.borrow_mut() = Some(b);
                }
                Event::Step { step, loss, .. } => {
                    if let Some(b) = &*bar.borrow() {
                        b.set_position(*step as u64);
                        b.set_message(format!("loss {loss:.4}"));
                    }
                }
                Event::Log(rec) | Event::Eval(rec) => {
                    let line = format_log(rec);
                    match &*bar.borrow() {
                        Some(b) => b.suspend(|| sink.out(&line)),
                        None => sink.out(&line),
                    }
                }
                Event::Saved(p) => sink.err(&format!("saved {}", p.display())),
            }
            Ok(())
        },
    );
    if let Some(b) = bar.borrow_mut().take() {
        b.finish_and_clear();
    }
    let report = report.map_err(to_rhai_at(ctx))?;
    if report.interrupted {
        let saved = report
            .last_checkpoint
            .as_ref()
            .map_or_else(String::new, |p| {
                format!("; checkpoint saved to `{}`", p.display())
            });
        return Err(Box::new(EvalAltResult::ErrorTerminated(
            Dynamic::from(format!(
                "training stopped at step {}{saved}; resume with `resume_from_checkpoint: true`",
                report.steps
            )),
            ctx.call_position(),
        )));
    }
    let first = report.losses.first().map_or(0.0, |l| l.1);
    let last = report.losses.last().map_or(0.0, |l| l.1);
    rc.sink.err(&format!(
        "trained {} steps: loss {first:.4} -> {last:.4}, {:.0} tokens/s; metrics in `{}`",
        report.steps,
        report.tokens_per_second,
        out.join("metrics.jsonl").display()
    ));
    Ok(ModelHandle(Arc::new(report.model)))
}

fn format_log(rec: &serde_json::Value) -> String {
    let mut parts = Vec::new();
    if let Some(o) = rec.as_object() {
        for (k, v) in o {
            let s = match v.as_f64() {
                Some(f) if k == "learning_rate" => format!("{f:.3e}"),
                Some(f) if f.fract() != 0.0 => format!("{f:.4}"),
                _ => v.to_string(),
            };
            parts.push(format!("{k} {s}"));
        }
    }
    parts.join(", ")
}

/// The `train` module.
#[export_module]
pub mod train_module {
    use rhai::Map;

    use super::run_fit;
    use crate::handles::{DatasetHandle, ModelHandle};

    /// Trains a model (LoRA adapters, or every weight of a model loaded `trainable`) on a
    /// tokenized dataset and returns the trained model; the input model is not changed. Options
    /// use HF TrainingArguments names: `per_device_train_batch_size`,
    /// `gradient_accumulation_steps`, `num_train_epochs`, `max_steps`, `learning_rate`,
    /// `weight_decay`, `lr_scheduler_type`, `warmup_ratio`, `warmup_steps`, `max_grad_norm`,
    /// `bf16`, `fp16`, `gradient_checkpointing`, `group_by_length`, `pad_to_multiple_of`, `seed`,
    /// `logging_steps`, `eval_strategy`, `eval_steps`, `save_steps`, `save_total_limit`,
    /// `load_best_model_at_end`, `metric_for_best_model`, `early_stopping_patience`,
    /// `resume_from_checkpoint`, `output_dir`. Ctrl-C saves a checkpoint and stops.
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"instruction": "hi", "output": "hello"}]`);
    /// let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/d.json")), tokenizer::builtin());
    /// let peft = lora::attach(model::tiny(), #{ r: 4 });
    /// let trained = train::fit(peft, ds, #{ max_steps: 2, learning_rate: 1e-3, logging_steps: 1, save_steps: 0 });
    /// ```
    #[rhai_fn(return_raw)]
    pub fn fit(
        ctx: NativeCallContext,
        model: ModelHandle,
        train: DatasetHandle,
        opts: Map,
    ) -> Result<ModelHandle, Box<rhai::EvalAltResult>> {
        run_fit(&ctx, &model, &train, opts, None)
    }

    /// Trains with evaluation on `eval` (`eval_strategy: "steps"`, best-model tracking, early
    /// stopping).
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]`);
    /// let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/d.json")), tokenizer::builtin());
    /// let trained = train::fit(lora::attach(model::tiny(), #{ r: 4 }), ds, #{ max_steps: 2, eval_strategy: "steps", eval_steps: 1, save_steps: 0 }, ds);
    /// ```
    #[rhai_fn(name = "fit", return_raw)]
    pub fn fit_eval(
        ctx: NativeCallContext,
        model: ModelHandle,
        train: DatasetHandle,
        opts: Map,
        eval: DatasetHandle,
    ) -> Result<ModelHandle, Box<rhai::EvalAltResult>> {
        run_fit(&ctx, &model, &train, opts, Some(&eval))
    }
}
