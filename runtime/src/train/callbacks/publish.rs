//! [`Publisher`]: hands the weights as trained so far to a reader after each optimizer step (a
//! server answering while the run trains), so the reader never sees half an update.

use super::{Callback, Run};
use crate::Result;
use crate::model::Model;

/// Calls `publish` with a copy of the model after each optimizer step (the copy's trainable
/// tensors are its own: later steps do not change it).
pub struct Publisher {
    publish: Box<dyn FnMut(Model) + Send>,
}

impl Publisher {
    /// A publisher that hands each step's weights to `publish`.
    pub fn new(publish: impl FnMut(Model) + Send + 'static) -> Self {
        Self {
            publish: Box::new(publish),
        }
    }
}

impl Callback for Publisher {
    fn on_step(&mut self, run: &mut Run<'_>) -> Result<()> {
        (self.publish)(run.exec.snapshot()?);
        Ok(())
    }
}
