//! Inputs run in-process, one after another on one thread with the main thread's stack, each
//! under a time bound: for `qscript-fuzz repro` and the regression tests. A panic that escapes
//! the entry point and an input that runs past its bound are failures (a hung input's thread is
//! left behind: the caller reports and ends). Aborts and stack overflows end the process, as
//! they would end `qscript`.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::targets::{Outcome, Target};

/// How one input ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The entry point returned (`Ok` or its error).
    Returned(Outcome),
    /// A panic escaped it, with the panic's message.
    Panicked(String),
}

/// Why a batch stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stop {
    /// The harness could not be made (its error).
    Setup(String),
    /// Input `index` ran past the bound.
    Hung {
        /// Which input.
        index: usize,
        /// The bound it passed.
        limit: Duration,
    },
}

enum Msg {
    Ready,
    Started(usize),
    Done(Verdict, Duration),
}

/// The message of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic with no message)".into())
}

/// Runs `inputs` through `target` in order, each within `limit`; returns each input's verdict
/// and time, or why the batch stopped.
pub fn run_all(
    target: &'static Target,
    inputs: Vec<Vec<u8>>,
    limit: Duration,
) -> Result<Vec<(Verdict, Duration)>, Stop> {
    let n = inputs.len();
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::Builder::new()
        .name(format!("fuzz-{}", target.name))
        .stack_size(qscript_runtime::panic::worker_stack_size())
        .spawn(move || {
            let mut h = match (target.harness)() {
                Ok(h) => h,
                Err(e) => return Err(format!("{e:#}")),
            };
            let _ = tx.send(Msg::Ready);
            for (i, input) in inputs.iter().enumerate() {
                let _ = tx.send(Msg::Started(i));
                let t0 = Instant::now();
                let v =
                    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.run(input))) {
                        Ok(o) => Verdict::Returned(o),
                        Err(p) => Verdict::Panicked(panic_message(p.as_ref())),
                    };
                let _ = tx.send(Msg::Done(v, t0.elapsed()));
            }
            Ok(())
        })
        .map_err(|e| Stop::Setup(e.to_string()))?;
    // Making a harness builds a model or a tokenizer: a longer bound than one input's.
    match rx.recv_timeout(limit.max(Duration::from_mins(2))) {
        Ok(Msg::Ready) => {}
        _ => {
            return Err(Stop::Setup(match worker.join() {
                Ok(Err(e)) => e,
                _ => "the harness did not start".into(),
            }));
        }
    }
    let mut out = Vec::with_capacity(n);
    let mut current = None;
    while out.len() < n {
        match rx.recv_timeout(limit) {
            Ok(Msg::Started(i)) => current = Some(i),
            Ok(Msg::Done(v, t)) => out.push((v, t)),
            Ok(Msg::Ready) => {}
            Err(_) => {
                return Err(Stop::Hung {
                    index: current.unwrap_or(out.len()),
                    limit,
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::{Harness, Shape};

    struct Sleepy;

    impl Harness for Sleepy {
        fn run(&mut self, input: &[u8]) -> Outcome {
            match input {
                b"hang" => std::thread::sleep(Duration::from_hours(1)),
                b"panic" => panic!("boom"),
                _ => {}
            }
            Ok(())
        }
    }

    static SLEEPY: Target = Target {
        name: "sleepy",
        entry: "a test harness",
        max_len: 16,
        shape: Shape::Plain,
        dict: &[],
        seeds: Vec::new,
        harness: || Ok(Box::new(Sleepy)),
    };

    /// A hung input stops the batch and is named; an escaped panic is a verdict with its
    /// message: the bound the regression tests rely on can fail.
    #[test]
    fn a_hang_is_a_stop_and_a_panic_a_verdict() {
        let r = run_all(
            &SLEEPY,
            vec![b"ok".to_vec(), b"hang".to_vec()],
            Duration::from_millis(300),
        );
        assert!(matches!(r, Err(Stop::Hung { index: 1, .. })), "{r:?}");
        let r = run_all(&SLEEPY, vec![b"panic".to_vec()], Duration::from_secs(5)).unwrap();
        assert_eq!(r[0].0, Verdict::Panicked("boom".into()));
    }
}
