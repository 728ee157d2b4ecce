//! AdamW as torch implements it (decoupled weight decay, bias-corrected moments), with f32 states
//! whatever the dtype of the parameters, and global-norm gradient clipping as `clip_grad_norm_`.
//! These are the reference ops; on a GPU the step and the norm's sum of squares are fused
//! kernels, each a `.rs` + `.cu` pair here (built with feature `cuda`): `adamw` and `grad_norm`.

#[cfg(feature = "cuda")]
pub mod adamw;
#[cfg(feature = "cuda")]
pub mod adamw8;
pub mod eight_bit;
#[cfg(feature = "cuda")]
pub mod grad_norm;

use candle_core::{DType, Tensor};

use super::flat::{DeviceParams, FlatParams};
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
    /// 8-bit states as bitsandbytes keeps them (`optim: "adamw_8bit"`; see [`eight_bit`]).
    pub eight_bit: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            eight_bit: false,
        }
    }
}

/// Where AdamW keeps its moments.
#[derive(Debug)]
pub(super) enum Moments {
    /// f32, in the flat buffer's layout (or its shard's).
    F32 {
        /// First moments.
        m: Tensor,
        /// Second moments.
        v: Tensor,
    },
    /// bitsandbytes' 8-bit blocks.
    Eight(Box<eight_bit::Blockwise8>),
}

/// AdamW over the flat parameter buffer: f32 moments in the same layout, one update for every
/// tensor at once.
#[derive(Debug)]
pub struct AdamW {
    /// Hyper-parameters.
    pub cfg: AdamWConfig,
    /// The moments.
    pub(super) moments: Moments,
    /// Where weight decay applies (`None` without weight decay): an f32 `1`/`0` mask for the
    /// reference ops, a bit per element on CUDA (the fused kernel's form: n / 8 bytes, not 4n).
    decay_mask: Option<Tensor>,
    /// Optimizer steps taken.
    pub step: usize,
    /// The elements `[start, end)` of the flat buffer this optimizer updates, when it holds only
    /// a share of it (ZeRO: this rank's); the moments and decay flags cover only those.
    pub shard: Option<(usize, usize)>,
}

impl AdamW {
    /// Zeroed moments for `params`.
    pub fn new(params: &FlatParams, cfg: AdamWConfig) -> Result<Self> {
        Self::over(params, cfg, None)
    }

    /// Zeroed moments for `params`, or for its elements `[start, end)` only (`shard`).
    pub fn over(
        params: &FlatParams,
        cfg: AdamWConfig,
        shard: Option<(usize, usize)>,
    ) -> Result<Self> {
        let device = params.device();
        if cfg.eight_bit {
            if shard.is_some() {
                return Err(crate::Error::InvalidArgument(
                    "`optim: \"adamw_8bit\"` does not shard its states over ranks (ZeRO) yet; \
                     use `zero_stage: 0` or a 32-bit optimizer"
                        .into(),
                ));
            }
            return Ok(Self {
                moments: Moments::Eight(Box::new(eight_bit::Blockwise8::new(params)?)),
                cfg,
                decay_mask: None,
                step: 0,
                shard: None,
            });
        }
        let (start, end) = shard.unwrap_or((0, params.len()));
        let len = end - start;
        // Two buffers: the fused kernel updates both in place.
        let zeros = || Tensor::zeros(len, DType::F32, device);
        // The decayed runs of the slots, within the shard, from its start.
        let runs = || {
            params
                .slots
                .iter()
                .filter(|s| s.decay)
                .filter_map(move |s| {
                    let (a, b) = (s.offset.max(start), (s.offset + s.len()).min(end));
                    (a < b).then(|| (a - start, b - a))
                })
        };
        let decay_mask = match cfg.weight_decay > 0.0 {
            false => None,
            #[cfg(feature = "cuda")]
            true if device.is_cuda() => {
                let bits = decay_bits(len, runs());
                let words = bits.len();
                Some(Tensor::from_vec(bits, words, device)?)
            }
            true => {
                let mut mask = vec![0f32; len];
                for (a, n) in runs() {
                    mask[a..a + n].fill(1.0);
                }
                Some(Tensor::from_vec(mask, len, device)?)
            }
        };
        Ok(Self {
            cfg,
            moments: Moments::F32 {
                m: zeros()?,
                v: zeros()?,
            },
            decay_mask,
            step: 0,
            shard,
        })
    }

    /// The same optimizer over the whole buffer with these whole moments (to save a sharded
    /// optimizer's gathered state).
    pub fn with_moments(&self, m: Tensor, v: Tensor) -> Self {
        Self {
            cfg: self.cfg.clone(),
            moments: Moments::F32 { m, v },
            decay_mask: None,
            step: self.step,
            shard: None,
        }
    }

    /// The moments as f32 buffers (8-bit ones dequantized): the flat buffer's length, or the
    /// shard's.
    pub fn moments(&self) -> Result<(Tensor, Tensor)> {
        match &self.moments {
            Moments::F32 { m, v } => Ok((m.clone(), v.clone())),
            Moments::Eight(e) => e.moments(),
        }
    }

    /// The 8-bit states' per-block absmax of each moment (saved beside the dequantized moments,
    /// so a resumed run gets the same codes back); `None` for f32 moments.
    pub fn absmax(&self) -> Option<(Tensor, Tensor)> {
        match &self.moments {
            Moments::Eight(e) => Some((e.absmax_m.clone(), e.absmax_v.clone())),
            Moments::F32 { .. } => None,
        }
    }

    /// Sets the moments from f32 buffers of the whole flat buffer (a restored checkpoint): a
    /// sharded optimizer keeps its share, an 8-bit one quantizes them (with the saved `absmax`
    /// when there is one).
    pub fn set_moments(
        &mut self,
        m: Tensor,
        v: Tensor,
        absmax: Option<(Tensor, Tensor)>,
    ) -> Result<()> {
        match &mut self.moments {
            Moments::Eight(e) => e.set_moments(&m, &v, absmax.as_ref().map(|(a, b)| (a, b))),
            Moments::F32 { m: mm, v: vv } => {
                let (m, v) = match self.shard {
                    Some((a, b)) if m.elem_count() != b - a => (
                        m.narrow(0, a, b - a)?.contiguous()?,
                        v.narrow(0, a, b - a)?.contiguous()?,
                    ),
                    _ => (m, v),
                };
                *mm = m;
                *vv = v;
                Ok(())
            }
        }
    }

    /// One update of `params` with learning rate `lr` from the flat f32 `grads` (the whole
    /// layout's, or only the shard's: ZeRO stage 2) scaled by the device scalar `clip` (see
    /// [`clip_factor`]). On CUDA one fused kernel updates parameters and moments in place;
    /// elsewhere the reference ops below compute the same.
    pub fn step(
        &mut self,
        params: &FlatParams,
        grads: &Tensor,
        clip: Option<&Tensor>,
        lr: f64,
    ) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        let t = i32::try_from(self.step).unwrap_or(i32::MAX);
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        let (start, len) = match self.shard {
            Some((a, b)) => (a, b - a),
            None => (0, params.len()),
        };
        let grads = &match grads.elem_count() {
            n if n == params.len() => grads.narrow(0, start, len)?,
            n if n == len => grads.clone(),
            n => {
                return Err(crate::Error::InvalidArgument(format!(
                    "gradients of {n} elements for an optimizer over {len} of {}",
                    params.len()
                )));
            }
        };
        let (m, v) = match &mut self.moments {
            Moments::F32 { m, v } => (m, v),
            Moments::Eight(e) => {
                #[cfg(feature = "cuda")]
                if params.device().is_cuda() {
                    return Ok(adamw8::step(e, params, grads, clip, c, lr, t)?);
                }
                return e.step_host(params, grads, clip, c, lr, t);
            }
        };
        #[cfg(feature = "cuda")]
        if params.device().is_cuda() {
            let args = adamw::AdamWArgs {
                lr: lr as f32,
                beta1: c.beta1 as f32,
                beta2: c.beta2 as f32,
                om1: (1.0 - c.beta1) as f32,
                om2: (1.0 - c.beta2) as f32,
                eps: c.eps as f32,
                wd: c.weight_decay as f32,
                bc1: bc1 as f32,
                bc2: bc2 as f32,
            };
            let p = &params.data.as_tensor().narrow(0, start, len)?;
            adamw::adamw(p, m, v, grads, clip, self.decay_mask.as_ref(), args)?;
            return Ok(());
        }
        let grads = &match clip {
            Some(f) => grads.broadcast_mul(f)?,
            None => grads.clone(),
        };
        *m = (m.affine(c.beta1, 0.0)? + grads.affine(1.0 - c.beta1, 0.0)?)?;
        *v = (v.affine(c.beta2, 0.0)? + grads.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
        let p = params
            .data
            .as_tensor()
            .narrow(0, start, len)?
            .to_dtype(DType::F32)?;
        let p = match &self.decay_mask {
            Some(mask) => p.mul(&mask.affine(-lr * c.weight_decay, 1.0)?)?,
            None => p,
        };
        let denom = (v.affine(1.0 / bc2, 0.0)?.sqrt()? + c.eps)?;
        let update = m.affine(lr / bc1, 0.0)?.div(&denom)?;
        let p = (p - update)?.to_dtype(params.data.dtype())?;
        if len == params.len() {
            params.data.set(&p)?;
        } else {
            params.data.as_tensor().slice_set(&p, 0, start)?;
        }
        Ok(())
    }
}

/// The decay flags of AdamW's flat buffer as the kernel reads them: bit `i % 32` of word `i / 32`
/// set where element `i` decays, for `len` elements covered by the `(offset, len)` `runs`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn decay_bits(len: usize, runs: impl Iterator<Item = (usize, usize)>) -> Vec<u32> {
    let mut bits = vec![0u32; len.div_ceil(32)];
    for (start, n) in runs {
        let (mut i, end) = (start, (start + n).min(len));
        while i < end {
            // Whole words at once where the run covers them.
            if i % 32 == 0 && end - i >= 32 {
                bits[i / 32] = u32::MAX;
                i += 32;
            } else {
                bits[i / 32] |= 1 << (i % 32);
                i += 1;
            }
        }
    }
    bits
}

/// The global L2 norm of the flat f32 `grads` and the clipping factor of
/// `torch.nn.utils.clip_grad_norm_` (`max_norm / (norm + 1e-6)` clamped at 1; `None` when
/// `max_norm <= 0`), both device scalars: nothing is read back to the host.
pub fn clip_factor(grads: &Tensor, max_norm: f64) -> Result<(Tensor, Option<Tensor>)> {
    clip_of_sum_of_squares(sum_of_squares(grads)?, max_norm)
}

/// `Σ g²` of a flat buffer as rows of partial sums, so the device reduces in parallel (one
/// reduction over a 500M-element vector runs in a single block and takes tens of ms).
fn sum_of_squares(g: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if g.device().is_cuda() && g.dtype() == DType::F32 && g.is_contiguous() {
        return Ok(grad_norm::sum_of_squares(g)?);
    }
    const ROWS: usize = 4096;
    let n = g.elem_count();
    let main = n / ROWS * ROWS;
    let mut total = Tensor::zeros((), g.dtype(), g.device())?;
    if main > 0 {
        let part = g.narrow(0, 0, main)?.reshape((ROWS, main / ROWS))?;
        total = total.add(&part.sqr()?.sum(1)?.sum_all()?)?;
    }
    if main < n {
        total = total.add(&g.narrow(0, main, n - main)?.sqr()?.sum_all()?)?;
    }
    Ok(total)
}

/// `Σ g²` over the buffers of several devices, on the first buffer's device.
pub fn sum_of_squares_parts(grads: &[&Tensor]) -> Result<Tensor> {
    let Some(first) = grads.first() else {
        return Err(crate::Error::InvalidArgument("no gradients".into()));
    };
    let mut total = sum_of_squares(first)?;
    for g in &grads[1..] {
        total = total.add(&crate::device::to(&sum_of_squares(g)?, first.device())?)?;
    }
    Ok(total)
}

/// The norm and clipping factor of [`clip_factor`] from a gradient's `Σ g²` (a device scalar).
pub fn clip_of_sum_of_squares(total: Tensor, max_norm: f64) -> Result<(Tensor, Option<Tensor>)> {
    let norm = total.sqrt()?;
    if max_norm <= 0.0 {
        return Ok((norm, None));
    }
    let factor = (norm.affine(1.0, 1e-6)?.recip()? * max_norm)?.minimum(1.0)?;
    Ok((norm, Some(factor)))
}

/// [`clip_factor`] over the buffers of several devices (one norm for them all), on the first
/// buffer's device.
pub fn clip_factor_parts(grads: &[&Tensor], max_norm: f64) -> Result<(Tensor, Option<Tensor>)> {
    clip_of_sum_of_squares(sum_of_squares_parts(grads)?, max_norm)
}

/// AdamW over every part of a [`DeviceParams`]: each device's moments beside its parameters.
#[derive(Debug)]
pub struct DeviceAdamW {
    /// One per part.
    pub parts: Vec<AdamW>,
}

impl DeviceAdamW {
    /// Zeroed moments for every part.
    pub fn new(params: &DeviceParams, cfg: AdamWConfig) -> Result<Self> {
        Ok(Self {
            parts: params
                .parts
                .iter()
                .map(|p| AdamW::new(p, cfg.clone()))
                .collect::<Result<_>>()?,
        })
    }

    /// One update of every part from its gradients `grads` (in part order), all scaled by the
    /// one clipping factor `clip`.
    pub fn step(
        &mut self,
        params: &DeviceParams,
        grads: &[&Tensor],
        clip: Option<&Tensor>,
        lr: f64,
    ) -> Result<()> {
        for ((opt, p), g) in self.parts.iter_mut().zip(&params.parts).zip(grads) {
            let local = clip.map(|c| crate::device::to(c, p.device())).transpose()?;
            opt.step(p, g, local.as_ref(), lr)?;
        }
        Ok(())
    }

    /// Sets the steps taken (a resume).
    pub fn set_step(&mut self, step: usize) {
        for o in &mut self.parts {
            o.step = step;
        }
    }
}

/// The norm and the clipped gradients (what [`clip_factor`] and the optimizer apply together).
pub fn clip_grad_norm(grads: &Tensor, max_norm: f64) -> Result<(Tensor, Tensor)> {
    let (norm, factor) = clip_factor(grads, max_norm)?;
    let clipped = match factor {
        Some(f) => grads.broadcast_mul(&f)?,
        None => grads.clone(),
    };
    Ok((norm, clipped))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn decay_bits_set_exactly_the_decayed_elements() {
        // Runs that start and end inside words, span whole words, and touch the last word.
        let runs = [(3, 2), (31, 70), (130, 7)];
        let bits = decay_bits(137, runs.iter().copied());
        assert_eq!(bits.len(), 5);
        for i in 0..160 {
            let want = runs.iter().any(|&(s, n)| (s..s + n).contains(&i));
            assert_eq!(bits[i / 32] >> (i % 32) & 1 == 1, want, "element {i}");
        }
    }

    #[test]
    fn adamw_first_steps_follow_the_formula() {
        let (flat, views) = one("w", &[1.0, -2.0]);
        let mut opt = AdamW::new(
            &flat,
            AdamWConfig {
                weight_decay: 0.1,
                ..AdamWConfig::default()
            },
        )
        .unwrap();
        let g = Tensor::new(&[0.5f32, -0.25], &Device::Cpu).unwrap();
        opt.step(&flat, &g, None, 0.01).unwrap();
        // Step 1: m̂ = g, v̂ = g², update = g / (|g| + eps) = sign(g); p = p (1 - lr wd) - lr sign(g).
        let p = views[0].to_vec1::<f32>().unwrap();
        assert!((p[0] - (1.0 * (1.0 - 0.001) - 0.01)).abs() < 1e-6, "{p:?}");
        assert!((p[1] - (-2.0 * (1.0 - 0.001) + 0.01)).abs() < 1e-6, "{p:?}");
    }

    /// Two optimizers over the two halves of a buffer (ZeRO stage 1's shards), each updating its
    /// half, give the one optimizer's parameters; decay stops at a bias inside a shard.
    #[test]
    fn shards_of_the_buffer_update_like_the_whole() {
        let named = |v: &[f32], b: &[f32]| {
            vec![
                (
                    "layer.weight".to_string(),
                    Tensor::new(v, &Device::Cpu).unwrap(),
                ),
                (
                    "layer.bias".to_string(),
                    Tensor::new(b, &Device::Cpu).unwrap(),
                ),
            ]
        };
        let (w, b) = ([1.0f32, -2.0, 0.5, 3.0, -1.0], [0.25f32, 4.0]);
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let g = Tensor::new(&[0.1f32, -0.3, 0.2, 0.05, -0.4, 0.7, -0.2], &Device::Cpu).unwrap();
        let (whole, _) = FlatParams::new(&named(&w, &b)).unwrap();
        let mut one = AdamW::new(&whole, cfg.clone()).unwrap();
        let (split, _) = FlatParams::new(&named(&w, &b)).unwrap();
        let mut halves = [
            AdamW::over(&split, cfg.clone(), Some((0, 4))).unwrap(),
            AdamW::over(&split, cfg, Some((4, 7))).unwrap(),
        ];
        for _ in 0..3 {
            one.step(&whole, &g, None, 0.01).unwrap();
            for h in &mut halves {
                h.step(&split, &g, None, 0.01).unwrap();
            }
        }
        let (a, b) = (
            whole.data.as_tensor().to_vec1::<f32>().unwrap(),
            split.data.as_tensor().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(halves[1].moments().unwrap().0.elem_count(), 3);
    }

    fn one(name: &str, values: &[f32]) -> (FlatParams, Vec<Tensor>) {
        let t = Tensor::new(values, &Device::Cpu).unwrap();
        FlatParams::new(&[(name.to_string(), t)]).unwrap()
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
        let (flat, views) = one("w", &floats(&a["init"]));
        let mut opt = AdamW::new(
            &flat,
            AdamWConfig {
                weight_decay: 0.1,
                ..AdamWConfig::default()
            },
        )
        .unwrap();
        for step in a["steps"].as_array().unwrap() {
            let g = Tensor::new(floats(&step["grad"]), &Device::Cpu).unwrap();
            opt.step(&flat, &g, None, 0.01).unwrap();
            let got = views[0].to_vec1::<f32>().unwrap();
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
        let grads: Vec<f32> = c["grads"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(floats)
            .collect();
        let flat = Tensor::new(grads, &Device::Cpu).unwrap();
        let (norm, clipped) = clip_grad_norm(&flat, 1.0).unwrap();
        let norm = f64::from(norm.to_scalar::<f32>().unwrap());
        assert!((norm - c["norm"].as_f64().unwrap()).abs() < 1e-5);
        let want: Vec<f32> = c["clipped"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(floats)
            .collect();
        for (x, y) in clipped.to_vec1::<f32>().unwrap().iter().zip(want) {
            assert!((x - y).abs() < 1e-6);
        }
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let g = Tensor::new(&[3.0f32, 0.0, 4.0], &Device::Cpu).unwrap();
        let (norm, clipped) = clip_grad_norm(&g, 1.0).unwrap();
        assert!((norm.to_scalar::<f32>().unwrap() - 5.0).abs() < 1e-6);
        let c0 = clipped.to_vec1::<f32>().unwrap();
        assert!((f64::from(c0[0]) - 3.0 / (5.0 + 1e-6)).abs() < 1e-6);
        let (_, same) = clip_grad_norm(&g, 10.0).unwrap();
        assert_eq!(same.to_vec1::<f32>().unwrap(), [3.0, 0.0, 4.0]);
    }
}
