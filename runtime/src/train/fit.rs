//! A whole run: [`fit`] starts a [`Trainer`] and [`run`] drives it through every step, reporting
//! events as they come; Ctrl-C saves a checkpoint at the next step boundary and stops.

use std::sync::Arc;

use super::config::TrainConfig;
use super::trainer::{Event, TrainReport, Trainer};
use crate::Result;
use crate::cancel::CancelToken;
use crate::data::sft::Example;
use crate::model::Model;

/// Trains `model` on `train` (and evaluates on `eval`), reporting through `on_event`. Ctrl-C
/// (`cancel`) saves a checkpoint at the next step boundary and stops.
pub fn fit(
    model: &Model,
    train: &[Example],
    eval: Option<&[Example]>,
    cfg: &TrainConfig,
    pad_id: u32,
    cancel: &CancelToken,
    on_event: &mut dyn FnMut(&Event) -> Result<()>,
) -> Result<TrainReport> {
    let t = Trainer::new(
        model,
        Arc::new(train.to_vec()),
        eval.map(|e| Arc::new(e.to_vec())),
        cfg,
        pad_id,
    )?;
    run(t, cancel, on_event)
}

/// Runs `t` to its end (every step, early stopping, or Ctrl-C on any rank), reporting through
/// `on_event` on rank 0 (the others' progress is the same).
pub fn run(
    mut t: Trainer,
    cancel: &CancelToken,
    on_event: &mut dyn FnMut(&Event) -> Result<()>,
) -> Result<TrainReport> {
    let lead = t.lead();
    // When the run ends, however it ends: offloaded activations' pinned host memory goes back,
    // and under `QSCRIPT_TRACE` the lead rank writes the run's GPU timeline.
    struct Ending {
        lead: bool,
    }
    impl Drop for Ending {
        fn drop(&mut self) {
            let _ = crate::device::offload::trim();
            if !self.lead {
                return;
            }
            let said = match crate::device::trace::finish() {
                Ok(Some(s)) => format!("QSCRIPT_TRACE: the run's GPU timeline: {s}"),
                Ok(None) => return,
                Err(e) => format!("QSCRIPT_TRACE: the timeline was not written: {e}"),
            };
            crate::notice::say(said);
        }
    }
    let _ending = Ending { lead };
    let mut on_event = |e: &Event| if lead { on_event(e) } else { Ok(()) };
    on_event(&t.start_event())?;
    while !t.is_done() {
        let windows = t.windows();
        if windows.is_empty() {
            break;
        }
        for w in windows {
            if t.should_stop(cancel)? {
                // Ctrl-C keeps a checkpoint to resume from; a run superseded by an edit under
                // `--watch` keeps none (the edited recipe runs again from its cell).
                if !cancel.is_superseded()
                    && let Some(path) = t.checkpoint_now()?
                {
                    on_event(&Event::Saved(path))?;
                }
                return t.finish(true);
            }
            let out = t.step(&w)?;
            for e in &out.events {
                on_event(e)?;
            }
            if out.done {
                break;
            }
        }
    }
    t.finish(false)
}
