//! The one seam every projection goes through, so LoRA can replace it by module name, with its
//! explicit backward. A frozen weight gets no gradient and no weight-gradient matmul: only `dX`.

use candle_core::{DType, Result, Tensor};

use super::GradSink;
use super::dropout;
use super::ops::{add_bias, add_matmul, add_matmul_cols};

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
    /// `y + scale * (x A^T) B^T` for `y` `[rows, out]` (held by nothing else) and the input
    /// `x` `[rows, in]` (after any dropout), and `x A^T`.
    pub fn add_to(&self, y: Tensor, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let dtype = x.dtype();
        let xa = x.matmul(&self.a.to_dtype(dtype)?.t()?)?;
        let y = add_matmul(y, &xa, &self.b.to_dtype(dtype)?.t()?, self.scale)?;
        Ok((y, xa))
    }

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

/// A linear layer's weight `[out, in]`: a float tensor, or 4 bits as bitsandbytes stores them
/// (QLoRA's frozen base), dequantized for each product.
#[derive(Clone, Debug)]
pub enum Weight {
    /// In the model's dtype.
    Dense(Tensor),
    /// NF4 or FP4 codes and their absmax ([`crate::quant`]); never trained.
    Quant4(std::sync::Arc<crate::quant::Quant4>),
}

impl Weight {
    /// The weight as a float matrix in `dtype` (a dense weight as it is).
    pub fn matrix(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => Ok(t.clone()),
            Weight::Quant4(q) => q.dequantize(dtype),
        }
    }

    /// The float tensor of a dense weight.
    pub fn as_dense(&self) -> Option<&Tensor> {
        match self {
            Weight::Dense(t) => Some(t),
            Weight::Quant4(_) => None,
        }
    }

    /// `(out, in)`.
    pub fn dims2(&self) -> (usize, usize) {
        match self {
            Weight::Dense(t) => t.dims2().unwrap_or((0, 0)),
            Weight::Quant4(q) => q.shape,
        }
    }

    /// The values it stands for (`out * in`).
    pub fn elem_count(&self) -> usize {
        let (o, i) = self.dims2();
        o * i
    }

    /// The device it is on.
    pub fn device(&self) -> &candle_core::Device {
        match self {
            Weight::Dense(t) => t.device(),
            Weight::Quant4(q) => q.device(),
        }
    }

    /// The dtype it computes in (a 4-bit weight: the dtype it was quantized from).
    pub fn dtype(&self) -> DType {
        match self {
            Weight::Dense(t) => t.dtype(),
            Weight::Quant4(q) => q.dtype,
        }
    }
}

/// `y = x W^T + b`, with `W: [out, in]` as HF stores it, plus a LoRA adapter when attached.
#[derive(Clone, Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Weight,
    /// `[out]`.
    pub bias: Option<Tensor>,
    /// The adapter, if any.
    pub lora: Option<LoraAdapter>,
}

/// `x` (`[.., in]`) as `[rows, in]`, with its dims and the elements of one example (the first
/// dimension of a `[b, s, in]` input; the whole input otherwise), which key dropout masks.
fn flat_rows(x: &Tensor) -> Result<(Vec<usize>, Tensor, usize)> {
    let dims = x.dims().to_vec();
    let inner = dims[dims.len() - 1];
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let row_elems = if dims.len() >= 3 {
        dims[1..].iter().product()
    } else {
        rows * inner
    };
    Ok((dims, x.reshape((rows, inner))?, row_elems))
}

/// The linear layers `linears` of one input `x` (`[.., in]`) whose weights (and biases) are, in
/// order, the row ranges of `weight` (`[sum of out, in]`) and `bias`: one product for all of them,
/// the A of their adapters that draw no dropout mask side by side in one more, each adapter's B
/// added into its layer's columns. `keys` (one a layer, as [`Linear::forward_t`] takes it) key the
/// masks of adapters with dropout, which take their own masked input as they would alone.
/// `[.., sum of out]`: each layer's output in its column range, as its own forward computes it.
/// `saved` (a slot a layer) gets what [`Linear::backward`] needs, as each layer's forward records
/// it.
pub fn forward_concat(
    linears: &[&Linear],
    weight: &Tensor,
    bias: Option<&Tensor>,
    x: &Tensor,
    keys: &[Option<dropout::Key>],
    saved: Option<&mut [Option<LinearSaved>]>,
) -> Result<Tensor> {
    let (dims, x2, row_elems) = flat_rows(x)?;
    let mut y = x2.matmul(&weight.t()?)?;
    if let Some(b) = bias {
        y = add_bias(y, b)?;
    }
    let dtype = x2.dtype();
    // Each adapter with its layer, its first column and the key of its mask (none: it reads `x`
    // as it is).
    let mut adapters = Vec::new();
    let mut col0 = 0;
    for (i, l) in linears.iter().enumerate() {
        if let Some(a) = &l.lora {
            let key = keys.get(i).copied().flatten().filter(|_| a.dropout > 0.0);
            adapters.push((i, col0, a, key));
        }
        col0 += l.out_features();
    }
    // The adapters reading `x` itself: their A side by side, one product.
    let plain = adapters
        .iter()
        .filter(|a| a.3.is_none())
        .map(|a| a.2.a.to_dtype(dtype))
        .collect::<Result<Vec<_>>>()?;
    let shared = if plain.is_empty() {
        None
    } else {
        Some(x2.matmul(&Tensor::cat(&plain, 0)?.t()?)?)
    };
    let mut xas: Vec<Option<(Tensor, Option<dropout::Key>)>> = vec![None; linears.len()];
    let mut r0 = 0;
    for (i, col0, l, key) in adapters {
        let xa = match (key, &shared) {
            (Some(k), _) => {
                dropout::apply(&x2, l.dropout, k, row_elems)?.matmul(&l.a.to_dtype(dtype)?.t()?)?
            }
            (None, Some(shared)) => {
                let r = l.a.dim(0)?;
                r0 += r;
                shared.narrow(1, r0 - r, r)?.contiguous()?
            }
            // Every adapter without a mask is in the shared product.
            (None, None) => continue,
        };
        y = add_matmul_cols(y, col0, &xa, &l.b.to_dtype(dtype)?.t()?, l.scale)?;
        xas[i] = Some((xa, key));
    }
    if let Some(slots) = saved {
        for (slot, lora) in slots.iter_mut().zip(xas) {
            *slot = Some(LinearSaved {
                x: x2.clone(),
                lora,
                row_elems,
            });
        }
    }
    let mut out = dims;
    *out.last_mut().unwrap_or(&mut 0) = y.dim(1)?;
    y.reshape(out)
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
        Self::with_weight(Weight::Dense(weight), bias)
    }

    /// A linear layer over `weight` (dense or 4-bit).
    pub fn with_weight(weight: Weight, bias: Option<Tensor>) -> Self {
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
        let (dims, x2, row_elems) = flat_rows(x)?;
        let w = self.weight.matrix(x2.dtype())?;
        let mut y = x2.matmul(&w.t()?)?;
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
            let (yl, xa) = l.add_to(y, &h)?;
            y = yl;
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
        *out.last_mut().unwrap_or(&mut 0) = self.out_features();
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
        let w = self.weight.matrix(dy.dtype())?;
        let mut dx = match acc {
            Some(acc) => add_matmul(acc.reshape((rows, self.in_features()))?, &dy, &w, 1.0)?,
            None => dy.matmul(&w)?,
        };
        if let Weight::Dense(wd) = &self.weight
            && grads.wants(wd)
        {
            grads.add_matmul(wd, &dy.t()?, &saved.x, 1.0)?;
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

    /// What [`Linear::backward`] needs for the input `x` (`[rows, in]`), without the product
    /// itself (nothing reads it): the input, and the adapter's `x A` rows. No dropout (the
    /// tiled MLP, its only caller, runs where the adapters have none).
    pub fn saved_for(&self, x: &Tensor) -> Result<LinearSaved> {
        let (rows, inner) = x.dims2()?;
        let lora = match &self.lora {
            Some(l) => Some((x.matmul(&l.a.to_dtype(x.dtype())?.t()?)?, None)),
            None => None,
        };
        Ok(LinearSaved {
            x: x.clone(),
            lora,
            row_elems: rows * inner,
        })
    }

    /// Whether training draws dropout masks here (an adapter with `lora_dropout` above 0).
    pub fn has_dropout(&self) -> bool {
        self.lora.as_ref().is_some_and(|l| l.dropout > 0.0)
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight.dims2().0
    }

    /// Input features.
    pub fn in_features(&self) -> usize {
        self.weight.dims2().1
    }
}
