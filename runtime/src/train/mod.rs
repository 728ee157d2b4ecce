//! Training: HF TrainingArguments semantics (batches, accumulation, AdamW, schedules, clipping,
//! logging, eval, checkpoints, resume) over the decoder, for LoRA adapters or full fine-tuning.

pub mod checkpoint;
pub mod config;
pub mod dry;
pub mod engine;
pub mod flat;
pub mod grad_sum;
pub mod merge;
pub mod optim;
pub mod plan;
pub mod plot;
pub mod schedule;
pub mod tensorboard;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::{Event, StepOutcome, TrainReport, Trainer, fit};
