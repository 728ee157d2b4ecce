//! Rotary position embeddings: inverse frequencies from the config (default, linear, llama3,
//! yarn and dynamic NTK scaling, as transformers computes them; yarn also scales cos and sin) and
//! cos/sin tables for a range of positions, built once per device and dtype (grown when a longer
//! sequence comes) and sliced per forward. Dynamic scaling past `max_position_embeddings` depends
//! on the length a forward reaches, so those tables are built for that forward (transformers
//! keeps the longest length it saw and its base for later, shorter forwards above the maximum;
//! here each forward's own length counts, as a freshly loaded model's does there).

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, DeviceLocation, Result, Tensor};

use super::config::ModelConfig;

/// Inverse frequencies of one head.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
    /// The factor on cos and sin (yarn's attention factor; 1 otherwise).
    scale: f32,
    /// Dynamic NTK scaling (`rope_type: "dynamic"`).
    dynamic: Option<Dynamic>,
    cache: Arc<Mutex<Vec<Cached>>>,
}

/// Dynamic NTK scaling: past `max_position_embeddings` positions, a forward reaching `len`
/// positions rotates with the base raised to `base ((factor len / max) - (factor - 1))^(d / (d - 2))`
/// (transformers' `_compute_dynamic_ntk_parameters`; shorter forwards use the plain base).
#[derive(Clone, Copy, Debug)]
struct Dynamic {
    factor: f64,
    max: usize,
    base: f64,
    dim: usize,
}

impl Dynamic {
    /// Inverse frequencies for a forward reaching `len` positions (past `max`), in f32 as
    /// transformers computes them.
    fn inv_freq(&self, len: usize) -> Vec<f32> {
        let d = self.dim as f64;
        let ratio = self.factor * len as f64 / self.max as f64 - (self.factor - 1.0);
        let base = (self.base * ratio.powf(d / (d - 2.0))) as f32;
        (0..self.dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / self.dim as f32))
            .collect()
    }
}

#[derive(Debug)]
struct Cached {
    location: DeviceLocation,
    dtype: DType,
    len: usize,
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// From the config's head size, base and scaling.
    pub fn new(cfg: &ModelConfig) -> Self {
        let p = cfg.rope();
        let dim = cfg.head_dim();
        let base = p.rope_theta.unwrap_or(10_000.0);
        let mut inv: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64))
            .collect();
        let mut scale = 1.0;
        match p.rope_type.as_deref() {
            Some("linear") => {
                let f = p.factor.unwrap_or(1.0);
                for v in &mut inv {
                    *v /= f;
                }
            }
            Some("llama3") => {
                let factor = p.factor.unwrap_or(8.0);
                let low = p.low_freq_factor.unwrap_or(1.0);
                let high = p.high_freq_factor.unwrap_or(4.0);
                let old = p.original_max_position_embeddings.unwrap_or(8192) as f64;
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                for v in &mut inv {
                    let wavelen = 2.0 * std::f64::consts::PI / *v;
                    let scaled = if wavelen > low_wavelen {
                        *v / factor
                    } else {
                        *v
                    };
                    let medium = (high_wavelen..=low_wavelen).contains(&wavelen);
                    *v = if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
            Some("yarn") => {
                let (v, s) = yarn(&p, cfg, dim, base);
                inv = v;
                scale = s;
            }
            _ => {}
        }
        let dynamic = (p.rope_type.as_deref() == Some("dynamic")).then(|| Dynamic {
            factor: p.factor.unwrap_or(1.0),
            max: cfg.max_position_embeddings.max(1),
            base,
            dim,
        });
        Self {
            scale: scale as f32,
            dynamic,
            inv_freq: inv.into_iter().map(|v| v as f32).collect(),
            cache: Arc::default(),
        }
    }

    /// `(cos, sin)` for positions `offset..offset + len`, sliced from the cached tables.
    ///
    /// # Shapes
    /// Each `[len, head_dim]`.
    pub fn tables(
        &self,
        offset: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let need = offset + len;
        if let Some(d) = self.dynamic.filter(|d| need > d.max) {
            return build(&d.inv_freq(need), self.scale, offset, len, dtype, device);
        }
        let location = device.location();
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| candle_core::Error::Msg("rope cache poisoned".into()))?;
        let pos = cache
            .iter()
            .position(|c| c.location == location && c.dtype == dtype && c.same_device(device));
        let pos = match pos {
            Some(i) if cache[i].len >= need => i,
            found => {
                let n = need.next_power_of_two().max(256);
                let (cos, sin) = build(&self.inv_freq, self.scale, 0, n, dtype, device)?;
                let entry = Cached {
                    location,
                    dtype,
                    len: n,
                    cos,
                    sin,
                };
                if let Some(i) = found {
                    cache[i] = entry;
                    i
                } else {
                    cache.push(entry);
                    cache.len() - 1
                }
            }
        };
        let c = &cache[pos];
        Ok((c.cos.narrow(0, offset, len)?, c.sin.narrow(0, offset, len)?))
    }
}

/// `(cos, sin)` of positions `offset..offset + len` for `inv_freq`, times `scale`.
fn build(
    inv_freq: &[f32],
    scale: f32,
    offset: usize,
    len: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(len * half * 2);
    let mut sin = Vec::with_capacity(len * half * 2);
    for p in offset..offset + len {
        let row: Vec<f32> = inv_freq.iter().map(|f| p as f32 * f).collect();
        for _ in 0..2 {
            cos.extend(row.iter().map(|a| a.cos() * scale));
            sin.extend(row.iter().map(|a| a.sin() * scale));
        }
    }
    let cos = Tensor::from_vec(cos, (len, half * 2), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (len, half * 2), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// YaRN's inverse frequencies and attention factor, as transformers' `_compute_yarn_parameters`:
/// each frequency between its interpolated (`/ factor`) and extrapolated value by a linear ramp
/// over the dimensions whose rotations in the original context lie between `beta_slow` and
/// `beta_fast`; cos and sin scaled by `0.1 ln(factor) + 1` (or the `mscale` ratio).
fn yarn(
    p: &super::config::RopeParams,
    cfg: &ModelConfig,
    dim: usize,
    base: f64,
) -> (Vec<f64>, f64) {
    use std::f64::consts::PI;
    let original = p
        .original_max_position_embeddings
        .unwrap_or(cfg.max_position_embeddings) as f64;
    let factor = p
        .factor
        .unwrap_or(cfg.max_position_embeddings as f64 / original);
    let get_mscale = |scale: f64, m: f64| {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * m * scale.ln() + 1.0
        }
    };
    let attention = p
        .attention_factor
        .unwrap_or_else(|| match (p.mscale, p.mscale_all_dim) {
            (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                get_mscale(factor, m) / get_mscale(factor, all)
            }
            _ => get_mscale(factor, 1.0),
        });
    let beta_fast = p.beta_fast.filter(|&b| b != 0.0).unwrap_or(32.0);
    let beta_slow = p.beta_slow.filter(|&b| b != 0.0).unwrap_or(1.0);
    let d = dim as f64;
    let correction =
        |rotations: f64| d * (original / (rotations * 2.0 * PI)).ln() / (2.0 * base.ln());
    let (mut low, mut high) = (correction(beta_fast), correction(beta_slow));
    if p.truncate.unwrap_or(true) {
        low = low.floor();
        high = high.ceil();
    }
    let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
    if low == high {
        high += 0.001;
    }
    // In f32 as transformers computes them.
    let inv = (0..dim / 2)
        .map(|i| {
            let pos = (base as f32).powf((2 * i) as f32 / dim as f32);
            let (extra, inter) = (1.0 / pos, 1.0 / (factor as f32 * pos));
            let ramp = ((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0);
            let keep = 1.0 - ramp;
            f64::from(inter * (1.0 - keep) + extra * keep)
        })
        .collect();
    (inv, attention)
}

impl Cached {
    /// The same device object (two `Device::new_cuda(0)` are different devices to candle).
    fn same_device(&self, device: &Device) -> bool {
        self.cos.device().same_device(device)
    }
}
