//! `train`: supervised fine-tuning with HF TrainingArguments names.

#[allow(clippy::wildcard_imports)]
use rhai::plugin::*;

use std::sync::Arc;

use qscript_runtime::train::{Event, TrainConfig};
use rhai::{EvalAltResult, Map};

use crate::context::{Resume, RunContext, lock};
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

/// The data's tokenizer must fit the model's embedding.
fn check_vocab(ds: &DatasetHandle, model: &ModelHandle) -> Result<(), Box<EvalAltResult>> {
    if let Data::Tokenized(t) = &*ds.0 {
        let v = model.0.config().vocab_size;
        if t.vocab > v {
            return Err(script_error(
                "invalid_argument",
                format!(
                    "`{}` was tokenized with a tokenizer of {} tokens and the model's embedding \
                     has {v} rows: ids from {v} on have no embedding; tokenize with the model's \
                     own tokenizer",
                    t.source, t.vocab
                ),
            ));
        }
    }
    Ok(())
}

/// Prints training events: the plan as HF prints it, a progress bar, log and eval lines.
struct Printer {
    sink: Arc<dyn crate::context::OutputSink>,
    memory: Option<String>,
    bar: Option<indicatif::ProgressBar>,
    batch: usize,
    accumulation: usize,
}

impl Printer {
    fn new(
        sink: Arc<dyn crate::context::OutputSink>,
        cfg: &TrainConfig,
        model: &ModelHandle,
    ) -> Self {
        Self {
            sink,
            memory: qscript_runtime::device::memory_line(model.0.decoder.device()),
            bar: None,
            batch: cfg.per_device_train_batch_size,
            accumulation: cfg.gradient_accumulation_steps,
        }
    }

    fn show(&mut self, e: &Event) {
        for n in qscript_runtime::notice::take() {
            match &self.bar {
                Some(b) => b.suspend(|| self.sink.err(&n)),
                None => self.sink.err(&n),
            }
        }
        match e {
            Event::Start {
                examples,
                epochs,
                total_batch,
                total_steps,
                trainable,
                resumed_at,
                memory,
            } => {
                let sink = &self.sink;
                sink.err("***** Running training *****");
                sink.err(&format!("  Num examples = {examples}"));
                sink.err(&format!("  Num Epochs = {epochs}"));
                sink.err(&format!(
                    "  Instantaneous batch size per device = {}",
                    self.batch
                ));
                sink.err(&format!(
                    "  Total train batch size (w. accumulation) = {total_batch}"
                ));
                sink.err(&format!(
                    "  Gradient Accumulation steps = {}",
                    self.accumulation
                ));
                sink.err(&format!("  Total optimization steps = {total_steps}"));
                sink.err(&format!("  Number of trainable parameters = {trainable}"));
                sink.err(&format!(
                    "  Estimated peak memory = {} (itemized by `qscript check`)",
                    qscript_runtime::plan::memory::human(*memory as f64)
                ));
                if let Some(line) = &self.memory {
                    sink.err(&format!("  {line}"));
                }
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
                self.bar = Some(b);
            }
            Event::Step { step, loss, .. } => {
                if let Some(b) = &self.bar {
                    b.set_position(*step as u64);
                    if let Some(loss) = loss {
                        b.set_message(format!("loss {loss:.4}"));
                    }
                }
            }
            Event::Log(rec) | Event::Eval(rec) => {
                if let (Some(b), Some(tps)) = (&self.bar, rec.get("tokens_per_second")) {
                    let lr = rec
                        .get("learning_rate")
                        .and_then(serde_json::Value::as_f64)
                        .unwrap_or(0.0);
                    let gn = rec
                        .get("grad_norm")
                        .and_then(serde_json::Value::as_f64)
                        .unwrap_or(0.0);
                    let loss = rec
                        .get("loss")
                        .and_then(serde_json::Value::as_f64)
                        .unwrap_or(0.0);
                    b.set_message(format!(
                        "loss {loss:.4} lr {lr:.2e} grad_norm {gn:.3} {tps} tok/s"
                    ));
                }
                let line = format_log(rec);
                match &self.bar {
                    Some(b) => b.suspend(|| self.sink.out(&line)),
                    None => self.sink.out(&line),
                }
            }
            Event::Saved(p) => self.sink.err(&format!("saved {}", p.display())),
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        for n in qscript_runtime::notice::take() {
            self.sink.err(&n);
        }
    }
}

/// Resolves `output_dir` and `resume_from_checkpoint` through the sandbox and says what the
/// options cannot do with this model.
fn prepare(
    ctx: &NativeCallContext,
    rc: &RunContext,
    model: &ModelHandle,
    opts: Map,
) -> Result<TrainConfig, Box<EvalAltResult>> {
    let mut cfg: TrainConfig = from_options(ctx, "train::fit", opts)?;
    let out = rc
        .resolve_write_dir(if cfg.output_dir.is_empty() {
            "."
        } else {
            &cfg.output_dir
        })
        .map_err(to_rhai_at(ctx))?;
    // A dry run plans against the real output dir (its checkpoints, an unfinished run there)
    // and writes nothing to it.
    let out = rc.sandbox.shown(&out);
    if let Some(dir) = &cfg.logging_dir {
        let real = rc.resolve_write_dir(dir).map_err(to_rhai_at(ctx))?;
        cfg.logging_dir = Some(rc.sandbox.shown(&real).to_string_lossy().into_owned());
    }
    cfg.output_dir = out.to_string_lossy().into_owned();
    // `--resume` wins over an unset or `false` option (a recipe's default), not over a path.
    if matches!(
        cfg.resume_from_checkpoint,
        None | Some(serde_json::Value::Null | serde_json::Value::Bool(false))
    ) && let Some(from) = &rc.resume
    {
        cfg.resume_from_checkpoint = Some(match from {
            Resume::Latest => serde_json::Value::Bool(true),
            Resume::From(p) => serde_json::Value::String(p.to_string_lossy().into_owned()),
        });
    }
    let resuming = matches!(
        cfg.resume_from_checkpoint,
        Some(serde_json::Value::Bool(true) | serde_json::Value::String(_))
    );
    if !resuming
        && !lock(&rc.trained_dirs).contains(&out)
        && let Some((path, step, planned)) = qscript_runtime::train::checkpoint::unfinished(&out)
    {
        let of = if planned > 0 {
            format!(" (step {step} of {planned})")
        } else {
            String::new()
        };
        return Err(to_rhai_at(ctx)(qscript_runtime::Error::InvalidArgument(
            format!(
                "`{}` holds `{}`, a checkpoint of an unfinished run{of}: resume it with `--resume` \
             (or `resume_from_checkpoint: true`), or start fresh in another `--output-dir` \
             (or after removing its `checkpoint-*` directories)",
                out.display(),
                path.file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            ),
        )));
    }
    lock(&rc.trained_dirs).insert(out.clone());
    // The checkpoint resumed from, and every file in it (a linked adapter or optimizer file from
    // another team's run would be read and copied out), must pass the sandbox.
    let chosen = match &cfg.resume_from_checkpoint {
        Some(serde_json::Value::String(p)) => {
            let path = std::path::Path::new(p);
            Some(if path.is_absolute() {
                path.to_path_buf()
            } else {
                out.join(path)
            })
        }
        Some(serde_json::Value::Bool(true)) => qscript_runtime::train::checkpoint::list(&out)
            .pop()
            .map(|(_, p)| p),
        _ => None,
    };
    if let Some(full) = chosen {
        let real = rc
            .resolve_read_dir(&full.to_string_lossy())
            .map_err(to_rhai_at(ctx))?;
        cfg.resume_from_checkpoint = Some(serde_json::Value::String(
            real.to_string_lossy().into_owned(),
        ));
    }
    let dtype = qscript_runtime::model::load::dtype_name(model.0.decoder.dtype());
    if (cfg.bf16 && dtype != "bfloat16") || (cfg.fp16 && dtype != "float16") {
        rc.sink.err(&format!("note: the model is {dtype}; `bf16`/`fp16` train in the dtype the model was loaded with (`model::load(dir, #{{ dtype: \"bf16\" }})`)"));
    }
    Ok(cfg)
}

/// The stop a Ctrl-C makes of a training call: not an error (exit 130), with the step, the
/// checkpoint saved and how to go on.
fn stopped(
    ctx: &NativeCallContext,
    step: usize,
    checkpoint: Option<&std::path::Path>,
) -> Box<EvalAltResult> {
    let saved = checkpoint.map_or_else(String::new, |p| format!("; checkpoint `{}`", p.display()));
    Box::new(EvalAltResult::ErrorTerminated(
        Dynamic::from(format!(
            "stopped at step {step}{saved}; resume with `--resume`"
        )),
        ctx.call_position(),
    ))
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
    let cfg = prepare(ctx, &rc, model, opts)?;
    let train_ex = examples(train, "training").map_err(at)?;
    let eval_ex = eval.map(|d| examples(d, "eval")).transpose().map_err(at)?;
    for d in std::iter::once(train).chain(eval) {
        check_vocab(d, model).map_err(at)?;
    }
    if rc.checking() {
        let dry = qscript_runtime::train::dry::DryTrainer::new(
            &model.0,
            Arc::new(train_ex.to_vec()),
            eval_ex,
            &cfg,
        )
        .map_err(to_rhai_at(ctx))?;
        show_plan(&rc, "train::fit", dry.plan());
        return Ok(model.clone());
    }
    let pad = model.0.eos_ids().first().copied().unwrap_or(0);
    let mut printer = Printer::new(rc.sink.clone(), &cfg, model);
    let report = qscript_runtime::train::fit(
        &model.0,
        train_ex,
        eval_ex,
        &cfg,
        pad,
        &rc.cancel,
        &mut |e| {
            printer.show(e);
            Ok(())
        },
    );
    printer.finish();
    let report = report.map_err(to_rhai_at(ctx))?;
    if report.interrupted {
        return Err(stopped(
            ctx,
            report.steps,
            report.last_checkpoint.as_deref(),
        ));
    }
    if report.losses.is_empty() && report.steps > 0 {
        rc.sink.err(&format!(
            "nothing to train: the run in `{}` is finished (step {} of {}); returning its model",
            cfg.output_dir, report.steps, report.steps
        ));
        return Ok(ModelHandle(Arc::new(report.model)));
    }
    if let Some((ckpt, loss)) = &report.best {
        let at = if std::path::Path::new(&cfg.output_dir).join(ckpt).is_dir() {
            format!("`{ckpt}`")
        } else {
            format!(
                "step {} (not saved)",
                ckpt.trim_start_matches("checkpoint-")
            )
        };
        rc.sink.err(&format!(
            "best eval loss {loss:.4} at {at}{}",
            if report.loaded_best {
                "; the returned model is that checkpoint's (`load_best_model_at_end`)"
            } else {
                ""
            }
        ));
    }
    // The first and last losses as the log lines printed them (each the mean of its logging
    // window), so the summary's final loss is the one the last log line showed.
    let logged: Vec<f64> = report
        .log_history
        .iter()
        .filter(|r| r.get("eval_loss").is_none())
        .filter_map(|r| r.get("loss").and_then(serde_json::Value::as_f64))
        .collect();
    let first = logged
        .first()
        .copied()
        .or_else(|| report.losses.first().map(|l| l.1))
        .unwrap_or(0.0);
    let last = logged
        .last()
        .copied()
        .or_else(|| report.losses.last().map(|l| l.1))
        .unwrap_or(0.0);
    let peak = report.peak_device_bytes.map_or_else(String::new, |b| {
        format!(
            ", peak GPU memory {:.2} GiB",
            qscript_runtime::device::gib(b)
        )
    });
    // Under data parallel rank 0 speaks for the run (the others log nothing of their own).
    if qscript_runtime::dist::rank() != 0 {
        return Ok(ModelHandle(Arc::new(report.model)));
    }
    rc.sink.err(&format!(
        "trained {} steps in {:.1} s: loss {first:.4} -> {last:.4}, {:.2} examples/s, {:.0} tokens/s{peak}; metrics in `{}`",
        report.steps,
        report.train_runtime,
        report.examples_per_second,
        report.tokens_per_second,
        std::path::Path::new(&cfg.output_dir)
            .join("metrics.jsonl")
            .display()
    ));
    Ok(ModelHandle(Arc::new(report.model)))
}

/// What `t.step` returns.
fn step_map(step: usize, loss: f64, grad_norm: f64, lr: f64, done: bool) -> Map {
    let mut m = Map::new();
    m.insert(
        "step".into(),
        Dynamic::from(rhai::INT::try_from(step).unwrap_or(0)),
    );
    m.insert("loss".into(), Dynamic::from(loss));
    m.insert("grad_norm".into(), Dynamic::from(grad_norm));
    m.insert("learning_rate".into(), Dynamic::from(lr));
    m.insert("done".into(), Dynamic::from(done));
    m
}

/// A dry run's plan, after the notices planning raised (packing, truncation).
fn show_plan(rc: &RunContext, what: &str, plan: &qscript_runtime::train::plan::RunPlan) {
    for n in qscript_runtime::notice::take() {
        rc.sink.err(&n);
    }
    rc.sink.err(&format!(
        "check: {what}: {} trainable parameters",
        plan.trainable
    ));
    for line in plan.to_string().lines() {
        rc.sink.err(&format!("check: {line}"));
    }
    let human = |b: u64| qscript_runtime::plan::memory::human(b as f64);
    rc.check_fact(
        "steps",
        format!(
            "{} ({} an epoch x {} epochs; {} examples a step = {} x {} device{} x {})",
            plan.total_steps,
            plan.steps_per_epoch,
            plan.epochs,
            plan.total_batch(),
            plan.batch,
            plan.devices,
            if plan.devices == 1 { "" } else { "s" },
            plan.accumulation
        ),
    );
    rc.check_fact(
        "memory",
        format!(
            "{} on {}{}",
            human(plan.memory.total()),
            plan.device,
            plan.budget
                .map_or_else(String::new, |b| format!(" ({} free)", human(b)))
        ),
    );
    rc.check_fact(
        "plan",
        match &plan.placement {
            None => format!("all {} layers on {}", plan.layers, plan.device),
            Some((p, _)) => p.to_string().replace('\n', "; "),
        },
    );
}

/// A step-at-a-time trainer (`Trainer` in scripts).
#[derive(Clone)]
pub struct TrainerHandle(Arc<std::sync::Mutex<TrainerState>>);

/// The trainer and its printer, or in a dry run the step counter that stands for it.
enum TrainerState {
    /// A real run.
    Live {
        /// The trainer.
        trainer: Box<qscript_runtime::train::Trainer>,
        /// Its printer.
        printer: Printer,
    },
    /// `qscript check`.
    Dry(Box<qscript_runtime::train::dry::DryTrainer>),
}

impl std::fmt::Debug for TrainerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Trainer")
    }
}

fn new_trainer(
    ctx: &NativeCallContext,
    model: &ModelHandle,
    train: &DatasetHandle,
    opts: Map,
    eval: Option<&DatasetHandle>,
) -> Result<TrainerHandle, Box<EvalAltResult>> {
    let rc = RunContext::of(ctx)?;
    let at = |mut e: Box<EvalAltResult>| {
        e.set_position(ctx.call_position());
        e
    };
    let cfg = prepare(ctx, &rc, model, opts)?;
    let train_ex = Arc::new(examples(train, "training").map_err(at)?.to_vec());
    let eval_ex = eval
        .map(|d| examples(d, "eval").map(|e| Arc::new(e.to_vec())))
        .transpose()
        .map_err(at)?;
    let pad = model.0.eos_ids().first().copied().unwrap_or(0);
    for d in std::iter::once(train).chain(eval) {
        check_vocab(d, model).map_err(at)?;
    }
    if rc.checking() {
        let dry = qscript_runtime::train::dry::DryTrainer::new(
            &model.0,
            train_ex,
            eval_ex.as_deref().map(|e| &e[..]),
            &cfg,
        )
        .map_err(to_rhai_at(ctx))?;
        show_plan(&rc, "train::trainer", dry.plan());
        return Ok(TrainerHandle(Arc::new(std::sync::Mutex::new(
            TrainerState::Dry(Box::new(dry)),
        ))));
    }
    let trainer = qscript_runtime::train::Trainer::new(&model.0, train_ex, eval_ex, &cfg, pad)
        .map_err(to_rhai_at(ctx))?;
    let mut printer = Printer::new(rc.sink.clone(), &cfg, model);
    printer.show(&trainer.start_event());
    Ok(TrainerHandle(Arc::new(std::sync::Mutex::new(
        TrainerState::Live {
            trainer: Box::new(trainer),
            printer,
        },
    ))))
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
// rhai's macro unwraps the `&mut` receiver of functions that also take a NativeCallContext.
#[allow(clippy::unwrap_used)]
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
    /// `resume_from_checkpoint`, `output_dir`; TRL's `packing` (examples concatenated into rows
    /// of `max_length` tokens, default 1024: no padding, attention never crosses an example,
    /// positions restart per example, the loss is the unpacked one; each row counts as one
    /// example of the batch, as in TRL) and `max_length` (without `packing`, longer examples are
    /// cut); HF's `report_to` (`"tensorboard"` writes TensorBoard event files under
    /// `logging_dir`, default `output_dir/runs`; `"none"`); and qscript's `merge_micro_batches` (unset: on a GPU, run each accumulation window
    /// as fewer, larger micro-batches, each just large enough to keep the GPU busy and within
    /// the memory measured in the first step; the gradients are the same; `true`: each window
    /// as one pass; `false`: as written); DeepSpeed's `zero_stage` (with several ranks,
    /// `qscript --nproc-per-node N`: 1 keeps on each rank the optimizer moments of its share of
    /// the parameters only, 2 its share of the summed gradients too; 0, the default, keeps them
    /// all); qscript's `pipeline` (with the
    /// model over several GPUs, `device_map`: `true`, the default, runs each window's
    /// micro-batches through the GPUs in a pipeline so they work at once; `false`, one
    /// micro-batch at a time, as HF does). With several ranks each takes
    /// `per_device_train_batch_size` examples of every micro-batch, rank 0 alone logs, evaluates
    /// and writes. Ctrl-C saves a checkpoint and stops.
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"instruction": "hi", "output": "hello"}]`);
    /// let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/d.json")), tokenizer::builtin());
    /// let peft = lora::attach(model::tiny(), #{ r: 4 });
    /// let trained = train::fit(peft, ds, #{ max_steps: 2, learning_rate: 1e-3, logging_steps: 1, save_steps: 0 });
    /// let packed = train::fit(peft, ds, #{ max_steps: 1, packing: true, max_length: 256, save_steps: 0 });
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

    /// A trainer for custom loops: `for batch in t.batches() { let out = t.step(batch); }`.
    /// Takes `train::fit`'s options; logging, eval and checkpoints follow them at each step.
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]`);
    /// let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/d.json")), tokenizer::builtin());
    /// let t = train::trainer(lora::attach(model::tiny(), #{ r: 4 }), ds, #{ per_device_train_batch_size: 1, max_steps: 3, save_steps: 0 });
    /// for batch in t.batches() {
    ///     let out = t.step(batch);
    ///     print(`step ${out.step}: loss ${out.loss}`);
    /// }
    /// let trained = t.model;
    /// ```
    #[rhai_fn(return_raw)]
    pub fn trainer(
        ctx: NativeCallContext,
        model: ModelHandle,
        train: DatasetHandle,
        opts: Map,
    ) -> Result<super::TrainerHandle, Box<rhai::EvalAltResult>> {
        super::new_trainer(&ctx, &model, &train, opts, None)
    }

    /// A trainer with an eval dataset (for `t.evaluate()` and `eval_strategy: "steps"`).
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"instruction": "a", "output": "b"}]`);
    /// let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/d.json")), tokenizer::builtin());
    /// let t = train::trainer(lora::attach(model::tiny(), #{ r: 4 }), ds, #{ max_steps: 1, save_steps: 0 }, ds);
    /// print(t.evaluate());
    /// ```
    #[rhai_fn(name = "trainer", return_raw)]
    pub fn trainer_eval(
        ctx: NativeCallContext,
        model: ModelHandle,
        train: DatasetHandle,
        opts: Map,
        eval: DatasetHandle,
    ) -> Result<super::TrainerHandle, Box<rhai::EvalAltResult>> {
        super::new_trainer(&ctx, &model, &train, opts, Some(&eval))
    }

    /// The remaining batches of the current epoch (each one optimizer step: a list of
    /// micro-batches of example indices); the next call moves to the next epoch; empty when done.
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"instruction": "a", "output": "b"}]`);
    /// let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/d.json")), tokenizer::builtin());
    /// let t = train::trainer(lora::attach(model::tiny(), #{ r: 4 }), ds, #{ max_steps: 2, save_steps: 0 });
    /// assert(t.batches().len() == 1);
    /// ```
    #[rhai_fn(global, pure)]
    pub fn batches(t: &mut super::TrainerHandle) -> rhai::Array {
        let windows = match &mut *crate::context::lock(&t.0) {
            TrainerState::Live { trainer, .. } => trainer.windows(),
            TrainerState::Dry(d) => d.windows(),
        };
        windows
            .into_iter()
            .map(|w| {
                let w: rhai::Array = w
                    .into_iter()
                    .map(|m| {
                        Dynamic::from_array(
                            m.into_iter()
                                .map(|i| Dynamic::from(rhai::INT::try_from(i).unwrap_or(0)))
                                .collect(),
                        )
                    })
                    .collect();
                Dynamic::from_array(w)
            })
            .collect()
    }

    /// One optimizer step on `batch` (from `t.batches()`); returns `#{ step, loss, grad_norm,
    /// learning_rate, done }`.
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"instruction": "a", "output": "b"}]`);
    /// let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/d.json")), tokenizer::builtin());
    /// let t = train::trainer(lora::attach(model::tiny(), #{ r: 4 }), ds, #{ max_steps: 1, save_steps: 0 });
    /// let out = t.step(t.batches()[0]);
    /// assert(out.done);
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn step(
        ctx: NativeCallContext,
        t: &mut super::TrainerHandle,
        batch: rhai::Array,
    ) -> Result<Map, Box<rhai::EvalAltResult>> {
        let mut window = Vec::new();
        for m in batch {
            let arr = m.into_array().map_err(|t| {
                crate::error::script_error(
                    "invalid_argument",
                    format!(
                        "a batch is a list of micro-batches (arrays of example indices), found {t}"
                    ),
                )
            })?;
            window.push(
                arr.iter()
                    .map(|i| {
                        i.as_int()
                            .ok()
                            .and_then(|i| usize::try_from(i).ok())
                            .unwrap_or(usize::MAX)
                    })
                    .collect::<Vec<usize>>(),
            );
        }
        let mut guard = crate::context::lock(&t.0);
        let (trainer, printer) = match &mut *guard {
            TrainerState::Live { trainer, printer } => (trainer, printer),
            TrainerState::Dry(d) => {
                // A dry run counts the step; nothing is computed, so loss and norm are NaN.
                let (step, lr, done) = d.step(&window).map_err(crate::error::to_rhai_at(&ctx))?;
                return Ok(step_map(step, f64::NAN, f64::NAN, lr, done));
            }
        };
        let out = trainer
            .step(&window)
            .map_err(crate::error::to_rhai_at(&ctx))?;
        for e in &out.events {
            printer.show(e);
        }
        if out.done {
            printer.finish();
        }
        // Ctrl-C during the step (where the time goes): save before the script stops.
        let rc = RunContext::of(&ctx)?;
        // Under data parallel every rank stops at the same step (Ctrl-C on any of them).
        let stop = trainer
            .should_stop(&rc.cancel)
            .map_err(crate::error::to_rhai_at(&ctx))?;
        if stop && !out.done {
            let path = trainer
                .save_checkpoint()
                .map_err(crate::error::to_rhai_at(&ctx))?;
            return Err(super::stopped(&ctx, out.step, Some(&path)));
        }
        let (loss, grad_norm) = trainer
            .read_step()
            .map_err(crate::error::to_rhai_at(&ctx))?;
        Ok(step_map(
            out.step,
            loss,
            grad_norm,
            out.learning_rate,
            out.done,
        ))
    }

    /// Mean token loss on the eval dataset.
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"instruction": "a", "output": "b"}]`);
    /// let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/d.json")), tokenizer::builtin());
    /// let t = train::trainer(lora::attach(model::tiny(), #{ r: 4 }), ds, #{ max_steps: 1, save_steps: 0 }, ds);
    /// assert(t.evaluate() > 0.0);
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn evaluate(
        ctx: NativeCallContext,
        t: &mut super::TrainerHandle,
    ) -> Result<f64, Box<rhai::EvalAltResult>> {
        match &*crate::context::lock(&t.0) {
            TrainerState::Live { trainer, .. } => trainer.evaluate(),
            TrainerState::Dry(d) => d.check_evaluate().map(|()| f64::NAN),
        }
        .map_err(crate::error::to_rhai_at(&ctx))
    }

    /// Writes `checkpoint-{step}` in the output dir now; returns its path.
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"instruction": "a", "output": "b"}]`);
    /// let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/d.json")), tokenizer::builtin());
    /// let t = train::trainer(lora::attach(model::tiny(), #{ r: 4 }), ds, #{ max_steps: 1, save_steps: 0, output_dir: "custom" });
    /// t.step(t.batches()[0]);
    /// assert(t.save_checkpoint().ends_with("checkpoint-1"));
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn save_checkpoint(
        ctx: NativeCallContext,
        t: &mut super::TrainerHandle,
    ) -> Result<String, Box<rhai::EvalAltResult>> {
        let p = match &mut *crate::context::lock(&t.0) {
            TrainerState::Live { trainer, .. } => trainer.save_checkpoint(),
            TrainerState::Dry(d) => Ok(d.checkpoint_path()),
        }
        .map_err(crate::error::to_rhai_at(&ctx))?;
        Ok(p.to_string_lossy().into_owned())
    }

    /// A snapshot of the model as trained so far (later steps do not change it).
    #[rhai_fn(global, get = "model", pure, return_raw)]
    pub fn model(t: &mut super::TrainerHandle) -> Result<ModelHandle, Box<rhai::EvalAltResult>> {
        let m = match &*crate::context::lock(&t.0) {
            TrainerState::Live { trainer, .. } => {
                qscript_runtime::train::trainer::snapshot(trainer.model())
                    .map_err(crate::error::to_rhai)?
            }
            TrainerState::Dry(d) => d.model().clone(),
        };
        Ok(ModelHandle(Arc::new(m)))
    }

    /// Optimizer steps done.
    #[rhai_fn(global, get = "global_step", pure)]
    pub fn global_step(t: &mut super::TrainerHandle) -> rhai::INT {
        let n = match &*crate::context::lock(&t.0) {
            TrainerState::Live { trainer, .. } => trainer.global_step(),
            TrainerState::Dry(d) => d.global_step(),
        };
        rhai::INT::try_from(n).unwrap_or(0)
    }

    /// Optimizer steps planned.
    #[rhai_fn(global, get = "total_steps", pure)]
    pub fn total_steps(t: &mut super::TrainerHandle) -> rhai::INT {
        let n = match &*crate::context::lock(&t.0) {
            TrainerState::Live { trainer, .. } => trainer.total_steps(),
            TrainerState::Dry(d) => d.total_steps(),
        };
        rhai::INT::try_from(n).unwrap_or(0)
    }
}
