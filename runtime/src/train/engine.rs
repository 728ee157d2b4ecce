//! The training engine: one micro-step (forward, loss, backward) of a model, block by block.
//! This is the only backward path. Forward keeps each block's input; with `recompute` off it
//! also keeps what each block's backward needs, with it on (gradient checkpointing) the block is
//! re-run from its input just before its backward. Backward goes from the loss's `dHidden`
//! through the final norm and then each block in reverse, calling the ops' own backward
//! functions ([`crate::nn`]), so every block's activations are freed as soon as its backward is
//! done and frozen weights cost only their `dX` matmul. Gradients land in place in the flat f32
//! buffer. [`BlockHook`] is where placement moves hidden states between devices and data
//! parallel starts each block's gradient all-reduce.

use candle_core::Tensor;

use super::flat::DeviceGrads;
use crate::data::batch::Batch;
use crate::model::Model;
use crate::model::block::{BlockSaved, Step};
use crate::model::decoder::DeviceTables;
use crate::nn::dropout::Key;
use crate::nn::loss::causal_lm_loss;
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
    /// Learned tokens in the micro-batch.
    pub count: usize,
}

/// Targets for the hidden state at each position: the next token's label, -100 at the end of
/// each row. `labels` is `[b, s]` row-major.
pub fn shifted_targets(labels: &[i64], b: usize, s: usize) -> Vec<i64> {
    let mut out = vec![-100i64; b * s];
    for r in 0..b {
        for p in 0..s.saturating_sub(1) {
            out[r * s + p] = labels[r * s + p + 1];
        }
    }
    out
}

/// One micro-batch: forward, loss divided by `denom`, backward into `grads`. `seed` keys the
/// dropout masks (per example of the window), so a recomputed block draws the masks of its
/// forward and a window gives the same gradients however its examples are split into micro-batches.
pub fn micro_step(
    model: &Model,
    batch: &Batch,
    denom: f64,
    seed: Key,
    recompute: bool,
    grads: &mut DeviceGrads,
    hook: &mut dyn BlockHook,
) -> Result<MicroOut> {
    let pass = Pass {
        input_ids: &batch.input_ids,
        mask: &batch.mask(),
        labels: &batch.labels_host,
        denom,
        seed: Some(seed),
        recompute,
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
    recompute: bool,
) -> Result<(f64, Vec<(String, Tensor)>)> {
    let (b, s) = input_ids.dims2()?;
    let count = shifted_targets(labels, b, s)
        .iter()
        .filter(|&&t| t != -100)
        .count();
    let mut m = model.clone();
    let params = super::flat::DeviceParams::adopt(&mut m)?;
    let mut grads = params.zero_grads()?;
    let pass = Pass {
        input_ids,
        mask,
        labels,
        denom: count.max(1) as f64,
        seed,
        recompute,
    };
    let out = pass.run(&m, &mut grads, &mut NoHook)?;
    let named = params
        .slots()
        .map(|(k, s)| Ok((s.name.clone(), s.of(&grads.parts[k].buf)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok((f64::from(out.loss.to_scalar::<f32>()?), named))
}

/// One forward + backward over a batch.
struct Pass<'a> {
    input_ids: &'a Tensor,
    mask: &'a AttnMask,
    labels: &'a [i64],
    denom: f64,
    seed: Option<Key>,
    recompute: bool,
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

    fn run(
        &self,
        model: &Model,
        grads: &mut DeviceGrads,
        hook: &mut dyn BlockHook,
    ) -> Result<MicroOut> {
        let d = &model.decoder;
        let (b, s) = self.input_ids.dims2()?;
        let shape = vec![b, s];
        let at = |op: String| {
            let shape = shape.clone();
            move |source: candle_core::Error| Error::Engine {
                op,
                shape,
                source: Box::new(source),
            }
        };
        let tables = d
            .rope_tables(self.mask, b, s)
            .map_err(at("rope tables".into()))?;
        let mut tables = DeviceTables::new(tables, d.device());
        let mut x = d
            .embed_tokens(self.input_ids)
            .map_err(at("embedding".into()))?;
        let mut inputs = Vec::with_capacity(d.blocks.len());
        let mut saved: Vec<Option<BlockSaved>> = Vec::with_capacity(d.blocks.len());
        for (i, blk) in d.blocks.iter().enumerate() {
            // Placement: the hidden state moves to each block's device (nothing when it is there).
            x = hook.before_forward(i, x.to_device(blk.device())?)?;
            let (cos, sin) = tables.on(blk.device())?;
            let step = self.step(&cos, &sin);
            let mut sv = (!self.recompute).then(BlockSaved::default);
            let y = blk
                .forward(&x, &step, None, i, sv.as_mut())
                .map_err(at(format!("forward of layer {i}")))?;
            inputs.push(x);
            saved.push(sv);
            x = y;
        }
        let eps = d.cfg.rms_norm_eps;
        let span = crate::profile::span("loss", d.device());
        let (dx, loss, count) = (|| {
            // The final norm on its device, the head on its own (the embedding's when tied).
            let x = x.to_device(d.norm.device())?;
            let hidden = rms_norm(&x, &d.norm, eps)?;
            let targets = shifted_targets(self.labels, b, s);
            let rows = hidden
                .reshape((b * s, d.cfg.hidden_size))?
                .to_device(d.head_weight().device())?;
            let sink: &mut dyn GradSink = grads;
            let out = causal_lm_loss(&rows, d.head_weight(), &targets, self.denom, Some(sink))?;
            let dh = out
                .d_hidden
                .ok_or_else(|| candle_core::Error::Msg("loss returned no gradient".into()))?
                .to_device(x.device())?
                .reshape(x.shape())?;
            let dx = rms_norm_backward_into(&x, &d.norm, eps, &dh, grads)?;
            Ok((dx, out.loss, out.count))
        })()
        .map_err(at("loss".into()))?;
        drop(span);
        let mut g = dx;
        for i in (0..d.blocks.len()).rev() {
            let blk = &d.blocks[i];
            let (cos, sin) = tables.on(blk.device())?;
            let step = self.step(&cos, &sin);
            let sv = if let Some(sv) = saved[i].take() {
                sv
            } else {
                let mut sv = BlockSaved::default();
                blk.forward(&inputs[i], &step, None, i, Some(&mut sv))
                    .map_err(at(format!("recompute of layer {i}")))?;
                sv
            };
            g = blk
                .backward(&sv, &g.to_device(blk.device())?, &step, grads)
                .map_err(at(format!("backward of layer {i}")))?;
            drop(sv);
            inputs.truncate(i);
            hook.after_backward(i, grads)?;
        }
        let _span = crate::profile::span("embedding grad", d.device());
        let rows = g
            .to_device(d.device())?
            .reshape((b * s, d.cfg.hidden_size))?;
        grads.add_rows(&d.embed, self.input_ids, &rows)?;
        Ok(MicroOut { loss, count })
    }
}

/// The loss of `batch` (summed token loss, and the count), without gradients.
pub fn eval_loss(model: &Model, batch: &Batch) -> Result<(f64, usize)> {
    let d = &model.decoder;
    let (b, s) = batch.input_ids.dims2()?;
    let mask = batch.mask();
    let x = d.hidden(&batch.input_ids, &mask, None, None)?;
    let hidden = d.normed(&x)?.reshape((b * s, d.cfg.hidden_size))?;
    let targets = shifted_targets(&batch.labels_host, b, s);
    let out = causal_lm_loss(&hidden, d.head_weight(), &targets, 1.0, None)?;
    Ok((f64::from(out.loss.to_scalar::<f32>()?), out.count))
}
