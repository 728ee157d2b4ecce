//! What a training call prints: for a real run the plan as HF prints it, a progress bar, the log
//! and eval lines and the summary at the end (`Progress`); for `qscript check` the plan, each
//! line prefixed `check:`, and the facts of its summary (`CheckPlan`); `reporter` picks one.

use std::sync::Arc;

use qscript_runtime::train::plan::RunPlan;
use qscript_runtime::train::{Event, TrainConfig, TrainReport, Trainer};

use crate::context::{OutputSink, RunContext};

/// See the module doc.
pub(crate) trait Reporter: Send {
    /// The run starts.
    fn start(&mut self, t: &Trainer);
    /// An event of the loop.
    fn event(&mut self, e: &Event);
    /// The steps are over (or stopped).
    fn finish(&mut self);
    /// The run's summary, after `finish`.
    fn summary(&mut self, report: &TrainReport, cfg: &TrainConfig);
}

/// The reporter of `what` (the script function) training `model` in this run.
pub(crate) fn reporter(
    rc: &Arc<RunContext>,
    what: &'static str,
    model: &qscript_runtime::model::Model,
) -> Box<dyn Reporter> {
    if rc.checking() {
        Box::new(CheckPlan {
            rc: rc.clone(),
            what,
        })
    } else {
        Box::new(Progress {
            sink: rc.sink.clone(),
            // The device's memory before training.
            memory: qscript_runtime::device::memory_line(model.decoder.device()),
            bar: None,
            lead: true,
        })
    }
}

/// Prints training events: the plan as HF prints it, a progress bar, log and eval lines.
struct Progress {
    sink: Arc<dyn OutputSink>,
    memory: Option<String>,
    bar: Option<indicatif::ProgressBar>,
    /// Rank 0 speaks for the run under data parallel (the others print no summary).
    lead: bool,
}

impl Progress {
    fn header(&mut self, e: &Event, batch: usize, accumulation: usize) {
        let Event::Start {
            examples,
            epochs,
            total_batch,
            total_steps,
            trainable,
            resumed_at,
            memory,
        } = e
        else {
            return;
        };
        let sink = &self.sink;
        sink.err("***** Running training *****");
        sink.err(&format!("  Num examples = {examples}"));
        sink.err(&format!("  Num Epochs = {epochs}"));
        sink.err(&format!("  Instantaneous batch size per device = {batch}"));
        sink.err(&format!(
            "  Total train batch size (w. accumulation) = {total_batch}"
        ));
        sink.err(&format!("  Gradient Accumulation steps = {accumulation}"));
        sink.err(&format!("  Total optimization steps = {total_steps}"));
        sink.err(&format!("  Number of trainable parameters = {trainable}"));
        sink.err(&format!(
            "  Estimated peak memory = {} (itemized by `qscript check`)",
            qscript_runtime::plan::memory::human(*memory as f64)
        ));
        if let Some(line) = &self.memory {
            sink.err(&format!("  {line}"));
        }
        if *resumed_at > 0 {
            sink.err(&format!("  Resumed from step {resumed_at}"));
        }
        let b = indicatif::ProgressBar::new(*total_steps as u64);
        b.set_position(*resumed_at as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}<{eta}] {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        self.bar = Some(b);
    }

    fn notices(&self) {
        for n in qscript_runtime::notice::take() {
            match &self.bar {
                Some(b) => b.suspend(|| self.sink.err(&n)),
                None => self.sink.err(&n),
            }
        }
    }
}

impl Reporter for Progress {
    fn start(&mut self, t: &Trainer) {
        self.lead = t.lead();
        // Rank 0 alone reports (the others' progress is the same).
        if self.lead {
            self.notices();
            let plan = t.plan();
            if let Some((_, note)) = &plan.fitted {
                self.sink.err(note);
            }
            self.header(&t.start_event(), plan.batch, plan.accumulation);
        }
    }

    fn event(&mut self, e: &Event) {
        self.notices();
        match e {
            Event::Start { .. } => {}
            Event::Step { step, loss, .. } => {
                if let Some(b) = &self.bar {
                    b.set_position(*step as u64);
                    if let Some(loss) = loss {
                        b.set_message(format!("loss {loss:.4}"));
                    }
                }
            }
            Event::Log(rec) | Event::Eval(rec) => {
                if let (Some(b), Some(tps)) = (&self.bar, rec.get("tokens_per_second")) {
                    let num = |k: &str| rec.get(k).and_then(serde_json::Value::as_f64);
                    b.set_message(format!(
                        "loss {:.4} lr {:.2e} grad_norm {:.3} {tps} tok/s",
                        num("loss").unwrap_or(0.0),
                        num("learning_rate").unwrap_or(0.0),
                        num("grad_norm").unwrap_or(0.0),
                    ));
                }
                let line = format_log(rec);
                match &self.bar {
                    Some(b) => b.suspend(|| self.sink.out(&line)),
                    None => self.sink.out(&line),
                }
            }
            Event::Saved(p) => self.sink.err(&format!("saved {}", p.display())),
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        for n in qscript_runtime::notice::take() {
            self.sink.err(&n);
        }
    }

    fn summary(&mut self, report: &TrainReport, cfg: &TrainConfig) {
        let sink = &self.sink;
        if report.losses.is_empty() && report.steps > 0 {
            sink.err(&format!(
                "nothing to train: the run in `{}` is finished (step {} of {}); returning its model",
                cfg.output_dir, report.steps, report.steps
            ));
            return;
        }
        if let Some((ckpt, loss)) = &report.best {
            let at = if std::path::Path::new(&cfg.output_dir).join(ckpt).is_dir() {
                format!("`{ckpt}`")
            } else {
                format!(
                    "step {} (not saved)",
                    ckpt.trim_start_matches("checkpoint-")
                )
            };
            sink.err(&format!(
                "best eval loss {loss:.4} at {at}{}",
                if report.loaded_best {
                    "; the returned model is that checkpoint's (`load_best_model_at_end`)"
                } else {
                    ""
                }
            ));
        }
        // Under data parallel rank 0 speaks for the run (the others log nothing of their own).
        if !self.lead {
            return;
        }
        // The first and last losses as the log lines printed them (each the mean of its logging
        // window), so the summary's final loss is the one the last log line showed.
        let logged: Vec<f64> = report
            .log_history
            .iter()
            .filter(|r| r.get("eval_loss").is_none())
            .filter_map(|r| r.get("loss").and_then(serde_json::Value::as_f64))
            .collect();
        let first = logged
            .first()
            .copied()
            .or_else(|| report.losses.first().map(|l| l.1))
            .unwrap_or(0.0);
        let last = logged
            .last()
            .copied()
            .or_else(|| report.losses.last().map(|l| l.1))
            .unwrap_or(0.0);
        let peak = report.peak_device_bytes.map_or_else(String::new, |b| {
            format!(
                ", peak GPU memory {:.2} GiB",
                qscript_runtime::device::gib(b)
            )
        });
        sink.err(&format!(
            "trained {} steps in {:.1} s: loss {first:.4} -> {last:.4}, {:.2} examples/s, {:.0} tokens/s{peak}; metrics in `{}`",
            report.steps,
            report.train_runtime,
            report.examples_per_second,
            report.tokens_per_second,
            std::path::Path::new(&cfg.output_dir)
                .join("metrics.jsonl")
                .display()
        ));
    }
}

/// A dry run's report: the plan, after the notices planning raised (packing, truncation).
struct CheckPlan {
    rc: Arc<RunContext>,
    what: &'static str,
}

impl Reporter for CheckPlan {
    fn start(&mut self, t: &Trainer) {
        show_plan(&self.rc, self.what, t.plan());
    }

    fn event(&mut self, _: &Event) {}

    fn finish(&mut self) {}

    fn summary(&mut self, _: &TrainReport, _: &TrainConfig) {}
}

fn show_plan(rc: &RunContext, what: &str, plan: &RunPlan) {
    for n in qscript_runtime::notice::take() {
        rc.sink.err(&n);
    }
    rc.sink.err(&format!(
        "check: {what}: {} trainable parameters",
        plan.trainable
    ));
    for line in plan.to_string().lines() {
        rc.sink.err(&format!("check: {line}"));
    }
    let human = |b: u64| qscript_runtime::plan::memory::human(b as f64);
    rc.check_fact(
        "steps",
        format!(
            "{} ({} an epoch x {} epochs; {} examples a step = {} x {} device{} x {})",
            plan.total_steps,
            plan.steps_per_epoch,
            plan.epochs,
            plan.total_batch(),
            plan.batch,
            plan.devices,
            if plan.devices == 1 { "" } else { "s" },
            plan.accumulation
        ),
    );
    rc.check_fact(
        "memory",
        format!(
            "{} on {}{}",
            human(plan.memory.total()),
            plan.device,
            plan.budget
                .map_or_else(String::new, |b| format!(" ({} free)", human(b)))
        ),
    );
    if let Some((_, note)) = &plan.fitted {
        rc.check_fact("fit", note.clone());
    }
    rc.check_fact(
        "plan",
        match &plan.placement {
            None => format!("all {} layers on {}", plan.layers, plan.device),
            Some((p, _)) => p.to_string().replace('\n', "; "),
        },
    );
}

/// A log record as one line: `key value` pairs.
fn format_log(rec: &serde_json::Value) -> String {
    let mut parts = Vec::new();
    if let Some(o) = rec.as_object() {
        for (k, v) in o {
            let s = match v.as_f64() {
                Some(f) if k == "learning_rate" => format!("{f:.3e}"),
                Some(f) if f.fract() != 0.0 => format!("{f:.4}"),
                _ => v.to_string(),
            };
            parts.push(format!("{k} {s}"));
        }
    }
    parts.join(", ")
}
