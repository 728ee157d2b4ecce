//! Rotary position embeddings: inverse frequencies from the config (default, linear, llama3
//! scaling, as transformers computes them) and cos/sin tables for a range of positions, built
//! once per device and dtype (grown when a longer sequence comes) and sliced per forward.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, DeviceLocation, Result, Tensor};

use super::config::ModelConfig;

/// Inverse frequencies of one head.
#[derive(Clone, Debug)]
pub struct Rope {
    inv_freq: Vec<f32>,
    cache: Arc<Mutex<Vec<Cached>>>,
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
            _ => {}
        }
        Self {
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
                let (cos, sin) = self.build(0, n, dtype, device)?;
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

    fn build(
        &self,
        offset: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * half * 2);
        let mut sin = Vec::with_capacity(len * half * 2);
        for p in offset..offset + len {
            let row: Vec<f32> = self.inv_freq.iter().map(|f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(row.iter().map(|a| a.cos()));
                sin.extend(row.iter().map(|a| a.sin()));
            }
        }
        let cos = Tensor::from_vec(cos, (len, half * 2), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (len, half * 2), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}

impl Cached {
    /// The same device object (two `Device::new_cuda(0)` are different devices to candle).
    fn same_device(&self, device: &Device) -> bool {
        self.cos.device().same_device(device)
    }
}
