//! The training loop. Batches come from the epoch order (seeded, optionally length-grouped); the
//! loss of an accumulation window is the sum of token losses over the number of learned tokens
//! in the whole window, so accumulating k micro-batches equals one batch k times larger. Each
//! micro-batch's forward and backward is the engine's ([`super::engine`]); this file holds the
//! schedule, the optimizer step, logging, eval and checkpoints.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::checkpoint::{self, TrainerState};
use super::config::TrainConfig;
use super::engine::{NoHook, eval_loss, micro_step};
use super::flat::{DeviceGrads, DeviceParams};
use super::merge::MergePolicy;
use super::optim::{AdamWConfig, DeviceAdamW, clip_factor_parts};
use super::schedule::Schedule;
use crate::cancel::CancelToken;
use crate::data::batch::{collate, epoch_order, pack};
use crate::data::sft::{Example, IGNORE};
use crate::model::Model;
use crate::model::params::visit_trainable_mut;
use crate::{Error, Result};

/// What the loop reports as it goes.
#[derive(Clone, Debug)]
pub enum Event {
    /// Before step 1: the plan, as HF prints it.
    Start {
        /// Training examples.
        examples: usize,
        /// Epochs (as configured).
        epochs: f64,
        /// `per_device_train_batch_size * gradient_accumulation_steps`.
        total_batch: usize,
        /// Optimizer steps.
        total_steps: usize,
        /// Trainable parameters.
        trainable: usize,
        /// Resumed at this step.
        resumed_at: usize,
        /// The plan's memory estimate for the device, bytes.
        memory: u64,
    },
    /// After each optimizer step.
    Step {
        /// Steps done.
        step: usize,
        /// Of this many.
        total: usize,
        /// Loss of this step, when it was read back (at logging steps; the loss stays on the
        /// device otherwise).
        loss: Option<f64>,
    },
    /// Every `logging_steps`.
    Log(serde_json::Value),
    /// After an evaluation.
    Eval(serde_json::Value),
    /// A checkpoint was written.
    Saved(PathBuf),
}

/// The outcome of `fit`.
#[derive(Clone, Debug)]
pub struct TrainReport {
    /// The trained model (its own trainable tensors; the input model is unchanged).
    pub model: Model,
    /// Optimizer steps done.
    pub steps: usize,
    /// `(step, loss)` of every step.
    pub losses: Vec<(usize, f64)>,
    /// Logged records (also in `metrics.jsonl`).
    pub log_history: Vec<serde_json::Value>,
    /// Mean training throughput.
    pub tokens_per_second: f64,
    /// Examples trained on per second (HF's `train_samples_per_second`).
    pub examples_per_second: f64,
    /// Seconds from the first step to the end (HF's `train_runtime`).
    pub train_runtime: f64,
    /// Whether Ctrl-C stopped the run (a checkpoint was saved first).
    pub interrupted: bool,
    /// The last checkpoint written, if any.
    pub last_checkpoint: Option<PathBuf>,
    /// The most GPU memory live tensors held during training (`None` on the CPU).
    pub peak_device_bytes: Option<u64>,
    /// The best evaluation: its checkpoint and eval loss (with eval on).
    pub best: Option<(String, f64)>,
    /// Whether the returned model is that checkpoint's (`load_best_model_at_end`).
    pub loaded_best: bool,
}

/// A copy of `model` whose trainable tensors are copies (training never changes the input
/// handle, and later steps never change the copy).
pub fn snapshot(model: &Model) -> Result<Model> {
    let mut m = model.clone();
    visit_trainable_mut(&mut m, &mut |_, t| {
        *t = t.copy()?;
        Ok(())
    })?;
    Ok(m)
}

/// The examples as `cfg` trains them: packed into rows (`packing`), or cut at `max_length`.
pub(super) fn prepare(examples: Arc<Vec<Example>>, cfg: &TrainConfig) -> Arc<Vec<Example>> {
    if cfg.packing {
        let max = cfg.max_length.unwrap_or(1024);
        let rows = pack(&examples, max);
        let tokens: usize = rows.iter().map(|r| r.input_ids.len()).sum();
        crate::notice::say(format!(
            "packing: {} examples into {} rows of up to {max} tokens ({:.1}% filled)",
            examples.len(),
            rows.len(),
            100.0 * tokens as f64 / (rows.len().max(1) * max) as f64
        ));
        return Arc::new(rows);
    }
    match cfg.max_length {
        Some(max) if examples.iter().any(|e| e.input_ids.len() > max) => Arc::new(
            examples
                .iter()
                .map(|e| {
                    let mut e = e.clone();
                    e.input_ids.truncate(max);
                    e.labels.truncate(max);
                    e
                })
                .collect(),
        ),
        _ => examples,
    }
}

fn learned_tokens(examples: &[&Example]) -> usize {
    examples
        .iter()
        .map(|e| e.labels.iter().skip(1).filter(|&&l| l != IGNORE).count())
        .sum()
}

/// Whether `e` is the device running out of memory.
fn is_out_of_memory(e: &Error) -> bool {
    let text = e.to_string();
    text.contains("OUT_OF_MEMORY") || text.to_lowercase().contains("out of memory")
}

/// Mean token loss of `data` (no gradients kept).
pub fn evaluate(model: &Model, data: &[Example], cfg: &TrainConfig, pad_id: u32) -> Result<f64> {
    let device = model.decoder.device().clone();
    let (mut total, mut count) = (0f64, 0usize);
    for chunk in data.chunks(cfg.per_device_eval_batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = collate(&refs, pad_id, cfg.pad_to_multiple_of, &device)?;
        let (sum, n) = eval_loss(model, &batch)?;
        total += sum;
        count += n;
    }
    Ok(total / count.max(1) as f64)
}

/// An optimizer step whose loss and gradient norm are still on the device.
struct Pending {
    step: usize,
    loss: Tensor,
    grad_norm: Tensor,
    window: Vec<Vec<usize>>,
}

/// A training run driven one optimizer step at a time: what `fit` loops over, and what scripts
/// use for custom loops (`train::trainer`). Each step follows the config: logging, eval and
/// checkpoints happen inside [`Trainer::step`] and come back as events.
pub struct Trainer {
    model: Model,
    params: DeviceParams,
    opt: DeviceAdamW,
    pending: Vec<Pending>,
    sched: Schedule,
    cfg: TrainConfig,
    state: TrainerState,
    train: Arc<Vec<Example>>,
    eval: Option<Arc<Vec<Example>>>,
    lengths: Vec<usize>,
    out_dir: PathBuf,
    /// `None` on ranks other than 0 (they write nothing).
    metrics: Option<std::fs::File>,
    _lock: Option<checkpoint::DirLock>,
    pad_id: u32,
    device: Device,
    total: usize,
    micro_per_epoch: usize,
    trainable: usize,
    losses: Vec<(usize, f64)>,
    window_log: Vec<(f64, f64)>,
    last_grad_norm: Option<f64>,
    tokens_seen: usize,
    examples_seen: usize,
    tokens_since_log: usize,
    started: Instant,
    last_log: Instant,
    stopped_early: bool,
    last_checkpoint: Option<PathBuf>,
    merge: MergePolicy,
    plan: super::plan::RunPlan,
    tensorboard: Option<super::tensorboard::EventWriter>,
    /// The data-parallel ranks (`None`: one process). Rank 0 alone evaluates and writes
    /// checkpoints; the others write nothing (the launcher gives them a throw-away overlay).
    dist: Option<Arc<crate::dist::Group>>,
    /// The model's stages when it lies over several GPUs: the window's micro-batches then run in
    /// a pipeline (GPipe's schedule) so the GPUs work at once.
    pipeline: Option<Vec<std::ops::Range<usize>>>,
    /// The ranks' sums on the GPU, when every rank has NCCL and one GPU.
    #[cfg(feature = "cuda")]
    nccl: Option<crate::dist::nccl::Nccl>,
}

/// What one optimizer step did.
#[derive(Clone, Debug)]
pub struct StepOutcome {
    /// Steps done, this one included.
    pub step: usize,
    /// Loss of the step (token-normalized over the accumulation window), when it was read
    /// back at this step (see [`Trainer::read_step`]).
    pub loss: Option<f64>,
    /// Gradient norm before clipping, likewise.
    pub grad_norm: Option<f64>,
    /// Learning rate used.
    pub learning_rate: f64,
    /// Logs, evals and checkpoints the config asked for at this step.
    pub events: Vec<Event>,
    /// Whether training should stop (total steps reached, or early stopping).
    pub done: bool,
}

impl Trainer {
    /// Prepares a run: fresh trainable copies, optimizer, schedule, `output_dir`, and the
    /// checkpoint to resume from, if asked.
    pub fn new(
        model: &Model,
        train: Arc<Vec<Example>>,
        eval: Option<Arc<Vec<Example>>>,
        cfg: &TrainConfig,
        pad_id: u32,
    ) -> Result<Self> {
        model.needs_weights("training")?;
        let dist = crate::dist::group()?;
        let (plan, train) = super::plan::plan(model, train, eval.as_deref().map(|e| &e[..]), cfg)?;
        let out_dir = PathBuf::from(&cfg.output_dir);
        let lead = dist.as_ref().is_none_or(|g| g.rank() == 0);
        let lock = if lead {
            std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
            let lock = checkpoint::DirLock::take(&out_dir)?;
            for done in checkpoint::recover(&out_dir)? {
                crate::notice::say(format!("note: `{}`: {done}", out_dir.display()));
            }
            Some(lock)
        } else {
            None
        };
        let mut model = model.clone();
        let device: Device = model.decoder.device().clone();
        crate::device::reset_peak(&device);
        let params = DeviceParams::adopt(&mut model)?;
        let trainable = params.len();
        let adam = AdamWConfig {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.weight_decay,
        };
        let mut opt = match (&dist, cfg.zero_stage) {
            (Some(g), stage @ (1 | 2)) => {
                // ZeRO stages 1 and 2: this rank's share of the moments only.
                let [part] = &params.parts[..] else {
                    return Err(Error::InvalidArgument(format!(
                        "`zero_stage: {stage}` with a model over several devices (`device_map`) is not supported yet"
                    )));
                };
                let shard = crate::dist::share(part.len(), g.size(), g.rank());
                DeviceAdamW {
                    parts: vec![crate::train::optim::AdamW::over(part, adam, Some(shard))?],
                }
            }
            _ => DeviceAdamW::new(&params, adam)?,
        };
        let (micro_per_epoch, total) = (plan.micro_per_epoch, plan.total_steps);
        let sched = Schedule::new(
            &cfg.lr_scheduler_type,
            cfg.learning_rate,
            cfg.warmup(total),
            total,
        )?;
        let mut state = TrainerState::default();
        if let Some(dir) = resume_dir(cfg, &out_dir)? {
            state = checkpoint::restore(&dir, &model, &params, &mut opt)?;
        }
        state.max_steps = total;
        let metrics = if lead {
            let json = serde_json::to_string_pretty(cfg).unwrap_or_default();
            crate::sandbox::write_atomic(&out_dir.join("training_args.json"), json.as_bytes())?;
            let metrics_path = out_dir.join("metrics.jsonl");
            own_metrics(&metrics_path, state.global_step)?;
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&metrics_path)
                    .map_err(|e| Error::io(&metrics_path, e))?,
            )
        } else {
            None
        };
        let tensorboard = if plan.tensorboard && lead {
            let dir = cfg
                .logging_dir
                .as_ref()
                .map_or_else(|| out_dir.join("runs"), PathBuf::from);
            Some(super::tensorboard::EventWriter::create(&dir)?)
        } else {
            None
        };
        #[cfg(feature = "cuda")]
        let nccl = match (&dist, &device) {
            // Every rank takes the same branch: the same recipe puts its model on a GPU.
            (Some(g), Device::Cuda(d)) if model.placement.is_none() => {
                crate::dist::nccl::Nccl::connect(g, d)?
            }
            _ => None,
        };
        let pipeline = pipeline_stages(&model).filter(|_| cfg.pipeline);
        let lengths = train.iter().map(|e| e.input_ids.len()).collect();
        let merge = MergePolicy::new(cfg.merge_micro_batches, model.decoder.num_params());
        Ok(Self {
            model,
            params,
            opt,
            pending: Vec::new(),
            sched,
            cfg: cfg.clone(),
            state,
            train,
            eval,
            lengths,
            out_dir,
            metrics,
            _lock: lock,
            pad_id,
            device,
            total,
            micro_per_epoch,
            trainable,
            losses: Vec::new(),
            window_log: Vec::new(),
            last_grad_norm: None,
            tokens_seen: 0,
            examples_seen: 0,
            tokens_since_log: 0,
            started: Instant::now(),
            last_log: Instant::now(),
            stopped_early: false,
            last_checkpoint: None,
            merge,
            plan,
            tensorboard,
            dist,
            pipeline,
            #[cfg(feature = "cuda")]
            nccl,
        })
    }

    /// Whether the optimizer state is sharded over the ranks (ZeRO stages 1 and 2).
    fn zero(&self) -> bool {
        self.opt.parts.iter().any(|o| o.shard.is_some())
    }

    /// ZeRO, after the step: every rank updated its share of the parameters; each rank
    /// sends its share to the others (NCCL broadcasts on the GPUs; through the host the ranks
    /// sum the shares, zeros elsewhere) so every rank holds all of them.
    fn gather_shards(&self) -> Result<()> {
        let (Some(g), true) = (&self.dist, self.zero()) else {
            return Ok(());
        };
        #[cfg(feature = "cuda")]
        if let Some(nccl) = &self.nccl {
            for part in &self.params.parts {
                let data = part.data.as_tensor();
                for r in 0..g.size() {
                    let (a, b) = crate::dist::share(part.len(), g.size(), r);
                    nccl.start_broadcast(data, a..b, r)?;
                }
            }
            return nccl.wait();
        }
        for (part, o) in self.params.parts.iter().zip(&self.opt.parts) {
            let Some((a, b)) = o.shard else { continue };
            let data = part.data.as_tensor();
            let mine = data.narrow(0, a, b - a)?;
            let full = sum_shares(g, part.len(), a, &mine)?.to_dtype(data.dtype())?;
            part.data.set(&full)?;
        }
        Ok(())
    }

    /// ZeRO: the whole moments (every rank's share summed into place), as an optimizer
    /// the checkpoint can save; `None` when they are not sharded. Every rank must call this.
    fn gathered_moments(&self) -> Result<Option<DeviceAdamW>> {
        let (Some(g), true) = (&self.dist, self.zero()) else {
            return Ok(None);
        };
        let mut parts = Vec::with_capacity(self.opt.parts.len());
        for (part, o) in self.params.parts.iter().zip(&self.opt.parts) {
            let a = o.shard.map_or(0, |s| s.0);
            parts.push(o.with_moments(
                sum_shares(g, part.len(), a, &o.m)?,
                sum_shares(g, part.len(), a, &o.v)?,
            ));
        }
        Ok(Some(DeviceAdamW { parts }))
    }

    /// Whether `cancel` (Ctrl-C) stops the run now: on any rank, for every rank at the same step.
    pub fn should_stop(&self, cancel: &CancelToken) -> Result<bool> {
        match &self.dist {
            Some(g) => g.any(cancel.is_cancelled()),
            None => Ok(cancel.is_cancelled()),
        }
    }

    /// Whether this process writes: rank 0, or the only process.
    fn lead(&self) -> bool {
        self.dist.as_ref().is_none_or(|g| g.rank() == 0)
    }

    /// This rank's part of a window of global micro-batches: its share of each (see
    /// [`crate::dist::share`]) and the window index of its first example (the ranks' shares
    /// laid end to end, rank 0 first: dropout keys each example by that index).
    fn shard<'a>(&self, window: &[Vec<&'a Example>]) -> (Vec<Vec<&'a Example>>, u64) {
        let Some(g) = &self.dist else {
            return (window.to_vec(), 0);
        };
        let mut before = 0;
        let mine = window
            .iter()
            .map(|mb| {
                let (a, b) = crate::dist::share(mb.len(), g.size(), g.rank());
                // The lower ranks' shares of this micro-batch come first.
                before += a;
                mb[a..b].to_vec()
            })
            .filter(|mb| !mb.is_empty())
            .collect();
        (mine, before as u64)
    }

    /// The plan, as `Event::Start`.
    pub fn start_event(&self) -> Event {
        Event::Start {
            examples: self.train.len(),
            // As HF prints it: with `max_steps`, the epochs those steps take.
            epochs: self.plan.epochs,
            total_batch: self.plan.total_batch(),
            total_steps: self.total,
            trainable: self.trainable,
            resumed_at: self.state.global_step,
            memory: self.plan.memory.total(),
        }
    }

    /// The plan the run started from (steps, memory estimate, placement).
    pub fn plan(&self) -> &super::plan::RunPlan {
        &self.plan
    }

    /// Optimizer steps done.
    pub fn global_step(&self) -> usize {
        self.state.global_step
    }

    /// Optimizer steps planned.
    pub fn total_steps(&self) -> usize {
        self.total
    }

    /// Whether training is over (all steps done, or early stopping).
    pub fn is_done(&self) -> bool {
        self.stopped_early || self.state.global_step >= self.total
    }

    /// The model being trained (each step updates its trainable tensors in place).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The remaining accumulation windows of the current epoch (each a list of micro-batches of
    /// example indices); when the epoch is used up, moves to the next one. Empty when done.
    pub fn windows(&mut self) -> Vec<Vec<Vec<usize>>> {
        if self.is_done() {
            return Vec::new();
        }
        next_windows(
            &self.lengths,
            &self.cfg,
            self.micro_per_epoch,
            &mut self.state,
        )
    }

    /// One optimizer step on `window` (micro-batches of example indices).
    pub fn step(&mut self, window: &[Vec<usize>]) -> Result<StepOutcome> {
        if self.is_done() {
            return Err(Error::InvalidArgument(format!(
                "training is done: all {} steps have run",
                self.total
            )));
        }
        let examples: Vec<Vec<&Example>> = window
            .iter()
            .map(|ix| {
                ix.iter()
                    .map(|&i| {
                        self.train.get(i).ok_or_else(|| {
                            Error::InvalidArgument(format!("example {i} is out of range"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        // The loss is normalised by the learned tokens of the whole window, every rank's share.
        let window_tokens: usize = examples.iter().map(|e| learned_tokens(e)).sum();
        let (mine, first_row) = self.shard(&examples);
        self.merge.before_step(&self.device);
        // The ranks' sum: with NCCL each block's as soon as the window's last backward leaves it
        // (under ZeRO stage 2 every pass's, into the ranks' shares).
        let zero2 = self.cfg.zero_stage == 2;
        let (grads, loss, largest) = {
            let mut sum = match self.dist.as_deref() {
                Some(g) => Some(super::grad_sum::GradSum::new(
                    g,
                    #[cfg(feature = "cuda")]
                    self.nccl.as_ref(),
                    &self.params,
                    self.model.decoder.blocks.len(),
                    zero2,
                )?),
                None => None,
            };
            let (mut grads, mut loss, largest) = if mine.is_empty() {
                // Fewer examples than ranks: this rank adds nothing but still joins the sums.
                let grads = match &sum {
                    Some(s) => s.grads(&self.params)?,
                    None => self.params.zero_grads()?,
                };
                (grads, Tensor::zeros((), DType::F32, &self.device)?, 0)
            } else {
                match self.run_window(&mine, window_tokens, first_row, sum.as_mut()) {
                    Err((e, true)) if is_out_of_memory(&e) => {
                        // A merged pass did not fit after all: the window again, as written (no
                        // sum had started: only an unmerged pass starts them).
                        self.merge.disable();
                        self.run_window(&mine, window_tokens, first_row, sum.as_mut())
                            .map_err(|(e, _)| e)?
                    }
                    other => other.map_err(|(e, _)| e)?,
                }
            };
            let grads: Vec<Tensor> = match sum {
                Some(mut sum) => {
                    if sum.every_pass() {
                        // The micro-batches this rank had no share of: the same sums, of zeros.
                        for _ in mine.len()..examples.len() {
                            sum.empty_pass(&mut grads)?;
                        }
                    }
                    // Every rank's gradients and loss summed: each rank then takes the same step.
                    loss = crate::device::to(&loss, &self.device)?;
                    sum.finish(grads, &mut loss)?
                }
                None => grads
                    .parts
                    .into_iter()
                    .map(super::flat::FlatGrads::into_buffer)
                    .collect::<Result<_>>()?,
            };
            (grads, loss, largest)
        };
        self.merge.after_step(&self.device, largest);
        let tokens: usize = examples.iter().flatten().map(|e| e.input_ids.len()).sum();
        self.tokens_seen += tokens;
        self.tokens_since_log += tokens;
        self.examples_seen += examples.iter().map(Vec::len).sum::<usize>();
        let span = crate::profile::span("optimizer", &self.device);
        let bufs: Vec<&Tensor> = grads.iter().collect();
        let (grad_norm, clip) = match self.dist.as_deref().filter(|_| zero2) {
            // ZeRO stage 2: each rank holds its share of the gradient; the norm is of them all.
            Some(g) => {
                let mine = super::optim::sum_of_squares_parts(&bufs)?;
                let total = super::grad_sum::sum_scalar(
                    g,
                    #[cfg(feature = "cuda")]
                    self.nccl.as_ref(),
                    &mine,
                )?;
                super::optim::clip_of_sum_of_squares(total, self.cfg.max_grad_norm)?
            }
            None => clip_factor_parts(&bufs, self.cfg.max_grad_norm)?,
        };
        let lr = self.sched.lr(self.state.global_step);
        self.opt.step(&self.params, &bufs, clip.as_ref(), lr)?;
        drop(grads);
        self.gather_shards()?;
        drop(span);
        self.state.global_step += 1;
        self.state.micro_in_epoch += window.len();
        let step = self.state.global_step;
        self.pending.push(Pending {
            step,
            loss,
            grad_norm,
            window: window.to_vec(),
        });
        let eval_every = self.cfg.eval_steps.unwrap_or(self.cfg.logging_steps).max(1);
        // Rank 0 alone logs, evaluates and saves.
        let lead = self.lead();
        let eval_step = self.cfg.eval_strategy == "steps"
            && (step.is_multiple_of(eval_every) || step == self.total);
        let evaluating = lead && eval_step;
        let cadence = step.is_multiple_of(self.cfg.logging_steps.max(1)) || step == self.total;
        let logging = lead && cadence;
        let periodic = self.cfg.save_steps > 0 && step.is_multiple_of(self.cfg.save_steps);
        let mut saving = lead && periodic;
        // Whether this step's evaluation found a new best that `load_best_model_at_end` keeps.
        let mut best_save = false;
        // Every rank reads its losses back at the logging cadence (the others too: no step's
        // loss stays on the device for the whole run).
        let read = if cadence || evaluating || saving {
            Some(self.flush()?)
        } else {
            None
        };
        let mut events = vec![Event::Step {
            step,
            total: self.total,
            loss: read.map(|r| r.0),
        }];
        let epoch_f = self.state.epoch as f64
            + self.state.micro_in_epoch as f64 / self.micro_per_epoch.max(1) as f64;
        if logging {
            let n = self.window_log.len().max(1) as f64;
            let secs = self.last_log.elapsed().as_secs_f64().max(1e-9);
            let rec = json!({
                "step": step,
                "epoch": (epoch_f * 1000.0).round() / 1000.0,
                "loss": self.window_log.iter().map(|w| w.0).sum::<f64>() / n,
                "grad_norm": self.window_log.iter().map(|w| w.1).sum::<f64>() / n,
                "learning_rate": lr,
                "tokens_per_second": (self.tokens_since_log as f64 / secs).round(),
            });
            self.window_log.clear();
            self.tokens_since_log = 0;
            self.last_log = Instant::now();
            self.record(&rec)?;
            events.push(Event::Log(rec));
        }
        if evaluating {
            let eval_loss = self.evaluate()?;
            let rec = json!({"step": step, "eval_loss": eval_loss});
            self.record(&rec)?;
            events.push(Event::Eval(rec));
            if self.state.best_metric.is_none_or(|b| eval_loss < b) {
                self.state.best_metric = Some(eval_loss);
                self.state.best_model_checkpoint = Some(format!("checkpoint-{step}"));
                self.state.evals_without_improvement = 0;
                if self.cfg.load_best_model_at_end {
                    best_save = true;
                    saving = false; // the best checkpoint is this step's
                }
            } else {
                self.state.evals_without_improvement += 1;
                self.stopped_early = self
                    .cfg
                    .early_stopping_patience
                    .is_some_and(|p| self.state.evals_without_improvement >= p);
            }
        }
        if let Some(g) = self.dist.as_ref().filter(|_| self.zero()) {
            // Under ZeRO rank 0 writes each checkpoint with every rank's share of the moments:
            // the others learn of a best checkpoint from rank 0 and send their shares.
            if eval_step && self.cfg.load_best_model_at_end {
                best_save = g.any(best_save)?;
            }
            if !lead && (best_save || periodic) {
                self.save_checkpoint()?;
            }
        }
        if lead && (saving || best_save) {
            events.push(Event::Saved(self.save_checkpoint()?));
        }
        if let Some(g) = &self.dist
            && self.cfg.early_stopping_patience.is_some()
        {
            // Rank 0's evaluation decides; every rank stops at the same step.
            self.stopped_early = g.any(self.stopped_early)?;
        }
        Ok(StepOutcome {
            step,
            loss: read.map(|r| r.0),
            grad_norm: read.map(|r| r.1),
            learning_rate: lr,
            events,
            done: self.is_done(),
        })
    }

    /// Forward and backward over a window's micro-batches, merged as the policy says: the
    /// gradients (the flat f32 buffer), the window's loss (a device scalar) and the most padded
    /// tokens of one pass; an error says whether a pass that failed was a merged one. `sum` (the
    /// ranks' sum) hooks into the last pass's backward when that pass is not merged, so a merged
    /// pass that runs out of memory and is tried again has not started any sum.
    fn run_window(
        &self,
        examples: &[Vec<&Example>],
        window_tokens: usize,
        first_row: u64,
        sum: Option<&mut super::grad_sum::GradSum>,
    ) -> std::result::Result<(DeviceGrads<'_>, Tensor, usize), (Error, bool)> {
        let mut merged = false;
        self.run_groups(examples, window_tokens, first_row, sum, &mut merged)
            .map_err(|e| (e, merged))
    }

    fn run_groups(
        &self,
        examples: &[Vec<&Example>],
        window_tokens: usize,
        mut first_row: u64,
        sum: Option<&mut super::grad_sum::GradSum>,
        merged: &mut bool,
    ) -> Result<(DeviceGrads<'_>, Tensor, usize)> {
        let dims: Vec<(usize, usize)> = examples
            .iter()
            .map(|ex| {
                (
                    ex.len(),
                    ex.iter().map(|e| e.input_ids.len()).max().unwrap_or(0),
                )
            })
            .collect();
        // ZeRO stage 2 sums every pass's blocks as its backward leaves them: the same passes on
        // every rank, never merged, in the sequential schedule.
        let every_pass = sum.as_ref().is_some_and(|s| s.every_pass());
        let groups = if every_pass {
            (0..dims.len()).map(|i| i..i + 1).collect()
        } else {
            self.merge
                .groups(&dims, self.cfg.pad_to_multiple_of.unwrap_or(1))
        };
        let seed = crate::nn::dropout::mix(self.cfg.seed, self.state.global_step as u64);
        // One batch per pass (a group of micro-batches merged into one), each keyed for dropout.
        let mut passes = Vec::with_capacity(groups.len());
        for g in groups {
            let merged = g.len() > 1;
            let ex: Vec<&Example> = examples[g].iter().flatten().copied().collect();
            let batch = collate(&ex, self.pad_id, self.cfg.pad_to_multiple_of, &self.device)?;
            let key = crate::nn::dropout::Key {
                key: seed,
                first_row,
            };
            first_row += ex.len() as u64;
            passes.push((batch, key, merged));
        }
        let largest = passes
            .iter()
            .map(|(b, _, _)| b.input_ids.elem_count())
            .max()
            .unwrap_or(0);
        let denom = window_tokens.max(1) as f64;
        let recompute = self.cfg.gradient_checkpointing;
        let mut grads = match &sum {
            Some(s) => s.grads(&self.params)?,
            None => self.params.zero_grads()?,
        };
        let losses: Vec<Tensor> = if let Some(stages) = self
            .pipeline
            .as_ref()
            .filter(|_| passes.len() > 1 && !every_pass)
        {
            // The model over several GPUs: the passes in a pipeline (sums start at the end).
            let keyed: Vec<_> = passes.iter().map(|(b, k, _)| (b, *k)).collect();
            super::engine::window_pipelined(
                &self.model,
                &keyed,
                denom,
                recompute,
                stages,
                &mut grads,
            )
            .map_err(|e| self.out_of_memory_hint(e, passes[0].0.input_ids.dims()))?
            .into_iter()
            .map(|o| crate::device::to(&o.loss, &self.device))
            .collect::<candle_core::Result<_>>()?
        } else {
            let mut sum = sum;
            let last = passes.len().saturating_sub(1);
            let mut losses = Vec::with_capacity(passes.len());
            for (i, (batch, key, m)) in passes.iter().enumerate() {
                *merged = *m;
                let mut none = NoHook;
                let hook: &mut dyn super::engine::BlockHook = match sum.as_deref_mut() {
                    Some(s) if every_pass || (i == last && !m) => s,
                    _ => &mut none,
                };
                let out = micro_step(&self.model, batch, denom, *key, recompute, &mut grads, hook)
                    .map_err(|e| self.out_of_memory_hint(e, batch.input_ids.dims()))?;
                losses.push(out.loss);
            }
            losses
        };
        let mut losses = losses.into_iter();
        let first = losses
            .next()
            .ok_or_else(|| Error::InvalidArgument("an empty accumulation window".into()))?;
        let loss = losses.try_fold(first, |a, l| a.add(&l))?;
        Ok((grads, loss, largest))
    }

    /// Turns a device out-of-memory error into one that says what to reduce.
    fn out_of_memory_hint(&self, e: Error, dims: &[usize]) -> Error {
        if !is_out_of_memory(&e) {
            return e;
        }
        let text = e.to_string();
        Error::InvalidArgument(format!(
            "out of memory at step {} on a batch of {:?} (examples x tokens): lower `per_device_train_batch_size` \
             (raise `gradient_accumulation_steps` to keep the effective batch of {}), lower `max_length` in `data::sft`, \
             or set `gradient_checkpointing: true`{}; the device said: {text}",
            self.state.global_step + 1,
            dims,
            self.cfg.per_device_train_batch_size * self.cfg.gradient_accumulation_steps,
            if self.cfg.gradient_checkpointing {
                " (already on)"
            } else {
                ""
            },
        ))
    }

    /// Reads the losses and gradient norms of the steps not read yet (one transfer), checks
    /// them, and returns those of the last step.
    fn flush(&mut self) -> Result<(f64, f64)> {
        if self.pending.is_empty() {
            return Ok(self
                .losses
                .last()
                .zip(self.last_grad_norm)
                .map_or((0.0, 0.0), |(l, g)| (l.1, g)));
        }
        let mut parts = Vec::with_capacity(self.pending.len() * 2);
        for p in &self.pending {
            // The loss lies on the head's device, the norm on the first gradient buffer's.
            parts.push(p.loss.reshape(1)?.to_device(&self.device)?);
            parts.push(p.grad_norm.reshape(1)?.to_device(&self.device)?);
        }
        let values = Tensor::cat(&parts, 0)?.to_vec1::<f32>()?;
        let mut last = (0.0, 0.0);
        for (p, v) in self.pending.drain(..).zip(values.chunks(2)) {
            let (loss, norm) = (f64::from(v[0]), f64::from(v[1]));
            if !loss.is_finite() || !norm.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "the loss is {loss} (gradient norm {norm}) at step {} (examples {:?}); lower `learning_rate` or check the data",
                    p.step, p.window
                )));
            }
            self.losses.push((p.step, loss));
            self.window_log.push((loss, norm));
            self.last_grad_norm = Some(norm);
            last = (loss, norm);
        }
        Ok(last)
    }

    /// The loss and gradient norm of the last step, read back now if they were not yet.
    pub fn read_step(&mut self) -> Result<(f64, f64)> {
        self.flush()
    }

    fn record(&mut self, rec: &serde_json::Value) -> Result<()> {
        if let Some(m) = &mut self.metrics {
            writeln!(m, "{rec}").map_err(|e| Error::io(self.out_dir.join("metrics.jsonl"), e))?;
        }
        if let Some(tb) = &mut self.tensorboard {
            tb.log(rec)?;
        }
        self.state.log_history.push(rec.clone());
        Ok(())
    }

    /// Mean token loss on the eval dataset.
    pub fn evaluate(&self) -> Result<f64> {
        let data = self
            .eval
            .as_deref()
            .ok_or_else(|| Error::InvalidArgument("no eval dataset was given".into()))?;
        evaluate(&self.model, data, &self.cfg, self.pad_id)
    }

    /// Writes `checkpoint-{step}` (atomically) and applies `save_total_limit`.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        self.flush()?;
        // Under ZeRO rank 0 gathers every rank's share of the moments first.
        let gathered = self.gathered_moments()?;
        if !self.lead() {
            // Rank 0 writes it.
            return Ok(self
                .out_dir
                .join(format!("checkpoint-{}", self.state.global_step)));
        }
        let path = checkpoint::save(
            &self.out_dir,
            &self.model,
            &self.params,
            gathered.as_ref().unwrap_or(&self.opt),
            &self.state,
        )?;
        if let Some(limit) = self.cfg.save_total_limit {
            let keep = self
                .state
                .best_model_checkpoint
                .as_deref()
                .filter(|_| self.cfg.load_best_model_at_end);
            checkpoint::rotate(&self.out_dir, limit, keep)?;
        }
        self.last_checkpoint = Some(path.clone());
        Ok(path)
    }

    /// Ends the run: restores the best checkpoint if asked, writes the plot (`loss.png`, `loss.svg`), returns the report.
    pub fn finish(mut self, interrupted: bool) -> Result<TrainReport> {
        self.flush()?;
        if let Some(g) = &self.dist {
            // Every rank waits for rank 0's last evaluation and checkpoint, and takes its best.
            let mut best = self
                .state
                .best_model_checkpoint
                .clone()
                .unwrap_or_default()
                .into_bytes();
            g.broadcast(&mut best)?;
            let best = String::from_utf8_lossy(&best).into_owned();
            self.state.best_model_checkpoint = (!best.is_empty()).then_some(best);
        }
        let mut loaded_best = false;
        if self.cfg.load_best_model_at_end
            && let Some(best) = &self.state.best_model_checkpoint
        {
            let dir = self.out_dir.join(best);
            if dir.is_dir() {
                checkpoint::restore(&dir, &self.model, &self.params, &mut self.opt)?;
                loaded_best = true;
            }
        }
        let best = self
            .state
            .best_model_checkpoint
            .clone()
            .zip(self.state.best_metric);
        if self.lead() {
            super::plot::write(&self.out_dir, &self.state.log_history)?;
        }
        let runtime = self.started.elapsed().as_secs_f64().max(1e-9);
        Ok(TrainReport {
            steps: self.state.global_step,
            losses: self.losses,
            log_history: self.state.log_history,
            tokens_per_second: self.tokens_seen as f64 / runtime,
            examples_per_second: self.examples_seen as f64 / runtime,
            train_runtime: runtime,
            interrupted,
            last_checkpoint: self.last_checkpoint,
            peak_device_bytes: crate::device::pool(self.model.decoder.device()).map(|p| p.peak),
            best,
            loaded_best,
            model: self.model,
        })
    }
}

/// A buffer of `len` elements (f32, on `share`'s device) from every rank's `share` of it, rank r's
/// at its own `start`: each rank contributes zeros elsewhere and the ranks sum.
fn sum_shares(g: &crate::dist::Group, len: usize, start: usize, share: &Tensor) -> Result<Tensor> {
    let mut host = vec![0f32; len];
    let mine = share.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    host[start..start + mine.len()].copy_from_slice(&mine);
    g.all_reduce_sum(&mut host)?;
    Ok(Tensor::from_vec(host, len, share.device())?)
}

/// The stages of a model placed over several GPUs (its blocks' runs per GPU), whose windows run
/// in a pipeline; `None` on one device, or when a stage lies on the CPU (its work blocks the host:
/// nothing would run at once).
fn pipeline_stages(model: &Model) -> Option<Vec<std::ops::Range<usize>>> {
    model
        .placement
        .as_ref()
        .and_then(crate::plan::Placement::pipeline_stages)
}

/// The remaining accumulation windows of `state`'s epoch over examples of `lengths` (each a
/// list of micro-batches of example indices); when the epoch is used up, moves to the next one.
pub(super) fn next_windows(
    lengths: &[usize],
    cfg: &TrainConfig,
    micro_per_epoch: usize,
    state: &mut TrainerState,
) -> Vec<Vec<Vec<usize>>> {
    // One micro-batch for all ranks: each takes its share (see `Trainer::step`).
    let batch = cfg.per_device_train_batch_size * crate::dist::planned_size();
    for _ in 0..2 {
        let order = epoch_order(
            lengths,
            batch,
            cfg.group_by_length,
            cfg.seed,
            state.epoch as u64,
        );
        let micro: Vec<Vec<usize>> = order.chunks(batch).map(<[usize]>::to_vec).collect();
        let k = cfg.gradient_accumulation_steps;
        let full_windows_only = micro_per_epoch >= k;
        let out: Vec<Vec<Vec<usize>>> = micro
            .chunks(k)
            .scan(0usize, |consumed, w| {
                let start = *consumed;
                *consumed += w.len();
                Some((start, w))
            })
            .filter(|(start, w)| {
                *start >= state.micro_in_epoch && (!full_windows_only || w.len() == k)
            })
            .map(|(_, w)| w.to_vec())
            .collect();
        if !out.is_empty() {
            return out;
        }
        state.epoch += 1;
        state.micro_in_epoch = 0;
    }
    Vec::new()
}

/// Trains `model` on `train` (and evaluates on `eval`), reporting through `on_event`. Ctrl-C
/// (`cancel`) saves a checkpoint at the next step boundary and stops.
pub fn fit(
    model: &Model,
    train: &[Example],
    eval: Option<&[Example]>,
    cfg: &TrainConfig,
    pad_id: u32,
    cancel: &CancelToken,
    on_event: &mut dyn FnMut(&Event) -> Result<()>,
) -> Result<TrainReport> {
    let mut t = Trainer::new(
        model,
        Arc::new(train.to_vec()),
        eval.map(|e| Arc::new(e.to_vec())),
        cfg,
        pad_id,
    )?;
    // Rank 0 alone reports (the others' progress is the same).
    let lead = t.lead();
    let mut on_event = |e: &Event| if lead { on_event(e) } else { Ok(()) };
    on_event(&t.start_event())?;
    while !t.is_done() {
        let windows = t.windows();
        if windows.is_empty() {
            break;
        }
        for w in windows {
            if t.should_stop(cancel)? {
                let path = t.save_checkpoint()?;
                on_event(&Event::Saved(path))?;
                return t.finish(true);
            }
            let out = t.step(&w)?;
            for e in &out.events {
                on_event(e)?;
            }
            if out.done {
                break;
            }
        }
    }
    t.finish(false)
}

/// Makes `metrics.jsonl` this run's: a fresh run (`resumed_at` 0) starts it empty, a resumed one
/// keeps the records up to its checkpoint's step (a later, abandoned stretch is dropped).
fn own_metrics(path: &Path, resumed_at: usize) -> Result<()> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err(Error::Sandbox(format!(
            "`{}` is a symbolic link or not a file; the run's metrics are not written through it",
            path.display()
        )));
    }
    let kept = if resumed_at == 0 {
        String::new()
    } else {
        let old = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(path, e)),
        };
        let mut kept = String::new();
        for l in old.lines().filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|r| r.get("step").and_then(serde_json::Value::as_u64))
                .is_some_and(|s| s as usize <= resumed_at)
        }) {
            kept.push_str(l);
            kept.push('\n');
        }
        kept
    };
    crate::sandbox::write_atomic(path, kept.as_bytes())
}

pub(super) fn resume_dir(cfg: &TrainConfig, out: &Path) -> Result<Option<PathBuf>> {
    match &cfg.resume_from_checkpoint {
        None | Some(serde_json::Value::Null | serde_json::Value::Bool(false)) => Ok(None),
        Some(serde_json::Value::Bool(true)) => match checkpoint::list(out).pop() {
            Some((_, p)) => Ok(Some(p)),
            None => Err(Error::InvalidArgument(format!(
                "`resume_from_checkpoint: true` but there is no checkpoint in `{}`",
                out.display()
            ))),
        },
        Some(serde_json::Value::String(p)) => {
            let p = PathBuf::from(p);
            let p = if p.is_absolute() { p } else { out.join(p) };
            if p.join("trainer_state.json").is_file() {
                Ok(Some(p))
            } else {
                Err(Error::InvalidArgument(format!(
                    "`resume_from_checkpoint`: `{}` is not a checkpoint",
                    p.display()
                )))
            }
        }
        Some(other) => Err(Error::InvalidArgument(format!(
            "`resume_from_checkpoint` must be a path or `true`, got {other}"
        ))),
    }
}
