//! The run's records where users read them: `metrics.jsonl` (one JSON record a line),
//! TensorBoard event files (`report_to: "tensorboard"`), the trainer state's `log_history`, and
//! at the end the loss plot (`loss.png`, `loss.svg`). Rank 0 alone keeps them.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use super::{Callback, Event, Run};
use crate::train::TrainConfig;
use crate::train::tensorboard::EventWriter;
use crate::{Error, Result};

/// See the module doc.
pub struct Metrics {
    path: PathBuf,
    file: std::fs::File,
    tensorboard: Option<EventWriter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Metrics({})", self.path.display())
    }
}

impl Metrics {
    /// Writes `training_args.json`, makes `metrics.jsonl` this run's (a run resumed at step
    /// `resumed_at` keeps the records up to it) and opens the TensorBoard writer when asked.
    pub fn open(
        out_dir: &Path,
        cfg: &TrainConfig,
        tensorboard: bool,
        resumed_at: usize,
    ) -> Result<Self> {
        let json = serde_json::to_string_pretty(cfg).unwrap_or_default();
        crate::sandbox::write_atomic(&out_dir.join("training_args.json"), json.as_bytes())?;
        let path = out_dir.join("metrics.jsonl");
        own_metrics(&path, resumed_at)?;
        let file = crate::sandbox::open_write(&path, crate::sandbox::WriteMode::Append)?;
        let tensorboard = if tensorboard {
            let dir = cfg
                .logging_dir
                .as_ref()
                .map_or_else(|| out_dir.join("runs"), PathBuf::from);
            Some(EventWriter::create(&dir)?)
        } else {
            None
        };
        Ok(Self {
            path,
            file,
            tensorboard,
        })
    }
}

impl Callback for Metrics {
    fn on_step(&mut self, run: &mut Run<'_>) -> Result<()> {
        for e in run.events.iter() {
            let (Event::Log(rec) | Event::Eval(rec)) = e else {
                continue;
            };
            writeln!(self.file, "{rec}").map_err(|e| Error::io(&self.path, e))?;
            if let Some(tb) = &mut self.tensorboard {
                tb.log(rec)?;
            }
            run.state.log_history.push(rec.clone());
        }
        Ok(())
    }

    fn on_end(&mut self, run: &mut Run<'_>) -> Result<()> {
        crate::train::plot::write(run.out_dir, &run.state.log_history)
    }
}

/// Makes `metrics.jsonl` this run's: a fresh run (`resumed_at` 0) starts it empty, a resumed one
/// keeps the records up to its checkpoint's step (a later, abandoned stretch is dropped).
fn own_metrics(path: &Path, resumed_at: usize) -> Result<()> {
    let kept = if resumed_at == 0 {
        String::new()
    } else {
        let old = match crate::files::read_text(path) {
            Ok(t) => t,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mut kept = String::new();
        for l in old.lines().filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|r| r.get("step").and_then(serde_json::Value::as_u64))
                .is_some_and(|s| s as usize <= resumed_at)
        }) {
            kept.push_str(l);
            kept.push('\n');
        }
        kept
    };
    crate::sandbox::write_atomic(path, kept.as_bytes())
}
