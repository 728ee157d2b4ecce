//! A training checkpoint's files as a resumed run reads them (`train::checkpoint::restore`):
//! `trainer_state.json` and `optimizer.safetensors`, each fuzzed inside a checkpoint that a
//! LoRA run of the base model saved.

use std::path::PathBuf;

use qscript_runtime::lora;
use qscript_runtime::model::load::Model;
use qscript_runtime::model::lora_config::LoraConfig;
use qscript_runtime::model::tiny::{TinyConfig, tiny};
use qscript_runtime::train::checkpoint::{self, TrainerState};
use qscript_runtime::train::flat::DeviceParams;
use qscript_runtime::train::optim::{AdamWConfig, DeviceAdamW};

use super::{Harness, Outcome, Scratch, Shape, Target, err};

/// The targets of this file.
pub(super) const TARGETS: &[&Target] = &[&TRAINER_STATE, &OPTIMIZER];

/// A saved checkpoint of a LoRA run, and what `restore` restores into.
struct Resume {
    /// Holds the checkpoint directory.
    _scratch: Scratch,
    dir: PathBuf,
    model: Model,
    params: DeviceParams,
    opt: DeviceAdamW,
    file: &'static str,
}

impl Resume {
    fn new(file: &'static str) -> anyhow::Result<Self> {
        let scratch = Scratch::new()?;
        let base = tiny(&TinyConfig {
            hidden: 16,
            layers: 1,
            heads: 2,
            kv_heads: 1,
            intermediate: 24,
            vocab: 64,
            ..TinyConfig::default()
        })?;
        let cfg = LoraConfig {
            r: 2,
            lora_alpha: 4.0,
            ..LoraConfig::default()
        };
        let mut model = lora::attach(&base, &cfg, 0)?;
        let params = DeviceParams::adopt(&mut model)?;
        let opt = DeviceAdamW::new(&params, AdamWConfig::default())?;
        let state = TrainerState {
            global_step: 3,
            max_steps: 10,
            ..TrainerState::default()
        };
        let dir = checkpoint::save(scratch.path(), &model, &params, &opt, &state)?;
        Ok(Self {
            _scratch: scratch,
            dir,
            model,
            params,
            opt,
            file,
        })
    }

    /// The bytes of the saved checkpoint's `file`.
    fn seed(file: &'static str) -> Vec<Vec<u8>> {
        Self::new(file)
            .ok()
            .and_then(|r| std::fs::read(r.dir.join(file)).ok())
            .into_iter()
            .collect()
    }
}

impl Harness for Resume {
    fn run(&mut self, input: &[u8]) -> Outcome {
        std::fs::write(self.dir.join(self.file), input)
            .map_err(|e| format!("harness: cannot write {}: {e}", self.file))?;
        checkpoint::restore(&self.dir, &self.model, &self.params, &mut self.opt).map_err(err)?;
        Ok(())
    }
}

/// `trainer_state.json` of a checkpoint.
pub static TRAINER_STATE: Target = Target {
    name: "trainer_state",
    entry: "train::checkpoint::restore on `trainer_state.json`",
    max_len: 64 << 10,
    shape: Shape::Json,
    dict: &[
        "\"global_step\"",
        "\"epoch\"",
        "\"max_steps\"",
        "\"log_history\"",
        "\"best_metric\"",
        "\"best_model_checkpoint\"",
        "\"num_train_epochs\"",
        "\"logging_steps\"",
        "\"eval_steps\"",
        "\"save_steps\"",
        "\"train_batch_size\"",
        "\"micro_in_epoch\"",
        "\"epoch_progress\"",
        "\"evals_without_improvement\"",
        "18446744073709551615",
        "-1",
        "1e308",
        "NaN",
    ],
    seeds: || Resume::seed("trainer_state.json"),
    harness: || Ok(Box::new(Resume::new("trainer_state.json")?)),
};

/// `optimizer.safetensors` of a checkpoint (AdamW's moments).
pub static OPTIMIZER: Target = Target {
    name: "optimizer",
    entry: "train::checkpoint::restore on `optimizer.safetensors`",
    max_len: 64 << 10,
    shape: Shape::Safetensors,
    dict: &[
        "\"dtype\"",
        "\"shape\"",
        "\"data_offsets\"",
        "\"F32\"",
        "\"BF16\"",
        "\"F64\"",
        "\"I64\"",
        "\"BOOL\"",
        "m.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "v.base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    ],
    seeds: || Resume::seed("optimizer.safetensors"),
    harness: || Ok(Box::new(Resume::new("optimizer.safetensors")?)),
};
