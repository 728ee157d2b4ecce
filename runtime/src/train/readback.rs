//! The losses and gradient norms of the steps, read back from the device in one transfer at the
//! logging cadence (and before an evaluation or a checkpoint), never once a step: a step's loss
//! stays on the device until then. Each value is checked as it comes back (a NaN or infinite loss
//! is an error naming the step and its examples).

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// An optimizer step whose loss and gradient norm are still on the device.
#[derive(Debug)]
struct Pending {
    step: usize,
    loss: Tensor,
    grad_norm: Tensor,
    window: Vec<Vec<usize>>,
    metrics: super::objective::Metrics,
}

/// See the module doc.
#[derive(Debug)]
pub struct Readback {
    /// Where the values are gathered for the one transfer (the model's device).
    device: Device,
    pending: Vec<Pending>,
    /// `(step, loss)` of every step read back so far.
    pub losses: Vec<(usize, f64)>,
    /// `(loss, gradient norm)` read back since the last log record (the logger takes them).
    pub since_log: Vec<(f64, f64)>,
    /// The objective's metrics since the last log record: `(name, sum, count)`.
    pub metrics_since_log: super::objective::Metrics,
    last_grad_norm: Option<f64>,
}

impl Readback {
    /// Nothing read yet; values are gathered on `device` for each read.
    pub fn new(device: Device) -> Self {
        Self {
            device,
            pending: Vec::new(),
            losses: Vec::new(),
            since_log: Vec::new(),
            metrics_since_log: Vec::new(),
            last_grad_norm: None,
        }
    }

    /// Keeps step `step`'s loss and gradient norm (device scalars) of `window`, and the
    /// objective's metrics (host values), for the next read.
    pub fn push(&mut self, step: usize, out: super::executor::StepOut, window: &[Vec<usize>]) {
        self.pending.push(Pending {
            step,
            loss: out.loss,
            grad_norm: out.grad_norm,
            window: window.to_vec(),
            metrics: out.metrics,
        });
    }

    /// Reads the steps not read yet (one transfer), checks them, and returns the last step's
    /// `(loss, gradient norm)` (NaN when no step was computed).
    pub fn flush(&mut self) -> Result<(f64, f64)> {
        let device = &self.device;
        if self.pending.is_empty() {
            return Ok(self
                .losses
                .last()
                .zip(self.last_grad_norm)
                .map_or((f64::NAN, f64::NAN), |(l, g)| (l.1, g)));
        }
        let mut parts = Vec::with_capacity(self.pending.len() * 2);
        for p in &self.pending {
            // The loss lies on the head's device, the norm on the first gradient buffer's.
            parts.push(p.loss.reshape(1)?.to_device(device)?);
            parts.push(p.grad_norm.reshape(1)?.to_device(device)?);
        }
        let values = Tensor::cat(&parts, 0)?.to_vec1::<f32>()?;
        let mut last = (0.0, 0.0);
        for (p, v) in self.pending.drain(..).zip(values.chunks(2)) {
            let (loss, norm) = (f64::from(v[0]), f64::from(v[1]));
            if !loss.is_finite() || !norm.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "the loss is {loss} (gradient norm {norm}) at step {} (examples {:?}); lower `learning_rate` or check the data",
                    p.step, p.window
                )));
            }
            self.losses.push((p.step, loss));
            self.since_log.push((loss, norm));
            super::objective::add_metrics(&mut self.metrics_since_log, p.metrics);
            self.last_grad_norm = Some(norm);
            last = (loss, norm);
        }
        Ok(last)
    }
}
