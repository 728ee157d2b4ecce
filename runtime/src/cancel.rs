//! A cancel token shared between the thread that runs work and the ones that stop it.
//!
//! Script evaluation polls it between operations; long native work (tokenizing, training) must
//! poll it too, because Rhai's progress callback does not fire while native code runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A cheap, cloneable flag. All clones see the same state.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicBool>, Arc<AtomicBool>);

impl CancelToken {
    /// A fresh token, not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every holder to stop at its next cancellation point.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Asks every holder to stop because its work is superseded (`--watch` saw the recipe
    /// change and runs it again): nothing of it is worth keeping, so a training run stops without
    /// its Ctrl-C checkpoint (which would be a stale "unfinished run" in its output dir).
    pub fn cancel_superseded(&self) {
        self.1.store(true, Ordering::SeqCst);
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether the stop asked for is [`CancelToken::cancel_superseded`]'s.
    pub fn is_superseded(&self) -> bool {
        self.1.load(Ordering::SeqCst)
    }

    /// Whether a stop was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Clears the flag before the next run.
    pub fn reset(&self) {
        self.0.store(false, Ordering::SeqCst);
        self.1.store(false, Ordering::SeqCst);
    }

    /// `Err(Error::Cancelled)` once cancelled: the one-line cancellation point for native loops.
    pub fn check(&self) -> crate::Result<()> {
        if self.is_cancelled() {
            Err(crate::Error::Cancelled)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_state() {
        let a = CancelToken::new();
        let b = a.clone();
        assert!(a.check().is_ok());
        b.cancel();
        assert!(a.is_cancelled());
        assert!(matches!(a.check(), Err(crate::Error::Cancelled)));
        a.reset();
        assert!(!b.is_cancelled());
    }
}
