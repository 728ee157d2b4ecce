//! The executor that does the work: the trainable tensors as flat buffers, the optimizer, the
//! policy that merges micro-batches, and for each step the engine's passes over this rank's
//! share of the window (in a pipeline when the model lies over several GPUs), the ranks'
//! gradient sum, clipping and the AdamW update.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::TrainConfig;
use super::checkpoint::{self, TrainerState};
use super::collective::{Collective, GradSum, zero};
use super::engine::{BlockHook, NoHook, eval_loss, micro_step};
use super::executor::{Evaluation, Executor, StepAt, StepOut};
use super::flat::{DeviceGrads, DeviceParams};
use super::merge::MergePolicy;
use super::objective::{CausalLm, Metrics, Objective, add_metrics};
use super::optim::{AdamWConfig, DeviceAdamW, clip_factor_parts};
use crate::data::batch::collate;
use crate::data::sft::Example;
use crate::model::Model;
use crate::{Error, Result};

/// See the module doc.
pub struct Compute {
    model: Model,
    params: DeviceParams,
    opt: DeviceAdamW,
    merge: MergePolicy,
    cfg: TrainConfig,
    pad_id: u32,
    device: Device,
    collective: Arc<dyn Collective>,
    objective: Arc<dyn Objective>,
    /// The model's stages when it lies over several GPUs: the window's micro-batches then run in
    /// a pipeline (GPipe's schedule) so the GPUs work at once.
    pipeline: Option<Vec<std::ops::Range<usize>>>,
}

impl Compute {
    /// Fresh trainable copies of `model`'s trainable tensors and zeroed optimizer moments (this
    /// rank's share of them under ZeRO).
    pub fn new(
        model: &Model,
        cfg: &TrainConfig,
        pad_id: u32,
        collective: Arc<dyn Collective>,
        objective: Arc<dyn Objective>,
    ) -> Result<Self> {
        let mut model = model.clone();
        let device: Device = model.decoder.device().clone();
        crate::device::reset_peak(&device);
        let params = DeviceParams::adopt(&mut model)?;
        let adam = AdamWConfig {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.weight_decay,
            eight_bit: cfg.eight_bit_optim(),
        };
        let opt = match cfg.zero_stage {
            stage @ (1 | 2) if collective.size() > 1 => {
                zero::optimizer(&params, adam, stage, |len| collective.share(len))?
            }
            _ => DeviceAdamW::new(&params, adam)?,
        };
        let pipeline = model
            .placement
            .as_ref()
            .and_then(crate::plan::Placement::pipeline_stages)
            .filter(|_| cfg.pipeline);
        let merge = MergePolicy::new(cfg.merge_micro_batches, model.decoder.num_params());
        Ok(Self {
            model,
            params,
            opt,
            merge,
            cfg: cfg.clone(),
            pad_id,
            device,
            collective,
            objective,
            pipeline,
        })
    }

    /// This rank's part of a window of global micro-batches: its share of each (see
    /// [`crate::dist::share`]) and the window index of its first example (the ranks' shares
    /// laid end to end, rank 0 first: dropout keys each example by that index).
    fn shard<'a>(&self, window: &[Vec<&'a Example>]) -> (Vec<Vec<&'a Example>>, u64) {
        let (size, rank) = (self.collective.size(), self.collective.rank());
        if size == 1 {
            return (window.to_vec(), 0);
        }
        let mut before = 0;
        let mine = window
            .iter()
            .map(|mb| {
                let (a, b) = crate::dist::share(mb.len(), size, rank);
                // The lower ranks' shares of this micro-batch come first.
                before += a;
                mb[a..b].to_vec()
            })
            .filter(|mb| !mb.is_empty())
            .collect();
        (mine, before as u64)
    }

    /// Forward and backward over a window's micro-batches, merged as the policy says: the
    /// gradients (the flat f32 buffer), the window's loss (a device scalar) and the most padded
    /// tokens of one pass; an error says whether a pass that failed was a merged one. `sum` (the
    /// ranks' sum) hooks into the last pass's backward when that pass is not merged, so a merged
    /// pass that runs out of memory and is tried again has not started any sum.
    fn run_window(
        &self,
        examples: &[Vec<&Example>],
        window_tokens: usize,
        first_row: u64,
        step: usize,
        sum: Option<&mut GradSum>,
    ) -> std::result::Result<(DeviceGrads<'_>, Tensor, usize, Metrics), (Error, bool)> {
        let mut merged = false;
        self.run_groups(examples, window_tokens, first_row, step, sum, &mut merged)
            .map_err(|e| (e, merged))
    }

    fn run_groups(
        &self,
        examples: &[Vec<&Example>],
        window_tokens: usize,
        mut first_row: u64,
        step: usize,
        sum: Option<&mut GradSum>,
        merged: &mut bool,
    ) -> Result<(DeviceGrads<'_>, Tensor, usize, Metrics)> {
        let dims: Vec<(usize, usize)> = examples
            .iter()
            .map(|ex| (ex.len(), ex.iter().map(|e| e.row_len()).max().unwrap_or(0)))
            .collect();
        // ZeRO stage 2 sums every pass's blocks as its backward leaves them: the same passes on
        // every rank, never merged, in the sequential schedule.
        let every_pass = sum.as_ref().is_some_and(|s| s.every_pass());
        let groups = if every_pass {
            (0..dims.len()).map(|i| i..i + 1).collect()
        } else {
            self.merge
                .groups(&dims, self.cfg.pad_to_multiple_of.unwrap_or(1))
        };
        let seed = crate::nn::dropout::mix(self.cfg.seed, step as u64);
        // One batch per pass (a group of micro-batches merged into one), each keyed for dropout.
        let mut passes = Vec::with_capacity(groups.len());
        for g in groups {
            let merged = g.len() > 1;
            let ex: Vec<&Example> = examples[g].iter().flatten().copied().collect();
            let batch = collate(&ex, self.pad_id, self.cfg.pad_to_multiple_of, &self.device)?;
            let key = crate::nn::dropout::Key {
                key: seed,
                first_row,
            };
            first_row += ex.len() as u64;
            passes.push((batch, key, merged));
        }
        let largest = passes
            .iter()
            .map(|(b, _, _)| b.input_ids.elem_count())
            .max()
            .unwrap_or(0);
        let denom = window_tokens.max(1) as f64;
        let ckpt = self.cfg.checkpointing();
        let objective = &*self.objective;
        let mut grads = match &sum {
            Some(s) => s.grads(&self.params)?,
            None => self.params.zero_grads()?,
        };
        let outs: Vec<(Tensor, Metrics)> = if let Some(stages) = self
            .pipeline
            .as_ref()
            .filter(|_| passes.len() > 1 && !every_pass)
        {
            // The model over several GPUs: the passes in a pipeline (sums start at the end).
            let keyed: Vec<_> = passes.iter().map(|(b, k, _)| (b, *k)).collect();
            super::engine::window_pipelined(
                &self.model,
                objective,
                &keyed,
                denom,
                ckpt,
                stages,
                &mut grads,
            )
            .map_err(|e| self.out_of_memory_hint(e, step, passes[0].0.input_ids.dims()))?
            .into_iter()
            .map(|o| Ok((crate::device::to(&o.loss, &self.device)?, o.metrics)))
            .collect::<Result<_>>()?
        } else {
            let mut sum = sum;
            let last = passes.len().saturating_sub(1);
            let mut losses = Vec::with_capacity(passes.len());
            for (i, (batch, key, m)) in passes.iter().enumerate() {
                *merged = *m;
                let mut none = NoHook;
                let hook: &mut dyn BlockHook = match sum.as_deref_mut() {
                    Some(s) if every_pass || (i == last && !m) => s,
                    _ => &mut none,
                };
                let out = micro_step(
                    &self.model,
                    objective,
                    batch,
                    denom,
                    *key,
                    ckpt,
                    &mut grads,
                    hook,
                )
                .map_err(|e| self.out_of_memory_hint(e, step, batch.input_ids.dims()))?;
                losses.push((out.loss, out.metrics));
            }
            losses
        };
        let mut metrics = Metrics::new();
        let mut losses = outs.into_iter().map(|(l, m)| {
            add_metrics(&mut metrics, m);
            l
        });
        let first = losses
            .next()
            .ok_or_else(|| Error::InvalidArgument("an empty accumulation window".into()))?;
        let loss = losses.try_fold(first, |a, l| a.add(&l))?;
        Ok((grads, loss, largest, metrics))
    }

    /// The objective's metrics summed over the ranks (each rank's share of the window), in the
    /// objective's layout; as they are with one rank.
    fn sum_metrics(&self, collective: &dyn Collective, metrics: Metrics) -> Result<Metrics> {
        let names = self.objective.metric_names();
        if collective.size() < 2 || names.is_empty() {
            return Ok(metrics);
        }
        let mut values: Vec<f32> = names
            .iter()
            .flat_map(|n| {
                let m = metrics.iter().find(|m| m.0 == *n);
                [m.map_or(0.0, |m| m.1 as f32), m.map_or(0.0, |m| m.2 as f32)]
            })
            .collect();
        collective.sum_values(&mut values)?;
        Ok(names
            .iter()
            .zip(values.chunks(2))
            .filter(|(_, v)| v[1] > 0.0)
            .map(|(n, v)| (*n, f64::from(v[0]), f64::from(v[1])))
            .collect())
    }

    /// Turns a device out-of-memory error into one that says what to reduce.
    fn out_of_memory_hint(&self, e: Error, step: usize, dims: &[usize]) -> Error {
        if !is_out_of_memory(&e) {
            return e;
        }
        let text = e.to_string();
        Error::InvalidArgument(format!(
            "out of memory at step {} on a batch of {:?} (examples x tokens): lower `per_device_train_batch_size` \
             (raise `gradient_accumulation_steps` to keep the effective batch of {}), lower `max_length` in `data::sft`, \
             or set `gradient_checkpointing: true` (`\"offload\"` also keeps the block inputs in host memory){}; the device said: {text}",
            step + 1,
            dims,
            self.cfg.per_device_train_batch_size * self.cfg.gradient_accumulation_steps,
            if self.cfg.checkpointing().offload() {
                " (offload already on)"
            } else if self.cfg.checkpointing().recompute() {
                " (already on)"
            } else {
                ""
            },
        ))
    }
}

impl Executor for Compute {
    fn model(&self) -> &Model {
        &self.model
    }

    fn snapshot(&self) -> Result<Model> {
        snapshot(&self.model, &self.params)
    }

    fn into_model(self: Box<Self>) -> Model {
        self.model
    }

    fn step(&mut self, window: &[Vec<&Example>], at: StepAt) -> Result<Option<StepOut>> {
        // The loss is normalised over the whole window, every rank's share.
        let window_tokens: usize = window.iter().map(|e| self.objective.normalizer(e)).sum();
        let (mine, first_row) = self.shard(window);
        self.merge.before_step(&self.device);
        // The ranks' sum: with NCCL each block's as soon as the window's last backward leaves it
        // (under ZeRO stage 2 every pass's, into the ranks' shares).
        let zero2 = self.cfg.zero_stage == 2;
        let collective = self.collective.clone();
        let (grads, loss, largest, metrics) = {
            let mut sum =
                collective.grad_sum(&self.params, self.model.decoder.blocks.len(), zero2)?;
            let (mut grads, mut loss, largest, metrics) = if mine.is_empty() {
                // Fewer examples than ranks: this rank adds nothing but still joins the sums.
                let grads = match &sum {
                    Some(s) => s.grads(&self.params)?,
                    None => self.params.zero_grads()?,
                };
                (
                    grads,
                    Tensor::zeros((), DType::F32, &self.device)?,
                    0,
                    Metrics::new(),
                )
            } else {
                match self.run_window(&mine, window_tokens, first_row, at.step, sum.as_mut()) {
                    Err((e, true)) if is_out_of_memory(&e) => {
                        // A merged pass did not fit after all: the window again, as written (no
                        // sum had started: only an unmerged pass starts them).
                        self.merge.disable();
                        self.run_window(&mine, window_tokens, first_row, at.step, sum.as_mut())
                            .map_err(|(e, _)| e)?
                    }
                    other => other.map_err(|(e, _)| e)?,
                }
            };
            let grads: Vec<Tensor> = match sum {
                Some(mut sum) => {
                    if sum.every_pass() {
                        // The micro-batches this rank had no share of: the same sums, of zeros.
                        for _ in mine.len()..window.len() {
                            sum.empty_pass(&mut grads)?;
                        }
                    }
                    // Every rank's gradients and loss summed: each rank then takes the same step.
                    loss = crate::device::to(&loss, &self.device)?;
                    sum.finish(grads, &mut loss)?
                }
                None => grads
                    .parts
                    .into_iter()
                    .map(super::flat::FlatGrads::into_buffer)
                    .collect::<Result<_>>()?,
            };
            (grads, loss, largest, metrics)
        };
        let metrics = self.sum_metrics(&*collective, metrics)?;
        self.merge.after_step(&self.device, largest);
        let span = crate::profile::span("optimizer", &self.device);
        let bufs: Vec<&Tensor> = grads.iter().collect();
        let (grad_norm, clip) = if zero2 && collective.size() > 1 {
            // ZeRO stage 2: each rank holds its share of the gradient; the norm is of them all.
            let mine = super::optim::sum_of_squares_parts(&bufs)?;
            let total = collective.sum_scalar(&mine)?;
            super::optim::clip_of_sum_of_squares(total, self.cfg.max_grad_norm)?
        } else {
            clip_factor_parts(&bufs, self.cfg.max_grad_norm)?
        };
        self.opt.step(&self.params, &bufs, clip.as_ref(), at.lr)?;
        drop(grads);
        collective.gather_shards(&self.params, &self.opt)?;
        drop(span);
        Ok(Some(StepOut {
            loss,
            grad_norm,
            metrics,
        }))
    }

    fn evaluate(&self, data: &[Example]) -> Result<Option<Evaluation>> {
        evaluate_with(&self.model, &*self.objective, data, &self.cfg, self.pad_id).map(Some)
    }

    fn sharded(&self) -> bool {
        zero::sharded(&self.opt)
    }

    fn save(&mut self, out_dir: &Path, state: &TrainerState) -> Result<(PathBuf, bool)> {
        // Under ZeRO rank 0 gathers every rank's share of the moments first.
        let gathered = self.collective.gather_moments(&self.params, &self.opt)?;
        if !self.collective.lead() {
            // Rank 0 writes it.
            let path = out_dir.join(format!("checkpoint-{}", state.global_step));
            return Ok((path, false));
        }
        let path = checkpoint::save(
            out_dir,
            &self.model,
            &self.params,
            gathered.as_ref().unwrap_or(&self.opt),
            state,
        )?;
        Ok((path, true))
    }

    fn restore(&mut self, dir: &Path) -> Result<TrainerState> {
        checkpoint::restore(dir, &self.model, &self.params, &mut self.opt)
    }

    fn peak_device_bytes(&self) -> Option<u64> {
        crate::device::pool(&self.device).map(|p| p.peak)
    }
}

/// A copy of `model` (whose trainable tensors are views of `params`' flat buffers) that later
/// steps do not change: one copy of each device's flat buffer, the copy's trainable tensors views
/// of it. One kernel a snapshot, not one a tensor (a publish each step stays cheap); and not
/// candle's `copy` of each view, which clones the view's whole storage (each adapter of a 7B
/// would take the whole 160 MB buffer with it: 63 GB a snapshot).
pub fn snapshot(model: &Model, params: &DeviceParams) -> Result<Model> {
    let copies = params
        .parts
        .iter()
        .map(|p| p.data.as_tensor().copy())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let slots: std::collections::HashMap<&str, (usize, &super::flat::Slot)> = params
        .slots()
        .map(|(k, s)| (s.name.as_str(), (k, s)))
        .collect();
    let mut m = model.clone();
    crate::model::params::visit_trainable_mut(&mut m, &mut |name, t| {
        *t = match slots.get(name) {
            Some(&(k, slot)) => slot.of(&copies[k])?,
            None => t.force_contiguous()?,
        };
        Ok(())
    })?;
    Ok(m)
}

/// Whether `e` is the device running out of memory.
fn is_out_of_memory(e: &Error) -> bool {
    let text = e.to_string();
    text.contains("OUT_OF_MEMORY") || text.to_lowercase().contains("out of memory")
}

/// Mean loss of `data` under `objective` (no gradients kept), with the objective's metrics.
pub fn evaluate_with(
    model: &Model,
    objective: &dyn Objective,
    data: &[Example],
    cfg: &TrainConfig,
    pad_id: u32,
) -> Result<Evaluation> {
    let device = model.decoder.device().clone();
    let (mut total, mut count) = (0f64, 0usize);
    let mut metrics = Metrics::new();
    for chunk in data.chunks(cfg.per_device_eval_batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = collate(&refs, pad_id, cfg.pad_to_multiple_of, &device)?;
        let (sum, n, m) = eval_loss(model, objective, &batch)?;
        total += sum;
        count += n;
        add_metrics(&mut metrics, m);
    }
    Ok(Evaluation {
        loss: total / count.max(1) as f64,
        metrics,
    })
}

/// Mean token loss of `data` (no gradients kept).
pub fn evaluate(model: &Model, data: &[Example], cfg: &TrainConfig, pad_id: u32) -> Result<f64> {
    evaluate_with(model, &CausalLm, data, cfg, pad_id).map(|e| e.loss)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use candle_core::Storage;

    use crate::lora::{LoraConfig, Targets};
    use crate::model::{TinyConfig, tiny};

    /// A snapshot of a model whose adapters live in one flat buffer holds the model's values in
    /// one copy of that buffer: every adapter a view of the same storage, of the buffer's size
    /// (not a whole buffer an adapter, as candle's `copy` of each view would make).
    #[test]
    fn a_snapshot_copies_the_buffer_once() {
        let m = tiny(&TinyConfig::default()).unwrap();
        let cfg = LoraConfig {
            r: 4,
            target_modules: Targets::Pattern("all-linear".into()),
            ..LoraConfig::default()
        };
        let mut model = crate::lora::attach(&m, &cfg, 1).unwrap();
        let params = super::super::flat::DeviceParams::adopt(&mut model).unwrap();
        let snap = super::snapshot(&model, &params).unwrap();
        let want = crate::model::params::trainable(&model);
        let got = crate::model::params::trainable(&snap);
        assert!(want.len() > 4);
        let mut storages = std::collections::HashSet::new();
        for ((_, a), (_, b)) in want.iter().zip(&got) {
            let (st, _) = b.storage_and_layout();
            let Storage::Cpu(c) = &*st else {
                panic!("not on the CPU")
            };
            let data = c.as_slice::<f32>().unwrap();
            assert_eq!(data.len(), params.len());
            storages.insert(data.as_ptr() as usize);
            assert_eq!(crate::testing::max_abs_diff(a, b), 0.0);
        }
        // One copy, and not the training buffer itself.
        assert_eq!(storages.len(), 1);
        let (live, _) = params.parts[0].data.as_tensor().storage_and_layout();
        let Storage::Cpu(live) = &*live else {
            panic!("not on the CPU")
        };
        assert!(!storages.contains(&(live.as_slice::<f32>().unwrap().as_ptr() as usize)));
    }
}
