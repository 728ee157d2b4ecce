//! What a run will do, from the model's shapes, the data and the options alone: every check a
//! run makes before it allocates (options, vocabulary, eval set, resume resolution, schedule,
//! memory, placement), the step arithmetic, and the memory estimate against the device's
//! budget. Made once, in [`super::Trainer::start`], for a real run and for `qscript check`.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::data::sft::{Example, IGNORE};
use crate::model::Model;
use crate::model::block::Proj;
use crate::plan::fit;
use crate::plan::memory::{self, Estimate, Trainable, Workload, human};
use crate::{Error, Result};

use super::TrainConfig;
use super::config::Checkpointing;
use super::schedule::Schedule;

/// A run's plan (see the module doc).
#[derive(Clone, Debug)]
pub struct RunPlan {
    /// Training examples (or packed rows) after packing and truncation.
    pub examples: usize,
    /// Micro-batches an epoch.
    pub micro_per_epoch: usize,
    /// Optimizer steps an epoch (micro-batches / accumulation, floored, at least 1).
    pub steps_per_epoch: usize,
    /// Optimizer steps in all.
    pub total_steps: usize,
    /// Epochs those steps take (HF's `Num Epochs`: derived when `max_steps` is set).
    pub epochs: f64,
    /// Per-device batch.
    pub batch: usize,
    /// Devices the batch is split over (data parallel).
    pub devices: usize,
    /// Gradient accumulation steps.
    pub accumulation: usize,
    /// Trainable parameters.
    pub trainable: usize,
    /// Padded tokens of the longest row.
    pub longest: usize,
    /// The checkpoint a resume starts from.
    pub resume_from: Option<PathBuf>,
    /// The device and its memory estimate.
    pub device: String,
    /// The estimate for the largest micro-batch.
    pub memory: Estimate,
    /// Free bytes on the device, when it says (GPUs).
    pub budget: Option<u64>,
    /// Layers.
    pub layers: usize,
    /// How micro-batches are run (merged or as written).
    pub micro_batches: String,
    /// `report_to` asks for TensorBoard event files.
    pub tensorboard: bool,
    /// The learning rate of each step.
    pub schedule: Schedule,
    /// With `device_map`: where each module lies, and per device the estimate and its budget.
    pub placement: Option<(crate::plan::Placement, Vec<DeviceNeed>)>,
    /// With `auto_fit`, when the options as given would not fit: the options the run uses
    /// instead, and what changed.
    pub fitted: Option<(Box<TrainConfig>, String)>,
}

/// The datasets of a run, with where their ids came from.
#[derive(Clone, Debug)]
pub struct RunData {
    /// Training examples.
    pub train: Arc<Vec<Example>>,
    /// Eval examples.
    pub eval: Option<Arc<Vec<Example>>>,
    /// Each dataset's source and the vocabulary size of the tokenizer that made it (checked
    /// against the model's embedding).
    pub tokenized_by: Vec<(String, usize)>,
}

impl RunData {
    /// `train` and `eval`, of unknown tokenizers.
    pub fn new(train: Arc<Vec<Example>>, eval: Option<Arc<Vec<Example>>>) -> Self {
        Self {
            train,
            eval,
            tokenized_by: Vec::new(),
        }
    }
}

/// A device, the bytes a run needs there and its budget.
pub type DeviceNeed = (String, u64, u64);

impl RunPlan {
    /// Examples a step takes: per-device batch x devices x accumulation.
    pub fn total_batch(&self) -> usize {
        self.batch * self.devices * self.accumulation
    }
}

/// The plan of training `model` on `data` over `ranks` data-parallel ranks (the training
/// examples prepared, packed or cut as `cfg` says, returned beside the plan), or the first
/// reason it cannot run.
pub fn plan(
    model: &Model,
    data: &RunData,
    cfg: &TrainConfig,
    ranks: usize,
) -> Result<(RunPlan, Arc<Vec<Example>>)> {
    let vocab = model.config().vocab_size;
    for (source, tokens) in &data.tokenized_by {
        crate::tokenizer::check_fits(*tokens, vocab, Some(source))?;
    }
    let eval = data.eval.as_deref().map(|e| &e[..]);
    cfg.validate()?;
    let tensorboard = cfg.tensorboard()?;
    if cfg.packing && data.train.iter().any(|e| e.pref.is_some()) {
        return Err(Error::InvalidArgument(
            "`packing` is for SFT; preference pairs are padded, each pair one row (its prompt once, \
             then both answers) in one batch (drop `packing`)"
                .into(),
        ));
    }
    let train = super::sampler::prepare(data.train.clone(), cfg);
    if train.is_empty() {
        return Err(Error::InvalidArgument(
            "the training dataset is empty".into(),
        ));
    }
    if cfg.eval_strategy != "no" && eval.is_none_or(<[Example]>::is_empty) {
        return Err(Error::InvalidArgument(format!(
            "`eval_strategy: \"{}\"` needs an eval dataset: `train::fit(model, train, opts, eval)`",
            cfg.eval_strategy
        )));
    }
    for (what, data) in [("training", &train[..]), ("eval", eval.unwrap_or(&[]))] {
        check_ids(what, data, vocab)?;
    }
    let (micro_per_epoch, steps_per_epoch, total) = cfg.plan(train.len(), ranks);
    let schedule = Schedule::with_kwargs(
        &cfg.lr_scheduler_type,
        cfg.learning_rate,
        cfg.warmup(total),
        total,
        cfg.lr_scheduler_kwargs.as_ref(),
    )?;
    let out_dir = PathBuf::from(&cfg.output_dir);
    let resume_from = super::checkpoint::resume_dir(cfg.resume_from_checkpoint.as_ref(), &out_dir)?;
    let trainable: usize = crate::model::params::trainable(model)
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum();
    if trainable == 0 {
        return Err(Error::InvalidArgument(
            "the model has nothing to train: attach LoRA adapters (`lora::attach`) or load it with `trainable: true`".into(),
        ));
    }
    let multiple = cfg.pad_to_multiple_of.unwrap_or(1).max(1);
    let longest = train
        .iter()
        .map(Example::row_len)
        .max()
        .unwrap_or(1)
        .div_ceil(multiple)
        * multiple;
    // The device and machine planned for: a dry run's, else where the weights are.
    let (device, machine) = match &model.planned {
        Some(p) => (p.device, p.machine.clone()),
        None => (
            crate::device::DeviceSpec::of(model.decoder.device()),
            crate::device::Machine::Here,
        ),
    };
    let per_layer_adapters = model.decoder.blocks.first().map_or(0, |b| {
        Proj::ALL
            .iter()
            .filter(|&&p| b.proj(p).lora.is_some())
            .count()
    });
    let workload = Workload {
        // A micro-batch holds at most every example (a preference example is one row: its
        // prompt once, both answers).
        tokens: cfg.per_device_train_batch_size.min(train.len()) * longest,
        gradient_checkpointing: cfg.checkpointing().recompute(),
        // On the CPU the inputs already lie in host memory: offload is plain checkpointing there.
        offload_activations: cfg.checkpointing().offload() && device.is_gpu(),
        trainable: if model.trainable {
            Trainable::Full
        } else {
            Trainable::Adapters(trainable)
        },
        weight_decay: cfg.weight_decay > 0.0,
        lora: model.lora.as_ref().map(|l| (l.r, per_layer_adapters)),
        gpu: device.is_gpu(),
        optimizer_shards: if cfg.zero_stage >= 1 { ranks } else { 1 },
        gradient_shards: if cfg.zero_stage == 2 { ranks } else { 1 },
        // Over several GPUs a window runs as a pipeline, every micro-batch held until its backward.
        held_micro_batches: if cfg.pipeline && pipelined(model) {
            cfg.gradient_accumulation_steps
        } else {
            1
        },
        quant4: model
            .quant4()
            .map(|q| matches!(q.absmax, crate::quant::Absmax::Nested { .. })),
        optim8: cfg.eight_bit_optim(),
        mlp_dropout: model.decoder.blocks.first().is_some_and(|b| {
            [Proj::Gate, Proj::Up, Proj::Down]
                .iter()
                .any(|&p| b.proj(p).has_dropout())
        }),
        // `gradient_checkpointing: "auto"` as the plan resolved it.
        kept_blocks: match cfg.checkpointing() {
            Checkpointing::KeepLast(n) => n,
            _ => 0,
        },
    };
    let estimate = memory::estimate(model.config(), model.decoder.dtype(), &workload)?;
    // Offloaded block inputs wait in pinned host memory: this machine's must hold them (a named
    // GPU's host is not known).
    let host = matches!(machine, crate::device::Machine::Here)
        .then(crate::device::host_available)
        .flatten();
    let host_holds = |w: &Workload| -> Result<bool> {
        let e = memory::estimate(model.config(), model.decoder.dtype(), w)?;
        Ok(host.is_none_or(|h| e.offloaded <= h))
    };
    if !host_holds(&workload)? {
        return Err(Error::InvalidArgument(format!(
            "`gradient_checkpointing: \"offload\"` parks about {} of block inputs in host memory \
             and this machine has {} free: use `gradient_checkpointing: true`, or a smaller \
             micro-batch or `max_length`",
            human(estimate.offloaded as f64),
            human(host.unwrap_or(0) as f64)
        )));
    }
    let fit = Fit::new(model, &machine, device, estimate.weights);
    let budget = fit.budget;
    if cfg.checkpointing() == Checkpointing::Auto {
        return plan_auto_checkpointing(model, data, cfg, ranks, &workload, budget);
    }
    let epochs = if cfg.max_steps > 0 {
        total.div_ceil(steps_per_epoch) as f64
    } else {
        cfg.num_train_epochs
    };
    let placement = model
        .placement
        .as_ref()
        .map(|p| (p.clone(), fit.per_device(p, &estimate)));
    let tight = match &placement {
        Some((_, per)) => per
            .iter()
            .find(|(_, n, b)| n > b)
            .map(|(d, n, b)| (d.clone(), *n, *b)),
        None => budget
            .filter(|b| estimate.total() > *b)
            .map(|b| (model.device_name(), estimate.total(), b)),
    };
    if let Some((dev, need, held)) = tight {
        let knobs = fit::Knobs {
            batch: cfg.per_device_train_batch_size.min(train.len()).max(1),
            accumulation: cfg.gradient_accumulation_steps,
            example_tokens: longest,
            quant4_possible: !model.trainable && model.quant4().is_none(),
            optim8_possible: cfg.zero_stage == 0,
            lora_instead: model.trainable.then(|| lora_all_linear(model.config(), 16)),
            offload_possible: device.is_gpu()
                && host_holds(&Workload {
                    gradient_checkpointing: true,
                    offload_activations: true,
                    ..workload
                })?,
            cpu_layers_possible: model.placement.is_none() && device.is_gpu(),
            layers: model.config().num_hidden_layers,
        };
        let solution = fit::solve(&workload, &knobs, &fit)?;
        let listing = solution.describe();
        if cfg.auto_fit
            && let Some(b) = &solution.best_in_training
        {
            let mut fitted = cfg.clone();
            for lever in &b.levers {
                match *lever {
                    fit::Lever::Checkpointing => {
                        fitted.gradient_checkpointing = Checkpointing::On;
                    }
                    fit::Lever::PartialCheckpointing { recomputed, layers } => {
                        fitted.gradient_checkpointing =
                            Checkpointing::KeepLast(layers.saturating_sub(recomputed));
                    }
                    fit::Lever::Offload => {
                        fitted.gradient_checkpointing = Checkpointing::Offload;
                    }
                    fit::Lever::Optim8 => fitted.optim = "adamw_8bit".into(),
                    fit::Lever::MicroBatch {
                        batch,
                        accumulation,
                    } => {
                        fitted.per_device_train_batch_size = batch;
                        fitted.gradient_accumulation_steps = accumulation;
                    }
                    _ => {}
                }
            }
            fitted.auto_fit = false;
            let (mut plan, train) = plan(model, data, &fitted, ranks)?;
            let changes: Vec<String> = b.levers.iter().map(fit::Lever::to_string).collect();
            // The eval split the new options may have needed comes with them.
            let (fitted, eval) = match plan.fitted.take() {
                Some((c, note)) => (c, format!("\n{note}")),
                None => (Box::new(fitted), String::new()),
            };
            let cheaper = match &solution.best {
                Some(best) if best != b => format!(
                    "; cheaper, with `model::load` options: {}",
                    best.levers
                        .iter()
                        .map(fit::Lever::to_string)
                        .collect::<Vec<_>>()
                        .join(" + ")
                ),
                _ => String::new(),
            };
            plan.fitted = Some((
                fitted,
                format!(
                    "auto_fit: the options as given need about {} on {dev}, which holds {}; \
                     training with {} instead (about {}, ~{:.2}x the speed){}{}",
                    human(need as f64),
                    human(held as f64),
                    changes.join(" + "),
                    human(b.need as f64),
                    b.speed,
                    cheaper,
                    eval
                ),
            ));
            return Ok((plan, train));
        }
        let auto = if cfg.auto_fit {
            "\n`auto_fit` changes only what training can (the micro-batch, checkpointing, activation offload, 8-bit optimizer states), and \
             those do not fit; the rest are `model::load` options"
        } else {
            ""
        };
        return Err(Error::InvalidArgument(match &placement {
            Some(_) => format!(
                "training needs about {} on {dev} and it holds {} (free memory and the weights \
                 placed there): place less on it (a lower `max_memory` for it, or a `device_map` \
                 that moves modules off it), or need less:\n{listing}{auto}",
                human(need as f64),
                human(held as f64)
            ),
            None => format!(
                "this run needs about {} on {dev} and {} is free:\n{estimate}\n{listing}{auto}",
                human(need as f64),
                human(held as f64),
            ),
        }));
    }
    let eval_split = match (eval, &placement) {
        (Some(e), None) if !e.is_empty() => eval_batch(&fit, &workload, &estimate, e, cfg)?,
        _ => None,
    };
    let mut plan = RunPlan {
        examples: train.len(),
        micro_per_epoch,
        steps_per_epoch,
        total_steps: total,
        epochs,
        batch: cfg.per_device_train_batch_size,
        devices: ranks,
        accumulation: cfg.gradient_accumulation_steps,
        trainable,
        longest,
        resume_from,
        device: model.device_name(),
        memory: estimate,
        budget,
        layers: model.config().num_hidden_layers,
        placement,
        micro_batches: super::merge::MergePolicy::new(
            cfg.merge_micro_batches,
            model.decoder.num_params(),
        )
        .describe(device.is_gpu()),
        tensorboard,
        schedule,
        fitted: None,
    };
    if let Some((batch, note)) = eval_split {
        let mut fitted = cfg.clone();
        fitted.per_device_eval_batch_size = batch;
        plan.fitted = Some((Box::new(fitted), note));
    }
    Ok((plan, train))
}

/// Evaluation runs beside the training state (weights, adapters, gradients, moments): when
/// `per_device_eval_batch_size` examples of the longest eval example would not fit beside it,
/// the eval batches are split to the most that do, never an out-of-memory error at the first
/// eval. `Some((batch, what changed))` when split; an error when not even one example fits.
fn eval_batch(
    fit: &Fit,
    train: &Workload,
    trained: &Estimate,
    eval: &[Example],
    cfg: &TrainConfig,
) -> Result<Option<(usize, String)>> {
    let Some(budget) = fit.budget else {
        return Ok(None);
    };
    let model = fit.model;
    let per_example = eval.iter().map(Example::row_len).max().unwrap_or(1).max(1);
    let need = |batch: usize| -> Result<u64> {
        let tokens = batch * per_example;
        let forward = memory::estimate(
            model.config(),
            model.decoder.dtype(),
            &Workload {
                tokens,
                trainable: Trainable::Nothing,
                ..*train
            },
        )?;
        let with_loss = memory::estimate(
            model.config(),
            model.decoder.dtype(),
            &Workload { tokens, ..*train },
        )?;
        Ok(forward.total()
            + trained.trainable
            + trained.gradients
            + trained.optimizer
            + with_loss.loss)
    };
    let asked = cfg.per_device_eval_batch_size.min(eval.len()).max(1);
    let asked_need = need(asked)?;
    if asked_need <= budget {
        return Ok(None);
    }
    // The most examples that fit: the need grows with the batch.
    let (mut lo, mut hi) = (0usize, asked - 1);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if need(mid)? <= budget {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    if lo == 0 {
        return Err(Error::InvalidArgument(format!(
            "evaluating one example of {per_example} tokens (the longest eval example) beside \
             the training state needs about {} on {} and it holds {}: shorten the eval examples \
             (`max_length`) or make training need less",
            human(need(1)? as f64),
            model.device_name(),
            human(budget as f64)
        )));
    }
    Ok(Some((
        lo,
        format!(
            "eval: batches of {lo} examples (`per_device_eval_batch_size` {asked} would need \
             about {} beside the training state on {}, which holds {})",
            human(asked_need as f64),
            model.device_name(),
            human(budget as f64)
        ),
    )))
}

/// The elements LoRA of rank `r` on every linear layer of a model of `c` trains.
fn lora_all_linear(c: &crate::model::ModelConfig, r: usize) -> usize {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (q, kv) = (
        c.num_attention_heads * c.head_dim(),
        c.num_kv_heads() * c.head_dim(),
    );
    // Each projection's A (r x in) and B (out x r).
    let per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h);
    c.num_hidden_layers * r * per_layer
}

/// `gradient_checkpointing: "auto"`: the plan with as many of the last blocks keeping their
/// activations (not recomputed) as fit in [`fit::PARTIAL_CHECKPOINTING_SHARE`] of the device's
/// `budget` (every block recomputed when the budget is not known, or the model is placed over
/// several devices), and a note that says what was chosen.
fn plan_auto_checkpointing(
    model: &Model,
    data: &RunData,
    cfg: &TrainConfig,
    ranks: usize,
    workload: &Workload,
    budget: Option<u64>,
) -> Result<(RunPlan, Arc<Vec<Example>>)> {
    let layers = model.config().num_hidden_layers;
    let need = |keep: usize| -> Result<u64> {
        let w = Workload {
            gradient_checkpointing: keep < layers,
            kept_blocks: keep,
            ..*workload
        };
        Ok(memory::estimate(model.config(), model.decoder.dtype(), &w)?.total())
    };
    let room = budget
        .filter(|_| model.placement.is_none())
        .map(|b| (b as f64 * fit::PARTIAL_CHECKPOINTING_SHARE) as u64);
    let keep = match room {
        Some(room) => {
            layers - fit::fewest_recomputed(0..layers, |r| Ok(need(layers - r)? <= room))?
        }
        None => 0,
    };
    let mut resolved = cfg.clone();
    resolved.gradient_checkpointing = match keep {
        0 => Checkpointing::On,
        k if k == layers => Checkpointing::Off,
        k => Checkpointing::KeepLast(k),
    };
    let (mut plan, train) = plan(model, data, &resolved, ranks)?;
    let chosen = match room {
        None => "every block recomputed (the device's free memory is not known here)".to_string(),
        Some(room) => format!(
            "{} of the {layers} blocks recomputed in backward, the last {keep} keeping their \
             activations (about {} of the {} planned for: {:.0}% of what the device holds)",
            layers - keep,
            human(need(keep)? as f64),
            human(room as f64),
            fit::PARTIAL_CHECKPOINTING_SHARE * 100.0
        ),
    };
    let note = format!("gradient_checkpointing: \"auto\": {chosen}");
    plan.fitted = Some(match plan.fitted.take() {
        Some((c, more)) => (c, format!("{note}\n{more}")),
        None => (Box::new(resolved), note),
    });
    Ok((plan, train))
}

/// What a workload needs on the run's devices (one, or each of a placement's) and what they
/// hold: the plan's check and the fit solver's measure.
struct Fit<'a> {
    model: &'a Model,
    /// The weights' bytes as the model is now.
    weights: u64,
    /// What a run without a placement may use on its device, when it says.
    budget: Option<u64>,
    /// The same for each of a placement's devices, in its order.
    held: Vec<Option<u64>>,
}

impl<'a> Fit<'a> {
    /// Asks `machine` once what each device holds: what is free there plus what the model's
    /// weights already hold on it (loaded for a real run; a dry run has loaded nothing).
    fn new(
        model: &'a Model,
        machine: &crate::device::Machine,
        device: crate::device::DeviceSpec,
        weights: u64,
    ) -> Self {
        let loaded = model.planned.is_none();
        let capacity = |dev, on: u64| {
            machine
                .free_bytes(dev)
                .map(|f| f + if loaded { on } else { 0 })
        };
        // Where `max_memory` set the budgets, what a device may hold is the smaller of the two.
        let bounded = |dev, held: Option<u64>| {
            let cap = model
                .placement
                .as_ref()
                .filter(|p| p.capped)
                .and_then(|p| p.devices.iter().find(|d| d.device == dev))
                .map(|d| d.budget);
            match (held, cap) {
                (Some(h), Some(c)) => Some(h.min(c)),
                (h, c) => h.or(c),
            }
        };
        let held = model.placement.as_ref().map_or_else(Vec::new, |p| {
            p.devices
                .iter()
                .map(|d| bounded(d.device, capacity(d.device, d.used)))
                .collect()
        });
        let budget = bounded(device, capacity(device, weights));
        Self {
            model,
            weights,
            budget,
            held,
        }
    }

    /// The estimate split over a placement's devices: each device's weights, its layers' share
    /// of the activations and of the trainable state (adapters by layer; full fine-tuning by
    /// weight), the loss chunk and temporaries on the head's device, the CUDA runtime on each
    /// GPU; each against the device's capacity (`max_memory` decides where weights go, as in
    /// accelerate, and bounds what the run may use there; the run is also checked against what
    /// the device really holds). Weights scale
    /// with the estimate's (a 4-bit base in the fit solver's levers).
    fn per_device(&self, p: &crate::plan::Placement, e: &Estimate) -> Vec<DeviceNeed> {
        use crate::device::DeviceSpec;
        use crate::model::ModuleId;
        let model = self.model;
        let layers = model.config().num_hidden_layers.max(1) as f64;
        let weights: u64 = p.devices.iter().map(|d| d.used).sum::<u64>().max(1);
        let scale = e.weights as f64 / self.weights.max(1) as f64;
        let head = if model.decoder.lm_head.is_some() {
            ModuleId::Head
        } else {
            ModuleId::Embedding
        };
        let head_dev = p.device(head).unwrap_or(DeviceSpec::Cpu);
        let state = (e.trainable + e.gradients + e.optimizer) as f64;
        p.devices
            .iter()
            .zip(&self.held)
            .map(|(d, held)| {
                let on = p.layers_on(d.device) as f64 / layers;
                let by_weight = d.used as f64 / weights as f64;
                let share = if model.trainable { by_weight } else { on };
                let mut b = d.used as f64 * scale + state * share + e.activations as f64 * on;
                if d.device == head_dev {
                    b += (e.loss + e.temporaries) as f64;
                }
                if !d.device.is_cpu() {
                    b += e.runtime.max(crate::device::CUDA_RUNTIME_BYTES) as f64;
                }
                let budget = held.unwrap_or(d.budget);
                (d.device.to_string(), b as u64, budget)
            })
            .collect()
    }
}

impl fit::Need for Fit<'_> {
    fn need(&self, w: &Workload, on_gpu: Option<usize>) -> Result<(u64, u64)> {
        let model = self.model;
        let e = memory::estimate(model.config(), model.decoder.dtype(), w)?;
        if let Some(p) = &model.placement {
            // The device furthest over its budget.
            let per = self.per_device(p, &e);
            let worst = per
                .iter()
                .max_by_key(|(_, n, b)| i128::from(*n) - i128::from(*b))
                .map_or((0, u64::MAX), |(_, n, b)| (*n, *b));
            return Ok(worst);
        }
        let mut need = e.total();
        if let Some(k) = on_gpu {
            // Each layer moved off takes its weights and its share of the activations and of
            // the trainable state with it.
            let layers = model.config().num_hidden_layers.max(1);
            let layer_weights = memory::modules(model.config(), model.decoder.dtype(), w.quant4)
                .iter()
                .find(|m| matches!(m.id, crate::model::ModuleId::Layer(_)))
                .map_or(0, |m| m.bytes);
            let per_layer = layer_weights
                + (e.trainable + e.gradients + e.optimizer + e.activations) / layers as u64;
            need = need.saturating_sub(per_layer * (layers - k.min(layers)) as u64);
        }
        let budget = self.budget.unwrap_or(u64::MAX);
        Ok((need, budget))
    }
}

/// Whether the model's blocks lie over several GPUs (its windows then run as a pipeline).
fn pipelined(model: &Model) -> bool {
    model
        .placement
        .as_ref()
        .is_some_and(|p| p.pipeline_stages().is_some())
}

/// Every id of `data` inside the model's vocabulary.
fn check_ids(what: &str, data: &[Example], vocab: usize) -> Result<()> {
    for (i, e) in data.iter().enumerate() {
        let (second_ids, second_labels) = e.pref.as_ref().map_or((&[][..], &[][..]), |p| {
            (p.second_ids.as_slice(), p.second_labels.as_slice())
        });
        let labels = e
            .labels
            .iter()
            .chain(second_labels)
            .copied()
            .filter(|&l| l != IGNORE);
        let bad = e
            .input_ids
            .iter()
            .chain(second_ids)
            .map(|&id| i64::from(id))
            .chain(labels)
            .find(|&id| id < 0 || id as usize >= vocab);
        if let Some(id) = bad {
            return Err(Error::InvalidArgument(format!(
                "{what} example {i} holds token id {id}, outside the model's vocabulary \
                 (0..{vocab}): was it tokenized with this model's tokenizer?"
            )));
        }
    }
    Ok(())
}

impl fmt::Display for RunPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "steps: {} examples / batch {}{} = {} micro-batches an epoch; / accumulation {} = {} \
             steps an epoch x {} epochs = {} steps ({} examples a step: {} x {} device{} x {})",
            self.examples,
            self.batch,
            if self.devices > 1 {
                format!(" x {} ranks", self.devices)
            } else {
                String::new()
            },
            self.micro_per_epoch,
            self.accumulation,
            self.steps_per_epoch,
            self.epochs,
            self.total_steps,
            self.total_batch(),
            self.batch,
            self.devices,
            if self.devices == 1 { "" } else { "s" },
            self.accumulation
        )?;
        if self.accumulation > 1 {
            writeln!(f, "micro-batches: {}", self.micro_batches)?;
        }
        if let Some(p) = &self.resume_from {
            writeln!(f, "resume from: {}", p.display())?;
        }
        if let Some((_, note)) = &self.fitted {
            writeln!(f, "{note}")?;
        }
        let budget = self
            .budget
            .map_or_else(String::new, |b| format!(", {} free", human(b as f64)));
        writeln!(
            f,
            "memory on {} (largest micro-batch: {} rows x {} tokens{budget}):",
            self.device, self.batch, self.longest
        )?;
        writeln!(f, "{}", self.memory)?;
        match &self.placement {
            None => write!(
                f,
                "placement: all {} layers, the embedding and the head on {}",
                self.layers, self.device
            ),
            Some((p, per)) => {
                writeln!(f, "placement (device_map):")?;
                for line in p.to_string().lines() {
                    writeln!(f, "  {line}")?;
                }
                let shown: Vec<String> = per
                    .iter()
                    .map(|(d, n, b)| format!("{d} {} of {}", human(*n as f64), human(*b as f64)))
                    .collect();
                write!(f, "training memory per device: {}", shown.join(", "))
            }
        }
    }
}
