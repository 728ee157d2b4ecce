//! The training engine: one micro-step (forward, loss, backward) of a model, block by block;
//! the loss is the [`Objective`]'s, over the final hidden states.
//! This is the only backward path. Forward keeps each block's input; without checkpointing it
//! also keeps what each block's backward needs, with it (gradient checkpointing) the block is
//! re-run from its input just before its backward, and with offload the inputs wait in host
//! memory ([`BlockInputs`]). Backward goes from the loss's `dHidden`
//! through the final norm and then each block in reverse, calling the ops' own backward
//! functions ([`crate::nn`]), so every block's activations are freed as soon as its backward is
//! done and frozen weights cost only their `dX` matmul. Gradients land in place in the flat f32
//! buffer. [`BlockHook`] is where placement moves hidden states between devices and data
//! parallel starts each block's gradient all-reduce.

use candle_core::Tensor;

use super::block_inputs::BlockInputs;
use super::config::Checkpointing;
use super::flat::DeviceGrads;
pub use super::objective::shifted_targets;
use super::objective::{CausalLm, Labels, Metrics, Objective};
use crate::data::batch::{Batch, PrefRows};
use crate::data::pair_rows::PairView;
use crate::device::{to, trace};
use crate::model::Model;
use crate::model::block::{BlockSaved, Step};
use crate::model::decoder::DeviceTables;
use crate::nn::dropout::Key;
use crate::nn::ops::{rms_norm, rms_norm_backward_into};
use crate::nn::{AttnMask, GradSink};
use crate::{Error, Result};

/// Called at block boundaries.
pub trait BlockHook {
    /// Before block `layer` runs forward on `x` (placement moves `x` to the block's device).
    fn before_forward(&mut self, layer: usize, x: Tensor) -> Result<Tensor> {
        let _ = layer;
        Ok(x)
    }
    /// After block `layer`'s backward: its gradients for this micro-step are complete.
    fn after_backward(&mut self, layer: usize, grads: &mut DeviceGrads) -> Result<()> {
        let _ = (layer, grads);
        Ok(())
    }
}

/// A hook that does nothing (one device, one process).
#[derive(Debug, Default)]
pub struct NoHook;

impl BlockHook for NoHook {}

/// What [`micro_step`] returns.
#[derive(Debug)]
pub struct MicroOut {
    /// Summed token loss over `denom`, an f32 scalar on the device.
    pub loss: Tensor,
    /// Learned tokens in the micro-batch (examples, for a preference objective).
    pub count: usize,
    /// The objective's metrics: `(name, sum, count)`.
    pub metrics: Metrics,
}

/// One micro-batch: forward, loss divided by `denom`, backward into `grads`, with `ckpt`'s
/// checkpointing. `seed` keys the
/// dropout masks (per example of the window), so a recomputed block draws the masks of its
/// forward and a window gives the same gradients however its examples are split into micro-batches.
#[allow(clippy::too_many_arguments)]
pub fn micro_step(
    model: &Model,
    objective: &dyn Objective,
    batch: &Batch,
    denom: f64,
    seed: Key,
    ckpt: Checkpointing,
    grads: &mut DeviceGrads,
    hook: &mut dyn BlockHook,
) -> Result<MicroOut> {
    let pass = Pass {
        objective,
        input_ids: &batch.input_ids,
        mask: &batch.mask(),
        labels: &batch.labels_host,
        ids: &batch.ids_host,
        lens: &batch.lens,
        pref: &batch.pref,
        view: batch.view.as_ref(),
        denom,
        seed: Some(seed),
        ckpt,
    };
    pass.run(model, grads, hook)
}

/// The loss (mean over learned tokens) of `input_ids` against `labels` (`[b, s]` row-major,
/// -100 = not learned) and the gradient of every trainable tensor by name, through the engine.
/// `seed` turns dropout on. This is what the gradient tests compare with PEFT and torch.
pub fn gradients(
    model: &Model,
    input_ids: &Tensor,
    mask: &AttnMask,
    labels: &[i64],
    seed: Option<Key>,
    ckpt: impl Into<Checkpointing>,
) -> Result<(f64, Vec<(String, Tensor)>)> {
    let (b, s) = input_ids.dims2()?;
    let count = shifted_targets(labels, b, s)
        .iter()
        .filter(|&&t| t != -100)
        .count();
    let mut m = model.clone();
    let params = super::flat::DeviceParams::adopt(&mut m)?;
    let grads = params.zero_grads()?;
    let ids: Vec<u32> = input_ids.flatten_all()?.to_vec1()?;
    let lens = vec![s; b];
    let pass = Pass {
        objective: &CausalLm,
        input_ids,
        mask,
        labels,
        ids: &ids,
        lens: &lens,
        pref: &[],
        view: None,
        denom: count.max(1) as f64,
        seed,
        ckpt: ckpt.into(),
    };
    let (out, named) = run_named(&pass, &m, &params, grads)?;
    Ok((f64::from(out.loss.to_scalar::<f32>()?), named))
}

/// Each trainable tensor's gradient, by name.
pub type NamedGrads = Vec<(String, Tensor)>;

/// The loss of `batch` under `objective` (summed over its examples or tokens and divided by
/// `denom`), the gradient of every trainable tensor by name, and the objective's metrics: what
/// the preference tests compare with TRL.
pub fn objective_gradients(
    model: &Model,
    objective: &dyn Objective,
    batch: &Batch,
    denom: f64,
) -> Result<(f64, NamedGrads, Metrics)> {
    let mut m = model.clone();
    let params = super::flat::DeviceParams::adopt(&mut m)?;
    let grads = params.zero_grads()?;
    let mask = batch.mask();
    let pass = Pass {
        objective,
        input_ids: &batch.input_ids,
        mask: &mask,
        labels: &batch.labels_host,
        ids: &batch.ids_host,
        lens: &batch.lens,
        pref: &batch.pref,
        view: batch.view.as_ref(),
        denom,
        seed: None,
        ckpt: Checkpointing::Off,
    };
    let (out, named) = run_named(&pass, &m, &params, grads)?;
    Ok((f64::from(out.loss.to_scalar::<f32>()?), named, out.metrics))
}

/// Runs `pass` and names each trainable tensor's gradient.
fn run_named(
    pass: &Pass<'_>,
    model: &Model,
    params: &super::flat::DeviceParams,
    mut grads: DeviceGrads<'_>,
) -> Result<(MicroOut, Vec<(String, Tensor)>)> {
    let out = pass.run(model, &mut grads, &mut NoHook)?;
    let bufs = grads
        .parts
        .into_iter()
        .map(super::flat::FlatGrads::into_buffer)
        .collect::<Result<Vec<_>>>()?;
    let named = params
        .slots()
        .map(|(k, s)| Ok((s.name.clone(), s.of(&bufs[k])?)))
        .collect::<Result<Vec<_>>>()?;
    Ok((out, named))
}

/// One forward + backward over a batch.
struct Pass<'a> {
    objective: &'a dyn Objective,
    input_ids: &'a Tensor,
    mask: &'a AttnMask,
    labels: &'a [i64],
    ids: &'a [u32],
    lens: &'a [usize],
    pref: &'a [PrefRows],
    /// A preference batch's two rows a pair, as the objective reads them.
    view: Option<&'a PairView>,
    denom: f64,
    seed: Option<Key>,
    ckpt: Checkpointing,
}

/// One micro-batch between its stages: what its blocks saved, its hidden state (forward) or
/// gradient (backward).
struct InFlight {
    tables: DeviceTables,
    inputs: BlockInputs,
    saved: Vec<Option<BlockSaved>>,
    /// The hidden state after the blocks run so far; after the loss, the gradient.
    x: Tensor,
    loss: Option<MicroOut>,
}

impl Pass<'_> {
    fn step<'t>(&'t self, cos: &'t Tensor, sin: &'t Tensor) -> Step<'t> {
        Step {
            cos,
            sin,
            mask: self.mask,
            train_seed: self.seed,
        }
    }

    fn at(&self, op: String) -> impl FnOnce(candle_core::Error) -> Error {
        let shape = self.input_ids.dims().to_vec();
        move |source: candle_core::Error| Error::Engine {
            op,
            shape,
            source: Box::new(crate::error::without_backtrace(source)),
        }
    }

    /// Forward, loss and backward of the whole model, one micro-batch.
    fn run(
        &self,
        model: &Model,
        grads: &mut DeviceGrads,
        hook: &mut dyn BlockHook,
    ) -> Result<MicroOut> {
        let n = model.decoder.blocks.len();
        let mut f = self.embed(model)?;
        self.forward(model, &mut f, 0..n, hook)?;
        self.loss(model, &mut f, grads)?;
        self.backward(model, &mut f, 0..n, grads, hook)?;
        self.finish(model, f, grads)
    }

    /// The embedding: the micro-batch enters the first block.
    fn embed(&self, model: &Model) -> Result<InFlight> {
        let d = &model.decoder;
        let (b, s) = self.input_ids.dims2()?;
        let tables = d
            .rope_tables(self.mask, b, s)
            .map_err(self.at("rope tables".into()))?;
        let x = d
            .embed_tokens(self.input_ids)
            .map_err(self.at("embedding".into()))?;
        Ok(InFlight {
            tables: DeviceTables::new(tables, d.device()),
            inputs: BlockInputs::new(self.ckpt.offload(), d.blocks.len()),
            saved: Vec::with_capacity(d.blocks.len()),
            x,
            loss: None,
        })
    }

    /// Forward through `blocks` (the next ones in order).
    fn forward(
        &self,
        model: &Model,
        f: &mut InFlight,
        blocks: std::ops::Range<usize>,
        hook: &mut dyn BlockHook,
    ) -> Result<()> {
        let n = model.decoder.blocks.len();
        for i in blocks {
            let blk = &model.decoder.blocks[i];
            // Placement: the hidden state moves to each block's device (nothing when it is there).
            let x = hook.before_forward(i, to(&f.x, blk.device())?)?;
            let (cos, sin) = f.tables.on(blk.device())?;
            let step = self.step(&cos, &sin);
            let mut sv = (!self.ckpt.recomputes(i, n)).then(BlockSaved::default);
            let span = trace::span(|| format!("forward {i}"), blk.device());
            let y = blk
                .forward(&x, &step, None, i, sv.as_mut())
                .map_err(self.at(format!("forward of layer {i}")))?;
            drop(span);
            f.inputs.push(x)?;
            f.saved.push(sv);
            f.x = y;
        }
        Ok(())
    }

    /// The final norm and the loss; `f.x` becomes the gradient into the last block.
    fn loss(&self, model: &Model, f: &mut InFlight, grads: &mut DeviceGrads) -> Result<()> {
        let d = &model.decoder;
        let (b, s) = self.input_ids.dims2()?;
        let eps = d.cfg.rms_norm_eps;
        let span = crate::profile::span("loss", d.device());
        let (dx, out) = (|| {
            // The final norm on its device, the head on its own (the embedding's when tied).
            let x = to(&f.x, d.norm.device())?;
            let hidden = rms_norm(&x, &d.norm, eps)?;
            let rows = to(
                &hidden.reshape((b * s, d.cfg.hidden_size))?,
                d.head_weight().device(),
            )?;
            let sink: &mut dyn GradSink = grads;
            let labels = Labels {
                labels: self.labels,
                rows: b,
                seq: s,
                input_ids: self.ids,
                lens: self.lens,
                pref: self.pref,
            };
            let (seen, labels) = labels.viewed(&rows, self.view)?;
            let out =
                self.objective
                    .loss(&seen, d.head_weight(), labels, self.denom, Some(sink))?;
            let dh = out
                .d_hidden
                .ok_or_else(|| candle_core::Error::Msg("loss returned no gradient".into()))?;
            let dh = match self.view {
                Some(v) => v.unpick(&dh, b * s)?,
                None => dh,
            };
            let dh = to(&dh, x.device())?.reshape(x.shape())?;
            let dx = rms_norm_backward_into(&x, &d.norm, eps, &dh, grads)?;
            Ok((
                dx,
                MicroOut {
                    loss: out.loss,
                    count: out.count,
                    metrics: out.metrics,
                },
            ))
        })()
        .map_err(self.at("loss".into()))?;
        drop(span);
        f.x = dx;
        f.loss = Some(out);
        Ok(())
    }

    /// Backward through `blocks` (the last ones not yet done), in reverse.
    fn backward(
        &self,
        model: &Model,
        f: &mut InFlight,
        blocks: std::ops::Range<usize>,
        grads: &mut DeviceGrads,
        hook: &mut dyn BlockHook,
    ) -> Result<()> {
        for i in blocks.rev() {
            let blk = &model.decoder.blocks[i];
            let (cos, sin) = f.tables.on(blk.device())?;
            let step = self.step(&cos, &sin);
            let sv = if let Some(sv) = f.saved[i].take() {
                sv
            } else {
                let x = f.inputs.take(i)?;
                let _span = trace::span(|| format!("recompute {i}"), blk.device());
                blk.recompute(&x, &step, i)
                    .map_err(self.at(format!("recompute of layer {i}")))?
            };
            let span = trace::span(|| format!("backward {i}"), blk.device());
            f.x = blk
                .backward(&sv, &to(&f.x, blk.device())?, &step, grads)
                .map_err(self.at(format!("backward of layer {i}")))?;
            drop(span);
            drop(sv);
            f.inputs.truncate(i);
            hook.after_backward(i, grads)?;
        }
        Ok(())
    }

    /// The embedding's gradient; the micro-batch is done.
    fn finish(&self, model: &Model, f: InFlight, grads: &mut DeviceGrads) -> Result<MicroOut> {
        let d = &model.decoder;
        let (b, s) = self.input_ids.dims2()?;
        let _span = crate::profile::span("embedding grad", d.device());
        let rows = to(&f.x, d.device())?.reshape((b * s, d.cfg.hidden_size))?;
        grads.add_rows(&d.embed, self.input_ids, &rows)?;
        f.loss
            .ok_or_else(|| Error::InvalidArgument("a micro-batch finished without its loss".into()))
    }
}

/// The model's blocks in stages: runs of consecutive blocks on one device (placement over several
/// devices), or `stages` even runs when given (to check the schedule on one device).
pub fn stages(model: &Model, stages: Option<usize>) -> Vec<std::ops::Range<usize>> {
    let blocks = &model.decoder.blocks;
    let n = blocks.len();
    if let Some(k) = stages {
        let k = k.clamp(1, n.max(1));
        return (0..k).map(|j| j * n / k..(j + 1) * n / k).collect();
    }
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        match out.last_mut() {
            Some(r) if blocks[r.start].device().same_device(b.device()) => r.end = i + 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

/// An accumulation window's micro-batches through the stages in a pipeline (GPipe's schedule):
/// at each tick every stage takes the next micro-batch that reached it, forward over the whole
/// window, then backward in reverse. The host issues each device's work while the others still
/// run, so with the model over several GPUs they work at once, where the sequential schedule has
/// one working at a time. Every micro-batch's activations are held until its backward (or only
/// the block inputs, with `recompute`). The same gradients as [`micro_step`] over each batch in
/// turn, up to the order in which they are added.
pub fn window_pipelined(
    model: &Model,
    objective: &dyn Objective,
    batches: &[(&Batch, Key)],
    denom: f64,
    ckpt: Checkpointing,
    stages: &[std::ops::Range<usize>],
    grads: &mut DeviceGrads,
) -> Result<Vec<MicroOut>> {
    let masks: Vec<AttnMask> = batches.iter().map(|(b, _)| b.mask()).collect();
    let passes: Vec<Pass> = batches
        .iter()
        .zip(&masks)
        .map(|((b, key), mask)| Pass {
            objective,
            input_ids: &b.input_ids,
            mask,
            labels: &b.labels_host,
            ids: &b.ids_host,
            lens: &b.lens,
            pref: &b.pref,
            view: b.view.as_ref(),
            denom,
            seed: Some(*key),
            ckpt,
        })
        .collect();
    let (m, k) = (passes.len(), stages.len());
    let mut hook = NoHook;
    let mut flights: Vec<Option<InFlight>> = Vec::with_capacity(m);
    for p in &passes {
        flights.push(Some(p.embed(model)?));
    }
    fn take(f: &mut Option<InFlight>) -> Result<&mut InFlight> {
        f.as_mut()
            .ok_or_else(|| Error::InvalidArgument("pipeline: a micro-batch ran out of turn".into()))
    }
    // Forward: at tick t, stage j takes micro-batch t - j (the last stage first, so the devices
    // further on get their work before the first takes the next micro-batch).
    for t in 0..m + k - 1 {
        for j in (0..k).rev() {
            let Some(i) = t.checked_sub(j).filter(|&i| i < m) else {
                continue;
            };
            let f = take(&mut flights[i])?;
            passes[i].forward(model, f, stages[j].clone(), &mut hook)?;
            if j == k - 1 {
                passes[i].loss(model, f, grads)?;
            }
        }
    }
    // Backward: the micro-batches in reverse, the stages from the last.
    let mut outs: Vec<Option<MicroOut>> = (0..m).map(|_| None).collect();
    for t in 0..m + k - 1 {
        for d in (0..k).rev() {
            let Some(r) = t.checked_sub(d).filter(|&r| r < m) else {
                continue;
            };
            let (i, j) = (m - 1 - r, k - 1 - d);
            let f = take(&mut flights[i])?;
            passes[i].backward(model, f, stages[j].clone(), grads, &mut hook)?;
            if j == 0 {
                let f = flights[i].take().ok_or_else(|| {
                    Error::InvalidArgument("pipeline: a micro-batch ran out of turn".into())
                })?;
                outs[i] = Some(passes[i].finish(model, f, grads)?);
            }
        }
    }
    outs.into_iter()
        .map(|o| {
            o.ok_or_else(|| Error::InvalidArgument("pipeline: a micro-batch did not finish".into()))
        })
        .collect()
}

/// The final (normed) hidden states of `batch`, without gradients: `[rows * seq, hidden]` on
/// the head's device, what an objective scores outside training (evaluation, the reference pass).
pub fn final_hidden(model: &Model, batch: &Batch) -> Result<Tensor> {
    let d = &model.decoder;
    let (b, s) = batch.input_ids.dims2()?;
    let x = d.hidden(&batch.input_ids, &batch.mask(), None, None)?;
    let hidden = d.normed(&x)?.reshape((b * s, d.cfg.hidden_size))?;
    Ok(to(&hidden, d.head_weight().device())?)
}

/// The loss of `batch` (summed over the objective's count, and the count), without gradients,
/// with the objective's metrics.
pub fn eval_loss(
    model: &Model,
    objective: &dyn Objective,
    batch: &Batch,
) -> Result<(f64, usize, Metrics)> {
    let d = &model.decoder;
    let hidden = final_hidden(model, batch)?;
    let (hidden, labels) = Labels::of(batch)?.viewed(&hidden, batch.view.as_ref())?;
    let out = objective.loss(&hidden, d.head_weight(), labels, 1.0, None)?;
    Ok((
        f64::from(out.loss.to_scalar::<f32>()?),
        out.count,
        out.metrics,
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::data::batch::collate;
    use crate::data::sft::Example;
    use crate::lora::{LoraConfig, Targets};
    use crate::model::{TinyConfig, tiny};
    use candle_core::Device;

    /// GPipe's schedule over 1, 2 and 3 stages (without checkpointing, with it, with offload;
    /// dropout on) gives the
    /// gradients and losses of running the window's micro-batches one after the other.
    #[test]
    fn the_pipelined_window_equals_the_sequential_one() {
        let m = tiny(&TinyConfig {
            hidden: 32,
            layers: 3,
            intermediate: 64,
            seed: 2,
            ..TinyConfig::default()
        })
        .unwrap();
        let cfg = LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.1,
            target_modules: Targets::Pattern("all-linear".into()),
            ..LoraConfig::default()
        };
        let mut model = crate::lora::attach(&m, &cfg, 2).unwrap();
        let params = super::super::flat::DeviceParams::adopt(&mut model).unwrap();
        let ex: Vec<Example> = (0..6)
            .map(|i| Example {
                input_ids: (0..5 + i).map(|t| (t * 7 + i * 3) % 250 + 3).collect(),
                labels: (0..5 + i)
                    .map(|t| {
                        if t < 2 {
                            -100
                        } else {
                            i64::from((t * 5) % 250 + 3)
                        }
                    })
                    .collect(),
                packed: Vec::new(),
                pref: None,
            })
            .collect();
        let refs: Vec<&Example> = ex.iter().collect();
        let batches: Vec<Batch> = refs
            .chunks(2)
            .map(|c| collate(c, 0, None, &Device::Cpu).unwrap())
            .collect();
        let keyed: Vec<(&Batch, Key)> = batches
            .iter()
            .enumerate()
            .map(|(i, b)| {
                (
                    b,
                    Key {
                        key: 11,
                        first_row: 2 * i as u64,
                    },
                )
            })
            .collect();
        use crate::testing::{max_abs, max_abs_diff};
        for ckpt in [
            Checkpointing::Off,
            Checkpointing::On,
            Checkpointing::Offload,
        ] {
            let mut want = params.zero_grads().unwrap();
            let mut losses = Vec::new();
            for (b, key) in &keyed {
                let out = micro_step(
                    &model,
                    &CausalLm,
                    b,
                    20.0,
                    *key,
                    ckpt,
                    &mut want,
                    &mut NoHook,
                )
                .unwrap();
                losses.push(out.loss.to_scalar::<f32>().unwrap());
            }
            for k in [1, 2, 3] {
                let st = stages(&model, Some(k));
                assert_eq!(st.len(), k);
                let mut got = params.zero_grads().unwrap();
                let outs =
                    window_pipelined(&model, &CausalLm, &keyed, 20.0, ckpt, &st, &mut got).unwrap();
                for (o, l) in outs.iter().zip(&losses) {
                    assert!((o.loss.to_scalar::<f32>().unwrap() - l).abs() < 1e-6);
                }
                let (a, b) = (
                    want.parts[0].buffer().unwrap(),
                    got.parts[0].buffer().unwrap(),
                );
                let (worst, scale) = (max_abs_diff(a, b), max_abs(a));
                assert!(
                    worst <= 1e-5 * scale,
                    "{k} stages, {ckpt:?}: {worst} of {scale}"
                );
            }
        }
        // One device: one stage.
        assert_eq!(stages(&model, None), vec![0..3]);
    }
}
