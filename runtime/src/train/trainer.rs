//! The training loop, and only the loop: each step takes a window of micro-batches, hands it to
//! the [executor](super::executor) (the engine's passes, the ranks' gradient sum, the optimizer)
//! and then tells the [callbacks](super::callbacks) (logging, evaluation, early stopping,
//! metrics, checkpoints). The loss of an accumulation window is the objective's sum over its
//! normalizer for the whole window, so accumulating k micro-batches equals one batch k times
//! larger. The run is planned once ([`super::plan`]); a real run and `qscript check` are this
//! same loop with a different executor.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::callbacks::checkpointer::Checkpointer;
use super::callbacks::early_stopping::EarlyStopping;
use super::callbacks::evaluation::Evaluator;
use super::callbacks::logger::Logger;
use super::callbacks::metrics::Metrics;
use super::callbacks::{Callback, Run};
use super::checkpoint::TrainerState;
use super::collective::Collective;
use super::compute::Compute;
use super::config::TrainConfig;
use super::dry::DryRun;
use super::executor::{Executor, StepAt};
use super::objective::Objective;
use super::plan::{RunData, RunPlan};
use super::readback::Readback;
use super::schedule::Schedule;
use crate::cancel::CancelToken;
use crate::data::sft::Example;
use crate::model::Model;
use crate::{Error, Result};

pub use super::callbacks::Event;
pub use super::compute::{evaluate, snapshot};

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

/// How a run executes: for real, or as `qscript check`'s dry run (nothing computed, allocated
/// or written).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Train.
    Train,
    /// Plan and count only.
    Check,
}

/// A training run driven one optimizer step at a time: what `fit` loops over, and what scripts
/// use for custom loops (`train::trainer`). Each step follows the config: logging, eval and
/// checkpoints happen inside [`Trainer::step`] and come back as events.
pub struct Trainer {
    exec: Box<dyn Executor>,
    callbacks: Vec<Box<dyn Callback>>,
    collective: Arc<dyn Collective>,
    cfg: TrainConfig,
    plan: RunPlan,
    sched: Schedule,
    state: TrainerState,
    train: Arc<Vec<Example>>,
    eval: Option<Arc<Vec<Example>>>,
    lengths: Vec<usize>,
    out_dir: PathBuf,
    readback: Readback,
    tokens_seen: usize,
    examples_seen: usize,
    started: Instant,
    stopped_early: bool,
    last_checkpoint: Option<PathBuf>,
}

/// Where the loop stands when it calls its callbacks.
#[derive(Clone, Copy, Debug)]
struct At {
    step: usize,
    lr: f64,
    epoch: f64,
    tokens: usize,
    epoch_end: bool,
}

/// What the callbacks decided.
#[derive(Clone, Copy, Debug)]
struct Ends {
    stop: bool,
    loaded_best: bool,
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
    /// Prepares a run in this process's environment (its ranks, if any): fresh trainable copies,
    /// optimizer, schedule, `output_dir`, and the checkpoint to resume from, if asked.
    pub fn new(
        model: &Model,
        train: Arc<Vec<Example>>,
        eval: Option<Arc<Vec<Example>>>,
        cfg: &TrainConfig,
        pad_id: u32,
    ) -> Result<Self> {
        model.needs_weights("training")?;
        let collective = super::collective::from_env(model)?;
        let data = RunData::new(train, eval);
        Self::start(
            model,
            data,
            cfg,
            pad_id,
            collective,
            Arc::new(super::objective::CausalLm),
            Mode::Train,
        )
    }

    /// Plans the run (every check, once) and prepares it to execute as `mode` says, over the
    /// ranks of `collective`, minimizing `objective`.
    pub fn start(
        model: &Model,
        data: RunData,
        cfg: &TrainConfig,
        pad_id: u32,
        collective: Arc<dyn Collective>,
        objective: Arc<dyn Objective>,
        mode: Mode,
    ) -> Result<Self> {
        let (plan, train) = super::plan::plan(model, &data, cfg, collective.size())?;
        // With `auto_fit` or `gradient_checkpointing: "auto"`, the options the plan chose.
        let fitted = plan.fitted.as_ref().map(|(c, _)| c.as_ref().clone());
        let cfg = fitted.as_ref().unwrap_or(cfg);
        let out_dir = PathBuf::from(&cfg.output_dir);
        let lead = collective.lead();
        let writes = mode == Mode::Train;
        let checkpointer = writes
            .then(|| Checkpointer::open(&out_dir, lead))
            .transpose()?;
        let mut exec: Box<dyn Executor> = match mode {
            Mode::Train => Box::new(Compute::new(
                model,
                cfg,
                pad_id,
                collective.clone(),
                objective,
            )?),
            Mode::Check => Box::new(DryRun::new(model)),
        };
        let total = plan.total_steps;
        let sched = plan.schedule.clone();
        let mut plan = plan;
        if checkpointer.is_some() && plan.resume_from.is_some() {
            // Resolved again now that the output dir is recovered (a checkpoint a killed save
            // had moved aside is back in place).
            plan.resume_from =
                super::checkpoint::resume_dir(cfg.resume_from_checkpoint.as_ref(), &out_dir)?;
        }
        let mut state = match &plan.resume_from {
            Some(dir) => exec.restore(dir)?,
            None => TrainerState::default(),
        };
        state.max_steps = total;
        // HF's TrainerState carries the run's cadences and sizes, for HF tooling.
        state.num_train_epochs = total.div_ceil(plan.steps_per_epoch.max(1));
        state.logging_steps = cfg.logging_steps;
        state.eval_steps = cfg.eval_steps.unwrap_or(cfg.logging_steps);
        state.save_steps = cfg.save_steps;
        state.train_batch_size = cfg.per_device_train_batch_size;
        let mut callbacks: Vec<Box<dyn Callback>> = Vec::new();
        if let Some(checkpointer) = checkpointer {
            if lead {
                // Rank 0 alone logs, evaluates and writes the metrics.
                callbacks.push(Box::new(Logger::new()));
                callbacks.push(Box::new(Evaluator));
            }
            callbacks.push(Box::new(EarlyStopping {
                patience: cfg.early_stopping_patience,
            }));
            if lead {
                let m = Metrics::open(&out_dir, cfg, plan.tensorboard, state.global_step)?;
                callbacks.push(Box::new(m));
            }
            callbacks.push(Box::new(checkpointer));
        }
        let lengths = train.iter().map(Example::row_len).collect();
        let readback = Readback::new(exec.model().decoder.device().clone());
        Ok(Self {
            exec,
            callbacks,
            collective,
            cfg: cfg.clone(),
            plan,
            sched,
            state,
            train,
            eval: data.eval,
            lengths,
            out_dir,
            readback,
            tokens_seen: 0,
            examples_seen: 0,
            started: Instant::now(),
            stopped_early: false,
            last_checkpoint: None,
        })
    }

    /// Adds `callback` after the run's own (a publisher of the weights to a server, for one).
    pub fn add_callback(&mut self, callback: Box<dyn Callback>) {
        self.callbacks.push(callback);
    }

    /// Whether `cancel` (Ctrl-C) stops the run now: on any rank, for every rank at the same step.
    pub fn should_stop(&self, cancel: &CancelToken) -> Result<bool> {
        self.collective.any(cancel.is_cancelled())
    }

    /// Whether this process writes and reports: rank 0, or the only process.
    pub fn lead(&self) -> bool {
        self.collective.lead()
    }

    /// The plan, as `Event::Start`.
    pub fn start_event(&self) -> Event {
        Event::Start {
            examples: self.train.len(),
            // As HF prints it: with `max_steps`, the epochs those steps take.
            epochs: self.plan.epochs,
            total_batch: self.plan.total_batch(),
            total_steps: self.plan.total_steps,
            trainable: self.plan.trainable,
            resumed_at: self.state.global_step,
            memory: self.plan.memory.total(),
        }
    }

    /// The plan the run started from (steps, memory estimate, placement).
    pub fn plan(&self) -> &RunPlan {
        &self.plan
    }

    /// Optimizer steps done.
    pub fn global_step(&self) -> usize {
        self.state.global_step
    }

    /// Optimizer steps planned.
    pub fn total_steps(&self) -> usize {
        self.plan.total_steps
    }

    /// Whether training is over (all steps done, or early stopping).
    pub fn is_done(&self) -> bool {
        self.stopped_early || self.state.global_step >= self.plan.total_steps
    }

    /// The model being trained (each step updates its trainable tensors in place).
    pub fn model(&self) -> &Model {
        self.exec.model()
    }

    /// A copy of the model as trained so far (later steps do not change it).
    pub fn snapshot(&self) -> Result<Model> {
        self.exec.snapshot()
    }

    /// The remaining accumulation windows of the current epoch (each a list of micro-batches of
    /// example indices); when the epoch is used up, moves to the next one. Empty when done.
    pub fn windows(&mut self) -> Vec<Vec<Vec<usize>>> {
        if self.is_done() {
            return Vec::new();
        }
        super::sampler::next_windows(
            &self.lengths,
            &self.cfg,
            self.collective.size(),
            self.plan.micro_per_epoch,
            &mut self.state,
        )
    }

    /// One optimizer step on `window` (micro-batches of example indices).
    pub fn step(&mut self, window: &[Vec<usize>]) -> Result<StepOutcome> {
        // A server of this process (a recipe serving the model it trains) waits for the step.
        let _turn = crate::device::turn();
        if self.is_done() {
            return Err(Error::InvalidArgument(format!(
                "training is done: all {} steps have run",
                self.plan.total_steps
            )));
        }
        let train = self.train.clone();
        let examples: Vec<Vec<&Example>> = window
            .iter()
            .map(|ix| {
                ix.iter()
                    .map(|&i| {
                        train.get(i).ok_or_else(|| {
                            Error::InvalidArgument(format!("example {i} is out of range"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?;
        let lr = self.sched.lr(self.state.global_step);
        let at = StepAt {
            step: self.state.global_step,
            lr,
        };
        let out = self.exec.step(&examples, at)?;
        let tokens: usize = examples.iter().flatten().map(|e| e.tokens()).sum();
        self.tokens_seen += tokens;
        self.examples_seen += examples.iter().map(Vec::len).sum::<usize>();
        self.state.global_step += 1;
        self.state.micro_in_epoch += window.len();
        let (step, total) = (self.state.global_step, self.plan.total_steps);
        if let Some(out) = out {
            self.readback.push(step, out, window);
        }
        // Every rank reads its losses back at the logging cadence (no step's loss stays on the
        // device for the whole run); rank 0 also before it evaluates or saves.
        let lead = self.lead();
        // Every epoch has `steps_per_epoch` steps (the sampler's windows), resumed or not.
        let epoch_end = step.is_multiple_of(self.plan.steps_per_epoch.max(1));
        let read = if self.cfg.logs_at(step, total)
            || (lead
                && (self.cfg.evaluates_at(step, total, epoch_end)
                    || self.cfg.saves_at(step, total, epoch_end)))
        {
            Some(self.readback.flush()?)
        } else {
            None
        };
        let mut events = vec![Event::Step {
            step,
            total,
            loss: read.map(|r| r.0),
        }];
        let epoch = self.state.epoch as f64
            + self.state.micro_in_epoch as f64 / self.plan.micro_per_epoch.max(1) as f64;
        self.state.epoch_progress = epoch;
        let at = At {
            step,
            lr,
            epoch,
            tokens,
            epoch_end,
        };
        let ends = self.with_callbacks(at, &mut events, |cb, run| cb.on_step(run))?;
        self.stopped_early = ends.stop;
        if self.collective.size() > 1 && self.callbacks.iter().any(|c| c.may_stop()) {
            // Every rank stops at the same step (rank 0's evaluation decides early stopping).
            self.stopped_early = self.collective.any(self.stopped_early)?;
        }
        if let Some(p) = events.iter().rev().find_map(|e| match e {
            Event::Saved(p) => Some(p.clone()),
            _ => None,
        }) {
            self.last_checkpoint = Some(p);
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

    /// The loss and gradient norm of the last step, read back now if they were not yet (NaN in
    /// a dry run).
    pub fn read_step(&mut self) -> Result<(f64, f64)> {
        self.readback.flush()
    }

    /// Mean loss on the eval dataset (NaN in a dry run).
    pub fn evaluate(&self) -> Result<f64> {
        let _turn = crate::device::turn();
        let data = self
            .eval
            .as_deref()
            .ok_or_else(|| Error::InvalidArgument("no eval dataset was given".into()))?;
        Ok(self.exec.evaluate(data)?.map_or(f64::NAN, |e| e.loss))
    }

    /// Writes `checkpoint-{step}` (atomically) and applies `save_total_limit`; returns its path
    /// (in a dry run, the path it would write).
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let step = self.state.global_step;
        Ok(self
            .checkpoint_now()?
            .unwrap_or_else(|| self.out_dir.join(format!("checkpoint-{step}"))))
    }

    /// Writes `checkpoint-{step}` now (Ctrl-C, a script's `t.save_checkpoint()`); its path when
    /// this process wrote it (rank 0 of a real run).
    pub fn checkpoint_now(&mut self) -> Result<Option<PathBuf>> {
        self.readback.flush()?;
        let (path, written) = self.exec.save(&self.out_dir, &self.state)?;
        if !written {
            return Ok(None);
        }
        let at = self.between_steps();
        self.with_callbacks(at, &mut Vec::new(), |cb, run| cb.on_save(run, &path))?;
        self.last_checkpoint = Some(path.clone());
        Ok(Some(path))
    }

    /// Where the run stands between steps (for a save when asked, and the end).
    fn between_steps(&self) -> At {
        At {
            step: self.state.global_step,
            lr: 0.0,
            epoch: self.state.epoch as f64,
            tokens: 0,
            epoch_end: false,
        }
    }

    /// Calls `f` on every callback, in order, with the loop at `at`; `events` collects theirs.
    fn with_callbacks(
        &mut self,
        at: At,
        events: &mut Vec<Event>,
        mut f: impl FnMut(&mut dyn Callback, &mut Run<'_>) -> Result<()>,
    ) -> Result<Ends> {
        let Self {
            exec,
            callbacks,
            collective,
            cfg,
            state,
            eval,
            out_dir,
            readback,
            plan,
            ..
        } = self;
        let mut run = Run {
            step: at.step,
            total: plan.total_steps,
            lr: at.lr,
            epoch: at.epoch,
            tokens: at.tokens,
            epoch_end: at.epoch_end,
            cfg,
            out_dir,
            state,
            exec: exec.as_mut(),
            collective: collective.as_ref(),
            eval: eval.as_deref().map(|e| &e[..]),
            readback,
            events,
            improved: None,
            stop: false,
            loaded_best: false,
        };
        for cb in callbacks.iter_mut() {
            f(cb.as_mut(), &mut run)?;
        }
        Ok(Ends {
            stop: run.stop,
            loaded_best: run.loaded_best,
        })
    }

    /// Ends the run: restores the best checkpoint if asked, writes the plot (`loss.png`,
    /// `loss.svg`), returns the report.
    pub fn finish(mut self, interrupted: bool) -> Result<TrainReport> {
        self.readback.flush()?;
        // Every rank waits for rank 0's last evaluation and checkpoint, and takes its best.
        let mut best = self
            .state
            .best_model_checkpoint
            .clone()
            .unwrap_or_default()
            .into_bytes();
        self.collective.broadcast(&mut best)?;
        let best = String::from_utf8_lossy(&best).into_owned();
        self.state.best_model_checkpoint = (!best.is_empty()).then_some(best);
        let at = self.between_steps();
        self.callbacks.reverse();
        let loaded_best = self
            .with_callbacks(at, &mut Vec::new(), |cb, run| cb.on_end(run))?
            .loaded_best;
        let best = self
            .state
            .best_model_checkpoint
            .clone()
            .zip(self.state.best_metric);
        let runtime = self.started.elapsed().as_secs_f64().max(1e-9);
        Ok(TrainReport {
            steps: self.state.global_step,
            losses: self.readback.losses,
            log_history: self.state.log_history,
            tokens_per_second: self.tokens_seen as f64 / runtime,
            examples_per_second: self.examples_seen as f64 / runtime,
            train_runtime: runtime,
            interrupted,
            last_checkpoint: self.last_checkpoint,
            peak_device_bytes: self.exec.peak_device_bytes(),
            best,
            loaded_best,
            model: self.exec.into_model(),
        })
    }
}
