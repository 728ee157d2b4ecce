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

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Linear,
    /// `cycles` of a cosine (HF's `num_cycles`, 0.5: one half-wave to 0), floored at
    /// `min_rate` of the peak (`cosine_with_min_lr`; 0 for `cosine`).
    Cosine {
        cycles: f64,
        min_rate: f64,
    },
    Constant,
    ConstantWithWarmup,
}

impl Schedule {
    /// `linear`, `cosine`, `constant` or `constant_with_warmup`.
    pub fn new(name: &str, base_lr: f64, warmup: usize, total: usize) -> Result<Self> {
        Self::with_kwargs(name, base_lr, warmup, total, None)
    }

    /// A schedule with HF's `lr_scheduler_kwargs`: `cosine_with_min_lr` takes `min_lr` or
    /// `min_lr_rate` (one of them) and `num_cycles`; `cosine` takes `num_cycles`.
    pub fn with_kwargs(
        name: &str,
        base_lr: f64,
        warmup: usize,
        total: usize,
        kwargs: Option<&serde_json::Value>,
    ) -> Result<Self> {
        let bad = |m: String| Error::InvalidArgument(m);
        let kwargs = match kwargs {
            None | Some(serde_json::Value::Null) => serde_json::Map::new(),
            Some(serde_json::Value::Object(m)) => m.clone(),
            Some(other) => {
                return Err(bad(format!(
                    "`lr_scheduler_kwargs` is {other}; expected a map, e.g. `#{{ min_lr_rate: 0.1 }}`"
                )));
            }
        };
        let valid: &[&str] = match name {
            "cosine" => &["num_cycles"],
            "cosine_with_min_lr" => &["min_lr", "min_lr_rate", "num_cycles"],
            _ => &[],
        };
        let number = |key: &str| -> Result<Option<f64>> {
            match kwargs.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .map(Some)
                    .ok_or_else(|| {
                        bad(format!(
                            "`lr_scheduler_kwargs.{key}` is {v}; expected a number"
                        ))
                    }),
            }
        };
        if let Some(key) = kwargs.keys().find(|k| !valid.contains(&k.as_str())) {
            let takes = if valid.is_empty() {
                "none".to_string()
            } else {
                valid
                    .iter()
                    .map(|v| format!("`{v}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            return Err(bad(format!(
                "`lr_scheduler_kwargs`: `{name}` takes no `{key}`; it takes: {takes}"
            )));
        }
        let cycles = number("num_cycles")?.unwrap_or(0.5);
        let kind = match name {
            "linear" => Kind::Linear,
            "cosine" => Kind::Cosine {
                cycles,
                min_rate: 0.0,
            },
            "cosine_with_min_lr" => {
                let min_rate = match (number("min_lr")?, number("min_lr_rate")?) {
                    (Some(_), Some(_)) => {
                        return Err(bad(
                            "`lr_scheduler_kwargs`: give `min_lr` or `min_lr_rate`, not both"
                                .into(),
                        ));
                    }
                    (Some(lr), None) => lr / base_lr,
                    (None, Some(rate)) => rate,
                    (None, None) => {
                        return Err(bad(
                            "`lr_scheduler_type: \"cosine_with_min_lr\"` needs `min_lr` or \
                             `min_lr_rate` in `lr_scheduler_kwargs`, e.g. `#{ min_lr_rate: 0.1 }`"
                                .into(),
                        ));
                    }
                };
                Kind::Cosine { cycles, min_rate }
            }
            "constant" => Kind::Constant,
            "constant_with_warmup" => Kind::ConstantWithWarmup,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown `lr_scheduler_type` `{other}`; use `linear`, `cosine`, `cosine_with_min_lr`, `constant` or `constant_with_warmup`"
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
            // transformers' `_get_cosine_schedule_with_warmup_lr_lambda`.
            Kind::Cosine { cycles, min_rate } => {
                let progress = (s - w) / (t - w).max(1.0);
                let f = 0.5 * (1.0 + (std::f64::consts::PI * cycles * 2.0 * progress).cos());
                (f * (1.0 - min_rate) + min_rate).max(0.0)
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

    /// `cosine_with_min_lr` by transformers' formula (`_get_cosine_schedule_with_warmup_lr_lambda`
    /// with `num_cycles=0.5`, `min_lr_rate=0.1`: `max(0, 0.5 * (1 + cos(pi * 2 * 0.5 *
    /// progress)) * 0.9 + 0.1)` after 3 warmup steps of 10; the values written out by that formula
    /// in Python, as `get_cosine_with_min_lr_schedule_with_warmup` gives them).
    #[test]
    fn cosine_with_min_lr_floors_at_the_rate() {
        let kw = serde_json::json!({ "min_lr_rate": 0.1 });
        let s = Schedule::with_kwargs("cosine_with_min_lr", 1e-3, 3, 10, Some(&kw)).unwrap();
        let by_min_lr = serde_json::json!({ "min_lr": 1e-4 });
        let t = Schedule::with_kwargs("cosine_with_min_lr", 1e-3, 3, 10, Some(&by_min_lr)).unwrap();
        let want = [
            0.0,
            0.000_333_333_333_333_333_3,
            0.000_666_666_666_666_666_6,
            0.001,
            0.000_955_435_990_556_088_6,
            0.000_830_570_410_836_430_2,
            0.000_650_134_420_280_341_5,
            0.000_449_865_579_719_658_6,
            0.000_269_429_589_163_569_94,
            0.000_144_564_009_443_911_47,
        ];
        for (step, w) in want.iter().enumerate() {
            assert!(
                (s.lr(step) - w).abs() < 1e-15,
                "step {step}: {} vs {w}",
                s.lr(step)
            );
            assert!(
                (t.lr(step) - w).abs() < 1e-15,
                "step {step}: {} vs {w}",
                t.lr(step)
            );
        }
        // Plain `cosine` is unchanged by the kwargs path.
        let c = Schedule::new("cosine", 1e-3, 3, 10).unwrap();
        let k = Schedule::with_kwargs("cosine", 1e-3, 3, 10, Some(&serde_json::json!({}))).unwrap();
        assert_eq!(c, k);
        let err = |name: &str, kw: serde_json::Value| {
            Schedule::with_kwargs(name, 1e-3, 3, 10, Some(&kw))
                .unwrap_err()
                .to_string()
        };
        assert!(
            err("cosine_with_min_lr", serde_json::json!({}))
                .contains("needs `min_lr` or `min_lr_rate`")
        );
        assert!(
            err(
                "cosine_with_min_lr",
                serde_json::json!({"min_lr": 1e-4, "min_lr_rate": 0.1})
            )
            .contains("not both")
        );
        assert!(
            err(
                "cosine_with_min_lr",
                serde_json::json!({"min_lr_ratio": 0.1})
            )
            .contains("takes no `min_lr_ratio`; it takes: `min_lr`, `min_lr_rate`, `num_cycles`")
        );
        assert!(
            err("linear", serde_json::json!({"power": 2}))
                .contains("`linear` takes no `power`; it takes: none")
        );
    }
}
