//! AdamW as torch implements it (decoupled weight decay, bias-corrected moments), with f32 states
//! whatever the dtype of the parameters, and global-norm gradient clipping as `clip_grad_norm_`.

use candle_core::{DType, Tensor, Var};

use crate::Result;

/// Hyper-parameters with transformers' names.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    /// `adam_beta1`.
    pub beta1: f64,
    /// `adam_beta2`.
    pub beta2: f64,
    /// `adam_epsilon`.
    pub eps: f64,
    /// `weight_decay` (not applied to biases and norms).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One parameter with its moments.
#[derive(Debug)]
pub struct Slot {
    /// HF / PEFT name.
    pub name: String,
    /// The parameter.
    pub var: Var,
    /// First moment (f32).
    pub m: Tensor,
    /// Second moment (f32).
    pub v: Tensor,
    /// Whether weight decay applies.
    pub decay: bool,
}

/// AdamW over named `Var`s.
#[derive(Debug)]
pub struct AdamW {
    /// Hyper-parameters.
    pub cfg: AdamWConfig,
    /// Parameters and states.
    pub slots: Vec<Slot>,
    /// Optimizer steps taken.
    pub step: usize,
}

impl AdamW {
    /// An optimizer for `params`; names ending in `bias` or containing `norm` get no decay.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, var)| {
                let z = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                let decay = !(name.ends_with("bias") || name.contains("norm"));
                Ok(Slot {
                    name,
                    var,
                    m: z.clone(),
                    v: z,
                    decay,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            slots,
            step: 0,
        })
    }

    /// One update with learning rate `lr` from `grads` (aligned with `slots`).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        let t = i32::try_from(self.step).unwrap_or(i32::MAX);
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for (slot, g) in self.slots.iter_mut().zip(grads) {
            let g = g.to_dtype(DType::F32)?;
            slot.m = ((&slot.m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            slot.v = ((&slot.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let p = slot.var.as_tensor().to_dtype(DType::F32)?;
            let p = if slot.decay && c.weight_decay > 0.0 {
                (&p * (1.0 - lr * c.weight_decay))?
            } else {
                p
            };
            let denom = ((&slot.v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&slot.m / bc1)? / denom)?;
            let p = (p - (update * lr)?)?;
            slot.var.set(&p.to_dtype(slot.var.dtype())?)?;
        }
        Ok(())
    }
}

/// The global L2 norm of `grads`, and the grads scaled so the norm is at most `max_norm`
/// (`torch.nn.utils.clip_grad_norm_`: factor `max_norm / (norm + 1e-6)`, applied only when < 1).
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<(f64, Vec<Tensor>)> {
    let mut total = 0f64;
    for g in grads {
        total += f64::from(
            g.to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()?,
        );
    }
    let norm = total.sqrt();
    let factor = max_norm / (norm + 1e-6);
    if max_norm > 0.0 && factor < 1.0 {
        let scaled = grads
            .iter()
            .map(|g| g * factor)
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((norm, scaled))
    } else {
        Ok((norm, grads.to_vec()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_first_steps_follow_the_formula() {
        let v = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(
            vec![("w".into(), v.clone())],
            AdamWConfig {
                weight_decay: 0.1,
                ..AdamWConfig::default()
            },
        )
        .unwrap();
        let g = Tensor::new(&[0.5f32, -0.25], &Device::Cpu).unwrap();
        opt.step(&[g], 0.01).unwrap();
        // Step 1: m̂ = g, v̂ = g², update = g / (|g| + eps) = sign(g); p = p (1 - lr wd) - lr sign(g).
        let p = v.as_tensor().to_vec1::<f32>().unwrap();
        assert!((p[0] - (1.0 * (1.0 - 0.001) - 0.01)).abs() < 1e-6, "{p:?}");
        assert!((p[1] - (-2.0 * (1.0 - 0.001) + 0.01)).abs() < 1e-6, "{p:?}");
    }

    fn golden() -> serde_json::Value {
        let path = crate::testing::repo_fixtures().join("train/goldens.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn floats(v: &serde_json::Value) -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    }

    /// torch.optim.AdamW(lr=0.01, weight_decay=0.1), three steps (scripts/make_train_goldens.py).
    #[test]
    fn adamw_matches_torch() {
        let g = golden();
        let a = &g["adamw"];
        let v = Var::from_tensor(&Tensor::new(floats(&a["init"]), &Device::Cpu).unwrap()).unwrap();
        let mut opt = AdamW::new(
            vec![("w".into(), v.clone())],
            AdamWConfig {
                weight_decay: 0.1,
                ..AdamWConfig::default()
            },
        )
        .unwrap();
        for step in a["steps"].as_array().unwrap() {
            opt.step(
                &[Tensor::new(floats(&step["grad"]), &Device::Cpu).unwrap()],
                0.01,
            )
            .unwrap();
            let got = v.as_tensor().to_vec1::<f32>().unwrap();
            for (x, y) in got.iter().zip(floats(&step["param"])) {
                assert!((x - y).abs() < 1e-6, "{got:?}");
            }
        }
    }

    /// torch.nn.utils.clip_grad_norm_(max_norm=1.0) on two tensors.
    #[test]
    fn clipping_matches_torch() {
        let g = golden();
        let c = &g["clip"];
        let grads: Vec<Tensor> = c["grads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| Tensor::new(floats(t), &Device::Cpu).unwrap())
            .collect();
        let (norm, clipped) = clip_grad_norm(&grads, 1.0).unwrap();
        assert!((norm - c["norm"].as_f64().unwrap()).abs() < 1e-5);
        for (got, want) in clipped.iter().zip(c["clipped"].as_array().unwrap()) {
            for (x, y) in got.to_vec1::<f32>().unwrap().iter().zip(floats(want)) {
                assert!((x - y).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let a = Tensor::new(&[3.0f32, 0.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[4.0f32], &Device::Cpu).unwrap();
        let (norm, clipped) = clip_grad_norm(&[a.clone(), b], 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let c0 = clipped[0].to_vec1::<f32>().unwrap();
        assert!((f64::from(c0[0]) - 3.0 / (5.0 + 1e-6)).abs() < 1e-6);
        let (_, same) = clip_grad_norm(&[a], 10.0).unwrap();
        assert_eq!(same[0].to_vec1::<f32>().unwrap(), [3.0, 0.0]);
    }
}
