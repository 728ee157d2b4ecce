//! Early stopping (HF's `EarlyStoppingCallback`): the evaluations since the best one are
//! counted in the trainer state; `early_stopping_patience` of them stop the run. Under data
//! parallel rank 0's evaluation decides, and every rank stops at the same step (the loop's
//! agreement, [`Callback::may_stop`]).

use super::{Callback, Run};
use crate::Result;

/// See the module doc.
#[derive(Debug, Default)]
pub struct EarlyStopping {
    /// `early_stopping_patience`.
    pub patience: Option<usize>,
}

impl Callback for EarlyStopping {
    fn may_stop(&self) -> bool {
        self.patience.is_some()
    }

    fn on_step(&mut self, run: &mut Run<'_>) -> Result<()> {
        let patience = self.patience;
        match run.improved {
            Some(true) => run.state.evals_without_improvement = 0,
            Some(false) => {
                run.state.evals_without_improvement += 1;
                run.stop |= patience.is_some_and(|p| run.state.evals_without_improvement >= p);
            }
            None => {}
        }
        Ok(())
    }
}
