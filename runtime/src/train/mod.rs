//! Training: HF TrainingArguments semantics (batches, accumulation, AdamW, schedules, clipping,
//! logging, eval, checkpoints, resume) over the decoder, for LoRA adapters or full fine-tuning.
//!
//! - the loop: [`trainer`] (one step: window -> executor -> events to the callbacks), [`fit`](mod@fit)
//!   (a whole run), [`sampler`] (the examples as trained, each epoch's windows), [`readback`]
//!   (the steps' losses, read back from the device at the logging cadence);
//! - the plan: [`plan`] (every check, the step arithmetic, the memory estimate; made once);
//! - the seams: [`executor`] ([`compute`] does the work, [`dry`] computes nothing, for `qscript
//!   check`), [`objective`] (the loss over the final hidden states), [`callbacks`] (logging,
//!   evaluation, early stopping, metrics, checkpoints), [`collective`] (the ranks' sums, ZeRO);
//! - the work: [`engine`] (forward, loss and backward of a micro-batch, block by block),
//!   [`flat`] (the trainable tensors as flat buffers), [`optim`] (AdamW, clipping), [`merge`]
//!   (micro-batches merged into fewer passes), [`schedule`] (learning rates);
//! - the files: [`config`] (the options), [`checkpoint`], [`tensorboard`], [`plot`].

mod block_inputs;
pub mod callbacks;
pub mod checkpoint;
pub mod collective;
pub mod compute;
pub mod config;
pub mod dry;
pub mod engine;
pub mod executor;
pub mod fit;
pub mod flat;
pub mod merge;
pub mod objective;
pub mod optim;
pub mod plan;
pub mod plot;
pub mod preference;
pub mod readback;
pub mod sampler;
pub mod schedule;
pub mod tensorboard;
pub mod trainer;

pub use config::{Checkpointing, TrainConfig};
pub use fit::fit;
pub use trainer::{Event, Mode, StepOutcome, TrainReport, Trainer};
