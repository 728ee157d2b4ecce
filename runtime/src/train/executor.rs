//! What runs a training step: the one seam between the loop and the device. [`Compute`] does
//! the work (the engine's forward and backward, the ranks' gradient sum, the optimizer, the
//! checkpoint files); [`DryRun`] computes, allocates and writes nothing, so `qscript check`
//! goes through the same loop, the same plan and the same step arithmetic as a real run.
//!
//! [`Compute`]: super::compute::Compute
//! [`DryRun`]: super::dry::DryRun

use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::checkpoint::TrainerState;
use crate::Result;
use crate::data::sft::Example;
use crate::model::Model;

/// One optimizer step's position in the run.
#[derive(Clone, Copy, Debug)]
pub struct StepAt {
    /// Optimizer steps done before this one.
    pub step: usize,
    /// The learning rate of this step.
    pub lr: f64,
}

/// What a computed step leaves on the device (read back at the logging cadence).
#[derive(Debug)]
pub struct StepOut {
    /// The window's loss, an f32 scalar.
    pub loss: Tensor,
    /// The gradient norm before clipping, an f32 scalar.
    pub grad_norm: Tensor,
    /// The objective's metrics over the window: `(name, sum, count)` (this rank's share).
    pub metrics: super::objective::Metrics,
}

/// What an evaluation gives: the mean loss, and the objective's metrics (`(name, sum, count)`).
#[derive(Debug)]
pub struct Evaluation {
    /// The mean loss over the eval set.
    pub loss: f64,
    /// The objective's metrics over the eval set.
    pub metrics: super::objective::Metrics,
}

/// See the module doc.
pub trait Executor: Send {
    /// The model being trained (a real step updates its trainable tensors in place).
    fn model(&self) -> &Model;

    /// A copy of the model as trained so far, which later steps do not change.
    fn snapshot(&self) -> Result<Model>;

    /// The model, at the end of the run.
    fn into_model(self: Box<Self>) -> Model;

    /// One optimizer step over `window` (micro-batches of examples); `None` when nothing was
    /// computed.
    fn step(&mut self, window: &[Vec<&Example>], at: StepAt) -> Result<Option<StepOut>>;

    /// The mean loss over `data` (and the objective's metrics); `None` when nothing was computed.
    fn evaluate(&self, data: &[Example]) -> Result<Option<Evaluation>>;

    /// Whether the optimizer state is sharded over the ranks (ZeRO): every rank then takes part
    /// in each checkpoint.
    fn sharded(&self) -> bool;

    /// Writes `checkpoint-{step}` of `state` in `out_dir` (rank 0; the other ranks send their
    /// shares) and returns its path, with whether anything was written.
    fn save(&mut self, out_dir: &Path, state: &TrainerState) -> Result<(PathBuf, bool)>;

    /// Restores the checkpoint `dir` and returns its trainer state.
    fn restore(&mut self, dir: &Path) -> Result<TrainerState>;

    /// The most device memory live tensors held (`None` on the CPU, or when nothing ran).
    fn peak_device_bytes(&self) -> Option<u64>;
}
