//! Learning-rate schedules with transformers' names and formulas.

use crate::{Error, Result};

/// A schedule over `total` optimizer steps with `warmup` warmup steps.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    kind: Kind,
    base_lr: f64,
    warmup: usize,
    total: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Linear,
    Cosine,
    Constant,
    ConstantWithWarmup,
}

impl Schedule {
    /// `linear`, `cosine`, `constant` or `constant_with_warmup`.
    pub fn new(name: &str, base_lr: f64, warmup: usize, total: usize) -> Result<Self> {
        let kind = match name {
            "linear" => Kind::Linear,
            "cosine" => Kind::Cosine,
            "constant" => Kind::Constant,
            "constant_with_warmup" => Kind::ConstantWithWarmup,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown `lr_scheduler_type` `{other}`; use `linear`, `cosine`, `constant` or `constant_with_warmup`"
                )));
            }
        };
        Ok(Self {
            kind,
            base_lr,
            warmup,
            total,
        })
    }

    /// The learning rate of optimizer step `step` (0-based), as transformers' `LambdaLR` gives it.
    pub fn lr(&self, step: usize) -> f64 {
        let (s, w, t) = (step as f64, self.warmup as f64, self.total as f64);
        let factor = match self.kind {
            Kind::Constant => 1.0,
            _ if step < self.warmup => s / w.max(1.0),
            Kind::ConstantWithWarmup => 1.0,
            Kind::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Kind::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        };
        self.base_lr * factor
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// `tests/fixtures/train/goldens.json` (scripts/make_train_goldens.py, transformers 5.17):
    /// `get_scheduler(name, AdamW(lr=1e-3), num_warmup_steps=3, num_training_steps=10)`.
    #[test]
    fn matches_transformers_step_by_step() {
        let path = crate::testing::repo_fixtures().join("train/goldens.json");
        let g: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for (name, lrs) in g["schedules"].as_object().unwrap() {
            let s = Schedule::new(name, 1e-3, 3, 10).unwrap();
            for (step, w) in lrs.as_array().unwrap().iter().enumerate() {
                let w = w.as_f64().unwrap();
                assert!(
                    (s.lr(step) - w).abs() < 1e-12,
                    "{name} step {step}: {} vs {w}",
                    s.lr(step)
                );
            }
        }
        assert!(
            Schedule::new("polynomial", 1e-3, 0, 1)
                .unwrap_err()
                .to_string()
                .contains("unknown `lr_scheduler_type`")
        );
    }
}
