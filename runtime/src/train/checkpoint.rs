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
    for (k, s) in params.slots() {
        moments.insert(format!("m.{}", s.name), s.of(&opt.parts[k].m)?);
        moments.insert(format!("v.{}", s.name), s.of(&opt.parts[k].v)?);
    }
    crate::model::weights::save_file(&moments, &tmp.join("optimizer.safetensors"))?;
    let json = serde_json::to_string_pretty(state).unwrap_or_default();
    let state_file = tmp.join("trainer_state.json");
    std::fs::write(&state_file, json).map_err(|e| Error::io(&state_file, e))?;
    // Re-saving a step: the old directory is moved aside first and removed only after the new one
    // is in place, so a kill at any point leaves a complete checkpoint-N (or its `.old` copy, which
    // `recover` puts back).
    let old = output_dir.join(format!(
        ".checkpoint-{}.old{}",
        state.global_step,
        std::process::id()
    ));
    if final_dir.exists() {
        std::fs::rename(&final_dir, &old).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
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
        for (prefix, flat) in [("", part.data.as_tensor()), ("m.", &o.m), ("v.", &o.v)] {
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
    let Ok(entries) = std::fs::read_dir(output_dir) else {
        return Ok(done);
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".checkpoint-") else {
            continue;
        };
        let step = rest.split('.').next().unwrap_or("");
        let path = e.path();
        let fin = output_dir.join(format!("checkpoint-{step}"));
        if rest.contains(".old") && !fin.exists() && path.join("trainer_state.json").is_file() {
            std::fs::rename(&path, &fin).map_err(|err| Error::io(&path, err))?;
            done.push(format!(
                "restored `checkpoint-{step}` from an interrupted save"
            ));
        } else if rest.contains(".old") || rest.contains(".tmp") {
            std::fs::remove_dir_all(&path).map_err(|err| Error::io(&path, err))?;
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
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
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
    for (part, o) in params.parts.iter().zip(opt.parts.iter_mut()) {
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
        o.m = Tensor::cat(&m, 0)?.to_device(part.device())?;
        o.v = Tensor::cat(&v, 0)?.to_device(part.device())?;
        // A sharded optimizer (ZeRO) keeps only its share of the whole moments saved.
        o.cut_to_shard()?;
    }
    opt.set_step(state.global_step);
    Ok(state)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
        let n = opt.parts[0].m.elem_count();
        let mut host = vec![0f32; n];
        host[n - 1] = f32::NAN;
        opt.parts[0].m = Tensor::from_vec(host, n, &candle_core::Device::Cpu).unwrap();
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
