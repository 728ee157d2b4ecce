//! What happens around the steps, driven by the loop's events: each callback sees every step
//! ([`Callback::on_step`]), every checkpoint written ([`Callback::on_save`]) and the end of the
//! run ([`Callback::on_end`]), in the order the loop holds them:
//!
//! - [`logger::Logger`]: the log record at the logging cadence (losses, norm, rate, speed);
//! - [`evaluation::Evaluator`]: the eval loss at the eval cadence, and the best so far;
//! - [`early_stopping::EarlyStopping`]: stops after `early_stopping_patience` evals without a
//!   better one;
//! - [`metrics::Metrics`]: `metrics.jsonl`, TensorBoard, the log history, the loss plot;
//! - [`checkpointer::Checkpointer`]: the output dir's lock, checkpoints at the save cadence and
//!   for a new best, rotation, loading the best at the end;
//! - [`publish::Publisher`]: the weights after each step to a reader (a server), when asked
//!   ([`super::Trainer::add_callback`]).
//!
//! The progress printer is the caller's (`on_event` of [`super::fit()`], or the step outcome's
//! events). A dry run (`qscript check`) has no callbacks: it writes nothing.

pub mod checkpointer;
pub mod early_stopping;
pub mod evaluation;
pub mod logger;
pub mod metrics;
pub mod publish;

use std::path::{Path, PathBuf};

use super::TrainConfig;
use super::checkpoint::TrainerState;
use super::collective::Collective;
use super::executor::Executor;
use super::readback::Readback;
use crate::Result;
use crate::data::sft::Example;

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

/// The loop as a callback sees it: the step just taken and what the callbacks before this one
/// made of it.
pub struct Run<'a> {
    /// Steps done, this one included.
    pub step: usize,
    /// Steps planned.
    pub total: usize,
    /// The learning rate of this step.
    pub lr: f64,
    /// Epochs done, with the fraction of the current one.
    pub epoch: f64,
    /// Tokens (padding excluded) of this step's window, every rank's.
    pub tokens: usize,
    /// Whether this step ends an epoch (for `eval_strategy` / `save_strategy: "epoch"`).
    pub epoch_end: bool,
    /// The options.
    pub cfg: &'a TrainConfig,
    /// Where the run writes.
    pub out_dir: &'a Path,
    /// The state checkpoints keep.
    pub state: &'a mut TrainerState,
    /// What computes.
    pub exec: &'a mut dyn Executor,
    /// The ranks.
    pub collective: &'a dyn Collective,
    /// The eval dataset.
    pub eval: Option<&'a [Example]>,
    /// The steps' losses and gradient norms, as read back from the device.
    pub readback: &'a mut Readback,
    /// This step's events so far (the loop's `Step` first).
    pub events: &'a mut Vec<Event>,
    /// Whether this step evaluated and found a new best (`None`: no evaluation).
    pub improved: Option<bool>,
    /// Whether the run should stop after this step (the ranks agree on it after the callbacks;
    /// see [`Callback::may_stop`]).
    pub stop: bool,
    /// At the end: whether the model now holds the best checkpoint's weights.
    pub loaded_best: bool,
}

/// See the module doc.
pub trait Callback: Send {
    /// After each optimizer step.
    fn on_step(&mut self, run: &mut Run<'_>) -> Result<()>;

    /// After a checkpoint was written at `path`, by a callback or when asked (a script's
    /// `t.save_checkpoint()`, Ctrl-C).
    fn on_save(&mut self, run: &mut Run<'_>, path: &Path) -> Result<()> {
        let _ = (run, path);
        Ok(())
    }

    /// At the end of the run (every step done, early stopping, or Ctrl-C), in the reverse of
    /// the steps' order (the checkpointer loads the best weights before the metrics draw the
    /// plot), after every rank took rank 0's best checkpoint.
    fn on_end(&mut self, run: &mut Run<'_>) -> Result<()> {
        let _ = run;
        Ok(())
    }

    /// Whether this callback may ask the run to stop ([`Run::stop`]): the ranks then agree on
    /// it after each step (every rank stops at the same step).
    fn may_stop(&self) -> bool {
        false
    }
}
