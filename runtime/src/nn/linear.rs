//! The one seam every projection goes through, so LoRA can replace it by module name.

use std::cell::Cell;

use candle_core::{D, DType, Result, Tensor, Var};
use rand::{Rng, SeedableRng};

/// A LoRA adapter on a linear layer: `scale * B (A dropout(x))`, kept in f32.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// `lora_A` `[r, in]`.
    pub a: Var,
    /// `lora_B` `[out, r]`.
    pub b: Var,
    /// `alpha / r` (or `alpha / sqrt(r)`).
    pub scale: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
}

impl LoraAdapter {
    /// An adapter from initial A and B.
    pub fn new(a: Tensor, b: Tensor, scale: f64, dropout: f64) -> Result<Self> {
        Ok(Self {
            a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
            b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
            scale,
            dropout,
        })
    }
}

/// Seeded dropout: the mask of the k-th call comes from `(seed, k)`, so recomputing a block
/// (gradient checkpointing) or replaying a step (resume) draws the same masks.
#[derive(Debug)]
pub struct Dropout {
    seed: u64,
    calls: Cell<u64>,
}

impl Dropout {
    /// Masks from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            calls: Cell::new(0),
        }
    }

    /// Zeroes each element with probability `p` and scales the rest by `1 / (1 - p)`.
    pub fn apply(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        let k = self.calls.get();
        self.calls.set(k + 1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix(self.seed, k));
        let keep = (1.0 / (1.0 - p)) as f32;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }
}

/// Mixes two numbers into a seed (splitmix64 of their combination).
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_add(0x9E37_79B9_7F4A_7C15)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `y = x W^T + b`, with `W: [out, in]` as HF stores it, plus a LoRA adapter when attached.
#[derive(Clone, Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Option<Tensor>,
    /// The adapter, if any.
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    /// A linear layer from HF tensors.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    /// Inference forward (no dropout).
    ///
    /// # Shapes
    /// `x: [.., in]` -> `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, None)
    }

    /// Forward; with `dropout` (training), the adapter's input dropout is applied.
    ///
    /// # Shapes
    /// `x: [.., in]` -> `[.., out]`.
    pub fn forward_t(&self, x: &Tensor, dropout: Option<&Dropout>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inner = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, inner))?;
        let y = x2.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let y = match &self.lora {
            Some(l) => {
                let mut h = x2.to_dtype(DType::F32)?;
                if let Some(d) = dropout
                    && l.dropout > 0.0
                {
                    h = d.apply(&h, l.dropout)?;
                }
                let delta = (h
                    .matmul(&l.a.as_tensor().t()?)?
                    .matmul(&l.b.as_tensor().t()?)?
                    * l.scale)?;
                y.add(&delta.to_dtype(y.dtype())?)?
            }
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap_or(&mut 0) = self.weight.dim(0)?;
        y.reshape(out)
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.dims().first().copied().unwrap_or(0)
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.weight.dim(D::Minus1).unwrap_or(0)
    }
}
