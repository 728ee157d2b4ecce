//! Checkpoints: the output dir's lock (one run at a time) and the recovery of saves a killed
//! process left half done; `checkpoint-N` every `save_steps` and for each new best eval
//! (`load_best_model_at_end`); `save_total_limit` rotation (the best kept); at the end, the best
//! checkpoint's weights loaded back. Under ZeRO every rank takes part in each save (rank 0
//! writes, the others send their shares of the moments).

use std::path::{Path, PathBuf};

use super::{Callback, Event, Run};
use crate::Result;
use crate::train::checkpoint::{self, DirLock};

/// See the module doc.
#[derive(Debug)]
pub struct Checkpointer {
    /// Rank 0's hold on the output dir (`None` on the other ranks: they write nothing).
    _lock: Option<DirLock>,
}

impl Checkpointer {
    /// Takes `out_dir` for this run (rank 0: `lead`): creates it, locks it and recovers what a
    /// killed save left there.
    pub fn open(out_dir: &Path, lead: bool) -> Result<Self> {
        if !lead {
            return Ok(Self { _lock: None });
        }
        crate::sandbox::create_dir_all(out_dir)?;
        let lock = DirLock::take(out_dir)?;
        for done in checkpoint::recover(out_dir)? {
            crate::notice::say(format!("note: `{}`: {done}", out_dir.display()));
        }
        Ok(Self { _lock: Some(lock) })
    }

    /// Writes this step's checkpoint (its losses read back first); on rank 0 applies the
    /// rotation and returns its path.
    fn save(&mut self, run: &mut Run<'_>) -> Result<Option<PathBuf>> {
        run.readback.flush()?;
        let (path, written) = run.exec.save(run.out_dir, run.state)?;
        if !written {
            return Ok(None);
        }
        self.on_save(run, &path)?;
        Ok(Some(path))
    }
}

impl Callback for Checkpointer {
    fn on_step(&mut self, run: &mut Run<'_>) -> Result<()> {
        let lead = run.collective.lead();
        let periodic = run.cfg.saves_at(run.step, run.total, run.epoch_end);
        // A new best that `load_best_model_at_end` keeps: the best checkpoint is this step's.
        let mut best = run.improved == Some(true) && run.cfg.load_best_model_at_end;
        let saving = lead && periodic && !best;
        if run.exec.sharded() {
            // Under ZeRO rank 0 writes each checkpoint with every rank's share of the moments:
            // the others learn of a best checkpoint from rank 0 and send their shares.
            if run.cfg.evaluates_at(run.step, run.total, run.epoch_end)
                && run.cfg.load_best_model_at_end
            {
                best = run.collective.any(best)?;
            }
            if !lead && (best || periodic) {
                self.save(run)?;
            }
        }
        if lead
            && (saving || best)
            && let Some(path) = self.save(run)?
        {
            run.events.push(Event::Saved(path));
        }
        Ok(())
    }

    fn on_save(&mut self, run: &mut Run<'_>, _: &Path) -> Result<()> {
        if let Some(limit) = run.cfg.save_total_limit {
            let keep = run
                .state
                .best_model_checkpoint
                .as_deref()
                .filter(|_| run.cfg.load_best_model_at_end);
            checkpoint::rotate(run.out_dir, limit, keep)?;
        }
        Ok(())
    }

    fn on_end(&mut self, run: &mut Run<'_>) -> Result<()> {
        if run.cfg.load_best_model_at_end
            && let Some(best) = &run.state.best_model_checkpoint
        {
            let dir = run.out_dir.join(best);
            if dir.is_dir() {
                run.exec.restore(&dir)?;
                run.loaded_best = true;
            }
        }
        Ok(())
    }
}
