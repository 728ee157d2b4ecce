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

/// Runs `f` on a thread of its own (the main thread's stack, quiet panics) and waits for it,
/// polling `cancel`: a cancel returns `Err(Error::Cancelled)` within 50 ms while `f` finishes
/// in the background and its result is dropped. For one long call into a library that cannot
/// poll (building a tokenizer from a 70 MB file). A panic in `f` comes back as `Err(message)`
/// inside `Ok`.
pub fn detached<R: Send + 'static>(
    cancel: &CancelToken,
    f: impl FnOnce() -> R + Send + 'static,
) -> crate::Result<std::result::Result<R, String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("qscript-detached".into())
        .stack_size(crate::panic::worker_stack_size())
        .spawn(move || {
            let _ = tx.send(crate::panic::catch(f));
        })
        .map_err(|e| crate::Error::io("<thread>", e))?;
    loop {
        cancel.check()?;
        match rx.recv_timeout(std::time::Duration::from_millis(50)) {
            Ok(r) => return Ok(r),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Ok(Err("the worker thread ended without a result".into()));
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
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

    /// A long call run detached returns its value, a panic as its message, and a cancel within
    /// a fraction of a second while the call goes on.
    #[test]
    fn detached_work_answers_a_cancel_at_once() {
        let c = CancelToken::new();
        assert_eq!(detached(&c, || 7).unwrap(), Ok(7));
        let e = detached(&c, || -> u8 { panic!("inside") }).unwrap();
        assert_eq!(e, Err("inside".to_string()));
        let (stop, stopper) = crate::testing::cancel_after(std::time::Duration::from_millis(100));
        let start = std::time::Instant::now();
        let r = detached(&stop, || {
            std::thread::sleep(std::time::Duration::from_secs(5));
        });
        assert!(matches!(r, Err(crate::Error::Cancelled)));
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
        stopper.join().unwrap();
    }
}
