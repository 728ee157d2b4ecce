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

    /// transformers 5.17: `get_scheduler(name, AdamW([p], lr=1e-3), num_warmup_steps=3,
    /// num_training_steps=10)`, `scheduler.get_last_lr()` before each of 10 steps.
    #[test]
    fn matches_transformers_step_by_step() {
        let want: [(&str, [f64; 10]); 4] = [
            (
                "linear",
                [
                    0.0,
                    3.333_333_333_333_333e-4,
                    6.666_666_666_666_666e-4,
                    1e-3,
                    8.571_428_571_428_571e-4,
                    7.142_857_142_857_143e-4,
                    5.714_285_714_285_714e-4,
                    4.285_714_285_714_286e-4,
                    2.857_142_857_142_857e-4,
                    1.428_571_428_571_428_6e-4,
                ],
            ),
            (
                "cosine",
                [
                    0.0,
                    3.333_333_333_333_333e-4,
                    6.666_666_666_666_666e-4,
                    1e-3,
                    9.504_844_339_512_095e-4,
                    8.117_449_009_293_668e-4,
                    6.112_604_669_781_572e-4,
                    3.887_395_330_218_428_4e-4,
                    1.882_550_990_706_332e-4,
                    4.951_556_604_879_043e-5,
                ],
            ),
            ("constant", [1e-3; 10]),
            (
                "constant_with_warmup",
                [
                    0.0,
                    3.333_333_333_333_333e-4,
                    6.666_666_666_666_666e-4,
                    1e-3,
                    1e-3,
                    1e-3,
                    1e-3,
                    1e-3,
                    1e-3,
                    1e-3,
                ],
            ),
        ];
        for (name, lrs) in want {
            let s = Schedule::new(name, 1e-3, 3, 10).unwrap();
            for (step, w) in lrs.iter().enumerate() {
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
