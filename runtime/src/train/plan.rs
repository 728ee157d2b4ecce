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
use crate::plan::memory::{self, Estimate, Trainable, Workload, human};
use crate::{Error, Result};

use super::TrainConfig;
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
            "`packing` is for SFT; preference pairs are padded, each pair's two rows in one batch \
             (drop `packing`)"
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
        .map(Example::longest)
        .max()
        .unwrap_or(1)
        .div_ceil(multiple)
        * multiple;
    let device = model
        .planned_device
        .clone()
        .unwrap_or_else(|| model.decoder.device().clone());
    let per_layer_adapters = model.decoder.blocks.first().map_or(0, |b| {
        Proj::ALL
            .iter()
            .filter(|&&p| b.proj(p).lora.is_some())
            .count()
    });
    let workload = Workload {
        // A micro-batch holds at most every example (a preference example is two rows).
        tokens: cfg.per_device_train_batch_size.min(train.len())
            * train.first().map_or(1, Example::rows)
            * longest,
        gradient_checkpointing: cfg.gradient_checkpointing,
        trainable: if model.trainable {
            Trainable::Full
        } else {
            Trainable::Adapters(trainable)
        },
        weight_decay: cfg.weight_decay > 0.0,
        lora: model.lora.as_ref().map(|l| (l.r, per_layer_adapters)),
        gpu: device.is_cuda(),
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
    };
    let estimate = memory::estimate(model.config(), model.decoder.dtype(), &workload)?;
    // What the run may use on a device: what is free there plus what the model's weights already
    // hold (loaded for a real run; a dry run has loaded nothing).
    let loaded = model.planned_device.is_none();
    let capacity = |dev: &candle_core::Device, weights: u64| {
        crate::device::free_bytes(dev).map(|f| f + if loaded { weights } else { 0 })
    };
    let budget = capacity(&device, estimate.weights);
    let epochs = if cfg.max_steps > 0 {
        total.div_ceil(steps_per_epoch) as f64
    } else {
        cfg.num_train_epochs
    };
    let placement = match &model.placement {
        Some(p) => {
            let mut per = per_device(p, &estimate, model);
            // `max_memory` decides where weights go (as in accelerate); the run is checked
            // against each device's real capacity.
            for ((_, _, budget), d) in per.iter_mut().zip(&p.devices) {
                if let Some(c) = crate::device::resolve(d.device)
                    .ok()
                    .and_then(|dev| capacity(&dev, d.used))
                {
                    *budget = c;
                }
            }
            Some((p.clone(), per))
        }
        None => None,
    };
    if let Some((_, per)) = &placement
        && let Some((dev, need, budget)) = per.iter().find(|(_, n, b)| n > b)
    {
        return Err(Error::InvalidArgument(format!(
            "training needs about {} on {dev} and it holds {} (free memory and the weights \
             placed there): place less on it (a lower `max_memory` for it, or a `device_map` \
             that moves modules off it), or need less (a smaller `per_device_train_batch_size`, \
             a shorter `max_length`, `gradient_checkpointing: true`)",
            human(*need as f64),
            human(*budget as f64)
        )));
    }
    let plan = RunPlan {
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
        .describe(device.is_cuda()),
        tensorboard,
        schedule,
    };
    if plan.placement.is_none()
        && let Some(budget) = plan.budget
        && plan.memory.total() > budget
    {
        return Err(Error::InvalidArgument(format!(
            "this run needs about {} on {} and {} is free:\n{}\nto fit: a smaller \
             `per_device_train_batch_size` ({} now; raise `gradient_accumulation_steps` to keep \
             the step), a shorter `max_length` (rows of {} tokens now), \
             `gradient_checkpointing: true`{}, or LoRA instead of full fine-tuning",
            human(plan.memory.total() as f64),
            plan.device,
            human(budget as f64),
            plan.memory,
            plan.batch,
            plan.longest,
            if cfg.gradient_checkpointing {
                " (on)"
            } else {
                ""
            },
        )));
    }
    Ok((plan, train))
}

/// The estimate split over a placement's devices: each device's weights, its layers' share of
/// the activations and of the trainable state (adapters by layer; full fine-tuning by weight),
/// the loss chunk and temporaries on the head's device, the CUDA runtime on each GPU.
fn per_device(p: &crate::plan::Placement, e: &Estimate, model: &Model) -> Vec<DeviceNeed> {
    use crate::device::DeviceSpec;
    use crate::model::ModuleId;
    let layers = model.config().num_hidden_layers.max(1) as f64;
    let weights: u64 = p.devices.iter().map(|d| d.used).sum::<u64>().max(1);
    let head = if model.decoder.lm_head.is_some() {
        ModuleId::Head
    } else {
        ModuleId::Embedding
    };
    let head_dev = p.device(head).unwrap_or(DeviceSpec::Cpu);
    let state = (e.trainable + e.gradients + e.optimizer) as f64;
    p.devices
        .iter()
        .map(|d| {
            let on = p.layers_on(d.device) as f64 / layers;
            let by_weight = d.used as f64 / weights as f64;
            let share = if model.trainable { by_weight } else { on };
            let mut b = d.used as f64 + state * share + e.activations as f64 * on;
            if d.device == head_dev {
                b += (e.loss + e.temporaries) as f64;
            }
            if !d.device.is_cpu() {
                b += e.runtime.max(crate::device::CUDA_RUNTIME_BYTES) as f64;
            }
            (d.device.to_string(), b as u64, d.budget)
        })
        .collect()
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
