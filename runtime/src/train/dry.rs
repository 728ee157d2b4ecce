//! A training run in `qscript check`: the [`Trainer`](super::Trainer)'s plan, batches and step
//! counting with nothing computed, allocated or written, so a custom loop (`train::trainer` and
//! `t.step`) runs through to its end in seconds and every option and index it uses is checked.

use std::path::PathBuf;
use std::sync::Arc;

use crate::data::sft::Example;
use crate::model::Model;
use crate::{Error, Result};

use super::TrainConfig;
use super::checkpoint::TrainerState;
use super::plan::{RunPlan, plan};
use super::schedule::Schedule;

/// See the module doc.
#[derive(Debug)]
pub struct DryTrainer {
    model: Model,
    cfg: TrainConfig,
    plan: RunPlan,
    sched: Schedule,
    state: TrainerState,
    lengths: Vec<usize>,
    has_eval: bool,
}

impl DryTrainer {
    /// The plan of the run [`super::Trainer::new`] would start (a resumed run starts at its
    /// checkpoint's step, read from its `trainer_state.json`).
    pub fn new(
        model: &Model,
        train: Arc<Vec<Example>>,
        eval: Option<&[Example]>,
        cfg: &TrainConfig,
    ) -> Result<Self> {
        let (plan, train) = plan(model, train, eval, cfg)?;
        let sched = Schedule::new(
            &cfg.lr_scheduler_type,
            cfg.learning_rate,
            cfg.warmup(plan.total_steps),
            plan.total_steps,
        )?;
        let mut state = match &plan.resume_from {
            Some(dir) => crate::error::read_config(&dir.join("trainer_state.json"))?,
            None => TrainerState::default(),
        };
        state.max_steps = plan.total_steps;
        Ok(Self {
            model: model.clone(),
            cfg: cfg.clone(),
            sched,
            state,
            lengths: train.iter().map(|e| e.input_ids.len()).collect(),
            has_eval: eval.is_some_and(|e| !e.is_empty()),
            plan,
        })
    }

    /// The plan.
    pub fn plan(&self) -> &RunPlan {
        &self.plan
    }

    /// The model as given (nothing is trained).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Steps counted so far.
    pub fn global_step(&self) -> usize {
        self.state.global_step
    }

    /// Steps planned.
    pub fn total_steps(&self) -> usize {
        self.plan.total_steps
    }

    /// Whether every planned step was counted.
    pub fn is_done(&self) -> bool {
        self.state.global_step >= self.plan.total_steps
    }

    /// The windows the real run would give (see [`super::Trainer::windows`]).
    pub fn windows(&mut self) -> Vec<Vec<Vec<usize>>> {
        if self.is_done() {
            return Vec::new();
        }
        super::trainer::next_windows(
            &self.lengths,
            &self.cfg,
            self.plan.micro_per_epoch,
            &mut self.state,
        )
    }

    /// Checks `window` as [`super::Trainer::step`] does and counts the step; returns the step
    /// number, its learning rate and whether the run is done.
    pub fn step(&mut self, window: &[Vec<usize>]) -> Result<(usize, f64, bool)> {
        if self.is_done() {
            return Err(Error::InvalidArgument(format!(
                "training is done: all {} steps have run",
                self.plan.total_steps
            )));
        }
        if let Some(i) = window.iter().flatten().find(|&&i| i >= self.lengths.len()) {
            return Err(Error::InvalidArgument(format!(
                "example {i} is out of range"
            )));
        }
        let lr = self.sched.lr(self.state.global_step);
        self.state.global_step += 1;
        self.state.micro_in_epoch += window.len();
        Ok((self.state.global_step, lr, self.is_done()))
    }

    /// What [`super::Trainer::evaluate`] needs: an eval dataset.
    pub fn check_evaluate(&self) -> Result<()> {
        if self.has_eval {
            Ok(())
        } else {
            Err(Error::InvalidArgument("no eval dataset was given".into()))
        }
    }

    /// The checkpoint directory [`super::Trainer::save_checkpoint`] would write now.
    pub fn checkpoint_path(&self) -> PathBuf {
        PathBuf::from(&self.cfg.output_dir).join(format!("checkpoint-{}", self.state.global_step))
    }
}
