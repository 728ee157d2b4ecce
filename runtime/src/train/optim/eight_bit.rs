//! 8-bit AdamW states as bitsandbytes keeps them (`optim: "adamw_8bit"`, HF's
//! `adamw_bnb_8bit`): each tensor's moments in blocks of 256, a byte per value from bitsandbytes'
//! dynamic code books (signed for the first moment, unsigned for the second) times the block's
//! absmax; tensors under 4,096 elements keep f32 moments (`min_8bit_size`). Each step dequantizes
//! a block, updates it in f32, moves the parameter with the f32 moments, and quantizes the block
//! again with its new absmax. 2 bytes a parameter instead of 8.
//!
//! [`Blockwise8::step_host`] is the reference op (plain loops); on CUDA one kernel does a block
//! per thread block (`adamw8.cu`).

use candle_core::{DType, Device, Tensor};

use super::AdamWConfig;
use crate::Result;
use crate::train::flat::FlatParams;

/// Values a block's absmax covers.
pub const BLOCK: usize = 256;
/// Tensors with fewer elements keep f32 moments (bitsandbytes' `min_8bit_size`).
pub const MIN_8BIT_SIZE: usize = 4096;

/// `torch.linspace(start, end, n)` in f32, as torch's vectorized kernel computes it (from both
/// ends, the product and the sum rounded once).
fn linspace(start: f32, end: f32, n: usize) -> Vec<f32> {
    let step = f64::from((end - start) / (n - 1) as f32);
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                (f64::from(start) + step * i as f64) as f32
            } else {
                (f64::from(end) - step * (n - i - 1) as f64) as f32
            }
        })
        .collect()
}

/// bitsandbytes' `create_dynamic_map(signed, 7, 8)`: 256 values in [-1, 1] (signed) or [0, 1],
/// sorted, dense near 0.
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let items = if signed {
            (1usize << i) + 1
        } else {
            (1usize << (i + 1)) + 1
        };
        let b = linspace(0.1, 1.0, items);
        let scale = 10f64.powi(i - 6) as f32;
        for w in b.windows(2) {
            // torch's f32 arithmetic: the sum rounded, then halved (not `f32::midpoint`).
            #[allow(clippy::manual_midpoint)]
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-(scale * mean));
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// The index of the value of `map` (sorted) nearest `x` (the lower one on a tie).
pub fn nearest(map: &[f32; 256], x: f32) -> u8 {
    let hi = map.partition_point(|&c| c < x);
    let i = if hi == 0 {
        0
    } else if hi >= 256 {
        255
    } else if (x - map[hi - 1]) <= (map[hi] - x) {
        hi - 1
    } else {
        hi
    };
    i as u8
}

/// A run of elements of the flat buffer updated one way: a quantization block, or a tensor
/// small enough for f32 moments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// First element in the flat buffer.
    pub start: usize,
    /// Elements.
    pub len: usize,
    /// Whether weight decay applies.
    pub decay: bool,
}

/// 8-bit moments over a flat parameter buffer.
#[derive(Debug)]
pub struct Blockwise8 {
    /// The quantization blocks (never across tensors), in order.
    pub blocks: Vec<Run>,
    /// The tensors with f32 moments.
    pub small: Vec<Run>,
    /// First-moment codes, a byte per element of the flat buffer (those of small tensors unused).
    pub codes_m: Tensor,
    /// Second-moment codes.
    pub codes_v: Tensor,
    /// Per block, the first moment's absmax (f32).
    pub absmax_m: Tensor,
    /// Per block, the second moment's absmax.
    pub absmax_v: Tensor,
    /// The small tensors' f32 first moments, one after another.
    pub small_m: Tensor,
    /// Their second moments.
    pub small_v: Tensor,
    /// The signed code book (first moment).
    pub map_m: [f32; 256],
    /// The unsigned code book (second moment).
    pub map_v: [f32; 256],
    /// The tables the kernel reads, on the states' device: per block its first element (i64)
    /// and its length with the decay flag in the top bit (u32); the same for the small tensors
    /// with their offsets in `small_m`; the two code books (f32 `[512]`).
    pub tables: Tables,
}

/// See [`Blockwise8::tables`].
#[derive(Debug)]
pub struct Tables {
    /// Blocks' first elements.
    pub block_starts: Tensor,
    /// Blocks' lengths and decay flags.
    pub block_lens: Tensor,
    /// Small tensors' first elements.
    pub small_starts: Tensor,
    /// Their lengths and decay flags.
    pub small_lens: Tensor,
    /// Their offsets in the f32 moments.
    pub small_offs: Tensor,
    /// The signed code book then the unsigned one.
    pub maps: Tensor,
}

impl Tables {
    fn new(blocks: &[Run], small: &[Run], maps: [&[f32; 256]; 2], device: &Device) -> Result<Self> {
        let starts = |runs: &[Run]| {
            let v: Vec<i64> = runs.iter().map(|r| r.start as i64).collect();
            Tensor::from_vec(v, runs.len(), device)
        };
        let lens = |runs: &[Run]| {
            let v: Vec<u32> = runs
                .iter()
                .map(|r| r.len as u32 | (u32::from(r.decay) << 31))
                .collect();
            Tensor::from_vec(v, runs.len(), device)
        };
        let mut offs = Vec::with_capacity(small.len());
        let mut k = 0i64;
        for r in small {
            offs.push(k);
            k += r.len as i64;
        }
        let mut books = maps[0].to_vec();
        books.extend_from_slice(maps[1]);
        Ok(Self {
            block_starts: starts(blocks)?,
            block_lens: lens(blocks)?,
            small_starts: starts(small)?,
            small_lens: lens(small)?,
            small_offs: Tensor::from_vec(offs, small.len(), device)?,
            maps: Tensor::from_vec(books, 512, device)?,
        })
    }
}

impl Blockwise8 {
    /// Zeroed moments for `params`.
    pub fn new(params: &FlatParams) -> Result<Self> {
        let (mut blocks, mut small) = (Vec::new(), Vec::new());
        for s in &params.slots {
            let n = s.len();
            if n < MIN_8BIT_SIZE {
                small.push(Run {
                    start: s.offset,
                    len: n,
                    decay: s.decay,
                });
                continue;
            }
            let mut a = 0;
            while a < n {
                let len = BLOCK.min(n - a);
                blocks.push(Run {
                    start: s.offset + a,
                    len,
                    decay: s.decay,
                });
                a += len;
            }
        }
        let device = params.device();
        let n = params.len();
        let small_len: usize = small.iter().map(|r| r.len).sum();
        let (map_m, map_v) = (dynamic_map(true), dynamic_map(false));
        // Codes of zero: every moment starts at 0 (whatever the absmax).
        let code = |map: &[f32; 256]| Tensor::full(nearest(map, 0.0), n, device);
        let tables = Tables::new(&blocks, &small, [&map_m, &map_v], device)?;
        Ok(Self {
            tables,
            codes_m: code(&map_m)?,
            codes_v: code(&map_v)?,
            absmax_m: Tensor::zeros(blocks.len(), DType::F32, device)?,
            absmax_v: Tensor::zeros(blocks.len(), DType::F32, device)?,
            small_m: Tensor::zeros(small_len, DType::F32, device)?,
            small_v: Tensor::zeros(small_len, DType::F32, device)?,
            blocks,
            small,
            map_m,
            map_v,
        })
    }

    /// Bytes these states hold for `params` of `n` elements in `tensors` of the given sizes.
    pub fn bytes(sizes: impl Iterator<Item = usize>) -> u64 {
        sizes
            .map(|n| {
                if n < MIN_8BIT_SIZE {
                    8 * n as u64
                } else {
                    2 * n as u64 + 8 * n.div_ceil(BLOCK) as u64
                }
            })
            .sum()
    }

    /// The moments as f32 flat buffers of the parameters' length (dequantized).
    pub fn moments(&self) -> Result<(Tensor, Tensor)> {
        let (cm, cv) = (self.codes_m.to_vec1::<u8>()?, self.codes_v.to_vec1::<u8>()?);
        let (am, av) = (
            self.absmax_m.to_vec1::<f32>()?,
            self.absmax_v.to_vec1::<f32>()?,
        );
        let (sm, sv) = (
            self.small_m.to_vec1::<f32>()?,
            self.small_v.to_vec1::<f32>()?,
        );
        let n = cm.len();
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        for (b, r) in self.blocks.iter().enumerate() {
            for i in r.start..r.start + r.len {
                m[i] = self.map_m[cm[i] as usize] * am[b];
                v[i] = self.map_v[cv[i] as usize] * av[b];
            }
        }
        let mut k = 0;
        for r in &self.small {
            m[r.start..r.start + r.len].copy_from_slice(&sm[k..k + r.len]);
            v[r.start..r.start + r.len].copy_from_slice(&sv[k..k + r.len]);
            k += r.len;
        }
        let device = self.codes_m.device();
        Ok((
            Tensor::from_vec(m, n, device)?,
            Tensor::from_vec(v, n, device)?,
        ))
    }

    /// Sets the moments from f32 flat buffers (a restored checkpoint), quantizing each block
    /// with `absmax` (the blocks' saved absmax of each moment: the codes come back exactly) or,
    /// without, with the block's largest value.
    pub fn set_moments(
        &mut self,
        m: &Tensor,
        v: &Tensor,
        absmax: Option<(&Tensor, &Tensor)>,
    ) -> Result<()> {
        let (m, v) = (
            m.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            v.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        );
        let n = self.codes_m.elem_count();
        if m.len() != n || v.len() != n {
            return Err(crate::Error::InvalidArgument(format!(
                "8-bit moments of {} and {} elements for {n} parameters",
                m.len(),
                v.len()
            )));
        }
        let mut host = Host::of(self)?;
        let given = match absmax {
            Some((am, av))
                if am.elem_count() == self.blocks.len() && av.elem_count() == self.blocks.len() =>
            {
                Some((am.to_vec1::<f32>()?, av.to_vec1::<f32>()?))
            }
            _ => None,
        };
        for (b, r) in self.blocks.iter().enumerate() {
            let range = r.start..r.start + r.len;
            let scale = given.as_ref().map(|(am, av)| (am[b], av[b]));
            host.quantize(b, range.clone(), &m[range.clone()], &v[range], self, scale);
        }
        let mut k = 0;
        for r in &self.small {
            host.sm[k..k + r.len].copy_from_slice(&m[r.start..r.start + r.len]);
            host.sv[k..k + r.len].copy_from_slice(&v[r.start..r.start + r.len]);
            k += r.len;
        }
        host.store(self)
    }

    /// One AdamW step on the host (the reference op): `params` from the f32 `grads` scaled by
    /// `clip`, at learning rate `lr`, step `t` (from 1); bitsandbytes' arithmetic.
    pub fn step_host(
        &mut self,
        params: &FlatParams,
        grads: &Tensor,
        clip: Option<&Tensor>,
        cfg: &AdamWConfig,
        lr: f64,
        t: i32,
    ) -> Result<()> {
        let c = match clip {
            Some(f) => f.to_dtype(DType::F32)?.to_vec0::<f32>()?,
            None => 1.0,
        };
        let g = grads.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let dtype = params.data.dtype();
        let mut p = params
            .data
            .as_tensor()
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let mut host = Host::of(self)?;
        let (b1, b2) = (cfg.beta1 as f32, cfg.beta2 as f32);
        let (om1, om2) = ((1.0 - cfg.beta1) as f32, (1.0 - cfg.beta2) as f32);
        let bc1 = (1.0 - cfg.beta1.powi(t)) as f32;
        let bc2 = ((1.0 - cfg.beta2.powi(t)) as f32).sqrt();
        let (lr, eps, wd) = (lr as f32, cfg.eps as f32, cfg.weight_decay as f32);
        let mut update = |i: usize, m: &mut f32, v: &mut f32, decay: bool| {
            let gi = g[i] * c;
            *m = b1 * *m + om1 * gi;
            *v = b2 * *v + om2 * gi * gi;
            if decay && wd > 0.0 {
                p[i] *= 1.0 - lr * wd;
            }
            p[i] -= (lr / bc1) * *m / (v.sqrt() / bc2 + eps);
        };
        let (mut m, mut v) = (vec![0f32; BLOCK], vec![0f32; BLOCK]);
        for (b, r) in self.blocks.iter().enumerate() {
            let (am, av) = (host.am[b], host.av[b]);
            for j in 0..r.len {
                let i = r.start + j;
                m[j] = self.map_m[host.cm[i] as usize] * am;
                v[j] = self.map_v[host.cv[i] as usize] * av;
                update(i, &mut m[j], &mut v[j], r.decay);
            }
            let range = r.start..r.start + r.len;
            host.quantize(b, range, &m[..r.len], &v[..r.len], self, None);
        }
        let mut k = 0;
        for r in &self.small {
            for j in 0..r.len {
                let (mut m, mut v) = (host.sm[k + j], host.sv[k + j]);
                update(r.start + j, &mut m, &mut v, r.decay);
                host.sm[k + j] = m;
                host.sv[k + j] = v;
            }
            k += r.len;
        }
        host.store(self)?;
        let p = Tensor::from_vec(p, params.len(), params.device())?.to_dtype(dtype)?;
        params.data.set(&p)?;
        Ok(())
    }

    /// The device the states live on.
    pub fn device(&self) -> &Device {
        self.codes_m.device()
    }
}

/// The states as host vectors, for the reference op.
struct Host {
    cm: Vec<u8>,
    cv: Vec<u8>,
    am: Vec<f32>,
    av: Vec<f32>,
    sm: Vec<f32>,
    sv: Vec<f32>,
}

impl Host {
    fn of(s: &Blockwise8) -> Result<Self> {
        Ok(Self {
            cm: s.codes_m.to_vec1()?,
            cv: s.codes_v.to_vec1()?,
            am: s.absmax_m.to_vec1()?,
            av: s.absmax_v.to_vec1()?,
            sm: s.small_m.to_vec1()?,
            sv: s.small_v.to_vec1()?,
        })
    }

    /// Block `b` (elements `range`) from f32 values: the absmax of each moment (`scale`, or the
    /// block's largest value), and each value's nearest code.
    fn quantize(
        &mut self,
        b: usize,
        range: std::ops::Range<usize>,
        m: &[f32],
        v: &[f32],
        s: &Blockwise8,
        scale: Option<(f32, f32)>,
    ) {
        let (am, av) = scale.unwrap_or_else(|| {
            (
                m.iter().fold(0f32, |a, x| a.max(x.abs())),
                v.iter().fold(0f32, |a, x| a.max(x.abs())),
            )
        });
        self.am[b] = am;
        self.av[b] = av;
        for (j, i) in range.enumerate() {
            self.cm[i] = nearest(&s.map_m, if am > 0.0 { m[j] / am } else { 0.0 });
            self.cv[i] = nearest(&s.map_v, if av > 0.0 { v[j] / av } else { 0.0 });
        }
    }

    fn store(self, s: &mut Blockwise8) -> Result<()> {
        let dev = s.codes_m.device().clone();
        let n = self.cm.len();
        s.codes_m = Tensor::from_vec(self.cm, n, &dev)?;
        s.codes_v = Tensor::from_vec(self.cv, n, &dev)?;
        let nb = self.am.len();
        s.absmax_m = Tensor::from_vec(self.am, nb, &dev)?;
        s.absmax_v = Tensor::from_vec(self.av, nb, &dev)?;
        let ns = self.sm.len();
        s.small_m = Tensor::from_vec(self.sm, ns, &dev)?;
        s.small_v = Tensor::from_vec(self.sv, ns, &dev)?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::train::optim::{AdamW, Moments};

    fn goldens() -> HashMap<String, Tensor> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/bnb8/adamw8bit.safetensors");
        candle_core::safetensors::load(&path, &Device::Cpu).unwrap()
    }

    fn vec(g: &HashMap<String, Tensor>, k: &str) -> Vec<f32> {
        g[k].flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn bytes(g: &HashMap<String, Tensor>, k: &str) -> Vec<u8> {
        g[k].flatten_all().unwrap().to_vec1::<u8>().unwrap()
    }

    fn max_diff(got: &[f32], want: &[f32]) -> f32 {
        got.iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    }

    /// Elements whose codes differ, each by one step of the code book at most.
    fn codes_off(ours: &[u8], theirs: &[u8]) -> usize {
        let mut n = 0;
        for (a, b) in ours.iter().zip(theirs) {
            assert!(a.abs_diff(*b) <= 1, "codes {a} and {b}");
            n += usize::from(a != b);
        }
        n
    }

    /// The goldens' two tensors in a flat buffer (weight decay on the first only) and an 8-bit
    /// AdamW over them.
    fn setup(g: &HashMap<String, Tensor>, big: &str, small: &str) -> (FlatParams, AdamW) {
        let (mut params, _) = FlatParams::new(&[
            ("big".to_string(), g[big].clone()),
            ("small".to_string(), g[small].clone()),
        ])
        .unwrap();
        params.slots[1].decay = false;
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            eight_bit: true,
            ..AdamWConfig::default()
        };
        let opt = AdamW::new(&params, cfg).unwrap();
        (params, opt)
    }

    fn grads(g: &HashMap<String, Tensor>, step: usize) -> Tensor {
        let part = |k: String| g[&k].flatten_all().unwrap();
        Tensor::cat(
            &[
                part(format!("big.grad.{step}")),
                part(format!("small.grad.{step}")),
            ],
            0,
        )
        .unwrap()
    }

    /// The code books are bitsandbytes' to the bit; one step of 8-bit AdamW from bitsandbytes'
    /// own parameters and states (a tensor of 8-bit states with a partial last block, one of
    /// f32 states) gives its parameters to float rounding and its codes but for a value on a
    /// code's edge (bitsandbytes' CPU quantizes through a 65,536-entry table, qscript to the
    /// nearest code); five steps from the start stay close (`scripts/make_bnb8_goldens.py`).
    #[test]
    fn eight_bit_adamw_matches_bitsandbytes() {
        let g = goldens();
        assert_eq!(vec(&g, "map_signed"), dynamic_map(true).to_vec());
        assert_eq!(vec(&g, "map_unsigned"), dynamic_map(false).to_vec());

        // One step (the fifth) from bitsandbytes' state after the fourth.
        let (params, mut opt) = setup(&g, "big.after.3", "small.after.3");
        {
            let Moments::Eight(e) = &mut opt.moments else {
                panic!("not 8-bit")
            };
            let tail = |t: &Tensor| t.narrow(0, 5000, 300).unwrap();
            let cat8 = |k: &str, rest: &Tensor| {
                Tensor::cat(&[g[k].flatten_all().unwrap(), rest.clone()], 0).unwrap()
            };
            e.codes_m = cat8("big.state1.3", &tail(&e.codes_m));
            e.codes_v = cat8("big.state2.3", &tail(&e.codes_v));
            e.absmax_m = g["big.absmax1.3"].clone();
            e.absmax_v = g["big.absmax2.3"].clone();
            e.small_m = g["small.state1.3"].clone();
            e.small_v = g["small.state2.3"].clone();
        }
        opt.step = 4;
        opt.step(&params, &grads(&g, 4), None, 1e-2).unwrap();
        let p = params.data.as_tensor().to_vec1::<f32>().unwrap();
        assert!(max_diff(&p[..5000], &vec(&g, "big.after.4")) <= 1e-6);
        assert!(max_diff(&p[5000..], &vec(&g, "small.after.4")) <= 1e-6);
        let Moments::Eight(e) = &opt.moments else {
            panic!("not 8-bit")
        };
        let head = |t: &Tensor| t.narrow(0, 0, 5000).unwrap().to_vec1::<u8>().unwrap();
        assert!(codes_off(&head(&e.codes_m), &bytes(&g, "big.state1.4")) <= 25);
        assert!(codes_off(&head(&e.codes_v), &bytes(&g, "big.state2.4")) <= 25);
        assert!(max_diff(&e.absmax_m.to_vec1().unwrap(), &vec(&g, "big.absmax1.4")) <= 1e-7);
        assert!(max_diff(&e.absmax_v.to_vec1().unwrap(), &vec(&g, "big.absmax2.4")) <= 1e-8);
        assert!(max_diff(&e.small_m.to_vec1().unwrap(), &vec(&g, "small.state1.4")) <= 1e-8);
        assert!(max_diff(&e.small_v.to_vec1().unwrap(), &vec(&g, "small.state2.4")) <= 1e-8);

        // Five steps from the start: the f32-state tensor exactly, the 8-bit one close (a code
        // rounded the other way changes that element's later steps a little).
        let (params, mut opt) = setup(&g, "big.init", "small.init");
        for step in 0..5 {
            opt.step(&params, &grads(&g, step), None, 1e-2).unwrap();
        }
        let p = params.data.as_tensor().to_vec1::<f32>().unwrap();
        assert!(max_diff(&p[5000..], &vec(&g, "small.after.4")) <= 1e-6);
        let want = vec(&g, "big.after.4");
        let far = p[..5000]
            .iter()
            .zip(&want)
            .filter(|(a, b)| (*a - *b).abs() > 1e-5)
            .count();
        assert!(far <= 150 && max_diff(&p[..5000], &want) <= 5e-3, "{far}");

        // Saved as f32 and quantized again on resume, the states are the same.
        let Moments::Eight(e) = &opt.moments else {
            panic!("not 8-bit")
        };
        let before = (
            e.codes_m.to_vec1::<u8>().unwrap(),
            e.codes_v.to_vec1::<u8>().unwrap(),
        );
        let (m, v) = opt.moments().unwrap();
        let absmax = opt.absmax();
        opt.set_moments(m, v, absmax).unwrap();
        let Moments::Eight(e) = &opt.moments else {
            panic!("not 8-bit")
        };
        assert_eq!(e.codes_m.to_vec1::<u8>().unwrap(), before.0);
        assert_eq!(e.codes_v.to_vec1::<u8>().unwrap(), before.1);
    }
}
