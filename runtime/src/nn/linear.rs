//! The one seam every projection goes through, so LoRA can replace it by module name, with its
//! explicit backward. A frozen weight gets no gradient and no weight-gradient matmul: only `dX`.

use candle_core::{D, DType, Result, Tensor};

use super::GradSink;
use super::dropout;
use super::ops::{add_bias, add_matmul};

/// A LoRA adapter on a linear layer: `scale * B (A dropout(x))`. A and B are stored in f32 (the
/// optimizer's master copy) and applied in the dtype of the activations.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// `lora_A` `[r, in]`.
    pub a: Tensor,
    /// `lora_B` `[out, r]`.
    pub b: Tensor,
    /// `alpha / r` (or `alpha / sqrt(r)`).
    pub scale: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
}

impl LoraAdapter {
    /// An adapter from initial A and B.
    pub fn new(a: Tensor, b: Tensor, scale: f64, dropout: f64) -> Result<Self> {
        Ok(Self {
            a: a.to_dtype(DType::F32)?,
            b: b.to_dtype(DType::F32)?,
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

/// What [`Linear::backward`] needs from the forward.
#[derive(Clone, Debug)]
pub struct LinearSaved {
    /// The input, flattened to `[rows, in]`.
    x: Tensor,
    /// `dropout(x) A^T` `[rows, r]` and the dropout key (`None`: no dropout).
    lora: Option<(Tensor, Option<dropout::Key>)>,
    /// Elements per example row of `x` (dropout masks are keyed per example).
    row_elems: usize,
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
        self.forward_t(x, None, None)
    }

    /// Forward; `dropout_key` (training) applies the adapter's input dropout with masks keyed by
    /// it (per example: the first dimension of a `[b, s, in]` input), and `saved` records what
    /// [`Linear::backward`] needs.
    ///
    /// # Shapes
    /// `x: [.., in]` -> `[.., out]`.
    pub fn forward_t(
        &self,
        x: &Tensor,
        dropout_key: Option<dropout::Key>,
        saved: Option<&mut Option<LinearSaved>>,
    ) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inner = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let row_elems = if dims.len() >= 3 {
            dims[1..].iter().product()
        } else {
            rows * inner
        };
        let x2 = x.reshape((rows, inner))?;
        let mut y = x2.matmul(&self.weight.t()?)?;
        if let Some(b) = &self.bias {
            y = add_bias(y, b)?;
        }
        let mut lora_saved = None;
        if let Some(l) = &self.lora {
            let key = dropout_key.filter(|_| l.dropout > 0.0);
            let h = match key {
                Some(k) => dropout::apply(&x2, l.dropout, k, row_elems)?,
                None => x2.clone(),
            };
            let dtype = x2.dtype();
            let xa = h.matmul(&l.a.to_dtype(dtype)?.t()?)?;
            y = add_matmul(y, &xa, &l.b.to_dtype(dtype)?.t()?, l.scale)?;
            lora_saved = Some((xa, key));
        }
        if let Some(slot) = saved {
            *slot = Some(LinearSaved {
                x: x2,
                lora: lora_saved,
                row_elems,
            });
        }
        let mut out = dims;
        *out.last_mut().unwrap_or(&mut 0) = self.weight.dim(0)?;
        y.reshape(out)
    }

    /// Backward from `dy` (`[.., out]`): returns `dx` (`[rows, in]`) and adds the gradients of the
    /// tensors `grads` wants (adapters; every weight in full fine-tuning). A frozen weight costs
    /// one matmul (`dx`), no more.
    pub fn backward(
        &self,
        saved: &LinearSaved,
        dy: &Tensor,
        grads: &mut dyn GradSink,
    ) -> Result<Tensor> {
        self.backward_into(saved, dy, None, grads)
    }

    /// [`Linear::backward`] with `dx` added to `acc` (`[rows, in]`, held by nothing else): the GEMM
    /// accumulates into it, so the `dx` of projections that share an input sum without an add.
    pub fn backward_into(
        &self,
        saved: &LinearSaved,
        dy: &Tensor,
        acc: Option<Tensor>,
        grads: &mut dyn GradSink,
    ) -> Result<Tensor> {
        let rows = saved.x.dim(0)?;
        let dy = dy.reshape((rows, self.out_features()))?;
        let mut dx = match acc {
            Some(acc) => add_matmul(
                acc.reshape((rows, self.in_features()))?,
                &dy,
                &self.weight,
                1.0,
            )?,
            None => dy.matmul(&self.weight)?,
        };
        if grads.wants(&self.weight) {
            grads.add_matmul(&self.weight, &dy.t()?, &saved.x, 1.0)?;
        }
        if let Some(b) = &self.bias
            && grads.wants(b)
        {
            grads.add_col_sums(b, &dy)?;
        }
        if let (Some(l), Some((xa, key))) = (&self.lora, &saved.lora) {
            let dtype = dy.dtype();
            let (a, b) = (l.a.to_dtype(dtype)?, l.b.to_dtype(dtype)?);
            // d(xa) without the scale: it goes into each product's alpha.
            let dxa = dy.matmul(&b)?;
            if grads.wants(&l.b) {
                grads.add_matmul(&l.b, &dy.t()?, xa, l.scale)?;
            }
            if grads.wants(&l.a) {
                let h = match key {
                    Some(k) => dropout::apply(&saved.x, l.dropout, *k, saved.row_elems)?,
                    None => saved.x.clone(),
                };
                grads.add_matmul(&l.a, &dxa.t()?, &h, l.scale)?;
            }
            dx = match key {
                Some(k) => dropout::add_into(
                    dx,
                    &dxa.matmul(&a)?,
                    l.dropout,
                    *k,
                    saved.row_elems,
                    l.scale,
                )?,
                None => add_matmul(dx, &dxa, &a, l.scale)?,
            };
        }
        Ok(dx)
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
