//! `train`: supervised fine-tuning with HF TrainingArguments names. Options go in, the runtime's
//! one loop runs (for real, or as `qscript check`'s dry run: [`RunContext::training`]) and
//! [`crate::progress`] prints it.

#[allow(clippy::wildcard_imports)]
use rhai::plugin::*;

use std::sync::Arc;

use qscript_runtime::train::plan::RunData;
use qscript_runtime::train::{TrainConfig, Trainer};
use rhai::{EvalAltResult, Map};

use crate::context::{Resume, RunContext, lock};
use crate::error::{script_error, to_rhai_at};
use crate::handles::{Data, DatasetHandle, ModelHandle};
use crate::options::from_options;
use crate::progress::{Reporter, reporter};

/// Tokenized examples, with their source and the vocabulary size of the tokenizer that made them.
type Examples = (
    Arc<Vec<qscript_runtime::data::sft::Example>>,
    (String, usize),
);

/// What a training call optimizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Goal {
    /// Supervised fine-tuning (`train::fit`).
    Sft,
    /// Preference pairs (`train::dpo`: DPO, IPO, hinge, robust, ORPO, SimPO).
    Dpo,
    /// Unpaired answers with a label (`train::kto`).
    Kto,
}

impl Goal {
    fn function(self) -> &'static str {
        match self {
            Self::Sft => "train::fit",
            Self::Dpo => "train::dpo",
            Self::Kto => "train::kto",
        }
    }

    /// What `examples` are, as the goal they train: SFT rows, pairs, or KTO answers.
    fn of(examples: &[qscript_runtime::data::sft::Example]) -> Self {
        match examples.first().and_then(|e| e.pref.as_ref()) {
            None => Self::Sft,
            Some(p) if p.desirable.is_some() => Self::Kto,
            Some(_) => Self::Dpo,
        }
    }
}

/// The preference objective of a `goal` (`None` for SFT), from the preference keys of `opts`;
/// the other keys are returned for `TrainConfig`.
fn objective_of(
    ctx: &NativeCallContext,
    goal: Goal,
    mut opts: Map,
) -> Result<(Option<qscript_runtime::train::preference::Preference>, Map), Box<EvalAltResult>> {
    use qscript_runtime::train::preference::{OPTION_NAMES, PrefConfig, Preference};
    let mut pref = Map::new();
    for name in OPTION_NAMES {
        if let Some(v) = opts.remove(*name) {
            pref.insert((*name).into(), v);
        }
    }
    if goal == Goal::Sft {
        if let Some(k) = pref.keys().next() {
            return Err(to_rhai_at(ctx)(qscript_runtime::Error::InvalidArgument(
                format!(
                    "`{k}` is a preference option: train pairs with `train::dpo` (or KTO data with `train::kto`)"
                ),
            )));
        }
        return Ok((None, opts));
    }
    let cfg: PrefConfig = from_options(ctx, goal.function(), pref)?;
    let objective = Preference::new(cfg, goal == Goal::Kto).map_err(to_rhai_at(ctx))?;
    Ok((Some(objective), opts))
}

/// The tokenized examples of `ds` (the `what` dataset), with where they came from.
fn examples(ds: &DatasetHandle, what: &str) -> Result<Examples, Box<EvalAltResult>> {
    match &*ds.0 {
        Data::Tokenized(t) => Ok((Arc::new(t.examples.clone()), (t.source.clone(), t.vocab))),
        Data::Records(_) => Err(script_error(
            "invalid_argument",
            format!(
                "the {what} dataset is not tokenized; pass it through `data::sft(ds, tok, opts)` first"
            ),
        )),
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
    if let Some(m) = rc.untaken_train_options() {
        return Err(to_rhai_at(ctx)(qscript_runtime::Error::InvalidArgument(m)));
    }
    let mut cfg: TrainConfig = from_options(ctx, "train::fit", opts)?;
    cfg.auto_fit |= rc.auto_fit;
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
    let chosen =
        qscript_runtime::train::checkpoint::requested(cfg.resume_from_checkpoint.as_ref(), &out);
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
    rc: &RunContext,
    step: usize,
    checkpoint: Option<&std::path::Path>,
) -> Box<EvalAltResult> {
    let saved = checkpoint.map_or_else(String::new, |p| format!("; checkpoint `{}`", p.display()));
    // In the REPL there is no command line to add `--resume` to: the option does it.
    let how = if rc.in_repl.load(std::sync::atomic::Ordering::Relaxed) {
        "run the call again with `resume_from_checkpoint: true` in its options"
    } else {
        "resume with `--resume`"
    };
    Box::new(EvalAltResult::ErrorTerminated(
        Dynamic::from(format!("stopped at step {step}{saved}; {how}")),
        ctx.call_position(),
    ))
}

/// A trainer for `model` on `train` (and `eval`) as this run executes it (for real, or as a
/// dry run), with its reporter, the plan shown.
#[allow(clippy::too_many_arguments)]
fn start(
    ctx: &NativeCallContext,
    what: &'static str,
    goal: Goal,
    model: &ModelHandle,
    train: &DatasetHandle,
    opts: Map,
    eval: Option<&DatasetHandle>,
) -> Result<(Trainer, Box<dyn Reporter>, TrainConfig), Box<EvalAltResult>> {
    let rc = RunContext::of(ctx)?;
    let at = |mut e: Box<EvalAltResult>| {
        e.set_position(ctx.call_position());
        e
    };
    let (preference, opts) = objective_of(ctx, goal, opts)?;
    let cfg = prepare(ctx, &rc, model, opts)?;
    let (train_ex, train_src) = examples(train, "training").map_err(at)?;
    let have = Goal::of(&train_ex);
    if have != goal {
        let is = match have {
            Goal::Sft => "SFT examples (from `data::sft`)",
            Goal::Dpo => "preference pairs (from `data::preference`)",
            Goal::Kto => "KTO answers with a `label` (from `data::preference`)",
        };
        return Err(to_rhai_at(ctx)(qscript_runtime::Error::InvalidArgument(
            format!(
                "`{what}` was given {is}; train them with `{}`",
                have.function()
            ),
        )));
    }
    if rc.checking() {
        // The summary's data is the training set's (not the latest one tokenized: an eval
        // split, say).
        let fact = crate::context::lock(&rc.sft_facts)
            .get(&train.address())
            .filter(|(n, _)| *n == train.len())
            .map(|(_, f)| f.clone());
        let longest = train_ex
            .iter()
            .map(qscript_runtime::data::example::Example::longest)
            .max()
            .unwrap_or(0);
        let n = train_ex.len();
        let fact = match goal {
            Goal::Sft => fact.unwrap_or_else(|| {
                format!(
                    "{n} examples from `{}` (longest {longest} tokens)",
                    train_src.0
                )
            }),
            Goal::Dpo | Goal::Kto => format!(
                "{n} {} from `{}` (two rows each, longest row {longest} tokens)",
                if goal == Goal::Dpo {
                    "preference pairs"
                } else {
                    "KTO answers"
                },
                train_src.0
            ),
        };
        rc.check_fact("data", fact);
        if let Some(p) = &preference {
            rc.check_fact(
                "objective",
                if p.needs_reference() {
                    format!(
                        "`{}` ({}); the reference: one forward pass over the {n} training \
                         examples (and the eval set) before the first step, by the model as \
                         the call starts",
                        p.name(),
                        goal.function()
                    )
                } else {
                    format!("`{}` ({}), reference-free", p.name(), goal.function())
                },
            );
        }
    }
    let eval = eval.map(|d| examples(d, "eval")).transpose().map_err(at)?;
    if let Some((ex, _)) = &eval
        && Goal::of(ex) != goal
    {
        return Err(to_rhai_at(ctx)(qscript_runtime::Error::InvalidArgument(
            format!("`{what}`'s eval dataset is not the same kind of data as its training dataset"),
        )));
    }
    let mut data = RunData::new(train_ex, None);
    data.tokenized_by.push(train_src);
    if let Some((ex, src)) = eval {
        data.eval = Some(ex);
        data.tokenized_by.push(src);
    }
    let pad = model.0.eos_ids().first().copied().unwrap_or(0);
    let mut reporter = reporter(&rc, what, &model.0);
    let trainer = rc
        .training(&model.0)
        .and_then(|(mode, collective)| {
            let objective: Arc<dyn qscript_runtime::train::objective::Objective> = match preference
            {
                None => Arc::new(qscript_runtime::train::objective::CausalLm),
                Some(p) => {
                    if mode == qscript_runtime::train::Mode::Train && p.needs_reference() {
                        reference_pass(&rc, &model.0, &mut data, &cfg, pad)?;
                    }
                    Arc::new(p)
                }
            };
            Trainer::start(&model.0, data, &cfg, pad, collective, objective, mode)
        })
        .map_err(to_rhai_at(ctx))?;
    let mut trainer = trainer;
    publish_to_servers(&rc, &model.0, &mut trainer);
    reporter.start(&trainer);
    Ok((trainer, reporter, cfg))
}

/// A model being served (`m.serve`) is served as it trains: each optimizer step's adapters go
/// to its servers (a copy of the LoRA weights; full fine-tuning would copy the whole model each
/// step, so its servers keep the weights from before the run, and say so).
fn publish_to_servers(
    rc: &RunContext,
    model: &Arc<qscript_runtime::model::Model>,
    trainer: &mut Trainer,
) {
    let served = rc.servers.serving(model);
    if served.is_empty() {
        return;
    }
    if model.lora.is_none() {
        rc.sink.err(
            "note: the model being served trains every weight; its server keeps the weights              from before this run (serving while training follows LoRA adapters)",
        );
        return;
    }
    for s in served {
        trainer.add_callback(Box::new(
            qscript_runtime::train::callbacks::publish::Publisher::new(move |m| s.publish(m)),
        ));
    }
}

/// The reference model's log-probabilities of every training and eval example, by the model as
/// the call starts (one forward pass, no gradients).
fn reference_pass(
    rc: &RunContext,
    model: &qscript_runtime::model::Model,
    data: &mut RunData,
    cfg: &TrainConfig,
    pad: u32,
) -> qscript_runtime::Result<()> {
    use qscript_runtime::train::preference::reference_logps;
    let started = std::time::Instant::now();
    let mut train = (*data.train).clone();
    let batch = cfg.per_device_eval_batch_size.max(1);
    reference_logps(model, &mut train, batch, pad, &rc.cancel)?;
    let mut n = train.len();
    data.train = Arc::new(train);
    if let Some(eval) = &data.eval {
        let mut eval = (**eval).clone();
        reference_logps(model, &mut eval, batch, pad, &rc.cancel)?;
        n += eval.len();
        data.eval = Some(Arc::new(eval));
    }
    rc.sink.err(&format!(
        "reference: log-probabilities of {n} examples by the model as the call starts ({:.1}s)",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn run_fit(
    ctx: &NativeCallContext,
    goal: Goal,
    model: &ModelHandle,
    train: &DatasetHandle,
    opts: Map,
    eval: Option<&DatasetHandle>,
) -> Result<ModelHandle, Box<EvalAltResult>> {
    let rc = RunContext::of(ctx)?;
    let (trainer, mut reporter, cfg) = start(ctx, goal.function(), goal, model, train, opts, eval)?;
    let report = qscript_runtime::train::fit::run(trainer, &rc.cancel, &mut |e| {
        reporter.event(e);
        Ok(())
    });
    reporter.finish();
    let report = report.map_err(to_rhai_at(ctx))?;
    if report.interrupted {
        return Err(stopped(
            ctx,
            &rc,
            report.steps,
            report.last_checkpoint.as_deref(),
        ));
    }
    reporter.summary(&report, &cfg);
    // Servers of the input model serve what the run returns (the best checkpoint's, say).
    if model.0.lora.is_some() {
        for s in rc.servers.serving(&model.0) {
            s.publish(report.model.clone());
        }
    }
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

/// A step-at-a-time trainer (`Trainer` in scripts).
#[derive(Clone)]
pub struct TrainerHandle(Arc<std::sync::Mutex<Stepping>>);

/// A trainer and what prints it.
struct Stepping {
    trainer: Trainer,
    reporter: Box<dyn Reporter>,
}

impl std::fmt::Debug for TrainerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Trainer")
    }
}

/// Registers the `Trainer` type.
/// `train::compare`'s answers, `[prompt, base, tuned]` each, printed side by side in two columns
/// of `width` characters under the prompt.
fn side_by_side(rows: &[[String; 3]], width: usize) -> String {
    let wrap = |text: &str| -> Vec<String> {
        let mut lines = Vec::new();
        // Blank lines dropped: a reply is read as its text, not its layout.
        for para in text.trim().lines().filter(|l| !l.trim().is_empty()) {
            let mut line = String::new();
            for ch in para.chars() {
                if line.chars().count() == width {
                    lines.push(std::mem::take(&mut line));
                }
                line.push(ch);
            }
            lines.push(line);
        }
        lines
    };
    let mut out = String::new();
    for [prompt, base, tuned] in rows {
        out.push_str(&format!("> {prompt}\n"));
        out.push_str(&format!("  {:<width$} | {}\n", "base", "tuned"));
        let (a, b) = (wrap(base), wrap(tuned));
        for i in 0..a.len().max(b.len()) {
            let l = a.get(i).map_or("", String::as_str);
            let r = b.get(i).map_or("", String::as_str);
            let pad = width.saturating_sub(l.chars().count());
            out.push_str(&format!("  {l}{} | {r}\n", " ".repeat(pad)));
        }
        out.push('\n');
    }
    out
}

pub(crate) fn register(engine: &mut rhai::Engine) {
    engine.register_type_with_name::<TrainerHandle>("Trainer");
}

fn new_trainer(
    ctx: &NativeCallContext,
    model: &ModelHandle,
    train: &DatasetHandle,
    opts: Map,
    eval: Option<&DatasetHandle>,
) -> Result<TrainerHandle, Box<EvalAltResult>> {
    let goal = match &*train.0 {
        Data::Tokenized(t) => Goal::of(&t.examples),
        Data::Records(_) => Goal::Sft,
    };
    let (trainer, reporter, _) = start(ctx, "train::trainer", goal, model, train, opts, eval)?;
    Ok(TrainerHandle(Arc::new(std::sync::Mutex::new(Stepping {
        trainer,
        reporter,
    }))))
}

/// `opts` with the training options (HF's names) of `--config` and `--set` merged over it: the
/// keys the recipe does not declare as params. A value is read as JSON when the option takes it
/// so (`1e-4`, `true`, `["tensorboard"]`), else as text (`cosine`).
fn merged_options(rc: &RunContext, mut opts: Map) -> Map {
    let declared = lock(&rc.params_declared).clone().unwrap_or_default();
    let names = TrainConfig::option_names();
    let pref = qscript_runtime::train::preference::OPTION_NAMES;
    for (key, o) in &rc.overrides {
        if !(names.contains(key) || pref.contains(&key.as_str())) || declared.contains(key) {
            continue;
        }
        let text = serde_json::Value::String(o.raw.clone());
        let value = match serde_json::from_str::<serde_json::Value>(o.raw.trim()) {
            // `output_dir: "2024"` is text to `TrainConfig`, `learning_rate: 2e-4` a number.
            Ok(v) if !v.is_string() => {
                let one = serde_json::json!({ key.as_str(): v.clone() });
                let fits = if pref.contains(&key.as_str()) {
                    serde_json::from_value::<qscript_runtime::train::preference::PrefConfig>(one)
                        .is_ok()
                } else {
                    serde_json::from_value::<TrainConfig>(one).is_ok()
                };
                if fits { v } else { text }
            }
            _ => text,
        };
        if let Ok(d) = rhai::serde::to_dynamic(value) {
            opts.insert(key.as_str().into(), d);
        }
    }
    *lock(&rc.train_options_taken) = true;
    opts
}

/// The `train` module.
// rhai's macro unwraps the `&mut` receiver of functions that also take a NativeCallContext.
#[allow(clippy::unwrap_used)]
#[export_module]
pub mod train_module {
    use rhai::{Array, Map};

    use super::run_fit;
    use crate::context::RunContext;
    use crate::handles::{DatasetHandle, ModelHandle, TokenizerHandle};

    /// The answers of a base model and a tuned one to the same prompts, printed side by side (a
    /// model's chat reply, greedy): `base`, `tuned` (models), `tokenizer`, `prompts` (strings),
    /// and optionally `system`, `max_new_tokens` (default 128) and `enable_thinking` (Qwen3's
    /// templates). Returns the rows as maps of
    /// `prompt`, `base`, `tuned`.
    ///
    /// ```rhai
    /// let tok = tokenizer::builtin();
    /// let rows = train::compare(#{ base: model::tiny(#{ seed: 1 }), tuned: model::tiny(#{ seed: 2 }),
    ///     tokenizer: tok, prompts: ["你是谁？", "hi"], max_new_tokens: 4 });
    /// assert(rows.len() == 2 && rows[0].prompt == "你是谁？");
    /// ```
    #[rhai_fn(return_raw)]
    pub fn compare(ctx: NativeCallContext, opts: Map) -> Result<Array, Box<rhai::EvalAltResult>> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Opts {
            prompts: Vec<String>,
            system: Option<String>,
            #[serde(default = "default_new")]
            max_new_tokens: usize,
            enable_thinking: Option<bool>,
        }
        fn default_new() -> usize {
            128
        }
        let mut opts = opts;
        let mut take = |k: &str| {
            opts.remove(k).ok_or_else(|| {
                crate::error::script_error(
                    "train::compare",
                    format!("`{k}` is missing (base, tuned, tokenizer and prompts are needed)"),
                )
            })
        };
        let base = take("base")?;
        let tuned = take("tuned")?;
        let tok = take("tokenizer")?;
        let (Some(base), Some(tuned), Some(tok)) = (
            base.try_cast::<ModelHandle>(),
            tuned.try_cast::<ModelHandle>(),
            tok.try_cast::<TokenizerHandle>(),
        ) else {
            return Err(crate::error::script_error(
                "train::compare",
                "`base` and `tuned` are models and `tokenizer` a tokenizer".to_string(),
            ));
        };
        let o: Opts = crate::options::from_options(&ctx, "train::compare", opts)?;
        let rc = RunContext::of(&ctx)?;
        let mut rows = Vec::new();
        for p in &o.prompts {
            let reply = |m: &ModelHandle| {
                crate::modules::model::reply(
                    &ctx,
                    m,
                    &tok,
                    o.system.as_deref(),
                    p,
                    o.max_new_tokens,
                    o.enable_thinking,
                )
            };
            rows.push([p.clone(), reply(&base)?, reply(&tuned)?]);
        }
        rc.sink.out(&super::side_by_side(&rows, 48));
        Ok(rows
            .into_iter()
            .map(|[prompt, base, tuned]| {
                let mut m = Map::new();
                m.insert("prompt".into(), prompt.into());
                m.insert("base".into(), base.into());
                m.insert("tuned".into(), tuned.into());
                Dynamic::from_map(m)
            })
            .collect())
    }

    /// The recipe's training options with those of `--config FILE` and `--set key=value` on top:
    /// the keys that are `train::fit` options (HF's `TrainingArguments` names, as in a TRL or
    /// LLaMA-Factory YAML) and that the recipe does not declare with `params`. A recipe opts in
    /// by passing its options through this call; without it, such keys are an error at the end
    /// of the run. Values keep the option's type (`learning_rate: 2e-4` a number,
    /// `lr_scheduler_type: cosine` text).
    ///
    /// ```rhai
    /// let p = params(#{ model: "tiny" });
    /// // `--config run.yaml` with `learning_rate: 2.0e-4` would win over the 1e-3 here.
    /// let opts = train::options(#{ max_steps: 2, learning_rate: 1e-3, save_steps: 0 });
    /// assert(opts.learning_rate == 1e-3);
    /// io::write_text("d.json", `[{"instruction": "hi", "output": "hello"}]`);
    /// let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/d.json")), tokenizer::builtin());
    /// let trained = train::fit(lora::attach(model::tiny(), #{ r: 4 }), ds, opts);
    /// ```
    #[rhai_fn(return_raw)]
    pub fn options(ctx: NativeCallContext, defaults: Map) -> Result<Map, Box<EvalAltResult>> {
        let rc = RunContext::of(&ctx)?;
        Ok(super::merged_options(&rc, defaults))
    }

    /// Trains a model (LoRA adapters, or every weight of a model loaded `trainable`) on a
    /// tokenized dataset and returns the trained model; the input model is not changed. Ctrl-C
    /// saves a checkpoint and stops. Options use HF TrainingArguments names (TRL's and
    /// DeepSpeed's where HF has none); an unknown key is an error listing the valid ones.
    ///
    /// | option | default | meaning |
    /// |---|---|---|
    /// | `per_device_train_batch_size` | 8 | examples a micro-batch (on each rank) |
    /// | `per_device_eval_batch_size` | 8 | examples an eval batch |
    /// | `gradient_accumulation_steps` | 1 | micro-batches an optimizer step |
    /// | `num_train_epochs` | 3.0 | epochs (fractions allowed) |
    /// | `max_steps` | -1 | optimizer steps; wins over `num_train_epochs` when > 0 |
    /// | `learning_rate` | 5e-5 | peak learning rate |
    /// | `lr_scheduler_type` | `"linear"` | `linear`, `cosine`, `cosine_with_min_lr`, `constant`, `constant_with_warmup` |
    /// | `lr_scheduler_kwargs` | none | HF's: `cosine_with_min_lr` takes `min_lr` or `min_lr_rate` (and `num_cycles`), `cosine` `num_cycles` |
    /// | `optim` | `"adamw_torch"` | HF's name for AdamW (`adamw_torch_fused`, `adamw_hf` too), or `adamw_8bit` (`adamw_bnb_8bit`, `paged_adamw_8bit`): bitsandbytes' 8-bit states, 2 bytes a parameter instead of 8; other optimizers are not there yet |
    /// | `warmup_ratio`, `warmup_steps` | 0 | warmup as a fraction of the steps, or steps (wins) |
    /// | `weight_decay` | 0.0 | AdamW's decoupled decay (not on biases and norms) |
    /// | `adam_beta1`, `adam_beta2`, `adam_epsilon` | 0.9, 0.999, 1e-8 | AdamW |
    /// | `max_grad_norm` | 1.0 | global-norm clipping (0: off) |
    /// | `bf16`, `fp16` | false | train in the dtype the model was loaded with (a note if they differ) |
    /// | `gradient_checkpointing` | false | recompute each block in backward; `"offload"` (Unsloth's `"unsloth"`): also keep the block inputs in pinned host memory until their backward, copied beside the compute (the GPU holds two blocks' inputs instead of every layer's); `"auto"`: recompute only as many blocks as the device's memory needs (the last blocks keep their activations while 90% of the device holds them; the plan says how many) |
    /// | `offload_activations` | false | `gradient_checkpointing: "offload"` by another name |
    /// | `auto_fit` | false | when the run would not fit its device: apply the cheapest of a smaller micro-batch (more accumulation, the same examples a step) and checkpointing that fits, and say so (`qscript --fit` sets it for every run); without it the run is refused with each change that would fit, its estimated peak and speed |
    /// | `group_by_length` | false | similar lengths in a batch (still shuffled per epoch) |
    /// | `disable_shuffling` | false | LLaMA-Factory's: the dataset's order every epoch (curricula; runs compared step by step with another trainer's) |
    /// | `pad_to_multiple_of` | none | round padded lengths up |
    /// | `packing` | false | TRL's: examples packed into rows of `max_length` (default 1024); attention never crosses an example, positions restart, the loss is the unpacked one; a row counts as one example |
    /// | `max_length` | none | TRL's: the packed row length; without `packing`, longer examples are cut |
    /// | `seed` | 42 | data order and dropout masks |
    /// | `logging_steps` | 10 | a log record every N steps (`metrics.jsonl`, printed) |
    /// | `eval_strategy`, `eval_steps` | `"no"`, `logging_steps` | `"steps"`: evaluate every N steps; `"epoch"`: at each epoch's end (both need the eval dataset) |
    /// | `save_strategy` | `"steps"` | `"steps"`: every `save_steps`; `"epoch"`: at each epoch's end; `"no"`: never |
    /// | `save_steps`, `save_total_limit` | 500, none | a checkpoint every N steps (0: never), keep at most this many |
    /// | `load_best_model_at_end`, `metric_for_best_model` | false, `eval_loss` | return the best checkpoint's weights |
    /// | `early_stopping_patience` | none | stop after this many evals without a better one |
    /// | `resume_from_checkpoint` | none | a checkpoint directory, or `true` for the latest in `output_dir` (`--resume` on the command line) |
    /// | `output_dir` | the run's | where checkpoints, `metrics.jsonl` and the loss plot go |
    /// | `report_to`, `logging_dir` | `"none"`, `output_dir/runs` | `"tensorboard"` also writes TensorBoard event files |
    /// | `merge_micro_batches` | unset | unset: on a GPU, each window as fewer, larger passes, just large enough to keep the GPU busy and within the memory measured in the first step (the same gradients); `true`: one pass; `false`: as written |
    /// | `zero_stage` | 0 | DeepSpeed's, with several ranks (`qscript --nproc-per-node N`): 1 keeps on each rank the optimizer moments of its share of the parameters only, 2 its share of the summed gradients too |
    /// | `pipeline` | true | with the model over several GPUs (`device_map`): each window's micro-batches through the GPUs in a pipeline, so they work at once; `false`: one at a time, as HF does |
    ///
    /// With several ranks each takes `per_device_train_batch_size` examples of every
    /// micro-batch; rank 0 alone logs, evaluates and writes.
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
        run_fit(&ctx, super::Goal::Sft, &model, &train, opts, None)
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
        run_fit(&ctx, super::Goal::Sft, &model, &train, opts, Some(&eval))
    }

    /// Preference training on pairs from `data::preference`, with TRL's names and maths, and
    /// returns the trained model (the input is not changed). Takes `train::fit`'s options and:
    ///
    /// | option | default | meaning |
    /// |---|---|---|
    /// | `loss_type` (`pref_loss`) | `"sigmoid"` | DPO (`sigmoid`), `ipo`, `hinge`, `robust`; `orpo` and `simpo` need no reference |
    /// | `beta` (`pref_beta`) | 0.1 | DPO's β (ORPO's λ, SimPO's β) |
    /// | `label_smoothing` | 0 | `robust`'s (and `simpo`'s) flipped-label probability, in [0, 0.5) |
    /// | `rpo_alpha` (`pref_ftx`, `cpo_alpha`) | none | adds the chosen answers' SFT loss with this weight |
    /// | `simpo_gamma` | 0.5 | SimPO's target margin |
    ///
    /// The reference is the model as the call starts: a fresh LoRA adapter's base, or, after
    /// SFT in the same session, the SFT model (no second copy is loaded); its log-probabilities
    /// are computed once, before the first step. Logged per step with TRL's names:
    /// `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`,
    /// `logps/chosen`, `logps/rejected` (ORPO adds `nll_loss`, `log_odds_ratio`,
    /// `log_odds_chosen`). `per_device_train_batch_size` counts pairs (two rows each).
    ///
    /// ```rhai
    /// io::write_text("p.jsonl", `{"prompt": "Q: 2+2? A:", "chosen": " 4", "rejected": " 5"}`);
    /// let pairs = data::preference(data::load(io::output_dir() + "/p.jsonl"), tokenizer::builtin());
    /// let tuned = train::dpo(lora::attach(model::tiny(), #{ r: 4 }), pairs, #{ beta: 0.1, max_steps: 2, learning_rate: 1e-3, logging_steps: 1, save_steps: 0 });
    /// let orpo = train::dpo(lora::attach(model::tiny(), #{ r: 4 }), pairs, #{ loss_type: "orpo", max_steps: 1, save_steps: 0 });
    /// ```
    #[rhai_fn(return_raw)]
    pub fn dpo(
        ctx: NativeCallContext,
        model: ModelHandle,
        train: DatasetHandle,
        opts: Map,
    ) -> Result<ModelHandle, Box<rhai::EvalAltResult>> {
        run_fit(&ctx, super::Goal::Dpo, &model, &train, opts, None)
    }

    /// `dpo` with evaluation on `eval` (pairs too): `eval_loss` is the mean preference loss.
    ///
    /// ```rhai
    /// io::write_text("p.jsonl", `{"prompt": "Q: 2+2? A:", "chosen": " 4", "rejected": " 5"}`);
    /// let pairs = data::preference(data::load(io::output_dir() + "/p.jsonl"), tokenizer::builtin());
    /// let tuned = train::dpo(lora::attach(model::tiny(), #{ r: 4 }), pairs, #{ max_steps: 2, eval_strategy: "steps", eval_steps: 1, save_steps: 0 }, pairs);
    /// ```
    #[rhai_fn(name = "dpo", return_raw)]
    pub fn dpo_eval(
        ctx: NativeCallContext,
        model: ModelHandle,
        train: DatasetHandle,
        opts: Map,
        eval: DatasetHandle,
    ) -> Result<ModelHandle, Box<rhai::EvalAltResult>> {
        run_fit(&ctx, super::Goal::Dpo, &model, &train, opts, Some(&eval))
    }

    /// KTO on unpaired answers with a `label` (from `data::preference`), TRL's `KTOTrainer`
    /// maths: each answer's log-ratio against the reference, less (desirable) or more
    /// (undesirable) than the KL estimate of mismatched prompt/answer pairs of the batch.
    /// Takes `train::fit`'s options and `beta` (0.1), `desirable_weight` and
    /// `undesirable_weight` (1.0; LLaMA-Factory's `kto_chosen_weight`, `kto_rejected_weight`).
    /// Logs `kl`, `rewards/chosen`, `rewards/rejected`, `logps/chosen`, `logps/rejected`.
    ///
    /// ```rhai
    /// io::write_text("k.jsonl", "{\"prompt\": \"Q: 2+2? A:\", \"completion\": \" 4\", \"label\": true}\n{\"prompt\": \"Q: 3+3? A:\", \"completion\": \" 7\", \"label\": false}\n");
    /// let kto = data::preference(data::load(io::output_dir() + "/k.jsonl"), tokenizer::builtin());
    /// let tuned = train::kto(lora::attach(model::tiny(), #{ r: 4 }), kto, #{ per_device_train_batch_size: 2, max_steps: 2, save_steps: 0 });
    /// ```
    #[rhai_fn(return_raw)]
    pub fn kto(
        ctx: NativeCallContext,
        model: ModelHandle,
        train: DatasetHandle,
        opts: Map,
    ) -> Result<ModelHandle, Box<rhai::EvalAltResult>> {
        run_fit(&ctx, super::Goal::Kto, &model, &train, opts, None)
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
        let windows = crate::context::lock(&t.0).trainer.windows();
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

    /// Serves the model being trained over the OpenAI API (`m.serve`'s options): each `t.step`
    /// publishes its weights to the server, so requests see the latest optimizer step.
    ///
    /// ```rhai
    /// io::write_text("d.json", `[{"instruction": "a", "output": "b"}]`);
    /// let ds = data::sft(data::to_messages(data::load(io::output_dir() + "/d.json")), tokenizer::builtin());
    /// let t = train::trainer(lora::attach(model::tiny(), #{ r: 4 }), ds, #{ max_steps: 1, save_steps: 0 });
    /// let srv = t.serve(#{ port: 0 });
    /// t.step(t.batches()[0]);
    /// srv.stop();
    /// ```
    #[rhai_fn(global, pure, return_raw)]
    pub fn serve(
        ctx: NativeCallContext,
        t: &mut super::TrainerHandle,
        opts: Map,
    ) -> Result<crate::handles::ServerHandle, Box<rhai::EvalAltResult>> {
        let mut guard = crate::context::lock(&t.0);
        let model = guard
            .trainer
            .snapshot()
            .map_err(crate::error::to_rhai_at(&ctx))?;
        let source = std::sync::Arc::new(model.clone());
        let (handle, served) = crate::modules::serve::start(&ctx, &source, model, opts)?;
        if let Some(s) = served {
            guard.trainer.add_callback(Box::new(
                qscript_runtime::train::callbacks::publish::Publisher::new(move |m| s.publish(m)),
            ));
        }
        Ok(handle)
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
        let super::Stepping { trainer, reporter } = &mut *guard;
        let out = trainer
            .step(&window)
            .map_err(crate::error::to_rhai_at(&ctx))?;
        for e in &out.events {
            reporter.event(e);
        }
        if out.done {
            reporter.finish();
        }
        // Ctrl-C during the step (where the time goes): save before the script stops.
        let rc = RunContext::of(&ctx)?;
        // Under data parallel every rank stops at the same step (Ctrl-C on any of them).
        let stop = trainer
            .should_stop(&rc.cancel)
            .map_err(crate::error::to_rhai_at(&ctx))?;
        if stop && !out.done {
            // A run superseded by an edit (`--watch`) keeps no checkpoint.
            let path = if rc.cancel.is_superseded() {
                None
            } else {
                trainer
                    .checkpoint_now()
                    .map_err(crate::error::to_rhai_at(&ctx))?
            };
            return Err(super::stopped(&ctx, &rc, out.step, path.as_deref()));
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
        crate::context::lock(&t.0)
            .trainer
            .evaluate()
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
        let p = crate::context::lock(&t.0)
            .trainer
            .save_checkpoint()
            .map_err(crate::error::to_rhai_at(&ctx))?;
        Ok(p.to_string_lossy().into_owned())
    }

    /// A snapshot of the model as trained so far (later steps do not change it).
    #[rhai_fn(global, get = "model", pure, return_raw)]
    pub fn model(t: &mut super::TrainerHandle) -> Result<ModelHandle, Box<rhai::EvalAltResult>> {
        let m = crate::context::lock(&t.0)
            .trainer
            .snapshot()
            .map_err(crate::error::to_rhai)?;
        Ok(ModelHandle(Arc::new(m)))
    }

    /// Optimizer steps done.
    #[rhai_fn(global, get = "global_step", pure)]
    pub fn global_step(t: &mut super::TrainerHandle) -> rhai::INT {
        let n = crate::context::lock(&t.0).trainer.global_step();
        rhai::INT::try_from(n).unwrap_or(0)
    }

    /// Optimizer steps planned.
    #[rhai_fn(global, get = "total_steps", pure)]
    pub fn total_steps(t: &mut super::TrainerHandle) -> rhai::INT {
        let n = crate::context::lock(&t.0).trainer.total_steps();
        rhai::INT::try_from(n).unwrap_or(0)
    }
}
