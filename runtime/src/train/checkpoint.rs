//! Checkpoints: `checkpoint-N/` with the trainable weights, the optimizer moments and
//! `trainer_state.json`. Each is written into a temporary directory and renamed into place, so a
//! crash or `kill -9` during a save never leaves a broken latest checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::flat::DeviceParams;
use super::optim::DeviceAdamW;
use crate::model::Model;
use crate::sandbox;
use crate::{Error, Result};

/// What `trainer_state.json` holds, written in transformers' `TrainerState` layout (so HF tooling
/// reads it: `epoch` is the fractional epoch, `log_history`, `best_model_checkpoint`, the
/// cadences, ...). Where qscript resumes from (the epoch's index, its micro-batches consumed, the
/// evaluations since the best one) rides in `stateful_callbacks`, where HF keeps callbacks' state;
/// checkpoints of older qscript versions (those keys at the top level) still read.
#[derive(Clone, Debug, Default, PartialEq)]
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
    pub max_steps: usize,
    /// HF's `epoch`: epochs done, fractional.
    pub epoch_progress: f64,
    /// HF's `num_train_epochs`, `logging_steps`, `eval_steps`, `save_steps`,
    /// `train_batch_size`: the run's, for HF tooling.
    pub num_train_epochs: usize,
    /// Logging cadence.
    pub logging_steps: usize,
    /// Evaluation cadence.
    pub eval_steps: usize,
    /// Save cadence.
    pub save_steps: usize,
    /// Per-device batch size.
    pub train_batch_size: usize,
}

/// The key of qscript's resume position in `stateful_callbacks`.
const RESUME: &str = "QscriptResume";

impl Serialize for TrainerState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        let best_step = self
            .best_model_checkpoint
            .as_deref()
            .and_then(|c| c.rsplit("checkpoint-").next())
            .and_then(|n| n.parse::<usize>().ok());
        serde_json::json!({
            "best_global_step": best_step,
            "best_metric": self.best_metric,
            "best_model_checkpoint": self.best_model_checkpoint,
            "epoch": self.epoch_progress,
            "eval_steps": self.eval_steps,
            "global_step": self.global_step,
            "is_hyper_param_search": false,
            "is_local_process_zero": true,
            "is_world_process_zero": true,
            "log_history": self.log_history,
            "logging_steps": self.logging_steps,
            "max_steps": self.max_steps,
            "num_input_tokens_seen": 0,
            "num_train_epochs": self.num_train_epochs,
            "save_steps": self.save_steps,
            "stateful_callbacks": {
                RESUME: {
                    "args": {},
                    "attributes": {
                        "epoch_index": self.epoch,
                        "micro_in_epoch": self.micro_in_epoch,
                        "evals_without_improvement": self.evals_without_improvement,
                    }
                }
            },
            "total_flos": 0.0,
            "train_batch_size": self.train_batch_size,
            "trial_name": null,
            "trial_params": null,
        })
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for TrainerState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        use serde_json::Value;
        let v = Value::deserialize(d)?;
        let Value::Object(top) = &v else {
            return Err(D::Error::custom("expected a JSON object"));
        };
        // Where the resume position is: HF's layout, or the top level of older checkpoints.
        let resume = top
            .get("stateful_callbacks")
            .and_then(|c| c.get(RESUME))
            .and_then(|c| c.get("attributes"));
        let int =
            |o: Option<&Value>, k: &str, required: bool| -> std::result::Result<usize, D::Error> {
                match o.and_then(|o| o.get(k)) {
                    None | Some(Value::Null) if !required => Ok(0),
                    None => Err(D::Error::custom(format!("missing field `{k}`"))),
                    Some(x) => x
                        .as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| D::Error::custom(format!("`{k}` is not a count: {x}"))),
                }
            };
        let t = Some(&v);
        let (epoch, micro_in_epoch, evals_without_improvement, epoch_progress) =
            if let Some(r) = resume {
                (
                    int(Some(r), "epoch_index", true)?,
                    int(Some(r), "micro_in_epoch", false)?,
                    int(Some(r), "evals_without_improvement", false)?,
                    match top.get("epoch").and_then(Value::as_f64).unwrap_or(0.0) {
                        e if e.is_finite() && (0.0..=1e9).contains(&e) => e,
                        e => {
                            return Err(D::Error::custom(format!(
                                "`epoch` {e} is not an epoch count (0 to 1e9)"
                            )));
                        }
                    },
                )
            } else {
                let e = int(t, "epoch", true)?;
                (
                    e,
                    int(t, "micro_in_epoch", true)?,
                    int(t, "evals_without_improvement", true)?,
                    e as f64,
                )
            };
        let log_history = match top.get("log_history") {
            Some(Value::Array(a)) => a.clone(),
            None | Some(Value::Null) => Vec::new(),
            Some(_) => return Err(D::Error::custom("`log_history` is not a list")),
        };
        Ok(Self {
            global_step: int(t, "global_step", true)?,
            epoch,
            micro_in_epoch,
            log_history,
            best_metric: top.get("best_metric").and_then(Value::as_f64),
            best_model_checkpoint: top
                .get("best_model_checkpoint")
                .and_then(Value::as_str)
                .map(str::to_string),
            evals_without_improvement,
            max_steps: int(t, "max_steps", false)?,
            epoch_progress,
            num_train_epochs: int(t, "num_train_epochs", false)?,
            logging_steps: int(t, "logging_steps", false)?,
            eval_steps: int(t, "eval_steps", false)?,
            save_steps: int(t, "save_steps", false)?,
            train_batch_size: int(t, "train_batch_size", false)?,
        })
    }
}

/// The newest checkpoint in `output_dir` when it belongs to a run that has not finished:
/// `(path, step, planned steps)` (planned 0: unknown, an older checkpoint).
pub fn unfinished(output_dir: &Path) -> Option<(PathBuf, usize, usize)> {
    let (step, path) = list(output_dir).pop()?;
    let state: TrainerState = crate::files::read_config(&path.join("trainer_state.json")).ok()?;
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
    params: &DeviceParams,
    opt: &DeviceAdamW,
    state: &TrainerState,
) -> Result<PathBuf> {
    let final_dir = output_dir.join(format!("checkpoint-{}", state.global_step));
    check_state(params, opt, &final_dir)?;
    let tmp = output_dir.join(format!(
        ".checkpoint-{}.tmp{}",
        state.global_step,
        std::process::id()
    ));
    if sandbox::exists_for_write(&tmp)? {
        sandbox::remove_dir_all(&tmp)?;
    }
    sandbox::create_dir_all(&tmp)?;
    if model.lora.is_some() {
        crate::lora::save_adapter(model, &tmp)?;
    } else {
        model.save(&tmp)?;
    }
    let mut moments: HashMap<String, Tensor> = HashMap::new();
    let whole = opt
        .parts
        .iter()
        .map(crate::train::optim::AdamW::moments)
        .collect::<Result<Vec<_>>>()?;
    for (k, s) in params.slots() {
        moments.insert(format!("m.{}", s.name), s.of(&whole[k].0)?);
        moments.insert(format!("v.{}", s.name), s.of(&whole[k].1)?);
    }
    // 8-bit states: each block's absmax, so a resumed run gets the same codes back.
    for (k, o) in opt.parts.iter().enumerate() {
        if let Some((am, av)) = o.absmax() {
            moments.insert(format!("absmax_m.{k}"), am);
            moments.insert(format!("absmax_v.{k}"), av);
        }
    }
    crate::model::weights::save_file(&moments, &tmp.join("optimizer.safetensors"))?;
    let json = serde_json::to_string_pretty(state).unwrap_or_default();
    let state_file = tmp.join("trainer_state.json");
    sandbox::write_atomic(&state_file, json.as_bytes())?;
    // Re-saving a step: the old directory is moved aside first and removed only after the new one
    // is in place, so a kill at any point leaves a complete checkpoint-N (or its `.old` copy, which
    // `recover` puts back).
    let old = output_dir.join(format!(
        ".checkpoint-{}.old{}",
        state.global_step,
        std::process::id()
    ));
    if sandbox::exists_for_write(&final_dir)? {
        sandbox::rename(&final_dir, &old)?;
    }
    sandbox::rename(&tmp, &final_dir)?;
    if sandbox::exists_for_write(&old)? {
        sandbox::remove_dir_all(&old)?;
    }
    Ok(final_dir)
}

/// Elements per chunk of the finiteness check (bounds its temporary memory to two f32 chunks).
const CHECK_CHUNK: usize = 1 << 24;

/// Whether every element of `t` is finite: `x - x` is zero for a finite `x` and NaN otherwise,
/// summed in f32 chunks (exact, whatever the dtype, and never a copy of the whole tensor).
pub(crate) fn all_finite(t: &Tensor) -> Result<bool> {
    let flat = t.flatten_all()?;
    let n = flat.elem_count();
    let mut start = 0;
    while start < n {
        let len = CHECK_CHUNK.min(n - start);
        let c = flat
            .narrow(0, start, len)?
            .to_dtype(candle_core::DType::F32)?;
        if c.sub(&c)?.sum_all()?.to_scalar::<f32>()? != 0.0 {
            return Ok(false);
        }
        start += len;
    }
    Ok(true)
}

/// The smallest element of `t` (f32), `None` when it is empty.
fn min_value(t: &Tensor) -> Result<Option<f32>> {
    if t.elem_count() == 0 {
        return Ok(None);
    }
    let flat = t.flatten_all()?.to_dtype(candle_core::DType::F32)?;
    Ok(Some(flat.min(0)?.to_scalar::<f32>()?))
}

/// Refuses to write a training state that is not finite (weights or moments holding NaN or
/// infinity): such a checkpoint would only fail later, far from the step that broke it. The
/// whole buffers are checked; the tensor is named from its slot.
fn check_state(params: &DeviceParams, opt: &DeviceAdamW, final_dir: &Path) -> Result<()> {
    for (k, (part, o)) in params.parts.iter().zip(&opt.parts).enumerate() {
        let (m, v) = o.moments()?;
        for (prefix, flat) in [("", part.data.as_tensor()), ("m.", &m), ("v.", &v)] {
            if all_finite(flat)? {
                continue;
            }
            // ZeRO's moments may hold only a shard: name a slot only where the buffer is whole.
            let mut name = None;
            if flat.elem_count() == part.len() {
                for (_, s) in params.slots().filter(|(j, _)| *j == k) {
                    if !all_finite(&s.of(flat)?)? {
                        name = Some(format!("{prefix}{}", s.name));
                        break;
                    }
                }
            }
            let what = match name {
                Some(n) => format!("tensor `{n}`"),
                None if prefix.is_empty() => "the trainable weights".to_string(),
                None => format!("the optimizer's `{}` moments", &prefix[..1]),
            };
            return Err(Error::InvalidArgument(format!(
                "not writing `{}`: {what} holds NaN or infinite values (the training diverged; \
                 try a lower `learning_rate` or `max_grad_norm`)",
                final_dir.display()
            )));
        }
    }
    Ok(())
}

/// Checks a tensor read from a checkpoint file before it is trusted: finite, and for second
/// moments (`v.*`) never negative.
fn check_restored(path: &Path, name: &str, t: &Tensor) -> Result<()> {
    let bad = |what: &str| Error::Config {
        path: path.to_path_buf(),
        message: format!("tensor `{name}` {what}; the checkpoint is damaged and cannot be resumed"),
    };
    if !all_finite(t)? {
        return Err(bad("holds NaN or infinite values"));
    }
    if name.starts_with("v.")
        && let Some(min) = min_value(t)?
        && min < 0.0
    {
        return Err(bad(&format!(
            "holds negative values ({min}), but second moments are never negative"
        )));
    }
    Ok(())
}

/// Cleans up after saves that a killed process left half done (call it holding the output dir's
/// lock, so no live save is touched): a `checkpoint-N` moved aside and not replaced is put back,
/// and every other temporary directory is removed. Returns what it did, for a notice.
pub fn recover(output_dir: &Path) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let Ok(entries) = sandbox::list_dir(output_dir) else {
        return Ok(done);
    };
    for path in entries {
        let name = file_name(&path);
        let Some(rest) = name.strip_prefix(".checkpoint-") else {
            continue;
        };
        let step = rest.split('.').next().unwrap_or("");
        let fin = output_dir.join(format!("checkpoint-{step}"));
        if rest.contains(".old") && !sandbox::exists_for_write(&fin)? && is_checkpoint(&path) {
            sandbox::rename(&path, &fin)?;
            done.push(format!(
                "restored `checkpoint-{step}` from an interrupted save"
            ));
        } else if rest.contains(".old") || rest.contains(".tmp") {
            sandbox::remove_dir_all(&path)?;
            done.push(format!("removed `{name}`, left by an interrupted save"));
        }
    }
    done.sort();
    Ok(done)
}

/// The output dir's lock, held while a run trains there (released when dropped): a second run
/// on the same dir fails at once, naming the holder.
#[derive(Debug)]
pub struct DirLock(#[allow(dead_code)] std::fs::File);

impl DirLock {
    /// Takes the lock of `output_dir` (`.qscript.lock`, holding the owner's pid).
    pub fn take(output_dir: &Path) -> Result<Self> {
        use std::io::{Read, Seek, Write};
        let path = output_dir.join(".qscript.lock");
        // Never through a link: a planted `.qscript.lock` link is refused, its target untouched.
        let mut f = sandbox::open_write(&path, sandbox::WriteMode::Keep)?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = f.read_to_string(&mut pid);
                let pid = pid.trim();
                let who = if pid == std::process::id().to_string() {
                    "a trainer of this session that is still alive (drop it, e.g. `t = ()`)"
                        .to_string()
                } else {
                    format!("another run (pid {pid})")
                };
                return Err(Error::InvalidArgument(format!(
                    "`{}` is in use by {who}; wait for it to finish or train into another `output_dir`",
                    output_dir.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        f.set_len(0).map_err(|e| Error::io(&path, e))?;
        f.rewind().map_err(|e| Error::io(&path, e))?;
        write!(f, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
        Ok(Self(f))
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether `dir` holds a complete checkpoint (its `trainer_state.json`, the last file a save
/// writes, is a readable regular file).
fn is_checkpoint(dir: &Path) -> bool {
    sandbox::open(&dir.join("trainer_state.json")).is_ok()
}

/// Checkpoint directories in `output_dir`, oldest first.
pub fn list(output_dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = sandbox::list_dir(output_dir)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| {
            let step = file_name(&p).strip_prefix("checkpoint-")?.parse().ok()?;
            is_checkpoint(&p).then_some((step, p))
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
        sandbox::remove_dir_all(&p)?;
        excess -= 1;
    }
    Ok(())
}

/// The checkpoint `resume_from_checkpoint` names, before it is checked: a path (relative to
/// `output_dir`), or with `true` the newest checkpoint in `output_dir` if there is one.
pub fn requested(resume: Option<&serde_json::Value>, output_dir: &Path) -> Option<PathBuf> {
    match resume? {
        serde_json::Value::String(p) => {
            let p = PathBuf::from(p);
            Some(if p.is_absolute() {
                p
            } else {
                output_dir.join(p)
            })
        }
        serde_json::Value::Bool(true) => list(output_dir).pop().map(|(_, p)| p),
        _ => None,
    }
}

/// The checkpoint a run resumes from (`resume_from_checkpoint`: a path, or `true` for the
/// newest in `output_dir`), or the reason it cannot.
pub fn resume_dir(
    resume: Option<&serde_json::Value>,
    output_dir: &Path,
) -> Result<Option<PathBuf>> {
    match resume {
        None | Some(serde_json::Value::Null | serde_json::Value::Bool(false)) => Ok(None),
        Some(serde_json::Value::Bool(true)) => match requested(resume, output_dir) {
            Some(p) => Ok(Some(p)),
            None => Err(Error::InvalidArgument(format!(
                "`resume_from_checkpoint: true` but there is no checkpoint in `{}`",
                output_dir.display()
            ))),
        },
        Some(serde_json::Value::String(_)) => match requested(resume, output_dir) {
            Some(p) if p.join("trainer_state.json").is_file() => Ok(Some(p)),
            p => Err(Error::InvalidArgument(format!(
                "`resume_from_checkpoint`: `{}` is not a checkpoint",
                p.unwrap_or_default().display()
            ))),
        },
        Some(other) => Err(Error::InvalidArgument(format!(
            "`resume_from_checkpoint` must be a path or `true`, got {other}"
        ))),
    }
}

/// Restores weights and optimizer moments from `dir`; returns the trainer state.
pub fn restore(
    dir: &Path,
    model: &Model,
    params: &DeviceParams,
    opt: &mut DeviceAdamW,
) -> Result<TrainerState> {
    let state_path = dir.join("trainer_state.json");
    let state: TrainerState = crate::files::read_config(&state_path)?;
    let weights_file = if model.lora.is_some() {
        "adapter_model.safetensors"
    } else {
        "model.safetensors"
    };
    // Read on the CPU; each part's slots go to that part's device.
    let device = candle_core::Device::Cpu;
    // Each file read through the sandbox's check on the opened file (a linked file from another
    // run is refused even if it was swapped in after the directory was checked).
    let load = |name: &str| {
        let path = dir.join(name);
        let bytes = crate::sandbox::read(&path)?;
        crate::model::weights::load_all(&path, &bytes, &device, &crate::cancel::CancelToken::new())
    };
    let weights = load(weights_file)?;
    let moments = load("optimizer.safetensors")?;
    let missing = |n: &str| Error::MissingTensor {
        name: n.to_string(),
        path: dir.to_path_buf(),
    };
    for (k, (part, o)) in params.parts.iter().zip(opt.parts.iter_mut()).enumerate() {
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for (i, s) in part.slots.iter().enumerate() {
            let w = weights.get(&s.name).ok_or_else(|| missing(&s.name))?;
            check_restored(&dir.join(weights_file), &s.name, w)?;
            part.set_slot(i, w)?;
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
                let t = t.to_dtype(candle_core::DType::F32)?.flatten_all()?;
                check_restored(&dir.join("optimizer.safetensors"), &key, &t)?;
                out.push(t);
            }
        }
        // A sharded optimizer (ZeRO) keeps only its share of the whole moments saved.
        let absmax = match (
            moments.get(&format!("absmax_m.{k}")),
            moments.get(&format!("absmax_v.{k}")),
        ) {
            (Some(a), Some(b)) => Some((a.clone(), b.clone())),
            _ => None,
        };
        o.set_moments(
            Tensor::cat(&m, 0)?.to_device(part.device())?,
            Tensor::cat(&v, 0)?.to_device(part.device())?,
            absmax,
        )?;
    }
    opt.set_step(state.global_step);
    Ok(state)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// `trainer_state.json` in transformers' layout (every field of its `TrainerState`), read
    /// back whole; an older qscript checkpoint's state still reads.
    #[test]
    fn trainer_state_is_hf_layout_and_old_states_read() {
        let state = TrainerState {
            global_step: 12,
            epoch: 1,
            micro_in_epoch: 8,
            log_history: vec![serde_json::json!({"step": 10, "loss": 1.5})],
            best_metric: Some(1.25),
            best_model_checkpoint: Some("checkpoint-10".into()),
            evals_without_improvement: 1,
            max_steps: 20,
            epoch_progress: 1.5,
            num_train_epochs: 2,
            logging_steps: 5,
            eval_steps: 5,
            save_steps: 10,
            train_batch_size: 4,
        };
        let v = serde_json::to_value(&state).unwrap();
        // An epoch that is no epoch count is refused, naming the field.
        for bad in [-1.0, 1e308] {
            let mut w = v.clone();
            w["epoch"] = bad.into();
            let e = serde_json::from_value::<TrainerState>(w)
                .unwrap_err()
                .to_string();
            assert!(e.contains("`epoch`"), "{e}");
        }
        // transformers' TrainerState fields, as `TrainerState.load_from_json` takes them
        let hf = [
            "epoch",
            "global_step",
            "max_steps",
            "logging_steps",
            "eval_steps",
            "save_steps",
            "train_batch_size",
            "num_train_epochs",
            "num_input_tokens_seen",
            "total_flos",
            "log_history",
            "best_metric",
            "best_global_step",
            "best_model_checkpoint",
            "is_local_process_zero",
            "is_world_process_zero",
            "is_hyper_param_search",
            "trial_name",
            "trial_params",
            "stateful_callbacks",
        ];
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut want = hf.to_vec();
        want.sort_unstable();
        assert_eq!(keys, want);
        assert_eq!(v["epoch"], 1.5);
        assert_eq!(v["best_global_step"], 10);
        let back: TrainerState = serde_json::from_value(v).unwrap();
        assert_eq!(back, state);
        let old = r#"{"global_step": 7, "epoch": 2, "micro_in_epoch": 3, "log_history": [],
            "best_metric": null, "best_model_checkpoint": null, "evals_without_improvement": 0}"#;
        let old: TrainerState = serde_json::from_str(old).unwrap();
        assert_eq!(
            (
                old.global_step,
                old.epoch,
                old.micro_in_epoch,
                old.max_steps
            ),
            (7, 2, 3, 0)
        );
    }

    fn complete(dir: &Path, step: usize) {
        std::fs::create_dir_all(dir).unwrap();
        let state = TrainerState {
            global_step: step,
            ..TrainerState::default()
        };
        std::fs::write(
            dir.join("trainer_state.json"),
            serde_json::to_string(&state).unwrap(),
        )
        .unwrap();
    }

    /// A kill at each point of a re-save of step 5 (new copy written, old one moved aside, new one
    /// renamed in) leaves, after `recover`, exactly one complete `checkpoint-5` and no temporaries.
    #[test]
    fn a_kill_at_any_point_of_a_save_leaves_a_complete_checkpoint() {
        for killed_after in ["tmp written", "old moved aside", "new renamed in"] {
            let out = tempfile::tempdir().unwrap();
            let (fin, tmp, old) = (
                out.path().join("checkpoint-5"),
                out.path().join(".checkpoint-5.tmp4242"),
                out.path().join(".checkpoint-5.old4242"),
            );
            complete(&fin, 5);
            complete(&tmp, 5);
            if killed_after != "tmp written" {
                std::fs::rename(&fin, &old).unwrap();
            }
            if killed_after == "new renamed in" {
                std::fs::rename(&tmp, &fin).unwrap();
            }
            let done = recover(out.path()).unwrap();
            assert!(!done.is_empty(), "{killed_after}");
            let left: Vec<String> = std::fs::read_dir(out.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(left, ["checkpoint-5"], "{killed_after}: {done:?}");
            assert_eq!(list(out.path()).len(), 1);
        }
    }

    /// A diverged state (a NaN in the moments) is never written: the save fails naming the
    /// tensor, and no checkpoint directory (nor a temporary one) is left.
    #[test]
    fn a_non_finite_state_is_not_written() {
        use crate::lora::{LoraConfig, Targets};
        use crate::model::{TinyConfig, tiny};
        use crate::train::optim::AdamWConfig;
        let m = tiny(&TinyConfig {
            hidden: 32,
            layers: 1,
            intermediate: 64,
            ..TinyConfig::default()
        })
        .unwrap();
        let cfg = LoraConfig {
            r: 2,
            target_modules: Targets::Pattern("all-linear".into()),
            ..LoraConfig::default()
        };
        let mut model = crate::lora::attach(&m, &cfg, 1).unwrap();
        let params = DeviceParams::adopt(&mut model).unwrap();
        let mut opt = DeviceAdamW::new(&params, AdamWConfig::default()).unwrap();
        let out = tempfile::tempdir().unwrap();
        let state = TrainerState {
            global_step: 3,
            ..TrainerState::default()
        };
        save(out.path(), &model, &params, &opt, &state).unwrap();
        std::fs::remove_dir_all(out.path().join("checkpoint-3")).unwrap();
        let (m, v) = opt.parts[0].moments().unwrap();
        let n = m.elem_count();
        let mut host = vec![0f32; n];
        host[n - 1] = f32::NAN;
        opt.parts[0]
            .set_moments(
                Tensor::from_vec(host, n, &candle_core::Device::Cpu).unwrap(),
                v,
                None,
            )
            .unwrap();
        let last = params.slots().last().unwrap().1.name.clone();
        let e = save(out.path(), &model, &params, &opt, &state)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("checkpoint-3") && e.contains(&format!("tensor `m.{last}`")),
            "{e}"
        );
        assert!(e.contains("NaN or infinite"), "{e}");
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    }

    /// One run at a time per output dir; the lock goes with the run.
    #[test]
    fn the_output_dir_lock_names_its_holder_and_is_released() {
        let out = tempfile::tempdir().unwrap();
        let held = DirLock::take(out.path()).unwrap();
        let e = DirLock::take(out.path()).unwrap_err().to_string();
        assert!(e.contains("is in use by a trainer of this session"), "{e}");
        drop(held);
        DirLock::take(out.path()).unwrap();
    }
}
