//! The one seam every projection goes through, so LoRA can replace it by module name.

use candle_core::{D, DType, Result, Tensor, Var};

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
        self.forward_t(x, false)
    }

    /// Forward; `train` applies the adapter's dropout.
    ///
    /// # Shapes
    /// `x: [.., in]` -> `[.., out]`.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
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
                if train && l.dropout > 0.0 {
                    h = candle_nn::ops::dropout(&h, l.dropout as f32)?;
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
