//! Evaluation at the eval cadence (`eval_strategy: "steps"`): the eval loss, logged, and the
//! best so far (HF's `best_metric` and `best_model_checkpoint`, kept in the trainer state).

use serde_json::json;

use super::{Callback, Event, Run};
use crate::{Error, Result};

/// See the module doc.
#[derive(Debug, Default)]
pub struct Evaluator;

impl Callback for Evaluator {
    fn on_step(&mut self, run: &mut Run<'_>) -> Result<()> {
        if !run.cfg.evaluates_at(run.step, run.total, run.epoch_end) {
            return Ok(());
        }
        let data = run
            .eval
            .ok_or_else(|| Error::InvalidArgument("no eval dataset was given".into()))?;
        let Some(eval) = run.exec.evaluate(data)? else {
            return Ok(());
        };
        let loss = eval.loss;
        let mut rec = json!({"step": run.step, "eval_loss": loss});
        // The objective's metrics with HF's `eval_` prefix (`eval_rewards/accuracies`, ...).
        if let Some(obj) = rec.as_object_mut() {
            for (name, sum, count) in eval.metrics {
                if count > 0.0 {
                    obj.insert(format!("eval_{name}"), json!(sum / count));
                }
            }
        }
        run.events.push(Event::Eval(rec));
        let improved = run.state.best_metric.is_none_or(|b| loss < b);
        if improved {
            run.state.best_metric = Some(loss);
            run.state.best_model_checkpoint = Some(format!("checkpoint-{}", run.step));
        }
        run.improved = Some(improved);
        Ok(())
    }
}
