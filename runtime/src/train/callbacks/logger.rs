//! The log record at the logging cadence, as HF's Trainer logs it: the mean loss of the steps
//! since the last record, the last step's gradient norm (HF logs the norm of the step it logs
//! at, not a mean), the learning rate, the epoch and the speed.

use std::time::Instant;

use serde_json::json;

use super::{Callback, Event, Run};
use crate::Result;

/// See the module doc.
#[derive(Debug)]
pub struct Logger {
    tokens_since_log: usize,
    last_log: Instant,
}

impl Logger {
    /// Counting from now.
    pub fn new() -> Self {
        Self {
            tokens_since_log: 0,
            last_log: Instant::now(),
        }
    }
}

impl Default for Logger {
    fn default() -> Self {
        Self::new()
    }
}

impl Callback for Logger {
    fn on_step(&mut self, run: &mut Run<'_>) -> Result<()> {
        self.tokens_since_log += run.tokens;
        if !run.cfg.logs_at(run.step, run.total) {
            return Ok(());
        }
        let read = &mut run.readback.since_log;
        let n = read.len().max(1) as f64;
        let secs = self.last_log.elapsed().as_secs_f64().max(1e-9);
        let mut rec = json!({
            "step": run.step,
            "epoch": (run.epoch * 1000.0).round() / 1000.0,
            "loss": read.iter().map(|w| w.0).sum::<f64>() / n,
            "grad_norm": read.last().map_or(0.0, |w| w.1),
            "learning_rate": run.lr,
            "tokens_per_second": (self.tokens_since_log as f64 / secs).round(),
        });
        read.clear();
        // The objective's metrics (TRL's `rewards/chosen`, ...), each over its count.
        if let Some(obj) = rec.as_object_mut() {
            for (name, sum, count) in run.readback.metrics_since_log.drain(..) {
                if count > 0.0 {
                    obj.insert(name.into(), json!(sum / count));
                }
            }
        }
        self.tokens_since_log = 0;
        self.last_log = Instant::now();
        run.events.push(Event::Log(rec));
        Ok(())
    }
}
