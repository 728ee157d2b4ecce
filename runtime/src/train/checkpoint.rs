//! Checkpoints: `checkpoint-N/` with the trainable weights, the optimizer moments and
//! `trainer_state.json`. Each is written into a temporary directory and renamed into place, so a
//! crash or `kill -9` during a save never leaves a broken latest checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::flat::FlatParams;
use super::optim::AdamW;
use crate::model::Model;
use crate::{Error, Result};

/// What `trainer_state.json` holds.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub global_step: usize,
    /// Epoch of the next micro-batch.
    pub epoch: usize,
    /// Micro-batches of that epoch already consumed.
    pub micro_in_epoch: usize,
    /// Logged metrics so far.
    pub log_history: Vec<serde_json::Value>,
    /// Best eval loss so far.
    pub best_metric: Option<f64>,
    /// Its checkpoint.
    pub best_model_checkpoint: Option<String>,
    /// Evaluations since the best one.
    pub evals_without_improvement: usize,
    /// Optimizer steps the run was planned for (HF's `max_steps`; 0 in older checkpoints).
    #[serde(default)]
    pub max_steps: usize,
}

/// The newest checkpoint in `output_dir` when it belongs to a run that has not finished:
/// `(path, step, planned steps)` (planned 0: unknown, an older checkpoint).
pub fn unfinished(output_dir: &Path) -> Option<(PathBuf, usize, usize)> {
    let (step, path) = list(output_dir).pop()?;
    let state: TrainerState = crate::error::read_config(&path.join("trainer_state.json")).ok()?;
    (state.max_steps == 0 || state.global_step < state.max_steps).then_some((
        path,
        step,
        state.max_steps,
    ))
}

/// Writes `output_dir/checkpoint-{step}` atomically; returns its path.
pub fn save(
    output_dir: &Path,
    model: &Model,
    params: &FlatParams,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<PathBuf> {
    let final_dir = output_dir.join(format!("checkpoint-{}", state.global_step));
    let tmp = output_dir.join(format!(
        ".checkpoint-{}.tmp{}",
        state.global_step,
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    if model.lora.is_some() {
        crate::lora::save_adapter(model, &tmp)?;
    } else {
        model.save(&tmp)?;
    }
    let mut moments: HashMap<String, Tensor> = HashMap::new();
    for s in &params.slots {
        moments.insert(format!("m.{}", s.name), s.of(&opt.m)?);
        moments.insert(format!("v.{}", s.name), s.of(&opt.v)?);
    }
    candle_core::safetensors::save(&moments, tmp.join("optimizer.safetensors"))?;
    let json = serde_json::to_string_pretty(state).unwrap_or_default();
    std::fs::write(tmp.join("trainer_state.json"), json).map_err(|e| Error::io(&tmp, e))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    Ok(final_dir)
}

/// Checkpoint directories in `output_dir`, oldest first.
pub fn list(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path()
                .join("trainer_state.json")
                .is_file()
                .then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Deletes the oldest checkpoints beyond `limit`, never `keep`.
pub fn rotate(output_dir: &Path, limit: usize, keep: Option<&str>) -> Result<()> {
    let all = list(output_dir);
    let mut excess = all.len().saturating_sub(limit.max(1));
    for (_, p) in all {
        if excess == 0 {
            break;
        }
        if keep.is_some_and(|k| p.ends_with(k)) {
            continue;
        }
        std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        excess -= 1;
    }
    Ok(())
}

/// Restores weights and optimizer moments from `dir`; returns the trainer state.
pub fn restore(
    dir: &Path,
    model: &Model,
    params: &FlatParams,
    opt: &mut AdamW,
) -> Result<TrainerState> {
    let state_path = dir.join("trainer_state.json");
    let state: TrainerState = crate::error::read_config(&state_path)?;
    let weights_file = if model.lora.is_some() {
        "adapter_model.safetensors"
    } else {
        "model.safetensors"
    };
    let device = params.device().clone();
    let weights = candle_core::safetensors::load(dir.join(weights_file), &device).map_err(|e| {
        Error::Safetensors {
            path: dir.join(weights_file),
            message: e.to_string(),
        }
    })?;
    let moments = candle_core::safetensors::load(dir.join("optimizer.safetensors"), &device)
        .map_err(|e| Error::Safetensors {
            path: dir.join("optimizer.safetensors"),
            message: e.to_string(),
        })?;
    let missing = |n: &str| Error::MissingTensor {
        name: n.to_string(),
        path: dir.to_path_buf(),
    };
    let (mut m, mut v) = (Vec::new(), Vec::new());
    for (i, s) in params.slots.iter().enumerate() {
        let w = weights.get(&s.name).ok_or_else(|| missing(&s.name))?;
        params.set_slot(i, w)?;
        for (prefix, out) in [("m", &mut m), ("v", &mut v)] {
            let key = format!("{prefix}.{}", s.name);
            let t = moments.get(&key).ok_or_else(|| missing(&key))?;
            if t.shape() != &s.shape {
                return Err(Error::ShapeMismatch {
                    name: key,
                    path: dir.to_path_buf(),
                    expected: s.shape.dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            out.push(t.to_dtype(candle_core::DType::F32)?.flatten_all()?);
        }
    }
    opt.m = Tensor::cat(&m, 0)?;
    opt.v = Tensor::cat(&v, 0)?;
    opt.step = state.global_step;
    Ok(state)
}
