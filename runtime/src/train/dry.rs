//! The executor of `qscript check`: it computes, allocates and writes nothing, so a run (and a
//! custom loop: `train::trainer` and `t.step`) goes through the real loop, plan and step
//! arithmetic to its end in seconds, with every option and index it uses checked.

use std::path::{Path, PathBuf};

use super::checkpoint::TrainerState;
use super::executor::{Evaluation, Executor, StepAt, StepOut};
use crate::Result;
use crate::data::sft::Example;
use crate::model::Model;

/// See the module doc.
#[derive(Debug)]
pub struct DryRun {
    model: Model,
}

impl DryRun {
    /// A dry run of training `model` (as given: it may have no weights loaded).
    pub fn new(model: &Model) -> Self {
        Self {
            model: model.clone(),
        }
    }
}

impl Executor for DryRun {
    fn model(&self) -> &Model {
        &self.model
    }

    fn snapshot(&self) -> Result<Model> {
        Ok(self.model.clone())
    }

    fn into_model(self: Box<Self>) -> Model {
        self.model
    }

    fn step(&mut self, _: &[Vec<&Example>], _: StepAt) -> Result<Option<StepOut>> {
        Ok(None)
    }

    fn evaluate(&self, _: &[Example]) -> Result<Option<Evaluation>> {
        Ok(None)
    }

    fn sharded(&self) -> bool {
        false
    }

    fn save(&mut self, out_dir: &Path, state: &TrainerState) -> Result<(PathBuf, bool)> {
        Ok((
            out_dir.join(format!("checkpoint-{}", state.global_step)),
            false,
        ))
    }

    /// The state a resumed run starts from, read from the checkpoint's `trainer_state.json`.
    fn restore(&mut self, dir: &Path) -> Result<TrainerState> {
        crate::files::read_config(&dir.join("trainer_state.json"))
    }

    fn peak_device_bytes(&self) -> Option<u64> {
        None
    }
}
