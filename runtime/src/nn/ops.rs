//! Composite, differentiable ops (see the module docs of [`crate::nn`]).

use candle_core::{D, DType, Result, Tensor};

/// RMSNorm as HF computes it: in f32, `x * rsqrt(mean(x^2) + eps)`, cast back, times `weight`.
///
/// # Shapes
/// `x: [.., d]`, `weight: [d]` -> `[.., d]`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(x, weight) {
        return super::cuda::rms_norm::rms_fwd(&x.contiguous()?, weight, eps as f32);
    }
    let (normed, _) = normalize(x, eps)?;
    normed.to_dtype(x.dtype())?.broadcast_mul(weight)
}

/// `(x * rstd, rstd)` in f32.
fn normalize(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let x32 = x.to_dtype(DType::F32)?;
    let rstd = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    Ok((x32.broadcast_mul(&rstd)?, rstd))
}

/// `c + alpha * a · b` for a `c` nothing else holds (`[m, n]`, `a` `[m, k]`, `b` `[k, n]`): on
/// CUDA the GEMM accumulates into `c` in place (no temporary, no add), elsewhere the composite ops.
pub fn add_matmul(c: Tensor, a: &Tensor, b: &Tensor, alpha: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(&c, a) && a.dtype() == b.dtype() && c.is_contiguous() && c.rank() == 2 {
        super::cuda::blas::gemm(&c, a, b, alpha as f32, 1.0)?;
        return Ok(c);
    }
    let p = a.matmul(b)?;
    c.add(&if alpha == 1.0 { p } else { (p * alpha)? })
}

/// `c` with `alpha * a · b` added to its columns `col0..col0 + n` (`c` `[m, N]` held by nothing
/// else, `a` `[m, k]`, `b` `[k, n]`): on CUDA the GEMM accumulates into that column range in
/// place, elsewhere the composite ops of [`add_matmul`] on the range.
pub fn add_matmul_cols(
    c: Tensor,
    col0: usize,
    a: &Tensor,
    b: &Tensor,
    alpha: f64,
) -> Result<Tensor> {
    let n = b.dim(1)?;
    #[cfg(feature = "cuda")]
    if fused(&c, a) && a.dtype() == b.dtype() && c.is_contiguous() && c.rank() == 2 {
        super::cuda::blas::gemm(&c.narrow(1, col0, n)?, a, b, alpha as f32, 1.0)?;
        return Ok(c);
    }
    let m = c.dim(0)?;
    let part = add_matmul(c.narrow(1, col0, n)?, a, b, alpha)?;
    c.slice_assign(&[0..m, col0..col0 + n], &part)
}

/// `dst + x` (same shape and dtype) for a `dst` nothing else holds: on CUDA the sum lands in
/// `dst`'s buffer (one pass, no new buffer), elsewhere the plain add.
pub fn add_into(dst: Tensor, x: &Tensor) -> Result<Tensor> {
    if dst.dims() != x.dims() {
        candle_core::bail!("add_into: {:?} + {:?}", dst.dims(), x.dims());
    }
    #[cfg(feature = "cuda")]
    if fused(&dst, x) && dst.is_contiguous() {
        return super::cuda::accumulate::add_into(dst, x);
    }
    dst.add(x)
}

/// `y + bias` over the last dimension for a `y` nothing else holds (in place on CUDA).
pub fn add_bias(y: Tensor, bias: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(&y, bias) && y.is_contiguous() {
        return super::cuda::accumulate::add_bias(y, bias);
    }
    y.broadcast_add(bias)
}

/// Rows `from[r]` of `x` (`[n, h]`, `from` u32): `index_select` on dimension 0, on CUDA 16 bytes a
/// thread.
pub fn take_rows(x: &Tensor, from: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(x, x) && from.device().same_device(x.device()) {
        return super::cuda::accumulate::take_rows(x, from);
    }
    x.index_select(from, 0)
}

/// `dst` (`[n, h]`, held by nothing else) with row `ids[r]` set to row `r` of `x` (`[rows, h]`,
/// distinct ids): on CUDA written in place, elsewhere an index-add (`dst` is zero there).
pub fn put_rows(dst: Tensor, ids: &Tensor, x: &Tensor) -> Result<Tensor> {
    move_rows(dst, ids, x, None, false)
}

/// `dst` (`[n, h]`, held by nothing else) with row `ids[r]` set to (`add`: plus) row `from[r]` of
/// `x` (row `r` when `from` is `None`), distinct ids: on CUDA in place, elsewhere an index-add
/// (without `add`, the rows written are zero there).
pub fn move_rows(
    dst: Tensor,
    ids: &Tensor,
    x: &Tensor,
    from: Option<&Tensor>,
    add: bool,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(&dst, x) && dst.is_contiguous() {
        return super::cuda::accumulate::put_rows(dst, ids, x, from, add);
    }
    let _ = add;
    match from {
        Some(f) => dst.index_add(ids, &x.index_select(f, 0)?, 0),
        None => dst.index_add(ids, x, 0),
    }
}

/// Backward of [`rms_norm`] from its input: `dx`, and `dweight` when `want_dw`.
/// `dx = rstd * (g - x̂ * mean(g * x̂))` with `g = dy * weight`; `dweight = Σ dy * x̂`.
pub fn rms_norm_backward(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    dy: &Tensor,
    want_dw: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    #[cfg(feature = "cuda")]
    if !want_dw && fused(x, weight) && dy.dtype() == x.dtype() {
        let dx = super::cuda::rms_norm::rms_bwd(
            &x.contiguous()?,
            weight,
            &dy.contiguous()?,
            eps as f32,
        )?;
        return Ok((dx, None));
    }
    let (xhat, rstd) = normalize(x, eps)?;
    let dy32 = dy.to_dtype(DType::F32)?;
    let g = dy32.broadcast_mul(&weight.to_dtype(DType::F32)?)?;
    let dot = (&g * &xhat)?.mean_keepdim(D::Minus1)?;
    let dx = g
        .sub(&xhat.broadcast_mul(&dot)?)?
        .broadcast_mul(&rstd)?
        .to_dtype(x.dtype())?;
    let dw = if want_dw {
        let d = weight.dim(0)?;
        let rows = dy32.elem_count() / d;
        let xh = xhat.to_dtype(x.dtype())?.to_dtype(DType::F32)?;
        Some((dy32 * xh)?.reshape((rows, d))?.sum(0)?)
    } else {
        None
    };
    Ok((dx, dw))
}

/// [`rms_norm_backward`] that asks `grads` whether `weight` is trained and adds its gradient
/// there; returns `dx`.
pub fn rms_norm_backward_into(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    dy: &Tensor,
    grads: &mut dyn super::GradSink,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(x, weight) && dy.dtype() == x.dtype() {
        let x = x.contiguous()?;
        let dy = dy.contiguous()?;
        let dx = super::cuda::rms_norm::rms_bwd(&x, weight, &dy, eps as f32)?;
        if grads.wants(weight) {
            let rows = super::cuda::rms_norm::rms_dw_rows(&x, &dy, eps as f32)?;
            grads.add_col_sums(weight, &rows)?;
        }
        return Ok(dx);
    }
    let (dx, dw) = rms_norm_backward(x, weight, eps, dy, grads.wants(weight))?;
    if let Some(dw) = dw {
        grads.add(weight, &dw)?;
    }
    Ok(dx)
}

/// Whether the fused CUDA kernel serves an op on `x` (and `w`, same dtype).
#[cfg(feature = "cuda")]
pub(crate) fn fused(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cuda()
        && x.dtype() == w.dtype()
        && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
}

/// `silu(gate) * up`, the SwiGLU of the MLP.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(gate, up) {
        return super::cuda::swiglu::swiglu_fwd(&gate.contiguous()?, &up.contiguous()?);
    }
    gate.silu()?.mul(up)
}

/// Backward of [`swiglu`]: `(dgate, dup)`, computed in f32.
pub fn swiglu_backward(gate: &Tensor, up: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if fused(gate, up) && dh.dtype() == gate.dtype() {
        return super::cuda::swiglu::swiglu_bwd(
            &gate.contiguous()?,
            &up.contiguous()?,
            &dh.contiguous()?,
        );
    }
    let dtype = gate.dtype();
    let g = gate.to_dtype(DType::F32)?;
    let dh = dh.to_dtype(DType::F32)?;
    let s = crate::nn::ops::sigmoid(&g)?;
    let silu = (&g * &s)?;
    let dup = (&dh * &silu)?.to_dtype(dtype)?;
    // silu'(g) = s * (1 + g * (1 - s))
    let dsilu = (&s * ((&g * s.affine(-1.0, 1.0)?)? + 1.0)?)?;
    let dgate = (dh * up.to_dtype(DType::F32)?)?
        .mul(&dsilu)?
        .to_dtype(dtype)?;
    Ok((dgate, dup))
}

/// `1 / (1 + exp(-x))`.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// Softmax over the last dimension, shifted by the (constant) row maximum.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `log_softmax` over the last dimension.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// The second half of the last dimension, negated, then the first half (HF `rotate_half`).
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d - d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// The transpose of [`rotate_half`]: the second half, then the first half negated.
fn rotate_half_t(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d - d / 2)?;
    Tensor::cat(&[&x2, &x1.neg()?], D::Minus1)
}

/// Rotary embeddings on the projections' own layout: `x` `[b, seq, heads, d]` (any strides),
/// `cos`/`sin` `[seq, d]`, or `[b, seq, d]` when each row has its own positions (packed rows).
/// The fused kernel on CUDA (one pass, no transposes), [`apply_rope`] elsewhere.
///
/// # Shapes
/// `x: [b, seq, heads, d]` -> `[b, seq, heads, d]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(x, cos) {
        return super::cuda::rope::rope(x, &cos.contiguous()?, &sin.contiguous()?, false);
    }
    let (cos, sin) = (per_head(cos)?, per_head(sin)?);
    apply_rope(&x.transpose(1, 2)?, &cos, &sin)?.transpose(1, 2)
}

/// Backward of [`rope`], same layout.
pub fn rope_bwd(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fused(dy, cos) {
        return super::cuda::rope::rope(dy, &cos.contiguous()?, &sin.contiguous()?, true);
    }
    let (cos, sin) = (per_head(cos)?, per_head(sin)?);
    rope_backward(&dy.transpose(1, 2)?, &cos, &sin)?.transpose(1, 2)
}

/// A `[b, seq, d]` table as `[b, 1, seq, d]` (broadcast over heads); `[seq, d]` as it is.
fn per_head(t: &Tensor) -> Result<Tensor> {
    if t.rank() == 3 {
        t.unsqueeze(1)
    } else {
        Ok(t.clone())
    }
}

/// Applies rotary embeddings (the reference op of [`rope`]).
///
/// # Shapes
/// `x: [b, heads, seq, d]`, `cos`/`sin`: `[seq, d]` -> `[b, heads, seq, d]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(cos)?
        .add(&rotate_half(x)?.broadcast_mul(sin)?)
}

/// Backward of [`apply_rope`]: `dx = dy * cos + rotate_half_t(dy * sin)`.
pub fn rope_backward(dy: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    dy.broadcast_mul(cos)?
        .add(&rotate_half_t(&dy.broadcast_mul(sin)?)?)
}

/// Mean cross-entropy of `logits` against `labels`, skipping labels equal to -100 (HF's
/// `ignore_index`). Computed in f32. Returns a scalar, and the number of counted labels.
///
/// # Shapes
/// `logits: [n, vocab]`, `labels: [n]` (i64).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let labels_v = labels.to_dtype(DType::I64)?.to_vec1::<i64>()?;
    let keep: Vec<f32> = labels_v
        .iter()
        .map(|&l| if l == -100 { 0.0 } else { 1.0 })
        .collect();
    let idx: Vec<u32> = labels_v
        .iter()
        .map(|&l| u32::try_from(l).unwrap_or(0))
        .collect();
    let count = keep.iter().filter(|&&k| k > 0.0).count();
    let device = logits.device();
    let logp = log_softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
    let idx = Tensor::from_vec(idx, (labels_v.len(), 1), device)?;
    let picked = logp.gather(&idx, 1)?.squeeze(1)?;
    let keep = Tensor::from_vec(keep, labels_v.len(), device)?;
    let total = picked.mul(&keep)?.sum_all()?;
    let loss = (total.neg()? / count.max(1) as f64)?;
    Ok((loss, count))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn composite_ops_match_candle_fused_forward() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 8), &dev).unwrap();
        let w = Tensor::randn(1f32, 0.1, 8, &dev).unwrap();
        let a = rms_norm(&x, &w, 1e-6).unwrap();
        let b = candle_nn_free_rms(&x, &w, 1e-6);
        assert!(
            a.sub(&b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                < 1e-5
        );
        let s = softmax_last_dim(&x).unwrap().sum_keepdim(1).unwrap();
        for v in s.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
            assert!((v - 1.0).abs() < 1e-5);
        }
    }

    fn candle_nn_free_rms(x: &Tensor, w: &Tensor, eps: f32) -> Tensor {
        let rows = x.to_vec2::<f32>().unwrap();
        let w = w.to_vec1::<f32>().unwrap();
        let out: Vec<Vec<f32>> = rows
            .iter()
            .map(|r| {
                let ms = r.iter().map(|v| v * v).sum::<f32>() / r.len() as f32;
                r.iter()
                    .zip(&w)
                    .map(|(v, w)| v / (ms + eps).sqrt() * w)
                    .collect()
            })
            .collect();
        Tensor::new(out, &Device::Cpu).unwrap()
    }

    #[test]
    fn gradients_flow_through_every_op() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 6), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.1, 6, &dev).unwrap()).unwrap();
        let h = rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap();
        let h = h.silu().unwrap();
        let h = softmax_last_dim(&h).unwrap();
        let labels = Tensor::new(&[1i64, -100, 3, 0], &dev).unwrap();
        let (loss, n) = cross_entropy(&h, &labels).unwrap();
        assert_eq!(n, 3);
        let grads = loss.backward().unwrap();
        for v in [&x, &w] {
            let g = grads.get(v.as_tensor()).unwrap();
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm.is_finite() && norm > 0.0);
        }
    }

    use crate::testing::max_abs_diff as max_diff;

    /// Each hand-written backward equals candle's autograd through the composite forward.
    #[test]
    fn backward_ops_match_autograd() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
        let u = Var::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
        let w = Var::randn(1f32, 0.2, 8, &dev).unwrap();
        let dy = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap();
        let seed = |t: Tensor| t.mul(&dy).unwrap().sum_all().unwrap().backward().unwrap();

        let g = seed(rms_norm(x.as_tensor(), w.as_tensor(), 1e-6).unwrap());
        let (dx, dw) = rms_norm_backward(x.as_tensor(), w.as_tensor(), 1e-6, &dy, true).unwrap();
        assert!(max_diff(&dx, g.get(x.as_tensor()).unwrap()) < 1e-5);
        assert!(max_diff(&dw.unwrap(), g.get(w.as_tensor()).unwrap()) < 1e-4);

        let g = seed(swiglu(x.as_tensor(), u.as_tensor()).unwrap());
        let (dg, du) = swiglu_backward(x.as_tensor(), u.as_tensor(), &dy).unwrap();
        assert!(max_diff(&dg, g.get(x.as_tensor()).unwrap()) < 1e-5);
        assert!(max_diff(&du, g.get(u.as_tensor()).unwrap()) < 1e-5);

        let cos = Tensor::randn(0f32, 1.0, (5, 8), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (5, 8), &dev).unwrap();
        let g = seed(apply_rope(x.as_tensor(), &cos, &sin).unwrap());
        let dx = rope_backward(&dy, &cos, &sin).unwrap();
        assert!(max_diff(&dx, g.get(x.as_tensor()).unwrap()) < 1e-5);
    }
}
